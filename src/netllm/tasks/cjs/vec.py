"""Many CJS simulators at once: N independent instances, one batched decision per round.

    results = run_episodes(policy, seeds=range(1, 11), config=CJSConfig(), envs=10)

Each instance is a plain ``CJSEnv`` with its own seed and random streams (job sequence,
task durations; a sampling policy draws from its own per-episode stream, or, like
Decima, from its simulator's as upstream did). In every round each running instance
waits for one decision; the policy answers all of them in ONE call (``act_batch``):
Decima's GNN runs over all the instances' job DAGs side by side, the NetLLM scheduler
asks its LLM once for every instance that has a stage to schedule (``rl.IncrementalPolicy``,
per-instance KV caches). Finished instances leave the batch; with fewer ``envs`` than
seeds a freed instance starts the next seed. A seed's episode therefore does not depend on
``envs`` or on which seeds share the batch: the same decisions as one at a time, for
deterministic and sampling policies alike.

The batch protocol is ``open(slots)``, ``start(slot, seed, env)``, ``act_batch(slots,
observations)``, ``end(slot)``, and ``observe(reward, slot)`` for a return-conditioned
policy. Decima and the NetLLM scheduler implement it; any other scheduler (``reset`` /
``act``) runs through ``PerSlot``, one copy per instance.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

from netllm.tasks.cjs.baselines import EpisodeResult
from netllm.tasks.cjs.sim import CJSAction, CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError


class PerSlot:
    """A plain scheduler (``reset(seed, rng)`` / ``act(obs)``) behind the batch protocol:
    one deep copy per instance, reset with its simulator's random stream (as ``run_episode``)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.name = getattr(scheduler, "name", type(scheduler).__name__)
        self.copies: list[Any] = []

    def open(self, slots: int) -> None:
        self.copies = [copy.deepcopy(self.scheduler) for _ in range(slots)]

    def start(self, slot: int, seed: int | None, env: CJSEnv) -> None:
        self.copies[slot].reset(seed, rng=env.rng)

    def act_batch(self, slots: Sequence[int], observations: Sequence[CJSObservation]) -> list[CJSAction]:
        return [self.copies[s].act(o) for s, o in zip(slots, observations)]

    def observe(self, reward: float, slot: int = 0) -> None:
        observe = getattr(self.copies[slot], "observe", None)
        if observe is not None:
            observe(reward)

    def end(self, slot: int) -> None:
        pass


def batch_policy(policy: Any) -> Any:
    """The policy itself if it decides in batches, else a ``PerSlot`` around it."""
    return policy if hasattr(policy, "act_batch") else PerSlot(policy)


def run_episodes(policy: Any, seeds: Sequence[int], config: CJSConfig = CJSConfig(), envs: int | None = None,
                 templates: Any = None, max_decisions: int | None = None,
                 sequences: Sequence[int] | None = None) -> list[EpisodeResult]:
    """One full episode per seed, ``envs`` simulators at a time (default: all seeds at
    once), decisions batched across them; results in the order of ``seeds``.
    ``sequences`` gives each episode another job sequence than its seed (the simulator is
    reset with it; the policy's sampling stream still comes from the seed): episodes that
    share a sequence play the same jobs with their own draws.
    ``max_decisions`` ends each episode early (timings). An episode's ``wall_s`` is the
    wall time from its start to its end, overlapping the others'."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise NetLLMError("--seeds: no seeds to run")
    sequences = seeds if sequences is None else [int(s) for s in sequences]
    if len(sequences) != len(seeds):
        raise NetLLMError(f"sequences: {len(sequences)} job sequences for {len(seeds)} episodes")
    if envs is not None and envs < 1:
        raise NetLLMError(f"--envs: must be >= 1, got {envs}")
    width = len(seeds) if envs is None else min(envs, len(seeds))
    batch = batch_policy(policy)
    name = getattr(policy, "name", getattr(batch, "name", "policy"))
    batch.open(width)
    observe = getattr(batch, "observe", None)
    queue = list(enumerate(seeds))
    running: dict[int, dict[str, Any]] = {}
    done: dict[int, EpisodeResult] = {}

    def launch(slot: int) -> None:
        index, seed = queue.pop(0)
        env = CJSEnv.from_config(config, templates=templates)
        obs, _ = env.reset(sequences[index])
        batch.start(slot, seed, env)
        running[slot] = {"env": env, "seed": seed, "index": index, "obs": obs, "reward": 0.0,
                         "t0": time.perf_counter()}

    for slot in range(width):
        launch(slot)
    while running:
        slots = sorted(running)
        actions = batch.act_batch(slots, [running[s]["obs"] for s in slots])
        for slot, action in zip(slots, actions):
            run = running[slot]
            env: CJSEnv = run["env"]
            run["obs"], reward, terminated, truncated, _ = env.step(action)
            if observe is not None:  # return-conditioned policies take the rewards
                observe(reward, slot)
            run["reward"] += reward
            if terminated or truncated or (max_decisions is not None and env.num_decisions >= max_decisions):
                done[run["index"]] = EpisodeResult(
                    scheduler=name, seed=run["seed"], avg_jct_s=env.avg_jct_s, total_reward=run["reward"],
                    num_events=env.num_events, num_decisions=env.num_decisions, sim_time_ms=env.wall_time_ms,
                    wall_s=time.perf_counter() - run["t0"], records=env.job_records())
                batch.end(slot)
                del running[slot]
                if queue:
                    launch(slot)
    return [done[i] for i in range(len(seeds))]
