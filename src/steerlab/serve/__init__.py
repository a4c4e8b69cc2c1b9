"""``steerlab serve``: an OpenAI-compatible server for steered models.

Modules: ``app`` (routes, ``create_app``), ``schemas`` (request/response
bodies), ``specs`` (per-request steering by registered name), ``batcher``
(queue + worker thread), ``engine`` (batched KV-cached decoding),
``prepare`` (prompts, limits), ``stream`` (waiting on jobs, SSE framing),
``validation`` (error messages), ``guard``
(API key, body size), ``logs`` (JSON access log, Prometheus counters),
``runner`` (uvicorn in the foreground or a background thread).
"""

from __future__ import annotations

from steerlab.serve.app import create_app
from steerlab.serve.runner import background, run

__all__ = ["background", "create_app", "run"]
