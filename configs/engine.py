"""The data engine (ADD) configs: `python -m data_engine ... --config configs/engine.py:VARIANT`.

Variants:
  offline   every tool and agent runs here without weights (the default engine)
  fast      offline, with cheaper tools (Telea inpainting, KNN matting, no shadows) for
            quick looks and tests
  models    RefLade's tools from local weights: OWLv2 + Grounding DINO ensemble, SAM,
            Depth Anything V2, ViTMatte, SD inpainting guided by a depth ControlNet, CLIP
            text checks; Gen-n-Val's generator. Keys (`models,key=value,...`):
              weights   the folder holding one subfolder per model (WEIGHTS below), as
                        `huggingface-cli download <repo> --local-dir weights/<name>` makes
              endpoint  an OpenAI-compatible base URL for the LLM agent (with `model` and
                        `api_key_env`), or
              vlm       a local vision-language model folder for the LLM agent;
                        neither: the rule-based agent
              fallback  True: a tool whose weights are missing runs its offline
                        counterpart (recorded in each sample's provenance); False (default):
                        start-up fails naming the missing folder
"""

from data_engine.config import default_config
from layerjax.config_spec import parse_arg

# Subfolders of `weights`, named after the checkpoints they hold.
WEIGHTS = {'owlv2': 'owlv2-base-patch16-ensemble', 'grounding_dino': 'grounding-dino-base',
           'sam': 'sam-vit-huge', 'depth': 'Depth-Anything-V2-Large-hf',
           'vitmatte': 'vitmatte-base-composition-1k', 'clip': 'clip-vit-large-patch14',
           'inpaint': 'stable-diffusion-inpainting', 'controlnet': 'control_v11f1p_sd15_depth',
           'generator': 'stable-diffusion-xl-base-1.0'}
# An open vocabulary for the detectors: things that stand in scenes and cast shadows.
LABELS = ('person', 'dog', 'cat', 'car', 'bicycle', 'chair', 'table', 'bottle', 'cup', 'vase',
          'potted plant', 'lamp', 'bag', 'box', 'ball', 'toy', 'book', 'shoe', 'bench', 'sign')
NEGATIVES = ('person', 'animal', 'vehicle', 'furniture', 'plant', 'food', 'building', 'sky')


def models(config, a) -> None:
  w = lambda key: f'{a.weights}/{WEIGHTS[key]}'
  offline = default_config().tools

  def tool(spec: dict, kind: str) -> dict:
    return {**spec, 'fallback': dict(offline[kind])} if a.fallback else spec

  t = config.tools
  t.detector = tool({'name': 'ensemble', 'iou': 0.5, 'thresholds': [0.2, 0.3], 'members': [
      {'name': 'owlv2', 'path': w('owlv2'), 'labels': list(LABELS), 'threshold': 0.1},
      {'name': 'grounding_dino', 'path': w('grounding_dino'), 'labels': list(LABELS)}]},
      'detector')
  t.segmenter = tool({'name': 'sam', 'path': w('sam')}, 'segmenter')
  t.depth = tool({'name': 'depth_anything', 'path': w('depth')}, 'depth')
  t.matting = tool({'name': 'vitmatte', 'path': w('vitmatte')}, 'matting')
  t.inpainter = tool({'name': 'diffusers', 'path': w('inpaint'), 'controlnet': w('controlnet'),
                      'depth': {'name': 'depth_anything', 'path': w('depth')}}, 'inpainter')
  t.text_check = {'name': 'clip', 'path': w('clip'), 'negatives': list(NEGATIVES)}
  if a.fallback:
    t.text_check['fallback'] = {'name': 'rule_based'}
  config.gennval.generator = {'name': 'diffusers_rgba', 'path': w('generator')}
  if a.endpoint:
    backend = {'name': 'openai', 'base_url': a.endpoint, 'model': a.model,
               'api_key_env': a.api_key_env}
  elif a.vlm:
    backend = {'name': 'transformers', 'path': a.vlm}
  else:
    return
  config.agent = {'name': 'llm', 'backend': backend}
  config.tools.captioner = {'name': 'agent'}


def get_config(arg: str = 'offline'):
  a = parse_arg(arg, variant='offline', weights='weights', endpoint='', model='',
                api_key_env='OPENAI_API_KEY', vlm='', fallback=False)
  config = default_config()
  if a.variant == 'offline':
    return config
  if a.variant == 'fast':
    config.tools.matting = {'name': 'knn'}
    config.decompose.shadows = False
    config.decompose.max_side = 256
    return config
  if a.variant == 'models':
    models(config, a)
    return config
  raise ValueError(f'configs/engine.py: unknown variant {a.variant!r} (offline, fast, models)')
