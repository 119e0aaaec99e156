"""``netllm serve``: one base LLM shared by named adapters, a real uvicorn server on
127.0.0.1, batched decisions equal to in-process ones, deadlines and model errors
answered by the fallback, and bad input as a 4xx naming the field (tiny random LLMs;
the ABR service reads the real video1 chunk sizes)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from netllm.backbone import load_backbone
from netllm.model import NetLLM
from netllm.serve.app import BackgroundServer, ServeSettings, create_app
from netllm.tasks.abr.serve import ChunkObservation
from netllm.tasks.abr.task import NetLLMABRPolicy, model_config as abr_config
from netllm.tasks.vp.task import NetLLMVPPolicy, model_config as vp_config
from netllm.utils import NetLLMError


def _nudged(model: NetLLM, seed: int) -> NetLLM:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    abr = _nudged(NetLLM(abr_config(llm=tiny_llama, layers=2, rank=4, context=4)), 1)
    abr.save_adapter(root / "abr", extra={"target_return": 30.0})
    vp = _nudged(NetLLM(vp_config(llm=tiny_llama, layers=2, rank=8, hw=5, fw=4, lora_mlp=True)), 2)
    vp.save_adapter(root / "vp")
    other = NetLLM(abr_config(llm=tiny_llama, layers=3, rank=4, context=4))
    other.save_adapter(root / "abr-3layers", extra={"target_return": 30.0})
    return {"abr": root / "abr", "vp": root / "vp", "abr3": root / "abr-3layers"}


def test_named_adapters_share_one_backbone_and_equal_standalone_models(adapters, tiny_llama):
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        ref = {t: NetLLM.from_adapter(adapters[t]).eval().hidden(x)[0] for t in ("abr", "vp")}
        backbone = load_backbone(tiny_llama, layers=2, lora=None)
        shared = {t: NetLLM.from_adapter(adapters[t], backbone=backbone, adapter_name=t).eval()
                  for t in ("abr", "vp")}
        for t in ("abr", "vp", "abr"):  # switching back and forth
            assert torch.equal(shared[t].hidden(x)[0], ref[t])
    assert shared["abr"].backbone is shared["vp"].backbone
    assert sorted(backbone.adapters) == ["abr", "vp"]
    with pytest.raises(NetLLMError, match="layers"):
        NetLLM.from_adapter(adapters["abr3"], backbone=backbone, adapter_name="abr3")
    with pytest.raises(NetLLMError, match="shares its backbone"):
        shared["abr"].save_adapter(adapters["abr"].parent / "x")


def test_serving_in_bf16_uses_evals_weights_and_keeps_lora_float32(adapters, tiny_llama):
    """``serve --dtype bf16``: one adapter is folded in float32 and rounded once, the
    weights of ``eval --dtype bf16``; with several, the shared frozen weights are bf16,
    every LoRA stays float32, and the answers stay close to float32's."""
    from netllm.backbone import inference_precision
    from netllm.serve.hub import ModelHub

    one = ModelHub({"abr": adapters["abr"]}, device="cpu", dtype="bf16")
    with inference_precision("bf16"):
        evaluated = NetLLM.from_adapter(adapters["abr"], merge=True)
    served = dict(one.backbone.llm.named_parameters())
    frozen = [(n, p) for n, p in evaluated.backbone.llm.named_parameters() if "lora_" not in n]
    assert frozen
    for name, p in frozen:  # (the folded LoRA matrices are no longer used)
        assert p.dtype == torch.bfloat16 and torch.equal(served[name], p), name
    both = ModelHub({"abr": adapters["abr"], "vp": adapters["vp"]}, device="cpu", dtype="bf16")
    params = dict(both.backbone.llm.named_parameters())
    assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16) for n, p in params.items())
    assert any("lora_" in n for n in params)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        ref = {t: NetLLM.from_adapter(adapters[t]).eval().hidden(x)[0] for t in ("abr", "vp")}
        for t, other in (("abr", "vp"), ("vp", "abr")):
            got = both.models[t].hidden(x)[0]
            off = {k: ((got - r).norm() / r.norm()).item() for k, r in ref.items()}
            # rounding only (a few % on this tiny random LLM), far less than another adapter's LoRA makes
            assert got.dtype == torch.float32 and off[t] < 0.1 and off[t] < off[other] / 3, (t, off)


@pytest.fixture(scope="module")
def data_env(real_data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NETLLM_DATA", str(real_data))
        yield real_data


@pytest.fixture(scope="module")
def server(adapters, data_env):
    app = create_app({"abr": adapters["abr"], "vp": adapters["vp"]},
                     ServeSettings(deadline_ms=0, max_sessions=8, session_ttl_s=60))
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


def _observations(env, levels, info, video):
    """The request body of each env's last chunk (what a player measured)."""
    chunk = np.asarray(info["chunk_index"])
    return [ChunkObservation(
        last_level=int(info["level"][i]), buffer_s=float(info["buffer_s"][i]),
        rebuffer_s=float(info["rebuffer_s"][i]),
        last_chunk_bytes=float(video.sizes_bytes[int(info["level"][i]), int(chunk[i])]),
        download_ms=float(info["delay_ms"][i]),
        next_chunk_bytes=[float(x) for x in video.sizes_bytes[:, int(chunk[i]) + 1]],
        chunks_left=int(info["chunks_left"][i])).model_dump() for i in range(env.num_envs)]


def test_served_decisions_equal_in_process_eval_on_real_traces(server, adapters):
    """K players in parallel, each asking for every chunk, get the levels that
    NetLLMABRPolicy picks in-process for the same traces (QoE equal)."""
    from netllm.tasks.abr.env import BatchABREnv
    from netllm.tasks.abr.traces import load_traces, load_video

    traces, video = load_traces("fcc-test")[:6], load_video("video1")
    policy = NetLLMABRPolicy(NetLLM.from_adapter(adapters["abr"]).eval(), 30.0)
    env = BatchABREnv(traces, video, noise=False, random_start=False)
    obs, info = env.reset(1)
    policy.reset(env, 1)
    expected, qoe_in = [], 0.0
    done = False
    while not done:
        levels = policy.act(obs, info)
        expected.append(levels)
        obs, reward, term, _, info = env.step(levels)
        qoe_in += float(reward.sum())
        done = bool(term.all())

    served_env = BatchABREnv(traces, video, noise=False, random_start=False)
    _, info = served_env.reset(1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = [client.post("/v1/abr/sessions").json()["session_id"] for _ in traces]
        got, qoe_served, done = [], 0.0, False
        while not done:
            bodies = _observations(served_env, None, info, video)
            answers: list = [None] * len(ids)

            def ask(i: int) -> None:
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    answers[i] = c.post(f"/v1/abr/sessions/{ids[i]}/decide", json=bodies[i]).json()

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ids))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert {a["source"] for a in answers} == {"policy"}
            levels = np.array([a["level"] for a in answers])
            got.append(levels)
            _, reward, term, _, info = served_env.step(levels)
            qoe_served += float(reward.sum())
            done = bool(term.all())
        for sid in ids:
            assert client.delete(f"/v1/abr/sessions/{sid}").status_code == 204
        metrics = client.get("/metrics").text
    assert np.array_equal(np.stack(got), np.stack(expected))
    assert qoe_served == pytest.approx(qoe_in)
    # concurrent requests were decided together: fewer batched calls than decisions
    calls = float(next(l for l in metrics.splitlines() if l.startswith('netllm_batch_size_count{task="abr"}')).split()[-1])
    assert calls < len(got) * len(ids)


def test_health_docs_metrics_and_vp_predictions(server, adapters):
    policy = NetLLMVPPolicy(NetLLM.from_adapter(adapters["vp"]).eval())
    history = np.cumsum(np.random.default_rng(0).normal(size=(5, 3)), axis=0) * 5
    with httpx.Client(base_url=server.url, timeout=30) as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and set(health["adapters"]) == {"abr", "vp"}
        assert client.get("/docs").status_code == 200
        assert "/v1/abr/sessions/{session_id}/decide" in client.get("/openapi.json").json()["paths"]
        r = client.post("/v1/vp/predict", json={"history_deg": history.tolist()})
        assert r.status_code == 200 and r.json()["source"] == "policy"
        assert np.allclose(r.json()["future_deg"], policy.predict(history[None])[0], atol=1e-3)
        bad = client.post("/v1/vp/predict", json={"history_deg": history[:3].tolist()})
        assert bad.status_code == 422 and "history_deg" in bad.json()["error"]
        text = client.get("/metrics").text
    assert 'netllm_decisions_total{source="policy",task="vp"}' in text


GOOD = {"last_level": 2, "buffer_s": 6.0, "rebuffer_s": 0.0, "last_chunk_bytes": 600000.0,
        "download_ms": 900.0, "next_chunk_bytes": [150e3, 380e3, 600e3, 930e3, 1.4e6, 2.1e6], "chunks_left": 30}


@pytest.mark.parametrize("body, field", [
    ("{not json", "body"),
    ({k: v for k, v in GOOD.items() if k != "buffer_s"}, "buffer_s"),
    ({**GOOD, "buffer_s": "6"}, "buffer_s"),
    ({**GOOD, "download_ms": -5.0}, "download_ms"),
    ({**GOOD, "last_level": 6}, "last_level"),
    ({**GOOD, "next_chunk_bytes": [1.0] * 5}, "next_chunk_bytes"),
    ({**GOOD, "extra": 1}, "extra"),
])
def test_bad_observations_are_422_naming_the_field(server, body, field):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/abr/sessions").json()["session_id"]
        content = body if isinstance(body, str) else json.dumps(body)
        r = client.post(f"/v1/abr/sessions/{sid}/decide", content=content,
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(field), r.json()
        # the session is not disturbed: a good observation is decided
        assert client.post(f"/v1/abr/sessions/{sid}/decide", json=GOOD).json()["source"] == "policy"
        client.delete(f"/v1/abr/sessions/{sid}")


def test_nan_unknown_session_and_full_server(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/abr/sessions").json()["session_id"]
        r = client.post(f"/v1/abr/sessions/{sid}/decide", content=json.dumps({**GOOD, "rebuffer_s": float("nan")}),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith("rebuffer_s")
        r = client.post("/v1/abr/sessions/nope/decide", json=GOOD)
        assert r.status_code == 404 and "unknown session" in r.json()["error"]
        client.delete(f"/v1/abr/sessions/{sid}")
        opened = [client.post("/v1/abr/sessions") for _ in range(9)]
        assert [o.status_code for o in opened] == [201] * 8 + [503]
        assert "--max-sessions" in opened[-1].json()["error"]
        for o in opened[:8]:
            client.delete(f"/v1/abr/sessions/{o.json()['session_id']}")


def test_pensieve_protocol(server):
    from netllm.tasks.abr.traces import load_video

    video = load_video("video1")
    t = 1.7e12
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for chunk in range(3):
            body = {"lastquality": 1, "buffer": 4.0 + chunk, "RebufferTime": 120.0, "lastChunkStartTime": t,
                    "lastChunkFinishTime": t + 800, "lastChunkSize": 500000, "lastRequest": chunk,
                    "bandwidthEst": 3000, "nextChunkSize": 1, "Type": "BB"}
            r = client.post("/", content=json.dumps(body))  # no content type, as the patched dash.js
            assert r.status_code == 200 and r.text in {str(i) for i in range(6)}
            assert r.headers["access-control-allow-origin"] == "*"
        last = {**body, "lastRequest": video.num_chunks - 1}
        assert client.post("/", content=json.dumps(last)).text == "REFRESH"
        assert client.post("/", content=json.dumps({"pastThroughput": [1, 2]})).text == ""
        bad = client.post("/", content=json.dumps({**body, "buffer": -1}))
        assert bad.status_code == 422 and bad.json()["error"].startswith("buffer")
        bad = client.post("/", content=json.dumps({**body, "lastChunkFinishTime": t - 1}))
        assert bad.status_code == 422 and "lastChunkFinishTime" in bad.json()["error"]


def test_deadline_model_error_and_disconnect_answer_with_the_fallback(adapters, data_env):
    from netllm.tasks.abr.baselines import bba_levels

    # a deadline well above a decision's time on a loaded machine, a late model far beyond it
    app = create_app({"abr": adapters["abr"]}, ServeSettings(deadline_ms=300, max_sessions=4, session_ttl_s=2.5,
                                                             fallbacks={"abr": "bba"}))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        ctx = app.state.ctx
        abr = ctx.hub.models["abr"]
        slow = threading.Event()
        head = abr.heads["action"]
        real_forward = head.forward

        def slow_forward(x):
            if slow.is_set():
                time.sleep(1.0)
            return real_forward(x)

        head.forward = slow_forward
        sid = client.post("/v1/abr/sessions").json()["session_id"]
        other = client.post("/v1/abr/sessions").json()["session_id"]
        assert client.post(f"/v1/abr/sessions/{sid}/decide", json=GOOD).json()["source"] == "policy"
        slow.set()
        late = client.post(f"/v1/abr/sessions/{sid}/decide", json={**GOOD, "buffer_s": 12.0}).json()
        assert late["source"] == "fallback" and late["level"] == int(bba_levels(np.array([12.0]))[0])
        assert late["latency_ms"] < 800
        # a client that gives up mid-request disturbs nobody
        with pytest.raises(httpx.TimeoutException):
            client.post(f"/v1/abr/sessions/{other}/decide", json=GOOD, timeout=0.01)
        slow.clear()
        time.sleep(1.1)
        assert client.post(f"/v1/abr/sessions/{sid}/decide", json=GOOD).json()["source"] == "policy"
        assert client.post(f"/v1/abr/sessions/{other}/decide", json=GOOD).json()["source"] == "policy"

        def broken(x):
            raise RuntimeError("boom")

        head.forward = broken
        r = client.post(f"/v1/abr/sessions/{sid}/decide", json={**GOOD, "buffer_s": 0.5})
        assert r.status_code == 200 and r.json()["source"] == "fallback" and r.json()["level"] == 0
        head.forward = real_forward
        assert client.post(f"/v1/abr/sessions/{sid}/decide", json=GOOD).json()["source"] == "policy"
        text = client.get("/metrics").text
        assert 'netllm_fallbacks_total{reason="deadline",task="abr"}' in text
        assert 'netllm_fallbacks_total{reason="error",task="abr"} 1.0' in text
        # idle sessions expire
        time.sleep(3.5)
        assert client.post(f"/v1/abr/sessions/{sid}/decide", json=GOOD).status_code == 404


def test_cli_refuses_bad_serving_setups_in_one_line(adapters, tmp_path, capsys):
    from netllm.cli import main

    cases = [
        (["--adapter", f"abr={adapters['vp']}"], "is for task 'vp'"),
        (["--adapter", f"abr={adapters['abr']}", "--adapter", f"vp={adapters['abr3']}"], "is for task 'abr'"),
        (["--adapter", "abr=" + str(tmp_path / "missing")], "missing"),
        (["--adapter", "abr"], "TASK=FOLDER"),
        (["--adapter", f"abr={adapters['abr']}", "--fallback", "abr=oracle"], "--fallback abr=oracle"),
        (["--adapter", f"abr={adapters['abr']}", "--deadline-ms", "-1"], "--deadline-ms"),
        (["--adapter", f"abr={adapters['abr']}", "--max-sessions", "0"], "--max-sessions"),
        (["--adapter", f"abr={adapters['abr']}", "--dtype", "fp16"], "--dtype"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err.replace("\n", " ", err.count("\n")), err


def test_adapters_needing_another_base_are_refused(adapters):
    from netllm.serve.hub import check_adapters

    import shutil

    vp3 = adapters["abr3"].parent / "vp3"
    if not vp3.exists():
        shutil.copytree(adapters["abr3"], vp3)
        config = json.loads((vp3 / "adapter_config.json").read_text())
        (vp3 / "adapter_config.json").write_text(json.dumps({**config, "task": "vp"}))
    with pytest.raises(NetLLMError, match=r"vp=.*vp3: needs layers 3, but --adapter abr=.* needs 2"):
        check_adapters({"abr": adapters["abr"], "vp": vp3})


def test_cli_serves_until_stopped(adapters, data_env):
    """`netllm serve` as a user runs it: a process that answers until it is terminated."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from netllm.serve.app import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("netllm")
    proc = subprocess.Popen([str(exe), "serve", "--adapter", f"abr={adapters['abr']}", "--adapter",
                             f"vp={adapters['vp']}", "--port", str(port), "--fallback", "vp=velocity"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        until = time.monotonic() + 120
        while time.monotonic() < until:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        sid = httpx.post(f"{url}/v1/abr/sessions").json()["session_id"]
        assert httpx.post(f"{url}/v1/abr/sessions/{sid}/decide", json=GOOD).json()["source"] == "policy"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving abr, vp on http://127.0.0.1:{port}" in out
    assert "Traceback" not in out


def test_the_default_abr_fallback_holds_the_level_unless_the_buffer_is_short():
    from netllm.tasks.abr.serve import FALLBACKS, fallback_level

    assert FALLBACKS[0] == "hold-bba"
    obs = ChunkObservation.model_validate({**GOOD, "last_level": 3, "buffer_s": 30.0})
    assert fallback_level("hold-bba", obs) == 3 and fallback_level("bba", obs) == 5
    short = ChunkObservation.model_validate({**GOOD, "last_level": 3, "buffer_s": 6.0})
    assert fallback_level("hold-bba", short) == 0 == fallback_level("bba", short)
