"""How good is the behaviour in a CJS experience pool? The average JCT of each pool's
episodes, per job sequence, on the sequences that all the pools share — e.g. upstream's
Decima episodes against the best-of-segments pool built from the same Decima:

    .venv/bin/python benchmarks/cjs_pools.py runs/pool-cjs-a runs/pool-cjs-b --vs runs/pool-cjs-seg-a runs/pool-cjs-seg-b

Reads only the pools' metadata (every episode records its seed and average JCT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from netllm.rl import ExperiencePool
from netllm.utils import NetLLMError


def per_seed(paths: list[Path]) -> dict[int, float]:
    out: dict[int, float] = {}
    for path in paths:
        for ep in ExperiencePool.load(path, task="cjs").meta.get("episodes", []):
            if int(ep["seed"]) in out:
                raise NetLLMError(f"{path}: job sequence {ep['seed']} appears twice in one side")
            out[int(ep["seed"])] = float(ep["avg_jct_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pools", nargs="+", type=Path, help="the reference side (one or more pools)")
    ap.add_argument("--vs", nargs="+", type=Path, required=True, help="the other side")
    args = ap.parse_args()
    a, b = per_seed(args.pools), per_seed(args.vs)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit("no job sequence in common")
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    rel = (y - x) / x
    print(json.dumps({"sequences": len(seeds), "reference_mean_jct_s": round(float(x.mean()), 3),
                      "other_mean_jct_s": round(float(y.mean()), 3),
                      "mean_relative_change": round(float(rel.mean()), 4),
                      "other_better_on": int((y < x).sum())}, indent=1))


if __name__ == "__main__":
    main()
