"""The SD3 / SD3.5 MMDiT in Flax NNX, weight-exact with diffusers' `SD3Transformer2DModel`.

Attribute names follow diffusers' state-dict names (see `layerjax.convert.diffusers`), latents
are NHWC, and the call convention is
`model(latents, encoder_hidden_states, pooled_projections, timestep) -> latents` with
timestep = sigma * 1000. Facts used are listed in `shared/design/SD3_REFERENCE.md`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax import parallel
from layerjax.models.common import (Buffer, KeyRngs, RMSNorm, attention, conv, layer_norm,
                                     linear, store_grad_on_cpu)

# Per-block rematerialisation (`MMDiTConfig.remat`): what each block's backward pass keeps
# from its forward pass. 'offload' keeps the matmul outputs in pinned host memory.
REMAT_POLICIES = ('none', 'full', 'dots_with_no_batch_dims_saveable', 'offload')


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture (diffusers' config names) plus how to compute."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 24
  attention_head_dim: int = 64
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1536
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 192
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  # Not part of the checkpoint: compute dtype, parameter dtype, per-block rematerialisation
  # (one of `REMAT_POLICIES`; older configs' True / False read as 'full' / 'none').
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'
  # The blocks' loop: None unrolls it on the CPU backend and scans elsewhere. XLA:CPU runs
  # the unrolled step faster (678 against 785 ms at 8 blocks, width 384, batch 4, 2-core
  # EPYC); elsewhere the scan compiles faster (SD3-medium's step: 3.7 s against 21.5 s on
  # that CPU) and holds one block's code.
  unroll: bool | None = None
  # The attention kernel on accelerators (`common.attention`): 'xla' or 'cudnn'.
  attention: str = 'xla'

  ARCH_FIELDS = ('sample_size', 'patch_size', 'in_channels', 'num_layers', 'attention_head_dim',
                 'num_attention_heads', 'joint_attention_dim', 'caption_projection_dim',
                 'pooled_projection_dim', 'out_channels', 'pos_embed_max_size',
                 'dual_attention_layers', 'qk_norm')

  def __post_init__(self):
    width = self.num_attention_heads * self.attention_head_dim
    if self.caption_projection_dim != width:
      raise ValueError(f'caption_projection_dim ({self.caption_projection_dim}) must equal '
                       f'num_attention_heads * attention_head_dim ({width})')
    if self.qk_norm not in (None, 'rms_norm'):
      raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
    object.__setattr__(self, 'dual_attention_layers', tuple(self.dual_attention_layers))
    if isinstance(self.remat, bool):
      object.__setattr__(self, 'remat', 'full' if self.remat else 'none')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {REMAT_POLICIES}, got {self.remat!r}')
    if self.attention not in ('xla', 'cudnn'):
      raise ValueError(f"attention must be 'xla' or 'cudnn', got {self.attention!r}")

  @property
  def width(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_diffusers(cls, config: dict, **compute) -> 'MMDiTConfig':
    """From a diffusers `config.json` dict; unknown keys (`_class_name`, ...) are ignored.

    Missing keys take diffusers' class defaults, as `from_pretrained` would.
    """
    arch = {**_DIFFUSERS_DEFAULTS, **{k: config[k] for k in cls.ARCH_FIELDS if k in config}}
    if arch['out_channels'] is None:
      arch['out_channels'] = arch['in_channels']
    return cls(**arch, **compute)

  def to_diffusers(self) -> dict:
    d = {k: getattr(self, k) for k in self.ARCH_FIELDS}
    d['dual_attention_layers'] = list(self.dual_attention_layers)
    return {'_class_name': 'SD3Transformer2DModel', **d}


# `SD3Transformer2DModel.__init__` defaults, which differ from every released model.
_DIFFUSERS_DEFAULTS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18,
                           attention_head_dim=64, num_attention_heads=18,
                           joint_attention_dim=4096, caption_projection_dim=1152,
                           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96,
                           dual_attention_layers=(), qk_norm=None)

# The three official configurations (SD3_REFERENCE.md); class defaults are never relied on.
SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                          qk_norm='rms_norm')
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         qk_norm='rms_norm')


def sincos_pos_embed(dim: int, grid: int, base_size: int, dtype) -> jax.Array:
  """SD3's 2D sin-cos table [grid*grid, dim] in `dtype`: first half encodes the column, second
  the row. Both halves are one 1-D table [grid, dim/2] (float64 sin/cos, rounded once),
  broadcast: SD3.5's 384x384 grid took 12 s with every token's sin/cos computed."""
  pos = np.arange(grid, dtype=np.float64) / (grid / base_size)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  out = np.outer(pos, omega)
  one_d = jnp.asarray(np.concatenate([np.sin(out), np.cos(out)], axis=1), dtype)
  half = (grid, grid, dim // 2)  # token (row r, column c) is r * grid + c
  return jnp.concatenate([jnp.broadcast_to(one_d[None], half),  # one_d[c]
                          jnp.broadcast_to(one_d[:, None], half)],  # one_d[r]
                         axis=-1).reshape(grid * grid, dim)


def timestep_sinusoid(t: jax.Array, dim: int = 256) -> jax.Array:
  """[cos, sin] features of t (flip_sin_to_cos, no frequency shift), in fp32."""
  half = dim // 2
  # diffusers' fp32 exponents, exponentiated once here and correctly rounded: backends' fp32
  # exp differ by an ulp, which t ~ 1000 amplifies.
  exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class PatchEmbed(nnx.Module):
  """Conv patchify plus the centre crop of the stored position-embedding grid."""

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    self.patch_size = cfg.patch_size
    self.max_size = cfg.pos_embed_max_size
    self.proj = conv(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                     padding='VALID', axes=(None, None, None, 'embed'), dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, rngs=rngs)
    table = sincos_pos_embed(cfg.width, self.max_size, cfg.sample_size // cfg.patch_size,
                             cfg.param_dtype)
    self.pos_embed = Buffer(table[None], out_sharding=(None, None, 'embed'), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    h, w = h // self.patch_size, w // self.patch_size
    if h > self.max_size or w > self.max_size:
      raise ValueError(f'latent grid {h}x{w} (after patching) exceeds pos_embed_max_size '
                       f'{self.max_size}')
    tokens = self.proj(x).reshape(b, h * w, -1)
    top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
    grid = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)
    pos = grid[top:top + h, left:left + w].reshape(1, h * w, -1)
    return (tokens + pos).astype(tokens.dtype)


class MLPEmbedder(nnx.Module):
  """Linear-SiLU-Linear (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

  def __init__(self, in_dim: int, dim: int, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.linear_1 = linear(in_dim, dim, (None, 'embed'), **kw)
    self.linear_2 = linear(dim, dim, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    self.timestep_embedder = MLPEmbedder(256, cfg.width, cfg, rngs=rngs)
    self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, cfg.width, cfg, rngs=rngs)

  def __call__(self, timestep, pooled):
    t = timestep_sinusoid(timestep).astype(pooled.dtype)
    return self.timestep_embedder(t) + self.text_embedder(pooled)


class AdaNorm(nnx.Module):
  """`Linear(SiLU(temb))` split into `chunks` modulation vectors.

  Serves AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX (9) and AdaLayerNormContinuous
  (2, ordered scale, shift); the caller applies them to `layer_norm(x)`.
  """

  def __init__(self, dim: int, chunks: int, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    self.chunks = chunks
    self.linear = linear(dim, chunks * dim, ('embed', 'modulation'), dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    # Gathered before the split: the chunks are small, and XLA's CPU partitioner miscomputed
    # products of chunks taken from a tensor-sharded axis.
    mods = parallel.constrain(self.linear(jax.nn.silu(temb)), ('batch', None))
    return [m[:, None, :] for m in jnp.split(mods, self.chunks, -1)]


def modulate(x, shift, scale):
  return layer_norm(x) * (1 + scale) + shift


class GELUProj(nnx.Module):

  def __init__(self, dim: int, hidden: int, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    self.proj = linear(dim, hidden, ('embed', 'mlp'), dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    dim = cfg.width
    # Keys "0" and "2" mirror diffusers' nn.Sequential, whose entry 1 is a parameterless dropout.
    self.net = nnx.Dict({
        '0': GELUProj(dim, 4 * dim, cfg, rngs=rngs),
        '2': linear(4 * dim, dim, ('mlp', 'embed'), dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, rngs=rngs),
    })

  def __call__(self, x):
    return self.net['2'](self.net['0'](x))


class Attention(nnx.Module):
  """Self-attention over the image stream, optionally joint with the text stream.

  `joint=True` adds the text projections (`add_*_proj`), concatenates [image, text] along the
  sequence and, unless `context_pre_only`, projects the text output with `to_add_out`.
  """

  def __init__(self, cfg: MMDiTConfig, *, joint: bool, context_pre_only: bool = False,
               rngs: nnx.Rngs):
    dim, self.heads = cfg.width, cfg.num_attention_heads
    self.implementation = cfg.attention
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    qkv = lambda: linear(dim, dim, ('embed', 'heads'), **kw)
    out = lambda: linear(dim, dim, ('heads', 'embed'), **kw)
    norm = lambda: RMSNorm(cfg.attention_head_dim, param_dtype=cfg.param_dtype)
    self.qk_norm = cfg.qk_norm is not None
    self.to_q, self.to_k, self.to_v = qkv(), qkv(), qkv()
    self.to_out = nnx.List([out()])
    if self.qk_norm:
      self.norm_q, self.norm_k = norm(), norm()
    self.joint = joint
    self.context_pre_only = context_pre_only
    if joint:
      self.add_q_proj, self.add_k_proj, self.add_v_proj = qkv(), qkv(), qkv()
      if self.qk_norm:
        self.norm_added_q, self.norm_added_k = norm(), norm()
      if not context_pre_only:
        self.to_add_out = out()

  def _heads(self, x, proj, norm=None):
    y = proj(x).reshape(*x.shape[:2], self.heads, -1)
    return norm(y) if norm is not None else y

  def _qkv(self, x, q, k, v, nq, nk):
    return (self._heads(x, q, nq if self.qk_norm else None),
            self._heads(x, k, nk if self.qk_norm else None), self._heads(x, v))

  def __call__(self, x: jax.Array, context: jax.Array | None = None):
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v,
                        getattr(self, 'norm_q', None), getattr(self, 'norm_k', None))
    n = x.shape[1]
    if self.joint:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                             getattr(self, 'norm_added_q', None),
                             getattr(self, 'norm_added_k', None))
      q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
    o = attention(q, k, v, implementation=self.implementation)
    o = o.reshape(*o.shape[:2], -1)
    img = self.to_out[0](o[:, :n])
    if not self.joint:
      return img
    txt = None if self.context_pre_only else self.to_add_out(o[:, n:])
    return img, txt


class JointTransformerBlock(nnx.Module):

  def __init__(self, cfg: MMDiTConfig, *, context_pre_only: bool, dual: bool,
               rngs: nnx.Rngs):
    dim = cfg.width
    self.dual, self.context_pre_only = dual, context_pre_only
    self.norm1 = AdaNorm(dim, 9 if dual else 6, cfg, rngs=rngs)
    self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6, cfg, rngs=rngs)
    self.attn = Attention(cfg, joint=True, context_pre_only=context_pre_only, rngs=rngs)
    if dual:
      self.attn2 = Attention(cfg, joint=False, rngs=rngs)
    self.ff = FeedForward(cfg, rngs=rngs)
    if not context_pre_only:
      self.ff_context = FeedForward(cfg, rngs=rngs)

  def __call__(self, x, context, temb):
    mods = self.norm1(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    if self.context_pre_only:
      c_scale, c_shift = self.norm1_context(temb)
      c_in = modulate(context, c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
          self.norm1_context(temb))
      c_in = modulate(context, c_shift_msa, c_scale_msa)

    attn, c_attn = self.attn(modulate(x, shift_msa, scale_msa), c_in)
    y = x + gate_msa * attn
    if self.dual:
      shift_msa2, scale_msa2, gate_msa2 = mods[6:]
      y = y + gate_msa2 * self.attn2(modulate(x, shift_msa2, scale_msa2))
    y = y + gate_mlp * self.ff(modulate(y, shift_mlp, scale_mlp))

    if self.context_pre_only:
      return y, None
    context = context + c_gate_msa * c_attn
    context = context + c_gate_mlp * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
    return y, context


def block_groups(cfg: MMDiTConfig) -> list[tuple[int, int]]:
  """[start, stop) of each run of identical consecutive blocks (same dual attention, same
  `context_pre_only`): SD3-medium's [(0, 23), (23, 24)], SD3.5-medium's
  [(0, 13), (13, 23), (23, 24)]."""
  kind = lambda i: (i in cfg.dual_attention_layers, i == cfg.num_layers - 1)
  starts = [i for i in range(cfg.num_layers) if i == 0 or kind(i) != kind(i - 1)]
  return list(zip(starts, starts[1:] + [cfg.num_layers]))


def stacked_blocks(cfg: MMDiTConfig, start: int, stop: int,
                   rngs: nnx.Rngs) -> JointTransformerBlock:
  """Blocks start..stop-1 as one module whose variables gain a leading block axis (logical
  name 'layers'), each block initialised from its own key."""
  make = lambda key: JointTransformerBlock(cfg, context_pre_only=stop == cfg.num_layers,
                                           dual=start in cfg.dual_attention_layers,
                                           rngs=KeyRngs(key))
  keys = jax.random.split(rngs.params(), stop - start)
  return nnx.vmap(make, transform_metadata={nnx.PARTITION_NAME: 'layers'})(keys)


def _checkpoint_policy(name: str):
  policies = jax.checkpoint_policies
  if name == 'offload':
    device = jax.devices()[0]
    if 'pinned_host' not in {m.kind for m in device.addressable_memories()}:
      raise ValueError(f"remat 'offload' (model.remat): {device.platform} devices have no "
                       "pinned_host memory to offload to; use 'full' or "
                       "'dots_with_no_batch_dims_saveable'")
    return policies.offload_dot_with_no_batch_dims('device', 'pinned_host')
  return {'full': policies.nothing_saveable,
          'dots_with_no_batch_dims_saveable': policies.dots_with_no_batch_dims_saveable}[name]


def _scan_blocks(blocks: JointTransformerBlock, x, context, temb, remat: str, unroll: bool):
  """Runs a group's stacked blocks in order: `lax.scan` over their state, each block
  rematerialised as `remat` says. A pure function of the state rather than `nnx.scan` /
  `nnx.remat`, which write the variables back after the call and so fail inside a `lax` loop
  the model was not made in (the sampler's `fori_loop`)."""
  graphdef, state = nnx.split(blocks)

  def body(carry, block_state):
    x, context = (parallel.constrain(a, ('batch', 'length', 'embed')) for a in carry)
    x, new_context = nnx.merge(graphdef, block_state)(x, context, temb)
    # A `context_pre_only` block returns no context; the carry keeps its structure.
    context = context if new_context is None else new_context
    if unroll:  # unrolled, XLA:CPU would recompute the stream's gradient in every consumer
      x, context = store_grad_on_cpu(x), store_grad_on_cpu(context)
    return (x, context), None

  if remat != 'none':
    body = jax.checkpoint(body, policy=_checkpoint_policy(remat))
  (x, context), _ = jax.lax.scan(body, (x, context), state, unroll=unroll)
  return x, context


def _group_key_at(path: tuple) -> int | None:
  """Where in a variable's path the key of its stacked block group is, if it has one."""
  names = [str(p) for p in path[:-2]]
  return names.index('transformer_blocks') + 1 if 'transformer_blocks' in names else None


def unstack(path: tuple, x) -> list[tuple[tuple, Any]]:
  """A variable's path and value (anything indexed along its first axis) as the per-block
  layout holds them (diffusers' names, packed model files): itself outside the blocks, else
  one entry per block of its group, whose key is the index of the group's first block."""
  k = _group_key_at(path)
  if k is None:
    return [(path, x)]
  start = int(path[k])
  return [(path[:k] + (start + j,) + path[k + 1:], x[j]) for j in range(x.shape[0])]


def shape_only(shape) -> np.ndarray:
  """A stand-in array of `shape` holding no memory, for `unstack` and layout changes."""
  return np.broadcast_to(np.bool_(False), tuple(shape))


def stack(path: tuple, shape, get: Callable[[tuple, tuple], Any]) -> Any:
  """The inverse of `unstack`: the value of the variable at `path` of `shape` from the
  per-block layout's `get(path, shape)`, stacked along a new first axis for a group's."""
  parts = [get(p, s.shape) for p, s in unstack(path, shape_only(shape))]
  return parts[0] if _group_key_at(path) is None else np.stack(parts)


class SD3Transformer2DModel(nnx.Module):
  """SD3/SD3.5 MMDiT: `(latents NHWC, text [B,T,4096], pooled [B,2048], sigma*1000) -> NHWC`."""

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    if cfg.remat != 'none':
      _checkpoint_policy(cfg.remat)  # a policy the devices lack is refused before any work
    self.config = cfg
    self.pos_embed = PatchEmbed(cfg, rngs=rngs)
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(cfg, rngs=rngs)
    self.context_embedder = linear(cfg.joint_attention_dim, cfg.width, ('joint', 'embed'),
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    # Each group of identical blocks stacked, keyed by its first block's index.
    self.transformer_blocks = nnx.Dict({
        str(start): stacked_blocks(cfg, start, stop, rngs)
        for start, stop in block_groups(cfg)})
    self.norm_out = AdaNorm(cfg.width, 2, cfg, rngs=rngs)
    self.proj_out = linear(cfg.width, cfg.patch_size ** 2 * cfg.out_channels, ('embed', None),
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, latents: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, timestep: jax.Array) -> jax.Array:
    _, height, width, _ = latents.shape
    x = self.pos_embed(latents.astype(self.config.dtype))
    x = self.forward_tokens(x, encoder_hidden_states, pooled_projections, timestep)
    return self.unpatchify(x, height, width)

  def forward_tokens(self, x: jax.Array, encoder_hidden_states: jax.Array,
                     pooled_projections: jax.Array, timestep: jax.Array) -> jax.Array:
    """Patch tokens [B, N, width] (from `pos_embed`) -> output patches [B, N, p*p*out]."""
    cfg = self.config
    dtype = cfg.dtype
    temb = self.time_text_embed(jnp.broadcast_to(timestep, (x.shape[0],)),
                                pooled_projections.astype(dtype))
    context = self.context_embedder(encoder_hidden_states.astype(dtype))
    unroll = jax.default_backend() == 'cpu' if cfg.unroll is None else cfg.unroll
    for start, _ in block_groups(cfg):
      x, context = _scan_blocks(self.transformer_blocks[str(start)], x, context, temb,
                                cfg.remat, unroll)
    scale, shift = self.norm_out(temb)
    return self.proj_out(modulate(x, shift, scale))

  def unpatchify(self, x: jax.Array, height: int, width: int) -> jax.Array:
    """Output patches [B, N, p*p*out] -> latents [B, height, width, out]."""
    p, c = self.config.patch_size, self.config.out_channels
    b, h, w = x.shape[0], height // p, width // p
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def adaln_zero_(model: SD3Transformer2DModel) -> SD3Transformer2DModel:
  """DiT's adaLN-Zero initialisation for training from scratch (in place): every modulation
  and the output projection start at zero, so each block starts as the identity and the
  network's output at zero; random modulations make a small model learn far slower."""
  zero = [m.linear for _, m in nnx.iter_graph(model) if isinstance(m, AdaNorm)]
  for layer in zero + [model.proj_out]:
    for p in (layer.kernel, layer.bias):
      p.set_value(jnp.zeros_like(p[...]))
  return model
