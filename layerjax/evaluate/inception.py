"""FID's Inception-v3 (pytorch-fid's variant) up to the 2048-d pool features, FID and KID.

Followed: mseitzer/pytorch-fid `src/pytorch_fid/inception.py` (`InceptionV3` with
`use_fid_inception=True`, output block 3) on torchvision's `models/inception.py` blocks, and
`src/pytorch_fid/fid_score.py` for the statistics and the Frechet distance. The network:

    x -> bilinear resize to 299x299 (F.interpolate, align_corners=False, no antialiasing)
      -> 2x - 1 -> Conv2d_1a .. Conv2d_4a with two 3x3/2 max-pools
      -> Mixed_5b..5d (FIDInceptionA) -> Mixed_6a (B) -> Mixed_6b..6e (FIDInceptionC)
      -> Mixed_7a (D) -> Mixed_7b (FIDInceptionE_1) -> Mixed_7c (FIDInceptionE_2)
      -> global average -> [B, 2048]

The FID blocks average-pool without counting the zero padding (TensorFlow's pooling), and
FIDInceptionE_2 max-pools its pool branch. Every conv is BasicConv2d: conv (no bias),
BatchNorm (eps 0.001, running statistics), ReLU. Parameter names are the checkpoint's
(`pt_inception-2015-12-05-6726825d.pth`: `Mixed_5b.branch1x1.conv.weight`, `.bn.running_var`
...), so it loads by name; its 1008-way `fc` is not on the path to the pool features.
KID follows torch-fidelity's `metric_kid.py` (cubic polynomial kernel, unbiased MMD^2 over
random subsets), as torchmetrics does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import linalg

from layerjax.convert import perceptual as convert
from layerjax.evaluate.metrics import RANDOM

SIZE = 299
FEATURES = 2048
FC_CLASSES = 1008  # the FID checkpoint's classifier; torchvision's ImageNet one has 1000


class BatchNorm(nnx.Module):
  """Inference-time BatchNorm2d under torch's names (`weight`, `bias`, `running_*`)."""

  def __init__(self, channels: int, eps: float = 0.001):
    self.weight = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.running_mean = nnx.BatchStat(jnp.zeros((channels,)))
    self.running_var = nnx.BatchStat(jnp.ones((channels,)))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv2d(nnx.Module):
  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *,
               rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, precision=jax.lax.Precision.HIGHEST, rngs=rngs)
    self.bn = BatchNorm(cout)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _pool3(x: jax.Array, kind: str) -> jax.Array:
  """The pool branch's 3x3/1 pool, padding 1: TF-style average (padding not counted) or max."""
  if kind == 'max':
    return nnx.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
  return nnx.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (3, 3), (2, 2), 'VALID')


class InceptionA(nnx.Module):
  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate(
        [self.branch1x1(x), b5, b3, self.branch_pool(_pool3(x, 'avg'))], -1)


class InceptionB(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], -1)


class InceptionC(nnx.Module):
  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    row, col = {'kernel': (1, 7), 'padding': (0, 3)}, {'kernel': (7, 1), 'padding': (3, 0)}
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    return jnp.concatenate(
        [self.branch1x1(x), b7, bd, self.branch_pool(_pool3(x, 'avg'))], -1)


class InceptionD(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return jnp.concatenate(
        [self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool_3x3_s2(x)], -1)


class InceptionE(nnx.Module):
  """FIDInceptionE_1 (`pool='avg'`) or FIDInceptionE_2 (`pool='max'`)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
        self.branch_pool(_pool3(x, self.pool))], -1)


class InceptionNet(nnx.Module):
  """Images [B, 299, 299, 3] in [0, 1] -> pool features [B, 2048]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, 'avg', rngs=rngs)
    self.Mixed_7c = InceptionE(2048, 'max', rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3_s2(x)))
    x = _max_pool_3x3_s2(x)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return x.mean((1, 2))


@nnx.jit
def _features(model: InceptionNet, x: jax.Array) -> jax.Array:
  return model(x)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear `interpolate` (align_corners=False) on one axis:
  source coordinate (o + 0.5) * n_in / n_out - 0.5, clamped at 0, its two neighbours."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
  """[H, W, C] -> [size, size, C] as pytorch-fid's `F.interpolate(mode='bilinear')`."""
  rows = _resize_matrix(image.shape[0], size).astype(np.float32)
  cols = _resize_matrix(image.shape[1], size).astype(np.float32)
  return np.einsum('oh,hwc,pw->opc', rows, image.astype(np.float32), cols, optimize=True)


class FIDInception:
  """`features(images)` -> [N, 2048] for NHWC images in [0, 1] (an array, or a list of
  [H, W, 3] arrays of any sizes). `weights` names the file, or `RANDOM`: features of random
  weights are test values, never the metric."""

  def __init__(self, model: InceptionNet, weights: str, batch: int = 8):
    self.model, self.weights, self.batch = model, weights, batch

  @property
  def is_metric(self) -> bool:
    return self.weights != RANDOM

  @classmethod
  def load(cls, path, batch: int = 8) -> FIDInception:
    """From pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read weights-only) or the
    same tensors as safetensors (`save`)."""
    tensors = convert.read_state_dict(path)
    fc = tensors.get('fc.weight')
    if fc is not None and fc.shape[0] != FC_CLASSES:
      raise ValueError(f'{path}: fc has {fc.shape[0]} classes, not FID Inception\'s '
                       f'{FC_CLASSES} (is this torchvision\'s ImageNet Inception-v3?)')
    # The classifier and BatchNorm's training counter are not used by the pool features.
    tensors = convert.drop_keys(tensors, [r'fc\.(weight|bias)', r'.*\.num_batches_tracked'])
    model = convert.build_from(lambda rngs: InceptionNet(rngs=rngs), tensors, str(path))
    return cls(model, str(Path(path)), batch)

  @classmethod
  def random(cls, seed: int = 0, batch: int = 8) -> FIDInception:
    return cls(InceptionNet(rngs=nnx.Rngs(seed)), RANDOM, batch)

  def save(self, path) -> Path:
    return convert.save(self.model, path)

  def features(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    for i, image in enumerate(images):
      shape = np.shape(image)
      if len(shape) != 3 or shape[-1] != 3 or min(shape[:2]) < 1:
        raise ValueError(f'FID Inception: image {i} must be [H, W, 3], got {shape}')
      if not np.isfinite(image).all():
        raise ValueError(f'FID Inception: image {i} holds NaN or Inf values')
    out = []
    for start in range(0, len(images), self.batch):
      chunk = np.stack([resize(np.asarray(im)) for im in images[start:start + self.batch]])
      n = len(chunk)
      # One compiled shape: the last chunk is padded to the batch size.
      chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(_features(self.model, jnp.asarray(chunk)))[:n])
    return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (rows are samples), as pytorch-fid's `calculate_activation_statistics`."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f'FID statistics need [N >= 2, D] features, got {features.shape}')
  return features.mean(0), np.cov(features, rowvar=False)


def fid(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """pytorch-fid's `calculate_frechet_distance`: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)),
  with `eps` on the diagonals when the product is singular and a negligible imaginary part
  dropped (a large one is an error)."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'FID: statistics of different sizes, {mu1.shape} {sigma1.shape} vs '
                     f'{mu2.shape} {sigma2.shape}')
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(sigma1)) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two sets of features [N, D] (e.g. `FIDInception.features`)."""
  return fid(*statistics(features_a), *statistics(features_b))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
  m = len(k_xx)
  off_diagonal = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
  return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
  """KID (mean, std over `subsets`) as torch-fidelity's defaults compute it: for each subset
  (drawn without replacement by `np.random.RandomState(seed)`, first set then second), the
  unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f'KID needs two [N, D] feature sets of one D, got {a.shape}, {b.shape}')
  if min(len(a), len(b)) < subset_size or subset_size < 2:
    raise ValueError(f'KID subset size {subset_size} needs at least that many samples in each '
                     f'set (>= 2), got {len(a)} and {len(b)}')
  rng = np.random.RandomState(seed)
  kernel = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
  mmds = []
  for _ in range(subsets):
    x = a[rng.choice(len(a), subset_size, replace=False)]
    y = b[rng.choice(len(b), subset_size, replace=False)]
    mmds.append(_mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y)))
  return float(np.mean(mmds)), float(np.std(mmds))
