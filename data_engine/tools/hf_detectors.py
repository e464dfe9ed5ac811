"""Open-vocabulary detectors from local transformers weights: `owlv2` and `grounding_dino`.

Both take text queries (`labels`), run the model on the photo and decode with the processor's
own post-processing at the photo's size, so boxes are in photo pixels. Boxes are then made
integer and end-exclusive (x0, y0 rounded down, x1, y1 up), clipped to the photo; boxes with
no area left are dropped; the `max_objects` best by score are kept. Neither removes duplicate
boxes: wrap them in the `ensemble` detector to fuse overlapping ones.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from data_engine.core import register
from data_engine.tools import hf
from data_engine.tools.types import Detection


def detections(boxes: np.ndarray, scores: np.ndarray, labels: Sequence[str],
               shape: tuple[int, ...], max_objects: int) -> list[Detection]:
  """Float (x0, y0, x1, y1) pixel boxes as integer end-exclusive Detections, best first."""
  h, w = shape[:2]
  found = []
  for (x0, y0, x1, y1), score, label in zip(np.asarray(boxes, np.float64), scores, labels):
    box = (int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h)),
           int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h)))
    if box[2] > box[0] and box[3] > box[1]:
      found.append(Detection(box, float(score), label))
  found.sort(key=lambda d: -d.score)
  return found[:max_objects]


def _check_labels(tool: str, labels, no_dots: bool = False) -> list[str]:
  labels = [labels] if isinstance(labels, str) else list(labels or ())
  if not labels or not all(isinstance(l, str) and l.strip() for l in labels):
    raise ValueError(f'{tool}: labels must be a non-empty list of texts, got {labels!r}')
  if no_dots and any('.' in l for l in labels):
    # Grounding DINO's prompt is the labels joined by '. ': a dot inside one would split it.
    raise ValueError(f'{tool}: labels may not contain dots, got {labels!r}')
  return labels


@register('detector', 'owlv2')
class Owlv2:
  """OWLv2 (Owlv2ForObjectDetection + Owlv2Processor) from the folder `path`: each box scores
  its best text query, which becomes its label; boxes scoring at most `threshold` are
  dropped."""

  def __init__(self, path: str, labels: Sequence[str], threshold: float = 0.1,
               device: str = 'auto', max_objects: int = 10):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    tool = "detector 'owlv2'"
    self.labels = _check_labels(tool, labels)
    self.model, self.processor = hf.load(tool, path, ('owlv2',), Owlv2ForObjectDetection,
                                         Owlv2Processor, device)
    self.threshold, self.max_objects = threshold, max_objects

  def __call__(self, image: np.ndarray) -> list[Detection]:
    inputs = self.processor(text=[self.labels], images=hf.uint8(image), return_tensors='pt')
    outputs = hf.forward(self.model, **inputs)
    result = self.processor.post_process_grounded_object_detection(
        outputs, threshold=self.threshold, target_sizes=[image.shape[:2]],
        text_labels=[self.labels])[0]
    return detections(hf.to_numpy(result['boxes']), hf.to_numpy(result['scores']),
                      result['text_labels'], image.shape, self.max_objects)


def match_label(phrase: str, labels: Sequence[str]) -> str:
  """The label most of whose words the decoded phrase contains (first on a tie), or '' when
  it contains none: Grounding DINO's phrase is the tokens above the text threshold, which may
  span several labels or only part of one."""
  words = set(re.findall(r'\w+', phrase.lower()))
  best, best_cover = '', 0.0
  for label in labels:
    own = re.findall(r'\w+', label.lower())
    cover = sum(w in words for w in own) / max(1, len(own))
    if cover > best_cover:
      best, best_cover = label, cover
  return best


@register('detector', 'grounding_dino')
class GroundingDino:
  """Grounding DINO (GroundingDinoForObjectDetection + GroundingDinoProcessor) from the folder
  `path`, prompted with the labels joined as 'a. b.'; boxes scoring at most `threshold` are
  dropped, and a box's label is the query matching the tokens scoring over `text_threshold`
  (`match_label`)."""

  def __init__(self, path: str, labels: Sequence[str], threshold: float = 0.25,
               text_threshold: float = 0.25, device: str = 'auto', max_objects: int = 10):
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor
    tool = "detector 'grounding_dino'"
    self.labels = _check_labels(tool, labels, no_dots=True)
    self.model, self.processor = hf.load(tool, path, ('grounding-dino',),
                                         GroundingDinoForObjectDetection, GroundingDinoProcessor,
                                         device)
    self.threshold, self.text_threshold, self.max_objects = threshold, text_threshold, max_objects

  def __call__(self, image: np.ndarray) -> list[Detection]:
    inputs = self.processor(images=hf.uint8(image), text=self.labels, return_tensors='pt')
    outputs = hf.forward(self.model, **inputs)
    result = self.processor.post_process_grounded_object_detection(
        outputs, inputs['input_ids'], threshold=self.threshold,
        text_threshold=self.text_threshold, target_sizes=[image.shape[:2]])[0]
    labels = [match_label(p, self.labels) for p in result['text_labels']]
    return detections(hf.to_numpy(result['boxes']), hf.to_numpy(result['scores']), labels,
                      image.shape, self.max_objects)
