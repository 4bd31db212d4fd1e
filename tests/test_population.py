import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolve_jax.evaluation.population import evaluate_population, population_mesh


def _loss(candidate, scale):
    w, b = candidate
    return scale * jnp.sum(w**2) + b


@pytest.mark.parametrize("size", [1, 4, 5, 11])
def test_population_sharded_over_devices_matches_vmap(size):
    assert len(jax.devices()) == 4  # set in conftest
    rng = np.random.default_rng(size)
    population = (rng.normal(size=(size, 3)).astype(np.float32), np.arange(size, dtype=np.float32))
    got = evaluate_population(_loss, population, jax.devices(), 2.0)
    want = jax.vmap(lambda c: _loss(c, 2.0))(population)
    assert got.shape == (size,)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mesh_is_built_once_per_device_set():
    devices = tuple(jax.devices())
    assert population_mesh(devices) is population_mesh(devices)
    assert population_mesh(devices).axis_names == ("pop",)
