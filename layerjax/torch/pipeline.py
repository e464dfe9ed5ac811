"""`LayerDecomposerPipeline`: a trained decomposer as a PyTorch user calls it, the way
diffusers' pipelines are called.

    from layerjax.torch import LayerDecomposerPipeline
    pipe = LayerDecomposerPipeline.from_pretrained('out/demo/pytorch')   # to-pytorch's folder
    sample = pipe('photo.jpg', box=(40, 30, 200, 220), num_inference_steps=25)
    layers = pipe(photo, point=(120, 80), text='the mug', output_type='pil')
    scene = pipe(photo)                                  # whole scene: every object found

Every step before and after the network is the JAX `Decomposer`'s own code
(`layerjax.infer.decomposer`, numpy only): the photo brought to the model's resolution, the
prompt rendered as training renders it, seeds sampled and the best kept, alpha upsampled and
the layers solved exactly against the photo. Only the network runs in PyTorch
(`TorchBackend`), so the same inputs and noise give JAX's layers. JAX is never imported.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from layerjax.data.schema import LayeredSample, to_uint8
from layerjax.infer.decomposer import MAX_PIXELS, Decomposer
from layerjax.infer.prompts import PromptError, Query
from layerjax.torch.backend import TorchBackend, nhwc_noise

OUTPUT_TYPES = ('sample', 'pil')


class LayerDecomposerPipeline:
  """An exported decomposer (`python -m layerjax.convert to-pytorch`) and its driver."""

  def __init__(self, backend: TorchBackend, *, max_pixels: int = MAX_PIXELS):
    self.backend = backend
    self.decomposer = Decomposer(backend, max_pixels=max_pixels)

  @classmethod
  def from_pretrained(cls, path, *, device=None, torch_dtype: torch.dtype | None = None,
                      embeddings=None, max_pixels: int = MAX_PIXELS
                      ) -> 'LayerDecomposerPipeline':
    """The export at `path` on `device` (default CPU) in `torch_dtype` (default as saved);
    `embeddings`: precomputed text embeddings (a safetensors file) for text prompts to a
    model that reads SD3's. Every component is checked before any is built, and loading
    reports empty missing / unexpected keys (`backend.loading_info`); the network is
    `backend.decomposer`, the scheduler `backend.scheduler`."""
    return cls(TorchBackend.from_pretrained(path, device, torch_dtype, embeddings),
               max_pixels=max_pixels)

  def __call__(self, image, box=None, point=None, mask=None, text: str | None = None, *,
               num_inference_steps: int | None = None, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
               num_seeds: int = 1, seed: int = 0, max_layers: int | None = None,
               output_type: str = 'sample', sample_id: str = 'decomposed'):
    """`image` (a path, PIL image or array) -> its layers. Prompts in the photo's pixels:
    `box` (x0, y0, x1, y1), `point` one (x, y) or a list of them, `mask` (bool [H, W] or a
    PNG path), `text`; none of them: the whole scene (at most `max_layers` objects).
    `num_inference_steps` (default: the model's `eval.sample_steps`), `guidance_scale`
    (classifier-free guidance; 1: none). Noise: `latents` [1, K, C, h, w] (the torch layout of
    the initial latents at the model's resolution), else drawn from `generator`, else seed
    `seed + i` for the i-th of `num_seeds` (the one closest to the photo is kept).
    `output_type` 'sample': a `LayeredSample`; 'pil': its layers as RGBA PIL images, back to
    front. Every input is checked before any compute."""
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f'output_type {output_type!r}: expected one of {OUTPUT_TYPES}')
    if latents is not None and generator is not None:
      raise ValueError('latents and generator: give one (latents are the noise itself)')
    if latents is not None and num_seeds != 1:
      raise ValueError(f'latents: one initial noise, so num_seeds must be 1, got {num_seeds}')
    query = _query(box, point, mask, text)
    sample = self.decomposer.decompose(
        image, query, seeds=num_seeds, seed=seed, steps=num_inference_steps,
        guidance=guidance_scale, max_layers=max_layers, sample_id=sample_id,
        noise=_noise(self.backend, latents, generator))
    return sample if output_type == 'sample' else layer_images(sample)


def _query(box, point, mask, text) -> Query | None:
  if box is None and point is None and mask is None and not text:
    return None  # the whole scene
  points = ()
  if point is not None:
    arr = np.asarray(point, np.float64)
    if arr.shape == (2,):
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
      raise PromptError(f'point {point!r}: expected (x, y) or a list of (x, y)')
    points = tuple(map(tuple, arr.tolist()))
  return Query(points=points, box=None if box is None else tuple(box), mask=mask,
               text=text or '')


def _noise(backend: TorchBackend, latents, generator):
  """The driver's `noise` function (seed, NHWC shape) -> initial latents, or None for the
  backend's own draw of each seed."""
  if latents is None and generator is None:
    return None

  def draw(seed: int, shape: tuple) -> np.ndarray:
    if latents is None:
      return backend.noise(seed, shape, generator)
    b, k, h, w, c = shape
    if tuple(latents.shape) != (b, k, c, h, w):
      raise ValueError(f'latents: shape {tuple(latents.shape)}, expected {(b, k, c, h, w)} '
                       '(batch, layers, channels, height, width at the model\'s resolution) '
                       'for this photo')
    return nhwc_noise(latents)
  return draw


def layer_images(sample: LayeredSample) -> list[Image.Image]:
  """The layers as 8-bit straight-alpha RGBA PIL images, back to front."""
  return [Image.fromarray(to_uint8(l.rgba), 'RGBA') for l in sample.layers]
