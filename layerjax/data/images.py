"""The one image loader: any photo or cut-out file -> float32 sRGB in [0, 1], decoded honestly.

`load_image(source, alpha=..., background=...)` reads a path or bytes and returns [H, W, 3]
(or [H, W, 4] straight RGBA with `alpha='keep'`). Every reader of photos and cut-outs (the
engine's load stage, its synthesis bank and prompt refinement, the MuLAn and Crello
importers, the decompose path) goes through it, so a file means the same pixels everywhere:

  samples    8-bit modes / 255; 16-bit ('I;16', 16-bit RGB/RGBA PNG) / 65535; 1-bit 0 or 1;
             palette through its palette (and its transparency entry); 32-bit integer TIFF
             by its stored bit depth (unsigned / (2^b - 1), signed / (2^(b-1) - 1), negative
             values refused); float ('F') as stored, refused when not finite or outside
             [0, 1] (HDR or unnormalised data has no one honest mapping to a photo: tone-map
             or rescale it first). Pillow keeps only the high byte of 16-bit grey+alpha PNGs
             and 16-bit colour TIFFs: those come out at 8-bit precision.
  colour     an embedded ICC profile is converted to sRGB with its own rendering intent, at
             8-bit precision (Pillow's colour engine); a profile that maps colours to
             themselves (an sRGB profile) is skipped, so deep images keep their precision.
             CMYK without a profile: R = (1 - C)(1 - K), ...; Lab through the CIE Lab profile.
             Grey comes out as three equal channels.
  EXIF       the orientation tag (all 8 values) is applied, unless `orient=False`.
  alpha      'refuse': an image with any transparency raises; 'composite': straight alpha
             over `background`, rgb * a + background * (1 - a); 'keep': RGBA, with the colour
             under alpha 0 set to 0 (it is undefined). A fully opaque alpha channel is
             dropped, as is a transparency key no pixel uses.
  errors     anything that cannot be decoded so (not an image, truncated, corrupt, a
             decompression bomb past Pillow's MAX_IMAGE_PIXELS * 2, an unsupported mode) raises
             `ImageError`: one line, the file first, then the problem.

`scale_to_fit` and `scale_to_cover` resize a result (Lanczos, in float); `load_image(...,
cover=size)` also lets a JPEG decode at a reduced scale that still covers `size` (several
times faster on large photos).
"""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

ALPHA = ('refuse', 'composite', 'keep')
_BYTES = (bytes, bytearray, memoryview)
_ORIENTATION = 0x0112
# Float samples this far outside [0, 1] are rounding of a [0, 1] image, and are clipped.
_FLOAT_SLACK = 1e-6
# What a damaged or hostile file makes Pillow (and its zlib, struct, lcms) raise.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError, ImageCms.PyCMSError)


class ImageError(ValueError):
  """An image that cannot be decoded honestly; the message names the file, then the problem."""


def load_image(source, *, alpha: str = 'refuse', background=(1.0, 1.0, 1.0),
               cover: tuple[int, int] | None = None, orient: bool = True,
               name: str | None = None) -> np.ndarray:
  """`source` (a path or the file's bytes) as float32 sRGB in [0, 1].

  alpha:      'refuse', 'composite' (over `background`, RGB in [0, 1]) or 'keep' (see the
              module docstring); the result is [H, W, 3], or [H, W, 4] with 'keep'.
  cover:      (H, W): the image scaled to cover it and centre-cropped to it
              (`scale_to_cover`); a JPEG decodes at a reduced scale that still covers it.
  orient:     apply the EXIF orientation (False: the stored pixel grid, for annotations
              made on it).
  name:       what errors call the source (default: the path, or 'image bytes').
  """
  if alpha not in ALPHA:
    raise ValueError(f'alpha must be one of {ALPHA}, got {alpha!r}')
  background = _check_background(background)
  if cover is not None:
    if alpha == 'keep':
      raise ValueError("cover resizes an opaque image: use alpha='refuse' or 'composite'")
    cover = _check_size(cover)
  name = _name(source, name)
  if not isinstance(source, _BYTES) and not Path(source).is_file():
    raise ImageError(f'{name}: no such file')
  try:
    with _open(source) as im:
      deep = _deep_png(im, source)  # first: it reads the tile, which loading clears
      stored = im.getexif().get(_ORIENTATION, 1)
      if cover is not None:
        im.draft(None, _draft_size(im.size, stored, cover))
      colour, a = _decode(im, deep, name)
      # Pillow turns a TIFF upright as it loads it, and drops the tag.
      left = im.getexif().get(_ORIENTATION, 1)
  except ImageError:
    raise
  except _DECODE_ERRORS as e:
    raise ImageError(f'{name}: not a readable image ({_reason(e)})') from None
  if orient:
    orientation = left
  else:
    orientation = _INVERSE.get(stored, stored) if left != stored else 1
  image = _apply_alpha(colour, a, alpha, background, name)
  image = np.ascontiguousarray(_orient(image, orientation))
  return image if cover is None else scale_to_cover(image, cover)


def check_image(source, *, name: str | None = None) -> None:
  """Raises `ImageError` unless `source` opens as an image whose headers and checksums hold.

  Decodes no pixels: a cheap first look at many files (a bank) that are decoded later.
  """
  name = _name(source, name)
  try:
    with _open(source) as im:
      im.verify()
  except _DECODE_ERRORS as e:
    raise ImageError(f'{name}: not a readable image ({_reason(e)})') from None


def scale_to_fit(image: np.ndarray, max_side: int) -> np.ndarray:
  """`image` [H, W, 3] scaled down (never up) so its longer side is at most `max_side`."""
  h, w = image.shape[:2]
  s = min(1.0, max_side / max(h, w))
  if s == 1:
    return image
  return _resize(image, (max(1, round(w * s)), max(1, round(h * s))))


def scale_to_cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`image` [h, w, 3] scaled to cover `size` (H, W) and centre-cropped to it."""
  h, w = size
  sh, sw = image.shape[:2]
  scale = max(h / sh, w / sw)
  cw, ch = w / scale, h / scale
  return _resize(image, (w, h), ((sw - cw) / 2, (sh - ch) / 2, (sw + cw) / 2, (sh + ch) / 2))


def _resize(image: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
  # Per channel as Pillow float images: no 8-bit rounding; Lanczos overshoot is clipped.
  planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
                       .resize(size, Image.Resampling.LANCZOS, box=box))
            for c in range(image.shape[-1])]
  return np.clip(np.stack(planes, -1), 0, 1)


def _check_background(background) -> np.ndarray:
  try:
    bg = np.asarray(background, np.float32)
  except (TypeError, ValueError):
    bg = None
  if bg is None or bg.shape != (3,) or not np.all((bg >= 0) & (bg <= 1)):
    raise ValueError(f'background must be (r, g, b) in [0, 1], got {background!r}')
  return bg


def _check_size(size) -> tuple[int, int]:
  if (not isinstance(size, (tuple, list)) or len(size) != 2
      or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)):
    raise ValueError(f'cover must be (height, width), two positive integers, got {size!r}')
  return int(size[0]), int(size[1])


def _reason(e: Exception) -> str:
  """Pillow's message on one line, without the repr of the buffer it read bytes from."""
  return re.sub(r'\s*<_io\.BytesIO object at 0x[0-9a-f]+>', '', ' '.join(str(e).split()))


def _name(source, name: str | None) -> str:
  return name or ('image bytes' if isinstance(source, _BYTES) else str(source))


def _open(source) -> Image.Image:
  if isinstance(source, _BYTES):
    return Image.open(io.BytesIO(source))
  return Image.open(source)


def _draft_size(stored: tuple[int, int], orientation: int, size: tuple[int, int]):
  """The smallest stored (w, h) whose oriented image still covers `size` (H, W)."""
  w, h = stored[::-1] if orientation in (5, 6, 7, 8) else stored
  scale = max(size[0] / h, size[1] / w)
  return math.ceil(stored[0] * scale), math.ceil(stored[1] * scale)


# --- samples ------------------------------------------------------------------------------

def _decode(im: Image.Image, deep: np.ndarray | None,
            name: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Colour [H, W, 3] in sRGB and alpha [H, W] (None: no alpha), float32 in [0, 1]."""
  im.load()
  mode = im.mode
  if mode in ('P', 'PA'):
    im = im.convert('RGBA' if mode == 'PA' or 'transparency' in im.info else 'RGB')
  elif mode in ('1', 'La', 'RGBa', 'RGBX', 'YCbCr'):
    im = im.convert({'1': 'L', 'La': 'LA', 'RGBa': 'RGBA'}.get(mode, 'RGB'))
  mode = im.mode
  if deep is not None:
    samples, full = deep, 65535
  elif mode in ('L', 'LA', 'RGB', 'RGBA', 'CMYK', 'LAB'):
    samples, full = np.asarray(im), 255
  elif mode.startswith('I;16'):
    samples, full = np.asarray(im), 65535
  elif mode == 'I':
    samples, full = _integer_samples(im, name)
  elif mode == 'F':
    samples, full = _float_samples(im, name)
  else:
    raise ImageError(f'{name}: pixel mode {mode} is not supported')
  samples = samples.reshape(*samples.shape[:2], -1)
  a = None
  if mode in ('LA', 'RGBA'):
    samples, a = samples[..., :-1], samples[..., -1].astype(np.float32) / full
  elif mode not in ('CMYK', 'LAB') and im.info.get('transparency') is not None:
    # A transparency key (PNG tRNS): pixels of exactly that value are transparent.
    key = np.asarray(im.info['transparency']).reshape(-1)
    a = np.any(samples != key, -1).astype(np.float32)
  colour = samples.astype(np.float32) / np.float32(full)
  space = {'LA': 'L', 'RGBA': 'RGB', 'CMYK': 'CMYK', 'LAB': 'LAB', 'RGB': 'RGB'}.get(mode, 'L')
  return _to_srgb(colour, space, im.info.get('icc_profile'), name), a


def _deep_png(im: Image.Image, source) -> np.ndarray | None:
  """A 16-bit colour PNG's samples as uint16 [H, W, C], else None.

  Pillow keeps only the high byte of 16-bit colour samples. Decoding the data again with
  the little-endian raw mode makes its unpacker take the other byte of each pair: the low
  one. (The filter and interlace steps do not depend on the raw mode's byte order.)
  """
  if im.format != 'PNG' or len(im.tile) != 1 or im.tile[0][3] not in ('RGB;16B', 'RGBA;16B'):
    return None
  with _open(source) as other:
    codec, extents, offset, rawmode = other.tile[0]
    other.tile = [(codec, extents, offset, rawmode.replace(';16B', ';16L'))]
    low = np.asarray(other)
  return np.asarray(im).astype(np.uint16) << 8 | low


def _integer_samples(im: Image.Image, name: str) -> tuple[np.ndarray, int]:
  """Mode 'I' (32-bit signed in Pillow) and the value of full intensity, by the file's depth."""
  samples = np.asarray(im)
  if im.format in ('PNG', 'PPM'):  # their 16-bit grey, opened as 'I' by some Pillow versions
    bits, signed = 16, False
  elif im.format == 'TIFF':
    bits = _tag(im, 258, 1)   # BitsPerSample
    signed = _tag(im, 339, 1) == 2  # SampleFormat: 1 unsigned, 2 signed
  else:
    raise ImageError(f'{name}: a {im.format} integer image of unknown bit depth')
  if bits == 32 and not signed:
    samples = samples.view(np.uint32)  # Pillow stores uint32 bits in its int32 mode
  if signed and samples.min() < 0:
    raise ImageError(f'{name}: negative samples (min {samples.min()}) in a signed integer '
                     f'image: no intensity to map them to')
  return samples, 2 ** (bits - signed) - 1


def _tag(im: Image.Image, tag: int, default: int) -> int:
  value = im.tag_v2.get(tag, default)
  return int(value[0] if isinstance(value, tuple) else value)


def _float_samples(im: Image.Image, name: str) -> tuple[np.ndarray, int]:
  samples = np.asarray(im, np.float32)
  if not np.isfinite(samples).all():
    raise ImageError(f'{name}: float samples that are NaN or infinite')
  lo, hi = float(samples.min()), float(samples.max())
  if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
    raise ImageError(f'{name}: float samples span [{lo:.6g}, {hi:.6g}], outside [0, 1]; '
                     f'tone-map or rescale it to [0, 1] first')
  return np.clip(samples, 0, 1), 1


# --- colour -------------------------------------------------------------------------------

_PROFILE_MODES = {'L': 'L', 'RGB': 'RGB', 'CMYK': 'CMYK', 'LAB': 'LAB'}
_PROFILE_SPACES = {'GRAY': 'L', 'RGB': 'RGB', 'CMYK': 'CMYK', 'LAB': 'LAB'}


def _to_srgb(colour: np.ndarray, space: str, icc: bytes | None, name: str) -> np.ndarray:
  """[H, W, C] samples in `space` (their embedded profile `icc`, if any) -> sRGB [H, W, 3]."""
  if space == 'LAB' and not icc:
    icc = _lab_profile()
  if space == 'CMYK' and not icc:
    return (1 - colour[..., :3]) * (1 - colour[..., 3:])
  profile_space, transform = _transform(bytes(icc), space) if icc else (space, None)
  if profile_space != space:
    raise ImageError(f'{name}: its colour profile is for {profile_space} samples, but the '
                     f'pixels are {space}')
  if transform is not None:
    pixels = np.round(colour * 255).astype(np.uint8)
    im = Image.fromarray(pixels[..., 0] if space == 'L' else pixels, _PROFILE_MODES[space])
    colour = np.asarray(transform.apply(im), np.float32) / 255
  return np.repeat(colour, 3, -1) if colour.shape[-1] == 1 else colour


@functools.lru_cache(maxsize=1)
def _lab_profile() -> bytes:
  return ImageCms.ImageCmsProfile(ImageCms.createProfile('LAB')).tobytes()


@functools.lru_cache(maxsize=32)
def _transform(icc: bytes, space: str) -> tuple[str, ImageCms.ImageCmsTransform | None]:
  """The space `icc` describes, and its transform from `space` samples to sRGB (None: it is
  sRGB already, or describes another space)."""
  profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
  profile_space = profile.profile.xcolor_space.strip().upper()
  profile_space = _PROFILE_SPACES.get(profile_space, profile_space)
  if profile_space != space:
    return profile_space, None
  transform = ImageCms.buildTransform(profile, ImageCms.createProfile('sRGB'),
                                      _PROFILE_MODES[space], 'RGB',
                                      profile.profile.rendering_intent)
  if space in ('L', 'RGB'):
    # A profile that leaves a grid of colours within one 8-bit step is sRGB: skip it.
    steps = np.arange(0, 256, 15, dtype=np.uint8)
    grid = (steps[:, None] if space == 'L' else
            np.stack(np.meshgrid(steps, steps, steps), -1).reshape(-1, 3))
    im = Image.fromarray(grid if space == 'L' else grid[None], _PROFILE_MODES[space])
    out = np.asarray(transform.apply(im), np.int16).reshape(-1, 3)
    if np.abs(out - grid.reshape(len(out), -1).astype(np.int16)).max() <= 1:
      return space, None
  return space, transform


# --- alpha and orientation ----------------------------------------------------------------

def _apply_alpha(colour: np.ndarray, a: np.ndarray | None, alpha: str, background: np.ndarray,
                 name: str) -> np.ndarray:
  if a is not None and a.min() == 1:
    a = None
  if alpha == 'keep':
    if a is None:
      return np.concatenate([colour, np.ones((*colour.shape[:2], 1), np.float32)], -1)
    return np.concatenate([np.where(a[..., None] > 0, colour, 0), a[..., None]], -1)
  if a is None:
    return colour
  if alpha == 'refuse':
    raise ImageError(f'{name}: transparent ({np.mean(a < 1):.2%} of its pixels), and '
                     f'transparent images are refused here')
  return colour * a[..., None] + background * (1 - a[..., None])


# EXIF orientation -> the transform that shows the stored pixels upright (as
# PIL.ImageOps.exif_transpose: 5 transpose, 6 rotate 90 clockwise, 7 transverse,
# 8 rotate 90 counter-clockwise).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
_INVERSE = {6: 8, 8: 6}  # the others undo themselves


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
  return _ORIENT.get(orientation, lambda a: a)(image)
