"""One adaptation recipe and one adaptation pipeline, shared by every task.

A task's recipe is a subclass of :class:`Recipe` (its own defaults and extra fields);
its ``adapt`` builds the model, a deterministic ``get_batch(i)``, a loss and an optional
validation function, and hands them to :func:`run_adaptation`, which trains, keeps
the adapter that is best on validation (or the last one without validation) and writes
the run's details into the adapter. :func:`stage_done` tells a benchmark which
adaptations it can reuse, :func:`load_policy` turns a baseline name or a run folder
into a policy, and :func:`decision_speed` is the one speed report of decision tasks.

    recipe = ABRRecipe(layers=4, steps=2000)        # every default in one place
    adapter = task.adapt(data, Path("runs/abr"), recipe)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from netllm.options import Options, opt
from netllm.utils import NetLLMError

if TYPE_CHECKING:
    from netllm.model import NetLLM
    from netllm.tasks.base import Task


@dataclass
class Recipe(Options):
    """Hyper-parameters of one adaptation (LoRA + encoders + heads on a frozen LLM)."""

    llm: str = opt("smollm2", "Backbone: smollm2, a .gguf file, a model folder, a Hugging Face id, "
                              "or 'scratch' (a small transformer from scratch, the control).")
    layers: int | None = opt(6, "Keep only the first N decoder layers (default of the backbone if unset).", min=1)
    rank: int = opt(16, "LoRA rank on the attention projections (0: no LoRA).", min=0)
    batch_size: int = opt(16, "Samples per micro-batch (per process under accelerate launch).", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step: a step sees batch size x grad accum x "
                             "processes samples.", min=1)
    steps: int = opt(2000, "Optimizer steps.", min=1)
    epochs: float | None = opt(None, "Passes over the training data; replaces --steps when given.", min=0)
    lr: float = opt(3e-4, "Peak learning rate (AdamW).", min=0)
    warmup_steps: int = opt(100, "Linear warm-up steps (at most a quarter of the run).", min=0)
    weight_decay: float = opt(0.01, "AdamW weight decay of the matrices.", min=0)
    schedule: str = opt("constant", "Learning rate after warm-up.", choices=("constant", "linear", "cosine"))
    eval_every: int = opt(250, "Validate every N steps and keep the best adapter (0: keep the last).", min=0)
    pretrained: bool = opt(True, "Pretrained LLM weights, or random ones (the control).",
                           flag="--pretrained/--random-init")
    seed: int = opt(0, "Training seed (initialisation, batches).", min=0)
    dtype: str = opt("auto", "Training precision: fp32, or bf16 (frozen weights in bf16, autocast; on a CUDA GPU "
                             "or a CPU with AMX / AVX512-BF16); auto: bf16 on CUDA, else fp32.",
                     choices=("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute the LLM's activations in the backward pass (less "
                                              "memory for deep backbones, ~30 % more compute).")

    def check(self) -> None:
        super().check()
        if self.lr <= 0:
            raise NetLLMError(f"--lr: must be > 0, got {self.lr!r}")
        # a path (not a Hugging Face id such as org/name) must exist before hours of work start
        path_like = self.llm.startswith(("/", ".", "~")) or self.llm.endswith(".gguf")
        if path_like and not Path(self.llm).expanduser().exists():
            raise NetLLMError(f"--llm: no such model file or folder: {self.llm}")

    def total_steps(self, num_samples: int) -> int:
        """``steps``, or ``epochs`` passes over ``num_samples`` training samples."""
        if self.epochs is not None:
            from netllm.train import launched_processes

            per_step = self.batch_size * self.grad_accum * launched_processes()
            return max(1, math.ceil(self.epochs * num_samples / per_step))
        return self.steps


def run_adaptation(model: "NetLLM", get_batch: Callable[[int], Any], loss_fn: Callable[..., Any],
                   recipe: Recipe, out: Path, *, steps: int, metric: str, higher_is_better: bool,
                   validate: Callable[["NetLLM"], float] | None = None,
                   extra: Callable[[], dict[str, Any]] | None = None, resume: bool = False,
                   progress: bool = True, min_lr: float = 0.0) -> Path:
    """Train ``model`` by ``recipe`` and keep the adapter that is best on ``validate``
    (every ``recipe.eval_every`` steps; the last weights without validation) in ``out``.

    ``extra()`` adds the task's run details (target return, pool, ...) to the adapter's
    config, beside the recipe and the training time. Returns the adapter folder.
    """
    from netllm.model import BestAdapter
    from netllm.train import TrainConfig, is_main_process, train, wait_for_everyone

    t0 = time.perf_counter()
    precision = training_precision(recipe.dtype, model.device)
    set_precision(model, precision)
    if recipe.gradient_checkpointing:
        model.backbone.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def details() -> dict[str, Any]:
        return {"recipe": asdict(recipe), **(extra() if extra else {}), "train_seconds": time.perf_counter() - t0}

    # under `accelerate launch` only the main process validates and keeps the adapter
    keeper = BestAdapter(out, metric, higher_is_better=higher_is_better, extra=details,
                         resume=resume) if is_main_process() else None
    eval_fn = None
    if validate is not None and recipe.eval_every > 0:
        def eval_fn(m: Any, step: int) -> dict[str, float]:
            assert keeper is not None
            m.eval()
            score = float(validate(m))
            keeper.update(m, score, step)
            return {metric: score}

    config = TrainConfig(steps=steps, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, steps // 4),
                         weight_decay=recipe.weight_decay, schedule=recipe.schedule,  # type: ignore[arg-type]
                         min_lr=min_lr, eval_every=recipe.eval_every if eval_fn else 0, grad_accum=recipe.grad_accum,
                         checkpoint_every=max(steps // 10, 25), log_every=10, seed=recipe.seed,
                         progress=progress, mixed_precision=precision)  # type: ignore[arg-type]
    train(model, get_batch, loss_fn, config, out / "train", eval_fn=eval_fn, resume=resume)
    if keeper is None:
        wait_for_everyone()
        return out
    adapter = keeper.finish(model)
    wait_for_everyone()
    return adapter


def training_precision(dtype: str, device: Any) -> str:
    """``--dtype`` on ``device`` as the loop's mixed precision: "bf16" or "no". ``auto``
    is bf16 on a CUDA GPU that supports it, else fp32; bf16 on a device without native
    bf16 matrix products (a CPU without AMX or AVX512-BF16, a GPU without bf16) is a
    one-line error."""
    import torch

    from netllm.backbone import native_bf16

    dev = device if isinstance(device, torch.device) else torch.device(str(device))
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" and native_bf16(dev) else "fp32"
    if dtype == "bf16" and not native_bf16(dev):
        raise NetLLMError(f"--dtype bf16: trains with bf16 autocast where bf16 matrix products are native (a CUDA "
                          f"GPU with bf16, a CPU with AMX or AVX512-BF16); this {dev.type} has none (use --dtype fp32)")
    return "bf16" if dtype == "bf16" else "no"


def set_precision(model: Any, precision: str) -> None:
    """The frozen LLM weights in bf16 (with autocast) or fp32; trainable ones stay fp32."""
    import torch

    want = torch.bfloat16 if precision == "bf16" else torch.float32
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)
        elif p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


TRAIN_SEEDS_HELP = ("Training seeds, e.g. 0-2: every trained variant (NetLLM and its controls) is trained once per "
                    "seed; the tables give mean and std over them and the headline differences a paired 95 % "
                    "interval (replaces --seed). Training seeds only seed initialisation and batch order.")


def check_train_seeds(options: Recipe) -> list[int]:
    """The ``--train-seeds`` of a benchmark; ``--seed`` is refused beside it (one run per seed)."""
    from netllm.utils import parse_seeds

    seeds = parse_seeds(getattr(options, "train_seeds"), "--train-seeds")
    if options.seed != Recipe.seed:
        raise NetLLMError("--seed: the benchmark trains one run per training seed; pass --train-seeds instead")
    return seeds


def train_variants(variants: dict[str, Recipe], train_seeds: list[int], out: Path, num_samples: int,
                   wall_s: dict[str, float], *, train: Callable[[Any, Path], Any]) -> dict[str, dict[int, Path]]:
    """A benchmark's trainings: every variant once per training seed, in
    ``out/<variant>-seed<s>``, by ``train(recipe, folder)`` (resumable); a finished stage
    is reused. Returns ``{variant: {seed: folder}}``; the wall time of each training goes
    to ``wall_s``."""
    runs: dict[str, dict[int, Path]] = {}
    for name, recipe in variants.items():
        for s in train_seeds:
            folder = runs.setdefault(name, {}).setdefault(s, out / f"{name}-seed{s}")
            seeded = replace(recipe, seed=s)
            check_same_recipe(folder, seeded)
            if stage_done(folder, seeded.total_steps(num_samples)):
                continue
            t0 = time.perf_counter()
            train(seeded, folder)
            wall_s[f"adapt {folder.name}"] = time.perf_counter() - t0
    return runs


def check_same_recipe(folder: Path, recipe: Any, config_file: str | None = None) -> None:
    """A benchmark reuses (or resumes) the run in ``folder`` only if it was trained by
    ``recipe`` (a dataclass): a run of another recipe is a one-line error, not a silently
    wrong row. The stored recipe is ``extra.recipe`` (an adapter's config) or ``recipe``
    (a small model's) of ``config_file`` (default: the adapter config). A field the stored
    recipe lacks (added since) counts as its default."""
    import json

    from netllm.model import ADAPTER_CONFIG

    config = folder / (config_file or ADAPTER_CONFIG)
    if not config.is_file():
        return
    try:
        saved = json.loads(config.read_text())
        stored = saved.get("extra", {}).get("recipe", saved.get("recipe"))
    except (OSError, ValueError) as e:
        raise NetLLMError(f"{config}: unreadable ({e})") from e
    if not isinstance(stored, dict):
        return
    wanted = json.loads(json.dumps(asdict(recipe), default=str))
    defaults = json.loads(json.dumps(asdict(type(recipe)()), default=str))
    differ = [k for k, v in wanted.items() if stored.get(k, defaults.get(k)) != v]
    if differ:
        k = differ[0]
        raise NetLLMError(f"{folder}: holds a run of another recipe ({k}: {stored.get(k, defaults.get(k))!r} there, "
                          f"{wanted[k]!r} now{f', and {len(differ) - 1} more' if len(differ) > 1 else ''}); "
                          "use another --out or remove it")


def stage_done(folder: Path, steps: int) -> bool:
    """Whether ``folder`` holds a finished run of ``steps`` steps — an adaptation's optimizer
    steps or a fine-tuning's iterations (a benchmark reuses it)."""
    from netllm.checkpoint import completed_steps
    from netllm.model import ADAPTER_CONFIG

    return (folder / ADAPTER_CONFIG).is_file() and completed_steps(folder / "train") >= steps


def load_policy(task: "Task", name: str, options: Any, device: str = "auto", dtype: str = "auto") -> Any:
    """A policy of ``task``: a run folder (a trained adapter, or another run the task
    knows) or a baseline name. A bad name is a one-line error listing the baselines.
    ``dtype`` (auto, fp32, bf16) is the precision of a run folder's inference-only LLM."""
    from netllm.backbone import inference_precision
    from netllm.parallel import PolicySource, remember_source

    path = Path(name)
    if path.is_dir():  # workers (netllm.parallel) reload it from the same folder
        source = PolicySource(task.name, str(path.resolve()), options, device, dtype)
        with inference_precision(dtype):
            return remember_source(task.policy_from_run(path, options, device), source)
    baselines = task.baselines()
    if name in baselines:
        return remember_source(baselines[name](options), PolicySource(task.name, name, options, device))
    if path.exists() or "/" in name or name.startswith("."):
        raise NetLLMError(f"--policy {name}: not a run folder")
    raise NetLLMError(f"--policy {name}: not a baseline of {task.name} ({', '.join(baselines)}) "
                      "nor a run folder")


def decision_speed(play: Callable[[bool], tuple[float, int]]) -> dict[str, float]:
    """The decision-latency report of a decision task: ``play(use_cache)`` runs the
    policy for a while and returns (wall seconds, decisions); KV cache vs recompute."""
    report: dict[str, float] = {}
    for use_cache in (True, False):
        wall, decisions = play(use_cache)
        report["decision_ms_kv_cache" if use_cache else "decision_ms_full_recompute"] = wall / decisions * 1e3
    report["kv_cache_speedup"] = report["decision_ms_full_recompute"] / report["decision_ms_kv_cache"]
    return report
