"""The Grain loader: determinism, exact resume, per-process sharding, prompt sampling,
read-ahead."""

import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from layerjax import parallel
from layerjax.data import examples, schema
from layerjax.data.pipeline import make_loader
from layerjax.data.tfds_builder import Layered
from test_schema import make_sample

N = 6


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('layered')
  for s in range(N):
    schema.write_folder(make_sample(seed=s), root / 'src' / f'{s}')
  Layered(data_dir=root / 'tfds', sources={'train': root / 'src'}).download_and_prepare()
  return root / 'tfds'


def config(data_dir, **kw):
  return ml_collections.ConfigDict({**dict(
      name='layered', data_dir=str(data_dir), seed=3, global_batch_size=2, image_size=(16, 24),
      num_workers=0, prompt_probs={'box': 0.4, 'mask+text': 0.3, 'point': 0.3},
      point_sigma=2.0, hflip_prob=0.5, checkerboard_cell=4, checkerboard_jitter=0.1,
      degradations={}, boundary_band=2, scale_range=(1.0, 1.0)), **kw})


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(data_dir):
  batch = next(iter(make_loader(config(data_dir), 'train', None)))
  assert batch['image'].shape == (2, 16, 24, 3) and batch['image'].dtype == np.float32
  for k in ('prompt', 'background', 'checkerboard', 'foreground_on_checkerboard',
            'shadow_on_checkerboard'):
    assert batch[k].shape == (2, 16, 24, 3), k
  for k in ('foreground', 'shadow'):
    assert batch[k].shape == (2, 16, 24, 4), k
  for layer in ('foreground', 'shadow'):  # both over the same board
    rgba = batch[layer]
    # Resampling mixes neighbours differently at soft edges; elsewhere the blend is exact.
    solid = (rgba[..., 3] == 0) | (rgba[..., 3] == 1)
    blend = rgba[..., 3:] * rgba[..., :3] + (1 - rgba[..., 3:]) * batch['checkerboard']
    np.testing.assert_allclose(batch[f'{layer}_on_checkerboard'][solid], blend[solid], atol=1e-5)
  assert batch['text'].shape == (2,) and batch['prompt_kinds'].shape == (2,)


@pytest.mark.parametrize('image_size,scale_range,max_err,mean_err', [
    ((24, 24), (1.0, 1.0), schema.default_atol(3), schema.default_atol(3)),  # pure crops
    ((16, 24), (1.0, 1.0), 0.05, 2e-3),   # resampled: exact up to bilinear edge mixing
    ((16, 24), (1.5, 2.0), 0.05, 2e-3),
])
def test_targets_recompose_the_transformed_input(data_dir, image_size, scale_range, max_err,
                                                 mean_err):
  cfg = config(data_dir, image_size=image_size, scale_range=scale_range, global_batch_size=6)
  batch = next(iter(make_loader(cfg, 'train', None)))
  assert batch['image'].shape == (6, *image_size, 3)
  bg = np.concatenate([batch['background'], np.ones((6, *image_size, 1), np.float32)], -1)
  rec = schema.over(batch['foreground'], schema.over(batch['shadow'], bg))[..., :3]
  err = np.abs(rec - batch['image'])
  assert err.max() <= max_err and err.mean() <= mean_err, (err.max(), err.mean())


def test_zoom_shows_less_of_the_sample(data_dir):
  """A zoomed crop of the same sample has a larger visible object (more foreground pixels)."""
  covered = []
  for zoom in (1.0, 2.0):
    cfg = config(data_dir, image_size=(16, 24), scale_range=(zoom, zoom), hflip_prob=0.0,
                 global_batch_size=6)
    fg = next(iter(make_loader(cfg, 'train', None)))['foreground'][..., 3]
    covered.append(fg.sum() / fg.size)
  assert covered[1] > 1.5 * covered[0]


def test_same_seed_same_batches_other_seed_differs(data_dir):
  a = take(iter(make_loader(config(data_dir), 'train', None)), 4)
  b = take(iter(make_loader(config(data_dir), 'train', None)), 4)
  c = take(iter(make_loader(config(data_dir, seed=4), 'train', None)), 4)
  assert_batches_equal(a, b)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_resumed_iterator_continues_exactly(data_dir):
  it = iter(make_loader(config(data_dir), 'train', None))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)  # crosses the epoch boundary (6 samples, batch 2)
  resumed = iter(make_loader(config(data_dir), 'train', None))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


class FakeDevice:
  """A device of some process: all a mesh's layout (`devices_indices_map`) reads."""

  def __init__(self, id, process_index):
    self.id, self.process_index, self.platform = id, process_index, 'cpu'

  def __repr__(self):
    return f'FakeDevice({self.id}, process {self.process_index})'


def fake_mesh(shape, owners):
  """A (data, fsdp, tensor) mesh whose i-th device (row-major) belongs to process owners[i]."""
  devices = np.array([FakeDevice(i, p) for i, p in enumerate(owners)], dtype=object)
  return jax.sharding.Mesh(devices.reshape(shape), parallel.MESH_AXES)


@pytest.mark.parametrize('shape,owners,rows', [
    ((2, 1, 1), [0, 1], [[0, 1], [2, 3]]),
    ((2, 2, 2), [0, 0, 0, 0, 1, 1, 1, 1], [[0, 1], [2, 3]]),  # fsdp, tensor within a process
    ((1, 4, 1), [0, 1, 0, 1], [[0, 2], [1, 3]]),  # fsdp devices alternate between processes
    ((1, 1, 2), [0, 1], [[0, 1, 2, 3]] * 2),  # tensor spans the processes: replicas
    ((2, 1, 2), [0, 1, 0, 1], [[0, 1, 2, 3]] * 2),
])
def test_processes_load_the_rows_of_the_one_process_batch(data_dir, shape, owners, rows):
  """Each process yields, batch by batch, the rows of the one-process global batch that its
  devices hold: the same examples and the same random draws (prompts, crops, flips, boards),
  so P processes train on exactly what one would."""
  cfg = config(data_dir, global_batch_size=4)
  whole = take(iter(make_loader(cfg, 'train', None)), 4)  # crosses an epoch (6 samples)
  mesh = fake_mesh(shape, owners)
  for p, mine in enumerate(rows):
    assert parallel.process_rows(mesh, 4, p) == mine
    got = take(iter(make_loader(cfg, 'train', mesh, process_index=p)), 4)
    assert_batches_equal(got, [{k: v[mine] for k, v in b.items()} for b in whole])


def test_a_process_resumes_its_rows_exactly(data_dir):
  cfg = config(data_dir, global_batch_size=4)
  whole = take(iter(make_loader(cfg, 'train', None)), 5)
  mesh = fake_mesh((1, 4, 1), [0, 1, 0, 1])
  it = iter(make_loader(cfg, 'train', mesh, process_index=1))
  take(it, 2)
  state = it.get_state()
  resumed = iter(make_loader(cfg, 'train', mesh, process_index=1))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), [{k: v[[1, 3]] for k, v in b.items()} for b in whole[2:]])


@pytest.mark.parametrize('owners', [[0, 0, 0, 1], [0, 1, 1, 1]])
def test_a_mesh_that_splits_rows_unevenly_is_refused(data_dir, owners):
  """(4, 1, 1) with 3 devices on one process and 1 on the other; (2, 1, 2) whose second
  data slice is split between the processes: process 0 would hold rows 0-3, process 1 2-3."""
  for shape in ((4, 1, 1), (2, 1, 2)):
    with pytest.raises(ValueError, match=r'mesh .* uneven or partly shared rows .* '
                       'jax.make_mesh'):
      make_loader(config(data_dir, global_batch_size=4), 'train', fake_mesh(shape, owners))


def test_prompt_kinds_follow_the_config(data_dir):
  # at scale 1 (no resampling), so the colour codes stay pure
  cfg = config(data_dir, prompt_probs={'box': 1.0}, image_size=(24, 24))
  it = iter(make_loader(cfg, 'train', None))
  for batch in take(it, 3):
    assert set(batch['prompt_kinds']) == {'box'}
    colours = np.unique(batch['prompt'].reshape(-1, 3), axis=0)
    assert {tuple(c) for c in colours} <= {examples.BLUE, examples.GREEN}
    assert set(batch['text']) == {''}
  it = iter(make_loader(config(data_dir, prompt_probs={'mask+text': 1.0}), 'train', None))
  batch = next(it)
  assert set(batch['text']) == {'the ball on the right'}


def test_workers_give_the_same_batches(data_dir):
  a = take(iter(make_loader(config(data_dir), 'train', None)), 2)
  b = take(iter(make_loader(config(data_dir, num_workers=2), 'train', None)), 2)
  assert_batches_equal(a, b)


def test_the_loader_reads_a_few_batches_ahead(data_dir, monkeypatch):
  """While the trainer works on its batch (or waits on a checkpoint), at most the read-ahead
  buffer (two batches a thread) and one batch a thread in flight are prepared: Grain's
  default read 500 batches ahead."""
  from layerjax.data import pipeline
  made = []
  build = pipeline.make_example
  monkeypatch.setattr(pipeline, 'make_example', lambda *a: made.append(1) or build(*a))
  c = config(data_dir)
  it = iter(make_loader(c, 'train', None))
  next(it)
  time.sleep(1.0)  # the threads fill the buffer in ~0.1 s
  ahead = len(made) / c.global_batch_size - 1
  threads = min(16, os.cpu_count())
  assert 2 * threads <= ahead <= 3 * threads, (ahead, threads)


@pytest.mark.parametrize('change,message', [
    (dict(prompt_probs={'scribble': 1.0}), "data.prompt_probs: 'scribble' is not a"),
    (dict(global_batch_size=3), 'not divisible'),
    (dict(scale_range=(0.5, 1.0)), r'data.scale_range\[0\]: expected a number >= 1'),
    (dict(degradations={'smudge': {'prob': 1.0, 'strength': (0, 1)}}),
     "data.degradations: unknown key 'smudge'"),
])
def test_bad_config(data_dir, change, message):
  with pytest.raises(ValueError, match=message):
    make_loader(config(data_dir, **change), 'train', fake_mesh((2, 1, 1), [0, 1]))


DEGRADE_ALL = {name: {'prob': 1.0, 'strength': strength} for name, strength in [
    ('erode', (1, 1)), ('dilate', (1, 1)), ('blur', (1.0, 1.5)), ('halo', (0.3, 0.5)),
    ('spill', (0.3, 0.5)), ('jpeg', (20, 40))]}


def test_degraded_input_clean_targets(data_dir):
  clean = next(iter(make_loader(config(data_dir), 'train', None)))
  dirty = next(iter(make_loader(config(data_dir, degradations=DEGRADE_ALL), 'train', None)))
  assert set(dirty['degradations']) == {'blur+dilate+erode+halo+jpeg+spill'}
  for k in ('background', 'foreground', 'shadow', 'prompt', 'boundary'):
    np.testing.assert_array_equal(dirty[k], clean[k], err_msg=k)
  diff = np.abs(dirty['image'] - clean['image']).max(-1)
  band = dirty['boundary'][..., 0] > 0
  assert diff[band].mean() > 0.02
  assert band.mean() < 0.5


def test_batches_become_sharded_global_arrays(data_dir):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  local = next(iter(make_loader(config(data_dir, global_batch_size=8), 'train', None)))
  mesh = parallel.make_mesh((2, 4, 1))
  batch = parallel.global_batch(local, mesh)
  assert batch['image'].shape == (8, 16, 24, 3)
  # rows over data, then fsdp: the device at mesh position (d, f) holds row 4 d + f
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None,
                                                                    None, None)
  for shard in batch['image'].addressable_shards:
    (d, f, _), = np.argwhere(mesh.devices == shard.device)
    np.testing.assert_array_equal(shard.data, local['image'][4 * d + f:4 * d + f + 1])
  assert batch['text'] is local['text']



CONDITIONS = ('prompt', 'text', 'prompt_kinds')


def test_cond_dropout_blanks_only_the_conditions(data_dir):
  """cond_dropout 0.0 gives the batches of a config without it; with p, about a fraction p
  of the examples have the all-blue prompt map, text '' and kinds '', and every other map as
  without dropout."""
  cfg = lambda **kw: config(data_dir, global_batch_size=20, image_size=(24, 32), **kw)
  before = take(iter(make_loader(cfg(), 'train', None)), 3)
  assert_batches_equal(take(iter(make_loader(cfg(cond_dropout=0.0), 'train', None)), 1),
                       before[:1])
  # 20 examples all dropped; 60 at 0.3: binomial 18 +- 3.5, the range is +-2.5 sd.
  for dropout, n, (lo, hi) in ((1.0, 1, (20, 20)), (0.3, 3, (9, 27))):
    count = 0
    for got, ref in zip(take(iter(make_loader(cfg(cond_dropout=dropout), 'train', None)), n),
                        before):
      for k in set(got) - set(CONDITIONS):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
      drop = got['prompt_kinds'] == ''
      assert (ref['prompt_kinds'] != '').all()
      np.testing.assert_array_equal(got['prompt'][drop], np.broadcast_to(
          examples.BLUE, got['prompt'][drop].shape))
      assert set(got['text'][drop]) <= {''}
      for k in CONDITIONS:  # the others keep their conditions
        np.testing.assert_array_equal(got[k][~drop], ref[k][~drop], err_msg=k)
      count += int(drop.sum())
    assert lo <= count <= hi, (dropout, count)


def test_cond_dropout_out_of_range(data_dir):
  with pytest.raises(ValueError, match=r'data.cond_dropout: expected a number in \[0, 1\]'):
    make_loader(config(data_dir, cond_dropout=1.5), 'train', None)
