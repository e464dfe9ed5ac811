"""Hue, saturation and brightness (HSV's value) of straight RGB, vectorised: what `recolour`
changes on an object's own pixels."""

from __future__ import annotations

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """[..., 3] RGB in [0, 1] -> HSV, hue in [0, 1) turns (the standard hexcone model, as the
  standard library's `colorsys`)."""
  r, g, b = np.moveaxis(rgb, -1, 0)
  v = rgb.max(-1)
  c = v - rgb.min(-1)
  safe = np.where(c > 0, c, 1)
  h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  h = np.where(c > 0, (h / 6) % 1, 0)
  s = np.where(v > 0, c / np.where(v > 0, v, 1), 0)
  return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """The inverse of `rgb_to_hsv`."""
  h, s, v = np.moveaxis(hsv, -1, 0)
  k = (np.array([5, 3, 1]) + (h[..., None] * 6)) % 6  # each channel's place on the hexagon
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def recolour(rgb: np.ndarray, hue: float = 0.0, saturation: float = 1.0,
             brightness: float = 1.0) -> np.ndarray:
  """`rgb` with its hue turned by `hue` degrees and its saturation and value multiplied by
  `saturation` and `brightness` (clipped to [0, 1])."""
  hsv = rgb_to_hsv(rgb.astype(np.float64))
  hsv[..., 0] = (hsv[..., 0] + hue / 360) % 1
  hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
  hsv[..., 2] = np.clip(hsv[..., 2] * brightness, 0, 1)
  return hsv_to_rgb(hsv).astype(rgb.dtype)
