"""Headroom of a rollout (lookahead) improvement of Decima, on validation job sequences.

Issue 14 / specs/online.md: before distilling a lookahead teacher, measure how far the
lookahead policy itself gets ahead of Decima; distil it only if that headroom is >= 5 %.
(The best-of-segments pool of docs/results/cjs.md filters lucky continuations; this is
the policy improvement step proper: compare actions from the same state.)

At every decision where Decima is unsure of the stage (its most likely stage holds less
than ``--confident`` of the probability), the most likely stages (up to ``--candidates``,
together ``--mass`` of the probability) are each played on forks of the simulator: the
candidate stage with an executor limit drawn from Decima's limit head, then Decima for
``--horizon`` simulated seconds. Every candidate gets ``--rollouts`` forks with common
random numbers: rollout m of every candidate draws its task durations and Decima's
samples from the same seeded stream. The candidate whose jobs spent the least time in
the system over the horizon is played in the real episode; elsewhere Decima decides as
usual, from the simulator's stream. Decima on the same job sequences, exactly as
``netllm eval cjs --policy decima`` plays them, is the paired reference.

The lookahead needs the simulator at every decision: a teacher, not a deployable policy.

    NETLLM_DATA=<data folder> OMP_NUM_THREADS=1 python benchmarks/cjs_lookahead.py \\
        --seeds 1001-1003 --jobs 50 --out runs/cjs-lookahead.json

Never run it on the test seeds 1-10 to choose anything.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netllm.stats import describe, paired_difference
from netllm.tasks.cjs.baselines import DecimaScheduler, run_episode
from netllm.tasks.cjs.sim import CJSAction, CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError, atomic_write_json, parse_seeds, torch_threads


def stage_probabilities(decima: DecimaScheduler, obs: CJSObservation) -> tuple[np.ndarray, Any]:
    """Decima's probability of every schedulable stage, and the embeddings it came from."""
    emb = decima.net.encode(obs)
    return torch.softmax(decima.net.stage_logits(obs, *emb), 0).numpy(), emb


def candidates(probs: np.ndarray, k: int, mass: float) -> list[int]:
    """The most likely stages, at most ``k``, until they hold ``mass`` of the probability."""
    order = np.argsort(-probs, kind="stable")
    chosen, held = [], 0.0
    for i in order[:k]:
        chosen.append(int(i))
        held += float(probs[i])
        if held >= mass:
            break
    return chosen


def play_batch(forks: list[tuple[CJSEnv, CJSObservation]], decima: DecimaScheduler, until_ms: float) -> None:
    """Decima on every fork in lock-step, one batched GNN pass per round (each fork
    drawing from its own stream, ``fork.rng``), until each ends or reaches ``until_ms``."""
    decima.open(len(forks))
    for slot, (env, _) in enumerate(forks):
        decima.start(slot, None, env)
    running = [(slot, env, obs) for slot, (env, obs) in enumerate(forks) if env.wall_time_ms < until_ms]
    while running:
        actions = decima.act_batch([slot for slot, _, _ in running], [obs for _, _, obs in running])
        still = []
        for (slot, env, _), action in zip(running, actions):
            obs, _, terminated, truncated, _ = env.step(action)
            if not (terminated or truncated) and env.wall_time_ms < until_ms:
                still.append((slot, env, obs))
        running = still


def lookahead_episode(env: CJSEnv, decima: DecimaScheduler, seed: int, args: argparse.Namespace
                      ) -> dict[str, Any]:
    """One episode of the lookahead policy on job sequence ``seed``."""
    obs, _ = env.reset(seed)
    decima.reset(seed, rng=env.rng)
    rollout = copy.deepcopy(decima)
    horizon_ms = args.horizon * 1000.0
    decisions = looked = changed = 0
    t_start = time.perf_counter()
    while True:
        action = None
        if len(obs.runnable) > 1:
            with torch_threads(1), torch.inference_mode():
                probs, emb = stage_probabilities(decima, obs)
            if probs.max() < args.confident:
                stages = candidates(probs, args.candidates, args.mass)
                if len(stages) > 1:
                    action = best_candidate(env, obs, decima, rollout, emb, stages, seed, decisions, horizon_ms,
                                            args.rollouts)
                    looked += 1
                    changed += int(action.stage_idx != stages[0])
            if action is None:  # Decima's own draw, from the embeddings already computed
                with torch_threads(1), torch.inference_mode():
                    action = decima._decide(obs, *emb, decima.rng)
        if action is None:
            action = decima.act(obs)
        if len(obs.runnable):
            decisions += 1
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    return {"avg_jct_s": env.avg_jct_s, "decisions": decisions, "looked_ahead": looked,
            "not_most_likely": changed, "wall_s": time.perf_counter() - t_start}


def best_candidate(env: CJSEnv, obs: CJSObservation, decima: DecimaScheduler, rollout: DecimaScheduler,
                   emb: Any, stages: list[int], seed: int, decision: int, horizon_ms: float,
                   rollouts: int) -> CJSAction:
    """The candidate stage (with a limit from Decima's head) whose forks keep the jobs in
    the system least over the horizon; common random numbers across candidates."""
    t0 = env.wall_time_ms
    limit_rng = random.Random((seed * 1_000_003 + decision) * 7 + 1)
    plays: list[CJSAction] = []
    for stage in stages:
        job = int(obs.node_job[obs.runnable[stage]])
        with torch_threads(1), torch.inference_mode():
            logits = decima.net.exec_logits(obs, job, emb[1], emb[2])
        pi = torch.softmax(logits, 0).numpy()
        action = CJSAction(stage, limit_rng.choices(range(pi.size), pi)[0] + 1)
        plays.append(action)
    forks = []  # every candidate x rollout, stepped past the candidate's action
    for action in plays:
        for m in range(rollouts):
            twin, _ = env.fork()
            twin.rng = random.Random((seed * 1_000_003 + decision) * 101 + m)  # common random numbers
            twin_obs, _, terminated, truncated, _ = twin.step(action)
            forks.append((twin, twin_obs) if not (terminated or truncated) else (twin, None))
    play_batch([f for f in forks if f[1] is not None], rollout, t0 + horizon_ms)
    scores = [sum(twin.job_time_ms(t0, t0 + horizon_ms) for twin, _ in forks[i * rollouts:(i + 1) * rollouts])
              for i in range(len(plays))]
    best = min(range(len(plays)), key=lambda i: scores[i])
    return plays[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1001-1003", help="validation job sequences (never 1-10)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--executors", type=int, default=50)
    parser.add_argument("--horizon", type=float, default=300.0, help="simulated seconds of each rollout")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--mass", type=float, default=0.95)
    parser.add_argument("--confident", type=float, default=0.9)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/cjs-lookahead.json"))
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds, "--seeds")
    if set(seeds) & set(range(1, 11)):
        raise SystemExit("--seeds: 1-10 are the test job sequences; measure headroom on validation ones")
    if args.candidates < 2 or args.rollouts < 1 or args.horizon <= 0:
        raise SystemExit("--candidates must be >= 2, --rollouts >= 1, --horizon > 0")
    config = CJSConfig(num_jobs=args.jobs, num_executors=args.executors)
    decima = DecimaScheduler()
    base, look, rows = {}, {}, []
    for seed in seeds:
        try:
            ref = run_episode(CJSEnv.from_config(config), decima, seed)
            ep = lookahead_episode(CJSEnv.from_config(config), decima, seed, args)
        except NetLLMError as e:
            raise SystemExit(str(e)) from None
        base[seed], look[seed] = ref.avg_jct_s, ep["avg_jct_s"]
        rows.append({"seed": seed, "decima": ref.avg_jct_s, **ep})
        print(f"seed {seed}: Decima {ref.avg_jct_s:.3f} s, lookahead {ep['avg_jct_s']:.3f} s "
              f"({ep['looked_ahead']} of {ep['decisions']} decisions looked ahead, "
              f"{ep['not_most_likely']} not the most likely stage; {ep['wall_s']:.0f} s)", flush=True)
    mean_base, mean_look = float(np.mean(list(base.values()))), float(np.mean(list(look.values())))
    diff = paired_difference(look, base, "lower")
    headroom = 100 * (mean_base - mean_look) / mean_base
    print(f"Decima {mean_base:.3f} s, lookahead {mean_look:.3f} s; lookahead - Decima {describe(diff, ' s')}; "
          f"headroom {headroom:+.1f} % (distil only if >= 5 %)")
    atomic_write_json(args.out, {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                 "per_seed": rows, "decima_mean": mean_base, "lookahead_mean": mean_look,
                                 "difference": diff, "headroom_pct": headroom})


if __name__ == "__main__":
    main()
