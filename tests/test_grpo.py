"""The GRPO objective: group advantages by hand (missing rewards, equal and too-small groups
dropped and counted), the clipped surrogate's closed forms and gradients, the Gaussian KL
against the general formula in float64, the tiny decomposer's update being exactly zero for a
constant reward (the issue's test), and a one-parameter flow learning a reward in a few steps."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax import build, flow
from layerjax.data import examples, pipeline
from layerjax.models.decomposer import TRAINABLE
from layerjax.train import grpo
from test_schema import make_sample
from test_flow_sde import GaussianFlow, gaussian_velocity
from train_utils import random_model, tiny

# [1, 2, 3]: mean 2, population std sqrt(2/3) (+ Flow-GRPO's 1e-4): A = -+1 / (0.8165 + 1e-4)
A3 = 1 / (np.sqrt(2 / 3) + 1e-4)


def test_group_advantages_by_hand():
  adv, keep, counts = grpo.group_advantages([[1.0, 2.0, 3.0]])
  np.testing.assert_allclose(adv, [[-A3, 0, A3]], rtol=1e-6)
  np.testing.assert_allclose(adv, [[-1.2247, 0, 1.2247]], atol=2e-4)
  assert keep.all() and adv.dtype == np.float32 and adv.shape == (1, 3)
  # Interleaved labels: 'b' is [10, 30, 20], mean 20, std 10 sqrt(2/3).
  adv, keep, counts = grpo.group_advantages([1, 10, 2, 30, 3, 20], ['a', 'b'] * 3)
  b = 1 / (np.sqrt(2 / 3) + 1e-5)  # (r - 20) / (10 sqrt(2/3) + 1e-4) = +-1 / (sqrt(2/3) + 1e-5)
  np.testing.assert_allclose(adv, [-A3, -b, 0, b, A3, 0], rtol=1e-6)
  assert counts == {'samples': 6, 'kept': 6, 'bad_reward': 0, 'groups': 2,
                    'too_few_rewards': 0, 'equal_rewards': 0}


def test_group_advantages_bad_rewards_dropped_and_counted():
  """Row 0: None and NaN dropped, [1, 3, 2] normalised alone. Row 1: equal (0.1 thrice: its
  rounded std is ~1e-17, not 0). Row 2: one valid reward left. Row 3: two valid, equal.
  Row 4: [0, 1] (+ inf dropped): +-0.5 / (0.5 + 1e-4)."""
  nan, inf = float('nan'), float('inf')
  rewards = [[1, None, 3, nan, 2], [0.1, 0.1, 0.1, None, None], [nan, 0.3, nan, None, nan],
             [0.2, nan, 0.2, nan, nan], [0, 1, inf, None, nan]]
  adv, keep, counts = grpo.group_advantages(rewards)
  two = 0.5 / (0.5 + 1e-4)  # deviations +-0.5, std 0.5
  want = np.zeros((5, 5))
  want[0, [0, 2, 4]] = [-A3, A3, 0]
  want[4, :2] = [-two, two]
  np.testing.assert_allclose(adv, want, rtol=1e-6)
  want_keep = np.zeros((5, 5), bool)
  want_keep[0, [0, 2, 4]] = want_keep[4, :2] = True
  np.testing.assert_array_equal(keep, want_keep)
  assert counts == {'samples': 25, 'kept': 5, 'bad_reward': 14, 'groups': 5,
                    'too_few_rewards': 1, 'equal_rewards': 2}


def test_group_advantages_bad_input():
  with pytest.raises(ValueError, match=r'without group_ids, expected shape \[groups, group '
                                       r'size\], got \(3,\)'):
    grpo.group_advantages([1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r'rewards \(3,\) and group_ids \(2\)'):
    grpo.group_advantages([1.0, 2.0, 3.0], ['a', 'b'])
  with pytest.raises(ValueError, match=r'rewards: not numbers or None'):
    grpo.group_advantages([['yes', 'no']])


def _loss_and_grad(new, old, adv, keep, clip=0.2, **kw):
  f = lambda new: grpo.grpo_loss(new, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(keep),
                                 clip, **kw)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(new, jnp.float32))
  return loss, metrics, np.asarray(grad)


def test_ratio_one_is_minus_the_mean_advantage():
  """new = old (log-probs of summed-size -300): loss -mean(A) over kept rows, gradient
  -A_i / n_kept (d ratio / d new_logp = ratio = 1, inside the clip range); the masked row's
  large advantage counts nowhere."""
  old = np.array([-310.0, -295.5, -302.25, -300.0], np.float32)
  adv = np.array([1.5, -0.5, -1.0, 40.0], np.float32)
  keep = np.array([True, True, True, False])
  loss, metrics, grad = _loss_and_grad(old, old, adv, keep)
  np.testing.assert_allclose(loss, -(1.5 - 0.5 - 1.0) / 3, atol=1e-7)
  np.testing.assert_allclose(grad, [-0.5, 0.5 / 3, 1 / 3, 0], rtol=1e-6)
  assert metrics['ratio_mean'] == 1 and metrics['clip_fraction'] == 0
  assert metrics['approx_kl'] == 0 and metrics['kept'] == 3
  np.testing.assert_allclose(metrics['advantage_mean'], 0, atol=1e-7)


def test_clipping_both_directions():
  """clip 0.2. A = 2, ratio 1.5: clipped to 1.2 A, no gradient. A = -1, ratio 0.5: clipped
  to 0.8 A, no gradient. The pessimistic side stays unclipped: A = 2, ratio 0.5 gives 0.5 A,
  A = -1, ratio 1.5 gives 1.5 A, each with gradient -A ratio / 4."""
  old = np.zeros(4, np.float32)
  ratio = np.array([1.5, 0.5, 0.5, 1.5])
  adv = np.array([2.0, -1.0, 2.0, -1.0], np.float32)
  loss, metrics, grad = _loss_and_grad(np.log(ratio), old, adv, np.ones(4, bool))
  np.testing.assert_allclose(loss, -(1.2 * 2 + 0.8 * -1 + 0.5 * 2 + 1.5 * -1) / 4, rtol=1e-6)
  np.testing.assert_allclose(grad, [0, 0, -2 * 0.5 / 4, 1.5 / 4], rtol=1e-6, atol=1e-9)
  assert metrics['clip_fraction'] == 1
  np.testing.assert_allclose(metrics['ratio_max'], 1.5, rtol=1e-6)
  np.testing.assert_allclose(metrics['approx_kl'], 0.5 * np.log(1.5) ** 2 * 0.5 +
                             0.5 * np.log(0.5) ** 2 * 0.5, rtol=1e-5)


def test_per_element_log_ratio():
  """elements = 10: a summed log-ratio of 1.5 is a ratio of exp(0.15), inside clip 0.2."""
  loss, metrics, grad = _loss_and_grad(np.array([1.5], np.float32), np.zeros(1, np.float32),
                                       np.ones(1, np.float32), np.ones(1, bool), elements=10)
  np.testing.assert_allclose(loss, -np.exp(0.15), rtol=1e-6)
  np.testing.assert_allclose(grad, [-np.exp(0.15) / 10], rtol=1e-6)
  assert metrics['clip_fraction'] == 0


def test_kl_term_is_the_gaussian_kl():
  """Rows' step distributions N(m, s^2) and N(m_ref, s^2), the KL from the general formula
  log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2 per value in float64, summed over the
  latent, averaged over the kept rows (row 2 masked), times kl; divided by the latent's size
  with `elements`. Zero advantages: the policy term is 0."""
  r = np.random.default_rng(0)
  mean, ref = r.normal(size=(2, 3, 2, 4, 5, 2))
  std = np.array([0.3, 1.2, 0.7]).reshape(3, 1, 1, 1, 1)
  s1 = s2 = np.broadcast_to(std, mean.shape)
  per_value = np.log(s2 / s1) + (s1 ** 2 + (mean - ref) ** 2) / (2 * s2 ** 2) - 0.5
  want = per_value.reshape(3, -1).sum(1)[:2].mean()
  np.testing.assert_allclose(grpo.gaussian_kl(*(jnp.asarray(t, jnp.float32)
                                                for t in (mean, ref, std))),
                             per_value.reshape(3, -1).sum(1), rtol=1e-5)
  zeros, keep = np.zeros(3, np.float32), np.array([True, True, False])
  for elements in (1, mean[0].size):
    loss, metrics = grpo.grpo_loss(jnp.asarray(zeros), jnp.asarray(zeros), jnp.asarray(zeros),
                                   jnp.asarray(keep), 0.2, 0.5, jnp.asarray(mean, jnp.float32),
                                   jnp.asarray(ref, jnp.float32), jnp.asarray(std, jnp.float32),
                                   elements)
    np.testing.assert_allclose(metrics['kl_loss'], want / elements, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * want / elements, rtol=1e-5)


def test_grpo_loss_bad_input():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match=r'grpo_loss: kl=0.1 needs ref_mean \(and new_mean, std\)'):
    grpo.grpo_loss(x, x, x, x > 0, 0.2, 0.1)
  with pytest.raises(ValueError, match=r"one shape \[N\], got .*'keep': \(2,\)"):
    grpo.grpo_loss(x, x, x, jnp.zeros(2, bool), 0.2)
  with pytest.raises(ValueError, match=r'clip=1.5 must be in \(0, 1\)'):
    grpo.grpo_loss(x, x, x, x > 0, 1.5)
  with pytest.raises(ValueError, match=r'grpo_step_loss: kl=0.1 needs the reference model'):
    grpo.grpo_step_loss(None, None, {}, None, x, x > 0, 0.7, 0.2, 0.1)


@pytest.fixture(scope='module')
def decomposer():
  """The tiny decomposer (random weights, as test_flow_sde's), a group of 4 samples of one
  photo drawn with guidance 2, its split params and a gradient of grpo_step_loss in them
  (one step per row: the last, the first, the middle, the first)."""
  c = tiny('unused')
  model = random_model(c)
  text_fn = build.text_inputs(c)
  item = pipeline.make_example(make_sample(h=32, w=32, seed=0), np.random.default_rng(0), c.data)
  batch = build.model_batch({k: np.stack([item[k]] * 4) for k in item}, text_fn)
  uncond = examples.unconditional_inputs(batch, text_fn(['']))
  a, g = 0.7, 2.0
  latents, traj = jax.jit(lambda b, u: flow.sample_latents_sde(
      model, b, jax.random.PRNGKey(0), 3, c.loss.shift, a, g, u))(batch, uncond)
  steps = grpo.take_steps(traj, jnp.array([2, 0, 1, 0]))
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)

  @jax.jit  # kl traced: one compilation serves every weight
  def grad(params, ref_params, adv, keep, kl):
    def loss(p):
      return grpo.grpo_step_loss(nnx.merge(graphdef, p, frozen),
                                 nnx.merge(graphdef, ref_params, frozen), batch, steps, adv,
                                 keep, a, 0.2, kl, g, uncond)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def run(rewards, kl, ref_params=params):
    adv, keep, counts = grpo.group_advantages([rewards])
    (_, metrics), grads = grad(params, ref_params, adv[0], keep[0], kl)
    return counts, metrics, np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])

  r = np.random.default_rng(2)
  other = jax.tree.map(lambda p: p + 0.05 * r.normal(size=p.shape).astype(p.dtype), params)
  return types.SimpleNamespace(run=run, params=params, other=other, latents=latents)


def test_constant_reward_update_is_zero(decomposer):
  """The issue's test: every sample of the group rewarded 0.7: the group is dropped (equal
  rewards) and the gradient is exactly zero, with or without the KL term, even to a
  reference other than the model (the dropped group's KL is not counted)."""
  assert np.isfinite(decomposer.latents).all()
  for kl, ref in ((0.0, decomposer.params), (0.5, decomposer.params), (0.5, decomposer.other)):
    counts, metrics, grads = decomposer.run([0.7] * 4, kl, ref)
    assert counts['equal_rewards'] == 1 and counts['kept'] == 0
    assert metrics['loss'] == 0 and grads.size > 1000
    np.testing.assert_array_equal(grads, 0)


def test_different_rewards_update(decomposer):
  """Different rewards: a finite, nonzero gradient; the recorded log-probs recomputed (ratio 1
  per value). With the reference equal to the model the KL and its gradient are 0 (the KL is
  quadratic in the means' difference), so kl = 0.5 changes nothing; with a perturbed reference
  it does."""
  rewards = [0.1, 0.9, 0.4, 0.6]
  counts, metrics, grads = decomposer.run(rewards, 0.0)
  assert counts['kept'] == 4 and np.isfinite(grads).all() and np.abs(grads).max() > 0
  np.testing.assert_allclose(metrics['ratio_mean'], 1, atol=1e-5)
  _, metrics_kl, grads_kl = decomposer.run(rewards, 0.5)
  assert metrics_kl['kl_loss'] == 0
  np.testing.assert_allclose(grads_kl, grads, rtol=1e-6, atol=1e-12)
  _, metrics_ref, grads_ref = decomposer.run(rewards, 0.5, decomposer.other)
  assert metrics_ref['kl_loss'] > 0
  assert np.abs(grads_ref - grads).max() > 1e-3 * np.abs(grads).max()


class ShiftFlow(nnx.Module, GaussianFlow):
  """test_flow_sde's GaussianFlow with a learnable mean: x0 ~ N(theta, SD^2) per value, theta
  the one parameter, starting at 0."""

  config = types.SimpleNamespace(latent_factor=1, latent_channels=1, layers=('background',),
                                 conditions=())

  def __init__(self):
    self.theta = nnx.Param(jnp.float32(0))

  def __call__(self, x, conditions, context, pooled, sigma):
    return gaussian_velocity(x, sigma, self.theta[...])


def test_grpo_learns_a_brighter_latent():
  """Reward sigmoid(2 mean(latent)) of a 4x4 latent, in (0, 1): ~0.5 for theta = 0. Four GRPO
  updates (2 groups of 8, 4 SDE steps each trained, SGD lr 2, no KL) raise the mean reward of
  512 fresh samples from 0.502 to 0.859 (theta 0.91; this setup): asserted > 0.7."""
  steps, a, n = 4, 0.7, 16
  reward = lambda x: jax.nn.sigmoid(2 * x.reshape(x.shape[0], -1).mean(1))
  graphdef, params = nnx.split(ShiftFlow())
  train, held_out = ({'image': np.zeros((b, 4, 4, 3), np.float32)} for b in (n, 512))

  @jax.jit
  def sample(params, rng, batch):
    return flow.sample_latents_sde(nnx.merge(graphdef, params), batch, rng, steps, 3.0, a)

  @jax.jit
  def grad(params, traj, adv, keep):
    def loss(p):
      return sum(grpo.grpo_step_loss(nnx.merge(graphdef, p), None, train,
                                     grpo.take_steps(traj, jnp.full((n,), j)), adv, keep, a,
                                     0.2)[0] for j in range(steps)) / steps
    return jax.grad(loss)(params)

  mean_reward = lambda p: float(reward(sample(p, jax.random.PRNGKey(99), held_out)[0]).mean())
  before = mean_reward(params)
  for i in range(4):
    latents, traj = sample(params, jax.random.PRNGKey(i), train)
    adv, keep, _ = grpo.group_advantages(np.asarray(reward(latents)).reshape(2, 8))
    g = grad(params, traj, adv.ravel(), keep.ravel())
    params = jax.tree.map(lambda p, g: p - 2.0 * g, params, g)
  after = mean_reward(params)
  assert abs(before - 0.5) < 0.02 and after > 0.7, (before, after, params['theta'][...])
