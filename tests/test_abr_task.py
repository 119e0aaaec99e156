"""ABR through NetLLM: state tokens, pools, adaptation and evaluation end to end
(tiny random Llama + generated traces, and the CLI on files a user would write)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netllm.rl import ExperiencePool
from netllm.tasks.abr.task import (STATE_TOKENS, ABRRecipe, NetLLMABRPolicy, adapt, collect_pool, collect_pools,
                                   evaluate, obs_states, policy_by_name)
from netllm.tasks.abr.traces import synthetic_traces, synthetic_video
from netllm.utils import NetLLMError


def write_trace_folder(folder: Path, traces) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in traces:
        lines = "\n".join(f"{a:.3f}\t{b:.4f}" for a, b in zip(t.time_s, t.bandwidth_mbps))
        (folder / t.name).write_text(lines + "\n")
    return folder


def write_video_folder(folder: Path, video) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for level in range(video.sizes_bytes.shape[0]):
        (folder / f"video_size_{level}").write_text("\n".join(str(int(v)) for v in video.sizes_bytes[level]) + "\n")
    return folder


def test_observation_splits_into_the_six_state_tokens():
    obs = np.arange(2 * 36, dtype=np.float32).reshape(2, 6, 6)
    states = obs_states(obs)
    assert tuple(states) == STATE_TOKENS
    assert states["last_bitrate"].shape == (2, 1) and states["last_bitrate"][0, 0] == obs[0, 0, -1]
    assert states["buffer"][1, 0] == obs[1, 1, -1]
    np.testing.assert_array_equal(states["throughput"], obs[:, 2])
    np.testing.assert_array_equal(states["next_sizes"], obs[:, 4, :6])
    assert states["chunks_left"][0, 0] == obs[0, 5, -1]


def test_pool_adapt_eval_end_to_end(tiny_llama, tmp_path):
    traces, video = synthetic_traces(6, seed=3), synthetic_video(seed=0)
    pool = collect_pool(["bba"], traces, video, seeds=[1])
    assert pool.num_episodes == 6 and pool.meta["task"] == "abr"
    assert set(pool.states) == set(STATE_TOKENS)
    steps = len(pool) // 6
    bba = evaluate(policy_by_name("bba"), traces, video, [1])
    np.testing.assert_allclose(pool.episode_returns().sum() / len(pool), bba.mean, rtol=1e-5)  # float32 pool
    path = pool.save(tmp_path / "pool")
    loaded = ExperiencePool.load(path, task="abr")
    assert len(loaded) == 6 * steps

    recipe = ABRRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=4, warmup_steps=1,
                         eval_every=2)
    adapter = adapt(loaded, tmp_path / "run", recipe, device="cpu", eval_traces=traces[:2], eval_video=video,
                    progress=False)
    assert adapter == tmp_path / "run"  # `eval --policy runs/<name>` takes the run folder itself
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task"] == "abr" and config["extra"]["target_return"] > 0
    metrics = (tmp_path / "run" / "train" / "metrics.csv").read_text()
    assert "eval_qoe" in metrics
    policy = policy_by_name(str(adapter), device="cpu")
    assert isinstance(policy, NetLLMABRPolicy)
    result = evaluate(policy, traces, video, [1, 2])
    assert set(result.per_seed) == {1, 2} and np.isfinite(result.mean)
    assert len(result.rows) == 12
    policy.use_cache = False  # the same decisions when the whole context is recomputed
    assert evaluate(policy, traces, video, [1, 2]).per_seed == pytest.approx(result.per_seed, abs=1e-9)


def test_policy_by_name_errors(tmp_path):
    with pytest.raises(NetLLMError, match="not an ABR adapter folder"):
        policy_by_name(str(tmp_path))
    with pytest.raises(NetLLMError):
        policy_by_name("no-such-baseline")


def netllm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=os.environ.copy())


def test_cli_eval_on_user_trace_folder(tmp_path):
    traces = write_trace_folder(tmp_path / "my-traces", synthetic_traces(5, seed=4))
    video = write_video_folder(tmp_path / "my-video", synthetic_video(seed=1))
    r = netllm("eval", "abr", "--policy", "bba", "--policy", "mpc", "--traces", str(traces), "--video", str(video),
               "--seeds", "1-2", "--out", str(tmp_path / "out"), "--dtype", "bf16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["config"]["dtype"] == "bf16"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"bba", "mpc"}
    for entry in results.values():
        assert entry["metric"] == "qoe" and entry["seeds"] == [1, 2]
        assert isinstance(entry["mean"], float) and isinstance(entry["std"], float)
    assert (tmp_path / "out" / "rows.csv").read_text().count("\n") == 1 + 2 * 2 * 5
    assert (tmp_path / "out" / "bar.png").stat().st_size > 1000
    assert (tmp_path / "out" / "cdf.png").stat().st_size > 1000


def test_cli_bad_inputs_are_one_line(tmp_path):
    bad = tmp_path / "bad-traces"
    bad.mkdir()
    (bad / "t1").write_text("0 1.0\n1 abc\n")
    r = netllm("eval", "abr", "--policy", "bba", "--traces", str(bad), cwd=tmp_path)
    assert r.returncode != 0 and "t1" in r.stderr and "Traceback" not in r.stderr
    r = netllm("eval", "abr", "--policy", "bba", "--nonsense", "1", cwd=tmp_path)
    assert r.returncode != 0 and "--nonsense" in r.stderr and "Traceback" not in r.stderr
    pool = ExperiencePool.from_episodes([{"states": {"x": np.zeros((3, 1))}, "actions": np.zeros(3),
                                          "rewards": np.zeros(3)}], meta={"task": "cjs"})
    path = pool.save(tmp_path / "cjs-pool")
    r = netllm("adapt", "abr", "--pool", str(path), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode != 0 and "cjs" in r.stderr and str(path) in r.stderr and "Traceback" not in r.stderr


def test_best_of_pool_keeps_the_best_policy_per_trace_and_seed():
    traces, video = synthetic_traces(6, seed=3), synthetic_video(seed=0)
    both = collect_pool(["bba", "mpc"], traces, video, seeds=[1, 2])
    best = collect_pool(["bba", "mpc"], traces, video, seeds=[1, 2], keep="best")
    assert both.num_episodes == 24 and best.num_episodes == 12
    returns = both.episode_returns().reshape(2, 12)  # (policy, seed x trace), in collection order
    np.testing.assert_allclose(best.episode_returns(), returns.max(axis=0), rtol=1e-6)
    assert sum(best.meta["kept"].values()) == 12 and best.meta["keep"] == "best"
    # the kept episode carries its own policy's actions: an MPC-kept episode is not BBA's
    s, e = best.episode_bounds
    assert (returns[1] > returns[0]).any() and (returns[0] > returns[1]).any()  # a real mix
    j = int(np.argmax(returns[1] > returns[0]))
    bs, be = both.episode_bounds
    np.testing.assert_array_equal(best.actions[s[j]:e[j]], both.actions[bs[12 + j]:be[12 + j]])
    with pytest.raises(NetLLMError, match="--keep"):
        collect_pool(["bba"], traces, video, seeds=[1], keep="top")


def test_pools_over_several_videos_concatenate_per_video_best_of():
    traces, videos = synthetic_traces(4, seed=3), [synthetic_video(seed=0), synthetic_video(seed=1, num_chunks=20)]
    pool = collect_pools(["bba", "mpc"], traces, videos, seeds=[1], keep="best")
    assert pool.num_episodes == 8 and pool.meta["video"] == "synthetic_0,synthetic_1"
    assert set(pool.meta["kept"]) == {"synthetic_0", "synthetic_1"}
    starts, ends = pool.episode_bounds
    assert list(ends - starts) == [47] * 4 + [19] * 4  # whole episodes per video (the reset chunk is not a decision)


@pytest.mark.parametrize("command, args, needle", [
    ("adapt", ["--batch-size", "x"], "--batch-size"),
    ("adapt", ["--lr", "x"], "--lr"),
    ("adapt", ["--lr", "0"], "--lr"),
    ("adapt", ["--steps", "0"], "--steps"),
    ("adapt", ["--layers", "0"], "--layers"),
    ("adapt", ["--rank", "-1"], "--rank"),
    ("adapt", ["--context", "0"], "--context"),
    ("adapt", ["--target-quantile", "2"], "--target-quantile"),
    ("adapt", ["--schedule", "cosin"], "--schedule"),
    ("adapt", ["--eval-every", "-5"], "--eval-every"),
    ("adapt", ["--valid-count", "-1"], "--valid-count"),
    ("adapt", ["--warmup-steps", "x"], "--warmup-steps"),
    ("adapt", ["--weight-decay", "-1"], "--weight-decay"),
    ("adapt", ["--epochs", "-1"], "--epochs"),
    ("adapt", ["--seed", "x"], "--seed"),
    ("adapt", ["--pool", "no/such/pool.npz"], "--pool"),
    ("adapt", [], "--pool"),
    ("adapt", ["--device", "cuda:7"], "--device"),
    ("eval", ["--policy", "bba", "--setting", "sometimes"], "--setting"),
    ("eval", ["--policy", "nosuch"], "--policy"),
    ("eval", ["--policy", "bba", "--seeds", "3-1"], "--seeds"),
    ("collect", ["--policy", "bba", "--keep", "top"], "--keep"),
    ("collect", ["--policy", "mcp"], "--policy"),
    ("bench", ["--baselines", "bba,mcp"], "--baselines"),
    ("bench", ["--behaviour", "genet,xyz"], "--behaviour"),
    ("bench", ["--controls", "random,scrach"], "--controls"),
    ("bench", ["--videos", "video3"], "--videos"),
    ("bench", ["--pool-seeds", "2-1"], "--pool-seeds"),
    ("bench", ["--train-seeds", "1,,x"], "--train-seeds"),
    ("bench", ["--seed", "4"], "--seed"),
    ("bench", ["--steps", "x"], "--steps"),
    ("bench", ["--finetune-iterations", "-1"], "--finetune-iterations"),
    ("bench", ["--finetune-envs", "0"], "--finetune-envs"),
])
def test_every_bad_option_is_one_line_before_any_work(tmp_path, command, args, needle):
    out = tmp_path / "run"
    pool = []
    if command == "adapt" and "--pool" not in args and args:
        ok = collect_pool(["bba"], synthetic_traces(2, seed=3), synthetic_video(seed=0), seeds=[1])
        pool = ["--pool", str(ok.save(tmp_path / "pool"))]
    r = netllm(command, "abr", *args, *pool, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_demo_runs_again_and_again_with_the_same_numbers(tiny_llama, tmp_path, monkeypatch, capsys):
    """`netllm demo` replaces its own run folder, so a second run works and prints the same
    numbers; a folder that is not a demo's is never deleted."""
    from netllm.tasks.abr import task as abr
    from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

    monkeypatch.setattr(abr, "_genet_available", lambda: False)
    data = abr.DemoData(synthetic_traces(4, seed=1), synthetic_traces(2, seed=3), synthetic_traces(3, seed=2),
                        [synthetic_video(seed=0)], "GENERATED (test)", real=False)
    recipe = abr.ABRRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=4, eval_every=2,
                           warmup_steps=1)
    out = tmp_path / "demo"
    first = abr.run_demo(device="cpu", out=out, recipe=recipe, data=data)
    second = abr.run_demo(device="cpu", out=out, recipe=recipe, data=data)
    assert set(first) == {"bba", "mpc", "netllm"}
    assert {n: m.mean for n, m in first.items()} == {n: m.mean for n, m in second.items()}
    assert (out / "results.json").is_file() and "best baseline" in capsys.readouterr().out
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(NetLLMError, match="not a demo run folder"):
        abr.run_demo(device="cpu", out=other, recipe=recipe, data=data)
    assert (other / "notes.txt").is_file()


def test_unseen_traces_are_reported_beside_the_whole_set(tmp_path):
    """`eval abr` reports QoE on the test traces that are no copy of a training trace
    (upstream's fcc-test repeats 42 fcc-train traces), from the same episodes."""
    from netllm.tasks.abr.task import ABREvalOptions, ABRTask
    from netllm.tasks.abr.traces import copies_of, load_traces

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    train_dir.mkdir()
    test_dir.mkdir()
    train, fresh = synthetic_traces(3, seed=1), synthetic_traces(2, seed=9)
    for folder, traces in ((train_dir, train), (test_dir, [train[0], train[2], *fresh])):
        for i, t in enumerate(traces):  # copies get other names: content, not the name, decides
            lines = [f"{float(a)!r} {float(b)!r}" for a, b in zip(t.time_s, t.bandwidth_mbps)]
            (folder / f"{folder.name}{i}").write_text("\n".join(lines) + "\n")
    test_set = load_traces(test_dir)
    assert copies_of(test_set, load_traces(train_dir)) == {"test0", "test1"}
    video = tmp_path / "video"
    video.mkdir()
    v = synthetic_video(seed=0)
    for level in range(6):
        (video / f"video_size_{level}").write_text("\n".join(str(int(x)) for x in v.sizes_bytes[level]) + "\n")
    options = ABREvalOptions.build(traces=str(test_dir), video=str(video), setting="random",
                                   unseen_by=str(train_dir))
    results = ABRTask().evaluate({"bba": policy_by_name("bba")}, [1, 2], options, tmp_path / "out")
    m = results["bba"]
    unseen_rows = [r["qoe"] for r in m.rows if r["trace"] in ("test2", "test3")]
    assert len(unseen_rows) == 4 and m.parts["unseen_traces"] == 2
    assert m.parts["qoe_unseen"] == pytest.approx(np.mean(unseen_rows))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["bba"]
    assert saved["qoe_unseen"] == pytest.approx(m.parts["qoe_unseen"])
    # a set whose every trace is a copy (fcc-holdout against fcc-train): no column of NaN
    copies_dir = tmp_path / "copies"
    copies_dir.mkdir()
    for i, name in enumerate(("test0", "test1")):
        (copies_dir / f"copy{i}").write_text((test_dir / name).read_text())
    options = ABREvalOptions.build(traces=str(copies_dir), video=str(video), setting="random",
                                   unseen_by=str(train_dir))
    results = ABRTask().evaluate({"bba": policy_by_name("bba")}, [1], options, tmp_path / "out2")
    assert "qoe_unseen" not in results["bba"].parts
    saved = json.loads((tmp_path / "out2" / "results.json").read_text())["bba"]
    assert "qoe_unseen" not in saved


@pytest.mark.integration
def test_bench_over_two_training_seeds_on_the_clean_split(tiny_llama, real_data, tmp_path, monkeypatch):
    """`bench abr --train-seeds 0-1`: the pool plays fcc-pool, the adapters are chosen on
    fcc-holdout, every variant is trained per training seed; the table is over training
    seeds with paired intervals against the best baseline and the control."""
    from netllm.tasks.abr.task import TASK, ABRBenchOptions

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    options = ABRBenchOptions.build(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=2,
                                    warmup_steps=0, eval_every=2, valid_count=3, behaviour="bba", keep="all",
                                    pool_seeds="1", pool_videos="video1", seeds="1", videos="video1",
                                    controls="random", baselines="bba,mpc", train_seeds="0-1")
    summary = TASK.bench(options, tmp_path / "bench", device="cpu")
    assert summary["pool"]["episodes"] == 159  # fcc-pool: no fcc-holdout and no fcc-test trace
    table = summary["video1"]
    label = "netllm-" + os.path.basename(tiny_llama)
    assert table[label]["seeds"] == [0, 1] and table[label]["paired_over"] == "training seeds"
    assert table["best_baseline"] == max(("bba", "mpc"), key=lambda b: table[b]["mean"])
    comps = table["comparisons"]
    assert set(comps) == {f"{label} - {table['best_baseline']}", f"{label} - {label}-random-init"}
    assert all(c["n"] == 2 and c["ci"] is not None for c in comps.values())
    assert table[label]["unseen_traces"] == 58.0
    for s in (0, 1):
        config = json.loads((tmp_path / "bench" / f"{label}-seed{s}" / "adapter_config.json").read_text())
        assert config["extra"]["recipe"]["seed"] == s and config["extra"]["recipe"]["valid_traces"] == "fcc-holdout"


@pytest.mark.integration
def test_bench_online_stage_fine_tunes_every_adapter_and_reuses_what_is_done(tiny_llama, real_data, tmp_path,
                                                                            monkeypatch):
    """`bench abr --finetune-iterations N`: every trained adapter (NetLLM and its control)
    is fine-tuned into <folder>-ppo with its own training seed; offline and fine-tuned
    adapters are tested on fcc-test and on the held-out 'variable' traces, with the
    fine-tuned NetLLM compared with its offline adapter, the best baseline and the
    fine-tuned control. Run again, nothing is trained or evaluated twice; other online
    options on the same folder are a one-line error."""
    from netllm.tasks.abr.task import TASK, ABRBenchOptions
    from netllm.tasks.abr.traces import load_traces

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    common = dict(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=2, warmup_steps=0,
                  eval_every=2, valid_count=3, behaviour="bba", keep="all", pool_seeds="1", pool_videos="video1",
                  seeds="1", videos="video1", controls="random", baselines="bba,mpc", train_seeds="0",
                  finetune_iterations=1, finetune_envs=2, finetune_generated=1)
    out = tmp_path / "bench"
    summary = TASK.bench(ABRBenchOptions.build(**common), out, device="cpu")
    label = "netllm-" + os.path.basename(tiny_llama)
    for name in (label, f"{label}-random-init"):
        ppo = json.loads((out / f"{name}-seed0-ppo" / "adapter_config.json").read_text())
        assert ppo["extra"]["finetuned_from"] == str(out / f"{name}-seed0")
        assert ppo["extra"]["finetune"]["iterations"] == 1 and ppo["extra"]["finetune"]["seed"] == 0
        assert ppo["extra"]["finetune"]["envs"] == 2 and ppo["extra"]["finetune"]["generated"] == 1
    assert any(k.startswith("finetune ") for k in summary["wall_s"])
    for key in ("video1", "variable/video1"):
        table = summary[key]
        assert {label, f"{label}-ppo", f"{label}-random-init-ppo", "bba", "mpc"} <= set(table)
        best = table["best_baseline"]
        assert {f"{label}-ppo - {label}", f"{label}-ppo - {best}", f"{label}-ppo - {label}-random-init-ppo",
                f"{label} - {best}", f"{label} - {label}-random-init"} <= set(table["comparisons"])
        # one training seed and one (deterministic) evaluation seed: the pairs are the traces
        traces = 100 if key.startswith("variable") else len(load_traces("fcc-test"))
        for c in table["comparisons"].values():
            assert c["paired_over"] == "traces, 1 training seed" and c["n"] == traces
            assert c["ci"] is not None and c["mean"] == pytest.approx(sum(c["per_key"].values()) / traces)
        assert (out / key.replace("/", "-") / "results.json").is_file()
    assert "qoe_unseen" in summary["video1"][f"{label}-ppo"] and "qoe_unseen" not in summary["variable/video1"]["mpc"]
    assert summary["variable/video1"]["mpc"]["mean"] != summary["video1"]["mpc"]["mean"]

    cached = sorted(p.name for p in (out / "eval-cache").iterdir())
    assert len(cached) == 2 * (4 + 2)  # 2 test sets x (4 adapters + 2 baselines)
    again = TASK.bench(ABRBenchOptions.build(**common), out, device="cpu")
    assert not any(k.startswith(("finetune ", "adapt ")) for k in again["wall_s"])  # reused
    assert sorted(p.name for p in (out / "eval-cache").iterdir()) == cached
    for key in ("video1", "variable/video1"):
        assert again[key][f"{label}-ppo"]["mean"] == summary[key][f"{label}-ppo"]["mean"]
        assert again[key]["comparisons"] == summary[key]["comparisons"]
    with pytest.raises(NetLLMError, match="holds another run"):
        TASK.bench(ABRBenchOptions.build(**{**common, "finetune_envs": 3}), out, device="cpu")
