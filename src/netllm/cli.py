"""``netllm``: doctor, data, collect, adapt, eval, bench, demo.

Shared options mean the same everywhere: ``--seeds`` (``1,2,3`` or ``1-10``), ``--out``
(the run folder), ``--llm`` (backbone spec), ``--device`` (auto/cpu/cuda/mps).
Mistakes a user can make end in one line naming the file or option, exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from netllm.utils import NetLLMError, parse_seeds

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="NetLLM: adapt a pretrained LLM to networking tasks (VP, ABR, CJS).",
)
data_app = typer.Typer(no_args_is_help=True, help="Find, verify and fetch the data sets.")
app.add_typer(data_app, name="data")
console = Console()

SEEDS = typer.Option("1", "--seeds", help="Seeds: a list (1,2,3) or a range (1-10).")
OUT = typer.Option(None, "--out", help="Run folder for the artefacts (default runs/<command>-<task>).")
LLM = typer.Option("smollm2", "--llm", help="Backbone: smollm2, a .gguf file, a model folder or a HF id.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


TASK_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _task_options(ctx: typer.Context) -> dict[str, Any]:
    """Task-specific options (``--traces fcc-test``, ``--video video2``, ``--jobs 200``):
    the framework passes them through and the task validates them."""
    args, opts = list(ctx.args), {}
    while args:
        key = args.pop(0)
        if not key.startswith("--") or len(key) < 3:
            raise NetLLMError(f"unexpected argument {key!r}; task options look like --name value")
        name = key[2:].replace("-", "_")
        if "=" in name:
            name, value = name.split("=", 1)
        elif args and not args[0].startswith("--"):
            value = args.pop(0)
        else:
            value = True
        opts[name] = value
    return opts


def _call_task(task: Any, method: str, task_name: str, options: dict[str, Any], **kwargs: Any) -> Any:
    """Call ``task.<method>`` with the shared and the task-specific options."""
    import inspect

    fn = getattr(task, method, None)
    if not callable(fn):
        raise NetLLMError(f"task {task_name!r} does not support this command")
    params = inspect.signature(fn).parameters
    for name in options:
        if name not in params or name in kwargs:
            known = [f"--{p.replace('_', '-')}" for p in params if p not in kwargs]
            raise NetLLMError(f"--{name.replace('_', '-')}: not an option of task {task_name!r} here; "
                              f"its options: {', '.join(known) or 'none'}")
    return fn(**kwargs, **options)


def _out(out: Optional[Path], default: str) -> Path:
    return out if out is not None else Path("runs") / default


# ----------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    llm: str = LLM,
    device: str = DEVICE,
    layers: Optional[int] = typer.Option(None, "--layers", help="Keep only the first N decoder layers."),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Text to continue greedily."),
) -> None:
    """Check the installation: torch, device, the backbone and its weights, the data sets."""
    import torch

    from netllm import data
    from netllm.backbone import load_backbone
    from netllm.utils import resolve_device

    dev = resolve_device(device)
    console.print(f"torch {torch.__version__}  device: [bold]{dev}[/bold]  threads: {torch.get_num_threads()}")
    t0 = time.perf_counter()
    bb = load_backbone(llm, layers=layers, lora=None, device=device)
    seconds = time.perf_counter() - t0
    _, total = bb.parameter_counts()
    cache = "from cache" if bb.report.from_cache else "first load, now cached"
    console.print(
        f"backbone: [bold]{bb.name}[/bold] ({bb.report.source})\n"
        f"  parameters: {total / 1e6:.1f} M  layers: {bb.num_layers}  hidden size: {bb.hidden_size}  "
        f"dtype: {str(bb.dtype).replace('torch.', '')}\n  loaded in {seconds:.1f} s ({cache})"
    )
    table = Table(title="data sets", show_lines=False)
    for col in ("task", "group", "present", "state"):
        table.add_column(col)
    try:
        rows = data.status()
        root = data.data_root()
    except NetLLMError as e:
        rows, root = [], None
        console.print(f"[yellow]data: {e}[/yellow]")
    for r in rows:
        table.add_row(r["task"], r["group"], f"{r['present']}/{r['expected']}", r["state"])
    if root is not None:
        console.print(f"data root: {root}")
        console.print(table)
    text = bb.greedy_continuation(prompt)
    console.print(f"greedy continuation: [bold]{prompt}[/bold]{text!s}")


# ----------------------------------------------------------------------------- data


@data_app.command("status")
def data_status(verify: bool = typer.Option(False, "--verify", help="Also check every sha256.")) -> None:
    """Show which data sets are present (and verified) under the data root."""
    from netllm import data

    root = data.data_root()
    rows = data.status(verify=verify)
    table = Table(title=f"data sets in {root}")
    for col in ("task", "group", "files", "present", "verified", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["task"], r["group"], str(r["expected"]), str(r["present"]),
                      str(r["verified"]) if verify else "-", r["state"])
    console.print(table)


@data_app.command("fetch")
def data_fetch(
    task: str = typer.Argument(..., help="abr, vp, cjs or all"),
    base_url: str = typer.Option(None, "--base-url", help="Mirror of the upstream repository (raw files)."),
) -> None:
    """Download a task's data sets from their pinned upstream URLs, checking each sha256."""
    from netllm import data

    if task not in ("abr", "vp", "cjs", "all"):
        raise NetLLMError(f"TASK: unknown data set group {task!r}; use abr, vp, cjs or all")
    from netllm.tasks import available_tasks, get_task

    for name in available_tasks():  # tasks register their post-fetch steps (e.g. ABR's converter)
        get_task(name)
    kwargs: dict[str, Any] = {} if base_url is None else {"base_url": base_url}
    summary = data.fetch(task, **kwargs)
    console.print(summary)


# ----------------------------------------------------------------------------- task commands


@app.command(context_settings=TASK_OPTIONS)
def collect(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name (abr, cjs, ...)."),
    policy: list[str] = typer.Option(..., "--policy", help="Policy that plays the episodes (repeatable)."),
    seeds: str = SEEDS,
    out: Optional[Path] = OUT,
) -> None:
    """Collect an experience pool with existing policies (decision tasks)."""
    from netllm.tasks import get_task

    seed_list = parse_seeds(seeds)
    _call_task(get_task(task), "collect", task, _task_options(ctx), policies=policy, seeds=seed_list,
               out=_out(out, f"pool-{task}"))


@app.command(context_settings=TASK_OPTIONS)
def adapt(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name (abr, vp, cjs, ...)."),
    pool: Optional[list[Path]] = typer.Option(None, "--pool", help="Experience pool (decision tasks); "
                                              "repeat it to train on several pools."),
    out: Optional[Path] = OUT,
    llm: str = LLM,
    device: str = DEVICE,
    layers: Optional[int] = typer.Option(None, "--layers", help="Keep only the first N decoder layers."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank (0 = no LoRA)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (instead of --steps)."),
    context: int = typer.Option(10, "--context", help="Context window K in steps (decision tasks)."),
    seeds: str = SEEDS,
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    random_init: bool = typer.Option(False, "--random-init", help="Random LLM weights (ablation)."),
) -> None:
    """Adapt the LLM to a task: LoRA + encoders + head, supervised or offline RL."""
    from netllm.tasks import get_task

    seed_list = parse_seeds(seeds)
    _call_task(get_task(task), "adapt", task, _task_options(ctx), pool=list(pool or []),
               out=_out(out, f"{task}-adapter"), llm=llm, device=device, layers=layers, rank=rank, steps=steps,
               epochs=epochs, context=context, seeds=seed_list, resume=resume, pretrained=not random_init)


@app.command(name="eval", context_settings=TASK_OPTIONS)
def evaluate(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name (abr, vp, cjs, ...)."),
    policy: list[str] = typer.Option(..., "--policy", help="Baseline name or adapter folder (repeatable)."),
    seeds: str = SEEDS,
    out: Optional[Path] = OUT,
    device: str = DEVICE,
) -> None:
    """Evaluate baselines and adapters side by side; writes results.json, CSV and plots."""
    from netllm.tasks import get_task

    seed_list = parse_seeds(seeds)
    _call_task(get_task(task), "eval_cli", task, _task_options(ctx), policies=policy, seeds=seed_list,
               out=_out(out, f"eval-{task}"), device=device)


@app.command(context_settings=TASK_OPTIONS)
def bench(
    ctx: typer.Context,
    what: str = typer.Argument("foundation", help="foundation, or a task name."),
    llm: str = LLM,
    device: str = DEVICE,
    out: Optional[Path] = OUT,
    repeats: int = typer.Option(3, "--repeats", help="Timed repetitions per measurement."),
) -> None:
    """Measure speed and quality; numbers go to <out>/bench.json and a table."""
    if what == "foundation":
        from netllm.bench import run_foundation_bench

        run_foundation_bench(llm=llm, device=device, out=_out(out, "bench-foundation"), repeats=repeats)
        return
    from netllm.tasks import get_task

    _call_task(get_task(what), "bench", what, _task_options(ctx), out=_out(out, f"bench-{what}"), llm=llm,
               device=device)


@app.command()
def demo(llm: str = LLM, device: str = DEVICE) -> None:
    """The main job. Until the ABR use case lands: the backbone check (doctor)."""
    from netllm.tasks import available_tasks

    if "abr" in available_tasks():
        from netllm.tasks import get_task

        get_task("abr").demo(llm=llm, device=device)  # type: ignore[attr-defined]
        return
    console.print("[bold]NetLLM demo[/bold]: no use case is installed yet; running the backbone check.")
    doctor(llm=llm, device=device, layers=None, prompt="The capital of France is")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        app(standalone_mode=False)
    except NetLLMError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
