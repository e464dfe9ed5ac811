"""Command line: convert diffusers folders to Orbax checkpoints and back.

  python -m layerjax.convert from-diffusers SRC DST   # model or pipeline folder -> Orbax
  python -m layerjax.convert to-diffusers SRC DST     # Orbax -> diffusers folder(s)

A pipeline folder (with transformer/ and vae/) converts each model into the same-named
subfolder of DST. A destination must be new or empty; one of the same kind (an Orbax
conversion, a diffusers model folder) is replaced only with `--overwrite`, and DST may not be,
contain or lie inside SRC. Nothing is read before these checks pass.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import jax
import numpy as np

from layerjax.convert import checkpoint, diffusers
from layerjax.convert.files import MODEL_FOLDER, read_config
from layerjax.fileio import LOCK, check_destination, check_not_inside, output_lock
from layerjax.models.common import parameter_count

DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': jax.numpy.bfloat16}
KINDS = ('transformer', 'vae')


def _size(text: str) -> int:
  units = {'KB': 2**10, 'MB': 2**20, 'GB': 2**30}
  for unit, factor in units.items():
    if text.upper().endswith(unit):
      return int(float(text[:-2]) * factor)
  return int(text)


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


def from_diffusers(src: Path, dst: Path, overwrite: bool = False) -> None:
  with _plan(src, dst, 'config.json', checkpoint.CHECKPOINT, overwrite) as plan:
    for sub, folder in plan:
      name = _kind_of(folder)
      model = diffusers.load(diffusers.kind(name), folder)
      checkpoint.save_checkpoint(model, name, dst / sub, overwrite)
      print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


def to_diffusers(src: Path, dst: Path, dtype, max_shard_size: int,
                 overwrite: bool = False) -> None:
  with _plan(src, dst, checkpoint.META, MODEL_FOLDER, overwrite) as plan:
    for sub, folder in plan:
      name, model = checkpoint.load_checkpoint(folder)
      diffusers.save(model, dst / sub, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite)
      print(f'{name}: {parameter_count(model):,} parameters  {folder} -> {dst / sub}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m layerjax.convert', description=__doc__,
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
    p.add_argument('--overwrite', action='store_true',
                   help='replace a conversion of the same kind already at DST')
  args = parser.parse_args(argv)
  try:
    if args.command == 'from-diffusers':
      from_diffusers(args.src, args.dst, args.overwrite)
    else:
      to_diffusers(args.src, args.dst, DTYPES.get(args.dtype), args.max_shard_size,
                   args.overwrite)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
