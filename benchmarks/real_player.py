"""Does the simulator's ranking hold in a real player? The whole 48-chunk clip played by
dash.js in headless Chromium over links that follow real FCC traces, with NetLLM (asking
``netllm serve``), BBA (in the page) and dash.js's own ABR — and the simulator's QoE of
NetLLM and BBA on the same traces, start positions and chunk sizes, side by side.

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/real_player.py --adapter runs/abr \\
        [--traces 3] [--chunks 48] [--out runs/real-player]

Needs root, chromium, ffmpeg and dash.js (``make install``); one playback takes about
``chunks`` × 4 s plus start-up and stalls (3.3–3.6 min for 48 chunks). Writes
``results.json`` (every chunk of every playback) and ``chunks.png`` (per-chunk levels and
buffer of each playback).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from netllm.serve.app import BackgroundServer, ServeSettings, create_app
from netllm.tasks.abr.baselines import BBA
from netllm.tasks.abr.player import RealPlayerSetup
from netllm.tasks.abr.task import NetLLMABRPolicy, run_episodes
from netllm.tasks.abr.traces import Video, load_traces, upstream_start_indices
from netllm.utils import atomic_write_json

console = Console()
MODES = ("netllm", "bba", "dashjs")


def clip_video(info: dict[str, Any]) -> Video:
    """The encoded clip as the simulator's Video (its last column is only a "next size")."""
    sizes = np.asarray(info["sizes_bytes"], dtype=np.float64)
    return Video(name="clip", sizes_bytes=np.concatenate([sizes, sizes[:, -1:]], axis=1))


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in runs})
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 3 * len(traces)), squeeze=False)
    for row, trace in enumerate(traces):
        for r in (r for r in runs if r["trace"] == trace):
            idx = [c["index"] for c in r["chunks"]]
            axes[row, 0].step(idx, [c["level"] for c in r["chunks"]], where="post", label=f"{r['mode']} "
                              f"(QoE {r['qoe']:.3f})")
            axes[row, 1].plot(idx, [c["buffer_s"] for c in r["chunks"]], label=r["mode"])
        axes[row, 0].set_title(f"{trace[:40]}: level per chunk")
        axes[row, 1].set_title("buffer after each chunk (s)")
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--traces", type=int, default=3, help="fcc-test traces 0..N-1")
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=Path("runs/real-player"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    all_traces = load_traces("fcc-test")
    starts = upstream_start_indices("fcc-test")
    picked = list(range(args.traces))
    modes = args.modes.split(",")
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"adapter": str(args.adapter), "chunks": args.chunks, "runs": runs, "simulator": {}}
    app = create_app({"abr": args.adapter}, ServeSettings(deadline_ms=200))
    with BackgroundServer(app) as server, RealPlayerSetup(chunks=args.chunks, work=args.out / "work") as setup:
        video = clip_video(setup.video)
        policy = NetLLMABRPolicy.from_adapter(args.adapter, device="cpu")
        for i in picked:
            trace, start = all_traces[i], int(starts[i]) if starts is not None else 1
            for name, sim_policy in (("netllm", policy), ("bba", BBA())):
                ep = run_episodes(sim_policy, [trace], video, 1, noise=False, start_indices=[start])
                report["simulator"].setdefault(trace.name, {})[name] = {
                    "qoe": float(ep.qoe.mean()), "levels": ep.levels[0].tolist(),
                    "rebuffer_s": float(ep.rebuffer_s.mean())}
            for mode in modes:
                run = setup.play(mode, trace, abr_url=server.url, start=start, policy_chunks=48)
                runs.append(run.to_dict())
                console.print(f"{trace.name[:40]} {mode}: QoE {run.qoe:.3f} ({run.wall_s:.0f} s)")
                atomic_write_json(args.out / "results.json", report)
    plot(runs, args.out / "chunks.png")

    table = Table(title=f"real player (dash.js {args.chunks} chunks, headless Chromium, tbf link) vs simulator, QoE")
    table.add_column("trace")
    for mode in modes:
        table.add_column(f"{mode} real")
    table.add_column("netllm sim")
    table.add_column("bba sim")
    for i in picked:
        name = all_traces[i].name
        real = {r["mode"]: r["qoe"] for r in runs if r["trace"] == name}
        sim = report["simulator"][name]
        table.add_row(name[:36], *(f"{real[m]:.3f}" for m in modes), f"{sim['netllm']['qoe']:.3f}",
                      f"{sim['bba']['qoe']:.3f}")
    means = {m: float(np.mean([r["qoe"] for r in runs if r["mode"] == m])) for m in modes}
    sim_means = {m: float(np.mean([report["simulator"][all_traces[i].name][m]["qoe"] for i in picked]))
                 for m in ("netllm", "bba")}
    table.add_row("mean", *(f"{means[m]:.3f}" for m in modes), f"{sim_means['netllm']:.3f}",
                  f"{sim_means['bba']:.3f}")
    report["mean_real"], report["mean_sim"] = means, sim_means
    fallbacks = sum(d.get("source") != "policy" for r in runs if r["mode"] == "netllm" for d in r["decisions"][1:])
    report["netllm_non_policy_decisions"] = int(fallbacks)
    atomic_write_json(args.out / "results.json", report)
    console.print(table)
    console.print(f"NetLLM decisions not from the policy: {fallbacks}; written {args.out}/results.json, chunks.png")


if __name__ == "__main__":
    main()
