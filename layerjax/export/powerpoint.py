"""PowerPoint (`.pptx`) through python-pptx: one slide of the image's aspect with one picture
per layer, back to front (a slide draws its shapes in the order they were added), each the
layer cropped to its alpha's box, placed and sized where it lies in the image and named by
its label (else its name). What people do with it: move, resize and recolour layers in
PowerPoint, Keynote or Google Slides."""

from __future__ import annotations

import io
from pathlib import Path

from layerjax.data.schema import LayeredSample, alpha_bbox, encode_png
from layerjax.fileio import atomic_file, check_file

SLIDE_WIDTH = 9_144_000  # EMU: 10 inches, PowerPoint's default width


def write_pptx(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """`sample` as a one-slide presentation at `path`, atomically; an existing file is
  replaced only with `overwrite`. Layers with no visible pixel are left out (a picture
  needs pixels)."""
  from pptx import Presentation
  path = Path(path)
  check_file(path, overwrite)
  sample.validate()
  h, w = sample.size
  emu = SLIDE_WIDTH // w  # EMU per pixel, a whole number so that positions are exact
  prs = Presentation()
  prs.slide_width, prs.slide_height = emu * w, emu * h
  slide = prs.slides.add_slide(prs.slide_layouts[6])  # the blank layout
  for layer in sample.layers:
    box = alpha_bbox(layer.rgba[..., 3])
    if box is None:
      continue
    x0, y0, x1, y1 = box
    picture = slide.shapes.add_picture(io.BytesIO(encode_png(layer.rgba[y0:y1, x0:x1])),
                                       emu * x0, emu * y0, emu * (x1 - x0), emu * (y1 - y0))
    picture.name = layer.label or layer.name
  with atomic_file(path) as tmp:
    prs.save(str(tmp))
  return path
