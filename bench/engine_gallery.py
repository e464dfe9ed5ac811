"""A gallery of the offline engine on scikit-image's real photos, for a person to look at.

    python bench/engine_gallery.py [--output out/engine_gallery.png] [--config SPEC]

One row per photo: photo | clean background | objects over a checkerboard | shadows over
white | recomposition; the dropped photos are listed with their reasons.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
import skimage.data

from data_engine import config as engine_config
from data_engine import jobs, runners
from layerjax.data import examples, images, schema

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
CELL = 192


def _tile(rgb: np.ndarray) -> Image.Image:
  im = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
  im.thumbnail((CELL, CELL))
  canvas = Image.new('RGB', (CELL, CELL), (40, 40, 40))
  canvas.paste(im, ((CELL - im.width) // 2, (CELL - im.height) // 2))
  return canvas


def row(sample: schema.LayeredSample, photo: np.ndarray) -> list[Image.Image]:
  h, w = sample.size
  objects = [l.rgba for l in sample.layers if l.kind == 'object']
  shadows = [l.rgba for l in sample.layers if l.kind == 'shadow']
  board = examples.checkerboard((h, w), max(4, h // 24), np.random.default_rng(0), 0.0)
  on_board = schema.composite([board, *objects])[..., :3]
  white = np.ones((h, w, 4), np.float32)
  on_white = schema.composite([white, *shadows])[..., :3]
  return [_tile(photo), _tile(sample.layers[0].rgba[..., :3]), _tile(on_board),
          _tile(on_white), _tile(sample.image)]


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--output', type=Path, default=Path('out/engine_gallery.png'))
  p.add_argument('--config', default=None)
  args = p.parse_args()
  config = engine_config.load(args.config)
  with tempfile.TemporaryDirectory() as tmp:
    photos = Path(tmp) / 'photos'
    photos.mkdir()
    for name in PHOTOS:
      Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(photos / f'{name}.png')
    out = Path(tmp) / 'out'
    runners.run_local(jobs.list_photos(photos), jobs.make_decompose(config, photos), out,
                      progress=False)
    rows, notes = [], []
    d = config.decompose
    for key, entry in sorted(runners.finished(out).items()):
      if entry['dropped']:
        notes.append(f'{Path(key).name}: dropped at {entry["dropped"]}')
        continue
      sample = schema.read_folder(out / 'samples' / entry['samples'][0])
      # The photo as the engine's load stage saw it.
      photo = images.load_image(key, alpha=d.transparent, background=d.composite_over)
      rows.append(row(sample, images.scale_to_fit(photo, d.max_side)))
  header = ['photo', 'background', 'objects', 'shadows', 'recomposed']
  gallery = Image.new('RGB', (CELL * len(header), 20 + CELL * len(rows) + 16 * len(notes)),
                      'white')
  draw = ImageDraw.Draw(gallery)
  for j, title in enumerate(header):
    draw.text((j * CELL + 4, 4), title, fill='black')
  for i, tiles in enumerate(rows):
    for j, tile in enumerate(tiles):
      gallery.paste(tile, (j * CELL, 20 + i * CELL))
  for k, note in enumerate(notes):
    draw.text((4, 20 + CELL * len(rows) + 16 * k), note, fill='black')
  args.output.parent.mkdir(parents=True, exist_ok=True)
  gallery.save(args.output)
  print(f'wrote {args.output}: {len(rows)} decomposed, {len(notes)} dropped')
  for note in notes:
    print(' ', note)


if __name__ == '__main__':
  main()
