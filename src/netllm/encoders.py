"""Modality encoders: networking data -> one token-like embedding per item.

Every modality a task declares (an ``EncoderSpec``) gets a *feature encoder* that
turns raw networking data into an ``embed_dim`` feature, then a linear *projection*
to the LLM's hidden size; one LayerNorm, shared by all modalities of a model, is
applied last. The result is passed to the LLM as ``inputs_embeds``.

    scalar  Linear + ReLU                 (..., in_dim)            e.g. buffer_s, chunks_left
    series  Conv1d + ReLU -> Linear       (..., [in_dim,] length)  e.g. throughput_mbps history
    graph   Decima-style message passing  nodes, edges, graph ids  job DAGs of a Spark cluster
    image   frozen pretrained ViT -> Linear  (..., C, H, W)        video frames

All encoders accept arbitrary leading batch dimensions (flattened, then restored),
and raise ``NetLLMError`` naming the modality on a wrong trailing shape or NaN input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from netllm.utils import NetLLMError

Kind = Literal["scalar", "series", "graph", "image"]
KINDS: tuple[str, ...] = ("scalar", "series", "graph", "image")


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EncoderSpec:
    """One input modality of a task, e.g. ``EncoderSpec("throughput_mbps", "series", length=8)``.

    Fields used per kind (others are ignored):
      scalar: ``in_dim`` (number of features)
      series: ``in_dim`` (channels; 1 means the input has no channel axis), ``length``,
              ``kernel_size`` (default ``min(4, length)``)
      graph:  ``node_dim``, ``rounds`` (message-passing rounds; >= DAG depth gives the
              exact Decima recursion), ``pooling`` ("sum" as in Decima, or "mean")
      image:  ``vision`` (a built ``nn.Module``, a transformers vision config, or a
              model id / local folder for ``AutoModel.from_pretrained``)
    ``embed_dim`` is the feature width before the projection to the LLM hidden size.
    """

    name: str
    kind: Kind
    in_dim: int = 1
    length: int | None = None
    node_dim: int | None = None
    embed_dim: int = 128
    kernel_size: int | None = None
    rounds: int = 8
    pooling: Literal["sum", "mean"] = "sum"
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
        if self.kind == "graph":
            if not _is_pos_int(self.node_dim):
                raise NetLLMError(f"{where}: node_dim must be a positive int, got {self.node_dim!r}")
            if not (isinstance(self.rounds, int) and self.rounds >= 0):
                raise NetLLMError(f"{where}: rounds must be an int >= 0, got {self.rounds!r}")
            if self.pooling not in ("sum", "mean"):
                raise NetLLMError(f"{where}: pooling must be 'sum' or 'mean', got {self.pooling!r}")
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


# ----------------------------------------------------------------------------- graph


class GraphEmbeddings(NamedTuple):
    """Embeddings of a batch of job DAGs, at three levels."""

    node_embeddings: torch.Tensor    # (N_total, D)  one per stage
    graph_embeddings: torch.Tensor   # (num_graphs, D)  one per job DAG
    global_embedding: torch.Tensor   # (D,) or (num_batches, D) when batch_index is given


def _mlp(in_dim: int, out_dim: int, hidden: Sequence[int], act: type[nn.Module] = nn.ReLU, **act_kw: Any) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for w in hidden:
        layers += [nn.Linear(d, w), act(**act_kw)]
        d = w
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[i] = sum(src[j] for j where index[j] == i)``; rows with no member stay zero."""
    out = src.new_zeros(size, *src.shape[1:])
    return out.index_add_(0, index, src)


class GraphEncoder(nn.Module):
    """Decima-style GNN over a batch of job DAGs of different sizes, in one call.

    Edges point parent -> child (``edge_index[0]`` is the stage that must finish first).
    Messages flow from children to parents: after ``rounds`` synchronous rounds

        h_v = h0_v + g( sum_{u in children(v)} f(h_u) ),   h0_v = prep(x_v)

    which, once ``rounds`` >= the DAG depth, is exactly Decima's bottom-up recursion
    (a leaf's embedding never depends on its parents). A DAG summary pools its nodes,
    and a global summary pools the DAGs (of the whole call, or of each state when
    ``batch_index`` assigns DAGs to states):

        y_G = g_dag( pool_{v in G} f_dag(h_v) ),   z = g_glob( pool_{G} f_glob(y_G) )

    The MLPs use LeakyReLU(0.2) as in Decima. No Python loop over nodes or graphs.
    """

    def __init__(
        self,
        node_dim: int,
        embed_dim: int = 128,
        rounds: int = 8,
        pooling: Literal["sum", "mean"] = "sum",
        name: str = "graph",
    ) -> None:
        super().__init__()
        self.name, self.node_dim, self.embed_dim = name, node_dim, embed_dim
        self.rounds, self.pooling = rounds, pooling
        d, hid = embed_dim, [embed_dim]
        act = dict(act=nn.LeakyReLU, negative_slope=0.2)
        self.prep = _mlp(node_dim, d, hid, **act)
        self.msg = _mlp(d, d, hid, **act)        # f: applied to a child's embedding
        self.update = _mlp(d, d, hid, **act)     # g: applied to the sum of messages
        self.dag_in = _mlp(d, d, hid, **act)
        self.dag_out = _mlp(d, d, hid, **act)
        self.glob_in = _mlp(d, d, hid, **act)
        self.glob_out = _mlp(d, d, hid, **act)

    def _pool(self, src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        total = _segment_sum(src, index, size)
        if self.pooling == "mean":
            count = _segment_sum(torch.ones_like(index, dtype=src.dtype), index, size)
            total = total / count.clamp_min(1).unsqueeze(-1)
        return total

    def _check(
        self,
        node_features: torch.Tensor,
        edge_index: torch.Tensor,
        graph_index: torch.Tensor,
        num_graphs: int,
    ) -> None:
        name = self.name
        _check_input(node_features, f"{name}.node_features", (self.node_dim,), "(N_total, node_dim)")
        if node_features.dim() != 2:
            raise NetLLMError(
                f"input '{name}.node_features': expected shape (N_total, {self.node_dim}), "
                f"got {tuple(node_features.shape)}"
            )
        n = node_features.shape[0]
        if not (isinstance(edge_index, torch.Tensor) and edge_index.dim() == 2 and edge_index.shape[0] == 2):
            raise NetLLMError(
                f"input '{name}.edge_index': expected a (2, E) tensor, got "
                f"{tuple(edge_index.shape) if isinstance(edge_index, torch.Tensor) else type(edge_index).__name__}"
            )
        if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
            raise NetLLMError(f"input '{name}.edge_index': expected an integer tensor, got {edge_index.dtype}")
        if not (isinstance(graph_index, torch.Tensor) and tuple(graph_index.shape) == (n,)):
            raise NetLLMError(
                f"input '{name}.graph_index': expected shape ({n},) (one graph id per node), got "
                f"{tuple(graph_index.shape) if isinstance(graph_index, torch.Tensor) else type(graph_index).__name__}"
            )
        if graph_index.is_floating_point() or graph_index.dtype == torch.bool:
            raise NetLLMError(f"input '{name}.graph_index': expected an integer tensor, got {graph_index.dtype}")
        if not (isinstance(num_graphs, int) and num_graphs >= 1):
            raise NetLLMError(f"input '{name}.num_graphs': expected an int >= 1, got {num_graphs!r}")
        if n and (graph_index.min() < 0 or graph_index.max() >= num_graphs):
            raise NetLLMError(f"input '{name}.graph_index': ids must lie in 0..{num_graphs - 1}")
        if edge_index.numel():
            if edge_index.min() < 0 or edge_index.max() >= n:
                raise NetLLMError(f"input '{name}.edge_index': node ids must lie in 0..{n - 1}")
            if (graph_index[edge_index[0]] != graph_index[edge_index[1]]).any():
                raise NetLLMError(f"input '{name}.edge_index': an edge joins nodes of two different graphs")

    def forward(
        self,
        node_features: torch.Tensor,
        edge_index: torch.Tensor,
        graph_index: torch.Tensor,
        num_graphs: int,
        batch_index: torch.Tensor | None = None,
        num_batches: int | None = None,
    ) -> GraphEmbeddings:
        """Embed ``num_graphs`` DAGs given as one disjoint union.

        node_features (N_total, node_dim), edge_index (2, E) parent -> child,
        graph_index (N_total,) graph id per node, batch_index (num_graphs,) optional state id
        per graph (then ``global_embedding`` is (num_batches, D), else (D,)).
        """
        self._check(node_features, edge_index, graph_index, num_graphs)
        x = node_features.to(self.prep[0].weight.dtype)
        parent, child = edge_index[0].long(), edge_index[1].long()
        graph_index = graph_index.long()

        h0 = self.prep(x)
        h = h0
        for _ in range(self.rounds):                                   # rounds, not nodes
            messages = _segment_sum(self.msg(h)[child], parent, h.shape[0])
            h = h0 + self.update(messages)

        graphs = self.dag_out(self._pool(self.dag_in(h), graph_index, num_graphs))
        g = self.glob_in(graphs)
        if batch_index is None:
            glob = self.glob_out(g.sum(0) if self.pooling == "sum" else g.mean(0))
        else:
            if not (isinstance(batch_index, torch.Tensor) and tuple(batch_index.shape) == (num_graphs,)):
                raise NetLLMError(
                    f"input '{self.name}.batch_index': expected shape ({num_graphs},) (one state id per graph)"
                )
            batch_index = batch_index.long()
            if num_batches is None:
                num_batches = int(batch_index.max()) + 1
            if batch_index.min() < 0 or batch_index.max() >= num_batches:
                raise NetLLMError(f"input '{self.name}.batch_index': ids must lie in 0..{num_batches - 1}")
            glob = self.glob_out(self._pool(g, batch_index, num_batches))
        return GraphEmbeddings(h, graphs, glob)


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
    if spec.kind == "graph":
        assert spec.node_dim is not None
        return GraphEncoder(spec.node_dim, spec.embed_dim, spec.rounds, spec.pooling, name=spec.name)
    if spec.kind == "image":
        return ImageEncoder(spec.vision, spec.embed_dim, name=spec.name)
    raise NetLLMError(f"encoder spec {spec.name!r}: unknown kind {spec.kind!r}")


class GraphProjection(nn.Module):
    """Separate projections for node, DAG and global embeddings (different statistics)."""

    def __init__(self, embed_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.node = nn.Linear(embed_dim, hidden_size)
        self.graph = nn.Linear(embed_dim, hidden_size)
        self.glob = nn.Linear(embed_dim, hidden_size)


class ModalityEncoders(nn.Module):
    """All modality encoders of one model: feature encoder -> projection -> shared LayerNorm.

    ``forward(name, x)`` returns ``(..., hidden_size)`` token embeddings; for a graph
    modality it returns ``GraphEmbeddings`` whose three levels are each projected and
    normed to ``hidden_size``.
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
        self.projections = nn.ModuleDict(
            {
                s.name: GraphProjection(s.embed_dim, hidden_size)
                if s.kind == "graph"
                else nn.Linear(s.embed_dim, hidden_size)
                for s in specs
            }
        )
        self.norm = nn.LayerNorm(hidden_size)   # ONE LayerNorm shared by every modality

    def _spec(self, name: str) -> EncoderSpec:
        if name not in self.specs:
            raise NetLLMError(f"modality {name!r}: unknown; this model has {sorted(self.specs)}")
        return self.specs[name]

    def forward(self, name: str, x: torch.Tensor, **kw: Any) -> torch.Tensor | GraphEmbeddings:
        spec = self._spec(name)
        feats = self.encoders[name](x, **kw)
        proj = self.projections[name]
        if spec.kind == "graph":
            return GraphEmbeddings(
                self.norm(proj.node(feats.node_embeddings)),
                self.norm(proj.graph(feats.graph_embeddings)),
                self.norm(proj.glob(feats.global_embedding)),
            )
        return self.norm(proj(feats))

    def encode_all(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode several non-graph modalities at once: ``{name: (..., hidden_size)}``."""
        out: dict[str, torch.Tensor] = {}
        for name, x in inputs.items():          # loop over modalities, not samples
            if self._spec(name).kind == "graph":
                raise NetLLMError(f"modality {name!r}: graph inputs need forward(name, ..., edge_index=...)")
            out[name] = self(name, x)  # type: ignore[assignment]
        return out


__all__ = [
    "EncoderSpec",
    "ScalarEncoder",
    "SeriesEncoder",
    "GraphEncoder",
    "GraphEmbeddings",
    "ImageEncoder",
    "ModalityEncoders",
    "GraphProjection",
    "build_encoder",
]
