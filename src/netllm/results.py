"""Writing evaluation results the same way for every task: a table on the terminal,
``results.json``, a per-item CSV and PNG plots (bar chart with error bars, CDF)."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from netllm.tasks.base import Metrics
from netllm.utils import NetLLMError, atomic_path, atomic_write_json, atomic_write_text

import sys

# a comparison table must not wrap in logs and CI output
console = Console() if sys.stdout.isatty() else Console(width=130)


def write_results(
    out: Path,
    results: dict[str, Metrics],
    *,
    title: str,
    parts: Sequence[str] = (),
    reference: str | None = None,
    cdf_key: str | None = None,
    skipped: Sequence[Any] = (),
) -> None:
    """Print the comparison table and write results.json, rows.csv, bar.png, cdf.png.

    ``reference`` names a policy (e.g. the oracle) every mean is reported against, in %.
    ``cdf_key`` is the per-row column whose distribution the CDF plot shows.
    ``skipped``: the data files the loader left out (``SkippedFile``); every policy's
    entry in results.json records them (``files_skipped``, ``skipped_files``).
    """
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    table = Table(title=title)
    table.add_column("policy")
    table.add_column(f"{first.metric} (mean ± std over seeds)", justify="right")
    for p in parts:
        table.add_column(p, justify="right")
    if reference in results:
        table.add_column(f"% of {reference}", justify="right")
    for name, m in results.items():
        row = [name, f"{m.mean:.3f} ± {m.std:.3f}"] + [f"{m.parts.get(p, float('nan')):.3f}" for p in parts]
        if reference in results:
            ref = results[reference].mean
            row.append(f"{100 * m.mean / ref:.1f}" if ref else "-")
        table.add_row(*row)
    console.print(table)
    data = {"files_skipped": len(skipped), "skipped_files": [f.to_dict() for f in skipped]}
    if skipped:
        console.print(f"[yellow]{len(skipped)} data file(s) skipped[/yellow] (listed in results.json; "
                      "--strict makes a bad file an error)")
    atomic_write_json(out / "results.json", {name: {**m.summary(), **data} for name, m in results.items()})
    rows = [{"policy": name, **r} for name, m in results.items() for r in m.rows]
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "rows.csv", buf.getvalue())
    _plots(out, results, title, cdf_key)
    written = ["results.json"] + (["rows.csv"] if rows else []) + ["bar.png"] + (["cdf.png"] if cdf_key else [])
    console.print(f"written in {out}: {', '.join(written)}")


def _plots(out: Path, results: dict[str, Metrics], title: str, cdf_key: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    first = results[names[0]]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(names, [results[n].mean for n in names], yerr=[results[n].std for n in names], capsize=4,
           color="tab:blue")
    ax.set_ylabel(first.metric + (" (higher is better)" if first.higher_is_better else " (lower is better)"))
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save_figure(fig, out / "bar.png")
    if cdf_key:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n in names:
            values = np.sort([r[cdf_key] for r in results[n].rows if cdf_key in r])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=n)
        ax.set_xlabel(cdf_key)
        ax.set_ylabel("CDF")
        ax.legend(fontsize=8)
        ax.set_title(title)
        fig.tight_layout()
        save_figure(fig, out / "cdf.png")
    plt.close("all")


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ----------------------------------------------------------------------------- training seeds


def cached_metrics(cache: Path | None, key: str, compute: Callable[[], Metrics]) -> Metrics:
    """``compute()``, or its result stored under ``cache/<sha256 of key>.json`` by an
    earlier run. A benchmark keys an evaluation by what decides its result (the policy's
    files, e.g. :func:`netllm.model.adapter_digest`, or a baseline's name, and the test
    set, video, seeds and setting), so running it again evaluates only what is new.
    ``cache=None``: no cache."""
    import hashlib
    import json

    if cache is None:
        return compute()
    path = Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("key") == key:
                return Metrics(d["metric"], bool(d["higher_is_better"]), {int(k): float(v) for k, v in
                                                                       d["per_seed"].items()},
                               parts=dict(d["parts"]), rows=list(d["rows"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: evaluate again and overwrite it
    m = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_json(path, {"key": key, "metric": m.metric, "higher_is_better": m.higher_is_better,
                                 "per_seed": {str(k): v for k, v in m.per_seed.items()}, "parts": m.parts,
                                 "rows": m.rows})
    except NetLLMError:
        pass  # a non-finite value has no JSON spelling: this result is not cached, it is still returned
    return m


def combine_train_seeds(per_train: dict[int, Metrics]) -> Metrics:
    """One variant trained once per training seed -> one Metrics.

    Several training seeds: ``per_seed`` maps each training seed to its mean over the
    evaluation seeds (so mean / std are over training seeds), ``info`` keeps the spread
    over evaluation seeds. One training seed: that run's Metrics (``per_seed`` over the
    evaluation seeds). ``info.paired_over`` says which seeds ``per_seed`` holds.
    """
    if not per_train:
        raise ValueError("combine_train_seeds: no runs")
    seeds = sorted(per_train)
    first = per_train[seeds[0]]
    if len(seeds) == 1:
        return replace(first, info={**first.info, "train_seeds": seeds, "paired_over": "evaluation seeds"})
    parts = {k: float(np.mean([per_train[s].parts.get(k, np.nan) for s in seeds])) for k in first.parts}
    info = {"train_seeds": seeds, "paired_over": "training seeds",
            "eval_std_per_train_seed": {str(s): per_train[s].std for s in seeds},
            "per_train_seed": {str(s): per_train[s].summary() for s in seeds}}
    return Metrics(first.metric, first.higher_is_better, {s: per_train[s].mean for s in seeds}, parts=parts,
                   rows=first.rows, info=info)


def comparisons(results: dict[str, Metrics], headline: str, others: Sequence[str],
                trained: Sequence[str], units: str | None = None) -> dict[str, dict[str, Any]]:
    """Paired differences ``headline - other`` (see :func:`netllm.stats.paired_difference`).

    ``trained``: the variants trained per training seed like ``headline``; they pair seed by
    seed. Any other policy does not depend on the training seed: with several training
    seeds its mean over the evaluation seeds stands for every one of them; with one
    training seed everything pairs over the evaluation seeds.

    ``units``: the row column that names a test item (e.g. ABR's ``"trace"``). Where the
    pairing above leaves a single pair — one training seed and one evaluation seed, as in
    ABR's deterministic upstream setting — the rows are paired item by item instead (the
    same evaluation seed and item on both sides, the metric's own column), and
    ``paired_over`` says so. That interval is over test items within one training run: it
    says nothing about how another training seed would do.
    """
    from netllm.stats import paired_difference

    head = results[headline]
    over = head.info.get("paired_over", "evaluation seeds")
    better = "higher" if head.higher_is_better else "lower"
    out: dict[str, dict[str, Any]] = {}
    for name in others:
        if name not in results or name == headline:
            continue
        other = results[name]
        if over == "training seeds" and name not in trained:
            values = {k: other.mean for k in head.per_seed}
        else:
            values = other.per_seed
        if set(values) != set(head.per_seed):
            continue  # e.g. a policy evaluated on other seeds: not comparable pair by pair
        if units and over == "evaluation seeds" and len(values) == 1:
            a, b = _per_unit(head, units), _per_unit(other, units)
            if len(a) > 1 and set(a) == set(b):
                out[f"{headline} - {name}"] = {**paired_difference(a, b, better),
                                               "paired_over": f"{units}s, 1 training seed"}
                continue
        out[f"{headline} - {name}"] = {**paired_difference(head.per_seed, values, better), "paired_over": over}
    return out


def _per_unit(m: Metrics, units: str) -> dict[str, float]:
    """``{"<evaluation seed>/<item>": value}`` from the rows; empty when an item repeats or a
    row lacks the column or the metric (then nothing pairs item by item)."""
    rows = [r for r in m.rows if units in r and m.metric in r]
    out = {f"{r.get('seed', '')}/{r[units]}": float(r[m.metric]) for r in rows}
    return out if len(out) == len(rows) == len(m.rows) else {}


def print_comparisons(title: str, comps: dict[str, dict[str, Any]]) -> None:
    """The headline comparisons as a table: difference, its 95 % interval, the verdict."""
    if not comps:
        return
    table = Table(title=title)
    for column in ("comparison", "mean difference", "95 % CI", "n (paired over)", "significant"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for name, c in comps.items():
        ci = c.get("ci")
        verdict = "-" if c.get("a_better") is None else ("better" if c["a_better"] else
                                                           "worse" if _ci_worse(c) else "no")
        table.add_row(name, f"{c['mean']:+.3f}", f"{ci[0]:+.3f} .. {ci[1]:+.3f}" if ci else "-",
                      f"{c['n']} ({c['paired_over']})", verdict)
    console.print(table)


def _ci_worse(c: dict[str, Any]) -> bool:
    lo, hi = c["ci"]
    return lo > 0 if c["better"] == "lower" else hi < 0
