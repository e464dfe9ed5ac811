"""Declarative config checks, run before any work starts.

A spec states each key's type and range (`integer(lo=1)`, `number(0, 1)`, `string(choices)`,
`seq(...)`, `mapping(...)`, `section({...})`); `check(config, spec)` walks a config against
it and raises one `ConfigError` line naming the key and the problem: an unknown key with the
nearest known names, a wrong type with the expected one, a value out of range. Checks that
need code (`also(rule, fn)`) reuse the functions that own them. `parse_arg` reads the
`file.py:variant,key=value` arguments of the files in configs/ with the same errors.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Callable, Iterable

import ml_collections

Rule = Callable[[Any, str], None]  # rule(value, key) raises ConfigError or returns


class ConfigError(ValueError):
  """A config value is missing, unknown, of the wrong type or out of range."""


def _join(key: str, name) -> str:
  return f'{key}.{name}' if key else str(name)


def unknown(key: str, name: str, known: Iterable[str]) -> ConfigError:
  """The error for `name`, not among `known`, naming the nearest known ones."""
  known = sorted(map(str, known))
  close = difflib.get_close_matches(str(name), known, n=3)
  hint = (f'did you mean {" or ".join(map(repr, close))}?' if close
          else f'known: {", ".join(known) or "none"}')
  return ConfigError(f'{key + ": " if key else ""}unknown key {str(name)!r} ({hint})')


def type_name(value) -> str:
  """How an error names the type of a default value ('an int', 'a number', ...)."""
  if isinstance(value, bool):
    return 'True or False'
  if _is_mapping(value):
    return 'a mapping'
  return {int: 'an int', float: 'a number', str: 'a string', tuple: 'a sequence',
          list: 'a sequence'}.get(type(value), f'a {type(value).__name__}')


def _fail(key: str, want: str, value) -> ConfigError:
  return ConfigError(f'{key}: expected {want}, got {value!r}')


def _is_mapping(value) -> bool:
  return isinstance(value, (dict, ml_collections.ConfigDict))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _bounds(lo, hi, above) -> str:
  if lo is not None and hi is not None:
    return f' in [{lo}, {hi}]'
  return ''.join(f' {op} {v}' for op, v in (('>=', lo), ('<=', hi), ('>', above))
                 if v is not None)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  want = 'an int' + _bounds(lo, hi, None)

  def rule(value, key):
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
      raise _fail(key, want, value)
  return rule


def number(lo: float | None = None, hi: float | None = None,
           above: float | None = None) -> Rule:
  want = 'a number' + _bounds(lo, hi, above)

  def rule(value, key):
    if (not (_is_int(value) or isinstance(value, float)) or value != value
        or (lo is not None and value < lo) or (hi is not None and value > hi)
        or (above is not None and value <= above)):
      raise _fail(key, want, value)
  return rule


def boolean() -> Rule:
  def rule(value, key):
    if not isinstance(value, bool):
      raise _fail(key, 'True or False', value)
  return rule


def string(choices: Iterable[str] | Callable[[], Iterable[str]] | None = None) -> Rule:
  """A string; with `choices` (or a function giving them, read when checking) one of them."""
  def rule(value, key):
    names = sorted(choices() if callable(choices) else choices) if choices is not None else None
    if not isinstance(value, str):
      raise _fail(key, f'one of {names}' if names else 'a string', value)
    if names is not None and value not in names:
      close = difflib.get_close_matches(value, names, n=1)
      hint = f'; did you mean {close[0]!r}?' if close else ''
      raise ConfigError(f'{key}: {value!r} is not one of {names}{hint}')
  return rule


def anything() -> Rule:
  return lambda value, key: None


def maybe(inner: Rule) -> Rule:
  """None, or what `inner` accepts."""
  def rule(value, key):
    if value is not None:
      inner(value, key)
  return rule


def seq(item: Rule, length: int | None = None) -> Rule:
  """A list or tuple (of `length` items if given), each checked by `item`."""
  want = f'a sequence of {length}' if length is not None else 'a sequence'

  def rule(value, key):
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
      raise _fail(key, want, value)
    for i, v in enumerate(value):
      item(v, f'{key}[{i}]')
  return rule


def ordered(item: Rule) -> Rule:
  """A pair (lo, hi), each checked by `item`, with lo <= hi."""
  pair = seq(item, 2)

  def rule(value, key):
    pair(value, key)
    if value[0] > value[1]:
      raise _fail(key, 'an ordered pair (lo, hi)', value)
  return rule


def mapping(value_rule: Rule, keys: Iterable[str] | None = None) -> Rule:
  """A dict of any names (or only `keys`), each value checked by `value_rule`."""
  def rule(value, key):
    if not _is_mapping(value):
      raise _fail(key, 'a mapping', value)
    for name in value.keys():
      if keys is not None and name not in keys:
        raise unknown(key, name, keys)
      value_rule(value[name], _join(key, name))
  return rule


def like(default) -> Rule:
  """The rule a default value implies: its type (an int also where a float is)."""
  if default is None:
    return anything()
  if isinstance(default, bool):
    return boolean()
  if isinstance(default, (int, float)):
    return integer() if _is_int(default) else number()
  if isinstance(default, str):
    return string()
  if isinstance(default, (list, tuple)):
    return seq(anything())
  if _is_mapping(default):
    return mapping(anything())
  return anything()


def section(fields: dict[str, Rule], optional: Iterable[str] = (), defaults=None) -> Rule:
  """A mapping with the keys of `fields` (all required but `optional`); keys of `defaults`
  (a default config) not in `fields` are allowed too, typed like their default."""
  optional = set(optional)
  defaults = defaults if defaults is not None else {}

  def rule(value, key):
    if not _is_mapping(value):
      raise _fail(key, 'a mapping', value)
    known = set(fields) | set(defaults.keys())
    for name in value.keys():
      if name not in known:
        raise unknown(key, name, known)
      check_one = fields.get(name) or like(defaults[name])
      check_one(value[name], _join(key, name))
    missing = sorted(set(fields) - set(value.keys()) - optional)
    if missing:
      raise ConfigError(f'{_join(key, missing[0])}: missing')
  return rule


def also(rule: Rule, fn: Callable[[Any], Any]) -> Rule:
  """`rule`, then `fn(value)`, whose ValueError becomes an error naming the key."""
  def both(value, key):
    rule(value, key)
    try:
      fn(value)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(f'{key}: {e}') from None
  return both


def check(config, spec: Rule, key: str = '') -> None:
  spec(config, key)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def typed(text: str, default, key: str):
  """`text` as a value of `default`'s type: a Python literal, or the text itself where a
  string is expected."""
  value = _literal(text)
  if isinstance(default, str):
    return value if isinstance(value, str) else text
  if _accepts(like(default), value):
    return value
  raise _fail(key, type_name(default), text)


def _accepts(rule: Rule, value) -> bool:
  try:
    rule(value, '')
  except ConfigError:
    return False
  return True


def parse_arg(arg: str | None, *, variant: str, **defaults) -> ml_collections.ConfigDict:
  """'demo,total_steps=10' -> {variant: 'demo', total_steps: 10}; values are Python literals
  (strings may be bare), of their defaults' types; unknown keys are errors."""
  out = ml_collections.ConfigDict({'variant': variant, **defaults})
  for i, part in enumerate(p for p in (arg or '').split(',') if p):
    key, eq, value = part.partition('=')
    if not eq:
      if i:
        raise ConfigError(f'config argument {arg!r}: only the first item may be a bare variant')
      out.variant = part
      continue
    if key not in defaults:
      raise unknown(f'config argument {arg!r}', key, defaults)
    out[key] = typed(value, defaults[key], f'config argument {key}')
  return out
