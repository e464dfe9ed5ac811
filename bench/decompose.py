"""Seconds per photo and peak memory of `Decomposer.decompose`, next to the same network
sampled with diffusers (PyTorch eager, optionally `torch.compile`).

Ours is the whole user path: a photo of `--photo` pixels (a synthetic scene) with a box
prompt, through `layerjax.infer.decomposer.Decomposer` (resize to the model, the jitted
Euler sampler over the K = 3 layer latents, the decoders and heads, edge-aware alpha
upsampling and the exact colour solve at the photo's resolution), split into sampling,
decoding and post-processing as the provenance records them. Compile time (the first call)
is reported apart; the times are medians of `--repeats` calls after it.

The peer is what a PyTorch user runs for the same network: diffusers' `SD3Transformer2DModel`
of the same width, depth, heads and input channels, fed the K layer latents as one latent K
times as tall (the same number of image tokens) and the same text tokens, stepped by
`FlowMatchEulerDiscreteScheduler` for the same number of steps, after encoding the condition
maps (image, prompt) with diffusers' `AutoencoderKL`; then its `decode` once per
VAE-decoder-shaped pass we make (background, foreground, alpha head, shadow head). It does
no prompt rendering, resizing or post-processing, so a ratio above 1 understates our
speed. The demo model's latents are lossless pixels (no VAE), so its peer encodes and
decodes nothing.

Configs
  demo        configs/liwi.py:demo (a 4-block model at 32 px), as `make demo` trains it
  sd3_medium  configs/liwi.py:sd3_medium's shapes (width 1536, 24 heads, SD3's VAE and
              VAE-decoder heads, 333 text tokens of width 4096) with `--depth` blocks at
              `--size` px, random weights

Peak memory: each (config, side) runs in its own process; on a CPU its peak resident set
(`ru_maxrss`), on a GPU the framework's peak device allocation.

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

from train_step import SD3_TEXT_TOKENS, load_config, peer_transformer  # noqa: E402

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


def run_ours(name: str, args) -> dict:
  import jax
  from flax import nnx
  from layerjax.infer.decomposer import Decomposer
  from layerjax.infer.prompts import Query
  from layerjax.infer.model import JaxBackend, LoadedModel
  from layerjax import build
  config = make_config(name, args)
  model = build.build_model(config, 0)
  with tempfile.TemporaryDirectory() as tmp:
    embeddings = None
    if config.model.text.encoder == 'precomputed':
      embeddings = _embeddings(Path(tmp), model.config)
    d = Decomposer(JaxBackend(LoadedModel(model, config, 0, f'random {name}'),
                              embeddings=embeddings))
  image, box = photo(tuple(args.photo))
  t = time.perf_counter()
  d.decompose(image, Query(box=box))
  first = time.perf_counter() - t
  runs = []
  for i in range(args.repeats):
    t = time.perf_counter()
    s = d.decompose(image, Query(box=box), seed=i + 1)
    runs.append({'total': time.perf_counter() - t, **{k: s.provenance['timings'][k]
                                                      for k in PHASES}})
  med = {k: statistics.median(r[k] for r in runs) for k in ('total', *PHASES)}
  cfg = model.config
  return {'seconds': med, 'first_call_s': first, 'compile_s': first - med['total'],
          'model_size': s.provenance['model_size'], 'steps': config.eval.sample_steps,
          'parameters': int(sum(x.size for x in jax.tree.leaves(nnx.state(model)))),
          'vae': cfg.latents == 'vae', 'peak_memory': peak_memory_bytes('jax')}


def run_peer(name: str, args) -> dict:
  import numpy as np
  import torch
  from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
  from layerjax import build
  config = make_config(name, args)
  cfg = build.decomposer_config(config)
  m, k = cfg.mmdit, len(cfg.layers)
  h, w = (s // cfg.latent_factor for s in config.data.image_size)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
  torch.manual_seed(0)
  model = peer_transformer(cfg, h).to(dev, dtype).eval()
  vae = None
  if cfg.latents == 'vae':
    v = cfg.vae
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v.latent_channels,
                        block_out_channels=tuple(v.block_out_channels),
                        down_block_types=('DownEncoderBlock2D',) * len(v.block_out_channels),
                        up_block_types=('UpDecoderBlock2D',) * len(v.block_out_channels),
                        layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                        ).to(dev, dtype).eval()
  forward = torch.compile(model) if args.compile else model
  tokens = cfg.text.max_len if cfg.text is not None else SD3_TEXT_TOKENS
  rng = np.random.default_rng(0)
  t = lambda *s: torch.from_numpy(rng.normal(size=s).astype(np.float32)).to(dev, dtype)
  cond = t(1, m.in_channels - m.out_channels, k * h, w)
  maps = [t(1, 3, *config.data.image_size) for _ in config.model.conditions]
  text, pooled = t(1, tokens, m.joint_attention_dim), t(1, m.pooled_projection_dim)
  sched = FlowMatchEulerDiscreteScheduler(shift=config.loss.shift)
  steps = config.eval.sample_steps
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  @torch.no_grad()
  def once():
    t0 = time.perf_counter()
    if vae is not None:  # the condition maps' latents, as our sampler encodes them
      for x in maps:
        vae.encode(x).latent_dist.mean
    sched.set_timesteps(steps)
    x = t(1, m.out_channels, k * h, w)
    for ts in sched.timesteps:
      v = forward(torch.cat([x, cond], 1), encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=ts.expand(1).to(dev)).sample
      x = sched.step(v, ts, x).prev_sample
    sync()
    t1 = time.perf_counter()
    if vae is not None:
      for _ in range(4):  # background, foreground, alpha head, shadow head
        vae.decode(x[:, :, :h]).sample
    sync()
    return t1 - t0, time.perf_counter() - t1

  t0 = time.perf_counter()
  once()
  first = time.perf_counter() - t0
  runs = [once() for _ in range(args.repeats)]
  sampling = statistics.median(r[0] for r in runs)
  decoding = statistics.median(r[1] for r in runs)
  return {'seconds': {'total': sampling + decoding, 'sampling': sampling, 'decoding': decoding},
          'first_call_s': first, 'peak_memory': peak_memory_bytes('torch'),
          'compile': bool(args.compile)}


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
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  if args.one:  # a child process: one side of one config, its JSON on the last line
    name, side = args.one
    print(json.dumps((run_ours if side == 'ours' else run_peer)(name, args)))
    return {}
  passed = list(argv if argv is not None else sys.argv[1:])
  results = {}
  for name in args.configs:
    r = results[name] = {}
    for side in ('ours',) + (() if args.no_peer else ('peer',)):
      out = subprocess.run([sys.executable, __file__, *passed, '--one', name, side],
                           check=True, stdout=subprocess.PIPE, text=True).stdout
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
      print(f'  diffusers ({what}): {ps["total"]:.2f} s (sampling {ps["sampling"]:.2f}, '
            f'decoding {ps["decoding"]:.2f}), peak memory {peer["peak_memory"] / 2**30:.2f} '
            f'GiB; sampling ratio {ps["sampling"] / s["sampling"]:.2f}x, sampling + decoding '
            f'{(ps["sampling"] + ps["decoding"]) / (s["sampling"] + s["decoding"]):.2f}x '
            f'(> 1: layerjax faster)')
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
  return results


if __name__ == '__main__':
  main()
