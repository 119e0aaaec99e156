"""The plug-in example examples/netllm-bwpred: a fourth task added without touching netllm.

The example is installed as a user would (pip, into a temporary target folder) and
driven through the public CLI in subprocesses, where the ``netllm.tasks`` entry point
of the installed package is what makes ``netllm eval|adapt bwpred`` exist. All traces
are generated here, so no real data is needed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.abr.traces import synthetic_traces

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "netllm-bwpred"
POLICIES = ("last-value", "harmonic-mean")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed with pip into a target folder (no network, no dependencies)."""
    root = tmp_path_factory.mktemp("bwpred-install")
    # build from a copy, so the build's artefacts (build/, *.egg-info) never land in the repository
    source = root / "netllm-bwpred"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "runs", "__pycache__"))
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
                        str(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "netllm_bwpred" / "task.py").is_file()
    eps = list(target.glob("netllm_bwpred-*.dist-info/entry_points.txt"))
    assert eps and "bwpred = netllm_bwpred:TASK" in eps[0].read_text()
    return target


def write_traces(folder: Path, n: int, seed: int, duration_s: float) -> Path:
    folder.mkdir(parents=True)
    for t in synthetic_traces(n, seed=seed, duration_s=duration_s):
        lines = [f"{a:.3f} {b:.6f}" for a, b in zip(t.time_s, t.bandwidth_mbps)]
        (folder / t.name).write_text("\n".join(lines) + "\n")
    return folder


def netllm(site: Path, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
                                            **(env or {})})


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def check_results(results: dict, names: tuple[str, ...]) -> None:
    assert set(results) == set(names)
    for name in names:
        entry = results[name]
        assert entry["metric"] == "mae_mbps"
        assert math.isfinite(entry["mean"]) and entry["mean"] >= 0
        steps = [entry[f"mae_step{k}_mbps"] for k in range(1, 6)]  # per-step MAE, 1..5 s ahead
        assert all(math.isfinite(v) and v >= 0 for v in steps)
        assert entry["mean"] == pytest.approx(sum(steps) / 5)


def test_unit_pieces(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resampling to 1 s steps, windows and the two rule baselines, on hand-made numbers."""
    monkeypatch.syspath_prepend(str(site))
    from netllm.tasks.abr.traces import Trace
    from netllm_bwpred.baselines import HarmonicMean, LastValue
    from netllm_bwpred.data import resample, split_train_valid, windows

    # bandwidth_mbps[i] holds over (time_s[i-1], time_s[i]]: a 1 s step is a time-weighted mean
    trace = Trace("t", np.array([0.0, 1.0, 2.0, 4.0, 4.5, 6.0]), np.array([9.0, 1, 2, 3, 4, 5]))
    np.testing.assert_allclose(resample(trace), [1, 2, 3, 3, 4.5, 5])
    long = Trace("long", np.arange(40, dtype=float), np.arange(40, dtype=float))
    w = windows([long], stride=5)
    assert w.history.shape == (5, 10) and w.future.shape == (5, 5)  # starts 0, 5, ..., 20 of 39 s
    np.testing.assert_allclose(w.history[1], np.arange(6, 16))
    np.testing.assert_allclose(w.future[1], np.arange(16, 21))
    history = np.array([[1.0] * 5 + [1, 2, 4, 4, 4], [2.0] * 9 + [0.0]])
    np.testing.assert_allclose(LastValue().predict(history), [[4.0] * 5, [0.0] * 5])
    np.testing.assert_allclose(HarmonicMean().predict(history)[0], [5 / (1 + 0.5 + 0.75)] * 5)
    assert (HarmonicMean().predict(history)[1] == 0).all()  # a zero second: the harmonic mean is 0
    named = [Trace(f"t{i:02d}", long.time_s, long.bandwidth_mbps) for i in range(14)]
    train, valid = split_train_valid(named, 7)
    assert [t.name for t in valid] == ["t06", "t13"] and len(train) == 12


def test_cli_eval_adapt_eval(site: Path, tiny_llama: str, tmp_path: Path) -> None:
    train = write_traces(tmp_path / "train", 14, seed=1, duration_s=60)
    test = write_traces(tmp_path / "test", 3, seed=2, duration_s=50)

    # the recipe's options, each with its default, are the command's options
    r = netllm(site, tmp_path, "adapt", "bwpred", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for option in ("--llm", "--layers", "--rank", "--steps", "--lr", "--eval-every", "--tokens", "--train-traces",
                   "--valid-every", "--stride", "--valid-stride", "--model", "--lstm-hidden"):
        assert option in r.stdout, option
    for default in ("fcc-train", "smollm2", "netllm", "step", "1000"):
        assert default in r.stdout, default

    # the rule baselines on generated traces
    r = netllm(site, tmp_path, "eval", "bwpred", *[a for p in POLICIES for a in ("--policy", p)],
               "--traces", str(test), "--out", str(tmp_path / "eval-rules"))
    assert r.returncode == 0, r.stderr
    rules = results_of(tmp_path / "eval-rules")
    check_results(rules, POLICIES)
    config = json.loads((tmp_path / "eval-rules" / "config.json").read_text())["config"]
    assert config["traces"] == str(test) and config["stride"] == 3  # the checked options, before the run

    # NetLLM: the tiny random Llama, a tiny budget, validation on held-out generated traces
    run = tmp_path / "run-netllm"
    r = netllm(site, tmp_path, "adapt", "bwpred", "--llm", tiny_llama, "--layers", "2", "--rank", "4",
               "--steps", "4", "--batch-size", "8", "--warmup-steps", "1", "--eval-every", "2",
               "--train-traces", str(train), "--out", str(run), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["task"] == "bwpred" and adapter["norm"]["history_s"] == 10 and adapter["norm"]["horizon_s"] == 5
    assert adapter["norm"]["transform"] == "log1p(Mbps)" and adapter["extra"]["best"]["step"] in (2, 4)
    assert adapter["extra"]["valid_traces"] == ["synthetic_1_0006", "synthetic_1_0013"]
    assert "eval_mae_mbps" in (run / "train" / "metrics.csv").read_text()

    # the LSTM baseline, trained by the same command
    lstm = tmp_path / "run-lstm"
    r = netllm(site, tmp_path, "adapt", "bwpred", "--model", "lstm", "--steps", "20", "--eval-every", "10",
               "--batch-size", "16", "--train-traces", str(train), "--out", str(lstm))
    assert r.returncode == 0, r.stderr
    assert json.loads((lstm / "lstm_config.json").read_text())["model"] == "lstm"

    # both run folders become policies, beside a baseline; same windows, same numbers for it
    r = netllm(site, tmp_path, "eval", "bwpred", "--policy", str(run), "--policy", str(lstm),
               "--policy", "last-value", "--traces", str(test), "--out", str(tmp_path / "eval-runs"),
               "--device", "cpu")
    assert r.returncode == 0, r.stderr
    runs = results_of(tmp_path / "eval-runs")
    check_results(runs, (run.name, lstm.name, "last-value"))
    assert runs["last-value"]["mean"] == pytest.approx(rules["last-value"]["mean"])
    # the head starts at zero (= last-value); 4 small steps keep it near there
    assert runs[run.name]["mean"] == pytest.approx(rules["last-value"]["mean"], rel=0.5)


def test_cli_errors(site: Path, tmp_path: Path) -> None:
    """Missing traces say how to get them; a bad policy or option is one line, nothing written."""
    empty = tmp_path / "data"
    empty.mkdir()
    r = netllm(site, tmp_path, "eval", "bwpred", "--policy", "last-value", "--out", str(tmp_path / "e"),
               env={"NETLLM_DATA": str(empty)})
    assert r.returncode == 2 and "netllm data fetch abr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e").exists()
    r = netllm(site, tmp_path, "eval", "bwpred", "--policy", "oracle", "--traces", str(tmp_path))
    assert r.returncode == 2 and "not a baseline of bwpred (last-value, harmonic-mean)" in r.stderr
    r = netllm(site, tmp_path, "adapt", "bwpred", "--tokens", "pixels", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--tokens" in r.stderr and not (tmp_path / "a").exists()
