"""Shared pieces of the experiment configs in `configs/` (big_vision style: one file is one
experiment, `get_config('variant,key=value,...')`, and `--config.x=y` overrides on top).

`base()` holds every key the trainer reads, with the defaults of a small CPU run; configs
replace what their experiment changes. The MMDiT presets are the official SD3 / SD3.5
shapes (`layerjax.models.mmdit`).
"""

from __future__ import annotations

import ast

import ml_collections

from layerjax.models import mmdit

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, *, variant: str, **defaults) -> ConfigDict:
  """'demo,total_steps=10' -> {variant: 'demo', total_steps: 10}; values are Python literals
  (strings may be bare), typed like their defaults; unknown keys are errors."""
  out = ConfigDict({'variant': variant, **defaults})
  for i, part in enumerate(p for p in (arg or '').split(',') if p):
    key, eq, value = part.partition('=')
    if not eq:
      if i:
        raise ValueError(f'config argument {arg!r}: only the first item may be a bare variant')
      out.variant = part
      continue
    if key not in out:
      raise ValueError(f'config argument {arg!r}: unknown key {key!r} (known: {sorted(out)})')
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    out[key] = type(defaults[key])(parsed) if key in defaults and defaults[key] is not None \
        else parsed
  return out


def mmdit_arch(preset: mmdit.MMDiTConfig, **changes) -> dict:
  arch = {k: getattr(preset, k) for k in mmdit.MMDiTConfig.ARCH_FIELDS}
  arch['dual_attention_layers'] = tuple(arch['dual_attention_layers'])
  arch.update(changes)
  return arch


PRESETS = {'sd3_medium': mmdit.SD3_MEDIUM, 'sd35_medium': mmdit.SD35_MEDIUM,
           'sd35_large': mmdit.SD35_LARGE}


def base() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  c.ema_decay = 0.999

  c.data = ConfigDict(dict(
      name='layered', data_dir='data/tfds', seed=0, global_batch_size=16,
      image_size=(512, 512), num_workers=0, scale_range=(1.0, 1.1),
      prompt_probs={'box': 0.3, 'box+text': 0.2, 'point': 0.15, 'mask': 0.15, 'text': 0.1,
                    'point+text': 0.1},
      point_sigma=8.0, hflip_prob=0.5, checkerboard_cell=16, checkerboard_jitter=0.15,
      boundary_band=4,
      degradations={'erode': {'prob': 0.15, 'strength': (1, 3)},
                    'dilate': {'prob': 0.15, 'strength': (1, 3)},
                    'blur': {'prob': 0.15, 'strength': (0.5, 2.0)},
                    'halo': {'prob': 0.1, 'strength': (0.1, 0.4)},
                    'spill': {'prob': 0.1, 'strength': (0.1, 0.4)},
                    'jpeg': {'prob': 0.1, 'strength': (30, 80)}}))

  # head.conditions: condition maps (e.g. 'image') the conv heads read next to the latent.
  c.model = ConfigDict(dict(
      layers=('background', 'foreground', 'shadow'), conditions=('image', 'prompt'),
      latents={'kind': 'vae'}, head={'kind': 'vae_decoder', 'conditions': ()},
      text={'encoder': 'precomputed', 'embeddings': '', 'max_len': 32, 'width': 128,
            'depth': 2, 'heads': 4},
      mmdit=mmdit_arch(mmdit.SD3_MEDIUM),
      long_skip=False, prediction='velocity', dtype='float32', param_dtype='float32', remat=False))
  c.init = ConfigDict({'pretrained': ''})

  c.loss = ConfigDict(dict(
      logit_mean=0.0, logit_std=1.0, shift=3.0,
      # The terms on the one-step estimate (heads on it, recomposition) on every k-th example:
      # they decode with VAE-shaped networks, the bulk of an SD3 step besides the transformer.
      estimate_every=1,
      weights={'flow': 1.0, 'shadow': 1.0, 'alpha': 1.0, 'recompose': 0.5,
               'restoration': 1.0}))
  c.optimizer = ConfigDict(dict(
      name='adamw', lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
      warmup_steps=500, decay_steps=1000, final_lr_fraction=0.1,
      lr_mults=()))  # ((regex on the parameter path, multiplier), ...)

  c.eval = ConfigDict(dict(
      split='validation', batch_size=8, num_batches=4, sample_steps=28, seed=1234,
      use_ema=True, prompt_probs={'box': 1.0}, grid_rows=4))
  return c
