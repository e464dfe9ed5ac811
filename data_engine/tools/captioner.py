"""Layer text without models: the `template` captioner and `dominant_colour`.

A caption names the layer's dominant colour (a vote over a small Lab palette, weighted by
alpha); referring expressions add where the layer sits (left / centre / right, top / middle /
bottom, by its alpha centroid) and its size, e.g. 'the red object on the left'.
"""

from __future__ import annotations

import numpy as np

from data_engine.core import register
from data_engine.tools import imaging
from data_engine.tools.types import Caption

# Several swatches may share a name: light and dark shades are named by their hue.
_SWATCHES = (
    ('red', (0.80, 0.10, 0.10)), ('red', (0.50, 0.05, 0.07)),
    ('orange', (0.95, 0.55, 0.10)),
    ('yellow', (0.95, 0.85, 0.15)), ('yellow', (0.95, 0.90, 0.55)),
    ('green', (0.20, 0.60, 0.20)), ('green', (0.10, 0.35, 0.10)), ('green', (0.60, 0.80, 0.40)),
    ('blue', (0.15, 0.30, 0.80)), ('blue', (0.10, 0.15, 0.45)), ('blue', (0.50, 0.70, 0.95)),
    ('purple', (0.50, 0.20, 0.60)), ('purple', (0.30, 0.10, 0.40)),
    ('pink', (0.95, 0.60, 0.75)), ('pink', (0.90, 0.30, 0.60)),
    ('brown', (0.45, 0.28, 0.12)), ('brown', (0.70, 0.50, 0.30)),
    ('black', (0.05, 0.05, 0.05)),
    ('white', (0.95, 0.95, 0.95)),
    ('grey', (0.50, 0.50, 0.50)), ('grey', (0.75, 0.75, 0.75)), ('grey', (0.28, 0.28, 0.28)),
)
COLOUR_NAMES = tuple(dict.fromkeys(name for name, _ in _SWATCHES))
_SWATCH_LAB = imaging.lab(np.array([[rgb for _, rgb in _SWATCHES]], np.float32))[0]
_SWATCH_INDEX = np.array([COLOUR_NAMES.index(name) for name, _ in _SWATCHES])


def dominant_colour(rgb: np.ndarray, weight: np.ndarray | None = None) -> str:
  """The palette name most of `rgb` ([..., 3] in [0, 1]) is closest to, weighted by `weight`."""
  rgb = np.asarray(rgb, np.float32).reshape(-1, 3)
  w = np.ones(len(rgb)) if weight is None else np.asarray(weight, np.float64).reshape(-1)
  keep = w > 0  # a layer is mostly transparent: only its visible pixels can vote
  rgb, w = rgb[keep], w[keep]
  if not len(rgb):
    return COLOUR_NAMES[0]  # as a vote with no weight anywhere would
  lab = imaging.lab(rgb[None])[0]
  nearest = np.argmin(((lab[:, None] - _SWATCH_LAB[None]) ** 2).sum(-1), axis=1)
  votes = np.bincount(_SWATCH_INDEX[nearest], weights=w, minlength=len(COLOUR_NAMES))
  return COLOUR_NAMES[int(np.argmax(votes))]


def _article(word: str) -> str:
  return 'an' if word[:1].lower() in 'aeiou' else 'a'


@register('captioner', 'template')
class Template:
  """`large`: the alpha area fraction from which a layer is called large; `label` is used
  when the caller gives none."""

  def __init__(self, large: float = 0.1, label: str = 'object'):
    self.large, self.label = large, label

  def __call__(self, rgba: np.ndarray, label: str = '') -> Caption:
    label = label or self.label
    h, w = rgba.shape[:2]
    alpha = np.clip(rgba[..., 3].astype(np.float64), 0, 1)
    colour = dominant_colour(rgba[..., :3], alpha)
    total = alpha.sum()
    if total > 0:
      ys, xs = np.mgrid[:h, :w]
      cy, cx = (alpha * ys).sum() / total, (alpha * xs).sum() / total
    else:
      cy, cx = (h - 1) / 2, (w - 1) / 2
    across = ('left', 'centre', 'right')[min(2, int(3 * (cx + 0.5) / w))]
    down = ('top', 'middle', 'bottom')[min(2, int(3 * (cy + 0.5) / h))]
    size = 'large' if total / (h * w) >= self.large else 'small'
    side = 'in the centre' if across == 'centre' else f'on the {across}'
    if down == 'middle':
      where = side
    else:
      where = f'at the {down}' if across == 'centre' else f'at the {down} {across}'
    return Caption(label, f'{_article(colour)} {colour} {label}',
                   (f'the {colour} {label} {side}', f'the {size} {label} {where}'))
