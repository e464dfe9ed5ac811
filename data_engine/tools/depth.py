"""Monocular depth without a model: the ground-plane prior that lower rows are nearer.

`vertical_prior` returns nearness in [0, 1] (larger = nearer) growing from the `horizon`
row to the bottom row, and `order(masks, image)` sorts objects back to front by how low they
reach. Every depth tool has this pair: `__call__(image) -> nearness`, `order(masks, image)`.
"""

from __future__ import annotations

import numpy as np

from data_engine.core import register


@register('depth', 'vertical_prior')
class VerticalPrior:
  """`horizon`: the fraction of the height above which everything is equally far."""

  def __init__(self, horizon: float = 0.0):
    if not 0 <= horizon < 1:
      raise ValueError(f'horizon must be in [0, 1), got {horizon}')
    self.horizon = horizon

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    rows = np.linspace(0, 1, h, dtype=np.float32)
    near = np.clip((rows - self.horizon) / (1 - self.horizon), 0, 1)
    return np.repeat(near[:, None], w, axis=1)

  def order(self, masks, image=None) -> list[int]:
    """Indices back to front: an object whose lowest row is higher is farther; on a tie the
    smaller mask is in front. Empty masks go first. (The prior needs no look at `image`.)"""
    def key(i):
      rows = np.nonzero(np.asarray(masks[i]).any(axis=1))[0]
      return (int(rows[-1]) if len(rows) else -1, -int(np.count_nonzero(masks[i])))
    return sorted(range(len(masks)), key=key)
