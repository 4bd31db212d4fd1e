"""Device layout (evolve_jax/evaluation/layout.py) and the Engineer's use of it."""

import os
import threading
import time

import pytest

from evolve_jax.agents.engineer import RuleEngineer
from evolve_jax.evaluation.layout import Layout, plan
from evolve_jax.loop import same_history
from evolve_jax.memory.history import History
from evolve_jax.search_space import EvalResult
from tests.conftest import TOY, run_cli
from tests.toy_space import ToySpace


def test_eight_candidates_of_two_runs_fill_eight_devices_in_pairs():
    layout = plan(list(range(8)), runs=2, candidates=8)
    assert layout.group_size == 2 and len(layout.groups) == 4
    assert layout.rounds == 2 and layout.fill == 1.0 and layout.padding == 0
    # One candidate at a time over every device (the layout before groups): 4x the rounds.
    everything = Layout((tuple(range(8)),), runs=2, candidates=8)
    assert everything.rounds == 8 and everything.fill == 0.25


@pytest.mark.parametrize(
    ("devices", "runs", "candidates", "size"),
    [
        (4, 3, 4, 1),  # odd runs: one device per candidate, nothing padded
        (4, 1, 1, 1),  # a single run is never copied onto idle devices
        (4, 8, 1, 4),  # one big candidate takes every device
        (8, 4, 2, 4),  # two candidates side by side
        (1, 6, 3, 1),
        (6, 2, 3, 2),
    ],
)
def test_the_plan_never_pads_when_a_group_size_divides_the_runs(devices, runs, candidates, size):
    layout = plan(list(range(devices)), runs, candidates)
    assert layout.group_size == size and layout.padding == 0
    groups = [set(g) for g in layout.groups]
    assert set().union(*groups) == set(range(devices))
    assert sum(len(g) for g in groups) == devices  # disjoint


def test_bad_layout_requests_are_refused():
    with pytest.raises(ValueError, match="no devices"):
        plan([], 1, 1)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        plan([0], 0, 1)


class _Recording(ToySpace):
    """Records which devices each evaluation got and how many runs it held."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.lock = threading.Lock()

    def evaluate(self, genomes, stage, seeds, devices):
        with self.lock:
            self.calls.append((tuple(devices), [tuple(g["x"]) for g in genomes], len(seeds)))
        time.sleep(0.2)  # long enough that the groups' calls overlap
        return [
            EvalResult(metrics={s: {"reward": -float(g["x"][0])} for s in seeds}) for g in genomes
        ]


def test_engineer_runs_four_candidates_of_two_seeds_on_disjoint_pairs_without_duplicates():
    space = _Recording()
    engineer = RuleEngineer(space, devices=[f"d{i}" for i in range(8)])
    genomes = [{"x": [float(i), 0.0, 0.0, 0.0], "shape": "bowl"} for i in range(4)]
    outcomes = engineer.run(genomes, {}, 0, [0, 1])
    assert [o.status for o in outcomes] == ["ok"] * 4
    assert [o.metrics["0"]["reward"] for o in outcomes] == [0.0, -1.0, -2.0, -3.0]
    groups = [devices for devices, _, _ in space.calls]
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2] and len(set().union(*groups)) == 8
    evaluated = sorted(x for _, xs, _ in space.calls for x in xs)
    assert evaluated == sorted(tuple(g["x"]) for g in genomes)  # each exactly once
    usage = engineer.take_usage()
    assert usage["evaluations"] == 4 and set(usage["processes"]) == {"0"}
    assert 0.5 < usage["utilisation"] <= 1.0
    assert engineer.take_usage()["evaluations"] == 0


def test_a_search_on_eight_cpu_devices_records_its_layout_and_utilisation(tmp_path, monkeypatch):
    workdir = str(tmp_path / "eight")
    flags = os.environ["XLA_FLAGS"].replace(
        "--xla_force_host_platform_device_count=4", "--xla_force_host_platform_device_count=8"
    )
    monkeypatch.setenv("XLA_FLAGS", flags)  # the driver's process gets 8 CPU devices
    done = run_cli(
        "evolve_jax.main", f"--search_space={TOY}", f"--workdir={workdir}", "--steps=1",
        "--samples_per_step=4", "--eval_seeds=2", "--promote_top_k=0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "step 1 stage 0: 4 evaluation(s) in group(s) of 2 of 8 device(s), 2 run(s) each" in (
        done.stderr
    )
    records = dict(History(workdir).records("utilisation"))
    assert set(records) == {"main/000000/00", "main/000001/00"}
    step = records["main/000001/00"]
    assert step["layout"] == {"devices": 8, "group_size": 2, "runs_per_candidate": 2}
    assert 0 < step["utilisation"] <= 1.0


def test_the_same_search_on_1_4_and_8_cpu_devices_gives_the_same_history(tmp_path, monkeypatch):
    flags = os.environ["XLA_FLAGS"]
    histories = []
    for count in (1, 4, 8):
        workdir = str(tmp_path / f"d{count}")
        monkeypatch.setenv(
            "XLA_FLAGS",
            flags.replace(
                "--xla_force_host_platform_device_count=4",
                f"--xla_force_host_platform_device_count={count}",
            ),
        )
        done = run_cli(
            "evolve_jax.main", f"--search_space={TOY}", f"--workdir={workdir}", "--steps=2",
            "--samples_per_step=4", "--eval_seeds=2", "--promote_top_k=1",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"JAX backend cpu: {count} device(s)" in done.stderr
        histories.append(History(workdir).nodes())
    assert len(histories[0]) == 3 + 2 * 4
    assert same_history(histories[0], histories[1]) and same_history(histories[0], histories[2])
