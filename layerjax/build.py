"""From an experiment config to a model and device-ready batches.

`config.model` describes the `LayerDecomposer`; `config.init.pretrained` names a local
diffusers SD3 / SD3.5 folder (transformer/ and vae/) to start from, or '' for a random
initialisation (from-scratch configs and tests). Text conditioning is either the small byte
encoder (`model.text.encoder = 'bytes'`) or precomputed SD3 embeddings looked up by text in
a safetensors file (`model.text.encoder = 'precomputed'`, `model.text.embeddings`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax.convert import diffusers as convert
from layerjax.models import heads
from layerjax.models.decomposer import (DecomposerConfig, LayerDecomposer, TextEncoderConfig,
                                        widen_input)
from layerjax.models.mmdit import MMDiTConfig
from layerjax.models.shared import TextEmbeddings, tokenize
from layerjax.models.vae import VAEConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _compute(m) -> dict:
  return dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=m.remat,
              attention=m.get('attention', 'xla'))  # configs before it was a key: 'xla'


def _pretrained_folder(config) -> Path | None:
  path = config.init.pretrained
  if not path:
    return None
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(
        f'init.pretrained: {folder}: no such directory. Give a local diffusers SD3/SD3.5 '
        f'folder (with transformer/ and vae/), e.g. one saved by `huggingface-cli download '
        f"stabilityai/stable-diffusion-3-medium-diffusers --local-dir {folder}`, or '' to "
        f'start from random weights')
  return folder


def decomposer_config(config, pretrained: tuple[MMDiTConfig, VAEConfig] | None = None
                      ) -> DecomposerConfig:
  """`config.model` -> `DecomposerConfig`; `pretrained` (the loaded transformer's and VAE's
  configs) replaces the architecture in `config.model` when weights come from a folder."""
  m = config.model
  latents = m.latents.kind
  vae = None
  if latents == 'vae':
    vae = pretrained[1] if pretrained else VAEConfig(**m.latents.get('vae', {}))
    channels = vae.latent_channels
  else:
    channels = 3 * m.latents.factor ** 2
  widths = dict(in_channels=channels * (1 + len(m.conditions)), out_channels=channels)
  if pretrained:
    mmdit = dataclasses.replace(pretrained[0], **widths)
  else:
    mmdit = MMDiTConfig(**{**dict(m.mmdit), **widths}, **_compute(m))
  text = None  # 'precomputed' SD3 embeddings
  if m.text.encoder == 'bytes':
    text = TextEncoderConfig(max_len=m.text.max_len, width=m.text.width, depth=m.text.depth,
                             heads=m.text.heads, out_dim=mmdit.joint_attention_dim,
                             pooled_dim=mmdit.pooled_projection_dim)
  return DecomposerConfig(mmdit=mmdit, layers=tuple(m.layers), conditions=tuple(m.conditions),
                          latents=latents, vae=vae, factor=m.latents.get('factor', 8),
                          text=text, head=m.head.kind, head_width=m.head.get('width', 64),
                          head_conditions=tuple(m.head.get('conditions', ())),
                          head_board_distance=bool(m.head.get('board_distance', False)),
                          long_skip=bool(m.long_skip), prediction=m.prediction)


def model_config(config) -> DecomposerConfig:
  """`decomposer_config` with `init.pretrained`'s architecture read from its config.json
  files (no weights loaded), so that every model error comes before any work."""
  folder = _pretrained_folder(config)
  if folder is None:
    return decomposer_config(config)
  m = config.model
  if m.latents.kind != 'vae':
    raise ValueError("init.pretrained needs model.latents.kind='vae' (SD3's latent space)")
  if m.prediction != 'velocity' or m.long_skip:
    raise ValueError("init.pretrained needs model.prediction='velocity' and no long_skip: "
                     'SD3 predicts velocity, and starts unchanged only so')
  compute = _compute(m)
  transformer = convert.model_config(convert.TRANSFORMER, folder, **compute)
  vae = convert.model_config(convert.kind('vae'), folder, dtype=compute['dtype'],
                             param_dtype=compute['param_dtype'])
  return decomposer_config(config, (transformer, vae))


def build_model(config, seed: int | nnx.Rngs) -> LayerDecomposer:
  """The decomposer, from `init.pretrained` when set (extra channels and layer embedding
  zero, heads from the VAE decoder), else randomly initialised from `seed` (or the given
  `nnx.Rngs`, e.g. `common.abstract`'s for shapes only)."""
  rngs = nnx.Rngs(seed) if isinstance(seed, int) else seed
  cfg = model_config(config)
  folder = _pretrained_folder(config)
  if folder is None:
    return LayerDecomposer(cfg, rngs=rngs)
  compute = _compute(config.model)
  transformer = convert.load_transformer(folder, **compute)
  vae = convert.load_vae(folder, dtype=compute['dtype'], param_dtype=compute['param_dtype'])
  model = LayerDecomposer(cfg, rngs=rngs, vae=vae,
                          transformer=widen_input(transformer, cfg.mmdit.in_channels))
  for name in ('alpha_head', 'shadow_head'):
    if hasattr(model, name):
      heads.init_from_vae_decoder(getattr(model, name), vae.decoder)
  return model


def text_inputs(config):
  """A function texts -> the batch entries the model's text conditioning reads."""
  t = config.model.text
  if t.encoder == 'bytes':
    return lambda texts: {'text_tokens': tokenize(texts, t.max_len)}
  table = TextEmbeddings(t.embeddings)
  def lookup(texts):
    states, pooled = table(texts)
    return {'text_embeds': states, 'pooled_text_embeds': pooled}
  return lookup


# The loader's maps the model and objectives read; strings and bookkeeping stay on the host.
ARRAY_KEYS = ('image', 'prompt', 'boundary', 'background', 'foreground', 'shadow',
              'checkerboard', 'foreground_on_checkerboard', 'shadow_on_checkerboard')


def model_batch(batch: dict, text_fn) -> dict[str, np.ndarray]:
  return {**{k: batch[k] for k in ARRAY_KEYS}, **text_fn(batch['text'])}
