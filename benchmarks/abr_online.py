"""An ABR adapter before and after ``netllm finetune abr``, against the baselines, on
fcc-test and on generated traces from network conditions no training run saw.

    NETLLM_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/abr_online.py \\
        --offline runs/abr --finetuned runs/abr-ppo [--out runs/abr-online.json] \\
        [--control-offline runs/abr-rand --control-finetuned runs/abr-rand-ppo]

With the control (the same recipe from random LLM weights: ``adapt --random-init``, then
the same ``finetune``), the table adds the fine-tuned control and the paired difference
fine-tuned − fine-tuned control: what the pretrained weights are worth once the policy
learns online.

Test sets (every policy on the same traces, start positions and delay noise; paired per
trace, 95 % t interval of the mean paired difference):

* ``fcc-test`` × video1, video2 — the upstream setting of ``netllm eval abr``;
* ``variable`` × video1, video2 — 100 Markov-chain traces (``synthetic_traces``, seed
  20261202) with 0.3–8 Mbps states, switching probability 0.3–0.6 per second and noise
  0.2–0.35: more variable than any trace ``finetune --generated`` draws (switching
  0.02–0.2, noise 0.02–0.15), held out — no choice was made on them. Delay noise and
  random start positions, seed 1.

Selection of the fine-tuned adapter was on ``fcc-holdout`` (its own validation), never here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from netllm.stats import describe, paired_difference
from netllm.tasks.abr.baselines import make_baseline
from netllm.tasks.abr.task import NetLLMABRPolicy, env_setting, evaluate
from netllm.tasks.abr.traces import copies_of, load_traces, load_video, synthetic_traces
from netllm.utils import atomic_write_json

console = Console()
HELD_OUT = {"n": 100, "seed": 20261202, "low_mbps": 0.3, "high_mbps": 8.0, "switch_prob": (0.3, 0.6),
            "noise_cov": (0.2, 0.35)}


def held_out_traces() -> list[Any]:
    spec = dict(HELD_OUT)
    return synthetic_traces(spec.pop("n"), **spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--control-offline", type=Path, default=None)
    ap.add_argument("--control-finetuned", type=Path, default=None)
    ap.add_argument("--baselines", default="genet,mpc,bba")
    ap.add_argument("--out", type=Path, default=Path("runs/abr-online.json"))
    args = ap.parse_args()

    policies: dict[str, Any] = {
        "offline": NetLLMABRPolicy.from_adapter(args.offline, device="cpu"),
        "finetuned": NetLLMABRPolicy.from_adapter(args.finetuned, device="cpu"),
    }
    control = args.control_finetuned is not None
    if args.control_offline is not None:
        policies["control-offline"] = NetLLMABRPolicy.from_adapter(args.control_offline, device="cpu")
    if control:
        policies["control-finetuned"] = NetLLMABRPolicy.from_adapter(args.control_finetuned, device="cpu")
    for name in args.baselines.split(","):
        policies[name] = make_baseline(name)
    sets = {"fcc-test": (load_traces("fcc-test"), env_setting("fcc-test")), "variable": (held_out_traces(), {})}
    report: dict[str, Any] = {"offline": str(args.offline), "finetuned": str(args.finetuned),
                              "control_offline": str(args.control_offline), "control_finetuned": str(args.control_finetuned),
                              "held_out": {k: list(v) if isinstance(v, tuple) else v for k, v in HELD_OUT.items()},
                              "results": {}}
    table = Table(title="ABR: offline vs fine-tuned adapter (mean QoE; paired per trace, 95 % CI)")
    table.add_column("test set")
    for name in policies:
        table.add_column(name)
    table.add_column("finetuned − offline")
    table.add_column("finetuned − best baseline")
    if control:
        table.add_column("finetuned − control-finetuned")
    for set_name, (traces, setting) in sets.items():
        for video_name in ("video1", "video2"):
            video = load_video(video_name)
            per_trace: dict[str, dict[str, float]] = {}
            for name, policy in policies.items():
                m = evaluate(policy, traces, video, [1], **setting)
                per_trace[name] = {f"{r['trace']}": float(r["qoe"]) for r in m.rows}
            means = {n: sum(v.values()) / len(v) for n, v in per_trace.items()}
            best = max(args.baselines.split(","), key=lambda n: means[n])
            d_off = paired_difference(per_trace["finetuned"], per_trace["offline"], "higher")
            d_best = paired_difference(per_trace["finetuned"], per_trace[best], "higher")
            key = f"{set_name}/{video_name}"
            report["results"][key] = {"mean_qoe": means, "finetuned_minus_offline": d_off,
                                      "best_baseline": best, "finetuned_minus_best_baseline": d_best}
            d_ctl = None
            if control:
                d_ctl = paired_difference(per_trace["finetuned"], per_trace["control-finetuned"], "higher")
                report["results"][key]["finetuned_minus_control_finetuned"] = d_ctl
            if set_name == "fcc-test":  # and on its traces that are no copy of an fcc-train trace
                seen = copies_of(traces, load_traces("fcc-train"))
                unseen = [t.name for t in traces if t.name not in seen]
                pick = {n: {t: v[t] for t in unseen} for n, v in per_trace.items()}
                report["results"][key]["unseen"] = {
                    "traces": len(unseen), "mean_qoe": {n: sum(v.values()) / len(v) for n, v in pick.items()},
                    "finetuned_minus_offline": paired_difference(pick["finetuned"], pick["offline"], "higher"),
                    "finetuned_minus_best_baseline": paired_difference(pick["finetuned"], pick[best], "higher")}
                if control:
                    report["results"][key]["unseen"]["finetuned_minus_control_finetuned"] = paired_difference(
                        pick["finetuned"], pick["control-finetuned"], "higher")
            table.add_row(key, *(f"{means[n]:.3f}" for n in policies), describe(d_off),
                          f"{best}: {describe(d_best)}", *([describe(d_ctl)] if d_ctl is not None else []))
            atomic_write_json(args.out, report)
    console.print(table)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
