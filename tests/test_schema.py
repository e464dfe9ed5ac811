"""The layered-sample schema: validation and the PNG + manifest folder form (compositing
against Porter-Duff: tests/test_core_math.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.data.schema import Layer, LayeredSample, Prompt, SampleError


def make_sample(h=24, w=32, seed=0) -> LayeredSample:
  """A background, a soft-edged disc object and its shadow; the image is their composite."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  bg = np.stack([xx / w, yy / h, np.full_like(xx, 0.5), np.ones_like(xx)], -1)
  disc = np.clip(6.5 - np.hypot(xx - 18, yy - 10), 0, 1)
  obj = np.concatenate([np.broadcast_to(rng.uniform(0, 1, 3), (h, w, 3)), disc[..., None]], -1)
  shade = np.clip(1 - np.hypot((xx - 20) / 8, (yy - 18) / 3), 0, 1) * 0.6
  shadow = np.concatenate([np.zeros((h, w, 3)), shade[..., None]], -1)
  layers = [Layer('background', 'background', bg.astype(np.float32)),
            Layer('shadow_1', 'shadow', shadow.astype(np.float32), owner='object_1'),
            Layer('object_1', 'object', obj.astype(np.float32), label='ball',
                  caption='a ball', referring=('the ball on the right',))]
  for layer, mask in zip(layers, schema.visible_masks(layers)):
    layer.visible_mask = mask
    layer.bbox = schema.alpha_bbox(layer.rgba[..., 3])
  image = schema.composite(layers)[..., :3].astype(np.float32)
  prompts = [Prompt('object_1', points=((18.0, 10.0),), box=layers[2].bbox,
                    mask=layers[2].rgba[..., 3] > 0.5)]
  return LayeredSample(f'synthetic-{seed}', image, layers, prompts,
                       provenance={'source': 'test', 'seed': seed})


def test_over_of_transparent_pixels_is_defined():
  out = schema.over(np.zeros((2, 2, 4)), np.zeros((2, 2, 4)))
  assert np.isfinite(out).all() and (out == 0).all()


def test_valid_sample_passes_and_round_trips(tmp_path):
  sample = make_sample().validate()
  out = schema.write_folder(sample, tmp_path / 's')
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['format'] == schema.FORMAT and len(manifest['layers']) == 3
  back = schema.read_folder(out)
  assert back.id == sample.id and back.provenance == sample.provenance
  np.testing.assert_allclose(back.image, sample.image, atol=0.5 / 255 + 1e-6)
  for a, b in zip(back.layers, sample.layers):
    assert (a.name, a.kind, a.owner, a.bbox, a.label, a.caption, a.referring) == \
           (b.name, b.kind, b.owner, b.bbox, b.label, b.caption, b.referring)
    np.testing.assert_allclose(a.rgba, b.rgba, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(a.visible_mask, b.visible_mask)
  p, q = back.prompts[0], sample.prompts[0]
  assert (p.target, p.points, p.box) == (q.target, q.points, q.box)
  np.testing.assert_array_equal(p.mask, q.mask)


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.layers[0].rgba.__setitem__((0, 0, 3), 0.5), 'background is not opaque'),
    (lambda s: s.layers.insert(1, s.layers.pop(0)), 'background must be the first layer'),
    (lambda s: setattr(s.layers[1], 'owner', 'object_9'), "shadow owner 'object_9'"),
    (lambda s: setattr(s.layers[2], 'rgba', s.layers[2].rgba[:-1]), r'\(23, 32, 4\), expected \(24, 32, 4\)'),
    (lambda s: setattr(s.layers[2], 'kind', 'text'), "kind 'text'"),
    (lambda s: setattr(s.layers[2], 'name', 'background'), 'not unique'),
    (lambda s: setattr(s.layers[2], 'bbox', (5, 5, 40, 9)), 'bbox'),
    (lambda s: s.image.__setitem__((3, 3), 1.5), 'outside \\[0, 1\\]'),
    (lambda s: setattr(s, 'image', s.image.astype(np.float64)), 'float32'),
    (lambda s: setattr(s.prompts[0], 'target', 'shadow_1'), "target 'shadow_1'"),
    (lambda s: setattr(s.prompts[0], 'points', ((40.0, 1.0),)), 'outside the image'),
    (lambda s: setattr(s, 'provenance', {'x': object()}), 'JSON'),
    (lambda s: s.image.__setitem__((10, 18), 1 - s.image[10, 18]), 'composite of the layers'),
])
def test_validation_names_sample_and_field(edit, message):
  sample = make_sample()
  edit(sample)
  with pytest.raises(SampleError, match=f"sample 'synthetic-0'.*{message}"):
    sample.validate()


def test_corrupt_png_is_named(tmp_path):
  out = schema.write_folder(make_sample(), tmp_path / 's')
  (out / 'layers' / '02_object.png').write_bytes(b'\x89PNG not really')
  with pytest.raises(SampleError, match=r"02_object\.png: sample 'synthetic-0': layers\[2\]\.file"):
    schema.read_folder(out)


def test_missing_file_is_named(tmp_path):
  out = schema.write_folder(make_sample(), tmp_path / 's')
  (out / 'masks' / '01_shadow.png').unlink()
  with pytest.raises(FileNotFoundError, match=r'layers\[1\]\.visible_mask names masks/01_shadow'):
    schema.read_folder(out)


def test_layer_of_wrong_size_on_disk(tmp_path):
  out = schema.write_folder(make_sample(), tmp_path / 's')
  Image.new('RGBA', (10, 10)).save(out / 'layers' / '01_shadow.png')
  with pytest.raises(SampleError, match=r"layers\[1\] \('shadow_1'\)\.rgba has shape"):
    schema.read_folder(out)


def test_malformed_manifest(tmp_path):
  out = schema.write_folder(make_sample(), tmp_path / 's')
  (out / 'manifest.json').write_text('{"id": ')
  with pytest.raises(SampleError, match='manifest.json: not valid JSON'):
    schema.read_folder(out)
  (out / 'manifest.json').write_text(json.dumps({'format': schema.FORMAT, 'id': 'x'}))
  with pytest.raises(SampleError, match="sample 'x': malformed manifest.*layers"):
    schema.read_folder(out)


def test_invalid_sample_is_not_written_and_old_folder_survives(tmp_path):
  out = schema.write_folder(make_sample(seed=0), tmp_path / 's')
  before = sorted(p.relative_to(out) for p in out.rglob('*'))
  bad = make_sample(seed=1)
  bad.layers[0].rgba[..., 3] = 0.5
  with pytest.raises(SampleError):
    schema.write_folder(bad, out)
  assert sorted(p.relative_to(out) for p in out.rglob('*')) == before
  assert schema.read_folder(out).id == 'synthetic-0'
  assert [p.name for p in tmp_path.iterdir()] == ['s']
