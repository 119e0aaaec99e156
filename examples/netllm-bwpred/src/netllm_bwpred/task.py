"""NetLLM for throughput prediction: a token per history second, all 5 future seconds in ONE pass.

The data flow:  ABR traces -> 1 s series (Mbps) -> windows (10 s history, 5 s future)
                -> (baseline | LSTM | NetLLM) -> MAE in Mbps, overall and per future second

The NetLLM model (``tokens="step"``, the default): for every history second ``t`` the
series encoder (a 1-D CNN over a short patch) sees the seconds ``t-2 .. t`` (the first
second repeated before the start) in two channels, log1p(Mbps) and its offset to the
last observed second, and makes ONE token: 10 tokens per window, in time order. The
LLM's attention can then compare seconds (a level shift 4 s ago, a recent dip), and the
last token — the newest second, which attends to all others — is what the regression
head reads, as in VP. ``tokens="window"`` is the alternative: the series encoder over
the whole 10 s makes a single token, leaving the LLM nothing to attend across (its
layers then act as a deep MLP on one vector); it is kept as a control.

The head returns 5 log1p offsets to the last observed second; the prediction is
``expm1(log1p(last) + offset)`` (>= 0). The head's output layer starts at zero, so an
untrained model IS the last-value baseline; training minimises the MAE in Mbps itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import ADAPTER_CONFIG, NetLLM, NetLLMConfig, read_adapter_config
from netllm.options import Options, opt
from netllm.recipe import Recipe, run_adaptation
from netllm.tasks.base import Metrics, Task
from netllm.utils import NetLLMError, seed_everything
from netllm_bwpred.baselines import BASELINES, LSTM_CONFIG, LSTMPredictor, l1_mbps, train_lstm
from netllm_bwpred.data import (
    HISTORY_S,
    HORIZON_S,
    STEP_S,
    TRANSFORM,
    Windows,
    batches,
    check_trace_set,
    drop_copies,
    from_offsets,
    load_trace_set,
    log_channels,
    split_train_valid,
    windows,
)

console = Console()

PATCH_S = 3  # seconds each step token sees (t-2 .. t)
TOKENS = ("step", "window")
METRIC = "mae_mbps"
STEP_PARTS = tuple(f"mae_step{k}_mbps" for k in range(1, HORIZON_S + 1))  # MAE k seconds ahead


# ----------------------------------------------------------------------------- model


def model_config(*, llm: str = "smollm2", layers: int | None = 4, rank: int = 16, tokens: str = "step",
                 pretrained: bool = True, seed: int = 0) -> NetLLMConfig:
    """The bwpred model: series-encoder tokens of the history, one multi-step regression head."""
    if tokens not in TOKENS:
        raise NetLLMError(f"--tokens: one of {', '.join(TOKENS)}; got {tokens!r}")
    length = PATCH_S if tokens == "step" else HISTORY_S
    return NetLLMConfig(
        task="bwpred", llm=llm, layers=layers, pretrained=pretrained, seed=seed,
        lora=LoraSpec(rank=rank, alpha=2 * rank) if rank else LoraSpec(rank=0),
        encoders=[EncoderSpec("throughput", "series", in_dim=2, length=length, kernel_size=min(3, length))],
        heads={"future": HeadSpec("regression", steps=HORIZON_S, dims=1)},
        norm={"history_s": HISTORY_S, "horizon_s": HORIZON_S, "step_s": STEP_S, "unit": "Mbps",
              "transform": TRANSFORM, "channels": ["log1p level", "offset to the last second"],
              "tokens": tokens, "patch_s": PATCH_S if tokens == "step" else HISTORY_S,
              "output": "log1p offsets to the last second; prediction = expm1(log1p(last) + offset)"},
    )


def build_model(config: NetLLMConfig, device: str = "auto") -> NetLLM:
    model = NetLLM(config, device=device)
    last = model.heads["future"].mlp[-1]
    torch.nn.init.zeros_(last.weight)  # start as the last-value predictor
    torch.nn.init.zeros_(last.bias)
    return model


def token_inputs(channels: torch.Tensor, tokens: str) -> torch.Tensor:
    """(B, 2, T) channels -> the series encoder's input: (B, T, 2, PATCH_S) for step tokens
    (second t sees t-2..t, the first second repeated before the start), (B, 1, 2, T) for one."""
    if tokens == "window":
        return channels.unsqueeze(1)
    padded = torch.cat([channels[..., :1].expand(-1, -1, PATCH_S - 1), channels], dim=-1)
    return padded.unfold(-1, PATCH_S, 1).permute(0, 2, 1, 3).contiguous()


def predict_offsets(model: NetLLM, channels: torch.Tensor) -> torch.Tensor:
    """ONE LLM pass: (B, 2, 10) channels -> (B, 5) log1p offsets to the last second."""
    tokens = token_inputs(channels, model.config.norm.get("tokens", "step"))
    return model({"throughput": tokens})["future"][..., 0]


class NetLLMBWPolicy:
    """A trained adapter behind ``predict(history (N, 10) Mbps) -> (N, 5) Mbps``."""

    def __init__(self, model: NetLLM, name: str = "netllm", batch_size: int = 256) -> None:
        self.model, self.name, self.batch_size = model.eval(), name, batch_size

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto") -> "NetLLMBWPolicy":
        norm = read_adapter_config(folder).get("norm", {})
        if (norm.get("history_s"), norm.get("horizon_s")) != (HISTORY_S, HORIZON_S):
            raise NetLLMError(f"--policy {folder}: adapter predicts {norm.get('history_s')} s -> "
                              f"{norm.get('horizon_s')} s, bwpred evaluates {HISTORY_S} s -> {HORIZON_S} s")
        return cls(NetLLM.from_adapter(folder, task="bwpred", device=device), name=Path(folder).name)

    @torch.no_grad()
    def predict(self, history: np.ndarray) -> np.ndarray:
        h = np.asarray(history, dtype=np.float64)
        if h.ndim != 2 or h.shape[1] != HISTORY_S:
            raise NetLLMError(f"{self.name}: expects histories of shape (N, {HISTORY_S}) Mbps, got {h.shape}")
        outs = []
        for i in range(0, len(h), self.batch_size):
            part = h[i:i + self.batch_size]
            offsets = predict_offsets(self.model, torch.as_tensor(log_channels(part))).float().cpu()
            outs.append(from_offsets(torch.as_tensor(part[:, -1], dtype=torch.float32), offsets).double().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, HORIZON_S))


def bw_loss(model: NetLLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 in Mbps: the metric is a mean absolute error in Mbps."""
    offsets = predict_offsets(model, batch["channels"])
    pred = from_offsets(batch["last"].to(offsets.device), offsets)
    loss = l1_mbps(pred, batch["future"])
    n = batch["channels"].shape[0]
    per = HISTORY_S if model.config.norm.get("tokens", "step") == "step" else 1
    return loss, {"tokens": float(n * per), "samples": float(n), "mae_mbps": loss.item()}


# ----------------------------------------------------------------------------- evaluation


def evaluate(policy: Any, w: Windows, seeds: list[int] | tuple[int, ...] = (1,)) -> Metrics:
    """MAE (Mbps) of a deterministic predictor over every window and future second; per-step
    MAE in the parts, one row per trace. Every seed gets the same value (nothing is drawn)."""
    pred = np.asarray(policy.predict(w.history), dtype=np.float64)
    if pred.shape != w.future.shape:
        raise NetLLMError(f"policy {getattr(policy, 'name', policy)!r} predicts {pred.shape}, "
                          f"expected {w.future.shape}")
    if not np.isfinite(pred).all():
        raise NetLLMError(f"policy {getattr(policy, 'name', policy)!r} predicts non-finite values")
    err = np.abs(pred - w.future)  # (N, 5) Mbps
    mae = float(err.mean())
    parts = {name: float(v) for name, v in zip(STEP_PARTS, err.mean(axis=0))}
    rows = []
    for i, name in enumerate(w.names):
        sel = w.trace == i
        if sel.any():
            rows.append({"trace": name, "windows": int(sel.sum()), "mae_mbps": float(err[sel].mean()),
                         "mean_mbps": float(w.future[sel].mean())})
    return Metrics(METRIC, False, {int(s): mae for s in seeds}, parts=parts, rows=rows)


# ----------------------------------------------------------------------------- options

TRACE_HELP = ("a split of the ABR data (fcc-train, fcc-valid, fcc-test), another trace folder present "
              "under <data root>/abr/traces/, or a folder of 'time_s bandwidth_Mbps' files")


@dataclass
class BWRecipe(Recipe):
    """Every hyper-parameter of bwpred adaptation, visible in one place (the defaults fit a
    few CPU minutes per hundred steps with SmolLM2 cut to 4 layers)."""

    layers: int | None = opt(4, "Keep only the first N decoder layers.", min=1)
    rank: int = opt(16, "LoRA rank on the attention projections (0: no LoRA).", min=0)
    batch_size: int = opt(32, "Windows per optimizer step.", min=1)
    steps: int = opt(1000, "Optimizer steps.", min=1)
    lr: float = opt(3e-4, "Peak learning rate (AdamW).", min=0)
    warmup_steps: int = opt(50, "Linear warm-up steps (at most a quarter of the run).", min=0)
    schedule: str = opt("cosine", "Learning rate after warm-up.", choices=("constant", "linear", "cosine"))
    eval_every: int = opt(100, "Validate every N steps and keep the best adapter (0: keep the last).", min=0)
    tokens: str = opt("step", "step: one token per history second (the LLM attends across seconds); "
                              "window: one token for the whole 10 s (a control).", choices=TOKENS)
    train_traces: str = opt("fcc-train", f"Training traces ({TRACE_HELP}).")
    valid_every: int = opt(7, "Validation: every N-th trace of --train-traces in file-name order "
                              "(positions N, 2N, ...) is held out whole.", min=2)
    stride: int = opt(1, "Seconds between the starts of consecutive training windows.", min=1)
    valid_stride: int = opt(7, "Seconds between the starts of consecutive validation windows (prime to 5: "
                               "see --stride of eval).", min=1)


@dataclass
class BWAdaptOptions(BWRecipe):
    model: str = opt("netllm", "netllm: LoRA + series encoder + regression head on the LLM; lstm: the "
                               "LSTM baseline (uses --steps, --batch-size, --eval-every, --seed and the "
                               "trace options; not --llm/--layers/--rank/--lr).", choices=("netllm", "lstm"))
    lstm_hidden: int = opt(64, "--model lstm: hidden units of its one LSTM layer.", min=1)
    lstm_lr: float = opt(1e-3, "--model lstm: learning rate (AdamW, constant).", min=0)


@dataclass
class BWEvalOptions(Options):
    traces: str = opt("fcc-test", f"Test traces ({TRACE_HELP}).")
    stride: int = opt(3, "Seconds between the starts of consecutive test windows. The FCC traces hold "
                         "each value for 5 s, so a stride prime to 5 (1, 3, 7) meets every phase of "
                         "those blocks equally often; a multiple of 5 always cuts them at the same place.",
                      min=1)
    exclude: str = opt("", "Leave out test traces whose samples equal a trace of this set (same "
                           "choices as --traces), e.g. fcc-train: 42 of fcc-test's 100 traces are "
                           "copies of fcc-train traces. Empty: keep all.")

    def check(self) -> None:
        super().check()
        check_trace_set(self.traces)  # a missing trace set fails before the run folder is written
        if self.exclude:
            check_trace_set(self.exclude)


# ----------------------------------------------------------------------------- adaptation


def train_valid_windows(recipe: BWRecipe) -> tuple[Windows, Windows, list[str]]:
    traces = load_trace_set(recipe.train_traces)
    train, valid = split_train_valid(traces, recipe.valid_every)
    return windows(train, recipe.stride), windows(valid, recipe.valid_stride), [t.name for t in valid]


def adapt(train: Windows, valid: Windows | None, out: Path, recipe: BWRecipe, *, device: str = "auto",
          resume: bool = False, progress: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Supervised DD-LRNA for bwpred; with ``valid`` the adapter kept is the best on it."""
    seed_everything(recipe.seed)
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, tokens=recipe.tokens,
                          pretrained=recipe.pretrained, seed=recipe.seed)
    model = build_model(config, device=device)
    validate = None
    if valid is not None:
        def validate(m: NetLLM) -> float:
            return evaluate(NetLLMBWPolicy(m), valid).mean

    details = {"train_windows": len(train), "valid_windows": len(valid) if valid is not None else 0,
               **(extra or {})}
    return run_adaptation(model, batches(train, recipe.batch_size, recipe.seed), bw_loss, recipe, out,
                          steps=recipe.total_steps(len(train)), metric=METRIC, higher_is_better=False,
                          validate=validate, resume=resume, progress=progress, extra=lambda: details,
                          min_lr=recipe.lr / 10 if recipe.schedule != "constant" else 0.0)


class BWPredTask(Task):
    name = "bwpred"
    kind = "prediction"
    metric = METRIC
    higher_is_better = False
    summary = (f"throughput prediction on the ABR traces ({HISTORY_S} s of 1 s samples -> the next "
               f"{HORIZON_S} s); MAE in Mbps, lower is better.")
    Recipe = BWRecipe
    AdaptOptions = BWAdaptOptions
    EvalOptions = BWEvalOptions

    def datasets(self) -> tuple[Any, ...]:
        return ()  # the ABR traces: `netllm data fetch abr`

    def model_config(self, recipe: Recipe | None = None) -> NetLLMConfig:
        r = recipe if isinstance(recipe, BWRecipe) else BWRecipe()
        return model_config(llm=r.llm, layers=r.layers, rank=r.rank, tokens=r.tokens, pretrained=r.pretrained,
                            seed=r.seed)

    def baselines(self) -> dict[str, Callable[[Any], Any]]:
        return {name: (lambda _options, f=factory: f()) for name, factory in BASELINES.items()}

    def policy_from_run(self, folder: Path, options: Any, device: str = "auto") -> Any:
        if (folder / LSTM_CONFIG).is_file():
            return LSTMPredictor.load(folder)
        if (folder / ADAPTER_CONFIG).is_file():
            return NetLLMBWPolicy.from_adapter(folder, device=device)
        raise NetLLMError(f"--policy {folder}: holds neither a bwpred LSTM run ({LSTM_CONFIG}) nor a NetLLM "
                          f"adapter ({ADAPTER_CONFIG})")

    def evaluate(self, policies: dict[str, Any], seeds: list[int], options: BWEvalOptions,
                 out: Path) -> dict[str, Metrics]:
        from netllm.results import write_results

        traces = load_trace_set(options.traces)
        note = ""
        if options.exclude:
            traces, dropped = drop_copies(traces, load_trace_set(options.exclude))
            note = f", without {len(dropped)} copies of {options.exclude} traces"
            if not traces:
                raise NetLLMError(f"--exclude {options.exclude}: every trace of {options.traces} is a copy")
        w = windows(traces, options.stride)
        console.print(f"{options.traces}: {len(traces)} traces{note}, {len(w)} windows "
                      f"(stride {options.stride} s), mean future throughput {w.future.mean():.3f} Mbps")
        results: dict[str, Metrics] = {}
        for name, policy in policies.items():
            t0 = time.perf_counter()
            results[name] = evaluate(policy, w, seeds)
            console.print(f"{name}: MAE {results[name].mean:.4f} Mbps ({time.perf_counter() - t0:.1f} s)")
        write_results(out, results, title=f"bwpred on {options.traces}{note} ({len(traces)} traces, {len(w)} "
                                          f"windows): {HISTORY_S} s -> next {HORIZON_S} s, MAE in Mbps",
                      parts=STEP_PARTS, cdf_key=METRIC)
        return results

    def check_adapt(self, recipe: Any) -> None:
        check_trace_set(recipe.train_traces)

    def adapt(self, out: Path, recipe: BWAdaptOptions, device: str = "auto", resume: bool = False) -> Path:
        train, valid, valid_names = train_valid_windows(recipe)
        console.print(f"{recipe.train_traces}: {len(train)} training windows (stride {recipe.stride} s), "
                      f"{len(valid)} validation windows from {len(valid_names)} held-out traces "
                      f"(every {recipe.valid_every}th by name)")
        extra = {"train_traces": recipe.train_traces, "valid_traces": valid_names}
        if recipe.model == "lstm":
            train_lstm(train, valid, out, hidden=recipe.lstm_hidden, steps=recipe.total_steps(len(train)),
                       batch_size=recipe.batch_size, lr=recipe.lstm_lr, eval_every=recipe.eval_every,
                       seed=recipe.seed, log=console.print,
                       details={"recipe": asdict(recipe), "train_windows": len(train),
                                "valid_windows": len(valid), **extra})
            console.print(f"LSTM run: {out}")
            return out
        return adapt(train, valid, out, recipe, device=device, resume=resume, extra=extra)


TASK = BWPredTask()
