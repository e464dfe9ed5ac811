"""Box-prompted segmentation without models: `grabcut` and `watershed`, [H, W] bool.

Both grow the box by `margin` (detector boxes are tight and GrabCut treats everything
outside as background), use a saliency map as a soft prior, and return the hole-filled
connected component at (or nearest) the box centre. Large photos are segmented on a copy
at most `size` px long and the mask is scaled back.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.core import create, register
from data_engine.tools import imaging


def _at_size(segment, image: np.ndarray, box, size: int) -> np.ndarray:
  """Runs `segment(image, box)` on a copy at most `size` px long; the mask at full size."""
  h, w = image.shape[:2]
  sw, sh = imaging.fit_size(image.shape, size)
  if (sw, sh) == (w, h):
    return segment(image, box)
  sx, sy = sw / w, sh / h
  small_box = (int(box[0] * sx), int(box[1] * sy), max(int(box[0] * sx) + 1, round(box[2] * sx)),
               max(int(box[1] * sy) + 1, round(box[3] * sy)))
  mask = segment(imaging.resize(image, (sw, sh)), small_box)
  return imaging.resize(mask.astype(np.float32), (w, h)) > 0.5


@register('segmenter', 'grabcut')
class GrabCut:
  """OpenCV GrabCut from the grown box, `iterations` rounds. With `saliency` (a spec, or
  None for the plain box), box pixels below `low` saliency start as probable background;
  `seed` fixes OpenCV's k-means initialisation."""

  def __init__(self, iterations: int = 5, margin: float = 0.05, saliency='center_contrast',
               low: float = 0.2, size: int = 320, seed: int = 0):
    self.iterations, self.margin, self.low, self.size, self.seed = (
        iterations, margin, low, size, seed)
    self.saliency = create('saliency', saliency) if saliency else None

  def __call__(self, image: np.ndarray, box) -> np.ndarray:
    return _at_size(self._segment, image, box, self.size)

  def _segment(self, image: np.ndarray, box) -> np.ndarray:
    grown = imaging.pad_box(box, image.shape, self.margin)
    inside = imaging.box_mask(grown, image.shape)
    labels = np.where(inside, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    if self.saliency is not None:
      labels[inside & (self.saliency(image) < self.low)] = cv2.GC_PR_BGD
    if not (labels != cv2.GC_PR_FGD).any():
      # A whole-image box leaves no background to model: the frame's edge stands in.
      labels[[0, -1], :] = labels[:, [0, -1]] = cv2.GC_PR_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(self.seed)
    cv2.grabCut(imaging.bgr_u8(image), labels, None, bgd, fgd, self.iterations,
                cv2.GC_INIT_WITH_MASK)
    return imaging.component_at((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD), box)


@register('segmenter', 'watershed')
class Watershed:
  """Marker watershed: sure foreground = box pixels with saliency >= `high`, eroded by
  `erode` (a fraction of the box's shorter side); sure background = outside the grown box
  and, inside it, saliency below `low`."""

  def __init__(self, saliency='center_contrast', margin: float = 0.05, high: float = 0.5,
               low: float = 0.1, erode: float = 0.1, size: int = 320):
    self.saliency = create('saliency', saliency)
    self.margin, self.high, self.low, self.erode, self.size = margin, high, low, erode, size

  def __call__(self, image: np.ndarray, box) -> np.ndarray:
    return _at_size(self._segment, image, box, self.size)

  def _segment(self, image: np.ndarray, box) -> np.ndarray:
    sal = self.saliency(image)
    inside = imaging.box_mask(box, image.shape)
    grown = imaging.box_mask(imaging.pad_box(box, image.shape, self.margin), image.shape)
    r = round(self.erode * min(box[2] - box[0], box[3] - box[1]))
    fg = inside & (sal >= self.high * sal[inside].max())
    sure_fg = imaging.erode(fg, r)
    if not sure_fg.any():
      sure_fg = fg
    sure_bg = ~grown | imaging.erode(sal < self.low, r)
    markers = np.zeros(sal.shape, np.int32)
    markers[sure_bg] = 1
    markers[sure_fg] = 2
    cv2.watershed(imaging.bgr_u8(image), markers)
    return imaging.component_at(markers == 2, box)
