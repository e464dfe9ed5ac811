"""Command line: layer files from sample folders (what `python -m layerjax.decompose` and the
data engine write) or from other layer files.

  python -m layerjax.export SAMPLE [SAMPLE ...] --format psd,ora,pptx,zip,preview --out OUT

A SAMPLE is a sample folder or a layer file (.psd, .ora, .zip): PSD to ORA works too.

Writes OUT/<sample id>.psd, .ora, ... (`.preview.png`: a contact sheet) for each sample and
format asked for. Every sample is read and every destination checked before anything is
written; an existing file is replaced only with
`--overwrite`. Errors are one line on stderr (exit 2 for bad input).
"""

from __future__ import annotations

import sys
from pathlib import Path

from layerjax import cli
from layerjax.export import FORMATS, destinations, formats, read, write
from layerjax.fileio import OutputError, safe_name


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.export',
                         description='Layer files (Photoshop, OpenRaster, PowerPoint, ZIP of '
                                     'PNGs, contact sheet) from sample folders or layer files.')
  p.add_argument('samples', nargs='+', type=Path,
                 help='sample folders or layer files (.psd, .ora, .zip)')
  p.add_argument('--format', type=formats, required=True, help=','.join(FORMATS))
  p.add_argument('--out', type=Path, required=True, help='the folder to write the files into')
  p.add_argument('--overwrite', action='store_true', help='replace files already there')
  a = p.parse_args(argv)
  if a.out.exists() and not a.out.is_dir():
    raise OutputError(f'{a.out}: is a file, not a folder')
  samples = [read(path) for path in a.samples]
  jobs = [(s, fmt, path) for s in samples
          for fmt, path in destinations(a.out / safe_name(s.id), a.format, a.overwrite)]
  paths = [path for _, _, path in jobs]
  for path in paths:
    if paths.count(path) > 1:
      raise ValueError(f'{path}: two samples have the same id')
  for sample, fmt, path in jobs:
    write(sample, fmt, path, overwrite=a.overwrite)
    print(f'{path}: {len(sample.layers)} layers ({fmt})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
