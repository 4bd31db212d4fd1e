"""The language model on the Pallas kernels (impl="pallas") against chunked jnp: logits and
parameter gradients for every seed architecture (GLA has no kernel and falls back)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from search_spaces.linear_attention import genome, mixers, model

TINY = dict(d_model=32, head_dim=16, num_layers=1, mlp_ratio=2)


def _loss_and_grads(name, impl):
    g = genome.validate({**genome.SEEDS[name], **TINY})
    cfg = model.ModelConfig(tuple(g.items()), vocab_size=64, chunk_size=16, impl=impl)
    graphdef, params = model.init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("name", list(genome.SEEDS))
def test_pallas_model_matches_chunked(name):
    (loss_p, grads_p), (loss_c, grads_c) = (_loss_and_grads(name, i) for i in ("pallas", "chunked"))
    assert bool(jnp.isfinite(loss_p))
    np.testing.assert_allclose(loss_p, loss_c, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_c), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_auto_is_chunked_on_cpu_and_pallas_on_accelerators():
    want = "pallas" if jax.default_backend() in ("gpu", "tpu") else "chunked"
    assert mixers.resolve_impl("auto", "gated_delta", 64, 64, 64) == want
    assert mixers.resolve_impl("auto", "channel_decay", 64, 64, 64) == "chunked"
    assert mixers.resolve_impl("pallas", "channel_decay", 64, 64, 64) == "chunked"
    if jax.default_backend() == "gpu":  # Triton tiles are powers of two
        assert mixers.resolve_impl("auto", "delta", 24, 24, 64) == "chunked"
