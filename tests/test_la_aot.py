"""Ahead-of-time compilation of a candidate's training (search_spaces/linear_attention/aot.py)."""

import json

import jax
import pytest

from search_spaces.linear_attention import aot
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.conftest import run_cli

TINY = dict(lm_steps="4", lm_batch="2", lm_seq_len="32", chunk_size="16", lm_width="1")


def test_memory_analysis_counts_the_training_data_held_by_the_program():
    devices = jax.local_devices()[:1]
    small = aot.analyse(LinearAttentionSpace(**TINY), "deltanet", 1, 1, devices)
    longer = aot.analyse(
        LinearAttentionSpace(**{**TINY, "lm_steps": "8"}), "deltanet", 1, 1, devices
    )
    assert small["runs"] == 1 and small["bytes_per_device"] > small["argument_bytes"] > 0
    # 4 more steps of byte windows, [batch 2, length 32 + 1] uint8 (targets are the inputs
    # shifted by one), once for the seed.
    assert longer["argument_bytes"] - small["argument_bytes"] == 4 * 2 * 33
    # Two learning rates: two runs, the data still once: only the runs' parameters double.
    rates = aot.analyse(
        LinearAttentionSpace(**{**TINY, "lm_learning_rates": "1e-3,3e-3"}), "deltanet", 1, 1,
        devices,
    )  # fmt: skip
    data = 4 * 2 * 33 + 4 * 2 * 33  # training and held-out windows (4 held-out batches)
    per_run = small["argument_bytes"] - data
    assert rates["runs"] == 2 and rates["argument_bytes"] == 2 * per_run + data
    # Two seeds over two devices: one run each; every device holds both seeds' windows.
    pair = aot.analyse(LinearAttentionSpace(**TINY), "deltanet", 1, 2, jax.local_devices()[:2])
    assert pair["runs_per_device"] == 1
    assert pair["argument_bytes"] == small["argument_bytes"] + 4 * 2 * 33


def test_mqar_stage_is_refused():
    space = LinearAttentionSpace(**TINY, cheap_task="mqar")
    with pytest.raises(ValueError, match="stage 0 is not byte-level LM"):
        aot.analyse(space, "deltanet", 0, 1, jax.local_devices()[:1])


def test_a_program_over_the_chip_memory_exits_1_with_one_line():
    args = [f"--space_opt={k}={v}" for k, v in TINY.items()]
    done = run_cli("search_spaces.linear_attention.aot", "--topology=cpu", "--hbm_gib=1e-6",
                   "--architecture=deltanet", *args)  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["bytes_per_device"] > report["hbm_bytes"] == 1073
    error = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(error) == 1 and "needs" in error[0] and "GiB per device" in error[0]


def test_an_unknown_topology_is_one_line_exit_2():
    done = run_cli("search_spaces.linear_attention.aot", "--topology=v99:1x1")
    assert done.returncode == 2
    error = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: topology 'v99:1x1'")
