"""Command line: convert diffusers folders to Orbax checkpoints and back.

  python -m layerjax.convert from-diffusers SRC DST   # model or pipeline folder -> Orbax
  python -m layerjax.convert to-diffusers SRC DST     # Orbax -> diffusers folder(s)

A pipeline folder (with transformer/ and vae/) converts each model into the same-named
subfolder of DST. A NaN or Inf in a tensor read or written is an error naming it (a warning
with `--allow-nonfinite`). An error is one line on stderr (exit 2 for bad input), with the
traceback under `--verbose`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from layerjax import cli
from layerjax.convert import checkpoint, diffusers
from layerjax.convert.files import read_config
from layerjax.models.common import parameter_count

DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': jax.numpy.bfloat16}
KINDS = ('transformer', 'vae')


def _size(text: str) -> int:
  """'10GB', '500MB', '64KB' or a number of bytes, > 0."""
  units = {'KB': 2**10, 'MB': 2**20, 'GB': 2**30}
  number, factor = text, 1
  for unit, f in units.items():
    if text.upper().endswith(unit):
      number, factor = text[:-2], f
  try:
    size = int(float(number) * factor)
  except ValueError:
    size = 0
  if size <= 0:
    raise argparse.ArgumentTypeError(f'expected a size > 0 such as 5GB, 500MB or 1024, '
                                     f'got {text!r}')
  return size


def _kind_of(folder: Path) -> str:
  cls = read_config(folder).get('_class_name')
  for name in KINDS:
    if diffusers.kind(name).diffusers_class == cls:
      return name
  raise ValueError(f'{folder}/config.json: unsupported _class_name {cls!r}')


def sources(src: Path, marker: str) -> list[tuple[str, Path]]:
  """(subfolder or '', folder) pairs: `src` itself, or its model subfolders."""
  if (src / marker).is_file():
    return [('', src)]
  found = [(k, src / k) for k in KINDS if (src / k / marker).is_file()]
  if not found:
    raise FileNotFoundError(f'{src}: no {marker} here nor in {"/, ".join(KINDS)}/ subfolders')
  return found


def from_diffusers(src: Path, dst: Path, allow_nonfinite: bool = False) -> None:
  for sub, folder in sources(src, 'config.json'):
    name = _kind_of(folder)
    model = diffusers.load(diffusers.kind(name), folder, allow_nonfinite=allow_nonfinite)
    checkpoint.save_checkpoint(model, name, dst / sub)
    print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


def to_diffusers(src: Path, dst: Path, dtype, max_shard_size: int,
                 allow_nonfinite: bool = False) -> None:
  for sub, folder in sources(src, checkpoint.META):
    name, model = checkpoint.load_checkpoint(folder)
    diffusers.save(model, dst / sub, dtype=dtype, max_shard_size=max_shard_size,
                   allow_nonfinite=allow_nonfinite)
    print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


@cli.entry
def main(argv: list[str]) -> int:
  parser = cli.ArgumentParser(prog='python -m layerjax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('from-diffusers', help='diffusers model/pipeline folder -> Orbax')
  p.add_argument('src', type=Path)
  p.add_argument('dst', type=Path)
  p = sub.add_parser('to-diffusers', help='Orbax checkpoint -> diffusers folder')
  p.add_argument('src', type=Path)
  p.add_argument('dst', type=Path)
  p.add_argument('--dtype', choices=DTYPES, default=None,
                 help='cast saved tensors (default: keep the parameter dtype)')
  p.add_argument('--max-shard-size', type=_size, default='10GB',
                 help='shard above this size, e.g. 5GB, 500MB (default 10GB)')
  for p in sub.choices.values():
    p.add_argument('--allow-nonfinite', action='store_true',
                   help='warn about NaN / Inf tensors (naming them) instead of refusing them')
  args = parser.parse_args(argv)
  if args.command == 'from-diffusers':
    from_diffusers(args.src, args.dst, args.allow_nonfinite)
  else:
    to_diffusers(args.src, args.dst, DTYPES.get(args.dtype), args.max_shard_size,
                 args.allow_nonfinite)
  return 0


if __name__ == '__main__':
  sys.exit(main())
