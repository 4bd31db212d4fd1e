"""Memory traffic of the delta rules' WY transform: XLA's own estimate for the plain XLA form
against the array I/O of the Pallas kernels, at the flash-linear-attention README's shapes.

    python benchmarks/wy_traffic.py            # compiles only: runs on any machine, no GPU

XLA's figures come from ``cost_analysis()`` of the compiled forward and forward+backward on the
machine's own backend (its fusion decisions differ by backend, so treat them as an estimate).
The kernels read each input once and write each output once (``wy_kernel``; the backward kernel
recomputes T instead of reading it), so their traffic is the size of those arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from shapes import FLA_README_SHAPES, parse_shape  # benchmarks/shapes.py

from pallas_kernels import wy

_SHAPES = flags.DEFINE_list("shapes", FLA_README_SHAPES, "BxTxHxD per shape.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk length.")


def xla_cost(B, T, H, D, C, dtype=jnp.bfloat16):
    """(forward, forward+backward) XLA cost analyses of the gated WY transform in XLA."""
    X, N = B * H, T // C
    args = [jax.ShapeDtypeStruct((X, N, C, D), dtype)] * 2
    args += [jax.ShapeDtypeStruct((X, N, C), jnp.float32)] * 2  # beta, G

    def forward(k, v, beta, G):
        w, u = wy.wy_transform(k, v, beta, G, precision=jax.lax.Precision.DEFAULT)
        return w.astype(dtype), u.astype(dtype)

    def forward_backward(*a):
        out, vjp = jax.vjp(forward, *a)
        return vjp(out)

    costs = []
    for fn in (forward, forward_backward):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        costs.append(cost[0] if isinstance(cost, list) else cost)
    return costs


def kernel_bytes(B, T, H, D, itemsize=2):
    """(forward, forward+backward) bytes the Pallas kernels read and write (K = V = D)."""
    rows = B * H * T
    features = rows * D * itemsize  # one [BH, T, D] array in the inputs' dtype
    scalars = rows * 4  # one [BH, T] float32 array
    forward = 2 * features + 2 * scalars + 2 * features  # k, v, beta, G -> w, u
    # k, v, beta, G, dw, du -> dk, dv (float32), dbeta, dG
    backward = 4 * features + 2 * scalars + 2 * 2 * features + 2 * scalars
    return forward, forward + backward


def main(argv):
    del argv
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}; gated delta rule, bfloat16")
    print(f"{'BxTxHxD':>14} {'pass':>8} {'XLA GB':>8} {'XLA GFLOP':>10} {'kernels GB':>11}")
    for shape in _SHAPES.value:
        B, T, H, D = parse_shape(shape)
        costs = xla_cost(B, T, H, D, _CHUNK.value)
        for name, cost, ours in zip(
            ("fwd", "fwd+bwd"), costs, kernel_bytes(B, T, H, D), strict=True
        ):
            print(
                f"{shape:>14} {name:>8} {cost['bytes accessed'] / 1e9:8.2f} "
                f"{cost['flops'] / 1e9:10.1f} {ours / 1e9:11.2f}"
            )


if __name__ == "__main__":
    app.run(main)
