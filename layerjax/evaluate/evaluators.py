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

from layerjax.data.schema import LayeredSample, composite, visible_masks
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

  Layers are paired by name when the stacks share names (our schema on both sides; the
  trainer's 'background' / 'foreground' / 'shadow'; a predicted layer the ground truth does
  not have, e.g. a shadow where none was cast, counts as `extra_layers`), else by position
  back to front when both stacks are as deep (LayerD's folders of PNGs); otherwise the
  sample's stacks cannot be paired one to one and it counts as `unpaired_samples` (LayerD's
  Crello protocol, evaluator `layerd`, aligns stacks of different depths). `layers`: the names to
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
  counted = ('missing_layers', 'extra_layers', 'nonfinite_layers', 'empty_gt_layers',
             'unpaired_samples')

  def __init__(self, layers: tuple[str, ...] | None = None):
    self.layers = None if layers is None else tuple(layers)

  def pairs(self, pred: LayeredSample, gt: LayeredSample) -> list[tuple[str, Any, Any]] | None:
    """(ground-truth name, predicted layer or None, ground-truth layer) in ground-truth
    order, or None when the stacks cannot be paired."""
    names = [l.name for l in gt.layers]
    by_name = {l.name: l for l in pred.layers}
    if set(by_name) & set(names):
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
    if {l.name for l in pred.layers} & {l.name for l in gt.layers}:
      row['extra_layers'] = len({l.name for l in pred.layers} - {l.name for l in gt.layers})
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


class RefLadeHPA(Evaluator):
  """RefLade's HPA (`reflade`, `reflade.score`): S_vis (LPIPS), S_gen (CLIP direction),
  S_fid (FID) and their min-max normalised mean per group (foreground / background, per
  prompt type, occluded), with the bounds (`bounds`: 'table3_fit', `reflade.TABLE3_FIT_BOUNDS`)
  and the weights in `notes`. Each ground-truth object and the background is paired with the
  predicted layer of its name. The networks load from local files: `lpips` (the lpips
  package's `lpips_net` file, 'alex' its default), `inception` (pytorch-fid's), `clip` (a
  transformers CLIP folder); without them, `random_weights=True` runs the whole path on
  random networks, and every score is then named `random_weights/...` (never the metric).
  A crop under LPIPS's smallest input (`lpips.MIN_SIDE`) is scaled up to it, both images
  alike (bilinear), and counted (`upscaled_crops`)."""
  directions = {'S_vis': 'lower', 'S_gen': 'higher', 'S_fid': 'lower', 'HPA': 'higher'}
  counted = ('missing_layers', 'empty_gt_layers')
  BOUNDS = ('table3_fit',)

  def __init__(self, lpips: str | None = None, inception: str | None = None,
               clip: str | None = None, lpips_net: str = 'alex', bounds: str = 'table3_fit',
               random_weights: bool = False):
    from layerjax.evaluate import reflade
    missing = [n for n, v in (('lpips', lpips), ('inception', inception), ('clip', clip))
               if v is None]
    if missing and not random_weights:
      raise ValueError(f'evaluator reflade: no weights for {", ".join(missing)} (local files: '
                       '--lpips, --inception, --clip), or --random-weights for a run of the '
                       'code on random networks, which is not the metric')
    if bounds not in self.BOUNDS:
      raise ValueError(f'evaluator reflade: bounds {bounds!r}, known: {self.BOUNDS}')
    self.bounds = reflade.TABLE3_FIT_BOUNDS
    self.nets = _reflade_networks(None if random_weights else (lpips, inception, clip),
                                  lpips_net)

  def score(self, sample_id: str, pred: LayeredSample, gt: LayeredSample) -> dict:
    from layerjax.evaluate import reflade
    row: dict[str, Any] = {'id': sample_id, 'missing_layers': 0, 'empty_gt_layers': 0}
    masks = visible_masks(gt.layers)
    layers = [dataclasses.replace(l, visible_mask=m if l.visible_mask is None else
                                  l.visible_mask) for l, m in zip(gt.layers, masks)]
    names = {l.name for l in pred.layers}
    predictions = {}
    for layer in layers:
      if layer.kind == 'shadow':
        continue
      if not (layer.rgba[..., 3] > 0).any():
        row['empty_gt_layers'] += 1
      elif layer.name not in names:
        row['missing_layers'] += 1
      else:
        predictions[layer.name] = pred.layer(layer.name).rgba
    prompt = '+'.join(k for k, v in (('points', gt.prompts[0].points), ('box',
                      gt.prompts[0].box), ('mask', gt.prompts[0].mask)) if v is not None
                      and len(v)) if gt.prompts else 'scene'
    row['pairs'] = reflade.pairs_from_sample(dataclasses.replace(gt, layers=layers),
                                             predictions, prompt)
    return row

  def summarise(self, rows: list[dict]) -> Result:
    from layerjax.evaluate import reflade
    self.nets.lpips.upscaled = 0  # one count per system scored
    result = reflade.score([p for r in rows for p in r['pairs']], self.nets, self.bounds)
    prefix = '' if result['is_metric'] else 'random_weights/'
    scalars = {f'{prefix}{group}/{k}': g[k] for group, g in result['groups'].items()
               for k in ('HPA', 'S_vis', 'S_gen', 'S_fid') if g[k] is not None}
    counts = {**self.count(rows), 'upscaled_crops': self.nets.lpips.upscaled}
    return Result(scalars, counts, {'bounds': result['bounds'], 'weights': result['weights'],
                                    'is_metric': result['is_metric'],
                                    'summary': reflade.summary(result)})


class _UpscaledLPIPS:
  """LPIPS on crops scaled up (both alike) to its smallest input where they are smaller."""

  def __init__(self, lpips):
    self.lpips, self.upscaled = lpips, 0

  def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from layerjax.evaluate.lpips import MIN_SIDE
    from layerjax.infer.postprocess import resize
    h, w = a.shape[1:3]
    side = MIN_SIDE[self.lpips.net]
    if min(h, w) < side:
      s = side / min(h, w)
      size = (max(side, round(h * s)), max(side, round(w * s)))
      a, b = (np.stack([resize(x, size) for x in y]) for y in (a, b))
      self.upscaled += len(a)
    return self.lpips(np.clip(a, 0, 1), np.clip(b, 0, 1))


def _reflade_networks(paths, lpips_net: str):
  """`reflade.Networks` from local files (lpips, inception, clip), or random (None)."""
  from layerjax.evaluate import inception, lpips, reflade
  if paths is None:
    from transformers import CLIPConfig, CLIPImageProcessor
    tiny = CLIPConfig(text_config={'hidden_size': 32, 'intermediate_size': 64,
                                   'num_hidden_layers': 1, 'num_attention_heads': 2},
                      vision_config={'hidden_size': 32, 'intermediate_size': 64,
                                     'num_hidden_layers': 1, 'num_attention_heads': 2,
                                     'patch_size': 32}, projection_dim=16)
    lp, fid = lpips.LPIPS.random(0, lpips_net), inception.FIDInception.random(0)
    clip = reflade.CLIPFeatures.random(tiny, CLIPImageProcessor())
  else:
    lp = lpips.LPIPS.load(paths[0], lpips_net)
    fid = inception.FIDInception.load(paths[1])
    clip = reflade.CLIPFeatures.load(paths[2])
  return reflade.Networks(_UpscaledLPIPS(lp), clip, fid.features, inception.frechet_distance,
                          {'lpips': lp.weights, 'inception': fid.weights,
                           'clip': clip.weights})


REGISTRY: dict[str, type[Evaluator]] = {'layers': LayerFidelity, 'layerd': LayerDCurve,
                                        'reflade': RefLadeHPA}


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
