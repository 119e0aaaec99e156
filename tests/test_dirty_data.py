"""Dirty real data is reported, not fatal: the VP and ABR loaders skip a bad file with one
warning naming it, list it in ``.skipped``, raise with ``strict=True``, and still fail when
every file is bad."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.abr.traces import TraceSet, load_traces as load_abr_traces, upstream_start_indices
from netllm.tasks.vp.dataset import SPLITS, WindowSpec, load_samples, load_traces as load_vp_traces, trace_path
from netllm.utils import BadDataFile, NetLLMError, SkippedFile

LOGGER = "netllm.data"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------- VP

VP_ROWS = 200  # > trim_head + trim_tail = 90 with the default windows


def vp_rows(n: int = VP_ROWS) -> list[str]:
    return [f"{0.2 * i:.3f},{i % 7:.1f},{-(i % 5):.1f},{(i * 3) % 360 - 180:.1f}" for i in range(n)]


def write_vp(root: Path, video: int, user: int, rows: list[str], dataset: str = "Wu2017") -> Path:
    path = root / "vp" / "viewports" / dataset / f"video{video}" / "5Hz" / f"simple_5Hz_user{user}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def backwards(rows: list[str], at: int = 50) -> list[str]:
    rows = list(rows)
    cells = rows[at].split(",")
    rows[at] = ",".join([f"{float(cells[0]) - 0.5:.3f}", *cells[1:]])  # one step back in time
    return rows


def with_row(rows: list[str], at: int, row: str) -> list[str]:
    rows = list(rows)
    rows[at] = row
    return rows


# The Wu2017 test split: videos (3, 5), users (16, 7, 46, 5, ...); four files are made bad.
VP_BAD = {
    (3, 16): (backwards(vp_rows()), "line 51: timestamp does not increase"),
    (3, 7): (vp_rows(60), "too short: 60 samples"),
    (5, 46): (with_row(vp_rows(), 10, "2.0,1.0,abc,3.0"), "line 11: non-numeric value"),
    (5, 5): (with_row(vp_rows(), 20, "4.0,nan,1.0,3.0"), "line 21: NaN or infinite value"),
}


@pytest.fixture
def vp_root(tmp_path: Path) -> Path:
    videos, users = SPLITS["Wu2017"]["test"]
    for v in videos:
        for u in users:
            rows = VP_BAD[(v, u)][0] if (v, u) in VP_BAD else vp_rows()
            write_vp(tmp_path, v, u, rows)
    return tmp_path


def test_vp_bad_files_are_skipped_with_one_warning_each(vp_root, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    samples = load_samples("Wu2017", "test", root=vp_root)
    videos, users = SPLITS["Wu2017"]["test"]
    good = [(v, u) for v in videos for u in users if (v, u) not in VP_BAD]

    # skipped list: every bad file once, with its reason
    assert sorted(s.path for s in samples.skipped) == sorted(
        str(trace_path("Wu2017", v, u, vp_root)) for v, u in VP_BAD)
    for s in samples.skipped:
        assert isinstance(s, SkippedFile)
        key = next(k for k in VP_BAD if s.path == str(trace_path("Wu2017", *k, vp_root)))
        assert s.reason.startswith(VP_BAD[key][1]), s
    # one warning line per bad file, naming the file and the reason
    logged = warnings_of(caplog)
    assert len(logged) == len(VP_BAD)
    for s in samples.skipped:
        assert sum(s.path in line and s.reason in line for line in logged) == 1
    assert all("\n" not in line for line in logged)

    # the rest loads, in order, as it would without the bad files
    assert samples.num_traces == len(good)
    pairs = list(dict.fromkeys(zip(samples.video.tolist(), samples.user.tolist())))
    assert pairs == good
    assert len(samples) == len(good) * len(range(30, VP_ROWS - 60, 15))
    assert samples.subset(slice(0, 3)).skipped == samples.skipped


def test_vp_clean_files_give_the_same_samples_with_or_without_dirty_neighbours(vp_root, tmp_path):
    clean = tmp_path / "clean"
    write_vp(clean, 3, 2, vp_rows())
    write_vp(clean, 5, 2, vp_rows())
    alone = load_vp_traces("Wu2017", [3, 5], [2], root=clean)
    mixed_skipped: list[SkippedFile] = []
    write_vp(vp_root, 3, 2, vp_rows())
    write_vp(vp_root, 5, 2, vp_rows())
    mixed = load_vp_traces("Wu2017", [3, 5], [2, 16], root=vp_root, skipped=mixed_skipped)
    assert list(mixed) == [(3, 2), (5, 2), (5, 16)]  # (3, 16) is the bad one
    assert all(np.array_equal(alone[k], mixed[k]) for k in alone)
    assert mixed_skipped == [SkippedFile(str(trace_path("Wu2017", 3, 16, vp_root)),
                                         "line 51: timestamp does not increase (9.8 then 9.5)")]


def test_vp_strict_raises_naming_the_file_and_reason(vp_root, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(BadDataFile) as err:
        load_samples("Wu2017", "test", root=vp_root, strict=True)
    # the first bad file in (video, user) order, on one line
    assert str(err.value) == (f"{trace_path('Wu2017', 3, 16, vp_root)}:51: "
                              f"timestamp does not increase (9.8 then 9.5)")
    assert warnings_of(caplog) == []
    for key, (rows, reason) in VP_BAD.items():  # each bad row kind, alone (short: the next test)
        if reason.startswith("too short"):
            continue
        write_vp(vp_root / "one", *key, rows)
        with pytest.raises(NetLLMError, match=reason.split(": ")[-1]) as err:
            load_vp_traces("Wu2017", [key[0]], [key[1]], root=vp_root / "one", strict=True)
        assert f"user{key[1]}.csv" in str(err.value) and "\n" not in str(err.value)


def test_vp_strict_raises_on_a_too_short_file(tmp_path):
    write_vp(tmp_path, 3, 16, vp_rows())
    write_vp(tmp_path, 3, 7, vp_rows(60))
    assert load_vp_traces("Wu2017", [3], [16, 7], root=tmp_path, strict=True)  # loading is fine
    for v in (3, 5):
        for u in SPLITS["Wu2017"]["test"][1]:
            if (v, u) not in ((3, 16), (3, 7)):
                write_vp(tmp_path, v, u, vp_rows())
    with pytest.raises(BadDataFile, match=r"simple_5Hz_user7\.csv: too short: 60 samples.*--hw/--fw"):
        load_samples("Wu2017", "test", root=tmp_path, strict=True)


def test_vp_every_file_bad_is_an_error(tmp_path, caplog):
    write_vp(tmp_path, 3, 16, backwards(vp_rows()))
    write_vp(tmp_path, 5, 16, with_row(vp_rows(), 3, "1,2,3"))
    with pytest.raises(NetLLMError, match=r"Wu2017 .*all 2 files were skipped; first: .*user16\.csv: line 51: "
                                          r"timestamp does not increase"):
        load_vp_traces("Wu2017", [3, 5], [16], root=tmp_path)
    # windows that fit no trace: every file skipped, the reason names --hw/--fw
    videos, users = SPLITS["Wu2017"]["test"]
    for v in videos:
        for u in users:
            write_vp(tmp_path, v, u, vp_rows())
    caplog.clear()
    with pytest.raises(NetLLMError, match=r"Wu2017/test .*all 18 files were skipped; .*too short.*--hw/--fw"):
        load_samples("Wu2017", "test", spec=WindowSpec(hw=100), root=tmp_path)
    assert warnings_of(caplog) == []  # an option error, not 18 warnings


# ----------------------------------------------------------------------------- ABR


def abr_text(n: int = 20) -> str:
    return "".join(f"{i} {1.0 + (i % 4) * 0.5}\n" for i in range(n))


ABR_BAD = {
    "b_backwards": ("0 1\n1 2\n2 3\n1.5 2\n4 1\n", "line 4: time does not increase"),
    "c_short": ("0 1.5\n", "a trace needs at least 2 samples, found 1"),
    "d_text": ("0 1\n1 fast\n2 3\n", "line 2: not a number"),
    "e_nan": ("0 1\n1 nan\n2 3\n", "line 2: bandwidth is not a finite number"),
}


@pytest.fixture
def abr_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "traces"
    folder.mkdir()
    (folder / "a_good").write_text(abr_text())
    for name, (text, _) in ABR_BAD.items():
        (folder / name).write_text(text)
    (folder / "f_good").write_text(abr_text(30))
    return folder


def test_abr_bad_files_are_skipped_with_one_warning_each(abr_folder, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    traces = load_abr_traces(abr_folder)
    assert isinstance(traces, TraceSet) and isinstance(traces, list)
    assert [t.name for t in traces] == ["a_good", "f_good"]
    assert [len(t) for t in traces] == [20, 30]
    assert traces[:1][0].name == "a_good" and traces[-1].name == "f_good"
    assert traces.skipped[1] == SkippedFile(str(abr_folder / "c_short"), ABR_BAD["c_short"][1])
    assert [s.path for s in traces.skipped] == [str(abr_folder / name) for name in ABR_BAD]
    for s, (_, reason) in zip(traces.skipped, ABR_BAD.values()):
        assert s.reason.startswith(reason), s
    logged = warnings_of(caplog)
    assert len(logged) == len(ABR_BAD)
    for s, line in zip(traces.skipped, logged):
        assert s.path in line and s.reason in line and "\n" not in line


def test_abr_clean_folder_loads_as_before(tmp_path, abr_folder):
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a_good").write_text(abr_text())
    (clean / "f_good").write_text(abr_text(30))
    plain, dirty = load_abr_traces(clean), load_abr_traces(abr_folder)
    assert plain.skipped == []
    assert [t.name for t in plain] == [t.name for t in dirty]
    assert all(np.array_equal(a.time_s, b.time_s) and np.array_equal(a.bandwidth_mbps, b.bandwidth_mbps)
               for a, b in zip(plain, dirty))


def test_abr_strict_raises_naming_the_file_and_reason(abr_folder, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(BadDataFile) as err:
        load_abr_traces(abr_folder, strict=True)
    assert str(err.value) == f"{abr_folder / 'b_backwards'}:4: time does not increase (2.0 then 1.5)"
    assert warnings_of(caplog) == []
    for name, (text, reason) in ABR_BAD.items():
        folder = abr_folder.parent / f"only_{name}"
        folder.mkdir()
        (folder / "good").write_text(abr_text())
        (folder / name).write_text(text)
        with pytest.raises(NetLLMError, match=name) as err:
            load_abr_traces(folder, strict=True)
        assert reason.split(": ")[-1] in str(err.value)
        assert [t.name for t in load_abr_traces(folder)] == ["good"]


def test_abr_every_file_bad_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, (text, _) in ABR_BAD.items():
        (folder / name).write_text(text)
    with pytest.raises(NetLLMError, match=rf"trace folder {folder}: all 4 files were skipped; "
                                          rf"first: .*b_backwards: line 4: time does not increase"):
        load_abr_traces(folder)


def test_abr_start_indices_follow_the_loaded_traces(abr_folder, monkeypatch):
    from netllm.tasks.abr import traces as traces_mod

    (abr_folder / "mahimahi_ptrs.pkl").write_bytes(b"")
    monkeypatch.setattr(traces_mod, "load_verified_pickle", lambda path: [11, 12, 13, 14, 15, 16])
    loaded = load_abr_traces(abr_folder)
    assert upstream_start_indices(abr_folder).tolist() == [11, 12, 13, 14, 15, 16]
    assert upstream_start_indices(abr_folder, traces=loaded).tolist() == [11, 16]


def test_cli_eval_records_skipped_files_and_strict_stops(abr_folder, real_data, tmp_path):
    """`netllm eval abr` on a dirty folder: one warning line per bad file, results.json
    lists them; --strict makes the first one an error (one line, exit 2, no results)."""
    import json
    import os
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "netllm.cli", "eval", "abr", "--policy", "bba",
                               "--traces", str(abr_folder), "--setting", "random", *args],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NETLLM_DATA": str(real_data)})

    out = tmp_path / "eval"
    done = cli("--out", str(out))
    assert done.returncode == 0, done.stderr
    entry = json.loads((out / "results.json").read_text())["bba"]
    assert entry["files_skipped"] == len(ABR_BAD)
    assert [s["path"] for s in entry["skipped_files"]] == [str(abr_folder / n) for n in ABR_BAD]
    strict = tmp_path / "strict"
    stopped = cli("--strict", "--out", str(strict))
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    err = [line for line in stopped.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "b_backwards" in err[0] and "time does not increase" in err[0], stopped.stderr
    assert not (strict / "results.json").exists()
