"""Layer-fidelity metrics, exactly as `shared/design/METRICS.md` defines them (numpy, [0, 1]).

* `rgb_l1` (LayerD's evaluation code): on the hard mask `m = gt_alpha > 0`,
  `sum_px(mean_c |pred_rgb - gt_rgb| * m) / (sum_px(m) + eps)`; not alpha-weighted.
* `alpha_iou` (soft, no threshold): `sum(min(a_pred, a_gt)) / sum(max(a_pred, a_gt))`.
Both take single RGBA layers [H, W, 4]. `alpha_iou` of two empty layers is undefined (0 / 0)
and returned as NaN, so averages skip it (`np.nanmean`) rather than count it as perfect.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8
# What a score from random or stand-in network weights says of itself: never the metric.
NOT_METRIC = '(not the metric)'
RANDOM = f'random {NOT_METRIC}'


def rgb_l1(pred: np.ndarray, gt: np.ndarray, eps: float = EPS) -> float:
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if pred.shape != gt.shape or pred.shape[-1] != 4:
    raise ValueError(f'rgb_l1 needs two RGBA layers of one shape, got {pred.shape}, {gt.shape}')
  m = gt[..., 3] > 0
  err = np.abs(pred[..., :3] - gt[..., :3]).mean(-1)
  return float((err * m).sum() / (m.sum() + eps))


def alpha_iou(pred_alpha: np.ndarray, gt_alpha: np.ndarray) -> float:
  pred_alpha = np.asarray(pred_alpha, np.float64)
  gt_alpha = np.asarray(gt_alpha, np.float64)
  if pred_alpha.shape != gt_alpha.shape:
    raise ValueError(f'alpha_iou needs alphas of one shape, got {pred_alpha.shape}, '
                     f'{gt_alpha.shape}')
  union = np.maximum(pred_alpha, gt_alpha).sum()
  return float(np.minimum(pred_alpha, gt_alpha).sum() / union) if union > 0 else float('nan')
