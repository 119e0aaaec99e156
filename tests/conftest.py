"""Shared fixtures: tiny randomly initialised LLMs saved as Hugging Face folders, the
real data root (or a visible skip), and an isolated user cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()


def _save_tiny(folder: Path, family: str) -> Path:
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=2))
    elif family in ("qwen2", "mistral"):
        config_cls, model_cls = ((Qwen2Config, Qwen2ForCausalLM) if family == "qwen2"
                                 else (MistralConfig, MistralForCausalLM))
        model = model_cls(config_cls(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=2))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                                           bos_token_id=1, eos_token_id=2))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                         num_attention_heads=4, word_embed_proj_dim=64,
                                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=2))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-layer, 64-wide Llama with random weights, as a local model folder."""
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {f: str(_save_tiny(tmp_path_factory.mktemp(f"tiny-{f}"), f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def real_data() -> Path:
    """$NETLLM_DATA (or ../shared/data); skipped with a visible reason when absent."""
    root = Path(os.environ.get("NETLLM_DATA") or SHARED_DATA)  # an empty value counts as unset
    if not (root / "MANIFEST.sha256").is_file():
        pytest.skip(f"real data not found (set NETLLM_DATA; looked in {root})")
    return root
