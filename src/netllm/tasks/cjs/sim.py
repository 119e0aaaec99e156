"""An event-driven Spark cluster simulator with spark-sched-sim's semantics (Decima's env).

    env = CJSEnv(num_executors=50, num_jobs=200, arrival_rate=4e-5)
    obs, info = env.reset(seed=1)
    while True:
        obs, reward, terminated, truncated, info = env.step((stage_idx, num_exec))
        if terminated: break
    env.avg_jct_s, env.job_records(), env.num_events

The model (re-implemented from spark-sched-sim, github.com/ArchieGertsman/spark-sched-sim,
as vendored by NetLLM; same semantics and the same random-number order, so a seed gives
the upstream episode):

* **Jobs.** At reset the whole arrival sequence is drawn from a numpy ``PCG64`` generator
  seeded like gymnasium (``SeedSequence(seed)``): per job ``q = 1 + integers(22)``,
  ``size = choice(QUERY_SIZES)``, then an exponential inter-arrival gap of mean
  ``1 / arrival_rate`` ms; the first job arrives at t = 0; ``num_jobs`` jobs in all.
* **Executors and pools.** ``num_executors`` executors live in pools: the common pool
  (not at any job), a job's pool (idle at the job) or a stage's pool (working on, or
  just finished, a task of the stage). Moving to another job takes ``moving_delay_ms``.
  A job's *executor supply* counts the executors at or moving to it plus the ones
  committed to it from elsewhere.
* **Stages.** A stage is *saturated* when its remaining (not started) tasks are covered
  by the executors moving or committed to it; it is *schedulable* when it is not
  saturated, all its parents are saturated (not necessarily finished: executors
  committed to a stage whose parents still run wait at the job), it was not picked in
  the current round, and its job's supply is below ``num_executors`` (the source job
  is exempt). A stage is on the *frontier* (can start tasks) when all parents finished.
* **Scheduling rounds.** A round starts whenever executors are free at some *source*
  pool: the common pool (a job arrived while it had executors), a stage's pool (a task
  finished and its executor had no commitment) or a job's pool (a stage finished and
  unlocked children). Each ``step`` commits up to ``num_exec`` of the source's free
  executors to one schedulable stage (clipped to the stage's demand); the round ends
  when no free executor or no schedulable stage is left, the uncommitted rest is
  committed to the common pool, idle executors at the source leave for their
  commitments, and the simulation runs to the next round. A busy executor honours its
  source's commitments when its task finishes.
* **Task durations** come from the job's measured data, keyed by the number of
  executors local to the job mapped to the data's levels (5, 10, 20, 40, 50, ...; between
  two levels one is drawn proportionally to the distance): an executor new to the job
  (idle/moved) draws a ``fresh_durations`` value (or first-wave + ``warmup_delay_ms``),
  one continuing on the same stage a ``rest_wave`` value, otherwise ``first_wave``.
  Draws use ``random.Random(seed)`` (upstream used the global ``random`` seeded with
  the same seed right after reset) in the upstream order.
* **Reward** of a step: minus the job-time (ms, summed over jobs alive in the interval)
  between the start of the simulation run that step triggered and the next round; 0
  inside a round. Summed over an episode it is minus the total job completion time.
* **Metric**: average job completion time (completion - arrival) in seconds.

Action: ``(stage_idx, num_exec)`` (tuple, ``CJSAction`` or ``{"stage_idx", "num_exec"}``):
``stage_idx`` indexes ``obs.runnable`` (the schedulable stages in node order), ``-1``
means "schedule nothing" and releases the round's remaining executors; ``num_exec`` is
the upper limit of executors to commit. Invalid-action rule: a ``stage_idx`` outside
``-1 .. len(obs.runnable) - 1``, ``num_exec < 1`` (with a stage), a non-integer value or a
step after the episode ended raise ``NetLLMError``; ``num_exec`` above
``obs.num_committable_execs`` is clipped to it (documented fallback; upstream asserted),
and, as upstream, to the stage's remaining demand.

Gymnasium: :class:`CJSEnv` keeps the scheduler-facing API above (rich
:class:`CJSObservation` values, actions indexing ``obs.runnable``). :class:`CJSGymEnv`
wraps it as a ``gymnasium.Env`` with a fixed-size observation (a ``Dict`` of padded
arrays with masks) and a ``MultiDiscrete`` action (node slot, executor limit); it is
registered as ``netllm/CJS-v0`` (``gymnasium.make("netllm/CJS-v0", num_jobs=20)`` after
``import netllm.tasks.cjs``).
"""

from __future__ import annotations

import copy
import heapq
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, NamedTuple

import gymnasium
import numpy as np
from gymnasium import spaces

from netllm.tasks.cjs.jobs import NUM_QUERIES, QUERY_SIZES, JobTemplate, synthetic_templates
from netllm.utils import NetLLMError

COMMON = (None, None)  # pool key of the common pool; a job pool is (job, None), a stage pool (job, stage)
EXECUTOR_LEVELS = (5, 10, 20, 40, 50, 60, 80, 100)  # executor counts of the measured data
NUM_TASKS_SCALE = 200.0  # Decima node features: remaining tasks / 200
WORK_SCALE = 1e5  # Decima node features: remaining work (ms) / 1e5
NUM_NODE_FEATURES = 5
NUM_DAG_FEATURES = 3

_ARRIVAL, _TASK_DONE, _EXEC_ARRIVAL = 0, 1, 2


@dataclass(frozen=True)
class CJSConfig:
    """Simulator settings (defaults: NetLLM's CJS setting)."""

    num_executors: int = 50
    num_jobs: int = 200
    arrival_rate: float = 4e-5  # jobs per ms (mean inter-arrival 25 s)
    moving_delay_ms: float = 2000.0
    warmup_delay_ms: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("num_executors", "num_jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise NetLLMError(f"{name}: must be an integer >= 1, got {value!r}")
        if not (isinstance(self.arrival_rate, (int, float)) and math.isfinite(self.arrival_rate)
                and self.arrival_rate > 0):
            raise NetLLMError(f"arrival_rate: must be a positive number of jobs per ms, got {self.arrival_rate!r}")
        for name in ("moving_delay_ms", "warmup_delay_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise NetLLMError(f"{name}: must be a finite number >= 0, got {value!r}")


class CJSAction(NamedTuple):
    """``stage_idx`` indexes ``obs.runnable`` (-1: none); ``num_exec`` caps the executors."""

    stage_idx: int
    num_exec: int


@dataclass(frozen=True)
class JobRecord:
    """One job of an episode (times in ms; ``completion_ms`` is NaN while unfinished)."""

    job_id: int
    query: int
    size: str
    num_stages: int
    num_tasks: int
    arrival_ms: float
    completion_ms: float

    @property
    def jct_s(self) -> float:
        return (self.completion_ms - self.arrival_ms) * 1e-3

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "jct_s": self.jct_s}


# --------------------------------------------------------------------------- observation


@dataclass(eq=False)
class CJSObservation:
    """The active job DAGs at a scheduling decision, batched as one graph.

    Nodes are the active (unfinished) stages of the active jobs, jobs in arrival order and
    stages in id order; ``job_ptr[j]:job_ptr[j+1]`` are job ``j``'s nodes. ``nodes`` holds
    spark-sched-sim's raw node features (remaining tasks, most recent task duration in
    ms, schedulable 0/1) as float32; ``edge_links`` (E, 2) are parent -> child node
    indices. Derived views (``node_features``, ``exec_mask``, ``edge_masks``...) are
    exactly those of spark-sched-sim's ``DAGNNObsWrapper`` and are computed on demand.
    """

    wall_time_ms: float
    num_executors: int
    job_ids: np.ndarray  # (J,) simulator job ids
    job_arrival_ms: np.ndarray  # (J,)
    job_ptr: np.ndarray  # (J+1,)
    stage_ids: np.ndarray  # (N,) stage id inside its job
    nodes: np.ndarray  # (N, 3) float32
    edge_links: np.ndarray  # (E, 2) int64
    exec_supplies: np.ndarray  # (J,) executors at, moving or committed to each job
    num_committable_execs: int  # free executors of this round still to commit
    source_job_idx: int  # index of the job releasing executors, J if none (common pool)

    @property
    def num_jobs(self) -> int:
        return len(self.job_ids)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @cached_property
    def stage_mask(self) -> np.ndarray:
        """(N,) bool: which nodes are schedulable now."""
        return self.nodes[:, 2].astype(bool)

    @cached_property
    def runnable(self) -> np.ndarray:
        """Node indices of the schedulable stages; ``stage_idx`` of an action indexes this."""
        return np.flatnonzero(self.stage_mask)

    @cached_property
    def node_job(self) -> np.ndarray:
        """(N,) job index of every node."""
        return np.repeat(np.arange(self.num_jobs), np.diff(self.job_ptr))

    @cached_property
    def frontier_mask(self) -> np.ndarray:
        """(N,) bool: all parents finished (no incoming edge among active stages)."""
        mask = np.ones(self.num_nodes, dtype=bool)
        mask[self.edge_links[:, 1]] = False
        return mask

    @cached_property
    def commit_caps(self) -> np.ndarray:
        """(J,) how many executors each job may still receive in this round."""
        gap = np.maximum(self.num_executors - self.exec_supplies, 0)
        caps = np.minimum(gap, self.num_committable_execs)
        if self.source_job_idx < self.num_jobs:
            caps[self.source_job_idx] = self.num_committable_execs
        return caps

    @cached_property
    def exec_mask(self) -> np.ndarray:
        """(J, num_executors) bool: executor-limit choices ``k+1`` allowed per job."""
        return np.arange(self.num_executors)[None, :] < self.commit_caps[:, None]

    @cached_property
    def node_features(self) -> np.ndarray:
        """(N, 5) float32 Decima node features: commit cap / E, source job (+1/-1),
        job supply / E, remaining tasks / 200, remaining work (ms) / 1e5."""
        counts = np.diff(self.job_ptr)
        x = np.zeros((self.num_nodes, NUM_NODE_FEATURES), dtype=np.float32)
        x[:, 0] = np.repeat(self.commit_caps, counts) / self.num_executors
        x[:, 1] = -1
        if self.source_job_idx < self.num_jobs:
            j = self.source_job_idx
            x[self.job_ptr[j]:self.job_ptr[j + 1], 1] = 1
        x[:, 2] = np.repeat(self.exec_supplies, counts) / self.num_executors
        remaining = self.nodes[:, 0]
        x[:, 3] = remaining / NUM_TASKS_SCALE
        x[:, 4] = remaining * self.nodes[:, 1] / WORK_SCALE
        return x

    @cached_property
    def dag_features(self) -> np.ndarray:
        """(J, 3) the job-level part of the node features (taken from each job's first node)."""
        return self.node_features[self.job_ptr[:-1], :NUM_DAG_FEATURES]

    @cached_property
    def edge_masks(self) -> np.ndarray:
        """(depth, E) bool: edges of each topological generation for Decima's message
        passing: mask ``d`` holds the edges among generation ``d`` and its children."""
        return dag_layer_edge_masks(self.edge_links, self.num_nodes)


def dag_layer_edge_masks(edge_links: np.ndarray, num_nodes: int) -> np.ndarray:
    """Edge masks per topological generation (all but the last), as spark-sched-sim's
    ``make_dag_layer_edge_masks``; shape (0, E) when there is at most one generation."""
    num_edges = len(edge_links)
    if num_edges == 0:
        return np.zeros((0, 0), dtype=bool)
    src, dst = edge_links[:, 0], edge_links[:, 1]
    indeg = np.bincount(dst, minlength=num_nodes)
    level = indeg == 0
    remaining = indeg.copy()
    masks = []
    while True:
        out = level[src]  # edges leaving this generation
        if not out.any():
            break
        node_mask = level.copy()
        node_mask[dst[out]] = True
        masks.append(node_mask[src] & node_mask[dst])
        np.subtract.at(remaining, dst[out], 1)
        nxt = np.zeros(num_nodes, dtype=bool)
        nxt[dst[out]] = True
        level = nxt & (remaining == 0)
    return np.stack(masks) if masks else np.zeros((0, num_edges), dtype=bool)


# --------------------------------------------------------------------------- internals


class _Stage:
    __slots__ = ("job_id", "stage_id", "key", "num_tasks", "durations", "parents", "children",
                 "most_recent_ms", "remaining", "processing", "done_tasks")

    def __init__(self, job_id: int, stage_id: int, tpl: JobTemplate):
        self.job_id = job_id
        self.stage_id = stage_id
        self.key = (job_id, stage_id)
        self.num_tasks = tpl.num_tasks[stage_id]
        self.durations = tpl.durations[stage_id]
        self.parents = tpl.parents[stage_id]
        self.children = tpl.children[stage_id]
        self.most_recent_ms = tpl.mean_duration_ms[stage_id]
        self.remaining = self.num_tasks  # not yet started
        self.processing = 0
        self.done_tasks = 0

    @property
    def completed(self) -> bool:
        return self.done_tasks == self.num_tasks


class _Job:
    __slots__ = ("id", "template", "arrival_ms", "completion_ms", "stages", "active", "frontier",
                 "local", "saturated_count", "_obs_edges")

    def __init__(self, job_id: int, tpl: JobTemplate, arrival_ms: float):
        self.id = job_id
        self.template = tpl
        self.arrival_ms = arrival_ms
        self.completion_ms = math.inf
        self.stages = [_Stage(job_id, s, tpl) for s in range(tpl.num_stages)]
        self.active = list(self.stages)  # unfinished stages, in id order
        self.frontier = {s.stage_id for s in self.stages if not s.parents}  # all parents done
        self.local: set[int] = set()  # executors at this job
        self.saturated_count = 0  # stages with no task left to start
        self._obs_edges: np.ndarray | None = None

    @property
    def saturated(self) -> bool:
        return self.saturated_count == len(self.stages)

    def obs_edges(self) -> np.ndarray:
        """Edges among the active stages, relabelled to positions in ``active`` (cached)."""
        if self._obs_edges is None:
            edges = self.template.edges
            if len(self.active) < len(self.stages):
                pos = np.full(len(self.stages), -1, dtype=np.int64)
                pos[[s.stage_id for s in self.active]] = np.arange(len(self.active))
                edges = pos[edges]
                edges = edges[(edges >= 0).all(axis=1)]
            self._obs_edges = edges
        return self._obs_edges


class _Executor:
    __slots__ = ("id", "job_id", "task_stage", "executing")

    def __init__(self, executor_id: int):
        self.id = executor_id
        self.job_id: int | None = None
        self.task_stage: int | None = None  # stage id of its current/last task; None = idle
        self.executing = False


class _Pools:
    """Where every executor is, which executors are committed where, and job supplies."""

    def __init__(self, num_executors: int):
        self.loc: dict[int, Any] = {e: COMMON for e in range(num_executors)}
        self.members: dict[Any, set[int]] = {None: set(), COMMON: set(range(num_executors))}
        self.commits: dict[Any, dict[Any, int]] = {None: {}, COMMON: {}}  # src -> dst -> count
        self.n_out: dict[Any, int] = {None: 0, COMMON: 0}
        self.n_in: dict[Any, int] = {COMMON: 0}  # commitments into a stage
        self.moving: dict[Any, int] = {}  # executors on their way to a stage
        self.supply: dict[Any, int] = {None: 0}
        self.source: Any = COMMON

    def add_job(self, job: _Job) -> None:
        key = (job.id, None)
        self.members[key], self.commits[key], self.n_out[key] = set(), {}, 0
        self.supply[job.id] = 0
        for stage in job.stages:
            k = stage.key
            self.members[k], self.commits[k], self.n_out[k] = set(), {}, 0
            self.n_in[k] = 0
            self.moving[k] = 0

    def committable(self) -> int:
        return len(self.members[self.source]) - self.n_out[self.source]

    def source_job(self) -> int | None:
        return None if self.source is None or self.source == COMMON else self.source[0]

    def commit(self, n: int, dst: Any) -> None:
        src = self.source
        out = self.commits[src]
        out[dst] = out.get(dst, 0) + n
        self.n_out[src] += n
        self.n_in[dst] += n
        if dst[0] != src[0]:
            self.supply[dst[0]] += n

    def uncommit(self, executor: int, dst: Any) -> Any:
        """Consume one commitment of ``executor``'s pool to ``dst``; return that pool."""
        src = self.loc[executor]
        out = self.commits[src]
        out[dst] -= 1
        self.n_out[src] -= 1
        self.n_in[dst] -= 1
        if out[dst] == 0:
            del out[dst]
        if dst[0] != src[0]:
            self.supply[dst[0]] -= 1
        return src

    def first_commitment(self, key: Any) -> Any:
        return next(iter(self.commits[key]), None)

    def move(self, executor: int, dst: Any, send: bool = False) -> None:
        """Put ``executor`` into pool ``dst`` now, or (``send``) start moving it to stage ``dst``."""
        old = self.loc[executor]
        if old is not None:
            self.members[old].remove(executor)
            self.loc[executor] = None
        if not send:
            self.loc[executor] = dst
            self.members[dst].add(executor)
            return
        self.moving[dst] += 1
        self.supply[dst[0]] += 1
        if old is not None and old[0] is not None:
            self.supply[old[0]] -= 1


def executor_intervals(num_executors: int) -> list[tuple[int, int]]:
    """For each local-executor count 0..E: the two data levels it lies between."""
    iv = np.zeros((num_executors + 1, 2))
    levels = EXECUTOR_LEVELS
    iv[: levels[0] + 1] = levels[0]
    for lo, hi in zip(levels[:-1], levels[1:]):
        iv[lo + 1: hi] = (lo, hi)
        if hi > num_executors:
            break
        iv[hi] = hi
    if num_executors > levels[-1]:
        iv[levels[-1] + 1: num_executors] = levels[-1]
    return [(int(a), int(b)) for a, b in iv]


# --------------------------------------------------------------------------- environment


_MEMOS: dict[int, tuple[Any, dict[int, Any]]] = {}


def _shared_memo(templates: Any) -> dict[int, Any]:
    """A ``deepcopy`` memo mapping every object inside ``templates`` to itself (so copies
    of an episode share the read-only job data); built once per templates object."""
    key = id(templates)
    if key not in _MEMOS or _MEMOS[key][0] is not templates:
        memo: dict[int, Any] = {}
        todo = [templates]
        while todo:
            obj = todo.pop()
            if id(obj) in memo or isinstance(obj, (int, float, str, bool, type(None))):
                continue
            memo[id(obj)] = obj
            if isinstance(obj, Mapping):
                todo.extend(obj.keys())
                todo.extend(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                todo.extend(obj)
            elif hasattr(obj, "__dict__"):
                todo.extend(vars(obj).values())
        _MEMOS[key] = (templates, memo)
    return dict(_MEMOS[key][1])


class CJSEnv:
    """Gymnasium-style Spark scheduling environment (see the module docstring).

    ``templates``: None samples TPC-H jobs (``load_all(data_root)``, loaded on first
    reset); a mapping ``{(query, size): JobTemplate}`` is sampled the same way (query and
    size drawn uniformly, as upstream); a sequence of templates is sampled uniformly by
    index (synthetic jobs for tests).
    """

    def __init__(
        self,
        num_executors: int = 50,
        num_jobs: int = 200,
        arrival_rate: float = 4e-5,
        moving_delay_ms: float = 2000.0,
        warmup_delay_ms: float = 1000.0,
        templates: Mapping[tuple[int, str], JobTemplate] | Sequence[JobTemplate] | None = None,
        data_root: str | None = None,
    ):
        self.config = CJSConfig(num_executors, num_jobs, arrival_rate, moving_delay_ms, warmup_delay_ms)
        if templates is not None and not isinstance(templates, Mapping):
            templates = list(templates)
            if not templates or not all(isinstance(t, JobTemplate) for t in templates):
                raise NetLLMError("templates: expected a non-empty sequence of JobTemplate")
        self._templates = templates
        self._data_root = data_root
        self._intervals = executor_intervals(self.config.num_executors)
        self.np_random: np.random.Generator | None = None
        self.rng: random.Random | None = None  # task durations (shareable with a sampling policy)
        self.jobs: list[_Job] = []
        self.wall_time_ms = 0.0
        self.num_events = 0
        self.num_decisions = 0
        self._done = True

    @classmethod
    def from_config(cls, config: CJSConfig, **kwargs: Any) -> CJSEnv:
        return cls(config.num_executors, config.num_jobs, config.arrival_rate,
                   config.moving_delay_ms, config.warmup_delay_ms, **kwargs)

    @property
    def num_executors(self) -> int:
        return self.config.num_executors

    def fork(self) -> tuple[CJSEnv, CJSObservation]:
        """An independent copy of the running episode (state and random streams) and its
        current observation: play a continuation on it without touching this one. The
        job templates (read-only data) are shared, not copied."""
        if self._done:
            raise NetLLMError("fork(): no episode is running; call reset()")
        memo = _shared_memo(self._templates)
        twin = copy.deepcopy(self, memo)
        return twin, twin._observe()

    def job_time_ms(self, t0: float, t1: float) -> float:
        """Time the jobs spent in the system within ``[t0, t1)`` (ms, summed over jobs;
        a job still running counts up to the simulator's clock)."""
        end = min(t1, self.wall_time_ms)
        return float(sum(max(0.0, min(j.completion_ms, end) - max(j.arrival_ms, t0)) for j in self.jobs))

    # ------------------------------------------------------------------ gym API

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[CJSObservation, dict]:
        """Draw a new job sequence and return the first decision (``options``: unused)."""
        cfg = self.config
        if self._templates is None:
            from netllm.tasks.cjs.jobs import load_all

            self._templates = load_all(self._data_root)
        self.np_random = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        self.rng = random.Random(seed)
        self.wall_time_ms = 0.0
        self.num_events = 0
        self.num_decisions = 0
        self._heap: list = []
        self._counter = 0
        self.jobs = []
        t: float = 0
        mean_gap = 1.0 / cfg.arrival_rate
        for job_id in range(cfg.num_jobs):
            job = _Job(job_id, self._draw_template(), t)
            self.jobs.append(job)
            self._push(t, _ARRIVAL, job, None)
            t += self.np_random.exponential(mean_gap)
        self.executors = [_Executor(e) for e in range(cfg.num_executors)]
        self.pools = _Pools(cfg.num_executors)
        self.active: list[int] = []  # active job ids, arrival order
        self.completed: set[int] = set()
        self._selected: set[tuple] = set()  # stages picked in the current round
        self._schedulable: list[_Stage] = []
        while self._heap and self._heap[0][0] <= 0:  # jobs arriving at t = 0
            job = heapq.heappop(self._heap)[3]
            self.num_events += 1
            self._on_job_arrival(job)
        self._schedulable = self._find_schedulable()
        self._done = False
        return self._observe(), self._info()

    def step(self, action: Any) -> tuple[CJSObservation, float, bool, bool, dict]:
        if self._done:
            raise NetLLMError("step(): the episode has ended (or reset() was never called); call reset()")
        stage_idx, num_exec = self._parse_action(action)
        self.num_decisions += 1
        self._take_action(stage_idx, num_exec)
        pools = self.pools
        if pools.committable() > 0 and self._schedulable:
            return self._observe(), 0.0, False, False, self._info()
        # end of the round: park what is left, send idle executors to their commitments
        self._commit_rest()
        self._fulfill_source_commitments()
        pools.source = None
        self._selected.clear()
        t0, active0 = self.wall_time_ms, list(self.active)
        self._run_until_decision()
        reward = -self._job_time_ms(t0, active0)
        terminated = len(self.completed) == len(self.jobs)
        if not terminated and not (pools.committable() > 0 and self._schedulable):
            raise RuntimeError("simulator stalled: no events left but jobs are unfinished")
        self._done = terminated
        return self._observe(), float(reward), terminated, False, self._info()

    def close(self) -> None:
        """Nothing to release (Gymnasium compatibility)."""

    # ------------------------------------------------------------------ metrics

    @property
    def avg_jct_s(self) -> float:
        """Average completion time (s) of the jobs that have arrived (unfinished: so far)."""
        jobs = [self.jobs[j] for j in self.active] + [self.jobs[j] for j in self.completed]
        if not jobs:
            return float("nan")
        return float(np.mean([(min(j.completion_ms, self.wall_time_ms) - j.arrival_ms) * 1e-3 for j in jobs]))

    def job_records(self) -> list[JobRecord]:
        """One record per job of the episode, in arrival order."""
        return [
            JobRecord(j.id, j.template.query, j.template.size, j.template.num_stages,
                      int(sum(j.template.num_tasks)), float(j.arrival_ms),
                      float(j.completion_ms) if math.isfinite(j.completion_ms) else float("nan"))
            for j in self.jobs
        ]

    def _info(self) -> dict[str, Any]:
        return {
            "wall_time_ms": self.wall_time_ms,
            "num_events": self.num_events,
            "num_decisions": self.num_decisions,
            "num_active_jobs": len(self.active),
            "num_completed_jobs": len(self.completed),
        }

    # ------------------------------------------------------------------ actions

    def _parse_action(self, action: Any) -> tuple[int, int]:
        try:
            if isinstance(action, Mapping):
                stage_idx, num_exec = action["stage_idx"], action["num_exec"]
            else:
                stage_idx, num_exec = action
        except (KeyError, TypeError, ValueError):
            raise NetLLMError(f"action: expected (stage_idx, num_exec), got {action!r}") from None
        for name, value in (("stage_idx", stage_idx), ("num_exec", num_exec)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise NetLLMError(f"action.{name}: must be an integer, got {value!r}")
        stage_idx, num_exec = int(stage_idx), int(num_exec)
        n = len(self._schedulable)
        if not -1 <= stage_idx < n:
            raise NetLLMError(f"action.stage_idx: {stage_idx} is not a runnable stage (valid: -1..{n - 1})")
        if stage_idx >= 0 and num_exec < 1:
            raise NetLLMError(f"action.num_exec: executor limit must be >= 1, got {num_exec}")
        return stage_idx, num_exec

    def _take_action(self, stage_idx: int, num_exec: int) -> None:
        if stage_idx == -1:
            self._commit_rest()
            return
        stage = self._schedulable[stage_idx]
        num_exec = min(num_exec, self.pools.committable(), self._demand(stage))
        self.pools.commit(num_exec, stage.key)
        self._selected.add(stage.key)
        job_id = stage.job_id
        refreshed = self._find_schedulable([job_id])
        lo = next(i for i, s in enumerate(self._schedulable) if s.job_id == job_id)
        hi = lo
        while hi < len(self._schedulable) and self._schedulable[hi].job_id == job_id:
            hi += 1
        self._schedulable[lo:hi] = refreshed

    def _commit_rest(self) -> None:
        n = self.pools.committable()
        if n > 0:
            self.pools.commit(n, COMMON)

    # ------------------------------------------------------------------ stage status

    def _demand(self, stage: _Stage) -> int:
        """Tasks not yet covered by executors running, moving or committed to the stage."""
        return stage.remaining - (self.pools.moving[stage.key] + self.pools.n_in[stage.key])

    def _ready(self, stage: _Stage) -> bool:
        if self._demand(stage) <= 0:
            return False
        stages = self.jobs[stage.job_id].stages
        return all(self._demand(stages[p]) <= 0 for p in stage.parents)

    def _find_schedulable(self, job_ids: list | None = None, source_job: Any = "current") -> list[_Stage]:
        pools = self.pools
        if job_ids is None:
            job_ids = self.active
        if source_job == "current" or source_job is None:
            source_job = pools.source_job()
        cap = self.config.num_executors
        return [
            stage
            for j in job_ids
            if j is not None and (j == source_job or pools.supply[j] < cap)
            for stage in self.jobs[j].active
            if stage.key not in self._selected and self._ready(stage)
        ]

    # ------------------------------------------------------------------ simulation

    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        heapq.heappush(self._heap, (t, self._counter, kind, a, b))
        self._counter += 1

    def _run_until_decision(self) -> None:
        pools = self.pools
        found: list[_Stage] = []
        while self._heap:
            t, _, kind, a, b = heapq.heappop(self._heap)
            self.wall_time_ms = t
            self.num_events += 1
            if kind == _TASK_DONE:
                self._on_task_done(a, b)
            elif kind == _EXEC_ARRIVAL:
                self._on_executor_arrival(a, b)
            else:
                self._on_job_arrival(a)
            if pools.committable() == 0:
                continue
            found = self._find_schedulable()
            if found:
                break
            self._release_idle()
            pools.source = None
        self._schedulable = found

    def _on_job_arrival(self, job: _Job) -> None:
        self.active.append(job.id)
        self.pools.add_job(job)
        if self.pools.members[COMMON]:
            self.pools.source = COMMON

    def _on_executor_arrival(self, ex: _Executor, stage: _Stage) -> None:
        job = self.jobs[stage.job_id]
        job.local.add(ex.id)
        ex.job_id = job.id
        self.pools.moving[stage.key] -= 1
        self.pools.move(ex.id, (job.id, None))
        self._place(ex, stage)

    def _on_task_done(self, stage: _Stage, ex: _Executor) -> None:
        job = self.jobs[stage.job_id]
        stage.processing -= 1
        stage.done_tasks += 1
        ex.executing = False
        if stage.remaining > 0:
            self._start_task(ex, stage)
            return
        unlocked = False
        if stage.completed:
            job.active.remove(stage)
            job._obs_edges = None
            job.frontier.discard(stage.stage_id)
            stages = job.stages
            for c in stage.children:
                child = stages[c]
                if not child.completed and all(stages[p].completed for p in child.parents):
                    job.frontier.add(c)
                    unlocked = True
        if not job.active:
            self._on_job_done(job)
        # the executor follows its pool's first commitment, if any
        dst = self.pools.first_commitment(stage.key)
        if dst is not None:
            self._fulfill(ex.id, dst)
        else:
            ex.task_stage = None
            if unlocked:
                self._release_idle(stage.key, [ex.id])
        if unlocked:
            self.pools.source = (job.id, None)
        elif dst is None:
            self.pools.source = stage.key

    def _on_job_done(self, job: _Job) -> None:
        key = (job.id, None)
        if self.pools.members[key]:
            self._release_idle(key)
        self.active.remove(job.id)
        self.completed.add(job.id)
        job.completion_ms = self.wall_time_ms

    def _start_task(self, ex: _Executor, stage: _Stage) -> None:
        job = self.jobs[stage.job_id]
        stage.remaining -= 1
        stage.processing += 1
        if stage.remaining == 0:
            job.saturated_count += 1
        duration = self._sample_duration(ex, stage, len(job.local))
        ex.task_stage = stage.stage_id
        ex.executing = True
        stage.most_recent_ms = duration
        self._push(self.wall_time_ms + duration, _TASK_DONE, stage, ex)

    def _send(self, ex: _Executor, stage: _Stage) -> None:
        self.pools.move(ex.id, stage.key, send=True)
        if ex.job_id is not None:
            self._leave_job(ex)
        self._push(self.wall_time_ms + self.config.moving_delay_ms, _EXEC_ARRIVAL, ex, stage)

    def _leave_job(self, ex: _Executor) -> None:
        self.jobs[ex.job_id].local.remove(ex.id)
        ex.job_id = None
        ex.task_stage = None

    def _fulfill(self, executor: int, dst: Any) -> None:
        src = self.pools.uncommit(executor, dst)
        if dst == COMMON:
            self._release_idle(src, [executor])
            return
        job_id, stage_id = dst
        self._place(self.executors[executor], self.jobs[job_id].stages[stage_id])

    def _idle_at(self, key: Any) -> set[int]:
        return {e for e in self.pools.members[key] if not self.executors[e].executing}

    def _fulfill_source_commitments(self) -> None:
        idle = self._idle_at(self.pools.source)
        for dst, n in list(self.pools.commits[self.pools.source].items()):
            while n > 0 and idle:
                self._fulfill(idle.pop(), dst)
                n -= 1

    def _release_idle(self, key: Any = None, executors: list[int] | None = None) -> None:
        """Idle executors at a stage go to the job's pool; at a saturated job, to the common pool."""
        if key is None:
            key = self.pools.source
        if key == COMMON:
            return
        if executors is None:
            executors = list(self._idle_at(key))
        job_id, stage_id = key
        job = self.jobs[job_id]
        if stage_id is None and not job.saturated:
            return
        dst = COMMON if job.saturated else (job_id, None)
        for e in executors:
            self.pools.move(e, dst)
            if dst == COMMON:
                self._leave_job(self.executors[e])

    def _place(self, ex: _Executor, stage: _Stage) -> None:
        """Put an executor to work on ``stage``: move it there, start a task, or find a backup."""
        if stage.remaining == 0:
            backup = self._backup_stage(ex)
            if backup is not None:
                self._place(ex, backup)
            else:
                self._release_idle(self.pools.loc[ex.id], [ex.id])
            return
        if ex.job_id != stage.job_id:
            self._send(ex, stage)
            return
        job = self.jobs[stage.job_id]
        if stage.stage_id not in job.frontier:  # parents still running: wait at the job
            ex.task_stage = None
            self.pools.move(ex.id, (job.id, None))
            return
        self.pools.move(ex.id, stage.key)
        self._start_task(ex, stage)

    def _backup_stage(self, ex: _Executor) -> _Stage | None:
        """A schedulable stage for an executor whose target no longer needs it (own job first)."""
        local = self._find_schedulable([ex.job_id], source_job=ex.job_id)
        if local:
            return local[-1]
        others = [j for j in self.active if j != ex.job_id]
        other = self._find_schedulable(others, source_job=ex.job_id)
        return other[-1] if other else None

    def _sample_duration(self, ex: _Executor, stage: _Stage, num_local: int) -> float:
        rng = self.rng
        lo, hi = self._intervals[num_local]
        if lo == hi:
            key = lo
        else:
            point = 1 + int(rng.random() * (hi - lo))
            key = lo if point <= num_local - lo else hi
        table = stage.durations
        first = table["first_wave"]
        if key not in first:
            key = max(first)

        def pick(wave: str) -> float | None:
            values = table[wave].get(key)
            return rng.choice(values) if values else None

        if ex.task_stage is None:  # idle or just moved: fresh executor
            d = pick("fresh_durations")
            if d is None:
                d = pick("first_wave")
                d = stage.most_recent_ms if d is None else d + self.config.warmup_delay_ms
            return d
        if ex.task_stage == stage.stage_id:
            d = pick("rest_wave")
            if d is not None:
                return d
        d = pick("first_wave")
        if d is None:
            d = pick("fresh_durations")
        return stage.most_recent_ms if d is None else d

    def _job_time_ms(self, t0: float, active0: list[int]) -> float:
        if self.wall_time_ms - t0 == 0:
            return 0
        total = 0
        for j in set(active0) | set(self.active):
            job = self.jobs[j]
            total += min(job.completion_ms, self.wall_time_ms) - max(job.arrival_ms, t0)
        return total

    # ------------------------------------------------------------------ observation

    def _draw_template(self) -> JobTemplate:
        rng = self.np_random
        templates = self._templates
        if isinstance(templates, Mapping):
            q = 1 + int(rng.integers(NUM_QUERIES))
            size = str(rng.choice(QUERY_SIZES))
            try:
                return templates[(q, size)]
            except KeyError:
                raise NetLLMError(f"templates: no job template for query {q} size {size}") from None
        return templates[int(rng.integers(len(templates)))]

    def _observe(self) -> CJSObservation:
        sched = {s.key for s in self._schedulable}
        source_job = self.pools.source_job()
        source_idx = len(self.active)
        ptr = [0]
        stage_ids: list[int] = []
        rows: list[tuple[float, float, float]] = []
        edges: list[np.ndarray] = []
        supplies = []
        arrivals = []
        for i, job_id in enumerate(self.active):
            job = self.jobs[job_id]
            if job_id == source_job:
                source_idx = i
            supplies.append(self.pools.supply[job_id])
            arrivals.append(job.arrival_ms)
            e = job.obs_edges()
            if len(e):
                edges.append(e + ptr[-1])
            for st in job.active:
                rows.append((st.remaining, st.most_recent_ms, st.key in sched))
                stage_ids.append(st.stage_id)
            ptr.append(len(rows))
        nodes = np.array(rows, dtype=np.float32).reshape(-1, 3)
        return CJSObservation(
            wall_time_ms=float(self.wall_time_ms),
            num_executors=self.config.num_executors,
            job_ids=np.array(self.active, dtype=np.int64),
            job_arrival_ms=np.array(arrivals, dtype=np.float64),
            job_ptr=np.array(ptr, dtype=np.int64),
            stage_ids=np.array(stage_ids, dtype=np.int64),
            nodes=nodes,
            edge_links=np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64),
            exec_supplies=np.array(supplies, dtype=np.int64),
            num_committable_execs=int(self.pools.committable()) if self.pools.source is not None else 0,
            source_job_idx=source_idx,
        )


# --------------------------------------------------------------------------- Gymnasium wrapper

TPCH = "tpch"
SYNTHETIC = "synthetic"
SYNTHETIC_TEMPLATE_COUNT = 8
SYNTHETIC_TEMPLATE_SEED = 0

TemplateSpec = Mapping[tuple[int, str], JobTemplate] | Sequence[JobTemplate] | str | None


def resolve_templates(spec: TemplateSpec = None) -> Mapping[tuple[int, str], JobTemplate] | Sequence[JobTemplate] | None:
    """The job templates of :class:`CJSGymEnv`, in :class:`CJSEnv`'s ``templates`` form.

    ``None``: ``"tpch"`` when ``$NETLLM_DATA`` is set, otherwise ``"synthetic"``.
    ``"tpch"``: the TPC-H jobs of the data root (returned as None: CJSEnv loads them at
    the first reset). ``"synthetic"``: ``synthetic_templates(SYNTHETIC_TEMPLATE_COUNT,
    seed=SYNTHETIC_TEMPLATE_SEED)``. A mapping or sequence of templates: used as given.
    """
    if spec is None:
        spec = TPCH if os.environ.get("NETLLM_DATA") else SYNTHETIC
    if isinstance(spec, str):
        if spec == TPCH:
            return None
        if spec == SYNTHETIC:
            return synthetic_templates(SYNTHETIC_TEMPLATE_COUNT, seed=SYNTHETIC_TEMPLATE_SEED)
        raise NetLLMError(f"templates: expected {TPCH!r}, {SYNTHETIC!r} or job templates, got {spec!r}")
    return spec


def _limit(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise NetLLMError(f"{name}: must be an integer >= 1, got {value!r}")
    return int(value)


class CJSGymEnv(gymnasium.Env[dict[str, np.ndarray], np.ndarray]):
    """:class:`CJSEnv` as a ``gymnasium.Env`` with fixed-size observations and actions.

    Observation (``gymnasium.spaces.Dict``; padding rows are 0, masks are int8 0/1):

    * ``nodes`` (max_nodes, 5) float32: Decima's node features
      (:attr:`CJSObservation.node_features`): executors the node's job may still receive
      this round / num_executors, +1 if the job is the round's source else -1, the job's
      executor supply / num_executors, remaining tasks / 200, remaining work (ms) / 1e5.
    * ``node_mask`` (max_nodes,): the slot holds an active stage.
    * ``action_mask`` (max_nodes,): the slot holds a stage that can be scheduled now.
    * ``node_job`` (max_nodes,) int64: the job slot of each node.
    * ``jobs`` (max_jobs, 3) float32: the job-level part of the node features
      (:attr:`CJSObservation.dag_features`); ``job_mask`` (max_jobs,): the slot holds a job.
    * ``edges`` (max_edges, 2) int64: parent -> child node slots; ``edge_mask`` (max_edges,).
    * ``num_committable_execs`` (1,) int64: free executors of this round still to commit.

    Nodes are the active stages of the active jobs, jobs in arrival order, stages in id
    order (as :class:`CJSObservation`). When they do not fit, only the longest prefix of
    whole jobs that fits ``max_jobs``, ``max_nodes`` and ``max_edges`` is shown; ``info``
    reports ``num_hidden_jobs``.

    Action: ``MultiDiscrete([max_nodes, num_executors])``: ``(node slot, k)`` schedules
    the stage in that slot with at most ``k + 1`` executors (clipped by the simulator to
    the free executors and the stage's demand). Invalid-choice rule: a slot whose
    ``action_mask`` is 0 (padding, a stage that cannot be scheduled, or a hidden one) is
    replaced by the first schedulable stage in node order (the oldest job's), and
    ``info["action_valid"]`` is False. An action outside the action space raises
    ``NetLLMError``. There is no "schedule nothing" action (the simulator only stops
    where some stage can be scheduled, and parking executors can stall an episode).

    Reward: minus the time jobs spent in the system since the previous decision (ms,
    summed over jobs; 0 inside a scheduling round); the episode's sum is minus the total
    job completion time. ``terminated`` when every job has finished; ``truncated``
    never. ``reset(seed=s)`` plays :class:`CJSEnv`'s episode for seed ``s``;
    ``reset()`` draws the simulator seed from ``np_random``. ``self.sim`` is the
    wrapped :class:`CJSEnv` (metrics: ``sim.avg_jct_s``, ``sim.job_records()``) and
    ``self.observation`` its latest :class:`CJSObservation`.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        num_executors: int = 50,
        num_jobs: int = 200,
        arrival_rate: float = 4e-5,
        moving_delay_ms: float = 2000.0,
        warmup_delay_ms: float = 1000.0,
        templates: TemplateSpec = None,
        data_root: str | None = None,
        *,
        max_jobs: int = 64,
        max_nodes: int = 512,
        max_edges: int = 1024,
    ) -> None:
        self.sim = CJSEnv(num_executors, num_jobs, arrival_rate, moving_delay_ms, warmup_delay_ms,
                          templates=resolve_templates(templates), data_root=data_root)
        self.max_jobs = _limit(max_jobs, "max_jobs")
        self.max_nodes = _limit(max_nodes, "max_nodes")
        self.max_edges = _limit(max_edges, "max_edges")
        e = self.sim.num_executors
        feature_low = np.array([0.0, -1.0, 0.0, 0.0, 0.0], dtype=np.float32)
        feature_high = np.array([1.0, 1.0, np.inf, np.inf, np.inf], dtype=np.float32)
        self.observation_space = spaces.Dict({
            "nodes": spaces.Box(np.tile(feature_low, (self.max_nodes, 1)),
                                np.tile(feature_high, (self.max_nodes, 1)), dtype=np.float32),
            "node_mask": spaces.MultiBinary(self.max_nodes),
            "action_mask": spaces.MultiBinary(self.max_nodes),
            "node_job": spaces.Box(0, self.max_jobs - 1, shape=(self.max_nodes,), dtype=np.int64),
            "jobs": spaces.Box(np.tile(feature_low[:NUM_DAG_FEATURES], (self.max_jobs, 1)),
                               np.tile(feature_high[:NUM_DAG_FEATURES], (self.max_jobs, 1)), dtype=np.float32),
            "job_mask": spaces.MultiBinary(self.max_jobs),
            "edges": spaces.Box(0, self.max_nodes - 1, shape=(self.max_edges, 2), dtype=np.int64),
            "edge_mask": spaces.MultiBinary(self.max_edges),
            "num_committable_execs": spaces.Box(0, e, shape=(1,), dtype=np.int64),
        })
        self.action_space = spaces.MultiDiscrete([self.max_nodes, e])
        self.observation: CJSObservation | None = None
        self._visible_nodes = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode (``options``: unused)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise NetLLMError(f"seed: must be a non-negative integer or None, got {seed!r}")
        super().reset(seed=seed)
        sim_seed = int(seed) if seed is not None else int(self.np_random.integers(2**32))
        obs, info = self.sim.reset(seed=sim_seed, options=options)
        encoded, hidden = self._encode(obs)
        return encoded, {**info, "num_hidden_jobs": hidden}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Schedule ``action = (node slot, k)`` (see the class doc)."""
        if self.observation is None:
            raise NetLLMError("step(): call reset() first")
        a = np.asarray(action)
        if a.shape != (2,) or not np.issubdtype(a.dtype, np.integer) or not self.action_space.contains(a.astype(np.int64)):
            raise NetLLMError(
                f"action: expected 2 integers (node slot in 0..{self.max_nodes - 1}, "
                f"k in 0..{self.sim.num_executors - 1}), got {action!r}"
            )
        slot, k = int(a[0]), int(a[1])
        runnable = self.observation.runnable
        pos = int(np.searchsorted(runnable, slot))
        valid = slot < self._visible_nodes and pos < len(runnable) and int(runnable[pos]) == slot
        obs, reward, terminated, truncated, info = self.sim.step((pos if valid else 0, k + 1))
        encoded, hidden = self._encode(obs)
        return encoded, reward, terminated, truncated, {**info, "num_hidden_jobs": hidden, "action_valid": valid}

    def _encode(self, obs: CJSObservation) -> tuple[dict[str, np.ndarray], int]:
        """The padded arrays of ``obs`` and how many of its jobs did not fit."""
        self.observation = obs
        num_jobs = obs.num_jobs
        edge_counts = np.bincount(obs.node_job[obs.edge_links[:, 0]], minlength=num_jobs)
        edge_ptr = np.concatenate([[0], np.cumsum(edge_counts)])
        fits = ((np.arange(num_jobs + 1) <= self.max_jobs) & (obs.job_ptr <= self.max_nodes)
                & (edge_ptr <= self.max_edges))
        jobs = int(fits.sum()) - 1  # every limit grows with the prefix: the fitting jobs are a prefix
        n, m = int(obs.job_ptr[jobs]), int(edge_ptr[jobs])
        self._visible_nodes = n
        out = {
            "nodes": np.zeros((self.max_nodes, NUM_NODE_FEATURES), dtype=np.float32),
            "node_mask": np.zeros(self.max_nodes, dtype=np.int8),
            "action_mask": np.zeros(self.max_nodes, dtype=np.int8),
            "node_job": np.zeros(self.max_nodes, dtype=np.int64),
            "jobs": np.zeros((self.max_jobs, NUM_DAG_FEATURES), dtype=np.float32),
            "job_mask": np.zeros(self.max_jobs, dtype=np.int8),
            "edges": np.zeros((self.max_edges, 2), dtype=np.int64),
            "edge_mask": np.zeros(self.max_edges, dtype=np.int8),
            "num_committable_execs": np.array([obs.num_committable_execs], dtype=np.int64),
        }
        if num_jobs:
            out["nodes"][:n] = obs.node_features[:n]
            out["node_mask"][:n] = 1
            out["action_mask"][:n] = obs.stage_mask[:n]
            out["node_job"][:n] = obs.node_job[:n]
            out["jobs"][:jobs] = obs.dag_features[:jobs]
            out["job_mask"][:jobs] = 1
            out["edges"][:m] = obs.edge_links[:m]
            out["edge_mask"][:m] = 1
        return out, num_jobs - jobs
