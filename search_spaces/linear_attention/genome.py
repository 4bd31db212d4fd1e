"""The typed genome of a linear-attention language model, its seeds and its operators.

A genome is a flat JSON object. ``validate`` fills defaults, refuses unknown fields and
out-of-range values (naming them), and resets genes that other genes switch off (decay, beta,
conv_size, mlp_ratio) to their defaults, so two genomes that build the same model have the same
fingerprint (the novelty check relies on it). Operators only ever produce genomes that validate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolve_jax.search_space import GenomeError, Operator

# Update rules as the genome names them, and the mixer each one runs.
UPDATE_RULES = {
    "linear": "linear",  # additive linear attention
    "retention": "scalar_decay",  # fixed per-head decay (RetNet)
    "scalar_decay": "scalar_decay",  # data-dependent scalar decay (Mamba2)
    "channel_decay": "channel_decay",  # per-key-channel gate (GLA)
    "delta": "delta",  # DeltaNet
    "gated_delta": "gated_delta",  # Gated DeltaNet
}
DATA_DECAY_RULES = ("scalar_decay", "channel_decay", "gated_delta")
DELTA_RULES = ("delta", "gated_delta")


@dataclasses.dataclass(frozen=True)
class Gene:
    name: str
    choices: tuple[Any, ...]
    default: Any
    group: str
    description: str
    # The gene matters only when this predicate of the genome holds; otherwise it is reset to
    # its default (canonical form).
    active: Any = None

    def is_active(self, genome: dict[str, Any]) -> bool:
        return self.active is None or self.active(genome)


GENES: tuple[Gene, ...] = (
    Gene("update_rule", tuple(UPDATE_RULES), "delta", "mixer", "state update rule"),
    Gene(
        "decay",
        ("mamba2", "logsigmoid"),
        "mamba2",
        "mixer",
        "data-dependent decay: -exp(A) softplus(Wx + dt) (Mamba2) or logsigmoid(Wx)/16 (GLA)",
        active=lambda g: g["update_rule"] in DATA_DECAY_RULES,
    ),
    Gene(
        "beta",
        ("sigmoid", "sigmoid_x2"),
        "sigmoid",
        "mixer",
        "delta-rule write strength; x2 allows negative eigenvalues",
        active=lambda g: g["update_rule"] in DELTA_RULES,
    ),
    Gene(
        "feature_map", ("identity", "elu_plus_one", "relu", "silu"), "silu", "qk", "phi(q), phi(k)"
    ),
    Gene("qk_norm", ("none", "l2", "sum"), "l2", "qk", "normalisation of q and k per head"),
    Gene("short_conv", (True, False), True, "conv", "depthwise causal conv on q, k, v"),
    Gene(
        "conv_size",
        (2, 3, 4, 6, 8),
        4,
        "conv",
        "short-conv kernel size",
        active=lambda g: g["short_conv"],
    ),
    Gene("output_norm", ("none", "rmsnorm"), "rmsnorm", "output", "per-head output norm"),
    Gene("output_gate", ("none", "silu", "sigmoid"), "silu", "output", "gate(W x) * o"),
    Gene("num_heads", (1, 2, 4), 2, "shape", "heads"),
    Gene("head_dim", (16, 32, 64), 32, "shape", "query/key dim per head"),
    Gene("expand_v", (1, 2), 1, "shape", "value dim = expand_v * head_dim"),
    Gene("mlp", ("swiglu", "gelu", "none"), "swiglu", "shape", "channel mixer"),
    Gene(
        "mlp_ratio",
        (2, 3, 4),
        2,
        "shape",
        "MLP hidden = ratio * d_model",
        active=lambda g: g["mlp"] != "none",
    ),
    Gene("num_layers", (1, 2, 3, 4), 2, "shape", "blocks"),
    Gene("d_model", (32, 64, 128), 64, "shape", "width"),
)
GENE_BY_NAME = {g.name: g for g in GENES}
GROUPS = tuple(dict.fromkeys(g.group for g in GENES))

Genome = dict[str, Any]


def validate(genome: Genome) -> Genome:
    """Returns the canonical genome; raises GenomeError naming an unknown field or bad value."""
    if not isinstance(genome, dict):
        raise GenomeError(f"a genome is a JSON object, not {type(genome).__name__}")
    unknown = sorted(set(genome) - set(GENE_BY_NAME))
    if unknown:
        raise GenomeError(f"unknown genome field(s) {unknown}")
    full = {}
    for gene in GENES:
        value = genome.get(gene.name, gene.default)
        # bool is an int in Python: refuse True for an integer gene and 1 for a boolean one.
        same_type = any(type(value) is type(c) for c in gene.choices)
        if value not in gene.choices or not same_type:
            raise GenomeError(
                f"genome field {gene.name!r} = {value!r} is out of range "
                f"(allowed: {list(gene.choices)})"
            )
        full[gene.name] = value
    for gene in GENES:
        if not gene.is_active(full):
            full[gene.name] = gene.default
    return full


def json_schema() -> dict[str, Any]:
    """A JSON schema of the genome, for structured LLM output."""
    return {
        "type": "object",
        "properties": {
            g.name: {"enum": list(g.choices), "description": g.description} for g in GENES
        },
        "additionalProperties": False,
    }


# The named seeds, each in its published form with the reference implementations' defaults
# (flash-linear-attention) where the paper is silent. Short convolutions only where the paper
# or reference has them (Mamba2, DeltaNet, Gated DeltaNet); every seed keeps a per-head
# RMSNorm on its output. Deviations, and why, are listed in the README ("The seeds").
SEEDS: dict[str, Genome] = {
    name: validate(genome)
    for name, genome in {
        # Vanilla linear attention (Katharopoulos et al. 2020): elu + 1 features, no gate, no
        # conv. The per-head output RMSNorm stands in for the paper's normaliser 1 / phi(q)^T z.
        "linear_attention": dict(
            update_rule="linear", feature_map="elu_plus_one", qk_norm="none", short_conv=False,
            output_gate="none",
        ),
        # RetNet: fixed per-head decay 1 - 2^(-5-h), value dim 2x, per-head norm, swish gate.
        "retnet": dict(
            update_rule="retention", feature_map="identity", qk_norm="none", short_conv=False,
            expand_v=2,
        ),
        # GLA: rank-16 gate logsigmoid(.)/16 per key channel, per-head norm, swish gate, no
        # conv. Key dim d, not the paper's d/2: code mode fixes K, and so does this twin.
        "gla": dict(
            update_rule="channel_decay", decay="logsigmoid", feature_map="identity",
            qk_norm="none", short_conv=False,
        ),
        # Mamba2 (SSD): data-dependent scalar decay, conv + SiLU on x, B, C, inner width 2x,
        # gated RMSNorm output.
        "mamba2": dict(update_rule="scalar_decay", decay="mamba2", qk_norm="none", expand_v=2),
        # DeltaNet: SiLU + L2 on q, k; sigmoid beta; short conv; RMSNorm output, no gate.
        "deltanet": dict(update_rule="delta", output_gate="none"),
        # Gated DeltaNet: delta rule with Mamba2-style decay, value dim 2x and an output gate.
        "gated_deltanet": dict(update_rule="gated_delta", decay="mamba2", expand_v=2),
    }.items()
}  # fmt: skip


# ---------------------------------------------------------------------------------- operators


def _mutate_group(group: str):
    genes = [g for g in GENES if g.group == group]

    def mutate(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
        child = dict(parents[0])
        # Only genes that matter for this genome, so the child differs in behaviour.
        live = [g for g in genes if g.is_active(child)] or genes
        gene = live[int(rng.integers(len(live)))]
        others = [c for c in gene.choices if c != child[gene.name]]
        child[gene.name] = others[int(rng.integers(len(others)))]
        return validate(child)

    return mutate


def _crossover_uniform(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
    a, b = parents[0], parents[1]
    return validate({g.name: (a if rng.random() < 0.5 else b)[g.name] for g in GENES})


def _crossover_mixer(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
    """The token mixer (update rule, qk, conv, output) of one parent in the body of the other."""
    a, b = parents[0], parents[1]
    return validate({g.name: (b if g.group != "shape" else a)[g.name] for g in GENES})


OPERATORS: dict[str, Operator] = {
    **{
        f"mutate_{group}": Operator(
            f"mutate_{group}",
            1,
            _mutate_group(group),
            f"change one {group} gene ("
            + ", ".join(g.name for g in GENES if g.group == group)
            + ")",
        )
        for group in GROUPS
    },
    "crossover_uniform": Operator(
        "crossover_uniform", 2, _crossover_uniform, "each gene from either parent"
    ),
    "crossover_mixer": Operator(
        "crossover_mixer", 2, _crossover_mixer, "the reference's token mixer in the parent's body"
    ),
}
