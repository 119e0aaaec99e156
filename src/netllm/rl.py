"""Offline RL core: experience pools, returns-to-go, K-step windows, and the
return-conditioned policy (Decision-Transformer style) with KV-cached inference.

Each time step contributes ``S + 2`` tokens to the LLM:

    [return-to-go, state token 1 .. state token S, action]

all with the same learned time-step embedding added. The hidden state at the LAST
state token of a step predicts that step's action (cross-entropy), so the action
never sees itself. At run time the policy is conditioned on a target return that
each received reward decreases.

Experience pool on disk: one ``.npz`` (no pickle) with

    state.<name>   (N, ...)  one array per state modality
    action         (N,) int  or (N, d) float
    reward         (N,) float32
    done           (N,) bool, True on the last step of an episode
    episode        (N,) int64, episode id; an episode's steps are contiguous
    meta           JSON text: task, policy, anything the collector records
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netllm.backbone import join_cache, split_cache
from netllm.utils import NetLLMError, atomic_path

# --------------------------------------------------------------------------- pools


@dataclass
class ExperiencePool:
    """Logged trajectories of existing policies, the only training data of DD-LRNA."""

    states: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    episodes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        self.dones = np.asarray(self.dones, dtype=bool)
        self.episodes = np.asarray(self.episodes, dtype=np.int64)
        self.actions = np.asarray(self.actions)
        n = len(self.rewards)
        arrays = {"action": self.actions, "done": self.dones, "episode": self.episodes,
                  **{f"state.{k}": v for k, v in self.states.items()}}
        for name, arr in arrays.items():
            if len(arr) != n:
                raise NetLLMError(f"experience pool: {name} has {len(arr)} rows, reward has {n}")
        if n == 0:
            raise NetLLMError("experience pool: no steps")
        if not np.isfinite(self.rewards).all():
            raise NetLLMError("experience pool: reward holds NaN or inf")
        if not self.dones[-1]:
            raise NetLLMError("experience pool: the last step does not end an episode (done=False)")
        starts = np.flatnonzero(np.r_[True, self.episodes[1:] != self.episodes[:-1]])
        ends = np.r_[starts[1:], n]
        if len(np.unique(self.episodes[starts])) != len(starts):
            raise NetLLMError("experience pool: an episode's steps are not contiguous")
        if not np.array_equal(np.flatnonzero(self.dones), ends - 1):
            raise NetLLMError("experience pool: done flags do not match episode boundaries")
        self._starts, self._ends = starts, ends

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def num_episodes(self) -> int:
        return len(self._starts)

    @property
    def episode_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) row indices of each episode, end exclusive."""
        return self._starts, self._ends

    def timesteps(self) -> np.ndarray:
        """Index of each step inside its episode."""
        start_of_row = np.repeat(self._starts, self._ends - self._starts)
        return np.arange(len(self)) - start_of_row

    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self._starts)

    def returns_to_go(self, gamma: float = 1.0, scale: float = 1.0) -> np.ndarray:
        """Discounted sum of the rewards from each step to its episode's end, / scale."""
        return returns_to_go(self.rewards, self.dones, gamma) / scale

    @classmethod
    def from_episodes(cls, episodes: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> "ExperiencePool":
        """Build a pool from a list of episodes, each {'states': {name: (T, ...)},
        'actions': (T, ...), 'rewards': (T,)}."""
        if not episodes:
            raise NetLLMError("experience pool: no episodes")
        names = list(episodes[0]["states"])
        lengths = [len(ep["rewards"]) for ep in episodes]
        dones = np.concatenate([np.arange(t) == t - 1 for t in lengths])
        return cls(
            states={k: np.concatenate([np.asarray(ep["states"][k]) for ep in episodes]) for k in names},
            actions=np.concatenate([np.asarray(ep["actions"]) for ep in episodes]),
            rewards=np.concatenate([np.asarray(ep["rewards"], dtype=np.float32) for ep in episodes]),
            dones=dones,
            episodes=np.repeat(np.arange(len(episodes)), lengths),
            meta=meta or {},
        )

    @classmethod
    def concat(cls, pools: Sequence["ExperiencePool"], meta: dict[str, Any] | None = None) -> "ExperiencePool":
        """One pool holding the episodes of several (same state modalities)."""
        if not pools:
            raise NetLLMError("experience pool: nothing to concatenate")
        names = set(pools[0].states)
        for p in pools[1:]:
            if set(p.states) != names:
                raise NetLLMError(f"experience pool: cannot concatenate pools with states {sorted(names)} "
                                  f"and {sorted(p.states)}")
        offsets = np.cumsum([0] + [p.num_episodes for p in pools[:-1]])
        return cls(
            states={k: np.concatenate([p.states[k] for p in pools]) for k in pools[0].states},
            actions=np.concatenate([p.actions for p in pools]),
            rewards=np.concatenate([p.rewards for p in pools]),
            dones=np.concatenate([p.dones for p in pools]),
            episodes=np.concatenate([np.unique(p.episodes, return_inverse=True)[1] + o
                                     for p, o in zip(pools, offsets)]),
            meta=meta if meta is not None else dict(pools[0].meta),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path / "pool.npz"
        arrays = {
            "action": self.actions, "reward": self.rewards, "done": self.dones,
            "episode": self.episodes, "meta": np.array(json.dumps(self.meta, default=str)),
            **{f"state.{k}": np.asarray(v) for k, v in self.states.items()},
        }
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], task: str | None = None) -> "ExperiencePool":
        """Load a pool (a ``.npz`` file or a run folder holding ``pool.npz``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "pool.npz"
        if not path.is_file():
            raise NetLLMError(f"--pool: experience pool not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise NetLLMError(f"--pool: {path} is not a readable experience pool: {e}") from None
        required = ("action", "reward", "done", "episode", "meta")
        missing = [k for k in required if k not in data]
        if missing:
            raise NetLLMError(f"--pool: {path} is not an experience pool (missing {missing})")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError:
            raise NetLLMError(f"--pool: {path} has unreadable metadata") from None
        if task is not None and meta.get("task") != task:
            raise NetLLMError(f"--pool: {path} holds experience of task {meta.get('task')!r}, not {task!r}")
        try:
            return cls(
                states={k[6:]: v for k, v in data.items() if k.startswith("state.")},
                actions=data["action"], rewards=data["reward"], dones=data["done"],
                episodes=data["episode"], meta=meta,
            )
        except NetLLMError as e:
            raise NetLLMError(f"--pool: {path}: {e}") from None


def returns_to_go(rewards: np.ndarray, dones: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Return-to-go of each step, restarting after every ``done``.

    Vectorised for gamma = 1 (reverse cumulative sums per episode); a discounted
    return runs one backward pass.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    dones = np.asarray(dones, dtype=bool)
    if gamma == 1.0:
        rev = np.cumsum(rewards[::-1])[::-1]  # sum from each step to the very end
        ends = np.flatnonzero(dones | (np.arange(len(rewards)) == len(rewards) - 1))
        nxt = ends + 1  # what lies beyond each episode end is subtracted
        beyond = np.where(nxt < len(rewards), rev[np.minimum(nxt, len(rewards) - 1)], 0.0)
        episode_of_row = np.searchsorted(ends, np.arange(len(rewards)))
        return (rev - beyond[episode_of_row]).astype(np.float32)
    out = np.zeros_like(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + (0.0 if dones[i] else gamma * running)
        out[i] = running
    return out.astype(np.float32)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class RLSpec:
    """The return-conditioned policy: which modalities form a step's state tokens."""

    state_modalities: tuple[str, ...]
    context_steps: int = 10  # K
    max_timestep: int = 1024  # size of the time-step embedding table
    action_kind: str = "discrete"  # "discrete" (Embedding) or "vector" (Linear)
    num_actions: int = 0  # discrete: number of actions
    action_dim: int = 0  # vector: size of the action vector
    return_scale: float = 1.0  # returns-to-go are divided by this
    gamma: float = 1.0
    reprime_keep: int = 0  # steps kept when the context overflows (0 = K // 2)

    def __post_init__(self) -> None:
        if self.context_steps < 1:
            raise NetLLMError(f"--context: must be >= 1, got {self.context_steps}")
        if self.action_kind not in ("discrete", "vector"):
            raise NetLLMError(f"action_kind: 'discrete' or 'vector', got {self.action_kind!r}")
        if self.action_kind == "discrete" and self.num_actions < 1:
            raise NetLLMError("num_actions: a discrete action needs num_actions >= 1")
        if self.action_kind == "vector" and self.action_dim < 1:
            raise NetLLMError("action_dim: a vector action needs action_dim >= 1")
        if not 0 <= self.reprime_keep < self.context_steps:
            raise NetLLMError(f"reprime_keep: must be in [0, {self.context_steps}), got {self.reprime_keep}")

    @property
    def tokens_per_step(self) -> int:
        return len(self.state_modalities) + 2

    @property
    def keep_steps(self) -> int:
        return self.reprime_keep or max(self.context_steps // 2, 1)


class ReturnTokens(nn.Module):
    """Return-to-go, action and time-step embeddings, and the LayerNorm over the steps."""

    def __init__(self, spec: RLSpec, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.return_embed = nn.Linear(1, hidden_size)
        self.time_embed = nn.Embedding(spec.max_timestep, hidden_size)
        if spec.action_kind == "discrete":
            self.action_embed: nn.Module = nn.Embedding(spec.num_actions, hidden_size)
        else:
            self.action_embed = nn.Linear(spec.action_dim, hidden_size)
        self.ln = nn.LayerNorm(hidden_size)

    def forward(
        self, state_tokens: torch.Tensor, rtg: torch.Tensor, actions: torch.Tensor | None,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Tokens of T steps: state_tokens (B, T, S, H), rtg (B, T), actions (B, T[, d]) or
        None (no action token yet), timesteps (B, T) -> (B, T, S + 2 or S + 1, H)."""
        r = self.return_embed(rtg.unsqueeze(-1).float()).unsqueeze(2)
        parts = [r, state_tokens]
        if actions is not None:
            if self.spec.action_kind == "discrete":
                a = self.action_embed(actions.long().clamp(0, self.spec.num_actions - 1))
            else:
                a = self.action_embed(actions.float())
            parts.append(a.unsqueeze(2))
        t = self.time_embed(timesteps.long().clamp(0, self.spec.max_timestep - 1)).unsqueeze(2)
        return self.ln(torch.cat(parts, dim=2) + t)


@dataclass
class WindowBatch:
    """K-step context windows, left-padded: mask is False on padding steps."""

    states: dict[str, torch.Tensor]  # (B, K, ...)
    actions: torch.Tensor  # (B, K[, d])
    rtg: torch.Tensor  # (B, K)
    timesteps: torch.Tensor  # (B, K)
    mask: torch.Tensor  # (B, K) bool

    def to(self, device: torch.device | str) -> "WindowBatch":
        return WindowBatch(
            states={k: v.to(device) for k, v in self.states.items()},
            actions=self.actions.to(device), rtg=self.rtg.to(device),
            timesteps=self.timesteps.to(device), mask=self.mask.to(device),
        )


class WindowSampler:
    """Cuts a pool into K-step windows that END at a chosen step (as at run time,
    where the policy sees the last <= K steps); windows near an episode start are
    left-padded. ``batch(i)`` is a deterministic function of ``i`` (for exact resume).
    """

    def __init__(self, pool: ExperiencePool, spec: RLSpec, batch_size: int, seed: int = 0) -> None:
        self.pool, self.spec, self.batch_size, self.seed = pool, spec, batch_size, seed
        self.rtg = pool.returns_to_go(spec.gamma, spec.return_scale).astype(np.float32)
        self.timesteps = pool.timesteps()
        starts, ends = pool.episode_bounds
        self.episode_start = np.repeat(starts, ends - starts)
        missing = [m for m in spec.state_modalities if m not in pool.states]
        if missing:
            raise NetLLMError(f"--pool: pool lacks state modality {missing[0]!r} the policy needs")

    def windows(self, end_rows: np.ndarray) -> WindowBatch:
        """Windows ending at the given pool rows (vectorised gather)."""
        K = self.spec.context_steps
        end_rows = np.asarray(end_rows, dtype=np.int64)
        offsets = np.arange(-K + 1, 1)
        rows = end_rows[:, None] + offsets[None, :]  # (B, K)
        mask = rows >= self.episode_start[end_rows][:, None]
        rows = np.where(mask, rows, end_rows[:, None])  # padding rows copy the last step

        def gather(arr: np.ndarray) -> torch.Tensor:
            out = arr[rows]
            pad = (~mask).reshape(mask.shape + (1,) * (out.ndim - 2))
            out = np.where(pad, np.zeros_like(out), out)
            return torch.from_numpy(np.ascontiguousarray(out))

        return WindowBatch(
            states={k: gather(self.pool.states[k]).float() for k in self.spec.state_modalities},
            actions=gather(self.pool.actions),
            rtg=gather(self.rtg),
            timesteps=gather(self.timesteps),
            mask=torch.from_numpy(mask),
        )

    def batch(self, i: int) -> WindowBatch:
        rng = np.random.default_rng([self.seed, i])
        return self.windows(rng.integers(0, len(self.pool), size=self.batch_size))


# --------------------------------------------------------------------------- policy


def step_tokens(model: Any, states: dict[str, torch.Tensor], rtg: torch.Tensor,
                actions: torch.Tensor | None, timesteps: torch.Tensor) -> torch.Tensor:
    """Token embeddings of T steps (B, T, S+2 or S+1, H) through the model's encoders."""
    spec: RLSpec = model.config.rl
    state_tokens = torch.stack(
        [model.encoders(name, states[name].to(model.device)) for name in spec.state_modalities], dim=2
    )
    return model.rl_tokens(
        state_tokens, rtg.to(model.device),
        None if actions is None else actions.to(model.device), timesteps.to(model.device),
    )


def decision_hidden(model: Any, batch: WindowBatch) -> torch.Tensor:
    """Hidden state at the last state token of every step of the windows: (B, K, H)."""
    spec: RLSpec = model.config.rl
    tokens = step_tokens(model, batch.states, batch.rtg, batch.actions, batch.timesteps)
    B, K, P, H = tokens.shape
    mask = batch.mask.to(model.device)
    attention = mask[:, :, None].expand(B, K, P).reshape(B, K * P).long()
    hidden, _ = model.hidden(tokens.reshape(B, K * P, H), attention)
    return hidden.reshape(B, K, P, H)[:, :, len(spec.state_modalities)]


def action_loss(model: Any, batch: WindowBatch, head: str = "action") -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the logged actions over the real steps of the windows."""
    hidden = decision_hidden(model, batch)
    logits = model.heads[head](hidden)  # (B, K, A)
    mask = batch.mask.to(model.device)
    target = batch.actions.to(model.device).long()
    loss = F.cross_entropy(logits[mask], target[mask])
    accuracy = (logits[mask].argmax(-1) == target[mask]).float().mean().item()
    tokens = int(mask.sum().item()) * model.config.rl.tokens_per_step
    return loss, {"accuracy": accuracy, "tokens": tokens}


def target_return(pool: ExperiencePool, quantile: float = 0.9) -> float:
    """A high quantile of the pool's episode returns: the run-time conditioning target."""
    return float(np.quantile(pool.episode_returns(), quantile))


def default_use_cache(device: torch.device | str) -> bool:
    """Whether decisions on ``device`` use the KV cache by default: yes except on CUDA."""
    return torch.device(device).type != "cuda"


class IncrementalPolicy:
    """Return-conditioned decisions of B independent episodes, each with its own
    key/value cache; the one decision path of every decision task (evaluation,
    collection, fine-tuning), batch 1 included.

    A decision runs the LLM only over the new tokens (the previous action, the new
    return-to-go and state tokens). When an episode's context would exceed K steps its
    cache is rebuilt ("re-primed") from its last ``spec.keep_steps`` steps. The rows
    asked in one ``decide`` are grouped by what they feed (a cached step, or a whole
    context of one length: first decision, re-prime, or ``use_cache=False``) and each
    group is ONE batched LLM call; cached rows whose contexts differ in length are
    left-padded in the attention only. So episodes may decide at different times
    (``rows=``), and an episode's decisions do not depend on which others share the
    batch.

        policy = IncrementalPolicy(model, target=pool_target, batch_size=B)
        hidden = policy.decide(states)              # (B, H), states[name]: (B, ...)
        action = model.heads["action"](hidden).argmax(-1)
        policy.record(action, reward)
        hidden = policy.decide(states, rows=[0, 3]) # only episodes 0 and 3 decide
        policy.record(actions, rewards, rows=[0, 3])
    """

    def __init__(self, model: Any, target: float | torch.Tensor | np.ndarray, batch_size: int = 1,
                 use_cache: bool | None = None) -> None:
        if model.config.rl is None:
            raise NetLLMError("the model has no return-conditioned policy (config.rl is None)")
        if batch_size < 1:
            raise NetLLMError(f"batch_size: must be >= 1, got {batch_size}")
        self.model, self.spec = model, model.config.rl
        self.batch_size = batch_size
        # False: recompute the whole context at every decision. None: the measured faster
        # one for the model's device (docs/scale-out.md, "The GPU path"): the cache on a CPU
        # (1.6-3.8x faster), recomputing on a GPU (the cache's extra kernel launches cost more
        # than the few hundred tokens it saves: 0.67-0.94x on an H200)
        self.use_cache = default_use_cache(model.device) if use_cache is None else bool(use_cache)
        self.reset(target)

    def reset(self, target: float | torch.Tensor | np.ndarray) -> None:
        """Start every episode afresh, conditioned on ``target`` (one value, or one per row)."""
        dev = self.model.device
        rtg = torch.as_tensor(target, dtype=torch.float32, device=dev)
        self.rtg = rtg.expand(self.batch_size).clone() / self.spec.return_scale
        self.t = np.zeros(self.batch_size, dtype=np.int64)  # decisions recorded per episode
        # per episode: its context (step tokens (S+1, H) + action token (H,)), the action
        # token not yet appended, and its key/value cache with that cache's length
        self.steps: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(self.batch_size)]
        self.pending: list[torch.Tensor | None] = [None] * self.batch_size
        self.cache: list[Any] = [None] * self.batch_size
        self.cache_len = [0] * self.batch_size
        self.calls = 0  # LLM calls so far (a benchmark reads it)

    def _rows(self, rows: Sequence[int] | None) -> list[int]:
        if rows is None:
            return list(range(self.batch_size))
        out = [int(r) for r in rows]
        if any(not 0 <= r < self.batch_size for r in out) or len(set(out)) != len(out):
            raise NetLLMError(f"IncrementalPolicy: rows must be distinct and in [0, {self.batch_size}), got {out}")
        return out

    def _action_token(self, action: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tokens (n, H) of the actions taken at steps t (n,) (same values as in a training window)."""
        rl = self.model.rl_tokens
        if self.spec.action_kind == "discrete":
            a = rl.action_embed(action.long().clamp(0, self.spec.num_actions - 1))
        else:
            a = rl.action_embed(action.float())
        return rl.ln(a + rl.time_embed(t.clamp(max=self.spec.max_timestep - 1)))

    @torch.no_grad()
    def decide(self, states: dict[str, torch.Tensor], rows: Sequence[int] | None = None) -> torch.Tensor:
        """Hidden states (n, H) at the last state token of the new step of each of ``rows``
        (default: all); ``states[name]`` is (n, *feature shape) in the order of ``rows``.
        Feed them to the task's head to get the actions."""
        rows = self._rows(rows)
        dev = self.model.device
        if not rows:
            return torch.zeros(0, self.model.hidden_size, device=dev)
        t = torch.as_tensor(self.t[rows], device=dev)
        new = step_tokens(self.model, {k: v.unsqueeze(1) for k, v in states.items()},
                          self.rtg[rows][:, None], None, t[:, None])[:, 0]  # (n, S+1, H)
        groups: dict[tuple[str, int], list[int]] = {}
        for j, r in enumerate(rows):
            steps = self.steps[r]
            if steps:
                if self.pending[r] is None:
                    raise NetLLMError("IncrementalPolicy: record() the previous action before deciding again")
                steps[-1]["action"] = self.pending[r]
                self.pending[r] = None
            if len(steps) >= self.spec.context_steps:
                # re-prime: restart the context from the last keep_steps completed steps
                del steps[:-self.spec.keep_steps]
                self.cache[r], self.cache_len[r] = None, 0
            if self.cache[r] is None or not self.use_cache:
                groups.setdefault(("context", len(steps)), []).append(j)
            else:
                groups.setdefault(("cached", 0), []).append(j)
        out = new.new_empty(len(rows), new.shape[-1])
        for (kind, _), members in groups.items():
            out[members] = self._run(kind, [rows[j] for j in members], new[members])
        for j, r in enumerate(rows):
            self.steps[r].append({"tokens": new[j]})
        return out

    def _run(self, kind: str, rows: list[int], new: torch.Tensor) -> torch.Tensor:
        """One LLM call for a group of rows that feed the same number of tokens."""
        dev = self.model.device
        n = len(rows)
        if kind == "context":  # the whole context from position 0
            feed = [torch.cat([torch.cat([s["tokens"], s["action"][None]]) for s in self.steps[r]] + [new[i]])
                    for i, r in enumerate(rows)]
            tokens = torch.stack(feed)
            past, starts = None, [0] * n
            mask = torch.ones(n, tokens.shape[1], dtype=torch.long, device=dev)
        else:  # the previous action and the new step, after each row's cache
            tokens = torch.cat([torch.stack([self.steps[r][-1]["action"] for r in rows])[:, None], new], dim=1)
            starts = [self.cache_len[r] for r in rows]
            past, past_mask = join_cache([self.cache[r] for r in rows], starts)
            mask = torch.cat([past_mask, torch.ones(n, tokens.shape[1], dtype=torch.long, device=dev)], dim=1)
        length = tokens.shape[1]
        positions = torch.stack([torch.arange(s, s + length, device=dev) for s in starts])
        hidden, cache = self.model.hidden(tokens, mask, position_ids=positions, past_key_values=past,
                                          use_cache=self.use_cache)
        self.calls += 1
        if self.use_cache:
            for r, row_cache, s in zip(rows, split_cache(cache), starts):
                self.cache[r], self.cache_len[r] = row_cache, s + length
        return hidden[:, -1]

    def record(self, action: torch.Tensor | np.ndarray, reward: torch.Tensor | np.ndarray | float,
               rows: Sequence[int] | None = None) -> None:
        """The actions taken at this step by ``rows`` (default: all) and the rewards they
        earned (each lowers its episode's target)."""
        rows = self._rows(rows)
        dev = self.model.device
        if not rows:
            return
        action = torch.as_tensor(action, device=dev).reshape(len(rows), *np.shape(action)[1:])
        tokens = self._action_token(action, torch.as_tensor(self.t[rows], device=dev))
        reward = torch.as_tensor(reward, dtype=torch.float32, device=dev).expand(len(rows))
        index = torch.as_tensor(rows, dtype=torch.long, device=dev)
        self.rtg[index] = self.rtg[index] - reward / self.spec.return_scale
        for j, r in enumerate(rows):
            if not self.steps[r]:
                raise NetLLMError(f"IncrementalPolicy: record() for episode {r} before it decided")
            self.pending[r] = tokens[j]
            self.t[r] += 1

    def finish(self, rows: Sequence[int]) -> None:
        """Free the contexts and caches of episodes that ended."""
        for r in self._rows(rows):
            self.cache[r], self.cache_len[r], self.steps[r], self.pending[r] = None, 0, [], None

    def restart(self, rows: Sequence[int], target: float) -> None:
        """New episodes in ``rows``, conditioned on ``target``; the other rows go on."""
        rows = self._rows(rows)
        self.finish(rows)
        self.rtg[torch.as_tensor(rows, dtype=torch.long)] = float(target) / self.spec.return_scale
        self.t[rows] = 0
