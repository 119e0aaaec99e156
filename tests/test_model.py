"""The model core: encoders -> LLM -> heads, batched with padding; the adapter folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import BestAdapter, NetLLM, NetLLMConfig, last_token_hidden
from netllm.train import TrainConfig, train
from netllm.utils import NetLLMError, atomic_write_json


def vp_like_config(llm: str, **kw) -> NetLLMConfig:
    return NetLLMConfig(
        task="toy-vp", llm=llm, lora=LoraSpec(rank=4),
        encoders=[EncoderSpec("history", "series", length=3), EncoderSpec("speed", "scalar", in_dim=2)],
        heads={"future": HeadSpec("regression", steps=5, dims=3)},
        norm={"angle_scale_deg": 180.0}, **kw,
    )


def test_forward_shapes_and_trainable_parts(tiny_llama):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    out = model({"history": torch.randn(4, 10, 3), "speed": torch.randn(4, 1, 2)})
    assert out["future"].shape == (4, 5, 3)
    summary = model.trainable_summary()
    assert summary["lora"] > 0 and summary["encoders_heads"] > 0
    frozen = [n for n, p in model.named_parameters() if n.startswith("backbone.") and "lora_" not in n]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_padded_batch_equals_unpadded_rows(tiny_llama):
    """Rows of different lengths in one left-padded batch give the same answers alone."""
    model = NetLLM(vp_like_config(tiny_llama), device="cpu").eval()
    hist = torch.randn(2, 6, 3)
    speed = torch.randn(2, 1, 2)
    with torch.no_grad():
        alone = model({"history": hist[1:, 2:], "speed": speed[1:]})["future"]
        embeds = model.embed({"history": hist, "speed": speed})
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :2] = 0  # row 1 has only 4 history tokens: left padding
        hidden, _ = model.hidden(embeds, mask)
        batched = model.heads["future"](last_token_hidden(hidden, mask))
    assert torch.allclose(batched[1:], alone, atol=1e-5)


def test_adapter_roundtrip_gives_identical_outputs(tiny_llama, tmp_path):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    with torch.no_grad():  # make LoRA non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = {"history": torch.randn(3, 10, 3), "speed": torch.randn(3, 1, 2)}
    ref = model(x)["future"]
    folder = model.save_adapter(tmp_path / "adapter", extra={"note": "test"})
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "netllm_modules.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task"] == "toy-vp" and config["layers"] == 4 and config["lora"]["rank"] == 4
    assert config["norm"] == {"angle_scale_deg": 180.0} and "versions" in config
    lora = load_file(str(folder / "adapter_model.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    modules = load_file(str(folder / "netllm_modules.safetensors"))
    assert not any(k.startswith("backbone.") for k in modules)  # never the base LLM
    loaded = NetLLM.from_adapter(folder, task="toy-vp", device="cpu")
    assert torch.equal(loaded(x)["future"], ref)


def test_adapter_errors(tiny_llama, tmp_path):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    folder = model.save_adapter(tmp_path / "a")
    with pytest.raises(NetLLMError, match="task"):
        NetLLM.from_adapter(folder, task="abr", device="cpu")
    with pytest.raises(NetLLMError, match="backbone"):
        NetLLM.from_adapter(folder, llm="smollm2", device="cpu")
    with pytest.raises(NetLLMError, match="not a NetLLM adapter"):
        NetLLM.from_adapter(tmp_path, device="cpu")


def test_missing_modality_is_named(tiny_llama):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    with pytest.raises(NetLLMError, match="speed"):
        model({"history": torch.randn(1, 2, 3)})


# ----------------------------------------------------------------------------- strict JSON


def _strict_json(text: str):
    """Parse like a strict JSON parser: NaN / Infinity are errors."""
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_adapter_config_is_strict_json(tiny_llama, tmp_path):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    folder = model.save_adapter(tmp_path / "a", extra={"note": "kept"})
    before = (folder / "adapter_config.json").read_text()
    with pytest.raises(NetLLMError, match=r"adapter_config\.json.*'extra\.score'"):
        model.save_adapter(folder, extra={"score": float("nan")})
    assert (folder / "adapter_config.json").read_text() == before  # nothing touched

    with pytest.raises(NetLLMError, match=r"x\.json.*'a\[1\]'"):
        atomic_write_json(tmp_path / "x.json", {"a": [1.0, float("inf")]})
    assert not (tmp_path / "x.json").exists()

    # an adapter saved by an older version, with the retired graph-only encoder fields
    config = json.loads(before)
    for spec in config["encoders"]:
        spec.update(node_dim=None, rounds=8, pooling="sum")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert NetLLM.from_adapter(folder, device="cpu").config.encoders == model.config.encoders


def test_best_adapter_without_validation_records_null(tiny_llama, tmp_path):
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    folder = BestAdapter(tmp_path / "a", "mae", higher_is_better=False).finish(model)
    text = (folder / "adapter_config.json").read_text()
    assert _strict_json(text)["extra"]["best"] is None
    # nothing to resume: a resumed keeper without evaluation saves the final model again
    keeper = BestAdapter(folder, "mae", higher_is_better=False, resume=True)
    assert keeper.best is None and not keeper.saved
    # an older adapter saved without validation recorded -Infinity: not a best either
    legacy = json.loads(text)
    legacy["extra"]["best"] = {"mae": float("inf"), "step": 0}
    (folder / "adapter_config.json").write_text(json.dumps(legacy))
    assert BestAdapter(folder, "mae", higher_is_better=False, resume=True).best is None


def _adapt(tiny_llama, out, scores, *, resume=False, stop_after=None):
    """A tiny supervised run that validates every 2 steps with the scripted ``scores``."""
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    keeper = BestAdapter(out, "mae", higher_is_better=False, extra=lambda: {"run": "test"}, resume=resume)
    evaluated = []

    def get_batch(i):
        g = torch.Generator().manual_seed(i)
        x = {"history": torch.randn(2, 4, 3, generator=g), "speed": torch.randn(2, 1, 2, generator=g)}
        return x, torch.randn(2, 5, 3, generator=g)

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(m(x)["future"], y)

    def eval_fn(m, step):
        evaluated.append(step)
        keeper.update(m, scores[step], step)
        return {"mae": scores[step]}

    cfg = TrainConfig(steps=8, lr=0.05, warmup_steps=0, eval_every=2, checkpoint_every=4, log_every=1,
                      progress=False, tensorboard=False)
    train(model, get_batch, loss_fn, cfg, out / "train", eval_fn=eval_fn, resume=resume, stop_after=stop_after)
    if stop_after is None:
        keeper.finish(model)
    return model, keeper, evaluated


def test_best_adapter_survives_resume(tiny_llama, tmp_path):
    """Interrupted after the best evaluation, resumed, finished: the best adapter is kept."""
    scores = {2: 5.0, 4: 3.0, 6: 4.0, 8: 6.0}  # lower is better: step 4 is the best
    out = tmp_path / "run"
    files = ("adapter_config.json", "adapter_model.safetensors", "netllm_modules.safetensors")

    _, keeper, evaluated = _adapt(tiny_llama, out, scores, stop_after=5)  # "crash" after step 5
    assert evaluated == [2, 4] and keeper.best == {"mae": 3.0, "step": 4}
    kept = {name: (out / name).read_bytes() for name in files}

    model, keeper, evaluated = _adapt(tiny_llama, out, scores, resume=True)
    assert evaluated == [6, 8]  # both worse than the resumed best: nothing saved, not even by finish
    assert keeper.best == {"mae": 3.0, "step": 4}
    assert {name: (out / name).read_bytes() for name in files} == kept
    assert _strict_json(kept["adapter_config.json"].decode())["extra"]["best"] == {"mae": 3.0, "step": 4}
    # the kept weights are step 4's, not the last step's
    saved = load_file(str(out / "netllm_modules.safetensors"))
    final = model.module_state_dict()
    assert any(not torch.equal(saved[k], final[k]) for k in saved)

    # resuming the finished run changes nothing either
    _, keeper, evaluated = _adapt(tiny_llama, out, scores, resume=True)
    assert evaluated == [] and keeper.best == {"mae": 3.0, "step": 4}
    assert {name: (out / name).read_bytes() for name in files} == kept

    # a better score after the resume does replace it
    _, keeper, _ = _adapt(tiny_llama, tmp_path / "other", {**scores, 2: 9.0, 4: 8.0}, stop_after=5)
    _, keeper, _ = _adapt(tiny_llama, tmp_path / "other", {**scores, 2: 9.0, 4: 8.0}, resume=True)
    assert keeper.best == {"mae": 4.0, "step": 6}
    config = _strict_json((tmp_path / "other" / "adapter_config.json").read_text())
    assert config["extra"]["best"] == {"mae": 4.0, "step": 6}


def test_merged_lora_is_the_same_function_and_cannot_be_saved(tiny_llama, tmp_path):
    """Inference folds LoRA into the frozen weights: same outputs, fewer matmuls."""
    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_adapter(tmp_path / "a")
    x = {"history": torch.randn(3, 10, 3), "speed": torch.randn(3, 1, 2)}
    with torch.no_grad():
        before = model(x)["future"]
        merged = NetLLM.from_adapter(tmp_path / "a", merge=True)
        after = merged(x)["future"]
    assert merged.backbone.merged
    assert not torch.equal(before, torch.zeros_like(before))
    assert torch.allclose(before, after, atol=1e-5)
    with pytest.raises(NetLLMError, match="merged"):
        merged.save_adapter(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bf16_inference_folds_lora_in_float32_then_casts(tiny_llama, tmp_path):
    """``eval --dtype bf16``: an inference-only model loaded under inference_precision
    has bf16 weights equal to the float32 merged weights rounded once, answers close to
    float32, and a training load (no merge) is not touched by the setting."""
    from netllm.backbone import inference_precision

    model = NetLLM(vp_like_config(tiny_llama), device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_adapter(tmp_path / "a")
    x = {"history": torch.randn(3, 10, 3), "speed": torch.randn(3, 1, 2)}
    full = NetLLM.from_adapter(tmp_path / "a", merge=True)
    with inference_precision("bf16"):
        half = NetLLM.from_adapter(tmp_path / "a", merge=True)
        trainable = NetLLM.from_adapter(tmp_path / "a")
    assert full.backbone.dtype == torch.float32 and half.backbone.dtype == torch.bfloat16
    assert trainable.backbone.dtype == torch.float32 and not trainable.backbone.merged
    weights = dict(full.backbone.llm.named_parameters())
    for name, p in half.backbone.llm.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, weights[name].to(torch.bfloat16)), name
    with torch.no_grad():
        a, b = full(x)["future"], half(x)["future"]
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())
    with pytest.raises(NetLLMError, match="--dtype: 'fp16'"):
        with inference_precision("fp16"):
            pass
