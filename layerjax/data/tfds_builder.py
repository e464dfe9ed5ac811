"""TFDS dataset `layered`: `LayeredSample`s as array_record shards, built and read without TF.

Every feature is a plain tensor, bytes or text (PNGs encoded with Pillow; lists of texts and
points as JSON), so neither building nor reading needs TensorFlow:

    builder = Layered(data_dir=DIR, sources={'train': FOLDERS, 'test': FOLDERS})
    builder.download_and_prepare()
    source = tfds.data_source('layered', data_dir=DIR)['train']   # random access
    sample = from_example(source[0])                               # -> LayeredSample

A source is a directory whose subfolders are samples in the on-disk form of
`layerjax.data.schema` (or an iterable of such folders). TFDS writes into a temporary
directory and renames it at the end, so a failed build never leaves a partial dataset.

`build(sources, data_dir)` is what the command lines use: it records a fingerprint of the
sources (every sample file's size and mtime) and the options in the dataset, rebuilds when
they change (a build-tfds after new samples) and does nothing when they have not; the new
dataset is built beside the old one and swapped in. `data_dir` may be a URL (`gs://...`): the
dataset is built locally and uploaded, its `dataset_info.json` and stamp last
(`fileio.atomic_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds

from layerjax.data import schema
from layerjax.data.schema import Layer, LayeredSample, Prompt, decode_png, encode_png
from layerjax.fileio import (Artifact, OutputError, as_path, atomic_dir, fingerprint,
                             output_lock, read_json, tree_stats)

_NO_BOX = (-1, -1, -1, -1)


def _bytes():
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def _box():
  return tfds.features.Tensor(shape=(4,), dtype=np.int32)


FEATURES = {
    'id': tfds.features.Text(doc='unique sample id'),
    'image': _bytes(),
    'layers': tfds.features.Sequence({
        'name': tfds.features.Text(),
        'kind': tfds.features.Text(doc='background | object | shadow'),
        'rgba': _bytes(),
        'visible_mask': _bytes(),
        'bbox': _box(),
        'owner': tfds.features.Text(doc='shadows: name of the casting object'),
        'label': tfds.features.Text(),
        'caption': tfds.features.Text(),
        'referring': tfds.features.Text(doc='JSON list of referring expressions'),
    }),
    'prompts': tfds.features.Sequence({
        'target': tfds.features.Text(),
        'points': tfds.features.Text(doc='JSON list of [x, y]'),
        'box': _box(),
        'mask': _bytes(),
    }),
    'provenance': tfds.features.Text(doc='JSON object'),
}

DESCRIPTION = """Layered decompositions of images (layerjax `LayeredSample`).

* `image`: PNG (RGB, 8-bit) of the photo.
* `layers`: back to front; `rgba` PNG (straight alpha), `visible_mask` PNG (L, 0/255; empty
  bytes if absent), `bbox` (x0, y0, x1, y1) end-exclusive or -1s, `kind`, `owner` (shadows),
  `label`, `caption`, `referring` (JSON list).
* `prompts`: spatial prompts on an object layer: `points` (JSON [[x, y], ...]), `box` or -1s,
  `mask` PNG or empty bytes.
* `provenance`: JSON object (tools, versions, scores).
"""


def _mask_png(mask) -> bytes:
  return b'' if mask is None else encode_png(mask)


def to_example(sample: LayeredSample) -> dict:
  """The TFDS feature dict of a (validated) sample."""
  sample.validate()
  return {
      'id': sample.id,
      'image': encode_png(sample.image),
      'layers': [{
          'name': l.name, 'kind': l.kind, 'rgba': encode_png(l.rgba),
          'visible_mask': _mask_png(l.visible_mask),
          'bbox': np.asarray(l.bbox or _NO_BOX, np.int32), 'owner': l.owner or '',
          'label': l.label, 'caption': l.caption, 'referring': json.dumps(list(l.referring)),
      } for l in sample.layers],
      'prompts': [{
          'target': p.target, 'points': json.dumps([list(pt) for pt in p.points]),
          'box': np.asarray(p.box or _NO_BOX, np.int32), 'mask': _mask_png(p.mask),
      } for p in sample.prompts],
      'provenance': json.dumps(sample.provenance),
  }


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _mask(data: bytes):
  return decode_png(data, '1') if data else None


def _opt_box(box):
  box = tuple(int(v) for v in box)
  return None if box == _NO_BOX else box


def from_example(ex: dict) -> LayeredSample:
  """A `LayeredSample` from a record read back with `tfds.data_source`."""
  lay, pr = ex['layers'], ex['prompts']
  layers = [
      Layer(name=_text(lay['name'][i]), kind=_text(lay['kind'][i]),
            rgba=decode_png(lay['rgba'][i], 'RGBA'),
            visible_mask=_mask(lay['visible_mask'][i]),
            bbox=_opt_box(lay['bbox'][i]), owner=_text(lay['owner'][i]) or None,
            label=_text(lay['label'][i]), caption=_text(lay['caption'][i]),
            referring=tuple(json.loads(_text(lay['referring'][i]))))
      for i in range(len(lay['name']))]
  prompts = [
      Prompt(target=_text(pr['target'][i]),
             points=tuple(tuple(p) for p in json.loads(_text(pr['points'][i]))),
             box=_opt_box(pr['box'][i]),
             mask=_mask(pr['mask'][i]))
      for i in range(len(pr['target']))]
  return LayeredSample(_text(ex['id']), decode_png(ex['image'], 'RGB'), layers, prompts,
                       json.loads(_text(ex['provenance'])))


class Layered(tfds.core.GeneratorBasedBuilder):
  """Packs layered samples from folders into train/validation/test array_record shards."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: image, layers, prompts, provenance.'}

  def __init__(self, *, sources: dict[str, str | Path | Iterable] | None = None,
               on_error: str = 'raise', file_format: str = 'array_record', **kwargs):
    """`sources`: split name -> samples; `on_error`: 'raise' stops, 'skip' drops and counts."""
    if on_error not in ('raise', 'skip'):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self._sources = dict(sources or {})
    self._on_error = on_error
    self.skipped: dict[str, list[str]] = {}
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=DESCRIPTION,
                                 features=tfds.features.FeaturesDict(FEATURES))

  def _split_generators(self, dl_manager):
    if not self._sources:
      raise ValueError('Layered: no sources given (sources={"train": DIR, ...})')
    splits = {}
    for split, source in self._sources.items():
      folders = schema.sample_folders(source)
      if not folders:
        raise ValueError(f'Layered: split {split!r} is empty (source {source})')
      splits[split] = self._generate_examples(split, folders)
    return splits

  def _generate_examples(self, split: str, folders: list[Path]):
    for folder in folders:
      try:
        sample = schema.read_folder(folder)
        example = to_example(sample)
      except (ValueError, OSError) as e:
        if self._on_error == 'raise':
          raise
        self.skipped.setdefault(split, []).append(f'{folder}: {e}')
        logging.warning('skipping %s', e)
        continue
      yield sample.id, example


STAMP = 'layerjax_build.json'
# A reader (`pipeline`, TFDS) takes a folder for a dataset once its dataset_info.json is there.
DATASET = Artifact('TFDS layered dataset', lambda p: (p / 'dataset_info.json').is_file(),
                   markers=('dataset_info.json', STAMP))


def build(sources: dict[str, list[Path]], data_dir, *, on_error: str = 'raise',
          overwrite: bool = False) -> dict:
  """`data_dir/layered/<version>` from `sources` (split -> sample folders), unless it is up to
  date; returns the splits' sizes and the skipped samples, plus `up_to_date`.

  The dataset's `layerjax_build.json` holds the fingerprint of what it was built from (every
  sample file's path, size and mtime, `on_error`, the version): a build with the same
  fingerprint changes nothing, one with another rebuilds. A dataset built from other source
  folders, or not by this function, is replaced only with `overwrite`. The new dataset is
  built beside the old one and swapped in, so a failed build leaves the old one whole; on an
  object store, which cannot swap folders, the old one is removed as the new one is uploaded,
  and a failed upload leaves no dataset (no reader takes what is left for one).
  """
  data_dir = as_path(data_dir)
  target = data_dir / 'layered' / str(Layered.VERSION)
  roots = sorted({str(Path(f).resolve().parent) for fs in sources.values() for f in fs})
  fp = fingerprint(str(Layered.VERSION), on_error,
                   {split: [[Path(f).name, tree_stats(f)] for f in fs]
                    for split, fs in sorted(sources.items())}, roots)
  stamp = read_json(target / STAMP) if (target / STAMP).is_file() else None
  if stamp and stamp.get('fingerprint') == fp:
    return {**stamp['result'], 'up_to_date': True}
  if DATASET.test(target) and not overwrite and (stamp or {}).get('roots') != roots:
    built_from = ', '.join((stamp or {}).get('roots', ['unrecorded sources']))
    raise OutputError(f'{target}: holds a dataset built from {built_from}, not from '
                      f'{", ".join(roots)}; pass --overwrite to replace it')
  with output_lock(data_dir), atomic_dir(target, DATASET, overwrite=True) as tmp:
    root = tmp / '.build'  # TFDS writes <data_dir>/layered/<version>: build there, move up
    builder = Layered(data_dir=root, sources=sources, on_error=on_error)
    builder.download_and_prepare()
    for path in (root / 'layered' / str(Layered.VERSION)).iterdir():
      os.replace(path, tmp / path.name)
    shutil.rmtree(root)
    result = {'data_dir': str(data_dir), 'splits': {k: len(v) for k, v in sources.items()},
              'skipped': builder.skipped}
    (tmp / STAMP).write_text(json.dumps({'fingerprint': fp, 'roots': roots,
                                         'result': result}, indent=2) + '\n')
  return {**result, 'up_to_date': False}
