"""ABR with NetLLM: state tokens, episodes, evaluation, experience pools, adaptation.

The data flow:  traces + video -> BatchABREnv -> (baseline | NetLLM policy) -> QoE
                pool (collect)  -> DD-LRNA adaptation (adapt) -> adapter folder
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import ADAPTER_CONFIG, BestAdapter, NetLLM, NetLLMConfig, read_adapter_config
from netllm.rl import ExperiencePool, IncrementalPolicy, RLSpec, WindowSampler, action_loss, target_return
from netllm.tasks.base import Metrics, Task
from netllm.train import completed_steps
from netllm.utils import NetLLMError, prepare_run_dir, seed_everything

console = Console()

NUM_LEVELS = 6
REBUFFER_PENALTY = 4.3
# one token each, in this order, per decision step (the spec's six state tokens)
STATE_TOKENS = ("last_bitrate", "buffer", "throughput", "download_time", "next_sizes", "chunks_left")
RETURN_SCALE = 10.0  # returns-to-go are O(1-20) after this scaling


def obs_states(obs: np.ndarray) -> dict[str, np.ndarray]:
    """Split Pensieve's 6x6 observations (N, 6, 6) into the six state modalities."""
    obs = np.asarray(obs, dtype=np.float32)
    return {
        "last_bitrate": obs[:, 0, -1:],
        "buffer": obs[:, 1, -1:],
        "throughput": obs[:, 2, :],
        "download_time": obs[:, 3, :],
        "next_sizes": obs[:, 4, :NUM_LEVELS],
        "chunks_left": obs[:, 5, -1:],
    }


def model_config(*, llm: str = "smollm2", layers: int | None = 6, rank: int = 16, context: int = 10,
                 pretrained: bool = True, seed: int = 0) -> NetLLMConfig:
    """NetLLM for ABR: six state tokens per step, a categorical head over the 6 levels."""
    return NetLLMConfig(
        task="abr", llm=llm, layers=layers, lora=LoraSpec(rank=rank), pretrained=pretrained, seed=seed,
        encoders=[
            EncoderSpec("last_bitrate", "scalar", in_dim=1),
            EncoderSpec("buffer", "scalar", in_dim=1),
            EncoderSpec("throughput", "series", length=6),
            EncoderSpec("download_time", "series", length=6),
            EncoderSpec("next_sizes", "series", length=NUM_LEVELS),
            EncoderSpec("chunks_left", "scalar", in_dim=1),
        ],
        heads={"action": HeadSpec("categorical", num_classes=NUM_LEVELS)},
        rl=RLSpec(state_modalities=STATE_TOKENS, context_steps=context, num_actions=NUM_LEVELS,
                  max_timestep=64, return_scale=RETURN_SCALE),
        norm={"return_scale": RETURN_SCALE, "observation": "pensieve-6x6"},
    )


# ----------------------------------------------------------------------------- episodes


@dataclass
class Episodes:
    """Per-decision results of N traces played in lock-step: arrays (N, T)."""

    qoe: np.ndarray
    bitrate_mbps: np.ndarray
    rebuffer_s: np.ndarray
    smoothness_mbps: np.ndarray
    levels: np.ndarray
    states: dict[str, np.ndarray] | None = None  # recorded observations (N, T, ...)


def qoe_of(info: dict[str, np.ndarray]) -> np.ndarray:
    return info["bitrate_mbps"] - REBUFFER_PENALTY * info["rebuffer_s"] - info["smoothness_mbps"]


def run_episodes(policy: Any, traces: Sequence[Any], video: Any, seed: int, record: bool = False,
                 **env_options: Any) -> Episodes:
    """Play one video on every trace with ``policy`` (the reset chunk is not scored).
    ``env_options`` go to BatchABREnv (noise, random_start, start_indices)."""
    from netllm.tasks.abr.env import BatchABREnv

    env = BatchABREnv(traces, video, **env_options)
    obs, info = env.reset(seed)
    policy.reset(env, seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("qoe", "bitrate_mbps", "rebuffer_s", "smoothness_mbps",
                                                         "levels")}
    seen: list[dict[str, np.ndarray]] = []
    done = np.zeros(env.num_envs, dtype=bool)
    while not done.all():
        levels = np.asarray(policy.act(obs, info), dtype=np.int64)
        if record:
            seen.append(obs_states(obs))
        obs, reward, done, info = env.step(levels)
        cols["qoe"].append(np.asarray(reward, dtype=np.float64))
        cols["bitrate_mbps"].append(info["bitrate_mbps"])
        cols["rebuffer_s"].append(info["rebuffer_s"])
        cols["smoothness_mbps"].append(info["smoothness_mbps"])
        cols["levels"].append(levels)
    arrays = {k: np.stack(v, axis=1) for k, v in cols.items()}
    states = {k: np.stack([s[k] for s in seen], axis=1) for k in STATE_TOKENS} if record else None
    return Episodes(states=states, **arrays)


# ----------------------------------------------------------------------------- NetLLM policy


class NetLLMABRPolicy:
    """A trained adapter behind the baselines' interface, deciding with the KV cache."""

    def __init__(self, model: NetLLM, target: float, sample: bool = False, name: str = "netllm",
                 use_cache: bool = True) -> None:
        self.model, self.target, self.sample, self.name = model, target, sample, name
        self.use_cache = use_cache  # False recomputes the whole context per decision (a benchmark control)
        self.inc: IncrementalPolicy | None = None
        self.last_levels: np.ndarray | None = None

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto", target: float | None = None,
                     sample: bool = False) -> "NetLLMABRPolicy":
        config = read_adapter_config(folder)
        model = NetLLM.from_adapter(folder, task="abr", device=device)
        goal = target if target is not None else float(config.get("extra", {}).get("target_return", 40.0))
        return cls(model, goal, sample=sample, name=Path(folder).name)

    def reset(self, env: Any, seed: int) -> None:
        self.inc = IncrementalPolicy(self.model, target=self.target, batch_size=env.num_envs,
                                     use_cache=self.use_cache)
        self.last_levels = None
        self.rng = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        assert self.inc is not None, "reset() first"
        if self.last_levels is not None:
            self.inc.record(torch.as_tensor(self.last_levels), torch.as_tensor(qoe_of(info), dtype=torch.float32))
        states = {k: torch.from_numpy(v) for k, v in obs_states(obs).items()}
        logits = self.model.heads["action"](self.inc.decide(states))
        if self.sample:
            probs = torch.softmax(logits.float().cpu(), dim=-1)
            levels = torch.multinomial(probs, 1, generator=self.rng)[:, 0]
        else:
            levels = logits.argmax(-1).cpu()
        self.last_levels = levels.numpy().astype(np.int64)
        return self.last_levels


def make_policy(name: str, device: str = "auto") -> Any:
    """A baseline by name, or a trained adapter by folder."""
    path = Path(name)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return NetLLMABRPolicy.from_adapter(path, device=device)
    if path.exists() or "/" in name:
        raise NetLLMError(f"--policy: {name} is not an adapter folder (no adapter_config.json)")
    from netllm.tasks.abr.baselines import make_baseline

    return make_baseline(name)


# ----------------------------------------------------------------------------- evaluation


def env_setting(traces: str | Path, setting: str = "upstream") -> dict[str, Any]:
    """How episodes start. ``upstream``: as the reference numbers were measured — no
    delay noise and the trace set's fixed start positions (fcc-test ships them); seeds
    then only change stochastic policies. ``random``: delay noise and seeded random
    start positions. A trace set without fixed positions always uses ``random``."""
    from netllm.tasks.abr.traces import upstream_start_indices

    if setting not in ("upstream", "random"):
        raise NetLLMError(f"--setting: 'upstream' or 'random', got {setting!r}")
    if setting == "upstream":
        starts = upstream_start_indices(traces)
        if starts is not None:
            return {"noise": False, "start_indices": starts}
    return {}


def evaluate(policy: Any, traces: Sequence[Any], video: Any, seeds: Sequence[int], **env_options: Any) -> Metrics:
    """Mean per-chunk QoE over every chunk of every trace, for each seed."""
    per_seed: dict[int, float] = {}
    parts: dict[str, list[float]] = {"bitrate_mbps": [], "rebuffer_s": [], "smoothness_mbps": []}
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        ep = run_episodes(policy, traces, video, seed, **env_options)
        per_seed[int(seed)] = float(ep.qoe.mean())
        for k in parts:
            parts[k].append(float(getattr(ep, k).mean()))
        for i, trace in enumerate(traces):
            rows.append({"seed": seed, "trace": trace.name, "video": video.name, "qoe": float(ep.qoe[i].mean()),
                         "bitrate_mbps": float(ep.bitrate_mbps[i].mean()),
                         "rebuffer_s": float(ep.rebuffer_s[i].mean()),
                         "smoothness_mbps": float(ep.smoothness_mbps[i].mean())})
    return Metrics(metric="qoe", higher_is_better=True, per_seed=per_seed,
                   parts={k: float(np.mean(v)) for k, v in parts.items()}, rows=rows)


def collect_pool(policies: Sequence[str], traces: Sequence[Any], video: Any, seeds: Sequence[int],
                 keep: str = "all") -> ExperiencePool:
    """Trajectories of existing policies on every (trace, seed).

    ``keep="all"``: one episode per (policy, seed, trace). ``keep="best"``: for every
    (trace, seed) only the episode of the policy with the highest return. All policies
    meet the same network conditions there (start position and delay noise are drawn
    from (seed, trace)), so this keeps the best logged behaviour per condition — filtered
    behaviour cloning, instead of a pool whose returns mostly say how good the trace was.
    """
    if keep not in ("all", "best"):
        raise NetLLMError(f"--keep: 'all' or 'best', got {keep!r}")
    per_policy: list[list[dict[str, Any]]] = []
    for name in policies:
        policy, episodes = make_policy(name), []
        for seed in seeds:
            ep = run_episodes(policy, traces, video, seed, record=True)
            assert ep.states is not None
            for i in range(len(traces)):
                episodes.append({"states": {k: v[i] for k, v in ep.states.items()},
                                 "actions": ep.levels[i], "rewards": ep.qoe[i]})
            console.print(f"collected {name} seed {seed}: {len(traces)} episodes, mean QoE {ep.qoe.mean():.3f}")
        per_policy.append(episodes)
    meta: dict[str, Any] = {"task": "abr", "policies": list(policies), "seeds": list(seeds), "video": video.name,
                            "traces": [t.name for t in traces], "keep": keep}
    if keep == "all":
        return ExperiencePool.from_episodes([ep for eps in per_policy for ep in eps], meta=meta)
    returns = np.array([[float(np.sum(ep["rewards"])) for ep in eps] for eps in per_policy])  # (P, seeds*traces)
    best = returns.argmax(axis=0)
    meta["kept"] = {name: int((best == i).sum()) for i, name in enumerate(policies)}
    console.print(f"kept the best policy per (trace, seed): {meta['kept']}, mean return "
                  f"{returns.max(axis=0).mean():.2f} (per policy: "
                  + ", ".join(f"{n} {r:.2f}" for n, r in zip(policies, returns.mean(axis=1))) + ")")
    return ExperiencePool.from_episodes([per_policy[p][j] for j, p in enumerate(best)], meta=meta)


def collect_pools(policies: Sequence[str], traces: Sequence[Any], videos: Sequence[Any], seeds: Sequence[int],
                  keep: str = "all") -> ExperiencePool:
    """:func:`collect_pool` on each video, in one pool (meta["video"] lists them)."""
    pools = [collect_pool(policies, traces, v, seeds, keep=keep) for v in videos]
    if len(pools) == 1:
        return pools[0]
    meta = {**pools[0].meta, "video": ",".join(v.name for v in videos)}
    if keep == "best":
        meta["kept"] = {v.name: p.meta["kept"] for v, p in zip(videos, pools)}
    return ExperiencePool.concat(pools, meta=meta)


@dataclass
class AdaptRecipe:
    """Every hyper-parameter of ABR adaptation, visible in one place."""

    llm: str = "smollm2"
    layers: int | None = 6
    rank: int = 16
    context: int = 10
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    target_quantile: float = 0.9
    eval_every: int = 250
    eval_traces: int = 20
    pretrained: bool = True
    seed: int = 0


def adapt(pool: ExperiencePool, out: Path, recipe: AdaptRecipe, *, device: str = "auto", resume: bool = False,
          eval_traces: Sequence[Any] | None = None, eval_video: Any = None, progress: bool = True) -> Path:
    """DD-LRNA for ABR: return-conditioned offline RL on the pool; returns the adapter folder."""
    from netllm.train import TrainConfig, train

    seed_everything(recipe.seed)
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, context=recipe.context,
                          pretrained=recipe.pretrained, seed=recipe.seed)
    model = NetLLM(config, device=device)
    sampler = WindowSampler(pool, config.rl, batch_size=recipe.batch_size, seed=recipe.seed)
    goal = target_return(pool, recipe.target_quantile)

    t0 = time.perf_counter()
    keeper = BestAdapter(out, "qoe", higher_is_better=True, extra=lambda: {
        "target_return": goal, "recipe": recipe.__dict__, "pool": pool.meta,
        "train_seconds": time.perf_counter() - t0})

    eval_fn: Callable[[Any, int], dict[str, float]] | None = None
    if eval_traces:
        def eval_fn(m: Any, step: int) -> dict[str, float]:
            qoe = evaluate(NetLLMABRPolicy(m, goal), eval_traces, eval_video, [1]).mean
            keeper.update(m, qoe, step)  # keep the checkpoint that is best on the validation traces
            return {"qoe": qoe}

    train_config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                               weight_decay=recipe.weight_decay, eval_every=recipe.eval_every,
                               checkpoint_every=max(recipe.steps // 10, 50), log_every=10, seed=recipe.seed,
                               progress=progress)
    train(model, sampler.batch, action_loss, train_config, out / "train", eval_fn=eval_fn, resume=resume)
    return keeper.finish(model)


class ABRTask(Task):
    name = "abr"
    kind = "decision"
    metric = "qoe"
    higher_is_better = True

    def model_config(self) -> NetLLMConfig:
        return model_config()

    def baselines(self) -> dict[str, Callable[..., Any]]:
        from netllm.tasks.abr.baselines import BASELINES, make_baseline

        return {name: (lambda n=name: make_baseline(n)) for name in BASELINES}

    def evaluate(self, policy: Any, seeds: list[int], traces: str = "fcc-test", video: str = "video1",
                 **_: Any) -> Metrics:
        from netllm.tasks.abr.traces import load_traces, load_video

        return evaluate(policy, load_traces(traces), load_video(video), seeds)

    # -- CLI -----------------------------------------------------------------------------

    def eval_cli(self, policies: list[str], seeds: list[int], out: Path, device: str = "auto",
                 traces: str = "fcc-test", video: str = "video1", setting: str = "upstream") -> dict[str, Metrics]:
        from netllm.results import write_results
        from netllm.tasks.abr.traces import load_traces, load_video

        trace_set, vid = load_traces(traces), load_video(video)
        env_options = env_setting(traces, setting)
        made = [make_policy(p, device=device) for p in policies]  # fail fast on a bad name
        prepare_run_dir(out, {"command": "eval abr", "policies": policies, "seeds": seeds, "traces": traces,
                              "video": video, "setting": "upstream" if env_options else "random"})
        console.print("setting: " + ("upstream (no delay noise, fixed start positions)" if env_options
                                     else "random (delay noise, seeded random start positions)"))
        results: dict[str, Metrics] = {}
        for name, policy in zip(policies, made):
            t0 = time.perf_counter()
            results[getattr(policy, "name", name) if Path(name).is_dir() else name] = evaluate(
                policy, trace_set, vid, seeds, **env_options)
            console.print(f"{name}: {time.perf_counter() - t0:.1f} s")
        write_results(out, results, title=f"ABR on {traces} / {vid.name} ({len(trace_set)} traces, seeds {seeds})",
                      parts=("bitrate_mbps", "rebuffer_s", "smoothness_mbps"),
                      reference="oracle" if "oracle" in results else None, cdf_key="qoe")
        return results

    def collect(self, policies: list[str], seeds: list[int], out: Path, traces: str = "fcc-train",
                video: str = "video1", keep: str = "all") -> Path:
        """``--video video1,video2``: episodes on each video; ``--keep best``: per (trace,
        seed[, video]) only the best policy's episode (see collect_pool)."""
        from netllm.tasks.abr.traces import load_traces, load_video

        if keep not in ("all", "best"):
            raise NetLLMError(f"--keep: 'all' or 'best', got {keep!r}")
        trace_set, videos = load_traces(traces), [load_video(v) for v in str(video).split(",")]
        prepare_run_dir(out, {"command": "collect abr", "policies": policies, "seeds": seeds, "traces": traces,
                              "video": video, "keep": keep})
        pool = collect_pools(policies, trace_set, videos, seeds, keep=keep)
        path = pool.save(out / "pool.npz")
        console.print(f"pool: {pool.num_episodes} episodes, {len(pool)} steps -> {path}")
        return path

    def adapt(self, pool: list[Path], out: Path, llm: str, device: str, layers: int | None, rank: int,
              steps: int | None, epochs: float | None, context: int, seeds: list[int], resume: bool,
              pretrained: bool, batch_size: int = 16, lr: float = 3e-4, eval_traces: str = "fcc-valid",
              video: str = "video1") -> Path:
        from netllm.tasks.abr.traces import load_traces, load_video

        if not pool:
            raise NetLLMError("--pool: ABR adaptation needs an experience pool (netllm collect abr ...)")
        data = ExperiencePool.concat([ExperiencePool.load(p, task="abr") for p in pool]) if len(pool) > 1 \
            else ExperiencePool.load(pool[0], task="abr")
        recipe = AdaptRecipe(llm=llm, layers=layers if layers is not None else 6, rank=rank, context=context,
                             batch_size=int(batch_size), lr=float(lr), pretrained=pretrained, seed=seeds[0])
        if epochs is not None:
            recipe.steps = max(1, int(epochs * len(data) / recipe.batch_size))
        elif steps is not None:
            recipe.steps = steps
        prepare_run_dir(out, {"command": "adapt abr", "pool": [str(p) for p in pool], **recipe.__dict__})
        evals = load_traces(eval_traces)[: recipe.eval_traces] if eval_traces else None
        adapter = adapt(data, out, recipe, device=device, resume=resume, eval_traces=evals,
                        eval_video=load_video(video))
        console.print(f"adapter: {adapter}")
        return adapter

    # -- demo and benchmark ----------------------------------------------------------------

    def demo(self, llm: str = "smollm2", device: str = "auto", out: Path = Path("runs/demo-abr"),
             steps: int = 400, layers: int = 4) -> dict[str, Metrics]:
        """Train a small ABR adapter (minutes on 2 cores) and compare it with the baselines."""
        from netllm.results import write_results

        train_traces, test_traces, video, source = demo_data()
        console.print(f"[bold]NetLLM ABR demo[/bold] — data: {source}")
        names = ["bba", "mpc"] + (["genet"] if _genet_available() else [])
        behaviour = "genet" if "genet" in names else "mpc"
        prepare_run_dir(out, {"command": "demo", "llm": llm, "steps": steps, "layers": layers, "data": source})
        pool = collect_pool([behaviour], train_traces, video, seeds=[1])
        recipe = AdaptRecipe(llm=llm, layers=layers, steps=steps, eval_every=0, warmup_steps=min(50, steps // 4))
        t0 = time.perf_counter()
        adapter = adapt(pool, out, recipe, device=device, eval_traces=None)
        console.print(f"adapted {llm} ({layers} layers, LoRA r={recipe.rank}) in {time.perf_counter() - t0:.0f} s")
        env = env_setting("fcc-test") if source.startswith("real") else {}
        results = {n: evaluate(make_policy(n), test_traces, video, [1], **env) for n in names}
        results[f"netllm-{llm}"] = evaluate(NetLLMABRPolicy.from_adapter(adapter, device=device), test_traces,
                                            video, [1], **env)
        write_results(out, results, title=f"ABR demo ({source}; seed 1)",
                      parts=("bitrate_mbps", "rebuffer_s", "smoothness_mbps"), cdf_key="qoe")
        return results

    def bench(self, out: Path, llm: str = "smollm2", device: str = "auto", steps: int | str = 2000,
              layers: int | str = 4, context: int | str = 10, pool_seeds: str = "1-2", seeds: str = "1-3",
              behaviour: str = "genet,mpc,bba", videos: str = "video1,video2", controls: str = "random,scratch",
              baselines: str = "bba,mpc,genet,oracle", keep: str = "best",
              pool_videos: str = "video1,video2") -> dict[str, Any]:
        """The whole pipeline: pool -> adaptation (+ controls) -> evaluation on fcc-test.

        The pool: ``--behaviour`` policies on fcc-train with ``--pool-videos``, seeds
        ``--pool-seeds``; ``--keep best`` keeps the best policy's episode per condition.
        The defaults are the README's winning recipe (best of GENET / MPC / BBA over
        both videos, SmolLM2 cut to 4 layers, 2,000 steps).
        Finished stages are reused when the benchmark is run again with the same --out.
        """
        from netllm.results import write_results
        from netllm.tasks.abr.traces import load_traces, load_video
        from netllm.utils import atomic_write_json, parse_seeds

        steps, layers, context = int(steps), int(layers), int(context)
        eval_seeds = parse_seeds(seeds)
        prepare_run_dir(out, {"command": "bench abr", "llm": llm, "steps": steps, "layers": layers,
                              "context": context, "pool_seeds": pool_seeds, "seeds": eval_seeds,
                              "behaviour": behaviour, "videos": videos, "controls": controls, "keep": keep,
                              "pool_videos": pool_videos})
        summary: dict[str, Any] = {"wall_s": {}}
        pool_path = out / "pool.npz"
        if not pool_path.is_file():
            t0 = time.perf_counter()
            pool = collect_pools(behaviour.split(","), load_traces("fcc-train"),
                                 [load_video(v) for v in pool_videos.split(",")], parse_seeds(pool_seeds), keep=keep)
            pool.save(pool_path)
            summary["wall_s"]["pool"] = time.perf_counter() - t0
        pool = ExperiencePool.load(pool_path, task="abr")
        summary["pool"] = {"episodes": pool.num_episodes, "steps": len(pool), **pool.meta}
        runs = {f"netllm-{Path(llm).name}": AdaptRecipe(llm=llm, layers=layers, context=context, steps=steps)}
        if "random" in controls:
            runs[f"netllm-{Path(llm).name}-random-init"] = AdaptRecipe(
                llm=llm, layers=layers, context=context, steps=steps, pretrained=False)
        if "scratch" in controls:
            runs["dt-scratch"] = AdaptRecipe(llm="scratch", layers=3, rank=0, context=context, steps=steps,
                                             lr=3e-4)
        valid = load_traces("fcc-valid")[:20]
        for name, recipe in runs.items():
            if (out / name / ADAPTER_CONFIG).is_file() and completed_steps(out / name / "train") >= recipe.steps:
                continue
            t0 = time.perf_counter()
            adapt(pool, out / name, recipe, device=device, resume=True, eval_traces=valid,
                  eval_video=load_video("video1"))
            summary["wall_s"][f"adapt {name}"] = time.perf_counter() - t0
        test = load_traces("fcc-test")
        test_env = env_setting("fcc-test")
        for video_name in videos.split(","):
            video = load_video(video_name)
            results: dict[str, Metrics] = {}
            for b in baselines.split(","):
                if b == "genet" and not _genet_available():
                    continue
                results[b] = evaluate(make_policy(b), test, video, eval_seeds, **test_env)
            for name in runs:
                t0 = time.perf_counter()
                results[name] = evaluate(NetLLMABRPolicy.from_adapter(out / name, device=device), test, video,
                                         eval_seeds, **test_env)
                summary["wall_s"][f"eval {name} {video_name}"] = time.perf_counter() - t0
            write_results(out / video_name, results, title=f"ABR on fcc-test / {video_name} (seeds {seeds})",
                          parts=("bitrate_mbps", "rebuffer_s", "smoothness_mbps"),
                          reference="oracle" if "oracle" in results else None, cdf_key="qoe")
            summary[video_name] = {n: m.summary() for n, m in results.items()}
        summary["speed"] = speed_report(out / next(iter(runs)), device=device)
        atomic_write_json(out / "bench.json", summary)
        console.print(f"written: {out / 'bench.json'}")
        return summary


def _genet_available() -> bool:
    try:
        from netllm.data import dataset_path

        dataset_path("abr", "pretrained", "genet_actor.npz")
        return True
    except NetLLMError:
        return False


def demo_data() -> tuple[list[Any], list[Any], Any, str]:
    """Real FCC traces and video1 when present, generated ones otherwise (said so)."""
    from netllm.tasks.abr.traces import load_traces, load_video, synthetic_traces, synthetic_video

    try:
        return (load_traces("fcc-train")[:100], load_traces("fcc-test"), load_video("video1"),
                "real FCC traces (fcc-train / fcc-test), video1")
    except NetLLMError:
        return (synthetic_traces(100, seed=1), synthetic_traces(50, seed=2), synthetic_video(seed=0),
                "GENERATED traces and video (no real data found: run 'netllm data fetch abr' or set NETLLM_DATA)")


def speed_report(adapter: Path, device: str = "auto", traces: int = 100) -> dict[str, float]:
    """Simulated chunks/s (batched vs one trace at a time) and NetLLM decision latency
    with the KV cache vs full recompute, on real-shaped observations."""
    from netllm.tasks.abr.env import benchmark_chunks_per_s
    from netllm.tasks.abr.traces import load_traces, load_video

    report: dict[str, float] = dict(benchmark_chunks_per_s(load_traces("fcc-test")[:traces], load_video("video1")))
    one = load_traces("fcc-test")[:1]
    video = load_video("video1")
    policy = NetLLMABRPolicy.from_adapter(adapter, device=device)
    for use_cache in (True, False):
        policy.use_cache = use_cache
        t0 = time.perf_counter()
        ep = run_episodes(policy, one, video, seed=1)
        per_decision = (time.perf_counter() - t0) / ep.qoe.shape[1]
        report["decision_ms_kv_cache" if use_cache else "decision_ms_full_recompute"] = per_decision * 1e3
    return report
