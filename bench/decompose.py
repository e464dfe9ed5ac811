"""Seconds per photo and peak memory of `Decomposer.decompose`, next to the same model in
PyTorch (`LayerDecomposerPipeline`: eager, optionally `torch.compile`).

Ours is the whole user path: a photo of `--photo` pixels (a synthetic scene) with a box
prompt, through `layerjax.infer.decomposer.Decomposer` (resize to the model, the jitted
Euler sampler over the K = 3 layer latents, the decoders and heads, edge-aware alpha
upsampling and the exact colour solve at the photo's resolution), split into sampling,
decoding and post-processing as the provenance records them. Compile time (the first call)
is reported apart; the times are medians of `--repeats` calls after it.

The peer is what a PyTorch user runs for the same model: the same random weights exported
with `python -m layerjax.convert to-pytorch` and called through `LayerDecomposerPipeline`
(diffusers' `SD3Transformer2DModel`, `AutoencoderKL` and VAE `Decoder` heads, stepped by
`FlowMatchEulerDiscreteScheduler`), PyTorch eager or, with `--compile`, its network under
`torch.compile`. Both sides do the same work, photo to exact layers, with the same numpy code
around the network, so the phases compare one to one.

Configs
  demo        configs/liwi.py:demo (a 4-block model at 32 px), as `make demo` trains it
  sd3_medium  configs/liwi.py:sd3_medium's shapes (width 1536, 24 heads, SD3's VAE and
              VAE-decoder heads, 333 text tokens of width 4096) with `--depth` blocks at
              `--size` px, random weights

Peak memory: a first process builds the random model and writes it, packed and as its
PyTorch export, to a temporary folder. Each side then loads it as its user would
(`layerjax.infer.model.load`, `LayerDecomposerPipeline.from_pretrained`) in a process of its
own, whose peak is measured: on a CPU the resident set (`ru_maxrss`), on a GPU the
framework's peak device allocation.

    python bench/decompose.py                                   # CPU: sd3_medium depth 2, 4 steps
    python bench/decompose.py --configs sd3_medium --depth 24 --steps 28 --dtype bfloat16 \\
        --compile                                              # an accelerator, full size
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

from layerjax import host  # noqa: E402
from train_step import SD3_TEXT_TOKENS, load_config  # noqa: E402

PHASES = ('sampling', 'decoding', 'postprocess')


def make_config(name: str, args):
  c = load_config(name)
  if name == 'sd3_medium':
    c.init.pretrained = ''
    c.model.mmdit.num_layers = args.depth
    c.model.dtype = args.dtype
    c.data.image_size = (args.size, args.size)
  elif name != 'demo':
    raise ValueError(f'unknown config {name!r}')
  c.eval.sample_steps = args.steps or c.eval.sample_steps
  return c


def photo(size: tuple[int, int]):
  """A gradient with a red disc: the photo, and the disc's box."""
  import numpy as np
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([0.5 + 0.3 * xx, 0.6 + 0 * yy, 0.7 - 0.3 * yy], -1)
  cx, cy, r = w * 0.4, h * 0.55, min(h, w) * 0.2
  disc = np.hypot(np.mgrid[0:h, 0:w][1] - cx, np.mgrid[0:h, 0:w][0] - cy) < r
  img[disc] = (0.85, 0.15, 0.1)
  return img.astype(np.float32), (int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1)


def _embeddings(folder: Path, cfg) -> Path:
  """Random 'precomputed SD3 embeddings' of the empty text (timing does not care)."""
  import numpy as np
  from safetensors.numpy import save_file
  from layerjax.models.shared import TextEmbeddings
  k = TextEmbeddings.key('')
  rng = np.random.default_rng(0)
  path = folder / 'embeddings.safetensors'
  save_file({f'{k}.states': rng.normal(size=(SD3_TEXT_TOKENS, cfg.mmdit.joint_attention_dim))
             .astype(np.float32),
             f'{k}.pooled': rng.normal(size=(cfg.mmdit.pooled_projection_dim,))
             .astype(np.float32)}, str(path))
  return path


def peak_memory_bytes(framework: str) -> int:
  """This process's peak: device allocation on an accelerator, resident set on a CPU."""
  if framework == 'jax':
    import jax
    dev = jax.devices()[0]
    if dev.platform != 'cpu':
      return int((dev.memory_stats() or {}).get('peak_bytes_in_use', 0))
  else:
    import torch
    if torch.cuda.is_available():
      return int(torch.cuda.max_memory_allocated())
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_setup(name: str, args) -> None:
  """Builds the random model and writes it packed (what ours loads) and, for the peer, as
  its PyTorch export; its own process, so neither side's peak counts this work."""
  from layerjax import build
  from layerjax.convert import pytorch
  from layerjax.infer.model import LoadedModel, save
  from layerjax.models.shared import TextEmbeddings
  config = make_config(name, args)
  model = build.build_model(config, 0)
  texts = None
  if config.model.text.encoder == 'precomputed':
    texts = TextEmbeddings(_embeddings(Path(args.export), model.config))
  packed = save(LoadedModel(model, config, 0, f'random {name}', texts),
                Path(args.export) / 'packed')
  if not args.no_peer:
    pytorch.to_pytorch(packed, Path(args.export) / 'torch')


def run_ours(name: str, args) -> dict:
  """The packed model as a user loads it (`infer.model.load`), through `Decomposer`."""
  import jax
  from flax import nnx
  from layerjax.infer.decomposer import Decomposer
  from layerjax.infer.model import JaxBackend, load
  from layerjax.infer.prompts import Query
  loaded = load(Path(args.export) / 'packed')
  d = Decomposer(JaxBackend(loaded))
  out = timed(lambda image, box, seed: d.decompose(image, Query(box=box), seed=seed), args)
  return {**out, 'steps': loaded.config.eval.sample_steps,
          'parameters': int(sum(x.size for x in jax.tree.leaves(nnx.state(loaded.model)))),
          'vae': loaded.model.config.latents == 'vae', 'peak_memory': peak_memory_bytes('jax')}


def timed(decompose, args) -> dict:
  """The first call (compiling) and the median of `--repeats` more (seeds 1, 2, ...) of
  `decompose(image, box, seed)` on the benchmark photo and its box, by phase."""
  image, box = photo(tuple(args.photo))
  t = time.perf_counter()
  decompose(image, box, 0)
  first = time.perf_counter() - t
  runs = []
  for i in range(args.repeats):
    t = time.perf_counter()
    s = decompose(image, box, i + 1)
    runs.append({'total': time.perf_counter() - t, **{k: s.provenance['timings'][k]
                                                      for k in PHASES}})
  med = {k: statistics.median(r[k] for r in runs) for k in ('total', *PHASES)}
  return {'seconds': med, 'first_call_s': first, 'compile_s': first - med['total'],
          'model_size': s.provenance['model_size']}


def run_peer(name: str, args) -> dict:
  """The export ours wrote, through `LayerDecomposerPipeline` (JAX is not imported)."""
  import torch
  from layerjax.torch import LayerDecomposerPipeline
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  pipe = LayerDecomposerPipeline.from_pretrained(Path(args.export) / 'torch', device=dev)
  if args.compile:
    pipe.backend.decomposer.compile()
  out = timed(lambda image, box, seed: pipe(image, box=box, seed=seed), args)
  return {**out, 'peak_memory': peak_memory_bytes('torch'), 'compile': bool(args.compile)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--configs', nargs='+', default=['demo', 'sd3_medium'])
  p.add_argument('--depth', type=int, default=2, help='sd3_medium: MMDiT blocks (SD3: 24)')
  p.add_argument('--size', type=int, default=512, help='sd3_medium: the model resolution')
  p.add_argument('--steps', type=int, default=0,
                 help='sampler steps (0: the config\'s, 25 demo / 28 sd3_medium)')
  p.add_argument('--photo', type=int, nargs=2, default=(768, 1024), metavar=('H', 'W'))
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--compile', action='store_true', help='the peer under torch.compile')
  p.add_argument('--no-peer', action='store_true')
  p.add_argument('--one', nargs=2, metavar=('CONFIG', 'SIDE'), help=argparse.SUPPRESS)
  p.add_argument('--export', help=argparse.SUPPRESS)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  if args.one:  # a child process: one side of one config, its JSON on the last line
    name, side = args.one
    run = {'setup': run_setup, 'ours': run_ours, 'peer': run_peer}[side]
    print(json.dumps(run(name, args)))
    return {}
  passed = list(argv if argv is not None else sys.argv[1:])
  results = {}
  for name in args.configs:
    r = results[name] = {}
    with tempfile.TemporaryDirectory() as export:  # the model 'setup' writes, both sides load
      for side in ('setup', 'ours') + (() if args.no_peer else ('peer',)):
        out = subprocess.run([sys.executable, __file__, *passed, '--one', name, side,
                              '--export', export],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        if side != 'setup':  # it writes the model and reports nothing
          r[side] = json.loads(out.strip().splitlines()[-1])
    ours = r['ours']
    s = ours['seconds']
    print(f'{name}: model {ours["model_size"][0]}x{ours["model_size"][1]}, '
          f'{ours["steps"]} steps, photo {args.photo[1]}x{args.photo[0]}: '
          f'{s["total"]:.2f} s/photo (sampling {s["sampling"]:.2f}, decoding '
          f'{s["decoding"]:.2f}, post-processing {s["postprocess"]:.2f}), compile '
          f'{ours["compile_s"]:.1f} s, peak memory {ours["peak_memory"] / 2**30:.2f} GiB')
    if 'peer' in r:
      peer = r['peer']
      ps = peer['seconds']
      what = 'torch.compile' if peer['compile'] else 'PyTorch eager'
      print(f'  LayerDecomposerPipeline ({what}): {ps["total"]:.2f} s/photo (sampling '
            f'{ps["sampling"]:.2f}, decoding {ps["decoding"]:.2f}, post-processing '
            f'{ps["postprocess"]:.2f}), first call {peer["first_call_s"]:.1f} s, peak memory '
            f'{peer["peak_memory"] / 2**30:.2f} GiB')
      print('  ratios (> 1: layerjax faster): ' + ', '.join(
          f'{k} {ps[k] / s[k]:.2f}x' for k in ('total', 'sampling', 'decoding')))
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
  return results


if __name__ == '__main__':
  host.reexec()
  main()
