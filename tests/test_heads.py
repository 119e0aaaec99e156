"""Networking heads: one-pass regression, logits, masked candidate scores."""

from __future__ import annotations

import pytest
import torch

from netllm.heads import (
    CandidateScoreHead,
    CategoricalHead,
    HeadSpec,
    RegressionHead,
    build_head,
    masked_log_softmax,
    stable_argmax,
)
from netllm.utils import NetLLMError

HIDDEN = 32


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_regression_head_predicts_all_steps_in_one_pass() -> None:
    head = RegressionHead(HIDDEN, steps=20, dims=3)
    calls = []
    head.mlp.register_forward_hook(lambda *_: calls.append(1))
    out = head(torch.randn(5, HIDDEN))
    assert out.shape == (5, 20, 3) and len(calls) == 1
    assert head(torch.randn(2, 4, HIDDEN)).shape == (2, 4, 20, 3)
    with pytest.raises(NetLLMError, match="hidden"):
        head(torch.randn(5, HIDDEN + 1))


def test_regression_head_side_features_skip_the_llm() -> None:
    head = build_head(HeadSpec("regression", steps=4, dims=3, side_dim=6), HIDDEN)
    hidden, side = torch.randn(5, HIDDEN), torch.randn(5, 6)
    out = head(hidden, side)
    assert out.shape == (5, 4, 3)
    # the MLP reads concat(hidden, side): the side features change the answer, the same inputs do not
    assert not torch.allclose(out, head(hidden, side + 1.0))
    assert torch.equal(out, head(hidden, side.clone()))
    assert head(torch.randn(2, 7, HIDDEN), torch.randn(2, 7, 6)).shape == (2, 7, 4, 3)
    with pytest.raises(NetLLMError, match=r"side features of shape \(5, 6\), got \(5, 5\)"):
        head(hidden, torch.randn(5, 5))
    with pytest.raises(NetLLMError, match="side features of shape"):
        head(hidden)
    with pytest.raises(NetLLMError, match="without side_dim"):
        RegressionHead(HIDDEN, 4, 3)(hidden, side)
    with pytest.raises(NetLLMError, match="side_dim must be an int >= 0"):
        HeadSpec("regression", side_dim=-1)
    with pytest.raises(NetLLMError, match="regression heads only"):
        HeadSpec("categorical", num_classes=3, side_dim=2)


def test_recurrent_regression_head_unrolls_a_trajectory() -> None:
    head = build_head(HeadSpec("regression", steps=5, dims=3, decoder="recurrent", width=16, side_dim=2), HIDDEN)
    torch.nn.init.zeros_(head.output_layer.weight)
    torch.nn.init.zeros_(head.output_layer.bias)
    assert torch.equal(head(torch.randn(4, HIDDEN), torch.randn(4, 2)), torch.zeros(4, 5, 3))  # zeroed output
    torch.nn.init.normal_(head.output_layer.weight, std=0.5)
    hidden, side = torch.randn(4, HIDDEN), torch.randn(4, 2)
    out = head(hidden, side)
    assert out.shape == (4, 5, 3)
    # by hand: the initial state from concat(hidden, side), each step fed its previous value and added to it
    h, c = head.init(torch.cat([hidden, side], -1)).chunk(2, -1)
    h, value, want = torch.tanh(h), torch.zeros(4, 3), []
    for _ in range(5):
        h, c = head.cell(value, (h, c))
        value = value + head.output_layer(h)
        want.append(value)
    assert torch.allclose(out, torch.stack(want, 1), atol=1e-6)
    assert head(torch.randn(2, 7, HIDDEN), torch.randn(2, 7, 2)).shape == (2, 7, 5, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(NetLLMError, match="decoder must be one of"):
        HeadSpec("regression", decoder="gru")
    with pytest.raises(NetLLMError, match="for regression heads only"):
        HeadSpec("categorical", num_classes=3, decoder="recurrent")


def test_categorical_head_logits_and_mask() -> None:
    head = CategoricalHead(HIDDEN, num_classes=6)
    h = torch.randn(4, 7, HIDDEN)
    assert head(h).shape == (4, 7, 6)
    allowed = torch.tensor([True, True, False, True, False, False])
    p = head(h, mask=allowed).softmax(-1)
    assert torch.all(p[..., ~allowed] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 7))


def _candidate_inputs(b: int = 3, m: int = 6, c: int = 10):
    hidden = torch.randn(b, HIDDEN)
    cands = torch.randn(b, m, c)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    mask[2, 1:] = False                    # a single valid candidate
    return hidden, cands, mask


def test_candidate_head_masks_invalid_and_normalises_valid() -> None:
    head = CandidateScoreHead(HIDDEN, candidate_dim=10)
    hidden, cands, mask = _candidate_inputs()
    scores = head(hidden, cands, mask)
    assert scores.shape == (3, 6) and torch.isfinite(scores).all()
    p = scores.softmax(-1)
    assert torch.all(p[~mask] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    assert p[2, 0] == 1.0
    # probabilities over the valid entries are exactly the unmasked softmax restricted to them
    raw = head(hidden, cands)
    row = raw[0, :4].softmax(-1)
    torch.testing.assert_close(p[0, :4], row)
    logp = masked_log_softmax(raw, mask)
    torch.testing.assert_close(logp[0, :4], row.log())
    assert torch.all(logp.exp()[~mask] == 0)
    assert torch.isfinite((logp.exp() * logp).sum(-1)).all()   # entropy stays finite


def test_candidate_head_is_permutation_equivariant() -> None:
    head = CandidateScoreHead(HIDDEN, candidate_dim=10)
    hidden, cands, mask = _candidate_inputs()
    perm = torch.randperm(6)
    scores = head(hidden, cands, mask)
    permuted = head(hidden, cands[:, perm], mask[:, perm])
    torch.testing.assert_close(permuted, scores[:, perm])


def test_candidate_head_equals_mlp_over_concatenation() -> None:
    head = CandidateScoreHead(HIDDEN, candidate_dim=10, hidden_layers=1, width=16)
    hidden, cands, _ = _candidate_inputs()
    w = torch.cat([head.hidden_in.weight, head.candidate_in.weight], 1)
    cat = torch.cat([hidden.unsqueeze(1).expand(-1, 6, -1), cands], -1)
    ref = head.rest(cat @ w.T + head.hidden_in.bias).squeeze(-1)
    torch.testing.assert_close(head(hidden, cands), ref)


def test_candidate_head_with_time_axis() -> None:
    head = CandidateScoreHead(HIDDEN, candidate_dim=4)
    out = head(torch.randn(2, 5, HIDDEN), torch.randn(2, 5, 7, 4), torch.ones(2, 5, 7, dtype=torch.bool))
    assert out.shape == (2, 5, 7)
    with pytest.raises(NetLLMError, match="incompatible"):
        head(torch.randn(2, 5, HIDDEN), torch.randn(3, 7, 4))


def test_candidate_head_rejects_row_without_valid_candidate() -> None:
    head = CandidateScoreHead(HIDDEN, candidate_dim=10)
    hidden, cands, mask = _candidate_inputs()
    mask[1] = False
    with pytest.raises(NetLLMError, match="no valid"):
        head(hidden, cands, mask)
    with pytest.raises(NetLLMError, match="no valid"):
        masked_log_softmax(torch.randn(3, 6), mask)
    with pytest.raises(NetLLMError, match="candidates"):
        head(hidden, torch.randn(3, 6, 9), mask)


def test_build_head_and_spec_validation() -> None:
    assert isinstance(build_head(HeadSpec("regression", steps=5, dims=3), HIDDEN), RegressionHead)
    assert isinstance(build_head(HeadSpec("categorical", num_classes=6), HIDDEN), CategoricalHead)
    head = build_head(HeadSpec("candidates", candidate_dim=8, hidden_layers=2, width=16), HIDDEN)
    assert isinstance(head, CandidateScoreHead)
    assert head(torch.randn(2, HIDDEN), torch.randn(2, 3, 8)).shape == (2, 3)
    with pytest.raises(NetLLMError, match="num_classes"):
        HeadSpec("categorical")
    with pytest.raises(NetLLMError, match="candidate_dim"):
        HeadSpec("candidates")
    with pytest.raises(NetLLMError, match="steps"):
        HeadSpec("regression", steps=0)
    with pytest.raises(NetLLMError, match="kind"):
        HeadSpec("text")  # type: ignore[arg-type]


def test_heads_get_gradients() -> None:
    heads = [
        RegressionHead(HIDDEN, 4, 3),
        CategoricalHead(HIDDEN, 6),
        CandidateScoreHead(HIDDEN, 10),
    ]
    h = torch.randn(3, HIDDEN, requires_grad=True)
    hidden, cands, mask = _candidate_inputs()
    loss = heads[0](h).pow(2).mean() + torch.nn.functional.cross_entropy(heads[1](h), torch.tensor([0, 2, 5]))
    logp = masked_log_softmax(heads[2](h, cands), mask)
    loss = loss - logp.gather(-1, torch.tensor([[0], [1], [0]])).sum()   # valid targets
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    for head in heads:
        for name, p in head.named_parameters():
            assert p.grad is not None and torch.any(p.grad != 0), name


def test_stable_argmax_breaks_near_ties_towards_the_first() -> None:
    """Two candidates one rounding step apart (as a batch of one and a batch of many may
    compute them) are a tie; a real gap is not; masked entries never win."""
    near = torch.tensor([[1.0, 35.193424, 35.193428, -5.0], [2.0, 35.193428, 35.193424, -5.0]])
    assert stable_argmax(near).tolist() == [1, 1]
    assert stable_argmax(torch.tensor([0.5, 0.4999, 0.2])).item() == 0
    assert stable_argmax(torch.tensor([0.4999, 0.5, 0.2])).item() == 1  # a gap of 1e-4 is a preference
    masked = torch.tensor([torch.finfo(torch.float32).min, -3.0, -3.0000001])
    assert stable_argmax(masked).item() == 1
