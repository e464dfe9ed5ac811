"""Whole-scene decomposition with an automatic layer count: propose, order, peel.

Object proposals come from the data engine's detector tools (`data_engine.core.create`:
the offline `saliency_boxes` by default; `owlv2` / `grounding_dino` with local weights),
ordered front to back by its depth tool (`order`, the offline ground-plane prior by
default; `depth_anything` with local weights), near-duplicates dropped. The decomposer then
peels them one at a time, as LayerD peels its top layer: the front object is decomposed
from the photo with its box as the prompt, the next one from the completed background that
leaves, and so on, until no proposal above `threshold` is left or `max_layers` objects are
out. The layers are solved exactly against the photo at the end (`postprocess.exact_layers`):
background, then each object with its shadow, back to front.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from layerjax.data.schema import LayeredSample, Prompt, assemble
from layerjax.infer import postprocess as post
from layerjax.infer.prompts import PromptError, Query

MAX_LAYERS = 8  # objects in whole-scene mode when the caller sets no limit


def box_iou(a, b) -> float:
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union else 0.0


@dataclasses.dataclass
class Proposals:
  """Objects of a photo, front to back. `detector` and `depth`: engine tool specs (a
  registered name or a dict with `name` and its arguments) or built tools (a detector is
  `image -> [Detection]`, a depth tool has `order(masks, image)`); `threshold`: the lowest
  detection score kept; `duplicate_iou`: a box overlapping a kept one more is dropped."""
  detector: Any = 'saliency_boxes'
  depth: Any = 'vertical_prior'
  threshold: float = 0.05
  duplicate_iou: float = 0.7

  def __post_init__(self):
    from data_engine import core
    if isinstance(self.detector, (str, dict)):
      self.detector = core.create('detector', self.detector)
    if isinstance(self.depth, (str, dict)):
      self.depth = core.create('depth', self.depth)

  def __call__(self, image: np.ndarray) -> tuple[list, int]:
    """(the kept detections front to back, how many the detector returned)."""
    found = list(self.detector(image))
    h, w = image.shape[:2]
    kept = []
    for det in sorted(found, key=lambda d: -d.score):
      x0, y0, x1, y1 = (int(v) for v in det.box)
      box = (max(0, x0), max(0, y0), min(w, x1), min(h, y1))
      if det.score < self.threshold or box[2] <= box[0] or box[3] <= box[1]:
        continue
      if any(box_iou(box, k.box) > self.duplicate_iou for k in kept):
        continue
      kept.append(dataclasses.replace(det, box=box))
    if not kept:
      return [], len(found)
    masks = []
    for det in kept:
      if det.mask is not None and np.asarray(det.mask).shape == (h, w):
        masks.append(np.asarray(det.mask, bool))
      else:
        m = np.zeros((h, w), bool)
        m[det.box[1]:det.box[3], det.box[0]:det.box[2]] = True
        masks.append(m)
    back_to_front = self.depth.order(masks, image)
    return [kept[i] for i in reversed(back_to_front)], len(found)


def peel(decomposer, photo: np.ndarray, proposals: Proposals, max_layers: int | None,
         settings: dict, sample_id: str, noise=None) -> LayeredSample:
  """The whole scene of `photo` as a `LayeredSample` (see the module docstring); `settings`
  and `noise` as `Decomposer.extract` takes them."""
  if max_layers is not None and max_layers < 1:
    raise ValueError(f'max_layers must be >= 1, got {max_layers}')
  if 'box' not in decomposer.settings.kinds:
    raise PromptError('whole-scene mode prompts each proposal with its box, but this model '
                      f'was trained with prompt kinds {sorted(decomposer.settings.kinds)} only')
  limit = max_layers or MAX_LAYERS
  t0 = time.perf_counter()
  found, detected = proposals(photo)
  found = found[:limit]
  t_propose = time.perf_counter() - t0
  current = photo
  peeled = []  # front to back
  timings = {'proposals': t_propose, 'sampling': 0.0, 'decoding': 0.0, 'postprocess': 0.0}
  for det in found:
    raw = decomposer.extract(current, Query(box=det.box), **settings, noise=noise)
    raw.obj.label = det.label or 'object'
    covered = raw.obj.alpha > 0
    if raw.obj.shadow is not None:
      covered |= raw.obj.shadow[..., 3] > 0
    current = np.where(covered[..., None], raw.background, current)
    for k in ('sampling', 'decoding', 'postprocess'):
      timings[k] += raw.provenance['timings'][k]
    peeled.append((det, raw))
  t1 = time.perf_counter()
  layers, repaired = post.exact_layers(photo, current, [r.obj for _, r in reversed(peeled)])
  objects = [l.name for l in layers if l.kind == 'object']  # back to front
  prov = {'model': decomposer.backend.source, 'step': decomposer.backend.step, **settings,
          'size': list(photo.shape[:2]), 'repaired_pixels': repaired,
          'whole_scene': {'detected': detected, 'threshold': proposals.threshold,
                          'max_layers': limit, 'objects': []}}
  for name, (det, raw) in zip(objects, reversed(peeled)):
    prov['whole_scene']['objects'].append(
        {'layer': name, 'box': list(det.box), 'score': float(det.score), 'label': det.label,
         **{k: v for k, v in raw.provenance.items() if k != 'timings'}})
  sample = assemble(sample_id, layers, prov, prompts=False)
  for name, (det, _) in zip(objects, reversed(peeled)):
    sample.prompts.append(Prompt(name, box=det.box))
  timings['postprocess'] += time.perf_counter() - t1
  timings['total'] = time.perf_counter() - t0
  sample.provenance['timings'] = timings
  return sample.validate()
