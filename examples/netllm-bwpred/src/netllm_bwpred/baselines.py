"""bwpred baselines, all behind ``predict(history (N, 10) Mbps) -> future (N, 5) Mbps``.

* :class:`LastValue` — the last observed second, held flat over the horizon.
* :class:`HarmonicMean` — the harmonic mean of the last 5 seconds, held flat: RobustMPC's
  throughput estimator (without its error discount), robust to short spikes.
* :class:`LSTMPredictor` — a small LSTM trained on the training windows
  (``netllm adapt bwpred --model lstm``), same inputs and outputs as NetLLM: log1p
  channels in, log1p offsets to the last second out (see :mod:`netllm_bwpred.data`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from netllm.checkpoint import save_small_model
from netllm.utils import NetLLMError, seed_everything
from netllm_bwpred.data import HISTORY_S, HORIZON_S, TRANSFORM, Windows, batches, from_offsets, log_channels

LSTM_CONFIG = "lstm_config.json"
LSTM_WEIGHTS = "lstm.safetensors"


def _check_history(history: Any, name: str, history_s: int = HISTORY_S) -> np.ndarray:
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 2 or h.shape[1] != history_s:
        raise NetLLMError(f"{name}: expects histories of shape (N, {history_s}) Mbps, got {h.shape}")
    return h


class LastValue:
    name = "last-value"

    def __init__(self, horizon_s: int = HORIZON_S) -> None:
        self.horizon_s = horizon_s

    def predict(self, history: np.ndarray) -> np.ndarray:
        h = _check_history(history, self.name)
        return np.repeat(h[:, -1:], self.horizon_s, axis=1)


class HarmonicMean:
    """``n / sum(1 / x)`` over the last ``n`` seconds; a second of zero throughput makes it 0."""

    name = "harmonic-mean"

    def __init__(self, n: int = 5, horizon_s: int = HORIZON_S) -> None:
        self.n, self.horizon_s = n, horizon_s

    def predict(self, history: np.ndarray) -> np.ndarray:
        h = np.maximum(_check_history(history, self.name)[:, -self.n:], 0.0)
        with np.errstate(divide="ignore"):
            hm = h.shape[1] / np.sum(1.0 / h, axis=1)  # 1/0 = inf -> 0, the limit
        return np.repeat(hm[:, None], self.horizon_s, axis=1)


BASELINES: dict[str, Callable[[], Any]] = {"last-value": LastValue, "harmonic-mean": HarmonicMean}


# ----------------------------------------------------------------------------- LSTM


class ThroughputLSTM(nn.Module):
    """LSTM over the history's per-second (level, offset) channels; a linear layer on the
    last hidden state gives all 5 log1p offsets. It starts at zero: the last-value predictor."""

    def __init__(self, hidden: int = 64, layers: int = 1, horizon_s: int = HORIZON_S) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, horizon_s)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, channels: torch.Tensor) -> torch.Tensor:
        """(B, 2, T) -> (B, horizon) log1p offsets to the last second."""
        h, _ = self.lstm(channels.transpose(1, 2))
        return self.out(h[:, -1])


class LSTMPredictor:
    def __init__(self, net: ThroughputLSTM, name: str = "lstm") -> None:
        self.net, self.name = net.eval(), name

    @torch.no_grad()
    def predict(self, history: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        h = _check_history(history, self.name)
        outs = []
        for i in range(0, len(h), batch_size):
            part = h[i:i + batch_size]
            offsets = self.net(torch.as_tensor(log_channels(part)))
            outs.append(from_offsets(torch.as_tensor(part[:, -1], dtype=torch.float32), offsets).double().numpy())
        return np.concatenate(outs)

    def save(self, folder: Path, config: dict[str, Any]) -> Path:
        return save_small_model(folder, self.net, {"task": "bwpred", "model": "lstm", **config},
                                config_file=LSTM_CONFIG, weights_file=LSTM_WEIGHTS)

    @classmethod
    def load(cls, folder: str | Path) -> "LSTMPredictor":
        folder = Path(folder)
        try:
            config = json.loads((folder / LSTM_CONFIG).read_text())
            if config.get("task") != "bwpred":
                raise ValueError(f"an LSTM run of task {config.get('task')!r}")
            norm = config["norm"]
            if (norm["history_s"], norm["horizon_s"]) != (HISTORY_S, HORIZON_S):
                raise ValueError(f"trained for {norm['history_s']} s -> {norm['horizon_s']} s")
            net = ThroughputLSTM(int(config["hidden"]), int(config.get("layers", 1)), int(norm["horizon_s"]))
            net.load_state_dict(load_file(str(folder / LSTM_WEIGHTS)))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise NetLLMError(f"--policy {folder}: not a readable bwpred LSTM run ({e})") from None
        return cls(net, name=folder.name)


def l1_mbps(pred: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """The training loss of both trained predictors: the metric itself, MAE in Mbps."""
    return (pred - future.to(pred.device)).abs().mean()


def train_lstm(train: Windows, valid: Windows, out: Path, *, hidden: int, steps: int, batch_size: int,
               lr: float, eval_every: int, seed: int, details: dict[str, Any],
               log: Callable[[str], Any] = print) -> LSTMPredictor:
    """AdamW on the MAE (Mbps); the weights kept are those best on ``valid`` (checked every
    ``eval_every`` steps and at the end)."""
    seed_everything(seed)
    net = ThroughputLSTM(hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    get_batch = batches(train, batch_size, seed)
    t0 = time.perf_counter()
    best, best_step, best_state, curve = float("inf"), 0, None, []
    every = eval_every if eval_every > 0 else steps
    for step in range(1, steps + 1):
        net.train()
        b = get_batch(step - 1)
        loss = l1_mbps(from_offsets(b["last"], net(b["channels"])), b["future"])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            mae = float(np.abs(LSTMPredictor(net).predict(valid.history) - valid.future).mean())
            curve.append({"step": step, "valid_mae_mbps": mae})
            log(f"step {step}/{steps}: train MAE {loss.item():.4f} Mbps, valid MAE {mae:.4f} Mbps")
            if mae < best:
                best, best_step = mae, step
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    predictor = LSTMPredictor(net, name=out.name)
    predictor.save(out, {"hidden": hidden, "layers": 1,
                         "norm": {"history_s": HISTORY_S, "horizon_s": HORIZON_S, "step_s": 1.0,
                                  "transform": TRANSFORM, "output": "log1p offsets to the last second"},
                         "best": {"mae_mbps": best, "step": best_step}, "valid_curve": curve,
                         "train_seconds": time.perf_counter() - t0, **details})
    return predictor
