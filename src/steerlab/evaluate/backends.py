"""Where responses come from: the model in this process (with interventions), or
any OpenAI-compatible server (steerlab serve, vLLM, llama.cpp server).

A backend streams :class:`Completion` objects as they finish, so the evaluation
can write each row as soon as it exists and resume after an interruption.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from steerlab.evaluate._http import ChatEndpoint, message_text
from steerlab.generation.generate import generate
from steerlab.interventions.specs import specs_to_json
from steerlab.interventions.steering import check_specs
from steerlab.prompts.chat import messages

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


@dataclass(frozen=True)
class Completion:
    """One response; ``index`` is the prompt's position in the list given to ``stream``."""

    index: int
    response: str
    finish_reason: str | None = None
    n_new_tokens: int | None = None


class Backend(Protocol):
    """Anything that turns prompts into responses, as they finish."""

    def describe(self) -> dict[str, Any]: ...

    def stream(self, prompts: Sequence[str], system: str | None = None) -> Iterator[Completion]:
        ...


def _specs_json(specs: Sequence[Any]) -> Any:
    if not specs:
        return []
    try:
        return json.loads(specs_to_json(list(specs)))
    except Exception:  # a spec the serializer does not know still gets recorded
        return [repr(s) for s in specs]


class InProcessBackend:
    """Generate with ``steerlab.generation.generate.generate`` on a loaded model, with
    interventions.

    Prompts go in chunks of ``batch_size``; each chunk's rows are yielded as
    soon as it finishes.

    Example:
        >>> backend = InProcessBackend(lm, parse_steer("ablate:dir"))  # doctest: +SKIP
    """

    def __init__(self, lm: LoadedModel, specs: Sequence[Any] = (), *, max_new_tokens: int = 64,
                 batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0) -> None:
        check_specs(lm, specs)  # a bad spec fails before a run folder is made
        self.lm = lm
        self.specs = tuple(specs)
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, batch_size)
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "inprocess",
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            "dtype": str(self.lm.dtype).removeprefix("torch."),
            "specs": _specs_json(self.specs),
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "top_p": self.top_p if self.do_sample else None,
            "seed": self.seed,
        }

    def stream(self, prompts: Sequence[str], system: str | None = None) -> Iterator[Completion]:
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            gens = generate(
                self.lm, chunk, system=system, steer=self.specs,
                max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                temperature=self.temperature, top_p=self.top_p, seed=self.seed + start,
                batch_size=len(chunk),
            )
            for offset, gen in enumerate(gens):
                yield Completion(start + offset, gen.response, gen.finish_reason,
                                 gen.n_new_tokens)


class OpenAIBackend(ChatEndpoint):
    """Generate through ``/v1/chat/completions`` of any OpenAI-compatible server.

    Greedy by default (``temperature=0``), so a served model can be compared
    with the in-process result. At most ``max_concurrency`` requests are in
    flight; transient failures are retried with backoff.

    Example:
        >>> backend = OpenAIBackend("http://127.0.0.1:8000/v1", "my-model")  # doctest: +SKIP
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, max_concurrency: int = 4, timeout: float = 300.0,
                 max_retries: int = 4, backoff: float = 0.5) -> None:
        super().__init__(base_url, model, api_key, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, max_concurrency=max_concurrency,
                         params={"max_tokens": max_new_tokens, "temperature": temperature,
                                 "top_p": top_p, "seed": seed})

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "url": self.client.url, "model": self.model,
                "max_new_tokens": self.params["max_tokens"],
                "temperature": self.params["temperature"], "top_p": self.params["top_p"],
                "seed": self.params.get("seed")}

    def complete(self, prompt: str, system: str | None = None
                 ) -> tuple[str, str | None, int | None]:
        """One response: ``(text, finish_reason, completion_tokens)``."""
        body = self.ask(messages(prompt, system))
        text, finish = message_text(body)
        usage = body.get("usage") or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return text, finish, int(tokens) if isinstance(tokens, int) else None

    def stream(self, prompts: Sequence[str], system: str | None = None) -> Iterator[Completion]:
        pool = self.client.pool("steerlab-openai")
        futures: dict[Future[tuple[str, str | None, int | None]], int] = {}
        try:
            futures = {pool.submit(self.complete, p, system): i for i, p in enumerate(prompts)}
            for fut in as_completed(futures):
                text, finish, n_tokens = fut.result()
                yield Completion(futures[fut], text, finish, n_tokens)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
