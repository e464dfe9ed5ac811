"""Box-prompted segmentation without models: `grabcut` and `watershed`, [H, W] bool.

Both work on a copy `size` px long (so pixel-scale options mean the same for every photo),
see it mean-shift filtered so that texture such as fur doesn't split an object, grow the box
by `margin` (detector boxes are tight; outside the grown box is background), use a saliency
map as a prior, and return the hole-filled connected component at (or nearest) the box
centre, scaled back to the photo.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.core import create, register
from data_engine.tools import imaging


class _BoxSegmenter:
  """Shared options: `saliency` (a spec for `create`), `margin` (a fraction of the box),
  `low` (saliency under which a box pixel is probably background), mean-shift `shift_radius`
  px and `shift_colour` levels (radius 0 = off), and the working `size`."""

  def __init__(self, saliency='boundary_connectivity', margin: float = 0.1, low: float = 0.1,
               shift_radius: int = 8, shift_colour: int = 16, size: int = 320):
    self.saliency = create('saliency', saliency)
    self.margin, self.low, self.size = margin, low, size
    self.shift_radius, self.shift_colour = shift_radius, shift_colour

  def __call__(self, image: np.ndarray, box) -> np.ndarray:
    h, w = image.shape[:2]
    sw, sh = imaging.fit_size(image.shape, self.size, grow=True)
    sx, sy = sw / w, sh / h
    x0, y0 = min(int(box[0] * sx), sw - 1), min(int(box[1] * sy), sh - 1)
    small_box = (x0, y0, max(x0 + 1, round(box[2] * sx)), max(y0 + 1, round(box[3] * sy)))
    small = imaging.resize(np.asarray(image, np.float32), (sw, sh))
    mask = self._segment(small, small_box)
    return imaging.resize(mask.astype(np.float32), (w, h)) > 0.5

  def _flattened(self, image: np.ndarray) -> np.ndarray:
    bgr = imaging.bgr_u8(image)
    if self.shift_radius > 0:
      bgr = cv2.pyrMeanShiftFiltering(bgr, self.shift_radius, self.shift_colour)
    return bgr


@register('segmenter', 'grabcut')
class GrabCut(_BoxSegmenter):
  """OpenCV GrabCut, `iterations` rounds: outside the grown box is background, inside it is
  probable foreground except where saliency is under `low` (probable background). `seed`
  fixes OpenCV's k-means initialisation."""

  def __init__(self, iterations: int = 5, seed: int = 0, **options):
    super().__init__(**options)
    self.iterations, self.seed = iterations, seed

  def _segment(self, image: np.ndarray, box) -> np.ndarray:
    inside = imaging.box_mask(imaging.pad_box(box, image.shape, self.margin), image.shape)
    labels = np.where(inside, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    weak = inside & (self.saliency(image) < self.low)
    if (inside & ~weak).any():
      labels[weak] = cv2.GC_PR_BGD
    if not (labels != cv2.GC_PR_FGD).any():
      # A whole-image box leaves no background to model: the frame's edge stands in.
      labels[[0, -1], :] = labels[:, [0, -1]] = cv2.GC_PR_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(self.seed)
    cv2.grabCut(self._flattened(image), labels, None, bgd, fgd, self.iterations,
                cv2.GC_INIT_WITH_MASK)
    return imaging.component_at((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD), box)


@register('segmenter', 'watershed')
class Watershed(_BoxSegmenter):
  """Marker watershed: sure foreground = the box's salient blob (saliency >= `high` times the
  box's upper quartile, the piece at the box centre) eroded by `erode` of the box's shorter
  side; sure background = outside the grown box and, inside it, saliency under `low`."""

  def __init__(self, high: float = 0.5, erode: float = 0.05, **options):
    super().__init__(**options)
    self.high, self.erode = high, erode

  def _segment(self, image: np.ndarray, box) -> np.ndarray:
    sal = self.saliency(image)
    inside = imaging.box_mask(box, image.shape)
    grown = imaging.box_mask(imaging.pad_box(box, image.shape, self.margin), image.shape)
    r = round(self.erode * min(box[2] - box[0], box[3] - box[1]))
    # The quartile, not the maximum: a few very salient pixels (eyes) mustn't set the level.
    level = self.high * np.percentile(sal[inside], 75)
    blob = imaging.component_at(inside & (sal >= level), box)
    sure_fg = imaging.erode(blob, r)
    if not sure_fg.any():
      sure_fg = blob
    markers = np.zeros(sal.shape, np.int32)
    markers[~grown | imaging.erode(sal < self.low, r)] = 1
    markers[sure_fg] = 2
    cv2.watershed(self._flattened(image), markers)
    return imaging.component_at(markers == 2, box)
