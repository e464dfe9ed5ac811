"""The `folder` benchmark: any system's predictions on disk scored against ground truth on disk.

Both sides are folders of sample folders, matched by folder name. A sample folder is either
ours (`manifest.json`, `schema.write_folder`) or LayerD's format: PNGs sorted by name, back
to front, each layer named by its file's stem; its photo is their composite, over white
where it is not opaque (LayerD's backdrop).
Views (`views`): `scene` scores each sample whole; `box` scores each ground-truth object
on its own, as a box-prompted decomposition sees it: sample `<id>.<object>` holds the
background (every other layer composited, opaque), the object's shadow `shadow_1` and the
object `object_1`, prompted by the object's alpha box.

Nothing is dropped silently (`score`): ground-truth samples without a prediction and
predictions without ground truth are listed per system; a sample that cannot be read (not
a sample folder, an unreadable PNG, layers of different sizes, a manifest off the schema)
or whose prediction is not the ground truth's size is listed with the reason and not
scored; both are counted in the results. Evaluators count the problems they handle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

from layerjax.data import examples, schema
from layerjax.data.schema import Layer, LayeredSample, Prompt, SampleError
from layerjax.evaluate import layerd
from layerjax.evaluate.evaluators import Evaluator, Result
from layerjax.fileio import safe_name

VIEWS = ('scene', 'box')
# A system's predictions: a folder of sample folders, or a function of the ground truth.
Source = Union[Path, Callable[[LayeredSample], LayeredSample]]


def read_layerd(folder: Path) -> LayeredSample:
  """A folder of back-to-front PNG layers (LayerD's format, `layerd.read_layerd_folder`) as a
  sample (not validated)."""
  try:
    pixels = layerd.read_layerd_folder(folder)
  except ValueError as e:
    raise SampleError(str(e)) from None
  if not pixels:
    raise SampleError(f'{folder}: neither a sample folder (manifest.json) nor a folder of '
                      'PNG layers')
  layers = [Layer(f.stem, 'background' if i == 0 else 'object', x.astype(np.float32) / 255)
            for i, (f, x) in enumerate(zip(layerd.layer_files(folder), pixels))]
  rgba = schema.composite(layers)
  image = (rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]).astype(np.float32)
  return LayeredSample(folder.name, image, layers)


def read_sample(folder: Path) -> LayeredSample:
  """Our sample folder (validated) or LayerD's format; `SampleError` naming the folder."""
  if (folder / 'manifest.json').is_file():
    try:
      return schema.read_folder(folder)
    except FileNotFoundError as e:
      raise SampleError(str(e)) from None
  return read_layerd(folder)


def object_view(gt: LayeredSample, layer: Layer) -> LayeredSample:
  """`gt` as a box-prompted decomposition of `layer` sees it (see the module docstring): the
  targets the loader trains it with (`examples.referring_targets`)."""
  targets = examples.referring_targets(gt, layer.name)
  background = targets['background']
  layers = [Layer('background', 'background', np.concatenate(
      [background, np.ones_like(background[..., :1])], -1))]
  if any(l.kind == 'shadow' and l.owner == layer.name for l in gt.layers):
    layers.append(Layer('shadow_1', 'shadow', targets['shadow'], owner='object_1'))
  layers.append(dataclasses.replace(layer, name='object_1'))
  box = schema.alpha_bbox(layer.rgba[..., 3])
  return LayeredSample(f'{gt.id}.{safe_name(layer.name)}', gt.image, layers,
                       [Prompt('object_1', box=box)], dict(gt.provenance))


def views(gt: LayeredSample, view: str) -> list[LayeredSample]:
  if view == 'scene':
    return [gt]
  return [object_view(gt, l) for l in gt.layers
          if l.kind == 'object' and schema.alpha_bbox(l.rgba[..., 3]) is not None]


@dataclasses.dataclass
class Report:
  """Everything `score` found: per system and evaluator the `Result` and the rows; per
  system the ground-truth ids it has no prediction for (`missing`), its predictions with no
  ground truth (`unexpected`) and what was not scored and why (`invalid`: id -> reason);
  ground-truth folders that could not be read (`invalid_ground_truth`)."""
  results: dict[str, dict[str, Result]]
  rows: dict[str, dict[str, list[dict]]]
  missing: dict[str, list[str]]
  unexpected: dict[str, list[str]]
  invalid: dict[str, dict[str, str]]
  invalid_ground_truth: dict[str, str]
  samples: int

  def counts(self) -> dict[str, int]:
    out = {'ground_truth_samples': self.samples,
           'invalid_ground_truth': len(self.invalid_ground_truth)}
    for system in self.results:
      out[f'{system}/missing'] = len(self.missing[system])
      out[f'{system}/unexpected'] = len(self.unexpected[system])
      out[f'{system}/invalid'] = len(self.invalid[system])
    return out


def ground_truth(root: Path, view: str, bad: dict[str, str]) -> Iterator[LayeredSample]:
  """The samples under `root` in `view`, sorted by folder; unreadable ones go to `bad`."""
  for folder in schema.sample_folders(root):
    try:
      gt = read_sample(folder)
    except SampleError as e:
      bad[folder.name] = str(e)
      continue
    gt.id = folder.name
    yield from views(gt, view)


def _names(root: Path) -> set[str]:
  return {p.name for p in schema.sample_folders(root)}


def score(gt_root: Path, systems: dict[str, Source], evaluators: dict[str, Evaluator],
          view: str = 'scene', progress: bool = True) -> Report:
  """Every system's predictions of the samples under `gt_root` (in `view`) scored by every
  evaluator (see the module docstring). The first system is the one compared: the others
  (the baselines) are scored on the samples it has a valid prediction for, so every column
  of a table covers the same samples."""
  from tqdm import tqdm
  if view not in VIEWS:
    raise ValueError(f'view {view!r}: expected one of {VIEWS}')
  gt_root = Path(gt_root)
  folders = {s: _names(Path(src)) for s, src in systems.items() if not callable(src)}
  rows = {s: {n: [] for n in evaluators} for s in systems}
  missing = {s: [] for s in systems}
  invalid = {s: {} for s in systems}
  bad_gt: dict[str, str] = {}
  seen: set[str] = set()
  samples = 0
  total = len(schema.sample_folders(gt_root))
  first = next(iter(systems))
  for gt in tqdm(ground_truth(gt_root, view, bad_gt), desc='evaluating', unit='sample',
                 total=total if view == 'scene' else None, disable=not progress):
    samples += 1
    seen.add(gt.id)
    preds = {}
    for system, src in systems.items():
      if not callable(src) and gt.id not in folders[system]:
        missing[system].append(gt.id)
      else:
        try:
          pred = src(gt) if callable(src) else read_sample(Path(src) / gt.id)
          if pred.image.shape != gt.image.shape:
            raise SampleError(f'prediction is {pred.image.shape[1]}x{pred.image.shape[0]}, '
                              f'ground truth {gt.image.shape[1]}x{gt.image.shape[0]}')
          preds[system] = pred
        except SampleError as e:
          invalid[system][gt.id] = str(e)
      if system not in preds and system == first:
        break  # the others are scored on the samples the first one is
    for system, pred in preds.items():
      for name, e in evaluators.items():
        rows[system][name].append(e.score(gt.id, pred, gt))
  unexpected = {s: sorted(folders.get(s, set()) - seen - set(bad_gt)) for s in systems}
  results = {s: {n: evaluators[n].summarise(r) for n, r in by.items()} for s, by in rows.items()}
  return Report(results, rows, missing, unexpected, invalid, bad_gt, samples)
