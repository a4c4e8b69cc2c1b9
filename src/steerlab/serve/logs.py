"""Structured access log (one JSON line per request) and Prometheus-text counters.

The access log never records prompt or response text, only sizes, timing and
a hash of the steering spec, so logs can be shared without leaking prompts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ACCESS_LOGGER = "steerlab.serve.access"
LOG_KEY = "steerlab.access"
"""Key in the ASGI scope where handlers record tokens, steering hash and finish reason."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Metrics:
    """Thread-safe counters, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, path: str, status: int, latency: float, tokens_in: int,
                tokens_out: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            self.prompt_tokens += tokens_in
            self.completion_tokens += tokens_out
            self.latency_sum += latency
            self.latency_count += 1

    def render(self, gauges: dict[str, tuple[str, str, float]]) -> str:
        """Counters plus ``gauges`` (name -> (type, help, value)) as Prometheus text."""
        with self._lock:
            lines = [
                "# HELP steerlab_requests_total HTTP requests answered, by path and status.",
                "# TYPE steerlab_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                labels = f'path="{_esc(path)}",status="{status}"'
                lines.append(f"steerlab_requests_total{{{labels}}} {n}")
            scalars = {
                "steerlab_prompt_tokens_total": ("counter", "Prompt tokens processed.",
                                                 self.prompt_tokens),
                "steerlab_completion_tokens_total": ("counter", "Tokens generated.",
                                                     self.completion_tokens),
                "steerlab_request_latency_seconds_sum": ("counter",
                                                         "Total request latency in seconds.",
                                                         self.latency_sum),
                "steerlab_request_latency_seconds_count": ("counter", "Requests timed.",
                                                           self.latency_count),
            }
        for name, (kind, help_text, value) in {**scalars, **gauges}.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(round(float(value), 6))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class AccessLog:
    """ASGI middleware: times each HTTP request to its last byte, logs it, counts it.

    Handlers add fields (``tokens_in``, ``tokens_out``, ``steer_hash``,
    ``finish_reason``, ``id``) to ``scope[LOG_KEY]``; streaming responses are
    timed until the stream ends.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 logger: logging.Logger | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record: dict[str, Any] = {"id": f"req-{uuid.uuid4().hex[:16]}"}
        scope[LOG_KEY] = record
        started = time.perf_counter()
        status = 500
        logged = False

        def finish() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            latency = time.perf_counter() - started
            self._log(scope, record, status, latency)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not logged:  # the client left mid-stream, or the app raised
                record.setdefault("finish_reason", "client_disconnected" if status < 500
                                  else "error")
                finish()

    def _log(self, scope: Scope, record: dict[str, Any], status: int, latency: float) -> None:
        tokens_in = int(record.get("tokens_in", 0))
        tokens_out = int(record.get("tokens_out", 0))
        path = str(scope.get("path", ""))
        self.metrics.observe(path if path in KNOWN_PATHS else "other", status, latency,
                             tokens_in, tokens_out)
        entry = {
            "ts": round(time.time(), 3),
            "id": record.get("id"),
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "latency_ms": round(latency * 1000, 1),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "steer_hash": record.get("steer_hash"),
            "finish_reason": record.get("finish_reason"),
            "stream": record.get("stream", False),
        }
        self.logger.info(json.dumps(entry, separators=(",", ":")))


KNOWN_PATHS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health",
                         "/metrics"})
