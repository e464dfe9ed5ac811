"""The pictures (layerjax.export.preview): a sheet's layout, the checkerboard under
transparent tiles, a decomposition's contact sheet and the evaluation grid drawn with them,
checked against hand-computed pixel positions and values."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from layerjax.data import schema
from layerjax.export import preview
from layerjax.train import evaluate
from test_schema import make_sample

G, C = preview.GAP, preview.CAPTION
LIGHT, DARK = 204, 102  # the checkerboard's cells: 0.8 and 0.4 grey, 8-bit


def solid(h, w, rgb):
  return np.broadcast_to(np.float32(rgb), (h, w, len(rgb))).copy()


def white(a):
  return (a == 255).all()


def test_sheet_lays_out_scaled_captioned_tiles_row_by_row():
  # tile=40: the 10 x 20 tiles become 20 x 40, the 20 x 10 one 40 x 20; cells are 40 x 40,
  # one every 44 pixels across and every 40 + C + G pixels down.
  red, green, blue = (1, 0, 0), (0, 1, 0), (0, 0, 1)
  out = preview.sheet([[('red', solid(10, 20, red)), ('green', solid(10, 20, green))],
                       [('blue', solid(20, 10, blue))]], tile=40)
  pitch = 40 + C + G
  assert out.shape == (G + 2 * pitch, G + 2 * 44, 3) and out.dtype == np.uint8
  # Wide tiles centred vertically in their cells, white above and below.
  np.testing.assert_allclose(out[G + 10:G + 30, G:G + 40], solid(20, 40, red) * 255, atol=1)
  np.testing.assert_allclose(out[G + 10:G + 30, G + 44:G + 84], solid(20, 40, green) * 255,
                             atol=1)
  assert white(out[G:G + 10, G:G + 84]) and white(out[G + 30:G + 40, G:G + 84])
  # The tall tile centred horizontally in the second row; the row's second cell is empty.
  y = G + pitch
  np.testing.assert_allclose(out[y:y + 40, G + 10:G + 30], solid(40, 20, blue) * 255, atol=1)
  assert white(out[y:y + 40, G:G + 10]) and white(out[y:y + 40, G + 30:G + 44])
  assert white(out[y:, G + 44:])
  # The gaps are white; captions are dark pixels in the band under each tile only.
  assert white(out[:G]) and white(out[:, :G]) and white(out[:, G + 40:G + 44])
  for top in (G + 40, y + 40):
    assert (out[top:top + C, G:G + 40] < 100).any()
  assert not (out[G + 40:G + 40 + C, G + 84:] < 255).any()
  with pytest.raises(ValueError, match='at least one tile in every row'):
    preview.sheet([[('red', solid(2, 2, red))], []])
  with pytest.raises(ValueError, match=r"tile 'mask' has shape \(2, 2\), expected"):
    preview.sheet([[('red', solid(2, 2, red)), ('mask', np.ones((2, 2)))]])


def test_transparent_tiles_are_drawn_over_the_checkerboard():
  # 16 x 32, tile=32: drawn at its own size. Left half transparent, right half blue-ish at
  # alpha 0.5; checker cells of 8 pixels start light at the tile's top left.
  rgba = np.zeros((16, 32, 4), np.float32)
  rgba[:, 16:] = (0.2, 0.6, 1.0, 0.5)
  out = preview.sheet([[('half', rgba)]], tile=32).astype(float)
  at = lambda y, x: out[G + y, G + x]
  np.testing.assert_array_equal(at(2, 2), [LIGHT] * 3)     # cell (0, 0)
  np.testing.assert_array_equal(at(2, 10), [DARK] * 3)     # cell (0, 1)
  np.testing.assert_array_equal(at(10, 10), [LIGHT] * 3)   # cell (1, 1)
  # Half the colour plus half the cell; 1.5 steps for the alpha stored as 128 / 255.
  blue = np.array([0.2, 0.6, 1.0]) * 255
  np.testing.assert_allclose(at(2, 18), 0.5 * blue + 0.5 * LIGHT, atol=1.5)  # cell (0, 2)
  np.testing.assert_allclose(at(2, 26), 0.5 * blue + 0.5 * DARK, atol=1.5)   # cell (0, 3)


def test_contact_sheet_is_input_layers_and_recomposition():
  s = make_sample(h=40, w=56)  # tile=56: every tile at its own size
  out = preview.contact_sheet(s, tile=56)
  n = len(s.layers) + 2
  assert out.shape == (G + 40 + C + G, G + n * (56 + G), 3)
  tile = lambda i: out[G:G + 40, G + i * (56 + G):G + i * (56 + G) + 56].astype(float)
  np.testing.assert_allclose(tile(0), s.image * 255, atol=0.5)
  np.testing.assert_allclose(tile(n - 1), schema.composite(s.layers)[..., :3] * 255, atol=1)
  # The shadow and the ball are transparent at the top left corner: the light cell shows.
  for i in (2, 3):
    np.testing.assert_array_equal(tile(i)[2, 2], [LIGHT] * 3)


def test_evaluation_grid_is_one_sheet_row_per_example():
  b, h, w = 3, 8, 8
  colours = np.float32([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
  batch = {'image': np.stack([solid(h, w, c) for c in colours]),
           'prompt': np.stack([solid(h, w, (0.4, 0.4, 1 - c[2])) for c in colours])}
  fg = np.stack([solid(h, w, (*c[::-1], 1.0)) for c in colours])
  pred = {'foreground': fg, 'recomposition': fg[..., :3]}  # a model without background/shadow
  out = evaluate.grid(batch, pred, rows=2)
  pitch = h + C + G
  assert out.shape == (G + 2 * pitch, G + 6 * (w + G), 3)
  assert evaluate.grid(batch, pred, rows=5).shape[0] == G + b * pitch  # no more rows than B
  cell = lambda r, c: out[G + r * pitch + h // 2, G + c * (w + G) + w // 2].astype(float)
  for r in range(2):
    np.testing.assert_array_equal(cell(r, 0), colours[r] * 255)
    np.testing.assert_array_equal(cell(r, 1), [102, 102, 255 * (1 - colours[r, 2])])
    np.testing.assert_array_equal(cell(r, 3), colours[r][::-1] * 255)
    np.testing.assert_array_equal(cell(r, 5), colours[r][::-1] * 255)
    for c in (2, 4):  # the layers it does not predict: empty, so the light cell shows
      np.testing.assert_array_equal(cell(r, c), [LIGHT] * 3)


def test_training_draws_its_grids_without_the_export_extra():
  """psd-tools and python-pptx are the [export] extra; a TPU pod installs [tpu,gcs] only."""
  code = ('import sys, layerjax.train.trainer; '
          "print(sorted({'psd_tools', 'pptx'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).parents[1])
  assert out.stdout.strip() == '[]'
