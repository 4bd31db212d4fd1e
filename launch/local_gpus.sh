#!/usr/bin/env bash
# Runs the linear-attention search on this machine's GPUs.
#
#   bash launch/local_gpus.sh [GPU_IDS] [extra flags...]     e.g.  bash launch/local_gpus.sh 0,1
#
# Installs evolve_jax with the cuda extra into .venv (once), then runs configs/gpu.flags; each
# candidate's seeds are sharded over the listed GPUs. Re-running resumes the search.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=${1:-all}
shift || true
if [[ ! -d .venv ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e ".[cuda]"
fi
if [[ "$gpus" != all ]]; then
  export CUDA_VISIBLE_DEVICES=$gpus
fi
exec .venv/bin/python -m evolve_jax.main --flagfile=configs/gpu.flags "$@"
