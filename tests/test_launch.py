"""The local-GPU launcher: what it installs and runs (``--dry-run`` prints, runs nothing)."""

import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _launcher(tmp_path, venv_python: str | None) -> str:
    """A checkout with the launcher and, optionally, a .venv whose python is ``venv_python``."""
    os.makedirs(tmp_path / "launch")
    os.makedirs(tmp_path / "configs")
    shutil.copy(os.path.join(REPO, "launch", "local_gpus.sh"), tmp_path / "launch")
    shutil.copy(os.path.join(REPO, "configs", "gpu.flags"), tmp_path / "configs")
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


def test_missing_flagfile_is_refused_before_installing(tmp_path):
    # No .venv: without the check the launcher would first create one and install into it.
    done = subprocess.run(
        ["bash", _launcher(tmp_path, None), "--dry-run", "--flagfile=configs/nope.flags"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --flagfile=configs/nope.flags does not exist\n"


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
    assert "tpu-vm create" in lines[6]


def test_tpu_pod_dry_run_runs_every_worker_as_one_job():
    done = _launch(
        "tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-central2-b", "--project=p",
        "--workdir=gs://bucket/runs/la", "--", "--steps=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    where = "--zone=us-central2-b --project=p"
    assert lines[0] == "if gcloud compute tpus tpu-vm describe pod succeeds (the TPU VM exists):"
    ssh = f"would run: gcloud compute tpus tpu-vm ssh pod {where}"
    assert lines[2].startswith(f"{ssh} --worker=all")
    assert "evolve_jax.pid" in lines[2]
    assert lines[4] == (
        f"would run: gcloud compute tpus tpu-vm create pod {where} "
        "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5"
    )
    copy, start, follow = lines[6], lines[7], lines[8]
    assert copy.startswith("would run: gcloud compute tpus tpu-vm scp ")
    assert copy.endswith(f"pod:evolve_jax.tgz {where} --worker=all")
    assert f"ssh pod {where} --worker=all" in start and "-e \\'.[tpu]\\'" in start
    assert (
        "nohup python -m evolve_jax.main --flagfile=configs/tpu_pod.flags "
        "--workdir=gs://bucket/runs/la --distributed=on --steps=3 > ~/evolve_jax.log 2>&1 &"
        "\\necho $! > ~/evolve_jax.pid"
    ) in start
    assert "--worker=0" in follow and "tail" in follow
    assert lines[9] == "would run: gcloud storage cat gs://bucket/runs/la/report.txt"


def _remote_command(line: str) -> str:
    """The --command of a one-line ``would run: gcloud ... ssh`` that the dry run printed."""
    args = shlex.split(line.removeprefix("would run: "))
    return next(a for a in args if a.startswith("--command=")).removeprefix("--command=")


def test_tpu_pod_follows_the_driver_it_started_not_its_own_shell(tmp_path):
    done = _launch("tpu_pod.sh", "--dry-run", "--name=pod", "--zone=z", "--workdir=gs://b/r")
    follow = _remote_command(next(x for x in done.stdout.splitlines() if "--worker=0" in x))
    # Worker 0 after the search: the log, and the pid file of a driver that has exited.
    exited = subprocess.Popen(["true"])
    exited.wait()
    (tmp_path / "evolve_jax.log").write_text("step 40 of 40\n")
    (tmp_path / "evolve_jax.pid").write_text(f"{exited.pid}\n")
    shown = subprocess.run(
        ["bash", "-c", follow], capture_output=True, text=True, timeout=30,
        env=dict(os.environ, HOME=str(tmp_path)),
    )  # fmt: skip
    assert shown.returncode == 0 and shown.stdout == "step 40 of 40\n"


def _fake_gcloud(tmp_path) -> dict:
    """A gcloud on PATH: the TPU VM exists; every ssh to all workers runs here (HOME=tmp_path)
    unless it would start the driver; every call's first 4 words go to tmp_path/gcloud.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        'echo "${*:1:4}" >> "$HOME/gcloud.log"\n'  # e.g. compute tpus tpu-vm ssh
        'command=""; all=0\n'
        'for a in "$@"; do case $a in --command=*) command=${a#--command=} ;;'
        " --worker=all) all=1 ;; esac; done\n"
        'if ((all)) && [[ -n "$command" && "$command" != *nohup* ]]; then'
        ' exec bash -c "$command"; fi\n'
    )
    (bin_dir / "gcloud").chmod(0o755)
    return dict(
        os.environ, HOME=str(tmp_path), TMPDIR=str(tmp_path),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )  # fmt: skip


@pytest.fixture
def live_driver(tmp_path):
    """A process whose command line names evolve_jax.main, its pid in ~/evolve_jax.pid."""
    driver = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "evolve_jax.main"]
    )
    (tmp_path / "evolve_jax.pid").write_text(f"{driver.pid}\n")
    yield driver
    driver.kill()
    driver.wait()


def test_tpu_pod_refuses_to_replace_a_running_search(tmp_path, live_driver):
    env = _fake_gcloud(tmp_path)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name=pod", "--zone=z",
         "--workdir=gs://b/r"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: a driver is running on the slice pod (")
    assert f"(pid {live_driver.pid})" in done.stderr and "--restart" in done.stderr
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["describe", "ssh"]  # nothing copied or started
    assert live_driver.poll() is None


def test_tpu_pod_restart_stops_the_running_driver_first(tmp_path, live_driver):
    env = _fake_gcloud(tmp_path)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--restart", "--name=pod",
         "--zone=z", "--workdir=gs://b/r"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert live_driver.wait(timeout=5) == -15  # SIGTERM, before anything was copied
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls[:3]] == ["describe", "ssh", "scp"]


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


def _slurm_script(*args: str) -> str:
    done = _launch("slurm.sh", "--dry-run", *args)
    assert done.returncode == 0, done.stderr
    first, script = done.stdout.split("\n", 1)
    assert first == "would submit this batch script with sbatch:"
    return script


def test_slurm_dry_run_prints_one_task_per_node_with_all_its_gpus():
    script = _slurm_script(
        "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--workdir=/shared/runs/la",
        "--", "--steps=3",
    )  # fmt: skip
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert lines[-1].rstrip() == (
        "srun .venv/bin/python -m evolve_jax.main --flagfile=configs/gpu.flags "
        "--workdir=/shared/runs/la --distributed=on --steps=3"
    )


_SEEN_BY_JAX = """
import jax
jax.distributed.initialize()  # as evolve_jax.main --distributed=on calls it
print(jax.process_count(), jax.config.read("jax_cuda_visible_devices"))
jax.distributed.shutdown()
"""


def test_slurm_task_gets_every_gpu_of_its_node_from_jax(tmp_path):
    """The batch script, run with a fake srun that starts one node's task under Slurm's
    environment: JAX's own Slurm detection decides which of the node's GPUs the task uses."""
    script = tmp_path / "job.sh"
    script.write_text(_slurm_script("--nodes=1", "--gpus-per-node=8", "--workdir=/shared"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nexec {sys.executable} -c "$SEEN_BY_JAX"\n')
    (bin_dir / "srun").chmod(0o755)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    slurm = dict(
        SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1",
        SLURM_PROCID="0", SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port),
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JAX_LOCAL_DEVICE_IDS"}
    done = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120,
        env=dict(env, **slurm, JAX_PLATFORMS="cpu", SEEN_BY_JAX=_SEEN_BY_JAX,
                 PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0,1,2,3,4,5,6,7"]


def test_slurm_bad_node_count_is_one_line():
    done = _launch("slurm.sh", "--dry-run", "--nodes=0", "--workdir=d")
    assert done.returncode == 2 and "--nodes must be a positive integer" in done.stderr


@pytest.mark.parametrize(
    ("arg", "said"),
    [
        ("--gpus-per-node=abc", "--gpus-per-node=abc must be a positive integer"),
        ("--gpus-per-node=0", "--gpus-per-node=0 must be a positive integer"),
        ("--time=forever", "--time=forever is not a Slurm time"),
        ("--time=1:2:3:4", "--time=1:2:3:4 is not a Slurm time"),
        ("--time=1-", "--time=1- is not a Slurm time"),
    ],
)
def test_slurm_bad_gpus_or_time_is_one_line_before_submitting(tmp_path, arg, said):
    # A real run (no --dry-run) with an sbatch that would record being called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\n")
    (bin_dir / "sbatch").chmod(0o755)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "slurm.sh"), "--nodes=1", "--workdir=d", arg],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and said in done.stderr
    assert not (tmp_path / "submitted").exists()


@pytest.mark.parametrize("time", ["90", "90:30", "24:00:00", "2-12", "2-12:30", "2-12:30:00"])
def test_slurm_time_formats_are_accepted(time):
    assert f"#SBATCH --time={time}" in _slurm_script("--nodes=1", "--workdir=d", f"--time={time}")
