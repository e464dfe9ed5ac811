"""What users point at: a `Query` (points, a box, a mask, a text, or several), checked
against the photo before any compute (`check_query`); errors are `PromptError`s, one line
naming the prompt field and the problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class PromptError(ValueError):
  """A prompt the model cannot take; the message names the prompt field and the problem."""


@dataclasses.dataclass
class Query:
  """What to decompose: one or several points (x, y), a box (x0, y0, x1, y1, end-exclusive),
  a mask (bool [H, W], or a path to a PNG whose pixels >= 128 are in it), a text, or any
  combination. Coordinates are the photo's pixels."""
  points: tuple[tuple[float, float], ...] = ()
  box: tuple[int, int, int, int] | None = None
  mask: Any = None
  text: str = ''

  @property
  def kinds(self) -> frozenset[str]:
    return frozenset(k for k, given in (('point', self.points), ('box', self.box is not None),
                                        ('mask', self.mask is not None), ('text', self.text))
                     if given)


POINT, BOX = 'x,y (pixels)', 'x0,y0,x1,y1 (pixels)'  # how a point and a box are typed


def parse_numbers(text: str, n: int, form: str) -> tuple[float, ...]:
  """A typed point or box: `n` comma-separated numbers (`form` says how, e.g. `BOX`)."""
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != n:
    raise PromptError(f'expected {form}, got {text.strip()!r}')
  return values


def as_query(prompt) -> Query | None:
  """None (whole scene), a `Query`, a text, or a dict of `Query`'s fields."""
  if prompt is None or isinstance(prompt, Query):
    return prompt
  if isinstance(prompt, str):
    return Query(text=prompt)
  if isinstance(prompt, dict):
    unknown = set(prompt) - {f.name for f in dataclasses.fields(Query)}
    if unknown:
      raise PromptError(f'prompt: unknown fields {sorted(unknown)} (points, box, mask, text)')
    return Query(**prompt)
  raise PromptError(f'prompt: expected None, a text, a dict or a Query, got '
                    f'{type(prompt).__name__}')


def check_query(q: Query, size: tuple[int, int]) -> Query:
  """The query with its mask loaded and every field checked against the photo's size."""
  h, w = size
  points = []
  for p in q.points:
    if len(p) != 2:
      raise PromptError(f'prompt point {tuple(p)}: expected (x, y)')
    x, y = float(p[0]), float(p[1])
    if not (0 <= x < w and 0 <= y < h):
      raise PromptError(f'prompt point ({x:g}, {y:g}) is outside the {w}x{h} image')
    points.append((x, y))
  box = q.box
  if box is not None:
    if len(box) != 4:
      raise PromptError(f'prompt box {tuple(box)}: expected (x0, y0, x1, y1)')
    box = tuple(int(round(float(v))) for v in box)
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
      raise PromptError(f'prompt box {box} has zero area (x1 <= x0 or y1 <= y0)')
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
      raise PromptError(f'prompt box {box} is outside the {w}x{h} image')
  mask = q.mask
  if mask is not None:
    name = 'prompt mask'
    if isinstance(mask, (str, Path)):
      name = f'prompt mask {mask}'
      if not Path(mask).is_file():
        raise PromptError(f'{name}: no such file')
      try:
        with Image.open(mask) as im:
          mask = np.asarray(im.convert('L')) >= 128
      except OSError as e:
        raise PromptError(f'{name}: not a readable image ({e})') from None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
      mask = mask > (127 if mask.dtype == np.uint8 else 0.5)
    if mask.shape != (h, w):
      raise PromptError(f'{name}: shape {mask.shape[:2]}, but the image is {h}x{w}')
    if not mask.any():
      raise PromptError(f'{name} is empty')
  if not isinstance(q.text, str):
    raise PromptError(f'prompt text: expected a string, got {type(q.text).__name__}')
  return Query(tuple(points), box, mask, q.text.strip())
