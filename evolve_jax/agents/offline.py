"""The offline backend (the default): no key, no network; typed operators and measured lessons."""

from __future__ import annotations

from evolve_jax.agents.analyzer import OfflineAnalyzer
from evolve_jax.agents.base import AgentEnv, AgentTrio
from evolve_jax.agents.engineer import RuleEngineer
from evolve_jax.agents.researcher import OfflineResearcher


def make_offline(env: AgentEnv) -> AgentTrio:
    return AgentTrio(
        researcher=OfflineResearcher(env.space, env.direction),
        engineer=RuleEngineer(env.space, env.devices, env.concurrency, env.max_repairs),
        analyzer=OfflineAnalyzer(env.cognition, env.direction),
    )
