"""The agent trio (Researcher, Engineer, Analyzer) and the registry of their backends."""

from evolve_jax.agents.base import (
    AgentTrio,
    DesignContext,
    Outcome,
    Proposal,
    available_backends,
    make_agents,
)

__all__ = [
    "AgentTrio",
    "DesignContext",
    "Outcome",
    "Proposal",
    "available_backends",
    "make_agents",
]
