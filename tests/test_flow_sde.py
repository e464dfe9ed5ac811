"""The stochastic (Flow-GRPO) sampler: its step by hand, its log-density against scipy, no noise
as the Euler sampler, the flow's marginals kept (a Gaussian data distribution, whose velocity
is known in closed form), and the tiny decomposer's recorded log-probs recomputed and
differentiated as the GRPO trainer will."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from layerjax import build, flow
from layerjax.data import examples, pipeline
from test_flow import LinearModel, LAM, B, H, W, C, K, _batch
from test_schema import make_sample
from train_utils import random_model, tiny


def test_one_step_by_hand():
  """Row 0 takes the first step, 1 -> .9, where 1 - s is read as 1 - s_next: g^2 = a^2 / .1,
  std = a, mean = x - .1 v - a^2 / 2 x. Row 1 takes .5 -> .25: g^2 = a^2, std = a / 2,
  mean = x - .25 (v + a^2 (x + .5 v))."""
  a = 0.7
  r = np.random.default_rng(0)
  x, v, n = (r.normal(size=(2, 1, 2, 2, 3)) for _ in range(3))
  x_next, mean, std = flow.sde_step(jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32),
                                    jnp.array([1.0, 0.5]), jnp.array([0.9, 0.25]), a,
                                    jnp.asarray(n, jnp.float32))
  want_mean = np.stack([x[0] - 0.1 * v[0] - a ** 2 / 2 * x[0],
                        x[1] - 0.25 * (v[1] + a ** 2 * (x[1] + 0.5 * v[1]))])
  want_std = np.array([a, a / 2])[:, None, None, None, None]
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(std, x.shape), np.broadcast_to(want_std, x.shape),
                             rtol=1e-6)
  np.testing.assert_allclose(x_next, want_mean + want_std * n, rtol=1e-5, atol=1e-6)


def test_gaussian_logprob_is_scipys_density_summed():
  r = np.random.default_rng(0)
  x, mean = r.normal(size=(2, 3, 4, 5, 2)), r.normal(size=(2, 3, 4, 5, 2))
  for std in (r.uniform(0.1, 2.0, size=x.shape), np.array([0.3, 1.7]).reshape(2, 1, 1, 1, 1)):
    got = flow.gaussian_logprob(*(jnp.asarray(t, jnp.float32) for t in (x, mean, std)))
    want = stats.norm.logpdf(x, mean, std).reshape(2, -1).sum(1)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_no_noise_is_the_euler_sampler(guidance):
  batch, blank = _batch(0), _batch(1)
  uncond = {k: blank[k] for k in ('prompt', 'context', 'pooled')}
  noise = jax.random.normal(jax.random.PRNGKey(3), (B, K, H, W, C))
  euler = flow.sample_latents(LinearModel(), batch, None, 4, 3.0, guidance, uncond, noise)
  latents, traj = flow.sample_latents_sde(LinearModel(), batch, jax.random.PRNGKey(5), 4, 3.0,
                                          0.0, guidance, uncond, noise)
  np.testing.assert_array_equal(latents, euler)
  np.testing.assert_array_equal(traj.states[0], noise)
  np.testing.assert_array_equal(traj.states[-1], latents)


def test_recorded_log_probs_by_hand():
  """Each recorded step x_i -> x_i+1 of the linear model (v = LAM x + c), its log-density
  rebuilt in float64 from the SDE's mean and std and scipy."""
  batch, a, steps = _batch(0), 0.7, 3
  latents, traj = flow.sample_latents_sde(LinearModel(), batch, jax.random.PRNGKey(0), steps,
                                          3.0, a)
  assert traj.states.shape == (steps + 1, B, K, H, W, C)
  assert traj.log_probs.shape == (steps, B)
  np.testing.assert_allclose(traj.levels, [1, 6 / 7, 0.6, 0], rtol=1e-6)  # 3t / (1 + 2t)
  text = batch['context'].mean(1) + batch['pooled']
  c = (batch['prompt'] + text[:, None, None])[:, None].astype(np.float64)
  xs, s = np.asarray(traj.states, np.float64), np.asarray(traj.levels, np.float64)
  for i in range(steps):
    x, v = xs[i], LAM * xs[i] + c
    g2 = a ** 2 * s[i] / (1 - (s[i] if s[i] < 1 else s[i + 1]))
    mean = x + (s[i + 1] - s[i]) * (v + g2 / (2 * s[i]) * (x + (1 - s[i]) * v))
    std = np.sqrt(g2 * (s[i] - s[i + 1]))
    want = stats.norm.logpdf(xs[i + 1], mean, std).reshape(B, -1).sum(1)
    np.testing.assert_allclose(traj.log_probs[i], want, rtol=1e-5)
    # The step's noise, recovered, is a standard normal draw (B K H W C = 96 values).
    z = (xs[i + 1] - mean) / std
    assert abs(z.mean()) < 0.5 and 0.6 < z.std() < 1.4, (i, z.mean(), z.std())


def test_deterministic_given_the_rng():
  batch = _batch(0)
  noise = jax.random.normal(jax.random.PRNGKey(3), (B, K, H, W, C))
  run = lambda seed: flow.sample_latents_sde(LinearModel(), batch, jax.random.PRNGKey(seed),
                                             3, 3.0, 0.7, noise=noise)
  (first, traj), (again, _), (other, _) = run(0), run(0), run(1)
  np.testing.assert_array_equal(first, again)
  # Another rng: other step noise, even from the same starting noise.
  assert np.abs(np.asarray(first) - np.asarray(other)).min() > 0
  np.testing.assert_array_equal(traj.states[0], noise)


def test_bad_inputs():
  batch = _batch(0)
  with pytest.raises(ValueError, match=r'a=-0.1: the noise level must be >= 0'):
    flow.sample_latents_sde(LinearModel(), batch, jax.random.PRNGKey(0), 3, 3.0, -0.1)
  encoded = flow.encode_conditions(LinearModel(), batch)
  x = jnp.zeros((B, K, H, W, C))
  with pytest.raises(ValueError, match=r'encoded conditions: 2 rows for 2 latents at '
                                       r'guidance=3.0'):
    flow.step_logprob(LinearModel(), encoded, x, x, 0.5, 0.25, 0.7, guidance=3.0)


M, SD = 0.8, 0.5  # the data distribution N(M, SD^2)


def gaussian_velocity(x, sigma, mean):
  """The exact velocity of x0 ~ N(mean, SD^2) per value: x_s = (1 - s) x0 + s eps is Gaussian
  with variance V = (1 - s)^2 SD^2 + s^2, Cov(x0, x_s) = (1 - s) SD^2, Cov(eps, x_s) = s, so
  v(x, s) = E[eps - x0 | x_s = x] = (s - (1 - s) SD^2) / V (x - (1 - s) mean) - mean."""
  s = sigma[:, None, None, None, None]
  var = (1 - s) ** 2 * SD ** 2 + s ** 2
  return (s - (1 - s) * SD ** 2) / var * (x - (1 - s) * mean) - mean


class GaussianFlow:
  """A 'model' whose velocity is `gaussian_velocity` for the mean M."""

  config = types.SimpleNamespace(latent_factor=1, latent_channels=4, layers=('background',),
                                 conditions=())

  def conditions(self, batch):
    return None

  def encode_text(self, batch):
    b = batch['image'].shape[0]
    return jnp.zeros((b, 1, 1)), jnp.zeros((b, 1))

  def __call__(self, x, conditions, context, pooled, sigma):
    return gaussian_velocity(x, sigma, M)


def test_sde_keeps_the_flows_marginals():
  """2 x 64 x 64 x 4 = 32768 independent chains, a = 0.7, 400 steps (shift 3): the samples'
  mean and variance are N(M, SD^2)'s within 4 Monte-Carlo standard errors, SD / sqrt(N) for
  the mean and sqrt(2 / N) for the variance's ratio (0.031); Euler-Maruyama's bias at 400 steps
  is below one of them (float64 numpy, this setup). A drift correction of the wrong sign
  (variance ratio ~+18), of half (+0.9) or twice (-0.5) the size, or none, fails it."""
  batch = {'image': np.zeros((2, 64, 64, 3), np.float32)}
  sample = jax.jit(lambda rng: flow.sample_latents_sde(GaussianFlow(), batch, rng, 400, 3.0,
                                                       0.7)[0])
  x = np.asarray(sample(jax.random.PRNGKey(0)), np.float64).ravel()
  n = x.size
  assert abs(x.mean() - M) < 4 * SD / np.sqrt(n), x.mean()
  assert abs(x.var() / SD ** 2 - 1) < 4 * np.sqrt(2 / n), x.var() / SD ** 2


def test_tiny_decomposer_log_probs_recomputed_and_differentiated():
  """The trainer's use: sample a group with guidance, then, for one random step per row, the
  log-prob of the recorded transition under the same parameters (the recorded one) and its
  gradient in the parameters (finite, not zero)."""
  c = tiny('unused')
  model = random_model(c)
  text_fn = build.text_inputs(c)
  rng = np.random.default_rng(0)
  items = [pipeline.make_example(make_sample(h=32, w=32, seed=s), rng, c.data) for s in (0, 1)]
  batch = build.model_batch({k: np.stack([it[k] for it in items]) for k in items[0]}, text_fn)
  uncond = examples.unconditional_inputs(batch, text_fn(['']))
  a, g, steps = 0.7, 2.0, 3

  @jax.jit
  def sample(batch, uncond):
    return flow.sample_latents_sde(model, batch, jax.random.PRNGKey(0), steps, c.loss.shift, a,
                                   g, uncond)

  latents, traj = sample(batch, uncond)
  rows, idx = jnp.arange(2), jnp.array([2, 0])  # row 0 its last step, row 1 its first

  def logprob(model, batch, uncond):
    encoded = flow.encode_conditions(model, batch, g, uncond)
    per_row = flow.step_logprob(model, encoded, traj.states[idx, rows],
                                traj.states[idx + 1, rows], traj.levels[idx],
                                traj.levels[idx + 1], a, g)
    return per_row.sum(), per_row

  @nnx.jit
  def value_and_grad(model, batch, uncond):
    return nnx.value_and_grad(lambda m: logprob(m, batch, uncond), has_aux=True)(model)

  (_, recomputed), grads = value_and_grad(model, batch, uncond)
  np.testing.assert_allclose(recomputed, traj.log_probs[idx, rows], rtol=1e-5)
  grads = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in grads)
  assert max(float(np.abs(g).max()) for g in grads) > 0
  assert np.isfinite(latents).all() and latents.shape == traj.states.shape[1:]
