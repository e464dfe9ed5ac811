"""The LLM/VLM agent: every agent method as one chat request under a versioned system prompt.

Each method sends the system prompt of its task (`data_engine/prompts/<task>/v<n>.txt`,
the latest version unless `versions` pins one) and the inputs, images as PNG data URLs (layers
composited over a checkerboard, as RefLade shows them to its MLLM judge), asks for a JSON
answer under the task's schema and maps it to the interface's types (`agents.base`). The
backend is any 'chat' spec (`agents.chat`): an OpenAI-compatible endpoint or a local VLM.

Traceability: `prompt_versions()` gives the version of every task's prompt; answers that carry
a reason end with '(<task>/<version>)', the plan gets a 'prompt_version' key, and drops name
the version too, so a sample's provenance shows which prompt decided.

Scores: the model rates on a 1-5 scale (RefLade's judge scale); `judge` returns the worst of
its three aspects mapped to [0, 1], as a decomposition is only as good as its worst part.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from data_engine import core
from data_engine.agents.base import Judgement, Preference
from data_engine.agents.chat import ChatBackend, image_part, parse_json
from data_engine.core import Drop, register
from data_engine.prompts import DEFAULT_DIR, PromptStore
from data_engine.tools.types import Caption

TASKS = ('plan', 'judge', 'check_text', 'caption', 'compare', 'validate_object',
         'write_prompts', 'critique', 'rewrite_prompt', 'relate')

_TEXT = {'type': 'string', 'minLength': 1}
_BOOL = {'type': 'boolean'}
_RATING = {'type': 'integer', 'minimum': 1, 'maximum': 5}


def _object(title: str, **properties) -> dict:
  # Reasoning fields come first: constrained decoders write properties in schema order.
  return {'title': title, 'type': 'object', 'properties': properties,
          'required': list(properties)}


SCHEMAS = {
    'plan': _object('plan', labels={'type': 'array', 'items': _TEXT}, reason=_TEXT,
                    shadows=_BOOL),
    'judge': _object('judge', reason=_TEXT, background=_RATING, objects=_RATING,
                     alpha=_RATING),
    'check_text': _object('check_text', reason=_TEXT, agrees=_BOOL),
    'caption': _object('caption', label=_TEXT, caption=_TEXT,
                       referring={'type': 'array', 'items': _TEXT, 'minItems': 1}),
    'compare': _object('compare', reason=_TEXT, score_a=_RATING, score_b=_RATING,
                       winner={'type': 'string', 'enum': ['a', 'b', 'tie']}),
    'validate_object': _object('validate_object', description=_TEXT, single_object=_BOOL,
                               single_view=_BOOL, intact=_BOOL, plain_background=_BOOL,
                               reason=_TEXT, keep=_BOOL),
    'critique': _object('critique', critique=_TEXT),
    'rewrite_prompt': _object('rewrite_prompt', prompt=_TEXT),
}
_CRITERIA = ('single_object', 'single_view', 'intact', 'plain_background')


def _prompts_schema(n: int) -> dict:
  return _object('write_prompts', prompts={'type': 'array', 'items': _TEXT, 'minItems': n})


def _relate_schema(n: int) -> dict:
  return _object('relate', reason=_TEXT, answers={'type': 'array', 'items': _TEXT,
                                                  'minItems': n, 'maxItems': n})


def _unit(rating: int) -> float:
  return (rating - 1) / 4


def over_checkerboard(rgba: np.ndarray) -> np.ndarray:
  """RGB of `rgba` over a light grey checkerboard, about 24 cells across the longer side."""
  h, w = rgba.shape[:2]
  cell = max(2, max(h, w) // 24)
  ys, xs = np.mgrid[:h, :w]
  board = np.where(((ys // cell + xs // cell) % 2 == 0)[..., None], 0.8, 0.6)
  alpha = rgba[..., 3:]
  return (rgba[..., :3] * alpha + board * (1 - alpha)).astype(np.float32)


@register('agent', 'llm')
class LLMAgent:
  """`backend`: a 'chat' spec; `prompts_dir`: a PromptStore root (default: the shipped
  prompts); `versions`: task -> version to pin (others: latest); `max_side`: images are
  shrunk to this longest side before sending."""

  def __init__(self, backend: dict, prompts_dir: str | None = None,
               versions: dict[str, str] | None = None, max_side: int = 512):
    versions = dict(versions or {})
    unknown = set(versions) - set(TASKS)
    if unknown:
      raise ValueError(f'agent llm: versions for unknown tasks {sorted(unknown)}; tasks: {TASKS}')
    self.store = PromptStore(prompts_dir or DEFAULT_DIR)
    self._prompts = {task: self.store.load(task, versions.get(task)) for task in TASKS}
    self.max_side = max_side
    self.backend: ChatBackend = core.create('chat', backend)

  def with_prompt(self, task: str, text: str, version: str) -> 'LLMAgent':
    """A copy answering `task` under the system prompt `text`, recorded as `version` (a
    candidate the self-refining loop tries before storing it); the backend is shared."""
    if task not in TASKS:
      raise ValueError(f'agent llm: unknown task {task!r}; tasks: {TASKS}')
    other = copy.copy(self)
    other._prompts = {**self._prompts, task: (text, version)}
    return other

  def prompt_versions(self) -> dict[str, str]:
    return {task: version for task, (_, version) in self._prompts.items()}

  def _tag(self, task: str) -> str:
    return f'{task}/{self._prompts[task][1]}'

  def _image(self, image: np.ndarray) -> dict:
    rgb = over_checkerboard(image) if image.shape[-1] == 4 else image
    return image_part(rgb, self.max_side)

  def _ask(self, task: str, content: list[dict], schema: dict | None = None) -> dict[str, Any]:
    schema = schema or SCHEMAS[task]
    messages = [{'role': 'system', 'content': self._prompts[task][0].strip()},
                {'role': 'user', 'content': content}]
    try:
      return parse_json(self.backend.complete(messages, schema), schema)
    except Drop as drop:
      raise Drop(drop.reason, f'{self._tag(task)}: {drop.detail}') from None

  def _layers(self, title: str, sample) -> list[dict]:
    parts = []
    for lay in sample.layers:
      label = f', label {lay.label!r}' if lay.label else ''
      parts += [{'type': 'text', 'text': f'{title}layer {lay.name} ({lay.kind}{label}):'},
                self._image(lay.rgba[..., :3] if lay.kind == 'background' else lay.rgba)]
    return parts

  def plan(self, image: np.ndarray, detections: list) -> dict:
    found = [{'box': [int(v) for v in d.box], 'score': round(float(d.score), 3),
              'label': d.label} for d in detections]
    a = self._ask('plan', [
        self._image(image),
        {'type': 'text', 'text': f'Photo size: {image.shape[1]}x{image.shape[0]} pixels.\n'
                                 f'Detections: {json.dumps(found)}'}])
    return {'shadows': a['shadows'], 'reason': a['reason'], 'labels': list(a['labels']),
            'prompt_version': self._tag('plan')}

  def judge(self, photo: np.ndarray, sample) -> Judgement:
    a = self._ask('judge', [{'type': 'text', 'text': 'Original photo:'}, self._image(photo),
                            *self._layers('', sample)])
    ratings = (a['background'], a['objects'], a['alpha'])
    return Judgement(_unit(min(ratings)),
                     f'{a["reason"]} (background {ratings[0]}/5, objects {ratings[1]}/5, '
                     f'alpha {ratings[2]}/5; {self._tag("judge")})')

  def check_text(self, layer) -> tuple[bool, str]:
    if layer.kind != 'object':
      return True, ''
    if not (layer.label or layer.caption or layer.referring):
      return True, 'no text to check'
    texts = {'label': layer.label, 'caption': layer.caption, 'referring': list(layer.referring)}
    a = self._ask('check_text', [self._image(layer.rgba),
                                 {'type': 'text', 'text': f'Texts: {json.dumps(texts)}'}])
    return a['agrees'], f'{a["reason"]} ({self._tag("check_text")})'

  def caption(self, rgba: np.ndarray, label: str) -> Caption:
    a = self._ask('caption', [self._image(rgba),
                              {'type': 'text', 'text': f'Suggested label: {label!r}'}])
    return Caption(a['label'].strip(), a['caption'].strip(),
                   tuple(r.strip() for r in a['referring']))

  def compare(self, photo: np.ndarray, sample_a, sample_b) -> Preference:
    a = self._ask('compare', [{'type': 'text', 'text': 'Original photo:'}, self._image(photo),
                              *self._layers('Decomposition A, ', sample_a),
                              *self._layers('Decomposition B, ', sample_b)])
    sa, sb = a['score_a'], a['score_b']
    if (a['winner'] == 'a' and sa < sb) or (a['winner'] == 'b' and sb < sa):
      raise Drop('agent_garbage', f'{self._tag("compare")}: winner {a["winner"]!r} contradicts '
                 f'its scores a {sa}/5, b {sb}/5')
    return Preference(a['winner'], f'{a["reason"]} (a {sa}/5, b {sb}/5; '
                      f'{self._tag("compare")})', (_unit(sa), _unit(sb)))

  def validate_object(self, rgba: np.ndarray, category: str = '') -> Judgement:
    """1 when the model keeps the image and finds all four Gen-n-Val criteria met, else 0."""
    a = self._ask('validate_object', [
        self._image(rgba),
        {'type': 'text', 'text': f'Expected category: {category}' if category else
         'Expected category: not given'}])
    failed = [c for c in _CRITERIA if not a[c]]
    valid = a['keep'] and not failed
    verdict = 'kept' if valid else f'rejected (failed: {", ".join(failed) or "keep is false"})'
    return Judgement(1.0 if valid else 0.0,
                     f'{verdict}: {a["reason"]} ({self._tag("validate_object")})')

  def write_prompts(self, category: str, n: int) -> list[str]:
    if n < 0:
      raise ValueError(f'agent llm: write_prompts n={n} < 0')
    if n == 0:
      return []
    a = self._ask('write_prompts', [{'type': 'text', 'text': f'Category: {category}\n'
                                                              f'Number of prompts: {n}'}],
                  _prompts_schema(n))
    return [p.strip() for p in a['prompts'][:n]]

  def relate(self, photo: np.ndarray, questions: list[str],
             choices: list[list[str]]) -> list[str]:
    """ReasonX's relative questions about one photo, in one request: the answer to each, as
    the model wrote it (stripped; the caller checks it is one of that question's choices)."""
    if len(questions) != len(choices):
      raise ValueError(f'agent llm: relate got {len(questions)} questions and {len(choices)} '
                       f'lists of choices')
    if not questions:
      return []
    listed = '\n'.join(f'{i}. {q} Choices: {" | ".join(c)}'
                       for i, (q, c) in enumerate(zip(questions, choices), 1))
    a = self._ask('relate', [
        self._image(photo),
        {'type': 'text', 'text': f'Photo size: {photo.shape[1]}x{photo.shape[0]} pixels.\n'
                                 f'Questions:\n{listed}'}], _relate_schema(len(questions)))
    return [answer.strip() for answer in a['answers']]

  def critique(self, task: str, examples: list[dict]) -> str:
    a = self._ask('critique', [{'type': 'text', 'text': f'Task: {task}\nExamples:\n'
                                                         f'{json.dumps(examples, indent=1)}'}])
    return a['critique'].strip()

  def rewrite_prompt(self, task: str, prompt: str, critiques: list[str]) -> str:
    listed = '\n'.join(f'- {c}' for c in critiques)
    a = self._ask('rewrite_prompt', [{'type': 'text', 'text': (
        f'Task: {task}\nCurrent system prompt:\n<<<\n{prompt}\n>>>\nCritiques:\n{listed}')}])
    return a['prompt'].strip()
