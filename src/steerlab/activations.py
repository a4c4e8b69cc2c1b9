"""Residual-stream activations: recorded or averaged during ONE batched forward.

"Layer i" everywhere in steerlab means the residual stream at the OUTPUT of
decoder layer ``i`` (a forward hook on the layer; the same tensor is the input
of layer ``i + 1``, Arditi et al.'s ``resid_pre`` of layer ``i + 1``). The last
layer's output is read before the final norm.

:func:`mean_activations` streams: per batch it reads one token position (or a
weighted mean of positions, see :func:`steerlab.chat.position_weights`) at the
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

from steerlab.chat import ChatBatch, encode, position_weights
from steerlab.errors import DataError, SteerlabError
from steerlab.model import LoadedModel

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
def resolve_layers(lm: LoadedModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    """Validate layer indices (negative counts from the end); None means all layers."""
    if layers is None:
        return tuple(range(lm.n_layers))
    out = []
    for layer in layers:
        index = int(layer) + lm.n_layers if int(layer) < 0 else int(layer)
        if not 0 <= index < lm.n_layers:
            raise DataError(f"Layer {layer} is out of range: the model has {lm.n_layers} layers "
                            f"(0-{lm.n_layers - 1}).")
        out.append(index)
    if not out:
        raise DataError("No layers chosen; pass at least one layer index or None for all.")
    return tuple(sorted(set(out)))


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
    chosen = resolve_layers(lm, layers)
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
    sort: bool = True,
    chat_template: str | None = None,
) -> Iterator[tuple[list[int], ChatBatch]]:
    """Yield ``(prompt indices, ChatBatch on lm.device)``, grouped by length to cut padding.

    All prompts are rendered and tokenized once; each batch is trimmed to its
    own longest row (left padding only where needed).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1; got {batch_size}.")
    full = encode(lm.tokenizer, prompts, system, responses=responses, chat_template=chat_template)
    lengths = full.attention_mask.sum(dim=1)
    order = (torch.argsort(lengths, descending=True, stable=True) if sort
             else torch.arange(len(prompts)))
    for start in range(0, len(prompts), batch_size):
        idx = order[start:start + batch_size]
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
        self.count = 0
        self.mean = torch.zeros(n_layers, d_model, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, row: int, x: torch.Tensor, count_before: int) -> None:
        x = x.to(self.mean.device, torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        total = count_before + n_b
        delta = mean_b - self.mean[row]
        self.mean[row] += delta * (n_b / total)
        self.m2[row] += m2_b + delta**2 * (count_before * n_b / total)


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
    chosen = resolve_layers(lm, layers)
    rows = {layer: r for r, layer in enumerate(chosen)}
    running = _Running(len(chosen), lm.d_model, _stats_device(lm))
    raw = torch.empty(len(texts), len(chosen), lm.d_model) if keep_raw else None
    state: dict[str, Any] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        x = _read_position(hidden, state["weights"])
        if not torch.isfinite(x).all():
            raise SteerlabError(
                f"Layer {layer} produced non-finite activations (inf/nan); the model overflows "
                f"in {lm.dtype}. Load it with dtype='float32' (--dtype float32)."
            )
        running.add(rows[layer], x, state["seen"])
        if raw is not None:
            raw[state["idx"], rows[layer]] = x.float().cpu()

    with layer_output_hooks(lm, chosen, read, stop_after=True):
        for idx, batch in iter_batches(lm, texts, system=system, responses=responses,
                                       batch_size=batch_size, chat_template=chat_template):
            state.update(weights=position_weights(batch, position), idx=idx,
                         seen=running.count)
            run_until_stop(lm, batch)
            running.count += len(idx)
            if progress is not None:
                progress(len(idx))
    var = running.m2 / max(running.count, 1)
    return ActivationStats(count=running.count, mean=running.mean.cpu(), var=var.cpu(),
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
    resolve_layers(lm, direction.layers)
    chosen = tuple(direction.layers)
    units = {layer: direction.vector(layer, unit=True).double() for layer in chosen}
    out = torch.empty(len(texts), len(chosen), dtype=torch.float64)
    rows = {layer: r for r, layer in enumerate(chosen)}
    state: dict[str, Any] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        x = _read_position(hidden, state["weights"]).double()
        out[state["idx"], rows[layer]] = (x @ units[layer].to(x.device)).cpu()

    with layer_output_hooks(lm, chosen, read, stop_after=True):
        for idx, batch in iter_batches(lm, texts, system=system, responses=responses,
                                       batch_size=batch_size, chat_template=chat_template):
            state.update(weights=position_weights(batch, position), idx=idx)
            run_until_stop(lm, batch)
            if progress is not None:
                progress(len(idx))
    return out
