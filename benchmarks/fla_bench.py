"""flash-linear-attention's Triton kernels at the shapes of ``kernel_bench.py``, for comparison.

    pip install flash-linear-attention   # needs PyTorch with CUDA
    python benchmarks/fla_bench.py --out=fla.json

Times ``chunk_simple_gla`` (scalar decay), ``chunk_delta_rule`` and ``chunk_gated_delta_rule``
on bfloat16 inputs in fla's own layout ([B, T, H, D]), forward and forward plus backward
(gradients of every input), with ``triton.testing.do_bench`` (median ms), and reports TFLOP/s
with ``shapes.nominal_flops`` so the two tables compare directly. Not part of the
project's dependencies: it runs where PyTorch and a GPU are. fla 0.6 refuses the gated
backward on Hopper GPUs with Triton older than 3.7.1 (wrong results there, fla issue #640);
``--time_known_bad_triton`` times it anyway, and the JSON records that it did. fla autotunes
its kernels on the first call at each shape: on an H100 that took between 1.5 and 4 minutes
for the gated delta rule at 4x4096x64x128, so ``--out`` is rewritten after every case.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from absl import app, flags
from shapes import FLA_README_SHAPES, RULES, nominal_flops, parse_shape  # benchmarks/shapes.py
from triton.testing import do_bench

_SHAPES = flags.DEFINE_list("shapes", FLA_README_SHAPES, "BxTxHxD per shape.")
_RULES = flags.DEFINE_list("rules", RULES, "Update rules.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_TIME_KNOWN_BAD = flags.DEFINE_bool(
    "time_known_bad_triton", False,
    "Time fla's gated backward even where fla refuses it as numerically wrong (Hopper with"
    " Triton < 3.7.1): the kernels and their cost are the same, only the results are off.",
)  # fmt: skip


def _call(rule, q, k, v, beta, g):
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla

    if rule == "scalar_decay":
        return chunk_simple_gla(q, k, v, g=g)[0]
    if rule == "delta":
        return chunk_delta_rule(q, k, v, beta)[0]
    return chunk_gated_delta_rule(q, k, v, g, beta)[0]


def bench_case(rule, B, T, H, D):
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=dev, dtype=bf16)
    k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(bf16)
    v = torch.randn(B, T, H, D, device=dev, dtype=bf16)
    beta = torch.randn(B, T, H, device=dev).sigmoid()
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 4.0)
    do = torch.randn(B, T, H, D, device=dev, dtype=bf16)
    inputs = [q, k, v, beta, g]
    for x in inputs:
        x.requires_grad_(True)

    def forward_backward():
        _call(rule, *inputs).backward(do)

    flops = nominal_flops(rule, B, T, H, D, 64)
    row = {"rule": rule, "impl": "fla", "B": B, "T": T, "H": H, "D": D, "dtype": "bfloat16",
           "timed_known_bad_triton": _TIME_KNOWN_BAD.value}  # fmt: skip
    with torch.no_grad():
        row["fwd_ms"] = do_bench(lambda: _call(rule, *inputs))
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    try:  # fla refuses some backward passes on some Triton versions; keep the forward
        row["fwdbwd_ms"] = do_bench(forward_backward, grad_to_none=inputs)
        row["fwdbwd_tflops"] = 3 * flops / row["fwdbwd_ms"] / 1e9
    except Exception as e:
        row["fwdbwd_ms"], row["note"] = None, f"backward failed: {str(e)[:200]}"
    return row


def main(argv):
    del argv
    import fla

    if _TIME_KNOWN_BAD.value:
        import fla.ops.common.chunk_o as chunk_o

        chunk_o.IS_NVIDIA_HOPPER = False  # read at call time only by the refusal (warps: at import)
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, fla {fla.__version__}")
    rows = []
    for shape in _SHAPES.value:
        B, T, H, D = parse_shape(shape)
        for rule in _RULES.value:
            try:
                row = bench_case(rule, B, T, H, D)
                fb = row["fwdbwd_ms"]
                fb_text = f"{fb:9.2f} {row['fwdbwd_tflops']:8.1f}" if fb else f"  {row['note']}"
                text = f"{row['fwd_ms']:9.2f} {row['fwd_tflops']:8.1f} {fb_text}"
            except Exception as e:  # report and go on
                row = {"rule": rule, "impl": "fla", "B": B, "T": T, "H": H, "D": D,
                       "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
                text = row["error"]
            rows.append(row)
            print(f"{shape:>14} {rule:>12} {'fla':>9} {text}", flush=True)
            if _OUT.value:  # after every case: fla's first calls autotune for minutes, and a
                with open(_OUT.value, "w") as f:  # run cut short keeps what it measured
                    json.dump({"device": device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
