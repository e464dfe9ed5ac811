"""Inpainting with a local diffusers pipeline (SD, SDXL or SD3 inpainting, FLUX fill), optionally
guided by depth through a ControlNet, as RefLade completes what removed objects hid.

The pipeline sees the crop around the hole plus `margin` px of context, resized so its longer
side is `resolution` px and both sides are multiples of the pipeline's VAE factor; its output is
resized back and only the hole's pixels are pasted, so everything outside the mask is the
input bit for bit (`stages._inpaint` checks this). Weights come from a local folder only:
safetensors, no remote code, no network. `load_pipeline`, `call_options` and `generate` are
shared with the text-to-RGBA generator (`tools.generator`). torch and diffusers are imported
on first use, so registering these tools costs nothing.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_engine import core
from data_engine.core import register
from data_engine.tools import hf, imaging, inpainter

TOOL = "inpainter 'diffusers'"
# Base pipelines that accept a ControlNet for depth guidance (AutoPipeline swaps in their
# ControlNet variants).
_CONTROLNET_BASES = ('StableDiffusionInpaintPipeline', 'StableDiffusionXLInpaintPipeline')


def read_class(tool: str, path, index: str = 'model_index.json') -> tuple[Path, str]:
  """The folder and the `_class_name` its `index` file names (a pipeline's model_index.json
  or a model's config.json); a clear error when either is missing or unreadable."""
  if not path:
    raise ValueError(f'{tool}: no diffusers folder given (option `path`)')
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f'{tool}: no such folder {folder}')
  file = folder / index
  if not file.is_file():
    raise FileNotFoundError(f'{tool}: {folder} has no {index}, so it is not a diffusers folder')
  try:
    name = json.loads(file.read_text())['_class_name']
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{tool}: {file} names no _class_name ({type(e).__name__}: {e})') from None
  return folder, str(name)


def _tasks() -> dict[str, tuple[Any, set[str], set[str]]]:
  """Per task: the AutoPipeline class, the pipeline classes it maps, and those loaded by their
  own class. ControlNet / Control variants are left out: they need a control image the task
  does not have (depth guidance adds the ControlNet itself). FLUX fill is not in
  AutoPipeline's table."""
  import diffusers
  from diffusers.pipelines import auto_pipeline

  def names(mapping):
    return {c.__name__ for c in mapping.values() if 'Control' not in c.__name__}
  return {
      'inpainting': (diffusers.AutoPipelineForInpainting,
                     names(auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING), {'FluxFillPipeline'}),
      'text-to-image': (diffusers.AutoPipelineForText2Image,
                        names(auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING), set())}


def load_pipeline(tool: str, path, task: str, device: str = 'auto', dtype: str = 'auto',
                  **components):
  """A local diffusers pipeline for `task` ('inpainting' | 'text-to-image') on `device`.

  The folder's model_index.json must name a pipeline class for the task; extra `components`
  (e.g. a ControlNet) are handed to `from_pretrained`.
  """
  import diffusers
  folder, name = read_class(tool, path)
  auto, mapped, own = _tasks()[task]
  if name not in mapped | own:
    raise ValueError(f'{tool}: {folder} holds a {name}, not a pipeline for {task} '
                     f'(one of {", ".join(sorted(mapped | own))})')
  device = hf.pick_device(tool, device)
  torch_type = hf.torch_dtype(tool, dtype, device)
  loader = auto if name in mapped else getattr(diffusers, name)
  try:
    pipe = loader.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                  dtype=torch_type, **components)
  except Exception as e:  # diffusers raises many types; all mean "this folder does not load"
    raise ValueError(f'{tool}: cannot load the {name} at {folder}: {type(e).__name__}: {e}') from e
  pipe.to(device)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def call_options(tool: str, pipe, **options) -> dict[str, Any]:
  """The options that are set (not None), checked against the pipeline's `__call__` so that
  one it does not take (FLUX fill has no negative prompt) fails at start-up."""
  kwargs = {k: v for k, v in options.items() if v is not None}
  unknown = sorted(set(kwargs) - set(inspect.signature(pipe.__call__).parameters))
  if unknown:
    raise ValueError(f'{tool}: {type(pipe).__name__} takes no {", ".join(unknown)}')
  return kwargs


def vae_factor(pipe) -> int:
  """What image sides must be multiples of: the VAE's factor, times 2 for pipelines that pack
  latents in 2x2 patches (FLUX), as the pipeline's own image processor records."""
  return int(pipe.image_processor.config.vae_scale_factor)


def generate(pipe, seed: int, **kwargs) -> np.ndarray:
  """The pipeline's first image as float32 [H, W, 3] in [0, 1]."""
  import torch
  # A CPU generator draws the same noise whichever device runs the model.
  generator = torch.Generator('cpu').manual_seed(int(seed))
  images = pipe(**kwargs, generator=generator, output_type='np').images
  return np.asarray(images[0], np.float32)


@register('inpainter', 'diffusers')
class DiffusersInpainter:
  """Fills a hole with a local diffusers inpainting pipeline (see the module docstring).

  `steps`, `guidance_scale`, `strength`, `negative_prompt` left None take the pipeline's
  defaults. With `controlnet` (a local ControlNetModel folder, SD / SDXL inpainting only) the
  pipeline is guided by the nearness map of the `depth` tool (default 'vertical_prior'), whose
  values inside the hole are first filled from its surroundings (Telea): the guidance then
  describes the scene behind the removed object rather than the object.
  """

  def __init__(self, path: str, prompt: str = 'background, empty scene',
               negative_prompt: str | None = None, steps: int | None = 30,
               guidance_scale: float | None = None, strength: float | None = None,
               seed: int = 0, resolution: int = 512, margin: int = 32,
               controlnet: str | None = None, controlnet_scale: float | None = None,
               depth: str | dict | None = None, device: str = 'auto', dtype: str = 'auto'):
    if margin < 0:
      raise ValueError(f'{TOOL}: margin must be >= 0, got {margin}')
    if controlnet is None and (depth is not None or controlnet_scale is not None):
      raise ValueError(f'{TOOL}: depth and controlnet_scale need a controlnet folder')
    self.seed, self.resolution, self.margin = seed, resolution, margin
    components, self.depth = {}, None
    if controlnet is not None:
      folder, name = read_class(TOOL, path)
      if name not in _CONTROLNET_BASES:
        raise ValueError(f'{TOOL}: depth guidance needs an SD or SDXL inpainting pipeline; '
                         f'{folder} holds a {name}')
      components['controlnet'] = _load_controlnet(controlnet, device, dtype)
      self.depth = core.create('depth', depth or 'vertical_prior')
    self.pipe = load_pipeline(TOOL, path, 'inpainting', device, dtype, **components)
    self.factor = vae_factor(self.pipe)
    if resolution < self.factor:
      raise ValueError(f'{TOOL}: resolution {resolution} is below the VAE factor {self.factor}')
    self.options = call_options(TOOL, self.pipe, prompt=prompt, negative_prompt=negative_prompt,
                                num_inference_steps=steps, guidance_scale=guidance_scale,
                                strength=strength,
                                controlnet_conditioning_scale=controlnet_scale)

  def work_size(self, height: int, width: int) -> tuple[int, int]:
    """(width, height) the pipeline runs at for a crop of that size: longer side
    `resolution`, each side rounded to a multiple of the VAE factor."""
    f = self.factor
    w, h = imaging.fit_size((height, width), self.resolution, grow=True)
    return max(f, round(w / f) * f), max(f, round(h / f) * f)

  def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.array(image, np.float32)
    mask = np.asarray(mask, bool)
    crop = imaging.crop_around(mask, self.margin)
    if crop is None:
      return out
    hole = mask[crop]
    h, w = hole.shape
    size = self.work_size(h, w)
    # Any hole pixel under a resized pixel makes it a hole: no object colour leaks in.
    inputs = {'image': imaging.resize(out[crop], size),
              'mask_image': (imaging.resize(hole.astype(np.float32), size) > 0).astype(np.float32),
              'width': size[0], 'height': size[1]}
    if self.depth is not None:
      inputs['control_image'] = self._control(out, mask, crop, size)
    filled = imaging.resize(generate(self.pipe, self.seed, **self.options, **inputs), (w, h))
    out[crop][hole] = np.clip(filled[hole], 0, 1)
    return out

  def _control(self, image: np.ndarray, mask: np.ndarray, crop, size) -> np.ndarray:
    """The depth ControlNet's input for the crop: nearness, hole filled, as [1, h, w, 3]."""
    near = np.clip(np.asarray(self.depth(image), np.float32), 0, 1)
    near = inpainter.Telea(radius=5)(near[..., None], mask)[..., 0]
    return np.repeat(imaging.resize(near[crop], size)[None, ..., None], 3, axis=-1)


def _load_controlnet(path: str, device: str, dtype: str):
  from diffusers import ControlNetModel
  folder, name = read_class(TOOL, path, 'config.json')
  if name != 'ControlNetModel':
    raise ValueError(f'{TOOL}: {folder} holds a {name}, not a ControlNetModel')
  try:
    return ControlNetModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True,
        dtype=hf.torch_dtype(TOOL, dtype, hf.pick_device(TOOL, device)))
  except Exception as e:  # as in load_pipeline
    raise ValueError(f'{TOOL}: cannot load the ControlNet at {folder}: '
                     f'{type(e).__name__}: {e}') from e
