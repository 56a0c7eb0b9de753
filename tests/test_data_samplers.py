"""Few-shot pools, mixtures and the MeTA-LoRA episodic sampler: sizes, disjointness, determinism, resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from metalora.data import (
    EpisodicSampler,
    Example,
    MetaloraDataError,
    MixtureSampler,
    Task,
    build_pools,
    few_shot_pool,
    mixture_weights,
)


def make_pool(task: str, n: int) -> list[Example]:
    return [Example(f"p{i}", f"r{i}", task, f"{task}/{i}") for i in range(n)]


POOLS = {"a": make_pool("a", 20), "b": make_pool("b", 30), "c": make_pool("c", 16), "d": make_pool("d", 50)}


def ids(episodes):
    return [(e.task, e.task_id, [x.id for x in e.support], [x.id for x in e.query]) for e in episodes]


# ---------------------------------------------------------------------------------------------- pools


def test_few_shot_pool_seeded_subset():
    data = make_pool("t", 200)
    p1, p2, p3 = (
        few_shot_pool(data, 50, seed=0, task="t"),
        few_shot_pool(data, 50, 0, "t"),
        few_shot_pool(data, 50, 1, "t"),
    )
    assert len(p1) == 50 and len({e.id for e in p1}) == 50
    assert [e.id for e in p1] == [e.id for e in p2]
    assert [e.id for e in p1] != [e.id for e in p3]
    assert {e.id for e in p1} <= {e.id for e in data}
    with pytest.raises(MetaloraDataError, match="task 't': cannot draw a few-shot pool of k=201 from 200"):
        few_shot_pool(data, 201, 0, "t")


def test_build_pools_from_tasks_per_task_k():
    tasks = [Task("x", make_pool("x", 120), [], [], {}), Task("y", make_pool("y", 60), [], [], {})]
    pools = build_pools(tasks, {"x": 100, "y": 50}, seed=0)
    assert {k: len(v) for k, v in pools.items()} == {"x": 100, "y": 50}
    assert all(e.task == "x" for e in pools["x"])
    with pytest.raises(MetaloraDataError, match="k=100 from 60"):
        build_pools(tasks, 100, seed=0)


# -------------------------------------------------------------------------------------------- mixtures


def test_mixture_weights_hand_computed():
    sizes = {"a": 100, "b": 400}
    assert mixture_weights(sizes, "proportional") == pytest.approx({"a": 0.2, "b": 0.8})
    assert mixture_weights(sizes, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    # temperature 2: p ∝ n^(1/2) = 10, 20
    assert mixture_weights(sizes, "temperature", 2.0) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert mixture_weights(sizes, "temperature", 1.0) == pytest.approx({"a": 0.2, "b": 0.8})
    with pytest.raises(MetaloraDataError, match="unknown mixture strategy"):
        mixture_weights(sizes, "sqrt")
    with pytest.raises(MetaloraDataError, match=r"empty tasks in mixture: \['b'\]"):
        mixture_weights({"a": 3, "b": 0})


def test_mixture_sampler_frequencies_epochs_and_resume():
    pools = {"a": make_pool("a", 10), "b": make_pool("b", 40)}
    s = MixtureSampler(pools, batch_size=10, seed=0, strategy="proportional")
    counts = Counter(name for _ in range(200) for name, _ in s.sample())
    assert abs(counts["a"] / 2000 - 0.2) < 0.03  # 2000 draws, sd ≈ 0.009
    # within a task, examples are visited in epochs: the first 10 draws of 'a' are its 10 examples
    s2 = MixtureSampler(pools, batch_size=5, seed=1, strategy="uniform")
    seen_a = [ex.id for _ in range(40) for name, ex in s2.sample() if name == "a"][:10]
    assert sorted(seen_a) == sorted(e.id for e in pools["a"])
    # resume
    s3 = MixtureSampler(pools, batch_size=4, seed=2)
    for _ in range(3):
        s3.sample()
    state = json.loads(json.dumps(s3.state_dict()))
    expected = [[(n, e.id) for n, e in s3.sample()] for _ in range(5)]
    s4 = MixtureSampler(pools, batch_size=4, seed=2)
    s4.load_state_dict(state)
    assert [[(n, e.id) for n, e in s4.sample()] for _ in range(5)] == expected


# -------------------------------------------------------------------------------------------- episodic


def test_episodes_sizes_disjoint_and_from_own_pool():
    s = EpisodicSampler(POOLS, n_tasks=2, support_size=8, query_size=8, seed=0)
    for _ in range(50):
        episodes = s.sample()
        assert len(episodes) == 2 and episodes[0].task != episodes[1].task
        for ep in episodes:
            assert len(ep.support) == 8 and len(ep.query) == 8
            s_ids, q_ids = {x.id for x in ep.support}, {x.id for x in ep.query}
            assert len(s_ids) == 8 and len(q_ids) == 8  # no repeats
            assert not s_ids & q_ids  # disjoint
            assert all(x.task == ep.task for x in ep.support + ep.query)  # from that task's pool only
            assert ep.task_id == list(POOLS).index(ep.task)
    assert s.iteration == 50


def test_episodes_cover_all_tasks_and_same_seed_same_draws():
    a = EpisodicSampler(POOLS, 2, 4, 4, seed=5)
    b = EpisodicSampler(POOLS, 2, 4, 4, seed=5)
    c = EpisodicSampler(POOLS, 2, 4, 4, seed=6)
    run_a = [ids(a.sample()) for _ in range(30)]
    assert run_a == [ids(b.sample()) for _ in range(30)]
    assert run_a != [ids(c.sample()) for _ in range(30)]
    assert {ep[0] for it in run_a for ep in it} == set(POOLS)


def test_episodic_resume_continues_identically():
    full = EpisodicSampler(POOLS, 3, 5, 3, seed=11)
    for _ in range(7):
        full.sample()
    state = json.loads(json.dumps(full.state_dict()))  # plain JSON, no pickle
    rest = [ids(full.sample()) for _ in range(10)]
    resumed = EpisodicSampler(POOLS, 3, 5, 3, seed=11)
    resumed.load_state_dict(state)
    assert resumed.iteration == 7
    assert [ids(resumed.sample()) for _ in range(10)] == rest
    other = EpisodicSampler(POOLS, 3, 5, 4, seed=11)
    with pytest.raises(MetaloraDataError, match="state was saved with config"):
        other.load_state_dict(state)


def test_too_small_task_names_task_and_sizes():
    pools = {"big": make_pool("big", 50), "tiny": make_pool("tiny", 10)}
    with pytest.raises(
        MetaloraDataError, match=r"task 'tiny' has 10 examples .* support_size \+ query_size = 8 \+ 8 = 16"
    ):
        EpisodicSampler(pools, 2, 8, 8, seed=0)
    s = EpisodicSampler(pools, 2, 8, 8, seed=0, with_replacement=True)
    for ep in s.sample():
        assert len(ep.support) == 8 and len(ep.query) == 8
        assert all(x.task == ep.task for x in ep.support + ep.query)


def test_episodic_argument_errors_and_custom_task_ids():
    with pytest.raises(MetaloraDataError, match="n_tasks=5 must be between 1 and the number of tasks"):
        EpisodicSampler(POOLS, 5, 2, 2, seed=0)
    with pytest.raises(MetaloraDataError, match="task 'e' has an empty pool"):
        EpisodicSampler({**POOLS, "e": []}, 1, 1, 1, seed=0)
    s = EpisodicSampler(POOLS, 4, 2, 2, seed=0, task_to_id={"a": 10, "b": 11, "c": 12, "d": 13})
    assert sorted(ep.task_id for ep in s.sample()) == [10, 11, 12, 13]
