"""The NetLLM CJS scheduler: pools, a few adaptation steps, adapter round trip, KV cache
vs recompute, train/run-time token agreement, and bad pools (tiny random Llama +
synthetic jobs, random-weight GNN: no real data needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.rl import ExperiencePool, IncrementalPolicy, decision_hidden
from netllm.tasks.cjs.baselines import torch_threads
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.policy import (CANDIDATE_DIM, GLOBAL_DIM, POOLED_DIM, AdaptRecipe, CJSWindowSampler,
                                     NetLLMCJSPolicy, adapt, cjs_loss, collect_pool, load_gnn, load_pool,
                                     model_config, run_netllm_episode)
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
    recipe = AdaptRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=3, warmup_steps=1)
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
    from netllm.tasks.cjs.task import make_policy

    recipe = AdaptRecipe(llm=tiny_llama, layers=2, rank=4, context=4, batch_size=4, steps=3, warmup_steps=1,
                         decode="sample")
    folder = adapt(pool, tmp_path / "adapter", recipe, device="cpu", progress=False)
    sampled = make_policy(str(folder), CONFIG, device="cpu")  # the recipe's decoding
    argmax = make_policy(str(folder), CONFIG, device="cpu", decode="argmax")
    assert not argmax.sample and sampled.sample and sampled.name == "adapter-sampled"

    assert actions(sampled, 4) == actions(sampled, 4)  # the policy's own stream, seeded per episode
    assert actions(sampled, 4) != actions(argmax, 4)
    with pytest.raises(NetLLMError, match="--decode: argmax or sample, got 'greedy'"):
        make_policy(str(folder), CONFIG, device="cpu", decode="greedy")


def test_kv_cache_matches_full_recompute(model):
    gnn = load_gnn("random")
    logits = {}
    for use_cache in (True, False):
        policy = NetLLMCJSPolicy(model, target=-0.5, gnn=gnn, use_cache=use_cache)
        seen: list[torch.Tensor] = []
        decide = policy.decide

        def spy(obs, decide=decide, seen=seen):
            out = decide(obs)
            seen.append(out[1][0].clone())
            return out

        policy.decide = spy  # type: ignore[method-assign]
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
