import numpy as np
import pytest

from evolve_jax.memory.history import History, Node
from evolve_jax.sampling import SAMPLERS, MapElites, SamplerConfig, make_sampler
from evolve_jax.search_space import DescriptorAxis


def _node(i, score, island=0, descriptor=(), parents=()):
    return Node(
        id=i, parents=list(parents), search_space="toy", name=f"n{i}", motivation="",
        candidate={}, status="ok", reason=None, metrics={}, score=score, stats={}, analysis="",
        timings={}, island=island, created=0.0, descriptor=list(descriptor),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("direction", ["max", "min"])
def test_every_sampler_selects_from_the_pool(name, direction):
    pool = [_node(i, float(i), island=i % 2, descriptor=(i, i)) for i in range(6)]
    axes = (DescriptorAxis("a", 0, 6, 3), DescriptorAxis("b", 0, 6, 3))
    sampler = make_sampler(SamplerConfig(name=name, num_islands=2), direction, axes)
    rng = np.random.default_rng(0)
    for slot in range(10):
        selection = sampler.select(pool, rng, slot)
        assert selection.parent in pool
        assert all(r in pool and r.id != selection.parent.id for r in selection.references)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'best'"):
        SamplerConfig(name="best")


@pytest.mark.parametrize("direction,best", [("max", 4), ("min", 0)])
def test_greedy_takes_the_best_in_the_score_direction(direction, best):
    pool = [_node(i, float(i)) for i in range(5)]
    sampler = make_sampler(SamplerConfig(name="greedy"), direction)
    assert sampler.select(pool, np.random.default_rng(0), 0).parent.id == best


def test_random_covers_the_pool():
    pool = [_node(i, float(i)) for i in range(5)]
    sampler = make_sampler(SamplerConfig(name="random"), "max")
    rng = np.random.default_rng(0)
    seen = {sampler.select(pool, rng, 0).parent.id for _ in range(100)}
    assert seen == set(range(5))


def test_ucb1_cold_start_updates_visits_and_visits_each_node_once():
    pool = [_node(i, float(i)) for i in range(6)]
    sampler = make_sampler(SamplerConfig(name="ucb1"), "max")
    rng = np.random.default_rng(0)
    first = [sampler.select(pool, rng, s).parent.id for s in range(6)]
    assert sorted(first) == list(range(6))  # no repeats while any node is unvisited
    assert all(sampler.visits[i] == 1 for i in range(6))
    # Once warm, the best node is chosen more than the worst.
    later = [sampler.select(pool, rng, s).parent.id for s in range(200)]
    assert later.count(5) > later.count(0)
    assert sum(sampler.visits.values()) == 206


def test_ucb1_visits_rebuild_from_recorded_children():
    view = [_node(0, 1.0), _node(1, 2.0), _node(2, 0.5, parents=[0]), _node(3, 0.5, parents=[0])]
    sampler = make_sampler(SamplerConfig(name="ucb1"), "max")
    sampler.sync(None, view, step=1)
    assert sampler.visits[0] == 2 and sampler.visits[1] == 0


def test_islands_migrate_around_the_ring_and_persist(tmp_path):
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    view = [_node(i, float(i), island=i % 3) for i in range(9)]
    config = SamplerConfig(name="islands", num_islands=3, migration_interval=2, migration_rate=0.4)
    sampler = make_sampler(config, "max")
    sampler.sync(history, view, step=1)
    assert sampler.migrants == {}  # not a migration step
    sampler.sync(history, view, step=2)
    # The best 40% (ceil -> 2 of 3) of island i move to island i+1.
    assert sampler.migrants == {1: {6, 3}, 2: {7, 4}, 0: {8, 5}}
    restarted = make_sampler(config, "max")
    restarted.sync(history, view, step=3)  # after a restart the migration is read back
    assert restarted.migrants == sampler.migrants
    assert [k for k, _ in history.records("migrations/main")] == ["00000002"]
    members = {n.id for n in restarted.members(view, 1)}
    assert members == {1, 4, 7, 6, 3}


def test_runs_sharing_a_workdir_keep_their_own_migrations(tmp_path):
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    config = SamplerConfig(name="islands", num_islands=2, migration_interval=1, migration_rate=0.5)
    view_a = [_node(i, float(i), island=i % 2) for i in range(4)]
    view_b = [*view_a, *(_node(i, float(i), island=i % 2) for i in range(4, 8))]
    run_a = make_sampler(config, "max", run="a")
    run_a.sync(history, view_a, step=1)
    run_b = make_sampler(config, "max", run="b")
    run_b.sync(history, view_b, step=1)  # same step, another run, another view
    assert run_a.migrants == {1: {2}, 0: {3}}
    assert run_b.migrants == {1: {6, 4}, 0: {7, 5}}  # its own moves, not run a's
    resumed_a = make_sampler(config, "max", run="a")
    resumed_a.sync(history, view_a, step=2)
    assert resumed_a.migrants[1] >= {2} and not resumed_a.migrants[1] & {4, 6}


def test_islands_select_within_their_island():
    pool = [_node(i, float(i), island=i % 2) for i in range(8)]
    sampler = make_sampler(SamplerConfig(name="islands", num_islands=2), "max")
    rng = np.random.default_rng(0)
    for slot in range(20):
        selection = sampler.select(pool, rng, slot)
        assert selection.island == slot % 2 and selection.parent.island == slot % 2


def test_map_elites_keeps_the_best_node_per_cell():
    axes = (DescriptorAxis("a", 0.0, 1.0, 2), DescriptorAxis("b", 0.0, 1.0, 2))
    pool = [
        _node(0, 1.0, descriptor=(0.1, 0.1)),
        _node(1, 3.0, descriptor=(0.2, 0.3)),  # same cell as 0, better
        _node(2, 2.0, descriptor=(0.9, 0.1)),
        _node(3, 0.5, descriptor=(0.9, 0.9)),
        _node(4, 0.1, descriptor=(0.8, 0.7)),  # same cell as 3, worse
    ]
    sampler = make_sampler(SamplerConfig(name="map_elites"), "max", axes)
    assert isinstance(sampler, MapElites)
    archive = sampler.archive(pool)
    assert {cell: n.id for cell, n in archive.items()} == {(0, 0): 1, (1, 0): 2, (1, 1): 3}
    rng = np.random.default_rng(0)
    chosen = {sampler.select(pool, rng, 0).parent.id for _ in range(60)}
    assert chosen == {1, 2, 3}  # only elites, every elite


def test_map_elites_without_descriptors_is_refused():
    with pytest.raises(ValueError, match="map_elites needs behaviour descriptors"):
        make_sampler(SamplerConfig(name="map_elites"), "max", ())
