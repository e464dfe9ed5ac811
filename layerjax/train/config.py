"""Shared pieces of the experiment configs in `configs/` (big_vision style: one file is one
experiment, `get_config('variant,key=value,...')` read by `config_spec.parse_arg`, and
`--config.x=y` overrides on top).

`base()` holds every key the trainer reads, with the defaults of a small CPU run; configs
replace what their experiment changes. `SPEC` states each key's type and range and `check`
runs it, with the checks that need the model's shape, before any data or model work. The
MMDiT presets are the official SD3 / SD3.5 shapes (`layerjax.models.mmdit`).
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_collections

from layerjax import config_spec as spec
from layerjax import build, parallel
from layerjax.convert import diffusers as convert
from layerjax.convert import files
from layerjax.data import pipeline
from layerjax.evaluate import evaluators
from layerjax.fileio import is_url
from layerjax.models import mmdit
from layerjax.models.shared import CONDITIONS, LAYERS
from layerjax.models.vae import VAEConfig
from layerjax.train import objectives

ConfigDict = ml_collections.ConfigDict


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
  # (data, fsdp, tensor). -1 takes the remaining devices; on the data axis it takes as many
  # as divide data.global_batch_size and the rest join the tensor axis, with fsdp and tensor
  # cut to what the device count allows (`parallel.fit_shape`): one config runs on 1 device
  # or a pod. Explicit sizes (no -1 on data) are used as given.
  c.mesh = (-1, 1, 1)
  # Multislice: how many slices (joined by the data-centre network) each mesh axis spans;
  # its product is the number of slices, e.g. (2, 1, 1) for data parallelism over 2 slices.
  c.mesh_dcn = (1, 1, 1)
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
      long_skip=False, prediction='velocity', dtype='float32', param_dtype='float32',
      remat='none', attention='xla'))
  c.init = ConfigDict({'pretrained': ''})

  c.loss = ConfigDict(dict(
      logit_mean=0.0, logit_std=1.0, shift=3.0,
      # The terms on the one-step estimate (heads on it, recomposition) on every k-th example:
      # they decode with VAE-shaped networks, the bulk of an SD3 step besides the transformer.
      estimate_every=1,
      # The probability that a training example is unconditional (blank prompt map, empty
      # text): what classifier-free guidance at sampling contrasts with (`flow.sample_latents`).
      cond_dropout=0.0,
      weights={'flow': 1.0, 'shadow': 1.0, 'alpha': 1.0, 'recompose': 0.5,
               'restoration': 1.0}))
  c.optimizer = ConfigDict(dict(
      name='adamw', lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
      warmup_steps=500, decay_steps=1000, final_lr_fraction=0.1,
      lr_mults=(),  # ((regex on the parameter path, multiplier), ...)
      clip_groups=()))  # regexes: parameters clipped by their own norm (`trainer.clip`)

  c.eval = ConfigDict(dict(
      # The global eval batch is batch_per_device x the data-parallel size (data x fsdp):
      # every device samples the same number of examples whatever the mesh, so an evaluation
      # takes the same time on a pod as on one device and sees more examples there.
      split='validation', batch_per_device=8, num_batches=4, sample_steps=28, seed=1234,
      use_ema=True, prompt_probs={'box': 1.0}, grid_rows=4,
      # Evaluator name -> its options (`layerjax.evaluate.evaluators.REGISTRY`), each run on
      # the model and on the trivial baseline.
      evaluators={'layers': {}}))
  return c


def _regex(pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f'bad regex {pattern!r}: {e}') from None


def _lr_mult(rule) -> None:
  pattern, mult = rule
  if not isinstance(pattern, str) or isinstance(mult, bool) or not isinstance(mult,
                                                                             (int, float)):
    raise ValueError(f'expected (regex, multiplier), got {rule!r}')
  _regex(pattern)


_POSITIVE = spec.integer(lo=1)


def _check_evaluators(value) -> None:
  for name, options in value.items():
    evaluators.check_options(name, options)

_MMDIT = {k: _POSITIVE for k in mmdit.MMDiTConfig.ARCH_FIELDS}
_MMDIT.update(dual_attention_layers=spec.seq(spec.integer(lo=0)),
              qk_norm=spec.maybe(spec.string(('rms_norm',))))

# Reward finetuning (`layerjax.train.reasonx`, `configs/reasonx.py` says what each key does).
_UNIT = spec.number(above=0, hi=1)
REASONX = spec.section({
    'start': spec.string(), 'photos': spec.string(), 'held_out': spec.string(),
    'held_out_photos': _POSITIVE, 'eval_layers': spec.boolean(),
    'photos_per_step': _POSITIVE, 'group_size': spec.integer(lo=2),
    'sample_photos': _POSITIVE, 'sample_steps': _POSITIVE,
    'noise_level': spec.number(above=0), 'guidance': spec.number(above=0),
    'timesteps': _POSITIVE, 'minibatches': _POSITIVE, 'clip': spec.number(above=0, hi=0.99),
    'kl': spec.number(lo=0), 'relations': _POSITIVE, 'band': spec.number(above=0),
    'thresholds': spec.mapping(_UNIT, ('alpha', 'shadow', 'colour', 'front')),
    'prompts': spec.string(('detector', 'dataset')), 'detector': spec.anything(),
    'relation_weight': spec.number(lo=0),
    'judge': spec.section({'kind': spec.string(('ground_truth', 'agent')),
                           'agent': spec.anything(), 'workers': _POSITIVE,
                           'cache': spec.string()}),
    'preference': spec.section({'weight': spec.number(lo=0), 'agent': spec.anything(),
                                'pairs': spec.integer(lo=0)}),
})

# Every key of `base()` (and the optional `demo`, read by `layerjax.demo`, and `reasonx`).
SPEC = spec.section({
    'seed': spec.integer(), 'total_steps': _POSITIVE, 'log_every': _POSITIVE,
    'eval_every': spec.integer(lo=0), 'checkpoint_every': _POSITIVE,
    'keep_checkpoints': _POSITIVE, 'async_checkpoints': spec.boolean(),
    'mesh': spec.also(spec.seq(spec.integer(), 3), parallel.check_mesh_shape),
    'mesh_dcn': spec.also(spec.seq(spec.integer(), 3), parallel.check_dcn_shape),
    'ema_decay': spec.number(0, 1),
    'data': pipeline.CONFIG,
    'model': spec.section({
        'layers': spec.seq(spec.string(LAYERS)),
        'conditions': spec.seq(spec.string(CONDITIONS)),
        'latents': spec.section({'kind': spec.string(('vae', 'space_to_depth')),
                                 'factor': _POSITIVE,
                                 'vae': spec.mapping(spec.anything(), VAEConfig.ARCH_FIELDS)},
                                optional=('factor', 'vae')),
        'head': spec.section({'kind': spec.string(('vae_decoder', 'conv')), 'width': _POSITIVE,
                              'conditions': spec.seq(spec.string(CONDITIONS)),
                              'board_distance': spec.boolean()},
                             optional=('width', 'conditions', 'board_distance')),
        'text': spec.section({'encoder': spec.string(('bytes', 'precomputed')),
                              'embeddings': spec.string(), 'max_len': _POSITIVE,
                              'width': _POSITIVE, 'depth': _POSITIVE, 'heads': _POSITIVE}),
        'mmdit': spec.section(_MMDIT, optional=('in_channels', 'out_channels')),
        'long_skip': spec.boolean(), 'prediction': spec.string(('velocity', 'sample')),
        'dtype': spec.string(build.DTYPES), 'param_dtype': spec.string(build.DTYPES),
        'remat': spec.string(mmdit.REMAT_POLICIES),
        'attention': spec.string(('xla', 'cudnn'))}),
    'init': spec.section({'pretrained': spec.string()}),
    'loss': spec.section({
        'logit_mean': spec.number(), 'logit_std': spec.number(above=0),
        'shift': spec.number(above=0), 'estimate_every': _POSITIVE,
        'cond_dropout': spec.number(0, 1),
        'weights': spec.mapping(spec.number(lo=0), objectives.TERMS)}),
    'optimizer': spec.section({
        'name': spec.string(('adamw',)), 'lr': spec.number(above=0), 'b1': spec.number(0, 1),
        'b2': spec.number(0, 1), 'eps': spec.number(lo=0), 'weight_decay': spec.number(lo=0),
        'clip_norm': spec.number(above=0), 'warmup_steps': spec.integer(lo=0),
        'decay_steps': spec.integer(lo=0), 'final_lr_fraction': spec.number(0, 1),
        'lr_mults': spec.seq(spec.also(spec.seq(spec.anything(), 2), _lr_mult)),
        'clip_groups': spec.seq(spec.also(spec.string(), _regex))}),
    'eval': spec.section({
        'split': spec.string(), 'batch_per_device': _POSITIVE, 'num_batches': _POSITIVE,
        'sample_steps': _POSITIVE, 'seed': spec.integer(), 'use_ema': spec.boolean(),
        'prompt_probs': pipeline.PROMPT_PROBS, 'grid_rows': _POSITIVE,
        'evaluators': spec.also(spec.mapping(spec.mapping(spec.anything()),
                                             evaluators.REGISTRY), _check_evaluators)}),
    'demo': spec.section({'scenes': _POSITIVE, 'size': _POSITIVE,
                          'workers': spec.integer(lo=0)}),
    'reasonx': REASONX,
}, optional=('demo', 'reasonx'))


def check(config) -> None:
  """`config` against `SPEC`, then what the keys imply together, all before anything is
  loaded: the model they describe (with `init.pretrained`'s architecture, read from its
  config.json files, and its weight files present), image sizes its latents and patches
  divide, loss terms its layers have, the text embeddings file. Raises
  `config_spec.ConfigError` (or the model's own ValueError) naming the key. The checks that
  need the devices are `trainer.check_config`'s."""
  spec.check(config, SPEC)
  m = config.model
  if m.latents.kind == 'space_to_depth' and 'factor' not in m.latents:
    raise spec.ConfigError("model.latents.factor: missing (latents 'space_to_depth' need it)")
  for key, path in (('init.pretrained', config.init.pretrained),
                    ('model.text.embeddings', m.text.embeddings)):
    if is_url(path):  # read with safetensors' mmap, which needs a local file
      raise spec.ConfigError(f'{key}: {path} is a URL; weights and embeddings are read from '
                             'local files on every worker: copy them there first (e.g. '
                             f'launch/tpu_pod.sh --sync {path}:LOCAL_PATH) and give LOCAL_PATH')
  cfg = build.model_config(config)
  _check_weights(config.init.pretrained)
  step = cfg.latent_factor * cfg.mmdit.patch_size
  if any(s % step for s in config.data.image_size):
    raise spec.ConfigError(f'data.image_size: {tuple(config.data.image_size)} must be '
                           f'divisible by latent factor x patch size = {step}')
  objectives.check_weights(dict(config.loss.weights), m.layers)
  if m.text.encoder == 'precomputed' and not Path(m.text.embeddings).is_file():
    what = (f'{m.text.embeddings!r}: no such file' if m.text.embeddings
            else 'not set, and this model reads precomputed SD3 text embeddings')
    raise spec.ConfigError(f'model.text.embeddings: {what} (make them with `python -m '
                           'data_engine embed-texts`, then give embeddings=PATH)')


def _check_weights(pretrained: str) -> None:
  """The transformer's and the VAE's weight files are in `pretrained` (headers only read)."""
  if not pretrained:
    return
  for kind in (convert.TRANSFORMER, convert.kind('vae')):
    try:
      files.weight_files(convert.model_folder(Path(pretrained).expanduser(), kind))
    except (OSError, ValueError) as e:
      raise spec.ConfigError(f'init.pretrained: {e}') from None


def host_needs(config) -> tuple[int, int]:
  """(CPU cores, GiB of memory) one training process (one per host or node) needs: a core
  for each of `data.num_workers` loader processes and 4 for the training process (its
  prefetch and checkpoint threads); 4 GiB per loader process (a 512 px sample's maps are
  ~30 MB, a worker buffers a few batches) and 64 GiB for the training process, which holds
  a pretrained model in float32 while it is placed (SD3.5 large: 32 GB) and stages
  checkpoints on the host."""
  workers = config.data.num_workers
  return workers + 4, 4 * workers + 64


def _print_host_needs(_) -> None:
  spec.check(_CONFIG.value, SPEC)
  print(*host_needs(_CONFIG.value))


if __name__ == '__main__':
  # `python -m layerjax.train.config --config=FILE[:ARG] [--config.KEY=VALUE ...]` prints
  # host_needs' "CORES GIB" (launch/slurm.sh reads it).
  from layerjax import cli
  _CONFIG = cli.define_config_file(None, 'experiment config file[:arg]')
  cli.run_absl(_print_host_needs)
