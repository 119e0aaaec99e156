"""ABR with NetLLM: state tokens, episodes, evaluation, experience pools, adaptation.

The data flow:  traces + video -> BatchABREnv -> (baseline | NetLLM policy) -> QoE
                pool (collect)  -> DD-LRNA adaptation (adapt) -> adapter folder
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec, stable_argmax
from netllm.model import ADAPTER_CONFIG, NetLLM, NetLLMConfig, read_adapter_config
from netllm.rl import ExperiencePool, IncrementalPolicy, RLSpec, WindowSampler, action_loss, target_return
from netllm.tasks.base import Metrics, Task
from netllm.options import Options, opt, split_list
from netllm.recipe import (TRAIN_SEEDS_HELP, Recipe, check_train_seeds, decision_speed, run_adaptation, stage_done,
                           train_variants)
from netllm.results import combine_train_seeds, comparisons, print_comparisons
from netllm.finetune import FinetuneOptions, check_adapter, run_finetune
from netllm.utils import NetLLMError, seed_everything
from netllm.tasks.abr.serve import FALLBACKS as ABR_FALLBACKS, ABRServeOptions

console = Console()

NUM_LEVELS = 6
REBUFFER_PENALTY = 4.3
# one token each, in this order, per decision step (the spec's six state tokens)
STATE_TOKENS = ("last_bitrate", "buffer", "throughput", "download_time", "next_sizes", "chunks_left")
RETURN_SCALE = 10.0  # returns-to-go are O(1-20) after this scaling
DEMO_STEPS, DEMO_EVAL_EVERY = 800, 100  # the demo's budget (see run_demo)


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
        obs, reward, terminated, truncated, info = env.step(levels)
        done = np.asarray(terminated) | np.asarray(truncated)
        cols["qoe"].append(np.asarray(reward, dtype=np.float64))
        cols["bitrate_mbps"].append(info["bitrate_mbps"])
        cols["rebuffer_s"].append(info["rebuffer_s"])
        cols["smoothness_mbps"].append(info["smoothness_mbps"])
        cols["levels"].append(levels)
    arrays = {k: np.stack(v, axis=1) for k, v in cols.items()}
    states = {k: np.stack([s[k] for s in seen], axis=1) for k in STATE_TOKENS} if record else None
    return Episodes(states=states, **arrays)


def play_shard(policy: Any, shard: range, traces: Sequence[Any], video: Any, seed: int, record: bool,
               env_options: dict[str, Any]) -> Episodes:
    """``run_episodes`` on the traces of ``shard``, each keeping its own random stream and
    start position (its index in the whole set)."""
    opts = dict(env_options)
    if opts.get("start_indices") is not None:
        opts["start_indices"] = [opts["start_indices"][i] for i in shard]
    ids = list(opts.pop("trace_ids", None) or range(len(traces)))
    return run_episodes(policy, [traces[i] for i in shard], video, seed, record=record,
                        trace_ids=[ids[i] for i in shard], **opts)


def play(policy: Any, traces: Sequence[Any], video: Any, seed: int, record: bool = False,
         **env_options: Any) -> Episodes:
    """:func:`run_episodes`, the traces cut into one shard per open worker
    (``netllm.parallel``); the same episodes as one process for deterministic policies."""
    from netllm import parallel

    shards = parallel.split(len(traces))
    if parallel.active() is None or len(shards) == 1:
        return run_episodes(policy, traces, video, seed, record=record, **env_options)
    return concat_episodes(parallel.map(play_shard, shards, parallel.shared_policy(policy), traces, video, seed,
                                        record, env_options))


def concat_episodes(parts: Sequence[Episodes]) -> Episodes:
    """Shards of traces (:func:`play_shard`) back into one :class:`Episodes`, in order."""
    states = ({k: np.concatenate([p.states[k] for p in parts]) for k in parts[0].states}
              if parts[0].states is not None else None)
    return Episodes(states=states, **{k: np.concatenate([getattr(p, k) for p in parts])
                                      for k in ("qoe", "bitrate_mbps", "rebuffer_s", "smoothness_mbps", "levels")})


# ----------------------------------------------------------------------------- NetLLM policy


class NetLLMABRPolicy:
    """A trained adapter behind the baselines' interface, deciding with the KV cache on a
    CPU and recomputing the context on a GPU (``rl.default_use_cache``)."""

    def __init__(self, model: NetLLM, target: float, sample: bool = False, name: str = "netllm",
                 use_cache: bool | None = None) -> None:
        self.model, self.target, self.sample, self.name = model, target, sample, name
        self.use_cache = use_cache  # False recomputes the whole context per decision; None: the device's default
        self.inc: IncrementalPolicy | None = None
        self.last_levels: np.ndarray | None = None

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto", target: float | None = None,
                     sample: bool = False) -> "NetLLMABRPolicy":
        config = read_adapter_config(folder)
        model = NetLLM.from_adapter(folder, task="abr", device=device, merge=True)
        goal = target if target is not None else float(config.get("extra", {}).get("target_return", 40.0))
        return cls(model, goal, sample=sample, name=Path(folder).name)

    def reset(self, env: Any, seed: int) -> None:
        self.inc = IncrementalPolicy(self.model, target=self.target, batch_size=env.num_envs,
                                     use_cache=self.use_cache)
        self.last_levels = None
        # one sampling stream per trace (by its id, as the environment's own noise): a
        # trace's episode does not depend on which traces play beside it
        ids = getattr(env, "trace_ids", range(env.num_envs))
        self.rngs = [np.random.default_rng([int(seed), int(t), 1]) for t in ids]

    @torch.no_grad()
    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        assert self.inc is not None, "reset() first"
        if self.last_levels is not None:
            self.inc.record(torch.as_tensor(self.last_levels), torch.as_tensor(qoe_of(info), dtype=torch.float32))
        states = {k: torch.from_numpy(v) for k, v in obs_states(obs).items()}
        logits = self.model.heads["action"](self.inc.decide(states))
        if self.sample:
            probs = torch.softmax(logits.double().cpu(), dim=-1).numpy()
            u = np.array([rng.random() for rng in self.rngs])[:, None]
            # inverse CDF: the first level whose cumulative probability exceeds u
            levels = torch.from_numpy(np.minimum((np.cumsum(probs, -1) <= u).sum(-1), probs.shape[-1] - 1))
        else:
            levels = stable_argmax(logits.float().cpu())
        self.last_levels = levels.numpy().astype(np.int64)
        return self.last_levels


def policy_by_name(name: str, device: str = "auto") -> Any:
    """A baseline by name, or a trained adapter by folder (the framework's one way)."""
    from netllm.recipe import load_policy

    return load_policy(TASK, name, ABREvalOptions(), device)


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
        ep = play(policy, traces, video, seed, **env_options)
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


def add_unseen(results: dict[str, Metrics], traces: Sequence[Any], seen_in: Sequence[Any]) -> int:
    """Add ``qoe_unseen`` to every result: the mean QoE over the traces that are no copy
    of a trace of ``seen_in`` (e.g. fcc-train: 42 of fcc-test's 100 traces are copies);
    returns how many traces are unseen (none: nothing is added). Episodes are equally
    long, so the mean of the per-trace means is the per-chunk mean."""
    from netllm.tasks.abr.traces import copies_of

    seen = copies_of(traces, seen_in)
    unseen = {t.name for t in traces} - seen
    if not unseen:
        return 0
    for m in results.values():
        m.parts["qoe_unseen"] = float(np.mean([r["qoe"] for r in m.rows if r["trace"] in unseen]))
        m.parts["unseen_traces"] = float(len(unseen))
    return len(unseen)


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
        policy, episodes = policy_by_name(name), []
        for seed in seeds:
            ep = play(policy, traces, video, seed, record=True)
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


# ----------------------------------------------------------------------------- options


TRACE_HELP = ("fcc-train, fcc-valid, fcc-test, fcc-pool (fcc-train less fcc-holdout and the fcc-test "
              "copies), fcc-holdout (fcc-train's last 35 less the fcc-test copies) or a folder of trace files")
VIDEO_HELP = "video1, video2 or a folder holding video_size_0..5"


def check_traces(value: str, option: str) -> None:
    """A trace set name or an existing folder / file (its contents are read later)."""
    from netllm.tasks.abr.traces import TRACE_SETS

    if value not in TRACE_SETS and not Path(value).exists():
        raise NetLLMError(f"{option}: unknown trace set {value!r} ({TRACE_HELP})")


def validation_traces(recipe: "ABRRecipe") -> list[Any]:
    """The traces the adapter is chosen on: the first ``--valid-count`` (0: all) of ``--valid-traces``."""
    from netllm.tasks.abr.traces import load_traces

    traces = load_traces(recipe.valid_traces)
    return list(traces[: recipe.valid_count] if recipe.valid_count else traces)


def check_videos(value: str, option: str) -> None:
    """Comma-separated video names or folders."""
    from netllm.tasks.abr.traces import VIDEOS

    for v in split_list(value, option):
        if v not in VIDEOS and not Path(v).is_dir():
            raise NetLLMError(f"{option}: unknown video {v!r} ({VIDEO_HELP})")


@dataclass
class ABRRecipe(Recipe):
    """Every hyper-parameter of ABR adaptation, visible in one place. The defaults are
    the recipe that beats RobustMPC and GENET (docs/results/abr.md)."""

    layers: int | None = opt(4, "Keep only the first N decoder layers.", min=1)
    context: int = opt(10, "Context window K in decision steps.", min=1)
    target_quantile: float = opt(0.9, "Target return at run time: this quantile of the pool's returns.",
                                 min=0, max=1)
    valid_traces: str = opt("fcc-holdout", f"Validation trace set ({TRACE_HELP}); no pool may play it.")
    valid_count: int = opt(0, "Validate on the first N traces of --valid-traces (0: all).", min=0)
    valid_video: str = opt("video1", f"Validation video ({VIDEO_HELP}).")

    def check(self) -> None:
        super().check()
        check_traces(self.valid_traces, "--valid-traces")
        check_videos(self.valid_video, "--valid-video")


@dataclass
class ABRAdaptOptions(ABRRecipe):
    pool: list[str] = opt([], "Experience pool from `netllm collect abr` (repeat it for several).")

    def check(self) -> None:
        super().check()
        if not self.pool:
            raise NetLLMError("--pool: ABR adaptation needs an experience pool (netllm collect abr ...)")
        for p in self.pool:
            if not Path(p).exists():
                raise NetLLMError(f"--pool {p}: no such pool file or folder")


@dataclass
class ABREvalOptions(Options):
    traces: str = opt("fcc-test", f"Trace set ({TRACE_HELP}).")
    video: str = opt("video1", f"Video ({VIDEO_HELP}).")
    setting: str = opt("upstream", "upstream: no delay noise and the trace set's fixed start positions; "
                                   "random: delay noise and seeded random starts.", choices=("upstream", "random"))
    strict: bool = opt(False, "A bad trace file (time going backwards, too short, an unreadable row) is an "
                              "error, instead of being skipped with a warning and listed in results.json.")
    unseen_by: str = opt("fcc-train", "Also report QoE on the traces that are no copy of a trace of this set "
                                      f"(qoe_unseen; {TRACE_HELP}; 'none': skip).")

    def check(self) -> None:
        super().check()
        check_traces(self.traces, "--traces")
        check_videos(self.video, "--video")
        if self.unseen_by != "none":
            check_traces(self.unseen_by, "--unseen-by")


@dataclass
class ABRCollectOptions(Options):
    traces: str = opt("fcc-pool", f"Trace set the episodes play ({TRACE_HELP}).")
    video: str = opt("video1", "Video(s), comma-separated: episodes on each.")
    keep: str = opt("all", "all: every episode; best: per (trace, seed, video) the best policy's episode.",
                    choices=("all", "best"))

    def check(self) -> None:
        super().check()
        check_traces(self.traces, "--traces")
        check_videos(self.video, "--video")


CONTROLS = ("random", "scratch")


@dataclass
class ABRBenchOptions(ABRRecipe):
    """The whole pipeline; the recipe fields are the adaptation's (same defaults as adapt)."""

    pool_seeds: str = opt("1-2", "Seeds of the pool's episodes.")
    behaviour: str = opt("genet,mpc,bba", "Policies that play the pool's episodes (comma-separated).")
    keep: str = opt("best", "Pool: all episodes, or the best policy's per condition.", choices=("all", "best"))
    pool_videos: str = opt("video1,video2", "Videos of the pool's episodes.")
    seeds: str = opt("1-3", "Evaluation seeds.")
    train_seeds: str = opt("0", TRAIN_SEEDS_HELP)
    videos: str = opt("video1,video2", "Test videos.")
    controls: str = opt("random,scratch", "Controls trained beside NetLLM: random (random LLM weights), "
                                          "scratch (a small Decision Transformer from scratch), none.")
    baselines: str = opt("bba,mpc,genet,oracle", "Baselines evaluated beside the adapters.")
    finetune_iterations: int = opt(0, "Online stage: 'netllm finetune abr' with this many PPO iterations from "
                                      "every trained adapter (NetLLM and each control, every training seed), "
                                      "then the fine-tuned adapters are tested beside the offline ones, also on "
                                      "held-out generated traces ('variable'); 0: no online stage.", min=0)
    finetune_envs: int = opt(32, "Online stage: fcc-pool traces played per PPO iteration (finetune --envs).", min=1)
    finetune_generated: int = opt(16, "Online stage: generated traces per PPO iteration (finetune --generated).",
                                  min=0)

    def check(self) -> None:
        from netllm.tasks.abr.baselines import BASELINES
        from netllm.utils import parse_seeds

        super().check()
        parse_seeds(self.pool_seeds, "--pool-seeds")
        parse_seeds(self.seeds)
        check_train_seeds(self)
        split_list(self.behaviour, "--behaviour", list(BASELINES))
        split_list(self.baselines, "--baselines", list(BASELINES))
        split_list(self.controls, "--controls", [*CONTROLS, "none"])
        check_videos(self.videos, "--videos")
        check_videos(self.pool_videos, "--pool-videos")


# ----------------------------------------------------------------------------- adaptation


@dataclass
class ABRFinetuneOptions(FinetuneOptions):
    """``netllm finetune abr``: PPO in the simulator from an offline ABR adapter."""

    envs: int = opt(32, "Traces of --traces played side by side per iteration.", min=1)
    traces: str = opt("fcc-pool", f"Training trace set ({TRACE_HELP}).")
    videos: str = opt("video1,video2", f"Videos, alternated by iteration ({VIDEO_HELP}).")
    generated: int = opt(0, "Markov-chain traces generated afresh every iteration besides --envs (0: none).",
                         min=0)
    low_mbps: float = opt(0.2, "Lowest bandwidth of the generated traces.", min=0)
    high_mbps: float = opt(20.0, "Highest bandwidth of the generated traces.", min=0)
    valid_traces: str = opt("fcc-holdout", f"Validation trace set ({TRACE_HELP}).")
    valid_video: str = opt("video1", "Validation video(s), comma-separated; validation is the mean QoE over "
                           f"every (trace, video) ({VIDEO_HELP}).")
    valid_generated: int = opt(0, "Also validate on N Markov-chain traces from --low-mbps..--high-mbps, drawn "
                               "once with a seed no iteration uses (0: none).", min=0)

    def check(self) -> None:
        super().check()
        check_adapter(self.adapter, "abr")
        check_traces(self.traces, "--traces")
        check_traces(self.valid_traces, "--valid-traces")
        check_videos(self.videos, "--videos")
        check_videos(self.valid_video, "--valid-video")
        if not 0 < self.low_mbps < self.high_mbps:
            raise NetLLMError(f"--low-mbps / --high-mbps: need 0 < low < high, got {self.low_mbps} and "
                              f"{self.high_mbps}")


def adapt(pool: ExperiencePool, out: Path, recipe: ABRRecipe, *, device: str = "auto", resume: bool = False,
          eval_traces: Sequence[Any] | None = None, eval_video: Any = None, progress: bool = True) -> Path:
    """DD-LRNA for ABR: return-conditioned offline RL on the pool; returns the adapter folder.
    With ``eval_traces``, the adapter kept is the best on them (``recipe.eval_every``)."""
    seed_everything(recipe.seed)
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, context=recipe.context,
                          pretrained=recipe.pretrained, seed=recipe.seed)
    model = NetLLM(config, device=device)
    sampler = WindowSampler(pool, config.rl, batch_size=recipe.batch_size, seed=recipe.seed)
    goal = target_return(pool, recipe.target_quantile)
    validate = None
    if eval_traces:
        def validate(m: Any) -> float:
            return evaluate(NetLLMABRPolicy(m, goal), eval_traces, eval_video, [1]).mean

    return run_adaptation(model, sampler.batch, action_loss, recipe, out, steps=recipe.total_steps(len(pool)),
                          metric="qoe", higher_is_better=True, validate=validate, resume=resume,
                          progress=progress, extra=lambda: {"target_return": goal, "pool": pool.meta})


def load_pools(paths: Sequence[str | Path]) -> ExperiencePool:
    pools = [ExperiencePool.load(p, task="abr") for p in paths]
    return pools[0] if len(pools) == 1 else ExperiencePool.concat(pools)


class ABRTask(Task):
    name = "abr"
    parallel = True  # eval and collect take --workers / --ray-address
    kind = "decision"
    metric = "qoe"
    higher_is_better = True
    summary = "adaptive bitrate streaming (Pensieve/Genet simulator, FCC traces); QoE, higher is better."
    has_demo = True
    data_module = "netllm.tasks.abr.datasets"
    Recipe = ABRRecipe
    AdaptOptions = ABRAdaptOptions
    EvalOptions = ABREvalOptions
    CollectOptions = ABRCollectOptions
    BenchOptions = ABRBenchOptions
    FinetuneOptions = ABRFinetuneOptions
    ServeOptions = ABRServeOptions
    fallbacks = ABR_FALLBACKS

    def service(self, ctx: Any, options: ABRServeOptions, fallback: str) -> Any:
        from netllm.tasks.abr.serve import ABRService

        return ABRService(ctx, options, fallback)

    def model_config(self, recipe: Recipe | None = None) -> NetLLMConfig:
        r = recipe if isinstance(recipe, ABRRecipe) else ABRRecipe()
        return model_config(llm=r.llm, layers=r.layers, rank=r.rank, context=r.context, pretrained=r.pretrained,
                            seed=r.seed)

    def baselines(self) -> dict[str, Callable[[Any], Any]]:
        from netllm.tasks.abr.baselines import BASELINES, make_baseline

        return {name: (lambda _options, n=name: make_baseline(n)) for name in BASELINES}

    def policy_from_run(self, folder: Path, options: Any, device: str = "auto") -> Any:
        if not (folder / ADAPTER_CONFIG).is_file():
            raise NetLLMError(f"--policy {folder}: not an ABR adapter folder (no {ADAPTER_CONFIG})")
        return NetLLMABRPolicy.from_adapter(folder, device=device)

    def check_eval(self, options: ABREvalOptions) -> None:
        from netllm.data import dataset_path
        from netllm.tasks.abr.traces import VIDEOS, require_set

        require_set(options.traces)  # no data: one line, before the run folder
        if options.video in VIDEOS:
            dataset_path("abr", "videos", f"{options.video}_sizes")
        require_set(options.unseen_by)

    def evaluate(self, policies: dict[str, Any], seeds: list[int], options: ABREvalOptions,
                 out: Path) -> dict[str, Metrics]:
        from netllm.results import write_results
        from netllm.tasks.abr.traces import load_traces, load_video

        trace_set, vid = load_traces(options.traces, strict=options.strict), load_video(options.video)
        env_options = env_setting(options.traces, options.setting)
        console.print("setting: " + ("upstream (no delay noise, fixed start positions)" if env_options
                                     else "random (delay noise, seeded random start positions)"))
        results: dict[str, Metrics] = {}
        for name, policy in policies.items():
            t0 = time.perf_counter()
            results[name] = evaluate(policy, trace_set, vid, seeds, **env_options)
            console.print(f"{name}: {time.perf_counter() - t0:.1f} s")
        unseen, n = "", 0
        if options.unseen_by not in ("none", options.traces):
            n = add_unseen(results, trace_set, load_traces(options.unseen_by))
            unseen = (f"; qoe_unseen: the {n} traces that are no copy of a {options.unseen_by} trace" if n else
                      f"; every trace is a copy of a {options.unseen_by} trace (no qoe_unseen)")
        write_results(out, results, title=f"ABR on {options.traces} / {vid.name} ({len(trace_set)} traces, "
                                          f"seeds {seeds}){unseen}",
                      parts=("bitrate_mbps", "rebuffer_s", "smoothness_mbps") + (("qoe_unseen",) if n else ()),
                      reference="oracle" if "oracle" in results else None, cdf_key="qoe",
                      skipped=trace_set.skipped)
        return results

    def collect(self, policies: list[str], seeds: list[int], options: ABRCollectOptions, out: Path) -> Path:
        """``--video video1,video2``: episodes on each video; ``--keep best``: per (trace,
        seed[, video]) only the best policy's episode (see collect_pool)."""
        from netllm.tasks.abr.traces import load_traces, load_video

        trace_set, videos = load_traces(options.traces), [load_video(v) for v in options.video.split(",")]
        pool = collect_pools(policies, trace_set, videos, seeds, keep=options.keep)
        path = pool.save(out / "pool.npz")
        console.print(f"pool: {pool.num_episodes} episodes, {len(pool)} steps -> {path}")
        return path

    def adapt(self, out: Path, recipe: ABRAdaptOptions, device: str = "auto", resume: bool = False) -> Path:
        from netllm.tasks.abr.traces import load_video

        valid = validation_traces(recipe)
        return adapt(load_pools(recipe.pool), out, recipe, device=device, resume=resume, eval_traces=valid,
                     eval_video=load_video(recipe.valid_video))

    # -- demo and benchmark ----------------------------------------------------------------

    def demo(self, device: str = "auto", out: Path = Path("runs/demo-abr")) -> dict[str, Metrics]:
        return run_demo(device=device, out=out)

    def finetune(self, options: ABRFinetuneOptions, out: Path, device: str = "auto", resume: bool = False) -> Path:
        """PPO from the offline adapter (``netllm.finetune``, hooks in ``online.py``) on the
        training traces (+ generated ones); the best adapter on the validation traces goes
        to ``out``."""
        from netllm.tasks.abr.online import ITERATION_SEED, ABROnline
        from netllm.tasks.abr.traces import load_traces, load_video

        config = read_adapter_config(options.adapter)
        extra = dict(config.get("extra") or {})
        target = float(extra.get("target_return", 40.0))
        model = NetLLM.from_adapter(options.adapter, task="abr", device=device)
        ref = NetLLM.from_adapter(options.adapter, task="abr", device=device, merge=True)
        hooks = ABROnline(target, load_traces(options.traces), [load_video(v) for v in split_list(options.videos,
                          "--videos")], load_traces(options.valid_traces),
                          [load_video(v) for v in split_list(options.valid_video, "--valid-video")],
                          envs=options.envs, generated=options.generated, low_mbps=options.low_mbps,
                          high_mbps=options.high_mbps, valid_generated=options.valid_generated)
        extra["finetuned_from"] = str(options.adapter)
        return run_finetune(model, ref, hooks, options, out, extra=extra, resume=resume,
                            seeds_of=lambda it: [ITERATION_SEED + options.seed * 1_000_000 + it])

    def _finetune_stage(self, runs: dict[str, dict[int, Path]], options: ABRBenchOptions, out: Path,
                        wall_s: dict[str, float], device: str) -> dict[str, dict[int, Path]]:
        """``netllm finetune abr`` from every trained adapter into ``<its folder>-ppo``, with
        the adapter's training seed; a finished run of the same options is reused, a run of
        other options is a one-line error (as ``finetune --resume``)."""
        from netllm.finetune import check_run_folder

        tuned: dict[str, dict[int, Path]] = {}
        for name, folders in runs.items():
            for s, folder in folders.items():
                ft = out / f"{folder.name}-ppo"
                tuned.setdefault(f"{name}-ppo", {})[s] = ft
                ft_options = ABRFinetuneOptions.build(adapter=str(folder), iterations=options.finetune_iterations,
                                                      envs=options.finetune_envs,
                                                      generated=options.finetune_generated, seed=s)
                check_run_folder(ft, ft_options, resume=True)
                if stage_done(ft, options.finetune_iterations):
                    continue
                t0 = time.perf_counter()
                self.finetune(ft_options, ft, device=device, resume=True)
                wall_s[f"finetune {ft.name}"] = time.perf_counter() - t0
        return tuned

    def bench(self, options: ABRBenchOptions, out: Path, device: str = "auto") -> dict[str, Any]:
        """The whole pipeline: pool -> adaptation (+ controls) -> evaluation on fcc-test.

        The pool: ``--behaviour`` policies on fcc-pool with ``--pool-videos``, seeds
        ``--pool-seeds``; ``--keep best`` keeps the best policy's episode per condition.
        The defaults are the README's winning recipe (best of GENET / MPC / BBA over
        both videos, SmolLM2 cut to 4 layers, 2,000 steps).
        Finished stages are reused when the benchmark is run again with the same --out.
        """
        from netllm.results import write_results
        from netllm.tasks.abr.traces import load_traces, load_video, variable_traces
        from netllm.utils import atomic_write_json, parse_seeds

        eval_seeds = parse_seeds(options.seeds)
        summary: dict[str, Any] = {"wall_s": {}}
        pool_path = out / "pool.npz"
        if not pool_path.is_file():
            t0 = time.perf_counter()
            pool = collect_pools(options.behaviour.split(","), load_traces("fcc-pool"),
                                 [load_video(v) for v in options.pool_videos.split(",")],
                                 parse_seeds(options.pool_seeds), keep=options.keep)
            pool.save(pool_path)
            summary["wall_s"]["pool"] = time.perf_counter() - t0
        pool = ExperiencePool.load(pool_path, task="abr")
        summary["pool"] = {"episodes": pool.num_episodes, "steps": len(pool), **pool.meta}
        recipe = ABRRecipe(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ABRRecipe)})
        train_seeds = parse_seeds(options.train_seeds, "--train-seeds")
        summary["train_seeds"] = train_seeds
        label = f"netllm-{Path(recipe.llm).name}"
        variants = {label: recipe}
        controls = options.controls.split(",")
        if "random" in controls:
            variants[f"{label}-random-init"] = dataclasses.replace(recipe, pretrained=False)
        if "scratch" in controls:
            variants["dt-scratch"] = dataclasses.replace(recipe, llm="scratch", layers=3, rank=0)
        valid, valid_video = validation_traces(recipe), load_video(recipe.valid_video)
        runs = train_variants(variants, train_seeds, out, len(pool), summary["wall_s"],
                              train=lambda r, folder: adapt(pool, folder, r, device=device, resume=True,
                                                            eval_traces=valid, eval_video=valid_video))
        tuned: dict[str, dict[int, Path]] = {}
        if options.finetune_iterations:
            tuned = self._finetune_stage(runs, options, out, summary["wall_s"], device)
        trained = {**runs, **tuned}
        # what the test sets are; an evaluation is cached under out/eval-cache, keyed by it
        test_sets: list[tuple[str, Sequence[Any], dict[str, Any]]] = [
            ("fcc-test", load_traces("fcc-test"), env_setting("fcc-test"))]
        if tuned:
            test_sets.append(("variable", variable_traces(), {}))
        cache = out / "eval-cache"
        fcc_train = load_traces("fcc-train")  # fcc-test's traces that are no copy of these: qoe_unseen
        for set_name, test, test_env in test_sets:
            for video_name in options.videos.split(","):
                results: dict[str, Metrics] = {}
                for b in options.baselines.split(","):
                    if b == "genet" and not _genet_available():
                        continue
                    results[b] = cached_evaluation(cache, b, set_name, test, test_env, video_name, eval_seeds)
                per_train: dict[str, dict[int, Metrics]] = {}
                for name, folders in trained.items():
                    for s, folder in folders.items():
                        t0 = time.perf_counter()
                        per_train.setdefault(name, {})[s] = cached_evaluation(cache, folder, set_name, test, test_env,
                                                                              video_name, eval_seeds, device=device)
                        summary["wall_s"][f"eval {folder.name} {set_name} {video_name}"] = time.perf_counter() - t0
                n = 0
                if set_name == "fcc-test":
                    n = add_unseen(results, test, fcc_train)
                    for by_seed in per_train.values():
                        add_unseen(by_seed, test, fcc_train)
                for name, by_seed in per_train.items():
                    results[name] = combine_train_seeds(by_seed)
                key = video_name if set_name == "fcc-test" else f"{set_name}/{video_name}"
                title = (f"ABR on fcc-test / {video_name} (seeds {options.seeds}, training seeds {options.train_seeds}); "
                         f"qoe_unseen: the {n} traces not in fcc-train" if set_name == "fcc-test" else
                         f"ABR on held-out generated traces ('variable', {len(test)}) / {video_name} (seeds "
                         f"{options.seeds}, training seeds {options.train_seeds})")
                write_results(out / key.replace("/", "-"), results, title=title,
                              parts=("bitrate_mbps", "rebuffer_s", "smoothness_mbps") + (("qoe_unseen",) if n else ()),
                              reference="oracle" if "oracle" in results else None, cdf_key="qoe")
                baselines = [b for b in results if b not in trained and b != "oracle"]
                best = max(baselines, key=lambda b: results[b].mean) if baselines else None
                comps = comparisons(results, label, [x for x in (best, *runs) if x], trained=list(trained),
                                    units="trace")
                if tuned:  # the fine-tuned NetLLM against where it started, the best baseline, the tuned controls
                    comps.update(comparisons(results, f"{label}-ppo", [x for x in (label, best, *tuned) if x],
                                             trained=list(trained), units="trace"))
                print_comparisons(f"{set_name} / {video_name}: {label} minus ... (QoE, positive = NetLLM better); "
                                  f"best baseline: {best}", comps)
                summary[key] = {n: m.summary() for n, m in results.items()}
                summary[key]["best_baseline"] = best
                summary[key]["comparisons"] = comps
        summary["speed"] = speed_report(runs[label][train_seeds[0]], device=device)
        atomic_write_json(out / "bench.json", summary)
        console.print(f"written: {out / 'bench.json'}")
        return summary


def cached_evaluation(cache: Path | None, policy: str | Path, set_name: str, traces: Sequence[Any],
                      env_options: dict[str, Any], video: str, seeds: Sequence[int], device: str = "auto") -> Metrics:
    """:func:`evaluate` of a baseline (its name) or an adapter (its folder) on a named test
    set, cached under ``cache`` (:func:`netllm.results.cached_metrics`) by what decides the
    result: the adapter's files or the baseline's name, the set, video, seeds and setting."""
    import json

    from netllm.model import adapter_digest
    from netllm.results import cached_metrics
    from netllm.tasks.abr.traces import VARIABLE_TRACES, load_video

    where = (f"{set_name} {json.dumps(VARIABLE_TRACES) if set_name == 'variable' else ''} / {video} "
             f"/ seeds {list(seeds)} / {sorted(env_options.items())}")
    if isinstance(policy, Path):
        key, make = f"adapter {adapter_digest(policy)} on {where}", lambda: NetLLMABRPolicy.from_adapter(policy,
                                                                                                       device=device)
    else:
        key, make = f"baseline {policy} on {where}", lambda: policy_by_name(policy)
    return cached_metrics(cache, key, lambda: evaluate(make(), traces, load_video(video), seeds, **env_options))


def _genet_available() -> bool:
    try:
        from netllm.data import dataset_path

        dataset_path("abr", "pretrained", "genet_actor.npz")
        return True
    except NetLLMError:
        return False


@dataclass
class DemoData:
    """What the demo trains, validates and tests on, and where it came from."""

    train: list[Any]  # the pool's traces
    valid: list[Any]  # held out from the pool: the adapter kept is the best on them
    test: list[Any]
    videos: list[Any]  # the pool plays each; the first is the test video
    source: str
    real: bool


def demo_data(fetch: bool = True) -> DemoData:
    """Real FCC traces when present (or fetched now, verified), generated ones otherwise.

    Real: the pool plays fcc-pool, fcc-holdout validates (upstream's fcc-valid repeats
    fcc-train), fcc-test tests (see traces.derived_set). Generated: train, validation and test
    traces are drawn from the same Markov-chain generator with different seeds.
    """
    from netllm import data
    from netllm.tasks.abr.traces import load_traces, load_video, synthetic_traces, synthetic_video

    try:
        data.dataset_path("abr", "traces")
    except NetLLMError:
        if fetch:
            console.print("no ABR data found: fetching it ('netllm data fetch abr', sha256-verified) ...")
            try:
                data.fetch("abr", progress=False)
            except NetLLMError as err:
                console.print(f"[yellow]fetch failed[/yellow]: {str(err).splitlines()[0]}")
    try:
        pool, valid, test = load_traces("fcc-pool"), load_traces("fcc-holdout"), load_traces("fcc-test")
        return DemoData(list(pool), list(valid), test, [load_video("video1"), load_video("video2")],
                        f"real FCC traces (pool: the {len(pool)} traces of fcc-pool, validation: the {len(valid)} of "
                        "fcc-holdout, test: fcc-test; disjoint by content), video1 + video2", real=True)
    except NetLLMError:
        return DemoData(synthetic_traces(200, seed=1), synthetic_traces(30, seed=3), synthetic_traces(100, seed=2),
                        [synthetic_video(seed=0)],
                        "GENERATED traces and video (no real data: run 'netllm data fetch abr' or set NETLLM_DATA)",
                        real=False)


# the demo's budget: minutes on two CPU cores (the full recipe's steps are 2,000)
DEMO_RECIPE = ABRRecipe(steps=DEMO_STEPS, eval_every=DEMO_EVAL_EVERY, warmup_steps=50)


def run_demo(device: str = "auto", out: Path = Path("runs/demo-abr"), recipe: ABRRecipe = DEMO_RECIPE,
             data: DemoData | None = None) -> dict[str, Metrics]:
    """The README's winning recipe on a small budget: a best-of pool (GENET / RobustMPC /
    BBA per condition), SmolLM2 cut to 4 layers, LoRA; compared with the baselines on the
    test traces. The run folder is the demo's own and is replaced on every run, so the
    demo runs again and again and prints the same numbers on the same machine."""
    import shutil

    from netllm.results import write_results
    from netllm.utils import prepare_run_dir

    d = data if data is not None else demo_data()
    console.print(f"[bold]NetLLM ABR demo[/bold] — data: {d.source}")
    genet = _genet_available()
    behaviours = (["genet"] if genet else []) + ["mpc", "bba"]
    if out.exists():
        if not (out / "config.json").is_file() or not out.is_dir():
            raise NetLLMError(f"{out}: exists and is not a demo run folder; move it away")
        shutil.rmtree(out)
    prepare_run_dir(out, {"command": "demo", "data": d.source, "behaviour": behaviours,
                          **dataclasses.asdict(recipe)})
    t0 = time.perf_counter()
    pool = collect_pools(behaviours, d.train, d.videos, seeds=[1, 2], keep="best")
    adapter = adapt(pool, out, recipe, device=device, eval_traces=d.valid, eval_video=d.videos[0])
    console.print(f"pool + adaptation ({recipe.steps} steps, {recipe.layers} layers, "
                  f"LoRA r={recipe.rank}): {time.perf_counter() - t0:.0f} s")
    env = env_setting("fcc-test") if d.real else {}
    results = {n: evaluate(policy_by_name(n), d.test, d.videos[0], [1], **env) for n in behaviours[::-1]}
    results["netllm"] = evaluate(NetLLMABRPolicy.from_adapter(adapter, device=device), d.test, d.videos[0], [1],
                                 **env)
    parts: tuple[str, ...] = ("bitrate_mbps", "rebuffer_s", "smoothness_mbps")
    title = f"ABR demo: {d.source}; test video {d.videos[0].name}, seed 1"
    if d.real:
        n = add_unseen(results, d.test, d.train)
        parts, title = parts + ("qoe_unseen",), title + f"; qoe_unseen: the {n} test traces the pool never played"
    write_results(out, results, title=title, parts=parts, cdf_key="qoe")
    best = max(behaviours, key=lambda n: results[n].mean)
    verdict = "ahead of" if results["netllm"].mean > results[best].mean else "behind"
    console.print(f"NetLLM {results['netllm'].mean:.3f} is {verdict} the best baseline ({best} "
                  f"{results[best].mean:.3f}) at this budget; the full recipe: netllm bench abr")
    return results


def speed_report(adapter: Path, device: str = "auto", traces: int = 100) -> dict[str, float]:
    """Simulated chunks/s (batched vs one trace at a time) and NetLLM decision latency
    with the KV cache vs full recompute, on real-shaped observations."""
    from netllm.tasks.abr.env import benchmark_chunks_per_s
    from netllm.tasks.abr.traces import load_traces, load_video

    report: dict[str, float] = dict(benchmark_chunks_per_s(load_traces("fcc-test")[:traces], load_video("video1")))
    one = load_traces("fcc-test")[:1]
    video = load_video("video1")
    policy = NetLLMABRPolicy.from_adapter(adapter, device=device)

    def play(use_cache: bool) -> tuple[float, int]:
        policy.use_cache = use_cache
        t0 = time.perf_counter()
        ep = run_episodes(policy, one, video, seed=1)
        return time.perf_counter() - t0, ep.qoe.shape[1]

    report.update(decision_speed(play))
    return report


TASK = ABRTask()
