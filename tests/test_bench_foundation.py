"""``netllm bench foundation``'s training measurement: FLOPs counted, utilisation, precision."""

from __future__ import annotations

import pytest
import torch

from netllm.utils import NetLLMError


def _dense_flops(llm: str, tokens: int) -> int:
    """4 FLOPs per frozen decoder weight and token (2 forward, 2 for the input gradient;
    frozen weights get no weight gradient), less the input gradient of layer 0's q, k, v:
    their input (the embeddings) needs none. The unused LM head does not count."""
    from netllm.backbone import load_backbone

    bb = load_backbone(llm, lora=None, device="cpu")
    linear = {n: m.weight.numel() for n, m in bb.named_modules() if isinstance(m, torch.nn.Linear)}
    decoder = sum(v for n, v in linear.items() if ".layers." in n)
    first_qkv = sum(v for n, v in linear.items() if ".layers.0.self_attn." in n and n[-6:] in ("q_proj", "k_proj",
                                                                                            "v_proj"))
    return tokens * (4 * decoder - 2 * first_qkv)


def _attention_flops(llm: str, batch: int, tokens: int) -> int:
    """Q K^T and P V, 2 B L^2 (heads x head size) FLOPs each forward, twice that backward,
    per layer (the causal mask is not exploited)."""
    from netllm.backbone import load_backbone

    c = load_backbone(llm, lora=None, device="cpu").config
    width = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers * 3 * 2 * 2 * batch * tokens * tokens * width


def test_train_step_counts_the_flops_a_lora_step_executes(tiny_llama):
    from netllm.bench import measure_train_step

    batch, tokens = 2, 16
    r = measure_train_step(tiny_llama, "cpu", None, repeats=1, batch=batch, tokens=tokens, rank=1, peak=2.0)
    # on top of the dense products and attention: the rank-1 LoRA products, a few per cent
    ratio = r["flops_per_step"] / (_dense_flops(tiny_llama, batch * tokens) + _attention_flops(tiny_llama, batch,
                                                                                                  tokens))
    assert 1.0 < ratio < 1.05, ratio
    assert 3.8 < r["flops_per_token_per_weight"] < 4.4  # per frozen non-embedding weight
    assert r["tokens_per_s"] == pytest.approx(batch * tokens / r["step_s"])
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 2.0)
    assert measure_train_step(tiny_llama, "cpu", 2, repeats=1, batch=1, tokens=8)["mfu"] is None  # no peak


def test_train_step_counts_attention(tiny_llama):
    """Same tokens per step, longer sequences: the dense products are equal, attention's
    grow with the sequence; the counter must see them (CPU sdpa kernels it does not count,
    so the count runs with eager attention), and the backbone keeps its own attention."""
    from netllm.backbone import load_backbone
    from netllm.bench import measure_train_step

    short = measure_train_step(tiny_llama, "cpu", None, repeats=1, batch=4, tokens=8, rank=1)
    long = measure_train_step(tiny_llama, "cpu", None, repeats=1, batch=1, tokens=32, rank=1)
    assert long["flops_per_step"] > short["flops_per_step"] * 1.01, (long, short)
    own = load_backbone(tiny_llama, device="cpu").config._attn_implementation
    assert own != "eager" and short["attention"] == long["attention"] == own


def test_peak_is_known_only_for_bf16_on_a_named_gpu():
    from netllm.bench import PEAK_TFLOPS, peak_tflops

    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert dict(PEAK_TFLOPS)["H200"] == pytest.approx(989.4)


def test_bf16_on_a_cpu_without_native_bf16_is_refused_before_anything_is_written(tiny_llama, tmp_path,
                                                                                  monkeypatch):
    import netllm.backbone
    from netllm.bench import run_foundation_bench
    from netllm.recipe import training_precision

    monkeypatch.setattr(netllm.backbone, "native_bf16", lambda dev: False)
    with pytest.raises(NetLLMError, match="--dtype bf16: .*this cpu has none"):
        run_foundation_bench(llm=tiny_llama, device="cpu", out=tmp_path / "b", dtype="bf16")
    assert not (tmp_path / "b").exists()
    assert training_precision("auto", torch.device("cpu")) == "no"
    monkeypatch.setattr(netllm.backbone, "native_bf16", lambda dev: True)  # a CPU with AMX
    assert training_precision("bf16", torch.device("cpu")) == "bf16"
    assert training_precision("auto", torch.device("cpu")) == "no"  # fp32 stays the CPU default
