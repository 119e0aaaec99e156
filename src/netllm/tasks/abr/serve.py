"""ABR over HTTP (``netllm serve --adapter abr=runs/abr``): sessions, and Pensieve's protocol.

    POST /v1/abr/sessions                 -> {"session_id", ...}   a player starts a video
    POST /v1/abr/sessions/{id}/decide     one chunk's observation -> {"level", "source", "latency_ms"}
    DELETE /v1/abr/sessions/{id}
    POST /                                Pensieve's dash.js body -> the level as plain text

A session is one row of the adapter's :class:`~netllm.rl.IncrementalPolicy` (its own KV
cache and return-to-go) plus the 6x6 observation history the simulator keeps, built from
the request fields with the simulator's own normalisation, so the same chunks give the
same decisions as ``netllm eval``. The reward of a chunk (QoE: bitrate − 4.3 × stall −
bitrate change) is computed from the level the player says it played (``last_level``),
so after a fallback answer the context records what was actually downloaded. Requests of
many sessions that arrive together are one batched LLM call.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from netllm.heads import stable_argmax
from netllm.model import NetLLM, read_adapter_config
from netllm.options import Options, opt
from netllm.rl import IncrementalPolicy
from netllm.tasks.abr.baselines import bba_levels
from netllm.tasks.abr.env import BITRATES_MBPS, BUFFER_NORM_S, CHUNKS_LEFT_CAP, HISTORY, qoe
from netllm.tasks.abr.traces import BITRATES_KBPS, NUM_LEVELS

# hold-bba (the default): the level just played, lowered to BBA's when the buffer is short;
# bba: BBA's level alone, which jumps to the top level whenever the buffer is long — mixed
# into a policy that keeps long buffers it stalls (benchmarks/serve_load.py on fcc-holdout:
# QoE 0.60 with hold-bba, -0.18 with bba, at 16-17 % fallbacks; docs/serving.md)
FALLBACKS = ("hold-bba", "bba")


def fallback_level(name: str, obs: "ChunkObservation") -> int:
    bba = int(bba_levels(np.array([obs.buffer_s]))[0])
    return bba if name == "bba" else min(obs.last_level, bba)


@dataclass
class ABRServeOptions(Options):
    """``netllm serve``'s ABR flags (``--abr-<name>``)."""

    video: str = opt("video1", "Video whose chunk sizes the Pensieve-compatible POST / assumes (video1, video2 "
                               "or a folder of video_size_0..5).")
    target_return: float | None = opt(None, "Return-to-go a session starts from (default: the adapter's).")

    def check(self) -> None:
        super().check()
        from netllm.tasks.abr.task import check_videos

        check_videos(self.video, "--abr-video")


PositiveBytes = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ChunkObservation(BaseModel):
    """What the player measured for the chunk it has just downloaded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    last_level: int = Field(ge=0, le=NUM_LEVELS - 1, description="Level (0..5) of the chunk just downloaded")
    buffer_s: float = Field(ge=0, allow_inf_nan=False, description="Buffer after that chunk arrived (s)")
    rebuffer_s: float = Field(ge=0, allow_inf_nan=False, description="Stall while it downloaded (s)")
    last_chunk_bytes: float = Field(gt=0, allow_inf_nan=False, description="Its size (bytes)")
    download_ms: float = Field(gt=0, allow_inf_nan=False, description="Request to last byte (ms)")
    next_chunk_bytes: list[PositiveBytes] = Field(min_length=NUM_LEVELS, max_length=NUM_LEVELS,
                                          description="Sizes of the next chunk at the six levels (bytes)")
    chunks_left: int = Field(ge=0, description="Chunks of the video still to download")



class SessionOpened(BaseModel):
    session_id: str
    target_return: float
    max_idle_s: float


class ABRDecision(BaseModel):
    level: int = Field(description="Level of the next chunk (0..5)")
    bitrate_kbps: int
    source: Literal["policy", "fallback"]
    latency_ms: float


class PensieveReport(BaseModel):
    """The body Pensieve's patched dash.js posts once per chunk (extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    lastquality: int = Field(ge=0, le=NUM_LEVELS - 1)
    buffer: float = Field(ge=0, allow_inf_nan=False)
    RebufferTime: float = Field(ge=0, allow_inf_nan=False)
    lastChunkStartTime: float = Field(allow_inf_nan=False)
    lastChunkFinishTime: float = Field(allow_inf_nan=False)
    lastChunkSize: float = Field(gt=0, allow_inf_nan=False)
    lastRequest: int = Field(ge=0)


@dataclass
class Session:
    id: str
    row: int
    last_seen: float
    steps: int = 0  # decisions recorded in the row's context
    prev_level: int = 0  # the level of the chunk before the last one (the simulator starts at 0)
    state: np.ndarray = field(default_factory=lambda: np.zeros((NUM_LEVELS, HISTORY)))
    closed: bool = False
    pensieve_chunk: int = -1  # Pensieve endpoint: the last chunk index reported
    pensieve_rebuffer_ms: float = 0.0


def observation_state(state: np.ndarray, obs: ChunkObservation) -> np.ndarray:
    """The simulator's 6x6 history after one more chunk (``BatchABREnv._fetch``'s normalisation)."""
    state = np.roll(state, -1, axis=1)
    state[0, -1] = BITRATES_KBPS[obs.last_level] / float(BITRATES_KBPS.max())
    state[1, -1] = obs.buffer_s / BUFFER_NORM_S
    state[2, -1] = obs.last_chunk_bytes / obs.download_ms / 1000.0
    state[3, -1] = obs.download_ms / 1000.0 / BUFFER_NORM_S
    state[4, :NUM_LEVELS] = np.asarray(obs.next_chunk_bytes, dtype=np.float64) / 1e6
    state[5, -1] = min(obs.chunks_left, CHUNKS_LEFT_CAP) / float(CHUNKS_LEFT_CAP)
    return state


class ABRService:
    def __init__(self, ctx: Any, options: ABRServeOptions, fallback: str) -> None:
        from netllm.serve.app import ClientError, Unavailable
        from netllm.tasks.abr.traces import load_video

        self.ctx, self.options, self.fallback = ctx, options, fallback
        self.video = load_video(options.video)
        self.capacity = ctx.settings.max_sessions
        self.sessions: dict[str, Session] = {}
        self.pensieve: dict[str, str] = {}  # client host -> session id
        self.free = list(range(self.capacity - 1, -1, -1))
        self.lock = threading.Lock()
        self.model: NetLLM | None = None
        self.inc: IncrementalPolicy | None = None
        self.target = 0.0
        ctx.register("abr", self._decide_batch)
        router = APIRouter(tags=["abr"])

        @router.post("/v1/abr/sessions", response_model=SessionOpened, status_code=201,
                     summary="Open a session: one player, one video")
        async def open_session() -> SessionOpened:
            ctx.require_ready()
            session = self.open()
            return SessionOpened(session_id=session.id, target_return=self.target,
                                 max_idle_s=ctx.settings.session_ttl_s)

        @router.post("/v1/abr/sessions/{session_id}/decide", response_model=ABRDecision,
                     summary="The level of the next chunk, from the chunk just downloaded")
        async def decide(session_id: str, obs: ChunkObservation) -> ABRDecision:
            started = time.perf_counter()
            ctx.require_ready()
            return await self.decide(self.get(session_id), obs, started)

        @router.delete("/v1/abr/sessions/{session_id}", status_code=204, response_model=None,
                       response_class=Response, summary="Close a session")
        async def close(session_id: str) -> Response:
            self.close(self.get(session_id))
            return Response(status_code=204)

        @router.post("/", response_class=PlainTextResponse,
                     summary="Pensieve's ABR server protocol (its patched dash.js posts here)")
        async def pensieve(request: Request) -> Any:
            from fastapi.exceptions import RequestValidationError

            started = time.perf_counter()
            headers = {"Access-Control-Allow-Origin": "*"}
            body = await request.body()
            try:
                raw = json.loads(body)
            except ValueError as e:
                raise ClientError(f"body: not valid JSON ({e})", 422) from None
            if isinstance(raw, dict) and "pastThroughput" in raw:  # the end-of-video summary
                return PlainTextResponse("", headers=headers)
            try:
                report = PensieveReport.model_validate(raw)
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            if report.lastChunkFinishTime <= report.lastChunkStartTime:
                raise ClientError("lastChunkFinishTime: must be after lastChunkStartTime", 422)
            ctx.require_ready()
            answer = await self.pensieve_decide(request.client.host if request.client else "?", report, started)
            return PlainTextResponse(answer, headers=headers)

        self.router = router
        self._client_error, self._unavailable = ClientError, Unavailable

    # ------------------------------------------------------------------ model

    def bind(self, model: NetLLM, folder: Path) -> None:
        config = read_adapter_config(folder)
        self.target = float(self.options.target_return if self.options.target_return is not None
                            else config.get("extra", {}).get("target_return", 40.0))
        self.model = model
        self.inc = IncrementalPolicy(model, target=self.target, batch_size=self.capacity)

    # ------------------------------------------------------------------ sessions

    def open(self) -> Session:
        with self.lock:
            if not self.free:
                raise self._unavailable(f"abr: all {self.capacity} sessions are in use (--max-sessions); close one "
                                        "(DELETE /v1/abr/sessions/ID) or wait for idle ones to expire")
            session = Session(id=uuid.uuid4().hex, row=self.free.pop(), last_seen=time.monotonic())
            self.sessions[session.id] = session
            return session

    def get(self, session_id: str) -> Session:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise self._client_error(f"abr: unknown session {session_id!r} (closed, expired or never opened)", 404)
            session.last_seen = time.monotonic()
            return session

    def close(self, session: Session) -> None:
        with self.lock:
            if self.sessions.pop(session.id, None) is not None:
                session.closed = True
                self.free.append(session.row)

    def expire(self, before: float) -> None:
        with self.lock:
            idle = [s for s in self.sessions.values() if s.last_seen < before]
        for session in idle:
            self.close(session)
        with self.lock:
            self.pensieve = {h: sid for h, sid in self.pensieve.items() if sid in self.sessions}

    def open_sessions(self) -> int:
        with self.lock:
            return len(self.sessions)

    # ------------------------------------------------------------------ decisions

    async def decide(self, session: Session, obs: ChunkObservation, started: float) -> ABRDecision:
        level, source, latency_ms = await self.ctx.decide(
            "abr", self._decide_batch, (session, obs),
            fallback=lambda: fallback_level(self.fallback, obs), started=started)
        return ABRDecision(level=int(level), bitrate_kbps=int(BITRATES_KBPS[level]), source=source,
                           latency_ms=round(latency_ms, 3))

    async def pensieve_decide(self, host: str, report: PensieveReport, started: float) -> str:
        chunk = report.lastRequest
        with self.lock:
            sid = self.pensieve.get(host)
            session = self.sessions.get(sid) if sid else None
        if session is not None and chunk <= session.pensieve_chunk:  # the player started again
            self.close(session)
            session = None
        if session is None:
            session = self.open()
            with self.lock:
                self.pensieve[host] = session.id
        session.last_seen = time.monotonic()
        rebuffer_ms = max(report.RebufferTime - session.pensieve_rebuffer_ms, 0.0)
        session.pensieve_chunk, session.pensieve_rebuffer_ms = chunk, report.RebufferTime
        sizes = self.video.sizes_bytes
        if chunk + 1 >= self.video.num_chunks:  # the last chunk is in: Pensieve's player reloads
            self.close(session)
            return "REFRESH"
        obs = ChunkObservation(
            last_level=report.lastquality, buffer_s=float(report.buffer), rebuffer_s=rebuffer_ms / 1000.0,
            last_chunk_bytes=float(report.lastChunkSize),
            download_ms=float(report.lastChunkFinishTime - report.lastChunkStartTime),
            next_chunk_bytes=[float(x) for x in sizes[:, chunk + 1]],
            chunks_left=self.video.num_chunks - chunk - 1)
        return str((await self.decide(session, obs, started)).level)

    def _decide_batch(self, items: Sequence[tuple[Session, ChunkObservation]]) -> list[Any]:
        """Worker thread: one batched decision for every session in ``items`` (a session
        asking twice in one batch has its requests decided one after the other)."""
        results: list[Any] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            seen: set[str] = set()
            now, later = [], []
            for i in pending:
                (later if items[i][0].id in seen else now).append(i)
                seen.add(items[i][0].id)
            self._decide_once(items, now, results)
            pending = later
        return results

    @torch.no_grad()
    def _decide_once(self, items: Sequence[tuple[Session, ChunkObservation]], index: list[int],
                     results: list[Any]) -> None:
        assert self.inc is not None and self.model is not None
        live = []
        with self.lock:
            for i in index:
                session = items[i][0]
                if session.closed:
                    results[i] = self._client_error(f"abr: session {session.id!r} was closed", 404)
                else:
                    live.append(i)
        if not live:
            return
        sessions = [items[i][0] for i in live]
        fresh = [s.row for s in sessions if s.steps == 0]
        try:
            for row in fresh:
                self.inc.restart([row], self.target)
            rec_rows, rec_levels, rec_rewards, states = [], [], [], []
            for i in live:
                session, obs = items[i]
                reward = float(qoe(BITRATES_MBPS[obs.last_level], obs.rebuffer_s, BITRATES_MBPS[session.prev_level]))
                if session.steps > 0:
                    rec_rows.append(session.row)
                    rec_levels.append(obs.last_level)
                    rec_rewards.append(reward)
                session.prev_level = obs.last_level
                session.state = observation_state(session.state, obs)
                states.append(session.state.astype(np.float32))
            if rec_rows:
                self.inc.record(torch.as_tensor(rec_levels), torch.as_tensor(rec_rewards, dtype=torch.float32),
                                rows=rec_rows)
            from netllm.tasks.abr.task import obs_states

            batch = {k: torch.from_numpy(v) for k, v in obs_states(np.stack(states)).items()}
            hidden = self.inc.decide(batch, rows=[s.row for s in sessions])
            levels = stable_argmax(self.model.heads["action"](hidden).float().cpu()).numpy()
        except Exception:
            for s in sessions:  # their contexts restart at the next chunk; the history stays
                s.steps = 0
            raise
        for i, session, level in zip(live, sessions, levels):
            session.steps += 1
            results[i] = int(level)
