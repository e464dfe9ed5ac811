"""The data the model learns from: the loader's epochs (each a fresh permutation of the
dataset) and the engine's exact layering (a scene of overlapping soft objects with shadows,
whose true layers are known, solved back from its photo)."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from data_engine import stages
from layerjax.data import schema
from layerjax.data.pipeline import make_loader
from layerjax.data.tfds_builder import Layered
from test_pipeline import fake_mesh
from test_schema import make_sample

# --- the loader's shuffle -------------------------------------------------------------------

N = 6


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """N samples whose images differ (their objects' colours); returns (data_dir, images)."""
  root = tmp_path_factory.mktemp('epochs')
  samples = [make_sample(seed=s) for s in range(N)]
  for s, sample in enumerate(samples):
    schema.write_folder(sample, root / 'src' / f'{s}')
  Layered(data_dir=root / 'tfds', sources={'train': root / 'src'}).download_and_prepare()
  return root / 'tfds', [schema.read_folder(root / 'src' / f'{s}').image for s in range(N)]


def loader_config(data_dir, batch):
  """Whole samples, unflipped and undegraded, so each example's image is its sample's."""
  return ml_collections.ConfigDict(dict(
      name='layered', data_dir=str(data_dir), seed=3, global_batch_size=batch,
      image_size=(24, 32), num_workers=0, prompt_probs={'box': 1.0}, point_sigma=2.0,
      hflip_prob=0.0, checkerboard_cell=4, checkerboard_jitter=0.1, degradations={},
      boundary_band=2, scale_range=(1.0, 1.0)))


def sample_order(it, images, n_batches) -> list[int]:
  """Which sample each example of the next `n_batches` batches is."""
  order = []
  for _ in range(n_batches):
    for image in next(it)['image']:
      (match,) = [i for i, im in enumerate(images) if np.array_equal(im, image)]
      order.append(match)
  return order


def test_every_epoch_is_a_new_permutation(dataset):
  data_dir, images = dataset
  it = iter(make_loader(loader_config(data_dir, 2), 'train', None))
  order = sample_order(it, images, 3 * N // 2)
  epochs = [order[i:i + N] for i in range(0, 3 * N, N)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(N)), epochs
  assert epochs[0] != list(range(N)), epochs  # shuffled, not in storage order
  assert len({tuple(e) for e in epochs}) == 3, epochs  # reshuffled every epoch


def test_processes_share_each_epoch(dataset):
  """Two processes read alternate examples of one global order: together, every epoch."""
  data_dir, images = dataset
  mesh = fake_mesh((2, 1, 1), [0, 1])
  orders = [sample_order(iter(make_loader(loader_config(data_dir, 2), 'train', mesh,
                                          process_index=p)), images, N)
            for p in range(2)]
  for e in range(2):
    epoch = orders[0][e * N // 2:(e + 1) * N // 2] + orders[1][e * N // 2:(e + 1) * N // 2]
    assert sorted(epoch) == list(range(N)), orders
  assert orders[0][:N // 2] != orders[0][N // 2:], orders


# --- the engine's exact layering ------------------------------------------------------------

H, W = 6, 8


def scene():
  """The true layers: a horizontal gradient background; object 1 (orange, alpha .6, .4 on its
  left column) on columns 1-4 of rows 1-4 with a shadow (black, opacity .5) below it on rows
  4-5; object 2 (blue, alpha .7, .3 on its right column) in front, on columns 3-6 of rows
  2-5, with a shadow (dark red, opacity .25) on its left, columns 0-2 of row 5."""
  bg = np.zeros((H, W, 4))
  bg[..., 0] = np.linspace(0.2, 0.8, W)
  bg[..., 1], bg[..., 2], bg[..., 3] = 0.6, 0.3, 1
  obj1, obj2 = np.zeros((H, W, 4)), np.zeros((H, W, 4))
  obj1[1:5, 1:5] = (0.9, 0.5, 0.1, 0.6)
  obj1[1:5, 1, 3] = 0.4
  obj2[2:6, 3:7] = (0.1, 0.2, 0.9, 0.7)
  obj2[2:6, 6, 3] = 0.3
  sh1, sh2 = np.zeros((H, W, 4)), np.zeros((H, W, 4))
  sh1[4:6, 1:6] = (0, 0, 0, 0.5)
  sh2[5, 0:3] = (0.4, 0.0, 0.0, 0.25)
  return bg, sh1, obj1, sh2, obj2


def photo_of(layers):
  """The photo: the layers' composite, stored in 8 bits as a loaded photo is."""
  return np.round(schema.composite(layers)[..., :3] * 255).astype(np.float32) / 255


def layered_item(layers):
  """The engine's item just before `layer`: each object's alpha, its visible mask (alpha > .5,
  as a segmenter's mask is narrower than the matte; front objects own their pixels), its
  completed colour (the true colour where a nearer object's mask covers it, grey elsewhere:
  the solve must find it there), its shadow, and the shadow-free background."""
  bg, sh1, obj1, sh2, obj2 = layers
  mask2 = obj2[..., 3] > 0.5
  mask1 = (obj1[..., 3] > 0.5) & ~mask2
  colour1 = np.where(mask2[..., None], obj1[..., :3], 0.5)
  objects = [stages.Obj((1, 1, 5, 5), 1.0, mask1, 'orange', colour=colour1.astype(np.float32),
                        alpha=obj1[..., 3].astype(np.float32), shadow=sh1.astype(np.float32)),
             stages.Obj((3, 2, 7, 6), 1.0, mask2, 'blue', colour=np.full((H, W, 3), 0.5),
                        alpha=obj2[..., 3].astype(np.float32), shadow=sh2.astype(np.float32))]
  return stages.Photo('scene', 'scene.png', 'scene.png', image=photo_of(layers),
                      objects=objects, background=bg[..., :3].astype(np.float32))


def test_layering_recovers_the_true_layers_of_soft_overlapping_objects():
  layers = scene()
  item = layered_item(layers)
  details = stages.layer(item, None)
  assert details == {'layers': 5, 'repaired_pixels': 0}
  assert [(l.name, l.kind, l.owner) for l in item.layers] == [
      ('background', 'background', None), ('shadow_1', 'shadow', 'object_1'),
      ('object_1', 'object', None), ('shadow_2', 'shadow', 'object_2'),
      ('object_2', 'object', None)]
  # the composite reproduces the photo: exactly where an object is solved, and to the
  # photo's 8-bit rounding under shadows alone (they are given, not solved, here)
  recomposed = schema.composite(item.layers)[..., :3]
  solved = (layers[2][..., 3] > 0) | (layers[4][..., 3] > 0)
  np.testing.assert_allclose(recomposed[solved], item.image[solved], atol=1e-5)
  np.testing.assert_allclose(recomposed, item.image, atol=0.5 / 255 + 1e-6)
  # each layer is the true one where it has alpha: the photo's 8-bit rounding (half a step)
  # divided by the smallest alpha (.3) bounds the colour error
  for got, true in zip(item.layers, layers):
    a = true[..., 3] > 0
    np.testing.assert_array_equal(got.rgba[..., 3], true[..., 3].astype(np.float32))
    np.testing.assert_allclose(got.rgba[a][:, :3], true[a][:, :3], atol=0.5 / 255 / 0.3 + 1e-5,
                               err_msg=got.name)


def test_layering_by_hand_on_one_pixel():
  """Pixel (4, 3): background (.2 + .6 * 3 / 7, .6, .3), shadow 1 (black, .5), object 1
  (orange, .6), object 2 (blue, .7). The photo there is I = .7 blue + .3 (.6 orange +
  .4 (.5 bg)); object 2's colour solves to (I - .3 C) / .7 with C everything behind it."""
  layers = scene()
  item = layered_item(layers)
  stages.layer(item, None)
  bg = np.array([0.2 + 0.6 * 3 / 7, 0.6, 0.3])
  behind = 0.6 * np.array([0.9, 0.5, 0.1]) + 0.4 * (0.5 * bg)
  photo = 0.7 * np.array([0.1, 0.2, 0.9]) + 0.3 * behind
  np.testing.assert_allclose(item.image[4, 3], photo, atol=0.5 / 255)
  solved = (item.image[4, 3] - 0.3 * behind) / 0.7
  np.testing.assert_allclose(item.layers[4].rgba[4, 3], (*solved, 0.7), atol=1e-5)
  np.testing.assert_allclose(solved, (0.1, 0.2, 0.9), atol=0.5 / 255 / 0.7 + 1e-6)
  # object 1 is seen through object 2 there: its colour is the completed one, not solved
  np.testing.assert_allclose(item.layers[2].rgba[4, 3], (0.9, 0.5, 0.1, 0.6), atol=1e-6)


def test_layering_repairs_what_it_cannot_reach():
  """A wrongly inpainted background (white under object 2's faint right column) would need a
  colour outside [0, 1] there: those pixels keep the photo in the background, lose the
  shadow, and the composite still reproduces the photo."""
  layers = scene()
  item = layered_item(layers)
  item.background[2:6, 6] = 1.0
  details = stages.layer(item, None)
  assert details['repaired_pixels'] == 4
  np.testing.assert_allclose(item.layers[0].rgba[2:6, 6, :3], item.image[2:6, 6], atol=1e-6)
  np.testing.assert_allclose(schema.composite(item.layers)[..., :3], item.image,
                             atol=0.5 / 255 + 1e-6)
