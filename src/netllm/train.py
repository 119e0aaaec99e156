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

import atexit
import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from netllm.checkpoint import (
    CHECKPOINT_DIRNAME,
    new_trainer_state,
    recover_checkpoint,
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
    mixed_precision: Literal["no", "bf16"] = "no"  # "bf16": autocast (Accelerate), CUDA or a CPU with AMX

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
        if self.mixed_precision not in ("no", "bf16"):
            raise bad("mixed_precision", "must be 'no' or 'bf16'")
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
# Processes: one, or several under `accelerate launch` (data-parallel, DDP)
# --------------------------------------------------------------------------------------


def launched_processes() -> int:
    """How many processes ``accelerate launch`` (torchrun) started for this run (1: none)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_main_process() -> bool:
    """Whether this process writes the run's files (always, without ``accelerate launch``)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def wait_for_everyone() -> None:
    """A barrier across the launched processes (nothing to wait for in one process)."""
    if launched_processes() > 1:
        from accelerate import PartialState

        # cpu=True where there is no GPU: else Accelerate sees no process group (gloo) at all
        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def _end_process_group() -> None:
    """At exit, end this process's process group while the interpreter is still whole: a
    gloo thread left running into its teardown aborts the process ("terminate called
    without an active exception"), and the launcher then kills the other processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that DDP (which synchronises gradients
    through ``forward``) sees every loss, whatever model methods the task's loss calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


class Processes:
    """This run's processes. Without ``accelerate launch`` (and without mixed precision)
    it is this process alone and the loop runs plain PyTorch. Under ``accelerate launch``
    Hugging Face Accelerate owns the process group: the loss is wrapped in DDP (gradients
    averaged over processes), process ``rank`` takes micro-batches ``i * world + rank``
    (so N processes equal one process with ``grad_accum * N``), metrics are reduced over
    processes, and only the main process writes files or evaluates."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], mixed_precision: str = "no"
                 ) -> None:
        self.loss_fn, self.model = loss_fn, model
        self.world, self.rank, self.acc, self.ddp = 1, 0, None, None
        if launched_processes() == 1 and mixed_precision == "no":
            return
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if mixed_precision == "bf16":
            from netllm.recipe import training_precision

            training_precision("bf16", device)  # a device without native bf16: one line
        if fsdp_launched():
            check_fsdp(model, device)  # before Accelerate, whose own FSDP errors are tracebacks
        self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision,
                               device_placement=False,
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if self.world > 1:
            atexit.unregister(_end_process_group)  # once, however many runs this process trains
            atexit.register(_end_process_group)
        self.ddp = self.acc.prepare_model(_LossModule(model, loss_fn), device_placement=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batch_index(self, i: int) -> int:
        return i * self.world + self.rank

    def loss(self, batch: Any) -> Any:
        return self.ddp(batch) if self.ddp is not None else self.loss_fn(self.model, batch)

    def no_sync(self, last: bool) -> Any:
        """Gradients are averaged over processes once per step, at its last micro-batch."""
        import contextlib

        if self.ddp is None or last or self.world == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.ddp)

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()

    def reduce(self, loss: torch.Tensor, metrics: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss and metrics over every process (counts summed, the rest averaged)."""
        if self.world == 1:
            return loss, metrics
        assert self.acc is not None
        names = sorted(metrics)
        values = torch.tensor([loss.item(), *[metrics[n] for n in names]], dtype=torch.float64,
                              device=self.acc.device)
        total = self.acc.reduce(values, reduction="sum").cpu()
        out = {n: float(total[1 + j]) if n in _COUNT_METRICS else float(total[1 + j]) / self.world
               for j, n in enumerate(names)}
        return total[0] / self.world, out

    def wait(self) -> None:
        if self.world > 1:
            wait_for_everyone()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (``values`` itself in one process)."""
        if self.world == 1:
            return values
        assert self.acc is not None
        return self.acc.reduce(values.to(self.acc.device).clone(), reduction="sum").to(values.device)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's ``items`` (picklable), concatenated in process order, in every process."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def reseed(self, seed: int, step: int) -> None:
        """Processes other than the main one restart their generators (LoRA dropout) at
        every checkpoint from (seed, rank, step): the checkpoint holds the main process's
        generators, so a resumed run continues exactly as the uninterrupted one."""
        if self.world > 1 and not self.main:
            seed_everything(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` was given an FSDP configuration."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_device(device: torch.device) -> None:
    if fsdp_launched() and device.type != "cuda":
        raise NetLLMError("accelerate config: FSDP shards a model over CUDA GPUs; this run is on "
                          f"{device.type} (use DDP: accelerate launch --multi_gpu)")


def check_fsdp(model: nn.Module, device: torch.device) -> None:
    """FSDP shards a backbone that does not fit one GPU; anything else is a mistake."""
    check_fsdp_device(device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free = torch.cuda.get_device_properties(device).total_memory
    if size * 4 < free:  # weights + activations + LoRA optimizer state fit with room to spare
        raise NetLLMError(f"accelerate config: FSDP is for a model that does not fit one GPU; this one "
                          f"({size / 2**30:.1f} GiB) fits ({free / 2**30:.0f} GiB): use DDP "
                          "(accelerate launch --multi_gpu)")


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
    procs: Processes,
    get_batch: Callable[[int], Any],
    step: int,
    grad_accum: int,
) -> tuple[float, dict[str, float]]:
    """Forward/backward over the step's ``grad_accum`` micro-batches (of this process).

    Returns the step's loss (mean over micro-batches and processes) and its metrics,
    summed over the micro-batches. Raises on a non-finite loss (before any update is made).
    """
    loss_sum = torch.zeros(())
    step_metrics: dict[str, float] = {}
    for micro in range(grad_accum):
        batch = get_batch(procs.batch_index((step - 1) * grad_accum + micro))
        with procs.no_sync(last=micro == grad_accum - 1):
            loss, metrics = _split_loss(procs.loss(batch), step)
            procs.backward(loss / grad_accum)
        loss_sum = loss_sum.to(loss.device) + loss.detach().float()
        for key, value in metrics.items():
            step_metrics[key] = step_metrics.get(key, 0.0) + value
    loss_all, step_metrics = procs.reduce(loss_sum, step_metrics)
    loss_value = float(loss_all) / grad_accum  # one sync per step
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

    def __init__(self, out_dir: Path, config: TrainConfig, metrics_csv: _MetricsCsv | None,
                 start_step: int, elapsed_before: float) -> None:
        # metrics_csv None: a process other than the main one, which reports nothing
        self.config, self.metrics_csv, self.elapsed_before = config, metrics_csv, elapsed_before
        main = metrics_csv is not None
        self.writer = _open_tensorboard(out_dir, start_step) if config.tensorboard and main else None
        self.bar = tqdm(
            total=config.steps, initial=start_step, disable=not (config.progress and main),
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
        if self.metrics_csv is None:
            return
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

    procs = Processes(model, loss_fn, config.mixed_precision)

    # -- start fresh or resume ---------------------------------------------------------
    if procs.world > 1:  # the main process tidies an interrupted checkpoint swap first
        if procs.main:
            recover_checkpoint(out_dir)
        procs.wait()
    resumed = resume_checkpoint(out_dir, model, optimizer, param_names,
                                grad_accum=config.grad_accum, resume=resume)
    if resumed is None:
        seed_everything(config.seed + procs.rank)
        start_step, last_loss, elapsed_before = 0, float("nan"), 0.0
    else:
        if int(resumed.get("processes", 1)) != procs.world:
            raise NetLLMError(
                f"{out_dir / CHECKPOINT_DIRNAME} was written by a run of {resumed.get('processes', 1)} "
                f"process(es), this one has {procs.world}; the batch indices would not line up, so "
                "resume with the same number of processes")
        start_step, last_loss = int(resumed["step"]), float(resumed["loss"])
        elapsed_before = float(resumed["elapsed_s"])
        procs.reseed(config.seed, start_step)
    ckpt = out_dir / CHECKPOINT_DIRNAME
    metrics_csv = _MetricsCsv(out_dir / METRICS_FILENAME, keep_through_step=start_step) if procs.main else None
    metrics_path = out_dir / METRICS_FILENAME
    procs.wait()
    if start_step >= config.steps:
        log.info("checkpoint is at step %d >= steps=%d; nothing to do", start_step, config.steps)
        return TrainResult(start_step, last_loss, metrics_path, elapsed_before, ckpt)

    # -- the steps ---------------------------------------------------------------------
    trainer_state = {**new_trainer_state(param_names, asdict(config)), "processes": procs.world}
    trainable = [p for _, p in params]
    report = _Reporter(out_dir, config, metrics_csv, start_step, elapsed_before)
    steps_done, ckpt_step = start_step, (start_step if resumed is not None else None)
    try:
        model.train()
        for step in range(start_step + 1, config.steps + 1):
            t_step = time.perf_counter()
            lr = _set_lr(optimizer, lr_at(step, config))
            loss, metrics = _accumulate_gradients(procs, get_batch, step, config.grad_accum)
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
                if evaluate and procs.main:  # the other processes wait for it
                    assert eval_fn is not None
                    row.update({f"eval_{k}": v for k, v in _run_eval(model, eval_fn, step).items()})
                report.write(row)
                if evaluate:
                    procs.wait()
            report.advance()

            if is_last or (config.checkpoint_every and step % config.checkpoint_every == 0):
                trainer_state.update(step=step, loss=loss, elapsed_s=report.elapsed())
                if procs.main:
                    save_checkpoint(out_dir, model, optimizer, trainer_state)
                procs.reseed(config.seed, step)
                procs.wait()
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
        metrics_csv=metrics_path,
        elapsed_s=report.elapsed(),
        checkpoint_dir=ckpt if ckpt_step is not None else None,
    )
