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
    """Linear attention (Katharopoulos, Vyas, Pappas & Fleuret 2020, "Transformers are RNNs: Fast
    Autoregressive Transformers with Linear Attention").

        S_t = S_{t-1} + phi(k_t) v_t^T,  o_t = S_t^T phi(q_t) / sqrt(K),  phi = elu + 1

    The paper divides o_t by phi(q_t)^T sum_s phi(k_s); a per-head RMSNorm of the output stands
    in for that normaliser here. As in the paper: no short convolution, no output gate.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        H, K = num_heads, head_dim
        V = K
        self.H, self.K, self.V = H, K, V
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj, self.k_proj = linear(d_model, H * K), linear(d_model, H * K)
        self.v_proj, self.o_proj = linear(d_model, H * V), linear(H * V, d_model)
        self.o_norm = nnx.RMSNorm(V, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, state: jax.Array | None = None):
        B, T, _ = x_BTD.shape

        def heads(x_BTF, dim):
            return x_BTF.reshape(B, T, self.H, dim).transpose(0, 2, 1, 3)

        q_BHTK = feature_map("elu_plus_one", heads(self.q_proj(x_BTD), self.K))
        k_BHTK = feature_map("elu_plus_one", heads(self.k_proj(x_BTD), self.K))
        v_BHTV = heads(self.v_proj(x_BTD), self.V)
        o_BHTV, state = mix("linear", q_BHTK, k_BHTK, v_BHTV, initial_state=state)
        o_BTE = self.o_norm(o_BHTV).transpose(0, 2, 1, 3).reshape(B, T, self.H * self.V)
        return self.o_proj(o_BTE), state


# EVOLVE-BLOCK-END
