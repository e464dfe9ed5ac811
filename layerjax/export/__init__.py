"""Layer files people open: OpenRaster (`ora`) and the PNG folder as a ZIP (`png`), each
written from a `LayeredSample` and read back into one; `write` picks the writer by format."""

from __future__ import annotations

from layerjax.export import ora, png

# Format name (the file's extension) -> writer(sample, path, overwrite).
FORMATS = {'ora': ora.write_ora, 'zip': png.write_zip}


def write(sample, fmt: str, path, overwrite: bool = False):
  """`sample` as a `fmt` file at `path` (see `FORMATS`)."""
  return FORMATS[fmt](sample, path, overwrite)
