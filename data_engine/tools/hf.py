"""Loading and running transformers models for the engine's model-backed tools.

Weights come only from a local folder named in the config: `local_files_only=True` so nothing
is downloaded, `use_safetensors=True` so nothing is unpickled, never remote code. A folder
that is missing, has no config.json or safetensors, holds a model of another type, or does
not cover every weight of the model is refused when the tool is built, with the tool and the
path in the message, before any photo is processed. torch and transformers are imported only
here and in the tools' constructors, so the engine imports (and runs offline tools) without
them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
  import torch


def weights_folder(tool: str, path, model_types: Sequence[str]) -> Path:
  """`path` as a Path once it is a folder with safetensors weights and a config.json whose
  `model_type` is one of `model_types`; `tool` (e.g. "detector 'owlv2'") names the error."""
  if not path:
    raise ValueError(f'{tool}: no weights folder given (option `path`)')
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f'{tool}: weights folder {folder} does not exist')
  config = folder / 'config.json'
  if not config.is_file():
    raise FileNotFoundError(f'{tool}: {folder} has no config.json')
  try:
    model_type = json.loads(config.read_text()).get('model_type')
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise ValueError(f'{tool}: {config} is not a JSON object ({e})') from None
  if model_type not in model_types:
    raise ValueError(f'{tool}: {config} has model_type {model_type!r}, expected one of '
                     f'{sorted(model_types)}')
  if not any(folder.glob('*.safetensors')):
    raise FileNotFoundError(f'{tool}: {folder} has no .safetensors weights (only safetensors '
                            'are loaded)')
  return folder


def pick_device(tool: str, spec: str = 'auto') -> 'torch.device':
  """'auto': CUDA when available, else the CPU; anything else as torch spells devices."""
  import torch
  if spec == 'auto':
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  try:
    return torch.device(spec)
  except RuntimeError as e:
    raise ValueError(f'{tool}: bad device {spec!r} ({e})') from None


def torch_dtype(tool: str, dtype: str, device):
  """'auto': bfloat16 on CUDA (fast, and FLUX's range needs it over float16), else float32."""
  import torch
  if dtype == 'auto':
    return torch.bfloat16 if device.type == 'cuda' else torch.float32
  if dtype not in ('float32', 'float16', 'bfloat16'):
    raise ValueError(f"{tool}: dtype must be 'auto', 'float32', 'float16' or 'bfloat16', "
                     f'got {dtype!r}')
  return getattr(torch, dtype)


def load(tool: str, path, model_types: Sequence[str], model_class, processor_class,
         device: str = 'auto') -> tuple[Any, Any]:
  """(model in eval mode on the device, processor), both from the checked local folder."""
  folder = weights_folder(tool, path, model_types)
  target = pick_device(tool, device)
  try:
    processor = processor_class.from_pretrained(folder, local_files_only=True)
    model, info = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True)
  except Exception as e:  # whatever the library raises, say which tool and folder it was
    raise ValueError(f'{tool}: cannot load from {folder}: {type(e).__name__}: {e}') from e
  # A weight missing from the checkpoint would be random: the tool's answers would be noise.
  missing = sorted(info['missing_keys']) + sorted(str(k) for k in info['mismatched_keys'])
  if missing:
    raise ValueError(f'{tool}: {folder} lacks or mis-shapes weights of '
                     f'{model_class.__name__}: {missing[:5]}')
  return model.to(target).eval(), processor


def forward(model, **inputs) -> Any:
  """`model(**inputs)` without gradients, tensors moved to its device (floats to its dtype)."""
  import torch
  moved = {k: (v.to(model.device, model.dtype) if torch.is_floating_point(v) else
               v.to(model.device)) if isinstance(v, torch.Tensor) else v
           for k, v in inputs.items()}
  with torch.no_grad():
    return model(**moved)


def to_numpy(x: 'torch.Tensor') -> np.ndarray:
  return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


def uint8(image: np.ndarray) -> np.ndarray:
  """A float image in [0, 1] as the 8-bit RGB the processors were built for."""
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
