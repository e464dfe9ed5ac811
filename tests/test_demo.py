"""The end of `make demo` (layerjax.demo.decompose_photos) on a tiny trained model: every
decomposition written as a sample folder with its Photoshop, OpenRaster and contact-sheet
files, the edited example moved by whole pixels with its shadow, and the model in PyTorch;
the lines that hold the model's test scores against issue 21's targets."""

import dataclasses
import re

import numpy as np

from data_engine import jobs
from layerjax import demo
from layerjax.data.schema import read_folder, write_folder
from layerjax.export import ora, psd
from test_edit import scene, shift


def test_demo_decomposes_into_layer_files_and_moves_an_object(trained_workdirs, tmp_path,
                                                               capsys):
  config, trained = trained_workdirs('pixels')
  work = tmp_path / 'demo'
  work.mkdir()
  (work / 'train').symlink_to(trained)
  ids = sorted([sid for sid in (f'scene-{i}' for i in range(200))
                if jobs.split_of(sid, demo.SPLITS) == 'test'][:2])
  for sid in ids + ['scene-train']:  # the last is not held out: never decomposed
    write_folder(dataclasses.replace(scene(), id=sid), work / 'data' / 'samples' / sid)
  rows = demo.decompose_photos(work, config)
  demo.print_files(rows)
  assert [what for what, _, _ in rows[:-2]] == [
      "held-out scene, its cat's box", 'held-out scene, whole', "scikit-image coffee, the "
      "cup's box", 'scikit-image coffee, whole']
  assert [folder.name for _, folder, _ in rows] == [ids[0], ids[1], 'coffee-cup', 'coffee',
                                                     f'{ids[0]}-moved', 'coffee-cup-pytorch']
  for _, folder, layers in rows:
    sample = read_folder(folder)
    assert len(sample.layers) == layers
    names = [l.name for l in sample.layers]
    assert [l.name for l in psd.read_psd(folder.with_name(folder.name + '.psd')).layers] == names
    assert [l.name for l in ora.read_ora(folder.with_name(folder.name + '.ora')).layers] == names
    assert folder.with_name(folder.name + '.preview.png').stat().st_size > 0
  first, moved = read_folder(rows[0][1]), read_folder(rows[-2][1])
  obj = [l.name for l in first.layers if l.kind == 'object'][-1]
  dx = first.size[1] // 4
  assert rows[-2][0] == f'{obj} moved {dx} px right, its shadow following'
  for layer in first.layers[1:]:
    np.testing.assert_array_equal(moved.layer(layer.name).rgba[..., 3],
                                  shift(layer.rgba[..., 3], dx, 0))
  assert read_folder(rows[2][1]).size == (400, 600)  # the coffee photo at its own size
  out = capsys.readouterr().out
  assert 'What the demo wrote' in out and f'--move {obj}:+{dx},0' in out
  # The PyTorch export's layers of the cup are JAX's (parity proper: test_torch_pipeline.py).
  differ = float(re.search(r"differ from JAX's by (\S+) at most", out).group(1))
  assert differ < 1e-3 and (tmp_path / 'demo' / 'pytorch' / 'model_index.json').is_file()


def test_against_targets_reads_the_ratios_to_the_baselines():
  # Sampled: IoU 0.80 / 0.70 = 1.143 >= 1.10; L1 0.030 / 0.040 = 0.750 <= 0.75 (met at the
  # bound). Decomposer: IoU 0.75 / 0.70 = 1.071 < 1.10; L1 0.031 / 0.040 = 0.775 > 0.75.
  result = {'model/layers/foreground/alpha_iou': 0.80, 'trivial/layers/foreground/alpha_iou': 0.70,
            'model/layers/background/rgb_l1': 0.030, 'trivial/layers/background/rgb_l1': 0.040,
            'exact/layers/foreground/alpha_iou': 0.75, 'exact/layers/background/rgb_l1': 0.031}
  fg, bg, exact_fg, exact_bg = demo.against_targets(result)
  assert fg == ('   sampled foreground alpha_iou: 0.800, baseline 0.700, ratio 1.143 '
                '(target >= 1.10: met)')
  assert bg == ('   sampled background rgb_l1: 0.030, baseline 0.040, ratio 0.750 '
                '(target <= 0.75: met)')
  assert exact_fg.startswith('decomposer foreground alpha_iou: 0.750, baseline 0.700, ratio 1.071')
  assert exact_fg.endswith('NOT met)') and exact_bg.endswith('NOT met)')
