"""The rectified-flow schedule and sampler, shared by training and inference: SD3's shifted
noise levels (`shift_sigma`; training draws them logit-normal, `sample_sigma`), the Euler
sampler over the K layer latents jointly (with classifier-free guidance against the blank
prompt and the empty text if asked), then the decoders that turn latents into RGBA layers.

The foreground latent is the layer seen over a checkerboard, so its decoded RGB is the
object's colour wherever it is opaque (RefLayer); its alpha comes from the alpha head.
When the board is known (a model condition), the straight colour is recovered where the
layer is partly transparent too: blend = a F + (1 - a) board, so F = board + (blend - board) / a.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layerjax.data.schema import ALPHA_MIN, over
from layerjax.models import heads


def shift_sigma(t: jax.Array, shift: float) -> jax.Array:
  """SD3's resolution shift of the noise level: shift t / (1 + (shift - 1) t)."""
  return shift * t / (1 + (shift - 1) * t)


def sample_sigma(rng: jax.Array, n: int, loss_cfg) -> jax.Array:
  """Logit-normal timesteps (SD3: mean 0, std 1), then shifted."""
  u = jax.nn.sigmoid(loss_cfg.logit_mean + loss_cfg.logit_std * jax.random.normal(rng, (n,)))
  return shift_sigma(u, loss_cfg.shift)


def sigmas(steps: int, shift: float) -> jax.Array:
  """Noise levels 1 -> 0 in `steps` Euler steps, uniform in t then shifted (SD3's scheduler)."""
  return shift_sigma(jnp.linspace(1.0, 0.0, steps + 1), shift)


def sample_latents(model, batch: dict, rng: jax.Array | None, steps: int, shift: float,
                   guidance: float = 1.0, uncond: dict | None = None,
                   noise: jax.Array | None = None) -> jax.Array:
  """Euler steps from noise (drawn from `rng`, or `noise` given) to the K layer latents
  [B, K, h, w, C].

  `guidance` (a Python number): classifier-free guidance, v = v_u + guidance (v_c - v_u),
  where v_u is the velocity with `batch`'s entries replaced by `uncond`'s (e.g.
  `examples.unconditional_inputs`); both in one model call per step, on the two batches
  concatenated. 1: the conditional velocity alone, one pass of the batch."""
  guided = guidance != 1
  if guided and uncond is None:
    raise ValueError(f'guidance={guidance} needs `uncond`, the unconditional batch entries '
                     '(examples.unconditional_inputs)')
  if guided and set(uncond) - set(batch):
    raise ValueError(f'uncond: {sorted(set(uncond) - set(batch))} are not entries of the '
                     f'batch ({sorted(batch)})')
  cfg = model.config
  b, h, w = batch['image'].shape[:3]
  f, c = cfg.latent_factor, cfg.latent_channels
  shape = (b, len(cfg.layers), h // f, w // f, c)
  x = jax.random.normal(rng, shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
  if x.shape != shape:
    raise ValueError(f'noise: expected shape {shape} for this batch, got {x.shape}')
  # The conditions do not change over the steps: encoded once, both halves when guided.
  conditions = model.conditions(batch)
  context, pooled = model.encode_text(batch)
  if guided:
    blank = {**batch, **uncond}
    if conditions is not None:
      conditions = jnp.concatenate([conditions, model.conditions(blank)])
    context, pooled = (jnp.concatenate(p) for p in zip((context, pooled),
                                                        model.encode_text(blank)))
  n = 2 * b if guided else b
  levels = sigmas(steps, shift)

  def step(i, x):
    s, s_next = levels[i], levels[i + 1]
    v = model(jnp.concatenate([x, x]) if guided else x, conditions, context, pooled,
              jnp.full((n,), s)).astype(jnp.float32)
    if guided:
      v_c, v_u = v[:b], v[b:]
      v = v_u + guidance * (v_c - v_u)
    return x + (s_next - s) * v

  return jax.lax.fori_loop(0, steps, step, x)


def decode_layers(model, latents: jax.Array, pixels: jax.Array | None,
                  board: jax.Array | None = None) -> dict[str, jax.Array]:
  """Latents [B, K, h, w, C] -> {layer name: straight RGBA [B, H, W, 4] in [0, 1]} and the
  recomposition (RGB) of whichever layers exist, back to front. `pixels`: the maps the heads
  read (`LayerDecomposer.head_pixels`); `board`: the checkerboard the foreground latent is
  seen over, if known (else its decoded blend is read as the colour)."""
  layers = model.config.layers
  out = {}
  for i, name in enumerate(layers):
    z = latents[:, i]
    if name == 'shadow':
      out[name] = heads.to_unit(model.shadow(z, pixels))
      continue
    rgb = model.latents.decode(z)
    if name == 'foreground':
      alpha = heads.to_unit(model.alpha(z, pixels))
      if board is not None:
        rgb = board + (rgb - board) / jnp.maximum(alpha, ALPHA_MIN)
    else:
      alpha = jnp.ones(rgb.shape[:-1] + (1,), rgb.dtype)
    rgb = jnp.clip(rgb, 0, 1)
    out[name] = jnp.concatenate([rgb, alpha], -1)
  stack = [out[n] for n in ('background', 'shadow', 'foreground') if n in out]
  image = stack[0]
  for layer in stack[1:]:
    image = over(layer, image)
  out['recomposition'] = image[..., :3]
  return out


def decompose(model, batch: dict, rng: jax.Array, steps: int, shift: float,
              guidance: float = 1.0, uncond: dict | None = None) -> dict:
  """`sample_latents` (with its `guidance` and `uncond`), then `decode_layers`."""
  board = batch['checkerboard'] if 'checkerboard' in model.config.conditions else None
  latents = sample_latents(model, batch, rng, steps, shift, guidance, uncond)
  return decode_layers(model, latents, model.head_pixels(batch), board)
