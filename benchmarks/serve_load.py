"""Load test of ``netllm serve`` on loopback: K concurrent players, each the project's ABR
simulator on a real FCC trace, asking the server for every chunk.

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/serve_load.py --adapter runs/abr \\
        [--players 32] [--traces 32] [--deadline-ms 200] [--max-seconds 600] [--dtype fp32|bf16] \\
        [--out runs/serve-load.json]

The server is the real CLI (``netllm serve``) in its own process; the players are asyncio
tasks here, closed-loop (a player asks for the next chunk as soon as the simulator has
downloaded the last one, so K players keep K requests in flight: a stress test, harder
than real players, who ask once per 4-s chunk). Two runs on fcc-test's first
``--traces`` traces in the upstream setting (no delay noise, fixed start positions, as
``netllm eval abr``):

1. no deadline: the QoE of the served decisions against in-process evaluation of the
   same adapter on the same traces (the same policy: the levels should be equal);
2. ``--deadline-ms``: decisions/s, p50 / p99 latency, fallback rate and errors;
3. the same deadline with paced players (at most one request per ``--interval-s``; a real
   player asks once per 4-s chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from netllm.backbone import inference_precision
from netllm.serve.app import free_port
from netllm.tasks.abr.env import BatchABREnv
from netllm.tasks.abr.task import NetLLMABRPolicy, env_setting, run_episodes
from netllm.tasks.abr.traces import load_traces, load_video
from netllm.utils import NetLLMError, atomic_write_json

console = Console()


class Server:
    """``netllm serve`` as a subprocess, stopped on exit."""

    def __init__(self, adapter: Path, deadline_ms: float, max_sessions: int, threads: int,
                 fallback: str = "bba", dtype: str = "fp32") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        exe = Path(sys.executable).with_name("netllm")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--adapter", f"abr={adapter}", "--port", str(self.port), "--deadline-ms",
             str(deadline_ms), "--max-sessions", str(max_sessions), "--device", "cpu", "--fallback",
             f"abr={fallback}", "--dtype", dtype],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        until = time.monotonic() + 300
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise NetLLMError(f"netllm serve exited: {self.proc.stderr.read()[-500:] if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise NetLLMError("netllm serve: not ready after 300 s")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def play(client: httpx.AsyncClient, trace: Any, video: Any, start: int | None, seed: int,
               until: float, interval_s: float = 0.0, trace_id: int = 0) -> dict[str, Any]:
    """One player: the simulator on one trace, every chunk's level asked of the server
    (``trace_id``: its position in the set, which seeds its noise and start as in ``eval``)."""
    env = BatchABREnv([trace], video, noise=start is None, random_start=start is None,
                      start_indices=None if start is None else [start], trace_ids=[trace_id])
    _, info = env.reset(seed)
    sid = (await client.post("/v1/abr/sessions")).raise_for_status().json()["session_id"]
    qoe, levels, latency, server_ms, sources, errors = [], [], [], [], [], 0
    while True:
        asked = time.perf_counter()
        chunk = int(info["chunk_index"][0])
        level_played = int(info["level"][0])
        body = {"last_level": level_played, "buffer_s": float(info["buffer_s"][0]),
                "rebuffer_s": float(info["rebuffer_s"][0]),
                "last_chunk_bytes": float(video.sizes_bytes[level_played, chunk]),
                "download_ms": float(info["delay_ms"][0]),
                "next_chunk_bytes": [float(x) for x in video.sizes_bytes[:, chunk + 1]],
                "chunks_left": int(info["chunks_left"][0])}
        t0 = time.perf_counter()
        try:
            r = await client.post(f"/v1/abr/sessions/{sid}/decide", json=body)
            r.raise_for_status()
            answer = r.json()
            level, source = int(answer["level"]), answer["source"]
            server_ms.append(float(answer["latency_ms"]))
        except (httpx.HTTPError, ValueError, KeyError):
            errors += 1
            level, source = 0, "error"
        latency.append((time.perf_counter() - t0) * 1000.0)
        levels.append(level)
        sources.append(source)
        _, reward, term, _, info = env.step(np.array([level]))
        qoe.append(float(reward[0]))
        if bool(term[0]) or time.monotonic() > until:
            break
        await asyncio.sleep(max(interval_s - (time.perf_counter() - asked), 0.0))
    await client.delete(f"/v1/abr/sessions/{sid}")
    return {"trace": trace.name, "qoe": float(np.mean(qoe)), "levels": levels, "latency_ms": latency,
            "server_latency_ms": server_ms,
            "sources": sources, "errors": errors, "complete": bool(term[0])}


async def run_players(url: str, traces: list[Any], video: Any, starts: list[int] | None, players: int,
                      seed: int, max_seconds: float, interval_s: float = 0.0) -> tuple[list[dict[str, Any]], float]:
    until = time.monotonic() + max_seconds
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(traces)):
        queue.put_nowait(i)
    results: list[dict[str, Any] | None] = [None] * len(traces)
    limits = httpx.Limits(max_connections=players, max_keepalive_connections=players)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty() and time.monotonic() < until:
                i = queue.get_nowait()
                results[i] = await play(client, traces[i], video, None if starts is None else int(starts[i]),
                                        seed, until, interval_s, trace_id=i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(players)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


def summarise(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    latency = np.concatenate([r["latency_ms"] for r in results])
    server = np.concatenate([r["server_latency_ms"] for r in results])
    sources = sum((r["sources"] for r in results), [])
    return {
        "decisions": len(sources), "wall_s": round(wall_s, 2), "decisions_per_s": round(len(sources) / wall_s, 1),
        "p50_ms": round(float(np.percentile(latency, 50)), 1), "p99_ms": round(float(np.percentile(latency, 99)), 1),
        "server_p50_ms": round(float(np.percentile(server, 50)), 1) if len(server) else None,
        "server_p99_ms": round(float(np.percentile(server, 99)), 1) if len(server) else None,
        "fallback_rate": round(sources.count("fallback") / len(sources), 4),
        "errors": int(sum(r["errors"] for r in results)),
        "complete_episodes": int(sum(r["complete"] for r in results)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--players", type=int, default=32)
    ap.add_argument("--trace-set", default="fcc-test", help="fcc-test, fcc-holdout (validation: choose on it) ...")
    ap.add_argument("--traces", type=int, default=32, help="the set's first N traces (one episode each)")
    ap.add_argument("--video", default="video1")
    ap.add_argument("--deadline-ms", type=float, default=200.0)
    ap.add_argument("--server-threads", type=int, default=1, help="OMP threads of the server process")
    ap.add_argument("--fallback", default="bba", help="the server's ABR fallback (bba, hold-bba)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="per run")
    ap.add_argument("--interval-s", type=float, default=0.5,
                    help="paced run: a player asks at most once per interval (a real player: once per 4-s chunk)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="the LLM's precision, in the server and in the in-process reference")
    ap.add_argument("--out", type=Path, default=Path("runs/serve-load.json"))
    args = ap.parse_args()
    if args.players < 1 or args.traces < 1:
        raise SystemExit("--players and --traces must be >= 1")

    traces = load_traces(args.trace_set)[:args.traces]
    video = load_video(args.video)
    setting = env_setting(args.trace_set)
    starts = None if "start_indices" not in setting else list(np.asarray(setting["start_indices"])[:args.traces])
    env_options = {} if starts is None else {"noise": False, "start_indices": starts}
    seed = 1

    t0 = time.perf_counter()
    with inference_precision(args.dtype):
        policy = NetLLMABRPolicy.from_adapter(args.adapter, device="cpu")
    ep = run_episodes(policy, traces, video, seed, **env_options)
    in_process = {"qoe_per_trace": ep.qoe.mean(axis=1).tolist(), "levels": ep.levels.tolist(),
                  "wall_s": round(time.perf_counter() - t0, 2)}

    report: dict[str, Any] = {"adapter": str(args.adapter), "players": args.players, "trace_set": args.trace_set,
                              "traces": len(traces),
                              "video": video.name, "setting": "upstream" if starts is not None else "random",
                              "server_threads": args.server_threads, "fallback": args.fallback,
                              "dtype": args.dtype}
    with Server(args.adapter, 0.0, args.players, args.server_threads, dtype=args.dtype) as srv:
        served, wall = asyncio.run(run_players(srv.url, traces, video, starts, args.players, seed, args.max_seconds))
    by_trace = {r["trace"]: r for r in served}
    diffs = [abs(by_trace[t.name]["qoe"] - q) for t, q in zip(traces, in_process["qoe_per_trace"])
             if t.name in by_trace]
    same_levels = sum(by_trace[t.name]["levels"] == lv for t, lv in zip(traces, in_process["levels"])
                      if t.name in by_trace)
    report["no_deadline"] = {**summarise(served, wall),
                             "qoe_served": round(float(np.mean([r["qoe"] for r in served])), 4),
                             "qoe_in_process": round(float(np.mean(in_process["qoe_per_trace"][:len(served)])), 4),
                             "max_abs_qoe_diff_per_trace": float(max(diffs)) if diffs else None,
                             "episodes_with_identical_levels": int(same_levels)}
    with Server(args.adapter, args.deadline_ms, args.players, args.server_threads, args.fallback, args.dtype) as srv:
        loaded, wall = asyncio.run(run_players(srv.url, traces, video, starts, args.players, seed, args.max_seconds))
        report["deadline"] = {"deadline_ms": args.deadline_ms, **summarise(loaded, wall),
                              "qoe_served": round(float(np.mean([r["qoe"] for r in loaded])), 4)}
        paced, wall = asyncio.run(run_players(srv.url, traces, video, starts, args.players, seed, args.max_seconds,
                                              args.interval_s))
    report["paced"] = {"deadline_ms": args.deadline_ms, "interval_s": args.interval_s, **summarise(paced, wall),
                       "qoe_served": round(float(np.mean([r["qoe"] for r in paced])), 4)}
    atomic_write_json(args.out, report)

    table = Table(title=f"netllm serve, {args.players} closed-loop players, {len(traces)} fcc-test traces, "
                        f"{video.name}")
    for col in ("run", "decisions/s", "p50 / p99 ms (client)", "p50 / p99 ms (server)", "fallback", "errors",
                "QoE served", "QoE in-process"):
        table.add_column(col)
    nd, dl = report["no_deadline"], report["deadline"]
    table.add_row("no deadline", str(nd["decisions_per_s"]), f"{nd['p50_ms']} / {nd['p99_ms']}",
                  f"{nd['server_p50_ms']} / {nd['server_p99_ms']}",
                  f"{nd['fallback_rate']:.2%}", str(nd["errors"]), f"{nd['qoe_served']:.4f}",
                  f"{nd['qoe_in_process']:.4f}")
    table.add_row(f"deadline {args.deadline_ms:g} ms", str(dl["decisions_per_s"]), f"{dl['p50_ms']} / {dl['p99_ms']}",
                  f"{dl['server_p50_ms']} / {dl['server_p99_ms']}", f"{dl['fallback_rate']:.2%}", str(dl["errors"]), f"{dl['qoe_served']:.4f}", "")
    pc = report["paced"]
    table.add_row(f"paced {args.interval_s:g} s, deadline {args.deadline_ms:g} ms", str(pc["decisions_per_s"]),
                  f"{pc['p50_ms']} / {pc['p99_ms']}", f"{pc['server_p50_ms']} / {pc['server_p99_ms']}",
                  f"{pc['fallback_rate']:.2%}", str(pc["errors"]), f"{pc['qoe_served']:.4f}", "")
    console.print(table)
    console.print(f"identical level sequences: {nd['episodes_with_identical_levels']}/{len(served)} episodes; "
                  f"written {args.out}")


if __name__ == "__main__":
    main()
