"""A real player end to end (marker ``e2e``): dash.js 5 in headless Chromium plays an
8-chunk DASH clip encoded by ffmpeg at video1's bitrates, over a veth link shaped by tbf
to a real FCC trace, asking a real ``netllm serve`` for every chunk — and keeps playing
on its in-page BBA when the server is killed, asking again once it is back."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.serve.app import BackgroundServer, ServeSettings, create_app, free_port
from netllm.tasks.abr.env import BITRATES_MBPS
from netllm.tasks.abr.player import RealPlayerSetup, missing_tools
from netllm.tasks.abr.task import model_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(real_data, tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"real player needs: {', '.join(missing)}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NETLLM_DATA", str(real_data))
        with RealPlayerSetup(chunks=8, work=tmp_path_factory.mktemp("player")) as s:
            yield s


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    torch.manual_seed(0)
    model = NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("abr-adapter")
    model.save_adapter(folder, extra={"target_return": 30.0})
    return folder


def _trace():
    from netllm.tasks.abr.traces import load_traces

    return load_traces("fcc-test")[3]


def test_every_chunk_is_decided_by_the_server(setup, adapter):
    app = create_app({"abr": adapter}, ServeSettings(deadline_ms=1000))
    with BackgroundServer(app) as server:
        run = setup.play("netllm", _trace(), abr_url=server.url)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert len(run.chunks) == 8 and not run.errors
    assert [d["source"] for d in run.decisions] == ["start"] + ["policy"] * 7
    # the level each chunk was downloaded at is the one decided for it
    assert [c["level"] for c in run.chunks] == [d["level"] for d in run.decisions]
    for c in run.chunks:
        assert c["download_ms"] > 0 and c["bytes"] > 0 and c["stall_s"] >= 0
        assert c["bytes"] == setup.video["sizes_bytes"][c["level"]][c["index"]]
    assert run.chunks[0]["stall_s"] > 0  # start-up
    mbps = BITRATES_MBPS[[c["level"] for c in run.chunks]]
    stall = np.array([c["stall_s"] for c in run.chunks])
    expected = np.mean(mbps[1:] - 4.3 * stall[1:] - np.abs(np.diff(mbps)))
    assert run.qoe == pytest.approx(expected)
    assert 'netllm_decisions_total{source="policy",task="abr"} 7.0' in metrics


def test_player_survives_a_server_restart(setup, adapter):
    port = free_port()
    app = create_app({"abr": adapter}, ServeSettings(deadline_ms=1000))
    server = BackgroundServer(app, port=port).__enter__()
    restarted = {}

    def kill_and_restart() -> None:
        time.sleep(14)  # a few chunks into the clip
        server.__exit__(None, None, None)
        time.sleep(8)
        restarted["server"] = BackgroundServer(create_app({"abr": adapter}, ServeSettings(deadline_ms=1000)),
                                               port=port).__enter__()

    chaos = threading.Thread(target=kill_and_restart)
    chaos.start()
    try:
        run = setup.play("netllm", _trace(), abr_url=f"http://127.0.0.1:{port}")
    finally:
        chaos.join()
        if "server" in restarted:
            restarted["server"].__exit__(None, None, None)
    sources = [d["source"] for d in run.decisions]
    assert len(run.chunks) == 8, sources
    assert "page-fallback" in sources, sources
    first_fallback = sources.index("page-fallback")
    assert "policy" in sources[:first_fallback] and "policy" in sources[first_fallback:], sources
    # the page saw the server go away (and opened a new session once it was back)
    assert any("Failed to load" in e["error"] for e in run.errors), run.errors


def test_bba_and_dashjs_modes_play(setup):
    for mode in ("bba", "dashjs"):
        run = setup.play(mode, _trace())
        assert len(run.chunks) == 8 and np.isfinite(run.qoe)
