"""The Euler sampler's classifier-free guidance: the guidance formula against a closed-form
Euler solution, one pass without guidance, and the tiny decomposer sampled with guidance."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax import build, flow
from layerjax.data import examples, pipeline
from test_schema import make_sample
from train_utils import random_model, tiny

B, H, W, C, K = 2, 3, 4, 2, 2
LAM = -0.5  # the velocity's slope in x


class LinearModel:
  """v = LAM x + prompt + mean_t(context) + pooled: known, linear in x, read per row.
  Records every call's batch size and how often the conditions are encoded."""

  config = types.SimpleNamespace(latent_factor=1, latent_channels=C,
                                 layers=('background', 'foreground'), conditions=('prompt',))

  def __init__(self):
    self.calls, self.encodes = [], 0

  def conditions(self, batch):
    self.encodes += 1
    return jnp.asarray(batch['prompt'])

  def encode_text(self, batch):
    return jnp.asarray(batch['context']), jnp.asarray(batch['pooled'])

  def __call__(self, x, conditions, context, pooled, sigma):
    self.calls.append(x.shape[0])
    assert sigma.shape == (x.shape[0],)
    text = (context.mean(1) + pooled)[:, None, None, None, :]
    return LAM * x + conditions[:, None] + text


def _batch(seed):
  r = np.random.default_rng(seed)
  return {'image': np.zeros((B, H, W, 3), np.float32),
          'prompt': r.normal(size=(B, H, W, C)).astype(np.float32),
          'context': r.normal(size=(B, 5, C)).astype(np.float32),
          'pooled': r.normal(size=(B, C)).astype(np.float32)}


def _euler_by_hand(x0, c, steps, shift):
  """x_{i+1} = x_i + (s_{i+1} - s_i)(LAM x_i + c), with SD3's shifted levels."""
  t = np.linspace(1.0, 0.0, steps + 1)
  s = shift * t / (1 + (shift - 1) * t)
  x = np.asarray(x0, np.float64)
  for i in range(steps):
    x = x + (s[i + 1] - s[i]) * (LAM * x + c)
  return x


def _offset(batch):
  """The velocity's x-free part per row, broadcast over the layers: [B, 1, H, W, C]."""
  text = batch['context'].mean(1) + batch['pooled']
  return (batch['prompt'] + text[:, None, None])[:, None].astype(np.float64)


@pytest.mark.parametrize('guidance', [1.0, 3.0, 0.0])
def test_guidance_follows_the_formula_in_one_call_per_step(guidance):
  batch, blank = _batch(0), _batch(1)
  uncond = {k: blank[k] for k in ('prompt', 'context', 'pooled')}
  rng, steps, shift = jax.random.PRNGKey(7), 3, 3.0
  model = LinearModel()
  with jax.disable_jit():  # the loop runs in Python: every model call is seen
    x = flow.sample_latents(model, batch, rng, steps, shift, guidance, uncond)
  x0 = jax.random.normal(rng, (B, K, H, W, C), jnp.float32)  # the sampler's start
  # Linear in the offset: guiding the velocity is guiding its offset.
  c = _offset(blank) + guidance * (_offset(batch) - _offset(blank))
  np.testing.assert_allclose(x, _euler_by_hand(x0, c, steps, shift), rtol=1e-5, atol=1e-5)
  if guidance == 1:  # today's sampler: the conditional batch alone, uncond unread
    assert model.calls == [B] * steps and model.encodes == 1
  else:  # conditional and unconditional rows in one call; conditions encoded once per half
    assert model.calls == [2 * B] * steps and model.encodes == 2


def test_guidance_needs_uncond_entries_of_the_batch():
  batch = _batch(0)
  with pytest.raises(ValueError, match=r'guidance=2.0 needs `uncond`'):
    flow.sample_latents(LinearModel(), batch, jax.random.PRNGKey(0), 2, 3.0, 2.0)
  with pytest.raises(ValueError, match=r"uncond: \['text_tokens'\] are not entries"):
    flow.sample_latents(LinearModel(), batch, jax.random.PRNGKey(0), 2, 3.0, 2.0,
                        {'text_tokens': np.zeros((B, 4), np.int32)})


def test_tiny_decomposer_samples_with_guidance():
  c = tiny('unused')
  model = random_model(c)
  # The same weights with rematerialised blocks (the SD3 configs'): its blocks must run
  # inside the sampler's fori_loop as well.
  c.model.remat = 'full'
  remat = build.build_model(c, 0)
  nnx.update(remat, nnx.state(model))
  text_fn = build.text_inputs(c)
  rng = np.random.default_rng(0)
  items = [pipeline.make_example(make_sample(h=32, w=32, seed=s), rng, c.data) for s in (0, 1)]
  batch = build.model_batch({k: np.stack([it[k] for it in items]) for k in items[0]}, text_fn)
  uncond = examples.unconditional_inputs(batch, text_fn(['']))

  @jax.jit
  def run(batch, uncond):
    out = {g: flow.decompose(model, batch, jax.random.PRNGKey(0), 2, c.loss.shift, g, uncond)
           for g in (1.0, 3.0)}
    return out, flow.decompose(remat, batch, jax.random.PRNGKey(0), 2, c.loss.shift)

  out, rematerialised = run(batch, uncond)
  for k, v in out[1.0].items():
    np.testing.assert_allclose(rematerialised[k], v, atol=1e-5, err_msg=k)
  for g, layers in out.items():
    for name, v in layers.items():
      assert np.isfinite(v).all(), (g, name)
  assert out[3.0]['foreground'].shape == out[1.0]['foreground'].shape == (2, 32, 32, 4)
  assert max(np.abs(out[3.0][k] - out[1.0][k]).max() for k in out[1.0]) > 1e-2
