"""Shared test helpers: random diffusers models saved as real folders, layout helpers."""

import os

# Eight fake CPU devices for the sharding tests; must be set before JAX initialises.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import numpy as np


def randomize_(module, seed: int, std: float = 0.2):
  """Fills every parameter and buffer of a torch module with N(0, std) (norm scales ~1)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * std
      is_norm_scale = name.endswith('.weight') and 'norm' in name.split('.')[-2]
      base = 1.0 if is_norm_scale else 0.0
      t.copy_((noise + base).to(t.dtype))
  return module


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def assert_close_to_scale(actual, desired, rtol=1e-5):
  """max |actual - desired| <= rtol * max |desired| (error relative to the output's scale)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  scale = np.abs(desired).max()
  np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long tests, run with -m slow')
