"""The evaluation package's core: the `layers` evaluator on hand-computed stacks, its pairing
and the problems it counts, the baselines, the registry and its config checks, the folder
benchmark's matching and outputs through `python -m layerjax.evaluate`, and the trainer's
evaluation compiling its sampler once."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from layerjax import config_spec as spec
from layerjax.data import schema
from layerjax.data.pipeline import make_loader
from layerjax.data.schema import Layer, LayeredSample
from layerjax.evaluate import baselines, evaluators, folder, outputs
from test_edit import scene
from layerjax.evaluate.__main__ import main
from layerjax.train import config as train_config
from layerjax.train import evaluate
from test_schema import make_sample
from train_utils import load_config_file, make_dataset, one_device, tiny


def rgba(*pixels) -> np.ndarray:
  """A 1 x N layer from N (r, g, b, a) pixels."""
  return np.asarray([pixels], np.float32)


def stack(sid: str, image: np.ndarray, *layers: tuple[str, str, np.ndarray]) -> LayeredSample:
  return LayeredSample(sid, image, [Layer(n, k, x) for n, k, x in layers])


# --- the `layers` evaluator --------------------------------------------------------------


def test_layer_fidelity_by_hand():
  """Per layer RGB L1 on gt alpha > 0 and soft IoU; recompose_l1 against the photo; means
  per layer over samples and over every pair."""
  image = np.zeros((1, 2, 3), np.float32)
  gt = stack('a', image, ('background', 'background', rgba((0, 0, 0, 1), (0, 0, 0, 1))),
             ('fg', 'object', rgba((1, 1, 1, 1), (0, 0, 0, 0))))
  pred = stack('a', image, ('background', 'background', rgba((0.2, 0.2, 0.2, 1), (0, 0, 0, 1))),
               ('fg', 'object', rgba((0.7, 0.7, 0.7, 0.5), (0, 0, 0, 0))))
  ev = evaluators.create('layers')
  row = ev.score('a', pred, gt)
  assert row['fg/rgb_l1'] == pytest.approx(0.3, rel=1e-6)   # one covered pixel, |d| .3
  assert row['fg/alpha_iou'] == pytest.approx(0.5)          # min .5 / max 1
  assert row['background/rgb_l1'] == pytest.approx(0.1, rel=1e-6)   # (.2 + 0) / 2
  assert row['background/alpha_iou'] == 1
  # composite: pixel 0 = .5 * .7 + .5 * .2 = .45, pixel 1 = 0; photo 0: mean .45 / 2
  assert row['recompose_l1'] == pytest.approx(0.225, rel=1e-6)
  gt2 = stack('b', image, ('background', 'background', rgba((0, 0, 0, 1), (1, 1, 1, 1))),
              ('fg', 'object', rgba((0, 0, 0, 0), (0.5, 0.5, 0.5, 0.5))))
  pred2 = stack('b', image, ('background', 'background', rgba((0, 0, 0, 1), (1, 1, 1, 1))),
                ('fg', 'object', rgba((0, 0, 0, 0.5), (0.5, 0.5, 0.5, 0.25))))
  row2 = ev.score('b', pred2, gt2)
  assert row2['fg/rgb_l1'] == 0 and row2['fg/alpha_iou'] == pytest.approx(0.25 / 1.0)
  result = ev.summarise([row, row2])
  assert result.scalars['fg/alpha_iou'] == pytest.approx((0.5 + 0.25) / 2)
  assert result.scalars['rgb_l1'] == pytest.approx((0.3 + 0.1 + 0 + 0) / 4, rel=1e-6)
  assert result.scalars['alpha_iou'] == pytest.approx((0.5 + 1 + 0.25 + 1) / 4)
  assert result.counts == {'samples': 2, 'missing_layers': 0, 'nonfinite_layers': 0,
                           'extra_layers': 0, 'empty_gt_layers': 0, 'unpaired_samples': 0}


def test_layer_fidelity_pairing_and_counted_problems():
  image = np.zeros((1, 1, 3), np.float32)
  bg, on, off = rgba((0, 0, 0, 1)), rgba((1, 0, 0, 1)), rgba((0, 0, 0, 0))
  gt = stack('g', image, ('background', 'background', bg), ('a', 'object', on),
             ('b', 'object', off))
  ev = evaluators.create('layers')
  # Foreign names, as deep: by position, keyed by the ground truth's names.
  row = ev.score('g', stack('g', image, ('0', 'background', bg), ('1', 'object', off),
                            ('2', 'object', on)), gt)
  assert row['a/alpha_iou'] == 0 and row['b/alpha_iou'] == 0
  assert np.isnan(row['b/rgb_l1']) and row['empty_gt_layers'] == 1
  # Foreign names, another depth: not paired one to one.
  row = ev.score('g', stack('g', image, ('0', 'background', bg)), gt)
  assert row['unpaired_samples'] == 1 and 'background/rgb_l1' not in row
  # Our names, one more predicted (a shadow the ground truth does not have): by name, counted.
  row = ev.score('g', stack('g', image, ('background', 'background', bg),
                            ('shadow_1', 'shadow', off), ('a', 'object', on),
                            ('b', 'object', off)), gt)
  assert row['extra_layers'] == 1 and row['unpaired_samples'] == 0
  assert row['a/alpha_iou'] == 1 and np.isnan(row['b/alpha_iou'])
  # Our names, some missing; a NaN layer is not scored.
  nan = rgba((np.nan, 0, 0, 1))
  row = ev.score('g', stack('g', image, ('background', 'background', bg), ('a', 'object', nan)),
                 gt)
  assert row['missing_layers'] == 1 and row['nonfinite_layers'] == 1
  assert 'a/rgb_l1' not in row and 'recompose_l1' not in row
  # Only the named layers are scored.
  row = evaluators.create('layers', layers=('a',)).score('g', gt, gt)
  assert [k for k in row if '/' in k] == ['a/rgb_l1', 'a/alpha_iou']
  with pytest.raises(ValueError, match="sample 'g': prediction is"):
    ev.score('g', stack('g', np.zeros((2, 1, 3), np.float32)), gt)


def test_registry_and_config_errors():
  assert isinstance(evaluators.create('layers'), evaluators.LayerFidelity)
  with pytest.raises(ValueError, match="evaluator 'nope': unknown; registered: .*layers"):
    evaluators.create('nope')
  c = load_config_file('liwi', 'demo')
  c.eval.evaluators = {'nope': {}}
  with pytest.raises(spec.ConfigError, match='eval.evaluators: unknown key'):
    spec.check(c, train_config.SPEC)
  c.eval.evaluators = {'layers': {'colour': 1}}
  with pytest.raises(spec.ConfigError, match="eval.evaluators: evaluator 'layers': options"):
    spec.check(c, train_config.SPEC)


# --- baselines -----------------------------------------------------------------------------


def test_trivial_baseline_from_a_training_batch_by_hand():
  image = np.zeros((1, 2, 3, 3), np.float32)
  image[0, 0, 0] = (0.1, 0.2, 0.3)
  prompt = np.zeros((1, 2, 3, 3), np.float32)
  prompt[..., 2] = 1                          # blue: outside the prompt
  prompt[0, 1, 1:] = (0, 1, 0)                # a green box on two pixels
  batch = {'image': image, 'prompt': prompt, 'background': np.full((1, 2, 3, 3), 0.8, np.float32),
           'foreground': np.zeros((1, 2, 3, 4), np.float32),
           'shadow': np.zeros((1, 2, 3, 4), np.float32)}
  gt, = evaluate.ground_truth(batch, ('background', 'foreground', 'shadow'), ['x'])
  assert [l.name for l in gt.layers] == ['background', 'shadow', 'foreground']
  np.testing.assert_array_equal(gt.layers[0].rgba[..., 3], 1)
  out = {l.name: l.rgba for l in baselines.trivial(gt).layers}
  np.testing.assert_array_equal(out['foreground'][..., 3], [[0, 0, 0], [0, 1, 1]])
  np.testing.assert_array_equal(out['foreground'][..., :3], image[0])
  np.testing.assert_array_equal(out['background'][..., :3], image[0])
  assert (out['background'][..., 3] == 1).all() and (out['shadow'] == 0).all()


def test_trivial_baseline_cuts_by_the_prompt_box_else_the_alpha_box():
  sample = make_sample()
  out = baselines.trivial(sample)
  x0, y0, x1, y1 = sample.prompts[0].box
  alpha = out.layer('object_1').rgba[..., 3]
  assert alpha.sum() == (x1 - x0) * (y1 - y0) and alpha[y0:y1, x0:x1].all()
  sample.prompts = []
  np.testing.assert_array_equal(baselines.trivial(sample).layer('object_1').rgba[..., 3], alpha)
  # The trivial layers recompose to the photo exactly.
  np.testing.assert_array_equal(schema.composite(out.layers)[..., :3], sample.image)


def disc_scene(h: int = 48, w: int = 64) -> LayeredSample:
  """A flat grey ground and a saturated red disc: one object the offline tools can find."""
  yy, xx = np.mgrid[0:h, 0:w]
  disc = (np.hypot(xx - 40, yy - 22) < 11).astype(np.float32)
  bg = np.concatenate([np.full((h, w, 3), 0.6, np.float32), np.ones((h, w, 1), np.float32)], -1)
  obj = np.concatenate([np.broadcast_to(np.float32([0.9, 0.1, 0.1]), (h, w, 3)),
                        disc[..., None]], -1).astype(np.float32)
  return schema.assemble('disc', [Layer('background', 'background', bg),
                                  Layer('object_1', 'object', obj)])


def test_classical_baseline_peels_the_object_and_recomposes():
  gt = disc_scene()
  out = baselines.classical(gt.image, 'disc')
  assert [l.kind for l in out.layers] == ['background', 'object']
  # Exact: the layers recompose to the photo (`postprocess.EXACT`).
  assert np.abs(schema.composite(out.layers)[..., :3] - gt.image).max() < 1e-5
  row = evaluators.create('layers').score('disc', out, gt)
  assert row['object_1/alpha_iou'] > 0.8
  assert out.provenance['tools']['segmenter'] == 'grabcut'
  # With boxes, they are peeled instead of the proposals; one with nothing in it (flat
  # ground) leaves the photo as the only layer.
  tool = baselines.Classical()
  boxed = tool(gt.image, 'disc', boxes=[(26, 8, 60, 37)])
  assert boxed.provenance['boxes'] == [[26, 8, 60, 37]]
  assert evaluators.create('layers').score('disc', boxed, gt)['object_1/alpha_iou'] > 0.8
  empty = tool(gt.image, 'disc', boxes=[(0, 0, 12, 12)])
  assert len(empty.layers) == 1 and (empty.layers[0].rgba[..., :3] == gt.image).all()


# --- outputs -------------------------------------------------------------------------------


def test_markdown_table_and_csv(tmp_path):
  flat = outputs.flatten({
      'model': {'layers': evaluators.Result({'rgb_l1': 0.25}, {'samples': 3})},
      'trivial': {'layers': evaluators.Result({'rgb_l1': float('nan')}, {'samples': 3})}})
  assert sorted(flat) == ['model/layers/count/samples', 'model/layers/rgb_l1',
                          'trivial/layers/count/samples', 'trivial/layers/rgb_l1']
  assert flat['model/layers/rgb_l1'] == 0.25 and np.isnan(flat['trivial/layers/rgb_l1'])
  assert outputs.markdown(flat).splitlines() == [
      '| metric | better | model | trivial |', '|---|---|---:|---:|',
      '| layers/rgb_l1 | lower | 0.2500 | nan |', '| layers/count/samples |  | 3 | 3 |']
  outputs.write_csv(tmp_path / 'x.csv', [{'id': 'a', 'v': 1.5, 'skip': np.zeros(3)},
                                         {'id': 'b', 'w': 2}])
  assert list(csv.reader(open(tmp_path / 'x.csv'))) == [['id', 'v', 'w'], ['a', '1.5', ''],
                                                        ['b', '', '2']]


def test_histogram_bars_are_the_counts():
  img = outputs.histogram({'a': [0.0, 0.0, 1.0, float('nan')]}, 't', bins=2, range_=(0, 1))
  bar = np.all(img == (70, 110, 180), -1)
  cols = bar.any(0)
  heights = bar.sum(0)
  left, right = heights[30:270][cols[30:270]], heights[270:510][cols[270:510]]
  assert left.max() == 140 and right.max() == 70   # 2 and 1 values; the peak fills the panel


# --- the folder benchmark ------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
  """GT: three samples (ours); PRED: s0 ours, s1 in LayerD's format with half the shadow,
  s2 missing, an unexpected 'extra' and s3 with a layer of another size."""
  gt, pred = tmp_path / 'gt', tmp_path / 'pred'
  for i in range(4):
    s = make_sample(h=24, w=32, seed=i)
    schema.write_folder(s, gt / f's{i}')
    p = baselines.trivial(s)
    if i == 0:
      schema.write_folder(p, pred / 's0')
    elif i in (1, 3):
      p.layers[1].rgba[..., 3] = 0.5 * s.layers[1].rgba[..., 3]
      (pred / f's{i}').mkdir(parents=True)
      for k, l in enumerate(p.layers):
        x = l.rgba[:12] if i == 3 and k == 2 else l.rgba
        (pred / f's{i}' / f'{k:02d}.png').write_bytes(schema.encode_png(x))
  (pred / 'extra').mkdir()
  (pred / 'extra' / '0.png').write_bytes(schema.encode_png(np.ones((4, 4, 4))))
  return gt, pred


def test_folder_command_scores_matches_and_lists(folders, tmp_path, capsys):
  gt, pred = folders
  out = tmp_path / 'out'
  assert main(['--benchmark', 'folder', '--ground-truth', str(gt), '--predictions', str(pred),
               '--out', str(out), '--baselines', 'trivial', '--no-progress']) == 0
  r = json.loads((out / 'results.json').read_text())
  assert r['missing'] == {'pred': ['s2'], 'trivial': []}
  assert r['unexpected']['pred'] == ['extra']
  assert list(r['invalid']['pred']) == ['s3']
  assert "02.png: size (12, 32) differs from the folder's first layer" in r['invalid']['pred']['s3']
  assert r['counts']['pred/missing'] == 1 and r['counts']['pred/invalid'] == 1
  s = r['scores']
  # Both columns cover the same two samples; s1's shadow alpha is half the truth's: IoU .5.
  assert s['pred/layers/count/samples'] == s['trivial/layers/count/samples'] == 2
  rows = {(row['system'], row['id']): row for row in csv.DictReader(open(out / 'per_sample.csv'))}
  assert float(rows['pred', 's1']['shadow_1/alpha_iou']) == pytest.approx(0.5, abs=0.01)
  assert float(rows['trivial', 's1']['shadow_1/alpha_iou']) == 0
  assert rows['pred', 's0']['object_1/alpha_iou'] == rows['trivial', 's0']['object_1/alpha_iou']
  table = (out / 'results.md').read_text()
  assert '| layers/shadow_1/alpha_iou | higher |' in table and table.count('\n|') >= 10
  assert '| layers/count/samples |  | 2 | 2 |' in capsys.readouterr().out
  for name in ('layer_rgb_l1.png', 'layer_alpha_iou.png'):
    assert Image.open(out / name).format == 'PNG'


def test_folder_command_refuses_bad_arguments_before_work(folders, tmp_path, capsys):
  gt, pred = folders
  base = ['--benchmark', 'folder', '--out', str(tmp_path / 'o'), '--no-progress']
  for args, msg in (
      (['--ground-truth', str(tmp_path / 'no'), '--predictions', str(pred)], 'no such directory'),
      (['--ground-truth', str(pred.parent), '--predictions', str(tmp_path / 'no')],
       '--predictions .*: no such directory'),
      (['--ground-truth', str(gt), '--predictions', str(pred), '--baselines', 'x'],
       "--baselines: unknown \\['x'\\]"),
      (['--ground-truth', str(gt), '--predictions', 'classical', '--model', str(tmp_path)],
       'not .classical.')):
    assert main(base + args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not (tmp_path / 'o').exists()


def test_box_view_is_one_sample_per_object():
  gt = make_sample()
  view, = folder.views(gt, 'box')
  assert view.id == f'{gt.id}.object_1'
  assert [l.name for l in view.layers] == ['background', 'shadow_1', 'object_1']
  # The background is the scene without the object and its shadow: here the gt background.
  np.testing.assert_allclose(view.layers[0].rgba, gt.layers[0].rgba)
  assert view.prompts[0].box == gt.layers[2].bbox


def test_unreadable_ground_truth_is_listed(tmp_path):
  schema.write_folder(make_sample(), tmp_path / 'gt' / 'ok')
  (tmp_path / 'gt' / 'broken').mkdir()
  (tmp_path / 'gt' / 'broken' / '0.png').write_bytes(b'not a png')
  report = folder.score(tmp_path / 'gt', {'trivial': baselines.trivial},
                        {'layers': evaluators.create('layers')}, progress=False)
  assert report.samples == 1 and list(report.invalid_ground_truth) == ['broken']
  assert 'not a readable PNG' in report.invalid_ground_truth['broken']


# --- the trainer's evaluation --------------------------------------------------------------


def test_eval_files_are_named_by_the_keys_that_differ_from_the_run(tmp_path):
  """`--mode=eval` names its files after the `eval` keys it changes from the run's recorded
  config, so it never writes over the run's own evaluation at that step."""
  c = load_config_file('liwi', 'demo')
  assert evaluate.name_suffix(c, tmp_path) == ''  # nothing recorded: the plain name
  (tmp_path / 'config.json').write_text(json.dumps(c.to_dict()))
  assert evaluate.name_suffix(c, tmp_path) == ''  # the run's own evaluation, repeated
  c.eval.split = 'test'  # in the name already
  assert evaluate.name_suffix(c, tmp_path) == ''
  c.eval.seed, c.eval.num_batches = 3, 5
  assert evaluate.name_suffix(c, tmp_path) == '.num_batches=5,seed=3'
  c.eval.evaluators = {'layers': {}, 'perceptual': {}}
  assert evaluate.name_suffix(c, tmp_path) == '.evaluators,num_batches=5,seed=3'


@pytest.mark.slow
def test_evaluation_compiles_once_and_repeats(tmp_path, monkeypatch):
  """A second evaluation does not trace the sampler again (counted by a Python side effect,
  which runs only while jax traces) and, with the same state, gives the same scores; the
  `exact` system is scored beside the model."""
  from layerjax import flow
  from layerjax.train import trainer
  traces = []
  decompose = flow.decompose
  monkeypatch.setattr(flow, 'decompose', lambda *a, **k: traces.append(1) or decompose(*a, **k))
  c = tiny(make_dataset(tmp_path / 'data', n=4), eval_every=1)
  setup = trainer.create(c)
  ev = evaluate.Evaluation(setup, c)
  first = ev.run(setup.state, 'validation', tmp_path / 'run', 1)
  second = ev.run(setup.state, 'validation', tmp_path / 'run', 1, name_suffix='.seed=3')
  assert len(traces) == 1 and ev.decompose._cache_size() == 1
  assert first == second
  assert {p.name for p in (tmp_path / 'run' / 'eval').iterdir()} == {
      'validation_1.json', 'validation_1.seed=3.json'}  # beside the first, not over it
  assert {p.name for p in (tmp_path / 'run' / 'samples').iterdir()} == {
      'validation_1.png', 'validation_1.seed=3.png'}
  assert first['examples'] == 8 and first['trivial/layers/background/alpha_iou'] == 1
  # The decomposer's layers (`exact`) recompose to the input, whatever the model's do.
  assert first['exact/layers/recompose_l1'] < 1e-5 < first['model/layers/recompose_l1']


@pytest.mark.slow
@pytest.mark.parametrize('view', folder.VIEWS)
def test_folder_command_with_a_model(trained_workdirs, tmp_path, view):
  """`--model` decomposes every ground-truth photo into PRED (written in our schema), then
  scores it beside both baselines on the same samples."""
  gt, pred, out = tmp_path / 'gt', tmp_path / 'pred', tmp_path / 'out'
  for i in range(2):
    schema.write_folder(make_sample(h=32, w=32, seed=i), gt / f's{i}')
  workdir = trained_workdirs('pixels')[1]
  assert main(['--benchmark', 'folder', '--ground-truth', str(gt), '--predictions', str(pred),
               '--model', str(workdir), '--out', str(out), '--view', view,
               '--no-progress']) == 0
  ids = ['s0', 's1'] if view == 'scene' else ['s0.object_1', 's1.object_1']
  assert sorted(p.name for p in pred.iterdir()) == ids
  assert schema.read_folder(pred / ids[0]).provenance['model']
  r = json.loads((out / 'results.json').read_text())
  assert r['systems'] == {'model': str(pred), 'trivial': 'trivial', 'classical': 'classical'}
  for system in ('model', 'trivial', 'classical'):
    assert r['scores'][f'{system}/layers/count/samples'] == 2
  if view == 'box':  # the decomposer names its layers as the object view does
    assert r['scores']['model/layers/count/unpaired_samples'] == 0
    assert np.isfinite(r['scores']['model/layers/object_1/alpha_iou'])


def test_pass_rate_at_k_with_the_engine_judge(tmp_path, capsys, trained_workdirs):
  """`--pass-rate 1,2 --model`: every ground-truth sample decomposed with seeds 0 and 1, each
  judged by the engine's rule-based agent; pass@2 >= pass@1 by definition, both in [0, 1],
  in results.json and printed. Without --model the flag is refused."""
  from layerjax.evaluate import __main__ as evaluate_cli
  gt = tmp_path / 'gt'
  for i in range(2):
    schema.write_folder(dataclasses.replace(scene(), id=f's{i}'), gt / f's{i}')
  common = ['--benchmark', 'folder', '--ground-truth', str(gt), '--baselines', '',
            '--no-progress', '--pass-rate', '1,2', '--out', str(tmp_path / 'out')]
  assert evaluate_cli.main(common + ['--predictions', str(gt)]) == 2
  assert '--pass-rate: needs --model' in capsys.readouterr().err
  _, trained = trained_workdirs('pixels')
  assert evaluate_cli.main(common + ['--model', str(trained), '--predictions',
                                     str(tmp_path / 'pred')]) == 0
  passes = json.loads((tmp_path / 'out' / 'results.json').read_text())['pass_rate']
  assert passes['inputs'] == 2 and passes['judge'] == 'rule_based'
  assert 0 <= passes['pass@1'] <= passes['pass@2'] <= 1
  assert [len(r['scores']) for r in passes['rows']] == [2, 2]
  assert f'pass@1 {passes["pass@1"]:.3f}, pass@2 {passes["pass@2"]:.3f} (2 inputs' in \
      capsys.readouterr().out


def test_markdown_table_escapes_bars_and_right_aligns_the_numbers():
  assert outputs.markdown_table(['name', 'n'], [('a|b', 3), ('c', 4.5)], right=1) == (
      '| name | n |\n|---|---:|\n| a/b | 3 |\n| c | 4.5 |')


def test_evaluation_sees_the_board_decomposer_gives(tmp_path):
  """Training jitters the checkerboard's colours; evaluation scores what `Decomposer`
  returns, so its examples carry the plain board Decomposer makes: light squares 0.8 and
  dark 0.4 in every channel, alternating every `checkerboard_cell` pixels."""
  c = tiny(make_dataset(tmp_path / 'data', n=4))
  c.data.checkerboard_jitter = 0.15
  mesh = one_device(c)
  cell = c.data.checkerboard_cell
  yy, xx = np.mgrid[0:c.data.image_size[0], 0:c.data.image_size[1]]
  plain = np.where(((yy // cell + xx // cell) % 2 == 0)[..., None], 0.8, 0.4) * np.ones(3)
  train = next(iter(make_loader(c.data, 'validation', mesh)))['checkerboard']
  assert np.abs(train - plain).max() > 0.01  # jittered: the test can tell the two apart
  boards = next(iter(make_loader(evaluate.eval_data_config(c, mesh), 'validation', mesh))
                )['checkerboard']
  np.testing.assert_allclose(boards, np.broadcast_to(plain, boards.shape), atol=1e-6)
