"""Grain loader: `layered` TFDS records -> batches of referring-decomposition examples.

Deterministic: the order is a Grain shuffle seeded from `config.seed`, and every random
choice of an example (target object, prompt kinds, crop, flip, checkerboard colours) comes
from Grain's per-element generator derived from the same seed and the element's index, so
the same config gives the same batches with any number of workers, and the iterator's state
(`iterator.get_state()` / `set_state`) resumes exactly at the next batch.
Multi-host: each process reads the slice `process_index::process_count` and yields
`global_batch_size // process_count` examples per batch, laid out to be assembled into a
global `jax.Array` sharded over the batch axis.

Config keys (an `ml_collections.ConfigDict` or any object with these attributes):
  name, data_dir, seed, global_batch_size, image_size (H, W), num_workers,
  prompt_probs {kinds: probability} with kinds '+'-joined from box, mask, point, text,
  point_sigma, hflip_prob, checkerboard_cell, checkerboard_jitter,
  degradations (see `layerjax.data.degrade`; empty for none), boundary_band (pixels).
"""

from __future__ import annotations

import grain
from absl import flags
import jax
import numpy as np
import tensorflow_datasets as tfds

from layerjax.data import degrade, examples
from layerjax.data.schema import LayeredSample, Prompt, composite
from layerjax.data.tfds_builder import from_example

PROMPT_KINDS = ('box', 'mask', 'point', 'text')
SPATIAL = ('box', 'mask', 'point')


def _parse_prompt_probs(probs) -> tuple[list[frozenset], np.ndarray]:
  combos, weights = [], []
  for key, p in dict(probs).items():
    kinds = frozenset(key.split('+'))
    unknown = kinds - set(PROMPT_KINDS)
    if unknown or p < 0:
      raise ValueError(f'prompt_probs: bad entry {key!r}: {p} (kinds are {PROMPT_KINDS})')
    combos.append(kinds)
    weights.append(float(p))
  total = sum(weights)
  if not combos or total <= 0:
    raise ValueError(f'prompt_probs must give some kind a positive probability, got {probs}')
  return combos, np.asarray(weights) / total


def _text_for(layer) -> str:
  texts = [*layer.referring, layer.caption, layer.label]
  return next((t for t in texts if t), '')


def make_example(sample: LayeredSample, rng: np.random.Generator, config) -> dict:
  """One referring example at full resolution, then the same crop and flip for every map."""
  # Independent streams, so enabling one option (e.g. degradations) leaves the others' draws.
  rng, rng_degrade, rng_board, rng_geometry = map(np.random.default_rng,
                                                  rng.integers(2**63, size=4))
  objects = [l for l in sample.layers if l.kind == 'object']
  if not objects:
    raise ValueError(f'sample {sample.id!r}: no object layer to refer to')
  target = objects[rng.integers(len(objects))]
  prompt = next((p for p in sample.prompts if p.target == target.name), None)
  combos, weights = _parse_prompt_probs(config.prompt_probs)
  kinds = combos[rng.choice(len(combos), p=weights)]
  if prompt is None and kinds & set(SPATIAL):
    raise ValueError(f'sample {sample.id!r}: no spatial prompt for {target.name!r}')
  targets = examples.referring_targets(sample, target.name)
  band = degrade.boundary_band(target.rgba[..., 3], config.boundary_band)
  image, applied = _degraded_input(sample, target, band, rng_degrade, config)
  maps = {
      'image': image,
      'boundary': band[..., None].astype(np.float32),
      'prompt': examples.render_prompt(sample.size, prompt or Prompt(target.name), kinds,
                                       config.point_sigma),
      **targets,
      'foreground_on_checkerboard': examples.blend_over_checkerboard(
          targets['foreground'], config.checkerboard_cell, rng_board,
          config.checkerboard_jitter),
  }
  maps = _crop_and_flip(maps, sample, rng_geometry, config)
  return {**maps, 'text': _text_for(target) if 'text' in kinds else '',
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


def _crop_and_flip(maps: dict, sample: LayeredSample, rng, config) -> dict:
  h, w = sample.size
  th, tw = config.image_size
  if h < th or w < tw:
    raise ValueError(f'sample {sample.id!r}: {h}x{w} is smaller than image_size {th}x{tw}')
  y0, x0 = rng.integers(h - th + 1), rng.integers(w - tw + 1)
  flip = rng.uniform() < config.hflip_prob
  out = {}
  for key, m in maps.items():
    m = m[y0:y0 + th, x0:x0 + tw]
    out[key] = np.ascontiguousarray(m[:, ::-1] if flip else m, dtype=np.float32)
  return out


def _decode_and_build(config):
  def fn(record, rng: np.random.Generator):
    return make_example(from_example(record), rng, config)
  return fn


def _collate(items: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([it[k] for it in items]) if isinstance(items[0][k], np.ndarray)
          else np.asarray([it[k] for it in items], dtype=object) for k in items[0]}


def make_loader(config, split: str, *, process_index: int | None = None,
                process_count: int | None = None, source=None) -> grain.IterDataset:
  """An iterable of numpy batches for `split`; `iter(...)` gives a checkpointable iterator.

  `source` overrides the TFDS data source (any random-access sequence of records).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.global_batch_size % process_count:
    raise ValueError(f'global_batch_size {config.global_batch_size} is not divisible by '
                     f'{process_count} processes')
  _parse_prompt_probs(config.prompt_probs)  # fail fast on a malformed config
  degrade.check_config(config.degradations)
  if source is None:
    source = tfds.data_source(config.name, data_dir=config.data_dir)[split]
  if len(source) == 0:
    raise ValueError(f'{config.name}: split {split!r} is empty')
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.random_map(_decode_and_build(config), seed=config.seed)
  ds = ds.batch(config.global_batch_size // process_count, drop_remainder=True,
                batch_fn=_collate)
  it = ds.to_iter_dataset()
  if config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an app, defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return it
