"""NetLLM for viewport prediction: one token per history step, all future steps in ONE pass.

Per history step ``t`` the model sees a (3 features x 3 angles) array, encoded by the
foundation's 1-D CNN over the three angles, projected and LayerNorm-ed into one token:

    feature 0: the absolute orientation / 180        (where the viewer looks)
    feature 1: offset to the last observed orientation / 30, yaw wrapped   (the trajectory)
    feature 2: step from the previous sample / 30, yaw wrapped             (the velocity)

An optional image token per step (the video frame, frozen ViT) is interleaved after it.
The regression head reads the last token's hidden state and returns all ``fw`` future
offsets to the last observed orientation (scaled by 1/30); the prediction is the last
orientation plus that offset, yaw wrapped. The head's output layer starts at zero, so an
untrained model IS the no-motion baseline and training can only move it where the data
says the viewer goes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import REGRESSION_DECODERS, HeadSpec
from netllm.model import ADAPTER_CONFIG, NetLLM, NetLLMConfig
from netllm.options import Options, opt, split_list
from netllm.recipe import (TRAIN_SEEDS_HELP, Recipe, check_same_recipe, check_train_seeds, load_policy, run_adaptation,
                           train_variants)
from netllm.results import combine_train_seeds, comparisons, print_comparisons
from netllm.tasks.base import Metrics, Task
from netllm.tasks.vp.baselines import (
    ANGLE_SCALE,
    BASELINES,
    LSTM_CONFIG,
    LSTMPredictor,
    LSTMRecipe,
    make_baseline,
    train_lstm,
)
from netllm.tasks.vp.serve import FALLBACKS as VP_FALLBACKS, VPServeOptions
from netllm.tasks.vp.dataset import (
    DATASETS,
    SPLIT_NAMES,
    Samples,
    WindowSpec,
    angular_error,
    from_relative,
    load_samples,
    load_training_samples,
    mirror_signs,
    relative,
    wrap,
)
from netllm.utils import NetLLMError, atomic_write_json, seed_everything

console = Console()

TOKEN_FEATURES = 3  # absolute, offset to last, step (see the module docstring)
SIDE_FEATURES = 2  # the head's skip path: offset to last and step (the motion, not where the viewer looks)


# ----------------------------------------------------------------------------- model


def model_config(*, llm: str = "smollm2", layers: int | None = 6, rank: int = 32, hw: int = 10, fw: int = 20,
                 pretrained: bool = True, seed: int = 0, image: Any = None,
                 lora_dropout: float = 0.05, lora_mlp: bool = False, head_skip: bool = False,
                 head_decoder: str = "mlp") -> NetLLMConfig:
    """The VP model: a viewport token (+ an optional frame token) per step, one regression head
    (``head_skip``: which also reads the observed motion, see ``motion_side``)."""
    encoders = [EncoderSpec("viewport", "series", in_dim=TOKEN_FEATURES, length=3, kernel_size=3)]
    if image is not None:
        encoders.append(EncoderSpec("frame", "image", vision=image))
    future = HeadSpec("regression", steps=fw, dims=3, side_dim=hw * SIDE_FEATURES * 3 if head_skip else 0,
                      decoder=head_decoder)
    return NetLLMConfig(
        task="vp", encoders=encoders, heads={"future": future},
        llm=llm, layers=layers,
        lora=(LoraSpec(rank=rank, alpha=2 * rank, dropout=lora_dropout, mlp=lora_mlp) if rank
              else LoraSpec(rank=0)),
        pretrained=pretrained, seed=seed, norm={"hw": hw, "fw": fw, "angle_scale": ANGLE_SCALE},
    )


def build_model(config: NetLLMConfig, device: str = "auto") -> NetLLM:
    model = NetLLM(config, device=device)
    last = model.heads["future"].output_layer
    torch.nn.init.zeros_(last.weight)  # start as the no-motion predictor
    torch.nn.init.zeros_(last.bias)
    return model


def step_features(history: np.ndarray) -> np.ndarray:
    """(N, hw, 3) degrees -> (N, hw, 3 features, 3 angles) model inputs."""
    rel, _ = relative(history)
    steps = wrap(np.diff(history, axis=1, prepend=history[:, :1]))
    return np.stack([history / 180.0, rel / ANGLE_SCALE, steps / ANGLE_SCALE], axis=2).astype(np.float32)


def embed_steps(model: NetLLM, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, 3, 3) [+ frames (B, T, C, H, W)] -> (B, T or 2T, hidden), frame after viewport."""
    tokens = model.encoders("viewport", features.to(model.device))
    if "frame" in model.encoders.specs:
        if frames is None:
            raise NetLLMError("this VP adapter has an image modality: frames are required")
        image = model.encoders("frame", frames.to(model.device))
        tokens = torch.stack([tokens, image], dim=2).flatten(1, 2)
    return tokens


def motion_side(features: torch.Tensor) -> torch.Tensor:
    """(B, hw, 3, 3) step features -> (B, hw * 2 * 3): the observed motion (offsets to the
    last orientation and steps) that a skip head reads beside the LLM's last hidden state."""
    return features[:, :, 1:1 + SIDE_FEATURES].flatten(1)


def predict_offsets(model: NetLLM, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """ONE LLM pass: (B, hw, 3, 3) -> (B, fw, 3) scaled offsets to the last orientation."""
    hidden, _ = model.hidden(embed_steps(model, features, frames))
    head = model.heads["future"]
    return head(hidden[:, -1], motion_side(features) if head.side_dim else None)


def predict_autoregressive(model: NetLLM, history: np.ndarray, fw: int) -> np.ndarray:
    """The upstream way, for the speed comparison: ``fw`` LLM calls, each appending the
    step just predicted as a new token and recomputing the whole sequence."""
    seq = np.asarray(history, dtype=np.float64)
    for _ in range(fw):
        feats = torch.as_tensor(step_features(seq))
        offsets = predict_offsets(model, feats).double().cpu().numpy()[:, :1] * ANGLE_SCALE
        seq = np.concatenate([seq, from_relative(seq, offsets)], axis=1)
    return seq[:, history.shape[1]:]


class NetLLMVPPolicy:
    """A trained adapter behind ``predict(history) -> future`` (degrees)."""

    def __init__(self, model: NetLLM, name: str = "netllm", batch_size: int = 256) -> None:
        self.model, self.name, self.batch_size = model.eval(), name, batch_size
        self.hw = int(model.config.norm["hw"])
        self.fw = int(model.config.norm["fw"])

    @classmethod
    def from_adapter(cls, folder: str | Path, device: str = "auto") -> "NetLLMVPPolicy":
        return cls(NetLLM.from_adapter(folder, task="vp", device=device, merge=True), name=Path(folder).name)

    @torch.no_grad()
    def predict(self, history: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        history = np.asarray(history, dtype=np.float64)
        if history.ndim != 3 or history.shape[1:] != (self.hw, 3):
            raise NetLLMError(f"{self.name}: expects histories of shape (N, {self.hw}, 3), got {history.shape}")
        feats = torch.as_tensor(step_features(history))
        outs = []
        for i in range(0, len(history), self.batch_size):
            fr = None if frames is None else torch.as_tensor(frames[i:i + self.batch_size])
            outs.append(predict_offsets(self.model, feats[i:i + self.batch_size], fr).double().cpu().numpy())
        return from_relative(history, np.concatenate(outs) * ANGLE_SCALE)


# ----------------------------------------------------------------------------- evaluation


def evaluate(policy: Any, samples: Samples, seeds: Sequence[int] = (0,)) -> tuple[Metrics, np.ndarray]:
    """MAE (degrees) of a deterministic predictor; returns the metrics and the per-step MAE."""
    pred = policy.predict(samples.history)
    if pred.shape != samples.future.shape:
        raise NetLLMError(f"policy {getattr(policy, 'name', policy)!r} predicts {pred.shape[1]} steps, "
                          f"the windows have fw={samples.future.shape[1]}")
    err = angular_error(pred, samples.future)  # (N, fw, 3)
    mae = float(err.mean())
    rows = []
    keys = np.stack([samples.video, samples.user], axis=1)
    for v, u in np.unique(keys, axis=0):
        sel = (samples.video == v) & (samples.user == u)
        rows.append({"video": int(v), "user": int(u), "samples": int(sel.sum()), "mae_deg": float(err[sel].mean())})
    parts = {f"{a}_deg": float(err[..., i].mean()) for i, a in enumerate(("roll", "pitch", "yaw"))}
    metrics = Metrics("mae_deg", False, {int(s): mae for s in seeds}, parts=parts, rows=rows)
    return metrics, err.mean(axis=(0, 2))


def write_vp_results(out: Path, results: dict[str, Metrics], horizons: dict[str, np.ndarray], title: str,
                     skipped: Sequence[Any] = ()) -> None:
    """The shared table / results.json / rows.csv, plus a box plot and an MAE-vs-horizon plot."""
    from netllm.results import write_results

    write_results(out, results, title=title, parts=("roll_deg", "pitch_deg", "yaw_deg"), skipped=skipped)
    atomic_write_json(out / "horizon.json", {n: [float(x) for x in h] for n, h in horizons.items()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netllm.results import save_figure

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(results), 4))
    ax.boxplot([[r["mae_deg"] for r in m.rows] for m in results.values()], showfliers=False)
    ax.set_xticks(range(1, len(results) + 1), list(results), rotation=20, ha="right")
    ax.set_ylabel("MAE per (video, user) [deg]")
    ax.set_title(title, fontsize=9)
    save_figure(fig, out / "box.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in horizons.items():
        ax.plot(np.arange(1, len(h) + 1) / 5.0, h, label=name, marker=".")
    ax.set_xlabel("prediction horizon [s]")
    ax.set_ylabel("MAE [deg]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out / "horizon.png")
    console.print(f"written in {out}: box.png, horizon.png, horizon.json")


# ----------------------------------------------------------------------------- options


VALID_STRIDE = 4  # the adapter kept is the best on every 4th window of the valid split
TRAIN_DATASETS = (*DATASETS, "both")
AUGMENTATIONS = ("mirror", "yaw-offset")
HW_HELP = "History window: observed samples per prediction (5 Hz)."
FW_HELP = "Future window: samples predicted (5 Hz); 20 = 4 s."
STEP_HELP = "Windows are cut every N samples of a trace."


@dataclass
class VPRecipe(Recipe):
    """Every hyper-parameter of supervised VP adaptation, visible in one place; ``netllm
    adapt vp`` and ``netllm bench vp`` share these defaults. The recipe chosen on the
    validation splits (docs/results/vp.md, "Levers" and "Levers, round 2"): SmolLM2 cut to 6
    layers, LoRA r = 32 (alpha 64) on the attention and the MLP projections, trained on the
    train splits of Jin2022 and Wu2017 together with windows cut every 5 samples, half of
    every batch mirrored (yaw and roll negated), batch 64 (ahead of 32 on both valid splits
    for all three training seeds: "Levers, round 5"), lr 5e-4 with cosine decay to lr/10,
    2,000 steps, the adapter best on a quarter of both valid splits (checked every 100
    steps). ``--epochs`` replaces ``--steps`` when given."""

    layers: int | None = opt(6, "Keep only the first N decoder layers.", min=1)
    rank: int = opt(32, "LoRA rank (attention and, with --lora-mlp, MLP projections), alpha = 2 x rank "
                        "(0: no LoRA).", min=0)
    batch_size: int = opt(64, "Windows per optimizer step.", min=1)
    steps: int = opt(2000, "Optimizer steps (unless --epochs is given).", min=1)
    epochs: float | None = opt(None, "Passes over the training windows; replaces --steps when given.", min=0)
    lr: float = opt(5e-4, "Peak learning rate (AdamW).", min=0)
    warmup_steps: int = opt(50, "Linear warm-up steps (at most a quarter of the run).", min=0)
    schedule: str = opt("cosine", "Learning rate after warm-up (linear and cosine decay to lr/10).",
                        choices=("constant", "linear", "cosine"))
    eval_every: int = opt(100, "Validate every N steps on a quarter of the valid split and keep the best "
                               "adapter (0: keep the last).", min=0)
    dataset: str = opt("both", "Training data: its train split trains, its valid split picks the adapter "
                                  "(both: the train and valid splits of Jin2022 and Wu2017 together).",
                       choices=TRAIN_DATASETS)
    hw: int = opt(10, HW_HELP, min=1)
    fw: int = opt(20, FW_HELP, min=1)
    step: int = opt(5, STEP_HELP + " Training windows only: bench tests on the evaluation's (every 15).", min=1)
    augment: str = opt("mirror", "Training augmentation, comma-separated: mirror (negate yaw and roll of half "
                               "the windows: the mirror image of a head motion is one too), yaw-offset (turn "
                               "the absolute yaw of every window by a random angle), none.")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA path.", min=0, max=0.9)
    lora_mlp: bool = opt(True, "Also adapt the MLP projections (gate, up, down) with LoRA, not only attention "
                               "(chosen on the valid splits).")
    valid_stride: int = opt(VALID_STRIDE, "Validate on every N-th window of the valid split (1: all).", min=1)
    head_skip: bool = opt(False, "The head also reads the observed motion of the history (offsets and steps) "
                                 "beside the LLM's last hidden state: a skip path past the LLM.")
    head_decoder: str = opt("mlp", "How the head decodes the 20 future offsets from the last hidden state: mlp "
                                   "(all at once), recurrent (a small LSTM cell unrolled step by step, each step "
                                   "added to the last, as the LSTM baseline decodes; still one LLM pass).",
                            choices=REGRESSION_DECODERS)

    def check(self) -> None:
        super().check()
        if self.epochs is not None and self.epochs <= 0:
            raise NetLLMError(f"--epochs: must be > 0, got {self.epochs!r}")
        self.window()
        self.augmentations()

    def augmentations(self) -> tuple[str, ...]:
        names = split_list(self.augment, "--augment", [*AUGMENTATIONS, "none"])
        if "none" in names and len(names) > 1:
            raise NetLLMError(f"--augment: 'none' cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return tuple(n for n in names if n != "none")

    def window(self) -> WindowSpec:
        return WindowSpec(hw=self.hw, fw=self.fw, step=self.step)

def recipe_of(options: VPRecipe) -> VPRecipe:
    """The plain recipe of adapt / bench options (their own fields dropped)."""
    return VPRecipe(**{f.name: getattr(options, f.name) for f in dataclasses.fields(VPRecipe)})


# the recipe fields the LSTM baseline uses too (the others are the NetLLM adapter's)
LSTM_SHARED = ("dataset", "hw", "fw", "step", "seed", "augment", "valid_stride")


@dataclass
class VPAdaptOptions(VPRecipe):
    """``netllm adapt vp``: the recipe, or (``--model lstm``) the LSTM baseline with its
    own recipe (LSTMRecipe's defaults: 1 layer of 128, 20 epochs, batch 64, lr 1e-3)."""

    model: str = opt("netllm", "netllm: adapt the LLM; lstm: train the LSTM baseline (the --lstm-* options).",
                     choices=("netllm", "lstm"))
    lstm_hidden: int = opt(LSTMRecipe.hidden, "LSTM baseline: hidden size.", min=1)
    lstm_layers: int = opt(LSTMRecipe.layers, "LSTM baseline: layers of encoder and decoder.", min=1)
    lstm_epochs: int = opt(LSTMRecipe.epochs, "LSTM baseline: epochs (the best on the valid split is kept).",
                           min=1)
    lstm_batch_size: int = opt(LSTMRecipe.batch_size, "LSTM baseline: windows per step.", min=1)
    lstm_lr: float = opt(LSTMRecipe.lr, "LSTM baseline: learning rate (Adam).", min=0)

    def check(self) -> None:
        super().check()
        if self.lstm_lr <= 0:
            raise NetLLMError(f"--lstm-lr: must be > 0, got {self.lstm_lr!r}")
        # an option of the other model would be silently ignored: say so instead
        defaults = VPAdaptOptions()
        lstm_only = [f.name for f in dataclasses.fields(self) if f.name.startswith("lstm_")]
        netllm_only = [f.name for f in dataclasses.fields(VPRecipe) if f.name not in LSTM_SHARED]
        for name in (netllm_only if self.model == "lstm" else lstm_only):
            if getattr(self, name) != getattr(defaults, name):
                option = "--" + name.replace("_", "-")
                if self.model == "lstm":
                    raise NetLLMError(f"{option}: an option of the NetLLM adapter; --model lstm takes "
                                      "--lstm-hidden/--lstm-layers/--lstm-epochs/--lstm-batch-size/--lstm-lr")
                raise NetLLMError(f"{option}: an option of --model lstm")

    def lstm_recipe(self) -> LSTMRecipe:
        return LSTMRecipe(hidden=self.lstm_hidden, layers=self.lstm_layers, epochs=self.lstm_epochs,
                          batch_size=self.lstm_batch_size, lr=self.lstm_lr, seed=self.seed, hw=self.hw, fw=self.fw,
                          augment=self.augment)


@dataclass
class VPEvalOptions(Options):
    dataset: str = opt("Jin2022", "Data set whose split is evaluated.", choices=DATASETS)
    split: str = opt("test", "Split (a test window: an unseen user on an unseen video).", choices=SPLIT_NAMES)
    hw: int = opt(10, HW_HELP, min=1)
    fw: int = opt(20, FW_HELP, min=1)
    step: int = opt(15, STEP_HELP, min=1)
    strict: bool = opt(False, "A bad data file (time going backwards, too short, an unreadable row) is an "
                              "error, instead of being skipped with a warning and listed in results.json.")

    def check(self) -> None:
        super().check()
        self.window()

    def window(self) -> WindowSpec:
        return WindowSpec(hw=self.hw, fw=self.fw, step=self.step)


CONTROLS = ("random",)
BENCH_BASELINES = ("no-motion", "velocity", "lr")


@dataclass
class VPBenchOptions(VPRecipe):
    """The whole pipeline; the recipe fields are the adaptation's (same defaults as adapt)."""

    train_seeds: str = opt("0", TRAIN_SEEDS_HELP + " The LSTM is trained once per seed too.")
    controls: str = opt("random", "Controls trained beside NetLLM: random (the same recipe on random LLM "
                                  "weights), none.")

    def check(self) -> None:
        super().check()
        check_train_seeds(self)
        split_list(self.controls, "--controls", [*CONTROLS, "none"])


# ----------------------------------------------------------------------------- adaptation


def batches(samples: Samples, batch_size: int, seed: int,
            augment: Sequence[str] = ()) -> Callable[[int], dict[str, torch.Tensor]]:
    """Deterministic ``get_batch(i)``: epoch ``e`` visits a permutation seeded by ``seed + e``;
    ``augment`` (see ``--augment``) transforms batch ``i`` by a stream seeded by ``(seed, i)``."""
    feats = torch.as_tensor(step_features(samples.history))
    _, rel_future = relative(samples.history, samples.future)
    target = torch.as_tensor(rel_future / ANGLE_SCALE, dtype=torch.float32)
    per_epoch = max(1, len(samples) // batch_size)
    unknown = set(augment) - set(AUGMENTATIONS)
    if unknown:
        raise NetLLMError(f"--augment: unknown {sorted(unknown)[0]!r}; choose from {', '.join(AUGMENTATIONS)}")

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, per_epoch)
        perm = np.random.default_rng(seed + epoch).permutation(len(samples))
        idx = torch.as_tensor(perm[j * batch_size:(j + 1) * batch_size])
        x, y = feats[idx], target[idx]
        if augment:
            rng = np.random.default_rng([seed, i, 7])
            if "mirror" in augment:
                signs = torch.as_tensor(mirror_signs(rng.random(len(idx)) < 0.5))
                x, y = x * signs[:, None, None, :], y * signs[:, None, :]
            if "yaw-offset" in augment:  # only the absolute feature knows where the viewer looks
                x = x.clone()
                turned = x[:, :, 0, 2].double() * 180.0 + torch.as_tensor(rng.uniform(-180, 180, len(idx)))[:, None]
                x[:, :, 0, 2] = (torch.as_tensor(wrap(turned.numpy())) / 180.0).float()
        return {"features": x, "target": y}

    return get_batch


def vp_loss(model: NetLLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on the scaled offsets: the metric is a mean absolute error."""
    pred = predict_offsets(model, batch["features"])
    loss = (pred - batch["target"].to(pred.device)).abs().mean()
    n, hw = batch["features"].shape[:2]
    return loss, {"tokens": float(n * hw), "samples": float(n), "mae_deg": loss.item() * ANGLE_SCALE}


def adapt(train_samples: Samples, out: Path, recipe: VPRecipe, *, valid: Samples | None = None,
          device: str = "auto", resume: bool = False, progress: bool = True) -> Path:
    """Supervised DD-LRNA for VP; returns the adapter folder. With ``valid``, the adapter
    kept is the one with the lowest MAE on it (``extra.best.mae`` of its config)."""
    seed_everything(recipe.seed)
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, hw=recipe.hw, fw=recipe.fw,
                          pretrained=recipe.pretrained, seed=recipe.seed, lora_dropout=recipe.lora_dropout,
                          lora_mlp=recipe.lora_mlp, head_skip=recipe.head_skip,
                          head_decoder=recipe.head_decoder)
    model = build_model(config, device=device)
    validate = None
    if valid is not None:
        def validate(m: NetLLM) -> float:
            return evaluate(NetLLMVPPolicy(m), valid)[0].mean

    get_batch = batches(train_samples, recipe.batch_size, recipe.seed, recipe.augmentations())
    return run_adaptation(model, get_batch, vp_loss, recipe, out,
                          steps=recipe.total_steps(len(train_samples)), metric="mae", higher_is_better=False,
                          validate=validate, resume=resume, progress=progress, min_lr=recipe.lr / 10,
                          extra=lambda: {"train_samples": len(train_samples)})


# ----------------------------------------------------------------------------- the task


class VPTask(Task):
    name = "vp"
    kind = "prediction"
    metric = "mae_deg"
    higher_is_better = False
    summary = "viewport prediction for 360° video (Jin2022, Wu2017 head motion); MAE in degrees, lower is better."
    data_module = "netllm.tasks.vp.datasets"
    Recipe = VPRecipe
    AdaptOptions = VPAdaptOptions
    EvalOptions = VPEvalOptions
    BenchOptions = VPBenchOptions
    ServeOptions = VPServeOptions
    fallbacks = VP_FALLBACKS

    def service(self, ctx: Any, options: VPServeOptions, fallback: str) -> Any:
        from netllm.tasks.vp.serve import VPService

        return VPService(ctx, options, fallback)

    def model_config(self, recipe: Recipe | None = None) -> NetLLMConfig:
        r = recipe if isinstance(recipe, VPRecipe) else VPRecipe()
        return model_config(llm=r.llm, layers=r.layers, rank=r.rank, hw=r.hw, fw=r.fw, pretrained=r.pretrained,
                            seed=r.seed, lora_dropout=r.lora_dropout, lora_mlp=r.lora_mlp, head_skip=r.head_skip,
                            head_decoder=r.head_decoder)

    def baselines(self) -> dict[str, Callable[[VPEvalOptions], Any]]:
        return {name: (lambda options, n=name: make_baseline(n, options.fw)) for name in BASELINES}

    def policy_from_run(self, folder: Path, options: VPEvalOptions, device: str = "auto") -> Any:
        """An LSTM run (``netllm adapt vp --model lstm``) or a NetLLM adapter, trained for
        the window of ``options``."""
        policy: LSTMPredictor | NetLLMVPPolicy
        if (folder / LSTM_CONFIG).is_file():
            policy = LSTMPredictor.load(folder)
        elif (folder / ADAPTER_CONFIG).is_file():
            policy = NetLLMVPPolicy.from_adapter(folder, device=device)
        else:
            raise NetLLMError(f"--policy {folder}: holds neither a VP LSTM run ({LSTM_CONFIG}) nor a NetLLM "
                              f"adapter ({ADAPTER_CONFIG})")
        _check_window(policy, options.window(), str(folder))
        return policy

    def check_adapt(self, recipe: VPAdaptOptions) -> None:
        from netllm.data import dataset_path

        for dataset in DATASETS if recipe.dataset == "both" else (recipe.dataset,):
            dataset_path("vp", "viewports", dataset)  # no data: one line, before the run folder

    def check_eval(self, options: VPEvalOptions) -> None:
        from netllm.data import dataset_path

        dataset_path("vp", "viewports", options.dataset)

    def evaluate(self, policies: dict[str, Any], seeds: list[int], options: VPEvalOptions,
                 out: Path) -> dict[str, Metrics]:
        spec = options.window()
        samples = load_samples(options.dataset, options.split, spec, strict=options.strict)
        for label, policy in policies.items():
            _check_window(policy, spec, label)
        results: dict[str, Metrics] = {}
        horizons: dict[str, np.ndarray] = {}
        for label, policy in policies.items():
            t0 = time.perf_counter()
            results[label], horizons[label] = evaluate(policy, samples, seeds)
            console.print(f"{label}: {time.perf_counter() - t0:.1f} s")
        write_vp_results(out, results, horizons, title=f"VP on {options.dataset}/{options.split} "
                                                       f"({len(samples)} windows, hw={spec.hw}, fw={spec.fw})",
                         skipped=samples.skipped)
        return results

    def adapt(self, out: Path, recipe: VPAdaptOptions, device: str = "auto", resume: bool = False) -> Path:
        """The NetLLM adapter of the recipe, or (``--model lstm``) the LSTM baseline's run."""
        spec = recipe.window()
        train_samples = load_training_samples(recipe.dataset, "train", spec)
        valid = load_training_samples(recipe.dataset, "valid", spec).subset(slice(0, None, recipe.valid_stride))
        if recipe.model == "lstm":
            train_lstm(train_samples, valid, recipe.lstm_recipe(), out, log=console.print)
            console.print(f"LSTM run: {out}")
            return out
        return adapt(train_samples, out, recipe_of(recipe), valid=valid,
                     device=device, resume=resume)

    # -- benchmark ---------------------------------------------------------------------------

    def bench(self, options: VPBenchOptions, out: Path, device: str = "auto") -> dict[str, Any]:
        """Train NetLLM (+ controls) and the LSTM on ``--dataset`` (Jin2022), one run per
        training seed; test on the Jin2022 and Wu2017 test splits.

        Finished stages are reused when the benchmark is run again with the same --out.
        """
        from netllm.utils import parse_seeds

        train_seeds = parse_seeds(options.train_seeds, "--train-seeds")
        recipe = recipe_of(options)
        spec = recipe.window()
        train_samples = load_training_samples(recipe.dataset, "train", spec)
        valid = load_training_samples(recipe.dataset, "valid", spec).subset(slice(0, None, recipe.valid_stride))
        summary: dict[str, Any] = {"wall_s": {}, "train_samples": len(train_samples), "train_seeds": train_seeds,
                                   "recipe": dataclasses.asdict(recipe)}
        label = f"netllm-{Path(recipe.llm).name}"
        variants = {label: recipe}
        if "random" in split_list(options.controls, "--controls"):
            variants[f"{label}-random-init"] = dataclasses.replace(recipe, pretrained=False)
        runs: dict[str, dict[int, Path]] = {"lstm": {}}
        runs.update(train_variants(
            variants, train_seeds, out, len(train_samples), summary["wall_s"],
            train=lambda r, folder: adapt(train_samples, folder, r, valid=valid, device=device, resume=True)))
        for s in train_seeds:
            folder = runs["lstm"][s] = out / f"lstm-seed{s}"
            lstm_recipe = LSTMRecipe(seed=s, hw=spec.hw, fw=spec.fw, augment=recipe.augment)
            check_same_recipe(folder, lstm_recipe, LSTM_CONFIG)
            if not (folder / LSTM_CONFIG).is_file():
                t0 = time.perf_counter()
                train_lstm(train_samples, valid, lstm_recipe, folder, log=lambda *_: None)
                summary["wall_s"][f"train {folder.name}"] = time.perf_counter() - t0
        for dataset in DATASETS:
            # the evaluation's windows (every VPEvalOptions.step samples), whatever --step trains on
            test_options = VPEvalOptions(dataset=dataset, split="test", hw=spec.hw, fw=spec.fw)
            test = load_samples(dataset, "test", test_options.window())
            results: dict[str, Metrics] = {}
            horizons: dict[str, np.ndarray] = {}
            for b in BENCH_BASELINES:
                results[b], horizons[b] = evaluate(load_policy(self, b, test_options, device), test)
            for group, folders in runs.items():
                per_train: dict[int, Metrics] = {}
                curves = []
                for s, folder in folders.items():
                    t0 = time.perf_counter()
                    per_train[s], h = evaluate(load_policy(self, str(folder), test_options, device), test, [s])
                    summary["wall_s"][f"eval {folder.name} {dataset}"] = time.perf_counter() - t0
                    curves.append(h)
                results[group] = combine_train_seeds(per_train)
                horizons[group] = np.mean(curves, axis=0)
            title = (f"VP: trained on {recipe.dataset}, tested on {dataset}/test ({len(test)} windows), "
                     f"training seeds {options.train_seeds}")
            write_vp_results(out / dataset, results, horizons, title=title)
            best = min((n for n in results if n != label and n not in variants), key=lambda n: results[n].mean)
            comps = comparisons(results, label, list(dict.fromkeys([best, "lstm", "no-motion", *variants])),
                                trained=[*runs])
            print_comparisons(f"{dataset}/test: {label} minus ... (MAE in degrees, negative = NetLLM better); "
                              f"best baseline: {best}", comps)
            summary[dataset] = {n: m.summary() for n, m in results.items()}
            summary[dataset]["best_baseline"] = best
            summary[dataset]["comparisons"] = comps
        summary["speed"] = speed_report(runs[label][train_seeds[0]], device=device)
        atomic_write_json(out / "bench.json", summary)
        console.print(f"written: {out / 'bench.json'}")
        return summary


def _check_window(policy: Any, spec: WindowSpec, name: str) -> None:
    """A policy trained for another window (NetLLM: hw and fw; LSTM: fw) names both."""
    hw, fw = getattr(policy, "hw", spec.hw), getattr(policy, "fw", spec.fw)
    if (hw, fw) != (spec.hw, spec.fw):
        raise NetLLMError(f"--policy {name}: trained for hw={hw}, fw={fw}; the evaluation uses hw={spec.hw}, "
                          f"fw={spec.fw} (pass --hw/--fw to match)")


def speed_report(adapter: Path, device: str = "auto", batch: int = 64, repeats: int = 3) -> dict[str, float]:
    """Predictions/s of the one-pass head vs the upstream autoregressive loop, same model and batch."""
    policy = NetLLMVPPolicy.from_adapter(adapter, device=device)
    history = load_samples("Jin2022", "test", WindowSpec(hw=policy.hw, fw=policy.fw)).history[:batch]
    with torch.no_grad():
        policy.predict(history)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            policy.predict(history)
        one_pass = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        predict_autoregressive(policy.model, history, policy.fw)
        loop = time.perf_counter() - t0
    report = {"batch": batch, "one_pass_predictions_per_s": batch / one_pass,
              "autoregressive_predictions_per_s": batch / loop, "speedup": loop / one_pass}
    console.print(f"VP speed (batch {batch}): one pass {report['one_pass_predictions_per_s']:.1f} pred/s, "
                  f"autoregressive loop of {policy.fw} LLM calls {report['autoregressive_predictions_per_s']:.1f} "
                  f"pred/s ({report['speedup']:.1f}x)")
    return report


TASK = VPTask()
