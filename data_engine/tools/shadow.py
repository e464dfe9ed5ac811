"""Cast shadows without models: where an object darkens a shadow-free background, and the
exact layer that reproduces it.

`shadow_layer(image, background, mask)` solves, inside `mask`, for an opacity s (one per
pixel, from the mean channel ratio) and a colour C with s*C + (1 - s)*background == image
wherever C lands in [0, 1]. The `ratio` backend finds the mask: pixels below and beside the
object whose luminance falls under `1 - min_darkening` times the background's, in components
that reach the object.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from data_engine.core import register
from data_engine.tools import imaging
from data_engine.tools.types import ShadowEstimate

_MAX_OPACITY = 0.95   # a fully opaque shadow would hide the background it darkens
_EPS = 1e-6


def shadow_layer(image: np.ndarray, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """RGBA [H, W, 4] float32: zero outside `mask`; inside, s = 1 - mean_c(image / background)
  clipped to [0, 0.95] and C = (image - (1 - s) * background) / s clipped to [0, 1]."""
  image = np.asarray(image, np.float64)
  background = np.asarray(background, np.float64)
  mask = np.asarray(mask, bool)
  ratio = (image / np.maximum(background, _EPS)).mean(-1)
  s = np.where(mask, np.clip(1 - ratio, 0, _MAX_OPACITY), 0)
  colour = (image - (1 - s[..., None]) * background) / np.maximum(s[..., None], _EPS)
  colour = np.where(s[..., None] > 0, np.clip(colour, 0, 1), 0)
  return np.concatenate([colour, s[..., None]], -1).astype(np.float32)


@register('shadow', 'ratio')
class Ratio:
  """Looks in the object's box grown by `side` of its width either side and `below` of its
  height downwards; a pixel is shadow where the luminance ratio image / background, blurred
  by `sigma` px, is under 1 - `min_darkening`. Components smaller than `min_area` px are
  dropped and the rest kept if they come within `near` of the object's height of it."""

  layer = staticmethod(shadow_layer)

  def __init__(self, min_darkening: float = 0.1, below: float = 0.5, side: float = 0.25,
               near: float = 0.05, sigma: float = 1.0, min_area: int = 16):
    self.min_darkening, self.below, self.side = min_darkening, below, side
    self.near, self.sigma, self.min_area = near, sigma, min_area

  def __call__(self, image: np.ndarray, background: np.ndarray,
               alpha: np.ndarray) -> ShadowEstimate:
    h, w = image.shape[:2]
    obj = np.asarray(alpha) > 0.5
    box = imaging.mask_box(obj)
    if box is None:
      return ShadowEstimate(np.zeros((h, w), bool), np.zeros((h, w), np.float32),
                            np.zeros(3, np.float32))
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    search = imaging.box_mask((x0 - round(self.side * bw), y0, x1 + round(self.side * bw),
                               y1 + round(self.below * bh)), image.shape)
    search &= ~(np.asarray(alpha) > 0)
    ratio = imaging.grey(image) / np.maximum(imaging.grey(background), _EPS)
    if self.sigma > 0:
      ratio = cv2.GaussianBlur(ratio, (0, 0), self.sigma)
    dark = search & (ratio < 1 - self.min_darkening)
    dark = ndimage.binary_fill_holes(ndimage.binary_opening(dark)) & search
    labels, n = ndimage.label(dark)
    reach = imaging.dilate(obj, max(2, round(self.near * bh)))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    touching = np.unique(labels[reach & dark])
    keep = [i for i in touching if i and areas[i] >= self.min_area]
    mask = np.isin(labels, keep)
    rgba = shadow_layer(image, background, mask)
    opacity = rgba[..., 3]
    weight = opacity.sum()
    colour = ((rgba[..., :3] * opacity[..., None]).sum((0, 1)) / weight if weight > 0
              else np.zeros(3))
    return ShadowEstimate(mask, opacity, colour.astype(np.float32))
