"""Inference post-processing: the model's geometry, edge-aware alpha upsampling, exact layers."""

import numpy as np
import pytest

from layerjax.data.schema import composite
from layerjax.infer import postprocess as post


def test_geometry_fits_the_model_size_and_pads_to_the_step():
  # 640x480 into 32x32: scale 0.05 -> 32x24, already a multiple of 4.
  g = post.geometry((480, 640), (32, 32), 4)
  assert (g.scaled, g.padded) == ((24, 32), (24, 32))
  # 30 wide, 100 tall: scale 0.32 -> 32 x 9.6 -> 10, padded to 12.
  g = post.geometry((100, 30), (32, 32), 4)
  assert (g.scaled, g.padded) == ((32, 10), (32, 12))
  # A small photo is scaled up to the size the model was trained at.
  assert post.geometry((8, 16), (32, 32), 4).scaled == (16, 32)
  x = np.random.default_rng(0).uniform(size=(100, 30, 3)).astype(np.float32)
  m = post.to_model(x, g)
  assert m.shape == (32, 12, 3)
  np.testing.assert_array_equal(m[:, 10], m[:, 9])  # edge pixels repeated into the padding


def test_prompts_map_to_the_model_pixels_they_cover():
  g = post.geometry((480, 640), (32, 32), 4)  # 20 photo pixels per model pixel
  assert post.box_to_model((0, 0, 640, 480), g) == (0, 0, 32, 24)
  assert post.box_to_model((30, 50, 41, 61), g) == (1, 2, 3, 4)
  assert post.box_to_model((30, 50, 31, 51), g) == (1, 2, 2, 3)  # never empty
  # Pixel centres: photo pixel 9.5 is the boundary between model pixels 0 and 1.
  np.testing.assert_allclose(post.points_to_model([(9.5, 29.5)], g), [(0.0, 1.0)])
  mask = np.zeros((480, 640), bool)
  mask[100:140, 200:260] = True  # model rows 5-7, columns 10-13
  m = post.mask_to_model(mask, g)
  assert m.shape == (24, 32) and m.sum() == 2 * 3
  thin = np.zeros((480, 640), bool)
  thin[200, :] = True  # 1/20 of a model row: still one row of model pixels
  assert post.mask_to_model(thin, g).sum() == 32


def _disc_scene(n: int):
  """A disc (alpha from 4x supersampling) of a shaded red over a colour gradient."""
  s = 4 * n
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
  alpha = (np.hypot(xx - 0.45, yy - 0.5) < 0.3).reshape(n, 4, n, 4).mean((1, 3))
  yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
  bg = np.stack([0.3 + 0.4 * xx, 0.5 + 0 * yy, 0.7 - 0.3 * yy], -1)
  fg = np.array([0.9, 0.2, 0.1]) * (0.8 + 0.2 * xx[..., None])
  photo = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
  return alpha.astype(np.float32), photo.astype(np.float32)


@pytest.mark.parametrize('factor', [4, 8, 16])
def test_guided_upsampling_recovers_the_photos_edge(factor):
  alpha, photo = _disc_scene(256)
  low = post.resize(alpha, (256 // factor, 256 // factor))  # what a perfect model gives
  guided = post.guided_upsample(low, photo)
  bilinear = post.resize(low, (256, 256))
  err_guided = np.abs(guided - alpha).mean()
  err_bilinear = np.abs(bilinear - alpha).mean()
  # The photo's edge is a colour edge, where alpha is a linear function of the colour: the
  # filter recovers it (measured 0.0004-0.0024, against bilinear's 0.010-0.047).
  assert err_guided < 0.1 * err_bilinear
  assert guided.shape == (256, 256) and guided.min() >= 0 and guided.max() <= 1


def test_exact_layers_recompose_to_the_photo():
  rng = np.random.default_rng(0)
  alpha, _ = _disc_scene(64)
  h = w = 64
  bg = rng.uniform(0.2, 0.8, (h, w, 3)).astype(np.float32)
  shadow = np.zeros((h, w, 4), np.float32)
  shadow[40:60, 10:50] = (0.1, 0.1, 0.1, 0.5)
  fg = np.broadcast_to(np.float32([0.8, 0.3, 0.2]), (h, w, 3))
  ones = np.ones((h, w, 1), np.float32)
  photo = composite([np.concatenate([bg, ones], -1), shadow,
                     np.concatenate([fg, alpha[..., None]], -1)])[..., :3]
  # The model's estimates: the object's colour off; the completed background right where
  # the layers cover it, wrong where nothing does (there the photo itself must show).
  est = post.Extracted(alpha=alpha, colour=np.clip(fg + 0.1, 0, 1), shadow=shadow.copy(),
                       label='disc', referring=('the disc',))
  uncovered = (alpha == 0) & (shadow[..., 3] == 0)
  completed = np.where(uncovered[..., None], np.clip(bg + 0.2, 0, 1), bg)
  layers, repaired = post.exact_layers(photo, completed, [est])
  assert [l.kind for l in layers] == ['background', 'shadow', 'object']
  assert layers[2].label == 'disc' and layers[2].referring == ('the disc',)
  np.testing.assert_allclose(composite(layers)[..., :3], photo, atol=1e-5)
  np.testing.assert_allclose(layers[0].rgba[uncovered][:, :3], photo[uncovered], atol=1e-6)
  # Where the object is opaque its colour is the photo's, whatever the estimate was.
  opaque = alpha == 1
  np.testing.assert_allclose(layers[2].rgba[opaque][:, :3], photo[opaque], atol=1e-5)
  np.testing.assert_array_equal(layers[2].rgba[..., 3], alpha)
  assert repaired == 0
  # A background wrong under the shadow: where the shadow alone covers it, the photo shows
  # the true one through the shadow and it is solved back, the shadow kept; only on the
  # object's soft edge (two unknowns, one photo) may the photo be kept in the background.
  layers, repaired = post.exact_layers(photo, np.clip(bg + 0.2, 0, 1), [est])
  np.testing.assert_allclose(composite(layers)[..., :3], photo, atol=1e-5)
  only_shadow = (shadow[..., 3] > 0) & (alpha == 0)
  np.testing.assert_allclose(layers[0].rgba[only_shadow][:, :3], bg[only_shadow], atol=1e-5)
  np.testing.assert_array_equal(layers[1].rgba[only_shadow], shadow[only_shadow])
  assert repaired <= ((alpha > 0) & (alpha < 1)).sum()
  # A shadow darker than the photo allows (the photo brighter than any background under it
  # gives): those pixels keep the photo in the background and lose the shadow.
  dark = post.Extracted(alpha=alpha, colour=fg, shadow=shadow * (1, 1, 1, 1.9), label='disc')
  layers, repaired = post.exact_layers(photo, bg, [dark])
  np.testing.assert_allclose(composite(layers)[..., :3], photo, atol=1e-5)
  assert 0 < repaired <= ((shadow[..., 3] > 0) & (alpha < 1)).sum()


def test_exact_thresholds_the_models_layers_then_solves():
  """`decomposer.exact` (what `Decomposer.decompose` does after sampling, and the trainer's
  `exact` evaluation) on hand-made decoded layers: alpha under ALPHA_MIN and shadow opacity
  under SHADOW_MIN are the model's noise and dropped, so the photo shows there; the model's
  completion stays behind the object; the layers recompose to the photo."""
  from layerjax.data.schema import ALPHA_MIN
  from layerjax.infer import decomposer
  rng = np.random.default_rng(0)
  h = w = 16
  photo = rng.uniform(0.1, 0.9, (h, w, 3)).astype(np.float32)
  background = np.clip(photo + 0.1, 0, 1)  # off everywhere
  alpha = np.full((h, w), 0.5 * ALPHA_MIN, np.float32)
  alpha[4:8, 4:8] = 1
  fg = np.concatenate([rng.uniform(0, 1, (h, w, 3)), alpha[..., None]], -1).astype(np.float32)
  shadow = np.full((h, w, 4), 0.5 * decomposer.SHADOW_MIN, np.float32)
  ones = np.ones((h, w, 1), np.float32)
  layers = decomposer.exact({'background': np.concatenate([background, ones], -1),
                             'foreground': fg, 'shadow': shadow}, photo)
  assert [l.kind for l in layers] == ['background', 'object']
  np.testing.assert_allclose(composite(layers)[..., :3], photo, atol=1e-5)
  inside = np.zeros((h, w), bool)
  inside[4:8, 4:8] = True
  np.testing.assert_array_equal(layers[1].rgba[..., 3], np.where(inside, 1, 0))
  np.testing.assert_array_equal(layers[0].rgba[~inside][:, :3], photo[~inside])
  np.testing.assert_allclose(layers[0].rgba[inside][:, :3], background[inside], atol=1e-6)
