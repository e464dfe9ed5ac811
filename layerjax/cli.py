"""What every command line shares: one line per error on stderr, and quiet libraries.

    @cli.entry                      # an argparse CLI: parser = cli.ArgumentParser(...)
    def main(argv=None) -> int: ...

    cli.run_absl(main)              # an absl app (layerjax.main, layerjax.demo)

An error prints `error: <file or key>: <problem>` on one line and exits 2 for bad input
(a bad argument, flag, config key or value, a missing or unreadable input: `ValueError` and
the path errors of `OSError`), 1 for anything else (a disk that fills up, a training run
stopped by a non-finite loss, a bug). The traceback is printed only with `--verbose` (absl
apps: `-v 1` or higher). An absl app logs this project's progress and results on the
terminal; the INFO logs of libraries (orbax, tfds, jax) and this project's details (records
logged with `extra=DETAIL`: every metric of every step) go to the run's log file
(`log_file`), and to the terminal too at `-v 1`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

from layerjax import config_spec

BAD_INPUT, FAILED = 2, 1
# OSErrors about the paths given (bad input), unlike a disk that fills up or fails.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# Packages whose INFO logs are this project's progress and results.
_OWN = tuple(str(Path(__file__).resolve().parents[1] / p) for p in ('layerjax', 'data_engine'))


DETAIL = {'detail': True}  # `logging.info(..., extra=DETAIL)`: for the log file, not the terminal


class UsageError(ValueError):
  """A command line that does not parse."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line usage errors and `--verbose` (subcommands get both)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # SUPPRESS: a subcommand's default does not undo a --verbose given before it.
    self.add_argument('--verbose', action='store_true', default=argparse.SUPPRESS,
                      help='print the traceback of an error')

  def error(self, message):
    raise UsageError(f'{self.prog}: {message}')


def int_at_least(lo: int) -> Callable[[str], int]:
  """An argparse type: an int >= `lo`, else one line naming the argument and the value."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < lo:
      raise argparse.ArgumentTypeError(f'expected an int >= {lo}, got {text!r}')
    return value
  return parse


def spec(text: str):
  """An argparse type: a data-engine tool or agent, by its registered name or as a JSON
  object with `name` and its arguments."""
  if text.lstrip().startswith('{'):
    try:
      return json.loads(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(f'not a JSON object ({e})') from None
  return text


def message(e: BaseException) -> str:
  """`e` as one line: an OSError names its path; a multi-line message is joined."""
  if isinstance(e, OSError) and e.errno is not None and e.strerror:
    problem = (f'disk full ({e.strerror})' if e.errno == errno.ENOSPC else e.strerror)
    return f'{e.filename}: {problem}' if e.filename is not None else problem
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def exit_code(e: BaseException) -> int:
  return BAD_INPUT if isinstance(e, (ValueError, *_PATH_ERRORS)) else FAILED


def run(fn: Callable[[], int | None], verbose: bool, how: str = '--verbose') -> int:
  """`fn()`'s exit code; an exception becomes one line on stderr and its exit code (and
  the traceback before it if `verbose`; an unexpected error says `how` to get it)."""
  try:
    return fn() or 0
  except Exception as e:  # pylint: disable=broad-except  # every error ends here, once
    if verbose:
      traceback.print_exc()
    code = exit_code(e)
    text = message(e)
    if code == FAILED and not isinstance(e, (OSError, FloatingPointError)):
      text = f'{type(e).__name__}: {text} ({how} prints the traceback)'
    print(f'error: {text}', file=sys.stderr)
    return code


def entry(main: Callable[[list[str]], int | None]) -> Callable[..., int]:
  """An argparse CLI's `main(argv)` with one-line errors; `--verbose` in argv adds the
  traceback."""
  @functools.wraps(main)
  def wrapped(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(lambda: main(argv), '--verbose' in argv)
  return wrapped


class _OwnInfo(logging.Filter):
  """Warnings and errors from anywhere, INFO and below only from this project and not its
  details."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or (record.pathname.startswith(_OWN) and
                                                 not getattr(record, 'detail', False))


def log_file(path) -> Path | None:
  """From now on, every log record at INFO and above (libraries' included) is appended to
  `path` as well, in absl's format; returns the path. Only for a local `path`: on an object
  store (`gs://`), nothing (a log is appended line by line; an object is written whole)."""
  if '://' in str(path):
    return None
  from absl import logging as absl_logging
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(path, encoding='utf-8')
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  root = logging.getLogger()
  root.addHandler(handler)
  # absl's verbosity sets the absl logger's level; the root's (WARNING) would drop the
  # libraries' INFO records (jax, orbax through the standard logging) before any handler.
  root.setLevel(min(root.level, logging.INFO))
  return path


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line for an absl flag that does not parse, naming the flag."""
  from absl import flags
  text = str(e)
  if isinstance(e, AttributeError) and isinstance(e.__context__, KeyError):
    # ml_collections' "'name'\nDid you mean "other" instead of "name"?" for an unknown key
    # in a --config.a.b=value override
    text = str(e.__context__.args[0])
    name = re.match(r"'([^']*)'", text)
    name = name.group(1) if name else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    flag = next((a.split('=')[0] for a in argv
                 if a.startswith('--') and name in a.split('=')[0][2:].split('.')[1:]), '--')
    return (f'{flag}: unknown key {name!r}' +
            (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
  flag_text = re.match(r'flag (--[^=\s]+)=', text)
  if 'Traceback (most recent call last)' in text:  # an error in a config file's get_config
    last = [line for line in text.splitlines() if line.strip()][-1]
    inner = re.sub(r'^[\w.]+(Error|Exception): ', '', last.strip())
    return f'{text.split(": ", 1)[0].removeprefix("flag ")}: {inner}'
  if flag_text and isinstance(e, flags.IllegalFlagValueError) and '.' in flag_text.group(1):
    # a --config.key=value whose value does not parse as the key's type
    name = flag_text.group(1)
    root, *path = name[2:].split('.')
    try:
      node = flags.FLAGS[root].value
      for part in path:
        node = node[part]
      value = next(a.split('=', 1)[1] for a in argv if a.startswith(name + '='))
    except (KeyError, AttributeError, TypeError, StopIteration):  # not a config field after all
      pass
    else:
      return f'{name}: expected {config_spec.type_name(node)}, got {value!r}'
  return message(e).removeprefix('flag ')


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError) as e:
    print(f'error: {_flag_error(e, argv)}', file=sys.stderr)
    sys.exit(BAD_INPUT)
  for name in flags.FLAGS:  # a config file that failed to load raises only when read
    try:
      getattr(flags.FLAGS[name].value, 'keys', None)
    except OSError as e:  # ml_collections: 'Failed loading config file ... [Errno 2] ...'
      last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      print(f'error: --{name}: {last}', file=sys.stderr)
      sys.exit(BAD_INPUT)
  return rest


def define_config_file(default: str | None, help: str, **kwargs):
  """`config_flags.DEFINE_config_file('config', default, help)`. A default is loaded, with
  the command line's `--config.*` overrides, as the flag is defined (at import), so a bad
  override fails there: one line and exit 2 here, as `run_absl` does for the other flags."""
  from absl import flags
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file('config', default, help, **kwargs)
  except (flags.Error, ValueError, AttributeError) as e:
    print(f'error: {_flag_error(e, sys.argv)}', file=sys.stderr)
    sys.exit(BAD_INPUT)


def run_absl(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)`, with one-line errors: a bad flag or config exits 2 naming it; an
  error in `main` is one line (with the traceback and the libraries' INFO logs at -v 1)."""
  from absl import app
  from absl import logging as absl_logging

  def wrapped(argv):
    verbose = absl_logging.get_verbosity() >= 1
    if not verbose:
      absl_logging.get_absl_handler().addFilter(_OwnInfo())
    return run(lambda: main(argv), verbose, how='-v 1')
  app.run(wrapped, flags_parser=_parse_flags)
