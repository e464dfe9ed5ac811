"""Gen-n-Val's path into the synthesis bank: LLM-written prompts -> RGBA objects -> VLLM
validation -> median-filtered alpha -> `BANK/objects/generated/`, until every category asked
for has at least its minimum number of objects in the bank (rare categories topped up first
by how far they are below). `synthesis` then pastes them into scenes like any other object;
with `synthesize.balance_categories=True` every category is drawn equally often, so the rare
ones are no longer rare in the scenes.

    write_prompts(category, n)    the agent's prompts for one object of the category
    generator(prompt, seed)       an RGBA layer (a `generator` tool, e.g. 'diffusers_rgba')
    validate_object(rgba)         the agent's verdict: one intact object, plain background
    median filter on alpha        kernel `median_kernel` (Gen-n-Val: 15), after validation

Every attempt, kept or not, is a line in `objects/generated/records.jsonl`: category, prompt,
seed, the verdict and its reason, and the agent's prompt versions. Seeds are a function of
(config seed, category, attempt number), and attempts continue from the records, so a re-run
after a crash makes new objects instead of repeating old ones and never exceeds a minimum
that is already met.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import cv2
import ml_collections
import numpy as np
from PIL import Image

from data_engine import core, synthesis
from data_engine.core import Drop
from layerjax import config_spec as spec
from layerjax.fileio import append_lines, atomic_file, read_json

GENERATED = Path('objects') / 'generated'
RECORDS = 'records.jsonl'


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.generator = {'name': 'diffusers_rgba', 'path': ''}  # a local text-to-image pipeline
  c.minimum = {}               # {category: minimum number of objects in the bank}
  c.prompts_per_call = 4       # prompts asked of the agent at a time
  c.max_attempts = 40          # generations per category and run before giving up on it
  c.median_kernel = 15         # Gen-n-Val's alpha median filter
  c.min_alpha_pixels = 64      # an object with fewer opaque pixels is dropped
  return c


def bank_counts(bank: Path) -> Counter:
  """Objects per label in the bank (labels as `synthesis.load_bank` reads them)."""
  return Counter(label for _, label in synthesis.object_files(bank))


def attempt_seed(seed: int, category: str, attempt: int) -> int:
  digest = hashlib.sha256(f'{seed}/{category}/{attempt}'.encode()).hexdigest()
  return int(digest[:8], 16)


def _check_kernel(kernel: int) -> None:
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f'the median kernel must be an odd size >= 1, got {kernel}')


# The config's keys (`default_config`).
CONFIG = spec.section({
    'generator': core.spec_rule('generator'), 'minimum': spec.mapping(spec.integer(lo=0)),
    'prompts_per_call': spec.integer(lo=1), 'max_attempts': spec.integer(lo=1),
    'median_kernel': spec.also(spec.integer(lo=1), _check_kernel),
    'min_alpha_pixels': spec.integer(lo=0)})


def median_alpha(rgba: np.ndarray, kernel: int) -> np.ndarray:
  """Gen-n-Val's median filter on alpha (isolated specks gone, outline smoothed), as on the
  8-bit PNG the paper filters: alpha quantised to 1/255, OpenCV's median blur with edges
  replicated; colour kept. `kernel` 1 leaves alpha as it is."""
  _check_kernel(kernel)
  out = np.array(rgba, np.float32)
  if kernel > 1:
    alpha = np.round(np.clip(out[..., 3], 0, 1) * 255).astype(np.uint8)
    out[..., 3] = cv2.medianBlur(alpha, kernel).astype(np.float32) / 255
  return out


def _check_rgba(x) -> str | None:
  return core.check_array((None, None, 4))(x)


class _Records:
  """The append-only attempt log; also how many attempts each category has had."""

  def __init__(self, folder: Path):
    self.path = folder / RECORDS
    self.attempts: Counter = Counter()
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          self.attempts[json.loads(line)['category']] += 1
        except (json.JSONDecodeError, KeyError, TypeError):
          continue  # a torn last line from a killed run

  def append(self, record: dict) -> None:
    append_lines(self.path, [json.dumps(record)])
    self.attempts[record['category']] += 1


def _slug(category: str) -> str:
  return ''.join(ch if ch.isalnum() else '_' for ch in category).strip('_') or 'object'


def _save_object(folder: Path, category: str, rgba: np.ndarray) -> str:
  """Writes the PNG, then its label, each atomically; returns the file name."""
  slug = _slug(category)
  folder.mkdir(parents=True, exist_ok=True)
  n = sum(1 for _ in folder.glob(f'{slug}_*.png'))
  while (folder / f'{slug}_{n:05d}.png').exists():
    n += 1
  name = f'{slug}_{n:05d}.png'
  with atomic_file(folder / name) as tmp:
    Image.fromarray(np.round(np.clip(rgba, 0, 1) * 255).astype(np.uint8), 'RGBA').save(
        tmp, format='PNG')
  labels_path = folder / 'labels.json'
  labels = read_json(labels_path) if labels_path.exists() else {}
  labels[name] = category
  with atomic_file(labels_path) as tmp:
    tmp.write_text(json.dumps(labels, indent=1, sort_keys=True) + '\n')
  return name


def generate_objects(bank, config, agent, generator=None, timeout: float | None = None) -> dict:
  """Tops up every category of `config.minimum` to its count; returns a summary.

  `config` is the engine config (its `gennval`, `seed`); `generator` defaults to the tool
  `config.gennval.generator` names. Agent answers that fail (a down endpoint, a garbage
  reply) count as failed attempts with their reason, like rejected objects.
  """
  g = config.gennval
  bank = Path(bank)
  if not bank.is_dir():
    raise FileNotFoundError(f'{bank}: no such bank directory')
  _check_kernel(g.median_kernel)  # before anything is generated
  generator = generator or core.create('generator', g.generator)
  folder = bank / GENERATED
  folder.mkdir(parents=True, exist_ok=True)
  records = _Records(folder)
  counts = bank_counts(bank)
  minimum = {str(k): int(v) for k, v in dict(g.minimum).items()}
  # The rarest categories, relative to their minimum, go first.
  order = sorted(minimum, key=lambda c: (counts[c] / max(minimum[c], 1), c))
  summary = {'kept': Counter(), 'rejected': Counter(), 'reasons': Counter()}
  for category in order:
    tries = 0
    while counts[category] < minimum[category] and tries < g.max_attempts:
      try:
        prompts = agent.write_prompts(category, g.prompts_per_call)
      except Drop as drop:
        summary['reasons'][f'write_prompts: {drop.reason}'] += 1
        tries += 1
        continue
      for prompt in prompts:
        if counts[category] >= minimum[category] or tries >= g.max_attempts:
          break
        tries += 1
        seed = attempt_seed(config.seed, category, records.attempts[category])
        record = {'category': category, 'prompt': prompt, 'seed': seed,
                  'prompt_versions': agent.prompt_versions()}
        try:
          rgba = core.call_tool('generator', lambda: generator(prompt, seed), timeout,
                                _check_rgba)
          verdict = agent.validate_object(rgba)
          record.update(score=verdict.score, reason=verdict.reason)
          if verdict.score < 0.5:
            raise Drop('invalid', verdict.reason)
          rgba = median_alpha(rgba, g.median_kernel)
          if (rgba[..., 3] > 0.5).sum() < g.min_alpha_pixels:
            raise Drop('too_small', f'fewer than {g.min_alpha_pixels} opaque pixels after '
                       'the median filter')
          record['file'] = _save_object(folder / _slug(category), category, rgba)
          counts[category] += 1
          summary['kept'][category] += 1
        except Drop as drop:
          record.update(dropped=drop.reason, detail=drop.detail)
          summary['rejected'][category] += 1
          summary['reasons'][drop.reason] += 1
        records.append(record)
  return {'counts': {c: counts[c] for c in order}, 'minimum': minimum,
          'kept': dict(summary['kept']), 'rejected': dict(summary['rejected']),
          'reasons': dict(summary['reasons']),
          'short': {c: minimum[c] - counts[c] for c in order if counts[c] < minimum[c]}}

