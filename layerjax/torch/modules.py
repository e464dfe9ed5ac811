"""The trained `LayerDecomposer` in PyTorch, on diffusers' own modules where they exist.

diffusers gives the MMDiT (`SD3Transformer2DModel`, its patch embedding widened to the
conditions), SD3's VAE (`AutoencoderKL`) and the VAE-decoder-shaped heads (its `Decoder`);
the rest is ours, as small `ModelMixin` + `ConfigMixin` classes a diffusers pipeline folder
holds: the byte-level text encoder, the conv heads, the layer embedding with the long skip.
`Decomposer` joins them and computes `layerjax.models.decomposer.LayerDecomposer.__call__`
exactly, in NCHW: latents [B, K, C, h, w], images [B, 3, H, W] in [0, 1].

Nothing here imports JAX or Flax: a PyTorch user runs an exported decomposer without them.
The state-dict names are the Flax ones joined with '.' (`kernel` / `scale` -> `weight`),
so `layerjax.convert.pytorch` maps tensors one to one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from layerjax.models.shared import PAD, SAMPLE_SIGMA_MIN, latent_geometry, tokenize

def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
  """[B, C, H, W] -> [B, f*f*C, H/f, W/f], channels in JAX's (fy, fx, c) order, so the
  converted patch-embedding kernel reads the same values."""
  b, c, h, w = x.shape
  if h % f or w % f:
    raise ValueError(f'image {h}x{w} is not divisible by the latent factor {f}')
  x = x.reshape(b, c, h // f, f, w // f, f).permute(0, 3, 5, 1, 2, 4)
  return x.reshape(b, f * f * c, h // f, w // f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
  b, c, h, w = x.shape
  x = x.reshape(b, f, f, c // (f * f), h, w).permute(0, 3, 4, 1, 5, 2)
  return x.reshape(b, c // (f * f), h * f, w * f)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=eps)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
  return x.to(torch.promote_types(x.dtype, torch.float32))


def to_unit(x: torch.Tensor) -> torch.Tensor:
  """Raw head output in the VAE image range [-1, 1] -> [0, 1] (`heads.to_unit`), in fp32
  (float64 stays)."""
  return (at_least_fp32(x) / 2 + 0.5).clamp(0, 1)


# --- text ---------------------------------------------------------------------------------

class _TextBlock(nn.Module):

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(width, 3 * width)
    self.out = nn.Linear(width, width)
    self.fc1 = nn.Linear(width, 4 * width)
    self.fc2 = nn.Linear(4 * width, width)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = self.qkv(layer_norm(x)).reshape(b, n, 3 * self.heads, -1).transpose(1, 2).chunk(
        3, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    x = x + self.out(o.transpose(1, 2).reshape(b, n, d))
    # jax.nn.gelu is the tanh approximation.
    return x + self.fc2(F.gelu(self.fc1(layer_norm(x)), approximate='tanh'))


class ByteTextEncoder(ModelMixin, ConfigMixin):
  """Byte tokens [B, L] -> (states [B, L, out_dim], pooled [B, pooled_dim] from BOS)."""

  @register_to_config
  def __init__(self, max_len: int = 32, width: int = 128, depth: int = 2, heads: int = 4,
               out_dim: int = 4096, pooled_dim: int = 2048):
    super().__init__()
    self.token_embed = nn.Parameter(torch.zeros(258, width))
    self.pos_embed = nn.Parameter(torch.zeros(max_len, width))
    self.blocks = nn.ModuleList([_TextBlock(width, heads) for _ in range(depth)])
    self.norm = nn.RMSNorm(width, eps=1e-6)
    self.proj = nn.Linear(width, out_dim)
    self.pooled_proj = nn.Linear(width, pooled_dim)

  def tokenize(self, texts) -> np.ndarray:
    return tokenize(texts, self.config.max_len)

  def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.token_embed[tokens] + self.pos_embed[None, :tokens.shape[1]]
    mask = tokens != PAD
    for block in self.blocks:
      x = block(x, mask)
    x = self.norm(x)
    return self.proj(x), self.pooled_proj(x[:, 0])


# --- heads ----------------------------------------------------------------------------------

class ConvHead(ModelMixin, ConfigMixin):
  """Pixel latents -> `out_channels` maps at full resolution (`decomposer.ConvHead`)."""

  @register_to_config
  def __init__(self, out_channels: int, factor: int, width: int, extra_channels: int = 0,
               board_at: int | None = None):
    super().__init__()
    self.conv_in = nn.Conv2d(3 + extra_channels + (board_at is not None), width, 3, padding=1)
    self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
    self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

  def forward(self, z: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
    x = depth_to_space(z, self.config.factor)
    if pixels is not None:
      pixels = pixels.to(x.dtype)
      maps = [x, pixels]
      at = self.config.board_at
      if at is not None:
        maps.append((x - pixels[:, at:at + 3]).abs().sum(1, keepdim=True))
      x = torch.cat(maps, 1)
    x = F.silu(self.conv_in(x))
    x = F.silu(self.conv_mid(x))
    return self.conv_out(x)


class DecoderHead(Decoder, ModelMixin, ConfigMixin):
  """diffusers' VAE `Decoder` with its own output channels (`heads.decoder_head`), as a
  model a pipeline folder holds; its state dict is the decoder's."""

  @register_to_config
  def __init__(self, latent_channels: int, out_channels: int,
               block_out_channels: tuple[int, ...], layers_per_block: int,
               norm_num_groups: int, mid_block_add_attention: bool = True):
    n = len(block_out_channels)
    Decoder.__init__(self, in_channels=latent_channels, out_channels=out_channels,
                     up_block_types=('UpDecoderBlock2D',) * n,
                     block_out_channels=tuple(block_out_channels),
                     layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                     act_fn='silu', mid_block_add_attention=mid_block_add_attention)

  def forward(self, z: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
    if pixels is not None:
      raise ValueError('a VAE-decoder head reads latents only')
    return Decoder.forward(self, z)


# --- layer embedding and long skip ------------------------------------------------------------

class _LongSkip(nn.Module):

  def __init__(self, layers: int, in_channels: int, out_channels: int, width: int):
    super().__init__()
    self.kernel = nn.Parameter(torch.zeros(layers, in_channels, out_channels))
    self.gate = nn.Linear(width, layers * out_channels)

  def forward(self, conditions: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """[B, C_cond, h, w], [B, width] -> [B, K, C_out, h, w]."""
    k, _, c = self.kernel.shape
    gate = 1 + self.gate(F.silu(temb)).reshape(temb.shape[0], k, c, 1, 1)
    return torch.einsum('bchw,kco->bkohw', conditions, self.kernel.to(conditions.dtype)) * gate


class LayerEmbedding(ModelMixin, ConfigMixin):
  """The learned per-layer token offset and, for `long_skip` models, `LongSkip`'s map of the
  condition latents (kernel [K, C_cond, C] in the Flax layout) and its timestep gate."""

  @register_to_config
  def __init__(self, layers: tuple[str, ...], width: int, has_long_skip: bool = False,
               condition_channels: int = 0, latent_channels: int = 0):
    # `has_long_skip`: a config entry named `long_skip` would shadow the module's attribute.
    super().__init__()
    self.layer_embed = nn.Parameter(torch.zeros(len(layers), width))
    if has_long_skip:
      self.long_skip = _LongSkip(len(layers), condition_channels, latent_channels, width)


# --- the decomposer -------------------------------------------------------------------------

class Decomposer(nn.Module):
  """The components joined: `(noisy [B, K, C, h, w], conditions [B, C * n, h, w], context,
  pooled, sigma [B]) -> velocity [B, K, C, h, w]`. `model`: the `DecomposerConfig` as JSON
  (`infer.model.config_json`)."""

  def __init__(self, model: dict, transformer: SD3Transformer2DModel, layers: LayerEmbedding,
               vae: AutoencoderKL | None = None, text_encoder: ByteTextEncoder | None = None,
               alpha_head: nn.Module | None = None, shadow_head: nn.Module | None = None):
    super().__init__()
    self.model = model
    self.transformer, self.layers, self.vae = transformer, layers, vae
    self.text_encoder, self.alpha_head, self.shadow_head = text_encoder, alpha_head, shadow_head

  @property
  def latent_factor(self) -> int:
    return latent_geometry(self.model)[0]

  @property
  def latent_channels(self) -> int:
    return latent_geometry(self.model)[1]

  @property
  def dtype(self) -> torch.dtype:
    return self.layers.layer_embed.dtype

  def encode(self, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> diffusion latents [B, C, h, w]."""
    x = 2 * images.to(self.dtype) - 1
    if self.vae is None:
      return space_to_depth(x, self.model['factor'])
    c = self.vae.config
    return (self.vae.encode(x).latent_dist.mean - (c.shift_factor or 0.0)) * c.scaling_factor

  def decode(self, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images in [0, 1] up to the model's error (not clipped)."""
    if self.vae is None:
      return depth_to_space(latents, self.model['factor']) / 2 + 0.5
    c = self.vae.config
    return self.vae.decode(latents / c.scaling_factor + (c.shift_factor or 0.0)).sample / 2 + 0.5

  def conditions(self, batch: dict) -> torch.Tensor | None:
    names = self.model['conditions']
    return torch.cat([self.encode(batch[n]) for n in names], 1) if names else None

  def encode_text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if self.text_encoder is not None:
      return self.text_encoder(batch['text_tokens'])
    return batch['text_embeds'].to(self.dtype), batch['pooled_text_embeds'].to(self.dtype)

  def head_pixels(self, batch: dict) -> torch.Tensor | None:
    names = self.model['head_conditions']
    return torch.cat([2 * batch[n].to(self.dtype) - 1 for n in names], 1) if names else None

  def forward(self, noisy: torch.Tensor, conditions: torch.Tensor | None,
              context: torch.Tensor, pooled: torch.Tensor, sigma: torch.Tensor
              ) -> torch.Tensor:
    t = self.transformer
    b, k, c, h, w = noisy.shape
    x = noisy.to(self.dtype)
    if conditions is not None:
      x = torch.cat([x, conditions[:, None].expand(b, k, *conditions.shape[1:])], 2)
    tokens = t.pos_embed(x.reshape(b * k, -1, h, w))
    n = tokens.shape[1]
    tokens = (tokens.reshape(b, k, n, -1) + self.layers.layer_embed[None, :, None]).reshape(
        b, k * n, -1)
    # fp32 at least, as JAX's: in bfloat16, 1000 sigma would be off by whole steps.
    timestep = sigma.to(torch.promote_types(sigma.dtype, torch.float32)) * 1000
    temb = t.time_text_embed(timestep, pooled.to(self.dtype))
    context = t.context_embedder(context.to(self.dtype))
    for block in t.transformer_blocks:
      context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    out = t.proj_out(t.norm_out(tokens, temb))
    p = t.config.patch_size
    out = out.reshape(b * k, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    out = out.reshape(b, k, c, h, w)
    if self.model['long_skip']:
      out = out + self.layers.long_skip(conditions.to(out.dtype), temb)
    if self.model['prediction'] == 'sample':  # x_t = (1 - s) x_0 + s eps: v = (x_t - x_0) / s
      s = sigma.clamp(min=SAMPLE_SIGMA_MIN).to(out.dtype).reshape(b, 1, 1, 1, 1)
      out = (noisy.to(out.dtype) - out) / s
    return out

