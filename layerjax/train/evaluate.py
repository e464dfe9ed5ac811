"""Evaluation: sample decompositions of held-out examples with the flow sampler and score them
(`layerjax.evaluate.metrics`: RGB L1 and Alpha IoU per layer, plus the recomposition error), next to
trivial baselines:
  background  the input image itself
  foreground  the input cut by the prompt's box or mask (alpha 1 inside, 0 outside)
  shadow      an empty layer
Examples are drawn deterministically (`config.eval.seed`) with the eval prompt kinds and no
degradation, flip or zoom. Writes `eval/<split>_<step>.json` and a sample grid
`samples/<split>_<step>.png` (input | prompt | background | foreground | shadow |
recomposition, the layers over a checkerboard: `export.preview.sheet`) into the workdir.
"""

from __future__ import annotations

import json
from collections import defaultdict

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from layerjax import build, flow, parallel
from layerjax.fileio import as_path, atomic_file
from layerjax.data.pipeline import make_loader
from layerjax.data.schema import over
from layerjax.export import preview

LAYERS = ('background', 'foreground', 'shadow')


def eval_data_config(config, mesh) -> ml_collections.ConfigDict:
  """The loader config of evaluation on `mesh`: `eval.batch_per_device` examples per
  data-parallel device."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.global_batch_size = config.eval.batch_per_device * mesh.shape['data'] * mesh.shape['fsdp']
  d.prompt_probs = dict(config.eval.prompt_probs)
  d.degradations = {}
  d.hflip_prob = 0.0
  d.scale_range = (1.0, 1.0)
  d.num_workers = 0
  d.seed = config.eval.seed
  return d


def baselines(batch: dict) -> dict[str, np.ndarray]:
  """The trivial decompositions (RGBA, [B, H, W, 4]) the model must beat."""
  image = batch['image']
  ones = np.ones(image.shape[:-1] + (1,), np.float32)
  region = (batch['prompt'][..., 2:3] < 0.5).astype(np.float32)  # box / mask: not blue
  return {'background': np.concatenate([image, ones], -1),
          'foreground': np.concatenate([image, region], -1),
          'shadow': np.zeros(image.shape[:-1] + (4,), np.float32)}


def ground_truth(batch: dict) -> dict[str, np.ndarray]:
  ones = np.ones(batch['image'].shape[:-1] + (1,), np.float32)
  gt = {'background': np.concatenate([batch['background'], ones], -1),
        'foreground': batch['foreground'], 'shadow': batch['shadow']}
  gt['image'] = over(gt['foreground'], over(gt['shadow'], gt['background']))[..., :3]
  return gt


def score(pred: dict, gt: dict, layers) -> dict[str, list[float]]:
  """Per-example scores: `<layer>/rgb_l1`, `<layer>/alpha_iou` (and `recompose_l1`)."""
  out = defaultdict(list)
  for name in layers:
    for p, g in zip(pred[name], gt[name]):
      out[f'{name}/rgb_l1'].append(metrics.rgb_l1(p, g))
      out[f'{name}/alpha_iou'].append(metrics.alpha_iou(p[..., 3], g[..., 3]))
  if 'recomposition' in pred:
    out['recompose_l1'] = list(np.abs(pred['recomposition'] - gt['image']).mean(axis=(1, 2, 3)))
  return out


def grid(batch: dict, pred: dict, rows: int) -> np.ndarray:
  """uint8: a `preview.sheet` at the images' own size, one row per example (the first
  `rows`): input | prompt | background | foreground | shadow | recomposition, the predicted
  layers over the checkerboard; one the model does not predict is an empty tile captioned
  '<name>: none'."""
  b, h, w = batch['image'].shape[:3]
  empty = np.zeros((h, w, 4), np.float32)
  cols = (*LAYERS, 'recomposition')
  return preview.sheet([[('input', batch['image'][i]), ('prompt', batch['prompt'][i])]
                        + [(n, pred[n][i]) if n in pred else (f'{n}: none', empty) for n in cols]
                        for i in range(min(rows, b))], tile=max(h, w))


def _to_host(tree):
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def run(setup, state: dict, config, split: str, workdir, step: int, writer=None) -> dict:
  """Evaluates `state` (its EMA parameters if `eval.use_ema`) on `split`; returns the means."""
  ev = config.eval
  params = state['ema'] if ev.use_ema else state['params']
  graphdef = setup.graphdef
  layers = tuple(config.model.layers)

  @jax.jit
  def decompose(params, frozen, batch, rng):
    model = nnx.merge(graphdef, params, frozen)
    return flow.decompose(model, batch, rng, ev.sample_steps, config.loss.shift)

  text_fn = build.text_inputs(config)
  it = iter(make_loader(eval_data_config(config, setup.mesh), split, setup.mesh))
  scores = {'model': defaultdict(list), 'baseline': defaultdict(list)}
  picture = None
  with jax.set_mesh(setup.mesh):
    for i in range(ev.num_batches):
      batch = parallel.global_batch(build.model_batch(next(it), text_fn), setup.mesh)
      pred = _to_host(decompose(params, setup.frozen, batch,
                                jax.random.fold_in(jax.random.PRNGKey(ev.seed), i)))
      host = _to_host({k: batch[k] for k in build.ARRAY_KEYS})
      gt = ground_truth(host)
      for who, p in (('model', pred), ('baseline', baselines(host))):
        for k, v in score(p, gt, layers).items():
          scores[who][k].extend(v)
      if picture is None:
        picture = grid(host, pred, ev.grid_rows)
  result = {f'{who}/{k}': float(np.nanmean(v)) for who, s in scores.items()
            for k, v in sorted(s.items()) if who == 'model' or k != 'recompose_l1'}
  result['examples'] = len(next(iter(scores['model'].values())))
  if jax.process_index() == 0:
    workdir = as_path(workdir)
    with atomic_file(workdir / 'eval' / f'{split}_{step}.json') as tmp:
      tmp.write_text(json.dumps(result, indent=2) + '\n')
    with atomic_file(workdir / 'samples' / f'{split}_{step}.png') as tmp:
      Image.fromarray(picture).save(tmp, format='PNG')
    if writer is not None:
      writer.write_scalars(step, {f'{split}/{k}': v for k, v in result.items()})
      writer.write_images(step, {f'{split}/samples': picture})
  return result


def table(result: dict, layers=LAYERS) -> str:
  """A plain-text comparison of the model with the baselines."""
  lines = [f'{"":<30}{"model":>10}{"baseline":>10}']
  for name in layers:
    for m, better in (('rgb_l1', 'lower'), ('alpha_iou', 'higher')):
      k = f'{name}/{m}'
      if f'model/{k}' in result:
        lines.append(f'{k + " (" + better + ")":<30}{result[f"model/{k}"]:>10.4f}'
                     f'{result.get(f"baseline/{k}", float("nan")):>10.4f}')
  if 'model/recompose_l1' in result:
    lines.append(f'{"recompose_l1 (lower)":<30}{result["model/recompose_l1"]:>10.4f}')
  return '\n'.join(lines)
