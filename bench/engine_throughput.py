"""Data-engine throughput at 512 px: photos/s decomposed and scenes/s synthesised, by the
local runner (in process and with worker processes) and by Apache Beam's DirectRunner, in
one run on the same inputs.

    python bench/engine_throughput.py [--photos 12] [--scenes 200] [--workers 2]

Photos are scikit-image's bundled real photographs (flipped and cropped copies to make up
the count), resized to 512 px on the longer side; the synthesis bank is their decomposed
objects over the photos as backgrounds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image
import skimage.data

from data_engine import config as engine_config
from data_engine import jobs, runners

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')  # bundled with scikit-image


def write_photos(root: Path, n: int, size: int) -> None:
  root.mkdir(parents=True)
  base = [getattr(skimage.data, name)() for name in PHOTOS]
  for i in range(n):
    img = base[i % len(base)]
    if (i // len(base)) % 2:
      img = img[:, ::-1]
    im = Image.fromarray(img[..., :3]).convert('RGB')
    s = size / max(im.size)
    im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS).save(
        root / f'{i:04d}_{PHOTOS[i % len(base)]}.png')


def timed(label: str, fn, count: int, unit: str) -> float:
  t0 = time.perf_counter()
  summary = fn()
  dt = time.perf_counter() - t0
  rate = count / dt
  print(f'  {label:<28} {rate:8.2f} {unit}/s  ({dt:6.1f} s, {summary["samples"]} samples, '
        f'{summary["dropped"]} dropped)')
  return rate


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--photos', type=int, default=12)
  p.add_argument('--scenes', type=int, default=200)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--workers', type=int, default=2)
  args = p.parse_args()
  config = engine_config.load(None, [f'decompose.max_side={args.size}',
                                     f'synthesize.size=({args.size}, {args.size})'])
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    write_photos(root / 'photos', args.photos, args.size)
    keys = jobs.list_photos(root / 'photos')
    make = jobs.make_decompose(config, root / 'photos')
    print(f'decompose: {len(keys)} photos at {args.size} px')
    rates = {
        'local': timed('local, in process', lambda: runners.run_local(
            keys, make, root / 'dec_local', progress=False), len(keys), 'photos'),
        'workers': timed(f'local, {args.workers} workers', lambda: runners.run_local(
            keys, make, root / 'dec_workers', args.workers, progress=False), len(keys),
            'photos'),
        'beam': timed('beam DirectRunner', lambda: runners.run_beam(
            keys, make, root / 'dec_beam'), len(keys), 'photos'),
    }
    print(f'  ratios: workers/local {rates["workers"] / rates["local"]:.2f}x, '
          f'beam/local {rates["beam"] / rates["local"]:.2f}x')

    bank = root / 'bank'
    (bank / 'backgrounds').mkdir(parents=True)
    for f in sorted((root / 'photos').iterdir()):
      (bank / 'backgrounds' / f.name).write_bytes(f.read_bytes())
    (root / 'dec_local' / 'samples').rename(bank / 'samples')
    make = jobs.make_synthesize(config, bank)
    scene_keys = jobs.scene_keys(0, args.scenes)
    print(f'synthesize: {args.scenes} scenes at {args.size}x{args.size}')
    rates = {
        'local': timed('local, in process', lambda: runners.run_local(
            scene_keys, make, root / 'syn_local', progress=False), args.scenes, 'scenes'),
        'workers': timed(f'local, {args.workers} workers', lambda: runners.run_local(
            scene_keys, make, root / 'syn_workers', args.workers, progress=False),
            args.scenes, 'scenes'),
        'beam': timed('beam DirectRunner', lambda: runners.run_beam(
            scene_keys, make, root / 'syn_beam'), args.scenes, 'scenes'),
    }
    print(f'  ratios: workers/local {rates["workers"] / rates["local"]:.2f}x, '
          f'beam/local {rates["beam"] / rates["local"]:.2f}x')
    same = all((root / 'syn_local' / 'samples' / d.name / 'image.png').read_bytes() ==
               (d / 'image.png').read_bytes()
               for d in (root / 'syn_beam' / 'samples').iterdir())
    print(f'  beam scenes identical to local: {same}')


if __name__ == '__main__':
  main()
