"""Image quality numbers for the pre-filter: sharpness, clipping, contrast, brightness."""

from __future__ import annotations

import cv2
import numpy as np

from data_engine.core import register
from data_engine.tools import imaging


@register('quality', 'classical')
class Classical:
  """`sharpness`: variance of the Laplacian of the grey image shrunk to at most `size` px (so
  a photo's resolution doesn't decide it); `clipped`: the fraction of pixels at most `dark`
  or at least `bright` (also given apart); `contrast`: std of luminance; `brightness`: its
  mean."""

  def __init__(self, size: int = 512, dark: float = 2 / 255, bright: float = 253 / 255):
    self.size, self.dark, self.bright = size, dark, bright

  def __call__(self, image: np.ndarray) -> dict[str, float]:
    y = imaging.grey(image)
    small = imaging.resize(y, imaging.fit_size(y.shape, self.size))
    dark, bright = float((y <= self.dark).mean()), float((y >= self.bright).mean())
    return {'sharpness': float(cv2.Laplacian(small, cv2.CV_32F).var()),
            'clipped': dark + bright, 'clipped_dark': dark, 'clipped_bright': bright,
            'contrast': float(y.std()), 'brightness': float(y.mean())}
