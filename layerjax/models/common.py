"""Building blocks shared by the layerjax Flax NNX models.

Every parameter is created through these helpers so it carries logical axis names
(`out_sharding` metadata) that `layerjax.parallel` maps onto a device mesh, and so that
parameter names follow diffusers' state-dict names (`kernel`/`scale` become `weight` in
`layerjax.convert`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]


class Buffer(nnx.Variable):
  """A stored, non-trainable tensor (a registered buffer in PyTorch terms)."""


def _init(axes: Axes, initializer=None):
  initializer = initializer or nnx.initializers.lecun_normal()
  # Sharding is applied by `layerjax.parallel`, not eagerly at construction.
  return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)


def linear(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs,
           dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
           kernel_init=None) -> nnx.Linear:
  """`nnx.Linear` whose kernel has logical `axes` (in, out) and bias `(axes[1],)`."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_init(axes, kernel_init),
      bias_init=_init((axes[1],), nnx.initializers.zeros_init()),
      precision=jax.lax.Precision.HIGHEST, rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
         stride: int = 1, padding: Any = 'SAME', axes: Axes = (None, None, None, 'channels'),
         dtype: Any = None, param_dtype: Any = jnp.float32) -> nnx.Conv:
  """NHWC `nnx.Conv` with logical axes (kh, kw, in, out) on its kernel.

  By default the output channels are named 'channels', so FSDP splits the VAE-shaped
  networks (SD3's VAE and heads hold ~200M parameters) instead of replicating them.
  """
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=padding, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_init(axes), bias_init=_init((axes[3],), nnx.initializers.zeros_init()),
      precision=jax.lax.Precision.HIGHEST, rngs=rngs)


def group_norm(num_features: int, *, rngs: nnx.Rngs, num_groups: int = 32, eps: float = 1e-6,
               param_dtype: Any = jnp.float32) -> nnx.GroupNorm:
  # Statistics in fp32 with the exact two-pass variance, as PyTorch computes them.
  return nnx.GroupNorm(num_features, num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                       param_dtype=param_dtype, use_fast_variance=False,
                       scale_init=_init((None,), nnx.initializers.ones_init()),
                       bias_init=_init((None,), nnx.initializers.zeros_init()), rngs=rngs)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without affine parameters, computed in fp32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale; the mean square is taken in fp32 (diffusers' RMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    var = jnp.square(x.astype(jnp.float32)).mean(-1, keepdims=True)
    y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              implementation: str = 'xla') -> jax.Array:
  """Softmax attention on [B, T, N, H] with scale 1/sqrt(H); `mask` [B, N, T, S] keeps True.

  On accelerators `jax.nn.dot_product_attention`: XLA's unless `implementation='cudnn'`
  asks for cuDNN's fused kernel (NVIDIA GPUs, bf16/fp16; it raises where it does not apply);
  fp32 inputs keep full fp32 matmuls (no TF32) so fp32 runs match PyTorch. On CPUs
  `_cpu_attention`: a loop over tiles of heads and queries with a hand-written backward.
  """
  if jax.default_backend() == 'cpu':
    return _cpu_attention(q, k, v, mask)
  precision = 'highest' if q.dtype == jnp.float32 else None
  with jax.default_matmul_precision(precision):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                        implementation=None if implementation == 'xla'
                                        else implementation)


# The most fp32 scores one iteration of the CPU attention's loop holds. With all heads at once
# XLA makes pass after pass over [B, N, T, S] scores far larger than the caches, and YNNPACK
# fuses the forward into one slow kernel: at SD3-medium's 24 heads and 2,637 tokens (three
# 384x512 layers and the text) the forward took 1.77 s, one head at a time 0.34-0.42 s, and
# PyTorch's fused kernel 0.21 s (2-core Xeon). 32 MiB keeps such a head whole; larger ones
# (the VAE's 4,096 positions at 512 px) go in chunks of queries.
_TILE_BYTES = 32 << 20


def _precision(x: jax.Array):
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _by_head(x: jax.Array) -> jax.Array:
  """[B, T, N, H] -> [B*N, T, H]."""
  b, t, n, h = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * n, t, h)


def _from_heads(x: jax.Array, batch: int) -> jax.Array:
  """[B*N, T, H] -> [B, T, N, H]."""
  return x.reshape(batch, -1, *x.shape[1:]).transpose(0, 2, 1, 3)


def _heads_of(q, k, v, mask):
  """q, k, v by head ([B*N, T|S, H]) and the [B|1, N|1, T|1, S] mask as [B*N, T|1, S]."""
  b, _, n, _ = q.shape
  m = None if mask is None else jnp.broadcast_to(mask, (b, n) + mask.shape[2:]).reshape(
      b * n, *mask.shape[2:])
  return _by_head(q), _by_head(k), _by_head(v), m


def _tiling(heads: int, t: int, s: int, chunked: bool) -> tuple[int, int]:
  """(heads per iteration, query chunks per head) that keep one iteration's fp32 scores
  within `_TILE_BYTES`; one chunk unless `chunked`. Under a mesh of several devices every
  iteration takes all heads: a loop along the heads axis, which the mesh may split, would
  gather it onto each device."""
  mesh = jax.sharding.get_abstract_mesh()
  spread = not mesh.empty and mesh.size > 1
  chunks = -(-(heads if spread else 1) * t * s * 4 // _TILE_BYTES) if chunked else 1
  if spread:
    return heads, chunks
  return max(1, min(heads, _TILE_BYTES // (-(-t // chunks) * s * 4))), chunks


def _softmax_parts(q, k, mask):
  """One head: exp((S - max) / sqrt(H)) [T, S] in fp32 and its reciprocal row sums [T, 1].
  The scale goes into the exponent's pass rather than a pass of its own over the scores; the
  backward applies it to dQ and dK. Scaling the scores made XLA:CPU materialise the scale as a
  [heads, T, S] array under differentiation (8 ms of 40 per block's fwd+bwd, 2-core Xeon)."""
  s = jnp.einsum('th,sh->ts', q, k, precision=_precision(q), preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)  # as jax.nn's large negative
  e = jnp.exp((s - s.max(-1, keepdims=True)) * (1.0 / math.sqrt(q.shape[-1])))
  return e, 1.0 / e.sum(-1, keepdims=True)


def _output(e, r, v):
  """One head's output, normalised after P V: one pass less over [T, S]. Inference and the
  differentiated forward both compute it this way, so a model and its copy agree to the bit
  (GRPO's KL against a reference equal to the model is exactly 0)."""
  o = jnp.einsum('ts,sh->th', e.astype(v.dtype), v, precision=_precision(v),
                 preferred_element_type=jnp.float32)
  return (o * r).astype(v.dtype)


def _head_attention(q, k, v, mask):
  """One head, forward only."""
  return _output(*_softmax_parts(q, k, mask), v)


@jax.custom_vjp
def _cpu_attention(q, k, v, mask):
  """Forward only (inference): heads, and within a head queries, in tiles of at most
  `_TILE_BYTES` of scores. Under differentiation `_cpu_attention_fwd` / `_bwd` instead:
  the backward keeps only the probabilities P and uses the softmax identity
  dS = P * (dP - rowsum(dO * O)); autodiff of the softmax keeps exp(S) and the row sums and
  differentiates the division, several more passes over the scores (the identity made
  attention's forward+backward ~1.35x faster on a 2-core AVX-512 EPYC)."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  per, chunks = _tiling(b * n, t, s, chunked=True)
  qh, kh, vh, m = _heads_of(q, k, v, mask)
  rows = -(-t // chunks)
  split = lambda x: jnp.pad(x, ((0, 0), (0, chunks * rows - t), (0, 0))).reshape(
      x.shape[0], chunks, rows, x.shape[-1])
  if m is not None:
    m = split(m) if m.shape[1] == t else jnp.broadcast_to(m[:, None], (b * n, chunks, 1, s))

  def head(x):  # one head's query chunks in turn
    chunks_q, k1, v1, chunks_m = x
    return jax.lax.map(lambda y: _head_attention(y[0], k1, v1, y[1]), (chunks_q, chunks_m))

  o = jax.lax.map(head, (split(qh), kh, vh, m), batch_size=per)
  return _from_heads(o.reshape(b * n, chunks * rows, -1)[:, :t], b)


def _cpu_attention_fwd(q, k, v, mask):
  b, t, n, _ = q.shape

  def head(x):
    qh, kh, vh, mh = x
    e, r = _softmax_parts(qh, kh, mh)
    return _output(e, r, vh), e * r

  per, _ = _tiling(b * n, t, k.shape[1], chunked=False)
  o, p = jax.lax.map(head, _heads_of(q, k, v, mask), batch_size=per)
  return _from_heads(o, b), (q, k, v, o, p)


def _cpu_attention_bwd(residuals, do):
  q, k, v, o, p = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])

  def head(x):
    qh, kh, vh, oh, ph, doh = x
    precision = _precision(qh)
    dv = jnp.einsum('ts,th->sh', ph.astype(doh.dtype), doh, precision=precision)
    dp = jnp.einsum('th,sh->ts', doh, vh, precision=precision,
                    preferred_element_type=jnp.float32)
    delta = jnp.einsum('th,th->t', doh.astype(jnp.float32), oh.astype(jnp.float32))
    ds = (ph * (dp - delta[:, None])).astype(qh.dtype)
    return (jnp.einsum('ts,sh->th', ds, kh, precision=precision) * scale,
            jnp.einsum('ts,th->sh', ds, qh, precision=precision) * scale, dv)

  per, _ = _tiling(o.shape[0], q.shape[1], k.shape[1], chunked=False)
  grads = jax.lax.map(head, (_by_head(q), _by_head(k), _by_head(v), o, p, _by_head(do)),
                      batch_size=per)
  return (*(_from_heads(g, q.shape[0]) for g in grads), None)  # the mask has no gradient


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


class KeyRngs:
  """`nnx.Rngs(key)` with its counter in Python: the n-th draw of any stream is
  `fold_in(key, n)`, the keys `nnx.Rngs(key)` gives (tested). Inside a trace (`nnx.vmap`,
  `nnx.eval_shape`) each counter update of a real `Rngs` makes flax format the traced value's
  origin, a walk over everything traced so far: SD3.5-large's skeleton took 100 s that way,
  and the stacked blocks' init 30% of the abstract SD3-medium decomposer's build."""

  def __init__(self, key: jax.Array):
    self._key, self._drawn = key, 0

  def __getattr__(self, stream: str):
    if stream.startswith('_'):
      raise AttributeError(stream)
    return self._draw

  def _draw(self) -> jax.Array:
    self._drawn += 1
    return jax.random.fold_in(self._key, self._drawn - 1)


def abstract(build: Callable[[Any], nnx.Module]) -> nnx.Module:
  """`build(rngs)` as shapes and metadata only (`nnx.eval_shape`): no memory, no init."""
  return nnx.eval_shape(lambda: build(KeyRngs(jax.random.key(0))))


def parameter_count(model: nnx.Module) -> int:
  """Trainable parameters (buffers such as the stored position embedding excluded)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@jax.custom_vjp
def _stored_grad(x: jax.Array) -> jax.Array:
  return x


def _stored_grad_bwd(_, g):
  # A data-dependent `cond` is a fusion boundary XLA cannot remove; the NaN branch only fires
  # when the gradient is already non-finite, so results are unchanged.
  ok = jnp.isfinite(g.reshape(-1)[0])
  return (jax.lax.cond(ok, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), g),)


_stored_grad.defvjp(lambda x: (x, None), _stored_grad_bwd)


def store_grad_on_cpu(x: jax.Array) -> jax.Array:
  """Identity whose gradient is materialised, on the CPU backend only.

  XLA:CPU otherwise fuses the residual stream's gradient into each of its consumers and
  recomputes it there, so backward cost grows with depth squared (2x slower than PyTorch at
  8 blocks). On GPUs the `cond` would cost a device-to-host sync, and fusion is fine there.
  """
  return _stored_grad(x) if jax.default_backend() == 'cpu' else x
