"""Online fine-tuning of the NetLLM scheduler in the Spark simulator (``netllm.finetune``'s
hooks for CJS).

    netllm finetune cjs --adapter runs/cjs-d48 --out runs/cjs-ppo --iterations 20 --envs 8 --jobs 50

Rollouts: ``envs`` simulators (``--jobs`` jobs each, training job sequences of their own,
never a test, validation or pool sequence) played at once by the current policy, which
samples from its heads (temperature 1, as it was imitating Decima), through the batched
decision path (``vec.run_episodes``). Each decision becomes a pool row (``pool.py``'s
layout) with the return-to-go it was conditioned on. With ``--group G`` every job
sequence is played by G simulators with their own sampling streams, and a decision's
advantage is taken against the group's mean return-to-go at the same simulated time
(Decima's input-dependent baseline, ``finetune.group_advantages``) instead of GAE on the
value head. Validation: the mean JCT on the ``--valid-seeds`` job sequences (default
1001-1010, apart from the test seeds 1-10); Decima's on the same episodes, the paired
reference, is scored once at the start (``reference``; metrics.csv's first row and the
learning curve).
With ``--workers`` rollouts and validation are cut into shards of job sequences played
on the Ray workers (``Spread``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netllm.finetune import LOCAL, Rollout, Spread
from netllm.model import NetLLM
from netllm.rl import decision_hidden
from netllm.tasks.cjs.decima import DecimaNet
from netllm.tasks.cjs.features import FEATURE_VERSION, exec_mask
from netllm.tasks.cjs.policy import CJSWindowSampler, NetLLMCJSPolicy
from netllm.tasks.cjs.pool import _episode, pool_from_episodes
from netllm.tasks.cjs.sim import CJSConfig
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import NetLLMError


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of categorical log-probabilities whose masked entries are ~finfo.min."""
    return -torch.where(logp > -1e30, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


class _Recorder:
    """The batch protocol around a NetLLM scheduler that records every decision."""

    def __init__(self, policy: NetLLMCJSPolicy) -> None:
        self.policy, self.name = policy, policy.name
        policy.on_decisions = self._decided
        self.episodes: dict[int, dict[str, Any]] = {}

    def open(self, slots: int) -> None:
        self.policy.open(slots)
        self.current: list[dict[str, Any]] = [{} for _ in range(slots)]

    def start(self, slot: int, seed: int | None, env: Any) -> None:
        self.policy.start(slot, seed, env)
        self.current[slot] = {"seed": seed, "features": [], "actions": [], "rewards": [], "rtg": [], "times": [],
                              "env": env}

    def act_batch(self, slots: list[int], observations: list[Any]) -> list[Any]:
        return self.policy.act_batch(slots, observations)

    def observe(self, reward: float, slot: int) -> None:
        self.policy.observe(reward, slot)
        ep = self.current[slot]
        if ep["rewards"]:  # rewards before the first decision are nobody's
            ep["rewards"][-1] += float(reward)

    def end(self, slot: int) -> None:
        self.policy.end(slot)
        episode = self.current[slot]
        episode.pop("env", None)
        self.episodes[int(episode["seed"])] = episode

    def _decided(self, rows: list[int], feats: list[Any], rtg: np.ndarray, actions: list[Any]) -> None:
        for r, f, g, a in zip(rows, feats, rtg, actions):
            ep = self.current[r]
            ep["features"].append(f)
            ep["actions"].append((int(a[0]), int(a[1])))
            ep["rewards"].append(0.0)
            ep["rtg"].append(float(g))
            ep["times"].append(float(ep["env"].wall_time_ms) * 1e-3)


class CJSOnline:
    """``OnlineHooks`` of CJS."""

    metric = "jct_s"
    higher_is_better = False

    def __init__(self, gnn: DecimaNet, target: float, train: CJSConfig, valid: CJSConfig, valid_seeds: list[int],
                 templates: Any = None, group: int = 1, reference: tuple[str, Any] | None = None) -> None:
        self.gnn, self.target, self.train, self.valid = gnn, target, train, valid
        self.valid_seeds, self.templates, self.group = valid_seeds, templates, group
        self.reference_policy = reference  # (name, scheduler) scored on the validation episodes once

    def reference(self) -> tuple[str, float] | None:
        """The reference scheduler's mean JCT on the validation episodes (as ``netllm eval cjs`` plays it)."""
        if self.reference_policy is None:
            return None
        name, policy = self.reference_policy
        results = run_episodes(policy, self.valid_seeds, self.valid, templates=self.templates)
        return name, float(np.mean([r.avg_jct_s for r in results]))

    def policy(self, model: NetLLM) -> NetLLMCJSPolicy:
        return NetLLMCJSPolicy(model, self.target, self.gnn, temperature=1.0, name="netllm-online")

    def rollout(self, model: NetLLM, seeds: list[int], spread: Spread = LOCAL) -> Rollout:
        # job sequences in shards (one per worker); every simulator keeps its own streams.
        # With groups of G, the episodes of a group play the job sequence of its first seed
        if len(seeds) % self.group:
            raise NetLLMError(f"--group {self.group}: must divide the {len(seeds)} simulators of an iteration")
        plays = [(s, seeds[i - i % self.group]) for i, s in enumerate(seeds)]
        parts = spread(self, model, _rollout_seeds, [[plays[i] for i in shard] for shard in spread.split(len(seeds))])
        episodes = [ep for part, _ in parts for ep in part]
        jcts = [j for _, part in parts for j in part]
        pool = pool_from_episodes([_episode(ep["features"], ep["actions"], ep["rewards"]) for ep in episodes],
                                  meta={"task": "cjs", "policies": ["netllm-online"], "seeds": seeds,
                                        "feature_version": FEATURE_VERSION, "executors": self.train.num_executors})
        rtg = np.concatenate([np.asarray(ep["rtg"], dtype=np.float32) for ep in episodes])
        if self.group == 1:
            return Rollout(pool, rtg, {"jct_s": float(np.mean(jcts))})
        times = np.concatenate([np.asarray(ep["times"], dtype=np.float64) for ep in episodes])
        return Rollout(pool, rtg, {"jct_s": float(np.mean(jcts))}, groups=np.arange(len(seeds)) // self.group,
                       times=times)

    def log_probs(self, model: NetLLM, rollout: Rollout, end_rows: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sampler = rollout.cache.get("sampler")
        if sampler is None:
            classes = model.heads["executors"].num_classes
            sampler = CJSWindowSampler(rollout.pool, model.config.rl, batch_size=1, num_exec_classes=classes)
            sampler.rtg = rollout.rtg  # the return-to-go each decision was conditioned on, not hindsight's
            rollout.cache["sampler"] = sampler
        batch = sampler.cjs_windows(end_rows)
        dev = model.device
        hidden = decision_hidden(model, batch.window)  # (B, K, H)
        real = batch.window.mask.to(dev)
        cand = batch.candidates.to(dev)
        cmask = batch.cand_mask.to(dev) | ~real[..., None]  # padding steps: any valid set, masked out later
        stage = batch.stage.to(dev)
        stage_lp = F.log_softmax(model.heads["stage"](hidden, cand, cmask).float(), -1)
        chosen = cand.gather(2, stage[..., None, None].expand(-1, -1, 1, cand.shape[-1]))[:, :, 0]
        caps = batch.cand_caps.to(dev).gather(2, stage[..., None])[..., 0]
        classes = model.heads["executors"].num_classes
        exec_lp = F.log_softmax(model.heads["executors"](hidden + model.encoders("chosen", chosen),
                                                         exec_mask(caps, classes)).float(), -1)
        target = torch.minimum((batch.num_exec.to(dev) - 1).clamp(min=0), caps.clamp(1, classes) - 1)
        logp = stage_lp.gather(-1, stage[..., None])[..., 0] + exec_lp.gather(-1, target[..., None])[..., 0]
        entropy = _entropy(stage_lp) + _entropy(exec_lp)
        return logp, entropy, hidden, real

    def validate(self, model: NetLLM, spread: Spread = LOCAL) -> float:
        seeds = self.valid_seeds
        parts = spread(self, model, _valid_seeds, [[seeds[i] for i in shard] for shard in spread.split(len(seeds))])
        return float(np.mean([j for part in parts for j in part]))


def _rollout_seeds(hooks: CJSOnline, model: NetLLM, plays: list[tuple[int, int]]
                   ) -> tuple[list[dict[str, Any]], list[float]]:
    """Sampled episodes, one per (seed of its sampling stream, job sequence), with every
    decision recorded; their mean JCTs."""
    seeds = [seed for seed, _ in plays]
    rec = _Recorder(hooks.policy(model))
    results = run_episodes(rec, seeds, hooks.train, templates=hooks.templates,
                           sequences=[sequence for _, sequence in plays])
    return [rec.episodes[s] for s in seeds], [float(r.avg_jct_s) for r in results]


def _valid_seeds(hooks: CJSOnline, model: NetLLM, seeds: list[int]) -> list[float]:
    results = run_episodes(hooks.policy(model), seeds, hooks.valid, templates=hooks.templates)
    return [float(r.avg_jct_s) for r in results]
