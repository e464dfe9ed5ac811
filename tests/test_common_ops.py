"""layerjax.models.common against references: attention on CPU (hand-written backward), KeyRngs."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerjax.models.common import attention


def _inputs(dtype=jnp.float32, b=2, t=7, s=9, n=3, h=8):
  kq, kk, kv, kg, km = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(kq, (b, t, n, h), dtype)
  k = jax.random.normal(kk, (b, s, n, h), dtype)
  v = jax.random.normal(kv, (b, s, n, h), dtype)
  cotangent = jax.random.normal(kg, (b, t, n, h), jnp.float32)
  # Keys masked per example as the decomposer does ([B, 1, 1, S]); at least one kept.
  mask = jax.random.bernoulli(km, 0.6, (b, 1, 1, s)).at[..., 0].set(True)
  return q, k, v, cotangent, mask


def _numpy_attention(q, k, v, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh->btnh', p, v)


def _grads(fn, q, k, v, cotangent, mask):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _reference(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / np.sqrt(q.shape[-1]))


@pytest.mark.parametrize('masked', [False, True])
def test_forward_matches_float64_numpy(masked):
  q, k, v, _, mask = _inputs()
  mask = mask if masked else None
  want = _numpy_attention(q, k, v, np.ones((1, 1, 1, 1), bool) if mask is None else mask)
  np.testing.assert_allclose(attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('masked', [False, True])
def test_gradients_match_autodiff_of_jax_nn_attention(masked):
  q, k, v, cotangent, mask = _inputs()
  mask = mask if masked else None
  value, grads = _grads(attention, q, k, v, cotangent, mask)
  want_value, want_grads = _grads(_reference, q, k, v, cotangent, mask)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want, name in zip(grads, want_grads, 'qkv'):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


def test_masked_keys_get_no_gradient():
  q, k, v, cotangent, mask = _inputs()
  _, (_, dk, dv) = _grads(attention, q, k, v, cotangent, mask)
  dropped = ~np.asarray(mask[:, 0, 0, :])  # [B, S]
  assert dropped.any()
  assert np.all(np.asarray(dk)[dropped] == 0) and np.all(np.asarray(dv)[dropped] == 0)


def test_bfloat16_close_to_float32():
  q, k, v, cotangent, mask = _inputs()
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = attention(*low, mask)
  assert out.dtype == jnp.bfloat16
  want = _numpy_attention(*low, mask)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0.05, atol=0.05)
  _, grads = _grads(attention, *low, cotangent, mask)
  _, want_grads = _grads(_reference, q, k, v, cotangent, mask)
  for got, ref in zip(grads, want_grads):
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max(), err


@pytest.mark.parametrize('tile_bytes', [100, 1100])  # queries in 3 padded chunks; 4 + 2 heads
@pytest.mark.parametrize('mask_kind', [None, 'keys', 'full'])
def test_tiled_loop_matches_float64_numpy_and_autodiff(monkeypatch, tile_bytes, mask_kind):
  """With a small tile budget the CPU loop splits heads into uneven groups and a head's
  queries into padded chunks: one head's 7 x 9 scores are 252 bytes."""
  from layerjax.models import common
  monkeypatch.setattr(common, '_TILE_BYTES', tile_bytes)
  q, k, v, cotangent, mask = _inputs()
  if mask_kind == 'full':  # a different mask per head and query, one key kept in each row
    mask = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 3, 7, 9)).at[..., 3].set(True)
  mask = None if mask_kind is None else mask
  want = _numpy_attention(q, k, v, np.ones((1, 1, 1, 1), bool) if mask is None else mask)
  np.testing.assert_allclose(attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
  value, grads = _grads(attention, q, k, v, cotangent, mask)
  want_value, want_grads = _grads(_reference, q, k, v, cotangent, mask)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, ref, name in zip(grads, want_grads, 'qkv'):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


def test_tiled_loop_keeps_a_batch_sharded_input_on_its_devices(monkeypatch):
  """Under a mesh of several devices the loop must not run along the (sharded) heads axis:
  XLA would gather q, k, v onto every device. Tiles of all heads and some queries instead."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  from layerjax.models import common
  monkeypatch.setattr(common, '_TILE_BYTES', 100)
  n = len(jax.devices())
  assert n > 1, 'conftest gives the CPU several devices'
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))
  q, k, v, cotangent, mask = _inputs(b=n)
  sharded = NamedSharding(mesh, PartitionSpec('data'))
  q, k, v, cotangent = (jax.device_put(x, sharded) for x in (q, k, v, cotangent))
  with jax.set_mesh(mesh):
    forward = jax.jit(attention).lower(q, k, v, mask).compile()
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask) * cotangent)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    for compiled in (forward, backward):
      assert 'all-gather' not in compiled.as_text()
    np.testing.assert_allclose(forward(q, k, v, mask), _numpy_attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-6)
    want = _grads(_reference, q, k, v, cotangent, mask)[1]
    for got, ref in zip(backward(q, k, v), want):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('masked', [False, True])
def test_inference_and_differentiated_forward_agree_to_the_bit(masked):
  """The forward alone and the forward under differentiation are different code (the latter
  keeps P); GRPO's KL against a reference equal to the policy is exactly 0 only if they give
  the same bits."""
  q, k, v, _, mask = _inputs(t=33, s=41, h=16)
  mask = mask if masked else None
  alone = jax.jit(attention)(q, k, v, mask)
  differentiated = jax.jit(lambda q, k, v: jax.vjp(lambda *a: attention(*a, mask), q, k, v)[0])
  np.testing.assert_array_equal(alone, differentiated(q, k, v))


def test_key_rngs_draw_the_keys_of_nnx_rngs():
  """Any mix of streams: the n-th draw is flax's n-th, inside `jax.vmap` too (where the
  stacked blocks are built), and a module built from either has the same weights."""
  from flax import nnx
  from layerjax.models.common import KeyRngs
  draws = lambda r: [jax.random.key_data(getattr(r, s)())
                     for s in ('params', 'params', 'dropout', 'default', 'params')]
  key = jax.random.key(7)
  np.testing.assert_array_equal(draws(KeyRngs(key)), draws(nnx.Rngs(key)))
  keys = jax.random.split(key, 3)
  np.testing.assert_array_equal(jax.vmap(lambda k: jnp.stack(draws(KeyRngs(k))))(keys),
                                np.stack([np.stack(draws(nnx.Rngs(k))) for k in keys]))
  a, b = (nnx.Linear(3, 4, rngs=r) for r in (KeyRngs(key), nnx.Rngs(key)))
  np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
  with pytest.raises(AttributeError):
    KeyRngs(key)._private  # pylint: disable=expression-not-assigned


def test_the_differentiated_attention_fills_no_array_of_scores_with_a_constant():
  """Scaling the scores made XLA:CPU write the scale into a [B*N, T, S] array (a fusion of
  constants alone) and read it back in two fusions: 8 of 40 ms of a block's forward+backward
  at `make bench`'s shapes. The scale belongs in the exponent's pass and in dQ, dK."""
  q, k, v, cotangent, _ = _inputs(t=33, s=41, h=16)
  vjp = lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g)
  text = jax.jit(vjp).lower(q, k, v, cotangent).compile().as_text()
  filled = re.findall(r'= f32\[([\d,]+)\]\S* fusion\((?:%constant[.\d]*(?:, )?)+\)', text)
  assert not [s for s in filled if math.prod(map(int, s.split(','))) >= 33 * 41], filled
