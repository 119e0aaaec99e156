"""Parallel rollouts and evaluation on Ray (``netllm.parallel``): two local workers give
exactly the results of one process, in the same order; bad options are one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from netllm import parallel
from netllm.utils import NetLLMError

pytest.importorskip("ray")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def _rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_workers():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RAY_worker_niceness", "TOKENIZERS_PARALLELISM")}
    with parallel.workers(2) as pool:
        pool.environ_before = before
        yield pool


def test_workers_get_one_thread_and_the_driver_keeps_its_environment(two_workers):
    seen = parallel.map(_environ, [0, 1])
    assert all(e["OMP_NUM_THREADS"] == os.environ.get("NETLLM_WORKER_THREADS", "1") for e in seen)
    assert all(e["RAY_worker_niceness"] is None or e["RAY_worker_niceness"] == "0" for e in seen)
    after = {k: os.environ.get(k) for k in two_workers.environ_before}
    assert after == two_workers.environ_before  # ray.init's settings did not leak into the command


def _environ(_: None, unit: int) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RAY_worker_niceness")}


def test_split_covers_every_unit_once(monkeypatch):
    assert parallel.split(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert parallel.split(2, 5) == [range(0, 1), range(1, 2)]
    monkeypatch.setattr(parallel, "_ACTIVE", None)  # whatever a module fixture has open
    assert parallel.split(7) == [range(0, 7)]  # no workers open: one shard
    assert parallel.num_workers() == 1 and parallel.active() is None


def test_map_keeps_the_order_and_builds_the_shared_value_once_per_worker(two_workers):
    assert parallel.num_workers() == 2 and len(parallel.split(10)) == 2
    out = parallel.map(_tagged, list(range(8)), parallel.Shared(_new_token), 100)
    assert [v for v, _, _ in out] == [100 + u for u in range(8)]  # in the order of the units
    pids = {pid for _, pid, _ in out}
    assert len(pids) == 2 and os.getpid() not in pids  # ran on the two workers
    tokens = {pid: {t for _, p, t in out if p == pid} for pid in pids}
    assert all(len(t) == 1 for t in tokens.values())  # built once per worker, then reused


def _new_token() -> float:
    return float(np.random.default_rng().random())


def _tagged(token: float, unit: int, offset: int) -> tuple[int, int, float]:
    return unit + offset, os.getpid(), token


def test_a_worker_error_is_the_same_one_line_error(two_workers):
    with pytest.raises(NetLLMError, match="unit 3 is bad"):
        parallel.map(_fails_on_three, [1, 2, 3, 4])


def _fails_on_three(_: None, unit: int) -> int:
    if unit == 3:
        raise NetLLMError("unit 3 is bad")
    return unit


def test_abr_pool_and_evaluation_on_two_workers_equal_one_process(real_data, tiny_llama, tmp_path, two_workers):
    from netllm.recipe import load_policy
    from netllm.tasks.abr.task import TASK, ABREvalOptions, ABRRecipe, adapt, collect_pool, evaluate, policy_by_name
    from netllm.tasks.abr.traces import load_traces, load_video

    traces, video = load_traces("fcc-test")[:12], load_video("video1")
    assert parallel.active() is two_workers
    pooled = collect_pool(["bba", "mpc"], traces, video, seeds=[1], keep="best")
    global_active = parallel._ACTIVE
    parallel._ACTIVE = None  # the same calls in this process
    try:
        alone = collect_pool(["bba", "mpc"], traces, video, seeds=[1], keep="best")
        recipe = ABRRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=2, warmup_steps=0,
                           eval_every=0)
        adapter = adapt(alone, tmp_path / "run", recipe, device="cpu", progress=False)
        netllm = policy_by_name(str(adapter), device="cpu")
        netllm_bf16 = load_policy(TASK, str(adapter), ABREvalOptions(), "cpu", dtype="bf16")
        serial = {name: evaluate(p, traces, video, [1, 2]) for name, p in
                  {"mpc": policy_by_name("mpc"), "netllm": netllm, "netllm-bf16": netllm_bf16}.items()}
    finally:
        parallel._ACTIVE = global_active
    assert pooled.meta == alone.meta and len(pooled) == len(alone)
    np.testing.assert_array_equal(pooled.actions, alone.actions)
    np.testing.assert_array_equal(pooled.rewards, alone.rewards)
    for key in alone.states:
        np.testing.assert_array_equal(pooled.states[key], alone.states[key])
    # the adapter is reloaded in each worker from its folder; the episodes are the same
    # (a bf16 policy is reloaded in bf16 there too: its source carries --dtype; its episodes are not
    # compared, since bf16 products can round differently with the batch's size)
    assert netllm_bf16._netllm_source.load().model.backbone.dtype == torch.bfloat16
    spread = {"mpc": evaluate(policy_by_name("mpc"), traces, video, [1, 2]),
              "netllm": evaluate(netllm, traces, video, [1, 2])}
    assert serial["netllm-bf16"].rows and len(serial["netllm-bf16"].rows) == len(serial["netllm"].rows)
    for name in spread:
        assert spread[name].per_seed == serial[name].per_seed
        assert spread[name].rows == serial[name].rows


def test_cjs_evaluation_and_pool_on_two_workers_equal_one_process(real_data, two_workers):
    from netllm.tasks.cjs.pool import collect_pool
    from netllm.tasks.cjs.sim import CJSConfig
    from netllm.tasks.cjs.task import evaluate, policy_by_name

    config = CJSConfig(num_jobs=5)
    decima = policy_by_name("decima")
    spread = evaluate(decima, [1, 2, 3], config)
    pool = collect_pool(["fair", "decima"], [101, 102, 103], config, keep="best", draws=2, progress=False)
    global_active = parallel._ACTIVE
    parallel._ACTIVE = None
    try:
        alone = evaluate(decima, [1, 2, 3], config)
        alone_pool = collect_pool(["fair", "decima"], [101, 102, 103], config, keep="best", draws=2, progress=False)
    finally:
        parallel._ACTIVE = global_active
    assert spread.per_seed == alone.per_seed and list(spread.per_seed) == [1, 2, 3]
    assert spread.rows == alone.rows
    assert pool.meta["episodes"] == alone_pool.meta["episodes"]
    np.testing.assert_array_equal(pool.actions, alone_pool.actions)
    for key in alone_pool.states:
        np.testing.assert_array_equal(pool.states[key], alone_pool.states[key])


def _finetune_alone_and_spread(make_hooks, offline, task, seeds_of, tmp_path, two_workers):
    """One PPO iteration in this process and one with rollouts + validation on the two
    workers: the same episodes (returns, validation scores exactly) and the same weights
    (up to the last bits of features computed in batches of another size)."""
    from safetensors.torch import load_file

    from netllm.finetune import FinetuneOptions, run_finetune
    from netllm.model import NetLLM

    def run(out):
        options = FinetuneOptions(adapter=str(offline), iterations=1, envs=4, batch_size=4, lr=1e-3, epochs=1)
        model = NetLLM.from_adapter(offline, task=task)
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():  # away from the adapter's weights: the workers act only if the weights travel
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=noise))
        return run_finetune(model,
                            NetLLM.from_adapter(offline, task=task, merge=True), make_hooks(), options, out,
                            seeds_of=seeds_of, extra={"target_return": 30.0}, progress=False)

    spread = run(tmp_path / "spread")
    global_active = parallel._ACTIVE
    parallel._ACTIVE = None
    try:
        alone = run(tmp_path / "alone")
    finally:
        parallel._ACTIVE = global_active
    drop = ("wall_s", "rollout_s", "iteration_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in _rows(folder / "metrics.csv")]
            for folder in (spread, alone)]
    assert len(rows[0]) == len(rows[1]) == 2  # the offline adapter's validation, iteration 1
    for got, want in zip(*rows):
        assert got.keys() == want.keys()
        for key in want:  # the same episodes; the state features may differ in the last bit
            if want[key] in ("", "True", "False"):
                assert got[key] == want[key], key
            else:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), key
        assert got["decisions"] == want["decisions"] and got["return"] == want["return"]
        assert got[next(k for k in want if k.startswith("valid_"))] == want[next(k for k in want
                                                                                 if k.startswith("valid_"))]
    a, b = (load_file(str(f / "train" / "checkpoint" / "model.safetensors")) for f in (spread, alone))
    # Adam turns last-bit differences of a near-zero gradient into up to one step (lr 1e-3)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-3) for k in a)
    assert sum(int((a[k] - b[k]).abs().gt(1e-6).sum()) for k in a) < 0.01 * sum(a[k].numel() for k in a)


def test_abr_finetune_rollouts_on_two_workers_equal_one_process(tiny_llama, tmp_path, two_workers):
    from netllm.model import NetLLM
    from netllm.tasks.abr.online import ABROnline
    from netllm.tasks.abr.task import model_config
    from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

    torch.manual_seed(0)
    model = NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4))
    offline = tmp_path / "offline"
    model.save_adapter(offline, extra={"target_return": 30.0})
    video = synthetic_video(seed=0, num_chunks=12)

    def hooks():
        return ABROnline(30.0, synthetic_traces(6, seed=3), [video], synthetic_traces(3, seed=9), [video], envs=3,
                         generated=2, high_mbps=30.0)

    _finetune_alone_and_spread(hooks, offline, "abr", lambda it: [it], tmp_path, two_workers)


def test_cjs_finetune_rollouts_on_two_workers_equal_one_process(tiny_llama, tmp_path, two_workers):
    from netllm.model import NetLLM
    from netllm.tasks.cjs.features import load_gnn
    from netllm.tasks.cjs.jobs import synthetic_templates
    from netllm.tasks.cjs.online import CJSOnline
    from netllm.tasks.cjs.policy import model_config
    from netllm.tasks.cjs.sim import CJSConfig

    torch.manual_seed(0)
    model = NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4, gnn="random"))
    offline = tmp_path / "offline"
    model.save_adapter(offline, extra={"target_return": -0.5, "recipe": {"decode": "sample"}})
    train = CJSConfig(num_executors=10, num_jobs=4, arrival_rate=4e-4)
    templates = synthetic_templates(6, seed=3)

    def hooks():
        return CJSOnline(load_gnn("random"), -0.5, train, train, [1001, 1002, 1003], templates=templates)

    _finetune_alone_and_spread(hooks, offline, "cjs", lambda it: [500, 501, 502, 503], tmp_path, two_workers)


def test_cli_eval_with_workers_writes_what_one_process_writes(real_data, tmp_path):
    env = {"NETLLM_DATA": str(real_data)}
    one = _cli("eval", "cjs", "--policy", "fifo", "--policy", "decima", "--jobs", "5", "--seeds", "1-3",
               "--out", str(tmp_path / "one"), env=env)
    two = _cli("eval", "cjs", "--policy", "fifo", "--policy", "decima", "--jobs", "5", "--seeds", "1-3",
               "--workers", "2", "--out", str(tmp_path / "two"), env=env)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    drop = ("wall_s",)
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in _rows(p / "rows.csv")]
             for p in (tmp_path / "one", tmp_path / "two")]
    assert strip[0] == strip[1] and len(strip[0]) == 2 * 3 * 5


def test_bad_worker_options_are_one_line_and_write_nothing(real_data, tmp_path):
    env = {"NETLLM_DATA": str(real_data)}
    zero = _cli("eval", "abr", "--policy", "bba", "--workers", "0", "--out", str(tmp_path / "a"), env=env)
    assert zero.returncode == 2 and "--workers: must be >= 1" in zero.stderr and "Traceback" not in zero.stderr
    nobody = _cli("collect", "cjs", "--policy", "fifo", "--ray-address", "127.0.0.1:9", "--out",
                  str(tmp_path / "b"), env=env)
    assert nobody.returncode == 2 and "--ray-address 127.0.0.1:9: no Ray cluster reachable" in nobody.stderr
    bad = _cli("eval", "cjs", "--policy", "fifo", "--ray-address", "nowhere", "--out", str(tmp_path / "c"), env=env)
    assert bad.returncode == 2 and "--ray-address: expected HOST:PORT" in bad.stderr
    vp = _cli("eval", "vp", "--policy", "no-motion", "--workers", "2", "--out", str(tmp_path / "d"), env=env)
    assert vp.returncode == 2 and "--workers" in vp.stderr  # VP evaluates in one batched process
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_without_ray_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(NetLLMError, match=r"pip install 'netllm\[ray\]'"):
        parallel.Workers(2)
