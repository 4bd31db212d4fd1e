"""The run configuration: flags become this frozen dataclass at the boundary (main.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from evolve_jax.sampling import SamplerConfig

# Code mode: the kinds of change a model-backed Researcher makes to a program.
EDIT_KINDS = ("diff", "rewrite", "crossover")


def parse_edit_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``"diff=0.7,rewrite=0.2,crossover=0.1"`` -> pairs; raises ValueError naming the problem."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, sep, weight = part.partition("=")
        if not sep or kind.strip() not in EDIT_KINDS:
            raise ValueError(f"edit mix {text!r}: {part!r} is not KIND=WEIGHT ({EDIT_KINDS})")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"edit mix {text!r}: weight {weight!r} is not a number") from None
        pairs.append((kind.strip(), value))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Settings of the model-backed agent backends (ignored by the offline one)."""

    researcher_model: str = "gemini-2.5-pro"
    engineer_model: str = "gemini-2.5-flash"
    analyzer_model: str = "gemini-2.5-flash"
    judge_model: str | None = None
    embedding_model: str = "gemini-embedding-001"
    embedding_dims: int = 768
    base_url: str | None = None
    vertex: bool = False
    project: str | None = None
    location: str | None = None
    attempts: int = 5  # HTTP attempts per call (retries on 408, 429, 5xx, timeouts)
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0
    timeout_s: float = 300.0
    max_output_tokens: int = 8192
    thinking_budget: int | None = None
    temperature: float | None = None
    prices_file: str | None = None  # None: the prices.json shipped in evolve_jax/agents
    prompts_dir: str | None = None  # None: the templates shipped in evolve_jax/agents/prompts
    record_dir: str | None = None  # None: WORKDIR/llm_record (calls/ and embeddings/)
    prompt_budget_tokens: int = 12_000  # bound of a prompt's variable part
    concurrency: int = 4  # proposals of one step requested at once
    offline_share: float = 0.0  # share of children made by the offline operators instead
    max_reasks: int = 2  # re-asks after an answer that does not parse or validate
    novelty_threshold: float = 0.95  # cosine above which a proposal is sent back
    novelty_retries: int = 1
    judge_weight: float = 0.0
    # Code mode: the share of slots asking for each kind of change (normalised).
    edit_mix: tuple[tuple[str, float], ...] = (("diff", 0.7), ("rewrite", 0.2), ("crossover", 0.1))

    def __post_init__(self):
        if isinstance(self.edit_mix, str):
            object.__setattr__(self, "edit_mix", parse_edit_mix(self.edit_mix))
        weights = dict(self.edit_mix)
        bad = [w for w in weights.values() if not 0 <= w < float("inf")]
        if set(weights) - set(EDIT_KINDS) or bad:
            raise ValueError(f"edit_mix {self.edit_mix}: kinds {EDIT_KINDS}, finite weights >= 0")
        if not sum(weights.values()) > 0:
            raise ValueError(f"edit_mix {self.edit_mix}: the weights must not all be 0")
        for name in ("attempts", "embedding_dims", "max_output_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_reasks", "novelty_retries", "prompt_budget_tokens", "timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("offline_share", "judge_weight", "novelty_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.judge_weight > 0 and not self.judge_model:
            raise ValueError("judge_weight > 0 needs a judge model (--judge_model)")

    def models(self) -> dict[str, str]:
        """Role -> model, for every role that calls one."""
        roles = {
            "researcher": self.researcher_model,
            "engineer": self.engineer_model,
            "analyzer": self.analyzer_model,
            "embedding": self.embedding_model,
        }
        if self.judge_model:
            roles["judge"] = self.judge_model
        return roles


@dataclasses.dataclass(frozen=True)
class RunConfig:
    search_space: str
    workdir: str
    steps: int = 10
    seed: int = 0
    schedule: str = "steps"  # steps | async (loop.py)
    eval_timeout_s: float = float("inf")  # deadline of one evaluation (scheduler.py)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    agents: str = "offline"
    samples_per_step: int = 4
    concurrency: int = 1
    eval_seeds: int = 1
    promote_top_k: int = 0
    run_name: str = "main"
    retrieval_k: int = 5
    max_item_chars: int = 600
    max_repairs: int = 2
    top_k_report: int = 10
    budget_usd: float | None = None  # stop at a step boundary once the run's LLM cost reaches it
    # A child whose stage-0 primary metric improves on the best trusted node's by more than
    # this fraction of that value's magnitude is flagged implausible (loop.py); inf: never.
    implausible_gain: float = 0.25
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    space_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in ("samples_per_step", "concurrency", "eval_seeds", "retrieval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "promote_top_k", "max_repairs", "max_item_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in ("steps", "async"):
            raise ValueError(f"schedule must be 'steps' or 'async', got {self.schedule!r}")
        if not self.eval_timeout_s > 0:
            raise ValueError(f"eval_timeout_s must be > 0, got {self.eval_timeout_s}")
        if not self.implausible_gain > 0:  # NaN fails this too
            raise ValueError(
                f"implausible_gain must be a number > 0 (inf turns the check off), "
                f"got {self.implausible_gain}"
            )
        # Evaluation seeds are seed * 1000 + i (eval_seed_list); a JAX PRNG key keeps 32 bits of
        # its seed and numpy's generators refuse negative seeds, so every one must be in
        # [0, 2**32).
        max_seed = (2**32 - self.eval_seeds) // 1000
        if not (isinstance(self.seed, int) and 0 <= self.seed <= max_seed):
            raise ValueError(
                f"seed must be an integer from 0 to {max_seed} (the evaluation seeds "
                f"seed*1000+i must be in [0, 2**32)), got {self.seed}"
            )
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0, got {self.budget_usd}")
        if not self.workdir:
            raise ValueError("workdir must be set")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be non-empty without '/', got {self.run_name!r}")

    def shaping_flags(self) -> dict[str, Any]:
        """The flags whose values shape what a run records, by flag name (JSON values): a run
        resumed with other values would not continue the same search (loop.py refuses it).
        ``--steps`` is left out (more steps extend a run), as are flags of speed and
        reporting (``--concurrency``, timeouts, ``--budget_usd``, ``--top_k_report``)."""
        s = self.sampler
        flags: dict[str, Any] = {
            "search_space": self.search_space,
            "seed": self.seed,
            "schedule": self.schedule,
            "sampler": s.name,
            "num_references": s.num_references,
            "ucb_c": s.ucb_c,
            "num_islands": s.num_islands,
            "migration_interval": s.migration_interval,
            "migration_rate": s.migration_rate,
            "exploration": s.exploration,
            "exploitation": s.exploitation,
            "agents": self.agents,
            "samples_per_step": self.samples_per_step,
            "eval_seeds": self.eval_seeds,
            "promote_top_k": self.promote_top_k,
            "retrieval_k": self.retrieval_k,
            "max_item_chars": self.max_item_chars,
            "max_repairs": self.max_repairs,
            "implausible_gain": self.implausible_gain
            if self.implausible_gain < float("inf")
            else None,
            "space_opt": sorted(f"{k}={v}" for k, v in self.space_options),
        }
        if self.agents != "offline":  # the models and how they are asked
            llm = self.llm
            for name in (
                "researcher_model", "engineer_model", "analyzer_model", "judge_model",
                "judge_weight", "embedding_model", "embedding_dims", "max_output_tokens",
                "thinking_budget", "temperature", "offline_share", "max_reasks",
                "novelty_threshold", "novelty_retries",
            ):  # fmt: skip
                flags[name] = getattr(llm, name)
            flags["edit_mix"] = ",".join(f"{k}={w:g}" for k, w in llm.edit_mix)
        return flags

    @property
    def eval_seed_list(self) -> list[int]:
        """The evaluation seeds, shared by every candidate and the baseline (paired)."""
        return [self.seed * 1000 + i for i in range(self.eval_seeds)]
