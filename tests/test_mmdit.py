"""The Flax MMDiT against diffusers' SD3Transformer2DModel with the same random weights."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as TorchSD3
from flax import nnx

from conftest import assert_parity, nchw_to_nhwc, randomize_, torch_reference
from layerjax import parallel
from layerjax.convert.diffusers import TRANSFORMER, abstract_model, load_transformer, torch_shapes
from layerjax.models import mmdit

SMALL = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
             pooled_projection_dim=20, out_channels=4, pos_embed_max_size=12)
SD3_SMALL = dict(SMALL)
SD35_SMALL = dict(SMALL, in_channels=12, dual_attention_layers=(0, 1), qk_norm='rms_norm')


def inputs(cfg, batch=2, h=6, w=10, tokens=7, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, cfg['in_channels'], h, w)).astype(np.float32),
          rng.standard_normal((batch, tokens, cfg['joint_attention_dim'])).astype(np.float32),
          rng.standard_normal((batch, cfg['pooled_projection_dim'])).astype(np.float32),
          np.linspace(999.0, 20.0, batch).astype(np.float32))


def torch_forward(model, x, c, p, t):
  """diffusers' output in the model's dtype; the timestep goes in exact, as diffusers turns
  it into fp32 (float64 in `torch_reference`) features itself."""
  dtype = next(model.parameters()).dtype
  with torch.no_grad():
    out = model(*(torch.tensor(a, dtype=dtype) for a in (x, c, p)),
                torch.tensor(t, dtype=torch.float64)).sample
  return nchw_to_nhwc(out.double().numpy())


@pytest.fixture(scope='module', params=['sd3', 'sd35'])
def pair(request, tmp_path_factory):
  cfg = SD3_SMALL if request.param == 'sd3' else SD35_SMALL
  ref = randomize_(TorchSD3(**cfg).eval(), seed=1)
  folder = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(folder)
  return cfg, ref, load_transformer(folder), folder


@pytest.fixture(scope='module')
def references(pair):
  """diffusers' model in fp32 (as saved), in bf16, and the float64 reference."""
  return {p: torch_reference(pair[1], p) for p in ('float32', 'bfloat16', 'float64')}


def assert_matches_diffusers(out, references, args, precision='float32'):
  """Our output against the float64 reference, bounded by diffusers' own error."""
  assert_parity(out, torch_forward(references[precision], *args),
                torch_forward(references['float64'], *args), precision)


@pytest.mark.parametrize('shape', [(2, 6, 10), (3, 8, 8), (1, 24, 4)])
def test_parity_with_diffusers(pair, references, shape):
  cfg, _, model, _ = pair
  x, c, p, t = inputs(cfg, *shape)
  out = model(jnp.asarray(nchw_to_nhwc(x)), c, p, t)
  assert_matches_diffusers(out, references, (x, c, p, t))


def test_parity_under_jit_and_remat(pair, references):
  cfg, _, _, folder = pair
  model = load_transformer(folder, remat='full')
  x, c, p, t = inputs(cfg)
  out = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(nchw_to_nhwc(x)), c, p, t)
  assert_matches_diffusers(out, references, (x, c, p, t))


def block(model, i: int) -> mmdit.JointTransformerBlock:
  """Block i of `model` on its own: a `JointTransformerBlock` holding its slice of its
  group's stacked weights (the group keyed by the index of its first block)."""
  start = max(s for s in map(int, model.transformer_blocks.keys()) if s <= i)
  graphdef, state = nnx.split(model.transformer_blocks[str(start)])
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i - start], state))


def blocks_one_by_one(model, x, c, p, t):
  """The reference forward pass: every block called in turn in a Python loop."""
  cfg = model.config
  tokens = model.pos_embed(x)
  temb = model.time_text_embed(t, p)
  context = model.context_embedder(c)
  for i in range(cfg.num_layers):
    b = block(model, i)
    assert (b.dual, b.context_pre_only) == (i in cfg.dual_attention_layers,
                                            i == cfg.num_layers - 1), i
    tokens, new_context = b(tokens, context, temb)
    context = context if new_context is None else new_context
  scale, shift = model.norm_out(temb)
  out = model.proj_out(mmdit.modulate(tokens, shift, scale))
  return model.unpatchify(out, *x.shape[1:3])


# SD3 (a group of two plain blocks and the last block) and SD3.5 (dual attention and qk_norm:
# three groups).
SCAN_CONFIGS = {'sd3': SMALL, 'sd35': dict(SD35_SMALL, num_layers=4)}


def weighted_loss(fn):
  """A loss of `fn(model)` that weighs every output differently, and that output."""
  def loss(model):
    out = fn(model)
    return jnp.mean(out ** 2 * (jnp.arange(out.size).reshape(out.shape) % 7)), out
  return nnx.jit(nnx.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope='module', params=SCAN_CONFIGS)
def one_by_one(request):
  """(kind, the model, its inputs, its output and gradients with the blocks run one by one)."""
  arch = SCAN_CONFIGS[request.param]
  x, c, p, t = (jnp.asarray(a) for a in inputs(arch))
  args = (jnp.asarray(nchw_to_nhwc(x)), c, p, t)
  model = mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(**arch), rngs=nnx.Rngs(3))
  (_, out), grads = weighted_loss(lambda m: blocks_one_by_one(m, *args))(model)
  return request.param, model, args, out, grads


@pytest.mark.parametrize('remat,unroll', [
    ('none', False), ('none', True), ('full', False), ('full', True),
    *(pytest.param(r, False, marks=pytest.mark.slow) for r in mmdit.REMAT_POLICIES[2:])])
def test_scanned_groups_equal_blocks_one_by_one(one_by_one, remat, unroll):
  """Rolled (the accelerators' default) and unrolled (the CPU's) alike."""
  kind, ref_model, args, want, want_grads = one_by_one
  groups = {k: v.shape[0] for k, v in nnx.to_flat_state(nnx.state(ref_model))
            if k[-3:] == ('attn', 'to_q', 'kernel')}
  assert groups == ({('transformer_blocks', '0', 'attn', 'to_q', 'kernel'): 2,
                     ('transformer_blocks', '2', 'attn', 'to_q', 'kernel'): 1} if kind == 'sd3'
                    else {('transformer_blocks', str(i), 'attn', 'to_q', 'kernel'): n
                          for i, n in ((0, 2), (2, 1), (3, 1))})
  model = mmdit.SD3Transformer2DModel(
      dataclasses.replace(ref_model.config, remat=remat, unroll=unroll), rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(ref_model))
  (_, out), grads = weighted_loss(lambda m: m(*args))(model)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads),
                               strict=True):
    np.testing.assert_allclose(g[...], w[...], rtol=1e-4, atol=1e-5 * np.abs(w[...]).max(),
                               err_msg=str(path))


def test_remat_reads_old_booleans_and_refuses_unknown_policies():
  assert mmdit.MMDiTConfig(remat=True).remat == 'full'
  assert mmdit.MMDiTConfig(remat=False).remat == 'none'
  with pytest.raises(ValueError, match="remat must be one of .*got 'some'"):
    mmdit.MMDiTConfig(remat='some')
  with pytest.raises(ValueError, match="attention must be 'xla' or 'cudnn', got 'flash'"):
    mmdit.MMDiTConfig(attention='flash')


def test_offload_is_refused_where_the_devices_have_no_pinned_host(monkeypatch):
  class Device:
    platform = 'tpu7'
    addressable_memories = lambda self: []
  monkeypatch.setattr(jax, 'devices', lambda *_: [Device()])
  with pytest.raises(ValueError, match="remat 'offload'.*tpu7 devices have no pinned_host"):
    mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(**SMALL, remat='offload'), rngs=nnx.Rngs(0))


def test_fresh_pos_embed_matches_diffusers():
  ref = TorchSD3(**SD35_SMALL)
  model = mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(**SD35_SMALL), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.pos_embed.pos_embed[...], ref.pos_embed.pos_embed.numpy(),
                             rtol=0, atol=1e-6)


def test_adaln_zero_blocks_start_as_identity():
  cfg = mmdit.MMDiTConfig(**SD35_SMALL)
  model = mmdit.adaln_zero_(mmdit.SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0)))
  x, c, p, t = inputs(SD35_SMALL)
  x = nchw_to_nhwc(x)
  tokens = model.pos_embed(jnp.asarray(x))
  context = model.context_embedder(jnp.asarray(c))
  temb = model.time_text_embed(jnp.asarray(t), jnp.asarray(p))
  for i in range(model.config.num_layers):
    out, ctx = block(model, i)(tokens, context, temb)
    np.testing.assert_array_equal(out, tokens, err_msg=f'block {i}')
    if ctx is not None:
      np.testing.assert_array_equal(ctx, context, err_msg=f'block {i}')
  assert not np.any(model(jnp.asarray(x), jnp.asarray(c), jnp.asarray(p), jnp.asarray(t)))


def test_missing_config_keys_take_diffusers_defaults():
  cfg = mmdit.MMDiTConfig.from_diffusers({'_class_name': 'SD3Transformer2DModel'})
  defaults = {k: v.default for k, v in inspect.signature(TorchSD3.__init__).parameters.items()
              if k in mmdit.MMDiTConfig.ARCH_FIELDS}
  assert {k: getattr(cfg, k) for k in defaults} == {**defaults, 'dual_attention_layers': ()}


def test_latent_larger_than_pos_embed_is_refused():
  model = mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(**SD3_SMALL), rngs=nnx.Rngs(0))
  x, c, p, t = inputs(SD3_SMALL, 1, 26, 4)
  with pytest.raises(ValueError, match='pos_embed_max_size'):
    model(jnp.asarray(nchw_to_nhwc(x)), c, p, t)


def test_bf16_parity_with_diffusers(pair, references):
  cfg, _, _, folder = pair
  model16 = load_transformer(folder, dtype=jnp.bfloat16)
  x, c, p, t = inputs(cfg)
  out16 = model16(jnp.asarray(nchw_to_nhwc(x)), c, p, t)
  assert out16.dtype == jnp.bfloat16
  assert_matches_diffusers(out16, references, (x, c, p, t), 'bfloat16')


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_equals_single_device(pair, mesh_shape):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU)')
  cfg, _, model, folder = pair
  x, c, p, t = inputs(cfg, batch=8)
  x = jnp.asarray(nchw_to_nhwc(x))
  expected = np.asarray(model(x, c, p, t))

  mesh = parallel.make_mesh(mesh_shape)
  sharded = parallel.shard_model(load_transformer(folder), mesh)
  args = [jax.device_put(a, parallel.batch_sharding(mesh, np.ndim(a))) for a in (x, c, p, t)]
  with jax.set_mesh(mesh):
    out = nnx.jit(lambda m, *a: m(*a))(sharded, *args)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_every_parameter_has_logical_axes(pair):
  _, _, model, _ = pair
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get('out_sharding')
    assert axes is not None and len(axes) == var.ndim, path


@pytest.mark.parametrize('name,count', [
    ('SD3_MEDIUM', 683), ('SD35_MEDIUM', 909),
    # Tracing 38 full-size blocks takes ~30 s on 2 cores.
    pytest.param('SD35_LARGE', 1227, marks=pytest.mark.slow)])
def test_official_configs_have_diffusers_names(name, count):
  """Full-size configs, shapes only: the same tensor names and shapes as diffusers builds."""
  cfg = getattr(mmdit, name)
  _, state = abstract_model(TRANSFORMER, cfg)
  ours = torch_shapes(state)
  with torch.device('meta'):
    ref = TorchSD3(**{k: v for k, v in cfg.to_diffusers().items() if k != '_class_name'})
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert len(ours) == count
  assert ours == theirs



def test_stored_grad_is_the_identity():
  from layerjax.models.common import store_grad_on_cpu
  x = jnp.linspace(-2.0, 3.0, 12).reshape(3, 4)
  f = lambda x: jnp.sum(jnp.sin(store_grad_on_cpu(x)) * x)
  g = lambda x: jnp.sum(jnp.sin(x) * x)
  np.testing.assert_array_equal(store_grad_on_cpu(x), x)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(g)(x), rtol=1e-6)
