"""The offline agent: fixed rules standing in for an LLM/VLM planner, judge and validator.

Planning: shadows are looked for only when the ground below an object is in the photo.
Judging: a decomposition scores well when each object was actually removed from the
background (the background differs from the photo under the object), its alpha covers its
visible mask, and it is not the whole scene; `compare` prefers the higher judge score.
Text: a caption that names a colour must name the layer's dominant colour; captions come from
the template captioner. Object validation (Gen-n-Val's criteria, as alpha rules): one
connected part holds most of the opacity, it does not touch the image border, and what is
around it is transparent (no faint residue) or, for an opaque image, one plain colour.
Generation prompts are templates over the category with seeded, varied attributes.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
from scipy import ndimage

from data_engine.agents.base import Judgement, Preference
from data_engine.core import register
from data_engine.tools import imaging
from data_engine.tools.captioner import COLOUR_NAMES, Template, dominant_colour
from data_engine.tools.types import Caption

# Attributes that suit any object category (Gen-n-Val's prompts vary style, viewpoint and
# lighting; colour or material could contradict the category).
_STYLES = ('a photo', 'a studio photo', 'a DSLR photo', 'a close-up photo', 'a product photo')
_VIEWS = ('front view', 'side view', 'three-quarter view', 'seen from above',
          'seen from a low angle')
_LIGHTS = ('soft studio lighting', 'natural daylight', 'warm morning light',
           'diffuse overcast light', 'dramatic side lighting')


@register('agent', 'rule_based')
class RuleBasedAgent:
  """Offline rules; no system prompts, so not a `PromptOptimiser` (that needs an LLM)."""

  def __init__(self, ground_margin: float = 0.03, min_removal: float = 0.03,
               min_alpha_cover: float = 0.6, max_area: float = 0.7, tie_margin: float = 0.02,
               min_main_share: float = 0.9, max_residue: float = 0.02, plain_std: float = 0.03,
               plain_tol: float = 0.1, min_object_area: float = 0.01, seed: int = 0):
    self.ground_margin = ground_margin
    self.min_removal = min_removal
    self.min_alpha_cover = min_alpha_cover
    self.max_area = max_area
    self.tie_margin = tie_margin
    self.min_main_share = min_main_share
    self.max_residue = max_residue
    self.plain_std = plain_std
    self.plain_tol = plain_tol
    self.min_object_area = min_object_area
    self.seed = seed
    self._captioner = Template()

  def plan(self, image: np.ndarray, detections: list) -> dict:
    h = image.shape[0]
    grounded = [d.box[3] < h * (1 - self.ground_margin) for d in detections]
    shadows = any(grounded) or not detections
    reason = ('ground visible below an object' if shadows else
              'every object reaches the bottom edge: no ground to cast a shadow on')
    return {'shadows': shadows, 'reason': reason}

  def judge(self, photo: np.ndarray, sample) -> Judgement:
    background = sample.layers[0].rgba[..., :3]
    scores, problems = [], []
    for lay in sample.layers:
      if lay.kind != 'object':
        continue
      visible = lay.visible_mask
      if not visible.any():
        continue
      removal = float(np.abs(background[visible] - photo[visible]).mean())
      cover = float(lay.rgba[..., 3][visible].mean())
      area = float((lay.rgba[..., 3] > 0.5).mean())
      checks = {'removed': min(1.0, removal / self.min_removal),
                'alpha_covers': min(1.0, cover / self.min_alpha_cover),
                'not_the_scene': 1.0 if area <= self.max_area else 0.0}
      scores.append(float(np.mean(list(checks.values()))))
      problems += [f'{lay.name} {k} ({v:.2f})' for k, v in checks.items() if v < 1]
    if not scores:
      return Judgement(0.0, 'no visible object')
    return Judgement(float(np.mean(scores)), '; '.join(problems) or 'all checks passed')

  def check_text(self, layer) -> tuple[bool, str]:
    if layer.kind != 'object':
      return True, ''
    named = [c for c in COLOUR_NAMES if c in layer.caption.split()]
    if not named:
      return True, 'caption names no colour'
    seen = dominant_colour(layer.rgba[..., :3], layer.rgba[..., 3])
    if seen in named:
      return True, f'{seen} as captioned'
    return False, f'caption says {named} but the layer is mostly {seen}'

  def caption(self, rgba: np.ndarray, label: str) -> Caption:
    return self._captioner(rgba, label)

  def compare(self, photo: np.ndarray, sample_a, sample_b) -> Preference:
    a, b = self.judge(photo, sample_a), self.judge(photo, sample_b)
    if abs(a.score - b.score) <= self.tie_margin:
      winner = 'tie'
    else:
      winner = 'a' if a.score > b.score else 'b'
    return Preference(winner, f'a {a.score:.2f} ({a.reason}); b {b.score:.2f} ({b.reason})',
                      (a.score, b.score))

  def validate_object(self, rgba: np.ndarray, category: str = '') -> Judgement:
    """1 for one intact object on a transparent or plain background, else 0 with the reasons.
    `category` cannot be checked by rules and is ignored."""
    alpha = rgba[..., 3].astype(np.float64)
    frame = np.zeros(alpha.shape, bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    problems = []
    if alpha[frame].mean() > 0.5:
      # An opaque image: the object is what differs from the (plain) colour of its frame.
      rgb = rgba[..., :3].astype(np.float64)
      spread = float(rgb[frame].std(0).max())
      if spread > self.plain_std:
        problems.append(f'background is neither transparent nor plain (colour spread '
                        f'{spread:.3f} > {self.plain_std})')
      solid = np.abs(rgb - np.median(rgb[frame], 0)).max(-1) > self.plain_tol
      weight, where = solid.astype(np.float64), 'a plain background'
    else:
      solid = alpha > 0.5
      outside = ~imaging.dilate(solid, 2)  # the object's soft edge is not residue
      residue = float(alpha[outside].mean()) if outside.any() else 0.0
      if residue > self.max_residue:
        problems.append(f'background not transparent (mean alpha {residue:.3f} > '
                        f'{self.max_residue})')
      weight, where = alpha, 'a transparent background'
    labels, n = ndimage.label(solid, structure=np.ones((3, 3)))
    if n == 0 or solid.mean() < self.min_object_area:
      problems.append(f'no object (opaque area {solid.mean():.3f} < {self.min_object_area})')
      return Judgement(0.0, '; '.join(problems))
    mass = ndimage.sum(weight, labels, np.arange(1, n + 1))
    main = int(np.argmax(mass)) + 1
    share = float(mass.max() / mass.sum())
    if share < self.min_main_share:
      problems.append(f'{n} separate parts; the largest holds {share:.0%} of the opacity')
    if (labels[frame] == main).any():
      problems.append('the object is cut by the image border')
    if problems:
      return Judgement(0.0, '; '.join(problems))
    return Judgement(1.0, f'one intact object on {where}')

  def write_prompts(self, category: str, n: int) -> list[str]:
    """`n` distinct prompts, the same for the same (seed, category)."""
    combos = list(itertools.product(_STYLES, _VIEWS, _LIGHTS))
    if not 0 <= n <= len(combos):
      raise ValueError(f'rule_based agent: write_prompts n={n}, templates give 0..{len(combos)}')
    rng = np.random.default_rng([self.seed, zlib.crc32(category.encode())])
    picks = rng.choice(len(combos), n, replace=False)
    return [f'{style} of a single {category}, {view}, {light}, the whole {category} in frame, '
            f'high-resolution, highly realistic, plain background'
            for style, view, light in (combos[i] for i in picks)]

  def prompt_versions(self) -> dict[str, str]:
    return {}


@register('text_check', 'rule_based')
class RuleBasedTextCheck:
  """The rule-based agent's colour-word check as a `text_check` tool: the offline fallback
  for CLIP's check."""

  def __init__(self):
    self.agent = RuleBasedAgent()

  def __call__(self, layer) -> tuple[bool, str]:
    return self.agent.check_text(layer)
