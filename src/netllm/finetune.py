"""Online fine-tuning of an offline-adapted decision policy in its simulator: PPO.

    netllm finetune cjs --adapter runs/cjs-d48 --out runs/cjs-ppo --iterations 50 --envs 8

Offline RL copies the policies that logged the pool; a learning signal from the
environment is what can take a policy past them. Each iteration

1. **rolls out** the current policy (sampling, as it is decoded) in ``envs`` simulators at
   once through the batched, KV-cached decision path (``rl.IncrementalPolicy``), recording
   every decision as a pool row together with the return-to-go it was conditioned on;
2. cuts each episode into consecutive K-step **tiles** (the windows of offline training:
   the hidden state of a step sees the earlier steps of its tile), and computes, without
   gradients, the log-probability of every taken action under the rollout weights
   (``old``), under the frozen offline policy (``ref``) and the value estimate;
3. takes **PPO** steps over the tiles: clipped policy ratio on GAE advantages (or, where
   the task plays every input several times, advantages against the group's mean
   return-to-go at the same simulated time: ``group_advantages``), a value
   head on the LLM's hidden state (``heads["value"]``, saved with the adapter; it learns
   on detached hidden states unless ``--shared-value``: with the critic's gradients in
   the shared LoRA, the first ABR run's validation QoE fell from 0.669 to ~0.59), an
   entropy bonus and a KL penalty towards the offline policy (the k3 estimator) so it
   does not forget what it imitated;
4. **validates** on seeds that are neither training nor test seeds and keeps the best
   adapter (``model.BestAdapter``; the offline adapter, validated before the first
   iteration, is a candidate too), in the adapter format ``eval`` loads unchanged;
5. writes a checkpoint (atomically, ``checkpoint.py``), a row of ``metrics.csv``,
   TensorBoard scalars and the learning-curve PNG.

Everything an iteration draws is seeded by (seed, iteration) — rollout seeds, sampling
streams, minibatch order, LoRA dropout — so ``--resume`` continues exactly where an
interrupted run stopped. A task plugs in with three hooks (``OnlineHooks``).

With ``--workers N`` / ``--ray-address`` (``netllm.parallel``) the rollouts and the
validation episodes are spread over Ray workers: each worker builds a replica of the
model once (from the offline adapter) and, at every call, takes the current trainable
weights; the hooks cut their simulators into units (trace shards, job sequences) that
keep their own random streams, so an iteration plays the same episodes as in one process.
The PPO update stays in this process.

Under ``accelerate launch -m netllm finetune`` (N processes or GPUs) each process plays its
share of the units and every process gets the whole rollout (``Processes.gather``); the
no-gradient pass is split over the processes too, and each PPO minibatch of
``batch_size × N`` windows is cut among them with DDP averaging the gradients, every
process's loss a sum over its steps divided by the minibatch's step count, so that N
processes with ``--batch-size b`` take the steps of one process with ``--batch-size N·b``.
Only the main process writes files (adapter, checkpoint, metrics).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from netllm.checkpoint import (load_trainable_state_dict, new_trainer_state, resume_checkpoint, save_checkpoint,
                               trainable_named_parameters, trainable_state_dict)
from netllm.heads import HeadSpec, build_head
from netllm.model import ADAPTER_CONFIG, BestAdapter, NetLLM, read_adapter_config
from netllm.options import Options, opt
from netllm.rl import ExperiencePool, returns_to_go
from netllm.utils import NetLLMError, atomic_path

VALUE_HEAD = "value"


@dataclass
class FinetuneOptions(Options):
    """PPO from an offline adapter; every field is a ``netllm finetune`` option."""

    adapter: str = opt("", "The offline-adapted policy to start from (an adapter folder of this task).")
    iterations: int = opt(20, "PPO iterations (rollouts + updates).", min=1)
    envs: int = opt(8, "Simulators rolled out side by side per iteration (one episode each).", min=1)
    lr: float = opt(1e-5, "Learning rate (AdamW) of LoRA, encoders and heads.", min=0)
    epochs: int = opt(2, "Passes over an iteration's rollout.", min=1)
    batch_size: int = opt(8, "Tiles (K-step windows) per optimizer step.", min=1)
    clip: float = opt(0.2, "PPO's clip range of the policy ratio.", min=0)
    gamma: float = opt(1.0, "Discount of the rewards.", min=0, max=1)
    gae_lambda: float = opt(0.95, "GAE's lambda.", min=0, max=1)
    value_coef: float = opt(0.5, "Weight of the value loss.", min=0)
    entropy_coef: float = opt(0.01, "Weight of the entropy bonus.", min=0)
    kl_coef: float = opt(0.1, "Weight of the KL penalty towards the offline policy.", min=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping (global norm).", min=0)
    shared_value: bool = opt(False, "Let the value loss train LoRA and the encoders too (default: the value "
                                    "head learns on detached hidden states, so the critic cannot move the policy).",
                             flag="--shared-value/--detached-value")
    half_life: float = opt(0.0, "With an input-dependent baseline (a task's --group): discount rewards by the "
                                "simulated time after the decision, halving every S seconds (0: undiscounted).",
                           min=0)
    valid_every: int = opt(1, "Validate every N iterations and keep the best adapter.", min=1)
    seed: int = opt(0, "Seed of rollouts, sampling and minibatch order.", min=0)

    def check(self) -> None:
        super().check()
        if not self.adapter:
            raise NetLLMError("--adapter: fine-tuning starts from an offline adapter (netllm adapt ...)")
        if not (Path(self.adapter) / ADAPTER_CONFIG).is_file():
            raise NetLLMError(f"--adapter {self.adapter}: not an adapter folder (no {ADAPTER_CONFIG})")

    def single_process(self) -> str | None:
        """Why this run cannot spread over workers or launched processes (a one-line error
        the CLI gives before it writes anything), or None: it can."""
        return None


def check_adapter(path: str, task: str) -> dict[str, Any]:
    """The config of ``--adapter``, refused unless it is a decision policy of ``task``."""
    try:
        config = read_adapter_config(path)
    except NetLLMError as err:
        raise NetLLMError(f"--adapter: {err}") from None
    if config.get("task") != task or not config.get("rl"):
        raise NetLLMError(f"--adapter {path}: an adapter of task {config.get('task')!r}"
                          + ("" if config.get("rl") else " without a decision policy") + f", not a {task} policy")
    return config


@dataclass
class Rollout:
    """An iteration's decisions as a pool (one episode per simulator) plus the scaled
    return-to-go each decision was conditioned on and what the task reports about it."""

    pool: ExperiencePool
    rtg: np.ndarray  # (N,) float32, already divided by the policy's return scale
    stats: dict[str, float]
    cache: dict[str, Any] = field(default_factory=dict)  # the task's per-rollout helpers (window samplers)
    # input-dependent baseline (``group_advantages``): the group of every episode (episodes
    # of one group played the same input) and the simulated time of every decision
    groups: np.ndarray | None = None  # (episodes,) int
    times: np.ndarray | None = None  # (N,) float


class Spread:
    """Runs a hook's units of work — ``fn(hooks, model, unit, *args)`` for each unit,
    results in the order of the units — in this process, on the open Ray workers
    (``netllm.parallel``), each holding a replica of the hooks and the model (built once
    per worker from the offline ``adapter``) into which the current trainable weights are
    copied first, or, under ``accelerate launch``, shared among the launched processes
    (``procs``: each plays units ``rank, rank + N, ...`` and all get every result).
    ``fn`` must be a module-level function; ``split(n)`` cuts n simulators into units."""

    def __init__(self, hooks: Any = None, adapter: str | Path | None = None, task: str | None = None,
                 procs: Any = None) -> None:
        from netllm import parallel

        self.shared = None
        self.procs = procs if procs is not None and procs.world > 1 else None
        if self.procs is None and parallel.active() is not None and adapter is not None:
            self.shared = parallel.Shared(_ReplicaBuilder(str(adapter), str(task), hooks),
                                          key=f"finetune-replica:{id(self)}:{time.time_ns()}")

    def split(self, n: int) -> list[range]:
        """``range(n)`` in contiguous units, one per worker or launched process."""
        from netllm import parallel

        return parallel.split(n, self.procs.world if self.procs is not None else None)

    def __call__(self, hooks: Any, model: NetLLM, fn: Callable[..., Any], units: list[Any], *args: Any
                 ) -> list[Any]:
        from netllm import parallel

        if self.procs is not None:
            world, rank = self.procs.world, self.procs.rank
            mine = [(i, fn(hooks, model, units[i], *args)) for i in range(rank, len(units), world)]
            return [result for _, result in sorted(self.procs.gather(mine), key=lambda pair: pair[0])]
        if self.shared is None or parallel.active() is None:
            return [fn(hooks, model, unit, *args) for unit in units]
        return parallel.map(_on_replica, units, self.shared, fn, trainable_state_dict(model), args)


LOCAL = Spread()  # no workers: the hooks' default


@dataclass
class _ReplicaBuilder:
    adapter: str
    task: str
    hooks: Any

    def __call__(self) -> tuple[Any, NetLLM]:
        model = NetLLM.from_adapter(self.adapter, task=self.task, device="cpu")
        model.eval()
        return self.hooks, model


def _on_replica(context: tuple[Any, NetLLM], unit: Any, fn: Callable[..., Any], weights: dict[str, torch.Tensor],
                args: tuple[Any, ...]) -> Any:
    hooks, model = context
    # the value head lives only in the trained model: the replica acts, it does not judge
    load_trainable_state_dict(model, weights, strict=False)
    return fn(hooks, model, unit, *args)


class OnlineHooks(Protocol):
    """What a task supplies to fine-tune its policy online. ``spread`` runs the hook's
    units of work (shards of simulators) here or on the workers (:class:`Spread`)."""

    metric: str  # the validation metric (e.g. jct_s)
    higher_is_better: bool

    def rollout(self, model: NetLLM, seeds: list[int], spread: Spread = LOCAL) -> Rollout:
        """One sampled episode per simulator, all at once (batched decisions)."""
        ...

    def log_probs(self, model: NetLLM, rollout: Rollout, end_rows: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For K-step windows ending at ``end_rows``: log-probability (B, K) and entropy
        (B, K) of the logged actions, the hidden states (B, K, H) and the mask of real steps."""
        ...

    def validate(self, model: NetLLM, spread: Spread = LOCAL) -> float:
        ...

    # optional: ``reference() -> (name, score) | None``, the policy the offline adapter imitated,
    # scored on the validation episodes once (metrics.csv's first row, the learning curve)


# ----------------------------------------------------------------------------- the algorithm


def tiles(pool: ExperiencePool, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive K-step windows covering every step once: (end rows (T,), score mask
    (T, K)); a window scores the steps its predecessor did not (the last one of an
    episode may look back into the previous window for context only)."""
    ends, masks = [], []
    for start, end in zip(*pool.episode_bounds):
        prev = start - 1
        for e in list(range(start + k - 1, end - 1, k)) + [end - 1]:
            if e <= prev:
                continue
            window_rows = np.arange(e - k + 1, e + 1)
            ends.append(e)
            masks.append(window_rows > prev)
            prev = e
    return np.array(ends, dtype=np.int64), np.array(masks, dtype=bool)


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, gamma: float, lam: float
        ) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and the value targets (advantage + value); an
    episode's last step (done) bootstraps from 0."""
    adv = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        next_value = 0.0 if dones[i] else values[i + 1]
        if dones[i]:
            running = 0.0
        delta = rewards[i] + gamma * next_value - values[i]
        running = delta + gamma * lam * running
        adv[i] = running
    return adv.astype(np.float32), (adv + values).astype(np.float32)


def group_advantages(returns: np.ndarray, times: np.ndarray, bounds: tuple[np.ndarray, np.ndarray],
                     groups: np.ndarray) -> np.ndarray:
    """Advantages against an input-dependent baseline (Decima's, Mao et al. 2019): the
    episodes of a group played the same input (job sequence, trace) with their own
    sampling streams, so the group's mean return-to-go at the same simulated time
    removes what the input, not the action, made of the return. For decision i of
    episode e at time t_i: A_i = R_i - mean over the group's episodes g of R_g(t_i), R_g
    interpolated linearly between g's decision times (0 after g's last one).
    ``returns``: each decision's return-to-go; ``bounds``: the pool's episode bounds."""
    starts, ends = bounds
    if len(groups) != len(starts):
        raise NetLLMError(f"rollout: {len(groups)} episode groups for {len(starts)} episodes")
    adv = np.zeros(len(returns), dtype=np.float64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            raise NetLLMError(f"rollout: group {g} has one episode; an input-dependent baseline needs two or more")
        curves = [(times[starts[m]:ends[m]], returns[starts[m]:ends[m]]) for m in members]
        for m in members:
            t = times[starts[m]:ends[m]]
            baseline = np.mean([np.interp(t, xs, ys, right=0.0) for xs, ys in curves], axis=0)
            adv[starts[m]:ends[m]] = returns[starts[m]:ends[m]] - baseline
    return adv.astype(np.float32)


def timed_returns(rewards: np.ndarray, times: np.ndarray, bounds: tuple[np.ndarray, np.ndarray],
                  half_life: float) -> np.ndarray:
    """Each decision's return-to-go with the rewards discounted by simulated time: R_i =
    r_i + 2^(-(t_{i+1} - t_i) / half_life) R_{i+1} within an episode (``half_life`` in the
    unit of ``times``; 0: undiscounted). Where one decision's consequences fade within
    minutes but an episode lasts an hour, this trades a little bias for much less of the
    noise that the later decisions add to its return."""
    out = np.zeros(len(rewards), dtype=np.float64)
    for start, end in zip(*bounds):
        running = 0.0
        for i in range(end - 1, start - 1, -1):
            if half_life > 0 and i + 1 < end:
                running *= 2.0 ** (-(times[i + 1] - times[i]) / half_life)
            running = rewards[i] + running
            out[i] = running
    return out.astype(np.float32)


def group_returns(rewards: np.ndarray, times: np.ndarray, bounds: tuple[np.ndarray, np.ndarray],
                  options: FinetuneOptions) -> np.ndarray:
    """The returns-to-go that a group baseline compares: discounted by simulated time
    (``--half-life``) when set, else by ``--gamma`` per decision."""
    if options.half_life > 0:
        return timed_returns(rewards, times, bounds, options.half_life)
    starts, ends = (np.asarray(b, dtype=np.int64) for b in bounds)
    dones = np.zeros(len(rewards), dtype=bool)
    dones[ends[ends > starts] - 1] = True
    return returns_to_go(rewards, dones, options.gamma)


def ensure_value_head(model: NetLLM, seed: int = 0) -> None:
    """A value head on the hidden state (saved with the adapter; eval ignores it),
    initialised from ``seed`` alone."""
    if VALUE_HEAD in model.heads:
        return
    spec = HeadSpec("regression", steps=1, dims=1)
    model.config.heads[VALUE_HEAD] = spec
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.heads[VALUE_HEAD] = build_head(spec, model.hidden_size).to(model.device)


def _value(model: NetLLM, hidden: torch.Tensor) -> torch.Tensor:
    return model.heads[VALUE_HEAD](hidden)[..., 0, 0]


def _scatter(rows: np.ndarray, mask: np.ndarray, values: torch.Tensor, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[rows[mask]] = values.detach().cpu().numpy()[mask]
    return out


def _window_rows(ends: np.ndarray, k: int) -> np.ndarray:
    return ends[:, None] + np.arange(-k + 1, 1)[None, :]


def run_config(options: FinetuneOptions) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (all but ``iterations``)."""
    from netllm.train import launched_processes

    config = {"grad_accum": 1, **asdict(options), "adapter": str(Path(options.adapter).resolve())}
    config.pop("iterations")
    if launched_processes() > 1:  # N processes take minibatches of N x batch_size: another run
        config["processes"] = launched_processes()
    return config


def check_run_folder(out: Path, options: FinetuneOptions, resume: bool) -> None:
    """Before anything is written: a folder that holds another run's checkpoint is refused."""
    state_file = Path(out) / "train" / "checkpoint" / "trainer_state.json"
    if not state_file.is_file():
        return
    if not resume:
        raise NetLLMError(f"--out {out}: holds a run already; --resume it or choose another folder")
    try:
        stored = json.loads(state_file.read_text()).get("config", {})
    except (OSError, ValueError):
        raise NetLLMError(f"--resume: {state_file} is unreadable") from None
    stored = {k: v for k, v in stored.items() if k != "iterations"}
    want = run_config(options)
    for f in fields(options):  # an option added since that run was started: its default is what it ran with
        if f.name not in stored and f.name in want and want[f.name] == f.default:
            stored[f.name] = f.default
    if stored != want:
        diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
        raise NetLLMError(f"--resume: {out} holds another run (it differs in {', '.join(diff[:5])})")


def run_finetune(model: NetLLM, ref: NetLLM, hooks: OnlineHooks, options: FinetuneOptions, out: Path, *,
                 seeds_of: Callable[[int], list[int]], extra: dict[str, Any], resume: bool = False,
                 progress: bool = True) -> Path:
    """PPO iterations on ``model`` (the offline adapter, trainable), ``ref`` frozen; the
    best-on-validation adapter goes to ``out``. ``seeds_of(i)`` gives iteration i's rollout seeds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from netllm.train import Processes

    out = Path(out)
    ensure_value_head(model, options.seed)
    k = model.config.rl.context_steps
    check_run_folder(out, options, resume)
    config = run_config(options)
    names = [n for n, _ in trainable_named_parameters(model)]
    params = [p for _, p in trainable_named_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    (out / "train").mkdir(parents=True, exist_ok=True)
    state = resume_checkpoint(out / "train", model, optimizer, names, grad_accum=1, resume=resume)
    start = int(state["step"]) if state else 0
    procs = Processes(model, _ppo_loss)  # after the weights are final: DDP starts from rank 0's
    # wall time counts the run before a resume too, as adapt's does (metrics.csv, the adapter)
    t0 = time.perf_counter() - (float(state.get("elapsed_s", 0.0)) if state else 0.0)
    keeper = BestAdapter(out, hooks.metric, hooks.higher_is_better, resume=resume,
                         extra=lambda: {**extra, "finetune": {**asdict(options), "seconds": time.perf_counter() - t0}})
    history = _read_history(out) if resume else []
    history = [row for row in history if int(row["iteration"]) <= start]
    writer = _tensorboard(out) if procs.main else None
    spread = Spread(hooks, options.adapter, model.config.task, procs)
    with Progress(TextColumn("[bold]finetune[/bold] {task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeRemainingColumn(), disable=not (progress and procs.main)) as bar:
        task_id = bar.add_task("", total=options.iterations, completed=start)
        if start == 0:  # the offline adapter is a candidate too: fine-tuning never keeps worse
            model.eval()
            score = float(hooks.validate(model, spread))
            if procs.main:
                keeper.update(model, score, 0)
                row0: dict[str, Any] = {"iteration": 0, f"valid_{hooks.metric}": score, "best": True}
                reference = getattr(hooks, "reference", None)  # the imitated policy on the same episodes
                scored = reference() if reference is not None else None
                if scored is not None:
                    row0["reference"], row0[f"reference_{hooks.metric}"] = scored
                history.append({**row0, "wall_s": time.perf_counter() - t0})
                _write_history(out, history)
        for it in range(start + 1, options.iterations + 1):
            row = _iteration(model, ref, hooks, options, it, k, optimizer, params, seeds_of(it), spread, procs)
            if it % options.valid_every == 0 or it == options.iterations:
                model.eval()
                row[f"valid_{hooks.metric}"] = float(hooks.validate(model, spread))
                row["best"] = bool(keeper.update(model, row[f"valid_{hooks.metric}"], it)) if procs.main else False
            row["wall_s"] = time.perf_counter() - t0
            if procs.main:
                save_checkpoint(out / "train", model, optimizer,
                                {**new_trainer_state(names, {**config, "iterations": options.iterations}),
                                 "step": it, "loss": row["loss"], "elapsed_s": row["wall_s"]})
                history.append(row)
                _write_history(out, history)
            procs.wait()  # the checkpoint is whole before any process goes on
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "iteration":
                        writer.add_scalar(key, float(value), it)
                writer.flush()
            bar.update(task_id, advance=1, description=f"iteration {it}: " + ", ".join(
                f"{key} {row[key]:.3g}" for key in row if key in ("return", hooks.metric, f"valid_{hooks.metric}")))
    if writer is not None:
        writer.close()
    if not procs.main:
        procs.wait()  # the main process writes the plot and the final adapter
        return out
    _plot(out, history, hooks.metric)
    kept = keeper.finish(model)
    procs.wait()
    return kept


_STATS = ("loss", "policy_loss", "value_loss", "entropy", "kl", "clip_frac")


def _ppo_loss(model: NetLLM, batch: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One process's part of a PPO minibatch: the loss to back-propagate and the
    minibatch's statistics (``_STATS``). Each term is a sum over this process's scored
    steps divided by ``total``, the steps of the whole minibatch, so that summed over the
    processes they are the minibatch means; the loss is multiplied by ``world`` because
    DDP averages the gradients over the processes."""
    hooks, roll, ends, rows, score, t, options, total, world = batch
    dev = model.device
    logp, entropy, hidden, real = hooks.log_probs(model, roll, ends)
    m = torch.from_numpy(score).to(dev) & real
    idx = torch.from_numpy(rows).to(dev)[m]
    v = _value(model, hidden if options.shared_value else hidden.detach())[m]
    policy_loss, ent_sum, kl, clipped = ppo_terms(logp[m], entropy[m], t["old"][idx], t["adv"][idx], t["ref"][idx],
                                                  options.clip)
    value_loss = (v - t["target"][idx]).pow(2).sum()
    policy_loss, value_loss, ent_sum, kl, clip_frac = (x / total for x in (policy_loss, value_loss, ent_sum, kl,
                                                                           clipped))
    loss = policy_loss + options.value_coef * value_loss - options.entropy_coef * ent_sum + options.kl_coef * kl
    stats = torch.stack([loss, policy_loss, value_loss, ent_sum, kl, clip_frac]).detach().to(torch.float64)
    return loss * world, stats


def ppo_terms(logp: torch.Tensor, entropy: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor,
              clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's terms summed over the scored steps (the caller divides by the step count):
    the clipped surrogate to minimise, the entropy, the KL towards the reference policy
    (k3 estimator: exp(r) - r - 1 with r = log p_ref - log p) and the count of clipped
    ratios. ``logp``/``entropy`` under the weights being trained; ``old`` the
    log-probabilities under the weights that acted, ``ref`` under the reference."""
    ratio = torch.exp(logp - old)
    policy = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).sum()
    log_ratio_ref = ref - logp
    kl = (torch.exp(log_ratio_ref) - log_ratio_ref - 1).sum()
    return policy, entropy.sum(), kl, ((ratio - 1).abs() > clip).float().sum()


def _iteration(model: NetLLM, ref: NetLLM, hooks: OnlineHooks, options: FinetuneOptions, it: int, k: int,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], seeds: list[int],
               spread: Spread, procs: Any) -> dict[str, Any]:
    torch.manual_seed(options.seed * 1_000_003 + it)  # LoRA dropout, anything the update draws
    t0 = time.perf_counter()
    model.eval()
    roll = hooks.rollout(model, seeds, spread)
    rollout_s = time.perf_counter() - t0
    pool = roll.pool
    ends, score = tiles(pool, k)
    rows = _window_rows(ends, k)
    n = len(pool)
    old = np.zeros(n, dtype=np.float32)
    ref_logp = np.zeros(n, dtype=np.float32)
    values = np.zeros(n, dtype=np.float32)
    counts = np.zeros(len(ends), dtype=np.float32)  # scored real steps of each window
    chunks = np.array_split(np.arange(len(ends)), max(1, math.ceil(len(ends) / 32)))
    with torch.no_grad():  # each process takes every world-th chunk; the sums add up the rest
        for chunk in chunks[procs.rank::procs.world]:
            logp, _, hidden, real = hooks.log_probs(model, roll, ends[chunk])
            m = score[chunk] & real.cpu().numpy()
            counts[chunk] = m.sum(1)
            old += _scatter(rows[chunk], m, logp, n)
            values += _scatter(rows[chunk], m, _value(model, hidden), n)
            rlogp, _, _, _ = hooks.log_probs(ref, roll, ends[chunk])
            ref_logp += _scatter(rows[chunk], m, rlogp, n)
    if procs.world > 1:
        summed = procs.sum(torch.from_numpy(np.concatenate([old, ref_logp, values, counts]))).numpy()
        old, ref_logp, values, counts = summed[:n], summed[n:2 * n], summed[2 * n:3 * n], summed[3 * n:]
    scale = float(model.config.rl.return_scale)
    if roll.groups is not None:  # the task played every input several times: Decima's baseline
        target = group_returns(pool.rewards / scale, roll.times, pool.episode_bounds, options)
        adv = group_advantages(target, roll.times, pool.episode_bounds, roll.groups)
    else:
        adv, target = gae(pool.rewards / scale, values, pool.dones, options.gamma, options.gae_lambda)
    adv_n = (adv - adv.mean()) / (adv.std() + 1e-8)
    dev = model.device
    tensors = {"adv": torch.from_numpy(adv_n).to(dev), "target": torch.from_numpy(target).to(dev),
               "old": torch.from_numpy(old).to(dev), "ref": torch.from_numpy(ref_logp).to(dev)}
    rng = np.random.default_rng([options.seed, it])
    # the update runs without dropout (eval mode): the ratio compares the policy that acted
    # with the one being trained, not two dropout masks
    sums = torch.zeros(len(_STATS), dtype=torch.float64)
    steps = 0
    size = options.batch_size * procs.world  # each process takes batch_size windows of it
    for _ in range(options.epochs):
        order = rng.permutation(len(ends))
        for b in range(0, len(order), size):
            pick = order[b:b + size]
            total = max(1.0, float(counts[pick].sum()))
            mine = pick[procs.rank::procs.world]
            mask = score[mine]
            if len(mine) == 0:  # a short last minibatch: this process still takes part, weighing nothing
                mine, mask = pick[:1], np.zeros_like(score[pick[:1]])
            loss, stats = procs.loss((hooks, roll, ends[mine], rows[mine], mask, tensors, options, total,
                                      procs.world))
            optimizer.zero_grad(set_to_none=True)
            procs.backward(loss)
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            steps += 1
            sums += procs.sum(stats.cpu())
    model.eval()
    means = (sums / max(steps, 1)).tolist()
    return {"iteration": it, **dict(zip(_STATS, means)),
            "return": float(pool.episode_returns().mean() / scale), **roll.stats, "decisions": n,
            "rollout_s": rollout_s, "iteration_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- records


def _read_history(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_path(out / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the CSV and the PNG still record everything
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _plot(out: Path, history: list[dict[str, Any]], metric: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    valid_rows = history
    history = [r for r in history if int(r["iteration"]) > 0]  # iteration 0: the offline adapter, validated only
    its = [r["iteration"] for r in history]
    axes[0].plot(its, [r.get(metric) for r in history], marker=".", label=f"training rollouts ({metric})")
    valid = [(r["iteration"], r[f"valid_{metric}"]) for r in valid_rows if r.get(f"valid_{metric}") not in (None, "")]
    if valid:
        axes[0].plot(*zip(*valid), marker="o", label="validation")
    reference = valid_rows[0].get(f"reference_{metric}")
    if reference not in (None, ""):
        axes[0].axhline(float(reference), color="grey", linestyle="--",
                        label=f"{valid_rows[0].get('reference')} (validation)")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel(metric)
    axes[0].legend()
    axes[1].plot(its, [r["kl"] for r in history], marker=".", label="KL to the offline policy")
    axes[1].plot(its, [r["entropy"] for r in history], marker=".", label="entropy")
    axes[1].set_xlabel("iteration")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(out / "learning_curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def describe(out: Path) -> str:
    """One line about a finished fine-tuning run (the CLI prints it)."""
    if not (out / ADAPTER_CONFIG).is_file():  # a task's own kind of run (e.g. a baseline's network fine-tuned)
        return f"run: {out}"
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    best = (config.get("extra") or {}).get("best")
    return f"adapter: {out} (best on validation: {best})"
