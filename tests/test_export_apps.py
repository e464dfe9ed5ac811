"""Our layer files through the real applications, and the readers where those drop our metadata.

The application tests (slow; skipped, with the reason, where GIMP or Krita is not installed)
write a known sample as PSD and ORA, have GIMP 2.10 (PSD only: Debian's GIMP has no ORA
plug-in) or Krita 5.1 open it, move the layer 'mug' by (+5, +3) and save it in the same
format, and read the result with `read_psd` / `read_ora`. What each keeps, as found:
  GIMP PSD   names (Unicode), order, offsets, pixels; drops the XMP (our record)
  Krita PSD  names (with a trailing NUL), order, offsets, pixels and the XMP
  Krita ORA  names, order, offsets, pixels; drops the `urn:layerjax` attributes
The other tests build metadata-less files directly and run everywhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import Tag
from psd_tools.psd import PSD

from layerjax.data import schema
from layerjax.export.names import identify
from layerjax.export.ora import OraError, read_ora, write_ora
from layerjax.export.psd import read_psd, write_psd
from test_export_psd import BOXES, H, W, _close, make_sample

MOVE = (5, 3)  # (dx, dy) the application moves the layer labelled 'mug' by
# What the readers give (name, kind, owner, label) for make_sample's file without our record.
TOLD = [('background', 'background', None, 'background'), ('mug shadow', 'shadow', 'mug', ''),
        ('mug', 'object', None, 'mug'), ('mug 2', 'object', None, 'mug 2'),
        ('tasse à café', 'object', None, 'tasse à café')]

# Krita's own Python (kritarunner -s MODULE -f FUNCTION ARGS: the function gets ARGS as one
# list): open, move a layer, export.
KRITA_SCRIPT = '''
from krita import InfoObject, Krita


def move(args):
  src, dst, name, dx, dy = args
  doc = Krita.instance().openDocument(src)
  node = doc.nodeByName(name)
  node.move(node.position().x() + int(dx), node.position().y() + int(dy))
  doc.refreshProjection()
  doc.setBatchmode(True)
  if not doc.exportImage(dst, InfoObject()):
    raise SystemExit(f'krita could not export {dst}')
  doc.close()
'''


def _need(*programs: str) -> None:
  missing = [p for p in programs if shutil.which(p) is None]
  if missing:
    pytest.skip(f'{" and ".join(missing)} not installed (apt-get install -y gimp krita xvfb)')


@pytest.fixture(scope='module')
def app_home(tmp_path_factory):
  """A home of their own for the applications' profiles, so a run leaves the user's alone."""
  home = tmp_path_factory.mktemp('home')
  return {**os.environ, 'HOME': str(home), 'XDG_CONFIG_HOME': str(home / 'config'),
          'XDG_DATA_HOME': str(home / 'data'), 'XDG_CACHE_HOME': str(home / 'cache')}


def _run(cmd: list[str], env: dict, dst) -> None:
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  failed = 'execution error' in out.stdout + out.stderr  # GIMP's batch mode exits 0 anyway
  assert out.returncode == 0 and not failed and dst.exists(), \
      f'{cmd[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}'


def gimp_move(src, dst, env) -> None:
  s = lambda p: json.dumps(str(p), ensure_ascii=False)  # a Scheme string
  script = (f'(let* ((img (car (gimp-file-load RUN-NONINTERACTIVE {s(src)} {s(src)})))'
            f' (layer (car (gimp-image-get-layer-by-name img "mug"))))'
            f' (gimp-layer-translate layer {MOVE[0]} {MOVE[1]})'
            f' (gimp-file-save RUN-NONINTERACTIVE img (car (gimp-image-get-active-drawable img))'
            f' {s(dst)} {s(dst)}))')
  _run(['gimp', '-i', '-d', '-f', '-b', script, '-b', '(gimp-quit 0)'], env, dst)


def krita_move(src, dst, env) -> None:
  (src.parent / 'krita_move.py').write_text(KRITA_SCRIPT)
  _run(['xvfb-run', '-a', 'kritarunner', '-s', 'krita_move', '-f', 'move', str(src), str(dst),
        'mug', *map(str, MOVE)], {**env, 'PYTHONPATH': str(src.parent)}, dst)


def _moved(rgba: np.ndarray) -> np.ndarray:
  """`rgba` moved by MOVE on the canvas (make_sample's 'mug' stays inside it)."""
  out = np.zeros_like(rgba)
  dx, dy = MOVE
  out[dy:, dx:] = rgba[:H - dy, :W - dx]
  return out


@pytest.mark.slow
@pytest.mark.parametrize('app, fmt, keeps_record', [
    ('gimp', 'psd', False), ('krita', 'psd', True), ('krita', 'ora', False)])
def test_an_application_opens_moves_a_layer_and_saves_and_we_read_it_back(
    tmp_path, app_home, app, fmt, keeps_record):
  _need(*{'gimp': ['gimp'], 'krita': ['kritarunner', 'xvfb-run']}[app])
  sample = make_sample()
  write, read = {'psd': (write_psd, read_psd), 'ora': (write_ora, read_ora)}[fmt]
  src, dst = tmp_path / f'ours.{fmt}', tmp_path / f'{app}.{fmt}'
  write(sample, src)
  {'gimp': gimp_move, 'krita': krita_move}[app](src, dst, app_home)
  back = read(dst)

  fields = lambda s: [(x.name, x.kind, x.owner, x.label) for x in s.layers]
  assert fields(back) == (fields(sample) if keeps_record else TOLD)
  texts = [(x.caption, x.referring) for x in sample.layers] if keeps_record else [('', ())] * 5
  assert [(x.caption, x.referring) for x in back.layers] == texts
  x0, y0, x1, y1 = BOXES['object_1']
  dx, dy = MOVE
  boxes = [(0, 0, W, H), BOXES['shadow_1'], (x0 + dx, y0 + dy, x1 + dx, y1 + dy),
           BOXES['object_2'], BOXES['object_3']]
  assert [x.bbox for x in back.layers] == boxes
  expected = [x.rgba if x.name != 'object_1' else _moved(x.rgba) for x in sample.layers]
  for ours, theirs in zip(expected, back.layers):
    _close(theirs.rgba, ours)
  # The application's own merged image against our composite of the moved layers: both round
  # each layer to 8 bits, the application composites in 8 bits too.
  if fmt == 'psd':
    merged = np.asarray(PSDImage.open(dst).topil().convert('RGB'), np.float32)
  else:
    with zipfile.ZipFile(dst) as z:
      merged = np.asarray(Image.open(io.BytesIO(z.read('mergedimage.png'))).convert('RGB'),
                          np.float32)
  ours = schema.composite(expected)[..., :3] * 255
  assert np.abs(merged - ours).max() <= 3


def test_psd_layer_names_are_written_in_unicode_too(tmp_path):
  """GIMP reads a layer's Unicode name block, or else takes the legacy name as UTF-8 (which
  it is not): without the block, 'tasse à café' came back as 'tasse  (invalid UTF-8 string)'."""
  record = PSD.read(open(write_psd(make_sample(), tmp_path / 's.psd'), 'rb'))
  layers = record.layer_and_mask_information.layer_info.layer_records
  assert [x.tagged_blocks.get_data(Tag.UNICODE_LAYER_NAME) for x in layers] == \
      [name for name, *_ in TOLD]


def test_names_ending_in_nul_still_match_the_record(tmp_path):
  """Krita keeps our XMP but ends each Unicode name it writes with a NUL."""
  sample = make_sample()
  psd = PSDImage.open(write_psd(sample, tmp_path / 's.psd'))
  for layer in psd:
    layer.name = layer.name + '\x00'
  psd.save(tmp_path / 'nul.psd')
  back = read_psd(tmp_path / 'nul.psd')
  assert [(x.name, x.kind, x.owner, x.label) for x in back.layers] == \
      [(x.name, x.kind, x.owner, x.label) for x in sample.layers]


def _stack_without_record() -> tuple[list[str], list[np.ndarray]]:
  """Names (bottom first) and 8-bit pixels of a file an editor saved without our record: a
  shadow named after an object, a shadow whose object is gone, and two objects named 'cup',
  the shadow right under the lower one."""
  names = ['paper', 'cup shadow', 'cup', 'lamp shadow', 'cup']
  pixels = [np.full((4, 6, 4), 255, np.uint8)] + [
      np.full((1, 2, 4), (0, 0, 0, 100) if 'shadow' in n else (200, 30, 30, 255), np.uint8)
      for n in names[1:]]
  return names, pixels


TOLD_STACK = [('paper', 'background', None, 'paper'), ('cup shadow', 'shadow', 'cup', ''),
              ('cup', 'object', None, 'cup'), ('lamp shadow', 'object', None, 'lamp shadow'),
              ('cup 2', 'object', None, 'cup')]


def test_a_psd_without_our_record_is_told_by_names_and_order(tmp_path):
  names, pixels = _stack_without_record()
  psd = PSDImage.new('RGBA', (6, 4))
  for i, (name, px) in enumerate(zip(names, pixels)):
    psd.append(PixelLayer.fromarray(px, psd, name=name, top=i % 3, left=i))
  psd.save(tmp_path / 'bare.psd')
  back = read_psd(tmp_path / 'bare.psd')
  assert [(x.name, x.kind, x.owner, x.label) for x in back.layers] == TOLD_STACK
  assert [x.bbox for x in back.layers[1:]] == [(i, i % 3, i + 2, i % 3 + 1) for i in range(1, 5)]


def test_an_ora_without_our_attributes_is_told_by_names_and_order(tmp_path):
  names, pixels = _stack_without_record()
  path = tmp_path / 'bare.ora'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('mimetype', 'image/openraster')
    entries = ''.join(f'<layer name="{n}" src="data/{i}.png" x="{i}" y="{i % 3}"/>'
                      for i, n in reversed(list(enumerate(names))))
    z.writestr('stack.xml', f'<image w="6" h="4"><stack>{entries}</stack></image>')
    for i, px in enumerate(pixels):
      buf = io.BytesIO()
      Image.fromarray(px, 'RGBA').save(buf, format='PNG')
      z.writestr(f'data/{i}.png', buf.getvalue())
  back = read_ora(path)
  assert [(x.name, x.kind, x.owner, x.label) for x in back.layers] == TOLD_STACK
  assert [x.bbox for x in back.layers[1:]] == [(i, i % 3, i + 2, i % 3 + 1) for i in range(1, 5)]


def test_an_ora_without_attributes_and_no_opaque_bottom_fails_naming_file_and_layer(tmp_path):
  path = tmp_path / 'a.ora'
  write_ora(make_sample(), path)
  with zipfile.ZipFile(path) as z:
    files = {n: z.read(n) for n in z.namelist()}
  # Drop our attributes and the background entry, as an editor deleting that layer would.
  stack = files['stack.xml'].decode()
  stack = stack.replace(stack[stack.index('<layer name="background"'):stack.index('</stack>')],
                        '')
  files['stack.xml'] = stack.replace('urn:layerjax', 'urn:other').encode()
  with zipfile.ZipFile(tmp_path / 'b.ora', 'w') as z:
    for n, data in files.items():
      z.writestr(n, data)
  with pytest.raises(OraError, match=r"b\.ora: the bottom layer 'mug shadow' does not cover"):
    read_ora(tmp_path / 'b.ora')


def test_identify_keeps_recorded_layers_and_tells_the_rest():
  recorded = [{'name': 'bg', 'kind': 'background', 'label': ''},
              {'name': 'object_1', 'kind': 'object', 'label': 'mug', 'caption': 'a mug',
               'referring': ['the mug']},
              None,  # 'mug shadow': no object is *named* 'mug' in the file, so an object
              None,  # 'x shadow 2': objects named 'x' 2 below and 2 above; the upper wins
              {'name': 'shadow_9', 'kind': 'shadow', 'owner': 'gone', 'label': ''},
              None,  # 'x'
              None,  # 'object_1' as a file name: its schema name is taken, so 'object_1 2'
              {'name': 'shadow_1', 'kind': 'shadow', 'owner': 'object_1', 'label': ''}]
  got = identify(['mug shadow', 'x', 'mug shadow', 'x shadow 2', 's9', 'x', 'object_1', 's1'],
                 recorded)
  assert [(f['name'], f['kind'], f['owner'], f['label']) for f in got] == [
      ('bg', 'background', None, ''), ('object_1', 'object', None, 'mug'),
      ('mug shadow', 'object', None, 'mug shadow'), ('x shadow 2', 'shadow', 'x', ''),
      ('shadow_9', 'object', None, ''), ('x', 'object', None, 'x'),
      ('object_1 2', 'object', None, 'object_1'), ('shadow_1', 'shadow', 'object_1', '')]
  assert (got[1]['caption'], got[1]['referring']) == ('a mug', ('the mug',))
