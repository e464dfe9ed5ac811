"""`LayerDecomposer` options for small models trained from scratch: sample prediction and the
long skip."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.models.decomposer import SAMPLE_SIGMA_MIN, DecomposerConfig, LayerDecomposer
from layerjax.models.mmdit import MMDiTConfig

C = 12  # space_to_depth factor 2


def config(conditions=('image', 'prompt'), **changes) -> DecomposerConfig:
  mmdit = MMDiTConfig(sample_size=4, patch_size=1, in_channels=C * (1 + len(conditions)),
                      out_channels=C,
                      num_layers=2, attention_head_dim=8, num_attention_heads=2,
                      joint_attention_dim=16, caption_projection_dim=16,
                      pooled_projection_dim=8, pos_embed_max_size=4)
  return DecomposerConfig(mmdit=mmdit, latents='space_to_depth', factor=2, head='conv',
                          head_width=8, conditions=conditions, **changes)


def inputs(seed=0, conditions=2):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return (f(2, 3, 4, 4, C), f(2, 4, 4, conditions * C), f(2, 5, 16), f(2, 8),
          jnp.asarray([0.01, 0.6], jnp.float32))


def randomize(model, seed=1):
  """Every parameter random (the adaLN-Zero start would make the network's output zero)."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    p.set_value(jnp.asarray(rng.normal(0, 0.2, p.shape), p.dtype))
  return model


def test_sample_prediction_returns_the_velocity_of_the_predicted_sample():
  noisy, cond, text, pooled, sigma = inputs()
  raw = randomize(LayerDecomposer(config(), rngs=nnx.Rngs(0)))
  sample = LayerDecomposer(config(prediction='sample'), rngs=nnx.Rngs(0))
  nnx.update(sample, nnx.state(raw))
  x0 = raw(noisy, cond, text, pooled, sigma)  # the network's output, read as the sample
  v = sample(noisy, cond, text, pooled, sigma)
  s = np.maximum(np.asarray(sigma), SAMPLE_SIGMA_MIN)[:, None, None, None, None]
  np.testing.assert_allclose(v, (np.asarray(noisy) - np.asarray(x0)) / s, rtol=1e-4, atol=1e-4)
  # The Euler step to sigma = 0 lands on the predicted sample (above the cap).
  np.testing.assert_allclose((noisy - sigma[:, None, None, None, None] * v)[1], x0[1],
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('conditions, sources', [
    (('image', 'prompt'), (0, 0, 0)),  # every layer starts as the image
    (('image', 'prompt', 'checkerboard'), (0, 2, 2)),  # foreground, shadow: as the board
])
def test_long_skip_starts_each_layer_as_its_trivial_estimate(conditions, sources):
  noisy, cond, text, pooled, _ = inputs(conditions=len(conditions))
  sigma = jnp.asarray([0.3, 0.9], jnp.float32)
  plain = randomize(LayerDecomposer(config(conditions, prediction='sample'),
                                    rngs=nnx.Rngs(0)))
  skip = LayerDecomposer(config(conditions, prediction='sample', long_skip=True),
                         rngs=nnx.Rngs(0))
  nnx.update(skip, nnx.state(plain))  # shared parameters; the skip's own as initialised
  s = np.asarray(sigma)[:, None, None, None, None]
  sample = lambda m: np.asarray(noisy) - s * np.asarray(m(noisy, cond, text, pooled, sigma))
  start = np.stack([np.asarray(cond)[..., i * C:(i + 1) * C] for i in sources], 1)
  np.testing.assert_allclose(sample(skip), sample(plain) + start, rtol=1e-4, atol=1e-4)
  kernel = np.random.default_rng(2).normal(size=skip.long_skip.kernel.shape).astype(np.float32)
  skip.long_skip.kernel.set_value(jnp.asarray(kernel))
  want = sample(plain) + np.einsum('bhwc,kco->bkhwo', np.asarray(cond), kernel)  # gate 1
  np.testing.assert_allclose(sample(skip), want, rtol=1e-4, atol=1e-3)


def test_long_skip_needs_sample_prediction_and_the_image():
  with pytest.raises(ValueError, match="long_skip needs model.prediction='sample'"):
    config(long_skip=True)
  with pytest.raises(ValueError, match="long_skip needs"):
    config(('prompt', 'checkerboard'), long_skip=True, prediction='sample')


def test_unknown_prediction_is_refused():
  with pytest.raises(ValueError, match="model.prediction must be 'velocity' or 'sample'"):
    dataclasses.replace(config(), prediction='noise')
