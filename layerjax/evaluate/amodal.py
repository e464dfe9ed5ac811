"""Amodal mIoU (mIoU_full, mIoU_occ) as C2F-Seg's evaluation code computes it (`METRICS.md`).

Followed: repo amazon-science/c2f-seg, `utils/evaluation.py` (get_IoU, iou, evaluation_image),
`src/image_model.py` (loss_and_evaluation) and `test_c2f_seg.py` (the sums). Per instance,
with the predicted amodal mask `pred = alpha > 0.5`, the ground-truth amodal mask `gt` and
visible mask `vis`:

  iou_full = (|pred & gt| + 1e-10) / (|pred | gt| + 1e-10)
  iou_occ  = |pred_o & gt_o| / (|pred_o | gt_o| + 1e-6),  pred_o = pred & ~vis, gt_o = gt & ~vis

mIoU_full is the mean of iou_full over all instances. mIoU_occ is the sum of iou_occ over all
instances divided by the number of instances C2F-Seg counts as occluded: those where the
signed sum of `gt - vis` is not 0. When the visible mask lies inside the amodal one (COCOA's
annotations) that is exactly "gt_o is not empty", and an uncounted instance adds iou_occ = 0.
C2F-Seg also logs both after its post-processing, the prediction joined with the visible mask
(`pred | vis`): the '_post' scores here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

THRESHOLD = 0.5


def instance_scores(iid: str, pred_alpha: np.ndarray, amodal: np.ndarray,
                    visible: np.ndarray) -> dict[str, Any]:
  """One instance's row: iou_full, iou_occ (and their '_post' forms) and 'occluded' (whether
  it counts towards mIoU_occ). Raises ValueError naming the instance for bad input."""
  pred_alpha = np.asarray(pred_alpha)
  if amodal.shape != visible.shape or pred_alpha.shape != amodal.shape:
    raise ValueError(f'amodal instance {iid!r}: predicted alpha {pred_alpha.shape}, amodal '
                     f'{amodal.shape} and visible {visible.shape} masks differ in shape')
  if not np.isfinite(pred_alpha).all():
    raise ValueError(f'amodal instance {iid!r}: predicted alpha has NaN or inf values')
  gt, vis = amodal.astype(bool), visible.astype(bool)
  pred = pred_alpha > THRESHOLD
  row = {'id': iid, 'occluded': int(gt.sum()) - int(vis.sum()) != 0}
  for suffix, p in (('', pred), ('_post', pred | vis)):
    row[f'iou_full{suffix}'] = float(((p & gt).sum() + 1e-10) / ((p | gt).sum() + 1e-10))
    po, go = p & ~vis, gt & ~vis
    row[f'iou_occ{suffix}'] = float((po & go).sum() / ((po | go).sum() + 1e-6))
  return row


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """mIoU_full, mIoU_occ (and '_post'), as fractions, with the instance counts."""
  rows = list(rows)
  if not rows:
    raise ValueError('amodal: no instances to score')
  occluded = sum(r['occluded'] for r in rows)
  out: dict[str, Any] = {'instances': len(rows), 'occluded_instances': occluded}
  for suffix in ('', '_post'):
    out[f'mIoU_full{suffix}'] = float(np.mean([r[f'iou_full{suffix}'] for r in rows]))
    out[f'mIoU_occ{suffix}'] = (sum(r[f'iou_occ{suffix}'] for r in rows) / occluded
                                if occluded else None)
  return out


def evaluate(items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]]
             ) -> dict[str, Any]:
  """`items`: (instance id, predicted alpha, GT amodal mask, GT visible mask). Returns
  `aggregate`'s scores with 'rows', one per instance."""
  rows = [instance_scores(*item) for item in items]
  return {'benchmark': 'cocoa', **aggregate(rows), 'rows': rows}


def summary(result: Mapping[str, Any]) -> str:
  """The line papers print: percentages, with the counts behind them."""
  pct = lambda v: 'n/a' if v is None else f'{100 * v:.2f}'
  return (f'COCOA amodal: mIoU_full {pct(result["mIoU_full"])}, mIoU_occ '
          f'{pct(result["mIoU_occ"])} ({result["instances"]} instances, '
          f'{result["occluded_instances"]} occluded; with the visible mask joined: '
          f'{pct(result["mIoU_full_post"])} / {pct(result["mIoU_occ_post"])})')
