"""Pictures for people who would rather look than read: `picture` draws an image (an RGBA one
over a checkerboard, so transparency reads the same in every picture), `sheet` rows of them
with captions, and `contact_sheet` is one decomposition as such a row (the input, each layer
with its name, the layers' recomposition). The evaluation grids of `layerjax.train.evaluate`
use `sheet` too."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from layerjax.data import examples
from layerjax.data.schema import LayeredSample, composite, over
from layerjax.fileio import atomic_file, check_file

CAPTION = 14  # pixels under each tile for its caption
GAP = 4  # white pixels around and between the cells
CHECKER = 8  # checkerboard cell, in sheet pixels whatever the tile's scale

Tile = tuple[str, np.ndarray]  # (caption, RGB or straight RGBA float [h, w, 3|4] in [0, 1])


def _fitted(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`tile` resized to `size` (h, w) as straight RGBA float; Pillow resamples RGBA
  premultiplied, so transparent pixels do not bleed their colour into the edges."""
  rgb8 = (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)
  if rgb8.shape[-1] == 3:
    rgb8 = np.concatenate([rgb8, np.full(rgb8.shape[:-1] + (1,), 255, np.uint8)], -1)
  img = Image.fromarray(rgb8).resize(size[::-1], Image.Resampling.LANCZOS)
  return np.asarray(img, np.float32) / 255


def _caption(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
  """`text` cut to fit `width` pixels, marked with '~' where cut."""
  if draw.textlength(text) <= width:
    return text
  while text and draw.textlength(text + '~') > width:
    text = text[:-1]
  return text + '~'


def picture(img: np.ndarray, longer: int) -> np.ndarray:
  """float RGB: `img` scaled so its longer side is `longer` pixels (aspect kept); an RGBA
  one over a light / dark grey checkerboard of `CHECKER`-pixel cells, light at the top left."""
  h, w = (max(1, round(n * longer / max(img.shape[:2]))) for n in img.shape[:2])
  rgba = _fitted(img, (h, w))
  if img.shape[-1] == 4:
    rgba = over(rgba, examples.checkerboard((h, w), CHECKER, np.random.default_rng(0), 0.0))
  return rgba[..., :3]


def sheet(rows: Sequence[Sequence[Tile]], tile: int = 192) -> np.ndarray:
  """uint8 [H, W, 3]: one line of cells per row, each tile a `picture` (longer side `tile`)
  with its caption underneath, centred in a cell as large as the largest tile."""
  if not rows or not all(rows):
    raise ValueError('sheet: expected at least one row and at least one tile in every row')
  for caption, img in (t for r in rows for t in r):
    if np.ndim(img) != 3 or np.shape(img)[-1] not in (3, 4):
      raise ValueError(f'sheet: tile {caption!r} has shape {np.shape(img)}, expected '
                       '[H, W, 3] (RGB) or [H, W, 4] (RGBA)')
  drawn = [[(caption, picture(img, tile)) for caption, img in row] for row in rows]
  ch = max(t.shape[0] for row in drawn for _, t in row)
  cw = max(t.shape[1] for row in drawn for _, t in row)
  columns = max(len(row) for row in rows)
  out = Image.new('RGB', (GAP + columns * (cw + GAP), GAP + len(rows) * (ch + CAPTION + GAP)),
                  'white')
  draw = ImageDraw.Draw(out)
  for r, row in enumerate(drawn):
    for c, (caption, rgb) in enumerate(row):
      h, w = rgb.shape[:2]
      x = GAP + c * (cw + GAP) + (cw - w) // 2
      y = GAP + r * (ch + CAPTION + GAP) + (ch - h) // 2
      out.paste(Image.fromarray((rgb * 255).round().astype(np.uint8)), (x, y))
      top = GAP + r * (ch + CAPTION + GAP) + ch + 1
      draw.text((GAP + c * (cw + GAP), top), _caption(draw, caption, cw), fill=(0, 0, 0))
  return np.asarray(out)


def row(sample: LayeredSample) -> list[Tile]:
  """A decomposition as sheet tiles: input, each layer back to front (by its label, else its
  name), the layers' recomposition."""
  return [('input', sample.image), *((l.label or l.name, l.rgba) for l in sample.layers),
          ('recomposition', composite(sample.layers))]


def contact_sheet(sample: LayeredSample, tile: int = 192) -> np.ndarray:
  """uint8 [H, W, 3]: `sample` as one row of a `sheet`."""
  return sheet([row(sample)], tile)


def write_preview(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """The contact sheet as a PNG at `path`, atomically; replaced only with `overwrite`."""
  path = Path(path)
  check_file(path, overwrite)
  with atomic_file(path) as tmp:
    Image.fromarray(contact_sheet(sample)).save(tmp, format='PNG')
  return path
