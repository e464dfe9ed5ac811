"""Evaluators by name, as big_vision's `evaluators`: a config lists them
(`config.eval.evaluators = {'layers': {}}`, name -> options) and whoever evaluates (the
trainer's periodic evaluation, `python -m layerjax.evaluate`) builds each with `create` and
runs it on every system it compares (the model, the baselines).

The interface, for every benchmark:

    ev = create(name, **options)              # once per run: options checked, networks loaded
    row = ev.score(sample_id, pred, gt)       # one sample: `LayeredSample`s in, a dict out
    result = ev.summarise(rows)               # the dataset's `Result` from all the rows

`score` is pure (no state between samples), so rows of one system are collected as the
samples stream by and `summarise` sees them all: a curve aggregated per edit count, a set
statistic (FID from the feature vectors a row carries) or a mean. A row is a flat dict; its
int, float and str values are the per-sample CSV's columns, anything else (a feature
vector) stays in memory for `summarise`. Problems handled rather than raised (an empty
layer, non-finite values, layers that cannot be paired) are int fields of the row whose
names `counted` lists; `summarise` sums them into `Result.counts`, so they show next to
the scores.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, ClassVar

import numpy as np

from layerjax.data.schema import LayeredSample, composite
from layerjax.evaluate import layerd, metrics


@dataclasses.dataclass
class Result:
  """A system's scores on a dataset: `scalars` (metric -> value), `counts` (problems handled
  and samples seen) and `notes` (what must be printed beside the numbers: the weights a
  network score used, normalisation bounds)."""
  scalars: dict[str, float]
  counts: dict[str, int]
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)


class Evaluator(abc.ABC):
  """The base of every registered evaluator (see the module docstring)."""
  # Whether lower or higher is better, by the last part of a metric's name ('rgb_l1').
  directions: ClassVar[dict[str, str]] = {}
  counted: ClassVar[tuple[str, ...]] = ()

  @abc.abstractmethod
  def score(self, sample_id: str, pred: LayeredSample, gt: LayeredSample) -> dict:
    """One sample's row: 'id' and its per-sample values (see the module docstring)."""

  @abc.abstractmethod
  def summarise(self, rows: list[dict]) -> Result:
    """The dataset's result from every row `score` gave."""

  def count(self, rows: list[dict]) -> dict[str, int]:
    """`samples` and the sum of every `counted` field over `rows`."""
    return {'samples': len(rows), **{k: int(sum(r.get(k, 0) for r in rows))
                                     for k in self.counted}}


def mean(values) -> float:
  """The mean of the finite values, NaN when there are none (no warning)."""
  v = np.asarray(list(values), np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float('nan')


class LayerFidelity(Evaluator):
  """RGB L1 and Alpha IoU (`metrics`) of each ground-truth layer against its prediction, and
  the recomposition error `recompose_l1` (mean |composite(pred) - image|).

  Layers are paired by name when every predicted name is a ground-truth name (our schema on
  both sides; the trainer's 'background' / 'foreground' / 'shadow'), else by position back
  to front when both stacks are as deep (LayerD's folders of PNGs); otherwise the sample's
  stacks cannot be paired one to one and it counts as `unpaired_samples` (LayerD's Crello
  protocol, evaluator `layerd`, aligns stacks of different depths). `layers`: the names to
  score (None: every ground-truth layer); one not predicted counts as `missing_layers`.
  Handled, counted: a pair with a non-finite value is not scored (`nonfinite_layers`); a
  ground-truth layer with no alpha > 0 has no pixel for RGB L1, which is NaN there (LayerD's
  formula would give 0, a perfect score for nothing) and left out of the means
  (`empty_gt_layers`); its Alpha IoU is 0 against a non-empty prediction and NaN against an
  empty one (`metrics.alpha_iou`).
  Scalars: `<layer>/rgb_l1`, `<layer>/alpha_iou` (means over samples), `rgb_l1` and
  `alpha_iou` (over every scored pair), `recompose_l1`.
  """
  directions = {'rgb_l1': 'lower', 'alpha_iou': 'higher', 'recompose_l1': 'lower'}
  counted = ('missing_layers', 'nonfinite_layers', 'empty_gt_layers', 'unpaired_samples')

  def __init__(self, layers: tuple[str, ...] | None = None):
    self.layers = None if layers is None else tuple(layers)

  def pairs(self, pred: LayeredSample, gt: LayeredSample) -> list[tuple[str, Any, Any]] | None:
    """(ground-truth name, predicted layer or None, ground-truth layer) in ground-truth
    order, or None when the stacks cannot be paired."""
    names = [l.name for l in gt.layers]
    by_name = {l.name: l for l in pred.layers}
    if set(by_name) <= set(names):
      paired = [(l.name, by_name.get(l.name), l) for l in gt.layers]
    elif len(pred.layers) == len(gt.layers):
      paired = [(g.name, p, g) for p, g in zip(pred.layers, gt.layers)]
    else:
      return None
    return [p for p in paired if self.layers is None or p[0] in self.layers]

  def score(self, sample_id: str, pred: LayeredSample, gt: LayeredSample) -> dict:
    row: dict[str, Any] = {'id': sample_id, **{k: 0 for k in self.counted}}
    if pred.image.shape != gt.image.shape:
      raise ValueError(f'sample {sample_id!r}: prediction is {pred.image.shape[:2]}, ground '
                       f'truth {gt.image.shape[:2]}')
    paired = self.pairs(pred, gt)
    if paired is None:
      row['unpaired_samples'] = 1
      return row
    for name, p, g in paired:
      if p is None:
        row['missing_layers'] += 1
        continue
      if not (np.isfinite(p.rgba).all() and np.isfinite(g.rgba).all()):
        row['nonfinite_layers'] += 1
        continue
      empty = not (g.rgba[..., 3] > 0).any()
      row['empty_gt_layers'] += empty
      row[f'{name}/rgb_l1'] = float('nan') if empty else metrics.rgb_l1(p.rgba, g.rgba)
      row[f'{name}/alpha_iou'] = metrics.alpha_iou(p.rgba[..., 3], g.rgba[..., 3])
    finite = all(np.isfinite(l.rgba).all() for l in pred.layers)
    if pred.layers and finite:
      recomposed = composite([l.rgba for l in pred.layers])[..., :3]
      row['recompose_l1'] = float(np.abs(recomposed - gt.image).mean())
    return row

  def summarise(self, rows: list[dict]) -> Result:
    keys = sorted({k for r in rows for k in r
                   if k.endswith(('/rgb_l1', '/alpha_iou')) or k == 'recompose_l1'})
    scalars = {k: mean(r[k] for r in rows if k in r) for k in keys}
    for m in ('rgb_l1', 'alpha_iou'):
      scalars[m] = mean(v for r in rows for k, v in r.items() if k.endswith('/' + m))
    return Result(scalars, self.count(rows))


class LayerDCurve(Evaluator):
  """LayerD's Crello protocol (`layerd`): stacks of any depths grouped, aligned by DTW and
  merged up to `max_edits` times; the curve of RGB L1, Alpha IoU and cost over the edit
  count. Scalars `edits_<k>/<metric>` for k = 0.. (as far as any sample went, as LayerD's
  aggregate), the curve in `notes['curve']`. Samples with fewer than 2 layers on a side are
  skipped as LayerD skips them, and counted (`skipped_samples`), as are empty layers."""
  directions = {'rgb_l1': 'lower', 'alpha_iou': 'higher', 'cost': 'lower', 'edits': ''}
  counted = ('skipped_samples', 'empty_pred_layers', 'empty_gt_layers')

  def __init__(self, max_edits: int = layerd.MAX_EDITS):
    self.max_edits = max_edits

  def score(self, sample_id: str, pred: LayeredSample, gt: LayeredSample) -> dict:
    r = layerd.evaluate_sample(layerd.layers_from_sample(pred), layerd.layers_from_sample(gt),
                               self.max_edits, sample_id)
    row = {'id': sample_id, 'skipped_samples': int(r.skipped is not None),
           'empty_pred_layers': r.empty_layers['pred'], 'empty_gt_layers': r.empty_layers['gt'],
           'edits': len(r.merges), 'result': r}
    for level in r.scores:
      row.update({f'edits_{level["edits"]}/{m}': level[m] for m in ('rgb_l1', 'alpha_iou')})
    return row

  def summarise(self, rows: list[dict]) -> Result:
    curve = layerd.aggregate(r['result'] for r in rows)
    scalars = {f'edits_{l["edits"]}/{m}': l[m] for l in curve.levels
               for m in ('rgb_l1', 'alpha_iou', 'cost')}
    return Result(scalars, self.count(rows), {'curve': curve.levels,
                                              'skipped': curve.skipped})


REGISTRY: dict[str, type[Evaluator]] = {'layers': LayerFidelity, 'layerd': LayerDCurve}


def check_options(name: str, options) -> None:
  """Raises a ValueError naming the evaluator when it is unknown or `options` are not its
  constructor's (nothing is built)."""
  if name not in REGISTRY:
    raise ValueError(f'evaluator {name!r}: unknown; registered: {sorted(REGISTRY)}')
  try:
    inspect.signature(REGISTRY[name]).bind(**dict(options))
  except TypeError as e:
    raise ValueError(f'evaluator {name!r}: options {sorted(dict(options))}: {e}') from None


def create(name: str, **options) -> Evaluator:
  check_options(name, options)
  return REGISTRY[name](**options)


def direction(metric: str, evaluator: Evaluator) -> str:
  """'lower' or 'higher' (is better) for a metric's name, '' for a count or when unknown."""
  return evaluator.directions.get(metric.rsplit('/', 1)[-1], '')
