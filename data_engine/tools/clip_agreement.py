"""Text-layer agreement by CLIP from local weights: kind `text_check`, name `clip` (CLIPModel +
CLIPProcessor), with the contract of `RuleBasedAgent.check_text`.

`__call__(layer) -> (agree, reason)`. Non-object layers, and object layers with nothing
visible, agree. Otherwise the layer is composited over mid-grey (so neither black nor white
paper colours it) and cropped to its alpha box; CLIP scores its caption (or
`template.format(label)` when it has none) against distractors `template.format(x)` for each
x in `negatives` other than its own label. The layer agrees when the caption's softmax
probability among those texts is at least `threshold`; the reason lists the probabilities.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_engine.core import register
from data_engine.tools import hf, imaging

_TOOL = "text_check 'clip'"
_GREY = 0.5


def on_grey(rgba: np.ndarray) -> np.ndarray | None:
  """The straight-alpha layer over mid-grey, cropped to its alpha > 0 box; None if empty."""
  box = imaging.mask_box(rgba[..., 3] > 0)
  if box is None:
    return None
  x0, y0, x1, y1 = box
  crop = np.asarray(rgba[y0:y1, x0:x1], np.float32)
  a = crop[..., 3:]
  return crop[..., :3] * a + _GREY * (1 - a)


@register('text_check', 'clip')
class ClipAgreement:
  """CLIP from the folder `path`; `negatives`: at least two distractor names, so one is
  left when the layer's own label is among them."""

  def __init__(self, path: str, negatives: Sequence[str], template: str = 'a photo of a {}',
               threshold: float = 0.5, device: str = 'auto'):
    from transformers import CLIPModel, CLIPProcessor
    negatives = [negatives] if isinstance(negatives, str) else list(negatives or ())
    if len(set(negatives)) < 2 or not all(isinstance(n, str) and n for n in negatives):
      raise ValueError(f'{_TOOL}: negatives must be at least two distinct names, got '
                       f'{negatives!r}')
    if '{}' not in template:
      raise ValueError(f"{_TOOL}: template {template!r} has no '{{}}' for the name")
    if not 0 < threshold <= 1:
      raise ValueError(f'{_TOOL}: threshold must be in (0, 1], got {threshold}')
    self.model, self.processor = hf.load(_TOOL, path, ('clip',), CLIPModel, CLIPProcessor, device)
    self.negatives, self.template, self.threshold = negatives, template, threshold

  def texts(self, layer) -> list[str]:
    """The caption first, then the distractors."""
    caption = layer.caption or self.template.format(layer.label or 'object')
    distractors = [self.template.format(n) for n in self.negatives if n != layer.label]
    return [caption] + [t for t in distractors if t != caption]

  def __call__(self, layer) -> tuple[bool, str]:
    if layer.kind != 'object':
      return True, ''
    image = on_grey(layer.rgba)
    if image is None:
      return True, 'nothing visible to check'
    texts = self.texts(layer)
    # Long captions are cut at CLIP's text length (77 tokens) rather than failing.
    inputs = self.processor(text=texts, images=hf.uint8(image), return_tensors='pt',
                            padding=True, truncation=True)
    logits = hf.forward(self.model, **inputs).logits_per_image[0]
    probs = hf.to_numpy(logits.float().softmax(-1))
    others = ', '.join(f'{t!r} {p:.2f}' for t, p in zip(texts[1:], probs[1:])) or 'nothing'
    agree = bool(probs[0] >= self.threshold)
    verdict = '>=' if agree else '<'
    return agree, f'CLIP p={probs[0]:.2f} {verdict} {self.threshold} for {texts[0]!r} vs {others}'
