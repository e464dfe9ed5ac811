"""`Decomposer`: a trained layer decomposer as users call it, in any framework.

    d = Decomposer.load('out/demo/model')            # a packed model, or a training workdir
    sample = d.decompose('photo.jpg', Query(box=(40, 30, 200, 220)), seeds=4)   # prompts.Query
    sample = d.decompose(photo, 'the red mug')        # a text prompt
    sample = d.decompose(photo)                       # whole scene: every object it finds

The result is a `LayeredSample` at the photo's resolution: the completed background, then
the referred object's shadow (when it casts one) and the object, recomposing to the photo
(to 1e-5, `postprocess.exact_layers`); without a prompt, every object the proposal tools
find, peeled front to back (`layerjax.infer.scene`). Prompts are rendered exactly as
training renders them (`examples.render_prompt` at the model's resolution, the text as the
loader gives it).
Seeds are sampled one at a time (seed `seed + i`, so a seed's result does not depend on how
many are asked for); the one whose raw recomposition is closest to the photo is kept, and
every seed's score is in the provenance.

This module is numpy only: the network runs in a `Backend`, JAX's (`model.JaxBackend`, what
`Decomposer.load` builds) or PyTorch's (`layerjax.torch.TorchBackend`), so both frameworks
share every step before and after it and give the same layers.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Protocol

import ml_collections
import numpy as np
from PIL import Image

from layerjax.data import examples, images
from layerjax.data.schema import (ALPHA_MIN, Layer, LayeredSample, Prompt, assemble,
                                  composite)
from layerjax.infer import postprocess as post
from layerjax.infer import scene
from layerjax.infer.prompts import PromptError, Query, as_query, check_query
from layerjax.models.shared import latent_geometry

# Larger photos are refused before they are decoded (a 16k x 16k photo's float32 copies
# alone take 3 GB each); the model sees a few hundred pixels a side whatever comes in.
MAX_PIXELS = 64_000_000
SHADOW_MIN = 0.02  # shadow opacity below it is the model's noise: left in the background


class Backend(Protocol):
  """A framework's decomposer network: numpy in and out, NHWC, float32.

  `batch`: 'image', 'prompt', 'checkerboard' [B, H, W, 3] in [0, 1] and the text entries
  (`text_inputs`); `uncond`: `examples.unconditional_inputs`' or None (guidance 1); `noise`:
  the initial latents [B, K, h, w, C]. `decode` returns `flow.decode_layers`' dict:
  {layer name: straight RGBA [B, H, W, 4], 'recomposition': [B, H, W, 3]}."""
  source: str  # where the model came from
  step: int  # the training step of its weights
  config: ml_collections.ConfigDict  # the experiment config it was trained with
  model: dict  # its architecture (`model.config_json`)

  def text_inputs(self, texts: list[str]) -> dict[str, np.ndarray]: ...

  def noise(self, seed: int, shape: tuple[int, ...]) -> np.ndarray: ...

  def sample(self, batch: dict, uncond: dict | None, noise: np.ndarray, steps: int,
             guidance: float): ...

  def decode(self, latents, batch: dict) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Settings:
  """What decomposing needs to know of a model, read from its experiment config and its
  architecture (`model.config_json`), whichever framework runs it."""
  layers: tuple[str, ...]
  latent_factor: int
  latent_channels: int
  step: int  # model sizes are multiples of it: the latent factor times the patch size
  kinds: frozenset[str]  # the prompt kinds it was trained with (`data.prompt_probs`)
  guidable: bool  # trained with condition dropout, so guidance has something to guide from

  @classmethod
  def of(cls, config, model: dict) -> 'Settings':
    factor, channels = latent_geometry(model)
    kinds = frozenset().union(*examples.parse_prompt_probs(config.data.prompt_probs)[0])
    return cls(tuple(model['layers']), factor, channels, factor * model['mmdit']['patch_size'],
               kinds, bool(config.loss.get('cond_dropout', 0.0)))


@dataclasses.dataclass
class Raw:
  """The chosen seed's layers at the photo's resolution, before the exact solve."""
  background: np.ndarray  # [H, W, 3]
  obj: post.Extracted
  provenance: dict


class Decomposer:
  """A decomposer network (`backend`) and the settings it decomposes with."""

  def __init__(self, backend: Backend, *, max_pixels: int = MAX_PIXELS):
    self.backend = backend
    self.config = ml_collections.ConfigDict(backend.config)
    self.settings = Settings.of(self.config, backend.model)
    self.max_pixels = max_pixels

  @classmethod
  def load(cls, path, *, step: int | None = None, mesh=None, dtype: str | None = None,
           embeddings=None, max_pixels: int = MAX_PIXELS) -> 'Decomposer':
    """A packed model folder (`python -m layerjax.decompose pack`) or a training workdir
    (its latest checkpoint, or `step`), run in JAX on `mesh` (default: the first device);
    `dtype` 'float32' / 'bfloat16' (None: as trained); `embeddings`: precomputed text
    embeddings for text prompts to an SD3-text model."""
    from layerjax.infer import model  # JAX: only for a JAX model
    return cls(model.JaxBackend(model.load(path, step=step, mesh=mesh, dtype=dtype), mesh=mesh,
                                embeddings=embeddings), max_pixels=max_pixels)

  # --- inputs ---------------------------------------------------------------------------

  def load_image(self, image) -> np.ndarray:
    """A path, PIL image or array (uint8, or float in [0, 1]) -> float32 [H, W, 3], refused
    above `max_pixels` before it is decoded."""
    if isinstance(image, (str, Path)):
      name = str(image)
      if not Path(image).is_file():
        raise images.ImageError(f'{name}: no such file')
      try:
        with Image.open(image) as im:
          self._check_size(im.size[1], im.size[0], name)
      except (OSError, Image.DecompressionBombError):
        pass  # load_image names what is wrong with it
      return images.load_image(image, alpha='composite')
    if isinstance(image, Image.Image):
      image = np.asarray(image.convert('RGB'))
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
      raise images.ImageError(f'image: expected [H, W, 3], got shape {x.shape}')
    self._check_size(x.shape[0], x.shape[1], 'image')
    if x.dtype == np.uint8:
      return x.astype(np.float32) / 255
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
      raise images.ImageError('image: float values must be finite and in [0, 1]')
    return x

  def _check_size(self, h: int, w: int, name: str) -> None:
    if h * w > self.max_pixels:
      raise images.ImageError(f'{name}: {w}x{h} is {h * w / 1e6:.1f} MP, above the limit of '
                              f'{self.max_pixels / 1e6:.0f} MP (max_pixels)')
    if min(h, w) < 1:
      raise images.ImageError(f'{name}: empty image')

  def _check_settings(self, q: Query | None, seeds: int, steps: int, guidance: float) -> None:
    if seeds < 1 or steps < 1:
      raise ValueError(f'seeds and steps must be >= 1, got seeds={seeds}, steps={steps}')
    if guidance != 1 and not self.settings.guidable:
      raise ValueError(f'guidance={guidance}: this model was trained without condition '
                       'dropout (loss.cond_dropout = 0), so it has no unconditional '
                       'prediction to guide away from; use guidance 1')
    if q is not None:
      untrained = q.kinds - self.settings.kinds
      if untrained:
        raise PromptError(f'prompt {"+".join(sorted(untrained))}: this model was trained '
                          f'with prompt kinds {sorted(self.settings.kinds)} (data.prompt_probs) '
                          'only')
      if not q.kinds:
        raise PromptError('prompt: empty (give points, a box, a mask or a text, or no '
                          'prompt for the whole scene)')

  # --- decomposition --------------------------------------------------------------------

  def decompose(self, image, prompt=None, *, seeds: int = 1, seed: int = 0,
                steps: int | None = None, guidance: float = 1.0,
                max_layers: int | None = None, proposals=None,
                sample_id: str = 'decomposed', noise: Callable | None = None) -> LayeredSample:
    """`image` (path, PIL or array) -> its layers. `prompt`: a `Query`, a text, a dict of
    Query fields, or None for the whole scene (then `max_layers` objects at most, proposed
    by `proposals`, a `layerjax.infer.scene.Proposals`; default: the engine's offline
    detector and depth order). `noise`: a function (seed, shape) -> initial latents (NHWC)
    in place of the backend's own draw (the PyTorch pipeline's `generator` and `latents`).
    Every input is checked before any compute."""
    steps = steps or self.config.eval.sample_steps
    q = as_query(prompt)
    self._check_settings(q, seeds, steps, guidance)
    photo = self.load_image(image)
    settings = dict(seeds=seeds, seed=seed, steps=steps, guidance=float(guidance))
    if q is None:
      return scene.peel(self, photo, proposals or scene.Proposals(), max_layers, settings,
                        sample_id, noise)
    if max_layers is not None:
      raise PromptError('max_layers is for the whole scene (no prompt); a prompt refers to '
                        'one object')
    q = check_query(q, photo.shape[:2])
    t0 = time.perf_counter()
    raw = self.extract(photo, q, **settings, noise=noise)
    t1 = time.perf_counter()
    layers, repaired = post.exact_layers(photo, raw.background, [raw.obj])
    prov = self._provenance(settings, raw.provenance, repaired, photo.shape[:2])
    prov['prompt'] = _describe(q)
    sample = assemble(sample_id, layers, prov, prompts=False)
    target = next(l.name for l in layers if l.kind == 'object')
    if q.points or q.box is not None or q.mask is not None:
      sample.prompts.append(Prompt(target, points=q.points, box=q.box, mask=q.mask))
    sample.provenance['timings']['postprocess'] += time.perf_counter() - t1
    sample.provenance['timings']['total'] = time.perf_counter() - t0
    return sample.validate()

  def _provenance(self, settings: dict, raw: dict, repaired: int, size) -> dict:
    return {'model': self.backend.source, 'step': self.backend.step, **settings,
            'size': list(size), **raw, 'repaired_pixels': repaired}

  def extract(self, photo: np.ndarray, q: Query, *, seeds: int, seed: int, steps: int,
              guidance: float, noise: Callable | None = None) -> Raw:
    """One object (the checked query's) from `photo` [H, W, 3]: every seed sampled, the one
    closest to the photo kept, its layers brought to the photo's resolution."""
    s = self.settings
    g = post.geometry(photo.shape[:2], tuple(self.config.data.image_size), s.step)
    batch = model_inputs(self.config, photo, q, g, self.backend.text_inputs)
    uncond = (examples.unconditional_inputs(batch, self.backend.text_inputs(['']))
              if guidance != 1 else None)
    shape = (1, len(s.layers), g.padded[0] // s.latent_factor, g.padded[1] // s.latent_factor,
             s.latent_channels)
    timings = {'sampling': 0.0, 'decoding': 0.0, 'postprocess': 0.0}
    scores, best = [], None
    sh, sw = g.scaled
    image = batch['image'][0, :sh, :sw]
    for i in range(seeds):
      t = time.perf_counter()
      x = (noise or self.backend.noise)(seed + i, shape)
      latents = self.backend.sample(batch, uncond, x, steps, float(guidance))
      t2 = time.perf_counter()
      decoded = self.backend.decode(latents, batch)
      out = {k: np.asarray(v[0, :sh, :sw], np.float32) for k, v in decoded.items()}
      timings['sampling'] += t2 - t
      timings['decoding'] += time.perf_counter() - t2
      layers = model_layers(out, image)
      err = float(np.abs(_recompose(*layers) - image).mean())
      scores.append(err)
      if best is None or err < scores[best[0]]:
        best = (i, layers)
    t = time.perf_counter()
    label = q.text or 'object'
    background, obj = to_photo(best[1], photo, label=label,
                               referring=(q.text,) if q.text else ())
    if 'background' not in s.layers:  # the photo itself, not its model-sized copy
      background = photo
    recomposed = _recompose(background, obj.colour, obj.alpha, obj.shadow)
    timings['postprocess'] += time.perf_counter() - t
    prov = {'seeds_tried': [seed + i for i in range(seeds)], 'seed_scores': scores,
            'chosen_seed': seed + best[0], 'model_size': list(g.padded),
            # How far the model's own layers are from the photo, before the exact solve:
            # at the model's resolution, and upsampled to the photo's.
            'raw_recompose_l1': scores[best[0]],
            'upsampled_recompose_l1': float(np.abs(recomposed - photo).mean()),
            'timings': timings}
    return Raw(background, obj, prov)

def model_inputs(config, photo: np.ndarray, q: Query, g: post.Geometry,
                 text_inputs: Callable[[list[str]], dict]) -> dict:
  """The model's inputs (one row) for `photo` and the checked query `q` at geometry `g`, as
  the loader makes them for training with experiment `config`; `text_inputs`: texts -> the
  model's text entries."""
  hw = g.padded
  spatial = Prompt('target', points=post.points_to_model(q.points, g),
                   box=None if q.box is None else post.box_to_model(q.box, g),
                   mask=None if q.mask is None else post.mask_to_model(q.mask, g))
  d = config.data
  prompt = examples.render_prompt(hw, spatial, q.kinds, d.point_sigma)
  board = examples.checkerboard(hw, d.checkerboard_cell, np.random.default_rng(0), 0.0)
  batch = {'image': post.to_model(photo, g)[None], 'prompt': prompt[None],
           'checkerboard': board[None, ..., :3]}
  return {**batch, **text_inputs([q.text])}


def to_photo(layers: tuple, photo: np.ndarray, label: str = 'object',
             referring: tuple[str, ...] = ()) -> tuple[np.ndarray, post.Extracted]:
  """One sample's layers (`model_layers`: background, object colour and alpha, shadow RGBA or
  None, at the model's resolution over the photo's region) at `photo`'s resolution, as
  `post.exact_layers` takes them: (background, the object). Alpha below `ALPHA_MIN` and
  shadow opacity below `SHADOW_MIN` become 0; alpha is upsampled guided by the photo."""
  background, colour, alpha, shadow = layers
  size = photo.shape[:2]
  background = np.clip(post.resize(background, size), 0, 1)
  if size[0] > alpha.shape[0] or size[1] > alpha.shape[1]:  # upsampling: edges from the photo
    alpha = post.guided_upsample(alpha, photo)
  else:
    alpha = np.clip(post.resize(alpha, size), 0, 1)
  alpha = np.where(alpha < ALPHA_MIN, 0, alpha).astype(np.float32)
  colour = np.clip(post.resize(colour, size), 0, 1)
  if shadow is not None:
    premult = post.resize(np.concatenate([shadow[..., :3] * shadow[..., 3:],
                                          shadow[..., 3:]], -1), size)
    opacity = np.clip(premult[..., 3], 0, 1)
    opacity = np.where(opacity < SHADOW_MIN, 0, opacity)
    shadow = None
    if opacity.any():
      rgb = np.clip(premult[..., :3] / np.maximum(premult[..., 3:], 1e-6), 0, 1)
      shadow = np.concatenate([rgb, opacity[..., None]], -1).astype(np.float32)
  return background, post.Extracted(alpha, colour, shadow, label=label, referring=referring)


def exact(decoded: dict, photo: np.ndarray) -> list[Layer]:
  """One example's decoded layers ({name: straight RGBA [H, W, 4]} at `photo`'s
  resolution, as `flow.decode_layers` gives them) as `Decomposer.decompose` returns them:
  thresholded (`to_photo`) and solved exactly against `photo` (`post.exact_layers`):
  background, the object's shadow if it casts one, the object."""
  photo = np.asarray(photo, np.float32)
  background, obj = to_photo(model_layers(decoded, photo), photo)
  return post.exact_layers(photo, background, [obj])[0]


def model_layers(out: dict, image: np.ndarray) -> tuple:
  """(background RGB, object colour, object alpha, shadow RGBA or None) from the decoded
  layers; a model without a background layer leaves the photo as it is behind the object."""
  fg = out['foreground']
  background = out['background'][..., :3] if 'background' in out else image
  return background, fg[..., :3], fg[..., 3], out.get('shadow')


def _recompose(background, colour, alpha, shadow) -> np.ndarray:
  ones = np.ones(background.shape[:2] + (1,), np.float32)
  stack = [np.concatenate([background, ones], -1)]
  if shadow is not None:
    stack.append(shadow)
  stack.append(np.concatenate([colour, alpha[..., None]], -1))
  return composite(stack)[..., :3]


def _describe(q: Query) -> dict:
  """The prompt as provenance (the mask as its pixel count)."""
  return {'points': [list(p) for p in q.points],
          'box': None if q.box is None else list(q.box),
          'mask_pixels': None if q.mask is None else int(q.mask.sum()), 'text': q.text}
