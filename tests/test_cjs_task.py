"""`netllm eval cjs` end to end on the real TPC-H jobs, and its option errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from netllm.registry import get_task
from netllm.tasks.cjs.task import (CJSAdaptOptions, CJSBenchOptions, CJSCollectOptions, CJSEvalOptions,
                                   policy_by_name)
from netllm.utils import NetLLMError


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_task_is_registered_with_its_heads():
    task = get_task("cjs")
    assert task.metric == "jct_s" and not task.higher_is_better
    assert set(task.heads()) == {"stage", "executors"}
    assert set(task.baselines()) == {"fifo", "fair", "decima"}


def test_bad_options_name_themselves(tmp_path):
    with pytest.raises(NetLLMError, match="--jobs"):
        CJSEvalOptions.build(jobs="many")
    with pytest.raises(NetLLMError, match="--executors"):
        CJSEvalOptions.build(executors=0)
    with pytest.raises(NetLLMError, match="--arrival-rate"):
        CJSEvalOptions.build(arrival_rate=0)
    with pytest.raises(NetLLMError, match="--decode"):
        CJSEvalOptions.build(decode="greedy")
    with pytest.raises(NetLLMError, match="--policy lifo: not a baseline of cjs"):
        policy_by_name("lifo")
    with pytest.raises(NetLLMError, match="--schedule"):
        CJSAdaptOptions.build(pool=[str(tmp_path)], schedule="step")
    with pytest.raises(NetLLMError, match="--pool"):
        CJSAdaptOptions.build(pool=[str(tmp_path / "no-pool.npz")])


def test_recipe_is_the_readme_recipe():
    """Plain `netllm adapt cjs` trains the README's recipe (context 20, not 10)."""
    r = CJSAdaptOptions(pool=["x"])
    assert (r.layers, r.context, r.steps, r.schedule, r.eval_every, r.eval_jobs, r.decode) == \
        (4, 20, 3000, "cosine", 500, 100, "sample")


@pytest.mark.integration
def test_cli_eval_writes_results_rows_and_cdf(real_data, tmp_path):
    out = tmp_path / "eval"
    done = _cli("eval", "cjs", "--policy", "fifo", "--policy", "fair", "--policy", "decima", "--jobs", "8",
                "--seeds", "1,2", "--out", str(out), env={"NETLLM_DATA": str(real_data)})
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"fifo", "fair", "decima"}
    for r in results.values():
        assert r["metric"] == "jct_s" and r["seeds"] == [1, 2] and r["mean"] > 0
    with open(out / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 8  # policies x seeds x jobs
    assert all(float(r["jct_s"]) > 0 for r in rows)
    assert (out / "cdf.png").is_file()
    bad = _cli("eval", "cjs", "--policy", "fifo", "--jobs", "-3", "--out", str(tmp_path / "bad"),
               env={"NETLLM_DATA": str(real_data)})
    assert bad.returncode == 2 and "--jobs" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_checks_its_pool_and_schedule_options_before_writing(tmp_path):
    for kwargs, option in (({"keep": "top"}, "--keep"), ({"draws": "many"}, "--draws"), ({"draws": 0}, "--draws"),
                           ({"schedule": "step"}, "--schedule"), ({"decode": "greedy"}, "--decode"),
                           ({"segment": "long"}, "--segment"), ({"keep": "best", "segment": -5}, "--segment"),
                           ({"segment": 600}, "--segment: .*needs --keep best"),
                           ({"settings": "default,jobs4OO"}, "--settings: unknown 'jobs4OO'"),
                           ({"policies": "fifo,lifo"}, "--policies"), ({"steps": "x"}, "--steps"),
                           ({"train_seeds": ""}, "--train-seeds"), ({"train_seeds": "0-x"}, "--train-seeds"),
                           ({"seed": 3}, "--seed: .*--train-seeds"),
                           # seeds that would leak: the pool or the validation on a test job sequence
                           ({"pool_seeds": "5-20"}, "--pool-seeds: job sequences \\[5, 6"),
                           ({"eval_seed": 7}, "--eval-seed: 7 is also a test"),
                           ({"eval_seed": 120}, "--eval-seed: 120 is also a pool")):
        with pytest.raises(NetLLMError, match=option):
            CJSBenchOptions.build(**kwargs)
    for kwargs, option in (({"draws": "0"}, "--draws"), ({"keep": "best", "draws": 2, "segment": "nan"}, "--segment")):
        with pytest.raises(NetLLMError, match=option):
            CJSCollectOptions.build(**kwargs)
    out = tmp_path / "bench"
    bad = _cli("bench", "cjs", "--settings", "default,jobs4OO", "--out", str(out))
    assert bad.returncode == 2 and "--settings" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists()


@pytest.mark.integration
def test_bench_over_two_training_seeds(tiny_llama, real_data, tmp_path, monkeypatch):
    """`bench cjs --train-seeds 0-1` on a tiny setting: every run evaluated on its own
    (runs/), each variant over its training seeds, paired against the best baseline."""
    from netllm.tasks.cjs import task as cjs_task

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    monkeypatch.setitem(cjs_task.SETTINGS, "default", {"jobs": 4})
    options = CJSBenchOptions.build(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=2,
                                    warmup_steps=0, eval_every=0, pool_seeds="101", pool_jobs=4,
                                    policies="fifo,fair", seeds="1,2", controls="none", settings="default",
                                    train_seeds="0-1")
    summary = cjs_task.TASK.bench(options, tmp_path / "bench", device="cpu")
    label = "netllm-" + os.path.basename(tiny_llama)
    table = summary["default"]
    assert table[label]["seeds"] == [0, 1] and set(table[label]["per_train_seed"]) == {"0", "1"}
    best = table["best_baseline"]
    assert best == min(("fifo", "fair"), key=lambda b: table[b]["mean"])
    assert table["comparisons"][f"{label} - {best}"]["n"] == 2
    runs = json.loads((tmp_path / "bench" / "default" / "runs" / "results.json").read_text())
    assert {f"{label}-seed0", f"{label}-seed1", "fifo", "fair"} == set(runs)
