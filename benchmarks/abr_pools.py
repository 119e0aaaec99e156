"""Which experience pool? The same small Decision Transformer (no LLM, 3 layers x 128,
K = 10, 1,500 steps) trained on differently built ABR pools, scored on fcc-valid (150
traces, delay noise, seed 1) and fcc-test (upstream setting) with video1 and video2.
It is the cheap way (minutes per pool, one core) to choose the pool an LLM is then
adapted on.

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/abr_pools.py [--steps 1500] [--out runs/bench-abr-pools]

Pools (fcc-train, pool seeds 1-2): GENET on video1; GENET + MPC + BBA mixed on video1;
the best of GENET / MPC / BBA per (trace, seed) on video1, and on video1 + video2; the
oracle alone on video1. Writes <out>/pools.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from netllm.tasks.abr.task import ABRRecipe, NetLLMABRPolicy, adapt, collect_pools, env_setting, evaluate
from netllm.tasks.abr.traces import load_traces, load_video
from netllm.utils import atomic_write_json

POOLS = {  # name: (behaviour policies, keep, pool videos)
    "genet": (["genet"], "all", ["video1"]),
    "genet+mpc+bba mixed": (["genet", "mpc", "bba"], "all", ["video1"]),
    "best of genet/mpc/bba": (["genet", "mpc", "bba"], "best", ["video1"]),
    "best of genet/mpc/bba, both videos": (["genet", "mpc", "bba"], "best", ["video1", "video2"]),
    "oracle": (["oracle"], "all", ["video1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-abr-pools"))
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated subset of: " + ", ".join(POOLS))
    args = parser.parse_args()
    train, valid, test = load_traces("fcc-train"), load_traces("fcc-valid"), load_traces("fcc-test")
    videos = {v: load_video(v) for v in ("video1", "video2")}
    results: dict[str, dict[str, float]] = {}
    for i, name in enumerate(args.pools.split(",")):
        policies, keep, pool_videos = POOLS[name]
        pool = collect_pools(policies, train, [videos[v] for v in pool_videos], [1, 2], keep=keep)
        recipe = ABRRecipe(llm="scratch", layers=3, rank=0, context=10, steps=args.steps, lr=3e-4)
        t0 = time.perf_counter()
        folder = adapt(pool, args.out / f"pool{i}", recipe, device="cpu", resume=True, eval_traces=valid[:20],
                       eval_video=videos["video1"], progress=False)
        row = {"episodes": pool.num_episodes, "train_s": time.perf_counter() - t0}
        for v, video in videos.items():
            row[f"fcc-valid {v}"] = evaluate(NetLLMABRPolicy.from_adapter(folder), valid, video, [1]).mean
            row[f"fcc-test {v}"] = evaluate(NetLLMABRPolicy.from_adapter(folder), test, video, [1],
                                            **env_setting("fcc-test")).mean
        results[name] = row
        print(f"{name}: " + json.dumps({k: round(x, 3) for k, x in row.items()}), flush=True)
        atomic_write_json(args.out / "pools.json", results)


if __name__ == "__main__":
    main()
