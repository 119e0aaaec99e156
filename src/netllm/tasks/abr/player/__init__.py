"""A real player end to end: dash.js in headless Chromium, asking ``netllm serve`` for
every chunk, over a link that follows a real FCC throughput trace.

    with RealPlayerSetup(chunks=8) as setup:                 # encodes the clip once (cached)
        run = setup.play("netllm", trace, abr_url="http://127.0.0.1:8333")
        print(run.qoe, run.chunks)

* The video: ffmpeg's test pattern encoded at video1's six bitrates (300 … 4300 kbps,
  CBR, 4-s segments), packaged as DASH by ffmpeg's dash muxer (:func:`encode_video`);
  ``sizes.json`` lists every segment's size, which the page sends as "next chunk sizes".
* The link: a veth pair into a network namespace where the segment server runs; a
  ``tbf`` qdisc on the namespace side limits the rate towards the browser and is changed
  every trace sample (:class:`ShapedLink`). This kernel has no netem: the segment server
  holds each response for the simulator's 80 ms RTT.
* The page (``index.html``, ``player.js``) and dash.js come from the segment server too
  (one origin). ``mode=netllm``: a custom ABR rule (built-in rules off) asks the server
  synchronously for every chunk and falls back to BBA in the page when it cannot;
  ``mode=bba``: BBA in the page; ``mode=dashjs``: dash.js's own rules.
* Every chunk's level, bytes, download time, stall and buffer are posted back to the
  segment server at the end of playback, and QoE is computed with the simulator's
  formula (bitrate − 4.3 × stall − |bitrate change|, Mbps, chunk 0 not scored).

Needs root (namespaces, tc), ``chromium`` and ``ffmpeg`` (Debian packages) and dash.js
(``make install`` puts the npm package ``dashjs`` under ``.venv/player``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from netllm.tasks.abr.env import BITRATES_MBPS, REBUFFER_PENALTY, SMOOTH_PENALTY
from netllm.tasks.abr.traces import BITRATES_KBPS, CHUNK_S, Trace
from netllm.utils import NetLLMError, atomic_write_text

DASHJS_VERSION = "5.2.1"
RTT_MS = 80.0
MIN_RATE_MBPS = 0.05  # tbf needs a positive rate
ENCODING = 2  # bump when encode_video's output changes (cached clips are re-encoded)


def dashjs_path() -> Path:
    """dash.all.min.js of the npm package ``dashjs`` (``$NETLLM_DASHJS`` overrides)."""
    env = os.environ.get("NETLLM_DASHJS")
    path = Path(env) if env else (Path(sys.prefix) / "player" / "node_modules" / "dashjs" / "dist" / "modern"
                                  / "umd" / "dash.all.min.js")
    if not path.is_file():
        raise NetLLMError(f"{path}: dash.js not found; `make install` installs it (npm install --prefix "
                          f".venv/player dashjs@{DASHJS_VERSION}) or set NETLLM_DASHJS")
    return path


def missing_tools() -> list[str]:
    """What a real-player run needs and this machine lacks (empty: all there)."""
    missing = [tool for tool in ("chromium", "ffmpeg", "ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tc)")
    try:
        dashjs_path()
    except NetLLMError:
        missing.append("dash.js (make install)")
    return missing


def encode_video(folder: Path, chunks: int) -> dict[str, Any]:
    """The test video at the six bitrates, ``chunks`` 4-s segments each, DASH-packaged into
    ``folder`` (kept when ``sizes.json`` already describes the same encoding)."""
    folder = Path(folder)
    sizes_file = folder / "sizes.json"
    if sizes_file.is_file():
        info = json.loads(sizes_file.read_text())
        if info.get("chunks") == chunks and info.get("encoding") == ENCODING:
            return info
    if shutil.which("ffmpeg") is None:
        raise NetLLMError("ffmpeg not found (apt-get install ffmpeg)")
    tmp = Path(tempfile.mkdtemp(prefix="video-", dir=folder.parent if folder.parent.exists() else None))
    fps, duration = 25, chunks * CHUNK_S
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
           f"testsrc2=size=320x180:rate={fps}", "-t", f"{duration:g}"]
    for _ in BITRATES_KBPS:
        cmd += ["-map", "0:v"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(int(fps * CHUNK_S)),
            "-keyint_min", str(int(fps * CHUNK_S)), "-sc_threshold", "0", "-x264-params", "nal-hrd=cbr:force-cfr=1"]
    for i, kbps in enumerate(BITRATES_KBPS):
        cmd += [f"-b:v:{i}", f"{kbps}k", f"-minrate:v:{i}", f"{kbps}k", f"-maxrate:v:{i}", f"{kbps}k",
                f"-bufsize:v:{i}", f"{kbps}k"]
    cmd += ["-f", "dash", "-adaptation_sets", "id=0,streams=v", "-seg_duration", f"{CHUNK_S:g}", "-use_template", "1", "-use_timeline", "0",
            "-init_seg_name", "init-$RepresentationID$.m4s", "-media_seg_name", "chunk-$RepresentationID$-$Number$.m4s",
            str(tmp / "manifest.mpd")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NetLLMError(f"ffmpeg failed: {done.stderr.strip()[-300:]}")
    sizes = [[(tmp / f"chunk-{level}-{n}.m4s").stat().st_size for n in range(1, chunks + 1)]
             for level in range(len(BITRATES_KBPS))]
    info = {"chunks": chunks, "encoding": ENCODING, "bitrates_kbps": BITRATES_KBPS.tolist(), "chunk_s": CHUNK_S, "sizes_bytes": sizes}
    atomic_write_text(tmp / "sizes.json", json.dumps(info) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return info


class ShapedLink:
    """A veth pair into a new network namespace; ``tbf`` on the namespace side limits what
    flows towards the host (the browser) and follows a trace (:meth:`follow`)."""

    def __init__(self, name: str | None = None) -> None:
        pid = os.getpid()
        self.ns = name or f"netllm-{pid}"
        self.host_if, self.ns_if = f"nlh{pid % 100000}", f"nls{pid % 100000}"
        a, b = 100 + pid % 100, (pid // 100) % 250
        self.host_ip, self.ns_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rates: list[tuple[float, float]] = []  # (time since follow started, Mbps)

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = (["ip", "netns", "exec", self.ns] if ns else []) + list(args)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NetLLMError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def __enter__(self) -> "ShapedLink":
        self.close()  # leftovers of an interrupted run
        self._ip("ip", "netns", "add", self.ns)
        try:
            self._ip("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._ip("ip", "link", "set", self.ns_if, "netns", self.ns)
            self._ip("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            self._ip("ip", "link", "set", self.host_if, "mtu", "1500", "up")
            self._ip("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if, ns=True)
            self._ip("ip", "link", "set", self.ns_if, "mtu", "1500", "up", ns=True)
            self._ip("ip", "link", "set", "lo", "up", ns=True)
            self._ip("tc", "qdisc", "add", "dev", self.ns_if, "root", "tbf", "rate", "10mbit", "burst", "64kb",
                     "latency", "2000ms", ns=True)
        except NetLLMError:
            self.close()
            raise
        return self

    def set_rate(self, mbps: float) -> None:
        rate = max(float(mbps), MIN_RATE_MBPS)
        self._ip("tc", "qdisc", "change", "dev", self.ns_if, "root", "tbf", "rate", f"{rate * 1000:.0f}kbit",
                 "burst", "64kb", "latency", "2000ms", ns=True)

    def follow(self, trace: Trace, start: int = 1) -> None:
        """Change the rate every trace sample (looping), from sample ``start`` on, until :meth:`stop`."""
        self.stop()
        self._stop.clear()
        t, bw = trace.time_s, trace.bandwidth_mbps
        t0 = time.monotonic()

        def run() -> None:
            i = max(int(start), 1)
            while not self._stop.is_set():
                self.set_rate(bw[i])
                self.rates.append((time.monotonic() - t0, float(bw[i])))
                if self._stop.wait(max(float(t[i] - t[i - 1]), 0.05)):
                    return
                i = i + 1 if i + 1 < len(t) else 1

        self._thread = threading.Thread(target=run, name="netllm-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class PlayerRun:
    """One playback: the page's log and the QoE of its chunks."""

    mode: str
    trace: str
    chunks: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    errors: list[Any]
    wall_s: float
    qoe: float = float("nan")
    parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "trace": self.trace, "qoe": self.qoe, **self.parts, "wall_s": self.wall_s,
                "chunks": self.chunks, "decisions": self.decisions, "errors": self.errors}


def qoe_of_chunks(chunks: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """The simulator's QoE over chunks 1.. (chunk 0 is not scored, as in the simulator)."""
    if len(chunks) < 2:
        raise NetLLMError(f"player log: {len(chunks)} chunk(s); QoE needs at least 2")
    levels = np.array([c["level"] for c in chunks], dtype=np.int64)
    if np.any((levels < 0) | (levels >= len(BITRATES_MBPS))):
        raise NetLLMError(f"player log: levels outside 0..5: {sorted(set(levels.tolist()))}")
    stall = np.array([c["stall_s"] for c in chunks], dtype=np.float64)
    mbps = BITRATES_MBPS[levels]
    smooth = np.abs(np.diff(mbps))
    per_chunk = mbps[1:] - REBUFFER_PENALTY * stall[1:] - SMOOTH_PENALTY * smooth
    parts = {"bitrate_mbps": float(mbps[1:].mean()), "rebuffer_s": float(stall[1:].mean()),
             "smoothness_mbps": float(smooth.mean())}
    return float(per_chunk.mean()), parts


class RealPlayerSetup:
    """The encoded clip, the shaped link and the segment server in its namespace; then
    :meth:`play` as often as wanted (one headless Chromium per playback)."""

    def __init__(self, chunks: int = 8, work: Path | None = None, rtt_ms: float = RTT_MS) -> None:
        missing = missing_tools()
        if missing:
            raise NetLLMError(f"real player: missing {', '.join(missing)}")
        self.chunks, self.rtt_ms = int(chunks), float(rtt_ms)
        self.work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="netllm-player-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.video_dir = self.work / f"video-{self.chunks}"
        self.port = 8080
        self.link = ShapedLink()
        self._server: subprocess.Popen[str] | None = None

    def __enter__(self) -> "RealPlayerSetup":
        self.video = encode_video(self.video_dir, self.chunks)
        self.link.__enter__()
        self.log = self.work / "player-log.json"
        cmd = ["ip", "netns", "exec", self.link.ns, sys.executable, "-m", "netllm.tasks.abr.player.segments",
               "--root", str(self.video_dir), "--dashjs", str(dashjs_path()), "--host", self.link.ns_ip,
               "--port", str(self.port), "--rtt-ms", str(self.rtt_ms), "--log", str(self.log)]
        self._server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.origin = f"http://{self.link.ns_ip}:{self.port}"
        until = time.monotonic() + 30
        import httpx

        while time.monotonic() < until:
            if self._server.poll() is not None:
                raise NetLLMError(f"segment server exited: {(self._server.stderr.read() or '')[-300:]}")
            try:
                if httpx.get(f"{self.origin}/video/sizes.json", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__()
        raise NetLLMError(f"segment server at {self.origin}: not up after 30 s")

    def play(self, mode: str, trace: Trace, abr_url: str = "http://127.0.0.1:8333", start: int = 1,
             policy_chunks: int = 48, timeout_s: float | None = None) -> PlayerRun:
        """One playback of the clip over ``trace`` (from sample ``start``) with ``mode``."""
        if mode not in ("netllm", "bba", "dashjs"):
            raise NetLLMError(f"player mode: netllm, bba or dashjs, got {mode!r}")
        self.log.unlink(missing_ok=True)
        self.link.follow(trace, start)
        url = f"{self.origin}/?mode={mode}&abr={abr_url}&policy_chunks={policy_chunks}"
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=self.work))
        browser = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio", "--no-first-run",
             "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        limit = timeout_s if timeout_s is not None else 120 + 3 * self.chunks * CHUNK_S
        try:
            while not self.log.is_file():
                if time.monotonic() - t0 > limit:
                    raise NetLLMError(f"real player ({mode}, trace {trace.name}): no log after {limit:.0f} s")
                if browser.poll() is not None:
                    raise NetLLMError(f"chromium exited with code {browser.returncode}")
                time.sleep(0.2)
        finally:
            self.link.stop()
            try:
                os.killpg(browser.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            browser.wait(timeout=10)
            shutil.rmtree(profile, ignore_errors=True)
        log = json.loads(self.log.read_text())
        run = PlayerRun(mode=mode, trace=trace.name, chunks=log["chunks"], decisions=log["decisions"],
                        errors=log["errors"], wall_s=round(time.monotonic() - t0, 1))
        run.qoe, run.parts = qoe_of_chunks(run.chunks)
        return run

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
        self.link.close()
