"""Configs at any device count: the mesh fitted to the devices and the global batch, the SD3
configs' checks on 1, 8, 32 and 256 (fake) devices with no model built or loaded, multislice
meshes, and the errors that name their fix."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from layerjax import parallel
from layerjax.train import trainer
from train_utils import ROOT, devices_env, tiny


@pytest.mark.parametrize('shape,devices,batch,dcn,want', [
    ((-1, 1, 1), 1, 64, (1, 1, 1), (1, 1, 1)),
    ((-1, 1, 1), 32, 64, (1, 1, 1), (32, 1, 1)),
    # 256 devices, batch 64: 64 split the batch, each example's work is split 4 ways
    ((-1, 1, 1), 256, 64, (1, 1, 1), (64, 1, 4)),
    ((-1, 8, 1), 1, 64, (1, 1, 1), (1, 1, 1)),  # fsdp cut to the devices there are
    ((-1, 8, 1), 4, 64, (1, 1, 1), (1, 4, 1)),
    ((-1, 8, 1), 256, 64, (1, 1, 1), (8, 8, 4)),
    ((-1, 1, 2), 12, 8, (1, 1, 1), (2, 1, 6)),  # 6 data devices would not divide 8: 2, and 3x2
    ((-1, 1, 1), 8, 8, (4, 1, 1), (8, 1, 1)),
    ((-1, 1, 1), 8, 6, (2, 1, 1), (2, 1, 4)),  # data a multiple of the 2 slices that split it
    ((-1, 1, 1), 8, 3, (1, 1, 1), (1, 1, 8)),  # 3 is odd: one data group, the rest tensor
    ((2, -1, 1), 8, 3, (1, 1, 1), (2, 4, 1)),  # a fixed data size: only resolved
])
def test_fit_shape(shape, devices, batch, dcn, want):
  assert parallel.fit_shape(shape, devices, batch, dcn) == want


# Runs in a fresh process with 256 fake CPU devices; prints, per config and device count,
# the mesh, the global eval batch and how many ways each part's parameters are split.
_PROBE = r'''
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import jax, numpy as np
from flax import nnx
from layerjax import build, parallel
from layerjax.models import common
from layerjax.train import evaluate, trainer
from train_utils import load_config_file
out = {}
for name, variant in json.loads(sys.argv[2]):
  c = load_config_file(name, variant)
  c.init.pretrained = ''  # random weights of the same shapes, never materialised
  c.model.text.embeddings = sys.argv[3]
  model = common.abstract(lambda rngs: build.build_model(c, rngs))
  for n in (1, 8, 32, 256):
    mesh = trainer.check_config(c, trainer.config_mesh(c, jax.devices()[:n]))
    total, per, unsplit = {}, {}, []
    state = nnx.to_flat_state(nnx.state(model))
    shardings = nnx.to_flat_state(parallel.model_shardings(model, mesh))
    for (path, var), (_, sh) in zip(state, shardings, strict=True):
      total[path[0]] = total.get(path[0], 0) + var.size
      per[path[0]] = per.get(path[0], 0) + int(np.prod(sh.shard_shape(var.shape)))
      axes = var.get_metadata().get('out_sharding') or ()
      if (mesh.shape['tensor'] > 1 and set(axes) & {'heads', 'mlp', 'modulation'}
          and 'tensor' not in jax.tree.leaves(tuple(sh.spec))):
        unsplit.append('/'.join(map(str, path)))
    c.loss.estimate_every = 2
    try:
      trainer.check_config(c, mesh)
      estimate_2 = 'ok'
    except ValueError as e:
      estimate_2 = str(e)
    c.loss.estimate_every = 1
    out[f'{name}:{variant}:{n}'] = {
        'mesh': list(mesh.shape.values()), 'devices': mesh.devices.size,
        'eval_batch': evaluate.eval_data_config(c, mesh).global_batch_size,
        'split': {k: total[k] / per[k] for k in total}, 'unsplit': unsplit,
        'estimate_2': estimate_2}
print(json.dumps(out))
'''

# Hand-derived (`configs/liwi.py`'s docstring): batch 64; sd35_large asks for fsdp 8.
_MESHES = {'medium': {1: [1, 1, 1], 8: [8, 1, 1], 32: [32, 1, 1], 256: [64, 1, 4]},
           'large': {1: [1, 1, 1], 8: [1, 8, 1], 32: [4, 8, 1], 256: [8, 8, 4]}}
_CONFIGS = [('liwi', 'sd3_medium'), ('liwi', 'sd35_medium'), ('liwi', 'sd35_large'),
            ('reflayer', 'sd3_medium')]


def test_sd3_configs_pass_their_checks_on_1_to_256_devices(tmp_path):
  embeddings = tmp_path / 'emb.safetensors'
  embeddings.write_bytes(b'')  # the config checks look for the file only
  env = {**devices_env(256), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', _PROBE, str(ROOT), json.dumps(_CONFIGS),
                           str(embeddings)], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  for name, variant in _CONFIGS:
    for n, (data, fsdp, tensor) in _MESHES['large' if 'large' in variant else 'medium'].items():
      got = out[f'{name}:{variant}:{n}']
      assert got['mesh'] == [data, fsdp, tensor] and got['devices'] == n, (variant, n, got)
      assert got['eval_batch'] == data * fsdp  # one example per data-parallel device
      per_device = 64 // (data * fsdp)
      if per_device % 2:
        assert 'set --config.loss.estimate_every=1' in got['estimate_2']
      else:
        assert got['estimate_2'] == 'ok'
      # The tensor axis divides every heads / mlp / modulation dimension it is meant to
      # split; FSDP splits each part 8 ways (a few odd-sized tensors, e.g. RGB convolutions,
      # stay whole).
      assert got['unsplit'] == [], (variant, n, got['unsplit'][:5])
      split = got['split']
      for part in ('transformer', 'latents', 'alpha_head', 'shadow_head'):
        assert split.get(part, 1) >= 0.99 * fsdp, (variant, n, split)


def test_batch_errors_name_the_fix(tmp_path):
  c = tiny(tmp_path, mesh=(8, 1, 1))
  c.data.global_batch_size = 12
  with pytest.raises(ValueError, match=r'data.global_batch_size=12 is not divisible by the '
                     r'data-parallel size 8 .*set --config.data.global_batch_size=16 '
                     r'\(a multiple of 8\)'):
    trainer.check_config(c)
  c = tiny(tmp_path, mesh=(8, 1, 1))
  c.data.global_batch_size = 32
  c.loss.estimate_every = 3  # the per-device batch is 4
  with pytest.raises(ValueError, match='set --config.loss.estimate_every=1$'):
    trainer.check_config(c)


def test_the_fitted_mesh_is_what_check_config_uses(tmp_path):
  c = tiny(tmp_path, mesh=(-1, 1, 1))
  c.data.global_batch_size = 4  # 8 devices: 4 split the batch, 2 each example
  mesh = trainer.check_config(c)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'tensor': 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What the mesh builders read of a device; CPU devices have no `slice_index`."""
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def test_multislice_grid_puts_each_slice_in_a_block():
  devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4
  grid = parallel.multislice_grid((4, 2, 1), devices, (2, 1, 1))
  assert grid.shape == (4, 2, 1)
  # The data axis crosses slices once: rows 0-1 are slice 0, rows 2-3 slice 1.
  slices = np.vectorize(lambda d: d.slice_index)(grid)[..., 0]
  assert slices.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
  assert sorted(d.id for d in grid.flat) == list(range(8))
  grid = parallel.multislice_grid((2, 4, 1), devices, (1, 2, 1))  # fsdp across the slices
  assert np.vectorize(lambda d: d.slice_index)(grid)[..., 0].tolist() == [[0, 0, 1, 1]] * 2


def test_multislice_errors():
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  with pytest.raises(ValueError, match=r'span 2 slice\(s\) but mesh_dcn \(1, 1, 1\) asks for 1: '
                     r'.*e\.g\. \(2, 1, 1\)'):
    parallel.check_slices((8, 1, 1), devices, (1, 1, 1))
  with pytest.raises(ValueError, match=r'mesh_dcn \(2, 1, 1\): each entry must divide the mesh '
                     r'shape \(1, 8, 1\)'):
    parallel.check_slices((1, 8, 1), devices, (2, 1, 1))
  # Real CPU devices are one slice.
  with pytest.raises(ValueError, match=r'span 1 slice\(s\) but mesh_dcn \(2, 1, 1\)'):
    parallel.make_mesh((-1, 1, 1), dcn=(2, 1, 1))
  with pytest.raises(ValueError, match=r'mesh_dcn \(0, 1, 1\) must give 3 sizes'):
    parallel.check_dcn_shape((0, 1, 1))


def test_make_mesh_is_jax_make_mesh_with_auto_axes():
  mesh = parallel.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  want = jax.make_mesh((2, 2, 2), parallel.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert mesh == want
  four = jax.devices()[:4]
  assert [d.id for d in parallel.make_mesh((4, 1, 1), four).devices.flat] == [
      d.id for d in four]
