import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolve_jax.evaluation.population import evaluate_population, population_mesh


def _loss(candidate, scale):
    w, b = candidate
    return scale * jnp.sum(w**2) + b


# Population size = multiple * n + extra for n devices: one candidate, exactly one per device,
# one more than the devices (padding), and several rounds plus a remainder.
@pytest.mark.parametrize(
    ("multiple", "extra"), [(0, 1), (1, 0), (1, 1), (2, 3)], ids=["1", "n", "n+1", "2n+3"]
)
def test_population_sharded_over_devices_matches_vmap(multiple, extra):
    devices = jax.devices()
    size = multiple * len(devices) + extra
    rng = np.random.default_rng(size)
    population = (rng.normal(size=(size, 3)).astype(np.float32), np.arange(size, dtype=np.float32))
    got = evaluate_population(_loss, population, devices, 2.0)
    want = jax.vmap(lambda c: _loss(c, 2.0))(population)
    assert got.shape == (size,)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_conftest_sets_the_cpu_device_count():
    if jax.default_backend() != "cpu" or jax.config.jax_num_cpu_devices >= 0:
        pytest.skip("the device count is not XLA_FLAGS' to set here")
    # conftest appends a count to XLA_FLAGS when they lack one, even when they were preset.
    count = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ["XLA_FLAGS"])
    assert count is not None
    assert len(jax.devices()) == int(count.group(1))


def test_mesh_is_built_once_per_device_set():
    devices = tuple(jax.devices())
    assert population_mesh(devices) is population_mesh(devices)
    assert population_mesh(devices).axis_names == ("pop",)
