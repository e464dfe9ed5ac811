"""What the core computes, against independent statements of the right answer: the metrics
and compositing on hand-computed values, the timestep distribution against its closed-form
CDF, every loss term on a fake model with known per-pixel errors, the Euler sampler against
a velocity oracle, and the EMA against its closed form."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from layerjax import flow
from layerjax.evaluate import metrics
from layerjax.data import schema
from layerjax.train import objectives, trainer

# --- metrics --------------------------------------------------------------------------------


def test_rgb_l1_by_hand():
  """Mean over channels of |pred - gt|, averaged over the pixels where gt alpha > 0 (not
  weighted by alpha, and the prediction's alpha plays no part)."""
  gt = np.zeros((2, 2, 4))
  pred = np.zeros((2, 2, 4))
  gt[0, 0], pred[0, 0] = (0.5, 0.5, 0.5, 1.0), (0.6, 0.3, 0.8, 0.0)   # |d| .1 .2 .3: mean .2
  gt[0, 1], pred[0, 1] = (0.2, 0.2, 0.2, 0.5), (0.5, 0.5, 0.5, 1.0)   # |d| .3 .3 .3: mean .3
  gt[1, 0], pred[1, 0] = (0.0, 0.0, 0.0, 0.0), (0.9, 0.9, 0.9, 1.0)   # gt alpha 0: not counted
  assert metrics.rgb_l1(pred, gt) == pytest.approx((0.2 + 0.3) / 2, rel=1e-6)
  assert metrics.rgb_l1(gt, gt) == 0


def test_alpha_iou_by_hand():
  pred = np.array([[0.2, 0.8], [0.5, 0.0]])
  gt = np.array([[0.6, 0.4], [0.5, 0.0]])
  # sum(min) = .2 + .4 + .5 = 1.1, sum(max) = .6 + .8 + .5 = 1.9
  assert metrics.alpha_iou(pred, gt) == pytest.approx(1.1 / 1.9, rel=1e-12)
  assert metrics.alpha_iou(pred, np.zeros((2, 2))) == 0
  assert np.isnan(metrics.alpha_iou(np.zeros((2, 2)), np.zeros((2, 2))))


# --- compositing ----------------------------------------------------------------------------


def porter_duff_stack(layers: np.ndarray) -> np.ndarray:
  """Straight RGBA of a back-to-front stack [K, ..., 4] in closed form (premultiplied):
  colour = sum_i a_i F_i prod_{j>i} (1 - a_j), alpha = 1 - prod_i (1 - a_i)."""
  a = layers[..., 3:]
  premult = np.zeros(layers.shape[1:-1] + (3,))
  for i in range(len(layers)):
    premult += a[i] * layers[i, ..., :3] * np.prod(1 - a[i + 1:], axis=0)
  alpha = 1 - np.prod(1 - a, axis=0)
  return np.concatenate([premult / np.where(alpha > 0, alpha, 1), alpha], -1)


def coloured_stack(k: int, seed: int) -> np.ndarray:
  """K semi-transparent layers (alpha in [0.1, 0.9]) of different random colours, [K, 3, 5, 4]."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.uniform(0, 1, (k, 3, 5, 3)), rng.uniform(0.1, 0.9, (k, 3, 5, 1))],
                        -1)


@pytest.mark.parametrize('as_jax', [False, True])
@pytest.mark.parametrize('k', [3, 5])
def test_composite_and_over_follow_porter_duff(k, as_jax):
  stack = coloured_stack(k, seed=k)
  want = porter_duff_stack(stack)
  layers = [jnp.asarray(l, jnp.float32) if as_jax else l.astype(np.float32) for l in stack]
  got = schema.composite(layers)
  assert isinstance(got, jax.Array) == as_jax
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  chained = layers[0]
  for front in layers[1:]:
    chained = schema.over(front, chained)
  np.testing.assert_allclose(np.asarray(chained), want, atol=1e-6)


def test_compositing_by_hand():
  red, green, blue = (1, 0, 0), (0, 1, 0), (0, 0, 1)
  # opaque red, half green, half blue: .25 red, .25 green, .5 blue, opaque
  layers = [np.array([[[*red, 1.0]]]), np.array([[[*green, 0.5]]]), np.array([[[*blue, 0.5]]])]
  np.testing.assert_allclose(schema.composite(layers)[0, 0], (0.25, 0.25, 0.5, 1.0))
  # half red under half blue: alpha 1 - .5 * .5 = .75, premultiplied (.25, 0, .5)
  half_red = np.array([[[*red, 0.5]]])
  np.testing.assert_allclose(schema.composite([half_red, layers[2]])[0, 0],
                             (0.25 / 0.75, 0, 0.5 / 0.75, 0.75))
  np.testing.assert_allclose(schema.over(np.array([*blue, 0.5]), np.array([*red, 0.5])),
                             (1 / 3, 0, 2 / 3, 0.75))


def test_visible_masks_by_hand():
  """A layer is visible where its contribution a_i prod_{j>i} (1 - a_j) exceeds the threshold.
  Pixels: (bg 1, mid .6, top .8), (1, .7, .1), (1, .4, 0), (1, .6, .3)."""
  def layer(alphas):
    return schema.Layer('x', 'object', np.array([[[0.5, 0.5, 0.5, a] for a in alphas]],
                                                np.float32))
  layers = [layer([1, 1, 1, 1]), layer([0.6, 0.7, 0.4, 0.6]), layer([0.8, 0.1, 0, 0.3])]
  # contributions: top .8 .1 0 .3; mid .12 .63 .4 .42; bg .08 .27 .6 .28
  bg, mid, top = schema.visible_masks(layers)
  np.testing.assert_array_equal(top[0], [True, False, False, False])
  np.testing.assert_array_equal(mid[0], [False, True, False, False])
  np.testing.assert_array_equal(bg[0], [False, False, True, False])
  bg, mid, top = schema.visible_masks(layers, threshold=0.29)
  np.testing.assert_array_equal(top[0], [True, False, False, True])
  np.testing.assert_array_equal(mid[0], [False, True, True, True])
  np.testing.assert_array_equal(bg[0], [False, False, True, False])


# --- timestep sampling ----------------------------------------------------------------------


def test_shift_sigma_by_hand():
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  # 3 t / (1 + 2 t): 0, .75 / 1.5, 1.5 / 2, 1
  np.testing.assert_allclose(flow.shift_sigma(t, 3.0), [0, 0.5, 0.75, 1], rtol=1e-6)
  np.testing.assert_allclose(flow.shift_sigma(t, 1.0), t)


@pytest.mark.parametrize('mean,std,shift', [(0.0, 1.0, 1.0), (0.5, 0.8, 3.0), (-1.0, 1.5, 2.0)])
def test_sigma_distribution_is_shifted_logit_normal(mean, std, shift):
  """KS test of 20k draws against the CDF of s u / (1 + (s - 1) u), u = sigmoid(N(mean, std)):
  P(sigma <= x) = Phi((logit(u(x)) - mean) / std), u(x) = x / (s - (s - 1) x)."""
  cfg = ml_collections.ConfigDict(dict(logit_mean=mean, logit_std=std, shift=shift))
  draws = np.asarray(flow.sample_sigma(jax.random.PRNGKey(0), 20_000, cfg), np.float64)

  def cdf(x):
    u = np.clip(x / (shift - (shift - 1) * x), 1e-12, 1 - 1e-12)
    return stats.norm.cdf((np.log(u / (1 - u)) - mean) / std)
  assert stats.kstest(draws, cdf).pvalue > 1e-3
  # and the median is the shifted sigmoid of the mean
  u = 1 / (1 + np.exp(-mean))
  assert np.median(draws) == pytest.approx(shift * u / (1 + (shift - 1) * u), abs=0.01)


# --- the loss -------------------------------------------------------------------------------


class FakeLatents:
  """A latent cell is its 2x2 pixel block's top-left pixel; decoding repeats it."""

  def encode(self, x):
    return jnp.asarray(x)[:, ::2, ::2]

  def decode(self, z):
    return jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)


class FakeHead(nnx.Module):
  """A parameterless head: the latent's `channels` (in that order) at pixel resolution."""

  def __init__(self, channels: tuple[int, ...]):
    self.channels = channels

  def __call__(self, z):
    return FakeLatents().decode(z[..., list(self.channels)])


class FakeDecomposer:
  """The decomposer's interface, knowing the clean latents `x0` [B, K, h, w, C]: predicts the
  exact velocity at (x, sigma), (x - x0) / sigma = noise - x0, plus a known `error`. Heads:
  the raw alpha is the latent's channel 0 at pixel resolution, the raw shadow its channels
  (0, 1, 2, 1)."""

  def __init__(self, x0, error, layers=('background', 'foreground', 'shadow')):
    self.config = types.SimpleNamespace(layers=layers, latent_factor=2, latent_channels=3)
    self.latents = FakeLatents()
    self.x0, self.error = jnp.asarray(x0), jnp.asarray(error)
    self.sigmas = []
    self.alpha_head, self.shadow_head = FakeHead((0,)), FakeHead((0, 1, 2, 1))

  def encode_text(self, batch):
    return None, None

  def conditions(self, batch):
    return None

  def head_pixels(self, batch):
    return None

  def __call__(self, x, conditions, context, pooled, sigma):
    jax.debug.callback(lambda s: self.sigmas.append(np.asarray(s)), sigma, ordered=True)
    return (x - self.x0) / sigma[:, None, None, None, None] + self.error

  @staticmethod
  def apply_head(head, z, pixels):
    return head(z)

  def alpha(self, z, pixels):
    return self.alpha_head(z)

  def shadow(self, z, pixels):
    return self.shadow_head(z)


def loss_batch():
  """Two 4x4 examples, then the same two again (so every 2nd example is always example 0).
  Backgrounds .2 and .6; the foreground opaque on the top-left 2x2 block of example 0 (0
  elsewhere) and .5 everywhere in example 1; black shadows of opacity .5 on the bottom half
  of example 0 and .25 everywhere in example 1; over the (constant .4) board the foreground
  is seen as .5, the shadow as .7; boundary band on pixel (1, 1) of example 0 and on (0, 2),
  (0, 3) and (3, 3) of example 1."""
  fg = np.zeros((2, 4, 4, 4))
  fg[..., :3] = 0.8
  fg[0, :2, :2, 3] = 1
  fg[1, ..., 3] = 0.5
  shadow = np.zeros((2, 4, 4, 4))
  shadow[0, 2:, :, 3] = 0.5
  shadow[1, ..., 3] = 0.25
  band = np.zeros((2, 4, 4, 1))
  band[0, 1, 1] = band[1, 0, 2] = band[1, 0, 3] = band[1, 3, 3] = 1
  two = {'background': np.array([0.2, 0.6])[:, None, None, None] * np.ones((2, 4, 4, 3)),
         'foreground': fg, 'shadow': shadow, 'boundary': band,
         'checkerboard': np.full((2, 4, 4, 3), 0.4),
         'foreground_on_checkerboard': np.full((2, 4, 4, 3), 0.5),
         'shadow_on_checkerboard': np.full((2, 4, 4, 3), 0.7)}
  return {k: np.concatenate([v, v]).astype(np.float32) for k, v in two.items()}


def known_errors():
  """[4, K, 2, 2, C]: background .1 everywhere; foreground .2 on latent cell (0, 0) and .4 on
  the others; shadow .3 everywhere (every channel and example alike)."""
  e = np.zeros((4, 3, 2, 2, 3), np.float32)
  e[:, 0] = 0.1
  e[:, 1] = 0.4
  e[:, 1, 0, 0] = 0.2
  e[:, 2] = 0.3
  return e


WEIGHTS = {'flow': 1.5, 'shadow': 0.7, 'alpha': 2.0, 'recompose': 0.3, 'restoration': 0.9}


def recompose_reference(bg, shadow_rgba, fg_on_board, fg_alpha, board):
  """a F + (1 - a) below, with a F = fg_on_board - (1 - a) board and below the shadow over
  the background."""
  sa = shadow_rgba[..., 3:]
  below = sa * shadow_rgba[..., :3] + (1 - sa) * bg
  return (fg_on_board - (1 - fg_alpha) * board) + (1 - fg_alpha) * below


@pytest.mark.parametrize('estimate_every', [1, 2])
def test_loss_terms_on_a_fake_model_with_known_errors(estimate_every):
  """logit_std = 0 makes every sigma shift(sigmoid(0)) = 3 * .5 / (1 + 2 * .5) = .75, so the
  one-step estimate is x0 - .75 * error and its weight 1 - sigma is .25. Values below are per
  distinct example (0, 1); the terms on the estimate read both with k = 1, example 0 alone
  with k = 2."""
  batch = loss_batch()
  enc = FakeLatents().encode
  x0 = np.stack([enc(batch['background']), enc(batch['foreground_on_checkerboard']),
                 enc(batch['shadow_on_checkerboard'])], 1)
  model = FakeDecomposer(x0, known_errors())
  cfg = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=0.0, shift=3.0,
                                       estimate_every=estimate_every, weights=WEIGHTS))
  loss, terms = objectives.loss_fn(model, batch, jax.random.PRNGKey(0), cfg)
  jax.effects_barrier()
  np.testing.assert_allclose(np.concatenate(model.sigmas), [0.75] * 4, rtol=1e-6)
  terms = {k: float(v) for k, v in terms.items()}

  # flow: squared error (mean over channels) over background and foreground latents:
  # (4 * .01 + .04 + 3 * .16) / 8
  flow = (4 * 0.01 + 0.04 + 3 * 0.16) / 8
  # restoration: the foreground's error on the latent cells the band reaches, however many
  # of their pixels: cell (0, 0) of example 0 (.04), cells (0, 1) and (1, 1) of example 1
  # (.16 each)
  restoration = (0.04 + 0.16 + 0.16) / 3
  # alpha: |raw - (2 alpha - 1)| per pixel. Clean raw .5: example 0 has 4 pixels of target 1
  # and 12 of -1, example 1 16 of 0. On the estimate raw is .5 - .75 * .2 = .35 on the
  # top-left block and .5 - .75 * .4 = .2 elsewhere.
  alpha_clean = ((4 * 0.5 + 12 * 1.5) / 16 + 0.5) / 2
  alpha_est = [(4 * 0.65 + 12 * 1.2) / 16, (4 * 0.35 + 12 * 0.2) / 16]
  alpha = alpha_clean + 0.25 * np.mean(alpha_est[::estimate_every])
  # shadow: .09 flow, then |raw_a - (2 s - 1)| + s |raw_rgb + 1| (black shadow). Clean raw .7:
  # example 0 half pixels s = .5 (.7 + .5 * 1.7) and half s = 0 (1.7); example 1 s = .25
  # (1.2 + .25 * 1.7). Estimate raw .7 - .75 * .3 = .475.
  shadow_clean = ((0.7 + 0.5 * 1.7 + 1.7) / 2 + (1.2 + 0.25 * 1.7)) / 2
  shadow_est = [(0.475 + 0.5 * 1.475 + 1.475) / 2, 0.975 + 0.25 * 1.475]
  shadow = 0.09 + shadow_clean + 0.25 * np.mean(shadow_est[::estimate_every])
  # recompose: the layers decoded from the estimate against the clean ones, weight .25.
  to_unit = lambda x: np.clip(x / 2 + 0.5, 0, 1)
  fg_est = np.full((2, 4, 4, 1), 0.2)
  fg_est[:, :2, :2] = 0.35
  bg_est = np.array([0.2, 0.6])[:, None, None, None] - 0.75 * 0.1
  recon = recompose_reference(bg_est, np.full((2, 4, 4, 4), to_unit(0.475)), fg_est,
                              to_unit(fg_est), 0.4)
  clean = recompose_reference(batch['background'][:2], batch['shadow'][:2], 0.5,
                              batch['foreground'][:2, ..., 3:], 0.4)
  per_example = np.abs(recon - clean).mean(axis=(1, 2, 3))
  recompose = 0.25 * per_example[::estimate_every].mean()

  want = {'flow': flow, 'restoration': restoration, 'alpha': alpha, 'shadow': shadow,
          'recompose': recompose}
  for k, v in want.items():
    assert terms[f'loss/{k}'] == pytest.approx(v, rel=1e-5), k
  total = sum(WEIGHTS[k] * v for k, v in want.items())
  assert float(loss) == terms['loss'] == pytest.approx(total, rel=1e-5)


def test_loss_without_a_shadow_layer_and_zero_weights():
  """Without a shadow layer there is no shadow term, and a zero weight drops its term from
  the total (flow alone here: (4 * .01 + .04 + 3 * .16) / 8)."""
  batch = loss_batch()
  enc = FakeLatents().encode
  x0 = np.stack([enc(batch['background']), enc(batch['foreground_on_checkerboard'])], 1)
  model = FakeDecomposer(x0, known_errors()[:, :2], layers=('background', 'foreground'))
  cfg = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=0.0, shift=3.0,
                                       estimate_every=1,
                                       weights={'flow': 2.0, 'alpha': 0.0, 'restoration': 0.0}))
  loss, terms = objectives.loss_fn(model, batch, jax.random.PRNGKey(0), cfg)
  assert 'loss/shadow' not in terms and 'loss/recompose' not in terms
  assert float(loss) == pytest.approx(2 * 0.07, rel=1e-5)


# --- the sampler ----------------------------------------------------------------------------


def test_sigma_schedule_by_hand():
  # uniform t = 1, .75, .5, .25, 0, then 3 t / (1 + 2 t)
  np.testing.assert_allclose(flow.sigmas(4, 3.0), [1, 0.9, 0.75, 0.5, 0], rtol=1e-6)
  np.testing.assert_allclose(flow.sigmas(2, 1.0), [1, 0.5, 0], rtol=1e-6)


def test_euler_sampler_lands_on_the_target_of_its_velocity_oracle():
  """With the exact flow of a single target x_data, v(x, s) = (x - x_data) / s, each Euler
  step scales x - x_data by s_next / s: the sampler ends on x_data from any noise, and the
  model sees each noise level of the schedule once, in order."""
  rng = np.random.default_rng(0)
  target = rng.normal(size=(2, 3, 2, 2, 3)).astype(np.float32)
  model = FakeDecomposer(target, np.zeros_like(target))
  batch = {'image': np.zeros((2, 4, 4, 3), np.float32)}
  out = flow.sample_latents(model, batch, jax.random.PRNGKey(1), steps=4, shift=3.0)
  jax.effects_barrier()
  np.testing.assert_allclose(out, target, atol=1e-5)
  np.testing.assert_allclose(np.stack(model.sigmas), np.repeat([[1, 0.9, 0.75, 0.5]], 2, 0).T,
                             rtol=1e-6)


class LinearField(FakeDecomposer):
  """v(x) = x: each Euler step multiplies x by 1 + s_next - s."""

  def __call__(self, x, conditions, context, pooled, sigma):
    return x


def test_euler_steps_follow_the_schedule():
  """For v(x) = x the sampler ends on its starting noise times .9 * .85 * .75 * .5, the
  factors of the schedule (1, .9, .75, .5, 0)."""
  zeros = np.zeros((1, 3, 2, 2, 3), np.float32)
  rng = jax.random.PRNGKey(2)
  out = flow.sample_latents(LinearField(zeros, zeros), {'image': np.zeros((1, 4, 4, 3))},
                               rng, steps=4, shift=3.0)
  start = jax.random.normal(rng, zeros.shape)
  np.testing.assert_allclose(out, start * 0.9 * 0.85 * 0.75 * 0.5, rtol=1e-5)


# --- EMA ------------------------------------------------------------------------------------


class Point(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, -2.0, 3.0]))


def test_ema_follows_its_closed_form(monkeypatch):
  """e_0 = p_0 and e_{n+1} = d_n e_n + (1 - d_n) p_{n+1}, d_n = min(decay, (1 + n) / (10 + n)),
  so e_k = prod_{n<k} d_n p_0 + sum_{j=1..k} (1 - d_{j-1}) prod_{j<=n<k} d_n p_j; with decay
  .25: d = .1, 2/11, then .25 (3/12 = .25, 4/13 and 5/14 are above it)."""
  monkeypatch.setattr(objectives, 'loss_fn', lambda model, batch, rng, cfg: (
      jnp.sum(jnp.square(model.w[...] - batch['target'])), {'loss': jnp.float32(0)}))
  graphdef, params, frozen = nnx.split(Point(), nnx.Param, ...)
  tx = optax.sgd(0.1)
  state = {'step': jnp.int32(0), 'params': params, 'ema': jax.tree.map(jnp.copy, params),
           'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(0)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  config = ml_collections.ConfigDict(dict(ema_decay=0.25, loss={}))
  step = trainer.make_step(trainer.Setup(config, mesh, graphdef, frozen, state, replicated, tx))
  batch = {'target': jnp.array([0.5, 0.5, 0.5])}
  p = [np.asarray(params['w'][...])]
  emas = []
  for _ in range(5):
    state, _ = step(state, frozen, batch)
    p.append(np.asarray(state['params']['w'][...]))
    emas.append(np.asarray(state['ema']['w'][...]))
  assert not np.allclose(p[1], p[5])  # the parameters move
  d = [0.1, 2 / 11, 0.25, 0.25, 0.25]
  for k in range(1, 6):
    weights = [np.prod(d[:k])] + [(1 - d[j - 1]) * np.prod(d[j:k]) for j in range(1, k + 1)]
    assert sum(weights) == pytest.approx(1)
    np.testing.assert_allclose(emas[k - 1], sum(w * x for w, x in zip(weights, p)), rtol=1e-6,
                               err_msg=f'step {k}')
