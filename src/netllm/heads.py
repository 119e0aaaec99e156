"""Networking heads: LLM hidden states -> a VALID task answer, in one forward pass.

They replace the language-model head, so no text is generated or parsed:

    regression  (..., hidden) -> (..., steps, dims)   all future viewports at once (VP)
    categorical (..., hidden) -> (..., num_classes)   logits over bitrate levels (ABR),
                                                      executor limits (CJS)
    candidates  (..., hidden) + (..., M, cand_dim) -> (..., M)
                                                      a score per runnable stage (CJS);
                                                      invalid candidates get ~zero probability
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from netllm.utils import NetLLMError

HeadKind = Literal["regression", "categorical", "candidates"]
HEAD_KINDS: tuple[str, ...] = ("regression", "categorical", "candidates")
REGRESSION_DECODERS: tuple[str, ...] = ("mlp", "recurrent")


@dataclass(frozen=True)
class HeadSpec:
    """The answer a task wants, e.g. ``HeadSpec("regression", steps=20, dims=3)``.

    regression: ``steps`` x ``dims`` values; categorical: ``num_classes`` logits;
    candidates: one score per candidate of width ``candidate_dim``.
    ``hidden_layers`` / ``width`` shape the MLP (0 hidden layers = a single Linear).
    ``side_dim`` (regression only): the head also reads that many task features beside
    the hidden state, a skip path past the LLM (e.g. the last observed motion).
    ``decoder`` (regression only): ``mlp`` maps to all values at once; ``recurrent`` unrolls
    a small LSTM cell from that input, one step per future step, each step's output added
    to the previous value (a trajectory decoder; still ONE LLM pass).
    """

    kind: HeadKind
    steps: int = 1
    dims: int = 1
    num_classes: int | None = None
    candidate_dim: int | None = None
    hidden_layers: int = 1
    width: int = 256
    side_dim: int = 0
    decoder: str = "mlp"

    def __post_init__(self) -> None:
        where = f"head spec ({self.kind!r})"
        if self.kind not in HEAD_KINDS:
            raise NetLLMError(f"head spec: kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if not (isinstance(self.hidden_layers, int) and self.hidden_layers >= 0):
            raise NetLLMError(f"{where}: hidden_layers must be an int >= 0, got {self.hidden_layers!r}")
        if not _is_pos_int(self.width):
            raise NetLLMError(f"{where}: width must be a positive int, got {self.width!r}")
        if self.kind == "regression":
            for field in ("steps", "dims"):
                if not _is_pos_int(getattr(self, field)):
                    raise NetLLMError(f"{where}: {field} must be a positive int, got {getattr(self, field)!r}")
        if not (isinstance(self.side_dim, int) and not isinstance(self.side_dim, bool) and self.side_dim >= 0):
            raise NetLLMError(f"{where}: side_dim must be an int >= 0, got {self.side_dim!r}")
        if self.side_dim and self.kind != "regression":
            raise NetLLMError(f"{where}: side_dim is for regression heads only")
        if self.decoder not in REGRESSION_DECODERS:
            raise NetLLMError(f"{where}: decoder must be one of {REGRESSION_DECODERS}, got {self.decoder!r}")
        if self.decoder != "mlp" and self.kind != "regression":
            raise NetLLMError(f"{where}: decoder {self.decoder!r} is for regression heads only")
        if self.kind == "categorical" and not (_is_pos_int(self.num_classes) and self.num_classes >= 2):
            raise NetLLMError(f"{where}: num_classes must be an int >= 2, got {self.num_classes!r}")
        if self.kind == "candidates" and not _is_pos_int(self.candidate_dim):
            raise NetLLMError(f"{where}: candidate_dim must be a positive int, got {self.candidate_dim!r}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _mlp(in_dim: int, out_dim: int, hidden_layers: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _check_hidden(hidden: Any, hidden_size: int, name: str) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise NetLLMError(f"{name}: expected hidden states of shape (..., {hidden_size}), got {got}")
    return hidden


def _check_mask(mask: Any, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise NetLLMError(f"{name}: mask must be a bool tensor (True = valid)")
    try:
        mask = mask.expand(shape)
    except RuntimeError:
        raise NetLLMError(f"{name}: mask of shape {tuple(mask.shape)} does not match scores {shape}") from None
    if not mask.any(-1).all():
        raise NetLLMError(f"{name}: a row has no valid candidate (mask all False)")
    return mask


def masked_fill_invalid(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set invalid (``mask`` False) logits to the dtype's most negative finite value.

    ``exp`` of it underflows to exactly 0, so a softmax over the result is exact over
    the valid entries and never NaN (unlike ``-inf`` in entropy terms ``p * log p``).
    """
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log_softmax`` over the valid entries only; invalid ones get ~``finfo.min``.

    Raises ``NetLLMError`` if some row has no valid entry.
    """
    if mask.dtype != torch.bool:
        raise NetLLMError("masked_log_softmax: mask must be a bool tensor (True = valid)")
    mask = mask.expand_as(logits)
    if not mask.any(dim).all():
        raise NetLLMError("masked_log_softmax: a row has no valid entry (mask all False)")
    return torch.log_softmax(masked_fill_invalid(logits, mask), dim=dim)


class RegressionHead(nn.Module):
    """All ``steps`` future values of ``dims`` each, from ONE LLM pass (no autoregression).

    ``(..., hidden_size) [+ side (..., side_dim)] -> (..., steps, dims)``. With
    ``side_dim > 0`` the head reads ``concat(hidden, side)``: task features that skip the
    LLM, so the head sees the raw input at full precision beside the LLM's summary of it.
    ``decoder="mlp"``: one MLP maps that input to every value; ``"recurrent"``: an MLP maps
    it to the initial state of an LSTM cell, which is unrolled ``steps`` times, fed its
    previous value and adding its output to it (values start from 0). Either way
    ``output_layer`` is the last Linear: zeroed, the head predicts 0 everywhere.
    """

    def __init__(self, hidden_size: int, steps: int, dims: int, hidden_layers: int = 1, width: int = 256,
                 side_dim: int = 0, decoder: str = "mlp") -> None:
        super().__init__()
        self.hidden_size, self.steps, self.dims, self.side_dim = hidden_size, steps, dims, side_dim
        self.decoder = decoder
        if decoder == "mlp":
            self.mlp = _mlp(hidden_size + side_dim, steps * dims, hidden_layers, width)
        elif decoder == "recurrent":
            self.init = _mlp(hidden_size + side_dim, 2 * width, hidden_layers, width)
            self.cell = nn.LSTMCell(dims, width)
            self.step_out = nn.Linear(width, dims)
        else:
            raise NetLLMError(f"RegressionHead: decoder must be one of {REGRESSION_DECODERS}, got {decoder!r}")

    @property
    def output_layer(self) -> nn.Linear:
        return self.mlp[-1] if self.decoder == "mlp" else self.step_out

    def forward(self, hidden: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        hidden = _check_hidden(hidden, self.hidden_size, "RegressionHead")
        dtype = self.output_layer.weight.dtype
        x = hidden.to(dtype)
        if self.side_dim:
            if not isinstance(side, torch.Tensor) or tuple(side.shape) != (*hidden.shape[:-1], self.side_dim):
                got = tuple(side.shape) if isinstance(side, torch.Tensor) else type(side).__name__
                raise NetLLMError(f"RegressionHead: expected side features of shape "
                                  f"{(*hidden.shape[:-1], self.side_dim)}, got {got}")
            x = torch.cat([x, side.to(device=x.device, dtype=dtype)], dim=-1)
        elif side is not None:
            raise NetLLMError("RegressionHead: side features given to a head built without side_dim")
        if self.decoder == "mlp":
            out = self.mlp(x)
            return out.reshape(*hidden.shape[:-1], self.steps, self.dims)
        flat = x.reshape(-1, x.shape[-1])
        h, c = self.init(flat).chunk(2, dim=-1)
        h = torch.tanh(h)
        value = flat.new_zeros(flat.shape[0], self.dims)
        outs = []
        for _ in range(self.steps):
            h, c = self.cell(value, (h, c))
            value = value + self.step_out(h)
            outs.append(value)
        return torch.stack(outs, dim=1).reshape(*hidden.shape[:-1], self.steps, self.dims)


class CategoricalHead(nn.Module):
    """Logits over a fixed set of actions (bitrate levels, executor limits).

    ``(..., hidden_size) -> (..., num_classes)``; an optional bool ``mask`` (True = allowed)
    pushes disallowed classes to ~zero probability.
    """

    def __init__(self, hidden_size: int, num_classes: int, hidden_layers: int = 1, width: int = 256) -> None:
        super().__init__()
        self.hidden_size, self.num_classes = hidden_size, num_classes
        self.mlp = _mlp(hidden_size, num_classes, hidden_layers, width)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = _check_hidden(hidden, self.hidden_size, "CategoricalHead")
        logits = self.mlp(hidden.to(self.mlp[0].weight.dtype))
        if mask is not None:
            logits = masked_fill_invalid(logits, _check_mask(mask, tuple(logits.shape), "CategoricalHead"))
        return logits


class CandidateScoreHead(nn.Module):
    """A score per candidate of a variable-size set (e.g. the runnable stages of a CJS event).

    ``score_m = MLP(concat(hidden, candidate_m))``, computed as ``W_h hidden + W_c candidate_m``
    for the first layer (the same function, without materialising the concatenation).
    hidden ``(..., hidden_size)``, candidates ``(..., M, candidate_dim)``, mask ``(..., M)``
    bool (True = valid) -> scores ``(..., M)``; invalid candidates get ``finfo.min``.
    Permuting the candidates permutes the scores.
    """

    def __init__(self, hidden_size: int, candidate_dim: int, hidden_layers: int = 1, width: int = 256) -> None:
        super().__init__()
        self.hidden_size, self.candidate_dim = hidden_size, candidate_dim
        first = width if hidden_layers > 0 else 1
        self.hidden_in = nn.Linear(hidden_size, first)
        self.candidate_in = nn.Linear(candidate_dim, first, bias=False)
        self.rest = (
            nn.Sequential(nn.GELU(), _mlp(width, 1, hidden_layers - 1, width)) if hidden_layers > 0 else nn.Identity()
        )

    def forward(
        self, hidden: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = _check_hidden(hidden, self.hidden_size, "CandidateScoreHead")
        if (
            not isinstance(candidates, torch.Tensor)
            or candidates.dim() < 2
            or candidates.shape[-1] != self.candidate_dim
        ):
            got = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
            raise NetLLMError(
                f"CandidateScoreHead: expected candidates of shape (..., M, {self.candidate_dim}), got {got}"
            )
        try:
            lead = torch.broadcast_shapes(hidden.shape[:-1], candidates.shape[:-2])
        except RuntimeError:
            raise NetLLMError(
                f"CandidateScoreHead: hidden {tuple(hidden.shape)} and candidates "
                f"{tuple(candidates.shape)} have incompatible batch dimensions"
            ) from None
        dtype = self.hidden_in.weight.dtype
        h = self.hidden_in(hidden.to(dtype)).unsqueeze(-2)            # (..., 1, W)
        c = self.candidate_in(candidates.to(dtype))                   # (..., M, W)
        scores = self.rest(h + c).squeeze(-1)                         # (..., M)
        if mask is not None:
            mask = _check_mask(mask, (*lead, candidates.shape[-2]), "CandidateScoreHead")
            scores = masked_fill_invalid(scores, mask)
        return scores


def build_head(spec: HeadSpec, hidden_size: int) -> nn.Module:
    """The head for one spec, reading LLM hidden states of width ``hidden_size``."""
    if spec.kind == "regression":
        return RegressionHead(hidden_size, spec.steps, spec.dims, spec.hidden_layers, spec.width, spec.side_dim,
                              spec.decoder)
    if spec.kind == "categorical":
        assert spec.num_classes is not None
        return CategoricalHead(hidden_size, spec.num_classes, spec.hidden_layers, spec.width)
    if spec.kind == "candidates":
        assert spec.candidate_dim is not None
        return CandidateScoreHead(hidden_size, spec.candidate_dim, spec.hidden_layers, spec.width)
    raise NetLLMError(f"head spec: unknown kind {spec.kind!r}")


def stable_argmax(logits: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Arg-max over the last dimension, where values within ``rtol * max(1, |max|)`` of the
    maximum count as tied and the first of them wins.

    A plain arg-max between two (nearly) identical candidates follows the last bit of the
    logits, which differs between a batch of one and a batch of many, or between library
    versions; a decision taken this way does not."""
    top = logits.max(-1, keepdim=True).values
    tied = logits >= top - rtol * top.abs().clamp(min=1.0)
    return tied.to(torch.uint8).argmax(-1)  # the first True


__all__ = [
    "HeadSpec",
    "RegressionHead",
    "CategoricalHead",
    "CandidateScoreHead",
    "masked_log_softmax",
    "masked_fill_invalid",
    "stable_argmax",
    "build_head",
]
