"""Agents behind one interface (`agents.base`), registered like tools under the kind 'agent':
the offline `rule_based` agent and the `llm` agent, whose chat backends (`agents.chat`) are
registered under the kind 'chat'."""

from data_engine.agents.base import Agent, Judgement, Preference, PromptOptimiser
from data_engine.agents.chat import OpenAIChat, TransformersVLM, parse_json
from data_engine.agents.llm import LLMAgent
from data_engine.agents.rule_based import RuleBasedAgent

__all__ = ['Agent', 'Judgement', 'LLMAgent', 'OpenAIChat', 'Preference', 'PromptOptimiser',
           'RuleBasedAgent', 'TransformersVLM', 'parse_json']
