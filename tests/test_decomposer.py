"""`LayerDecomposer` options for small models trained from scratch: sample prediction and the
long skip."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.models import common
from layerjax.models.decomposer import ConvHead, DecomposerConfig, LayerDecomposer
from layerjax.models.shared import SAMPLE_SIGMA_MIN
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


def test_heads_read_their_condition_maps_next_to_the_latent():
  rng = np.random.default_rng(3)
  batch = {n: jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
           for n in ('image', 'prompt')}
  z = jnp.asarray(rng.normal(size=(2, 4, 4, C)), jnp.float32)
  plain = randomize(LayerDecomposer(config(), rngs=nnx.Rngs(0)))
  reads = LayerDecomposer(config(head_conditions=('image', 'prompt')), rngs=nnx.Rngs(0))
  pixels = reads.head_pixels(batch)
  np.testing.assert_allclose(pixels, np.concatenate([2 * batch['image'] - 1,
                                                     2 * batch['prompt'] - 1], -1))
  assert plain.head_pixels(batch) is None
  for name in ('alpha_head', 'shadow_head'):  # the plain head's weights, the maps' at zero
    kernel = getattr(plain, name).conv_in.kernel[...]
    nnx.update(getattr(reads, name), nnx.state(getattr(plain, name)))
    getattr(reads, name).conv_in.kernel.set_value(
        jnp.concatenate([kernel, jnp.zeros(kernel.shape[:2] + (6, kernel.shape[3]))], 2))
  np.testing.assert_allclose(reads.alpha(z, pixels), plain.alpha(z, None), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reads.shadow(z, pixels), plain.shadow(z, None), rtol=1e-5, atol=1e-6)
  weights = reads.alpha_head.conv_in.kernel
  weights.set_value(weights[...].at[:, :, 3:].set(1.0))  # now the maps matter
  moved = np.abs(np.asarray(reads.alpha(z, pixels) - plain.alpha(z, None))).max()
  assert moved > 1e-2
  with pytest.raises(ValueError, match="model.head.conditions needs model.head='conv'"):
    dataclasses.replace(config(), head='vae_decoder', latents='vae',
                        head_conditions=('image',))


def test_heads_read_the_layers_distance_from_the_board():
  """With `board_at`, the head is the plain head given one more map: |layer - board| summed
  over RGB, computed here in numpy from the layer's pixels and the board's channels."""
  rng = np.random.default_rng(5)
  z = rng.normal(size=(2, 4, 4, C)).astype(np.float32)
  pixels = rng.uniform(-1, 1, size=(2, 8, 8, 6)).astype(np.float32)  # image, board
  reads = ConvHead(1, 2, 8, 6, board_at=3, rngs=nnx.Rngs(0))
  plain = ConvHead(1, 2, 8, 7, rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(reads))
  layer = z.reshape(2, 4, 4, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 3)
  distance = np.abs(layer - pixels[..., 3:]).sum(-1, keepdims=True)
  np.testing.assert_allclose(reads(jnp.asarray(z), jnp.asarray(pixels)),
                             plain(jnp.asarray(z), jnp.concatenate([pixels, distance], -1)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="board_distance needs 'checkerboard'"):
    config(head_conditions=('image',), head_board_distance=True)


def test_foreground_colour_is_unblended_from_the_known_board():
  """Over the board it was seen over, the decoded foreground layer is its latent again."""
  from layerjax.data.schema import over
  from layerjax import flow
  rng = np.random.default_rng(4)
  model = randomize(LayerDecomposer(config(('image', 'prompt', 'checkerboard')),
                                    rngs=nnx.Rngs(0)))
  board = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
  blend = rng.uniform(size=(2, 3, 8, 8, 3))
  blend[:, 1] = 0.1 + 0.8 * np.asarray(board)  # a colour seen over the board, in range
  blend = jnp.asarray(blend, jnp.float32)
  latents = jnp.stack([model.latents.encode(blend[:, k]) for k in range(3)], 1)
  plain = flow.decode_layers(model, latents, None)
  out = flow.decode_layers(model, latents, None, board)
  fg = np.asarray(out['foreground'])
  np.testing.assert_allclose(plain['foreground'][..., :3], blend[:, 1], atol=1e-5)
  np.testing.assert_array_equal(fg[..., 3], plain['foreground'][..., 3])
  seen = over(fg, np.concatenate([board, np.ones((2, 8, 8, 1), np.float32)], -1))[..., :3]
  inside = ((fg[..., :3] > 0) & (fg[..., :3] < 1)).all(-1) & (fg[..., 3] > 0.05)
  assert inside.mean() > 0.5
  np.testing.assert_allclose(seen[inside], np.asarray(blend[:, 1])[inside], atol=1e-4)
  assert np.abs(fg[..., :3] - plain['foreground'][..., :3]).max() > 0.1


def test_abstract_construction_matches_eval_shape():
  """`common.abstract` (a fixed key, no counters) gives the variables, shapes, dtypes and
  sharding metadata that `nnx.eval_shape` with a real `nnx.Rngs` gives."""
  cfg = config(conditions=('image', 'prompt', 'checkerboard'))
  real = nnx.eval_shape(lambda: LayerDecomposer(cfg, rngs=nnx.Rngs(0)))
  fast = common.abstract(lambda rngs: LayerDecomposer(cfg, rngs=rngs))
  real, fast = nnx.to_flat_state(nnx.state(real)), nnx.to_flat_state(nnx.state(fast))
  assert [p for p, _ in real] == [p for p, _ in fast] and len(real) > 50
  for (path, a), (_, b) in zip(real, fast):
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype, path
    assert a.get_metadata() == b.get_metadata(), path
