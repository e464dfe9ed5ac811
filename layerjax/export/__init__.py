"""Layer files people open: Photoshop (`psd`), OpenRaster (`ora`) and the PNG folder as a
ZIP (`png`), each written from a `LayeredSample` and read back into one, PowerPoint
(`powerpoint`, written only), and a contact sheet to look at (`preview`); `write` picks the
writer by format."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerjax.data.schema import read_folder
from layerjax.export import ora, png, powerpoint, preview
from layerjax.fileio import check_file


def _write_psd(sample, path, overwrite: bool = False):
  # psd-tools (the [export] extra) loads on use: training draws its evaluation grids with
  # `preview` and runs where only [tpu,gcs] is installed.
  from layerjax.export import psd
  return psd.write_psd(sample, path, overwrite)


# Format name -> (file extension, writer(sample, path, overwrite)).
FORMATS = {'psd': ('.psd', _write_psd), 'ora': ('.ora', ora.write_ora),
           'pptx': ('.pptx', powerpoint.write_pptx), 'zip': ('.zip', png.write_zip),
           'preview': ('.preview.png', preview.write_preview)}


def _read_psd(path):
  from layerjax.export import psd
  return psd.read_psd(path)


# File extension -> reader(path): the formats that come back into a `LayeredSample`.
READERS = {'.psd': _read_psd, '.ora': ora.read_ora, '.zip': png.read_zip}


def read(path):
  """A `LayeredSample` from a sample folder or a `.psd`, `.ora` or `.zip` layer file (one a
  user edited in Photoshop, GIMP or Krita and saved, say)."""
  path = Path(path)
  if path.is_dir():
    return read_folder(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file or folder')
  reader = READERS.get(path.suffix.lower())
  if reader is None:
    raise ValueError(f'{path}: not a sample folder nor a layer file '
                     f'({", ".join(READERS)})')
  return reader(path)


def write(sample, fmt: str, path, overwrite: bool = False):
  """`sample` as a `fmt` file at `path` (see `FORMATS`)."""
  return FORMATS[fmt][1](sample, path, overwrite)


def formats(text: str) -> tuple[str, ...]:
  """An argparse type: comma-separated names from `FORMATS`."""
  names = tuple(dict.fromkeys(n.strip() for n in text.split(',') if n.strip()))
  unknown = [n for n in names if n not in FORMATS]
  if not names or unknown:
    raise argparse.ArgumentTypeError(f'expected some of {",".join(FORMATS)}, got {text!r}')
  return names


def destinations(stem, fmts, overwrite: bool = False) -> list[tuple[str, Path]]:
  """(format, path) for each of `fmts`: `stem` with the format's extension added
  (`out/mug` -> `out/mug.psd`), each checked as its writer will (`check_file`), so that a
  command refuses before it writes anything."""
  stem = Path(stem)
  out = [(fmt, stem.with_name(stem.name + FORMATS[fmt][0])) for fmt in fmts]
  for _, path in out:
    check_file(path, overwrite)
  return out
