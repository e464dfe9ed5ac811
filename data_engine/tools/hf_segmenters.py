"""Box-prompted segmentation from local transformers weights: `sam` (SamModel + SamProcessor).

The box is the prompt; SAM's multimask output gives three candidate masks, and the one with
the highest predicted IoU is kept, upscaled to the photo by the processor's
`post_process_masks` and thresholded at `mask_threshold` on the logits.

SAM 2 (Sam2Model + Sam2Processor) is absent: its image processor needs torchvision, which
the engine's environment lacks.
"""

from __future__ import annotations

import numpy as np

from data_engine.core import register
from data_engine.tools import hf


@register('segmenter', 'sam')
class Sam:
  """SAM from the folder `path`; `__call__(image, box)` -> bool mask [H, W]."""

  def __init__(self, path: str, device: str = 'auto', mask_threshold: float = 0.0):
    from transformers import SamModel, SamProcessor
    self.model, self.processor = hf.load("segmenter 'sam'", path, ('sam',), SamModel,
                                         SamProcessor, device)
    self.mask_threshold = mask_threshold

  def __call__(self, image: np.ndarray, box) -> np.ndarray:
    inputs = self.processor(images=hf.uint8(image), input_boxes=[[[float(v) for v in box]]],
                            return_tensors='pt')
    outputs = hf.forward(self.model, pixel_values=inputs['pixel_values'],
                         input_boxes=inputs['input_boxes'], multimask_output=True)
    masks = self.processor.post_process_masks(
        outputs.pred_masks.float().cpu(), inputs['original_sizes'], inputs['reshaped_input_sizes'],
        mask_threshold=self.mask_threshold)[0]                 # [boxes, candidates, H, W]
    best = int(outputs.iou_scores[0, 0].argmax())
    return hf.to_numpy(masks[0, best]).astype(bool)
