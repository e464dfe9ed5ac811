"""Grain loader: `layered` TFDS records -> batches of referring-decomposition examples.

Deterministic: the order is a Grain shuffle seeded from `config.seed`, and every random
choice of an example (target object, prompt kinds, scale, crop, flip, checkerboard colours) comes
from Grain's per-element generator derived from the same seed and the element's index, so
the same config gives the same batches with any number of workers, and the iterator's state
(`iterator.get_state()` / `set_state`) resumes exactly at the next batch.
Multi-host: example `i` of the global stream is drawn from its own generator (seed, i)
whichever process reads it, and each process yields the rows of every global batch that its
devices hold on the mesh (`parallel.process_rows`), to be assembled into a global
`jax.Array` by `parallel.global_batch`: P processes see exactly the batches one would.

Config keys (an `ml_collections.ConfigDict` or any object with these attributes):
  name, data_dir, seed, global_batch_size, image_size (H, W), num_workers,
  scale_range (lo, hi): zoom over the scale at which the sample just covers image_size,
  (1, 1) = resize to cover then crop; samples of any size are accepted,
  prompt_probs {kinds: probability} with kinds '+'-joined from box, mask, point, text,
  point_sigma, hflip_prob, checkerboard_cell, checkerboard_jitter,
  degradations (see `layerjax.data.degrade`; empty for none), boundary_band (pixels),
  and optionally cond_dropout: the probability that an example is unconditional (the blank
  prompt map, no text; for classifier-free guidance), which the trainer sets on the train
  split's loader from `loss.cond_dropout`.
"""

from __future__ import annotations

import os

import grain
from absl import flags
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from layerjax import config_spec as spec
from layerjax import parallel
from layerjax.data import degrade, examples
from layerjax.data.schema import LayeredSample, Prompt, composite, over
from layerjax.data.tfds_builder import from_example
from layerjax.fileio import as_path

def text_for(layer) -> str:
  texts = [*layer.referring, layer.caption, layer.label]
  return next((t for t in texts if t), '')


def make_example(sample: LayeredSample, rng: np.random.Generator, config) -> dict:
  """One referring example at full resolution, then the same crop and flip for every map."""
  # Independent streams, so enabling one option (e.g. degradations) leaves the others' draws.
  seeds = rng.integers(2**63, size=4)
  # The dropout draws from what follows the seeds, and only when enabled: without it every
  # example is as before, with it a dropped example differs only in its prompt and text.
  dropout = getattr(config, 'cond_dropout', 0.0)
  unconditional = dropout > 0 and rng.uniform() < dropout
  rng, rng_degrade, rng_board, rng_geometry = map(np.random.default_rng, seeds)
  objects = [l for l in sample.layers if l.kind == 'object']
  if not objects:
    raise ValueError(f'sample {sample.id!r}: no object layer to refer to')
  target = objects[rng.integers(len(objects))]
  prompt = next((p for p in sample.prompts if p.target == target.name), None)
  combos, weights = examples.parse_prompt_probs(config.prompt_probs)
  kinds = combos[rng.choice(len(combos), p=weights)]
  if prompt is None and kinds & set(examples.SPATIAL):
    raise ValueError(f'sample {sample.id!r}: no spatial prompt for {target.name!r}')
  if unconditional:  # no kind shown: the all-blue prompt map and the empty text
    kinds = frozenset()
  targets = examples.referring_targets(sample, target.name)
  board = examples.checkerboard(sample.size, config.checkerboard_cell, rng_board,
                                config.checkerboard_jitter)
  band = degrade.boundary_band(target.rgba[..., 3], config.boundary_band)
  image, applied = _degraded_input(sample, target, band, rng_degrade, config)
  maps = {
      'image': image,
      'boundary': band[..., None].astype(np.float32),
      'prompt': examples.render_prompt(sample.size, prompt or Prompt(target.name), kinds,
                                       config.point_sigma),
      **targets,
      'checkerboard': board[..., :3],
      'foreground_on_checkerboard': over(targets['foreground'], board)[..., :3],
      'shadow_on_checkerboard': over(targets['shadow'], board)[..., :3],
  }
  maps = _crop_and_flip(maps, sample, rng_geometry, config)
  return {**maps, 'text': text_for(target) if 'text' in kinds else '',
          'prompt_kinds': '+'.join(sorted(kinds)), 'degradations': '+'.join(applied)}


def _degraded_input(sample: LayeredSample, target, band, rng, config):
  """The input image recomposed with a degraded target (LiWi); the clean one if none apply."""
  if not config.degradations:
    return sample.image, []
  i = sample.layers.index(target)
  behind = composite(sample.layers[:i])[..., :3]
  rgba, applied = degrade.degrade(target.rgba, behind, band, config.degradations, rng)
  if not applied:
    return sample.image, []
  layers = [l.rgba for l in sample.layers]
  layers[i] = rgba
  return composite(layers)[..., :3].astype(np.float32), applied


def _resized_crop(m: np.ndarray, box: tuple[float, ...], size: tuple[int, int]) -> np.ndarray:
  """Bilinear resample of the source window `box` (x0, y0, x1, y1) of [H, W, C] to `size`.

  RGBA maps are resampled premultiplied, so transparent pixels' colours do not bleed in."""
  th, tw = size
  rgba = m.shape[-1] == 4
  if rgba:
    m = np.concatenate([m[..., :3] * m[..., 3:], m[..., 3:]], -1)
  out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(m[..., c]), 'F').resize(
      (tw, th), Image.Resampling.BILINEAR, box=box)) for c in range(m.shape[-1])], -1)
  out = np.clip(out, 0, 1)
  if rgba:
    a = out[..., 3:]
    out[..., :3] = np.where(a > 0, np.clip(out[..., :3] / np.maximum(a, 1e-12), 0, 1), 0)
  return out


def _crop_and_flip(maps: dict, sample: LayeredSample, rng, config) -> dict:
  """One random scale, crop and flip for every map: scale 1 covers `image_size` with the
  whole sample's shorter side; `scale_range` zooms in by up to its upper bound."""
  h, w = sample.size
  th, tw = config.image_size
  zoom = rng.uniform(*config.scale_range)
  scale = max(th / h, tw / w) * zoom  # output pixels per source pixel
  if scale == 1:  # the common case (sample already at image_size): exact integer crops
    y0, x0 = rng.integers(h - th + 1), rng.integers(w - tw + 1)
    box = None
  else:
    ch, cw = th / scale, tw / scale
    y0, x0 = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
    box = (x0, y0, x0 + cw, y0 + ch)
  flip = rng.uniform() < config.hflip_prob
  out = {}
  for key, m in maps.items():
    m = np.asarray(m, np.float32)
    m = m[y0:y0 + th, x0:x0 + tw] if box is None else _resized_crop(m, box, (th, tw))
    out[key] = np.ascontiguousarray(m[:, ::-1] if flip else m)
  return out


def _decode_and_build(config):
  def fn(record, rng: np.random.Generator):
    return make_example(from_example(record), rng, config)
  return fn


def _collate(items: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([it[k] for it in items]) if isinstance(items[0][k], np.ndarray)
          else np.asarray([it[k] for it in items], dtype=object) for k in items[0]}


# {'+'-joined kinds: probability}, normalised.
PROMPT_PROBS = spec.also(spec.mapping(spec.number(lo=0)), examples.parse_prompt_probs)
# The config keys (see above). scale_range >= 1: a crop never leaves the sample; a
# checkerboard_jitter <= 0.2 keeps the light squares (0.8 +- jitter) above the dark (0.4).
_FIELDS = {
    'name': spec.string(), 'data_dir': spec.string(), 'seed': spec.integer(),
    'global_batch_size': spec.integer(lo=1), 'image_size': spec.seq(spec.integer(lo=1), 2),
    'num_workers': spec.integer(lo=0), 'scale_range': spec.ordered(spec.number(lo=1)),
    'prompt_probs': PROMPT_PROBS,
    'point_sigma': spec.number(above=0), 'hflip_prob': spec.number(0, 1),
    'checkerboard_cell': spec.integer(lo=1), 'checkerboard_jitter': spec.number(0, 0.2),
    'degradations': degrade.CONFIG, 'boundary_band': spec.integer(lo=0)}
# An experiment's `data` section: without cond_dropout, which is the loss's key.
CONFIG = spec.section(_FIELDS)
LOADER_CONFIG = spec.section({**_FIELDS, 'cond_dropout': spec.number(0, 1)},
                             optional=('cond_dropout',))


def check_config(config) -> None:
  """The loader's config: every key there, in range (`layerjax.config_spec`)."""
  spec.check(config, LOADER_CONFIG, 'data')


def tfds_split(name: str, data_dir, split: str):
  """The built dataset's split; a clear error (and nothing written) when it is not there:
  `tfds.data_source` would otherwise try to build the dataset in `data_dir`."""
  root = as_path(data_dir) / name  # `gs://...` stays a URL: TFDS and ArrayRecord read it
  if not any(root.glob('*/dataset_info.json')):
    raise FileNotFoundError(f'data.data_dir: {root}: no built {name!r} dataset (make one with '
                            f'`python -m data_engine build-tfds SCENES --data-dir {data_dir}`)')
  splits = tfds.data_source(name, data_dir=data_dir)
  if split not in splits:
    raise ValueError(f'{root}: no split {split!r} (splits: {sorted(splits)})')
  source = splits[split]
  return NamedShards(source, source.dataset_info.splits[split].file_instructions)


class CorruptShard(ValueError):
  """A record of a dataset shard that cannot be read."""


class NamedShards:
  """A TFDS data source whose read errors name the shard file and the record in it."""

  def __init__(self, source, file_instructions):
    self.source = source
    self.files = [(f.filename, f.skip) for f in file_instructions]
    self.ends = np.cumsum([f.take for f in file_instructions])

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      return self.source[index]
    except Exception as e:  # pylint: disable=broad-except  # whatever the reader raises
      k = int(np.searchsorted(self.ends, index, side='right'))
      filename, skip = self.files[k]
      record = skip + index - (int(self.ends[k - 1]) if k else 0)
      raise CorruptShard(f'{filename}: record {record} cannot be read ({e}); the shard is '
                         'corrupt or truncated: rebuild the dataset (python -m data_engine '
                         'build-tfds)') from e


class _Rows(grain.MapDataset):
  """The elements `rows` (ascending) of each consecutive run of `batch_size` of `parent`."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, rows: list[int]):
    super().__init__(parent)
    self._batch_size, self._rows = batch_size, rows

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size * len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, len(self._rows))
    return self._parent[batch * self._batch_size + self._rows[row]]

  def __str__(self) -> str:
    return f'_Rows({self._rows} of {self._batch_size})'


# Batches are read ahead by a thread per core (16 at most), two per thread. Grain's default
# (16 threads, 500 elements, each of ours a whole batch) kept decoding up to 500 batches ahead
# of the step: 1.4 of the 2 cores busy while the trainer waited on a checkpoint (a tiny
# model's save took 7-8 s instead of 1.2), and hundreds of batches made for a 2-step run.
_THREADS = min(16, os.cpu_count() or 1)
_READ = grain.ReadOptions(num_threads=_THREADS, prefetch_buffer_size=2 * _THREADS)


def make_loader(config, split: str, mesh: jax.sharding.Mesh | None, *,
                process_index: int | None = None, source=None) -> grain.IterDataset:
  """An iterable of numpy batches for `split`; `iter(...)` gives a checkpointable iterator.

  Each batch holds the rows of the global batch that process `process_index`'s devices hold
  on `mesh` (this process by default; `parallel.process_rows`); `mesh=None`: the whole global
  batch. `source` overrides the TFDS data source (any random-access sequence of records).
  """
  check_config(config)
  size = config.global_batch_size
  rows = list(range(size)) if mesh is None else parallel.process_rows(mesh, size, process_index)
  if source is None:
    source = tfds_split(config.name, config.data_dir, split)
  if len(source) == 0:
    raise ValueError(f'{config.name}: split {split!r} is empty')
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  # Drawn before the per-process selection: an example's draws follow its global index.
  ds = ds.random_map(_decode_and_build(config), seed=config.seed)
  if len(rows) < size:
    ds = _Rows(ds, size, rows)
  ds = ds.batch(len(rows), drop_remainder=True, batch_fn=_collate)
  it = ds.to_iter_dataset(_READ)
  if config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an app, defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return it
