"""The schema's own on-disk form (a folder of PNGs and `manifest.json`,
`schema.write_folder`) as one ZIP file, and back: what a user downloads or mails."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from layerjax.data.schema import LayeredSample, read_folder, write_folder
from layerjax.fileio import atomic_file, check_file


def write_zip(sample: LayeredSample, path, overwrite: bool = False) -> Path:
  """`sample`'s folder zipped at `path` (its files at the archive's top level), atomically;
  an existing file is replaced only with `overwrite`."""
  path = Path(path)
  check_file(path, overwrite)
  with tempfile.TemporaryDirectory() as tmp:
    folder = write_folder(sample, Path(tmp) / 'sample')
    with atomic_file(path) as out, zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:
      for f in sorted(folder.rglob('*')):
        if f.is_file():
          z.write(f, f.relative_to(folder).as_posix())
  return path


def read_zip(path) -> LayeredSample:
  """A sample from a ZIP `write_zip` wrote (read as `schema.read_folder` reads a folder:
  every file the manifest names must be in the archive)."""
  path = Path(path)
  try:
    z = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not a ZIP file ({e})') from None
  with z, tempfile.TemporaryDirectory() as tmp:
    for info in z.infolist():  # extract() drops '..' and absolute parts of member names
      z.extract(info, tmp)
    return read_folder(tmp)
