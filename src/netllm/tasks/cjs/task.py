"""CJS as a NetLLM task: evaluation of schedulers on the Spark simulator, and the
declaration of the NetLLM scheduler's modalities and heads.

    netllm eval cjs --policy fifo --policy fair --policy decima --jobs 200 --executors 50 --seeds 1-10

A scheduler runs one full episode per seed (the seed draws the job sequence, the task
durations and a sampling scheduler's choices); the metric is the average job completion
time in seconds over the episode's jobs, lower is better.

The NetLLM scheduler (state tokens from the foundation's graph encoder over the active
job DAGs, a score over the schedulable stages, a categorical head over executor limits,
return-conditioned offline RL on a Decima pool) is declared here by ``encoders`` and
``heads``; its pool collection and adaptation are not built yet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.tasks.base import Metrics, Task
from netllm.tasks.cjs.baselines import SCHEDULERS, make_scheduler, run_episode
from netllm.tasks.cjs.sim import NUM_NODE_FEATURES, CJSConfig, CJSEnv
from netllm.utils import NetLLMError, atomic_write_json, prepare_run_dir

console = Console()


def env_config(jobs: int | str = 200, executors: int | str = 50, arrival_rate: float | str = 4e-5) -> CJSConfig:
    """The simulator settings from CLI values; a bad value names its option."""
    values: dict[str, Any] = {}
    for option, key, value, kind in (("--jobs", "num_jobs", jobs, int), ("--executors", "num_executors", executors, int),
                                     ("--arrival-rate", "arrival_rate", arrival_rate, float)):
        try:
            values[key] = kind(value)
        except (TypeError, ValueError):
            raise NetLLMError(f"{option}: expected a number, got {value!r}") from None
        if not values[key] > 0:
            raise NetLLMError(f"{option}: must be > 0, got {value!r}")
    return CJSConfig(**values)


def make_policy(name: str, config: CJSConfig) -> Any:
    if Path(name).is_dir():
        raise NetLLMError(f"--policy {name}: NetLLM CJS adapters are not supported yet; "
                          f"use one of {', '.join(SCHEDULERS)}")
    kwargs = {"num_executors": config.num_executors} if name.lower() in ("fifo", "fair") else {}
    try:
        return make_scheduler(name, **kwargs)
    except NetLLMError as err:
        raise NetLLMError(f"--policy: {err}") from None


def evaluate(policy: Any, seeds: list[int], config: CJSConfig = CJSConfig()) -> Metrics:
    """One episode per seed; per-seed average JCT (s), one row per job."""
    per_seed: dict[int, float] = {}
    rows: list[dict[str, Any]] = []
    events, wall, decisions = 0, 0.0, 0
    for seed in seeds:
        env = CJSEnv.from_config(config)
        result = run_episode(env, policy, seed=seed)
        per_seed[seed] = result.avg_jct_s
        events += result.num_events
        decisions += result.num_decisions
        wall += result.wall_s
        rows.extend({"seed": seed, **r.as_dict()} for r in result.records)
    parts = {"events_per_s": events / wall if wall else float("nan"),
             "decisions_per_episode": decisions / len(seeds)}
    return Metrics("jct_s", False, per_seed, parts=parts, rows=rows)


class CJSTask(Task):
    name = "cjs"
    kind = "decision"
    metric = "jct_s"
    higher_is_better = False

    def encoders(self) -> list[EncoderSpec]:
        return [EncoderSpec("dags", "graph", node_dim=NUM_NODE_FEATURES, embed_dim=16)]

    def heads(self) -> dict[str, HeadSpec]:
        return {"stage": HeadSpec("candidates", candidate_dim=16),
                "executors": HeadSpec("categorical", num_classes=CJSConfig().num_executors)}

    def baselines(self) -> dict[str, Callable[..., Any]]:
        return {name: (lambda n=name: make_scheduler(n)) for name in SCHEDULERS}

    def evaluate(self, policy: Any, seeds: list[int], jobs: int = 200, executors: int = 50, **_: Any) -> Metrics:
        return evaluate(policy, seeds, env_config(jobs, executors))

    def eval_cli(self, policies: list[str], seeds: list[int], out: Path, device: str = "auto",
                 jobs: int | str = 200, executors: int | str = 50,
                 arrival_rate: float | str = 4e-5) -> dict[str, Metrics]:
        from netllm.results import write_results

        from netllm.tasks.cjs.jobs import load_all

        config = env_config(jobs, executors, arrival_rate)
        made = [make_policy(p, config) for p in policies]  # fail fast on a bad name
        load_all()  # load (and hash-check) the TPC-H jobs once, outside the timings
        prepare_run_dir(out, {"command": "eval cjs", "policies": policies, "seeds": seeds,
                              "jobs": config.num_jobs, "executors": config.num_executors,
                              "arrival_rate": config.arrival_rate})
        results: dict[str, Metrics] = {}
        for name, policy in zip(policies, made):
            t0 = time.perf_counter()
            results[name] = evaluate(policy, seeds, config)
            console.print(f"{name}: {time.perf_counter() - t0:.1f} s, "
                          f"{results[name].parts['events_per_s']:,.0f} simulated events/s")
        write_results(out, results, parts=("events_per_s", "decisions_per_episode"), cdf_key="jct_s",
                      title=f"CJS: {config.num_jobs} jobs, {config.num_executors} executors (seeds {seeds})")
        return results

    def bench(self, out: Path, llm: str = "smollm2", device: str = "auto", seeds: str = "1-10",
              policies: str = "fifo,fair,decima") -> dict[str, Any]:
        """The baselines on the default setting and two generalisation settings."""
        from netllm.utils import parse_seeds

        seed_list = parse_seeds(seeds)
        prepare_run_dir(out, {"command": "bench cjs", "seeds": seed_list, "policies": policies})
        summary: dict[str, Any] = {}
        settings = {"default": {}, "jobs400": {"jobs": 400}, "executors30": {"executors": 30}}
        for label, setting in settings.items():
            console.print(f"[bold]setting {label}[/bold]: {setting or 'spec defaults'}")
            results = self.eval_cli(policies.split(","), seed_list, out / label, device=device, **setting)
            summary[label] = {n: m.summary() for n, m in results.items()}
        atomic_write_json(out / "bench.json", summary)
        return summary
