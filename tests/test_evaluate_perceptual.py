"""LPIPS and FID's Inception against their PyTorch definitions, on the same random weights.

The `lpips`, pytorch-fid and torch-fidelity packages import torchvision, which does not
import on this machine, so the reference modules are rebuilt here, test-only, as published
and under the same module names (their state dicts carry the real checkpoints' keys):
  * lpips 0.1.4 `lpips/lpips.py` (LPIPS, ScalingLayer, NetLinLayer, normalize_tensor) and
    `lpips/pretrained_networks.py` (vgg16 / alexnet slices);
  * torchvision `models/vgg.py` (cfg 'D'), `models/alexnet.py`, `models/inception.py`
    (BasicConv2d, InceptionB, InceptionD and the A/C/E layers);
  * mseitzer/pytorch-fid `src/pytorch_fid/inception.py` (FIDInceptionA/C/E_1/E_2, the
    299 bilinear resize, 2x - 1, block 3's average pool).
Our forward in float32 is judged against the reference in float64 (`assert_parity`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity, nchw_to_nhwc, nhwc_to_nchw, torch_reference
from torch import nn

from layerjax.convert.diffusers import CheckpointMismatch
from layerjax.evaluate import inception, lpips

# --- the reference definitions (test-only) ----------------------------------------------


def tv_vgg16_features() -> nn.Sequential:
  layers, cin = [], 3
  for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
            512, 512, 512, 'M']:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      cin = v
  return nn.Sequential(*layers)


def tv_alexnet_features() -> nn.Sequential:
  return nn.Sequential(
      nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2))


SLICES = {'vgg': (tv_vgg16_features, (0, 4, 9, 16, 23, 30), [64, 128, 256, 512, 512]),
          'alex': (tv_alexnet_features, (0, 2, 5, 8, 10, 12), [64, 192, 384, 256, 256])}


class Trunk(nn.Module):  # lpips.pretrained_networks.vgg16 / alexnet
  def __init__(self, features: nn.Sequential, bounds):
    super().__init__()
    for s in range(5):
      part = nn.Sequential()
      for x in range(bounds[s], bounds[s + 1]):
        part.add_module(str(x), features[x])
      setattr(self, f'slice{s + 1}', part)

  def forward(self, x):
    outs = []
    for s in range(5):
      x = getattr(self, f'slice{s + 1}')(x)
      outs.append(x)
    return outs


class ScalingLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer('shift', torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer('scale', torch.Tensor([.458, .448, .450])[None, :, None, None])

  def forward(self, inp):
    return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
  def __init__(self, chn_in):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                       bias=False))

  def forward(self, x):
    return self.model(x)


def normalize_tensor(x, eps=1e-10):
  return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class RefLPIPS(nn.Module):  # lpips.LPIPS(net=..., version='0.1'), forward(normalize=True)
  def __init__(self, net: str):
    super().__init__()
    build, bounds, chns = SLICES[net]
    self.scaling_layer = ScalingLayer()
    self.net = Trunk(build(), bounds)
    for k, c in enumerate(chns):
      setattr(self, f'lin{k}', NetLinLayer(c))
    self.lins = nn.ModuleList([getattr(self, f'lin{k}') for k in range(5)])
    self.eval()

  def forward(self, in0, in1):
    in0, in1 = 2 * in0 - 1, 2 * in1 - 1
    outs0, outs1 = self.net(self.scaling_layer(in0)), self.net(self.scaling_layer(in1))
    val = 0
    for k in range(5):
      diff = (normalize_tensor(outs0[k]) - normalize_tensor(outs1[k])) ** 2
      val = val + self.lins[k](diff).mean([2, 3], keepdim=True)
    return val


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg(x):  # pytorch-fid's patch: padding not counted
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, bd, self.branch_pool(_tf_avg(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):  # FIDInceptionE_1 (max_pool=False) / FIDInceptionE_2
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
            else _tf_avg(x))
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class RefFIDInception(nn.Module):
  """fid_inception_v3() (Inception3, num_classes=1008, aux_logits=False, FID blocks) run as
  pytorch-fid's InceptionV3(output_blocks=[3]) runs it."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, c7=128)
    self.Mixed_6c = FIDInceptionC(768, c7=160)
    self.Mixed_6d = FIDInceptionC(768, c7=160)
    self.Mixed_6e = FIDInceptionC(768, c7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout()
    self.fc = nn.Linear(2048, 1008)
    self.eval()

  def forward(self, x):
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    for name in ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'maxpool1',
                 'Conv2d_3b_1x1', 'Conv2d_4a_3x3', 'maxpool2', 'Mixed_5b', 'Mixed_5c',
                 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
                 'Mixed_7a', 'Mixed_7b', 'Mixed_7c', 'avgpool']:
      x = getattr(self, name)(x)
    return x.flatten(1)


def randomize_scaled_(module: nn.Module, seed: int) -> nn.Module:
  """He-scaled conv weights, non-zero biases and BatchNorm statistics, so activations keep
  their size through the depth and every parameter matters to the output."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
  return module


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _run(ref: nn.Module, precision: str, *inputs: np.ndarray) -> np.ndarray:
  model = torch_reference(ref, precision)
  dtype = getattr(torch, precision)
  with torch.no_grad():
    return model(*(torch.from_numpy(nhwc_to_nchw(x)).to(dtype) for x in inputs)).double().numpy()


# --- LPIPS --------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['vgg', 'alex'])
def lpips_pair(request, tmp_path_factory):
  """(net, reference module, its whole state dict saved as the package's .pth)."""
  torch.manual_seed(0)
  ref = randomize_scaled_(RefLPIPS(request.param), seed=1)
  with torch.no_grad():  # trained heads are non-negative
    for k in range(5):
      getattr(ref, f'lin{k}').model[1].weight.abs_()
  path = tmp_path_factory.mktemp('lpips') / f'{request.param}.pth'
  torch.save(ref.state_dict(), path)
  return request.param, ref, path


def test_lpips_matches_the_package_definition(lpips_pair):
  net, ref, path = lpips_pair
  a, b = _images(0, (2, 64, 64, 3)), _images(1, (2, 64, 64, 3))
  ours = lpips.LPIPS.load(path, net)
  assert ours.weights == str(path) and ours.is_metric
  t = time.perf_counter()
  got = ours(a, b)
  print(f'LPIPS {net} 2x64x64: {time.perf_counter() - t:.2f} s with compilation')
  assert got.shape == (2,) and got.dtype == np.float32
  assert_parity(got, _run(ref, 'float32', a, b).ravel(), _run(ref, 'float64', a, b).ravel())
  np.testing.assert_allclose(ours(a, a), 0.0, atol=1e-12)


def test_lpips_from_the_package_heads_and_torchvision_trunk(lpips_pair, tmp_path):
  """The two published files: the package's `weights/v0.1/<net>.pth` (heads only) and
  torchvision's model file (`features.*` and a classifier, unused)."""
  net, ref, path = lpips_pair
  heads = {f'lin{k}.model.1.weight': getattr(ref, f'lin{k}').model[1].weight for k in range(5)}
  torch.save(heads, tmp_path / 'heads.pth')
  features = SLICES[net][0]()
  for s in range(5):
    for name, m in getattr(ref.net, f'slice{s + 1}').named_children():
      features[int(name)] = m
  torchvision = nn.Module()
  torchvision.features, torchvision.classifier = features, nn.Linear(3, 2)
  torch.save(torchvision.state_dict(), tmp_path / 'trunk.pth')
  ours = lpips.LPIPS.load(tmp_path / 'heads.pth', net, backbone=tmp_path / 'trunk.pth')
  whole = lpips.LPIPS.load(path, net)
  a, b = _images(2, (1, 48, 40, 3)), _images(3, (1, 48, 40, 3))
  np.testing.assert_array_equal(ours(a, b), whole(a, b))
  ours.save(tmp_path / 'lpips.safetensors')
  again = lpips.LPIPS.load(tmp_path / 'lpips.safetensors', net)
  np.testing.assert_array_equal(again(a, b), whole(a, b))


def test_lpips_weights_are_checked_by_name(lpips_pair, tmp_path):
  net, ref, _ = lpips_pair
  state = ref.state_dict()
  torch.save({k: v for k, v in state.items() if k.startswith('lin')}, tmp_path / 'heads.pth')
  with pytest.raises(CheckpointMismatch, match=r'missing_keys \(26|missing_keys \(10'):
    lpips.LPIPS.load(tmp_path / 'heads.pth', net)
  torch.save({**state, 'net.slice9.0.weight': torch.zeros(1)}, tmp_path / 'extra.pth')
  with pytest.raises(CheckpointMismatch, match=r"unexpected_keys \(1\): \['net.slice9"):
    lpips.LPIPS.load(tmp_path / 'extra.pth', net)
  torch.save({**state, 'scaling_layer.scale': torch.ones(1, 3, 1, 1)}, tmp_path / 'scale.pth')
  with pytest.raises(ValueError, match='scaling_layer.scale'):
    lpips.LPIPS.load(tmp_path / 'scale.pth', net)
  other = 'alex' if net == 'vgg' else 'vgg'
  torch.save(state, tmp_path / 'whole.pth')
  with pytest.raises(CheckpointMismatch):
    lpips.LPIPS.load(tmp_path / 'whole.pth', other)


def test_lpips_refuses_pickled_code_and_bad_input(tmp_path):
  torch.save({'weights': time.perf_counter}, tmp_path / 'code.pth')  # a function, pickled
  with pytest.raises(ValueError, match='code.pth: not a weights-only torch state dict'):
    lpips.LPIPS.load(tmp_path / 'code.pth', 'vgg')
  with pytest.raises(ValueError, match="net must be one of \\['alex', 'vgg'\\]"):
    lpips.LPIPS.load(tmp_path / 'code.pth', 'squeeze')
  model = lpips.LPIPS.random(0, 'alex')
  assert model.weights == lpips.RANDOM and not model.is_metric
  with pytest.raises(ValueError, match='at least 31 px'):
    model(np.zeros((1, 30, 40, 3)), np.zeros((1, 30, 40, 3)))
  with pytest.raises(ValueError, match='one shape'):
    model(np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 33, 3)))
  with pytest.raises(ValueError, match='NaN'):
    model(np.full((1, 32, 32, 3), np.nan), np.zeros((1, 32, 32, 3)))
  assert model(np.zeros((1, 31, 31, 3)), np.ones((1, 31, 31, 3)))[0] >= 0


# --- FID's Inception ----------------------------------------------------------------------

def test_resize_is_torch_bilinear():
  for shape in [(37, 53), (512, 401), (299, 299), (1, 5)]:
    x = _images(4, (1, *shape, 3)).astype(np.float64)
    want = F.interpolate(torch.from_numpy(nhwc_to_nchw(x)), size=(299, 299), mode='bilinear',
                         align_corners=False)
    np.testing.assert_allclose(inception.resize(x[0]), nchw_to_nhwc(want.numpy())[0],
                               atol=2e-6, err_msg=str(shape))


@pytest.fixture(scope='module')
def inception_pair(tmp_path_factory):
  torch.manual_seed(0)
  ref = randomize_scaled_(RefFIDInception(), seed=2)
  path = tmp_path_factory.mktemp('fid') / 'pt_inception-2015-12-05-6726825d.pth'
  state = ref.state_dict()
  assert any(k.endswith('num_batches_tracked') for k in state)  # as torch saves BatchNorm
  torch.save(state, path)
  return ref, path


def test_fid_inception_matches_pytorch_fid(inception_pair, tmp_path):
  ref, path = inception_pair
  model = inception.FIDInception.load(path, batch=2)
  assert model.weights == str(path) and model.is_metric
  x = _images(5, (1, 61, 45, 3))
  t = time.perf_counter()
  got = model.features(x)
  print(f'FID Inception features, 1 image: {time.perf_counter() - t:.2f} s with compilation')
  assert got.shape == (1, 2048)
  assert_parity(got, _run(ref, 'float32', x), _run(ref, 'float64', x))
  # A list of images of different sizes is resized one by one, in chunks of `batch`.
  y = _images(6, (80, 70, 3))
  both = model.features([x[0], y, x[0]])
  np.testing.assert_allclose(both[[0, 2]], np.concatenate([got, got]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both[1], model.features(y[None])[0], rtol=1e-5, atol=1e-6)
  model.save(tmp_path / 'fid.safetensors')
  again = inception.FIDInception.load(tmp_path / 'fid.safetensors', batch=2)
  np.testing.assert_array_equal(again.features(x), got)


def test_fid_inception_weights_are_checked(inception_pair, tmp_path):
  ref, _ = inception_pair
  state = ref.state_dict()
  torch.save({**state, 'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)},
             tmp_path / 'imagenet.pth')
  with pytest.raises(ValueError, match="fc has 1000 classes, not FID Inception's 1008"):
    inception.FIDInception.load(tmp_path / 'imagenet.pth')
  torch.save({k: v for k, v in state.items() if not k.startswith('Mixed_7c.')},
             tmp_path / 'short.pth')
  with pytest.raises(CheckpointMismatch, match='missing_keys.*Mixed_7c.branch1x1.bn.bias'):
    inception.FIDInception.load(tmp_path / 'short.pth')
  with pytest.raises(ValueError, match=r'weights\.bin: weights must be one of'):
    (tmp_path / 'weights.bin').write_bytes(b'')
    inception.FIDInception.load(tmp_path / 'weights.bin')


def test_features_bad_input(inception_pair):
  model = inception.FIDInception.load(inception_pair[1])
  with pytest.raises(ValueError, match=r'image 1 must be \[H, W, 3\], got \(4, 4\)'):
    model.features([np.zeros((4, 4, 3)), np.zeros((4, 4))])
  with pytest.raises(ValueError, match='image 0 holds NaN'):
    model.features(np.full((1, 4, 4, 3), np.nan))


# --- FID and KID from features ------------------------------------------------------------

def test_fid_closed_forms():
  # Diagonal covariances commute: FID = |dmu|^2 + sum_i (s1 + s2 - 2 sqrt(s1 s2)).
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  want = 1 + 0 + 4 + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
  assert inception.fid(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, abs=1e-9)
  # General case: tr sqrt(S1 S2) is the sum of the square roots of its (real, >= 0)
  # eigenvalues, which equal those of S1^1/2 S2 S1^1/2.
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
  sa, sb = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
  w, v = np.linalg.eigh(sa)
  root = v @ np.diag(np.sqrt(w)) @ v.T
  tr = np.sqrt(np.linalg.eigvalsh(root @ sb @ root)).sum()
  want = np.trace(sa) + np.trace(sb) - 2 * tr + 2.0
  got = inception.fid(np.zeros(4), sa, np.full(4, np.sqrt(0.5)), sb)
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_feature_sets():
  rng = np.random.default_rng(1)
  fa = rng.normal(size=(50, 6))
  shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
  # A shifted copy has the same covariance: only |shift|^2 remains.
  assert inception.frechet_distance(fa, fa + shift) == pytest.approx(shift @ shift, abs=1e-6)
  assert inception.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
  # Scaling by 2: mean 2 mu, covariance 4 S; FID = |mu|^2 + tr(S + 4S - 2 * 2S) = |mu|^2 + tr S.
  mu, sigma = fa.mean(0), np.cov(fa, rowvar=False)
  assert inception.frechet_distance(fa, 2 * fa) == pytest.approx(mu @ mu + np.trace(sigma),
                                                                 rel=1e-6)
  with pytest.raises(ValueError, match='N >= 2'):
    inception.frechet_distance(fa[:1], fa)


def test_kid_is_the_unbiased_polynomial_mmd():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
  k = lambda u, v: (u @ v / 3 + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  # One subset of all samples is a permutation of each set, which MMD^2 does not see.
  mean, std = inception.kid(x, y, subsets=1, subset_size=m)
  assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12) and std == 0.0
  mean, std = inception.kid(x, y, subsets=20, subset_size=4)
  assert std > 0
  with pytest.raises(ValueError, match='subset size 7'):
    inception.kid(x, y, subset_size=7)
