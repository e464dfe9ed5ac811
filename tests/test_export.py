"""Layer files: OpenRaster and the PNG folder's ZIP, written and read back, checked with
independent readers (zipfile, ElementTree, Pillow's own alpha compositing)."""

import io
import zipfile
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from layerjax.data import schema
from layerjax.data.schema import Layer, LayeredSample
from layerjax.export import ora, png, powerpoint
from layerjax.fileio import OutputError
from test_schema import make_sample

STEP = 1 / 255  # one 8-bit step


def two_objects() -> LayeredSample:
  """make_sample's background, shadow and ball, plus a square with a non-ASCII label."""
  s = make_sample(h=40, w=56)
  h, w = s.size
  square = np.zeros((h, w, 4), np.float32)
  square[22:34, 30:50] = (0.2, 0.6, 0.9, 1.0)
  square[21, 30:50, 3] = 0.5  # a soft top edge
  layers = s.layers + [Layer('object_2', 'object', square, label='tasse à café')]
  return schema.assemble(s.id, layers, s.provenance)


def test_ora_as_the_spec_lays_it_out(tmp_path):
  s = two_objects()
  path = ora.write_ora(s, tmp_path / 'a.ora')
  with zipfile.ZipFile(path) as z:
    first = z.infolist()[0]
    assert first.filename == 'mimetype' and first.compress_type == zipfile.ZIP_STORED
    assert z.read('mimetype') == b'image/openraster'
    root = ET.fromstring(z.read('stack.xml'))
    assert (root.get('w'), root.get('h')) == ('56', '40')
    entries = root.find('stack').findall('layer')
    # Top first; named by label, a shadow after its object; each at its alpha's box.
    assert [e.get('name') for e in entries] == ['tasse à café', 'ball', 'ball shadow',
                                                'background']
    for e, layer in zip(entries, reversed(s.layers)):
      x0, y0, x1, y1 = schema.alpha_bbox(layer.rgba[..., 3])
      assert (int(e.get('x')), int(e.get('y'))) == (x0, y0)
      with Image.open(io.BytesIO(z.read(e.get('src')))) as im:
        assert im.mode == 'RGBA' and im.size == (x1 - x0, y1 - y0)
    merged = np.asarray(Image.open(io.BytesIO(z.read('mergedimage.png'))).convert('RGB'))
    thumb = Image.open(io.BytesIO(z.read('Thumbnails/thumbnail.png')))
    assert max(thumb.size) <= 256
    # Pillow's own compositing of the layer PNGs at their offsets: an independent stack.
    canvas = Image.new('RGBA', (56, 40))
    for e in reversed(entries):
      with Image.open(io.BytesIO(z.read(e.get('src')))) as im:
        layer = Image.new('RGBA', (56, 40))
        layer.paste(im.convert('RGBA'), (int(e.get('x')), int(e.get('y'))))
        canvas = Image.alpha_composite(canvas, layer)
  ours = schema.composite(s.layers)[..., :3] * 255
  assert np.abs(merged - ours).max() <= 0.5 + 1e-3
  # Each layer rounded to 8 bits, then 8-bit compositing: a few steps at most.
  assert np.abs(np.asarray(canvas)[..., :3] - ours).max() <= 3


def test_ora_round_trip(tmp_path):
  s = two_objects()
  back = ora.read_ora(ora.write_ora(s, tmp_path / 'a.ora'))
  assert [(l.name, l.kind, l.owner, l.label) for l in back.layers] == \
      [(l.name, l.kind, l.owner, l.label) for l in s.layers]
  for a, b in zip(back.layers, s.layers):
    np.testing.assert_allclose(a.rgba[..., 3], b.rgba[..., 3], atol=0.5 * STEP + 1e-6)
    seen = b.rgba[..., 3] > 0
    np.testing.assert_allclose(a.rgba[seen][:, :3], b.rgba[seen][:, :3], atol=0.5 * STEP + 1e-6)
  np.testing.assert_allclose(back.image, s.image, atol=4 * STEP)


def test_an_ora_from_elsewhere_reads_bottom_up(tmp_path):
  """GIMP's files have no layerjax attributes: the bottom layer is the background, the rest
  objects, hidden layers dropped, opacity folded into alpha."""
  bg = np.zeros((6, 8, 4), np.uint8)
  bg[..., :3], bg[..., 3] = (10, 200, 30), 255
  dot = np.full((2, 3, 4), 255, np.uint8)
  path = tmp_path / 'gimp.ora'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('mimetype', 'image/openraster')
    z.writestr('stack.xml', '<image w="8" h="6"><stack>'
               '<layer name="hidden" src="data/d.png" visibility="hidden"/>'
               '<layer name="Dot" src="data/d.png" x="5" y="4" opacity="0.5"/>'
               '<layer name="Paper" src="data/bg.png"/></stack></image>')
    for name, a in (('data/bg.png', bg), ('data/d.png', dot)):
      buf = io.BytesIO()
      Image.fromarray(a, 'RGBA').save(buf, format='PNG')
      z.writestr(name, buf.getvalue())
  s = ora.read_ora(path)
  assert [(l.kind, l.label) for l in s.layers] == [('background', 'Paper'), ('object', 'Dot')]
  alpha = s.layers[1].rgba[..., 3]
  assert alpha[4:6, 5:8].min() == alpha.max() == 0.5 and alpha.sum() == 0.5 * 6


@pytest.mark.parametrize('stack,message', [
    ('<stack><stack/></stack>', 'layer groups'),
    ('<stack><layer name="x" src="../etc/passwd"/></stack>', "src '../etc/passwd' is not in"),
    ('<stack><layer name="x" src="data/d.png" x="a"/></stack>', "x='a', not an integer"),
    ('<stack><layer name="x" src="data/d.png"/></stack>', 'does not cover the canvas'),
])
def test_bad_ora_files(tmp_path, stack, message):
  path = tmp_path / 'bad.ora'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('mimetype', 'image/openraster')
    z.writestr('stack.xml', f'<image w="8" h="6">{stack}</image>')
    buf = io.BytesIO()
    Image.new('RGBA', (2, 2)).save(buf, format='PNG')
    z.writestr('data/d.png', buf.getvalue())
  with pytest.raises(ora.OraError, match=message):
    ora.read_ora(path)
  (tmp_path / 'not.ora').write_bytes(b'hello')
  with pytest.raises(ora.OraError, match='not an OpenRaster file'):
    ora.read_ora(tmp_path / 'not.ora')


@pytest.mark.parametrize('write', [ora.write_ora, png.write_zip, powerpoint.write_pptx])
def test_writers_replace_a_file_only_when_asked(tmp_path, write):
  s = make_sample()
  path = tmp_path / 'out'
  path.write_bytes(b'keep me')
  with pytest.raises(OutputError, match='--overwrite'):
    write(s, path)
  assert path.read_bytes() == b'keep me'
  write(s, path, overwrite=True)
  assert zipfile.is_zipfile(path)


def test_png_zip_round_trip(tmp_path):
  s = two_objects()
  path = png.write_zip(s, tmp_path / 's.zip')
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
  assert 'manifest.json' in names and 'image.png' in names
  assert sum(n.startswith('layers/') for n in names) == len(s.layers)
  back = png.read_zip(path)
  assert [l.name for l in back.layers] == [l.name for l in s.layers]
  for a, b in zip(back.layers, s.layers):
    np.testing.assert_allclose(a.rgba, b.rgba, atol=0.5 * STEP + 1e-6)
  assert back.layers[-1].label == 'tasse à café'


def test_command_line_writes_every_format_of_every_sample(tmp_path, capsys):
  from layerjax.export.__main__ import main
  folders = [schema.write_folder(make_sample(seed=i), tmp_path / f's{i}') for i in (0, 1)]
  out = tmp_path / 'files'
  assert main([*map(str, folders), '--format', 'psd,ora,pptx,zip,preview', '--out',
               str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == [
      f'synthetic-{i}.{ext}' for i in (0, 1)
      for ext in ('ora', 'pptx', 'preview.png', 'psd', 'zip')]
  np.testing.assert_allclose(ora.read_ora(out / 'synthetic-1.ora').image,
                             make_sample(seed=1).image, atol=4 * STEP)
  capsys.readouterr()
  # Nothing is written when one destination is taken, or a format is unknown.
  for f in out.iterdir():
    f.unlink()
  (out / 'synthetic-0.ora').write_bytes(b'mine')
  assert main([*map(str, folders), '--format', 'zip,ora', '--out', str(out)]) == 2
  assert 'synthetic-0.ora: exists' in capsys.readouterr().err
  assert [p.name for p in out.iterdir()] == ['synthetic-0.ora']
  assert (out / 'synthetic-0.ora').read_bytes() == b'mine'
  assert main([str(folders[0]), '--format', 'ora,gif', '--out', str(out)]) == 2
  assert 'expected some of' in capsys.readouterr().err
  assert main([str(tmp_path / 'nowhere'), '--format', 'ora', '--out', str(out)]) == 2


def test_pptx_pictures_placed_as_the_layers(tmp_path):
  """Read back with python-pptx: one picture per visible layer, in stacking order, named,
  at its box; Pillow compositing the pictures where they sit gives our composite."""
  from pptx import Presentation
  s = two_objects()
  h, w = s.size
  path = powerpoint.write_pptx(s, tmp_path / 's.pptx')
  prs = Presentation(str(path))
  emu = prs.slide_width // w
  assert (prs.slide_width, prs.slide_height) == (emu * w, emu * h)
  shapes = list(prs.slides[0].shapes)
  assert [p.name for p in shapes] == ['background', 'shadow_1', 'ball', 'tasse à café']
  canvas = Image.new('RGBA', (w, h))
  for shape, layer in zip(shapes, s.layers):
    x0, y0, x1, y1 = schema.alpha_bbox(layer.rgba[..., 3])
    assert (shape.left, shape.top, shape.width, shape.height) == \
        (emu * x0, emu * y0, emu * (x1 - x0), emu * (y1 - y0))
    with Image.open(io.BytesIO(shape.image.blob)) as im:
      assert im.size == (x1 - x0, y1 - y0)
      placed = Image.new('RGBA', (w, h))
      placed.paste(im.convert('RGBA'), (shape.left // emu, shape.top // emu))
    canvas = Image.alpha_composite(canvas, placed)
  ours = schema.composite(s.layers)[..., :3] * 255
  assert np.abs(np.asarray(canvas)[..., :3] - ours).max() <= 3
