"""`LayerDecomposer`: an SD3 / SD3.5 MMDiT that denoises K layer latents jointly (ARCHITECTURE §4).

Per layer k the noisy latent is concatenated on channels with the condition latents (the
input image's, the prompt map's, optionally the checkerboard's the foreground and shadow
targets are blended over), patch-embedded by the MMDiT's own `pos_embed` (its input
channels widened; the extra ones start at zero, so a pretrained SD3 starts unchanged), a
learned layer embedding (zero-initialised) is added, and the K token sets are concatenated
along the sequence, so one attention sees every layer and the layers stay consistent.
With K = 1 and no conditions the network is exactly SD3.

Text: a small byte-level encoder trained from scratch (`TextEncoder`) or precomputed SD3
embeddings (CLIP-L/G + T5 states and pooled outputs) carried in the batch.
Decoders: RGB through `latents.decode`; alpha and shadow heads, either VAE-decoder-shaped
(initialised from SD3's decoder, `layerjax.models.heads`) or a small conv net for lossless
pixel latents. Heads output the VAE's image range [-1, 1] (`heads.to_unit` reads them).
Conv heads may also read condition maps at pixel resolution (`head_conditions`), as
LayerDiffuse's transparent decoder reads the image: an opaque pixel of the foreground
layer is the image's colour there, so alpha is read from agreement, not from the latent alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax import parallel
from layerjax.models import heads
from layerjax.models.autoencoder import SpaceToDepth, VAELatents, depth_to_space
from layerjax.models.common import RMSNorm, attention, conv, layer_norm, linear
from layerjax.models.mmdit import MMDiTConfig, SD3Transformer2DModel, adaln_zero_
from layerjax.models.shared import CONDITIONS, LAYERS, PAD, SAMPLE_SIGMA_MIN
from layerjax.models.vae import AutoencoderKL, VAEConfig

# --- text ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  max_len: int = 32
  width: int = 128
  depth: int = 2
  heads: int = 4
  out_dim: int = 4096  # the MMDiT's joint_attention_dim
  pooled_dim: int = 2048  # the MMDiT's pooled_projection_dim


class _TextBlock(nnx.Module):

  def __init__(self, cfg: TextEncoderConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = cfg.heads
    self.qkv = linear(cfg.width, 3 * cfg.width, ('embed', 'heads'), **kw)
    self.out = linear(cfg.width, cfg.width, ('heads', 'embed'), **kw)
    self.fc1 = linear(cfg.width, 4 * cfg.width, ('embed', 'mlp'), **kw)
    self.fc2 = linear(4 * cfg.width, cfg.width, ('mlp', 'embed'), **kw)

  def __call__(self, x, mask):
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(layer_norm(x)).reshape(b, n, 3 * self.heads, -1), 3, axis=2)
    o = attention(q, k, v, mask=mask[:, None, None, :]).reshape(b, n, d)
    x = x + self.out(o)
    return x + self.fc2(jax.nn.gelu(self.fc1(layer_norm(x))))


class TextEncoder(nnx.Module):
  """Byte tokens -> (states [B, L, out_dim], pooled [B, pooled_dim]); pooled from the BOS state."""

  def __init__(self, cfg: TextEncoderConfig, dtype=jnp.float32, param_dtype=jnp.float32, *,
               rngs: nnx.Rngs):
    self.config = cfg
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, 'embed'),
                                 eager_sharding=False)
    self.token_embed = nnx.Param(init(rngs.params(), (258, cfg.width), param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (cfg.max_len, cfg.width), param_dtype))
    self.blocks = nnx.List([_TextBlock(cfg, dtype, param_dtype, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm = RMSNorm(cfg.width, param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = linear(cfg.width, cfg.out_dim, ('embed', None), **kw)
    self.pooled_proj = linear(cfg.width, cfg.pooled_dim, ('embed', None), **kw)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = self.token_embed[...][tokens] + self.pos_embed[...][None, :tokens.shape[1]]
    mask = tokens != PAD
    for block in self.blocks:
      x = block(x, mask)
    x = self.norm(x)
    return self.proj(x), self.pooled_proj(x[:, 0])


# --- heads ----------------------------------------------------------------------------------

class ConvHead(nnx.Module):
  """Pixel latents -> `out_channels` maps: back to pixels (exact for space-to-depth), then a
  small conv net at full resolution, so each pixel's alpha is decided from its own colour
  and its neighbours'. (At latent resolution each cell's features must carry the decisions
  for all its factor x factor pixels, and a small head learns that slowly.)
  `extra_channels`: pixel maps concatenated to the layer's pixels (`head_conditions`).
  `board_at`: where the checkerboard starts among those maps, if the head also reads the
  layer's distance from it (|layer - board| summed over RGB): a layer seen over the board
  is opaque exactly where it differs from it. From the colours alone the demo's head learns
  a colour lookup instead (trained alone on clean layers, seed 1: a white square's alpha
  0.25-0.28, a grey one's 0.03-0.2; with the distance 0.93-0.99 and 0.88-0.93, test Alpha
  IoU 0.91 -> 0.96)."""

  def __init__(self, out_channels: int, factor: int, width: int, extra_channels: int = 0,
               board_at: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32, *,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.factor = factor
    self.board_at = board_at
    self.conv_in = conv(3 + extra_channels + (board_at is not None), width, 3, **kw)
    self.conv_mid = conv(width, width, 3, **kw)
    self.conv_out = conv(width, out_channels, 3, **kw)

  def __call__(self, z: jax.Array, pixels: jax.Array | None = None) -> jax.Array:
    x = depth_to_space(z, self.factor)
    if pixels is not None:
      pixels = pixels.astype(x.dtype)
      maps = [x, pixels]
      if self.board_at is not None:
        board = pixels[..., self.board_at:self.board_at + 3]
        maps.append(jnp.abs(x - board).sum(-1, keepdims=True))
      x = jnp.concatenate(maps, -1)
    x = jax.nn.silu(self.conv_in(x))
    x = jax.nn.silu(self.conv_mid(x))
    return self.conv_out(x)


class LongSkip(nnx.Module):
  """A long skip for small decomposers trained from scratch with sample prediction (U-ViT's
  idea, at the ends): per layer, a linear map of the condition latents added to the
  predicted sample, scaled per channel by a gate from the timestep embedding. It starts as
  the identity on each layer's trivial source (`skip_sources`): the input image for the
  background, the checkerboard (when it is a condition) for layers blended over it, so
  every layer's first prediction is the trivial decomposition and the transformer learns
  what differs from it. A transformer must otherwise learn to carry each input value
  through its LayerNorms, and Adam needs about 1 / lr steps to grow a weight from 0 to 1.
  The noisy latents stay out of it: a time-independent copy of them would leak noise into
  predictions at high noise."""

  def __init__(self, sources: tuple[int, ...], in_channels: int, out_channels: int,
               width: int, dtype=jnp.float32, param_dtype=jnp.float32, *, rngs: nnx.Rngs):
    """`sources[k]`: the channel offset, among the conditions, that layer k starts as."""
    eye = jnp.eye(out_channels, dtype=param_dtype)
    self.kernel = nnx.Param(
        jnp.stack([jnp.zeros((in_channels, out_channels), param_dtype)
                   .at[o:o + out_channels].set(eye) for o in sources]),
        out_sharding=(None, None, None), eager_sharding=False)
    self.gate = linear(width, len(sources) * out_channels, ('embed', None), dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs,
                       kernel_init=nnx.initializers.zeros_init())

  def __call__(self, conditions: jax.Array, temb: jax.Array) -> jax.Array:
    """[B, h, w, C_cond], [B, width] -> [B, K, h, w, C_out]."""
    k = self.kernel.shape[0]
    gate = 1 + self.gate(jax.nn.silu(temb)).reshape(temb.shape[0], k, 1, 1, -1)
    return jnp.einsum('bhwc,kco->bkhwo', conditions,
                      self.kernel[...].astype(conditions.dtype)) * gate


# --- the decomposer -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecomposerConfig:
  mmdit: MMDiTConfig
  layers: tuple[str, ...] = LAYERS
  conditions: tuple[str, ...] = CONDITIONS
  latents: str = 'vae'  # 'vae' or 'space_to_depth'
  vae: VAEConfig | None = None  # for latents='vae'
  factor: int = 8  # for latents='space_to_depth'
  text: TextEncoderConfig | None = None  # None: precomputed SD3 embeddings
  head: str = 'vae_decoder'  # or 'conv'
  head_width: int = 64
  head_conditions: tuple[str, ...] = ()  # condition maps the conv heads also read
  head_board_distance: bool = False  # conv heads also read |layer - board| (`ConvHead`)
  long_skip: bool = False  # `LongSkip`, for small models trained from scratch
  # What the network outputs: 'velocity' (SD3) or 'sample', the clean latent, turned into
  # the velocity (x_t - x_0) / sigma; JiT (Li & He, 2025) shows small models on
  # high-dimensional tokens learn far better predicting the clean sample.
  prediction: str = 'velocity'

  def __post_init__(self):
    object.__setattr__(self, 'layers', tuple(self.layers))
    object.__setattr__(self, 'conditions', tuple(self.conditions))
    object.__setattr__(self, 'head_conditions', tuple(self.head_conditions))
    for name, allowed, got in (('layers', LAYERS, self.layers),
                               ('conditions', CONDITIONS, self.conditions),
                               ('head.conditions', CONDITIONS, self.head_conditions)):
      empty = name == 'layers' and not got  # conditions may be empty (plain SD3)
      if empty or set(got) - set(allowed) or len(set(got)) != len(got):
        raise ValueError(f'model.{name} must be distinct names from {allowed}, got {got}')
    if self.latents not in ('vae', 'space_to_depth'):
      raise ValueError(f"model.latents must be 'vae' or 'space_to_depth', got {self.latents!r}")
    if self.prediction not in ('velocity', 'sample'):
      raise ValueError(f"model.prediction must be 'velocity' or 'sample', got "
                       f'{self.prediction!r}')
    if self.long_skip and (self.prediction != 'sample' or 'image' not in self.conditions):
      raise ValueError("model.long_skip needs model.prediction='sample' and the 'image' "
                       'condition (it starts layers as the input image)')
    if self.head not in ('vae_decoder', 'conv'):
      raise ValueError(f"model.head must be 'vae_decoder' or 'conv', got {self.head!r}")
    if self.head == 'vae_decoder' and self.latents != 'vae':
      raise ValueError("model.head='vae_decoder' needs model.latents='vae'")
    if self.head_board_distance and 'checkerboard' not in self.head_conditions:
      raise ValueError("model.head.board_distance needs 'checkerboard' in model.head.conditions")
    if self.head_conditions and self.head != 'conv':
      raise ValueError("model.head.conditions needs model.head='conv' (a VAE-decoder head "
                       'reads latents only, as SD3\'s decoder does)')
    c = self.latent_channels
    want_in = c * (1 + len(self.conditions))
    if self.mmdit.in_channels != want_in or self.mmdit.out_channels != c:
      raise ValueError(f'mmdit in/out channels must be {want_in}/{c} for {c} latent channels '
                       f'and conditions {self.conditions}, got {self.mmdit.in_channels}/'
                       f'{self.mmdit.out_channels}')
    if self.text is not None and (self.text.out_dim != self.mmdit.joint_attention_dim or
                                  self.text.pooled_dim != self.mmdit.pooled_projection_dim):
      raise ValueError('text encoder out_dim / pooled_dim must equal the mmdit '
                       'joint_attention_dim / pooled_projection_dim')

  def head_board_at(self) -> int | None:
    """`ConvHead`'s `board_at`: the board's channel among the head's condition maps."""
    if not self.head_board_distance:
      return None
    return 3 * self.head_conditions.index('checkerboard')

  def skip_sources(self) -> tuple[str, ...]:
    """Per layer, the condition its trivial estimate is: the checkerboard for layers
    blended over it (when given), the input image otherwise."""
    board = 'checkerboard' in self.conditions
    return tuple('checkerboard' if board and l != 'background' else 'image'
                 for l in self.layers)

  @property
  def latent_channels(self) -> int:
    return self.vae.latent_channels if self.latents == 'vae' else 3 * self.factor ** 2

  @property
  def latent_factor(self) -> int:
    return 2 ** (len(self.vae.block_out_channels) - 1) if self.latents == 'vae' else self.factor


class LayerDecomposer(nnx.Module):
  """`(noisy [B, K, h, w, C], conditions [B, h, w, C * n], text, sigma [B]) -> velocity`."""

  def __init__(self, cfg: DecomposerConfig, *, rngs: nnx.Rngs,
               transformer: SD3Transformer2DModel | None = None,
               vae: AutoencoderKL | None = None):
    """`transformer` and `vae`: pretrained modules to use (the transformer already widened,
    `widen_input`), so a large model is never randomly initialised first."""
    self.config = cfg
    m = cfg.mmdit
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    if cfg.latents == 'vae':
      if vae is not None and vae.config != cfg.vae:
        raise ValueError(f'vae config {vae.config} differs from the decomposer\'s {cfg.vae}')
      self.latents = VAELatents(vae or AutoencoderKL(cfg.vae, rngs=rngs))
    else:
      self.latents = SpaceToDepth(cfg.factor)
    if transformer is None:  # from scratch: DiT's adaLN-Zero start
      transformer = adaln_zero_(SD3Transformer2DModel(m, rngs=rngs))
    elif transformer.config != m:
      raise ValueError(f'transformer config {transformer.config} differs from the '
                       f'decomposer\'s {m}')
    self.transformer = transformer
    self.layer_embed = nnx.Param(jnp.zeros((len(cfg.layers), m.width), m.param_dtype),
                                 out_sharding=(None, 'embed'), eager_sharding=False)
    if cfg.text is not None:
      self.text_encoder = TextEncoder(cfg.text, rngs=rngs, **kw)
    if cfg.long_skip:
      c = cfg.latent_channels
      sources = tuple(c * cfg.conditions.index(n) for n in cfg.skip_sources())
      self.long_skip = LongSkip(sources, c * len(cfg.conditions), c, m.width, rngs=rngs, **kw)

    def head(channels):
      if cfg.head == 'conv':
        return ConvHead(channels, cfg.factor, cfg.head_width, 3 * len(cfg.head_conditions),
                        cfg.head_board_at(), rngs=rngs, **kw)
      return heads.init_from_vae_decoder(heads.decoder_head(cfg.vae, channels, rngs=rngs),
                                         self.latents.vae.decoder)
    if 'foreground' in cfg.layers:
      self.alpha_head = head(heads.ALPHA_CHANNELS)
    if 'shadow' in cfg.layers:
      self.shadow_head = head(heads.SHADOW_CHANNELS)

  def encode_text(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    if self.config.text is not None:
      return self.text_encoder(batch['text_tokens'])
    return batch['text_embeds'], batch['pooled_text_embeds']

  def head_pixels(self, batch: dict) -> jax.Array | None:
    """The condition maps the heads read, in [-1, 1], concatenated: [B, H, W, 3 n] or None."""
    names = self.config.head_conditions
    return jnp.concatenate([2 * batch[n] - 1 for n in names], -1) if names else None

  def alpha(self, z: jax.Array, pixels: jax.Array | None) -> jax.Array:
    """The alpha head's raw output for foreground latents `z`; `pixels`: `head_pixels`."""
    return self.apply_head(self.alpha_head, z, pixels)

  def shadow(self, z: jax.Array, pixels: jax.Array | None) -> jax.Array:
    """The shadow head's raw output (RGB, opacity) for shadow latents `z`."""
    return self.apply_head(self.shadow_head, z, pixels)

  @staticmethod
  def apply_head(head, z, pixels):
    """`head` (`alpha_head`, `shadow_head`) on latents `z`, reading `pixels` if given."""
    return head(z) if pixels is None else head(z, pixels)

  def conditions(self, batch: dict) -> jax.Array:
    """The condition latents, concatenated on channels: [B, h, w, C * n]."""
    if not self.config.conditions:
      return None
    return jnp.concatenate([self.latents.encode(batch[n]) for n in self.config.conditions], -1)

  def __call__(self, noisy: jax.Array, conditions: jax.Array | None, context: jax.Array,
               pooled: jax.Array, sigma: jax.Array) -> jax.Array:
    b, k, h, w, c = noisy.shape
    x = noisy
    if conditions is not None:
      x = jnp.concatenate([x, jnp.broadcast_to(conditions[:, None],
                                               (b, k, h, w, conditions.shape[-1]))], -1)
    tokens = self.transformer.pos_embed(x.reshape(b * k, h, w, -1).astype(
        self.config.mmdit.dtype))
    n = tokens.shape[1]
    tokens = tokens.reshape(b, k, n, -1) + self.layer_embed[...][None, :, None].astype(
        tokens.dtype)
    tokens = parallel.constrain(tokens.reshape(b, k * n, -1), ('batch', 'length', 'embed'))
    out = self.transformer.forward_tokens(tokens, context, pooled, sigma * 1000)
    out = self.transformer.unpatchify(out.reshape(b * k, n, -1), h, w).reshape(b, k, h, w, c)
    if self.config.long_skip:
      temb = self.transformer.time_text_embed(jnp.broadcast_to(sigma * 1000, (b,)),
                                              pooled.astype(x.dtype))
      out = out + self.long_skip(conditions.astype(out.dtype), temb.astype(out.dtype))
    if self.config.prediction == 'sample':  # x_t = (1 - s) x_0 + s eps: v = (x_t - x_0) / s
      s = jnp.maximum(sigma, SAMPLE_SIGMA_MIN).astype(out.dtype)[:, None, None, None, None]
      out = (noisy.astype(out.dtype) - out) / s
    return out


def trainable(path, _) -> bool:
  """Everything but the latent map (SD3's VAE stays frozen)."""
  return path[0] != 'latents'


TRAINABLE = nnx.All(nnx.Param, trainable)


def widen_input(transformer: SD3Transformer2DModel, in_channels: int) -> SD3Transformer2DModel:
  """Widens a pretrained MMDiT's patch embedding to `in_channels` inputs, in place: the extra
  channels' weights start at zero, so the network's output is unchanged."""
  kernel = transformer.pos_embed.proj.kernel
  have = kernel.shape[2]
  if in_channels < have:
    raise ValueError(f'patch embedding with {have} input channels cannot widen to '
                     f'{in_channels}')
  wide = jnp.zeros(kernel.shape[:2] + (in_channels,) + kernel.shape[3:], kernel.dtype)
  kernel.set_value(wide.at[:, :, :have].set(kernel[...]))
  transformer.pos_embed.proj.in_features = in_channels
  transformer.config = dataclasses.replace(transformer.config, in_channels=in_channels)
  return transformer
