"""The data registry: manifest, data_root, status, fetch (against 127.0.0.1) and pickles."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest

from netllm import data
from netllm.utils import NetLLMError


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# Small files in real data set groups; served content equals these unless corrupted.
FILES: dict[str, bytes] = {
    "abr/traces/test/fcc-test/000_trace_942154_http---www.ebay.com_0": b"0 1.5\n1 2.25\n",
    "abr/traces/test/fcc-test/001_test_fcc_trace_215364_http---www.ebay.com_600_0": b"0 3\n",
    "abr/videos/video1_sizes/video_size_0": b"181801\n155580\n",
    "vp/viewports/Wu2017/video1/5Hz/simple_5Hz_user1.csv": b"0.0,1.0,2.0,3.0\n",
    "vp/viewports/Jin2022/video1/5Hz/odd name #1 100%.csv": b"0.2,1,2,3\n",  # needs quoting
    "cjs/pretrained/decima_model.pt": b"not really a state dict",
    "cjs/tpch/2g/adj_mat_1.npy": b"the genuine bytes",
}
CORRUPT = "cjs/tpch/2g/adj_mat_1.npy"
DERIVED = "abr/pretrained/genet_actor.npz"  # not published upstream


@pytest.fixture(autouse=True)
def _no_task_post_fetch(monkeypatch):
    """Tasks imported by other tests register post-fetch steps (ABR's checkpoint
    converter); these tests serve a handful of fake files, so start from none."""
    monkeypatch.setattr(data, "POST_FETCH", {})


@pytest.fixture
def manifest() -> data.Manifest:
    return data.build_manifest({**{p: sha(b) for p, b in FILES.items()}, DERIVED: "0" * 64})


@pytest.fixture
def server(tmp_path: Path, manifest: data.Manifest):
    """A real HTTP server on 127.0.0.1 serving FILES by upstream path, one corrupted."""
    served = tmp_path / "upstream"
    for path, blob in FILES.items():
        dest = served / manifest[path].upstream
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"tampered!" if path == CORRUPT else blob)
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    yield SimpleNamespace(url=url, dir=served, requests=requests)
    httpd.shutdown()
    httpd.server_close()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def by_group(rows: list[dict]) -> dict[str, dict]:
    return {r["group"]: r for r in rows}


# --------------------------------------------------------------------------- manifest


def test_shipped_manifest_covers_every_group_with_upstream_paths():
    m = data.default_manifest()
    assert len(m) == 3678
    counts = {r: 0 for r in (g.name for g in data.GROUPS)}
    for entry in m.values():
        counts[entry.group.name] += 1
        assert len(entry.sha256) == 64 and not entry.path.startswith("./")
    assert counts["abr/traces/train"] == 235 and counts["abr/traces/valid"] == 150
    assert counts["abr/traces/test"] == 101 and counts["abr/pretrained"] == 5
    assert all(counts.values()), counts
    upstream = {
        "cjs/pretrained/decima_model.pt": "cluster_job_scheduling/models/decima/model.pt",
        "cjs/tpch/2g/task_duration_1.npy": "cluster_job_scheduling/data/tpch/2g/task_duration_1.npy",
        "abr/videos/video2_sizes/video_size_5":
            "adaptive_bitrate_streaming/data/videos/video2_sizes/video_size_5",
        "abr/upstream_checkpoints/udr_2/nn_model_ep_52400.ckpt.index":
            "adaptive_bitrate_streaming/data/all_models/udr_2/nn_model_ep_52400.ckpt.index",
    }
    assert {p: m[p].upstream for p in upstream} == upstream
    assert m["abr/pretrained/udr_1_actor.npz"].upstream is None


def test_upstream_checkpoint_manifest_agrees_with_data_manifest():
    text = resources.files("netllm").joinpath("manifests/upstream_checkpoints.sha256").read_text()
    upstream = data.read_sha256_file(text, "upstream_checkpoints.sha256")
    by_upstream = {e.upstream: e.sha256 for e in data.default_manifest().values()}
    assert len(upstream) == 12
    assert all(by_upstream[path] == h for path, h in upstream.items())


def test_manifest_rejects_paths_outside_the_registry_and_bad_lines():
    with pytest.raises(NetLLMError, match="nowhere/file"):
        data.build_manifest({"nowhere/file": "0" * 64})
    with pytest.raises(NetLLMError, match="m.sha256:2"):
        data.read_sha256_file(f"{'a' * 64}  abr/videos/x\nnot a line\n", "m.sha256")


# --------------------------------------------------------------------------- locating


def test_data_root_honours_netllm_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NETLLM_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    monkeypatch.setenv("NETLLM_DATA", str(tmp_path / "absent"))
    with pytest.raises(NetLLMError, match="NETLLM_DATA"):
        data.data_root()
    monkeypatch.delenv("NETLLM_DATA")
    monkeypatch.setenv("NETLLM_CACHE", str(tmp_path / "cache"))
    assert data.data_root() == tmp_path / "cache" / "data"


def test_dataset_path_explains_how_to_get_missing_data(tmp_path):
    with pytest.raises(NetLLMError) as err:
        data.dataset_path("abr", "traces", "test", "fcc-test", root=tmp_path)
    message = str(err.value)
    assert "'abr/traces/test/fcc-test' not found" in message and str(tmp_path) in message
    assert "netllm data fetch abr" in message and "NETLLM_DATA" in message
    (tmp_path / "abr/videos").mkdir(parents=True)
    assert data.dataset_path("abr", "videos", root=tmp_path) == tmp_path / "abr/videos"
    with pytest.raises(NetLLMError, match="task"):
        data.dataset_path("nope", root=tmp_path)


# --------------------------------------------------------------------------- fetch


def test_fetch_rejects_corrupt_download_and_keeps_good_files(tmp_path, server, manifest):
    root = tmp_path / "root"
    with pytest.raises(NetLLMError) as err:
        data.fetch("all", root=root, base_url=server.url, progress=False, manifest=manifest)
    message = str(err.value)
    assert CORRUPT in message
    assert sha(FILES[CORRUPT]) in message and sha(b"tampered!") in message

    good = set(FILES) - {CORRUPT}
    assert files_under(root) == good  # no corrupt file, no temp leftovers
    assert all(data.sha256_file(root / p) == sha(FILES[p]) for p in good)
    assert len(server.requests) == len(FILES)  # the derived npz is never requested
    assert quote("odd name #1 100%.csv") in "".join(server.requests)

    # A second fetch only asks for the file still missing.
    server.requests.clear()
    with pytest.raises(NetLLMError, match=CORRUPT):
        data.fetch("all", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert server.requests == ["/" + quote(manifest[CORRUPT].upstream)]

    # Once upstream serves the right bytes, it lands and the rest is skipped.
    (server.dir / manifest[CORRUPT].upstream).write_bytes(FILES[CORRUPT])
    summary = data.fetch("all", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert (summary.downloaded, summary.skipped) == (1, len(FILES) - 1)
    assert summary.nbytes == len(FILES[CORRUPT])
    assert summary.missing_derived == [DERIVED]
    assert files_under(root) == set(FILES)

    server.requests.clear()
    summary = data.fetch("all", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert summary.downloaded == 0 and server.requests == []


def test_fetch_one_task_replaces_corrupt_local_file_and_runs_post_fetch(
    tmp_path, server, manifest, monkeypatch
):
    root = tmp_path / "root"
    calls: list[Path] = []
    monkeypatch.setitem(data.POST_FETCH, "vp", calls.append)
    summary = data.fetch("vp", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert summary.downloaded == 2 and summary.post_fetch == ["vp"] and calls == [root]
    assert {p.split("/")[0] for p in files_under(root)} == {"vp"}

    victim = root / "vp/viewports/Wu2017/video1/5Hz/simple_5Hz_user1.csv"
    victim.write_bytes(b"bit rot")
    summary = data.fetch("vp", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert (summary.downloaded, summary.skipped) == (1, 1)
    assert victim.read_bytes() == FILES["vp/viewports/Wu2017/video1/5Hz/simple_5Hz_user1.csv"]


def test_fetch_network_errors_name_the_url(tmp_path, server, manifest, monkeypatch):
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0.0)
    missing = data.build_manifest({"abr/videos/video2_sizes/video_size_3": "0" * 64})
    with pytest.raises(NetLLMError, match=r"video2_sizes/video_size_3: HTTP 404"):
        data.fetch("abr", root=tmp_path, base_url=server.url, progress=False, manifest=missing)

    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(NetLLMError, match=f"download failed: {dead}/cluster_job_scheduling"):
        data.fetch("cjs", root=tmp_path, base_url=dead, progress=False, manifest=manifest)
    assert files_under(tmp_path) == {"upstream/" + manifest[p].upstream for p in FILES}
    with pytest.raises(NetLLMError, match="task"):
        data.fetch("video", root=tmp_path, progress=False, manifest=manifest)


# --------------------------------------------------------------------------- status


def test_status_reports_ok_missing_partial_corrupt(tmp_path, manifest):
    root = tmp_path
    for path, blob in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(blob)
    (root / "abr/traces/test/fcc-test/000_trace_942154_http---www.ebay.com_0").unlink()
    (root / "cjs/tpch/2g/adj_mat_1.npy").write_bytes(b"tampered!")

    rows = by_group(data.status(root, verify=True, manifest=manifest))
    assert list(rows) == [
        "abr/traces/test", "abr/videos", "abr/pretrained",
        "vp/viewports/Jin2022", "vp/viewports/Wu2017", "cjs/tpch", "cjs/pretrained",
    ]
    state = {g: r["state"] for g, r in rows.items()}
    assert state == {
        "abr/traces/test": "partial", "abr/videos": "ok", "abr/pretrained": "missing",
        "vp/viewports/Jin2022": "ok", "vp/viewports/Wu2017": "ok", "cjs/tpch": "corrupt",
        "cjs/pretrained": "ok",
    }
    assert rows["abr/traces/test"]["expected"] == 2 and rows["abr/traces/test"]["present"] == 1
    assert rows["abr/pretrained"]["detail"] == "converted from checkpoints"
    assert CORRUPT in rows["cjs/tpch"]["detail"] and rows["cjs/tpch"]["verified"] == 0
    assert rows["cjs/pretrained"]["verified"] == 1

    quick = by_group(data.status(root, verify=False, manifest=manifest))
    assert quick["cjs/tpch"]["state"] == "ok" and quick["cjs/tpch"]["verified"] is None


def test_status_of_empty_root_lists_every_group_missing(tmp_path):
    rows = data.status(tmp_path)
    assert [r["group"] for r in rows] == [g.name for g in data.GROUPS]
    assert all(r["state"] == "missing" and r["present"] == 0 for r in rows)
    assert by_group(rows)["vp/viewports/Wu2017"]["detail"] == "run 'netllm data fetch vp'"


# --------------------------------------------------------------------------- pickles

TPCH = "cjs/tpch/2g/task_duration_1.npy"


def write_pickled_npy(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array({0: {"first_wave": {1: [10.0]}}}, dtype=object), allow_pickle=True)
    return path.read_bytes()


def test_load_verified_pickle_refuses_tampered_and_unlisted_files(tmp_path, monkeypatch):
    path = tmp_path / TPCH
    blob = write_pickled_npy(path)

    def never(*args, **kwargs):
        raise AssertionError("np.load must not run on an unverified file")

    with monkeypatch.context() as m:
        m.setattr(data.np, "load", never)
        with pytest.raises(NetLLMError, match="refusing to unpickle .*task_duration_1.npy"):
            data.load_verified_pickle(path)  # the shipped manifest has the real hash
        with pytest.raises(NetLLMError, match="not listed"):
            other = data.build_manifest({"cjs/tpch/2g/other.npy": sha(blob)})
            data.load_verified_pickle(path, manifest=other)
        with pytest.raises(NetLLMError, match="refusing"):
            data.load_verified_pickle(path, expected_sha256="f" * 64)

    ours = data.build_manifest({TPCH: sha(blob)})
    assert isinstance(data.load_verified_pickle(path, manifest=ours).item(), dict)
    assert isinstance(data.load_verified_pickle(path, expected_sha256=sha(blob)).item(), dict)
    with pytest.raises(NetLLMError, match="cannot read"):
        data.load_verified_pickle(tmp_path / "absent.npy", expected_sha256=sha(blob))


# --------------------------------------------------------------------------- real data


def real_root(*needs: str) -> Path:
    env = os.environ.get("NETLLM_DATA")
    if not env:
        pytest.skip("NETLLM_DATA is not set: no real data to check")
    root = Path(env)
    for need in needs:
        if not (root / need).exists():
            pytest.skip(f"NETLLM_DATA={env} has no {need}")
    return root


@pytest.mark.integration
def test_real_tpch_task_durations_load_after_hash_check():
    root = real_root("cjs/tpch")
    durations = data.load_verified_pickle(root / TPCH).item()
    assert isinstance(durations, dict) and durations
    stage = next(iter(durations.values()))
    assert {"first_wave", "rest_wave"} <= set(stage)


@pytest.mark.integration
def test_real_data_status_all_ok():
    root = real_root()
    rows = data.status(root)
    assert [r["group"] for r in rows] == [g.name for g in data.GROUPS]
    assert all(r["state"] == "ok" for r in rows), [r for r in rows if r["state"] != "ok"]
    verified = data.status(root, verify=True)
    assert all(r["verified"] == r["expected"] for r in verified)
