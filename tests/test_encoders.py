"""Modality encoders: shapes, shared LayerNorm, frozen ViT, input validation, gradient flow."""

from __future__ import annotations

import pytest
import torch

from netllm.encoders import (
    EncoderSpec,
    ImageEncoder,
    ModalityEncoders,
    ScalarEncoder,
    SeriesEncoder,
    build_encoder,
)
from netllm.utils import NetLLMError

HIDDEN = 48


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit_config():
    from transformers import ViTConfig

    return ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )


def abr_like_specs() -> list[EncoderSpec]:
    return [
        EncoderSpec("buffer_s", "scalar", in_dim=1, embed_dim=16),
        EncoderSpec("throughput_mbps", "series", length=8, embed_dim=16),
        EncoderSpec("angles", "series", in_dim=3, length=5, embed_dim=16, kernel_size=2),
    ]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (2, 3, 5)])
def test_scalar_and_series_keep_leading_dims(lead: tuple[int, ...]) -> None:
    scalar = ScalarEncoder(in_dim=3, embed_dim=16)
    assert scalar(torch.randn(*lead, 3)).shape == (*lead, 16)
    vector = SeriesEncoder(in_dim=1, length=6, embed_dim=16)
    assert vector(torch.randn(*lead, 6)).shape == (*lead, 16)
    multi = SeriesEncoder(in_dim=3, length=10, embed_dim=16, kernel_size=4)
    assert multi(torch.randn(*lead, 3, 10)).shape == (*lead, 16)


def test_series_leading_dims_do_not_mix_samples() -> None:
    enc = SeriesEncoder(in_dim=2, length=7, embed_dim=8)
    x = torch.randn(3, 4, 2, 7)
    batched = enc(x)
    one = enc(x[1, 2])
    torch.testing.assert_close(batched[1, 2], one)


def test_short_series_fits_kernel_to_length() -> None:
    spec = EncoderSpec("next_chunk_bytes", "series", length=3)
    enc = build_encoder(spec)
    assert enc.conv.kernel_size == (3,)
    assert enc(torch.randn(5, 3)).shape == (5, 128)


def test_modality_encoders_output_hidden_size() -> None:
    enc = ModalityEncoders(abr_like_specs(), HIDDEN)
    out = enc.encode_all(
        {"buffer_s": torch.randn(2, 20, 1), "throughput_mbps": torch.randn(2, 20, 8),
         "angles": torch.randn(7, 3, 5)}
    )
    assert out["buffer_s"].shape == (2, 20, HIDDEN)
    assert out["throughput_mbps"].shape == (2, 20, HIDDEN)
    assert out["angles"].shape == (7, HIDDEN)
    with pytest.raises(NetLLMError, match="unknown"):
        enc("nope", torch.randn(1))


def test_layernorm_is_one_shared_module() -> None:
    enc = ModalityEncoders(abr_like_specs(), HIDDEN)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 and norms[0] is enc.norm
    params = list(enc.parameters())
    assert sum(p is enc.norm.weight for p in params) == 1
    # Changing the one LayerNorm changes every modality's output the same way:
    # with weight=2, bias=3 each token has mean 3 and (biased) std 2.
    with torch.no_grad():
        enc.norm.weight.fill_(2.0)
        enc.norm.bias.fill_(3.0)
    outs = [
        enc("buffer_s", torch.randn(4, 1)),
        enc("throughput_mbps", torch.randn(4, 8)),
        enc("angles", torch.randn(4, 3, 5)),
    ]
    for out in outs:
        assert out.shape[-1] == HIDDEN
        torch.testing.assert_close(out.mean(-1), torch.full(out.shape[:-1], 3.0), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(-1, unbiased=False), torch.full(out.shape[:-1], 2.0), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- image


def test_image_encoder_frozen_vit() -> None:
    enc = ImageEncoder(tiny_vit_config(), embed_dim=16)
    images = torch.rand(2, 3, 3, 32, 32)
    out = enc(images)
    assert out.shape == (2, 3, 16)

    vit_params = list(enc.vision.parameters())
    assert vit_params and all(not p.requires_grad for p in vit_params)
    out.sum().backward()
    assert all(p.grad is None for p in vit_params)
    assert enc.fc.weight.grad is not None and enc.fc.weight.grad.abs().sum() > 0

    parent = torch.nn.Sequential(enc)
    parent.train()
    assert enc.training and not enc.vision.training
    assert all(not m.training for m in enc.vision.modules())

    with pytest.raises(NetLLMError, match="image"):
        enc(torch.rand(2, 3, 16, 16))


def test_image_modality_in_modality_encoders() -> None:
    specs = [EncoderSpec("frame", "image", vision=tiny_vit_config(), embed_dim=16),
             EncoderSpec("angles", "series", length=3, embed_dim=16)]
    enc = ModalityEncoders(specs, HIDDEN)
    out = enc.encode_all({"frame": torch.rand(4, 3, 32, 32), "angles": torch.randn(4, 3)})
    assert out["frame"].shape == (4, HIDDEN) and out["angles"].shape == (4, HIDDEN)
    frozen = enc.encoders["frame"].vision  # type: ignore[union-attr]
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("encoders.frame.vision.") for n in trainable)
    assert all(not p.requires_grad for p in frozen.parameters())


def test_image_encoder_accepts_built_module() -> None:
    from transformers import ViTModel

    vit = ViTModel(tiny_vit_config(), add_pooling_layer=False)   # CLS token path
    enc = ImageEncoder(vit, embed_dim=8)
    assert enc(torch.rand(5, 3, 32, 32)).shape == (5, 8)


# ----------------------------------------------------------------------------- validation


def test_specs_validate() -> None:
    with pytest.raises(NetLLMError, match="length"):
        EncoderSpec("x", "series")
    with pytest.raises(NetLLMError, match="kernel_size"):
        EncoderSpec("x", "series", length=3, kernel_size=5)
    with pytest.raises(NetLLMError, match="kind"):
        EncoderSpec("x", "graph")  # type: ignore[arg-type]  # no task uses a graph encoder
    with pytest.raises(NetLLMError, match="vision"):
        EncoderSpec("x", "image")
    with pytest.raises(NetLLMError, match="kind"):
        EncoderSpec("x", "audio")  # type: ignore[arg-type]
    with pytest.raises(NetLLMError, match="unique"):
        ModalityEncoders([EncoderSpec("a", "scalar"), EncoderSpec("a", "scalar")], HIDDEN)


def test_encoders_reject_wrong_trailing_shape_and_nan() -> None:
    enc = ModalityEncoders(abr_like_specs(), HIDDEN)
    with pytest.raises(NetLLMError, match="throughput_mbps"):
        enc("throughput_mbps", torch.randn(4, 7))
    with pytest.raises(NetLLMError, match="angles"):
        enc("angles", torch.randn(4, 5, 3))
    with pytest.raises(NetLLMError, match="buffer_s"):
        enc("buffer_s", torch.randn(4, 2))
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    with pytest.raises(NetLLMError, match="NaN"):
        enc("throughput_mbps", x)
    with pytest.raises(NetLLMError, match="NaN"):
        enc("buffer_s", torch.tensor([[float("nan")]]))


def test_gradients_reach_every_trainable_parameter() -> None:
    specs = abr_like_specs() + [EncoderSpec("frame", "image", vision=tiny_vit_config(), embed_dim=16)]
    enc = ModalityEncoders(specs, HIDDEN)
    outs = enc.encode_all(
        {"buffer_s": torch.randn(3, 1), "throughput_mbps": torch.randn(3, 8),
         "angles": torch.randn(3, 3, 5), "frame": torch.rand(3, 3, 32, 32)}
    )
    loss = sum((o * torch.randn_like(o)).sum() for o in outs.values())
    loss.backward()
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert len(trainable) > 10
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
