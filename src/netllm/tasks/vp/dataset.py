"""Viewport traces of 360° video viewers: loaders, the spec's splits, sample windows.

    traces = load_split("Jin2022", "test")            # {(video, user): (T, 3) roll/pitch/yaw}
    samples = make_windows(traces, WindowSpec())      # history (N, 10, 3), future (N, 20, 3)
    mae = angular_error(pred, samples.future).mean()  # degrees, yaw wrap-around aware

Files live at ``<data root>/vp/viewports/<dataset>/video<V>/5Hz/simple_5Hz_user<U>.csv``:
no header, columns ``timestamp_s, roll_deg, pitch_deg, yaw_deg``; yaw wraps at ±180.

Windows follow upstream NetLLM: for ``t`` in ``range(trim_head, T - trim_tail, step)``
the history is ``trace[t - hw : t]`` and the future ``trace[t : t + fw]``, with
``trim_head = 3·hw`` and ``trim_tail = 3·fw`` by default.

Wrap-around: the error of an angle is ``min(|a-b|, |a-b+360|, |a-b-360|)``
(:func:`angular_error`); models see orientations relative to the last observed one,
wrapped into [-180, 180) (:func:`wrap`), so a viewer turning across ±180° looks like
a small motion, not a 360° jump.

Dirty files: a csv with an unusable row (wrong column count, non-numeric, NaN/inf), a
timestamp that does not increase, no rows, or too few rows for a single window is left
out of :func:`load_samples` / :func:`load_split` / :func:`load_traces` with one WARNING
line on the ``netllm.data`` logger naming the file and the reason; the rest loads::

    samples = load_samples("Wu2017", "train")
    samples.skipped                        # [SkippedFile(path, reason), ...]
    samples.num_traces, len(samples.skipped)   # files loaded / files skipped

``strict=True`` raises :class:`~netllm.utils.BadDataFile` (a NetLLMError, one line:
``<path>:<line>: <reason>``) instead. If every selected file is skipped, that is a
NetLLMError naming the data set and saying all N files were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netllm.data import dataset_path
from netllm.utils import BadDataFile, NetLLMError, SkippedFile, all_skipped_error, skip_bad_file

FREQUENCY_HZ = 5
DATASETS = ("Jin2022", "Wu2017")
SPLIT_NAMES = ("train", "valid", "test")

# (videos, users) of each split: a test sample is an unseen user on an unseen video.
SPLITS: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "Jin2022": {
        "train": ((1, 5, 9, 2, 6, 11, 15, 16, 13, 17, 21, 22, 26, 19, 23),
                  (50, 54, 6, 34, 66, 63, 52, 39, 62, 46, 75, 28, 65, 18, 37, 13, 80, 33, 69, 78, 19,
                   40, 10, 43, 61, 72, 56, 41, 79, 82, 27, 71, 57, 67, 8, 2, 12, 81, 1, 64, 32, 42)),
        "valid": ((3, 7, 12, 10, 20, 27),
                  (9, 25, 73, 29, 31, 70, 58, 11, 14, 38, 16, 76, 77, 74, 24, 5, 17, 20, 51, 68, 36)),
        "test": ((4, 8, 14, 18, 24, 25),
                 (83, 15, 3, 35, 48, 22, 55, 4, 45, 60, 26, 21, 44, 23, 53, 84, 59, 49, 7, 47, 30)),
    },
    "Wu2017": {
        "train": ((9, 7, 4, 1, 6),
                  (23, 3, 19, 24, 18, 28, 9, 26, 6, 15, 21, 25, 32, 38, 45, 34, 48, 44, 29, 43, 4, 36,
                   39, 8, 17, 42, 30, 11, 22, 37)),
        "valid": ((8, 2), (40, 20, 14, 1, 31, 12, 33, 27, 10)),
        "test": ((3, 5), (16, 7, 46, 5, 35, 2, 41, 47, 13)),
    },
}
# Every video / user id the data sets hold (for "unknown id" errors).
ALL_VIDEOS = {"Jin2022": tuple(range(1, 28)), "Wu2017": tuple(range(1, 10))}
ALL_USERS = {"Jin2022": tuple(range(1, 85)), "Wu2017": tuple(range(1, 49))}

Key = tuple[int, int]  # (video, user)
VIDEO_OFFSET = 1000  # video ids of the second data set in Samples.concat


@dataclass(frozen=True)
class WindowSpec:
    """History / future windows (in samples at 5 Hz) and how traces are cut into samples."""

    hw: int = 10
    fw: int = 20
    trim_head: int | None = None  # default 3 * hw
    trim_tail: int | None = None  # default 3 * fw
    step: int = 15

    def __post_init__(self) -> None:
        for name in ("hw", "fw", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NetLLMError(f"--{name.replace('_', '-')}: must be a positive integer, got {value!r}")
        for name in ("trim_head", "trim_tail"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise NetLLMError(f"--{name.replace('_', '-')}: must be an integer >= 0, got {value!r}")

    @property
    def head(self) -> int:
        return max(self.hw, 3 * self.hw if self.trim_head is None else self.trim_head)

    @property
    def tail(self) -> int:
        return max(self.fw, 3 * self.fw if self.trim_tail is None else self.trim_tail)

    def to_dict(self) -> dict[str, int]:
        return {"hw": self.hw, "fw": self.fw, "trim_head": self.head, "trim_tail": self.tail, "step": self.step}


@dataclass
class Samples:
    """Windows cut from traces: arrays in degrees plus where each sample came from."""

    history: np.ndarray  # (N, hw, 3) roll, pitch, yaw
    future: np.ndarray  # (N, fw, 3)
    video: np.ndarray  # (N,) int
    user: np.ndarray  # (N,) int
    t: np.ndarray  # (N,) index of the first future sample
    skipped: list[SkippedFile] = field(default_factory=list)  # files the loader left out

    def __len__(self) -> int:
        return len(self.history)

    @property
    def num_traces(self) -> int:
        """How many (video, user) traces the samples come from (files loaded)."""
        return len(set(zip(self.video.tolist(), self.user.tolist())))

    def subset(self, idx: np.ndarray | slice) -> "Samples":
        return Samples(self.history[idx], self.future[idx], self.video[idx], self.user[idx], self.t[idx],
                       list(self.skipped))

    @staticmethod
    def concat(parts: "list[Samples]") -> "Samples":
        """The windows of several data sets in one; the video ids of part ``i`` are offset
        by ``1000 * i`` so that (video, user) still names one trace."""
        return Samples(np.concatenate([p.history for p in parts]), np.concatenate([p.future for p in parts]),
                       np.concatenate([p.video + VIDEO_OFFSET * i for i, p in enumerate(parts)]),
                       np.concatenate([p.user for p in parts]), np.concatenate([p.t for p in parts]),
                       [f for p in parts for f in p.skipped])


# ----------------------------------------------------------------------------- angles


def wrap(deg: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-180, 180)."""
    return (np.asarray(deg) + 180.0) % 360.0 - 180.0


def angular_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-element error in degrees, ``min(|a-b|, |a-b+360|, |a-b-360|)`` (spec metric)."""
    diff = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    return np.minimum(diff, np.minimum(np.abs(diff - 360.0), np.abs(diff + 360.0)))


def relative(history: np.ndarray, future: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Orientations relative to the last observed one, wrapped into [-180, 180)."""
    last = history[:, -1:, :]
    rel_future = None if future is None else wrap(future - last)
    return wrap(history - last), rel_future


def mirror_signs(flip: np.ndarray) -> np.ndarray:
    """(N,) booleans -> (N, 3) factors on (roll, pitch, yaw): a flipped window is the
    mirror image of its head motion (yaw and roll negated, pitch kept)."""
    signs = np.ones((len(flip), 3), dtype=np.float32)
    signs[np.asarray(flip, dtype=bool)] = (-1.0, 1.0, -1.0)
    return signs


def from_relative(history: np.ndarray, rel_future: np.ndarray) -> np.ndarray:
    """Absolute predictions from offsets to the last observed orientation (yaw wrapped)."""
    out = history[:, -1:, :] + rel_future
    out[..., 2] = wrap(out[..., 2])
    return out


# ----------------------------------------------------------------------------- loading


def trace_path(dataset: str, video: int, user: int, root: str | Path | None = None) -> Path:
    name = f"simple_{FREQUENCY_HZ}Hz_user{user}.csv"
    return dataset_path("vp", "viewports", dataset, f"video{video}", f"{FREQUENCY_HZ}Hz", name, root=root)


def load_trace(path: str | Path) -> np.ndarray:
    """One viewport csv -> (T, 3) float64 roll, pitch, yaw in degrees; checked.

    Unusable content raises :class:`BadDataFile` (a NetLLMError); a missing file or an
    OS error raises NetLLMError.
    """
    path = Path(path)
    if not path.is_file():
        raise NetLLMError(f"{path}: viewport trace not found")
    rows: list[list[float]] = []
    lines: list[int] = []  # file line number of each row
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise BadDataFile(path, f"unreadable viewport trace: {e}") from None
    except OSError as e:
        raise NetLLMError(f"{path}: unreadable viewport trace: {e}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split(",")
        if len(cells) != 4:
            raise BadDataFile(
                path, f"expected 4 columns (timestamp_s, roll_deg, pitch_deg, yaw_deg), found {len(cells)}", n
            )
        try:
            values = [float(c) for c in cells]
        except ValueError:
            raise BadDataFile(path, f"non-numeric value in {line.strip()!r}", n) from None
        if not all(np.isfinite(values)):
            raise BadDataFile(path, f"NaN or infinite value in {line.strip()!r}", n)
        rows.append(values)
        lines.append(n)
    if not rows:
        raise BadDataFile(path, "empty viewport trace")
    data = np.asarray(rows, dtype=np.float64)
    back = np.flatnonzero(np.diff(data[:, 0]) <= 0)
    if back.size:
        i = int(back[0]) + 1
        raise BadDataFile(path, f"timestamp does not increase ({data[i - 1, 0]:g} then {data[i, 0]:g})", lines[i])
    angles = data[:, 1:]
    if np.any(np.abs(angles) > 360.0):
        raise BadDataFile(path, f"angle outside [-360, 360] degrees ({np.abs(angles).max():.1f})")
    return angles


def _check_dataset(dataset: str) -> None:
    if dataset not in SPLITS:
        raise NetLLMError(f"--dataset: unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")


def split_ids(dataset: str, split: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    _check_dataset(dataset)
    if split not in SPLITS[dataset]:
        raise NetLLMError(f"--split: unknown split {split!r}; choose from {', '.join(SPLIT_NAMES)}")
    return SPLITS[dataset][split]


def load_traces(dataset: str, videos: tuple[int, ...] | list[int], users: tuple[int, ...] | list[int],
                root: str | Path | None = None, *, strict: bool = False,
                skipped: list[SkippedFile] | None = None) -> dict[Key, np.ndarray]:
    """The traces of every (video, user) pair; unknown ids name the option.

    A file with unusable content is left out with a WARNING on ``netllm.data`` and
    appended to ``skipped`` (when given); ``strict=True`` raises :class:`BadDataFile`
    instead. Every file bad: NetLLMError naming the data set.
    """
    _check_dataset(dataset)
    for v in videos:
        if v not in ALL_VIDEOS[dataset]:
            raise NetLLMError(f"--videos: unknown {dataset} video {v!r} (valid: 1..{ALL_VIDEOS[dataset][-1]})")
    for u in users:
        if u not in ALL_USERS[dataset]:
            raise NetLLMError(f"--users: unknown {dataset} user {u!r} (valid: 1..{ALL_USERS[dataset][-1]})")
    traces: dict[Key, np.ndarray] = {}
    bad: list[SkippedFile] = []
    for v in videos:
        for u in users:
            try:
                traces[(v, u)] = load_trace(trace_path(dataset, v, u, root))
            except BadDataFile as e:
                skip_bad_file(e, bad, strict)
    if bad and not traces:
        raise all_skipped_error(_selection(dataset, videos, users, root), bad)
    if skipped is not None:
        skipped.extend(bad)
    return traces


def _selection(dataset: str, videos: tuple[int, ...] | list[int], users: tuple[int, ...] | list[int],
               root: str | Path | None, split: str | None = None) -> str:
    folder = dataset_path("vp", "viewports", dataset, root=root)
    what = f"{dataset}/{split}" if split else dataset
    return f"{what} ({folder}, {len(videos)} videos x {len(users)} users)"


def load_split(dataset: str, split: str, root: str | Path | None = None, *, strict: bool = False,
               skipped: list[SkippedFile] | None = None) -> dict[Key, np.ndarray]:
    videos, users = split_ids(dataset, split)
    return load_traces(dataset, videos, users, root, strict=strict, skipped=skipped)


def make_windows(traces: dict[Key, np.ndarray], spec: WindowSpec = WindowSpec(),
                 where: str = "traces") -> Samples:
    """Cut every trace into (history, future) windows; a trace too short names the options."""
    hist, fut, vid, usr, ts = [], [], [], [], []
    for (video, user), trace in traces.items():
        starts = range(spec.head, len(trace) - spec.tail, spec.step)
        if len(starts) == 0:
            raise NetLLMError(
                f"--hw/--fw: windows (trim_head={spec.head}, trim_tail={spec.tail}) do not fit the "
                f"{len(trace)}-sample trace of video {video} user {user} in {where}"
            )
        for t in starts:
            hist.append(trace[t - spec.hw:t])
            fut.append(trace[t:t + spec.fw])
            vid.append(video)
            usr.append(user)
            ts.append(t)
    if not hist:
        raise NetLLMError(f"{where}: no traces to cut into windows")
    return Samples(np.stack(hist), np.stack(fut), np.array(vid), np.array(usr), np.array(ts))


def load_training_samples(dataset: str, split: str, spec: WindowSpec = WindowSpec(),
                          root: str | Path | None = None) -> Samples:
    """The windows a recipe trains or validates on: one data set's split, or with
    ``dataset="both"`` the split of every data set together (:meth:`Samples.concat`)."""
    if dataset == "both":
        return Samples.concat([load_samples(d, split, spec, root) for d in DATASETS])
    return load_samples(dataset, split, spec, root)


def load_samples(dataset: str, split: str, spec: WindowSpec = WindowSpec(),
                 root: str | Path | None = None, *, strict: bool = False) -> Samples:
    """Windows of a split. Files left out (bad content, or too short for one window) are in
    ``.skipped``, each logged once on ``netllm.data``; ``strict=True`` raises instead."""
    skipped: list[SkippedFile] = []
    traces = load_split(dataset, split, root, strict=strict, skipped=skipped)
    fits, short = {}, []
    for (v, u), trace in traces.items():
        if len(trace) > spec.head + spec.tail:
            fits[(v, u)] = trace
        else:
            short.append(BadDataFile(
                trace_path(dataset, v, u, root),
                f"too short: {len(trace)} samples, a window needs more than trim_head + trim_tail = "
                f"{spec.head} + {spec.tail} (--hw/--fw)"))
    if traces and not fits:
        videos, users = split_ids(dataset, split)
        everything = skipped + [SkippedFile(e.path, e.reason) for e in short]
        raise all_skipped_error(_selection(dataset, videos, users, root, split), everything)
    for e in short:
        skip_bad_file(e, skipped, strict)
    samples = make_windows(fits, spec, where=f"{dataset}/{split}")
    samples.skipped = skipped
    return samples


def synthetic_traces(videos: int = 3, users: int = 4, length: int = 300, seed: int = 0) -> dict[Key, np.ndarray]:
    """Smooth random head motion (AR(1) angular velocity; yaw wraps), for tests without data."""
    rng = np.random.default_rng(seed)
    out: dict[Key, np.ndarray] = {}
    for v in range(1, videos + 1):
        for u in range(1, users + 1):
            vel = np.zeros(3)
            pos = np.array([0.0, rng.uniform(-20, 20), rng.uniform(-180, 180)])
            rows = []
            for _ in range(length):
                vel = 0.9 * vel + rng.normal(0.0, [0.3, 1.0, 4.0])
                pos = pos + vel
                pos[0] = np.clip(pos[0], -30, 30)
                pos[1] = np.clip(pos[1], -89, 89)
                pos[2] = wrap(pos[2])
                rows.append(pos.copy())
            out[(v, u)] = np.asarray(rows)
    return out
