"""The one training loop, for supervised (VP) and offline-RL (ABR, CJS) adaptation.

Read it top to bottom: the hyper-parameters (``TrainConfig``), the learning-rate
schedule (``lr_at``), the optimizer, the metrics files, the pieces of one step, then
``train``. What a checkpoint holds, and how it is written and resumed, is in
``netllm.checkpoint``.

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

Only parameters with ``requires_grad`` are optimised (AdamW), and only they are saved
in the checkpoint ``out_dir/checkpoint/``. The learning rate is a pure function of the
step (``lr_at``), so the "scheduler state" is the step itself; with the optimizer
state, the generator states (dropout) and the batch index, a resumed run reproduces
the uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from tqdm import tqdm

from netllm.checkpoint import (
    CHECKPOINT_DIRNAME,
    new_trainer_state,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_named_parameters,
)
from netllm.utils import NetLLMError, atomic_path, seed_everything

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.csv"
TENSORBOARD_DIRNAME = "tb"
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
# Optimizer
# --------------------------------------------------------------------------------------


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
# The pieces of one step
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


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _accumulate_gradients(
    model: nn.Module,
    get_batch: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], Any],
    step: int,
    grad_accum: int,
) -> tuple[float, dict[str, float]]:
    """Forward/backward over the step's ``grad_accum`` micro-batches.

    Returns the step's loss (mean over micro-batches) and its metrics, summed over the
    micro-batches. Raises on a non-finite loss (before any update is made).
    """
    loss_sum = torch.zeros(())
    step_metrics: dict[str, float] = {}
    for micro in range(grad_accum):
        batch = get_batch((step - 1) * grad_accum + micro)
        loss, metrics = _split_loss(loss_fn(model, batch), step)
        (loss / grad_accum).backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach().float()
        for key, value in metrics.items():
            step_metrics[key] = step_metrics.get(key, 0.0) + value
    loss_value = loss_sum.item() / grad_accum  # one sync per step
    if not math.isfinite(loss_value):
        raise NetLLMError(f"loss is {loss_value} at step {step}; stopping (no update made)")
    return loss_value, step_metrics


def _clip_gradients(params: list[nn.Parameter], max_norm: float | None, step: int) -> float:
    """Clip to ``max_norm`` (None/0: no clipping) and return the norm before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
    if not math.isfinite(grad_norm):
        raise NetLLMError(f"gradient norm is {grad_norm} at step {step}; stopping (no update made)")
    return grad_norm


def _run_eval(
    model: nn.Module, eval_fn: Callable[[nn.Module, int], dict[str, float]], step: int
) -> dict[str, float]:
    """``eval_fn`` in eval mode, without grad, with its random draws kept out of training."""
    rng = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model, step)
    finally:
        model.train()
        set_rng_state(rng)
    try:
        return {str(k): float(v) for k, v in dict(metrics or {}).items()}
    except (TypeError, ValueError):
        raise NetLLMError(
            f"eval_fn must return a dict of numbers (step {step}); got {metrics!r}"
        ) from None


class _Reporter:
    """Where the loop reports: metrics.csv, TensorBoard, the progress bar, throughput."""

    def __init__(self, out_dir: Path, config: TrainConfig, metrics_csv: _MetricsCsv,
                 start_step: int, elapsed_before: float) -> None:
        self.config, self.metrics_csv, self.elapsed_before = config, metrics_csv, elapsed_before
        self.writer = _open_tensorboard(out_dir, start_step) if config.tensorboard else None
        self.bar = tqdm(
            total=config.steps, initial=start_step, disable=not config.progress,
            desc="train", unit="step", dynamic_ncols=True,
        )
        self.t_start = time.perf_counter()
        self.interval_s, self.interval_counts = 0.0, dict.fromkeys(_COUNT_METRICS, 0.0)

    def elapsed(self) -> float:
        """Training wall time, including the time before a resume."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def count(self, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        """Add a step's time and counts (``tokens``, ``samples``) to the throughput
        interval; return its other metrics, averaged over its micro-batches."""
        self.interval_s += seconds
        rest = dict(metrics)
        for key in _COUNT_METRICS:
            self.interval_counts[key] += rest.pop(key, 0.0)
        return {k: v / self.config.grad_accum for k, v in rest.items()}

    def row(self, step: int, loss: float, lr: float, grad_norm: float,
            means: dict[str, float]) -> dict[str, Any]:
        """The metrics row of a step (throughput over the steps since the last row)."""
        row: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "elapsed_s": round(self.elapsed(), 3),
        }
        for key in _COUNT_METRICS:
            if self.interval_counts[key] and self.interval_s > 0:
                row[f"{key}_per_s"] = self.interval_counts[key] / self.interval_s
        row.update(means)
        return row

    def write(self, row: dict[str, Any]) -> None:
        """Write one row (CSV, TensorBoard) and start a new throughput interval."""
        self.interval_s, self.interval_counts = 0.0, dict.fromkeys(_COUNT_METRICS, 0.0)
        self.metrics_csv.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, row["step"])
        self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}", refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


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

    # -- start fresh or resume ---------------------------------------------------------
    resumed = resume_checkpoint(out_dir, model, optimizer, param_names,
                                grad_accum=config.grad_accum, resume=resume)
    if resumed is None:
        seed_everything(config.seed)
        start_step, last_loss, elapsed_before = 0, float("nan"), 0.0
    else:
        start_step, last_loss = int(resumed["step"]), float(resumed["loss"])
        elapsed_before = float(resumed["elapsed_s"])
    ckpt = out_dir / CHECKPOINT_DIRNAME
    metrics_csv = _MetricsCsv(out_dir / METRICS_FILENAME, keep_through_step=start_step)
    if start_step >= config.steps:
        log.info("checkpoint is at step %d >= steps=%d; nothing to do", start_step, config.steps)
        return TrainResult(start_step, last_loss, metrics_csv.path, elapsed_before, ckpt)

    # -- the steps ---------------------------------------------------------------------
    trainer_state = new_trainer_state(param_names, asdict(config))
    trainable = [p for _, p in params]
    report = _Reporter(out_dir, config, metrics_csv, start_step, elapsed_before)
    steps_done, ckpt_step = start_step, (start_step if resumed is not None else None)
    try:
        model.train()
        for step in range(start_step + 1, config.steps + 1):
            t_step = time.perf_counter()
            lr = _set_lr(optimizer, lr_at(step, config))
            loss, metrics = _accumulate_gradients(model, get_batch, loss_fn, step, config.grad_accum)
            grad_norm = _clip_gradients(trainable, config.clip_grad_norm, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done, last_loss = step, loss
            means = report.count(metrics, time.perf_counter() - t_step)

            is_last = step == config.steps
            evaluate = eval_fn is not None and (
                is_last or bool(config.eval_every and step % config.eval_every == 0)
            )
            if evaluate or is_last or step % config.log_every == 0:
                row = report.row(step, loss, lr, grad_norm, means)
                if evaluate:
                    assert eval_fn is not None
                    row.update({f"eval_{k}": v for k, v in _run_eval(model, eval_fn, step).items()})
                report.write(row)
            report.advance()

            if is_last or (config.checkpoint_every and step % config.checkpoint_every == 0):
                trainer_state.update(step=step, loss=loss, elapsed_s=report.elapsed())
                save_checkpoint(out_dir, model, optimizer, trainer_state)
                ckpt_step = step
            if stop_after is not None and step >= stop_after:
                log.info("stop_after=%d reached: stopping as if interrupted", stop_after)
                break
    finally:
        report.close()
        model.train(was_training)

    return TrainResult(
        steps_done=steps_done,
        final_loss=last_loss,
        metrics_csv=metrics_csv.path,
        elapsed_s=report.elapsed(),
        checkpoint_dir=ckpt if ckpt_step is not None else None,
    )
