"""Layer files people open: Photoshop (`psd`), OpenRaster (`ora`) and the PNG folder as a
ZIP (`png`), each written from a `LayeredSample` and read back into one, PowerPoint
(`powerpoint`, written only), and a contact sheet to look at (`preview`); `write` picks the
writer by format."""

from __future__ import annotations

from layerjax.export import ora, png, powerpoint, preview


def _write_psd(sample, path, overwrite: bool = False):
  # psd-tools (the [export] extra) loads on use: training draws its evaluation grids with
  # `preview` and runs where only [tpu,gcs] is installed.
  from layerjax.export import psd
  return psd.write_psd(sample, path, overwrite)


# Format name -> (file extension, writer(sample, path, overwrite)).
FORMATS = {'psd': ('.psd', _write_psd), 'ora': ('.ora', ora.write_ora),
           'pptx': ('.pptx', powerpoint.write_pptx), 'zip': ('.zip', png.write_zip),
           'preview': ('.preview.png', preview.write_preview)}


def write(sample, fmt: str, path, overwrite: bool = False):
  """`sample` as a `fmt` file at `path` (see `FORMATS`)."""
  return FORMATS[fmt][1](sample, path, overwrite)
