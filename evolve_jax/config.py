"""The run configuration: flags become this frozen dataclass at the boundary (main.py)."""

from __future__ import annotations

import dataclasses

from evolve_jax.sampling import SamplerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    search_space: str
    workdir: str
    steps: int = 10
    seed: int = 0
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
    space_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in ("samples_per_step", "concurrency", "eval_seeds", "retrieval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "promote_top_k", "max_repairs", "max_item_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.workdir:
            raise ValueError("workdir must be set")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be non-empty without '/', got {self.run_name!r}")

    @property
    def eval_seed_list(self) -> list[int]:
        """The evaluation seeds, shared by every candidate and the baseline (paired)."""
        return [self.seed * 1000 + i for i in range(self.eval_seeds)]
