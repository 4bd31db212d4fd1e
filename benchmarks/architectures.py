"""The 14 architectures the linear-attention benchmarks measure, fixed before any result.

The six named seeds and eight mutants, some deliberately weak; each mutant's name says what
changed from the seed it starts from.
"""

from search_spaces.linear_attention import genome

_S = genome.SEEDS
ARCHITECTURES: dict[str, dict] = {
    **{name: dict(g) for name, g in _S.items()},
    # Deliberately weak: raw linear attention, no normalisation anywhere, no conv.
    "linear_unnormalised": {
        **_S["linear_attention"], "feature_map": "identity", "output_norm": "none",
    },
    "linear_attention_1_layer": {**_S["linear_attention"], "num_layers": 1},
    "deltanet_1_layer": {**_S["deltanet"], "num_layers": 1},
    "deltanet_no_conv": {**_S["deltanet"], "short_conv": False},
    "deltanet_negative_eigenvalues": {**_S["deltanet"], "beta": "sigmoid_x2"},
    "gated_deltanet_gla_gate": {**_S["gated_deltanet"], "decay": "logsigmoid"},
    "mamba2_no_conv": {**_S["mamba2"], "short_conv": False},
    "linear_conv_silu_l2": {
        **_S["linear_attention"], "short_conv": True, "feature_map": "silu", "qk_norm": "l2",
    },
}  # fmt: skip
ARCHITECTURES = {name: genome.validate(g) for name, g in ARCHITECTURES.items()}
