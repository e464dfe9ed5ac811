"""`TorchBackend`: an exported decomposer (`layerjax.torch.folder`) behind the interface the
framework-free inference driver calls: numpy in and out, NHWC, float32. Inside, everything is
PyTorch and NCHW; layouts change only here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from layerjax.models.shared import CONDITIONS, TextEmbeddings, embedding_lookup
from layerjax.torch import folder as export
from layerjax.torch import sampling


def nhwc_noise(x: torch.Tensor) -> np.ndarray:
  """Initial latents in the torch layout [B, K, C, h, w] -> the driver's NHWC float32."""
  return x.detach().float().permute(0, 1, 3, 4, 2).cpu().numpy()


class TorchBackend:
  """A loaded export: `text_inputs`, `noise`, `sample` and `decode` as the driver
  (`layerjax.infer.decomposer.Backend`) calls them."""

  def __init__(self, path, device=None, dtype: torch.dtype | None = None, embeddings=None):
    self.path = Path(path)
    meta, built, self.loading_info = export.load_components(self.path, device, dtype)
    self.source, self.step = str(self.path), int(meta['step'])  # as JAX's: where it was read
    self.config, self.model = meta['config'], meta['model']
    self.decomposer = export.decomposer(meta, built)
    self.scheduler = built[export.SCHEDULER]
    self.device = torch.device(device) if device is not None else torch.device('cpu')
    # Precomputed text embeddings: `embeddings` first, then the export's (the empty text).
    if self.model['text'] is None:
      self._lookup = embedding_lookup([TextEmbeddings(p) for p in (embeddings, self.path /
                                                                   export.TEXT) if p],
                                      str(self.path))

  @classmethod
  def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None,
                      embeddings=None) -> 'TorchBackend':
    """The export at `path` (to-pytorch's folder) on `device`, in `dtype` (default as
    saved); `embeddings`: a safetensors file of precomputed text embeddings
    (`models.shared.TextEmbeddings`) for models that read them."""
    return cls(path, device, dtype, embeddings)

  def text_inputs(self, texts: list[str]) -> dict[str, np.ndarray]:
    """What `infer.model.text_inputs` gives the JAX model for `texts`."""
    if self.model['text'] is not None:
      return {'text_tokens': self.decomposer.text_encoder.tokenize(texts)}
    return self._lookup(texts)

  def noise(self, seed: int, shape: tuple, generator: torch.Generator | None = None
            ) -> np.ndarray:
    """Standard normal noise of NHWC `shape` (B, K, h, w, C), drawn in the torch layout
    (B, K, C, h, w) from `generator`, by default `torch.Generator().manual_seed(seed)`."""
    b, k, h, w, c = shape
    x = torch.randn((b, k, c, h, w),
                    generator=generator or torch.Generator().manual_seed(seed))
    return nhwc_noise(x)

  def _tensors(self, entries: dict) -> dict[str, torch.Tensor]:
    """numpy batch entries -> tensors on the device, condition maps NHWC -> NCHW."""
    out = {}
    for k, v in entries.items():
      x = torch.tensor(np.asarray(v), device=self.device)  # a copy: `v` may be read-only
      out[k] = x.permute(0, 3, 1, 2) if k in CONDITIONS else x
    return out

  def sample(self, batch: dict[str, np.ndarray], uncond: dict | None, noise: np.ndarray,
             steps: int, guidance: float) -> torch.Tensor:
    """`flow.sample_latents` on numpy NHWC: `batch`'s image, prompt and checkerboard
    [B, H, W, 3] in [0, 1] plus its text entries; `uncond` as
    `examples.unconditional_inputs` gives it (None when `guidance` is 1); `noise`
    [B, K, h, w, C]. Returns the latents [B, K, C, h, w] for `decode`."""
    model = self.decomposer
    b, h, w = np.shape(batch['image'])[:3]
    f, c = model.latent_factor, model.latent_channels
    want = (b, len(self.model['layers']), h // f, w // f, c)
    if tuple(np.shape(noise)) != want:
      raise ValueError(f'noise: shape {tuple(np.shape(noise))}, expected {want} for a '
                       f'{b}x{h}x{w} batch')
    x = torch.tensor(np.asarray(noise), dtype=torch.float32, device=self.device)
    latents = sampling.sample_latents(model, self.scheduler, self._tensors(batch),
                                      x.permute(0, 1, 4, 2, 3), steps, guidance,
                                      None if uncond is None else self._tensors(uncond))
    if latents.is_cuda:  # done when returned, as JAX's: the driver times sampling apart
      torch.cuda.synchronize(latents.device)
    return latents

  def decode(self, latents: torch.Tensor, batch: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
    """`flow.decode_layers`: {layer name: RGBA [B, H, W, 4], 'recomposition': [B, H, W, 3]},
    numpy NHWC float32."""
    model, tensors = self.decomposer, self._tensors(batch)
    board = tensors['checkerboard'] if 'checkerboard' in self.model['conditions'] else None
    layers = sampling.decode_layers(model, latents, model.head_pixels(tensors), board)
    return {k: v.astype(np.float32) for k, v in layers.items()}
