"""ABR's data sets: FCC traces, video chunk sizes, upstream checkpoints and the actors
converted from them (``netllm data fetch abr`` fetches them, then converts).

Light on purpose (no torch): ``netllm data status`` reads it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from netllm.data import DataGroup

_UPSTREAM = "adaptive_bitrate_streaming/data"

GROUPS: tuple[DataGroup, ...] = (
    DataGroup("abr/traces/train", "abr/traces/train", f"{_UPSTREAM}/traces/train"),
    DataGroup("abr/traces/valid", "abr/traces/valid", f"{_UPSTREAM}/traces/valid"),
    DataGroup("abr/traces/test", "abr/traces/test", f"{_UPSTREAM}/traces/test"),
    DataGroup("abr/videos", "abr/videos", f"{_UPSTREAM}/videos"),
    DataGroup("abr/upstream_checkpoints", "abr/upstream_checkpoints", f"{_UPSTREAM}/all_models"),
    DataGroup("abr/pretrained", "abr/pretrained", None, "converted from checkpoints"),
)


def manifest() -> str:
    """``sha256  path`` lines of every ABR file (``netllm/manifests/abr.sha256``)."""
    return resources.files("netllm").joinpath("manifests/abr.sha256").read_text("utf-8")


def post_fetch(root: Path) -> None:
    """Convert the upstream TensorFlow checkpoints into ``abr/pretrained/*_actor.npz``."""
    from netllm.tasks.abr.checkpoint import convert_all

    convert_all(root)
