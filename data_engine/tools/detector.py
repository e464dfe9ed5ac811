"""Object candidates without models: connected regions of high saliency.

`saliency_boxes` thresholds a saliency map (Otsu, or a percentile), cleans it with an opening
and a closing, and keeps the connected components whose area is plausible for an object,
best first by mean saliency x sqrt(area fraction), each with its box and mask (no class
label: nothing here knows one). Each component is trimmed by an opening scaled to its own
size, so that thin salient things it touches (a rim, a stripe of a flag) don't stretch its
box.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.core import create, register
from data_engine.tools import imaging
from data_engine.tools.types import Detection


@register('detector', 'saliency_boxes')
class SaliencyBoxes:
  """`saliency`: a saliency spec for `create`; `percentile` None = Otsu's threshold;
  `cleanup`: the morphology radius as a fraction of the shorter side; `trim`: the radius of
  each component's own opening as a fraction of the square root of its area."""

  def __init__(self, saliency='boundary_connectivity', percentile: float | None = None,
               cleanup: float = 0.02, trim: float = 0.05, min_area_frac: float = 0.005,
               max_area_frac: float = 0.9, max_objects: int = 5):
    self.saliency = create('saliency', saliency)
    self.percentile, self.cleanup, self.trim = percentile, cleanup, trim
    self.min_area_frac, self.max_area_frac = min_area_frac, max_area_frac
    self.max_objects = max_objects

  def __call__(self, image: np.ndarray) -> list[Detection]:
    sal = self.saliency(image)
    if self.percentile is None:
      level, _ = cv2.threshold(np.round(sal * 255).astype(np.uint8), 0, 255,
                               cv2.THRESH_BINARY + cv2.THRESH_OTSU)
      fg = sal * 255 > level
    else:
      fg = sal > np.percentile(sal, self.percentile)
    r = max(1, round(self.cleanup * min(sal.shape)))
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, imaging.disk(r))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, imaging.disk(r))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    total = sal.size
    found = []
    for i in range(1, n):
      area = stats[i, cv2.CC_STAT_AREA]
      if not self.min_area_frac * total <= area <= self.max_area_frac * total:
        continue
      mask = self._trimmed(labels == i)
      box = imaging.mask_box(mask)
      score = float(sal[mask].mean() * np.sqrt(mask.sum() / total))
      found.append(Detection(box, score, mask=mask))
    found.sort(key=lambda d: -d.score)
    return found[:self.max_objects]

  def _trimmed(self, mask: np.ndarray) -> np.ndarray:
    """The largest piece left by an opening of radius `trim` * sqrt(area); `mask` if none."""
    r = round(self.trim * np.sqrt(mask.sum()))
    if r < 1:
      return mask
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, imaging.disk(r))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n < 2:
      return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
