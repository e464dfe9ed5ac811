"""Command line: convert diffusers folders to Orbax checkpoints and back, and a trained
decomposer to its PyTorch export and back.

  python -m layerjax.convert from-diffusers SRC DST   # model or pipeline folder -> Orbax
  python -m layerjax.convert to-diffusers SRC DST     # Orbax -> diffusers folder(s)
  python -m layerjax.convert to-pytorch MODEL DST     # packed model or workdir -> PyTorch
  python -m layerjax.convert from-pytorch DST MODEL   # PyTorch export -> packed model

A pipeline folder (with transformer/ and vae/) converts each model into the same-named
subfolder of DST. A destination must be new or empty; one of the same kind (an Orbax
conversion, a diffusers model folder) is replaced only with `--overwrite`, and DST may not be,
contain or lie inside SRC; nothing is read before these checks pass. A NaN or Inf in a tensor
read or written is an error naming it (a warning with `--allow-nonfinite`). An error is one
line on stderr (exit 2 for bad input), with the traceback under `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import jax
import numpy as np

from layerjax import cli
from layerjax.convert import checkpoint, diffusers, pytorch
from layerjax.convert.files import MODEL_FOLDER, read_config
from layerjax.fileio import LOCK, check_destination, check_not_inside, output_lock
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


@contextlib.contextmanager
def _plan(src: Path, dst: Path, marker: str, artifact, overwrite: bool):
  """`sources`, once every destination is known to be writable and is locked against a
  second conversion into it (`.NAME.lock` beside it)."""
  check_not_inside(src, dst)
  plan = sources(src, marker)
  with contextlib.ExitStack() as locks:
    for sub, _ in plan:
      out = (dst / sub) if sub else dst
      locks.enter_context(output_lock(out.parent, name=f'.{out.name}{LOCK}'))
      check_destination(out, artifact, overwrite)
    yield plan


def from_diffusers(src: Path, dst: Path, overwrite: bool = False,
                   allow_nonfinite: bool = False) -> None:
  with _plan(src, dst, 'config.json', checkpoint.CHECKPOINT, overwrite) as plan:
    for sub, folder in plan:
      name = _kind_of(folder)
      model = diffusers.load(diffusers.kind(name), folder, allow_nonfinite=allow_nonfinite)
      checkpoint.save_checkpoint(model, name, dst / sub, overwrite)
      print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


def to_diffusers(src: Path, dst: Path, dtype, max_shard_size: int, overwrite: bool = False,
                 allow_nonfinite: bool = False) -> None:
  with _plan(src, dst, checkpoint.META, MODEL_FOLDER, overwrite) as plan:
    for sub, folder in plan:
      name, model = checkpoint.load_checkpoint(folder)
      diffusers.save(model, dst / sub, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, allow_nonfinite=allow_nonfinite)
      print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


@cli.entry
def main(argv: list[str]) -> int:
  parser = cli.ArgumentParser(prog='python -m layerjax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('from-diffusers', help='diffusers model/pipeline folder -> Orbax')
  p.add_argument('src', type=Path)
  p.add_argument('dst', type=Path)
  for name, what, src in (('to-diffusers', 'Orbax checkpoint -> diffusers folder', 'src'),
                          ('to-pytorch', 'packed decomposer model or training workdir -> '
                           'PyTorch export (diffusers pipeline layout)', 'model')):
    p = sub.add_parser(name, help=what)
    p.add_argument(src, type=Path)
    p.add_argument('dst', type=Path)
    p.add_argument('--dtype', choices=DTYPES, default=None,
                   help='cast saved tensors (default: keep the parameter dtype)')
    p.add_argument('--max-shard-size', type=_size, default='10GB',
                   help='shard above this size, e.g. 5GB, 500MB (default 10GB)')
  p = sub.add_parser('from-pytorch', help='PyTorch export -> packed decomposer model')
  p.add_argument('src', type=Path)
  p.add_argument('model', type=Path)
  p.add_argument('--overwrite', action='store_true',
                 help='replace a packed model already at MODEL')
  for p in [p for n, p in sub.choices.items() if n != 'from-pytorch']:
    p.add_argument('--overwrite', action='store_true',
                   help='replace a conversion of the same kind already at DST')
    p.add_argument('--allow-nonfinite', action='store_true',
                   help='warn about NaN / Inf tensors (naming them) instead of refusing them')
  args = parser.parse_args(argv)
  if args.command == 'from-diffusers':
    from_diffusers(args.src, args.dst, args.overwrite, args.allow_nonfinite)
  elif args.command == 'to-pytorch':
    pytorch.to_pytorch(args.model, args.dst, dtype=DTYPES.get(args.dtype),
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                       allow_nonfinite=args.allow_nonfinite)
    print(f'{args.model} -> {args.dst}')
  elif args.command == 'from-pytorch':
    pytorch.from_pytorch(args.src, args.model, overwrite=args.overwrite)
    print(f'{args.src} -> {args.model}')
  else:
    to_diffusers(args.src, args.dst, DTYPES.get(args.dtype), args.max_shard_size,
                 args.overwrite, args.allow_nonfinite)
  return 0


if __name__ == '__main__':
  sys.exit(main())
