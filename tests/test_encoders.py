"""Modality encoders: shapes, shared LayerNorm, graph batching and message direction,
frozen ViT, input validation, gradient flow."""

from __future__ import annotations

import pytest
import torch

from netllm.encoders import (
    EncoderSpec,
    GraphEncoder,
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
        EncoderSpec("dags", "graph", node_dim=5, embed_dim=16, rounds=4),
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
    with pytest.raises(NetLLMError, match="graph"):
        enc.encode_all({"dags": torch.randn(3, 5)})
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
    g = enc("dags", torch.randn(3, 5), edge_index=torch.tensor([[0, 0], [1, 2]]),
            graph_index=torch.zeros(3, dtype=torch.long), num_graphs=1)
    outs += [g.node_embeddings, g.graph_embeddings, g.global_embedding.unsqueeze(0)]
    for out in outs:
        assert out.shape[-1] == HIDDEN
        torch.testing.assert_close(out.mean(-1), torch.full(out.shape[:-1], 3.0), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(-1, unbiased=False), torch.full(out.shape[:-1], 2.0), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- graph


def _three_graphs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(node_features, edge_index) of graphs with 1, 4 (no edges) and 7 nodes."""
    g1 = (torch.randn(1, 5), torch.zeros(2, 0, dtype=torch.long))
    g2 = (torch.randn(4, 5), torch.zeros(2, 0, dtype=torch.long))
    g3 = (torch.randn(7, 5), torch.tensor([[0, 0, 1, 2, 2, 3, 4], [1, 2, 3, 3, 4, 5, 6]]))
    return [g1, g2, g3]


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_graph_batching_equals_one_by_one(pooling: str) -> None:
    enc = GraphEncoder(node_dim=5, embed_dim=16, rounds=4, pooling=pooling)  # type: ignore[arg-type]
    graphs = _three_graphs()
    feats, edges, gidx, offset = [], [], [], 0
    for i, (x, e) in enumerate(graphs):
        feats.append(x)
        edges.append(e + offset)
        gidx.append(torch.full((x.shape[0],), i))
        offset += x.shape[0]
    batched = enc(torch.cat(feats), torch.cat(edges, 1), torch.cat(gidx), num_graphs=3)
    assert batched.node_embeddings.shape == (12, 16)
    assert batched.graph_embeddings.shape == (3, 16)
    assert batched.global_embedding.shape == (16,)

    offset = 0
    for i, (x, e) in enumerate(graphs):
        alone = enc(x, e, torch.zeros(x.shape[0], dtype=torch.long), num_graphs=1)
        n = x.shape[0]
        torch.testing.assert_close(batched.node_embeddings[offset : offset + n], alone.node_embeddings)
        torch.testing.assert_close(batched.graph_embeddings[i], alone.graph_embeddings[0])
        offset += n


def test_graph_global_per_state_with_batch_index() -> None:
    enc = GraphEncoder(node_dim=5, embed_dim=16, rounds=3)
    graphs = _three_graphs()
    x = torch.cat([g[0] for g in graphs])
    edges = torch.cat([graphs[0][1], graphs[1][1] + 1, graphs[2][1] + 5], 1)
    gidx = torch.tensor([0] + [1] * 4 + [2] * 7)
    out = enc(x, edges, gidx, num_graphs=3, batch_index=torch.tensor([0, 1, 1]))
    assert out.global_embedding.shape == (2, 16)
    # state 0 holds graph 0 only: same global summary as encoding graph 0 alone
    alone = enc(graphs[0][0], graphs[0][1], torch.zeros(1, dtype=torch.long), num_graphs=1)
    torch.testing.assert_close(out.global_embedding[0], alone.global_embedding)


def test_graph_messages_flow_from_children_to_parents() -> None:
    enc = GraphEncoder(node_dim=5, embed_dim=16, rounds=4)
    chain = torch.tensor([[0, 1, 2], [1, 2, 3]])        # 0 -> 1 -> 2 -> 3; node 3 is the leaf
    gidx = torch.zeros(4, dtype=torch.long)
    x = torch.randn(4, 5)
    base = enc(x, chain, gidx, 1).node_embeddings

    leaf_changed = x.clone()
    leaf_changed[3] += 1.0
    out = enc(leaf_changed, chain, gidx, 1).node_embeddings
    for ancestor in (0, 1, 2):   # 3 hops to the root, within 4 rounds
        assert not torch.allclose(out[ancestor], base[ancestor])

    root_changed = x.clone()
    root_changed[0] += 1.0
    out = enc(root_changed, chain, gidx, 1).node_embeddings
    assert not torch.allclose(out[0], base[0])
    torch.testing.assert_close(out[1:], base[1:])     # descendants never see their parents


def test_graph_single_node_without_edges() -> None:
    enc = GraphEncoder(node_dim=5, embed_dim=8, rounds=2)
    out = enc(torch.randn(1, 5), torch.zeros(2, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long), 1)
    assert out.node_embeddings.shape == (1, 8) and torch.isfinite(out.global_embedding).all()


def test_graph_input_validation() -> None:
    enc = GraphEncoder(node_dim=5, embed_dim=8)
    x, e, g = torch.randn(3, 5), torch.tensor([[0], [1]]), torch.zeros(3, dtype=torch.long)
    with pytest.raises(NetLLMError, match="node_features"):
        enc(torch.randn(3, 4), e, g, 1)
    with pytest.raises(NetLLMError, match="edge_index"):
        enc(x, torch.tensor([[0], [3]]), g, 1)
    with pytest.raises(NetLLMError, match="edge_index"):
        enc(x, torch.tensor([0, 1]), g, 1)
    with pytest.raises(NetLLMError, match="graph_index"):
        enc(x, e, torch.tensor([0, 0, 2]), 2)
    with pytest.raises(NetLLMError, match="different graphs"):
        enc(x, e, torch.tensor([0, 1, 1]), 2)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NetLLMError, match="NaN"):
        enc(bad, e, g, 1)


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
    with pytest.raises(NetLLMError, match="node_dim"):
        EncoderSpec("x", "graph")
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
    g = enc("dags", torch.randn(6, 5), edge_index=torch.tensor([[0, 1, 3], [1, 2, 4]]),
            graph_index=torch.tensor([0, 0, 0, 1, 1, 1]), num_graphs=2, batch_index=torch.tensor([0, 1]))
    loss = sum((o * torch.randn_like(o)).sum() for o in outs.values())
    loss = loss + sum((t * torch.randn_like(t)).sum() for t in g)
    loss.backward()
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert len(trainable) > 10
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
