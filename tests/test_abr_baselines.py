"""ABR baselines: BBA rule, RobustMPC plans and behaviour, the Pensieve actor forward
pass on the real GENET weights, the oracle's optimality, and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.abr.baselines import (
    BASELINES, BBA, Oracle, PensieveActor, RobustMPC, bba_levels, make_baseline, mpc_plans,
)
from netllm.tasks.abr.env import BatchABREnv
from netllm.tasks.abr.traces import Trace, load_traces, load_video, synthetic_traces, synthetic_video
from netllm.utils import NetLLMError


def play(policy, env: BatchABREnv, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Run one episode; (rewards (N, steps), levels (N, steps)), the reset chunk unscored."""
    obs, info = env.reset(seed)
    policy.reset(env, seed)
    rewards, levels = [], []
    done = np.zeros(env.num_envs, dtype=bool)
    while not done.all():
        action = policy.act(obs, info)
        assert action.dtype == np.int64 and action.shape == (env.num_envs,)
        assert np.all((action >= 0) & (action <= 5))
        levels.append(action)
        obs, reward, done, _, info = env.step(action)
        rewards.append(reward)
    return np.stack(rewards, axis=1), np.stack(levels, axis=1)


def constant_trace(mbps: float) -> Trace:
    return Trace("constant", np.arange(400, dtype=np.float64), np.full(400, mbps))


# ----------------------------------------------------------------------------- BBA


def test_bba_rule_values() -> None:
    buffer_s = np.array([3.0, 5.0, 10.0, 15.0, 20.0])
    expected = [0, 0, 2, 5, 5]  # int(5 * (10 - 5) / 10) = 2
    assert bba_levels(buffer_s).tolist() == expected
    obs = np.zeros((5, 6, 6), dtype=np.float32)
    obs[:, 1, -1] = buffer_s / 10.0
    assert BBA().act(obs, {"buffer_s": buffer_s}).tolist() == expected
    assert BBA().act(obs, {}).tolist() == expected  # falls back on obs row 1
    assert bba_levels(np.array([14.99, 7.0])).tolist() == [4, 1]


# ----------------------------------------------------------------------------- RobustMPC


def _count_walks(start: int, horizon: int) -> int:
    counts = {start: 1}
    for _ in range(horizon):
        nxt: dict[int, int] = {}
        for level, c in counts.items():
            for step in (-1, 0, 1):
                if 0 <= level + step <= 5:
                    nxt[level + step] = nxt.get(level + step, 0) + c
        counts = nxt
    return sum(counts.values())


def test_mpc_plan_set() -> None:
    plans = mpc_plans(2, 5)
    assert plans.shape == (_count_walks(2, 5), 5) == (209, 5)
    assert len({tuple(p) for p in plans}) == len(plans)
    assert plans.min() >= 0 and plans.max() <= 5
    steps = np.diff(np.concatenate([np.full((len(plans), 1), 2), plans], axis=1), axis=1)
    assert np.abs(steps).max() <= 1
    assert mpc_plans(3, 5).shape[0] == 209 and mpc_plans(0, 5).shape[0] == _count_walks(0, 5)
    assert set(mpc_plans(0, 5)[:, 0].tolist()) == {0, 1}


def test_mpc_climbs_on_fast_link_and_stays_low_on_slow_one() -> None:
    video = synthetic_video(0)
    _, fast = play(RobustMPC(), BatchABREnv([constant_trace(50.0)], video), seed=0)
    assert fast[0, :4].tolist() == [1, 2, 3, 4]  # one level per chunk (the +-1 plans)
    assert np.all(fast[0, 4:] == 5)
    _, slow = play(RobustMPC(), BatchABREnv([constant_trace(0.3)], video), seed=0)
    assert np.all(slow == 0)


def test_mpc_throughput_estimate_skips_padding_and_discounts_errors() -> None:
    mpc = RobustMPC()
    env = BatchABREnv([constant_trace(1.0)], synthetic_video(0))
    mpc.reset(env, 0)
    obs = np.zeros((1, 6, 6), dtype=np.float32)
    obs[0, 2, -1] = 0.1  # one measured chunk, five zero columns
    assert mpc.estimate_mbyte_per_s(obs)[0] == pytest.approx(0.1)
    obs[0, 2, -2:] = [0.1, 0.2]  # prediction 0.1 vs 0.2 measured: error 0.5
    hm = 2.0 / (1 / 0.1 + 1 / 0.2)
    assert mpc.estimate_mbyte_per_s(obs)[0] == pytest.approx(hm / 1.5, rel=1e-6)


# ----------------------------------------------------------------------------- Pensieve actor


@pytest.fixture(scope="module")
def genet_path(real_data: Path) -> Path:
    return real_data / "abr" / "pretrained" / "genet_actor.npz"


def _reference_forward(path: Path, obs: np.ndarray) -> np.ndarray:
    """The architecture written out branch by branch (loops, float64)."""
    w = {k: v.astype(np.float64) for k, v in np.load(path).items()}
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    out = []
    for s in obs.astype(np.float64):
        parts = [relu(s[0, -1] * w["FullyConnected.W"][0] + w["FullyConnected.b"]),
                 relu(s[1, -1] * w["FullyConnected_1.W"][0] + w["FullyConnected_1.b"]),
                 relu(s[2, :] @ w["Conv1D.W"][1, 0] + w["Conv1D.b"]),
                 relu(s[3, :] @ w["Conv1D_1.W"][1, 0] + w["Conv1D_1.b"]),
                 relu(s[4, :6] @ w["Conv1D_2.W"][1, 0] + w["Conv1D_2.b"]),
                 relu(s[5, -1] * w["FullyConnected_2.W"][0] + w["FullyConnected_2.b"])]
        h = relu(np.concatenate(parts) @ w["FullyConnected_3.W"] + w["FullyConnected_3.b"])
        z = h @ w["FullyConnected_4.W"] + w["FullyConnected_4.b"]
        out.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
    return np.array(out)


def test_actor_forward_on_real_genet(genet_path: Path, real_data: Path) -> None:
    traces = load_traces("fcc-test", root=real_data)[:6]
    env = BatchABREnv(traces, load_video("video1", root=real_data))
    obs, info = env.reset(3)
    for _ in range(5):  # a few steps in, so every row of the observation is filled
        obs, _, _, _, info = env.step(np.full(env.num_envs, 2))
    greedy = PensieveActor(genet_path, sample=False)
    assert greedy.name == "genet"
    probs = greedy.probabilities(obs)
    assert probs.shape == (6, 3) and np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(probs, _reference_forward(genet_path, obs), atol=1e-5)
    first = greedy.act(obs, info)
    assert np.array_equal(first, greedy.act(obs, info))
    assert np.array_equal(first, np.clip(info["level"] + probs.argmax(axis=1) - 1, 0, 5))

    # Whole episodes: levels in range, sampling reproducible for a seed, seeds differ.
    env = BatchABREnv(traces, load_video("video1", root=real_data))
    sampler = PensieveActor(genet_path, sample=True)
    rewards_a, levels_a = play(sampler, env, seed=1)
    rewards_b, levels_b = play(sampler, env, seed=1)
    _, levels_c = play(sampler, env, seed=2)
    assert np.array_equal(levels_a, levels_b) and np.array_equal(rewards_a, rewards_b)
    assert not np.array_equal(levels_a, levels_c)
    assert np.all(np.abs(np.diff(levels_a, axis=1)) <= 1)  # down / keep / up only


def test_actor_sampling_does_not_depend_on_the_batch(genet_path: Path) -> None:
    traces = synthetic_traces(3, seed=0)
    video = synthetic_video(0)
    actor = PensieveActor(genet_path, sample=True)
    _, together = play(actor, BatchABREnv(traces, video), seed=4)
    _, alone = play(actor, BatchABREnv(traces[2:], video, trace_ids=[2]), seed=4)
    assert np.array_equal(together[2], alone[0])


def test_actor_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NetLLMError, match=r"nope_actor\.npz.*netllm data fetch abr"):
        PensieveActor(tmp_path / "nope_actor.npz")


def test_actor_rejects_wrong_shapes(tmp_path: Path, genet_path: Path) -> None:
    arrays = dict(np.load(genet_path))
    arrays["FullyConnected_4.W"] = arrays["FullyConnected_4.W"][:, :2]
    bad = tmp_path / "bad_actor.npz"
    np.savez(bad, **arrays)
    with pytest.raises(NetLLMError, match="FullyConnected_4.W"):
        PensieveActor(bad)


# ----------------------------------------------------------------------------- Oracle


def test_oracle_plan_is_exact_in_a_noise_free_env() -> None:
    env = BatchABREnv(synthetic_traces(4, seed=1), synthetic_video(1), noise=False)
    oracle = Oracle(replan_every=100)  # plan once, replay
    rewards, _ = play(oracle, env, seed=0)
    assert np.allclose(oracle.planned_qoe, rewards.sum(axis=1))


def test_oracle_beats_every_baseline_on_real_traces(real_data: Path) -> None:
    traces = load_traces("fcc-test", root=real_data)[::12]  # 9 traces
    video = load_video("video1", root=real_data)
    for noise in (False, True):
        env = BatchABREnv(traces, video, noise=noise)
        best = play(Oracle(), env, seed=1)[0].mean(axis=1)
        for name in ("bba", "mpc", "genet", "udr_1"):
            other = play(make_baseline(name, root=real_data), env, seed=1)[0].mean(axis=1)
            if noise:  # the plan is made noise-free; the mean must still win clearly
                assert best.mean() > other.mean() + 0.05, name
            else:  # noise-free the DP plan is optimal up to buffer binning
                assert np.all(best >= other - 1e-9), name


# ----------------------------------------------------------------------------- registry


def test_make_baseline_errors(tmp_path: Path) -> None:
    with pytest.raises(NetLLMError, match="bba, mpc, genet"):
        make_baseline("pensieve")
    with pytest.raises(NetLLMError, match=r"udr_2_actor\.npz.*netllm data fetch abr"):
        make_baseline("udr_2", root=tmp_path)


def test_make_baseline_every_name(real_data: Path) -> None:
    for name in BASELINES:
        policy = make_baseline(name, root=real_data)
        assert policy.name == name
