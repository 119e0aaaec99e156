"""Modality encoders: networking data -> one token-like embedding per item.

Every modality a task declares (an ``EncoderSpec``) gets a *feature encoder* that
turns raw networking data into an ``embed_dim`` feature, then a linear *projection*
to the LLM's hidden size; one LayerNorm, shared by all modalities of a model, is
applied last. The result is passed to the LLM as ``inputs_embeds``.

    scalar  Linear + ReLU                 (..., in_dim)            e.g. buffer_s, chunks_left
    series  Conv1d + ReLU -> Linear       (..., [in_dim,] length)  e.g. throughput_mbps history
    image   frozen pretrained ViT -> Linear  (..., C, H, W)        video frames

All encoders accept arbitrary leading batch dimensions (flattened, then restored),
and raise ``NetLLMError`` naming the modality on a wrong trailing shape or NaN input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from netllm.utils import NetLLMError

Kind = Literal["scalar", "series", "image"]
KINDS: tuple[str, ...] = ("scalar", "series", "image")


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EncoderSpec:
    """One input modality of a task, e.g. ``EncoderSpec("throughput_mbps", "series", length=8)``.

    Fields used per kind (others are ignored):
      scalar: ``in_dim`` (number of features)
      series: ``in_dim`` (channels; 1 means the input has no channel axis), ``length``,
              ``kernel_size`` (default ``min(4, length)``)
      image:  ``vision`` (a built ``nn.Module``, a transformers vision config, or a
              model id / local folder for ``AutoModel.from_pretrained``)
    ``embed_dim`` is the feature width before the projection to the LLM hidden size.
    """

    name: str
    kind: Kind
    in_dim: int = 1
    length: int | None = None
    embed_dim: int = 128
    kernel_size: int | None = None
    vision: Any = None

    def __post_init__(self) -> None:
        where = f"encoder spec {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise NetLLMError(f"encoder spec: name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise NetLLMError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if not _is_pos_int(self.embed_dim):
            raise NetLLMError(f"{where}: embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.kind in ("scalar", "series") and not _is_pos_int(self.in_dim):
            raise NetLLMError(f"{where}: in_dim must be a positive int, got {self.in_dim!r}")
        if self.kind == "series":
            if not _is_pos_int(self.length):
                raise NetLLMError(f"{where}: length must be a positive int, got {self.length!r}")
            k = self.kernel_size
            if k is not None and not (_is_pos_int(k) and k <= self.length):
                raise NetLLMError(
                    f"{where}: kernel_size must be an int in 1..length={self.length}, got {k!r}"
                )
        if self.kind == "image" and self.vision is None:
            raise NetLLMError(
                f"{where}: vision must be an nn.Module, a transformers config, or a model id/path"
            )


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_input(x: Any, name: str, trailing: tuple[int, ...], what: str) -> torch.Tensor:
    """Shape check always; NaN check for float tensors. ``what`` describes the layout."""
    if not isinstance(x, torch.Tensor):
        raise NetLLMError(f"input {name!r}: expected a torch.Tensor {what}, got {type(x).__name__}")
    n = len(trailing)
    if x.dim() < n or tuple(x.shape[x.dim() - n :]) != trailing:
        raise NetLLMError(
            f"input {name!r}: expected shape {what} = (..., {', '.join(map(str, trailing))}), "
            f"got {tuple(x.shape)}"
        )
    if x.is_floating_point() and torch.isnan(x).any():
        raise NetLLMError(f"input {name!r}: contains NaN")
    return x


# ----------------------------------------------------------------------------- scalar


class ScalarEncoder(nn.Module):
    """Scalars (buffer_s, last bitrate, chunks left...): Linear + ReLU.

    ``(..., in_dim) -> (..., embed_dim)``.
    """

    def __init__(self, in_dim: int, embed_dim: int = 128, name: str = "scalar") -> None:
        super().__init__()
        self.name, self.in_dim, self.embed_dim = name, in_dim, embed_dim
        self.fc = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, self.name, (self.in_dim,), "(..., in_dim)")
        return torch.relu(self.fc(x.to(self.fc.weight.dtype)))


# ----------------------------------------------------------------------------- series


class SeriesEncoder(nn.Module):
    """Time series or short vectors (throughput history, next chunk sizes, angles): a 1-D CNN.

    ``(..., length)`` when ``in_dim == 1``, else ``(..., in_dim, length)`` -> ``(..., embed_dim)``.
    Conv1d(in_dim -> embed_dim, kernel) + ReLU, flattened over time, Linear + ReLU.
    """

    def __init__(
        self,
        in_dim: int,
        length: int,
        embed_dim: int = 128,
        kernel_size: int | None = None,
        name: str = "series",
    ) -> None:
        super().__init__()
        kernel_size = kernel_size or min(4, length)
        if not 1 <= kernel_size <= length:
            raise NetLLMError(f"encoder {name!r}: kernel_size must be in 1..{length}, got {kernel_size}")
        self.name, self.in_dim, self.length, self.embed_dim = name, in_dim, length, embed_dim
        self.conv = nn.Conv1d(in_dim, embed_dim, kernel_size)
        self.fc = nn.Linear(embed_dim * (length - kernel_size + 1), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_dim == 1:
            x = _check_input(x, self.name, (self.length,), "(..., length)")
            lead = x.shape[:-1]
        else:
            x = _check_input(x, self.name, (self.in_dim, self.length), "(..., in_dim, length)")
            lead = x.shape[:-2]
        x = x.reshape(-1, self.in_dim, self.length).to(self.conv.weight.dtype)
        h = torch.relu(self.conv(x))                    # (N, embed_dim, length - k + 1)
        h = torch.relu(self.fc(h.flatten(1)))           # (N, embed_dim)
        return h.reshape(*lead, self.embed_dim)


# ----------------------------------------------------------------------------- image


def _build_vision(vision: Any, name: str) -> nn.Module:
    if isinstance(vision, nn.Module):
        return vision
    from transformers import AutoModel, PretrainedConfig

    if isinstance(vision, PretrainedConfig):
        return AutoModel.from_config(vision)
    if isinstance(vision, str):
        try:
            return AutoModel.from_pretrained(vision)
        except (OSError, ValueError) as err:
            raise NetLLMError(f"encoder {name!r}: cannot load vision model {vision!r}: {err}") from None
    raise NetLLMError(
        f"encoder {name!r}: vision must be an nn.Module, a transformers config or a model id/path, "
        f"got {type(vision).__name__}"
    )


class ImageEncoder(nn.Module):
    """A FROZEN pretrained vision transformer, then a trainable Linear + ReLU.

    ``(..., C, H, W) -> (..., embed_dim)``. The ViT's pooled output is used when it has
    one, else the CLS token of ``last_hidden_state``. The ViT stays in eval mode and
    gets no gradient, whatever ``.train()`` is called on the parent.
    """

    def __init__(
        self,
        vision: Any,
        embed_dim: int = 128,
        feature_dim: int | None = None,
        name: str = "image",
    ) -> None:
        super().__init__()
        self.name, self.embed_dim = name, embed_dim
        self.vision = _build_vision(vision, name)
        self.vision.requires_grad_(False)
        self.vision.eval()
        config = getattr(self.vision, "config", None)
        feature_dim = feature_dim or getattr(config, "hidden_size", None)
        if not feature_dim:
            raise NetLLMError(
                f"encoder {name!r}: cannot tell the vision model's feature size; pass feature_dim"
            )
        self.num_channels: int | None = getattr(config, "num_channels", None)
        size = getattr(config, "image_size", None)
        self.image_size: tuple[int, int] | None = (
            (size, size) if isinstance(size, int) else tuple(size) if size else None  # type: ignore[assignment]
        )
        self.fc = nn.Linear(feature_dim, embed_dim)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        self.vision.eval()
        return self

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels) if hasattr(self.vision, "config") else self.vision(pixels)
        if isinstance(out, torch.Tensor):
            return out if out.dim() == 2 else out[:, 0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled
        last = getattr(out, "last_hidden_state", None)
        if last is None and isinstance(out, (tuple, list)):
            last = out[0]
        if last is None:
            raise NetLLMError(f"encoder {self.name!r}: vision model returned no pooled or hidden state")
        return last[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 3:
            raise NetLLMError(
                f"input {self.name!r}: expected images of shape (..., C, H, W), got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        c, hgt, wid = images.shape[-3:]
        expected = (self.num_channels or c, *(self.image_size or (hgt, wid)))
        _check_input(images, self.name, expected, "(..., C, H, W)")
        lead = images.shape[:-3]
        param = next(self.vision.parameters(), None)
        dtype = param.dtype if param is not None else images.dtype
        pixels = images.reshape(-1, c, hgt, wid).to(dtype)
        with torch.no_grad():
            feats = self._features(pixels)
        h = torch.relu(self.fc(feats.to(self.fc.weight.dtype)))
        return h.reshape(*lead, self.embed_dim)


# ----------------------------------------------------------------------------- factory


def build_encoder(spec: EncoderSpec) -> nn.Module:
    """The feature encoder for one spec (output width ``spec.embed_dim``)."""
    if spec.kind == "scalar":
        return ScalarEncoder(spec.in_dim, spec.embed_dim, name=spec.name)
    if spec.kind == "series":
        assert spec.length is not None
        return SeriesEncoder(spec.in_dim, spec.length, spec.embed_dim, spec.kernel_size, name=spec.name)
    if spec.kind == "image":
        return ImageEncoder(spec.vision, spec.embed_dim, name=spec.name)
    raise NetLLMError(f"encoder spec {spec.name!r}: unknown kind {spec.kind!r}")


class ModalityEncoders(nn.Module):
    """All modality encoders of one model: feature encoder -> projection -> shared LayerNorm.

    ``forward(name, x)`` returns ``(..., hidden_size)`` token embeddings.
    """

    def __init__(self, specs: Sequence[EncoderSpec], hidden_size: int) -> None:
        super().__init__()
        if not _is_pos_int(hidden_size):
            raise NetLLMError(f"hidden_size must be a positive int, got {hidden_size!r}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise NetLLMError(f"encoder specs: modality names must be unique, got {names}")
        self.specs: dict[str, EncoderSpec] = {s.name: s for s in specs}
        self.hidden_size = hidden_size
        self.encoders = nn.ModuleDict({s.name: build_encoder(s) for s in specs})
        self.projections = nn.ModuleDict({s.name: nn.Linear(s.embed_dim, hidden_size) for s in specs})
        self.norm = nn.LayerNorm(hidden_size)   # ONE LayerNorm shared by every modality

    def _spec(self, name: str) -> EncoderSpec:
        if name not in self.specs:
            raise NetLLMError(f"modality {name!r}: unknown; this model has {sorted(self.specs)}")
        return self.specs[name]

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self._spec(name)
        return self.norm(self.projections[name](self.encoders[name](x)))

    def encode_all(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode several modalities at once: ``{name: (..., hidden_size)}``."""
        return {name: self(name, x) for name, x in inputs.items()}  # loop over modalities, not samples


__all__ = [
    "EncoderSpec",
    "ScalarEncoder",
    "SeriesEncoder",
    "ImageEncoder",
    "ModalityEncoders",
    "build_encoder",
]
