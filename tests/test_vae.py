"""layerjax's AutoencoderKL against diffusers' on random weights, loaded from real folders."""

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_parity, nchw_to_nhwc, randomize_, torch_reference
from layerjax.convert.diffusers import load_vae
from layerjax.models import common
from layerjax.models.vae import AutoencoderKL, VAEConfig, from_latent, to_latent

# SD3's vae/config.json as published (stabilityai/stable-diffusion-3-medium-diffusers).
SD3_VAE_CONFIG = {
    '_class_name': 'AutoencoderKL', '_diffusers_version': '0.29.0.dev0', 'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'force_upcast': True, 'in_channels': 3,
    'latent_channels': 16, 'latents_mean': None, 'latents_std': None, 'layers_per_block': 2,
    'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 1024, 'scaling_factor': 1.5305,
    'shift_factor': 0.0609, 'up_block_types': ['UpDecoderBlock2D'] * 4,
    'use_post_quant_conv': False, 'use_quant_conv': False,
}

# Three blocks: channel changes (shortcut convs) and an unchanged last pair, as in SD3.
SMALL = VAEConfig(block_out_channels=(32, 64, 64), norm_num_groups=16, layers_per_block=2)


def diffusers_vae(cfg: VAEConfig, seed: int, std: float):
  config = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith('_')}
  return randomize_(diffusers.AutoencoderKL(**config), seed, std).eval()


def saved(tmp_path, cfg: VAEConfig, seed: int = 0, std: float = 0.2):
  torch_vae = diffusers_vae(cfg, seed, std)
  torch_vae.save_pretrained(tmp_path)
  return torch_vae, tmp_path


@jax.jit
def run(vae, images, latents):
  return *vae.encode(images), vae.decode(latents)


def torch_run(torch_vae, images_nchw, latents_nchw):
  """diffusers' (mean, logvar, decoded images), NHWC, computed in the model's dtype."""
  dtype = next(torch_vae.parameters()).dtype
  with torch.no_grad():
    dist = torch_vae.encode(images_nchw.to(dtype)).latent_dist
    decoded = torch_vae.decode(latents_nchw.to(dtype)).sample
  return [nchw_to_nhwc(t.double()) for t in (dist.mean, dist.logvar, decoded)]


def check_parity(torch_vae, vae, images_nchw, latents_nchw):
  """Our VAE against the float64 reference, bounded by diffusers' own error in the precision
  ours computes in."""
  precision = jnp.dtype(vae.config.dtype).name
  ours = run(vae, jnp.asarray(nchw_to_nhwc(images_nchw)), jnp.asarray(nchw_to_nhwc(latents_nchw)))
  assert all(o.dtype == vae.config.dtype for o in ours)
  low, ref = (torch_run(torch_reference(torch_vae, p), images_nchw, latents_nchw)
              for p in (precision, 'float64'))
  for o, t, r in zip(ours, low, ref):
    assert_parity(o, t, r, precision)


def inputs(cfg: VAEConfig, height: int, width: int, seed: int = 1):
  g = torch.Generator().manual_seed(seed)
  f = 2 ** (len(cfg.block_out_channels) - 1)
  images = torch.rand(2, cfg.in_channels, height, width, generator=g) * 2 - 1
  latents = torch.randn(2, cfg.latent_channels, height // f, width // f, generator=g)
  return images, latents


def test_parameter_names_and_shapes_match_diffusers_sd3():
  with torch.device('meta'):
    torch_vae = diffusers.AutoencoderKL.from_config(SD3_VAE_CONFIG)
  expected = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
  vae = common.abstract(lambda rngs: AutoencoderKL(VAEConfig(), rngs=rngs))
  got = {}
  for path, var in nnx.to_flat_state(nnx.state(vae)):
    *head, leaf = map(str, path)
    shape = var.shape
    if leaf == 'kernel':
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    got['.'.join([*head, {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)])] = shape
  assert len(expected) == 244
  assert got == expected


def test_parity_small(tmp_path):
  torch_vae, folder = saved(tmp_path, SMALL)
  # Non-square so that a swapped H/W anywhere would show.
  check_parity(torch_vae, load_vae(folder), *inputs(SMALL, 16, 24))


def test_parity_without_mid_attention_and_odd_size(tmp_path):
  cfg = dataclasses.replace(SMALL, block_out_channels=(32, 64), layers_per_block=1,
                            mid_block_add_attention=False)
  torch_vae, folder = saved(tmp_path, cfg, seed=3)
  vae = load_vae(folder)
  assert not hasattr(vae.encoder.mid_block, 'attentions')
  images, latents = inputs(cfg, 15, 9)  # odd sizes exercise the right/bottom padding
  check_parity(torch_vae, vae, images, latents)


def test_parity_sd3_widths(tmp_path):
  """The real SD3 channel widths, depth and 16 latent channels, at a 32x32 image."""
  torch_vae, folder = saved(tmp_path, VAEConfig(), seed=5, std=0.05)
  vae = load_vae(folder)
  assert vae.config == VAEConfig()
  check_parity(torch_vae, vae, *inputs(VAEConfig(), 32, 32))


def test_bf16_parity(tmp_path):
  torch_vae, folder = saved(tmp_path, SMALL, seed=7)
  check_parity(torch_vae, load_vae(folder, dtype=jnp.bfloat16), *inputs(SMALL, 16, 16))


def test_logvar_is_clipped(tmp_path):
  cfg = dataclasses.replace(SMALL, block_out_channels=(32, 64), layers_per_block=1)
  torch_vae = diffusers_vae(cfg, seed=9, std=0.2)
  with torch.no_grad():  # logvar channels come second
    torch_vae.encoder.conv_out.bias[16:24] = 1e3
    torch_vae.encoder.conv_out.bias[24:] = -1e3
  torch_vae.save_pretrained(tmp_path)
  images, latents = inputs(cfg, 8, 8)
  mean, logvar, _ = run(load_vae(tmp_path), jnp.asarray(nchw_to_nhwc(images)),
                        jnp.asarray(nchw_to_nhwc(latents)))
  assert mean.shape == logvar.shape == (2, 4, 4, 16)
  np.testing.assert_array_equal(np.asarray(logvar[..., :8]), 20.0)
  np.testing.assert_array_equal(np.asarray(logvar[..., 8:]), -30.0)
  check_parity(torch_vae, load_vae(tmp_path), images, latents)


def test_latent_normalisation_matches_diffusers_formula():
  cfg = VAEConfig()
  z = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
  # SD3 pipelines: `(z - shift_factor) * scaling_factor` after encoding, inverse before decoding.
  np.testing.assert_allclose(to_latent(z, cfg), (z - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(from_latent(z, cfg), z / 1.5305 + 0.0609, rtol=1e-6)
  np.testing.assert_allclose(from_latent(to_latent(z, cfg), cfg), z, atol=1e-6)
  sd1_style = dataclasses.replace(cfg, shift_factor=None, scaling_factor=0.18215)
  np.testing.assert_allclose(to_latent(z, sd1_style), z * 0.18215, rtol=1e-6)


def test_config_round_trip_through_diffusers():
  cfg = VAEConfig.from_diffusers(SD3_VAE_CONFIG)
  assert cfg == VAEConfig()
  exported = cfg.to_diffusers()
  for key, value in SD3_VAE_CONFIG.items():
    if key != '_diffusers_version':
      assert exported[key] == value, key
  with torch.device('meta'):
    rebuilt = diffusers.AutoencoderKL.from_config(exported)
  assert VAEConfig.from_diffusers(dict(rebuilt.config)) == cfg
  compute = VAEConfig.from_diffusers(SD3_VAE_CONFIG, dtype=jnp.bfloat16)
  assert compute.dtype == jnp.bfloat16 and compute.to_diffusers() == exported


def test_missing_keys_take_diffusers_defaults():
  config = {k: v for k, v in SD3_VAE_CONFIG.items() if k != 'shift_factor'}
  assert VAEConfig.from_diffusers(config).shift_factor is None
  # diffusers builds quant_conv when the key is absent (older folders).
  with pytest.raises(ValueError, match='use_quant_conv'):
    VAEConfig.from_diffusers({k: v for k, v in SD3_VAE_CONFIG.items() if k != 'use_quant_conv'})


@pytest.mark.parametrize('change, message', [
    ({'use_quant_conv': True}, 'use_quant_conv'),
    ({'use_post_quant_conv': True}, 'use_post_quant_conv'),
    ({'down_block_types': ['DownEncoderBlock2D'] * 3 + ['AttnDownEncoderBlock2D']},
     'down_block_types'),
    ({'up_block_types': ['UpDecoderBlock2D'] * 3}, 'up_block_types'),
    ({'act_fn': 'gelu'}, 'act_fn'),
    ({'latents_mean': [0.0] * 16}, 'latents_mean'),
    ({'norm_num_groups': 48}, 'norm_num_groups'),
])
def test_unsupported_configs_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    VAEConfig.from_diffusers({**SD3_VAE_CONFIG, **change})
