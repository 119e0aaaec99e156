"""The NetLLM CJS scheduler: pools, a few adaptation steps, adapter round trip, KV cache
vs recompute, train/run-time token agreement, and bad pools (tiny random Llama +
synthetic jobs, random-weight GNN: no real data needed)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.rl import ExperiencePool, IncrementalPolicy, decision_hidden
from netllm.utils import torch_threads
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.features import CANDIDATE_DIM, GLOBAL_DIM, POOLED_DIM, load_gnn
from netllm.tasks.cjs.policy import (CJSRecipe, CJSWindowSampler, NetLLMCJSPolicy, adapt, cjs_loss,
                                     decode_temperature, model_config, run_netllm_episode)
from netllm.tasks.cjs.pool import collect_pool, load_pool, load_pools
from netllm.tasks.cjs.sim import CJSConfig, CJSEnv
from netllm.utils import NetLLMError

CONFIG = CJSConfig(num_executors=10, num_jobs=5, arrival_rate=4e-4)
TEMPLATES = synthetic_templates(6, seed=3)


def env() -> CJSEnv:
    return CJSEnv.from_config(CONFIG, templates=TEMPLATES)


def actions(policy, seed: int) -> list[tuple[int, int]]:
    """One episode step by step (the policy sees every reward); its actions."""
    e = env()
    obs, _ = e.reset(seed)
    policy.reset(seed)
    out = []
    while True:
        a = policy.act(obs)
        out.append(tuple(a))
        obs, reward, done, _, _ = e.step(a)
        policy.observe(reward)
        if done:
            return out


@pytest.fixture(scope="module")
def pool() -> ExperiencePool:
    return collect_pool(["fair"], [1, 2], CONFIG, gnn="random", templates=TEMPLATES, progress=False)


@pytest.fixture(scope="module")
def model(tiny_llama) -> NetLLM:
    torch.manual_seed(0)
    return NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4, gnn="random")).eval()


def test_pool_layout_and_round_trip(pool, tmp_path):
    assert pool.meta["task"] == "cjs" and pool.num_episodes == 2
    M = pool.meta["max_candidates"]
    st = pool.states
    assert st["global"].shape == (len(pool), GLOBAL_DIM) and st["pooled"].shape == (len(pool), POOLED_DIM)
    assert st["candidates"].shape == (len(pool), M, CANDIDATE_DIM)
    assert st["cand_mask"].any(1).all()  # every recorded step is a real decision
    stage, num_exec = pool.actions[:, 0], pool.actions[:, 1]
    assert (stage >= 0).all() and st["cand_mask"][np.arange(len(pool)), stage].all()
    assert (num_exec >= 1).all()
    assert (pool.rewards <= 0).all() and pool.episode_returns().max() < 0
    path = pool.save(tmp_path / "pool.npz")
    again = load_pool(path)
    assert np.array_equal(again.states["candidates"], st["candidates"])


def test_several_pools_train_as_one(pool, tmp_path):
    """``adapt cjs --pool A --pool B``: episodes in order, candidate sets padded to the widest."""
    wide = collect_pool(["fifo"], [3], CJSConfig(num_executors=10, num_jobs=8, arrival_rate=4e-4), gnn="random",
                        templates=TEMPLATES, progress=False)
    assert wide.meta["max_candidates"] > pool.meta["max_candidates"]  # so padding is exercised
    a, b = pool.save(tmp_path / "a.npz"), wide.save(tmp_path / "b.npz")
    both = load_pools([a, b])
    M = max(pool.meta["max_candidates"], wide.meta["max_candidates"])
    assert both.num_episodes == 3 and len(both) == len(pool) + len(wide) and both.meta["max_candidates"] == M
    assert both.meta["seeds"] == [1, 2, 3] and both.meta["policies"] == ["fair", "fifo"]
    for part, rows in ((pool, slice(0, len(pool))), (wide, slice(len(pool), None))):
        m = part.meta["max_candidates"]
        assert np.array_equal(both.states["candidates"][rows, :m], part.states["candidates"])
        assert not both.states["cand_mask"][rows, m:].any()  # padding is masked out
        assert np.array_equal(both.actions[rows], part.actions)
    assert np.allclose(both.episode_returns(), np.r_[pool.episode_returns(), wide.episode_returns()])
    other = collect_pool(["fifo"], [3], CJSConfig(num_executors=12, num_jobs=3, arrival_rate=4e-4), gnn="random",
                         templates=TEMPLATES, progress=False).save(tmp_path / "c.npz")
    with pytest.raises(NetLLMError, match=r"--pool: .*c.npz was collected with executors=12"):
        load_pools([a, other])
    with pytest.raises(NetLLMError, match="--pool: CJS adaptation needs an experience pool"):
        load_pools([])


def test_cli_adapt_takes_several_pools(tiny_llama, pool, tmp_path):
    import json
    import subprocess
    import sys

    a = pool.save(tmp_path / "a.npz")
    b = collect_pool(["fifo"], [3], CONFIG, gnn="random", templates=TEMPLATES, progress=False).save(tmp_path / "b.npz")
    out = tmp_path / "adapter"
    done = subprocess.run([sys.executable, "-m", "netllm.cli", "adapt", "cjs", "--pool", str(a), "--pool", str(b),
                           "--out", str(out), "--llm", tiny_llama, "--layers", "1", "--rank", "2", "--context", "4",
                           "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trained_on = json.loads((out / "adapter_config.json").read_text())["extra"]["pool"]
    assert trained_on["pools"] == [str(a), str(b)] and trained_on["seeds"] == [1, 2, 3]


def test_training_steps_lower_the_loss(model, pool):
    sampler = CJSWindowSampler(pool, model.config.rl, batch_size=4, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = sampler.batch(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    losses = []
    with torch_threads(1):  # tiny tensors: one thread is fastest on a shared machine
        for _ in range(6):
            loss, metrics = cjs_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    model.load_state_dict(state)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {"stage_accuracy", "exec_accuracy", "tokens"} <= set(metrics)


def test_adapt_save_load_gives_identical_actions(tiny_llama, pool, tmp_path):
    recipe = CJSRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=3, warmup_steps=1,
                       eval_every=0, decode="argmax")
    folder = adapt(pool, tmp_path / "adapter", recipe, device="cpu", progress=False)
    gnn = load_gnn("random")
    loaded = NetLLMCJSPolicy.from_adapter(folder, device="cpu", gnn=gnn)
    trained = NetLLM.from_adapter(folder, task="cjs", device="cpu")
    other = NetLLMCJSPolicy(trained, loaded.target, gnn)
    runs = [actions(policy, 4) for policy in (loaded, other)]
    assert runs[0] == runs[1] and len(runs[0]) > 10
    result = run_netllm_episode(env(), loaded, seed=4)
    assert result.avg_jct_s > 0 and result.num_decisions == len(runs[0])


def test_sampled_decoding_is_reproducible_and_differs_from_argmax(tiny_llama, pool, tmp_path):
    from netllm.tasks.cjs.task import CJSEvalOptions, policy_by_name

    def make_policy(name, config, device="cpu", decode=None):
        return policy_by_name(name, CJSEvalOptions(jobs=config.num_jobs, executors=config.num_executors,
                                                   arrival_rate=config.arrival_rate, decode=decode), device)

    recipe = CJSRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=3, warmup_steps=1,
                       eval_every=0, decode="sample")
    folder = adapt(pool, tmp_path / "adapter", recipe, device="cpu", progress=False)
    sampled = make_policy(str(folder), CONFIG, device="cpu")  # the recipe's decoding
    argmax = make_policy(str(folder), CONFIG, device="cpu", decode="argmax")
    assert not argmax.sample and sampled.sample and sampled.name == "adapter-sampled"

    assert actions(sampled, 4) == actions(sampled, 4)  # the policy's own stream, seeded per episode
    assert actions(sampled, 4) != actions(argmax, 4)
    cold = make_policy(str(folder), CONFIG, device="cpu", decode="sample:0.0001")
    assert cold.temperature == 0.0001 and cold.name == "adapter-sampled-t0.0001"
    assert actions(cold, 4) == actions(argmax, 4)  # a temperature near 0 is the arg-max
    with pytest.raises(NetLLMError, match="--decode: argmax, sample or sample:T .*, got 'greedy'"):
        make_policy(str(folder), CONFIG, device="cpu", decode="greedy")
    with pytest.raises(NetLLMError, match="--segment: choose among the baseline schedulers"):
        collect_pool([str(folder)], [1], CONFIG, keep="best", draws=2, segment_s=5, gnn="random",
                     templates=TEMPLATES, progress=False, make=make_policy)  # its context cannot be forked


def test_decode_temperature():
    assert [decode_temperature(d) for d in ("argmax", "sample", "sample:0.5", "sample:2")] == [0, 1, 0.5, 2]
    for bad in ("greedy", "sample:0", "sample:-1", "sample:x", "sample:", "argmax:1", "sample:inf", "sample:nan"):
        with pytest.raises(NetLLMError, match="--decode"):
            decode_temperature(bad)


def test_kv_cache_matches_full_recompute(model, monkeypatch):
    import netllm.tasks.cjs.policy as cjs_policy

    gnn = load_gnn("random")
    logits = {}
    real = cjs_policy.head_logits
    for use_cache in (True, False):
        policy = NetLLMCJSPolicy(model, target=-0.5, gnn=gnn, use_cache=use_cache)
        seen: list[torch.Tensor] = []

        def spy(*args, seen=seen, **kw):
            out = real(*args, **kw)
            seen.append(out[0][0].clone())
            return out

        monkeypatch.setattr(cjs_policy, "head_logits", spy)
        run_netllm_episode(env(), policy, seed=2, max_decisions=16)  # K = 4: several re-primings
        logits[use_cache] = seen
    assert len(logits[True]) == len(logits[False]) > 8
    for a, b in zip(logits[True], logits[False]):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_training_windows_match_run_time_tokens(model, pool):
    """A full training window and the incremental policy fed the same logged steps give
    the same hidden state (same action vectors, returns-to-go and time steps)."""
    K = model.config.rl.context_steps
    sampler = CJSWindowSampler(pool, model.config.rl, batch_size=1)
    start, end = pool.episode_bounds
    ret = float(pool.episode_returns()[0])
    inc = IncrementalPolicy(model, target=ret, batch_size=1)
    batch = sampler.cjs_windows(np.array([K - 1]))
    with torch.no_grad():
        window_hidden = decision_hidden(model, batch.window)[0]
        for t in range(K):
            h = inc.decide({k: torch.from_numpy(pool.states[k][t])[None] for k in ("global", "pooled")})
            assert torch.allclose(h[0], window_hidden[t], atol=1e-4), t
            inc.record(batch.window.actions[:, t], torch.tensor([float(pool.rewards[t])]))


def test_pools_of_another_task_are_refused(tmp_path, pool):
    abr = ExperiencePool(states={"buffer": np.zeros((3, 1), np.float32)}, actions=np.zeros(3, np.int64),
                         rewards=np.zeros(3), dones=np.array([0, 0, 1], bool), episodes=np.zeros(3, np.int64),
                         meta={"task": "abr"})
    path = abr.save(tmp_path / "abr.npz")
    with pytest.raises(NetLLMError, match="abr.npz"):
        load_pool(path)
    fake = ExperiencePool(states={"global": np.zeros((3, GLOBAL_DIM), np.float32)}, actions=np.zeros((3, 2)),
                          rewards=np.zeros(3), dones=np.array([0, 0, 1], bool), episodes=np.zeros(3, np.int64),
                          meta={"task": "cjs"})
    path = fake.save(tmp_path / "partial.npz")
    with pytest.raises(NetLLMError, match="partial.npz.*pooled"):
        load_pool(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(NetLLMError, match="junk.npz"):
        load_pool(tmp_path / "junk.npz")


def test_best_of_draws_keeps_the_best_sampled_episode_per_job_sequence(real_data, monkeypatch):
    """Decima (real weights) samples: each draw is another episode on the same job
    sequence; draw 0 is upstream's; keep="best" keeps per seed the highest return."""
    from netllm.tasks.cjs.baselines import make_scheduler, run_episode

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    seeds = [1, 2]
    every = collect_pool(["decima", "fair"], seeds, CONFIG, draws=3, gnn="random", templates=TEMPLATES,
                         progress=False)
    kept = every.meta["episodes"]
    assert [(k["policy"], k["seed"], k["draw"]) for k in kept] == [
        (p, s, d) for s in seeds for p, d in (("decima", 0), ("decima", 1), ("decima", 2), ("fair", 0))]
    returns = every.episode_returns()
    assert len(set(np.round(returns[:3], 3))) > 1  # the draws really differ
    upstream = run_episode(env(), make_scheduler("decima"), seed=1)  # shares the simulator's stream
    assert kept[0]["avg_jct_s"] == pytest.approx(upstream.avg_jct_s)
    best = collect_pool(["decima", "fair"], seeds, CONFIG, keep="best", draws=3, gnn="random",
                        templates=TEMPLATES, progress=False)
    assert best.num_episodes == 2 and best.meta["keep"] == "best"
    for i, s in enumerate(seeds):
        mine = [r for r, k in zip(returns, kept) if k["seed"] == s]
        assert best.episode_returns()[i] == pytest.approx(max(mine), rel=1e-6)
    with pytest.raises(NetLLMError, match="--keep"):
        collect_pool(["fair"], seeds, CONFIG, keep="top", templates=TEMPLATES)
    with pytest.raises(NetLLMError, match="--draws"):
        collect_pool(["fair"], seeds, CONFIG, draws=0, templates=TEMPLATES)


def test_best_segments_choose_the_best_continuation(real_data, monkeypatch):
    """--segment S: every S simulated seconds each draw plays on from a fork of the same
    state; the continuation whose jobs spent the least time in the system goes on."""
    from netllm.tasks.cjs.baselines import make_scheduler
    from netllm.tasks.cjs.pool import record_best_segments, record_episode

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    config = CJSConfig(num_executors=10, num_jobs=30, arrival_rate=4e-4)
    SEG_S = 20  # long enough for jobs to finish inside a segment (else every draw scores the same)

    def sequence():
        return CJSEnv.from_config(config, templates=TEMPLATES)

    # a deterministic scheduler cut into segments plays its plain episode
    fifo = make_scheduler("fifo")
    plain, _ = record_episode(sequence(), fifo, None, seed=3)
    cut, _, segments = record_best_segments(sequence(), [(fifo, 0)], None, seed=3, segment_ms=2_000)
    assert segments > 3
    assert np.array_equal(cut["actions"], plain["actions"]) and np.allclose(cut["rewards"], plain["rewards"])

    decima = make_scheduler("decima")
    pool = collect_pool(["decima"], [3, 4], config, keep="best", draws=4, segment_s=SEG_S, gnn="random",
                        templates=TEMPLATES, progress=False)
    kept = pool.meta["episodes"]
    assert pool.meta["segment_s"] == SEG_S and [k["seed"] for k in kept] == [3, 4] and kept[0]["segments"] > 2
    for k, total in zip(kept, pool.episode_returns()):  # rewards sum to minus the total JCT
        assert -total == pytest.approx(k["avg_jct_s"] * 1000 * config.num_jobs, rel=1e-6)
    again = collect_pool(["decima"], [3], config, keep="best", draws=4, segment_s=SEG_S, gnn="random",
                         templates=TEMPLATES, progress=False)
    assert np.array_equal(again.actions, pool.actions[:len(again)])  # reproducible

    # the first segment kept is the best of its 4 candidates: replay them
    env = sequence()
    env.reset(3)
    scores, played = [], []
    for draw in range(4):
        twin, obs = env.fork()
        decima.reset(3, rng=random.Random((3 * 1_000_003 + draw) * 100_003 + 0))
        acts, done = [], False
        while twin.wall_time_ms < SEG_S * 1000 and not done:
            a = decima.act(obs)
            if len(obs.runnable):
                acts.append(tuple(a))
            obs, _, done, _, _ = twin.step(a)
        scores.append(twin.job_time_ms(0, SEG_S * 1000))
        played.append(acts)
    assert len(set(scores)) > 1  # the draws differ
    best = played[int(np.argmin(scores))]
    assert [tuple(a) for a in pool.actions[: len(best)]] == best
    with pytest.raises(NetLLMError, match="--segment: .*needs --keep best"):
        collect_pool(["decima"], [3], config, draws=2, segment_s=5, templates=TEMPLATES)
    with pytest.raises(NetLLMError, match="--segment: must be >= 0"):
        collect_pool(["decima"], [3], config, keep="best", draws=2, segment_s=-1, templates=TEMPLATES)
