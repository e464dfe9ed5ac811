"""The rectified-flow schedule and sampler, shared by training and inference: SD3's shifted
noise levels (`shift_sigma`; training draws them logit-normal, `sample_sigma`), the Euler
sampler over the K layer latents jointly (with classifier-free guidance against the blank
prompt and the empty text if asked), its stochastic twin for reward finetuning (Flow-GRPO's
SDE with the same marginals, each step's log-probability recorded and recomputable under new
parameters), then the decoders that turn latents into RGBA layers.

The foreground latent is the layer seen over a checkerboard, so its decoded RGB is the
object's colour wherever it is opaque (RefLayer); its alpha comes from the alpha head.
When the board is known (a model condition), the straight colour is recovered where the
layer is partly transparent too: blend = a F + (1 - a) board, so F = board + (blend - board) / a.
"""

from __future__ import annotations

from typing import NamedTuple

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


def encode_conditions(model, batch: dict, guidance: float = 1.0,
                      uncond: dict | None = None) -> tuple:
  """What the velocity reads besides x and s, encoded once for all steps: (conditions,
  context, pooled), each with the unconditional rows (`batch` with `uncond`'s entries)
  appended after the conditional ones when guided (`guidance` != 1)."""
  _check_guidance(batch, guidance, uncond)
  conditions = model.conditions(batch)
  context, pooled = model.encode_text(batch)
  if guidance != 1:
    blank = {**batch, **uncond}
    if conditions is not None:
      conditions = jnp.concatenate([conditions, model.conditions(blank)])
    context, pooled = (jnp.concatenate(p) for p in zip((context, pooled),
                                                        model.encode_text(blank)))
  return conditions, context, pooled


def _check_guidance(batch: dict, guidance: float, uncond: dict | None):
  """Guidance needs `uncond`, whose entries replace some of `batch`'s."""
  if guidance != 1 and uncond is None:
    raise ValueError(f'guidance={guidance} needs `uncond`, the unconditional batch entries '
                     '(examples.unconditional_inputs)')
  if guidance != 1 and set(uncond) - set(batch):
    raise ValueError(f'uncond: {sorted(set(uncond) - set(batch))} are not entries of the '
                     f'batch ({sorted(batch)})')


def velocity(model, encoded: tuple, x: jax.Array, s: jax.Array,
             guidance: float = 1.0) -> jax.Array:
  """The (guided) velocity at x [B, K, h, w, C] and noise level s (a scalar, or [B]: one per
  row) given `encode_conditions`' output for the same `guidance`: v = v_u + guidance (v_c - v_u),
  both halves in one model call; guidance 1: the conditional velocity alone."""
  guided = guidance != 1
  b = x.shape[0]
  wrong = {t.shape[0] for t in encoded if t is not None} - {2 * b if guided else b}
  if wrong:
    raise ValueError(f'encoded conditions: {max(wrong)} rows for {b} latents at '
                     f'guidance={guidance} (encode_conditions with the same guidance)')
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (b,))
  v = model(jnp.concatenate([x, x]) if guided else x, *encoded,
            jnp.concatenate([s, s]) if guided else s).astype(jnp.float32)
  if guided:
    v_c, v_u = v[:b], v[b:]
    v = v_u + guidance * (v_c - v_u)
  return v


def _start(model, batch: dict, rng: jax.Array | None, guidance: float, uncond: dict | None,
           noise: jax.Array | None) -> tuple[jax.Array, tuple]:
  """The samplers' checked inputs: the starting noise [B, K, h, w, C] (drawn from `rng`, or
  `noise` given) and `encode_conditions`' output."""
  _check_guidance(batch, guidance, uncond)  # before any work (the noise drawn)
  cfg = model.config
  b, h, w = batch['image'].shape[:3]
  f, c = cfg.latent_factor, cfg.latent_channels
  shape = (b, len(cfg.layers), h // f, w // f, c)
  x = jax.random.normal(rng, shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
  if x.shape != shape:
    raise ValueError(f'noise: expected shape {shape} for this batch, got {x.shape}')
  return x, encode_conditions(model, batch, guidance, uncond)


def sample_latents(model, batch: dict, rng: jax.Array | None, steps: int, shift: float,
                   guidance: float = 1.0, uncond: dict | None = None,
                   noise: jax.Array | None = None) -> jax.Array:
  """Euler steps from noise (drawn from `rng`, or `noise` given) to the K layer latents
  [B, K, h, w, C].

  `guidance` (a Python number): classifier-free guidance, v = v_u + guidance (v_c - v_u),
  where v_u is the velocity with `batch`'s entries replaced by `uncond`'s (e.g.
  `examples.unconditional_inputs`); both in one model call per step, on the two batches
  concatenated. 1: the conditional velocity alone, one pass of the batch."""
  x, encoded = _start(model, batch, rng, guidance, uncond, noise)
  levels = sigmas(steps, shift)

  def step(i, x):
    s, s_next = levels[i], levels[i + 1]
    return x + (s_next - s) * velocity(model, encoded, x, s, guidance)

  return jax.lax.fori_loop(0, steps, step, x)


class Trajectory(NamedTuple):
  """What `sample_latents_sde` took, for GRPO to recompute the log-probs of the same steps:
  `states` x_0..x_steps [steps + 1, B, K, h, w, C] (x_0 the noise, x_steps the latents),
  `log_probs` [steps, B] of each step under the sampling model, `levels` s_0..s_steps."""
  states: jax.Array
  log_probs: jax.Array
  levels: jax.Array


def _rows(s, x: jax.Array) -> jax.Array:
  """A scalar or per-row [B] noise level, shaped to broadcast against x [B, ...]."""
  s = jnp.asarray(s, jnp.float32)
  return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def sde_moments(x: jax.Array, v: jax.Array, s, s_next, a) -> tuple[jax.Array, jax.Array]:
  """The mean and std of one step s -> s_next (scalars or [B]) of the SDE with the flow's
  marginals (Flow-GRPO, eq. 7-9, in our convention x_s = (1 - s) x0 + s eps, v = eps - x0):

  Fokker-Planck: dx = [v - g^2/2 grad log p_s] ds + g dW, run from s = 1 down (noise variance
  |ds|, ds < 0), keeps p_s for any g, the score term cancelling the noise's diffusion. Since
  E[eps | x] = x + (1 - s) v, the score is -(x + (1 - s) v) / s, so one Euler-Maruyama step
  is x_next = x + (s_next - s) [v + g^2 / (2 s) (x + (1 - s) v)] + g sqrt(s - s_next) n.

  g = a sqrt(s / (1 - s)) (Flow-GRPO's noise level `a`, 0.7 theirs; 0: the Euler ODE step).
  At s = 1 (the first step) that is infinite: as the reference, 1 - s is replaced by
  1 - s_next there, i.e. g = a / sqrt(1 - s_next). Returns (mean, std), std broadcastable
  (the means are also what a KL to a frozen model compares: |mean - mean_ref|^2 / (2 std^2))."""
  s, s_next = _rows(s, x), _rows(s_next, x)
  g2 = a ** 2 * s / jnp.where(s < 1, 1 - s, 1 - s_next)
  mean = x + (s_next - s) * (v + g2 / (2 * s) * (x + (1 - s) * v))
  return mean, jnp.sqrt(g2 * (s - s_next))


def sde_step(x: jax.Array, v: jax.Array, s, s_next, a,
             noise: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One stochastic step (`sde_moments`) with standard normal `noise` like x:
  (x_next, mean, std)."""
  mean, std = sde_moments(x, v, s, s_next, a)
  return mean + std * noise, mean, std


def gaussian_logprob(x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """log N(x_next; mean, std^2) summed over all but the batch axis: [B]. The full density,
  its constant included: GRPO's ratios of the same step's densities cancel it (and the std,
  which the parameters do not move), but a true density can be checked and compared. In
  float32 a sum over SD3's 512 px latents (2e5 values, |log p| ~ 3e5) is off by ~0.03: a ratio
  exp(new - old) of such sums is that noisy, unlike the per-value mean (Flow-GRPO's)."""
  z = (x_next - mean) / std
  terms = -0.5 * z ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)
  return jnp.broadcast_to(terms, z.shape).reshape(z.shape[0], -1).sum(1)


def sample_latents_sde(model, batch: dict, rng: jax.Array, steps: int, shift: float, a: float,
                       guidance: float = 1.0, uncond: dict | None = None,
                       noise: jax.Array | None = None) -> tuple[jax.Array, Trajectory]:
  """`sample_latents` with `sde_step`s of noise level `a` instead of Euler steps (the same
  levels, `guidance` and `uncond`): (the latents [B, K, h, w, C], the `Trajectory`). The
  starting noise is drawn from one half of `rng` (or `noise` given), the steps' from the
  other; a = 0 is the Euler sampler (its log-probs are then undefined: no density)."""
  if a < 0:
    raise ValueError(f'a={a}: the noise level must be >= 0')
  rng_start, rng_steps = jax.random.split(rng)
  x, encoded = _start(model, batch, rng_start, guidance, uncond, noise)
  levels = sigmas(steps, shift)

  def step(x, i):
    s, s_next = levels[i], levels[i + 1]
    n = jax.random.normal(jax.random.fold_in(rng_steps, i), x.shape, jnp.float32)
    x_next, mean, std = sde_step(x, velocity(model, encoded, x, s, guidance), s, s_next, a, n)
    return x_next, (x_next, gaussian_logprob(x_next, mean, std))

  latents, (states, log_probs) = jax.lax.scan(step, x, jnp.arange(steps))
  return latents, Trajectory(jnp.concatenate([x[None], states]), log_probs, levels)


def step_logprob(model, encoded: tuple, x: jax.Array, x_next: jax.Array, s, s_next, a,
                 guidance: float = 1.0) -> jax.Array:
  """The log-prob [B] of the transitions x -> x_next [B, K, h, w, C] from levels s to s_next
  (scalars, or [B]: each row its own step of its `Trajectory`) under `model`'s current
  parameters: what the GRPO objective differentiates. `encoded`: `encode_conditions` of the
  batch (with `guidance` and its `uncond`); jit-able, differentiable in the parameters."""
  mean, std = sde_moments(x, velocity(model, encoded, x, s, guidance), s, s_next, a)
  return gaussian_logprob(x_next, mean, std)


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
