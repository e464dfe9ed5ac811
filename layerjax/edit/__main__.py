"""Command line: edit a decomposition, its shadows following its objects, or recompose one.

  python -m layerjax.edit SAMPLE --move mug:+40,0 --scale mug:1.2 --remove cat \\
      --recolor mug:hue+30 --order mug:top --background new.jpg --out edited/ \\
      [--format psd,ora,zip,pptx,preview] [--id NAME] [--overwrite]

SAMPLE is a sample folder or a layer file (`.psd`, `.ora`, `.zip`: one edited in Photoshop,
GIMP or Krita and saved, say); with no edit, it is recomposed as it is. An object is named
by its layer name (`object_2`) or its label (`mug`); its shadow follows
it. Edits (each may be repeated):
  --move NAME:DX,DY       pixels, x right, y down
  --scale NAME:F          F > 0, about the object's ground contact
  --remove NAME           the object and its shadow; the completed background shows
  --recolor NAME:SPEC     SPEC: comma-separated hue+DEG / hue-DEG, saturation*F, brightness*F
  --order NAME:WHERE      top, bottom, up, down, or an index from 0 (the back)
  --background FILE       a new background; a photo of another size is scaled to cover the
                          canvas and centre-cropped (a note says so), or refused with
                          --exact-size
Writes OUT/<id>/ (the edited sample folder), OUT/<id>.png (its composite) and OUT/<id>.<ext>
for each `--format`; <id> is the sample's id + '-edited' unless `--id` is given. Every
edit and destination is checked before anything is written; an existing file is replaced
only with `--overwrite`. Errors are one line on stderr (exit 2 for bad input).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from layerjax import cli
from layerjax.data import images
from layerjax.data.schema import SAMPLE_FOLDER, encode_png, write_folder
from layerjax.edit.document import ORDER, Document, EditError
from layerjax.export import destinations, formats, read, write
from layerjax.fileio import OutputError, atomic_file, check_destination, check_file, safe_name


def _split(text: str, what: str) -> tuple[str, str]:
  name, sep, value = text.rpartition(':')
  if not sep or not name or not value:
    raise argparse.ArgumentTypeError(f'expected NAME:{what}, got {text!r}')
  return name, value


def _move(text: str):
  name, value = _split(text, 'DX,DY')
  try:
    dx, dy = (float(v) for v in value.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected NAME:DX,DY (pixels), got {text!r}') from None
  return name, dx, dy


def _scale(text: str):
  name, value = _split(text, 'FACTOR')
  try:
    return name, float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected NAME:FACTOR, got {text!r}') from None


_CHANGE = re.compile(r'(hue)([+-].+)|(saturation|brightness)\*(.+)')


def _recolour(text: str):
  """NAME:hue+30,saturation*1.2,brightness*0.9 -> (name, {hue, saturation, brightness})."""
  name, value = _split(text, 'hue+DEG,saturation*F,brightness*F')
  change = {}
  for part in value.split(','):
    m = _CHANGE.fullmatch(part.strip())
    key, number = (m[1] or m[3], m[2] or m[4]) if m else (None, None)
    try:
      change[key] = float(number) if key not in change else None
    except (TypeError, ValueError):
      change[key] = None
    if key is None or change[key] is None:
      raise argparse.ArgumentTypeError(f'{part.strip()!r} in {text!r}: expected hue+DEG or '
                                       f'hue-DEG, saturation*F, brightness*F (each once)')
  return name, change


def _order(text: str):
  name, value = _split(text, '|'.join(ORDER) + '|INDEX')
  if value in ORDER:
    return name, value
  try:
    return name, int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected NAME:{"|".join(ORDER)}|INDEX, got {text!r}') from None


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m layerjax.edit',
                         description='Edit a decomposition: its shadows follow its objects.')
  p.add_argument('sample', type=Path,
                 help='a sample folder (python -m layerjax.decompose) or a .psd, .ora, .zip')
  p.add_argument('--out', required=True, type=Path, help='the folder to write into')
  p.add_argument('--move', type=_move, action='append', default=[], metavar='NAME:DX,DY')
  p.add_argument('--scale', type=_scale, action='append', default=[], metavar='NAME:F')
  p.add_argument('--remove', action='append', default=[], metavar='NAME')
  p.add_argument('--recolor', '--recolour', dest='recolour', type=_recolour, action='append',
                 default=[], metavar='NAME:SPEC')
  p.add_argument('--order', type=_order, action='append', default=[], metavar='NAME:WHERE')
  p.add_argument('--background', type=Path, help='a photo: the new background')
  p.add_argument('--exact-size', action='store_true',
                 help='refuse a background of another size instead of resizing it')
  p.add_argument('--format', type=formats, default=(), help='layer files to write as well')
  p.add_argument('--id', help="the edited sample's id (default: the sample's + '-edited')")
  p.add_argument('--overwrite', action='store_true', help='replace files already there')
  return p


def edit(doc: Document, a) -> str | None:
  """Applies the command line's edits to `doc`: geometry, colour and order (each in the
  order given; moves and scales about the object's own contact commute), then removals and
  the background. Returns a note when the background was resized."""
  for name, dx, dy in a.move:
    doc.move(name, dx, dy)
  for name, factor in a.scale:
    doc.scale(name, factor)
  for name, change in a.recolour:
    doc.recolour(name, **change)
  for name, where in a.order:
    doc.reorder(name, where)
  for name in a.remove:
    doc.remove(name)
  if a.background is None:
    return None
  h, w = doc.sample.size
  image = images.load_image(a.background, alpha='composite')
  note = None
  if image.shape[:2] != (h, w):
    if a.exact_size:
      raise images.ImageError(f'{a.background}: {image.shape[1]}x{image.shape[0]}, the '
                              f'sample is {w}x{h} (--exact-size)')
    note = (f'{a.background}: {image.shape[1]}x{image.shape[0]} scaled to cover {w}x{h} '
            f'and centre-cropped')
    image = images.scale_to_cover(image, (h, w))
  doc.replace_background(image, source=a.background.name)
  return note


@cli.entry
def main(argv: list[str]) -> int:
  a = _parser().parse_args(argv)
  if a.out.exists() and not a.out.is_dir():
    raise OutputError(f'{a.out}: is a file, not a folder')
  doc = Document(read(a.sample))
  try:
    note = edit(doc, a)
  except EditError as e:
    raise EditError(f'{a.sample}: {e}') from None
  sid = a.id or f'{doc.sample.id}-edited'
  stem = a.out / safe_name(sid)
  check_destination(stem, SAMPLE_FOLDER, a.overwrite)
  picture = stem.with_name(stem.name + '.png')
  check_file(picture, a.overwrite)
  files = destinations(stem, a.format, a.overwrite)
  if note:
    print(f'note: {note}')
  sample = doc.render(sid)
  write_folder(sample, stem, overwrite=a.overwrite)
  with atomic_file(picture) as tmp:
    tmp.write_bytes(encode_png(sample.image))
  for fmt, path in files:
    write(sample, fmt, path, overwrite=a.overwrite)
  done = (f'after {len(doc.edits)} edits ({", ".join(e["edit"] for e in doc.edits)})'
          if doc.edits else 'recomposed')
  print(f'{stem}: {len(sample.layers)} layers {done}')
  for path in [picture] + [p for _, p in files]:
    print(f'  {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
