"""The Engineer's static checks for an architecture, each failing with a named reason.

They run in seconds, before any training: output shapes (``jax.eval_shape``), causality (no
block's output up to position t may change when its inputs after t are redrawn), sub-quadratic
cost (FLOPs at 2T against T) and the parameter budget. The "finite loss after a few steps"
check runs inside training (``train.TrainConfig.finite_probe_steps``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from evolve_jax.search_space import CheckFailure
from search_spaces.linear_attention import model


def check_shapes(cfg: model.ModelConfig, seq_len: int) -> CheckFailure | None:
    graphdef, params = model.abstract(cfg)
    tokens = jax.ShapeDtypeStruct((2, seq_len), jnp.int32)
    try:
        out = jax.eval_shape(lambda p, t: nnx.merge(graphdef, p)(t), params, tokens)
    except Exception as e:
        return CheckFailure("shapes", f"the model does not trace: {type(e).__name__}: {e}")
    if out.shape != (2, seq_len, cfg.vocab_size):
        return CheckFailure(
            "shapes", f"logits {out.shape}, expected {(2, seq_len, cfg.vocab_size)}"
        )
    return None


def future_dependence(forward, x_BTD: jax.Array, t: int) -> tuple[float, float]:
    """(max |change in out[:, :t+1]| when every input after t is redrawn, max |out[:, :t+1]|)
    for ``forward: x -> out``.

    A perturbation, not a gradient: it also sees a future read through ``stop_gradient`` or a
    non-differentiable op, and it needs only the forward program, which compiles in a fraction
    of the time of its gradient.
    """
    later = jax.random.normal(jax.random.key(2), x_BTD[:, t + 1 :].shape, x_BTD.dtype)
    past = np.asarray(forward(x_BTD))[:, : t + 1]
    moved = np.asarray(forward(x_BTD.at[:, t + 1 :].set(later)))[:, : t + 1]
    return float(np.abs(moved - past).max()), float(np.abs(past).max())


def check_causality(
    cfg: model.ModelConfig, seq_len: int, position: int | None = None, *, batch: int = 1
):
    """No block's output up to position t may change when its inputs after t do, at ``batch``
    sequences of ``seq_len`` (a program can behave differently at another shape).

    Probing each block rather than the whole model is enough (everything outside the blocks,
    embedding, final norm and head, acts position by position) and compiles one block's
    forward program instead of the model's gradient.
    """
    t = seq_len // 2 if position is None else position
    graphdef, _ = model.abstract(cfg)
    params = model.initializer(cfg)(jax.random.key(0))
    x_BTD = jax.random.normal(jax.random.key(1), (batch, seq_len, cfg.d_model))
    forwards = {}  # one compiled program per block structure
    for i, block in enumerate(nnx.merge(graphdef, params).blocks):
        block_def, state = nnx.split(block)
        if block_def not in forwards:
            forward = functools.partial(lambda d, s, x: nnx.merge(d, s)(x), block_def)
            forwards[block_def] = model.compile_for_few_calls(forward, state, x_BTD)
        future, past = future_dependence(functools.partial(forwards[block_def], state), x_BTD, t)
        if not np.isfinite(future) or future > 1e-6 * max(past, 1.0):
            return CheckFailure(
                "causality",
                f"block {i}'s output at positions <= {t} depends on later inputs "
                f"(max change {future:.3g}; batch {batch}, length {seq_len})",
            )
    return None


def _flops_of(cost) -> float:
    if isinstance(cost, list):  # older JAX returns one dict per computation
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", 0.0))


def flops(forward, *args) -> float:
    """FLOPs of ``forward(*args)`` (args may be ShapeDtypeStructs); 0 if unknown.

    Read off the lowered program when the backend can (within 1% of the compiled count for the
    seeds on CPU, and a second instead of three); otherwise off the compiled one.
    """
    lowered = jax.jit(forward).lower(*args)
    try:
        count = _flops_of(lowered.cost_analysis())
    except Exception:  # a backend without an HLO cost model for lowered programs
        count = 0.0
    return count or _flops_of(lowered.compile().cost_analysis())


def growth_failure(low: float, high: float, seq_len: int, max_ratio: float):
    """A failure when FLOPs grow by more than ``max_ratio`` as T doubles."""
    if low <= 0:
        return None  # the backend reports no cost model; nothing to conclude
    ratio = high / low
    if ratio > max_ratio:
        return CheckFailure(
            "subquadratic",
            f"FLOPs grow {ratio:.2f}x when T doubles from {seq_len} (max {max_ratio})",
        )
    return None


def check_subquadratic(cfg: model.ModelConfig, seq_len: int, max_ratio: float = 2.6):
    """Doubling T must at most ~double the FLOPs (quadratic attention gives ~4x)."""
    graphdef, params = model.abstract(cfg)

    def forward(p, t):
        return nnx.merge(graphdef, p)(t)

    def at(T):
        return flops(forward, params, jax.ShapeDtypeStruct((1, T), jnp.int32))

    return growth_failure(at(seq_len), at(2 * seq_len), seq_len, max_ratio)


def check_param_budget(cfg: model.ModelConfig, budget: int) -> CheckFailure | None:
    count = model.param_count(cfg)
    if count > budget:
        return CheckFailure("param_budget", f"{count:,} parameters exceed the budget of {budget:,}")
    return None
