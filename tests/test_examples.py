"""Referring targets, RefLayer prompt images and checkerboard blending."""

import numpy as np
import pytest

from layerjax.data import examples, schema
from layerjax.data.schema import Prompt
from test_schema import make_sample


def test_targets_remove_object_and_its_shadow_and_recompose_the_image():
  sample = make_sample()
  t = examples.referring_targets(sample, 'object_1')
  np.testing.assert_array_equal(t['background'], sample.layers[0].rgba[..., :3])
  np.testing.assert_array_equal(t['foreground'], sample.layer('object_1').rgba)
  np.testing.assert_array_equal(t['shadow'], sample.layer('shadow_1').rgba)
  bg = np.concatenate([t['background'], np.ones_like(t['background'][..., :1])], -1)
  recomposed = schema.over(t['foreground'], schema.over(t['shadow'], bg))[..., :3]
  np.testing.assert_allclose(recomposed, sample.image, atol=1e-6)


def test_target_must_be_an_object():
  with pytest.raises(ValueError, match="'shadow_1' is a shadow"):
    examples.referring_targets(make_sample(), 'shadow_1')


def test_object_without_shadow_gets_an_empty_shadow():
  sample = make_sample()
  del sample.layers[1]
  t = examples.referring_targets(sample, 'object_1')
  assert t['shadow'].shape == (24, 32, 4) and not t['shadow'].any()


def test_prompt_image_colour_codes():
  mask = np.zeros((20, 30), bool)
  mask[5:8, 12:15] = True
  p = Prompt('o', points=((25.0, 15.0),), box=(10, 4, 20, 10), mask=mask)
  img = examples.render_prompt((20, 30), p, frozenset({'box', 'mask', 'point'}), 1.5)
  np.testing.assert_allclose(img[0, 0], examples.BLUE, atol=1e-6)
  np.testing.assert_allclose(img[4, 10], examples.GREEN, atol=1e-6)
  np.testing.assert_allclose(img[6, 13], examples.RED, atol=1e-6)
  np.testing.assert_allclose(img[15, 25], examples.WHITE, atol=1e-6)
  assert 0 < img[15, 27, 0] < 1  # the heat-map falls off around the point
  only_box = examples.render_prompt((20, 30), p, frozenset({'box'}), 1.5)
  np.testing.assert_allclose(only_box[6, 13], examples.GREEN, atol=1e-6)
  np.testing.assert_allclose(only_box[15, 25], examples.BLUE, atol=1e-6)


def test_checkerboard_is_seeded_two_coloured_and_opaque():
  a = examples.checkerboard((16, 16), 4, np.random.default_rng(0), 0.1)
  b = examples.checkerboard((16, 16), 4, np.random.default_rng(0), 0.1)
  c = examples.checkerboard((16, 16), 4, np.random.default_rng(1), 0.1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(np.unique(a[..., :3].reshape(-1, 3), axis=0)) == 2 and (a[..., 3] == 1).all()
  np.testing.assert_array_equal(a[0, 0], a[4, 4])
  assert not np.array_equal(a[0, 0], a[0, 4])


def test_unconditional_inputs_are_the_blank_prompt_and_the_empty_text():
  batch = {'image': np.zeros((3, 4, 5, 3), np.float32)}
  tokens = np.array([[7, 0, 0]], np.int32)
  uncond = examples.unconditional_inputs(batch, {'text_tokens': tokens})
  assert uncond['prompt'].shape == (3, 4, 5, 3)
  np.testing.assert_array_equal(uncond['prompt'], np.broadcast_to(examples.BLUE, (3, 4, 5, 3)))
  np.testing.assert_array_equal(uncond['text_tokens'], np.repeat(tokens, 3, 0))
  with pytest.raises(ValueError, match=r"empty_text: expected one row .*'text_tokens': 2"):
    examples.unconditional_inputs(batch, {'text_tokens': np.zeros((2, 3), np.int32)})
