"""Crello (Hugging Face `cyberagent/crello`) graphic-design templates -> `LayeredSample`s.

The dataset is released as parquet, one row per template: the canvas size and, per element
(back to front), its type, box, rotation, opacity, text and a pre-rendered image. `rows` reads
the raw rows cheaply; `to_sample` redraws every element into its own full-canvas layer the
way the authors' renderer (cr-renderer) draws it, folds the leading backdrop elements into
one opaque background and keeps every other visible element as an object layer.
`layerd_layers` makes instead the ground truth of LayerD's Crello protocol (its own rules).

Two geometry conventions exist: v5 and later store boxes in canvas pixels and angles in
degrees ('v5'); v1-v4 store boxes as fractions of the canvas and angles in radians
('normalized').
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from layerjax.data.images import ImageError, load_image
from layerjax.data.schema import Layer, LayeredSample, SampleError, assemble, over
from layerjax.evaluate.layerd import CRELLO_SHORT_SIDE, group_layers

LAYOUTS = ('v5', 'normalized')
ELEMENT_COLUMNS = ('type', 'left', 'top', 'width', 'height', 'angle', 'opacity', 'image', 'text')
REQUIRED_COLUMNS = ('id', 'canvas_width', 'canvas_height', 'length', *ELEMENT_COLUMNS)

_BATCH_ROWS = 16          # templates per parquet read; element images make rows megabytes big
_OPAQUE = 0.999           # an element this opaque everywhere hides all below it: a backdrop
_EMPTY = 0.5 / 255        # a layer fainter than this everywhere vanishes in 8-bit storage
_LIST_TYPES = ('Sequence', 'List', 'LargeList')


# --- rows ---------------------------------------------------------------------------------

def rows(paths, *, layout: str = 'auto') -> Iterator[dict]:
  """Raw template rows from parquet files or directories of them (`*.parquet`, sorted).

  Every file is checked up front (readable parquet with all `REQUIRED_COLUMNS`); rows are
  then read lazily, their ClassLabel ids decoded to names, images left encoded. Each row also
  carries '_file', '_row' (index in the file) and '_layout' ('v5' iff the file has the
  v5-only `font_bold` column when `layout` is 'auto').
  """
  if layout not in ('auto', *LAYOUTS):
    raise ValueError(f"layout {layout!r} is not 'auto' or one of {LAYOUTS}")
  plan = [(path, *_inspect(path, layout)) for path in parquet_files(paths)]
  return _iter_rows(plan)


def parquet_files(paths) -> list[Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(Path, paths):
    if path.is_dir():
      found = sorted(path.rglob('*.parquet'))
      if not found:
        raise FileNotFoundError(f'{path}: no *.parquet files in this directory')
      files += found
    elif path.exists():
      files.append(path)
    else:
      raise FileNotFoundError(f'{path}: no such file or directory')
  return files


def _inspect(path: Path, layout: str) -> tuple[dict[str, Callable], str]:
  """Checks the file's schema; returns its ClassLabel decoders and its layout."""
  try:
    schema = pq.read_schema(path)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f'{path}: not a readable parquet file ({e})') from None
  missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
  if missing:
    raise ValueError(f'{path}: not a Crello parquet file, missing column(s) '
                     f'{", ".join(missing)}')
  decoders = {}
  for name, feature in _features(path, schema).items():
    decode = _class_label_decoder(feature)
    if decode is not None and name in schema.names:
      decoders[name] = decode
  type_field = schema.field('type').type
  if 'type' not in decoders and not _holds_strings(type_field):
    raise ValueError(f'{path}: column type is {type_field} without ClassLabel names in the '
                     f"parquet's huggingface metadata, so element types cannot be decoded")
  if layout == 'auto':
    layout = 'v5' if 'font_bold' in schema.names else 'normalized'
  return decoders, layout


def _features(path: Path, schema: pa.Schema) -> dict[str, Any]:
  """The Hugging Face `datasets` feature spec stored in the parquet metadata, or {}."""
  raw = (schema.metadata or {}).get(b'huggingface')
  if raw is None:
    return {}
  try:
    features = json.loads(raw).get('info', {}).get('features', {})
  except (ValueError, AttributeError) as e:
    raise ValueError(f'{path}: malformed huggingface schema metadata ({e})') from None
  return features if isinstance(features, dict) else {}


def _class_label_decoder(feature) -> Callable | None:
  """Maps stored class ids (nested in lists as the feature nests) to names; None if the
  feature holds no ClassLabel. Ids outside the names (e.g. -1, 'no label') become None."""
  if isinstance(feature, list) and len(feature) == 1:
    inner = _class_label_decoder(feature[0])
  elif isinstance(feature, dict) and feature.get('_type') in _LIST_TYPES:
    inner = _class_label_decoder(feature.get('feature'))
  elif isinstance(feature, dict) and feature.get('_type') == 'ClassLabel':
    # `datasets` names the classes '0', '1', ... when only their number is given.
    names = feature.get('names') or [str(i) for i in range(feature.get('num_classes', 0))]
    return lambda x: names[x] if isinstance(x, int) and 0 <= x < len(names) else None
  else:
    return None
  if inner is None:
    return None
  return lambda xs: None if xs is None else [inner(x) for x in xs]


def _holds_strings(t: pa.DataType) -> bool:
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    t = t.value_type
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _iter_rows(plan) -> Iterator[dict]:
  for path, decoders, layout in plan:
    try:
      with pq.ParquetFile(path) as pf:
        index = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
          for row in batch.to_pylist():
            for name, decode in decoders.items():
              row[name] = decode(row[name])
            row.update(_file=str(path), _row=index, _layout=layout)
            index += 1
            yield row
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f'{path}: unreadable parquet data ({e})') from None


# --- to_sample ----------------------------------------------------------------------------

def to_sample(row: dict, *, max_size: int | None = 1024) -> LayeredSample:
  """The template as a background plus one object layer per remaining visible element.

  The output is the canvas scaled by min(1, max_size / longest side). Leading elements that
  are ColoredBackgrounds or opaque over the whole canvas are composited onto white as the
  background; elements that render (all but) invisible are dropped, noted in the provenance.
  Raises `SampleError` naming the template, the element and the field.
  """
  if max_size is not None and max_size < 1:
    raise ValueError(f'max_size must be a positive number of pixels or None, got {max_size}')
  tid, where, layout, canvas_w, canvas_h, n = _template(row)
  s = 1.0 if max_size is None else min(1.0, max_size / max(canvas_w, canvas_h))
  out_w, out_h = max(1, round(s * canvas_w)), max(1, round(s * canvas_h))
  # Per-axis factors (s up to rounding) put the canvas edges exactly on the output edges, so
  # full-canvas elements cover every output pixel.
  scale = (out_w / canvas_w, out_h / canvas_h)

  background = np.ones((out_h, out_w, 4), np.float32)
  objects, dropped, types = [], [], []
  in_backdrop = True
  for i in range(n):
    el = _element(row, i, layout, canvas_w, canvas_h, f'{where} element {i}')
    types.append(el['type'])
    rgba = _render(el, scale, (out_h, out_w))
    if rgba[..., 3].max() < _EMPTY:
      dropped.append(i)
      continue
    kind = el['type'].lower()
    if in_backdrop and (kind == 'coloredbackground' or rgba[..., 3].min() >= _OPAQUE):
      background = over(rgba, background)
      continue
    in_backdrop = False
    objects.append(Layer(f'object_{len(objects) + 1}', 'object', rgba, label=_label(el['type']),
                         caption=el['text'] if kind == 'textelement' else ''))
  # Anything over opaque white is opaque; pin alpha against float rounding in `over`.
  background[..., 3] = 1
  provenance = {'source': 'crello', 'template_id': tid, 'layout': layout,
                'file': row.get('_file'), 'row': row.get('_row'),
                'canvas_size': [canvas_w, canvas_h], 'scale': s, 'element_types': types,
                'dropped_elements': dropped}
  layers = [Layer('background', 'background', np.clip(background, 0, 1)), *objects]
  return assemble(sample_id(tid), layers, provenance)


def sample_id(template_id: str) -> str:
  """The id of a template's sample; its LayerD ground truth's folder is named by it too."""
  return f'crello-{template_id}'


def _template(row: dict) -> tuple[str, str, str, int | float, int | float, int]:
  """The row's id, its name for messages, layout, canvas width and height, element count."""
  tid = row.get('id')
  if not isinstance(tid, str) or not tid:
    raise SampleError(f'crello row {row.get("_row")} of {row.get("_file")}: id {tid!r} is '
                      f'not a template id')
  where = f'crello template {tid!r}'
  layout = row.get('_layout') or ('v5' if 'font_bold' in row else 'normalized')
  if layout not in LAYOUTS:
    raise SampleError(f'{where}: _layout {layout!r} is not one of {LAYOUTS}')
  canvas_w = _canvas_side(row, 'canvas_width', where)
  canvas_h = _canvas_side(row, 'canvas_height', where)
  return tid, where, layout, canvas_w, canvas_h, _length(row, where)


# --- LayerD's ground truth ----------------------------------------------------------------

def layerd_layers(row: dict, short_side: int = CRELLO_SHORT_SIDE) -> list[np.ndarray]:
  """The template's ground truth for LayerD's Crello protocol: uint8 straight RGBA layers
  [H, W, 4], back to front, or [] where LayerD writes none (fewer than 2 layers are left).

  As LayerD's `tools/generate_crello_matting.py --save-layers` (CyberAgentAILab/LayerD) makes
  them, through `make_top_layers_alpha_and_image_pair` (followed in the fork
  zyz-2299mod10/TAS-LayerD, `src/layerd/data/crello.py`: the upstream file is not stored) and
  `src/layerd/data/renderer.py` (both repositories, the same code):
  - every element is drawn alone on a transparent canvas scaled uniformly by
    `short_side / min(canvas sides)`, up or down, of size `int(side * scale)` each way;
  - a transparent element (its stored image is mode RGBA with no texel of alpha 255; not the
    opacity field, and never an RGB, LA or palette image) is left out;
  - at an element other than the first whose drawn alpha is 255 everywhere, the list of kept
    elements is cut to `kept[i:]`. LayerD's `i` is the element's index, but it slices by
    position in a list from which transparent elements were already removed: with r of them
    removed before it, the cut also drops the covering element and the r - 1 kept elements
    after it. A bug in LayerD's code, reproduced: its published numbers were scored on it;
  - the kept elements are grouped (`evaluate.layerd.group_layers`); when the back group's
    layers have a pixel of alpha 0 (any one of them, as LayerD takes the min over the
    group), an opaque white layer is put first;
  - the result is the kept element layers themselves, not the groups.
  Drawing is `_render`'s (cr-renderer's placement, rotation and opacity, which LayerD's
  renderer shares). Two differences: LayerD draws a TextElement with its fonts (skia and the
  dataset's `resources/fonts.pickle`) where `_render` stretches the element's stored image,
  and skia samples the stored image with its default (nearest-neighbour) sampling where
  `_render` filters bilinearly, so edges and upscaled texels differ slightly.
  """
  if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1:
    raise ValueError(f'short_side must be a positive number of pixels, got {short_side!r}')
  _, where, layout, canvas_w, canvas_h, n = _template(row)
  scale = short_side / min(canvas_w, canvas_h)
  out_hw = (int(canvas_h * scale), int(canvas_w * scale))
  layers, transparent = [], []
  for i in range(n):
    el = _element(row, i, layout, canvas_w, canvas_h, f'{where} element {i}')
    transparent.append(_is_transparent(row['image'][i]['bytes']))
    # 8-bit at once, as LayerD's layers are PNGs: its rules compare alphas with 0 and 255.
    x = np.round(_render(el, (scale, scale), out_hw) * 255).astype(np.uint8)
    x[x[..., 3] == 0] = 0               # skia keeps premultiplied colour: none under alpha 0
    layers.append(x)
  kept = list(range(n))
  for i in range(n):
    if transparent[i] and i in kept:
      kept.remove(i)
    if layers[i][..., 3].min() == 255:  # LayerD skips i = 0, where the cut keeps all anyway
      kept = kept[i:]                   # by position, not by element index: LayerD's bug
  if len(kept) < 2:
    return []
  stack = [layers[k] for k in kept]
  back = group_layers([x[..., 3] for x in stack])[0]
  if min(stack[k][..., 3].min() for k in back) == 0:
    stack.insert(0, np.full_like(stack[0], 255))
  return stack


def _is_transparent(data: bytes) -> bool:
  """LayerD's `is_transparent`: an RGBA image whose largest alpha is below 255."""
  with Image.open(io.BytesIO(data)) as im:
    return im.mode == 'RGBA' and im.getextrema()[3][1] != 255


# --- elements -----------------------------------------------------------------------------

def _number(value, what: str, positive: bool = False) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  if not math.isfinite(x) or (positive and x <= 0):
    raise SampleError(f'{what} {value!r} is not a {"positive" if positive else "finite"} '
                      f'number')
  return x


def _canvas_side(row: dict, field: str, where: str) -> int | float:
  # v1-v3 store the side as a ClassLabel, decoded by `rows` to its name, e.g. '1080'.
  x = _number(row.get(field), f'{where}: {field}', positive=True)
  return int(x) if x.is_integer() else x


def _length(row: dict, where: str) -> int:
  n = row.get('length')
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise SampleError(f'{where}: length {n!r} is not a number of elements')
  for field in ELEMENT_COLUMNS:
    values = row.get(field)
    k = len(values) if isinstance(values, list) else 0
    if k != n:
      raise SampleError(f'{where} element {min(k, n)}: column {field} has {k} entries but the '
                        f'template has length {n}')
  return n


def _element(row: dict, i: int, layout: str, canvas_w, canvas_h, where: str) -> dict:
  """Element `i`'s type, text, decoded image and geometry in canvas pixels and degrees."""
  kind = row['type'][i]
  if not isinstance(kind, str) or not kind:
    raise SampleError(f'{where}: type {kind!r} is not an element type name')
  el = {'type': kind, 'text': row['text'][i] or '', 'image': _decode_image(row['image'][i], where)}
  for field in ('left', 'top', 'width', 'height'):
    el[field] = _number(row[field][i], f'{where}: {field}', positive=field in ('width', 'height'))
  el['angle'] = _number(row['angle'][i], f'{where}: angle')
  el['opacity'] = min(1.0, max(0.0, _number(row['opacity'][i], f'{where}: opacity')))
  if layout == 'normalized':
    el['left'] *= canvas_w
    el['width'] *= canvas_w
    el['top'] *= canvas_h
    el['height'] *= canvas_h
    el['angle'] = math.degrees(el['angle'])
  return el


def _decode_image(entry, where: str) -> np.ndarray:
  """Straight RGBA float32 [h, w, 4] from an HF Image struct {'bytes', 'path'}."""
  data = entry.get('bytes') if isinstance(entry, dict) else None
  if not data:
    raise SampleError(f'{where}: image has no bytes')
  try:
    return load_image(data, alpha='keep', name=f'{where}: image')
  except ImageError as e:
    raise SampleError(str(e)) from None


def _render(el: dict, scale: tuple[float, float], out_hw: tuple[int, int]) -> np.ndarray:
  """The element drawn alone onto a transparent [H, W, 4] canvas, straight alpha.

  As cr-renderer: translate to (left, top), rotate by `angle` degrees (clockwise on screen,
  y down) about the box centre, stretch the image over the box, multiply alpha by opacity.
  """
  img = el['image']
  w, h, sx, sy = el['width'], el['height'], *scale
  # Resample premultiplied colour so transparent texels (often black) don't bleed into edges.
  planes = [img[..., c] * img[..., 3] for c in range(3)] + [img[..., 3]]
  ih, iw = img.shape[:2]
  # Shrink first with Pillow's filtered resize: the affine step below samples at output
  # pixel centres only, which aliases when it minifies.
  rw, rh = min(iw, max(1, math.ceil(w * sx))), min(ih, max(1, math.ceil(h * sy)))
  images = [Image.fromarray(np.ascontiguousarray(p, np.float32)) for p in planes]
  if (rw, rh) != (iw, ih):
    images = [im.resize((rw, rh), Image.Resampling.BILINEAR) for im in images]

  # Image pixel coordinates -> output pixel coordinates (continuous, pixel centres at +0.5).
  t = math.radians(el['angle'])
  cos, sin = math.cos(t), math.sin(t)
  forward = (_affine(sx, 0, 0, 0, sy, 0)
             @ _affine(1, 0, el['left'] + w / 2, 0, 1, el['top'] + h / 2)
             @ _affine(cos, -sin, 0, sin, cos, 0)
             @ _affine(w / rw, 0, -w / 2, 0, h / rh, -h / 2))
  corners = forward @ np.array([[0, rw, 0, rw], [0, 0, rh, rh], [1, 1, 1, 1]], np.float64)
  out_h, out_w = out_hw
  x0, y0 = max(0, math.floor(corners[0].min())), max(0, math.floor(corners[1].min()))
  x1, y1 = min(out_w, math.ceil(corners[0].max())), min(out_h, math.ceil(corners[1].max()))
  canvas = np.zeros((out_h, out_w, 4), np.float32)
  if x0 >= x1 or y0 >= y1:
    return canvas
  # Pillow wants the inverse map, from the window [x0:x1, y0:y1] back into the image.
  inverse = np.linalg.inv(forward) @ _affine(1, 0, x0, 0, 1, y0)
  coeffs = tuple(inverse[:2].ravel())
  window = np.stack([np.asarray(im.transform((x1 - x0, y1 - y0), Image.Transform.AFFINE,
                                             coeffs, resample=Image.Resampling.BILINEAR))
                     for im in images], -1)
  alpha = window[..., 3:]
  rgb = np.where(alpha > 0, window[..., :3] / np.where(alpha > 0, alpha, 1), 0)
  canvas[y0:y1, x0:x1, :3] = np.clip(rgb, 0, 1)
  canvas[y0:y1, x0:x1, 3:] = np.clip(alpha, 0, 1) * el['opacity']
  return canvas


def _affine(a, b, c, d, e, f) -> np.ndarray:
  return np.array([[a, b, c], [d, e, f], [0, 0, 1]], np.float64)


def _label(type_name: str) -> str:
  """'SvgMaskElement' -> 'svg mask', 'coloredBackground' -> 'colored background'."""
  base = re.sub(r'element$', '', type_name, flags=re.IGNORECASE) or type_name
  return re.sub(r'(?<=[a-z0-9])(?=[A-Z])', ' ', base).lower()
