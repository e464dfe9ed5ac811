"""Object candidates without models: connected regions of high saliency.

`saliency_boxes` thresholds a saliency map (Otsu, or a percentile), cleans it with an opening
and a closing, and keeps the connected components whose area is plausible for an object,
best first by mean saliency x sqrt(area fraction), each with its box and mask.
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
  `cleanup`: the morphology radius as a fraction of the shorter side."""

  def __init__(self, saliency='center_contrast', percentile: float | None = None,
               cleanup: float = 0.02, min_area_frac: float = 0.005, max_area_frac: float = 0.9,
               max_objects: int = 5, label: str = 'object'):
    self.saliency = create('saliency', saliency)
    self.percentile, self.cleanup = percentile, cleanup
    self.min_area_frac, self.max_area_frac = min_area_frac, max_area_frac
    self.max_objects, self.label = max_objects, label

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
      mask = labels == i
      x, y, w, h = stats[i, :4]
      score = float(sal[mask].mean() * np.sqrt(area / total))
      found.append(Detection((int(x), int(y), int(x + w), int(y + h)), score, self.label, mask))
    found.sort(key=lambda d: -d.score)
    return found[:self.max_objects]
