"""The data set registry: where the reference data lives, how to fetch it, how to trust it.

The data sets belong to the tasks (``netllm.registry``: every installed task, the
built-in ABR, VP and CJS and any plug-in alike). Each task declares

* ``datasets()``: its data set groups (:class:`DataGroup`), each mapping a local folder
  under ``<data root>/<task>/`` to the upstream folder it is published in;
* ``manifest()``: every file of those groups with its sha256, as ``sha256sum`` lines
  keyed by the path under the data root (the built-in tasks ship theirs as
  ``netllm/manifests/<task>.sha256``);
* ``post_fetch(root)``: a step run after each successful fetch of the task (e.g. ABR's
  converter from upstream TensorFlow checkpoints to ``abr/pretrained/*_actor.npz``);
  it must be idempotent.

This module reads them from the registry — ``groups()`` and ``default_manifest()`` are
the union over the installed tasks — so that

    root = data_root()                        # $NETLLM_DATA or ~/.cache/netllm/data
    traces = dataset_path("abr", "traces", "test", "fcc-test")
    fetch("abr")                              # pinned URLs, sha256 checked before use
    rows = status(verify=True)                # one row per data set group
    jobs = load_verified_pickle(root / "cjs/tpch/2g/task_duration_1.npy")

A task name that is not installed is a one-line NetLLMError listing the installed ones.

A download is written to a temporary file beside its final path, hashed, and renamed
into place only when its sha256 matches; a mismatch is rejected and leaves nothing.
Upstream pickles (TPC-H task durations) are unpickled only after their hash matches.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import urlopen

import numpy as np
from tqdm import tqdm

from netllm.utils import NetLLMError, atomic_path, cache_dir

if TYPE_CHECKING:
    from netllm.tasks.base import Task

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/duowuyms/NetLLM/105bcf0"
FAIL_FAST = 8  # failed files, with none fetched, after which a fetch stops
DOWNLOAD_WORKERS = 8
DOWNLOAD_TIMEOUT_S = 60.0
DOWNLOAD_ATTEMPTS = 3
RETRY_DELAY_S = 1.0  # doubled after each failed attempt
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class DataGroup:
    """One data set of a task: a local path prefix and where it is published upstream.

    ``local`` is a folder (or a single file) under the data root; a manifest path
    ``local + rest`` is published at ``upstream + rest``. ``upstream`` is None for files
    that are not published but derived locally (``note`` says how).
    """

    name: str
    local: str
    upstream: str | None
    note: str = ""

    @property
    def task(self) -> str:
        return self.name.split("/", 1)[0]

    def contains(self, path: str) -> bool:
        return path == self.local or path.startswith(self.local + "/")


@dataclass(frozen=True)
class ManifestEntry:
    """One file: its path under the data root, its sha256 and its data set group."""

    path: str
    sha256: str
    group: DataGroup

    @property
    def upstream(self) -> str | None:
        """The file's path in the upstream repository (None: derived locally)."""
        if self.group.upstream is None:
            return None
        return self.group.upstream + self.path[len(self.group.local):]


Manifest = Mapping[str, ManifestEntry]


@dataclass
class FetchSummary:
    """What ``fetch`` did."""

    task: str
    root: Path
    downloaded: int
    skipped: int
    nbytes: int
    post_fetch: list[str] = field(default_factory=list)
    missing_derived: list[str] = field(default_factory=list)  # e.g. npz not yet converted


# --------------------------------------------------------------------------- manifest


def _installed() -> dict[str, "Task"]:
    """Every installed task by name (``netllm.registry``; imported here: no import cycle)."""
    from netllm import registry

    return registry.tasks()


def _select(task: str, allow_all: bool = False) -> dict[str, "Task"]:
    """The installed task ``task`` (or every one, for ``all``), by name."""
    found = _installed()
    if task in found:
        return {task: found[task]}
    if allow_all and task == "all":
        return dict(found)
    from netllm import registry

    broken = registry.broken_tasks()
    if task in broken:
        raise NetLLMError(broken[task])
    listed = ", ".join(sorted(found)) if found else "none installed"
    raise NetLLMError(
        f"unknown task {task!r}; installed tasks: {listed}" + (" (or all)" if allow_all else "")
    )


def _groups_of(name: str, task: "Task") -> tuple[DataGroup, ...]:
    """The data set groups of one task, checked to lie under ``<name>/``."""
    found = tuple(task.datasets())
    for group in found:
        if not isinstance(group, DataGroup):
            raise NetLLMError(
                f"task {name!r}: datasets() must return DataGroups, got {type(group).__name__}"
            )
        if group.task != name or not (group.local == name or group.local.startswith(name + "/")):
            raise NetLLMError(
                f"task {name!r}: data set group {group.name!r} ({group.local}) "
                f"is not under '{name}/'"
            )
    return found


def groups() -> tuple[DataGroup, ...]:
    """The data set groups of every installed task, task by task (a task may have none)."""
    return tuple(g for name, task in _installed().items() for g in _groups_of(name, task))


def group_of(path: str) -> DataGroup:
    """The data set group (of an installed task) a manifest path belongs to."""
    for group in groups():
        if group.contains(path):
            return group
    raise NetLLMError(
        f"manifest path {path!r} belongs to no data set group of the installed tasks "
        f"({', '.join(_installed()) or 'none installed'})"
    )


def build_manifest(hashes: Mapping[str, str]) -> Manifest:
    """A manifest from ``{path under the data root: sha256}``, grouped by the registry."""
    return MappingProxyType(
        {path: ManifestEntry(path, sha.lower(), group_of(path)) for path, sha in hashes.items()}
    )


def read_sha256_file(text: str, source: str) -> dict[str, str]:
    """Parse ``sha256  path`` lines (``sha256sum`` format; ``./`` prefixes dropped)."""
    hashes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sha, _, path = line.partition("  ")
        path = path.removeprefix("./")
        if len(sha) != 64 or not path:
            raise NetLLMError(f"{source}:{number}: expected 'sha256  path', got {line!r}")
        hashes[path] = sha
    return hashes


@cache
def default_manifest() -> Manifest:
    """Every file of every installed task's data sets: the union of the tasks' manifests.

    Each path must belong to a data set group of the task whose manifest lists it.
    """
    entries: dict[str, ManifestEntry] = {}
    for name, task in _installed().items():
        own = _groups_of(name, task)
        text = task.manifest()
        for path, sha in read_sha256_file(text, f"task {name!r} manifest").items():
            group = next((g for g in own if g.contains(path)), None)
            if group is None:
                raise NetLLMError(
                    f"task {name!r} manifest: path {path!r} belongs to no data set group "
                    f"of task {name!r}"
                )
            entries[path] = ManifestEntry(path, sha.lower(), group)
    return MappingProxyType(entries)


# --------------------------------------------------------------------------- locating


def data_root() -> Path:
    """The data folder: ``$NETLLM_DATA`` (which must exist) or ``<cache>/data``."""
    env = os.environ.get("NETLLM_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise NetLLMError(
                f"NETLLM_DATA={env!r} is not a folder; point it at a data folder "
                "or unset it to use the cache filled by 'netllm data fetch'"
            )
        return root
    return cache_dir() / "data"


def dataset_path(task: str, *parts: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The path of a data set folder or file, e.g. ``dataset_path("abr", "videos")``.

    ``task`` is any installed task. Raises NetLLMError (saying how to get the data)
    when the path does not exist.
    """
    _select(task)
    base = Path(root) if root is not None else data_root()
    path = base.joinpath(task, *parts)
    if not path.exists():
        name = "/".join((task, *parts))
        raise NetLLMError(
            f"data set '{name}' not found in {base}; "
            f"run 'netllm data fetch {task}' or set NETLLM_DATA"
        )
    return path


# --------------------------------------------------------------------------- checking


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_states(root: Path, entries: list[ManifestEntry], verify: bool) -> list[str]:
    """Per entry: 'missing', 'present' (not hashed), 'ok' or 'corrupt'."""
    present = [(root / e.path).is_file() for e in entries]
    if not verify:
        return ["present" if p else "missing" for p in present]
    to_hash = [e for e, p in zip(entries, present) if p]
    with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
        digests = iter(pool.map(lambda e: sha256_file(root / e.path), to_hash))
    return [
        ("ok" if next(digests) == e.sha256 else "corrupt") if p else "missing"
        for e, p in zip(entries, present)
    ]


def status(
    root: str | os.PathLike[str] | None = None,
    verify: bool = False,
    manifest: Manifest | None = None,
) -> list[dict[str, Any]]:
    """One row per data set group: what is expected, present and (optionally) verified.

    Row keys: ``task``, ``group``, ``expected``, ``present``, ``verified`` (files whose
    sha256 matched; None unless ``verify``), ``state`` ('ok', 'missing', 'partial' or
    'corrupt') and ``detail`` (how to fix it, or which file is corrupt).
    """
    root = Path(root) if root is not None else data_root()
    manifest = default_manifest() if manifest is None else manifest
    by_group: dict[DataGroup, list[ManifestEntry]] = {}
    for entry in manifest.values():
        by_group.setdefault(entry.group, []).append(entry)
    rows = []
    known = groups()
    order = [g for g in known if g in by_group] + [g for g in by_group if g not in known]
    for group in order:
        entries = by_group[group]
        states = _file_states(root, entries, verify)
        corrupt = [e.path for e, s in zip(entries, states) if s == "corrupt"]
        n_present = sum(s != "missing" for s in states)
        hint = group.note or f"run 'netllm data fetch {group.task}'"
        if corrupt:
            state, detail = "corrupt", f"{len(corrupt)} corrupt, e.g. {corrupt[0]}; {hint}"
        elif n_present == 0:
            state, detail = "missing", hint
        elif n_present < len(entries):
            state, detail = "partial", f"{len(entries) - n_present} missing; {hint}"
        else:
            state, detail = "ok", ""
        rows.append({
            "task": group.task,
            "group": group.name,
            "expected": len(entries),
            "present": n_present,
            "verified": states.count("ok") if verify else None,
            "state": state,
            "detail": detail,
        })
    return rows


# --------------------------------------------------------------------------- fetching


def _url(base_url: str, upstream: str) -> str:
    return f"{base_url.rstrip('/')}/{quote(upstream, safe='/')}"


def _download_to(url: str, dest: Path) -> tuple[str, int]:
    """Stream ``url`` into ``dest``; return its sha256 and size. Retries network errors."""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        digest, nbytes = hashlib.sha256(), 0
        try:
            with urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
                while chunk := response.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    nbytes += len(chunk)
            return digest.hexdigest(), nbytes
        except HTTPError as err:
            reason = f"HTTP {err.code} {err.reason}"
            retry = err.code >= 500 or err.code == 429
        except (URLError, OSError) as err:  # connection refused, reset, timeout, DNS
            reason = str(getattr(err, "reason", err))
            retry = True
        if not retry or attempt + 1 == DOWNLOAD_ATTEMPTS:
            raise NetLLMError(f"download failed: {url}: {reason}")
        time.sleep(RETRY_DELAY_S * 2**attempt)
    raise AssertionError("unreachable")


def _fetch_one(entry: ManifestEntry, root: Path, base_url: str) -> int:
    """Download one file, check its sha256, then move it to its final path."""
    assert entry.upstream is not None
    url = _url(base_url, entry.upstream)
    final = root / entry.path
    try:
        with atomic_path(final) as tmp:  # removed on any error: nothing half-written remains
            got, nbytes = _download_to(url, tmp)
            if got != entry.sha256:
                raise NetLLMError(
                    f"{entry.path}: rejected download from {url}: "
                    f"sha256 {got} does not match the manifest's {entry.sha256}"
                )
    except OSError as err:  # the data folder is not writable, the disk is full, ...
        raise NetLLMError(f"{final}: cannot write: {err.strerror or err}") from None
    return nbytes


def fetch(
    task: str,
    root: str | os.PathLike[str] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    progress: bool = True,
    manifest: Manifest | None = None,
    workers: int = DOWNLOAD_WORKERS,
) -> FetchSummary:
    """Download the missing or corrupt files of ``task`` (any installed task, or all).

    Files already present with the right sha256 are skipped; each download is checked
    before it is moved to its final path. Failed files are reported together in one
    NetLLMError after the others have landed, so a re-run resumes where this one
    stopped. Then each selected task's ``post_fetch(root)`` runs.
    """
    selected = _select(task, allow_all=True)
    tasks = tuple(selected)
    root = Path(root) if root is not None else data_root()
    manifest = default_manifest() if manifest is None else manifest
    entries = [e for e in manifest.values() if e.group.task in tasks and e.upstream is not None]
    states = _file_states(root, entries, verify=True)
    todo = [e for e, s in zip(entries, states) if s != "ok"]

    errors: list[str] = []
    nbytes = 0
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        with tqdm(
            total=len(todo), unit="file", desc=f"fetch {task}", disable=not progress
        ) as bar:
            futures = [pool.submit(_fetch_one, e, root, base_url) for e in todo]
            fetched = 0
            for future in as_completed(futures):
                try:
                    nbytes += future.result()
                    fetched += 1
                except NetLLMError as err:
                    errors.append(str(err))
                    # nothing at all came through: the source is unreachable, do not try every file
                    if fetched == 0 and len(errors) >= FAIL_FAST and len(todo) > len(errors):
                        raise NetLLMError(f"the first {len(errors)} files of {task} could not be fetched, none "
                                          f"could; stopped (is {base_url} reachable?): {sorted(errors)[0]}")
                bar.update(1)
                bar.set_postfix_str(f"{nbytes / 1e6:.1f} MB", refresh=False)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise NetLLMError(
            f"{len(errors)} of {len(todo)} files could not be fetched into {root}{more}; "
            "the others are in place, re-run to retry:\n  " + "\n  ".join(sorted(errors)[:3])
        )

    for t in selected.values():
        t.post_fetch(root)
    # the tasks with a post-fetch step of their own (not the Task default, which does nothing)
    steps = [n for n, t in selected.items() if _has_post_fetch(t)]
    derived = [e.path for e in manifest.values() if e.group.task in tasks and e.upstream is None]
    return FetchSummary(
        task=task,
        root=root,
        downloaded=len(todo),
        skipped=len(entries) - len(todo),
        nbytes=nbytes,
        post_fetch=steps,
        missing_derived=[p for p in derived if not (root / p).is_file()],
    )


def _has_post_fetch(task: "Task") -> bool:
    from netllm.tasks.base import Task

    return getattr(type(task), "post_fetch", None) is not Task.post_fetch


# --------------------------------------------------------------------------- pickles


def _manifest_entry_for(path: Path, manifest: Manifest) -> ManifestEntry | None:
    """The entry whose manifest path is the longest trailing part of ``path``."""
    parts = path.absolute().parts
    for i in range(len(parts)):
        entry = manifest.get("/".join(parts[i:]))
        if entry is not None:
            return entry
    return None


def load_verified_pickle(
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    manifest: Manifest | None = None,
) -> Any:
    """``np.load(path, allow_pickle=True)``, but only if the file's sha256 is the expected one.

    Without ``expected_sha256`` the hash comes from the manifest, looked up by the
    file's path under its data root (e.g. ``cjs/tpch/2g/task_duration_1.npy``); a file
    the manifest does not list is refused. The bytes that are hashed are the bytes
    that are unpickled.
    """
    path = Path(path)
    if expected_sha256 is None:
        entry = _manifest_entry_for(path, default_manifest() if manifest is None else manifest)
        if entry is None:
            raise NetLLMError(
                f"refusing to unpickle {path}: it is not listed in the data manifest, "
                "so its sha256 cannot be checked"
            )
        expected_sha256 = entry.sha256
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise NetLLMError(f"{path}: cannot read: {err.strerror or err}") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != expected_sha256.lower():
        raise NetLLMError(
            f"refusing to unpickle {path}: sha256 {got} does not match the expected "
            f"{expected_sha256.lower()}; re-fetch it with 'netllm data fetch'"
        )
    try:
        return np.load(io.BytesIO(blob), allow_pickle=True)
    except (ValueError, EOFError, pickle.UnpicklingError) as err:
        raise NetLLMError(f"{path}: not a loadable numpy file: {err}") from None

