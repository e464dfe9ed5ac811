"""layerjax models <-> Orbax checkpoints: `DST/layerjax_model.json` (kind + diffusers config)
plus `DST/state/` (every variable, Orbax StandardCheckpointer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from layerjax.convert.diffusers import abstract_model, kind
from layerjax.fileio import Artifact, atomic_dir

META = 'layerjax_model.json'
CHECKPOINT = Artifact('layerjax model checkpoint', lambda p: (p / META).is_file())


def save_checkpoint(model: nnx.Module, kind_name: str, path, overwrite: bool = False) -> Path:
  """Writes `path` atomically; an existing checkpoint there is replaced only with
  `overwrite`, anything else is refused."""
  kind(kind_name)  # validates the name
  with atomic_dir(Path(path), CHECKPOINT, overwrite) as tmp:
    (tmp / META).write_text(json.dumps(
        {'kind': kind_name, 'config': model.config.to_diffusers()}, indent=2) + '\n')
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save((tmp / 'state').absolute(), nnx.to_pure_dict(nnx.state(model)))
  return Path(path)


def load_checkpoint(path, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> tuple[str, nnx.Module]:
  path = Path(path)
  try:
    meta = json.loads((path / META).read_text())
    kind_name, config = meta['kind'], meta['config']
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: not a layerjax checkpoint (no {META})') from None
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f'{path / META}: malformed ({e!r})') from None
  model_kind = kind(kind_name)
  cfg = model_kind.config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype)
  graphdef, state = abstract_model(model_kind, cfg)
  target = nnx.to_pure_dict(state)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore((path / 'state').absolute(), target)
  nnx.replace_by_pure_dict(state, restored)
  return kind_name, nnx.merge(graphdef, state)
