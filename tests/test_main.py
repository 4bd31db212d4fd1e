"""The driver's input checks: every bad value is one line and exit 2, before any work."""

import dataclasses
import os

import pytest
from absl import flags

from evolve_jax import loop
from evolve_jax import main as driver
from search_spaces.linear_attention.space import Options

# One bad value per linear-attention option; the test below fails when an option is added
# without one.
BAD_OPTIONS = {
    "cheap_task": "recall",
    "short_lm_steps": "0",
    "short_lm_batch": "-2",
    "short_lm_seq_len": "100000000",
    "mqar_steps": "0",
    "mqar_batch": "many",
    "vocab_size": "4",
    "seq_len": "3",
    "num_pairs": "1000",
    "learning_rates": "-1e-3",
    "lm_learning_rates": "0",
    "lm_steps": "0",
    "lm_batch": "0",
    "lm_seq_len": "100000000",
    "lm_width": "0",
    "corpus": "/nonexistent/corpus.txt",
    "impl": "cuda",
    "chunk_size": "0",
    "param_budget": "0",
    "baseline": "transformer",
    "checkpoint": "maybe",
    "seeds": "deltanet,transformer",
    "mode": "program",
    "sandbox_timeout_s": "0",
    "sandbox_memory_gb": "-1",
}


@pytest.fixture(autouse=True)
def _no_search(monkeypatch):
    # The driver appends to XLA_FLAGS (--deterministic); later tests' subprocesses inherit it.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

    def search_started(*args, **kwargs):
        raise AssertionError("the search started: the bad value was not caught before any work")

    # A value that slips through fails at once instead of running a whole search.
    monkeypatch.setattr(loop, "run", search_started)


def _main(capsys, *argv):
    """Runs the driver in this process; returns (exit code, stderr)."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evolve_jax.main", *argv])
    try:
        with pytest.raises(SystemExit) as stop:
            driver.main(["evolve_jax.main"])
    finally:
        flags.FLAGS.unparse_flags()
    return stop.value.code, capsys.readouterr().err


def test_every_option_has_a_bad_value_below():
    assert set(BAD_OPTIONS) == {f.name for f in dataclasses.fields(Options)}


@pytest.mark.parametrize("key", sorted(BAD_OPTIONS))
def test_bad_space_option_is_one_line_exit_2_before_any_work(capsys, tmp_path, key):
    workdir = str(tmp_path / "never")
    code, err = _main(
        capsys,
        "--search_space=linear_attention",
        f"--workdir={workdir}",
        f"--space_opt={key}={BAD_OPTIONS[key]}",
    )
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    # Named by key, except where MQAR's own check names the argument it refuses.
    names = {"vocab_size": "vocab", "seq_len": "seq_len", "num_pairs": "num_pairs"}
    assert names.get(key, key) in err
    assert not os.path.exists(workdir)


# Stage options that make the task impossible, with what the one-line error must name.
IMPOSSIBLE_STAGES = [
    ({"learning_rates": ""}, "learning_rates"),
    ({"learning_rates": "1e-3,-1"}, "learning_rates"),
    ({"learning_rates": "inf"}, "learning_rates"),
    ({"lm_learning_rates": ","}, "lm_learning_rates"),
    ({"short_lm_batch": "100000000"}, "short_lm_batch"),  # more windows than the corpus holds
    ({"num_pairs": ""}, "num_pairs"),
    ({"vocab_size": "64", "num_pairs": "4,40"}, "num_pairs=40"),  # 31 distinct keys
    ({"seq_len": "64", "num_pairs": "8,17"}, "num_pairs=17"),  # 64 tokens hold 16 pairs
    ({"mqar_batch": "32", "num_pairs": "4,8,16"}, "mqar_batch"),  # 3 equal shares
]


@pytest.mark.parametrize(("options", "named"), IMPOSSIBLE_STAGES)
def test_impossible_stage_is_one_line_exit_2_before_any_work(capsys, tmp_path, options, named):
    workdir = str(tmp_path / "never")
    code, err = _main(
        capsys,
        "--search_space=linear_attention",
        f"--workdir={workdir}",
        *(f"--space_opt={k}={v}" for k, v in options.items()),
    )
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert named in err
    assert not os.path.exists(workdir)


def test_platform_that_is_missing_stops_before_any_work(capsys, tmp_path):
    workdir = str(tmp_path / "never")
    code, err = _main(
        capsys, "--search_space=tests.toy_space:make", f"--workdir={workdir}", "--platform=gpu"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--platform=gpu but JAX's backend is cpu" in err and "cuda extra" in err
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_gpu_ops_are_requested_before_jax_starts(capsys, tmp_path, deterministic):
    code, _ = _main(
        capsys, "--search_space=tests.toy_space:make", f"--workdir={tmp_path / 'never'}",
        "--platform=tpu", f"--deterministic={str(deterministic).lower()}",
    )  # fmt: skip
    assert code == 2  # stopped by the platform check, after the flag was set
    assert ("--xla_gpu_deterministic_ops=true" in os.environ["XLA_FLAGS"]) == deterministic


def test_gpu_and_tpu_flagfiles_require_their_platform():
    for name, platform in (("gpu", "gpu"), ("tpu_pod", "tpu")):
        with open(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.flags")) as f:
            assert f"--platform={platform}\n" in f.read()


@pytest.mark.parametrize("name", ["quickstart", "gpu", "tpu_pod", "la_code"])
def test_flagfile_space_options_are_valid(name):
    # Every stage option of a shipped flagfile passes the checks a run makes before any work
    # (the accelerator flagfiles cannot be run here).
    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.flags")
    with open(path) as f:
        pairs = [line.strip().split("=", 2)[1:] for line in f if line.startswith("--space_opt=")]
    options = Options.parse(**dict(pairs))
    assert options.learning_rates and options.cheap_task == "byte_lm"


def test_gcs_workdir_without_credentials_is_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    # No key file, no gcloud login under this HOME, and no metadata server to ask.
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    code, err = _main(
        capsys, "--search_space=tests.toy_space:make", "--workdir=gs://some-bucket/runs/x"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is on GCS but no Google credentials were found" in err
