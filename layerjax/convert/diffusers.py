"""diffusers folders <-> layerjax Flax models, weight by weight and strict.

Flax parameter paths equal diffusers state-dict keys once joined with '.', so the whole
mapping is the leaf rename below plus the layout change of each tensor:

    Linear  kernel [in, out]         <-> weight [out, in]
    Conv    kernel [kh, kw, in, out] <-> weight [out, in, kh, kw]
    norm    scale                    <-> weight
    bias, buffers (pos_embed)        <-> same name, same layout

The MMDiT holds each group of identical blocks stacked (`mmdit.stacked_blocks`); its
variables are unstacked into per-block names on export and stacked back on loading
(`mmdit.unstack` / `mmdit.stack`), so names and checks are always diffusers'.

Loading uses every source tensor and fills every parameter, or fails listing what is
missing/unexpected; exporting writes a folder that diffusers' `from_pretrained` loads with
empty `missing_keys` / `unexpected_keys`, sharded above `max_shard_size` bytes. A tensor
with NaN or Inf values, read or about to be written (after any cast), is refused naming it,
or only logged with `allow_nonfinite`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from layerjax.convert.files import read_config, read_tensors, write_folder
from layerjax.models import common, mmdit
from layerjax.models.mmdit import MMDiTConfig, SD3Transformer2DModel


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """What the converter needs to know about one model family."""
  name: str
  subfolder: str                 # in a diffusers pipeline folder
  diffusers_class: str           # `_class_name` in config.json
  config_from_diffusers: Callable[..., Any]
  build: Callable[..., nnx.Module]


def _vae_kind() -> ModelKind:
  from layerjax.models import vae
  return ModelKind('vae', 'vae', 'AutoencoderKL', vae.VAEConfig.from_diffusers,
                   vae.AutoencoderKL)


TRANSFORMER = ModelKind('transformer', 'transformer', 'SD3Transformer2DModel',
                        MMDiTConfig.from_diffusers, SD3Transformer2DModel)


def kind(name: str) -> ModelKind:
  kinds = {'transformer': lambda: TRANSFORMER, 'vae': _vae_kind}
  if name not in kinds:
    raise ValueError(f'unknown model kind {name!r}; expected one of {sorted(kinds)}')
  return kinds[name]()


# --- names and layouts --------------------------------------------------------------------

def torch_name(path: tuple) -> str:
  *head, leaf = (str(p) for p in path)
  return '.'.join([*head, {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)])


def to_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    return x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)
  return x


def from_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    return x.T if x.ndim == 2 else x.transpose(2, 3, 1, 0)
  return x


def _variables(model_or_state) -> Iterator[tuple[tuple, nnx.Variable]]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  yield from nnx.to_flat_state(state)


def torch_state_dict(model: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
  """The model's weights as a diffusers state dict of numpy arrays (PyTorch layouts)."""
  out = {}
  for stacked_path, var in _variables(model):
    for path, x in mmdit.unstack(stacked_path, np.asarray(jax.device_get(var[...]))):
      if dtype is not None:
        with np.errstate(over='ignore'):  # an overflow is an Inf, which `save` reports by name
          x = x.astype(dtype)
      out[torch_name(path)] = np.ascontiguousarray(to_torch_layout(path, x))
  return out


class CheckpointMismatch(ValueError):
  """Raised when a checkpoint and a model do not correspond tensor for tensor."""


class NonFiniteWeights(ValueError):
  """Raised for a tensor with NaN or Inf values."""


def check_finite(name: str, x: np.ndarray, where: str, allow: bool) -> None:
  """Refuses (or with `allow`, logs) a floating-point tensor with NaN or Inf values."""
  if x.dtype.kind in 'biu':
    return
  nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
  if not nan and not inf:
    return
  problem = f'{where}: tensor {name!r} has {nan} NaN and {inf} Inf of {x.size} values'
  if not allow:
    raise NonFiniteWeights(f'{problem} (allow_nonfinite / --allow-nonfinite converts it '
                           'anyway)')
  logging.warning('%s; converted anyway (allow_nonfinite)', problem)


def torch_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
  """diffusers name -> PyTorch-layout shape of every variable in `state` (abstract or not)."""
  return {torch_name(p): tuple(to_torch_layout(p, x).shape)
          for stacked, v in _variables(state)
          for p, x in mmdit.unstack(stacked, mmdit.shape_only(v.shape))}


def fill_from_state_dict(graphdef, abstract_state: nnx.State, tensors, source: str,
                         param_dtype: Any, allow_nonfinite: bool = False) -> nnx.Module:
  """Builds the model from `tensors` (name -> array-like in PyTorch layout), strictly."""
  shapes = torch_shapes(abstract_state)
  missing = sorted(set(shapes) - set(tensors))
  unexpected = sorted(set(tensors) - set(shapes))
  if missing or unexpected:
    raise CheckpointMismatch(
        f'{source}: checkpoint does not match the model.\n'
        f'  missing_keys ({len(missing)}): {missing[:50]}\n'
        f'  unexpected_keys ({len(unexpected)}): {unexpected[:50]}')

  def tensor(path: tuple, _) -> np.ndarray:
    name = torch_name(path)
    x = np.asarray(tensors[name])
    if tuple(x.shape) != shapes[name]:
      raise CheckpointMismatch(f'{source}: shape mismatch for {name!r}: checkpoint has '
                               f'{tuple(x.shape)}, model expects {shapes[name]}')
    check_finite(name, x, source, allow_nonfinite)
    return from_torch_layout(path, x)

  for path, var in _variables(abstract_state):
    var.set_value(jnp.asarray(mmdit.stack(path, var.shape, tensor), dtype=param_dtype))
  return nnx.merge(graphdef, abstract_state)


def abstract_model(model_kind: ModelKind, cfg):
  """Shapes only: no memory is spent on an initialisation that loading would overwrite."""
  model = common.abstract(lambda rngs: model_kind.build(cfg, rngs=rngs))
  return nnx.split(model)


# --- folders ------------------------------------------------------------------------------

def model_folder(path: str | os.PathLike, model_kind: ModelKind) -> Path:
  """`path` itself if it is a model folder, else its pipeline subfolder for this kind."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'{path}: no such directory')
  if (path / 'config.json').is_file():
    return path
  sub = path / model_kind.subfolder
  if (sub / 'config.json').is_file():
    return sub
  raise FileNotFoundError(
      f'{path}: neither a diffusers model folder (config.json + safetensors) nor a pipeline '
      f'folder with a {model_kind.subfolder}/ subfolder')


def model_config(model_kind: ModelKind, path, **compute):
  """The model's config from the folder's config.json (nothing else is read)."""
  folder = model_folder(path, model_kind)
  config = read_config(folder)
  cls = config.get('_class_name')
  if cls is not None and cls != model_kind.diffusers_class:
    raise CheckpointMismatch(f'{folder}/config.json: _class_name is {cls!r}, expected '
                             f'{model_kind.diffusers_class!r}')
  try:
    return model_kind.config_from_diffusers(config, **compute)
  except (TypeError, ValueError) as e:
    raise CheckpointMismatch(f'{folder}/config.json: {e}') from e


def load(model_kind: ModelKind, path, *, dtype: Any = jnp.float32,
         param_dtype: Any = jnp.float32, allow_nonfinite: bool = False,
         **compute) -> nnx.Module:
  folder = model_folder(path, model_kind)
  cfg = model_config(model_kind, folder, dtype=dtype, param_dtype=param_dtype, **compute)
  graphdef, state = abstract_model(model_kind, cfg)
  with read_tensors(folder) as tensors:
    return fill_from_state_dict(graphdef, state, tensors, str(folder), param_dtype,
                                allow_nonfinite)


def save(model: nnx.Module, path, *, dtype: Any = None, max_shard_size: int = 10 * 2**30,
         overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
  """Writes a diffusers model folder (atomically); `dtype` casts the saved tensors. An
  existing model folder at `path` is replaced only with `overwrite`."""
  config = model.config.to_diffusers()
  tensors = torch_state_dict(model, dtype)
  for name, x in tensors.items():  # a cast to float16 can overflow to Inf
    check_finite(name, x, f'export to {path}', allow_nonfinite)
  return write_folder(Path(path), config, tensors, max_shard_size, overwrite)


def load_transformer(path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     remat: str = 'none', unroll: bool | None = None,
                     attention: str = 'xla', allow_nonfinite: bool = False
                     ) -> SD3Transformer2DModel:
  """SD3/SD3.5 transformer from a diffusers model folder or pipeline folder (`remat`,
  `unroll`, `attention`: `MMDiTConfig`'s)."""
  return load(TRANSFORMER, path, dtype=dtype, param_dtype=param_dtype, remat=remat,
              unroll=unroll, attention=attention, allow_nonfinite=allow_nonfinite)


def save_transformer(model: SD3Transformer2DModel, path, **kw) -> Path:
  return save(model, path, **kw)


def load_vae(path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             allow_nonfinite: bool = False):
  """SD3 AutoencoderKL from a diffusers model folder or pipeline folder."""
  return load(kind('vae'), path, dtype=dtype, param_dtype=param_dtype,
              allow_nonfinite=allow_nonfinite)


def save_vae(vae, path, **kw) -> Path:
  return save(vae, path, **kw)
