"""Scale-out, measured side by side in one run: Ray workers for pool collection and the
10-seed CJS evaluation, Accelerate DDP processes for training, and our batched training
loop against the upstream-style one (batch 1).

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/scale_out.py \\
        [--adapter runs/cjs-d48] [--stages collect,eval,ddp,upstream,finetune] [--out runs/scale-out.json]

Stages (every pair on the same work, one after the other, nothing else asked of the cores):

* ``collect`` — a CJS pool (Decima, ``--collect-seeds`` job sequences of 200 jobs, features
  from the frozen GNN) in this process vs on 2 Ray workers; the pools must be identical.
* ``eval`` — the CJS evaluation of ``--adapter`` (default: Decima) on seeds 1-10, batched
  across the seeds, in this process vs on 2 workers (5 seeds each); per-seed JCT identical.
  Ray's start-up is timed apart (it is paid once per command).
* ``ddp`` — ``netllm adapt abr`` (SmolLM2 cut to 4 layers, the README's batch of 16) for
  ``--steps`` steps: 1 process with 1 thread, 1 process with 2 threads, and
  ``accelerate launch`` with 2 processes of 1 thread; training tokens/s from metrics.csv.
* ``upstream`` — the same adaptation in one process, batch 16 vs the upstream loop's batch
  of 1 (16 micro-batches per step: the same samples per step, each window's context
  recomputed on its own, as upstream NetLLM's run_plm.py trains).
* ``finetune`` — ``netllm finetune cjs`` from ``--adapter`` (default: a short adaptation
  of SmolLM2 cut to 4 layers on a 2-sequence Decima pool, built here — the rollouts' cost
  does not depend on how well it was trained): ``--iterations`` PPO iterations of 8
  50-job episodes, validation on seeds 1001-1004 (100 jobs), in one process of 1 thread,
  one of 2 threads, and with ``--workers 2`` (1 thread each); wall times and the rollout
  seconds from metrics.csv; the iterations' rows must agree (same decisions and returns).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from netllm import parallel
from netllm.utils import atomic_write_json

console = Console()


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def ray_stages(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import torch

    from netllm.tasks.cjs.jobs import load_all
    from netllm.tasks.cjs.pool import collect_pool
    from netllm.tasks.cjs.sim import CJSConfig
    from netllm.tasks.cjs.task import TASK, evaluate
    from netllm.recipe import load_policy
    from netllm.tasks.cjs.task import CJSEvalOptions

    torch.set_num_threads(1)  # one core per process on both sides
    os.environ["NETLLM_WORKER_THREADS"] = "1"
    load_all()
    config = CJSConfig()
    seeds = list(range(1, 11))
    collect_seeds = list(range(101, 101 + args.collect_seeds))
    policy = load_policy(TASK, args.adapter or "decima", CJSEvalOptions(), "cpu")
    serial: dict[str, Any] = {}
    if "collect" in args.stages:
        serial["collect"] = _timed(collect_pool, ["decima"], collect_seeds, config, progress=False)
    if "eval" in args.stages:
        serial["eval"] = _timed(evaluate, policy, seeds, config)
    t0 = time.perf_counter()
    with parallel.workers(2):
        start_s = time.perf_counter() - t0
        report["ray_start_s"] = start_s
        if "collect" in args.stages:
            wall, pool = _timed(collect_pool, ["decima"], collect_seeds, config, progress=False)
            one_wall, one = serial["collect"]
            same = (np.array_equal(pool.actions, one.actions)
                    and all(np.array_equal(pool.states[k], one.states[k]) for k in one.states))
            report["collect"] = {"seeds": collect_seeds, "one_process_s": one_wall, "two_workers_s": wall,
                                 "speedup": one_wall / wall, "speedup_with_ray_start": one_wall / (wall + start_s),
                                 "identical": bool(same)}
            console.print(f"collect: {one_wall:.1f} s -> {wall:.1f} s on 2 workers ({one_wall / wall:.2f}x), "
                          f"identical: {same}")
        if "eval" in args.stages:
            wall, spread = _timed(evaluate, policy, seeds, config)
            one_wall, one = serial["eval"]
            report["eval"] = {"policy": args.adapter or "decima", "seeds": seeds, "one_process_s": one_wall,
                              "two_workers_s": wall, "speedup": one_wall / wall,
                              "speedup_with_ray_start": one_wall / (wall + start_s),
                              "identical": spread.per_seed == one.per_seed, "jct_s": one.mean}
            console.print(f"eval: {one_wall:.1f} s -> {wall:.1f} s on 2 workers ({one_wall / wall:.2f}x), "
                          f"identical: {spread.per_seed == one.per_seed}")


def _tokens_per_s(folder: Path) -> float:
    with open(folder / "train" / "metrics.csv") as f:
        rows = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r.get("tokens_per_s")]
    rows = rows[1:] or rows  # the first interval holds the warm-up of the first steps
    return float(np.mean(rows))


def _adapt(pool: Path, out: Path, steps: int, threads: int, processes: int = 1, batch: int = 16,
           accum: int = 1) -> float:
    cmd = ["adapt", "abr", "--pool", str(pool), "--layers", "4", "--steps", str(steps), "--warmup-steps", "0",
           "--eval-every", "0", "--batch-size", str(batch), "--grad-accum", str(accum), "--device", "cpu",
           "--out", str(out)]
    if processes > 1:
        from netllm.serve.app import free_port

        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--num_cpu_threads_per_process", str(threads), "--main_process_port", str(free_port()),
                  "-m", "netllm"]
    else:
        launch = [sys.executable, "-m", "netllm"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(launch + cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"adapt failed: {done.stderr[-2000:]}")
    return _tokens_per_s(out)


def training_stages(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from netllm.tasks.abr.task import collect_pools
    from netllm.tasks.abr.traces import load_traces, load_video

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = collect_pools(["genet", "mpc", "bba"], load_traces("fcc-pool"), [load_video("video1")], [1],
                             keep="best").save(root / "pool.npz")
        if "ddp" in args.stages:
            one1 = _adapt(pool, root / "p1t1", args.steps, threads=1)
            one2 = _adapt(pool, root / "p1t2", args.steps, threads=2)
            two = _adapt(pool, root / "p2t1", args.steps, threads=1, processes=2)
            report["ddp"] = {"steps": args.steps, "tokens_per_s_1_process_1_thread": one1,
                             "tokens_per_s_1_process_2_threads": one2, "tokens_per_s_2_processes": two,
                             "speedup_vs_1_thread": two / one1, "speedup_vs_2_threads": two / one2}
            console.print(f"ddp: tokens/s 1 process x 1 thread {one1:,.0f}, x 2 threads {one2:,.0f}, "
                          f"2 processes {two:,.0f} ({two / one1:.2f}x, {two / one2:.2f}x)")
        if "upstream" in args.stages:
            ours = _adapt(pool, root / "b16", args.steps, threads=2)
            upstream = _adapt(pool, root / "b1", max(2, args.steps // 4), threads=2, batch=1, accum=16)
            report["upstream"] = {"tokens_per_s_batched": ours, "tokens_per_s_batch_1": upstream,
                                  "speedup": ours / upstream}
            console.print(f"upstream-style batch 1: {upstream:,.0f} tokens/s; ours (batch 16): {ours:,.0f} "
                          f"({ours / upstream:.2f}x)")


def _finetune(adapter: Path, out: Path, iterations: int, threads: int, workers: int = 0) -> tuple[float, list]:
    cmd = [sys.executable, "-m", "netllm", "finetune", "cjs", "--adapter", str(adapter), "--out", str(out),
           "--iterations", str(iterations), "--envs", "8", "--jobs", "50", "--valid-seeds", "1001-1004",
           "--device", "cpu"]
    if workers:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NETLLM_WORKER_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"finetune failed: {done.stderr[-2000:]}")
    with open(out / "metrics.csv") as f:
        return wall, list(csv.DictReader(f))


def finetune_stage(args: argparse.Namespace, report: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = args.adapter
        if adapter is None:
            for cmd in (["collect", "cjs", "--policy", "decima", "--seeds", "101-102", "--out", str(root / "pool")],
                        ["adapt", "cjs", "--pool", str(root / "pool"), "--layers", "4", "--steps", "20",
                         "--warmup-steps", "0", "--device", "cpu", "--out", str(root / "offline")]):
                done = subprocess.run([sys.executable, "-m", "netllm", *cmd], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{cmd[0]} failed: {done.stderr[-2000:]}")
            adapter = root / "offline"
        runs = {name: _finetune(Path(adapter), root / name, args.iterations, threads, workers)
                for name, threads, workers in (("one_process_1_thread", 1, 0), ("one_process_2_threads", 2, 0),
                                               ("two_workers", 1, 2))}
        same = ("decisions", "return")
        agree = all([{k: r[k] for k in same if k in r} for r in rows] ==
                    [{k: r[k] for k in same if k in r} for r in runs["one_process_1_thread"][1]]
                    for _, rows in runs.values())
        report["finetune"] = {"adapter": str(args.adapter or "short adaptation (20 steps, 4 layers)"),
                              "iterations": args.iterations, "identical_rollouts": bool(agree)}
        one = runs["one_process_1_thread"][0]
        for name, (wall, rows) in runs.items():
            rollout = sum(float(r["rollout_s"]) for r in rows if r.get("rollout_s"))
            report["finetune"][name] = {"wall_s": wall, "rollout_s": rollout, "speedup": one / wall}
            console.print(f"finetune {name}: {wall:.1f} s (rollouts {rollout:.1f} s, {one / wall:.2f}x)")
        console.print(f"finetune: rollouts identical: {agree}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=None, help="A CJS adapter for the eval stage (default: Decima).")
    ap.add_argument("--stages", default="collect,eval,ddp,upstream,finetune")
    ap.add_argument("--collect-seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=1, help="PPO iterations of the finetune stage.")
    ap.add_argument("--out", type=Path, default=Path("runs/scale-out.json"))
    args = ap.parse_args()
    args.stages = set(args.stages.split(","))
    report: dict[str, Any] = {"cores": os.cpu_count()}
    if args.stages & {"collect", "eval"}:
        ray_stages(args, report)
    if args.stages & {"ddp", "upstream"}:
        training_stages(args, report)
    if "finetune" in args.stages:
        finetune_stage(args, report)
    atomic_write_json(args.out, report)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
