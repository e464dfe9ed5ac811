"""The pairwise preference reward (layerjax.reward.preference): rewards in closed form for
scripted agents (a total order, ties, a position-biased agent), the pair sampling, dropped
comparisons, the rule-based agent on hand-made decompositions, and the llm agent through the
local chat server (a scripted compare, garbage and a timeout)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from chat_server import ChatServer, answer, slow
from data_engine import core
from data_engine.agents.base import Preference
from data_engine.agents.rule_based import RuleBasedAgent
from data_engine.core import Drop
from layerjax.data import schema
from layerjax.data.schema import Layer
from layerjax.reward.preference import PreferenceReward

S = 16
RNG = np.random.default_rng(0)  # unused when every pair is compared


def _photo() -> np.ndarray:
  ys, xs = np.mgrid[:S, :S] / (S - 1)
  photo = np.stack([ys, xs, np.full_like(xs, 0.5)], -1).astype(np.float32)
  photo[4:10, 5:11] = (0.9, 0.1, 0.1)  # a red box
  return photo


def _sample(sid: str, removed: bool = True) -> schema.LayeredSample:
  """The photo as background + the box; `removed`: whether the background lost the box."""
  photo = _photo()
  mask = np.zeros((S, S), np.float32)
  mask[4:10, 5:11] = 1
  background = photo.copy()
  if removed:
    background[4:10, 5:11] = photo[3, 5]  # filled from the row above
  layers = [Layer('background', 'background', np.dstack([background, np.ones((S, S))])
                  .astype(np.float32)),
            Layer('object_1', 'object', np.dstack([photo, mask]).astype(np.float32),
                  label='box')]
  return schema.assemble(sid, layers)


def _group(n: int) -> list[schema.LayeredSample]:
  return [_sample(f's{i}') for i in range(n)]


class Ranked:
  """Prefers the sample of higher `quality[id]` (a tie when equal), in either order; records
  the (a, b) ids of each call; `drops`: (a id, b id) -> the Drop reason raised for it."""

  def __init__(self, quality: dict[str, float], drops: dict | None = None):
    self.quality, self.drops, self.calls = quality, drops or {}, []

  def compare(self, photo, a, b) -> Preference:
    self.calls.append((a.id, b.id))
    if (a.id, b.id) in self.drops:
      raise Drop(self.drops[a.id, b.id], f'scripted for {a.id} vs {b.id}')
    qa, qb = self.quality[a.id], self.quality[b.id]
    winner = 'tie' if qa == qb else 'a' if qa > qb else 'b'
    return Preference(winner, f'{a.id} {qa} vs {b.id} {qb}', (qa, qb))

  def prompt_versions(self) -> dict:
    return {}


class Biased(Ranked):
  """Always says the first decomposition shown is better."""

  def compare(self, photo, a, b) -> Preference:
    self.calls.append((a.id, b.id))
    return Preference('a', 'the first one', (0.8, 0.2))


def _quality(*q: float) -> dict[str, float]:
  return {f's{i}': v for i, v in enumerate(q)}


# --- closed forms -------------------------------------------------------------------------

def test_total_order_gives_rank_over_g_minus_1():
  # Ranks (0 = worst): s2 0, s0 1, s3 2, s4 3, s1 4; all pairs: a sample of rank r wins r and
  # loses 4 - r, reward ((r - (4 - r)) / 4 + 1) / 2 = r / 4.
  agent = Ranked(_quality(0.3, 0.9, 0.1, 0.5, 0.7))
  reward = PreferenceReward(agent)
  rewards, records = reward(_photo(), _group(5), RNG)
  assert rewards == [0.25, 1.0, 0.0, 0.5, 0.75]
  assert [(r['a'], r['b']) for r in records] == list(itertools.combinations(range(5), 2))
  assert records[0] == {'a': 0, 'b': 1, 'winner': 'b', 'reason': 's0 0.3 vs s1 0.9',
                        'scores': [0.3, 0.9], 'orders': ['b', 'b']}
  assert json.loads(json.dumps(records)) == records
  # Both orders of each pair were asked.
  assert sorted(agent.calls) == sorted(itertools.permutations([f's{i}' for i in range(5)], 2))
  assert dict(reward.counts) == {'comparisons': 10, 'wins': 10}


def test_ties_count_zero():
  # s0 loses 3; s1 and s2 tie each other, beat s0, lose to s3: (1 + 0 - 1) / 3 = 0 -> 0.5.
  reward = PreferenceReward(Ranked(_quality(0.1, 0.5, 0.5, 0.9)))
  assert reward(_photo(), _group(4), RNG)[0] == [0.0, 0.5, 0.5, 1.0]
  assert dict(reward.counts) == {'comparisons': 6, 'wins': 5, 'ties': 1}


def test_a_position_biased_agent_gives_only_ties():
  reward = PreferenceReward(Biased({}))
  rewards, records = reward(_photo(), _group(4), RNG)
  assert rewards == [0.5] * 4
  assert {r['winner'] for r in records} == {'tie'}
  assert all(r['orders'] == ['a', 'b'] for r in records)
  assert dict(reward.counts) == {'comparisons': 6, 'ties': 6}


# --- pair sampling ------------------------------------------------------------------------

def _pairs(group: int, k: int, seed: int) -> list[tuple[int, int]]:
  agent = Ranked(_quality(*range(group)))
  rewards, records = PreferenceReward(agent, pairs=k)(_photo(), _group(group),
                                                      np.random.default_rng(seed))
  assert None not in rewards
  assert len(agent.calls) == 2 * k
  return [(r['a'], r['b']) for r in records]


def test_sampled_pairs_cover_every_sample_once_each_pair():
  for group in range(2, 8):
    for k in range(math.ceil(group / 2), group * (group - 1) // 2 + 1):
      for seed in range(5):
        pairs = _pairs(group, k, seed)
        assert len(pairs) == k == len(set(pairs)), (group, k, seed)
        assert all(0 <= i < j < group for i, j in pairs), (group, k, seed)
        assert {s for p in pairs for s in p} == set(range(group)), (group, k, seed)


def test_sampled_pairs_are_seeded_and_vary():
  assert _pairs(6, 4, seed=3) == _pairs(6, 4, seed=3)
  # Over seeds the fewest pairs that cover a group of 5 reach every one of its 10 pairs.
  seen = {p for seed in range(100) for p in _pairs(5, 3, seed)}
  assert seen == set(itertools.combinations(range(5), 2))


def test_bad_configs_and_groups_are_refused_before_any_call():
  with pytest.raises(ValueError, match='agent object has no compare method'):
    PreferenceReward(object())
  for bad in (0, -2, True, 2.0):
    with pytest.raises(ValueError, match='pairs must be None'):
      PreferenceReward(Biased({}), pairs=bad)
  agent = Biased({})
  for k, group in ((2, 5), (11, 5)):  # ceil(5/2) = 3 <= k <= 10
    reward = PreferenceReward(agent, pairs=k)
    with pytest.raises(ValueError, match=rf'pairs={k} for a group of G=5; need ceil\(G/2\)=3 '
                                         r'<= pairs <= G\(G-1\)/2=10'):
      reward(_photo(), _group(group), RNG)
    with pytest.raises(ValueError, match=f'pairs={k} for a group of G=5'):
      reward.comparisons(5)
  assert PreferenceReward(agent, pairs=3).comparisons(5) == 3
  assert PreferenceReward(agent).comparisons(5) == 10
  with pytest.raises(ValueError, match='a group of 1 sample'):
    PreferenceReward(agent)(_photo(), _group(1), RNG)
  with pytest.raises(ValueError, match=r"sample 0 \('s0'\) is 16x16, the photo 8x16"):
    PreferenceReward(agent)(_photo()[:8], _group(2), RNG)
  assert agent.calls == []


# --- dropped comparisons ------------------------------------------------------------------

def test_drops_are_counted_and_a_sample_without_comparisons_gets_none():
  # Anything with s3 times out; (0, 1) turns to garbage on its swapped order. Left: s2 beats
  # s0 and s1, so s0 [-1] -> 0, s1 [-1] -> 0, s2 [+1, +1] -> 1, s3 none -> None.
  drops = {('s1', 's0'): 'agent_garbage'}
  drops.update({(f's{i}', 's3'): 'agent_timeout' for i in range(3)})
  reward = PreferenceReward(Ranked(_quality(0.1, 0.2, 0.3, 0.4), drops))
  rewards, records = reward(_photo(), _group(4), RNG)
  assert rewards == [0.0, 0.0, 1.0, None]
  assert records[0] == {'a': 0, 'b': 1, 'dropped': 'agent_garbage',
                        'detail': 'scripted for s1 vs s0'}
  assert [r.get('dropped') for r in records] == ['agent_garbage', None, 'agent_timeout', None,
                                                 'agent_timeout', 'agent_timeout']
  assert dict(reward.counts) == {'comparisons': 6, 'wins': 2, 'agent_garbage': 1,
                                 'agent_timeout': 3, 'no_reward': 1}


def test_other_exceptions_propagate():
  class Broken(Ranked):
    def compare(self, photo, a, b):
      raise KeyError('a bug')

  with pytest.raises(KeyError, match='a bug'):
    PreferenceReward(Broken({}))(_photo(), _group(2), RNG)


# --- real agents --------------------------------------------------------------------------

def test_rule_based_agent_prefers_the_clean_background():
  agent = RuleBasedAgent()
  photo = _photo()
  good, twin, ghost = _sample('good'), _sample('twin'), _sample('ghost', removed=False)
  # Its judge: all checks pass for a clean background; the ghost fails 'removed' (one of
  # three checks at 0).
  assert agent.judge(photo, good).score == 1.0
  assert agent.judge(photo, ghost).score == pytest.approx(2 / 3)
  rewards, records = PreferenceReward(agent)(photo, [good, twin, ghost], RNG)
  # good and twin tie each other and beat the ghost: (0 + 1) / 2 -> 0.75; the ghost loses 2.
  assert rewards == [0.75, 0.75, 0.0]
  assert [r['winner'] for r in records] == ['tie', 'a', 'a']


KEY_ENV = 'TEST_REWARD_PREFERENCE_KEY'


def test_llm_agent_through_the_chat_server(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'k')
  with ChatServer() as server:
    spec = {'name': 'openai', 'base_url': server.url, 'model': 'test-vlm',
            'api_key_env': KEY_ENV, 'timeout': 1.0, 'max_retries': 0, 'backoff': 0.01}
    agent = core.create('agent', {'name': 'llm', 'backend': spec})
    # Pairs (0, 1), (0, 2), (1, 2): s0 wins in both orders; (0, 2) is garbage on its first
    # order; (1, 2) times out. Rewards: s0 [+1] -> 1, s1 [-1] -> 0, s2 none -> None.
    server.push(answer({'reason': 'B left the box', 'score_a': 5, 'score_b': 2, 'winner': 'a'}),
                answer({'reason': 'A left the box', 'score_a': 2, 'score_b': 5, 'winner': 'b'}),
                answer('A is better, trust me.'),
                slow(3.0, {'reason': 'late', 'score_a': 3, 'score_b': 3, 'winner': 'tie'}))
    reward = PreferenceReward(agent)
    samples = [_sample('s0'), _sample('s1', removed=False), _sample('s2', removed=False)]
    rewards, records = reward(_photo(), samples, RNG)
    assert rewards == [1.0, 0.0, None]
    assert records[0] == {'a': 0, 'b': 1, 'winner': 'a', 'scores': [1.0, 0.25],
                          'reason': 'B left the box (a 5/5, b 2/5; compare/v1)',
                          'orders': ['a', 'a']}
    assert [r.get('dropped') for r in records] == [None, 'agent_garbage', 'agent_timeout']
    assert records[1]['detail'].startswith('compare/v1: no JSON object')
    assert dict(reward.counts) == {'comparisons': 3, 'wins': 1, 'agent_garbage': 1,
                                   'agent_timeout': 1, 'no_reward': 1}
    assert len(server.requests) == 4  # a dropped first order asks no second
    # The second request shows the pair swapped: its B background is the first's A one.
    urls = [[p['image_url']['url'] for p in r.body['messages'][1]['content']
             if p['type'] == 'image_url'] for r in server.requests[:2]]
    assert urls[0][1] != urls[0][3]  # the two backgrounds differ (clean, with the box)
    assert (urls[1][3], urls[1][1]) == (urls[0][1], urls[0][3])
