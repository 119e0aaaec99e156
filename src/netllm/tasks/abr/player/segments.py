"""The segment server of a real-player run: the page, dash.js, the manifest and the
segments from one origin, each response held back by the link's round-trip time (this
kernel has no netem), and ``POST /log`` where the page leaves its per-chunk log.

    ip netns exec NS python -m netllm.tasks.abr.player.segments --root VIDEO_DIR --dashjs FILE \\
        --host 10.x.y.2 --port 8080 --rtt-ms 80 --log OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from netllm.utils import atomic_write_text

HERE = Path(__file__).resolve().parent


def segment_app(root: Path, dashjs: Path, rtt_ms: float, log: Path) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def round_trip(request: Request, call_next: Any) -> Any:
        await asyncio.sleep(rtt_ms / 1000.0)  # the first byte comes one RTT after the request
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    async def page() -> Any:
        return FileResponse(HERE / "index.html", media_type="text/html")

    @app.get("/player.js")
    async def player_js() -> Any:
        return FileResponse(HERE / "player.js", media_type="text/javascript")

    @app.get("/dash.all.min.js")
    async def dash_js() -> Any:
        return FileResponse(dashjs, media_type="text/javascript")

    @app.post("/log")
    async def write_log(request: Request) -> Any:
        body = await request.body()
        data = json.loads(body)
        atomic_write_text(log, json.dumps(data, indent=1) + "\n")
        return JSONResponse({"ok": True})

    app.mount("/video", StaticFiles(directory=root), name="video")
    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--dashjs", type=Path, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=80.0)
    ap.add_argument("--log", type=Path, required=True)
    args = ap.parse_args()
    uvicorn.run(segment_app(args.root, args.dashjs, args.rtt_ms, args.log), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
