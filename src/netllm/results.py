"""Writing evaluation results the same way for every task: a table on the terminal,
``results.json``, a per-item CSV and PNG plots (bar chart with error bars, CDF)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from netllm.tasks.base import Metrics
from netllm.utils import atomic_path, atomic_write_json, atomic_write_text

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
