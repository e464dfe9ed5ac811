"""The accelerator run, prepared so that a short lease goes to measuring: one command, parts in
order of importance, each in its own process under what is left of `--budget` seconds, each
part's result written to `--out` as soon as it is known (a part that fails or runs out of
time is recorded with its reason, and the next one starts).

Parts
  train     the full SD3-medium decomposer's training step (24 blocks, 512 px, bf16, the
            remat policy `--remat`, cuDNN attention): the batch fitted to the device's memory
            from two compiles' memory analyses, then steps/s, MFU, peak memory and compile time
  mmdit     `bench/mmdit_step.py` at SD3-medium shapes (24 blocks, width 1536, 64x64 latents,
            333 text tokens), bf16: PyTorch eager, torch.compile and layerjax in one run
  decompose `bench/decompose.py`: the demo and SD3-medium decomposers at 512 px, 28 steps,
            bf16, against `LayerDecomposerPipeline` eager and compiled
  large     SD3.5-large: the training state's bytes against the device's memory; its step
            (as `train`) only if the state fits

MFU counts model FLOPs: `bench/flops.py` over the jaxpr of the loss's value and gradient
traced without rematerialisation, so each MMDiT stream's projections count at its own tokens,
attention at the joint length, the VAE encodes, heads and decodes at their resolutions, and
recomputation not at all; the peak is the device's dense bf16 figure (`--peak-tflops`, else
the table below by device kind).

    python bench/accelerator.py --out $OUT                 # on the device, all parts
    python bench/accelerator.py --out /tmp/acc --parts train --depth 2 --size 64 --batch 2
                                                           # the same code path on a CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

# Dense bf16 tensor-core peaks from the datasheets (SXM parts), TFLOP/s.
PEAKS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0}
PARTS = ('train', 'mmdit', 'decompose', 'large')
GiB = 2 ** 30


def device_peak(kind: str, given: float) -> float | None:
  if given:
    return given * 1e12
  for name, tflops in PEAKS.items():
    if name in kind:
      return tflops * 1e12
  return None


def compiled_bytes(compiled) -> int | None:
  """Device bytes one call of `compiled` holds at its peak, from XLA's memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def model_flops(config, setup, batch) -> int:
  """FLOPs of the loss's value and gradient, traced with rematerialisation off."""
  import jax
  from flax import nnx

  import flops
  from layerjax import build
  from layerjax.models import common
  from layerjax.models.decomposer import TRAINABLE
  from layerjax.train import objectives
  plain = config.copy_and_resolve_references()
  plain.model.remat = 'none'
  graphdef = nnx.split(common.abstract(lambda rngs: build.build_model(plain, rngs)),
                       TRAINABLE, ...)[0]
  key = jax.random.key(0)

  def loss(params):
    model = nnx.merge(graphdef, params, setup.frozen)
    return objectives.loss_fn(model, batch, key, plain.loss)[0]
  return flops.count(jax.value_and_grad(loss), setup.state['params'])


def train_part(args) -> dict:
  """The decomposer's step at the largest batch that fits (or `--batch`)."""
  import jax

  from layerjax.train import trainer
  from train_step import compile_step, make_config, step_time
  ns = SimpleNamespace(depth=args.depth, dtype='bfloat16', remat=args.remat, size=args.size,
                       batch=1, estimate_every=1)
  config = make_config(args.config, ns)
  config.model.attention = args.attention
  dev = jax.devices()[0]
  limit = (dev.memory_stats() or {}).get('bytes_limit')
  setup = trainer.create(config)
  step_fn = trainer.make_step(setup)

  def compile_at(b):
    config.data.global_batch_size = b
    return compile_step(setup, step_fn, config)

  out: dict = {'device': dev.device_kind, 'remat': args.remat, 'attention': args.attention}
  with jax.set_mesh(setup.mesh):
    if args.batch:
      batch_size = args.batch
    else:
      c1, _, out['compile_s'] = compile_at(1)
      c2, _, _ = compile_at(2)
      m1, m2 = compiled_bytes(c1), compiled_bytes(c2)
      out['bytes_batch_1'], out['bytes_batch_2'] = m1, m2
      if not (limit and m1 and m2 and m2 > m1):
        raise RuntimeError(f'no memory figures to fit the batch (limit {limit}, analyses '
                           f'{m1}, {m2}); give --batch')
      batch_size = max(1, int((0.92 * limit - m1) // (m2 - m1)) + 1)
    while True:
      try:
        compiled, batch, compile_s = compile_at(batch_size)
        step_s = step_time(compiled, setup, batch, args.steps, 2)
        break
      except Exception as e:  # pylint: disable=broad-except  # out of memory: halve
        if 'RESOURCE_EXHAUSTED' not in str(e) or batch_size == 1:
          raise
        batch_size //= 2
    out.update(batch=batch_size, step_s=step_s, compile_s=compile_s,
               examples_per_s=batch_size / step_s,
               peak_bytes=(dev.memory_stats() or {}).get('peak_bytes_in_use'),
               compiled_bytes=compiled_bytes(compiled))
  out['model_flops'] = model_flops(config, setup, batch)  # outside the mesh: shapes only
  peak = device_peak(dev.device_kind, args.peak_tflops)
  if peak:
    out['mfu'] = out['model_flops'] / step_s / peak
  return out


def large_part(args) -> dict:
  """SD3.5-large's training state (params, EMA, two Adam moments, gradients) against memory."""
  import jax

  from layerjax.models import common
  from layerjax.models.mmdit import SD35_LARGE, SD3Transformer2DModel
  model = common.abstract(lambda rngs: SD3Transformer2DModel(SD35_LARGE, rngs=rngs))
  params = common.parameter_count(model)
  state_bytes = params * 4 * 5  # fp32: params, EMA, 2 moments, gradients
  limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  out = {'parameters': params, 'state_bytes': state_bytes, 'bytes_limit': limit}
  if limit and state_bytes < 0.8 * limit:
    out['train'] = train_part(SimpleNamespace(**{**vars(args), 'config': 'sd35_large',
                                                 'depth': SD35_LARGE.num_layers}))
  else:
    out['fits'] = False
  return out


def run_part(name: str, args, left: float) -> dict:
  """`name` in a fresh process (its memory and compile caches its own), within `left` s."""
  if name in ('mmdit', 'decompose'):
    script = {'mmdit': ['bench/mmdit_step.py', '--layers', str(args.depth), '--heads', '24',
                        '--head-dim', '64', '--latent', str(args.size // 8), '--text-tokens',
                        '333', '--joint-dim', '4096', '--pooled-dim', '2048',
                        '--pos-embed-max-size', '192', '--sample-size', '128', '--batch', '4',
                        '--dtype', 'bfloat16'],
              'decompose': ['bench/decompose.py', '--depth', str(args.depth), '--size',
                            str(args.size), '--steps', '28', '--dtype', 'bfloat16',
                            '--compile']}[name]
    json_path = Path(args.out) / f'{name}.json'
    cmd = [sys.executable, *script, '--json', str(json_path)]
  else:
    json_path = Path(args.out) / f'{name}.json'
    cmd = [sys.executable, __file__, '--one', name, *sys.argv[1:]]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, timeout=left, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    return {'error': f'out of time after {left:.0f} s'}
  (Path(args.out) / f'{name}.log').write_text(proc.stdout + proc.stderr)
  if proc.returncode:
    return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1],
            'seconds': time.perf_counter() - t0}
  return {**json.loads(json_path.read_text()), 'seconds': time.perf_counter() - t0}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--out', required=True, help='a folder for the results (JSON and logs)')
  p.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
  p.add_argument('--budget', type=float, default=780, help='seconds for all parts')
  p.add_argument('--config', default='sd3_medium')
  p.add_argument('--depth', type=int, default=24)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--batch', type=int, default=0, help='0: the largest that fits')
  p.add_argument('--remat', default='full')
  p.add_argument('--attention', default='cudnn', choices=('xla', 'cudnn'))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--peak-tflops', type=float, default=0.0)
  p.add_argument('--one', choices=PARTS, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  Path(args.out).mkdir(parents=True, exist_ok=True)
  if args.one:  # a part's own process
    result = {'train': train_part, 'large': large_part}[args.one](args)
    (Path(args.out) / f'{args.one}.json').write_text(json.dumps(result, indent=2) + '\n')
    return result
  start, results = time.perf_counter(), {}
  for name in args.parts:
    left = args.budget - (time.perf_counter() - start)
    results[name] = run_part(name, args, left) if left > 30 else {'error': 'no time left'}
    print(f'{name}: {json.dumps(results[name], default=str)[:400]}', flush=True)
    (Path(args.out) / 'accelerator.json').write_text(
        json.dumps(results, indent=2, default=str) + '\n')
  return results


if __name__ == '__main__':
  main()
