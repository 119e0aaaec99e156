"""Registry of the networking tasks: ``tasks/<name>/`` exposes ``TASK``."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from netllm.tasks.base import Task
from netllm.utils import NetLLMError


def available_tasks() -> list[str]:
    """Names of the task folders installed in this package."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg)


def get_task(name: str) -> Task:
    """The task ``name``, or a one-line error listing the installed ones."""
    names = available_tasks()
    if name not in names:
        listed = ", ".join(names) if names else "none installed yet"
        raise NetLLMError(f"unknown task {name!r}; available tasks: {listed}")
    module = importlib.import_module(f"netllm.tasks.{name}")
    return module.TASK
