"""The agent trio (Researcher, Engineer, Analyzer) and the registry of their backends."""

from evolve_jax.agents.base import (
    AGENT_BACKENDS,
    AgentTrio,
    DesignContext,
    Outcome,
    Proposal,
    make_agents,
)

__all__ = ["AGENT_BACKENDS", "AgentTrio", "DesignContext", "Outcome", "Proposal", "make_agents"]
