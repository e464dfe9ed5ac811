"""Editing with shadows that follow (layerjax.edit): each edit against pixels computed by hand
(shifted arrays, the closed form of a black shadow over a background, a scaled rectangle's
box), colours against the standard library's colorsys, and the command line."""

import colorsys
import re

import numpy as np
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.data.schema import Layer
from layerjax.edit import Document, EditError
from layerjax.edit import __main__ as edit_cli
from layerjax.edit.colour import hsv_to_rgb, recolour, rgb_to_hsv
from layerjax.edit.geometry import ground_contact
from layerjax.export import psd
from test_export import two_objects
from test_schema import make_sample

H, W = 48, 64


def scene(tint=(0.0, 0.0, 0.0)) -> schema.LayeredSample:
  """A textured background; a red box (rows 10..29, cols 20..35) standing on the ground
  with a shadow (alpha 0.5, colour `tint`) to its right on rows 24..31; a blue box
  (rows 30..41, cols 44..55) with no shadow; and a green box behind both."""
  yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
  bg = np.stack([0.3 + 0.4 * xx / W, 0.3 + 0.4 * yy / H, np.full_like(xx, 0.6),
                 np.ones_like(xx)], -1)

  def box(y0, y1, x0, x1, rgb, a=1.0):
    x = np.zeros((H, W, 4), np.float32)
    x[y0:y1, x0:x1] = (*rgb, a)
    return x

  layers = [Layer('background', 'background', bg.astype(np.float32)),
            Layer('object_1', 'object', box(2, 8, 2, 10, (0.1, 0.8, 0.2)), label='plant'),
            Layer('shadow_2', 'shadow', box(24, 30, 36, 50, tint, 0.5), owner='object_2'),
            Layer('object_2', 'object', box(10, 30, 20, 36, (0.9, 0.1, 0.1)), label='mug'),
            Layer('object_3', 'object', box(30, 42, 44, 56, (0.1, 0.2, 0.9)), label='cat')]
  return schema.assemble('scene', layers, {'source': 'test'})


def shift(x, dx, dy):
  """`x` [H, W, ...] moved by whole pixels, zeros where nothing lands (independent of
  the resampling code)."""
  out = np.zeros_like(x)
  h, w = x.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      x[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def test_no_edit_reproduces_the_composite_exactly():
  s = two_objects()
  out = Document(s).render()
  np.testing.assert_array_equal(schema.composite(out.layers), schema.composite(s.layers))
  assert out.id == f'{s.id}-edited' and out.provenance['edited_from'] == s.id
  assert out.provenance['edits'] == []


def test_move_carries_the_shadow_and_darkens_the_new_ground_as_before():
  s = scene()
  out = Document(s).move('mug', 6, -3).render()
  for name in ('object_2', 'shadow_2'):
    np.testing.assert_array_equal(out.layer(name).rgba[..., 3],
                                  shift(s.layer(name).rgba[..., 3], 6, -3))
  # A black shadow of alpha 0.5 over background B composites to B / 2, wherever it lands.
  bg = s.layers[0].rgba[..., :3]
  shadow_only = (out.layer('shadow_2').rgba[..., 3] > 0) & (out.layer('object_2').rgba[..., 3]
                                                          == 0)
  shadow_only &= out.layer('object_3').rgba[..., 3] == 0
  assert shadow_only.sum() > 50
  np.testing.assert_allclose(out.image[shadow_only], bg[shadow_only] / 2, atol=1e-6)
  # Where the shadow was and is no more, the background shows.
  left = (s.layer('shadow_2').rgba[..., 3] > 0) & (out.layer('shadow_2').rgba[..., 3] == 0)
  left &= out.layer('object_2').rgba[..., 3] == 0
  assert left.sum() > 10
  np.testing.assert_allclose(out.image[left], bg[left], atol=1e-6)
  # The mug's prompt box moved with it.
  (prompt,) = [p for p in out.prompts if p.target == 'object_2']
  assert prompt.box == (26, 7, 42, 27)
  assert out.provenance['edits'] == [{'edit': 'move', 'layer': 'object_2', 'dx': 6.0,
                                      'dy': -3.0}]


def test_a_tinted_shadow_keeps_its_ratio_to_whatever_lies_under_it():
  s = scene(tint=(0.1, 0.1, 0.3))  # a bluish shadow
  old_ratio = s.image / s.layers[0].rgba[..., :3]
  for doc in (Document(s).move('mug', 5, 4),
              Document(s).replace_background(np.full((H, W, 3), 0.9, np.float32))):
    out = doc.render()
    bg = out.layers[0].rgba[..., :3]
    ratio = out.image / bg
    moved = doc.placement('object_2')
    dx, dy = int(moved.dx), int(moved.dy)
    where = (shift(s.layer('shadow_2').rgba[..., 3], dx, dy) > 0)
    where &= (out.layer('object_2').rgba[..., 3] == 0) & (out.layer('object_3').rgba[..., 3] == 0)
    assert where.sum() >= 40
    np.testing.assert_allclose(ratio[where], shift(old_ratio, dx, dy)[where], atol=1e-5)


def test_scale_about_the_ground_contact_keeps_the_shadow_attached():
  s = scene()
  assert ground_contact(s.layer('object_2').rgba[..., 3]) == (28.0, 30.0)  # box cols 20..35
  out = Document(s).scale('mug', 1.5).render()
  # The box [20, 36) x [10, 30) scaled 1.5x about (28, 30): [16, 40) x [0, 30).
  assert schema.alpha_bbox(out.layer('object_2').rgba[..., 3] >= 0.5) == (16, 0, 40, 30)
  # The shadow [36, 50) x [24, 30), scaled about the same point: [40, 61) x [21, 30).
  assert schema.alpha_bbox(out.layer('shadow_2').rgba[..., 3] >= 0.25) == (40, 21, 61, 30)
  # Solid inside: premultiplied resampling keeps the colour up to the soft edge.
  a = out.layer('object_2').rgba
  np.testing.assert_allclose(a[a[..., 3] > 0][:, :3], np.broadcast_to((0.9, 0.1, 0.1),
                                                                        (int((a[..., 3] > 0)
                                                                             .sum()), 3)),
                             atol=1e-5)


def test_shrinking_resamples_premultiplied_without_dark_fringes():
  s = make_sample(h=40, w=56)
  ball = s.layer('object_1').rgba
  ball[ball[..., 3] == 0] = 0  # black where transparent: what a straight resampling mixes in
  out = Document(s).scale('ball', 0.4).render()
  ball = out.layer('object_1').rgba
  colour = s.layer('object_1').rgba[10, 18, :3]  # the disc's centre
  seen = ball[..., 3] > 1e-3
  assert 0 < seen.sum() < (s.layer('object_1').rgba[..., 3] > 1e-3).sum() / 3
  np.testing.assert_allclose(ball[seen][:, :3], np.broadcast_to(colour, (seen.sum(), 3)),
                             atol=1e-4)


def test_moved_off_the_canvas_and_back_comes_back_whole():
  s = scene()
  gone = Document(s).move('mug', 50, 0).render()
  assert gone.layer('object_2').rgba[..., 3].sum() < s.layer('object_2').rgba[..., 3].sum()
  back = Document(s).move('mug', 50, 0).move('mug', -50, 0).render()
  np.testing.assert_array_equal(schema.composite(back.layers), schema.composite(s.layers))


def test_remove_takes_the_shadow_and_shows_the_background():
  s = scene()
  out = Document(s).remove('mug').render()
  assert [l.name for l in out.layers] == ['background', 'object_1', 'object_3']
  was = (s.layer('object_2').rgba[..., 3] > 0) | (s.layer('shadow_2').rgba[..., 3] > 0)
  was &= s.layer('object_3').rgba[..., 3] == 0
  np.testing.assert_allclose(out.image[was], s.layers[0].rgba[..., :3][was], atol=1e-6)
  assert {p.target for p in out.prompts} == {'object_1', 'object_3'}
  with pytest.raises(EditError, match=r"'object_2' has been removed"):
    Document(s).remove('mug').move('object_2', 1, 1)


@pytest.mark.parametrize('where, order', [
    ('top', ['object_1', 'object_3', 'shadow_2', 'object_2']),
    ('bottom', ['shadow_2', 'object_2', 'object_1', 'object_3']),
    ('up', ['object_1', 'object_3', 'shadow_2', 'object_2']),
    ('down', ['shadow_2', 'object_2', 'object_1', 'object_3']),
    (1, ['object_1', 'shadow_2', 'object_2', 'object_3']),
])
def test_reorder_moves_the_object_with_its_shadow_under_it(where, order):
  out = Document(scene()).reorder('mug', where).render()
  assert [l.name for l in out.layers[1:]] == order


def test_reorder_of_an_object_below_another_shadowed_one():
  out = Document(scene()).reorder('cat', 'bottom').reorder('plant', 'up').render()
  assert [l.name for l in out.layers[1:]] == ['object_3', 'shadow_2', 'object_2', 'object_1']
  out = Document(scene()).reorder('cat', 1).render()
  assert [l.name for l in out.layers[1:]] == ['object_1', 'object_3', 'shadow_2', 'object_2']


def test_hsv_against_colorsys():
  rng = np.random.default_rng(0)
  rgb = rng.random((500, 3))
  rgb[:20] = rgb[:20, :1]  # greys
  rgb[20], rgb[21] = 0, 1
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(rgb_to_hsv(rgb), ref, atol=1e-12)
  np.testing.assert_allclose(hsv_to_rgb(ref), [colorsys.hsv_to_rgb(*p) for p in ref],
                             atol=1e-12)


def test_recolour_changes_the_object_only():
  s = scene()
  out = Document(s).recolour('mug', hue=120).recolour('cat', brightness=0.5,
                                                      saturation=0).render()
  mug, cat = out.layer('object_2').rgba, out.layer('object_3').rgba
  inside = s.layer('object_2').rgba[..., 3] > 0
  # Red (0.9, 0.1, 0.1) turned 120 degrees is green with the same S and V.
  np.testing.assert_allclose(mug[inside][:, :3], np.broadcast_to((0.1, 0.9, 0.1),
                                                                 (inside.sum(), 3)), atol=1e-6)
  # Blue (0.1, 0.2, 0.9) with no saturation and half the value: grey 0.45.
  np.testing.assert_allclose(cat[30:42, 44:56, :3], 0.45, atol=1e-6)
  for name in ('background', 'shadow_2', 'object_1'):
    np.testing.assert_array_equal(out.layer(name).rgba, s.layer(name).rgba)
  np.testing.assert_array_equal(mug[..., 3], s.layer('object_2').rgba[..., 3])
  # Two turns add up: 200 + 160 degrees is the identity.
  twice = recolour(np.array([[0.9, 0.1, 0.1]]), hue=200)
  np.testing.assert_allclose(recolour(twice, hue=160), [[0.9, 0.1, 0.1]], atol=1e-12)


def test_new_background_keeps_objects_and_shadows():
  s = scene()
  new = np.zeros((H, W, 3), np.float32)
  new[..., 1] = 0.8
  out = Document(s).replace_background(new, source='grass.jpg').render()
  np.testing.assert_array_equal(out.layers[0].rgba[..., :3], new)
  np.testing.assert_array_equal(out.layer('object_2').rgba, s.layer('object_2').rgba)
  # The black shadow at alpha 0.5 halves the new green.
  np.testing.assert_allclose(out.image[25, 45], (0, 0.4, 0), atol=1e-6)
  assert out.provenance['edits'][-1] == {'edit': 'background', 'source': 'grass.jpg'}


@pytest.mark.parametrize('call, message', [
    (lambda d: d.move('dog', 1, 1), r"no object named or labelled 'dog' \(objects: object_1 "
                                    r"\(plant\), object_2 \(mug\), object_3 \(cat\)\)"),
    (lambda d: d.scale('mug', 0), r"scale of 'object_2' must be a positive number, got 0"),
    (lambda d: d.scale('mug', -2), r'positive number'),
    (lambda d: d.scale('mug', float('nan')), r'positive number'),
    (lambda d: d.move('shadow_2', 1, 1), r"'shadow_2' is the shadow: edits name an object "
                                         r'\(its shadow follows it\)'),
    (lambda d: d.remove('background'), r"'background' is the background"),
    (lambda d: d.reorder('mug', 'middle'), r"order of 'object_2' must be one of top, bottom"),
    (lambda d: d.reorder('mug', 3), r'index 0\.\.2, got 3'),
    (lambda d: d.recolour('mug', saturation=-1), r'factors >= 0'),
    (lambda d: d.replace_background(np.zeros((10, 10, 3))), r'is \[10, 10, 3\], the sample '
                                                            r'\[48, 64, 3\]'),
])
def test_bad_edits_name_the_sample_and_layer(call, message):
  with pytest.raises(EditError, match=r"sample 'scene': .*" + message):
    call(Document(scene()))


def test_an_ambiguous_label_asks_for_a_layer_name():
  s = scene()
  s.layer('object_3').label = 'Mug'
  with pytest.raises(EditError, match=r"'mug' is the label of 2 objects \(object_2, object_3\)"):
    Document(s).move('mug', 1, 1)
  assert Document(s).find('object_3') == 'object_3'


def test_command_line_writes_the_edit_and_its_files(tmp_path, capsys):
  s = scene()
  schema.write_folder(s, tmp_path / 'in')
  photo = np.zeros((30, 90, 3), np.uint8)
  photo[..., 2] = 200
  Image.fromarray(photo).save(tmp_path / 'sky.png')
  out = tmp_path / 'edited'
  argv = [str(tmp_path / 'in'), '--move', 'mug:+4,0', '--scale', 'mug:1.25', '--remove', 'cat',
          '--recolor', 'mug:hue+30,saturation*0.5', '--order', 'mug:bottom',
          '--background', str(tmp_path / 'sky.png'), '--format', 'psd', '--out', str(out)]
  assert edit_cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert 'sky.png: 90x30 scaled to cover 64x48 and centre-cropped' in printed
  edited = schema.read_folder(out / 'scene-edited')
  assert [l.name for l in edited.layers] == ['background', 'shadow_2', 'object_2', 'object_1']
  assert [e['edit'] for e in edited.provenance['edits']] == [
      'move', 'scale', 'recolour', 'order', 'remove', 'background']
  np.testing.assert_allclose(edited.layers[0].rgba[..., :3], np.broadcast_to(
      (0, 0, 200 / 255), (H, W, 3)), atol=1 / 255)
  picture = np.asarray(Image.open(out / 'scene-edited.png').convert('RGB')) / 255
  np.testing.assert_allclose(picture, edited.image, atol=0.5 / 255 + 1e-6)
  back = psd.read_psd(out / 'scene-edited.psd')
  assert [l.name for l in back.layers] == [l.name for l in edited.layers]
  # Again: refused, nothing replaced; with --overwrite, replaced.
  before = (out / 'scene-edited.png').read_bytes()
  assert edit_cli.main(argv[:-2] + ['--out', str(out)]) == 2
  assert 'already there; pass --overwrite' in capsys.readouterr().err
  assert (out / 'scene-edited.png').read_bytes() == before
  assert edit_cli.main(argv + ['--overwrite']) == 0


@pytest.mark.parametrize('args, message', [
    (['--move', 'mug:1,1', '--format', 'gif'], r"--format: expected some of psd,ora"),
    (['--move', 'mug:4'], r"--move: expected NAME:DX,DY \(pixels\), got 'mug:4'"),
    (['--scale', 'mug'], r"--scale: expected NAME:FACTOR, got 'mug'"),
    (['--recolor', 'mug:hue*2'], r"'hue\*2' in 'mug:hue\*2': expected hue\+DEG"),
    (['--recolor', 'mug:hue+2,hue+3'], r'each once'),
    (['--order', 'mug:front'], r'expected NAME:top\|bottom\|up\|down\|INDEX'),
    (['--move', 'dog:1,1'], r"in: sample 'scene': no object named or labelled 'dog'"),
    (['--scale', 'mug:-1'], r'must be a positive number'),
    (['--background', 'missing.jpg'], r'missing.jpg: no such file'),
])
def test_command_line_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args,
                                                              message):
  schema.write_folder(scene(), tmp_path / 'in')
  code = edit_cli.main([str(tmp_path / 'in'), '--out', str(tmp_path / 'out'), *args])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert re.search(message, err), err
  assert not (tmp_path / 'out').exists()


def test_command_line_exact_size_refuses_another_size(tmp_path, capsys):
  schema.write_folder(scene(), tmp_path / 'in')
  Image.fromarray(np.zeros((30, 90, 3), np.uint8)).save(tmp_path / 'sky.png')
  code = edit_cli.main([str(tmp_path / 'in'), '--background', str(tmp_path / 'sky.png'),
                        '--exact-size', '--out', str(tmp_path / 'out')])
  assert code == 2
  assert 'sky.png: 90x30, the sample is 64x48 (--exact-size)' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_a_psd_edited_elsewhere_is_recomposed_and_edited(tmp_path, capsys):
  """What a user does after editing in Photoshop: the saved PSD back into a sample folder and
  its composite (no edit), or edited further here."""
  s = scene()
  psd.write_psd(s, tmp_path / 'mine.psd')
  out = tmp_path / 'out'
  assert edit_cli.main([str(tmp_path / 'mine.psd'), '--id', 'back', '--out', str(out)]) == 0
  assert 'recomposed' in capsys.readouterr().out
  back = schema.read_folder(out / 'back')
  assert [l.name for l in back.layers] == [l.name for l in s.layers]
  np.testing.assert_allclose(back.image, s.image, atol=1.5 / 255)
  assert edit_cli.main([str(tmp_path / 'mine.psd'), '--remove', 'cat', '--out', str(out)]) == 0
  assert 'object_3' not in [l.name for l in schema.read_folder(out / 'scene-edited').layers]
  assert edit_cli.main([str(tmp_path / 'notes.txt'), '--out', str(out)]) == 2
  assert 'notes.txt: no such file or folder' in capsys.readouterr().err
  (tmp_path / 'notes.txt').write_text('hello')
  assert edit_cli.main([str(tmp_path / 'notes.txt'), '--out', str(out)]) == 2
  assert 'notes.txt: not a sample folder nor a layer file (.psd, .ora, .zip)' in \
      capsys.readouterr().err
