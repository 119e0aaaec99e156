"""The NetLLM scheduler for CJS: state tokens, experience pools, DD-LRNA, KV-cached decisions.

The data flow:  CJSEnv -> (Decima | Fair | FIFO) -> pool.npz (collect)
                pool -> return-conditioned offline RL (adapt) -> adapter folder
                adapter + frozen GNN -> NetLLMCJSPolicy (eval), one LLM pass per decision

Per decision the FROZEN pretrained Decima GNN (``DecimaNet.encode``, as upstream NetLLM:
the graph encoder is pre-trained and then frozen) turns the active job DAGs into node,
DAG and global embeddings. From them:

* a **candidate** per runnable stage: ``[Decima node features (5), node emb (16),
  its DAG's emb (16)]`` (``CANDIDATE_DIM`` = 37), with its job's executor cap;
* two **state tokens** per step: ``global`` = ``[global emb (16), active jobs / 10,
  committable executors / E, runnable stages / 10, releasing job present, total
  supply / E]`` and ``pooled`` = masked mean and max of the candidates (74);
* the **stage head** (``CandidateScoreHead``) scores every candidate from the hidden
  state at the last state token (softmax over the variable-size runnable set);
* the **executor head** (categorical over limits 1..``num_exec_classes``, masked to the
  chosen stage's job cap) reads that hidden state plus an embedding of the chosen
  candidate (encoder ``chosen``), so the limit depends on which job was picked;
* the **action token** embeds ``[chosen candidate (37), limit / classes]`` (a vector action).

A step is ``[return-to-go, global, pooled, action]`` (4 tokens), context K steps.
Reward: the simulator's, the negative job time (ms) accumulated between decisions;
returns-to-go are divided by ``RETURN_SCALE`` = 1e6 ms (a 200-job episode is ~ -8).
Steps without a runnable stage (or where a heuristic picks none, -1) are not decisions:
their reward joins the previous step.

Pool layout (``pool.npz``, see ``netllm.rl``): ``state.global`` (N, 21),
``state.pooled`` (N, 74), ``state.candidates`` (N, M, 37) zero-padded to the pool's
largest runnable set M, ``state.cand_mask`` (N, M) bool, ``state.cand_caps`` (N, M)
int, ``action`` (N, 2) int = (stage_idx into the runnable stages, num_exec >= 1).
"""

from __future__ import annotations

import inspect
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import BestAdapter, NetLLM, NetLLMConfig, read_adapter_config
from netllm.rl import (ExperiencePool, IncrementalPolicy, RLSpec, WindowBatch, WindowSampler, decision_hidden,
                       target_return)
from netllm.tasks.cjs.baselines import (DecimaNet, EpisodeResult, build_decima, load_decima_state_dict,
                                        torch_threads)
from netllm.tasks.cjs.sim import NUM_NODE_FEATURES, CJSAction, CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError, seed_everything

console = Console()

EMBED_DIM = 16  # Decima's embedding width
CANDIDATE_DIM = NUM_NODE_FEATURES + 2 * EMBED_DIM  # 37
GLOBAL_DIM = EMBED_DIM + 5  # 21
POOLED_DIM = 2 * CANDIDATE_DIM  # 74
ACTION_DIM = CANDIDATE_DIM + 1  # chosen candidate + limit fraction
STATE_TOKENS = ("global", "pooled")
RETURN_SCALE = 1e6  # ms: returns-to-go of a 200-job episode are O(-10)
NUM_EXEC_CLASSES = 50  # executor limits 1..50 (the default cluster)
MAX_TIMESTEP = 8192  # time-step table: a 200-job episode has ~5-6k decisions
# (A single learned row was tried together with a best-of pool; the pool, not the
# table, made that run worse — README, "A best-of pool without absolute time".)
FEATURE_VERSION = 1


# ----------------------------------------------------------------------------- model


def model_config(*, llm: str = "smollm2", layers: int | None = 4, rank: int = 16, context: int = 20,
                 pretrained: bool = True, seed: int = 0, gnn: str = "decima",
                 num_exec_classes: int = NUM_EXEC_CLASSES) -> NetLLMConfig:
    """NetLLM for CJS: two state tokens, a candidate-score head and an executor-limit head."""
    return NetLLMConfig(
        task="cjs", llm=llm, layers=layers, lora=LoraSpec(rank=rank), pretrained=pretrained, seed=seed,
        encoders=[
            EncoderSpec("global", "scalar", in_dim=GLOBAL_DIM),
            EncoderSpec("pooled", "scalar", in_dim=POOLED_DIM),
            EncoderSpec("chosen", "scalar", in_dim=CANDIDATE_DIM),  # conditions the executor head
        ],
        heads={"stage": HeadSpec("candidates", candidate_dim=CANDIDATE_DIM, hidden_layers=2, width=256),
               "executors": HeadSpec("categorical", num_classes=num_exec_classes)},
        rl=RLSpec(state_modalities=STATE_TOKENS, context_steps=context, max_timestep=MAX_TIMESTEP,
                  action_kind="vector", action_dim=ACTION_DIM, return_scale=RETURN_SCALE),
        norm={"return_scale": RETURN_SCALE, "gnn": gnn, "feature_version": FEATURE_VERSION,
              "num_exec_classes": num_exec_classes},
    )


def load_gnn(source: str = "decima") -> DecimaNet:
    """The frozen graph encoder: ``decima`` (pretrained ``decima_model.pt``) or
    ``random`` (Decima's architecture, seeded random weights: tests, no data)."""
    if source == "decima":
        net = build_decima(load_decima_state_dict(), source="decima_model.pt")
    elif source == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = DecimaNet()
    else:
        raise NetLLMError(f"--gnn: 'decima' or 'random', got {source!r}")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# ----------------------------------------------------------------------------- features


@dataclass
class Features:
    """One decision's inputs (numpy): state tokens, candidates and their executor caps."""

    glob: np.ndarray  # (GLOBAL_DIM,)
    pooled: np.ndarray  # (POOLED_DIM,)
    candidates: np.ndarray  # (M, CANDIDATE_DIM)
    caps: np.ndarray  # (M,) int


def featurize(gnn: DecimaNet, obs: CJSObservation) -> Features:
    """Frozen GNN embeddings -> candidate features and the two state vectors."""
    with torch_threads(1), torch.inference_mode():
        h, h_dag, h_glob = gnn.encode(obs)
    idx = obs.runnable
    jobs = obs.node_job[idx]
    cand = np.concatenate([obs.node_features[idx], h[idx].numpy(), h_dag[jobs].numpy()], axis=1)
    cand = cand.astype(np.float32)
    E = float(obs.num_executors)
    scalars = np.array([obs.num_jobs / 10.0, obs.num_committable_execs / E, len(idx) / 10.0,
                        float(obs.source_job_idx < obs.num_jobs), float(obs.exec_supplies.sum()) / E],
                       dtype=np.float32)
    glob = np.concatenate([h_glob[0].numpy().astype(np.float32), scalars])
    if len(idx):
        pooled = np.concatenate([cand.mean(0), cand.max(0)])
    else:
        pooled = np.zeros(POOLED_DIM, dtype=np.float32)
    return Features(glob, pooled.astype(np.float32), cand, obs.commit_caps[jobs].astype(np.int64))


def action_vector(candidate: torch.Tensor, num_exec: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The action token's input: chosen candidate features + limit / classes."""
    return torch.cat([candidate.float(), (num_exec.float() / num_classes).unsqueeze(-1)], dim=-1)


def exec_mask(caps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., classes) bool: limits 1..min(cap, classes) allowed (at least 1)."""
    caps = caps.long().clamp(1, num_classes)
    return torch.arange(num_classes, device=caps.device) < caps.unsqueeze(-1)


# ----------------------------------------------------------------------------- pools


def _reset(policy: Any, env: CJSEnv, seed: int, draw: int = 0, segment: int | None = None) -> None:
    """Seed a policy's sampling for its ``draw``-th episode on job sequence ``seed``: draw 0
    shares the simulator's stream (upstream's episode, as ``run_episode``); draw k >= 1
    gets a stream of its own, so the job sequence stays the same. ``segment``: the
    ``draw``-th continuation of that segment of a best-of-segments episode, with a stream
    of its own too."""
    if "rng" in inspect.signature(policy.reset).parameters:
        if segment is not None:
            rng = random.Random((seed * 1_000_003 + draw) * 100_003 + segment)
        else:
            rng = env.rng if draw == 0 else random.Random(seed * 1_000_003 + draw)
        policy.reset(seed, rng=rng)
    else:
        policy.reset(seed)


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
                 templates: Any = None, progress: bool = True) -> ExperiencePool:
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
    """
    from netllm.tasks.cjs.task import make_policy, pool_options

    draws, segment_s = pool_options(keep, draws, segment_s)
    net = load_gnn(gnn)
    made = {name: make_policy(name, config) for name in policies}
    if segment_s > 0:
        for name, policy in made.items():
            if hasattr(policy, "observe"):  # return-conditioned: its context cannot be forked
                raise NetLLMError(f"--segment: choose among the baseline schedulers, not {name}")
    plays = [(name, draw) for name in policies
             for draw in range(draws if getattr(made[name], "stochastic", True) else 1)]
    episodes, kept = [], []
    for seed in seeds:
        if segment_s > 0:
            t0 = time.perf_counter()
            ep, jct, segments = record_best_segments(CJSEnv.from_config(config, templates=templates),
                                                     [(made[n], d) for n, d in plays], net, seed,
                                                     segment_s * 1000.0)
            episodes.append(ep)
            kept.append({"policy": "+".join(policies), "seed": int(seed), "draws": len(plays),
                         "segments": segments, "avg_jct_s": jct})
            if progress:
                console.print(f"collected best of {len(plays)} every {segment_s:g} s, seed {seed}: "
                              f"{len(ep['rewards'])} decisions, {segments} segments, avg JCT {jct:.2f} s, "
                              f"{time.perf_counter() - t0:.1f} s")
            continue
        chosen = plays
        if keep == "best" and len(plays) > 1:
            returns = {}
            for name, draw in plays:
                ep, jct = record_episode(CJSEnv.from_config(config, templates=templates), made[name], None, seed, draw)
                returns[(name, draw)] = float(ep["rewards"].sum())
                if progress:
                    console.print(f"  {name} seed {seed} draw {draw}: avg JCT {jct:.2f} s")
            chosen = [max(plays, key=lambda p: returns[p])]
        for name, draw in chosen:
            env = CJSEnv.from_config(config, templates=templates)
            t0 = time.perf_counter()
            ep, jct = record_episode(env, made[name], net, seed, draw)
            episodes.append(ep)
            kept.append({"policy": name, "seed": int(seed), "draw": draw, "avg_jct_s": jct})
            if progress:
                console.print(f"collected {name} seed {seed} draw {draw}: {len(ep['rewards'])} decisions, "
                              f"avg JCT {jct:.2f} s, return {ep['rewards'].sum() / RETURN_SCALE:.2f} (x1e6 ms), "
                              f"{time.perf_counter() - t0:.1f} s")
    meta = {"task": "cjs", "policies": list(policies), "seeds": list(seeds), "gnn": gnn, "keep": keep,
            "draws": draws, "segment_s": segment_s, "episodes": kept,
            "jobs": config.num_jobs, "executors": config.num_executors, "arrival_rate": config.arrival_rate,
            "feature_version": FEATURE_VERSION, "reward": "negative job time between decisions (ms)"}
    return pool_from_episodes(episodes, meta)


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


# ----------------------------------------------------------------------------- training


@dataclass
class CJSBatch:
    """K-step windows plus the candidates and logged actions the heads need."""

    window: WindowBatch  # actions = action vectors (B, K, ACTION_DIM)
    candidates: torch.Tensor  # (B, K, M, C)
    cand_mask: torch.Tensor  # (B, K, M)
    cand_caps: torch.Tensor  # (B, K, M)
    stage: torch.Tensor  # (B, K)
    num_exec: torch.Tensor  # (B, K)


class CJSWindowSampler(WindowSampler):
    """``WindowSampler`` that also gathers the candidate arrays of every window step."""

    def __init__(self, pool: ExperiencePool, spec: RLSpec, batch_size: int, seed: int = 0,
                 num_exec_classes: int = NUM_EXEC_CLASSES) -> None:
        super().__init__(pool, spec, batch_size, seed)
        self.num_exec_classes = num_exec_classes

    def cjs_windows(self, end_rows: np.ndarray) -> CJSBatch:
        w = self.windows(end_rows)
        K = self.spec.context_steps
        end_rows = np.asarray(end_rows, dtype=np.int64)
        rows = end_rows[:, None] + np.arange(-K + 1, 1)[None, :]
        mask = w.mask.numpy()
        rows = np.where(mask, rows, end_rows[:, None])
        st = self.pool.states
        cand = torch.from_numpy(st["candidates"][rows]).float()
        cmask = torch.from_numpy(st["cand_mask"][rows] & mask[:, :, None])
        caps = torch.from_numpy(st["cand_caps"][rows]).long()
        acts = torch.from_numpy(self.pool.actions[rows]).long()
        stage = acts[..., 0].clamp(min=0)
        num_exec = acts[..., 1].clamp(min=1)
        chosen = cand.gather(2, stage[:, :, None, None].expand(-1, -1, 1, cand.shape[-1]))[:, :, 0]
        vec = action_vector(chosen, num_exec.clamp(max=self.num_exec_classes), self.num_exec_classes)
        vec = vec * torch.from_numpy(mask)[:, :, None]  # padding steps: zeros, as WindowSampler
        window = WindowBatch(states=w.states, actions=vec, rtg=w.rtg, timesteps=w.timesteps, mask=w.mask)
        return CJSBatch(window, cand, cmask, caps, stage, num_exec)

    def batch(self, i: int) -> CJSBatch:  # type: ignore[override]
        rng = np.random.default_rng([self.seed, i])
        return self.cjs_windows(rng.integers(0, len(self.pool), size=self.batch_size))


def head_logits(model: NetLLM, hidden: torch.Tensor, candidates: torch.Tensor, cand_mask: torch.Tensor,
                chosen: torch.Tensor | None = None, caps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage scores (n, M) and, given the chosen candidate (n, C) and its cap (n,), the
    executor-limit logits (n, classes)."""
    dev = model.device
    stage_logits = model.heads["stage"](hidden, candidates.to(dev), cand_mask.to(dev))
    if chosen is None:
        return stage_logits, None
    classes = model.heads["executors"].num_classes
    exec_hidden = hidden + model.encoders("chosen", chosen.to(dev))
    exec_logits = model.heads["executors"](exec_hidden, exec_mask(caps.to(dev), classes))
    return stage_logits, exec_logits


def cjs_loss(model: NetLLM, batch: CJSBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the logged stage (over the runnable set) + of the logged limit."""
    dev = model.device
    hidden = decision_hidden(model, batch.window)  # (B, K, H)
    real = batch.window.mask.to(dev)
    h = hidden[real]
    cand = batch.candidates.to(dev)[real]
    stage = batch.stage.to(dev)[real]
    rows = torch.arange(len(stage), device=dev)
    chosen = cand[rows, stage]
    caps = batch.cand_caps.to(dev)[real][rows, stage]
    stage_logits, exec_logits = head_logits(model, h, cand, batch.cand_mask.to(dev)[real], chosen, caps)
    assert exec_logits is not None
    classes = exec_logits.shape[-1]
    target = (batch.num_exec.to(dev)[real] - 1).clamp(min=0)
    target = torch.minimum(target, caps.clamp(1, classes) - 1)
    stage_loss = F.cross_entropy(stage_logits, stage)
    exec_loss = F.cross_entropy(exec_logits, target)
    metrics = {
        "stage_loss": stage_loss.item(), "exec_loss": exec_loss.item(),
        "stage_accuracy": (stage_logits.argmax(-1) == stage).float().mean().item(),
        "exec_accuracy": (exec_logits.argmax(-1) == target).float().mean().item(),
        "tokens": int(real.sum().item()) * model.config.rl.tokens_per_step,
    }
    return stage_loss + exec_loss, metrics


# ----------------------------------------------------------------------------- policy


def decode_temperature(decode: str) -> float:
    """``--decode``: ``argmax`` (the most likely stage and limit: temperature 0), ``sample``
    (from the heads' distributions, as Decima does: temperature 1) or ``sample:T`` (from
    softmax(logits / T), T > 0; T < 1 sharpens towards the arg-max)."""
    kind, sep, temp = str(decode).partition(":")
    try:
        if kind == "argmax" and not sep:
            return 0.0
        if kind == "sample":
            value = float(temp) if sep else 1.0
            if value > 0 and np.isfinite(value):
                return value
    except ValueError:
        pass
    raise NetLLMError(f"--decode: argmax, sample or sample:T (a temperature T > 0), got {decode!r}")


class NetLLMCJSPolicy:
    """A trained adapter behind the schedulers' interface (``reset`` / ``act``), deciding
    with the KV cache (``use_cache=False`` recomputes the whole context: a control).
    The episode runner passes each reward to ``observe`` (it lowers the target return)."""

    def __init__(self, model: NetLLM, target: float, gnn: DecimaNet, temperature: float = 0.0,
                 name: str = "netllm", use_cache: bool = True, num_threads: int | None = 1) -> None:
        self.model, self.target, self.gnn = model, target, gnn
        self.num_threads = num_threads  # a few tokens per decision: one thread avoids OpenMP contention
        self.temperature = float(temperature)  # 0: arg-max; T > 0: sample from softmax(logits / T)
        self.name, self.use_cache = name, use_cache
        self.classes = model.heads["executors"].num_classes
        self.inc: IncrementalPolicy | None = None
        self.prev_action: torch.Tensor | None = None
        self.reward_since = 0.0
        self.rng = random.Random(0)

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto", target: float | None = None,
                     decode: str | None = None, gnn: DecimaNet | None = None) -> "NetLLMCJSPolicy":
        """``decode`` (see ``decode_temperature``); None: as the adapter's recipe was validated
        (arg-max if unrecorded)."""
        config = read_adapter_config(folder)
        if decode is None:
            decode = str(config.get("extra", {}).get("recipe", {}).get("decode", "argmax"))
        temperature = decode_temperature(decode)
        model = NetLLM.from_adapter(folder, task="cjs", device=device)
        goal = target if target is not None else config.get("extra", {}).get("target_return")
        if goal is None:
            raise NetLLMError(f"{folder}: adapter config has no target_return; pass target=")
        net = gnn if gnn is not None else load_gnn(config.get("norm", {}).get("gnn", "decima"))
        return cls(model, float(goal), net, temperature=temperature, name=Path(folder).name)

    def reset(self, seed: int | None = None, rng: random.Random | None = None) -> None:
        self.inc = IncrementalPolicy(self.model, target=self.target, batch_size=1, use_cache=self.use_cache)
        self.prev_action, self.reward_since = None, 0.0
        self.rng = random.Random(seed)  # own stream: sampling never perturbs the simulator

    def observe(self, reward: float) -> None:
        self.reward_since += float(reward)

    @torch.no_grad()
    def decide(self, obs: CJSObservation) -> tuple[torch.Tensor, torch.Tensor, Features]:
        """Hidden state (1, H) and stage logits (1, M) of this decision (records the previous one)."""
        assert self.inc is not None, "reset() first"
        f = featurize(self.gnn, obs)
        if self.prev_action is not None:
            self.inc.record(self.prev_action, torch.tensor([self.reward_since]))
            self.reward_since = 0.0
        hidden = self.inc.decide({"global": torch.from_numpy(f.glob)[None],
                                  "pooled": torch.from_numpy(f.pooled)[None]})
        cand = torch.from_numpy(f.candidates)[None]
        stage_logits, _ = head_logits(self.model, hidden, cand, torch.ones(1, len(f.caps), dtype=torch.bool))
        return hidden, stage_logits, f

    def _pick(self, logits: torch.Tensor) -> int:
        if not self.sample:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float().cpu() / self.temperature, -1).numpy()
        return self.rng.choices(range(probs.size), probs)[0]

    def act(self, obs: CJSObservation) -> CJSAction:
        if len(obs.runnable) == 0:
            return CJSAction(-1, int(obs.num_committable_execs))
        with torch_threads(self.num_threads), torch.no_grad():
            return self._act(obs)

    def _act(self, obs: CJSObservation) -> CJSAction:
        hidden, stage_logits, f = self.decide(obs)
        stage = self._pick(stage_logits[0])
        chosen = torch.from_numpy(f.candidates[stage])[None]
        cap = torch.tensor([int(f.caps[stage])], device=self.model.device)
        exec_hidden = hidden + self.model.encoders("chosen", chosen.to(self.model.device))
        exec_logits = self.model.heads["executors"](exec_hidden, exec_mask(cap, self.classes))
        num_exec = self._pick(exec_logits[0]) + 1
        self.prev_action = action_vector(chosen, torch.tensor([num_exec]), self.classes).to(self.model.device)
        return CJSAction(stage, num_exec)


def run_netllm_episode(env: CJSEnv, policy: Any, seed: int | None = None, max_decisions: int | None = None
                       ) -> EpisodeResult:
    """``run_episode`` for a return-conditioned policy: each reward goes to ``observe``.
    ``max_decisions`` stops early (timings); the JCT is then that of the jobs so far."""
    start = time.perf_counter()
    obs, _ = env.reset(seed)
    policy.reset(seed)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
        policy.observe(reward)
        total += reward
        if terminated or truncated or (max_decisions is not None and env.num_decisions >= max_decisions):
            break
    return EpisodeResult(
        scheduler=getattr(policy, "name", "netllm"), seed=seed, avg_jct_s=env.avg_jct_s, total_reward=total,
        num_events=env.num_events, num_decisions=env.num_decisions, sim_time_ms=env.wall_time_ms,
        wall_s=time.perf_counter() - start, records=env.job_records(),
    )


# ----------------------------------------------------------------------------- adaptation


@dataclass
class AdaptRecipe:
    """Every hyper-parameter of CJS adaptation, visible in one place (upstream with
    Llama2-7B: rank 128, lr 1e-4, K = 20)."""

    llm: str = "smollm2"
    layers: int | None = 4
    rank: int = 16
    context: int = 20
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    schedule: str = "constant"  # learning rate after warm-up: constant, linear or cosine (to 0)
    target_quantile: float = 0.9
    eval_every: int = 0  # >0: validate (one episode of eval_jobs jobs) and keep the best adapter
    eval_jobs: int = 50
    eval_seed: int = 1000
    pretrained: bool = True
    seed: int = 0
    decode: str = "argmax"  # run-time decoding (argmax, sample or sample:T), also of the validation episodes


def adapt(pool: ExperiencePool, out: Path, recipe: AdaptRecipe, *, device: str = "auto", resume: bool = False,
          progress: bool = True, templates: Any = None) -> Path:
    """DD-LRNA for CJS: return-conditioned offline RL on the pool; returns the adapter folder."""
    from netllm.train import TrainConfig, train

    check_pool(pool, out)
    seed_everything(recipe.seed)
    gnn_source = str(pool.meta.get("gnn", "decima"))
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, context=recipe.context,
                          pretrained=recipe.pretrained, seed=recipe.seed, gnn=gnn_source)
    model = NetLLM(config, device=device)
    sampler = CJSWindowSampler(pool, config.rl, batch_size=recipe.batch_size, seed=recipe.seed)
    goal = target_return(pool, recipe.target_quantile)
    t0 = time.perf_counter()
    keeper = BestAdapter(out, "jct_s", higher_is_better=False, extra=lambda: {
        "target_return": goal, "recipe": recipe.__dict__, "pool": pool.meta,
        "train_seconds": time.perf_counter() - t0})

    eval_fn: Callable[[Any, int], dict[str, float]] | None = None
    if recipe.eval_every > 0:
        gnn = load_gnn(gnn_source)
        valid = CJSConfig(num_jobs=recipe.eval_jobs, num_executors=int(pool.meta.get("executors", 50)))

        def eval_fn(m: Any, step: int) -> dict[str, float]:
            m.eval()
            env = CJSEnv.from_config(valid, templates=templates)
            policy = NetLLMCJSPolicy(m, goal, gnn, temperature=decode_temperature(recipe.decode))
            jct = run_netllm_episode(env, policy, seed=recipe.eval_seed).avg_jct_s
            keeper.update(m, jct, step)
            return {"jct_s": jct}

    train_config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps,
                                                                                   recipe.steps // 4),
                               weight_decay=recipe.weight_decay, schedule=recipe.schedule,  # type: ignore[arg-type]
                               eval_every=recipe.eval_every,
                               checkpoint_every=max(recipe.steps // 10, 25), log_every=10, seed=recipe.seed,
                               progress=progress)
    train(model, sampler.batch, cjs_loss, train_config, out / "train", eval_fn=eval_fn, resume=resume)
    return keeper.finish(model)


# ----------------------------------------------------------------------------- speed


def speed_report(adapter: Path, device: str = "auto", decisions: int = 300, jobs: int = 200,
                 seed: int = 1) -> dict[str, float]:
    """NetLLM decision latency with the KV cache vs full recompute (the first ``decisions``
    decisions of one default-setting episode), and simulated events/s under FIFO."""
    from netllm.tasks.cjs.baselines import make_scheduler, run_episode

    report: dict[str, float] = {}
    res = run_episode(CJSEnv(num_jobs=jobs), make_scheduler("fifo"), seed=seed)
    report["sim_events_per_s_fifo"] = res.events_per_s
    policy = NetLLMCJSPolicy.from_adapter(adapter, device=device)
    for use_cache in (True, False):
        policy.use_cache = use_cache
        r = run_netllm_episode(CJSEnv(num_jobs=jobs), policy, seed=seed, max_decisions=decisions)
        report["decision_ms_kv_cache" if use_cache else "decision_ms_full_recompute"] = r.wall_s / r.num_decisions * 1e3
    report["decisions_timed"] = float(decisions)
    return report
