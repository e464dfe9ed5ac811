"""Saliency maps without models: where a photo's objects probably are, [H, W] float32 in [0, 1].

`spectral_residual` (Hou & Zhang 2007) finds what is unusual in the log-amplitude spectrum; it
favours small, textured details. `center_contrast` scores each pixel by its Lab distance from
the mean colour along the image border: cheap, but one mean is a poor model of a varied
border. `boundary_connectivity` (Zhu et al. 2014) models the background as the colour regions
that hold much of the frame; it finds whole objects, including ones that reach the frame, and
is what the detector and segmenters use by default.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from skimage.segmentation import slic

from data_engine.core import register
from data_engine.tools import imaging


@register('saliency', 'spectral_residual')
class SpectralResidual:
  """Spectral-residual saliency on a grey copy `width` px wide: log amplitude minus its
  `average` x `average` mean, back with the original phase, squared and blurred by `sigma`
  (in those px). The copy is mirrored by `pad` of its width on each side first, so the FFT's
  wrap-around doesn't make the frame's edges salient."""

  def __init__(self, width: int = 64, average: int = 3, sigma: float = 2.5, pad: float = 0.25):
    self.width, self.average, self.sigma, self.pad = width, average, sigma, pad

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    small = imaging.resize(imaging.grey(image), (self.width, max(1, round(h * self.width / w))))
    p = round(self.pad * self.width)
    padded = cv2.copyMakeBorder(small.astype(np.float64), p, p, p, p, cv2.BORDER_REFLECT)
    spectrum = np.fft.fft2(padded)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - cv2.blur(log_amp, (self.average, self.average),
                                  borderType=cv2.BORDER_REPLICATE)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal, (0, 0), self.sigma)[p:p + small.shape[0], p:p + small.shape[1]]
    return np.clip(imaging.resize(imaging.normalise(sal), (w, h)), 0, 1)


@register('saliency', 'center_contrast')
class CenterContrast:
  """Lab distance from the mean colour of a border strip (`border` of the shorter side).

  Works on a copy at most `size` px long, smoothed by `sigma` of its shorter side so that
  texture doesn't count as contrast; `lightness` weighs L against a and b (shading changes
  L more than colour). `center` > 0 multiplies by a Gaussian centre prior of that width
  (a fraction of the image diagonal).
  """

  def __init__(self, border: float = 0.06, size: int = 128, sigma: float = 0.01,
               lightness: float = 1.0, center: float = 0.0):
    self.border, self.size, self.sigma = border, size, sigma
    self.lightness, self.center = lightness, center

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    lab = imaging.lab(imaging.resize(image, imaging.fit_size(image.shape, self.size)))
    sh, sw = lab.shape[:2]
    if self.sigma > 0:
      lab = cv2.GaussianBlur(lab, (0, 0), self.sigma * min(sh, sw))
    b = max(1, round(self.border * min(sh, sw)))
    strip = np.ones((sh, sw), bool)
    strip[b:sh - b, b:sw - b] = False
    diff = lab - lab[strip].mean(0)
    diff[..., 0] *= self.lightness
    sal = np.sqrt((diff ** 2).sum(-1))
    if self.center > 0:
      yy, xx = np.mgrid[:sh, :sw]
      r2 = ((yy - (sh - 1) / 2) ** 2 + (xx - (sw - 1) / 2) ** 2) / (sh ** 2 + sw ** 2)
      sal = sal * np.exp(-r2 / (2 * self.center ** 2))
    return np.clip(imaging.resize(imaging.normalise(sal), (w, h)), 0, 1)


@register('saliency', 'boundary_connectivity')
class BoundaryConnectivity:
  """Robust background detection (Zhu et al. 2014) on SLIC superpixels of a copy at most
  `size` px long.

  A superpixel is background in proportion to how much of the frame its colour region
  touches relative to its area (its boundary connectivity), so an object that merely reaches
  the frame (a portrait's shoulders) stays foreground. Saliency is colour contrast to nearby
  background, then smoothed over neighbouring superpixels by the paper's least-squares
  step. Colour regions are grown by geodesic Lab distance in which steps under `tau` are free
  (smooth gradients such as a sky stay one region); the sigmas are the paper's: colour
  `sigma_colour`, connectivity `sigma_boundary`, space `sigma_space` (of the longer side), and
  `smooth` is its neighbour weight floor.
  """

  def __init__(self, size: int = 128, segments: int = 250, compactness: float = 10.0,
               tau: float = 2.0, sigma_colour: float = 10.0, sigma_boundary: float = 1.0,
               sigma_space: float = 0.25, smooth: float = 0.1):
    self.size, self.segments, self.compactness, self.tau = size, segments, compactness, tau
    self.sigma_colour, self.sigma_boundary = sigma_colour, sigma_boundary
    self.sigma_space, self.smooth = sigma_space, smooth

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    small = imaging.resize(np.asarray(image, np.float32), imaging.fit_size(image.shape, self.size))
    _, seg = np.unique(slic(small, n_segments=self.segments, compactness=self.compactness,
                            start_label=0, channel_axis=-1), return_inverse=True)
    seg = seg.reshape(small.shape[:2])
    n = int(seg.max()) + 1
    sh, sw = seg.shape
    ys, xs = np.mgrid[:sh, :sw] / max(sh, sw)
    colour = _means(seg, imaging.lab(small), n)
    place = _means(seg, np.stack([ys, xs], -1), n)
    a = np.concatenate([seg[:, :-1].ravel(), seg[:-1].ravel()])
    b = np.concatenate([seg[:, 1:].ravel(), seg[1:].ravel()])
    pairs = np.unique(np.sort(np.stack([a, b], 1)[a != b], 1), axis=0)
    frame = np.unique(np.concatenate([seg[0], seg[-1], seg[:, 0], seg[:, -1]]))

    background = self._background(colour, pairs, frame)
    contrast = np.linalg.norm(colour[:, None] - colour[None], axis=-1)
    near = _gauss(np.linalg.norm(place[:, None] - place[None], axis=-1), self.sigma_space)
    foreground = imaging.normalise((contrast * near * background[None]).sum(1))
    # Least squares: background -> 0, foreground -> 1, similar neighbours alike.
    alike = _gauss(_steps(colour, pairs), self.sigma_colour) + self.smooth
    weights = sparse.coo_matrix((alike, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).toarray()
    weights += weights.T
    system = np.diag(background + foreground + weights.sum(1)) - weights
    sal = imaging.normalise(np.linalg.solve(system, foreground))[seg]
    return np.clip(imaging.resize(sal, (w, h)), 0, 1)

  def _background(self, colour: np.ndarray, pairs: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Each superpixel's background weight from its boundary connectivity."""
    n = len(colour)
    # The paper links all frame superpixels: the background is one region around the object.
    i, j = np.triu_indices(len(frame), 1)
    edges = np.unique(np.concatenate([pairs, np.stack([frame[i], frame[j]], 1)]), axis=0)
    cost = np.maximum(_steps(colour, edges) - self.tau, 0) + 1e-6
    graph = sparse.coo_matrix((cost, (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    similar = _gauss(csgraph.dijkstra(graph, directed=False), self.sigma_colour)
    connectivity = similar[:, frame].sum(1) / np.sqrt(similar.sum(1))
    return 1 - _gauss(connectivity, self.sigma_boundary)


def _means(seg: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
  """Per-superpixel means of `values` [H, W, C]: [n, C]."""
  flat, labels = values.reshape(-1, values.shape[-1]), seg.ravel()
  sums = np.stack([np.bincount(labels, flat[:, k], n) for k in range(flat.shape[1])], 1)
  return sums / np.bincount(labels, minlength=n)[:, None]


def _steps(colour: np.ndarray, edges: np.ndarray) -> np.ndarray:
  return np.linalg.norm(colour[edges[:, 0]] - colour[edges[:, 1]], axis=1)


def _gauss(d: np.ndarray, sigma: float) -> np.ndarray:
  return np.exp(-d ** 2 / (2 * sigma ** 2))
