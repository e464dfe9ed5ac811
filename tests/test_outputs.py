"""Writes never destroy what they do not own, paths from files stay where they belong, and one
run at a time writes an output (issue 15, items 2, 3 and 6's locks). A catalogue:

  destinations   a non-empty folder that is not an artifact of the kind, the source itself,
                 a folder inside the source, an artifact of the kind without --overwrite
  permissions    folders follow the umask (not mkdtemp's 0700)
  debris         temporaries and half-swapped folders of killed writers
  ids            '../x', '/abs', 'a/b', '.', '..', '', '.hidden', '~', unicode, 300 characters
  manifests      files named by absolute paths, '..' or a link out of the sample folder
  importers      Crello ids and MuLAn names that would escape --output or nest folders
  engine         photos whose names start with '.' or hold spaces
  locks          a second run into an output held by a live run; a killed holder
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from data_engine import runners
from data_engine.__main__ import main as engine_main
from layerjax.convert import __main__ as convert_cli
from layerjax.data import schema
from layerjax.data.importers.__main__ import main as import_main
from layerjax.fileio import (Artifact, OutputError, OutputLocked, atomic_dir, inside,
                             output_lock, safe_name, sweep)
from test_importer_crello import RED, element, solid, template, write
from test_importer_mulan import make_annotation, make_photo, write_annotation, write_image
from test_schema import make_sample

THING = Artifact('thing folder', lambda p: (p / 'thing.txt').is_file())


def tree(root):
  """{relative path: bytes} of every file under `root`."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file()}


def write_thing(dst, text, overwrite=False):
  with atomic_dir(dst, THING, overwrite) as tmp:
    (tmp / 'thing.txt').write_text(text)


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


# --- destinations ---------------------------------------------------------------------------

def test_a_folder_of_another_kind_is_refused_untouched(tmp_path):
  (tmp_path / 'dst').mkdir()
  (tmp_path / 'dst' / 'notes.md').write_text('mine')
  with pytest.raises(OutputError, match=r'dst: exists and is not a thing folder \(it holds '
                                        r'notes.md\)'):
    write_thing(tmp_path / 'dst', 'x', overwrite=True)
  assert tree(tmp_path) == {'dst/notes.md': b'mine'}


def test_an_artifact_of_the_kind_is_replaced_only_when_asked(tmp_path):
  write_thing(tmp_path / 'dst', 'one')
  with pytest.raises(OutputError, match='a thing folder is already there; pass --overwrite'):
    write_thing(tmp_path / 'dst', 'two')
  assert tree(tmp_path) == {'dst/thing.txt': b'one'}
  write_thing(tmp_path / 'dst', 'two', overwrite=True)
  assert tree(tmp_path) == {'dst/thing.txt': b'two'}


def test_an_empty_folder_and_a_new_path_are_fine_a_file_in_the_way_is_not(tmp_path):
  (tmp_path / 'empty').mkdir()
  write_thing(tmp_path / 'empty', 'x')
  write_thing(tmp_path / 'new' / 'deeper', 'y')
  assert tree(tmp_path) == {'empty/thing.txt': b'x', 'new/deeper/thing.txt': b'y'}
  (tmp_path / 'file').write_text('f')
  with pytest.raises(OutputError, match='is a file, not a folder'):
    write_thing(tmp_path / 'file' / 'sub', 'z')
  with pytest.raises(OutputError, match='file: is a file, not a thing folder'):
    write_thing(tmp_path / 'file', 'z')


def test_folders_follow_the_umask(tmp_path):
  old = os.umask(0o002)
  try:
    write_thing(tmp_path / 'a', 'x')
    schema.write_folder(make_sample(), tmp_path / 'sample')
  finally:
    os.umask(old)
  assert (tmp_path / 'a').stat().st_mode & 0o777 == 0o775
  assert (tmp_path / 'sample').stat().st_mode & 0o777 == 0o775
  assert (tmp_path / 'sample' / 'layers').stat().st_mode & 0o777 == 0o775


@pytest.fixture(scope='module')
def diffusers_folder(tmp_path_factory):
  from conftest import randomize_
  from diffusers import SD3Transformer2DModel
  folder = tmp_path_factory.mktemp('sd3') / 'transformer'
  randomize_(SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
      pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8), seed=0).save_pretrained(
          folder)
  return folder


def test_converters_refuse_a_foreign_folder_the_source_and_a_folder_inside_it(
    tmp_path, diffusers_folder, capsys):
  ckpt = tmp_path / 'ckpt'
  assert convert_cli.main(['from-diffusers', str(diffusers_folder), str(ckpt)]) == 0
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'thesis.tex').write_text('years of work')
  (tmp_path / 'notes.txt').write_text('a file')
  capsys.readouterr()
  for argv in (['to-diffusers', str(ckpt), str(mine), '--overwrite'],
               ['to-diffusers', str(ckpt), str(tmp_path / 'notes.txt'), '--overwrite'],
               ['from-diffusers', str(diffusers_folder), str(tmp_path / 'notes.txt')],
               ['to-diffusers', str(ckpt), str(ckpt)],
               ['to-diffusers', str(ckpt), str(ckpt / 'inside')],
               ['from-diffusers', str(diffusers_folder), str(diffusers_folder)],
               ['from-diffusers', str(diffusers_folder), str(diffusers_folder.parent)]):
    before = tree(tmp_path), tree(diffusers_folder)
    assert convert_cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: '), err
    assert (tree(tmp_path), tree(diffusers_folder)) == before, argv


def test_converters_replace_their_own_kind_only_with_overwrite(tmp_path, diffusers_folder,
                                                                capsys):
  ckpt, out = tmp_path / 'ckpt', tmp_path / 'out'
  assert convert_cli.main(['from-diffusers', str(diffusers_folder), str(ckpt)]) == 0
  assert convert_cli.main(['to-diffusers', str(ckpt), str(out)]) == 0
  capsys.readouterr()
  before = tree(out)
  assert convert_cli.main(['to-diffusers', str(ckpt), str(out), '--dtype', 'bfloat16']) == 2
  assert 'a diffusers model folder is already there; pass --overwrite' in capsys.readouterr().err
  assert tree(out) == before
  assert convert_cli.main(['to-diffusers', str(ckpt), str(out), '--dtype', 'bfloat16',
                           '--overwrite']) == 0
  assert tree(out) != before
  assert convert_cli.main(['from-diffusers', str(diffusers_folder), str(ckpt)]) == 2
  assert 'a layerjax model checkpoint is already there' in capsys.readouterr().err


# --- debris of killed writers ---------------------------------------------------------------

def test_a_run_sweeps_what_killed_writers_left_and_restores_a_half_swapped_folder(tmp_path):
  from layerjax import fileio
  pid, host = dead_pid(), fileio._HOST
  (tmp_path / f'.a.tmp~{host}~{pid}~0001').mkdir()
  (tmp_path / f'.b.json.tmp~{host}~{pid}~0002').write_text('{')
  (tmp_path / f'.c.old~{host}~{pid}~0003').mkdir()      # swapped out, new one never arrived
  (tmp_path / f'.c.old~{host}~{pid}~0003' / 'thing.txt').write_text('c')
  (tmp_path / f'.d.tmp~{host}~{os.getpid()}~0004').mkdir()        # a live writer's
  (tmp_path / f'.e.tmp~other-host~{pid}~0005').mkdir()            # maybe alive elsewhere
  sweep(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f'.d.tmp~{host}~{os.getpid()}~0004', f'.e.tmp~other-host~{pid}~0005', 'c']
  assert (tmp_path / 'c' / 'thing.txt').read_text() == 'c'


def test_the_engine_sweeps_its_samples_folder(tmp_path):
  from layerjax import fileio
  debris = tmp_path / 'out' / 'samples' / f'.x.tmp~{fileio._HOST}~{dead_pid()}~00ff'
  debris.mkdir(parents=True)
  runners.run_local([], lambda: None, tmp_path / 'out', progress=False)
  assert not debris.exists()


# --- ids and paths from files ---------------------------------------------------------------

HOSTILE = ['../x', '/abs/path', 'a/b', '.', '..', '', '.hidden', '~', '-rf', 'x' * 300,
           'a~b', 'café', 'a b', 'C:\\windows', 'new\nline', '../../../etc/passwd']


def test_safe_name_is_one_plain_component_and_unique():
  names = [safe_name(i) for i in HOSTILE]
  assert len(set(names)) == len(HOSTILE)
  for i, name in zip(HOSTILE, names):
    assert '/' not in name and '\\' not in name and name not in ('', '.', '..'), i
    assert not name.startswith(('.', '-', '~')) and len(name) <= 100, i
    assert all(c.isascii() and (c.isalnum() or c in '._-~') for c in name), i
  assert safe_name('crello-5f3a') == 'crello-5f3a'   # plain ids are their own names
  assert safe_name('a_b') != safe_name('a b') != safe_name('a/b')


@pytest.mark.parametrize('rel', ['../outside.png', '/etc/passwd', 'layers/../../outside.png',
                                 'C:\\x.png', 'link/outside.png'])
def test_read_folder_refuses_files_outside_the_sample(tmp_path, rel):
  folder = schema.write_folder(make_sample(), tmp_path / 'sample')
  (tmp_path / 'outside.png').write_bytes((folder / 'image.png').read_bytes())
  (folder / 'link').symlink_to(tmp_path)
  manifest = (folder / 'manifest.json').read_text().replace('"image.png"', f'"{rel}"'.replace(
      '\\', '\\\\'))
  (folder / 'manifest.json').write_text(manifest)
  with pytest.raises(schema.SampleError, match='manifest.json: sample .*: image: .*'
                                               '(leads outside|not a relative path)'):
    schema.read_folder(folder)


def test_inside_keeps_relative_paths():
  assert str(inside('/data/s', 'layers/00.png')) == '/data/s/layers/00.png'


def test_crello_ids_cannot_escape_or_delete(tmp_path, capsys):
  victim = tmp_path / 'victim'
  victim.mkdir()
  (victim / 'keep.txt').write_text('unrelated')
  out = tmp_path / 'data' / 'out'
  templates = [template(tid, (20, 10), element('ImageElement', 2, 2, 6, 4, solid(RED, 3, 2)))
               for tid in ('../../victim', 'a/b', '.', '/abs')]
  # Crello prefixes its ids ('crello-../../victim'); `to_sample`'s prefix is not what keeps
  # the ids in: `safe_name` is.
  src = write(tmp_path / 'hostile.parquet', templates)
  assert import_main(['crello', str(src), '--output', str(out)]) == 0
  assert '4 written' in capsys.readouterr().out
  assert tree(victim) == {'keep.txt': b'unrelated'}
  written = sorted(p.name for p in out.iterdir() if p.is_dir())
  assert len(written) == 4 and all('/' not in n and not n.startswith('.') for n in written)
  assert {schema.read_folder(out / n).id for n in written} == {
      'crello-../../victim', 'crello-a/b', 'crello-.', 'crello-/abs'}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['data', 'hostile.parquet', 'victim']


def test_mulan_names_with_odd_characters_stay_one_folder_each(tmp_path, capsys):
  photo = make_photo(1)
  (tmp_path / 'ann').mkdir()
  for name in ('a b', '..x', 'é'):
    write_annotation(tmp_path / 'ann' / f'{name}.p.zip', make_annotation(photo))
    write_image(tmp_path / 'ann' / f'{name}.jpg', photo)
  out = tmp_path / 'out'
  assert import_main(['mulan', '--annotations', str(tmp_path / 'ann'), '--output',
                      str(out)]) == 0
  assert '3 written' in capsys.readouterr().out
  assert {schema.read_folder(p).id for p in out.iterdir() if p.is_dir()} == {
      'mulan-a b', 'mulan-..x', 'mulan-é'}


def test_an_existing_foreign_folder_at_an_importers_destination_is_a_bad_record(tmp_path,
                                                                                capsys):
  src = write(tmp_path / 'c.parquet', [template('good', (20, 10), element(
      'ImageElement', 2, 2, 6, 4, solid(RED, 3, 2)))])
  (tmp_path / 'out' / 'crello-good').mkdir(parents=True)
  (tmp_path / 'out' / 'crello-good' / 'mine.txt').write_text('mine')
  assert import_main(['crello', str(src), '--output', str(tmp_path / 'out')]) == 0
  captured = capsys.readouterr()
  assert '0 written, 0 already there, 1 skipped' in captured.out
  assert 'exists and is not a layered sample folder' in captured.err
  assert (tmp_path / 'out' / 'crello-good' / 'mine.txt').read_text() == 'mine'


def test_engine_samples_of_dotted_and_spaced_photos_land_inside_and_in_the_dataset(tmp_path):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:120, 0:130]
  for i, name in enumerate(('.hidden shot.png', 'a b.png')):
    img = 0.5 + 0.1 * rng.standard_normal((120, 130, 3))
    img[np.hypot(xx - 65, yy - 60) < 30] = (0.9, 0.2 * i, 0.1)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(tmp_path / name)
  out = tmp_path / 'out'
  assert engine_main(['decompose', '--input', str(tmp_path), '--output', str(out), '--quiet',
                      '--set', 'decompose.min_side=64', '--set', 'decompose.shadows=False']) == 0
  entries = runners.finished(out)
  ids = [sid for e in entries.values() for sid in e['samples']]
  assert len(ids) == 2, entries
  folders = schema.sample_folders(out / 'samples')
  assert sorted(f.name for f in folders) == sorted(safe_name(i) for i in ids)
  assert engine_main(['build-tfds', str(out)]) == 0
  import tensorflow_datasets as tfds
  source = tfds.data_source('layered', data_dir=out / 'tfds')
  assert sum(len(source[s]) for s in source) == 2


def test_a_dot_named_sample_folder_is_in_the_dataset_a_temporary_is_not(tmp_path):
  from layerjax.data.tfds_builder import build
  schema.write_folder(make_sample(seed=0), tmp_path / 'src' / '.dotted')
  schema.write_folder(make_sample(seed=1), tmp_path / 'src' / 'plain')
  schema.write_folder(make_sample(seed=2), tmp_path / 'src' / '.plain.tmp~h~1~ab')
  folders = schema.sample_folders(tmp_path / 'src')
  assert [f.name for f in folders] == ['.dotted', 'plain']
  assert build({'train': folders}, tmp_path / 'tfds')['splits'] == {'train': 2}


# --- one run per output ---------------------------------------------------------------------

HOLDER = textwrap.dedent('''
    import sys, time
    from layerjax.fileio import output_lock
    with output_lock(sys.argv[1], 'the first run', *sys.argv[2:]):
      print('held', flush=True)
      time.sleep(60)
''')


def hold(folder, *name):
  """A live process holding `folder`'s lock (`name`: the lock file's name)."""
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(folder), *name],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


@pytest.fixture
def held(tmp_path):
  """An output folder whose lock a live process holds; yields (folder, process)."""
  folder = tmp_path / 'out'
  proc = hold(folder)
  yield folder, proc
  proc.kill()
  proc.wait()


def test_a_second_run_refuses_naming_the_first_and_proceeds_once_it_is_killed(held, capsys):
  folder, proc = held
  with pytest.raises(OutputLocked, match=rf"out: in use by another run \('the first run', pid "
                                         rf'{proc.pid} on .* since'):
    runners.run_local(['k'], lambda: None, folder, progress=False)
  assert not (folder / runners.MANIFEST).exists()
  proc.kill()
  proc.wait()
  with output_lock(folder, 'the second run'):
    pass


def test_importers_and_build_tfds_refuse_a_held_output(held, tmp_path, capsys):
  from layerjax.data.tfds_builder import build
  folder, _ = held
  src = write(tmp_path / 'c.parquet', [template('good', (20, 10), element(
      'ImageElement', 2, 2, 6, 4, solid(RED, 3, 2)))])
  assert import_main(['crello', str(src), '--output', str(folder)]) == 2
  assert "out: in use by another run ('the first run'" in capsys.readouterr().err
  schema.write_folder(make_sample(), tmp_path / 'src' / 's')
  with pytest.raises(OutputLocked, match='the first run'):
    build({'train': [tmp_path / 'src' / 's']}, folder)
  assert [p.name for p in folder.iterdir()] == ['.lock']


def test_a_second_conversion_into_the_same_destination_is_refused(tmp_path, diffusers_folder,
                                                                   capsys):
  proc = hold(tmp_path, '.ckpt.lock')
  try:
    assert convert_cli.main(['from-diffusers', str(diffusers_folder),
                             str(tmp_path / 'ckpt')]) == 2
    assert "ckpt: in use by another run ('the first run'" in capsys.readouterr().err
    assert not (tmp_path / 'ckpt').exists()
  finally:
    proc.kill()
    proc.wait()
  assert convert_cli.main(['from-diffusers', str(diffusers_folder), str(tmp_path / 'ckpt')]) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']  # no lock left behind
