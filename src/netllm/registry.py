"""The tasks, found through the entry-point group ``netllm.tasks``.

Every task — the built-in ABR, VP and CJS too — is registered the same way, in the
``pyproject.toml`` of the package that provides it::

    [project.entry-points."netllm.tasks"]
    abr = "netllm.tasks.abr:TASK"

so a third-party package adds a task without touching this one (``examples/netllm-bwpred``).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from netllm.tasks.base import Task
from netllm.utils import NetLLMError

GROUP = "netllm.tasks"


@cache
def _load() -> tuple[dict[str, Task], dict[str, str]]:
    """(every task that loads, by name; the error of every one that does not)."""
    found: dict[str, Task] = {}
    broken: dict[str, str] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        where = f"task {ep.name!r} ({ep.value}, entry point group {GROUP})"
        try:
            task = ep.load()
            if isinstance(task, type) and issubclass(task, Task):
                task = task()
        except Exception as err:  # a broken plug-in must not take the others down
            broken[ep.name] = f"{where} failed to load: {type(err).__name__}: {err}"
            continue
        if not isinstance(task, Task):
            broken[ep.name] = f"{where}: the entry point must name a netllm Task, got {type(task).__name__}"
        elif task.name != ep.name:
            broken[ep.name] = f"{where}: its name attribute is {task.name!r}"
        else:
            found[ep.name] = task
    return found, broken


def tasks() -> dict[str, Task]:
    """Every installed task that loads, by name."""
    return _load()[0]


def broken_tasks() -> dict[str, str]:
    """Installed tasks that failed to load -> why (the CLI warns about each)."""
    return _load()[1]


def available_tasks() -> list[str]:
    """Names of the installed tasks."""
    return sorted(tasks())


def get_task(name: str) -> Task:
    """The task ``name``, or a one-line error listing the installed ones."""
    found, broken = _load()
    if name in broken:
        raise NetLLMError(broken[name])
    if name not in found:
        listed = ", ".join(sorted(found)) if found else "none installed"
        raise NetLLMError(f"unknown task {name!r}; installed tasks: {listed}")
    return found[name]
