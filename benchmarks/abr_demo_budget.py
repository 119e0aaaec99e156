"""Levers for the demo's small budget, judged on the demo's validation traces only.

Builds the demo's pool once (best of GENET / RobustMPC / BBA per fcc-train trace 1-200,
seed and video), then trains one variant of the demo recipe per call and prints the
validation curve (held-out fcc-train traces 201-235, video1, seed 1) beside the
baselines' QoE on the same traces. Run variants side by side with one thread each:

    OMP_NUM_THREADS=1 NETLLM_DATA=<data folder> python benchmarks/abr_demo_budget.py demo '{}'
    OMP_NUM_THREADS=1 NETLLM_DATA=<data folder> python benchmarks/abr_demo_budget.py l2 \
        '{"layers": 2, "lr": 0.001, "schedule": "cosine", "steps": 1200}'

Writes runs/bench-abr-demo-budget/<name>/ (the adapter and train/metrics.csv) and
<name>.json (the curve). The test traces are never touched.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

from netllm.rl import ExperiencePool
from netllm.tasks.abr.task import DEMO_RECIPE, adapt, collect_pools, demo_data, evaluate, policy_by_name
from netllm.utils import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="variant name (its run folder)")
    parser.add_argument("overrides", help="JSON object of ABRRecipe fields that differ from the demo recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-abr-demo-budget"))
    args = parser.parse_args()
    d = demo_data(fetch=False)
    pool_path = args.out / "pool.npz"
    if not pool_path.is_file():
        collect_pools(["genet", "mpc", "bba"], d.train, d.videos, seeds=[1, 2], keep="best").save(pool_path)
    pool = ExperiencePool.load(pool_path, task="abr")
    recipe = dataclasses.replace(DEMO_RECIPE, **json.loads(args.overrides))
    t0 = time.perf_counter()
    adapt(pool, args.out / args.name, recipe, device="cpu", eval_traces=d.valid, eval_video=d.videos[0],
          progress=False)
    train_s = time.perf_counter() - t0
    with open(args.out / args.name / "train" / "metrics.csv") as f:
        curve = {int(r["step"]): float(r["eval_qoe"]) for r in csv.DictReader(f) if r.get("eval_qoe")}
    baselines = {n: evaluate(policy_by_name(n), d.valid, d.videos[0], [1]).mean for n in ("genet", "mpc", "bba")}
    result = {"recipe": dataclasses.asdict(recipe), "train_s": train_s, "valid_qoe": curve,
              "best": max(curve.items(), key=lambda kv: kv[1]) if curve else None, "baselines_valid": baselines}
    atomic_write_json(args.out / f"{args.name}.json", result)
    print(json.dumps({k: result[k] for k in ("best", "baselines_valid", "train_s")}))


if __name__ == "__main__":
    main()
