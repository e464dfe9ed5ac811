"""The engine's shared vocabulary: the tool/agent registry, what a stage records, and drops.

Tools and agents are looked up by kind and name (`create('inpainter', {'name': 'telea',
'radius': 5})`), so an engine config picks its backends without code changes and part 2's
model-backed tools register next to the offline ones. Every stage appends a `Decision` to
the item's record: which stage, passed or not, why, and the numbers it decided on. A stage
that rejects an item raises `Drop(reason)`; a tool that raises, overruns its timeout or
returns garbage is turned into a `Drop` by `call_tool`, so one bad photo never stops a run.
"""

from __future__ import annotations

import dataclasses
import importlib
import signal
import threading
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from layerjax import config_spec

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str):
  """Class or factory decorator: `create(kind, {'name': name, **kwargs})` builds it."""
  def deco(factory):
    table = _REGISTRY.setdefault(kind, {})
    if name in table and table[name] is not factory:
      raise ValueError(f'{kind} {name!r} is registered twice')
    table[name] = factory
    return factory
  return deco


def names(kind: str) -> list[str]:
  _import_backends()
  return sorted(_REGISTRY.get(kind, {}))


def spec_rule(kind: str, extra: tuple[str, ...] = ()) -> config_spec.Rule:
  """The config rule for a spec `create(kind, spec)` takes: a registered name (or one of
  `extra`), or a mapping with 'name', options and maybe a 'fallback' spec. The options are
  checked when the tool is built."""
  name_rule = config_spec.string(lambda: [*names(kind), *extra])

  def rule(value, key):
    if isinstance(value, str):
      return name_rule(value, key)
    if not isinstance(value, (dict, ml_collections.ConfigDict)) or 'name' not in value:
      raise config_spec.ConfigError(f"{key}: expected a {kind} name or a mapping with 'name', "
                                    f'got {value!r}')
    name_rule(value['name'], f'{key}.name')
    if value.get('fallback') is not None:
      rule(value['fallback'], f'{key}.fallback')
  return rule


def create(kind: str, spec, fallbacks: list | None = None) -> Any:
  """A tool or agent from `spec`: a name, or a mapping with 'name' and constructor kwargs.

  A spec may name a `fallback` spec: when the tool cannot be built (missing weights, a wrong
  model folder, a library not installed), the fallback is built instead and the switch is
  appended to `fallbacks` (what was asked for, what was used, why). Without a fallback the
  error propagates: a model-backed config never quietly runs offline.
  """
  _import_backends()
  spec = {'name': spec} if isinstance(spec, str) else dict(spec)
  fallback = spec.pop('fallback', None)
  name = spec.pop('name', None)
  table = _REGISTRY.get(kind)
  if table is None:
    raise ValueError(f'unknown tool kind {kind!r}; kinds: {sorted(_REGISTRY)}')
  if name not in table:
    raise ValueError(f'unknown {kind} {name!r}; registered: {sorted(table)}')
  try:
    return table[name](**spec)
  except TypeError as e:
    raise ValueError(f'{kind} {name!r}: bad options {spec} ({e})') from None
  except (OSError, ValueError, ImportError) as e:
    if fallback is None:
      raise
    used = fallback if isinstance(fallback, str) else dict(fallback).get('name')
    if fallbacks is not None:
      fallbacks.append({'kind': kind, 'wanted': name, 'used': used,
                        'because': f'{type(e).__name__}: {e}'})
    return create(kind, fallback, fallbacks)


def _import_backends() -> None:
  # Registration happens on import; importing here keeps `create` usable from anywhere.
  for package in ('data_engine.tools', 'data_engine.agents'):
    importlib.import_module(package)


class Drop(Exception):
  """The item leaves the engine; `reason` is a short stable key, `detail` says more."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason, self.detail = reason, detail


class ToolTimeout(Exception):
  pass


@dataclasses.dataclass
class Decision:
  stage: str
  passed: bool
  reason: str = ''
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _with_alarm(fn, timeout: float):
  def on_alarm(signum, frame):
    raise ToolTimeout()
  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, timeout)
  try:
    return fn()
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _with_thread(fn, timeout: float):
  # Off the main thread (e.g. inside a Beam worker) signals are unavailable: run the tool in
  # a daemon thread and abandon it if it overruns; the item is dropped either way.
  box: dict[str, Any] = {}

  def target():
    try:
      box['value'] = fn()
    except BaseException as e:  # re-raised in the caller's thread
      box['error'] = e
  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(timeout)
  if t.is_alive():
    raise ToolTimeout()
  if 'error' in box:
    raise box['error']
  return box['value']


def call_tool(name: str, fn: Callable[[], Any], timeout: float | None,
              check: Callable[[Any], str | None] | None = None) -> Any:
  """Runs one tool call; failures become `Drop('tool_error' | 'tool_timeout' | 'tool_garbage')`.

  `check(result)` returns None for a usable result or a description of what is wrong.
  """
  try:
    if not timeout:
      result = fn()
    elif threading.current_thread() is threading.main_thread():
      result = _with_alarm(fn, timeout)
    else:
      result = _with_thread(fn, timeout)
  except ToolTimeout:
    raise Drop('tool_timeout', f'{name} ran past {timeout} s') from None
  except Drop:
    raise
  except Exception as e:
    raise Drop('tool_error', f'{name} raised {type(e).__name__}: {e}') from None
  problem = check(result) if check else None
  if problem:
    raise Drop('tool_garbage', f'{name} returned {problem}')
  return result


def check_array(shape: tuple, lo: float = 0.0, hi: float = 1.0, dtype=None):
  """A `call_tool` check: an ndarray of `shape` (None = any size), finite, in [lo, hi]."""
  def check(x) -> str | None:
    if not isinstance(x, np.ndarray):
      return f'a {type(x).__name__}, not an array'
    if len(x.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
      return f'shape {x.shape}, expected {shape}'
    if dtype is not None and x.dtype != dtype:
      return f'dtype {x.dtype}, expected {np.dtype(dtype)}'
    if x.dtype != np.bool_:
      if not np.isfinite(x).all():
        return 'non-finite values'
      if x.size and (x.min() < lo or x.max() > hi):
        return f'values in [{x.min():.3g}, {x.max():.3g}], expected [{lo}, {hi}]'
    return None
  return check


class Timer:
  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
