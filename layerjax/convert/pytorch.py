"""A trained decomposer <-> its PyTorch export (`layerjax.torch.folder` gives the layout).

`to_pytorch`: a packed model folder or a training workdir (`infer.model.load`) -> a diffusers
pipeline folder the PyTorch decomposer (`layerjax.torch`) loads, each model's tensors named
as its PyTorch module names them. `from_pytorch`: back to a packed model folder
(`infer.model.save`) whose weights equal the original's bit for bit when none was cast.

Tensors map one to one (the MMDiT's stacked blocks one by one, `mmdit.unstack` /
`mmdit.stack`): the Flax path of every variable names its component
('transformer/...', 'latents/vae/...' -> vae/, 'layer_embed' and 'long_skip/...' -> layers/,
'text_encoder/...', 'alpha_head/...', 'shadow_head/...') and, joined with '.', its name there,
with `layerjax.convert.diffusers`' renames and layouts (the long skip's [K, C, C] kernel
keeps its name and layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from layerjax.convert.diffusers import (from_torch_layout, to_torch_layout, torch_name,
                                        check_finite)
from layerjax.convert.files import read_tensors, write_folder
from layerjax.fileio import Artifact, atomic_dir, check_destination, check_not_inside, read_json
from layerjax.infer import model as infer_model
from layerjax.models import common, heads, mmdit
from layerjax.models.decomposer import DecomposerConfig, LayerDecomposer
from layerjax.models.shared import TextEmbeddings

EXPORT = Artifact('PyTorch decomposer export', lambda p: (p / 'decomposer.json').is_file(),
                  markers=('decomposer.json',))


def _torch_folder():
  # PyTorch only when converting to or from it: the rest of `layerjax.convert` needs none.
  from layerjax.torch import folder
  return folder


# --- names ----------------------------------------------------------------------------------

def component_name(path: tuple, ndim: int) -> tuple[str, str]:
  """A Flax variable path -> (component, its name in that component's state dict)."""
  path = tuple(map(str, path))
  if path[0] == 'latents':
    component, rest = 'vae', path[2:]  # latents/vae/...
  elif path[0] in ('layer_embed', 'long_skip'):
    component, rest = 'layers', path
  else:
    component, rest = path[0], path[1:]
  if rest[-1] == 'kernel' and ndim == 3:  # the long skip's kernel: no torch layer's layout
    return component, '.'.join(rest)
  return component, torch_name(rest)


def _to_torch(path: tuple, x: np.ndarray) -> np.ndarray:
  return x if x.ndim == 3 else to_torch_layout(path, x)


def _from_torch(path: tuple, x: np.ndarray) -> np.ndarray:
  return x if x.ndim == 3 else from_torch_layout(path, x)


# --- component configs ------------------------------------------------------------------------

def _configs(cfg: DecomposerConfig) -> dict[str, dict]:
  """Each model component's config.json (diffusers' for diffusers' classes)."""
  c, m = cfg.latent_channels, cfg.mmdit
  out = {'transformer': m.to_diffusers(),
         'layers': {'_class_name': 'LayerEmbedding', 'layers': list(cfg.layers),
                    'width': m.width, 'has_long_skip': cfg.long_skip,
                    'condition_channels': c * len(cfg.conditions), 'latent_channels': c}}
  if cfg.latents == 'vae':
    out['vae'] = cfg.vae.to_diffusers()
  if cfg.text is not None:
    out['text_encoder'] = {'_class_name': 'ByteTextEncoder', **dataclasses.asdict(cfg.text)}
  for name, layer, channels in (('alpha_head', 'foreground', heads.ALPHA_CHANNELS),
                                ('shadow_head', 'shadow', heads.SHADOW_CHANNELS)):
    if layer not in cfg.layers:
      continue
    if cfg.head == 'conv':
      out[name] = {'_class_name': 'ConvHead', 'out_channels': channels, 'factor': cfg.factor,
                   'width': cfg.head_width, 'extra_channels': 3 * len(cfg.head_conditions),
                   'board_at': cfg.head_board_at()}
    else:
      v = cfg.vae
      out[name] = {'_class_name': 'DecoderHead', 'latent_channels': v.latent_channels,
                   'out_channels': channels, 'block_out_channels': list(v.block_out_channels),
                   'layers_per_block': v.layers_per_block,
                   'norm_num_groups': v.norm_num_groups,
                   'mid_block_add_attention': v.mid_block_add_attention}
  return out


def _classes(configs: dict[str, dict]) -> dict[str, type]:
  folder = _torch_folder()
  by_name = {cls.__name__: cls for cls in folder.CLASSES.values()}
  return {name: by_name[c['_class_name']] for name, c in configs.items()}


# --- to PyTorch -------------------------------------------------------------------------------

def to_pytorch(model, dst, *, dtype: Any = None, max_shard_size: int = 10 * 2**30,
               overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
  """Writes the export of `model` (a packed model folder or training workdir) to `dst`,
  atomically; `dtype` casts every floating-point tensor. A NaN or Inf (after the cast) is
  refused naming the tensor, before anything is written."""
  import diffusers
  from diffusers import FlowMatchEulerDiscreteScheduler
  folder = _torch_folder()
  dst = Path(dst)
  check_not_inside(model, dst)
  check_destination(dst, EXPORT, overwrite)
  loaded = infer_model.load(model)
  cfg = loaded.model.config
  configs = _configs(cfg)
  tensors = {name: {} for name in configs}
  for stacked, var in nnx.to_flat_state(nnx.state(loaded.model)):
    for path, x in mmdit.unstack(stacked, np.asarray(var[...])):
      if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
        with np.errstate(over='ignore'):  # an overflow is an Inf, refused below by name
          x = x.astype(dtype)
      component, name = component_name(path, x.ndim)
      x = np.ascontiguousarray(_to_torch(path, x))
      check_finite(name, x, f'export to {dst / component}', allow_nonfinite)
      tensors[component][name] = x
  # The run it came from: a packed model's own record of it, else the workdir; so that
  # from-pytorch restores the packed model's decomposer.json as it was.
  packed = Path(model) / infer_model.META
  source = read_json(packed)['source'] if packed.is_file() else loaded.source
  meta = {'format': folder.FORMAT, 'step': loaded.step, 'source': source,
          'config': loaded.config.to_dict(), 'model': infer_model.config_json(cfg)}
  version = {'_diffusers_version': diffusers.__version__}
  with atomic_dir(dst, EXPORT, overwrite) as tmp:
    for name, config in configs.items():
      write_folder(tmp / name, {**config, **version}, tensors[name], max_shard_size)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(
        loaded.config.loss.shift)).save_pretrained(tmp / folder.SCHEDULER)
    if cfg.text is None:
      from safetensors.numpy import save_file
      key = TextEmbeddings.key('')
      states, pooled = loaded.texts([''])
      save_file({f'{key}.states': states[0], f'{key}.pooled': pooled[0]}, str(tmp / folder.TEXT))
    folder.write_index(tmp, {**_classes(configs), folder.SCHEDULER:
                             FlowMatchEulerDiscreteScheduler})
    (tmp / folder.META).write_text(json.dumps(meta, indent=2) + '\n')
  return dst


# --- from PyTorch -----------------------------------------------------------------------------

def from_pytorch(src, dst, *, overwrite: bool = False) -> Path:
  """The packed model folder `dst` of the export `src`: every tensor checked (names, shapes,
  finite; one line naming the file and tensor) before the model is built."""
  folder = _torch_folder()
  src, dst = Path(src), Path(dst)
  check_not_inside(src, dst)
  check_destination(dst, infer_model.MODEL_FOLDER, overwrite)
  if not src.is_dir():
    raise folder.ExportError(f'{src}: no such folder')
  meta = folder.read_meta(src)
  classes = folder.components(src)
  for name, cls in classes.items():
    if name != folder.SCHEDULER:
      folder.check_weights(src / name, cls)
  try:
    cfg = infer_model.config_from_json(meta['model'])
  except (TypeError, ValueError, KeyError) as e:
    raise folder.ExportError(f'{src / folder.META}: model: {e}') from None
  expected = _configs(cfg)
  if set(expected) != set(classes) - {folder.SCHEDULER}:
    raise folder.ExportError(f'{src / folder.INDEX}: components {sorted(classes)}, the model '
                             f'in {folder.META} has {sorted(expected)} and scheduler')
  abstract = common.abstract(lambda rngs: LayerDecomposer(cfg, rngs=rngs))
  graphdef, state = nnx.split(abstract)
  with contextlib.ExitStack() as stack:
    readers = {n: stack.enter_context(read_tensors(src / n)) for n in expected}

    def tensor(path: tuple, shape: tuple) -> np.ndarray:
      component, name = component_name(path, len(shape))
      x = _from_torch(path, np.asarray(readers[component][name]))
      if x.shape != tuple(shape):
        raise folder.ExportError(f'{src / component}: tensor {name!r} has shape {x.shape}, '
                                 f'the model in {folder.META} expects {tuple(shape)}')
      return x

    for path, var in nnx.to_flat_state(state):
      var.set_value(jnp.asarray(mmdit.stack(path, var.shape, tensor).astype(var.dtype)))
  texts = TextEmbeddings(src / folder.TEXT) if (src / folder.TEXT).is_file() else None
  loaded = infer_model.LoadedModel(nnx.merge(graphdef, state),
                                   ml_collections.ConfigDict(meta['config']), int(meta['step']),
                                   meta['source'], texts)
  return Path(infer_model.save(loaded, dst, overwrite=overwrite))

