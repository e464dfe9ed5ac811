"""COCOA's importer (`layerjax.data.importers.cocoa`: COCO RLE and polygons, the released JSON)
and amodal mIoU as C2F-Seg computes it (`layerjax.evaluate.amodal`), on masks made by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from layerjax.data.importers import cocoa
from layerjax.data.schema import SampleError
from layerjax.evaluate import amodal


# --- COCO masks ---------------------------------------------------------------------------

def test_uncompressed_rle_runs_alternate_from_zero_in_column_major_order():
  m = cocoa.decode_rle({'size': [2, 3], 'counts': [1, 2, 0, 3]})
  # Column-major: (0,0)=0, (1,0)=1, (0,1)=1, then 0 zeros and three ones.
  np.testing.assert_array_equal(m, [[False, True, True], [True, True, True]])
  np.testing.assert_array_equal(cocoa.decode_rle({'size': [2, 2], 'counts': [0, 4]}),
                                np.ones((2, 2), bool))


@pytest.mark.parametrize('string,counts', [
    ('237', [2, 3, 7]),              # one character a count: value + 48
    ('X128', [40, 2, 8]),            # 40 = 8 + (1 << 5): 'X' (8 with the continuation bit), '1'
    ('531N', [5, 3, 1, 1]),          # the 4th is a delta to the 2nd: 1 - 3 = -2 -> 30 -> 'N'
    ('1232', [1, 2, 3, 4]),          # delta 4 - 2 = 2
])
def test_compressed_rle_strings_decode_as_maskapi_writes_them(string, counts):
  h, w = 1, sum(counts)
  expected = np.concatenate([np.full(c, i % 2 == 1) for i, c in enumerate(counts)])
  np.testing.assert_array_equal(cocoa.decode_rle({'size': [h, w], 'counts': string})[0],
                                expected)
  np.testing.assert_array_equal(
      cocoa.decode_rle({'size': [h, w], 'counts': string.encode()})[0], expected)


def test_bad_rles_are_named():
  with pytest.raises(ValueError, match='sum to 5, not 2x3 = 6'):
    cocoa.decode_rle({'size': [2, 3], 'counts': [1, 4]})
  with pytest.raises(ValueError, match='size 2x3 on an image of size 4x4'):
    cocoa.decode_rle({'size': [2, 3], 'counts': [6]}, (4, 4))
  with pytest.raises(ValueError, match='negative run'):
    cocoa.decode_rle({'size': [1, 4], 'counts': [5, -1]})
  with pytest.raises(ValueError, match='ends inside a count'):
    cocoa.decode_rle({'size': [1, 40], 'counts': 'X'})


def test_polygons_fill_the_pixels_whose_centres_are_inside():
  box = cocoa.polygon_mask([1, 1, 4, 1, 4, 3, 1, 3], 5, 6)
  expected = np.zeros((5, 6), bool)
  expected[1:3, 1:4] = True                          # centres x + .5 in (1, 4), y + .5 in (1, 3)
  np.testing.assert_array_equal(box, expected)
  tri = cocoa.polygon_mask([[0, 0, 4, 0, 0, 4]], 5, 5)
  ys, xs = np.mgrid[:5, :5]
  np.testing.assert_array_equal(tri, xs + ys < 3)    # centres with x + y < 4
  union = cocoa.polygon_mask([[0, 0, 1, 0, 1, 1, 0, 1], [3, 3, 5, 3, 5, 5, 3, 5]], 5, 5)
  assert union.sum() == 1 + 4 and union[0, 0] and union[3:5, 3:5].all()
  with pytest.raises(ValueError, match='5 coordinates'):
    cocoa.polygon_mask([0, 0, 1, 1, 2], 5, 5)


# --- the released JSON --------------------------------------------------------------------

def _rle_string(mask):
  """maskApi's rleToString, written out for the test's own masks."""
  flat = mask.T.ravel()
  counts, value, run = [], False, 0
  for px in flat:
    if px != value:
      counts.append(run)
      value, run = px, 0
    run += 1
  counts.append(run)
  out = []
  for i, x in enumerate(counts):
    x = x - counts[i - 2] if i > 2 else x
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = x != -1 if c & 0x10 else x != 0
      out.append(chr((c | 0x20 if more else c) + 48))
  return ''.join(out)


def _write_cocoa(tmp_path):
  """One 6x8 photo: a box in front (fully visible), a box behind it (occluded), and stuff."""
  h, w = 6, 8
  behind = np.zeros((h, w), bool)
  behind[1:5, 1:5] = True
  front = np.zeros((h, w), bool)
  front[3:6, 3:7] = True
  visible = behind & ~front
  Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / 'COCO_val2014_1.jpg')
  data = {
      'images': [{'id': 7, 'file_name': 'COCO_val2014_1.jpg', 'width': w, 'height': h}],
      'annotations': [{'id': 70, 'image_id': 7, 'size': 3, 'depth_constraint': '1-2',
                       'regions': [
          {'segmentation': [3, 3, 7, 3, 7, 6, 3, 6], 'name': 'book', 'order': 1,
           'isStuff': False, 'area': 12.0, 'occlude_rate': 0.0},
          {'segmentation': [1, 1, 5, 1, 5, 5, 1, 5], 'name': 'box', 'order': 2,
           'isStuff': False, 'area': 16.0, 'occlude_rate': 0.25,
           'visible_mask': {'size': [h, w], 'counts': _rle_string(visible)},
           'invisible_mask': {'size': [h, w], 'counts': _rle_string(behind & front)}},
          {'segmentation': [0, 0, 8, 0, 8, 6, 0, 6], 'name': 'table', 'order': 3,
           'isStuff': True, 'area': 48.0, 'occlude_rate': 0.5,
           'visible_mask': {'size': [h, w], 'counts': _rle_string(~(behind | front))}}]}]}
  path = tmp_path / 'COCO_amodal_val2014.json'
  path.write_text(json.dumps(data))
  return path, behind, front, visible


def test_importer_reads_the_released_format(tmp_path):
  path, behind, front, visible = _write_cocoa(tmp_path)
  records = list(cocoa.regions(path))
  assert [r['id'] for r in records] == ['7/0', '7/1']           # stuff left out
  assert [r['id'] for r in cocoa.regions(path, stuff=True)] == ['7/0', '7/1', '7/2']
  book, box = (cocoa.to_instance(r, tmp_path) for r in records)
  assert book.image_path == tmp_path / 'COCO_val2014_1.jpg' and book.image_path.is_file()
  assert (book.name, book.order, box.name, box.order) == ('book', 1, 'box', 2)
  np.testing.assert_array_equal(book.amodal, front)
  np.testing.assert_array_equal(book.visible, front)            # no visible_mask: unoccluded
  np.testing.assert_array_equal(box.amodal, behind)
  np.testing.assert_array_equal(box.visible, visible)
  q = box.query()
  assert q.box == (1, 1, 5, 5) and q.mask is None and q.text == ''
  (px, py), = q.points
  assert visible[int(py), int(px)]
  q = box.query(('mask', 'text'))
  assert q.points == () and q.box is None and q.text == 'box'
  np.testing.assert_array_equal(q.mask, visible)
  with pytest.raises(ValueError, match="kinds \\['scribble'\\]"):
    box.query(('scribble',))


def test_importer_names_bad_records(tmp_path):
  path, *_ = _write_cocoa(tmp_path)
  data = json.loads(path.read_text())
  region = data['annotations'][0]['regions'][1]
  region['visible_mask']['size'] = [3, 3]
  record = {'id': '7/1', 'image': data['images'][0], 'region': region}
  with pytest.raises(SampleError, match="instance '7/1' .*size 3x3 on an image of size 6x8"):
    cocoa.to_instance(record, tmp_path)
  region['visible_mask'] = {'size': [6, 8], 'counts': [48]}
  with pytest.raises(SampleError, match="'7/1': empty visible mask"):
    cocoa.to_instance(record, tmp_path)
  data['annotations'][0]['image_id'] = 99
  path.write_text(json.dumps(data))
  with pytest.raises(SampleError, match='names image 99'):
    list(cocoa.regions(path))
  path.write_text(json.dumps({'images': []}))
  with pytest.raises(SampleError, match='not a COCOA annotation file'):
    list(cocoa.regions(path))


# --- mIoU ---------------------------------------------------------------------------------

def _occluded_instance():
  gt = np.zeros((4, 4), bool)
  gt[0:2, 0:3] = True                                # 6 pixels
  vis = gt.copy()
  vis[1, 1:3] = False                                # hidden: (1, 1), (1, 2)
  pred = np.zeros((4, 4), np.float32)
  pred[0, 1:3] = 0.9                                 # 2 visible pixels, (0, 0) missed
  pred[1, 0:2] = 0.7                                 # (1, 0) visible, (1, 1) hidden: found
  pred[3, 3] = 0.6                                   # a false positive
  pred[1, 2] = 0.5                                   # not above the threshold: (1, 2) missed
  return pred, gt, vis


def test_instance_scores_by_hand():
  pred, gt, vis = _occluded_instance()
  row = amodal.instance_scores('a', pred, gt, vis)
  # pred = {(0,1), (0,2), (1,0), (1,1), (3,3)}: 4 of gt's 6, union 7.
  assert row['iou_full'] == pytest.approx((4 + 1e-10) / (7 + 1e-10), rel=1e-12)
  # Hidden parts: pred {(1,1), (3,3)}, gt {(1,1), (1,2)}: 1 of 3.
  assert row['iou_occ'] == pytest.approx(1 / (3 + 1e-6), rel=1e-12)
  assert row['occluded']
  # Joined with the visible mask, (0, 0) is found too: 5 of 6, union 7; hidden parts as before.
  assert row['iou_full_post'] == pytest.approx(5 / 7)
  assert row['iou_occ_post'] == pytest.approx(1 / 3)


def test_miou_averages_occluded_iou_over_counted_instances_as_c2f_seg_does():
  pred, gt, vis = _occluded_instance()
  full = np.zeros((4, 4), bool)
  full[2:4, 0:2] = True
  # b: unoccluded, nothing predicted: iou_full = 1e-10 / (4 + 1e-10), not counted for occ.
  # c: visible has one pixel off the amodal mask and one hidden pixel: gt - vis sums to 0,
  #    so C2F-Seg does not count it, yet adds its occluded IoU (1 of 1 here).
  gt_c = np.zeros((4, 4), bool)
  gt_c[0, 0:2] = True
  vis_c = np.zeros((4, 4), bool)
  vis_c[0, 0] = vis_c[3, 3] = True
  pred_c = gt_c.astype(np.float32)
  result = amodal.evaluate([('a', pred, gt, vis), ('b', np.zeros((4, 4)), full, full),
                            ('c', pred_c, gt_c, vis_c)])
  assert result['instances'] == 3 and result['occluded_instances'] == 1
  assert [r['occluded'] for r in result['rows']] == [True, False, False]
  assert result['mIoU_full'] == pytest.approx((4 / 7 + 1e-10 / 4 + 2 / 2) / 3)
  assert result['mIoU_occ'] == pytest.approx((1 / 3 + 0 + 1) / 1)
  line = amodal.summary(result)
  assert 'mIoU_full 52.38' in line and 'mIoU_occ 133.33' in line and '3 instances' in line
  assert amodal.aggregate(result['rows'][1:2])['mIoU_occ'] is None


def test_bad_predictions_are_named():
  pred, gt, vis = _occluded_instance()
  with pytest.raises(ValueError, match="instance 'x': predicted alpha \\(3, 4\\)"):
    amodal.instance_scores('x', pred[:3], gt, vis)
  pred[0, 0] = np.nan
  with pytest.raises(ValueError, match="instance 'x': predicted alpha has NaN"):
    amodal.instance_scores('x', pred, gt, vis)
  with pytest.raises(ValueError, match='no instances'):
    amodal.aggregate([])


def test_importer_to_metric_end_to_end(tmp_path):
  path, *_ = _write_cocoa(tmp_path)
  instances = [cocoa.to_instance(r, tmp_path) for r in cocoa.regions(path)]
  # A perfect amodal prediction scores 1 on both; the visible mask alone scores 0 hidden.
  perfect = amodal.evaluate([(i.id, i.amodal.astype(np.float32), i.amodal, i.visible)
                             for i in instances])
  assert perfect['mIoU_full'] == pytest.approx(1.0)
  assert perfect['mIoU_occ'] == pytest.approx(1.0)
  assert perfect['occluded_instances'] == 1
  modal = amodal.evaluate([(i.id, i.visible.astype(np.float32), i.amodal, i.visible)
                           for i in instances])
  assert modal['mIoU_full'] == pytest.approx((1 + 12 / 16) / 2)
  assert modal['mIoU_occ'] == pytest.approx(0.0)


def test_cocoa_benchmark_command(tmp_path, capsys, trained_workdirs):
  """`python -m layerjax.evaluate --benchmark cocoa`: hand-made predictions (the book perfect,
  the box predicted as its visible part only) against the released format, beside the
  `visible` baseline; then the same instances decomposed by a trained model."""
  from layerjax.data import schema
  from layerjax.evaluate import __main__ as evaluate_cli
  from layerjax.fileio import safe_name
  path, behind, front, visible = _write_cocoa(tmp_path)
  for iid, mask in (('7/0', front), ('7/1', visible)):
    bg = np.concatenate([np.zeros((6, 8, 3)), np.ones((6, 8, 1))], -1).astype(np.float32)
    obj = np.concatenate([np.ones((6, 8, 3)), mask[..., None]], -1).astype(np.float32)
    sample = schema.assemble(iid, [schema.Layer('background', 'background', bg),
                                   schema.Layer('object_1', 'object', obj)], prompts=False)
    schema.write_folder(sample, tmp_path / 'pred' / safe_name(iid))
  args = ['--benchmark', 'cocoa', '--ground-truth', str(path), '--images', str(tmp_path),
          '--no-progress']
  assert evaluate_cli.main(args + ['--predictions', str(tmp_path / 'pred'),
                                   '--out', str(tmp_path / 'out')]) == 0
  scores = json.loads((tmp_path / 'out' / 'results.json').read_text())['scores']
  # The book: IoU 1; the box: its visible 12 of 16 pixels, nothing of the hidden 4.
  assert scores['pred/amodal/mIoU_full'] == pytest.approx((1 + 12 / 16) / 2)
  assert scores['pred/amodal/mIoU_occ'] == pytest.approx(0.0)
  assert scores['visible/amodal/mIoU_full'] == pytest.approx((1 + 12 / 16) / 2)
  assert scores['pred/amodal/count/occluded_instances'] == 1
  printed = capsys.readouterr().out
  assert 'pred: COCOA amodal: mIoU_full 87.50, mIoU_occ 0.00 (2 instances, 1 occluded' in printed
  _, trained = trained_workdirs('pixels')
  assert evaluate_cli.main(args + ['--model', str(trained), '--predictions',
                                   str(tmp_path / 'model'), '--out', str(tmp_path / 'm')]) == 0
  result = json.loads((tmp_path / 'm' / 'results.json').read_text())
  assert result['counts'] == {'instances': 2, 'skipped_instances': 0, 'missing': 0,
                              'invalid': 0}
  assert 0 <= result['scores']['model/amodal/mIoU_full'] <= 1
  (tmp_path / 'nothing').mkdir()
  assert evaluate_cli.main(args + ['--predictions', str(tmp_path / 'nothing'),
                                   '--out', str(tmp_path / 'o')]) == 2
  assert 'no prediction of any of the 2 instances' in capsys.readouterr().err
