"""Backbone loading: HF folders of three families, truncation, LoRA, freezing, errors;
plus integration tests with the real SmolLM2 GGUF."""

from __future__ import annotations

import time

import pytest
import torch

from netllm.backbone import LoraSpec, load_backbone
from netllm.utils import NetLLMError


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_families_load_with_lora_and_truncation(tiny_models, family):
    bb = load_backbone(tiny_models[family], layers=2, lora=LoraSpec(rank=4, mlp=True), device="cpu")
    assert bb.num_layers == 2
    trainable, total = bb.parameter_counts()
    assert 0 < trainable < total
    # only LoRA matrices are trainable
    names = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    x = torch.randn(2, 5, bb.hidden_size)
    hidden, _ = bb(x, torch.ones(2, 5, dtype=torch.long))
    assert hidden.shape == (2, 5, bb.hidden_size)
    hidden.pow(2).mean().backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)


def test_mlp_lora_adds_targets(tiny_llama):
    attn = load_backbone(tiny_llama, lora=LoraSpec(rank=4), device="cpu").parameter_counts()[0]
    both = load_backbone(tiny_llama, lora=LoraSpec(rank=4, mlp=True), device="cpu").parameter_counts()[0]
    assert both > attn > 0


def test_no_lora_freezes_everything(tiny_llama):
    bb = load_backbone(tiny_llama, lora=None, device="cpu")
    assert bb.parameter_counts()[0] == 0


def test_truncation_keeps_the_first_layers(tiny_llama):
    full = load_backbone(tiny_llama, lora=None, device="cpu")
    cut = load_backbone(tiny_llama, layers=1, lora=None, device="cpu")
    w_full = full.llm.base_model.layers[0].self_attn.q_proj.weight
    w_cut = cut.llm.base_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w_full, w_cut)
    assert len(cut.llm.base_model.layers) == 1 and cut.config.num_hidden_layers == 1


def test_random_init_differs_and_is_seeded(tiny_llama):
    pre = load_backbone(tiny_llama, lora=None, device="cpu")
    r1 = load_backbone(tiny_llama, lora=None, device="cpu", pretrained=False, seed=3)
    r2 = load_backbone(tiny_llama, lora=None, device="cpu", pretrained=False, seed=3)
    w = lambda b: b.llm.base_model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert not torch.equal(w(pre), w(r1))
    assert torch.equal(w(r1), w(r2))


def test_left_padding_does_not_change_hidden_states(tiny_llama):
    bb = load_backbone(tiny_llama, lora=None, device="cpu")
    x = torch.randn(1, 4, bb.hidden_size)
    plain, _ = bb(x, torch.ones(1, 4, dtype=torch.long))
    padded_x = torch.cat([torch.zeros(1, 3, bb.hidden_size), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    padded, _ = bb(padded_x, mask)
    assert torch.allclose(plain, padded[:, 3:], atol=1e-5)


def test_errors_name_the_argument(tiny_llama, tmp_path):
    with pytest.raises(NetLLMError, match="--layers"):
        load_backbone(tiny_llama, layers=99, device="cpu")
    with pytest.raises(NetLLMError, match="--llm"):
        load_backbone(str(tmp_path / "missing.gguf"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NetLLMError, match="config.json"):
        load_backbone(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(NetLLMError, match="--rank"):
        LoraSpec(rank=-1)
    with pytest.raises(NetLLMError, match="--dtype"):
        load_backbone(tiny_llama, dtype="float8", device="cpu")


def test_unknown_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetLLMError, match="unknown model"):
        load_backbone("no-such-org/no-such-model-xyz", device="cpu")


@pytest.mark.integration
def test_smollm2_gguf_loads_says_paris_and_caches(tmp_path, monkeypatch):
    """The real default backbone: pretrained weights (Paris), dequantised cache reused."""
    monkeypatch.setenv("NETLLM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    bb = load_backbone("smollm2", lora=None, device="cpu")
    assert not bb.report.from_cache
    after_first = torch.rand(3)
    torch.manual_seed(0)
    load_backbone("smollm2", lora=None, device="cpu")
    # the slow first load and the cached load leave the caller's random stream alike
    assert torch.equal(torch.rand(3), after_first)
    assert bb.num_layers == 30 and bb.hidden_size == 576
    assert 130e6 < bb.parameter_counts()[1] < 140e6
    assert "Paris" in bb.greedy_continuation("The capital of France is")
    t0 = time.perf_counter()
    again = load_backbone("smollm2", layers=4, lora=LoraSpec(rank=8), device="cpu")
    assert again.report.from_cache
    assert time.perf_counter() - t0 < 15  # the slow path takes ~20 s; cached is ~1 s
    assert again.num_layers == 4
    w1 = bb.llm.base_model.layers[0].self_attn.q_proj.weight
    w2 = again.llm.get_base_model().base_model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(w1, w2)


def test_scratch_transformer_trains_in_full_and_roundtrips(tmp_path):
    """The no-LLM control: every weight trainable, saved and restored with the adapter."""
    import torch

    from netllm.encoders import EncoderSpec
    from netllm.heads import HeadSpec
    from netllm.model import NetLLM, NetLLMConfig

    bb = load_backbone("scratch", layers=2, lora=None, device="cpu")
    trainable, total = bb.parameter_counts()
    assert trainable == total and bb.num_layers == 2 and bb.hidden_size == 128
    config = NetLLMConfig(task="toy", llm="scratch", layers=2, lora=LoraSpec(rank=0),
                          encoders=[EncoderSpec("x", "scalar", in_dim=2)],
                          heads={"y": HeadSpec("regression", steps=1, dims=1)})
    model = NetLLM(config, device="cpu")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01)
    model.eval()
    x = {"x": torch.randn(2, 3, 2)}
    folder = model.save_adapter(tmp_path / "dt")
    loaded = NetLLM.from_adapter(folder, device="cpu")
    assert torch.equal(loaded(x)["y"], model(x)["y"])
