"""Reading and writing diffusers model folders: config.json plus single or sharded safetensors.

Only safetensors are read (never pickles). Tensors are read lazily, one at a time, so a
multi-GB checkpoint is never held twice. Folders are written under a temporary name and
renamed into place, so an interrupted export leaves any earlier folder intact; they replace
only a diffusers model folder, and only when asked (`fileio.atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from layerjax.fileio import Artifact, atomic_dir, read_json

WEIGHTS = 'diffusion_pytorch_model.safetensors'
INDEX = WEIGHTS + '.index.json'
MODEL_FOLDER = Artifact('diffusers model folder', lambda p: (p / 'config.json').is_file() and (
    (p / WEIGHTS).is_file() or (p / INDEX).is_file()))


def read_config(folder: Path) -> dict:
  path = folder / 'config.json'
  config = read_json(path)
  if not isinstance(config, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(config).__name__}')
  return config


class LazyTensors(Mapping):
  """name -> numpy array, opened from the shard that holds it on first access."""

  def __init__(self, files: dict[str, Path]):
    self._file_of = files
    self._handles = {}

  def _open(self, path: Path):
    if path not in self._handles:
      try:
        self._handles[path] = safe_open(str(path), framework='np')
      except (SafetensorError, OSError) as e:
        raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
    return self._handles[path]

  def __getitem__(self, name: str) -> np.ndarray:
    path = self._file_of[name]
    try:
      return self._open(path).get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise ValueError(f'{path}: cannot read tensor {name!r} ({e})') from None

  def __iter__(self):
    return iter(self._file_of)

  def __len__(self):
    return len(self._file_of)

  def close(self):
    self._handles.clear()


def _keys(path: Path) -> list[str]:
  try:
    with safe_open(str(path), framework='np') as f:
      return list(f.keys())
  except (SafetensorError, OSError) as e:
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from None


def weight_files(folder: Path) -> dict[str, Path]:
  """Maps every tensor name to the safetensors file holding it, checking the index."""
  single, index = folder / WEIGHTS, folder / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f'{index}: not a valid safetensors index ({e!r})') from None
    files = {}
    for shard in sorted(set(weight_map.values())):
      path = folder / shard
      if not path.is_file():
        raise FileNotFoundError(f'{index}: shard {shard} is missing')
      for name in _keys(path):
        if weight_map.get(name) != shard:
          raise ValueError(f'{path}: holds {name!r}, which the index assigns to '
                           f'{weight_map.get(name)!r}')
        files[name] = path
    absent = sorted(set(weight_map) - set(files))
    if absent:
      raise ValueError(f'{index}: tensors listed but not in their shards: {absent[:20]}')
    return files
  if single.is_file():
    return {name: single for name in _keys(single)}
  pickles = sorted(p.name for pattern in ('*.bin', '*.ckpt') for p in folder.glob(pattern))
  hint = (f' (found {pickles}: pickled weights are not loaded; convert them to safetensors)'
          if pickles else '')
  raise FileNotFoundError(f'{folder}: no {WEIGHTS} or {INDEX}{hint}')


@contextlib.contextmanager
def read_tensors(folder: Path):
  tensors = LazyTensors(weight_files(folder))
  try:
    yield tensors
  finally:
    tensors.close()


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int) -> list[dict[str, np.ndarray]]:
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > max_shard_size:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  return shards + [current]


def write_folder(dst: Path, config: dict, tensors: dict[str, np.ndarray],
                 max_shard_size: int, overwrite: bool = False) -> Path:
  """A diffusers model folder: config.json and weights, sharded above `max_shard_size`;
  an existing model folder at `dst` is replaced only with `overwrite`."""
  shards = _shards(tensors, max_shard_size)
  with atomic_dir(dst, MODEL_FOLDER, overwrite) as tmp:
    (tmp / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    if len(shards) == 1:
      save_file(shards[0], str(tmp / WEIGHTS), metadata={'format': 'pt'})
    else:
      weight_map = {}
      for i, shard in enumerate(shards, 1):
        name = f'diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, str(tmp / name), metadata={'format': 'pt'})
        weight_map.update({k: name for k in shard})
      index = {'metadata': {'total_size': sum(x.nbytes for x in tensors.values())},
               'weight_map': weight_map}
      (tmp / INDEX).write_text(json.dumps(index, indent=2) + '\n')
  return dst
