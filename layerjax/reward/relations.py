"""Relations a judge answers about a photo and a decomposition implies, and their agreement.

ReasonX rewards a decomposer for agreeing with a judge's relative judgements about an
unlabelled photo. A `Relation` is one question about a referred object:

  on_object        is the point on the object, as the photo shows it?
  in_shadow        is the point in the shadow the object casts, as the photo shows it?
  hidden_part      is the point on a part of the object hidden behind something in front?
  in_front         which of two objects is in front?
  background_free  with the object removed, is the scene at the point free of it?

`read` answers a relation from a `LayeredSample` (the model's output, or the ground truth of
a synthetic scene), `question` words it for a judge who sees only the photo, `propose` picks
relations whose answer is informative for a given decomposition (points near its predicted
boundaries), and `agreement` is the reward: the share of the judge's answers the decomposition
agrees with. Answers are 'yes' / 'no', or for in_front the name of the front object's layer;
a judge that cannot answer gives 'unknown' (or None).

Points are (x, y) pixels of the photo: column x, row y, the pixel's centre.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from layerjax.data.schema import Layer, LayeredSample, composite, visible_masks

KINDS = ('on_object', 'in_shadow', 'hidden_part', 'in_front', 'background_free')
ANSWERS = ('yes', 'no')      # the answers of every relation about a point
UNKNOWN = 'unknown'          # what a judge gives when it has no valid answer


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """When a decomposition's layers say yes. Defaults:

  alpha 0.5: an object covers (or hides) a pixel when it is the larger part of it, the rule
    of `schema.visible_masks` and of the amodal metrics (`pred = alpha > 0.5`).
  shadow 0.1: a shadow layer of opacity 0.1 darkens by 10%, about the faintest shadow a
    viewer still calls one; the engine's synthetic shadows start at 0.45-0.8 at the contact
    and fade and blur outwards, so 0.1 puts the edge in the outer penumbra, where a judge
    looking at the photo would too.
  colour 0.05: mean absolute RGB difference (in [0, 1]) above which the background differs
    from the object at a pixel: about 13 8-bit levels, well above quantisation and
    compression noise (1-4 levels), well below the contrast of an object a viewer can see.
  front 0.15: in a decomposition of one object (`with_front`), mean absolute RGB
    difference between the photo and the decomposition's own recomposition above which the
    photo shows something else than the object where its alpha says it is there: a nearer
    thing, left in the background layer, hides it. Three times `colour`, so that the colour
    errors of a model's object (the demo model's foreground RGB L1 is 0.07) are not read as
    occlusion.
  """
  alpha: float = 0.5
  shadow: float = 0.1
  colour: float = 0.05
  front: float = 0.15

  def __post_init__(self):
    for field in ('alpha', 'shadow', 'colour', 'front'):
      value = getattr(self, field)
      if not 0 < value < 1:
        raise ValueError(f'Thresholds.{field} must be in (0, 1), got {value!r}')


@dataclasses.dataclass(frozen=True)
class Relation:
  """`objects`: one object layer name, two for in_front; `point`: (x, y) pixel, None for
  in_front."""
  kind: str
  objects: tuple[str, ...]
  point: tuple[int, int] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Relation kind {self.kind!r} is not one of {KINDS}')
    pair = self.kind == 'in_front'
    if len(self.objects) != (2 if pair else 1) or len(set(self.objects)) != len(self.objects):
      need = 'two different objects' if pair else 'one object'
      raise ValueError(f'Relation {self.kind}: needs {need}, got {self.objects!r}')
    if pair != (self.point is None):
      raise ValueError(f'Relation {self.kind}: {"no point" if pair else "one (x, y) point"} '
                       f'expected, got {self.point!r}')
    if not pair and not (len(self.point) == 2 and
                         all(isinstance(v, (int, np.integer)) and v >= 0 for v in self.point)):
      raise ValueError(f'Relation {self.kind}: point must be two pixel indices >= 0, got '
                       f'{self.point!r}')


def answers(rel: Relation) -> tuple[str, ...]:
  """The answers `read` can give: ('yes', 'no'), or the two object names for in_front."""
  return rel.objects if rel.kind == 'in_front' else ANSWERS


def choices(rel: Relation, labels: Mapping[str, str]) -> tuple[str, ...]:
  """The answers as a judge picks them, aligned with `answers(rel)`: for in_front the two
  objects' labels (a judge knows objects by what they are called, not by layer name)."""
  return tuple(_label(labels, o) for o in rel.objects) if rel.kind == 'in_front' else ANSWERS


def question(rel: Relation, labels: Mapping[str, str], mark: str | None = None) -> str:
  """The question about the photo, naming objects by `labels` (object layer name -> e.g.
  'the red mug'). The point is given by its coordinates, and as 'the point marked <mark>' too
  when the judge sees it marked in the photo. Without a mark, the same relation always gives
  the same text, so it keys a cache of answers."""
  if rel.kind == 'in_front':
    a, b = (_label(labels, o) for o in rel.objects)
    return (f'Which is in front, nearer the camera (covering the other where they overlap): '
            f'{a} or {b}?')
  # A ring survives the agent's resizing; the coordinates serve a judge that reads them.
  where = (f'the point marked {mark} at {rel.point}' if mark is not None
           else f'the point {rel.point}')
  obj = _label(labels, rel.objects[0])
  return {
      'on_object': f'Is {where} on {obj}, as the photo shows it (not on something in front '
                   f'of it)?',
      'in_shadow': f'Is {where} in the shadow that {obj} casts, as the photo shows it?',
      'hidden_part': f'Is {where} on a part of {obj} that is hidden behind something in front '
                     f'of it?',
      'background_free': f'If {obj} were taken out of the scene, would {where} show only what '
                         f'is behind it, with no trace of {obj}?',
  }[rel.kind]


def _label(labels: Mapping[str, str], name: str) -> str:
  text = labels.get(name, '')
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f'relation labels: no label for object layer {name!r}')
  return text.strip()


# --- reading a decomposition --------------------------------------------------------------

def _index(sample: LayeredSample, name: str) -> int:
  for i, layer in enumerate(sample.layers):
    if layer.name == name and layer.kind == 'object':
      return i
  raise KeyError(f'sample {sample.id!r}: no object layer named {name!r}')


def _cover(sample: LayeredSample, i: int, window) -> np.ndarray:
  """How much the object layers above layer `i` cover (accumulated by 'over'); shadows
  darken what is under them but hide nothing."""
  free = np.ones(sample.layers[0].rgba[window + (0,)].shape, np.float32)
  for layer in sample.layers[i + 1:]:
    if layer.kind == 'object':
      free = free * (1 - layer.rgba[window + (3,)])
  return 1 - free


def _regions(sample: LayeredSample, name: str, t: Thresholds, window) -> dict[str, np.ndarray]:
  """Bool masks over `window` (a pair of slices) for the object `name`:
    on       its alpha >= t.alpha and the objects above cover < t.alpha (seen in the photo)
    hidden   its alpha >= t.alpha and the objects above cover >= t.alpha
    occluded its alpha < t.alpha and the objects above cover >= t.alpha (not part of it,
             though something in front could hide it there)
    shadow   one of its shadow layers (owner = name) has alpha >= t.shadow where the objects
             above that shadow layer, its own object included, cover < t.alpha (seen)
    free     the background's RGB differs from the object's by mean |.| > t.colour, or the
             object does not cover the pixel (nothing of it to leave behind)
  `free` is how a decomposition says whether its background still shows the object: a
  background that kept the object's colours under it (a ghost, the object not removed) reads
  'no' there. Colour is the only evidence of the object a background layer can hold; its
  blind spot is an object coloured like what is behind it (a white mug on a white wall),
  which reads 'no' though removed: the ground truth then reads 'no' as well, an MLLM judge
  probably 'yes'. Outside the object nothing of it can remain: 'yes'.
  Visibility is part of on_object and in_shadow because a judge sees only the photo: a
  shadow under its object, or an object part behind another, is not what the photo shows
  there, and asking about it would punish a correct completion."""
  i = _index(sample, name)
  obj = sample.layers[i].rgba[window]
  alpha, cover = obj[..., 3], _cover(sample, i, window)
  mine = alpha >= t.alpha
  covered = cover >= t.alpha
  shadow = np.zeros_like(mine)
  for k, layer in enumerate(sample.layers):
    if layer.kind == 'shadow' and layer.owner == name:
      shadow |= (layer.rgba[window + (3,)] >= t.shadow) & (_cover(sample, k, window) < t.alpha)
  differs = np.abs(sample.layers[0].rgba[window][..., :3] - obj[..., :3]).mean(-1) > t.colour
  return {'on': mine & ~covered, 'hidden': mine & covered, 'occluded': ~mine & covered,
          'shadow': shadow, 'free': differs | ~mine}


_REGION = {'on_object': 'on', 'in_shadow': 'shadow', 'hidden_part': 'hidden',
           'background_free': 'free'}


def read(sample: LayeredSample, rel: Relation, thresholds: Thresholds) -> str:
  """The answer `sample` implies (see `_regions` for each kind's rule); in_front: the name of
  the object higher in the layer stack (the stack is back to front, so that one covers the
  other wherever they overlap)."""
  if rel.kind == 'in_front':
    a, b = rel.objects
    return a if _index(sample, a) > _index(sample, b) else b
  h, w = sample.size
  x, y = rel.point
  if x >= w or y >= h:
    raise ValueError(f'sample {sample.id!r}: {rel.kind} point {rel.point} is outside the '
                     f'{w}x{h} image')
  window = (slice(y, y + 1), slice(x, x + 1))
  region = _regions(sample, rel.objects[0], thresholds, window)[_REGION[rel.kind]]
  return 'yes' if region[0, 0] else 'no'


FRONT = 'in_front_of_object'  # `with_front`'s layer of what hides the object


def one_object_sample(sample_id: str, photo: np.ndarray, background: np.ndarray,
                      obj: np.ndarray, shadow: np.ndarray | None, name: str) -> LayeredSample:
  """A decomposition of one referred object (background RGB [H, W, 3], the object's and its
  shadow's straight RGBA [H, W, 4], as the model gives them before any solve against the
  photo) as a sample: background, shadow and the object named `name`, visible masks filled in
  (what the pairwise preference's agents read). The relations read it through `with_front`."""
  h, w = photo.shape[:2]
  layers = [Layer('background', 'background',
                  np.concatenate([background, np.ones((h, w, 1), np.float32)], -1))]
  if shadow is not None:
    layers.append(Layer(f'{name}_shadow', 'shadow', shadow.astype(np.float32), owner=name))
  layers.append(Layer(name, 'object', obj.astype(np.float32)))
  return LayeredSample(sample_id, photo.astype(np.float32), _with_visible(layers))


def with_front(sample: LayeredSample, name: str, thresholds: Thresholds) -> LayeredSample:
  """`sample`, a decomposition of the one object `name` (`one_object_sample`), with a layer
  `FRONT` of what hides it on top: what the relations read. A one-object model leaves
  whatever is in front of its object in the background, so without that layer every
  completed (hidden) part of the object would read as seen, and a correct completion would
  disagree with a judge who sees the thing in front. The decomposition implies a hidden part
  where the object's alpha says it is there (>= `thresholds.alpha`) and the photo differs
  from the decomposition's recomposition by more than `thresholds.front`: there `FRONT` is
  opaque and shows the photo. Ask only about `name` (`propose(..., objects=[name])`)."""
  obj = sample.layer(name).rgba
  recomposed = composite([layer.rgba for layer in sample.layers])[..., :3]
  hidden = ((obj[..., 3] >= thresholds.alpha)
            & (np.abs(recomposed - sample.image).mean(-1) > thresholds.front))
  front = Layer(FRONT, 'object', np.concatenate(
      [sample.image, hidden[..., None].astype(np.float32)], -1).astype(np.float32))
  return dataclasses.replace(sample, layers=_with_visible(list(sample.layers) + [front]))


def _with_visible(layers: list[Layer]) -> list[Layer]:
  return [dataclasses.replace(layer, visible_mask=mask)
          for layer, mask in zip(layers, visible_masks(layers))]


# --- where to ask -------------------------------------------------------------------------

def _band(mask: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
  """Pixels of `mask` within `width` px of a pixel outside it, and outside pixels within
  `width` px of it (Euclidean, pixel centres); the image border is no boundary."""
  if not mask.any() or mask.all():
    return np.zeros_like(mask), np.zeros_like(mask)
  return (mask & (ndimage.distance_transform_edt(mask) <= width),
          ~mask & (ndimage.distance_transform_edt(~mask) <= width))


def propose(sample: LayeredSample, rng: np.random.Generator, n: int,
            thresholds: Thresholds = Thresholds(), band: float = 2.0,
            objects: Sequence[str] | None = None) -> list[Relation]:
  """At most `n` relations whose answers are informative for `sample`, for every object:
  on_object within `band` px of its seen region's boundary, inside and outside; in_shadow
  inside its seen shadow and within `band` px outside it; hidden_part on its hidden part and
  on what covers it just outside it (within `band` px); background_free where it covers the
  pixel; and in_front for every pair of objects (`objects`: only relations about these
  object layers; default all). The groups take turns (one relation each, in
  a fixed order, while any is left), so a small `n` still asks a bit of everything; within a
  group points are drawn at random without repeats. The same `rng` state gives the same
  relations."""
  if n < 0:
    raise ValueError(f'propose: n={n} < 0')
  names = [layer.name for layer in sample.layers if layer.kind == 'object'
           and (objects is None or layer.name in objects)]
  full = (slice(None), slice(None))
  groups: list[list[Relation]] = []
  for name in names:
    r = _regions(sample, name, thresholds, full)
    on_in, on_out = _band(r['on'], band)
    shadow_in, shadow_out = r['shadow'], _band(r['shadow'], band)[1]
    hidden_out = r['occluded'] & _band(r['hidden'], band)[1]
    for kind, mask in (('on_object', on_in), ('on_object', on_out), ('in_shadow', shadow_in),
                       ('in_shadow', shadow_out), ('hidden_part', r['hidden']),
                       ('hidden_part', hidden_out),
                       ('background_free', r['on'] | r['hidden'])):
      ys, xs = np.nonzero(mask)
      if len(xs):
        picks = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
        groups.append([Relation(kind, (name,), (int(xs[j]), int(ys[j]))) for j in picks])
  pairs = [Relation('in_front', pair) for pair in itertools.combinations(names, 2)]
  if pairs:
    groups.append([pairs[j] for j in rng.permutation(len(pairs))])
  turns = itertools.chain.from_iterable(itertools.zip_longest(*groups))
  return list(itertools.islice((rel for rel in turns if rel is not None), n))


# --- the reward ---------------------------------------------------------------------------

def agreement(model_answers: Sequence[str | None],
              judge_answers: Sequence[str | None]) -> float | None:
  """The share of relations the judge answered on which the model agrees, in [0, 1].
  Relations either side left unanswered (None or 'unknown') do not count; None when none is
  left, so the caller drops the group (reason: the judge answered nothing) instead of
  rewarding it with a made-up number."""
  if len(model_answers) != len(judge_answers):
    raise ValueError(f'agreement: {len(model_answers)} model answers for '
                     f'{len(judge_answers)} judge answers')
  pairs = [(m, j) for m, j in zip(model_answers, judge_answers)
           if m not in (None, UNKNOWN) and j not in (None, UNKNOWN)]
  if not pairs:
    return None
  return sum(m == j for m, j in pairs) / len(pairs)
