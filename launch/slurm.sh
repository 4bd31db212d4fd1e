#!/usr/bin/env bash
# Submits a search to a Slurm GPU cluster: one process per node, every node's GPUs busy.
#
#   bash launch/slurm.sh --nodes=2 --workdir=DIR [--gpus-per-node=8] [--partition=P]
#       [--time=24:00:00] [--flagfile=configs/gpu.flags] [--dry-run] [-- extra flags]
#
# Writes a batch script that runs `srun python -m evolve_jax.main --flagfile=...
# --workdir=... --distributed=on` with one task per node, and submits it with sbatch. JAX reads
# the job's layout from Slurm's environment and joins the tasks into one job: task 0 runs the
# agents and records the history, every task takes candidates from task 0's work queue onto
# all its node's GPUs (evolve_jax/evaluation/cluster.py). The script exports
# JAX_LOCAL_DEVICE_IDS=0,...,GPUS-1: without it JAX's Slurm detection gives each task only the
# GPU numbered by its SLURM_LOCALID, GPU 0 here, and the node's other GPUs would sit idle. DIR must be shared by the nodes (a
# network filesystem or gs://). It expects .venv with the cuda extra on that shared checkout
# (launch/local_gpus.sh --dry-run shows how to make it). --dry-run prints the batch script and
# the sbatch command instead of submitting.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes="" workdir="" gpus_per_node=8 partition="" time_limit=24:00:00 flagfile=configs/gpu.flags
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --gpus-per-node=*) gpus_per_node=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --flagfile=*) flagfile=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ ! "$nodes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nodes must be a positive integer (see the header of $0)" >&2
  exit 2
fi
if [[ ! "$gpus_per_node" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --gpus-per-node=$gpus_per_node must be a positive integer" >&2
  exit 2
fi
# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or unlimited).
shopt -s nocasematch
if [[ ! "$time_limit" =~ ^([0-9]+(:[0-9]+){0,2}|[0-9]+-[0-9]+(:[0-9]+){0,2}|unlimited|infinite)$ ]]; then
  echo "error: --time=$time_limit is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)" >&2
  exit 2
fi
shopt -u nocasematch
[[ -n "$workdir" ]] || { echo "error: --workdir is required (see the header of $0)" >&2; exit 2; }
[[ -f "$flagfile" ]] || { echo "error: --flagfile=$flagfile does not exist" >&2; exit 2; }

main=(.venv/bin/python -m evolve_jax.main --flagfile="$flagfile" --workdir="$workdir"
  --distributed=on "${extra[@]}")
script="#!/usr/bin/env bash
#SBATCH --job-name=evolve_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --time=$time_limit
${partition:+#SBATCH --partition=$partition
}#SBATCH --output=evolve_jax-%j.log
cd $(printf '%q' "$PWD")
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))
srun $(printf '%q ' "${main[@]}")"

if ((dry_run)); then
  echo "would submit this batch script with sbatch:"
  echo "$script"
else
  sbatch <<<"$script"
fi
