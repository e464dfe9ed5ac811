"""Re-runs do what they say (issue 15, item 6): outputs record a fingerprint of their inputs
and config, and a re-run redoes exactly what changed. A catalogue:

  build-tfds     new samples rebuild the dataset; nothing new changes nothing; a dataset of
                 other samples is replaced only with --overwrite
  engine         drops caused by a config mistake are redone once the config changes; a
                 photo that changed is redone and its old sample removed; the runner's
                 settings change nothing
  importers      the same input and options change nothing; other options redo the samples
  training       a held workdir is refused (a finished run re-run changing nothing:
                 test_train.py's test_loss_falls)
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_engine import config as engine_config
from data_engine import jobs, runners
from data_engine.__main__ import main as engine_main
from layerjax.data import schema
from layerjax.data.importers.__main__ import main as import_main
from layerjax.data.tfds_builder import build
from layerjax.fileio import OutputLocked
from layerjax.train import trainer
from test_importer_crello import RED, element, solid, template, write
from test_outputs import HOLDER, tree
from test_schema import make_sample
from train_utils import make_dataset, tiny


def stats(root):
  """{relative path: (size, mtime_ns)} of every file under `root`: what 'changes nothing'
  means."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob('*')) if p.is_file()}


# --- build-tfds -------------------------------------------------------------------------------

def test_build_rebuilds_after_new_samples_and_not_otherwise(tmp_path):
  import tensorflow_datasets as tfds
  for seed in range(2):
    schema.write_folder(make_sample(seed=seed), tmp_path / 'src' / f's{seed}')
  folders = lambda: sorted((tmp_path / 'src').iterdir())
  first = build({'train': folders()}, tmp_path / 'tfds')
  assert first['splits'] == {'train': 2} and not first['up_to_date']
  before = stats(tmp_path / 'tfds')
  again = build({'train': folders()}, tmp_path / 'tfds')
  assert again['up_to_date'] and stats(tmp_path / 'tfds') == before

  schema.write_folder(make_sample(seed=2), tmp_path / 'src' / 's2')
  third = build({'train': folders()}, tmp_path / 'tfds')
  assert third['splits'] == {'train': 3} and not third['up_to_date']
  assert len(tfds.data_source('layered', data_dir=tmp_path / 'tfds')['train']) == 3
  # a sample rewritten in place (same name, new content) also rebuilds
  schema.write_folder(make_sample(seed=7), tmp_path / 'src' / 's2', overwrite=True)
  assert not build({'train': folders()}, tmp_path / 'tfds')['up_to_date']
  assert not build({'train': folders()}, tmp_path / 'tfds', on_error='skip')['up_to_date']


def test_build_replaces_a_dataset_of_other_samples_only_with_overwrite(tmp_path, capsys):
  for name in ('a', 'b'):
    schema.write_folder(make_sample(seed=ord(name)), tmp_path / name / 'samples' / 's')
  assert engine_main(['build-tfds', str(tmp_path / 'a'), '--data-dir',
                      str(tmp_path / 'tfds')]) == 0
  before = stats(tmp_path / 'tfds')
  capsys.readouterr()
  assert engine_main(['build-tfds', str(tmp_path / 'b'), '--data-dir',
                      str(tmp_path / 'tfds')]) == 2
  assert re.fullmatch(r'error: .*tfds/layered/1.0.0: holds a dataset built from .*a/samples, '
                      r'not from .*b/samples; pass --overwrite to replace it\n',
                      capsys.readouterr().err)
  assert stats(tmp_path / 'tfds') == before
  assert engine_main(['build-tfds', str(tmp_path / 'b'), '--data-dir', str(tmp_path / 'tfds'),
                      '--overwrite']) == 0
  assert stats(tmp_path / 'tfds') != before


def test_build_that_fails_keeps_the_old_dataset(tmp_path):
  schema.write_folder(make_sample(seed=0), tmp_path / 'src' / 's0')
  build({'train': [tmp_path / 'src' / 's0']}, tmp_path / 'tfds')
  before = tree(tmp_path / 'tfds')
  bad = tmp_path / 'src' / 's1'
  bad.mkdir()
  (bad / 'manifest.json').write_text('{')
  with pytest.raises(schema.SampleError, match='s1/manifest.json: not valid JSON'):
    build({'train': [tmp_path / 'src' / 's0', bad]}, tmp_path / 'tfds')
  assert tree(tmp_path / 'tfds') == before
  assert sorted(p.name for p in (tmp_path / 'tfds' / 'layered').iterdir()) == ['1.0.0']


# --- the engine -------------------------------------------------------------------------------

def photo(path, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:120, 0:130]
  img = 0.5 + 0.1 * rng.standard_normal((120, 130, 3))
  img[np.hypot(xx - 65, yy - 60) < 30] = rng.uniform(0.1, 0.9, 3)
  Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def test_engine_redoes_drops_once_the_config_changes_and_changed_photos(tmp_path):
  (tmp_path / 'in').mkdir()
  for i in range(2):
    photo(tmp_path / 'in' / f'p{i}.png', i)
  out = tmp_path / 'out'
  common = ['decompose', '--input', str(tmp_path / 'in'), '--output', str(out), '--quiet',
            '--set', 'decompose.min_side=64', '--set', 'decompose.shadows=False']
  mistake = ['--set', 'decompose.min_sharpness=1e9']   # every photo is "blurry"
  assert engine_main(common + mistake) == 0
  outcome = lambda: {os.path.basename(k): e['dropped'] for k, e in runners.finished(out).items()}
  assert outcome() == {'p0.png': 'prefilter: blurry', 'p1.png': 'prefilter: blurry'}
  lines = (out / runners.MANIFEST).read_text().splitlines()
  assert engine_main(common + mistake + ['--set', 'runner.workers=0']) == 0  # same config
  assert (out / runners.MANIFEST).read_text().splitlines() == lines

  assert engine_main(common) == 0   # the mistake fixed: both redone
  assert outcome() == {'p0.png': None, 'p1.png': None}
  samples = {os.path.basename(k): e['samples'] for k, e in runners.finished(out).items()}
  lines = (out / runners.MANIFEST).read_text().splitlines()
  assert engine_main(common) == 0
  assert (out / runners.MANIFEST).read_text().splitlines() == lines

  photo(tmp_path / 'in' / 'p1.png', 5)   # a new photo under the same name
  os.utime(tmp_path / 'in' / 'p1.png', ns=(1, 1))
  assert engine_main(common) == 0
  new = runners.finished(out)
  assert len((out / runners.MANIFEST).read_text().splitlines()) == len(lines) + 1
  redone = next(e for k, e in new.items() if k.endswith('p1.png'))
  assert redone['samples'] == samples['p1.png']   # same id: the folder now holds the new one
  sample = schema.read_folder(schema.sample_folder(out / 'samples', redone['samples'][0]))
  np.testing.assert_allclose(sample.image, np.asarray(Image.open(tmp_path / 'in' / 'p1.png'),
                                                       np.float32) / 255, atol=1 / 255)


def test_a_redone_input_that_now_drops_leaves_no_sample_behind(tmp_path):
  (tmp_path / 'in').mkdir()
  photo(tmp_path / 'in' / 'p.png', 0)
  out = tmp_path / 'out'
  common = ['decompose', '--input', str(tmp_path / 'in'), '--output', str(out), '--quiet',
            '--set', 'decompose.min_side=64', '--set', 'decompose.shadows=False']
  assert engine_main(common) == 0
  assert len(list((out / 'samples').iterdir())) == 1
  assert engine_main(common + ['--set', 'decompose.min_side=500']) == 0
  assert list((out / 'samples').iterdir()) == []
  assert runners.summary(out)['samples'] == 0


def test_synthesis_fingerprint_follows_the_bank_and_config_not_the_runner(tmp_path):
  (tmp_path / 'bank' / 'backgrounds').mkdir(parents=True)
  (tmp_path / 'bank' / 'backgrounds' / 'a.png').write_bytes(b'1')
  config = engine_config.load(None)
  fp = jobs.synthesize_fingerprint(config, tmp_path / 'bank')('00000001')
  workers = engine_config.load(None, ['runner.workers=3'])
  assert jobs.synthesize_fingerprint(workers, tmp_path / 'bank')('00000001') == fp
  seed = engine_config.load(None, ['seed=1'])
  assert jobs.synthesize_fingerprint(seed, tmp_path / 'bank')('00000001') != fp
  (tmp_path / 'bank' / 'backgrounds' / 'b.png').write_bytes(b'2')
  assert jobs.synthesize_fingerprint(config, tmp_path / 'bank')('00000001') != fp


# --- importers --------------------------------------------------------------------------------

def test_importer_redoes_samples_imported_with_other_options(tmp_path, capsys):
  src = write(tmp_path / 'c.parquet', [template('t', (40, 20), element(
      'ImageElement', 2, 2, 12, 8, solid(RED, 3, 2)))])
  out = tmp_path / 'out'
  assert import_main(['crello', str(src), '--output', str(out)]) == 0
  assert import_main(['crello', str(src), '--output', str(out)]) == 0
  assert '0 written, 1 already there' in capsys.readouterr().out
  assert import_main(['crello', str(src), '--output', str(out), '--max-size', '20']) == 0
  assert '1 written, 0 already there' in capsys.readouterr().out
  assert schema.read_folder(out / 'crello-t').size == (10, 20)


# --- training ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('rerun_data'), n=4)


def test_training_into_a_held_workdir_is_refused_before_any_work(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(OutputLocked, match=f"in use by another run \\('the first run', pid "
                                           f'{proc.pid}'):
      trainer.train(tiny(data_dir, total_steps=2), workdir)
    assert [p.name for p in workdir.iterdir()] == ['.lock']
  finally:
    proc.kill()
    proc.wait()
