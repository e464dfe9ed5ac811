"""Decoder heads that turn SD3 latents into per-layer alpha and shadow maps.

Each head is a `layerjax.models.vae.Decoder` with its own number of output channels:
the alpha head predicts 1 channel (opacity), the shadow head 4 (RGB colour + opacity).
Heads start from the pretrained VAE decoder: every parameter is copied except `conv_out`,
whose shape differs and which stays freshly initialised.

Output convention (all channels of both heads): the raw output lives in the VAE's image
range [-1, 1]; `to_unit` maps it to [0, 1] exactly as diffusers denormalises VAE images,
`clip(x / 2 + 0.5, 0, 1)`. Losses compare the raw output with targets `2 * t - 1` (no clip,
so the gradient never vanishes); `to_unit` is for reading predictions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.models.vae import Decoder, VAEConfig

ALPHA_CHANNELS = 1
SHADOW_CHANNELS = 4  # RGB colour, then opacity


def decoder_head(cfg: VAEConfig, out_channels: int, *, rngs: nnx.Rngs) -> Decoder:
  """A VAE-decoder-shaped head producing `out_channels` maps at image resolution."""
  return Decoder(cfg, out_channels, rngs=rngs)


def init_from_vae_decoder(head: Decoder, vae_decoder: Decoder) -> Decoder:
  """Copies every parameter of `vae_decoder` into `head` except `conv_out`; returns `head`.

  Parameters are cast to the head's parameter dtype. Raises ValueError if the two decoders
  differ in anything but `conv_out` (another VAE configuration).
  """
  source = dict(nnx.to_flat_state(nnx.state(vae_decoder, nnx.Param)))
  target = nnx.state(head, nnx.Param)
  flat = dict(nnx.to_flat_state(target))
  body = lambda paths: {p for p in paths if p[0] != 'conv_out'}
  if body(source) != body(flat):
    differ = sorted('.'.join(map(str, p)) for p in body(source) ^ body(flat))
    raise ValueError(f'head and VAE decoder have different parameters: {differ[:10]}')
  for path in body(flat):  # check everything before changing anything
    if source[path].shape != flat[path].shape:
      raise ValueError(f"shape mismatch at {'.'.join(map(str, path))}: VAE decoder has "
                       f'{source[path].shape}, head {flat[path].shape}')
  for path in body(flat):  # copies: a buffer shared by two trained heads cannot be donated
    flat[path].set_value(jnp.array(source[path][...], flat[path].dtype, copy=True))
  nnx.update(head, target)
  return head


def to_unit(x: jax.Array) -> jax.Array:
  """Raw head output in the VAE image range [-1, 1] -> [0, 1] (diffusers' `denormalize`)."""
  return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
