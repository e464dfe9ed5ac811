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
latents, and a head that has only seen clean ones leaves a faint alpha everywhere. That pass
and the recomposition's read the same estimate: one forward serves both (`held_and_free`).
`loss.estimate_every` = k takes the terms on the estimate (those heads, and the
recomposition) on every k-th example only, to save their decoder passes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax import flow
from layerjax.models import heads

TERMS = ('flow', 'shadow', 'alpha', 'recompose', 'restoration')
# Which batch map is each layer's latent target.
LAYER_TARGETS = {'background': 'background', 'foreground': 'foreground_on_checkerboard',
                 'shadow': 'shadow_on_checkerboard'}
HEAD_LAYERS = {'alpha': 'foreground', 'shadow': 'shadow'}  # the layer each head reads


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


def held_and_free(apply: Callable, params, z: jax.Array, pixels):
  """`apply(params, z, pixels)` run once, returned twice: the first copy passes gradient to
  `params` only (`z` held fixed, as `apply(params, stop_gradient(z), pixels)` would), the
  second to `params` and `z`. The backward pass is linear in its cotangent, so the
  parameters' gradient is one pass with the copies' cotangents summed, and `z`'s one more
  with the second's: the gradients of two calls, with one forward and one weight gradient
  fewer. `pixels` gets no gradient."""
  @jax.custom_vjp
  def run(params, z):
    y = apply(params, z, pixels)
    return y, y

  def forward(params, z):
    y, vjp = jax.vjp(lambda p, z: apply(p, z, pixels), params, z)
    return (y, y), vjp

  def backward(vjp, cotangents):
    held, free = cotangents
    return vjp(held + free)[0], vjp(free)[1]

  run.defvjp(forward, backward)
  return run(params, z)


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

  idx = {l: i for i, l in enumerate(layers)}
  recomposing = bool(weights.get('recompose'))

  def on_estimate(name):
    """The `name` head's raw output on the estimated latent of its layer: (with the latent
    held fixed, for the head's own terms; with gradient into the latent, for the
    recomposition, or None without one), sharing one forward pass."""
    head = getattr(model, f'{name}_head')
    z = sub['x0_hat'][:, idx[HEAD_LAYERS[name]]]
    if not recomposing:
      return model.apply_head(head, jax.lax.stop_gradient(z), sub['pixels']), None
    graphdef, params = nnx.split(head)
    return held_and_free(lambda p, z, px: model.apply_head(nnx.merge(graphdef, p), z, px),
                         params, z, sub['pixels'])

  estimated = {name: on_estimate(name) for name, l in HEAD_LAYERS.items() if l in idx}

  def on_both(name, i, l1):
    """`l1(raw head output, batch)` -> [B, H, W, 1], on the clean latent, and on the
    estimated one of every k-th example (held fixed)."""
    clean = l1(getattr(model, name)(x0[:, i], pixels), batch).mean()
    estimate = l1(estimated[name][0], sub['batch'])
    return clean + (sub['trust'] * estimate).mean()

  terms = {}
  main = [idx[l] for l in layers if l != 'shadow']
  terms['flow'] = se[:, jnp.asarray(main)].mean() if main else jnp.float32(0)

  if 'foreground' in idx:
    fg = idx['foreground']
    band = _pool_max(batch['boundary'][..., 0], cfg.latent_factor)
    terms['restoration'] = (se[:, fg] * band).sum() / jnp.maximum(band.sum(), 1.0)
    terms['alpha'] = on_both('alpha', fg, lambda raw, m: jnp.abs(
        raw - (2 * m['foreground'][..., 3:] - 1)))
  if 'shadow' in idx:
    sh = idx['shadow']

    def shadow_l1(raw, m):  # opacity, and colour where the shadow is
      target = 2 * m['shadow'] - 1
      return (jnp.abs(raw[..., 3:] - target[..., 3:]) + m['shadow'][..., 3:] *
              jnp.abs(raw[..., :3] - target[..., :3]).mean(-1, keepdims=True))
    terms['shadow'] = se[:, sh].mean() + on_both('shadow', sh, shadow_l1)
  if recomposing:
    est, m = sub['x0_hat'], sub['batch']
    bg = model.latents.decode(est[:, idx['background']])
    fg_on_board = model.latents.decode(est[:, idx['foreground']])
    alpha = heads.to_unit(estimated['alpha'][1])
    shadow = heads.to_unit(estimated['shadow'][1])
    recon = recompose(bg, shadow, fg_on_board, alpha, m['checkerboard'])
    clean = recompose(m['background'], m['shadow'], m['foreground_on_checkerboard'],
                      m['foreground'][..., 3:], m['checkerboard'])
    per_example = jnp.abs(recon - clean).mean(axis=(1, 2, 3))
    terms['recompose'] = ((1 - sub['sigma']) * per_example).mean()
  loss = sum(weights.get(k, 0.0) * v for k, v in terms.items())
  return loss, {'loss': loss, **{f'loss/{k}': v for k, v in terms.items()}}
