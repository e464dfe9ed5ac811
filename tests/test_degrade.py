"""Boundary degradations for LiWi's restoration objective."""

import numpy as np
import pytest

from layerjax.data import degrade
from test_schema import make_sample


@pytest.fixture
def obj():
  s = make_sample()
  return s.layer('object_1').rgba, s.layers[0].rgba[..., :3]


def test_band_surrounds_the_edge(obj):
  rgba, _ = obj
  band = degrade.boundary_band(rgba[..., 3], 1)
  assert band[10, 18 + 6] and not band[10, 18] and not band[0, 0]


@pytest.mark.parametrize('name,strength,check', [
    ('erode', 3, lambda a, b: (b[..., 3] <= a[..., 3] + 1e-7).all() and b[..., 3].sum() < a[..., 3].sum()),
    ('dilate', 3, lambda a, b: (b[..., 3] >= a[..., 3] - 1e-7).all() and b[..., 3].sum() > a[..., 3].sum()),
    ('blur', 1.5, lambda a, b: np.abs(b[..., 3].sum() - a[..., 3].sum()) < 0.05 * a[..., 3].sum()),
    ('halo', 0.5, lambda a, b: (b[..., :3] >= a[..., :3] - 1e-7).all()),
    ('spill', 0.5, lambda a, b: (b[..., 3] == a[..., 3]).all()),
    ('jpeg', 10, lambda a, b: (b[..., 3] == a[..., 3]).all()),
])
def test_each_degradation_changes_only_what_it_should(obj, name, strength, check):
  rgba, bg = obj
  band = degrade.boundary_band(rgba[..., 3], 2)
  out = degrade.DEGRADATIONS[name](rgba, bg, strength, band).astype(np.float32)
  assert out.shape == rgba.shape and not np.array_equal(out, rgba)
  assert check(rgba, out)
  if name in ('halo', 'spill', 'jpeg'):  # colour damage stays in the band
    np.testing.assert_array_equal(out[~band], rgba[~band])


def test_degrade_is_seeded_and_follows_probabilities(obj):
  rgba, bg = obj
  band = degrade.boundary_band(rgba[..., 3], 2)
  cfg = {'blur': {'prob': 1.0, 'strength': (0.5, 2.0)}, 'halo': {'prob': 0.0, 'strength': (0.1, 0.2)}}
  a, names = degrade.degrade(rgba, bg, band, cfg, np.random.default_rng(0))
  b, _ = degrade.degrade(rgba, bg, band, cfg, np.random.default_rng(0))
  assert names == ['blur']
  np.testing.assert_array_equal(a, b)
