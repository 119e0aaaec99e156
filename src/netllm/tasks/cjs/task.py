"""CJS as a NetLLM task: evaluation of schedulers on the Spark simulator, and the
declaration of the NetLLM scheduler's modalities and heads.

    netllm eval cjs --policy fifo --policy fair --policy decima --jobs 200 --executors 50 --seeds 1-10

A scheduler runs one full episode per seed (the seed draws the job sequence, the task
durations and a sampling scheduler's choices); the metric is the average job completion
time in seconds over the episode's jobs, lower is better.

The NetLLM scheduler (state tokens from the foundation's graph encoder over the active
job DAGs, a score over the schedulable stages, a categorical head over executor limits,
return-conditioned offline RL on a Decima pool) lives in ``policy.py``:

    netllm collect cjs --policy decima --seeds 101-148 --out runs/pool-cjs-decima48
    netllm adapt cjs --pool runs/pool-cjs-decima48 --out runs/cjs-d48 --layers 4 --context 20 --steps 3000 \
        --schedule cosine --eval-every 500 --eval-jobs 100 --decode sample
    netllm eval cjs --policy runs/cjs-d48 --policy decima --seeds 1-10

The heads imitate Decima, which samples its choices; their arg-max hands out larger
executor limits than Decima would (``benchmarks/cjs_heads.py``), so a well-fitted
adapter is decoded by sampling (``--decode sample``, recorded in the adapter).

(``netllm collect cjs ... --keep best --draws 6`` keeps per job sequence the best of 6
sampled Decima episodes; ``--segment 600`` makes that choice every 600 simulated
seconds among continuations played from a fork of the simulator. ``netllm adapt cjs``
takes several ``--pool``.)
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console

from netllm.tasks.base import Metrics, Task
from netllm.tasks.cjs.baselines import SCHEDULERS, make_scheduler, run_episode
from netllm.tasks.cjs.sim import CJSConfig, CJSEnv
from netllm.utils import NetLLMError, atomic_write_json, prepare_run_dir

if TYPE_CHECKING:
    from netllm.model import NetLLMConfig

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


def pool_options(keep: str, draws: int | str, segment: float | str = 0) -> tuple[int, float]:
    """``--keep`` / ``--draws`` / ``--segment`` of a CJS pool, checked; returns
    (draws, segment seconds)."""
    if keep not in ("all", "best"):
        raise NetLLMError(f"--keep: 'all' or 'best', got {keep!r}")
    try:
        n = int(draws)
    except (TypeError, ValueError):
        raise NetLLMError(f"--draws: expected an integer, got {draws!r}") from None
    if n < 1:
        raise NetLLMError(f"--draws: must be >= 1, got {draws}")
    try:
        seg = float(segment)
    except (TypeError, ValueError):
        raise NetLLMError(f"--segment: expected seconds of simulated time, got {segment!r}") from None
    if not (seg >= 0 and math.isfinite(seg)):
        raise NetLLMError(f"--segment: must be >= 0 seconds (0: choose whole episodes), got {segment!r}")
    if seg > 0 and keep != "best":
        raise NetLLMError("--segment: chooses the best continuation, so it needs --keep best")
    return n, seg


def check_schedule(schedule: str) -> str:
    if schedule not in ("constant", "linear", "cosine"):
        raise NetLLMError(f"--schedule: constant, linear or cosine, got {schedule!r}")
    return schedule


def check_decode(decode: str | None) -> str | None:
    """``--decode`` (``argmax``, ``sample`` or ``sample:T``, see ``decode_temperature``);
    None: as the adapter's recipe says."""
    if decode is not None:
        from netllm.tasks.cjs.policy import decode_temperature

        decode_temperature(decode)
    return decode


def make_policy(name: str, config: CJSConfig, device: str = "auto", decode: str | None = None) -> Any:
    """A baseline by name, or a trained NetLLM adapter by folder, decoded by ``decode``
    (default: the decoding its recipe was validated with)."""
    path = Path(name)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from netllm.tasks.cjs.policy import NetLLMCJSPolicy

        policy = NetLLMCJSPolicy.from_adapter(path, device=device, decode=check_decode(decode))
        if policy.sample:
            policy.name += "-sampled" + (f"-t{policy.temperature:g}" if policy.temperature != 1 else "")
        return policy
    if path.exists() or "/" in name:
        raise NetLLMError(f"--policy: {name} is not an adapter folder (no adapter_config.json)")
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
        if hasattr(policy, "observe"):  # return-conditioned: it needs the rewards
            from netllm.tasks.cjs.policy import run_netllm_episode

            result = run_netllm_episode(env, policy, seed=seed)
        else:
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

    def model_config(self) -> "NetLLMConfig":
        from netllm.tasks.cjs.policy import model_config

        return model_config()

    def baselines(self) -> dict[str, Callable[..., Any]]:
        return {name: (lambda n=name: make_scheduler(n)) for name in SCHEDULERS}

    def evaluate(self, policy: Any, seeds: list[int], jobs: int = 200, executors: int = 50, **_: Any) -> Metrics:
        return evaluate(policy, seeds, env_config(jobs, executors))

    def eval_cli(self, policies: list[str], seeds: list[int], out: Path, device: str = "auto",
                 jobs: int | str = 200, executors: int | str = 50,
                 arrival_rate: float | str = 4e-5, decode: str | None = None) -> dict[str, Metrics]:
        from netllm.results import write_results

        from netllm.tasks.cjs.jobs import load_all

        config = env_config(jobs, executors, arrival_rate)
        check_decode(decode)
        made = [make_policy(p, config, device=device, decode=decode) for p in policies]  # fail fast on a bad name
        load_all()  # load (and hash-check) the TPC-H jobs once, outside the timings
        prepare_run_dir(out, {"command": "eval cjs", "policies": policies, "seeds": seeds, "decode": decode,
                              "jobs": config.num_jobs, "executors": config.num_executors,
                              "arrival_rate": config.arrival_rate})
        results: dict[str, Metrics] = {}
        for name, policy in zip(policies, made):
            t0 = time.perf_counter()
            name = getattr(policy, "name", name) if Path(name).is_dir() else name
            results[name] = evaluate(policy, seeds, config)
            console.print(f"{name}: {time.perf_counter() - t0:.1f} s, "
                          f"{results[name].parts['events_per_s']:,.0f} simulated events/s")
        write_results(out, results, parts=("events_per_s", "decisions_per_episode"), cdf_key="jct_s",
                      title=f"CJS: {config.num_jobs} jobs, {config.num_executors} executors"
                            + (f", arrival rate {config.arrival_rate:g}/ms" if config.arrival_rate != 4e-5 else "")
                            + f" (seeds {seeds})")
        return results

    def collect(self, policies: list[str], seeds: list[int], out: Path, jobs: int | str = 200,
                executors: int | str = 50, arrival_rate: float | str = 4e-5, gnn: str = "decima",
                keep: str = "all", draws: int | str = 1, segment: float | str = 0) -> Path:
        """An experience pool, features from the frozen GNN: one episode per (policy, seed),
        or ``--draws N --keep best``: per job sequence the best of N sampled episodes, or
        with ``--segment S`` the best of N continuations every S simulated seconds."""
        from netllm.tasks.cjs.policy import collect_pool

        config = env_config(jobs, executors, arrival_rate)
        draws, segment_s = pool_options(keep, draws, segment)
        for p in policies:
            make_policy(p, config)  # fail fast on a bad name
        prepare_run_dir(out, {"command": "collect cjs", "policies": policies, "seeds": seeds,
                              "jobs": config.num_jobs, "executors": config.num_executors,
                              "arrival_rate": config.arrival_rate, "gnn": gnn, "keep": keep, "draws": draws,
                              "segment_s": segment_s})
        pool = collect_pool(policies, seeds, config, keep=keep, draws=draws, segment_s=segment_s, gnn=gnn)
        path = pool.save(out / "pool.npz")
        console.print(f"pool: {pool.num_episodes} episodes, {len(pool)} decisions, "
                      f"up to {pool.meta['max_candidates']} candidates -> {path}")
        return path

    def adapt(self, pool: list[Path], out: Path, llm: str, device: str, layers: int | None, rank: int,
              steps: int | None, epochs: float | None, context: int, seeds: list[int], resume: bool,
              pretrained: bool, batch_size: int = 16, lr: float = 3e-4, eval_every: int = 0,
              eval_jobs: int = 50, schedule: str = "constant", decode: str = "argmax") -> Path:
        """DD-LRNA on one or more CJS pools (``--pool A --pool B``; ``--context 20`` is
        upstream's K)."""
        from netllm.tasks.cjs.policy import AdaptRecipe, adapt, load_pools

        check_schedule(schedule)
        check_decode(decode)
        data = load_pools(pool)
        recipe = AdaptRecipe(llm=llm, layers=layers if layers is not None else 4, rank=rank, context=context,
                             batch_size=int(batch_size), lr=float(lr), pretrained=pretrained, seed=seeds[0],
                             eval_every=int(eval_every), eval_jobs=int(eval_jobs), schedule=str(schedule),
                             decode=str(decode))
        if epochs is not None:
            recipe.steps = max(1, int(epochs * len(data) / recipe.batch_size))
        elif steps is not None:
            recipe.steps = steps
        prepare_run_dir(out, {"command": "adapt cjs", "pool": [str(p) for p in pool], **recipe.__dict__})
        adapter = adapt(data, out, recipe, device=device, resume=resume)
        console.print(f"adapter: {adapter}")
        return adapter

    def bench(self, out: Path, llm: str = "smollm2", device: str = "auto", seeds: str = "1-10",
              policies: str = "fifo,fair,decima", steps: int | str = 3000, layers: int | str = 4,
              context: int | str = 20, pool_seeds: str = "101-148", pool_jobs: int | str = 200,
              behaviour: str = "decima", keep: str = "all", draws: int | str = 1, segment: float | str = 0,
              schedule: str = "cosine", eval_every: int | str = 500, eval_jobs: int | str = 100,
              controls: str = "random", netllm: bool | str = True, decode: str = "sample",
              settings: str = "default,jobs400,executors30") -> dict[str, Any]:
        """Pool -> NetLLM adaptation (+ the random-init control) -> the baselines and the
        adapters on the default setting and generalisation settings; plus speed.
        The defaults are the README's best recipe (runs/cjs-d48): one Decima episode on
        each of the job sequences 101-148, 3,000 cosine-decayed steps, validation every
        500 steps, decisions sampled from the heads (validation and evaluation);
        ``--keep best --draws N [--segment S]`` builds a best-of pool (of episodes, or of
        S-second segments) instead.
        Finished stages are reused when run again with the same --out."""
        from netllm.model import ADAPTER_CONFIG
        from netllm.tasks.cjs.policy import AdaptRecipe, adapt, collect_pool, load_pool, speed_report
        from netllm.train import completed_steps
        from netllm.utils import parse_seeds

        seed_list = parse_seeds(seeds)
        steps, layers, context = int(steps), int(layers), int(context)
        draws, segment_s = pool_options(keep, draws, segment)
        check_schedule(schedule)
        check_decode(decode)
        use_netllm = str(netllm).lower() not in ("false", "0", "no")
        prepare_run_dir(out, {"command": "bench cjs", "seeds": seed_list, "policies": policies, "llm": llm,
                              "steps": steps, "layers": layers, "context": context, "pool_seeds": pool_seeds,
                              "pool_jobs": pool_jobs, "behaviour": behaviour, "keep": keep, "draws": draws,
                              "segment_s": segment_s, "schedule": schedule, "eval_every": eval_every,
                              "eval_jobs": eval_jobs,
                              "controls": controls, "decode": decode, "settings": settings})
        summary: dict[str, Any] = {"wall_s": {}}
        names = policies.split(",")
        if use_netllm:
            pool_path = out / "pool.npz"
            if not pool_path.is_file():
                t0 = time.perf_counter()
                collect_pool(behaviour.split(","), parse_seeds(pool_seeds), env_config(pool_jobs),
                             keep=keep, draws=draws, segment_s=segment_s).save(pool_path)
                summary["wall_s"]["pool"] = time.perf_counter() - t0
            pool = load_pool(pool_path)
            summary["pool"] = {"episodes": pool.num_episodes, "decisions": len(pool), **pool.meta}
            recipe = AdaptRecipe(llm=llm, layers=layers, context=context, steps=steps, schedule=schedule,
                                 eval_every=int(eval_every), eval_jobs=int(eval_jobs), decode=decode)
            runs = {f"netllm-{Path(llm).name}": recipe}
            if "random" in controls:
                runs[f"netllm-{Path(llm).name}-random-init"] = replace(recipe, pretrained=False)
            for name, recipe in runs.items():
                if (out / name / ADAPTER_CONFIG).is_file() and completed_steps(out / name / "train") >= recipe.steps:
                    continue
                t0 = time.perf_counter()
                adapt(pool, out / name, recipe, device=device, resume=True)
                summary["wall_s"][f"adapt {name}"] = time.perf_counter() - t0
            names += [str(out / name) for name in runs]
        all_settings = {"default": {}, "jobs400": {"jobs": 400}, "executors30": {"executors": 30},
                        "executors80": {"executors": 80}, "rate2x": {"arrival_rate": 8e-5}}
        for label in settings.split(","):
            if label not in all_settings:
                raise NetLLMError(f"--settings: unknown {label!r}; choose from {', '.join(all_settings)}")
            setting = all_settings[label]
            console.print(f"[bold]setting {label}[/bold]: {setting or 'spec defaults'}")
            results = self.eval_cli(names, seed_list, out / label, device=device, **setting)
            summary[label] = {n: m.summary() for n, m in results.items()}
        if use_netllm:
            summary["speed"] = speed_report(out / f"netllm-{Path(llm).name}", device=device)
            console.print(f"speed: {summary['speed']}")
        atomic_write_json(out / "bench.json", summary)
        return summary
