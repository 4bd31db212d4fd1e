"""The offline backend (the default): no key, no network; typed operators and measured lessons."""

from __future__ import annotations

from evolve_jax.agents.analyzer import OfflineAnalyzer
from evolve_jax.agents.base import AgentEnv, AgentTrio
from evolve_jax.agents.engineer import RuleEngineer
from evolve_jax.agents.researcher import OfflineResearcher


def preflight(config, space) -> None:
    """Refuses code mode before any work: the offline operators cannot write programs."""
    del config
    if space.code_spec() is not None:
        raise ValueError(
            f"search space {space.name!r} is in code mode: its candidates are programs, which the "
            "offline operators cannot write; use --agents=gemini (or another model backend)"
        )


def make_offline(env: AgentEnv) -> AgentTrio:
    preflight(None, env.space)
    return AgentTrio(
        researcher=OfflineResearcher(env.space, env.direction),
        engineer=RuleEngineer(
            env.space, env.devices, env.concurrency, env.max_repairs, env.eval_timeout_s
        ),
        analyzer=OfflineAnalyzer(env.cognition, env.direction),
    )


make_offline.preflight = preflight
