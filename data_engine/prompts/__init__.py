"""Versioned system prompts of the LLM agent: `<root>/<task>/v<n>.txt`, one file per version.

A version is never overwritten: the self-refining loop (Gen-n-Val / IAA) saves each accepted
rewrite as the next version, and every answer records the version that produced it, so a
sample judged under `judge/v3` can always be traced to that exact text. The prompts shipped
with the engine live next to this file (`DEFAULT_DIR`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent
_TASK = re.compile(r'[a-z][a-z0-9_]*')
_VERSION = re.compile(r'v([1-9][0-9]*)')


class PromptStore:

  def __init__(self, root: str | Path = DEFAULT_DIR):
    self.root = Path(root)

  def _folder(self, task: str) -> Path:
    if not _TASK.fullmatch(task):  # a task names a folder: no paths, no dots
      raise ValueError(f'prompt store {self.root}: bad task name {task!r}')
    return self.root / task

  def versions(self, task: str) -> list[str]:
    """The task's versions, oldest first."""
    found = (_VERSION.fullmatch(p.stem) for p in self._folder(task).glob('v*.txt'))
    return [f'v{n}' for n in sorted(int(m.group(1)) for m in found if m)]

  def latest(self, task: str) -> str:
    versions = self.versions(task)
    if not versions:
      raise FileNotFoundError(f'prompt store {self.root}: no prompt for task {task!r} '
                              f'(expected {self._folder(task)}/v1.txt)')
    return versions[-1]

  def load(self, task: str, version: str | None = None) -> tuple[str, str]:
    """(text, version) of `version`, or of the latest one when None."""
    version = version or self.latest(task)
    if not _VERSION.fullmatch(version):
      raise ValueError(f'prompt store {self.root}: bad version {version!r} for {task!r} '
                       f'(versions look like v1, v2, ...)')
    path = self._folder(task) / f'{version}.txt'
    if not path.is_file():
      raise FileNotFoundError(f'prompt store {self.root}: no {path} (versions of {task!r}: '
                              f'{self.versions(task)})')
    return path.read_text(), version

  def save(self, task: str, text: str) -> str:
    """Stores `text` as the task's next version and returns its id. The file appears whole
    (written to a temporary file, then hard-linked under its name, which fails rather than
    replace a version another writer created meanwhile)."""
    if not text.strip():
      raise ValueError(f'prompt store {self.root}: empty prompt for {task!r}')
    folder = self._folder(task)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.txt', dir=folder)
    try:
      with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      while True:
        versions = self.versions(task)
        version = f'v{int(versions[-1][1:]) + 1 if versions else 1}'
        try:
          os.link(tmp, folder / f'{version}.txt')
          return version
        except FileExistsError:
          continue  # another writer took this number: take the next
    finally:
      os.unlink(tmp)
