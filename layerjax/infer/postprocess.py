"""Between the user's photo and the model's resolution, and back to layers that recompose.

* `Geometry`: the photo scaled to fit the size the model was trained at (aspect kept), then
  padded (edge pixels repeated) to a multiple of what the patching needs; `to_model` goes
  there (`resize` brings the model's maps back), prompts through `box_to_model` /
  `points_to_model` / `mask_to_model`.
* `guided_upsample`: alpha from the model's resolution to the photo's, edge-aware: He and
  Sun's fast guided filter (2015) fits, in each small window at the low resolution, alpha as
  a linear function of the (downsampled) photo's colour, then applies the upsampled
  coefficients to the full-resolution photo. Where an object's edge is a colour edge, alpha
  is such a function exactly (I = a F + (1 - a) B), so the edge comes back at the photo's
  sharpness instead of the model's.
* `exact_layers`: the engine's exact layering (`data_engine.stages.layer`), called as a
  function: the background keeps the photo wherever no layer covers it (and is solved from
  it where only shadows do), each object's colour is solved back to front where the photo
  sees it, and where no solve reaches the photo it stays in the background; the layers
  recompose to the photo on every pixel (to `EXACT`).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from data_engine.tools import imaging
from layerjax.data.schema import Layer, composite

GUIDED_RADIUS = 1  # low-resolution pixels: a 3 x 3 window of model pixels
GUIDED_EPS = 1e-4  # the filter's regulariser, in colour variance units
EXACT = 1e-5  # how close the layers recompose to the photo (float32 rounding is ~1e-7)


@dataclasses.dataclass(frozen=True)
class Geometry:
  size: tuple[int, int]    # the photo's (H, W)
  scaled: tuple[int, int]  # the photo resized into the model's size
  padded: tuple[int, int]  # what the model runs at: `scaled` padded to a multiple of the step

  @property
  def scales(self) -> tuple[float, float]:
    """Model pixels per photo pixel, (y, x), as rounded."""
    return self.scaled[0] / self.size[0], self.scaled[1] / self.size[1]


def geometry(size: tuple[int, int], model_size: tuple[int, int], step: int) -> Geometry:
  """The photo of `size` (H, W) scaled to fit inside `model_size` (the training resolution;
  up or down), then padded to multiples of `step` (latent factor x patch size)."""
  h, w = size
  s = min(model_size[0] / h, model_size[1] / w)
  scaled = (max(1, min(model_size[0], round(h * s))), max(1, min(model_size[1], round(w * s))))
  padded = tuple(math.ceil(n / step) * step for n in scaled)
  return Geometry(tuple(size), scaled, padded)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W(, C)] float to `size` (H, W): the engine's `imaging.resize` (area averaging to
  shrink, bilinear to grow), in (H, W) and keeping the channel axis."""
  x = np.ascontiguousarray(x, np.float32)
  if x.shape[:2] == tuple(size):
    return x.copy()
  return imaging.resize(x, (size[1], size[0])).reshape(tuple(size) + x.shape[2:])


def to_model(image: np.ndarray, g: Geometry) -> np.ndarray:
  """The photo [H, W, C] as the model sees it: [padded H, padded W, C]."""
  x = np.clip(resize(image, g.scaled), 0, 1)
  pad = ((0, g.padded[0] - g.scaled[0]), (0, g.padded[1] - g.scaled[1]))
  return np.pad(x, pad + ((0, 0),) * (x.ndim - 2), mode='edge')


def box_to_model(box, g: Geometry) -> tuple[int, int, int, int]:
  """An end-exclusive pixel box in the photo -> the model pixels it touches."""
  sy, sx = g.scales
  x0, y0, x1, y1 = box
  return (int(math.floor(x0 * sx)), int(math.floor(y0 * sy)),
          max(int(math.ceil(x1 * sx)), int(math.floor(x0 * sx)) + 1),
          max(int(math.ceil(y1 * sy)), int(math.floor(y0 * sy)) + 1))


def points_to_model(points, g: Geometry) -> tuple[tuple[float, float], ...]:
  """Pixel-centre coordinates (x, y) in the photo -> the same place in model pixels."""
  sy, sx = g.scales
  return tuple(((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5) for x, y in points)


def mask_to_model(mask: np.ndarray, g: Geometry) -> np.ndarray:
  """A bool mask in the photo -> model pixels at least half covered by it (its largest pixel
  when none is, so a thin mask survives); False over the padding."""
  cover = resize(mask.astype(np.float32), g.scaled)
  out = cover >= 0.5
  if not out.any():
    out = cover >= cover.max()
  pad = ((0, g.padded[0] - g.scaled[0]), (0, g.padded[1] - g.scaled[1]))
  return np.pad(out, pad)


def _box(x: np.ndarray, r: int) -> np.ndarray:
  return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def guided_upsample(alpha: np.ndarray, guide: np.ndarray, radius: int = GUIDED_RADIUS,
                    eps: float = GUIDED_EPS) -> np.ndarray:
  """Alpha [h, w] at the model's resolution -> [H, W] guided by the photo `guide` [H, W, 3]
  (the fast guided filter with a colour guide; He, Sun and Tang's eq. for 3-channel guides:
  a = (Sigma + eps U)^-1 cov(I, p), b = mean(p) - a . mean(I), both averaged over windows)."""
  h, w = alpha.shape
  big = guide.shape[:2]
  small = resize(guide, (h, w)).astype(np.float64)
  p = alpha.astype(np.float64)
  mean_i = _box(small, radius)
  mean_p = _box(p, radius)
  cov_ip = _box(small * p[..., None], radius) - mean_i * mean_p[..., None]
  sigma = np.empty((h, w, 3, 3))
  for i in range(3):
    for j in range(i, 3):
      sigma[..., i, j] = sigma[..., j, i] = (_box(small[..., i] * small[..., j], radius)
                                             - mean_i[..., i] * mean_i[..., j])
  a = np.linalg.solve(sigma + eps * np.eye(3), cov_ip[..., None])[..., 0]
  b = mean_p - (a * mean_i).sum(-1)
  # The window averages of the coefficients, then the coefficients at the photo's size.
  a, b = _box(a, radius), _box(b, radius)
  a_big = resize(a.astype(np.float32), big)
  b_big = resize(b.astype(np.float32), big)
  return np.clip((a_big * guide).sum(-1) + b_big, 0, 1).astype(np.float32)


@dataclasses.dataclass
class Extracted:
  """One object peeled from a photo at the photo's resolution, before the exact solve."""
  alpha: np.ndarray          # [H, W] completed (amodal) alpha
  colour: np.ndarray         # [H, W, 3] the model's colour of the object
  shadow: np.ndarray | None  # [H, W, 4] straight RGBA, None when it casts none
  label: str = 'object'
  referring: tuple[str, ...] = ()


def _under_shadows(photo, background, objects: list[Extracted]) -> np.ndarray:
  """The background where only shadows cover it, solved from the photo seen through them:
  I = P + (1 - A) B for the shadows' composite (premultiplied P, alpha A), so the shadows
  keep their place in the stack instead of being cut where the model's (blurrier)
  background and the photo disagree. Where no background in [0, 1] explains the photo,
  the model's is kept (the solve below then keeps the photo there)."""
  shadows = [o.shadow for o in objects if o.shadow is not None]
  if not shadows:
    return background.astype(np.float32)
  cover = composite(shadows)
  a = cover[..., 3:]
  free = np.all([o.alpha == 0 for o in objects], axis=0)[..., None]
  solved = (photo - cover[..., :3] * a) / np.maximum(1 - a, 1e-6)
  ok = free & (a > 0) & (a < 0.99) & np.all((solved >= 0) & (solved <= 1), -1, keepdims=True)
  return np.where(ok, solved, background).astype(np.float32)


def exact_layers(photo: np.ndarray, background: np.ndarray,
                 objects: list[Extracted]) -> tuple[list[Layer], int]:
  """Background, then per object (back to front) its shadow and itself, recomposing to
  `photo` on every pixel (`data_engine.stages.layer`); also the number of pixels where the
  model's layers could not reach the photo and the photo was kept in the background.
  Each object's box (`Obj.box`) is not read by the solve."""
  from data_engine import stages  # the engine's own solve, called as a function
  completed = _under_shadows(photo, background, objects)
  item = stages.Photo('decompose', '', '', image=photo.astype(np.float32), background=completed)
  nearer = np.zeros(photo.shape[:2], bool)
  covered = np.zeros(photo.shape[:2], bool)
  for o in reversed(objects):  # front to back: what the object shows of itself
    visible = (o.alpha > 0.5) & ~nearer
    nearer |= visible
    covered |= (o.alpha > 0) | (o.shadow is not None and o.shadow[..., 3] > 0)
    item.objects.insert(0, stages.Obj(box=(0, 0, 1, 1), score=1.0, mask=visible,
                                      label=o.label, colour=o.colour, alpha=o.alpha,
                                      shadow=o.shadow))
  stages.layer(item, None, tolerance=EXACT)
  # The engine repairs once, solving each object where it is seen. Behind a nearer object
  # whose alpha is below 1, a farther object keeps the model's colour, which the nearer one
  # may not be able to cover: there every layer is solved over the photo itself (then each
  # solves to the photo's colour, exactly).
  miss = np.abs(composite(item.layers)[..., :3] - photo).max(-1) > EXACT
  if miss.any():
    item.background = np.where(miss[..., None], photo, item.background)
    for o in item.objects:
      o.mask = o.mask | miss
      if o.shadow is not None:
        o.shadow[miss] = 0
    stages.layer(item, None, tolerance=EXACT)
  kept = np.all(item.layers[0].rgba[..., :3] == photo, -1) & np.any(completed != photo, -1)
  repaired = int((kept & covered).sum())
  k = 0
  for layer in item.layers:
    if layer.kind == 'object':
      layer.referring = objects[k].referring
      k += 1
  return item.layers, repaired
