"""The web app through its HTTP API (`gradio_client`), launched on a free local port on the
tiny packed model: every prompt kind and whole scene, an edit whose shadow follows, every
download opened with a reader independent of our writers (psd-tools, python-pptx, zipfile
and the OpenRaster / sample-folder layouts read by hand), bad input, and two users at once."""

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
gradio_client = pytest.importorskip('gradio_client')
from gradio_client import Client, handle_file  # noqa: E402

from layerjax.app.__main__ import build  # noqa: E402
from layerjax.infer.decomposer import Decomposer  # noqa: E402
from test_decompose import scene  # noqa: E402
from train_utils import free_port  # noqa: E402

H, W = 48, 80
DISC = (4, 8, 17, 21)  # scene(1)'s disc: centre (10, 14), radius 7
RGB_TOL = 2 / 255  # 8-bit files of layers that recompose to the photo to 1e-5
RESULT = ('gallery', 'recomposition', 'timings', 'files', 'layer', 'status')  # what a run shows


@pytest.fixture(scope='module')
def served(packed, tmp_path_factory):
  decomposer = Decomposer.load(packed)
  root = tmp_path_factory.mktemp('app')
  app = build(decomposer, root)
  app.queue(default_concurrency_limit=1)
  port = free_port()
  app.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True,
             allowed_paths=[str(root)])
  yield f'http://127.0.0.1:{port}/', decomposer
  app.close()


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  image, _ = scene(1, H, W)
  path = tmp_path_factory.mktemp('photos') / 'disc scene.png'
  Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
  return path, np.asarray(Image.open(path), np.float32) / 255


def client(url) -> Client:
  return Client(url, verbose=False)


def load(c: Client, path):
  return c.predict(handle_file(str(path)), api_name='/load_photo')


def decompose(c: Client, points='', box='', editor=None, text='', whole=False, max_layers=0):
  out = c.predict(points, box, editor, text, whole, max_layers, 1, 0, 0, 1,
                  api_name='/decompose')
  return dict(zip(RESULT, out))


def edit(c: Client, layer, dx=0, dy=0, scale=1, hue=0, saturation=1, brightness=1,
         remove=False):
  out = c.predict(layer, dx, dy, scale, hue, saturation, brightness, remove, api_name='/edit')
  return dict(zip(RESULT, out))


def undo(c: Client) -> dict:
  out = c.predict(api_name='/undo')
  return dict(zip(RESULT, out))


def expect_error(match: str, call, *args, **kwargs):
  with pytest.raises(gradio_client.exceptions.AppError, match=match):
    call(*args, **kwargs)


def by_suffix(files) -> dict:
  return {os.path.splitext(f)[1]: f for f in files}


def rgba(data) -> np.ndarray:
  return np.asarray(Image.open(data).convert('RGBA'), np.float32) / 255


def read_zip(path) -> tuple[dict, dict]:
  """The sample-folder ZIP read by hand: (manifest, {layer name: RGBA})."""
  with zipfile.ZipFile(path) as z:
    manifest = json.loads(z.read('manifest.json'))
    return manifest, {l['name']: rgba(z.open(l['file'])) for l in manifest['layers']}


def composite(layers) -> np.ndarray:
  """Straight-alpha 'over', back to front, in float64: the reference the files must match."""
  out = np.zeros(next(iter(layers)).shape[:2] + (3,))
  for x in layers:
    a = x[..., 3:].astype(np.float64)
    out = x[..., :3] * a + out * (1 - a)
  return out


def check_downloads(files, photo, names) -> dict:
  """Each of the four files read with its own reader: every layer in place, recomposing to
  `photo`. Returns the ZIP's {name: RGBA}."""
  files = by_suffix(files)
  assert sorted(files) == ['.ora', '.pptx', '.psd', '.zip']
  manifest, layers = read_zip(files['.zip'])
  assert [l['name'] for l in manifest['layers']] == names
  np.testing.assert_allclose(composite(layers.values()), photo, atol=RGB_TOL)
  # Names in the files (export/names.py): the label, else the name; a shadow's, its owner's
  # name in the file and ' shadow'.
  shown = {l['name']: l['label'] or l['name'] for l in manifest['layers']}
  in_files = sorted(f'{shown[l["owner"]]} shadow' if l['kind'] == 'shadow' else shown[l['name']]
                    for l in manifest['layers'])

  from psd_tools import PSDImage
  psd = PSDImage.open(files['.psd'])
  assert (psd.width, psd.height) == (photo.shape[1], photo.shape[0])
  assert sorted(l.name for l in psd.descendants() if not l.is_group()) == in_files
  np.testing.assert_allclose(np.asarray(psd.composite(force=True).convert('RGB'),
                                        np.float32) / 255, photo, atol=RGB_TOL)

  with zipfile.ZipFile(files['.ora']) as z:
    assert z.read('mimetype') == b'image/openraster'
    stack = ET.fromstring(z.read('stack.xml'))
    assert sorted(e.get('name') for e in stack.iter('layer')) == in_files
    np.testing.assert_allclose(rgba(z.open('mergedimage.png'))[..., :3], photo, atol=RGB_TOL)

  from pptx import Presentation
  shapes = Presentation(files['.pptx']).slides[0].shapes
  visible = [n for n in names if layers[n][..., 3].max() > 0]
  assert sorted(s.name for s in shapes if s.shape_type == 13) == sorted(shown[n] for n in visible)
  return layers


def names_of(result) -> list[str]:
  return [g['caption'].split(' ')[0] for g in result['gallery']]


def test_box_prompt_shows_the_layers_and_downloads_every_file(served, photo):
  url, _ = served
  path, image = photo
  c = client(url)
  canvas, editor, points, box, *_ = load(c, path)
  assert np.asarray(Image.open(canvas)).shape[:2] == (H, W)
  r = decompose(c, box=','.join(map(str, DISC)))
  names = names_of(r)
  assert names[0] == 'background' and 'object_1' in names
  assert r['layer']['value'] == 'object_1' and r['status'].startswith(f'{len(names)} layers')
  assert '| total |' in r['timings']
  np.testing.assert_allclose(rgba(r['recomposition'])[..., :3], image, atol=1 / 255)
  check_downloads(r['files'], image, names)
  assert all(os.path.basename(f).startswith('disc_scene.') for f in r['files'])


def test_points_mask_text_and_whole_scene(served, photo, tmp_path):
  url, _ = served
  path, image = photo
  c = client(url)
  load(c, path)
  painted = np.zeros((H, W, 4), np.uint8)
  painted[8:21, 4:17] = (255, 40, 40, 255)
  Image.fromarray(painted).save(tmp_path / 'stroke.png')
  editor = {'background': handle_file(str(path)), 'layers': [handle_file(str(tmp_path /
                                                                             'stroke.png'))],
            'composite': None, 'id': None}
  for kwargs, prompt in ((dict(points='10,14; 12,15'), {'points': [[10, 14], [12, 15]]}),
                         (dict(editor=editor), {'mask': True}),
                         (dict(text='the red disc', points='10,14'), {'text': 'the red disc'})):
    r = decompose(c, **kwargs)
    manifest, _ = read_zip(by_suffix(r['files'])['.zip'])
    given = manifest['prompts'][0]
    if 'points' in prompt:
      assert given['points'] == prompt['points']
    if 'mask' in prompt:  # the painted square, as the mask the model was given
      assert given['mask'] is not None
      with zipfile.ZipFile(by_suffix(r['files'])['.zip']) as z:
        mask = np.asarray(Image.open(z.open(given['mask']))) > 127
      expected = np.zeros((H, W), bool)
      expected[8:21, 4:17] = True
      np.testing.assert_array_equal(mask, expected)
    if 'text' in prompt:
      assert manifest['provenance']['prompt']['text'] == prompt['text']
    np.testing.assert_allclose(rgba(r['recomposition'])[..., :3], image, atol=1 / 255)
  r = decompose(c, box='0,0,5,5', whole=True, max_layers=3)  # the prompt is not used
  assert sum(n.startswith('object') for n in names_of(r)) == 1  # the offline detector's disc
  whole = read_zip(by_suffix(r['files'])['.zip'])[0]['provenance']['whole_scene']
  assert whole['max_layers'] == 3 and whole['objects'][0]['box'] != [0, 0, 5, 5]
  np.testing.assert_allclose(rgba(r['recomposition'])[..., :3], image, atol=1 / 255)


def test_an_edit_moves_the_object_with_its_shadow_undo_and_remove(served, photo):
  url, _ = served
  path, image = photo
  c = client(url)
  load(c, path)
  r = decompose(c, box=','.join(map(str, DISC)))
  before = read_zip(by_suffix(r['files'])['.zip'])[1]
  assert 'shadow_1' in before  # the tiny model's shadow: faint, but a layer of its own
  moved = edit(c, 'object_1', dx=9, dy=-3)
  assert moved['status'] == '1 edit(s).'
  assert all(os.path.basename(f).startswith('disc_scene-edited.') for f in moved['files'])
  after = read_zip(by_suffix(moved['files'])['.zip'])[1]
  for name in ('object_1', 'shadow_1'):  # new[y, x] = old[y + 3, x - 9]; what comes in is empty
    a0, a1 = before[name][..., 3], after[name][..., 3]
    np.testing.assert_allclose(a1[:H - 3, 9:], a0[3:, :W - 9], atol=1 / 255)
    assert a1[H - 3:].max() == 0 and a1[:, :9].max() == 0
  np.testing.assert_allclose(after['background'], before['background'])
  undone = undo(c)
  np.testing.assert_allclose(read_zip(by_suffix(undone['files'])['.zip'])[1]['object_1'],
                             before['object_1'])
  expect_error('undo: no edit to take back', undo, c)
  # Hue turned by 120 degrees: HSV's hue wheel maps (r, g, b) to (b, r, g); alpha unchanged.
  turned = read_zip(by_suffix(edit(c, 'object_1', hue=120)['files'])['.zip'])[1]['object_1']
  seen = before['object_1'][..., 3] > 0.05  # 8-bit colour of fainter pixels says little
  np.testing.assert_array_equal(turned[..., 3], before['object_1'][..., 3])
  np.testing.assert_allclose(turned[seen][:, :3], np.roll(before['object_1'][seen][:, :3], 1, -1),
                             atol=2 / 255)
  undo(c)
  removed = edit(c, 'object_1', remove=True)
  assert names_of(removed) == ['background'] and removed['layer']['choices'] == []
  check_downloads(removed['files'], before['background'][..., :3], ['background'])
  with pytest.raises(gradio_client.exceptions.AppError, match="'object_1' has been removed"):
    edit(c, 'object_1', dx=1)


def test_bad_input_gets_one_clear_message_and_the_app_goes_on(served, photo, tmp_path,
                                                               monkeypatch):
  url, decomposer = served
  path, image = photo
  c = client(url)
  expect_error('upload a photo or pick an example first', decompose, c, box='1,1,9,9')
  expect_error('decompose a photo first', edit, c, 'object_1', dx=1)
  (tmp_path / 'notes.png').write_text('not an image')
  expect_error('notes.png', load, c, tmp_path / 'notes.png')
  monkeypatch.setattr(decomposer, 'max_pixels', H * W - 1)
  expect_error(rf'{W}x{H} is .* above the limit', load, c, path)
  monkeypatch.undo()
  load(c, path)
  expect_error(r'prompt box \(10, 10, 10, 20\) has zero area', decompose, c, box='10,10,10,20')
  expect_error(rf'prompt box \(0, 0, 90, 20\) is outside the {W}x{H} image', decompose, c,
               box='0,0,90,20')
  expect_error(r'prompt point \(5, 60\) is outside', decompose, c, points='5,60')
  expect_error(r"prompt points \(separated by ;\): expected x,y \(pixels\), got '5'", decompose,
               c, points='5')
  expect_error('prompt: empty', decompose, c)
  boxes_only = dataclasses.replace(decomposer.settings, kinds=frozenset({'box'}))
  monkeypatch.setattr(decomposer, 'settings', boxes_only)
  expect_error(r"prompt text: .*prompt kinds \['box'\]", decompose, c, box='1,1,9,9',
               text='the disc')
  monkeypatch.undo()
  r = decompose(c, box=','.join(map(str, DISC)))  # and the app goes on, for this user too
  expect_error(r"no object named or labelled 'cat' \(objects: object_1", edit, c, 'cat')
  expect_error("edit of 'object_1': nothing to change", edit, c, 'object_1')
  expect_error("layer 'background' is the background: edits name an object", edit, c,
               'background', dx=1)
  np.testing.assert_allclose(rgba(r['recomposition'])[..., :3], image, atol=1 / 255)
  # A refused photo leaves the tab's decomposition as it was: still there to edit.
  (tmp_path / 'big.png').write_bytes(path.read_bytes())
  monkeypatch.setattr(decomposer, 'max_pixels', H * W - 1)
  expect_error('big.png', load, c, tmp_path / 'big.png')
  monkeypatch.undo()
  assert edit(c, 'object_1', dx=1)['status'] == '1 edit(s).'


def test_two_users_at_once_each_see_only_their_own(served, photo, tmp_path):
  url, _ = served
  path, image = photo
  other = np.asarray(Image.open(path))[:, ::-1][:40]  # another photo, another size
  Image.fromarray(other).save(tmp_path / 'other.png')
  a, b = client(url), client(url)
  load(a, path)
  load(b, tmp_path / 'other.png')
  # Both at once: the queue runs one at a time, each gets its own photo's layers.
  jobs = [a.submit('', ','.join(map(str, DISC)), None, '', False, 0, 1, 0, 0, 1,
                   api_name='/decompose'),
          b.submit('', f'{W - 17},8,{W - 4},21', None, '', False, 0, 1, 0, 0, 1,
                   api_name='/decompose')]
  ra, rb = (dict(zip(RESULT, j.result(timeout=300))) for j in jobs)
  np.testing.assert_allclose(rgba(ra['recomposition'])[..., :3], image, atol=1 / 255)
  np.testing.assert_allclose(rgba(rb['recomposition'])[..., :3], other / 255, atol=1 / 255)
  assert {os.path.basename(f).split('.')[0] for f in rb['files']} == {'other'}
  assert not {os.path.dirname(f) for f in ra['files']} & {os.path.dirname(f) for f in rb['files']}
  removed = edit(b, 'object_1', remove=True)  # b's edit is b's alone
  assert names_of(removed) == ['background']
  moved = edit(a, 'object_1', dx=2)
  assert moved['status'] == '1 edit(s).' and 'object_1' in names_of(moved)


def test_example_photos_and_a_bad_model_path(tmp_path, capsys):
  from layerjax.app.__main__ import main, write_examples
  paths = write_examples(tmp_path)
  assert [p.name for p in paths] == ['astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.png']
  assert Image.open(paths[0]).size == (512, 512)  # scikit-image's astronaut
  with pytest.raises(SystemExit) as e:
    main(['--model', str(tmp_path / 'nowhere'), '--no-examples'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'nowhere' in err[0], err
