"""NetLLM for VP end to end on a tiny random Llama and generated head motion: one-pass
prediction, training, the adapter round trip, the image token, the LSTM, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.tasks.vp.baselines import LSTMPredictor, LSTMRecipe, NoMotion, train_lstm
from netllm.tasks.vp.dataset import WindowSpec, angular_error, make_windows, synthetic_traces
from netllm.tasks.vp.task import (AdaptRecipe, NetLLMVPPolicy, adapt, build_model, embed_steps, evaluate,
                                  model_config, predict_autoregressive, predict_offsets, step_features)
from netllm.utils import NetLLMError


@pytest.fixture(scope="module")
def samples():
    return make_windows(synthetic_traces(videos=3, users=4, length=200, seed=0))


def test_untrained_model_is_the_no_motion_predictor(tiny_llama, samples):
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4), device="cpu")
    pred = NetLLMVPPolicy(model).predict(samples.history[:8])
    assert np.allclose(pred, NoMotion(20).predict(samples.history[:8]), atol=1e-5)


def test_one_pass_matches_the_head_shape_and_the_batch(tiny_llama, samples):
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, fw=7), device="cpu")
    torch.nn.init.normal_(model.heads["future"].mlp[-1].weight, std=0.1)
    model.eval()
    feats = torch.as_tensor(step_features(samples.history[:6]))
    with torch.no_grad():
        whole = predict_offsets(model, feats)
        split = torch.cat([predict_offsets(model, feats[:3]), predict_offsets(model, feats[3:])])
    assert whole.shape == (6, 7, 3)
    assert torch.allclose(whole, split, atol=1e-5)
    with torch.no_grad():
        loop = predict_autoregressive(model, samples.history[:6], 7)
    assert loop.shape == (6, 7, 3)


def test_adapt_lowers_the_error_and_the_adapter_round_trips(tiny_llama, samples, tmp_path):
    recipe = AdaptRecipe(llm=tiny_llama, layers=2, rank=4, epochs=3, batch_size=16, lr=3e-3, eval_every=5,
                         warmup_steps=2)
    valid = samples.subset(slice(0, 40))
    folder = adapt(samples, tmp_path / "vp", recipe, valid=valid, device="cpu", progress=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task"] == "vp" and config["norm"]["fw"] == 20
    assert config["extra"]["best"]["mae"] <= evaluate(NoMotion(), valid)[0].mean + 1e-6
    policy = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    again = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    a, b = policy.predict(samples.history[:10]), again.predict(samples.history[:10])
    assert np.array_equal(a, b)
    metrics, horizon = evaluate(policy, valid)
    assert metrics.mean == pytest.approx(config["extra"]["best"]["mae"], abs=1e-4)
    assert horizon.shape == (20,) and horizon[-1] > horizon[0]  # farther is harder
    assert {"video", "user", "mae_deg"} <= set(metrics.rows[0])
    with pytest.raises(NetLLMError, match="adapter is for task 'vp', not 'abr'"):
        NetLLM.from_adapter(folder, task="abr", device="cpu")


def test_image_token_per_step_on_generated_frames(tmp_path, tiny_llama, samples):
    from transformers import ViTConfig

    vit = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, image=vit), device="cpu")
    frames = torch.rand(4, 10, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # generated frames
    feats = torch.as_tensor(step_features(samples.history[:4]))
    tokens = embed_steps(model, feats, frames)
    assert tokens.shape == (4, 20, model.hidden_size)  # viewport, frame, viewport, frame, ...
    torch.nn.init.normal_(model.heads["future"].mlp[-1].weight, std=0.1)
    out = predict_offsets(model, feats, frames)
    out.abs().mean().backward()
    vit_grads = [p.grad for p in model.encoders.encoders["frame"].vision.parameters()]
    assert all(g is None for g in vit_grads)  # the ViT stays frozen
    assert model.encoders.encoders["frame"].fc.weight.grad is not None
    model.save_adapter(tmp_path / "img")
    again = NetLLM.from_adapter(tmp_path / "img", device="cpu")
    with torch.no_grad():
        assert torch.allclose(predict_offsets(model.eval(), feats, frames), predict_offsets(again, feats, frames),
                              atol=1e-5)
    with pytest.raises(NetLLMError, match="frames are required"):
        predict_offsets(again, feats)


def test_lstm_trains_and_reloads(samples, tmp_path):
    recipe = LSTMRecipe(hidden=16, epochs=2, batch_size=32)
    lstm = train_lstm(samples, samples.subset(slice(0, 30)), recipe, tmp_path / "lstm", log=lambda *_: None)
    again = LSTMPredictor.load(tmp_path / "lstm")
    assert np.allclose(lstm.predict(samples.history[:5]), again.predict(samples.history[:5]))
    err = angular_error(again.predict(samples.history), samples.future)
    assert np.isfinite(err).all()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    bad = _cli("eval", "vp", "--policy", "static", "--out", str(tmp_path / "x"),
               env={"NETLLM_DATA": str(tmp_path)})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "not found" in bad.stderr or "unknown VP baseline" in bad.stderr
    bad = _cli("eval", "vp", "--policy", "no-motion", "--hw", "many", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--hw" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.integration
def test_cli_eval_writes_results_and_plots(real_data, tmp_path):
    out = tmp_path / "eval"
    done = _cli("eval", "vp", "--policy", "no-motion", "--policy", "velocity", "--policy", "lr",
                "--dataset", "Jin2022", "--split", "test", "--out", str(out), env={"NETLLM_DATA": str(real_data)})
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["no-motion"]["metric"] == "mae_deg"
    assert results["no-motion"]["mean"] == pytest.approx(9.76, abs=0.05)
    for name in ("rows.csv", "box.png", "horizon.png", "horizon.json"):
        assert (out / name).is_file(), name
