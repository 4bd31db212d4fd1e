"""Registers, spills and shared memory of the Pallas GPU kernels, without a GPU.

    pip install triton            # the compiler only; any machine, no GPU or driver needed
    python benchmarks/triton_resources.py --tunings=64:4,32:8 --schedules=fused,split

Lowers the gated delta rule's forward and backward for the GPU (as the lowering tests do),
captures each kernel's Triton IR from Pallas, compiles it with the ``triton`` package for an
H100 (sm_90a) at the kernel's own num_warps / num_stages, and reads the cubin's resource usage
with the ``cuobjdump`` that ships with it. A kernel using all 255 registers with a stack frame
spills: its per-thread stack is memory traffic on every use of the spilled values, the first
thing to look at when a kernel is slow. The Triton inside jaxlib, which compiles the kernels on
a real GPU, is a different version, so treat the numbers as a close estimate.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
from absl import app, flags
from shapes import parse_shape  # benchmarks/shapes.py

import pallas_kernels as pk

_SHAPE = flags.DEFINE_string("shape", "1x256x2x128", "BxTxHxD (only D and the tiling matter).")
_TUNINGS = flags.DEFINE_list("tunings", ["64:4"], "block_v:num_warps per row.")
_SCHEDULES = flags.DEFINE_list("schedules", ["fused", "split"], "GPU schedules.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk length.")


def capture_triton_ir(fn, *args):
    """[(kernel name, Triton IR text, num_warps, num_stages)] of every Pallas Triton kernel that
    lowering ``fn(*args)`` for CUDA produces (private JAX API: a benchmark-only hook)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    kernels = []

    def capturing_lower(*a, **kw):
        result = lower(*a, **kw)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering: the kernel's settings
        op = result.module.operation
        name = op.attributes["sym_name"].value
        ir = op.get_asm(enable_debug_info=False)
        kernels.append((name, ir, caller["num_warps"], caller["num_stages"]))
        return result

    target = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=target
    )
    registration.lowering.lower_jaxpr_to_triton_module = capturing_lower
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return kernels


def resource_usage(ir: str, num_warps: int, num_stages: int) -> dict:
    """Compiles Triton IR for sm_90a; returns its registers, stack bytes and shared memory."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(
                path,
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps, "num_stages": num_stages},
            )
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        dump = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    usage = dict(re.findall(r"(REG|STACK):(\d+)", dump.stdout))
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "smem": kernel.metadata.shared}


def main(argv):
    del argv
    B, T, H, D = parse_shape(_SHAPE.value)
    q = k = v = jax.ShapeDtypeStruct((B, H, T, D), jnp.bfloat16)
    beta = g = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    print(f"gated delta rule, bfloat16, K = V = {D}, chunk {_CHUNK.value}; sm_90a")
    print(f"{'schedule':>8} {'tiling':>7} {'kernel':>24} {'warps':>5} {'regs':>5} "
          f"{'stack B':>8} {'smem KiB':>9}")  # fmt: skip
    for schedule in _SCHEDULES.value:
        for tiling in _TUNINGS.value:
            block_v, num_warps = (int(x) for x in tiling.split(":"))
            options = dict(schedule=schedule, block_v=block_v, num_warps=num_warps)

            def forward_backward(q, k, v, beta, g, options=options):
                def forward(*a):
                    return pk.gated_delta_rule(
                        *a[:3], beta=a[3], g=a[4], chunk_size=_CHUNK.value, backend="gpu",
                        interpret=False, **options,
                    )[0]  # fmt: skip

                o, vjp = jax.vjp(forward, q, k, v, beta, g)
                return vjp(o)

            for name, ir, warps, stages in capture_triton_ir(forward_backward, q, k, v, beta, g):
                use = resource_usage(ir, warps, stages)
                print(
                    f"{schedule:>8} {tiling:>7} {name:>24} {warps:5d} {use['regs']:5d} "
                    f"{use['stack']:8d} {use['smem'] / 1024:9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    app.run(main)
