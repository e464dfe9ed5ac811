"""LiWi's degradation-restoration data: damage a foreground's boundary, keep the target clean.

The input image of an example is recomposed from a degraded copy of the target object
(eroded / dilated / blurred alpha, a halo, colour spill from the background, JPEG damage),
while the supervision stays the clean layers, so the model learns to restore boundaries.
Every damage is confined to or centred on the boundary band: pixels within `band` of the
alpha edge (`boundary_band`), which the loss also up-weights.

Config (`config.degradations`): name -> {'prob': p, 'strength': (lo, hi)}, names from
`DEGRADATIONS`; each is applied independently with probability p at a strength drawn
uniformly from [lo, hi] (pixels for erode / dilate / blur, a blend weight for halo / spill,
a JPEG quality for jpeg).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from layerjax import config_spec as spec


def boundary_band(alpha: np.ndarray, band: int) -> np.ndarray:
  """[H, W] bool: pixels within `band` of where the alpha matte crosses 0.5 or is fractional."""
  solid = alpha >= 0.5
  edge = (solid ^ ndimage.binary_erosion(solid)) | ((alpha > 0) & (alpha < 1))
  return ndimage.binary_dilation(edge, iterations=band) if band > 0 else edge


def _erode(rgba, bg, k, band):
  return np.concatenate([rgba[..., :3], ndimage.grey_erosion(rgba[..., 3:], size=(k, k, 1))], -1)


def _dilate(rgba, bg, k, band):
  # A cut-out that bleeds into the background carries the background's colour there.
  alpha = ndimage.grey_dilation(rgba[..., 3:], size=(k, k, 1))
  rgb = np.where(rgba[..., 3:] > 0, rgba[..., :3], bg)
  return np.concatenate([rgb, alpha], -1)


def _blur(rgba, bg, sigma, band):
  return np.concatenate([rgba[..., :3],
                         ndimage.gaussian_filter(rgba[..., 3:], (sigma, sigma, 0))], -1)


def _halo(rgba, bg, weight, band):
  # A bright rim, as left by matting against a light backdrop.
  w = weight * band[..., None]
  return np.concatenate([rgba[..., :3] * (1 - w) + w, rgba[..., 3:]], -1)


def _spill(rgba, bg, weight, band):
  w = weight * band[..., None]
  return np.concatenate([rgba[..., :3] * (1 - w) + bg * w, rgba[..., 3:]], -1)


def _jpeg(rgba, bg, quality, band):
  buf = io.BytesIO()
  Image.fromarray(np.round(rgba * 255).astype(np.uint8)[..., :3]).save(
      buf, format='JPEG', quality=int(round(quality)))
  with Image.open(buf) as im:
    rgb = np.asarray(im.convert('RGB'), np.float32) / 255
  return np.concatenate([np.where(band[..., None], rgb, rgba[..., :3]), rgba[..., 3:]], -1)


DEGRADATIONS = {'erode': _erode, 'dilate': _dilate, 'blur': _blur, 'halo': _halo,
                'spill': _spill, 'jpeg': _jpeg}


# `config.degradations` (see above), for `config_spec.check`.
CONFIG = spec.mapping(spec.section({'prob': spec.number(0, 1),
                                    'strength': spec.ordered(spec.number(lo=0))}),
                      keys=DEGRADATIONS)


def degrade(rgba: np.ndarray, background: np.ndarray, band: np.ndarray, degradations,
            rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
  """A degraded copy of `rgba` (and the names applied), drawn from `degradations`."""
  out, applied = rgba.astype(np.float32), []
  for name in sorted(dict(degradations)):  # a fixed order keeps draws reproducible
    spec = degradations[name]
    if rng.uniform() >= spec['prob']:
      continue
    strength = rng.uniform(*spec['strength'])
    if name in ('erode', 'dilate'):
      strength = 2 * int(round(strength)) + 1  # an odd structuring-element width
    out = np.clip(DEGRADATIONS[name](out, background, strength, band), 0, 1).astype(np.float32)
    applied.append(name)
  return out, applied
