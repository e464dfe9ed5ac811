"""The GRPO objective for reward finetuning of the flow decomposer (Flow-GRPO, Liu et al. 2025;
GRPO from DeepSeekMath): group-normalised advantages of the judges' rewards, the clipped
policy-gradient surrogate on the stochastic sampler's steps, and the KL of each step to the
frozen starting model. Pure functions; the trainer samples (`flow.sample_latents_sde`), asks
the judges, then calls `group_advantages` on the host and `grpo_step_loss` under its jitted
gradient, as it does `objectives.loss_fn`.

Samples that carry no signal are masked (`keep`) rather than removed, so that the jitted step
keeps one shape: a sample whose reward is missing (None, NaN), and every sample of a group
whose rewards are all equal or that has fewer than two valid ones. Masked samples count in
neither term of the loss, the KL included: a group without a preference then does not move
the model at all (rather than pulling it towards the reference), as in Flow-GRPO, which
removes zero-advantage samples before its update; and a batch with nothing kept has a loss
and gradient of exactly 0 (the issue's test: a constant reward, no update).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from layerjax import flow

EPS = 1e-4  # added to a group's reward std (Flow-GRPO's)


def group_advantages(rewards, group_ids: Sequence[Hashable] | None = None,
                     eps: float = EPS) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """A = (r - mean) / (std + eps) within each group, the std the population one (ddof 0, as
  Flow-GRPO's `PerPromptStatTracker`): [1, 2, 3] -> [-1.2247, 0, 1.2247].

  `rewards`: [N] with `group_ids` [N] (any labels, e.g. the photo's key), or [G, n] without
  (a group per row); None, NaN or an infinite value marks a reward the judge did not give.
  Returns (advantages float32, keep bool, both shaped like `rewards`, and counts). Never
  raises for the rewards' values; each dropped sample or group is counted instead:
    samples, kept       samples in all, and kept for the update
    bad_reward          samples without a finite reward (dropped; the rest of their group
                        normalised without them)
    groups              groups in all
    too_few_rewards     groups left with fewer than 2 valid rewards (dropped: no baseline)
    equal_rewards       groups whose valid rewards are all equal (dropped, advantages 0: no
                        preference to learn; Flow-GRPO also gives them 0 and drops them,
                        filtering zero-advantage samples out before its update)
  Dropped samples have advantage 0 and keep False. Host-side numpy, float64: it runs once
  per batch after the judges, on Python floats and None, grouped by arbitrary labels into a
  data-dependent number of groups (nothing for jit); only the result goes to the device."""
  try:
    r = np.asarray(rewards, dtype=np.float64)  # None -> NaN
  except (TypeError, ValueError) as e:
    raise ValueError(f'rewards: not numbers or None ({e})') from None
  if group_ids is None:
    if r.ndim != 2:
      raise ValueError(f'rewards: without group_ids, expected shape [groups, group size], '
                       f'got {r.shape}')
    ids = np.repeat(np.arange(r.shape[0]), r.shape[1])
  else:
    if r.ndim != 1 or len(group_ids) != r.shape[0]:
      raise ValueError(f'rewards {r.shape} and group_ids ({len(group_ids)}): expected one '
                       'group id per reward, rewards of shape [N]')
    index = {}
    ids = np.asarray([index.setdefault(g, len(index)) for g in group_ids])
  flat = r.ravel()
  valid = np.isfinite(flat)
  adv = np.zeros(flat.shape, np.float64)
  keep = np.zeros(flat.shape, bool)
  groups = np.unique(ids)
  counts = {'samples': flat.size, 'kept': 0, 'bad_reward': int((~valid).sum()),
            'groups': groups.size, 'too_few_rewards': 0, 'equal_rewards': 0}
  for g in groups:
    members = (ids == g) & valid
    values = flat[members]
    if values.size < 2:
      counts['too_few_rewards'] += 1
    elif values.max() == values.min():  # exactly: a rounded std of equal values is not 0
      counts['equal_rewards'] += 1
    else:
      adv[members] = (values - values.mean()) / (values.std() + eps)
      keep[members] = True
  counts['kept'] = int(keep.sum())
  return adv.astype(np.float32).reshape(r.shape), keep.reshape(r.shape), counts


def gaussian_kl(mean: jax.Array, ref_mean: jax.Array, std: jax.Array) -> jax.Array:
  """KL(N(mean, std^2) || N(ref_mean, std^2)) per row [B], summed over the other axes: for
  one value, log(s/s) + (s^2 + (m - m_ref)^2) / (2 s^2) - 1/2 = (m - m_ref)^2 / (2 s^2); the
  values are independent, so their KLs add. `std` broadcastable (a step's std depends on its
  levels and `a` only, not on the parameters: both models share it)."""
  terms = jnp.square(mean - ref_mean) / (2 * jnp.square(std))
  return jnp.broadcast_to(terms, mean.shape).reshape(mean.shape[0], -1).sum(1)


def grpo_loss(new_logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
              keep: jax.Array, clip: float, kl: float | jax.Array = 0.0,
              new_mean: jax.Array | None = None, ref_mean: jax.Array | None = None,
              std: jax.Array | None = None,
              elements: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss over N sampled steps, one per row: -mean(min(ratio A, clip(ratio, 1 - clip,
  1 + clip) A)) + kl * mean(KL(step under the model || step under the reference)), both means
  over the kept rows; ratio = exp((new_logp - old_logp) / elements).

  `new_logp`, `old_logp` [N]: the step's log-density summed over the latent (`flow`'s
  `gaussian_logprob`) under the current parameters and the sampling ones; `advantages`,
  `keep` [N] from `group_advantages`. `clip` (in (0, 1)): a Python number. The KL term is
  taken when `ref_mean` is given, with `new_mean` [N, ...] (the step's mean under the frozen
  reference and under the model) and their shared `std` (broadcastable); its weight `kl`
  (>= 0) may then be traced (a schedule, without recompiling). A Python kl > 0 without them
  is an error.

  `elements`: what the log-probs and the KL are divided by. 1: the step's exact density ratio
  and KL. The latent's size (`grpo_step_loss`'s default): Flow-GRPO's per-value means, ratio
  = (density ratio)^(1/elements), the KL per value. The reason is precision: in float32, a
  log-prob summed over SD3's 512 px latents (2e5 values, |log p| ~ 3e5) is off by ~0.03
  (measured with the sampler), so exp(new - old) of sums moves by ~3% with no parameter
  change, the size of a clip range; per value it is 0.03 / 2e5 ~ 1e-7. The KL is divided too, so
  that `kl` weighs it against the ratio on the same per-value scale.

  Metrics (over kept rows): loss, policy_loss, kl_loss, clip_fraction (|ratio - 1| > clip),
  approx_kl (mean (log ratio)^2 / 2), ratio_mean, ratio_max, advantage_mean, kept."""
  shapes = {k: v.shape for k, v in (('new_logp', new_logp), ('old_logp', old_logp),
                                     ('advantages', advantages), ('keep', keep))}
  if len(set(shapes.values())) != 1 or len(new_logp.shape) != 1:
    raise ValueError(f'grpo_loss: expected new_logp, old_logp, advantages, keep of one shape '
                     f'[N], got {shapes}')
  if not 0 < clip < 1:
    raise ValueError(f'grpo_loss: clip={clip} must be in (0, 1)')
  if isinstance(kl, (int, float)) and kl < 0:
    raise ValueError(f'grpo_loss: kl={kl} must be >= 0')
  if ref_mean is None and isinstance(kl, (int, float)) and kl:
    raise ValueError(f'grpo_loss: kl={kl} needs ref_mean (and new_mean, std)')
  if ref_mean is not None and (new_mean is None or std is None):
    raise ValueError('grpo_loss: ref_mean given without new_mean and std')
  keep = keep.astype(bool)
  n = jnp.maximum(keep.sum(), 1).astype(jnp.float32)
  mean_kept = lambda x: jnp.where(keep, x, 0).sum() / n
  # Masked rows' advantages are 0 (whatever they held), so they move nothing.
  adv = jnp.where(keep, advantages, 0).astype(jnp.float32)
  log_ratio = (new_logp - old_logp).astype(jnp.float32) / elements
  ratio = jnp.exp(log_ratio)
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
  policy = -mean_kept(surrogate)
  metrics = {'policy_loss': policy,
             'clip_fraction': mean_kept((jnp.abs(ratio - 1) > clip).astype(jnp.float32)),
             'approx_kl': mean_kept(0.5 * jnp.square(log_ratio)),
             'ratio_mean': mean_kept(ratio),
             'ratio_max': jnp.where(keep, ratio, 0).max(),
             'advantage_mean': mean_kept(adv),
             'kept': keep.sum()}
  loss = policy
  if ref_mean is not None:
    kl_rows = gaussian_kl(new_mean, jax.lax.stop_gradient(ref_mean), std) / elements
    metrics['kl_loss'] = mean_kept(kl_rows)
    loss = loss + kl * metrics['kl_loss']
  metrics['loss'] = loss
  return loss, metrics


class Steps(NamedTuple):
  """One recorded step per row: the transition x [N, K, h, w, C] -> x_next at levels s -> s_next
  ([N]) and its log-prob [N] under the sampling parameters."""
  x: jax.Array
  x_next: jax.Array
  s: jax.Array
  s_next: jax.Array
  log_probs: jax.Array


def take_steps(trajectory: flow.Trajectory, index: jax.Array) -> Steps:
  """Row i's step `index[i]` (in [0, steps)) of a `flow.sample_latents_sde` trajectory."""
  rows = jnp.arange(trajectory.log_probs.shape[1])
  return Steps(trajectory.states[index, rows], trajectory.states[index + 1, rows],
               trajectory.levels[index], trajectory.levels[index + 1],
               trajectory.log_probs[index, rows])


def grpo_step_loss(model, ref_model, batch: dict, steps: Steps, advantages: jax.Array,
                   keep: jax.Array, a: float, clip: float, kl: float | jax.Array = 0.0,
                   guidance: float = 1.0, uncond: dict | None = None,
                   per_element: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`grpo_loss` of the recorded `steps` (`take_steps`) of the N rows of `batch` (the rows of
  a group repeat their photo and prompt), under `model`'s current parameters: differentiable
  in them (`jax.value_and_grad` of a function of the params that merges the model, as the
  trainer's step does, or `nnx.value_and_grad`). The conditions are encoded inside, so that
  trainable encoders get their gradient. `ref_model`: the frozen starting model, whose guided
  velocity at the same x gives the reference mean of each step (no gradient) and the KL term
  weighted by `kl` (which may be traced); None: no KL term and no reference pass (kl must then
  be 0). `a`, `guidance`, `uncond`: the sampler's.
  `per_element`: log-probs and KL per latent value (`grpo_loss`'s `elements`)."""
  if ref_model is None and isinstance(kl, (int, float)) and kl:
    raise ValueError(f'grpo_step_loss: kl={kl} needs the reference model (ref_model)')

  def moments(m):
    v = flow.velocity(m, flow.encode_conditions(m, batch, guidance, uncond), steps.x, steps.s,
                      guidance)
    return flow.sde_moments(steps.x, v, steps.s, steps.s_next, a)

  mean, std = moments(model)
  new_logp = flow.gaussian_logprob(steps.x_next, mean, std)
  ref_mean = None if ref_model is None else jax.lax.stop_gradient(moments(ref_model)[0])
  elements = math.prod(steps.x.shape[1:]) if per_element else 1
  return grpo_loss(new_logp, steps.log_probs, advantages, keep, clip, kl, mean, ref_mean, std,
                   elements)
