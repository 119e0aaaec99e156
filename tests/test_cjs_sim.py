"""CJS simulator and TPC-H job loading: fast tests on synthetic jobs, integration tests
on the real TPC-H data (seed-exact parity with upstream spark-sched-sim)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.cjs.jobs import (QUERY_SIZES, build_template, edges_from_adjacency, load_all,
                                   load_query, synthetic_templates)
from netllm.tasks.cjs.sim import CJSAction, CJSEnv, dag_layer_edge_masks, executor_intervals
from netllm.utils import NetLLMError


def _first_runnable(obs):
    return CJSAction(0, obs.num_committable_execs) if len(obs.runnable) else CJSAction(-1, 1)


def _env(**kw) -> CJSEnv:
    kw.setdefault("num_executors", 6)
    kw.setdefault("num_jobs", 8)
    kw.setdefault("arrival_rate", 1e-4)
    return CJSEnv(templates=synthetic_templates(5, seed=3), **kw)


def _check_invariants(env: CJSEnv) -> None:
    pools = env.pools
    located = sum(len(m) for m in pools.members.values())
    moving = sum(pools.moving.values())
    assert located + moving == env.num_executors  # every executor somewhere, exactly once
    for job_id in env.active:
        job = env.jobs[job_id]
        for stage in job.stages:
            assert 0 <= stage.remaining <= stage.num_tasks
            if stage.remaining < stage.num_tasks:  # started: every parent finished
                assert all(job.stages[p].completed for p in stage.parents)
    for ex in env.executors:
        if ex.executing:
            assert ex.job_id is not None and pools.loc[ex.id] == (ex.job_id, ex.task_stage)


def _check_obs(obs, env: CJSEnv) -> None:
    n, j = obs.num_nodes, obs.num_jobs
    assert obs.nodes.shape == (n, 3) and obs.nodes.dtype == np.float32
    assert obs.job_ptr[0] == 0 and obs.job_ptr[-1] == n and len(obs.job_ptr) == j + 1
    assert obs.stage_ids.shape == (n,) and obs.exec_supplies.shape == (j,)
    assert np.array_equal(obs.stage_mask, obs.nodes[:, 2] > 0)
    if len(obs.edge_links):
        assert obs.edge_links.min() >= 0 and obs.edge_links.max() < n
        # edges stay inside one job
        assert np.array_equal(obs.node_job[obs.edge_links[:, 0]], obs.node_job[obs.edge_links[:, 1]])
        assert obs.edge_masks.shape[1] == len(obs.edge_links)
        assert obs.edge_masks.any(axis=0).all()  # every edge takes part in message passing
    assert obs.node_features.shape == (n, 5)
    assert obs.dag_features.shape == (j, 3)
    assert np.array_equal(obs.exec_mask.sum(1), obs.commit_caps)
    assert obs.exec_mask.shape == (j, env.num_executors)
    assert 0 <= obs.source_job_idx <= j


# --------------------------------------------------------------------------- jobs


def test_synthetic_templates_are_valid_and_deterministic() -> None:
    a, b = synthetic_templates(4, seed=1), synthetic_templates(4, seed=1)
    for t, u in zip(a, b):
        assert t.num_tasks == u.num_tasks and np.array_equal(t.edges, u.edges)
        assert t.num_stages == len(t.durations) == len(t.mean_duration_ms)
        assert all(n >= 1 for n in t.num_tasks)
        for i, j in t.edges:
            assert i in t.parents[j] and j in t.children[i]


def test_template_preprocessing_matches_upstream_rules() -> None:
    raw = {0: {"first_wave": {5: [10, 20, 20, 30], 10: [40]},
               "fresh_durations": {5: [20, 99], 10: [40]},
               "rest_wave": {5: [1, 2], 10: [3]}}}
    t = build_template(np.zeros((1, 1)), raw)
    assert t.num_tasks == (6,)  # first key's first + rest wave
    first = t.durations[0]["first_wave"]
    assert first[5] == [10, 20, 30]  # one 20 removed (multiset), 99 absent
    assert first[10] == [10, 20, 30]  # emptied list takes the next smaller key's
    pooled = [20, 99, 40] + [10, 20, 30] * 2 + [1, 2, 3]
    assert t.mean_duration_ms[0] == pytest.approx(np.mean(pooled))


def test_bad_adjacency_and_durations_raise() -> None:
    with pytest.raises(NetLLMError, match="cycle"):
        edges_from_adjacency(np.array([[0, 1], [1, 0]]), "cyc.npy")
    with pytest.raises(NetLLMError, match="cycle"):
        edges_from_adjacency(np.eye(2), "self.npy")
    with pytest.raises(NetLLMError, match="square"):
        edges_from_adjacency(np.zeros((2, 3)), "rect.npy")
    with pytest.raises(NetLLMError, match="NaN"):
        edges_from_adjacency(np.array([[0, np.nan], [0, 0]]), "nan.npy")
    good = {"first_wave": {5: [1]}, "rest_wave": {5: []}, "fresh_durations": {5: [1]}}
    with pytest.raises(NetLLMError, match=r"dur\.npy: no task durations for stage"):
        build_template(np.zeros((2, 2)), {0: good}, source="dur.npy")
    with pytest.raises(NetLLMError, match="dur.npy"):
        build_template(np.zeros((1, 1)), {0: {"first_wave": {5: ["x"]}, "rest_wave": {},
                                                "fresh_durations": {}}}, source="dur.npy")


def test_load_query_rejects_bad_arguments() -> None:
    with pytest.raises(NetLLMError, match="size"):
        load_query("3g", 1)
    with pytest.raises(NetLLMError, match="q:"):
        load_query("2g", 23)


def test_dag_layer_edge_masks_diamond() -> None:
    # 0 -> 1, 0 -> 2, 1 -> 3, 2 -> 3, plus an isolated node 4
    edges = np.array([[0, 1], [0, 2], [1, 3], [2, 3]])
    masks = dag_layer_edge_masks(edges, 5)
    assert masks.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert dag_layer_edge_masks(np.zeros((0, 2), dtype=np.int64), 3).shape[0] == 0


def test_executor_intervals_match_data_levels() -> None:
    iv = executor_intervals(50)
    assert len(iv) == 51
    assert iv[0] == iv[3] == iv[5] == (5, 5)
    assert iv[7] == (5, 10) and iv[10] == (10, 10) and iv[33] == (20, 40) and iv[50] == (50, 50)


# --------------------------------------------------------------------------- simulator


@pytest.mark.parametrize("policy", ["first", "last_one"])
def test_episode_completes_with_invariants(policy: str) -> None:
    env = _env()
    obs, info = env.reset(seed=4)
    assert info["num_events"] >= 1 and len(obs.runnable) > 0
    total, steps = 0.0, 0
    while True:
        if policy == "first":
            action = _first_runnable(obs)
        else:
            action = CJSAction(len(obs.runnable) - 1, 1)
        obs, reward, terminated, truncated, info = env.step(action)
        assert reward <= 0 and not truncated
        total += reward
        steps += 1
        _check_invariants(env)
        if terminated:
            break
        _check_obs(obs, env)
        assert len(obs.runnable) > 0 and obs.num_committable_execs > 0
    records = env.job_records()
    assert len(records) == 8 and all(np.isfinite(r.completion_ms) for r in records)
    assert all(r.completion_ms > r.arrival_ms for r in records)
    # the rewards add up to minus the total job time
    assert -total == pytest.approx(sum(r.completion_ms - r.arrival_ms for r in records))
    assert env.avg_jct_s == pytest.approx(np.mean([r.jct_s for r in records]))
    assert info["num_decisions"] == steps == env.num_decisions
    assert env.num_events >= sum(r.num_tasks for r in records) + 8
    assert obs.num_jobs == 0 and obs.num_committable_execs == 0


def test_same_seed_same_episode_and_seeds_differ() -> None:
    def run(seed):
        env = _env()
        obs, _ = env.reset(seed)
        done = False
        while not done:
            obs, _, done, _, _ = env.step(_first_runnable(obs))
        return [(r.arrival_ms, r.completion_ms) for r in env.job_records()]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_fork_plays_on_independently_and_shares_the_job_data() -> None:
    env = _env()
    obs, _ = env.reset(5)
    for _ in range(6):
        obs, _, _, _, _ = env.step(_first_runnable(obs))
    twin, twin_obs = env.fork()
    assert np.array_equal(twin_obs.nodes, obs.nodes) and twin_obs.wall_time_ms == obs.wall_time_ms
    assert twin.jobs[0].template is env.jobs[0].template  # read-only job data is shared
    assert twin.jobs[0] is not env.jobs[0] and twin.rng is not env.rng

    def finish(e, o):
        done, total = False, 0.0
        while not done:
            o, r, done, _, _ = e.step(_first_runnable(o))
            total += r
        return total, [(r.arrival_ms, r.completion_ms) for r in e.job_records()]

    t0 = env.wall_time_ms
    ours, theirs = finish(twin, twin_obs), finish(env, obs)
    assert ours == theirs  # the same actions on the same state and streams: the same future
    # the reward from t0 on is minus the job time after t0
    assert -ours[0] == pytest.approx(env.job_time_ms(t0, float("inf")), rel=1e-9)
    assert env.job_time_ms(0, float("inf")) == pytest.approx(env.avg_jct_s * 1000 * len(env.jobs), rel=1e-9)
    whole = env.job_time_ms(0, env.wall_time_ms)
    assert env.job_time_ms(0, t0) + env.job_time_ms(t0, env.wall_time_ms) == pytest.approx(whole, rel=1e-9)
    with pytest.raises(NetLLMError, match="fork"):
        env.fork()  # the episode has ended


def test_arrivals_follow_configuration() -> None:
    env = _env(num_jobs=300, arrival_rate=1e-3)
    env.reset(seed=0)
    arrivals = np.array([j.arrival_ms for j in env.jobs])
    assert arrivals[0] == 0 and (np.diff(arrivals) > 0).all()
    assert np.diff(arrivals).mean() == pytest.approx(1000.0, rel=0.15)


def test_invalid_actions() -> None:
    env = _env()
    obs, _ = env.reset(seed=1)
    n = len(obs.runnable)
    with pytest.raises(NetLLMError, match="stage_idx"):
        env.step((n, 1))
    with pytest.raises(NetLLMError, match="stage_idx"):
        env.step((-2, 1))
    with pytest.raises(NetLLMError, match="num_exec"):
        env.step((0, 0))
    with pytest.raises(NetLLMError, match="num_exec"):
        env.step((0, 1.5))
    with pytest.raises(NetLLMError, match="action"):
        env.step("bad")
    with pytest.raises(NetLLMError, match="stage_idx"):
        env.step({"stage_idx": True, "num_exec": 1})
    # rejected actions leave the state untouched
    assert env.num_decisions == 0 and env.pools.committable() == obs.num_committable_execs


def test_executor_limit_above_free_executors_is_clipped() -> None:
    env = _env()
    obs, _ = env.reset(seed=2)
    free = obs.num_committable_execs
    job = int(obs.node_job[obs.runnable[0]])
    stage = env.jobs[int(obs.job_ids[job])].stages[int(obs.stage_ids[obs.runnable[0]])]
    before = env.pools.supply[stage.job_id]
    env.step(CJSAction(0, 10_000))  # far above the free executors: clipped, not an error
    # the job gains exactly min(free executors, the stage's unstarted tasks)
    assert env.pools.supply[stage.job_id] - before == min(free, stage.num_tasks)
    _check_invariants(env)


def test_no_stage_action_releases_the_round() -> None:
    env = _env()
    obs, _ = env.reset(seed=3)
    obs, reward, terminated, _, info = env.step(CJSAction(-1, 1))
    assert info["wall_time_ms"] > 0  # the round ended and time moved on
    assert not terminated


def test_step_after_end_and_before_reset_raise() -> None:
    env = _env(num_jobs=2)
    with pytest.raises(NetLLMError, match="reset"):
        env.step((0, 1))
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        obs, _, done, _, _ = env.step(_first_runnable(obs))
    with pytest.raises(NetLLMError, match="ended"):
        env.step((0, 1))


def test_config_validation() -> None:
    with pytest.raises(NetLLMError, match="num_executors"):
        CJSEnv(num_executors=0, templates=synthetic_templates(1))
    with pytest.raises(NetLLMError, match="arrival_rate"):
        CJSEnv(arrival_rate=-1.0, templates=synthetic_templates(1))
    with pytest.raises(NetLLMError, match="templates"):
        CJSEnv(templates=[])


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_load_all_templates(real_data: Path) -> None:
    templates = load_all(real_data)
    assert len(templates) == 22 * 7
    assert set(s for _, s in templates) == set(QUERY_SIZES)
    assert load_all(real_data) is templates  # cached
    t = templates[(1, "2g")]
    assert t.num_stages == 4 and t.edges.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert all(tpl.num_stages >= 2 and len(tpl.edges) >= 1 for tpl in templates.values())


def _copy_query(real_data: Path, tmp_path: Path, size: str = "2g", q: int = 1) -> Path:
    folder = tmp_path / "cjs" / "tpch" / size
    folder.mkdir(parents=True)
    src = real_data / "cjs" / "tpch" / size
    for name in (f"adj_mat_{q}.npy", f"task_duration_{q}.npy"):
        shutil.copy(src / name, folder / name)
    return folder


@pytest.mark.integration
def test_cyclic_adjacency_file_names_the_file(real_data: Path, tmp_path: Path) -> None:
    folder = _copy_query(real_data, tmp_path)
    adj = np.load(folder / "adj_mat_1.npy")
    adj[3, 0] = 1.0  # close the chain 0 -> 1 -> 2 -> 3 into a cycle
    np.save(folder / "adj_mat_1.npy", adj)
    with pytest.raises(NetLLMError, match=r"adj_mat_1\.npy.*cycle"):
        load_query("2g", 1, root=tmp_path)


@pytest.mark.integration
def test_truncated_files_name_the_file(real_data: Path, tmp_path: Path) -> None:
    folder = _copy_query(real_data, tmp_path)
    dur = folder / "task_duration_1.npy"
    dur.write_bytes(dur.read_bytes()[:100])
    with pytest.raises(NetLLMError, match=r"task_duration_1\.npy"):
        load_query("2g", 1, root=tmp_path)
    adj = folder / "adj_mat_1.npy"
    adj.write_bytes(adj.read_bytes()[:90])
    with pytest.raises(NetLLMError, match=r"adj_mat_1\.npy"):
        load_query("2g", 1, root=tmp_path)
    adj.unlink()
    with pytest.raises(NetLLMError, match=r"adj_mat_1\.npy"):
        load_query("2g", 1, root=tmp_path)


@pytest.mark.integration
def test_tpch_episode_invariants(real_data: Path) -> None:
    env = CJSEnv(num_jobs=12, data_root=str(real_data))
    obs, _ = env.reset(seed=7)
    done = False
    while not done:
        _check_obs(obs, env)
        obs, _, done, _, _ = env.step(_first_runnable(obs))
        _check_invariants(env)
    records = env.job_records()
    assert all(1 <= r.query <= 22 and r.size in QUERY_SIZES for r in records)
    assert 0 < env.avg_jct_s < 1000
