"""One SD3 MMDiT training step: diffusers/PyTorch eager and `torch.compile` against layerjax
under `jax.jit`, in one run.

What it measures
----------------
One training step = forward, backward and an AdamW update of an SD3-shaped
`SD3Transformer2DModel` on a flow-matching (rectified-flow) regression loss:

    x_t = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,
    loss = mean((model(x_t, text, pooled, 1000 * sigma) - target) ** 2)

The comparison is kept fair:

* the SAME weights: diffusers builds the model with a fixed torch seed, `save_pretrained`s it
  to a temporary folder, and layerjax loads that folder with `load_transformer`;
* the SAME inputs and fixed random target (numpy, NCHW for torch, NHWC for jax);
* the SAME optimiser: `torch.optim.AdamW` and `optax.adamw`, both with lr 1e-4, betas
  (0.9, 0.999), eps 1e-8, weight decay 0.01 (decoupled), on all trainable parameters; the
  position-embedding table is a buffer on both sides and is not trained;
* the SAME number of steps on both sides, fp32 by default (`--dtype bfloat16`: bf16 compute
  with fp32 parameters, i.e. `torch.autocast` against layerjax's `dtype=bfloat16`).

The torch side is eager mode (`model.train()`, `loss.backward()`, `opt.step()`,
`opt.zero_grad(set_to_none=True)`) and, as a third column, the same loop with the model and
the optimiser's step under `torch.compile` (inductor, `--torch-compile-mode`, default
'default'): the model's forward and its AOTAutograd backward are compiled graphs, `opt.step`
a few generated fused kernels over all parameters. It starts from a copy of the same initial
weights; its compile time is the first step's wall time, reported apart from the timed steps.
`--no-compile` skips it. The jax side is a pure `jax.jit` function of
(params, opt_state, buffers, batch) built with `nnx.split` / `nnx.merge`, with params and
optimiser state donated. Times are medians over `--steps` timed steps after `--warmup`
untimed ones (jax compile time is reported separately); the clock stops after
`torch.cuda.synchronize()` / `jax.block_until_ready`.

Printed: each side's ms/step and the ratios eager / jax and compile / jax (> 1 means layerjax
is faster), both compile times, the CPU's model name and vector extensions, the FLOPs
of one step counted by XLA (`cost_analysis`) and estimated analytically (3 x forward
matmul FLOPs), layerjax's achieved FLOP/s and its fraction of the matmul peak measured in
the same run (a jitted square `jnp.dot`), and the first-step and last losses of all sides
with their relative difference to eager (same weights and data: ~1e-6 in fp32). `--json`
keeps every timing list as well.

`--compile-only` builds the jax model from shapes alone (no weights, no torch) and prints how
long lowering and XLA compilation of the train step take, e.g. at SD3-medium's shapes:
`--compile-only --layers 24 --heads 24 --joint-dim 4096 --pooled-dim 2048 --latent 64
--text-tokens 333 --pos-embed-max-size 192 --sample-size 128`.

`--profile` adds where the time goes on the jax side: forward only / forward+backward /
optimiser update alone, the step with attention replaced by a no-op (so the difference is
what attention costs), an isolated attention forward+backward, the time the matmul FLOPs
would take at the measured peak, the same phase split for torch, and a per-op breakdown of
one step from a `jax.profiler` trace (kept in `--trace-dir` if given), with the largest single
XLA instructions and their operand counts.

Caveats: run it on an otherwise idle machine (a warning is printed when other processes keep
the CPUs busy; torch's OpenMP threads slow down many-fold under contention). On GPUs XLA's
`cost_analysis` leaves out matmuls run as cuBLAS calls, so the analytic count is used there.
`--flat-args` passes params / optimiser state to the jitted step as flat lists of arrays
instead of `nnx.State` pytrees, which saves milliseconds of host time per call (visible on
GPUs, where a step takes ~10 ms).

Run
---
    python bench/mmdit_step.py                       # defaults: 8 layers, width 384, batch 4
    python bench/mmdit_step.py --sd35 --profile      # SD3.5-style blocks, plus the breakdown
    python bench/mmdit_step.py --dtype bfloat16 --json out/mmdit_step.json
    python bench/mmdit_step.py --torch-compile-mode max-autotune-no-cudagraphs
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python bench/mmdit_step.py   # XLA flags pass

`--threads N` sets `torch.set_num_threads(N)` and, where fewer than all cores, pins the whole
process to N cores (XLA sizes its CPU thread pool from the cores it may run on), so both
frameworks get the same cores. On a GPU machine, jax uses its default device and torch
`--torch-device` (default 'cuda' when available).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from layerjax import host  # noqa: E402


def usable_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  a = p.add_argument
  a('--layers', type=int, default=8)
  a('--heads', type=int, default=6)
  a('--head-dim', type=int, default=64)
  a('--latent', type=int, default=32, help='latent height = width')
  a('--channels', type=int, default=16)
  a('--patch', type=int, default=2)
  a('--text-tokens', type=int, default=77)
  a('--joint-dim', type=int, default=256, help='joint_attention_dim (text feature width)')
  a('--pooled-dim', type=int, default=256, help='pooled_projection_dim')
  a('--pos-embed-max-size', type=int, default=32)
  a('--sample-size', type=int, default=32)
  a('--batch', type=int, default=4)
  a('--sd35', action='store_true',
    help="SD3.5 blocks: dual attention on the first half of the layers, qk_norm='rms_norm'")
  a('--steps', type=int, default=5, help='timed steps per side')
  a('--warmup', type=int, default=2, help='untimed steps per side (at least 1: the first '
    'one is the loss check; after jax compilation)')
  a('--dtype', choices=('float32', 'bfloat16'), default='float32',
    help='compute dtype; parameters and optimiser state stay fp32')
  a('--remat', action='store_true',
    help='rematerialise each block (layerjax remat=True, diffusers gradient checkpointing)')
  a('--blocks', choices=('auto', 'scan', 'unroll'), default='auto',
    help="layerjax's loop over the blocks (MMDiTConfig.unroll): auto unrolls it on a CPU")
  a('--threads', type=int, default=usable_cpus(), help='CPU threads (see module doc)')
  a('--torch-device', default=None, help="default 'cuda' if available else 'cpu'")
  a('--peak-n', type=int, default=None, help='matrix size of the peak matmul '
    '(default 2048 on CPU, 8192 on accelerators)')
  a('--flat-args', action='store_true', help='pass params / optimiser state to the jitted '
    'step as flat lists of arrays instead of nnx.State pytrees (less host overhead per call)')
  a('--no-compile', action='store_true', help='skip the torch.compile column')
  a('--torch-compile-mode', default='default',
    help="torch.compile mode: 'default', 'max-autotune-no-cudagraphs', 'max-autotune', ...")
  a('--compile-only', action='store_true', help='jax only: lower and compile the step from '
    'abstract shapes (no weights, no torch) and print the compile time')
  a('--profile', action='store_true', help='also break the jax step time down')
  a('--trace-dir', default=None, help='with --profile: keep the jax.profiler trace here')
  a('--seed', type=int, default=0)
  a('--json', default=None, metavar='PATH', help='also write the results as JSON')
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None:
  host.reexec()  # before jax and torch allocate (layerjax/host.py)

# Pin before jax/torch start their thread pools.
if ARGS is not None and ARGS.threads < usable_cpus() and hasattr(os, 'sched_setaffinity'):
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from layerjax.convert.diffusers import load_transformer  # noqa: E402
from layerjax.models import mmdit  # noqa: E402
from layerjax.models.common import abstract  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
UNROLL = {'auto': None, 'scan': False, 'unroll': True}  # --blocks


# --- configuration, data, FLOPs --------------------------------------------------------------

def diffusers_config(args) -> dict:
  width = args.heads * args.head_dim
  return dict(
      sample_size=args.sample_size, patch_size=args.patch, in_channels=args.channels,
      num_layers=args.layers, attention_head_dim=args.head_dim, num_attention_heads=args.heads,
      joint_attention_dim=args.joint_dim, caption_projection_dim=width,
      pooled_projection_dim=args.pooled_dim, out_channels=args.channels,
      pos_embed_max_size=args.pos_embed_max_size,
      dual_attention_layers=tuple(range(args.layers // 2)) if args.sd35 else (),
      qk_norm='rms_norm' if args.sd35 else None)


def make_batch(args) -> dict[str, np.ndarray]:
  """Flow-matching inputs and velocity target, NCHW (torch layout), fp32."""
  rng = np.random.default_rng(args.seed)
  shape = (args.batch, args.channels, args.latent, args.latent)
  x0 = rng.standard_normal(shape, np.float32)
  noise = rng.standard_normal(shape, np.float32)
  sigma = rng.uniform(0.02, 0.98, args.batch).astype(np.float32)
  s = sigma[:, None, None, None]
  return dict(
      x=((1 - s) * x0 + s * noise).astype(np.float32),
      text=rng.standard_normal((args.batch, args.text_tokens, args.joint_dim), np.float32),
      pooled=rng.standard_normal((args.batch, args.pooled_dim), np.float32),
      t=(sigma * 1000).astype(np.float32),
      target=(noise - x0).astype(np.float32))


def forward_matmul_flops(cfg: dict, batch: int, height: int, width_px: int,
                         text_tokens: int) -> dict[str, float]:
  """Multiply-add FLOPs (2 per MAC) of one forward pass, split into linears and attention."""
  b, t = batch, text_tokens
  w, p = cfg['caption_projection_dim'], cfg['patch_size']
  n = (height // p) * (width_px // p)
  c_in, c_out = cfg['in_channels'], cfg['out_channels']
  lin = lambda tokens, i, o: 2.0 * b * tokens * i * o
  linear = (lin(n, p * p * c_in, w)                       # patch-embedding conv
            + lin(t, cfg['joint_attention_dim'], w)        # context_embedder
            + lin(1, 256, w) + lin(1, w, w)                # timestep embedder
            + lin(1, cfg['pooled_projection_dim'], w) + lin(1, w, w)  # pooled-text embedder
            + lin(1, w, 2 * w) + lin(n, w, p * p * c_out))  # norm_out, proj_out
  attention = 0.0
  layers = cfg['num_layers']
  for i in range(layers):
    last, dual = i == layers - 1, i in cfg['dual_attention_layers']
    linear += lin(1, w, (9 if dual else 6) * w) + lin(1, w, (2 if last else 6) * w)  # adaLN
    linear += lin(n, w, 3 * w) + lin(t, w, 3 * w) + lin(n, w, w)  # q/k/v both streams, to_out
    linear += lin(n, w, 4 * w) + lin(n, 4 * w, w)                 # image MLP
    if not last:
      linear += lin(t, w, w) + lin(t, w, 4 * w) + lin(t, 4 * w, w)  # to_add_out, text MLP
    attention += 2 * 2.0 * b * (n + t) ** 2 * w                     # QK^T and PV, joint
    if dual:
      linear += lin(n, w, 3 * w) + lin(n, w, w)
      attention += 2 * 2.0 * b * n * n * w
  return dict(linear=linear, attention=attention, total=linear + attention)


def xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def cpu_info() -> dict:
  """The CPU's model name and the vector extensions that decide matmul speed (Linux)."""
  try:
    text = Path('/proc/cpuinfo').read_text()
  except OSError:
    return {}
  field = lambda key: next((line.split(':', 1)[1].strip() for line in text.splitlines()
                            if line.startswith(key)), '')
  flags = set(field('flags').split())
  wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')
  return dict(model_name=field('model name'), cores=os.cpu_count(),
              flags={f: f in flags for f in wanted})


# --- timing ----------------------------------------------------------------------------------

def timed(fn, n: int, sync) -> list[float]:
  """Wall-clock seconds of `n` calls of `fn`, each followed by `sync(result)`."""
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    sync(fn())
    out.append(time.perf_counter() - t0)
  return out


def jax_sync(x):
  jax.block_until_ready(x)


def median_time(fn, n: int, warmup: int, sync) -> float:
  timed(fn, warmup, sync)
  return statistics.median(timed(fn, n, sync))


def matmul_peak(n: int, dtype, reps: int = 5) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] in `dtype` (precision HIGHEST, as the model's linears)."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys)
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
  return 2.0 * n ** 3 / median_time(lambda: f(a, b), reps, 2, jax_sync)


def other_cpu_load(seconds: float = 1.0) -> float | None:
  """Busy fraction of all CPUs over `seconds` while this process sleeps (Linux only)."""
  def sample():
    with open('/proc/stat') as f:
      v = [float(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait
  try:
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
  except OSError:
    return None
  return 1.0 - (i1 - i0) / max(t1 - t0, 1e-9)


# --- torch side ------------------------------------------------------------------------------

class TorchSide:
  """The diffusers model, an AdamW optimiser and one batch on `device`, run eagerly or, with
  `compile_mode` (a `torch.compile` mode such as 'default' or 'max-autotune-no-cudagraphs'),
  through inductor: the model's forward and, by AOTAutograd, its backward are compiled, and
  so is the optimiser's step (fused generated kernels over all parameters instead of a Python
  loop of small ops). Compilation happens during the first `step()`.
  """

  def __init__(self, model, batch: dict, args, device: str, compile_mode: str | None = None):
    self.device = torch.device(device)
    self.model = model.to(self.device).train()
    if args.remat:
      self.model.enable_gradient_checkpointing()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                 weight_decay=WEIGHT_DECAY)
    self.forward = self.model
    self.opt_step = self.opt.step
    if compile_mode is not None:
      self.forward = torch.compile(self.model, mode=compile_mode)
      self.opt_step = torch.compile(self.opt.step, mode=compile_mode)
    self.batch = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
    self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                     if args.dtype == 'bfloat16' else contextlib.nullcontext())

  def sync(self, _=None):
    if self.device.type == 'cuda':
      torch.cuda.synchronize(self.device)

  def loss(self, model=None):
    b = self.batch
    with self.autocast:
      out = (model or self.forward)(
          hidden_states=b['x'], encoder_hidden_states=b['text'], pooled_projections=b['pooled'],
          timestep=b['t'], return_dict=False)[0]
    return torch.mean((out.float() - b['target']) ** 2)

  def eager_loss(self) -> float:
    """The loss at the current weights by the eager model (no recompilation for no_grad)."""
    with torch.no_grad():
      return float(self.loss(self.model))

  def step(self):
    loss = self.loss()
    loss.backward()
    self.opt_step()
    self.opt.zero_grad(set_to_none=True)
    return loss.detach()

  def forward_only(self):
    with torch.no_grad():
      return self.loss()

  def forward_backward(self):
    loss = self.loss()
    loss.backward()
    self.model.zero_grad(set_to_none=True)
    return loss.detach()


def run_torch(side: TorchSide, args, name: str) -> dict:
  """Warm-up (the first step compiles under torch.compile), timed steps and the losses."""
  t0 = time.perf_counter()
  losses = [float(side.step())]
  first_step_s = time.perf_counter() - t0
  losses += [float(side.step()) for _ in range(args.warmup - 1)]
  times = timed(side.step, args.steps, side.sync)
  losses.append(side.eager_loss())  # the loss after the last timed step
  step_s = statistics.median(times)
  print(f'{name + ":":15s}{1e3 * step_s:8.1f} ms/step (min {1e3 * min(times):.1f}, '
        f'max {1e3 * max(times):.1f}); first step {first_step_s:.2f} s')
  return dict(step_s=step_s, times_ms=[1e3 * t for t in times], first_step_s=first_step_s,
              losses=losses)


# --- jax side --------------------------------------------------------------------------------

class JaxSide:
  """The model as (graphdef, params, buffers) and a jitted, donating train step.

  With `flat=True` params and optimiser state cross the `jit` boundary as flat lists of
  arrays (unflattened inside): flattening `nnx.State` pytrees of Variables in Python costs
  milliseconds per call, which matters when the step itself takes a few (GPUs).
  """

  def __init__(self, model, batch: dict, flat: bool = False):
    self.graphdef, params, self.buffers = nnx.split(model, nnx.Param, ...)
    self.tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    # An abstract model (shapes only, `--compile-only`) gets an abstract optimiser state.
    opt_state = jax.eval_shape(self.tx.init, params) if any(
        isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)
    ) else self.tx.init(params)
    self.flat = flat
    self.params_def = jax.tree.structure(params)
    self.opt_def = jax.tree.structure(opt_state)
    self.params, self.opt_state = self.unstructure(params, opt_state)
    nhwc = lambda a: jnp.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
    self.batch = dict(x=nhwc(batch['x']), target=nhwc(batch['target']),
                      text=jnp.asarray(batch['text']), pooled=jnp.asarray(batch['pooled']),
                      t=jnp.asarray(batch['t']))
    self.step_fn = jax.jit(self.train_step, donate_argnums=(0, 1))

  def structure(self, params, opt_state=None):
    if not self.flat:
      return params, opt_state
    return (jax.tree.unflatten(self.params_def, params),
            None if opt_state is None else jax.tree.unflatten(self.opt_def, opt_state))

  def unstructure(self, params, opt_state):
    if not self.flat:
      return params, opt_state
    return jax.tree.leaves(params), jax.tree.leaves(opt_state)

  def loss_fn(self, params, buffers, batch):
    model = nnx.merge(self.graphdef, self.structure(params)[0], buffers)
    out = model(batch['x'], batch['text'], batch['pooled'], batch['t'])
    return jnp.mean(jnp.square(out.astype(jnp.float32) - batch['target']))

  def update(self, params, opt_state, grads):
    """One AdamW update; arguments and results in the jit-boundary format."""
    params, opt_state = self.structure(params, opt_state)
    grads = self.structure(grads)[0]
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return self.unstructure(optax.apply_updates(params, updates), opt_state)

  def train_step(self, params, opt_state, buffers, batch):
    loss, grads = jax.value_and_grad(self.loss_fn)(params, buffers, batch)
    return (*self.update(params, opt_state, grads), loss)

  def compile(self):
    """AOT-compiles the step; returns (seconds, XLA FLOPs)."""
    t0 = time.perf_counter()
    self.compiled = self.step_fn.lower(self.params, self.opt_state, self.buffers,
                                       self.batch).compile()
    return time.perf_counter() - t0, xla_flops(self.compiled)

  def step(self):
    self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state,
                                                      self.buffers, self.batch)
    return loss


# --- the --profile breakdown -----------------------------------------------------------------

def _no_attention(q, k, v):
  return v  # same shapes and data flow, none of the attention's FLOPs


def jax_breakdown(side: JaxSide, args, cfg, fwd_flops, peak, step_s) -> dict:
  n, w = args.steps, args.warmup
  p, bf, bt = side.params, side.buffers, side.batch
  fwd = jax.jit(side.loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(side.loss_fn))
  out = {'step_s': step_s}
  out['forward_s'] = median_time(lambda: fwd(p, bf, bt), n, w, jax_sync)
  out['forward_backward_s'] = median_time(lambda: fwd_bwd(p, bf, bt), n, w, jax_sync)

  grads = fwd_bwd(p, bf, bt)[1]
  state = {'p': jax.tree.map(jnp.copy, p), 'o': jax.tree.map(jnp.copy, side.opt_state)}

  apply = jax.jit(side.update, donate_argnums=(0, 1))

  def opt_step():
    state['p'], state['o'] = apply(state['p'], state['o'], grads)
    return state['p']
  out['optimizer_s'] = median_time(opt_step, n, w, jax_sync)

  # Host-side cost of one call on these pytrees (flatten, dispatch, unflatten), no compute:
  # the donated inputs come straight back as outputs.
  noop = jax.jit(lambda params, opt_state, buffers, batch: (params, opt_state),
                 donate_argnums=(0, 1))
  state['p'], state['o'] = jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, side.opt_state)

  def noop_call():
    state['p'], state['o'] = noop(state['p'], state['o'], bf, bt)
    return state['p']
  out['host_overhead_s'] = median_time(noop_call, n, w, jax_sync)

  # The same step with attention replaced by `v`: the difference is attention's cost.
  original = mmdit.attention
  mmdit.attention = _no_attention
  try:
    no_attn = jax.jit(side.train_step, donate_argnums=(0, 1))

    def no_attn_step():
      state['p'], state['o'], loss = no_attn(state['p'], state['o'], bf, bt)
      return loss
    out['step_without_attention_s'] = median_time(no_attn_step, n, w, jax_sync)
  finally:
    mmdit.attention = original

  # Isolated attention forward+backward at the model's shapes, summed over the blocks.
  heads, hd = args.heads, args.head_dim
  tokens = (args.latent // args.patch) ** 2
  key = jax.random.key(1)
  dtype = jnp.dtype(args.dtype)

  def attn_time(length):
    q, k, v = (jax.random.normal(kk, (args.batch, length, heads, hd), dtype)
               for kk in jax.random.split(key, 3))
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(mmdit.attention(q, k, v).astype(jnp.float32)),
                         argnums=(0, 1, 2)))
    return median_time(lambda: g(q, k, v), n, w, jax_sync)
  n_dual = len(cfg['dual_attention_layers'])
  out['attention_isolated_s'] = (args.layers * attn_time(tokens + args.text_tokens)
                                 + (n_dual * attn_time(tokens) if n_dual else 0.0))
  out['matmuls_at_peak_s'] = 3 * fwd_flops['total'] / peak
  out['linears_at_peak_s'] = 3 * fwd_flops['linear'] / peak
  out['attention_matmuls_at_peak_s'] = 3 * fwd_flops['attention'] / peak
  return out


def torch_breakdown(side: TorchSide, args) -> dict:
  n, w = args.steps, args.warmup
  return {'forward_s': median_time(side.forward_only, n, w, side.sync),
          'forward_backward_s': median_time(side.forward_backward, n, w, side.sync)}


_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*.*?\s([a-z][\w-]*)\(')


def hlo_labels(hlo_text: str) -> tuple[dict[str, str], dict[str, int]]:
  """Instruction name -> 'what it computes (fwd|bwd) [kind]' from the optimised HLO.

  The label is the jax primitive recorded in the instruction's `op_name` metadata (for a
  fusion: of its root), whether it belongs to the backward pass (`transpose(jvp(...))`),
  and the instruction kind without its number (`ynn_fusion`, `copy_bitcast_fusion`, ...).
  """
  labels, operands = {}, {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    prim = op_name.group(1).rsplit('/', 1)[-1] if op_name else opcode
    phase = 'bwd' if op_name and 'transpose(' in op_name.group(1) else 'fwd'
    kind = re.sub(r'[.]\d+$', '', name)
    labels[name] = f'{prim} ({phase}) [{kind}]'
    start = line.index(opcode + '(') + len(opcode)
    depth, end = 0, start
    for end, ch in enumerate(line[start:], start):  # the matching ')' of the operand list
      depth += (ch == '(') - (ch == ')')
      if depth == 0:
        break
    operands[name] = line[start:end].count('%')
  return labels, operands


def trace_breakdown(side: JaxSide, steps: int, trace_dir: str | None) -> dict:
  """Per-op time of `steps` traced train steps from a `jax.profiler` trace.

  CPU: XLA's ops (thunks) on its worker threads, labelled from the compiled HLO; their
  durations are summed over threads (thread time), and `busy` is that sum over the traced
  wall time times the number of worker threads. GPU: the device's kernels.
  """
  tmp = None
  if trace_dir is None:
    tmp = tempfile.TemporaryDirectory()
    trace_dir = tmp.name
  labels, operands = hlo_labels(side.compiled.as_text() or '')
  try:
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      for _ in range(steps):
        jax_sync(side.step())
    finally:
      jax.profiler.stop_trace()
    files = sorted(Path(trace_dir).rglob('*.trace.json.gz'), key=os.path.getmtime)
    if not files:
      return {}
    with gzip.open(files[-1]) as f:
      data = json.load(f)
  finally:
    if tmp is not None:
      tmp.cleanup()
  events = data['traceEvents'] if isinstance(data, dict) else data
  meta = lambda kind: {(e.get('pid'), e.get('tid')) if kind == 'thread_name' else e.get('pid'):
                       e['args']['name'] for e in events
                       if e.get('ph') == 'M' and e.get('name') == kind}
  threads, processes = meta('thread_name'), meta('process_name')
  gpu_pids = {pid for pid, name in processes.items() if 'GPU' in name or 'device:' in name}
  totals, per_op, busy_threads = defaultdict(float), defaultdict(float), set()
  spans = []
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    name, key = e['name'], (e.get('pid'), e.get('tid'))
    if gpu_pids:
      if e.get('pid') not in gpu_pids:
        continue
    elif (threads.get(key) == 'python' or '::' in name or name.startswith(('$', 'end:'))
          or name not in labels):
      continue  # Python-side and runtime events (executor, thread-pool waits)
    totals[labels.get(name, name)] += e['dur'] * 1e-6 / steps
    per_op[name] += e['dur'] * 1e-6 / steps
    busy_threads.add(key)
    spans.append((e['ts'], e['ts'] + e['dur']))
  if not spans:
    return {}
  traced_s = (max(b for _, b in spans) - min(a for a, _ in spans)) * 1e-6
  workers = max(len(busy_threads), 1) if gpu_pids else len(os.sched_getaffinity(0))
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
  return dict(ops=sorted(totals.items(), key=lambda kv: -kv[1]),
              top_instructions=[(n, t, labels.get(n, ''), operands.get(n, 0)) for n, t in top],
              busy=sum(totals.values()) * steps / (traced_s * workers), workers=workers,
              wall_s=(time.perf_counter() - t0) / steps)


def compile_only(args, cfg) -> dict:
  """Lowers and compiles the jax step for an abstract model (no weights are made)."""
  config = mmdit.MMDiTConfig.from_diffusers(cfg, dtype=jnp.dtype(args.dtype), remat=args.remat,
                                            unroll=UNROLL[args.blocks])
  side = JaxSide(abstract(lambda rngs: mmdit.SD3Transformer2DModel(config, rngs=rngs)),
                 make_batch(args), flat=args.flat_args)
  t0 = time.perf_counter()
  lowered = side.step_fn.lower(side.params, side.opt_state, side.buffers, side.batch)
  t1 = time.perf_counter()
  flops = xla_flops(lowered.compile())
  t2 = time.perf_counter()
  print(f'jax train step: lower (trace) {t1 - t0:.1f} s, XLA compile {t2 - t1:.1f} s, '
        f'total {t2 - t0:.1f} s; XLA FLOPs/step {(flops or 0) / 1e9:.1f} G')
  return dict(jax_lower_s=t1 - t0, jax_xla_compile_s=t2 - t1, jax_compile_s=t2 - t0,
              flops_per_step_xla=flops)


# --- main ------------------------------------------------------------------------------------

def main(args) -> dict:
  from diffusers import SD3Transformer2DModel as TorchSD3

  args.warmup = max(1, args.warmup)
  torch.set_num_threads(args.threads)
  torch_device = args.torch_device or ('cuda' if torch.cuda.is_available() else 'cpu')
  jax_device = jax.devices()[0]
  dtype = jnp.dtype(args.dtype)
  cfg = diffusers_config(args)
  batch = make_batch(args)

  print(f'jax {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}), '
        f'torch {torch.__version__} on {torch_device} ({torch.get_num_threads()} threads), '
        f'{os.cpu_count()} CPUs visible, {usable_cpus()} usable')
  cpu = cpu_info()
  if cpu:
    print(f"CPU: {cpu['model_name']}, {cpu['cores']} cores; "
          + ', '.join(f'{f} {"yes" if v else "no"}' for f, v in cpu['flags'].items()))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  busy = other_cpu_load()
  if busy is not None and busy > 0.2:
    print(f'WARNING: other processes keep {busy:.0%} of the CPUs busy: timings (torch eager '
          'with its OpenMP threads especially) will be inflated and noisy.')
  print('config:', json.dumps(cfg), f'batch {args.batch}, {args.text_tokens} text tokens, '
        f'dtype {args.dtype}, remat {args.remat}, blocks {args.blocks}, '
        f'flat args {args.flat_args}')
  results = dict(config=cfg, args=vars(args), cpu=cpu, other_cpu_load=busy,
                 jax_platform=jax_device.platform, torch_device=torch_device)
  if args.compile_only:
    results.update(compile_only(args, cfg))
    return write_json(results, args.json)

  # Same weights on both sides: diffusers' seeded init, through a saved folder.
  torch.manual_seed(args.seed)
  torch_model = TorchSD3(**cfg)
  n_params = sum(p.numel() for p in torch_model.parameters())
  with tempfile.TemporaryDirectory() as folder:
    torch_model.save_pretrained(folder)
    jax_model = load_transformer(folder, dtype=dtype, remat=args.remat,
                                 unroll=UNROLL[args.blocks])
  n_jax = sum(x.size for x in jax.tree.leaves(nnx.state(jax_model, nnx.Param)))
  assert n_jax == n_params, (n_jax, n_params)
  print(f'{n_params / 1e6:.2f}M trainable parameters')

  fwd = forward_matmul_flops(cfg, args.batch, args.latent, args.latent, args.text_tokens)
  analytic = 3 * fwd['total']
  results['parameters'] = n_params

  # --- torch: eager, then torch.compile from the same initial weights ---
  compiled_model = None if args.no_compile else copy.deepcopy(torch_model)
  tside = TorchSide(torch_model, batch, args, torch_device)
  eager = run_torch(tside, args, 'torch eager')
  torch_s = eager['step_s']
  results['torch_eager'] = eager
  if compiled_model is not None:
    cside = TorchSide(compiled_model, batch, args, torch_device,
                      compile_mode=args.torch_compile_mode)
    results['torch_compile'] = run_torch(cside, args, 'torch.compile')
    del cside, compiled_model

  # --- jax ---
  jside = JaxSide(jax_model, batch, flat=args.flat_args)
  del jax_model
  compile_s, flops_xla = jside.compile()
  t0 = time.perf_counter()
  first = jside.step()
  jax_sync(first)
  first_call_s = time.perf_counter() - t0
  jax_losses = [float(first)] + [float(jside.step()) for _ in range(args.warmup - 1)]
  jax_times = timed(jside.step, args.steps, jax_sync)
  jax_s = statistics.median(jax_times)
  jax_losses.append(float(jax.jit(jside.loss_fn)(jside.params, jside.buffers, jside.batch)))
  print(f'{"layerjax jit:":15s}{1e3 * jax_s:8.1f} ms/step (min {1e3 * min(jax_times):.1f}, '
        f'max {1e3 * max(jax_times):.1f}); compile {compile_s:.1f} s, first call '
        f'{first_call_s:.2f} s')

  # --- peak, FLOPs, ratios ---
  peak_n = args.peak_n or (2048 if jax_device.platform == 'cpu' else 8192)
  peak = matmul_peak(peak_n, dtype)
  # XLA's count misses matmuls done by library calls (cuBLAS custom calls on GPUs).
  xla_ok = flops_xla is not None and flops_xla > 0.5 * analytic
  flops = flops_xla if xla_ok else analytic
  achieved = flops / jax_s
  ratio = torch_s / jax_s
  torch_losses = eager['losses']
  rel = abs(torch_losses[0] - jax_losses[0]) / abs(torch_losses[0])
  print()
  faster = lambda r: '(layerjax faster)' if r > 1 else '(layerjax slower)'
  print(f'speed-up vs eager (eager / jax):     {ratio:.2f}x {faster(ratio)}')
  if 'torch_compile' in results:
    tc = results['torch_compile']
    results['speedup_compile_over_jax'] = tc['step_s'] / jax_s
    print(f'speed-up vs compile (compile / jax): {tc["step_s"] / jax_s:.2f}x '
          f'{faster(tc["step_s"] / jax_s)}')
    print(f'compile times:            torch.compile {tc["first_step_s"]:.1f} s (first step), '
          f'jax {compile_s:.1f} s (+ {first_call_s:.2f} s first call)')
  print(f'FLOPs/step, XLA:          {flops_xla / 1e9:.1f} GFLOP' if flops_xla else
        'FLOPs/step, XLA:          unavailable')
  if flops_xla and not xla_ok:
    print('  (XLA does not count matmuls run by library calls such as cuBLAS: '
          'using the analytic count below)')
  print(f'FLOPs/step, analytic:     {analytic / 1e9:.1f} GFLOP  (3 x forward matmuls: '
        f'{fwd["linear"] / 1e9:.2f} linear + {fwd["attention"] / 1e9:.2f} attention GFLOP)')
  print(f'jax achieved:             {achieved / 1e9:.1f} GFLOP/s '
        f'({"XLA" if xla_ok else "analytic"} count)')
  print(f'torch achieved:           {flops / torch_s / 1e9:.1f} GFLOP/s (same count)')
  print(f'matmul peak ({peak_n}^2 {args.dtype}): {peak / 1e9:.1f} GFLOP/s')
  print(f'jax fraction of peak:     {achieved / peak:.1%}')
  sides = [('eager', torch_losses), ('jax', jax_losses)]
  if 'torch_compile' in results:
    sides.insert(1, ('compile', results['torch_compile']['losses']))
  for i, when in ((0, 'first-step loss'), (-1, f'loss after {args.warmup + args.steps} steps')):
    ref = sides[0][1][i]
    print(f'{when + ":":26s}' + '  '.join(
        f'{name} {losses[i]:.7f}' + ('' if name == 'eager' else
                                     f' ({abs(losses[i] - ref) / abs(ref):.1e})')
        for name, losses in sides) + '  (rel. diff to eager)')

  results.update(
      torch_ms=1e3 * torch_s, jax_ms=1e3 * jax_s, torch_times_ms=eager['times_ms'],
      jax_times_ms=[1e3 * t for t in jax_times], jax_compile_s=compile_s,
      jax_first_call_s=first_call_s, speedup_eager_over_jax=ratio,
      flops_per_step_xla=flops_xla, flops_per_step_analytic=analytic,
      forward_flops_analytic=fwd, jax_flops_per_s=achieved,
      torch_flops_per_s=flops / torch_s, matmul_peak_flops_per_s=peak, matmul_peak_n=peak_n,
      jax_fraction_of_peak=achieved / peak, first_loss_torch=torch_losses[0],
      first_loss_jax=jax_losses[0], first_loss_rel_diff=rel,
      final_loss_torch=torch_losses[-1], final_loss_jax=jax_losses[-1])

  if args.profile:
    print('\n--- where the time goes (jax) ---')
    b = jax_breakdown(jside, args, cfg, fwd, peak, jax_s)
    tb = torch_breakdown(tside, args)
    tb['step_s'] = torch_s
    ms = lambda s: f'{1e3 * s:8.1f} ms'
    print(f'{"":36s}{"jax":>11s}{"torch":>11s}')
    print(f'{"forward only":36s}{ms(b["forward_s"])}{ms(tb["forward_s"])}')
    print(f'{"forward + backward":36s}{ms(b["forward_backward_s"])}'
          f'{ms(tb["forward_backward_s"])}')
    print(f'{"  backward (difference)":36s}{ms(b["forward_backward_s"] - b["forward_s"])}'
          f'{ms(tb["forward_backward_s"] - tb["forward_s"])}')
    print(f'{"full step":36s}{ms(jax_s)}{ms(torch_s)}')
    print(f'{"  optimizer (step - fwd/bwd)":36s}{ms(jax_s - b["forward_backward_s"])}'
          f'{ms(torch_s - tb["forward_backward_s"])}')
    print(f'{"optimizer update alone":36s}{ms(b["optimizer_s"])}')
    print(f'{"host overhead of a call (no compute)":36s}{ms(b["host_overhead_s"])}')
    print(f'{"step with attention -> no-op":36s}{ms(b["step_without_attention_s"])}')
    print(f'{"  attention share (difference)":36s}{ms(jax_s - b["step_without_attention_s"])}')
    print(f'{"attention fwd+bwd, isolated":36s}{ms(b["attention_isolated_s"])}')
    print(f'{"all matmul FLOPs at peak":36s}{ms(b["matmuls_at_peak_s"])}')
    print(f'{"  linears at peak":36s}{ms(b["linears_at_peak_s"])}')
    print(f'{"  attention matmuls at peak":36s}{ms(b["attention_matmuls_at_peak_s"])}')
    rest = jax_s - b['matmuls_at_peak_s']
    print(f'{"step minus matmuls-at-peak":36s}{ms(rest)}  (elementwise, softmax, layout, '
          f'sub-peak matmuls)')
    trace = trace_breakdown(jside, max(1, min(args.steps, 2)), args.trace_dir)
    if trace:
      ops = trace['ops']
      total = sum(t for _, t in ops)
      unit = 'thread' if jax_device.platform == 'cpu' else 'kernel'
      print(f'\nper-op time from a jax.profiler trace ({unit} time per step, '
            f'{1e3 * total:.0f} ms in all; ops keep the {trace["workers"]} '
            f'{"threads" if unit == "thread" else "streams"} busy {trace["busy"]:.0%} '
            f'of the traced time):')
      for name, t in ops[:15]:
        print(f'  {name[:64]:64s}{1e3 * t:9.1f} ms  {t / total:6.1%}')
      is_matmul = lambda name: name.startswith('dot_general') or 'gemm' in name.lower()
      matmul = sum(t for name, t in ops if is_matmul(name))
      print(f'  matmuls: {matmul / total:.0%}, everything else: {1 - matmul / total:.0%}')
      if unit == 'thread':
        print('largest single instructions (a loop fusion with very many operands is XLA '
              'recomputing a long elementwise chain):')
        for name, t, label, n_ops in trace['top_instructions']:
          print(f'  {name[:40]:40s}{1e3 * t:9.1f} ms  {n_ops:4d} operands  {label[:40]}')
      if args.trace_dir:
        print(f'trace kept in {args.trace_dir} (open with TensorBoard / Perfetto)')
      results['jax_trace'] = dict(trace, ops=trace['ops'][:40])
    results['jax_breakdown'] = b
    results['torch_breakdown'] = tb

  return write_json(results, args.json)


def write_json(results: dict, path: str | None) -> dict:
  if path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=str))
    print(f'\nwrote {path}')
  return results


if __name__ == '__main__':
  main(ARGS)
