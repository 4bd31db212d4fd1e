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
    """RetNet's retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for
    Large Language Models"): a fixed decay per head, gamma_h = 1 - 2^(-5-h).

        S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)

    As in the paper: no feature map on q and k, a per-head norm of the output (RMSNorm here,
    GroupNorm there), a swish (SiLU) output gate, here starting as the identity, value dim
    2x the key dim and no short convolution. The xPos rotation of q and k is left out.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        H, K = num_heads, head_dim
        V = 2 * K
        self.H, self.K, self.V = H, K, V
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj, self.k_proj = linear(d_model, H * K), linear(d_model, H * K)
        self.v_proj, self.o_proj = linear(d_model, H * V), linear(H * V, d_model)
        self.o_norm = nnx.RMSNorm(V, rngs=rngs)
        self.g_proj = nnx.Linear(
            d_model, H * V, kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.constant(OUTPUT_GATE_BIAS["silu"]), rngs=rngs,
        )  # fmt: skip

    def __call__(self, x_BTD: jax.Array, state: jax.Array | None = None):
        B, T, _ = x_BTD.shape

        def heads(x_BTF, dim):
            return x_BTF.reshape(B, T, self.H, dim).transpose(0, 2, 1, 3)

        q_BHTK = heads(self.q_proj(x_BTD), self.K)
        k_BHTK = heads(self.k_proj(x_BTD), self.K)
        v_BHTV = heads(self.v_proj(x_BTD), self.V)
        g_BHT = jnp.broadcast_to(retnet_log_decay(self.H)[None, :, None], (B, self.H, T))
        o_BHTV, state = mix("scalar_decay", q_BHTK, k_BHTK, v_BHTV, g=g_BHT, initial_state=state)
        o_BTE = self.o_norm(o_BHTV).transpose(0, 2, 1, 3).reshape(B, T, self.H * self.V)
        return self.o_proj(o_BTE * jax.nn.silu(self.g_proj(x_BTD))), state


# EVOLVE-BLOCK-END
