"""What the web app does for one user, without the web: the photo and the prompt they give,
the decomposition (`Decomposer.decompose`), the edits (`layerjax.edit.Document`) and the
layer files (`layerjax.export`). `layerjax.app.__main__` only wires these to Gradio.

A `Session` is one browser tab's state (Gradio's `gr.State` keeps one per tab, so nothing of
one user reaches another); every decomposition writes its files to a fresh folder of its
own under the app's root. Errors are the APIs' own one-line messages (`PromptError`,
`ImageError`, `EditError`), raised before any work.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from layerjax.data.schema import LayeredSample, composite
from layerjax.edit import Document, EditError
from layerjax.export import FORMATS, write
from layerjax.export.preview import picture
from layerjax.infer.decomposer import Decomposer
from layerjax.infer.prompts import BOX, POINT, PromptError, Query, parse_numbers

MODES = ('point', 'box')  # what a click on the photo adds
DOWNLOADS = ('psd', 'ora', 'pptx', 'zip')
TILE = 256  # gallery tiles' longer side, in pixels
MARK = (255, 40, 40)


@dataclasses.dataclass
class Edit:
  """One edit of an object, as the edit panel gives it: a shift (pixels), a scale, a colour
  change and a removal, applied in that order (`Document`: each is relative to the last)."""
  layer: str
  dx: float = 0.0
  dy: float = 0.0
  scale: float = 1.0
  hue: float = 0.0
  saturation: float = 1.0
  brightness: float = 1.0
  remove: bool = False

  def apply(self, doc: Document) -> Document:
    name = doc.find(self.layer)  # first: a layer that is gone is named as such
    if self == Edit(self.layer):
      raise EditError(f'edit of {name!r}: nothing to change (move, scale, recolour or '
                      'remove it)')
    if self.scale != 1:
      doc.scale(self.layer, self.scale)
    if self.dx or self.dy:
      doc.move(self.layer, self.dx, self.dy)
    if (self.hue, self.saturation, self.brightness) != (0, 1, 1):
      doc.recolour(self.layer, self.hue, self.saturation, self.brightness)
    if self.remove:
      doc.remove(self.layer)
    return doc


def parse_points(text: str) -> tuple[tuple[float, float], ...]:
  """'x,y; x,y' (pixels) -> the points."""
  try:
    return tuple(parse_numbers(part, 2, POINT)
                 for part in (text or '').replace('\n', ';').split(';') if part.strip())
  except PromptError as e:
    raise PromptError(f'prompt points (separated by ;): {e}') from None


def parse_box(text: str) -> tuple[float, float, float, float] | None:
  """'x0,y0,x1,y1' (pixels, end-exclusive) -> the box; '' -> None."""
  if not (text or '').strip():
    return None
  try:
    return parse_numbers(text, 4, BOX)
  except PromptError as e:
    raise PromptError(f'prompt box: {e}') from None


@dataclasses.dataclass
class Session:
  """One browser tab's photo, decomposition, edits and current layer files. The prompt
  itself lives in the page's fields (clicks write them), so typed and clicked prompts are
  one."""
  photo: np.ndarray | None = None  # float32 [H, W, 3]
  name: str = 'photo'  # the photo's file stem: the downloads' names
  corner: tuple[float, float] | None = None  # a box's first click
  result: LayeredSample | None = None  # the last decomposition, unedited
  edits: list[Edit] = dataclasses.field(default_factory=list)
  files: list[Path] = dataclasses.field(default_factory=list)  # the current layer files

  def _write(self, sample: LayeredSample, root) -> LayeredSample:
    """`sample`'s files in a new folder under `root` (named `<photo>-edited.*` once edited,
    so a browser does not save them over the unedited ones); the previous ones removed
    (Gradio serves copies of what it was given)."""
    stem = f'{self.name}-edited' if self.edits else self.name
    old, self.files = self.files, write_files(sample, root, stem)
    self.forget(old)
    return sample

  @staticmethod
  def forget(files) -> None:
    for folder in {Path(f).parent for f in files}:
      shutil.rmtree(folder, ignore_errors=True)

  # --- the photo and the prompt ---------------------------------------------------------

  @classmethod
  def load(cls, decomposer: Decomposer, path) -> 'Session':
    """A new session on the photo at `path` (refused above the decomposer's `max_pixels`
    before it is decoded, and when it is not an image)."""
    if path is None:
      return cls()
    return cls(photo=decomposer.load_image(path), name=_stem(path))

  def require_photo(self) -> np.ndarray:
    if self.photo is None:
      raise PromptError('photo: upload a photo or pick an example first')
    return self.photo

  def click(self, mode: str, x: float, y: float, points: str, box: str) -> tuple[str, str]:
    """A click at pixel (x, y) on the prompt texts `points` and `box`: a point added, or a
    corner of the box (the second click closes it; the box spans both clicked pixels)."""
    h, w = self.require_photo().shape[:2]
    if not (0 <= x < w and 0 <= y < h):
      raise PromptError(f'click ({x:g}, {y:g}) is outside the {w}x{h} image')
    if mode == 'point':
      return '; '.join(p for p in (points.strip(), f'{x:g},{y:g}') if p), box
    if mode != 'box':
      raise PromptError(f'click mode {mode!r}: expected one of {MODES}')
    if self.corner is None:
      self.corner = (float(x), float(y))
      return points, ''
    (x0, y0), self.corner = self.corner, None
    corners = (min(x0, x), min(y0, y), max(x0, x) + 1, max(y0, y) + 1)
    return points, ','.join(str(int(v)) for v in corners)

  def overlay(self, points: str = '', box: str = '') -> np.ndarray | None:
    """uint8: the photo with the points (dots) and the box (or its first corner) drawn;
    malformed texts draw nothing (they are refused when the prompt is used)."""
    if self.photo is None:
      return None
    im = Image.fromarray((self.photo * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = max(2, round(max(im.size) / 100))
    width = max(1, r // 2)
    try:
      dots, rect = parse_points(points), parse_box(box)
    except PromptError:
      dots, rect = (), None
    for x, y in dots:
      draw.ellipse((x - r, y - r, x + r, y + r), fill=MARK, outline=(255, 255, 255))
    if rect is not None and rect[2] > rect[0] and rect[3] > rect[1]:
      x0, y0, x1, y1 = rect
      draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=MARK, width=width)
    if self.corner is not None:
      x, y = self.corner
      draw.line((x - 2 * r, y, x + 2 * r, y), fill=MARK, width=width)
      draw.line((x, y - 2 * r, x, y + 2 * r), fill=MARK, width=width)
    return np.asarray(im)

  @staticmethod
  def query(points: str = '', box: str = '', mask=None, text: str = '') -> Query:
    """The prompt from the app's fields; `mask`: bool [H, W] (painted), or None."""
    return Query(points=parse_points(points), box=parse_box(box), mask=mask,
                 text=(text or '').strip())

  # --- decomposing, editing, files ------------------------------------------------------

  def decompose(self, decomposer: Decomposer, query: Query | None, root, *, seeds: int = 1,
                seed: int = 0, steps: int | None = None, guidance: float = 1.0,
                max_layers: int | None = None) -> LayeredSample:
    """The photo's layers for `query` (None: the whole scene, at most `max_layers`
    objects); the edits start over and the files are written to a new folder in `root`."""
    photo = self.require_photo()
    sample = decomposer.decompose(photo, query, seeds=seeds, seed=seed, steps=steps,
                                  guidance=guidance, max_layers=max_layers,
                                  sample_id=self.name)
    self.result, self.edits = sample, []
    return self._write(sample, root)

  def edited(self) -> LayeredSample:
    """The decomposition with the edits so far (each drawn once from the original pixels)."""
    if self.result is None:
      raise EditError('edit: decompose a photo first')
    if not self.edits:
      return self.result
    doc = Document(self.result)
    for e in self.edits:
      e.apply(doc)
    return doc.render(self.result.id)

  def edit(self, e: Edit, root) -> LayeredSample:
    """The edit added (refused, and nothing changed, when it cannot be made: a layer that
    is gone or never was, a scale <= 0), its files written to a new folder in `root`."""
    before = self.edits
    self.edits = before + [e]
    try:
      sample = self.edited()
    except EditError:
      self.edits = before
      raise
    return self._write(sample, root)

  def undo(self, root) -> LayeredSample:
    """The last edit taken back."""
    if self.result is not None and not self.edits:
      raise EditError('undo: no edit to take back')
    self.edits = self.edits[:-1]
    return self._write(self.edited(), root)

  def objects(self) -> list[str]:
    """The object layers an edit can name: those of the decomposition still in the edit."""
    if self.result is None:
      return []
    live = {layer.name for layer in self.edited().layers}
    return [l.name for l in self.result.layers if l.kind == 'object' and l.name in live]


def _stem(path) -> str:
  """A safe download name from an uploaded file's name (never a path)."""
  stem = ''.join(c if c.isalnum() or c in '-_' else '_' for c in Path(str(path)).stem)
  return stem[:64] or 'photo'


def write_files(sample: LayeredSample, root, stem: str) -> list[Path]:
  """PSD, ORA, PPTX and the ZIP of PNGs of `sample` in a new folder under `root`."""
  folder = Path(tempfile.mkdtemp(prefix='layers-', dir=root))
  return [write(sample, fmt, folder / f'{stem}{FORMATS[fmt][0]}') for fmt in DOWNLOADS]


def gallery(sample: LayeredSample) -> list[tuple[np.ndarray, str]]:
  """(picture, caption) per layer, back to front, each over a checkerboard with its name."""
  out = []
  for layer in sample.layers:
    caption = layer.name if not layer.label else f'{layer.name} ({layer.label})'
    out.append(((picture(layer.rgba, TILE) * 255).round().astype(np.uint8), caption))
  return out


def recomposition(sample: LayeredSample) -> np.ndarray:
  """uint8 [H, W, 3]: the layers composited, back to front."""
  return (np.clip(composite(sample.layers)[..., :3], 0, 1) * 255).round().astype(np.uint8)


def timings(sample: LayeredSample) -> str:
  """The decomposition's timings (seconds) as a Markdown table."""
  t = sample.provenance.get('timings', {})
  rows = '\n'.join(f'| {k} | {v:.2f} |' for k, v in t.items() if isinstance(v, (int, float)))
  return f'| stage | seconds |\n|---|---|\n{rows}' if rows else ''
