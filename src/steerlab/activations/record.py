"""Residual-stream activations: recorded or averaged during ONE batched forward
(two when the batch's rows share leading tokens: the shared prefix once, then the rest).

"Layer i" everywhere in steerlab means the residual stream at the OUTPUT of
decoder layer ``i`` (a forward hook on the layer; the same tensor is the input
of layer ``i + 1``, Arditi et al.'s ``resid_pre`` of layer ``i + 1``). The last
layer's output is read before the final norm.

:func:`mean_activations` streams: per batch it reads one token position (or a
weighted mean of positions, see :func:`steerlab.prompts.chat.position_weights`) at the
chosen layers and folds it into float64 running statistics, so memory is
O(layers · d_model) whatever the number of prompts; ``keep_raw=True`` also
keeps the per-prompt vectors when a method needs them (PCA, probes). The
forward stops right after the deepest layer asked for (a private exception
raised by that layer's hook), so nothing past it, and never the LM head, runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.activations.layout_bound import is_layout_bound
from steerlab.errors import DataError, SteerlabError
from steerlab.generation.decoding import forward_step
from steerlab.interventions.layer_spec import resolve_layers
from steerlab.model.loading import LoadedModel
from steerlab.prompts.chat import ChatBatch, encode, position_weights

Progress = Callable[[int], None]
"""Called with the number of prompts just processed (for progress bars)."""


class _StopForward(Exception):
    """Raised by the deepest hook to end a forward pass early."""


@dataclass(frozen=True, eq=False)
class ActivationStats:
    """Per-layer mean and variance of activations over ``count`` prompts.

    ``mean``/``var`` are float64 ``[len(layers), d_model]`` on the CPU (``var``
    is the population variance); ``raw`` is float32 ``[count, len(layers),
    d_model]`` in prompt order when ``keep_raw=True`` was asked, else None.
    """

    count: int
    mean: torch.Tensor
    var: torch.Tensor
    layers: tuple[int, ...]
    position: str = "last"
    raw: torch.Tensor | None = None

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()

    def row(self, layer: int) -> int:
        """Index of model layer ``layer`` in ``mean``/``var``/``raw``."""
        if layer not in self.layers:
            raise DataError(f"No activations recorded for layer {layer}; have {list(self.layers)}.")
        return self.layers.index(layer)


# -- plumbing ---------------------------------------------------------------------------------
def prompt_texts(prompts: Any) -> list[str]:
    """Plain strings from a list of strings or a PromptSet-like object (``.texts()``)."""
    texts = list(prompts.texts()) if hasattr(prompts, "texts") else list(prompts)
    if not texts:
        raise DataError("The prompt set is empty; give at least one prompt.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise DataError(f"Prompts must be strings; got a {type(bad[0]).__name__}.")
    return texts


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's output (Tensor in transformers 5, tuple before)."""
    return output[0] if isinstance(output, tuple) else output


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, as ``generate`` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_batch(lm: LoadedModel, batch: ChatBatch, **kwargs: Any) -> Any:
    """One forward pass of ``lm`` over ``batch`` (no cache, padding-aware positions)."""
    with torch.inference_mode():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=position_ids(batch.attention_mask), use_cache=False,
                        **kwargs)


@contextmanager
def layer_output_hooks(
    lm: LoadedModel,
    layers: Sequence[int],
    fn: Callable[[int, torch.Tensor], None],
    *,
    stop_after: bool = False,
) -> Iterator[None]:
    """Call ``fn(layer, hidden)`` with each chosen layer's output during forwards.

    With ``stop_after`` the deepest chosen layer's hook ends the forward (use
    :func:`run_until_stop`). Hooks are always removed, even when a forward or
    ``fn`` raises.
    """
    chosen = tuple(layers)
    last = max(chosen)

    def make(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            fn(layer, hidden_of(output))
            if stop_after and layer == last:
                raise _StopForward

        return hook

    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer in chosen:
            handles.append(lm.layers[layer].register_forward_hook(make(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(lm: LoadedModel, batch: ChatBatch) -> None:
    """Forward ``batch``; the early stop raised by a ``stop_after`` hook is expected."""
    try:
        forward_batch(lm, batch)
    except _StopForward:
        return


def full_attention_only(lm: LoadedModel) -> bool:
    """Whether every layer attends to the whole context (no sliding window): paths that
    fill a KV cache themselves (shared prefixes, shared prefills) rebuild full masks only."""
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(k == "full_attention" for k in kinds)
    return getattr(config, "sliding_window", None) is None \
        or not getattr(config, "use_sliding_window", True)


# Below this many shared tokens a batch is run whole: the prefix pass would not pay.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(lm: LoadedModel, batch: ChatBatch, weights: torch.Tensor) -> int:
    """How many leading tokens every row of ``batch`` has in common, ending before the
    first position any row reads (0 when sharing them is not worth it or not safe).

    Safe means: every layer attends to the whole context (no sliding window, whose masks this path
    does not rebuild) and no steering that depends on the batch's layout is hooked: a
    position-dependent one reads its prompt/generation phase off the cache, which the shared prefix
    fills, and a row-masked one expects the batch's rows
    (:func:`steerlab.interventions.steering.steer` marks both in
    :mod:`steerlab.activations.layout_bound`).
    """
    if not full_attention_only(lm) or is_layout_bound(lm.model):
        return 0
    ids, mask, reads = batch.input_ids.cpu(), batch.attention_mask.cpu().bool(), weights.cpu()
    n_rows, width = ids.shape
    if n_rows < 2:
        return 0
    lengths = mask.sum(dim=1)
    starts = width - lengths  # rows are left-padded
    first_read = (reads > 0).float().argmax(dim=1) - starts
    limit = int(min(int(first_read.min()), int(lengths.min()) - 1))
    if limit < MIN_SHARED_PREFIX:
        return 0
    heads = ids.gather(1, starts[:, None] + torch.arange(limit)[None, :])
    same = (heads == heads[:1]).all(dim=0)
    shared = limit if bool(same.all()) else int((~same).nonzero()[0])
    return shared if shared >= MIN_SHARED_PREFIX else 0


def forward_sharing_prefix(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, shared: int,
                           in_prefix: list[bool], cache: Any = None) -> torch.Tensor | None:
    """Forward left-padded ``ids``/``mask`` as their ``shared`` common leading tokens once
    (``shared`` may be 0: one plain pass), then every row's rest against that prefix's KV
    cache repeated over the batch; return the rest's last-position logits ``[B, V]`` (None
    when a ``stop_after`` hook ended it early).

    The layer hooks see the prefix pass with ``in_prefix[0]`` True (they must skip it)
    and then hidden states for columns ``shared:`` only. ``cache`` (a new one by default)
    then holds the prefix followed by each row's left-padded rest, up to the deepest layer
    a ``stop_after`` hook read. Why: chat prompts share a template and often a system
    prompt (30 of the embedded model's ~46 tokens per refusal prompt), and a prefill on a
    CPU costs per token.
    """
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    n_rows, width = ids.shape
    if shared:
        start = width - int(mask[0].sum())
        prefix = ids[:1, start:start + shared]
        in_prefix[0] = True
        try:
            with torch.inference_mode():
                forward_step(lm, prefix, torch.ones_like(prefix),
                             torch.arange(shared, device=ids.device)[None], cache)
        except _StopForward:
            pass  # the cache holds every layer up to the deepest one read: all the rest needs
        finally:
            in_prefix[0] = False
        cache.batch_repeat_interleave(n_rows)
    rest_mask = mask[:, : width - shared]
    rest_ids = ids[:, shared:] * rest_mask  # columns left of a row's own rest are padding
    full_mask = torch.cat([torch.ones_like(mask[:, :shared]), rest_mask], dim=1)
    positions = shared + position_ids(rest_mask)
    try:
        with torch.inference_mode():
            logits, _ = forward_step(lm, rest_ids, full_mask, positions, cache)
    except _StopForward:
        return None
    return logits


def last_logits(lm: LoadedModel, batch: ChatBatch) -> torch.Tensor:
    """Next-token logits ``[B, V]`` after each row, the shared prefix computed once."""
    shared = shared_prefix_length(lm, batch, position_weights(batch, "last"))
    if shared:
        logits = forward_sharing_prefix(lm, batch.input_ids, batch.attention_mask, shared,
                                        [False])
        assert logits is not None  # no stop_after hooks here
        return logits
    # An index tensor, not logits_to_keep=1: the int form feeds the LM head a
    # non-contiguous [B, 1, d] slice, which on CPU bfloat16 (tied embeddings) copies the
    # whole transposed vocab matrix per call, ~20 s here instead of ~0.1 s.
    last = torch.tensor([batch.input_ids.shape[1] - 1], device=batch.input_ids.device)
    return forward_batch(lm, batch, logits_to_keep=last).logits[:, -1]


def _read_batches(lm: LoadedModel, texts: list[str], layers: Sequence[int], position: str,
                  read: Callable[[int, list[int], torch.Tensor], None], *,
                  system: str | Sequence[str | None] | None, responses: Sequence[str] | None,
                  batch_size: int, chat_template: str | None, progress: Progress | None) -> None:
    """Forward ``texts`` batch by batch (stopped after the deepest of ``layers``, the shared
    prefix once when it pays); ``read(layer, prompt indices, [B, d])`` gets each layer's
    vectors at ``position``."""
    state: dict[str, Any] = {"in_prefix": [False]}

    def hook(layer: int, hidden: torch.Tensor) -> None:
        if not state["in_prefix"][0]:
            read(layer, state["idx"], _read_position(hidden, state["weights"]))

    with layer_output_hooks(lm, layers, hook, stop_after=True):
        for idx, batch in iter_batches(lm, texts, system=system, responses=responses,
                                       batch_size=batch_size, chat_template=chat_template):
            weights = position_weights(batch, position)
            shared = shared_prefix_length(lm, batch, weights)
            state.update(idx=idx, weights=weights[:, shared:])
            if shared:
                forward_sharing_prefix(lm, batch.input_ids, batch.attention_mask, shared,
                                       state["in_prefix"])
            else:
                run_until_stop(lm, batch)
            if progress is not None:
                progress(len(idx))


@contextmanager
def record_activations(
    lm: LoadedModel, layers: Sequence[int] | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record full hidden states ``[batch, seq, d]`` of chosen layers during any forwards.

    Yields ``{layer: [one tensor per forward call]}`` (detached, on the layer's
    device). Nothing else is kept; hooks are removed on exit, even on error.

    Example:
        >>> with record_activations(lm, layers=[3, 4]) as acts:   # doctest: +SKIP
        ...     lm.model(**inputs)
        >>> acts[3][0].shape                                        # doctest: +SKIP
        torch.Size([2, 17, 896])
    """
    chosen = resolve_layers(layers, lm.n_layers)
    records: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        records[layer].append(hidden.detach().clone())

    with layer_output_hooks(lm, chosen, keep):
        yield records


# -- batching ---------------------------------------------------------------------------------
def iter_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    system: str | Sequence[str | None] | None = None,
    responses: Sequence[str] | None = None,
    batch_size: int = 32,
    chat_template: str | None = None,
) -> Iterator[tuple[list[int], ChatBatch]]:
    """Yield ``(prompt indices, ChatBatch on lm.device)``, grouped by length to cut padding.

    All prompts are rendered and tokenized once; each batch is trimmed to its
    own longest row (left padding only where needed). With one system prompt per
    prompt, rows are batched per system prompt (a batch never mixes two), so each
    batch shares its system prompt's tokens (see :func:`shared_prefix_length`).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1; got {batch_size}.")
    full = encode(lm.tokenizer, prompts, system, responses=responses, chat_template=chat_template,
                  max_length=lm.context_length)
    lengths = full.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    groups: dict[str | None, list[int]] = {}
    systems = None if system is None or isinstance(system, str) else list(system)
    for i in order.tolist():
        groups.setdefault(systems[i] if systems is not None else None, []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            idx = torch.tensor(members[start:start + batch_size], dtype=torch.long)
            width = int(lengths[idx].max())
            cut = full.input_ids.shape[1] - width
            batch = ChatBatch(
                input_ids=full.input_ids[idx, cut:],
                attention_mask=full.attention_mask[idx, cut:],
                prompt_end=full.prompt_end[idx] - cut,
                n_post=full.n_post,
                texts=[full.texts[i] for i in idx.tolist()],
            )
            yield idx.tolist(), batch.to(lm.device)


def _read_position(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[B, d]`` = weighted sum over the columns any row reads (padding never touched)."""
    cols = (weights > 0).any(dim=0).nonzero().squeeze(1)
    w = weights[:, cols].to(hidden.device)
    h = hidden[:, cols.to(hidden.device)].float()
    h = torch.where(w[..., None] > 0, h, torch.zeros((), dtype=h.dtype, device=h.device))
    return torch.bmm(w[:, None, :], h).squeeze(1)


class _Running:
    """Chan et al. parallel mean/variance in float64, one ``[d]`` row per layer."""

    def __init__(self, n_layers: int, d_model: int, device: torch.device) -> None:
        self.counts = [0] * n_layers
        self.mean = torch.zeros(n_layers, d_model, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, row: int, x: torch.Tensor) -> None:
        x = x.to(self.mean.device, torch.float64)
        count_before, n_b = self.counts[row], x.shape[0]
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        total = count_before + n_b
        delta = mean_b - self.mean[row]
        self.mean[row] += delta * (n_b / total)
        self.m2[row] += m2_b + delta**2 * (count_before * n_b / total)
        self.counts[row] = total


def _stats_device(lm: LoadedModel) -> torch.device:
    device = lm.device
    return torch.device("cpu") if device.type == "mps" else device  # MPS lacks float64


def mean_activations(
    lm: LoadedModel,
    prompts: Any,
    *,
    system: str | Sequence[str | None] | None = None,
    layers: Sequence[int] | None = None,
    position: str = "last",
    responses: Sequence[str] | None = None,
    batch_size: int = 32,
    keep_raw: bool = False,
    chat_template: str | None = None,
    progress: Progress | None = None,
) -> ActivationStats:
    """Mean and variance of the activation at ``position`` for each chosen layer.

    One forward per batch of ``batch_size`` prompts, stopped after the deepest
    chosen layer. ``system`` is one system prompt or one per prompt.

    Example:
        >>> stats = mean_activations(lm, ["How do I bake bread?"], layers=[12])  # doctest: +SKIP
        >>> stats.mean.shape                                                      # doctest: +SKIP
        torch.Size([1, 896])
    """
    texts = prompt_texts(prompts)
    chosen = resolve_layers(layers, lm.n_layers)
    rows = {layer: r for r, layer in enumerate(chosen)}
    running = _Running(len(chosen), lm.d_model, _stats_device(lm))
    raw = torch.empty(len(texts), len(chosen), lm.d_model) if keep_raw else None

    def read(layer: int, idx: list[int], x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise SteerlabError(
                f"Layer {layer} produced non-finite activations (inf/nan); the model overflows "
                f"in {lm.dtype}. Load it with dtype='float32' (--dtype float32)."
            )
        running.add(rows[layer], x)
        if raw is not None:
            raw[idx, rows[layer]] = x.float().cpu()

    _read_batches(lm, texts, chosen, position, read, system=system, responses=responses,
                  batch_size=batch_size, chat_template=chat_template, progress=progress)
    count = running.counts[0]
    var = running.m2 / max(count, 1)
    return ActivationStats(count=count, mean=running.mean.cpu(), var=var.cpu(),
                           layers=chosen, position=position, raw=raw)


def project_activations(
    lm: LoadedModel,
    prompts: Any,
    direction: Any,
    *,
    system: str | Sequence[str | None] | None = None,
    position: str = "last",
    responses: Sequence[str] | None = None,
    batch_size: int = 32,
    chat_template: str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Scalar projections ``[n_prompts, len(direction.layers)]`` on each layer's unit vector.

    Columns follow ``direction.layers``; rows follow ``prompts``.
    Streams like :func:`mean_activations` but keeps only one number per prompt
    and layer (what Cohen's d and sign tests need).
    """
    texts = prompt_texts(prompts)
    resolve_layers(direction.layers, lm.n_layers)
    chosen = tuple(direction.layers)
    units = {layer: direction.vector(layer, unit=True).double() for layer in chosen}
    out = torch.empty(len(texts), len(chosen), dtype=torch.float64)
    rows = {layer: r for r, layer in enumerate(chosen)}

    def read(layer: int, idx: list[int], x: torch.Tensor) -> None:
        out[idx, rows[layer]] = (x.double() @ units[layer].to(x.device)).cpu()

    _read_batches(lm, texts, chosen, position, read, system=system, responses=responses,
                  batch_size=batch_size, chat_template=chat_template, progress=progress)
    return out
