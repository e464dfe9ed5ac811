"""The layered representation every part of layerjax speaks (ARCHITECTURE.md §1).

A `LayeredSample` is a photo plus an ordered stack of straight (non-premultiplied) RGBA
layers, back to front: an opaque background, then for each object its shadow and the object
itself. Inside the code images are float32 in [0, 1]; on disk they are 8-bit PNGs next to a
JSON manifest (`write_folder` / `read_folder`).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from layerjax.fileio import Artifact, atomic_dir, inside, is_temporary, read_json, safe_name

KINDS = ('background', 'object', 'shadow')
FORMAT = 'layerjax.layered/1'
ALPHA_MIN = 1 / 255  # below it a layer is invisible and its colour undefined
SAMPLE_FOLDER = Artifact('layered sample folder', lambda p: (p / 'manifest.json').is_file())


class SampleError(ValueError):
  """A sample that breaks the schema; the message names the sample and the field."""


@dataclasses.dataclass
class Layer:
  """One straight-alpha RGBA layer, `rgba` [H, W, 4] float32 in [0, 1]."""
  name: str                                  # unique within the sample, e.g. 'object_1'
  kind: str                                  # one of KINDS
  rgba: np.ndarray
  visible_mask: np.ndarray | None = None     # [H, W] bool: where this layer is seen in the image
  bbox: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), end-exclusive, of alpha > 0
  owner: str | None = None                   # shadows: the name of the object casting them
  label: str = ''
  caption: str = ''
  referring: tuple[str, ...] = ()            # referring expressions, e.g. 'the red car on the left'


@dataclasses.dataclass
class Prompt:
  """A spatial prompt selecting one object layer: points (x, y), a box, a mask, or several."""
  target: str
  points: tuple[tuple[float, float], ...] = ()
  box: tuple[int, int, int, int] | None = None
  mask: np.ndarray | None = None             # [H, W] bool


@dataclasses.dataclass
class LayeredSample:
  id: str
  image: np.ndarray                          # [H, W, 3] float32 in [0, 1]
  layers: list[Layer]
  prompts: list[Prompt] = dataclasses.field(default_factory=list)
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-serialisable

  @property
  def size(self) -> tuple[int, int]:
    return self.image.shape[0], self.image.shape[1]

  def layer(self, name: str) -> Layer:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(f'sample {self.id!r}: no layer named {name!r}')

  def validate(self, atol: float | None = None) -> 'LayeredSample':
    validate(self, atol)
    return self


# --- compositing --------------------------------------------------------------------------

def over(front, back):
  """Porter-Duff 'over' of straight RGBA arrays [..., 4] (numpy or jax), straight RGBA out."""
  af, ab = front[..., 3:], back[..., 3:]
  alpha = af + ab * (1 - af)
  premult = front[..., :3] * af + back[..., :3] * ab * (1 - af)
  # Where nothing is covered the colour is irrelevant; 0 avoids dividing by zero.
  safe = alpha + (alpha == 0)
  return _concat(premult / safe, alpha, like=front)


def composite(layers: Sequence) -> Any:
  """`L_n over (... over (L_1 over L_0))` for RGBA arrays or `Layer`s, back to front.

  Accumulated premultiplied (one multiply-add per layer, one division at the end): the same
  result as chaining `over`, at a fraction of the cost for deep stacks."""
  arrays = [layer.rgba if isinstance(layer, Layer) else layer for layer in layers]
  if not arrays:
    raise ValueError('composite of an empty layer stack')
  alpha = arrays[0][..., 3:]
  premult = arrays[0][..., :3] * alpha
  for front in arrays[1:]:
    af = front[..., 3:]
    premult = front[..., :3] * af + premult * (1 - af)
    alpha = af + alpha * (1 - af)
  return _concat(premult / (alpha + (alpha == 0)), alpha, like=arrays[0])


def _concat(rgb, alpha, like):
  if isinstance(like, np.ndarray):
    return np.concatenate([rgb, alpha], axis=-1)
  import jax.numpy as jnp
  return jnp.concatenate([rgb, alpha], axis=-1)


def visible_masks(layers: Sequence[Layer], threshold: float = 0.5) -> list[np.ndarray]:
  """Where each layer's contribution to the composite exceeds `threshold`."""
  masks, cover = [], np.zeros(layers[0].rgba.shape[:2], np.float32)
  for layer in reversed(layers):
    a = layer.rgba[..., 3]
    masks.append(a * (1 - cover) > threshold)
    cover = cover + a * (1 - cover)
  return masks[::-1]


def alpha_bbox(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
  ys, xs = np.nonzero(alpha > 0)
  if not len(xs):
    return None
  return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def interior_point(mask: np.ndarray) -> tuple[float, float] | None:
  """The (x, y) pixel centre of `mask` farthest from its boundary; None for an empty mask."""
  if not mask.any():
    return None
  from scipy import ndimage
  dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
  y, x = np.unravel_index(np.argmax(dist), dist.shape)
  return float(x), float(y)


def assemble(sample_id: str, layers: list[Layer], provenance: dict | None = None,
             prompts: bool = True) -> LayeredSample:
  """A validated sample from its layers: image = composite, visible masks and boxes filled in,
  and (if `prompts`) one spatial prompt per visible object: its box, visible mask and the
  visible pixel farthest from the mask's edge."""
  for layer, mask in zip(layers, visible_masks(layers)):
    layer.visible_mask = mask
    layer.bbox = alpha_bbox(layer.rgba[..., 3])
  image = np.clip(composite(layers)[..., :3], 0, 1).astype(np.float32)
  spatial = []
  for layer in layers if prompts else ():
    point = interior_point(layer.visible_mask) if layer.kind == 'object' else None
    if point is not None:
      spatial.append(Prompt(layer.name, points=(point,), box=layer.bbox,
                            mask=layer.visible_mask.copy()))
  return LayeredSample(sample_id, image, layers, spatial, dict(provenance or {})).validate()


# --- validation ---------------------------------------------------------------------------

def default_atol(num_layers: int) -> float:
  """Composite-vs-image tolerance: half an 8-bit step per quantised layer plus the image's."""
  return (num_layers + 1) * 0.5 / 255 + 1e-6


def _check_unit_array(sid: str, field: str, x, shape: tuple) -> None:
  if not isinstance(x, np.ndarray) or x.dtype != np.float32:
    raise SampleError(f'sample {sid!r}: {field} must be a float32 numpy array, got '
                      f'{getattr(x, "dtype", type(x).__name__)}')
  if x.shape != shape:
    raise SampleError(f'sample {sid!r}: {field} has shape {x.shape}, expected {shape}')
  if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
    raise SampleError(f'sample {sid!r}: {field} has values outside [0, 1]')


def _check_mask(sid: str, field: str, m, hw: tuple) -> None:
  if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != hw:
    raise SampleError(f'sample {sid!r}: {field} must be a bool array of shape {hw}, got '
                      f'{getattr(m, "dtype", type(m).__name__)} {getattr(m, "shape", "")}')


def _check_box(sid: str, field: str, box, hw: tuple) -> None:
  h, w = hw
  if len(box) != 4 or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
    raise SampleError(f'sample {sid!r}: {field} {tuple(box)} is not a box (x0, y0, x1, y1) '
                      f'inside the {w}x{h} image')


def validate(sample: LayeredSample, atol: float | None = None) -> None:
  """Raises `SampleError` naming the sample and field for anything off the schema.

  Checks types, shapes and ranges, the layer order (one opaque background first), names and
  shadow owners, masks, boxes and prompts, and preservation: the composite of the layers
  reproduces the image to `atol` (default `default_atol(len(layers))`, the error 8-bit
  storage can introduce).
  """
  sid = sample.id
  if not isinstance(sid, str) or not sid:
    raise SampleError(f'sample id must be a non-empty string, got {sid!r}')
  image = sample.image
  if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3:
    raise SampleError(f'sample {sid!r}: image must be [H, W, 3], got '
                      f'{getattr(image, "shape", type(image).__name__)}')
  hw = image.shape[:2]
  _check_unit_array(sid, 'image', image, (*hw, 3))
  if not sample.layers:
    raise SampleError(f'sample {sid!r}: no layers')

  names = [layer.name for layer in sample.layers]
  if len(set(names)) != len(names):
    raise SampleError(f'sample {sid!r}: layer names are not unique: {names}')
  for i, layer in enumerate(sample.layers):
    if layer.kind not in KINDS:
      raise SampleError(f'sample {sid!r}: layers[{i}] ({layer.name!r}) kind {layer.kind!r} is '
                        f'not one of {KINDS}')
  objects = {layer.name for layer in sample.layers if layer.kind == 'object'}
  for i, layer in enumerate(sample.layers):
    field = f'layers[{i}] ({layer.name!r})'
    if (layer.kind == 'background') != (i == 0):
      raise SampleError(f'sample {sid!r}: {field} is a {layer.kind}; the background must be '
                        f'the first layer and only there')
    _check_unit_array(sid, f'{field}.rgba', layer.rgba, (*hw, 4))
    if i == 0 and layer.rgba[..., 3].min() < 1:
      raise SampleError(f'sample {sid!r}: {field} background is not opaque '
                        f'(min alpha {layer.rgba[..., 3].min():.4f})')
    if layer.kind == 'shadow' and layer.owner not in objects:
      raise SampleError(f'sample {sid!r}: {field} shadow owner {layer.owner!r} is not an '
                        f'object layer')
    if layer.kind != 'shadow' and layer.owner is not None:
      raise SampleError(f'sample {sid!r}: {field} only shadows have an owner')
    if layer.visible_mask is not None:
      _check_mask(sid, f'{field}.visible_mask', layer.visible_mask, hw)
      if (layer.visible_mask & (layer.rgba[..., 3] == 0)).any():
        raise SampleError(f'sample {sid!r}: {field}.visible_mask covers fully transparent '
                          f'pixels')
    if layer.bbox is not None:
      _check_box(sid, f'{field}.bbox', layer.bbox, hw)
    if not all(isinstance(t, str) for t in (layer.label, layer.caption, *layer.referring)):
      raise SampleError(f'sample {sid!r}: {field} texts must be strings')

  for i, prompt in enumerate(sample.prompts):
    field = f'prompts[{i}]'
    if prompt.target not in objects:
      raise SampleError(f'sample {sid!r}: {field} target {prompt.target!r} is not an object '
                        f'layer')
    if prompt.box is not None:
      _check_box(sid, f'{field}.box', prompt.box, hw)
    if prompt.mask is not None:
      _check_mask(sid, f'{field}.mask', prompt.mask, hw)
    for x, y in prompt.points:
      if not (0 <= x < hw[1] and 0 <= y < hw[0]):
        raise SampleError(f'sample {sid!r}: {field} point ({x}, {y}) is outside the image')

  try:
    json.dumps(sample.provenance)
  except (TypeError, ValueError) as e:
    raise SampleError(f'sample {sid!r}: provenance is not JSON-serialisable ({e})') from None

  atol = default_atol(len(sample.layers)) if atol is None else atol
  err = np.abs(composite(sample.layers)[..., :3] - image).max(-1)
  if err.max() > atol:
    bad = int((err > atol).sum())
    raise SampleError(f'sample {sid!r}: the composite of the layers differs from the image by '
                      f'up to {err.max():.4f} (> {atol:.4f}) at {bad} pixels')


# --- on-disk form -------------------------------------------------------------------------

def to_uint8(x: np.ndarray) -> np.ndarray:
  """A float image in [0, 1] as 8 bits, rounded to nearest (what every file we write holds)."""
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def encode_png(x: np.ndarray) -> bytes:
  """8-bit PNG of a float image in [0, 1] ([H, W, 3|4]) or of a bool mask ([H, W])."""
  u8 = x.astype(np.uint8) * 255 if x.dtype == np.bool_ else to_uint8(x)
  buf = io.BytesIO()
  Image.fromarray(u8).save(buf, format='PNG')
  return buf.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
  """Float32 [0, 1] image in PIL `mode` ('RGB', 'RGBA'), or a bool mask for mode '1'."""
  with Image.open(io.BytesIO(data)) as im:
    if mode == '1':
      return np.asarray(im.convert('L')) >= 128
    return np.asarray(im.convert(mode), np.float32) / 255


def _save_png(folder: Path, rel: str, x: np.ndarray) -> str:
  (folder / rel).parent.mkdir(parents=True, exist_ok=True)
  (folder / rel).write_bytes(encode_png(x))
  return rel


def sample_folder(root, sample_id: str) -> Path:
  """Where the sample `sample_id` lives under `root`: a folder named by `safe_name`, so an id
  read from a dataset never leads out of `root` nor shares a folder with another id."""
  return Path(root) / safe_name(sample_id)


def sample_folders(source) -> list[Path]:
  """A directory of sample folders, or an iterable of folders, as a sorted list. Only
  writers' temporaries are left out: a sample named '.x' is a sample like any other."""
  if isinstance(source, (str, Path)):
    root = Path(source)
    if not root.is_dir():
      raise FileNotFoundError(f'{root}: no such directory')
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_temporary(p.name))
  return [Path(p) for p in source]


def write_folder(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """Writes the sample as PNGs + `manifest.json`, atomically; validates it first. An existing
  sample folder at `path` is replaced only with `overwrite`; anything else there is refused."""
  sample.validate()
  path = Path(path)
  with atomic_dir(path, SAMPLE_FOLDER, overwrite) as tmp:
    _save_png(tmp, 'image.png', sample.image)
    layers = []
    for i, layer in enumerate(sample.layers):
      stem = f'{i:02d}_{layer.kind}'
      entry = {'name': layer.name, 'kind': layer.kind,
               'file': _save_png(tmp, f'layers/{stem}.png', layer.rgba),
               'bbox': None if layer.bbox is None else list(layer.bbox), 'owner': layer.owner,
               'label': layer.label, 'caption': layer.caption,
               'referring': list(layer.referring), 'visible_mask': None}
      if layer.visible_mask is not None:
        entry['visible_mask'] = _save_png(tmp, f'masks/{stem}.png', layer.visible_mask)
      layers.append(entry)
    prompts = []
    for i, prompt in enumerate(sample.prompts):
      entry = {'target': prompt.target, 'points': [list(p) for p in prompt.points],
               'box': None if prompt.box is None else list(prompt.box), 'mask': None}
      if prompt.mask is not None:
        entry['mask'] = _save_png(tmp, f'prompts/{i:02d}_mask.png', prompt.mask)
      prompts.append(entry)
    manifest = {'format': FORMAT, 'id': sample.id, 'height': sample.size[0],
                'width': sample.size[1], 'image': 'image.png', 'layers': layers,
                'prompts': prompts, 'provenance': sample.provenance}
    (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=2) + '\n')
  return path


def _load_png(folder: Path, rel: str, sid: str, field: str, mode: str) -> np.ndarray:
  try:
    path = inside(folder, rel)
  except ValueError as e:
    raise SampleError(f'{folder / "manifest.json"}: sample {sid!r}: {field}: {e}') from None
  try:
    return decode_png(path.read_bytes(), mode)
  except FileNotFoundError:
    raise FileNotFoundError(f'{folder}: sample {sid!r}: {field} names {rel}, which is '
                            f'missing') from None
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise SampleError(f'{path}: sample {sid!r}: {field} is not a readable PNG ({e})') from None


def read_folder(path) -> LayeredSample:
  """Reads a folder written by `write_folder` and validates it. Every file the manifest names
  must lie inside the folder (no absolute paths, no '..', no links out)."""
  folder = Path(path)
  manifest_path = folder / 'manifest.json'
  m = read_json(manifest_path, SampleError)
  sid = m.get('id', folder.name) if isinstance(m, dict) else folder.name
  try:
    if m['format'] != FORMAT:
      raise SampleError(f'{manifest_path}: format {m["format"]!r}, expected {FORMAT!r}')
    load = lambda rel, field, mode: _load_png(folder, rel, sid, field, mode)
    layers = [
        Layer(name=e['name'], kind=e['kind'], rgba=load(e['file'], f'layers[{i}].file', 'RGBA'),
              visible_mask=(None if e.get('visible_mask') is None else
                            load(e['visible_mask'], f'layers[{i}].visible_mask', '1')),
              bbox=None if e.get('bbox') is None else tuple(e['bbox']), owner=e.get('owner'),
              label=e.get('label', ''), caption=e.get('caption', ''),
              referring=tuple(e.get('referring', ())))
        for i, e in enumerate(m['layers'])]
    prompts = [
        Prompt(target=e['target'], points=tuple(tuple(p) for p in e.get('points', ())),
               box=None if e.get('box') is None else tuple(e['box']),
               mask=None if e.get('mask') is None else load(e['mask'], f'prompts[{i}].mask', '1'))
        for i, e in enumerate(m.get('prompts', []))]
    sample = LayeredSample(id=sid, image=load(m['image'], 'image', 'RGB'), layers=layers,
                           prompts=prompts, provenance=m.get('provenance', {}))
  except (KeyError, TypeError) as e:
    raise SampleError(f'{manifest_path}: sample {sid!r}: malformed manifest ({e!r})') from None
  try:
    return sample.validate()
  except SampleError as e:
    raise SampleError(f'{folder}: {e}') from None
