"""The Crello importer on tiny parquet files written here in the released formats (v5: pixels
and degrees; v3: canvas fractions, radians and ClassLabel canvas sizes)."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.data.importers import crello
from layerjax.data.schema import SampleError

V5_TYPES = ['ColoredBackground', 'ImageElement', 'MaskElement', 'SvgElement', 'SvgMaskElement',
            'TextElement']
V3_TYPES = [t[0].lower() + t[1:] for t in V5_TYPES]       # lower camel: 'svgElement'
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png(pixels, alpha=255) -> bytes:
  """PNG of a [h][w] grid of RGB tuples, RGBA with constant `alpha`."""
  arr = np.array(pixels, np.uint8)
  rgba = np.concatenate([arr, np.full((*arr.shape[:2], 1), alpha, np.uint8)], -1)
  buf = io.BytesIO()
  Image.fromarray(rgba).save(buf, format='PNG')
  return buf.getvalue()


def solid(color, w, h, alpha=255) -> bytes:
  return png([[color] * w] * h, alpha)


def element(type, left, top, width, height, image, angle=0.0, opacity=1.0, text=''):
  """One element in v5 terms: canvas pixels, degrees, a v5 type name."""
  return dict(type=type, left=left, top=top, width=width, height=height, angle=angle,
              opacity=opacity, image=image, text=text)


def template(tid, size, *elements):
  return {'id': tid, 'size': size, 'elements': list(elements)}


def sequence_of(names, form):
  label = {'names': names, '_type': 'ClassLabel'}
  return [label] if form == 'list' else {'feature': label, '_type': form}


def write(path, templates, version='v5', type_form='Sequence', drop=(), overrides=None):
  """A Crello parquet: v5 (pixels, degrees, int canvas size, `font_bold`) or v3 (fractions of
  the canvas, radians, canvas sides as ClassLabels named by their pixel sizes)."""
  v5 = version == 'v5'
  type_names = V5_TYPES if v5 else V3_TYPES
  sizes = sorted({str(s) for t in templates for s in t['size']}, key=int)
  cols = {k: [] for k in ('id', 'canvas_width', 'canvas_height', 'length', *crello.ELEMENT_COLUMNS)}
  for t in templates:
    w, h = t['size']
    els = t['elements']
    cols['id'].append(t['id'])
    cols['canvas_width'].append(w if v5 else sizes.index(str(w)))
    cols['canvas_height'].append(h if v5 else sizes.index(str(h)))
    cols['length'].append(len(els))
    cols['type'].append([V5_TYPES.index(e['type']) for e in els])   # same ids in both lists
    for key, denom in (('left', w), ('top', h), ('width', w), ('height', h)):
      cols[key].append([e[key] if v5 else e[key] / denom for e in els])
    cols['angle'].append([e['angle'] if v5 else math.radians(e['angle']) for e in els])
    cols['opacity'].append([e['opacity'] for e in els])
    cols['image'].append([{'bytes': e['image'], 'path': None} for e in els])
    cols['text'].append([e['text'] for e in els])
  cols.update(overrides or {})
  floats = pa.list_(pa.float32())
  types = {'id': pa.string(), 'canvas_width': pa.int64(), 'canvas_height': pa.int64(),
           'length': pa.int64(), 'type': pa.list_(pa.int64()), 'left': floats, 'top': floats,
           'width': floats, 'height': floats, 'angle': floats, 'opacity': floats,
           'image': pa.list_(pa.struct([('bytes', pa.binary()), ('path', pa.string())])),
           'text': pa.list_(pa.string())}
  features = {'id': {'dtype': 'string', '_type': 'Value'},
              'type': sequence_of(type_names, type_form)}
  if v5:
    cols['font_bold'] = [[[False] * len(e['text']) for e in t['elements']] for t in templates]
    types['font_bold'] = pa.list_(pa.list_(pa.bool_()))
  else:
    for side in ('canvas_width', 'canvas_height'):
      features[side] = {'names': sizes, '_type': 'ClassLabel'}
  arrays = {k: pa.array(v, types[k]) for k, v in cols.items() if k not in drop}
  meta = {'huggingface': json.dumps({'info': {'features': features}})}
  pq.write_table(pa.table(arrays).replace_schema_metadata(meta), path)
  return path


def sample_of(tmp_path, tmpl, version='v5', **kwargs):
  path = write(tmp_path / f'{tmpl["id"]}-{version}.parquet', [tmpl], version)
  (row,) = crello.rows(path)
  return crello.to_sample(row, **kwargs)


def alpha_box(alpha, threshold=0.5):
  return schema.alpha_bbox(alpha > threshold)


# --- geometry -----------------------------------------------------------------------------

def test_axis_aligned_element_lands_on_its_box_in_both_layouts(tmp_path):
  tmpl = template('t1', (20, 15), element('ImageElement', 5, 2, 8, 6, solid(RED, 4, 3)))
  v5 = sample_of(tmp_path, tmpl, 'v5')
  assert [l.name for l in v5.layers] == ['background', 'object_1']
  bg, obj = v5.layers
  assert (bg.rgba == 1).all()                          # nothing is a backdrop: plain white
  a = obj.rgba[..., 3]
  assert (a[3:7, 6:12] == 1).all()                     # interior of x 5..13, y 2..8
  outside = np.ones_like(a, bool)
  outside[1:9, 4:14] = False
  assert (a[outside] == 0).all()
  np.testing.assert_allclose(obj.rgba[2:8, 5:13, :3], np.broadcast_to([1, 0, 0], (6, 8, 3)))
  assert alpha_box(a) == (5, 2, 13, 8)
  assert (obj.label, obj.caption) == ('image', '')
  v3 = sample_of(tmp_path, tmpl, 'v3')
  assert v3.provenance['layout'] == 'normalized' and v5.provenance['layout'] == 'v5'
  assert v3.provenance['canvas_size'] == v5.provenance['canvas_size'] == [20, 15]
  for a5, a3 in zip(v5.layers, v3.layers):
    np.testing.assert_allclose(a3.rgba, a5.rgba, atol=1e-4)
  np.testing.assert_allclose(v3.image, v5.image, atol=1e-4)


@pytest.mark.parametrize('version', ['v5', 'v3'])
def test_positive_angle_rotates_clockwise_about_the_centre(tmp_path, version):
  # An 8x4 box centred at (10, 7), left half red, right half blue, turned by 90 degrees.
  image = png([[RED] * 4 + [BLUE] * 4] * 4)
  tmpl = template('rot', (20, 16), element('SvgElement', 6, 5, 8, 4, image, angle=90))
  obj = sample_of(tmp_path, tmpl, version).layer('object_1')
  assert alpha_box(obj.rgba[..., 3]) == (8, 3, 12, 11)   # 4 wide, 8 tall about (10, 7)
  assert obj.label == 'svg'
  # Clockwise on screen (y down) turns the element's left side to the top.
  np.testing.assert_allclose(obj.rgba[4, 9:11, :3], [[1, 0, 0]] * 2, atol=1e-4)
  np.testing.assert_allclose(obj.rgba[9, 9:11, :3], [[0, 0, 1]] * 2, atol=1e-4)


def test_opacity_scales_alpha_and_small_stored_images_are_stretched(tmp_path):
  # A 2x2 image (green column, blue column) stored for an 8x6 box, as v5.1 downscales them.
  tmpl = template('op', (20, 15),
                  element('ImageElement', 5, 2, 8, 6, png([[GREEN, BLUE]] * 2), opacity=0.5))
  obj = sample_of(tmp_path, tmpl).layer('object_1')
  a = obj.rgba[..., 3]
  np.testing.assert_array_equal(a[2:8, 5:13], 0.5)
  assert alpha_box(a, 0) == (5, 2, 13, 8)
  np.testing.assert_allclose(obj.rgba[2:8, 5:7, :3], np.broadcast_to([0, 1, 0], (6, 2, 3)))
  np.testing.assert_allclose(obj.rgba[2:8, 11:13, :3], np.broadcast_to([0, 0, 1], (6, 2, 3)))


def test_translucent_edges_have_no_dark_fringe(tmp_path):
  # Transparent texels are black; resampling straight colour would darken the red edge.
  image = png([[(0, 0, 0), RED, RED, (0, 0, 0)]] * 2)
  image_alpha = np.asarray(Image.open(io.BytesIO(image)).convert('RGBA')).copy()
  image_alpha[:, [0, 3], 3] = 0
  buf = io.BytesIO()
  Image.fromarray(image_alpha).save(buf, format='PNG')
  tmpl = template('fringe', (24, 8), element('ImageElement', 2, 1, 20, 6, buf.getvalue()))
  obj = sample_of(tmp_path, tmpl).layer('object_1')
  a = obj.rgba[..., 3]
  seen = a > 0
  assert ((a > 0.05) & (a < 0.95)).any()                     # there is a soft edge to check
  np.testing.assert_allclose(obj.rgba[seen][:, :3], np.broadcast_to([1, 0, 0], (seen.sum(), 3)),
                             atol=1e-5)


def test_elements_past_the_canvas_are_clipped_and_invisible_ones_dropped(tmp_path):
  tmpl = template('clip', (20, 15),
                  element('ImageElement', -4, -3, 8, 6, solid(RED, 2, 2)),
                  element('ImageElement', 30, 2, 4, 4, solid(BLUE, 2, 2)),
                  element('ImageElement', 2, 2, 4, 4, solid(BLUE, 2, 2), opacity=0))
  sample = sample_of(tmp_path, tmpl)
  assert [l.name for l in sample.layers] == ['background', 'object_1']
  assert alpha_box(sample.layer('object_1').rgba[..., 3]) == (0, 0, 4, 3)
  assert sample.provenance['dropped_elements'] == [1, 2]


# --- background and objects ---------------------------------------------------------------

def test_leading_colored_background_joins_background_later_opaque_element_does_not(tmp_path):
  teal = (51, 102, 153)
  tmpl = template('bg', (12, 10),
                  element('ColoredBackground', 0, 0, 12, 10, solid(teal, 3, 3)),
                  element('TextElement', 2, 2, 4, 3, solid(RED, 4, 3), text='SALE'),
                  element('ImageElement', 0, 0, 12, 10, solid(WHITE, 6, 5)))
  sample = sample_of(tmp_path, tmpl)
  bg, text, cover = sample.layers
  assert [l.kind for l in sample.layers] == ['background', 'object', 'object']
  np.testing.assert_allclose(bg.rgba, np.broadcast_to([*np.divide(teal, 255), 1], (10, 12, 4)),
                             atol=1e-6)
  assert (text.name, text.label, text.caption) == ('object_1', 'text', 'SALE')
  assert alpha_box(text.rgba[..., 3]) == (2, 2, 6, 5)     # still its own layer, not absorbed
  assert (cover.name, cover.label, cover.caption) == ('object_2', 'image', '')
  assert not text.visible_mask.any() and (sample.image == 1).all()
  assert [p.target for p in sample.prompts] == ['object_2']
  assert sample.provenance['element_types'] == ['ColoredBackground', 'TextElement',
                                                'ImageElement']


def test_backdrop_run_stops_at_the_first_element_that_is_not_one(tmp_path):
  tmpl = template('run', (12, 10),
                  element('ImageElement', -1, -1, 14, 12, solid(BLUE, 4, 4)),   # opaque, all over
                  element('SvgMaskElement', 0, 0, 12, 10, solid(GREEN, 2, 2, alpha=128)),
                  element('ColoredBackground', 0, 0, 12, 10, solid(RED, 2, 2)))
  sample = sample_of(tmp_path, tmpl, 'v3')
  bg, mask, late = sample.layers
  np.testing.assert_allclose(bg.rgba, np.broadcast_to([0, 0, 1, 1], (10, 12, 4)))
  assert (mask.label, late.label) == ('svg mask', 'colored background')
  np.testing.assert_allclose(mask.rgba[..., 3], 128 / 255, atol=1e-6)


def test_sample_is_valid_and_round_trips_through_a_folder(tmp_path):
  tmpl = template('full', (16, 12),
                  element('ColoredBackground', 0, 0, 16, 12, solid((200, 180, 20), 2, 2)),
                  element('ImageElement', 1, 1, 9, 7, png([[RED, GREEN], [BLUE, WHITE]]),
                          angle=30, opacity=0.8),
                  element('TextElement', 6, 4, 8, 5, solid(BLUE, 8, 5, alpha=200), angle=-15,
                          text='Hello\nworld'))
  sample = sample_of(tmp_path, tmpl)
  sample.validate()
  np.testing.assert_allclose(schema.composite(sample.layers)[..., :3], sample.image, atol=1e-6)
  assert sample.id == 'crello-full'
  prov = sample.provenance
  assert prov['source'] == 'crello' and prov['template_id'] == 'full' and prov['row'] == 0
  assert prov['file'].endswith('full-v5.parquet') and prov['scale'] == 1.0
  json.dumps(prov)
  back = schema.read_folder(schema.write_folder(sample, tmp_path / 'out'))
  assert back.id == sample.id and back.provenance == sample.provenance
  assert [(l.name, l.kind, l.label, l.caption) for l in back.layers] == \
      [(l.name, l.kind, l.label, l.caption) for l in sample.layers]
  assert [l.caption for l in back.layers] == ['', '', 'Hello\nworld']
  for a, b in zip(back.layers, sample.layers):
    np.testing.assert_allclose(a.rgba[..., 3], b.rgba[..., 3], atol=0.5 / 255 + 1e-6)
  np.testing.assert_allclose(back.image, sample.image, atol=0.5 / 255 + 1e-6)


def test_max_size_scales_the_output(tmp_path):
  tmpl = template('big', (40, 30), element('ImageElement', 10, 8, 16, 12, solid(RED, 4, 4)))
  half = sample_of(tmp_path, tmpl, max_size=20)
  assert half.size == (15, 20) and half.provenance['scale'] == 0.5
  assert half.provenance['canvas_size'] == [40, 30]
  assert alpha_box(half.layer('object_1').rgba[..., 3]) == (5, 4, 13, 10)
  assert sample_of(tmp_path, tmpl, max_size=None).size == (30, 40)
  assert sample_of(tmp_path, tmpl, max_size=4096).size == (30, 40)   # never upscaled


# --- rows ---------------------------------------------------------------------------------

def test_rows_reads_a_directory_in_sorted_order(tmp_path):
  red = element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2))
  (tmp_path / 'sub').mkdir()
  write(tmp_path / 'b.parquet', [template('b0', (8, 8), red), template('b1', (8, 6), red)])
  write(tmp_path / 'a.parquet', [template('a0', (10, 8), red)], 'v3')
  write(tmp_path / 'sub' / 'c.parquet', [template('c0', (8, 8), red)])
  (tmp_path / 'notes.txt').write_text('not data')
  got = list(crello.rows(tmp_path))
  assert [r['id'] for r in got] == ['a0', 'b0', 'b1', 'c0']
  assert [(r['_file'], r['_row']) for r in got] == [
      (str(tmp_path / 'a.parquet'), 0), (str(tmp_path / 'b.parquet'), 0),
      (str(tmp_path / 'b.parquet'), 1), (str(tmp_path / 'sub' / 'c.parquet'), 0)]
  assert [r['_layout'] for r in got] == ['normalized', 'v5', 'v5', 'v5']
  assert got[0]['type'] == ['imageElement'] and got[1]['type'] == ['ImageElement']
  assert (got[0]['canvas_width'], got[0]['canvas_height']) == ('10', '8')
  assert (got[2]['canvas_width'], got[2]['canvas_height']) == (8, 6)
  assert got[1]['image'][0]['bytes'] == solid(RED, 2, 2)       # left encoded
  assert [r['id'] for r in crello.rows([tmp_path / 'b.parquet', tmp_path / 'a.parquet'])] == \
      ['b0', 'b1', 'a0']


@pytest.mark.parametrize('form', ['Sequence', 'List', 'list'])
def test_rows_decodes_every_sequence_class_label_form(tmp_path, form):
  els = [element(t, 0, 0, 2, 2, solid(RED, 2, 2)) for t in ('SvgMaskElement', 'TextElement')]
  path = write(tmp_path / 'f.parquet', [template('f', (4, 4), *els)], type_form=form)
  assert next(crello.rows(path))['type'] == ['SvgMaskElement', 'TextElement']


def test_rows_layout_can_be_forced(tmp_path):
  path = write(tmp_path / 'v3.parquet', [template('x', (4, 4))], 'v3')
  assert next(crello.rows(path))['_layout'] == 'normalized'
  assert next(crello.rows(path, layout='v5'))['_layout'] == 'v5'
  with pytest.raises(ValueError, match='layout'):
    crello.rows(path, layout='v4')


# --- errors -------------------------------------------------------------------------------

def test_corrupt_element_image_names_template_and_element(tmp_path):
  tmpl = template('bad', (10, 10), element('ImageElement', 0, 0, 4, 4, solid(RED, 2, 2)),
                  element('ImageElement', 0, 0, 4, 4, solid(RED, 2, 2)[:30]))
  path = write(tmp_path / 'bad.parquet', [tmpl])
  (row,) = crello.rows(path)                        # the cheap pass doesn't decode images
  with pytest.raises(SampleError, match=r"'bad' element 1: image"):
    crello.to_sample(row)


@pytest.mark.parametrize('field, value, message', [
    ('width', [[4.0, 0.0]], r"'g' element 1: width 0.0 is not a positive"),
    ('height', [[4.0, float('nan')]], r"'g' element 1: height nan is not a positive"),
    ('left', [[0.0]], r"'g' element 1: column left has 1 entries but the template has "
                      r"length 2"),
])
def test_bad_geometry_names_template_element_and_field(tmp_path, field, value, message):
  red = element('ImageElement', 0, 0, 4, 4, solid(RED, 2, 2))
  path = write(tmp_path / 'g.parquet', [template('g', (10, 10), red, red)],
               overrides={field: value})
  with pytest.raises(SampleError, match=message):
    crello.to_sample(next(crello.rows(path)))


def test_missing_column_names_file_and_column(tmp_path):
  path = write(tmp_path / 'nocol.parquet', [template('x', (4, 4))], drop=('opacity',))
  with pytest.raises(ValueError, match=r'nocol\.parquet.*missing column\(s\) opacity'):
    crello.rows(path)


def test_bad_paths_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.parquet'):
    crello.rows(tmp_path / 'nowhere.parquet')
  (tmp_path / 'text.parquet').write_text('hello')
  with pytest.raises(ValueError, match=r'text\.parquet: not a readable parquet'):
    crello.rows(tmp_path / 'text.parquet')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='empty: no'):
    crello.rows(tmp_path / 'empty')


def test_class_ids_without_their_names_are_refused(tmp_path):
  path = write(tmp_path / 'nometa.parquet', [template('x', (4, 4))])
  pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
  with pytest.raises(ValueError, match=r'nometa\.parquet: column type is list<.*int64'):
    crello.rows(path)


# --- LayerD's ground truth (`layerd_layers`, `--layerd`) -----------------------------------

TEAL, YELLOW = (51, 102, 153), (255, 255, 0)


def layerd_of(tmp_path, tmpl, short_side=6):
  """LayerD's layers of one v5 template; short side 6 on the 8x6 canvases below: scale 1."""
  path = write(tmp_path / f'{tmpl["id"]}-layerd.parquet', [tmpl])
  (row,) = crello.rows(path)
  return crello.layerd_layers(row, short_side)


def layer(hw, box=None, color=(255, 255, 255), alpha=255):
  """The uint8 layer expected by hand: `color`, `alpha` inside box (x0, y0, x1, y1), or over
  the whole canvas without one, transparent black elsewhere (as `_render` leaves it)."""
  out = np.zeros((*hw, 4), np.uint8)
  x0, y0, x1, y1 = box or (0, 0, hw[1], hw[0])
  out[y0:y1, x0:x1] = (*color, alpha)
  return out


def encoded(mode, size, value) -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size, value).save(buf, format='PNG')
  return buf.getvalue()


def assert_layers(got, expected):
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert g.dtype == np.uint8
    np.testing.assert_array_equal(g, e)


def test_layerd_leaves_out_transparent_images_not_translucent_elements(tmp_path):
  hw = (6, 8)
  tmpl = template('tr', (8, 6),
                  element('ColoredBackground', 0, 0, 8, 6, solid(TEAL, 2, 2)),
                  element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2, alpha=200)),
                  element('ImageElement', 4, 2, 2, 2, solid(BLUE, 2, 2), opacity=0.5),
                  element('SvgElement', 0, 4, 2, 2, encoded('LA', (2, 2), (90, 100))),
                  element('ImageElement', 6, 4, 2, 2, solid(RED, 2, 2), opacity=0.001))
  # The RGBA image whose alpha never reaches 255 goes; the opacity field does not count, nor
  # does a translucent image that is not mode RGBA (LA here): LayerD's `is_transparent`.
  assert_layers(layerd_of(tmp_path, tmpl), [
      layer(hw, color=TEAL),
      layer(hw, (4, 2, 6, 4), BLUE, 128),                  # round(255 * 0.5)
      layer(hw, (0, 4, 2, 6), (90, 90, 90), 100),          # back group opaque: no white
      np.zeros((*hw, 4), np.uint8)])   # alpha round(0.255) = 0 and, as skia stores it, no red


def test_layerd_opaque_full_canvas_element_hides_the_elements_below(tmp_path):
  hw = (6, 8)
  tmpl = template('hide', (8, 6),
                  element('ColoredBackground', 0, 0, 8, 6, solid(TEAL, 2, 2)),
                  element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2)),
                  element('ImageElement', -1, -1, 10, 8, solid(YELLOW, 2, 2)),
                  element('ImageElement', 4, 2, 2, 2, solid(BLUE, 2, 2)))
  assert_layers(layerd_of(tmp_path, tmpl),
                [layer(hw, color=YELLOW), layer(hw, (4, 2, 6, 4), BLUE)])


def test_layerd_cuts_by_position_after_removing_transparent_elements(tmp_path):
  # Element 1 is transparent, so when element 3 covers the canvas the kept list is
  # [0, 2, 3, 4, 5] and LayerD's `kept[3:]` is [4, 5]: the covering element goes too (by
  # index it would be [3, 4, 5]: yellow, blue, red). Blue and red then form the back group,
  # which has alpha 0, so white comes first.
  hw = (6, 8)
  tmpl = template('quirk', (8, 6),
                  element('ColoredBackground', 0, 0, 8, 6, solid(TEAL, 2, 2)),
                  element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2, alpha=254)),
                  element('ImageElement', 1, 1, 2, 2, solid(GREEN, 2, 2)),
                  element('ImageElement', 0, 0, 8, 6, solid(YELLOW, 2, 2)),
                  element('ImageElement', 4, 2, 2, 2, solid(BLUE, 2, 2)),
                  element('ImageElement', 6, 0, 2, 2, solid(RED, 2, 2)))
  assert_layers(layerd_of(tmp_path, tmpl), [
      layer(hw), layer(hw, (4, 2, 6, 4), BLUE), layer(hw, (6, 0, 8, 2), RED)])


def test_layerd_white_background_when_the_back_group_has_alpha_zero(tmp_path):
  hw = (6, 8)
  boxes = template('boxes', (8, 6), element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2)),
                   element('ImageElement', 4, 2, 3, 2, encoded('RGB', (3, 2), BLUE)))
  assert_layers(layerd_of(tmp_path, boxes),
                [layer(hw), layer(hw, (1, 1, 3, 3), RED), layer(hw, (4, 2, 7, 4), BLUE)])
  # An element off the canvas is an empty layer that nothing overlaps, so it joins the teal
  # backdrop's group, and LayerD's min over that group's alphas is 0: white goes under teal.
  empty = template('empty', (8, 6), element('ColoredBackground', 0, 0, 8, 6, solid(TEAL, 2, 2)),
                   element('ImageElement', 20, 1, 2, 2, solid(RED, 2, 2)))
  assert_layers(layerd_of(tmp_path, empty),
                [layer(hw), layer(hw, color=TEAL), np.zeros((*hw, 4), np.uint8)])
  # Fewer than 2 layers left: LayerD writes nothing.
  alone = template('alone', (8, 6), element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2)))
  assert layerd_of(tmp_path, alone) == []


def test_layerd_scales_the_short_side_to_512_truncating_the_long_side(tmp_path):
  # 1100 x 600: scale 512 / 600, width int(938.67) = 938 (rounding would give 939).
  tmpl = template('wide', (1100, 600),
                  element('ColoredBackground', 0, 0, 1100, 600, solid(TEAL, 2, 2)),
                  element('ImageElement', 300, 150, 300, 150, solid(RED, 4, 4)))
  path = write(tmp_path / 'wide.parquet', [tmpl])
  bg, red = crello.layerd_layers(next(crello.rows(path)))
  assert bg.shape == red.shape == (512, 938, 4)
  np.testing.assert_array_equal(red, layer((512, 938), (256, 128, 512, 256), RED))
  # Small canvases are scaled up: 40 x 30 -> int(40 * 512 / 30) = int(682.67) = 682. The box
  # x 15..24, y 6..21 becomes x 256..409.6, y 102.4..358.4: the pixels whose centres it holds.
  tmpl = template('small', (40, 30),
                  element('ColoredBackground', 0, 0, 40, 30, solid(TEAL, 2, 2)),
                  element('ImageElement', 15, 6, 9, 15, solid(RED, 4, 4)))
  path = write(tmp_path / 'small.parquet', [tmpl])
  bg, red = crello.layerd_layers(next(crello.rows(path)))
  np.testing.assert_array_equal(red, layer((512, 682), (256, 102, 410, 358), RED))
  with pytest.raises(ValueError, match='short_side must be a positive'):
    crello.layerd_layers(next(crello.rows(path)), 0)


def test_layerd_folder_round_trips_and_is_replaced_only_when_asked(tmp_path):
  from layerjax.evaluate.layerd import read_layerd_folder, write_layerd_folder
  from layerjax.fileio import OutputError
  hw = (6, 8)
  layers = [layer(hw), layer(hw, (1, 1, 3, 3), RED, 77), layer(hw, (4, 2, 7, 4), BLUE)]
  folder = write_layerd_folder(layers, tmp_path / 'x', {'template_id': 'x'})
  assert sorted(p.name for p in folder.iterdir()) == ['0000.png', '0001.png', '0002.png',
                                                      'provenance.json']
  assert_layers(read_layerd_folder(folder), layers)
  assert json.loads((folder / 'provenance.json').read_text()) == \
      {'provenance': {'template_id': 'x'}}
  with pytest.raises(OutputError, match='pass --overwrite'):
    write_layerd_folder(layers[:2], folder)
  assert_layers(read_layerd_folder(write_layerd_folder(layers[:2], folder, overwrite=True)),
                layers[:2])
  (tmp_path / 'theirs').mkdir()
  (tmp_path / 'theirs' / '0000.png').write_bytes(b'not ours')
  with pytest.raises(OutputError, match='is not a LayerD layer folder'):
    write_layerd_folder(layers, tmp_path / 'theirs', overwrite=True)


def test_layerd_command_writes_resumes_and_counts_left_out_templates(tmp_path, capsys):
  from layerjax.data.importers.__main__ import main
  from layerjax.evaluate.layerd import read_layerd_folder
  good = template('good', (8, 6), element('ColoredBackground', 0, 0, 8, 6, solid(TEAL, 2, 2)),
                  element('ImageElement', 4, 2, 2, 2, solid(BLUE, 2, 2)))
  alone = template('a/lone', (8, 6), element('ImageElement', 1, 1, 2, 2, solid(RED, 2, 2)))
  bad = template('bad', (8, 6), element('ImageElement', 1, 1, 2, 2, b'not a png'))
  src, out = write(tmp_path / 'c.parquet', [good, alone, bad]), tmp_path / 'gt'
  run = lambda *extra: main(['crello', str(src), '--output', str(out), '--layerd', *extra])
  assert run('--short-side', '6') == 0
  captured = capsys.readouterr()
  assert '1 written, 0 already there, 1 skipped, 1 left out' in captured.out
  assert "left out: crello template 'a/lone': fewer than 2 layers" in captured.err
  assert sorted(p.name for p in out.iterdir()) == ['crello-good']    # as its sample folder
  assert_layers(read_layerd_folder(out / 'crello-good'),
                [layer((6, 8), color=TEAL), layer((6, 8), (4, 2, 6, 4), BLUE)])
  prov = json.loads((out / 'crello-good' / 'provenance.json').read_text())['provenance']
  assert (prov['template_id'], prov['row'], prov['short_side']) == ('good', 0, 6)
  assert run('--short-side', '6') == 0                       # a re-run redoes nothing
  assert '0 written, 1 already there' in capsys.readouterr().out
  assert run() == 0                                          # other options: rewritten
  assert '1 written, 0 already there' in capsys.readouterr().out
  assert read_layerd_folder(out / 'crello-good')[0].shape == (512, 682, 4)
  assert run('--on-error', 'raise', '--limit', '2') == 0      # left out is not an error
  assert run('--max-size', '20') == 2
  assert '--max-size does not apply with --layerd' in capsys.readouterr().err
  assert main(['crello', str(src), '--output', str(out), '--short-side', '6']) == 2
  assert '--short-side applies with --layerd only' in capsys.readouterr().err
