"""Where parameters and batches are placed (the PartitionSpecs name the intended mesh axes),
and what the diffusers converter does to each weight (element by element on hand-built
tensors, every key mapped)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import SD3Transformer2DModel as TorchSD3
from flax import nnx
from jax.sharding import PartitionSpec as P

from layerjax import parallel
from layerjax.convert import diffusers as conv
from layerjax.models import common, mmdit
from layerjax.models.vae import AutoencoderKL, VAEConfig

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake CPU) devices')

# The intended placement (Megatron-style FSDP x tensor parallelism): a weight's model width
# ('embed', and a conv's output 'channels') is split over fsdp; attention heads, MLP hidden
# units and adaLN modulation over tensor (column-parallel in, row-parallel out); the text
# encoder's width ('joint') and unnamed axes are replicated; a batch is split over data, then
# fsdp.
# Blocks 0-1 (dual attention) are held stacked, their leading axis ('layers') replicated.
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=4, joint_attention_dim=12, caption_projection_dim=32,
           pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8, qk_norm='rms_norm',
           dual_attention_layers=(0, 1))
VAE = dict(block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',) * 2,
           up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=8,
           latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
           shift_factor=0.0609, scaling_factor=1.5305)


@needs_8
@pytest.mark.parametrize('shape', [(1, 4, 2), (2, 2, 2)])
def test_logical_axes_map_to_the_intended_mesh_axes(shape):
  mesh = parallel.make_mesh(shape)
  spec = lambda axes, dims: parallel.logical_to_spec(axes, dims, mesh)
  assert spec(('embed', 'heads'), (32, 32)) == P('fsdp', 'tensor')      # q, k, v
  assert spec(('heads', 'embed'), (32, 32)) == P('tensor', 'fsdp')      # attention out
  assert spec(('embed', 'mlp'), (32, 128)) == P('fsdp', 'tensor')
  assert spec(('mlp', 'embed'), (128, 32)) == P('tensor', 'fsdp')
  assert spec(('embed', 'modulation'), (32, 192)) == P('fsdp', 'tensor')
  assert spec(('joint', 'embed'), (12, 32)) == P(None, 'fsdp')
  assert spec((None, None, None, 'channels'), (3, 3, 8, 32)) == P(None, None, None, 'fsdp')
  assert spec(('heads',), (32,)) == P('tensor')
  assert spec((None,), (8,)) == P(None)
  # activations: the batch takes data and fsdp, so the width cannot take fsdp again
  assert spec(('batch', 'length', 'embed'), (8, 5, 32)) == P(('data', 'fsdp'), None, None)
  # a dimension the mesh axes do not divide is replicated
  assert spec(('embed', 'mlp'), (7, 8)) == P(None, 'tensor')
  assert spec(('batch', None), (6, 3)) == P(None, None)
  # batches (where each row lands: tests/test_pipeline.py)
  assert parallel.batch_sharding(mesh, 3).spec == P(('data', 'fsdp'), None, None)


def _name(path) -> str:
  return '.'.join(map(str, path))


def numbered(build) -> nnx.Module:
  """The model `build(rngs)` makes, its parameters 0, 1, 2, ... (no random initialisation)."""
  graphdef, state = nnx.split(common.abstract(build))
  for _, var in nnx.to_flat_state(state):
    var.set_value(jnp.arange(var.size, dtype=var.dtype).reshape(var.shape))
  return nnx.merge(graphdef, state)


@needs_8
def test_model_parameters_are_placed_on_the_intended_axes():
  """The MMDiT and the VAE sharded on a (data 1, fsdp 4, tensor 2) mesh: named parameters
  carry the intended specs, and each device holds the matching block of the weight."""
  mesh = parallel.make_mesh((1, 4, 2))
  transformer = parallel.shard_model(numbered(
      lambda rngs: mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(**SD3), rngs=rngs)), mesh)
  vae = parallel.shard_model(numbered(lambda rngs: AutoencoderKL(VAEConfig(
      block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, layers_per_block=1,
      sample_size=16), rngs=rngs)), mesh)
  intended = {  # blocks by group: 'transformer_blocks.0' holds blocks 0 and 1 stacked
      'transformer_blocks.0.attn.to_q.kernel': P(None, 'fsdp', 'tensor'),
      'transformer_blocks.0.attn.to_q.bias': P(None, 'tensor'),
      'transformer_blocks.2.attn.add_k_proj.kernel': P(None, 'fsdp', 'tensor'),
      'transformer_blocks.0.attn2.to_v.kernel': P(None, 'fsdp', 'tensor'),
      'transformer_blocks.0.attn.to_out.0.kernel': P(None, 'tensor', 'fsdp'),
      'transformer_blocks.0.attn.to_out.0.bias': P(None, 'fsdp'),
      'transformer_blocks.0.ff.net.0.proj.kernel': P(None, 'fsdp', 'tensor'),
      'transformer_blocks.0.ff.net.2.kernel': P(None, 'tensor', 'fsdp'),
      'transformer_blocks.0.norm1.linear.kernel': P(None, 'fsdp', 'tensor'),
      'transformer_blocks.0.attn.norm_q.scale': P(None, None),
      'context_embedder.kernel': P(None, 'fsdp'),
      'pos_embed.proj.kernel': P(None, None, None, 'fsdp'),
      'proj_out.kernel': P('fsdp', None),
      'vae.encoder.conv_in.kernel': P(None, None, None, 'fsdp'),
      'vae.encoder.conv_in.bias': P('fsdp'),
      'vae.decoder.up_blocks.0.resnets.0.conv1.kernel': P(None, None, None, 'fsdp'),
      'vae.decoder.conv_norm_out.scale': P(None),
  }
  params = {_name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(transformer))}
  params.update({f'vae.{_name(p)}': v[...] for p, v in nnx.to_flat_state(nnx.state(vae))})
  for name, want in intended.items():
    assert params[name].sharding.spec == want, (name, params[name].sharding.spec)
  q = params['transformer_blocks.0.attn.to_q.kernel']
  assert q.sharding.shard_shape(q.shape) == (2, 32 // 4, 32 // 2)
  # the device at mesh position (0, f, t) holds rows 8 f.. and columns 16 t.. of both blocks'
  # 0, 1, 2, ...
  full = np.arange(2 * 32 * 32).reshape(2, 32, 32)
  for shard in q.addressable_shards:
    (_, f, t), = np.argwhere(mesh.devices == shard.device)
    np.testing.assert_array_equal(shard.data, full[:, 8 * f:8 * f + 8, 16 * t:16 * t + 16])


# --- the converter --------------------------------------------------------------------------


def hand_built(torch_model) -> dict[str, np.ndarray]:
  """Every tensor of the diffusers model filled with distinct values: tensor n holds
  n * 2**16 + (0, 1, 2, ...) in its own (PyTorch) layout, exact in float32."""
  out = {}
  for n, (key, t) in enumerate(sorted(torch_model.state_dict().items())):
    assert t.numel() < 2**16 and n < 2**8
    out[key] = (n * 2**16 + np.arange(t.numel())).reshape(tuple(t.shape)).astype(np.float32)
  return out


def diffusers_key(path) -> str:
  """Our parameter path -> diffusers' key: joined by '.', `kernel` and `scale` -> `weight`."""
  *head, leaf = map(str, path)
  return '.'.join([*head, 'weight' if leaf in ('kernel', 'scale') else leaf])


def per_block(path, x) -> list[tuple[tuple, np.ndarray]]:
  """Our variable -> its (path, value) per block: the MMDiT's group of blocks keyed by its
  first block's index holds block `start + j` at [j]."""
  path = tuple(map(str, path))
  if path[0] != 'transformer_blocks':
    return [(path, x)]
  return [(('transformer_blocks', str(int(path[1]) + j), *path[2:]), x[j])
          for j in range(len(x))]


def per_block_state(model) -> list[tuple[tuple, np.ndarray]]:
  return [item for path, var in nnx.to_flat_state(nnx.state(model))
          for item in per_block(path, np.asarray(var[...]))]


@pytest.fixture(scope='module', params=['transformer', 'vae'])
def converted(request):
  """(diffusers model, its hand-built tensors, our model loaded from them)."""
  if request.param == 'transformer':
    ref, model_kind = TorchSD3(**SD3), conv.TRANSFORMER
  else:
    ref, model_kind = TorchVAE(**VAE), conv.kind('vae')
  tensors = hand_built(ref)
  cfg = model_kind.config_from_diffusers(dict(ref.config), dtype=jnp.float32,
                                         param_dtype=jnp.float32)
  graphdef, state = conv.abstract_model(model_kind, cfg)
  model = conv.fill_from_state_dict(graphdef, state, tensors, 'hand-built', jnp.float32)
  return ref, tensors, model


def test_every_diffusers_key_maps_to_one_parameter(converted):
  _, tensors, model = converted
  ours = [diffusers_key(p) for p, _ in per_block_state(model)]
  assert len(ours) == len(set(ours))
  assert set(ours) == set(tensors)


def test_layouts_element_by_element(converted):
  """Linear weight [out, in] -> kernel [in, out]; conv weight [out, in, kh, kw] -> kernel
  [kh, kw, in, out]; everything else unchanged."""
  _, tensors, model = converted
  checked = {2: 0, 4: 0}
  for path, ours in per_block_state(model):
    theirs = tensors[diffusers_key(path)]
    if path[-1] == 'kernel' and ours.ndim == 4:
      assert ours.shape == (theirs.shape[2], theirs.shape[3], theirs.shape[1], theirs.shape[0])
      for o, i, y, x in np.ndindex(theirs.shape):
        assert ours[y, x, i, o] == theirs[o, i, y, x], (path, o, i, y, x)
      checked[4] += 1
    elif path[-1] == 'kernel':
      assert ours.shape == theirs.shape[::-1]
      for o, i in np.ndindex(theirs.shape):
        assert ours[i, o] == theirs[o, i], (path, o, i)
      checked[2] += 1
    else:
      np.testing.assert_array_equal(ours, theirs, err_msg=str(path))
  assert checked[4] and (checked[2] or 'encoder.conv_in.kernel' not in tensors)


def test_export_gives_back_the_diffusers_tensors(converted):
  """Our model exported: the same tensors, which the diffusers model loads strictly (so a
  conv weight is where PyTorch reads it: weight[o, i, y, x] = kernel[y, x, i, o])."""
  ref, tensors, model = converted
  exported = conv.torch_state_dict(model)
  assert exported.keys() == tensors.keys()
  for key, t in tensors.items():
    np.testing.assert_array_equal(exported[key], t, err_msg=key)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  conv_path = ('pos_embed', 'proj') if isinstance(ref, TorchSD3) else ('encoder', 'conv_in')
  kernel = np.asarray(nnx.state(model)[conv_path[0]][conv_path[1]]['kernel'][...])
  weight = getattr(getattr(ref, conv_path[0]), conv_path[1]).weight.detach().numpy()
  assert weight[1, 2, 0, 1] == kernel[0, 1, 2, 1]
