"""The FastAPI app: health, Prometheus metrics, clear errors, and every task's routes.

``create_app`` builds the app at once and loads the models in a background thread (so
``GET /healthz`` answers 503 ``loading`` until they are ready); each served task adds its
routes through ``Task.service(ctx, options)``. A decision goes through
:meth:`ServeContext.decide`: queued on the batcher, awaited until the deadline, else
answered by the fallback computed from the same observation; an exception in the model
is logged and answered by the fallback too — never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from netllm.serve.batcher import Batcher, BatchFn
from netllm.utils import NetLLMError

log = logging.getLogger("netllm.serve")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class ServeSettings:
    """How the server decides (the task-independent part of ``netllm serve``)."""

    deadline_ms: float = 200.0  # 0: wait for the model however long it takes
    max_sessions: int = 64  # per task with sessions
    session_ttl_s: float = 300.0  # a session idle this long is closed
    batch_window_ms: float = 1.0  # how long the worker waits for more requests to batch
    fallbacks: Mapping[str, str] | None = None  # task -> fallback policy name (default: the task's first)

    def check(self) -> None:
        if not self.deadline_ms >= 0:
            raise NetLLMError(f"--deadline-ms: must be >= 0 (0: no deadline), got {self.deadline_ms}")
        if self.max_sessions < 1:
            raise NetLLMError(f"--max-sessions: must be >= 1, got {self.max_sessions}")
        if not self.session_ttl_s > 0:
            raise NetLLMError(f"--session-ttl-s: must be > 0, got {self.session_ttl_s}")
        if not self.batch_window_ms >= 0:
            raise NetLLMError(f"--batch-window-ms: must be >= 0, got {self.batch_window_ms}")


class ServeMetrics:
    """Prometheus metrics of one app (its own registry), labelled per task."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("netllm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.decisions = Counter("netllm_decisions", "Decisions answered, by task and source", ["task", "source"],
                                 registry=r)
        self.latency = Histogram("netllm_decision_latency_seconds", "Time from request to answer",
                                 ["task"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.fallbacks = Counter("netllm_fallbacks", "Decisions answered by the fallback policy",
                                 ["task", "reason"], registry=r)
        self.errors = Counter("netllm_errors", "Model errors and rejected requests", ["task", "kind"], registry=r)
        self.batch_size = Histogram("netllm_batch_size", "Requests decided in one batched call", ["task"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.sessions = Gauge("netllm_sessions", "Open sessions", ["task"], registry=r)


class Unavailable(Exception):
    """Answered as HTTP 503 (loading, or no room for another session)."""


class ClientError(Exception):
    """Answered as HTTP 4xx with one line naming what is wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServeContext:
    """What a task's service uses: settings, metrics, the batcher and :meth:`decide`."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.batcher: Batcher | None = None
        self.hub: Any = None  # the loaded ModelHub
        self.ready = False
        self.error: str | None = None
        self._tasks: dict[BatchFn, str] = {}  # batch fn -> task, for the batch-size metric

    def register(self, task: str, fn: BatchFn) -> BatchFn:
        self._tasks[fn] = task
        return fn

    def on_batch(self, fn: BatchFn, size: int) -> None:
        self.metrics.batch_size.labels(self._tasks.get(fn, "?")).observe(size)

    def require_ready(self) -> Batcher:
        if not self.ready or self.batcher is None:
            raise Unavailable(self.error or "the models are still loading")
        return self.batcher

    async def call(self, fn: BatchFn, payload: Any) -> Any:
        """``fn`` on the worker thread, without a deadline (session bookkeeping)."""
        return await self.require_ready().submit(fn, payload)

    async def decide(self, task: str, fn: BatchFn, payload: Any, fallback: Callable[[], Any],
                     started: float | None = None) -> tuple[Any, str, float]:
        """(answer, "policy" | "fallback", latency_ms): the batched model decision if it is
        ready within the deadline, else ``fallback()`` (counted); a model error is logged
        and answered by the fallback too."""
        batcher = self.require_ready()
        t0 = time.perf_counter() if started is None else started
        future = batcher.submit(fn, payload)
        deadline = self.settings.deadline_ms / 1000.0
        left = deadline - (time.perf_counter() - t0) if deadline > 0 else None
        try:
            if left is None:
                answer, source = await future, "policy"
            else:
                answer, source = await asyncio.wait_for(future, timeout=max(left, 0.0)), "policy"
        except (asyncio.TimeoutError, TimeoutError):
            answer, source = fallback(), "fallback"
            self.metrics.fallbacks.labels(task, "deadline").inc()
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001 - the model failed: the client still gets an answer
            log.error("%s: the model failed (%s: %s); answered by the fallback", task, type(e).__name__, e)
            answer, source = fallback(), "fallback"
            self.metrics.fallbacks.labels(task, "error").inc()
            self.metrics.errors.labels(task, "model").inc()
        latency_s = time.perf_counter() - t0
        self.metrics.decisions.labels(task, source).inc()
        self.metrics.latency.labels(task).observe(latency_s)
        return answer, source, latency_s * 1000.0


def create_app(adapters: Mapping[str, str | Path], settings: ServeSettings | None = None,
               task_options: Mapping[str, Any] | None = None, device: str = "auto",
               hub: Any = None, dtype: str = "auto") -> Any:
    """The app serving ``adapters`` ({task: adapter folder}). Everything a user can get
    wrong (unknown task, a task that cannot be served, a bad fallback name) is checked
    here, before the models load; ``hub`` (a loaded :class:`ModelHub`) skips loading."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from netllm.registry import get_task

    settings = settings or ServeSettings()
    settings.check()
    fallbacks = dict(settings.fallbacks or {})
    for name in fallbacks:
        if name not in adapters:
            raise NetLLMError(f"--fallback {name}=...: no --adapter {name}=... is served")
    if hub is None:
        from netllm.serve.hub import check_adapters

        check_adapters(adapters)  # mismatched adapters fail here, before the server starts
    tasks = {name: get_task(name) for name in adapters}
    services: dict[str, Any] = {}
    metrics = ServeMetrics()
    ctx = ServeContext(settings, metrics)
    for name, task in tasks.items():
        if task.ServeOptions is None:
            raise NetLLMError(f"--adapter {name}=...: task {name!r} is not served over HTTP ({task.serve_note})")
        choice = fallbacks.get(name, task.fallbacks[0] if task.fallbacks else "")
        if choice not in task.fallbacks:
            raise NetLLMError(f"--fallback {name}={choice}: choose one of {', '.join(task.fallbacks)}")
        options = (task_options or {}).get(name) or task.ServeOptions.build()
        services[name] = task.service(ctx, options, choice)

    def load() -> None:
        try:
            from netllm.serve.hub import ModelHub

            loaded = hub if hub is not None else ModelHub(adapters, device=device, dtype=dtype)
            for name, service in services.items():
                service.bind(loaded.models[name], loaded.folders[name])
            ctx.hub = loaded
            ctx.batcher = Batcher(settings.batch_window_ms / 1000.0, on_batch=ctx.on_batch)
            ctx.ready = True
            log.info("ready: %s", loaded.describe())
        except NetLLMError as e:
            ctx.error = f"loading failed: {e}"
            log.error("%s", ctx.error)
        except Exception as e:  # noqa: BLE001
            ctx.error = f"loading failed: {type(e).__name__}: {e}"
            log.exception("loading failed")

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loader = threading.Thread(target=load, name="netllm-load", daemon=True)
        loader.start()
        reaper = asyncio.create_task(_expire_sessions(services, settings.session_ttl_s))
        yield
        reaper.cancel()
        if ctx.batcher is not None:
            ctx.batcher.close()

    app = FastAPI(title="NetLLM", version="1", lifespan=lifespan,
                  description="Trained NetLLM adapters answering real systems: one base LLM for every task.")
    app.state.ctx = ctx
    # players load pages from another origin (the segment server); Pensieve's player sends no preflight
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if first.get("type") == "json_invalid":
            message = f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Any:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.errors.labels("server", type(exc).__name__).inc()
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/healthz", summary="Ready once every model is loaded (503 while loading)")
    async def healthz() -> Any:
        if ctx.ready:
            return {"status": "ok", **ctx.hub.describe()}
        return JSONResponse({"status": "error" if ctx.error else "loading", "error": ctx.error},
                            status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, service in services.items():
            if hasattr(service, "open_sessions"):
                metrics.sessions.labels(name).set(service.open_sessions())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for service in services.values():
        app.include_router(service.router)
    return app


async def _expire_sessions(services: Mapping[str, Any], ttl_s: float) -> None:
    while True:
        await asyncio.sleep(min(ttl_s / 4, 5.0))
        for service in services.values():
            if hasattr(service, "expire"):
                service.expire(time.monotonic() - ttl_s)


def run(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """A real uvicorn server on 127.0.0.1 in a thread (tests, benchmarks, ``netllm play``)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        import httpx

        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "error":
                    raise NetLLMError(r.json()["error"])
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise NetLLMError(f"{self.url}: not ready after {timeout_s:.0f} s")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

