"""LayerD's Crello protocol (Suzuki et al., ICCV'25), exactly as its published code computes it.

The definition is LayerD's evaluation code, not its later `docs/evaluation.md` (which describes
insert/delete costs and a normalised edit distance the code does not have). Followed: in the
fork `zyz-2299mod10/TAS-LayerD` (CyberAgentAILab/LayerD itself is not in the stored index, so
the fork's copy is not checked line by line against it),
`src/layerd/evaluation/{metrics,dtw,edits,edit_distance}.py` and
`src/layerd/data/crello.py:group_top_layers_indices`, with the API LayerD's README and its
`tools/evaluate.py` (a stored copy) call; the fork's own `tools/evaluator.py` is another
metric, not this protocol.

Per sample (`evaluate_sample`), on 8-bit straight RGBA layers back to front:
1. Grouping, each side: with hard masks `alpha > 0`, every remaining layer that no *later*
   remaining layer overlaps forms one group, repeatedly; groups are ordered back to front and
   each is composited into one layer. A back layer that nothing overlaps therefore joins the
   front-most group, and an empty layer joins it too.
2. Pair metrics on uint8 / 255 (float64): RGB L1 on the hard mask of the *second* argument's
   alpha, soft Alpha IoU (0 when both alphas are empty), cost `(RGB_L1 + 1 - IoU) / 2`.
3. DTW on the cost matrix, steps (i-1, j), (i, j-1), (i-1, j-1); backtracking prefers the
   diagonal, then (i-1, j), then (i, j-1). Scores are means over the path (edits = 0).
4. Up to `max_edits` merges of adjacent layers, prediction or ground-truth side (`_best_merge`
   states the gain rule), each the single best positive gain; DTW redone after each; stop when
   no merge gains. A side with 2 layers or fewer is never merged. Ties go to the lowest index
   within a side and to the ground truth between sides. On the ground-truth side a candidate
   is scored as `cost(candidate, prediction layer)`, so RGB L1 is masked by the prediction.
`aggregate` averages per edit count k, a sample that stopped earlier giving its last scores.

Compositing is PIL's `Image.alpha_composite` on uint8, the call LayerD makes: its integer
rounding, and its keeping the colour stored under zero alpha (which RGB L1 can see), are part
of the scores, so `schema.composite` (float) is not used here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import reduce
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from layerjax.data.schema import LayeredSample
from layerjax.evaluate.metrics import alpha_iou, rgb_l1
from layerjax.fileio import Artifact, as_path, atomic_dir

MAX_EDITS = 5
MIN_LAYERS = 2     # tools/evaluate.py skips a sample with fewer layers on either side
MERGE_ABOVE = 2    # `EditOp.min_layers`: a side is merged only when it has more layers
SIDES = ('pred', 'gt')
CRELLO_SHORT_SIDE = 512   # LayerD's Crello ground truth (METRICS.md; `crello.layerd_layers`)
PROVENANCE = 'provenance.json'   # in a folder `write_layerd_folder` wrote; not a layer
LAYERD_FOLDER = Artifact('LayerD layer folder', lambda p: (p / PROVENANCE).is_file(),
                         (PROVENANCE,))


# --- input --------------------------------------------------------------------------------

def to_uint8_layers(layers: Sequence[np.ndarray], what: str = 'layers') -> list[np.ndarray]:
  """RGBA layers [H, W, 4] as uint8: uint8 as given, floats in [0, 1] as `round(x * 255)`
  (the rounding `schema.encode_png` stores). Raises naming `what` and the layer index for a
  wrong shape, another size than layer 0, NaN or values outside [0, 1]."""
  out = []
  for i, layer in enumerate(layers):
    x = np.asarray(layer)
    if x.ndim != 3 or x.shape[-1] != 4:
      raise ValueError(f'{what}[{i}]: an RGBA layer must be [H, W, 4], got {x.shape}')
    if out and x.shape != out[0].shape:
      raise ValueError(f'{what}[{i}]: size {x.shape[:2]} differs from layer 0 {out[0].shape[:2]}')
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f'{what}[{i}]: dtype {x.dtype} is neither uint8 nor float in [0, 1]')
      if not np.isfinite(x).all():
        raise ValueError(f'{what}[{i}]: has NaN or infinite values')
      if x.min() < 0 or x.max() > 1:
        raise ValueError(f'{what}[{i}]: float values outside [0, 1]')
      x = np.round(x.astype(np.float64) * 255).astype(np.uint8)
    out.append(x)
  return out


def layers_from_sample(sample: LayeredSample) -> list[np.ndarray]:
  """A `LayeredSample`'s layers (background first) as the uint8 stack LayerD's format holds."""
  return to_uint8_layers([layer.rgba for layer in sample.layers], f'sample {sample.id!r} layers')


def layer_files(path) -> list[Path]:
  """LayerD's prediction / ground-truth format: the folder's `*.png` sorted by name, back to
  front (`tools/evaluate.py`: `sorted(glob(dir/*.png))`, so hidden files and other
  extensions, `.PNG` included, are not layers)."""
  folder = Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f'{folder}: not a folder of layer PNGs')
  return sorted(p for p in folder.iterdir() if p.name.endswith('.png')
                and not p.name.startswith('.'))


def read_layerd_folder(path) -> list[np.ndarray]:
  """The layers of a LayerD-format folder (`layer_files`), each converted to RGBA uint8."""
  layers = []
  for file in layer_files(path):
    try:
      with Image.open(file) as im:
        layers.append(np.asarray(im.convert('RGBA')))
    except (UnidentifiedImageError, OSError) as e:
      raise ValueError(f'{file}: not a readable PNG ({e})') from None
    if layers[-1].shape != layers[0].shape:
      raise ValueError(f'{file}: size {layers[-1].shape[:2]} differs from the folder\'s first '
                       f'layer {layers[0].shape[:2]}')
  return layers


def write_layerd_folder(layers: Sequence[np.ndarray], folder, provenance: dict | None = None,
                       overwrite: bool = False):
  """Writes RGBA layers, back to front, in LayerD's format for `read_layerd_folder`:
  `0000.png`, `0001.png`, ... (more digits past 10000 layers, so names still sort back to
  front), uint8 as given, floats in [0, 1] rounded as `to_uint8_layers`. Beside them
  `provenance.json` ({'provenance': provenance}), which no reader of the format takes for a
  layer (only `*.png` are) and which marks the folder as a `LAYERD_FOLDER`: atomically, an
  existing one replaced only with `overwrite`, anything else at `folder` refused."""
  stack = to_uint8_layers(layers, f'{folder}: layers')
  digits = max(4, len(str(len(stack) - 1)))
  with atomic_dir(folder, LAYERD_FOLDER, overwrite) as tmp:
    for i, x in enumerate(stack):
      Image.fromarray(x).save(tmp / f'{i:0{digits}d}.png')
    (tmp / PROVENANCE).write_text(json.dumps({'provenance': provenance or {}}, indent=2) + '\n')
  return as_path(folder)


# --- the protocol's pieces ----------------------------------------------------------------

def group_layers(alphas: Sequence[np.ndarray]) -> list[list[int]]:
  """Indices of LayerD's groups, back to front (`group_top_layers_indices`): repeatedly, the
  remaining layers that no later remaining layer overlaps (hard masks `alpha > 0`)."""
  masks = [np.asarray(a) > 0 for a in alphas]
  remaining, groups = list(range(len(masks))), []
  while remaining:
    top = [t for k, t in enumerate(remaining)
           if not any((masks[t] & masks[u]).any() for u in remaining[k + 1:])]
    groups.append(top)
    remaining = [t for t in remaining if t not in top]
  return groups[::-1]


def dtw(cost: np.ndarray) -> list[tuple[int, int]]:
  """LayerD's DTW path through `cost` [n, m] from (0, 0) to (n-1, m-1) (`dtw.py`).

  Accumulated `D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])`; backtracking
  takes the smallest neighbour, ties to the diagonal, then to (i-1, j)."""
  n, m = cost.shape
  acc = np.zeros((n, m))
  acc[0, 0] = cost[0, 0]
  for i in range(1, n):
    acc[i, 0] = acc[i - 1, 0] + cost[i, 0]
  for j in range(1, m):
    acc[0, j] = acc[0, j - 1] + cost[0, j]
  for i in range(1, n):
    for j in range(1, m):
      acc[i, j] = cost[i, j] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
  i, j = n - 1, m - 1
  path = [(i, j)]
  while i > 0 or j > 0:
    if i == 0:
      j -= 1
    elif j == 0:
      i -= 1
    else:
      diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
      if diag <= up and diag <= left:
        i, j = i - 1, j - 1
      elif up <= left:
        i -= 1
      else:
        j -= 1
    path.append((i, j))
  return path[::-1]


class _Layer:
  """One uint8 layer and its float64 / 255 form, the latter made once for all its pairings."""

  def __init__(self, u8: np.ndarray):
    self.u8 = u8
    self.f = u8.astype(float) / 255

  def over(self, back: '_Layer') -> '_Layer':
    return _Layer(np.asarray(Image.alpha_composite(Image.fromarray(back.u8),
                                                   Image.fromarray(self.u8))))


def _group(stack: list[_Layer]) -> list[_Layer]:
  groups = group_layers([layer.u8[..., 3] for layer in stack])
  return [reduce(lambda back, front: front.over(back), [stack[k] for k in g]) for g in groups]


def pair_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """(rgb_l1, alpha_iou, cost) of uint8 RGBA layers a and b as LayerD's `RGBL1`, `AlphaIoU`
  and `RGBL1_AIoU` compute them (called with a as prediction, b as ground truth)."""
  a, b = to_uint8_layers([a, b], 'pair_scores layers')
  return _scores(a.astype(float) / 255, b.astype(float) / 255)


def _scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """`pair_scores` of float64 / 255 layers."""
  l1 = rgb_l1(a, b)
  iou = alpha_iou(a[..., 3], b[..., 3])
  iou = 0.0 if math.isnan(iou) else iou      # LayerD: IoU of two empty alphas is 0
  return l1, iou, (l1 + (1 - iou)) / 2


class _Scorer:
  """Pair metrics (rgb_l1, alpha_iou, cost) of (a, b), RGB L1 masked by b's alpha, memoised
  for one sample: DTW and the merge search ask for the same pairs again and again. The memo
  holds the layers, so their ids stay theirs while it lives."""

  def __init__(self):
    self._memo: dict[tuple[int, int], tuple] = {}

  def __call__(self, a: _Layer, b: _Layer) -> tuple[float, float, float]:
    key = (id(a), id(b))
    if key not in self._memo:
      self._memo[key] = (a, b, _scores(a.f, b.f))
    return self._memo[key][2]

  def sim(self, a: _Layer, b: _Layer) -> float:
    return 1 - self(a, b)[2]


def _align(pred: list[_Layer], gt: list[_Layer], score: _Scorer):
  """The DTW path and the means over it of cost, rgb_l1 and alpha_iou."""
  table = np.array([[score(p, g) for g in gt] for p in pred])   # [n, m, (l1, iou, cost)]
  path = dtw(table[..., 2])
  # np.mean of a list, as LayerD takes it, so the sums add in the same order.
  means = {name: float(np.mean([table[i, j, k] for i, j in path])) for k, name in
           ((2, 'cost'), (0, 'rgb_l1'), (1, 'alpha_iou'))}
  return path, means


def _best_merge(ls: list[_Layer], others: list[_Layer], pairs: list[tuple[int, int]],
                score: _Scorer) -> tuple[int, float] | None:
  """LayerD's `Merge._compute_merged_scores` + `_find_best_match` on one side: the first
  (lowest) i of the largest positive gain of merging ls[i] and ls[i+1], or None.

  With `S(x, G) = sum_{g in G} 1 - cost(x, g)`, G_k the layers of the other side matched to
  ls[k] on the DTW path `pairs` ((own, other) index pairs), M = ls[i+1] over ls[i]:
    before = S(ls[i], G_i) + S(ls[i+1], G_{i+1})
    after  = S(M, G_i) + max(S(M, G_{i+1}), S(ls[i+2], G_i), S(ls[i+2], G_{i+1})),
  the last two only when ls[i+2] exists (LayerD's candidate list [M, ls[i+2]]); the gain is
  `after - before` when positive. Sides of `MERGE_ABOVE` layers or fewer are never merged."""
  if len(ls) <= MERGE_ABOVE:
    return None
  best = None
  for i in range(len(ls) - 1):
    merged = ls[i + 1].over(ls[i])
    matched = [[others[b] for a, b in pairs if a == k] for k in (i, i + 1)]

    def s(x, group):
      return sum(score.sim(x, g) for g in group)

    before = s(ls[i], matched[0]) + s(ls[i + 1], matched[1])
    options = [s(merged, matched[1])]
    if i + 2 < len(ls):
      options += [s(ls[i + 2], matched[0]), s(ls[i + 2], matched[1])]
    gain = s(merged, matched[0]) + max(options) - before
    if gain > 0 and (best is None or gain > best[1]):
      best = (i, gain)
  return best


# --- one sample ---------------------------------------------------------------------------

@dataclasses.dataclass
class SampleResult:
  """One sample's scores. `scores[k]`: {'edits': k, 'cost', 'rgb_l1', 'alpha_iou'} after k
  merges (shorter than max_edits + 1 when it stopped early); `merges[k-1]`: the k-th merge
  {'side', 'index' (i: layers i and i+1 of that side), 'gain'}; `layers` / `groups`: counts
  per side before and after grouping; `empty_layers`: layers with no alpha > 0, per side;
  `skipped`: why the sample was not scored (then `scores` is empty), else None."""
  sample_id: str
  scores: list[dict[str, float]]
  merges: list[dict[str, Any]]
  layers: dict[str, int]
  groups: dict[str, int]
  empty_layers: dict[str, int]
  skipped: str | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def evaluate_sample(pred_layers: Sequence[np.ndarray], gt_layers: Sequence[np.ndarray],
                    max_edits: int = MAX_EDITS, sample_id: str = '') -> SampleResult:
  """LayerD's `LayersEditDist` on one sample: RGBA layers back to front (uint8, or float in
  [0, 1], rounded to 8 bits). Fewer than `MIN_LAYERS` layers on either side: skipped (stated
  in the result), as `tools/evaluate.py` does."""
  if isinstance(max_edits, bool) or not isinstance(max_edits, int) or max_edits < 0:
    raise ValueError(f'max_edits must be an int >= 0, got {max_edits!r}')
  name = f'sample {sample_id!r}' if sample_id else 'sample'
  sides = {'pred': to_uint8_layers(pred_layers, f'{name} prediction layers'),
           'gt': to_uint8_layers(gt_layers, f'{name} ground-truth layers')}
  if sides['pred'] and sides['gt'] and sides['pred'][0].shape != sides['gt'][0].shape:
    raise ValueError(f'{name}: prediction layers are {sides["pred"][0].shape[:2]}, ground-truth '
                     f'layers {sides["gt"][0].shape[:2]}')
  counts = {side: len(stack) for side, stack in sides.items()}
  empty = {side: sum(not (x[..., 3] > 0).any() for x in stack) for side, stack in sides.items()}
  short = [side for side in SIDES if counts[side] < MIN_LAYERS]
  if short:
    return SampleResult(sample_id, [], [], counts, {'pred': 0, 'gt': 0}, empty,
                        skipped=f'fewer than {MIN_LAYERS} layers in {" and ".join(short)}')

  stacks = {side: _group([_Layer(x) for x in stack]) for side, stack in sides.items()}
  groups = {side: len(stack) for side, stack in stacks.items()}
  score = _Scorer()
  pred, gt = stacks['pred'], stacks['gt']
  path, means = _align(pred, gt, score)
  scores, merges = [{'edits': 0, **means}], []
  while len(merges) < max_edits:
    on_pred = _best_merge(pred, gt, path, score)
    on_gt = _best_merge(gt, pred, [(j, i) for i, j in path], score)
    if on_pred is None and on_gt is None:
      break
    # A tie between the sides goes to the ground truth (LayerD: `best_l1[1] > best_l2[1]`).
    side, (i, gain) = ('pred', on_pred) if on_gt is None or (
        on_pred is not None and on_pred[1] > on_gt[1]) else ('gt', on_gt)
    stack = pred if side == 'pred' else gt
    stack[i:i + 2] = [stack[i + 1].over(stack[i])]
    merges.append({'side': side, 'index': i, 'gain': float(gain)})
    path, means = _align(pred, gt, score)
    scores.append({'edits': len(merges), **means})
  return SampleResult(sample_id, scores, merges, counts, groups, empty)


# --- over samples -------------------------------------------------------------------------

@dataclasses.dataclass
class Curve:
  """LayerD's `LayersEditDist.aggregate`: `levels[k]` = {'edits': k, 'rgb_l1', 'alpha_iou',
  'cost', 'samples' (all scored samples, each giving its scores after min(k, its last) edits),
  'reached' (LayerD's 'count': samples that made k edits), 'avg_edits' (mean of
  min(k, edits made))}. Like LayerD it runs to the most edits any sample made, not always to
  max_edits. `skipped`: sample id -> reason."""
  levels: list[dict[str, float]]
  evaluated: int
  skipped: dict[str, str]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def aggregate(results: Iterable[SampleResult]) -> Curve:
  results = list(results)
  scored = [r.scores for r in results if r.skipped is None]
  skipped = {r.sample_id: r.skipped for r in results if r.skipped is not None}
  levels = []
  for k in range(max((len(s) for s in scored), default=0)):
    # Samples that made k edits first, then the earlier stoppers' last scores: LayerD's order.
    at_k = [s[k] for s in scored if len(s) > k] + [s[-1] for s in scored if len(s) <= k]
    levels.append({'edits': k,
                   **{m: float(np.mean([x[m] for x in at_k]))
                      for m in ('rgb_l1', 'alpha_iou', 'cost')},
                   'samples': len(scored),
                   'reached': sum(len(s) > k for s in scored),
                   'avg_edits': float(np.mean([x['edits'] for x in at_k]))})
  return Curve(levels, len(scored), skipped)
