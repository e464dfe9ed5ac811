"""layerjax.data.images: the one image loader, mode by mode.

The catalogue: every pixel mode, EXIF orientation, embedded ICC profiles, alpha, resizing and
the bad files, each against values written into the file by hand (our own PNG and TIFF
writers below) or a closed-form conversion; then the engine's load stage on the photos it
used to drop as blurry.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms, JpegImagePlugin

from data_engine import config as engine_config
from data_engine import stages, synthesis
from data_engine.core import Drop
from layerjax.data.images import (ImageError, check_image, load_image, scale_to_cover,
                                  scale_to_fit)


# --- files written by hand ----------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _png(samples, colour_type: int, bits: int, chunks=(), size=None) -> bytes:
  """A PNG holding `samples` [H, W(, C)] as stored (filter 0): PNG's own colour types."""
  samples = np.asarray(samples)
  h, w = size or samples.shape[:2]
  rows = samples.astype('>u2' if bits == 16 else 'u1').reshape(samples.shape[0], -1)
  raw = b''.join(b'\0' + row.tobytes() for row in rows)
  ihdr = struct.pack('>IIBBBBB', w, h, bits, colour_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + b''.join(_chunk(*c) for c in chunks)
          + _chunk(b'IDAT', zlib.compress(raw)) + _chunk(b'IEND', b''))


def _iccp(profile: bytes) -> tuple[bytes, bytes]:
  return b'iCCP', b'test\0\0' + zlib.compress(profile)


def _tiff(samples: np.ndarray, sample_format: int, extra=()) -> bytes:
  """An uncompressed one-strip little-endian grey TIFF of `samples` [H, W]; SampleFormat 1
  unsigned, 2 signed, 3 float; `extra`: more (tag, SHORT value) entries."""
  h, w = samples.shape
  data = samples.astype(samples.dtype.newbyteorder('<')).tobytes()
  short = {256: w, 257: h, 258: samples.dtype.itemsize * 8, 259: 1, 262: 1, 277: 1, 278: h,
           339: sample_format, **dict(extra)}
  entries = {t: struct.pack('<HHIHH', t, 3, 1, v, 0) for t, v in short.items()}
  entries[273] = struct.pack('<HHII', 273, 4, 1, 8)  # StripOffsets: right after the header
  entries[279] = struct.pack('<HHII', 279, 4, 1, len(data))
  ifd = struct.pack('<H', len(entries)) + b''.join(entries[t] for t in sorted(entries))
  return b'II*\0' + struct.pack('<I', 8 + len(data)) + data + ifd + b'\0\0\0\0'


def _save(im: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
  out = io.BytesIO()
  im.save(out, fmt, **kw)
  return out.getvalue()


def _write(tmp_path, name: str, data: bytes):
  path = tmp_path / name
  path.write_bytes(data)
  return path


def _grey(values) -> np.ndarray:
  """Grey values -> the [..., 3] RGB the loader returns for them."""
  return np.repeat(np.asarray(values, np.float64)[..., None], 3, -1)


# --- pixel modes --------------------------------------------------------------------------

def test_rgb_8_bit_png():
  rgb = np.array([[[0, 128, 255], [10, 20, 30]]])
  np.testing.assert_allclose(load_image(_png(rgb, 2, 8)), rgb / 255, atol=1e-7)


def test_rgb_16_bit_png_keeps_all_16_bits():
  # 300 and 65280 differ from their 8-bit truncations; 65535 is white, not clipped beyond.
  rgb = np.array([[[1000, 30000, 65535], [257, 0, 12345]], [[300, 65280, 1], [2, 3, 4]]])
  image = load_image(_png(rgb, 2, 16))
  assert image.dtype == np.float32 and image.shape == (2, 2, 3)
  np.testing.assert_allclose(image, rgb / 65535, atol=1e-7)


def test_rgba_16_bit_png_composites_in_16_bits():
  rgba = np.array([[[65535, 300, 0, 65535], [0, 0, 65535, 16384]]])
  image = load_image(_png(rgba, 6, 16), alpha='composite', background=(0.5, 0.5, 0.5))
  a = 16384 / 65535
  blue_over_grey = [0.5 * (1 - a), 0.5 * (1 - a), a + 0.5 * (1 - a)]
  np.testing.assert_allclose(image, [[[1, 300 / 65535, 0], blue_over_grey]], atol=1e-6)


def test_grey_16_bit_png():  # Pillow mode 'I;16'
  grey = np.array([[0, 1000, 32768, 65535]])
  np.testing.assert_allclose(load_image(_png(grey, 0, 16)), _grey(grey / 65535), atol=1e-7)


def test_grey_16_bit_pgm():  # Pillow mode 'I' (rescaled from maxval by Pillow)
  data = b'P5 3 1 4095\n' + np.array([0, 1365, 4095], '>u2').tobytes()
  np.testing.assert_allclose(load_image(data), _grey([[0, 1365 / 4095, 1]]), atol=2e-5)


def test_grey_8_bit():  # 'L'
  grey = np.array([[0, 7, 128, 255]], np.uint8)
  np.testing.assert_allclose(load_image(_save(Image.fromarray(grey))), _grey(grey / 255),
                             atol=1e-7)


def test_grey_with_alpha():  # 'LA'
  la = np.array([[[100, 255], [100, 51]]], np.uint8)
  image = load_image(_save(Image.fromarray(la, 'LA')), alpha='composite',
                     background=(0.0, 0.5, 1.0))
  a = 51 / 255
  np.testing.assert_allclose(image[0, 0], [100 / 255] * 3, atol=1e-7)
  np.testing.assert_allclose(image[0, 1], [100 / 255 * a + bg * (1 - a) for bg in (0, .5, 1)],
                             atol=1e-6)


def test_one_bit():  # '1'
  bits = np.array([[True, False, True]])
  im = Image.fromarray(bits)
  assert im.mode == '1'
  np.testing.assert_array_equal(load_image(_save(im)), _grey([[1, 0, 1]]))


def test_palette_without_and_with_a_transparency_entry():  # 'P'
  im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), 'P')
  im.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 759)
  expected = np.array([[[1, 0, 0], [0, 1, 0], [10 / 255, 20 / 255, 30 / 255]]])
  np.testing.assert_allclose(load_image(_save(im)), expected, atol=1e-7)

  keyed = _save(im, transparency=1)  # palette entry 1 is see-through
  with pytest.raises(ImageError, match='transparent'):
    load_image(keyed)
  expected[0, 1] = (0.2, 0.2, 0.2)
  np.testing.assert_allclose(load_image(keyed, alpha='composite', background=(.2, .2, .2)),
                             expected, atol=1e-7)
  # PNG palettes may give each entry its own alpha: 255, 128, 0 here.
  alphas = _save(im, transparency=b'\xff\x80\x00')
  np.testing.assert_allclose(load_image(alphas, alpha='keep'),
                             [[[1, 0, 0, 1], [0, 1, 0, 128 / 255], [0, 0, 0, 0]]], atol=1e-7)


def test_rgb_transparency_key():  # PNG tRNS on a colour image
  rgb = np.array([[[1, 2, 3], [1, 2, 4]]])
  data = _png(rgb, 2, 8, [(b'tRNS', struct.pack('>HHH', 1, 2, 3))])
  np.testing.assert_allclose(load_image(data, alpha='keep'),
                             [[[0, 0, 0, 0], [1 / 255, 2 / 255, 4 / 255, 1]]], atol=1e-7)


def test_cmyk_jpeg():
  # Pillow writes CMYK JPEGs Adobe's way (inverted samples, an APP14 'Adobe' marker); read
  # back, each ink must convert as R = (1 - C)(1 - K), G = (1 - M)(1 - K), B = (1 - Y)(1 - K).
  inks = np.array([(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 255, 0), (0, 0, 0, 128),
                   (64, 32, 16, 100)])
  blocks = np.repeat(np.repeat(inks[None].astype(np.uint8), 16, 0), 16, 1)  # 16x16 each
  data = _save(Image.fromarray(blocks, 'CMYK'), 'JPEG', quality=100)
  assert b'Adobe' in data[:200]
  cmyk = inks / 255
  expected = (1 - cmyk[:, :3]) * (1 - cmyk[:, 3:])
  np.testing.assert_allclose(load_image(data)[8, 8::16], expected, atol=2 / 255)


def test_float_tiff():  # 'F': values as stored
  values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
  np.testing.assert_array_equal(load_image(_tiff(values, 3)), _grey(values))


@pytest.mark.parametrize('values, problem', [
    ([[0.0, 1.5]], r'float samples span \[0, 1\.5\], outside \[0, 1\]'),
    ([[-0.25, 0.5]], r'float samples span \[-0\.25, 0\.5\], outside \[0, 1\]'),
    ([[0.0, np.nan]], 'float samples that are NaN or infinite'),
    ([[np.inf, 0.0]], 'float samples that are NaN or infinite')])
def test_float_tiff_outside_0_1_is_refused_never_black(values, problem):
  with pytest.raises(ImageError, match=rf'^pic\.tif: {problem}'):
    load_image(_tiff(np.array(values, np.float32), 3), name='pic.tif')


@pytest.mark.parametrize('dtype, sample_format, values, full', [
    (np.int32, 2, [0, 2 ** 30, 2 ** 31 - 1], 2 ** 31 - 1),
    (np.uint32, 1, [0, 3_000_000_000, 2 ** 32 - 1], 2 ** 32 - 1),  # Pillow wraps these
    (np.int16, 2, [0, 16384, 32767], 32767)])
def test_integer_tiff_by_its_bit_depth(dtype, sample_format, values, full):  # 'I'
  data = _tiff(np.array([values], dtype), sample_format)
  assert Image.open(io.BytesIO(data)).mode == 'I'
  np.testing.assert_allclose(load_image(data), _grey(np.array([values]) / full), atol=1e-7)


def test_negative_integer_samples_are_refused():
  with pytest.raises(ImageError, match=r'^x: negative samples \(min -5\)'):
    load_image(_tiff(np.array([[0, -5, 7]], np.int32), 2), name='x')


def test_lab_tiff():
  # L* = 128/255 * 100 with a = b = 0: Y = ((L* + 16) / 116)^3, then the sRGB curve (neutral
  # grey, so the white point does not enter).
  y = ((128 / 255 * 100 + 16) / 116) ** 3
  expected = 1.055 * y ** (1 / 2.4) - 0.055
  data = _save(Image.new('LAB', (2, 2), (128, 128, 128)), 'TIFF')
  np.testing.assert_allclose(load_image(data), np.full((2, 2, 3), expected), atol=1 / 255)


# --- EXIF orientation ---------------------------------------------------------------------

UPRIGHT = [[0, 1, 2], [3, 4, 5]]
# The stored pixels of UPRIGHT under each EXIF orientation, by the tag's definition (where
# the stored row 0 and column 0 are seen): 2 top/right, 3 bottom/right, 4 bottom/left,
# 5 left/top, 6 right/top, 7 right/bottom, 8 left/bottom.
STORED = {
    1: UPRIGHT,
    2: [[2, 1, 0], [5, 4, 3]],
    3: [[5, 4, 3], [2, 1, 0]],
    4: [[3, 4, 5], [0, 1, 2]],
    5: [[0, 3], [1, 4], [2, 5]],
    6: [[2, 5], [1, 4], [0, 3]],
    7: [[5, 2], [4, 1], [3, 0]],
    8: [[3, 0], [4, 1], [5, 2]],
}


@pytest.mark.parametrize('orientation', sorted(STORED))
@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'TIFF'])
def test_exif_orientation(orientation, fmt):
  stored = np.array(STORED[orientation], np.uint8) * 40
  if fmt == 'JPEG':  # lossy: 8x8 flat blocks keep the values
    stored = np.repeat(np.repeat(stored, 8, 0), 8, 1)
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _save(Image.fromarray(stored), fmt, exif=exif, **({'quality': 100} if fmt == 'JPEG'
                                                          else {}))
  image = load_image(data)[::8, ::8] if fmt == 'JPEG' else load_image(data)
  np.testing.assert_allclose(image, _grey(np.array(UPRIGHT) * 40 / 255), atol=1.5 / 255)
  raw = load_image(data, orient=False)
  raw = raw[::8, ::8] if fmt == 'JPEG' else raw
  np.testing.assert_allclose(raw, _grey(stored[::8, ::8] if fmt == 'JPEG' else stored) / 255,
                             atol=1.5 / 255)


# --- embedded ICC profiles ----------------------------------------------------------------

D50 = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367],
                     [0.0389, -0.0685, 1.0296]])
GAMMA = 563 / 256  # 2.2 as an ICC u8Fixed8 'curv' stores it


def _rgb_to_xyz(primaries, white) -> np.ndarray:
  """The RGB -> XYZ matrix of primaries and white point given as CIE xy (white Y = 1)."""
  xyz = lambda x, y: np.array([x / y, 1.0, (1 - x - y) / y])
  columns = np.stack([xyz(*p) for p in primaries], 1)
  return columns * np.linalg.solve(columns, xyz(*white))


D65_XY = (0.3127, 0.3290)
ADOBE = _rgb_to_xyz([(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)], D65_XY)
SRGB = _rgb_to_xyz([(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)], D65_XY)


def _adobe_like_profile() -> bytes:
  """An ICC v2 RGB display profile: Adobe RGB (1998) primaries, gamma 563/256, colorants
  adapted to the D50 connection space (Bradford), as real matrix/TRC profiles are."""
  d65 = ADOBE @ np.ones(3)
  cone = BRADFORD @ D50 / (BRADFORD @ d65)
  colorants = np.linalg.inv(BRADFORD) @ np.diag(cone) @ BRADFORD @ ADOBE
  s15 = lambda v: struct.pack('>i', round(v * 65536))
  xyz = lambda v: b'XYZ \0\0\0\0' + b''.join(s15(c) for c in v)
  curve = b'curv\0\0\0\0' + struct.pack('>IH', 1, round(GAMMA * 256)) + b'\0\0'
  text = b'adobe-like test profile\0'
  desc = b'desc\0\0\0\0' + struct.pack('>I', len(text)) + text + b'\0' * 78
  tags = [(b'desc', desc), (b'wtpt', xyz(D50)), (b'rXYZ', xyz(colorants[:, 0])),
          (b'gXYZ', xyz(colorants[:, 1])), (b'bXYZ', xyz(colorants[:, 2])),
          (b'rTRC', curve), (b'gTRC', curve), (b'bTRC', curve)]
  offset, table, body = 132 + 12 * len(tags), struct.pack('>I', len(tags)), b''
  for sig, data in tags:
    data += b'\0' * (-len(data) % 4)
    table += sig + struct.pack('>II', offset + len(body), len(data))
    body += data
  header = (struct.pack('>I', offset + len(body)) + b'\0' * 4 + struct.pack('>I', 0x02100000)
            + b'mntrRGB XYZ ' + b'\0' * 12 + b'acsp' + b'\0' * 28
            + b''.join(s15(c) for c in D50) + b'\0' * 48)
  return header + table + body


def _adobe_to_srgb(rgb) -> np.ndarray:
  """Closed form: decode gamma, Adobe RGB -> XYZ -> linear sRGB (both D65), sRGB curve."""
  linear = np.linalg.solve(SRGB, ADOBE @ (np.asarray(rgb, np.float64) ** GAMMA))
  assert np.all((linear >= 0) & (linear <= 1)), 'pick colours inside the sRGB gamut'
  return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


COLOURS = np.array([[200, 120, 80], [100, 150, 200], [220, 200, 60], [128, 128, 128]])


def test_embedded_profile_is_converted_to_srgb():
  data = _png(COLOURS[None], 2, 8, [_iccp(_adobe_like_profile())])
  expected = np.stack([_adobe_to_srgb(c / 255) for c in COLOURS])[None]
  assert np.abs(expected - COLOURS / 255).max() > 10 / 255  # the profile matters
  np.testing.assert_allclose(load_image(data), expected, atol=1.5 / 255)
  # A deep image with that profile: converted at 8-bit precision.
  deep = _png(COLOURS[None] * 257, 2, 16, [_iccp(_adobe_like_profile())])
  np.testing.assert_allclose(load_image(deep), expected, atol=1.5 / 255)


def test_an_srgb_profile_is_skipped_so_16_bits_survive():
  srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()
  rgb = np.array([[[1000, 30000, 65535], [300, 65280, 1]]])
  np.testing.assert_allclose(load_image(_png(rgb, 2, 16, [_iccp(srgb)])), rgb / 65535,
                             atol=1e-7)


def test_a_profile_for_another_colour_space_is_refused():
  lab = ImageCms.ImageCmsProfile(ImageCms.createProfile('LAB')).tobytes()
  with pytest.raises(ImageError, match=r'^x: its colour profile is for LAB samples, but the '
                                       r'pixels are RGB'):
    load_image(_png(COLOURS[None], 2, 8, [_iccp(lab)]), name='x')


# --- alpha --------------------------------------------------------------------------------

# Opaque red; blue at alpha 128/255; green hidden under alpha 0.
RGBA = np.array([[[255, 0, 0, 255], [0, 0, 255, 128], [0, 255, 0, 0]]], np.uint8)


def test_alpha_composite_over_the_stated_background():
  a = 128 / 255
  bg = np.array([0.2, 0.4, 0.6])
  image = load_image(_save(Image.fromarray(RGBA)), alpha='composite', background=tuple(bg))
  np.testing.assert_allclose(image, [[[1, 0, 0], np.array([0, 0, 1]) * a + bg * (1 - a), bg]],
                             atol=1e-6)


def test_alpha_keep_is_straight_rgba_without_the_hidden_colour():
  image = load_image(_save(Image.fromarray(RGBA)), alpha='keep')
  np.testing.assert_allclose(image, [[[1, 0, 0, 1], [0, 0, 1, 128 / 255], [0, 0, 0, 0]]],
                             atol=1e-7)


def test_alpha_refuse_names_the_file(tmp_path):
  path = _write(tmp_path, 'cut.png', _save(Image.fromarray(RGBA)))
  with pytest.raises(ImageError, match=rf'^{path}: transparent \(66\.67% of its pixels\)'):
    load_image(path)


def test_an_opaque_alpha_channel_just_drops():
  opaque = RGBA.copy()
  opaque[..., 3] = 255
  image = load_image(_save(Image.fromarray(opaque)))  # 'refuse' has nothing to refuse
  np.testing.assert_allclose(image, opaque[..., :3] / 255, atol=1e-7)
  assert load_image(_save(Image.fromarray(opaque)), alpha='keep')[..., 3].min() == 1


# --- resizing -----------------------------------------------------------------------------

def test_scale_to_fit_shrinks_the_longer_side_and_never_enlarges():
  image = np.full((50, 100, 3), 0.25, np.float32)
  small = scale_to_fit(image, 40)
  assert small.shape == (20, 40, 3)
  np.testing.assert_allclose(small, 0.25, atol=1e-6)
  assert scale_to_fit(image, 400) is image


def test_cover_scales_and_centre_crops():
  # Left half black, right half white; covering a square keeps the middle columns.
  image = np.zeros((40, 80, 3), np.float32)
  image[:, 40:] = 1
  out = scale_to_cover(image, (20, 20))
  assert out.shape == (20, 20, 3)
  np.testing.assert_allclose(out[:, :6], 0, atol=1e-6)  # Lanczos reaches 3 pixels
  np.testing.assert_allclose(out[:, 14:], 1, atol=1e-6)


def test_load_with_cover_decodes_a_jpeg_at_a_reduced_scale(monkeypatch):
  decoded = []
  draft = JpegImagePlugin.JpegImageFile.draft

  def spy(self, mode, size):
    result = draft(self, mode, size)
    decoded.append(self.size)
    return result

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', spy)
  photo = skimage.data.astronaut()  # 512 x 512
  data = _save(Image.fromarray(photo), 'JPEG', quality=95)
  small = load_image(data, cover=(60, 90))
  assert small.shape == (60, 90, 3)
  assert decoded == [(128, 128)]  # a quarter of 512 still covers 90
  full = scale_to_cover(photo / 255, (60, 90))
  assert np.abs(small - full).mean() < 0.02


# --- files that are not images ------------------------------------------------------------

def _good_png() -> bytes:
  return _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3),
                                                                 dtype=np.uint8)))


def _corrupt_png() -> bytes:
  data = bytearray(_good_png())
  data[60:70] = b'\xff' * 10  # inside IDAT: its checksum no longer holds
  return bytes(data)


def _truncated_jpeg() -> bytes:
  return _save(Image.fromarray(skimage.data.astronaut()), 'JPEG')[:5000]


BAD_FILES = {
    'text.png': (lambda: b'hello, world', 'cannot identify image file'),
    'empty.jpg': (lambda: b'', 'cannot identify image file'),
    'truncated.png': (lambda: _good_png()[:400], 'truncated|broken|EOF'),
    'truncated.jpg': (_truncated_jpeg, 'truncated'),
    'corrupt.png': (_corrupt_png, 'broken|CRC|crc|decompress'),
    'bomb.png': (lambda: _png(np.zeros((1, 3)), 2, 8, size=(20000, 20000)), 'decompression bomb'),
}


@pytest.mark.parametrize('name', sorted(BAD_FILES))
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name):
  make, problem = BAD_FILES[name]
  path = _write(tmp_path, name, make())
  with pytest.raises(ImageError) as e:
    load_image(path)
  assert str(e.value).startswith(f'{path}: not a readable image (')
  assert '\n' not in str(e.value)
  assert e.match(problem)


def test_missing_file(tmp_path):
  with pytest.raises(ImageError, match=rf'^{tmp_path / "no.png"}: no such file$'):
    load_image(tmp_path / 'no.png')


def test_check_image_reads_headers_and_checksums_only(tmp_path):
  check_image(_write(tmp_path, 'good.png', _good_png()))
  for name in ('text.png', 'corrupt.png'):
    path = _write(tmp_path, name, BAD_FILES[name][0]())
    with pytest.raises(ImageError, match=rf'^{path}: not a readable image'):
      check_image(path)


@pytest.mark.parametrize('kwargs, message', [
    ({'alpha': 'maybe'}, 'alpha must be one of'),
    ({'background': (2, 0, 0)}, r'background must be \(r, g, b\) in \[0, 1\]'),
    ({'background': 'white'}, 'background must be'),
    ({'cover': (0, 10)}, 'cover must be'),
    ({'cover': (10, 10), 'alpha': 'keep'}, 'cover resizes an opaque image')])
def test_bad_arguments_are_refused_before_reading(kwargs, message):
  with pytest.raises(ValueError, match=message):
    load_image(b'not even read', **kwargs)


# --- the engine ---------------------------------------------------------------------------

def _engine(*overrides) -> stages.Context:
  return stages.Context(engine_config.load(None, list(overrides)))


def test_engine_loads_and_prefilters_16_bit_grey_and_float_photos(tmp_path):
  # Both used to come out clipped white / black and be dropped as blurry.
  camera = skimage.data.camera()  # 512 x 512 grey, the engine's default max_side
  photos = {'camera16.png': _png(camera.astype(np.uint16) * 257, 0, 16),
            'camera.tif': _tiff((camera / 255).astype(np.float32), 3)}
  ctx = _engine()
  for name, data in photos.items():
    item = stages.Photo(name, name, str(_write(tmp_path, name, data)))
    stages.load(item, ctx)
    np.testing.assert_allclose(item.image, _grey(camera / 255), atol=1e-6)
    quality = stages.prefilter(item, ctx)  # raises Drop('blurry') on a blank image
    assert quality['sharpness'] >= ctx.config.decompose.min_sharpness


def test_engine_composites_or_refuses_a_transparent_photo_by_config(tmp_path):
  rgba = np.zeros((120, 120, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[30:90, 30:90, 3] = 255  # a red square on a see-through canvas of hidden red
  path = _write(tmp_path, 'cut.png', _save(Image.fromarray(rgba)))
  item = stages.Photo('cut', 'cut.png', str(path))
  stages.load(item, _engine("decompose.composite_over=(0.0, 0.0, 1.0)"))
  np.testing.assert_allclose(item.image[0, 0], [0, 0, 1])
  np.testing.assert_allclose(item.image[60, 60], [200 / 255, 0, 0], atol=1e-6)
  with pytest.raises(Drop) as e:
    stages.load(item, _engine("decompose.transparent='refuse'"))
  assert e.value.reason == 'unreadable' and str(path) in e.value.detail


def test_synthesis_bank_keeps_16_bit_cutouts_and_refuses_transparent_backgrounds(tmp_path):
  root = tmp_path / 'bank'
  (root / 'objects').mkdir(parents=True)
  (root / 'backgrounds').mkdir()
  cutout = np.zeros((8, 8, 4))
  cutout[2:6, 2:6] = (65535, 300, 0, 32768)
  _write(root / 'objects', 'thing.png', _png(cutout, 6, 16))
  background = np.full((8, 8, 4), 255, np.uint8)
  background[0, 0, 3] = 0
  path = _write(root / 'backgrounds', 'holed.png', _save(Image.fromarray(background)))
  bank = synthesis.load_bank(root)
  (thing,) = bank.objects
  np.testing.assert_allclose(thing.rgba, np.broadcast_to([1, 300 / 65535, 0, 32768 / 65535],
                                                         (4, 4, 4)), atol=1e-7)
  with pytest.raises(ImageError, match=rf'^{path}: transparent'):
    bank.background(0, (8, 8))
