"""The model core: encoders -> LLM -> heads, batched with padding; the adapter folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import NetLLM, NetLLMConfig, last_token_hidden
from netllm.utils import NetLLMError


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
