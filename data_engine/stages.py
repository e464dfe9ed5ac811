"""The decomposition stages (RefLade's six plus LiWi's shadow layer), photo -> LayeredSample.

    load -> pre-filter -> scene understanding -> layer completion -> post-completion
         -> shadow extraction -> layering -> prompt generation -> post-filter

Each stage is a function `(item, ctx) -> details` that updates the `Photo` item in place and
returns the numbers it decided on; it rejects the item by raising `Drop(reason)`. Tools are
called through `ctx.call(kind, ...)`, so a tool that raises, hangs or returns garbage drops
the item instead of stopping the run. `run` executes the stages, timing each and recording
a `Decision` per stage, and returns the sample (or None) with the full record.

Exactness: the layers are solved so that their composite reproduces the photo. Working back
to front, each object's colour on its visible pixels is F = (I - (1 - a) C) / a against the
composite C of everything behind it; the background keeps the photo wherever no layer
covers it, so only clipping of F (where a is tiny) can differ from the photo.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from data_engine import core
from data_engine.core import Decision, Drop
from data_engine.tools import imaging
from data_engine.tools.shadow import shadow_layer
from layerjax.data import images, schema
from layerjax.data.schema import Layer, LayeredSample


@dataclasses.dataclass
class Obj:
  box: tuple[int, int, int, int]
  score: float
  mask: np.ndarray                       # visible pixels (bool)
  label: str = ''
  hidden: np.ndarray | None = None       # occluded pixels completed by layer completion
  colour: np.ndarray | None = None       # [H, W, 3] completed colours (visible + hidden)
  alpha: np.ndarray | None = None        # matted, completed alpha
  shadow: np.ndarray | None = None       # [H, W, 4] shadow layer, or None


@dataclasses.dataclass
class Photo:
  id: str
  source: str                            # the photo's path under the input root (provenance)
  path: str                              # where to read it
  image: np.ndarray | None = None
  objects: list[Obj] = dataclasses.field(default_factory=list)
  background: np.ndarray | None = None
  plan: dict = dataclasses.field(default_factory=dict)
  layers: list[Layer] = dataclasses.field(default_factory=list)
  sample: LayeredSample | None = None


class Context:
  """Tools and agent built once per worker from the config; `call` guards every tool use."""

  def __init__(self, config):
    self.config = config
    self.fallbacks: list[dict] = []  # tools built from their `fallback` spec, and why
    self.agent = core.create('agent', config.agent, self.fallbacks)
    self.tools = {kind: build_tool(kind, spec, self.agent, self.fallbacks)
                  for kind, spec in config.tools.items()}

  def call(self, kind: str, *args, check=None, method: str = '__call__'):
    tool = self.tools[kind]
    name = f'{kind} {type(tool).__name__}'
    return core.call_tool(name, lambda: getattr(tool, method)(*args),
                          self.config.tool_timeout, check)


def build_tool(kind: str, spec, agent, fallbacks: list | None = None):
  """`core.create(kind, spec)`, except that `captioner: agent` makes the engine's agent (an
  LLM/VLM) write the captions, without loading a second copy of its model."""
  name = spec if isinstance(spec, str) else dict(spec).get('name')
  if kind == 'captioner' and name == 'agent':
    return agent.caption
  return core.create(kind, spec, fallbacks)


def sample_id(path: Path, root: Path | None) -> str:
  """Stable across runs and machines: the file stem plus a hash of the path under the root."""
  rel = path.relative_to(root) if root else Path(path.name)
  digest = hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]
  return f'{path.stem}-{digest}'


# --- stages -------------------------------------------------------------------------------

def load(item: Photo, ctx: Context) -> dict:
  d = ctx.config.decompose
  try:
    image = images.load_image(item.path, alpha=d.transparent, background=d.composite_over)
  except images.ImageError as e:
    raise Drop('unreadable', str(e)) from None
  item.image = images.scale_to_fit(image, d.max_side)
  h, w = image.shape[:2]
  return {'original_size': [w, h], 'size': [item.image.shape[1], item.image.shape[0]]}


def prefilter(item: Photo, ctx: Context) -> dict:
  d = ctx.config.decompose
  h, w = item.image.shape[:2]
  if min(h, w) < d.min_side:
    raise Drop('too_small', f'{w}x{h} < {d.min_side}')
  q = ctx.call('quality', item.image, check=lambda r: None if isinstance(r, dict) else
               f'a {type(r).__name__}, not a dict')
  q = {k: float(v) for k, v in q.items()}
  if q['sharpness'] < d.min_sharpness:
    raise Drop('blurry', f'sharpness {q["sharpness"]:.3g} < {d.min_sharpness}')
  if q['clipped'] > d.max_clipped:
    raise Drop('badly_exposed', f'{q["clipped"]:.0%} of pixels clipped')
  return q


def _check_detections(r) -> str | None:
  if not isinstance(r, list):
    return f'a {type(r).__name__}, not a list of detections'
  return None


def understand(item: Photo, ctx: Context) -> dict:
  """Objects (detect, plan, segment), duplicates merged, then depth order back to front."""
  d = ctx.config.decompose
  image = item.image
  h, w = image.shape[:2]
  detections = ctx.call('detector', image, check=_check_detections)
  item.plan = ctx.agent.plan(image, detections)
  objects: list[Obj] = []
  for det in detections[:max(d.max_objects * 2, 1)]:
    mask = ctx.call('segmenter', image, tuple(det.box), check=core.check_array((h, w)))
    mask = mask.astype(bool)
    area = mask.mean()
    if area == 0 or area > d.max_object_area:
      continue
    dup = next((o for o in objects if _iou(o.mask, mask) > d.max_mask_iou), None)
    if dup is None:
      objects.append(Obj(imaging.mask_box(mask), float(det.score), mask, det.label))
  if not d.min_objects <= len(objects) <= d.max_objects:
    raise Drop('object_count', f'{len(objects)} objects, need {d.min_objects}..{d.max_objects}')
  # Overlapping masks: the nearer object keeps the shared pixels (it is what is seen there).
  order = ctx.call('depth', [o.mask for o in objects], image, method='order',
                   check=lambda r: None if sorted(r) == list(range(len(objects))) else
                   f'order {r}, not a permutation of {len(objects)} objects')
  objects = [objects[i] for i in order]
  nearer = np.zeros((h, w), bool)
  for o in reversed(objects):
    o.mask &= ~nearer
    nearer |= o.mask
  objects = [o for o in objects if o.mask.any()]
  if not objects:
    raise Drop('object_count', 'every object was hidden behind another')
  item.objects = objects
  return {'detections': len(detections), 'objects': len(objects), 'plan': item.plan,
          'boxes': [list(o.box) for o in objects], 'scores': [o.score for o in objects]}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = (a | b).sum()
  return float((a & b).sum() / union) if union else 0.0


def _nearer_masks(objects: list[Obj]) -> list[np.ndarray]:
  """For each object (back to front), the union of the visible masks in front of it."""
  if not objects:  # a photo where nothing was found: the background alone
    return []
  out, acc = [], np.zeros_like(objects[0].mask)
  for o in reversed(objects):
    out.append(acc.copy())
    acc |= o.mask
  return out[::-1]


def complete(item: Photo, ctx: Context) -> dict:
  """Occlusion judgement and completion of each object; the objects removed from the photo.

  An object touching a nearer one is occluded; its inpainting mask is its convex hull minus
  what it shows, limited to the nearer objects (never the background), filled from its own
  nearest visible pixels.
  """
  d = ctx.config.decompose
  image = item.image
  occluded = []
  for o, nearer in zip(item.objects, _nearer_masks(item.objects)):
    touches = bool((imaging.dilate(o.mask, 2) & nearer).any())
    o.hidden = (convex_hull_image(o.mask) & nearer & ~o.mask) if touches else np.zeros_like(o.mask)
    # Colour every pixel from the nearest visible one: exact on the visible mask.
    _, (iy, ix) = ndimage.distance_transform_edt(~o.mask, return_indices=True)
    o.colour = image[iy, ix]
    occluded.append(int(o.hidden.sum()))
  union = np.any([o.mask | o.hidden for o in item.objects], axis=0)
  hole = imaging.dilate(union, d.inpaint_margin)
  item.background = _inpaint(ctx, image, hole)
  return {'occluded_pixels': occluded, 'inpainted_fraction': float(hole.mean())}


def _inpaint(ctx: Context, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
  out = ctx.call('inpainter', image, hole, check=core.check_array(image.shape))
  if not np.array_equal(out[~hole], image[~hole]):
    raise Drop('tool_garbage', 'inpainter changed pixels outside its mask')
  return out.astype(np.float32)


def matte(item: Photo, ctx: Context) -> dict:
  """Post-completion: closed-form alpha on each visible mask; hidden parts stay opaque."""
  h, w = item.image.shape[:2]
  coverage = []
  for o, nearer in zip(item.objects, _nearer_masks(item.objects)):
    alpha, fg = ctx.call('matting', item.image, o.mask,
                         check=lambda r: None if isinstance(r, tuple) and len(r) == 2 else
                         f'a {type(r).__name__}, not (alpha, foreground)')
    problem = core.check_array((h, w))(alpha) or core.check_array((h, w, 3))(fg)
    if problem:
      raise Drop('tool_garbage', f'matting returned {problem}')
    # Matting may bleed onto nearer objects; they own those pixels.
    alpha = np.where(nearer, 0.0, alpha).astype(np.float32)
    o.alpha = np.maximum(alpha, o.hidden.astype(np.float32))
    o.colour = np.where(o.mask[..., None], fg, o.colour).astype(np.float32)
    coverage.append(float(o.alpha[o.mask].mean()))
  return {'alpha_in_mask': coverage}


def extract_shadows(item: Photo, ctx: Context) -> dict:
  """The illumination residual each object casts, as its own layer (LiWi's shadow layer).

  The ratio tool needs a shadow-free background near each object's base: the photo with the
  objects and the ground below them inpainted. The clean background then loses the shadows
  too, and each shadow layer is solved so that it darkens that background to the photo.
  """
  d = ctx.config.decompose
  if not d.shadows or not item.plan.get('shadows', True):
    return {'shadows': 0, 'skipped': 'disabled by config or plan'}
  image = item.image
  objects_mask = np.any([o.alpha > 0 for o in item.objects], axis=0)
  ground = np.zeros_like(objects_mask)
  for o in item.objects:
    x0, y0, x1, y1 = o.box
    ground |= imaging.box_mask(imaging.pad_box((x0, y1 - (y1 - y0) // 4, x1, y1 + (y1 - y0) // 2),
                                               image.shape, margin=0.25), image.shape)
  shadow_free = _inpaint(ctx, image, imaging.dilate(objects_mask | ground, d.inpaint_margin))
  masks = []
  for o in item.objects:
    est = ctx.call('shadow', image, shadow_free, o.alpha)
    problem = core.check_array(image.shape[:2])(getattr(est, 'mask', None))
    if problem:
      raise Drop('tool_garbage', f'shadow returned {problem}')
    masks.append(est.mask.astype(bool) & ~objects_mask)
  if not any(m.any() for m in masks):
    return {'shadows': 0}
  all_shadows = np.any(masks, axis=0)
  union = np.any([o.mask | o.hidden for o in item.objects], axis=0) | all_shadows
  item.background = _inpaint(ctx, image, imaging.dilate(union, d.inpaint_margin))
  for o, m in zip(item.objects, masks):
    o.shadow = shadow_layer(image, item.background, m) if m.any() else None
  return {'shadows': sum(o.shadow is not None for o in item.objects),
          'shadow_pixels': [int(m.sum()) for m in masks]}


def layer(item: Photo, ctx: Context, tolerance: float = 1 / 255) -> dict:
  """The exact layer stack: background, then per object its shadow and itself.

  Where the solve cannot reach the photo within `tolerance` (an object colour or shadow that
  would leave [0, 1], typically at faint alpha over a very different inpainted background),
  those pixels keep the photo in the background and lose the shadow, and the objects are
  solved again over that. (The engine's samples are stored in 8 bits: one step is its
  tolerance; inference keeps float layers and asks for less.)
  """
  image = item.image
  covered = np.zeros(image.shape[:2], bool)
  for o in item.objects:
    covered |= o.alpha > 0
    if o.shadow is not None:
      covered |= o.shadow[..., 3] > 0
  background = np.where(covered[..., None], item.background, image)
  layers = _solve_stack(item, background)
  miss = np.abs(schema.composite(layers)[..., :3] - image).max(-1) > tolerance
  if miss.any():
    for o in item.objects:
      if o.shadow is not None:
        o.shadow[miss] = 0
    layers = _solve_stack(item, np.where(miss[..., None], image, background))
  item.layers = layers
  return {'layers': len(layers), 'repaired_pixels': int(miss.sum())}


def _solve_stack(item: Photo, background: np.ndarray) -> list[Layer]:
  """Back to front, each object's visible colour solved against the composite behind it."""
  image = item.image
  layers = [Layer('background', 'background', _rgba(background, np.ones(image.shape[:2])))]
  below = layers[0].rgba
  for k, (o, nearer) in enumerate(zip(item.objects, _nearer_masks(item.objects)), 1):
    name = f'object_{k}'
    if o.shadow is not None:
      layers.append(Layer(f'shadow_{k}', 'shadow', o.shadow.astype(np.float32), owner=name))
      below = schema.over(layers[-1].rgba, below)
    a = o.alpha[..., None]
    solve = (o.mask | ~nearer)[..., None] & (a > 0)
    exact = (image - (1 - a) * below[..., :3]) / np.maximum(a, 1e-6)
    colour = np.where(solve, np.clip(exact, 0, 1), o.colour)
    layers.append(Layer(name, 'object', _rgba(colour, o.alpha), label=o.label or 'object'))
    below = schema.over(layers[-1].rgba, below)
  return layers


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  return np.concatenate([np.clip(rgb, 0, 1), np.clip(alpha, 0, 1)[..., None]],
                        -1).astype(np.float32)


def prompts(item: Photo, ctx: Context) -> dict:
  """Points, boxes and masks (schema.assemble), then labels, captions and referring texts."""
  layers = item.layers
  caption_objects(layers, lambda lay: ctx.call('captioner', lay.rgba, lay.label))
  try:
    item.sample = schema.assemble(item.id, layers, {'source': item.source})
  except schema.SampleError as e:
    raise Drop('invalid_sample', str(e)) from None
  return {'prompts': len(item.sample.prompts),
          'captions': [l.caption for l in layers if l.kind == 'object']}


def caption_objects(layers: list[Layer], caption: Callable[[Layer], Any]) -> None:
  """Label, caption and referring texts for every object layer; `caption(layer)` returns a
  tools.types.Caption. Referring texts another object shares are dropped."""
  objects = [l for l in layers if l.kind == 'object']
  for lay in objects:
    cap = caption(lay)
    lay.label, lay.caption, lay.referring = cap.label, cap.caption, tuple(cap.referring)
  _make_referring_unique(objects)


def check_texts(layers: list[Layer], check: Callable[[Layer], tuple[bool, str]]) -> dict:
  """`check(layer) -> (agree, why)` on every layer (an agent's `check_text`, or a
  `text_check` tool); drops the item at the first disagreement, else returns the verdicts."""
  verdicts = {}
  for lay in layers:
    agree, why = check(lay)
    if not agree:
      raise Drop('text_disagrees', f'{lay.name}: {why}')
    verdicts[lay.name] = why
  return verdicts


def _make_referring_unique(objects: list[Layer]) -> None:
  """Keeps only expressions no other object shares, so each one singles out its object."""
  counts: dict[str, int] = {}
  for o in objects:
    for text in set(o.referring):
      counts[text] = counts.get(text, 0) + 1
  for o in objects:
    o.referring = tuple(t for t in o.referring if counts[t] == 1)


def postfilter(item: Photo, ctx: Context) -> dict:
  """Preservation (PSNR of the composite against the photo), judge score, text agreement."""
  d = ctx.config.decompose
  sample = item.sample
  mse = float(np.mean((sample.image - item.image) ** 2))
  psnr = float('inf') if mse == 0 else float(10 * np.log10(1 / mse))
  judgement = ctx.agent.judge(item.image, sample)
  details = {'psnr': psnr, 'judge_score': judgement.score, 'judge_reason': judgement.reason}
  if psnr < d.min_psnr:
    raise Drop('preservation', f'PSNR {psnr:.1f} dB < {d.min_psnr}')
  if judgement.score < d.min_judge_score:
    raise Drop('judge', f'score {judgement.score:.2f}: {judgement.reason}')
  if d.text_agreement:
    details['text_checks'] = check_texts(sample.layers, text_checker(ctx))
  sample.provenance.update(engine_scores=details)
  return details


def text_checker(ctx: Context) -> Callable[[Layer], tuple[bool, str]]:
  """The configured `text_check` tool (e.g. CLIP), else the agent's own `check_text`."""
  if 'text_check' in ctx.tools:
    return lambda lay: ctx.call('text_check', lay, check=_check_verdict)
  return ctx.agent.check_text


def _check_verdict(r) -> str | None:
  ok = isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], (bool, np.bool_))
  return None if ok else f'{r!r}, not (agree, reason)'


STAGES: list[tuple[str, Callable[[Photo, Context], dict]]] = [
    ('load', load), ('prefilter', prefilter), ('understand', understand),
    ('complete', complete), ('matte', matte), ('shadows', extract_shadows), ('layer', layer),
    ('prompts', prompts), ('postfilter', postfilter)]


def run(item: Photo, ctx: Context, stages=STAGES) -> tuple[LayeredSample | None, list[Decision]]:
  """Runs the stages; the sample if every stage passed, and one Decision per stage run."""
  record = []
  for name, stage in stages:
    with core.Timer() as t:
      try:
        details = stage(item, ctx)
        decision = Decision(name, True, '', jsonable(details))
      except Drop as drop:
        decision = Decision(name, False, drop.reason, {'detail': drop.detail})
    decision.seconds = round(t.seconds, 4)
    record.append(decision)
    if not decision.passed:
      return None, record
  # Every decision (the agent's plan, judgement and text checks among them) travels with the
  # sample, with the prompt versions the agent answered under.
  item.sample.provenance['engine'] = {
      'stages': [d.stage for d in record],
      'decisions': [d.to_json() for d in record],
      'tools': jsonable(ctx.config.tools.to_dict()),
      'agent': jsonable(ctx.config.agent.to_dict()),
      'fallbacks': ctx.fallbacks,
      'prompt_versions': ctx.agent.prompt_versions()}
  return item.sample, record


def jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  return x
