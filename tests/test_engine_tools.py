"""The data engine's offline vision tools on synthetic scenes whose answers are known exactly,
then detector -> segmenter on real photos that ship with scikit-image (no download)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from data_engine import core
from data_engine.tools import (captioner, depth, detector, imaging, inpainter, matting, quality,
                               saliency, segmenter, shadow)
from data_engine.tools.types import Caption, Detection, ShadowEstimate

H, W = 120, 160
CY, CX, R = 60, 90, 25
RED = np.array([0.85, 0.15, 0.1], np.float32)
YY, XX = np.mgrid[:H, :W]
DISC = (YY - CY) ** 2 + (XX - CX) ** 2 <= R ** 2
DISC_BOX = (CX - R, CY - R, CX + R + 1, CY + R + 1)


def texture(seed=0, sigma=2.0, strength=0.06) -> np.ndarray:
  """Green-grey background with blurred noise, float32 [H, W, 3]."""
  noise = cv2.GaussianBlur(np.random.default_rng(seed).random((H, W, 3)).astype(np.float32),
                           (0, 0), sigma)
  noise = (noise - noise.mean()) / noise.std()
  return np.clip(np.array([0.35, 0.5, 0.35], np.float32) + strength * noise, 0, 1)


def disc_scene(seed=0) -> np.ndarray:
  image = texture(seed)
  image[DISC] = RED
  return image


def iou(a, b) -> float:
  return float((a & b).sum() / (a | b).sum())


def box_iou(a, b) -> float:
  return iou(imaging.box_mask(a, (H, W)), imaging.box_mask(b, (H, W)))


# --- saliency, detection, segmentation --------------------------------------------------------

@pytest.mark.parametrize('name', ['spectral_residual', 'center_contrast', 'boundary_connectivity'])
def test_saliency_peaks_on_the_disc(name):
  sal = core.create('saliency', name)(disc_scene())
  assert sal.shape == (H, W) and sal.dtype == np.float32
  assert sal.min() >= 0 and sal.max() <= 1
  # Spectral residual marks the disc's outline rather than its flat inside.
  near = imaging.dilate(DISC, 4)
  assert near[np.unravel_index(np.argmax(sal), sal.shape)]
  assert sal[near].mean() > 1.5 * sal[~near].mean()


def test_saliency_of_a_flat_image_is_defined():
  flat = np.full((40, 50, 3), 0.5, np.float32)
  for tool in (saliency.SpectralResidual(), saliency.CenterContrast(),
               saliency.BoundaryConnectivity()):
    sal = tool(flat)
    assert sal.shape == (40, 50) and np.isfinite(sal).all()


@pytest.mark.parametrize('name', ['center_contrast', 'boundary_connectivity'])
def test_saliency_boxes_find_the_disc(name):
  found = detector.SaliencyBoxes(saliency=name)(disc_scene())
  assert found and all(isinstance(d, Detection) for d in found)
  top = found[0]
  assert all(isinstance(v, int) for v in top.box)
  assert box_iou(top.box, DISC_BOX) > 0.7
  assert top.mask.shape == (H, W) and top.mask.dtype == bool
  assert iou(top.mask, DISC) > 0.7
  assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)


def test_saliency_boxes_keep_area_limits():
  assert detector.SaliencyBoxes(max_area_frac=0.05)(disc_scene()) == []
  assert len(detector.SaliencyBoxes(max_objects=1)(disc_scene())) == 1


# A loose box (a detector's, say): GrabCut re-estimates colours; the watershed's sure
# foreground is the box's salient blob, which takes some of saliency's halo along.
@pytest.mark.parametrize('name,loose_iou', [('grabcut', 0.95), ('watershed', 0.75)])
def test_segmenters_cut_the_disc(name, loose_iou):
  seg = core.create('segmenter', name)
  for seed in range(3):
    mask = seg(disc_scene(seed), DISC_BOX)
    assert mask.shape == (H, W) and mask.dtype == bool
    assert iou(mask, DISC) > 0.85
    for margin in (0.05, 0.1, 0.15):
      loose = imaging.pad_box(DISC_BOX, (H, W), margin=margin)
      assert iou(seg(disc_scene(seed), loose), DISC) > loose_iou


def test_grabcut_is_deterministic():
  seg = segmenter.GrabCut()
  assert np.array_equal(seg(disc_scene(), DISC_BOX), seg(disc_scene(), DISC_BOX))


def test_component_at_picks_the_centre_piece_with_holes_filled():
  mask = np.zeros((30, 30), bool)
  mask[5:25, 5:25] = True
  mask[10:15, 10:15] = False     # a hole
  mask[0:3, 27:30] = True        # another piece
  out = imaging.component_at(mask, (5, 5, 25, 25))
  assert out[5:25, 5:25].all() and not out[0:3, 27:30].any()
  # The centre outside every piece: the nearest one.
  ring = np.zeros((30, 30), bool)
  ring[0:3, 0:3] = True
  ring[20:30, 20:30] = True
  assert imaging.component_at(ring, (10, 10, 18, 18))[25, 25]


# --- depth -------------------------------------------------------------------------------------

def test_vertical_prior_depth_and_order():
  prior = depth.VerticalPrior()
  d = prior(np.zeros((H, W, 3), np.float32))
  assert d.shape == (H, W) and d.dtype == np.float32
  assert d[0, 0] == 0 and d[-1, 0] == 1 and (np.diff(d[:, 0]) > 0).all()
  high, low, tie_small, tie_big = (np.zeros((H, W), bool) for _ in range(4))
  high[10:40, 10:40] = True       # ends higher: farther
  low[50:90, 20:60] = True        # reaches lowest: nearest
  tie_big[40:70, 80:140] = True   # ends on the same row as tie_small but is larger
  tie_small[60:70, 100:110] = True
  # Back to front: high, then the larger of the tie, the smaller, then the lowest.
  assert prior.order([low, high, tie_small, tie_big]) == [1, 3, 2, 0]
  assert depth.VerticalPrior(horizon=0.5)(np.zeros((H, W, 3)))[: H // 2].max() == 0


# --- inpainting --------------------------------------------------------------------------------

# Biharmonic fills extrapolate the texture's gradients at the hole's edge: a looser mean.
@pytest.mark.parametrize('spec,tolerance', [({'name': 'telea'}, 0.04),
                                            ({'name': 'navier_stokes', 'radius': 5}, 0.04),
                                            ({'name': 'biharmonic'}, 0.1),
                                            ({'name': 'biharmonic', 'max_side': 32}, 0.1)])
def test_inpainters_fill_the_hole_and_keep_the_rest_exactly(spec, tolerance):
  image = disc_scene()
  hole = imaging.dilate(DISC, 2)
  out = core.create('inpainter', spec)(image, hole)
  assert out.dtype == np.float32 and out.shape == image.shape
  assert np.array_equal(out[~hole], image[~hole])
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
  background = texture()[hole].mean(0)
  assert np.abs(out[hole].mean(0) - background).max() < tolerance
  assert np.abs(out[hole] - RED).mean(-1).min() > 0.2


def test_inpainter_with_empty_mask_returns_the_image():
  image = disc_scene()
  out = inpainter.Telea()(image, np.zeros((H, W), bool))
  assert np.array_equal(out, image) and out is not image


# --- matting -----------------------------------------------------------------------------------

def soft_disc():
  """A red disc with a 4 px soft edge over a smooth background: (image, alpha, background)."""
  dist = np.sqrt((YY - CY) ** 2 + (XX - CX) ** 2)
  alpha = np.clip((R - dist) / 4 + 0.5, 0, 1).astype(np.float32)
  background = cv2.GaussianBlur(texture(), (0, 0), 3)
  image = alpha[..., None] * RED + (1 - alpha[..., None]) * background
  return image.astype(np.float32), alpha, background


def test_trimap():
  mask = np.zeros((20, 20), bool)
  mask[5:15, 5:15] = True
  tri = matting.trimap(mask, 2)
  assert tri.dtype == np.float32 and set(np.unique(tri)) == {0.0, 0.5, 1.0}
  assert (tri[7:13, 7:13] == 1).all() and tri[4, 10] == 0.5 and tri[5, 10] == 0.5
  assert tri[0, 0] == 0 and tri[2, 10] == 0


@pytest.mark.parametrize('name', ['closed_form', 'knn'])
def test_matting_recovers_a_soft_edge(name):
  image, alpha, _ = soft_disc()
  est, fg = core.create('matting', {'name': name, 'band': 6})(image, alpha > 0.5)
  assert est.shape == (H, W) and est.dtype == np.float32
  assert fg.shape == (H, W, 3) and fg.dtype == np.float32
  region = imaging.dilate(alpha > 0, 10)   # the crop the matte is solved on, not the empty rest
  assert np.abs(est - alpha)[region].mean() < 0.05
  assert np.abs(fg[alpha > 0.5] - RED).mean() < 0.05
  band = imaging.dilate(alpha > 0.5, 6) & ~imaging.erode(alpha > 0.5, 6)
  assert (est[~band] == (alpha[~band] > 0.5)).all()   # the trimap's known pixels stay known


def test_matting_thin_or_empty_masks():
  image, _, _ = soft_disc()
  alpha, fg = matting.ClosedForm()(image, np.zeros((H, W), bool))
  assert not alpha.any() and np.array_equal(fg, image)
  line = np.zeros((H, W), bool)
  line[60, 20:140] = True        # erodes to nothing: the mask itself is the alpha
  alpha, _ = matting.ClosedForm(band=3)(image, line)
  assert np.array_equal(alpha > 0.5, line)


# --- shadows -----------------------------------------------------------------------------------

def test_shadow_layer_is_exact_on_darkened_background():
  rng = np.random.default_rng(1)
  background = rng.uniform(0.2, 1.0, (40, 50, 3)).astype(np.float32)
  darkening = rng.uniform(0.3, 1.0, (40, 50, 1)).astype(np.float32)
  image = background * darkening
  mask = np.zeros((40, 50), bool)
  mask[5:35, 5:45] = True
  rgba = shadow.shadow_layer(image, background, mask)
  assert rgba.shape == (40, 50, 4) and rgba.dtype == np.float32
  s, colour = rgba[..., 3:], rgba[..., :3]
  assert (rgba[~mask] == 0).all()
  assert s.min() >= 0 and s.max() <= 0.95
  np.testing.assert_allclose((s * colour + (1 - s) * background)[mask], image[mask], atol=1e-5)
  # A grey darkening is a black shadow whose opacity is how much light it takes.
  np.testing.assert_allclose(s[mask], 1 - darkening[mask], atol=1e-5)
  assert np.abs(colour[mask]).max() < 1e-5


def shadow_scene():
  """An object (rows 30-70, cols 60-100) whose shadow, an ellipse at its base, darkens the
  background to 55 %; a dark patch far from it is no shadow of it."""
  background = texture(2, strength=0.03)
  object_alpha = np.zeros((H, W), np.float32)
  object_alpha[30:70, 60:100] = 1
  ellipse = ((YY - 72) / 7) ** 2 + ((XX - 85) / 22) ** 2 <= 1
  far = ((YY - 15) / 6) ** 2 + ((XX - 20) / 10) ** 2 <= 1
  image = background * np.where(ellipse | far, 0.55, 1.0)[..., None]
  a = object_alpha[..., None]
  image = (a * np.array([0.2, 0.3, 0.8]) + (1 - a) * image).astype(np.float32)
  return image, background, object_alpha, ellipse & (object_alpha == 0), far


def test_ratio_finds_the_cast_shadow_only():
  image, background, alpha, cast, far = shadow_scene()
  tool = core.create('shadow', 'ratio')
  est = tool(image, background, alpha)
  assert isinstance(est, ShadowEstimate)
  assert est.mask.shape == (H, W) and est.mask.dtype == bool
  assert iou(est.mask, cast) > 0.6
  assert not (est.mask & far).any() and not (est.mask & (alpha > 0)).any()
  assert abs(est.opacity[cast & est.mask].mean() - 0.45) < 0.05
  assert (est.opacity[~est.mask] == 0).all()
  assert est.colour.shape == (3,) and est.colour.max() < 0.1   # plain darkening: black
  layer = tool.layer(image, background, est.mask)
  s = layer[..., 3:]
  inner = imaging.erode(est.mask, 2)
  np.testing.assert_allclose((s * layer[..., :3] + (1 - s) * background)[inner], image[inner],
                             atol=1e-5)


def test_ratio_without_object_or_shadow():
  image, background, alpha, _, _ = shadow_scene()
  empty = shadow.Ratio()(image, background, np.zeros((H, W), np.float32))
  assert not empty.mask.any() and not empty.opacity.any()
  none = shadow.Ratio()(background, background, alpha)
  assert not none.mask.any()


# --- captions ----------------------------------------------------------------------------------

@pytest.mark.parametrize('rgb,name', [((0.85, 0.1, 0.1), 'red'), ((0.95, 0.55, 0.1), 'orange'),
                                      ((0.95, 0.9, 0.2), 'yellow'), ((0.2, 0.6, 0.2), 'green'),
                                      ((0.15, 0.3, 0.85), 'blue'), ((0.5, 0.2, 0.6), 'purple'),
                                      ((0.95, 0.6, 0.75), 'pink'), ((0.45, 0.28, 0.12), 'brown'),
                                      ((0.03, 0.03, 0.03), 'black'), ((0.97, 0.97, 0.97), 'white'),
                                      ((0.5, 0.5, 0.5), 'grey')])
def test_dominant_colour_names(rgb, name):
  assert name in captioner.COLOUR_NAMES
  assert captioner.dominant_colour(np.full((4, 4, 3), rgb, np.float32)) == name


def test_dominant_colour_is_weighted():
  rgb = np.zeros((2, 10, 3), np.float32)
  rgb[0] = (0.85, 0.1, 0.1)
  rgb[1] = (0.15, 0.3, 0.85)
  weight = np.zeros((2, 10), np.float32)
  weight[1, :3] = 1
  assert captioner.dominant_colour(rgb, weight) == 'blue'


def test_template_captioner():
  rgba = np.zeros((H, W, 4), np.float32)
  rgba[70:110, 5:35] = (0.85, 0.1, 0.1, 1.0)
  cap = core.create('captioner', 'template')(rgba)
  assert isinstance(cap, Caption) and cap.label == 'object'
  assert cap.caption == 'a red object'
  assert cap.referring == ('the red object on the left', 'the small object at the bottom left')
  big = np.zeros((H, W, 4), np.float32)
  big[20:100, 40:120] = (0.95, 0.55, 0.1, 1.0)
  cap = captioner.Template()(big, 'ball')
  assert cap.caption == 'an orange ball'
  assert cap.referring == ('the orange ball in the centre', 'the large ball in the centre')


# --- quality -----------------------------------------------------------------------------------

def test_quality_numbers():
  sharp = texture(3, sigma=0.7, strength=0.2)
  q = core.create('quality', 'classical')(sharp)
  blurred = quality.Classical()(cv2.GaussianBlur(sharp, (0, 0), 2))
  assert q['sharpness'] > 5 * blurred['sharpness'] > 0
  assert 0 <= q['clipped'] < 0.01 and q['contrast'] > 0
  dark = quality.Classical()(np.zeros((50, 60, 3), np.float32))
  assert dark['clipped'] == dark['clipped_dark'] == 1 and dark['contrast'] == 0
  assert all(isinstance(v, float) for v in q.values())
  # Resolution doesn't decide sharpness: the same texture at twice the size, shrunk back.
  big = cv2.resize(sharp, (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC)
  assert quality.Classical(size=W)(big)['sharpness'] == pytest.approx(q['sharpness'], rel=0.5)


# --- registry ----------------------------------------------------------------------------------

def test_registry():
  tool = core.create('inpainter', {'name': 'telea', 'radius': 3})
  assert isinstance(tool, inpainter.Telea) and tool.radius == 3
  with pytest.raises(ValueError, match='raduis'):
    core.create('inpainter', {'name': 'telea', 'raduis': 3})
  with pytest.raises(ValueError, match='horizon'):
    core.create('depth', {'name': 'vertical_prior', 'horizon': 1.5})
  expected = {'saliency': {'spectral_residual', 'center_contrast', 'boundary_connectivity'},
              'detector': {'saliency_boxes'}, 'segmenter': {'grabcut', 'watershed'},
              'depth': {'vertical_prior'}, 'inpainter': {'telea', 'navier_stokes', 'biharmonic'},
              'matting': {'closed_form', 'knn'}, 'shadow': {'ratio'},
              'captioner': {'template'}, 'quality': {'classical'}}
  for kind, names in expected.items():
    assert names <= set(core.names(kind)), kind
    for name in names:
      core.create(kind, name)


# --- real photos -------------------------------------------------------------------------------

# Boxes (x0, y0, x1, y1) at 256 px on the longest side, read off the photos by eye: each the
# main object's solid part, so that a correct mask covers nearly all of it.
REFERENCE = {
    'astronaut': (15, 100, 140, 256),   # her suit's torso, below the neck ring, left of the helmet
    'coffee': (75, 8, 175, 120),        # the cup, rim to base (the saucer is around it)
    'chelsea': (75, 45, 195, 155),      # the cat's face: eyes to nose (the cat fills the frame)
    'rocket': (124, 52, 134, 162),      # the rocket, nose to launch pad
}


def photo(name: str) -> np.ndarray:
  # Only the photos bundled with scikit-image: a fetch would need the network.
  folder = Path(skimage.data.__file__).parent
  if not any((folder / f'{name}.{ext}').is_file() for ext in ('png', 'jpg')):
    pytest.skip(f'skimage.data {name} is not bundled')
  rgb = getattr(skimage.data, name)()
  size = imaging.fit_size(rgb.shape, 256, grow=True)
  return imaging.resize(rgb.astype(np.float32) / 255, size)


@pytest.mark.parametrize('segmenter_name', ['grabcut', 'watershed'])
@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_real_photo_main_object(name, segmenter_name):
  image = photo(name)
  found = core.create('detector', 'saliency_boxes')(image)
  assert found
  mask = core.create('segmenter', segmenter_name)(image, found[0].box)
  x0, y0, x1, y1 = REFERENCE[name]
  assert mask[y0:y1, x0:x1].mean() >= 0.6
  assert mask.mean() < 0.7
