"""ABR baselines, batched over the N sessions of a :class:`BatchABREnv`.

    policy = make_baseline("mpc")            # "bba" | "mpc" | "genet" | "udr_1" ... | "oracle"
    obs, info = env.reset(seed)
    policy.reset(env, seed)
    while True:
        obs, reward, done, _, info = env.step(policy.act(obs, info))
        if done.all(): break

* :class:`BBA` — buffer-based: level 0 below the 5 s reservoir, the top level above
  reservoir + 10 s cushion, linear in between.
* :class:`RobustMPC` — harmonic-mean throughput of the last 5 chunks, discounted by the
  largest recent prediction error; every plan of the next 5 chunks that moves at most
  one level per chunk is scored (all plans x all envs in one numpy pass); the first
  level of the best plan is played.
* :class:`PensieveActor` — the GENET / UDR actors (Pensieve architecture, numpy forward
  pass over ``pretrained/<name>_actor.npz``); actions down / keep / up.
* :class:`Oracle` — the offline optimum that knows the future bandwidth: dynamic
  programming over chunk x level x buffer (binned), planned noise-free from the env's
  current trace positions and re-planned every few chunks.

Every policy: ``name``, ``reset(env, seed)``, ``act(obs, info) -> levels (N,) int64``.
"""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from netllm.tasks.abr.traces import BITRATES_KBPS, CHUNK_S, NUM_LEVELS, Trace
from netllm.utils import NetLLMError

if TYPE_CHECKING:
    from netllm.tasks.abr.env import BatchABREnv

ACTOR_NAMES: tuple[str, ...] = ("genet", "udr_1", "udr_2", "udr_3", "udr_real")
BASELINES: tuple[str, ...] = ("bba", "mpc", *ACTOR_NAMES, "oracle")

BITRATES_MBPS = BITRATES_KBPS.astype(np.float64) / 1000.0
TOP_LEVEL = NUM_LEVELS - 1
REBUFFER_PENALTY = 4.3  # QoE per second of stall (same QoE as the env)
SMOOTH_PENALTY = 1.0  # QoE per Mbps of bitrate change
BUFFER_NORM_S = 10.0  # obs row 1 = buffer_s / 10
# Simulator constants the oracle plans with (they mirror env.py; see the module doc there).
PAYLOAD_FRACTION = 0.95
LINK_RTT_S = 0.08
BUFFER_CAP_MS = 60_000.0
DRAIN_SLEEP_MS = 500.0


class ABRPolicy(Protocol):
    """What every ABR policy offers (baselines and trained adapters alike)."""

    name: str

    def reset(self, env: "BatchABREnv", seed: int) -> None: ...

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray: ...


def _buffer_s(obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
    if "buffer_s" in info:
        return np.asarray(info["buffer_s"], dtype=np.float64)
    return np.asarray(obs, dtype=np.float64)[:, 1, -1] * BUFFER_NORM_S


def _last_level(obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
    if "level" in info:
        return np.asarray(info["level"], dtype=np.int64)
    # obs row 0 = bitrate_kbps / 4300 of the last chunk
    kbps = np.asarray(obs, dtype=np.float64)[:, 0, -1] * BITRATES_KBPS.max()
    return np.abs(kbps[:, None] - BITRATES_KBPS[None, :]).argmin(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- BBA


def bba_levels(buffer_s: np.ndarray, reservoir_s: float = 5.0, cushion_s: float = 10.0) -> np.ndarray:
    """BBA's map from buffer (s) to level: 0 below the reservoir, linear over the cushion."""
    buffer_s = np.asarray(buffer_s, dtype=np.float64)
    ramp = TOP_LEVEL * (buffer_s - reservoir_s) / cushion_s
    levels = np.where(buffer_s < reservoir_s, 0.0,
                      np.where(buffer_s >= reservoir_s + cushion_s, TOP_LEVEL, ramp))
    return levels.astype(np.int64)  # truncation, as upstream's int()


class BBA:
    """Buffer-based adaptation (Huang et al. 2014), reservoir 5 s, cushion 10 s."""

    name = "bba"

    def __init__(self, reservoir_s: float = 5.0, cushion_s: float = 10.0) -> None:
        self.reservoir_s, self.cushion_s = reservoir_s, cushion_s

    def reset(self, env: "BatchABREnv", seed: int) -> None:
        pass

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        return bba_levels(_buffer_s(obs, info), self.reservoir_s, self.cushion_s)


# ----------------------------------------------------------------------------- RobustMPC


@cache
def mpc_plans(start_level: int, horizon: int = 5, max_step: int = 1) -> np.ndarray:
    """Every level sequence of ``horizon`` chunks, each within ``max_step`` of the one
    before, the first within ``max_step`` of ``start_level``; shape (plans, horizon),
    in lexicographic order (read-only)."""
    combos = np.array(list(itertools.product(range(NUM_LEVELS), repeat=horizon)), dtype=np.int64)
    prev = np.concatenate([np.full((len(combos), 1), start_level), combos[:, :-1]], axis=1)
    plans = combos[np.all(np.abs(combos - prev) <= max_step, axis=1)]
    plans.setflags(write=False)
    return plans


class RobustMPC:
    """RobustMPC (Yin et al. 2015) as in the Pensieve / Genet / NetLLM baselines.

    Throughput estimate: harmonic mean of the measured throughputs of the last
    ``history`` chunks (obs row 2, KB/ms = MB/s; the zero padding at the start of an
    episode is skipped) divided by ``1 + max relative error`` of the last ``history``
    predictions, where the error of a step is ``|hm_prev - measured| / measured`` with
    ``hm_prev`` the harmonic mean computed before that chunk. Plans: the next
    ``min(horizon, chunks left)`` chunks, at most one level apart from chunk to chunk
    (starting from the last level); download time = size / estimate (no RTT), buffer
    -download then +4 s, QoE as the env's. Ties go to the later plan, as upstream.

    The plan for chunks ``c+1 ..`` after chunk ``c`` uses their sizes.
    ``upstream_lookahead=True`` reproduces the Pensieve / NetLLM code instead, which
    reads the sizes of chunks ``c+2 ..`` (one too far: ``last_index = 48 - chunks_left``);
    the published RobustMPC numbers (0.848 / 0.631 on fcc-test) were measured that way.
    """

    name = "mpc"

    def __init__(self, horizon: int = 5, history: int = 5, upstream_lookahead: bool = False) -> None:
        self.horizon, self.history = horizon, history
        self.upstream_lookahead = bool(upstream_lookahead)
        # Plans of every start level, padded to one width; padding rows are invalid.
        sets = [mpc_plans(level, horizon) for level in range(NUM_LEVELS)]
        width = max(len(s) for s in sets)
        self._plans = np.zeros((NUM_LEVELS, width, horizon), dtype=np.int64)
        self._valid = np.zeros((NUM_LEVELS, width), dtype=bool)
        for level, plans in enumerate(sets):
            self._plans[level, :len(plans)] = plans
            self._plans[level, len(plans):] = plans[0]
            self._valid[level, :len(plans)] = True
        self._sizes: np.ndarray | None = None

    def reset(self, env: "BatchABREnv", seed: int) -> None:
        self._sizes = np.asarray(env.video.sizes_bytes, dtype=np.float64)
        self._prev_hm: np.ndarray | None = None
        self._errors = np.full((env.num_envs, self.history), np.nan)

    def estimate_mbyte_per_s(self, obs: np.ndarray) -> np.ndarray:
        """Robust throughput estimate (MB/s) for the next chunks; updates the error history."""
        measured_all = np.asarray(obs, dtype=np.float64)[:, 2, :]
        latest = measured_all[:, -1]
        if self._prev_hm is None:
            error = np.zeros(len(latest))  # no prediction yet
        else:
            error = np.abs(self._prev_hm - latest) / np.maximum(latest, 1e-12)
        self._errors = np.roll(self._errors, -1, axis=1)
        self._errors[:, -1] = error
        recent = measured_all[:, -self.history:]
        seen = recent > 0
        inv_sum = np.where(seen, 1.0 / np.where(seen, recent, 1.0), 0.0).sum(axis=1)
        hm = seen.sum(axis=1) / np.maximum(inv_sum, 1e-12)
        self._prev_hm = hm
        return hm / (1.0 + np.nanmax(self._errors, axis=1))

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        if self._sizes is None:
            raise NetLLMError("mpc: call reset(env, seed) before act()")
        estimate = self.estimate_mbyte_per_s(obs)  # (N,)
        last = _last_level(obs, info)
        n = len(last)
        next_chunk = np.asarray(info["chunk_index"], dtype=np.int64) + (2 if self.upstream_lookahead else 1)
        left = np.asarray(info["chunks_left"], dtype=np.int64)
        depth = np.clip(left, 1, self.horizon)  # plan length per env
        plans = self._plans[last]  # (N, P, H)
        valid = self._valid[last]
        chunk = np.minimum(next_chunk[:, None] + np.arange(self.horizon), self._sizes.shape[1] - 1)
        sizes_mb = self._sizes[plans, chunk[:, None, :]] / 1e6  # (N, P, H)
        download_s = sizes_mb / estimate[:, None, None]
        buffer_s = np.broadcast_to(_buffer_s(obs, info)[:, None], plans.shape[:2]).copy()
        prev_mbps = np.broadcast_to(BITRATES_MBPS[last][:, None], plans.shape[:2])
        score = np.zeros(plans.shape[:2])
        final = np.zeros(plans.shape[:2])
        for j in range(self.horizon):
            mbps = BITRATES_MBPS[plans[:, :, j]]
            rebuffer_s = np.maximum(download_s[:, :, j] - buffer_s, 0.0)
            buffer_s = np.maximum(buffer_s - download_s[:, :, j], 0.0) + CHUNK_S
            score += mbps - REBUFFER_PENALTY * rebuffer_s - SMOOTH_PENALTY * np.abs(mbps - prev_mbps)
            prev_mbps = mbps
            final = np.where((depth == j + 1)[:, None], score, final)
        final = np.where(valid, final, -np.inf)
        best = final.shape[1] - 1 - np.argmax(final[:, ::-1], axis=1)  # last best plan
        return plans[np.arange(n), best, 0].astype(np.int64)


# ----------------------------------------------------------------------------- Pensieve actors

_ACTOR_SHAPES: dict[str, tuple[int, ...]] = {
    "FullyConnected.W": (1, 128), "FullyConnected.b": (128,),
    "FullyConnected_1.W": (1, 128), "FullyConnected_1.b": (128,),
    "Conv1D.W": (4, 1, 6, 128), "Conv1D.b": (128,),
    "Conv1D_1.W": (4, 1, 6, 128), "Conv1D_1.b": (128,),
    "Conv1D_2.W": (4, 1, 6, 128), "Conv1D_2.b": (128,),
    "FullyConnected_2.W": (1, 128), "FullyConnected_2.b": (128,),
    "FullyConnected_3.W": (768, 128), "FullyConnected_3.b": (128,),
    "FullyConnected_4.W": (128, 3), "FullyConnected_4.b": (3,),
}


def load_actor_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a Pensieve actor npz, checked against the expected keys and shapes."""
    path = Path(path)
    if not path.is_file():
        raise NetLLMError(f"{path}: pretrained ABR actor not found; run `netllm data fetch abr` "
                          "(or set NETLLM_DATA)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except Exception as err:  # zip/format errors of a damaged file
        raise NetLLMError(f"{path}: not a readable npz file ({err})") from None
    for key, shape in _ACTOR_SHAPES.items():
        if key not in arrays:
            raise NetLLMError(f"{path}: missing array {key!r} (not a Pensieve actor npz)")
        if arrays[key].shape != shape:
            raise NetLLMError(f"{path}: array {key!r} has shape {arrays[key].shape}, expected {shape}")
        if not np.all(np.isfinite(arrays[key])):
            raise NetLLMError(f"{path}: array {key!r} holds NaN or infinite values")
    return arrays


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


class PensieveActor:
    """A trained Pensieve-architecture actor (GENET, UDR): numpy forward pass.

    Branches (all ``relu(x @ W + b)``): last bitrate (obs[0, -1]), buffer (obs[1, -1]),
    throughput history (obs[2, :]), download-time history (obs[3, :]), next chunk sizes
    (obs[4, :6]), chunks left (obs[5, -1]). The "Conv1D" branches saw one time step with
    six channels and "same" padding, so only kernel tap 1 matters: ``row @ W[1, 0]``.
    Merge 768 -> 128 (relu), then 128 -> 3 softmax over down / keep / up. With
    ``sample=True`` the action is drawn from the softmax (per-env generators seeded from
    ``(seed, trace id)`` in :meth:`reset`), else the argmax.
    """

    def __init__(self, npz_path: str | Path, sample: bool = True, name: str | None = None) -> None:
        self.path = Path(npz_path)
        self.sample = bool(sample)
        stem = self.path.stem
        self.name = name or (stem[: -len("_actor")] if stem.endswith("_actor") else stem)
        w = load_actor_npz(self.path)
        self._w = w
        self._scalar_w = np.stack([w["FullyConnected.W"][0], w["FullyConnected_1.W"][0],
                                   w["FullyConnected_2.W"][0]])  # (3, 128)
        self._scalar_b = np.stack([w["FullyConnected.b"], w["FullyConnected_1.b"], w["FullyConnected_2.b"]])
        self._conv_w = np.stack([w[k][1, 0] for k in ("Conv1D.W", "Conv1D_1.W", "Conv1D_2.W")])  # (3, 6, 128)
        self._conv_b = np.stack([w[k] for k in ("Conv1D.b", "Conv1D_1.b", "Conv1D_2.b")])  # (3, 128)
        self._uniform: np.ndarray | None = None

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        """Softmax over (down, keep, up) for every env; obs (N, 6, 6) -> (N, 3) float64."""
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 3 or obs.shape[1:] != (6, 6):
            raise NetLLMError(f"{self.name}: observations must have shape (N, 6, 6), got {obs.shape}")
        scalars = obs[:, [0, 1, 5], -1]  # last bitrate, buffer, chunks left
        rows = np.stack([obs[:, 2, :], obs[:, 3, :], obs[:, 4, :NUM_LEVELS]], axis=1)  # (N, 3, 6)
        s = _relu(scalars[:, :, None] * self._scalar_w[None] + self._scalar_b[None])  # (N, 3, 128)
        c = _relu(np.einsum("nkc,kcd->nkd", rows, self._conv_w) + self._conv_b[None])  # (N, 3, 128)
        merged = np.concatenate([s[:, 0], s[:, 1], c[:, 0], c[:, 1], c[:, 2], s[:, 2]], axis=1)
        hidden = _relu(merged @ self._w["FullyConnected_3.W"] + self._w["FullyConnected_3.b"])
        logits = (hidden @ self._w["FullyConnected_4.W"] + self._w["FullyConnected_4.b"]).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def reset(self, env: "BatchABREnv", seed: int) -> None:
        ids = getattr(env, "trace_ids", None)
        ids = np.arange(env.num_envs) if ids is None else np.asarray(ids)
        steps = int(env.video.sizes_bytes.shape[1])
        # One stream per session (seed, trace id, salt 1: apart from the env's noise stream),
        # so an env's actions do not depend on the other traces in the batch.
        self._uniform = np.stack([np.random.default_rng([int(seed), int(i), 1]).random(steps) for i in ids])

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        probs = self.probabilities(obs)
        if self.sample:
            if self._uniform is None:
                raise NetLLMError(f"{self.name}: call reset(env, seed) before act() when sampling")
            col = np.minimum(np.asarray(info["chunk_index"], dtype=np.int64), self._uniform.shape[1] - 1)
            u = self._uniform[np.arange(len(probs)), col]
            cdf = np.cumsum(probs, axis=1)
            cdf[:, -1] = np.inf  # rounding never lets u fall off the end
            action = np.argmax(cdf > u[:, None], axis=1)
        else:
            action = np.argmax(probs, axis=1)
        return np.clip(_last_level(obs, info) + action - 1, 0, TOP_LEVEL).astype(np.int64)


# ----------------------------------------------------------------------------- Oracle


class _Link:
    """Cumulative payload of each trace's bandwidth cycle, and its inverse, in one
    flat searchsorted table (rows kept apart by offsets). Time is "unwrapped": it counts
    seconds from the start of the cycle and grows past the period as the trace loops."""

    def __init__(self, traces: list[Trace]) -> None:
        times, cums, rates = [], [], []
        for tr in traces:
            t = np.asarray(tr.time_s, dtype=np.float64).copy()
            t[0] = 0.0  # the cycle starts at 0 (env.py does the same)
            r = np.asarray(tr.bandwidth_mbps, dtype=np.float64) * 1e6 / 8.0 * PAYLOAD_FRACTION
            times.append(t)
            cums.append(np.concatenate([[0.0], np.cumsum(r[1:] * np.diff(t))]))
            rates.append(np.concatenate([r[1:], [0.0]]))  # rate of the interval starting at i
        self.period_s = np.array([t[-1] for t in times])
        self.cycle_bytes = np.array([c[-1] for c in cums])
        lengths = np.array([len(t) for t in times])
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.last = self.start + lengths - 2  # last interval start of each row
        self._t_off = float(self.period_s.max()) * 2.0 + 1.0
        self._c_off = float(self.cycle_bytes.max()) * 2.0 + 1.0
        rows = np.repeat(np.arange(len(traces)), lengths)
        self.t = np.concatenate(times)
        self.cum = np.concatenate(cums)
        self.rate = np.concatenate(rates)
        self._t_key = self.t + rows * self._t_off
        self._c_key = self.cum + rows * self._c_off

    def bytes_at(self, rows: np.ndarray, time_s: np.ndarray) -> np.ndarray:
        """Payload bytes deliverable from cycle start up to ``time_s`` (unwrapped)."""
        period = self.period_s[rows]
        loops = np.floor(time_s / period)
        u = time_s - loops * period
        j = np.searchsorted(self._t_key, u + rows * self._t_off, side="right") - 1
        j = np.minimum(j, self.last[rows])  # u < period; guards float rounding only
        return loops * self.cycle_bytes[rows] + self.cum[j] + self.rate[j] * (u - self.t[j])

    def time_at(self, rows: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Earliest (unwrapped) time by which ``nbytes`` payload bytes have been delivered."""
        total = self.cycle_bytes[rows]
        over = nbytes >= total
        loops = None
        if over.any():  # past the end of the cycle (rare once positions are wrapped)
            loops = np.where(over, np.floor(nbytes / total), 0.0)
            nbytes = nbytes - loops * total
        j = np.searchsorted(self._c_key, nbytes + rows * self._c_off, side="right") - 1
        j = np.minimum(j, self.last[rows])
        rate = self.rate[j]
        # rate > 0 at every searched interval start; the guard only covers float rounding
        end = self.t[j] + (nbytes - self.cum[j]) / np.maximum(rate, 1e-300)
        end = np.minimum(end, self.t[j + 1])
        if loops is not None:
            end += loops * self.period_s[rows]
        return end

    def wrap(self, rows: np.ndarray, time_s: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(time, bytes) moved back into the first cycle (same point of the trace)."""
        loops = np.floor(time_s / self.period_s[rows])
        return time_s - loops * self.period_s[rows], nbytes - loops * self.cycle_bytes[rows]


def env_trace_position_s(env: "BatchABREnv") -> np.ndarray:
    """Each session's position in its trace cycle (s), read from the env's state.

    Relies on ``BatchABREnv._pos_s`` (seconds into the cycle, in ``[0, period)``), the
    only piece of the env's private state the oracle needs.
    """
    pos = getattr(env, "_pos_s", None)
    if pos is None:
        raise NetLLMError("oracle: the env exposes no trace position (_pos_s); call env.reset(seed) first")
    return np.asarray(pos, dtype=np.float64).copy()


class Oracle:
    """Offline-optimal bitrates from the known future bandwidth (an upper-bound baseline).

    Plans noise-free (delay = download + 80 ms) with dynamic programming over
    chunk x level x buffer, the buffer binned by ``bin_s``. Each DP cell keeps its best
    path's exact buffer and trace position, so a plan's simulated QoE is exact; binning
    only merges paths. The plan is made at the first ``act`` of an episode (from the
    env's trace positions) and re-made every ``replan_every`` chunks from the real state,
    which absorbs the env's delay noise.
    """

    name = "oracle"

    def __init__(self, bin_s: float = 0.25, replan_every: int = 8) -> None:
        if bin_s <= 0 or replan_every < 1:
            raise NetLLMError("oracle: bin_s must be > 0 and replan_every >= 1")
        self.bin_s, self.replan_every = float(bin_s), int(replan_every)
        self._env: Any = None

    def reset(self, env: "BatchABREnv", seed: int) -> None:
        self._env = env
        self._link = _Link(list(env.traces))
        self._sizes = np.asarray(env.video.sizes_bytes, dtype=np.float64)
        self._plan: np.ndarray | None = None  # (N, chunks) levels by chunk index
        self._planned_at = -1
        self.planned_qoe: np.ndarray | None = None  # noise-free QoE sum of the first plan

    def plan(self, first_chunk: int, level: np.ndarray, buffer_s: np.ndarray,
             position_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best levels for chunks ``first_chunk..end`` of every env from the given state.

        Returns (levels (N, chunks left), noise-free QoE sum of that plan (N,)).
        """
        link, sizes = self._link, self._sizes
        n_env = len(level)
        num_chunks = sizes.shape[1] - 1
        bins = int(round(BUFFER_CAP_MS / 1000.0 / self.bin_s)) + 1
        # Live cells of the current layer (flat): env, level, value, buffer, time, bytes.
        env_i = np.arange(n_env)
        lev = np.asarray(level, dtype=np.int64)
        value = np.zeros(n_env)
        buf = np.asarray(buffer_s, dtype=np.float64).copy()
        pos = np.asarray(position_s, dtype=np.float64).copy()
        got = link.bytes_at(env_i, pos)
        parents: list[np.ndarray] = []
        levels: list[np.ndarray] = []
        actions = np.arange(NUM_LEVELS)
        for chunk in range(first_chunk, num_chunks):
            m = len(env_i)
            pos, got = link.wrap(env_i, pos, got)
            e = np.repeat(env_i, NUM_LEVELS)
            a = np.tile(actions, m)
            src = np.repeat(np.arange(m), NUM_LEVELS)
            end_bytes = got[src] + sizes[a, chunk]
            end_pos = link.time_at(e, end_bytes)
            delay_s = (end_pos - pos[src]) + LINK_RTT_S
            rebuffer_s = np.maximum(delay_s - buf[src], 0.0)
            new_buf_ms = (np.maximum(buf[src] - delay_s, 0.0) + CHUNK_S) * 1000.0
            excess = new_buf_ms - BUFFER_CAP_MS
            sleep_ms = np.where(excess > 0, np.ceil(excess / DRAIN_SLEEP_MS) * DRAIN_SLEEP_MS, 0.0)
            new_buf = (new_buf_ms - sleep_ms) / 1000.0
            mbps = BITRATES_MBPS[a]
            new_value = (value[src] + mbps - REBUFFER_PENALTY * rebuffer_s
                         - SMOOTH_PENALTY * np.abs(mbps - BITRATES_MBPS[lev[src]]))
            cell = np.minimum(np.floor(new_buf / self.bin_s).astype(np.int64), bins - 1)
            key = (e * NUM_LEVELS + a) * bins + cell
            best = np.full(n_env * NUM_LEVELS * bins, -np.inf)
            np.maximum.at(best, key, new_value)
            winners = np.flatnonzero(new_value == best[key])
            owner = np.empty(len(best), dtype=np.int64)
            owner[key[winners]] = winners  # any winner of a tie will do
            keep = owner[np.flatnonzero(np.isfinite(best))]
            slept = sleep_ms[keep] > 0
            new_pos = end_pos[keep] + sleep_ms[keep] / 1000.0
            new_got = end_bytes[keep].copy()
            if slept.any():
                new_got[slept] = link.bytes_at(e[keep][slept], new_pos[slept])
            parents.append(src[keep])
            levels.append(a[keep])
            env_i, lev, value, buf = e[keep], a[keep], new_value[keep], new_buf[keep]
            pos, got = new_pos, new_got
        out = np.zeros((n_env, num_chunks - first_chunk), dtype=np.int64)
        if not parents:
            return out, np.zeros(n_env)
        # Best final cell of each env, then walk the parents back.
        top = np.full(n_env, -np.inf)
        np.maximum.at(top, env_i, value)
        final = np.empty(n_env, dtype=np.int64)
        winners = np.flatnonzero(value == top[env_i])
        final[env_i[winners]] = winners
        idx = final
        for step in range(len(parents) - 1, -1, -1):
            out[:, step] = levels[step][idx]
            idx = parents[step][idx]
        return out, top

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        env = self._env
        if env is None:
            raise NetLLMError("oracle: call reset(env, seed) before act()")
        next_chunk = int(np.asarray(info["chunk_index"]).max()) + 1
        if self._plan is None or next_chunk - self._planned_at >= self.replan_every:
            num_chunks = self._sizes.shape[1] - 1
            levels, total = self.plan(next_chunk, _last_level(obs, info), _buffer_s(obs, info),
                                      env_trace_position_s(env))
            if self._plan is None:
                self._plan = np.zeros((env.num_envs, num_chunks), dtype=np.int64)
                self.planned_qoe = total
            self._plan[:, next_chunk:] = levels
            self._planned_at = next_chunk
        return self._plan[:, min(next_chunk, self._plan.shape[1] - 1)].copy()


# ----------------------------------------------------------------------------- registry


def make_baseline(name: str, root: str | Path | None = None) -> ABRPolicy:
    """A baseline by name: one of :data:`BASELINES`. ``root`` overrides the data root
    (where ``abr/pretrained/<name>_actor.npz`` is looked up for the actors)."""
    if name == "bba":
        return BBA()
    if name == "mpc":
        return RobustMPC()
    if name == "oracle":
        return Oracle()
    if name in ACTOR_NAMES:
        from netllm.data import data_root

        base = Path(root) if root is not None else data_root()
        path = base / "abr" / "pretrained" / f"{name}_actor.npz"
        if not path.is_file():
            raise NetLLMError(f"{path}: pretrained ABR actor {name!r} not found; "
                              "run `netllm data fetch abr` (or set NETLLM_DATA)")
        return PensieveActor(path, sample=True, name=name)
    raise NetLLMError(f"unknown ABR baseline {name!r}; choose one of: {', '.join(BASELINES)}")
