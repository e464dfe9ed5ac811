"""Pairwise preference records between two decompositions of the same photo, and the rewards a
later ReasonX-style finetuning reads from them (an MLLM's relative judgements as rewards).

`compare_pair` asks the agent's `compare` twice, with the two decompositions swapped: LLM
judges favour a position, so a verdict counts only when both orders agree, else it is a tie.
Records are JSON lines (`write_records` appends and fsyncs):

    {"photo": id, "a": {"system": "...", "sample": id}, "b": {...}, "winner": "a"|"b"|"tie",
     "reason": "...", "scores": [sa, sb], "orders": [first verdict, swapped verdict],
     "prompt_versions": {...}}

Rewards: `rewards(records)` gives each (photo, system) the mean of +1 per win, -1 per loss and
0 per tie; `bradley_terry(records)` fits a strength per system, P(i beats j) = p_i / (p_i +
p_j), ties counted as half a win each (Hunter's MM iterations), normalised to mean 1.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_engine.core import Drop
from layerjax.data import schema
from layerjax.fileio import append_lines

_SWAP = {'a': 'b', 'b': 'a', 'tie': 'tie'}


def compare_pair(agent, photo: np.ndarray, sample_a, sample_b) -> dict:
  """The agent's verdict on two decompositions of `photo`, asked in both orders."""
  first = agent.compare(photo, sample_a, sample_b)
  second = agent.compare(photo, sample_b, sample_a)
  swapped = _SWAP[second.winner]
  winner = first.winner if first.winner == swapped else 'tie'
  scores = [(first.scores[0] + second.scores[1]) / 2, (first.scores[1] + second.scores[0]) / 2]
  return {'winner': winner, 'reason': first.reason if winner != 'tie' else
          f'inconsistent or tied: {first.reason} / swapped: {second.reason}',
          'scores': [float(s) for s in scores], 'orders': [first.winner, swapped],
          'prompt_versions': agent.prompt_versions()}


def compare_outputs(agent, out_a, out_b, output, names=('a', 'b')) -> dict:
  """Compares every sample id the engine outputs `out_a` and `out_b` both hold (two configs
  run on the same photos); appends records to `output`, skipping pairs already there."""
  dirs = [Path(out_a) / 'samples', Path(out_b) / 'samples']
  for d in dirs:
    if not d.is_dir():
      raise FileNotFoundError(f'{d}: no such samples folder')
  common = sorted({p.name for p in schema.sample_folders(dirs[0])}
                  & {p.name for p in schema.sample_folders(dirs[1])})
  done = {(r['photo'], r['a']['system'], r['b']['system']) for r in read_records(output)}
  counts = {'compared': 0, 'skipped': 0, 'failed': {}}
  for sid in common:
    if (sid, names[0], names[1]) in done:
      counts['skipped'] += 1
      continue
    a, b = (schema.read_folder(d / sid) for d in dirs)
    try:
      verdict = compare_pair(agent, a.image, a, b)
    except Drop as drop:
      counts['failed'][drop.reason] = counts['failed'].get(drop.reason, 0) + 1
      continue
    write_records(output, [{'photo': sid, 'a': {'system': names[0], 'sample': a.id},
                            'b': {'system': names[1], 'sample': b.id}, **verdict}])
    counts['compared'] += 1
  return counts


def write_records(path, records) -> None:
  append_lines(path, [json.dumps(r) for r in records])


def read_records(path) -> list[dict]:
  """The records in `path` ([] if it does not exist); a torn last line is ignored."""
  path = Path(path)
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for n, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if n != len(lines):
        raise ValueError(f'{path}:{n}: not JSON') from None
  return records


def _outcomes(records):
  """(photo, winner system, loser system, tie?) per record."""
  for r in records:
    a, b = r['a']['system'], r['b']['system']
    if r['winner'] == 'b':
      a, b = b, a
    yield r['photo'], a, b, r['winner'] == 'tie'


def rewards(records) -> dict[tuple[str, str], float]:
  """(photo, system) -> mean of +1 per win, -1 per loss, 0 per tie, in [-1, 1]."""
  total: dict = defaultdict(float)
  count: dict = defaultdict(int)
  for photo, win, lose, tie in _outcomes(records):
    for system, value in ((win, 0.0 if tie else 1.0), (lose, 0.0 if tie else -1.0)):
      total[photo, system] += value
      count[photo, system] += 1
  return {k: total[k] / count[k] for k in total}


def bradley_terry(records, iterations: int = 200, tol: float = 1e-10) -> dict[str, float]:
  """Bradley-Terry strengths per system (module docstring); a system that never wins gets
  strength 0 only in the limit, so a tiny prior win against every other keeps it finite."""
  systems = sorted({s for r in records for s in (r['a']['system'], r['b']['system'])})
  index = {s: i for i, s in enumerate(systems)}
  n = len(systems)
  wins = np.full((n, n), 1e-3)  # the prior: each pair's wins, wins[i, j] = i over j
  np.fill_diagonal(wins, 0)
  for _, win, lose, tie in _outcomes(records):
    i, j = index[win], index[lose]
    if tie:
      wins[i, j] += 0.5
      wins[j, i] += 0.5
    else:
      wins[i, j] += 1
  games = wins + wins.T
  p = np.ones(n)
  for _ in range(iterations):
    new = wins.sum(1) / (games / (p[:, None] + p[None, :])).sum(1)
    new /= new.mean()
    if np.abs(new - p).max() < tol:
      p = new
      break
    p = new
  return {s: float(p[index[s]]) for s in systems}
