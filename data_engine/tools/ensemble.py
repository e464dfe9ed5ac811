"""The `ensemble` detector: several detectors' boxes fused into one list (RefLade ensembles
closed-set and open-vocabulary detectors; its ensemble beats each member on precision and
recall).

The merge rule, exactly:
  1. Member i's detections scoring below `thresholds[i]` are dropped (scores are not
     comparable across detectors, so each has its own threshold).
  2. The rest are sorted by score, best first (ties: member order, then each member's order).
  3. Each detection joins the first cluster whose leader (its first, best box) it overlaps
     with IoU > `iou`; otherwise it leads a new cluster. Labels do not matter here: members
     name the same object differently ('person', 'a man') or not at all.
  4. A cluster becomes one detection: its box is the score-weighted mean of its boxes, each
     coordinate rounded half up; its score is the mean over all members of each member's best
     score in the cluster (0 for a member that did not see it), so objects more detectors
     agree on rank higher; its label is that of its best-scoring detection with a non-empty
     label ('' if none has one). Masks are not carried: the fused box is new.
  5. The `max_objects` best fused detections are returned, best first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_engine.core import create, register
from data_engine.tools.types import Detection


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two (x0, y0, x1, y1) end-exclusive boxes; 0 when both are empty."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def fuse(found: Sequence[Sequence[Detection]], iou: float) -> list[Detection]:
  """Steps 2-4 of the rule on the members' kept detections (`found[i]` is member i's)."""
  ranked = sorted(((d, i) for i, dets in enumerate(found) for d in dets),
                  key=lambda pair: -pair[0].score)
  clusters: list[list[tuple[Detection, int]]] = []
  for det, member in ranked:
    home = next((c for c in clusters if box_iou(c[0][0].box, det.box) > iou), None)
    if home is None:
      clusters.append([(det, member)])
    else:
      home.append((det, member))
  fused = []
  for cluster in clusters:
    boxes = np.array([d.box for d, _ in cluster], np.float64)
    weights = np.array([d.score for d, _ in cluster], np.float64)
    mean = (boxes * weights[:, None]).sum(0) / weights.sum() if weights.sum() > 0 else boxes.mean(0)
    best = [0.0] * len(found)
    for d, member in cluster:
      best[member] = max(best[member], d.score)
    label = next((d.label for d, _ in cluster if d.label), '')
    fused.append(Detection(tuple(int(np.floor(v + 0.5)) for v in mean), float(np.mean(best)),
                           label))
  fused.sort(key=lambda d: -d.score)
  return fused


@register('detector', 'ensemble')
class Ensemble:
  """`members`: detector specs for `create('detector', spec)`; `thresholds`: one minimum score
  per member (default 0 for all); `iou`: the overlap above which two boxes are one object."""

  def __init__(self, members: Sequence, thresholds: Sequence[float] | None = None,
               iou: float = 0.5, max_objects: int = 10):
    if not members:
      raise ValueError("detector 'ensemble': members must name at least one detector")
    thresholds = [0.0] * len(members) if thresholds is None else [float(t) for t in thresholds]
    if len(thresholds) != len(members):
      raise ValueError(f"detector 'ensemble': {len(thresholds)} thresholds for "
                       f'{len(members)} members')
    if not 0 <= iou < 1:
      raise ValueError(f"detector 'ensemble': iou must be in [0, 1), got {iou}")
    self.members = [create('detector', spec) for spec in members]
    self.thresholds, self.iou, self.max_objects = thresholds, iou, max_objects

  def __call__(self, image: np.ndarray) -> list[Detection]:
    found = [[d for d in member(image) if d.score >= t]
             for member, t in zip(self.members, self.thresholds)]
    return fuse(found, self.iou)[:self.max_objects]
