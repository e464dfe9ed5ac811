"""layerjax.models.common.attention on CPU (hand-written backward) against references."""

from __future__ import annotations

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
