"""VP over HTTP (``netllm serve --adapter vp=runs/vp``): the next ``fw`` orientations from
the last ``hw``, one LLM pass per batch of requests that arrive together.

    POST /v1/vp/predict  {"history_deg": [[roll, pitch, yaw], ...hw]} -> {"future_deg": [...fw], ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from netllm.model import NetLLM
from netllm.options import Options
from netllm.tasks.vp.baselines import BASELINES, make_baseline

# no-motion first: the default fallback
FALLBACKS = ("no-motion",) + tuple(b for b in BASELINES if b != "no-motion")

Angle = Annotated[float, Field(allow_inf_nan=False, ge=-720, le=720)]


@dataclass
class VPServeOptions(Options):
    """``netllm serve``'s VP flags (none yet)."""


class VPRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    history_deg: list[Annotated[list[Angle], Field(min_length=3, max_length=3)]] = Field(
        description="The last hw head orientations, oldest first, each [roll, pitch, yaw] in degrees")


class VPPrediction(BaseModel):
    future_deg: list[list[float]] = Field(description="The next fw orientations, [roll, pitch, yaw] in degrees")
    source: Literal["policy", "fallback"]
    latency_ms: float


class VPService:
    def __init__(self, ctx: Any, options: VPServeOptions, fallback: str) -> None:
        from netllm.serve.app import ClientError

        self.ctx, self.options, self.fallback_name = ctx, options, fallback
        self.policy: Any = None
        self.hw = self.fw = 0
        ctx.register("vp", self._predict_batch)
        router = APIRouter(tags=["vp"])

        @router.post("/v1/vp/predict", response_model=VPPrediction, summary="The next fw orientations")
        async def predict(request: VPRequest) -> VPPrediction:
            import time

            started = time.perf_counter()
            ctx.require_ready()
            history = np.asarray(request.history_deg, dtype=np.float64)
            if history.shape != (self.hw, 3):
                raise ClientError(f"history_deg: expected {self.hw} orientations (the adapter's hw), got "
                                  f"{history.shape[0]}", 422)
            future, source, latency_ms = await ctx.decide(
                "vp", self._predict_batch, history,
                fallback=lambda: self.fallback.predict(history[None])[0], started=started)
            return VPPrediction(future_deg=np.round(future, 4).tolist(), source=source,
                                latency_ms=round(latency_ms, 3))

        self.router = router

    def bind(self, model: NetLLM, folder: Path) -> None:
        from netllm.tasks.vp.task import NetLLMVPPolicy

        self.policy = NetLLMVPPolicy(model, name=folder.name)
        self.hw, self.fw = self.policy.hw, self.policy.fw
        self.fallback = make_baseline(self.fallback_name, self.fw)

    def _predict_batch(self, histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(self.policy.predict(np.stack(histories)))
