"""Inpainting without models: fill `mask` from its surroundings.

`telea` and `navier_stokes` are OpenCV's (run per channel in float32, so nothing is
quantised); `biharmonic` is scikit-image's smooth fill, run on a shrunken crop when the hole
is large. Every backend works on the crop around the hole and returns the image with pixels
outside `mask` bit-identical: later stages check that the photo survives exactly.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.restoration import inpaint_biharmonic

from data_engine.core import register
from data_engine.tools import imaging


def _fill(image: np.ndarray, mask: np.ndarray, pad: int, fill) -> np.ndarray:
  """`image` with `mask` replaced by `fill(crop, crop_mask)`, computed on the crop around the
  mask grown by `pad`; float32, exact outside the mask."""
  out = np.array(image, np.float32)
  mask = np.asarray(mask, bool)
  crop = imaging.crop_around(mask, pad)
  if crop is None:
    return out
  filled = fill(out[crop], mask[crop])
  out[crop][mask[crop]] = np.clip(filled[mask[crop]], 0, 1)
  return out


class _OpenCVInpainter:
  method: int

  def __init__(self, radius: int = 3):
    self.radius = radius

  def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    def fill(crop, hole):
      hole = hole.astype(np.uint8)
      # OpenCV's float path expects the 8-bit value range (it misbehaves on [0, 1]).
      return np.stack([cv2.inpaint(np.ascontiguousarray(crop[..., c] * 255), hole, self.radius,
                                   self.method) for c in range(crop.shape[-1])], -1) / 255
    # Both methods read only pixels within `radius` of the hole.
    return _fill(image, mask, self.radius + 2, fill)


@register('inpainter', 'telea')
class Telea(_OpenCVInpainter):
  """Telea's fast-marching fill, `radius` px of context."""
  method = cv2.INPAINT_TELEA


@register('inpainter', 'navier_stokes')
class NavierStokes(_OpenCVInpainter):
  """Bertalmio's Navier-Stokes fill, `radius` px of context."""
  method = cv2.INPAINT_NS


@register('inpainter', 'biharmonic')
class Biharmonic:
  """Biharmonic fill with `margin` px of context; crops longer than `max_side` px are solved
  at that size and the fill is scaled back into the hole."""

  def __init__(self, margin: int = 8, max_side: int = 128):
    self.margin, self.max_side = margin, max_side

  def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    def fill(crop, hole):
      h, w = hole.shape
      size = imaging.fit_size(hole.shape, self.max_side)
      if size == (w, h):
        return inpaint_biharmonic(crop, hole, channel_axis=-1)
      # Any hole pixel under a shrunken pixel makes it a hole: no object colour leaks in.
      small_hole = imaging.resize(hole.astype(np.float32), size) > 0
      small = inpaint_biharmonic(imaging.resize(crop, size), small_hole, channel_axis=-1)
      return imaging.resize(small.astype(np.float32), (w, h))
    return _fill(image, mask, self.margin, fill)
