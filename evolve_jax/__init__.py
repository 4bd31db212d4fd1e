"""evolve_jax: an agentic loop for automated AI research (ASI-Evolve, re-implemented in JAX)."""

__version__ = "0.1.0"
