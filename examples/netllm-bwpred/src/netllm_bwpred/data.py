"""The data of bwpred: the ABR bandwidth traces, as 1 s series cut into windows.

bwpred has no data set of its own: it reads the traces of the ABR task
(``netllm data fetch abr``), or any folder of ``time_s bandwidth_Mbps`` files.

    traces = load_trace_set("fcc-test")       # a split of the ABR data, another trace
                                              # folder present there, or a folder path
    series = resample(traces[0])              # mean throughput of each 1 s step, Mbps
    w = windows(traces, stride=5)             # history (N, 10), future (N, 5), Mbps

Every value is a throughput in Mbps (megabits per second): ``series[k]`` is the
time-weighted mean bandwidth of the trace over the k-th second ``[t0 + k, t0 + k + 1)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from netllm.tasks.abr.traces import TRACE_SPLITS, Trace, copies_of, load_traces
from netllm.utils import NetLLMError

if TYPE_CHECKING:
    import torch

HISTORY_S = 10  # seconds of throughput the predictor sees
HORIZON_S = 5  # seconds it predicts, all at once
STEP_S = 1.0  # the resampling step

FETCH_HINT = "bwpred reads the ABR traces: run 'netllm data fetch abr' (or set NETLLM_DATA)"


# ----------------------------------------------------------------------------- trace sets


def present_trace_sets(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Every ABR trace folder under ``<data root>/abr/traces/<part>/<name>`` that holds
    files, by name: the splits of :data:`TRACE_SPLITS` and any further set dropped there."""
    from netllm.data import data_root

    base = (Path(root) if root is not None else data_root()) / "abr" / "traces"
    found: dict[str, Path] = {}
    if not base.is_dir():
        return found
    for part in sorted(p for p in base.iterdir() if p.is_dir()):
        for folder in sorted(p for p in part.iterdir() if p.is_dir()):
            if any(f.is_file() and not f.name.startswith(".") for f in folder.iterdir()):
                found.setdefault(folder.name, folder)
    return found


def load_trace_set(spec: str | os.PathLike[str]) -> list[Trace]:
    """A trace set: a split name (``fcc-train``, ``fcc-valid``, ``fcc-test``), the name of
    another trace folder present under ``<data root>/abr/traces/``, or a folder path."""
    text = str(spec)
    if text in TRACE_SPLITS:
        try:
            return load_traces(text)
        except NetLLMError as err:
            if "not found" in str(err):
                raise NetLLMError(f"trace set {text!r} not found; {FETCH_HINT}") from None
            raise
    if Path(text).exists():
        return load_traces(text)
    try:
        present = present_trace_sets()
    except NetLLMError:
        present = {}
    if text in present:
        return load_traces(present[text])
    names = ", ".join(sorted(set(TRACE_SPLITS) | set(present)))
    raise NetLLMError(f"trace set {text!r}: no such folder nor trace set (known: {names}); {FETCH_HINT}")


def check_trace_set(spec: str | os.PathLike[str]) -> None:
    """Fail early (before a run folder is written) when a trace set is missing."""
    text = str(spec)
    if text in TRACE_SPLITS:
        from netllm.data import dataset_path

        try:
            dataset_path("abr", "traces", TRACE_SPLITS[text], text)
        except NetLLMError:
            raise NetLLMError(f"trace set {text!r} not found; {FETCH_HINT}") from None
    elif not Path(text).exists():
        load_trace_set(text)  # a present set by name, or the error listing the known ones


def drop_copies(traces: Sequence[Trace], of: Sequence[Trace]) -> tuple[list[Trace], list[str]]:
    """``traces`` without those whose samples equal a trace of ``of``; (kept, dropped names)."""
    copies = copies_of(traces, of)
    return [t for t in traces if t.name not in copies], [t.name for t in traces if t.name in copies]


def split_train_valid(traces: Sequence[Trace], every: int) -> tuple[list[Trace], list[Trace]]:
    """Hold out every ``every``-th trace (in file-name order: positions every-1, 2*every-1, ...)
    for validation, whole, so no window of a validation trace is ever trained on."""
    if every < 2:
        raise NetLLMError(f"--valid-every: must be >= 2, got {every}")
    ordered = sorted(traces, key=lambda t: t.name)
    valid = [t for i, t in enumerate(ordered) if i % every == every - 1]
    train = [t for i, t in enumerate(ordered) if i % every != every - 1]
    if not train or not valid:
        raise NetLLMError(f"--valid-every {every}: {len(traces)} traces leave "
                          f"{len(train)} for training and {len(valid)} for validation; need both")
    return train, valid


# ----------------------------------------------------------------------------- series and windows


def resample(trace: Trace, step_s: float = STEP_S) -> np.ndarray:
    """Mean throughput (Mbps) of each whole ``step_s`` interval from the trace's start.

    ``bandwidth_mbps[i]`` holds over ``(time_s[i-1], time_s[i]]``, so the delivered
    megabits up to time t are piecewise linear in t; each step's mean is the difference
    of that integral at the step's ends, exact for any sample spacing (the FCC traces
    are ~1 s apart with gaps up to 5 s).
    """
    t = np.asarray(trace.time_s, dtype=np.float64)
    bw = np.asarray(trace.bandwidth_mbps, dtype=np.float64)
    delivered = np.concatenate([[0.0], np.cumsum(bw[1:] * np.diff(t))])  # Mb at time_s[i]
    count = int(np.floor((t[-1] - t[0]) / step_s + 1e-9))
    if count < 1:
        return np.zeros(0)
    edges = t[0] + step_s * np.arange(count + 1)
    return np.diff(np.interp(edges, t, delivered)) / step_s


@dataclass
class Windows:
    """(history, future) pairs of 1 s throughput samples, Mbps."""

    history: np.ndarray  # (N, HISTORY_S) float64
    future: np.ndarray  # (N, HORIZON_S) float64
    trace: np.ndarray  # (N,) index into names
    names: list[str]

    def __len__(self) -> int:
        return len(self.history)


def windows(traces: Sequence[Trace], stride: int, history_s: int = HISTORY_S,
            horizon_s: int = HORIZON_S) -> Windows:
    """Every window of ``history_s + horizon_s`` seconds, starting every ``stride`` seconds
    from each trace's start (no wrap-around; a trace shorter than a window gives none)."""
    if stride < 1:
        raise NetLLMError(f"--stride: must be >= 1, got {stride}")
    span = history_s + horizon_s
    hist, fut, idx = [], [], []
    for i, trace in enumerate(traces):
        series = resample(trace)
        if len(series) < span:
            continue
        cut = np.lib.stride_tricks.sliding_window_view(series, span)[::stride]
        hist.append(cut[:, :history_s])
        fut.append(cut[:, history_s:])
        idx.append(np.full(len(cut), i))
    if not hist:
        raise NetLLMError(f"no trace of {len(traces)} lasts the {span} s of one window "
                          f"({history_s} s history + {horizon_s} s horizon)")
    return Windows(np.concatenate(hist).copy(), np.concatenate(fut).copy(), np.concatenate(idx),
                   [t.name for t in traces])


# ----------------------------------------------------------------------------- normalisation
#
# Shared by the LSTM and NetLLM: throughput enters as log1p(Mbps) — the FCC/HSDPA samples
# span 0 to ~9 Mbps with a long upper tail, and log1p keeps zeros finite — in two channels
# per second: the level, and the offset to the last observed second. The models output
# log1p offsets to the last observed second; an output of zero IS the last-value predictor.

TRANSFORM = "log1p(Mbps)"


def log_channels(history: np.ndarray) -> np.ndarray:
    """(N, T) Mbps -> (N, 2, T): log1p level, and offset to the last second's log1p level."""
    x = np.log1p(np.maximum(np.asarray(history, dtype=np.float64), 0.0))
    return np.stack([x, x - x[:, -1:]], axis=1).astype(np.float32)


def from_offsets(last_mbps: "torch.Tensor", offsets: "torch.Tensor") -> "torch.Tensor":
    """(N,) last observed Mbps and (N, H) log1p offsets -> (N, H) predicted Mbps (>= 0)."""
    import torch

    return torch.expm1(torch.log1p(last_mbps.clamp_min(0.0)).unsqueeze(-1) + offsets).clamp_min(0.0)


def batches(w: Windows, batch_size: int, seed: int):  # -> Callable[[int], dict[str, Tensor]]
    """Deterministic ``get_batch(i)`` (the training loop's contract): epoch ``e`` visits a
    permutation of the windows seeded by ``seed + e``."""
    import torch

    channels = torch.as_tensor(log_channels(w.history))
    history = torch.as_tensor(w.history, dtype=torch.float32)
    future = torch.as_tensor(w.future, dtype=torch.float32)
    per_epoch = max(1, len(w) // batch_size)

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, per_epoch)
        perm = np.random.default_rng(seed + epoch).permutation(len(w))
        idx = torch.as_tensor(perm[j * batch_size:(j + 1) * batch_size])
        return {"channels": channels[idx], "last": history[idx, -1], "future": future[idx]}

    return get_batch
