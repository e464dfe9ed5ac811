"""The lean train step computes what the plain formulation does: the heads' shared pass on the
one-step estimate (`objectives.held_and_free`) gives the loss and gradients of two separate
head calls, one on the estimate held fixed and one with gradient into it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_decomposer import randomize
from layerjax import build
from layerjax.models.decomposer import TRAINABLE
from layerjax.train import objectives
from train_utils import tiny


def two_calls(apply, params, z, pixels):
  """The formulation before sharing: the head run twice, once on the estimate held fixed."""
  return apply(params, jax.lax.stop_gradient(z), pixels), apply(params, z, pixels)


def random_batch(config, cfg, seed=0):
  rng = np.random.default_rng(seed)
  b = config.data.global_batch_size
  h, w = config.data.image_size
  u = lambda c: jnp.asarray(rng.uniform(0, 1, (b, h, w, c)), jnp.float32)
  batch = {k: u(3) for k in ('image', 'prompt', 'background', 'checkerboard',
                             'foreground_on_checkerboard', 'shadow_on_checkerboard')}
  batch.update(foreground=u(4), shadow=u(4), boundary=(u(1) > 0.7).astype(jnp.float32))
  m = cfg.mmdit
  if cfg.text is not None:
    batch['text_tokens'] = jnp.asarray(rng.integers(2, 258, (b, cfg.text.max_len)), jnp.int32)
  else:
    batch['text_embeds'] = jnp.asarray(rng.normal(size=(b, 7, m.joint_attention_dim)),
                                       jnp.float32)
    batch['pooled_text_embeds'] = jnp.asarray(rng.normal(size=(b, m.pooled_projection_dim)),
                                              jnp.float32)
  return batch


@pytest.mark.parametrize('kind,estimate_every', [
    ('pixels', 2), pytest.param('vae', 1, marks=pytest.mark.slow)])  # VAE heads: minutes
def test_shared_head_pass_has_the_loss_and_gradients_of_two_calls(tmp_path, monkeypatch,
                                                                  kind, estimate_every):
  config = tiny(tmp_path, kind, embeddings=tmp_path / 'unused.safetensors')
  config.loss.estimate_every = estimate_every
  model = build.build_model(config, 0)
  randomize(model)  # zero-initialised parts would leave gradients trivially equal
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  batch = random_batch(config, model.config)
  rng = jax.random.key(3)

  def value_and_grad():
    loss = lambda p: objectives.loss_fn(nnx.merge(graphdef, p, frozen), batch, rng,
                                         config.loss)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, terms), grads = value_and_grad()
  monkeypatch.setattr(objectives, 'held_and_free', two_calls)
  (want_loss, want_terms), want = value_and_grad()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for k in want_terms:
    np.testing.assert_allclose(terms[k], want_terms[k], rtol=1e-6, err_msg=k)
  flat, want_flat = (dict(nnx.to_flat_state(g)) for g in (grads, want))
  assert flat.keys() == want_flat.keys()
  # Rounding is relative to each module's gradient scale (some entries are 0 in exact
  # arithmetic: an attention key's bias moves no softmax).
  scale = {}
  for path, g in want_flat.items():
    scale[path[0]] = max(scale.get(path[0], 0.0), float(jnp.abs(g[...]).max()))
  for path, g in want_flat.items():
    np.testing.assert_allclose(flat[path][...], g[...], rtol=1e-5, atol=1e-6 * scale[path[0]],
                               err_msg='/'.join(map(str, path)))
  # The recomposition's gradient reaches the transformer through the heads' free copy, and
  # the heads' own terms reach the heads: neither side of the split is empty.
  assert scale['alpha_head'] > 0 and scale['shadow_head'] > 0 and scale['transformer'] > 0


def test_held_and_free_splits_the_gradient_between_parameters_and_input():
  # apply(w, z) = w z^2: d/dw of (a y_held + b y_free) = (a + b) z^2; d/dz = b 2 w z only.
  apply = lambda w, z, _: w * z ** 2
  a, b, w, z = 3.0, 5.0, 2.0, 1.5

  def loss(w, z):
    held, free = objectives.held_and_free(apply, w, z, None)
    return a * held + b * free
  dw, dz = jax.grad(loss, (0, 1))(w, z)
  np.testing.assert_allclose(dw, (a + b) * z ** 2, rtol=1e-6)
  np.testing.assert_allclose(dz, b * 2 * w * z, rtol=1e-6)
