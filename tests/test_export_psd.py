"""Layered PSD export and import (layerjax.export.psd), checked through psd-tools' own API."""

from __future__ import annotations

import numpy as np
import pytest
from psd_tools import PSDImage
from psd_tools.api.layers import Group, PixelLayer

from layerjax.data import schema
from layerjax.data.schema import Layer
from layerjax.export.names import layer_names
from layerjax.export.psd import PsdError, read_psd, write_psd
from layerjax.fileio import OutputError

H, W = 30, 44
STEP = 1 / 255
# (x0, y0, x1, y1): where each non-background layer's alpha is non-zero, by construction.
BOXES = {'shadow_1': (6, 20, 30, 27), 'object_1': (8, 4, 24, 22), 'object_2': (26, 10, 40, 26),
         'object_3': (30, 2, 43, 9)}
NAMES = ['background', 'mug shadow', 'mug', 'mug 2', 'tasse à café']


def _soft(box, peak=1.0) -> np.ndarray:
  """An alpha > 0 exactly inside `box`: a bump from 0.2 at its edge to `peak` in its middle."""
  x0, y0, x1, y1 = box
  yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
  cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
  r = np.maximum(np.abs(xx - cx) / max(x1 - x0, 2), np.abs(yy - cy) / max(y1 - y0, 2)) * 2
  a = 0.2 + (peak - 0.2) * np.clip(1 - r, 0, 1)
  inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
  return np.where(inside, a, 0).astype(np.float32)


def make_sample(empty: str | None = None) -> schema.LayeredSample:
  """Background gradient, a shadow under 'mug', two objects labelled 'mug' and one with a
  non-ASCII label; `empty` names a layer left without a visible pixel."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
  bg = np.stack([xx / W, yy / H, np.full_like(xx, 0.3), np.ones_like(xx)], -1)
  layers = [Layer('background', 'background', bg.astype(np.float32))]
  for name, kind, label in [('shadow_1', 'shadow', ''), ('object_1', 'object', 'mug'),
                            ('object_2', 'object', 'mug'), ('object_3', 'object', 'tasse à café')]:
    rgb = rng.uniform(0, 1, (H, W, 3)) if kind == 'object' else np.zeros((H, W, 3))
    alpha = np.zeros((H, W), np.float32) if name == empty else _soft(
        BOXES[name], 0.6 if kind == 'shadow' else 1.0)
    layers.append(Layer(name, kind, np.concatenate([rgb, alpha[..., None]], -1).astype(
        np.float32), owner='object_1' if kind == 'shadow' else None, label=label,
        caption=f'{name} caption', referring=(f'the {label or name}',)))
  return schema.assemble('psd-test', layers, prompts=False)


def _premult(rgba: np.ndarray) -> np.ndarray:
  return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)


def _close(a, b, tol=STEP + 1e-6):
  """Equal within 8-bit rounding, premultiplied (colour under near-zero alpha is noise): half a
  step on colour and on alpha, so at most one step on their product."""
  err = np.abs(_premult(np.asarray(a, np.float64)) - _premult(np.asarray(b, np.float64)))
  assert err.max() <= tol, f'differs by {err.max() * 255:.3f}/255'


def test_layers_names_order_and_offsets_as_psd_tools_reads_them(tmp_path):
  sample = make_sample()
  psd = PSDImage.open(write_psd(sample, tmp_path / 's.psd'))
  assert (psd.width, psd.height, psd.depth) == (W, H, 8)
  assert [layer.name for layer in psd] == NAMES  # psd-tools lists bottom first
  assert all(layer.kind == 'pixel' for layer in psd)
  boxes = [(0, 0, W, H)] + [BOXES[n] for n in ('shadow_1', 'object_1', 'object_2', 'object_3')]
  for layer, box, ours in zip(psd, boxes, sample.layers):
    assert (layer.left, layer.top, layer.right, layer.bottom) == box
    x0, y0, x1, y1 = box
    _close(layer.numpy(), ours.rgba[y0:y1, x0:x1])


def test_merged_image_and_psd_tools_composite_equal_ours(tmp_path):
  sample = make_sample()
  ours = schema.composite(sample.layers)
  path = write_psd(sample, tmp_path / 's.psd')
  merged = np.asarray(PSDImage.open(path).composite(), np.float32) / 255
  assert merged.shape == (H, W, 3)
  assert np.abs(merged - ours[..., :3]).max() <= 0.5 * STEP + 1e-6  # the stored merged image
  # psd-tools rendering the layers itself: each stored layer and its output rounded to 8 bits,
  # the error the schema allows 8-bit storage (half a step per layer and for the image).
  rendered = PSDImage.open(path).composite(ignore_preview=True)
  rendered = np.asarray(rendered.convert('RGB'), np.float32) / 255
  assert np.abs(rendered - ours[..., :3]).max() <= schema.default_atol(len(sample.layers))


def test_round_trip_keeps_layers_kinds_owner_and_texts(tmp_path):
  sample = make_sample()
  back = read_psd(write_psd(sample, tmp_path / 's.psd'))
  assert back.id == 'psd-test'
  assert [layer.name for layer in back.layers] == [layer.name for layer in sample.layers]
  texts = lambda s: [(x.kind, x.owner, x.label, x.caption, x.referring) for x in s.layers]
  assert texts(back) == texts(sample)
  for a, b in zip(back.layers, sample.layers):
    _close(a.rgba, b.rgba)
    assert a.bbox == b.bbox
  assert np.abs(back.image - sample.image).max() <= len(sample.layers) * STEP


def test_an_empty_layer_is_written_empty_and_read_back(tmp_path):
  sample = make_sample(empty='object_2')
  path = write_psd(sample, tmp_path / 's.psd')
  layer = list(PSDImage.open(path))[3]
  assert (layer.name, layer.width, layer.height) == ('mug 2', 0, 0)
  back = read_psd(path)
  assert back.layer('object_2').rgba[..., 3].max() == 0 and back.layer('object_2').bbox is None


def test_long_and_duplicate_names_are_cut_and_numbered():
  sample = make_sample()
  for layer in sample.layers[2:4]:
    layer.label = 'a' * 300
  sample.layers[4].label = 'tab\there\x00 '
  names = layer_names(sample, 'x.psd', PsdError)
  assert names[2:] == ['a' * 255, 'a' * 253 + ' 2', 'tabhere']


def test_a_foreign_psd_reads_as_objects_over_a_white_flattened_background(tmp_path):
  psd = PSDImage.new('RGBA', (4, 3))
  bottom = np.zeros((3, 4, 4), np.uint8)
  bottom[..., 0], bottom[..., 3] = 255, 51  # red at alpha 0.2
  psd.append(PixelLayer.fromarray(bottom, psd, name='paper'))
  psd.append(PixelLayer.fromarray(np.full((1, 2, 4), 255, np.uint8), psd, name='dot', top=1,
                                  left=1))
  psd.save(tmp_path / 'f.psd')
  back = read_psd(tmp_path / 'f.psd')
  assert [(x.name, x.kind, x.label) for x in back.layers] == [
      ('paper', 'background', 'paper'), ('dot', 'object', 'dot')]
  # red 0.2 over white: (1, 0.8, 0.8), opaque.
  np.testing.assert_allclose(back.layers[0].rgba[0, 0], [1, 0.8, 0.8, 1], atol=1e-6)
  assert back.layers[1].bbox == (1, 1, 3, 2)
  assert 'background' in back.provenance


def test_existing_file_is_kept_without_overwrite(tmp_path):
  path = tmp_path / 's.psd'
  path.write_bytes(b'keep')
  with pytest.raises(OutputError, match='s.psd: exists'):
    write_psd(make_sample(), path)
  assert path.read_bytes() == b'keep'
  write_psd(make_sample(), path, overwrite=True)
  assert len(list(PSDImage.open(path))) == 5


def test_a_canvas_over_30000_px_is_refused(tmp_path):
  bg = np.ones((1, 30001, 4), np.float32)
  sample = schema.assemble('wide', [Layer('background', 'background', bg)], prompts=False)
  with pytest.raises(PsdError, match='30001x1.*at most 30000'):
    write_psd(sample, tmp_path / 'w.psd')
  assert not list(tmp_path.iterdir())


def test_a_label_empty_once_cleaned_is_refused(tmp_path):
  sample = make_sample()
  sample.layers[2].label = ' \n\x07 '
  with pytest.raises(PsdError, match="layer 'object_1' has no usable layer name"):
    write_psd(sample, tmp_path / 's.psd')
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('build, problem', [
    (lambda: PSDImage.new('RGBA', (4, 4), depth=16), '16-bit RGB document'),
    (lambda: PSDImage.new('CMYK', (4, 4)), '8-bit CMYK document'),
    (lambda: PSDImage.new('RGBA', (4, 4)), "layer 'g' is a group layer"),
])
def test_unsupported_documents_are_refused_naming_the_file(tmp_path, build, problem):
  psd = build()
  psd.append(PixelLayer.fromarray(np.ones((2, 2, psd.channels)), psd, name='p'))
  if 'group' in problem:
    psd.append(Group.new(psd, name='g'))
  psd.save(tmp_path / 'u.psd')
  with pytest.raises(PsdError, match=f'u.psd: .*{problem}'):
    read_psd(tmp_path / 'u.psd')
