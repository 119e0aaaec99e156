"""Many CJS simulators at once (``tasks/cjs/vec.py``): a seed's episode is the same
whether it runs alone (the sequential runners) or batched with others, for deterministic
and sampling policies; Decima's GNN over several graphs equals one graph at a time; the
NetLLM scheduler asks its LLM once per round (tiny random Llama, synthetic jobs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.tasks.cjs.baselines import DecimaScheduler, make_scheduler, run_episode
from netllm.tasks.cjs.features import load_gnn
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.policy import NetLLMCJSPolicy, model_config, run_netllm_episode
from netllm.tasks.cjs.sim import CJSConfig, CJSEnv
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import NetLLMError

CONFIG = CJSConfig(num_executors=10, num_jobs=6, arrival_rate=4e-4)
TEMPLATES = synthetic_templates(6, seed=3)
SEEDS = [1, 2, 3, 4]


def env() -> CJSEnv:
    return CJSEnv.from_config(CONFIG, templates=TEMPLATES)


def signature(result) -> tuple:
    return result.seed, result.avg_jct_s, result.num_decisions, result.total_reward


def batched(policy, envs=None):
    return [signature(r) for r in run_episodes(policy, SEEDS, CONFIG, envs=envs, templates=TEMPLATES)]


@pytest.fixture(scope="module")
def netllm_model(tiny_llama) -> NetLLM:
    torch.manual_seed(0)
    model = NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4, gnn="random"))
    with torch.no_grad():  # an untrained head would pick almost uniformly: give it some opinions
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", ["fifo", "fair"])
def test_heuristics_batched_equal_sequential(name):
    sched = make_scheduler(name)
    sequential = [signature(run_episode(env(), sched, seed=s)) for s in SEEDS]
    assert batched(sched) == sequential
    assert batched(sched, envs=3) == sequential


@pytest.mark.parametrize("greedy", [True, False])
def test_decima_batched_equals_sequential(greedy):
    """Arg-max Decima, and sampling Decima drawing from its simulator's stream (upstream)."""
    sched = DecimaScheduler(pretrained=False, greedy=greedy)
    torch.manual_seed(0)
    for p in sched.net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sequential = [signature(run_episode(env(), sched, seed=s)) for s in SEEDS]
    assert batched(sched) == sequential
    assert batched(sched, envs=2) == sequential


def test_gnn_over_several_graphs_equals_one_at_a_time():
    gnn = load_gnn("random")
    observations = []
    for seed in (1, 2, 3):
        e = env()
        obs, _ = e.reset(seed)
        for _ in range(4 * seed):  # graphs of different sizes and depths
            obs, *_ = e.step(make_scheduler("fair").act(obs))
        observations.append(obs)
    assert len({o.edge_masks.shape[0] for o in observations}) > 1 or len({o.num_nodes for o in observations}) > 1
    with torch.inference_mode():
        together = gnn.encode_batch(observations)
        for obs, parts in zip(observations, together):
            for a, b in zip(gnn.encode(obs), parts):
                assert a.shape == b.shape
                assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_netllm_batched_equals_sequential(netllm_model, temperature):
    """Arg-max: the same episodes as one at a time. Sampling: per-episode streams, so a
    seed's episode does not depend on how many share the batch."""
    policy = NetLLMCJSPolicy(netllm_model, target=-5.0, gnn=load_gnn("random"), temperature=temperature)
    sequential = [signature(run_netllm_episode(env(), policy, seed=s)) for s in SEEDS]
    assert batched(policy) == sequential
    assert batched(policy, envs=3) == sequential
    assert len({s[1] for s in sequential}) > 1  # the seeds are different episodes


def test_netllm_decides_in_one_llm_call_per_round(netllm_model):
    policy = NetLLMCJSPolicy(netllm_model, target=-5.0, gnn=load_gnn("random"))
    results = run_episodes(policy, SEEDS, CONFIG, templates=TEMPLATES)
    decisions = sum(r.num_decisions for r in results)
    # rounds <= the longest episode's decisions (+ a call per group of re-primed rows)
    assert policy.inc.calls < 0.6 * decisions
    assert max(r.num_decisions for r in results) <= policy.inc.calls


def test_bad_envs():
    with pytest.raises(NetLLMError, match="--envs"):
        run_episodes(make_scheduler("fifo"), SEEDS, CONFIG, envs=0, templates=TEMPLATES)
    with pytest.raises(NetLLMError, match="--seeds"):
        run_episodes(make_scheduler("fifo"), [], CONFIG, templates=TEMPLATES)
    assert np.isfinite(run_episodes(make_scheduler("fifo"), [1], CONFIG, envs=5, templates=TEMPLATES)[0].avg_jct_s)
