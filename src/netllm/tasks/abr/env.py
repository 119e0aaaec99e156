"""The chunk-level ABR simulator (Pensieve / Genet semantics), vectorised over traces.

    env = BatchABREnv(load_traces("fcc-test"), load_video("video1"))
    obs, info = env.reset(seed=1)            # every env has fetched chunk 0 at level 0
    while True:
        obs, reward, terminated, truncated, info = env.step(levels)   # levels: (N,) int in 0..5
        if terminated.all(): break

    env = gymnasium.make("netllm/ABR-v0")    # one trace (ABREnv), after `import netllm.tasks.abr`
    envs = gymnasium.make_vec("netllm/ABR-v0", num_envs=8)   # BatchABREnv over 8 traces

One step downloads the next chunk of every env. Per env (all in numpy over N):

* The link carries ``bw_Mbps * 1e6 / 8 * 0.95`` payload bytes/s. The trace is a cycle:
  sample ``i`` (``i >= 1``) holds over ``(time[i-1], time[i]]``; at the end the walk
  loops back to sample 1, time 0. A download walks from the current position until the
  chunk's bytes are through, cutting the last interval at the fractional time.
  Instead of walking interval by interval, the walk is done on the cumulative payload
  curve of the cycle with a per-row binary search, which gives the same position.
* ``delay_ms = (download_s * 1000 + 80) * noise`` with noise ~ U[0.9, 1.1].
* ``rebuffer = max(delay - buffer, 0)``; ``buffer = max(buffer - delay, 0) + 4000``; above
  60 000 ms the player sleeps ``ceil((buffer - 60000) / 500) * 500`` ms: the buffer drops
  by that and the trace position advances by it.
* QoE = ``bitrate_Mbps - 4.3 * rebuffer_s - |bitrate_Mbps - previous_bitrate_Mbps|``.

Randomness (start position in ``[1, len)``, one noise draw per chunk) comes from a numpy
Generator seeded with ``(seed, trace_id)``, so a trace's episode does not depend on the
other traces of the batch. ``trace_ids`` default to the positions ``0..N-1``.

Upstream NetLLM's own test run (``run_baseline.py`` on all of fcc-test) is the special
case ``noise=False, start_indices=upstream_start_indices("fcc-test")``: fixed start
positions from the data set's ``mahimahi_ptrs.pkl`` and no noise.

Gymnasium: :class:`ABREnv` is a ``gymnasium.Env`` (action ``Discrete(6)``, observation
:func:`observation_space`) and :class:`BatchABREnv` a ``gymnasium.vector.VectorEnv``
(``MultiDiscrete([6] * N)`` actions, ``(N, 6, 6)`` observations, arrays of rewards /
terminated / truncated). Every session of a batch plays the same video, so all of them
end on the same step; the batch does not reset itself (autoreset mode ``DISABLED``).
Both are registered as ``netllm/ABR-v0`` (``make`` builds an :class:`ABREnv`,
``make_vec`` a :class:`BatchABREnv` through :func:`make_batch_env`); their make keyword
arguments (``trace``, ``video``, ``trace_id``, ``noise``...) are resolved by
:func:`resolve_traces` / :func:`resolve_video`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Union

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from netllm.tasks.abr.traces import (BITRATES_KBPS, CHUNK_S, NUM_LEVELS, Trace, Video, load_traces,
                                     load_video, synthetic_traces, synthetic_video)
from netllm.utils import NetLLMError

PAYLOAD_FRACTION = 0.95
LINK_RTT_MS = 80.0
NOISE_LOW, NOISE_HIGH = 0.9, 1.1
CHUNK_MS = CHUNK_S * 1000.0
BUFFER_THRESHOLD_MS = 60_000.0
DRAIN_SLEEP_MS = 500.0
REBUFFER_PENALTY = 4.3  # per second of stall
SMOOTH_PENALTY = 1.0  # per Mbps of bitrate change
HISTORY = 6  # observation columns
BUFFER_NORM_S = 10.0
CHUNKS_LEFT_CAP = 48
BITRATES_MBPS = BITRATES_KBPS.astype(np.float64) / 1000.0

# What the Gymnasium entry points play when not told (see resolve_traces / resolve_video).
DEFAULT_TRACE_SET = "fcc-train"
DEFAULT_VIDEO = "video1"
SYNTHETIC = "synthetic"
SYNTHETIC_TRACE_SEED = 1  # the generated training traces of ABRTask's demo data
SYNTHETIC_VIDEO_SEED = 0

TraceSpec = Union[Trace, Sequence[Trace], str, os.PathLike[str], None]
VideoSpec = Union[Video, str, os.PathLike[str], None]

INFO_KEYS = (
    "bitrate_mbps", "rebuffer_s", "smoothness_mbps", "delay_ms", "buffer_s", "chunk_index",
    "level", "chunks_left", "throughput_mbps", "sleep_ms",
)


def qoe(bitrate_mbps: np.ndarray, rebuffer_s: np.ndarray, prev_bitrate_mbps: np.ndarray) -> np.ndarray:
    """Per-chunk QoE (linear Pensieve QoE)."""
    return (bitrate_mbps - REBUFFER_PENALTY * rebuffer_s
            - SMOOTH_PENALTY * np.abs(bitrate_mbps - prev_bitrate_mbps))


def _first_greater(table: np.ndarray, rows: np.ndarray, values: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per row ``r``: the first column ``k >= lo[r]`` with ``table[r, k] > values[r]``.

    Rows are non-decreasing and padded with +inf, so the answer always exists.
    """
    lo = lo.copy()
    hi = np.full_like(lo, table.shape[1] - 1)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        greater = table[rows, mid] > values
        hi = np.where(active & greater, mid, hi)
        lo = np.where(active & ~greater, mid + 1, lo)


def observation_space() -> spaces.Box:
    """The space of one session's observation: float32 ``(6, 6)``, Pensieve's state.

    Rows (columns are the last 6 chunks, oldest first, except row 4):
    0 bitrate of the chunk / 4300 kbps (in [0, 1]); 1 buffer (s) / 10 (in [0, 6], the buffer
    never exceeds 60 s); 2 measured throughput in MB/s (bytes per ms / 1000); 3 download
    delay (s) / 10; 4 the next chunk's size at each of the 6 levels in MB (10^6 bytes);
    5 chunks left / 48, capped at 1. Rows 2-4 have no upper bound.
    """
    low = np.zeros((NUM_LEVELS, HISTORY), dtype=np.float32)
    high = np.full((NUM_LEVELS, HISTORY), np.inf, dtype=np.float32)
    high[0] = 1.0
    high[1] = BUFFER_THRESHOLD_MS / 1000.0 / BUFFER_NORM_S
    high[5] = 1.0
    return spaces.Box(low=low, high=high, dtype=np.float32)


def _index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise NetLLMError(f"{name}: must be a non-negative integer, got {value!r}")
    return int(value)


def resolve_traces(spec: TraceSpec = None, count: int = 1) -> list[Trace]:
    """The trace set the Gymnasium entry points play from, at least ``count`` traces long.

    ``None``: ``fcc-train`` from ``$NETLLM_DATA`` when that variable is set, otherwise
    ``"synthetic"``. ``"synthetic"``: ``count`` generated traces
    (``synthetic_traces(count, seed=SYNTHETIC_TRACE_SEED)``; trace ``i`` does not depend on
    ``count``). Any other string or path: :func:`load_traces` (``fcc-train`` |
    ``fcc-valid`` | ``fcc-test`` from the data root, or a folder or file of traces). A
    :class:`Trace` or a sequence of them: used as given.
    """
    count = _index(count, "count")
    if spec is None:
        spec = DEFAULT_TRACE_SET if os.environ.get("NETLLM_DATA") else SYNTHETIC
    if isinstance(spec, Trace):
        traces = [spec]
    elif isinstance(spec, str) and spec == SYNTHETIC:
        traces = synthetic_traces(count, seed=SYNTHETIC_TRACE_SEED)
    elif isinstance(spec, (str, os.PathLike)):
        traces = load_traces(spec)
    else:
        traces = list(spec)
    if len(traces) < count:
        raise NetLLMError(f"trace set {_describe(spec)}: has {len(traces)} traces, {count} needed")
    return traces


def resolve_video(spec: VideoSpec = None) -> Video:
    """The video the Gymnasium entry points play.

    ``None``: ``video1`` from ``$NETLLM_DATA`` when that variable is set, otherwise
    ``"synthetic"`` (``synthetic_video(seed=SYNTHETIC_VIDEO_SEED)``, 48 chunks of 4 s).
    Any other string or path: :func:`load_video`; a :class:`Video`: used as given.
    """
    if spec is None:
        spec = DEFAULT_VIDEO if os.environ.get("NETLLM_DATA") else SYNTHETIC
    if isinstance(spec, Video):
        return spec
    if isinstance(spec, str) and spec == SYNTHETIC:
        return synthetic_video(seed=SYNTHETIC_VIDEO_SEED)
    return load_video(spec)


def _describe(spec: Any) -> str:
    return repr(str(spec)) if isinstance(spec, (str, os.PathLike)) else f"of {type(spec).__name__}"


class BatchABREnv(VectorEnv[np.ndarray, np.ndarray, np.ndarray]):
    """N independent ABR sessions, one per trace, stepped together (see module doc).

    A ``gymnasium.vector.VectorEnv``: ``single_observation_space`` is
    :func:`observation_space`, ``single_action_space`` ``Discrete(6)`` (bitrate level,
    300 .. 4300 kbps); ``observation_space`` / ``action_space`` are their batches over N.
    ``step`` returns ``(obs (N, 6, 6) float32, reward (N,) float64 QoE per chunk,
    terminated (N,) bool, truncated (N,) bool (always False), info)``, info holding one
    (N,) array per :data:`INFO_KEYS` entry. No autoreset: after the last chunk every
    session is terminated and ``reset`` must be called.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        traces: Sequence[Trace],
        video: Video,
        *,
        noise: bool = True,
        random_start: bool = True,
        trace_ids: Sequence[int] | None = None,
        start_indices: Sequence[int] | None = None,
    ) -> None:
        traces = list(traces)
        if not traces:
            raise NetLLMError("ABR env: no traces given")
        for tr in traces:
            if not isinstance(tr, Trace):
                raise NetLLMError(f"ABR env: traces must be Trace objects, got {type(tr).__name__}")
            tr.check()
        sizes = np.asarray(video.sizes_bytes, dtype=np.float64)
        if sizes.ndim != 2 or sizes.shape[0] != NUM_LEVELS or sizes.shape[1] < 2:
            raise NetLLMError(
                f"video {video.name!r}: sizes_bytes must have shape ({NUM_LEVELS}, chunks + 1), "
                f"got {sizes.shape}"
            )
        if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
            raise NetLLMError(f"video {video.name!r}: chunk sizes must be positive finite numbers")
        self.traces = traces
        self.video = video
        self.noise = bool(noise)
        self.random_start = bool(random_start)
        self.num_envs = len(traces)
        if trace_ids is None:
            trace_ids = range(self.num_envs)
        self.trace_ids = np.array([int(t) for t in trace_ids], dtype=np.int64)
        if self.trace_ids.shape != (self.num_envs,) or np.any(self.trace_ids < 0):
            raise NetLLMError(
                f"trace_ids: need {self.num_envs} non-negative integers, got {list(trace_ids)}"
            )
        self.start_indices = None
        if start_indices is not None:
            starts = np.asarray(start_indices)
            lengths = np.array([len(tr) for tr in traces])
            if (starts.shape != (self.num_envs,) or not np.issubdtype(starts.dtype, np.integer)
                    or np.any(starts < 1) or np.any(starts >= lengths)):
                raise NetLLMError(
                    f"start_indices: need one integer in [1, len(trace)) per trace ({self.num_envs})"
                )
            self.start_indices = starts.astype(np.int64)
        self._sizes = sizes
        self.num_chunks = sizes.shape[1] - 1

        # Padded cycle tables (N, M+1): the cycle starts at time 0, so column 0 is 0 even
        # when a trace's first time stamp is not; the extra +inf column ends every search.
        n = self.num_envs
        self._len = np.array([len(tr) for tr in traces], dtype=np.int64)
        width = int(self._len.max()) + 1
        self._time0 = np.array([tr.time_s[0] for tr in traces])
        cycle_t = np.full((n, width), np.inf)
        rate = np.ones((n, width))  # payload bytes/s of the interval ending at column k
        cum = np.full((n, width), np.inf)  # payload bytes from cycle start to column k
        for i, tr in enumerate(traces):
            length = len(tr)
            t = tr.time_s.copy()
            t[0] = 0.0
            r = tr.bandwidth_mbps * 1e6 / 8.0 * PAYLOAD_FRACTION
            cycle_t[i, :length] = t
            rate[i, 1:length] = r[1:]
            cum[i, 0] = 0.0
            cum[i, 1:length] = np.cumsum(r[1:] * np.diff(t))
        self._cycle_t = cycle_t
        self._rate = rate
        self._cum = cum
        self._rows = np.arange(n)
        self._period_s = cycle_t[self._rows, self._len - 1]
        self._cycle_bytes = cum[self._rows, self._len - 1]
        self._started = False
        self._next_seed = 0
        self.single_observation_space = observation_space()
        self.single_action_space = spaces.Discrete(NUM_LEVELS)
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)

    # ------------------------------------------------------------------ simulation

    def _download(self, nbytes: np.ndarray) -> np.ndarray:
        """Move every env's trace position past ``nbytes`` payload bytes; seconds taken."""
        rows, ptr, pos = self._rows, self._ptr, self._pos_s
        t_prev = self._cycle_t[rows, ptr - 1]
        done_bytes = self._cum[rows, ptr - 1] + self._rate[rows, ptr] * (pos - t_prev)
        target = done_bytes + nbytes
        wrap = target >= self._cycle_bytes
        # Past the end of the cycle: finish it, skip whole cycles, continue from time 0.
        over = np.where(wrap, target - self._cycle_bytes, 0.0)
        cycles = np.floor(over / self._cycle_bytes)
        over = np.maximum(over - cycles * self._cycle_bytes, 0.0)
        target = np.where(wrap, over, target)
        start = np.where(wrap, 1, ptr)
        k = _first_greater(self._cum, rows, target, start)
        k = np.minimum(k, self._len - 1)
        t_k1 = self._cycle_t[rows, k - 1]
        new_pos = t_k1 + (target - self._cum[rows, k - 1]) / self._rate[rows, k]
        same = (~wrap) & (k == ptr)
        rate_here = self._rate[rows, ptr]
        within = nbytes / np.where(same, rate_here, 1.0)  # only used where same (rate > 0)
        new_pos = np.where(same, pos + within, new_pos)
        new_pos = np.minimum(new_pos, self._cycle_t[rows, k])
        seconds = np.where(
            wrap,
            (self._period_s - pos) + cycles * self._period_s + new_pos,
            np.where(same, within, (t_k1 - pos) + (new_pos - t_k1)),
        )
        self._ptr, self._pos_s = k, new_pos
        return seconds

    def _advance_time(self, seconds: np.ndarray) -> None:
        """Move every env's trace position forward by ``seconds`` (no bytes move)."""
        rows = self._rows
        target = self._pos_s + seconds
        wrap = target >= self._period_s
        over = np.where(wrap, target - self._period_s, 0.0)
        over = np.maximum(over - np.floor(over / self._period_s) * self._period_s, 0.0)
        target = np.where(wrap, over, target)
        start = np.where(wrap, 1, self._ptr)
        k = np.minimum(_first_greater(self._cycle_t, rows, target, start), self._len - 1)
        moving = seconds > 0
        self._ptr = np.where(moving, k, self._ptr)
        self._pos_s = np.where(moving, target, self._pos_s)

    def _fetch(self, levels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Download chunk ``self._chunk`` at ``levels`` for every env; update obs and state."""
        chunk = self._chunk
        nbytes = self._sizes[levels, chunk]
        download_s = self._download(nbytes)
        delay_ms = (download_s * 1000.0 + LINK_RTT_MS) * self._noise[:, chunk]
        rebuffer_ms = np.maximum(delay_ms - self._buffer_ms, 0.0)
        buffer_ms = np.maximum(self._buffer_ms - delay_ms, 0.0) + CHUNK_MS
        excess = buffer_ms - BUFFER_THRESHOLD_MS
        sleep_ms = np.where(excess > 0, np.ceil(excess / DRAIN_SLEEP_MS) * DRAIN_SLEEP_MS, 0.0)
        buffer_ms = buffer_ms - sleep_ms
        if np.any(sleep_ms > 0):
            self._advance_time(sleep_ms / 1000.0)
        self._buffer_ms = buffer_ms
        self._chunk = chunk + 1
        chunks_left = self.num_chunks - self._chunk

        bitrate_mbps = BITRATES_MBPS[levels]
        prev_mbps = BITRATES_MBPS[self._last_level]
        rebuffer_s = rebuffer_ms / 1000.0
        reward = qoe(bitrate_mbps, rebuffer_s, prev_mbps)
        self._last_level = levels

        state = np.roll(self._state, -1, axis=2)
        state[:, 0, -1] = BITRATES_KBPS[levels] / float(BITRATES_KBPS.max())
        state[:, 1, -1] = buffer_ms / 1000.0 / BUFFER_NORM_S
        state[:, 2, -1] = nbytes / delay_ms / 1000.0
        state[:, 3, -1] = delay_ms / 1000.0 / BUFFER_NORM_S
        state[:, 4, :NUM_LEVELS] = self._sizes[:, self._chunk][None, :] / 1e6
        state[:, 5, -1] = min(chunks_left, CHUNKS_LEFT_CAP) / float(CHUNKS_LEFT_CAP)
        self._state = state
        n = self.num_envs
        info = {
            "bitrate_mbps": bitrate_mbps,
            "rebuffer_s": rebuffer_s,
            "smoothness_mbps": np.abs(bitrate_mbps - prev_mbps),
            "delay_ms": delay_ms,
            "buffer_s": buffer_ms / 1000.0,
            "chunk_index": np.full(n, chunk, dtype=np.int64),
            "level": levels.copy(),
            "chunks_left": np.full(n, chunks_left, dtype=np.int64),
            "throughput_mbps": nbytes * 8.0 / delay_ms / 1000.0,
            "sleep_ms": sleep_ms,
        }
        return reward, info

    # ------------------------------------------------------------------ public API

    def reset(
        self, seed: int | None = None, options: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start one episode per trace; chunk 0 is fetched at level 0 (not scored).

        ``seed=None`` uses the previous seed + 1 (0 at first), so episodes stay
        reproducible. ``options`` may hold Gymnasium's ``reset_mask`` (N,) bool; the
        sessions share one chunk clock, so only a mask of all True (a full reset) is
        accepted.
        """
        if seed is None:
            seed = self._next_seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise NetLLMError(f"seed: must be a non-negative integer, got {seed!r}")
        if options is not None and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (self.num_envs,) or mask.dtype != bool or not mask.all():
                raise NetLLMError(
                    "reset options: reset_mask must be all True with shape "
                    f"({self.num_envs},); the sessions of a batch can only be reset together"
                )
        super().reset(seed=int(seed))  # Gymnasium's np_random (the simulator uses its own streams)
        self._next_seed = int(seed) + 1
        n = self.num_envs
        ptr = np.ones(n, dtype=np.int64)
        noise = np.ones((n, self.num_chunks))
        for i in range(n):
            rng = np.random.default_rng([int(seed), int(self.trace_ids[i])])
            if self.random_start:
                ptr[i] = rng.integers(1, self._len[i])  # drawn even when overridden below
            if self.noise:
                noise[i] = rng.uniform(NOISE_LOW, NOISE_HIGH, size=self.num_chunks)
        if self.start_indices is not None:
            ptr = self.start_indices.copy()
        self._ptr_start = ptr.copy()
        self._ptr = ptr
        self._pos_s = np.where(ptr == 1, self._time0, self._cycle_t[self._rows, ptr - 1])
        self._noise = noise
        self._buffer_ms = np.zeros(n)
        self._chunk = 0
        self._last_level = np.zeros(n, dtype=np.int64)
        self._state = np.zeros((n, NUM_LEVELS, HISTORY))
        _, info = self._fetch(np.zeros(n, dtype=np.int64))
        self._started = True
        return self._state.astype(np.float32), info

    def step(
        self, levels: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Download the next chunk of every env at ``levels`` (shape (N,), ints in 0..5).

        Returns ``(obs, reward, terminated, truncated, info)``: reward is the QoE of the
        chunk (Mbps-scaled, see :func:`qoe`); terminated is True for every session once
        the video's last chunk is fetched; truncated is always False.
        """
        if not self._started:
            raise NetLLMError("ABR env: call reset(seed) before step()")
        if self._chunk >= self.num_chunks:
            raise NetLLMError("ABR env: the episode is over (terminated); call reset(seed) to start another")
        levels = self._check_levels(levels)
        reward, info = self._fetch(levels)
        terminated = np.full(self.num_envs, self._chunk >= self.num_chunks)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self._state.astype(np.float32), reward, terminated, truncated, info

    def _check_levels(self, levels: Any) -> np.ndarray:
        arr = np.asarray(levels)
        if arr.shape != (self.num_envs,):
            raise NetLLMError(
                f"action levels: expected shape ({self.num_envs},), got {arr.shape}"
            )
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise NetLLMError(f"action levels: must be integers in 0..{NUM_LEVELS - 1}, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= NUM_LEVELS))
        if bad.size:
            raise NetLLMError(
                f"action levels: level {arr[bad[0]]} (env {bad[0]}) is outside 0..{NUM_LEVELS - 1}"
            )
        return arr

    @property
    def chunk_index(self) -> int:
        """Index of the next chunk to download."""
        return self._chunk

    def copy(self) -> "BatchABREnv":
        """An independent copy of the env and its episode state (noise included)."""
        new = object.__new__(BatchABREnv)
        new.__dict__.update(self.__dict__)
        for key in ("_ptr", "_pos_s", "_buffer_ms", "_last_level", "_state"):
            if key in self.__dict__:
                setattr(new, key, getattr(self, key).copy())
        if self.__dict__.get("_np_random") is not None:
            new._np_random = copy.deepcopy(self._np_random)
        return new


class ABREnv(gymnasium.Env[np.ndarray, np.int64]):
    """One trace as a ``gymnasium.Env`` (``reset(seed)`` / ``step(level)``).

    Action: ``Discrete(6)``, the bitrate level of the next chunk (300 .. 4300 kbps).
    Observation: :func:`observation_space`. Reward: the chunk's QoE (:func:`qoe`: Mbps
    minus 4.3 per stalled second minus the bitrate change in Mbps). ``terminated`` once
    the video's last chunk is fetched (47 steps for a 48-chunk video), ``truncated``
    never. ``info``: one Python scalar per :data:`INFO_KEYS` entry.

    ``trace`` is a :class:`Trace`, or a trace set (see :func:`resolve_traces`; ``None``
    picks real or generated traces) from which trace number ``trace_id`` is played.
    ``video``: see :func:`resolve_video`. ``trace_id`` also keys the random streams, so
    the episode equals session ``trace_id`` of a :class:`BatchABREnv` over the set.
    Other keywords (``noise``, ``random_start``, ``start_indices``) go to BatchABREnv.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    n_actions = NUM_LEVELS
    observation_shape = (NUM_LEVELS, HISTORY)

    def __init__(self, trace: TraceSpec = None, video: VideoSpec = None, *, trace_id: int = 0,
                 **kw: Any) -> None:
        trace_id = _index(trace_id, "trace_id")
        if not isinstance(trace, Trace):
            trace = resolve_traces(trace, trace_id + 1)[trace_id]
        video = resolve_video(video)
        self._env = BatchABREnv([trace], video, trace_ids=[trace_id], **kw)
        self.trace = trace
        self.video = video
        self.observation_space = self._env.single_observation_space
        self.action_space = self._env.single_action_space

    def reset(self, seed: int | None = None, options: Mapping[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; ``seed=None`` uses the previous seed + 1 (0 at first).
        ``options``: unused."""
        obs, info = self._env.reset(seed)
        super().reset(seed=self._env.np_random_seed)  # Gymnasium's np_random (the simulator has its own)
        return obs[0], _scalars(info)

    def step(self, level: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Fetch the next chunk at ``level`` (int in 0..5)."""
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) \
                or not 0 <= int(level) < NUM_LEVELS:
            raise NetLLMError(f"action: level must be an int in 0..{NUM_LEVELS - 1}, got {level!r}")
        obs, reward, terminated, _, info = self._env.step(np.array([int(level)]))
        return obs[0], float(reward[0]), bool(terminated[0]), False, _scalars(info)


def make_batch_env(num_envs: int = 1, trace: TraceSpec = None, video: VideoSpec = None, *,
                   trace_id: int = 0, **kw: Any) -> BatchABREnv:
    """``gymnasium.make_vec("netllm/ABR-v0", num_envs=N, ...)``: a :class:`BatchABREnv` over
    traces ``trace_id .. trace_id + N - 1`` of the trace set ``trace`` (same keywords as
    :class:`ABREnv`, whose episode on trace ``k`` equals session ``k - trace_id`` here)."""
    num_envs, trace_id = _index(num_envs, "num_envs"), _index(trace_id, "trace_id")
    if num_envs < 1:
        raise NetLLMError("num_envs: must be >= 1")
    traces = resolve_traces(trace, trace_id + num_envs)[trace_id:trace_id + num_envs]
    return BatchABREnv(traces, resolve_video(video),
                       trace_ids=range(trace_id, trace_id + num_envs), **kw)


def _scalars(info: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: v[0].item() for k, v in info.items()}


def benchmark_chunks_per_s(
    traces: Sequence[Trace],
    video: Video,
    *,
    seed: int = 0,
    min_seconds: float = 1.0,
) -> dict[str, float]:
    """Simulated chunks per second: one batched env over all traces vs a loop of ABREnv.

    Both run the same policy (levels drawn at random, seeded). Returns ``batched_chunks_per_s``,
    ``single_chunks_per_s``, ``speedup``, ``num_traces`` and ``chunks_per_episode``.
    """
    traces = list(traces)
    rng = np.random.default_rng(seed)
    num_steps = video.sizes_bytes.shape[1] - 2
    plan = rng.integers(0, NUM_LEVELS, size=(num_steps, len(traces)))

    def run_batched() -> int:
        env = BatchABREnv(traces, video)
        env.reset(seed)
        for t in range(num_steps):
            env.step(plan[t])
        return len(traces) * (num_steps + 1)

    def run_single() -> int:
        for i, tr in enumerate(traces):
            env = ABREnv(tr, video, trace_id=i)
            env.reset(seed)
            for t in range(num_steps):
                env.step(int(plan[t, i]))
        return len(traces) * (num_steps + 1)

    def rate(fn: Any) -> float:
        chunks, start = 0, time.perf_counter()
        while True:
            chunks += fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return chunks / elapsed

    batched = rate(run_batched)
    single = rate(run_single)
    return {
        "batched_chunks_per_s": batched,
        "single_chunks_per_s": single,
        "speedup": batched / single,
        "num_traces": float(len(traces)),
        "chunks_per_episode": float(num_steps + 1),
    }
