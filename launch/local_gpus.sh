#!/usr/bin/env bash
# Runs a search on this machine's GPUs.
#
#   bash launch/local_gpus.sh [--gpus=0,1] [--flagfile=configs/gpu.flags] [--workdir=DIR]
#                             [--dry-run] [-- extra flags for evolve_jax.main]
#
# Makes sure .venv has evolve_jax with the cuda extra: creates .venv if it is missing, and
# installs the extra into an existing one (such as the CPU install the README's first command
# makes) when JAX's CUDA plugin is not there. Then runs the flagfile (configs/gpu.flags sets
# --platform=gpu, so a run that finds no GPU stops with one line instead of training on the
# CPU). A --flagfile that does not exist stops it with one line before anything is installed.
# --dry-run prints each command instead of running it. Re-running resumes the search.
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=all flagfile=configs/gpu.flags workdir="" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus=*) gpus=${1#*=} ;;
    --flagfile=*) flagfile=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if ((dry_run)); then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

[[ -f "$flagfile" ]] || { echo "error: --flagfile=$flagfile does not exist" >&2; exit 2; }

install=(.venv/bin/pip install -q -c constraints.txt -e ".[cuda]")
if [[ ! -x .venv/bin/python ]]; then
  run python3 -m venv .venv
  run "${install[@]}"
elif ! .venv/bin/python -c "import jax_plugins.xla_cuda12" 2>/dev/null; then
  echo "the .venv has no CUDA plugin for JAX: installing the cuda extra" >&2
  run "${install[@]}"
fi

if [[ "$gpus" != all ]]; then
  export CUDA_VISIBLE_DEVICES=$gpus
  ((dry_run)) && echo "would set CUDA_VISIBLE_DEVICES=$gpus"
fi
cmd=(.venv/bin/python -m evolve_jax.main --flagfile="$flagfile")
[[ -n "$workdir" ]] && cmd+=(--workdir="$workdir")
run "${cmd[@]}" "${extra[@]}"
