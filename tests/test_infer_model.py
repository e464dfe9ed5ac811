"""The inference model on disk (`layerjax.infer.model`): packing a workdir, loading it or the
workdir without optimizer state, in bfloat16, sharded, and the bad inputs refused."""

from __future__ import annotations

import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from layerjax import build, checkpoints, parallel
from layerjax.fileio import OutputError
from layerjax.infer import model as infer
from layerjax.models.shared import TextEmbeddings
from train_utils import load_config_file, restored_state, write_embeddings
from layerjax.train import trainer

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake CPU) devices')


@pytest.fixture(scope='module')
def workdirs(trained_workdirs):
  return trained_workdirs


def flat(state) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def outputs(model, seed=0) -> np.ndarray:
  """The velocity on a fixed input (text through the model's own encoder when it has one),
  and the decoded first layer (the frozen VAE for 'vae' latents)."""
  cfg = model.config
  rng = np.random.default_rng(seed)
  h = w = 32 // cfg.latent_factor
  c = cfg.latent_channels
  noisy = rng.normal(size=(1, len(cfg.layers), h, w, c)).astype(np.float32)
  cond = rng.normal(size=(1, h, w, c * len(cfg.conditions))).astype(np.float32)
  if cfg.text is not None:
    context, pooled = model.encode_text({'text_tokens': build.tokenize(['a ball'], 16)})
  else:
    context = rng.normal(size=(1, 6, 16)).astype(np.float32)
    pooled = rng.normal(size=(1, 16)).astype(np.float32)
  v = model(noisy, cond, context, pooled, jnp.array([0.7]))
  image = model.latents.decode(noisy[:, 0])
  return np.concatenate([np.asarray(v, np.float32).ravel(), np.asarray(image, np.float32).ravel()])


# Each kind trains once (~1 min on 2 shared cores); the 'vae' kind's tests are slow ones.
@pytest.mark.parametrize('kind', ['pixels', pytest.param('vae', marks=pytest.mark.slow)])
def test_packed_model_is_the_checkpoints_ema_model(kind, workdirs, tmp_path):
  config, workdir = workdirs(kind)
  packed = infer.pack(workdir, tmp_path / 'model')
  loaded = infer.load(packed)
  # The independent reference: the whole state as a resumed run restores it, with its frozen parts.
  setup, state, step = restored_state(config, workdir)
  assert loaded.step == step == 2 and loaded.source == str(packed)
  assert loaded.config.to_dict() == json.loads(json.dumps(config.to_dict()))
  ema, frozen, params = flat(state['ema']), flat(setup.frozen), flat(state['params'])
  assert any(not np.array_equal(ema[k], params[k]) for k in ema)  # EMA is not the params
  got = flat(nnx.state(loaded.model))
  assert set(got) == set(ema) | set(frozen) and not set(ema) & set(frozen)
  for k, x in {**ema, **frozen}.items():
    assert got[k].dtype == x.dtype, k
    np.testing.assert_array_equal(got[k], x, err_msg=k)
  if kind == 'vae':  # the trainer's random VAE (init.pretrained '') is what was packed
    assert any(k.startswith('latents/vae/') for k in frozen)
  with safe_open(str(packed / infer.WEIGHTS), framework='np') as f:
    assert set(f.keys()) == set(got)  # no optimizer state, nothing else (one block a group)
  reference = nnx.merge(setup.graphdef, state['ema'], setup.frozen)
  np.testing.assert_allclose(outputs(loaded.model), outputs(reference), rtol=1e-5, atol=1e-6)
  # A workdir loads as its packed model does.
  direct = infer.load(workdir)
  assert direct.step == 2 and direct.source == str(workdir)
  assert direct.model.config == loaded.model.config
  for k, x in flat(nnx.state(direct.model)).items():
    np.testing.assert_array_equal(x, got[k], err_msg=k)


@pytest.mark.parametrize('use_ema', [True, False])
def test_evaluation_restores_only_the_weights_it_scores(use_ema, workdirs, monkeypatch):
  """`--mode=eval` reads the step and the EMA (or, `eval.use_ema=False`, the trained)
  weights, as the whole checkpoint holds them, and never makes the optimizer's state."""
  config, workdir = workdirs('pixels')
  config = config.copy_and_resolve_references()
  config.eval.use_ema = use_ema
  key = 'ema' if use_ema else 'params'
  _, whole, _ = restored_state(config, workdir)
  make = trainer.make_optimizer
  def refuse(*_):
    raise AssertionError('optimizer state made')
  monkeypatch.setattr(trainer, 'make_optimizer', lambda *a: make(*a)._replace(init=refuse))
  read = []
  restore = checkpoints.Checkpoints.restore
  monkeypatch.setattr(checkpoints.Checkpoints, 'restore',
                      lambda self, *a, **k: read.append(restore(self, *a, **k)) or read[-1])
  setup, state, step = trainer.restore_for_eval(config, workdir)
  assert step == 2 and [sorted(r) for r in read] == [sorted(['step', key])]
  assert sorted(state) == sorted(setup.state) == sorted(['step', key])
  got = flat(state[key])
  assert set(got) == set(flat(whole[key]))
  for k, x in flat(whole[key]).items():
    np.testing.assert_array_equal(got[k], x, err_msg=k)


def test_loading_a_workdir_never_builds_optimizer_state(workdirs, monkeypatch):
  _, workdir = workdirs('pixels')
  def refuse(*_):
    raise AssertionError('optimizer built')
  monkeypatch.setattr(trainer, 'make_optimizer', refuse)
  restored = []
  restore = checkpoints.Checkpoints.restore
  monkeypatch.setattr(checkpoints.Checkpoints, 'restore',
                      lambda self, *a, **k: restored.append(restore(self, *a, **k))
                      or restored[-1])
  infer.load(workdir)
  assert [sorted(r) for r in restored] == [['ema', 'step']]


def test_bfloat16_load(workdirs, tmp_path):
  _, workdir = workdirs('pixels')
  packed = infer.pack(workdir, tmp_path / 'model')
  full = infer.load(packed)
  half = infer.load(packed, dtype='bfloat16')
  cfg = half.model.config
  assert cfg.mmdit.dtype == cfg.mmdit.param_dtype == jnp.bfloat16
  want = {k: x.astype(ml_dtypes.bfloat16) for k, x in flat(nnx.state(full.model)).items()}
  for source in (half, infer.load(workdir, dtype='bfloat16')):  # cast on placing / restoring
    got = flat(nnx.state(source.model))
    assert set(got) == set(want)
    for k, x in want.items():
      assert got[k].dtype == ml_dtypes.bfloat16, k
      np.testing.assert_array_equal(got[k], x, err_msg=k)
  a, b = outputs(full.model), outputs(half.model)
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # bf16 keeps ~3 significant digits
  back = infer.load(packed, dtype='float32')  # and back: every weight exactly as trained
  for k, x in flat(nnx.state(full.model)).items():
    np.testing.assert_array_equal(flat(nnx.state(back.model))[k], x, err_msg=k)


@needs_8
def test_sharded_load_places_each_weight_by_its_logical_axes(workdirs, tmp_path):
  _, workdir = workdirs('pixels')
  packed = infer.pack(workdir, tmp_path / 'model')
  want = flat(nnx.state(infer.load(packed).model))
  mesh = parallel.make_mesh((2, 2, 2))
  for source in (packed, workdir):
    model = infer.load(source, mesh=mesh).model
    shardings = dict(nnx.to_flat_state(parallel.model_shardings(model, mesh)))
    split = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
      x = var[...]
      assert x.sharding == shardings[path], path
      split += any(s is not None for s in x.sharding.spec)
      np.testing.assert_array_equal(np.asarray(x), want['/'.join(map(str, path))])
    assert split > 10  # the test's model is split, not only replicated
    np.testing.assert_allclose(outputs(model), outputs(infer.load(packed).model), rtol=1e-4,
                               atol=1e-5)


def test_text_inputs_of_the_byte_encoder(workdirs):
  loaded = infer.load(workdirs('pixels')[1])
  tokens = infer.text_inputs(loaded)(['ab'])['text_tokens']
  np.testing.assert_array_equal(tokens, [[1, 99, 100] + [0] * 13])  # BOS, bytes + 2, PAD


@pytest.mark.slow
def test_text_inputs_of_precomputed_embeddings(workdirs, tmp_path):
  """A packed model knows the empty text only; other texts come from an embeddings file."""
  packed = infer.load(infer.pack(workdirs('vae')[1], tmp_path / 'model'))
  table = load_file(str(workdirs.embeddings))
  key = lambda text: hashlib.sha256(text.encode()).hexdigest()
  batch = infer.text_inputs(packed)(['', ''])
  np.testing.assert_array_equal(batch['text_embeds'], np.stack([table[f'{key("")}.states']] * 2))
  np.testing.assert_array_equal(batch['pooled_text_embeds'][1], table[f'{key("")}.pooled'])
  with pytest.raises(infer.ModelError, match=r"^text 'ball': .*model reads precomputed .*"
                     r'text\.safetensors holds none for it: give embeddings='):
    infer.text_inputs(packed)(['ball'])
  batch = infer.text_inputs(packed, workdirs.embeddings)(['ball', ''])
  np.testing.assert_array_equal(batch['text_embeds'][0], table[f'{key("ball")}.states'])
  np.testing.assert_array_equal(batch['pooled_text_embeds'][1], table[f'{key("")}.pooled'])


def test_bad_inputs_are_refused_before_any_work(workdirs, tmp_path, monkeypatch):
  _, workdir = workdirs('pixels')
  packed = infer.pack(workdir, tmp_path / 'model')
  def no_work(*_, **__):
    raise AssertionError('work started')
  monkeypatch.setattr(build, 'build_model', no_work)
  monkeypatch.setattr(infer, '_filled', no_work)

  def refused(call, pattern, error=infer.ModelError):
    with pytest.raises(error, match=pattern) as e:
      call()
    assert '\n' not in str(e.value), str(e.value)

  (tmp_path / 'empty').mkdir()
  refused(lambda: infer.load(tmp_path / 'empty'), r'empty: neither a packed decomposer model '
          r'\(no decomposer.json\) nor a training workdir \(no checkpoints/\)$')
  refused(lambda: infer.load(tmp_path / 'nowhere'), r'nowhere: no such folder$')
  refused(lambda: infer.load(workdir, step=7), r'checkpoints: no step 7 \(steps there: \[2\]\)$')
  refused(lambda: infer.pack(workdir, tmp_path / 'm7', step=7), r'no step 7')
  refused(lambda: infer.load(packed, step=1), r'model: a packed model of step 2 only')
  refused(lambda: infer.load(packed, dtype='float16'), r"^dtype 'float16': expected one of")
  refused(lambda: infer.pack(packed, tmp_path / 'again'), r'a packed model already')
  bare = tmp_path / 'bare'
  shutil.copytree(workdir / 'checkpoints', bare / 'checkpoints')
  refused(lambda: infer.load(bare), r'bare/config.json: missing; the workdir does not record')

  # Another format version.
  other = tmp_path / 'other'
  shutil.copytree(packed, other)
  meta = json.loads((other / infer.META).read_text())
  (other / infer.META).write_text(json.dumps({**meta, 'format': 'layerjax.decomposer/2'}))
  refused(lambda: infer.load(other), r"decomposer.json: format 'layerjax.decomposer/2'; this "
          r"layerjax reads 'layerjax.decomposer/1'")

  # Weights that do not match the architecture: each problem named.
  bad = tmp_path / 'bad'
  shutil.copytree(packed, bad)
  tensors = load_file(str(bad / infer.WEIGHTS))
  del tensors['layer_embed']
  tensors['extra/kernel'] = np.zeros(3, np.float32)
  tensors['alpha_head/conv_in/bias'] = np.zeros(5, np.float32)
  save_file(tensors, str(bad / infer.WEIGHTS))
  refused(lambda: infer.load(bad), r"weights.safetensors: does not match the architecture in "
          r".*decomposer.json: missing \['layer_embed'\]; unexpected \['extra/kernel'\]; shapes "
          r"\['alpha_head/conv_in/bias \(5,\) \(expected \(8,\)\)'\]$")

  # An output folder holding something else is never replaced; a model only with overwrite.
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'todo.txt').write_text('mine')
  for overwrite in (False, True):
    refused(lambda: infer.pack(workdir, tmp_path / 'notes', overwrite=overwrite),
            r'notes: exists and is not a decomposer model', OutputError)
  assert (tmp_path / 'notes' / 'todo.txt').read_text() == 'mine'
  refused(lambda: infer.pack(workdir, packed), r'a decomposer model is already there; pass '
          r'--overwrite', OutputError)
  monkeypatch.undo()
  before = (packed / infer.META).stat().st_mtime_ns
  assert infer.pack(workdir, packed, overwrite=True) == packed
  assert (packed / infer.META).stat().st_mtime_ns != before


# `_MAPPED_BYTES` 0: the file opened anew for every tensor, as past 256 MiB read.
@pytest.mark.parametrize('mapped_bytes', [None, 0])
def test_packed_files_hold_the_stacked_blocks_one_by_one(mapped_bytes, workdirs, tmp_path,
                                                         monkeypatch):
  c, _ = workdirs('pixels')
  c = c.copy_and_resolve_references()
  c.model.mmdit.num_layers = 3  # blocks 0 and 1 (dual attention) held stacked, block 2 alone
  c.model.mmdit.dual_attention_layers = (0, 1)
  model = build.build_model(c, 0)
  packed = infer.save(infer.LoadedModel(model, c, 5, 'built'), tmp_path / 'model')
  stacked = np.asarray(model.transformer.transformer_blocks['0'].attn.to_q.kernel[...])
  last = np.asarray(model.transformer.transformer_blocks['2'].attn.to_q.kernel[...])
  with safe_open(str(packed / infer.WEIGHTS), framework='np') as f:
    blocks = {k.split('/')[2] for k in f.keys() if k.startswith('transformer/transformer_blocks/')}
    assert blocks == {'0', '1', '2'}
    key = 'transformer/transformer_blocks/{}/attn/to_q/kernel'.format
    for i, want in enumerate([stacked[0], stacked[1], last[0]]):
      np.testing.assert_array_equal(f.get_tensor(key(i)), want, err_msg=key(i))
    tensors = len(f.keys())
  opened = []
  monkeypatch.setattr(infer, 'safe_open', lambda *a, **k: opened.append(1) or safe_open(*a, **k))
  if mapped_bytes is not None:
    monkeypatch.setattr(infer, '_MAPPED_BYTES', mapped_bytes)
  got, want = flat(nnx.state(infer.load(packed).model)), flat(nnx.state(model))
  # Once to check the names and shapes, then once to read (far below 256 MiB), or per tensor.
  assert len(opened) == 1 + (1 if mapped_bytes is None else tensors)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_older_configs_with_a_boolean_remat_load(workdirs, tmp_path):
  """Workdirs and packed models from when `remat` was a boolean, and before `attention` and
  `unroll` were keys, load: True as 'full', XLA's attention, the platform's loop."""
  _, workdir = workdirs('pixels')
  old = tmp_path / 'old'
  shutil.copytree(workdir, old)
  config = json.loads((old / checkpoints.CONFIG).read_text())
  config['model']['remat'] = True
  del config['model']['attention']
  (old / checkpoints.CONFIG).write_text(json.dumps(config))
  loaded = infer.load(old)
  assert loaded.model.config.mmdit.remat == 'full'
  assert loaded.model.config.mmdit.attention == 'xla'
  want = flat(nnx.state(infer.load(workdir).model))
  got = flat(nnx.state(loaded.model))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  packed = infer.pack(old, tmp_path / 'packed')
  meta = json.loads((packed / infer.META).read_text())
  assert meta['model']['mmdit']['remat'] == 'full'
  meta['model']['mmdit']['remat'] = False
  del meta['model']['mmdit']['attention'], meta['model']['mmdit']['unroll']
  (packed / infer.META).write_text(json.dumps(meta))
  mmdit = infer.load(packed).model.config.mmdit
  assert (mmdit.remat, mmdit.attention, mmdit.unroll) == ('none', 'xla', None)


def test_a_workdir_without_its_config_loads_with_one_given(workdirs, tmp_path):
  """Workdirs trained before layerjax recorded config.json load with the config given."""
  c, workdir = workdirs('pixels')
  bare = tmp_path / 'bare'
  shutil.copytree(workdir / 'checkpoints', bare / 'checkpoints')
  given = infer.load(bare, config=c)
  want = flat(nnx.state(infer.load(workdir).model))
  got = flat(nnx.state(given.model))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert given.step == 2


@pytest.mark.slow
@needs_8
def test_sd3_medium_shaped_model_loads_sharded(tmp_path):
  """A packed decomposer of SD3-medium's width (one block), SD3's VAE and VAE-decoder heads
  loads with every large weight split over an FSDP mesh of 8 devices, each value kept."""
  c = load_config_file('liwi', 'sd3_medium')
  c.init.pretrained = ''
  c.model.mmdit.num_layers = 1
  model = build.build_model(c, 0)
  texts = TextEmbeddings(write_embeddings(tmp_path / 'emb.safetensors', 8, 4096, 2048))
  packed = infer.save(infer.LoadedModel(model, c, 0, 'random sd3_medium', texts), tmp_path / 'm')
  want = flat(nnx.state(model))
  del model
  loaded = infer.load(packed, mesh=parallel.make_mesh((1, 8, 1)))
  large = 0
  for path, var in nnx.to_flat_state(nnx.state(loaded.model)):
    x, key = var[...], '/'.join(map(str, path))
    np.testing.assert_array_equal(np.asarray(x), want[key], err_msg=key)
    if x.size >= 2**20:
      large += 1
      assert x.addressable_shards[0].data.size * 8 == x.size, (key, x.sharding)
  assert large >= 20
  assert infer.text_inputs(loaded)([''])['text_embeds'].shape == (1, 8, 4096)
