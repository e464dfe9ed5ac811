"""The benchmarks end to end, as a user runs them: Crello templates in the released parquet
format imported as LayerD's ground truth (`importers crello --layerd`), then
`python -m layerjax.evaluate --benchmark crello` scoring the classical baseline and a trained
model on it, each printing LayerD's curve."""

import json

from layerjax.data.importers.__main__ import main as import_main
from layerjax.evaluate import __main__ as evaluate_cli
from test_importer_crello import BLUE, GREEN, RED, element, solid, template, write


def crello_ground_truth(tmp_path):
  """Three 64x48 templates: a backdrop and two or three boxes (the middle ones overlapping)."""
  templates = []
  for i in range(3):
    boxes = [element('ImageElement', 0, 0, 64, 48, solid((200, 200 - 40 * i, 180), 4, 3)),
             element('ImageElement', 6 + 3 * i, 8, 24, 20, solid(RED, 4, 4)),
             element('ImageElement', 22, 14 + 2 * i, 30, 22, solid(BLUE, 4, 4))]
    if i:
      boxes.append(element('ImageElement', 40, 4, 18, 12, solid(GREEN, 4, 4)))
    templates.append(template(f't{i}', (64, 48), *boxes))
  src = write(tmp_path / 'crello.parquet', templates)
  gt = tmp_path / 'gt'
  assert import_main(['crello', str(src), '--output', str(gt), '--layerd',
                      '--short-side', '48']) == 0
  return gt


def test_crello_benchmark_scores_the_classical_baseline_and_a_model(tmp_path, capsys,
                                                                    trained_workdirs):
  gt = crello_ground_truth(tmp_path)
  assert len(list(gt.iterdir())) == 3
  common = ['--benchmark', 'crello', '--ground-truth', str(gt), '--no-progress']
  assert evaluate_cli.main(common + ['--predictions', 'classical', '--baselines', 'trivial',
                                     '--out', str(tmp_path / 'classical')]) == 0
  _, trained = trained_workdirs('pixels')
  assert evaluate_cli.main(common + ['--model', str(trained), '--predictions',
                                     str(tmp_path / 'pred'), '--baselines', '',
                                     '--out', str(tmp_path / 'model')]) == 0
  printed = capsys.readouterr().out
  for run, system in (('classical', 'classical'), ('classical', 'trivial'), ('model', 'model')):
    result = json.loads((tmp_path / run / 'results.json').read_text())
    scores = result['scores']
    assert scores[f'{system}/layerd/count/samples'] == 3, system
    curve = result['notes'][f'{system}/layerd']['curve']
    assert curve[0]['edits'] == 0 and 0 <= curve[0]['rgb_l1'] <= 1
    assert 0 <= scores[f'{system}/layerd/edits_0/alpha_iou'] <= 1
    # More edits never leave the curve shorter than LayerD's: one level per edit made.
    assert len(curve) == 1 + max(level['edits'] for level in curve)
  assert printed.count('| layerd/edits_0/rgb_l1 | lower |') == 2
  assert sorted(p.name for p in (tmp_path / 'pred').iterdir()) == sorted(
      p.name for p in gt.iterdir())
