"""What a token-mixer program (code mode) may import from the project.

A program (``programs/template.py`` with its EVOLVE-BLOCK filled) defines ``TokenMixer``. Besides
jax, jax.numpy and flax.nnx it may use:

* ``mix(rule, q, k, v, *, beta=None, g=None, initial_state=None) -> (o, state)``: a linear-
  attention recurrence of ``mixers`` run with the chunk size and implementation the harness set
  (``configure``). Rules: "linear", "scalar_decay" (per-head log-decay ``g [B,H,T]``),
  "channel_decay" (per-key-channel ``g [B,H,T,K]``), "delta" (``beta [B,H,T]``),
  "gated_delta" (``beta`` and scalar ``g``); ``q, k [B,H,T,K]``, ``v [B,H,T,V]``,
  ``initial_state`` and the returned state ``[B,H,K,V]`` (float32), ``o [B,H,T,V]``; ``q`` is
  scaled by ``K ** -0.5`` inside. The equations are in the ``mixers`` docstring.
* ``ShortConv(channels, size, *, rngs)``: depthwise causal convolution over time, [B,T,C] ->
  [B,T,C], no activation.
* ``feature_map(name, x)``: "identity", "elu_plus_one", "relu", "silu";
  ``qk_normalise(name, x)``: "none", "l2", "sum" over the last axis.
* ``retnet_log_decay(num_heads)``: RetNet's fixed per-head log-decay, [H].
* ``DT_INIT``, ``OUTPUT_GATE_BIAS``: the initialisations that let decaying and gated mixers learn
  MQAR within the budget (``model.py`` says why).

A program may equally write its own recurrence in jnp (``jax.lax.scan`` over time, or a chunked
form) instead of calling ``mix``; the checks hold it to the same rules (causal, linear in T).

Training leaves three kinds of parameters out of weight decay, by name: ``A_log``, ``dt_bias``
and the bias of a submodule named ``g_proj`` (``train._NO_WEIGHT_DECAY``).
"""

from __future__ import annotations

import dataclasses

import jax

from search_spaces.linear_attention import mixers
from search_spaces.linear_attention.mixers import retnet_log_decay
from search_spaces.linear_attention.model import (
    DT_INIT,
    OUTPUT_GATE_BIAS,
    ShortConv,
    feature_map,
    qk_normalise,
)

__all__ = [
    "DT_INIT",
    "OUTPUT_GATE_BIAS",
    "RULES",
    "Settings",
    "ShortConv",
    "configure",
    "feature_map",
    "mix",
    "qk_normalise",
    "retnet_log_decay",
    "settings",
]

RULES = tuple(mixers.UPDATE_RULES)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How ``mix`` runs: chunk size and implementation (``mixers.IMPLS``; "auto" is Pallas on GPU
    and TPU where the rule has a kernel, chunked jnp elsewhere; see ``mixers.resolve_impl``)."""

    chunk_size: int = mixers.DEFAULT_CHUNK_SIZE
    impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size must be an int, got {self.chunk_size!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.impl not in mixers.IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {list(mixers.IMPLS)}")


_settings = Settings()


def configure(chunk_size: int, impl: str) -> None:
    """Sets how ``mix`` runs, for the whole process (the harness calls it with the space's options).

    ``mix`` reads the settings when it is traced: configure before building and jitting a model.
    """
    global _settings
    _settings = Settings(chunk_size, impl)


def settings() -> Settings:
    """The settings ``mix`` uses now."""
    return _settings


def mix(
    rule: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    beta: jax.Array | None = None,
    g: jax.Array | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Runs update rule ``rule``; returns (o [B,H,T,V], final state [B,H,K,V])."""
    return mixers.mix(
        rule, q, k, v, beta=beta, g=g, initial_state=initial_state,
        chunk_size=_settings.chunk_size, impl=_settings.impl,
    )  # fmt: skip
