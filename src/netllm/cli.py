"""``netllm``: doctor, data, collect, adapt, eval, bench, finetune, serve, demo.

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
from typer.core import TyperGroup
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
    task: str = typer.Argument(..., help="An installed task (abr, vp, cjs or a plug-in's) or all."),
    base_url: str = typer.Option(None, "--base-url", help="Mirror of the upstream repository (raw files)."),
) -> None:
    """Download a task's data sets from their pinned upstream URLs, checking each sha256,
    then run the task's post-fetch step (e.g. ABR's checkpoint conversion)."""
    from netllm import data

    # data.fetch checks TASK first: an unknown one is a one-line error listing the installed tasks
    kwargs: dict[str, Any] = {} if base_url is None else {"base_url": base_url}
    summary = data.fetch(task, **kwargs)
    console.print(summary)


# ----------------------------------------------------------------------------- task commands
#
# `netllm <command> <task> [options]`: one sub-command per installed task, its options built
# from the task's typed options dataclass (see netllm.options), so `--help` lists every one
# with its default. The options are checked before anything is written.


class TaskGroup(TyperGroup):
    """A command group whose sub-commands are tasks: an unknown name lists the installed ones."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise NetLLMError(f"unknown task {name!r} for '{ctx.info_name}'; installed tasks with it: "
                              + (", ".join(self.list_commands(ctx)) or "none"))
        return super().resolve_command(ctx, args)


collect_app = typer.Typer(cls=TaskGroup, no_args_is_help=True,
                          help="Collect an experience pool with existing policies (decision tasks).")
adapt_app = typer.Typer(cls=TaskGroup, no_args_is_help=True,
                        help="Adapt the LLM to a task: LoRA + encoders + head, supervised or offline RL.")
eval_app = typer.Typer(cls=TaskGroup, no_args_is_help=True,
                       help="Evaluate baselines and adapters side by side; writes results.json, CSV and plots.")
bench_app = typer.Typer(cls=TaskGroup, no_args_is_help=True,
                        help="Measure quality and speed: a task's whole pipeline, or the foundation.")
app.add_typer(collect_app, name="collect")
app.add_typer(adapt_app, name="adapt")
app.add_typer(eval_app, name="eval")
finetune_app = typer.Typer(cls=TaskGroup, no_args_is_help=True,
                           help="Fine-tune an offline adapter online in the task's simulator (PPO).")
app.add_typer(bench_app, name="bench")
app.add_typer(finetune_app, name="finetune")

_COMMON = {
    "policy": (list[str], typer.Option(..., "--policy", help="Baseline name or run folder (repeatable).")),
    "seeds": (str, SEEDS),
    "out": (Optional[Path], OUT),
    "device": (str, DEVICE),
    "resume": (bool, typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint.")),
    "dtype": (str, typer.Option("auto", "--dtype", help="Precision of the LLM's weights at inference: auto (bf16 "
                                                       "on CUDA, fp32 elsewhere), fp32, or bf16 (about 2x faster on "
                                                       "a CPU with AMX; decisions may differ slightly from fp32 and, "
                                                       "unlike fp32's, with the episodes batched beside them).")),
    "workers": (Optional[int], typer.Option(None, "--workers", help="Spread the episodes over N Ray workers "
                                                                    "(a local Ray; needs the ray extra of netllm).")),
    "ray_address": (Optional[str], typer.Option(None, "--ray-address", help="Run the workers on an existing "
                                                                            "Ray cluster (HOST:PORT or auto).")),
}
PARALLEL = ("workers", "ray_address")  # eval, collect and finetune of a task with Task.parallel


def _workers(common: dict[str, Any]) -> Any:
    """The Ray workers of ``--workers`` / ``--ray-address`` (a no-op context without them)."""
    from netllm import parallel

    workers, address = common.get("workers"), common.get("ray_address")
    if workers is not None and workers < 1:
        raise NetLLMError(f"--workers: must be >= 1, got {workers}")
    return parallel.workers(workers, address)


def _typed_command(options_cls: type, common: tuple[str, ...], run: Any) -> Any:
    """A Typer command whose parameters are ``common`` (see _COMMON) and the fields of
    ``options_cls``; it calls ``run(common_values, options)`` with the checked options."""
    import dataclasses
    import inspect

    from netllm.options import fields_of, option_name

    params, annotations = [], {}
    for name in common:
        kind, info = _COMMON[name]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))
        annotations[name] = kind
    names = []
    for f, kind, optional in fields_of(options_cls):
        if f.name in common:
            raise TypeError(f"{options_cls.__name__}.{f.name} clashes with a common option")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        decl = f.metadata.get("flag") or option_name(f.name)
        if kind is list:
            annotation: Any = Optional[list[str]]
            default = None
        elif kind is bool and "/" not in decl:
            annotation = bool
            decl = f"{decl}/--no-{decl[2:]}"
        else:
            annotation = Optional[kind] if optional else kind
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += " [" + "|".join(f.metadata["choices"]) + "]"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(default, decl, help=help_text, show_default=True)))
        annotations[f.name] = annotation
        names.append(f.name)

    def command(**values: Any) -> None:
        fields = {n: ([] if values[n] is None and isinstance(_default_of(options_cls, n), list) else values[n])
                  for n in names}
        options = options_cls.build(**fields)
        run({n: values[n] for n in common}, options)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    return command


def _default_of(options_cls: type, name: str) -> Any:
    import dataclasses

    f = next(f for f in dataclasses.fields(options_cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _policies(task: Any, names: list[str], options: Any, device: str, dtype: str = "auto") -> dict[str, Any]:
    """Every ``--policy``, loaded before anything is written (a bad name fails fast)."""
    from netllm.recipe import load_policy

    made: dict[str, Any] = {}
    for name in names:
        policy = load_policy(task, name, options, device, dtype=dtype)
        label = policy.name if Path(name).is_dir() else name
        made[label] = policy
    return made


def _check_inference_dtype(dtype: str, device: str) -> None:
    """``--dtype`` of eval: one of auto, fp32, bf16; bf16 where the hardware emulates it
    runs, with a note that it is slower than fp32 there."""
    from netllm.backbone import check_inference_dtype, native_bf16
    from netllm.utils import resolve_device

    check_inference_dtype(dtype)
    dev = resolve_device(device)
    if dtype == "bf16" and not native_bf16(dev):
        console.print(f"[yellow]note: --dtype bf16 on this {dev.type} has no native bf16 matrix unit "
                      "(AMX, AVX512-BF16 or a CUDA GPU): it is emulated and slower than fp32[/yellow]")


def _register(task: Any) -> None:
    """The sub-commands of one task under collect / adapt / eval / bench."""
    from netllm.utils import prepare_run_dir

    name = task.name

    def run_eval(common: dict[str, Any], options: Any) -> None:
        seeds = parse_seeds(common["seeds"])
        task.check_eval(options)
        _check_inference_dtype(common["dtype"], common["device"])
        policies = _policies(task, common["policy"], options, common["device"], common["dtype"])
        out = _out(common["out"], f"eval-{name}")
        with _workers(common):  # Ray is up (or the address answered) before the run folder is written
            prepare_run_dir(out, {"command": f"eval {name}", "policies": common["policy"], "seeds": seeds,
                                  "dtype": common["dtype"], **options.to_dict()})
            task.evaluate(policies, seeds, options, out)

    parallel = PARALLEL if task.parallel else ()
    eval_app.command(name=name, help=f"Evaluate policies on {name}: {task.summary}")(
        _typed_command(task.EvalOptions, ("policy", "seeds", "out", "device", "dtype", *parallel), run_eval))

    def run_adapt(common: dict[str, Any], recipe: Any) -> None:
        from netllm.recipe import training_precision
        from netllm.utils import resolve_device

        from netllm.train import check_fsdp_device

        device = resolve_device(common["device"])
        training_precision(recipe.dtype, device)  # --dtype bf16 without native bf16: refused here, before any file
        check_fsdp_device(device)  # an FSDP accelerate config on a CPU, too
        task.check_adapt(recipe)
        out = _out(common["out"], f"{name}-adapter")
        prepare_run_dir(out, {"command": f"adapt {name}", "resume": common["resume"], **recipe.to_dict()})
        adapter = task.adapt(out, recipe, device=common["device"], resume=common["resume"])
        from netllm.train import is_main_process

        if is_main_process():  # once, under accelerate launch
            console.print(f"adapter: {adapter}")

    adapt_app.command(name=name, help=f"Adapt the LLM to {name}: {task.summary}")(
        _typed_command(task.AdaptOptions, ("out", "device", "resume"), run_adapt))

    if task.CollectOptions is not None:
        def run_collect(common: dict[str, Any], options: Any) -> None:
            seeds = parse_seeds(common["seeds"])
            _policies(task, common["policy"], options, "cpu")
            out = _out(common["out"], f"pool-{name}")
            with _workers(common):
                prepare_run_dir(out, {"command": f"collect {name}", "policies": common["policy"], "seeds": seeds,
                                      **options.to_dict()})
                task.collect(common["policy"], seeds, options, out)

        collect_app.command(name=name, help=f"Collect an experience pool on {name}.")(
            _typed_command(task.CollectOptions, ("policy", "seeds", "out", *parallel), run_collect))

    if task.BenchOptions is not None:
        def run_bench(common: dict[str, Any], options: Any) -> None:
            from netllm.utils import resolve_device

            resolve_device(common["device"])
            out = _out(common["out"], f"bench-{name}")
            prepare_run_dir(out, {"command": f"bench {name}", **options.to_dict()})
            task.bench(options, out, device=common["device"])

        bench_app.command(name=name, help=f"Benchmark {name}: pool/data -> adaptation + controls -> "
                                          "evaluation against the baselines.")(
            _typed_command(task.BenchOptions, ("out", "device"), run_bench))


    if task.FinetuneOptions is not None:
        def run_finetune(common: dict[str, Any], options: Any) -> None:
            from netllm.finetune import check_run_folder, describe
            from netllm.train import is_main_process, launched_processes
            from netllm.utils import resolve_device

            if launched_processes() > 1 and (common.get("workers") is not None or common.get("ray_address")):
                raise NetLLMError("--workers/--ray-address: under accelerate launch the launched processes share "
                                  "the rollouts; use one or the other")
            reason = options.single_process()
            if reason and (launched_processes() > 1 or common.get("workers") is not None
                           or common.get("ray_address")):
                raise NetLLMError(reason)
            resolve_device(common["device"])
            out = _out(common["out"], f"{name}-finetune")
            check_run_folder(out, options, common["resume"])  # before anything is written
            with _workers(common):  # rollouts and validation episodes on the workers; the update here
                prepare_run_dir(out, {"command": f"finetune {name}", "resume": common["resume"],
                                      **options.to_dict()})
                task.finetune(options, out, device=common["device"], resume=common["resume"])
            if is_main_process():  # once, under accelerate launch
                console.print(describe(out))

        finetune_app.command(name=name, help=f"Fine-tune an adapter online on {name} (PPO from the offline "
                                             "policy, KL-penalised towards it).")(
            _typed_command(task.FinetuneOptions, ("out", "device", "resume", *parallel), run_finetune))


@bench_app.command("foundation")
def bench_foundation(
    llm: str = LLM,
    device: str = DEVICE,
    out: Optional[Path] = OUT,
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repetitions per measurement."),
    dtype: str = typer.Option("auto", "--dtype", help="Training step precision: fp32, or bf16 (bf16 frozen weights "
                              "and autocast; a CUDA GPU or a CPU with AMX / AVX512-BF16); auto: bf16 on CUDA, "
                              "else fp32."),
    batch: int = typer.Option(8, "--batch", min=1, help="Sequences per timed training step."),
    tokens: int = typer.Option(160, "--tokens", min=1, help="Tokens per sequence in the timed training step."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", min=1e-6, help="The device's peak TFLOP/s "
                                                "for the model FLOP utilisation (default: known NVIDIA GPUs' "
                                                "dense bf16 peak; none on a CPU)."),
) -> None:
    """Backbone load time, LoRA training tokens/s and FLOP utilisation, decision latency (KV cache vs recompute)."""
    from netllm.bench import run_foundation_bench

    if dtype not in ("auto", "fp32", "bf16"):
        raise NetLLMError(f"--dtype: {dtype!r} is not one of auto, fp32, bf16")
    run_foundation_bench(llm=llm, device=device, out=_out(out, "bench-foundation"), repeats=repeats, dtype=dtype,
                         batch=batch, tokens=tokens, peak=peak_tflops)


@app.command()
def demo(
    task: Optional[str] = typer.Option(None, "--task", help="The task whose demo runs (default: every task "
                                                             "that has one)."),
    device: str = DEVICE,
) -> None:
    """Train a small adapter on a small budget and compare it with the baselines (minutes on two cores)."""
    from netllm.registry import get_task, tasks

    chosen = [get_task(task)] if task else [t for t in tasks().values() if t.has_demo]
    if not chosen or not all(t.has_demo for t in chosen):
        raise NetLLMError(f"--task: {task!r} has no demo" if task else "no installed task has a demo")
    for t in chosen:
        t.demo(device=device)


def _serve_command(served: list[Any]) -> Any:
    """``netllm serve``: its own flags plus every task's ServeOptions as ``--<task>-<field>``."""
    import dataclasses
    import inspect

    from netllm.options import fields_of, option_name

    params = [
        inspect.Parameter("adapter", inspect.Parameter.KEYWORD_ONLY, annotation=list[str], default=typer.Option(
            ..., "--adapter", help="TASK=FOLDER of a trained adapter (repeatable); all share one base LLM.")),
        inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("127.0.0.1", "--host", help="Address to listen on.")),
        inspect.Parameter("port", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(8333, "--port", help="Port (8333: Pensieve's).")),
        inspect.Parameter("deadline_ms", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
            200.0, "--deadline-ms", help="A decision not ready by then is answered by the fallback (0: none).")),
        inspect.Parameter("fallback", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "", "--fallback", help="TASK=POLICY,... answering past the deadline or on a model error "
                                   "(default: abr=hold-bba, vp=no-motion).")),
        inspect.Parameter("max_sessions", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
            64, "--max-sessions", help="Open sessions per task at most (the next gets 503).")),
        inspect.Parameter("session_ttl_s", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
            300.0, "--session-ttl-s", help="A session idle this long is closed.")),
        inspect.Parameter("batch_window_ms", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
            1.0, "--batch-window-ms", help="How long a decision waits for others to batch with.")),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=DEVICE),
        inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=_COMMON["dtype"][1]),
    ]
    own: dict[str, tuple[str, str]] = {}  # parameter -> (task, field)
    for task in served:
        for f, kind, optional in fields_of(task.ServeOptions):
            pname = f"{task.name}_{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            params.append(inspect.Parameter(
                pname, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind] if optional else kind,
                default=typer.Option(default, f"--{task.name}-{option_name(f.name)[2:]}",
                                     help=f"{task.name}: {f.metadata.get('help', '')}")))
            own[pname] = (task.name, f.name)

    def serve(**values: Any) -> None:
        """Serve trained adapters over HTTP: one base LLM, a deadline with a safe fallback per decision."""
        from netllm.registry import get_task
        from netllm.serve.app import ServeSettings, create_app, run
        from netllm.serve.hub import parse_adapters, parse_pairs
        from netllm.utils import resolve_device

        resolve_device(values["device"])
        _check_inference_dtype(values["dtype"], values["device"])
        adapters = parse_adapters(values["adapter"])
        task_values: dict[str, dict[str, Any]] = {}
        for pname, (tname, fname) in own.items():
            task_values.setdefault(tname, {})[fname] = values[pname]
        task_options = {t: get_task(t).ServeOptions.build(**task_values.get(t, {}))
                        for t in adapters if getattr(get_task(t), "ServeOptions", None) is not None}
        settings = ServeSettings(deadline_ms=values["deadline_ms"], max_sessions=values["max_sessions"],
                                 session_ttl_s=values["session_ttl_s"], batch_window_ms=values["batch_window_ms"],
                                 fallbacks=parse_pairs(values["fallback"], "--fallback"))
        if not 0 < values["port"] < 65536:
            raise NetLLMError(f"--port: must be in 1..65535, got {values['port']}")
        app_ = create_app(adapters, settings, task_options, device=values["device"], dtype=values["dtype"])
        console.print(f"serving {', '.join(adapters)} on http://{values['host']}:{values['port']} "
                      f"(API docs: /docs, health: /healthz, metrics: /metrics)")
        run(app_, values["host"], values["port"])

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    serve.__annotations__ = {p.name: p.annotation for p in params}
    return serve


def build_app() -> typer.Typer:
    """The CLI with every installed task's commands."""
    from netllm.registry import broken_tasks, tasks

    if not getattr(build_app, "done", False):
        for why in broken_tasks().values():
            Console(stderr=True).print(f"[yellow]warning:[/yellow] {why}", highlight=False, soft_wrap=True)
        for task in tasks().values():
            _register(task)
        served = [t for t in tasks().values() if t.ServeOptions is not None]
        app.command(name="serve", help="Serve trained adapters over HTTP (FastAPI): one base LLM for every "
                                       "task, a deadline and a safe fallback per decision, Prometheus "
                                       "metrics; ABR also speaks Pensieve's protocol (POST /).")(
            _serve_command(served))
        build_app.done = True  # type: ignore[attr-defined]
    return app


# typer's own click: the base of its usage errors (a bad value, an unknown option)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(args: list[str] | None = None) -> None:
    """Entry point (``args``: the command line, default sys.argv): user errors become one
    line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        build_app()(args=args, prog_name="netllm", standalone_mode=False)
    except NetLLMError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except _CLICK_ERROR as e:  # usage errors (a bad value, an unknown option): one line
        Console(stderr=True).print(f"[red]error:[/red] {e.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
