"""MuLAn (Tudosiu et al., CVPR 2024; HF `mulan-dataset/v1.0`) -> `LayeredSample`s.

MuLAn releases RGBA decompositions of COCO 2017 and LAION photos as annotations of those
photos: one pickle per photo (zipped as `<name>.p.zip`, or plain `.p` / `.pkl`) holding masks,
additive inpainting deltas and instance alphas; the photos themselves come separately. Layers are
rebuilt the way the release script does it, in 8 bits then /255:

  background RGB = photo * background.original_image_mask + background.inpainted_delta, opaque
  instance k RGB = photo * instances.original_image_mask[k] + instances.inpainted_delta[k],
  instance k alpha = instances.instance_alpha[k]

with the instances back to front. MuLAn folds shadows into the instances, so there are no shadow
layers. The composite of these layers only approximates the photo; the sample's image is the
composite (`schema.assemble`), and the provenance records how far it is from the photo.

Annotations are untrusted pickles: `load_annotation` unpickles them with an unpickler that can
only build numpy arrays and builtin containers, and refuses zip archives that are not one
reasonably sized member.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from layerjax.data.images import ImageError, load_image
from layerjax.data.schema import Layer, LayeredSample, SampleError, assemble

try:
  from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x, which setup.py still allows
  from numpy.core import multiarray as _multiarray, numeric as _numeric

# '.p.zl' is the name one third-party MuLAn reader gives the unpacked files; `load_annotation`
# tells the formats apart by their bytes, not their names.
ANNOTATION_SUFFIXES = ('.p.zip', '.p.zl', '.p', '.pkl')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
MAX_PICKLE_BYTES = 2 << 30   # zip / zlib bomb guard: a real annotation is tens of MB


def _latin1_encode(text, encoding='utf-8'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes, and only that use."""
  if encoding != 'latin1':
    raise pickle.UnpicklingError(f'refused _codecs.encode with encoding {encoding!r}')
  return text.encode('latin1')


# Everything a pickled numpy array, dtype or scalar needs, under both the numpy 1.x
# (`numpy.core`) and numpy 2.x (`numpy._core`) names, whichever numpy wrote the file.
_ALLOWED_GLOBALS = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): _latin1_encode,
    **{(f'numpy.{core}.multiarray', name): getattr(_multiarray, name)
       for core in ('core', '_core') for name in ('_reconstruct', 'scalar')},
    # Protocol 5 pickles contiguous arrays as `_frombuffer(bytes, dtype, shape, order)`.
    **{(f'numpy.{core}.numeric', '_frombuffer'): _numeric._frombuffer
       for core in ('core', '_core')},
}


class _SafeUnpickler(pickle.Unpickler):
  """Builds builtin containers (by their opcodes) and numpy arrays; refuses any other global."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[module, name]
    except KeyError:
      raise pickle.UnpicklingError(
          f'refused global {module}.{name}: a MuLAn annotation holds only numpy arrays and '
          f'builtin containers') from None


def load_annotation(path) -> dict:
  """The annotation dict in `path` (a zip of one pickle, a zlib stream or a plain pickle,
  told apart by their first bytes), unpickled safely. Raises `SampleError` naming the file."""
  path = Path(path)
  try:
    with open(path, 'rb') as f:
      head = f.read(2)
      f.seek(0)
      if head == b'PK':
        obj = _load_zip(path, f)
      elif len(head) == 2 and head[0] == 0x78 and int.from_bytes(head, 'big') % 31 == 0:
        obj = _SafeUnpickler(io.BytesIO(_inflate(path, f.read()))).load()
      else:
        obj = _SafeUnpickler(f).load()
  except SampleError:
    raise
  except FileNotFoundError:
    raise SampleError(f'{path}: no such annotation file') from None
  except Exception as e:  # anything an untrusted file can make the unpickler or unzipper raise
    raise SampleError(f'{path}: not a readable annotation ({type(e).__name__}: {e})') from None
  if not isinstance(obj, dict):
    raise SampleError(f'{path}: the annotation is a {type(obj).__name__}, expected a dict')
  return obj


def _load_zip(path: Path, f) -> Any:
  with zipfile.ZipFile(f) as zf:
    members = zf.infolist()
    if len(members) != 1:
      raise SampleError(f'{path}: a zipped annotation holds exactly one pickle; this archive has '
                        f'{len(members)} members')
    info = members[0]
    # The declared size bounds what ZipExtFile will ever produce, so checking it suffices.
    if info.file_size > MAX_PICKLE_BYTES:
      raise SampleError(f'{path}: member {info.filename!r} unpacks to {info.file_size} bytes '
                        f'(limit {MAX_PICKLE_BYTES}); refusing a possible zip bomb')
    with zf.open(info) as member:
      return _SafeUnpickler(member).load()


def _inflate(path: Path, data: bytes) -> bytes:
  d = zlib.decompressobj()
  out = d.decompress(data, MAX_PICKLE_BYTES + 1)
  if len(out) > MAX_PICKLE_BYTES:
    raise SampleError(f'{path}: the zlib stream unpacks to more than {MAX_PICKLE_BYTES} bytes; '
                      f'refusing a possible zip bomb')
  if not d.eof:
    raise SampleError(f'{path}: truncated zlib stream')
  return out


# --- pairing annotations with photos ------------------------------------------------------

def _stem(name: str, suffixes: tuple[str, ...]) -> str | None:
  lower = name.lower()
  for suffix in suffixes:
    if lower.endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return None


def _key(stem: str) -> str:
  # Numeric names match whatever their zero padding (COCO pads ids to 12 digits).
  return str(int(stem)) if stem.isdigit() else stem


def _files(root: Path, suffixes: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
  """(stem, path) of the files under `root` with one of `suffixes`, in sorted order."""
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
      stem = _stem(name, suffixes)
      if stem is not None:
        yield stem, Path(folder) / name


def rows(annotations, images=None, *, pairs_csv=None) -> Iterator[dict]:
  """One `{'id', 'annotation', 'image'}` per sample, without reading any annotation.

  Either `annotations` is a folder of annotation files and `images` a folder of photos (default:
  the annotations folder), both searched recursively and paired by file stem (`000000123.p.zip`
  with `000000123.jpg|.jpeg|.png|.webp`; the first in sorted order if a stem repeats), or
  `pairs_csv` is a CSV with columns `image` and `annotation` (paths absolute or relative to the
  CSV's folder) and `annotations` is None. A photo that is not found gives `'image': None` or a
  missing path, which `to_sample` reports.
  """
  if pairs_csv is not None:
    if annotations is not None or images is not None:
      raise ValueError('rows(): give either annotation and image folders or pairs_csv, not both')
    return iter(_csv_rows(Path(pairs_csv)))
  if annotations is None:
    raise ValueError('rows(): give an annotations folder or pairs_csv')
  annotations = Path(annotations)
  images = annotations if images is None else Path(images)
  for folder in (annotations, images):
    if not folder.is_dir():
      raise NotADirectoryError(f'{folder}: not a directory')
  photos: dict[str, Path] = {}
  for stem, path in _files(images, IMAGE_SUFFIXES):
    photos.setdefault(_key(stem), path)
  return ({'id': f'mulan-{stem}', 'annotation': path, 'image': photos.get(_key(stem))}
          for stem, path in _files(annotations, ANNOTATION_SUFFIXES))


def _csv_rows(pairs_csv: Path) -> list[dict]:
  base = pairs_csv.parent
  with open(pairs_csv, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    for column in ('image', 'annotation'):
      if column not in (reader.fieldnames or ()):
        raise ValueError(f'{pairs_csv}: no {column!r} column (columns: {reader.fieldnames})')
    out = []
    for record in reader:
      ann, image = (record[c].strip() if record[c] else '' for c in ('annotation', 'image'))
      if not ann:
        raise ValueError(f'{pairs_csv}: line {reader.line_num}: empty annotation path')
      ann_path = base / ann   # an absolute path replaces `base`
      stem = _stem(ann_path.name, ANNOTATION_SUFFIXES) or ann_path.stem
      out.append({'id': f'mulan-{stem}', 'annotation': ann_path,
                  'image': base / image if image else None})
  return out


# --- decoding -----------------------------------------------------------------------------

def to_sample(row: dict) -> LayeredSample:
  """The sample for one `rows()` record. Raises `SampleError` naming the sample and the field."""
  sid, ann_path, image_path = row['id'], Path(row['annotation']), row['image']
  if image_path is None:
    wanted = f'{sid.removeprefix("mulan-")}.({"|".join(s[1:] for s in IMAGE_SUFFIXES)})'
    raise SampleError(f'sample {sid!r}: no base image {wanted} found for annotation {ann_path}')
  if not Path(image_path).is_file():
    raise SampleError(f'sample {sid!r}: base image {image_path} of annotation {ann_path} is '
                      f'missing')
  photo = _read_photo(Path(image_path), sid)
  try:
    ann = load_annotation(ann_path)
  except SampleError as e:
    raise SampleError(f'sample {sid!r}: {e}') from None
  hw = photo.shape[:2]

  bg = _section(ann, 'background', sid)
  background = np.concatenate(
      [_rgb8(photo, bg, 'background', sid, hw), np.full((*hw, 1), 255, np.float32)], -1)
  layers = [Layer('background', 'background', background / 255,
                  caption=_caption(bg, 'background', sid))]
  dropped = []
  for k, (field, inst) in enumerate(_instances(ann, sid)):
    alpha = np.rint(_unit(_array(_get(inst, 'instance_alpha', field, sid), sid,
                                 f'{field}.instance_alpha', hw, (1,)),
                           sid, f'{field}.instance_alpha') * 255)
    rgb = _rgb8(photo, inst, field, sid, hw)
    if not alpha.any():
      dropped.append(k)
      continue
    layers.append(Layer(f'object_{len(layers)}', 'object',
                        np.concatenate([rgb, alpha], -1) / 255,
                        caption=_text(inst.get('blip2'), sid, f'{field}.blip2')))

  image = ann.get('image')
  provenance = {'source': 'mulan', 'annotation': str(ann_path), 'image': str(image_path),
                'image_caption': '' if image is None else _caption(image, 'image', sid),
                'dropped_instances': dropped}
  sample = assemble(sid, layers, provenance)
  diff = np.abs(sample.image - photo / 255)
  sample.provenance['photo_abs_diff'] = {'max': round(float(diff.max()), 6),
                                         'mean': round(float(diff.mean()), 6)}
  return sample


def _read_photo(path: Path, sid: str) -> np.ndarray:
  """The photo as float32 [H, W, 3] in 0..255, on its stored pixel grid (no EXIF rotation:
  the annotations index the pixels as stored, as COCO's do). MuLAn annotated opaque photos:
  one with transparency is refused rather than guessed."""
  try:
    return load_image(path, orient=False) * 255
  except ImageError as e:
    raise SampleError(f'sample {sid!r}: base image {e}') from None


def _get(d: Any, key: str, field: str, sid: str) -> Any:
  if not isinstance(d, dict):
    raise SampleError(f'sample {sid!r}: {field} is a {type(d).__name__}, expected a dict')
  if key not in d:
    raise SampleError(f'sample {sid!r}: {field}.{key} is missing')
  return d[key]


def _section(ann: dict, key: str, sid: str) -> dict:
  section = _get(ann, key, 'annotation', sid)
  if not isinstance(section, dict):
    raise SampleError(f'sample {sid!r}: {key} is a {type(section).__name__}, expected a dict')
  return section


def _text(x: Any, sid: str, field: str) -> str:
  if x is None:
    return ''
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, bytes):
    x = x.decode('utf-8', 'replace')
  if not isinstance(x, str):
    raise SampleError(f'sample {sid!r}: {field} is a {type(x).__name__}, expected text')
  return x.strip()


def _caption(section: dict, field: str, sid: str) -> str:
  """The short BLIP-2 caption, else the detailed LLaVA one."""
  if not isinstance(section, dict):
    raise SampleError(f'sample {sid!r}: {field} is a {type(section).__name__}, expected a dict')
  return (_text(section.get('blip2'), sid, f'{field}.blip2')
          or _text(section.get('llava'), sid, f'{field}.llava'))


_INSTANCE_ARRAYS = ('original_image_mask', 'inpainted_delta', 'instance_alpha')


def _count(x: Any, sid: str, field: str) -> int:
  if (isinstance(x, (str, bytes, dict)) or not hasattr(x, '__len__')
      or isinstance(x, np.ndarray) and x.ndim == 0):
    raise SampleError(f'sample {sid!r}: {field} is a {type(x).__name__}, expected one entry '
                      f'per instance')
  return len(x)


def _instances(ann: dict, sid: str) -> list[tuple[str, dict]]:
  """(field name, per-instance dict) back to front, from either container form: a list of
  per-instance dicts, or a dict of stacked arrays (first axis = instance) and a caption list."""
  inst = _get(ann, 'instances', 'annotation', sid)
  if isinstance(inst, (list, tuple)):
    for k, entry in enumerate(inst):
      if not isinstance(entry, dict):
        raise SampleError(f'sample {sid!r}: instances[{k}] is a {type(entry).__name__}, '
                          f'expected a dict')
    return [(f'instances[{k}]', entry) for k, entry in enumerate(inst)]
  if not isinstance(inst, dict):
    raise SampleError(f'sample {sid!r}: instances is a {type(inst).__name__}, expected a dict '
                      f'of stacked arrays or a list of dicts')
  stacks = {key: _get(inst, key, 'instances', sid) for key in _INSTANCE_ARRAYS}
  if inst.get('blip2') is not None:
    stacks['blip2'] = inst['blip2']
  counts = {key: _count(value, sid, f'instances.{key}') for key, value in stacks.items()}
  if len(set(counts.values())) > 1:
    raise SampleError(f'sample {sid!r}: instances has differing instance counts {counts}')
  n = counts['instance_alpha']
  return [(f'instances[{k}]', {key: value[k] for key, value in stacks.items()}) for k in range(n)]


def _array(x: Any, sid: str, field: str, hw: tuple[int, int],
           channels: tuple[int, ...]) -> np.ndarray:
  """`x` as float32 [H, W, C], C in `channels`; an [H, W] array gets C = 1."""
  a = np.asarray(x)
  if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number)):
    raise SampleError(f'sample {sid!r}: {field} is not a numeric array (dtype {a.dtype})')
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[:2] != hw or a.shape[2] not in channels:
    wanted = [hw] * (1 in channels) + [(*hw, c) for c in channels]
    raise SampleError(f'sample {sid!r}: {field} has shape {np.shape(x)}, expected '
                      f'{" or ".join(map(str, wanted))} to match the base image')
  a = a.astype(np.float32)
  if not np.isfinite(a).all():
    raise SampleError(f'sample {sid!r}: {field} has non-finite values')
  return a


def _unit(a: np.ndarray, sid: str, field: str) -> np.ndarray:
  """A mask or alpha in [0, 1]: bool and 0..1 arrays as they are, 0..255 ones divided by 255
  (so a uint8 plane whose maximum is 1 reads as {0, 1})."""
  if a.max(initial=0) > 1:
    a = a / 255
  if a.min(initial=0) < 0 or a.max(initial=0) > 1:
    raise SampleError(f'sample {sid!r}: {field} has values outside 0..1 and 0..255')
  return a


def _rgb8(photo: np.ndarray, section: dict, field: str, sid: str,
          hw: tuple[int, int]) -> np.ndarray:
  """photo * original_image_mask + inpainted_delta, in 8-bit units, rounded and clipped."""
  mask = _unit(_array(_get(section, 'original_image_mask', field, sid), sid,
                      f'{field}.original_image_mask', hw, (1, 3)),
               sid, f'{field}.original_image_mask')
  delta = _array(_get(section, 'inpainted_delta', field, sid), sid, f'{field}.inpainted_delta',
                 hw, (3,))
  return np.clip(np.rint(photo * mask + delta), 0, 255)
