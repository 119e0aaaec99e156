"""CJS as a NetLLM task: the CLI-facing evaluation of schedulers on the Spark simulator,
pool collection, adaptation and the benchmark.

    netllm eval cjs --policy fifo --policy fair --policy decima --jobs 200 --executors 50 --seeds 1-10

A scheduler runs one full episode per seed (the seed draws the job sequence, the task
durations and a sampling scheduler's choices); the metric is the average job completion
time in seconds over the episode's jobs, lower is better.

The NetLLM scheduler (state tokens from the foundation's graph encoder over the active
job DAGs, ``features.py``; a score over the schedulable stages, a categorical head over
executor limits, return-conditioned offline RL, ``policy.py``) learns from a Decima pool
(``pool.py``):

    netllm collect cjs --policy decima --seeds 101-196 --out runs/pool-cjs-decima96
    netllm adapt cjs --pool runs/pool-cjs-decima96 --out runs/cjs-d96 --layers 4 --context 20 --steps 3000 \
        --schedule cosine --eval-every 500 --eval-jobs 100 --decode sample
    (those are the recipe's defaults: `netllm adapt cjs --pool runs/pool-cjs-decima96` is the same;
    the 96 sequences were chosen against 24 and 48 on the validation sequences 1001-1010)
    netllm eval cjs --policy runs/cjs-d96 --policy decima --seeds 1-10

The heads imitate Decima, which samples its choices; their arg-max hands out larger
executor limits than Decima would (``benchmarks/cjs_heads.py``), so a well-fitted
adapter is decoded by sampling (``--decode sample``, recorded in the adapter).

(``netllm collect cjs ... --keep best --draws 6`` keeps per job sequence the best of 6
sampled Decima episodes; ``--segment 600`` makes that choice every 600 simulated
seconds among continuations played from a fork of the simulator. ``netllm adapt cjs``
takes several ``--pool``.)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from netllm.finetune import FinetuneOptions, check_adapter, run_finetune
from netllm.model import ADAPTER_CONFIG, NetLLMConfig, read_adapter_config
from netllm.options import Options, opt, split_list
from netllm.recipe import TRAIN_SEEDS_HELP, Recipe, check_train_seeds, load_policy, train_variants
from netllm.results import combine_train_seeds, comparisons, print_comparisons, write_results
from netllm.tasks.base import Metrics, Task
from netllm.tasks.cjs.baselines import SCHEDULERS
from netllm.tasks.cjs.decima_online import NAME as DECIMA
from netllm.tasks.cjs.policy import (DECODE_HELP, CJSRecipe, NetLLMCJSPolicy, adapt, decode_temperature, model_config,
                                     recipe_of, speed_report)
from netllm.tasks.cjs.pool import collect_pool, load_pool, load_pools, make_baseline, pool_options
from netllm.tasks.cjs.sim import CJSConfig
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import NetLLMError, atomic_write_json, parse_seeds

console = Console()


def _play_seeds(policy: Any, seeds: list[int], config: CJSConfig, envs: int | None) -> list[Any]:
    return run_episodes(policy, seeds, config, envs=envs)


def evaluate(policy: Any, seeds: list[int], config: CJSConfig = CJSConfig(), envs: int | None = None) -> Metrics:
    """One episode per seed, ``envs`` simulators side by side (default: every seed at
    once) with their decisions batched (``vec.run_episodes``); per-seed average JCT (s),
    one row per job."""
    from netllm import parallel

    t0 = time.perf_counter()
    shards = parallel.split(len(seeds))
    if parallel.active() is None or len(shards) == 1:
        played = run_episodes(policy, seeds, config, envs=envs)
    else:  # seeds spread over the workers; every episode keeps its own streams
        parts = parallel.map(_play_seeds, [[seeds[i] for i in shard] for shard in shards],
                             parallel.shared_policy(policy), config, envs)
        played = [r for part in parts for r in part]
    wall = time.perf_counter() - t0
    rows = [{"seed": r.seed, **job.as_dict()} for r in played for job in r.records]
    parts = {"events_per_s": sum(r.num_events for r in played) / wall if wall else float("nan"),
             "decisions_per_episode": sum(r.num_decisions for r in played) / len(seeds),
             "wall_s": wall}
    return Metrics("jct_s", False, {r.seed: r.avg_jct_s for r in played}, parts=parts, rows=rows)


# ----------------------------------------------------------------------------- options


@dataclass
class CJSSetting(Options):
    """The simulated cluster and its job stream (the spec's defaults), and how NetLLM
    adapters among the policies decide."""

    jobs: int = opt(200, "Jobs per episode (TPC-H queries).", min=1)
    executors: int = opt(50, "Executors of the cluster.", min=1)
    arrival_rate: float = opt(4e-5, "Job arrivals per simulated ms (Poisson; 4e-5: one every 25 s).", min=0)
    decode: str | None = opt(None, DECODE_HELP + " Default: as the adapter's recipe was validated.")

    def check(self) -> None:
        super().check()
        if not self.arrival_rate > 0:
            raise NetLLMError(f"--arrival-rate: must be > 0, got {self.arrival_rate!r}")
        if self.decode is not None:
            decode_temperature(self.decode)

    def config(self) -> CJSConfig:
        return CJSConfig(num_jobs=self.jobs, num_executors=self.executors, arrival_rate=self.arrival_rate)


@dataclass
class CJSEvalOptions(CJSSetting):
    """``netllm eval cjs``: one episode per seed on this setting."""

    envs: int | None = opt(None, "Simulators run side by side, their decisions batched into one call per round "
                                 "(default: one per seed, all at once; 1: one at a time).", min=1)


@dataclass
class CJSCollectOptions(CJSSetting):
    """``netllm collect cjs``: one episode per (policy, seed), or a best-of pool."""

    gnn: str = opt("decima", "State features: the frozen pretrained Decima GNN, or the same network with "
                             "random weights (a control).", choices=("decima", "random"))
    keep: str = opt("all", "all: every episode; best: per job sequence the best of --draws sampled episodes.",
                    choices=("all", "best"))
    draws: int = opt(1, "Sampled episodes per (policy, job sequence) with --keep best.", min=1)
    segment: float = opt(0.0, "With --keep best: choose the best of --draws continuations every S simulated "
                              "seconds, on forks of the simulator (0: whole episodes).", min=0)

    def check(self) -> None:
        super().check()
        pool_options(self.keep, self.draws, self.segment)


@dataclass
class CJSAdaptOptions(CJSRecipe):
    pool: list[str] = opt([], "Experience pool from `netllm collect cjs` (repeat it for several).")

    def check(self) -> None:
        super().check()
        if not self.pool:
            raise NetLLMError("--pool: CJS adaptation needs an experience pool (netllm collect cjs ...)")
        for p in self.pool:
            if not Path(p).exists():
                raise NetLLMError(f"--pool {p}: no such pool file or folder")


# generalisation settings of the benchmark: CLI option values of CJSSetting
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "jobs400": {"jobs": 400}, "executors30": {"executors": 30},
                                       "executors80": {"executors": 80}, "rate2x": {"arrival_rate": 8e-5}}
CONTROLS = ("random",)


@dataclass
class CJSBenchOptions(CJSRecipe):
    """The whole pipeline; the recipe fields are the adaptation's (same defaults as adapt)."""

    seeds: str = opt("1-10", "Evaluation seeds (job sequences) of every setting.")
    train_seeds: str = opt("0", TRAIN_SEEDS_HELP)
    policies: str = opt("fifo,fair,decima", "Baselines evaluated beside the adapters (comma-separated).")
    pool_seeds: str = opt("101-196", "Job sequences of the pool's episodes (96: chosen on validation).")
    pool_jobs: int = opt(200, "Jobs per pool episode.", min=1)
    behaviour: str = opt("decima", "Schedulers that play the pool's episodes (comma-separated).")
    keep: str = opt("all", "Pool: all episodes, or per job sequence the best of --draws.", choices=("all", "best"))
    draws: int = opt(1, "Pool: sampled episodes per (policy, job sequence) with --keep best.", min=1)
    segment: float = opt(0.0, "Pool: best-of choice every S simulated seconds (0: whole episodes).", min=0)
    controls: str = opt("random", "Controls trained beside NetLLM: random (random LLM weights), none.")
    netllm: bool = opt(True, "Adapt and evaluate NetLLM (--no-netllm: the baselines only).")
    settings: str = opt("default,jobs400,executors30", "Evaluation settings: " + ", ".join(
        f"{k} ({', '.join(f'{a}={b:g}' for a, b in v.items()) or 'spec defaults'})" for k, v in SETTINGS.items()))

    def check(self) -> None:
        super().check()
        test, pool = set(parse_seeds(self.seeds)), set(parse_seeds(self.pool_seeds, "--pool-seeds"))
        check_train_seeds(self)
        if test & pool:  # the pool would have played the test's job sequences
            raise NetLLMError(f"--pool-seeds: job sequences {sorted(test & pool)[:5]} are also evaluation --seeds; "
                              "keep the pool's apart from the test's")
        if self.eval_seed in test | pool:
            raise NetLLMError(f"--eval-seed: {self.eval_seed} is also a {'test' if self.eval_seed in test else 'pool'} "
                              "job sequence; validate on one of its own")
        split_list(self.policies, "--policies", list(SCHEDULERS))
        split_list(self.behaviour, "--behaviour", list(SCHEDULERS))
        split_list(self.controls, "--controls", [*CONTROLS, "none"])
        split_list(self.settings, "--settings", list(SETTINGS))
        pool_options(self.keep, self.draws, self.segment)


@dataclass
class CJSFinetuneOptions(FinetuneOptions):
    """``netllm finetune cjs``: PPO in the simulator from an offline CJS adapter."""

    adapter: str = opt("", "The offline-adapted policy to start from (an adapter folder of this task), or "
                           "'decima': the control, the same PPO on Decima's own network from its published weights.")
    jobs: int = opt(50, "Jobs per training episode (shorter than evaluation's 200: more iterations).", min=1)
    executors: int = opt(50, "Executors of the cluster.", min=1)
    valid_seeds: str = opt("1001-1010", "Validation job sequences (never the test seeds 1-10).")
    valid_jobs: int = opt(100, "Jobs per validation episode.", min=1)
    group: int = opt(1, "Simulators per job sequence: with G >= 2 each sequence is played G times with their own "
                        "sampling streams and a decision's advantage is its return minus the group's mean return "
                        "at the same simulated time (Decima's input-dependent baseline) instead of GAE; must "
                        "divide --envs.", min=1)

    def single_process(self) -> str | None:
        return ("--adapter decima: runs in one process (no --workers, --ray-address or accelerate launch)"
                if self.adapter == DECIMA else None)

    def check(self) -> None:
        if self.adapter == DECIMA:  # the control: the same PPO on Decima's own network (decima_online.py)
            Options.check(self)
            if self.group < 2:
                raise NetLLMError("--group: fine-tuning Decima needs --group >= 2 (its advantages are taken "
                                  "against the group's mean return; it has no value head for GAE)")
        else:
            super().check()
            check_adapter(self.adapter, "cjs")
        if self.envs % self.group:
            raise NetLLMError(f"--group {self.group}: must divide --envs {self.envs}")
        valid = set(parse_seeds(self.valid_seeds, "--valid-seeds"))
        if valid & set(range(1, 11)):
            raise NetLLMError(f"--valid-seeds: {sorted(valid & set(range(1, 11)))} are test seeds; validate on "
                              "sequences of their own")


# ----------------------------------------------------------------------------- the task


class CJSTask(Task):
    name = "cjs"
    parallel = True  # eval and collect take --workers / --ray-address
    kind = "decision"
    metric = "jct_s"
    higher_is_better = False
    summary = "Spark cluster job scheduling (Decima's simulator, TPC-H jobs); average JCT, lower is better."
    serve_note = ("a decision needs the whole cluster state; use its scheduler in-process: "
                  "netllm.tasks.cjs.policy.NetLLMCJSPolicy.from_adapter")
    data_module = "netllm.tasks.cjs.datasets"
    Recipe = CJSRecipe
    AdaptOptions = CJSAdaptOptions
    EvalOptions = CJSEvalOptions
    CollectOptions = CJSCollectOptions
    BenchOptions = CJSBenchOptions
    FinetuneOptions = CJSFinetuneOptions

    def model_config(self, recipe: Recipe | None = None) -> NetLLMConfig:
        r = recipe if isinstance(recipe, CJSRecipe) else CJSRecipe()
        return model_config(llm=r.llm, layers=r.layers, rank=r.rank, context=r.context, pretrained=r.pretrained,
                            seed=r.seed)

    def baselines(self) -> dict[str, Callable[[Any], Any]]:
        return {name: (lambda options, n=name: make_baseline(n, options.config())) for name in SCHEDULERS}

    def policy_from_run(self, folder: Path, options: CJSSetting, device: str = "auto") -> Any:
        """A NetLLM adapter, decoded by ``options.decode`` (default: as its recipe says)."""
        from netllm.tasks.cjs.decima_online import is_decima_run, load_finetuned

        if is_decima_run(folder) and not (folder / ADAPTER_CONFIG).is_file():  # netllm finetune cjs --adapter decima
            return load_finetuned(folder)
        if not (folder / ADAPTER_CONFIG).is_file():
            raise NetLLMError(f"--policy {folder}: not a CJS adapter folder (no {ADAPTER_CONFIG}) nor a "
                              "fine-tuned Decima run")
        policy = NetLLMCJSPolicy.from_adapter(folder, device=device, decode=options.decode)
        if policy.sample:
            policy.name += "-sampled" + (f"-t{policy.temperature:g}" if policy.temperature != 1 else "")
        return policy

    def evaluate(self, policies: dict[str, Any], seeds: list[int], options: CJSSetting,
                 out: Path) -> dict[str, Metrics]:
        from netllm.tasks.cjs.jobs import load_all

        config = options.config()
        load_all()  # load (and hash-check) the TPC-H jobs once, outside the timings
        results: dict[str, Metrics] = {}
        for name, policy in policies.items():
            t0 = time.perf_counter()
            results[name] = evaluate(policy, seeds, config, envs=getattr(options, "envs", None))
            console.print(f"{name}: {time.perf_counter() - t0:.1f} s, "
                          f"{results[name].parts['events_per_s']:,.0f} simulated events/s")
        write_results(out, results, parts=("events_per_s", "decisions_per_episode"), cdf_key="jct_s",
                      title=f"CJS: {config.num_jobs} jobs, {config.num_executors} executors"
                            + (f", arrival rate {config.arrival_rate:g}/ms" if config.arrival_rate != 4e-5 else "")
                            + f" (seeds {seeds})")
        return results

    def collect(self, policies: list[str], seeds: list[int], options: CJSCollectOptions, out: Path) -> Path:
        """An experience pool, features from the frozen GNN: one episode per (policy, seed),
        or ``--draws N --keep best``: per job sequence the best of N sampled episodes, or
        with ``--segment S`` the best of N continuations every S simulated seconds."""
        pool = collect_pool(policies, seeds, options.config(), keep=options.keep, draws=options.draws,
                            segment_s=options.segment, gnn=options.gnn,
                            make=lambda name, _config: load_policy(self, name, options, "cpu"))
        path = pool.save(out / "pool.npz")
        console.print(f"pool: {pool.num_episodes} episodes, {len(pool)} decisions, "
                      f"up to {pool.meta['max_candidates']} candidates -> {path}")
        return path

    def adapt(self, out: Path, recipe: CJSAdaptOptions, device: str = "auto", resume: bool = False) -> Path:
        """DD-LRNA on one or more CJS pools (``--pool A --pool B``)."""
        return adapt(load_pools(recipe.pool), out, recipe_of(recipe), device=device, resume=resume)

    def finetune(self, options: CJSFinetuneOptions, out: Path, device: str = "auto", resume: bool = False) -> Path:
        """PPO from the offline adapter (``netllm.finetune``, hooks in ``online.py``); the
        best adapter on the validation job sequences goes to ``out``."""
        from netllm.model import NetLLM
        from netllm.tasks.cjs.features import load_gnn
        from netllm.tasks.cjs.jobs import load_all
        from netllm.tasks.cjs.online import CJSOnline

        base = 100_000 + options.seed * 1_000_000  # training job sequences: no test, validation or pool one

        def seeds_of(it: int) -> list[int]:
            return [base + (it - 1) * options.envs + j for j in range(options.envs)]

        if options.adapter == DECIMA:
            return self._finetune_decima(options, out, seeds_of, resume)
        config = read_adapter_config(options.adapter)
        extra = dict(config.get("extra") or {})
        if extra.get("target_return") is None:
            raise NetLLMError(f"--adapter {options.adapter}: its config has no target_return")
        load_all()
        model = NetLLM.from_adapter(options.adapter, task="cjs", device=device)
        ref = NetLLM.from_adapter(options.adapter, task="cjs", device=device, merge=True)
        hooks = CJSOnline(load_gnn(config.get("norm", {}).get("gnn", "decima")), float(extra["target_return"]),
                          CJSConfig(num_jobs=options.jobs, num_executors=options.executors),
                          CJSConfig(num_jobs=options.valid_jobs, num_executors=options.executors),
                          parse_seeds(options.valid_seeds, "--valid-seeds"), group=options.group,
                          reference=("decima", policy_by_name("decima", device=device)))
        extra["finetuned_from"] = str(options.adapter)
        return run_finetune(model, ref, hooks, options, out, seeds_of=seeds_of, extra=extra, resume=resume)

    def _finetune_decima(self, options: CJSFinetuneOptions, out: Path, seeds_of: Callable[[int], list[int]],
                         resume: bool) -> Path:
        from netllm import parallel
        from netllm.tasks.cjs.decima_online import finetune_decima
        from netllm.tasks.cjs.jobs import load_all
        from netllm.train import launched_processes

        if parallel.active() is not None or launched_processes() > 1:  # the CLI refuses it before writing
            raise NetLLMError(str(options.single_process()))
        load_all()
        return finetune_decima(options, out, seeds_of, CJSConfig(num_jobs=options.jobs,
                                                                 num_executors=options.executors),
                               CJSConfig(num_jobs=options.valid_jobs, num_executors=options.executors),
                               parse_seeds(options.valid_seeds, "--valid-seeds"), resume=resume)

    def bench(self, options: CJSBenchOptions, out: Path, device: str = "auto") -> dict[str, Any]:
        """Pool -> NetLLM adaptation (+ the random-init control) -> the baselines and the
        adapters on the default setting and generalisation settings; plus speed.
        The defaults are the README's best recipe: one Decima episode on
        each of the job sequences 101-196, the recipe's 3,000 cosine-decayed steps,
        validation every 500 steps, decisions sampled from the heads;
        ``--keep best --draws N [--segment S]`` builds a best-of pool (of episodes, or of
        S-second segments) instead.
        Finished stages are reused when run again with the same --out."""
        seed_list = parse_seeds(options.seeds)
        train_seeds = check_train_seeds(options)
        summary: dict[str, Any] = {"wall_s": {}, "train_seeds": train_seeds}
        names = split_list(options.policies, "--policies")
        label = f"netllm-{Path(options.llm).name}"
        variants: dict[str, CJSRecipe] = {}
        runs: dict[str, dict[int, Path]] = {}
        if options.netllm:
            pool_path = out / "pool.npz"
            if not pool_path.is_file():
                t0 = time.perf_counter()
                pool_setting = CJSCollectOptions(jobs=options.pool_jobs)
                collect_pool(split_list(options.behaviour, "--behaviour"), parse_seeds(options.pool_seeds),
                             pool_setting.config(), keep=options.keep, draws=options.draws,
                             segment_s=options.segment,
                             make=lambda name, _c: load_policy(self, name, pool_setting, device)).save(pool_path)
                summary["wall_s"]["pool"] = time.perf_counter() - t0
            pool = load_pool(pool_path)
            summary["pool"] = {"episodes": pool.num_episodes, "decisions": len(pool), **pool.meta}
            recipe = recipe_of(options)
            variants[label] = recipe
            if "random" in split_list(options.controls, "--controls"):
                variants[f"{label}-random-init"] = dataclasses.replace(recipe, pretrained=False)
            runs = train_variants(variants, train_seeds, out, len(pool), summary["wall_s"],
                                  train=lambda r, folder: adapt(pool, folder, r, device=device, resume=True))
        for setting_name in split_list(options.settings, "--settings"):
            setting = CJSEvalOptions.build(**SETTINGS[setting_name])
            console.print(f"[bold]setting {setting_name}[/bold]: {SETTINGS[setting_name] or 'spec defaults'}")
            policies = {n: load_policy(self, n, setting, device) for n in names}
            for name, folders in runs.items():
                for s, folder in folders.items():
                    policies[f"{name}-seed{s}"] = load_policy(self, str(folder), setting, device)
            # every run on its own (runs/), then each variant over its training seeds
            single = self.evaluate(policies, seed_list, setting, out / setting_name / "runs")
            results = {n: single[n] for n in names}
            for name, folders in runs.items():
                results[name] = combine_train_seeds({s: single[f"{name}-seed{s}"] for s in folders})
            write_results(out / setting_name, results, parts=("events_per_s", "decisions_per_episode"),
                          cdf_key="jct_s", title=f"CJS {setting_name} (seeds {options.seeds}, training seeds "
                                                 f"{options.train_seeds})")
            summary[setting_name] = {n: m.summary() for n, m in results.items()}
            if label in results:
                best = min(names, key=lambda n: results[n].mean)
                comps = comparisons(results, label, [best, *[n for n in runs if n != label]], trained=list(runs))
                print_comparisons(f"CJS {setting_name}: {label} minus ... (JCT in s, negative = NetLLM better); "
                                  f"best baseline: {best}", comps)
                summary[setting_name]["best_baseline"] = best
                summary[setting_name]["comparisons"] = comps
        if runs:
            summary["speed"] = speed_report(runs[label][train_seeds[0]], device=device)
            console.print(f"speed: {summary['speed']}")
        atomic_write_json(out / "bench.json", summary)
        return summary


def policy_by_name(name: str, options: CJSSetting | None = None, device: str = "auto") -> Any:
    """A baseline by name, or a trained adapter by folder (the framework's one way)."""
    return load_policy(TASK, name, options if options is not None else CJSEvalOptions(), device)


TASK = CJSTask()
