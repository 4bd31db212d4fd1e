"""The language model on the Pallas kernels (impl="pallas") against chunked jnp: logits and
parameter gradients for every seed architecture whose update rule has a kernel, with the
kernels shown to be in the traced model. GLA (channel_decay) has no kernel: impl="pallas"
runs it chunked, which is checked on its own."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from search_spaces.linear_attention import genome, mixers, model

TINY = dict(d_model=32, head_dim=16, num_layers=1, mlp_ratio=2)


def _rule(name):
    return genome.UPDATE_RULES[genome.SEEDS[name]["update_rule"]]


WITH_KERNEL = [name for name in genome.SEEDS if _rule(name) in mixers.PALLAS_KERNELS]


def _loss_fn(name, impl):
    """(loss of the parameters on a fixed batch, the initial parameters)."""
    g = genome.validate({**genome.SEEDS[name], **TINY})
    cfg = model.ModelConfig(tuple(g.items()), vocab_size=64, chunk_size=16, impl=impl)
    graphdef, params = model.init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss, params


def _kernel_count(loss, params):
    """How many pallas_call equations the traced loss holds (nested jaxprs print inline)."""
    return str(jax.make_jaxpr(loss)(params)).count("pallas_call")


@pytest.mark.parametrize("name", WITH_KERNEL)
def test_pallas_model_matches_chunked(name):
    (loss_p, params_p), (loss_c, params_c) = _loss_fn(name, "pallas"), _loss_fn(name, "chunked")
    assert _kernel_count(loss_p, params_p) > 0
    assert _kernel_count(loss_c, params_c) == 0
    value_p, grads_p = jax.value_and_grad(loss_p)(params_p)
    value_c, grads_c = jax.value_and_grad(loss_c)(params_c)
    assert bool(jnp.isfinite(value_p))
    np.testing.assert_allclose(value_p, value_c, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_c), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_gla_has_no_kernel_and_runs_chunked():
    assert [name for name in genome.SEEDS if name not in WITH_KERNEL] == ["gla"]
    assert _rule("gla") == "channel_decay" and "channel_decay" not in mixers.PALLAS_KERNELS
    for impl in ("pallas", "auto"):
        assert mixers.resolve_impl(impl, "channel_decay", 64, 64, 64) == "chunked"
    assert _kernel_count(*_loss_fn("gla", "pallas")) == 0


def test_auto_is_chunked_on_cpu_and_pallas_on_accelerators():
    want = "pallas" if jax.default_backend() in ("gpu", "tpu") else "chunked"
    assert mixers.resolve_impl("auto", "gated_delta", 64, 64, 64) == want
    if jax.default_backend() == "gpu":  # Triton tiles are powers of two
        assert mixers.resolve_impl("auto", "delta", 24, 24, 64) == "chunked"
