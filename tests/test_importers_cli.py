"""`python -m layerjax.data.importers`: real-format files in, sample folders and TFDS out."""

import numpy as np
import tensorflow_datasets as tfds

from layerjax.data import schema
from layerjax.data.importers.__main__ import main
from layerjax.data.tfds_builder import Layered, from_example
from test_importer_crello import RED, element, solid, template, write
from test_importer_mulan import make_annotation, make_photo, write_annotation, write_image


def crello_file(tmp_path):
  good = template('good', (40, 30),
                  element('ColoredBackground', 0, 0, 40, 30, solid((200, 200, 255), 2, 2)),
                  element('ImageElement', 5, 2, 8, 6, solid(RED, 4, 3)))
  bad = template('bad', (40, 30), element('ImageElement', 5, 2, 8, 6, b'not a png'))
  return write(tmp_path / 'crello.parquet', [good, bad])


def test_crello_import_skips_bad_records_resumes_and_feeds_tfds(tmp_path, capsys):
  src, out = crello_file(tmp_path), tmp_path / 'out'
  assert main(['crello', str(src), '--output', str(out)]) == 0
  captured = capsys.readouterr()
  assert '1 written, 0 already there, 1 skipped' in captured.out
  assert "'bad'" in captured.err
  sample = schema.read_folder(out / 'crello-good')
  assert [l.kind for l in sample.layers] == ['background', 'object']
  assert main(['crello', str(src), '--output', str(out)]) == 0   # a re-run redoes nothing
  assert '0 written, 1 already there, 1 skipped' in capsys.readouterr().out

  Layered(data_dir=tmp_path / 'tfds', sources={'train': out}).download_and_prepare()
  (record,) = list(tfds.data_source('layered', data_dir=tmp_path / 'tfds')['train'])
  np.testing.assert_array_equal(from_example(record).image, sample.image)


def test_crello_on_error_raise_stops(tmp_path, capsys):
  src = crello_file(tmp_path)
  assert main(['crello', str(src), '--output', str(tmp_path / 'out'), '--on-error',
               'raise']) == 2
  err = capsys.readouterr().err
  assert err == ("error: crello template 'bad' element 0: image: not a readable image (cannot "
                 "identify image file)\n")


def test_mulan_import_by_folders(tmp_path, capsys):
  photo = make_photo(1)
  (tmp_path / 'ann').mkdir()
  write_annotation(tmp_path / 'ann' / '000000000007.p.zip', make_annotation(photo))
  write_image(tmp_path / 'img' / 'train2017' / '000000000007.jpg', photo)
  out = tmp_path / 'out'
  assert main(['mulan', '--annotations', str(tmp_path / 'ann'), '--images',
               str(tmp_path / 'img'), '--output', str(out)]) == 0
  assert '1 written' in capsys.readouterr().out
  sample = schema.read_folder(out / 'mulan-000000000007')
  assert sample.layers[0].kind == 'background' and len(sample.layers) >= 2
