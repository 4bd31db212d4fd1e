#!/usr/bin/env bash
# Runs a search on every worker of a Cloud TPU VM slice, history on GCS.
#
#   bash launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/runs/la
#       [--project=PROJECT] [--accelerator=v5p-16] [--version=v2-alpha-tpuv5]
#       [--topology=v5p:2x2x2] [--flagfile=configs/tpu_pod.flags] [--restart] [--dry-run]
#       [-- extra flags for evolve_jax.main]
#
# 0. With --topology (the slice's, e.g. v5p:2x2x2 for v5p-16), and a linear-attention
#    flagfile, first compiles the largest seed's training at both stages for those chips here,
#    ahead of time (search_spaces/linear_attention/aot.py; needs libtpu in .venv, e.g.
#    pip install libtpu, no TPU), and stops if it does not fit in a chip's memory.
# 1. Reuses the TPU VM NAME, or creates it with --accelerator and --version when it is missing.
#    When it exists, asks every worker over ssh whether the driver this launcher started there
#    (its pid in ~/evolve_jax.pid) is still running, and if one is, stops with one line (exit 2)
#    before copying anything; with --restart it stops those drivers instead (SIGTERM, SIGKILL
#    after 60 s) and goes on. A driver started some other way, with no pid file, is not seen.
# 2. Copies this checkout (without .git, .venv, runs) to every worker and installs evolve_jax
#    with the tpu extra there.
# 3. Starts `python -m evolve_jax.main --flagfile=... --workdir=... --distributed=on` on all
#    workers under nohup (log: ~/evolve_jax.log, pid: ~/evolve_jax.pid on each). JAX joins the workers into one job;
#    worker 0 runs the agents and records the history, every worker takes candidates from
#    worker 0's work queue onto its own chips (evolve_jax/evaluation/cluster.py).
# 4. Streams worker 0's log until its driver (the pid in ~/evolve_jax.pid) exits, then prints the report from the workdir.
# --dry-run prints each command instead of running it. Re-running the same command resumes
# the search where it stopped; Ctrl-C stops only the streaming, not the search.
set -euo pipefail
cd "$(dirname "$0")/.."

name="" zone="" workdir="" project="" accelerator=v5p-16 version=v2-alpha-tpuv5 topology=""
flagfile=configs/tpu_pod.flags dry_run=0 restart=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --topology=*) topology=${1#*=} ;;
    --flagfile=*) flagfile=${1#*=} ;;
    --restart) restart=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for required in name zone workdir; do
  if [[ -z "${!required}" ]]; then
    echo "error: --$required is required (see the header of $0)" >&2
    exit 2
  fi
done
if [[ "$workdir" != gs://* ]]; then
  echo "error: --workdir=$workdir must be a gs:// path every worker can reach" >&2
  exit 2
fi
[[ -f "$flagfile" ]] || { echo "error: --flagfile=$flagfile does not exist" >&2; exit 2; }

run() {
  if ((dry_run)); then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [[ -n "$topology" ]] && grep -q '^--search_space=linear_attention$' "$flagfile"; then
  for stage in 0 1; do
    run .venv/bin/python -m search_spaces.linear_attention.aot --topology="$topology" \
      --config="$flagfile" --architecture=gated_deltanet --stage="$stage"
  done
fi

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

# A driver this launcher started: the pid in ~/evolve_jax.pid, still running evolve_jax.main.
live='pid=$(cat ~/evolve_jax.pid 2>/dev/null) && grep -qs evolve_jax.main /proc/"$pid"/cmdline'
check="if $live; then echo \"evolve_jax.main is running on \$(hostname) (pid \$pid)\"; fi"
stop="if $live; then kill \"\$pid\"; for _ in \$(seq 60); do $live || break; sleep 1; done
if $live; then kill -9 \"\$pid\"; fi; fi"
if ((dry_run)); then
  echo "if ${tpu[*]} describe $name succeeds (the TPU VM exists):"
  if ((restart)); then
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$stop"
  else
    echo "refuses (exit 2) if this finds a driver running on a worker:"
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$check"
  fi
  echo "if ${tpu[*]} describe $name fails (no such TPU VM):"
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" \
    --version="$version"
elif "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  if ((restart)); then
    "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$stop"
  else
    running=$("${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$check")
    if [[ "$running" == *"is running on"* ]]; then
      first=$(grep -m1 'is running on' <<<"$running")
      echo "error: a driver is running on the slice $name ($first); pass --restart to stop it" \
        "and start again, or stop it first" >&2
      exit 2
    fi
  fi
else
  "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version"
fi

archive="${TMPDIR:-/tmp}/evolve_jax-$name.tgz"
run tar -C . --exclude=.git --exclude=.venv --exclude=runs -czf "$archive" .
run "${tpu[@]}" scp "$archive" "$name":evolve_jax.tgz "${where[@]}" --worker=all

main=(python -m evolve_jax.main --flagfile="$flagfile" --workdir="$workdir" --distributed=on
  "${extra[@]}")
start="set -e; mkdir -p ~/evolve_jax && tar -C ~/evolve_jax -xzf ~/evolve_jax.tgz
cd ~/evolve_jax && python3 -m venv .venv && . .venv/bin/activate
pip install -q -c constraints.txt -e '.[tpu]'
nohup $(printf '%q ' "${main[@]}")> ~/evolve_jax.log 2>&1 &
echo \$! > ~/evolve_jax.pid"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$start"

# Worker 0 holds the report; tail follows its log until the driver it started exits.
follow='tail -n +1 -f ~/evolve_jax.log --pid="$(cat ~/evolve_jax.pid)"'
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$follow"
run gcloud storage cat "$workdir/report.txt"
