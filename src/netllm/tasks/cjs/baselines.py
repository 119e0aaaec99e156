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
* **Decima** (Mao et al., SIGCOMM'19, as re-implemented by spark-sched-sim): a GNN over
  the job DAGs — node embeddings by child-to-parent message passing one topological
  generation at a time, DAG embeddings (sum over nodes) and a global embedding (sum
  over DAGs) — then a stage-scoring MLP (softmax over the schedulable stages) and an
  executor-limit MLP for the chosen stage's job (softmax over limits ``1..cap``). Its
  weights come from ``cjs/pretrained/decima_model.pt`` (a plain state dict) and its
  inputs are the ``CJSObservation`` views that reproduce spark-sched-sim's
  ``DAGNNObsWrapper`` (``node_features``, ``edge_masks``, ``exec_mask``).
  Actions are sampled with ``random.Random``; upstream drew them from the same global
  ``random`` stream as the simulator's task durations, which ``run_episode``
  reproduces by passing ``env.rng`` to ``reset`` (``share_rng=True``).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from netllm.tasks.cjs.sim import NUM_DAG_FEATURES, NUM_NODE_FEATURES, CJSAction, CJSEnv, CJSObservation, JobRecord
from netllm.utils import NetLLMError

SCHEDULERS: tuple[str, ...] = ("fifo", "fair", "decima")


@runtime_checkable
class Scheduler(Protocol):
    name: str

    def reset(self, seed: int | None = None) -> None: ...

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


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, act: type[nn.Module], **act_kw: Any) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = (in_dim, *hidden)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act(**act_kw)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class DecimaNet(nn.Module):
    """Decima's actor; parameter names match spark-sched-sim's ``DecimaScheduler.actor``."""

    def __init__(self, embed_dim: int = 16, gnn_hidden: tuple[int, ...] = (32, 16),
                 policy_hidden: tuple[int, ...] = (64, 64), node_dim: int = NUM_NODE_FEATURES,
                 dag_dim: int = NUM_DAG_FEATURES):
        super().__init__()
        gnn = dict(act=nn.LeakyReLU, negative_slope=0.2)
        self.embed_dim = embed_dim
        self.encoder = nn.ModuleDict({
            "node_encoder": nn.ModuleDict({
                "mlp_prep": _mlp(node_dim, gnn_hidden, embed_dim, **gnn),
                "mlp_msg": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn),
                "mlp_update": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn),
            }),
            "dag_encoder": nn.ModuleDict({"mlp": _mlp(node_dim + embed_dim, gnn_hidden, embed_dim, **gnn)}),
            "global_encoder": nn.ModuleDict({"mlp": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn)}),
        })
        self.stage_policy_network = nn.ModuleDict(
            {"mlp_score": _mlp(node_dim + 3 * embed_dim, policy_hidden, 1, act=nn.Tanh)})
        self.exec_policy_network = nn.ModuleDict(
            {"mlp_score": _mlp(dag_dim + 2 * embed_dim + 1, policy_hidden, 1, act=nn.Tanh)})

    def encode(self, obs: CJSObservation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node (N, d), DAG (J, d) and global (1, d) embeddings of one observation."""
        enc = self.encoder["node_encoder"]
        x = torch.from_numpy(obs.node_features)
        masks = obs.edge_masks
        if masks.shape[0] == 0:
            h = enc["mlp_prep"](x)
        else:
            edges = torch.from_numpy(obs.edge_links)
            h_init = enc["mlp_prep"](x)
            h = torch.zeros_like(h_init)
            leaf = torch.ones(len(x), dtype=torch.bool)
            leaf[edges[:, 0]] = False
            h[leaf] = enc["mlp_update"](h_init[leaf])
            for mask in masks[::-1]:  # deepest generation first: children tell parents
                e = edges[torch.from_numpy(mask)]
                parent, child = e[:, 0], e[:, 1]
                agg = torch.zeros_like(h).index_add_(0, parent, enc["mlp_msg"](h[child]))
                receivers = torch.unique(parent)
                h[receivers] = h_init[receivers] + enc["mlp_update"](agg[receivers])
        node_job = torch.from_numpy(obs.node_job)
        per_node = self.encoder["dag_encoder"]["mlp"](torch.cat([x, h], dim=1))
        h_dag = torch.zeros(obs.num_jobs, h.shape[1]).index_add_(0, node_job, per_node)
        h_glob = self.encoder["global_encoder"]["mlp"](h_dag).sum(0, keepdim=True)
        return h, h_dag, h_glob

    def stage_logits(self, obs: CJSObservation, h: torch.Tensor, h_dag: torch.Tensor,
                     h_glob: torch.Tensor) -> torch.Tensor:
        """One score per schedulable stage (order of ``obs.runnable``)."""
        idx = torch.from_numpy(obs.runnable)
        x = torch.from_numpy(obs.node_features)[idx]
        jobs = torch.from_numpy(obs.node_job)[idx]
        inputs = torch.cat([x, h[idx], h_dag[jobs], h_glob.expand(len(idx), -1)], dim=1)
        return self.stage_policy_network["mlp_score"](inputs).squeeze(-1)

    def exec_logits(self, obs: CJSObservation, job_idx: int, h_dag: torch.Tensor,
                    h_glob: torch.Tensor) -> torch.Tensor:
        """One score per executor limit ``1..cap`` of job ``job_idx``."""
        cap = int(obs.commit_caps[job_idx])
        x_dag = torch.from_numpy(obs.dag_features[job_idx])
        limits = (torch.arange(obs.num_executors, dtype=torch.float32) / obs.num_executors)[:cap]
        inputs = torch.cat([
            torch.cat([x_dag, h_dag[job_idx], h_glob[0]]).expand(cap, -1), limits[:, None]], dim=1)
        return self.exec_policy_network["mlp_score"](inputs).squeeze(-1)


def load_decima_state_dict(path: str | os.PathLike[str] | None = None,
                           root: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The trained Decima weights (``cjs/pretrained/decima_model.pt``), tensors only."""
    if path is None:
        from netllm.data import dataset_path

        path = dataset_path("cjs", "pretrained", "decima_model.pt", root=root)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NetLLMError(f"{path}: missing; run 'netllm data fetch cjs' or set NETLLM_DATA") from None
    except Exception as err:  # truncated zip, pickle with objects, ...
        raise NetLLMError(f"{path}: not a loadable tensor state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NetLLMError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def build_decima(state_dict: dict[str, torch.Tensor] | None = None, source: str = "state_dict") -> DecimaNet:
    """A ``DecimaNet`` sized from ``state_dict`` (if given) and loaded with it."""
    if state_dict is None:
        return DecimaNet()
    try:
        embed = int(state_dict["encoder.node_encoder.mlp_prep.4.weight"].shape[0])
        gnn = tuple(int(state_dict[f"encoder.node_encoder.mlp_prep.{i}.weight"].shape[0]) for i in (0, 2))
        pol = tuple(int(state_dict[f"stage_policy_network.mlp_score.{i}.weight"].shape[0]) for i in (0, 2))
    except KeyError as err:
        raise NetLLMError(f"{source}: not a Decima state dict (missing {err.args[0]!r})") from None
    net = DecimaNet(embed, gnn, pol)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise NetLLMError(f"{source}: weights do not fit Decima: {' '.join(first[:3])}") from None
    return net


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op torch threads (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    def _choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        pi = torch.softmax(logits, 0).numpy()
        return self.rng.choices(range(pi.size), pi)[0]

    def act(self, obs: CJSObservation) -> CJSAction:
        if len(obs.runnable) == 0:
            return CJSAction(-1, int(obs.num_committable_execs))
        with torch_threads(self.num_threads), torch.inference_mode():
            return self._act(obs)

    def _act(self, obs: CJSObservation) -> CJSAction:
        h, h_dag, h_glob = self.net.encode(obs)
        stage_idx = self._choose(self.net.stage_logits(obs, h, h_dag, h_glob))
        job_idx = int(obs.node_job[obs.runnable[stage_idx]])
        limit = self._choose(self.net.exec_logits(obs, job_idx, h_dag, h_glob))
        return CJSAction(int(stage_idx), limit + 1)


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
    if share_rng and "rng" in inspect.signature(scheduler.reset).parameters:
        scheduler.reset(seed, rng=env.rng)  # type: ignore[call-arg]
    else:
        scheduler.reset(seed)
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
