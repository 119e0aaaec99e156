"""The one training loop, for supervised (VP) and offline-RL (ABR, CJS) adaptation.

Read it top to bottom: the hyper-parameters (``TrainConfig``), the learning-rate
schedule (``lr_at``), the trainable-parameter helpers, checkpointing, then ``train``.

The loop knows nothing about tasks. A caller hands it

* ``get_batch(i)`` -- micro-batch number ``i``, where ``i = (step - 1) * grad_accum +
  micro`` counts micro-batches from 0 over the whole run. **Contract:** ``get_batch``
  must be a *deterministic function of ``i``* (e.g. seed a ``torch.Generator`` with
  ``base_seed + i``, or index a fixed permutation). That is what lets a resumed run see
  exactly the batches the interrupted run would have seen, without saving any
  data-loader state. It must not draw from the global random generators.
* ``loss_fn(model, batch)`` -- a scalar loss tensor, or ``(loss, {name: float})``. The
  names ``tokens`` and ``samples`` are counts: they are summed over a step and turned
  into ``tokens_per_s`` / ``samples_per_s``; any other name is averaged over the
  micro-batches of the step and logged as is.
* ``eval_fn(model, step)`` (optional) -- ``{name: float}``, called every ``eval_every``
  steps and at the end, in ``eval()`` mode under ``torch.no_grad()``. Its random draws
  are isolated from training (the generators are saved before and restored after), so
  how often you evaluate never changes the trained weights.

Only parameters with ``requires_grad`` are optimised (AdamW), and only they are saved:
the frozen LLM never enters a checkpoint. A checkpoint is a folder
``out_dir/checkpoint/`` written atomically (temp folder, then rename; only the last one
is kept), without pickle::

    model.safetensors      trainable parameters, by name
    optimizer.safetensors  AdamW state, flattened to ``state.{param_index}.{key}``
    rng_state.safetensors  torch CPU (and CUDA) generator states
    trainer_state.json     step, loss, elapsed time, optimizer param_groups, parameter
                           names, Python/numpy generator states, the config

The learning rate is a pure function of the step (``lr_at``), so the "scheduler state"
is the step itself. Together with the optimizer state, the generator states (dropout)
and the batch index, that makes a resumed run reproduce the uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from netllm.utils import NetLLMError, atomic_path, provenance, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"
METRICS_FILENAME = "metrics.csv"
TENSORBOARD_DIRNAME = "tb"
_CHECKPOINT_FORMAT = 1
_COUNT_METRICS = ("tokens", "samples")  # summed per step and reported per second


# --------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every hyper-parameter of the loop. Steps are optimizer steps, counted from 1."""

    steps: int = 1000  # total optimizer steps
    lr: float = 1e-4  # peak learning rate (reached at the end of warm-up)
    weight_decay: float = 0.01  # AdamW decay, applied to matrices only (not biases/norms)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0 to lr over these steps
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up
    min_lr: float = 0.0  # where "linear"/"cosine" decay ends (at the last step)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    eval_every: int = 0  # 0: evaluate only at the end (if an eval_fn is given)
    checkpoint_every: int = 100  # 0: checkpoint only at the end
    log_every: int = 10  # write a metrics row every this many steps
    seed: int = 0  # seeds Python, numpy and torch at the start of a fresh run
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also log to out_dir/tb

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> NetLLMError:
            return NetLLMError(f"TrainConfig.{field}: {why} (got {getattr(self, field)!r})")

        if self.steps < 1:
            raise bad("steps", "must be >= 1")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise bad("schedule", "must be one of constant, linear, cosine")
        if not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", "must be between 0 and lr")
        if self.grad_accum < 1:
            raise bad("grad_accum", "must be >= 1")
        if self.clip_grad_norm is not None and self.clip_grad_norm < 0:
            raise bad("clip_grad_norm", "must be > 0, or 0/None to disable")
        for field in ("eval_every", "checkpoint_every"):
            if getattr(self, field) < 0:
                raise bad(field, "must be >= 0 (0 means: only at the end)")
        if self.log_every < 1:
            raise bad("log_every", "must be >= 1")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


@dataclass
class TrainResult:
    steps_done: int  # the last optimizer step completed (absolute, not "in this call")
    final_loss: float  # loss of the last step (mean over its micro-batches)
    metrics_csv: Path
    elapsed_s: float  # training wall time, including the time before a resume
    checkpoint_dir: Path | None = None  # the last checkpoint, if one exists


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based).

    Linear warm-up ``lr * step / warmup_steps`` up to ``warmup_steps``; then constant,
    or a linear/cosine decay that reaches ``min_lr`` at ``config.steps``.
    """
    warmup = config.warmup_steps
    if warmup > 0 and step <= warmup:
        return config.lr * step / warmup
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    if config.schedule == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + coeff * (config.lr - config.min_lr)


# --------------------------------------------------------------------------------------
# Trainable parameters (also used to save/load adapters)
# --------------------------------------------------------------------------------------


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in model order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only, by name (detached, on CPU, contiguous).

    The frozen LLM is not in it, so the result is small and safe to write with
    ``safetensors.torch.save_file``.
    """
    return {
        name: p.detach().to("cpu").contiguous() for name, p in trainable_named_parameters(model)
    }


def load_trainable_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    source: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Copy ``state_dict`` into the model's trainable parameters, in place.

    With ``strict`` the names must be exactly the model's trainable parameter names;
    otherwise only the common names are loaded. Returns ``(missing, unexpected)``.
    Shapes must always match. ``source`` (a file or folder) is named in error messages.
    """
    where = f" from {source}" if source is not None else ""
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if strict and (missing or unexpected):
        raise NetLLMError(
            f"cannot load trainable parameters{where}: they do not match the model "
            f"(missing {_some(missing)}; unexpected {_some(unexpected)})"
        )
    with torch.no_grad():
        for name in sorted(set(params) & set(state_dict)):
            param, value = params[name], state_dict[name]
            if tuple(param.shape) != tuple(value.shape):
                raise NetLLMError(
                    f"cannot load trainable parameter {name!r}{where}: shape "
                    f"{tuple(value.shape)} does not match the model's {tuple(param.shape)}"
                )
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def make_optimizer(
    params: list[tuple[str, nn.Parameter]], config: TrainConfig
) -> torch.optim.AdamW:
    """AdamW with two groups: decay for matrices (dim >= 2), none for biases and norms."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr_at(1, config), betas=config.betas, eps=config.eps)


# --------------------------------------------------------------------------------------
# Random generator states (Python, numpy, torch CPU, CUDA)
# --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "checkpoint has CUDA RNG states for a different device count; not restored"
            )


def _rng_to_files(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split generator states into a JSON part (Python, numpy) and tensors (torch)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    as_json = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": state["torch"].clone()}
    for i, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda_state.cpu().clone()
    return as_json, tensors


def _rng_from_files(
    as_json: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    version, internal, gauss = as_json["python"]
    name, keys, pos, has_gauss, cached = as_json["numpy"]
    state: dict[str, Any] = {
        "python": (int(version), tuple(int(x) for x in internal), gauss),
        "numpy": (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
        "torch": tensors["torch"].to(torch.uint8),
    }
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k].to(torch.uint8) for k in cuda]
    return state


# --------------------------------------------------------------------------------------
# Checkpoints: one folder, written atomically, no pickle
# --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten ``optimizer.state_dict()`` to tensors ``state.{idx}.{key}`` + JSON groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, _jsonable(sd["param_groups"])


def _optimizer_from_files(
    tensors: Mapping[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat, tensor in tensors.items():
        _, idx, key = flat.split(".", 2)
        state.setdefault(int(idx), {})[key] = tensor
    groups = []
    for group in param_groups:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint/`` atomically and return it.

    Files go into a temporary folder beside it, which then replaces the old checkpoint
    by two renames; a crash at any moment leaves either the old or the new checkpoint
    complete (``_recover_checkpoint`` finishes an interrupted swap).
    """
    final = out_dir / CHECKPOINT_DIRNAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIRNAME}.tmp-", dir=out_dir))
    try:
        meta = {"format": "pt", "step": str(trainer_state["step"])}
        save_file(trainable_state_dict(model), tmp / "model.safetensors", metadata=meta)
        opt_tensors, param_groups = _optimizer_to_files(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata=meta)
        rng_json, rng_tensors = _rng_to_files(_rng_state())
        save_file(rng_tensors, tmp / "rng_state.safetensors", metadata=meta)
        state = {**trainer_state, "param_groups": param_groups, "rng": rng_json}
        # Written last: a folder with trainer_state.json is a complete checkpoint.
        (tmp / "trainer_state.json").write_text(
            json.dumps(state, indent=1, sort_keys=True, default=str) + "\n"
        )
        old = None
        if final.exists():
            old = out_dir / f".{CHECKPOINT_DIRNAME}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _recover_checkpoint(out_dir: Path) -> None:
    """Remove half-written temp folders; finish a swap interrupted between its renames."""
    final = out_dir / CHECKPOINT_DIRNAME
    for tmp in out_dir.glob(f".{CHECKPOINT_DIRNAME}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(out_dir.glob(f".{CHECKPOINT_DIRNAME}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists() and (olds[-1] / "trainer_state.json").exists():
        os.rename(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def completed_steps(out_dir: str | os.PathLike[str]) -> int:
    """The step of the last checkpoint in ``out_dir`` (0 when there is none): a run whose
    value equals its ``steps`` has finished."""
    try:
        return int(json.loads((Path(out_dir) / "checkpoint" / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    config: TrainConfig,
) -> dict[str, Any]:
    """Restore trainable parameters, optimizer and RNG from ``ckpt``; return its state."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        params = load_file(ckpt / "model.safetensors")
        opt_tensors = load_file(ckpt / "optimizer.safetensors")
        rng_tensors = load_file(ckpt / "rng_state.safetensors")
    except (OSError, ValueError) as exc:  # missing file, bad JSON, bad safetensors header
        raise NetLLMError(f"checkpoint {ckpt} is unreadable or incomplete: {exc}") from None
    if state.get("format_version") != _CHECKPOINT_FORMAT:
        raise NetLLMError(f"checkpoint {ckpt}: unknown format {state.get('format_version')!r}")

    load_trainable_state_dict(model, params, strict=True, source=f"checkpoint {ckpt}")
    if state["param_names"] != param_names:
        raise NetLLMError(
            f"checkpoint {ckpt}: the trainable parameters are in a different order than in "
            "the model, so its optimizer state cannot be matched to them"
        )
    if state["config"]["grad_accum"] != config.grad_accum:
        raise NetLLMError(
            f"checkpoint {ckpt} was written with grad_accum={state['config']['grad_accum']}, "
            f"but this run uses grad_accum={config.grad_accum}; the batch indices would not "
            "line up, so resume with the same value"
        )
    try:
        optimizer.load_state_dict(_optimizer_from_files(opt_tensors, state["param_groups"]))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise NetLLMError(
            f"checkpoint {ckpt}: optimizer state does not fit the model: {exc}"
        ) from None
    _set_rng_state(_rng_from_files(state["rng"], rng_tensors))
    return state


# --------------------------------------------------------------------------------------
# Metrics: CSV (append-only; header grows when a new metric appears) + TensorBoard
# --------------------------------------------------------------------------------------


class _MetricsCsv:
    """``metrics.csv`` with one row per logged step.

    Rows are appended; when a row brings a column the header lacks (e.g. the first
    eval metrics), the file is rewritten once, atomically, with the wider header.
    """

    def __init__(self, path: Path, keep_through_step: int) -> None:
        self.path = path
        self.fields: list[str] = []
        rows: list[dict[str, str]] = []
        if path.exists():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                for row in reader:
                    try:
                        step = int(row.get("step") or "")
                    except ValueError:
                        continue
                    if step <= keep_through_step:  # drop rows of an interrupted run
                        rows.append(row)
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        with atomic_path(self.path) as tmp:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, restval="")
                if self.fields:
                    writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        if new:
            with self.path.open(newline="") as f:
                old_rows = list(csv.DictReader(f)) if self.fields else []
            self.fields += new
            self._rewrite(old_rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)


def _open_tensorboard(out_dir: Path, start_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events of an interrupted run beyond the resumed step.
    return SummaryWriter(str(out_dir / TENSORBOARD_DIRNAME), purge_step=start_step + 1)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _split_loss(out: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise NetLLMError(
            f"loss_fn must return a scalar tensor or (tensor, dict) (step {step}); "
            f"got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    if not loss.requires_grad:
        raise NetLLMError(
            f"loss_fn returned a loss that does not depend on any trainable parameter (step {step})"
        )
    return loss.reshape(()), {k: float(v) for k, v in dict(metrics).items()}


def _run_eval(
    model: nn.Module, eval_fn: Callable[[nn.Module, int], dict[str, float]], step: int
) -> dict[str, float]:
    """``eval_fn`` in eval mode, without grad, with its random draws kept out of training."""
    rng = _rng_state()
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model, step)
    finally:
        model.train()
        _set_rng_state(rng)
    try:
        return {str(k): float(v) for k, v in dict(metrics or {}).items()}
    except (TypeError, ValueError):
        raise NetLLMError(
            f"eval_fn must return a dict of numbers (step {step}); got {metrics!r}"
        ) from None


def train(
    model: nn.Module,
    get_batch: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the model's ``requires_grad`` parameters for ``config.steps`` optimizer steps.

    ``get_batch(i)`` must be deterministic in ``i`` (see the module docstring).
    ``resume=True`` continues from ``out_dir/checkpoint`` if it exists (else starts fresh);
    ``resume=False`` refuses an ``out_dir`` that already holds a checkpoint.
    ``stop_after`` stops after that (absolute) step as if the process had crashed: no
    final eval, and no checkpoint unless the step is a periodic one. For tests.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = trainable_named_parameters(model)
    if not params:
        raise NetLLMError("model has no trainable parameters (all have requires_grad=False)")
    param_names = [name for name, _ in params]
    optimizer = make_optimizer(params, config)
    was_training = model.training

    # -- start fresh or resume -------------------------------------------------------
    _recover_checkpoint(out_dir)
    ckpt = out_dir / CHECKPOINT_DIRNAME
    start_step, last_loss, elapsed_before = 0, float("nan"), 0.0
    if resume and ckpt.exists():
        state = _load_checkpoint(ckpt, model, optimizer, param_names, config)
        start_step, last_loss = int(state["step"]), float(state["loss"])
        elapsed_before = float(state["elapsed_s"])
        log.info("resuming from %s at step %d", ckpt, start_step)
    else:
        if ckpt.exists():
            raise NetLLMError(
                f"{out_dir} already holds a checkpoint ({ckpt}); resume it or use another folder"
            )
        if resume:
            log.info("no checkpoint in %s; starting fresh", out_dir)
        seed_everything(config.seed)

    metrics_csv = _MetricsCsv(out_dir / METRICS_FILENAME, keep_through_step=start_step)
    if start_step >= config.steps:
        log.info("checkpoint is at step %d >= steps=%d; nothing to do", start_step, config.steps)
        return TrainResult(start_step, last_loss, metrics_csv.path, elapsed_before, ckpt)

    trainer_state = {
        "format_version": _CHECKPOINT_FORMAT,
        "param_names": param_names,
        "config": asdict(config),
        "provenance": provenance(),
    }
    writer = _open_tensorboard(out_dir, start_step) if config.tensorboard else None
    bar = tqdm(
        total=config.steps, initial=start_step, disable=not config.progress,
        desc="train", unit="step", dynamic_ncols=True,
    )
    trainable = [p for _, p in params]
    clip = config.clip_grad_norm if config.clip_grad_norm else float("inf")
    t_start = time.perf_counter()
    interval_s, interval_counts = 0.0, dict.fromkeys(_COUNT_METRICS, 0.0)
    steps_done, ckpt_step = start_step, start_step if ckpt.exists() else None

    try:
        model.train()
        for step in range(start_step + 1, config.steps + 1):
            t_step = time.perf_counter()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # -- forward/backward over grad_accum micro-batches --------------------------
            loss_sum = torch.zeros(())
            step_metrics: dict[str, float] = {}
            for micro in range(config.grad_accum):
                batch = get_batch((step - 1) * config.grad_accum + micro)
                loss, metrics = _split_loss(loss_fn(model, batch), step)
                (loss / config.grad_accum).backward()
                loss_sum = loss_sum.to(loss.device) + loss.detach().float()
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value
            loss_value = loss_sum.item() / config.grad_accum  # one sync per step
            if not math.isfinite(loss_value):
                raise NetLLMError(f"loss is {loss_value} at step {step}; stopping (no update made)")

            # -- clip, update ---------------------------------------------------------------
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
            if not math.isfinite(grad_norm):
                raise NetLLMError(
                    f"gradient norm is {grad_norm} at step {step}; stopping (no update made)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done, last_loss = step, loss_value
            interval_s += time.perf_counter() - t_step
            for key in _COUNT_METRICS:
                interval_counts[key] += step_metrics.pop(key, 0.0)

            # -- log / eval -----------------------------------------------------------------
            is_last = step == config.steps
            do_eval = eval_fn is not None and (
                is_last or (config.eval_every and step % config.eval_every == 0)
            )
            if step % config.log_every == 0 or do_eval or is_last:
                row: dict[str, Any] = {
                    "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "elapsed_s": round(elapsed_before + time.perf_counter() - t_start, 3),
                }
                for key in _COUNT_METRICS:
                    if interval_counts[key] and interval_s > 0:
                        row[f"{key}_per_s"] = interval_counts[key] / interval_s
                row.update({k: v / config.grad_accum for k, v in step_metrics.items()})
                interval_s, interval_counts = 0.0, dict.fromkeys(_COUNT_METRICS, 0.0)
                if do_eval:
                    assert eval_fn is not None
                    eval_metrics = _run_eval(model, eval_fn, step)
                    row.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                metrics_csv.append(row)
                if writer is not None:
                    for key, value in row.items():
                        if key != "step":
                            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                            writer.add_scalar(tag, value, step)
                bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

            # -- checkpoint -------------------------------------------------------------------
            periodic = config.checkpoint_every and step % config.checkpoint_every == 0
            if periodic or is_last:
                trainer_state.update(
                    step=step, loss=loss_value,
                    elapsed_s=elapsed_before + time.perf_counter() - t_start,
                )
                save_checkpoint(out_dir, model, optimizer, trainer_state)
                ckpt_step = step
            if stop_after is not None and step >= stop_after:
                log.info("stop_after=%d reached: stopping as if interrupted", stop_after)
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        model.train(was_training)

    return TrainResult(
        steps_done=steps_done,
        final_loss=last_loss,
        metrics_csv=metrics_csv.path,
        elapsed_s=elapsed_before + time.perf_counter() - t_start,
        checkpoint_dir=ckpt if ckpt_step is not None else None,
    )
