"""The ABR simulator: hand-computed semantics, a loop reference, batch == single, loaders, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.abr.env import ABREnv, BatchABREnv, benchmark_chunks_per_s
from netllm.tasks.abr.traces import (BITRATES_KBPS, Trace, Video, load_trace, load_traces,
                                     load_video, synthetic_traces, synthetic_video,
                                     upstream_start_indices)
from netllm.utils import NetLLMError

MBPS_8_BYTES_S = 1e6  # 8 Mbps = 1e6 bytes/s, 95 % of which is payload


def const_trace(bw_mbps: float = 8.0, seconds: int = 100, name: str = "const") -> Trace:
    t = np.arange(seconds + 1, dtype=float)
    return Trace(name, t, np.full_like(t, bw_mbps))


def flat_video(size_bytes: float = 1e6, chunks: int = 48) -> Video:
    return Video("flat", np.full((6, chunks + 1), float(size_bytes)))


def fixed_env(trace: Trace, video: Video, **kw) -> BatchABREnv:
    return BatchABREnv([trace], video, noise=False, random_start=False, **kw)


def bba(buffer_s: np.ndarray) -> np.ndarray:
    level = np.clip((5 * (buffer_s - 5) / 10).astype(np.int64), 0, 5)
    return np.where(buffer_s < 5, 0, np.where(buffer_s >= 15, 5, level)).astype(np.int64)


# --------------------------------------------------------------- a plain loop reference


class LoopReference:
    """The simulator written as the interval-by-interval walk, one trace, no numpy tricks."""

    def __init__(self, trace: Trace, video: Video, start: int, noise: np.ndarray):
        self.t, self.bw, self.sizes = list(trace.time_s), list(trace.bandwidth_mbps), video.sizes_bytes
        self.ptr, self.last = start, self.t[start - 1]
        self.noise, self.buffer, self.chunk, self.wraps = noise, 0.0, 0, 0

    def _wrap(self) -> None:
        self.ptr += 1
        if self.ptr >= len(self.bw):
            self.ptr, self.last = 1, 0.0
            self.wraps += 1

    def fetch(self, level: int) -> dict:
        size = self.sizes[level, self.chunk]
        sent, delay = 0.0, 0.0
        while True:
            rate = self.bw[self.ptr] * 1e6 / 8
            dur = self.t[self.ptr] - self.last
            payload = rate * dur * 0.95
            if sent + payload > size:
                frac = (size - sent) / rate / 0.95
                delay += frac
                self.last += frac
                break
            sent += payload
            delay += dur
            self.last = self.t[self.ptr]
            self._wrap()
        delay = (delay * 1000 + 80) * self.noise[self.chunk]
        rebuf = max(delay - self.buffer, 0.0)
        self.buffer = max(self.buffer - delay, 0.0) + 4000
        sleep = 0.0
        if self.buffer > 60000:
            sleep = math.ceil((self.buffer - 60000) / 500) * 500
            self.buffer -= sleep
            left = sleep / 1000
            while True:
                dur = self.t[self.ptr] - self.last
                if dur > left:
                    self.last += left
                    break
                left -= dur
                self.last = self.t[self.ptr]
                self._wrap()
        self.chunk += 1
        return {"delay_ms": delay, "rebuffer_s": rebuf / 1000, "buffer_s": self.buffer / 1000,
                "sleep_ms": sleep}


def random_trace(rng: np.random.Generator, i: int) -> Trace:
    n = int(rng.integers(3, 40))
    t = np.concatenate([[0.0], np.cumsum(rng.uniform(0.2, 3.0, n - 1))])
    bw = rng.choice([0.0, 0.3, 1.0, 3.0, 8.0, 20.0], size=n)
    bw[1] = max(bw[1], 0.5)
    return Trace(f"rand{i}", t, bw)


def test_vectorised_walk_matches_loop_reference():
    rng = np.random.default_rng(7)
    traces = [random_trace(rng, i) for i in range(40)]
    video = synthetic_video(3)
    env = BatchABREnv(traces, video)
    plan = rng.integers(0, 6, size=(video.num_chunks, len(traces)))
    plan[:, ::3] = 0  # some envs stay low and fill the buffer (sleeps)
    # the reference gets the env's own random draws (start, noise): the walk is what is tested
    obs, info = env.reset(seed=11)
    refs = [LoopReference(tr, video, int(env._ptr_start[i]), env._noise[i]) for i, tr in enumerate(traces)]
    got = [info] + [env.step(plan[k])[4] for k in range(1, video.num_chunks)]
    slept = 0
    for i, ref in enumerate(refs):
        for k in range(video.num_chunks):
            want = ref.fetch(0 if k == 0 else int(plan[k, i]))
            for key, value in want.items():
                assert got[k][key][i] == pytest.approx(value, rel=1e-9, abs=1e-6), (i, k, key)
            slept += want["sleep_ms"] > 0
    assert slept > 0  # the sleep path was exercised
    assert sum(ref.wraps > 1 for ref in refs) > 10  # and the trace loop, many times


# --------------------------------------------------------------- hand-computed semantics


def test_first_chunk_download_time_by_hand():
    size = 1_234_567.0
    env = fixed_env(const_trace(8.0), flat_video(size))
    obs, info = env.reset(seed=0)
    delay_ms = size / (MBPS_8_BYTES_S * 0.95) * 1000 + 80
    assert info["delay_ms"][0] == pytest.approx(delay_ms, rel=1e-12)
    assert info["rebuffer_s"][0] == pytest.approx(delay_ms / 1000)  # buffer started empty
    assert info["buffer_s"][0] == pytest.approx(4.0)
    assert info["chunk_index"][0] == 0 and info["level"][0] == 0 and info["chunks_left"][0] == 47
    assert info["throughput_mbps"][0] == pytest.approx(size * 8 / delay_ms / 1000)
    assert obs.shape == (1, 6, 6) and obs.dtype == np.float32


def test_rebuffer_and_buffer_update_by_hand():
    sizes = np.full((6, 49), 100_000.0)
    sizes[5, 1] = 6e6  # 6 MB at 0.95e6 B/s = 6.3158 s > 4 s buffer: stall
    env = fixed_env(const_trace(8.0, 500), Video("v", sizes))
    _, info0 = env.reset(seed=0)
    buffer_ms = 4000.0
    _, reward, done, _, info = env.step(np.array([5]))
    delay_ms = 6e6 / 0.95e6 * 1000 + 80
    assert info["delay_ms"][0] == pytest.approx(delay_ms)
    assert info["rebuffer_s"][0] == pytest.approx((delay_ms - buffer_ms) / 1000)
    assert info["buffer_s"][0] == pytest.approx(4.0)  # drained to 0, plus the new chunk
    assert info["smoothness_mbps"][0] == pytest.approx(4.3 - 0.3)
    assert reward[0] == pytest.approx(4.3 - 4.3 * (delay_ms - buffer_ms) / 1000 - (4.3 - 0.3))
    assert not done[0]
    _, reward, _, _, info = env.step(np.array([5]))  # 100 kB: no stall, buffer grows
    d = 1e5 / 0.95e6 * 1000 + 80
    assert info["rebuffer_s"][0] == 0.0
    assert info["buffer_s"][0] == pytest.approx((4000 - d + 4000) / 1000)
    assert reward[0] == pytest.approx(4.3)  # no stall, no switch


def test_buffer_threshold_sleep_advances_the_trace():
    # tiny chunks on a fast link: the buffer grows ~4 s per chunk until it passes 60 s
    t = np.arange(0, 1001, dtype=float)
    bw = np.where(t < 100, 80.0, 0.8)  # fast up to 100 s, slow after
    env = fixed_env(Trace("step", t, bw), flat_video(10_000.0))
    _, info = env.reset(seed=0)
    sleeps, buffers, delays = [], [], []
    for _ in range(47):
        _, _, _, _, info = env.step(np.array([0]))
        sleeps.append(info["sleep_ms"][0])
        buffers.append(info["buffer_s"][0])
        delays.append(info["delay_ms"][0])
    sleeps, buffers = np.array(sleeps), np.array(buffers)
    assert sleeps.max() > 0
    assert np.all(buffers <= 60.0 + 1e-9)
    assert np.all(sleeps % 500 == 0)
    first = int(np.argmax(sleeps > 0))
    # the buffer before the sleep is 60 s + (the sleep rounded up to 500 ms steps)
    before = buffers[first] * 1000 + sleeps[first]
    assert sleeps[first] == math.ceil((before - 60000) / 500) * 500
    # sleeping moves the trace position by ~4 s per chunk once the buffer is full, so the slow part
    # (t > 100 s) is reached within 47 chunks; without sleeping they would take ~4 s in all
    fast = 1e4 / (10e6 * 0.95) * 1000 + 80
    slow = 1e4 / (0.1e6 * 0.95) * 1000 + 80
    assert delays[0] == pytest.approx(fast)
    assert delays[-1] == pytest.approx(slow)


def test_trace_wraps_back_to_index_1_and_time_0():
    # cycle: (0,1] at 8 Mbps = 0.95e6 B, (1,2] at 4 Mbps = 0.475e6 B; 1.425e6 B per 2 s
    trace = Trace("short", np.array([0.0, 1.0, 2.0]), np.array([99.0, 8.0, 4.0]))
    sizes = np.full((6, 49), 3e6)
    env = fixed_env(trace, Video("v", sizes))
    _, info = env.reset(seed=0)
    seconds = 4.0 + (3e6 - 2 * 1.425e6) / 0.95e6  # two cycles, then part of interval 1
    assert info["delay_ms"][0] == pytest.approx(seconds * 1000 + 80)
    # the walk continues from there: 0.15e6 B of interval 1 are used, 0.8e6 B left in it
    _, _, _, _, info = env.step(np.array([0]))
    rest = 3e6 - 0.8e6 - 0.475e6 - 1.425e6  # rest of interval 1, interval 2, one cycle
    seconds = (1 - 0.15e6 / 0.95e6) + 1 + 2 + rest / 0.95e6
    assert info["delay_ms"][0] == pytest.approx(seconds * 1000 + 80)


def test_zero_bandwidth_intervals_are_waited_out():
    trace = Trace("gap", np.array([0.0, 1.0, 3.0, 4.0]), np.array([0.0, 8.0, 0.0, 8.0]))
    env = fixed_env(trace, flat_video(1.425e6))  # interval 1 + 0.475e6 B of interval 3
    _, info = env.reset(seed=0)
    assert info["delay_ms"][0] == pytest.approx((1 + 2 + 0.5) * 1000 + 80)


def test_observation_rows_and_history_roll():
    video = synthetic_video(1)
    env = BatchABREnv([const_trace(3.0, 400)], video)
    obs0, info0 = env.reset(seed=5)
    assert np.all(obs0[0, :4, :-1] == 0) and np.all(obs0[0, 5, :-1] == 0)
    obs, _, _, _, info = env.step(np.array([4]))
    o = obs[0].astype(float)
    assert o[0, -1] == pytest.approx(2850 / 4300)
    assert o[1, -1] == pytest.approx(info["buffer_s"][0] / 10, rel=1e-6)
    size = video.sizes_bytes[4, 1]
    assert o[2, -1] == pytest.approx(size / info["delay_ms"][0] / 1000, rel=1e-6)
    assert o[3, -1] == pytest.approx(info["delay_ms"][0] / 1000 / 10, rel=1e-6)
    np.testing.assert_allclose(o[4, :6], video.sizes_bytes[:, 2] / 1e6, rtol=1e-6)
    assert o[5, -1] == pytest.approx(46 / 48, rel=1e-6)
    for row in (0, 1, 2, 3, 5):  # the reset column moved one to the left
        assert o[row, -2] == obs0[0, row, -1]
    assert info["chunk_index"][0] == 1 and info["chunks_left"][0] == 46


def test_reward_formula_and_episode_length():
    env = BatchABREnv(synthetic_traces(3, seed=2), synthetic_video(2))
    _, info = env.reset(seed=0)
    prev = np.full(3, 0.3)  # the reset chunk is at level 0
    rng = np.random.default_rng(0)
    steps = 0
    while True:
        levels = rng.integers(0, 6, 3)
        _, reward, done, _, info = env.step(levels)
        steps += 1
        mbps = BITRATES_KBPS[levels] / 1000
        np.testing.assert_allclose(info["bitrate_mbps"], mbps)
        np.testing.assert_allclose(info["smoothness_mbps"], np.abs(mbps - prev))
        np.testing.assert_allclose(reward, mbps - 4.3 * info["rebuffer_s"] - np.abs(mbps - prev))
        prev = mbps
        if done.all():
            break
        assert not done.any()
    assert steps == 47 and info["chunk_index"][0] == 47 and info["chunks_left"][0] == 0
    with pytest.raises(NetLLMError, match="episode is over"):
        env.step(np.zeros(3, dtype=int))


def run_episode(env: BatchABREnv, seed: int) -> tuple[np.ndarray, np.ndarray]:
    obs, info = env.reset(seed)
    rewards, observations = [], [obs]
    while True:
        obs, reward, done, _, info = env.step(bba(info["buffer_s"]))
        rewards.append(reward)
        observations.append(obs)
        if done.all():
            return np.stack(rewards, 1), np.stack(observations, 1)


def test_batch_equals_single_and_composition_does_not_matter():
    traces = synthetic_traces(6, seed=4)
    video = synthetic_video(4)
    rewards, observations = run_episode(BatchABREnv(traces, video), seed=9)
    sub, sub_obs = run_episode(BatchABREnv([traces[4], traces[1]], video, trace_ids=[4, 1]), seed=9)
    np.testing.assert_array_equal(sub, rewards[[4, 1]])
    np.testing.assert_array_equal(sub_obs, observations[[4, 1]])
    # a Gymnasium-style single env over trace 3 gives the same episode
    single = ABREnv(traces[3], video, trace_id=3)
    obs, info = single.reset(seed=9)
    assert obs.shape == ABREnv.observation_shape
    got = []
    while True:
        obs, reward, terminated, truncated, info = single.step(int(bba(np.array([info["buffer_s"]]))[0]))
        got.append(reward)
        assert truncated is False and isinstance(reward, float)
        if terminated:
            break
    np.testing.assert_array_equal(np.array(got), rewards[3])


def test_seeds_change_start_and_noise_but_repeat_exactly():
    traces = synthetic_traces(4, seed=0)
    env = BatchABREnv(traces, synthetic_video(0))
    a, _ = run_episode(env, 1)
    b, _ = run_episode(env, 1)
    c, _ = run_episode(env, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------- loaders and real data


def test_real_data_loaders(real_data: Path):
    traces = load_traces("fcc-test", root=real_data)
    assert len(traces) == 100  # the start-pointer pickle is not a trace
    assert all(tr.time_s[0] == 0 and np.all(np.diff(tr.time_s) > 0) for tr in traces)
    assert [tr.name for tr in traces] == sorted(tr.name for tr in traces)
    assert len(load_traces("fcc-valid", root=real_data)) == 150
    for name in ("video1", "video2"):
        video = load_video(name, root=real_data)
        assert video.sizes_bytes.shape == (6, 49) and video.num_chunks == 48
        assert np.all(np.diff(video.sizes_bytes.mean(1)) > 0)  # higher level, bigger chunks
    starts = upstream_start_indices("fcc-test", root=real_data)
    assert starts is not None and len(starts) == 100
    assert upstream_start_indices("fcc-valid", root=real_data) is None


def mean_qoe(env: BatchABREnv, policy, seeds=(1,)) -> float:
    out = []
    for seed in seeds:
        _, info = env.reset(seed)
        rewards = []
        while True:
            _, reward, done, _, info = env.step(policy(info))
            rewards.append(reward)
            if done.all():
                break
        out.append(np.mean(rewards))
    return float(np.mean(out))


def test_real_data_reproduces_upstream_bba(real_data: Path):
    traces = load_traces("fcc-test", root=real_data)
    starts = upstream_start_indices("fcc-test", root=real_data)
    # upstream's own evaluation: fixed start pointers, no noise -> its numbers to 3 decimals
    for name, want in (("video1", 0.764), ("video2", 0.587)):
        env = BatchABREnv(traces, load_video(name, root=real_data), noise=False, start_indices=starts)
        assert mean_qoe(env, lambda info: bba(info["buffer_s"])) == pytest.approx(want, abs=0.001)
    # with noise and random starts: within the reference band
    env = BatchABREnv(traces, load_video("video1", root=real_data))
    assert mean_qoe(env, lambda info: bba(info["buffer_s"]), seeds=(1, 2, 3)) == pytest.approx(0.764, abs=0.03)


def test_real_data_fixed_level_policies_are_plausible(real_data: Path):
    env = BatchABREnv(load_traces("fcc-test", root=real_data), load_video("video1", root=real_data))
    lowest = mean_qoe(env, lambda info: np.zeros(env.num_envs, dtype=np.int64))
    highest = mean_qoe(env, lambda info: np.full(env.num_envs, 5))
    assert 0.2 < lowest <= 0.3  # 0.3 Mbps minus rare stalls
    assert highest < -1.0  # 4.3 Mbps does not fit most FCC links: long stalls


# --------------------------------------------------------------- generators


def test_synthetic_generators_are_seeded_and_valid():
    a = synthetic_traces(5, seed=3, low_mbps=0.5, high_mbps=2.0)
    b = synthetic_traces(5, seed=3, low_mbps=0.5, high_mbps=2.0)
    assert all(np.array_equal(x.bandwidth_mbps, y.bandwidth_mbps) for x, y in zip(a, b))
    for tr in a:
        tr.check()
        assert tr.bandwidth_mbps.min() >= 0.5 and tr.bandwidth_mbps.max() <= 2.0
        assert tr.time_s[0] == 0 and tr.duration_s == pytest.approx(320)
    v = synthetic_video(1, num_chunks=10)
    assert v.sizes_bytes.shape == (6, 11) and v.num_chunks == 10


def test_benchmark_helper_reports_rates():
    out = benchmark_chunks_per_s(synthetic_traces(8, seed=0), synthetic_video(0), min_seconds=0.05)
    assert out["batched_chunks_per_s"] > 0 and out["single_chunks_per_s"] > 0
    assert out["speedup"] == pytest.approx(out["batched_chunks_per_s"] / out["single_chunks_per_s"])


# --------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 1\n1 abc\n2 3\n", r"bad:2: not a number"),
        ("0 1\n1 nan\n2 3\n", r"bad:2: bandwidth is not a finite number"),
        ("0 1\n1 -2\n2 3\n", r"bad:2: bandwidth is negative"),
        ("0 1\n", r"bad: a trace needs at least 2 samples"),
        ("0 1\n2 1\n2 1\n", r"bad:3: time does not increase"),
        ("0 1\n1 1 7\n", r"bad:2: expected 'time_s bandwidth_Mbps'"),
        ("0 0\n1 0\n2 0\n", r"bandwidth is zero everywhere"),
    ],
)
def test_bad_trace_files(tmp_path: Path, text: str, match: str):
    path = tmp_path / "bad"
    path.write_text(text)
    with pytest.raises(NetLLMError, match=match):
        load_trace(path)


def test_missing_and_empty_trace_inputs(tmp_path: Path):
    with pytest.raises(NetLLMError, match="trace file not found.*nope"):
        load_trace(tmp_path / "nope")
    with pytest.raises(NetLLMError, match="no such folder"):
        load_traces(str(tmp_path / "nothing"))
    with pytest.raises(NetLLMError, match="holds no trace files"):
        load_traces(tmp_path)
    (tmp_path / "b").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(NetLLMError, match="not a text file"):
        load_traces(tmp_path)
    with pytest.raises(NetLLMError, match="netllm data fetch abr"):
        load_traces("fcc-test", root=tmp_path)


def write_video(folder: Path, lines: int = 49) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for level in range(6):
        (folder / f"video_size_{level}").write_text("".join(f"{1000 * (level + 1)}\n" for _ in range(lines)))
    return folder


def test_video_loader_and_errors(tmp_path: Path):
    folder = write_video(tmp_path / "v")
    assert load_video(folder).sizes_bytes.shape == (6, 49)
    (folder / "video_size_3").write_text("1000\n" * 48)
    with pytest.raises(NetLLMError, match="video_size_3: has 48 lines"):
        load_video(folder)
    write_video(folder)
    (folder / "video_size_2").write_text("1000\n" * 10 + "big\n" + "1000\n" * 38)
    with pytest.raises(NetLLMError, match="video_size_2:11: not a number"):
        load_video(folder)
    write_video(folder)
    (folder / "video_size_5").unlink()
    with pytest.raises(NetLLMError, match="video size file not found.*video_size_5"):
        load_video(folder)
    with pytest.raises(NetLLMError, match="no such folder"):
        load_video(tmp_path / "missing")
    with pytest.raises(NetLLMError, match="netllm data fetch abr"):
        load_video("video1", root=tmp_path)


def test_invalid_actions_and_calls():
    env = BatchABREnv(synthetic_traces(2, seed=0), synthetic_video(0))
    with pytest.raises(NetLLMError, match="reset"):
        env.step(np.zeros(2, dtype=int))
    env.reset(seed=0)
    with pytest.raises(NetLLMError, match=r"level 6 \(env 1\) is outside 0..5"):
        env.step(np.array([0, 6]))
    with pytest.raises(NetLLMError, match="outside"):
        env.step(np.array([-1, 0]))
    with pytest.raises(NetLLMError, match=r"expected shape \(2,\)"):
        env.step(np.zeros(3, dtype=int))
    with pytest.raises(NetLLMError, match="integers"):
        env.step(np.array([0.5, 1.0]))
    with pytest.raises(NetLLMError, match="seed"):
        env.reset(seed=-1)
    single = ABREnv(synthetic_traces(1, seed=0)[0], synthetic_video(0))
    single.reset()
    for bad in (6, -1, 2.0, "1", True):
        with pytest.raises(NetLLMError, match="action"):
            single.step(bad)
    with pytest.raises(NetLLMError, match="start_indices"):
        BatchABREnv(synthetic_traces(1, seed=0), synthetic_video(0), start_indices=[0])
    with pytest.raises(NetLLMError, match="no traces"):
        BatchABREnv([], synthetic_video(0))
