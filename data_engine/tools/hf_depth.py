"""Monocular depth from local transformers weights: `depth_anything` (Depth Anything V1/V2,
DepthAnythingForDepthEstimation + DPTImageProcessor).

The model predicts relative inverse depth (larger = nearer). `__call__(image)` resizes it to
the photo with the processor's `post_process_depth_estimation` (bicubic) and min-max
normalises it to nearness in [0, 1]. `order(masks, image)` sorts objects back to front by
the median nearness under each mask in the photo's depth map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_engine.core import register
from data_engine.tools import hf, imaging


@register('depth', 'depth_anything')
class DepthAnything:
  """Depth Anything from the folder `path`."""

  def __init__(self, path: str, device: str = 'auto'):
    from transformers import DepthAnythingForDepthEstimation, DPTImageProcessor
    self.model, self.processor = hf.load("depth 'depth_anything'", path, ('depth_anything',),
                                         DepthAnythingForDepthEstimation, DPTImageProcessor,
                                         device)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    inputs = self.processor(images=hf.uint8(image), return_tensors='pt')
    outputs = hf.forward(self.model, pixel_values=inputs['pixel_values'])
    depth = self.processor.post_process_depth_estimation(
        outputs, target_sizes=[image.shape[:2]])[0]['predicted_depth']
    return imaging.normalise(hf.to_numpy(depth).reshape(image.shape[:2]))

  def order(self, masks: Sequence[np.ndarray], image: np.ndarray) -> list[int]:
    """Indices back to front by median nearness under each mask in `image`'s depth map; on a
    tie the smaller mask is in front. Empty masks go first."""
    near = self(image)

    def key(i):
      m = np.asarray(masks[i], bool)
      return (float(np.median(near[m])) if m.any() else -1.0, -int(m.sum()))
    return sorted(range(len(masks)), key=key)
