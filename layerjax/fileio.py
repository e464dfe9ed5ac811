"""Atomic writes: outputs appear whole under their final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _naming(dst: Path):
  """An OSError without a path (a write that found the disk full) names `dst`."""
  try:
    yield
  except OSError as e:
    if e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(dst)) from e
    raise


@contextlib.contextmanager
def atomic_dir(dst: Path):
  """Yields a temporary sibling of `dst`; on success it replaces `dst`, on failure vanishes."""
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.tmp-', dir=dst.parent))
  try:
    with _naming(dst):
      yield tmp
    if dst.exists():
      old = dst.with_name(f'.{dst.name}.old-{os.getpid()}')
      os.replace(dst, old)
      os.replace(tmp, dst)
      shutil.rmtree(old)
    else:
      os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(dst: Path):
  """Yields a temporary sibling path of `dst` to write; on success it replaces `dst`."""
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.with_name(f'.{dst.name}.tmp-{os.getpid()}')
  try:
    with _naming(dst):
      yield tmp
    os.replace(tmp, dst)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def append_lines(path: Path, lines) -> None:
  """Appends `lines` (strings without newlines) to a line log and fsyncs. A torn last line
  left by a killed writer is cut first, so the new lines start on lines of their own."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.exists():
    data = path.read_bytes()
    if data and not data.endswith(b'\n'):
      with open(path, 'r+b') as f:
        f.truncate(data.rfind(b'\n') + 1)
  with open(path, 'a') as f:
    f.writelines(line + '\n' for line in lines)
    f.flush()
    os.fsync(f.fileno())


def read_json(path: Path, error: type[Exception] = ValueError) -> Any:
  """Parsed JSON; a missing file or bad JSON raises an error naming `path`."""
  try:
    return json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: missing') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f'{path}: not valid JSON ({e})') from None
