"""Offline-RL core: pools on disk, returns-to-go, windows, training loss, and the
KV-cached incremental policy against full recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import NetLLM, NetLLMConfig
from netllm.rl import (ExperiencePool, IncrementalPolicy, RLSpec, WindowSampler, action_loss,
                       default_use_cache, returns_to_go, target_return)
from netllm.utils import NetLLMError

SPEC = RLSpec(state_modalities=("throughput", "buffer"), context_steps=4, num_actions=3, max_timestep=64)


def make_pool(lengths=(7, 3, 9), seed=0) -> ExperiencePool:
    rng = np.random.default_rng(seed)
    eps = [{"states": {"throughput": rng.random((t, 6)), "buffer": rng.random((t, 1))},
            "actions": rng.integers(0, 3, t), "rewards": rng.random(t)} for t in lengths]
    return ExperiencePool.from_episodes(eps, meta={"task": "toy"})


def make_model(llm: str) -> NetLLM:
    config = NetLLMConfig(
        task="toy", llm=llm, lora=LoraSpec(rank=4),
        encoders=[EncoderSpec("throughput", "series", length=6), EncoderSpec("buffer", "scalar", in_dim=1)],
        heads={"action": HeadSpec("categorical", num_classes=3)}, rl=SPEC,
    )
    return NetLLM(config, device="cpu")


def test_returns_to_go_restart_per_episode():
    rewards = np.array([1, 2, 3, 10, 20, 5], dtype=np.float32)
    dones = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    np.testing.assert_allclose(returns_to_go(rewards, dones), [6, 5, 3, 30, 20, 5])
    np.testing.assert_allclose(returns_to_go(rewards, dones, gamma=0.5), [2.75, 3.5, 3, 20, 20, 5])
    pool = make_pool()
    rtg = pool.returns_to_go(scale=2.0)
    starts, _ = pool.episode_bounds
    np.testing.assert_allclose(rtg[starts] * 2.0, pool.episode_returns(), rtol=1e-5)


def test_pool_roundtrip_without_pickle(tmp_path):
    pool = make_pool()
    path = pool.save(tmp_path / "run")
    with np.load(path, allow_pickle=False) as z:  # loads without pickle
        assert set(z.files) >= {"action", "reward", "done", "episode", "meta", "state.throughput"}
    back = ExperiencePool.load(tmp_path / "run", task="toy")
    assert back.num_episodes == 3 and len(back) == 19
    np.testing.assert_array_equal(back.states["buffer"], pool.states["buffer"])
    with pytest.raises(NetLLMError, match="task 'toy', not 'abr'"):
        ExperiencePool.load(path, task="abr")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(NetLLMError, match="bad.npz"):
        ExperiencePool.load(tmp_path / "bad.npz")


def test_pool_concat_keeps_every_episode_whole():
    a, b = make_pool((7, 3), seed=0), make_pool((4, 9, 2), seed=1)
    both = ExperiencePool.concat([a, b], meta={"task": "test"})
    assert both.num_episodes == 5 and len(both) == 25 and both.meta == {"task": "test"}
    np.testing.assert_allclose(both.episode_returns(), np.r_[a.episode_returns(), b.episode_returns()])
    np.testing.assert_array_equal(both.returns_to_go()[10:], b.returns_to_go())
    other = ExperiencePool.from_episodes([{"states": {"y": np.zeros((2, 1))}, "actions": np.zeros(2),
                                           "rewards": np.zeros(2)}])
    with pytest.raises(NetLLMError, match="cannot concatenate"):
        ExperiencePool.concat([a, other])


def test_pool_validation():
    pool = make_pool()
    with pytest.raises(NetLLMError, match="done flags"):
        ExperiencePool(pool.states, pool.actions, pool.rewards, np.r_[pool.dones[:-2], True, True], pool.episodes)
    with pytest.raises(NetLLMError, match="NaN"):
        ExperiencePool(pool.states, pool.actions, np.full(len(pool), np.nan), pool.dones, pool.episodes)


def test_windows_end_at_step_and_left_pad():
    pool = make_pool()
    sampler = WindowSampler(pool, SPEC, batch_size=4)
    # row 8 is step 1 of episode 1 (rows 7..9): two real steps, two padding steps
    b = sampler.windows(np.array([8, 6]))
    assert b.mask[0].tolist() == [False, False, True, True]
    assert b.timesteps[0].tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(b.states["throughput"][0, 2:].numpy(), pool.states["throughput"][7:9], rtol=1e-6)
    assert torch.all(b.states["throughput"][0, :2] == 0)
    assert b.mask[1].all() and b.timesteps[1].tolist() == [3, 4, 5, 6]
    np.testing.assert_allclose(b.rtg[1].numpy(), pool.returns_to_go()[3:7], rtol=1e-6)
    # deterministic in the batch index (exact resume)
    assert torch.equal(sampler.batch(5).actions, sampler.batch(5).actions)
    assert target_return(pool, 1.0) == pytest.approx(pool.episode_returns().max())


def test_offline_rl_training_learns_the_logged_policy(tiny_llama):
    """The return-conditioned policy fits an action rule that depends on the state."""
    rng = np.random.default_rng(1)
    eps = []
    for _ in range(20):
        thr = rng.random((8, 6))
        actions = (thr[:, -1] * 3).astype(int).clip(0, 2)  # the logged policy
        eps.append({"states": {"throughput": thr, "buffer": rng.random((8, 1))},
                    "actions": actions, "rewards": rng.random(8)})
    pool = ExperiencePool.from_episodes(eps, meta={"task": "toy"})
    torch.manual_seed(0)
    model = make_model(tiny_llama)
    sampler = WindowSampler(pool, SPEC, batch_size=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for i in range(60):
        loss, info = action_loss(model, sampler.batch(i))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    assert info["accuracy"] > 0.6


def perturbed_model(llm: str) -> NetLLM:
    """A model whose LoRA and heads are away from their initialisation (LoRA B starts at 0)."""
    torch.manual_seed(0)
    model = make_model(llm)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_incremental_matches_full_recompute(tiny_llama):
    """KV-cached decisions equal recomputing the whole context, across re-priming."""
    model = perturbed_model(tiny_llama)
    cached = IncrementalPolicy(model, target=3.0, batch_size=2, use_cache=True)
    full = IncrementalPolicy(model, target=3.0, batch_size=2, use_cache=False)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    lengths = []
    for _ in range(11):  # K=4: re-primes several times
        states = {"throughput": torch.rand(2, 6, generator=gen), "buffer": torch.rand(2, 1, generator=gen)}
        a = model.heads["action"](cached.decide(states))
        b = model.heads["action"](full.decide(states))
        worst = max(worst, (a - b).abs().max().item())
        lengths.append(cached.cache_len[0])
        action = a.argmax(-1)
        reward = torch.rand(2, generator=gen)
        cached.record(action, reward)
        full.record(action, reward)
    assert worst < 1e-4
    assert max(lengths) <= SPEC.context_steps * SPEC.tokens_per_step  # context never exceeds K steps
    assert lengths[1] - lengths[0] == SPEC.tokens_per_step  # one step of new tokens per decision


def test_cache_by_default_on_cpu_recompute_on_cuda(tiny_llama):
    """The decision path's default follows the device (the cache was measured slower on
    an H200); an explicit choice wins."""
    assert default_use_cache("cpu") and default_use_cache(torch.device("cpu"))
    assert not default_use_cache("cuda") and not default_use_cache(torch.device("cuda", 0))
    model = perturbed_model(tiny_llama)
    assert IncrementalPolicy(model, target=3.0).use_cache is True
    assert IncrementalPolicy(model, target=3.0, use_cache=False).use_cache is False


def test_incremental_first_decision_equals_training_window(tiny_llama):
    """Inference sees exactly what training saw: same tokens, same positions."""
    torch.manual_seed(0)
    model = make_model(tiny_llama).eval()
    pool = make_pool()
    sampler = WindowSampler(pool, SPEC, batch_size=1)
    from netllm.rl import decision_hidden

    batch = sampler.windows(np.array([2]))  # steps 0..2 of episode 0, left-padded
    ref = decision_hidden(model, batch)[0, -1]
    policy = IncrementalPolicy(model, target=float(batch.rtg[0, 1]), batch_size=1)
    for k in range(1, 4):
        st = {name: batch.states[name][:, k] for name in SPEC.state_modalities}
        hidden = policy.decide(st)
        if k < 3:
            policy.record(batch.actions[:, k], float(batch.rtg[0, k] - batch.rtg[0, k + 1]))
    assert torch.allclose(hidden[0], ref, atol=1e-4)


def test_batched_rows_equal_each_episode_alone(tiny_llama):
    """Episodes that decide at different times (so their contexts differ in length and
    they re-prime at different steps) get from one batched policy what each gets alone."""
    model = perturbed_model(tiny_llama)
    B = 3
    targets = torch.tensor([3.0, 2.0, 4.0])
    batched = IncrementalPolicy(model, target=targets, batch_size=B)
    alone = [IncrementalPolicy(model, target=float(targets[i])) for i in range(B)]
    gen = torch.Generator().manual_seed(1)
    worst, calls = 0.0, 0
    for rnd in range(14):
        rows = [r for r in range(B) if (rnd + r) % (r + 2) != 0]  # each row skips on its own rhythm
        states = {"throughput": torch.rand(len(rows), 6, generator=gen), "buffer": torch.rand(len(rows), 1, generator=gen)}
        hidden = batched.decide(states, rows=rows)
        action = model.heads["action"](hidden).argmax(-1)
        reward = torch.rand(len(rows), generator=gen)
        batched.record(action, reward, rows=rows)
        for j, r in enumerate(rows):
            one = alone[r].decide({k: v[j:j + 1] for k, v in states.items()})
            worst = max(worst, (one[0] - hidden[j]).abs().max().item())
            alone[r].record(action[j:j + 1], reward[j:j + 1])
        calls += 1
    assert worst < 1e-4
    assert len(set(batched.cache_len)) > 1  # the rows did drift apart
    assert batched.calls < sum(p.calls for p in alone)  # and shared LLM calls
    with pytest.raises(NetLLMError, match="rows"):
        batched.decide({"throughput": torch.rand(1, 6), "buffer": torch.rand(1, 1)}, rows=[B])


def test_decision_latency_measurement_runs_batched(tiny_llama):
    """``netllm bench foundation``'s decision measurement, batch 2 (values are timings: not asserted)."""
    from netllm.bench import measure_decisions

    r = measure_decisions(tiny_llama, "cpu", None, context=4, repeats=1, episode_steps=9, batch=2)
    assert r["batch"] == 2 and r["context_steps"] == 4
    assert all(r[k] > 0 for k in ("incremental_ms", "full_recompute_ms", "cached_step_ms"))
    assert r["per_env_incremental_ms"] == pytest.approx(r["incremental_ms"] / 2)
    half = measure_decisions(tiny_llama, "cpu", None, context=4, repeats=1, episode_steps=9, batch=2, dtype="bf16")
    assert half["batch"] == 2 and half["incremental_ms"] > 0  # the same episode with the LLM in bf16
