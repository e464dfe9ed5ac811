"""Writes that never destroy what they do not own.

- `atomic_dir` / `atomic_file`: an output appears whole under its final name or not at all.
- A folder written by `atomic_dir` replaces only an empty folder or an `Artifact` of the same
  kind, and the latter only when the caller says `overwrite` (the command line's
  `--overwrite`); anything else at the destination is refused before any work is done.
- Temporary names carry the writer's host and pid (`.NAME.tmp~HOST~PID~RAND`), so `sweep`
  can remove what a killed run left behind without touching a live writer's files.
- Folders follow the umask (`os.mkdir`), not `tempfile.mkdtemp`'s 0700, so a job under
  another user can read them.
- `safe_name`: the one way an id from a file becomes a folder name.
- `output_lock`: one run at a time per output folder; the second names the first.

An output may also be a URL on an object store (`gs://`, `s3://`, any fsspec URL): paths stay
URLs (`as_path`: `etils.epath`, which reaches the store through fsspec, e.g. gcsfs). A store
writes each object whole or not at all, so a file is written locally and uploaded once; it
has no folders to rename, so a folder is filled locally and uploaded with its `Artifact`'s
markers last; it has no pids to check, so temporaries are local-only (`sweep` has nothing to
remove there) and the lock is an object created only if absent (`_object_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import fsspec
from absl import logging
from etils import epath

_HOST = re.sub(r'[^A-Za-z0-9.-]', '-', socket.gethostname()) or 'host'


class OutputError(ValueError):
  """An output that cannot be written where asked; the message names the path and why."""


class OutputLocked(OutputError):
  """Another run holds the output folder's lock."""


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A kind of output folder: `name` for messages, `test(folder)` true for one of its kind.
  `markers`: the files `test` reads; on an object store they are uploaded last, so a reader
  never takes a half-uploaded folder for a whole one."""
  name: str
  test: Callable[[Path], bool]
  markers: tuple[str, ...] = ()


# --- local paths and URLs -----------------------------------------------------------------

def is_url(path) -> bool:
  """Whether `path` names an object on a store (`gs://b/x`, `s3://b/x`), not a local file."""
  return '://' in str(path)


def as_path(path):
  """`path` as a path object: for a URL an `etils.epath.Path`, which stays a URL (`pathlib`
  makes `gs://b/x` the local folder `gs:/b/x`), else a `pathlib.Path`."""
  return epath.Path(path) if is_url(path) else Path(path)


# --- temporary names ----------------------------------------------------------------------

def _temp_name(name: str, what: str) -> str:
  return f'.{name}.{what}~{_HOST}~{os.getpid()}~{secrets.token_hex(4)}'


_TEMP = re.compile(r'^\.(?P<name>.+)\.(?P<what>tmp|old)~(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]+$')
# Names earlier versions used (mkdtemp's `.NAME.tmp-<random>`, `.NAME.old-PID`): never data.
_LEGACY = re.compile(r'^\..+\.(tmp|old)-[^/]+$')


def is_temporary(name: str) -> bool:
  """Whether a folder entry is a writer's temporary (never a sample, never an output)."""
  return bool(_TEMP.match(name) or _LEGACY.match(name))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def sweep(folder, name: str | None = None) -> list[Path]:
  """Removes the temporaries in `folder` (those for `name` only, if given) that a dead process
  on this host left; returns what it removed. A `.old` folder is the previous version of an
  artifact swapped out by a killed writer: it goes back in place if the new one never
  arrived. Other hosts' temporaries are left alone: their writers may be alive. On an object
  store there are none (writers keep their temporaries on the local disk)."""
  removed = []
  if is_url(folder):
    return removed
  folder = Path(folder)
  try:
    entries = list(folder.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return removed
  for path in entries:
    m = _TEMP.match(path.name)
    if (not m or (name is not None and m['name'] != name) or m['host'] != _HOST
        or _alive(int(m['pid']))):
      continue
    final = folder / m['name']
    if m['what'] == 'old' and not final.exists():
      os.replace(path, final)
      logging.warning('%s: restored from %s, left by a killed writer', final, path.name)
      continue
    if path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)
    removed.append(path)
  if removed:
    logging.info('%s: removed %d temporaries of killed runs', folder, len(removed))
  return removed


# --- destinations -------------------------------------------------------------------------

def check_destination(dst, artifact: Artifact, overwrite: bool = False,
                      flag: str = '--overwrite') -> None:
  """Raises `OutputError` unless `dst` is absent, an empty folder, or (with `overwrite`) an
  `artifact` of the same kind. `flag` is what the message tells the user to pass."""
  dst = as_path(dst)
  if dst.exists() and not dst.is_dir():
    raise OutputError(f'{dst}: is a file, not a {artifact.name}')
  for parent in [] if is_url(dst) else dst.parents:  # a store has no folders to be in the way
    if parent.exists() and not parent.is_dir():
      raise OutputError(f'{dst}: {parent} is a file, not a folder')
    if parent.exists():
      break
  if not dst.exists():
    return
  if not any(dst.iterdir()):
    return
  if not artifact.test(dst):
    held = sorted(p.name for p in dst.iterdir())
    shown = ', '.join(held[:5]) + (', ...' if len(held) > 5 else '')
    raise OutputError(f'{dst}: exists and is not a {artifact.name} (it holds {shown}); '
                      f'refusing to replace it: name a new or empty folder')
  if not overwrite:
    raise OutputError(f'{dst}: a {artifact.name} is already there; pass {flag} to replace it')


def check_file(dst, overwrite: bool = False, flag: str = '--overwrite') -> None:
  """Raises `OutputError` if the file `dst` exists and `overwrite` is not set."""
  if as_path(dst).exists() and not overwrite:
    raise OutputError(f'{dst}: exists; pass {flag} to replace it')


def check_not_inside(src, dst) -> None:
  """Refuses a destination equal to, inside, or containing the source folder."""
  s, d = Path(src).resolve(), Path(dst).resolve()
  if d == s or d.is_relative_to(s) or s.is_relative_to(d):
    raise OutputError(f'{dst}: the destination must not be, contain or lie inside the source '
                      f'{src}')


def _mkdir(folder: Path) -> None:
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise OutputError(f'{folder}: a file is in the way of this folder') from None


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
def atomic_dir(dst, artifact: Artifact, overwrite: bool = False, flag: str = '--overwrite'):
  """Yields a temporary sibling of `dst` to fill; on success it becomes `dst`, on failure it
  vanishes. `dst` may be absent or an empty folder; an `artifact` of the same kind is replaced
  only with `overwrite`, anything else is refused (`check_destination`, before the body runs
  and again before the swap)."""
  dst = as_path(dst)
  check_destination(dst, artifact, overwrite, flag)
  if is_url(dst):
    with tempfile.TemporaryDirectory(prefix=f'.{dst.name}.tmp~') as tmp, _naming(dst):
      yield Path(tmp)
      check_destination(dst, artifact, overwrite, flag)
      _upload_folder(Path(tmp), dst, artifact.markers)
    return
  _mkdir(dst.parent)
  sweep(dst.parent, dst.name)
  tmp = dst.parent / _temp_name(dst.name, 'tmp')
  tmp.mkdir()
  try:
    with _naming(dst):
      yield tmp
    check_destination(dst, artifact, overwrite, flag)
    if dst.exists() and any(dst.iterdir()):
      old = dst.parent / _temp_name(dst.name, 'old')
      os.replace(dst, old)
      os.replace(tmp, dst)
      shutil.rmtree(old)
    else:
      os.replace(tmp, dst)  # rename(2) also replaces an empty folder
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(dst):
  """Yields a temporary sibling path of `dst` to write; on success it replaces `dst`. For a
  URL the temporary is a local file, uploaded whole: the object is replaced in one write."""
  dst = as_path(dst)
  if dst.is_dir():
    raise OutputError(f'{dst}: is a folder, not a file')
  if is_url(dst):
    with tempfile.TemporaryDirectory() as tmp, _naming(dst):
      yield Path(tmp) / dst.name
      _upload(Path(tmp) / dst.name, dst)
    return
  _mkdir(dst.parent)
  tmp = dst.parent / _temp_name(dst.name, 'tmp')
  try:
    with _naming(dst):
      yield tmp
    os.replace(tmp, dst)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _upload(src: Path, dst) -> None:
  """The local file `src` becomes the object `dst`, which appears (or is replaced) whole."""
  fs, path = fsspec.core.url_to_fs(str(dst))
  fs.put_file(str(src), path)


def _upload_folder(src: Path, dst, markers: tuple[str, ...]) -> None:
  """The objects under the URL `dst` become the files of the local folder `src`. A store has
  no folder rename: the old markers go first, then the old objects, then the new files, the
  new markers last. A crash on the way leaves `dst` without markers, so no reader takes it
  for a whole artifact; the next run rebuilds it."""
  for name in markers:
    (dst / name).unlink(missing_ok=True)
  if dst.exists():
    dst.rmtree()
  files = sorted(p.relative_to(src).as_posix() for p in src.rglob('*') if p.is_file())
  for rel in sorted(files, key=lambda rel: rel in markers):  # stable: markers last
    _upload(src / rel, dst / rel)


# --- names from ids -----------------------------------------------------------------------

_PLAIN = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,99}')


def safe_name(identifier: str) -> str:
  """The folder name for an id read from a file: the id itself when it is a plain name
  (letters, digits, '.', '_', '-'; not starting with '.' or '-'; at most 100 characters),
  else its plain characters, '~' and a hash of the whole id. No plain name holds a '~', so
  different ids never share a folder, and no id names a path outside its parent folder."""
  if not isinstance(identifier, str):
    raise TypeError(f'an id must be a string, got {type(identifier).__name__}')
  if _PLAIN.fullmatch(identifier):
    return identifier
  stem = re.sub(r'[^A-Za-z0-9._-]+', '_', identifier).lstrip('._-')[:64] or 'id'
  digest = hashlib.sha256(identifier.encode('utf-8', 'surrogatepass')).hexdigest()[:16]
  return f'{stem}~{digest}'


def inside(folder, rel: str) -> Path:
  """`folder / rel` for a relative path read from a file, refused (ValueError) if it is
  absolute or leads out of `folder`, through '..' or a symbolic link."""
  if not isinstance(rel, str) or not rel:
    raise ValueError(f'{rel!r} is not a relative file path')
  if rel.startswith(('/', '\\')) or re.match(r'^[A-Za-z]:', rel) or '\\' in rel:
    raise ValueError(f'{rel!r} is not a relative path inside {folder}')
  path = Path(folder) / rel
  if '..' in Path(rel).parts or not path.resolve().is_relative_to(Path(folder).resolve()):
    raise ValueError(f'{rel!r} leads outside {folder}')
  return path


# --- one run per output -------------------------------------------------------------------

LOCK = '.lock'


def _holder(data: bytes) -> dict:
  try:
    holder = json.loads(data or b'{}')
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _locked(folder, name: str, holder: dict, also: str = '') -> OutputLocked:
  what = folder if name == LOCK else folder / name[1:-len(LOCK)]
  return OutputLocked(
      f'{what}: in use by another run ({holder.get("command", "?")!r}, pid '
      f'{holder.get("pid", "?")} on {holder.get("host", "?")} since '
      f'{holder.get("started", "?")}); wait for it to finish{also}')


@contextlib.contextmanager
def output_lock(folder, command: str | None = None, name: str = LOCK):
  """Holds `folder/.lock` (or `folder/name`) while a run writes into `folder`; a second run
  refuses, naming the holder. The lock is the kernel's (`flock`), so it dies with its
  process: a killed run leaves no lock to remove by hand. The file is removed on release, so
  a run leaves none. On an object store, see `_object_lock`."""
  me = json.dumps({'host': _HOST, 'pid': os.getpid(),
                   'command': command or ' '.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                   'started': datetime.datetime.now().isoformat(timespec='seconds')}) + '\n'
  if is_url(folder):
    with _object_lock(as_path(folder), name, me.encode()):
      yield
    return
  folder = Path(folder)
  _mkdir(folder)
  lock = folder / name
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(os.read(fd, 4096))
      os.close(fd)
      raise _locked(folder, name, holder) from None
    try:
      if os.stat(lock).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)  # the holder removed this file as we opened it: lock the new one
  os.ftruncate(fd, 0)
  os.pwrite(fd, me.encode(), 0)
  try:
    yield
  finally:
    lock.unlink(missing_ok=True)  # before unlocking, so no one locks a file about to vanish
    os.close(fd)


@contextlib.contextmanager
def _object_lock(folder, name: str, me: bytes):
  """The lock on an object store: an object created only if absent (fsspec's
  `pipe_file(mode='create')`; on GCS gcsfs sends `ifGenerationMatch=0`, which the store
  applies atomically, so of two runs exactly one creates it). Where a store's fsspec class
  keeps fsspec's default `pipe_file` (check, then write), two runs starting at the same
  instant may both go on. Nothing ties the lock to its process: a run that exits, fails or
  is stopped by SIGTERM removes it, but a killed one (SIGKILL, a lost machine) leaves it.
  Such a lock is taken over when it names this host and a pid no longer alive (two runs
  taking it over at the same instant may both go on); one left on another host is refused
  like a live one, the message naming the object to remove once that run is known dead."""
  lock = folder / name
  fs, path = fsspec.core.url_to_fs(str(lock))
  for _ in range(3):
    try:
      fs.pipe_file(path, me, mode='create')
      break
    except FileExistsError:
      try:
        holder = _holder(fs.cat_file(path))
      except FileNotFoundError:
        continue  # released as we looked
      pid = holder.get('pid')
      if holder.get('host') != _HOST or not isinstance(pid, int) or _alive(pid):
        raise _locked(folder, name, holder,
                      f'; if that run was killed, remove {lock}') from None
      fs.rm_file(path)
      logging.warning('%s: removed the lock of a killed run (pid %d)', lock, pid)
  else:
    raise OutputLocked(f'{lock}: taken and released by other runs as this one started; '
                       'start it again')
  try:
    yield
  finally:
    fs.rm_file(path)


# --- line logs and JSON -------------------------------------------------------------------

def append_lines(path: Path, lines) -> None:
  """Appends `lines` (strings without newlines) to a line log and fsyncs. A torn last line
  left by a killed writer is cut first, so the new lines start on lines of their own."""
  path = Path(path)
  _mkdir(path.parent)
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
    return json.loads(as_path(path).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: missing') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f'{path}: not valid JSON ({e})') from None


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-serialisable parts (configs, file listings)."""
  text = json.dumps(parts, sort_keys=True, default=str, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_stats(folder) -> list:
  """(relative path, size, mtime_ns) of every file under `folder` (or of `folder` itself, a
  file), sorted, temporaries and locks left out: what a fingerprint of the folder's content
  rests on (as make's mtimes)."""
  folder = Path(folder)
  if folder.is_file():
    st = folder.stat()
    return [[folder.name, st.st_size, st.st_mtime_ns]]
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not is_temporary(d))
    for name in sorted(files):
      if is_temporary(name) or name == LOCK:
        continue
      st = os.stat(os.path.join(root, name))
      out.append([os.path.relpath(os.path.join(root, name), folder), st.st_size,
                  st.st_mtime_ns])
  return out
