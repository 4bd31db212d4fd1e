"""Pallas kernels for chunked linear attention (TPU and GPU), checked against the jnp references
in ``search_spaces.linear_attention.mixers``."""
