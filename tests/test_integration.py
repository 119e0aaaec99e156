"""The foundation end to end on the real SmolLM2: a return-conditioned policy trained
with the one training loop, interrupted and resumed, saved as an adapter and reloaded,
then run with KV-cached decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import NetLLM, NetLLMConfig
from netllm.rl import ExperiencePool, IncrementalPolicy, RLSpec, WindowSampler, action_loss, target_return
from netllm.checkpoint import trainable_state_dict
from netllm.train import TrainConfig, train

pytestmark = pytest.mark.integration

SPEC = RLSpec(state_modalities=("throughput_mbps", "buffer_s"), context_steps=3, num_actions=4,
              max_timestep=32, return_scale=10.0)


def config(**kw) -> NetLLMConfig:
    return NetLLMConfig(
        task="toy", llm="smollm2", layers=2, lora=LoraSpec(rank=4),
        encoders=[EncoderSpec("throughput_mbps", "series", length=6, embed_dim=32),
                  EncoderSpec("buffer_s", "scalar", in_dim=1, embed_dim=32)],
        heads={"action": HeadSpec("categorical", num_classes=4, width=64)}, rl=SPEC, **kw)


def pool() -> ExperiencePool:
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(6):
        thr = rng.random((10, 6)) * 4
        eps.append({"states": {"throughput_mbps": thr, "buffer_s": rng.random((10, 1)) * 20},
                    "actions": thr[:, -1].astype(int).clip(0, 3), "rewards": rng.random(10)})
    return ExperiencePool.from_episodes(eps, meta={"task": "toy"})


def run(tmp, stop_after=None, resume=False):
    torch.manual_seed(0)
    model = NetLLM(config(), device="cpu")
    sampler = WindowSampler(pool(), SPEC, batch_size=4, seed=1)
    cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=2, grad_accum=2, checkpoint_every=2,
                      log_every=1, progress=False, tensorboard=False)
    train(model, sampler.batch, action_loss, cfg, tmp, resume=resume, stop_after=stop_after)
    return model


def test_policy_trains_resumes_saves_and_decides(tmp_path):
    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=5)  # "crash" after step 5; last checkpoint at step 4
    resumed = run(tmp_path / "b", resume=True)
    a, b = trainable_state_dict(straight), trainable_state_dict(resumed)
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    folder = straight.save_adapter(tmp_path / "adapter")
    loaded = NetLLM.from_adapter(folder, task="toy", device="cpu")
    straight.eval()
    target = target_return(pool())
    policies = [IncrementalPolicy(m, target=target, batch_size=2) for m in (straight, loaded)]
    full = IncrementalPolicy(loaded, target=target, batch_size=2, use_cache=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        states = {"throughput_mbps": torch.rand(2, 6, generator=gen) * 4,
                  "buffer_s": torch.rand(2, 1, generator=gen) * 20}
        logits = [m.heads["action"](p.decide(states)) for m, p in zip((straight, loaded, loaded),
                                                                      (*policies, full))]
        assert torch.allclose(logits[0], logits[1], atol=1e-5)  # adapter reload is exact
        assert (logits[1] - logits[2]).abs().max().item() < 1e-4  # KV cache == recompute
        action = logits[0].argmax(-1)
        for p in (*policies, full):
            p.record(action, 0.3)
