"""Agents (plan, judge, check text) behind one interface (`agents.base`), registered like
tools under the kind 'agent'."""

from data_engine.agents.rule_based import RuleBasedAgent

__all__ = ['RuleBasedAgent']
