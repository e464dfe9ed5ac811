"""The layer decomposer's whole training step, in steps/s and model FLOP utilisation (MFU),
next to diffusers' SD3 transformer training step at the same token count.

Ours is `layerjax.train.trainer.make_step` exactly as training runs it: the LiWi objectives
(flow on K = 3 layer latents, alpha and shadow heads, recomposition, restoration), the text
encoder or precomputed embeddings, the latent map (VAE encode / space-to-depth), AdamW with
clipping and the EMA update, jitted and donating. The peer is a PyTorch eager training step
(flow MSE, AdamW) of diffusers' `SD3Transformer2DModel` with the same width, depth, heads
and input channels, fed a latent K times as tall so it sees the same number of image
tokens, and the same text tokens. The peer does less work (no heads, VAE, EMA), so a ratio
above 1 understates our speed.

Configs
  demo        configs/liwi.py:demo, as `make demo` trains it
  sd3_medium  configs/liwi.py:sd3_medium's MMDiT (width 1536, 24 heads, patch 2, 16 latent
              channels) with `--depth` blocks, SD3's VAE shape and VAE-decoder heads, random
              weights, `--size` px, SD3's 333 text tokens of width 4096

MFU = XLA's FLOP count of the step (`cost_analysis`) / step time / peak, where the peak is
a jitted square fp32 (or bf16) matmul measured in the same run (CPU), or the accelerator's
dense bf16 datasheet peak given with `--peak-tflops`.

`--breakdown` also times the step's parts, each jitted alone on the step's own intermediate
values (the host->device batch, latent encodes, text encoder, transformer forward and
backward, each head pass, the recomposition's latent decodes, optimizer, EMA), in ms and %
of the step; what the parts do not cover (the loss terms' own arithmetic, the non-finite
guard, fusion across parts) is the 'other' line. Last, the host's own time in one call of
the jitted step (flattening the state's pytree into its leaves and launching), which the
loop overlaps with the previous step's compute: what passing flat argument lists would save.

    python bench/train_step.py                          # both configs, CPU-sized
    python bench/train_step.py --no-peer --breakdown    # where the step's time goes
    python bench/train_step.py --configs sd3_medium --depth 24 --size 512 --batch 4 \\
        --dtype bfloat16 --peak-tflops 989              # the full model on an H100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import optax  # noqa: E402
from flax import nnx  # noqa: E402

from layerjax import build, host, parallel  # noqa: E402
from layerjax.models.mmdit import REMAT_POLICIES  # noqa: E402
from layerjax.train import objectives, trainer  # noqa: E402
from mmdit_step import (TorchSide, matmul_peak, median_time, other_cpu_load,  # noqa: E402
                        xla_flops)

SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as SD3's pipeline concatenates them


def load_config(variant: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('liwi', ROOT / 'configs' / 'liwi.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _empty_file(name: str) -> Path:
  path = Path(tempfile.mkdtemp(prefix='train_step_')) / name
  path.touch()
  return path


def make_config(name: str, args):
  if name == 'demo':
    c = load_config('demo')
  elif name in ('sd3_medium', 'sd35_medium', 'sd35_large'):
    c = load_config(name)
    c.init.pretrained = ''  # random weights of the same shapes
    c.model.mmdit.num_layers = args.depth
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.data.image_size = (args.size, args.size)
    # The config check wants the embeddings file to exist; the step never reads it (the
    # batch carries random embeddings), so an empty file stands in.
    c.model.text.embeddings = str(_empty_file('sd3_text_embeddings.safetensors'))
  else:
    raise ValueError(f'unknown config {name!r}')
  if args.batch:
    c.data.global_batch_size = args.batch
  c.loss.estimate_every = args.estimate_every
  c.mesh = (1, 1, 1)
  return c


def random_batch(config, model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch shaped like the loader's output (values are random; timing does not care)."""
  rng = np.random.default_rng(seed)
  b = config.data.global_batch_size
  h, w = config.data.image_size
  u = lambda c: rng.uniform(0, 1, (b, h, w, c)).astype(np.float32)
  batch = {k: u(3) for k in ('image', 'prompt', 'background', 'checkerboard',
                             'foreground_on_checkerboard', 'shadow_on_checkerboard')}
  batch.update(foreground=u(4), shadow=u(4), boundary=(u(1) > 0.9).astype(np.float32))
  m = model_cfg.mmdit
  if model_cfg.text is not None:
    batch['text_tokens'] = rng.integers(2, 258, (b, model_cfg.text.max_len)).astype(np.int32)
  else:
    batch['text_embeds'] = rng.normal(size=(b, SD3_TEXT_TOKENS, m.joint_attention_dim)
                                      ).astype(np.float32)
    batch['pooled_text_embeds'] = rng.normal(size=(b, m.pooled_projection_dim)
                                             ).astype(np.float32)
  return batch


def compile_step(setup, step_fn, config) -> tuple:
  """`step_fn` compiled for a random batch of `config`'s shape: (compiled, batch, seconds).
  Under the setup's mesh."""
  arrays = random_batch(config, build.decomposer_config(config))
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  t0 = time.perf_counter()
  compiled = step_fn.lower(setup.state, setup.frozen, batch).compile()
  return compiled, batch, time.perf_counter() - t0


def step_time(compiled, setup, batch, steps: int, warmup: int) -> float:
  """Median seconds of `compiled` steps from the setup's state, each feeding the next."""
  state = setup.state

  def one():
    nonlocal state
    state, metrics = compiled(state, setup.frozen, batch)
    return metrics['loss']
  return median_time(one, steps, warmup, jax.block_until_ready)


def time_ours(config, steps: int, warmup: int) -> dict:
  """Median seconds per step of the real training step, its FLOPs and compile time."""
  setup = trainer.create(config)
  with jax.set_mesh(setup.mesh):
    compiled, batch, compile_s = compile_step(setup, trainer.make_step(setup), config)
    step_s = step_time(compiled, setup, batch, steps, warmup)
  params = sum(x.size for x in jax.tree.leaves(setup.state['params']))
  return dict(step_s=step_s, flops=xla_flops(compiled), compile_s=compile_s,
              parameters=int(params))


def breakdown(config, steps: int, warmup: int) -> dict:
  """Milliseconds of the step's parts, each jitted and timed alone on the step's own
  intermediate values: {part: ms}, with the whole step as 'step'. Parts that the step fuses
  or overlaps sum to more or less than it; the rest is 'other'."""
  setup = trainer.create(config)
  cfg, loss_cfg = build.decomposer_config(config), config.loss
  arrays = random_batch(config, cfg)
  graphdef, frozen, state = setup.graphdef, setup.frozen, setup.state
  model = lambda params: nnx.merge(graphdef, params, frozen)
  k = loss_cfg.estimate_every
  ms = lambda fn, *a: 1e3 * median_time(lambda: fn(*a), steps, warmup, jax.block_until_ready)
  out = {}
  with jax.set_mesh(setup.mesh):
    out['host->device batch'] = ms(lambda: parallel.global_batch(arrays, setup.mesh))
    batch = parallel.global_batch(arrays, setup.mesh)
    params = state['params']
    idx = {l: i for i, l in enumerate(cfg.layers)}

    @jax.jit
    def encodes(params, batch):
      m = model(params)
      x0 = jnp.stack([m.latents.encode(batch[objectives.LAYER_TARGETS[l]])
                      for l in cfg.layers], 1)
      return x0, m.conditions(batch)
    out['latent encodes (targets, conditions)'] = ms(encodes, params, batch)
    x0, conditions = encodes(params, batch)
    b = x0.shape[0]
    sigma = jnp.full((b,), 0.5, jnp.float32)
    xt = 0.5 * x0 + 0.5 * jax.random.normal(jax.random.key(0), x0.shape)

    def grad_of(fn, argnums=0):
      """fn's value and gradient, jitted: the forward and backward of one part."""
      return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums))

    if cfg.text is not None:
      out['text encoder (fwd+bwd)'] = ms(grad_of(lambda p, t: sum(
          jnp.sum(x) for x in model(p).encode_text(t))), params, batch)
    context, pooled = jax.jit(lambda p, t: model(p).encode_text(t))(params, batch)
    out['transformer (fwd+bwd)'] = ms(grad_of(
        lambda p, *a: model(p)(*a)), params, xt, conditions, context, pooled, sigma)
    pixels = jax.jit(lambda p, t: model(p).head_pixels(t))(params, batch)
    sub = objectives.every_kth({'x': xt, 'pixels': pixels}, k)
    for name, layer in (('alpha', 'foreground'), ('shadow', 'shadow')):
      if layer not in idx:
        continue
      head = lambda p, z, px, name=name: getattr(model(p), name)(z, px)
      clean, est = x0[:, idx[layer]], sub['x'][:, idx[layer]]
      out[f'{name} head: clean (fwd+bwd)'] = ms(grad_of(head), params, clean, pixels)
      if loss_cfg.weights.get('recompose'):  # one pass serves the estimate's two uses
        out[f'{name} head: estimate, held and free (fwd+bwd)'] = ms(grad_of(
            lambda p, z, px: sum(jnp.sum(y) for y in objectives.held_and_free(head, p, z, px)),
            (0, 1)), params, est, sub['pixels'])
      else:
        out[f'{name} head: estimate, input fixed (fwd+bwd)'] = ms(
            grad_of(head), params, est, sub['pixels'])
    if loss_cfg.weights.get('recompose'):
      est = sub['x']
      out['latent decodes of the recomposition (fwd+bwd)'] = ms(grad_of(
          lambda z: model(params).latents.decode(z[:, idx['background']]) +
          model(params).latents.decode(z[:, idx['foreground']])), est)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, setup.tx.update(g, o, p)[0]))
    out['optimizer update'] = ms(update, grads, state['opt_state'], params)
    ema = jax.jit(lambda e, p: jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, e, p))
    out['EMA'] = ms(ema, state['ema'], params)
    del grads  # memory, for the SD3-shaped model
    # Last: the step donates the state the parts above read.
    compiled = trainer.make_step(setup).lower(state, frozen, batch).compile()

    def one():
      nonlocal state
      state, metrics = compiled(state, frozen, batch)
      return metrics['loss']
    out['step'] = ms(one)

    def dispatch():  # the host's time in the call: flattening the state's leaves, launching
      nonlocal state
      t = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      spent = time.perf_counter() - t
      jax.block_until_ready(metrics)
      return spent
    dispatch_ms = 1e3 * float(np.median([dispatch() for _ in range(steps)]))
    leaves = len(jax.tree.leaves(state))
  out['other (step - parts)'] = out['step'] - sum(v for n, v in out.items() if n != 'step')
  # Not a part: it overlaps the previous step's compute, as the loop dispatches one ahead.
  out[f'host time of the call ({leaves} state leaves)'] = dispatch_ms
  return out


def print_breakdown(name: str, parts: dict) -> None:
  step = parts['step']
  print(f'{name}: where the step\'s {step:.1f} ms go (each part jitted and timed alone)')
  for part, v in parts.items():
    if part != 'step':
      print(f'  {part:<48} {v:9.2f} ms {v / step:7.1%}')


def peer_transformer(cfg, h: int):
  """diffusers' `SD3Transformer2DModel` of the decomposer's transformer shape (`cfg`, a
  `DecomposerConfig`), for its K layer latents of height `h` fed as one K times as tall."""
  from diffusers import SD3Transformer2DModel as TorchSD3
  m, k = cfg.mmdit, len(cfg.layers)
  return TorchSD3(
      sample_size=m.sample_size, patch_size=m.patch_size, in_channels=m.in_channels,
      out_channels=m.out_channels, num_layers=m.num_layers,
      attention_head_dim=m.attention_head_dim, num_attention_heads=m.num_attention_heads,
      joint_attention_dim=m.joint_attention_dim, caption_projection_dim=m.caption_projection_dim,
      pooled_projection_dim=m.pooled_projection_dim,
      pos_embed_max_size=max(m.pos_embed_max_size, k * h // m.patch_size),
      dual_attention_layers=tuple(m.dual_attention_layers), qk_norm=m.qk_norm)


def time_peer(config, steps: int, warmup: int, seed: int = 0) -> dict:
  """diffusers' SD3 transformer step with our transformer's shape and token count."""
  import torch
  cfg = build.decomposer_config(config)
  m, k = cfg.mmdit, len(cfg.layers)
  b = config.data.global_batch_size
  h, w = (s // cfg.latent_factor for s in config.data.image_size)
  torch.manual_seed(seed)
  model = peer_transformer(cfg, h)
  rng = np.random.default_rng(seed)
  text_tokens = cfg.text.max_len if cfg.text is not None else SD3_TEXT_TOKENS
  f32 = lambda *s: rng.normal(size=s).astype(np.float32)
  batch = dict(x=f32(b, m.in_channels, k * h, w), text=f32(b, text_tokens, m.joint_attention_dim),
               pooled=f32(b, m.pooled_projection_dim),
               t=rng.uniform(0, 1000, b).astype(np.float32),
               target=f32(b, m.out_channels, k * h, w))
  side = TorchSide(model, batch, SimpleNamespace(remat=config.model.remat != 'none',
                                                 dtype=config.model.dtype),
                   'cuda' if torch.cuda.is_available() else 'cpu')
  return dict(step_s=median_time(side.step, steps, warmup, side.sync),
              parameters=sum(p.numel() for p in model.parameters()))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--configs', nargs='+', default=['demo', 'sd3_medium'])
  p.add_argument('--depth', type=int, default=2, help='sd3_medium: MMDiT blocks (SD3: 24)')
  p.add_argument('--size', type=int, default=128, help='sd3_medium: image size in pixels')
  p.add_argument('--batch', type=int, default=0, help='global batch (0: demo 16, sd3 2)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--remat', default='none', choices=REMAT_POLICIES,
                 help='sd3_medium: the per-block remat policy')
  p.add_argument('--estimate-every', type=int, default=1,
                 help='loss.estimate_every: terms on the one-step estimate on every k-th example')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--peak-tflops', type=float, default=0.0,
                 help='accelerator peak (dense, for --dtype); 0: measure a matmul')
  p.add_argument('--no-peer', action='store_true', help='skip the diffusers step')
  p.add_argument('--breakdown', action='store_true',
                 help="also time the step's parts alone (transformer, heads, latents, ...)")
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  print(f'jax {jax.__version__} on {dev.platform} ({dev.device_kind}), {jax.device_count()} '
        f'device(s)')
  busy = other_cpu_load()
  if busy is not None and busy > 0.2:
    print(f'WARNING: other processes keep {busy:.0%} of the CPUs busy; timings are inflated')
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  peak = (args.peak_tflops * 1e12 if args.peak_tflops else
          matmul_peak(2048 if dev.platform == 'cpu' else 8192, dtype))
  print(f'peak: {peak / 1e12:.3f} TFLOP/s ({"given" if args.peak_tflops else "measured matmul"})')
  results = {'peak_flops_per_s': peak, 'device': dev.device_kind, 'configs': {}}
  for name in args.configs:
    config = make_config(name, args)
    if name == 'sd3_medium' and not args.batch:
      config.data.global_batch_size = 2
    ours = time_ours(config, args.steps, args.warmup)
    r = {'batch': config.data.global_batch_size, 'image_size': tuple(config.data.image_size),
         'ours': ours}
    rate = 1 / ours['step_s']
    line = (f'{name}: {ours["parameters"] / 1e6:.1f}M params, batch {r["batch"]} at '
            f'{r["image_size"][0]} px: {rate:.2f} steps/s, '
            f'{rate * r["batch"]:.1f} examples/s (compile {ours["compile_s"]:.0f} s)')
    if ours['flops']:
      achieved = ours['flops'] * rate
      r['mfu'] = achieved / peak
      line += (f', {ours["flops"] / 1e9:.1f} GFLOP/step, {achieved / 1e12:.3f} TFLOP/s, '
               f'MFU {r["mfu"]:.1%}')
    print(line)
    if args.breakdown:
      r['breakdown_ms'] = breakdown(config, args.steps, args.warmup)
      print_breakdown(name, r['breakdown_ms'])
    if not args.no_peer:
      peer = time_peer(config, args.steps, args.warmup)
      r['peer'] = peer
      r['peer_over_ours'] = peer['step_s'] / ours['step_s']
      print(f'  diffusers SD3Transformer2DModel step, same tokens ({peer["parameters"] / 1e6:.1f}M '
            f'params): {1 / peer["step_s"]:.2f} steps/s; ours / diffusers speed: '
            f'{r["peer_over_ours"]:.2f}x (ours also runs heads, latents, EMA)')
    results['configs'][name] = r
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2, default=float) + '\n')
  return results


if __name__ == '__main__':
  host.reexec()
  main()
