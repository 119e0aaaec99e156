"""CJS baselines: FIFO, Fair and Decima, behind one scheduler interface.

    sched = make_scheduler("decima")           # or "fifo", "fair"
    result = run_episode(CJSEnv(), sched, seed=1)
    result.avg_jct_s

Every scheduler has ``name``, ``reset(seed)`` and ``act(obs) -> CJSAction``.

* **FIFO / Fair** are spark-sched-sim's round-robin heuristics. Each decision first
  keeps the executors at the job that releases them (any schedulable stage of the source
  job, all free executors); otherwise it walks the jobs in arrival order and picks the
  first job below its executor cap that has a schedulable stage, preferring frontier
  stages (all parents finished), with limit ``cap - supply``. Fair's cap is
  ``ceil(E / #active jobs)``; FIFO's is ``ceil(E / 2)`` (upstream's FIFO is the same
  scheduler with a static half-cluster cap). With nothing to pick: ``(-1, ...)``.
* **Decima** (Mao et al., SIGCOMM'19, as re-implemented by spark-sched-sim): its
  pretrained network (``decima.py``: a GNN over the job DAGs, then a stage-scoring MLP
  and an executor-limit MLP for the chosen stage's job) gives a softmax over the
  schedulable stages, then one over the limits ``1..cap`` of the chosen stage's job.
  Actions are sampled with ``random.Random``; upstream drew them from the same global
  ``random`` stream as the simulator's task durations, which ``run_episode``
  reproduces by passing ``env.rng`` to ``reset`` (``share_rng=True``).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from netllm.tasks.cjs.decima import build_decima, load_decima_state_dict
from netllm.tasks.cjs.sim import CJSAction, CJSEnv, CJSObservation, JobRecord
from netllm.utils import NetLLMError, torch_threads

SCHEDULERS: tuple[str, ...] = ("fifo", "fair", "decima")


@runtime_checkable
class Scheduler(Protocol):
    name: str

    def reset(self, seed: int | None = None, rng: random.Random | None = None) -> None: ...

    def act(self, obs: CJSObservation) -> CJSAction: ...


# --------------------------------------------------------------------------- heuristics


def find_stage(obs: CJSObservation, job_idx: int) -> int:
    """Index into ``obs.runnable`` of a schedulable stage of job ``job_idx`` (a frontier
    stage if there is one, else the first schedulable one); -1 if none."""
    lo, hi = int(obs.job_ptr[job_idx]), int(obs.job_ptr[job_idx + 1])
    mask = obs.stage_mask[lo:hi]
    if not mask.any():
        return -1
    nodes = np.flatnonzero(mask) + lo
    front = nodes[obs.frontier_mask[nodes]]
    node = int(front[0] if len(front) else nodes[0])
    return int(np.searchsorted(obs.runnable, node))


class RoundRobinScheduler:
    """spark-sched-sim's round-robin heuristic: ``fair=True`` is Fair, ``False`` is FIFO."""

    def __init__(self, fair: bool = True, num_executors: int | None = None):
        self.fair = fair
        self.num_executors = num_executors
        self.name = "fair" if fair else "fifo"
        self.stochastic = False  # the same episode for every sampling stream

    def reset(self, seed: int | None = None, rng: random.Random | None = None) -> None:
        pass  # deterministic

    def act(self, obs: CJSObservation) -> CJSAction:
        num_executors = self.num_executors or obs.num_executors
        num_jobs = obs.num_jobs
        share = num_executors / max(1, num_jobs) if self.fair else num_executors / 2
        cap = int(math.ceil(share))
        free = int(obs.num_committable_execs)
        src = obs.source_job_idx
        if src < num_jobs:
            stage = find_stage(obs, src)
            if stage != -1:
                return CJSAction(stage, free)
        supplies = obs.exec_supplies
        for j in range(num_jobs):
            if supplies[j] >= cap or j == src:
                continue
            stage = find_stage(obs, j)
            if stage != -1:
                return CJSAction(stage, int(min(free, cap - supplies[j])))
        return CJSAction(-1, free)


class FIFOScheduler(RoundRobinScheduler):
    def __init__(self, num_executors: int | None = None):
        super().__init__(fair=False, num_executors=num_executors)


class FairScheduler(RoundRobinScheduler):
    def __init__(self, num_executors: int | None = None):
        super().__init__(fair=True, num_executors=num_executors)


# --------------------------------------------------------------------------- Decima


class DecimaScheduler:
    """Decima with trained weights; ``greedy`` takes the arg-max instead of sampling."""

    name = "decima"

    def __init__(self, weights: str | os.PathLike[str] | None = None, data_root: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None, greedy: bool = False,
                 pretrained: bool = True, num_threads: int | None = 1):
        if state_dict is None and pretrained:
            state_dict = load_decima_state_dict(weights, root=data_root)
        self.net = build_decima(state_dict, source=str(weights or "decima_model.pt")).eval()
        self.greedy = greedy
        self.stochastic = not greedy  # another sampling stream, another episode
        self.num_threads = num_threads  # tiny graphs: one thread avoids OpenMP contention
        self.rng = random.Random()

    def reset(self, seed: int | None = None, rng: random.Random | None = None) -> None:
        """Seed the sampler; pass ``rng=env.rng`` to share the simulator's stream (upstream)."""
        self.rng = rng if rng is not None else random.Random(seed)

    def _choose(self, logits: torch.Tensor, rng: random.Random | None = None) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        pi = torch.softmax(logits, 0).numpy()
        return (rng or self.rng).choices(range(pi.size), pi)[0]

    def act(self, obs: CJSObservation) -> CJSAction:
        if len(obs.runnable) == 0:
            return CJSAction(-1, int(obs.num_committable_execs))
        with torch_threads(self.num_threads), torch.inference_mode():
            return self._decide(obs, *self.net.encode(obs), self.rng)

    def _decide(self, obs: CJSObservation, h: torch.Tensor, h_dag: torch.Tensor, h_glob: torch.Tensor,
                rng: random.Random) -> CJSAction:
        stage_idx = self._choose(self.net.stage_logits(obs, h, h_dag, h_glob), rng)
        job_idx = int(obs.node_job[obs.runnable[stage_idx]])
        limit = self._choose(self.net.exec_logits(obs, job_idx, h_dag, h_glob), rng)
        return CJSAction(int(stage_idx), limit + 1)

    # the batch protocol of ``vec.run_episodes``: many simulators, one GNN pass per round

    def open(self, slots: int) -> None:
        self.rngs: list[random.Random] = [random.Random() for _ in range(slots)]

    def start(self, slot: int, seed: int | None, env: Any) -> None:
        self.rngs[slot] = env.rng  # the simulator's stream, as run_episode(share_rng=True)

    def act_batch(self, slots: list[int], observations: list[CJSObservation]) -> list[CJSAction]:
        actions = [CJSAction(-1, int(o.num_committable_execs)) for o in observations]
        deciding = [i for i, o in enumerate(observations) if len(o.runnable)]
        if deciding:
            with torch_threads(self.num_threads), torch.inference_mode():
                embeddings = self.net.encode_batch([observations[i] for i in deciding])
                for i, emb in zip(deciding, embeddings):
                    actions[i] = self._decide(observations[i], *emb, self.rngs[slots[i]])
        return actions

    def end(self, slot: int) -> None:
        pass


# --------------------------------------------------------------------------- registry


def make_scheduler(name: str, **kwargs: Any) -> Scheduler:
    """``fifo``, ``fair`` or ``decima`` (keyword arguments go to its constructor)."""
    key = name.lower()
    if key == "fifo":
        return FIFOScheduler(**kwargs)
    if key == "fair":
        return FairScheduler(**kwargs)
    if key == "decima":
        return DecimaScheduler(**kwargs)
    raise NetLLMError(f"scheduler: unknown CJS scheduler {name!r}; choose {', '.join(SCHEDULERS)}")


@dataclass
class EpisodeResult:
    scheduler: str
    seed: int | None
    avg_jct_s: float
    total_reward: float
    num_events: int
    num_decisions: int
    sim_time_ms: float
    wall_s: float
    records: list[JobRecord] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.num_events / self.wall_s if self.wall_s > 0 else float("nan")


def run_episode(env: CJSEnv, scheduler: Scheduler, seed: int | None = None,
                share_rng: bool = True) -> EpisodeResult:
    """Run one full episode. ``share_rng`` lets a sampling scheduler draw from the
    simulator's ``random`` stream, as upstream did (needed for seed-exact results)."""
    start = time.perf_counter()
    obs, info = env.reset(seed)
    scheduler.reset(seed, rng=env.rng if share_rng else None)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(scheduler.act(obs))
        total += reward
        if terminated or truncated:
            break
    return EpisodeResult(
        scheduler=scheduler.name, seed=seed, avg_jct_s=env.avg_jct_s, total_reward=total,
        num_events=env.num_events, num_decisions=env.num_decisions, sim_time_ms=env.wall_time_ms,
        wall_s=time.perf_counter() - start, records=env.job_records(),
    )
