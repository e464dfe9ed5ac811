"""LayerD's Crello protocol (`layerjax.evaluate.layerd`) against its definition: grouping,
pair costs, DTW paths, merges and the aggregated curve on stacks worked out by hand, and the
whole protocol against a naive second implementation written in the shape of LayerD's code
(PIL images, nothing cached) on random stacks."""

from __future__ import annotations

import io
import json
from functools import reduce

import numpy as np
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.evaluate import layerd

H, W = 4, 8
RED, WHITE = (255, 0, 0), (255, 255, 255)
approx = lambda x: pytest.approx(x, abs=1e-7)   # noqa: E731  (the metrics' eps is 1e-8)


def rect(c0, c1, rgb=RED, a=255):
  """A layer holding `rgb` at alpha `a` in columns [c0, c1), (0, 0, 0, 0) elsewhere."""
  x = np.zeros((H, W, 4), np.uint8)
  x[:, c0:c1] = (*rgb, a)
  return x


BG = rect(0, W, WHITE)


def curve(result):
  return [(s['rgb_l1'], s['alpha_iou'], s['cost']) for s in result.scores]


# --- pieces, by hand ------------------------------------------------------------------------


def test_pair_scores_by_hand():
  """RGB L1 on the second argument's alpha > 0, soft IoU, cost (L1 + 1 - IoU) / 2; two empty
  alphas have IoU 0 (cost 1/2), not NaN."""
  half = rect(0, 4, RED, 128)
  l1, iou, cost = layerd.pair_scores(half, BG)
  # 16 red px vs white: (0 + 1 + 1) / 3; 16 black px: 1. IoU: 16 * 128/255 / 32.
  assert (l1, iou, cost) == (approx(5 / 6), approx(64 / 255), approx((5 / 6 + 1 - 64 / 255) / 2))
  l1, iou, _ = layerd.pair_scores(BG, half)      # masked by `half`: only its 16 px count
  assert (l1, iou) == (approx(2 / 3), approx(64 / 255))
  empty = np.zeros((H, W, 4), np.uint8)
  assert layerd.pair_scores(empty, empty) == (0.0, 0.0, 0.5)


@pytest.mark.parametrize('stack, groups', [
    ([BG, rect(0, 2), rect(3, 5), rect(6, 8)], [[0], [1, 2, 3]]),   # 3 disjoint -> one group
    ([rect(0, 2), rect(3, 5), rect(6, 8)], [[0, 1, 2]]),
    ([BG, rect(0, 4), rect(2, 6)], [[0], [1], [2]]),                # a chain stays apart
    # A back layer nothing overlaps joins the front-most group, after the layer above it.
    ([rect(0, 2), rect(3, 6), rect(4, 8)], [[1], [0, 2]]),
    ([BG, np.zeros((H, W, 4), np.uint8), rect(2, 4)], [[0], [1, 2]]),  # empty: in the top group
    ([BG, rect(0, 4, a=1), rect(3, 8)], [[0], [1], [2]]),           # alpha 1/255 overlaps too
])
def test_grouping_by_hand(stack, groups):
  assert layerd.group_layers([x[..., 3] for x in stack]) == groups


def test_grouped_layers_are_composited_before_matching():
  """Three disjoint objects against their one-layer composite: a perfect match, no edit."""
  parts = [rect(0, 2, RED), rect(3, 5, (0, 255, 0)), rect(6, 8, (0, 0, 255))]
  whole = sum(parts).astype(np.uint8)       # disjoint and opaque: the composite is the sum
  result = layerd.evaluate_sample([BG, *parts], [BG, whole])
  assert result.groups == {'pred': 2, 'gt': 2} and result.layers == {'pred': 4, 'gt': 2}
  assert curve(result) == [(0.0, 1.0, 0.0)] and result.merges == []


def test_dtw_ties_go_to_the_diagonal_then_up():
  """All-zero costs: every neighbour ties, the diagonal wins (not (0,1) then (1,1)). Below,
  the diagonal D[1,1] = 1 loses to up D[1,2] = 0 = left D[2,1]: up wins."""
  assert layerd.dtw(np.zeros((2, 2))) == [(0, 0), (1, 1)]
  cost = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
  assert layerd.dtw(cost) == [(0, 0), (0, 1), (1, 2), (2, 2)]
  assert layerd.dtw(np.ones((1, 3))) == [(0, 0), (0, 1), (0, 2)]
  assert layerd.dtw(np.ones((3, 1))) == [(0, 0), (1, 0), (2, 0)]


# --- whole samples, by hand -----------------------------------------------------------------
# X: opaque red in columns 2..5 of a 4x8 canvas over a white background; the prediction
# splits it into overlapping opaque pieces (overlap keeps grouping from rejoining them).
X = rect(2, 6)


def test_split_layer_one_merge_fixes_it():
  """Prediction [BG, X[2:5], X[4:6]] against [BG, X]. Costs (row: prediction, column: GT):
  BG: 0, (2/3 + 1/2)/2 = 7/12; X[2:5]: (7/8 + 5/8)/2 = 3/4, (1/12 + 1/4)/2 = 1/6;
  X[4:6]: (11/12 + 3/4)/2 = 5/6, (1/6 + 1/2)/2 = 1/3. DTW: (0,0), (1,1), (2,1). Merging
  pieces 1 and 2 gives X: gain 1 + 1 - (5/6 + 2/3) = 1/2; merging BG and piece 1 loses."""
  result = layerd.evaluate_sample([BG, rect(2, 5), rect(4, 6)], [BG, X], sample_id='a')
  assert curve(result) == [(approx(1 / 12), approx(3 / 4), approx(1 / 6)), (0.0, 1.0, 0.0)]
  assert [(m['side'], m['index']) for m in result.merges] == [('pred', 1)]
  assert result.merges[0]['gain'] == approx(1 / 2)
  mirrored = layerd.evaluate_sample([BG, X], [BG, rect(2, 5), rect(4, 6)])
  assert [(m['side'], m['index']) for m in mirrored.merges] == [('gt', 1)]
  assert mirrored.scores[-1]['alpha_iou'] == 1.0


def test_three_pieces_two_merges_lowest_index_on_ties():
  """Pieces X[2:4], X[3:5], X[4:6]. DTW (0,0), (1,1), (2,1), (3,1): L1 (0 + 3/6) / 4,
  IoU (1 + 3/2) / 4. Merging pieces 1+2 or 2+3 both gain 5/6 + 5/6 - 4/3 = 1/3: the lower
  index wins; then the split case above."""
  result = layerd.evaluate_sample([BG, rect(2, 4), rect(3, 5), rect(4, 6)], [BG, X])
  assert curve(result) == [(approx(1 / 8), approx(5 / 8), approx(1 / 4)),
                           (approx(1 / 12), approx(3 / 4), approx(1 / 6)), (0.0, 1.0, 0.0)]
  assert [(m['side'], m['index'], m['gain']) for m in result.merges] == [
      ('pred', 1, approx(1 / 3)), ('pred', 1, approx(1 / 2))]


def test_equal_gains_on_both_sides_go_to_the_ground_truth():
  """Ground truth = prediction with red and green swapped: every cost is the same either way
  round, so both sides' best gains are equal, and LayerD merges the ground truth's."""
  pred = [BG, rect(1, 8, RED), rect(1, 3, RED), rect(1, 8, (255, 255, 0))]
  gt = [x[..., [1, 0, 2, 3]] for x in pred]
  for a, b in ((pred, gt), (gt, pred)):
    result = layerd.evaluate_sample(a, b)
    assert result.merges[0]['side'] == 'gt'
  assert layerd.evaluate_sample(pred, gt).merges[0]['gain'] == (
      layerd.evaluate_sample(gt, pred).merges[0]['gain'])


def test_aggregate_carries_early_stoppers_forward():
  """Sample a stops after 1 edit, b after 2 (values above): at k = 2, a gives its k = 1."""
  a = layerd.evaluate_sample([BG, rect(2, 5), rect(4, 6)], [BG, X], sample_id='a')
  b = layerd.evaluate_sample([BG, rect(2, 4), rect(3, 5), rect(4, 6)], [BG, X], sample_id='b')
  short = layerd.evaluate_sample([BG], [BG, X], sample_id='short')
  got = layerd.aggregate([a, short, b]).to_json()
  levels = [(v['edits'], v['rgb_l1'], v['alpha_iou'], v['samples'], v['reached'],
             v['avg_edits']) for v in got['levels']]
  assert levels == [(0, approx((1 / 12 + 1 / 8) / 2), approx((3 / 4 + 5 / 8) / 2), 2, 2, 0.0),
                    (1, approx(1 / 24), approx(7 / 8), 2, 2, 1.0),
                    (2, 0.0, 1.0, 2, 1, 1.5)]
  assert got['evaluated'] == 2
  assert got['skipped'] == {'short': 'fewer than 2 layers in pred'}
  assert layerd.aggregate([]).levels == []


def test_no_merge_on_two_layer_sides_and_max_edits():
  """A side of 2 layers is never merged (LayerD's min_layers), though merging the prediction's
  halves of X here would gain 1 + 1 - (5/6 + 2/3) = 1/2 against the ground truth's one group
  (X and an empty layer); max_edits=0 scores only k=0."""
  result = layerd.evaluate_sample([rect(2, 5), rect(4, 6)], [X, np.zeros_like(X)])
  assert result.groups == {'pred': 2, 'gt': 1}
  assert result.merges == [] and len(result.scores) == 1
  result = layerd.evaluate_sample([BG, rect(2, 5), rect(4, 6)], [BG, X], max_edits=0)
  assert len(result.scores) == 1 and result.merges == []


# --- input ----------------------------------------------------------------------------------


def _png(path, x):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(x).save(path)


def test_read_layerd_folder(tmp_path):
  """`*.png` sorted by name (back to front); hidden files and other extensions are not layers;
  RGB PNGs become opaque RGBA."""
  _png(tmp_path / 's' / '0001.png', X)
  _png(tmp_path / 's' / '0000.png', BG[..., :3])
  _png(tmp_path / 's' / '.0002.png', X)
  _png(tmp_path / 's' / '0003.PNG', X)
  layers = layerd.read_layerd_folder(tmp_path / 's')
  assert len(layers) == 2 and (layers[0] == BG).all() and (layers[1] == X).all()
  _png(tmp_path / 's' / '0004.png', np.zeros((2, 2, 4), np.uint8))
  with pytest.raises(ValueError, match='0004.png: size'):
    layerd.read_layerd_folder(tmp_path / 's')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    layerd.read_layerd_folder(tmp_path / 'nowhere')


def test_layers_from_sample_are_the_stored_pngs():
  """Our samples score as their 8-bit layer files would: the bytes `schema.encode_png` writes."""
  rng = np.random.default_rng(0)
  fg = rng.uniform(size=(H, W, 4)).astype(np.float32)
  bg = (BG / 255).astype(np.float32)
  sample = schema.assemble('s', [schema.Layer('background', 'background', bg),
                                 schema.Layer('object_1', 'object', fg)], prompts=False)
  stored = [np.asarray(Image.open(io.BytesIO(schema.encode_png(layer.rgba))))
            for layer in sample.layers]
  got = layerd.layers_from_sample(sample)
  assert all(g.dtype == np.uint8 and (g == s).all() for g, s in zip(got, stored))


@pytest.mark.parametrize('pred, gt, match', [
    ([BG, np.full((H, W, 4), np.nan)], [BG, X], r'prediction layers\[1\]: has NaN'),
    ([BG, np.full((H, W, 4), 1.5)], [BG, X], r'prediction layers\[1\]: float values outside'),
    ([BG, X[:2]], [BG, X], r'prediction layers\[1\]: size'),
    ([BG, X], [BG[:2], X[:2]], 'prediction layers are'),
    ([BG, X[..., :3]], [BG, X], r'prediction layers\[1\]: an RGBA layer'),
    ([BG, X.astype(np.int32)], [BG, X], 'neither uint8 nor float'),
])
def test_bad_layers_are_refused(pred, gt, match):
  with pytest.raises(ValueError, match=match):
    layerd.evaluate_sample(pred, gt, sample_id='s')


def test_empty_layers_are_counted():
  empty = np.zeros((H, W, 4), np.uint8)
  result = layerd.evaluate_sample([BG, empty, X], [BG, X])
  assert result.empty_layers == {'pred': 1, 'gt': 0} and result.groups['pred'] == 2
  assert curve(result) == [(0.0, 1.0, 0.0)]


# --- against a naive implementation in the shape of LayerD's code ---------------------------
# Written for this test after LayerD's src/layerd/evaluation/{metrics,dtw,edits,edit_distance}.py
# and src/layerd/data/crello.py (read in the stored fork zyz-2299mod10/TAS-LayerD): PIL images
# throughout, every metric recomputed, LayerD's loop structure and comparisons. Test-only.


def ref_cost_parts(pr, gt):
  p, g = np.array(pr).astype(float) / 255, np.array(gt).astype(float) / 255
  m = g[..., 3] > 0
  l1 = (np.abs(p[..., :3] - g[..., :3]).mean(-1) * m).sum() / (m.sum() + 1e-8)
  union = np.maximum(p[..., 3], g[..., 3]).sum()
  iou = np.minimum(p[..., 3], g[..., 3]).sum() / union if union > 0 else 0.0
  return l1, iou, (l1 + (1 - iou)) / 2


def ref_groups(alphas):
  hard, left, out = alphas > 0, list(range(len(alphas))), []
  while left:
    top = []
    for k, t in enumerate(left):
      if all((hard[t] & hard[u]).sum() == 0 for u in left[k + 1:]):
        top.append(t)
    out.append(top)
    left = [t for t in left if t not in top]
  return out[::-1]


def ref_dtw(pred, gt):
  n, m = len(pred), len(gt)
  c = np.array([[ref_cost_parts(p, g)[2] for g in gt] for p in pred])
  d = np.zeros((n, m))
  for i in range(n):
    for j in range(m):
      prev = [d[a, b] for a, b in ((i - 1, j), (i, j - 1), (i - 1, j - 1)) if a >= 0 and b >= 0]
      d[i, j] = c[i, j] + (min(prev) if prev else 0)
  i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
  while i > 0 or j > 0:
    if i == 0:
      j -= 1
    elif j == 0:
      i -= 1
    elif d[i - 1, j - 1] <= d[i - 1, j] and d[i - 1, j - 1] <= d[i, j - 1]:
      i, j = i - 1, j - 1
    elif d[i - 1, j] <= d[i - 1, j - 1] and d[i - 1, j] <= d[i, j - 1]:
      i -= 1
    else:
      j -= 1
    path.append((i, j))
  path.reverse()
  parts = [ref_cost_parts(pred[a], gt[b]) for a, b in path]
  return path, {'cost': float(np.mean([x[2] for x in parts])),
                'rgb_l1': float(np.mean([x[0] for x in parts])),
                'alpha_iou': float(np.mean([x[1] for x in parts]))}


def ref_side_gains(ls, others, pairs):
  sim = lambda a, b: 1 - ref_cost_parts(a, b)[2]   # noqa: E731
  ids, gains = [], []
  if len(ls) <= 2:
    return None, float('-inf')
  for i in range(len(ls) - 1):
    cands = [Image.alpha_composite(ls[i], ls[i + 1])] + ([ls[i + 2]] if i + 2 < len(ls) else [])
    groups = [[others[q] for p, q in pairs if p == i], [others[q] for p, q in pairs if p == i + 1]]
    cur = sum(sim(ls[i], g) for g in groups[0]) + sum(sim(ls[i + 1], g) for g in groups[1])
    ds = [sum(sim(c, g) for g in grp) for c in cands for grp in groups]
    best = max(d + ds[0] for d in ds[1:])
    if best > cur:
      ids.append(i)
      gains.append(best - cur)
  if not gains:
    return None, float('-inf')
  return sorted(zip(ids, gains), key=lambda x: x[1], reverse=True)[0]


def ref_evaluate(pred, gt, max_edits=5):
  def grouped(stack):
    ims = [Image.fromarray(x) for x in stack]
    return [reduce(Image.alpha_composite, [ims[k] for k in g])
            for g in ref_groups(np.array([x[..., 3] for x in stack]))]
  pred, gt = grouped(pred), grouped(gt)
  path, scores = ref_dtw(pred, gt)
  out, merges = [{'edits': 0, **scores}], []
  while len(merges) < max_edits:
    p = ref_side_gains(pred, gt, path)
    g = ref_side_gains(gt, pred, [(b, a) for a, b in path])
    if p[0] is None and g[0] is None:
      break
    side, (i, gain), stack = ('pred', p, pred) if p[1] > g[1] else ('gt', g, gt)
    stack[i:i + 2] = [Image.alpha_composite(stack[i], stack[i + 1])]
    merges.append((side, i, gain))
    path, scores = ref_dtw(pred, gt)
    out.append({'edits': len(merges), **scores})
  return out, merges


def random_stacks(rng, size=10):
  """A ground truth of overlapping soft rectangles over a backdrop (opaque or not) and a
  prediction from it: pieces split in two overlapping halves, layers dropped or recoloured,
  alpha jittered, colour under zero alpha left random (RGB L1 sees it)."""
  def layer():
    x = rng.integers(0, 256, (size, size, 4)).astype(np.uint8)
    y0, x0 = rng.integers(0, size - 2, 2)
    y1, x1 = y0 + rng.integers(2, size - y0 + 1), x0 + rng.integers(2, size - x0 + 1)
    a = np.zeros((size, size), np.uint8)
    a[y0:y1, x0:x1] = rng.choice([255, 255, 128, 40])
    x[..., 3] = a
    return x
  backdrop = rng.integers(0, 256, (size, size, 4)).astype(np.uint8)
  backdrop[..., 3] = 255 if rng.random() < 0.7 else 0
  gt = [backdrop] + [layer() for _ in range(rng.integers(2, 6))]
  pred = [backdrop.copy()]
  for x in gt[1:]:
    r = rng.random()
    if r < 0.3:                                     # split into two overlapping halves
      cut = size // 2
      left, right = x.copy(), x.copy()
      left[:, cut + 1:, 3] = 0
      right[:, :cut, 3] = 0
      pred += [left, right]
    elif r < 0.4:
      continue
    else:
      y = x.copy()
      y[..., :3] = np.clip(y[..., :3].astype(int) + rng.integers(-40, 41, 3), 0, 255)
      y[..., 3] = np.where(y[..., 3] > 0, np.clip(y[..., 3].astype(int)
                                                  + rng.integers(-30, 31), 1, 255), 0)
      pred.append(y)
  return pred, gt


def test_matches_a_naive_implementation_on_random_stacks():
  rng = np.random.default_rng(19)
  sides = []
  for _ in range(40):
    pred, gt = random_stacks(rng)
    if len(pred) < 2:
      continue
    want_scores, want_merges = ref_evaluate(pred, gt)
    got = layerd.evaluate_sample(pred, gt)
    assert got.scores == want_scores
    assert [(m['side'], m['index'], m['gain']) for m in got.merges] == want_merges
    sides += [side for side, _, _ in want_merges]
  # The merge search really ran, on both sides (36 merges with this seed: 27 pred, 9 gt).
  assert sides.count('pred') >= 10 and sides.count('gt') >= 5


def test_crello_benchmark_command_prints_the_curve(tmp_path, capsys):
  """`python -m layerjax.evaluate --benchmark crello` on LayerD-format folders: sample a
  (split in 2 pieces) and b (in 3) give the curves of the two tests above, averaged with b's
  second edit beside a's carried-forward last scores; c has no prediction and is listed."""
  from layerjax.evaluate import __main__ as evaluate_cli
  stacks = {'a': [BG, rect(2, 5), rect(4, 6)], 'b': [BG, rect(2, 4), rect(3, 5), rect(4, 6)]}
  for sid, stack in stacks.items():
    for i, x in enumerate(stack):
      _png(tmp_path / 'pred' / sid / f'{i:04d}.png', x)
  for sid in ('a', 'b', 'c'):
    _png(tmp_path / 'gt' / sid / '0000.png', BG)
    _png(tmp_path / 'gt' / sid / '0001.png', X)
  out = tmp_path / 'out'
  assert evaluate_cli.main(['--benchmark', 'crello', '--ground-truth', str(tmp_path / 'gt'),
                            '--predictions', str(tmp_path / 'pred'), '--baselines', '',
                            '--out', str(out), '--no-progress']) == 0
  result = json.loads((out / 'results.json').read_text())
  scores = result['scores']
  assert scores['pred/layerd/edits_0/rgb_l1'] == approx((1 / 12 + 1 / 8) / 2)
  assert scores['pred/layerd/edits_1/alpha_iou'] == approx((1 + 3 / 4) / 2)
  assert scores['pred/layerd/edits_2/alpha_iou'] == 1.0
  assert 'pred/layerd/edits_3/alpha_iou' not in scores  # no sample made a third edit
  assert result['missing'] == {'pred': ['c']}
  assert [l['reached'] for l in result['notes']['pred/layerd']['curve']] == [2, 2, 1]
  for metric in ('rgb_l1', 'alpha_iou'):
    assert Image.open(out / f'edit_curve_{metric}.png').size[0] > 400
  assert '| layerd/edits_2/alpha_iou | higher | 1.0000 |' in capsys.readouterr().out
