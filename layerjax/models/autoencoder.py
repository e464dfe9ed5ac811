"""Image <-> latent maps for the layer decomposer: SD3's VAE, or an exact pixel reshuffle.

Both take and give NHWC images in [0, 1] and diffusion-model latents (already shifted and
scaled), so the decomposer and its objectives never ask which one is in use.

* `VAELatents`: the frozen SD3 `AutoencoderKL` (the posterior mean is the latent, so a
  sample's latent is a function of the image alone and runs reproduce).
* `SpaceToDepth`: `f x f` pixel blocks -> `3 f^2` channels of `2 x - 1`; lossless and
  parameter-free, so a from-scratch demo trains the diffusion model without first training a
  VAE, and the same code paths serve both.
"""

from __future__ import annotations

import jax
from flax import nnx

from layerjax.models.vae import AutoencoderKL, from_latent, to_latent


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  b, h, w, c = x.shape
  if h % f or w % f:
    raise ValueError(f'image {h}x{w} is not divisible by the latent factor {f}')
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c // (f * f))


class SpaceToDepth(nnx.Module):
  """Lossless latents: pixel blocks of `factor` x `factor` stacked on channels."""

  def __init__(self, factor: int):
    self.factor = factor
    self.latent_channels = 3 * factor * factor

  def encode(self, images: jax.Array) -> jax.Array:
    return space_to_depth(2 * images - 1, self.factor)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images in [0, 1] up to the model's error (not clipped: losses see the raw values)."""
    return depth_to_space(latents, self.factor) / 2 + 0.5


class VAELatents(nnx.Module):
  """SD3's VAE as a deterministic latent map; trained by nobody (the trainer freezes `vae`)."""

  def __init__(self, vae: AutoencoderKL):
    self.vae = vae
    self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
    self.latent_channels = vae.config.latent_channels

  def encode(self, images: jax.Array) -> jax.Array:
    mean, _ = self.vae.encode(2 * images - 1)
    return to_latent(mean, self.vae.config)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.vae.decode(from_latent(latents, self.vae.config)) / 2 + 0.5
