"""The training job: configs, the decomposer's zero-initialised start, learning, exact resume,
preemption, NaN handling and bad-input errors."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_parity, nhwc_to_nchw, torch_reference
from layerjax import config_spec as spec
from layerjax.convert import diffusers as convert
from layerjax.data import pipeline
from layerjax.models import mmdit
from layerjax.models.vae import AutoencoderKL, VAEConfig
from layerjax import build
from layerjax.models.shared import TextEmbeddings
from layerjax.train import evaluate, trainer
from layerjax.train import config as train_config
from train_utils import (ROOT, devices_env, load_config_file, make_dataset, one_device,
                         restored_state, tiny, write_embeddings)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('train_data'))


@pytest.mark.parametrize('name,arg,layers', [
    ('liwi', 'demo', 3), ('liwi', 'sd3_medium', 3), ('liwi', 'sd35_medium', 3),
    ('liwi', 'sd35_large', 3), ('reflayer', None, 1), ('reflayer', 'demo,steps=7', 1)])
def test_configs_describe_valid_models(name, arg, layers):
  c = load_config_file(name, arg)
  assert len(c.model.layers) == layers
  cfg = build.decomposer_config(c)  # validates architecture, channels, text dims
  assert cfg.mmdit.in_channels == cfg.latent_channels * (1 + len(c.model.conditions))
  if arg and 'sd35_large' in arg:
    assert cfg.mmdit.num_layers == 38 and tuple(c.mesh) == (-1, 8, 1)
  if arg and 'steps=7' in arg:
    assert c.total_steps == 7


def test_lr_mults_scale_the_named_parameters_steps():
  params = {'alpha_head': {'kernel': jnp.ones((3, 2))}, 'transformer': {'w': jnp.ones((4,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  opt = load_config_file('liwi', 'demo').optimizer
  opt.warmup_steps = 0

  def second_step(rules):  # the first is at warmup's lr 0
    opt.lr_mults = rules
    tx = trainer.make_optimizer(opt, params)
    state = tx.update(grads, tx.init(params), params)[1]
    return tx.update(grads, state, params)[0]
  plain, scaled = second_step(()), second_step((('alpha_head', 10.0),))
  np.testing.assert_allclose(scaled['alpha_head']['kernel'], 10 * plain['alpha_head']['kernel'],
                             rtol=1e-6)
  np.testing.assert_array_equal(scaled['transformer']['w'], plain['transformer']['w'])
  assert np.abs(plain['transformer']['w']).min() > 0
  with pytest.raises(ValueError, match=r"lr_mults: \['vae'\] match no trainable parameter"):
    second_step((('vae', 2.0),))


def test_clip_groups_clip_their_parameters_by_their_own_norm():
  """Gradients of norm 5 (the head), and 1 and 2 (the rest, together sqrt(5)): each group
  scaled to norm 1 apart, or all three by their joint norm sqrt(30)."""
  params = {'alpha_head': {'kernel': jnp.zeros(2)}, 'transformer': {'w': jnp.zeros(2)},
            'pos': jnp.zeros(2)}
  grads = {'alpha_head': {'kernel': jnp.array([3., 4.])},
           'transformer': {'w': jnp.array([.6, .8])}, 'pos': jnp.array([0., 2.])}
  opt = load_config_file('liwi', 'demo').optimizer
  opt.clip_norm = 1.0

  def clipped(groups):
    opt.clip_groups = groups
    tx = trainer.clip(opt, params)
    return jax.tree.map(np.asarray, tx.update(grads, tx.init(params), params)[0])
  apart, joint = clipped(('alpha_head',)), clipped(())
  np.testing.assert_allclose(apart['alpha_head']['kernel'], [.6, .8], rtol=1e-6)
  np.testing.assert_allclose(apart['transformer']['w'], np.array([.6, .8]) / 5 ** .5, rtol=1e-6)
  np.testing.assert_allclose(apart['pos'], np.array([0., 2.]) / 5 ** .5, rtol=1e-6)
  np.testing.assert_allclose(joint['alpha_head']['kernel'], np.array([3., 4.]) / 30 ** .5,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"clip_groups: \['vae'\] match no trainable parameter"):
    clipped(('alpha_head', 'vae'))


def test_config_argument_errors():
  with pytest.raises(ValueError, match='unknown variant'):
    load_config_file('liwi', 'nope')
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    load_config_file('liwi', 'demo,stepz=3')


def test_missing_pretrained_folder_fails_before_training(tmp_path):
  c = load_config_file('liwi', f'sd3_medium,pretrained={tmp_path}/nowhere')
  with pytest.raises(FileNotFoundError, match='init.pretrained: .*nowhere: no such directory'):
    trainer.create(c)


def test_missing_weights_or_embeddings_fail_before_loading(tmp_path, monkeypatch):
  """A weights folder without a weight file, or an SD3 config without its text embeddings,
  is refused by the config check, naming the key and the path, with nothing loaded."""
  _tiny_pipeline(tmp_path / 'sd3')
  (tmp_path / 'sd3' / 'vae' / 'diffusion_pytorch_model.safetensors').unlink()
  monkeypatch.setattr(convert, 'load_transformer', None)  # loading would fail differently
  c = load_config_file('liwi', f'sd3_medium,pretrained={tmp_path}/sd3,embeddings=e')
  with pytest.raises(ValueError, match=r'^init.pretrained: .*sd3/vae: no '
                     r'diffusion_pytorch_model.safetensors'):
    trainer.check_config(c)
  _tiny_pipeline(tmp_path / 'whole')
  c = load_config_file('liwi', f'sd3_medium,pretrained={tmp_path}/whole')
  with pytest.raises(ValueError, match=r'^model.text.embeddings: not set, .*embed-texts'):
    trainer.check_config(c)
  # Read with mmap: a URL is refused, naming how to copy it to the worker.
  for arg, key in (('pretrained=gs://b/sd3', 'init.pretrained'),
                   ('embeddings=gs://b/e.safetensors', 'model.text.embeddings')):
    with pytest.raises(ValueError, match=rf'^{key}: gs://b/\S+ is a URL; .* --sync gs://b/'):
      trainer.check_config(load_config_file('liwi', f'sd3_medium,{arg}'))


def _tiny_pipeline(path, in_channels=4):
  """A random tiny SD3 'pipeline folder' (transformer/ + vae/) saved by our converter."""
  t = mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(
      sample_size=8, in_channels=in_channels, out_channels=in_channels, num_layers=2,
      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
      caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8,
      qk_norm='rms_norm', dual_attention_layers=(0,)), rngs=nnx.Rngs(1))
  vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), latent_channels=in_channels,
                                norm_num_groups=4, layers_per_block=1, sample_size=16),
                      rngs=nnx.Rngs(2))
  convert.save_transformer(t, path / 'transformer')
  convert.save_vae(vae, path / 'vae')
  return t, vae


def test_pretrained_sd3_starts_unchanged(tmp_path, data_dir):
  """Extra input channels and the layer embedding start at zero: with K = 1 the decomposer's
  output is SD3's on the noisy latent, whatever the condition latents are; SD3's as diffusers
  computes it from the saved folder, against its float64 reference."""
  from diffusers import SD3Transformer2DModel
  from test_mmdit import torch_forward
  _, vae = _tiny_pipeline(tmp_path / 'sd3')
  c = tiny(data_dir, 'vae', embeddings='unused')
  c.init.pretrained = str(tmp_path / 'sd3')
  c.model.layers = ('background',)
  model = build.build_model(c, seed=0)
  assert model.transformer.config.in_channels == 12 and model.transformer.config.num_layers == 2
  rng = np.random.default_rng(0)
  noisy = jnp.asarray(rng.normal(size=(2, 1, 8, 8, 4)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
  pooled = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)
  sigma = jnp.asarray([0.3, 0.9])
  ours = model(noisy, cond, text, pooled, sigma)[:, 0]
  sd3_torch = SD3Transformer2DModel.from_pretrained(tmp_path / 'sd3' / 'transformer').eval()
  args = (nhwc_to_nchw(noisy[:, 0]), *map(np.asarray, (text, pooled, sigma * 1000)))
  assert_parity(ours, *(torch_forward(torch_reference(sd3_torch, p), *args)
                        for p in ('float32', 'float64')))
  # the VAE and the heads' bodies come from the pretrained VAE
  np.testing.assert_array_equal(model.latents.vae.encoder.conv_in.kernel[...],
                                vae.encoder.conv_in.kernel[...])


def test_loss_falls(tmp_path, data_dir):
  c = tiny(data_dir, total_steps=40, log_every=1, checkpoint_every=40)
  c.optimizer.decay_steps, c.optimizer.warmup_steps, c.optimizer.lr = 40, 5, 3e-3
  losses = []
  orig = trainer.create_writer

  class Recorder:
    def write_scalars(self, step, scalars):
      losses.append(scalars['loss'])
    def __getattr__(self, name):
      return lambda *a, **k: None

  trainer.create_writer = lambda *a, **k: Recorder()
  mesh = one_device(c)
  try:
    trainer.train(c, tmp_path / 'run', mesh=mesh)
  finally:
    trainer.create_writer = orig
  assert len(losses) == 40
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.7 * first, (first, last)
  # A re-run of the finished run returns what it recorded and writes nothing.
  files = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns)
                   for p in (tmp_path / 'run').rglob('*') if p.is_file()}
  before = files()
  recorded = json.loads((tmp_path / 'run' / 'train_result.json').read_text())
  assert recorded['step'] == 40 and recorded['train']['loss'] == pytest.approx(losses[-1])
  assert trainer.train(c, tmp_path / 'run', mesh=mesh) == recorded
  assert files() == before


def test_cond_dropout_is_the_loss_key_and_on_for_sd3():
  for variant, dropout in (('demo', 0.0), *((v, 0.1) for v in train_config.PRESETS)):
    assert load_config_file('liwi', variant).loss.cond_dropout == dropout, variant
  c = load_config_file('liwi', 'demo')
  c.loss.cond_dropout = 1.5
  with pytest.raises(ValueError, match=r'^loss.cond_dropout: expected a number in \[0, 1\]'):
    spec.check(c, train_config.SPEC)
  c = load_config_file('liwi', 'demo')
  c.data.cond_dropout = 0.1  # the loss's key, not the data's
  with pytest.raises(ValueError, match=r"^data: unknown key 'cond_dropout'"):
    spec.check(c, train_config.SPEC)


def test_only_the_train_loader_drops_conditions(tmp_path, data_dir, monkeypatch):
  seen = {}
  make_loader = trainer.make_loader

  def recording(data, split, mesh, **kw):
    seen[split] = data.get('cond_dropout')
    return make_loader(data, split, mesh, **kw)
  monkeypatch.setattr(trainer, 'make_loader', recording)
  monkeypatch.setattr(trainer, 'run', lambda *a: {})  # the loaders are all this checks
  c = tiny(data_dir, eval_every=2)
  c.loss.cond_dropout = 0.5
  trainer.train(c, tmp_path / 'run')
  assert seen == {'train': 0.5, 'validation': None}


@pytest.mark.slow
def test_training_with_cond_dropout(tmp_path, data_dir, monkeypatch):
  """Two steps with half the examples unconditional; the train loader gets the dropout."""
  c = tiny(data_dir, total_steps=2, checkpoint_every=2)
  c.loss.cond_dropout = 0.5
  kinds = []
  make_example = pipeline.make_example

  def recording(sample, rng, data):
    assert data.cond_dropout == 0.5
    example = make_example(sample, rng, data)
    kinds.append(example['prompt_kinds'])
    return example
  monkeypatch.setattr(pipeline, 'make_example', recording)
  # One device: compiling for the 8 fake ones would take most of the test's time.
  result = trainer.train(c, tmp_path / 'run', mesh=one_device(c))
  assert result['step'] == 2 and np.isfinite(result['train']['loss'])
  assert '' in kinds and len(set(kinds)) > 1, kinds


def _params(workdir, config):
  setup, state, step = restored_state(config, workdir)
  return step, jax.tree.map(np.asarray, {k: state[k] for k in ('params', 'ema', 'opt_state')})


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path, data_dir):
  c = tiny(data_dir, total_steps=6, checkpoint_every=3)
  c.optimizer.decay_steps = 6
  trainer.train(c, tmp_path / 'straight')
  c3 = tiny(data_dir, total_steps=3, checkpoint_every=3)
  c3.optimizer.decay_steps = 6
  trainer.train(c3, tmp_path / 'resumed')  # stops at 3, as a preempted job would
  trainer.train(c, tmp_path / 'resumed')   # a new run: restores step 3 and the loader
  (s1, a), (s2, b) = _params(tmp_path / 'straight', c), _params(tmp_path / 'resumed', c)
  assert s1 == s2 == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  c7 = tiny(data_dir, total_steps=7)
  c7.optimizer.decay_steps = 6
  assert trainer.train(c7, tmp_path / 'straight')['step'] == 7  # and goes on from there


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_term(tmp_path, data_dir):
  c = tiny(data_dir, total_steps=8, checkpoint_every=1, keep_checkpoints=2)
  c.optimizer.lr = 1e30
  c.optimizer.warmup_steps = 1
  c.optimizer.clip_norm = 1e30
  with pytest.raises(trainer.NonFiniteLoss, match=r'step \d+/8: non-finite \[.*loss.*\]') as e:
    trainer.train(c, tmp_path / 'run')
  assert 'last good checkpoint: step' in str(e.value)
  step, params = _params(tmp_path / 'run', c)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params['params']))


def test_mesh_must_divide_batch(data_dir):
  c = tiny(data_dir, mesh=(8, 1, 1))
  c.data.global_batch_size = 4
  with pytest.raises(ValueError, match='global_batch_size=4 is not divisible'):
    trainer.create(c)
  c = tiny(data_dir, mesh=(3, 1, 1))
  with pytest.raises(ValueError, match='needs 3 devices'):
    trainer.create(c)


def test_missing_dataset_or_split_fails_before_training(tmp_path, data_dir):
  c = tiny(data_dir)
  c.data.data_dir = str(tmp_path / 'none')
  with pytest.raises(FileNotFoundError, match=r"none/layered: no built 'layered' dataset"):
    trainer.train(c, tmp_path / 'run')
  assert not (tmp_path / 'none').exists()  # TFDS did not start building one there
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  c = tiny(data_dir)
  c.eval_every = 1
  c.eval.split = 'test'
  with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
    trainer.train(c, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.slow
def test_precomputed_embeddings_and_vae_latents_train_and_evaluate(tmp_path, data_dir):
  emb = write_embeddings(tmp_path / 'emb.safetensors', 6, 16, 16)
  c = tiny(data_dir, 'vae', embeddings=emb, eval_every=4)
  result = trainer.train(c, tmp_path / 'run')
  assert result['step'] == 4
  ev = result['eval']
  assert ev['examples'] == 8
  for layer in ('background', 'foreground', 'shadow'):
    for m in ('rgb_l1', 'alpha_iou'):
      assert np.isfinite(ev[f'model/layers/{layer}/{m}']) or layer == 'shadow'
  # Known values: both backgrounds are opaque (IoU 1); the empty shadow baseline against the
  # samples' black shadows has IoU 0 and no colour error.
  assert (ev['model/layers/background/alpha_iou'] == ev['trivial/layers/background/alpha_iou']
          == 1)
  assert ev['trivial/layers/shadow/alpha_iou'] == 0 and ev['trivial/layers/shadow/rgb_l1'] == 0
  assert (tmp_path / 'run' / 'eval' / 'validation_4.json').is_file()
  assert (tmp_path / 'run' / 'samples' / 'validation_4.png').is_file()
  assert list((tmp_path / 'run' / 'tensorboard').glob('events.out.tfevents.*'))
  table = evaluate.table(ev)
  assert 'layers/foreground/alpha_iou' in table and 'trivial' in table
  with pytest.raises(KeyError, match='no embedding for text'):
    TextEmbeddings(emb)(['never seen'])


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path, data_dir):
  """Preemption: SIGTERM mid-run writes a checkpoint at the current step and exits 0."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'layerjax.main', f'--config={ROOT}/configs/liwi.py:demo',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.data.image_size=(32, 32)', '--config.data.global_batch_size=4',
         '--config.data.num_workers=0', '--config.total_steps=100000',
         '--config.checkpoint_every=100000', '--config.eval_every=0', '--config.log_every=1',
         '--config.model.mmdit.num_layers=1']
  env = devices_env(1)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  seen = []
  deadline = time.time() + 240
  for line in proc.stdout:
    seen.append(line)
    if 'step 3/' in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  log = ''.join(seen) + out
  assert proc.returncode == 0, log[-3000:]
  assert 'SIGTERM: saved step' in log
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 3, steps


def test_eval_line_shows_each_layer_against_the_trivial_baseline():
  result = {'model/layers/alpha_iou': 0.5, 'model/layers/foreground/alpha_iou': 0.7,
            'trivial/layers/foreground/alpha_iou': 0.6, 'model/layers/shadow/alpha_iou': 0.2,
            'trivial/layers/shadow/alpha_iou': 0.0, 'model/layers/background/alpha_iou': 1.0,
            'model/layers/recompose_l1': 0.03}
  assert trainer._eval_line(result) == ('foreground IoU 0.700 (baseline 0.600), shadow IoU '
                                        '0.200 (baseline 0.000), recomposition L1 0.030')


def test_read_scalars_gives_back_what_the_tensorboard_writer_wrote(tmp_path):
  from layerjax.train.writers import TensorBoardWriter, read_scalars
  w = TensorBoardWriter(tmp_path)
  w.write_scalars(1, {'loss': 0.5, 'lr': 1e-3})
  w.write_scalars(7, {'loss': 0.25})
  w.write_images(7, {'grid': np.zeros((4, 4, 3), np.uint8)})  # not a scalar: skipped
  w.close()
  (events,) = read_scalars(tmp_path).values()
  # TensorBoard keeps scalars as float32.
  assert events == {'loss': {1: 0.5, 7: 0.25}, 'lr': {1: float(np.float32(1e-3))}}
