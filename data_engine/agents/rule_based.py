"""The offline agent: fixed rules standing in for an LLM/VLM planner and judge.

Planning: shadows are looked for only when the ground below an object is in the photo.
Judging: a decomposition scores well when each object was actually removed from the
background (the background differs from the photo under the object), its alpha covers its
visible mask, and it is not the whole scene. Text: a caption that names a colour must name
the layer's dominant colour.
"""

from __future__ import annotations

import numpy as np

from data_engine.agents.base import Judgement
from data_engine.core import register
from data_engine.tools.captioner import COLOUR_NAMES, dominant_colour


@register('agent', 'rule_based')
class RuleBasedAgent:

  def __init__(self, ground_margin: float = 0.03, min_removal: float = 0.03,
               min_alpha_cover: float = 0.6, max_area: float = 0.7):
    self.ground_margin = ground_margin
    self.min_removal = min_removal
    self.min_alpha_cover = min_alpha_cover
    self.max_area = max_area

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
