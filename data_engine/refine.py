"""Self-refining system prompts: Gen-n-Val's TextGrad loop and IAA's prompt self-refinement.

One round, for one agent task (the system prompt under refinement at version v):
  1. the worker agent answers the training items under v;
  2. the evaluator agent criticises those answers against what was expected (`critique`:
     TextGrad's textual loss);
  3. the optimiser agent rewrites the prompt from the critiques (`rewrite_prompt`: the
     textual gradient step);
  4. the validator scores the rewrite and v on the held-out items; the rewrite becomes the
     next version only if it scores strictly better.
Accepted prompts are new files in the `PromptStore` (versions are never overwritten, so every
sample's recorded prompt version stays readable); every round, accepted or not, is a line of
`refine_log.jsonl` next to the prompts with both scores and the critiques.

Tasks with labelled items (`ITEM_TASKS`) are scored by agreement with the labels. Items are
JSON lines: `{"image": "obj.png", "expected": true}` for validate_object (is this a valid
object), `{"sample": "samples/x", "expected": true}` for judge (is this decomposition good)
and `{"sample": "samples/x", "layer": "object_1", "expected": true}` for check_text; paths
are relative to the items file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_engine import core
from data_engine.agents.base import PromptOptimiser
from data_engine.core import Drop
from layerjax.data import images, schema
from layerjax.fileio import append_lines


def _validate_object(agent, item: dict) -> bool:
  return agent.validate_object(images.load_image(item['image'], alpha='keep')).score >= 0.5


def _judge(agent, item: dict) -> bool:
  sample = schema.read_folder(item['sample'])
  return agent.judge(sample.image, sample).score >= item.get('threshold', 0.5)


def _check_text(agent, item: dict) -> bool:
  return bool(agent.check_text(schema.read_folder(item['sample']).layer(item['layer']))[0])


# task -> the agent's yes/no answer on one labelled item
ITEM_TASKS: dict[str, Callable[[Any, dict], bool]] = {
    'validate_object': _validate_object, 'judge': _judge, 'check_text': _check_text}


def read_items(path) -> list[dict]:
  """Labelled items from a JSON-lines file; their paths made absolute."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such items file')
  items = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{n}: not JSON ({e})') from None
    if not isinstance(item, dict) or 'expected' not in item:
      raise ValueError(f'{path}:{n}: an item needs an "expected" answer')
    for key in ('image', 'sample'):
      if key in item:
        item[key] = str((path.parent / item[key]).resolve())
    items.append(item)
  if not items:
    raise ValueError(f'{path}: no items')
  return items


def answer(task: str, agent, items: list[dict]) -> list[dict]:
  """The agent's answers as critique examples; an answer the agent failed to give (a Drop)
  is recorded with its reason and counts as wrong."""
  ask = ITEM_TASKS[task]
  examples = []
  for item in items:
    try:
      output: Any = ask(agent, item)
    except Drop as drop:
      output = f'no answer ({drop.reason}: {drop.detail})'
    examples.append({'input': {k: v for k, v in item.items() if k != 'expected'},
                     'output': output, 'expected': bool(item['expected'])})
  return examples


def accuracy(examples: list[dict]) -> float:
  return float(np.mean([e['output'] is e['expected'] for e in examples]))


def refine(task: str, store, make_worker: Callable[[str, str], Any], evaluator, optimiser,
           train: list[dict], heldout: list[dict], rounds: int) -> dict:
  """Runs `rounds` rounds (module docstring) from the store's latest version of `task`.

  `make_worker(prompt, version)` is the agent answering `task` under the system prompt text
  `prompt` (recorded as `version`). Returns the final version and each round's record.
  """
  if task not in ITEM_TASKS:
    raise ValueError(f'refine: task {task!r} has no labelled scorer; tasks: {sorted(ITEM_TASKS)}')
  prompt, version = store.load(task, store.latest(task))
  best = accuracy(answer(task, make_worker(prompt, version), heldout))
  history = []
  for r in range(rounds):
    examples = answer(task, make_worker(prompt, version), train)
    wrong = [e for e in examples if e['output'] is not e['expected']]
    record = {'round': r, 'task': task, 'version': version, 'train_accuracy': accuracy(examples),
              'heldout_accuracy': best}
    if not wrong:
      history.append(_log(store, {**record, 'outcome': 'nothing to correct'}))
      break
    critique = evaluator.critique(task, wrong)
    candidate = optimiser.rewrite_prompt(task, prompt, [critique])
    score = accuracy(answer(task, make_worker(candidate, f'{version}+candidate'), heldout))
    record.update(critique=critique, candidate=candidate, candidate_accuracy=score,
                  accepted=score > best)
    if score > best:
      prompt, best = candidate, score
      version = record['new_version'] = store.save(task, candidate)
    history.append(_log(store, record))
  return {'task': task, 'version': version, 'heldout_accuracy': best, 'rounds': history}


def _log(store, record: dict) -> dict:
  append_lines(Path(store.root) / 'refine_log.jsonl', [json.dumps(record)])
  return record


def refine_from_config(task: str, items_path, config) -> dict:
  """`refine` with the engine config's agent as worker, evaluator and optimiser unless
  `config.refine` names others, on a seeded split of the items into train and held-out."""
  worker = core.create('agent', config.agent)
  if not hasattr(worker, 'with_prompt'):
    raise ValueError(f"refine-prompt: agent {config.agent.get('name')!r} has no system "
                     "prompts to refine; use {'name': 'llm', ...}")
  r = config.refine
  evaluator = core.create('agent', r.evaluator) if r.evaluator else worker
  optimiser = core.create('agent', r.optimiser) if r.optimiser else worker
  for role, agent in (('evaluator', evaluator), ('optimiser', optimiser)):
    if not isinstance(agent, PromptOptimiser):
      raise ValueError(f'refine.{role}: a {type(agent).__name__} cannot criticise or rewrite '
                       "prompts; use an LLM agent ({'name': 'llm', ...})")
  items = read_items(items_path)
  order = np.random.default_rng(config.seed).permutation(len(items))
  cut = max(1, round(r.heldout_fraction * len(items)))
  if cut >= len(items):
    raise ValueError(f'{items_path}: {len(items)} items leave none to train on with '
                     f'heldout_fraction {r.heldout_fraction}')
  heldout, train = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
  return refine(task, worker.store, lambda text, v: worker.with_prompt(task, text, v),
                evaluator, optimiser, train, heldout, r.rounds)
