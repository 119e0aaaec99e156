"""CJS experience pools: baseline (or NetLLM) episodes recorded as the NetLLM scheduler's
decisions, with state features from the frozen GNN (``features.py``).

    pool = collect_pool(["decima"], seeds=range(101, 149), config=CJSConfig())
    pool.save("runs/pool/pool.npz"); pool = load_pool("runs/pool/pool.npz")

A decision is a step where some stage is runnable and the scheduler picks one; steps
without a runnable stage (or where a heuristic picks none, -1) are not decisions: their
reward joins the previous step. Reward: the simulator's, the negative job time (ms)
accumulated between decisions; returns-to-go are divided by ``RETURN_SCALE`` = 1e6 ms
(a 200-job episode is ~ -8).

Besides one episode per (policy, seed), ``collect_pool`` builds best-of pools: per job
sequence the best of several sampled episodes (``keep="best", draws=N``), or the best
continuation every ``segment_s`` simulated seconds (``record_best_segments``).

Pool layout (``pool.npz``, see ``netllm.rl``): ``state.global`` (N, 21),
``state.pooled`` (N, 74), ``state.candidates`` (N, M, 37) zero-padded to the pool's
largest runnable set M, ``state.cand_mask`` (N, M) bool, ``state.cand_caps`` (N, M)
int, ``action`` (N, 2) int = (stage_idx into the runnable stages, num_exec >= 1).
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from netllm.rl import ExperiencePool
from netllm.tasks.cjs.baselines import Scheduler, make_scheduler
from netllm.tasks.cjs.decima import DecimaNet
from netllm.tasks.cjs.features import (CANDIDATE_DIM, FEATURE_VERSION, GLOBAL_DIM, POOLED_DIM, Features, featurize,
                                       load_gnn)
from netllm.tasks.cjs.sim import CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError

console = Console()

RETURN_SCALE = 1e6  # ms: returns-to-go of a 200-job episode are O(-10)


# ----------------------------------------------------------------------------- options


def pool_options(keep: str, draws: int | str, segment: float | str = 0) -> tuple[int, float]:
    """``--keep`` / ``--draws`` / ``--segment`` of a CJS pool, checked; returns
    (draws, segment seconds)."""
    if keep not in ("all", "best"):
        raise NetLLMError(f"--keep: 'all' or 'best', got {keep!r}")
    try:
        n = int(draws)
    except (TypeError, ValueError):
        raise NetLLMError(f"--draws: expected an integer, got {draws!r}") from None
    if n < 1:
        raise NetLLMError(f"--draws: must be >= 1, got {draws}")
    try:
        seg = float(segment)
    except (TypeError, ValueError):
        raise NetLLMError(f"--segment: expected seconds of simulated time, got {segment!r}") from None
    if not (seg >= 0 and math.isfinite(seg)):
        raise NetLLMError(f"--segment: must be >= 0 seconds (0: choose whole episodes), got {segment!r}")
    if seg > 0 and keep != "best":
        raise NetLLMError("--segment: chooses the best continuation, so it needs --keep best")
    return n, seg


def make_baseline(name: str, config: CJSConfig) -> Scheduler:
    """A baseline scheduler by its ``--policy`` name (FIFO and Fair sized to ``config``'s
    executors)."""
    kwargs = {"num_executors": config.num_executors} if name.lower() in ("fifo", "fair") else {}
    try:
        return make_scheduler(name, **kwargs)
    except NetLLMError as err:
        raise NetLLMError(f"--policy: {err}") from None


# ----------------------------------------------------------------------------- pools


def _reset(policy: Any, env: CJSEnv, seed: int, draw: int = 0, segment: int | None = None) -> None:
    """Seed a policy's sampling for its ``draw``-th episode on job sequence ``seed``: draw 0
    shares the simulator's stream (upstream's episode, as ``run_episode``); draw k >= 1
    gets a stream of its own, so the job sequence stays the same. ``segment``: the
    ``draw``-th continuation of that segment of a best-of-segments episode, with a stream
    of its own too."""
    if segment is not None:
        rng = random.Random((seed * 1_000_003 + draw) * 100_003 + segment)
    else:
        rng = env.rng if draw == 0 else random.Random(seed * 1_000_003 + draw)
    policy.reset(seed, rng=rng)


@dataclass
class _Played:
    """Decisions of a stretch of an episode: what ``keep`` made of each observation
    (features, or the observation itself), the actions, and the reward after each
    (``lead``: reward before the first decision of the stretch)."""

    kept: list[Any]
    actions: list[tuple[int, int]]
    rewards: list[float]
    lead: float = 0.0


def _play(env: CJSEnv, obs: CJSObservation, policy: Any, keep: Callable[[CJSObservation], Any] | None,
          until_ms: float = float("inf")) -> tuple[CJSObservation, bool, _Played]:
    """Step ``policy`` until the episode ends or the first decision at or after
    ``until_ms`` of simulated time; returns (observation, done, what was played)."""
    played = _Played([], [], [])
    while env.wall_time_ms < until_ms:
        action = policy.act(obs)
        if len(obs.runnable) and int(action[0]) >= 0:  # a heuristic's "none" (-1) is no decision
            if keep is not None:
                played.kept.append(keep(obs))
            played.actions.append((int(action[0]), int(action[1])))
            played.rewards.append(0.0)
        obs, reward, terminated, truncated, _ = env.step(action)
        if played.rewards:
            played.rewards[-1] += reward  # steps without a decision: reward joins the previous step
        else:
            played.lead += reward
        if terminated or truncated:
            return obs, True, played
    return obs, False, played


def _episode(feats: list[Features], actions: list[tuple[int, int]], rewards: list[float]) -> dict[str, Any]:
    return {"features": feats, "actions": np.array(actions, dtype=np.int64).reshape(-1, 2),
            "rewards": np.array(rewards, dtype=np.float64)}


def record_episode(env: CJSEnv, policy: Any, gnn: DecimaNet | None, seed: int, draw: int = 0
                   ) -> tuple[dict[str, Any], float]:
    """Play one episode with a baseline and record its decisions; returns (episode, avg JCT s).
    ``gnn=None`` only plays it (no features: cheap, for choosing the best draw)."""
    obs, _ = env.reset(seed)
    _reset(policy, env, seed, draw)
    _, _, played = _play(env, obs, policy, (lambda o: featurize(gnn, o)) if gnn is not None else None)
    return _episode(played.kept, played.actions, played.rewards), env.avg_jct_s


def record_best_segments(env: CJSEnv, plays: Sequence[tuple[Any, int]], gnn: DecimaNet | None, seed: int,
                         segment_ms: float) -> tuple[dict[str, Any], float, int]:
    """One episode on job sequence ``seed`` built from the best continuations: every
    ``segment_ms`` of simulated time each (policy, draw) of ``plays`` plays on from the
    same state (a fork of the simulator) with a sampling stream of its own, and the one
    whose jobs spent the least time in the system over that stretch goes on. A lookahead
    that needs the simulator, so it improves the logged behaviour, not a deployable
    policy. Returns (episode, avg JCT s, number of segments)."""
    obs, _ = env.reset(seed)
    feats: list[Features] = []
    actions: list[tuple[int, int]] = []
    rewards: list[float] = []
    done, segment = False, 0
    while not done:
        t0, best = env.wall_time_ms, None
        for policy, draw in plays:
            twin, start = env.fork()
            _reset(policy, twin, seed, draw, segment)
            end, finished, played = _play(twin, start, policy, lambda o: o, until_ms=t0 + segment_ms)
            score = twin.job_time_ms(t0, t0 + segment_ms)
            if best is None or score < best[0]:
                best = (score, twin, end, finished, played)
        _, env, obs, done, played = best
        if rewards:
            rewards[-1] += played.lead
        if gnn is not None:
            feats.extend(featurize(gnn, o) for o in played.kept)
        actions.extend(played.actions)
        rewards.extend(played.rewards)
        segment += 1
    return _episode(feats, actions, rewards), env.avg_jct_s, segment


def pool_from_episodes(episodes: Sequence[dict[str, Any]], meta: dict[str, Any]) -> ExperiencePool:
    """Pad every decision's candidates to the pool's largest runnable set."""
    M = max(len(f.caps) for ep in episodes for f in ep["features"])
    out = []
    for ep in episodes:
        T = len(ep["features"])
        cand = np.zeros((T, M, CANDIDATE_DIM), dtype=np.float32)
        mask = np.zeros((T, M), dtype=bool)
        caps = np.zeros((T, M), dtype=np.int64)
        for t, f in enumerate(ep["features"]):
            m = len(f.caps)
            cand[t, :m], mask[t, :m], caps[t, :m] = f.candidates, True, f.caps
        out.append({"states": {"global": np.stack([f.glob for f in ep["features"]]),
                               "pooled": np.stack([f.pooled for f in ep["features"]]),
                               "candidates": cand, "cand_mask": mask, "cand_caps": caps},
                    "actions": ep["actions"], "rewards": ep["rewards"].astype(np.float32)})
    return ExperiencePool.from_episodes(out, meta={**meta, "max_candidates": M})


def collect_pool(policies: Sequence[str], seeds: Sequence[int], config: CJSConfig = CJSConfig(), *,
                 keep: str = "all", draws: int = 1, segment_s: float = 0.0, gnn: str = "decima",
                 templates: Any = None, progress: bool = True,
                 make: Callable[[str, CJSConfig], Any] = make_baseline) -> ExperiencePool:
    """Trajectories of existing schedulers on the job sequences ``seeds``.

    ``draws``: episodes per (sampling policy, seed), each with its own sampling stream
    (see ``_reset``; draw 0 is upstream's episode); a deterministic policy plays once.
    ``keep="all"``: every episode. ``keep="best"``: per job sequence only the episode
    with the highest return (lowest total job time) over policies and draws — filtered
    behaviour cloning, as the ABR best-of pool: the job sequence, not the behaviour,
    sets most of an episode's return, so a pool of average episodes cannot be told apart
    by return conditioning. Candidates are first played without features (cheap); only
    kept episodes are recorded with the GNN.
    ``keep="best"`` with ``segment_s > 0``: the choice is made every ``segment_s``
    seconds of simulated time instead of once per episode (``record_best_segments``).
    ``make``: the scheduler of each name in ``policies`` (default ``make_baseline``: the
    baselines; ``policy.make_policy`` also takes NetLLM adapter folders).
    """
    from netllm import parallel

    draws, segment_s = pool_options(keep, draws, segment_s)
    made, net = _collect_context(policies, config, gnn, make)
    if segment_s > 0:
        for name, policy in made.items():
            if hasattr(policy, "observe"):  # return-conditioned: its context cannot be forked
                raise NetLLMError(f"--segment: choose among the baseline schedulers, not {name}")
    plays = [(name, draw) for name in policies
             for draw in range(draws if getattr(made[name], "stochastic", True) else 1)]
    # one job sequence per unit: on the open workers (netllm.parallel), each builds the
    # schedulers and the GNN once; the pool is the same, in the order of the seeds
    shared = parallel.Shared(functools.partial(_collect_context, policies, config, gnn, make), local=(made, net))
    per_seed = parallel.map(_collect_seed, [int(s) for s in seeds], shared, plays, config, keep, segment_s,
                            templates, progress)
    episodes = [ep for eps, _ in per_seed for ep in eps]
    kept = [k for _, ks in per_seed for k in ks]
    meta = {"task": "cjs", "policies": list(policies), "seeds": list(seeds), "gnn": gnn, "keep": keep,
            "draws": draws, "segment_s": segment_s, "episodes": kept,
            "jobs": config.num_jobs, "executors": config.num_executors, "arrival_rate": config.arrival_rate,
            "feature_version": FEATURE_VERSION, "reward": "negative job time between decisions (ms)"}
    return pool_from_episodes(episodes, meta)


def _collect_context(policies: Sequence[str], config: CJSConfig, gnn: str,
                     make: Callable[[str, CJSConfig], Any]) -> tuple[dict[str, Any], DecimaNet]:
    """The schedulers of a collection and the frozen GNN that featurises its states."""
    return {name: make(name, config) for name in policies}, load_gnn(gnn)


def _collect_seed(context: tuple[dict[str, Any], DecimaNet], seed: int, plays: list[tuple[str, int]],
                  config: CJSConfig, keep: str, segment_s: float, templates: Any,
                  progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The recorded episodes of one job sequence, and what was kept of it."""
    made, net = context
    policies = list(dict.fromkeys(name for name, _ in plays))
    if segment_s > 0:
        t0 = time.perf_counter()
        ep, jct, segments = record_best_segments(CJSEnv.from_config(config, templates=templates),
                                                 [(made[n], d) for n, d in plays], net, seed, segment_s * 1000.0)
        if progress:
            console.print(f"collected best of {len(plays)} every {segment_s:g} s, seed {seed}: "
                          f"{len(ep['rewards'])} decisions, {segments} segments, avg JCT {jct:.2f} s, "
                          f"{time.perf_counter() - t0:.1f} s")
        return [ep], [{"policy": "+".join(policies), "seed": seed, "draws": len(plays), "segments": segments,
                       "avg_jct_s": jct}]
    chosen = plays
    if keep == "best" and len(plays) > 1:
        returns = {}
        for name, draw in plays:
            ep, jct = record_episode(CJSEnv.from_config(config, templates=templates), made[name], None, seed, draw)
            returns[(name, draw)] = float(ep["rewards"].sum())
            if progress:
                console.print(f"  {name} seed {seed} draw {draw}: avg JCT {jct:.2f} s")
        chosen = [max(plays, key=lambda p: returns[p])]
    episodes, kept = [], []
    for name, draw in chosen:
        env = CJSEnv.from_config(config, templates=templates)
        t0 = time.perf_counter()
        ep, jct = record_episode(env, made[name], net, seed, draw)
        episodes.append(ep)
        kept.append({"policy": name, "seed": seed, "draw": draw, "avg_jct_s": jct})
        if progress:
            console.print(f"collected {name} seed {seed} draw {draw}: {len(ep['rewards'])} decisions, "
                          f"avg JCT {jct:.2f} s, return {ep['rewards'].sum() / RETURN_SCALE:.2f} (x1e6 ms), "
                          f"{time.perf_counter() - t0:.1f} s")
    return episodes, kept


def check_pool(pool: ExperiencePool, path: Any) -> None:
    """A pool for this model: the CJS state arrays in their shapes (else one clear error)."""
    want = {"global": (GLOBAL_DIM,), "pooled": (POOLED_DIM,), "candidates": (None, CANDIDATE_DIM),
            "cand_mask": (None,), "cand_caps": (None,)}
    for name, shape in want.items():
        arr = pool.states.get(name)
        if arr is None:
            raise NetLLMError(f"--pool: {path} lacks CJS state array {name!r} (collect it with 'netllm collect cjs')")
        if arr.ndim != len(shape) + 1 or any(s is not None and s != a for s, a in zip(shape, arr.shape[1:])):
            raise NetLLMError(f"--pool: {path}: state.{name} has shape {arr.shape[1:]}, expected {shape}")
    if pool.actions.ndim != 2 or pool.actions.shape[1] != 2:
        raise NetLLMError(f"--pool: {path}: action must be (N, 2) = (stage_idx, num_exec)")
    if pool.meta.get("feature_version") != FEATURE_VERSION:
        raise NetLLMError(f"--pool: {path}: feature version {pool.meta.get('feature_version')!r}, "
                          f"expected {FEATURE_VERSION}; collect it again")


def load_pool(path: Any) -> ExperiencePool:
    pool = ExperiencePool.load(path, task="cjs")
    check_pool(pool, path)
    return pool


def pad_candidates(pool: ExperiencePool, width: int) -> ExperiencePool:
    """The pool with its candidate sets padded (masked out) to ``width`` slots."""
    have = pool.states["candidates"].shape[1]
    if have == width:
        return pool
    pad = {name: [(0, 0), (0, width - have)] + [(0, 0)] * (arr.ndim - 2)
           for name, arr in pool.states.items() if name in ("candidates", "cand_mask", "cand_caps")}
    states = {name: np.pad(arr, pad[name]) if name in pad else arr for name, arr in pool.states.items()}
    return replace(pool, states=states, meta={**pool.meta, "max_candidates": width})


def load_pools(paths: Sequence[Any]) -> ExperiencePool:
    """One pool from several CJS pools (``--pool A --pool B``): their episodes in order,
    candidate sets padded to the widest; the pools must come from the same simulator
    executor count and GNN features (else one error naming the pool that differs); the
    number of jobs and the arrival rate may differ between episodes."""
    if not paths:
        raise NetLLMError("--pool: CJS adaptation needs an experience pool (netllm collect cjs ...)")
    pools = [load_pool(p) for p in paths]
    if len(pools) == 1:
        return pools[0]
    first = pools[0].meta
    for path, pool in zip(paths[1:], pools[1:]):
        for key in ("executors", "gnn"):
            if pool.meta.get(key) != first.get(key):
                raise NetLLMError(f"--pool: {path} was collected with {key}={pool.meta.get(key)!r}, "
                                  f"{paths[0]} with {first.get(key)!r}; pools must share it")
    width = max(p.states["candidates"].shape[1] for p in pools)
    meta = {**first, "max_candidates": width, "pools": [str(p) for p in paths],
            "policies": sorted({x for p in pools for x in p.meta.get("policies", [])}),
            "seeds": [s for p in pools for s in p.meta.get("seeds", [])],
            "episodes": [e for p in pools for e in p.meta.get("episodes", [])]}
    return ExperiencePool.concat([pad_candidates(p, width) for p in pools], meta=meta)
