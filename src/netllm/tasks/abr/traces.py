"""Bandwidth traces and videos for the ABR simulator: loaders, checks, generators.

    traces = load_traces("fcc-test")          # <data root>/abr/traces/test/fcc-test/*
    traces = load_traces("/my/traces")        # any folder of "time_s bandwidth_Mbps" files
    video = load_video("video1")              # <data root>/abr/videos/video1_sizes/
    traces = synthetic_traces(100, seed=0)    # Markov bandwidth generator, no data needed
    video = synthetic_video(seed=0)

Every error a user can cause (missing file, non-numeric value, NaN, negative value,
too few lines, time not increasing, wrong line count) raises :class:`NetLLMError`
naming the file (and the line where there is one).

Dirty folders: :func:`load_traces` on a folder skips a file with unusable content (bad
row, NaN/inf, negative value, time not increasing, fewer than 2 samples, zero bandwidth
everywhere) with one WARNING line on the ``netllm.data`` logger naming the file and the
reason; the rest loads. The result is a :class:`TraceSet`, a plain list of traces that
also carries ``.skipped`` (``[SkippedFile(path, reason), ...]``)::

    traces = load_traces("fcc-test")
    len(traces), len(traces.skipped)          # files loaded / files skipped

``strict=True`` raises :class:`~netllm.utils.BadDataFile` (a NetLLMError, one line:
``<path>:<line>: <reason>``) instead; a folder in which every file is bad is a
NetLLMError naming the folder and saying all N files were skipped.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netllm.data import dataset_path, load_verified_pickle
from netllm.utils import BadDataFile, NetLLMError, SkippedFile, all_skipped_error, skip_bad_file

BITRATES_KBPS = np.array([300, 750, 1200, 1850, 2850, 4300])
CHUNK_S = 4.0
NUM_LEVELS = len(BITRATES_KBPS)

TRACE_SPLITS = {"fcc-train": "train", "fcc-valid": "valid", "fcc-test": "test"}
# Content-disjoint parts of fcc-train (upstream's fcc-valid only repeats fcc-train traces,
# and 42 of fcc-test's 100 traces are fcc-train traces): fcc-holdout validates, fcc-pool
# is what experience pools play. See :func:`derived_set`.
HOLDOUT_FROM = 200  # fcc-train's traces (in name order) from the 201st on are held out
DERIVED_SETS = ("fcc-pool", "fcc-holdout")
TRACE_SETS = (*TRACE_SPLITS, *DERIVED_SETS)
VIDEOS = ("video1", "video2")


@dataclass
class Trace:
    """One bandwidth trace: ``bandwidth_mbps[i]`` holds over ``(time_s[i-1], time_s[i]]``."""

    name: str
    time_s: np.ndarray  # float64, starts at 0 (for the data sets), strictly increasing
    bandwidth_mbps: np.ndarray  # float64, >= 0

    def __len__(self) -> int:
        return len(self.time_s)

    @property
    def duration_s(self) -> float:
        return float(self.time_s[-1])

    def check(self) -> "Trace":
        """Validate a trace built in code (the loaders validate while parsing)."""
        time_s = np.asarray(self.time_s, dtype=np.float64)
        bw = np.asarray(self.bandwidth_mbps, dtype=np.float64)
        where = f"trace {self.name!r}"
        if time_s.ndim != 1 or bw.shape != time_s.shape:
            raise NetLLMError(f"{where}: time_s and bandwidth_mbps must be 1-D arrays of equal length")
        _check_columns(time_s, bw, where, lines=None)
        self.time_s, self.bandwidth_mbps = time_s, bw
        return self


def _check_columns(time_s: np.ndarray, bw: np.ndarray, where: str, lines: list[int] | None) -> None:
    """Raises BadDataFile for a file (``lines`` given), NetLLMError for a trace built in code."""

    def fail(i: int | None, reason: str) -> NetLLMError:
        if lines is not None:
            return BadDataFile(where, reason, None if i is None else lines[i])
        return NetLLMError(f"{where}: {reason}" if i is None else f"{where} (sample {i}): {reason}")

    if len(time_s) < 2:
        raise fail(None, f"a trace needs at least 2 samples, found {len(time_s)}")
    for name, col in (("time", time_s), ("bandwidth", bw)):
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            raise fail(bad[0], f"{name} is not a finite number ({col[bad[0]]})")
        neg = np.flatnonzero(col < 0)
        if neg.size:
            raise fail(neg[0], f"{name} is negative ({col[neg[0]]})")
    back = np.flatnonzero(np.diff(time_s) <= 0)
    if back.size:
        i = back[0] + 1
        raise fail(i, f"time does not increase ({time_s[i - 1]} then {time_s[i]})")
    # The download loop only ever uses samples 1..L-1; all zero would never finish a chunk.
    if not np.any(bw[1:] > 0):
        raise fail(None, "bandwidth is zero everywhere; no chunk could ever download")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise NetLLMError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadDataFile(path, "not a text file") from None
    except OSError as exc:
        raise NetLLMError(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a ``time_s<whitespace>bandwidth_Mbps`` file (one sample a line, blank lines ignored).

    Unusable content raises :class:`BadDataFile` (a NetLLMError); a missing file NetLLMError.
    """
    path = Path(path)
    text = _read_text(path, "trace file")
    times: list[float] = []
    bws: list[float] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise BadDataFile(path, f"expected 'time_s bandwidth_Mbps', got {line.strip()!r}", number)
        try:
            t, b = float(fields[0]), float(fields[1])
        except ValueError:
            raise BadDataFile(path, f"not a number in {line.strip()!r}", number) from None
        times.append(t)
        bws.append(b)
        lines.append(number)
    time_s = np.array(times, dtype=np.float64)
    bw = np.array(bws, dtype=np.float64)
    _check_columns(time_s, bw, str(path), lines)
    return Trace(name=path.name, time_s=time_s, bandwidth_mbps=bw)


def _trace_files(folder: Path) -> list[Path]:
    """Trace files of a folder: regular, non-hidden files, sorted by name (``*.pkl`` skipped:
    the FCC test folder carries upstream's start-pointer pickle beside its traces)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".pkl"
    )


class TraceSet(list):
    """The traces :func:`load_traces` read: a plain ``list[Trace]`` (index, slice, iterate as
    before; a slice is a plain list) that also carries the files it left out."""

    def __init__(self, traces: Iterable[Trace] = (), skipped: list[SkippedFile] | None = None) -> None:
        super().__init__(traces)
        self.skipped: list[SkippedFile] = list(skipped or [])


def content_key(trace: Trace) -> str:
    """A hash of a trace's samples: equal for byte-identical copies under other names."""
    h = hashlib.sha256(np.ascontiguousarray(trace.time_s, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(trace.bandwidth_mbps, dtype=np.float64).tobytes())
    return h.hexdigest()


def copies_of(traces: Iterable[Trace], of: Iterable[Trace]) -> set[str]:
    """Names of the ``traces`` whose samples equal a trace of ``of`` (upstream's splits
    overlap: every fcc-valid trace and 42 of the 100 fcc-test traces are fcc-train traces)."""
    seen = {content_key(t) for t in of}
    return {t.name for t in traces if content_key(t) in seen}


def load_traces(spec: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, *,
                strict: bool = False) -> TraceSet:
    """``fcc-train`` | ``fcc-valid`` | ``fcc-test`` (from the data root) or a folder of trace files.

    A file with unusable content is left out, logged once on ``netllm.data`` and listed in
    the result's ``.skipped``; ``strict=True`` raises :class:`BadDataFile` instead. A folder
    whose every file is bad raises NetLLMError. A single file given as ``spec`` must be good.
    """
    if isinstance(spec, str) and spec in DERIVED_SETS:
        return derived_set(spec, root, strict=strict)
    if isinstance(spec, str) and spec in TRACE_SPLITS:
        folder = dataset_path("abr", "traces", TRACE_SPLITS[spec], spec, root=root)
    else:
        folder = Path(spec)
        if not folder.exists():
            names = ", ".join(TRACE_SETS)
            raise NetLLMError(f"trace set {str(spec)!r}: no such folder (or use one of {names})")
        if folder.is_file():
            return TraceSet([load_trace(folder)])
    files = _trace_files(folder)
    if not files:
        raise NetLLMError(f"trace folder {folder} holds no trace files")
    traces: list[Trace] = []
    skipped: list[SkippedFile] = []
    for f in files:
        try:
            traces.append(load_trace(f))
        except BadDataFile as e:
            skip_bad_file(e, skipped, strict)
    if not traces:
        raise all_skipped_error(f"trace folder {folder}", skipped)
    return TraceSet(traces, skipped)


def require_set(spec: str) -> None:
    """A one-line error if a named trace set's folders are not in the data root (folders pass)."""
    for name in (("fcc-train", "fcc-test") if spec in DERIVED_SETS else (spec,) if spec in TRACE_SPLITS else ()):
        dataset_path("abr", "traces", TRACE_SPLITS[name], name)


def derived_set(name: str, root: str | os.PathLike[str] | None = None, *, strict: bool = False) -> TraceSet:
    """``fcc-holdout``: fcc-train's traces from the 201st on (name order) that are no copy
    of an fcc-test trace (34 of 35); ``fcc-pool``: fcc-train's first 200 less the copies of
    an fcc-holdout or fcc-test trace (159). Pools, validation and test are then disjoint by
    content (sha256 of the samples, :func:`content_key`)."""
    train, test = load_traces("fcc-train", root, strict=strict), load_traces("fcc-test", root, strict=strict)
    late = train[HOLDOUT_FROM:]
    holdout = [t for t in late if t.name not in copies_of(late, test)]
    if name == "fcc-holdout":
        return TraceSet(holdout, train.skipped)
    if name != "fcc-pool":
        raise NetLLMError(f"trace set {name!r}: not a derived set ({', '.join(DERIVED_SETS)})")
    early = train[:HOLDOUT_FROM]
    seen = copies_of(early, holdout) | copies_of(early, test)
    return TraceSet([t for t in early if t.name not in seen], train.skipped)


def upstream_start_indices(
    spec: str | os.PathLike[str] = "fcc-test", root: str | os.PathLike[str] | None = None,
    traces: list[Trace] | None = None,
) -> np.ndarray | None:
    """The fixed start positions upstream evaluates a trace set from, or None if it has none.

    The FCC test folder ships ``mahimahi_ptrs.pkl``: one start index per trace file, in
    file-name order. It is a pickle, so it is read only after its sha256 matches the data
    manifest. ``traces`` (what :func:`load_traces` returned for the folder, perhaps with
    files skipped): the start index of each of those traces, matched by file name.
    """
    if isinstance(spec, str) and spec in TRACE_SPLITS:
        folder = dataset_path("abr", "traces", TRACE_SPLITS[spec], spec, root=root)
    else:
        folder = Path(spec)
    path = folder / "mahimahi_ptrs.pkl"
    if not path.is_file():
        return None
    starts = load_verified_pickle(path)
    try:
        arr = np.asarray(starts, dtype=np.int64)
    except (TypeError, ValueError):
        raise NetLLMError(f"{path}: expected a list of integer start indices") from None
    if arr.ndim != 1 or len(arr) != len(_trace_files(folder)):
        raise NetLLMError(
            f"{path}: expected one start index per trace file ({len(_trace_files(folder))}), got {arr.shape}"
        )
    if traces is not None:
        index = {f.name: i for i, f in enumerate(_trace_files(folder))}
        missing = [t.name for t in traces if t.name not in index]
        if missing:
            raise NetLLMError(f"{path}: no start index for trace {missing[0]!r} (not a file of {folder})")
        arr = arr[[index[t.name] for t in traces]]
    return arr


def synthetic_traces(
    n: int,
    seed: int,
    low_mbps: float = 0.2,
    high_mbps: float = 6.0,
    duration_s: float = 320,
    interval_s: float = 1.0,
    num_states: int = 10,
    switch_prob: tuple[float, float] = (0.02, 0.2),
    noise_cov: tuple[float, float] = (0.02, 0.15),
) -> list[Trace]:
    """Markov-chain bandwidth traces (the kind Pensieve and Genet train on).

    Each trace picks its own switching probability and noise level. The hidden state is
    one of ``num_states`` log-spaced bandwidths in ``[low_mbps, high_mbps]``; every
    ``interval_s`` it moves, with the trace's switching probability, to another state
    (nearer states more likely); the sample is the state's bandwidth times a Gaussian
    factor, clipped to ``[low_mbps, high_mbps]``.
    """
    if n < 0:
        raise NetLLMError(f"synthetic traces: n must be >= 0, got {n}")
    if not (0 < low_mbps < high_mbps) or not math.isfinite(high_mbps):
        raise NetLLMError(
            f"synthetic traces: need 0 < low_mbps < high_mbps, got {low_mbps} and {high_mbps}"
        )
    if not (duration_s > interval_s > 0):
        raise NetLLMError(
            f"synthetic traces: need duration_s > interval_s > 0, got {duration_s} and {interval_s}"
        )
    rng = np.random.default_rng(seed)
    states = np.geomspace(low_mbps, high_mbps, num_states)
    steps = int(round(duration_s / interval_s)) + 1
    time_s = np.arange(steps, dtype=np.float64) * interval_s
    distance = np.abs(np.arange(num_states)[:, None] - np.arange(num_states)[None, :]).astype(float)
    jump = np.where(distance > 0, np.exp(-distance / 2.0), 0.0)
    jump /= jump.sum(axis=1, keepdims=True)
    traces = []
    for i in range(n):
        p_switch = rng.uniform(*switch_prob)
        cov = rng.uniform(*noise_cov)
        state = rng.integers(num_states)
        bw = np.empty(steps)
        for t in range(steps):
            if t and rng.random() < p_switch:
                state = rng.choice(num_states, p=jump[state])
            bw[t] = states[state] * (1.0 + cov * rng.standard_normal())
        bw = np.clip(bw, low_mbps, high_mbps)
        traces.append(Trace(name=f"synthetic_{seed}_{i:04d}", time_s=time_s.copy(), bandwidth_mbps=bw))
    return traces


# Held-out network conditions for testing (``variable``): more variable than any trace
# ``netllm finetune abr --generated`` draws (switching 0.02-0.2 per second, noise
# 0.02-0.15) and never used for a choice. Tested with delay noise and random starts.
VARIABLE_TRACES = {"n": 100, "seed": 20261202, "low_mbps": 0.3, "high_mbps": 8.0, "switch_prob": (0.3, 0.6),
                   "noise_cov": (0.2, 0.35)}


def variable_traces() -> list[Trace]:
    """The ``variable`` test set: 100 Markov-chain traces, 0.3-8 Mbps, switching 0.3-0.6
    per second, noise 0.2-0.35 (``VARIABLE_TRACES``)."""
    spec = dict(VARIABLE_TRACES)
    return synthetic_traces(int(spec.pop("n")), **spec)  # type: ignore[arg-type]


@dataclass
class Video:
    """Chunk sizes of one video: ``sizes_bytes[level, chunk]``, shape (6, chunks + 1)."""

    name: str
    sizes_bytes: np.ndarray  # float64 (6 levels, 49); the last column is only a "next size"

    @property
    def num_chunks(self) -> int:
        return int(self.sizes_bytes.shape[1]) - 1


def _read_sizes(path: Path) -> np.ndarray:
    text = _read_text(path, "video size file")
    values: list[float] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = float(line.strip())
        except ValueError:
            raise NetLLMError(f"{path}:{number}: not a number: {line.strip()!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise NetLLMError(f"{path}:{number}: chunk size must be a positive number, got {value}")
        values.append(value)
    return np.array(values, dtype=np.float64)


def load_video(spec: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Video:
    """``video1`` | ``video2`` (from the data root) or a folder holding ``video_size_0..5``."""
    if isinstance(spec, str) and spec in VIDEOS:
        folder = dataset_path("abr", "videos", f"{spec}_sizes", root=root)
        name = spec
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise NetLLMError(
                f"video {str(spec)!r}: no such folder (or use one of {', '.join(VIDEOS)})"
            )
        name = folder.name
    columns = [_read_sizes(folder / f"video_size_{level}") for level in range(NUM_LEVELS)]
    expected = len(columns[0])
    if expected < 2:
        raise NetLLMError(
            f"{folder / 'video_size_0'}: needs at least 2 lines (chunks + the next size), found {expected}"
        )
    for level, col in enumerate(columns):
        if len(col) != expected:
            raise NetLLMError(
                f"{folder / f'video_size_{level}'}: has {len(col)} lines, "
                f"video_size_0 has {expected}; every level needs one line per chunk"
            )
    if name in VIDEOS and expected != 49:
        raise NetLLMError(f"{folder / 'video_size_0'}: expected 49 lines (48 chunks + 1), found {expected}")
    return Video(name=name, sizes_bytes=np.stack(columns))


def synthetic_video(seed: int, num_chunks: int = 48) -> Video:
    """A video whose chunk sizes follow the bitrate ladder with scene-like variation."""
    if num_chunks < 1:
        raise NetLLMError(f"synthetic video: num_chunks must be >= 1, got {num_chunks}")
    rng = np.random.default_rng(seed)
    nominal = BITRATES_KBPS.astype(np.float64) * 1000.0 / 8.0 * CHUNK_S  # bytes per chunk
    scene = np.exp(rng.normal(0.0, 0.2, size=num_chunks + 1))  # shared by every level
    per_level = np.exp(rng.normal(0.0, 0.05, size=(NUM_LEVELS, num_chunks + 1)))
    sizes = np.round(nominal[:, None] * scene[None, :] * per_level)
    return Video(name=f"synthetic_{seed}", sizes_bytes=np.maximum(sizes, 1.0))
