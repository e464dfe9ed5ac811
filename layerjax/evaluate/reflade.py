"""RefLade's human-preference-aligned score (HPA) and Pass-rate@K (`METRICS.md`; RefLade §3.3).

For a ground-truth layer `g` (rgb, alpha `g_a`, visible mask `g_v`), its prediction `p` and
the image without the layer `i_bkgd`:
  S_vis  LPIPS(g_rgb * g_v, p_rgb * g_v) on the crop to the tight box of `g_a > 0`; lower is
         better.
  S_gen  cos(f(g_rgb) - f(g_rgb * g_v), f(p_rgb) - f(g_rgb * g_v)) with L2-normalised CLIP
         image features `f`, on the same crop; higher is better. Undefined (NaN, skipped and
         counted) where a direction is zero, e.g. a fully visible layer whose RGB is 0 where
         its alpha is.
  S_fid  FID between the sets {p_rgb p_a + i_bkgd (1 - p_a)} and {g_rgb g_a + i_bkgd (1 - g_a)},
         each cropped to the tight box of its own alpha > 0 (the predicted layer's, as the
         paper blends "the predicted RGBA layer" and crops "around the non-zero alpha
         region"); a prediction with empty alpha is cropped to the ground truth's box.
         Lower is better; it needs two samples in a group, else it and HPA are None.
  HPA    the mean of the three, each min-max normalised with bounds from the benchmark's
         config, per layer kind (lower-is-better ones flipped: `(hi - s) / (hi - lo)`), not
         clipped, so a system outside the bounds scores outside [0, 1].
Scores are per group: layer kind ('foreground', 'background'), per prompt type, and the
occluded layers among them (HPA_occ: the visible mask a strict subset of `g_a > 0`).

The networks are passed in (`Networks`): LPIPS and FID's Inception from
`layerjax.evaluate.lpips` / `inception`, CLIP from `CLIPFeatures` here (Hugging Face
transformers' CLIP from a local folder). Each states the weights it used; a result with
random or stand-in weights carries `is_metric: False` and says so in every summary line.

Pass-rate@K (RefLade §5.4, with the data engine's judge in place of annotators): K
predictions per input, each accepted when the agent's `judge(photo, sample).score` reaches
`min_score`, as `data_engine.stages.postfilter` accepts; pass@k = the fraction of inputs with
at least one of their first k predictions accepted.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from layerjax.data.schema import LayeredSample, alpha_bbox, composite
from layerjax.evaluate.metrics import NOT_METRIC, RANDOM

SCORES = ('S_vis', 'S_gen', 'S_fid')
LOWER_IS_BETTER = {'S_vis': True, 'S_gen': False, 'S_fid': True}
KINDS = ('foreground', 'background')
NETWORKS = ('lpips', 'clip', 'inception')

# RefLade does not publish its bounds. These are fitted by least squares to its Table 3 (8
# systems per layer kind; HPA against FID, LPIPS and DIR), with the lower bounds of FID and
# LPIPS and the upper bound of DIR fixed at their theoretical 0, 0 and 1. They reproduce the
# published background HPAs to 1.2e-4 (the table's rounding) but the foreground ones only to
# 1.6e-3, so the foreground bounds are approximate. A benchmark config may name them.
TABLE3_FIT_BOUNDS = {
    'foreground': {'S_vis': (0.0, 0.2736), 'S_gen': (0.1947, 1.0), 'S_fid': (0.0, 66.30)},
    'background': {'S_vis': (0.0, 0.2391), 'S_gen': (0.5190, 1.0), 'S_fid': (0.0, 39.96)},
}


@dataclasses.dataclass(frozen=True)
class Pair:
  """One ground-truth layer and its prediction, both straight RGBA float [H, W, 4] in [0, 1]."""
  id: str
  gt: np.ndarray
  pred: np.ndarray
  visible: np.ndarray          # [H, W] bool: where the ground-truth layer is seen in the image
  background: np.ndarray       # [H, W, 3]: the image with the layer removed (i_bkgd)
  kind: str = 'foreground'     # one of KINDS
  prompt: str = ''             # the prompt type, e.g. 'box', 'text+box'

  @property
  def occluded(self) -> bool:
    """The visible mask is a strict subset of the ground truth's alpha > 0."""
    covered = self.gt[..., 3] > 0
    return bool(not (self.visible & ~covered).any() and (covered & ~self.visible).any())


@dataclasses.dataclass(frozen=True)
class Networks:
  """The perceptual networks, each with the weights it used (a file or folder, or a text with
  NOT_METRIC for random or stand-in weights)."""
  lpips: Callable[[np.ndarray, np.ndarray], np.ndarray]  # NHWC [0, 1] pairs -> [B]
  clip: Callable[[Sequence[np.ndarray]], np.ndarray]     # HWC [0, 1] images -> [B, D], unit
  fid_features: Callable[[np.ndarray], np.ndarray]       # NHWC [0, 1] -> [B, D]
  frechet_distance: Callable[[np.ndarray, np.ndarray], float]
  weights: Mapping[str, str]                              # NETWORKS -> what was loaded

  @property
  def is_metric(self) -> bool:
    return all(NOT_METRIC not in str(self.weights.get(n, NOT_METRIC)) for n in NETWORKS)


# --- inputs -------------------------------------------------------------------------------

def check_pair(pair: Pair) -> None:
  """Raises ValueError naming the pair and the problem."""
  gt, pred = pair.gt, pair.pred
  if gt.ndim != 3 or gt.shape[-1] != 4:
    raise ValueError(f'reflade pair {pair.id!r}: ground truth has shape {gt.shape}, '
                     f'expected [H, W, 4]')
  if pred.shape != gt.shape:
    raise ValueError(f'reflade pair {pair.id!r}: prediction has shape {pred.shape}, the '
                     f'ground truth {gt.shape}')
  hw = gt.shape[:2]
  if pair.visible.shape != hw or pair.visible.dtype != np.bool_:
    raise ValueError(f'reflade pair {pair.id!r}: visible mask must be bool {hw}, got '
                     f'{pair.visible.dtype} {pair.visible.shape}')
  if pair.background.shape != (*hw, 3):
    raise ValueError(f'reflade pair {pair.id!r}: background has shape '
                     f'{pair.background.shape}, expected {(*hw, 3)}')
  for field, x in (('ground truth', gt), ('prediction', pred), ('background', pair.background)):
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
      raise ValueError(f'reflade pair {pair.id!r}: {field} has NaN or values outside [0, 1]')
  if alpha_bbox(gt[..., 3]) is None:
    raise ValueError(f'reflade pair {pair.id!r}: the ground-truth layer is empty (alpha 0)')
  if pair.kind not in KINDS:
    raise ValueError(f'reflade pair {pair.id!r}: kind {pair.kind!r}, expected one of {KINDS}')


def pairs_from_sample(gt: LayeredSample, predictions: Mapping[str, np.ndarray],
                      prompt: str = '') -> list[Pair]:
  """One `Pair` per predicted layer of `gt` (`predictions`: GT layer name -> predicted RGBA).

  Object layers are 'foreground', the background layer 'background'. `i_bkgd` is the
  composite of the other ground-truth layers without the shadows the layer owns (the scene
  with the object removed), over black where they leave it uncovered."""
  pairs = []
  for name, pred in predictions.items():
    layer = gt.layer(name)
    if layer.kind == 'shadow':
      raise ValueError(f'sample {gt.id!r}: layer {name!r} is a shadow; HPA scores objects and '
                       f'backgrounds')
    others = [lay.rgba for lay in gt.layers if lay is not layer and lay.owner != name]
    rest = composite(others) if others else np.zeros_like(layer.rgba)
    pairs.append(Pair(
        id=f'{gt.id}/{name}', gt=layer.rgba, pred=np.asarray(pred, np.float32),
        visible=layer.visible_mask, background=rest[..., :3] * rest[..., 3:],
        kind='background' if layer.kind == 'background' else 'foreground', prompt=prompt))
  return pairs


# --- the views each score sees ------------------------------------------------------------

def _crop(x: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  x0, y0, x1, y1 = box
  return x[y0:y1, x0:x1]


def visible_views(pair: Pair) -> tuple[np.ndarray, ...]:
  """(g_rgb, g_rgb * g_v, p_rgb, p_rgb * g_v), each cropped to the box of `g_a > 0`."""
  box = alpha_bbox(pair.gt[..., 3])
  v = _crop(pair.visible, box)[..., None]
  g, p = _crop(pair.gt[..., :3], box), _crop(pair.pred[..., :3], box)
  return g, g * v, p, p * v


def blended_views(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
  """(g_hat, p_hat): each layer over `i_bkgd`, cropped to the box of its own alpha > 0."""
  gt_box = alpha_bbox(pair.gt[..., 3])
  views = []
  for layer in (pair.gt, pair.pred):
    a = layer[..., 3:]
    blended = layer[..., :3] * a + pair.background * (1 - a)
    views.append(_crop(blended, alpha_bbox(layer[..., 3]) or gt_box))
  return views[0], views[1]


# --- normalisation ------------------------------------------------------------------------

def check_bounds(bounds: Mapping[str, Any],
                 kinds: Sequence[str] = KINDS) -> dict[str, dict[str, tuple[float, float]]]:
  """`bounds` {kind: {score: (lo, hi)}} for each of `kinds` and every score in SCORES, with
  lo < hi; raises ValueError naming the kind and score."""
  out = {}
  for kind in kinds:
    if kind not in bounds:
      raise ValueError(f'reflade bounds: no bounds for {kind!r} layers')
    missing = [s for s in SCORES if s not in bounds[kind]]
    if missing:
      raise ValueError(f'reflade bounds: {kind} misses {missing} (each score needs (lo, hi))')
    out[kind] = {}
    for s in SCORES:
      b = tuple(bounds[kind][s])
      if len(b) != 2 or not all(math.isfinite(float(v)) for v in b) or b[0] >= b[1]:
        raise ValueError(f'reflade bounds: {kind} {s} = {b} is not (lo, hi) with lo < hi')
      out[kind][s] = (float(b[0]), float(b[1]))
  return out


def normalise(score: str, value: float, bounds: Mapping[str, tuple[float, float]]) -> float:
  """Min-max to [lo, hi] -> [0, 1], flipped when lower is better; not clipped."""
  lo, hi = bounds[score]
  return (hi - value) / (hi - lo) if LOWER_IS_BETTER[score] else (value - lo) / (hi - lo)


def hpa(scores: Mapping[str, float | None],
        bounds: Mapping[str, tuple[float, float]]) -> float | None:
  """The mean of the normalised S_vis, S_gen and S_fid (`bounds` of one layer kind); None
  when one is undefined."""
  if any(scores.get(s) is None for s in SCORES):
    return None
  return float(np.mean([normalise(s, scores[s], bounds) for s in SCORES]))


# --- scoring ------------------------------------------------------------------------------

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float('nan')


def _groups(pairs: Sequence[Pair]) -> dict[str, list[int]]:
  groups: dict[str, list[int]] = {}
  for i, pair in enumerate(pairs):
    names = [pair.kind] + ([f'{pair.kind}/{pair.prompt}'] if pair.prompt else [])
    if pair.occluded:
      names += [f'{n}/occluded' for n in names]
    for name in names:
      groups.setdefault(name, []).append(i)
  return groups


def score(pairs: Sequence[Pair], nets: Networks, bounds: Mapping[str, Any],
          progress: Callable[[Sequence], Sequence] = lambda xs: xs) -> dict[str, Any]:
  """HPA and its parts per group (see the module docstring), with the bounds and weights.

  Returns {'bounds', 'weights', 'is_metric', 'groups': {name: {'n', 'S_vis', 'S_gen',
  'S_fid', 'HPA', 'S_gen_undefined'}}, 'rows': per pair (id, kind, prompt, occluded, S_vis,
  S_gen)}. Group names: 'foreground', 'foreground/occluded' (HPA_frgd, HPA_occ),
  'foreground/<prompt>', 'foreground/<prompt>/occluded', the same for 'background'."""
  if not pairs:
    raise ValueError('reflade: no pairs to score')
  for pair in pairs:
    check_pair(pair)
  bounds = check_bounds(bounds, sorted({pair.kind for pair in pairs}))
  rows, fid_gt, fid_pred = [], [], []
  for pair in progress(pairs):
    g, g_vis, p, p_vis = visible_views(pair)
    s_vis = float(np.asarray(nets.lpips(g_vis[None], p_vis[None])).reshape(-1)[0])
    f_g, f_gv, f_p = nets.clip([g, g_vis, p])
    g_hat, p_hat = blended_views(pair)
    fid_gt.append(np.asarray(nets.fid_features(g_hat[None]))[0])
    fid_pred.append(np.asarray(nets.fid_features(p_hat[None]))[0])
    rows.append({'id': pair.id, 'kind': pair.kind, 'prompt': pair.prompt,
                 'occluded': pair.occluded, 'S_vis': s_vis,
                 'S_gen': _cosine(f_g - f_gv, f_p - f_gv)})
  groups = {}
  for name, idx in sorted(_groups(pairs).items()):
    gen = np.array([rows[i]['S_gen'] for i in idx])
    s = {'S_vis': float(np.mean([rows[i]['S_vis'] for i in idx])),
         'S_gen': float(np.nanmean(gen)) if np.isfinite(gen).any() else None,
         'S_fid': (float(nets.frechet_distance(np.stack([fid_pred[i] for i in idx]),
                                               np.stack([fid_gt[i] for i in idx])))
                   if len(idx) >= 2 else None)}
    groups[name] = {'n': len(idx), **s, 'HPA': hpa(s, bounds[name.split('/')[0]]),
                    'S_gen_undefined': int((~np.isfinite(gen)).sum())}
  return {'benchmark': 'reflade', 'bounds': bounds, 'weights': dict(nets.weights),
          'is_metric': nets.is_metric, 'groups': groups, 'rows': rows}


def summary(result: Mapping[str, Any]) -> list[str]:
  """One line per group, each with the bounds and the weights behind it."""
  bounds = {kind: ', '.join(f'{s} [{lo:g}, {hi:g}]' for s, (lo, hi) in b.items())
            for kind, b in result['bounds'].items()}
  weights = ', '.join(f'{n}: {w}' for n, w in result['weights'].items())
  tag = '' if result['is_metric'] else f' -- NOT the metric {NOT_METRIC}: {weights}'
  fmt = lambda v: 'n/a' if v is None else f'{v:.4f}'
  return [f'reflade {name} (n={g["n"]}): HPA {fmt(g["HPA"])}, S_vis {fmt(g["S_vis"])}, '
          f'S_gen {fmt(g["S_gen"])}, S_fid {fmt(g["S_fid"])}; '
          f'bounds {bounds[name.split("/")[0]]}; '
          f'weights {weights}{tag}' for name, g in result['groups'].items()]


# --- Pass-rate@K --------------------------------------------------------------------------

def pass_rate(inputs: Sequence[tuple[str, np.ndarray, Sequence[LayeredSample]]], agent,
              ks: Sequence[int], min_score: float) -> dict[str, Any]:
  """`inputs`: (id, photo [H, W, 3], predictions) each with at least max(ks) predictions;
  `agent` has the data engine's `judge(photo, sample) -> Judgement(score, reason)`.

  Returns {'pass@k': fraction, ..., 'inputs', 'min_score', 'judge', 'rows'}; a row holds
  each judged prediction's score and reason."""
  if not ks or min(ks) < 1:
    raise ValueError(f'pass_rate: ks {tuple(ks)} must be positive')
  if not inputs:
    raise ValueError('pass_rate: no inputs')
  k_max = max(ks)
  for sid, _, predictions in inputs:
    if len(predictions) < k_max:
      raise ValueError(f'pass_rate: input {sid!r} has {len(predictions)} predictions, '
                       f'pass@{k_max} needs {k_max}')
  rows, accepted = [], []
  for sid, photo, predictions in inputs:
    judged = [agent.judge(photo, sample) for sample in predictions[:k_max]]
    accepted.append([j.score >= min_score for j in judged])
    rows.append({'id': sid, 'scores': [j.score for j in judged],
                 'reasons': [j.reason for j in judged]})
  out = {f'pass@{k}': float(np.mean([any(a[:k]) for a in accepted])) for k in sorted(ks)}
  return {**out, 'inputs': len(inputs), 'min_score': min_score,
          'judge': type(agent).__name__, 'rows': rows}


# --- CLIP ---------------------------------------------------------------------------------

class CLIPFeatures:
  """CLIP image (and text) features, L2-normalised, from Hugging Face transformers' torch
  `CLIPModel` with its own image processor (resize, centre crop, normalisation) and
  tokenizer. Images go in as float [0, 1] and are quantised to 8 bits first, as the
  processor sees a PNG."""

  def __init__(self, model, processor, tokenizer, weights: str):
    self.model, self.processor, self.tokenizer = model.eval(), processor, tokenizer
    self.weights = weights

  @classmethod
  def load(cls, folder) -> 'CLIPFeatures':
    """From a local folder saved by `save_pretrained` (never a hub download); the tokenizer
    only when the folder has one (text features need it)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder = Path(folder)
    if not (folder / 'config.json').is_file():
      raise FileNotFoundError(f'{folder}: no CLIP model here (config.json missing)')
    if not (folder / 'preprocessor_config.json').is_file():
      raise FileNotFoundError(f'{folder}: no CLIP image processor (preprocessor_config.json '
                              f'missing)')
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    tokenizer = (CLIPTokenizer.from_pretrained(folder, local_files_only=True)
                 if (folder / 'vocab.json').is_file() else None)
    return cls(model, processor, tokenizer, str(folder))

  @classmethod
  def random(cls, config, processor, tokenizer=None, seed: int = 0) -> 'CLIPFeatures':
    """Random weights from a `CLIPConfig`, for tests; flagged as not the metric."""
    import torch
    from transformers import CLIPModel
    torch.manual_seed(seed)
    return cls(CLIPModel(config), processor, tokenizer, RANDOM)

  def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return self.image_features(images)

  def image_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
    import torch
    from PIL import Image
    pil = [Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)) for x in images]
    pixels = self.processor(images=pil, return_tensors='pt')['pixel_values']
    with torch.no_grad():
      pooled = self.model.vision_model(pixel_values=pixels).pooler_output
      f = self.model.visual_projection(pooled)
    return _unit(f.double().numpy())

  def text_features(self, texts: Sequence[str]) -> np.ndarray:
    import torch
    if self.tokenizer is None:
      raise ValueError(f'CLIP {self.weights}: no tokenizer loaded, so no text features')
    tokens = self.tokenizer(list(texts), padding=True, return_tensors='pt')
    with torch.no_grad():
      pooled = self.model.text_model(input_ids=tokens['input_ids'],
                                     attention_mask=tokens['attention_mask']).pooler_output
      f = self.model.text_projection(pooled)
    return _unit(f.double().numpy())


def _unit(f: np.ndarray) -> np.ndarray:
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def clip_directional_similarity(clip: CLIPFeatures, before: np.ndarray, after: np.ndarray,
                                text_before: str, text_after: str) -> float:
  """InstructPix2Pix's `cos(f_img(after) - f_img(before), f_txt(after) - f_txt(before))`."""
  fi = clip.image_features([before, after])
  ft = clip.text_features([text_before, text_after])
  return _cosine(fi[1] - fi[0], ft[1] - ft[0])
