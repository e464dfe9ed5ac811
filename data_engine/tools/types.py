"""Small result types the offline and model-backed tools share."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Detection:
  """A candidate object: box (x0, y0, x1, y1) end-exclusive, score, optional label and mask."""
  box: tuple[int, int, int, int]
  score: float
  label: str = ''
  mask: np.ndarray | None = None


@dataclasses.dataclass
class ShadowEstimate:
  """The shadow an object casts: where (bool mask), how dark (opacity) and its colour (RGB)."""
  mask: np.ndarray
  opacity: np.ndarray
  colour: np.ndarray


@dataclasses.dataclass(frozen=True)
class Caption:
  """Text for one layer: its label, a caption and referring expressions that single it out."""
  label: str
  caption: str
  referring: tuple[str, ...]
