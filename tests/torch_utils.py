"""Tiny random decomposers packed and exported to PyTorch, for the layerjax.torch tests."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax import build
from layerjax.convert import pytorch
from layerjax.infer import model as infer
from layerjax.models.shared import TextEmbeddings
from train_utils import tiny, write_embeddings

# demo: configs/liwi.py:demo shrunk (pixel latents, conv heads reading image, board and the
# layer's distance from it, long skip, sample prediction, byte text, qk RMSNorm); sd3 / sd35:
# SD3's structure (tiny VAE, VAE-decoder heads, precomputed text, velocity), SD3 blocks /
# SD3.5 blocks (dual attention layers, qk RMSNorm).
KINDS = ('demo', 'sd3', 'sd35')


def config(root: Path, kind: str):
  emb = write_embeddings(root / 'emb.safetensors', 6, 16, 16)
  c = tiny(root, 'pixels' if kind == 'demo' else 'vae', embeddings=emb)
  if kind == 'demo':
    c.model.head = {'kind': 'conv', 'width': 8, 'conditions': ('image', 'checkerboard'),
                    'board_distance': True}
    c.model.mmdit.dual_attention_layers = ()
  else:
    c.model.mmdit.dual_attention_layers = () if kind == 'sd3' else (0,)
    c.model.mmdit.qk_norm = None if kind == 'sd3' else 'rms_norm'
    # As the SD3 configs: trained with condition dropout, so the decomposers take guidance.
    c.loss.cond_dropout = 0.1
  return c


def randomize_(model, seed: int, std: float = 0.2):
  """Every parameter N(0, std) (norm scales 1 + N(0, std)), so no zero-initialised part
  (adaLN-Zero, the layer embedding, the long-skip gate) hides a wrong connection."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    base = 1.0 if path[-1] == 'scale' else 0.0
    var.set_value(jnp.asarray(base + std * rng.standard_normal(var.shape), var.dtype))
  return model


def packed(root: Path, kind: str, seed: int = 0) -> Path:
  """A packed random model of `kind` at root/packed."""
  c = config(root, kind)
  model = randomize_(build.build_model(c, seed), seed)
  texts = TextEmbeddings(c.model.text.embeddings) if kind != 'demo' else None
  return infer.save(infer.LoadedModel(model, c, 7, f'random {kind}', texts), root / 'packed')


def exported(root: Path, kind: str, **kw) -> tuple[Path, Path]:
  """(packed model, its PyTorch export at root/torch)."""
  model = packed(root, kind)
  return model, pytorch.to_pytorch(model, root / 'torch', **kw)
