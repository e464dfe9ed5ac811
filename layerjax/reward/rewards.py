"""A group's rewards: what GRPO normalises within each photo's group of decompositions.

`RelationReward` is ReasonX's: relations proposed where each decomposition of the group is
informative (`relations.propose`), pooled so that every member is scored on the same
questions, asked of the judge once per photo, and each decomposition rewarded with its
agreement with the judge's answers (`relations.agreement`). `combine` mixes it with other
rewards (the pairwise preference, `preference.PreferenceReward`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from layerjax.data.schema import LayeredSample
from layerjax.reward.relations import (Relation, Thresholds, agreement, propose, read,
                                        with_front)


class RelationReward:
  """`judge`: anything with `answer(photo, relations, labels) -> answers` (`judges`);
  `per_sample`: relations proposed from each decomposition (`propose`'s n), `band` its
  boundary band. Samples are decompositions of one object (`relations.one_object_sample`),
  read through `relations.with_front`."""

  def __init__(self, judge, thresholds: Thresholds, per_sample: int, band: float):
    self.judge, self.thresholds = judge, thresholds
    self.per_sample, self.band = per_sample, band

  def propose(self, target: str, samples: Sequence[LayeredSample],
              rng: np.random.Generator) -> list[Relation]:
    """The questions about `target` informative for any of `samples`, each once."""
    return self._propose(target, self._readable(target, samples), rng)

  def _readable(self, target: str, samples: Sequence[LayeredSample]) -> list[LayeredSample]:
    return [with_front(sample, target, self.thresholds) for sample in samples]

  def _propose(self, target, samples, rng) -> list[Relation]:
    return list(dict.fromkeys(
        rel for sample in samples
        for rel in propose(sample, rng, self.per_sample, self.thresholds, self.band,
                           objects=[target])))

  def __call__(self, image: np.ndarray, target: str, label: str,
               samples: Sequence[LayeredSample], rng: np.random.Generator,
               asked: Sequence[Relation] | None = None) -> tuple[list[float | None], dict]:
    """Rewards of `samples` (decompositions of `image` whose object `target` the judge knows
    as `label`), each in [0, 1] or None when the judge answered none of the questions; and
    the audit: each question's relation, the judge's answer and each sample's. `asked`: these
    questions instead of `propose`'s."""
    samples = self._readable(target, samples)
    asked = self._propose(target, samples, rng) if asked is None else list(asked)
    judged = self.judge.answer(image, asked, {target: label}) if asked else []
    implied = [[read(sample, rel, self.thresholds) for rel in asked] for sample in samples]
    rewards = [agreement(mine, judged) if asked else None for mine in implied]
    audit = {'relations': [{'kind': rel.kind, 'point': rel.point, 'judge': answer,
                            'samples': [mine[i] for mine in implied]}
                           for i, (rel, answer) in enumerate(zip(asked, judged))]}
    return rewards, audit


def combine(parts: Sequence[tuple[float, Sequence[float | None]]]) -> list[float | None]:
  """The weighted mean of several rewards of the same samples, (weight, rewards) each;
  None for a sample any part has no reward for (its group is then normalised without it,
  rather than on a mix of scales)."""
  total = sum(w for w, _ in parts)
  n = len(parts[0][1])
  return [None if any(r[i] is None or not np.isfinite(r[i]) for _, r in parts)
          else sum(w * r[i] for w, r in parts) / total for i in range(n)]
