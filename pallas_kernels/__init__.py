"""Pallas kernels for chunked linear attention, the delta rule and the gated delta rule, with a
GPU (Triton) and a TPU (Mosaic) backend and backward kernels joined by ``jax.custom_vjp``.

Checked against the jnp references in ``search_spaces.linear_attention.mixers``.
"""

from pallas_kernels.ops import delta_rule, gated_delta_rule, kernel_config, linear_attention

__all__ = ["delta_rule", "gated_delta_rule", "kernel_config", "linear_attention"]
