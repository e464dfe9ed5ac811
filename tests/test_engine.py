"""The engine end to end: real photos decomposed offline (quality numbers), injected tool
faults, synthesis from the decomposed bank, Beam against local, and the TFDS build."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from data_engine import runners, stages
from data_engine import config as engine_config
from data_engine.__main__ import main
from data_engine.core import register
from layerjax.data import schema
from layerjax.data.tfds_builder import from_example
from test_engine_tools import REFERENCE

SIDE = 256  # REFERENCE boxes are at 256 px on the longer side


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp('photos')
  for name in REFERENCE:
    Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(root / f'{name}.png')
  return root


@pytest.fixture(scope='module')
def decomposed(photos, tmp_path_factory):
  out = tmp_path_factory.mktemp('decomposed')
  assert main(['decompose', '--input', str(photos), '--output', str(out), '--quiet',
               '--set', f'decompose.max_side={SIDE}']) == 0
  return out


def loaded_photo(path: Path) -> np.ndarray:
  """The photo as the engine saw it (same loading and resizing)."""
  item = stages.Photo('x', path.name, str(path))
  stages.load(item, stages.Context(engine_config.load(None, [f'decompose.max_side={SIDE}'])))
  return item.image


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_real_photo_decomposition_quality(photos, decomposed, name):
  entry = next(e for k, e in runners.finished(decomposed).items() if Path(k).stem == name)
  assert entry['dropped'] is None, entry['record'][-1]
  sample = schema.read_folder(decomposed / 'samples' / entry['samples'][0])
  photo = loaded_photo(photos / f'{name}.png')
  # Preservation: the layers recompose the photo (8-bit storage included).
  psnr = 10 * np.log10(1 / np.mean((schema.composite(sample.layers)[..., :3] - photo) ** 2))
  assert psnr >= 35, psnr
  # The alphas cover the main object, and the background no longer shows it there.
  alpha = np.max([l.rgba[..., 3] for l in sample.layers if l.kind == 'object'], axis=0)
  x0, y0, x1, y1 = REFERENCE[name]
  assert (alpha[y0:y1, x0:x1] > 0.5).mean() >= 0.6
  region = np.zeros(alpha.shape, bool)
  region[y0:y1, x0:x1] = True
  region &= alpha > 0.5
  changed = np.abs(sample.layers[0].rgba[..., :3] - photo)[region].mean()
  assert changed >= 0.05, changed
  assert sample.provenance['engine_scores']['psnr'] >= 35
  assert all(d['passed'] for d in entry['record'])


def test_summary_and_manifest(decomposed):
  summary = json.loads((decomposed / runners.SUMMARY).read_text())
  assert summary['inputs'] == len(REFERENCE)
  assert summary['samples'] + summary['dropped'] == len(REFERENCE)
  assert list(summary['stages'])[:3] == ['load', 'prefilter', 'understand']


# --- injected faults ------------------------------------------------------------------------

@register('inpainter', 'faulty')
class Faulty:
  """Misbehaves by photo width: raises, hangs, returns garbage, or edits outside the mask."""

  def __init__(self, behaviour):
    self.behaviour = {int(k): v for k, v in behaviour.items()}

  def __call__(self, image, mask):
    act = self.behaviour.get(image.shape[1], 'ok')
    if act == 'raise':
      raise RuntimeError('model server went away')
    if act == 'hang':
      time.sleep(60)
    if act == 'garbage':
      return np.full_like(image, np.nan)
    if act == 'outside':
      return np.zeros_like(image)
    out = image.copy()
    out[mask] = image[~mask].mean(0)
    return out


def disc_photo(width: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  h = 120
  yy, xx = np.mgrid[0:h, 0:width]
  img = 0.5 + 0.1 * rng.standard_normal((h, width, 3))
  disc = np.hypot(xx - width / 2, yy - h / 2) < 30
  img[disc] = rng.uniform(0.1, 0.9, 3)
  return np.clip(img, 0, 1)


def test_faulty_tools_drop_their_photo_with_the_reason_and_the_run_goes_on(tmp_path):
  behaviour = {130: 'raise', 140: 'hang', 150: 'garbage', 160: 'outside'}
  for i, w in enumerate([130, 140, 150, 160, 170]):
    Image.fromarray(np.round(disc_photo(w, i) * 255).astype(np.uint8)).save(
        tmp_path / f'p{w}.png')
  # Every tool call is timed: at 1 s the first photo's understanding ran past it with
  # `make test`'s two processes on 2 cores.
  args = ['decompose', '--input', str(tmp_path), '--output', str(tmp_path / 'out'), '--quiet',
          '--set', f"tools.inpainter={{'name': 'faulty', 'behaviour': {behaviour}}}",
          '--set', 'tool_timeout=10.0', '--set', 'decompose.shadows=False',
          '--set', 'decompose.min_side=64']
  assert main(args) == 0
  outcome = {Path(k).stem: e['dropped'] for k, e in runners.finished(tmp_path / 'out').items()}
  assert outcome == {'p130': 'complete: tool_error', 'p140': 'complete: tool_timeout',
                     'p150': 'complete: tool_garbage', 'p160': 'complete: tool_garbage',
                     'p170': None}
  record = {Path(k).stem: e['record'] for k, e in runners.finished(tmp_path / 'out').items()}
  assert 'model server went away' in record['p130'][-1]['details']['detail']
  summary = json.loads((tmp_path / 'out' / runners.SUMMARY).read_text())
  assert summary['drop_reasons'] == {'complete: tool_garbage': 2, 'complete: tool_error': 1,
                                     'complete: tool_timeout': 1}
  lines = (tmp_path / 'out' / runners.MANIFEST).read_text().splitlines()
  assert main(args) == 0  # a re-run finds everything done: nothing redone, nothing duplicated
  assert (tmp_path / 'out' / runners.MANIFEST).read_text().splitlines() == lines
  assert len(list((tmp_path / 'out' / 'samples').iterdir())) == 1


def test_unreadable_and_tiny_photos_are_dropped(tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  Image.new('RGB', (40, 30), 'red').save(tmp_path / 'tiny.png')
  assert main(['decompose', '--input', str(tmp_path), '--output', str(tmp_path / 'out'),
               '--quiet']) == 0
  outcome = {Path(k).name: e['dropped'] for k, e in runners.finished(tmp_path / 'out').items()}
  assert outcome == {'broken.jpg': 'load: unreadable', 'tiny.png': 'prefilter: too_small'}


# --- synthesis, Beam, TFDS --------------------------------------------------------------------

def test_synthesis_from_the_decomposed_bank_beam_equals_local(photos, decomposed, tmp_path):
  bank = tmp_path / 'bank'
  (bank / 'backgrounds').mkdir(parents=True)
  for f in photos.iterdir():
    (bank / 'backgrounds' / f.name).write_bytes(f.read_bytes())
  (bank / 'samples').symlink_to(decomposed / 'samples')
  common = ['--bank', str(bank), '--num', '6', '--quiet', '--set', 'synthesize.size=(96, 128)']
  assert main(['synthesize', *common, '--output', str(tmp_path / 'local')]) == 0
  assert main(['synthesize', *common, '--output', str(tmp_path / 'beam'), '--runner',
               'beam']) == 0
  local = sorted((tmp_path / 'local' / 'samples').iterdir())
  assert len(local) == 6
  for folder in local:
    sample = schema.read_folder(folder)
    assert any(l.kind == 'object' and l.caption for l in sample.layers)
    checks = sample.provenance['engine']['text_checks']  # the agent's verdict per layer
    assert set(checks) == {l.name for l in sample.layers}
    for f in folder.rglob('*.png'):
      assert f.read_bytes() == (tmp_path / 'beam' / f.relative_to(tmp_path / 'local')
                                ).read_bytes()

  assert main(['build-tfds', str(tmp_path / 'local')]) == 0
  built = tfds.builder('layered', data_dir=tmp_path / 'local' / 'tfds')
  total = sum(len(tfds.data_source('layered', data_dir=tmp_path / 'local' / 'tfds')[split])
              for split in built.info.splits)
  assert total == 6
  record = tfds.data_source('layered', data_dir=tmp_path / 'local' / 'tfds')['train'][0]
  assert from_example(record).id.startswith('synth-')
