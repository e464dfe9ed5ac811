"""Layered Photoshop files (PSD) from a `LayeredSample` and back, through psd-tools.

`write_psd`: an 8-bit RGB document of the image's size, one pixel layer per layer, back to
front (so each shadow lies right under its object, as in the sample), each cropped to the box
of its 8-bit alpha and placed at that box's (top, left), straight colour plus a transparency
channel as Photoshop keeps them. Layers are named as `names.layer_names` says (the label, else
the schema name; a shadow 'mug shadow'; unique, at most 255 characters: Photoshop's limit),
in the Unicode name block as well as the legacy one. A layer with no visible pixel is written
empty (a 0x0 layer, as Photoshop stores one), not skipped: the stack keeps its layers, a
shadow its owner, the reader the same count. The merged image is `schema.composite` of the
layers, so a viewer that reads only the merged image shows our picture.

What the layer names cannot carry (schema name, kind, shadow owner, label, caption,
referring expressions) is recorded in the document's XMP metadata, which Photoshop and
Krita 5.1 keep across edits (GIMP 2.10 drops it): the property `layerjax:layers` holds a JSON
list, bottom layer first, one entry per PSD layer naming it by its PSD name, and `layerjax:id`
the sample id.

`read_psd`: the visible pixel layers, bottom first, back into full-canvas straight RGBA
layers (parts outside the canvas are cut; a layer's opacity is folded into its alpha). A
layer whose PSD name matches a recorded entry takes that entry's name, kind, owner and texts;
any other layer (added or renamed in an editor, or every layer of a file whose XMP an editor
dropped, as GIMP does) is told by its name and place as `names` states: 'X shadow' the shadow
of object X, any other an object. The bottom layer is the background: where it is not opaque
it is composited over white, as Photoshop's Flatten Image does, and the sample's provenance
says so. Groups, adjustment, fill, type, shape and smart-object
layers, masks, effects, clipping, blend modes other than normal, and documents other than
8-bit RGB are refused with one line naming the file and the problem. Prompts are not stored.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import BlendMode, ColorMode, Compression, Resource
from psd_tools.psd import PSD
from psd_tools.psd.image_data import ImageData
from psd_tools.psd.image_resources import ImageResource

from layerjax.data.schema import (Layer, LayeredSample, alpha_bbox, assemble, composite,
                                  to_uint8)
from layerjax.export.names import clean, identify, layer_names
from layerjax.fileio import as_path, atomic_file, check_file

MAX_SIDE = 30000      # a PSD's largest canvas and layer side (PSB goes further; we write PSD)
NS = 'https://github.com/layerjax/layerjax/ns/psd/1.0/'


class PsdError(ValueError):
  """A PSD or a sample that cannot be converted; the message names the file and why."""


def _xmp(record: dict) -> bytes:
  fields = ''.join(f'<layerjax:{k}>{escape(json.dumps(v, ensure_ascii=False))}</layerjax:{k}>'
                   for k, v in record.items())
  return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
          '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
          '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
          f'<rdf:Description rdf:about="" xmlns:layerjax="{NS}">{fields}</rdf:Description>'
          '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode('utf-8')


def write_psd(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """Writes the sample as a layered PSD at `path`, atomically (see the module docstring);
  an existing file is replaced only with `overwrite`. Returns the path."""
  dst = as_path(path)
  check_file(dst, overwrite)
  h, w = sample.size
  if max(h, w) > MAX_SIDE:
    raise PsdError(f'{dst}: sample {sample.id!r} is {w}x{h}; a PSD layer or canvas side is at '
                   f'most {MAX_SIDE} px')
  sample.validate()
  names = layer_names(sample, dst, PsdError)

  psd = PSDImage.new('RGBA', (w, h))  # 'RGBA': layers keep a transparency channel, not a mask
  for layer, name in zip(sample.layers, names):
    rgba = to_uint8(layer.rgba)
    x0, y0, x1, y1 = alpha_bbox(rgba[..., 3]) or (0, 0, 0, 0)
    pixel = PixelLayer.frompil(Image.fromarray(rgba[y0:y1, x0:x1], 'RGBA'), psd, top=y0,
                               left=x0, compression=Compression.RLE)
    # The setter adds the Unicode name Photoshop writes; GIMP reads only it or ASCII.
    pixel.name = name
    psd.append(pixel)
  buf = io.BytesIO()
  psd.save(buf)
  # psd-tools renders its own merged image on save; ours replaces it in the file's record.
  buf.seek(0)
  record = PSD.read(buf)
  merged = to_uint8(composite(sample.layers))
  record.image_data = ImageData(compression=Compression.RLE)
  record.image_data.set_data([merged[..., c].tobytes() for c in range(4)], record.header)
  entries = [{'psd': name, 'name': layer.name, 'kind': layer.kind, 'owner': layer.owner,
              'label': layer.label, 'caption': layer.caption,
              'referring': list(layer.referring)}
             for layer, name in zip(sample.layers, names)]
  record.image_resources[Resource.XMP_METADATA] = ImageResource(
      key=Resource.XMP_METADATA, data=_xmp({'id': sample.id, 'layers': entries}))
  with atomic_file(dst) as tmp, open(tmp, 'wb') as f:
    record.write(f)
  return dst


def _recorded(path, psd: PSDImage) -> dict:
  """The `layerjax:` fields of the document's XMP, parsed; {} when there are none."""
  data = psd.image_resources.get_data(Resource.XMP_METADATA)
  if not data:
    return {}
  try:
    root = ET.fromstring(data.decode('utf-8', 'replace').strip('\x00 \n'))
  except ET.ParseError:
    return {}  # someone else's XMP we cannot parse holds nothing of ours
  out = {}
  for el in root.iter():
    if el.tag.startswith(f'{{{NS}}}'):
      try:
        out[el.tag[len(NS) + 2:]] = json.loads(el.text or '')
      except json.JSONDecodeError as e:
        raise PsdError(f'{path}: the layerjax record in the XMP metadata is not JSON '
                       f'({e})') from None
  return out


def _check(path, psd: PSDImage) -> list:
  """The visible pixel layers, bottom first; anything this reader cannot take is refused."""
  if psd.color_mode != ColorMode.RGB or psd.depth != 8:
    raise PsdError(f'{path}: a {psd.depth}-bit {psd.color_mode.name} document; only 8-bit RGB '
                   f'is read (convert it in Photoshop: Image > Mode)')
  layers = []
  for layer in psd:
    what = (f'is a {layer.kind} layer (only pixel layers are read: rasterise, merge or '
            f'ungroup it first)' if layer.kind != 'pixel' else
            'has a mask' if layer.has_mask() else
            'has layer effects' if layer.has_effects() else
            'is a clipping layer' if layer.clipping else
            f'uses blend mode {layer.blend_mode.name.lower()} (only normal is read)'
            if layer.blend_mode != BlendMode.NORMAL else '')
    if what:
      raise PsdError(f'{path}: layer {layer.name!r} {what}')
    if layer.visible:
      layers.append(layer)
  if not layers:
    raise PsdError(f'{path}: no visible pixel layer')
  return layers


def _canvas_rgba(layer, h: int, w: int) -> np.ndarray:
  """The layer on a transparent [h, w, 4] canvas, opacity folded into alpha."""
  out = np.zeros((h, w, 4), np.float32)
  px = layer.numpy()
  if px is None:
    return out
  if px.shape[-1] == 3:  # a layer without a transparency channel is opaque
    px = np.concatenate([px, np.ones_like(px[..., :1])], -1)
  px[..., 3] *= layer.opacity / 255
  top, left = layer.top, layer.left
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + px.shape[0], h), min(left + px.shape[1], w)
  if y0 < y1 and x0 < x1:
    out[y0:y1, x0:x1] = px[y0 - top:y1 - top, x0 - left:x1 - left]
  return out


def read_psd(path) -> LayeredSample:
  """A validated `LayeredSample` from a PSD (see the module docstring for what is read)."""
  src = as_path(path)
  with src.open('rb') as f:
    psd = PSDImage.open(f)
  pixel_layers = _check(src, psd)
  recorded = _recorded(src, psd)
  entries = {e['psd']: e for e in recorded.get('layers', [])
             if isinstance(e, dict) and isinstance(e.get('psd'), str) and e.get('name')}
  h, w = psd.height, psd.width
  provenance = {'psd': str(src)}
  # Krita ends the names it writes with a NUL: names are compared cleaned.
  psd_names = [clean(pl.name) for pl in pixel_layers]
  fields = identify(psd_names, [entries.pop(n, None) for n in psd_names])  # one layer each
  layers = []
  for i, (pl, f) in enumerate(zip(pixel_layers, fields)):
    rgba = _canvas_rgba(pl, h, w)
    if i == 0 and rgba[..., 3].min() < 1:
      rgba = composite([np.ones_like(rgba), rgba])
      provenance['background'] = 'composited over white where the bottom layer was not opaque'
    layers.append(Layer(rgba=rgba, **f))
  sample_id = recorded.get('id') if isinstance(recorded.get('id'), str) else Path(src.name).stem
  return assemble(sample_id or 'psd', layers, provenance, prompts=False)

