"""The token mixer of a causal linear-attention language model (code mode).

The program defines one class, the sequence-mixing layer of every block; the rest of the model is
fixed: token embedding, then per block x + TokenMixer(RMSNorm(x))[0] and x + MLP(RMSNorm(x)),
a final RMSNorm and the output head.

    class TokenMixer(nnx.Module):
        def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs): ...
        def __call__(
            self, x_BTD: jax.Array, state: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array]: ...

* ``d_model``, ``num_heads``, ``head_dim``: the sizes the harness builds the model with (the
  byte-LM stage doubles d_model and head_dim).
* ``x_BTD``: [B, T, D] float32 with D = d_model. Returns ``(y_BTD, state_BHKV)``: y [B, T, D]
  and the final recurrent state [B, H, K, V], H = num_heads, K = head_dim; V (value dim per
  head) is the program's choice.
* ``state``: the initial recurrent state [B, H, K, V]; None means zeros.
* Causal: y[t] depends on x[:t+1] only (checked block by block: outputs up to t must not
  change when the inputs after t are redrawn).
* Cost linear in T (checked: FLOPs may grow at most ~2.6x when T doubles).
* Parameters come from ``rngs`` (``nnx.Linear(..., rngs=rngs)``, ``rngs.params()``), so the
  initialisation is a function of the seed alone.

``program_api`` documents what it exports; its ``mix`` runs the project's recurrences (on Pallas
kernels on GPU and TPU where the rule has one). Axis letters: B batch, T time, D model width,
H heads, K key dim per head, V value dim per head.
"""

# ruff: noqa: F401
# The frame imports everything a program may need; each program uses a part of it.

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from search_spaces.linear_attention.program_api import (
    DT_INIT,
    OUTPUT_GATE_BIAS,
    ShortConv,
    feature_map,
    mix,
    qk_normalise,
    retnet_log_decay,
)


# EVOLVE-BLOCK-START
class TokenMixer(nnx.Module):
    """Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality"): the SSD recurrence, a scalar decay per head.

        S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(K),
        g_t = -exp(A_log) softplus(W_a x_t + dt_bias)

    In SSM terms k is B, q is C and v is x. Mamba2's decay and its initialisation (A in [1, 16],
    dt from DT_INIT so the state barely forgets at first) in this space's mixer layout: separate
    q, k, v projections, each with a short causal convolution and SiLU, no dt scaling of the
    input, no D skip, inner (value) width 2x, per-head RMSNorm then a SiLU output gate that
    starts as the identity.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        H, K = num_heads, head_dim
        V = 2 * K
        self.H, self.K, self.V = H, K, V
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj, self.k_proj = linear(d_model, H * K), linear(d_model, H * K)
        self.v_proj, self.o_proj = linear(d_model, H * V), linear(H * V, d_model)
        self.q_conv = ShortConv(H * K, 4, rngs=rngs)
        self.k_conv = ShortConv(H * K, 4, rngs=rngs)
        self.v_conv = ShortConv(H * V, 4, rngs=rngs)
        key_a, key_dt = rngs.params(), rngs.params()
        self.a_proj = linear(d_model, H)
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(key_a, (H,), minval=1, maxval=16)))
        log_dt = jax.random.uniform(
            key_dt, (H,), minval=jnp.log(DT_INIT[0]), maxval=jnp.log(DT_INIT[1])
        )
        dt = jnp.exp(log_dt)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # softplus^-1(dt)
        self.o_norm = nnx.RMSNorm(V, rngs=rngs)
        self.g_proj = nnx.Linear(
            d_model, H * V, kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.constant(OUTPUT_GATE_BIAS["silu"]), rngs=rngs,
        )  # fmt: skip

    def __call__(self, x_BTD: jax.Array, state: jax.Array | None = None):
        B, T, _ = x_BTD.shape

        def heads(x_BTF, dim):
            return x_BTF.reshape(B, T, self.H, dim).transpose(0, 2, 1, 3)

        q_BHTK = jax.nn.silu(heads(self.q_conv(self.q_proj(x_BTD)), self.K))
        k_BHTK = jax.nn.silu(heads(self.k_conv(self.k_proj(x_BTD)), self.K))
        v_BHTV = heads(jax.nn.silu(self.v_conv(self.v_proj(x_BTD))), self.V)
        dt_BTH = jax.nn.softplus(self.a_proj(x_BTD) + self.dt_bias[...])
        g_BHT = (-jnp.exp(self.A_log[...]) * dt_BTH).transpose(0, 2, 1)
        o_BHTV, state = mix("scalar_decay", q_BHTK, k_BHTK, v_BHTV, g=g_BHT, initial_state=state)
        o_BTE = self.o_norm(o_BHTV).transpose(0, 2, 1, 3).reshape(B, T, self.H * self.V)
        return self.o_proj(o_BTE * jax.nn.silu(self.g_proj(x_BTD))), state


# EVOLVE-BLOCK-END
