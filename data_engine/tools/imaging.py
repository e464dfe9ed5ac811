"""Image helpers the offline tools share: colour conversions, boxes, masks and components.

Images are float32 RGB [H, W, 3] in [0, 1]; OpenCV's uint8 / BGR appear only in `bgr_u8`.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]


def bgr_u8(image: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def grey(image: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.ascontiguousarray(image, np.float32), cv2.COLOR_RGB2GRAY)


def lab(image: np.ndarray) -> np.ndarray:
  """CIE Lab (L in [0, 100]) of an sRGB image, float32."""
  return cv2.cvtColor(np.ascontiguousarray(np.clip(image, 0, 1), np.float32), cv2.COLOR_RGB2Lab)


def normalise(x: np.ndarray) -> np.ndarray:
  """Min-max to [0, 1] float32; a constant map becomes zeros."""
  x = np.asarray(x, np.float32)
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`x` at (width, height): area averaging to shrink, bilinear to grow."""
  shrink = size[0] * size[1] < x.shape[0] * x.shape[1]
  return cv2.resize(x, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_size(shape: tuple[int, ...], longest: int, grow: bool = False) -> tuple[int, int]:
  """(width, height) with the longest side at most `longest` (exactly, with `grow`), keeping
  the aspect ratio."""
  h, w = shape[:2]
  s = longest / max(h, w) if grow else min(1.0, longest / max(h, w))
  return max(1, round(w * s)), max(1, round(h * s))


def disk(radius: int) -> np.ndarray:
  return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
  if radius <= 0:
    return mask.copy()
  # OpenCV's default border: the frame's edge is not an edge of the mask.
  return cv2.erode(mask.astype(np.uint8), disk(radius)).astype(bool)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  if radius <= 0:
    return mask.copy()
  return cv2.dilate(mask.astype(np.uint8), disk(radius)).astype(bool)


def mask_box(mask: np.ndarray) -> Box | None:
  """The end-exclusive bounding box of a mask, or None for an empty one."""
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return None
  return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pad_box(box: Box, shape: tuple[int, ...], margin: float = 0.0, pixels: int = 0) -> Box:
  """`box` grown by `margin` of its size plus `pixels` on each side, clipped to the image."""
  x0, y0, x1, y1 = box
  px = round(margin * (x1 - x0)) + pixels
  py = round(margin * (y1 - y0)) + pixels
  h, w = shape[:2]
  return max(0, x0 - px), max(0, y0 - py), min(w, x1 + px), min(h, y1 + py)


def box_mask(box: Box, shape: tuple[int, ...]) -> np.ndarray:
  m = np.zeros(shape[:2], bool)
  x0, y0, x1, y1 = box
  m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
  return m


def component_at(mask: np.ndarray, box: Box) -> np.ndarray:
  """The hole-filled connected component of `mask` containing the box centre, else the one
  nearest to it; all False when `mask` is empty."""
  labels, n = ndimage.label(ndimage.binary_fill_holes(mask))
  if n == 0:
    return np.zeros(mask.shape, bool)
  cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
  h, w = mask.shape
  pick = labels[min(cy, h - 1), min(cx, w - 1)]
  if not pick:
    ys, xs = np.nonzero(labels)
    pick = labels[ys, xs][np.argmin(np.hypot(ys - cy, xs - cx))]
  return labels == pick


def crop_around(mask: np.ndarray, pixels: int) -> tuple[slice, slice] | None:
  """Slices of the mask's bounding box grown by `pixels`, or None for an empty mask."""
  box = mask_box(mask)
  if box is None:
    return None
  x0, y0, x1, y1 = pad_box(box, mask.shape, pixels=pixels)
  return slice(y0, y1), slice(x0, x1)
