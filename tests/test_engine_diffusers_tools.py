"""The diffusers-backed engine tools on tiny random pipelines saved as real local folders: the
inpainter (SD, SDXL, FLUX fill; SD and SDXL with a depth ControlNet) against the same pipeline
run by hand on the same crop, the text-to-RGBA generator's plain-background key on hand-made
images, and bad folders."""

import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionXLControlNetInpaintPipeline,
                       StableDiffusionXLInpaintPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast)

from conftest import randomize_
from data_engine import core, gennval
from data_engine.tools import inpainter
from data_engine.core import Drop
from data_engine.tools.generator import PlainBackgroundKey

UNET = dict(block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
            cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
VAE_FACTOR = 4    # three VAE blocks: two halvings
# SDXL: the UNet attends to both text encoders' states (16 + 16) and adds an embedding of the
# pooled projection (16) and six size / crop numbers (6 x 4).
SDXL_UNET = dict(UNET, cross_attention_dim=32, use_linear_projection=True,
                 addition_embed_type='text_time', addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 16)
LETTERS = 'abcdefghijklmnopqrstuvwxyz,.'


def tokenizer(root):
  """A character-level CLIP tokenizer from a vocab.json / merges.txt written here."""
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
  for c in LETTERS:
    vocab[c], vocab[c + '</w>'] = len(vocab), len(vocab) + 1
  folder = root / 'vocab'
  folder.mkdir()
  (folder / 'vocab.json').write_text(json.dumps(vocab))
  (folder / 'merges.txt').write_text('#version: 0.2\n')
  return CLIPTokenizer.from_pretrained(folder, model_max_length=16), len(vocab)


def clip_config(vocab_size: int) -> CLIPTextConfig:
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)


def t5_tokenizer() -> T5TokenizerFast:
  """A character-level T5 tokenizer (a Unigram model over single letters), built in memory."""
  pieces = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -2.0)]
  return T5TokenizerFast(vocab=pieces + [(c, -1.0) for c in LETTERS], extra_ids=0)


def components(root, in_channels: int, seed: int) -> dict:
  torch.manual_seed(seed)
  tok, vocab_size = tokenizer(root)
  text = clip_config(vocab_size)
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


def sdxl_components(root, seed: int) -> dict:
  """SDXL inpainting in miniature: two CLIP text encoders (the second with a projection), a
  9-channel UNet with 'text_time' added embeddings, four VAE blocks (x8) as in SDXL."""
  torch.manual_seed(seed)
  tok, vocab_size = tokenizer(root)
  text = clip_config(vocab_size)
  return dict(
      unet=UNet2DConditionModel(**SDXL_UNET, sample_size=8, in_channels=9, out_channels=4,
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D')),
      vae=AutoencoderKL(block_out_channels=(8, 8, 16, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4),
      text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
      tokenizer=tok, tokenizer_2=tok,
      scheduler=EulerDiscreteScheduler(beta_schedule='scaled_linear', beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1,
                                       timestep_spacing='leading'),
      requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)


def flux_fill_components(root, seed: int) -> dict:
  """FLUX.1 Fill in miniature, as in diffusers' own test but with FLUX's four VAE blocks (x8,
  then 2x2 packing: factor 16) and embedded guidance. The transformer reads the packed noisy
  latents (2 channels x 4), the packed masked-image latents (as many) and the packed mask
  (8 x 8 pixels per latent x 4)."""
  torch.manual_seed(seed)
  tok, vocab_size = tokenizer(root)
  t5_tok = t5_tokenizer()
  return dict(
      transformer=FluxTransformer2DModel(
          in_channels=2 * 4 * 2 + 8 * 8 * 4, out_channels=2 * 4, num_layers=1,
          num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
          joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
          axes_dims_rope=(2, 2, 4)),
      vae=AutoencoderKL(block_out_channels=(4, 4, 4, 4), latent_channels=2, norm_num_groups=1,
                        down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
      text_encoder=CLIPTextModel(clip_config(vocab_size)), tokenizer=tok,
      text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8,
                                             d_ff=32, num_layers=1, num_heads=2,
                                             relative_attention_num_buckets=8)),
      tokenizer_2=t5_tok, scheduler=FlowMatchEulerDiscreteScheduler())


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


@pytest.fixture(scope='module')
def sdxl(tmp_path_factory):
  root = tmp_path_factory.mktemp('sdxl')
  StableDiffusionXLInpaintPipeline(**sdxl_components(root, 3)).save_pretrained(
      root / 'inpaint', safe_serialization=True)
  # Four conditioning blocks: the control image shrinks x8, as the VAE's latents do. At the SD
  # ControlNet's std 0.2 its effect on the output is only ~1e-3: too faint to check.
  controlnet = randomize_(ControlNetModel(**SDXL_UNET, in_channels=4,
                                          conditioning_embedding_out_channels=(4, 8, 8, 8)),
                          seed=4, std=0.5)
  controlnet.save_pretrained(root / 'controlnet', safe_serialization=True)
  return root


@pytest.fixture(scope='module')
def flux(tmp_path_factory):
  root = tmp_path_factory.mktemp('flux')
  FluxFillPipeline(**flux_fill_components(root, 6)).save_pretrained(root / 'fill',
                                                                    safe_serialization=True)
  return root / 'fill'


def photo(h=40, w=48, seed=0):
  return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def hole(h=40, w=48):
  m = np.zeros((h, w), bool)
  m[12:25, 20:31] = True     # box x 20..31, y 12..25
  m[24:28, 26:29] = True     # a bump: box x 20..31, y 12..28
  return m


INPAINT = dict(name='diffusers', prompt='empty street', negative_prompt='a car', steps=2,
               guidance_scale=3.0, strength=0.9, seed=5, resolution=32, margin=4, device='cpu')
# INPAINT's options as the pipelines' own arguments.
CALL = dict(prompt='empty street', negative_prompt='a car', num_inference_steps=2,
            guidance_scale=3.0, strength=0.9)
CROP = np.s_[8:32, 16:35]   # the hole's box x 20..31, y 12..28 plus 4 px: 19x24


def reference(pipe, image, mask, seed, size, **options) -> np.ndarray:
  """The inpainter's result worked out by hand: the pipeline called with `options` on CROP
  grown to `size` (width, height), shrunk back and pasted into the hole."""
  small_hole = cv2.resize(mask[CROP].astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0
  out = pipe(height=size[1], width=size[0],
             image=cv2.resize(image[CROP], size, interpolation=cv2.INTER_LINEAR),
             mask_image=small_hole.astype(np.float32), output_type='np',
             generator=torch.Generator().manual_seed(seed), **options).images[0]
  back = cv2.resize(out, (19, 24), interpolation=cv2.INTER_AREA)
  expected = image.copy()
  expected[CROP][mask[CROP]] = np.clip(back[mask[CROP]], 0, 1)
  return expected


def control(image, mask, size) -> np.ndarray:
  """The depth ControlNet's input worked out by hand: the horizon-0.2 vertical prior's
  nearness, hole filled by Telea, CROP resized to `size`, as [1, h, w, 3]."""
  near = core.create('depth', {'name': 'vertical_prior', 'horizon': 0.2})(image)
  near = inpainter.Telea(radius=5)(near[..., None], mask)[..., 0]
  return np.repeat(cv2.resize(near[CROP], size)[None, ..., None], 3, -1)


def assert_pasted(out, image, mask):
  """A float32 image in [0, 1], the input outside the mask bit for bit, changed inside."""
  assert out.shape == image.shape and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 1
  assert np.array_equal(out[~mask], image[~mask])
  assert np.abs(out[mask] - image[mask]).mean() > 0.01


def local(cls, folder, **kwargs):
  return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)


# --- inpainter ----------------------------------------------------------------------------

def test_inpainter_is_the_pipeline_on_the_crop_pasted_into_the_hole(folders):
  tool = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint')))
  assert type(tool.pipe).__name__ == 'StableDiffusionInpaintPipeline'
  # 19x24 crop -> longest side 32 -> 25x32 -> multiples of 4: 24x32.
  assert tool.factor == VAE_FACTOR and tool.work_size(24, 19) == (24, 32)
  image, mask = photo(), hole()
  out = tool(image, mask)
  assert_pasted(out, image, mask)
  pipe = local(StableDiffusionInpaintPipeline, folders / 'inpaint')
  np.testing.assert_allclose(out, reference(pipe, image, mask, 5, (24, 32), **CALL), atol=1e-5)
  assert np.array_equal(tool(image, mask), out)
  other = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint'), seed=6))
  assert not np.allclose(other(image, mask)[mask], out[mask], atol=1e-3)


def test_inpainter_with_an_empty_mask_returns_the_image(folders):
  tool = core.create('inpainter', dict(INPAINT, path=str(folders / 'inpaint')))
  image = photo()
  assert np.array_equal(tool(image, np.zeros(image.shape[:2], bool)), image)


def test_sdxl_inpainting_is_the_pipeline_on_the_crop(sdxl):
  tool = core.create('inpainter', dict(INPAINT, path=str(sdxl / 'inpaint'), resolution=64))
  assert type(tool.pipe).__name__ == 'StableDiffusionXLInpaintPipeline'
  # 19x24 crop -> longest side 64 -> 51x64 -> multiples of 8: 48x64.
  assert tool.factor == 8 and tool.work_size(24, 19) == (48, 64)
  image, mask = photo(), hole()
  out = tool(image, mask)
  assert_pasted(out, image, mask)
  pipe = local(StableDiffusionXLInpaintPipeline, sdxl / 'inpaint')
  np.testing.assert_allclose(out, reference(pipe, image, mask, 5, (48, 64), **CALL), atol=1e-5)


@pytest.mark.parametrize('kind', ['sd', 'sdxl'])
def test_depth_controlnet_guides_with_the_hole_filled_depth(kind, request):
  """SD and SDXL inpainting with a depth ControlNet equal their ControlNet pipelines run on
  the crop with the photo's depth, the hole filled, as the control image."""
  if kind == 'sd':
    root, size = request.getfixturevalue('folders'), (24, 32)
    cls, options, scale = StableDiffusionControlNetInpaintPipeline, {}, {}
  else:
    root, size = request.getfixturevalue('sdxl'), (48, 64)
    cls = StableDiffusionXLControlNetInpaintPipeline
    options = {'resolution': 64, 'controlnet_scale': 0.8}
    scale = {'controlnet_conditioning_scale': 0.8}
  tool = core.create('inpainter', dict(INPAINT, path=str(root / 'inpaint'),
                                       controlnet=str(root / 'controlnet'),
                                       depth={'name': 'vertical_prior', 'horizon': 0.2}, **options))
  assert type(tool.pipe).__name__ == cls.__name__
  image, mask = photo(seed=1), hole()
  out = tool(image, mask)
  assert_pasted(out, image, mask)
  depth = control(image, mask, size)
  pipe = local(cls, root / 'inpaint', controlnet=local(ControlNetModel, root / 'controlnet'))
  np.testing.assert_allclose(out, reference(pipe, image, mask, 5, size, **CALL, control_image=depth,
                                            **scale), atol=1e-5)
  # The control image matters, so the comparison above checks it.
  blind = reference(pipe, image, mask, 5, size, **CALL, control_image=np.zeros_like(depth),
                    **scale)
  assert np.abs(blind[mask] - out[mask]).max() > 1e-3


FLUX = dict(name='diffusers', prompt='empty street', steps=2, guidance_scale=3.0, seed=5,
            resolution=32, margin=4, device='cpu')


def test_flux_fill_loads_by_its_own_class_at_factor_16(flux):
  tool = core.create('inpainter', dict(FLUX, path=str(flux)))
  assert type(tool.pipe).__name__ == 'FluxFillPipeline'
  # 19x24 crop -> longest side 32 -> 25x32 -> multiples of 16: 32x32 (24x32 at the VAE's 8).
  assert tool.factor == 16 and tool.work_size(24, 19) == (32, 32)
  image, mask = photo(), hole()
  out = tool(image, mask)
  assert_pasted(out, image, mask)
  pipe = local(FluxFillPipeline, flux)
  call = dict(prompt='empty street', num_inference_steps=2, guidance_scale=3.0)
  np.testing.assert_allclose(out, reference(pipe, image, mask, 5, (32, 32), **call), atol=1e-5)
  # The guidance is embedded (as in FLUX.1 Fill dev), so the comparison above checks it.
  other = reference(pipe, image, mask, 5, (32, 32), **dict(call, guidance_scale=30.0))
  assert np.abs(other[mask] - out[mask]).max() > 1e-3


def test_flux_fill_refuses_what_it_cannot_take(flux):
  with pytest.raises(ValueError, match="inpainter 'diffusers': FluxFillPipeline takes no "
                     'negative_prompt'):
    core.create('inpainter', dict(FLUX, path=str(flux), negative_prompt='a car'))
  with pytest.raises(ValueError, match='depth guidance needs an SD or SDXL inpainting pipeline; '
                     '.*fill holds a FluxFillPipeline'):
    core.create('inpainter', dict(FLUX, path=str(flux), controlnet=str(flux / 'transformer')))


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
