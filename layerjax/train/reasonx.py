"""Reward finetuning of a trained decomposer on unlabelled photos (ReasonX with Flow-GRPO).

    python -m layerjax.main --config=configs/reasonx.py:demo --workdir=out/reasonx

A step: `photos_per_step` photos, each with a prompt the engine's detector proposes
(`reward.photos`), decomposed `group_size` times each by the stochastic sampler
(`flow.sample_latents_sde`, recording every step's log-probability) with the current
parameters, in calls of `sample_photos` photos; while the device samples the next call, a
thread pool judges the last (`RelationReward`: relations proposed on the group's
decompositions, answered by the judge, agreement as reward; optionally mixed with the pairwise
preference). Rewards become advantages within each photo's group (`grpo.group_advantages`:
missing or NaN rewards and groups without a preference are dropped and counted), then
`minibatches` optimizer steps of the clipped GRPO objective with a KL term to the starting
model (`grpo.grpo_step_loss`), each on `timesteps` of the sampler's steps per decomposition.

The loop is the trainer's (`trainer.run`): the same state, mesh, Orbax checkpoints with the
photo stream's position, preemption and exact resume (the step's randomness is
`fold_in(key, step)`; the judge's answers come from its cache or the ground truth). An
evaluation (before the first step and every `eval_every`) measures the reward on held-out
photos with the deterministic sampler users decompose with, and the layer metrics on the
start's dataset (`eval.split`). The audit, one JSON line per photo and step (its prompt, the
judge's answers, every decomposition's answers, rewards, advantages, what was dropped), is
written under `audit/` at each checkpoint, so it always matches the saved state.

On several processes each samples, judges and audits the groups of its own rows of every
sampling call (`process_photos`), from its shard of the photo stream, whose prompts follow a
photo's place in the whole stream; the update takes every process's rows in the order one
process would; rewards and counts are summed over shards each step, the held-out photos
split by rows and their rewards gathered. So two processes finetune as one does on the same
mesh, and every decision that changes control flow (the non-finite stop, a source without
prompts) is taken on every process alike.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import time
from pathlib import Path  # the judge cache: a local file
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from layerjax import build, flow, parallel
from layerjax.data import examples
from layerjax.data.pipeline import make_loader
from layerjax.fileio import as_path, atomic_file, is_url
from layerjax.infer import decomposer as infer_decomposer
from layerjax.infer import model as infer_model
from layerjax.infer import postprocess as post
from layerjax.infer.prompts import Query
from layerjax.infer.scene import Proposals
from layerjax.models.decomposer import TRAINABLE
from layerjax.reward import judges, photos as photo_source, relations
from layerjax.reward.rewards import RelationReward, combine
from layerjax.train import agreement, evaluate, grpo, trainer
from layerjax.train import config as train_config

# The keys of the start's config this experiment's file may replace; the rest (the model, the
# loss's noise schedule) is what the start model was trained with. `data` is for where its
# dataset is now (data_dir), not for changing how prompts and boards are drawn.
OWN = ('seed', 'total_steps', 'log_every', 'eval_every', 'checkpoint_every',
       'keep_checkpoints', 'async_checkpoints', 'mesh', 'mesh_dcn', 'ema_decay', 'optimizer',
       'eval', 'data', 'reasonx')


def full_config(config) -> ml_collections.ConfigDict:
  """The start model's recorded experiment config (`reasonx.start`, read without its weights),
  its keys in `OWN` replaced by `config`'s (sections key by key; a None leaves the start's
  value, so that a config file can name a key a flag may set). `data.global_batch_size`
  becomes the rows of one update (photos x group / minibatches), which the mesh is fitted to."""
  own = config.to_dict()
  unknown = sorted(set(own) - set(OWN))
  if unknown:
    raise train_config.spec.ConfigError(
        f'{unknown}: a reasonx config sets only {list(OWN)}; the model and loss are the '
        f'start\'s ({config.reasonx.start})')
  start = infer_model.experiment_config(config.reasonx.start).to_dict()
  start.pop('demo', None)
  # A model trained before a key existed gets its default (what the trainer would use now).
  own = {k: v if k == 'reasonx' else _set(v) for k, v in own.items() if v is not None}
  merged = _merge(_merge(train_config.base().to_dict(), start), own, replace=('reasonx',))
  merged = ml_collections.ConfigDict(merged)
  r = merged.reasonx
  merged.data.global_batch_size = max(1, r.photos_per_step * r.group_size // r.minibatches)
  return merged


def _set(value):
  """`value` without the None entries of its sections."""
  if isinstance(value, dict):
    return {k: _set(v) for k, v in value.items() if v is not None}
  return value


def _merge(base: dict, top: dict, replace=()) -> dict:
  """`base` with `top`'s keys, sections merged key by key (those in `replace` replaced)."""
  out = dict(base)
  for key, value in top.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replace:
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def check(config) -> None:
  """`full_config`'s result: the trainer's checks, then the keys of `reasonx` together and the
  sources they name; nothing is loaded but the datasets' metadata."""
  train_config.check(config)
  r = config.reasonx
  name = 'reasonx.'
  if r.photos_per_step % r.sample_photos:
    raise train_config.spec.ConfigError(
        f'{name}sample_photos={r.sample_photos} must divide photos_per_step='
        f'{r.photos_per_step}')
  rows = r.photos_per_step * r.group_size
  if rows % r.minibatches:
    raise train_config.spec.ConfigError(
        f'{name}minibatches={r.minibatches} must divide photos_per_step x group_size = {rows}')
  if r.timesteps > r.sample_steps:
    raise train_config.spec.ConfigError(
        f'{name}timesteps={r.timesteps} is more than the sampler\'s {r.sample_steps} steps')
  if not r.relation_weight and not r.preference.weight:
    raise train_config.spec.ConfigError(
        f'{name}relation_weight and preference.weight are both 0: no reward')
  if r.guidance != 1 and not config.loss.get('cond_dropout', 0.0):
    raise train_config.spec.ConfigError(
        f'{name}guidance={r.guidance}: the start model was trained without condition dropout')
  if 'box' not in frozenset().union(*examples.parse_prompt_probs(config.data.prompt_probs)[0]):
    raise train_config.spec.ConfigError(
        f'{name}start: the model was trained without box prompts, which the detector gives')
  if r.judge.kind == 'ground_truth' and not r.photos.startswith(photo_source.TFDS):
    raise train_config.spec.ConfigError(
        f'{name}judge.kind=ground_truth reads the scenes\' ground truth: photos must be '
        f'{photo_source.TFDS}SPLIT, got {r.photos!r}')
  if r.prompts == 'dataset' and not all(
      r[k].startswith(photo_source.TFDS) for k in ('photos', 'held_out') if r[k]):
    raise train_config.spec.ConfigError(
        f'{name}prompts=dataset takes the scenes\' own boxes: photos and held_out must be '
        f'{photo_source.TFDS}SPLIT')
  relations.Thresholds(**dict(r.thresholds))
  for key in ('photos', 'held_out'):
    if r[key]:
      photo_source.check_spec(r[key], config)


def make_judge(config, workdir):
  """The relation judge the config names, its agent created (a bad agent spec fails here)."""
  j = config.reasonx.judge
  thresholds = relations.Thresholds(**dict(config.reasonx.thresholds))
  if j.kind == 'ground_truth':
    return judges.GroundTruthJudge([], thresholds)
  from data_engine import core
  cache: Any = {}
  path = j.cache or (None if is_url(str(workdir)) else str(as_path(workdir) / 'judge_cache.jsonl'))
  if path:
    if jax.process_count() > 1:  # each process appends its own answers
      path = Path(path)
      path = path.with_name(f'{path.stem}.process{jax.process_index()}{path.suffix}')
    cache = judges.JsonlCache(path)
  else:
    logging.warning('%s: the judge cache is kept in memory (a JSON-lines file needs a local '
                    'path: set reasonx.judge.cache)', workdir)
  return judges.AgentJudge(core.create('agent', _spec(j.agent)), cache)


def _spec(x):
  return x.to_dict() if hasattr(x, 'to_dict') else x


def make_preference(config):
  """The pairwise-preference reward, None at weight 0; its pair count checked against the
  group size here, before the run."""
  p = config.reasonx.preference
  if not p.weight:
    return None
  from data_engine import core
  from layerjax.reward.preference import PreferenceReward
  reward = PreferenceReward(core.create('agent', _spec(p.agent)), p.pairs or None)
  try:
    reward.comparisons(config.reasonx.group_size)
  except ValueError as e:
    raise train_config.spec.ConfigError(f'reasonx.preference.pairs: {e}') from None
  return reward


def finetune(config, workdir, *, mesh=None) -> dict:
  """Finetunes to `config.total_steps` (resuming from `workdir`); `config` as `full_config`
  gives it. Returns the last logged metrics and evaluation."""
  workdir = as_path(workdir)
  agreement.check(config)
  check(config)
  mesh = trainer.check_config(config, mesh)
  r = config.reasonx
  sample_rows = r.sample_photos * r.group_size
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if sample_rows % n:
    raise train_config.spec.ConfigError(
        f'reasonx.sample_photos x group_size = {sample_rows} rows is not divisible by the '
        f'data-parallel size {n} of mesh {dict(mesh.shape)}')
  process_photos(mesh, r.sample_photos, r.group_size)
  judge = make_judge(config, workdir)
  preference = make_preference(config)
  if config.eval_every and r.eval_layers:
    make_loader(evaluate.eval_data_config(config, mesh), config.eval.split, mesh)
  with trainer._workdir_lock(workdir):
    return trainer.run(config, workdir, mesh,
                       lambda: GRPO(config, mesh, workdir, judge, preference))


def process_photos(mesh, photos: int, group: int) -> list[int]:
  """The photos of a sampling call of `photos` photos x `group` rows each that this process
  holds (their numbers in the call, ascending): each process samples, judges and audits whole
  groups. A mesh that splits a group across processes is a config error, found alike on every
  process (each checks them all)."""
  held = {}
  for p in sorted({d.process_index for d in mesh.devices.flat}):
    rows = parallel.process_rows(mesh, photos * group, p)
    starts = rows[::group]
    if rows != [s + i for s in starts for i in range(group)] or any(s % group for s in starts):
      raise train_config.spec.ConfigError(
          f'reasonx.group_size={group}: mesh {dict(mesh.shape)} gives process {p} the rows '
          f'{rows} of a sampling call\'s {photos * group}, which split a group across '
          f'processes: make sample_photos x group_size / data-parallel size a multiple of '
          f'group_size')
    held[p] = [s // group for s in starts]
  return held[jax.process_index()]


class _Call(NamedTuple):
  """One sampling call's rows for the update: global arrays, rows in the call's order."""
  batch: dict
  uncond: dict | None
  traj: flow.Trajectory
  advantages: jax.Array
  keep: jax.Array


def _geometry(size, model_size, step) -> post.Geometry:
  """The photo fitted into the model's size and padded to all of it, so that every photo of a
  batch has one shape."""
  g = post.geometry(size, model_size, step)
  return post.Geometry(g.size, g.scaled, tuple(model_size))


class GRPO:
  """`trainer.run`'s program for reward finetuning (see the module docstring)."""

  eval_at_start = True
  log_keys = ('reward',)

  def __init__(self, config, mesh, workdir, judge, preference):
    self.config, self.workdir = config, as_path(workdir)
    r = self.r = config.reasonx
    self.setup = setup = trainer._place(config, mesh)
    loaded = infer_model.load(r.start, mesh=mesh)
    start = nnx.state(loaded.model, TRAINABLE)
    if jax.tree.structure(start) != jax.tree.structure(setup.state['params']):
      raise ValueError(f'reasonx.start: {r.start}: its weights do not fit the model its config '
                       'describes')
    params = jax.device_put(start, jax.tree.map(lambda x: x.sharding, setup.state['params']))
    setup.state = jax.device_put(
        {**setup.state, 'params': params, 'ema': jax.tree.map(jnp.copy, params),
         'opt_state': setup.tx.init(params)}, setup.state_shardings)
    self.reference = jax.tree.map(jnp.copy, params)  # the KL's anchor, never trained
    self.text_fn = build.text_inputs(config)
    self.thresholds = relations.Thresholds(**dict(r.thresholds))
    self.settings = infer_decomposer.Settings.of(config, infer_model.config_json(
        loaded.model.config))
    del loaded
    proposals = ('dataset' if r.prompts == 'dataset' else
                 Proposals(detector=_spec(r.detector)))
    # Several processes: each samples, judges and audits the groups of its rows of every
    # sampling call (its photos' numbers in the call), from its shard of the photos; the
    # first process of a shard writes its audit.
    self.call_photos = process_photos(mesh, r.sample_photos, r.group_size)
    self.shard, self.shards, self.writes = parallel.process_shard(
        mesh, r.sample_photos * r.group_size)
    self.suffix = f'.shard{self.shard}' if self.shards > 1 else ''
    self.iterator = iter(photo_source.photo_stream(
        r.photos, config, config.seed, proposals, self.shard, self.shards,
        prefetch=r.photos_per_step))
    self.judge = judge
    self.relation_reward = RelationReward(judge, self.thresholds, r.relations, r.band)
    self.preference = preference
    self.held_out = self._held_out(proposals) if r.held_out else []
    self.held_out_questions = None  # `_held_out_reward`'s, per photo, from its first call
    if r.judge.kind == 'ground_truth':  # the offline judge reads the scenes' ground truth
      judge.add(p.truth for p in self.held_out)
    self.pool = concurrent.futures.ThreadPoolExecutor(r.judge.workers)
    self.evaluation = (evaluate.Evaluation(setup, config)
                       if config.eval_every and r.eval_layers else None)
    self.examples = r.photos_per_step * r.group_size
    self.flops = None
    self.counts: collections.Counter = collections.Counter()  # groups dropped, and why
    self.skipped: collections.Counter = collections.Counter()  # photos skipped, and why
    self.counted_from: int | None = None  # the step the counts were restored at
    self.audit: list[str] = []
    self.audit_from = None
    self._jit()

  # --- photos -----------------------------------------------------------------------------

  def _held_out(self, proposals) -> list[photo_source.Photo]:
    """The first `held_out_photos` photos of the held-out source with a prompt (the same
    every run: its own seed, not the training stream's)."""
    r = self.r
    it = iter(photo_source.photo_stream(r.held_out, self.config, self.config.eval.seed,
                                        proposals))
    out, seen = [], 0
    while True:
      photo = next(it)
      seen += 1
      if not isinstance(photo, str) and photo.key not in {p.key for p in out}:
        out.append(photo)
      if len(out) == r.held_out_photos or seen >= 4 * r.held_out_photos:
        break
    if not out:
      raise ValueError(f'reasonx.held_out: {r.held_out}: no photo with a prompt the detector '
                       f'could propose in {seen} tries')
    return out

  def _next_photos(self, n: int) -> list[photo_source.Photo]:
    """The next `n` photos with a prompt; photos without one are skipped (`skipped`).
    A source none of whose photos gets one in `n` passes' worth of tries stops the run
    (that is a detector that finds nothing, not a bad photo), on every process at once."""
    out, tries, error = [], 0, ''
    while len(out) < n:
      photo = next(self.iterator)
      tries += 1
      if isinstance(photo, str):
        self.skipped[photo] += 1
        if tries > 100 * n and not out:
          error = (f'reasonx.photos: {self.r.photos}: no prompt proposed for {tries} photos '
                   f'in a row ({dict(self.skipped)})')
          break
      else:
        out.append(photo)
    errors = [e for e in parallel.process_allgather_json(error) if e]
    if errors:
      raise ValueError(errors[0])
    return out

  def _inputs(self, photos: list[photo_source.Photo], repeat: int):
    """The model batch of `photos`, each row `repeat` times, and each photo's geometry."""
    size = tuple(self.config.data.image_size)
    geometries = [_geometry(p.image.shape[:2], size, self.settings.step) for p in photos]
    rows = [infer_decomposer.model_inputs(self.config, p.image, Query(box=p.box), g,
                                          self.text_fn) for p, g in zip(photos, geometries)]
    batch = {k: np.repeat(np.concatenate([row[k] for row in rows]), repeat, axis=0)
             for k in rows[0]}
    if self.r.guidance != 1:
      self.uncond = examples.unconditional_inputs(batch, self.text_fn(['']))
    return batch, geometries

  # --- the jitted parts -------------------------------------------------------------------

  def _jit(self):
    cfg, r, graphdef = self.config, self.r, self.setup.graphdef
    shift = cfg.loss.shift
    board = 'checkerboard' in cfg.model.conditions

    def decode(model, latents, batch):
      return flow.decode_layers(model, latents, model.head_pixels(batch),
                                batch['checkerboard'] if board else None)

    def sample(params, frozen, batch, uncond, rng):
      model = nnx.merge(graphdef, params, frozen)
      latents, traj = flow.sample_latents_sde(model, batch, rng, r.sample_steps, shift,
                                              r.noise_level, r.guidance, uncond)
      return decode(model, latents, batch), traj

    def deterministic(params, frozen, batch, uncond, rng):
      model = nnx.merge(graphdef, params, frozen)
      latents = flow.sample_latents(model, batch, rng, cfg.eval.sample_steps, shift,
                                    r.guidance, uncond)
      return decode(model, latents, batch)

    tx = self.setup.tx
    m, t = r.minibatches, r.timesteps

    def update(state, frozen, reference, calls, order, index):
      """`minibatches` optimizer steps on the rows in `order` [N] (shuffled), each on the
      steps `index` [T, N] of every row, gradients averaged over the T steps. `calls`: the
      sampling calls' `_Call`s, whose rows, in order, are the N."""
      batch, uncond, adv, keep = (
          jax.tree.map(lambda *xs: jnp.concatenate(xs), *[getattr(c, k) for c in calls])
          for k in ('batch', 'uncond', 'advantages', 'keep'))
      traj = flow.Trajectory(jnp.concatenate([c.traj.states for c in calls], 1),
                             jnp.concatenate([c.traj.log_probs for c in calls], 1),
                             calls[0].traj.levels)
      split = lambda x: jnp.take(x, order, axis=0).reshape((m, -1) + x.shape[1:])
      rows = jax.tree.map(split, (batch, uncond, adv, keep))
      idx = jnp.take(index, order, axis=1).reshape(t, m, -1).transpose(1, 0, 2)
      states = jnp.take(traj.states, order, axis=1)
      states = states.reshape(states.shape[:1] + (m, -1) + states.shape[2:]).swapaxes(0, 1)
      logps = jnp.take(traj.log_probs, order, axis=1).reshape(-1, m, adv.shape[0] // m)
      logps = logps.swapaxes(0, 1)
      ref_model = nnx.merge(graphdef, reference, frozen)

      def minibatch(state, xs):
        (b, u, a, k), idx_m, states_m, logp_m = xs
        trajectory = flow.Trajectory(states_m, logp_m, traj.levels)

        def at_step(grads, i):
          steps = grpo.take_steps(trajectory, i)

          def loss(params):
            return grpo.grpo_step_loss(nnx.merge(graphdef, params, frozen), ref_model, b,
                                       steps, a, k, r.noise_level, r.clip, r.kl, r.guidance,
                                       u if r.guidance != 1 else None)

          (_, metrics), g = jax.value_and_grad(loss, has_aux=True)(state['params'])
          return jax.tree.map(lambda x, y: x + y / t, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, state['params'])
        grads, metrics = jax.lax.scan(at_step, zeros, idx_m)
        metrics = jax.tree.map(jnp.mean, metrics)
        params, ema, opt_state = trainer.apply_gradients(state, grads, tx, cfg.ema_decay)
        metrics['grad_norm'] = optax.global_norm(grads)
        # Nothing kept (every group dropped): no step at all, as AdamW would move the
        # parameters on a zero gradient (its decoupled weight decay, its moments).
        moved = k.any()
        new = {**state, 'params': params, 'ema': ema, 'opt_state': opt_state}
        new = jax.tree.map(lambda a_, b_: jnp.where(moved, a_, b_), new, state)
        return new, metrics

      state, metrics = jax.lax.scan(minibatch, state, (rows, idx, states, logps))
      metrics = jax.tree.map(jnp.mean, metrics)
      finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
      new = {**state, 'step': state['step'] + 1}
      return new, {**metrics, 'finite': finite}

    self.sample_fn = jax.jit(sample)
    self.deterministic_fn = jax.jit(deterministic)
    self.update_fn = jax.jit(update, out_shardings=(self.setup.state_shardings, None),
                             donate_argnums=0)

  # --- a step ---------------------------------------------------------------------------------

  def _host(self, tree):
    """This process's rows of global outputs, as numpy."""
    return jax.tree.map(lambda x: parallel.local_rows(x, self.setup.mesh), tree)

  def _global(self, local: dict) -> dict:
    return parallel.global_batch(local, self.setup.mesh)

  def _samples(self, photo, geometry, decoded: dict, rows: range, tag: str):
    """The decompositions of `photo` in `rows` of `decoded` (the model's layers at its size),
    at the photo's resolution as one-object samples (`relations.one_object_sample`)."""
    sh, sw = geometry.scaled
    out = []
    for j in rows:
      layers = infer_decomposer.model_layers(
          {k: v[j, :sh, :sw] for k, v in decoded.items()},
          post.to_model(photo.image, geometry)[:sh, :sw])
      background, obj = infer_decomposer.to_photo(layers, photo.image)
      rgba = np.concatenate([obj.colour, obj.alpha[..., None]], -1)
      out.append(relations.one_object_sample(f'{tag}/{j}', photo.image, background, rgba,
                                             obj.shadow, photo.target))
    return out

  def _reward(self, photo, samples, seed: tuple[int, ...]):
    """Rewards of one photo's group, and its audit record (runs on a judging thread)."""
    rng = np.random.default_rng(seed)
    rewards, audit = self.relation_reward(photo.image, photo.target, photo.label, samples, rng)
    parts = [(self.r.relation_weight, rewards)] if self.r.relation_weight else []
    if self.preference is not None:
      pref, records = self.preference(photo.image, samples, rng)
      parts.append((self.r.preference.weight, pref))
      audit['preference'] = records
    return combine(parts), audit

  def _replicated(self, x: np.ndarray) -> jax.Array:
    """A host array every process has alike, as one global array."""
    return jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(self.setup.mesh, jax.sharding.PartitionSpec()), x)

  def _counters(self) -> dict[str, collections.Counter]:
    out = {'groups': self.counts, 'photos': self.skipped, 'judge': self.judge.counts}
    if self.preference is not None:
      out['preference'] = self.preference.counts
    return out

  def step(self, state, step: int):
    r = self.r
    g = r.group_size
    if self.counted_from is None:  # a resumed run counts on from its checkpoint's counts
      self.counted_from = step
      saved = self.workdir / 'audit' / f'counts_{step:08d}{self.suffix}.json'
      if step and saved.exists():
        for prefix, counts in json.loads(saved.read_text()).items():
          self._counters()[prefix].update(counts)
    t0 = time.perf_counter()
    calls = r.photos_per_step // r.sample_photos
    k = len(self.call_photos)  # this process's photos in each call
    photos = self._next_photos(calls * k)
    if r.judge.kind == 'ground_truth':
      self.judge.add(p.truth for p in photos)
    rng = jax.random.fold_in(state['rng'], step)
    key_sample = jax.random.split(rng)[0]
    seed = int(jax.random.randint(jax.random.fold_in(rng, 1), (), 0, 2**31 - 1))
    inputs, outputs, futures = [], [], []
    for c in range(calls):  # dispatched at once: the device samples while the host judges
      batch, geometries = self._inputs(photos[c * k:(c + 1) * k], g)
      uncond = self.uncond if r.guidance != 1 else None
      batch, uncond = self._global(batch), uncond and self._global(uncond)
      inputs.append((batch, uncond, geometries))
      outputs.append(self.sample_fn(state['params'], self.setup.frozen, batch, uncond,
                                    jax.random.fold_in(key_sample, c)))
    t_sampled = None
    for c, ((_, _, geometries), (decoded, _)) in enumerate(zip(inputs, outputs)):
      decoded = self._host(decoded)
      t_sampled = time.perf_counter()
      for i, geometry in enumerate(geometries):
        photo = photos[c * k + i]
        samples = self._samples(photo, geometry, decoded, range(i * g, (i + 1) * g),
                                f'{step}/{photo.key}')
        # The judge's draws follow the photo's number in the step, whatever the processes.
        futures.append(self.pool.submit(self._reward, photo, samples,
                                        (seed, c * r.sample_photos + self.call_photos[i])))
    results = [f.result() for f in futures]
    t_judged = time.perf_counter()
    rewards = [rw for rw, _ in results]
    adv, keep, counts = grpo.group_advantages(
        np.asarray([[np.nan if v is None else v for v in rw] for rw in rewards], np.float64))
    self.counts.update(counts)
    sampled = [_Call(batch, uncond, traj, **self._global({
        'advantages': adv[c * k:(c + 1) * k].reshape(-1),
        'keep': keep[c * k:(c + 1) * k].reshape(-1)}))
            for c, ((batch, uncond, _), (_, traj)) in enumerate(zip(inputs, outputs))]
    n = r.photos_per_step * g
    host = np.random.default_rng((seed, 2))
    order = host.permutation(n)
    index = np.stack([host.permutation(r.sample_steps)[:r.timesteps] for _ in range(n)], 1)
    state, metrics = self.update_fn(state, self.setup.frozen, self.reference, sampled,
                                    self._replicated(order), self._replicated(index))
    jax.block_until_ready(metrics)
    t_done = time.perf_counter()
    flat = np.asarray([v for rw in rewards for v in rw if v is not None and np.isfinite(v)])
    # The step's rewards and counts over every shard; why groups, photos, judge answers and
    # preference comparisons were dropped, counted since the run began (saved with each
    # checkpoint).
    shards = {s['shard']: s for s in parallel.process_allgather_json({
        'shard': self.shard, 'reward': [float(flat.sum()), int(flat.size)], 'step': counts,
        'since': {prefix: dict(c) for prefix, c in self._counters().items()}})}.values()
    total = collections.Counter()
    since: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in shards:
      total.update(s['step'])
      for prefix, c in s['since'].items():
        since[prefix].update(c)
    summed, rewarded = (sum(s['reward'][i] for s in shards) for i in (0, 1))
    metrics = {**metrics,
               # no reward at all this step: 0, which the loop must not read as a NaN loss
               'reward': summed / rewarded if rewarded else 0.0,
               'reward_groups_kept': total['groups'] - total['too_few_rewards']
               - total['equal_rewards'], 'samples_kept': total['kept'],
               'time/sampling_s': t_sampled - t0, 'time/judging_wait_s': t_judged - t_sampled,
               'time/update_s': t_done - t_judged}
    for prefix, counter in since.items():
      metrics.update({f'count/{prefix}/{k_}': v for k_, v in counter.items()})
    self._record(step, photos, results, adv, keep)
    return state, metrics

  def _record(self, step, photos, results, adv, keep):
    if self.audit_from is None:
      self.audit_from = step + 1
    for photo, (rw, audit), a, k in zip(photos, results, adv, keep):
      self.audit.append(json.dumps({
          'step': step + 1, 'photo': photo.key, 'box': list(photo.box), 'target': photo.target,
          'label': photo.label, 'rewards': rw, 'advantages': [float(x) for x in a],
          'kept': [bool(x) for x in k], **audit}, default=_plain))

  def before_save(self, step: int) -> None:
    """The audit of the steps since the last save, as one file: `audit/steps_A-B.jsonl`, and
    the counts so far: `audit/counts_B.json` (on several shards, one of each per shard:
    `steps_A-B.shardI.jsonl`, `counts_B.shardI.json`)."""
    audit, first = self.audit, self.audit_from
    self.audit, self.audit_from = [], None
    if not self.writes:
      return
    with atomic_file(self.workdir / 'audit' / f'counts_{step:08d}{self.suffix}.json') as tmp:
      tmp.write_text(json.dumps({k: dict(c) for k, c in self._counters().items()}) + '\n')
    if audit:
      with atomic_file(self.workdir / 'audit' /
                       f'steps_{first:08d}-{step:08d}{self.suffix}.jsonl') as tmp:
        tmp.write_text('\n'.join(audit) + '\n')

  # --- evaluation -----------------------------------------------------------------------------

  def evaluate(self, state, step: int, workdir, writer) -> dict:
    result = {}
    if self.held_out:
      result.update(self._held_out_reward(state, step, workdir, writer))
    if self.evaluation is not None:
      result.update(self.evaluation.run(state, self.config.eval.split, workdir, step, writer))
    return result

  def _decompose_held_out(self, params) -> dict[int, list]:
    """The decompositions (a one-item list of samples) of the held-out photos in this
    process's rows, by number, by `params`, as users decompose (the deterministic sampler,
    `eval.seed`); each photo in the row one process would give it."""
    chunk = self.r.sample_photos * self.r.group_size  # photos (a row each) per call
    rows = parallel.process_rows(self.setup.mesh, chunk)
    padded = self.held_out + self.held_out[:1] * (-len(self.held_out) % chunk)  # one shape
    out = {}
    for start in range(0, len(padded), chunk):
      numbers = [start + j for j in rows]
      photos = [padded[n] for n in numbers]
      batch, geometries = self._inputs(photos, 1)
      uncond = self.uncond if self.r.guidance != 1 else None
      decoded = self._host(self.deterministic_fn(
          params, self.setup.frozen, self._global(batch), uncond and self._global(uncond),
          jax.random.PRNGKey(self.config.eval.seed)))
      for i, (n, photo, geometry) in enumerate(zip(numbers, photos, geometries)):
        if n < len(self.held_out):
          out[n] = self._samples(photo, geometry, decoded, range(i, i + 1), f'held_out/{n}')
    return out

  def _held_out_reward(self, state, step: int, workdir, writer) -> dict:
    """The mean relation reward of the held-out photos decomposed as users decompose them.
    Every evaluation asks the same questions: those the start model's decompositions make
    informative (proposed once, with a fixed seed per photo), so that the reward of two
    checkpoints differs by their answers, not by what each was asked. Each process rewards
    the photos in its rows; all of them get every photo's reward."""
    if self.held_out_questions is None:
      self.held_out_questions = {
          n: self.relation_reward.propose(self.held_out[n].target, samples,
                                          np.random.default_rng((self.config.eval.seed, n)))
          for n, samples in self._decompose_held_out(self.reference).items()}
    params = state['ema'] if self.config.eval.use_ema else state['params']
    mine = []
    for n, samples in self._decompose_held_out(params).items():
      photo, asked = self.held_out[n], self.held_out_questions[n]
      (reward,), _ = self.relation_reward(photo.image, photo.target, photo.label, samples,
                                          None, asked)
      mine.append({'number': n, 'photo': photo.key, 'questions': len(asked),
                   'reward': None if reward is None else float(reward)})
    per_photo = sorted({p['number']: p for ps in parallel.process_allgather_json(mine)
                        for p in ps}.values(), key=lambda p: p['number'])
    rewards = [p['reward'] for p in per_photo if p['reward'] is not None]
    result = {'held_out/reward': float(np.mean(rewards)) if rewards else float('nan'),
              'held_out/photos_rewarded': len(rewards)}
    if jax.process_index() == 0:
      photos = [{k: v for k, v in p.items() if k != 'number'} for p in per_photo]
      with atomic_file(as_path(workdir) / 'eval' / f'held_out_{step}.json') as tmp:
        tmp.write_text(json.dumps({**result, 'photos': photos}, indent=2) + '\n')
      writer.write_scalars(step, result)
    return result

  def eval_line(self, result: dict) -> str:
    line = (f'held-out reward {result.get("held_out/reward", float("nan")):.4f} '
            f'({result.get("held_out/photos_rewarded", 0)} photos)')
    if self.evaluation is not None:
      line += f'; eval on {self.config.eval.split}: {trainer._eval_line(result)}'
    return line


def _plain(x):
  """JSON for numpy scalars in the audit."""
  return x.item() if hasattr(x, 'item') else str(x)
