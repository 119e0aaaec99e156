"""VP baselines behind one call: ``policy.predict(history (N, hw, 3)) -> future (N, fw, 3)``.

Angles are (roll, pitch, yaw) in degrees.

* :class:`NoMotion` — repeat the last observed orientation (the bar that matters:
  9.76° on Jin2022's test split).
* :class:`Velocity` — constant angular velocity ``(x[last] - x[first]) / (hw - 1)``
  per sample, extrapolated.
* :class:`LinearRegression` — per sample and angle, a least-squares line through the
  history, extrapolated.

  Both work on the raw angles as upstream does (that is what reproduces the spec's
  17.50° / 19.47°); a history that crosses yaw ±180° then extrapolates a 360° jump.
  The ``-unwrapped`` variants first express the history relative to its last sample
  (wrapped into [-180, 180)) and are the fair versions of the same idea.
* :class:`LSTMPredictor` — a trained LSTM encoder–decoder over the trajectory (the
  trajectory branch of TRACK): it reads the history as offsets to the last observed
  orientation and unrolls ``fw`` steps, each fed its own previous prediction. Trained
  by ``netllm adapt vp --model lstm``; saved as a folder (``lstm_config.json`` +
  ``lstm.safetensors``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from netllm.checkpoint import save_small_model
from netllm.tasks.vp.dataset import Samples, angular_error, from_relative, mirror_signs, relative, wrap
from netllm.utils import NetLLMError, seed_everything

LSTM_CONFIG = "lstm_config.json"
LSTM_WEIGHTS = "lstm.safetensors"
ANGLE_SCALE = 30.0  # degrees -> network units (offsets are mostly within ±30°)


class NoMotion:
    name = "no-motion"

    def __init__(self, fw: int = 20) -> None:
        self.fw = fw

    def predict(self, history: np.ndarray) -> np.ndarray:
        return np.repeat(history[:, -1:, :], self.fw, axis=1)


def _history(history: np.ndarray, unwrapped: bool) -> np.ndarray:
    return history[:, -1:, :] + relative(history)[0] if unwrapped else history


def _finish(pred: np.ndarray, unwrapped: bool) -> np.ndarray:
    if unwrapped:
        pred = pred.copy()
        pred[..., 2] = wrap(pred[..., 2])
    return pred


class Velocity:
    def __init__(self, fw: int = 20, unwrapped: bool = False) -> None:
        self.fw, self.unwrapped = fw, unwrapped
        self.name = "velocity-unwrapped" if unwrapped else "velocity"

    def predict(self, history: np.ndarray) -> np.ndarray:
        h = _history(np.asarray(history, dtype=np.float64), self.unwrapped)
        hw = h.shape[1]
        v = (h[:, -1:, :] - h[:, :1, :]) / max(hw - 1, 1)
        steps = np.arange(1, self.fw + 1, dtype=np.float64)[None, :, None]
        return _finish(h[:, -1:, :] + v * steps, self.unwrapped)


class LinearRegression:
    def __init__(self, fw: int = 20, unwrapped: bool = False) -> None:
        self.fw, self.unwrapped = fw, unwrapped
        self.name = "lr-unwrapped" if unwrapped else "lr"

    def predict(self, history: np.ndarray) -> np.ndarray:
        h = _history(np.asarray(history, dtype=np.float64), self.unwrapped)
        n, hw, d = h.shape
        x = np.arange(hw, dtype=np.float64)
        design = np.stack([x, np.ones(hw)], axis=1)  # (hw, 2)
        coef, *_ = np.linalg.lstsq(design, h.transpose(1, 0, 2).reshape(hw, n * d), rcond=None)
        xf = np.arange(hw, hw + self.fw, dtype=np.float64)
        pred = np.stack([xf, np.ones(self.fw)], axis=1) @ coef  # (fw, n*d)
        return _finish(pred.reshape(self.fw, n, d).transpose(1, 0, 2), self.unwrapped)


# ----------------------------------------------------------------------------- LSTM


@dataclass
class LSTMRecipe:
    """The LSTM baseline's hyper-parameters, all visible here."""

    hidden: int = 128
    layers: int = 1
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    hw: int = 10
    fw: int = 20
    augment: str = "none"  # "mirror" in it: half of each batch mirrored (the NetLLM recipe's --augment)


class TrajectoryLSTM(nn.Module):
    """Encoder–decoder LSTM on offsets to the last observed orientation (scaled degrees)."""

    def __init__(self, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.encoder = nn.LSTM(6, hidden, layers, batch_first=True)
        self.decoder = nn.LSTM(3, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, 3)

    def forward(self, rel_history: torch.Tensor, fw: int) -> torch.Tensor:
        """(B, hw, 3) scaled offsets -> (B, fw, 3) scaled offsets of the future."""
        steps = torch.diff(rel_history, dim=1, prepend=rel_history[:, :1])
        _, state = self.encoder(torch.cat([rel_history, steps], dim=-1))
        prev = rel_history[:, -1:]  # zeros: the last observation is the origin
        outs = []
        for _ in range(fw):
            h, state = self.decoder(prev, state)
            prev = prev + self.out(h)  # predict the step, accumulate the position
            outs.append(prev)
        return torch.cat(outs, dim=1)


class LSTMPredictor:
    def __init__(self, net: TrajectoryLSTM, fw: int, name: str = "lstm") -> None:
        self.net, self.fw, self.name = net.eval(), fw, name

    @torch.no_grad()
    def predict(self, history: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        rel, _ = relative(np.asarray(history, dtype=np.float64))
        outs = []
        for i in range(0, len(rel), batch_size):
            x = torch.as_tensor(rel[i:i + batch_size] / ANGLE_SCALE, dtype=torch.float32)
            outs.append(self.net(x, self.fw).double().numpy() * ANGLE_SCALE)
        return from_relative(np.asarray(history, dtype=np.float64), np.concatenate(outs))

    def save(self, folder: Path, recipe: LSTMRecipe, extra: dict[str, Any]) -> Path:
        return save_small_model(folder, self.net, {"task": "vp", "model": "lstm", "recipe": asdict(recipe), **extra},
                                config_file=LSTM_CONFIG, weights_file=LSTM_WEIGHTS)

    @classmethod
    def load(cls, folder: str | Path) -> "LSTMPredictor":
        folder = Path(folder)
        try:
            config = json.loads((folder / LSTM_CONFIG).read_text())
            recipe = LSTMRecipe(**config["recipe"])
            net = TrajectoryLSTM(recipe.hidden, recipe.layers)
            net.load_state_dict(load_file(str(folder / LSTM_WEIGHTS)))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise NetLLMError(f"{folder}: not a readable VP LSTM run ({e})") from None
        return cls(net, recipe.fw, name=folder.name)


def train_lstm(train: Samples, valid: Samples | None, recipe: LSTMRecipe, out: Path,
               log: Any = print) -> LSTMPredictor:
    """Train the LSTM with L1 on scaled offsets; keep the epoch with the best valid MAE."""
    seed_everything(recipe.seed)
    net = TrajectoryLSTM(recipe.hidden, recipe.layers)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    rel_h, rel_f = relative(train.history, train.future)
    x_all = torch.as_tensor(rel_h / ANGLE_SCALE, dtype=torch.float32)
    y_all = torch.as_tensor(rel_f / ANGLE_SCALE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(recipe.seed)
    mirror = "mirror" in recipe.augment.split(",")
    best, best_state, t0 = float("inf"), None, time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        net.train()
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            x, y = x_all[idx], y_all[idx]
            if mirror:  # the relative inputs do not see absolute yaw: yaw-offset changes nothing
                signs = torch.as_tensor(mirror_signs(torch.rand(len(idx), generator=gen).numpy() < 0.5))
                x, y = x * signs[:, None], y * signs[:, None]
            loss = (net(x, recipe.fw) - y).abs().mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(idx)
        predictor = LSTMPredictor(net, recipe.fw)
        score = (angular_error(predictor.predict(valid.history), valid.future).mean()
                 if valid is not None else total / len(order))
        log(f"epoch {epoch}: train L1 {total / len(order) * ANGLE_SCALE:.3f}° "
            f"{'valid MAE' if valid is not None else 'train'} {score:.3f}°")
        if score < best:
            best, best_state = score, {k: v.clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    predictor = LSTMPredictor(net, recipe.fw, name=out.name)
    predictor.save(out, recipe, {"valid_mae": best, "train_seconds": time.perf_counter() - t0})
    return predictor


BASELINES = ("no-motion", "velocity", "lr", "velocity-unwrapped", "lr-unwrapped")


def make_baseline(name: str, fw: int = 20) -> Any:
    factories = {
        "no-motion": lambda: NoMotion(fw),
        "velocity": lambda: Velocity(fw),
        "lr": lambda: LinearRegression(fw),
        "velocity-unwrapped": lambda: Velocity(fw, unwrapped=True),
        "lr-unwrapped": lambda: LinearRegression(fw, unwrapped=True),
    }
    if name not in factories:
        raise NetLLMError(f"--policy: unknown VP baseline {name!r}; choose from {', '.join(BASELINES)} "
                          "or a run folder (LSTM or NetLLM adapter)")
    return factories[name]()
