"""Weights of the perceptual networks (LPIPS, FID's Inception) from local files, strictly.

The networks in `layerjax.evaluate` name their parameters after the published PyTorch
checkpoints' state-dict keys, so one rename (`diffusers.fill_from_state_dict`: Conv kernel
[kh, kw, in, out] <-> weight [out, in, kh, kw]) fills them. Files are read as

    .safetensors      tensors only (preferred)
    .pth / .pt        `torch.load(weights_only=True)`: tensors and containers, no pickled code

and every tensor the network needs must be present, none left over except the keys a caller
names as not part of the network (e.g. a classifier head), or loading fails listing both.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from layerjax.convert.diffusers import fill_from_state_dict, torch_state_dict
from layerjax.models import common

SUFFIXES = ('.safetensors', '.pth', '.pt')


def read_state_dict(path) -> dict[str, np.ndarray]:
  """name -> float array from a safetensors file or a torch state dict (weights only)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such weights file')
  if path.suffix not in SUFFIXES:
    raise ValueError(f'{path}: weights must be one of {SUFFIXES}, got {path.suffix!r}')
  if path.suffix == '.safetensors':
    try:
      return load_file(str(path))
    except (SafetensorError, OSError) as e:
      raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
  import torch  # only for the published .pth files
  try:
    state = torch.load(str(path), map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
    # torch's own message suggests weights_only=False, which would run pickled code.
    raise ValueError(f'{path}: not a weights-only torch state dict ({type(e).__name__}); '
                     'pickled objects are never loaded') from None
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise ValueError(f'{path}: expected a state dict of tensors, got {type(state).__name__}')
  return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy()
          for k, v in state.items()}


def drop_keys(tensors: dict[str, np.ndarray], patterns: Iterable[str]) -> dict[str, np.ndarray]:
  """`tensors` without the keys matching any regular expression in `patterns` (full match)."""
  rx = [re.compile(p) for p in patterns]
  return {k: v for k, v in tensors.items() if not any(r.fullmatch(k) for r in rx)}


def build_from(build: Callable[[nnx.Rngs], nnx.Module], tensors: dict[str, np.ndarray],
               source: str) -> nnx.Module:
  """`build(rngs)` filled from `tensors` (PyTorch names and layouts) with no initialisation:
  missing or unexpected keys, a wrong shape or a NaN/Inf value fail naming `source`."""
  graphdef, state = nnx.split(common.abstract(build))
  return fill_from_state_dict(graphdef, state, tensors, source, jnp.float32)


def save(model: nnx.Module, path) -> Path:
  """The model's weights as one safetensors file under the PyTorch checkpoint's names."""
  path = Path(path)
  if path.suffix != '.safetensors':
    raise ValueError(f'{path}: weights are saved as .safetensors only')
  save_file(torch_state_dict(model), str(path), metadata={'format': 'pt'})
  return path
