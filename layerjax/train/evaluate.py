"""The trainer's periodic evaluation: sample decompositions of held-out examples with the flow
sampler and run the configured evaluators (`config.eval.evaluators`, looked up by name in
`layerjax.evaluate.evaluators`; by default `layers`: RGB L1 and Alpha IoU per layer and the
recomposition error) on the model, on its layers as `Decomposer` returns them to users
(`exact`: thresholded and solved exactly against the photo) and on the trivial baseline
(`evaluate.baselines.trivial`: the input as the background, the input cut by the prompt's
box or mask as the foreground, an empty shadow). `Evaluation` jits the sampler once per
training run, so only the first evaluation compiles.
Examples are drawn deterministically (`config.eval.seed`) with the eval prompt kinds and no
degradation, flip or zoom. Writes `eval/<split>_<step>.json` and a sample grid
`samples/<split>_<step>.png` (input | prompt | background | foreground | shadow |
recomposition, the layers over a checkerboard: `export.preview.sheet`) into the workdir;
`--mode=eval` with other `eval` keys than the run recorded names them after those keys
(`test_900.seed=3.json`, `name_suffix`), so it never writes over the run's own evaluation.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from layerjax import build, flow, parallel
from layerjax.checkpoints import CONFIG
from layerjax.fileio import as_path, atomic_file, read_json
from layerjax.data.pipeline import make_loader
from layerjax.data.schema import Layer, LayeredSample, Prompt
from layerjax.evaluate import baselines, evaluators, outputs
from layerjax.export import preview
from layerjax.infer import decomposer

LAYERS = ('background', 'foreground', 'shadow')
KINDS = {'background': 'background', 'foreground': 'object', 'shadow': 'shadow'}
NAMES = {kind: name for name, kind in KINDS.items()}
MODEL = 'model'
# The model's layers as `Decomposer.decompose` returns them to users: thresholded and solved
# exactly against the photo (`infer.decomposer.exact`), so the background is the photo
# wherever no layer covers it.
EXACT = 'exact'


def eval_data_config(config, mesh) -> ml_collections.ConfigDict:
  """The loader config of evaluation on `mesh`: `eval.batch_per_device` examples per
  data-parallel device."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.global_batch_size = config.eval.batch_per_device * mesh.shape['data'] * mesh.shape['fsdp']
  d.prompt_probs = dict(config.eval.prompt_probs)
  d.degradations = {}
  d.checkerboard_jitter = 0.0  # the board `Decomposer` gives the model
  d.hflip_prob = 0.0
  d.scale_range = (1.0, 1.0)
  d.num_workers = 0
  d.seed = config.eval.seed
  return d


def region(batch: dict) -> np.ndarray:
  """[B, H, W] bool: the prompt map's box or mask (not blue), the trivial baseline's cut."""
  return batch['prompt'][..., 2] < 0.5


def as_samples(layers: dict[str, np.ndarray], image: np.ndarray, ids: list[str],
               regions: np.ndarray | None = None) -> list[LayeredSample]:
  """Per example, the `LAYERS` present in `layers` ({name: RGBA [B, H, W, 4]}) as a
  `LayeredSample` of photo `image` [B, H, W, 3], back to front (background, shadow,
  foreground), with the foreground's prompt region as its prompt's mask; not validated
  (a model's layers need not recompose to the photo)."""
  names = [n for n in ('background', 'shadow', 'foreground') if n in layers]
  out = []
  for i, sid in enumerate(ids):
    stack = [Layer(n, KINDS[n], np.asarray(layers[n][i], np.float32),
                   owner='foreground' if n == 'shadow' else None) for n in names]
    prompts = ([Prompt('foreground', mask=regions[i])]
               if regions is not None and 'foreground' in names else [])
    out.append(LayeredSample(sid, np.asarray(image[i], np.float32), stack, prompts))
  return out


def as_decomposed(pred: dict[str, np.ndarray], image: np.ndarray) -> dict[str, np.ndarray]:
  """`pred`'s layers ({name: RGBA [B, H, W, 4]}) per example through
  `infer.decomposer.exact`, back under the same names; a shadow it drops (too faint) is
  an empty layer."""
  out = {n: np.zeros_like(pred[n]) for n in LAYERS if n in pred}
  for i in range(len(image)):
    solved = decomposer.exact({n: v[i] for n, v in pred.items()}, image[i])
    for layer in solved:
      name = NAMES[layer.kind]
      if name in out:
        out[name][i] = layer.rgba
  return out


def ground_truth(batch: dict, layers, ids: list[str]) -> list[LayeredSample]:
  """The examples' layers among `layers` as samples of their input photo."""
  ones = np.ones(batch['image'].shape[:-1] + (1,), np.float32)
  gt = {'background': np.concatenate([batch['background'], ones], -1),
        'foreground': batch['foreground'], 'shadow': batch['shadow']}
  return as_samples({n: gt[n] for n in layers}, batch['image'], ids, region(batch))


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


class Evaluation:
  """The periodic evaluation of one training run: its sampler jitted once (so every
  evaluation after the first reuses the compiled program), its evaluators built once from
  `eval.evaluators`, a loader per split."""

  def __init__(self, setup, config):
    self.setup, self.config = setup, config
    ev = config.eval
    graphdef = setup.graphdef

    def decompose(params, frozen, batch, rng):
      model = nnx.merge(graphdef, params, frozen)
      return flow.decompose(model, batch, rng, ev.sample_steps, config.loss.shift)

    self.decompose = jax.jit(decompose)
    self.evaluators = {name: evaluators.create(name, **dict(options))
                       for name, options in ev.evaluators.items()}
    self.text_fn = build.text_inputs(config)
    self.loaders = {}

  def run(self, state: dict, split: str, workdir, step: int, writer=None,
          name_suffix: str = '') -> dict:
    """Evaluates `state` (its EMA parameters if `eval.use_ema`) on `split`; returns the
    flat scores (`outputs.flatten`) and `examples`. The files are named
    `<split>_<step><name_suffix>`."""
    ev, mesh = self.config.eval, self.setup.mesh
    params = state['ema'] if ev.use_ema else state['params']
    if split not in self.loaders:
      self.loaders[split] = make_loader(eval_data_config(self.config, mesh), split, mesh)
    it = iter(self.loaders[split])
    # A model without a foreground layer has no object for the exact solve to place.
    exact = 'foreground' in self.config.model.layers
    systems = (MODEL, EXACT, baselines.TRIVIAL) if exact else (MODEL, baselines.TRIVIAL)
    rows = {s: {name: [] for name in self.evaluators} for s in systems}
    picture = None
    with jax.set_mesh(mesh):
      for i in range(ev.num_batches):
        batch = parallel.global_batch(build.model_batch(next(it), self.text_fn), mesh)
        pred = _to_host(self.decompose(params, self.setup.frozen, batch,
                                       jax.random.fold_in(jax.random.PRNGKey(ev.seed), i)))
        host = _to_host({k: batch[k] for k in build.ARRAY_KEYS})
        ids = [f'{split}/{i}/{j}' for j in range(len(host['image']))]
        gts = ground_truth(host, self.config.model.layers, ids)
        preds = {MODEL: as_samples(pred, host['image'], ids),
                 baselines.TRIVIAL: [baselines.trivial(g) for g in gts]}
        if exact:
          preds[EXACT] = as_samples(as_decomposed(pred, host['image']), host['image'], ids)
        for system in systems:
          for name, e in self.evaluators.items():
            rows[system][name] += [e.score(g.id, p, g) for p, g in zip(preds[system], gts)]
        if picture is None:
          picture = grid(host, pred, ev.grid_rows)
    results = {s: {n: self.evaluators[n].summarise(r) for n, r in by.items()}
               for s, by in rows.items()}
    result = outputs.flatten(results)
    result['examples'] = ev.num_batches * len(ids)
    notes = {f'{s}/{n}': r.notes for s, by in results.items() for n, r in by.items() if r.notes}
    if jax.process_index() == 0:
      workdir = as_path(workdir)
      name = f'{split}_{step}{name_suffix}'
      with atomic_file(workdir / 'eval' / f'{name}.json') as tmp:
        tmp.write_text(json.dumps({**result, **({'notes': notes} if notes else {})},
                                  indent=2, default=str) + '\n')
      with atomic_file(workdir / 'samples' / f'{name}.png') as tmp:
        Image.fromarray(picture).save(tmp, format='PNG')
      if writer is not None:
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in result.items()})
        writer.write_images(step, {f'{split}/samples': picture})
    return result


def name_suffix(config, workdir) -> str:
  """'' when `config.eval` is the `eval` the run in `workdir` recorded (its config.json),
  since the evaluation then repeats the run's own, or when it recorded none; otherwise '.'
  and the keys that differ, e.g. '.num_batches=8,seed=3' (a key with a non-scalar value by
  name only), so an evaluation at another seed or size is kept beside the run's, not written
  over it. The split is in the name already."""
  recorded = as_path(workdir) / CONFIG
  if not recorded.is_file():
    return ''
  ours, theirs = config.eval.to_dict(), read_json(recorded).get('eval', {})
  scalar = lambda v: isinstance(v, (str, int, float, bool)) or v is None
  keys = sorted(k for k in ours.keys() | theirs.keys()
                if k != 'split' and ours.get(k) != theirs.get(k))
  return ''.join(['.', ','.join(f'{k}={ours.get(k)}' if scalar(ours.get(k)) else k
                                for k in keys)]) if keys else ''


def table(result: dict) -> str:
  """The model beside the baselines: `outputs.markdown` of the flat scores."""
  return outputs.markdown(result)
