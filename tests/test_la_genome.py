"""Canonical genomes of the linear-attention space: one fingerprint per distinct model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import genome, model

NUM_GENOMES = 3
TOKENS = jax.random.randint(jax.random.key(0), (1, 12), 0, 32)


def _cfg(g):
    return model.ModelConfig(tuple(g.items()), vocab_size=32, chunk_size=8, impl="chunked")


def _random_genome(rng):
    return genome.validate(
        {g.name: g.choices[int(rng.integers(len(g.choices)))] for g in genome.GENES}
    )


_ONE_BLOCK: dict[str, tuple] = {}


def _one_block(g):
    """(graphdef, abstract state, (tree structure, leaf shapes)) of the genome with one block.

    The blocks are copies of one design, so the layer count and one block decide the parameter
    tree, and the test compares one-block models: tracing a deep model is slow.
    """
    one = {**g, "num_layers": 1}
    key = fingerprint(one)
    if key not in _ONE_BLOCK:
        graphdef, state = model.abstract(_cfg(one))
        leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
        _ONE_BLOCK[key] = graphdef, state, (treedef, tuple(x.shape for x in leaves))
    return _ONE_BLOCK[key]


def _random_params(state, seed):
    """Seeded random values for every parameter: cheaper than ``model.init`` (whose eager random
    ops compile per shape), and no zero-initialised kernel hides a gene's effect."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype), state)


def test_distinct_canonical_neighbours_build_distinct_models():
    # Contrapositive of "same model => same fingerprint", over every single-gene neighbour.
    rng = np.random.default_rng(0)
    same_model = []
    for i in range(NUM_GENOMES):
        a = _random_genome(rng)
        graphdef_a, state_a, tree_a = _one_block(a)
        params = _random_params(state_a, i)
        logits_a = None
        for gene in genome.GENES:
            for value in gene.choices:
                b = genome.validate({**a, gene.name: value})
                if fingerprint(b) == fingerprint(a) or b["num_layers"] != a["num_layers"]:
                    continue  # the same genome, or a different number of blocks
                graphdef_b, _, tree_b = _one_block(b)
                if tree_b != tree_a:
                    continue
                # Same parameter tree: the same parameter values must still compute differently.
                if logits_a is None:
                    logits_a = nnx.merge(graphdef_a, params)(TOKENS)
                    assert bool(jnp.isfinite(logits_a).all()), a
                logits_b = nnx.merge(graphdef_b, params)(TOKENS)
                if float(jnp.abs(logits_a - logits_b).max()) <= 1e-6:
                    same_model.append(f"{gene.name}: {a[gene.name]!r} -> {value!r} in {a}")
    assert not same_model, "distinct fingerprints, same model:\n" + "\n".join(same_model)


def test_mlp_ratio_is_canonical_without_an_mlp():
    genomes = [genome.validate({"mlp": "none", "mlp_ratio": r}) for r in (2, 3, 4)]
    assert genomes[0] == genomes[1] == genomes[2]
    assert genomes[0]["mlp_ratio"] == genome.GENE_BY_NAME["mlp_ratio"].default
    with_mlp = [genome.validate({"mlp": "gelu", "mlp_ratio": r}) for r in (2, 3, 4)]
    assert len({fingerprint(g) for g in with_mlp}) == 3


def test_mutations_change_the_canonical_genome():
    # A mutation of a gene the genome ignores would be a wasted evaluation (a novelty reject).
    rng = np.random.default_rng(1)
    parents = [_random_genome(rng) for _ in range(20)]
    parents.append(genome.validate({**genome.SEEDS["deltanet"], "mlp": "none"}))
    for group in genome.GROUPS:
        mutate = genome.OPERATORS[f"mutate_{group}"].fn
        for parent in parents:
            for _ in range(10):
                assert mutate(rng, [parent]) != parent, (group, parent)
