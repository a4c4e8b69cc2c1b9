"""From a validated request body to prompt token ids and decoding settings.

Chat prompts go through the model's own chat template exactly as offline
``steerlab.prompts.chat.encode`` renders them (same messages, same tokenizer call), so
a served prompt and an offline prompt are the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerlab.model.loading import LoadedModel
from steerlab.serve.engine import SamplingParams
from steerlab.serve.schemas import ChatMessage, RequestError, SamplingFields

MAX_PROMPT_CHARS = 2_000_000
"""Refuse absurd prompts before tokenizing them (tokenizing is not free)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    context: int
    max_new_tokens: int

    @classmethod
    def for_model(cls, lm: LoadedModel, max_new_tokens: int,
                  context: int | None = None) -> Limits:
        if context is None:
            context = lm.context_length or 4096
        return cls(context=context, max_new_tokens=max_new_tokens)


def check_max_tokens(limits: Limits, requested: int | None) -> None:
    """Oversize ``max_tokens`` is refused before any tokenization."""
    if requested is not None and requested > limits.max_new_tokens:
        raise RequestError(
            "max_tokens",
            f"{requested} is more than this server allows ({limits.max_new_tokens}); "
            "ask for fewer tokens or restart the server with a higher limit.",
        )


def chat_prompt_ids(lm: LoadedModel, messages: list[ChatMessage]) -> list[int]:
    """Render the conversation with the chat template and tokenize it."""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise RequestError("messages", "this model has no chat template; use /v1/completions.",
                           status=400)
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages]
    _check_chars(sum(len(m["content"]) for m in msgs), "messages")
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises for e.g. unsupported roles or role order
        raise RequestError("messages", f"the model's chat template rejected these messages: "
                           f"{exc}", status=400) from None
    return list(tok(str(text), add_special_tokens=False)["input_ids"])


def completion_prompt_ids(lm: LoadedModel, prompt: str, param: str) -> list[int]:
    """Tokenize a raw prompt the way the tokenizer does by default (with BOS if it adds one)."""
    _check_chars(len(prompt), param)
    ids = list(lm.tokenizer(prompt)["input_ids"])
    if not ids:
        raise RequestError(param, "the prompt is empty.", status=400)
    return ids


def _check_chars(n: int, param: str) -> None:
    if n > MAX_PROMPT_CHARS:
        raise RequestError(param, f"the prompt has {n} characters, more than the "
                           f"{MAX_PROMPT_CHARS} this server accepts.", status=400)


def sampling_params(req: SamplingFields, n_prompt: int, limits: Limits, requested: int | None,
                    prompt_param: str) -> SamplingParams:
    """Decoding settings for one prompt, checked against the context length."""
    room = limits.context - n_prompt
    if room <= 0:
        raise RequestError(
            prompt_param,
            f"the prompt has {n_prompt} tokens but the model's context is {limits.context}; "
            "shorten it.",
            status=400, code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise RequestError(
            "max_tokens",
            f"the prompt ({n_prompt} tokens) plus max_tokens ({requested}) exceeds the model's "
            f"context of {limits.context} tokens; ask for at most {room}.",
            status=400, code="context_length_exceeded",
        )
    max_new = requested if requested is not None else min(limits.max_new_tokens, room)
    stop = tuple(req.stop) if isinstance(req.stop, list) else ()
    return SamplingParams(max_new_tokens=max_new, temperature=float(req.temperature),
                          top_p=float(req.top_p), seed=req.seed, stop=stop,
                          ignore_eos=req.ignore_eos)


def openai_error(status: int, message: str, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """The error body OpenAI clients parse."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_overloaded"}.get(status, "invalid_request_error" if status < 500
                                          else "server_error")
    return {"error": {"message": _printable(message), "type": kind,
                      "param": None if param is None else _printable(param), "code": code}}


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (a lone surrogate echoed from a request)
    escaped, so writing the error reply cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
