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
  `_cpu_attention`, whose
  hand-written backward makes attention's forward+backward ~1.35x and an SD3-shaped training
  step ~1.1x faster (bench/mmdit_step.py, 2-core AVX-512 EPYC).
  """
  if jax.default_backend() == 'cpu':
    return _cpu_attention(q, k, v, mask)
  precision = 'highest' if q.dtype == jnp.float32 else None
  with jax.default_matmul_precision(precision):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                        implementation=None if implementation == 'xla'
                                        else implementation)


def _attention_forward(q, k, v, mask):
  """(output [B, T, N, H], probabilities [B, N, T, S] in fp32)."""
  precision = _precision(q)
  s = jnp.einsum('btnh,bsnh->bnts', q, k, precision=precision,
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
  if mask is not None:
    s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)  # as jax.nn's large negative
  e = jnp.exp(s - s.max(-1, keepdims=True))
  p = e * (1.0 / e.sum(-1, keepdims=True))
  return jnp.einsum('bnts,bsnh->btnh', p.astype(v.dtype), v, precision=precision), p


def _precision(x: jax.Array):
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


@jax.custom_vjp
def _cpu_attention(q, k, v, mask):
  """Attention whose backward keeps only the probabilities P and uses the softmax identity
  dS = P * (dP - rowsum(dO * O)): autodiff of the softmax instead keeps exp(S) and the row
  sums and differentiates the division, several more passes over the [B, N, T, S] scores,
  which on XLA:CPU cost as much as attention's matmuls."""
  return _attention_forward(q, k, v, mask)[0]


def _cpu_attention_fwd(q, k, v, mask):
  o, p = _attention_forward(q, k, v, mask)
  return o, (q, k, v, o, p)


def _cpu_attention_bwd(residuals, do):
  q, k, v, o, p = residuals
  precision = _precision(q)
  dv = jnp.einsum('bnts,btnh->bsnh', p.astype(do.dtype), do, precision=precision)
  dp = jnp.einsum('btnh,bsnh->bnts', do, v, precision=precision,
                  preferred_element_type=jnp.float32)
  delta = jnp.einsum('btnh,btnh->bnt', do.astype(jnp.float32), o.astype(jnp.float32))
  ds = (p * (dp - delta[..., None]) * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
  dq = jnp.einsum('bnts,bsnh->btnh', ds, k, precision=precision)
  dk = jnp.einsum('bnts,btnh->bsnh', ds, q, precision=precision)
  return dq, dk, dv, None  # the mask has no gradient


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


class _ShapeRngs:
  """An `nnx.Rngs` stand-in for shape-only construction: every stream gives one fixed key and
  no counter moves. Under `nnx.eval_shape` each counter update of a real `Rngs` makes flax
  format the traced value's origin, a walk over everything traced so far: building
  SD3.5-large's skeleton took 100 s that way."""

  def __getattr__(self, stream: str):
    if stream.startswith('__'):
      raise AttributeError(stream)
    return lambda: jax.random.key(0)


def abstract(build: Callable[[Any], nnx.Module]) -> nnx.Module:
  """`build(rngs)` as shapes and metadata only (`nnx.eval_shape`): no memory, no init."""
  return nnx.eval_shape(lambda: build(_ShapeRngs()))


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
