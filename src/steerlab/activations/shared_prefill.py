"""One unsteered pass of the lower layers for every condition that generates over a prompt.

Conditions generated together over the same prompts
(:func:`steerlab.generation.generate.generate_groups`) differ only from the first layer their
steering touches: below it each condition's prefill is the unsteered one, computed again for every
condition. Here those lower layers run once per prompt; each row's prefill then starts at its own
first steered layer, from the stored KV cache and residual stream. Decode steps are not shared:
running the lower layers once for rows that have written the same tokens so far was tried and saved
nothing measurable (in the persona-gating run, and with six conditions over 32 prompts, where 96%
of decode rows already had a history of their own).

Why: on a CPU a prefill token costs about what a decoded one does, and the persona-gating
reproduction's ~35 conditions first hook, on average, about 40% of the way up the model.

How: the layers below the start are replaced, for that one forward, by stand-ins that put the
stored keys and values in the model's own cache and hand on the stored residual, so the
model's own forward still builds the masks, positions and rotary embeddings. The stand-ins are
checked once per model against a plain prefill and a decode step; a model where they do not
match (or that has sliding-window layers, whose caches this does not rebuild) prefills
whole, as before.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from steerlab.activations.record import (
    MIN_SHARED_PREFIX,
    forward_sharing_prefix,
    full_attention_only,
    layer_output_hooks,
)
from steerlab.generation.decoding import PrefillFn, forward_step, left_pad

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

log = logging.getLogger(__name__)


_CHECKED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

#: Memory the stored states of one chunk of prompts may take. Chunks are sized by bytes,
#: not by a prompt count: a batch never crosses chunks, so every extra chunk leaves a ragged
#: batch behind, while a fixed count either splits a small model's prompts needlessly (the
#: 0.5B default's 96 prompts, ~140 MB of states, in two chunks cost about 4% of the
#: persona-gating run) or holds too much of a large model's (about 40 prompts of 200
#: tokens of an 8B model, stored up to its top layer, fit in 2 GiB).
STATE_BUDGET_BYTES = 2 * 1024**3
#: On a GPU a chunk also takes at most this share of the free memory, so that the stored
#: states and a batch's own KV cache (``batch_size.auto_batch_size`` plans on 60% of the free
#: memory) fit together: an 8B model on a 24 GB card leaves only ~6 GB free.
GPU_FREE_SHARE = 0.2


class _NoCache(Exception):
    """A stand-in layer was called without the model's KV cache."""


@dataclass
class _State:
    """A prompt's unsteered prefill below its deepest start: per-layer K/V ``[H, n, d]`` and
    the residual stream ``[n, D]`` entering each start layer."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)


def _kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Leading tokens every row has in common, leaving each row at least one of its own;
    0 below MIN_SHARED_PREFIX (then the batch runs whole)."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def compute_states(lm: LoadedModel, prompts: Sequence[Sequence[int]],
                   starts: Sequence[Sequence[int]], pad_id: int,
                   batch_size: int) -> list[_State]:
    """The unsteered prefill of each prompt up to its deepest start (``starts[i]``, all > 0):
    K/V of every layer below it and the residual entering each start layer.

    A batch's common leading tokens (the chat template and system prompt) run once, the
    rest of every row against their KV cache (:func:`activations.forward_sharing_prefix`,
    as activation reads do).
    """
    from transformers import DynamicCache

    out = [_State() for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for at in range(0, len(order), batch_size):
        chunk = order[at:at + batch_size]
        rows = [prompts[i] for i in chunk]
        wanted = sorted({s for i in chunk for s in starts[i]})
        shared = _common_prefix(rows)
        ids, mask = left_pad(rows, pad_id)
        cache = DynamicCache()
        in_prefix = [False]
        prefix_read: dict[int, torch.Tensor] = {}
        read: dict[int, torch.Tensor] = {}

        def keep(layer: int, hidden: torch.Tensor, in_prefix: list[bool] = in_prefix,
                 prefix_read: dict[int, torch.Tensor] = prefix_read,
                 read: dict[int, torch.Tensor] = read) -> None:
            # the residual entering layer + 1, of the shared prefix or of the rows' rest
            (prefix_read if in_prefix[0] else read)[layer + 1] = hidden

        with layer_output_hooks(lm, [s - 1 for s in wanted], keep, stop_after=True):
            forward_sharing_prefix(lm, ids.to(lm.device), mask.to(lm.device), shared,
                                   in_prefix, cache)
        width = ids.shape[1] - shared  # the rest's columns, each row's tokens at the right
        for b, i in enumerate(chunk):
            n = len(prompts[i]) - shared
            state = out[i]
            for layer in range(max(starts[i])):
                k, v = _kv(cache, layer)
                cut = k.shape[2] - n
                state.keys.append(torch.cat([k[b, :, :shared], k[b, :, cut:]], dim=1))
                state.values.append(torch.cat([v[b, :, :shared], v[b, :, cut:]], dim=1))
            for start in starts[i]:
                parts = [read[start][b, width - n:]]
                if shared:
                    parts.insert(0, prefix_read[start][0])
                state.residual[start] = torch.cat(parts, dim=0)
    return out


def state_bytes(lm: LoadedModel, n_tokens: int, deepest: int, levels: int) -> int:
    """What a prompt's stored state takes: K/V of ``deepest`` layers and the residual
    entering ``levels`` start layers, for ``n_tokens`` tokens."""
    elem = torch.finfo(lm.dtype).bits // 8
    return n_tokens * (deepest * lm.kv_bytes_per_token + levels * lm.d_model * elem)


def state_budget(lm: LoadedModel) -> int:
    """Bytes one chunk's stored states may take: :data:`STATE_BUDGET_BYTES`, and on a GPU
    no more than :data:`GPU_FREE_SHARE` of its free memory."""
    if lm.device.type != "cuda":
        return STATE_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(lm.device)
    return min(STATE_BUDGET_BYTES, int(GPU_FREE_SHARE * free))


def _chunks(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of item indices whose ``sizes`` sum to at most ``budget`` (an item
    over it alone makes a chunk of one)."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not out or total + size > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out


def _left_padded(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack per-row tensors ``[..., n_i, x]`` (time on dim -2) left-padded with zeros."""
    first = rows[0]
    shape = (len(rows), *first.shape[:-2], width, first.shape[-1])
    out = first.new_zeros(shape)
    for b, row in enumerate(rows):
        out[b, ..., width - row.shape[-2]:, :] = row
    return out


@contextmanager
def _stand_ins(lm: LoadedModel, start: int, keys: list[torch.Tensor],
               values: list[torch.Tensor], residual: torch.Tensor) -> Iterator[None]:
    """Layers ``< start`` put their stored K/V in the cache; the last hands on ``residual``.

    The layers' own ``forward`` (an instance attribute when accelerate wraps it) is put
    back afterwards, even when the forward raises.
    """
    saved: list[tuple[torch.nn.Module, Any]] = []

    def stand_in(layer: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None:
                raise _NoCache
            cache.update(keys[layer], values[layer], layer)
            return residual if layer == start - 1 else hidden_states

        return forward

    try:
        for layer in range(start):
            module = lm.layers[layer]
            saved.append((module, module.__dict__.get("forward")))
            module.forward = stand_in(layer)  # type: ignore[method-assign]
        yield
    finally:
        for module, original in saved:
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]


def prefill_from(lm: LoadedModel, start: int, states: Sequence[_State]) -> PrefillFn:
    """A prefill for a batch whose rows' prompts have ``states``, starting at ``start``."""

    def prefill(ids: torch.Tensor, mask: torch.Tensor,
                position: torch.Tensor) -> tuple[torch.Tensor, Any]:
        width = ids.shape[1]
        keys = [_left_padded([s.keys[layer] for s in states], width) for layer in range(start)]
        values = [_left_padded([s.values[layer] for s in states], width)
                  for layer in range(start)]
        residual = _left_padded([s.residual[start] for s in states], width)
        with _stand_ins(lm, start, keys, values, residual), torch.inference_mode():
            return forward_step(lm, ids, mask, position, None)

    return prefill


def supported(lm: LoadedModel, probe: Sequence[int]) -> bool:
    """Whether stand-in layers reproduce a plain prefill and decode step on this model
    (checked once per model on ``probe``, a real prompt's token ids)."""
    if lm.model in _CHECKED:
        return _CHECKED[lm.model]
    ok, why = False, "it has sliding-window layers"
    if full_attention_only(lm) and lm.n_layers >= 2 and len(probe) >= 2:
        why = "stand-in layers did not reproduce a plain prefill and decode step"
        try:
            ok = _matches(lm, probe)
        except (_NoCache, AttributeError, IndexError, KeyError, TypeError) as exc:
            why = f"stand-in layers failed ({type(exc).__name__}: {exc})"
    if not ok:
        log.info("shared prefill off for this model, every row prefills whole: %s", why)
    _CHECKED[lm.model] = ok
    return ok


def _matches(lm: LoadedModel, probe: Sequence[int]) -> bool:
    """A prefill of ``probe`` from stored states, and the decode step after it, against
    plain forwards."""
    start = lm.n_layers // 2
    ids = torch.tensor([list(probe)], device=lm.device)
    mask = torch.ones_like(ids)
    position = mask.cumsum(-1) - 1
    states = compute_states(lm, [probe], [[start]], 0, 1)
    results = []
    for prefill in (None, prefill_from(lm, start, states)):
        with torch.inference_mode():
            if prefill is None:
                logits, cache = forward_step(lm, ids, mask, position, None)
            else:
                logits, cache = prefill(ids, mask, position)
            step, _ = forward_step(lm, logits.argmax(-1, keepdim=True),
                                   torch.cat([mask, mask[:, :1]], 1), position[:, -1:] + 1, cache)
        results.append((logits.float(), step.float()))
    (a0, a1), (b0, b1) = results
    scale = float(a0.abs().max()) + 1e-6
    return bool((a0 - b0).abs().max() <= 1e-2 * scale
                and (a1 - b1).abs().max() <= 1e-2 * scale)


class BatchPlan(NamedTuple):
    """A batch's prefill (None: a plain forward), and the rows whose shared states were
    computed for it."""

    prefill: PrefillFn | None
    computed: list[int]


class SharedPrefill:
    """Which rows of a generation start their prefill above layer 0, and the stored states
    they start from, computed a chunk of prompts at a time (and freed after it).

    Rows are given by their prompt's token ids and the first layer their steering changes
    (``starts``; ``n_layers`` for unsteered rows). A prompt is shared when at least two rows
    with a start above 0 use it. :attr:`order` lists the rows that prefill whole first, then
    each chunk's rows, highest start first, so a batch's rows mostly start alike. A chunk's
    states take at most ``budget_bytes`` (:func:`state_budget` by default).
    """

    def __init__(self, lm: LoadedModel, prompts: Sequence[Sequence[int]], starts: Sequence[int],
                 pad_id: int, budget_bytes: int | None = None) -> None:
        self.lm, self.pad_id = lm, pad_id
        by_key: dict[tuple[int, ...], list[int]] = {}
        for row, (ids, start) in enumerate(zip(prompts, starts, strict=True)):
            if start > 0:
                by_key.setdefault(tuple(ids), []).append(row)
        shared = {k: rows for k, rows in by_key.items() if len(rows) >= 2}
        if shared and not supported(lm, next(iter(shared))):
            shared = {}
        self.start = [0] * len(prompts)
        self.chunk = [-1] * len(prompts)
        self.key: dict[int, tuple[int, ...]] = {}
        in_shared = {r for rows in shared.values() for r in rows}
        plain = sorted((r for r in range(len(prompts)) if r not in in_shared),
                       key=lambda r: -len(prompts[r]))
        keys = sorted(shared, key=lambda k: -len(k))
        levels = {starts[r] for rows in shared.values() for r in rows}
        self._deepest = {k: max(starts[r] for r in shared[k]) for k in keys}
        sizes = [state_bytes(lm, len(k), self._deepest[k],
                             sum(s <= self._deepest[k] for s in levels)) for k in keys]
        budget = state_budget(lm) if budget_bytes is None else budget_bytes
        self.chunks: list[list[tuple[int, ...]]] = [[keys[i] for i in members]
                                                    for members in _chunks(sizes, budget)]
        self.order: list[int] = list(plain)
        for c, chunk_keys in enumerate(self.chunks):
            rows = [r for k in chunk_keys for r in shared[k]]
            for r in rows:
                self.start[r], self.chunk[r], self.key[r] = starts[r], c, tuple(prompts[r])
            self.order += sorted(rows, key=lambda r: (-self.start[r], -len(prompts[r])))
        self._rows = {c: [r for r in self.order if self.chunk[r] == c]
                      for c in range(len(self.chunks))}
        self._loaded = -1
        self._states: dict[tuple[int, ...], _State] = {}

    def same_chunk(self, rows: Sequence[int]) -> int:
        """How many leading ``rows`` (row numbers, in :attr:`order`) share the first's chunk:
        a batch does not cross chunks."""
        head = self.chunk[rows[0]]
        return next((j for j, r in enumerate(rows) if self.chunk[r] != head), len(rows))

    def batch(self, rows: Sequence[int], batch_size: int) -> BatchPlan:
        """How a batch of ``rows`` (one chunk) prefills, and the rows its chunk's states were
        just computed for (empty when they were already held), so a caller can share that
        time between them."""
        c = self.chunk[rows[0]]
        if c < 0:
            return BatchPlan(None, [])
        computed: list[int] = []
        if c != self._loaded:
            self._states, self._loaded = {}, -1
            keys = self.chunks[c]
            mine = self._rows[c]
            levels = sorted({self.start[r] for r in mine})
            states = compute_states(self.lm, keys,
                                    [[s for s in levels if s <= self._deepest[k]] for k in keys],
                                    self.pad_id, batch_size)
            self._states, self._loaded, computed = dict(zip(keys, states, strict=True)), c, mine
        start = min(self.start[r] for r in rows)
        return BatchPlan(prefill_from(self.lm, start, [self._states[self.key[r]] for r in rows]),
                         computed)


__all__ = ["GPU_FREE_SHARE", "STATE_BUDGET_BYTES", "BatchPlan", "SharedPrefill", "compute_states",
           "prefill_from", "state_budget", "state_bytes", "supported"]
