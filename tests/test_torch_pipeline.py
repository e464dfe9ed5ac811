"""`LayerDecomposerPipeline`: what a PyTorch user calls, end to end, against the JAX
`Decomposer` on the same export (tiny random models: what is tested is that both frameworks
give the same layers from the same photo, prompt and noise, not the layers' quality)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_parity, torch_reference
from layerjax.data.schema import composite, to_uint8
from layerjax.infer.decomposer import Decomposer
from layerjax.infer.prompts import PromptError, Query
from layerjax.torch import LayerDecomposerPipeline
from torch_utils import exported

H, W = 45, 70  # neither the model's 32 x 32 nor its aspect: the geometry runs too
BOX = (12, 8, 40, 33)


def photo() -> np.ndarray:
  yy, xx = np.mgrid[0:H, 0:W] / 50.0
  bg = np.stack([0.3 + 0.4 * yy, 0.5 + 0 * xx, 0.7 - 0.3 * xx], -1)
  disc = (np.hypot(xx * 50 - 26, yy * 50 - 20) < 9)[..., None]
  return np.where(disc, (0.9, 0.2, 0.1), bg).astype(np.float32)


@pytest.fixture(scope='module', params=['demo', 'sd3'])
def models(request, tmp_path_factory):
  """(kind, JAX decomposer of the packed model, its PyTorch pipeline in fp32, the same
  pipeline with its network in float64 (`torch_reference`), the export folder)."""
  packed, export = exported(tmp_path_factory.mktemp(request.param), request.param)
  # The SD3-shaped model reads precomputed text embeddings: the texts' come from a file.
  pipe = LayerDecomposerPipeline.from_pretrained(export,
                                                 embeddings=export.parent / 'emb.safetensors')
  pipe64 = LayerDecomposerPipeline.from_pretrained(export)
  pipe64.backend.decomposer = torch_reference(pipe64.backend.decomposer, 'float64')
  return request.param, Decomposer.load(packed), pipe, pipe64, export


def seen(layer) -> np.ndarray:
  """What a layer shows: premultiplied colour and opacity. (Its straight colour where it is
  nearly transparent is a division by the opacity that no one sees, and amplifies rounding.)"""
  return np.concatenate([layer.rgba[..., :3] * layer.rgba[..., 3:], layer.rgba[..., 3:]], -1)


def assert_same_layers(ours, torch32, ref64):
  """The JAX sample and the fp32 pipeline's agree layer by layer, judged against the pipeline
  whose network runs in float64 (`assert_parity`); names, kinds and owners exactly. Every step
  around the network is the same numpy code in all three."""
  describe = lambda s: [(l.name, l.kind, l.owner) for l in s.layers]
  assert describe(ours) == describe(torch32) == describe(ref64)
  for a, b, c in zip(ours.layers, torch32.layers, ref64.layers):
    print(a.name, end=' ')
    assert_parity(seen(a), seen(b), seen(c))


def test_a_box_prompt_gives_the_jax_layers(models):
  _, jax_d, pipe, pipe64, export = models
  image = photo()
  got = pipe(image, box=BOX, num_inference_steps=3)
  ref = pipe64(image, box=BOX, num_inference_steps=3)
  # The JAX model sampled from the noise the pipeline draws for seed 0.
  ours = jax_d.decompose(image, Query(box=BOX), steps=3, noise=pipe.backend.noise)
  assert_same_layers(ours, got, ref)
  np.testing.assert_allclose(composite(got.layers)[..., :3], image, atol=1e-4)
  assert got.provenance['model'] == str(export) and got.provenance['step'] == 7
  assert got.provenance['steps'] == 3 and got.prompts[0].box == BOX


def test_guidance_gives_the_jax_layers(models):
  kind, jax_d, pipe, pipe64, _ = models
  if kind == 'demo':
    with pytest.raises(ValueError, match='trained without condition dropout'):
      pipe(photo(), box=BOX, guidance_scale=2.0)
    return
  image = photo()
  got, ref = (p(image, box=BOX, num_inference_steps=2, guidance_scale=2.0)
              for p in (pipe, pipe64))
  ours = jax_d.decompose(image, Query(box=BOX), steps=2, guidance=2.0, noise=pipe.backend.noise)
  assert got.provenance['guidance'] == 2.0
  assert_same_layers(ours, got, ref)


def test_the_whole_scene_gives_the_jax_layers(models):
  _, jax_d, pipe, pipe64, _ = models
  image = photo()
  got, ref = (p(image, num_inference_steps=2, max_layers=2) for p in (pipe, pipe64))
  ours = jax_d.decompose(image, steps=2, max_layers=2, noise=pipe.backend.noise)
  assert len(got.provenance['whole_scene']['objects']) >= 1
  assert_same_layers(ours, got, ref)


def test_noise_from_a_generator_or_given_as_latents(models):
  kind, _, pipe, _, _ = models
  image = photo()
  seeded = pipe(image, box=BOX, seed=3, num_inference_steps=2)
  # A generator seeded with 3 draws what seed 3 draws: the same layers.
  drawn = pipe(image, box=BOX, generator=torch.Generator().manual_seed(3), num_inference_steps=2)
  for a, b in zip(seeded.layers, drawn.layers):
    np.testing.assert_array_equal(a.rgba, b.rgba)
  # The same noise handed over as latents, in the torch layout [1, K, C, h, w].
  shapes = []
  pipe.decomposer.decompose(image, Query(box=BOX), steps=2,
                            noise=lambda s, shape: shapes.append(shape) or np.zeros(shape))
  b, k, h, w, c = shapes[0]
  latents = torch.randn((b, k, c, h, w), generator=torch.Generator().manual_seed(3))
  given = pipe(image, box=BOX, latents=latents, num_inference_steps=2)
  for a, b in zip(seeded.layers, given.layers):
    np.testing.assert_array_equal(a.rgba, b.rgba)
  with pytest.raises(ValueError, match=r'latents: shape \(1, 2\), expected \(1, 3, '):
    pipe(image, box=BOX, latents=torch.zeros(1, 2))


def test_pil_output_and_every_prompt_argument(models, tmp_path):
  kind, _, pipe, _, _ = models
  image = photo()
  sample = pipe(image, box=BOX, num_inference_steps=2)
  pil = pipe(Image.fromarray(to_uint8(image)), box=BOX, num_inference_steps=2,
             output_type='pil')
  # The PIL input is the photo rounded to 8 bits: layers within a few levels of the array's.
  assert len(pil) == len(sample.layers) and all(im.mode == 'RGBA' for im in pil)
  assert pil[0].size == (W, H)
  mask = np.zeros((H, W), bool)
  mask[8:33, 12:40] = True
  text = 'a ball'
  masked = pipe(image, mask=mask, text=text, num_inference_steps=2)
  assert masked.layers[-1].label == text and masked.prompts[0].mask.sum() == mask.sum()
  with pytest.raises(PromptError, match=r"prompt point: this model was trained with prompt "
                                        r"kinds \['box', 'mask', 'text'\]"):
    pipe(image, point=(10, 10))
  with pytest.raises(PromptError, match='point'):
    pipe(image, point=(1, 2, 3))
  with pytest.raises(ValueError, match="output_type 'np'"):
    pipe(image, box=BOX, output_type='np')
  with pytest.raises(ValueError, match='latents and generator'):
    pipe(image, box=BOX, latents=torch.zeros(1), generator=torch.Generator())


NO_JAX = '''
import sys
class NoJax:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax'):
      raise ModuleNotFoundError(f'{name} is unimportable in this test')
sys.meta_path.insert(0, NoJax())
'''


def test_a_pytorch_user_needs_no_jax(models, tmp_path):
  """In a fresh process where JAX and Flax cannot be imported, the pipeline loads the export
  and decomposes with a box and the whole scene: the layers of this process's pipeline."""
  _, _, pipe, _, export = models
  np.save(tmp_path / 'photo.npy', photo())
  code = NO_JAX + textwrap.dedent(f'''
      import numpy as np
      from layerjax.torch import LayerDecomposerPipeline
      pipe = LayerDecomposerPipeline.from_pretrained({str(export)!r})
      image = np.load({str(tmp_path / 'photo.npy')!r})
      for name, s in (('box', pipe(image, box={BOX}, num_inference_steps=2)),
                      ('scene', pipe(image, num_inference_steps=2, max_layers=1))):
        np.save({str(tmp_path)!r} + f'/{{name}}.npy', np.stack([l.rgba for l in s.layers]))
      assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')]
      ''')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path,
                 env={**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])})
  image = photo()
  for name, want in (('box', pipe(image, box=BOX, num_inference_steps=2)),
                     ('scene', pipe(image, num_inference_steps=2, max_layers=1))):
    got = np.load(tmp_path / f'{name}.npy')
    # The same up to fp32 rounding: the two processes' kernels may differ.
    np.testing.assert_allclose(got, np.stack([l.rgba for l in want.layers]), atol=1e-4)
