"""LPIPS, the `lpips` package's v0.1 definition (VGG16 or AlexNet trunk), ported to Flax NNX.

Followed: `lpips/lpips.py` and `lpips/pretrained_networks.py` of the `lpips` 0.1.4 package
(richzhang/PerceptualSimilarity), with torchvision's `models/vgg.py` (configuration 'D') and
`models/alexnet.py` for the trunks. For images `x, y` in [0, 1] (the package's
`normalize=True`):

    z = ((2x - 1) - shift) / scale                            # its ScalingLayer
    f_l = trunk slice l outputs (after the ReLU), l = 1..5
    n_l = f_l / (sqrt(sum_c f_l^2) + 1e-10)                   # normalize_tensor
    LPIPS = sum_l mean_hw( w_l . (n_l(x) - n_l(y))^2 )        # 1x1 conv heads, no bias

Parameter names are the package's state-dict keys (`net.slice{l}.{i}.weight`, `i` the index
in torchvision's `features`; `lin{l}.model.1.weight`), so its files load by name. Weights
come from local files only: one file with the whole LPIPS state dict, or the package's head
file (`weights/v0.1/vgg.pth`) with torchvision's trunk file (`vgg16-397923af.pth`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax.convert import perceptual as convert
from layerjax.evaluate.metrics import RANDOM


# The trunks as torchvision builds `features`: ('conv', in, out, kernel, stride, padding),
# ('relu',), ('pool', kernel, stride); LPIPS taps the output of each slice [b_l, b_{l+1}).
_VGG16 = (('conv', 3, 64, 3, 1, 1), ('relu',), ('conv', 64, 64, 3, 1, 1), ('relu',),
          ('pool', 2, 2),
          ('conv', 64, 128, 3, 1, 1), ('relu',), ('conv', 128, 128, 3, 1, 1), ('relu',),
          ('pool', 2, 2),
          ('conv', 128, 256, 3, 1, 1), ('relu',), ('conv', 256, 256, 3, 1, 1), ('relu',),
          ('conv', 256, 256, 3, 1, 1), ('relu',), ('pool', 2, 2),
          ('conv', 256, 512, 3, 1, 1), ('relu',), ('conv', 512, 512, 3, 1, 1), ('relu',),
          ('conv', 512, 512, 3, 1, 1), ('relu',), ('pool', 2, 2),
          ('conv', 512, 512, 3, 1, 1), ('relu',), ('conv', 512, 512, 3, 1, 1), ('relu',),
          ('conv', 512, 512, 3, 1, 1), ('relu',))
_ALEXNET = (('conv', 3, 64, 11, 4, 2), ('relu',), ('pool', 3, 2),
            ('conv', 64, 192, 5, 1, 2), ('relu',), ('pool', 3, 2),
            ('conv', 192, 384, 3, 1, 1), ('relu',),
            ('conv', 384, 256, 3, 1, 1), ('relu',),
            ('conv', 256, 256, 3, 1, 1), ('relu',))
TRUNKS = {'vgg': (_VGG16, (0, 4, 9, 16, 23, 30)), 'alex': (_ALEXNET, (0, 2, 5, 8, 10, 12))}
# The smallest side whose last slice is not empty (four 2x2 pools; AlexNet's stride-4 conv
# and two 3x3 pools): the reference fails below it too.
MIN_SIDE = {'vgg': 16, 'alex': 31}

SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)


def _check_net(net: str) -> None:
  if net not in TRUNKS:
    raise ValueError(f'LPIPS net must be one of {sorted(TRUNKS)}, got {net!r}')


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, bias: bool, rngs,
          **init) -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=bias, precision=jax.lax.Precision.HIGHEST, rngs=rngs, **init)


class Trunk(nnx.Module):
  """VGG16 / AlexNet `features` split into LPIPS' five slices (`slice1` .. `slice5`)."""

  def __init__(self, net: str, *, rngs: nnx.Rngs):
    layers, bounds = TRUNKS[net]
    self.kind = net
    for s in range(5):
      convs = {str(i): _conv(*layers[i][1:], bias=True, rngs=rngs)
               for i in range(bounds[s], bounds[s + 1]) if layers[i][0] == 'conv'}
      setattr(self, f'slice{s + 1}', nnx.Dict(convs))

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    layers, bounds = TRUNKS[self.kind]
    taps = []
    for s in range(5):
      convs = getattr(self, f'slice{s + 1}')
      for i in range(bounds[s], bounds[s + 1]):
        op = layers[i][0]
        if op == 'conv':
          x = convs[str(i)](x)
        elif op == 'relu':
          x = jax.nn.relu(x)
        else:
          x = nnx.max_pool(x, (layers[i][1],) * 2, (layers[i][2],) * 2, 'VALID')
      taps.append(x)
    return taps


class LinearHead(nnx.Module):
  """The package's NetLinLayer: Dropout (identity at evaluation, index 0), 1x1 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    # Non-negative like the trained heads (the package clamps them at 0 while training).
    head = _conv(channels, 1, 1, 1, 0, bias=False, rngs=rngs,
                 kernel_init=nnx.initializers.uniform(1.0 / channels))
    self.model = nnx.Dict({'1': head})

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.model['1'](x)


def _unit(f: jax.Array) -> jax.Array:
  """The package's `normalize_tensor`: unit length over channels, eps outside the root."""
  return f / (jnp.sqrt(jnp.sum(f * f, -1, keepdims=True)) + 1e-10)


class LPIPSNet(nnx.Module):
  """The network: (x, y) NHWC in [0, 1] -> LPIPS distance [B]."""

  def __init__(self, net: str, *, rngs: nnx.Rngs):
    _check_net(net)
    self.net = Trunk(net, rngs=rngs)
    layers, bounds = TRUNKS[net]
    for l in range(5):
      channels = [layer[2] for layer in layers[:bounds[l + 1]] if layer[0] == 'conv'][-1]
      setattr(self, f'lin{l}', LinearHead(channels, rngs=rngs))

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    fx, fy = (self.net(((2 * v - 1) - shift) / scale) for v in (x, y))
    total = 0.0
    for l, (a, b) in enumerate(zip(fx, fy)):
      total = total + getattr(self, f'lin{l}')((_unit(a) - _unit(b)) ** 2).mean((1, 2, 3))
    return total


@nnx.jit
def _distance(model: LPIPSNet, x: jax.Array, y: jax.Array) -> jax.Array:
  return model(x, y)


def _whole_state_dict(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The package's full `LPIPS.state_dict()` also holds the constant scaling buffers and the
  heads a second time under `lins.{l}`: checked against the definition, then dropped."""
  for name, want in (('scaling_layer.shift', SHIFT), ('scaling_layer.scale', SCALE)):
    if name in tensors and not np.allclose(np.ravel(tensors[name]), want):
      raise ValueError(f'{source}: {name} is {np.ravel(tensors[name])}, LPIPS v0.1 has {want}')
  for l in range(5):
    alias, head = f'lins.{l}.model.1.weight', f'lin{l}.model.1.weight'
    if alias in tensors and not np.array_equal(tensors[alias], tensors.get(head)):
      raise ValueError(f'{source}: {alias} differs from {head}')
  return convert.drop_keys(tensors, [r'scaling_layer\.(shift|scale)', r'lins\.\d\..*'])


def _trunk_state_dict(tensors: dict[str, np.ndarray], net: str, source: str
                      ) -> dict[str, np.ndarray]:
  """torchvision's `features.{i}.*` renamed into LPIPS' slices; its classifier is not used."""
  bounds = TRUNKS[net][1]
  out = {}
  for name, x in convert.drop_keys(tensors, [r'classifier\..*']).items():
    parts = name.split('.')
    if parts[0] != 'features' or len(parts) != 3 or not parts[1].isdigit():
      raise ValueError(f'{source}: {name!r} is not a torchvision {net} trunk key '
                       '(features.<index>.weight|bias)')
    s = next((s for s in range(5) if int(parts[1]) < bounds[s + 1]), 5)
    out[f'net.slice{s + 1}.{parts[1]}.{parts[2]}'] = x
  return out


class LPIPS:
  """LPIPS as a metric: `lpips(a, b)` -> np.ndarray [B] for NHWC float images in [0, 1] of
  one shape. `weights` names the files it was loaded from, or `RANDOM`: a distance from
  random weights is a test value, never the metric."""

  def __init__(self, model: LPIPSNet, net: str, weights: str):
    self.model, self.net, self.weights = model, net, weights

  @property
  def is_metric(self) -> bool:
    return self.weights != RANDOM

  @classmethod
  def load(cls, path, net: str = 'vgg', backbone=None) -> LPIPS:
    """From the whole LPIPS state dict at `path`; or, with `backbone` (torchvision's trunk
    file), from the package's head file at `path` and the trunk."""
    _check_net(net)
    paths = [Path(path)] + ([Path(backbone)] if backbone is not None else [])
    tensors = convert.read_state_dict(paths[0])
    source = ' + '.join(map(str, paths))
    if backbone is not None:
      trunk = _trunk_state_dict(convert.read_state_dict(paths[1]), net, str(paths[1]))
      clash = sorted(set(trunk) & set(tensors))
      if clash:
        raise ValueError(f'{paths[0]}: already holds trunk weights {clash[:5]}; pass it alone')
      tensors = {**tensors, **trunk}
    tensors = _whole_state_dict(tensors, source)
    model = convert.build_from(lambda rngs: LPIPSNet(net, rngs=rngs), tensors, source)
    return cls(model, net, source)

  @classmethod
  def random(cls, seed: int = 0, net: str = 'vgg') -> LPIPS:
    return cls(LPIPSNet(net, rngs=nnx.Rngs(seed)), net, RANDOM)

  def save(self, path) -> Path:
    """The whole state dict as one safetensors file, which `load(path, net)` reads back."""
    return convert.save(self.model, path)

  def __call__(self, a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
      raise ValueError(f'LPIPS needs two NHWC RGB batches of one shape, got {a.shape} and '
                       f'{b.shape}')
    if min(a.shape[1:3]) < MIN_SIDE[self.net]:
      raise ValueError(f'LPIPS ({self.net}) needs images of at least {MIN_SIDE[self.net]} px a '
                       f'side, got {a.shape[1]}x{a.shape[2]}')
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
      raise ValueError('LPIPS: the images hold NaN or Inf values')
    return np.asarray(_distance(self.model, jnp.asarray(a), jnp.asarray(b)))
