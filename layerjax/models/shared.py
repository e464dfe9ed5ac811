"""What the JAX decomposer (`layerjax.models.decomposer`) and the PyTorch one
(`layerjax.torch.modules`) share, numpy only so that PyTorch users never import JAX: layer and
condition names, the sample-prediction cap, the latent geometry of an architecture, the
byte-level tokenizer and precomputed SD3
text embeddings (`TextEmbeddings`, `embedding_lookup`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

LAYERS = ('background', 'foreground', 'shadow')
# Condition latents a layer may be denoised under. 'checkerboard' is the board the foreground
# and shadow targets are blended over: given, a small model need not learn to draw it.
CONDITIONS = ('image', 'prompt', 'checkerboard')
SAMPLE_SIGMA_MIN = 0.05  # sample prediction: the velocity's 1 / sigma is capped there (JiT)

PAD, BOS = 0, 1  # byte b is token b + 2


def tokenize(texts, max_len: int) -> np.ndarray:
  """UTF-8 bytes -> int32 [B, max_len]: BOS, the first max_len - 1 bytes, then PAD."""
  out = np.full((len(texts), max_len), PAD, np.int32)
  for i, text in enumerate(texts):
    ids = np.frombuffer(str(text).encode('utf-8'), np.uint8)[:max_len - 1].astype(np.int32) + 2
    out[i, 0] = BOS
    out[i, 1:1 + len(ids)] = ids
  return out


def latent_geometry(model: dict) -> tuple[int, int]:
  """(pixels per latent cell, latent channels) of an architecture (`config_json`'s dict), as
  `DecomposerConfig.latent_factor` / `latent_channels` give them."""
  if model['latents'] == 'vae':
    return 2 ** (len(model['vae']['block_out_channels']) - 1), model['vae']['latent_channels']
  return model['factor'], 3 * model['factor'] ** 2


class TextEmbeddings:
  """Precomputed SD3 text embeddings: a safetensors file with, per text, tensors
  `<sha256(text)>.states` [T, D] and `<sha256(text)>.pooled` [P] (the empty text included)."""

  def __init__(self, path):
    from safetensors.numpy import load_file
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f'model.text.embeddings: {self.path}: no such file')
    self.tensors = load_file(str(self.path))

  @staticmethod
  def key(text: str) -> str:
    return hashlib.sha256(text.encode('utf-8')).hexdigest()

  def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
    states, pooled = [], []
    for text in texts:
      k = self.key(str(text))
      if f'{k}.states' not in self.tensors:
        raise KeyError(f'{self.path}: no embedding for text {text!r} (key {k})')
      states.append(self.tensors[f'{k}.states'])
      pooled.append(self.tensors[f'{k}.pooled'])
    return np.stack(states).astype(np.float32), np.stack(pooled).astype(np.float32)


def embedding_lookup(tables: list[TextEmbeddings], source: str, error=ValueError
                     ) -> Callable[[list[str]], dict[str, np.ndarray]]:
  """A function texts -> {'text_embeds', 'pooled_text_embeds'}, each text from the first of
  `tables` that holds it; a text none holds is an `error` naming the model (`source`)."""
  def lookup(texts):
    states, pooled = [], []
    for text in texts:
      key = TextEmbeddings.key(str(text))
      table = next((t for t in tables if f'{key}.states' in t.tensors), None)
      if table is None:
        where = ', '.join(str(t.path) for t in tables) or 'no embeddings file'
        raise error(f'text {text!r}: {source} reads precomputed text embeddings and {where} '
                    'holds none for it: give embeddings= a safetensors file with it '
                    '(`python -m data_engine embed-texts`)')
      s, p = table([text])
      states.append(s[0])
      pooled.append(p[0])
    return {'text_embeds': np.stack(states), 'pooled_text_embeds': np.stack(pooled)}
  return lookup
