"""Data, FSDP and tensor parallelism give the same training signal as one device (several
processes: `test_multiprocess.py`)."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from layerjax import build, parallel
from layerjax.models import common
from layerjax.data.pipeline import make_loader
from layerjax.train import objectives, trainer
from train_utils import ROOT, devices_env, load_config_file, make_dataset, tiny


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('parallel_data'))


def _loss_and_grads(config, mesh, batch):
  """The loss terms and gradients of the initial parameters on `mesh`, gathered to numpy."""
  setup = trainer.create(config, mesh)
  rng = jax.random.PRNGKey(7)

  @jax.jit
  def f(params, frozen, batch):
    def loss(params):
      model = nnx.merge(setup.graphdef, params, frozen)
      return objectives.loss_fn(model, batch, rng, config.loss)
    return jax.value_and_grad(loss, has_aux=True)(params)

  with jax.set_mesh(setup.mesh):
    (_, terms), grads = f(setup.state['params'], setup.frozen,
                          parallel.global_batch(batch, setup.mesh))
  return jax.device_get(terms), jax.tree.map(np.asarray, grads), setup


@pytest.fixture(scope='module')
def reference(data_dir):
  config = tiny(data_dir)
  config.model.mmdit.num_attention_heads = 4  # 'heads' and 'mlp' split over tensor = 2
  batch = build.model_batch(next(iter(make_loader(config.data, 'train', None))),
                            build.text_inputs(config))
  one = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  terms, grads, _ = _loss_and_grads(config, one, batch)
  return config, batch, terms, grads


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_loss_and_grads_match_one_device(reference, shape):
  config, batch, terms, grads = reference
  config = config.copy_and_resolve_references()
  config.mesh = shape
  got_terms, got_grads, setup = _loss_and_grads(config, None, batch)
  # The weights really are split as intended: an attention kernel [embed 32, heads 32] is
  # split over fsdp, then tensor (the stacked blocks' axis replicated); its optimizer moments
  # follow it.
  _, fsdp, tensor = shape
  q = lambda tree: jax.tree.leaves(
      tree['transformer']['transformer_blocks']['0']['attn']['to_q']['kernel'])[0]
  for sh in (q(setup.state_shardings['params']), q(setup.state_shardings['opt_state'][1][0].mu)):
    assert sh.spec == P(None, 'fsdp', 'tensor'), sh.spec  # group '0': block 0 alone
    assert sh.shard_shape((1, 32, 32)) == (1, 32 // fsdp, 32 // tensor)
  for k, v in terms.items():
    np.testing.assert_allclose(got_terms[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
  flat, got = jax.tree.leaves_with_path(grads), jax.tree.leaves(got_grads)
  for (path, g), h in zip(flat, got, strict=True):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(g).max()),
                               err_msg=jax.tree_util.keystr(path))


def test_estimate_terms_read_every_kth_example(reference):
  """With `loss.estimate_every = 2` the recomposition reads only examples 0, 2, 4, ...:
  changing the other examples' layers leaves it unchanged, where with k = 1 it moves."""
  config, batch, _, _ = reference
  changed = dict(batch)
  for key in ('background', 'foreground', 'shadow', 'foreground_on_checkerboard',
              'shadow_on_checkerboard'):
    x = np.array(batch[key])
    x[1::2] = 1 - x[1::2]
    changed[key] = x
  recompose = {}
  for k in (1, 2):
    c = config.copy_and_resolve_references()
    c.loss.estimate_every = k
    setup = trainer.create(c, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    terms = jax.jit(lambda params, frozen, b: objectives.loss_fn(
        nnx.merge(setup.graphdef, params, frozen), b, jax.random.PRNGKey(7), c.loss)[1])
    recompose[k] = [float(terms(setup.state['params'], setup.frozen, b)['loss/recompose'])
                    for b in (batch, changed)]
  assert abs(recompose[1][0] - recompose[1][1]) > 1e-3
  assert recompose[2][0] == pytest.approx(recompose[2][1], rel=1e-6)
  assert recompose[2][0] != pytest.approx(recompose[1][0], rel=1e-3)
  c = config.copy_and_resolve_references()
  c.loss.estimate_every = 3
  with pytest.raises(ValueError, match='estimate_every=3 must divide the per-device batch 8'):
    trainer.check_config(c, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.mark.parametrize('variant', ['sd3_medium', 'sd35_large'])
def test_full_size_configs_shard_over_the_mesh(variant):
  """The whole SD3 decomposer, abstractly (no memory): every parameter gets a placement on
  the config's mesh over 8 devices, and on an FSDP mesh each part (transformer, VAE, both
  heads) splits 8 ways, so none of them is replicated on every device."""
  config = load_config_file('liwi', variant)
  config.init.pretrained = ''  # random weights of the same shapes
  model = common.abstract(lambda rngs: build.build_model(config, rngs))
  parallel.model_shardings(model, parallel.make_mesh(tuple(config.mesh)))
  shardings = parallel.model_shardings(model, parallel.make_mesh((1, 8, 1)))
  total, per_device = {}, {}
  for (path, var), (_, sh) in zip(nnx.to_flat_state(nnx.state(model)),
                                  nnx.to_flat_state(shardings), strict=True):
    total[path[0]] = total.get(path[0], 0) + var.size
    per_device[path[0]] = per_device.get(path[0], 0) + int(np.prod(sh.shard_shape(var.shape)))
  assert {'transformer', 'latents', 'alpha_head', 'shadow_head'} <= set(total)
  for part in ('transformer', 'latents', 'alpha_head', 'shadow_head'):
    assert total[part] / per_device[part] >= 7.9, (part, total[part], per_device[part])
  if variant == 'sd35_large':
    assert total['transformer'] > 8e9


@pytest.mark.slow  # minutes of compiling SD3's VAE and VAE-shaped heads at full width
@pytest.mark.parametrize('variant', ['sd3_medium', 'sd35_large'])
def test_sd3_shaped_step_on_fake_devices(tmp_path, data_dir, variant):
  """`python -m layerjax.main` steps a full-width SD3 / SD3.5-large decomposer (one transformer
  block; SD3's VAE and heads; precomputed text embeddings), FSDP-sharded over 2 fake devices.
  Two, not eight: on one host every fake device holds its own gathered weights, and eight
  copies of SD3's VAE-shaped networks do not fit in this machine's memory."""
  from train_utils import write_embeddings
  arch = build.decomposer_config(load_config_file('liwi', variant)).mmdit
  embeddings = write_embeddings(tmp_path / 'emb.safetensors', 8, arch.joint_attention_dim,
                                arch.pooled_projection_dim)
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'layerjax.main', f'--config={ROOT}/configs/liwi.py:{variant}',
             f'--workdir={workdir}', '--config.init.pretrained=',
             f'--config.model.text.embeddings={embeddings}', f'--config.data.data_dir={data_dir}',
             '--config.data.image_size=(32, 32)', '--config.data.global_batch_size=2',
             '--config.data.num_workers=0', '--config.total_steps=2', '--config.log_every=1',
             '--config.checkpoint_every=2', '--config.eval_every=0', '--config.mesh=(1, 2, 1)',
             '--config.model.mmdit.num_layers=1', '--config.model.mmdit.dual_attention_layers=()']
  env = devices_env(2)
  run = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=1800)
  assert run.returncode == 0, run.stdout[-3000:]
  steps = [line for line in run.stdout.splitlines() if ' loss ' in line and '/2 ' in line]
  assert len(steps) == 2, run.stdout[-3000:]
  assert all(np.isfinite(float(line.split('loss ')[1].split()[0])) for line in steps)
  assert (workdir / 'checkpoints' / '2').is_dir()
