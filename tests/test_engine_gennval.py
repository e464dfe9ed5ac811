"""Gen-n-Val's path into the bank (generate, validate, median-filter, top up categories), and
the pairwise preference records with the rewards read from them."""

import json

import numpy as np
import pytest
from PIL import Image

from data_engine import config as engine_config
from data_engine import gennval, preferences, synthesis
from data_engine.agents.base import Preference
from data_engine.agents.rule_based import RuleBasedAgent
from layerjax.data import schema
from test_schema import make_sample


class BlobGenerator:
  """A stand-in for a text-to-RGBA pipeline: a disc with one stray speck of alpha (what the
  median filter is for), and for every third seed two discs (what validation is for)."""

  def __init__(self, size: int = 48):
    self.size = size
    self.calls = []

  def __call__(self, prompt: str, seed: int) -> np.ndarray:
    self.calls.append((prompt, seed))
    rng = np.random.default_rng(seed)
    n = self.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    centres = [(24, 24)] if seed % 3 else [(14, 14), (34, 34)]
    radius = 12 if seed % 3 else 7
    alpha = np.zeros((n, n), np.float32)
    for cy, cx in centres:
      alpha = np.maximum(alpha, np.clip(radius + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1))
    alpha[2, n - 3] = 1.0  # the speck
    colour = np.broadcast_to(rng.uniform(0.2, 0.8, 3), (n, n, 3))
    return np.dstack([colour, alpha]).astype(np.float32)


@pytest.fixture
def bank(tmp_path):
  root = tmp_path / 'bank'
  (root / 'backgrounds').mkdir(parents=True)
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / 'backgrounds' / 'grey.png')
  (root / 'objects').mkdir()
  disc = BlobGenerator()('ball', 1)
  disc[2, 45, 3] = 0  # no speck on the hand-made one
  Image.fromarray(np.round(disc * 255).astype(np.uint8), 'RGBA').save(
      root / 'objects' / 'ball_01.png')
  return root


def _config(minimum):
  config = engine_config.default_config()
  config.gennval.minimum = minimum
  config.gennval.prompts_per_call = 2
  config.gennval.max_attempts = 12
  return config


def test_categories_are_topped_up_with_validated_filtered_objects(bank):
  generator, agent = BlobGenerator(), RuleBasedAgent()
  summary = gennval.generate_objects(bank, _config({'ball': 3, 'traffic cone': 2}), agent,
                                     generator)
  assert summary['counts'] == {'traffic cone': 2, 'ball': 3}  # the rarer category first
  assert summary['kept'] == {'traffic cone': 2, 'ball': 2} and summary['short'] == {}
  assert gennval.bank_counts(bank) == {'ball': 3, 'traffic cone': 2}
  records = [json.loads(l) for l in
             (bank / gennval.GENERATED / gennval.RECORDS).read_text().splitlines()]
  assert len(records) == len(generator.calls)
  # Two-disc generations were rejected by validation, with the agent's reason.
  rejected = [r for r in records if 'dropped' in r]
  assert rejected and all(r['seed'] % 3 == 0 and r['dropped'] == 'invalid' for r in rejected)
  assert all(r['seed'] % 3 for r in records if 'file' in r)
  assert {r['category'] for r in records} == {'ball', 'traffic cone'}
  # Kept objects: the median filter removed the speck; the disc survives.
  for r in records:
    if 'file' in r:
      folder = bank / gennval.GENERATED / r['file'].rsplit('_', 1)[0]
      rgba = np.asarray(Image.open(folder / r['file']), np.float32) / 255
      assert rgba[2, 45, 3] == 0 and rgba[24, 24, 3] == 1
      assert json.loads((folder / 'labels.json').read_text())[r['file']] == r['category']
  # The bank reads them with their labels and synthesis pastes them.
  loaded = synthesis.load_bank(bank)
  assert sorted(o.label for o in loaded.objects) == ['ball'] * 3 + ['traffic cone'] * 2
  scene_config = synthesis.default_config()
  scene_config.size = (64, 64)
  synthesis.synthesize(loaded, 0, scene_config).validate()
  # A re-run with the minimum met generates nothing.
  again = gennval.generate_objects(bank, _config({'ball': 3, 'traffic cone': 2}), agent,
                                   generator)
  assert again['kept'] == {} and len(generator.calls) == len(records)


def test_generation_resumes_with_new_seeds_and_reports_shortfalls(bank):
  generator = BlobGenerator()
  first = gennval.generate_objects(bank, _config({'cup': 1}), RuleBasedAgent(), generator)
  seeds = {s for _, s in generator.calls}
  config = _config({'cup': 3})
  config.gennval.max_attempts = 1  # too few to reach 3: the shortfall is reported
  second = gennval.generate_objects(bank, config, RuleBasedAgent(), generator)
  new = {s for _, s in generator.calls} - seeds
  assert first['short'] == {} and len(new) == 1
  assert second['short'] == {'cup': 3 - second['counts']['cup']}


def test_median_filter_matches_its_definition():
  rng = np.random.default_rng(0)
  rgba = rng.uniform(0, 1, (20, 20, 4)).astype(np.float32)
  out = gennval.median_alpha(rgba, 5)
  padded = np.pad(np.round(rgba[..., 3] * 255), 2, mode='edge')  # 8-bit, edges replicated
  expected = np.array([[np.median(padded[y:y + 5, x:x + 5]) for x in range(20)]
                       for y in range(20)]) / 255
  np.testing.assert_allclose(out[..., 3], expected, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(out[..., :3], rgba[..., :3])
  with pytest.raises(ValueError, match='odd'):
    gennval.median_alpha(rgba, 4)


def test_a_missing_generator_weights_folder_is_an_error_before_anything_runs(bank, tmp_path):
  config = _config({'cup': 1})
  config.gennval.generator = {'name': 'diffusers_rgba', 'path': str(tmp_path / 'nope')}
  with pytest.raises((FileNotFoundError, ValueError), match='nope'):
    gennval.generate_objects(bank, config, RuleBasedAgent())
  assert not (bank / gennval.GENERATED / gennval.RECORDS).exists()


# --- preference records ---------------------------------------------------------------------

def _record(photo, winner, a='engine_v2', b='engine_v1'):
  return {'photo': photo, 'a': {'system': a, 'sample': photo}, 'b': {'system': b, 'sample': photo},
          'winner': winner, 'reason': '', 'scores': [0, 0], 'orders': [winner, winner]}


def test_rewards_and_bradley_terry_strengths():
  records = [_record('p1', 'a'), _record('p2', 'a'), _record('p3', 'a'), _record('p4', 'b'),
             _record('p5', 'tie')]
  r = preferences.rewards(records)
  assert r['p1', 'engine_v2'] == 1 and r['p1', 'engine_v1'] == -1
  assert r['p4', 'engine_v2'] == -1 and r['p5', 'engine_v1'] == 0
  bt = preferences.bradley_terry(records)
  # Two systems: the MM fixed point is p_a / p_b = wins_a / wins_b (ties half each; the
  # 1e-3 prior per pair shifts it slightly).
  assert bt['engine_v2'] / bt['engine_v1'] == pytest.approx(3.5 / 1.5, rel=1e-3)
  assert np.mean(list(bt.values())) == pytest.approx(1.0)


class _BiasedAgent:
  """Always prefers the first decomposition shown: a position bias, no judgement."""

  def compare(self, photo, a, b):
    return Preference('a', 'the first one', (0.9, 0.1))

  def prompt_versions(self):
    return {'compare': 'v7'}


def test_position_bias_becomes_a_tie_and_consistent_verdicts_are_kept(tmp_path):
  good = make_sample(seed=3)
  bad = make_sample(seed=3)
  bad.layers[0].rgba[..., :3] = good.image  # the object was never removed from the background
  verdict = preferences.compare_pair(_BiasedAgent(), good.image, good, bad)
  assert verdict['winner'] == 'tie' and verdict['orders'] == ['a', 'b']
  assert verdict['prompt_versions'] == {'compare': 'v7'}
  verdict = preferences.compare_pair(RuleBasedAgent(), good.image, good, bad)
  assert verdict['winner'] == 'a' and verdict['orders'] == ['a', 'a']
  assert verdict['scores'][0] > verdict['scores'][1]


def test_compare_outputs_writes_records_once(tmp_path):
  for name in ('v1', 'v2'):
    for seed in (1, 2):
      sample = make_sample(seed=seed)
      if name == 'v1':  # the object left in the background, where it hides it exactly
        opaque = sample.layer('object_1').rgba[..., 3:] == 1
        background = sample.layers[0].rgba
        background[..., :3] = np.where(opaque, sample.image, background[..., :3])
      schema.write_folder(sample, tmp_path / name / 'samples' / sample.id)
  out = tmp_path / 'prefs.jsonl'
  counts = preferences.compare_outputs(RuleBasedAgent(), tmp_path / 'v2', tmp_path / 'v1', out,
                                       names=('v2', 'v1'))
  assert counts == {'compared': 2, 'skipped': 0, 'failed': {}}
  records = preferences.read_records(out)
  assert [r['winner'] for r in records] == ['a', 'a']
  assert preferences.bradley_terry(records)['v2'] > preferences.bradley_terry(records)['v1']
  again = preferences.compare_outputs(RuleBasedAgent(), tmp_path / 'v2', tmp_path / 'v1', out,
                                      names=('v2', 'v1'))
  assert again['skipped'] == 2 and len(preferences.read_records(out)) == 2
