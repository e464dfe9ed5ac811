"""Baselines shown beside every model's scores, computed on the same samples.

* `trivial(gt)`: the decomposition that changes nothing, layer for layer of the ground
  truth: the background is the photo itself, each object is the photo cut by its prompt
  (its box, else its mask; the layer's own alpha box when it has no prompt) with alpha 1
  inside and 0 outside, each shadow is empty. The trainer's periodic evaluation uses it with
  the prompt map's region as each example's mask.
* `classical(photo)`: a non-learned whole-scene peeling from the data engine's offline
  tools, as the engine's stages and `layerjax.infer.scene` use them: object proposals
  (`scene.Proposals`: saliency boxes, ground-plane depth order) taken front to back, each
  segmented in what is left of the photo by its box (GrabCut), matted (closed-form alpha and
  multilevel foreground colour) and inpainted away (Telea) before the next; the layers are
  then solved exactly against the photo (`postprocess.exact_layers`), so they recompose to
  it like the model's do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from layerjax.data.schema import Layer, LayeredSample, Prompt, alpha_bbox, assemble

TRIVIAL, CLASSICAL = 'trivial', 'classical'
NAMES = (TRIVIAL, CLASSICAL)


def _region(gt: LayeredSample, layer: Layer) -> np.ndarray:
  h, w = gt.size
  prompt = next((p for p in gt.prompts if p.target == layer.name), None)
  box = prompt.box if prompt is not None else None
  if prompt is not None and box is None and prompt.mask is not None:
    return prompt.mask
  box = box if box is not None else alpha_bbox(layer.rgba[..., 3])
  out = np.zeros((h, w), bool)
  if box is not None:
    out[box[1]:box[3], box[0]:box[2]] = True
  return out


def trivial(gt: LayeredSample) -> LayeredSample:
  """The trivial decomposition of `gt.image`, named and ordered as `gt`'s layers."""
  photo = gt.image.astype(np.float32)
  layers = []
  for layer in gt.layers:
    if layer.kind == 'background':
      alpha = np.ones(gt.size, np.float32)
    elif layer.kind == 'object':
      alpha = _region(gt, layer).astype(np.float32)
    else:
      layers.append(dataclasses.replace(layer, rgba=np.zeros_like(layer.rgba),
                                        visible_mask=None, bbox=None))
      continue
    layers.append(dataclasses.replace(layer, rgba=np.concatenate([photo, alpha[..., None]], -1),
                                      visible_mask=None, bbox=None))
  return LayeredSample(gt.id, photo, layers, list(gt.prompts), {'baseline': TRIVIAL})


@dataclasses.dataclass
class Classical:
  """The tools of `classical`: `proposals` a `layerjax.infer.scene.Proposals` (None: its
  defaults); the others engine tool specs (`data_engine.core.create`), the engine config's
  defaults; `inpaint_margin` px around each object's alpha are inpainted (the engine's
  `decompose.inpaint_margin`); at most `max_layers` objects."""
  proposals: Any = None
  segmenter: Any = 'grabcut'
  matting: Any = 'closed_form'
  inpainter: Any = dataclasses.field(default_factory=lambda: {'name': 'telea', 'radius': 5})
  inpaint_margin: int = 8
  max_layers: int = 8

  def __post_init__(self):
    from data_engine import core
    from layerjax.infer import scene
    self.specs = {'segmenter': self.segmenter, 'matting': self.matting,
                  'inpainter': self.inpainter}
    self.proposals = self.proposals or scene.Proposals()
    self.segmenter = core.create('segmenter', self.segmenter)
    self.matting = core.create('matting', self.matting)
    self.inpainter = core.create('inpainter', self.inpainter)

  def __call__(self, photo: np.ndarray, sample_id: str = CLASSICAL,
               boxes=None) -> LayeredSample:
    """The layers of `photo`; `boxes` (x0, y0, x1, y1), front to back, are peeled instead
    of the proposals when given (a box-prompted baseline)."""
    from data_engine.tools import imaging
    from data_engine.tools.types import Detection
    from layerjax.infer import postprocess as post
    photo = np.asarray(photo, np.float32)
    if boxes is None:
      found, detected = self.proposals(photo)
    else:
      found, detected = [Detection(tuple(b), 1.0) for b in boxes], len(boxes)
    current = photo
    peeled = []  # front to back
    for det in found[:self.max_layers]:
      mask = self.segmenter(current, tuple(det.box))
      if not mask.any():
        continue
      alpha, colour = self.matting(current, mask)
      alpha = alpha.astype(np.float32)
      hole = imaging.dilate(alpha > 0, self.inpaint_margin)
      current = self.inpainter(current, hole).astype(np.float32)
      peeled.append((det, post.Extracted(alpha, colour.astype(np.float32), None,
                                         label=det.label or 'object')))
    layers, repaired = post.exact_layers(photo, current, [o for _, o in reversed(peeled)])
    prov = {'baseline': CLASSICAL, 'tools': self.specs, 'detected': detected,
            'boxes': [list(d.box) for d, _ in reversed(peeled)], 'repaired_pixels': repaired}
    sample = assemble(sample_id, layers, prov, prompts=False)
    objects = [l.name for l in layers if l.kind == 'object']
    sample.prompts.extend(Prompt(name, box=tuple(det.box))
                          for name, (det, _) in zip(objects, reversed(peeled)))
    return sample.validate()


def classical(photo: np.ndarray, sample_id: str = CLASSICAL) -> LayeredSample:
  """`photo` [H, W, 3] in [0, 1] peeled by the offline tools (`Classical`'s defaults)."""
  return Classical()(photo, sample_id)
