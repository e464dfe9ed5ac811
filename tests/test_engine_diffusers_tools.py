"""The diffusers-backed engine tools on tiny random pipelines saved as real local folders: the
inpainter against the same pipeline run by hand on the same crop, the text-to-RGBA generator's
plain-background key on hand-made images, and bad folders."""

import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import randomize_
from data_engine import core, gennval
from data_engine.tools import inpainter
from data_engine.core import Drop
from data_engine.tools.generator import PlainBackgroundKey

UNET = dict(block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
            cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
VAE_FACTOR = 4    # three VAE blocks: two halvings


def tokenizer(root):
  """A character-level CLIP tokenizer from a vocab.json / merges.txt written here."""
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
  for c in 'abcdefghijklmnopqrstuvwxyz,.':
    vocab[c], vocab[c + '</w>'] = len(vocab), len(vocab) + 1
  folder = root / 'vocab'
  folder.mkdir()
  (folder / 'vocab.json').write_text(json.dumps(vocab))
  (folder / 'merges.txt').write_text('#version: 0.2\n')
  return CLIPTokenizer.from_pretrained(folder, model_max_length=16), len(vocab)


def components(root, in_channels: int, seed: int) -> dict:
  torch.manual_seed(seed)
  tok, vocab_size = tokenizer(root)
  text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
  return dict(
      unet=UNet2DConditionModel(**UNET, sample_size=8, in_channels=in_channels, out_channels=4,
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D')),
      vae=AutoencoderKL(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=('DownEncoderBlock2D',) * 3,
                        up_block_types=('UpDecoderBlock2D',) * 3),
      text_encoder=CLIPTextModel(text), tokenizer=tok,
      scheduler=DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipelines')
  (root / 'inpaint_parts').mkdir()
  (root / 'txt_parts').mkdir()
  StableDiffusionInpaintPipeline(**components(root / 'inpaint_parts', 9, 0)).save_pretrained(
      root / 'inpaint', safe_serialization=True)
  StableDiffusionPipeline(**components(root / 'txt_parts', 4, 1)).save_pretrained(
      root / 'txt2img', safe_serialization=True)
  # A fresh ControlNet's output convs are zero (no effect): random weights make it matter.
  controlnet = randomize_(ControlNetModel(**UNET, in_channels=4,
                                          conditioning_embedding_out_channels=(4, 8, 8)), seed=2)
  controlnet.save_pretrained(root / 'controlnet', safe_serialization=True)
  return root


def photo(h=40, w=48, seed=0):
  return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def hole(h=40, w=48):
  m = np.zeros((h, w), bool)
  m[12:25, 20:31] = True     # box x 20..31, y 12..25
  m[24:28, 26:29] = True     # a bump: box x 20..31, y 12..28
  return m


INPAINT = dict(name='diffusers', prompt='empty street', negative_prompt='a car', steps=2,
               guidance_scale=3.0, strength=0.9, seed=5, resolution=32, margin=4, device='cpu')


def reference(pipe, image, mask, seed, control=None) -> np.ndarray:
  """The inpainter's result worked out by hand: crop box x 16..35, y 8..32 (the hole's box
  plus 4 px), 19x24 -> longest side 32 -> 25x32 -> multiples of 4: 24x32."""
  crop = np.s_[8:32, 16:35]
  size = (24, 32)
  small_hole = cv2.resize(mask[crop].astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0
  extra = {} if control is None else {'control_image': control}
  out = pipe(prompt='empty street', negative_prompt='a car', num_inference_steps=2,
             guidance_scale=3.0, strength=0.9, height=32, width=24,
             image=cv2.resize(image[crop], size, interpolation=cv2.INTER_LINEAR),
             mask_image=small_hole.astype(np.float32), output_type='np',
             generator=torch.Generator().manual_seed(seed), **extra).images[0]
  back = cv2.resize(out, (19, 24), interpolation=cv2.INTER_AREA)
  expected = image.copy()
  expected[crop][mask[crop]] = np.clip(back[mask[crop]], 0, 1)
  return expected


def local(cls, folder, **kwargs):
  return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)


# --- inpainter ----------------------------------------------------------------------------

def test_inpainter_is_the_pipeline_on_the_crop_pasted_into_the_hole(folders):
  tool = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint')))
  assert type(tool.pipe).__name__ == 'StableDiffusionInpaintPipeline'
  assert tool.work_size(24, 19) == (24, 32)
  image, mask = photo(), hole()
  out = tool(image, mask)
  assert out.shape == image.shape and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 1
  assert np.array_equal(out[~mask], image[~mask])
  assert np.abs(out[mask] - image[mask]).mean() > 0.01
  pipe = local(StableDiffusionInpaintPipeline, folders / 'inpaint')
  np.testing.assert_allclose(out, reference(pipe, image, mask, seed=5), atol=1e-5)
  assert np.array_equal(tool(image, mask), out)
  other = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint'), seed=6))
  assert not np.allclose(other(image, mask)[mask], out[mask], atol=1e-3)


def test_inpainter_with_an_empty_mask_returns_the_image(folders):
  tool = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint')))
  image = photo()
  assert np.array_equal(tool(image, np.zeros(image.shape[:2], bool)), image)


def test_depth_controlnet_guides_with_the_hole_filled_depth(folders):
  tool = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint'),
                                       controlnet=str(folders / 'controlnet'),
                                       depth={'name': 'vertical_prior', 'horizon': 0.2}))
  assert type(tool.pipe).__name__ == 'StableDiffusionControlNetInpaintPipeline'
  image, mask = photo(seed=1), hole()
  out = tool(image, mask)
  assert np.array_equal(out[~mask], image[~mask])
  near = core.create('depth', {'name': 'vertical_prior', 'horizon': 0.2})(image)
  near = inpainter.Telea(radius=5)(near[..., None], mask)[..., 0]
  control = np.repeat(cv2.resize(near[8:32, 16:35], (24, 32))[None, ..., None], 3, -1)
  pipe = local(StableDiffusionControlNetInpaintPipeline, folders / 'inpaint',
               controlnet=local(ControlNetModel, folders / 'controlnet'))
  np.testing.assert_allclose(out, reference(pipe, image, mask, 5, control), atol=1e-5)
  # The control image matters, so the comparison above checks it.
  blind = reference(pipe, image, mask, 5, np.zeros_like(control))
  assert np.abs(blind[mask] - out[mask]).max() > 1e-3


def test_inpainter_bad_folders_fail_at_construction(folders, tmp_path):
  with pytest.raises(FileNotFoundError, match="inpainter 'diffusers': no such folder .*nowhere"):
    core.create('inpainter', {'name': 'diffusers', 'path': str(tmp_path / 'nowhere')})
  with pytest.raises(ValueError, match="inpainter 'diffusers': no diffusers folder given"):
    core.create('inpainter', {'name': 'diffusers', 'path': ''})
  with pytest.raises(FileNotFoundError, match='has no model_index.json'):
    core.create('inpainter', {'name': 'diffusers', 'path': str(tmp_path)})
  with pytest.raises(ValueError, match='holds a StableDiffusionPipeline, not a pipeline for '
                     'inpainting'):
    core.create('inpainter', {'name': 'diffusers', 'path': str(folders / 'txt2img')})
  with pytest.raises(ValueError, match='unet holds a UNet2DConditionModel, not a ControlNetModel'):
    core.create('inpainter', {'name': 'diffusers', 'path': str(folders / 'inpaint'),
                              'controlnet': str(folders / 'inpaint' / 'unet')})
  with pytest.raises(ValueError, match='depth and controlnet_scale need a controlnet'):
    core.create('inpainter', {'name': 'diffusers', 'path': str(folders / 'inpaint'),
                              'depth': 'vertical_prior'})
  with pytest.raises(ValueError, match="dtype must be"):
    core.create('inpainter', {'name': 'diffusers', 'path': str(folders / 'inpaint'),
                              'dtype': 'float8'})


def test_missing_weights_are_a_load_error_naming_the_folder(folders, tmp_path):
  broken = tmp_path / 'broken'
  broken.mkdir()
  index = json.loads((folders / 'inpaint' / 'model_index.json').read_text())
  (broken / 'model_index.json').write_text(json.dumps(index))
  with pytest.raises(ValueError, match="inpainter 'diffusers': cannot load the "
                     'StableDiffusionInpaintPipeline at .*broken'):
    core.create('inpainter', {'name': 'diffusers', 'path': str(broken)})


# --- generator: the plain-background key --------------------------------------------------

BG = np.array([0.95, 0.95, 0.93], np.float32)
RED = np.array([0.85, 0.15, 0.1], np.float32)
YY, XX = np.mgrid[:64, :64]
DIST = np.hypot(YY - 32, XX - 32)


def object_on_plain():
  """A red disc (radius 15, its edge a 3 px ramp to the background) with a background-coloured
  patch inside it and a dark 4x4 speck away from it, on an off-white plain background."""
  t = np.clip((15 - DIST) / 3, 0, 1)[..., None].astype(np.float32)
  image = t * RED + (1 - t) * BG
  image[30:34, 30:34] = BG
  image[6:10, 50:54] = 0.1
  return image


def test_key_alpha_rule_on_a_hand_made_image():
  image = object_on_plain()
  rgba = PlainBackgroundKey()(image)
  alpha, colour = rgba[..., 3], rgba[..., :3]
  assert rgba.shape == (64, 64, 4) and rgba.dtype == np.float32
  assert 0 <= rgba.min() and rgba.max() <= 1
  assert np.all(alpha[DIST <= 6] == 1)              # the core, and the bg-coloured patch in it
  assert np.all(alpha[DIST > 21] == 0)              # beyond the matting band
  assert np.all(alpha[6:10, 50:54] == 0)            # the speck is outside the key's band
  opaque = alpha == 1
  assert np.array_equal(colour[opaque], image[opaque])
  assert np.array_equal(colour[30:34, 30:34], image[30:34, 30:34])
  # Straight colour: unclipped partial pixels over the estimated background give the image.
  a = alpha[..., None]
  raw = (image - (1 - a) * BG) / np.maximum(a, 1e-6)
  soft = (alpha > 0) & (alpha < 1) & np.all((raw >= 0) & (raw <= 1), -1)
  assert soft.sum() > 20
  np.testing.assert_allclose((a * colour + (1 - a) * BG)[soft], image[soft], atol=1e-5)
  # Matting recovers the drawn edge ramp.
  ramp = np.clip((15 - DIST) / 3, 0, 1)
  ramp[30:34, 30:34] = 1
  ramp[6:10, 50:54] = 0
  np.testing.assert_allclose(alpha, ramp, atol=2 / 255)


def test_median_filter_removes_specks_matting_keeps():
  # A 1 px matting band leaves the speck a sure core, so only Gen-n-Val's median filter
  # (applied after validation) removes it.
  keyed = PlainBackgroundKey(matting={'name': 'closed_form', 'band': 1})(object_on_plain())
  unfiltered = keyed[..., 3]
  filtered = gennval.median_alpha(keyed, 15)[..., 3]
  assert unfiltered[7:9, 51:53].min() == 1
  assert filtered[4:12, 48:56].max() == 0
  assert np.all(filtered[DIST <= 10] == 1)


def test_key_drops_busy_backgrounds_and_empty_images():
  busy = photo(64, 64)
  with pytest.raises(Drop) as e:
    PlainBackgroundKey()(busy)
  assert e.value.reason == 'background_not_plain'
  with pytest.raises(Drop) as e:
    PlainBackgroundKey()(np.broadcast_to(BG, (64, 64, 3)).copy())
  assert e.value.reason == 'no_object'


# --- generator: the pipeline ---------------------------------------------------------------

GENERATE = dict(name='diffusers_rgba', steps=2, guidance_scale=2.0, height=64, width=64,
                device='cpu', suffix=', on white')


def test_generator_is_the_key_of_the_pipeline_image(folders):
  # The random model draws noise, not a plain background: accept any frame.
  tool = core.create('generator', dict(GENERATE, path=str(folders / 'txt2img'), min_plain=0.0))
  rgba = tool('a red ball', seed=3)
  assert rgba.shape == (64, 64, 4) and rgba.dtype == np.float32
  assert 0 <= rgba.min() and rgba.max() <= 1
  pipe = local(StableDiffusionPipeline, folders / 'txt2img')
  image = pipe(prompt='a red ball, on white', num_inference_steps=2, guidance_scale=2.0,
               height=64, width=64, generator=torch.Generator().manual_seed(3),
               output_type='np').images[0]
  expected = PlainBackgroundKey(min_plain=0.0)(image)
  np.testing.assert_allclose(rgba, expected, atol=1e-5)
  assert np.array_equal(tool('a red ball', seed=3), rgba)
  assert not np.allclose(tool('a red ball', seed=4), rgba, atol=1e-3)


def test_generator_drops_a_non_plain_background_by_default(folders):
  tool = core.create('generator', dict(GENERATE, path=str(folders / 'txt2img')))
  with pytest.raises(Drop) as e:
    tool('a red ball', seed=3)
  assert e.value.reason == 'background_not_plain'


def test_generator_bad_folders_and_options_fail_at_construction(folders, tmp_path):
  with pytest.raises(FileNotFoundError, match="generator 'diffusers_rgba': no such folder"):
    core.create('generator', {'name': 'diffusers_rgba', 'path': str(tmp_path / 'none')})
  with pytest.raises(ValueError, match='holds a StableDiffusionInpaintPipeline, not a '
                     'pipeline for text-to-image'):
    core.create('generator', {'name': 'diffusers_rgba', 'path': str(folders / 'inpaint')})
  with pytest.raises(ValueError, match='height 30 is not a positive multiple of 4'):
    core.create('generator', dict(GENERATE, path=str(folders / 'txt2img'), height=30))
  with pytest.raises(ValueError, match='bad options'):
    core.create('generator', dict(GENERATE, path=str(folders / 'txt2img'), kernel=15))
