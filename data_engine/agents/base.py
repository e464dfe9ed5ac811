"""The agent interface every backend implements (rule-based here; LLM/VLM agents in part 2).

    plan(image, detections) -> dict      which tools to trust for this photo, and why
    judge(photo, sample) -> Judgement    a quality score in [0, 1] for a decomposition
    check_text(layer) -> (bool, str)     does the layer's text agree with what it shows
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Judgement:
  score: float
  reason: str
