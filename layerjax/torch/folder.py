"""The exported PyTorch decomposer folder (`python -m layerjax.convert to-pytorch`), read
strictly: every component built from its config and filled from its safetensors, with the
loading info diffusers' `from_pretrained` reports.

    DST/model_index.json       diffusers' pipeline index: class `LayerDecomposerPipeline`,
                               each component's library and class
    DST/decomposer.json        format, step, source, the experiment `config` and the resolved
                               architecture `model` (`infer.model.config_json`)
    DST/transformer/           SD3Transformer2DModel, its patch embedding widened
    DST/vae/                   AutoencoderKL (latents='vae'; pixel latents have none)
    DST/layers/                LayerEmbedding: layer embedding, long skip
    DST/text_encoder/          ByteTextEncoder (byte-level text models)
    DST/text.safetensors       the empty text's embeddings (precomputed-text models)
    DST/alpha_head/, shadow_head/   ConvHead or DecoderHead
    DST/scheduler/             FlowMatchEulerDiscreteScheduler with the training shift
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from layerjax.convert.files import read_tensors, weight_files
from layerjax.fileio import read_json
from layerjax.torch import modules

FORMAT_NAME = 'layerjax.decomposer-pytorch'
VERSION = 1
FORMAT = f'{FORMAT_NAME}/{VERSION}'
META = 'decomposer.json'
INDEX = 'model_index.json'
TEXT = 'text.safetensors'
PIPELINE_CLASS = 'LayerDecomposerPipeline'
SCHEDULER = 'scheduler'
# Every class a component may be, by (library, class name) as model_index.json gives it.
CLASSES = {('diffusers', 'SD3Transformer2DModel'): SD3Transformer2DModel,
           ('diffusers', 'AutoencoderKL'): AutoencoderKL,
           ('diffusers', 'FlowMatchEulerDiscreteScheduler'): FlowMatchEulerDiscreteScheduler,
           **{('layerjax.torch', c.__name__): c for c in (
               modules.LayerEmbedding, modules.ByteTextEncoder, modules.ConvHead,
               modules.DecoderHead)}}
MODELS = ('transformer', 'vae', 'layers', 'text_encoder', 'alpha_head', 'shadow_head')


class ExportError(ValueError):
  """A folder that is not a loadable layerjax PyTorch export; names the file and problem."""


def library_of(cls) -> tuple[str, str]:
  return next(key for key, c in CLASSES.items() if c is cls)


def read_meta(folder: Path) -> dict:
  """decomposer.json, checked: this format, not a newer one, with every entry."""
  path = folder / META
  if not path.is_file():
    raise ExportError(f'{path}: missing; {folder} is not a layerjax PyTorch export '
                      '(python -m layerjax.convert to-pytorch writes one)')
  meta = read_json(path, ExportError)
  fmt = meta.get('format') if isinstance(meta, dict) else None
  name, _, version = str(fmt).partition('/')
  if name != FORMAT_NAME or not version.isdigit():
    raise ExportError(f'{path}: format {fmt!r}; not a layerjax PyTorch export ({FORMAT!r})')
  if int(version) > VERSION:
    raise ExportError(f'{path}: format {fmt!r} was written by a newer layerjax; this one '
                      f'reads {FORMAT!r} (upgrade layerjax)')
  missing = [k for k in ('step', 'source', 'config', 'model') if k not in meta]
  if missing:
    raise ExportError(f'{path}: malformed, no {missing}')
  return meta


def components(folder: Path) -> dict[str, type]:
  """model_index.json's components -> their classes; only the known ones are accepted."""
  path = folder / INDEX
  index = read_json(path, ExportError)
  if not isinstance(index, dict) or index.get('_class_name') != PIPELINE_CLASS:
    got = index.get('_class_name') if isinstance(index, dict) else None
    raise ExportError(f'{path}: _class_name {got!r}, expected {PIPELINE_CLASS!r}')
  out = {}
  for name, entry in index.items():
    if name.startswith('_'):
      continue
    if name not in MODELS + (SCHEDULER,) or not isinstance(entry, list) or (
        tuple(entry) not in CLASSES):
      raise ExportError(f'{path}: unknown component {name}: {entry!r}')
    out[name] = CLASSES[tuple(entry)]
  for need in ('transformer', 'layers', SCHEDULER):
    if need not in out:
      raise ExportError(f'{path}: no {need} component')
  return out


def check_weights(folder: Path, cls) -> torch.dtype:
  """The component's tensors are its model's, of their shapes, finite: else one line naming
  the file and the tensor. The model is built on the meta device (no memory). Returns the
  floating-point dtype the weights were saved in."""
  config = cls.load_config(folder)
  with torch.device('meta'):
    want = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
  try:
    files = weight_files(folder)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None
  missing, unexpected = sorted(set(want) - set(files)), sorted(set(files) - set(want))
  if missing:
    raise ExportError(f'{folder}: tensor {missing[0]!r} missing (the {cls.__name__} has it)')
  if unexpected:
    name = unexpected[0]
    raise ExportError(f'{files[name]}: tensor {name!r} unexpected (no such {cls.__name__} '
                      'weight)')
  saved = set()
  with read_tensors(folder) as tensors:
    for name, shape in want.items():
      x = tensors[name]
      if tuple(x.shape) != shape:
        raise ExportError(f'{files[name]}: tensor {name!r} has shape {tuple(x.shape)}, the '
                          f'{cls.__name__} expects {shape}')
      if x.dtype.kind not in 'biu' and not np.isfinite(x).all():
        raise ExportError(f'{files[name]}: tensor {name!r} has '
                          f'{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} Inf '
                          f'of {x.size} values')
      saved.add(x.dtype.name)
  # One dtype per export (`--dtype`, or the packed model's); float32 if mixed.
  return getattr(torch, saved.pop()) if len(saved) == 1 else torch.float32


def load_components(path, device=None, dtype: torch.dtype | None = None
                    ) -> tuple[dict, dict, dict[str, dict]]:
  """(decomposer.json, {component name: module or scheduler}, {component name: loading
  info}) of the export at `path`, every model checked (`check_weights`) before any is built,
  then loaded with `from_pretrained(output_loading_info=True)`, cast to `dtype` (default:
  as saved) on `device`; a non-empty `missing_keys` / `unexpected_keys` is an error."""
  folder = Path(path)
  if not folder.is_dir():
    raise ExportError(f'{folder}: no such folder')
  meta = read_meta(folder)
  classes = components(folder)
  saved = {name: check_weights(folder / name, cls) for name, cls in classes.items()
           if name != SCHEDULER}
  built, infos = {}, {}
  for name, cls in classes.items():
    if name == SCHEDULER:
      built[name] = cls.from_pretrained(folder / name)
      continue
    want = dtype or saved[name]
    # Without `accelerate` (not a dependency) diffusers warns, then loads this way anyway.
    model, info = cls.from_pretrained(folder / name, output_loading_info=True,
                                      low_cpu_mem_usage=False, torch_dtype=want)
    if info['missing_keys'] or info['unexpected_keys']:
      raise ExportError(f'{folder / name}: missing_keys {info["missing_keys"]}, '
                        f'unexpected_keys {info["unexpected_keys"]}')
    if model.dtype != want:  # `torch_dtype` leaves float64 as float32
      model = model.to(dtype=want)
    built[name] = model.to(device).eval()
    infos[name] = info
  return meta, built, infos


def decomposer(meta: dict, built: dict) -> modules.Decomposer:
  """`load_components`' modules joined."""
  return modules.Decomposer(meta['model'], **{k: v for k, v in built.items() if k in MODELS})


def write_index(folder: Path, parts: dict[str, type]) -> None:
  """model_index.json for the components `parts` (name -> class)."""
  index = {'_class_name': PIPELINE_CLASS, '_diffusers_version': diffusers.__version__,
           **{name: list(library_of(cls)) for name, cls in parts.items()}}
  (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')
