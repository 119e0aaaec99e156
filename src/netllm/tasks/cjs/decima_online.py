"""The control of CJS online fine-tuning: the same PPO applied to Decima's own network.

    netllm finetune cjs --adapter decima --out runs/cjs-decima-ppo --iterations 100 --envs 8 --group 4

Does a NetLLM scheduler that improves online owe it to the LLM, or would the same
reinforcement learning improve the scheduler it imitated just as much? This answers the
second half: ``--adapter decima`` starts from Decima's published weights (its graph
network, every weight trainable) instead of an offline adapter and runs the iterations of
``netllm.finetune`` with the same options — the same training job sequences
(``seeds_of``), G episodes per sequence with their own sampling streams, advantages
against the group's mean return-to-go at the same simulated time
(``finetune.group_advantages``; Decima has no value head, so ``--group`` >= 2 is
required; ``--half-life`` discounts the rewards by simulated time), the clipped surrogate, entropy bonus and KL penalty towards the starting
weights (``finetune.ppo_terms``), ``--epochs`` passes in minibatches of ``--batch-size``
× 20 decisions (the decisions of ``--batch-size`` tiles of the recipe's K = 20), and
validation on ``--valid-seeds`` where Decima's published weights are the first row.

The run folder holds ``decima_model.pt`` (the best weights on validation, a state dict
that ``DecimaScheduler(weights=...)`` loads), ``decima.json`` (what was run, the best
iteration), ``metrics.csv``, TensorBoard scalars, ``learning_curve.png`` and an atomic
checkpoint every iteration; ``--resume`` continues exactly. ``netllm eval cjs --policy
<run folder>`` plays the kept weights as Decima is played (sampling from the simulator's
stream).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from netllm.finetune import (_plot, _read_history, _STATS, _tensorboard, _write_history, check_run_folder,
                             FinetuneOptions, group_advantages, group_returns, ppo_terms, run_config)
from netllm.tasks.cjs.baselines import DecimaScheduler
from netllm.tasks.cjs.decima import DecimaNet, build_decima, load_decima_state_dict
from netllm.tasks.cjs.sim import CJSAction, CJSConfig, CJSObservation
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import atomic_path, atomic_write_json

NAME = "decima"  # the --adapter value that selects this path
WEIGHTS = "decima_model.pt"
RECORD = "decima.json"
TILE_STEPS = 20  # decisions per --batch-size unit: the tiles of the CJS recipe (K = 20)


def is_decima_run(folder: Path) -> bool:
    return (Path(folder) / RECORD).is_file() and (Path(folder) / WEIGHTS).is_file()


def load_finetuned(folder: Path) -> DecimaScheduler:
    """The kept weights of a ``--adapter decima`` run, played as ``netllm eval`` plays Decima."""
    policy = DecimaScheduler(weights=Path(folder) / WEIGHTS)
    policy.name = "decima-finetuned"
    return policy


def _sample(logits: torch.Tensor, rng: random.Random) -> tuple[int, float]:
    logp = F.log_softmax(logits, 0)
    choice = rng.choices(range(len(logp)), logp.exp().tolist())[0]
    return choice, float(logp[choice])


class _Recorder:
    """Decima in ``vec.run_episodes``' batch protocol, sampling from a stream of each
    episode's own (episodes of a group share their jobs, not their draws), recording every
    decision: observation, stage, executor-limit index, log-probability, reward after it."""

    name = "decima-online"

    def __init__(self, net: DecimaNet) -> None:
        self.net = net
        self.episodes: dict[int, dict[str, Any]] = {}

    def open(self, slots: int) -> None:
        self.current: list[dict[str, Any]] = [{} for _ in range(slots)]
        self.rngs = [random.Random() for _ in range(slots)]

    def start(self, slot: int, seed: int | None, env: Any) -> None:
        self.rngs[slot] = random.Random(seed)
        self.current[slot] = {"seed": seed, "obs": [], "stage": [], "limit": [], "logp": [], "rewards": [],
                              "times": []}

    def act_batch(self, slots: list[int], observations: list[CJSObservation]) -> list[CJSAction]:
        actions = [CJSAction(-1, int(o.num_committable_execs)) for o in observations]
        deciding = [i for i, o in enumerate(observations) if len(o.runnable)]
        if not deciding:
            return actions
        with torch.inference_mode():
            embeddings = self.net.encode_batch([observations[i] for i in deciding])
            for i, (h, h_dag, h_glob) in zip(deciding, embeddings):
                obs, rng, ep = observations[i], self.rngs[slots[i]], self.current[slots[i]]
                stage, lp_stage = _sample(self.net.stage_logits(obs, h, h_dag, h_glob), rng)
                job = int(obs.node_job[obs.runnable[stage]])
                limit, lp_limit = _sample(self.net.exec_logits(obs, job, h_dag, h_glob), rng)
                actions[i] = CJSAction(int(stage), limit + 1)
                for key, value in (("obs", obs), ("stage", stage), ("limit", limit), ("logp", lp_stage + lp_limit),
                                   ("rewards", 0.0), ("times", obs.wall_time_ms * 1e-3)):
                    ep[key].append(value)
        return actions

    def observe(self, reward: float, slot: int) -> None:
        ep = self.current[slot]
        if ep["rewards"]:  # rewards before the first decision are nobody's
            ep["rewards"][-1] += float(reward)

    def end(self, slot: int) -> None:
        self.episodes[int(self.current[slot]["seed"])] = self.current[slot]


def log_probs(net: DecimaNet, observations: list[CJSObservation], stages: np.ndarray, limits: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (stage + executor limit) and entropy of logged decisions, one GNN
    pass over all their graphs; differentiable."""
    lps, ents = [], []
    for obs, (h, h_dag, h_glob), s, lim in zip(observations, net.encode_batch(observations), stages, limits):
        stage_lp = F.log_softmax(net.stage_logits(obs, h, h_dag, h_glob), 0)
        job = int(obs.node_job[obs.runnable[int(s)]])
        exec_lp = F.log_softmax(net.exec_logits(obs, job, h_dag, h_glob), 0)
        lps.append(stage_lp[int(s)] + exec_lp[int(lim)])
        ents.append(-(stage_lp.exp() * stage_lp).sum() - (exec_lp.exp() * exec_lp).sum())
    return torch.stack(lps), torch.stack(ents)


def validate(net: DecimaNet, seeds: list[int], config: CJSConfig, templates: Any = None) -> float:
    """Mean JCT of the weights played as ``netllm eval cjs`` plays Decima (the simulator's stream)."""
    policy = DecimaScheduler(state_dict={k: v.detach().clone() for k, v in net.state_dict().items()})
    return float(np.mean([r.avg_jct_s for r in run_episodes(policy, seeds, config, templates=templates)]))


def finetune_decima(options: Any, out: Path, seeds_of: Callable[[int], list[int]], train: CJSConfig,
                    valid: CJSConfig, valid_seeds: list[int], resume: bool = False, progress: bool = True,
                    templates: Any = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """PPO on Decima's network from its published weights (module docstring; ``weights``:
    other starting weights); ``options`` are ``netllm finetune cjs``'s. Returns the run folder."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(out)  # options were checked (CJSFinetuneOptions.check: --group >= 2)
    check_run_folder(out, options, resume)
    start_weights = load_decima_state_dict() if weights is None else weights
    net, ref = build_decima(start_weights), build_decima(start_weights).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    ckpt_dir = out / "train" / "checkpoint"
    state_file = ckpt_dir / "trainer_state.json"
    config = run_config(options)
    start, best = 0, None
    if resume and state_file.is_file():
        saved = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        start, best = int(saved["iteration"]), saved["best"]
    history = [row for row in (_read_history(out) if resume else []) if int(row["iteration"]) <= start]
    writer = _tensorboard(out)
    t0 = time.perf_counter()

    def keep(score: float, it: int) -> bool:
        nonlocal best
        if best is not None and score >= best["valid_jct_s"]:
            return False
        best = {"valid_jct_s": score, "iteration": it}
        with atomic_path(out / WEIGHTS) as tmp:
            torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp)
        atomic_write_json(out / RECORD, {"policy": NAME, "finetuned_from": "Decima's published weights",
                                         "best": best, "finetune": asdict(options)})
        return True

    with Progress(TextColumn("[bold]finetune decima[/bold] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(), disable=not progress) as bar:
        task_id = bar.add_task("", total=options.iterations, completed=start)
        if start == 0:  # the published weights: the reference and a candidate
            score = validate(net, valid_seeds, valid, templates)
            keep(score, 0)
            history.append({"iteration": 0, "valid_jct_s": score, "best": True, "reference": "decima",
                            "reference_jct_s": score, "wall_s": time.perf_counter() - t0})
            _write_history(out, history)
        for it in range(start + 1, options.iterations + 1):
            row = _iteration(net, ref, optimizer, options, it, seeds_of(it), train, templates)
            if it % options.valid_every == 0 or it == options.iterations:
                row["valid_jct_s"] = validate(net, valid_seeds, valid, templates)
                row["best"] = keep(row["valid_jct_s"], it)
            row["wall_s"] = time.perf_counter() - t0
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt_dir / "state.pt") as tmp:
                torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                            "best": best}, tmp)
            atomic_write_json(state_file, {"config": config, "step": it, "iterations": options.iterations})
            history.append(row)
            _write_history(out, history)
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    writer.add_scalar(key, float(value), it)
            writer.flush()
            bar.update(task_id, advance=1, description=f"iteration {it}: jct_s {row['jct_s']:.3g}" + (
                f", valid_jct_s {row['valid_jct_s']:.4g}" if "valid_jct_s" in row else ""))
    writer.close()
    _plot(out, history, "jct_s")
    return out


def rollout(net: DecimaNet, seeds: list[int], group: int, train: CJSConfig, templates: Any = None,
            options: FinetuneOptions | None = None) -> dict[str, Any]:
    """One sampled episode per seed, the episodes of a group of ``group`` consecutive seeds
    on the job sequence of its first; every decision with its advantage against the
    group's mean return-to-go at the same simulated time (normalised; the returns are
    ``finetune.group_returns``': discounted by ``options.half_life`` seconds of simulated
    time, else by ``options.gamma`` per decision; default: undiscounted)."""
    net.eval()
    rec = _Recorder(net)
    plays = [seeds[i - i % group] for i in range(len(seeds))]
    results = run_episodes(rec, seeds, train, templates=templates, sequences=plays)
    episodes = [rec.episodes[s] for s in seeds]
    lengths = np.array([len(ep["stage"]) for ep in episodes])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    cat = {key: np.concatenate([np.asarray(ep[key], dtype=np.float64) for ep in episodes])
           for key in ("stage", "limit", "logp", "rewards", "times")}
    rtg = group_returns(cat["rewards"], cat["times"], (starts, ends),
                        options or FinetuneOptions()).astype(np.float64)
    adv = group_advantages(rtg, cat["times"], (starts, ends), np.arange(len(seeds)) // group)
    return {"obs": [o for ep in episodes for o in ep["obs"]], "stage": cat["stage"].astype(np.int64),
            "limit": cat["limit"].astype(np.int64), "old": torch.from_numpy(cat["logp"].astype(np.float32)),
            "adv": torch.from_numpy(((adv - adv.mean()) / (adv.std() + 1e-8)).astype(np.float32)),
            "return": float(rtg[starts].mean()) if len(rtg) else 0.0,
            "jct_s": float(np.mean([r.avg_jct_s for r in results]))}


def update(net: DecimaNet, ref: DecimaNet, optimizer: torch.optim.Optimizer, batch: dict[str, Any], options: Any,
           it: int) -> list[float]:
    """PPO epochs over a rollout's decisions; the means of ``finetune._STATS`` (no value loss)."""
    obs, stages, limits = batch["obs"], batch["stage"], batch["limit"]
    n, size = len(obs), options.batch_size * TILE_STEPS
    with torch.no_grad():
        ref_lp = torch.cat([log_probs(ref, obs[b:b + size], stages[b:b + size], limits[b:b + size])[0]
                            for b in range(0, n, size)])
    rng = np.random.default_rng([options.seed, it])
    sums = torch.zeros(len(_STATS), dtype=torch.float64)
    steps = 0
    net.train()
    for _ in range(options.epochs):
        order = rng.permutation(n)
        for b in range(0, n, size):
            pick = order[b:b + size]
            lp, ent = log_probs(net, [obs[i] for i in pick], stages[pick], limits[pick])
            idx = torch.from_numpy(pick)
            policy, ent_sum, kl, clipped = (x / len(pick) for x in ppo_terms(
                lp, ent, batch["old"][idx], batch["adv"][idx], ref_lp[idx], options.clip))
            loss = policy - options.entropy_coef * ent_sum + options.kl_coef * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), options.max_grad_norm)
            optimizer.step()
            steps += 1
            sums += torch.stack([loss, policy, torch.zeros(()), ent_sum, kl, clipped]).detach().to(torch.float64)
    net.eval()
    return (sums / max(steps, 1)).tolist()


def _iteration(net: DecimaNet, ref: DecimaNet, optimizer: torch.optim.Optimizer, options: Any, it: int,
               seeds: list[int], train: CJSConfig, templates: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    batch = rollout(net, seeds, options.group, train, templates, options)
    rollout_s = time.perf_counter() - t0
    means = update(net, ref, optimizer, batch, options, it)
    return {"iteration": it, **dict(zip(_STATS, means)), "return": batch["return"], "jct_s": batch["jct_s"],
            "decisions": len(batch["obs"]), "rollout_s": rollout_s, "iteration_s": time.perf_counter() - t0}
