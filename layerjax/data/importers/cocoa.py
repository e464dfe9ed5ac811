"""COCOA (COCO amodal; Zhu et al., CVPR 2017) annotations -> amodal ground truth per instance.

The released `COCO_amodal_{train,val}2014.json`, as its API reads it (`Amodal.createIndex`,
repo Wakeupbuddy/amodalAPI, `PythonAPI/pycocotools/amodal.py`):

  {'images': [{'id', 'file_name', 'width', 'height', ...}],
   'annotations': [{'id', 'image_id', 'size', 'depth_constraint',
                    'regions': [{'segmentation': [x0, y0, x1, y1, ...],   # amodal polygon
                                 'visible_mask': RLE, 'invisible_mask': RLE,  # if occluded
                                 'order', 'name', 'isStuff', 'area', 'occlude_rate'}]}]}

A region without 'visible_mask' is fully visible: its visible mask is the amodal one (as the
de-occlusion reader takes it: repo XiaohangZhan/deocclusion, `datasets/reader.py`, read_SAS).
Masks are decoded as pycocotools does (repo cocodataset/cocoapi, `common/maskApi.c`): RLE
counts, compressed (`rleFrString`) or not, alternate runs of 0 and 1 in column-major order;
polygons are rasterised by `rleFrPoly`. pycocotools itself is not a dependency.

`regions(path)` yields one cheap record per region; `to_instance(record, images)` decodes it
and raises `SampleError` naming the image and region (a caller skips and counts those).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from layerjax.data.schema import SampleError, alpha_bbox, interior_point
from layerjax.fileio import read_json
from layerjax.infer.prompts import Query


@dataclasses.dataclass(frozen=True)
class Instance:
  id: str                      # '<image id>/<region index>'
  image_path: Path
  amodal: np.ndarray           # [H, W] bool: the whole object, seen or hidden
  visible: np.ndarray          # [H, W] bool: the part seen in the photo
  name: str                    # the annotator's label
  order: int                   # depth order in the image, 1 = front

  def query(self, kinds: Sequence[str] = ('box', 'point')) -> Query:
    """The prompt our decomposer takes, from the visible part only: its box, its point
    farthest from the mask's edge, the mask itself, the label as text (any of `kinds`)."""
    unknown = set(kinds) - {'box', 'point', 'mask', 'text'}
    if unknown:
      raise ValueError(f'COCOA prompt kinds {sorted(unknown)}: expected box, point, mask, text')
    return Query(points=(interior_point(self.visible),) if 'point' in kinds else (),
                 box=alpha_bbox(self.visible) if 'box' in kinds else None,
                 mask=self.visible.copy() if 'mask' in kinds else None,
                 text=self.name if 'text' in kinds else '')


def regions(path, stuff: bool = False) -> Iterator[dict[str, Any]]:
  """One record per region of the annotation file: {'id', 'image', 'region'}, where 'image' is
  the image's entry; stuff regions ('isStuff') only with `stuff`."""
  path = Path(path)
  data = read_json(path, SampleError)
  if not isinstance(data, dict) or not {'images', 'annotations'} <= set(data):
    raise SampleError(f'{path}: not a COCOA annotation file (needs images and annotations)')
  images = {img['id']: img for img in data['images']}
  for ann in data['annotations']:
    if ann.get('image_id') not in images:
      raise SampleError(f'{path}: annotation {ann.get("id")!r} names image '
                        f'{ann.get("image_id")!r}, which is not among its images')
    if 'regions' not in ann:
      raise SampleError(f'{path}: annotation {ann.get("id")!r} has no regions (not the '
                        f'released COCOA format)')
    for i, region in enumerate(ann['regions']):
      if region.get('isStuff') and not stuff:
        continue
      yield {'id': f'{ann["image_id"]}/{i}', 'image': images[ann['image_id']], 'region': region}


def to_instance(record: dict[str, Any], images) -> Instance:
  """The decoded instance of one `regions()` record; `images` is the folder of the photos."""
  sid, img, region = record['id'], record['image'], record['region']
  h, w = int(img['height']), int(img['width'])
  try:
    amodal = polygon_mask(region['segmentation'], h, w)
    visible = (decode_rle(region['visible_mask'], (h, w)) if 'visible_mask' in region
               else amodal.copy())
  except (KeyError, TypeError, ValueError) as e:
    raise SampleError(f'COCOA instance {sid!r} ({img.get("file_name")}): {e}') from None
  if not visible.any():
    raise SampleError(f'COCOA instance {sid!r}: empty visible mask (fully occluded), no '
                      f'prompt to give')
  return Instance(sid, Path(images) / img['file_name'], amodal, visible,
                  str(region.get('name', '')), int(region.get('order', 0)))


# --- COCO masks ---------------------------------------------------------------------------

def decode_rle(rle: dict[str, Any], size: tuple[int, int] | None = None) -> np.ndarray:
  """A COCO RLE {'size': [h, w], 'counts': str | [int]} -> bool [h, w]; `size`, if given,
  must be the RLE's."""
  h, w = (int(v) for v in rle['size'])
  if size is not None and (h, w) != tuple(size):
    raise ValueError(f'RLE of size {h}x{w} on an image of size {size[0]}x{size[1]}')
  counts = rle['counts']
  counts = _counts_from_string(counts) if isinstance(counts, (str, bytes)) else list(counts)
  if any(c < 0 for c in counts):
    raise ValueError('RLE with a negative run length')
  if sum(counts) != h * w:
    raise ValueError(f'RLE counts sum to {sum(counts)}, not {h}x{w} = {h * w}')
  return _from_counts(counts, h, w)


def _from_counts(counts: Sequence[int], h: int, w: int) -> np.ndarray:
  values = np.arange(len(counts)) % 2 == 1          # runs alternate 0, 1, 0, ...
  flat = np.repeat(values, np.asarray(counts, np.int64))
  return flat.reshape(w, h).T.copy()                # column-major, as maskApi stores masks


def _counts_from_string(s: str | bytes) -> list[int]:
  """maskApi's `rleFrString`: 6 bits a character (offset 48), 5 of value and a continuation
  bit, sign-extended; from the fourth count on, each is stored as a delta to the one two
  before."""
  data = s.encode() if isinstance(s, str) else s
  counts, p = [], 0
  while p < len(data):
    x, k, more = 0, 0, True
    while more:
      if p >= len(data):
        raise ValueError('RLE string ends inside a count')
      c = data[p] - 48
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def polygon_mask(segmentation, h: int, w: int) -> np.ndarray:
  """One flat polygon [x0, y0, x1, y1, ...] or a list of them (their union) -> bool [h, w],
  rasterised as maskApi's `rleFrPoly`."""
  polygons = segmentation if segmentation and isinstance(segmentation[0], list) else [
      segmentation]
  mask = np.zeros((h, w), bool)
  for xy in polygons:
    if len(xy) < 6 or len(xy) % 2:
      raise ValueError(f'polygon with {len(xy)} coordinates (needs pairs, at least 3 points)')
    mask |= _from_counts(_polygon_counts([float(v) for v in xy], h, w), h, w)
  return mask


def _polygon_counts(xy: list[float], h: int, w: int) -> list[int]:
  # Upsample 5x and walk every edge densely (a DDA along its longer axis), then keep one
  # boundary point per pixel column crossing, and run-length those points.
  scale, k = 5.0, len(xy) // 2
  x = [int(scale * xy[2 * j] + .5) for j in range(k)]
  y = [int(scale * xy[2 * j + 1] + .5) for j in range(k)]
  x.append(x[0])
  y.append(y[0])
  u, v = [], []
  for j in range(k):
    xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
    dx, dy = abs(xe - xs), abs(ys - ye)
    flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
    if flip:
      xs, xe, ys, ye = xe, xs, ye, ys
    # A repeated vertex (dx = dy = 0) divides 0 by 0 in maskApi; its one point lies between
    # points of the same column, so it never counts, and any slope does.
    if dx >= dy:
      s = (ye - ys) / dx if dx else 0.0
      for d in range(dx + 1):
        t = dx - d if flip else d
        u.append(t + xs)
        v.append(int(ys + s * t + .5))
    else:
      s = (xe - xs) / dy
      for d in range(dy + 1):
        t = dy - d if flip else d
        v.append(t + ys)
        u.append(int(xs + s * t + .5))
  starts = []
  for j in range(1, len(u)):
    if u[j] == u[j - 1]:
      continue
    xd = u[j] if u[j] < u[j - 1] else u[j] - 1
    xd = (xd + .5) / scale - .5
    if math.floor(xd) != xd or xd < 0 or xd > w - 1:
      continue
    yd = v[j] if v[j] < v[j - 1] else v[j - 1]
    yd = min(max((yd + .5) / scale - .5, 0.0), float(h))
    starts.append(int(xd) * h + int(math.ceil(yd)))
  a = sorted(starts + [h * w])
  a = [a[0]] + [a[j] - a[j - 1] for j in range(1, len(a))]
  counts, j = [a[0]], 1
  while j < len(a):                                 # empty runs merge their neighbours
    if a[j] > 0:
      counts.append(a[j])
      j += 1
    else:
      j += 1
      if j < len(a):
        counts[-1] += a[j]
        j += 1
  return counts
