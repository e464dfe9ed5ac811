"""data_engine.synthesis: the bank, and scenes that are exact, deterministic and physically
consistent (occlusion by depth, perspective, one light, contact-hardened tinted shadows)."""

import json

import numpy as np
from PIL import Image
import pytest

from data_engine import synthesis
from layerjax.data import schema

SIZE = (160, 192)


def _cutout(h, w, inside):
  """A white-ish RGBA cut-out whose alpha is `inside(yy, xx)` (values in [0, 1])."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  alpha = np.clip(inside(yy, xx), 0, 1)
  rgba = np.zeros((h, w, 4), np.float32)
  rgba[..., :3] = (0.9, 0.6, 0.3)
  rgba[..., 3] = alpha
  return rgba


def _disc(h, w):
  return _cutout(h, w, lambda y, x: (0.45 * h - np.hypot(y - h / 2, x - w / 2)) + 0.5)


def _triangle(h, w):
  return _cutout(h, w, lambda y, x: np.minimum(y - 2, (y / h * w / 2) - np.abs(x - w / 2)))


def _soft_rect(h, w):
  return _cutout(h, w, lambda y, x: np.minimum(np.minimum(y, h - 1 - y),
                                               np.minimum(x, w - 1 - x)) / 3)


def _save(rgba, path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.round(rgba * 255).astype(np.uint8)).save(path)


def _placed(rgba, y, x, size):
  out = np.zeros((*size, 4), np.float32)
  out[y:y + rgba.shape[0], x:x + rgba.shape[1]] = rgba
  return out


@pytest.fixture
def bank_dir(tmp_path):
  root = tmp_path / 'bank'
  rng = np.random.default_rng(0)
  (root / 'backgrounds' / 'outdoor').mkdir(parents=True)
  gradient = np.linspace(0, 255, 300, dtype=np.float32)[None, :, None] * np.ones((200, 1, 3))
  Image.fromarray(gradient.astype(np.uint8)).save(root / 'backgrounds' / 'outdoor' / 'sky.JPG')
  noise = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
  Image.fromarray(noise).save(root / 'backgrounds' / 'noise.png')
  _save(_disc(40, 40), root / 'objects' / 'disc_01.png')
  _save(_triangle(50, 40), root / 'objects' / 'shapes' / 'traffic_cone_3.png')
  _save(_soft_rect(30, 44), root / 'objects' / 'shapes' / 'box.png')
  (root / 'objects' / 'shapes' / 'labels.json').write_text(json.dumps({'box.png': 'parcel'}))

  size = (64, 80)
  background = np.dstack([np.full((*size, 3), 0.25, np.float32), np.ones(size, np.float32)])
  layers = [schema.Layer('background', 'background', background),
            schema.Layer('ball', 'object', _placed(_disc(20, 20), 30, 10, size), label='ball'),
            schema.Layer('pole', 'object', _placed(_cutout(30, 8, lambda y, x: y + 1), 0, 60,
                                                   size), label='pole')]
  schema.write_folder(schema.assemble('photo-7', layers), root / 'samples' / 'photo-7')
  return root


def _config(**overrides):
  config = synthesis.default_config()
  config.size = SIZE
  config.update(overrides)
  return config


def _objects(sample):
  return [l for l in sample.layers if l.kind == 'object']


def _centroid(alpha):
  yy, xx = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
  return (xx * alpha).sum() / alpha.sum(), (yy * alpha).sum() / alpha.sum()


def test_load_bank(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  assert [b.source for b in bank.backgrounds] == [
      str(bank_dir / 'backgrounds' / 'noise.png'),
      str(bank_dir / 'backgrounds' / 'outdoor' / 'sky.JPG'), 'photo-7:background']
  assert bank.backgrounds[2].rgb.shape == (64, 80, 3)
  assert {o.label: o.source for o in bank.objects} == {
      'disc': str(bank_dir / 'objects' / 'disc_01.png'),
      'parcel': str(bank_dir / 'objects' / 'shapes' / 'box.png'),
      'traffic cone': str(bank_dir / 'objects' / 'shapes' / 'traffic_cone_3.png'),
      'ball': 'photo-7:ball'}  # the pole touches the border: incomplete, left out
  assert bank.skipped == []
  for obj in bank.objects:
    alpha = obj.rgba[..., 3]
    assert obj.rgba.dtype == np.float32 and obj.rgba.shape[-1] == 4
    assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
  for i in range(3):
    bg = bank.background(i, (50, 100))
    assert bg.shape == (50, 100, 3) and bg.dtype == np.float32
    assert 0 <= bg.min() and bg.max() <= 1


def test_deterministic(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  a, b = (synthesis.synthesize(bank, 5, _config(seed=3)) for _ in range(2))
  assert [l.name for l in a.layers] == [l.name for l in b.layers]
  for la, lb in zip(a.layers, b.layers):
    np.testing.assert_array_equal(la.rgba, lb.rgba)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.provenance == b.provenance
  others = [synthesis.synthesize(bank, 6, _config(seed=3)).image,
            synthesis.synthesize(bank, 5, _config(seed=4)).image]
  assert all(not np.array_equal(a.image, o) for o in others)


def test_sample_is_exact_and_round_trips(bank_dir, tmp_path):
  bank = synthesis.load_bank(bank_dir)
  sample = synthesis.synthesize(bank, 0, _config(num_objects=(3, 3)))
  assert sample.id == 'synth-0-00000000' and sample.size == SIZE
  sample.validate()
  for layer in sample.layers:
    assert layer.rgba.dtype == np.float32 and 0 <= layer.rgba.min() and layer.rgba.max() <= 1
  assert sample.layers[0].rgba[..., 3].min() == 1
  provenance = json.loads(json.dumps(sample.provenance))
  assert provenance['seed'] == 0 and provenance['index'] == 0
  assert provenance['background'] in [b.source for b in bank.backgrounds]
  for record, layer in zip(provenance['objects'], _objects(sample)):
    assert record['layer'] == layer.name and record['label'] == layer.label
    assert tuple(record['box']) == layer.bbox

  back = schema.read_folder(schema.write_folder(sample, tmp_path / 'out'))
  assert [(l.name, l.kind, l.owner, l.label) for l in back.layers] == [
      (l.name, l.kind, l.owner, l.label) for l in sample.layers]
  for la, lb in zip(sample.layers, back.layers):
    np.testing.assert_allclose(lb.rgba, la.rgba, atol=0.5 / 255 + 1e-6)
  assert back.provenance == sample.provenance


def test_layer_order_and_occlusion_by_base(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  labels = {o.label for o in bank.objects}
  for index in range(8):
    sample = synthesis.synthesize(bank, index, _config(num_objects=(2, 4), prob_no_shadow=0.3))
    kinds = [l.kind for l in sample.layers]
    assert kinds[0] == 'background' and 'background' not in kinds[1:]
    objects = _objects(sample)
    assert [o.name for o in objects] == [f'object_{k}' for k in range(1, len(objects) + 1)]
    for i, layer in enumerate(sample.layers[1:], 1):
      if layer.kind == 'shadow':  # right behind the object that casts it
        assert sample.layers[i + 1].name == layer.owner == f'object_{layer.name[7:]}'
      else:
        assert layer.label in labels and layer.caption == ''
    bases = [o.bbox[3] for o in objects]
    assert bases == sorted(bases)  # higher base = farther = behind


def test_no_shadow_layers_when_objects_float(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  sample = synthesis.synthesize(bank, 1, _config(prob_no_shadow=1.0))
  assert [l.kind for l in sample.layers[1:]] == ['object'] * (len(sample.layers) - 1)
  assert all(r['shadow'] is None for r in sample.provenance['objects'])


def test_overlap_limit(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  counts = []
  for index in range(6):
    sample = synthesis.synthesize(bank, index, _config(num_objects=(8, 8), max_overlap=0.15,
                                                       placement_tries=5))
    boxes = [o.bbox for o in _objects(sample)]
    counts.append(len(boxes))
    for i, box in enumerate(boxes):  # covered by the objects in front of it
      assert synthesis._covered(box, boxes[i + 1:]) <= 0.15
  assert min(counts) < 8  # a crowded scene keeps fewer objects


def test_perspective_scale_grows_with_base(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  config = _config(object_height=(0.4, 0.4), perspective=(0.2, 1.0), horizon=(0.25, 0.25),
                   num_objects=(3, 3), max_overlap=1.0)
  h = SIZE[0]
  points = []
  for index in range(6):
    sample = synthesis.synthesize(bank, index, config)
    for layer, record in zip(_objects(sample), sample.provenance['objects']):
      x0, y0, x1, y1 = layer.bbox
      points.append((y1, y1 - y0))
      expected = 0.4 * h * (y1 - 1 - 0.25 * h) / (0.75 * h)  # pinhole: size ~ base - horizon
      assert abs((y1 - y0) - expected) <= 2, (record, layer.bbox)
  points.sort()
  assert len({b for b, _ in points}) > 4
  assert all(h1 <= h2 + 2 for (_, h1), (_, h2) in zip(points, points[1:]))


def _single(bank_dir, **overrides):
  """One disc standing on the lower part of the canvas, lit as `overrides` say."""
  bank = synthesis.load_bank(bank_dir)
  bank.objects = [o for o in bank.objects if o.label == 'disc']
  config = _config(num_objects=(1, 1), object_height=(0.5, 0.5), perspective=(0.6, 0.6),
                   horizon=(0.3, 0.3), prob_no_shadow=0.0, hflip_prob=0.0,
                   light_elevation=(35, 35))
  config.update(overrides)
  sample = synthesis.synthesize(bank, 0, config)
  return sample, sample.layer('object_1'), sample.layer('shadow_1')


@pytest.mark.parametrize('azimuth, direction', [(0, (1, 0)), (180, (-1, 0)), (90, (0, 1)),
                                                (270, (0, -1))])
def test_shadow_falls_away_from_the_light(bank_dir, azimuth, direction):
  sample, obj, shadow = _single(bank_dir, light_azimuth=(azimuth, azimuth))
  assert shadow.owner == 'object_1'
  assert sample.provenance['objects'][0]['shadow']['azimuth'] == azimuth
  ox, _ = _centroid(obj.rgba[..., 3])
  sx, sy = _centroid(shadow.rgba[..., 3])
  offset = np.array([sx - ox, sy - (obj.bbox[3] - 1)])
  along = offset @ direction
  across = abs(offset @ direction[::-1])
  assert along > 3 and along > across


def test_one_light_per_scene(bank_dir):
  bank = synthesis.load_bank(bank_dir)
  sample = synthesis.synthesize(bank, 2, _config(num_objects=(4, 4), prob_no_shadow=0.0,
                                                 max_overlap=1.0))
  lights = {(r['shadow']['azimuth'], r['shadow']['elevation'])
            for r in sample.provenance['objects']}
  assert len(lights) == 1 and len(sample.provenance['objects']) == 4


def test_contact_hardening(bank_dir):
  sample, obj, shadow = _single(bank_dir, light_azimuth=(90, 90), light_elevation=(20, 20),
                                shadow_blur=(0.3, 6.0), shadow_fade=0.0,
                                shadow_opacity=(0.8, 0.8), object_depth=0.0)
  alpha = shadow.rgba[..., 3]
  base = obj.bbox[3] - 1
  rows = np.nonzero(alpha.max(1) > 0.2)[0]
  assert rows.min() <= base + 1 and rows.max() > base + 20  # cast from the base downwards
  sharpness = np.abs(np.diff(alpha, axis=1)).max(1)
  near = sharpness[base:base + 4].max()
  far = sharpness[rows.max() - 8:rows.max() - 4].max()
  assert near > 2 * far


def test_shadow_tint_and_opacity(bank_dir):
  sample, _, shadow = _single(bank_dir, shadow_tint=(0.1, 0.2, 0.4), shadow_tint_jitter=0.0,
                              shadow_opacity=(0.5, 0.5), shadow_fade=0.0,
                              light_azimuth=(60, 60))
  alpha = shadow.rgba[..., 3]
  np.testing.assert_allclose(shadow.rgba[alpha > 0][:, :3],
                             np.broadcast_to([0.1, 0.2, 0.4], ((alpha > 0).sum(), 3)), atol=1e-6)
  assert np.all(shadow.rgba[alpha == 0][:, :3] == 0)
  assert 0.45 < alpha.max() <= 0.5 + 1e-6
  np.testing.assert_allclose(sample.provenance['shadow_tint'], [0.1, 0.2, 0.4], atol=1e-6)


def test_bad_banks(tmp_path, bank_dir):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere')):
    synthesis.load_bank(tmp_path / 'nowhere')
  empty = tmp_path / 'empty'
  (empty / 'backgrounds').mkdir(parents=True)
  with pytest.raises(ValueError, match=f'{empty}.*no backgrounds and no objects'):
    synthesis.load_bank(empty)
  _save(_disc(10, 10), empty / 'objects' / 'disc.png')
  with pytest.raises(ValueError, match=f'{empty}.*no backgrounds'):
    synthesis.load_bank(empty)

  broken = bank_dir / 'objects' / 'broken.png'
  broken.write_bytes(b'not a png at all')
  with pytest.raises(ValueError, match=str(broken)):
    synthesis.load_bank(bank_dir)
  bank = synthesis.load_bank(bank_dir, on_error='skip')
  assert len(bank.skipped) == 1 and str(broken) in bank.skipped[0]
  assert len(bank.objects) == 4

  with pytest.raises(ValueError, match='on_error'):
    synthesis.load_bank(bank_dir, on_error='ignore')
  with pytest.raises(ValueError, match=r'synthesize.light_elevation: expected an ordered pair'):
    synthesis.synthesize(bank, 0, _config(light_elevation=(50, 10)))


def test_balanced_categories_draw_labels_evenly():
  cutout = np.ones((4, 4, 4), np.float32)
  labels = ['cup'] * 6 + ['ball'] * 3 + ['umbrella']
  bank = synthesis.Bank([], [synthesis.ObjectAsset(cutout, l, '') for l in labels])
  rng = np.random.default_rng(0)
  n = 6000
  for balanced, expected in ((False, {'cup': 0.6, 'ball': 0.3, 'umbrella': 0.1}),
                             (True, {'cup': 1 / 3, 'ball': 1 / 3, 'umbrella': 1 / 3})):
    drawn = [labels[bank.draw_object(rng, balanced)] for _ in range(n)]
    for label, p in expected.items():
      assert abs(drawn.count(label) / n - p) < 0.02, (balanced, label)
