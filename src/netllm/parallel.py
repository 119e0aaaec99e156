"""Parallel rollouts and evaluation on Ray: the same work, spread over worker processes.

``netllm collect`` and ``netllm eval`` take ``--workers N`` (a local Ray, started for the
command) or ``--ray-address ADDRESS`` (an existing cluster); the CLI opens :func:`workers`
around the command. A task's code never names Ray: it cuts its work into units
(:func:`split` — e.g. shards of traces, or seeds), and :func:`map` runs them — in this
process when no workers are open, else on the workers — and returns the results in the
order of the units. What every unit needs (a policy, a GNN) is a :class:`Shared`: built
once per worker (a policy loaded from its run folder, by the same ``load_policy`` the CLI
uses) and kept there for the next units and the next calls.

    shards = parallel.split(len(traces))                     # one range per worker (1 without)
    outs = parallel.map(play_shard, shards, parallel.shared_policy(policy), traces, video, seed)

Results are identical to one process whenever a unit's result does not depend on which
other units run beside it (tasks seed every trace / job sequence by its own id). Ray is
an optional extra: ``pip install 'netllm[ray]'``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from netllm.utils import NetLLMError

_UNSET: Any = object()
_ACTIVE: "Workers | None" = None
REF_ATTRIBUTE = "_netllm_source"  # set on a policy by netllm.recipe.load_policy


@dataclass(frozen=True)
class PolicySource:
    """How a worker rebuilds a policy: the task, the ``--policy`` value, the options."""

    task: str
    name: str
    options: Any
    device: str = "cpu"
    dtype: str = "auto"

    def load(self) -> Any:
        from netllm.recipe import load_policy
        from netllm.registry import get_task

        return load_policy(get_task(self.task), self.name, self.options, self.device, self.dtype)


@dataclass
class Shared:
    """What every unit of a :func:`map` needs, built once per worker by ``build()`` and
    cached there under ``key``; ``local`` is this process's own copy (used without workers)."""

    build: Callable[[], Any]
    key: str = field(default_factory=lambda: f"shared-{uuid.uuid4().hex}")
    local: Any = _UNSET

    def here(self) -> Any:
        return self.build() if self.local is _UNSET else self.local


def _same(value: Any) -> Any:
    return value


def shared_policy(policy: Any) -> Shared:
    """A policy as a :class:`Shared`: a worker reloads it from its source (a run folder or a
    baseline name, remembered by ``load_policy``), else receives a pickled copy."""
    source = getattr(policy, REF_ATTRIBUTE, None)
    if isinstance(source, PolicySource):
        key = f"policy:{source.task}:{source.name}:{source.device}:{source.dtype}:{id(policy)}"
        return Shared(source.load, key=key, local=policy)
    return Shared(functools.partial(_same, policy), key=f"object:{os.getpid()}:{id(policy)}", local=policy)


def remember_source(policy: Any, source: PolicySource) -> Any:
    """Tag ``policy`` with where it came from (so workers can load it); returns it."""
    try:
        setattr(policy, REF_ATTRIBUTE, source)
    except (AttributeError, TypeError):  # a policy without a __dict__ travels pickled
        pass
    return policy


def active() -> "Workers | None":
    """The open workers, if a command opened any."""
    return _ACTIVE


def num_workers() -> int:
    """How many workers :func:`map` spreads over (1 without workers)."""
    return _ACTIVE.size if _ACTIVE is not None else 1


def split(n: int, parts: int | None = None) -> list[range]:
    """``range(n)`` cut into ``parts`` (default: the number of workers) contiguous, nearly
    equal ranges, none empty."""
    parts = max(1, min(n, parts if parts is not None else num_workers()))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def map(fn: Callable[..., Any], units: Sequence[Any], shared: Shared | None = None, *args: Any) -> list[Any]:
    """``[fn(context, unit, *args) for unit in units]``, on the open workers if any; the
    results come back in the order of ``units``. ``context`` is ``shared``'s value (built
    once per worker), or None. ``fn`` must be a module-level function."""
    if _ACTIVE is None:
        context = shared.here() if shared is not None else None
        return [fn(context, unit, *args) for unit in units]
    return _ACTIVE.run(fn, list(units), shared, args)


# ----------------------------------------------------------------------------- Ray


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NetLLMError("--workers / --ray-address: Ray is not installed; pip install 'netllm[ray]'") from None
    return ray


def _check_address(address: str) -> None:
    """A one-line error for an address nobody answers at (before Ray retries for a minute)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise NetLLMError(f"--ray-address: expected HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise NetLLMError(f"--ray-address {address}: no Ray cluster reachable ({e.strerror or e})") from None


class _Worker:
    """One Ray actor: runs units and keeps each :class:`Shared` it built."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cache: dict[str, Any] = {}

    def run(self, fn: Callable[..., Any], key: str | None, shared_ref: list[Any], unit: Any,
            args: tuple[Any, ...]) -> Any:
        context = None
        if key is not None:
            if key not in self.cache:
                import ray

                shared: Shared = ray.get(shared_ref[0])
                self.cache[key] = shared.build()
            context = self.cache[key]
        return fn(context, unit, *args)


class Workers:
    """Ray workers for one command: ``size`` actors on a local Ray (``workers``) or on the
    cluster at ``address``. Use :func:`workers`, which also makes them the active ones."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and workers < 1:
            raise NetLLMError(f"--workers: must be >= 1, got {workers}")
        self.ray = _require_ray()
        if address is not None:
            _check_address(address)
        self.address, self.workers = address, workers
        self.size = workers or 1
        self.actors: list[Any] = []
        self._started = False

    def start(self) -> None:
        ray = self.ray
        env = {k: os.environ[k] for k in ("NETLLM_DATA", "NETLLM_CACHE", "HF_HOME") if k in os.environ}
        env.setdefault("OMP_NUM_THREADS", os.environ.get("NETLLM_WORKER_THREADS", "1"))
        env["TOKENIZERS_PARALLELISM"] = "false"
        if not ray.is_initialized():
            try:
                if self.address is None:
                    # a local Ray's workers inherit the environment at ray.init; they do the
                    # command's own work: at its priority, not Ray's default nice 15. The
                    # driver's own environment is restored afterwards (its thread count stays).
                    with _environment({**env, "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}):
                        ray.init(num_cpus=self.size, include_dashboard=False, log_to_driver=True,
                                 logging_level="ERROR")
                else:
                    ray.init(address=self.address, logging_level="ERROR", runtime_env={"env_vars": env})
                self._started = True
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"--ray-address {self.address}" if self.address else "--workers"
                raise NetLLMError(f"{where}: could not start Ray ({str(e).splitlines()[0]})") from None
        if self.address is not None and self.workers is None:  # a cluster: one worker per CPU it has
            self.size = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_Worker)
        self.actors = [actor.remote() for _ in range(self.size)]

    def run(self, fn: Callable[..., Any], units: list[Any], shared: Shared | None, args: tuple[Any, ...]) -> list[Any]:
        ray = self.ray
        # the driver's own copy (``local``: a whole model, perhaps) does not travel
        shared_ref = [ray.put(replace(shared, local=_UNSET))] if shared is not None else [None]
        key = shared.key if shared is not None else None
        futures = [self.actors[i % self.size].run.remote(fn, key, shared_ref, unit, args)
                   for i, unit in enumerate(units)]
        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:  # a user error in a worker: the same one line here
            cause = getattr(e, "cause", None)
            if isinstance(cause, NetLLMError):
                raise NetLLMError(str(cause)) from None
            raise

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._started:
            self.ray.shutdown()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block, the previous state restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def workers(workers: int | None = None, address: str | None = None) -> Iterator["Workers | None"]:
    """Open Ray workers for the block (nothing when both are None): every :func:`map`
    inside runs on them."""
    global _ACTIVE
    if workers is None and address is None:
        yield None
        return
    pool = Workers(workers, address)
    pool.start()
    previous, _ACTIVE = _ACTIVE, pool
    try:
        yield pool
    finally:
        _ACTIVE = previous
        pool.close()
