"""A contact sheet of a decomposition, for people who would rather look than read: the input,
each layer over a checkerboard with its name under it, and the layers' recomposition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from layerjax.data import examples
from layerjax.data.schema import LayeredSample, composite, over
from layerjax.fileio import atomic_file, check_file

CAPTION = 14  # pixels under each tile for its name
GAP = 4


def contact_sheet(sample: LayeredSample, tile: int = 192) -> np.ndarray:
  """uint8 [H, W, 3]: input | each layer (back to front) over a checkerboard | recomposition,
  every tile scaled to `tile` pixels on its longer side, named underneath."""
  h, w = sample.size
  s = tile / max(h, w)
  th, tw = max(1, round(h * s)), max(1, round(w * s))
  board = examples.checkerboard((h, w), max(2, max(h, w) // 16), np.random.default_rng(0), 0.0)
  tiles = [('input', sample.image)]
  tiles += [(l.label or l.name, over(l.rgba, board)[..., :3]) for l in sample.layers]
  tiles.append(('recomposition', composite(sample.layers)[..., :3]))
  sheet = Image.new('RGB', (len(tiles) * (tw + GAP) + GAP, th + CAPTION + 2 * GAP), 'white')
  draw = ImageDraw.Draw(sheet)
  for i, (name, rgb) in enumerate(tiles):
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    x = GAP + i * (tw + GAP)
    sheet.paste(img.resize((tw, th), Image.Resampling.LANCZOS), (x, GAP))
    draw.text((x, GAP + th + 1), name[:max(4, tw // 7)], fill=(0, 0, 0))
  return np.asarray(sheet)


def write_preview(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """The contact sheet as a PNG at `path`, atomically; replaced only with `overwrite`."""
  path = Path(path)
  check_file(path, overwrite)
  with atomic_file(path) as tmp:
    Image.fromarray(contact_sheet(sample)).save(tmp, format='PNG')
  return path
