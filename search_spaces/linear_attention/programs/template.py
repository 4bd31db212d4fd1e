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
# class TokenMixer(nnx.Module): the interface in the module docstring.
# EVOLVE-BLOCK-END
