"""The NetLLM scheduler for CJS: DD-LRNA on CJS pools, KV-cached decisions.

The data flow:  CJSEnv -> (Decima | Fair | FIFO) -> pool.npz (``pool.py``: collect)
                pool -> return-conditioned offline RL (adapt) -> adapter folder
                adapter + frozen GNN -> NetLLMCJSPolicy (eval), one LLM pass per decision

Per decision the frozen pretrained Decima GNN turns the active job DAGs into candidate
features (one per runnable stage) and two state vectors, ``global`` and ``pooled``
(``features.py``). From them:

* the two **state tokens** embed ``global`` and ``pooled``;
* the **stage head** (``CandidateScoreHead``) scores every candidate from the hidden
  state at the last state token (softmax over the variable-size runnable set);
* the **executor head** (categorical over limits 1..``num_exec_classes``, masked to the
  chosen stage's job cap) reads that hidden state plus an embedding of the chosen
  candidate (encoder ``chosen``), so the limit depends on which job was picked;
* the **action token** embeds ``[chosen candidate (37), limit / classes]`` (a vector action,
  ``features.action_vector``).

A step is ``[return-to-go, global, pooled, action]`` (4 tokens), context K steps;
returns-to-go are divided by ``RETURN_SCALE`` (``pool.py``, with the reward and the
pool layout).
"""

from __future__ import annotations

import random
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec, stable_argmax
from netllm.model import NetLLM, NetLLMConfig, read_adapter_config
from netllm.options import opt
from netllm.recipe import Recipe, decision_speed, run_adaptation
from netllm.rl import (ExperiencePool, IncrementalPolicy, RLSpec, WindowBatch, WindowSampler, decision_hidden,
                       target_return)
from netllm.tasks.cjs.baselines import EpisodeResult, make_scheduler, run_episode
from netllm.tasks.cjs.decima import DecimaNet
from netllm.tasks.cjs.features import (ACTION_DIM, CANDIDATE_DIM, FEATURE_VERSION, GLOBAL_DIM, POOLED_DIM,
                                       action_vector, exec_mask, featurize_batch, load_gnn)
from netllm.tasks.cjs.pool import RETURN_SCALE, check_pool
from netllm.tasks.cjs.sim import CJSAction, CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError, seed_everything, torch_threads

STATE_TOKENS = ("global", "pooled")
NUM_EXEC_CLASSES = 50  # executor limits 1..50 (the default cluster)
MAX_TIMESTEP = 8192  # time-step table: a 200-job episode has ~5-6k decisions
# (A single learned row was tried together with a best-of pool; the pool, not the
# table, made that run worse — README, "A best-of pool without absolute time".)


# ----------------------------------------------------------------------------- model


def model_config(*, llm: str = "smollm2", layers: int | None = 4, rank: int = 16, context: int = 20,
                 pretrained: bool = True, seed: int = 0, gnn: str = "decima",
                 num_exec_classes: int = NUM_EXEC_CLASSES) -> NetLLMConfig:
    """NetLLM for CJS: two state tokens, a candidate-score head and an executor-limit head."""
    return NetLLMConfig(
        task="cjs", llm=llm, layers=layers, lora=LoraSpec(rank=rank), pretrained=pretrained, seed=seed,
        encoders=[
            EncoderSpec("global", "scalar", in_dim=GLOBAL_DIM),
            EncoderSpec("pooled", "scalar", in_dim=POOLED_DIM),
            EncoderSpec("chosen", "scalar", in_dim=CANDIDATE_DIM),  # conditions the executor head
        ],
        heads={"stage": HeadSpec("candidates", candidate_dim=CANDIDATE_DIM, hidden_layers=2, width=256),
               "executors": HeadSpec("categorical", num_classes=num_exec_classes)},
        rl=RLSpec(state_modalities=STATE_TOKENS, context_steps=context, max_timestep=MAX_TIMESTEP,
                  action_kind="vector", action_dim=ACTION_DIM, return_scale=RETURN_SCALE),
        norm={"return_scale": RETURN_SCALE, "gnn": gnn, "feature_version": FEATURE_VERSION,
              "num_exec_classes": num_exec_classes},
    )


# ----------------------------------------------------------------------------- training


@dataclass
class CJSBatch:
    """K-step windows plus the candidates and logged actions the heads need."""

    window: WindowBatch  # actions = action vectors (B, K, ACTION_DIM)
    candidates: torch.Tensor  # (B, K, M, C)
    cand_mask: torch.Tensor  # (B, K, M)
    cand_caps: torch.Tensor  # (B, K, M)
    stage: torch.Tensor  # (B, K)
    num_exec: torch.Tensor  # (B, K)


class CJSWindowSampler(WindowSampler):
    """``WindowSampler`` that also gathers the candidate arrays of every window step."""

    def __init__(self, pool: ExperiencePool, spec: RLSpec, batch_size: int, seed: int = 0,
                 num_exec_classes: int = NUM_EXEC_CLASSES) -> None:
        super().__init__(pool, spec, batch_size, seed)
        self.num_exec_classes = num_exec_classes

    def cjs_windows(self, end_rows: np.ndarray) -> CJSBatch:
        w = self.windows(end_rows)
        K = self.spec.context_steps
        end_rows = np.asarray(end_rows, dtype=np.int64)
        rows = end_rows[:, None] + np.arange(-K + 1, 1)[None, :]
        mask = w.mask.numpy()
        rows = np.where(mask, rows, end_rows[:, None])
        st = self.pool.states
        cand = torch.from_numpy(st["candidates"][rows]).float()
        cmask = torch.from_numpy(st["cand_mask"][rows] & mask[:, :, None])
        caps = torch.from_numpy(st["cand_caps"][rows]).long()
        acts = torch.from_numpy(self.pool.actions[rows]).long()
        stage = acts[..., 0].clamp(min=0)
        num_exec = acts[..., 1].clamp(min=1)
        chosen = cand.gather(2, stage[:, :, None, None].expand(-1, -1, 1, cand.shape[-1]))[:, :, 0]
        vec = action_vector(chosen, num_exec.clamp(max=self.num_exec_classes), self.num_exec_classes)
        vec = vec * torch.from_numpy(mask)[:, :, None]  # padding steps: zeros, as WindowSampler
        window = WindowBatch(states=w.states, actions=vec, rtg=w.rtg, timesteps=w.timesteps, mask=w.mask)
        return CJSBatch(window, cand, cmask, caps, stage, num_exec)

    def batch(self, i: int) -> CJSBatch:  # type: ignore[override]
        rng = np.random.default_rng([self.seed, i])
        return self.cjs_windows(rng.integers(0, len(self.pool), size=self.batch_size))


def head_logits(model: NetLLM, hidden: torch.Tensor, candidates: torch.Tensor, cand_mask: torch.Tensor,
                chosen: torch.Tensor | None = None, caps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage scores (n, M) and, given the chosen candidate (n, C) and its cap (n,), the
    executor-limit logits (n, classes)."""
    dev = model.device
    stage_logits = model.heads["stage"](hidden, candidates.to(dev), cand_mask.to(dev))
    if chosen is None:
        return stage_logits, None
    classes = model.heads["executors"].num_classes
    exec_hidden = hidden + model.encoders("chosen", chosen.to(dev))
    exec_logits = model.heads["executors"](exec_hidden, exec_mask(caps.to(dev), classes))
    return stage_logits, exec_logits


def cjs_loss(model: NetLLM, batch: CJSBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the logged stage (over the runnable set) + of the logged limit."""
    dev = model.device
    hidden = decision_hidden(model, batch.window)  # (B, K, H)
    real = batch.window.mask.to(dev)
    h = hidden[real]
    cand = batch.candidates.to(dev)[real]
    stage = batch.stage.to(dev)[real]
    rows = torch.arange(len(stage), device=dev)
    chosen = cand[rows, stage]
    caps = batch.cand_caps.to(dev)[real][rows, stage]
    stage_logits, exec_logits = head_logits(model, h, cand, batch.cand_mask.to(dev)[real], chosen, caps)
    assert exec_logits is not None
    classes = exec_logits.shape[-1]
    target = (batch.num_exec.to(dev)[real] - 1).clamp(min=0)
    target = torch.minimum(target, caps.clamp(1, classes) - 1)
    stage_loss = F.cross_entropy(stage_logits, stage)
    exec_loss = F.cross_entropy(exec_logits, target)
    metrics = {
        "stage_loss": stage_loss.item(), "exec_loss": exec_loss.item(),
        "stage_accuracy": (stage_logits.argmax(-1) == stage).float().mean().item(),
        "exec_accuracy": (exec_logits.argmax(-1) == target).float().mean().item(),
        "tokens": int(real.sum().item()) * model.config.rl.tokens_per_step,
    }
    return stage_loss + exec_loss, metrics


# ----------------------------------------------------------------------------- policy


def decode_temperature(decode: str) -> float:
    """``--decode``: ``argmax`` (the most likely stage and limit: temperature 0), ``sample``
    (from the heads' distributions, as Decima does: temperature 1) or ``sample:T`` (from
    softmax(logits / T), T > 0; T < 1 sharpens towards the arg-max)."""
    kind, sep, temp = str(decode).partition(":")
    try:
        if kind == "argmax" and not sep:
            return 0.0
        if kind == "sample":
            value = float(temp) if sep else 1.0
            if value > 0 and np.isfinite(value):
                return value
    except ValueError:
        pass
    raise NetLLMError(f"--decode: argmax, sample or sample:T (a temperature T > 0), got {decode!r}")


class NetLLMCJSPolicy:
    """A trained adapter behind the schedulers' interface (``reset`` / ``act``, one
    episode) and the batch protocol of ``vec.run_episodes`` (many episodes, one LLM call
    per round), deciding with the KV cache on a CPU (``use_cache=False`` recomputes the
    whole context: a control, and the default on a GPU, ``rl.default_use_cache``). The
    episode runner passes each reward to ``observe`` (it lowers the target return).
    Batch 1 is the same path: ``reset`` opens one slot."""

    def __init__(self, model: NetLLM, target: float, gnn: DecimaNet, temperature: float = 0.0,
                 name: str = "netllm", use_cache: bool | None = None, num_threads: int | None = 1) -> None:
        self.model, self.target, self.gnn = model, target, gnn
        self.num_threads = num_threads  # a few tokens per decision: one thread avoids OpenMP contention
        self.temperature = float(temperature)  # 0: arg-max; T > 0: sample from softmax(logits / T)
        self.name, self.use_cache = name, use_cache
        self.classes = model.heads["executors"].num_classes
        self.inc: IncrementalPolicy | None = None
        # called after every batch of decisions: (slots, features, conditioned rtg (scaled), actions);
        # online fine-tuning records its rollouts with it
        self.on_decisions: Any = None
        self.open(1)

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto", target: float | None = None,
                     decode: str | None = None, gnn: DecimaNet | None = None) -> "NetLLMCJSPolicy":
        """``decode`` (see ``decode_temperature``); None: as the adapter's recipe was validated
        (arg-max if unrecorded)."""
        config = read_adapter_config(folder)
        if decode is None:
            decode = str(config.get("extra", {}).get("recipe", {}).get("decode", "argmax"))
        temperature = decode_temperature(decode)
        model = NetLLM.from_adapter(folder, task="cjs", device=device, merge=True)
        goal = target if target is not None else config.get("extra", {}).get("target_return")
        if goal is None:
            raise NetLLMError(f"{folder}: adapter config has no target_return; pass target=")
        net = gnn if gnn is not None else load_gnn(config.get("norm", {}).get("gnn", "decima"))
        return cls(model, float(goal), net, temperature=temperature, name=Path(folder).name)

    # ------------------------------------------------------------ the batch protocol

    def open(self, slots: int) -> None:
        """Room for ``slots`` concurrent episodes (their contexts, caches and streams)."""
        self.inc = IncrementalPolicy(self.model, target=self.target, batch_size=slots, use_cache=self.use_cache)
        self.prev_action: list[torch.Tensor | None] = [None] * slots
        self.reward_since = [0.0] * slots
        self.rngs = [random.Random(0) for _ in range(slots)]

    def start(self, slot: int, seed: int | None, env: Any = None) -> None:
        """A new episode in ``slot``; its own sampling stream (never the simulator's)."""
        assert self.inc is not None
        self.inc.restart([slot], self.target)
        self.prev_action[slot], self.reward_since[slot] = None, 0.0
        self.rngs[slot] = random.Random(seed)

    def observe(self, reward: float, slot: int = 0) -> None:
        self.reward_since[slot] += float(reward)

    def end(self, slot: int) -> None:
        assert self.inc is not None
        self.inc.finish([slot])

    def act_batch(self, slots: list[int], observations: list[CJSObservation]) -> list[CJSAction]:
        """One decision per (slot, observation): the GNN over all their job DAGs in one pass,
        one LLM call for all that have a stage to schedule (others: no decision)."""
        actions = [CJSAction(-1, int(o.num_committable_execs)) for o in observations]
        deciding = [i for i, o in enumerate(observations) if len(o.runnable)]
        if deciding:
            with torch_threads(self.num_threads), torch.no_grad():
                picked = self._decide_batch([slots[i] for i in deciding], [observations[i] for i in deciding])
            for i, action in zip(deciding, picked):
                actions[i] = action
        return actions

    # ------------------------------------------------------------ one episode

    def reset(self, seed: int | None = None, rng: random.Random | None = None) -> None:
        self.open(1)
        self.start(0, seed)

    def act(self, obs: CJSObservation) -> CJSAction:
        return self.act_batch([0], [obs])[0]

    # ------------------------------------------------------------ the decision

    def _pick(self, logits: torch.Tensor, rng: random.Random) -> int:
        if not self.sample:  # near-ties go to the first candidate: batch 1 and batch N decide alike
            return int(stable_argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.temperature, -1).numpy()
        return rng.choices(range(probs.size), probs)[0]

    def _decide_batch(self, rows: list[int], observations: list[CJSObservation]) -> list[CJSAction]:
        assert self.inc is not None, "open() first"
        dev = self.model.device
        feats = featurize_batch(self.gnn, observations)
        recorded = [r for r in rows if self.prev_action[r] is not None]
        if recorded:
            self.inc.record(torch.cat([self.prev_action[r] for r in recorded]),
                            torch.tensor([self.reward_since[r] for r in recorded]), rows=recorded)
            for r in recorded:
                self.reward_since[r] = 0.0
        rtg = self.inc.rtg[rows].clone()
        hidden = self.inc.decide({"global": torch.from_numpy(np.stack([f.glob for f in feats])),
                                  "pooled": torch.from_numpy(np.stack([f.pooled for f in feats]))}, rows=rows)
        counts = [len(f.caps) for f in feats]
        cand = torch.zeros(len(feats), max(counts), CANDIDATE_DIM)
        mask = torch.zeros(len(feats), max(counts), dtype=torch.bool)
        for i, f in enumerate(feats):
            cand[i, :counts[i]] = torch.from_numpy(f.candidates)
            mask[i, :counts[i]] = True
        stage_logits, _ = head_logits(self.model, hidden, cand, mask)
        stages = [self._pick(stage_logits[i, :counts[i]], self.rngs[r]) for i, r in enumerate(rows)]
        chosen = torch.stack([cand[i, s] for i, s in enumerate(stages)])
        caps = torch.tensor([int(f.caps[s]) for f, s in zip(feats, stages)], device=dev)
        exec_hidden = hidden + self.model.encoders("chosen", chosen.to(dev))
        exec_logits = self.model.heads["executors"](exec_hidden, exec_mask(caps, self.classes))
        limits = [self._pick(exec_logits[i], self.rngs[r]) + 1 for i, r in enumerate(rows)]
        vectors = action_vector(chosen, torch.tensor(limits), self.classes).to(dev)
        for i, r in enumerate(rows):
            self.prev_action[r] = vectors[i:i + 1]
        actions = [CJSAction(s, n) for s, n in zip(stages, limits)]
        if self.on_decisions is not None:
            self.on_decisions(rows, feats, rtg.cpu().numpy(), actions)
        return actions


def run_netllm_episode(env: CJSEnv, policy: Any, seed: int | None = None, max_decisions: int | None = None
                       ) -> EpisodeResult:
    """``run_episode`` for a return-conditioned policy: each reward goes to ``observe``.
    ``max_decisions`` stops early (timings); the JCT is then that of the jobs so far."""
    start = time.perf_counter()
    obs, _ = env.reset(seed)
    policy.reset(seed)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
        policy.observe(reward)
        total += reward
        if terminated or truncated or (max_decisions is not None and env.num_decisions >= max_decisions):
            break
    return EpisodeResult(
        scheduler=getattr(policy, "name", "netllm"), seed=seed, avg_jct_s=env.avg_jct_s, total_reward=total,
        num_events=env.num_events, num_decisions=env.num_decisions, sim_time_ms=env.wall_time_ms,
        wall_s=time.perf_counter() - start, records=env.job_records(),
    )


# ----------------------------------------------------------------------------- adaptation


DECODE_HELP = ("How NetLLM adapters decide: argmax, sample (from the heads, as Decima samples) or "
               "sample:T (temperature T > 0).")


@dataclass
class CJSRecipe(Recipe):
    """Every hyper-parameter of CJS adaptation, visible in one place; ``netllm adapt cjs``
    and ``netllm bench cjs`` share these defaults: the README's best recipe (runs/cjs-d48):
    SmolLM2 cut to 4 layers, LoRA r = 16, upstream's context K = 20, 3,000 cosine-decayed
    steps, validated every 500 steps on one episode of 100 jobs (validation seed 1000,
    never a test seed), decided by sampling from the heads. (Upstream with Llama2-7B:
    rank 128, lr 1e-4, K = 20.)"""

    layers: int | None = opt(4, "Keep only the first N decoder layers.", min=1)
    context: int = opt(20, "Context window K in decision steps (upstream: 20).", min=1)
    steps: int = opt(3000, "Optimizer steps.", min=1)
    warmup_steps: int = opt(50, "Linear warm-up steps (at most a quarter of the run).", min=0)
    schedule: str = opt("cosine", "Learning rate after warm-up.", choices=("constant", "linear", "cosine"))
    eval_every: int = opt(500, "Validate every N steps (one episode) and keep the best adapter (0: keep the last).",
                          min=0)
    target_quantile: float = opt(0.9, "Target return at run time: this quantile of the pool's returns.",
                                 min=0, max=1)
    eval_jobs: int = opt(100, "Jobs of the validation episode.", min=1)
    eval_seed: int = opt(1000, "Job sequence of the validation episode (keep it apart from the test seeds).",
                         min=0)
    decode: str = opt("sample", DECODE_HELP + " Used for validation and recorded in the adapter.")

    def check(self) -> None:
        super().check()
        decode_temperature(self.decode)


def recipe_of(options: CJSRecipe) -> CJSRecipe:
    """The plain recipe of adapt / bench options (their own fields dropped)."""
    return CJSRecipe(**{f.name: getattr(options, f.name) for f in dataclasses.fields(CJSRecipe)})


def adapt(pool: ExperiencePool, out: Path, recipe: CJSRecipe, *, device: str = "auto", resume: bool = False,
          progress: bool = True, templates: Any = None) -> Path:
    """DD-LRNA for CJS: return-conditioned offline RL on the pool; returns the adapter folder."""
    check_pool(pool, out)
    seed_everything(recipe.seed)
    gnn_source = str(pool.meta.get("gnn", "decima"))
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, context=recipe.context,
                          pretrained=recipe.pretrained, seed=recipe.seed, gnn=gnn_source)
    model = NetLLM(config, device=device)
    sampler = CJSWindowSampler(pool, config.rl, batch_size=recipe.batch_size, seed=recipe.seed)
    goal = target_return(pool, recipe.target_quantile)
    validate = None
    if recipe.eval_every > 0:
        gnn = load_gnn(gnn_source)
        valid = CJSConfig(num_jobs=recipe.eval_jobs, num_executors=int(pool.meta.get("executors", 50)))

        def validate(m: NetLLM) -> float:
            env = CJSEnv.from_config(valid, templates=templates)
            policy = NetLLMCJSPolicy(m, goal, gnn, temperature=decode_temperature(recipe.decode))
            return run_netllm_episode(env, policy, seed=recipe.eval_seed).avg_jct_s

    return run_adaptation(model, sampler.batch, cjs_loss, recipe, out, steps=recipe.total_steps(len(pool)),
                          metric="jct_s", higher_is_better=False, validate=validate, resume=resume,
                          progress=progress, extra=lambda: {"target_return": goal, "pool": pool.meta})


# ----------------------------------------------------------------------------- speed


def speed_report(adapter: Path, device: str = "auto", decisions: int = 300, jobs: int = 200,
                 seed: int = 1) -> dict[str, float]:
    """NetLLM decision latency with the KV cache vs full recompute (the first ``decisions``
    decisions of one default-setting episode), and simulated events/s under FIFO."""
    report: dict[str, float] = {}
    res = run_episode(CJSEnv(num_jobs=jobs), make_scheduler("fifo"), seed=seed)
    report["sim_events_per_s_fifo"] = res.events_per_s
    policy = NetLLMCJSPolicy.from_adapter(adapter, device=device)

    def play(use_cache: bool) -> tuple[float, int]:
        policy.use_cache = use_cache
        r = run_netllm_episode(CJSEnv(num_jobs=jobs), policy, seed=seed, max_decisions=decisions)
        return r.wall_s, r.num_decisions

    report.update(decision_speed(play))
    report["decisions_timed"] = float(decisions)
    return report
