"""An editable decomposition: objects moved, scaled, removed, reordered and recoloured with
their shadows following, and the background replaced, then drawn back into a sample.

Every edit is recorded, not applied: `render` draws each layer once from the original
pixels, so edits never accumulate resampling blur, and an object moved off the canvas and
back within one document comes back whole. The rendered sample's layers are cut to the
canvas, because the schema's layers are canvas-sized arrays that compositing, training and
the metrics read pixel for pixel; the original stays the source of truth (the rendered
sample names it in `provenance['edited_from']` and lists the edits).

Shadows follow their object: the same placement, so a scale about the object's ground
contact keeps the shadow attached at the contact. A shadow darkens whatever lies under it
by the ratio it darkened the original background: its colour is stored as a tint
`colour / old background` (per channel) and drawn as `tint * new background`, so that over
background B it composites to `B * (alpha * tint + 1 - alpha)`, the original's darkening
factor, on a moved spot or a new background alike. An untouched shadow over the untouched
background is drawn as it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from layerjax.data.schema import Layer, LayeredSample, assemble
from layerjax.edit.colour import recolour
from layerjax.edit.geometry import Placement, ground_contact, warp

ORDER = ('top', 'bottom', 'up', 'down')
_DARK = 1 / 255  # below one 8-bit step a background's colour says nothing about a tint


class EditError(ValueError):
  """An edit that cannot be made; the message names the sample and the layer."""


@dataclasses.dataclass(frozen=True)
class Colour:
  hue: float = 0.0         # degrees added
  saturation: float = 1.0  # factors
  brightness: float = 1.0

  def then(self, other: 'Colour') -> 'Colour':
    return Colour(self.hue + other.hue, self.saturation * other.saturation,
                  self.brightness * other.brightness)


class Document:
  """Edits of `sample`, named by object: a layer name (`object_2`) or a label (`mug`).

      doc = Document(sample)
      doc.move('mug', 40, 0).scale('mug', 1.2).remove('cat')
      edited = doc.render()                       # a validated LayeredSample
  """

  def __init__(self, sample: LayeredSample):
    self.sample = sample.validate()
    self._order = [layer.name for layer in sample.layers[1:]]
    self._placement: dict[str, Placement] = {}
    self._colour: dict[str, Colour] = {}
    self._background: np.ndarray | None = None
    self.edits: list[dict] = []

  # --- naming ---------------------------------------------------------------------------

  def find(self, key: str) -> str:
    """The object layer `key` names: its layer name, else its label (case-insensitive)."""
    sid, live = self.sample.id, set(self._order)
    objects = [l for l in self.sample.layers if l.kind == 'object' and l.name in live]
    for layer in self.sample.layers:
      if layer.name == key:
        if layer.kind != 'object':
          raise EditError(f'sample {sid!r}: layer {key!r} is the {layer.kind}: edits name an '
                          f'object' + (' (its shadow follows it)' if layer.owner else ''))
        if key not in live:
          raise EditError(f'sample {sid!r}: layer {key!r} has been removed')
        return key
    hits = [l.name for l in objects if l.label.casefold() == key.casefold()]
    if len(hits) == 1:
      return hits[0]
    if hits:
      raise EditError(f'sample {sid!r}: {key!r} is the label of {len(hits)} objects '
                      f'({", ".join(hits)}): name one of those layers')
    known = ', '.join(f'{l.name} ({l.label})' if l.label else l.name for l in objects)
    raise EditError(f'sample {sid!r}: no object named or labelled {key!r} (objects: '
                    f'{known or "none"})')

  def _group(self, name: str) -> list[str]:
    """The object and its shadows, in their current order."""
    return [n for n in self._order if n == name or self.sample.layer(n).owner == name]

  # --- edits ----------------------------------------------------------------------------

  def move(self, key: str, dx: float, dy: float) -> 'Document':
    """Shifts the object and its shadows by (dx, dy) pixels (x right, y down)."""
    name = self.find(key)
    self._placement[name] = self.placement(name).moved(float(dx), float(dy))
    self.edits.append({'edit': 'move', 'layer': name, 'dx': float(dx), 'dy': float(dy)})
    return self

  def scale(self, key: str, factor: float) -> 'Document':
    """Scales the object and its shadows by `factor` about the object's ground contact
    (`geometry.ground_contact`: where it stands stays where it stands)."""
    name = self.find(key)
    if not factor > 0 or not np.isfinite(factor):
      raise EditError(f'sample {self.sample.id!r}: scale of {name!r} must be a positive '
                      f'number, got {factor}')
    contact = ground_contact(self.sample.layer(name).rgba[..., 3])
    if contact is None:
      raise EditError(f'sample {self.sample.id!r}: {name!r} has no visible pixel to scale')
    placement = self.placement(name)
    self._placement[name] = placement.scaled(float(factor), placement.apply(contact))
    self.edits.append({'edit': 'scale', 'layer': name, 'factor': float(factor)})
    return self

  def remove(self, key: str) -> 'Document':
    """Removes the object and its shadows; the completed background shows where they were."""
    name = self.find(key)
    group = set(self._group(name))
    self._order = [n for n in self._order if n not in group]
    self.edits.append({'edit': 'remove', 'layer': name})
    return self

  def recolour(self, key: str, hue: float = 0.0, saturation: float = 1.0,
               brightness: float = 1.0) -> 'Document':
    """Turns the object's hue by `hue` degrees and multiplies its saturation and brightness;
    its alpha, its shadow and everything else stay as they are."""
    name = self.find(key)
    if not (saturation >= 0 and brightness >= 0):
      raise EditError(f'sample {self.sample.id!r}: recolour of {name!r}: saturation and '
                      f'brightness are factors >= 0, got {saturation}, {brightness}')
    change = Colour(float(hue), float(saturation), float(brightness))
    self._colour[name] = self._colour.get(name, Colour()).then(change)
    self.edits.append({'edit': 'recolour', 'layer': name, **dataclasses.asdict(change)})
    return self

  def reorder(self, key: str, where: str | int) -> 'Document':
    """Moves the object, its shadows just under it, to `where` among the objects: 'top'
    (front), 'bottom' (just above the background), 'up' / 'down' (past one object), or an
    index from 0 (the back)."""
    name = self.find(key)
    group = self._group(name)
    rest = [n for n in self._order if n not in group]
    objects = [n for n in rest if self.sample.layer(n).kind == 'object']
    current = [n for n in self._order if self.sample.layer(n).kind == 'object'].index(name)
    if where in ORDER:
      index = {'top': len(objects), 'bottom': 0, 'up': min(current + 1, len(objects)),
               'down': max(current - 1, 0)}[where]
    elif isinstance(where, int) and not isinstance(where, bool) and 0 <= where <= len(objects):
      index = where
    else:
      raise EditError(f'sample {self.sample.id!r}: order of {name!r} must be one of '
                      f'{", ".join(ORDER)} or an index 0..{len(objects)}, got {where!r}')
    # Insert before the group of the object that will be just above it (its shadows first).
    if index < len(objects):
      above = objects[index]
      at = min(rest.index(n) for n in rest if n == above or self.sample.layer(n).owner == above)
    else:
      at = len(rest)
    self._order = rest[:at] + group + rest[at:]
    self.edits.append({'edit': 'order', 'layer': name, 'to': where})
    return self

  def replace_background(self, image: np.ndarray, source: str = '') -> 'Document':
    """A new background, [H, W, 3] in [0, 1] at the sample's size (resize it first:
    `layerjax.data.images.scale_to_cover`); objects and shadows stay, shadows darken it."""
    h, w = self.sample.size
    image = np.asarray(image, np.float32)
    if image.shape != (h, w, 3):
      raise EditError(f'sample {self.sample.id!r}: the new background {source or "image"} '
                      f'is {list(image.shape)}, the sample {[h, w, 3]}')
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
      raise EditError(f'sample {self.sample.id!r}: the new background {source or "image"} '
                      f'must hold values in [0, 1]')
    self._background = image
    self.edits.append({'edit': 'background', 'source': source})
    return self

  def placement(self, name: str) -> Placement:
    return self._placement.get(name, Placement())

  # --- drawing --------------------------------------------------------------------------

  def render(self, sample_id: str | None = None) -> LayeredSample:
    """The edited sample, validated: its image is the composite of the edited layers, its
    prompts (if the original had any) those of the objects where they are now."""
    source = self.sample
    old = source.layers[0]
    background = old.rgba[..., :3] if self._background is None else self._background
    layers = [dataclasses.replace(old, rgba=np.concatenate(
        [background, np.ones_like(background[..., :1])], -1).astype(np.float32))]
    for name in self._order:
      layer = source.layer(name)
      owner = layer.owner if layer.kind == 'shadow' else name
      placement = self.placement(owner)
      if layer.kind == 'shadow':
        rgba = self._shadow(layer, placement, background)
      else:
        rgba = warp(layer.rgba, placement)
        if owner in self._colour:
          rgba = np.concatenate([recolour(rgba[..., :3], **dataclasses.asdict(
              self._colour[owner])), rgba[..., 3:]], -1)
      layers.append(dataclasses.replace(layer, rgba=rgba, visible_mask=None, bbox=None))
    provenance = {'edited_from': source.id, 'edits': list(self.edits),
                  'source_provenance': source.provenance}
    return assemble(sample_id or f'{source.id}-edited', layers, provenance,
                    prompts=bool(source.prompts))

  def _shadow(self, layer: Layer, placement: Placement, background: np.ndarray) -> np.ndarray:
    if placement.identity and self._background is None:
      return layer.rgba
    old = self.sample.layers[0].rgba[..., :3]
    tint = layer.rgba[..., :3] / np.maximum(old, _DARK)
    # The tint is resampled as the pixels are (it may exceed 1 over a dark background).
    moved = warp(np.concatenate([tint, layer.rgba[..., 3:]], -1), placement, unit=False)
    colour = np.clip(moved[..., :3] * background, 0, 1)
    return np.concatenate([colour, moved[..., 3:]], -1).astype(np.float32)

