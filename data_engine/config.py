"""The engine's configuration: every tool, threshold and seed, in one ConfigDict.

`default_config()` is the offline engine (no weights); `configs/engine.py` holds variants.
`load(spec, overrides)` reads big_vision-style specs, `path/to/file.py[:arg]`, plus
`key.sub=value` overrides (values parsed as Python literals, else kept as strings).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


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

  from data_engine import gennval, synthesis
  c.synthesize = synthesis.default_config()
  c.gennval = gennval.default_config()

  r = c.runner = ml_collections.ConfigDict()
  r.workers = 0                 # 0: in this process
  r.beam_options = []           # e.g. ['--runner=DataflowRunner', '--project=...']
  r.splits = {'train': 0.9, 'validation': 0.05, 'test': 0.05}
  return c


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


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
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not eq or node is None or leaf not in node:
      raise ValueError(f'override {item!r}: expected key=value with an existing key')
    try:
      node[leaf] = _literal(value)
    except TypeError as e:
      raise ValueError(f'override {item!r}: {e}') from None
  return config
