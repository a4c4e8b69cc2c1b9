"""Dynamic batching: one worker thread owns the model and serves a bounded queue.

Requests wait in a queue (bounded: a full queue is refused at once, the HTTP
layer answers 503 with ``Retry-After``). The worker takes the oldest waiting
request plus every other waiting request with the *same steering*, up to
``max_batch_size``, waiting at most ``max_wait_s`` after the oldest one
arrived for the batch to fill, and runs them as one batched, KV-cached
generation.

Why group by steering instead of per-row masks: a group's forward passes are
exactly the forward passes offline ``steerlab generate`` runs with that spec,
so responses equal offline output by construction, and a spec that fails when
applied fails only the requests that asked for it. Requests with other
steering wait for the next batch; the oldest request always goes first, so
nothing starves. Requests whose client went away are dropped from the queue,
and from a running batch at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerlab.serve.engine import SamplingParams

log = logging.getLogger("steerlab.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass(frozen=True)
class Event:
    """What the worker tells a waiting request: ``start``, ``delta``, ``finish`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str = ""
    n_completion: int = 0
    status: int = 0


@dataclass(eq=False)
class Job:
    """One generation request, as the worker sees it; also the engine's row sink.

    Events are handed to the asyncio loop that owns the request with
    ``call_soon_threadsafe``, so the HTTP side just awaits ``events``.
    """

    id: str
    prompt_ids: Sequence[int]
    params: SamplingParams
    steer_key: Hashable
    specs: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _finished: bool = False
    _on_cancel: Callable[[], None] | None = None

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._cancelled.set()

    # -- RowSink ---------------------------------------------------------------------------
    def delta(self, text: str) -> None:
        self.emit(Event("delta", text=text))

    def finish(self, reason: str, n_completion: int, text: str) -> None:
        self._finished = True
        self.emit(Event("finish", text=text, finish_reason=reason, n_completion=n_completion))

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- control ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: drop this request wherever it is."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def fail(self, status: int, message: str) -> None:
        if not self._finished:
            self._finished = True
            self.emit(Event("error", text=message, status=status))

    @property
    def finished(self) -> bool:
        return self._finished


@dataclass
class BatchStats:
    """Counters the worker keeps for /metrics (read without a lock: ints are atomic enough)."""

    batches: int = 0
    rows: int = 0
    steps: int = 0
    dropped: int = 0
    rejected: int = 0
    max_batch_seen: int = 0
    busy_seconds: float = 0.0


RunGroup = Callable[[list[Job], list[Callable[[], None]]], int]
"""Runs one batch of same-steering jobs to completion and returns the forward passes run.
Answers it could not deliver with the model still hooked go to the list; the worker
delivers them once the batch is over and counted."""


class Batcher:
    """The queue and the worker thread. ``submit`` from any thread; ``start``/``stop`` once."""

    def __init__(self, run_group: RunGroup, *, max_batch_size: int = 16,
                 max_wait_s: float = 0.02, max_queue: int = 256) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.run_group = run_group
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._work, name="steerlab-serve-worker",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, let the running batch end, refuse what is still queued."""
        with self._cond:
            self._running = False
            leftover = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in leftover:
            job.fail(503, "The server is shutting down; retry against another instance.")
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- producer side ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise :class:`QueueFull` (never blocks)."""
        with self._cond:
            if not self._running:
                raise QueueFull("the server is shutting down")
            self._drop_cancelled()
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            job._on_cancel = self._purge
            self._pending.append(job)
            self._cond.notify_all()

    def _purge(self) -> None:
        """Drop cancelled jobs from the queue now (called when a client goes away)."""
        with self._cond:
            self._drop_cancelled()

    # -- worker side -----------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        if any(j.cancelled() for j in self._pending):
            kept = [j for j in self._pending if not j.cancelled()]
            self.stats.dropped += len(self._pending) - len(kept)
            self._pending = deque(kept)

    def _next_group(self) -> list[Job] | None:
        """Block until a batch is ready (full, or its oldest request waited long enough)."""
        with self._cond:
            while self._running:
                self._drop_cancelled()
                if not self._pending:
                    self._cond.wait()
                    continue
                oldest = self._pending[0]
                same = [j for j in self._pending if j.steer_key == oldest.steer_key]
                wait = oldest.arrival + self.max_wait_s - time.monotonic()
                if len(same) >= self.max_batch_size or wait <= 0:
                    group = same[: self.max_batch_size]
                    taken = set(map(id, group))
                    self._pending = deque(j for j in self._pending if id(j) not in taken)
                    return group
                self._cond.wait(timeout=wait)
        return None

    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            started = time.monotonic()
            self.active_rows = len(group)
            held: list[Callable[[], None]] = []
            failure: Exception | None = None
            try:
                steps = self.run_group(group, held)
            except Exception as exc:  # a bug must fail this batch, never the server
                log.exception("batch of %d requests failed", len(group))
                failure, steps = exc, 0
            s = self.stats  # counted before any answer leaves, so clients see them current
            s.dropped += sum(1 for j in group if j.cancelled() and not j.finished)
            s.batches += 1
            s.rows += len(group)
            s.steps += steps
            s.max_batch_seen = max(s.max_batch_seen, len(group))
            s.busy_seconds += time.monotonic() - started
            self.active_rows = 0
            for deliver in held:
                deliver()
            for job in group:
                if failure is not None:
                    job.fail(500, f"Internal error while generating: {type(failure).__name__}.")
                job.fail(500, "Generation ended without a result.")
