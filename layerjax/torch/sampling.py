"""The sampler and decoders of `layerjax.flow` in PyTorch: `sample_latents` (Euler steps of
diffusers' `FlowMatchEulerDiscreteScheduler` over SD3's shifted noise levels, classifier-free
guidance with both halves in one batch) and `decode_layers` (RGB decode, the heads, the board
unblend, recomposition back to front). Tensors are NCHW; layers come back as numpy NHWC.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from layerjax.data.schema import ALPHA_MIN, over
from layerjax.torch.modules import Decomposer, at_least_fp32, to_unit

def set_steps(scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> torch.Tensor:
  """`flow.sigmas(steps, shift)` in the scheduler: uniform in t from 1, shifted by the
  scheduler's `shift`, then 0 appended. Returns the steps + 1 noise levels."""
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
  return scheduler.sigmas


@torch.no_grad()
def sample_latents(model: Decomposer, scheduler: FlowMatchEulerDiscreteScheduler,
                   batch: dict, noise: torch.Tensor, steps: int, guidance: float = 1.0,
                   uncond: dict | None = None) -> torch.Tensor:
  """Euler steps from `noise` [B, K, C, h, w] to the K layer latents (`flow.sample_latents`):
  v = v_u + guidance (v_c - v_u), v_u with `batch`'s entries replaced by `uncond`'s."""
  guided = guidance != 1
  if guided and uncond is None:
    raise ValueError(f'guidance={guidance} needs `uncond`, the unconditional batch entries')
  if guided and set(uncond) - set(batch):
    raise ValueError(f'uncond: {sorted(set(uncond) - set(batch))} are not entries of the '
                     f'batch ({sorted(batch)})')
  conditions = model.conditions(batch)
  context, pooled = model.encode_text(batch)
  if guided:
    blank = {**batch, **uncond}
    if conditions is not None:
      conditions = torch.cat([conditions, model.conditions(blank)])
    context, pooled = (torch.cat(p) for p in zip((context, pooled), model.encode_text(blank)))
  b = noise.shape[0]
  n = 2 * b if guided else b
  levels = set_steps(scheduler, steps).to(noise.device)
  x = noise.to(torch.promote_types(model.dtype, torch.float32))  # fp32 steps, or float64
  for i, t in enumerate(scheduler.timesteps):
    # sigma stays fp32 whatever the model's dtype: timestep = 1000 sigma, as in JAX.
    v = model(torch.cat([x, x]) if guided else x, conditions, context, pooled,
              levels[i].expand(n)).to(x.dtype)
    if guided:
      v_c, v_u = v[:b], v[b:]
      v = v_u + guidance * (v_c - v_u)
    x = scheduler.step(v, t, x).prev_sample
  return x


@torch.no_grad()
def decode_layers(model: Decomposer, latents: torch.Tensor, pixels: torch.Tensor | None,
                  board: torch.Tensor | None = None) -> dict[str, np.ndarray]:
  """Latents [B, K, C, h, w] -> {layer name: straight RGBA [B, H, W, 4] in [0, 1]} and the
  `recomposition` (RGB) back to front, as numpy NHWC in fp32 (float64 for a float64 model)
  (`flow.decode_layers`). `pixels`: `model.head_pixels`; `board`: the checkerboard the
  foreground latent is seen over, if known."""
  out = {}
  latents = latents.to(model.dtype)
  for i, name in enumerate(model.model['layers']):
    z = latents[:, i]
    if name == 'shadow':
      out[name] = to_unit(model.shadow_head(z, pixels))
      continue
    rgb = at_least_fp32(model.decode(z))  # as JAX's, whose board is fp32
    if name == 'foreground':
      alpha = to_unit(model.alpha_head(z, pixels))
      if board is not None:
        board = board.to(rgb.dtype)
        rgb = board + (rgb - board) / alpha.clamp(min=ALPHA_MIN)
    else:
      alpha = torch.ones_like(rgb[:, :1])
    out[name] = torch.cat([rgb.clamp(0, 1), alpha], 1)
  layers = {k: v.permute(0, 2, 3, 1).cpu().numpy() for k, v in out.items()}
  stack = [layers[n] for n in ('background', 'shadow', 'foreground') if n in layers]
  image = stack[0]
  for layer in stack[1:]:
    image = over(layer, image)
  layers['recomposition'] = image[..., :3]
  return layers
