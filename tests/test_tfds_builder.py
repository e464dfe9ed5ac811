"""The `layered` TFDS builder: folders -> array_record shards -> samples, without TensorFlow."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from layerjax.data import schema
from layerjax.data.tfds_builder import Layered, from_example
from test_schema import make_sample


@pytest.fixture
def folders(tmp_path):
  roots = {'train': tmp_path / 'src' / 'train', 'test': tmp_path / 'src' / 'test'}
  samples = {'train': [make_sample(seed=s) for s in range(3)], 'test': [make_sample(seed=7)]}
  for split, items in samples.items():
    for s in items:
      schema.write_folder(s, roots[split] / s.id)
  return roots, samples


def assert_same(a, b):
  assert a.id == b.id and a.provenance == b.provenance
  np.testing.assert_array_equal(a.image, b.image)
  for x, y in zip(a.layers, b.layers, strict=True):
    assert (x.name, x.kind, x.bbox, x.owner, x.label, x.caption, x.referring) == \
           (y.name, y.kind, y.bbox, y.owner, y.label, y.caption, y.referring)
    np.testing.assert_array_equal(x.rgba, y.rgba)
    np.testing.assert_array_equal(x.visible_mask, y.visible_mask)
  for p, q in zip(a.prompts, b.prompts, strict=True):
    assert (p.target, p.points, p.box) == (q.target, q.points, q.box)
    np.testing.assert_array_equal(p.mask, q.mask)


def test_build_and_read_without_tensorflow(tmp_path, folders):
  roots, _ = folders
  builder = Layered(data_dir=tmp_path / 'tfds', sources=roots)
  builder.download_and_prepare()
  assert 'tensorflow' not in sys.modules
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['test'].num_examples == 1
  assert list((tmp_path / 'tfds' / 'layered' / '1.0.0').glob('layered-train.array_record-*'))
  source = tfds.data_source('layered', data_dir=tmp_path / 'tfds')
  train = sorted((from_example(source['train'][i]) for i in range(3)), key=lambda s: s.id)
  for got, folder in zip(train, sorted(roots['train'].iterdir())):
    assert_same(got.validate(), schema.read_folder(folder))


def test_bad_sample_is_skipped_and_counted(tmp_path, folders):
  roots, samples = folders
  bad = roots['train'] / samples['train'][1].id / 'layers' / '02_object.png'
  bad.write_bytes(b'not a png')
  builder = Layered(data_dir=tmp_path / 'tfds', sources=roots, on_error='skip')
  builder.download_and_prepare()
  assert builder.info.splits['train'].num_examples == 2
  assert len(builder.skipped['train']) == 1 and '02_object.png' in builder.skipped['train'][0]


def test_bad_sample_stops_the_build_without_partial_output(tmp_path, folders):
  roots, samples = folders
  (roots['train'] / samples['train'][2].id / 'manifest.json').write_text('{')
  builder = Layered(data_dir=tmp_path / 'tfds', sources=roots)
  with pytest.raises(ValueError, match='manifest.json: not valid JSON'):
    builder.download_and_prepare()
  assert not list((tmp_path / 'tfds' / 'layered').glob('1.0.0'))


def test_empty_split_is_an_error(tmp_path, folders):
  roots, _ = folders
  (tmp_path / 'empty').mkdir()
  builder = Layered(data_dir=tmp_path / 'tfds', sources={**roots, 'validation': tmp_path / 'empty'})
  with pytest.raises(ValueError, match="split 'validation' is empty"):
    builder.download_and_prepare()
