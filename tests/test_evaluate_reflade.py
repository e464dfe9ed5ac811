"""RefLade's HPA and Pass-rate@K (`layerjax.evaluate.reflade`): the crops, masks and blends by
hand, the scores with stand-in networks whose values are closed forms, the normalisation
against RefLade's published table, and CLIP features against transformers' own path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from data_engine.agents import Judgement
from layerjax.data import schema
from layerjax.evaluate import reflade

STANDIN = f'stand-in {reflade.NOT_METRIC}'
BOUNDS = {'foreground': {'S_vis': (0, 1), 'S_gen': (-1, 1), 'S_fid': (0, 1)}}


def _layer(h, w, box, rgb, alpha=1.0):
  x = np.zeros((h, w, 4), np.float32)
  x0, y0, x1, y1 = box
  x[y0:y1, x0:x1, :3] = rgb
  x[y0:y1, x0:x1, 3] = alpha
  return x


def _standins(weights=None):
  """lpips = mean |a - b|, features = per-channel means, 'FID' = squared distance of the set
  means: every score below is then a closed form."""
  means = lambda images: np.stack([np.asarray(x).mean((0, 1)) for x in images])
  return reflade.Networks(
      lpips=lambda a, b: np.abs(a - b).mean((1, 2, 3)), clip=means, fid_features=means,
      frechet_distance=lambda fa, fb: float(((fa.mean(0) - fb.mean(0)) ** 2).sum()),
      weights=weights or {n: STANDIN for n in reflade.NETWORKS})


def _pairs():
  # A: occluded (only its top-left pixel is seen), prompted by a box; B: fully visible, text.
  gt_a = _layer(4, 4, (0, 0, 2, 2), (0.8, 0.4, 0.0))
  pred_a = _layer(4, 4, (0, 0, 2, 2), (0.0, 0.4, 0.8))
  vis_a = np.zeros((4, 4), bool)
  vis_a[0, 0] = True
  gt_b = _layer(4, 4, (2, 2, 4, 4), 0.5)
  pred_b = np.concatenate([np.ones((4, 4, 3)), np.full((4, 4, 1), 0.5)], -1).astype(np.float32)
  bkgd = np.full((4, 4, 3), 0.2, np.float32)
  return [reflade.Pair('a', gt_a, pred_a, vis_a, bkgd, prompt='box'),
          reflade.Pair('b', gt_b, pred_b, gt_b[..., 3] > 0, bkgd, prompt='text')]


def test_views_crop_to_the_gt_alpha_box_and_mask_by_the_visible_mask():
  gt = np.zeros((4, 5, 4), np.float32)
  gt[1:3, 1:4] = [0.5, 0.6, 0.7, 1.0]
  gt[2, 3, 3] = 0.0                                    # a hole: still inside the box
  pred = np.zeros((4, 5, 4), np.float32)
  pred[..., :3] = np.arange(20, dtype=np.float32).reshape(4, 5, 1) / 20
  pred[0:2, 0:2, 3] = 1.0                              # the prediction's own box: (0, 0, 2, 2)
  vis = np.zeros((4, 5), bool)
  vis[1, 1:3] = True
  bkgd = np.full((4, 5, 3), 0.25, np.float32)
  pair = reflade.Pair('p', gt, pred, vis, bkgd)
  g, g_vis, p, p_vis = reflade.visible_views(pair)
  assert g.shape == g_vis.shape == p.shape == p_vis.shape == (2, 3, 3)
  np.testing.assert_array_equal(g[..., 0], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
  np.testing.assert_array_equal(g_vis[..., 2], np.float32([[0.7, 0.7, 0], [0, 0, 0]]))
  np.testing.assert_array_equal(p[..., 1], np.float32([[6, 7, 8], [11, 12, 13]]) / 20)
  np.testing.assert_array_equal(p_vis[..., 1], np.float32([[6, 7, 0], [0, 0, 0]]) / 20)
  g_hat, p_hat = reflade.blended_views(pair)
  # g_hat: over the 0.25 background in the GT box; the hole shows the background.
  np.testing.assert_allclose(g_hat[..., 0], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.25]])
  # p_hat: its own box (0, 0, 2, 2), alpha 1 there, so its own colours.
  np.testing.assert_allclose(p_hat[..., 0], np.float32([[0, 1], [5, 6]]) / 20)
  empty = reflade.Pair('e', gt, np.zeros_like(gt), vis, bkgd)
  np.testing.assert_allclose(reflade.blended_views(empty)[1], np.full((2, 3, 3), 0.25))


def test_occluded_means_visible_is_a_strict_subset_of_the_alpha():
  a, b = _pairs()
  assert a.occluded and not b.occluded
  outside = reflade.Pair('o', a.gt, a.pred, a.visible | np.eye(4, dtype=bool), a.background)
  assert not outside.occluded                          # visible pixels off the layer


def test_scores_are_the_closed_forms_of_the_stand_in_networks():
  result = reflade.score(_pairs(), _standins(), BOUNDS)
  groups = result['groups']
  assert sorted(groups) == ['foreground', 'foreground/box', 'foreground/box/occluded',
                            'foreground/occluded', 'foreground/text']
  rows = {r['id']: r for r in result['rows']}
  # A: the 2x2 crops differ only at the visible pixel, |0.8-0| + 0 + |0-0.8| over 12 values.
  assert rows['a']['S_vis'] == pytest.approx(1.6 / 12)
  # Directions from f(g * v) = (0.2, 0.1, 0): (0.6, 0.3, 0) and (-0.2, 0.3, 0.8).
  assert rows['a']['S_gen'] == pytest.approx(-0.03 / np.sqrt(0.45 * 0.77))
  # B: fully visible, 0.5 against 1.0; its GT's directions are zero, so S_gen is undefined.
  assert rows['b']['S_vis'] == pytest.approx(0.5)
  assert np.isnan(rows['b']['S_gen'])
  fg = groups['foreground']
  assert fg['n'] == 2 and fg['S_gen_undefined'] == 1
  assert fg['S_vis'] == pytest.approx((1.6 / 12 + 0.5) / 2)
  assert fg['S_gen'] == pytest.approx(-0.03 / np.sqrt(0.45 * 0.77))
  # Blended means: pred (0, .4, .8) and 0.5 * 1 + 0.5 * 0.2 = 0.6 over the whole image;
  # GT (.8, .4, 0) and 0.5. Set means (.3, .5, .7) and (.65, .45, .25).
  assert fg['S_fid'] == pytest.approx(0.35 ** 2 + 0.05 ** 2 + 0.45 ** 2)
  expected = ((1 - fg['S_vis']) + (fg['S_gen'] + 1) / 2 + (1 - fg['S_fid'])) / 3
  assert fg['HPA'] == pytest.approx(expected)
  occ = groups['foreground/occluded']
  assert occ['n'] == 1 and occ['S_fid'] is None and occ['HPA'] is None
  assert groups['foreground/text']['n'] == 1 and groups['foreground/box/occluded']['n'] == 1
  assert not result['is_metric'] and result['bounds'] == {
      'foreground': {'S_vis': (0.0, 1.0), 'S_gen': (-1.0, 1.0), 'S_fid': (0.0, 1.0)}}
  json.dumps(result)                                   # serialisable as it stands


def test_normalisation_flips_lower_is_better_and_does_not_clip():
  b = {'S_vis': (0.0, 0.2), 'S_gen': (0.5, 1.0), 'S_fid': (0.0, 40.0)}
  assert reflade.normalise('S_fid', 10.0, b) == pytest.approx(0.75)
  assert reflade.normalise('S_fid', 50.0, b) == pytest.approx(-0.25)
  assert reflade.normalise('S_vis', 0.05, b) == pytest.approx(0.75)
  assert reflade.normalise('S_gen', 0.6, b) == pytest.approx(0.2)
  assert reflade.hpa({'S_vis': 0.05, 'S_gen': 0.6, 'S_fid': 10.0}, b) == pytest.approx(
      (0.75 + 0.2 + 0.75) / 3)
  assert reflade.hpa({'S_vis': 0.05, 'S_gen': None, 'S_fid': 10.0}, b) is None


# RefLade Table 3: (HPA, FID, LPIPS, DIR) of 8 systems, foreground and background.
TABLE3 = {
    'foreground': [(0.3852, 22.68, 0.1403, 0.2031), (0.4629, 10.98, 0.1411, 0.2543),
                   (0.4621, 11.27, 0.1428, 0.2589), (0.4631, 10.99, 0.1434, 0.2547),
                   (0.4678, 10.66, 0.1404, 0.2575), (0.4685, 11.10, 0.1377, 0.2561),
                   (0.4698, 10.60, 0.1378, 0.2531), (0.4813, 10.50, 0.1330, 0.2652)],
    'background': [(0.3459, 21.84, 0.1588, 0.6385), (0.5932, 16.87, 0.0520, 0.7206),
                   (0.5935, 16.73, 0.0530, 0.7213), (0.5461, 19.84, 0.0552, 0.6950),
                   (0.5792, 18.36, 0.0493, 0.7129), (0.5587, 17.35, 0.0730, 0.7190),
                   (0.6657, 12.99, 0.0487, 0.7721), (0.6682, 13.14, 0.0437, 0.7673)]}


@pytest.mark.parametrize('kind,tol', [('background', 2e-4), ('foreground', 2e-3)])
def test_table3_fit_bounds_reproduce_the_published_hpa(kind, tol):
  bounds = reflade.check_bounds(reflade.TABLE3_FIT_BOUNDS)[kind]
  for published, fid, lpips, dir_ in TABLE3[kind]:
    ours = reflade.hpa({'S_vis': lpips, 'S_gen': dir_, 'S_fid': fid}, bounds)
    assert abs(ours - published) < tol, (kind, published, ours)


def test_bounds_and_pairs_are_checked_before_any_work():
  with pytest.raises(ValueError, match='no bounds for .background'):
    reflade.check_bounds(BOUNDS)
  with pytest.raises(ValueError, match=r'foreground S_fid = \(1, 0\)'):
    reflade.check_bounds({'foreground': {**BOUNDS['foreground'], 'S_fid': (1, 0)}},
                         ['foreground'])
  calls = []
  nets = _standins()
  nets = reflade.Networks(lambda a, b: calls.append(1) or nets.lpips(a, b), nets.clip,
                          nets.fid_features, nets.frechet_distance, nets.weights)
  a, b = _pairs()
  bad = reflade.Pair('nan', a.gt, np.full_like(a.pred, np.nan), a.visible, a.background)
  with pytest.raises(ValueError, match="pair 'nan': prediction has NaN"):
    reflade.score([a, bad], nets, BOUNDS)
  small = reflade.Pair('small', a.gt, a.pred[:3], a.visible, a.background)
  with pytest.raises(ValueError, match="pair 'small': prediction has shape"):
    reflade.score([a, small], nets, BOUNDS)
  empty = reflade.Pair('empty', np.zeros_like(a.gt), a.pred, a.visible, a.background)
  with pytest.raises(ValueError, match="pair 'empty': the ground-truth layer is empty"):
    reflade.score([a, empty], nets, BOUNDS)
  assert not calls


def test_every_summary_line_names_bounds_and_weights_and_flags_random_weights():
  result = reflade.score(_pairs(), _standins(), BOUNDS)
  lines = reflade.summary(result)
  assert len(lines) == len(result['groups'])
  assert all('S_fid [0, 1]' in ln and 'NOT the metric' in ln for ln in lines)
  real = {'lpips': '/w/vgg.safetensors', 'clip': '/w/clip', 'inception': '/w/pt_inception'}
  result = reflade.score(_pairs(), _standins(real), BOUNDS)
  assert result['is_metric']
  assert all('NOT the metric' not in ln and 'clip: /w/clip' in ln
             for ln in reflade.summary(result))
  partial = dataclasses.replace(_standins(), weights={'lpips': 'a', 'clip': 'b'})
  assert not partial.is_metric                         # the Inception's weights unstated


def test_pairs_from_sample_blend_over_the_scene_without_the_object_and_its_shadow():
  bg = _layer(6, 6, (0, 0, 6, 6), (0.1, 0.2, 0.3))
  shadow = _layer(6, 6, (1, 4, 5, 6), 0.0, alpha=0.5)
  obj = _layer(6, 6, (1, 1, 4, 5), (0.9, 0.1, 0.1))
  other = _layer(6, 6, (3, 0, 6, 2), (0.0, 1.0, 0.0))
  layers = [schema.Layer('background', 'background', bg),
            schema.Layer('shadow_1', 'shadow', shadow, owner='object_1'),
            schema.Layer('object_1', 'object', obj), schema.Layer('object_2', 'object', other)]
  sample = schema.assemble('s', layers)
  pred = np.zeros((6, 6, 4), np.float32)
  (pair,) = reflade.pairs_from_sample(sample, {'object_1': pred}, prompt='box')
  expected = np.broadcast_to(np.float32([0.1, 0.2, 0.3]), (6, 6, 3)).copy()
  expected[0:2, 3:6] = [0.0, 1.0, 0.0]                 # object_2 stays; shadow_1 goes
  np.testing.assert_allclose(pair.background, expected, atol=1e-6)
  assert pair.id == 's/object_1' and pair.kind == 'foreground' and pair.prompt == 'box'
  np.testing.assert_array_equal(pair.visible, sample.layer('object_1').visible_mask)
  assert pair.occluded                                 # object_2 covers its corner (3, 1)
  (bg_pair,) = reflade.pairs_from_sample(sample, {'background': pred})
  assert bg_pair.kind == 'background'
  with pytest.raises(ValueError, match="layer 'shadow_1' is a shadow"):
    reflade.pairs_from_sample(sample, {'shadow_1': pred})


class _Judge:
  """Accepts exactly the samples named in `accepted`, as the data engine's agents answer."""

  def __init__(self, accepted):
    self.accepted, self.seen = set(accepted), []

  def judge(self, photo, sample):
    self.seen.append(sample.id)
    ok = sample.id in self.accepted
    return Judgement(1.0 if ok else 0.2, 'accepted' if ok else 'rejected')


def _candidates(sid, k):
  return [schema.LayeredSample(f'{sid}.{i}', np.zeros((2, 2, 3), np.float32), [])
          for i in range(k)]


def test_pass_rate_at_k_counts_inputs_with_one_accepted_prediction_among_the_first_k():
  photo = np.zeros((2, 2, 3), np.float32)
  inputs = [(s, photo, _candidates(s, 4)) for s in ('x', 'y', 'z')]
  judge = _Judge({'x.0', 'y.2', 'y.3'})                # z: never accepted
  out = reflade.pass_rate(inputs, judge, ks=(1, 2, 3), min_score=0.5)
  assert (out['pass@1'], out['pass@2'], out['pass@3']) == (1 / 3, 1 / 3, 2 / 3)
  assert out['inputs'] == 3 and out['judge'] == '_Judge' and out['min_score'] == 0.5
  assert len(judge.seen) == 9                          # only the first max(ks) are judged
  assert out['rows'][1]['scores'] == [0.2, 0.2, 1.0]
  assert reflade.pass_rate(inputs, judge, ks=(1,), min_score=0.1)['pass@1'] == 1.0
  with pytest.raises(ValueError, match="input 'x' has 4 predictions, pass@5 needs 5"):
    reflade.pass_rate(inputs, judge, ks=(1, 5), min_score=0.5)


def test_pass_rate_with_the_rule_based_judge():
  from data_engine.agents import RuleBasedAgent
  bg = _layer(16, 16, (0, 0, 16, 16), 0.2)
  obj = _layer(16, 16, (4, 4, 10, 10), (0.9, 0.1, 0.1))
  good = schema.assemble('good', [schema.Layer('background', 'background', bg),
                                  schema.Layer('object_1', 'object', obj)])
  # The same photo with nothing removed from the background: the judge rejects it.
  lazy_bg = np.concatenate([good.image, np.ones((16, 16, 1), np.float32)], -1)
  lazy = schema.assemble('lazy', [schema.Layer('background', 'background', lazy_bg),
                                  schema.Layer('object_1', 'object', obj)])
  out = reflade.pass_rate([('p', good.image, [lazy, good])], RuleBasedAgent(), ks=(1, 2),
                          min_score=0.9)
  assert (out['pass@1'], out['pass@2']) == (0.0, 1.0)


# --- CLIP with a tiny random model, against transformers' own feature path ----------------

def _tiny_clip(folder=None):
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
  import torch
  config = CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, vocab_size=40, max_position_embeddings=16,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, image_size=32, patch_size=8),
      projection_dim=16)
  processor = CLIPImageProcessor(size={'shortest_edge': 32},
                                 crop_size={'height': 32, 'width': 32})
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  if folder is not None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _tiny_tokenizer(folder)
  return config, processor, model


def _tiny_tokenizer(folder):
  """A CLIP BPE vocabulary of single letters and no merges, written by hand."""
  letters = 'abcdefghijklmnopqrstuvwxyz'
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
  for c in letters:
    vocab[c] = len(vocab)
  for c in letters[:12]:
    vocab[c + '</w>'] = len(vocab)
  (folder / 'vocab.json').write_text(json.dumps(vocab))
  (folder / 'merges.txt').write_text('#version: 0.2\n')


def test_clip_features_match_transformers_on_random_weights(tmp_path):
  import torch
  from PIL import Image
  _, processor, model = _tiny_clip(tmp_path)
  clip = reflade.CLIPFeatures.load(tmp_path)
  assert clip.weights == str(tmp_path) and clip.tokenizer is not None
  rng = np.random.default_rng(0)
  images = [rng.random((20, 30, 3)).astype(np.float32), rng.random((40, 17, 3))]
  ours = clip.image_features(images)
  pil = [Image.fromarray(np.round(x * 255).astype(np.uint8)) for x in images]
  with torch.no_grad():
    ref = model.get_image_features(**processor(images=pil, return_tensors='pt'))
  ref = getattr(ref, 'pooler_output', ref).double().numpy()
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0)
  # The directional similarity: images after - before against texts after - before.
  tokens = clip.tokenizer(['a cab', 'a bead'], padding=True, return_tensors='pt')
  with torch.no_grad():
    t = model.get_text_features(**tokens)
  t = getattr(t, 'pooler_output', t).double().numpy()
  t /= np.linalg.norm(t, axis=-1, keepdims=True)
  di, dt = ref[1] - ref[0], t[1] - t[0]
  expected = di @ dt / (np.linalg.norm(di) * np.linalg.norm(dt))
  got = reflade.clip_directional_similarity(clip, images[0], images[1], 'a cab', 'a bead')
  assert got == pytest.approx(expected, abs=1e-6)


def test_clip_random_weights_are_flagged_and_missing_folders_named(tmp_path):
  config, processor, _ = _tiny_clip()
  clip = reflade.CLIPFeatures.random(config, processor)
  assert reflade.NOT_METRIC in clip.weights
  with pytest.raises(ValueError, match='no tokenizer'):
    clip.text_features(['a'])
  with pytest.raises(FileNotFoundError, match='config.json missing'):
    reflade.CLIPFeatures.load(tmp_path / 'nowhere')


@pytest.mark.slow  # ~100 s on 2 cores: LPIPS compiles per crop size, Inception runs at 299 px
def test_reflade_benchmark_command_on_random_networks(tmp_path, capsys):
  """`--benchmark reflade --random-weights`: every object of two scenes in the box view,
  predicted perfectly. Whatever the networks' weights, S_vis = LPIPS(x, x) = 0, S_gen = 1
  (the same direction; defined for the mug, which the cat hides in part, not for the fully
  seen objects) and S_fid = 0 (the same set), so HPA = 1; the scores are named
  random_weights/... and the printed lines say they are not the metric."""
  from layerjax.data.schema import write_folder
  from layerjax.edit import Document
  from layerjax.evaluate import __main__ as evaluate_cli
  from layerjax.evaluate import folder
  from test_edit import scene
  for i in range(2):
    gt = Document(scene()).move('cat', -12, -8).render(f's{i}')
    write_folder(gt, tmp_path / 'gt' / gt.id)
    for view in folder.views(gt, 'box'):
      image = schema.composite(view.layers)[..., :3]  # the object in front: the view's own
      write_folder(dataclasses.replace(view, image=image, prompts=[]),
                   tmp_path / 'pred' / view.id)
  args = ['--benchmark', 'reflade', '--ground-truth', str(tmp_path / 'gt'), '--predictions',
          str(tmp_path / 'pred'), '--baselines', '', '--out', str(tmp_path / 'out'),
          '--no-progress']
  assert evaluate_cli.main(args) == 2
  assert '--lpips: reflade needs local weights' in capsys.readouterr().err
  assert evaluate_cli.main(args + ['--random-weights']) == 0
  printed = capsys.readouterr().out
  scores = json.loads((tmp_path / 'out' / 'results.json').read_text())['scores']
  assert scores['pred/reflade/random_weights/foreground/S_vis'] == pytest.approx(0, abs=1e-6)
  assert scores['pred/reflade/random_weights/foreground/S_gen'] == pytest.approx(1, abs=1e-6)
  assert scores['pred/reflade/random_weights/foreground/HPA'] == pytest.approx(1, abs=1e-3)
  assert scores['pred/reflade/count/samples'] == 6
  assert not any(k.startswith('pred/reflade/foreground') for k in scores)
  lines = [l for l in printed.splitlines() if l.startswith('pred: reflade foreground (n=6)')]
  assert lines and 'NOT the metric' in lines[0] and 'S_vis [0, 0.2736]' in lines[0]
