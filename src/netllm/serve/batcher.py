"""Requests that arrive together are decided together: one worker thread owns the model.

Every call that touches a model or a session's decision state is a job ``(fn, payload)``
on one queue. The worker takes the first job, then every job already queued (waiting at
most ``window_s`` for more, up to ``max_batch``), groups them by ``fn`` (keeping their
order) and calls ``fn(payloads) -> results`` once per group: the batched LLM call. An
item may come back as an exception instance (that request fails alone); an exception
raised by ``fn`` fails the whole group. Jobs run even when their caller stopped waiting
(a deadline passed, the client went away), so a session's context stays complete.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("netllm.serve")

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


class Batcher:
    def __init__(self, window_s: float = 0.001, max_batch: int = 256,
                 on_batch: Callable[[BatchFn, int], None] | None = None) -> None:
        self.window_s, self.max_batch, self.on_batch = float(window_s), int(max_batch), on_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="netllm-decisions", daemon=True)
        self._thread.start()

    def submit(self, fn: BatchFn, payload: Any) -> asyncio.Future[Any]:
        """Queue one item for ``fn``; the future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((fn, payload, future, loop))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _take(self) -> list[Any] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        until = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(until - time.monotonic(), 0.0)) if self.window_s > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: finish what was taken first
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            groups: dict[BatchFn, list[Any]] = {}  # bound methods of one object compare equal
            for job in jobs:
                groups.setdefault(job[0], []).append(job)
            for members in groups.values():
                fn = members[0][0]
                try:
                    results: Sequence[Any] = fn([j[1] for j in members])
                    if len(results) != len(members):
                        raise RuntimeError(f"{fn!r} returned {len(results)} results for {len(members)} items")
                except Exception as e:  # noqa: BLE001 - every waiting caller gets it
                    log.exception("batched call %r failed", fn)
                    results = [e] * len(members)
                if self.on_batch is not None:
                    self.on_batch(fn, len(members))
                for (_, _, future, loop), result in zip(members, results):
                    loop.call_soon_threadsafe(_resolve, future, result)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller stopped waiting
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
