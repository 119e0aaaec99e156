"""VP's data sets: the Jin2022 and Wu2017 head-motion viewport traces
(``netllm data fetch vp`` fetches them).

Light on purpose (no torch): ``netllm data status`` reads it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from netllm.data import DataGroup

_UPSTREAM = "viewport_prediction/data/viewports"

GROUPS: tuple[DataGroup, ...] = (
    DataGroup("vp/viewports/Jin2022", "vp/viewports/Jin2022", f"{_UPSTREAM}/Jin2022"),
    DataGroup("vp/viewports/Wu2017", "vp/viewports/Wu2017", f"{_UPSTREAM}/Wu2017"),
)


def manifest() -> str:
    """``sha256  path`` lines of every VP file (``netllm/manifests/vp.sha256``)."""
    return resources.files("netllm").joinpath("manifests/vp.sha256").read_text("utf-8")


def post_fetch(root: Path) -> None:
    """Nothing to derive: the fetched files are used as they are."""
