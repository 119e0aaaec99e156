"""The Gymnasium face of the simulators: registered ids, ``check_env``, seeded rollouts,
spaces, the batched ABR env as a vector env, and equality with the project's own API."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import netllm.tasks.abr.env  # noqa: F401  (registers netllm/ABR-v0)
import netllm.tasks.cjs.sim  # noqa: F401  (registers netllm/CJS-v0)
from netllm.tasks.abr.env import ABREnv, BatchABREnv, resolve_traces, resolve_video
from netllm.tasks.abr.traces import synthetic_traces, synthetic_video
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.sim import CJSEnv, CJSGymEnv, resolve_templates
from netllm.utils import NetLLMError

ABR_KW: dict[str, Any] = {"trace": "synthetic", "video": "synthetic"}  # generated data, no files
CJS_KW: dict[str, Any] = {"num_executors": 6, "num_jobs": 8, "arrival_rate": 1e-4, "templates": "synthetic"}


def strict_check(env: gymnasium.Env) -> None:
    """``check_env`` with Gymnasium's warnings raised as errors (an observation outside
    its space is only a warning there), except the unbounded-Box notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*space maximum value is infinity")
        check_env(env.unwrapped)


def rollout(env: gymnasium.Env, seed: int, action_seed: int, max_steps: int = 10_000
            ) -> tuple[list[Any], list[float], dict[str, Any]]:
    """A random-action episode; every observation must lie in the observation space."""
    env.action_space.seed(action_seed)
    obs, info = env.reset(seed=seed)
    observations, rewards = [obs], []
    assert obs in env.observation_space
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs in env.observation_space
        assert isinstance(terminated, bool) and truncated is False
        observations.append(obs)
        rewards.append(reward)
        if terminated:
            return observations, rewards, info
    raise AssertionError(f"no termination within {max_steps} steps")


def same_trajectory(a: list[Any], b: list[Any]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        return np.array_equal(x, y)

    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- ABR


def test_abr_make_passes_check_env() -> None:
    env = gymnasium.make("netllm/ABR-v0", **ABR_KW)
    assert isinstance(env.unwrapped, ABREnv)
    assert env.action_space == gymnasium.spaces.Discrete(6)
    assert env.observation_space.shape == (6, 6) and env.observation_space.dtype == np.float32
    strict_check(env)


def test_abr_random_rollout_terminates_and_repeats() -> None:
    env = gymnasium.make("netllm/ABR-v0", **ABR_KW)
    obs_a, rew_a, info = rollout(env, seed=3, action_seed=0)
    assert len(rew_a) == 47 and info["chunks_left"] == 0  # 48 chunks, chunk 0 fetched at reset
    obs_b, rew_b, _ = rollout(env, seed=3, action_seed=0)
    assert same_trajectory(obs_a, obs_b) and rew_a == rew_b
    obs_c, rew_c, _ = rollout(env, seed=4, action_seed=0)
    assert rew_c != rew_a  # another start position and noise
    with pytest.raises(NetLLMError, match="episode is over"):
        env.unwrapped.step(0)


def test_abr_make_equals_the_batched_simulator() -> None:
    # trace_id picks the trace of the set and keys its random streams
    env = gymnasium.make("netllm/ABR-v0", trace_id=2, **ABR_KW)
    batch = BatchABREnv(synthetic_traces(3, seed=1), synthetic_video(0))
    obs, _ = env.reset(seed=7)
    b_obs, _ = batch.reset(seed=7)
    np.testing.assert_array_equal(obs, b_obs[2])
    rng = np.random.default_rng(0)
    while True:
        levels = rng.integers(0, 6, size=3)
        obs, reward, terminated, _, info = env.step(levels[2])
        b_obs, b_reward, b_term, _, b_info = batch.step(levels)
        np.testing.assert_array_equal(obs, b_obs[2])
        assert reward == b_reward[2] and terminated == b_term[2] and info["delay_ms"] == b_info["delay_ms"][2]
        if terminated:
            break


def test_abr_reset_without_seed_continues_the_seed_sequence() -> None:
    env = ABREnv(**ABR_KW)
    first, _ = env.reset()  # seed 0
    again, _ = env.reset(seed=0)
    np.testing.assert_array_equal(first, again)
    nxt, _ = env.reset()  # seed 1
    np.testing.assert_array_equal(nxt, env.reset(seed=1)[0])


def test_abr_batch_is_a_vector_env_with_arrays() -> None:
    envs = gymnasium.make_vec("netllm/ABR-v0", num_envs=3, **ABR_KW)
    assert isinstance(envs, BatchABREnv) and isinstance(envs, gymnasium.vector.VectorEnv)
    assert envs.num_envs == 3 and envs.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.DISABLED
    assert envs.observation_space.shape == (3, 6, 6)
    assert envs.action_space == gymnasium.spaces.MultiDiscrete([6, 6, 6])
    assert envs.single_action_space == gymnasium.spaces.Discrete(6)
    obs, info = envs.reset(seed=5)
    assert obs in envs.observation_space and all(v.shape == (3,) for v in info.values())
    envs.action_space.seed(1)
    steps = 0
    while True:
        result = envs.step(envs.action_space.sample())
        assert len(result) == 5
        obs, reward, terminated, truncated, info = result
        steps += 1
        assert obs.shape == (3, 6, 6) and obs.dtype == np.float32 and obs in envs.observation_space
        assert reward.shape == (3,) and reward.dtype == np.float64
        assert terminated.shape == (3,) and terminated.dtype == bool
        assert truncated.shape == (3,) and truncated.dtype == bool and not truncated.any()
        assert all(v.shape == (3,) for v in info.values())
        if terminated.any():
            assert terminated.all()  # one video: every session ends on the same chunk
            break
    assert steps == 47
    with pytest.raises(NetLLMError, match="episode is over"):
        envs.step(np.zeros(3, dtype=np.int64))
    obs, _ = envs.reset(options={"reset_mask": np.ones(3, dtype=bool)})  # seed 6
    np.testing.assert_array_equal(obs, envs.reset(seed=6)[0])
    with pytest.raises(NetLLMError, match="reset_mask"):
        envs.reset(options={"reset_mask": np.array([True, False, True])})
    # session k of the vector env is ABR-v0 with trace_id k (+ the first trace_id)
    envs = gymnasium.make_vec("netllm/ABR-v0", num_envs=2, trace_id=1, **ABR_KW)
    single = gymnasium.make("netllm/ABR-v0", trace_id=2, **ABR_KW)
    np.testing.assert_array_equal(envs.reset(seed=9)[0][1], single.reset(seed=9)[0])


def test_abr_copy_keeps_working_after_the_gymnasium_base() -> None:
    env = BatchABREnv(synthetic_traces(2, seed=0), synthetic_video(0))
    env.reset(seed=1)
    twin = env.copy()
    a = env.step(np.array([3, 4]))
    b = twin.step(np.array([3, 4]))
    for x, y in zip(a[:4], b[:4]):
        np.testing.assert_array_equal(x, y)


def test_abr_default_data(monkeypatch: pytest.MonkeyPatch, real_data: Path) -> None:
    monkeypatch.delenv("NETLLM_DATA", raising=False)
    assert resolve_traces(None, 2)[1].name == synthetic_traces(2, seed=1)[1].name
    assert resolve_video(None).name == synthetic_video(0).name
    assert resolve_templates(None) is not None  # generated jobs
    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    env = gymnasium.make("netllm/ABR-v0")
    assert env.unwrapped.trace.name == resolve_traces("fcc-train")[0].name
    assert env.unwrapped.video.name == "video1"
    assert resolve_templates(None) is None  # TPC-H, loaded by CJSEnv at reset
    with pytest.raises(NetLLMError, match="has 1 traces, 3 needed"):
        resolve_traces(synthetic_traces(1, seed=0), 3)


# --------------------------------------------------------------------------- CJS


def test_cjs_make_passes_check_env() -> None:
    env = gymnasium.make("netllm/CJS-v0", **CJS_KW)
    assert isinstance(env.unwrapped, CJSGymEnv)
    assert env.action_space == gymnasium.spaces.MultiDiscrete([512, 6])
    strict_check(env)


def test_cjs_random_rollout_terminates_and_repeats() -> None:
    env = gymnasium.make("netllm/CJS-v0", **CJS_KW)
    obs_a, rew_a, info = rollout(env, seed=2, action_seed=0)
    sim = env.unwrapped.sim
    assert info["num_completed_jobs"] == 8 and info["num_active_jobs"] == 0
    # the rewards add up to minus the total job completion time (ms)
    total_jct_s = sum(r.jct_s for r in sim.job_records())
    assert -sum(rew_a) / 1000 == pytest.approx(total_jct_s, rel=1e-9)
    obs_b, rew_b, _ = rollout(env, seed=2, action_seed=0)
    assert same_trajectory(obs_a, obs_b) and rew_a == rew_b
    _, rew_c, _ = rollout(env, seed=3, action_seed=0)
    assert rew_c != rew_a
    with pytest.raises(NetLLMError, match="episode has ended"):
        env.unwrapped.step(np.array([0, 0]))


def test_cjs_wrapper_plays_the_simulator_episode() -> None:
    """Valid slots are the simulator's runnable stages; an invalid slot falls back to the first one."""
    templates = synthetic_templates(5, seed=3)
    kw = dict(num_executors=6, num_jobs=8, arrival_rate=1e-4, templates=templates)
    env = CJSGymEnv(**kw)
    sim = CJSEnv(**kw)
    obs, info = env.reset(seed=4)
    s_obs, _ = sim.reset(seed=4)
    assert info["num_hidden_jobs"] == 0
    step = 0
    while True:
        runnable = s_obs.runnable
        assert np.array_equal(np.flatnonzero(obs["action_mask"]), runnable)
        assert obs["node_mask"].sum() == s_obs.num_nodes and obs["job_mask"].sum() == s_obs.num_jobs
        np.testing.assert_array_equal(obs["nodes"][:s_obs.num_nodes], s_obs.node_features)
        np.testing.assert_array_equal(obs["edges"][:int(obs["edge_mask"].sum())], s_obs.edge_links)
        idx, k = step % len(runnable), step % 6
        if step % 3 == 2:  # a slot that is not schedulable: the first runnable stage is played
            slot = int(np.flatnonzero(obs["action_mask"] == 0)[0]) if (obs["action_mask"] == 0).any() else 511
            obs, reward, terminated, _, info = env.step(np.array([slot, k]))
            assert info["action_valid"] is False
            idx = 0
        else:
            obs, reward, terminated, _, info = env.step(np.array([runnable[idx], k]))
            assert info["action_valid"] is True
        s_obs, s_reward, s_term, _, _ = sim.step((idx, k + 1))
        assert reward == s_reward and terminated == s_term
        step += 1
        if terminated:
            break
    assert env.sim.avg_jct_s == sim.avg_jct_s
    with pytest.raises(NetLLMError, match="action"):
        env.reset(seed=0)
        env.step(np.array([512, 0]))  # outside the action space
    with pytest.raises(NetLLMError, match="action"):
        env.step(np.array([0.0, 1.0]))


def test_cjs_observation_keeps_whole_jobs_when_it_overflows() -> None:
    env = gymnasium.make("netllm/CJS-v0", max_jobs=2, max_nodes=6, max_edges=5,
                         **{**CJS_KW, "num_jobs": 12, "arrival_rate": 1e-3})
    env.action_space.seed(0)
    obs, info = env.reset(seed=1)
    hidden = info["num_hidden_jobs"]
    while True:
        assert obs in env.observation_space
        nodes, jobs = int(obs["node_mask"].sum()), int(obs["job_mask"].sum())
        assert nodes <= 6 and jobs <= 2 and obs["edge_mask"].sum() <= 5
        if nodes:  # node slots are a prefix of whole jobs
            assert obs["node_job"][:nodes].max() == jobs - 1
        obs, _, terminated, _, info = env.step(env.action_space.sample())
        hidden = max(hidden, info["num_hidden_jobs"])
        if terminated:
            break
    assert hidden > 0


def test_cjs_bad_settings() -> None:
    with pytest.raises(NetLLMError, match="max_nodes"):
        CJSGymEnv(templates="synthetic", max_nodes=0)
    with pytest.raises(NetLLMError, match="templates"):
        CJSGymEnv(templates="tpc-h")
    with pytest.raises(NetLLMError, match="seed"):
        CJSGymEnv(templates="synthetic", num_jobs=2).reset(seed=-1)
    with pytest.raises(NetLLMError, match="reset"):
        CJSGymEnv(templates="synthetic", num_jobs=2).step(np.array([0, 0]))


# --------------------------------------------------------------------------- registration


def test_importing_the_task_packages_registers_the_ids() -> None:
    code = (
        "import gymnasium, netllm.tasks.abr, netllm.tasks.cjs\n"
        "a = gymnasium.make('netllm/ABR-v0', trace='synthetic', video='synthetic')\n"
        "c = gymnasium.make('netllm/CJS-v0', num_jobs=2, templates='synthetic')\n"
        "print(type(a.unwrapped).__name__, type(c.unwrapped).__name__)\n"
        "import importlib, netllm.tasks.abr.env as m; importlib.reload(m)  # no double registration\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ABREnv", "CJSGymEnv"]
