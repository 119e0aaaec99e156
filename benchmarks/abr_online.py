"""ABR adapters before and after ``netllm finetune abr``, for one or more recipes and
training seeds, against the baselines, on fcc-test and on generated traces from network
conditions no training run saw.

    NETLLM_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/abr_online.py \\
        --variant netllm=runs/abr-s{seed},runs/abr-s{seed}-ppo \\
        --variant random-init=runs/abr-rand-s{seed},runs/abr-rand-s{seed}-ppo \\
        --variant scratch=runs/abr-scratch-s{seed},runs/abr-scratch-s{seed}-ppo \\
        --train-seeds 0,1,2 [--out runs/abr-online.json] [--cache runs/abr-online-cache] [--partial]

A variant is a recipe: ``NAME=OFFLINE,FINETUNED`` — the offline adapter and the one
``finetune`` made from it — or ``NAME=OFFLINE`` alone, for offline recipes that were never
fine-tuned; ``{seed}`` stands for each of ``--train-seeds``. The first
variant is compared with each other one (the controls: ``adapt --random-init`` and
``--llm scratch``, each followed by the same ``finetune``): what the pretrained LLM is
worth once the policy learns online.

Test sets (every policy on the same traces, start positions and delay noise):

* ``fcc-test`` × video1, video2 — the upstream setting of ``netllm eval abr``, and its
  traces that are no copy of an fcc-train trace (``fcc-unseen``);
* ``variable`` × video1, video2 — 100 Markov-chain traces (``traces.variable_traces``, seed
  20261202) with 0.3–8 Mbps states, switching probability 0.3–0.6 per second and noise
  0.2–0.35: more variable than any trace ``finetune --generated`` draws (switching
  0.02–0.2, noise 0.02–0.15), held out — no choice was made on them. Delay noise and
  random start positions, seed 1.

Differences are paired: within a training seed per trace (95 % t interval over traces),
and over training seeds on the per-seed means (95 % t interval over training seeds,
n = number of seeds; this one holds the test traces fixed).

``netllm bench abr --finetune-iterations N`` trains and tests all of this in one command
(paired over training seeds; with one training seed, over traces); this script is for
runs made with the commands themselves, and adds the per-trace intervals within each
training seed when there are several.

Evaluations are cached (``--cache``, keyed by the adapter's files and the test set, as
``netllm bench abr`` caches them: its ``<out>/eval-cache`` serves this script too), so
adding a training seed later evaluates only what is new.
``--partial`` reports the (variant, seed) runs that have finished and names the rest (a
run still training is never tested: its folder holds only the best adapter so far).

Selection of every fine-tuned adapter was on ``fcc-holdout`` (its own validation), never here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from netllm.recipe import stage_done
from netllm.stats import describe, paired_difference, spread
from netllm.tasks.abr.baselines import BASELINES
from netllm.tasks.abr.task import cached_evaluation, env_setting
from netllm.tasks.abr.traces import VARIABLE_TRACES, copies_of, load_traces, variable_traces
from netllm.utils import NetLLMError, atomic_write_json, parse_seeds

console = Console() if sys.stdout.isatty() else Console(width=160)  # tables must not wrap in logs
VIDEOS = ("video1", "video2")
STAGES = ("offline", "finetuned")


def test_sets() -> dict[str, tuple[Any, dict[str, Any]]]:
    return {"fcc-test": (load_traces("fcc-test"), env_setting("fcc-test")), "variable": (variable_traces(), {})}


def parse_variant(text: str) -> tuple[str, str, str | None]:
    """``NAME=OFFLINE,FINETUNED`` or ``NAME=OFFLINE`` (an offline recipe only)."""
    name, sep, paths = text.partition("=")
    parts = paths.split(",")
    if not sep or not name or len(parts) not in (1, 2) or not all(parts):
        raise NetLLMError(f"--variant {text!r}: expected NAME=OFFLINE,FINETUNED or NAME=OFFLINE (adapter "
                          "folders; {seed} stands for each training seed)")
    return name, parts[0], parts[1] if len(parts) == 2 else None


def finished(folder: Path) -> bool:
    """An adapter whose run (``adapt``: its steps, ``finetune``: its iterations) has ended; a
    run still training already holds its best-so-far adapter, which must not be tested."""
    try:
        config = json.loads((folder / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        config = {}  # no record of the run's length: its adapter is taken as it is
    return stage_done(folder, int(config.get("iterations", config.get("steps")) or 0))


def per_trace_qoe(cache: Path, policy: str | Path, sets: dict[str, tuple[Any, dict[str, Any]]],
                  label: str) -> dict[str, dict[str, float]]:
    """``{"fcc-test/video1": {trace: QoE}, …}`` on every test set and video (evaluation seed 1)."""
    console.print(f"{label} …")
    out: dict[str, dict[str, float]] = {}
    for set_name, (traces, setting) in sets.items():
        for video in VIDEOS:
            m = cached_evaluation(cache, policy, set_name, traces, setting, video, [1], device="cpu")
            out[f"{set_name}/{video}"] = {f"{r['trace']}": float(r["qoe"]) for r in m.rows}
    return out


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=OFFLINE[,FINETUNED]")
    ap.add_argument("--train-seeds", default="0", help="Training seeds that {seed} stands for (e.g. 0,1,2).")
    ap.add_argument("--baselines", default="genet,mpc,bba")
    ap.add_argument("--partial", action="store_true", help="Skip (variant, seed) runs that have not finished yet.")
    ap.add_argument("--out", type=Path, default=Path("runs/abr-online.json"))
    ap.add_argument("--cache", type=Path, default=None,
                    help="Cached evaluations (default: <out>-cache; a bench's <out>/eval-cache shares its results).")
    args = ap.parse_args()
    try:
        run(args)
    except NetLLMError as e:
        raise SystemExit(f"error: {e}") from None


def run(args: argparse.Namespace) -> None:
    variants = [parse_variant(v) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise NetLLMError(f"--variant: names must differ, got {names}")
    seeds = parse_seeds(args.train_seeds, "--train-seeds")
    baselines = [b for b in args.baselines.split(",") if b]
    for b in baselines:
        if b not in BASELINES:
            raise NetLLMError(f"--baselines: unknown baseline {b!r} (choose from {', '.join(BASELINES)})")
    cache = args.cache or args.out.with_name(args.out.stem + "-cache")  # a bench's <out>/eval-cache fits

    runs: dict[str, dict[int, dict[str, Path]]] = {}
    missing: list[str] = []
    stages = {name: STAGES if fin else STAGES[:1] for name, _, fin in variants}
    for name, off, fin in variants:
        runs[name] = {}
        for s in seeds:
            paths = {st: Path(p.replace("{seed}", str(s))) for st, p in zip(STAGES, (off, fin)) if p}
            absent = [str(p) for p in paths.values() if not finished(p)]
            if absent and not args.partial:
                raise NetLLMError(f"--variant {name}, training seed {s}: no finished adapter in {', '.join(absent)} "
                                  "(--partial reports the runs that have finished)")
            if absent:
                missing.append(f"{name} seed {s}")
            else:
                runs[name][s] = paths
    if not any(runs.values()):
        raise NetLLMError("--variant: no run has its adapters yet")

    sets = test_sets()
    qoe: dict[str, dict[int, dict[str, dict[str, dict[str, float]]]]] = {}
    for name, per_seed in runs.items():
        qoe[name] = {}
        for s, paths in per_seed.items():
            qoe[name][s] = {stage: per_trace_qoe(cache, path, sets, f"{name} seed {s} {stage} ({path})")
                            for stage, path in paths.items()}
    base = {b: per_trace_qoe(cache, b, sets, b) for b in baselines}

    # fcc-test's traces that are no copy of an fcc-train trace
    fcc = sets["fcc-test"][0]
    seen = copies_of(fcc, load_traces("fcc-train"))
    unseen = [t.name for t in fcc if t.name not in seen]
    keys = [f"{s}/{v}" for s in sets for v in VIDEOS]
    keys += [f"fcc-unseen/{v}" for v in VIDEOS]

    def pick(per_trace: dict[str, dict[str, float]], key: str) -> dict[str, float]:
        if key.startswith("fcc-unseen/"):
            full = per_trace[key.replace("fcc-unseen/", "fcc-test/")]
            return {t: full[t] for t in unseen}
        return per_trace[key]

    report: dict[str, Any] = {"variants": {n: {st: p for st, p in zip(STAGES, (off, fin)) if p}
                                           for n, off, fin in variants},
                              "train_seeds": seeds, "missing": missing, "unseen_traces": len(unseen),
                              "held_out": {k: list(v) if isinstance(v, tuple) else v for k, v in VARIABLE_TRACES.items()},
                              "results": {}}
    first = names[0]
    for key in keys:
        b_means = {b: mean(pick(base[b], key)) for b in baselines}
        best = max(baselines, key=lambda b: b_means[b]) if baselines else None
        res: dict[str, Any] = {"baselines": b_means, "best_baseline": best, "variants": {}, "comparisons": {}}
        for name in names:
            per_seed = {s: {st: mean(pick(qoe[name][s][st], key)) for st in stages[name]} for s in qoe[name]}
            res["variants"][name] = {
                "per_seed": {str(s): v for s, v in per_seed.items()},
                **{st: spread({s: v[st] for s, v in per_seed.items()}) for st in stages[name] if per_seed}}

        def compare(a: tuple[str, str], b: tuple[str, str] | str, key: str = key) -> dict[str, Any] | None:
            """a − b, per training seed (per trace) and over the training seeds both have."""
            common = sorted(set(qoe[a[0]]) & (set(qoe[b[0]]) if isinstance(b, tuple) else set(seeds)))
            if not common:
                return None
            per_seed, means_a, means_b = {}, {}, {}
            for s in common:
                x = pick(qoe[a[0]][s][a[1]], key)
                y = pick(qoe[b[0]][s][b[1]], key) if isinstance(b, tuple) else pick(base[b], key)
                per_seed[str(s)] = paired_difference(x, y, "higher")
                means_a[s], means_b[s] = mean(x), mean(y)
            return {"per_seed": per_seed, "over_seeds": paired_difference(means_a, means_b, "higher")}

        comps: dict[str, Any] = {}
        for name in names:
            last = stages[name][-1]
            if last == "finetuned":
                comps[f"{name} finetuned − offline"] = compare((name, "finetuned"), (name, "offline"))
            if best:
                comps[f"{name} {last} − {best}"] = compare((name, last), best)
        for other in names[1:]:
            for st in stages[first]:
                if st in stages[other]:
                    comps[f"{first} {st} − {other} {st}"] = compare((first, st), (other, st))
        res["comparisons"] = {k: v for k, v in comps.items() if v is not None}
        report["results"][key] = res
    atomic_write_json(args.out, report)
    print_report(report, names)
    if missing:
        console.print(f"not there yet (skipped): {', '.join(missing)}")
    console.print(f"written {args.out}")


def short(diff: dict[str, Any]) -> str:
    ci = diff.get("ci")
    return f"{diff['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def print_report(report: dict[str, Any], names: list[str]) -> None:
    seeds = ",".join(str(s) for s in report["train_seeds"])
    table = Table(title=f"ABR: offline → fine-tuned (mean QoE, mean ± std over training seeds {seeds}; "
                        "a variant without a fine-tuned stage shows its offline adapter)")
    table.add_column("test set")
    first = next(iter(report["results"].values()))
    for b in first["baselines"]:
        table.add_column(b)
    for n in names:
        fin = "finetuned" in report["variants"][n]
        table.add_column(f"{n} offline → fine-tuned" if fin else f"{n} offline")
    for key, res in report["results"].items():
        cells = [f"{v:.3f}" for v in res["baselines"].values()]
        for n in names:
            v = res["variants"][n]
            if "offline" not in v:
                cells.append("—")
            elif "finetuned" in v:
                cells.append(f"{v['offline']['mean']:.3f} → {v['finetuned']['mean']:.3f} ± {v['finetuned']['std']:.3f}")
            else:
                cells.append(f"{v['offline']['mean']:.3f} ± {v['offline']['std']:.3f}")
        table.add_row(key, *cells)
    console.print(table)
    diffs = Table(title="Paired differences, 95 % t intervals: over training seeds; per training seed over traces")
    diffs.add_column("test set")
    diffs.add_column("difference")
    diffs.add_column("over training seeds")
    diffs.add_column("per training seed")
    for key, res in report["results"].items():
        for label, c in res["comparisons"].items():
            diffs.add_row(key, label, describe(c["over_seeds"]),
                          "; ".join(f"{s}: {short(d)}" for s, d in c["per_seed"].items()))
    console.print(diffs)


if __name__ == "__main__":
    main()
