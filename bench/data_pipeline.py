"""Loader throughput: samples per second of `layerjax.data.pipeline` at 512x512, all transforms on.

Builds a small `layered` TFDS dataset of synthetic scenes (a gradient background with
`--objects` soft-edged discs, each with a shadow), then times the Grain loader with every
transform enabled (referring targets, prompt images of every kind, jittered checkerboard,
crop and flip, all six boundary degradations) for each worker count in `--workers`.

    python bench/data_pipeline.py [--samples 24] [--size 512] [--batch 4] [--workers 0 2]

In the same run it times one training step of the demo model (`bench/train_step.py`,
configs/liwi.py:demo) and prints how many times faster the loader delivers samples than
that step consumes them (> 1: the loader keeps up). `--no-train-step` skips it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np

from layerjax.data import schema
from layerjax.data.pipeline import make_loader
from layerjax.data.schema import Layer, LayeredSample, Prompt
from layerjax.data.tfds_builder import Layered


def scene(seed: int, size: int, num_objects: int) -> LayeredSample:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  bg = np.stack([xx, yy, np.full_like(xx, rng.uniform()), np.ones_like(xx)], -1)
  layers = [Layer('background', 'background', bg.astype(np.float32))]
  prompts = []
  for k in range(1, num_objects + 1):
    cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.7), rng.uniform(0.08, 0.15)
    disc = np.clip((r - np.hypot(xx - cx, yy - cy)) * size / 2, 0, 1)
    shade = np.clip(1 - np.hypot((xx - cx - 0.03) / (1.3 * r), (yy - cy - r) / (0.3 * r)), 0, 1)
    obj = np.concatenate([np.broadcast_to(rng.uniform(0, 1, 3), disc.shape + (3,)),
                          disc[..., None]], -1).astype(np.float32)
    shadow = np.concatenate([np.zeros(disc.shape + (3,)), 0.5 * shade[..., None]],
                            -1).astype(np.float32)
    layers += [Layer(f'shadow_{k}', 'shadow', shadow, owner=f'object_{k}'),
               Layer(f'object_{k}', 'object', obj, label='disc',
                     referring=(f'disc number {k}',))]
    box = schema.alpha_bbox(disc)
    prompts.append(Prompt(f'object_{k}', points=((cx * size, cy * size),), box=box,
                          mask=disc > 0.5))
  for layer, mask in zip(layers, schema.visible_masks(layers)):
    layer.visible_mask, layer.bbox = mask, schema.alpha_bbox(layer.rgba[..., 3])
  image = schema.composite(layers)[..., :3].astype(np.float32)
  return LayeredSample(f'scene-{seed}', image, layers, prompts, {'source': 'bench'})


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--samples', type=int, default=24)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--objects', type=int, default=2)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--batches', type=int, default=30, help='timed batches per setting')
  p.add_argument('--warmup', type=int, default=10,
                 help='untimed batches first: Grain prefetches on threads, so early batches '
                      'arrive ready-made and would overstate the rate')
  p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  p.add_argument('--no-train-step', action='store_true')
  args = p.parse_args()
  rates = {}
  if not args.no_train_step:  # first: a live loader's prefetching would compete for the CPU
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_step
    config = train_step.load_config('demo')
    config.mesh = (1, 1, 1)
    step = train_step.time_ours(config, steps=10, warmup=2)['step_s']
    consumed = config.data.global_batch_size / step
    print(f'demo training step (batch {config.data.global_batch_size}): {step * 1000:.0f} ms, '
          f'consumes {consumed:.1f} samples/s')

  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    t0 = time.perf_counter()
    for s in range(args.samples):
      schema.write_folder(scene(s, args.size, args.objects), root / 'src' / f'{s:04d}')
    Layered(data_dir=root / 'tfds', sources={'train': root / 'src'}).download_and_prepare()
    print(f'built {args.samples} samples of {args.size}x{args.size} with {args.objects} '
          f'objects in {time.perf_counter() - t0:.1f} s')
    degradations = {n: {'prob': 1.0, 'strength': s} for n, s in [
        ('erode', (1, 2)), ('dilate', (1, 2)), ('blur', (0.5, 2.0)), ('halo', (0.1, 0.4)),
        ('spill', (0.1, 0.4)), ('jpeg', (30, 80))]}
    for workers in args.workers:
      config = ml_collections.ConfigDict(dict(
          name='layered', data_dir=str(root / 'tfds'), seed=0, global_batch_size=args.batch,
          image_size=(args.size, args.size), num_workers=workers,
          prompt_probs={'box': 0.25, 'mask': 0.25, 'point': 0.2, 'text': 0.1,
                        'box+text': 0.2},
          point_sigma=args.size / 64, hflip_prob=0.5, checkerboard_cell=args.size // 16,
          checkerboard_jitter=0.1, degradations=degradations, boundary_band=args.size // 64,
          scale_range=(1.0, 1.25)))
      it = iter(make_loader(config, 'train', None))
      for _ in range(args.warmup):
        next(it)
      t0 = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      dt = time.perf_counter() - t0
      del it  # stops its prefetching before the next setting is timed
      rates[workers] = args.batches * args.batch / dt
      print(f'workers={workers}: {rates[workers]:7.1f} samples/s '
            f'({dt / args.batches * 1000:.0f} ms per batch of {args.batch})')
  if args.no_train_step:
    return
  for workers, rate in rates.items():
    print(f'loader ({args.size} px, workers={workers}) / demo step: {rate / consumed:.2f}x')

if __name__ == '__main__':
  main()
