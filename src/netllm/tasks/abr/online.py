"""Online fine-tuning of the NetLLM ABR policy in the simulator (``netllm.finetune``'s
hooks for ABR).

    netllm finetune abr --adapter runs/abr --out runs/abr-ppo --iterations 20 --envs 32 --generated 16



Rollouts: every iteration plays ``--envs`` traces drawn from ``--traces`` (default
``fcc-pool``, the traces the offline pool played) plus ``--generated`` Markov-chain traces
generated fresh over a wide bandwidth range and variability (``traces.synthetic_traces``:
the idea behind GENET's and UDR's randomised training environments), all in lock-step
(``BatchABREnv``), the policy sampling its levels through the batched decision path. A
decision's return-to-go is the target minus the QoE earned before it, as at run time.
Validation: mean QoE on ``--valid-traces`` (default ``fcc-holdout``, which no pool plays)
played with every ``--valid-video``, plus ``--valid-generated`` Markov-chain traces drawn
once from the training generator's range with a seed no iteration uses
(``VALID_GENERATED_SEED``): more episodes, so that picking the best of many iterations
picks less noise.
With ``--workers`` both are cut into trace shards played on the Ray workers (``Spread``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from netllm.finetune import LOCAL, Rollout, Spread
from netllm.model import NetLLM
from netllm.rl import ExperiencePool, WindowSampler, decision_hidden
from netllm.tasks.abr.task import NetLLMABRPolicy, play_shard, concat_episodes
from netllm.tasks.abr.traces import synthetic_traces


# iteration i of a run with --seed S draws from seed ITERATION_SEED + S * 1,000,000 + i
# (``ABRTask.finetune``); validation's generated traces from one below, which none draws
ITERATION_SEED = 100_000
VALID_GENERATED_SEED = ITERATION_SEED - 1


class ABROnline:
    """``OnlineHooks`` of ABR."""

    metric = "qoe"
    higher_is_better = True

    def __init__(self, target: float, traces: Sequence[Any], videos: Sequence[Any], valid: Sequence[Any],
                 valid_videos: Sequence[Any], envs: int, generated: int = 0, low_mbps: float = 0.2,
                 high_mbps: float = 20.0, valid_generated: int = 0) -> None:
        self.target, self.traces, self.videos = target, list(traces), list(videos)
        self.envs, self.generated, self.low_mbps, self.high_mbps = envs, generated, low_mbps, high_mbps
        self.valid = list(valid) + (synthetic_traces(valid_generated, seed=VALID_GENERATED_SEED, low_mbps=low_mbps,
                                                     high_mbps=high_mbps) if valid_generated else [])
        self.valid_videos = list(valid_videos)

    def rollout(self, model: NetLLM, seeds: list[int], spread: Spread = LOCAL) -> Rollout:
        seed = int(seeds[0])
        rng = np.random.default_rng(seed)
        picked = [self.traces[i] for i in rng.choice(len(self.traces), size=min(self.envs, len(self.traces)),
                                                     replace=False)]
        if self.generated:
            picked += synthetic_traces(self.generated, seed=seed, low_mbps=self.low_mbps, high_mbps=self.high_mbps)
        video = self.videos[seed % len(self.videos)]  # the iterations alternate the videos
        # shards of traces (one per worker), each trace with its own streams
        ep = concat_episodes(spread(self, model, _rollout_shard, spread.split(len(picked)), picked, video, seed))
        assert ep.states is not None
        episodes = [{"states": {k: v[i] for k, v in ep.states.items()}, "actions": ep.levels[i],
                     "rewards": ep.qoe[i]} for i in range(len(picked))]
        pool = ExperiencePool.from_episodes(episodes, meta={"task": "abr", "policies": ["netllm-online"]})
        scale = float(model.config.rl.return_scale)
        earned = np.concatenate([np.r_[0.0, np.cumsum(ep.qoe[i])[:-1]] for i in range(len(picked))])
        rtg = ((self.target - earned) / scale).astype(np.float32)
        return Rollout(pool, rtg, {"qoe": float(ep.qoe.mean())})

    def log_probs(self, model: NetLLM, rollout: Rollout, end_rows: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sampler = rollout.cache.get("sampler")
        if sampler is None:
            sampler = WindowSampler(rollout.pool, model.config.rl, batch_size=1)
            sampler.rtg = rollout.rtg  # the return-to-go each decision was conditioned on
            rollout.cache["sampler"] = sampler
        batch = sampler.windows(end_rows)
        hidden = decision_hidden(model, batch)
        logp_all = F.log_softmax(model.heads["action"](hidden).float(), -1)
        actions = batch.actions.to(model.device).long().clamp(0, logp_all.shape[-1] - 1)
        logp = logp_all.gather(-1, actions[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy, hidden, batch.mask.to(model.device)

    def validate(self, model: NetLLM, spread: Spread = LOCAL) -> float:
        """Mean per-chunk QoE over every (validation trace, validation video) episode
        (``evaluate``'s setting, seed 1)."""
        parts = [part for video in self.valid_videos
                 for part in spread(self, model, _valid_shard, spread.split(len(self.valid)), self.valid, video)]
        return float(np.concatenate(parts).mean())


def _rollout_shard(hooks: ABROnline, model: NetLLM, shard: range, traces: Sequence[Any], video: Any,
                   seed: int) -> Any:
    policy = NetLLMABRPolicy(model, hooks.target, sample=True, name="netllm-online")
    return play_shard(policy, shard, traces, video, seed, True, {"noise": True, "random_start": True})


def _valid_shard(hooks: ABROnline, model: NetLLM, shard: range, traces: Sequence[Any], video: Any) -> np.ndarray:
    return play_shard(NetLLMABRPolicy(model, hooks.target), shard, traces, video, 1, False, {}).qoe
