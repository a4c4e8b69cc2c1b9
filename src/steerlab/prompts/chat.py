"""Chat rendering and token positions.

Prompts go through the tokenizer's own chat template (with an optional system
prompt, which is how persona system prompts are applied). Positions are found
from token ids, counting back from each row's end of prompt, so they stay
right under left padding:

- ``t_inst``: the last token of the user's instruction;
- ``post_inst``: the template tokens after it (e.g. ``<|im_end|>``, ``\\n``,
  ``<|im_start|>``, ``assistant``, ``\\n`` for Qwen), averaged;
- ``post_inst[k]``: the k-th of those (negative k counts from the end);
- ``last``: the last prompt token (``post_inst[-1]``, the usual Arditi et al. choice);
- ``prompt_mean``: mean over every prompt token;
- ``response_mean``: mean over the response tokens (needs responses).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.errors import DataError

POSITIONS = ("t_inst", "post_inst", "post_inst[k]", "last", "prompt_mean", "response_mean")
_INDEXED = re.compile(r"^post_inst\[(-?\d+)\]$")


def _template_of(tokenizer: Any, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            f"The tokenizer of this model ({type(tokenizer).__name__}) has no chat template. "
            "Pass one explicitly (chat_template=... in Python, --chat-template FILE on the CLI)."
        )
    return str(template)


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one user prompt, with an optional system prompt."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render(
    tokenizer: Any,
    prompt: str,
    system: str | None = None,
    *,
    chat_template: str | None = None,
) -> str:
    """Render one prompt through the chat template, ending with the generation prompt.

    Example:
        >>> render(tok, "Hi", system="Be brief.")  # doctest: +SKIP
        '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n...'
    """
    template = _template_of(tokenizer, chat_template)
    try:
        text = tokenizer.apply_chat_template(
            messages(prompt, system),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as exc:  # jinja errors, e.g. templates that reject system messages
        raise DataError(
            f"The chat template failed to render this prompt (system prompt given: "
            f"{system is not None}): {exc}. If the model's template rejects system prompts, "
            "pass a chat template that accepts them."
        ) from exc
    return str(text)


def post_instruction_ids(tokenizer: Any, chat_template: str | None = None) -> tuple[int, ...]:
    """The token ids the template puts after every user instruction (t_post-inst)."""
    template = _template_of(tokenizer, chat_template)
    return _post_instruction_ids(tokenizer, template)


@functools.lru_cache(maxsize=32)
def _post_instruction_ids(tokenizer: Any, template: str) -> tuple[int, ...]:
    # Two renderings that differ only in the instruction share exactly the suffix we want.
    probes = [render(tokenizer, text, chat_template=template) for text in ("hello", "world ok")]
    a, b = (tokenizer(p, add_special_tokens=False)["input_ids"] for p in probes)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise DataError("Could not find the post-instruction tokens of this chat template.")
    return tuple(a[len(a) - n :])


@dataclass
class ChatBatch:
    """A left-padded batch of rendered chats, with where each prompt ends.

    ``prompt_end[b]`` is one past the last prompt token of row ``b``; response
    tokens (if any) run from there to the end of the row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_end: torch.Tensor
    n_post: int
    texts: list[str]

    def to(self, device: torch.device | str) -> ChatBatch:
        return ChatBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_end.to(device),
            self.n_post,
            self.texts,
        )

    @property
    def has_response(self) -> bool:
        return bool((self.prompt_end < self.input_ids.shape[1]).any())


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    system: str | Sequence[str | None] | None = None,
    *,
    responses: Sequence[str] | None = None,
    chat_template: str | None = None,
    max_length: int | None = None,
) -> ChatBatch:
    """Render and tokenize prompts (and optional responses) into one left-padded batch.

    With ``max_length`` (the model's context, ``LoadedModel.context_length``) a row longer
    than it is refused before any forward pass sees it.
    """
    if not prompts:
        raise DataError("No prompts to encode: the prompt list is empty.")
    systems = [system] * len(prompts) if system is None or isinstance(system, str) else list(system)
    if len(systems) != len(prompts):
        raise DataError(f"Got {len(systems)} system prompts for {len(prompts)} prompts.")
    if responses is not None and len(responses) != len(prompts):
        raise DataError(f"Got {len(responses)} responses for {len(prompts)} prompts.")
    template = _template_of(tokenizer, chat_template)
    n_post = len(_post_instruction_ids(tokenizer, template))
    rows: list[list[int]] = []
    ends: list[int] = []
    texts: list[str] = []
    for i, (prompt, sys_prompt) in enumerate(zip(prompts, systems, strict=True)):
        text = render(tokenizer, prompt, sys_prompt, chat_template=template)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        end = len(ids)
        if responses is not None and responses[i]:
            text += responses[i]
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        check_context(len(ids), max_length, f"Prompt {i}" + (" with its response"
                                                             if len(ids) > end else ""))
        rows.append(ids)
        ends.append(end)
        texts.append(text)
    input_ids, mask = left_pad(rows, tokenizer.pad_token_id or 0)
    width = input_ids.shape[1]
    prompt_end = torch.tensor([width - len(ids) + end for ids, end in zip(rows, ends, strict=True)],
                              dtype=torch.long)
    return ChatBatch(input_ids, mask, prompt_end, n_post, texts)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[B, T]``, padded on the left (CPU tensors).

    Left padding puts every prompt's last token in the last column, where the
    next token's logits are read.
    """
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for b, row in enumerate(prompt_ids):
        n = len(row)
        ids[b, width - n:] = torch.tensor(list(row), dtype=torch.long)
        mask[b, width - n:] = 1
    return ids, mask


def check_context(n_tokens: int, max_length: int | None, what: str) -> None:
    """Refuse a rendered chat longer than the model's context: positions past it are out of
    the range the model was trained on (or out of its position table)."""
    if max_length is not None and n_tokens > max_length:
        raise DataError(
            f"{what} is {n_tokens} tokens long once rendered with the chat template, more than "
            f"the model's context of {max_length} tokens (max_position_embeddings); shorten it "
            "or leave it out."
        )


def position_weights(batch: ChatBatch, position: str) -> torch.Tensor:
    """Per-token weights ``[batch, seq]`` (each row sums to 1) that read ``position``.

    An activation at a position is ``(weights[..., None] * hidden).sum(1)``.
    """
    bsz, width = batch.input_ids.shape
    cols = torch.arange(width, device=batch.input_ids.device).expand(bsz, width)
    end = batch.prompt_end[:, None]
    real = batch.attention_mask.bool()
    if position in ("last", "t_inst") or _INDEXED.match(position):
        if position == "last":
            offset = -1
        elif position == "t_inst":
            offset = -batch.n_post - 1
        else:
            k = int(_INDEXED.match(position).group(1))  # type: ignore[union-attr]
            if not -batch.n_post <= k < batch.n_post:
                raise DataError(
                    f"Position {position!r} is out of range: this template has {batch.n_post} "
                    f"post-instruction tokens, so k must be in "
                    f"[{-batch.n_post}, {batch.n_post - 1}]."
                )
            offset = k - batch.n_post if k >= 0 else k
        selected = cols == (end + offset)
    elif position == "post_inst":
        selected = (cols >= end - batch.n_post) & (cols < end)
    elif position == "prompt_mean":
        selected = real & (cols < end)
    elif position == "response_mean":
        selected = real & (cols >= end)
        if not bool(selected.any(dim=1).all()):
            raise DataError(
                "Position 'response_mean' needs a response for every prompt; pass responses= "
                "(generate them first) or choose another position."
            )
    else:
        raise DataError(
            f"Unknown position {position!r}; choose one of {', '.join(POSITIONS)} "
            "(post_inst[k] with an integer k)."
        )
    weights = (selected & real).float()
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def position_tokens(tokenizer: Any, batch: ChatBatch, position: str) -> list[list[str]]:
    """The token strings each row reads at ``position`` (for inspection and tests)."""
    weights = position_weights(batch, position)
    return [
        tokenizer.convert_ids_to_tokens(batch.input_ids[b][weights[b] > 0].tolist())
        for b in range(batch.input_ids.shape[0])
    ]
