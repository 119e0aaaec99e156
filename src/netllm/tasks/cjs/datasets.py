"""CJS's data sets: the TPC-H job DAGs with measured task durations and Decima's
pretrained weights (``netllm data fetch cjs`` fetches them).

Light on purpose (no torch): ``netllm data status`` reads it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from netllm.data import DataGroup

_UPSTREAM = "cluster_job_scheduling"

GROUPS: tuple[DataGroup, ...] = (
    DataGroup("cjs/tpch", "cjs/tpch", f"{_UPSTREAM}/data/tpch"),
    DataGroup(
        "cjs/pretrained", "cjs/pretrained/decima_model.pt", f"{_UPSTREAM}/models/decima/model.pt"
    ),
)


def manifest() -> str:
    """``sha256  path`` lines of every CJS file (``netllm/manifests/cjs.sha256``)."""
    return resources.files("netllm").joinpath("manifests/cjs.sha256").read_text("utf-8")


def post_fetch(root: Path) -> None:
    """Nothing to derive: the fetched files are used as they are."""
