"""The MuLAn importer on tiny annotations written in the released format (pickled dicts of numpy
arrays, zipped or plain) next to tiny base photos; expected layers are computed here from the
release script's formula, independently of the importer."""

import csv
import os
import pickle
import shlex
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.data.importers import mulan
from layerjax.data.schema import SampleError

H, W = 16, 20
OCCLUDED = (10, 200, 30)   # what the inpainting puts in the hidden part of the back instance


def make_photo(seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def box(y0, y1, x0, x1) -> np.ndarray:
  m = np.zeros((H, W), bool)
  m[y0:y1, x0:x1] = True
  return m


def scene(photo):
  """Background, a back instance half hidden by a front one, and an empty instance, as
  (bool mask, int delta, uint8 alpha) per instance plus the background (mask, delta)."""
  back, front = box(3, 11, 2, 12), box(6, 14, 8, 18)
  inner = box(7, 13, 9, 17)
  back_delta = np.zeros((H, W, 3), np.int16)
  back_delta[back & front] = OCCLUDED
  back_delta[4, 3], back_delta[4, 4] = 300, -300   # signed deltas that need clipping
  front_alpha = np.where(inner, 255, np.where(front, 128, 0)).astype(np.uint8)
  bg_mask = ~(back | front)
  bg_delta = np.zeros((H, W, 3), np.uint8)
  bg_delta[~bg_mask] = (90, 120, 60)
  instances = [(back & ~front, back_delta, back.astype(np.uint8) * 255),
               (front, np.zeros((H, W, 3), np.uint8), front_alpha),
               (front, np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8))]
  return (bg_mask, bg_delta), instances


CAPTIONS = ['a red car', 'a person', 'nothing']


def encode_mask(m, style):
  return {'bool': m, '255': m.astype(np.uint8) * 255, 'hw1': m[..., None].astype(np.uint8),
          'hw3': np.repeat(m[..., None], 3, -1).astype(np.uint8) * 255}[style]


def encode_alpha(a, style):
  return {'u8': a, 'float': a.astype(np.float32) / 255, 'hw1': a[..., None]}[style]


def make_annotation(photo, form='stacked', mask='bool', alpha='u8') -> dict:
  (bg_mask, bg_delta), instances = scene(photo)
  masks = [encode_mask(m, mask) for m, _, _ in instances]
  deltas = [d for _, d, _ in instances]
  alphas = [encode_alpha(a, alpha) for _, _, a in instances]
  if form == 'stacked':
    inst = {'blip2': CAPTIONS, 'original_image_mask': np.stack(masks),
            'inpainted_delta': np.stack(deltas), 'instance_alpha': np.stack(alphas)}
  else:
    inst = [{'blip2': c, 'original_image_mask': m, 'inpainted_delta': d, 'instance_alpha': a}
            for c, m, d, a in zip(CAPTIONS, masks, deltas, alphas)]
  return {'captioning': {'llava': 'llava-1.5', 'blip2': 'blip2-opt', 'clip': 'ViT-L/14'},
          'background': {'llava': 'A long caption of a street.', 'blip2': 'a street',
                         'original_image_mask': encode_mask(bg_mask, mask),
                         'inpainted_delta': bg_delta},
          'image': {'llava': 'A person in front of a red car.', 'blip2': 'a person and a car'},
          'instances': inst}


def write_annotation(path, ann, protocol=pickle.HIGHEST_PROTOCOL):
  data = pickle.dumps(ann, protocol)
  if path.name.endswith('.zip'):
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(path.name[:-len('.zip')], data)
  elif path.name.endswith('.zl'):
    path.write_bytes(zlib.compress(data))
  else:
    path.write_bytes(data)
  return path


def write_image(path, photo):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(photo).save(path)
  return path


def import_one(tmp_path, ann=None, photo=None, name='000000000042.p.zip'):
  photo = make_photo() if photo is None else photo
  ann = make_annotation(photo) if ann is None else ann
  tmp_path.mkdir(exist_ok=True)
  row = {'id': 'mulan-000000000042', 'annotation': write_annotation(tmp_path / name, ann),
         'image': write_image(tmp_path / '000000000042.png', photo)}
  return mulan.to_sample(row)


def expected_rgba(photo, mask, delta, alpha):
  """The release formula, computed in integers."""
  rgb = np.clip(photo.astype(np.int64) * mask[..., None] + delta, 0, 255)
  return np.concatenate([rgb, np.broadcast_to(alpha, (H, W))[..., None]], -1) / 255


def assert_same_sample(a, b):
  assert [l.name for l in a.layers] == [l.name for l in b.layers]
  for la, lb in zip(a.layers, b.layers):
    np.testing.assert_array_equal(la.rgba, lb.rgba)
    assert (la.caption, la.bbox) == (lb.caption, lb.bbox)
  np.testing.assert_array_equal(a.image, b.image)
  strip = lambda p: {k: v for k, v in p.items() if k not in ('annotation', 'image')}
  assert strip(a.provenance) == strip(b.provenance)


# --- reconstruction -----------------------------------------------------------------------

def test_layers_follow_the_release_formula(tmp_path):
  photo = make_photo()
  sample = import_one(tmp_path, photo=photo)
  (bg_mask, bg_delta), instances = scene(photo)

  assert sample.id == 'mulan-000000000042'
  assert [(l.name, l.kind) for l in sample.layers] == [
      ('background', 'background'), ('object_1', 'object'), ('object_2', 'object')]
  np.testing.assert_allclose(sample.layers[0].rgba, expected_rgba(photo, bg_mask, bg_delta, 255),
                             rtol=0, atol=1e-6)
  for layer, (mask, delta, alpha) in zip(sample.layers[1:], instances):   # back to front
    np.testing.assert_allclose(layer.rgba, expected_rgba(photo, mask, delta, alpha),
                               rtol=0, atol=1e-6)
  assert sample.layers[1].rgba[4, 3, :3].tolist() == [1, 1, 1]   # +300 clipped to 255
  assert sample.layers[1].rgba[4, 4, :3].tolist() == [0, 0, 0]   # -300 clipped to 0
  assert [l.caption for l in sample.layers] == ['a street', 'a red car', 'a person']
  assert all(l.label == '' for l in sample.layers)

  prov = sample.provenance
  assert prov['source'] == 'mulan' and prov['image_caption'] == 'a person and a car'
  assert prov['dropped_instances'] == [2]   # the all-zero alpha
  assert prov['annotation'].endswith('000000000042.p.zip')
  assert prov['image'].endswith('000000000042.png')
  diff = np.abs(schema.composite(sample.layers)[..., :3] - photo / 255)
  assert prov['photo_abs_diff']['max'] == pytest.approx(diff.max(), abs=1e-5)
  assert prov['photo_abs_diff']['mean'] == pytest.approx(diff.mean(), abs=1e-5)
  assert prov['photo_abs_diff']['max'] > 0.1   # the soft edge of the front instance shows
  assert [p.target for p in sample.prompts] == ['object_1', 'object_2']


def test_occluded_part_of_the_back_instance_is_completed(tmp_path):
  photo = make_photo()
  sample = import_one(tmp_path, photo=photo)
  hidden = box(7, 11, 9, 12)   # under the opaque core of the front instance
  back = sample.layer('object_1')
  np.testing.assert_allclose(back.rgba[hidden], np.broadcast_to((*OCCLUDED, 255), (12, 4)) / 255,
                             atol=1e-6)
  assert not back.visible_mask[hidden].any()
  np.testing.assert_allclose(sample.image[hidden], photo[hidden] / 255, atol=1e-6)


def test_exact_partition_reproduces_the_photo(tmp_path):
  """Binary alphas whose masks keep the photo where each layer is seen: composite == photo."""
  photo = make_photo(1)
  obj = box(2, 9, 3, 15)
  ann = {'background': {'blip2': '', 'llava': 'a wall', 'original_image_mask': ~obj,
                        'inpainted_delta': np.zeros((H, W, 3), np.uint8)},
         'instances': [{'original_image_mask': obj,
                        'inpainted_delta': np.zeros((H, W, 3), np.uint8),
                        'instance_alpha': obj.astype(np.float32)}]}
  sample = import_one(tmp_path, ann, photo)
  assert sample.provenance['photo_abs_diff'] == {'max': 0.0, 'mean': 0.0}
  assert sample.layers[0].caption == 'a wall'   # BLIP-2 empty: falls back to LLaVA
  assert sample.layers[1].caption == '' and sample.provenance['image_caption'] == ''


def test_container_forms_agree(tmp_path):
  photo = make_photo()
  stacked = import_one(tmp_path / 'a', make_annotation(photo, 'stacked'), photo)
  listed = import_one(tmp_path / 'b', make_annotation(photo, 'list'), photo)
  assert_same_sample(stacked, listed)


@pytest.mark.parametrize('mask, alpha', [('255', 'u8'), ('hw1', 'u8'), ('hw3', 'u8'),
                                         ('bool', 'float'), ('bool', 'hw1'), ('hw1', 'float')])
def test_mask_and_alpha_encodings_agree(tmp_path, mask, alpha):
  photo = make_photo()
  base = import_one(tmp_path / 'a', make_annotation(photo), photo)
  variant = import_one(tmp_path / 'b', make_annotation(photo, 'list', mask, alpha), photo)
  assert_same_sample(base, variant)


def test_round_trip_through_the_folder_form(tmp_path):
  sample = import_one(tmp_path)
  back = schema.read_folder(schema.write_folder(sample, tmp_path / 'out'))
  assert back.id == sample.id and back.provenance == sample.provenance
  for a, b in zip(sample.layers, back.layers):
    assert (a.name, a.kind, a.caption, a.bbox) == (b.name, b.kind, b.caption, b.bbox)
    np.testing.assert_allclose(a.rgba, b.rgba, atol=1e-6)   # the layers are 8-bit already
    np.testing.assert_array_equal(a.visible_mask, b.visible_mask)


# --- annotation files ---------------------------------------------------------------------

@pytest.mark.parametrize('name', ['x.p.zip', 'x.p', 'x.pkl', 'x.p.zl'])
@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_load_annotation_file_forms(tmp_path, name, protocol):
  ann = make_annotation(make_photo(), 'list')
  loaded = mulan.load_annotation(write_annotation(tmp_path / name, ann, protocol))
  assert loaded['background']['blip2'] == 'a street'
  for got, want in zip(loaded['instances'], ann['instances']):
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value)
      assert np.asarray(got[key]).dtype == np.asarray(value).dtype


def test_load_annotation_accepts_numpy1_names(tmp_path):
  """numpy 1.x wrote `numpy.core.multiarray`; numpy 2 writes `numpy._core.multiarray`."""
  data = pickle.dumps({'a': np.arange(6, dtype=np.int16).reshape(2, 3), 's': np.float32(2)}, 2)
  assert b'numpy._core.multiarray' in data
  path = tmp_path / 'old.p'
  path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
  loaded = mulan.load_annotation(path)
  np.testing.assert_array_equal(loaded['a'], np.arange(6).reshape(2, 3))
  assert loaded['s'] == np.float32(2)


class Payload:
  """Unpickling this runs a shell command."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_code_in_a_pickle_is_refused_not_run(tmp_path):
  marker = tmp_path / 'pwned'
  data = pickle.dumps({'background': Payload(f'touch {shlex.quote(str(marker))}')})
  pickle.loads(data)   # control, on our own bytes: plain pickle does run the payload
  assert marker.exists()
  marker.unlink()
  path = write_annotation(tmp_path / 'evil.p.zip', {})
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('evil.p', data)
  with pytest.raises(SampleError, match=r'evil\.p\.zip.*refused global \w+\.system'):
    mulan.load_annotation(path)
  assert not marker.exists()


def test_os_system_global_is_named(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.p'
  path.write_bytes(f'cos\nsystem\n(S{f"touch {marker}"!r}\ntR.'.encode())
  with pytest.raises(SampleError, match=r'evil\.p: .*refused global os\.system'):
    mulan.load_annotation(path)
  assert not marker.exists()


def test_zip_must_hold_one_member(tmp_path):
  path = tmp_path / 'two.p.zip'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('a.p', pickle.dumps({}))
    zf.writestr('b.p', pickle.dumps({}))
  with pytest.raises(SampleError, match=r'two\.p\.zip: .*exactly one pickle.*2 members'):
    mulan.load_annotation(path)


@pytest.mark.parametrize('name', ['big.p.zip', 'big.p.zl'])
def test_oversized_archive_is_refused(tmp_path, monkeypatch, name):
  path = write_annotation(tmp_path / name, {'zeros': np.zeros(10_000, np.uint8)})
  monkeypatch.setattr(mulan, 'MAX_PICKLE_BYTES', 5_000)
  with pytest.raises(SampleError, match=rf'{name}: .*zip bomb'):
    mulan.load_annotation(path)


@pytest.mark.parametrize('name, data', [
    ('corrupt.p.zip', b'PK\x03\x04 this is not a zip archive'),
    ('truncated.p', pickle.dumps({'a': np.zeros(100)})[:60]),
    ('garbage.pkl', b'\x00\x01\x02'),
    ('empty.p', b'')])
def test_unreadable_annotation_names_the_file(tmp_path, name, data):
  (tmp_path / name).write_bytes(data)
  with pytest.raises(SampleError, match=rf'{name}: not a readable annotation'):
    mulan.load_annotation(tmp_path / name)


def test_pickle_of_a_non_dict(tmp_path):
  path = write_annotation(tmp_path / 'list.p.zip', [1, 2, 3])
  with pytest.raises(SampleError, match=r'list\.p\.zip: the annotation is a list'):
    mulan.load_annotation(path)
  row = {'id': 'mulan-list', 'annotation': path,
         'image': write_image(tmp_path / 'list.png', make_photo())}
  with pytest.raises(SampleError, match=r"sample 'mulan-list': .*list\.p\.zip"):
    mulan.to_sample(row)


# --- malformed annotations ----------------------------------------------------------------

@pytest.mark.parametrize('form', ['stacked', 'list'])
def test_wrong_shape_alpha_names_instance_and_field(tmp_path, form):
  ann = make_annotation(make_photo(), form)
  if form == 'stacked':
    ann['instances']['instance_alpha'] = np.zeros((3, H, W - 1), np.uint8)
  else:
    ann['instances'][1]['instance_alpha'] = np.zeros((H, W - 1), np.uint8)
  bad = 'instances\\[0\\]' if form == 'stacked' else 'instances\\[1\\]'
  with pytest.raises(SampleError, match=rf"'mulan-000000000042': {bad}\.instance_alpha has "
                                        rf'shape \(16, 19\), expected \(16, 20\)'):
    import_one(tmp_path, ann)


@pytest.mark.parametrize('edit, field', [
    (lambda a: a['background'].pop('inpainted_delta'), r'background\.inpainted_delta is missing'),
    (lambda a: a.pop('instances'), r'annotation\.instances is missing'),
    (lambda a: a['instances'][2].pop('original_image_mask'),
     r'instances\[2\]\.original_image_mask is missing'),
    (lambda a: a['instances'][0].update(inpainted_delta=np.zeros((H, W), np.uint8)),
     r'instances\[0\]\.inpainted_delta has shape \(16, 20\), expected \(16, 20, 3\)'),
    (lambda a: a['instances'][1].update(blip2=['two', 'captions']),
     r'instances\[1\]\.blip2 is a list, expected text'),
    (lambda a: a['instances'][1].update(instance_alpha=np.full((H, W), 300.0)),
     r'instances\[1\]\.instance_alpha has values outside')])
def test_malformed_annotation_names_the_field(tmp_path, edit, field):
  ann = make_annotation(make_photo(), 'list')
  edit(ann)
  with pytest.raises(SampleError, match=rf"'mulan-000000000042': {field}"):
    import_one(tmp_path, ann)


def test_stacked_instance_counts_must_agree(tmp_path):
  ann = make_annotation(make_photo())
  ann['instances']['blip2'] = CAPTIONS[:2]
  with pytest.raises(SampleError, match='differing instance counts'):
    import_one(tmp_path, ann)


def test_corrupt_base_image_names_the_file(tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  row = {'id': 'mulan-broken', 'image': tmp_path / 'broken.jpg',
         'annotation': write_annotation(tmp_path / 'broken.p.zip', make_annotation(make_photo()))}
  with pytest.raises(SampleError, match=r"'mulan-broken': base image .*broken\.jpg: not a "
                                        r'readable image'):
    mulan.to_sample(row)


# --- pairing ------------------------------------------------------------------------------

def test_rows_pair_by_stem_in_nested_folders(tmp_path):
  photo = make_photo()
  ann = make_annotation(photo)
  anns, imgs = tmp_path / 'annotations', tmp_path / 'coco'
  (anns / 'part2').mkdir(parents=True)
  write_annotation(anns / '000000000001.p.zip', ann)
  write_annotation(anns / 'part2' / '000000000002.p', ann)
  write_annotation(anns / '3.pkl', ann)                      # COCO's zero padding differs
  write_annotation(anns / '000000000004.p.zip', ann)         # its photo is missing
  (anns / 'README.txt').write_text('not an annotation')
  write_image(imgs / 'train2017' / '000000000001.jpg', photo)
  write_image(imgs / 'val2017' / '000000000002.png', photo)
  write_image(imgs / 'val2017' / '000000000003.JPEG', photo)

  got = list(mulan.rows(anns, imgs))
  assert [(r['id'], r['annotation'].relative_to(anns).as_posix(),
           r['image'] and r['image'].relative_to(imgs).as_posix()) for r in got] == [
      ('mulan-000000000001', '000000000001.p.zip', 'train2017/000000000001.jpg'),
      ('mulan-000000000004', '000000000004.p.zip', None),
      ('mulan-3', '3.pkl', 'val2017/000000000003.JPEG'),
      ('mulan-000000000002', 'part2/000000000002.p', 'val2017/000000000002.png')]
  for row in got[:1] + got[2:]:
    assert mulan.to_sample(row).provenance['image'] == str(row['image'])
  with pytest.raises(SampleError, match=r"'mulan-000000000004': no base image "
                                        r'000000000004\.\(jpg\|jpeg\|png\|webp\) found for '
                                        r'annotation .*000000000004\.p\.zip'):
    mulan.to_sample(got[1])


def test_rows_from_pairs_csv(tmp_path):
  photo = make_photo()
  (tmp_path / 'ann').mkdir()
  write_annotation(tmp_path / 'ann' / '7.p.zip', make_annotation(photo))
  write_image(tmp_path / 'img' / '7.png', photo)
  elsewhere = write_annotation(tmp_path / '8.p', make_annotation(photo))
  (tmp_path / 'data').mkdir()
  pairs = tmp_path / 'data' / 'pairs.csv'
  with open(pairs, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'annotation', 'caption'])
    writer.writerow(['../img/7.png', '../ann/7.p.zip', 'ignored'])
    writer.writerow([str(tmp_path / 'img' / '7.png'), str(elsewhere), ''])
    writer.writerow(['../img/9.png', '../ann/9.p.zip', ''])

  got = list(mulan.rows(None, pairs_csv=pairs))
  assert [r['id'] for r in got] == ['mulan-7', 'mulan-8', 'mulan-9']
  assert got[0]['annotation'].resolve() == (tmp_path / 'ann' / '7.p.zip').resolve()
  assert got[1]['annotation'] == elsewhere
  for row in got[:2]:
    assert mulan.to_sample(row).layers[1].caption == 'a red car'
  with pytest.raises(SampleError, match=r"'mulan-9': base image .*9\.png of annotation "
                                        r'.*9\.p\.zip is missing'):
    mulan.to_sample(got[2])


def test_pairs_csv_missing_column(tmp_path):
  pairs = tmp_path / 'pairs.csv'
  pairs.write_text('image,ann\na.png,a.p.zip\n')
  with pytest.raises(ValueError, match=r"pairs\.csv: no 'annotation' column"):
    mulan.rows(None, pairs_csv=pairs)


def test_rows_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='not both'):
    mulan.rows(tmp_path, pairs_csv=tmp_path / 'pairs.csv')
  with pytest.raises(NotADirectoryError, match='missing'):
    mulan.rows(tmp_path / 'missing', tmp_path)
