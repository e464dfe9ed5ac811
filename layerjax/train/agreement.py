"""Start-up agreement of a multi-process run: every process runs the same code and config.

The code is identified by a SHA-256 of the `layerjax` package's Python sources (paths and
contents): the same for a git checkout and an installed copy of one commit, and different
for uncommitted edits, which a commit hash would miss. The config by a SHA-256 of its
resolved values (`to_dict`, keys sorted). Processes compare them through one all-gather
(`multihost_utils.process_allgather`), so a mismatch is the same one-line error on every
process, naming the processes that differ from process 0, before any weight is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

_PACKAGE = Path(__file__).resolve().parents[1]


class ProcessesDisagree(ValueError):
  pass


def code_digest(package: Path = _PACKAGE) -> bytes:
  """SHA-256 of every `.py` file under `package`: relative path and contents."""
  h = hashlib.sha256()
  for path in sorted(package.rglob('*.py')):
    h.update(path.relative_to(package).as_posix().encode() + b'\0')
    h.update(hashlib.sha256(path.read_bytes()).digest())
  return h.digest()


def config_digest(config) -> bytes:
  return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=repr)
                        .encode()).digest()


def disagreement(digests: np.ndarray) -> str | None:
  """The problem in `digests` [process, (code, config), 32 bytes], one line; None if all
  processes agree with process 0."""
  problems = []
  for what, k, fix in (('code', 0, 'install the same commit on every worker'),
                       ('config', 1, 'pass the same config and flags to every process')):
    ref = bytes(digests[0, k]).hex()[:12]
    differ = [p for p in range(1, len(digests)) if not np.array_equal(digests[p, k],
                                                                      digests[0, k])]
    if differ:
      theirs = ', '.join(f'process {p}: {bytes(digests[p, k]).hex()[:12]}' for p in differ)
      problems.append(f'{what} differs from process 0 ({ref}) on {theirs}: {fix}')
  if not problems:
    return None
  return (f'the {len(digests)} processes disagree: ' + '; '.join(problems) +
          ' (code: sha256 of the layerjax sources; config: sha256 of the resolved config)')


def check(config) -> None:
  """Raises `ProcessesDisagree` on every process unless all run the same code and config."""
  if jax.process_count() == 1:
    return
  mine = np.frombuffer(code_digest() + config_digest(config), np.uint8).reshape(2, 32)
  # int32: what every collectives backend all-gathers.
  digests = np.asarray(multihost_utils.process_allgather(mine.astype(np.int32)))
  problem = disagreement(digests.astype(np.uint8))
  if problem:
    raise ProcessesDisagree(problem)
