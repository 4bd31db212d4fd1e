"""The linear-attention architecture search space (ASI-Arch's task, at laptop scale).

Stage 0 trains every candidate briefly: by default ("byte_lm_short") on byte-level language
modelling of a real corpus, scored on held-out bits per byte, which benchmarks/proxy_fidelity.py
measured to rank 14 architectures as a costlier run does; with ``cheap_task=mqar`` ("mqar") on
multi-query associative recall. Stage 1 ("byte_lm") trains promoted candidates, wider and
longer, on byte-level LM. Fitness is normalised against DeltaNet trained with the same budget
and seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from evolve_jax import programs, storage
from evolve_jax.evaluation import harness, sandbox, workers
from evolve_jax.search_space import (
    CheckFailure,
    CodeSpec,
    DescriptorAxis,
    EvalResult,
    Metric,
    SearchSpace,
    Stage,
    TaskDescription,
    fingerprint,
    parse_options,
)
from search_spaces.linear_attention import checks, code_mode, data, genome, model, repairs, train

_TEXT = """\
Design the token mixer of a causal language model with linear (sub-quadratic) cost: a
recurrent state S updated per token and read by the query. Choose the state update (additive,
fixed decay, data-dependent decay, per-channel gating, delta rule, gated delta rule), the q/k
feature map and normalisation, a short causal convolution, the form of beta, the decay
parametrisation, output norm and gate, head shapes, the MLP, depth and width. Candidates are
trained briefly on {cheap}, and the best, wider and longer, on byte-level language
modelling; fitness is normalised against DeltaNet trained with the same budget and seeds."""
_CHEAP_TEXT = {
    "byte_lm": "byte-level language modelling (held-out bits per byte)",
    "mqar": "multi-query associative recall (MQAR, Zoology)",
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Search-space options (``--space_opt=key=value``), validated at construction."""

    # Stage 0, every candidate: cheap_task "byte_lm" (a short byte-LM run at the base width) or
    # "mqar". Every learning rate is trained at once and the best kept (by late training loss).
    # The byte-LM defaults are the recipe benchmarks/proxy_fidelity.py measured as "cheap_lm".
    cheap_task: str = "byte_lm"
    learning_rates: tuple[float, ...] = (3e-3, 1e-2)
    short_lm_steps: int = 200
    short_lm_batch: int = 8
    short_lm_seq_len: int = 128
    # MQAR (cheap_task=mqar) at several numbers of pairs (equal shares of each batch, accuracy
    # averaged).
    mqar_steps: int = 800
    mqar_batch: int = 24
    vocab_size: int = 512
    seq_len: int = 64
    num_pairs: tuple[int, ...] = (4, 8, 16)
    # Stage 1, promoted candidates: byte-level LM, lm_width times wider.
    lm_steps: int = 300
    lm_batch: int = 16
    lm_learning_rates: tuple[float, ...] = (3e-3,)
    lm_seq_len: int = 128
    lm_width: int = 2
    corpus: tuple[str, ...] = ()
    impl: str = "auto"
    chunk_size: int = 64
    param_budget: int = 600_000
    baseline: str = "deltanet"
    seeds: tuple[str, ...] = ()  # a subset of the six named seeds (empty: all); baseline included
    checkpoint: bool = True
    # Code mode: candidates are TokenMixer programs (code_mode.py), run in sandboxed workers.
    mode: str = "genome"
    sandbox_timeout_s: float = 1800.0
    sandbox_memory_gb: float = 16.0

    @classmethod
    def parse(cls, **raw: Any) -> Options:
        options = parse_options(cls, raw, "linear_attention")
        options.validate()
        return options

    def validate(self) -> None:
        """Raises ValueError naming the first option with a bad value."""
        for name in (
            "short_lm_steps", "short_lm_batch", "short_lm_seq_len", "mqar_steps", "mqar_batch",
            "lm_steps", "lm_batch", "lm_seq_len", "lm_width", "chunk_size", "param_budget",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"linear_attention option {name} must be >= 1")
        for name in ("learning_rates", "lm_learning_rates"):
            rates = getattr(self, name)
            if not rates or not all(0 < lr < float("inf") for lr in rates):
                raise ValueError(
                    f"linear_attention option {name}={','.join(map(str, rates))!r}: "
                    "give one or more finite learning rates > 0"
                )
        if self.cheap_task not in _CHEAP_TEXT:
            raise ValueError(
                f"linear_attention option cheap_task={self.cheap_task!r} ({', '.join(_CHEAP_TEXT)})"
            )
        if self.impl not in model.IMPLS:
            raise ValueError(
                f"linear_attention option impl={self.impl!r} ({', '.join(model.IMPLS)})"
            )
        if self.mode not in ("genome", "code"):
            raise ValueError(f"linear_attention option mode={self.mode!r} (genome, code)")
        if not (self.sandbox_timeout_s > 0 and self.sandbox_memory_gb > 0):
            raise ValueError(
                "linear_attention options sandbox_timeout_s and sandbox_memory_gb: > 0"
            )
        if self.baseline not in genome.SEEDS:
            raise ValueError(
                f"baseline {self.baseline!r} is not a seed ({', '.join(genome.SEEDS)})"
            )
        unknown = [name for name in self.seeds if name not in genome.SEEDS]
        if unknown:
            raise ValueError(
                f"linear_attention option seeds: {unknown} ({', '.join(genome.SEEDS)})"
            )
        if self.seeds and self.baseline not in self.seeds:
            raise ValueError(
                f"linear_attention option seeds must include the baseline {self.baseline!r}"
            )
        # MQAR's own argument checks, run now rather than at the first evaluation.
        if not self.num_pairs:
            raise ValueError("linear_attention option num_pairs: give one or more numbers")
        try:
            for pairs in self.num_pairs:
                data.make_mqar(
                    np.random.default_rng(0), 1, vocab_size=self.vocab_size,
                    seq_len=self.seq_len, num_pairs=pairs,
                )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"linear_attention MQAR options: {e}") from e
        if self.mqar_batch % len(self.num_pairs):
            raise ValueError(
                f"linear_attention option mqar_batch={self.mqar_batch} must be a multiple of the "
                f"{len(self.num_pairs)} numbers of pairs (num_pairs={self.num_pairs})"
            )

    def corpus_locations(self) -> list[str]:
        """Where the corpus's text lies on this machine: ``corpus`` paths, or every copy of
        the default corpus's module that a sandbox could otherwise read."""
        if self.corpus:
            return [os.path.abspath(p) for p in self.corpus]
        return data.default_corpus_locations()

    def load_corpus(self) -> np.ndarray:
        """The byte-LM corpus, checked to hold each byte-LM stage's training and validation
        windows."""
        windows = [("lm", self.lm_seq_len, self.lm_batch)]
        if self.cheap_task == "byte_lm":
            windows.append(("short_lm", self.short_lm_seq_len, self.short_lm_batch))
        try:
            corpus = data.load_corpus(self.corpus or None)
        except (OSError, ValueError) as e:
            raise ValueError(f"linear_attention option corpus: {e}") from e
        for prefix, seq_len, batch in windows:
            try:
                for split in data.SPLITS:
                    data.byte_lm_dataset(
                        corpus, seq_len=seq_len, batch_size=batch, seed=0, split=split
                    )
            except ValueError as e:
                raise ValueError(
                    f"linear_attention options corpus / {prefix}_seq_len / {prefix}_batch: {e}"
                ) from e
        return corpus


class LinearAttentionSpace(SearchSpace):
    name = "linear_attention"

    def __init__(self, **options: Any):
        self.options = Options.parse(**options)
        self._checked: dict[str, list[CheckFailure]] = {}
        # Read now, so a bad corpus fails when the space is built, before any work.
        self._corpus = self.options.load_corpus()
        self._checkpoint_dir: str | None = None
        self._code: CodeSpec | None = None
        if self.options.mode == "code":
            with open(code_mode.TEMPLATE, encoding="utf-8") as f:
                template = f.read()
            self._code = CodeSpec(template, code_mode.TEMPLATE, self._interface())
            programs.load_template(self._code)  # a template without markers fails here
            limits = sandbox.Limits(
                timeout_s=self.options.sandbox_timeout_s,
                memory_bytes=int(self.options.sandbox_memory_gb * (1 << 30)),
            )
            slots = workers.LazySlots(lambda: workers.Slots.for_jax(limits))
            self._programs = harness.Programs(code_mode.TARGET, limits, slots.get)
            # The corpus (and with it the held-out text) is out of every sandbox's sight.
            sandbox.hide(*self.options.corpus_locations())
            # MQAR's held-out examples come from a secret split (kept in the workdir by bind).
            self._held_out_split = 2 + secrets.randbits(62)

    def _interface(self) -> str:
        g = genome.SEEDS[self.options.baseline]
        return (
            f"Define class {code_mode.ENTRY}(nnx.Module) as the template's docstring says. The "
            f"rest of the model is fixed: d_model={g['d_model']}, num_heads={g['num_heads']}, "
            f"head_dim={g['head_dim']}, {g['num_layers']} layers, MLP {g['mlp']} x"
            f"{g['mlp_ratio']}; stage 1 multiplies d_model and head_dim by "
            f"{self.options.lm_width}. Parameter budget "
            f"{self.options.param_budget:,} (whole model, stage 0)."
        )

    # -------------------------------------------------------------------- contract

    def describe(self) -> TaskDescription:
        bpb = Metric("val_bpb", "min")
        if self.options.cheap_task == "mqar":
            cheap = Stage("mqar", "MQAR recall, every candidate", (Metric("mqar_accuracy", "max"),))
        else:
            cheap = Stage("byte_lm_short", "short byte-level LM, every candidate", (bpb,))
        return TaskDescription(
            title="Linear-attention architecture search",
            text=_TEXT.format(cheap=_CHEAP_TEXT[self.options.cheap_task]),
            metrics=cheap.metrics,
            stages=(cheap, Stage("byte_lm", "byte-level LM, wider model, promoted only", (bpb,))),
        )

    def seeds(self) -> dict[str, genome.Genome]:
        names = [n for n in genome.SEEDS if n in self.options.seeds or not self.options.seeds]
        if self._code is None:
            return {name: dict(genome.SEEDS[name]) for name in names}
        sources = {}
        for name in names:
            with open(os.path.join(code_mode.PROGRAMS, f"{name}.py"), encoding="utf-8") as f:
                sources[name] = {"source": f.read()}
        return sources

    def code_spec(self) -> CodeSpec | None:
        return self._code

    def baseline(self) -> str:
        return self.options.baseline

    def genome_schema(self) -> dict[str, Any]:
        return programs.source_schema() if self._code else genome.json_schema()

    def validate(self, candidate: genome.Genome) -> genome.Genome:
        if self._code is not None:
            return programs.validate_source(self._code, candidate)
        return genome.validate(candidate)

    def operators(self):
        return {} if self._code else genome.OPERATORS

    def model_config(self, candidate: genome.Genome, stage: int = 0) -> model.ModelConfig:
        """The model of a genome; of a program too, which this runs in-process (restore only)."""
        o = self.options
        mixer = None
        if self._code is not None:
            from search_spaces.linear_attention import program_api

            program_api.configure(o.chunk_size, o.impl)
            mixer = code_mode.load_mixer(candidate["source"])
            candidate = genome.SEEDS[o.baseline]  # the frame: everything but the mixer
        vocab, width = self._vocab_and_width(stage)
        return model.ModelConfig(
            tuple(candidate.items()), vocab, o.chunk_size, o.impl, width, mixer=mixer
        )

    def check(self, candidate: genome.Genome) -> list[CheckFailure]:
        key = fingerprint(candidate)
        if key not in self._checked and self._code is not None:
            self._checked[key] = self._programs.check(
                candidate["source"], self._request("check", 0, ())
            )
        if key not in self._checked:
            cfg = self.model_config(candidate)
            seq = self._check_seq_len()
            failures = [checks.check_param_budget(cfg, self.options.param_budget)]
            failures.append(checks.check_shapes(cfg, seq))
            if not any(failures):
                failures.append(checks.check_causality(cfg, seq))
                failures.append(checks.check_subquadratic(cfg, 4 * self.options.chunk_size))
            self._checked[key] = [f for f in failures if f is not None]
        return self._checked[key]

    def repair(
        self, candidate: genome.Genome, failures: Sequence[CheckFailure]
    ) -> genome.Genome | None:
        """Shrinks a model over the parameter budget (shape genes only); nothing else."""
        if self._code is not None:
            return None  # programs are repaired by a model (the Engineer), not by rules
        return repairs.repair(
            candidate,
            failures,
            lambda g: model.param_count(self.model_config(g)),
            self.options.param_budget,
        )

    def evaluate(
        self, candidates: Sequence[genome.Genome], stage: int, seeds: Sequence[int], devices
    ) -> list[EvalResult]:
        if self._code is not None:
            return harness.per_candidate(
                lambda c: self._evaluate_program(c, stage, seeds), candidates
            )
        o = self.options
        results = []
        for candidate in candidates:
            cfg = self.model_config(candidate, stage)
            start = time.perf_counter()
            task, budget = self.stage_task(stage)
            try:
                if isinstance(task, train.MQARConfig):
                    per_seed = train.train_mqar(cfg, task, budget, seeds, devices)
                else:
                    per_seed = train.train_byte_lm(cfg, task, budget, seeds, devices, self.corpus())
            except Exception as e:
                results.append(EvalResult(error=f"{type(e).__name__}: {e}"))
                continue
            errors = [r.error for r in per_seed if r.error]
            if errors:
                results.append(EvalResult(error=errors[0]))
                continue
            if stage > 0 and o.checkpoint and self._checkpoint_dir:
                failed = self._save(candidate, stage, seeds, [r.params for r in per_seed])
                if failed:
                    results.append(EvalResult(error=failed))
                    continue
            metrics = {s: r.metrics for s, r in zip(seeds, per_seed, strict=True)}
            results.append(EvalResult(metrics=metrics))
            # Progress while a step trains (the loop reports candidates once the step is done).
            metric = self.describe().stages[stage].metrics[0].name
            values = " ".join(f"{m[metric]:.3f}" for m in metrics.values())
            logging.info(
                "stage %d: trained %s genome %s in %.0f s, %s %s", stage,
                candidate["update_rule"], fingerprint(candidate)[:8],
                time.perf_counter() - start, metric, values,
            )  # fmt: skip
        return results

    def runs_per_candidate(self, stage: int, seeds: Sequence[int]) -> int:
        o = self.options
        return len(seeds) * len(o.learning_rates if stage == 0 else o.lm_learning_rates)

    def descriptors(self) -> tuple[DescriptorAxis, ...]:
        if self._code is not None:
            return ()  # a program's behaviour is not read off genes
        return (
            DescriptorAxis("update_rule", 0, len(genome.UPDATE_RULES), len(genome.UPDATE_RULES)),
            DescriptorAxis("log2_params", 15, 21, 6),
        )

    def describe_genome(self, candidate: genome.Genome) -> tuple[float, ...]:
        if self._code is not None:
            return ()
        rule = list(genome.UPDATE_RULES).index(candidate["update_rule"])
        return (rule + 0.5, float(np.log2(model.param_count(self.model_config(candidate)))))

    def bind(self, workdir: str) -> None:
        self._checkpoint_dir = storage.join(workdir, "checkpoints")
        if self._code is not None:  # the same secret held-out split for a resumed run
            path = storage.epath(storage.join(workdir, "held_out_split"))
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(self._held_out_split))
            self._held_out_split = int(path.read_text())

    def cognition_seed(self) -> str:
        return os.path.join(os.path.dirname(__file__), "cognition.jsonl")

    # -------------------------------------------------------------------- helpers

    def stage_task(
        self, stage: int
    ) -> tuple[train.MQARConfig | train.ByteLMConfig, train.TrainConfig]:
        """A stage's task and training budget."""
        o = self.options
        if stage > 0:
            return (
                train.ByteLMConfig(o.lm_seq_len),
                train.TrainConfig(o.lm_steps, o.lm_batch, o.lm_learning_rates),
            )
        if o.cheap_task == "mqar":
            return (
                train.MQARConfig(o.vocab_size, o.seq_len, o.num_pairs),
                train.TrainConfig(o.mqar_steps, o.mqar_batch, o.learning_rates),
            )
        return (
            train.ByteLMConfig(o.short_lm_seq_len),
            train.TrainConfig(o.short_lm_steps, o.short_lm_batch, o.learning_rates),
        )

    def validation_windows(self, stage: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The held-out byte windows a byte-LM stage's val_bpb is measured on."""
        task, budget = self.stage_task(stage)
        if not isinstance(task, train.ByteLMConfig):
            raise ValueError(f"stage {stage} is not byte-level LM")
        return train.byte_lm_validation(self.corpus(), task, budget.batch_size)

    def _vocab_and_width(self, stage: int) -> tuple[int, int]:
        if stage > 0:
            return data.BYTE_VOCAB_SIZE, self.options.lm_width
        if self.options.cheap_task == "mqar":
            return self.options.vocab_size, 1
        return data.BYTE_VOCAB_SIZE, 1

    def _check_seq_len(self) -> int:
        """The length the stage-0 model is checked at (shapes, causality)."""
        task, _ = self.stage_task(0)
        return task.seq_len

    def corpus(self) -> np.ndarray:
        return self._corpus

    def _request(self, job: str, stage: int, seeds: Sequence[int]) -> dict:
        """What a sandboxed worker needs: the stage's model, task and budget, resolved here."""
        o = self.options
        task, budget = self.stage_task(stage)

        def model_of(stage):
            vocab, width = self._vocab_and_width(stage)
            return {
                "vocab_size": vocab,
                "chunk_size": o.chunk_size,
                "impl": o.impl,
                "width_multiplier": width,
            }

        probes = []  # causality at each stage's training batch and length, with its model
        for s in range(len(self.describe().stages)):
            s_task, s_budget = self.stage_task(s)
            probes.append(
                {"model": model_of(s), "seq_len": s_task.seq_len, "batch": s_budget.batch_size}
            )
        return json.loads(json.dumps({
            "job": job,
            "stage": stage,
            "seeds": [int(s) for s in seeds],
            "frame": dict(genome.SEEDS[o.baseline]),
            "model": model_of(stage),
            "task_kind": "mqar" if isinstance(task, train.MQARConfig) else "byte_lm",
            "task": dataclasses.asdict(task),
            "budget": dataclasses.asdict(budget),
            "checks": {"param_budget": o.param_budget, "seq_len": self._check_seq_len(),
                       "stages": probes},
        }))  # fmt: skip

    def _evaluate_program(self, candidate, stage: int, seeds: Sequence[int]) -> EvalResult:
        """Trains a program in a sandboxed worker; the metrics are computed and verified here."""
        start = time.perf_counter()
        task, budget = self.stage_task(stage)
        vocab, _ = self._vocab_and_width(stage)
        if isinstance(task, train.MQARConfig):
            held = code_mode.held_out_mqar(task, seeds, self._held_out_split)
            names, training = ("mqar_loss", "mqar_accuracy"), {}
        else:
            held = code_mode.held_out_bytes(self.validation_windows(stage), seeds)
            names = ("val_nats", "val_byte_accuracy")
            windows = [train.byte_lm_training_windows(self._corpus, task, budget, s) for s in seeds]
            training = {"windows": np.stack(windows)}
        result, params = code_mode.train_and_score(
            self._programs, candidate["source"], self._request("train", stage, seeds), training,
            held, vocab, names, np.random.default_rng(secrets.randbits(128)),
            self.options.param_budget if stage == 0 else None,
        )  # fmt: skip
        if result.error is None and names[0] == "val_nats":
            for values in result.metrics.values():
                values["val_bpb"] = values.pop("val_nats") / math.log(2)
        o = self.options
        if result.error is None and stage > 0 and o.checkpoint and self._checkpoint_dir:
            failed = self._save(candidate, stage, seeds, params)
            if failed:
                result = EvalResult(error=failed, extra=result.extra)
        logging.info(
            "stage %d: trained program %s in %.0f s (%.0f s of it verifying): %s", stage,
            fingerprint(candidate)[:8], time.perf_counter() - start,
            result.extra.get("verification_s", 0.0), result.error or dict(result.metrics),
        )  # fmt: skip
        return result

    def _save(self, candidate, stage: int, seeds: Sequence[int], params: list) -> str | None:
        """Checkpoints a trained candidate; None, or (logged) why it could not, which becomes
        this candidate's error and no one else's."""
        from search_spaces.linear_attention import checkpoints

        try:
            checkpoints.save(
                storage.join(self._checkpoint_dir, fingerprint(candidate)),
                candidate,
                stage,
                {int(s): p for s, p in zip(seeds, params, strict=True)},
                json.loads(json.dumps(dataclasses.asdict(self.options))),
            )
        except Exception as e:
            failed = f"checkpoint not saved: {type(e).__name__}: {e}"
            logging.error("stage %d: %s %s", stage, fingerprint(candidate)[:8], failed)
            return failed
        return None


def make(**options: Any) -> LinearAttentionSpace:
    return LinearAttentionSpace(**options)
