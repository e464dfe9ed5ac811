"""Command line: layer files from sample folders (what `python -m layerjax.decompose` and the
data engine write).

  python -m layerjax.export SAMPLE_DIR [SAMPLE_DIR ...] --format ora,zip,preview --out OUT

Writes OUT/<sample id>.ora, .zip and .preview.png (a contact sheet) for each sample and
format asked for. Every sample is read and every
destination checked before anything is written; an existing file is replaced only with
`--overwrite`. Errors are one line on stderr (exit 2 for bad input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerjax import cli
from layerjax.data.schema import read_folder
from layerjax.export import FORMATS, write
from layerjax.fileio import OutputError, check_file, safe_name


def formats(text: str) -> tuple[str, ...]:
  """An argparse type: comma-separated names from `FORMATS`."""
  names = tuple(dict.fromkeys(n.strip() for n in text.split(',') if n.strip()))
  unknown = [n for n in names if n not in FORMATS]
  if not names or unknown:
    raise argparse.ArgumentTypeError(f'expected some of {",".join(FORMATS)}, got {text!r}')
  return names


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.export',
                         description='Layer files (OpenRaster, ZIP of PNGs, contact sheet) from '
                                     'sample folders.')
  p.add_argument('samples', nargs='+', type=Path, help='sample folders')
  p.add_argument('--format', type=formats, required=True, help=','.join(FORMATS))
  p.add_argument('--out', type=Path, required=True, help='the folder to write the files into')
  p.add_argument('--overwrite', action='store_true', help='replace files already there')
  a = p.parse_args(argv)
  if a.out.exists() and not a.out.is_dir():
    raise OutputError(f'{a.out}: is a file, not a folder')
  samples = [read_folder(folder) for folder in a.samples]
  jobs = [(s, fmt, a.out / f'{safe_name(s.id)}{FORMATS[fmt][0]}') for s in samples
          for fmt in a.format]
  seen = set()
  for _, _, path in jobs:
    if path in seen:
      raise ValueError(f'{path}: two samples have the same id')
    seen.add(path)
    check_file(path, a.overwrite)
  for sample, fmt, path in jobs:
    write(sample, fmt, path, overwrite=a.overwrite)
    print(f'{path}: {len(sample.layers)} layers ({fmt})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
