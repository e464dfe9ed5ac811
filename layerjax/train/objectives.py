"""LiWi's training objectives for the layer decomposer (ARCHITECTURE §5), one weighted sum.

Terms (each logged; weights in `config.loss.weights`):
  flow         rectified flow on the background and foreground latents: x_t = (1 - t) x_0 +
               t eps, the model predicts eps - x_0; t from SD3's logit-normal, shifted
  shadow       shadow-guided learning: the same flow loss on the shadow layer's latent, plus
               the shadow head's L1 (opacity, and colour where the shadow is)
  alpha        the alpha head's L1 on latents of the foreground over a jittered checkerboard
  recompose    the layers estimated in one step (x_0 = x_t - t v), decoded and composited
               (foreground over shadow over background), against the clean image; weighted
               by (1 - t) per example, since at t -> 1 the estimate is mostly noise
  restoration  degradation-restoration: the foreground flow error on the boundary band of
               the object, where the loader damaged the input; an extra weight on top of `flow`
Latent targets are the latents of: background RGB, foreground over the checkerboard, shadow
over the same checkerboard (batch keys below).
The heads' L1 terms are taken on the clean latents and again on the model's own one-step
estimate of them (held fixed, weighted by 1 - t): at sampling time the heads read generated
latents, and a head that has only seen clean ones leaves a faint alpha everywhere.
`loss.estimate_every` = k takes the terms on the estimate (those heads, and the
recomposition) on every k-th example only, to save their decoder passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layerjax import flow
from layerjax.models import heads

TERMS = ('flow', 'shadow', 'alpha', 'recompose', 'restoration')
# Which batch map is each layer's latent target.
LAYER_TARGETS = {'background': 'background', 'foreground': 'foreground_on_checkerboard',
                 'shadow': 'shadow_on_checkerboard'}


def _pool_max(x: jax.Array, f: int) -> jax.Array:
  """[B, H, W] -> [B, H/f, W/f], max over blocks (the band reaches a latent if any pixel does)."""
  b, h, w = x.shape
  return x.reshape(b, h // f, f, w // f, f).max(axis=(2, 4))


def check_weights(weights, layers) -> None:
  """Terms weighted above 0 need the layers they compare (names are checked by the spec)."""
  needs = {'shadow': {'shadow'}, 'alpha': {'foreground'}, 'restoration': {'foreground'},
           'recompose': {'background', 'foreground', 'shadow'}}
  for term, w in weights.items():
    missing = needs.get(term, set()) - set(layers)
    if w and missing:
      raise ValueError(f'loss.weights.{term}={w} needs model layers {sorted(missing)}; '
                       f'the model has {list(layers)} (set the weight to 0)')


def recompose(background, shadow_rgba, fg_on_board, fg_alpha, board):
  """Foreground over shadow over background, from the foreground seen over `board`:
  a F + (1 - a) B_below = blend + (1 - a) (B_below - board), no division by alpha."""
  below = shadow_rgba[..., 3:] * shadow_rgba[..., :3] + (1 - shadow_rgba[..., 3:]) * background
  return fg_on_board + (1 - fg_alpha) * (below - board)


def every_kth(tree, k: int):
  """Examples 0, k, 2k, ... of every array in `tree` (leading batch axis). With the batch
  split over devices in contiguous blocks that k divides, each device keeps its own."""
  if k == 1:
    return tree
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:])[:, 0], tree)


def loss_fn(model, batch: dict, rng: jax.Array, loss_cfg) -> tuple[jax.Array, dict]:
  cfg = model.config
  layers = cfg.layers
  weights = dict(loss_cfg.weights)
  rng_noise, rng_t = jax.random.split(rng)
  encode = model.latents.encode
  x0 = jax.lax.stop_gradient(jnp.stack([encode(batch[LAYER_TARGETS[l]]) for l in layers], 1))
  b = x0.shape[0]
  sigma = flow.sample_sigma(rng_t, b, loss_cfg)
  s = sigma[:, None, None, None, None]
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  xt = (1 - s) * x0 + s * noise
  context, pooled = model.encode_text(batch)
  v = model(xt, model.conditions(batch), context, pooled, sigma).astype(jnp.float32)
  se = jnp.square(v - (noise - x0)).mean(-1)  # [B, K, h, w]
  x0_hat = xt - s * v  # the one-step estimate of the clean latents
  trust = (1 - sigma)[:, None, None, None]

  pixels = model.head_pixels(batch)
  k = loss_cfg.estimate_every
  if b % k:
    raise ValueError(f'loss.estimate_every={k} does not divide the batch of {b}')
  sub = every_kth({'batch': batch, 'pixels': pixels, 'trust': trust, 'sigma': sigma,
                   'x0_hat': x0_hat}, k)

  def on_both(head, i, l1):
    """`l1(raw head output, batch)` -> [B, H, W, 1], on the clean latent, and on the
    estimated one of every k-th example."""
    clean = l1(head(x0[:, i], pixels), batch).mean()
    fixed = jax.lax.stop_gradient(sub['x0_hat'][:, i])
    estimate = l1(head(fixed, sub['pixels']), sub['batch'])
    return clean + (sub['trust'] * estimate).mean()

  idx = {l: i for i, l in enumerate(layers)}
  terms = {}
  main = [idx[l] for l in layers if l != 'shadow']
  terms['flow'] = se[:, jnp.asarray(main)].mean() if main else jnp.float32(0)

  if 'foreground' in idx:
    fg = idx['foreground']
    band = _pool_max(batch['boundary'][..., 0], cfg.latent_factor)
    terms['restoration'] = (se[:, fg] * band).sum() / jnp.maximum(band.sum(), 1.0)
    terms['alpha'] = on_both(model.alpha, fg, lambda raw, m: jnp.abs(
        raw - (2 * m['foreground'][..., 3:] - 1)))
  if 'shadow' in idx:
    sh = idx['shadow']

    def shadow_l1(raw, m):  # opacity, and colour where the shadow is
      target = 2 * m['shadow'] - 1
      return (jnp.abs(raw[..., 3:] - target[..., 3:]) + m['shadow'][..., 3:] *
              jnp.abs(raw[..., :3] - target[..., :3]).mean(-1, keepdims=True))
    terms['shadow'] = se[:, sh].mean() + on_both(model.shadow, sh, shadow_l1)
  if weights.get('recompose'):
    est, m, px = sub['x0_hat'], sub['batch'], sub['pixels']
    bg = model.latents.decode(est[:, idx['background']])
    fg_on_board = model.latents.decode(est[:, idx['foreground']])
    alpha = heads.to_unit(model.alpha(est[:, idx['foreground']], px))
    shadow = heads.to_unit(model.shadow(est[:, idx['shadow']], px))
    recon = recompose(bg, shadow, fg_on_board, alpha, m['checkerboard'])
    clean = recompose(m['background'], m['shadow'], m['foreground_on_checkerboard'],
                      m['foreground'][..., 3:], m['checkerboard'])
    per_example = jnp.abs(recon - clean).mean(axis=(1, 2, 3))
    terms['recompose'] = ((1 - sub['sigma']) * per_example).mean()
  loss = sum(weights.get(k, 0.0) * v for k, v in terms.items())
  return loss, {'loss': loss, **{f'loss/{k}': v for k, v in terms.items()}}
