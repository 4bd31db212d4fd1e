"""benchmarks/proxy_fidelity.py measures the recipe the search ships as its cheap stage."""

import numpy as np

from benchmarks import proxy_fidelity
from search_spaces.linear_attention import genome
from search_spaces.linear_attention.space import LinearAttentionSpace


def test_shipped_stage_0_is_the_measured_cheap_lm_recipe():
    spec = proxy_fidelity.STAGES["cheap_lm"]
    measured = LinearAttentionSpace(**spec.space_options)
    shipped = LinearAttentionSpace()
    assert shipped.options.cheap_task == "byte_lm"
    assert shipped.stage_task(0) == measured.stage_task(spec.index)
    g = genome.SEEDS["deltanet"]
    assert shipped.model_config(g, 0) == measured.model_config(g, spec.index)
    for a, b in zip(
        shipped.validation_windows(0), measured.validation_windows(spec.index), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    cheap = shipped.describe().stages[0]
    assert (cheap.metrics[0].name, cheap.metrics[0].direction) == (spec.metric, spec.direction)


def test_every_architecture_is_a_valid_genome_and_the_mqar_stage_is_mqar():
    assert len(proxy_fidelity.ARCHITECTURES) >= 12
    assert all(genome.SEEDS[name] == proxy_fidelity.ARCHITECTURES[name] for name in genome.SEEDS)
    mqar = proxy_fidelity.STAGES["mqar"]
    assert LinearAttentionSpace(**mqar.space_options).describe().stages[0].name == "mqar"
