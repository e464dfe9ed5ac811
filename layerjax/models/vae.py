"""SD3's VAE (diffusers' `AutoencoderKL`) in Flax NNX, weight-exact, NHWC.

Attribute names follow diffusers' state-dict names (see `layerjax.convert.diffusers`), so
`encoder.down_blocks.0.resnets.1.conv1.kernel` holds `...conv1.weight`; the 244 tensors of
SD3's VAE map one to one.
`encode(images in [-1, 1]) -> (mean, logvar)`, `decode(latents) -> images`; the latent
normalisation used by the diffusion model (`to_latent` / `from_latent`) is kept outside the
network. `Decoder` is also the body of the alpha and shadow heads (`layerjax.models.heads`).
Facts used are listed in `shared/design/SD3_REFERENCE.md`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.models.common import attention, conv, group_norm, linear

_DOWN_BLOCK = 'DownEncoderBlock2D'
_UP_BLOCK = 'UpDecoderBlock2D'
_ACTIVATIONS = ('silu', 'swish')  # diffusers maps both names to nn.SiLU
# diffusers' AutoencoderKL defaults where they differ from SD3's: a config.json without
# these keys means these values to diffusers (older SD1-style folders rely on it).
_DIFFUSERS_DEFAULTS = dict(block_out_channels=(64,), down_block_types=(_DOWN_BLOCK,),
                           up_block_types=(_UP_BLOCK,), layers_per_block=1, latent_channels=4,
                           sample_size=32, scaling_factor=0.18215, shift_factor=None,
                           use_quant_conv=True, use_post_quant_conv=True)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and latent normalisation (diffusers' config names) plus how to compute."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  sample_size: int = 1024
  scaling_factor: float = 1.5305
  shift_factor: float | None = 0.0609
  force_upcast: bool = True
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  # Not part of the checkpoint: compute dtype and parameter dtype.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  ARCH_FIELDS = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block',
                 'latent_channels', 'norm_num_groups', 'sample_size', 'scaling_factor',
                 'shift_factor', 'force_upcast', 'use_quant_conv', 'use_post_quant_conv',
                 'mid_block_add_attention')

  def __post_init__(self):
    object.__setattr__(self, 'block_out_channels', tuple(self.block_out_channels))
    # SD3 has neither; supporting them would add parameters outside the 244-tensor layout.
    if self.use_quant_conv or self.use_post_quant_conv:
      raise ValueError('use_quant_conv / use_post_quant_conv are not supported (SD3 has neither)')
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f'norm_num_groups ({self.norm_num_groups}) must divide every entry of '
                         f'block_out_channels {self.block_out_channels}')

  @classmethod
  def from_diffusers(cls, config: dict, **compute) -> 'VAEConfig':
    """From a diffusers `config.json` dict; unknown keys (`_class_name`, ...) are ignored.

    Missing keys take diffusers' defaults, as `from_pretrained` would. Raises ValueError for
    options this port does not implement rather than building a different network.
    """
    config = {**_DIFFUSERS_DEFAULTS, **config}
    n = len(config['block_out_channels'])
    for key, expected in (('down_block_types', _DOWN_BLOCK), ('up_block_types', _UP_BLOCK)):
      types = list(config[key])
      if types != [expected] * n:
        raise ValueError(f'{key} must be {n} x {expected!r}, got {types}')
    act = config.get('act_fn', 'silu')
    if act not in _ACTIVATIONS:
      raise ValueError(f"act_fn must be 'silu', got {act!r}")
    for key in ('latents_mean', 'latents_std'):
      if config.get(key) is not None:
        raise ValueError(f'{key} is not supported; only scaling_factor / shift_factor are')
    arch = {k: config[k] for k in cls.ARCH_FIELDS if k in config}
    if isinstance(arch.get('sample_size'), (list, tuple)):
      raise ValueError(f"sample_size must be an int, got {arch['sample_size']}")
    return cls(**arch, **compute)

  def to_diffusers(self) -> dict:
    d = {k: getattr(self, k) for k in self.ARCH_FIELDS}
    n = len(self.block_out_channels)
    d.update(block_out_channels=list(self.block_out_channels), down_block_types=[_DOWN_BLOCK] * n,
             up_block_types=[_UP_BLOCK] * n, act_fn='silu', latents_mean=None, latents_std=None)
    return {'_class_name': 'AutoencoderKL', **d}



def to_latent(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """VAE latent -> diffusion-model latent: `(z - shift) * scale`."""
  return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def from_latent(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """Diffusion-model latent -> VAE latent: `z / scale + shift`."""
  return z / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def _conv(cfg: VAEConfig, cin: int, cout: int, kernel_size: int = 3, **kw) -> nnx.Conv:
  return conv(cin, cout, kernel_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **kw)


def _norm(cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return group_norm(channels, num_groups=cfg.norm_num_groups, eps=1e-6,
                    param_dtype=cfg.param_dtype, rngs=rngs)


def _norm_act(norm: nnx.GroupNorm, x: jax.Array) -> jax.Array:
  # GroupNorm runs in fp32 (common.group_norm); SiLU and the next conv run in x's dtype.
  return jax.nn.silu(norm(x).astype(x.dtype))


class ResnetBlock2D(nnx.Module):
  """`x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`, 1x1 `conv_shortcut` when channels change."""

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, cin, rngs=rngs)
    self.conv1 = _conv(cfg, cin, cout, rngs=rngs)
    self.norm2 = _norm(cfg, cout, rngs=rngs)
    self.conv2 = _conv(cfg, cout, cout, rngs=rngs)
    if cin != cout:
      self.conv_shortcut = _conv(cfg, cin, cout, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(_norm_act(self.norm1, x))
    h = self.conv2(_norm_act(self.norm2, h))
    if hasattr(self, 'conv_shortcut'):
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """Pad right and bottom by one, then a 3x3 stride-2 conv without padding (diffusers' VAE)."""

  def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cfg, channels, channels, stride=2, padding='VALID', rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cfg, channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions, GroupNorm in front, residual around."""

  def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.group_norm = _norm(cfg, channels, rngs=rngs)
    self.to_q = linear(channels, channels, (None, 'channels'), **kw)
    self.to_k = linear(channels, channels, (None, 'channels'), **kw)
    self.to_v = linear(channels, channels, (None, 'channels'), **kw)
    self.to_out = nnx.List([linear(channels, channels, (None, 'channels'), **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).astype(x.dtype).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    o = attention(q, k, v)
    return x + self.to_out[0](o).reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
  """resnet -> attention (optional) -> resnet at the lowest resolution."""

  def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cfg, channels, channels, rngs=rngs) for _ in range(2)])
    if cfg.mid_block_add_attention:
      self.attentions = nnx.List([Attention(cfg, channels, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if hasattr(self, 'attentions'):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, downsample: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cfg, cin if i == 0 else cout, cout, rngs=rngs)
                             for i in range(cfg.layers_per_block)])
    if downsample:
      self.downsamplers = nnx.List([Downsample2D(cfg, cout, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if hasattr(self, 'downsamplers'):
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, upsample: bool, *, rngs: nnx.Rngs):
    # One resnet more than the encoder's blocks, as in diffusers' Decoder.
    self.resnets = nnx.List([ResnetBlock2D(cfg, cin if i == 0 else cout, cout, rngs=rngs)
                             for i in range(cfg.layers_per_block + 1)])
    if upsample:
      self.upsamplers = nnx.List([Upsample2D(cfg, cout, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if hasattr(self, 'upsamplers'):
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  """Images NHWC -> `2 * latent_channels` moments at 1 / 2**(len(blocks) - 1) resolution."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    chans = cfg.block_out_channels
    self.conv_in = _conv(cfg, cfg.in_channels, chans[0], rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(cfg, chans[max(i - 1, 0)], chans[i], i < len(chans) - 1, rngs=rngs)
        for i in range(len(chans))
    ])
    self.mid_block = UNetMidBlock2D(cfg, chans[-1], rngs=rngs)
    self.conv_norm_out = _norm(cfg, chans[-1], rngs=rngs)
    self.conv_out = _conv(cfg, chans[-1], 2 * cfg.latent_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x.astype(self.dtype))
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(_norm_act(self.conv_norm_out, x))


class Decoder(nnx.Module):
  """Latents NHWC -> `out_channels` maps at 2**(len(blocks) - 1) times the resolution."""

  def __init__(self, cfg: VAEConfig, out_channels: int, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    chans = cfg.block_out_channels[::-1]
    self.conv_in = _conv(cfg, cfg.latent_channels, chans[0], rngs=rngs)
    self.mid_block = UNetMidBlock2D(cfg, chans[0], rngs=rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(cfg, chans[max(i - 1, 0)], chans[i], i < len(chans) - 1, rngs=rngs)
        for i in range(len(chans))
    ])
    self.conv_norm_out = _norm(cfg, chans[-1], rngs=rngs)
    self.conv_out = _conv(cfg, chans[-1], out_channels, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z.astype(self.dtype))
    x = self.mid_block(x)
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(_norm_act(self.conv_norm_out, x))


class AutoencoderKL(nnx.Module):
  """SD3's VAE: `encode(images NHWC in [-1, 1]) -> (mean, logvar)`, `decode(z) -> images`."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, cfg.out_channels, rngs=rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean, logvar = jnp.split(self.encoder(images), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.decoder(latents)
