"""OpenRaster (`.ora`): the layered format GIMP, Krita and MyPaint open, written from a
`LayeredSample` and read back into one.

The file is a ZIP, as the OpenRaster spec (0.0.6) lays it out:
  mimetype                  first, stored uncompressed: `image/openraster`
  stack.xml                 <image w= h=><stack> one <layer> per layer, TOP FIRST, each with
                            name, src, x, y (its offset), opacity and visibility
  data/NN_<kind>.png        each layer cropped to its alpha's box, straight 8-bit RGBA
  mergedimage.png           the composite (`schema.composite`), full size
  Thumbnails/thumbnail.png  the composite within 256 x 256
Layers are named as `names.layer_names` says (the label, else the schema name; a shadow 'mug
shadow'; unique); what our reader needs beyond the spec (the kind, a shadow's owner, the
layer's own name and label) is kept in attributes of our own namespace, which the spec allows
and other programs ignore: Krita 5.1 drops them when it saves. A layer without them (every
layer of a file from elsewhere) is told by its name and place as `names` states: the bottom
layer the background, 'X shadow' the shadow of object X, any other an object.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from layerjax.data.schema import (Layer, LayeredSample, alpha_bbox, composite, decode_png,
                                  default_atol, encode_png, visible_masks)
from layerjax.export.names import identify, layer_names
from layerjax.fileio import atomic_file, check_file

MIMETYPE = 'image/openraster'
NS = 'urn:layerjax'  # our attributes: kind, owner, layer name and label
THUMBNAIL = 256


class OraError(ValueError):
  """A file that is not an OpenRaster image we can read; the message names the file."""


def _crop(layer: Layer) -> tuple[np.ndarray, int, int]:
  """The layer's pixels inside its alpha's box, and the box's (x, y); a layer with no
  visible pixel keeps one transparent pixel at (0, 0), so that it stays in the stack."""
  box = alpha_bbox(layer.rgba[..., 3])
  if box is None:
    return np.zeros((1, 1, 4), np.float32), 0, 0
  x0, y0, x1, y1 = box
  return layer.rgba[y0:y1, x0:x1], x0, y0


def write_ora(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """Writes `sample` as an OpenRaster file at `path`, atomically; an existing file is
  replaced only with `overwrite`."""
  path = Path(path)
  check_file(path, overwrite)
  sample.validate()
  names = layer_names(sample, path, OraError)
  h, w = sample.size
  ET.register_namespace('layerjax', NS)
  image = ET.Element('image', {'version': '0.0.6', 'w': str(w), 'h': str(h)})
  stack = ET.SubElement(image, 'stack')
  merged = np.clip(composite(sample.layers)[..., :3], 0, 1)
  thumb = Image.fromarray((merged * 255).round().astype(np.uint8))
  thumb.thumbnail((THUMBNAIL, THUMBNAIL))
  buf = io.BytesIO()
  thumb.save(buf, format='PNG')
  with atomic_file(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr(zipfile.ZipInfo('mimetype'), MIMETYPE, compress_type=zipfile.ZIP_STORED)
    for i, layer in reversed(list(enumerate(sample.layers))):  # the spec lists top first
      pixels, x, y = _crop(layer)
      src = f'data/{i:02d}_{layer.kind}.png'
      z.writestr(src, encode_png(pixels))
      attrs = {'name': names[i], 'src': src, 'x': str(x), 'y': str(y), 'opacity': '1.0',
               'visibility': 'visible', f'{{{NS}}}kind': layer.kind,
               f'{{{NS}}}name': layer.name, f'{{{NS}}}label': layer.label}
      if layer.owner:
        attrs[f'{{{NS}}}owner'] = layer.owner
      ET.SubElement(stack, 'layer', attrs)
    z.writestr('stack.xml', ET.tostring(image, encoding='utf-8', xml_declaration=True))
    z.writestr('mergedimage.png', encode_png(merged))
    z.writestr('Thumbnails/thumbnail.png', buf.getvalue())
  return path


def _int(e: ET.Element, key: str, path) -> int:
  try:
    return int(e.get(key, '0'))
  except ValueError:
    raise OraError(f'{path}: stack.xml: layer {e.get("name")!r} has {key}={e.get(key)!r}, '
                   'not an integer') from None


def read_ora(path) -> LayeredSample:
  """The layers of an OpenRaster file, back to front, as a validated `LayeredSample` (the
  image is their composite). Nested stacks (groups) are refused; hidden layers are dropped;
  a layer's opacity is folded into its alpha."""
  path = Path(path)
  try:
    z = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise OraError(f'{path}: not an OpenRaster file ({e})') from None
  with z:
    names = set(z.namelist())
    if 'mimetype' not in names or z.read('mimetype').decode('ascii', 'replace').strip() \
        != MIMETYPE:
      raise OraError(f'{path}: not an OpenRaster file (no mimetype {MIMETYPE!r})')
    try:
      root = ET.fromstring(z.read('stack.xml'))
    except (KeyError, ET.ParseError) as e:
      raise OraError(f'{path}: stack.xml is missing or malformed ({e})') from None
    w, h = _int(root, 'w', path), _int(root, 'h', path)
    stack = root.find('stack')
    if w < 1 or h < 1 or stack is None:
      raise OraError(f'{path}: stack.xml has no image size or no stack')
    if stack.find('stack') is not None:
      raise OraError(f'{path}: holds layer groups (nested stacks); flatten them first')
    entries = [e for e in stack.findall('layer') if e.get('visibility', 'visible') != 'hidden']
    entries.reverse()  # back to front
    fields = identify([e.get('name', '') for e in entries],
                      [{'name': e.get(f'{{{NS}}}name'), 'kind': e.get(f'{{{NS}}}kind'),
                        'owner': e.get(f'{{{NS}}}owner'), 'label': e.get(f'{{{NS}}}label', '')}
                       if e.get(f'{{{NS}}}name') else None for e in entries])
    layers = []
    for e, f in zip(entries, fields):
      src = e.get('src', '')
      if src not in names:  # only members of this archive, never a path on disk
        raise OraError(f'{path}: layer {e.get("name")!r}: src {src!r} is not in the file')
      pixels = decode_png(z.read(src), 'RGBA')
      x, y = _int(e, 'x', path), _int(e, 'y', path)
      rgba = np.zeros((h, w, 4), np.float32)
      ph, pw = pixels.shape[:2]
      ys, xs = slice(max(y, 0), min(y + ph, h)), slice(max(x, 0), min(x + pw, w))
      rgba[ys, xs] = pixels[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
      rgba[..., 3] *= float(e.get('opacity', '1'))
      layers.append(Layer(rgba=rgba, **f))
  if not layers:
    raise OraError(f'{path}: no visible layer')
  if layers[0].rgba[..., 3].min() < 1:
    raise OraError(f'{path}: the bottom layer {layers[0].name!r} does not cover the canvas; '
                   'a layered sample starts with an opaque background')
  for layer, mask in zip(layers, visible_masks(layers)):
    layer.visible_mask = mask & (layer.rgba[..., 3] > 0)
    layer.bbox = alpha_bbox(layer.rgba[..., 3])
  image = np.clip(composite(layers)[..., :3], 0, 1).astype(np.float32)
  return LayeredSample(path.stem, image, layers, [], {'source': path.name}).validate(
      atol=default_atol(len(layers)))
