#!/usr/bin/env bash
# One GPU check, about 7.5 minutes: the kernel tests compiled for the GPU (not interpreted), the
# kernel benchmark, and flash-linear-attention's Triton kernels at the same shapes.
#   OUT=gpu_check bash benchmarks/gpu_check.sh      # results and logs land in $OUT
# Needs jax with CUDA, PyTorch and flash-linear-attention for the last step (skipped without;
# on a machine without a registry, bring its wheels: `pip download --no-deps -d WHEELS
# flash-linear-attention fla-core` elsewhere, then `pip install --no-deps WHEELS/*.whl`).
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # PyTorch shares the GPU in the last step
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/device.txt"
timeout 160 $PY -m pytest tests/test_pallas_kernels.py tests/test_wy_kernel.py -q -k "not tpu" \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 35 $PY -m pytest tests/test_pallas_model.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/tests_model.log" | tail -5
# Most important first (the gated delta rule at T >= 4096): a timeout keeps what was measured.
# Where the time goes: the recurrence and the WY transform alone (recurrence, wy_pallas; wy_xla
# and pallas_xla_wy show what the WY kernels changed).
ORDER="--shapes=4x4096x64x128,1x8192x96x128,8x1024x8x64 --rules=gated_delta,delta,scalar_decay"
BENCH="$PY benchmarks/kernel_bench.py --min_seconds=0.2"
timeout 110 $BENCH $ORDER --out="$OUT/kernels.json" \
  --impls=pallas,recurrence,wy_pallas,wy_xla,pallas_xla_wy,pallas_split,chunked,recurrent \
  2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/kernel_bench.log"
if $PY -c "import fla" 2>/dev/null; then
  timeout 90 $PY benchmarks/fla_bench.py $ORDER --time_known_bad_triton --out="$OUT/fla.json" 2>&1 | tee "$OUT/fla_bench.log"
fi
# Tiling sweep (block_v:num_warps) of both schedules at the goal's shape.
timeout 55 $BENCH --shapes=4x4096x64x128 --rules=gated_delta --impls=pallas,pallas_split \
  --tunings=64:4,32:4,64:8,16:8,16:4 --out="$OUT/tunings.json" \
  2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/tunings.log"
if [ -f "$OUT/fla.json" ]; then
  $PY benchmarks/compare_fla.py "$OUT/kernels.json" "$OUT/tunings.json" --fla="$OUT/fla.json" \
    2>&1 | tee "$OUT/compare_fla.txt"
fi
