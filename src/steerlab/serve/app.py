"""The FastAPI application: OpenAI-compatible routes over one dynamic batcher.

Example:
    >>> app = create_app(load_model("default"), {"persona": Direction.load("dirs/persona")})
    ... # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                    # doctest: +SKIP

One app owns the model while it runs (its worker thread registers steering
hooks on it); do not generate with the same ``LoadedModel`` elsewhere while
requests are running. One model per server: ``/v1/models`` names it, and a request
whose ``model`` field names another is answered 404 ``model_not_found`` as the OpenAI API
does. The id, the model spec the server was started with and each ``model_aliases`` entry
(``steerlab serve --model-alias NAME``) are accepted; a request without ``model`` is too.
Extensions to the OpenAI body: ``steer`` (see :mod:`steerlab.serve.schemas`) and ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlab.directions.artifact import Direction
from steerlab.errors import SteerlabError
from steerlab.generation.generate import eos_ids
from steerlab.interventions.steering import check_specs, steer
from steerlab.model.loading import LoadedModel
from steerlab.serve import schemas as S
from steerlab.serve.batcher import Batcher, Event, Job
from steerlab.serve.engine import Row, SamplingParams, decode
from steerlab.serve.guard import Guard
from steerlab.serve.logs import LOG_KEY, AccessLog, Metrics
from steerlab.serve.prepare import (
    Limits,
    chat_prompt_ids,
    check_max_tokens,
    completion_prompt_ids,
    openai_error,
    sampling_params,
)
from steerlab.serve.specs import ResolvedSteer, SteerRegistry
from steerlab.serve.stream import (
    ClientGone,
    JobError,
    StreamMeta,
    chat_stream,
    gather_all,
    sse_response,
    start,
    text_stream,
    until_finish,
    usage_of,
)
from steerlab.serve.validation import format_validation_error


@dataclass
class ServerState:
    """Everything the routes share."""

    lm: LoadedModel
    model_id: str
    model_names: frozenset[str]
    registry: SteerRegistry
    batcher: Batcher
    limits: Limits
    metrics: Metrics
    created: int

    def job(self, ids: list[int], params: SamplingParams, steer: ResolvedSteer,
            record: dict[str, Any]) -> Job:
        return Job(id=str(record.get("id", uuid.uuid4().hex)), prompt_ids=ids, params=params,
                   steer_key=steer.key, specs=steer.specs, loop=asyncio.get_running_loop())

    def check_model(self, name: str | None) -> None:
        """404 for a model this server does not serve (None: the client did not say)."""
        if name is not None and name not in self.model_names:
            also = ", ".join(sorted(self.model_names - {self.model_id})) or "none"
            raise S.RequestError("model", f"the model {name!r} does not exist here; this "
                                 f"server serves {self.model_id!r} (also accepted: {also}).",
                                 status=404, code="model_not_found")


def create_app(
    lm: LoadedModel,
    directions: Mapping[str, Direction],
    default_steer: Sequence[Any] = (),
    *,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_wait_ms: float = 20,
    max_queue: int = 256,
    max_new_tokens_limit: int = 1024,
    max_context: int | None = None,
    max_body_bytes: int = 8 * 2**20,
    model_id: str | None = None,
    model_aliases: Sequence[str] = (),
) -> FastAPI:
    """Build the server for ``lm`` with the named ``directions`` requests may steer with.

    ``default_steer`` (intervention specs) applies to requests without a
    ``steer`` field; ``"steer": []`` asks for the unsteered model.
    """
    for name, direction in directions.items():
        direction.check_compatible(lm, allow_mismatch=True)
        if not name:
            raise SteerlabError("Direction names must not be empty.")

    check_specs(lm, default_steer)  # a bad default fails at startup, not on every request
    eos = eos_ids(lm)

    def run_group(jobs: list[Job], held: list[Callable[[], None]]) -> int:
        return _run_group(lm, jobs, eos, held)

    state = ServerState(
        lm=lm,
        model_id=model_id or lm.name,
        model_names=frozenset({model_id or lm.name, lm.spec, *model_aliases}),
        registry=SteerRegistry(directions, lm.n_layers, default_steer),
        batcher=Batcher(run_group, max_batch_size=max_batch_size,
                        max_wait_s=max_wait_ms / 1000, max_queue=max_queue),
        limits=Limits.for_model(lm, max_new_tokens_limit, max_context),
        metrics=Metrics(),
        created=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.batcher.stop)

    app = FastAPI(title="steerlab serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.steerlab = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(AccessLog, metrics=state.metrics)
    return app


def _run_group(lm: LoadedModel, jobs: list[Job], eos: frozenset[int],
               held: list[Callable[[], None]]) -> int:
    """Worker side: apply the group's steering once, then decode all its rows together.

    The last rows' answers go to ``held``: the batcher delivers them after the
    hooks are gone and the batch is counted.
    """
    with ExitStack() as stack:
        if jobs[0].specs:
            try:
                stack.enter_context(steer(lm, list(jobs[0].specs)))
            except SteerlabError as exc:
                for job in jobs:
                    job.fail(400, f"steer: {exc}")
                return 0
        for job in jobs:
            job.emit(Event("start"))
        try:
            return decode(lm, [Row(j.prompt_ids, j.params, j) for j in jobs], eos=eos,
                          held=held)
        except SteerlabError as exc:
            for job in jobs:
                job.fail(400, str(exc))
            return 0


# -- routes --------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, st: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = st.batcher.alive
        return JSONResponse(
            {"status": "ok" if ok else "worker stopped", "model": st.model_id,
             "queue": st.batcher.queue_depth, "directions": st.registry.names},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        b = st.batcher
        gauges = {
            "steerlab_queue_depth": ("gauge", "Requests waiting for a batch.", b.queue_depth),
            "steerlab_active_rows": ("gauge", "Rows in the running batch.", b.active_rows),
            "steerlab_batches_total": ("counter", "Batches run.", b.stats.batches),
            "steerlab_batch_rows_total": ("counter", "Requests run in batches.", b.stats.rows),
            "steerlab_forward_passes_total": ("counter", "Model forward passes.", b.stats.steps),
            "steerlab_dropped_total": ("counter", "Requests dropped after their client left.",
                                       b.stats.dropped),
            "steerlab_rejected_total": ("counter", "Requests refused with a full queue (503).",
                                        b.stats.rejected),
            "steerlab_busy_seconds_total": ("counter", "Seconds the worker spent generating.",
                                            b.stats.busy_seconds),
        }
        return PlainTextResponse(st.metrics.render(gauges),
                                 media_type="text/plain; version=0.0.4")

    def card() -> S.ModelCard:
        return S.ModelCard(id=st.model_id, created=st.created, directions=st.registry.names)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return S.ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        st.check_model(model)
        return card().model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Response:
        record = _record(request)
        st.check_model(body.model)
        requested = body.max_completion_tokens or body.max_tokens
        check_max_tokens(st.limits, requested)
        steer = st.registry.resolve(body.steer)
        ids = await run_in_threadpool(chat_prompt_ids, st.lm, body.messages)
        params = sampling_params(body, len(ids), st.limits, requested, "messages")
        return await answer(request, record, body, steer, [(ids, params)], "chatcmpl",
                            chat_stream, S.ChatCompletion, lambda results: [S.ChatChoice(
                                index=0, message=S.AssistantMessage(content=results[0].text),
                                finish_reason=results[0].finish_reason)])

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request) -> Response:
        record = _record(request)
        st.check_model(body.model)
        check_max_tokens(st.limits, body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) != 1:
            raise S.RequestError("prompt", "streaming takes a single prompt; send one string.")
        steer = st.registry.resolve(body.steer)
        prepared = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            ids = await run_in_threadpool(completion_prompt_ids, st.lm, prompt, param)
            prepared.append((ids, sampling_params(body, len(ids), st.limits, body.max_tokens,
                                                  param)))
        return await answer(request, record, body, steer, prepared, "cmpl", text_stream,
                            S.Completion, lambda results: [
                                S.TextChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                                for i, r in enumerate(results)])

    async def answer(request: Request, record: dict[str, Any], body: S.SamplingFields,
                     steer: ResolvedSteer, prepared: list[tuple[list[int], SamplingParams]],
                     prefix: str, stream: Callable[..., AsyncIterator[str]],
                     reply: Callable[..., Any], choices: Callable[[list[Event]], list[Any]]
                     ) -> Response:
        """Queue one job per prepared prompt; stream the first, or wait for all and answer
        with a ``reply`` of their ``choices``. Any failure (or a client that leaves: 499)
        cancels every job."""
        n_in = sum(len(ids) for ids, _ in prepared)
        record.update(tokens_in=n_in, steer_hash=steer.hash, stream=body.stream)
        jobs = [st.job(ids, params, steer, record) for ids, params in prepared]
        for k, job in enumerate(jobs):
            job.id = f"{job.id}-{k}" if len(jobs) > 1 else job.id
        meta = StreamMeta(f"{prefix}-{jobs[0].id}", int(time.time()), st.model_id,
                          st.lm.fingerprint)
        try:
            await gather_all(start(st.batcher, job, request) for job in jobs)
            if body.stream:
                return sse_response(stream(meta, jobs[0], request, record, n_in,
                                           _include_usage(body)))
            results = await gather_all(until_finish(job, request) for job in jobs)
        except BaseException as exc:
            for job in jobs:
                job.cancel()
            if isinstance(exc, ClientGone):
                return Response(status_code=499)
            raise
        n_out = sum(r.n_completion for r in results)
        record.update(tokens_out=n_out, finish_reason=",".join(r.finish_reason for r in results))
        return JSONResponse(reply(
            id=meta.id, created=meta.created, model=meta.model, system_fingerprint=meta.fingerprint,
            choices=choices(results), usage=usage_of(n_in, n_out)).model_dump())


def _record(request: Request) -> dict[str, Any]:
    record: dict[str, Any] = request.scope.setdefault(LOG_KEY, {"id": uuid.uuid4().hex[:16]})
    return record


def _include_usage(body: S.SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# -- errors --------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str, param: str | None = None, code: str | None = None,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(openai_error(status, message, param, code), status_code=status,
                            headers=dict(headers) if headers else None)

    @app.exception_handler(S.RequestError)
    async def request_error(_: Request, exc: S.RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        text = f"{exc.param}: {exc.message}" if exc.param else exc.message
        return reply(exc.status, text, exc.param, exc.code, headers)

    @app.exception_handler(JobError)
    async def job_error(_: Request, exc: JobError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.event.status == 503 else None
        return reply(exc.event.status, exc.event.text, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, param, message = format_validation_error(exc.errors())
        return reply(status, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return reply(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("steerlab.serve").exception("unhandled error")
        return reply(500, f"Internal error: {type(exc).__name__}.")
