"""Batched, KV-cached decoding of independent requests, one token per row per step.

The loop is :func:`steerlab.generation.decoding.decode_loop`, the one offline
:func:`steerlab.generation.generate.generate` runs (same forward call, position ids, EOS
set, row dropping, sampling rule and seeded RNG), so a request's greedy
output equals offline ``generate`` for that prompt, and a seeded sample
equals ``generate(..., do_sample=True, seed=S)`` for a single prompt. This
module adds what a server needs between steps: per-row settings (token
budget, temperature, seed, stop sequences), text deltas as tokens arrive,
and rows that can be abandoned (dropped from the batch and its KV cache at
once).

Steering is not this module's business: the caller wraps :func:`decode` in
``steerlab.interventions.steering.steer(...)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from steerlab.generation.decoding import decode_loop, prompt_generator, sampling_probs
from steerlab.generation.generate import eos_ids
from steerlab.model.loading import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class RowSink(Protocol):
    """Where a row's output goes (the batcher's job object)."""

    def delta(self, text: str) -> None: ...
    def finish(self, reason: str, n_completion: int, text: str) -> None: ...
    def cancelled(self) -> bool: ...


@dataclass
class Row:
    """One request inside a batch: its prompt token ids, decoding settings and sink."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    sink: RowSink


class TextTracker:
    """Turns a growing list of token ids into text deltas, honouring stop sequences.

    Text that could be the start of a stop sequence, or an incomplete UTF-8
    character, is held back until the next token decides it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to emit and whether a stop sequence hit."""
        self.ids.append(token_id)
        text = self._decode()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._advance(len(self.text)), True
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._advance(max(safe, self.emitted)), False

    def flush(self) -> str:
        """Everything not yet emitted (the row has ended without a stop sequence)."""
        return self._advance(len(self.text))

    def _advance(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta


@dataclass
class _State:
    row: Row
    tracker: TextTracker
    seed: int | None  # None: greedy
    generator: torch.Generator | None = None  # made on the logits' device at the first step
    n_new: int = 0
    done: bool = field(default=False)


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """A seeded sample by the rule offline ``generate`` applies (temperature, then top-p)."""
    probs = sampling_probs(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _choose(logits: torch.Tensor, states: Sequence[_State]) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, a seeded sample for the others."""
    chosen = logits.argmax(dim=-1)
    for b, st in enumerate(states):
        if st.seed is None:
            continue
        if st.generator is None:
            # Where the logits live (the LM head's device under a device_map), as offline
            # generate does: a request is its prompt 0.
            st.generator = prompt_generator(st.seed, 0, logits.device)
        chosen[b] = _sample(logits[b], st.row.params, st.generator)
    return chosen


@torch.inference_mode()
def decode(lm: LoadedModel, rows: Sequence[Row], *, eos: frozenset[int] | None = None,
           held: list[Callable[[], None]] | None = None) -> int:
    """Generate every row to its end; return the number of forward passes run.

    Each row's sink gets text deltas as they become safe, then exactly one
    ``finish`` (``"stop"`` on EOS or a stop sequence, ``"length"`` on the
    token budget) unless its ``cancelled()`` turned true, in which case the
    row is dropped silently. With ``held``, the finishes of the last step are
    appended there instead of delivered, so the caller can deliver them after
    removing its steering hooks (a client that got its answer then never
    sees the model still hooked).
    """
    live = [r for r in rows if not r.sink.cancelled()]
    if not live:
        return 0
    eos = eos_ids(lm) if eos is None else eos  # the set offline generation stops on
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    states = [_State(r, TextTracker(tok, r.params.stop), _seed(r.params)) for r in live]

    def step(logits: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, list[int]]:
        next_ids = _choose(logits, [states[i] for i in active])
        done: list[Callable[[], None]] = []
        keep = [b for b, i in enumerate(active)
                if _advance(states[i], int(next_ids[b]), eos, done)]
        if not keep and held is not None:
            held.extend(done)
        else:
            for deliver in done:
                deliver()
        return next_ids, keep

    return decode_loop(lm, [r.prompt_ids for r in live], pad_id, step)


def _seed(params: SamplingParams) -> int | None:
    """The request's sampling seed (drawn when it gave none); None for greedy requests."""
    if params.temperature <= 0.0:
        return None
    return params.seed if params.seed is not None else random.SystemRandom().randrange(2**62)


def _advance(st: _State, token_id: int, eos: frozenset[int],
             done: list[Callable[[], None]]) -> bool:
    """Feed one token to a row; return True while the row goes on (finishes go to ``done``)."""
    sink, params = st.row.sink, st.row.params
    if sink.cancelled():
        st.done = True
        return False
    if token_id in eos and not params.ignore_eos:
        return _finish(st, "stop", done)  # like offline generate, EOS is not a new token
    st.n_new += 1
    delta, stopped = st.tracker.push(token_id)
    if delta:
        sink.delta(delta)
    if stopped:
        return _finish(st, "stop", done)
    if st.n_new >= params.max_new_tokens:
        return _finish(st, "length", done)
    return True


def _finish(st: _State, reason: str, done: list[Callable[[], None]]) -> bool:
    rest = st.tracker.flush()
    if rest:
        st.row.sink.delta(rest)
    st.done = True
    sink, n_new, text = st.row.sink, st.n_new, st.tracker.text
    done.append(lambda: sink.finish(reason, n_new, text))
    return False
