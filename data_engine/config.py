"""The engine's configuration: every tool, threshold and seed, in one ConfigDict.

`default_config()` is the offline engine (no weights); `configs/engine.py` holds variants.
`load(spec, overrides)` reads big_vision-style specs, `path/to/file.py[:arg]`, plus
`key.sub=value` overrides (values parsed as Python literals, else kept as strings), and
checks the result (`check`) before any work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from data_engine import core, gennval, synthesis
from layerjax import config_spec


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tool_timeout = 120.0        # seconds per tool call before the item is dropped

  d = c.decompose = ml_collections.ConfigDict()
  d.max_side = 512              # photos are resized so their longer side is at most this
  d.transparent = 'composite'   # a photo with transparency: 'composite' or 'refuse' (dropped)
  d.composite_over = (1.0, 1.0, 1.0)  # RGB in [0, 1] a transparent photo is composited over
  d.min_side = 96               # pre-filter: smaller photos are dropped
  d.min_sharpness = 1e-4        # pre-filter: variance of the Laplacian (classical quality)
  d.max_clipped = 0.5           # pre-filter: fraction of pixels clipped to black or white
  d.min_objects, d.max_objects = 1, 20
  d.max_mask_iou = 0.7          # scene understanding: overlapping duplicates are merged
  d.max_object_area = 0.7       # an "object" covering more of the photo is the scene itself
  d.matting_band = 6            # pixels of unknown trimap band around each mask
  d.inpaint_margin = 8          # the background is inpainted over masks dilated this much
  d.shadows = True
  d.min_psnr = 35.0             # post-filter: composite vs photo on visible pixels
  d.min_judge_score = 0.5       # post-filter: the judge agent's quality score
  d.text_agreement = True       # post-filter: caption colour words agree with the layer

  t = c.tools = ml_collections.ConfigDict()
  t.quality = {'name': 'classical'}
  t.saliency = {'name': 'spectral_residual'}
  t.detector = {'name': 'saliency_boxes'}
  t.segmenter = {'name': 'grabcut'}
  t.depth = {'name': 'vertical_prior'}
  t.inpainter = {'name': 'telea', 'radius': 5}
  t.matting = {'name': 'closed_form'}
  t.shadow = {'name': 'ratio'}
  t.captioner = {'name': 'template'}
  # An LLM/VLM agent instead: {'name': 'llm', 'backend': {'name': 'openai', 'base_url':
  # 'http://localhost:8000/v1', 'model': '...', 'api_key_env': 'OPENAI_API_KEY'}} (any
  # OpenAI-compatible server), or 'backend': {'name': 'transformers', 'path': LOCAL_VLM}.
  c.agent = {'name': 'rule_based'}
  # The self-refining loop's evaluator (critique) and optimiser (rewrite_prompt); None: the
  # engine's agent plays both roles.
  c.refine = ml_collections.ConfigDict({'evaluator': None, 'optimiser': None, 'rounds': 3,
                                        'heldout_fraction': 0.5})

  c.synthesize = synthesis.default_config()
  c.gennval = gennval.default_config()

  r = c.runner = ml_collections.ConfigDict()
  r.workers = 0                 # 0: in this process
  r.beam_options = []           # e.g. ['--runner=DataflowRunner', '--project=...']
  r.splits = {'train': 0.9, 'validation': 0.05, 'test': 0.05}
  return c


TOOLS = ('quality', 'saliency', 'detector', 'segmenter', 'depth', 'inpainter', 'matting',
         'shadow', 'captioner', 'text_check')


def spec() -> config_spec.Rule:
  """Every key of `default_config()` with its type and range; keys added there are typed
  like their defaults."""
  s, defaults = config_spec, default_config()
  fraction = s.number(0, 1)
  agent = core.spec_rule('agent')
  return s.section({
      'seed': s.integer(), 'tool_timeout': s.number(above=0),
      'decompose': s.section({
          'max_side': s.integer(lo=1), 'min_side': s.integer(lo=1),
          # 'keep' is the loader's third mode, but the stages need opaque RGB photos.
          'transparent': s.string(('composite', 'refuse')),
          'composite_over': s.seq(fraction, 3),
          'min_sharpness': s.number(lo=0), 'max_clipped': fraction,
          'min_objects': s.integer(lo=0), 'max_objects': s.integer(lo=1),
          'max_mask_iou': fraction, 'max_object_area': fraction,
          'matting_band': s.integer(lo=0), 'inpaint_margin': s.integer(lo=0),
          'min_judge_score': fraction}, defaults=defaults.decompose),
      'tools': s.section({k: core.spec_rule(k, ('agent',) if k == 'captioner' else ())
                          for k in TOOLS}, optional=('text_check',)),
      'agent': agent,
      'refine': s.section({'evaluator': s.maybe(agent), 'optimiser': s.maybe(agent),
                           'rounds': s.integer(lo=1), 'heldout_fraction': fraction}),
      'synthesize': synthesis.CONFIG,
      'gennval': gennval.CONFIG,
      'runner': s.section({'workers': s.integer(lo=0), 'beam_options': s.seq(s.string()),
                           'splits': s.also(s.mapping(s.number(lo=0)), _positive_total)}),
  })


def _positive_total(fractions) -> None:
  if sum(dict(fractions).values()) <= 0:
    raise ValueError(f'some split needs a positive fraction, got {dict(fractions)}')


def check(config) -> None:
  """`config` against `spec()`, and the keys that bound each other; raises
  `config_spec.ConfigError` naming the key."""
  config_spec.check(config, spec())
  d = config.decompose
  for lo, hi in (('min_side', 'max_side'), ('min_objects', 'max_objects')):
    if d[lo] > d[hi]:
      raise config_spec.ConfigError(f'decompose.{lo}={d[lo]} is above decompose.{hi}={d[hi]}')


def load(spec: str | None = None, overrides=()) -> ml_collections.ConfigDict:
  """`spec` 'file.py[:arg]' (its `get_config(arg)`), or None for `default_config()`."""
  if spec is None:
    config = default_config()
  else:
    path, _, arg = spec.partition(':')
    if not Path(path).is_file():
      raise FileNotFoundError(f'config {path}: no such file')
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ValueError(f'config {path}: defines no get_config(arg)')
    config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, eq, value = item.partition('=')
    if not eq:
      raise config_spec.ConfigError(f'--set {item!r}: expected key=value')
    node, path = config, ''
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
        raise config_spec.unknown(f'--set {path}' if path else '--set', part, known)
      parent, node, path = node, node[part], f'{path}.{part}' if path else part
    try:
      parent[part] = config_spec.typed(value, node, path)
    except TypeError:  # a ConfigDict field keeps its type
      raise config_spec.ConfigError(f'{path}: expected {config_spec.type_name(node)}, got '
                                    f'{value!r}') from None
  check(config)
  return config
