"""`bench/flops.py` against closed forms: matmuls, convolutions, scans, conds, gradients and one
MMDiT block counted per stream."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))

import flops  # noqa: E402

from layerjax.models.mmdit import JointTransformerBlock, MMDiTConfig  # noqa: E402

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def test_matmul_and_batched_einsum():
  assert flops.count(jnp.matmul, S((5, 7), F32), S((7, 3), F32)) == 2 * 5 * 7 * 3
  einsum = lambda a, b: jnp.einsum('bij,bjk->bik', a, b)
  assert flops.count(einsum, S((4, 5, 7), F32), S((4, 7, 3), F32)) == 4 * 2 * 5 * 7 * 3


@pytest.mark.parametrize('stride,groups', [(1, 1), (2, 1), (1, 2)])
def test_conv(stride, groups):
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)
  b, h, w, cin, cout, k = 2, 8, 6, 4, 6, 3
  out_pixels = (h // stride) * (w // stride)
  want = 2 * b * out_pixels * cout * k * k * (cin // groups)
  assert flops.count(conv, S((b, h, w, cin), F32), S((k, k, cin // groups, cout), F32)) == want


def test_scan_cond_and_gradient():
  m, k = 3, 4

  def scanned(w, x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]
  assert flops.count(scanned, S((k, k), F32), S((m, k), F32)) == 5 * 2 * m * k * k

  def branchy(p, x):  # the larger branch: two products
    return jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)
  assert flops.count(branchy, S((), jnp.bool_), S((k, k), F32)) == 2 * 2 * k ** 3

  loss = lambda w, x: jnp.sum(jnp.sin(x @ w))
  one = 2 * m * k * k
  assert flops.count(jax.grad(loss), S((k, k), F32), S((m, k), F32)) == 2 * one  # fwd + dW
  assert flops.count(jax.grad(loss, (0, 1)), S((k, k), F32), S((m, k), F32)) == 3 * one


def test_mmdit_block_counts_each_stream_at_its_own_tokens():
  b, n, t, heads, head_dim = 2, 12, 5, 2, 8
  d = heads * head_dim
  cfg = MMDiTConfig(num_layers=2, attention_head_dim=head_dim, num_attention_heads=heads,
                    caption_projection_dim=d, joint_attention_dim=d, pooled_projection_dim=d,
                    in_channels=4, out_channels=4, sample_size=8, pos_embed_max_size=8)
  block = JointTransformerBlock(cfg, context_pre_only=False, dual=False, rngs=nnx.Rngs(0))
  got = flops.count(lambda x, c, temb: block(x, c, temb), S((b, n, d), F32),
                    S((b, t, d), F32), S((b, d), F32))
  # Per stream: q, k, v and out (4 d^2) and the 4x MLP (8 d^2) at its own tokens; the
  # two adaLN projections (6 d^2 each) once per example; QK^T and AV at the joint length.
  linear = 2 * b * (n + t) * 12 * d * d
  modulation = 2 * 2 * b * d * 6 * d
  attention = 2 * 2 * b * (n + t) ** 2 * d
  assert got == linear + modulation + attention
