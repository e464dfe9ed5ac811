"""The PyTorch decomposer (`layerjax.torch`) against the Flax one on the same weights, per module,
for the whole forward and for sampling: JAX fp32 vs PyTorch fp32, judged against the PyTorch
model in float64 (`assert_parity`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from conftest import assert_parity, torch_reference
from layerjax import flow
from layerjax.data import examples
from layerjax.infer import model as infer
from layerjax.models.shared import CONDITIONS
from layerjax.torch import modules, sampling
from layerjax.torch.backend import TorchBackend
from layerjax.torch.folder import load_components
from torch_utils import KINDS, exported

B, SIZE = 2, 32


@pytest.fixture(scope='module', params=KINDS)
def pair(request, tmp_path_factory):
  """kind, the JAX model (loaded from the packed folder), the export's TorchBackend and the
  float64 copy of its decomposer."""
  root = tmp_path_factory.mktemp(request.param)
  model, export = exported(root, request.param)
  backend = TorchBackend.from_pretrained(export)
  return (request.param, infer.load(model), backend,
          torch_reference(backend.decomposer, 'float64'))


def batch(loaded, seed=0) -> dict[str, np.ndarray]:
  """Random condition maps and the model's text inputs, NHWC numpy."""
  rng = np.random.default_rng(seed)
  maps = {k: rng.random((B, SIZE, SIZE, 3)).astype(np.float32)
          for k in CONDITIONS}
  return {**maps, **text_inputs(loaded)(['a ball', ''])}


def text_inputs(loaded):
  """`infer.text_inputs`, given the precomputed models' embeddings file."""
  return infer.text_inputs(loaded, loaded.config.model.text.embeddings or None)


def to_torch(x, dtype):
  x = torch.tensor(np.asarray(x))
  return x.to(dtype) if x.is_floating_point() else x


def nchw(batch: dict, dtype) -> dict[str, torch.Tensor]:
  return {k: to_torch(v, dtype).permute(0, 3, 1, 2) if k in CONDITIONS
          else to_torch(v, dtype) for k, v in batch.items()}


def judge(ours, run, precision='float32'):
  """`run(decomposer, dtype)` (torch, NCHW-like out as numpy NHWC) in `precision` and float64
  bound `ours` (JAX)."""
  def check(pair):
    _, _, backend, ref64 = pair
    low = torch_reference(backend.decomposer, precision)
    with torch.no_grad():
      assert_parity(ours, run(low, getattr(torch, precision)), run(ref64, torch.float64),
                    precision)
  return check


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.movedim(-3, -1).double().numpy()


def test_space_to_depth_keeps_jax_channel_order():
  """Channel (fy * f + fx) * 3 + c of cell (i, j) is pixel (f i + fy, f j + fx), colour c."""
  x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float64).reshape(2, 3, 8, 12)
  z = modules.space_to_depth(x, 4)
  assert z.shape == (2, 48, 2, 3)
  for fy, fx, c, i, j in [(0, 0, 0, 0, 0), (1, 3, 2, 1, 2), (3, 2, 1, 0, 1)]:
    assert z[1, (fy * 4 + fx) * 3 + c, i, j] == x[1, c, 4 * i + fy, 4 * j + fx]
  torch.testing.assert_close(modules.depth_to_space(z, 4), x, rtol=0, atol=0)


def test_scheduler_sigmas_are_flows():
  """diffusers' scheduler given uniform sigmas shifts them as `flow.sigmas` and appends 0."""
  for steps, shift in ((1, 1.0), (7, 3.0), (25, 3.0)):
    got = sampling.set_steps(FlowMatchEulerDiscreteScheduler(shift=shift), steps).numpy()
    t = np.linspace(1, 0, steps + 1)
    np.testing.assert_allclose(got, shift * t / (1 + (shift - 1) * t), rtol=1e-6, atol=0)
    np.testing.assert_allclose(got, flow.sigmas(steps, shift), rtol=1e-6, atol=0)


def test_every_component_loads_strictly(pair):
  kind, _, backend, _ = pair
  assert set(backend.loading_info) == {'transformer', 'layers', 'alpha_head', 'shadow_head'} | (
      {'text_encoder'} if kind == 'demo' else {'vae'})
  for name, info in backend.loading_info.items():
    assert not info['missing_keys'] and not info['unexpected_keys'], name
  # diffusers' own classes load their folders as diffusers would.
  for name, cls in (('transformer', SD3Transformer2DModel), ('vae', AutoencoderKL)):
    if name in backend.loading_info:
      _, info = cls.from_pretrained(backend.path / name, output_loading_info=True,
                                    low_cpu_mem_usage=False)
      assert not info['missing_keys'] and not info['unexpected_keys'], name
  _, built, infos = load_components(backend.path, dtype=torch.float64)
  assert all(p.dtype == torch.float64 for p in built['transformer'].parameters())
  assert infos.keys() == backend.loading_info.keys()


def test_text_inputs_are_the_jax_models(pair):
  _, loaded, backend, _ = pair
  texts = ['a ball', '', 'the ball on the right']
  want = text_inputs(loaded)(texts)
  emb = loaded.config.model.text.embeddings
  got = TorchBackend(backend.path, embeddings=emb or None).text_inputs(texts)
  assert got.keys() == want.keys()
  for k in got:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The export alone holds the empty text's embedding.
  np.testing.assert_array_equal(backend.text_inputs([''])[next(iter(got))],
                                infer.text_inputs(loaded)([''])[next(iter(got))])
  if emb:
    with pytest.raises(ValueError, match="text 'a ball': .* holds none for it"):
      backend.text_inputs(['a ball'])


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
def test_forward_parity(pair, precision):
  """The whole forward: conditions, text, the layer tokens, blocks, long skip, sample
  prediction (sigma 0.02 below SAMPLE_SIGMA_MIN); in bfloat16, JAX's and PyTorch's models
  loaded in it."""
  _, loaded, _, _ = pair
  b = batch(loaded)
  model = (loaded if precision == 'float32' else infer.load(loaded.source, dtype=precision)).model
  f, c = model.config.latent_factor, model.config.latent_channels
  k = len(model.config.layers)
  noisy = np.random.default_rng(1).standard_normal((B, k, SIZE // f, SIZE // f, c)).astype(
      np.float32)
  sigma = np.array([0.9, 0.02], np.float32)
  ctx, pooled = model.encode_text(b)
  ours = model(jnp.asarray(noisy), model.conditions(b), ctx, pooled, jnp.asarray(sigma))

  def run(dec, dtype):
    t = nchw(b, dtype)
    ctx, pooled = dec.encode_text(t)
    return nhwc(dec(to_torch(noisy, dtype).movedim(-1, 2), dec.conditions(t), ctx, pooled,
                    to_torch(sigma, torch.float32)))
  judge(ours, run, precision)(pair)


def test_text_parity(pair):
  _, loaded, _, _ = pair
  if loaded.model.config.text is None:
    pytest.skip('precomputed text: no encoder')
  tokens = batch(loaded)['text_tokens']
  ours = np.concatenate([np.asarray(a).reshape(B, -1) for a in
                         loaded.model.text_encoder(jnp.asarray(tokens))], 1)
  judge(ours, lambda dec, _: torch.cat([a.reshape(B, -1).double() for a in
                                        dec.text_encoder(torch.as_tensor(tokens))], 1))(pair)


@pytest.mark.parametrize('head', ['alpha', 'shadow'])
def test_head_parity(pair, head):
  _, loaded, _, _ = pair
  model, b = loaded.model, batch(loaded)
  f, c = model.config.latent_factor, model.config.latent_channels
  z = np.random.default_rng(2).standard_normal((B, SIZE // f, SIZE // f, c)).astype(np.float32)
  ours = getattr(model, head)(jnp.asarray(z), model.head_pixels(b))

  def run(dec, dtype):
    module = dec.alpha_head if head == 'alpha' else dec.shadow_head
    return nhwc(module(to_torch(z, dtype).movedim(-1, 1), dec.head_pixels(nchw(b, dtype))))
  judge(ours, run)(pair)


def test_latents_parity(pair):
  """encode then decode: space-to-depth (exact up to 2x - 1) or the VAE."""
  _, loaded, _, _ = pair
  model, image = loaded.model, batch(loaded)['image']
  ours = model.latents.decode(model.latents.encode(jnp.asarray(image)))
  judge(ours, lambda dec, dtype: nhwc(dec.decode(dec.encode(
      to_torch(image, dtype).permute(0, 3, 1, 2)))))(pair)


@pytest.mark.parametrize('guidance', [1.0, 2.5])
def test_sampling_parity(pair, guidance):
  """`flow.decompose` and `TorchBackend.sample` on the same batch, noise and steps give the
  same layers and recomposition, bound by the float64 run of the PyTorch sampler."""
  kind, loaded, backend, ref64 = pair
  if kind == 'sd35' and guidance != 1:
    pytest.skip('guidance is checked on the demo and SD3 structures')
  model, b = loaded.model, batch(loaded)
  cfg, steps, shift = model.config, 3, float(loaded.config.loss.shift)
  uncond = (examples.unconditional_inputs(b, infer.text_inputs(loaded)([''])) if guidance != 1
            else None)
  rng = jax.random.key(5)
  f = cfg.latent_factor
  # `flow.sample_latents`' own draw, handed to PyTorch.
  noise = np.asarray(jax.random.normal(rng, (B, len(cfg.layers), SIZE // f, SIZE // f,
                                             cfg.latent_channels), jnp.float32))
  ours = flow.decompose(model, b, rng, steps, shift, guidance, uncond)
  got = backend.decode(backend.sample(b, uncond, noise, steps, guidance), b)
  b64 = nchw(b, torch.float64)
  latents = sampling.sample_latents(
      ref64, backend.scheduler, b64, torch.tensor(noise).permute(0, 1, 4, 2, 3), steps,
      guidance, None if uncond is None else nchw(uncond, torch.float64))
  ref = sampling.decode_layers(ref64, latents, ref64.head_pixels(b64), b64['checkerboard']
                               if 'checkerboard' in cfg.conditions else None)
  assert set(got) == set(ours) == set(cfg.layers) | {'recomposition'}
  for name in got:
    assert got[name].dtype == np.float32 and got[name].shape == ours[name].shape, name
    assert_parity(ours[name], got[name], ref[name])
