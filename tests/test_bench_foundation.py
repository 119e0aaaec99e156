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


def test_train_step_counts_the_flops_a_lora_step_executes(tiny_llama):
    from netllm.bench import measure_train_step

    batch, tokens = 2, 16
    r = measure_train_step(tiny_llama, "cpu", None, repeats=1, batch=batch, tokens=tokens, rank=1, peak=2.0)
    # on top of the dense products: attention and the rank-1 LoRA products, a few per cent at 16 tokens
    ratio = r["flops_per_step"] / _dense_flops(tiny_llama, batch * tokens)
    assert 1.0 < ratio < 1.1, ratio
    assert 3.8 < r["flops_per_token_per_weight"] < 4.4  # per frozen non-embedding weight
    assert r["tokens_per_s"] == pytest.approx(batch * tokens / r["step_s"])
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 2.0)
    assert measure_train_step(tiny_llama, "cpu", 2, repeats=1, batch=1, tokens=8)["mfu"] is None  # no peak


def test_peak_is_known_only_for_bf16_on_a_named_gpu():
    from netllm.bench import PEAK_TFLOPS, peak_tflops

    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert dict(PEAK_TFLOPS)["H200"] == pytest.approx(989.4)


def test_bf16_on_a_cpu_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    from netllm.bench import run_foundation_bench

    with pytest.raises(NetLLMError, match="--dtype bf16"):
        run_foundation_bench(llm=tiny_llama, device="cpu", out=tmp_path / "b", dtype="bf16")
    assert not (tmp_path / "b").exists()
