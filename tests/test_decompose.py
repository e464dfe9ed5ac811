"""Decomposing photos with a trained model: the `Decomposer` API, whole-scene peeling and
`python -m layerjax.decompose` (on a tiny model trained for 2 steps: what is tested is the
path from a photo to layers that recompose to it, not the tiny model's quality)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from layerjax import decompose as cli_main
from layerjax import parallel
from layerjax.data import images, pipeline
from layerjax.data.schema import Layer, LayeredSample, assemble, composite, read_folder
from layerjax.export import ora, png
from layerjax.infer import model as infer_model
from layerjax.infer import postprocess as post
from layerjax.infer.decomposer import Decomposer, model_inputs
from layerjax.infer.prompts import PromptError, Query
from layerjax.infer.scene import Proposals
from data_engine.tools.types import Detection


@pytest.fixture(scope='module')
def decomposer(packed):
  return Decomposer.load(packed)


def scene(n: int, h: int = 48, w: int = 80):
  """A gradient with `n` discs of strong colours in a row, alternating high and low: the
  photo and each disc's box (x0, y0, x1, y1)."""
  yy, xx = np.mgrid[0:h, 0:w]
  bg = np.stack([0.6 + 0.1 * yy / h, 0.65 + 0 * xx, 0.7 - 0.1 * yy / h], -1)
  layers = [np.concatenate([bg, np.ones((h, w, 1))], -1)]
  colours = [(0.9, 0.1, 0.1), (0.1, 0.2, 0.9), (0.1, 0.7, 0.2), (0.9, 0.8, 0.1)]
  boxes = []
  r = 7
  for k in range(n):
    cx, cy = 10 + 19 * k, 14 + 18 * (k % 2)
    a = (np.hypot(xx - cx, yy - cy) < r).astype(np.float64)
    layers.append(np.concatenate([np.broadcast_to(colours[k], (h, w, 3)), a[..., None]], -1))
    boxes.append((cx - r + 1, cy - r + 1, cx + r, cy + r))
  return composite(layers)[..., :3].astype(np.float32), boxes


def _check_exact(sample: LayeredSample, photo: np.ndarray) -> None:
  assert sample.image.shape == photo.shape
  np.testing.assert_allclose(composite(sample.layers)[..., :3], photo, atol=1e-4)
  assert sample.layers[0].kind == 'background'


def test_box_prompt_on_a_photo_of_any_size(decomposer):
  photo, boxes = scene(2, 45, 70)  # neither a multiple of the patching nor square
  sample = decomposer.decompose(photo, Query(box=boxes[0]), seeds=2, seed=5)
  _check_exact(sample, photo)
  assert [l.kind for l in sample.layers][-1] == 'object'
  assert {l.kind for l in sample.layers} <= {'background', 'shadow', 'object'}
  p = sample.provenance
  assert p['step'] == decomposer.backend.step and p['model'] == decomposer.backend.source
  assert p['seeds_tried'] == [5, 6] and len(p['seed_scores']) == 2
  assert p['chosen_seed'] == 5 + int(np.argmin(p['seed_scores']))
  assert p['raw_recompose_l1'] == min(p['seed_scores'])
  assert p['steps'] == decomposer.config.eval.sample_steps and p['guidance'] == 1.0
  assert p['prompt']['box'] == list(boxes[0])
  assert set(p['timings']) >= {'sampling', 'decoding', 'postprocess', 'total'}
  assert sample.prompts[0].box == boxes[0]
  assert sample.prompts[0].target == sample.layers[-1].name
  json.dumps(p)


def test_a_seed_gives_the_same_layers_however_many_are_asked_for(decomposer):
  photo, boxes = scene(1, 32, 32)
  three = decomposer.decompose(photo, Query(box=boxes[0]), seeds=3)
  one = decomposer.decompose(photo, Query(box=boxes[0]), seed=three.provenance['chosen_seed'])
  for a, b in zip(three.layers, one.layers):
    np.testing.assert_array_equal(a.rgba, b.rgba)
  assert one.provenance['seed_scores'] == [three.provenance['raw_recompose_l1']]


def test_the_sampler_compiles_once_per_shape(decomposer):
  photo, boxes = scene(1, 60, 24)  # a tall photo: a shape no other test runs (32 x 16)
  before = decomposer.backend._sample._cache_size()
  decomposer.decompose(photo, Query(box=boxes[0]))
  decomposer.decompose(photo * 0.9, Query(points=((10, 12),)))
  assert decomposer.backend._sample._cache_size() == before + 1


def test_prompts_are_rendered_as_training_renders_them(decomposer):
  """At the model's resolution, the query's prompt map is the loader's for the same prompt."""
  photo, boxes = scene(1, 32, 32)
  alpha = np.zeros((32, 32), np.float32)
  x0, y0, x1, y1 = boxes[0]
  alpha[y0:y1, x0:x1] = 1
  obj = Layer('object_1', 'object', np.concatenate([np.ones((32, 32, 3), np.float32) * 0.5,
                                                   alpha[..., None]], -1), label='disc')
  bg = Layer('background', 'background',
             np.concatenate([photo, np.ones((32, 32, 1), np.float32)], -1))
  sample = assemble('s', [bg, obj])
  prompt = sample.prompts[0]
  cfg = decomposer.config.data
  for kinds, query in ((('box',), Query(box=prompt.box)),
                       (('point',), Query(points=prompt.points)),
                       (('mask',), Query(mask=prompt.mask))):
    config = type('C', (), {**{k: cfg[k] for k in cfg}, 'prompt_probs': {kinds[0]: 1.0},
                            'degradations': {}, 'hflip_prob': 0.0, 'scale_range': (1., 1.)})
    example = pipeline.make_example(sample, np.random.default_rng(0), config)
    g = post.geometry((32, 32), tuple(cfg.image_size), decomposer.settings.step)
    ours = model_inputs(decomposer.config, sample.image, query, g,
                        decomposer.backend.text_inputs)['prompt'][0]
    np.testing.assert_allclose(ours, example['prompt'], atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake CPU) devices')
def test_sharded_over_a_mesh_gives_the_same_layers(decomposer, packed):
  photo, boxes = scene(1, 32, 32)
  sharded = Decomposer.load(packed, mesh=parallel.make_mesh((2, 2, 2)))
  ours = sharded.decompose(photo, Query(box=boxes[0]))
  ref = decomposer.decompose(photo, Query(box=boxes[0]))
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded.backend._state))
  for a, b in zip(ours.layers, ref.layers):
    np.testing.assert_allclose(a.rgba, b.rgba, atol=1e-4)


def test_a_text_to_a_model_trained_without_text_is_refused(decomposer):
  config = decomposer.config.copy_and_resolve_references()
  config.data.prompt_probs = {'box': 1.0}
  boxes_only = Decomposer(infer_model.JaxBackend(
      dataclasses.replace(decomposer.backend.loaded, config=config)))
  with pytest.raises(PromptError, match=r"prompt text: .*prompt kinds \['box'\]"):
    boxes_only.decompose(np.zeros((32, 32, 3), np.float32), Query(box=(0, 0, 8, 8), text='a'))


def test_points_mask_file_and_text(decomposer, tmp_path):
  photo, boxes = scene(2, 40, 64)
  mask = np.zeros(photo.shape[:2], np.uint8)
  x0, y0, x1, y1 = boxes[1]
  mask[y0:y1, x0:x1] = 255
  Image.fromarray(mask).save(tmp_path / 'm.png')
  for query in (Query(points=((10, 14), (12, 15))), Query(mask=tmp_path / 'm.png'),
                Query(box=boxes[1], text='the blue ball'), 'the blue ball',
                {'points': ((10, 14),), 'text': 'a ball'}):
    sample = decomposer.decompose(photo, query)
    _check_exact(sample, photo)
  assert sample.layers[-1].referring == ('a ball',) and sample.layers[-1].label == 'a ball'


@pytest.mark.parametrize('query,message', [
    (Query(box=(10, 10, 10, 20)), 'zero area'),
    (Query(box=(-5, 0, 10, 10)), 'outside the 64x40 image'),
    (Query(points=((64, 3),)), 'outside the 64x40 image'),
    (Query(mask=np.zeros((40, 64), bool)), 'is empty'),
    (Query(mask=np.ones((20, 20), bool)), 'but the image is 40x64'),
    (Query(), 'empty'),
    ({'colour': 'red'}, 'unknown fields'),
])
def test_bad_prompts_are_refused_before_any_compute(decomposer, query, message, monkeypatch):
  monkeypatch.setattr(decomposer, 'backend', None)  # any compute would fail differently
  with pytest.raises(PromptError, match=message):
    decomposer.decompose(np.zeros((40, 64, 3), np.float32), query)


def test_bad_settings_and_images_are_refused(decomposer, packed, tmp_path, monkeypatch):
  monkeypatch.setattr(decomposer, 'backend', None)
  photo = np.zeros((40, 64, 3), np.float32)
  with pytest.raises(ValueError, match='trained without condition dropout'):
    decomposer.decompose(photo, Query(box=(0, 0, 8, 8)), guidance=3.0)
  with pytest.raises(ValueError, match='seeds and steps'):
    decomposer.decompose(photo, Query(box=(0, 0, 8, 8)), seeds=0)
  small = Decomposer.load(packed, max_pixels=1000)
  with pytest.raises(images.ImageError, match='above the limit'):
    small.decompose(photo, Query(box=(0, 0, 8, 8)))
  Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(tmp_path / 'p.png')
  with pytest.raises(images.ImageError, match='p.png: 64x40 is'):
    small.decompose(tmp_path / 'p.png', Query(box=(0, 0, 8, 8)))
  with pytest.raises(images.ImageError, match='no such file'):
    decomposer.decompose(tmp_path / 'missing.png', Query(box=(0, 0, 8, 8)))
  with pytest.raises(PromptError, match='max_layers is for the whole scene'):
    decomposer.decompose(photo, Query(box=(0, 0, 8, 8)), max_layers=2)


class KnownBoxes:
  """A proposal tool that knows the scene: its boxes, with given scores."""

  def __init__(self, boxes, scores=None):
    self.boxes, self.scores = boxes, scores or [0.9] * len(boxes)

  def __call__(self, image):
    return [Detection(tuple(b), s, label=f'disc {i}')
            for i, (b, s) in enumerate(zip(self.boxes, self.scores))]


@pytest.mark.parametrize('n', [1, 2, 3])
def test_whole_scene_finds_the_objects_a_proposal_tool_knows(decomposer, n):
  photo, boxes = scene(n)
  sample = decomposer.decompose(photo, proposals=Proposals(KnownBoxes(boxes)))
  _check_exact(sample, photo)
  objects = [l for l in sample.layers if l.kind == 'object']
  assert len(objects) == n
  # Back to front by the ground-plane prior: the discs whose bottom is higher come first.
  bottoms = [boxes[int(o.label.split()[1])][3] for o in objects]
  assert bottoms == sorted(bottoms)
  for layer in sample.layers:
    if layer.kind == 'shadow':
      assert layer.owner in {o.name for o in objects}
  assert [p.target for p in sample.prompts] == [o.name for o in objects]
  assert len(sample.provenance['whole_scene']['objects']) == n


def test_whole_scene_threshold_duplicates_and_max_layers(decomposer):
  photo, boxes = scene(3)
  tool = KnownBoxes(boxes + [boxes[0]], [0.9, 0.8, 0.01, 0.7])  # a weak one, a duplicate
  sample = decomposer.decompose(photo, proposals=Proposals(tool, threshold=0.05))
  assert sum(l.kind == 'object' for l in sample.layers) == 2
  sample = decomposer.decompose(photo, proposals=Proposals(tool, threshold=0.0), max_layers=1)
  objects = [l for l in sample.layers if l.kind == 'object']
  # Peeled front to back: the one kept is the nearest (the lowest-reaching, disc 1).
  assert len(objects) == 1 and objects[0].label == 'disc 1'
  with pytest.raises(ValueError, match='max_layers must be >= 1'):
    decomposer.decompose(photo, max_layers=0)


def test_whole_scene_where_nothing_is_found_is_the_photo_as_background(decomposer):
  photo, _ = scene(1, 64, 96)
  sample = decomposer.decompose(photo, proposals=Proposals(threshold=2.0))  # no score passes
  assert [l.kind for l in sample.layers] == ['background']
  _check_exact(sample, photo)


@pytest.mark.parametrize('n', [1, 2, 3])
def test_whole_scene_with_the_offline_detector_counts_the_objects(decomposer, n):
  photo, _ = scene(n, 64, 96)
  sample = decomposer.decompose(photo)
  _check_exact(sample, photo)
  assert sum(l.kind == 'object' for l in sample.layers) == n


def test_command_line_one_photo_a_folder_and_resume(packed, tmp_path, capsys):
  photo, boxes = scene(2, 40, 64)
  photos = tmp_path / 'photos'
  photos.mkdir()
  for i in range(3):
    Image.fromarray((photo * 255).round().astype(np.uint8)).save(photos / f'p{i}.png')
  out = tmp_path / 'one'
  box = ','.join(map(str, boxes[0]))
  assert cli_main.main(['--model', str(packed), '--image', str(photos / 'p0.png'),
                        '--box', box, '--out', str(out), '--format', 'ora,zip',
                        '--preview']) == 0
  sample = read_folder(out)
  assert sample.image.shape == (40, 64, 3) and sample.layers[-1].kind == 'object'
  assert 'raw recomposition L1' in capsys.readouterr().out
  # Its layer files beside it, read back by the export package's readers.
  for back in (ora.read_ora(tmp_path / 'one.ora'), png.read_zip(tmp_path / 'one.zip')):
    assert [l.name for l in back.layers] == [l.name for l in sample.layers]
    np.testing.assert_allclose(back.image, sample.image, atol=1 / 255)
  with Image.open(tmp_path / 'one.preview.png') as sheet:
    assert sheet.width > 3 * sheet.height  # photo, 3 layers and the recomposition in a row
  # An existing sample folder is replaced only with --overwrite.
  assert cli_main.main(['--model', str(packed), '--image',
                                        str(photos / 'p0.png'), '--box', box,
                                        '--out', str(out)]) == 2
  assert '--overwrite' in capsys.readouterr().err
  run = tmp_path / 'run'
  args = ['--model', str(packed), '--image', str(photos), '--layers', '2', '--out', str(run),
          '--no-progress']
  assert cli_main.main(args) == 0
  summary = json.loads((run / 'engine_summary.json').read_text())
  assert summary['samples'] == 3 and summary['dropped'] == 0
  folders = sorted((run / 'samples').iterdir())
  assert len(folders) == 3
  for f in folders:
    s = read_folder(f)
    assert 1 <= sum(l.kind == 'object' for l in s.layers) <= 2
  stamp = [f.stat().st_mtime_ns for f in folders]
  assert cli_main.main(args) == 0  # resumed: nothing redone
  assert [f.stat().st_mtime_ns for f in sorted((run / 'samples').iterdir())] == stamp
  # Files asked for later are made from the samples, without decomposing again.
  assert cli_main.main(args + ['--format', 'psd']) == 0
  assert [f.stat().st_mtime_ns for f in sorted((run / 'samples').iterdir())] == stamp
  assert sorted(p.name for p in (run / 'files').iterdir()) == [
      f'{f.name}.psd' for f in folders]
  assert 'files: 3 files written' in capsys.readouterr().out


@pytest.mark.parametrize('argv,message', [
    (['--box', '1,2,3'], 'expected x0,y0,x1,y1'),
    (['--point', 'a,b'], 'expected x,y'),
    (['--layers', '0'], 'expected an int >= 1'),
    (['--box', '0,0,8,8', '--layers', '2'], '--layers is for the whole scene'),
    (['--box', '0,0,8,8', '--model', 'nowhere'], 'nowhere: no such folder'),
])
def test_command_line_bad_arguments(packed, tmp_path, capsys, argv, message):
  Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(tmp_path / 'p.png')
  code = cli_main.main(['--model', str(packed), '--image',
                                        str(tmp_path / 'p.png'), '--out',
                                        str(tmp_path / 'o'), *argv])
  assert code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()
