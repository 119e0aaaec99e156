"""TPC-H job templates for the Spark scheduling simulator (Decima / spark-sched-sim data).

A job is a DAG of stages; each stage is a set of identical tasks whose run times were
measured on a real Spark cluster. On disk (``cjs/tpch/<size>/``, 22 queries x 7 input
sizes):

* ``adj_mat_<q>.npy`` — an ``n x n`` float array, ``adj[i, j] != 0`` means stage ``j``
  depends on stage ``i`` (edge ``i -> j``). Loaded with ``allow_pickle=False``.
* ``task_duration_<q>.npy`` — a pickled dict ``stage -> {'first_wave', 'rest_wave',
  'fresh_durations'}``, each ``{num_executors: [duration_ms, ...]}``. Unpickled only
  after its sha256 matched the data manifest (``netllm.data.load_verified_pickle``).

What a template holds is exactly what spark-sched-sim's TPC-H generator derives when it
builds a job, so the simulator can sample the same durations:

* ``num_tasks[s] = len(first_wave[e]) + len(rest_wave[e])`` for the first key ``e`` of
  the raw ``first_wave`` dict;
* ``first_wave`` is "cleaned": every duration that also appears in ``fresh_durations``
  (as a multiset) is removed, and an emptied list is replaced by the list of the next
  smaller executor key (in sorted key order);
* ``mean_duration_ms[s]``: the mean over all fresh, cleaned first-wave and rest-wave
  durations — the stage's "most recent task duration" before any task has run.

    tpl = load_query("10g", 7)                  # one template, validated
    templates = load_all()                      # {(q, size): JobTemplate}, cached
    toy = synthetic_templates(4, seed=0)        # tiny jobs for tests, no data needed
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from netllm.utils import NetLLMError

QUERY_SIZES: tuple[str, ...] = ("2g", "5g", "10g", "20g", "50g", "80g", "100g")
NUM_QUERIES = 22
WAVES: tuple[str, ...] = ("first_wave", "rest_wave", "fresh_durations")

Durations = Mapping[str, Mapping[int, list]]  # wave -> executor key -> durations (ms)


@dataclass(frozen=True, eq=False)
class JobTemplate:
    """An immutable job description: the stage DAG and per-stage task durations.

    ``edges`` is ``(E, 2)`` int64, parent -> child, sorted row-major (the order networkx
    lists the edges of ``from_numpy_array``). ``durations[s]`` is the preprocessed duration
    table of stage ``s`` (see the module docstring); treat it as read-only.
    """

    query: int
    size: str
    num_tasks: tuple[int, ...]
    edges: np.ndarray
    durations: tuple[Durations, ...]
    mean_duration_ms: tuple[float, ...]
    source: str = ""

    @property
    def name(self) -> str:
        return f"TPCH_{self.query}_{self.size}"

    @property
    def num_stages(self) -> int:
        return len(self.num_tasks)

    @cached_property
    def parents(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.num_stages)]
        for i, j in self.edges.tolist():
            out[j].append(i)
        return tuple(tuple(p) for p in out)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.num_stages)]
        for i, j in self.edges.tolist():
            out[i].append(j)
        return tuple(tuple(c) for c in out)

    @cached_property
    def adjacency(self) -> np.ndarray:
        adj = np.zeros((self.num_stages, self.num_stages), dtype=bool)
        if len(self.edges):
            adj[self.edges[:, 0], self.edges[:, 1]] = True
        return adj

    @property
    def total_work_ms(self) -> float:
        """Rough total work: sum over stages of tasks x mean task duration."""
        return float(np.dot(self.num_tasks, self.mean_duration_ms))


# --------------------------------------------------------------------------- building


def _check_dag(edges: np.ndarray, n: int, source: str) -> None:
    """Raise NetLLMError naming ``source`` when the edges contain a cycle (Kahn's algorithm)."""
    indeg = np.zeros(n, dtype=np.int64)
    np.add.at(indeg, edges[:, 1], 1)
    children: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges.tolist():
        children[i].append(j)
    ready = [i for i in range(n) if indeg[i] == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for j in children[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if seen != n:
        stuck = sorted(int(i) for i in np.flatnonzero(indeg > 0))
        raise NetLLMError(f"{source}: the stage graph has a cycle (stages {stuck[:6]} never become ready)")


def edges_from_adjacency(adj: np.ndarray, source: str = "adjacency") -> np.ndarray:
    """Validate an adjacency matrix (square, finite, acyclic) and return its edge list."""
    adj = np.asarray(adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1] or adj.shape[0] == 0:
        raise NetLLMError(f"{source}: expected a non-empty square adjacency matrix, got shape {adj.shape}")
    if adj.dtype.kind not in "biuf":
        raise NetLLMError(f"{source}: adjacency matrix has non-numeric dtype {adj.dtype}")
    if adj.dtype.kind == "f" and not np.isfinite(adj).all():
        raise NetLLMError(f"{source}: adjacency matrix contains NaN or inf")
    edges = np.argwhere(adj != 0).astype(np.int64).reshape(-1, 2)
    if (edges[:, 0] == edges[:, 1]).any():
        raise NetLLMError(f"{source}: the stage graph has a cycle (a stage depends on itself)")
    _check_dag(edges, adj.shape[0], source)
    return edges


def _clean_first_wave(first: Mapping[int, list], fresh: Mapping[int, list]) -> dict[int, list]:
    """Drop fresh durations (as a multiset) from the first wave; fill empty keys upward."""
    clean: dict[int, list] = {}
    for key, values in first.items():
        left = Counter(fresh.get(key, ()))
        kept = []
        for d in values:
            if left[d] > 0:
                left[d] -= 1
            else:
                kept.append(d)
        clean[key] = kept
    previous: list = []
    for key in sorted(clean):
        if not clean[key]:
            clean[key] = previous
        previous = clean[key]
    return clean


def build_template(
    adjacency: np.ndarray,
    raw_durations: Mapping[int, Mapping[str, Mapping[int, list]]],
    query: int = 0,
    size: str = "synthetic",
    source: str = "job",
) -> JobTemplate:
    """A validated ``JobTemplate`` from an adjacency matrix and a raw duration table.

    ``raw_durations`` has the on-disk layout (``stage -> wave -> key -> [ms, ...]``).
    Raises NetLLMError naming ``source`` on any inconsistency.
    """
    edges = edges_from_adjacency(adjacency, source)
    n = int(np.asarray(adjacency).shape[0])
    if not isinstance(raw_durations, Mapping):
        raise NetLLMError(f"{source}: task durations must be a dict stage -> waves, got {type(raw_durations).__name__}")
    missing = [s for s in range(n) if s not in raw_durations]
    if missing:
        raise NetLLMError(f"{source}: no task durations for stage(s) {missing[:6]} of {n}")
    num_tasks, tables, means = [], [], []
    for s in range(n):
        stage = raw_durations[s]
        if not isinstance(stage, Mapping) or any(not isinstance(stage.get(w), Mapping) for w in WAVES):
            raise NetLLMError(f"{source}: stage {s} must map each of {', '.join(WAVES)} to a dict")
        first, rest, fresh = (stage[w] for w in WAVES)
        if not first:
            raise NetLLMError(f"{source}: stage {s} has an empty 'first_wave' table")
        for wave in WAVES:
            for key, values in stage[wave].items():
                if not isinstance(key, (int, np.integer)) or key < 1:
                    raise NetLLMError(f"{source}: stage {s} {wave}: bad executor key {key!r}")
                try:
                    arr = np.asarray(values, dtype=np.float64)
                except (TypeError, ValueError):
                    raise NetLLMError(f"{source}: stage {s} {wave}[{key}]: durations are not numbers") from None
                if arr.ndim != 1 or not np.isfinite(arr).all() or (arr < 0).any():
                    raise NetLLMError(f"{source}: stage {s} {wave}[{key}]: durations must be finite and >= 0")
        key0 = next(iter(first))
        count = len(first[key0]) + len(rest.get(key0, ()))
        if count < 1:
            raise NetLLMError(f"{source}: stage {s} has no tasks")
        clean_first = _clean_first_wave(first, fresh)
        table = {
            "first_wave": clean_first,
            "rest_wave": {k: list(v) for k, v in rest.items()},
            "fresh_durations": {k: list(v) for k, v in fresh.items()},
        }
        pooled = [d for v in table["fresh_durations"].values() for d in v]
        pooled += [d for v in clean_first.values() for d in v]
        pooled += [d for v in table["rest_wave"].values() for d in v]
        if not pooled:
            raise NetLLMError(f"{source}: stage {s} has no durations at all")
        num_tasks.append(int(count))
        tables.append(table)
        means.append(float(np.mean(pooled)))
    return JobTemplate(
        query=int(query), size=str(size), num_tasks=tuple(num_tasks), edges=edges,
        durations=tuple(tables), mean_duration_ms=tuple(means), source=source,
    )


# --------------------------------------------------------------------------- loading


def _check_query(size: str, q: int) -> None:
    if size not in QUERY_SIZES:
        raise NetLLMError(f"size: unknown TPC-H input size {size!r}; choose one of {', '.join(QUERY_SIZES)}")
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= NUM_QUERIES:
        raise NetLLMError(f"q: TPC-H query must be an integer in 1..{NUM_QUERIES}, got {q!r}")


def load_query(size: str, q: int, root: str | os.PathLike[str] | None = None) -> JobTemplate:
    """Load and validate TPC-H query ``q`` at input size ``size`` from the data root.

    The adjacency matrix is read without pickle and validated (square, acyclic) before
    the duration pickle is touched; the pickle is unpickled only after its sha256
    matched the manifest. Any problem raises NetLLMError naming the file.
    """
    from netllm.data import dataset_path, load_verified_pickle

    _check_query(size, q)
    folder = dataset_path("cjs", "tpch", size, root=root)
    adj_path = folder / f"adj_mat_{q}.npy"
    dur_path = folder / f"task_duration_{q}.npy"
    for path in (adj_path, dur_path):
        if not path.is_file():
            raise NetLLMError(f"{path}: missing; run 'netllm data fetch cjs' or set NETLLM_DATA")
    try:
        adj = np.load(adj_path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise NetLLMError(f"{adj_path}: not a readable numpy array ({err})") from None
    edges_from_adjacency(adj, str(adj_path))  # fail on a bad DAG before unpickling anything
    raw: Any = load_verified_pickle(dur_path)
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.shape == ():
        raw = raw.item()
    if not isinstance(raw, Mapping):
        raise NetLLMError(f"{dur_path}: expected a pickled dict stage -> durations, got {type(raw).__name__}")
    if len(raw) != adj.shape[0]:
        raise NetLLMError(f"{dur_path}: has durations for {len(raw)} stages but {adj_path.name} has {adj.shape[0]}")
    return build_template(adj, raw, query=q, size=size, source=str(dur_path))


@lru_cache(maxsize=4)
def _load_all_cached(root: str | None) -> Mapping[tuple[int, str], JobTemplate]:
    out = {}
    for size in QUERY_SIZES:
        for q in range(1, NUM_QUERIES + 1):
            out[(q, size)] = load_query(size, q, root=root)
    return out


def load_all(root: str | os.PathLike[str] | None = None) -> Mapping[tuple[int, str], JobTemplate]:
    """All 22 x 7 TPC-H templates, keyed ``(query, size)``; cached per data root."""
    if root is None:
        from netllm.data import data_root

        root = data_root()
    return _load_all_cached(str(Path(root).resolve()))


# --------------------------------------------------------------------------- synthetic

SYNTHETIC_KEYS: tuple[int, ...] = (2, 5, 10, 20, 40, 50, 60, 80, 100)


def synthetic_job(
    rng: np.random.Generator,
    num_stages: int | None = None,
    max_tasks: int = 12,
    task_ms: tuple[float, float] = (500.0, 4000.0),
    name: str = "synthetic",
) -> JobTemplate:
    """A small random job in the TPC-H layout: a random DAG (edges only from lower to
    higher stage ids), a few tasks per stage and integer task durations in ms."""
    n = int(num_stages if num_stages is not None else rng.integers(1, 6))
    adj = np.zeros((n, n))
    for j in range(1, n):
        parents = rng.choice(j, size=int(rng.integers(1, min(j, 2) + 1)), replace=False)
        adj[parents, j] = 1.0
    raw = {}
    for s in range(n):
        tasks = int(rng.integers(1, max_tasks + 1))
        base = rng.uniform(*task_ms)
        first, rest, fresh = {}, {}, {}
        for key in SYNTHETIC_KEYS:
            wave = min(tasks, key)
            first[key] = [int(base * rng.uniform(0.9, 1.3)) for _ in range(wave)]
            rest[key] = [int(base * rng.uniform(0.4, 0.7)) for _ in range(tasks - wave)]
            fresh[key] = [int(base * rng.uniform(1.1, 1.5)) for _ in range(max(1, wave // 2))]
        raw[s] = {"first_wave": first, "rest_wave": rest, "fresh_durations": fresh}
    return build_template(adj, raw, query=0, size=name, source=name)


def synthetic_templates(count: int = 4, seed: int = 0, **kwargs: Any) -> list[JobTemplate]:
    """``count`` synthetic job templates (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    return [synthetic_job(rng, name=f"synthetic{i}", **kwargs) for i in range(count)]
