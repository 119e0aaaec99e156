"""The CJS evaluation, one simulator at a time vs all seeds side by side with batched
decisions (``tasks/cjs/vec.py``): wall time of the same seeds, same policy, same run,
and whether every seed's episode is the same both ways.

    NETLLM_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cjs_batched.py \\
        [--adapter runs/cjs-d48] --seeds 1-10 --jobs 200 [--dtype fp32,bf16] [--out runs/cjs-batched.json]

Without ``--adapter`` the NetLLM scheduler is SmolLM2 cut to 4 layers with fresh LoRA,
encoders and heads (the recipe's model, untrained): the timing does not need a trained
adapter, only the same one on both sides. Decima (sampling from its simulator's stream)
is timed the same way. ``netllm bench cjs`` runs the same measurement on its adapter.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from netllm.backbone import inference_precision
from netllm.model import NetLLM
from netllm.options import split_list
from netllm.tasks.cjs.baselines import make_scheduler
from netllm.tasks.cjs.features import load_gnn
from netllm.tasks.cjs.jobs import load_all
from netllm.tasks.cjs.policy import NetLLMCJSPolicy, decode_temperature, model_config
from netllm.tasks.cjs.sim import CJSConfig
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import atomic_write_json, parse_seeds

console = Console()


def sequential_vs_batched(policy: Any, seeds: list[int], config: CJSConfig, envs: int | None = None
                          ) -> dict[str, Any]:
    """Both ways on the same seeds; wall times, their ratio and per-seed agreement."""
    t0 = time.perf_counter()
    one = run_episodes(policy, seeds, config, envs=1)
    t1 = time.perf_counter()
    many = run_episodes(policy, seeds, config, envs=envs)
    t2 = time.perf_counter()
    same = [a.avg_jct_s == b.avg_jct_s and a.num_decisions == b.num_decisions for a, b in zip(one, many)]
    decisions = sum(r.num_decisions for r in one)
    return {"sequential_s": t1 - t0, "batched_s": t2 - t1, "speedup": (t1 - t0) / (t2 - t1),
            "decisions": decisions, "sequential_ms_per_decision": (t1 - t0) / decisions * 1e3,
            "batched_ms_per_decision": (t2 - t1) / decisions * 1e3,
            "same_episodes": f"{sum(same)}/{len(same)}",
            "jct_s": {r.seed: r.avg_jct_s for r in many}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--envs", type=int, default=None)
    parser.add_argument("--decode", default="argmax")
    parser.add_argument("--skip-decima", action="store_true")
    parser.add_argument("--dtype", default="fp32", help="the LLM's precision, as `netllm eval --dtype`: fp32, bf16, "
                                                        "or both (fp32,bf16: each timed in turn, same run)")
    parser.add_argument("--out", default="runs/cjs-batched.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    config = CJSConfig(num_jobs=args.jobs)
    load_all()
    dtypes = split_list(args.dtype, "--dtype", ("fp32", "bf16"))
    policies: dict[str, Any] = {}
    for dtype in dtypes:
        if args.adapter:
            with inference_precision(dtype):
                netllm = NetLLMCJSPolicy.from_adapter(args.adapter, device="cpu", decode=args.decode)
        else:
            torch.manual_seed(0)
            model = NetLLM(model_config(layers=4), device="cpu").eval()
            model.backbone.merge_lora()  # as evaluation loads an adapter
            if dtype == "bf16":
                model.backbone.cast(torch.bfloat16)
            netllm = NetLLMCJSPolicy(model, target=-50.0, gnn=load_gnn("decima"),
                                     temperature=decode_temperature(args.decode), name="netllm-untrained")
        policies[netllm.name + ("" if len(dtypes) == 1 else f"-{dtype}")] = netllm
    report: dict[str, Any] = {"seeds": seeds, "jobs": args.jobs, "envs": args.envs or len(seeds),
                              "adapter": args.adapter, "decode": args.decode, "dtype": dtypes,
                              "threads": torch.get_num_threads()}
    if not args.skip_decima:
        policies["decima"] = make_scheduler("decima")
    table = Table(title=f"CJS evaluation, {len(seeds)} seeds x {args.jobs} jobs: one at a time vs batched")
    for col in ("policy", "sequential s", "batched s", "speed-up", "ms/decision seq / batched", "same episodes"):
        table.add_column(col, justify="right")
    for name, policy in policies.items():
        r = sequential_vs_batched(policy, seeds, config, args.envs)
        report[name] = r
        console.print(f"{name}: {r['sequential_s']:.1f} s -> {r['batched_s']:.1f} s ({r['speedup']:.1f}x)")
        table.add_row(name, f"{r['sequential_s']:.1f}", f"{r['batched_s']:.1f}", f"{r['speedup']:.1f}x",
                      f"{r['sequential_ms_per_decision']:.1f} / {r['batched_ms_per_decision']:.1f}",
                      r["same_episodes"])
    console.print(table)
    atomic_write_json(Path(args.out), report)
    console.print(f"written: {args.out}")


if __name__ == "__main__":
    main()
