"""How good is the behaviour in a CJS experience pool, and how does it act? The average
JCT of each side's episodes on the job sequences both sides share, and on those
sequences the actions' statistics (mean executor limit, share of limits at the job's
cap, share of first-candidate stages, runnable stages per decision) — e.g. upstream's
Decima episodes against the best-of-segments pool built from the same Decima:

    .venv/bin/python benchmarks/cjs_pools.py runs/pool-cjs-a runs/pool-cjs-b --vs runs/pool-cjs-seg-a runs/pool-cjs-seg-b

Every episode's metadata records its job sequence (seed) and average JCT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from netllm.rl import ExperiencePool
from netllm.utils import NetLLMError


def per_seed(paths: list[Path]) -> tuple[dict[int, float], list[tuple[ExperiencePool, dict[int, int]]]]:
    """{seed: avg JCT}, and per pool {seed: episode index}."""
    out: dict[int, float] = {}
    pools = []
    for path in paths:
        pool = ExperiencePool.load(path, task="cjs")
        index = {}
        for i, ep in enumerate(pool.meta.get("episodes", [])):
            if int(ep["seed"]) in out:
                raise NetLLMError(f"{path}: job sequence {ep['seed']} appears twice in one side")
            out[int(ep["seed"])] = float(ep["avg_jct_s"])
            index[int(ep["seed"])] = i
        pools.append((pool, index))
    return out, pools


def action_stats(pools: list[tuple[ExperiencePool, dict[int, int]]], seeds: list[int]) -> dict[str, float]:
    limits, at_cap, first, cands = [], [], [], []
    for pool, index in pools:
        starts, ends = pool.episode_bounds
        for seed in seeds:
            if seed not in index:
                continue
            rows = slice(starts[index[seed]], ends[index[seed]])
            acts = pool.actions[rows]
            caps = pool.states["cand_caps"][rows][np.arange(len(acts)), acts[:, 0]]
            limits.append(acts[:, 1])
            at_cap.append(acts[:, 1] >= caps)
            first.append(acts[:, 0] == 0)
            cands.append(pool.states["cand_mask"][rows].sum(1))
    return {"decisions": int(sum(len(x) for x in limits)),
            "mean_limit": round(float(np.concatenate(limits).mean()), 3),
            "limit_at_cap": round(float(np.concatenate(at_cap).mean()), 4),
            "first_candidate": round(float(np.concatenate(first).mean()), 4),
            "runnable_stages": round(float(np.concatenate(cands).mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pools", nargs="+", type=Path, help="the reference side (one or more pools)")
    ap.add_argument("--vs", nargs="+", type=Path, required=True, help="the other side")
    args = ap.parse_args()
    (a, pools_a), (b, pools_b) = per_seed(args.pools), per_seed(args.vs)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("no job sequence in common")
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    rel = (y - x) / x
    print(json.dumps({"sequences": len(seeds), "reference_mean_jct_s": round(float(x.mean()), 3),
                      "other_mean_jct_s": round(float(y.mean()), 3),
                      "mean_relative_change": round(float(rel.mean()), 4),
                      "other_better_on": int((y < x).sum()),
                      "reference_actions": action_stats(pools_a, seeds),
                      "other_actions": action_stats(pools_b, seeds)}, indent=1))


if __name__ == "__main__":
    main()
