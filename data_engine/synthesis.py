"""Layer-combination synthesis (LiWi): new scenes whose layers are exact by construction.

A bank (`load_bank`) holds clean opaque backgrounds and complete object cut-outs; `synthesize`
picks a background and a few objects, stands them on a flat ground plane seen by a pinhole
camera, lights them with one distant light and renders each object's soft shadow as its own
layer. The image is the composite of the layers, so the decomposition is exact. A scene is a
function of `(config.seed, index)` alone, so any runner and worker order give the same data.

Bank layout (`load_bank(path)`):
  backgrounds/**/*.{jpg,jpeg,png,webp}  opaque photos, decoded when a scene uses them
  objects/**/*.png                      RGBA cut-outs; label from `labels.json` in the file's
                                        folder ({file name: label}), else the file stem without
                                        trailing digits, '_' read as ' ' ('traffic_cone_03')
  samples/*/manifest.json               layered samples (`schema.write_folder`): their
                                        background, and each object layer whose alpha does not
                                        touch the border (a complete object)

Geometry. The horizon is at row y_h = horizon * H. On flat ground an object's distance is
proportional to 1 / (base - y_h), with base its bottom alpha row, so an object standing on the
bottom edge is drawn object_height * H tall and one at base = y_h + p * (H - y_h) is p times
that (p, the perspective factor, is drawn from `perspective`). Objects are layered by base
row: a higher base is farther and goes behind. The light shines from elevation `el` and casts
shadows towards ground azimuth `az` (0 = right, 90 = towards the camera, i.e. down the image,
180 = left, 270 = away). A silhouette pixel `d` pixels above the base lands on the ground at
base + d * (cos(az) / tan(el), k * sin(az) / tan(el)), k = (base - y_h) / focal the squash of
the ground seen obliquely: an affine shear and squash anchored on the base row. The object
is taken to be `object_depth` times as deep as it is wide, which widens its shadow by
k * depth rows behind the base (a side light still casts a visible shadow). Penumbrae widen
with distance from the contact (contact hardening): the blur grows from shadow_blur[0] at
the base to shadow_blur[1] at the tip, and the opacity fades by `shadow_fade` towards the tip.
The shadow's colour is one tint per scene, its alpha the shadow's density.

Config keys (`default_config()`; a pair (lo, hi) is a range drawn from uniformly):
  seed                 int; scene `index` draws from `np.random.default_rng([seed, index])`
  size                 (H, W) of the samples
  num_objects          (lo, hi) objects asked for, inclusive; fewer when they do not fit
  object_height        (lo, hi) height of an object on the bottom edge, fraction of H
  perspective          (lo, hi) perspective factor p, which sets the base row (see above)
  horizon              (lo, hi) horizon row, fraction of H
  focal_length         camera focal length, fraction of W
  max_overlap          max fraction of an object's box covered by the boxes of objects in
                       front of it
  placement_tries      placements tried per object before the scene keeps fewer objects
  hflip_prob           probability of mirroring an object
  light_azimuth        (lo, hi) degrees, the direction shadows fall (one light per scene)
  light_elevation      (lo, hi) degrees above the ground; lower = longer shadows
  shadow_opacity       (lo, hi) shadow alpha at the contact (per scene)
  shadow_blur          (contact, far) Gaussian sigma in pixels for an object on the bottom
                       edge, scaled by its perspective factor
  shadow_fade          fraction of the opacity lost at the shadow's far end
  shadow_tint          (r, g, b) shadow colour
  shadow_tint_jitter   each channel of the tint moves by up to this much per scene
  object_depth         an object's depth as a fraction of its width
  prob_no_shadow       probability that an object casts no shadow (it floats)
  balance_categories   False: every object of the bank is equally likely; True: every label
                       is, then an object within it (Gen-n-Val's balancing of rare
                       categories, with `python -m data_engine generate-objects`)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import cv2
import ml_collections
import numpy as np

from layerjax import config_spec as spec
from layerjax.data import images, schema
from layerjax.fileio import read_json

BACKGROUND_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
_EMPTY = 0.5 / 255  # alpha below this vanishes in 8-bit storage; zeroing it keeps boxes exact
_BANDS = 3          # blur levels blended for contact hardening


# The config's keys (`default_config`); pairs are ranges (lo, hi) to draw from.
CONFIG = spec.section({
    'seed': spec.integer(), 'size': spec.seq(spec.integer(lo=1), 2),
    'num_objects': spec.ordered(spec.integer(lo=1)),
    'object_height': spec.ordered(spec.number(lo=0)),
    'perspective': spec.ordered(spec.number(0, 1)), 'horizon': spec.ordered(spec.number(0, 1)),
    'focal_length': spec.number(above=0), 'max_overlap': spec.number(0, 1),
    'placement_tries': spec.integer(lo=1), 'hflip_prob': spec.number(0, 1),
    'light_azimuth': spec.ordered(spec.number()),
    'light_elevation': spec.ordered(spec.number(1, 90)),
    'shadow_opacity': spec.ordered(spec.number(0, 1)),
    'shadow_blur': spec.ordered(spec.number(lo=0)), 'shadow_fade': spec.number(0, 1),
    'shadow_tint': spec.seq(spec.number(0, 1), 3), 'shadow_tint_jitter': spec.number(lo=0),
    'object_depth': spec.number(lo=0), 'prob_no_shadow': spec.number(0, 1),
    'balance_categories': spec.boolean()})


def check_config(config) -> None:
  spec.check(config, CONFIG, 'synthesize')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      size=(512, 512),
      num_objects=(1, 4),
      object_height=(0.25, 0.6),
      perspective=(0.35, 1.0),
      horizon=(0.3, 0.5),
      focal_length=1.0,
      max_overlap=0.3,
      placement_tries=20,
      hflip_prob=0.5,
      light_azimuth=(0.0, 360.0),
      light_elevation=(25.0, 65.0),
      shadow_opacity=(0.45, 0.8),
      shadow_blur=(1.0, 8.0),
      shadow_fade=0.6,
      shadow_tint=(0.06, 0.07, 0.1),
      shadow_tint_jitter=0.03,
      object_depth=0.5,
      prob_no_shadow=0.1,
      balance_categories=False,
  ))


# --- the bank -----------------------------------------------------------------------------

@dataclasses.dataclass
class ObjectAsset:
  """One cut-out, cropped to its alpha bbox."""
  rgba: np.ndarray  # [h, w, 4] float32 straight alpha in [0, 1]
  label: str
  source: str       # file path, or '<sample id>:<layer name>'


@dataclasses.dataclass
class BackgroundAsset:
  source: str                     # file path, or '<sample id>:<layer name>'
  rgb: np.ndarray | None = None   # [h, w, 3] uint8 when held in memory; None: read `source`


@dataclasses.dataclass
class Bank:
  backgrounds: list[BackgroundAsset]
  objects: list[ObjectAsset]
  skipped: list[str] = dataclasses.field(default_factory=list)  # why each bad input was left

  def draw_object(self, rng: np.random.Generator, balanced: bool) -> int:
    """An object's index: uniform over objects, or over labels then within the label."""
    if not balanced:
      return int(rng.integers(len(self.objects)))
    members = self._by_label[int(rng.integers(len(self._by_label)))]
    return members[int(rng.integers(len(members)))]

  @functools.cached_property
  def _by_label(self) -> list[list[int]]:
    by_label: dict[str, list[int]] = {}
    for i, o in enumerate(self.objects):
      by_label.setdefault(o.label, []).append(i)
    return list(by_label.values())

  def background(self, i: int, size: tuple[int, int]) -> np.ndarray:
    """Background `i` scaled to cover `size` (H, W) and centre-cropped: [H, W, 3] float32."""
    asset = self.backgrounds[i]
    if asset.rgb is not None:
      return images.scale_to_cover(asset.rgb.astype(np.float32) / 255, size)
    # The bank's backgrounds are opaque: one with transparency is refused (an ImageError,
    # a ValueError naming the file).
    return images.load_image(asset.source, cover=size)


def load_bank(path, on_error: str = 'raise') -> Bank:
  """Backgrounds, objects and layered samples under `path` (see the module docstring).

  An unreadable image or sample raises a ValueError naming it, or with `on_error='skip'` is
  left out and described in `bank.skipped`. A bank without backgrounds or objects raises.
  """
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  root = Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: no such bank directory')
  bank = Bank([], [])

  def bad(message: str) -> None:
    if on_error == 'raise':
      raise ValueError(message)
    bank.skipped.append(message)

  for file in _files(root / 'backgrounds', BACKGROUND_SUFFIXES):
    try:
      images.check_image(file)  # headers and checksums only; the pixels are decoded when used
    except images.ImageError as e:
      bad(str(e))
      continue
    bank.backgrounds.append(BackgroundAsset(str(file)))

  for file, label in object_files(root):
    try:
      rgba = images.load_image(file, alpha='keep')
    except images.ImageError as e:
      bad(str(e))
      continue
    if rgba[..., 3].min() == 1:
      bad(f'{file}: opaque everywhere, not an RGBA cut-out')
      continue
    if rgba[..., 3].max() == 0:
      bad(f'{file}: fully transparent')
      continue
    bank.objects.append(ObjectAsset(_crop(rgba), label, str(file)))

  for folder in sorted(m.parent for m in (root / 'samples').glob('*/manifest.json')):
    try:
      sample = schema.read_folder(folder)
    except (ValueError, OSError) as e:  # read_folder's errors name the folder
      bad(str(e))
      continue
    layer = sample.layers[0]
    rgb = np.round(layer.rgba[..., :3] * 255).astype(np.uint8)
    bank.backgrounds.append(BackgroundAsset(f'{sample.id}:{layer.name}', rgb))
    for layer in sample.layers:
      alpha = layer.rgba[..., 3]
      touches = alpha[0].any() or alpha[-1].any() or alpha[:, 0].any() or alpha[:, -1].any()
      if layer.kind == 'object' and alpha.any() and not touches:
        bank.objects.append(ObjectAsset(_crop(layer.rgba), layer.label,
                                        f'{sample.id}:{layer.name}'))

  missing = [name for name, items in (('backgrounds', bank.backgrounds),
                                      ('objects', bank.objects)) if not items]
  if missing:
    raise ValueError(f'{root}: the bank has no {" and no ".join(missing)} (looked in '
                     f'backgrounds/, objects/ and samples/*/)')
  return bank


def object_files(root: Path) -> list[tuple[Path, str]]:
  """The bank's object cut-outs under `root/objects` with their labels (read, not decoded)."""
  labels: dict[Path, dict] = {}
  found = []
  for file in _files(Path(root) / 'objects', ('.png',)):
    if file.parent not in labels:
      labels[file.parent] = _read_labels(file.parent / 'labels.json')
    found.append((file, labels[file.parent].get(file.name) or _label_from_stem(file.stem)))
  return found


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
  # Dot files are OS litter (e.g. macOS '._photo.jpg'), not images.
  return sorted(p for p in folder.rglob('*')
                if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith('.'))


def _read_labels(path: Path) -> dict[str, str]:
  if not path.exists():
    return {}
  labels = read_json(path)
  if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
    raise ValueError(f'{path}: expected a JSON object mapping file names to labels')
  return labels


def _label_from_stem(stem: str) -> str:
  return re.sub(r'[_\s-]*\d+$', '', stem).replace('_', ' ').strip() or stem


def _crop(rgba: np.ndarray) -> np.ndarray | None:
  # A copy, so a cut-out does not keep its whole source canvas alive.
  box = schema.alpha_bbox(rgba[..., 3])
  return None if box is None else rgba[box[1]:box[3], box[0]:box[2]].copy()


# --- scenes -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Placed:
  asset: ObjectAsset
  rgba: np.ndarray  # the object as drawn, cropped to its alpha
  x: int            # top-left on the canvas
  y: int
  order: int        # placement order: breaks ties between equal base rows
  record: dict      # provenance

  @property
  def box(self) -> tuple[int, int, int, int]:
    return self.x, self.y, self.x + self.rgba.shape[1], self.y + self.rgba.shape[0]

  @property
  def depth_key(self) -> tuple[int, int]:  # larger = nearer = in front
    return self.box[3], self.order


def synthesize(bank: Bank, index: int, config) -> schema.LayeredSample:
  """Scene `index`: [background, shadow_1, object_1, shadow_2, object_2, ...] back to front."""
  if not bank.backgrounds or not bank.objects:
    raise ValueError('synthesize: the bank needs at least one background and one object')
  check_config(config)
  h, w = config.size
  lo, hi = config.num_objects
  rng = np.random.default_rng([int(config.seed), index])

  background = int(rng.integers(len(bank.backgrounds)))
  horizon = float(rng.uniform(*config.horizon)) * h
  light = {'azimuth': float(rng.uniform(*config.light_azimuth)),
           'elevation': float(rng.uniform(*config.light_elevation))}
  opacity = float(rng.uniform(*config.shadow_opacity))
  jitter = config.shadow_tint_jitter
  tint = np.clip(np.float32(config.shadow_tint)
                 + rng.uniform(-jitter, jitter, 3).astype(np.float32), 0, 1)

  placed: list[_Placed] = []
  for _ in range(int(rng.integers(lo, hi + 1))):
    obj = _place(bank, rng, config, placed, (h, w), horizon)
    if obj is None:  # this one does not fit: keep the scene with fewer objects
      break
    placed.append(obj)
  placed.sort(key=lambda o: o.depth_key)

  layers = [schema.Layer('background', 'background',
                         np.dstack([bank.background(background, (h, w)),
                                    np.ones((h, w), np.float32)]))]
  no_shadow = config.prob_no_shadow
  for k, obj in enumerate(placed, 1):
    casts = rng.random() >= no_shadow
    shadow = _cast_shadow(obj, light, opacity, horizon, (h, w), config) if casts else None
    obj.record['shadow'] = None
    if shadow is not None:
      alpha, x, y, blur = shadow
      rgba = np.dstack([tint * (alpha[..., None] > 0), alpha])
      layers.append(schema.Layer(f'shadow_{k}', 'shadow', _on_canvas(rgba, x, y, (h, w)),
                                 owner=f'object_{k}'))
      obj.record['shadow'] = {**light, 'opacity': opacity, 'blur': blur}
    layers.append(schema.Layer(f'object_{k}', 'object', _on_canvas(obj.rgba, obj.x, obj.y, (h, w)),
                               label=obj.asset.label))

  provenance = {
      'generator': 'data_engine.synthesis', 'seed': int(config.seed), 'index': int(index),
      'background': bank.backgrounds[background].source, 'size': [h, w],
      'horizon_y': horizon, 'light': light, 'shadow_tint': [float(c) for c in tint],
      'objects': [{'layer': f'object_{k}', **obj.record} for k, obj in enumerate(placed, 1)]}
  return schema.assemble(f'synth-{config.seed}-{index:08d}', layers, provenance)


def _place(bank: Bank, rng: np.random.Generator, config, placed: list[_Placed],
           size: tuple[int, int], horizon: float) -> _Placed | None:
  """One more object whose box, and those of the objects behind it, stay visible enough."""
  h, w = size
  max_overlap = config.max_overlap
  flip_prob = config.hflip_prob
  heights = config.object_height
  perspectives = config.perspective

  def fits(box: tuple[int, int, int, int]) -> bool:
    scene = [(o.box, o.depth_key) for o in placed] + [(box, (box[3], len(placed)))]
    return all(_covered(b, [c for c, front in scene if front > key]) <= max_overlap
               for b, key in scene)

  for _ in range(int(config.placement_tries)):
    asset = bank.objects[bank.draw_object(rng, bool(config.balance_categories))]
    flip = bool(rng.random() < flip_prob)
    height = float(rng.uniform(*heights))
    p = float(rng.uniform(*perspectives))
    where = float(rng.random())
    base = min(int(round(horizon + p * (h - horizon))), h - 1)
    ah, aw = asset.rgba.shape[:2]
    # Shrink an object that would leave the canvas rather than cut it: objects stay complete.
    scale = min(height * h * p / ah, w / aw, (base + 1) / ah)
    drawn = max(1, round(aw * scale)), max(1, round(ah * scale))
    # Resampling costs more than the overlap check: rule out what cannot fit first.
    if not fits(_box(where, base, *drawn, w)):
      continue
    rgba = _resize(asset.rgba[:, ::-1] if flip else asset.rgba, drawn)
    if rgba is None:
      continue
    box = _box(where, base, rgba.shape[1], rgba.shape[0], w)
    if not fits(box):
      continue
    record = {'source': asset.source, 'label': asset.label, 'scale': scale, 'flip': flip,
              'object_height': height, 'perspective': p, 'base_y': base, 'box': list(box)}
    return _Placed(asset, rgba, box[0], box[1], len(placed), record)
  return None


def _box(where: float, base: int, width: int, height: int, canvas_width: int) -> tuple:
  """The box of a width x height object standing on row `base`, `where` in [0, 1) across."""
  x = int(where * (canvas_width - width + 1))
  return x, base + 1 - height, x + width, base + 1


def _covered(box: tuple[int, int, int, int], others: list) -> float:
  """The fraction of `box` covered by the union of `others`."""
  x0, y0, x1, y1 = box
  cover = np.zeros((y1 - y0, x1 - x0), bool)
  for ox0, oy0, ox1, oy1 in others:
    cover[max(oy0 - y0, 0):max(oy1 - y0, 0), max(ox0 - x0, 0):max(ox1 - x0, 0)] = True
  return float(cover.mean())


def _resize(rgba: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
  """`rgba` resampled to `size` (w, h) premultiplied (no dark fringes) and cropped to its
  alpha; None if nothing is left."""
  premult = rgba.copy()
  premult[..., :3] *= rgba[..., 3:]
  shrink = size[1] < rgba.shape[0]
  out = cv2.resize(premult, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  alpha = np.clip(out[..., 3:], 0, 1)
  alpha[alpha < _EMPTY] = 0
  rgb = np.clip(out[..., :3] / np.where(alpha > 0, alpha, 1), 0, 1) * (alpha > 0)
  return _crop(np.concatenate([rgb, alpha], -1))


def _cast_shadow(obj: _Placed, light: dict, opacity: float, horizon: float,
                 size: tuple[int, int], config):
  """The shadow `obj` casts on the ground: (alpha, x, y, blur sigmas) of the part on the
  canvas, or None if none of it is."""
  alpha = obj.rgba[..., 3]
  ah, aw = alpha.shape
  x0, _, _, base = obj.box
  base -= 1
  az, el = math.radians(light['azimuth']), math.radians(light['elevation'])
  squash = max(base - horizon, 0.0) / (config.focal_length * size[1])
  dx = math.cos(az) / math.tan(el)           # ground offset per pixel of height
  dy = squash * math.sin(az) / math.tan(el)

  # Channels: the silhouette, and silhouette * t with t the height as a fraction of the
  # object's, which says how far from the contact each part of the shadow is.
  height = np.linspace(1, 0, ah, dtype=np.float32)[:, None]
  src = np.dstack([alpha, alpha * height])
  # Shear: a pixel d above the base moves d * dx sideways.
  left = math.floor(min(dx * (ah - 1), 0))
  width = aw + math.ceil(abs(dx) * (ah - 1)) + 1
  shear = np.float32([[1, -dx, dx * (ah - 1) - left], [0, 1, 0]])
  ground = cv2.warpAffine(src, shear, (width, ah), flags=cv2.INTER_LINEAR)
  # Squash onto the ground: d lands |d * dy| rows from the base. A ground pixel is shadowed
  # if any height landing on it is opaque, so take the max over them, not the mean.
  rows = max(1, round(abs(dy) * (ah - 1)) + 1)
  if rows < ah:
    ground = cv2.dilate(ground, np.ones((math.ceil(ah / rows), 1), np.uint8))
  ground = cv2.resize(ground, (width, rows),
                      interpolation=cv2.INTER_AREA if rows < ah else cv2.INTER_LINEAR)
  if dy > 0:  # towards the camera: the object's top lands farthest below the base
    ground = ground[::-1]
  top = base if dy > 0 else base - rows + 1
  # The object's depth: its slices farther back cast the same shadow further up the image.
  sweep = round(squash * config.object_depth * aw)
  if sweep:
    ground = cv2.dilate(np.pad(ground, ((sweep, 0), (0, 0), (0, 0))),
                        np.ones((sweep + 1, 1), np.uint8), anchor=(0, 0))
    top -= sweep

  p = obj.record['perspective']
  contact, far = (p * s for s in config.shadow_blur)
  r = math.ceil(3 * far)
  ground = np.pad(ground, ((r, r), (r, r), (0, 0)))
  x, y = x0 + left - r, top - r
  kernel = (2 * r + 1, 2 * r + 1)
  soft = cv2.GaussianBlur(ground, kernel, far) if far > 0 else ground
  # t of the nearby silhouette, also defined on the blurred fringe outside it.
  t = np.clip(soft[..., 1] / np.maximum(soft[..., 0], 1e-6), 0, 1)
  shadow = np.zeros(t.shape, np.float32)
  for i in range(_BANDS):
    sigma = contact + (far - contact) * i / (_BANDS - 1)
    level = cv2.GaussianBlur(ground[..., 0], kernel, sigma) if sigma > 0 else ground[..., 0]
    shadow += np.clip(1 - np.abs(t * (_BANDS - 1) - i), 0, 1) * level
  shadow *= opacity * (1 - config.shadow_fade * t)
  shadow[:max(0, math.ceil(horizon) - y)] = 0  # the ground ends at the horizon
  shadow = np.clip(shadow, 0, 1)
  shadow[shadow < _EMPTY] = 0

  h, w = size
  crop = shadow[max(0, -y):max(0, h - y), max(0, -x):max(0, w - x)]
  if not crop.size or not crop.any():
    return None
  return crop, max(x, 0), max(y, 0), [contact, far]


def _on_canvas(rgba: np.ndarray, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
  """`rgba` pasted with its top-left at (x, y) into an empty [H, W, 4] layer."""
  out = np.zeros((*size, 4), np.float32)
  out[y:y + rgba.shape[0], x:x + rgba.shape[1]] = rgba
  return out
