#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100: the kernel tests compiled for the GPU (not
# interpreted), the kernel benchmark, and flash-linear-attention's Triton kernels on the goal's
# case (the gated delta rule at T >= 4096).
#   OUT=gpu_check bash benchmarks/gpu_check.sh      # results and logs land in $OUT
# Needs jax with CUDA; pytest-xdist spreads the tests' Triton and XLA compilation over the CPU
# cores (one process took 160 s for half of them). PyTorch and flash-linear-attention for the
# fla step (skipped without; on a machine without a registry, bring its wheels:
# `pip download --no-deps -d WHEELS flash-linear-attention fla-core` elsewhere, then
# `pip install --no-deps WHEELS/*.whl`). Every step has a timeout and keeps what it measured.
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # test workers and PyTorch share the GPU
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/device.txt"
WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 120 $PY -m pytest tests/test_pallas_kernels.py tests/test_wy_kernel.py \
  tests/test_pallas_model.py -q -rf -k "not tpu" -p no:cacheprovider $WORKERS \
  2>&1 | tee "$OUT/tests.log" | tail -15
# Most important first (the gated delta rule at T >= 4096): a timeout keeps what was measured.
GOAL="--shapes=4x4096x64x128,1x8192x96x128 --rules=gated_delta"
BENCH="$PY benchmarks/kernel_bench.py --min_seconds=0.2"
timeout 60 $BENCH $GOAL --out="$OUT/goal.json" \
  --impls=pallas,pallas_fused,recurrence,wy_pallas,wy_xla,pallas_xla_wy \
  2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/goal.log"
if $PY -c "import fla" 2>/dev/null; then
  timeout 200 $PY benchmarks/fla_bench.py $GOAL --time_known_bad_triton --out="$OUT/fla.json" \
    2>&1 | tee "$OUT/fla.log"
fi
# The other rules and the README's small shape, against the jnp forms.
timeout 60 $BENCH --shapes=4x4096x64x128,8x1024x8x64 --rules=delta,scalar_decay,gated_delta \
  --impls=pallas,pallas_fused,chunked --out="$OUT/kernels.json" \
  2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/kernels.log"
if [ -f "$OUT/fla.json" ]; then
  $PY benchmarks/compare_fla.py "$OUT/goal.json" --fla="$OUT/fla.json" 2>&1 | tee "$OUT/compare_fla.txt"
fi
