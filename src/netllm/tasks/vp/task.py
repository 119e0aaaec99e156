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

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console

from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import ADAPTER_CONFIG, BestAdapter, NetLLM, NetLLMConfig
from netllm.backbone import LoraSpec
from netllm.tasks.base import Metrics, Task
from netllm.train import completed_steps
from netllm.tasks.vp.baselines import (
    ANGLE_SCALE,
    BASELINES,
    LSTM_CONFIG,
    LSTMPredictor,
    LSTMRecipe,
    make_baseline,
    train_lstm,
)
from netllm.tasks.vp.dataset import (
    Samples,
    WindowSpec,
    angular_error,
    from_relative,
    load_samples,
    relative,
    wrap,
)
from netllm.utils import NetLLMError, atomic_write_json, prepare_run_dir, seed_everything

console = Console()

TOKEN_FEATURES = 3  # absolute, offset to last, step (see the module docstring)


# ----------------------------------------------------------------------------- model


def model_config(*, llm: str = "smollm2", layers: int | None = 6, rank: int = 32, hw: int = 10, fw: int = 20,
                 pretrained: bool = True, seed: int = 0, image: Any = None) -> NetLLMConfig:
    """The VP model: a viewport token (+ an optional frame token) per step, one regression head."""
    encoders = [EncoderSpec("viewport", "series", in_dim=TOKEN_FEATURES, length=3, kernel_size=3)]
    if image is not None:
        encoders.append(EncoderSpec("frame", "image", vision=image))
    return NetLLMConfig(
        task="vp", encoders=encoders, heads={"future": HeadSpec("regression", steps=fw, dims=3)},
        llm=llm, layers=layers, lora=LoraSpec(rank=rank, alpha=2 * rank) if rank else LoraSpec(rank=0),
        pretrained=pretrained, seed=seed, norm={"hw": hw, "fw": fw, "angle_scale": ANGLE_SCALE},
    )


def build_model(config: NetLLMConfig, device: str = "auto") -> NetLLM:
    model = NetLLM(config, device=device)
    last = model.heads["future"].mlp[-1]
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


def predict_offsets(model: NetLLM, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """ONE LLM pass: (B, hw, 3, 3) -> (B, fw, 3) scaled offsets to the last orientation."""
    hidden, _ = model.hidden(embed_steps(model, features, frames))
    return model.heads["future"](hidden[:, -1])


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
        return cls(NetLLM.from_adapter(folder, task="vp", device=device), name=Path(folder).name)

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


def make_policy(name: str, fw: int = 20, device: str = "auto") -> Any:
    """A baseline name, an LSTM run folder or a NetLLM adapter folder."""
    path = Path(name)
    if path.is_dir():
        if (path / LSTM_CONFIG).is_file():
            return LSTMPredictor.load(path)
        if (path / ADAPTER_CONFIG).is_file():
            return NetLLMVPPolicy.from_adapter(path, device=device)
        raise NetLLMError(f"--policy {name}: folder holds neither a VP LSTM run nor a NetLLM adapter")
    if name not in BASELINES and ("/" in name or name.startswith(".")):
        raise NetLLMError(f"--policy {name}: no such run folder")
    return make_baseline(name, fw)


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


def write_vp_results(out: Path, results: dict[str, Metrics], horizons: dict[str, np.ndarray], title: str) -> None:
    """The shared table / results.json / rows.csv, plus a box plot and an MAE-vs-horizon plot."""
    from netllm.results import write_results

    write_results(out, results, title=title, parts=("roll_deg", "pitch_deg", "yaw_deg"))
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


# ----------------------------------------------------------------------------- adaptation


@dataclass
class AdaptRecipe:
    """Every hyper-parameter of supervised VP adaptation, visible in one place."""

    llm: str = "smollm2"
    layers: int | None = 6
    rank: int = 32
    hw: int = 10
    fw: int = 20
    batch_size: int = 32
    epochs: float = 2.0
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_every: int = 100
    pretrained: bool = True
    seed: int = 0

    def steps(self, num_samples: int) -> int:
        return max(1, math.ceil(self.epochs * num_samples / self.batch_size))


def batches(samples: Samples, batch_size: int, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """Deterministic ``get_batch(i)``: epoch ``e`` visits a permutation seeded by ``seed + e``."""
    feats = torch.as_tensor(step_features(samples.history))
    _, rel_future = relative(samples.history, samples.future)
    target = torch.as_tensor(rel_future / ANGLE_SCALE, dtype=torch.float32)
    per_epoch = max(1, len(samples) // batch_size)

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, per_epoch)
        perm = np.random.default_rng(seed + epoch).permutation(len(samples))
        idx = torch.as_tensor(perm[j * batch_size:(j + 1) * batch_size])
        return {"features": feats[idx], "target": target[idx]}

    return get_batch


def vp_loss(model: NetLLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on the scaled offsets: the metric is a mean absolute error."""
    pred = predict_offsets(model, batch["features"])
    loss = (pred - batch["target"].to(pred.device)).abs().mean()
    n, hw = batch["features"].shape[:2]
    return loss, {"tokens": float(n * hw), "samples": float(n), "mae_deg": loss.item() * ANGLE_SCALE}


def adapt(train_samples: Samples, out: Path, recipe: AdaptRecipe, *, valid: Samples | None = None,
          device: str = "auto", resume: bool = False, progress: bool = True) -> Path:
    """Supervised DD-LRNA for VP. With ``valid``, the adapter kept is the best on it."""
    from netllm.train import TrainConfig, train

    seed_everything(recipe.seed)
    config = model_config(llm=recipe.llm, layers=recipe.layers, rank=recipe.rank, hw=recipe.hw, fw=recipe.fw,
                          pretrained=recipe.pretrained, seed=recipe.seed)
    model = build_model(config, device=device)
    steps = recipe.steps(len(train_samples))
    t0 = time.perf_counter()
    keeper = BestAdapter(out, "mae", higher_is_better=False, extra=lambda: {
        "recipe": asdict(recipe), "train_samples": len(train_samples), "train_seconds": time.perf_counter() - t0})

    eval_fn = None
    if valid is not None:
        def eval_fn(m: Any, step: int) -> dict[str, float]:
            mae = float(evaluate(NetLLMVPPolicy(m), valid)[0].mean)
            keeper.update(m, mae, step)
            return {"valid_mae_deg": mae}

    train_config = TrainConfig(steps=steps, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, steps // 4),
                               weight_decay=recipe.weight_decay, eval_every=recipe.eval_every if valid else 0,
                               checkpoint_every=max(steps // 10, 50), log_every=10, seed=recipe.seed,
                               progress=progress, schedule="cosine", min_lr=recipe.lr / 10)
    train(model, batches(train_samples, recipe.batch_size, recipe.seed), vp_loss, train_config, out / "train",
          eval_fn=eval_fn, resume=resume)
    return keeper.finish(model)


# ----------------------------------------------------------------------------- the task


class VPTask(Task):
    name = "vp"
    kind = "prediction"
    metric = "mae_deg"
    higher_is_better = False

    def model_config(self) -> NetLLMConfig:
        return model_config()

    def baselines(self) -> dict[str, Callable[..., Any]]:
        return {name: (lambda n=name: make_baseline(n)) for name in BASELINES}

    def evaluate(self, policy: Any, seeds: list[int], dataset: str = "Jin2022", split: str = "test",
                 **_: Any) -> Metrics:
        return evaluate(policy, load_samples(dataset, split), seeds)[0]

    # -- CLI -----------------------------------------------------------------------------

    def eval_cli(self, policies: list[str], seeds: list[int], out: Path, device: str = "auto",
                 dataset: str = "Jin2022", split: str = "test", hw: int | str = 10, fw: int | str = 20,
                 step: int | str = 15) -> dict[str, Metrics]:
        spec = _window_spec(hw, fw, step)
        samples = load_samples(dataset, split, spec)
        made = [make_policy(p, spec.fw, device=device) for p in policies]  # fail fast on a bad name
        prepare_run_dir(out, {"command": "eval vp", "policies": policies, "dataset": dataset, "split": split,
                              "window": spec.to_dict()})
        results: dict[str, Metrics] = {}
        horizons: dict[str, np.ndarray] = {}
        for name, policy in zip(policies, made):
            label = getattr(policy, "name", name) if Path(name).is_dir() else name
            _check_window(policy, spec, name)
            t0 = time.perf_counter()
            results[label], horizons[label] = evaluate(policy, samples, seeds)
            console.print(f"{label}: {time.perf_counter() - t0:.1f} s")
        write_vp_results(out, results, horizons,
                         title=f"VP on {dataset}/{split} ({len(samples)} windows, hw={spec.hw}, fw={spec.fw})")
        return results

    def adapt(self, pool: list[Path], out: Path, llm: str, device: str, layers: int | None, rank: int,
              steps: int | None, epochs: float | None, context: int, seeds: list[int], resume: bool,
              pretrained: bool, model: str = "netllm", dataset: str = "Jin2022", batch_size: int | str | None = None,
              lr: float | str | None = None, hw: int | str = 10, fw: int | str = 20, step: int | str = 15) -> Path:
        if pool:
            raise NetLLMError("--pool: VP adaptation is supervised on the data set; it takes no experience pool")
        spec = _window_spec(hw, fw, step)
        train_samples = load_samples(dataset, "train", spec)
        valid = load_samples(dataset, "valid", spec)
        if model == "lstm":
            recipe = LSTMRecipe(hw=spec.hw, fw=spec.fw, seed=seeds[0])  # its own defaults unless given
            if lr is not None:
                recipe.lr = float(lr)
            if batch_size is not None:
                recipe.batch_size = int(batch_size)
            if epochs is not None:
                recipe.epochs = int(epochs)
            prepare_run_dir(out, {"command": "adapt vp --model lstm", "dataset": dataset, **asdict(recipe)})
            train_lstm(train_samples, valid, recipe, out, log=console.print)
            console.print(f"LSTM run: {out}")
            return out
        if model != "netllm":
            raise NetLLMError(f"--model: must be netllm or lstm, got {model!r}")
        recipe = AdaptRecipe(llm=llm, layers=layers if layers is not None else 6, rank=rank, hw=spec.hw,
                             fw=spec.fw, pretrained=pretrained, seed=seeds[0])
        if lr is not None:
            recipe.lr = float(lr)
        if batch_size is not None:
            recipe.batch_size = int(batch_size)
        if epochs is not None:
            recipe.epochs = float(epochs)
        elif steps is not None:
            recipe.epochs = steps * recipe.batch_size / len(train_samples)
        prepare_run_dir(out, {"command": "adapt vp", "dataset": dataset, **asdict(recipe)})
        adapter = adapt(train_samples, out, recipe, valid=valid.subset(slice(0, None, 4)), device=device,
                        resume=resume)
        console.print(f"adapter: {adapter}")
        return adapter

    # -- benchmark ---------------------------------------------------------------------------

    def bench(self, out: Path, llm: str = "smollm2", device: str = "auto", layers: int | str = 6,
              epochs: float | str = 1.0, rank: int | str = 32, seeds: str = "0", controls: str = "random",
              batch_size: int | str = 32) -> dict[str, Any]:
        """Train NetLLM (+ controls) and the LSTM on Jin2022, test on Jin2022 and Wu2017 test splits.

        Finished stages are reused when the benchmark is run again with the same --out.
        """
        from netllm.utils import parse_seeds

        layers, rank, epochs, batch = int(layers), int(rank), float(epochs), int(batch_size)
        train_seeds = parse_seeds(seeds)
        prepare_run_dir(out, {"command": "bench vp", "llm": llm, "layers": layers, "epochs": epochs, "rank": rank,
                              "seeds": train_seeds, "controls": controls})
        spec = WindowSpec()
        train_samples = load_samples("Jin2022", "train", spec)
        valid = load_samples("Jin2022", "valid", spec).subset(slice(0, None, 4))
        summary: dict[str, Any] = {"wall_s": {}, "train_samples": len(train_samples)}
        runs: dict[str, list[Path]] = {}
        variants = {f"netllm-{Path(llm).name}": True}
        if "random" in controls:
            variants[f"netllm-{Path(llm).name}-random-init"] = False
        for label, pretrained in variants.items():
            for s in train_seeds:
                folder = out / f"{label}-seed{s}"
                runs.setdefault(label, []).append(folder)
                recipe = AdaptRecipe(llm=llm, layers=layers, rank=rank, epochs=epochs, batch_size=batch,
                                     pretrained=pretrained, seed=s)
                if (folder / ADAPTER_CONFIG).is_file() and completed_steps(folder / "train") >= recipe.steps(
                        len(train_samples)):
                    continue
                t0 = time.perf_counter()
                adapt(train_samples, folder, recipe, valid=valid, device=device, resume=True)
                summary["wall_s"][f"adapt {folder.name}"] = time.perf_counter() - t0
        lstm_dirs = []
        for s in train_seeds:
            folder = out / f"lstm-seed{s}"
            lstm_dirs.append(folder)
            if not (folder / LSTM_CONFIG).is_file():
                t0 = time.perf_counter()
                train_lstm(train_samples, valid, LSTMRecipe(seed=s), folder, log=lambda *_: None)
                summary["wall_s"][f"train {folder.name}"] = time.perf_counter() - t0
        for dataset in ("Jin2022", "Wu2017"):
            test = load_samples(dataset, "test", spec)
            results: dict[str, Metrics] = {}
            horizons: dict[str, np.ndarray] = {}
            for b in ("no-motion", "velocity", "lr"):
                results[b], horizons[b] = evaluate(make_baseline(b), test)
            groups = {"lstm": lstm_dirs, **runs}
            for label, folders in groups.items():
                per_seed, rows_first, h_sum, parts_sum = {}, None, 0.0, {}
                for s, folder in zip(train_seeds, folders):
                    t0 = time.perf_counter()
                    m, h = evaluate(make_policy(str(folder), device=device), test, [s])
                    summary["wall_s"][f"eval {folder.name} {dataset}"] = time.perf_counter() - t0
                    per_seed[s] = m.per_seed[s]
                    rows_first = rows_first or m.rows
                    h_sum = h_sum + h / len(folders)
                    for k, v in m.parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / len(folders)
                results[label] = Metrics("mae_deg", False, per_seed, parts=parts_sum, rows=rows_first or [])
                horizons[label] = np.asarray(h_sum)
            write_vp_results(out / dataset, results, horizons,
                             title=f"VP: trained on Jin2022, tested on {dataset}/test ({len(test)} windows)")
            summary[dataset] = {n: m.summary() for n, m in results.items()}
        summary["speed"] = speed_report(runs[next(iter(runs))][0], device=device)
        atomic_write_json(out / "bench.json", summary)
        console.print(f"written: {out / 'bench.json'}")
        return summary


def _window_spec(hw: int | str, fw: int | str, step: int | str) -> WindowSpec:
    values = {}
    for name, value in (("hw", hw), ("fw", fw), ("step", step)):
        try:
            values[name] = int(value)
        except (TypeError, ValueError):
            raise NetLLMError(f"--{name}: must be a positive integer, got {value!r}") from None
    return WindowSpec(**values)


def _check_window(policy: Any, spec: WindowSpec, name: str) -> None:
    hw, fw = getattr(policy, "hw", spec.hw), getattr(policy, "fw", spec.fw)
    if (hw, fw) != (spec.hw, spec.fw):
        raise NetLLMError(f"--policy {name}: trained for hw={hw}, fw={fw}; the evaluation uses hw={spec.hw}, "
                          f"fw={spec.fw} (pass --hw/--fw to match)")


def speed_report(adapter: Path, device: str = "auto", batch: int = 64, repeats: int = 3) -> dict[str, float]:
    """Predictions/s of the one-pass head vs the upstream autoregressive loop, same model and batch."""
    policy = NetLLMVPPolicy.from_adapter(adapter, device=device)
    history = load_samples("Jin2022", "test").history[:batch]
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
