"""The agent interface every backend implements: rule-based (offline) and LLM/VLM (`llm`).

    plan(image, detections) -> dict            which tools to trust for this photo, and why
                                                 ('shadows', 'reason'; may add 'labels')
    judge(photo, sample) -> Judgement          quality in [0, 1] of one decomposition
    check_text(layer) -> (bool, str)           does the layer's text agree with what it shows
    caption(rgba, label) -> Caption            label, caption and referring expressions
    compare(photo, a, b) -> Preference         which of two decompositions is better (ReasonX)
    validate_object(rgba) -> Judgement         Gen-n-Val: one intact object on a plain or
                                                 transparent background (1 valid, 0 invalid)
    write_prompts(category, n) -> [str]        Gen-n-Val: text-to-image prompts for one object
    prompt_versions() -> {task: version}       the system prompts answers come from ({} when
                                                 no prompt is involved), for provenance

The LLM agent also answers `relate(photo, questions, choices) -> [answer]`, ReasonX's relative
questions about a photo (`layerjax.reward.judges.AgentJudge`); the rule-based agent cannot see
the photo, so it has no such method (the offline judge reads a synthetic scene's ground truth).

Agents that work under system prompts (the LLM agent) are also `PromptOptimiser`s, which the
self-refining loop (`data_engine.refine`) needs; the rule-based agent is not one:
    critique(task, examples) -> str            TextGrad-style loss: what is wrong with outputs
    rewrite_prompt(task, prompt, critiques)    the system prompt improved by those critiques
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from data_engine.tools.types import Caption


@dataclasses.dataclass(frozen=True)
class Judgement:
  score: float
  reason: str


@dataclasses.dataclass(frozen=True)
class Preference:
  """A relative judgement of decompositions 'a' and 'b' of one photo; `scores` are each one's
  absolute quality in [0, 1], as the same agent saw them."""
  winner: str  # 'a' | 'b' | 'tie'
  reason: str
  scores: tuple[float, float]

  def __post_init__(self):
    if self.winner not in ('a', 'b', 'tie'):
      raise ValueError(f"Preference.winner must be 'a', 'b' or 'tie', got {self.winner!r}")


@runtime_checkable
class Agent(Protocol):

  def plan(self, image: np.ndarray, detections: list) -> dict: ...

  def judge(self, photo: np.ndarray, sample) -> Judgement: ...

  def check_text(self, layer) -> tuple[bool, str]: ...

  def caption(self, rgba: np.ndarray, label: str) -> Caption: ...

  def compare(self, photo: np.ndarray, sample_a, sample_b) -> Preference: ...

  def validate_object(self, rgba: np.ndarray, category: str = '') -> Judgement: ...

  def write_prompts(self, category: str, n: int) -> list[str]: ...

  def prompt_versions(self) -> dict[str, str]: ...


@runtime_checkable
class PromptOptimiser(Protocol):

  def critique(self, task: str, examples: list[dict[str, Any]]) -> str: ...

  def rewrite_prompt(self, task: str, prompt: str, critiques: list[str]) -> str: ...
