"""Memory traffic and FLOPs of the delta rules' WY transform: XLA's own estimate for the plain
XLA form against the Pallas kernels' array I/O and matmuls, at flash-linear-attention's shapes.

    python benchmarks/wy_traffic.py            # compiles only: runs on any machine, no GPU

XLA's figures come from ``cost_analysis()`` of the compiled forward and forward+backward on the
machine's own backend (its fusion decisions differ by backend, so treat them as an estimate).
The kernels read each input once and write each output once (``wy_kernel``; for training the
forward also writes each chunk's inverse T, which the backward reads), so their traffic is the
size of those arrays.
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


def kernel_bytes(B, T, H, D, C, itemsize=2):
    """(forward, forward+backward) bytes the Pallas kernels read and write (K = V = D)."""
    rows = B * H * T
    features = rows * D * itemsize  # one [BH, T, D] array in the inputs' dtype
    scalars = rows * 4  # one [BH, T] float32 array
    inverse = rows * C * itemsize  # T, kept for backward when training
    forward = 2 * features + 2 * scalars + 2 * features  # k, v, beta, G -> w, u
    # k, v, beta, G, T, dw, du -> dk, dv, dbeta, dG
    backward = 4 * features + 2 * scalars + inverse + 2 * features + 2 * scalars
    return forward, forward + inverse + backward


def kernel_flops(B, T, H, D, C):
    """(forward, forward+backward) matmul FLOPs of the Pallas kernels (K = V = D): per chunk,
    forward k k^T, the inverse's 2 log2(C) - 2 [C, C] products and T [k | v]; backward the
    same without the inverse (it is read), T^T [dw | du], dA and dk."""
    chunks = B * H * T // C
    inverse = (2 * (C.bit_length() - 1) - 2) * 2 * C**3
    forward = 2 * C * C * D + inverse + 2 * 2 * C * C * D
    backward = 2 * C * C * D + 4 * (2 * 2 * C * C * D)
    return chunks * forward, chunks * (forward + backward)


def main(argv):
    del argv
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}; gated delta rule, bfloat16")
    print(f"{'BxTxHxD':>14} {'pass':>8} {'XLA GB':>8} {'XLA GFLOP':>10} {'kernels GB':>11} "
          f"{'kernels GFLOP':>14}")  # fmt: skip
    for shape in _SHAPES.value:
        B, T, H, D = parse_shape(shape)
        costs = xla_cost(B, T, H, D, _CHUNK.value)
        C = _CHUNK.value
        ours = zip(kernel_bytes(B, T, H, D, C), kernel_flops(B, T, H, D, C), strict=True)
        for name, cost, (nbytes, flops) in zip(("fwd", "fwd+bwd"), costs, ours, strict=True):
            print(
                f"{shape:>14} {name:>8} {cost['bytes accessed'] / 1e9:8.2f} "
                f"{cost['flops'] / 1e9:10.1f} {nbytes / 1e9:11.2f} {flops / 1e9:14.1f}"
            )


if __name__ == "__main__":
    app.run(main)
