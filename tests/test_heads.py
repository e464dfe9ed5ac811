"""Alpha / shadow decoder heads: shapes, initialisation from the VAE decoder, output range."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
