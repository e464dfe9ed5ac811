"""`python -m layerjax.convert to-pytorch / from-pytorch`: the export's layout, the round trip
bit for bit, sharding and the bad inputs (the export run with JAX unimportable:
test_torch_pipeline.py)."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from layerjax.convert.__main__ import main
from layerjax.infer import model as infer
from layerjax.torch.backend import TorchBackend
from layerjax.torch.folder import ExportError
from torch_utils import exported, packed


@pytest.fixture(scope='module', params=['demo', 'sd3'])
def export(request, tmp_path_factory):
  """(kind, packed model, its export)."""
  root = tmp_path_factory.mktemp(request.param)
  return (request.param, *exported(root, request.param))


def weights(folder) -> dict[str, np.ndarray]:
  return load_file(str(folder / infer.WEIGHTS))


def assert_same_model(a, b):
  """Every tensor of weights.safetensors identical, dtype included; the same metadata."""
  wa, wb = weights(a), weights(b)
  assert wa.keys() == wb.keys()
  for k in wa:
    assert wa[k].dtype == wb[k].dtype, k
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  assert json.loads((a / infer.META).read_text()) == json.loads((b / infer.META).read_text())
  text = [sorted(f.name for f in p.glob(infer.TEXT)) for p in (a, b)]
  assert text[0] == text[1]
  if text[0]:
    ta, tb = load_file(str(a / infer.TEXT)), load_file(str(b / infer.TEXT))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_layout(export):
  kind, _, dst = export
  index = json.loads((dst / 'model_index.json').read_text())
  assert index['_class_name'] == 'LayerDecomposerPipeline'
  want = {'transformer': ['diffusers', 'SD3Transformer2DModel'],
          'layers': ['layerjax.torch', 'LayerEmbedding'],
          'scheduler': ['diffusers', 'FlowMatchEulerDiscreteScheduler']}
  head = 'ConvHead' if kind == 'demo' else 'DecoderHead'
  want.update({h: ['layerjax.torch', head] for h in ('alpha_head', 'shadow_head')})
  want.update({'text_encoder': ['layerjax.torch', 'ByteTextEncoder']} if kind == 'demo' else
              {'vae': ['diffusers', 'AutoencoderKL']})
  assert {k: v for k, v in index.items() if not k.startswith('_')} == want
  meta = json.loads((dst / 'decomposer.json').read_text())
  assert meta['format'] == 'layerjax.decomposer-pytorch/1'
  assert meta['step'] == 7 and meta['source'] == f'random {kind}'
  assert meta['config']['loss']['shift'] == 3.0 and meta['model']['latents'] == (
      'space_to_depth' if kind == 'demo' else 'vae')
  scheduler = json.loads((dst / 'scheduler/scheduler_config.json').read_text())
  assert scheduler['_class_name'] == 'FlowMatchEulerDiscreteScheduler'
  assert scheduler['shift'] == 3.0
  assert (dst / 'text.safetensors').is_file() == (kind != 'demo')
  files = {p.suffix for p in dst.rglob('*') if p.is_file()}
  assert files == {'.json', '.safetensors'}  # no pickles


def test_round_trip_is_bit_for_bit(export, tmp_path, capsys):
  _, model, dst = export
  assert main(['from-pytorch', str(dst), str(tmp_path / 'back')]) == 0, capsys.readouterr().err
  assert_same_model(model, tmp_path / 'back')


def test_round_trip_of_bfloat16_weights_and_a_sharded_export(tmp_path, capsys):
  """A model packed in bfloat16, exported in shards of at most 4 KB: each component sharded,
  loaded strictly, and back to the same bfloat16 tensors."""
  model = packed(tmp_path, 'demo')
  half = infer.save(infer.load(model, dtype='bfloat16'), tmp_path / 'half')
  dst = tmp_path / 'torch'
  assert main(['to-pytorch', str(half), str(dst), '--max-shard-size', '4KB']) == 0, (
      capsys.readouterr().err)
  index = json.loads((dst / 'transformer/diffusion_pytorch_model.safetensors.index.json')
                     .read_text())
  assert len(set(index['weight_map'].values())) > 3
  backend = TorchBackend.from_pretrained(dst)
  assert backend.decomposer.dtype == torch.bfloat16
  assert all(not i['missing_keys'] and not i['unexpected_keys']
             for i in backend.loading_info.values())
  assert main(['from-pytorch', str(dst), str(tmp_path / 'back')]) == 0
  assert weights(tmp_path / 'back')['layer_embed'].dtype == ml_dtypes.bfloat16
  assert_same_model(half, tmp_path / 'back')


def test_dtype_cast_export(export, tmp_path):
  _, model, _ = export
  dst = tmp_path / 'fp16'
  assert main(['to-pytorch', str(model), str(dst), '--dtype', 'float16']) == 0
  assert load_file(str(dst / 'transformer/diffusion_pytorch_model.safetensors'))[
      'proj_out.weight'].dtype == np.float16
  want = weights(model)['transformer/proj_out/kernel'].T.astype(np.float16)
  got = TorchBackend.from_pretrained(dst).decomposer.transformer.proj_out.weight
  np.testing.assert_array_equal(got.detach().numpy(), want)


def corrupt(src, dst, component, name, change):
  """A copy of the export `src` at `dst` with tensor `name` of `component` replaced by
  `change(tensor)`; returns the file changed."""
  shutil.copytree(src, dst)
  path = dst / component / 'diffusion_pytorch_model.safetensors'
  tensors = load_file(str(path))
  tensors[name] = change(tensors[name])
  save_file(tensors, str(path), metadata={'format': 'pt'})
  return path


def with_nan(x):
  x = x.copy()
  x.reshape(-1)[0] = np.nan
  return x


def test_bad_inputs(export, tmp_path, capsys):
  """Each refused with one line naming the file and the tensor, exit 2, nothing written."""
  kind, model, dst = export

  def refused(args, pattern):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err

  back = str(tmp_path / 'back')
  refused(['from-pytorch', str(model), back],
          f"{model}/decomposer.json: format 'layerjax.decomposer/1'; not a layerjax PyTorch "
          'export')
  (tmp_path / 'empty').mkdir()
  refused(['from-pytorch', str(tmp_path / 'empty'), back],
          f'{tmp_path}/empty/decomposer.json: missing')
  newer = tmp_path / 'newer'
  shutil.copytree(dst, newer)
  meta = json.loads((newer / 'decomposer.json').read_text())
  (newer / 'decomposer.json').write_text(json.dumps({**meta, 'format':
                                                     'layerjax.decomposer-pytorch/2'}))
  refused(['from-pytorch', str(newer), back], 'was written by a newer layerjax')
  path = corrupt(dst, tmp_path / 'shape', 'layers', 'layer_embed', lambda x: x[:, :-1])
  refused(['from-pytorch', str(tmp_path / 'shape'), back],
          f"{path}: tensor 'layer_embed' has shape")
  with pytest.raises(ExportError, match=f"^{path}: tensor 'layer_embed' has shape"):
    TorchBackend.from_pretrained(tmp_path / 'shape')
  path = corrupt(dst, tmp_path / 'nan', 'transformer', 'proj_out.weight', with_nan)
  refused(['from-pytorch', str(tmp_path / 'nan'), back],
          f"{path}: tensor 'proj_out.weight' has 1 NaN and 0 Inf")
  with pytest.raises(ExportError, match=f"^{path}: tensor 'proj_out.weight' has 1 NaN"):
    TorchBackend.from_pretrained(tmp_path / 'nan')
  assert not (tmp_path / 'back').exists()
  # A NaN in the model: refused before anything is written.
  nan_model = tmp_path / 'nan_model'
  shutil.copytree(model, nan_model)
  w = weights(nan_model)
  w['transformer/proj_out/kernel'] = with_nan(w['transformer/proj_out/kernel'])
  save_file(w, str(nan_model / infer.WEIGHTS))
  refused(['to-pytorch', str(nan_model), str(tmp_path / 'out')],
          f"export to {tmp_path}/out/transformer: tensor 'proj_out.weight' has 1 NaN")
  assert not (tmp_path / 'out').exists()
  # An existing export is replaced only with --overwrite; neither command writes inside
  # what it reads.
  refused(['to-pytorch', str(model), str(dst)], '--overwrite')
  refused(['to-pytorch', str(model), str(model / 'torch')], 'must not be, contain or lie inside')
  refused(['from-pytorch', str(dst), str(dst / 'back')], 'must not be, contain or lie inside')


def test_noise_is_drawn_in_the_torch_layout(export):
  _, _, dst = export
  backend = TorchBackend.from_pretrained(dst)
  got = backend.noise(11, (2, 3, 4, 5, 6))
  want = torch.randn((2, 3, 6, 4, 5), generator=torch.Generator().manual_seed(11))
  assert got.dtype == np.float32 and got.shape == (2, 3, 4, 5, 6)
  np.testing.assert_array_equal(got, want.permute(0, 1, 3, 4, 2).numpy())


@pytest.mark.slow
def test_a_training_workdir_exports(trained_workdirs, tmp_path):
  """to-pytorch reads a workdir as `infer.model.load` does: its latest EMA weights."""
  _, workdir = trained_workdirs('pixels')
  assert main(['to-pytorch', str(workdir), str(tmp_path / 'torch')]) == 0
  assert main(['from-pytorch', str(tmp_path / 'torch'), str(tmp_path / 'back')]) == 0
  infer.pack(workdir, tmp_path / 'packed')
  assert_same_model(tmp_path / 'packed', tmp_path / 'back')
