"""Where an edited object goes: a placement (uniform scale, then shift) of its original
pixels, the ground contact it is scaled about, and the one resampling that draws it.

Coordinates are continuous with pixel centres at half-integers (pixel (i, j) covers
[j, j+1) x [i, i+1)), so a scale about a point keeps that point exactly where it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

CONTACT_BAND = 0.05  # the bottom 5% of an object's height is where it meets the ground


@dataclasses.dataclass(frozen=True)
class Placement:
  """p -> scale * p + (dx, dy): where a pixel of the original layer lands."""
  scale: float = 1.0
  dx: float = 0.0
  dy: float = 0.0

  @property
  def identity(self) -> bool:
    return self == Placement()

  def apply(self, point: tuple[float, float]) -> tuple[float, float]:
    return self.scale * point[0] + self.dx, self.scale * point[1] + self.dy

  def moved(self, dx: float, dy: float) -> 'Placement':
    return Placement(self.scale, self.dx + dx, self.dy + dy)

  def scaled(self, factor: float, about: tuple[float, float]) -> 'Placement':
    """Then scaled by `factor` about `about` (a point where the object is now)."""
    ax, ay = about
    return Placement(self.scale * factor, factor * self.dx + (1 - factor) * ax,
                     factor * self.dy + (1 - factor) * ay)


def ground_contact(alpha: np.ndarray) -> tuple[float, float] | None:
  """(x, y) where an object stands: the bottom edge of its lowest opaque (alpha >= 0.5;
  any alpha if none is) row, at the alpha-weighted mean x of the bottom `CONTACT_BAND` of its
  height. None for an empty layer."""
  solid = alpha >= 0.5
  if not solid.any():
    solid = alpha > 0
  rows = np.nonzero(solid.any(1))[0]
  if not len(rows):
    return None
  top, bottom = rows[0], rows[-1] + 1
  band = max(1, round(CONTACT_BAND * (bottom - top)))
  weights = np.where(solid, alpha, 0)[bottom - band:bottom]
  x = float((weights.sum(0) * (np.arange(alpha.shape[1]) + 0.5)).sum() / weights.sum())
  return x, float(bottom)


def warp(rgba: np.ndarray, placement: Placement, unit: bool = True) -> np.ndarray:
  """`rgba` [H, W, 4] straight alpha, placed by `placement` on the same canvas: resampled
  premultiplied (colour does not bleed from transparent pixels), bilinear; when shrinking,
  first blurred by a Gaussian of sigma (1/scale - 1) / 2 input pixels against aliasing (as
  scikit-image's `rescale` does). What falls outside the canvas is cut; transparent where
  nothing lands. `unit=False` for colour channels that may exceed 1 (a shadow's tint): not
  clipped to [0, 1] (a weighted mean of the inputs, so in range but for rounding)."""
  if placement.identity:
    return rgba
  s = placement.scale
  premult = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)
  if s < 1:
    premult = ndimage.gaussian_filter(premult, ((1 / s - 1) / 2,) * 2 + (0,))
  # Output index o (centre o + 0.5) comes from input (o + 0.5 - shift) / s - 0.5.
  offset = [(0.5 - placement.dy) / s - 0.5, (0.5 - placement.dx) / s - 0.5]
  out = np.stack([ndimage.affine_transform(premult[..., c], [1 / s, 1 / s], offset, order=1,
                                           mode='constant', cval=0.0)
                  for c in range(4)], -1)
  alpha = np.clip(out[..., 3:], 0, 1)
  rgb = np.where(alpha > 0, out[..., :3] / np.maximum(alpha, 1e-12), 0)
  return np.concatenate([np.clip(rgb, 0, 1) if unit else rgb, alpha], -1).astype(rgba.dtype)
