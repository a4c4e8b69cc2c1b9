"""One small client for OpenAI-compatible ``/v1/chat/completions`` endpoints
(vLLM, llama.cpp server, steerlab serve, hosted APIs), shared by the judge and
the openai generation backend: retries with exponential backoff on 5xx, 429,
timeouts and dropped connections; other 4xx fail at once with the server's
message (a wrong model name or key will not fix itself).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx

from steerlab.errors import EvaluationError

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointUnavailable(EvaluationError):
    """The endpoint kept failing (5xx, timeouts, refused connections) after every retry."""


def chat_url(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` → ``…/v1/chat/completions``.

    A base URL with a path other than ``/v1`` (some hosted APIs) is used as given.
    """
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if urlsplit(base).scheme not in ("http", "https"):
        raise EvaluationError(
            f"Endpoint URL {base_url!r} has no http(s) scheme; write it like "
            "http://127.0.0.1:8000/v1."
        )
    if urlsplit(base).path in ("", "/"):
        base += "/v1"
    return base + "/chat/completions"


class ChatClient:
    """Thread-safe POSTs to one chat-completions endpoint, with retries.

    ``requests`` counts HTTP requests actually sent (retries included), which
    is what caching tests and cost estimates need. ``max_concurrency`` bounds
    both the open connections and the workers of :meth:`pool`.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 16.0, max_concurrency: int = 8) -> None:
        if max_concurrency < 1:
            raise EvaluationError("max_concurrency must be at least 1.")
        self.max_concurrency = max_concurrency
        self.url = chat_url(base_url)
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency,
                                max_keepalive_connections=max_concurrency),
        )
        self._lock = threading.Lock()
        self.requests = 0

    def close(self) -> None:
        self._client.close()

    def pool(self, name: str) -> ThreadPoolExecutor:
        """Worker threads for concurrent requests, as many as the client allows in flight."""
        return ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=name)

    def _sleep(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        time.sleep(delay * (1 + 0.1 * random.random()))

    def complete(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """POST one chat completion; return the parsed JSON body."""
        payload = {"model": self.model, "messages": messages, **params}
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
            try:
                resp = self._client.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                    except ValueError:
                        last = f"non-JSON body: {resp.text[:200]!r}"
                    else:
                        if isinstance(body, dict):
                            return body
                        last = f"unexpected body: {resp.text[:200]!r}"
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                else:
                    raise EvaluationError(
                        f"{self.url} refused the request with HTTP {resp.status_code}: "
                        f"{resp.text[:300]}. Check the model name ({self.model!r}), the API key "
                        "and that the server speaks the OpenAI chat-completions protocol."
                    )
            if attempt < self.max_retries:
                self._sleep(attempt)
        raise EndpointUnavailable(
            f"{self.url} failed {self.max_retries + 1} times (last: {last}). Check that the "
            "server is up and reachable, or raise the retry count."
        )


class ChatEndpoint:
    """Base of what talks to one chat-completions endpoint (the judge, the openai
    backend): it owns the :class:`ChatClient`, so the URL and model name live there once,
    and the sampling fields every request carries (``params``), so each request is built
    in one place (:meth:`ask`)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, *, timeout: float,
                 max_retries: int, backoff: float, max_concurrency: int,
                 params: dict[str, Any]) -> None:
        self.client = ChatClient(base_url, model, api_key, timeout=timeout,
                                 max_retries=max_retries, backoff=backoff,
                                 max_concurrency=max_concurrency)
        self.params = {k: v for k, v in params.items() if v is not None}

    def ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One completion of ``messages`` under ``params`` (the endpoint's raw reply)."""
        return self.client.complete(messages, **self.params)

    @property
    def model(self) -> str:
        return self.client.model

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (retries included; cache hits send none)."""
        return self.client.requests

    def close(self) -> None:
        self.client.close()


def message_text(body: dict[str, Any]) -> tuple[str, str | None]:
    """The first choice's message content and finish reason from a completion body."""
    try:
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EvaluationError(
            f"The endpoint's reply has no choices[0].message: {str(body)[:200]}"
        ) from exc
    return str(content), choice.get("finish_reason")
