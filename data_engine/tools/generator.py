"""Text-to-RGBA object layers for Gen-n-Val, from a local diffusers text-to-image pipeline.

Gen-n-Val generates transparent objects with LayerDiffuse; diffusers has no RGBA pipeline, so
the object is generated on a plain background (the prompt gets `suffix`) and keyed out of it
by `PlainBackgroundKey`, whose rule is exactly:

  1. The background colour b is the per-channel median of the `border`-px frame of the image.
     A pixel is background-like when max over channels |I - b| <= `tolerance`. The frame must
     be plain: at least `min_plain` of its pixels background-like, else
     Drop('background_not_plain').
  2. The background is the background-like pixels 8-connected to the frame through
     background-like pixels; the key mask is everything else, so object parts that happen to
     have the background's colour stay opaque. An empty key mask is Drop('no_object').
  3. alpha = the `matting` tool's alpha for the key mask (default 'closed_form'), which
     refines a band around the key's outline.
  4. Colour is straight (unpremultiplied), unmixed against the known plain background:
     F = clip((I - (1 - alpha) b) / alpha, 0, 1) where alpha > 0, and F = I where alpha = 0.
     Where alpha = 1, F = I exactly; where F is not clipped, F over b reproduces I.
Gen-n-Val's median filter on alpha comes after validation (`data_engine.gennval`), not here.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from data_engine import core
from data_engine.core import Drop, register
from data_engine.tools.diffusers_inpaint import call_options, generate, load_pipeline, vae_factor

TOOL = "generator 'diffusers_rgba'"


class PlainBackgroundKey:
  """Float32 RGB [H, W, 3] of an object on a plain background -> straight RGBA [H, W, 4] (the
  module docstring's rule)."""

  def __init__(self, tolerance: float = 0.1, border: int = 2, min_plain: float = 0.9,
               matting: str | dict = 'closed_form'):
    if not 0 < tolerance < 1:
      raise ValueError(f'{TOOL}: tolerance must be in (0, 1), got {tolerance}')
    if border < 1:
      raise ValueError(f'{TOOL}: border must be >= 1 px, got {border}')
    if not 0 <= min_plain <= 1:
      raise ValueError(f'{TOOL}: min_plain must be in [0, 1], got {min_plain}')
    self.tolerance, self.border, self.min_plain = tolerance, border, min_plain
    self.matting = core.create('matting', matting)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    if min(h, w) <= 2 * self.border:
      raise Drop('no_object', f'a {w}x{h} image has no inside within its {self.border}-px frame')
    frame = np.ones((h, w), bool)
    frame[self.border:-self.border, self.border:-self.border] = False
    b = np.median(image[frame], axis=0).astype(np.float32)
    like = np.abs(image - b).max(-1) <= self.tolerance
    plain = float(like[frame].mean())
    if plain < self.min_plain:
      raise Drop('background_not_plain', f'{plain:.0%} of the frame is within '
                 f'{self.tolerance} of {np.round(b, 3).tolist()}')
    labels, _ = ndimage.label(like, structure=np.ones((3, 3)))
    outside = np.isin(labels, np.unique(labels[frame & like]))
    key = ~outside
    if not key.any():
      raise Drop('no_object', 'every pixel matches the plain background')
    alpha, _ = self.matting(image, key)
    a = np.clip(alpha, 0, 1).astype(np.float32)[..., None]
    colour = np.where(a > 0, np.clip((image - (1 - a) * b) / np.maximum(a, 1e-6), 0, 1), image)
    return np.concatenate([colour, a], -1).astype(np.float32)


@register('generator', 'diffusers_rgba')
class DiffusersRGBA:
  """`(prompt, seed) -> float32 straight RGBA [H, W, 4]`: the pipeline draws `prompt + suffix`
  with a `seed`ed generator and `PlainBackgroundKey(**key)` cuts the object out.

  `steps`, `guidance_scale`, `negative_prompt`, `height`, `width` left None take the
  pipeline's defaults; `key` takes PlainBackgroundKey's options (tolerance, border, min_plain,
  matting).
  """

  def __init__(self, path: str, suffix: str = ', a single object isolated on a plain white '
               'background', negative_prompt: str | None = None, steps: int | None = 30,
               guidance_scale: float | None = None, height: int | None = None,
               width: int | None = None, device: str = 'auto', dtype: str = 'auto', **key):
    self.key = PlainBackgroundKey(**key)
    self.suffix = suffix
    self.pipe = load_pipeline(TOOL, path, 'text-to-image', device, dtype)
    factor = vae_factor(self.pipe)
    for side, value in (('height', height), ('width', width)):
      if value is not None and (value < factor or value % factor):
        raise ValueError(f'{TOOL}: {side} {value} is not a positive multiple of {factor}')
    self.options = call_options(TOOL, self.pipe, negative_prompt=negative_prompt,
                                num_inference_steps=steps, guidance_scale=guidance_scale,
                                height=height, width=width)

  def __call__(self, prompt: str, seed: int) -> np.ndarray:
    image = generate(self.pipe, seed, prompt=prompt + self.suffix, **self.options)
    return self.key(image)
