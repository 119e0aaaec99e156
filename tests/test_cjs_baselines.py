"""CJS baselines: FIFO / Fair heuristics and Decima, on synthetic jobs and on TPC-H
(seed-exact parity with upstream spark-sched-sim on a short episode)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from netllm.tasks.cjs.baselines import (SCHEDULERS, DecimaScheduler, FairScheduler, FIFOScheduler, Scheduler,
                                        find_stage, make_scheduler, run_episode)
from netllm.tasks.cjs.decima import DecimaNet, build_decima, load_decima_state_dict
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.sim import CJSAction, CJSEnv, CJSObservation
from netllm.utils import NetLLMError


def _env(num_jobs: int = 8) -> CJSEnv:
    return CJSEnv(num_executors=6, num_jobs=num_jobs, arrival_rate=1e-4,
                  templates=synthetic_templates(5, seed=3))


def _obs(supplies, ptr, mask, edges=(), committable=4, source=None, num_executors=10) -> CJSObservation:
    n = ptr[-1]
    nodes = np.zeros((n, 3), dtype=np.float32)
    nodes[:, 0] = 3
    nodes[:, 1] = 1000
    nodes[:, 2] = mask
    return CJSObservation(
        wall_time_ms=0.0, num_executors=num_executors, job_ids=np.arange(len(supplies)),
        job_arrival_ms=np.zeros(len(supplies)), job_ptr=np.array(ptr), stage_ids=np.zeros(n, dtype=np.int64),
        nodes=nodes, edge_links=np.array(edges, dtype=np.int64).reshape(-1, 2),
        exec_supplies=np.array(supplies), num_committable_execs=committable,
        source_job_idx=len(supplies) if source is None else source)


def _untrained_decima(seed: int = 0) -> DecimaScheduler:
    torch.manual_seed(seed)
    return DecimaScheduler(state_dict=DecimaNet().state_dict())


# --------------------------------------------------------------------------- heuristics


def test_find_stage_prefers_frontier_stages() -> None:
    # job 0: nodes 0,1 (0 -> 1 edge, both schedulable): node 0 is the frontier one
    obs = _obs([0, 0], [0, 2, 3], [0, 1, 1], edges=[(0, 1)])
    assert find_stage(obs, 0) == 0  # runnable = [1, 2]: node 1 is the only schedulable of job 0
    obs = _obs([0], [0, 3], [1, 1, 1], edges=[(0, 1), (1, 2)])
    assert find_stage(obs, 0) == 0
    obs = _obs([0], [0, 3], [0, 1, 1], edges=[(0, 1)])
    assert find_stage(obs, 0) == 1  # node 2 has no active parent: preferred over node 1
    assert find_stage(_obs([0], [0, 2], [0, 0]), 0) == -1


def test_fifo_and_fair_caps() -> None:
    obs = _obs(supplies=[4, 0, 0], ptr=[0, 1, 2, 3], mask=[1, 1, 1], committable=8)
    fifo, fair = FIFOScheduler(), FairScheduler()
    # FIFO: cap ceil(10/2) = 5 -> job 0 gets 1 more
    assert fifo.act(obs) == CJSAction(0, 1)
    # Fair: cap ceil(10/3) = 4 -> job 0 is full, job 1 gets 4
    assert fair.act(obs) == CJSAction(1, 4)
    # the source job keeps all its free executors
    assert fair.act(_obs([9, 0], [0, 1, 2], [1, 1], committable=3, source=0)) == CJSAction(0, 3)
    # nothing to schedule
    assert fifo.act(_obs([5, 5], [0, 1, 2], [1, 1], committable=2)) == CJSAction(-1, 2)


def test_registry() -> None:
    assert SCHEDULERS == ("fifo", "fair", "decima")
    assert make_scheduler("FIFO").name == "fifo" and make_scheduler("fair").name == "fair"
    assert isinstance(make_scheduler("fifo"), Scheduler)
    with pytest.raises(NetLLMError, match="scheduler"):
        make_scheduler("sjf")


@pytest.mark.parametrize("name", ["fifo", "fair"])
def test_heuristics_finish_synthetic_episodes(name: str) -> None:
    result = run_episode(_env(), make_scheduler(name), seed=3)
    assert len(result.records) == 8 and np.isfinite(result.avg_jct_s) and result.avg_jct_s > 0
    assert result.total_reward == pytest.approx(-sum(r.completion_ms - r.arrival_ms for r in result.records))
    assert result.num_events > 0 and result.events_per_s > 0


# --------------------------------------------------------------------------- Decima


def test_decima_parameter_names_match_upstream_layout() -> None:
    shapes = {k: tuple(v.shape) for k, v in DecimaNet().state_dict().items()}
    assert shapes["encoder.node_encoder.mlp_prep.0.weight"] == (32, 5)
    assert shapes["encoder.dag_encoder.mlp.0.weight"] == (32, 21)
    assert shapes["stage_policy_network.mlp_score.0.weight"] == (64, 53)
    assert shapes["exec_policy_network.mlp_score.0.weight"] == (64, 36)
    assert shapes["exec_policy_network.mlp_score.4.weight"] == (1, 64)
    assert len(shapes) == 42


def test_decima_actions_are_valid_and_seeded() -> None:
    env = _env()
    obs, _ = env.reset(seed=1)
    sched = _untrained_decima()
    sched.reset(seed=0)
    a1 = sched.act(obs)
    sched.reset(seed=0)
    assert sched.act(obs) == a1
    assert 0 <= a1.stage_idx < len(obs.runnable)
    job = obs.node_job[obs.runnable[a1.stage_idx]]
    assert 1 <= a1.num_exec <= obs.commit_caps[job]


def test_decima_message_passing_reaches_roots() -> None:
    """A change at a leaf changes its ancestors' embeddings, not unrelated nodes'."""
    net = DecimaNet()
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    base = _obs([1, 1], [0, 3, 4], [1, 0, 0, 1], edges=[(0, 1), (1, 2)])
    changed = _obs([1, 1], [0, 3, 4], [1, 0, 0, 1], edges=[(0, 1), (1, 2)])
    changed.nodes[2, 0] = 50
    with torch.no_grad():
        h1, d1, g1 = net.encode(base)
        h2, d2, g2 = net.encode(changed)
    assert not torch.allclose(h1[0], h2[0])  # root sees the leaf through two hops
    assert torch.allclose(h1[3], h2[3])  # another job's node does not
    assert h1.shape == (4, 16) and d1.shape == (2, 16) and g1.shape == (1, 16)


def test_decima_finishes_a_synthetic_episode_and_shares_the_env_rng() -> None:
    env = _env(num_jobs=6)
    sched = _untrained_decima()
    r1 = run_episode(env, sched, seed=2)
    assert sched.rng is env.rng  # upstream: one random stream for durations and actions
    r2 = run_episode(env, sched, seed=2)
    assert r1.avg_jct_s == r2.avg_jct_s and len(r1.records) == 6
    r3 = run_episode(env, sched, seed=2, share_rng=False)
    assert isinstance(sched.rng, random.Random) and sched.rng is not env.rng
    assert np.isfinite(r3.avg_jct_s)
    greedy = DecimaScheduler(state_dict=sched.net.state_dict(), greedy=True)
    assert np.isfinite(run_episode(env, greedy, seed=2).avg_jct_s)


def test_decima_bad_weights(tmp_path: Path) -> None:
    bad = tmp_path / "decima_model.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(NetLLMError, match="decima_model.pt"):
        load_decima_state_dict(bad)
    with pytest.raises(NetLLMError, match="missing"):
        load_decima_state_dict(tmp_path / "nope.pt")
    state = DecimaNet().state_dict()
    state["stage_policy_network.mlp_score.0.weight"] = torch.zeros(64, 50)
    with pytest.raises(NetLLMError, match="do not fit"):
        build_decima(state, source="x.pt")
    with pytest.raises(NetLLMError, match="not a Decima state dict"):
        build_decima({"w": torch.zeros(1)}, source="x.pt")


# --------------------------------------------------------------------------- real data

# Measured with NetLLM's vendored spark-sched-sim (run_baseline.py procedure: env.reset(seed)
# then random.seed(seed)) on 15 jobs, seed 3, default settings: average JCT in seconds.
UPSTREAM_15_JOBS_SEED_3 = {"fifo": 32.012, "fair": 30.178, "decima": 28.772}
UPSTREAM_15_JOBS_SEED_3_DECISIONS = {"fifo": 239, "fair": 245, "decima": 337}


@pytest.mark.integration
def test_decima_weights_load(real_data: Path) -> None:
    state = load_decima_state_dict(root=real_data)
    net = build_decima(state, source="decima_model.pt")
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for v in state.values())
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.integration
@pytest.mark.parametrize("name", SCHEDULERS)
def test_short_tpch_episode_matches_upstream(real_data: Path, name: str) -> None:
    env = CJSEnv(num_jobs=15, data_root=str(real_data))
    kwargs = {"data_root": str(real_data)} if name == "decima" else {}
    result = run_episode(env, make_scheduler(name, **kwargs), seed=3)
    assert len(result.records) == 15 and all(np.isfinite(r.completion_ms) for r in result.records)
    assert result.avg_jct_s == pytest.approx(UPSTREAM_15_JOBS_SEED_3[name], abs=5e-4)
    assert result.num_decisions == UPSTREAM_15_JOBS_SEED_3_DECISIONS[name]
