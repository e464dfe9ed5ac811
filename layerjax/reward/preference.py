"""The engine's pairwise preference as GRPO rewards: a group of G decompositions of one photo
is compared pair by pair (`data_engine.preferences.compare_pair`: the agent's `compare` asked
in both orders, a verdict that flips with the order is a tie), and each sample's reward is
its mean outcome, +1 per win, 0 per tie, -1 per loss, mapped to [0, 1]: (mean + 1) / 2.

A group of G has G(G-1)/2 pairs, each two agent calls. `pairs=k` compares k of them, drawn so
that every sample is in one: a random perfect matching of the group first (the last sample of
an odd group joins a random other one), ceil(G/2) pairs, then k - ceil(G/2) more drawn from
the rest. A smaller k would leave a sample without a reward every time, so it is refused (as
is a k above G(G-1)/2); `comparisons(G)` checks a group size against `pairs` without asking
anything, so a trainer can refuse a bad config before its run starts.

An agent `Drop` (timeout, garbage, server error) drops that comparison, counted under its
reason; a sample all of whose comparisons were dropped gets None (the GRPO objective masks
it). Any other exception is a bug and propagates.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np

from data_engine.core import Drop
from data_engine.preferences import compare_pair
from layerjax.data.schema import LayeredSample

log = logging.getLogger(__name__)

_OUTCOME = {'a': (1, -1), 'b': (-1, 1), 'tie': (0, 0)}  # (a's, b's) outcome per verdict


class PreferenceReward:
  """`agent`: anything with `compare(photo, a, b) -> Preference` (the rule-based or llm
  agent); `pairs`: comparisons per group, None for every pair. `counts` (a Counter):
    comparisons        pairs asked
    wins, ties         comparisons that came back decided / tied (position bias included)
    <drop reason>      comparisons dropped, by the agent's reason (agent_timeout, ...)
    no_reward          samples left with None: all their comparisons dropped
  """

  def __init__(self, agent, pairs: int | None = None):
    if not callable(getattr(agent, 'compare', None)):
      raise ValueError(f'PreferenceReward: agent {type(agent).__name__} has no compare method '
                       f'(the rule_based and llm agents have one)')
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int)
                              or pairs < 1):
      raise ValueError(f'PreferenceReward: pairs must be None (every pair) or an int >= 1, '
                       f'got {pairs!r}')
    self.agent = agent
    self.pairs = pairs
    self.counts: collections.Counter = collections.Counter()
    self._lock = threading.Lock()  # a trainer rewards several photos at once

  def comparisons(self, group: int) -> int:
    """The number of pairs compared in a group of `group` samples; ValueError if none can be
    or `pairs` cannot cover every sample without repeating a pair."""
    every = group * (group - 1) // 2
    if group < 2:
      raise ValueError(f'PreferenceReward: a group of {group} sample(s) has no pair to compare')
    if self.pairs is None:
      return every
    if not math.ceil(group / 2) <= self.pairs <= every:
      raise ValueError(f'PreferenceReward: pairs={self.pairs} for a group of G={group}; need '
                       f'ceil(G/2)={math.ceil(group / 2)} <= pairs <= G(G-1)/2={every} so that '
                       f'every sample is compared and no pair twice')
    return self.pairs

  def _draw(self, group: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The pairs (i < j) to compare, sorted; every pair when `pairs` is None."""
    count = self.comparisons(group)
    every = [(i, j) for i in range(group) for j in range(i + 1, group)]
    if self.pairs is None:
      return every
    order = rng.permutation(group)
    chosen = {tuple(sorted(order[n:n + 2].tolist())) for n in range(0, group - 1, 2)}
    if group % 2:
      last = int(order[-1])
      other = int(rng.choice([s for s in range(group) if s != last]))
      chosen.add((min(last, other), max(last, other)))
    rest = [p for p in every if p not in chosen]
    extra = rng.choice(len(rest), count - len(chosen), replace=False)
    chosen.update(rest[int(n)] for n in extra)
    return sorted(chosen)

  def __call__(self, photo: np.ndarray, samples: Sequence[LayeredSample],
               rng: np.random.Generator) -> tuple[list[float | None], list[dict]]:
    """(rewards, records): one reward per sample (None: none of its comparisons came back),
    one JSON-serialisable record per comparison, {'a': i, 'b': j, 'winner', 'reason',
    'scores', 'orders'} or {'a': i, 'b': j, 'dropped': reason, 'detail': ...}."""
    photo = np.asarray(photo)
    for n, s in enumerate(samples):
      if s.image.shape[:2] != photo.shape[:2]:
        raise ValueError(f'PreferenceReward: sample {n} ({s.id!r}) is '
                         f'{s.image.shape[0]}x{s.image.shape[1]}, the photo '
                         f'{photo.shape[0]}x{photo.shape[1]}')
    counts: collections.Counter = collections.Counter()
    try:
      return self._rewards(photo, samples, rng, counts)
    finally:
      with self._lock:
        self.counts.update(counts)

  def _rewards(self, photo, samples, rng, counts) -> tuple[list[float | None], list[dict]]:
    pairs = self._draw(len(samples), rng)
    outcomes: list[list[int]] = [[] for _ in samples]
    records = []
    for i, j in pairs:
      counts['comparisons'] += 1
      try:
        verdict = compare_pair(self.agent, photo, samples[i], samples[j])
      except Drop as drop:
        log.warning('preference of samples %d and %d dropped: %s', i, j, drop)
        counts[drop.reason] += 1
        records.append({'a': i, 'b': j, 'dropped': drop.reason, 'detail': drop.detail})
        continue
      counts['ties' if verdict['winner'] == 'tie' else 'wins'] += 1
      outcome_a, outcome_b = _OUTCOME[verdict['winner']]
      outcomes[i].append(outcome_a)
      outcomes[j].append(outcome_b)
      records.append({'a': i, 'b': j, **{k: verdict[k] for k in
                                         ('winner', 'reason', 'scores', 'orders')}})
    rewards = [(float(np.mean(o)) + 1) / 2 if o else None for o in outcomes]
    if None in rewards:
      counts['no_reward'] += rewards.count(None)
    return rewards, records
