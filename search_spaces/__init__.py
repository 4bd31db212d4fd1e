"""Search spaces, one package each, registered under the ``evolve_jax.search_spaces`` entry points.

The engine never imports these by name; see ``evolve_jax.search_space`` for the contract.
"""
