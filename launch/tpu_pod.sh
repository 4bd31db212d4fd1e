#!/usr/bin/env bash
# Runs the linear-attention search on a Cloud TPU VM slice, history on GCS.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/runs/la [extra flags...]
#
# Copies this checkout to the TPU VM, installs evolve_jax with the tpu extra, and starts
# configs/tpu_pod.flags with --workdir on GCS under nohup, logging to ~/evolve_jax.log.
# It runs on worker 0 and uses that host's chips; the history on GCS can be read (and appended
# to) from anywhere: python -m evolve_jax.history --workdir=gs://BUCKET/runs/la
# Re-running the same command resumes the search where it stopped.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE gs://BUCKET/PATH [flags...]" >&2
  exit 2
fi
name=$1 zone=$2 workdir=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=runs -czf /tmp/evolve_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/evolve_jax.tgz "$name":~/evolve_jax.tgz --zone="$zone" --worker=0
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=0 --command="
  set -e
  mkdir -p ~/evolve_jax && tar -C ~/evolve_jax -xzf ~/evolve_jax.tgz && cd ~/evolve_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -c constraints.txt -e '.[tpu]'
  nohup python -m evolve_jax.main --flagfile=configs/tpu_pod.flags --workdir=$workdir $* \
    > ~/evolve_jax.log 2>&1 &
  echo started: tail -f ~/evolve_jax.log on worker 0
"
