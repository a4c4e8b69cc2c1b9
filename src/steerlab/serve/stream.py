"""The HTTP side of a job: waiting on the worker's events (noticing clients that
leave), and framing answers as OpenAI server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from steerlab.serve import schemas as S
from steerlab.serve.batcher import Batcher, Event, Job, QueueFull
from steerlab.serve.prepare import openai_error

DISCONNECT_POLL_S = 0.25
"""How often a waiting request checks whether its client is still there."""
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while its request waited or ran."""


@dataclass(frozen=True)
class StreamMeta:
    """What every chunk of one streamed answer repeats."""

    id: str
    created: int
    model: str
    fingerprint: str


def usage_of(n_in: int, n_out: int) -> S.Usage:
    return S.Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)


async def gather_all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like ``asyncio.gather``, but the first failure cancels the others (no orphans)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class JobError(Exception):
    """The worker refused or failed the job; the event carries status and message."""

    def __init__(self, event: Event) -> None:
        super().__init__(event.text)
        self.event = event


async def next_event(job: Job, request: Request) -> Event:
    """The job's next event; cancels the job and raises ClientGone if the client left."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None
        except asyncio.CancelledError:
            job.cancel()
            raise


async def start(batcher: Batcher, job: Job, request: Request) -> None:
    """Queue the job and wait until its batch starts (errors here keep their HTTP status)."""
    try:
        batcher.submit(job)
    except QueueFull as exc:
        raise S.RequestError(None, f"The server is busy ({exc}); retry shortly.", status=503,
                             code="queue_full") from None
    event = await next_event(job, request)
    if event.kind == "error":
        raise JobError(event)


async def until_finish(job: Job, request: Request) -> Event:
    while True:
        event = await next_event(job, request)
        if event.kind == "finish":
            return event
        if event.kind == "error":
            raise JobError(event)


def sse_response(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse_data(obj: Any) -> str:
    payload = obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj
    for choice in payload.get("choices", []) if isinstance(payload, dict) else []:
        choice.setdefault("finish_reason", None)
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(job: Job, request: Request, record: dict[str, Any]) -> AsyncIterator[Event]:
    """Deltas, then one finish or error event; the job is cancelled if the stream is abandoned."""
    try:
        while True:
            event = await next_event(job, request)
            if event.kind == "finish":
                record.update(tokens_out=event.n_completion, finish_reason=event.finish_reason)
            elif event.kind == "error":
                record.update(finish_reason="error")
            yield event
            if event.kind in ("finish", "error"):
                return
    except ClientGone:
        record.update(finish_reason="client_disconnected")
    finally:
        if not job.finished:
            job.cancel()


def error_sse(event: Event) -> str:
    return sse_data(openai_error(event.status, event.text))


def chat_stream(meta: StreamMeta, job: Job, request: Request, record: dict[str, Any],
                n_in: int, usage: bool) -> AsyncIterator[str]:
    def choice(text: str | None, finish: str | None = None) -> S.ChatChunkChoice:
        delta = S.Delta() if text is None else S.Delta(content=text)
        return S.ChatChunkChoice(index=0, delta=delta, finish_reason=finish)

    opening = S.ChatChunkChoice(index=0, delta=S.Delta(role="assistant", content=""))
    return _stream(meta, S.ChatCompletionChunk, choice, _events(job, request, record), n_in,
                   usage, opening)


def text_stream(meta: StreamMeta, job: Job, request: Request, record: dict[str, Any],
                n_in: int, usage: bool) -> AsyncIterator[str]:
    def choice(text: str | None, finish: str | None = None) -> S.TextChoice:
        return S.TextChoice(index=0, text=text or "", finish_reason=finish)

    return _stream(meta, S.Completion, choice, _events(job, request, record), n_in, usage)


async def _stream(meta: StreamMeta, chunk_type: Callable[..., Any],
                  choice: Callable[..., Any], events: AsyncIterator[Event], n_in: int,
                  include_usage: bool, opening: Any = None) -> AsyncIterator[str]:
    """One answer as OpenAI chunks of ``chunk_type``: the ``opening`` choice (if any), each
    delta's text, an error event or the closing choice (and the usage chunk when asked),
    then ``[DONE]``. ``choice(None, reason)`` is the closing choice; the usage chunk has no
    choices and no fingerprint."""

    def chunk(*choices: Any, usage: S.Usage | None = None) -> str:
        return sse_data(chunk_type(id=meta.id, created=meta.created, model=meta.model,
                                   choices=list(choices), usage=usage,
                                   system_fingerprint=meta.fingerprint if choices else None))

    if opening is not None:
        yield chunk(opening)
    async for event in events:
        if event.kind == "delta":
            yield chunk(choice(event.text))
        elif event.kind == "error":
            yield error_sse(event)
        elif event.kind == "finish":
            yield chunk(choice(None, event.finish_reason))
            if include_usage:
                yield chunk(usage=usage_of(n_in, event.n_completion))
    yield "data: [DONE]\n\n"
