"""ASGI middleware that refuses requests before anything parses them:
a missing or wrong bearer key (401) and oversized bodies (413).

The body cap counts the bytes actually received, so a chunked upload (no Content-Length)
or one whose Content-Length understates it is refused like a declared oversize one.
"""

from __future__ import annotations

import hmac
import json
from collections import deque
from typing import Any

from steerlab.serve.logs import ASGIApp, Receive, Scope, Send
from steerlab.serve.prepare import openai_error

DRAIN_FACTOR = 8


class Guard:
    """Bearer-key check (when ``api_key`` is set) on every HTTP request, and a body cap."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.key is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await _reply(send, 401, "Missing or wrong API key: send the header "
                             "'Authorization: Bearer KEY' with the key the server was started "
                             "with.", extra=[(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        too_large = f"The request body is larger than {self.max_body_bytes} bytes."
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _reply(send, 413, too_large)
            return
        messages, over = await _read_body(receive, self.max_body_bytes)
        if over:
            await _reply(send, 413, too_large, extra=[(b"connection", b"close")])
            return
        pending = deque(messages)

        async def replay() -> Any:
            return pending.popleft() if pending else await receive()

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, limit: int) -> tuple[list[Any], bool]:
    """The request's body messages, and whether they add up to more than ``limit`` bytes.

    An oversize body is read on (and dropped) up to ``DRAIN_FACTOR`` times the limit, so a
    client still uploading can read the 413 instead of a reset connection.
    """
    messages: list[Any] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return [*messages, message], False
        total += len(message.get("body", b""))
        if total <= limit:
            messages.append(message)
        if not message.get("more_body", False) or total > DRAIN_FACTOR * limit:
            return messages, total > limit


async def _reply(send: Send, status: int, message: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(openai_error(status, message)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
