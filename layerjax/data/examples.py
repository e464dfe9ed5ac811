"""Training examples for referring layer decomposition (RefLayer / LiWi), from a LayeredSample.

* `referring_targets`: for one object, the background with that object *and its shadow*
  removed, the object's RGBA and its shadow's RGBA (zeros when it casts none).
* `render_prompt`: RefLayer's colour-coded prompt image — a solid blue canvas, the box as a
  filled green region, the mask as a red region, each point as a Gaussian heat-map (drawn in
  white, so it stays visible over box and mask).
* `parse_prompt_probs`: the prompt kinds a config trains with; `unconditional_inputs`: the
  blank prompt and empty text that classifier-free guidance samples against.
* `checkerboard`: the colour-jittered checkerboard that layers are blended over for the
  latent targets of RefLayer's alpha decoder (plain colours let it cheat).
All functions are numpy, float32 in [0, 1], HWC, and take an explicit `np.random.Generator`.
"""

from __future__ import annotations

import numpy as np

from layerjax.data.schema import LayeredSample, Prompt, composite

BLUE, GREEN, RED, WHITE = ((0., 0., 1.), (0., 1., 0.), (1., 0., 0.), (1., 1., 1.))


def referring_targets(sample: LayeredSample, target: str) -> dict[str, np.ndarray]:
  """Targets for object `target`: 'background' (RGB), 'foreground' and 'shadow' (RGBA)."""
  obj = sample.layer(target)
  if obj.kind != 'object':
    raise ValueError(f'sample {sample.id!r}: {target!r} is a {obj.kind}, not an object')
  shadows = [l for l in sample.layers if l.kind == 'shadow' and l.owner == target]
  removed = {target, *(l.name for l in shadows)}
  rest = [l for l in sample.layers if l.name not in removed]
  h, w = sample.size
  shadow = composite(shadows) if shadows else np.zeros((h, w, 4), np.float32)
  return {'background': composite(rest)[..., :3].astype(np.float32),
          'foreground': obj.rgba, 'shadow': shadow.astype(np.float32)}


def render_prompt(size: tuple[int, int], prompt: Prompt, use: frozenset[str],
                  point_sigma: float) -> np.ndarray:
  """The prompt image [H, W, 3] for the prompt kinds in `use` ('box', 'mask', 'point')."""
  h, w = size
  img = np.empty((h, w, 3), np.float32)
  img[:] = BLUE
  if 'box' in use and prompt.box is not None:
    x0, y0, x1, y1 = prompt.box
    img[y0:y1, x0:x1] = GREEN
  if 'mask' in use and prompt.mask is not None:
    img[prompt.mask] = RED
  if 'point' in use and prompt.points:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((h, w), np.float32)
    for x, y in prompt.points:
      heat = np.maximum(heat, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * point_sigma ** 2)))
    img = img * (1 - heat[..., None]) + heat[..., None] * np.asarray(WHITE, np.float32)
  return img


def checkerboard(size: tuple[int, int], cell: int, rng: np.random.Generator,
                 jitter: float) -> np.ndarray:
  """An opaque RGBA checkerboard of two random colours, each channel within `jitter` of
  light / dark grey."""
  h, w = size
  light = np.clip(0.8 + rng.uniform(-jitter, jitter, 3), 0, 1)
  dark = np.clip(0.4 + rng.uniform(-jitter, jitter, 3), 0, 1)
  yy, xx = np.mgrid[0:h, 0:w]
  board = np.where(((yy // cell + xx // cell) % 2 == 0)[..., None], light, dark)
  return np.concatenate([board, np.ones((h, w, 1))], -1).astype(np.float32)


PROMPT_KINDS = ('box', 'mask', 'point', 'text')
SPATIAL = ('box', 'mask', 'point')


def parse_prompt_probs(probs) -> tuple[list[frozenset], np.ndarray]:
  """`data.prompt_probs` ({'box': 0.5, 'box+text': 0.2, ...}) -> (kind sets, probabilities)."""
  combos, weights = [], []
  for key, p in dict(probs).items():
    kinds = frozenset(key.split('+'))
    if kinds - set(PROMPT_KINDS):
      raise ValueError(f'{key!r} is not a +-joined combination of the kinds {PROMPT_KINDS}')
    combos.append(kinds)
    weights.append(float(p))
  total = sum(weights)
  if not combos or total <= 0:
    raise ValueError(f'some kind needs a positive probability, got {dict(probs)}')
  return combos, np.asarray(weights) / total


def unconditional_inputs(batch: dict, empty_text: dict) -> dict[str, np.ndarray]:
  """The sampler's `uncond` for `batch` (`flow.sample_latents`): the blank prompt map (what
  training's condition dropout shows, `render_prompt` with no kind) and `empty_text`, the
  model's text inputs for '' with one row (e.g. `{'text_tokens': tokenize([''], n)}` or the
  embeddings), both broadcast to the batch."""
  b, h, w = batch['image'].shape[:3]
  rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in empty_text.items()}
  if any(n != 1 for n in rows.values()):
    raise ValueError(f'empty_text: expected one row per entry (the text \'\'), got {rows}')
  blank = render_prompt((h, w), Prompt(''), frozenset(), 1.0)
  return {'prompt': np.broadcast_to(blank, (b, h, w, 3)),
          **{k: np.broadcast_to(v, (b, *np.shape(v)[1:])) for k, v in empty_text.items()}}
