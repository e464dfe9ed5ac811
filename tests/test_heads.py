"""Alpha / shadow decoder heads: shapes, initialisation from the VAE decoder, parity with
diffusers' VAE decoder, output range."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_parity, nchw_to_nhwc, torch_reference
from layerjax.convert.diffusers import load_vae
from layerjax.models import common
from layerjax.models.heads import (ALPHA_CHANNELS, SHADOW_CHANNELS, decoder_head,
                                   init_from_vae_decoder, to_unit)
from layerjax.models.vae import Decoder, VAEConfig

CFG = VAEConfig(block_out_channels=(32, 64), norm_num_groups=16, layers_per_block=1)


def params(module):
  return {'.'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope='module')
def vae_decoder():
  # What `AutoencoderKL(CFG).decoder` is; the encoder would only add init time.
  return Decoder(CFG, CFG.out_channels, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('channels', [ALPHA_CHANNELS, SHADOW_CHANNELS])
def test_head_output_channels(channels):
  head = decoder_head(CFG, channels, rngs=nnx.Rngs(1))
  out = jax.jit(lambda m, z: m(z))(head, jnp.ones((2, 3, 5, CFG.latent_channels)))
  assert out.shape == (2, 6, 10, channels)


@pytest.mark.parametrize('channels', [ALPHA_CHANNELS, SHADOW_CHANNELS])
def test_init_copies_all_but_conv_out(vae_decoder, channels):
  head = decoder_head(CFG, channels, rngs=nnx.Rngs(2))
  fresh = params(head)
  assert init_from_vae_decoder(head, vae_decoder) is head
  source, copied = params(vae_decoder), params(head)
  assert set(source) == set(copied)
  for name, value in copied.items():
    if name.startswith('conv_out.'):
      np.testing.assert_array_equal(value, fresh[name])
      assert value.shape[-1] == channels and source[name].shape[-1] == CFG.out_channels
    else:
      np.testing.assert_array_equal(value, source[name])
  assert copied['conv_out.kernel'].shape == (3, 3, CFG.block_out_channels[0], channels)
  # Its own buffers: training donates the heads' parameters, the frozen VAE keeps its own.
  kernel = head.conv_in.kernel[...]
  assert kernel.unsafe_buffer_pointer() != vae_decoder.conv_in.kernel[...].unsafe_buffer_pointer()


@pytest.fixture(scope='module')
def diffusers_vae(tmp_path_factory):
  """A random diffusers VAE of shape CFG and the folder it is saved in."""
  from test_vae import saved
  return saved(tmp_path_factory.mktemp('vae'), CFG, seed=4)


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
@pytest.mark.parametrize('channels', [ALPHA_CHANNELS, SHADOW_CHANNELS])
def test_head_computes_diffusers_decoder(diffusers_vae, channels, precision):
  """A head initialised from a loaded VAE is diffusers' decoder of that VAE with the head's
  `conv_out`, against its float64 reference."""
  import torch
  torch_vae, folder = diffusers_vae
  cfg = dataclasses.replace(CFG, dtype=jnp.dtype(precision))
  head = init_from_vae_decoder(decoder_head(cfg, channels, rngs=nnx.Rngs(3)),
                               load_vae(folder).decoder)
  torch_head = copy.deepcopy(torch_vae.decoder)
  torch_head.conv_out = torch.nn.Conv2d(CFG.block_out_channels[0], channels, 3, padding=1)
  with torch.no_grad():  # ours (kh, kw, in, out), torch (out, in, kh, kw)
    torch_head.conv_out.weight.copy_(torch.tensor(
        np.asarray(head.conv_out.kernel[...]).transpose(3, 2, 0, 1)))
    torch_head.conv_out.bias.copy_(torch.tensor(np.asarray(head.conv_out.bias[...])))
  z = torch.randn(2, CFG.latent_channels, 6, 10, generator=torch.Generator().manual_seed(5))
  out = jax.jit(lambda m, z: m(z))(head, jnp.asarray(nchw_to_nhwc(z)))
  assert out.shape == (2, 12, 20, channels) and out.dtype == cfg.dtype

  def torch_out(p):
    model = torch_reference(torch_head, p)
    with torch.no_grad():
      return nchw_to_nhwc(model(z.to(next(model.parameters()).dtype)).double())
  assert_parity(out, torch_out(precision), torch_out('float64'), precision)


def abstract_head(cfg, channels):
  # Shapes only: these tests never read conv_out, and eager initialisation is slow on CPU.
  return common.abstract(lambda rngs: decoder_head(cfg, channels, rngs=rngs))


def test_init_refuses_another_vae_configuration(vae_decoder):
  deeper = abstract_head(dataclasses.replace(CFG, layers_per_block=2), ALPHA_CHANNELS)
  with pytest.raises(ValueError, match='different parameters'):
    init_from_vae_decoder(deeper, vae_decoder)
  wider = abstract_head(dataclasses.replace(CFG, block_out_channels=(32, 96)), ALPHA_CHANNELS)
  with pytest.raises(ValueError, match='shape mismatch'):
    init_from_vae_decoder(wider, vae_decoder)


def test_init_casts_to_the_head_param_dtype(vae_decoder):
  head = abstract_head(dataclasses.replace(CFG, param_dtype=jnp.bfloat16), SHADOW_CHANNELS)
  init_from_vae_decoder(head, vae_decoder)
  source = params(vae_decoder)
  for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
    name = '.'.join(map(str, path))
    if not name.startswith('conv_out.'):
      assert var[...].dtype == jnp.bfloat16, name
      np.testing.assert_array_equal(np.asarray(var[...], np.float32),
                                    source[name].astype(jnp.bfloat16).astype(np.float32))


def test_to_unit_is_diffusers_denormalize():
  x = jnp.asarray([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
  np.testing.assert_allclose(to_unit(x), [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
  assert to_unit(x.astype(jnp.bfloat16)).dtype == jnp.float32
