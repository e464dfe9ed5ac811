"""diffusers <-> layerjax conversion: round trips, dtypes, sharding, the CLI, and bad input."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import SD3Transformer2DModel as TorchSD3

from conftest import randomize_
from layerjax.convert import __main__ as cli
from layerjax.convert import diffusers as conv
from layerjax.convert.files import INDEX, WEIGHTS
from test_mmdit import SD35_SMALL, inputs, torch_forward

VAE_SMALL = dict(block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',) * 2,
                 up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1,
                 norm_num_groups=8, latent_channels=16, use_quant_conv=False,
                 use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)


@pytest.fixture(scope='module')
def torch_sd35():
  return randomize_(TorchSD3(**SD35_SMALL).eval(), seed=3)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory, torch_sd35):
  """A pipeline-shaped folder with transformer/ and vae/ subfolders."""
  root = tmp_path_factory.mktemp('pipeline')
  torch_sd35.save_pretrained(root / 'transformer')
  vae = randomize_(TorchVAE(**VAE_SMALL).eval(), seed=4, std=0.1)
  vae.save_pretrained(root / 'vae')
  return root, vae


def state_dicts_equal(a, b):
  a, b = a.state_dict(), b.state_dict()
  assert a.keys() == b.keys()
  for k in a:
    torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_transformer_round_trip_sharded(tmp_path, pipeline, torch_sd35):
  root, _ = pipeline
  model = conv.load_transformer(root)  # pipeline folder: picks transformer/
  # Held stacked: blocks 0-1 (dual attention) in one group, the last block in another.
  assert {k: v.attn.to_q.kernel.shape[0] for k, v in model.transformer_blocks.items()} == {
      '0': 2, '2': 1}
  out = conv.save_transformer(model, tmp_path / 'export', max_shard_size=20_000)
  files = sorted(p.name for p in out.iterdir())
  assert INDEX in files and sum(f.endswith('.safetensors') for f in files) > 1
  back, info = TorchSD3.from_pretrained(out, output_loading_info=True)
  assert info['missing_keys'] == [] and info['unexpected_keys'] == []
  state_dicts_equal(back, torch_sd35)
  x, c, p, t = inputs(SD35_SMALL)
  np.testing.assert_array_equal(torch_forward(back.eval(), x, c, p, t),
                                torch_forward(torch_sd35, x, c, p, t))


def test_vae_round_trip(tmp_path, pipeline):
  root, ref = pipeline
  vae = conv.load_vae(root / 'vae')
  out = conv.save_vae(vae, tmp_path / 'vae')
  back, info = TorchVAE.from_pretrained(out, output_loading_info=True)
  assert info['missing_keys'] == [] and info['unexpected_keys'] == []
  state_dicts_equal(back, ref)
  assert back.config.shift_factor == ref.config.shift_factor
  assert back.config.scaling_factor == ref.config.scaling_factor


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_sources_load(tmp_path, torch_sd35, dtype):
  half = TorchSD3(**SD35_SMALL).to(dtype)
  half.load_state_dict(torch_sd35.state_dict())
  half.save_pretrained(tmp_path)
  model = conv.load_transformer(tmp_path)
  kernel = model.transformer_blocks['0'].attn.to_q.kernel[...]  # blocks 0 and 1
  assert kernel.dtype == jnp.float32
  for i in range(2):
    want = half.transformer_blocks[i].attn.to_q.weight.detach().float().numpy().T
    np.testing.assert_array_equal(kernel[i], want)


def test_cli_round_trip(tmp_path, pipeline, torch_sd35, capsys):
  root, ref_vae = pipeline
  assert cli.main(['from-diffusers', str(root), str(tmp_path / 'orbax')]) == 0
  printed = capsys.readouterr().out
  n_params = sum(p.numel() for p in torch_sd35.parameters())
  assert f'transformer: {n_params:,} parameters' in printed
  assert 'vae: ' in printed
  assert cli.main(['to-diffusers', str(tmp_path / 'orbax'), str(tmp_path / 'back'),
                   '--max-shard-size', '30KB']) == 0
  back, info = TorchSD3.from_pretrained(tmp_path / 'back' / 'transformer',
                                        output_loading_info=True)
  assert info['missing_keys'] == [] and info['unexpected_keys'] == []
  state_dicts_equal(back, torch_sd35)
  state_dicts_equal(TorchVAE.from_pretrained(tmp_path / 'back' / 'vae'), ref_vae)


def test_export_dtype_cast(tmp_path, pipeline):
  model = conv.load_transformer(pipeline[0])
  assert cli.main(['from-diffusers', str(pipeline[0] / 'transformer'), str(tmp_path / 'o')]) == 0
  assert cli.main(['to-diffusers', str(tmp_path / 'o'), str(tmp_path / 'bf16'),
                   '--dtype', 'bfloat16']) == 0
  back = TorchSD3.from_pretrained(tmp_path / 'bf16', torch_dtype=torch.bfloat16)
  assert back.pos_embed.proj.weight.dtype == torch.bfloat16
  want = np.asarray(model.pos_embed.proj.kernel[...]).transpose(3, 2, 0, 1)
  np.testing.assert_allclose(back.pos_embed.proj.weight.detach().float().numpy(), want, rtol=1e-2)


# --- bad input ----------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path, pipeline):
  dst = tmp_path / 'model'
  shutil.copytree(pipeline[0] / 'transformer', dst)
  return dst


def rewrite(folder, edit):
  from safetensors.torch import load_file, save_file
  tensors = load_file(folder / WEIGHTS)
  edit(tensors)
  save_file(tensors, folder / WEIGHTS)


def test_missing_tensor_is_named(folder):
  rewrite(folder, lambda t: t.pop('transformer_blocks.1.attn.to_k.bias'))
  with pytest.raises(conv.CheckpointMismatch, match=r'missing_keys \(1\).*to_k\.bias'):
    conv.load_transformer(folder)


def test_unexpected_tensor_is_named(folder):
  rewrite(folder, lambda t: t.update(extra_weight=torch.zeros(3)))
  with pytest.raises(conv.CheckpointMismatch, match=r"unexpected_keys \(1\).*extra_weight"):
    conv.load_transformer(folder)


def test_shape_mismatch_names_key_and_shapes(folder):
  rewrite(folder, lambda t: t.update({'context_embedder.weight': torch.zeros(32, 25)}))
  with pytest.raises(conv.CheckpointMismatch,
                     match=r"context_embedder\.weight.*\(32, 25\).*\(32, 24\)"):
    conv.load_transformer(folder)


def test_config_mismatch(folder):
  config = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(dict(config, num_layers=2)))
  with pytest.raises(conv.CheckpointMismatch, match='unexpected_keys'):
    conv.load_transformer(folder)


def test_corrupt_safetensors_names_file(folder):
  data = (folder / WEIGHTS).read_bytes()
  (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=f'{WEIGHTS}.*safetensors'):
    conv.load_transformer(folder)


def test_malformed_config_names_file(folder):
  (folder / 'config.json').write_text('{"num_layers": 3,')
  with pytest.raises(ValueError, match='config.json: not valid JSON'):
    conv.load_transformer(folder)


def test_wrong_class_is_refused(folder):
  config = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(dict(config, _class_name='UNet2DModel')))
  with pytest.raises(conv.CheckpointMismatch, match='UNet2DModel'):
    conv.load_transformer(folder)


def test_pickles_are_not_loaded(folder):
  (folder / WEIGHTS).rename(folder / 'diffusion_pytorch_model.bin')
  with pytest.raises(FileNotFoundError, match='pickled weights are not loaded'):
    conv.load_transformer(folder)


def test_missing_shard_is_named(tmp_path, pipeline):
  model = conv.load_transformer(pipeline[0])
  out = conv.save_transformer(model, tmp_path / 'sharded', max_shard_size=20_000)
  shard = sorted(out.glob('*-of-*.safetensors'))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f'shard {shard.name} is missing'):
    conv.load_transformer(out)


def test_not_a_model_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a diffusers model folder'):
    conv.load_transformer(tmp_path)
  assert cli.main(['from-diffusers', str(tmp_path), str(tmp_path.parent / 'x')]) == 2


def test_failed_export_keeps_previous_folder(tmp_path, pipeline, monkeypatch):
  model = conv.load_transformer(pipeline[0])
  out = conv.save_transformer(model, tmp_path / 'export')
  before = {p.name: p.read_bytes() for p in out.iterdir()}

  def boom(*a, **k):
    raise OSError('disk full')
  monkeypatch.setattr('layerjax.convert.files.save_file', boom)
  with pytest.raises(OSError, match='disk full'):
    conv.save_transformer(model, out, overwrite=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ['export']
