"""The data registry: manifest, data_root, status, fetch (against 127.0.0.1) and pickles.

The data sets come from the installed tasks (``netllm.registry.tasks``); these tests install
stand-ins that declare the built-in tasks' real data sets and manifests (without ABR's
checkpoint converter) and, where needed, a plug-in task of their own."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest

from netllm import data, registry
from netllm.data import DataGroup
from netllm.tasks.abr import datasets as abr_datasets
from netllm.tasks.cjs import datasets as cjs_datasets
from netllm.tasks.vp import datasets as vp_datasets
from netllm.utils import NetLLMError

REAL_TASKS = registry.tasks  # before any test patches it


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


class FakeTask:
    """What netllm.data asks of a task: its data set groups, manifest and post-fetch step."""

    def __init__(self, name: str, groups: tuple[DataGroup, ...] = (), manifest: str = "") -> None:
        self.name, self._groups, self._manifest = name, groups, manifest
        self.fetched: list[Path] = []

    def datasets(self) -> tuple[DataGroup, ...]:
        return self._groups

    def manifest(self) -> str:
        return self._manifest

    def post_fetch(self, root: Path) -> None:
        self.fetched.append(root)


def manifest_text(hashes: dict[str, str]) -> str:
    return "".join(f"{h}  {p}\n" for p, h in hashes.items())


@pytest.fixture(autouse=True)
def installed(monkeypatch) -> dict[str, FakeTask]:
    """The installed tasks, by name: the built-in ones' data sets without their post-fetch
    steps (ABR's converter would run on the handful of fake files served here). A test
    may add tasks to the returned dict (then clear ``data.default_manifest``'s cache)."""
    found = {
        m.__name__.split(".")[-2]: FakeTask(m.__name__.split(".")[-2], m.GROUPS, m.manifest())
        for m in (abr_datasets, cjs_datasets, vp_datasets)
    }
    monkeypatch.setattr(registry, "tasks", lambda: found)
    data.default_manifest.cache_clear()
    yield found
    data.default_manifest.cache_clear()


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
    counts = {r: 0 for r in (g.name for g in data.groups())}
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


def test_builtin_tasks_declare_their_data_sets_and_manifests():
    """The registry's real tasks hand out their datasets modules' groups and manifests."""
    real = REAL_TASKS()
    for name, module in (("abr", abr_datasets), ("cjs", cjs_datasets), ("vp", vp_datasets)):
        task = real[name]
        assert task.datasets() == module.GROUPS and {g.task for g in module.GROUPS} == {name}
        paths = data.read_sha256_file(task.manifest(), f"{name}.sha256")
        assert paths and all(p.startswith(name + "/") for p in paths)
    assert len(data.read_sha256_file(real["vp"].manifest(), "vp")) == 2700


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


def test_a_task_manifest_path_outside_its_own_groups_is_an_error_naming_it(installed):
    group = DataGroup("bw/traces", "bw/traces", "bwpred/traces")
    installed["bw"] = FakeTask("bw", (group,), manifest_text({"abr/videos/x": "0" * 64}))
    data.default_manifest.cache_clear()
    with pytest.raises(NetLLMError, match=r"task 'bw' manifest: path 'abr/videos/x' .* of task 'bw'"):
        data.default_manifest()
    installed["bw"] = FakeTask("bw", (DataGroup("bw/x", "abr/videos", "elsewhere"),))
    with pytest.raises(NetLLMError, match=r"task 'bw'.* is not under 'bw/'"):
        data.groups()


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
    with pytest.raises(NetLLMError, match="installed tasks: abr, cjs, vp"):
        data.dataset_path("nope", root=tmp_path)


def test_unknown_task_is_one_line_listing_the_installed_tasks(tmp_path, installed):
    installed["bw"] = FakeTask("bw")
    for call in (
        lambda: data.fetch("video", root=tmp_path, progress=False),
        lambda: data.dataset_path("video", root=tmp_path),
    ):
        with pytest.raises(NetLLMError) as err:
            call()
        message = str(err.value)
        assert "'video'" in message and "installed tasks: abr, bw, cjs, vp" in message
        assert "\n" not in message
    assert "or all" in str(pytest.raises(NetLLMError, data.fetch, "video", root=tmp_path).value)
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing written


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
    tmp_path, server, manifest, installed
):
    root = tmp_path / "root"
    summary = data.fetch("vp", root=root, base_url=server.url, progress=False, manifest=manifest)
    assert summary.downloaded == 2 and summary.post_fetch == ["vp"]
    assert installed["vp"].fetched == [root] and installed["abr"].fetched == []
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
    with pytest.raises(NetLLMError, match="unknown task 'video'; installed tasks: abr, cjs, vp"):
        data.fetch("video", root=tmp_path, progress=False, manifest=manifest)


def test_fetch_stops_early_when_nothing_can_be_fetched(tmp_path, monkeypatch):
    """An unreachable source: after FAIL_FAST failures and no success the fetch stops,
    instead of trying (and timing out on) every file of the manifest."""
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0.0)
    many = data.build_manifest({f"abr/videos/video1_sizes/video_size_{i}": "0" * 64 for i in range(6)}
                               | {f"abr/videos/video2_sizes/video_size_{i}": "0" * 64 for i in range(6)}
                               | {f"abr/traces/test/fcc-test/t{i}": "0" * 64 for i in range(20)})
    tried: list[str] = []

    def unreachable(entry, root, base_url):
        tried.append(entry.path)
        time.sleep(0.05)  # a refused connection takes a while
        raise NetLLMError(f"{entry.path}: download failed: {base_url}: connection refused")

    monkeypatch.setattr(data, "_fetch_one", unreachable)
    with pytest.raises(NetLLMError, match=r"the first 8 files of abr could not be fetched, none could; stopped"):
        data.fetch("abr", root=tmp_path, base_url="http://127.0.0.1:9", progress=False, manifest=many, workers=1)
    assert len(tried) <= data.FAIL_FAST + 2 < len(many)  # the files queued behind are cancelled


# --------------------------------------------------------------------------- status


def test_status_reports_ok_missing_partial_corrupt(tmp_path, manifest):
    root = tmp_path
    for path, blob in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(blob)
    (root / "abr/traces/test/fcc-test/000_trace_942154_http---www.ebay.com_0").unlink()
    (root / "cjs/tpch/2g/adj_mat_1.npy").write_bytes(b"tampered!")

    rows = by_group(data.status(root, verify=True, manifest=manifest))
    assert list(rows) == [  # task by task, as installed (the registry sorts by name)
        "abr/traces/test", "abr/videos", "abr/pretrained",
        "cjs/tpch", "cjs/pretrained", "vp/viewports/Jin2022", "vp/viewports/Wu2017",
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
    assert [r["group"] for r in rows] == [g.name for g in data.groups()]
    assert [r["group"] for r in rows][:1] + [r["group"] for r in rows][-1:] == [
        "abr/traces/train", "vp/viewports/Wu2017"
    ]
    assert all(r["state"] == "missing" and r["present"] == 0 for r in rows)
    assert by_group(rows)["vp/viewports/Wu2017"]["detail"] == "run 'netllm data fetch vp'"


# --------------------------------------------------------------------------- plug-in tasks

BW_FILES: dict[str, bytes] = {  # a fourth task's data set, published at bwpred/data/...
    "bw/traces/train/a.csv": b"0,1.5\n1,2.0\n",
    "bw/traces/test/b c.csv": b"0,0.5\n",
}
BW_DERIVED = "bw/model.npz"


def test_a_plugin_task_brings_its_own_data_sets(tmp_path, server, installed):
    bw = FakeTask(
        "bw",
        (
            DataGroup("bw/traces", "bw/traces", "bwpred/data/traces"),
            DataGroup("bw/model", BW_DERIVED, None, "trained by 'netllm adapt bw'"),
        ),
        manifest_text({**{p: sha(b) for p, b in BW_FILES.items()}, BW_DERIVED: "1" * 64}),
    )
    installed["bw"] = bw
    installed["empty"] = FakeTask("empty")  # a task without data sets is fine
    data.default_manifest.cache_clear()
    for path, blob in BW_FILES.items():
        dest = server.dir / "bwpred/data" / path.removeprefix("bw/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(blob)

    m = data.default_manifest()  # every task's manifest together
    assert len(m) == 3678 + 3
    assert m["bw/traces/test/b c.csv"].upstream == "bwpred/data/traces/test/b c.csv"
    assert m[BW_DERIVED].group.task == "bw" and m[BW_DERIVED].upstream is None
    assert data.group_of("bw/traces/train/a.csv").name == "bw/traces"

    root = tmp_path / "root"
    rows = by_group(data.status(root))
    assert rows["bw/traces"] == {
        "task": "bw", "group": "bw/traces", "expected": 2, "present": 0, "verified": None,
        "state": "missing", "detail": "run 'netllm data fetch bw'",
    }
    assert rows["bw/model"]["detail"] == "trained by 'netllm adapt bw'"
    assert not any(r["task"] == "empty" for r in rows.values())

    summary = data.fetch("bw", root=root, base_url=server.url, progress=False)
    assert (summary.downloaded, summary.skipped) == (2, 0)
    assert summary.post_fetch == ["bw"] and bw.fetched == [root]
    assert summary.missing_derived == [BW_DERIVED]
    assert files_under(root) == set(BW_FILES)
    assert all(r.startswith("/bwpred/data/traces/") for r in server.requests)

    rows = by_group(data.status(root, verify=True))
    assert rows["bw/traces"]["state"] == "ok" and rows["bw/traces"]["verified"] == 2
    assert rows["abr/videos"]["state"] == "missing"
    assert data.dataset_path("bw", "traces", "test", root=root) == root / "bw/traces/test"

    empty = data.fetch("empty", root=root, base_url=server.url, progress=False)
    assert (empty.downloaded, empty.skipped, empty.post_fetch) == (0, 0, ["empty"])
    assert installed["empty"].fetched == [root]


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
    assert [r["group"] for r in rows] == [g.name for g in data.groups()]
    assert all(r["state"] == "ok" for r in rows), [r for r in rows if r["state"] != "ok"]
    verified = data.status(root, verify=True)
    assert all(r["verified"] == r["expected"] for r in verified)
