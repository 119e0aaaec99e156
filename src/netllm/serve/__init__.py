"""``netllm serve``: trained adapters answer a real system over HTTP.

One frozen base LLM is loaded once (:class:`~netllm.serve.hub.ModelHub`); every adapter is
attached to it as a named peft adapter and switched per call, so several tasks share one
model in memory. Decisions of requests that arrive together are made in one batched call
on one worker thread (:class:`~netllm.serve.batcher.Batcher`); a decision not ready
within the deadline is answered by the task's fallback policy from the same observation
(:class:`~netllm.serve.app.ServeContext`). A task plugs in with ``Task.service`` (its
routes, request / response models and per-session state); the framework names none.

    app = create_app({"abr": "runs/abr"}, ServeSettings(deadline_ms=200))
    uvicorn.run(app, port=8333)
"""

from netllm.serve.app import ServeContext, ServeSettings, create_app
from netllm.serve.hub import ModelHub

__all__ = ["ModelHub", "ServeContext", "ServeSettings", "create_app"]
