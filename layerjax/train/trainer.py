"""The training loop: sharded state, the jitted step, Orbax checkpoints with the loader's state,
metrics, periodic evaluation, preemption and NaN handling.

State (one pytree, checkpointed whole): step, params (the decomposer minus the frozen VAE),
EMA params, optimizer state and the base PRNG key; the step's key is `fold_in(key, step)`,
so a resumed run draws exactly what an uninterrupted one would. The Grain iterator's state
is saved next to it (`data`), so the loader resumes at the next batch. Checkpoints are
async (Orbax `CheckpointManager`), keep the last `keep_checkpoints`, and are written on
SIGTERM before exiting (preemption; a SIGTERM to any one process of a multi-process run stops
all of them after the same step). Processes first check that they run the same code and
config (`agreement`). One run at a time trains in a workdir (its `.lock`); a re-run of a
finished run changes nothing. The run's config is recorded as `config.json` in the workdir,
which inference (`layerjax.infer.model`) rebuilds the model from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from layerjax import build, parallel
from layerjax.fileio import (OutputLocked, as_path, atomic_file, output_lock, read_json,
                             sweep)
from layerjax.data.pipeline import make_loader
from layerjax.evaluate import baselines
from layerjax.models.decomposer import TRAINABLE
from layerjax.checkpoints import CONFIG, Checkpoints, UnreadableCheckpoint, shapes
from layerjax.train import agreement, evaluate, objectives
from layerjax.train import config as train_config
from layerjax.train.writers import create_writer


def by_rule(params, rules, key: str, default) -> Any:
  """Per parameter, the value of the first (regex, value) in `rules` whose regex is found in
  its path ('alpha_head/conv_in/kernel'), `default` if none. A rule that matches nothing is
  an error naming the config `key` it came from."""
  rules = [(re.compile(pattern), value) for pattern, value in rules]
  used = set()

  def value(path, _):
    name = '/'.join(str(k.key if hasattr(k, 'key') else k.idx) for k in path
                    if hasattr(k, 'key') or hasattr(k, 'idx'))  # not a Variable's `.value`
    for i, (pattern, v) in enumerate(rules):
      if pattern.search(name):
        used.add(i)
        return v
    return default
  out = jax.tree_util.tree_map_with_path(value, params)
  unused = [rules[i][0].pattern for i in range(len(rules)) if i not in used]
  if unused:
    raise ValueError(f'{key}: {unused} match no trainable parameter')
  return out


def clip(opt, params) -> optax.GradientTransformation:
  """Gradient clipping to global norm `opt.clip_norm`; the parameters each regex of
  `opt.clip_groups` names (the first that matches, as `by_rule`) form a group clipped by its
  own norm, the others one group. A small network with its own loss (the demo's conv heads)
  clipped together with the transformer has its steps shrunk whenever the transformer's
  gradient is large, and learns only its easy cases."""
  if not opt.clip_groups:
    return optax.clip_by_global_norm(opt.clip_norm)
  groups = ('', *opt.clip_groups)  # '': the parameters no group names
  labels = by_rule(params, [(g, g) for g in opt.clip_groups], 'optimizer.clip_groups', '')
  return optax.multi_transform({g: optax.clip_by_global_norm(opt.clip_norm) for g in groups},
                               labels)


def make_optimizer(opt, params) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to `lr * final_lr_fraction`, after `clip`;
  `opt.lr_mults`, (regex, multiplier) rules as `by_rule` applies them, scale the steps of
  the parameters they name (big_vision's `lr_mults`)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.lr, max(opt.warmup_steps, 1), max(opt.decay_steps, opt.warmup_steps + 1),
      end_value=opt.lr * opt.final_lr_fraction)
  chain = [clip(opt, params),
           optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay)]
  if opt.lr_mults:
    mults = by_rule(params, [(p, float(m)) for p, m in opt.lr_mults], 'optimizer.lr_mults',
                    1.0)
    chain.append(optax.stateless(lambda updates, _: jax.tree.map(
        lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults)))
  return optax.chain(*chain)


def config_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh `config.mesh` asks for on `devices` (default: all), fitted to their number
  and the global batch (`parallel.fit_shape`), across `config.mesh_dcn` slices."""
  devices = list(jax.devices() if devices is None else devices)
  batch = config.data.global_batch_size
  shape = parallel.fit_shape(tuple(config.mesh), len(devices), batch, tuple(config.mesh_dcn))
  if config.mesh[0] == -1 and shape[2] > config.mesh[2]:
    logging.info('mesh %s on %d devices: data.global_batch_size=%d allows data x fsdp = %d, '
                 'the tensor axis takes the other devices; a larger global batch would use '
                 'them for data parallelism', shape, len(devices), batch, shape[0] * shape[1])
  return parallel.make_mesh(shape, devices, tuple(config.mesh_dcn))


def check_config(config, mesh: jax.sharding.Mesh | None = None) -> jax.sharding.Mesh:
  """The config's checks (`layerjax.train.config.check`), then those that need the mesh
  (`config_mesh` unless given, and returned): errors that would otherwise surface after
  minutes of loading and compiling, or never. Nothing is loaded."""
  train_config.check(config)
  mesh = mesh or config_mesh(config)
  n = mesh.shape['data'] * mesh.shape['fsdp']
  batch = config.data.global_batch_size
  if batch % n:
    raise ValueError(
        f'data.global_batch_size={batch} is not divisible by the data-parallel size {n} '
        f'(data x fsdp of mesh {dict(mesh.shape)}): set --config.data.global_batch_size='
        f'{n * -(-batch // n)} (a multiple of {n}), or a mesh whose data x fsdp divides {batch}')
  k = config.loss.estimate_every
  per_device = batch // n
  if per_device % k:
    raise ValueError(f'loss.estimate_every={k} must divide the per-device batch {per_device} '
                     f'(data.global_batch_size / data-parallel size {n}), so that every '
                     f'device keeps its own examples: set --config.loss.estimate_every='
                     f'{math.gcd(k, per_device)}')
  return mesh


@dataclasses.dataclass
class Setup:
  """Everything a step needs, placed on the mesh."""
  config: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  frozen: Any  # nnx.State: the VAE and buffers (not trained, not checkpointed)
  state: dict
  state_shardings: Any
  tx: optax.GradientTransformation


def create(config, mesh=None) -> Setup:
  """The checked config's state, placed on `mesh` (made from `config.mesh` unless given)."""
  return _place(config, check_config(config, mesh))


def _place(config, mesh: jax.sharding.Mesh, training: bool = True) -> Setup:
  """`training=False`: the state holds the step and the parameters only (no EMA copy, no
  optimizer moments), for a reader of trained weights."""
  model = build.build_model(config, config.seed)
  shardings = parallel.model_shardings(model, mesh)
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  params = jax.device_put(params, _shardings_for(params, shardings))
  frozen = jax.device_put(frozen, _shardings_for(frozen, shardings))
  tx = make_optimizer(config.optimizer, params)
  state = {'step': jnp.int32(0), 'params': params}
  if training:
    state.update(ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                 rng=jax.random.PRNGKey(config.seed))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer moments follow their parameters; scalars (counts, step, key) are replicated.
  state_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
                          and x.ndim else replicated, state)
  state = jax.device_put(state, state_sh)  # committed, so every step sees the same layout
  return Setup(config, mesh, graphdef, frozen, state, state_sh, tx)


def _shardings_for(part: nnx.State, shardings: nnx.State):
  """The entries of `shardings` (for the whole model) for one part of an `nnx.split`."""
  flat = dict(nnx.to_flat_state(shardings))
  return jax.tree.unflatten(jax.tree.structure(part),
                            [flat[path] for path, _ in nnx.to_flat_state(part)])


def apply_gradients(state: dict, grads, tx: optax.GradientTransformation,
                    ema_decay: float) -> tuple[Any, Any, Any]:
  """One optimizer step of `state`'s params and their EMA (its decay warmed up over the first
  steps): (params, ema, opt_state)."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  n = state['step'].astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1 + n) / (10 + n))
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state['ema'], params)
  return params, ema, opt_state


def make_step(setup: Setup) -> Callable:
  cfg = setup.config
  graphdef, tx = setup.graphdef, setup.tx

  def step(state, frozen, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])

    def loss(params):
      return objectives.loss_fn(nnx.merge(graphdef, params, frozen), batch, rng, cfg.loss)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
    params, ema, opt_state = apply_gradients(state, grads, tx, cfg.ema_decay)
    metrics['grad_norm'] = optax.global_norm(grads)
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    new = {'step': state['step'] + 1, 'params': params, 'ema': ema, 'opt_state': opt_state,
           'rng': state['rng']}
    # A non-finite step leaves the state as it was; the loop stops and reports it.
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, {**metrics, 'finite': finite}

  return jax.jit(step, out_shardings=(setup.state_shardings, None), donate_argnums=0)


class _Preemption:
  """Whether to save and exit after a step, decided at the same step on every process.

  Several processes: the preemption sync manager that `jax.distributed.initialize` starts
  catches a SIGTERM to any of them, tells the others and agrees on a step (the latest any of
  them has reached, plus one) at which `reached_preemption_sync_point` answers True on all;
  asking it each step communicates nothing. A SIGTERM handler of our own would replace its
  handler and let the signalled process stop alone, the others hanging in the next step's
  collectives. One process: SIGTERM sets a flag, read at the next step boundary.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: preemption is the caller's business
        self._previous = None
    return self

  def _handle(self, *_):
    self.requested = True

  def reached(self, count: int) -> bool:
    """Whether to stop after this run's step `count` (0, 1, ...: asked for every step, in
    order, on every process). Counted from 0 in every run, not the global step: the sync
    manager's safe step is the processes' last count plus one, and a resumed run's first
    global step would lie past a safe step agreed before its first call."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(count)
    return self.requested

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLoss(FloatingPointError):
  pass


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


@contextlib.contextmanager
def _workdir_lock(workdir):
  """Process 0 holds the workdir's lock (`fileio.output_lock`); every process learns whether
  it got it, so all of them stop together when another run holds it."""
  with contextlib.ExitStack() as stack:
    error = ''
    if jax.process_index() == 0:
      try:
        stack.enter_context(output_lock(workdir))
      except OutputLocked as e:
        error = str(e)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
      if refused and not error:
        error = f'{workdir}: in use by another run (see process 0)'
    if error:
      raise OutputLocked(error)
    yield


def _finished_result(workdir, step: int, total: int) -> dict:
  logging.info('%s: already trained to step %d of %d; nothing to do', workdir, step, total)
  path = workdir / 'train_result.json'
  return read_json(path) if path.is_file() else {'step': step}


def train_data_config(config) -> ml_collections.ConfigDict:
  """The train loader's config: `data`, with the loss's condition dropout (evaluation
  never drops)."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.cond_dropout = config.loss.cond_dropout
  return d


def train(config, workdir, *, mesh=None) -> dict:
  """Trains to `config.total_steps` (resuming from `workdir` if it holds checkpoints).

  Returns the last logged metrics and evaluation; for a run already at `total_steps`, the
  result it recorded, with nothing written. Raises `NonFiniteLoss` naming the step and the
  terms that were not finite; the last good checkpoint is kept.
  """
  workdir = as_path(workdir)  # `gs://...` stays a URL
  agreement.check(config)  # first: processes with other configs would check other things
  mesh = check_config(config, mesh)
  # Data first: a missing dataset or split is an error before minutes of model building.
  loader = make_loader(train_data_config(config), 'train', mesh)
  if config.eval_every:
    make_loader(evaluate.eval_data_config(config, mesh), config.eval.split, mesh)
  with _workdir_lock(workdir):
    return run(config, workdir, mesh, lambda: Supervised(config, mesh, loader))


class Supervised:
  """The loop's program for training on layered data: the jitted `make_step` on the
  loader's batches. A program (see `run`) has `setup`, the checkpointed `iterator`,
  `step(state, step) -> (state, metrics)` (metrics with 'loss' and 'finite', arrays that may
  still be computing), `flops` (of one step, or None), `examples` (per step), `evaluate(state,
  step, workdir, writer) -> dict`, `eval_line(result) -> str`, `before_save(step)` and
  `eval_at_start` (evaluate a fresh run's starting state too) and `log_keys`."""

  eval_at_start = False
  log_keys = ()  # metrics besides the loss on the terminal's progress line

  def __init__(self, config, mesh, loader):
    self.config = config
    self.setup = _place(config, mesh)  # `train` checked the config
    self.text_fn = build.text_inputs(config)
    self.iterator = iter(loader)
    self.step_fn = None  # made at the first step: a bad checkpoint is found before compiling
    self.evaluation = evaluate.Evaluation(self.setup, config) if config.eval_every else None
    self.flops = None
    self.examples = config.data.global_batch_size

  def step(self, state, step: int):
    batch = parallel.global_batch(build.model_batch(next(self.iterator), self.text_fn),
                                  self.setup.mesh)
    if self.step_fn is None:
      # Compiled once from its lowering, which also gives the FLOPs: lowering it for the
      # FLOPs and then calling the jitted function lowered it twice (~4 s a tiny test run).
      self.step_fn = make_step(self.setup).lower(state, self.setup.frozen, batch).compile()
      self.flops = _flops(self.step_fn)
    return self.step_fn(state, self.setup.frozen, batch)

  def evaluate(self, state, step: int, workdir, writer) -> dict:
    return self.evaluation.run(state, self.config.eval.split, workdir, step, writer)

  def eval_line(self, result: dict) -> str:
    return f'eval on {self.config.eval.split}: {_eval_line(result)}'

  def before_save(self, step: int) -> None:
    pass


def run(config, workdir, mesh, make_program: Callable[[], Any]) -> dict:
  """The training loop around a program (`Supervised`'s docstring): restore, step, log,
  evaluate, checkpoint (with the program's data iterator), stop on SIGTERM or a non-finite
  step. The program is made after the workdir is prepared and before the restore."""
  total = config.total_steps
  ckpt = Checkpoints(workdir / 'checkpoints', config.keep_checkpoints, config.async_checkpoints)
  start = ckpt.latest()
  if start is not None and start >= total:
    ckpt.close()
    return _finished_result(workdir, start, total)
  for folder in (workdir, workdir / 'eval', workdir / 'samples'):
    sweep(folder)  # what a killed run's `atomic_file`s left
  program = make_program()
  setup = program.setup
  state = setup.state
  if start is not None:
    state = restore(ckpt, start, state, config, workdir, program.iterator)
    logging.info('resumed from step %d', start)
  # After the restore: a config its checkpoints do not fit leaves the run's record as it was.
  if jax.process_index() == 0:  # what `layerjax.infer.model` rebuilds the model from
    with atomic_file(workdir / CONFIG) as tmp:
      tmp.write_text(json.dumps(config.to_dict(), indent=2) + '\n')
  start = int(state['step'])
  writer = create_writer(workdir / 'tensorboard', enabled=jax.process_index() == 0)
  result: dict = {}
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  pending = None  # (step, metrics) of the last dispatched step, checked one step late

  def check(pending):
    step, metrics = pending
    metrics = jax.device_get(metrics)
    if not metrics['finite']:
      bad = sorted(k for k, v in metrics.items() if k != 'finite' and not np.isfinite(v))
      # Numbered as the log numbers steps: the count of steps finished with this one.
      raise NonFiniteLoss(f'step {step + 1}/{total}: non-finite {bad}; training stopped, '
                          f'last good checkpoint: step {ckpt.latest()} in '
                          f'{workdir / "checkpoints"}')
    return metrics

  t_log, steps_since = time.perf_counter(), 0
  # Closed however the loop ends (a NaN stop included): in-flight saves finish.
  with jax.set_mesh(setup.mesh), _Preemption() as preempt, contextlib.closing(ckpt), \
      contextlib.closing(writer):
    if start == 0 and program.eval_at_start and config.eval_every:
      result['eval'] = program.evaluate(state, 0, workdir, writer)
      logging.info('at step 0, %s', program.eval_line(result['eval']))
      t_log = time.perf_counter()
    for step in range(start, total):
      state, metrics = program.step(state, step)
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      steps_since += 1
      done = step + 1
      log = done % config.log_every == 0 or done == total
      run_eval = config.eval_every and (done % config.eval_every == 0 or done == total)
      # Read once: a SIGTERM arriving later in this step is handled at the next one, so a
      # stop is never logged as saved without the save.
      stop = preempt.reached(step - start)
      save = done % config.checkpoint_every == 0 or done == total or stop
      if not (log or run_eval or save):
        continue
      logged, pending = check(pending), None  # nothing is logged or saved unchecked
      if log:
        dt = time.perf_counter() - t_log
        rate = steps_since / dt
        scalars = {k: float(v) for k, v in logged.items() if k != 'finite'}
        scalars.update({'steps_per_s': rate, 'examples_per_s': rate * program.examples,
                        'tflops_per_s': (program.flops or 0) * rate / 1e12})
        writer.write_scalars(done, scalars)
        extra = ''.join(f'  {k} {scalars[k]:.4f}' for k in program.log_keys)
        logging.info('step %d/%d  loss %.4f%s  %.2f steps/s  %.1f examples/s  %.3f TFLOP/s  '
                     'ETA %s', done, total, scalars['loss'], extra, rate,
                     scalars['examples_per_s'], scalars['tflops_per_s'],
                     _format_eta((total - done) / rate))
        result['train'] = scalars
        t_log, steps_since = time.perf_counter(), 0
      if run_eval:
        result['eval'] = program.evaluate(state, done, workdir, writer)
        logging.info('at step %d, %s', done, program.eval_line(result['eval']))
        t_log, steps_since = time.perf_counter(), 0
      if save:
        program.before_save(done)
        ckpt.save(done, state, program.iterator, wait=stop)
      if stop:
        logging.warning('SIGTERM: saved step %d, exiting', done)
        result['preempted_at'] = done
        break
  result['step'] = int(state['step'])
  if jax.process_index() == 0:
    with atomic_file(workdir / 'train_result.json') as tmp:
      tmp.write_text(json.dumps(result, indent=2, default=float) + '\n')
  return result


def _eval_line(result: dict) -> str:
  """Alpha IoU per non-background layer against the trivial baseline's, and the
  recomposition error: one line."""
  model, base = f'{evaluate.MODEL}/layers/', f'{baselines.TRIVIAL}/layers/'
  parts = [f'{k[len(model):-len("/alpha_iou")]} IoU {v:.3f} (baseline '
           f'{result.get(base + k[len(model):], float("nan")):.3f})'
           for k, v in sorted(result.items())
           if k.startswith(model) and k.endswith('/alpha_iou') and 'background' not in k
           and k[len(model):].count('/') == 1]  # per layer, not the mean over layers
  if model + 'recompose_l1' in result:
    parts.append(f'recomposition L1 {result[model + "recompose_l1"]:.3f}')
  return ', '.join(parts)


def _flops(compiled) -> float | None:
  """FLOPs of one step of the whole (global) program, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else None


def restore_for_eval(config, workdir, mesh=None) -> tuple[Setup, dict, int]:
  """The latest checkpoint in `workdir`, as evaluation reads it (`--mode=eval`): the setup with
  its frozen parts, the state {'step', and 'ema' if `eval.use_ema` else 'params'}, the step.
  Nothing else is read or held: the whole train state is four copies of the weights."""
  agreement.check(config)
  setup = _place(config, check_config(config, mesh), training=False)
  ckpt = Checkpoints(as_path(workdir) / 'checkpoints', config.keep_checkpoints, False)
  step = ckpt.latest()
  if step is None:
    raise FileNotFoundError(f'{workdir}/checkpoints: no checkpoint to evaluate')
  key = 'ema' if config.eval.use_ema else 'params'
  # The random initial weights go before the trained ones come.
  target = shapes({'step': setup.state['step'], key: setup.state['params']})
  setup.state = target
  state = restore(ckpt, step, target, config, workdir, partial=True)
  ckpt.close()
  return setup, state, step


def restore(ckpt: Checkpoints, step: int, state: dict, config, workdir, iterator=None,
            partial: bool = False) -> dict:
  """`ckpt.restore`; when the step cannot be read and the run in `workdir` recorded another
  config, the `UnreadableCheckpoint` also names the keys that differ (a workdir trained
  before the model or its optimizer changed, e.g. an old `make demo`'s)."""
  try:
    return ckpt.restore(step, state, iterator, partial)
  except UnreadableCheckpoint as e:
    changes = config_changes(config, workdir)
    if not changes:
      raise
    shown = '; '.join(changes[:6]) + (f'; {len(changes) - 6} more' if len(changes) > 6 else '')
    raise UnreadableCheckpoint(
        f'{e}. The run was trained with another config ({as_path(workdir) / CONFIG}: '
        f'{shown}): if that changes the model or its optimizer, train in a new workdir') from e


def config_changes(config, workdir) -> list[str]:
  """'key: recorded -> ours' for each dotted key whose value in `config` differs from the
  config the run in `workdir` recorded (its config.json); [] when it recorded none or one
  that cannot be read (the caller's error stands alone)."""
  try:
    theirs = read_json(as_path(workdir) / CONFIG)
  except (FileNotFoundError, ValueError):
    return []
  if not isinstance(theirs, dict):
    return []
  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out
  # Through JSON, as the run recorded it: tuples become lists.
  ours, theirs = flat(json.loads(json.dumps(config.to_dict()))), flat(theirs)
  absent = object()
  show = lambda v: '(absent)' if v is absent else json.dumps(v)
  return [f'{k}: {show(theirs.get(k, absent))} -> {show(ours.get(k, absent))}'
          for k in sorted(ours.keys() | theirs.keys())
          if ours.get(k, absent) != theirs.get(k, absent)]
