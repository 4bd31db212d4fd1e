"""Pallas kernels against the jnp recurrent references: outputs, final states and gradients.

On CPU every kernel runs in the Pallas interpreter, both the GPU (Triton) and the TPU (Mosaic)
variant. On a GPU machine the GPU variant is compiled and run for real (the TPU variant stays
interpreted), so the same file is the device check.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from search_spaces.linear_attention import mixers

# rule name in mixers -> (kernel entry point, takes beta, takes g)
RULES = {
    "linear": (pk.linear_attention, False, False),
    "scalar_decay": (pk.linear_attention, False, True),
    "delta": (pk.delta_rule, True, False),
    "gated_delta": (pk.gated_delta_rule, True, True),
}


def _inputs(rule, B=2, H=2, T=40, K=32, V=32, dtype=jnp.float32, seed=0):
    _, uses_beta, uses_g = RULES[rule]
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (B, H, T, K))
    k = jax.random.normal(keys[1], (B, H, T, K))
    k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))  # as the models feed the delta rule
    v = jax.random.normal(keys[2], (B, H, T, V))
    kw = {"initial_state": 0.1 * jax.random.normal(keys[3], (B, H, K, V))}
    if uses_beta:
        kw["beta"] = jax.nn.sigmoid(jax.random.normal(keys[4], (B, H, T)))
    if uses_g:
        kw["g"] = -0.3 * jax.nn.softplus(jax.random.normal(keys[5], (B, H, T)))
    # Round once to the test dtype, so reference and kernel see the same numbers.
    cast = lambda x: x.astype(dtype).astype(jnp.float32)  # noqa: E731
    return cast(q), cast(k), cast(v), {n: cast(x) for n, x in kw.items()}


def _loss(fn, q, k, v, kw):
    """A scalar mixing o and the final state non-linearly, so every cotangent is non-trivial."""
    o, s = fn(q, k, v, **kw)
    o = o.astype(jnp.float32)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(s))


def _value_and_grads(fn, q, k, v, kw):
    outs = fn(q, k, v, **kw)
    grads = jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2, 3))(q, k, v, kw)
    return outs, grads


def _check(
    rule, backend, dtype=jnp.float32, chunk=16, tol=2e-4, interpret=None, block_v=None,
    num_warps=None, **shape,
):  # fmt: skip
    """``backend``: "gpu" or "tpu" with their default schedules, or "gpu-fused" / "gpu-split"."""
    fn = RULES[rule][0]
    q, k, v, kw = _inputs(rule, dtype=dtype, **shape)
    tiling = {"block_v": block_v, "num_warps": num_warps}
    reference = functools.partial(mixers.mix, rule, impl="recurrent")
    backend, _, schedule = backend.partition("-")
    kernel = functools.partial(
        fn, chunk_size=chunk, backend=backend, schedule=schedule or None, interpret=interpret,
        **tiling,
    )  # fmt: skip
    cast = lambda x: x.astype(dtype)  # noqa: E731
    (o_ref, s_ref), g_ref = _value_and_grads(reference, q, k, v, kw)
    (o, s), g = _value_and_grads(
        lambda q, k, v, **kw: kernel(cast(q), cast(k), cast(v), **kw), q, k, v, kw
    )
    assert o.dtype == dtype and s.dtype == jnp.float32 and o.shape == o_ref.shape
    named = {"o": (o, o_ref), "final state": (s, s_ref)}
    for name, a, b in zip(("dq", "dk", "dv"), g[:3], g_ref[:3], strict=True):
        named[name] = (a, b)
    for name in g_ref[3]:
        named[f"d{name}"] = (g[3][name], g_ref[3][name])
    for name, (a, b) in named.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = 1.0 + np.max(np.abs(b))
        err = np.max(np.abs(a - b)) / scale
        assert err < tol, f"{rule}/{backend}/{dtype.__name__}: {name} off by {err:.2e} (scaled)"


@pytest.mark.parametrize("backend", ["gpu-fused", "gpu-split", "tpu"])
@pytest.mark.parametrize("rule", list(RULES))
def test_matches_recurrent_reference(rule, backend):
    # T = 40 is not a multiple of the chunk (16); batch x heads = 4; initial state given.
    _check(rule, backend)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rule", ["delta", "gated_delta"])
def test_head_dims(rule, head_dim):
    _check(rule, "gpu", B=1, H=2, T=24, K=head_dim, V=head_dim)


@pytest.mark.parametrize(
    ("rule", "backend"),
    [("scalar_decay", "tpu"), ("gated_delta", "tpu"), ("gated_delta", "gpu-fused")],
)
def test_head_dim_128(rule, backend):
    _check(rule, backend, B=1, H=2, T=24, K=128, V=128)


@pytest.mark.parametrize("backend", ["gpu-fused", "gpu-split"])
def test_value_blocks_sum_on_gpu(backend):
    # V = 128 splits into two 64-wide value blocks whose partial dq/dk/dw/dG must add up.
    _check("gated_delta", backend, B=1, H=2, T=24, K=32, V=128)


def test_tuned_tiling_on_gpu():
    # Four 16-wide value blocks, 8 warps: the tuning knobs change the tiling, not the result.
    _check("gated_delta", "gpu", B=1, H=2, T=24, K=32, V=64, block_v=16, num_warps=8)


def test_value_blocks_sum_on_tpu():
    _check("gated_delta", "tpu", B=1, H=1, T=16, K=32, V=256)


@pytest.mark.parametrize(
    ("rule", "backend"),
    [(r, "gpu") for r in RULES] + [("gated_delta", "gpu-fused"), ("gated_delta", "tpu")],
)
def test_bfloat16(rule, backend):
    _check(rule, backend, dtype=jnp.bfloat16, tol=3e-2)


@pytest.mark.parametrize("backend", ["gpu-fused", "gpu-split"])
def test_chunk_64_long_sequence(backend):
    _check("gated_delta", backend, chunk=64, B=1, H=2, T=200)


@pytest.mark.parametrize("rule", ["scalar_decay", "gated_delta"])
def test_tpu_kernels_in_the_tpu_interpreter(rule):
    """Pallas's TPU interpreter models a TPU core (grid order, dimension semantics, VMEM
    scratch, DMAs) more closely than the generic one the other tests use."""
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        _check(rule, "tpu", B=1, H=2, T=40, interpret=False)  # compiled for "TPU", interpreted


@pytest.mark.parametrize("backend", ["gpu-fused", "gpu-split", "tpu"])
def test_vmapped_like_training(backend):
    """Training vmaps the model over seeds: the kernels' batching and custom_vjp must compose."""
    backend, _, schedule = backend.partition("-")
    batch = [_inputs("gated_delta", B=1, H=2, T=24, seed=s) for s in range(2)]
    q, k, v, kw = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
    kernel = functools.partial(
        pk.gated_delta_rule, chunk_size=16, backend=backend, schedule=schedule or None
    )
    reference = functools.partial(mixers.mix, "gated_delta", impl="recurrent")
    got, want = (
        jax.vmap(functools.partial(_value_and_grads, fn))(q, k, v, kw) for fn in (kernel, reference)
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def test_mix_dispatches_pallas():
    q, k, v, kw = _inputs("gated_delta")
    want, _ = mixers.mix("gated_delta", q, k, v, impl="chunked", chunk_size=16, **kw)
    got, _ = mixers.mix("gated_delta", q, k, v, impl="pallas", chunk_size=16, **kw)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 24}, "GPU kernels need chunk_size a power of two >= 16, got 24"),
        ({"chunk_size": 12, "backend": "tpu"}, "TPU kernels need chunk_size a multiple of 8"),
        ({"backend": "cuda"}, "unknown Pallas backend 'cuda'"),
        ({"backend": "tpu", "schedule": "split"}, "schedule 'split': 'fused', or 'split' on"),
        ({"block_v": 24}, "GPU kernels need block_v a power of two >= 16, got 24"),
        ({"block_v": 64}, "block_v 64 does not divide the value dim 32"),
        ({"backend": "tpu", "block_v": 16}, "TPU kernels need block_v a multiple of 128 or 32"),
        ({"num_warps": 3}, "num_warps must be a power of two up to 32, got 3"),
        ({"backend": "tpu", "num_warps": 4}, "num_warps is a GPU setting"),
        ({"wy": "triton"}, "wy 'triton': 'pallas' or 'xla'"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    q, k, v, kw = _inputs("delta")
    with pytest.raises(ValueError, match=message):
        pk.delta_rule(q, k, v, **kw, **kwargs)


def test_default_settings_per_backend():
    # GPU: the split schedule and 64:4 tiling, the fastest measured on an H100; blocks never
    # wider than the value dim. TPU: the fused schedule, 128-wide value blocks, no warps.
    gpu = pk.kernel_config(128, 128, 64, backend="gpu")
    assert (gpu.schedule, gpu.block_v, gpu.num_warps, gpu.wy) == ("split", 64, 4, "pallas")
    assert pk.kernel_config(32, 32, 16, backend="gpu").block_v == 32
    tpu = pk.kernel_config(128, 256, 64, backend="tpu")
    assert (tpu.schedule, tpu.block_v, tpu.num_warps) == ("fused", 128, 0)


def test_bad_shapes_are_refused():
    q, k, v, _ = _inputs("linear")
    with pytest.raises(ValueError, match=r"expected q, k \[B, H, T, Dk\]"):
        pk.linear_attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="GPU kernels need head dim a power of two >= 16, got 24"):
        pk.linear_attention(q[..., :24], k[..., :24], v, backend="gpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("backend", "schedule", "platform"),
    [("gpu", "fused", "cuda"), ("gpu", "split", "cuda"), ("tpu", "fused", "tpu")],
)
def test_kernels_lower_for_their_platform(backend, schedule, platform, dtype):
    """Forward and backward lower to Triton / Mosaic custom calls, also on a CPU-only machine.

    Lowering runs the Pallas backend's own checks (Mosaic block shapes, ops either backend
    supports); only the final compilation to the device needs the device.
    """
    q, k, v, kw = _inputs("gated_delta", B=1, H=2, T=128, K=128, V=128)
    fn = functools.partial(
        pk.gated_delta_rule, chunk_size=64, backend=backend, interpret=False, schedule=schedule
    )

    def forward_backward(q, k, v, kw):
        o, vjp = jax.vjp(lambda *a: fn(*a[:3], **a[3])[0], q, k, v, kw)
        return vjp(o)

    args = [x.astype(dtype) for x in (q, k, v)]
    # Newer JAX asks the target GPU's kind for the Triton lowering (compute capability): name
    # one through an abstract mesh, as for any ahead-of-time compilation.
    target = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=target
    )
    with contextlib.nullcontext() if backend == "tpu" else jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(forward_backward).trace(*args, kw).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    # Forward and backward of the recurrence, and of the WY transform.
    assert text.count(marker) >= 4, f"expected 4 {marker} calls, found {text.count(marker)}"
