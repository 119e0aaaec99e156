"""Small shared pieces: the user-facing error, seeding, thread control, atomic writes,
strict JSON, run folders."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import platform
import random
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


class NetLLMError(Exception):
    """An error the user can cause and fix (missing data, bad file, bad option).

    The CLI prints its message on one line, without a traceback, and exits non-zero.
    The message must name the file or option at fault.
    """


def seed_everything(seed: int) -> None:
    """The one place randomness is seeded: Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op torch threads (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# the process's umask, read once at import (reading it means setting it: not while threads write)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed, so a half-written output is never
    left behind under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600: give it an ordinary file's mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _non_finite_at(obj: Any, where: str = "") -> str | None:
    """The key path (``a.b[2]``) of the first NaN/Infinity float in ``obj``, else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "<top level>")
    if isinstance(obj, dict):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub, value in items:
        found = _non_finite_at(value, sub)
        if found is not None:
            return found
    return None


def strict_json_dumps(obj: Any, *, path: str | os.PathLike[str] | None = None, indent: int | None = 2,
                      sort_keys: bool = True) -> str:
    """``json.dumps`` that only writes standard JSON (``allow_nan=False``).

    NaN and +-Infinity have no JSON spelling (Python would write ``NaN``/``Infinity``,
    which strict parsers reject), so a non-finite float raises ``NetLLMError`` naming
    ``path`` and the key that holds it; nothing is converted silently. Objects JSON does
    not know (paths, numpy scalars...) are written as ``str()``.
    """
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)
    except ValueError:
        key = _non_finite_at(obj)
        if key is None:  # another ValueError (e.g. a circular reference): not ours to reword
            raise
        target = f"{path}: " if path is not None else ""
        raise NetLLMError(
            f"{target}cannot write a non-finite number (NaN or Infinity) at {key!r} as JSON; "
            "strict JSON has no spelling for it: write null (None) or leave the key out"
        ) from None


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as standard JSON (sorted keys, indent 2), atomically.

    A NaN or Infinity anywhere in ``obj`` raises ``NetLLMError`` (see
    :func:`strict_json_dumps`) and leaves ``path`` untouched.
    """
    atomic_write_text(path, strict_json_dumps(obj, path=path) + "\n")


def cache_dir() -> Path:
    """The user cache folder (``$NETLLM_CACHE`` or ``$XDG_CACHE_HOME/netllm``)."""
    if os.environ.get("NETLLM_CACHE"):
        return Path(os.environ["NETLLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "netllm"


def git_revision() -> str | None:
    """The git revision of the source tree, with ``-dirty`` when it has changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides the numbers."""
    out = {"python": platform.python_version()}
    for name in ("netllm", "torch", "transformers", "peft", "numpy", "safetensors", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance() -> dict[str, Any]:
    """What every artefact records so its numbers trace back to code and libraries."""
    return {"git_revision": git_revision(), "versions": library_versions()}


def prepare_run_dir(out: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Create ``runs/<name>/`` and snapshot the command's config with provenance."""
    from netllm.train import is_main_process, wait_for_everyone

    out = Path(out)
    if is_main_process():  # under `accelerate launch` the main process writes the run folder
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {"config": config, **provenance()})
    wait_for_everyone()
    return out


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """Parse ``--seeds`` (or ``option``): a list (``1,2,3``), a range (``1-10``) or a mix (``1-3,7``)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo_s, hi_s = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(lo_s), int(hi_s)
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise NetLLMError(
                f"{option}: cannot parse {text!r}; use a list (1,2,3) or a range (1-10)"
            ) from None
    if not seeds:
        raise NetLLMError(f"{option}: no seed in {text!r}")
    repeated = sorted(s for s, n in collections.Counter(seeds).items() if n > 1)
    if repeated:  # a seed twice would count one episode or training run twice
        raise NetLLMError(f"{option}: seed {', '.join(map(str, repeated))} given twice in {text!r}")
    return seeds


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():  # under `accelerate launch`: this process's GPU
            return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if "LOCAL_RANK" in os.environ \
                else torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NetLLMError(f"--device: unknown device {device!r}; use auto, cpu, cuda or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NetLLMError(f"--device: {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per launched process
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise NetLLMError(f"--device: {device!r} requested but MPS is not available")
    return dev


# ----------------------------------------------------------------------------- dirty data files

DATA_LOG = logging.getLogger("netllm.data")


@dataclass(frozen=True)
class SkippedFile:
    """A data file a loader left out, and why (``reason`` is one line, without the path)."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class BadDataFile(NetLLMError):
    """A data file whose content cannot be used (bad row, time going backwards, too short).

    Loaders skip such a file with a warning unless ``strict``; the message is
    ``<path>:<line>: <reason>`` (or ``<path>: <reason>``), on one line.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, line: int | None = None) -> None:
        self.path = str(path)
        self.reason = reason if line is None else f"line {line}: {reason}"
        super().__init__(f"{path}: {reason}" if line is None else f"{path}:{line}: {reason}")


def skip_bad_file(error: BadDataFile, skipped: list[SkippedFile], strict: bool = False) -> None:
    """Record ``error`` in ``skipped`` and log one WARNING line on "netllm.data";
    re-raise it instead when ``strict``."""
    if strict:
        raise error
    skipped.append(SkippedFile(error.path, " ".join(error.reason.split())))
    DATA_LOG.warning("skipped %s: %s", error.path, skipped[-1].reason)


def all_skipped_error(where: str, skipped: list[SkippedFile]) -> NetLLMError:
    """The error for a folder / selection in which every file was skipped."""
    n, first = len(skipped), skipped[0]
    files = "file was" if n == 1 else "files were"
    return NetLLMError(f"{where}: all {n} {files} skipped; first: {first.path}: {first.reason}")
