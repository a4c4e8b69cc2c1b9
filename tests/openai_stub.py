"""A tiny OpenAI-compatible chat-completions server over real HTTP on 127.0.0.1,
scripted per test: fail the first N requests with a status, answer with any
content (valid JSON verdicts, garbage, echoes), delay answers, and count calls
and the most requests in flight at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def user_text(request: dict[str, Any]) -> str:
    """The last user message of a chat-completions request."""
    return [m["content"] for m in request["messages"] if m["role"] == "user"][-1]


class OpenAIStub:
    """Run with ``with OpenAIStub(content=...) as stub: stub.url``."""

    def __init__(self, content: Callable[[dict[str, Any]], str] | None = None, *,
                 fail_first: int = 0, fail_status: int = 500, delay: float = 0.0) -> None:
        self.content = content or (lambda req: '{"compliance": 1, "coherence": 1, "reason": "ok"}')
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub._lock:
                    stub.calls += 1
                    n = stub.calls
                    stub.inflight += 1
                    self._in_flight = True
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                    stub.headers.append(dict(self.headers))
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    if self.path != "/v1/chat/completions":
                        self._send(404, {"error": f"no route {self.path}"})
                        return
                    request = json.loads(body)
                    with stub._lock:
                        stub.requests.append(request)
                    if n <= stub.fail_first:
                        self._send(stub.fail_status, {"error": "scripted failure"})
                        return
                    text = stub.content(request)
                    self._send(200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion",
                        "model": request.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()),
                                  "total_tokens": 1 + len(text.split())},
                    })
                finally:
                    self._answered()

            def _answered(self) -> None:
                # Before the answer is written: a client that sends its next request as soon
                # as this one returns must not find this one still counted.
                with stub._lock:
                    if getattr(self, "_in_flight", False):
                        stub.inflight -= 1
                        self._in_flight = False

            def _send(self, status: int, obj: dict[str, Any]) -> None:
                self._answered()
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
