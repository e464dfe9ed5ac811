"""Alpha matting from local transformers weights: `vitmatte` (VitMatteForImageMatting +
VitMatteImageProcessor).

Everything but the alpha solver is the offline matting's (`matting._PyMatting`): the trimap
of the mask (`matting.trimap`, `band` px, narrowed for thin objects), the crop around the mask
plus `context` px, known trimap pixels kept exactly, foreground colours by pymatting's
`estimate_foreground_ml`, alpha 0 and the photo outside the crop. ViTMatte sees the crop in
8 bits with the trimap as 0 / 128 / 255; its output is padded to a multiple of 32 and is
cropped back.
"""

from __future__ import annotations

import numpy as np

from data_engine.core import register
from data_engine.tools import hf
from data_engine.tools.matting import _PyMatting


@register('matting', 'vitmatte')
class VitMatte(_PyMatting):
  """ViTMatte from the folder `path`; `__call__(image, mask)` -> (alpha [H, W],
  foreground [H, W, 3])."""

  def __init__(self, path: str, band: int = 6, context: int = 12, device: str = 'auto'):
    from transformers import VitMatteForImageMatting, VitMatteImageProcessor
    super().__init__(band, context)
    self.model, self.processor = hf.load("matting 'vitmatte'", path, ('vitmatte',),
                                         VitMatteForImageMatting, VitMatteImageProcessor, device)

  def estimate(self, rgb: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """Alpha [h, w] of the crop `rgb` ([h, w, 3] in [0, 1]) under `trimap` (0, 0.5, 1)."""
    h, w = trimap.shape
    inputs = self.processor(images=hf.uint8(rgb), trimaps=hf.uint8(trimap), return_tensors='pt')
    alphas = hf.forward(self.model, pixel_values=inputs['pixel_values']).alphas
    return hf.to_numpy(alphas[0, 0, :h, :w]).astype(np.float64)
