"""The training loop: learning, exact resume, checkpoint contents, schedule, errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import netllm.checkpoint as checkpoint_mod
from netllm.checkpoint import completed_steps, load_trainable_state_dict, trainable_state_dict
from netllm.train import TrainConfig, lr_at, train
from netllm.utils import NetLLMError

IN_FEATURES, HIDDEN, BATCH = 4, 16, 32


def _filled(shape: tuple[int, ...], seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


class Toy(nn.Module):
    """A frozen "backbone" (always the same weights) and a trainable head with dropout."""

    def __init__(self, head_seed: int, head_name: str = "head") -> None:
        super().__init__()
        self.backbone = nn.Linear(IN_FEATURES, HIDDEN)
        with torch.no_grad():
            self.backbone.weight.copy_(_filled((HIDDEN, IN_FEATURES), 0, 1.0))
            self.backbone.bias.copy_(_filled((HIDDEN,), 1, 0.1))
        self.backbone.requires_grad_(False)
        self.drop = nn.Dropout(0.1)
        head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            head.weight.copy_(_filled((1, HIDDEN), head_seed))
            head.bias.copy_(_filled((1,), head_seed + 1))
        self.head_name = head_name
        setattr(self, head_name, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.drop(torch.tanh(self.backbone(x)))
        return getattr(self, self.head_name)(features).squeeze(-1)


TRUE_HEAD = _filled((HIDDEN,), 99, 1.0)


def get_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, IN_FEATURES, generator=torch.Generator().manual_seed(10_000 + i))
    with torch.no_grad():
        y = torch.tanh(Toy(0).backbone(x)) @ TRUE_HEAD
    return x, y


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    return nn.functional.mse_loss(model(x), y), {"samples": float(len(x))}


def config(**kw) -> TrainConfig:
    base = dict(steps=12, lr=0.05, warmup_steps=3, grad_accum=2, clip_grad_norm=1.0,
                checkpoint_every=4, log_every=1, seed=7, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_loss_decreases(tmp_path):
    model = Toy(head_seed=3)
    result = train(model, get_batch, mse, config(steps=150, lr=0.03, warmup_steps=10,
                                                 checkpoint_every=0, log_every=5), tmp_path)
    rows = read_rows(result.metrics_csv)
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert result.steps_done == 150 and int(rows[-1]["step"]) == 150
    assert last < 0.2 * first
    assert math.isclose(result.final_loss, last, rel_tol=1e-6)
    assert float(rows[-1]["samples_per_s"]) > 0
    assert (tmp_path / "tb").is_dir()


def test_interrupt_and_resume_matches_uninterrupted_run(tmp_path):
    cfg = config()
    model_a = Toy(head_seed=3)
    train(model_a, get_batch, mse, cfg, tmp_path / "a")

    model_b = Toy(head_seed=3)
    interrupted = train(model_b, get_batch, mse, cfg, tmp_path / "b", stop_after=10)
    assert interrupted.steps_done == 10
    assert completed_steps(tmp_path / "b") == 8 and completed_steps(tmp_path / "a") == 12
    assert completed_steps(tmp_path / "nowhere") == 0
    state = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert state.keys() == {"head.weight", "head.bias"}
    # only the periodic checkpoint (step 8) survived the "crash" at step 10
    rows_before = read_rows(tmp_path / "b" / "metrics.csv")
    assert [int(r["step"]) for r in rows_before] == list(range(1, 11))

    model_c = Toy(head_seed=42)  # a different init: everything must come from the checkpoint
    assert not torch.equal(model_c.head.weight, model_a.head.weight)
    resumed = train(model_c, get_batch, mse, cfg, tmp_path / "b", resume=True)
    assert resumed.steps_done == 12

    for name, value in trainable_state_dict(model_a).items():
        torch.testing.assert_close(trainable_state_dict(model_c)[name], value, atol=1e-6, rtol=0)
    steps = [int(r["step"]) for r in read_rows(tmp_path / "b" / "metrics.csv")]
    assert steps == list(range(1, 13))
    # the resumed rows equal the uninterrupted run's rows (same loss at every step)
    loss_a = [float(r["loss"]) for r in read_rows(tmp_path / "a" / "metrics.csv")]
    loss_b = [float(r["loss"]) for r in read_rows(tmp_path / "b" / "metrics.csv")]
    assert loss_a == pytest.approx(loss_b, abs=1e-6)


def test_checkpoint_holds_only_trainable_tensors_and_no_pickle(tmp_path):
    model = Toy(head_seed=3)
    result = train(model, get_batch, mse, config(steps=4), tmp_path)
    ckpt = result.checkpoint_dir
    assert ckpt == tmp_path / "checkpoint"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng_state.safetensors",
                     "trainer_state.json"]
    params = load_file(ckpt / "model.safetensors")
    assert set(params) == {"head.weight", "head.bias"}
    assert not any(k.startswith("backbone") for k in params)
    opt = load_file(ckpt / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(opt)
    assert all(p.suffix in {".safetensors", ".json"} for p in ckpt.rglob("*") if p.is_file())


def test_trainable_state_dict_roundtrip():
    source, target = Toy(head_seed=3), Toy(head_seed=4)
    missing, unexpected = load_trainable_state_dict(target, trainable_state_dict(source))
    assert missing == unexpected == []
    assert torch.equal(target.head.weight, source.head.weight)
    with pytest.raises(NetLLMError, match="adapter X"):
        load_trainable_state_dict(Toy(0, head_name="out"), trainable_state_dict(source),
                                  source="adapter X")
    missing, unexpected = load_trainable_state_dict(
        Toy(0, head_name="out"), trainable_state_dict(source), strict=False)
    assert missing == ["out.bias", "out.weight"] and unexpected == ["head.bias", "head.weight"]


def test_warmup_then_constant(tmp_path):
    cfg = config(steps=10, lr=0.1, warmup_steps=4, grad_accum=1, checkpoint_every=0)
    result = train(Toy(head_seed=3), get_batch, mse, cfg, tmp_path)
    lrs = [float(r["lr"]) for r in read_rows(result.metrics_csv)]
    assert lrs[0] == pytest.approx(0.1 / 4)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[3:] == pytest.approx([0.1] * 7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_schedules_end_at_min_lr(schedule):
    cfg = config(steps=100, lr=1.0, warmup_steps=10, schedule=schedule, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(1, 101)]
    assert lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_nan_loss_raises_with_step(tmp_path):
    def nan_after_four(model, batch):
        loss, _ = mse(model, batch[:2])
        return loss * float("nan") if batch[2] >= 4 else loss

    def batch_with_index(i):
        return (*get_batch(i), i)

    with pytest.raises(NetLLMError, match="step 5"):
        train(Toy(head_seed=3), batch_with_index, nan_after_four,
              config(grad_accum=1, checkpoint_every=0), tmp_path)


def test_eval_cadence_mode_and_metrics(tmp_path):
    calls, modes_in_train = [], []

    def eval_fn(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        torch.rand(3)  # eval draws must not disturb training randomness
        return {"mse": float(step)}

    def loss_fn(model, batch):
        modes_in_train.append(model.training)
        return mse(model, batch)

    model = Toy(head_seed=3)
    model.eval()  # the caller's mode is restored at the end
    cfg = config(steps=10, eval_every=3, checkpoint_every=0)
    result = train(model, get_batch, loss_fn, cfg, tmp_path, eval_fn=eval_fn)
    assert [c[0] for c in calls] == [3, 6, 9, 10]
    assert all(not training and not grad for _, training, grad in calls)
    assert all(modes_in_train) and not model.training
    rows = {int(r["step"]): r for r in read_rows(result.metrics_csv)}
    assert sorted(rows) == list(range(1, 11))
    assert {s for s, r in rows.items() if r["eval_mse"]} == {3, 6, 9, 10}
    assert float(rows[6]["eval_mse"]) == 6.0

    # evaluating (and drawing random numbers in eval) leaves the trained weights unchanged
    plain = Toy(head_seed=3)
    train(plain, get_batch, mse, config(steps=10, checkpoint_every=0), tmp_path / "plain")
    assert torch.equal(plain.head.weight, model.head.weight)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    train(Toy(head_seed=3), get_batch, mse, config(steps=8, checkpoint_every=2), tmp_path / "ok")
    left = sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert left == ["checkpoint", "metrics.csv", "tb"]

    real_save = checkpoint_mod.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # the optimizer file of the second checkpoint (step 4)
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_mod, "save_file", failing_save)
    out = tmp_path / "fail"
    with pytest.raises(OSError, match="disk full"):
        train(Toy(head_seed=3), get_batch, mse, config(steps=8, checkpoint_every=2), out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.csv", "tb"]
    assert '"step": 2' in (out / "checkpoint" / "trainer_state.json").read_text()


def test_resume_with_mismatched_model_raises(tmp_path):
    train(Toy(head_seed=3), get_batch, mse, config(steps=4), tmp_path)
    with pytest.raises(NetLLMError, match=str(tmp_path / "checkpoint")):
        train(Toy(head_seed=3, head_name="out"), get_batch, mse, config(steps=8), tmp_path,
              resume=True)


def test_resume_without_checkpoint_starts_fresh_and_fresh_refuses_existing(tmp_path):
    result = train(Toy(head_seed=3), get_batch, mse, config(steps=4), tmp_path, resume=True)
    assert result.steps_done == 4
    with pytest.raises(NetLLMError, match="already holds a checkpoint"):
        train(Toy(head_seed=3), get_batch, mse, config(steps=4), tmp_path)
    # resuming a finished run does nothing and reports the saved state
    again = train(Toy(head_seed=3), get_batch, mse, config(steps=4), tmp_path, resume=True)
    assert again.steps_done == 4 and again.final_loss == pytest.approx(result.final_loss)


def test_config_validation_names_the_field():
    with pytest.raises(NetLLMError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(NetLLMError, match="schedule"):
        TrainConfig(schedule="step")  # type: ignore[arg-type]
