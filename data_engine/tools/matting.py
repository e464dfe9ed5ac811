"""Alpha matting without models: pymatting's `closed_form` and `knn` from a mask's trimap, and
foreground colours by multilevel estimation (`estimate_foreground_ml`).

The trimap (`trimap`) is the mask eroded by `band` px (sure foreground), the mask dilated by
`band` px minus that (unknown) and the rest (sure background). pymatting is slow on big
images, so it runs on the crop around the mask plus `context` px and is pasted back: alpha
is 0 outside the crop and the foreground there is the photo.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from pymatting import estimate_alpha_cf, estimate_alpha_knn, estimate_foreground_ml

from data_engine.core import register
from data_engine.tools import imaging


def trimap(mask: np.ndarray, band: int) -> np.ndarray:
  """1 on the mask eroded by `band`, 0.5 on the band either side of its outline, else 0."""
  mask = np.asarray(mask, bool)
  sure = imaging.erode(mask, band)
  unknown = imaging.dilate(mask, band) & ~sure
  return np.where(sure, 1.0, np.where(unknown, 0.5, 0.0)).astype(np.float32)


class _PyMatting:
  estimate: Callable[[np.ndarray, np.ndarray], np.ndarray]   # pymatting's alpha solver

  def __init__(self, band: int = 6, context: int = 12):
    self.band, self.context = band, context

  def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(mask, bool)
    alpha = np.zeros(mask.shape, np.float32)
    foreground = np.array(image, np.float32)
    crop = imaging.crop_around(mask, self.band + self.context)
    if crop is None:
      return alpha, foreground
    rgb = foreground[crop].astype(np.float64)
    # A thin object (a rocket, a pole) keeps a sure core: the band is at most a third of
    # its half-thickness.
    half = ndimage.distance_transform_edt(np.pad(mask[crop], 1)).max()
    band = max(1, min(self.band, int(half // 3)))
    tri = trimap(mask[crop], band).astype(np.float64)
    if (tri == 1).any() and (tri == 0).any():
      # The solvers only approximately hold the known pixels (KNN's are soft constraints).
      a = np.where(tri == 0.5, np.clip(self.estimate(rgb, tri), 0, 1), tri)
    else:
      # Too thin to keep a sure core, or no background in view: nothing to solve for.
      a = mask[crop].astype(np.float64)
    alpha[crop] = a
    foreground[crop] = np.clip(estimate_foreground_ml(rgb, a), 0, 1)
    return alpha, foreground


@register('matting', 'closed_form')
class ClosedForm(_PyMatting):
  """Levin et al.'s closed-form matting on the trimap (`band` px either side of the mask)."""
  estimate = staticmethod(estimate_alpha_cf)


@register('matting', 'knn')
class Knn(_PyMatting):
  """KNN matting (Chen et al.) on the trimap (`band` px either side of the mask)."""
  estimate = staticmethod(estimate_alpha_knn)
