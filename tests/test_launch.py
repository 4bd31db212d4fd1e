"""The local-GPU launcher: what it installs and runs (``--dry-run`` prints, runs nothing)."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _launcher(tmp_path, venv_python: str | None) -> str:
    """A checkout with the launcher and, optionally, a .venv whose python is ``venv_python``."""
    os.makedirs(tmp_path / "launch")
    shutil.copy(os.path.join(REPO, "launch", "local_gpus.sh"), tmp_path / "launch")
    if venv_python is not None:
        os.makedirs(tmp_path / ".venv" / "bin")
        os.symlink(venv_python, tmp_path / ".venv" / "bin" / "python")
    return str(tmp_path / "launch" / "local_gpus.sh")


def _dry_run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", script, "--dry-run", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def test_existing_cpu_venv_gets_the_cuda_extra(tmp_path):
    # This interpreter has no CUDA plugin for JAX, like the README's CPU install.
    done = _dry_run(_launcher(tmp_path, sys.executable), "--gpus=0,1", "--", "--steps=3")
    assert "no CUDA plugin" in done.stderr
    lines = done.stdout.splitlines()
    assert "would run: .venv/bin/pip install -q -c constraints.txt -e .\\[cuda\\]" in lines
    assert "would set CUDA_VISIBLE_DEVICES=0,1" in lines
    assert lines[-1] == (
        "would run: .venv/bin/python -m evolve_jax.main --flagfile=configs/gpu.flags --steps=3"
    )


def test_missing_venv_is_created_with_the_cuda_extra(tmp_path):
    done = _dry_run(_launcher(tmp_path, None), "--workdir=runs/g")
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "would run: python3 -m venv .venv",
        "would run: .venv/bin/pip install -q -c constraints.txt -e .\\[cuda\\]",
    ]
    assert lines[-1].endswith("--flagfile=configs/gpu.flags --workdir=runs/g")


def test_venv_with_the_cuda_plugin_is_used_as_it_is(tmp_path):
    fake = tmp_path / "python_with_cuda"
    fake.write_text("#!/bin/sh\nexit 0\n")  # every import succeeds
    fake.chmod(0o755)
    done = _dry_run(_launcher(tmp_path / "checkout", str(fake)))
    assert "pip install" not in done.stdout and "no CUDA plugin" not in done.stderr


def test_unknown_argument_is_refused(tmp_path):
    done = subprocess.run(
        ["bash", _launcher(tmp_path, None), "--gpu=0"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown argument --gpu=0" in done.stderr


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    path = os.path.join(REPO, "launch", script)
    return subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=60)


def test_tpu_pod_preflight_compiles_both_stages_before_creating_anything():
    done = _launch(
        "tpu_pod.sh", "--dry-run", "--name=pod", "--zone=z", "--workdir=gs://b/r",
        "--topology=v5p:2x2x2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for stage in (0, 1):
        assert lines[stage] == (
            "would run: .venv/bin/python -m search_spaces.linear_attention.aot "
            "--topology=v5p:2x2x2 --config=configs/tpu_pod.flags --architecture=gated_deltanet "
            f"--stage={stage}"
        )
    assert "tpu-vm create" in lines[3]


def test_tpu_pod_dry_run_runs_every_worker_as_one_job():
    done = _launch(
        "tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-central2-b", "--project=p",
        "--workdir=gs://bucket/runs/la", "--", "--steps=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    where = "--zone=us-central2-b --project=p"
    assert lines[1] == (
        f"would run: gcloud compute tpus tpu-vm create pod {where} "
        "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5"
    )
    copy, start, follow = lines[3], lines[4], lines[5]
    assert copy.startswith("would run: gcloud compute tpus tpu-vm scp ")
    assert copy.endswith(f"pod:evolve_jax.tgz {where} --worker=all")
    assert f"ssh pod {where} --worker=all" in start and "-e \\'.[tpu]\\'" in start
    assert (
        "nohup python -m evolve_jax.main --flagfile=configs/tpu_pod.flags "
        "--workdir=gs://bucket/runs/la --distributed=on --steps=3 > ~/evolve_jax.log"
    ) in start
    assert "--worker=0" in follow and "tail" in follow
    assert lines[6] == "would run: gcloud storage cat gs://bucket/runs/la/report.txt"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--name=pod", "--workdir=gs://b/r"), "--zone is required"),
        (("--name=pod", "--zone=z", "--workdir=runs/la"), "must be a gs:// path"),
        (("--name=pod", "--zone=z", "--workdir=gs://b/r", "--flagfile=nope.flags"), "nope.flags"),
        (("--nam=pod",), "unknown argument --nam=pod"),
    ],
)
def test_tpu_pod_bad_arguments_are_one_line(args, said):
    done = _launch("tpu_pod.sh", "--dry-run", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and said in done.stderr


def test_slurm_dry_run_prints_one_task_per_node():
    done = _launch(
        "slurm.sh", "--dry-run", "--nodes=2", "--gpus-per-node=4", "--partition=gpu",
        "--workdir=/shared/runs/la", "--", "--steps=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "would submit this batch script with sbatch:"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert lines[-1].rstrip() == (
        "srun .venv/bin/python -m evolve_jax.main --flagfile=configs/gpu.flags "
        "--workdir=/shared/runs/la --distributed=on --steps=3"
    )


def test_slurm_bad_node_count_is_one_line():
    done = _launch("slurm.sh", "--dry-run", "--nodes=0", "--workdir=d")
    assert done.returncode == 2 and "--nodes must be a positive integer" in done.stderr
