"""Which experience pool? Chosen on validation traces only (issue 15).

The cheap proxy of the ABR recipe: the same small Decision Transformer (no LLM, 3 layers
x 128, K = 10, 1,500 steps, minutes per training on one core) trained on differently
built pools, once per training seed, and scored on ``fcc-holdout`` (the 34 validation
traces no pool plays; delay noise and random starts, evaluation seeds 1-3) with video1
and video2. The pools play ``fcc-pool`` with pool seeds 1-2, as ``netllm collect abr``
and ``netllm bench abr`` do. fcc-test is never loaded: the choice this makes is clean.

    NETLLM_DATA=<data folder> OMP_NUM_THREADS=1 python benchmarks/abr_pools.py \\
        [--pools NAME,NAME] [--train-seeds 0-2] [--out runs/bench-abr-pools-valid]

Every finished stage is reused (a pool's ``pool.npz``, a training's adapter and its
``seedS.json`` scores), so disjoint ``--pools`` subsets can run as two processes into
the same ``--out``; each writes ``<out>/pools.json`` from every score present, with the
paired difference (over training seeds, 95 % t interval) of each pool minus ``--reference``
(the README recipe's pool).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from netllm.rl import ExperiencePool
from netllm.stats import describe, paired_difference
from netllm.tasks.abr.task import ABRRecipe, NetLLMABRPolicy, adapt, collect_pools, evaluate
from netllm.tasks.abr.traces import load_traces, load_video
from netllm.utils import atomic_write_json, parse_seeds

VIDEOS = ("video1", "video2")
POOLS = {  # name: (behaviour policies, keep, pool videos)
    "genet": (["genet"], "all", VIDEOS),
    "mpc": (["mpc"], "all", VIDEOS),
    "genet+mpc+bba mixed": (["genet", "mpc", "bba"], "all", VIDEOS),
    "best of genet/mpc/bba on video1 only": (["genet", "mpc", "bba"], "best", ("video1",)),
    "best of genet/mpc/bba": (["genet", "mpc", "bba"], "best", VIDEOS),
}
REFERENCE = "best of genet/mpc/bba"  # what `netllm bench abr` collects by default


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def summarise(out: Path, reference: str) -> dict:
    """Every score under ``out``: per pool the mean and std over training seeds, and the
    paired difference against ``reference`` on the seeds both have."""
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for name in POOLS:
        for f in sorted((out / slug(name)).glob("seed*.json")):
            scores.setdefault(name, {})[int(f.stem[4:])] = json.loads(f.read_text())
    summary: dict = {"protocol": "pools play fcc-pool (pool seeds 1-2); scored on fcc-holdout, "
                                 "evaluation seeds 1-3; fcc-test never loaded", "pools": {}}
    for name, per_seed in scores.items():
        row: dict = {"train_seeds": sorted(per_seed)}
        for key in ("video1", "video2", "both"):
            vals = [s[key] for s in per_seed.values()]
            row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "per_seed": {s: v[key] for s, v in per_seed.items()}}
        ref = scores.get(reference, {})
        common = sorted(set(per_seed) & set(ref))
        if name != reference and common:
            row["minus_reference"] = {key: paired_difference({s: per_seed[s][key] for s in common},
                                                             {s: ref[s][key] for s in common}, "higher")
                                      for key in ("video1", "video2", "both")}
        summary["pools"][name] = row
    summary["reference"] = reference
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--train-seeds", default="0-2")
    parser.add_argument("--eval-seeds", default="1-3")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-abr-pools-valid"))
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated subset of: " + "; ".join(POOLS))
    parser.add_argument("--reference", default=REFERENCE)
    args = parser.parse_args()
    names = [n.strip() for n in args.pools.split(",") if n.strip()]
    unknown = [n for n in names if n not in POOLS]
    if unknown or args.reference not in POOLS:
        raise SystemExit(f"--pools / --reference: unknown pool {(unknown or [args.reference])[0]!r}; "
                         f"known: {'; '.join(POOLS)}")
    train_seeds = parse_seeds(args.train_seeds, "--train-seeds")
    eval_seeds = parse_seeds(args.eval_seeds, "--eval-seeds")
    pool_traces, valid = load_traces("fcc-pool"), load_traces("fcc-holdout")
    videos = {v: load_video(v) for v in VIDEOS}
    for name in names:
        policies, keep, pool_videos = POOLS[name]
        folder = args.out / slug(name)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "pool.npz").is_file():
            pool = ExperiencePool.load(folder / "pool.npz", task="abr")
        else:
            pool = collect_pools(policies, pool_traces, [videos[v] for v in pool_videos], [1, 2], keep=keep)
            pool.save(folder / "pool.npz")
        for seed in train_seeds:
            if (folder / f"seed{seed}.json").is_file():
                continue
            recipe = ABRRecipe(llm="scratch", layers=3, rank=0, context=10, steps=args.steps, lr=3e-4, seed=seed)
            t0 = time.perf_counter()
            adapter = adapt(pool, folder / f"seed{seed}", recipe, device="cpu", resume=True, eval_traces=valid,
                            eval_video=videos["video1"], progress=False)
            row = {"episodes": pool.num_episodes, "train_s": time.perf_counter() - t0}
            for v, video in videos.items():
                row[v] = evaluate(NetLLMABRPolicy.from_adapter(adapter), valid, video, eval_seeds).mean
            row["both"] = (row["video1"] + row["video2"]) / 2
            atomic_write_json(folder / f"seed{seed}.json", row)
            print(f"{name}, training seed {seed}: " + json.dumps({k: round(x, 3) for k, x in row.items()}),
                  flush=True)
        summary = summarise(args.out, args.reference)
        atomic_write_json(args.out / "pools.json", summary)
    for name, row in summarise(args.out, args.reference)["pools"].items():
        line = "  ".join(f"{k} {row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("video1", "video2", "both"))
        print(f"{name} (training seeds {row['train_seeds']}): {line}")
        for key, diff in row.get("minus_reference", {}).items():
            print(f"    minus {args.reference}, {key}: {describe(diff)}")


if __name__ == "__main__":
    main()
