"""Judges: who answers the relations about a photo (`relations`), batched, never raising.

Both judges answer `answer(photo, relations, labels) -> list[str]`: one answer per relation,
'yes' / 'no', the front object's layer name for in_front, or 'unknown' when there is none;
`counts` (a Counter) says why answers are missing and how many were asked or cached.

`GroundTruthJudge` is the offline judge for synthetic scenes: it reads the relations from the
scene's ground-truth `LayeredSample` (found by the photo's pixels), so the reward loop runs
and is testable without a model. `AgentJudge` asks an engine agent with a `relate` method (the
LLM agent: an OpenAI-compatible endpoint or a local VLM) in one request per photo, checks each
answer against the question's choices, and caches valid answers by (photo, question).

The agent sees the points marked in the photo (a numbered ring around each, its centre the
point) rather than as coordinates: the agent shrinks photos before sending them and VLMs do
not share one coordinate convention (absolute pixels, 0-1000, none), while a visible mark
survives resizing and is what VLMs locate reliably (Set-of-Mark prompting). The ring leaves
the point itself unpainted. The cache keys on the question with coordinates, which does not
depend on how a batch numbered its marks.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping, MutableMapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_engine.core import Drop
from layerjax.data.schema import LayeredSample, to_uint8
from layerjax.reward.relations import (UNKNOWN, Relation, Thresholds, answers, choices,
                                       question, read)

log = logging.getLogger(__name__)


def image_key(photo: np.ndarray) -> str:
  """The photo's identity: SHA-256 of its shape and 8-bit pixels (what any file of it holds,
  so the same photo loaded twice, or from a PNG, has one key)."""
  photo = np.asarray(photo)
  digest = hashlib.sha256(repr(photo.shape).encode())
  digest.update(to_uint8(photo).tobytes())
  return digest.hexdigest()


class GroundTruthJudge:
  """Answers from the ground truth of the `samples` whose image is the photo; relations name
  that sample's object layers. A photo without ground truth, or an object it lacks, gets
  'unknown' (counted as 'no_ground_truth' / 'no_such_object')."""

  def __init__(self, samples: Iterable[LayeredSample], thresholds: Thresholds):
    self.thresholds = thresholds
    self.truth: dict[str, LayeredSample] = {}
    self.counts: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    self.add(samples)

  def add(self, samples: Iterable[LayeredSample]) -> None:
    """More scenes whose ground truth it reads (a finetuning run adds each photo's as the
    photo stream gives it)."""
    self.truth.update({image_key(s.image): s for s in samples})

  def answer(self, photo: np.ndarray, relations: Sequence[Relation],
             labels: Mapping[str, str]) -> list[str]:
    truth = self.truth.get(image_key(photo))
    counts: collections.Counter = collections.Counter()
    out = []
    for rel in relations:
      try:
        out.append(UNKNOWN if truth is None else read(truth, rel, self.thresholds))
      except KeyError:
        counts['no_such_object'] += 1
        out.append(UNKNOWN)
    if truth is None:
      counts['no_ground_truth'] += len(relations)
    counts['answered'] += sum(a != UNKNOWN for a in out)
    with self._lock:  # judging threads answer at once
      self.counts.update(counts)
    return out


class JsonlCache(MutableMapping):
  """A dict (image key, question) -> answer kept in a JSON-lines file, one
  {"image", "question", "answer"} per line, appended on each new answer so an interrupted run
  keeps what it paid for. A last line cut short by a crash is skipped; any other bad line is
  an error naming the file and line."""

  def __init__(self, path):
    self.path = Path(path)
    self._data: dict[tuple[str, str], str] = {}
    self._lock = threading.Lock()
    lines = self.path.read_text().split('\n') if self.path.exists() else []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        key, value = (entry['image'], entry['question']), entry['answer']
        if not all(isinstance(v, str) for v in (*key, value)):
          raise TypeError('image, question and answer must be strings')
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        if number == len(lines):  # no newline after it: a write cut short
          log.warning('%s: skipping the unfinished last line (%s)', self.path, e)
          continue
        raise ValueError(f'{self.path}: line {number} is not a cache entry ({e})') from None
      self._data[key] = value

  def __getitem__(self, key: tuple[str, str]) -> str:
    return self._data[key]

  def __setitem__(self, key: tuple[str, str], value: str) -> None:
    line = json.dumps({'image': key[0], 'question': key[1], 'answer': value})
    with self._lock:  # judging threads write at once: whole lines, one at a time
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self.path.open('a') as f:
        f.write(line + '\n')
      self._data[key] = value

  def __delitem__(self, key: tuple[str, str]) -> None:
    raise TypeError(f'{self.path}: cache entries are never removed (the file is a log)')

  def __iter__(self) -> Iterator[tuple[str, str]]:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)


def mark_points(photo: np.ndarray, points: Sequence[tuple[int, int]]) -> np.ndarray:
  """The photo with a numbered ring around each point (1, 2, ... in order): white on a black
  outline, so it shows on any colour; the ring's radius grows with the photo, so it stays
  visible after the agent shrinks it, and the point itself keeps its colour."""
  h, w = photo.shape[:2]
  radius = max(3, round(max(h, w) / 48))
  image = Image.fromarray(to_uint8(photo[..., :3]))
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=max(8, 2 * radius))
  for k, (x, y) in enumerate(points, 1):
    box = (x - radius, y - radius, x + radius, y + radius)
    draw.ellipse(box, outline=(0, 0, 0), width=max(2, radius // 3))
    draw.ellipse(box, outline=(255, 255, 255), width=max(1, radius // 6))
    draw.text((x + radius, y - 2 * radius), str(k), fill=(255, 255, 255), font=font,
              stroke_width=1, stroke_fill=(0, 0, 0))
  return np.asarray(image, np.float32) / 255


class AgentJudge:
  """Asks `agent.relate(photo, questions, choices)` once per `answer` for the questions not in
  `cache` (a mapping (image key, question) -> the chosen answer; a `JsonlCache` persists it).
  An answer that is not one of its choices (case and a final full stop aside) is 'unknown'
  ('invalid_answer'); a request the agent layer drops (`Drop`: timeout, garbage, server
  errors) makes all its questions 'unknown', counted under the drop's reason. An in_front
  question between two objects with one label cannot be told apart: 'unknown'
  ('same_label'), not asked."""

  def __init__(self, agent, cache: MutableMapping | None = None):
    if not callable(getattr(agent, 'relate', None)):
      raise ValueError(f'AgentJudge: agent {type(agent).__name__} has no relate method (the '
                       f'llm agent has one; offline, use GroundTruthJudge)')
    self.agent = agent
    self.cache = {} if cache is None else cache
    self.counts: collections.Counter = collections.Counter()
    self._lock = threading.Lock()

  def answer(self, photo: np.ndarray, relations: Sequence[Relation],
             labels: Mapping[str, str]) -> list[str]:
    """Thread-safe: a trainer judges several photos at once (the counts are merged under a
    lock; each cache write is one appended line)."""
    counts: collections.Counter = collections.Counter()
    try:
      return self._answer(photo, relations, labels, counts)
    finally:
      with self._lock:
        self.counts.update(counts)

  def _answer(self, photo, relations, labels, counts) -> list[str]:
    key = image_key(photo)
    out = [UNKNOWN] * len(relations)
    texts = [question(rel, labels) for rel in relations]
    asked: dict[str, list[int]] = {}  # question -> relations it answers (asked once)
    for i, (rel, text) in enumerate(zip(relations, texts)):
      options = choices(rel, labels)
      if len({c.casefold() for c in options}) < len(options):
        counts['same_label'] += 1
      elif self.cache.get((key, text)) in options:  # anything else there is asked again
        counts['cached'] += 1
        out[i] = self._canonical(rel, options, self.cache[(key, text)])
      else:
        asked.setdefault(text, []).append(i)
    if not asked:
      return out
    firsts = [relations[ids[0]] for ids in asked.values()]
    points = list(dict.fromkeys(rel.point for rel in firsts if rel.point is not None))
    marks = {p: str(k) for k, p in enumerate(points, 1)}
    sent = [question(rel, labels, marks.get(rel.point)) for rel in firsts]
    counts['requests'] += 1
    counts['questions'] += len(sent)
    try:
      replies = self.agent.relate(mark_points(photo, points), sent,
                                  [list(choices(rel, labels)) for rel in firsts])
    except Drop as drop:
      log.warning('judge request of %d questions dropped: %s', len(sent), drop)
      counts[drop.reason] += len(sent)
      return out
    if len(replies) != len(sent):
      log.warning('judge: %d answers to %d questions', len(replies), len(sent))
      counts['agent_garbage'] += len(sent)
      return out
    for (text, ids), rel, reply in zip(asked.items(), firsts, replies):
      options = choices(rel, labels)
      picked = {c.casefold(): c for c in options}.get(reply.strip().rstrip('.').casefold())
      if picked is None:
        counts['invalid_answer'] += 1
        continue
      self.cache[(key, text)] = picked
      counts['answered'] += 1
      for i in ids:
        out[i] = self._canonical(relations[i], options, picked)
    return out

  @staticmethod
  def _canonical(rel: Relation, options: tuple[str, ...], picked: str) -> str:
    return answers(rel)[options.index(picked)]
