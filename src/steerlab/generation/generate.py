"""Batched, KV-cached chat generation, optionally steered.

One loop, written for throughput and reproducibility rather than generality:

- prompts are rendered through the chat template, sorted by token length
  into left-padded batches (little padding), and returned in input order;
- the prompt is prefilled once, then one token per step from the KV cache,
  computing logits for the last position only (the loop is
  :func:`steerlab.generation.decoding.decode_loop`, shared with the server);
- rows that reach EOS or ``max_new_tokens`` leave the batch at once (their
  KV cache rows are dropped), so a batch costs what its live rows cost;
- sampling draws from a per-prompt generator seeded by ``(seed, index)``, so
  a prompt's sample does not depend on batch size, order or resumption;
- ``batch_size="auto"`` starts large and halves on out-of-memory;
- finished rows are appended to ``out_jsonl`` as they finish; rerunning with
  the same file skips the indices already there;
- :func:`generate_groups` runs several steerings (or system prompts) at once:
  their rows share batches, each steered only on its own rows (a row mask
  per group), so ten conditions over 48 prompts cost far fewer decode steps
  than ten separate calls; a row's tokens do not depend on its batch-mates
  beyond floating-point rounding;
- there, the layers below each group's first steered layer are prefilled once
  per prompt for all the groups over it (:mod:`steerlab.activations.shared_prefill`).

Example:
    >>> rows = generate(lm, ["Write a haiku."], max_new_tokens=32)   # doctest: +SKIP
    >>> rows[0].response                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import steerlab.interventions.steering as steering
from steerlab.activations.shared_prefill import BatchPlan, SharedPrefill
from steerlab.errors import DataError, SteerlabError
from steerlab.generation.batch_size import auto_batch_size, is_oom
from steerlab.generation.decoding import decode_loop, prompt_generator, sampling_probs
from steerlab.generation.progress import generation_progress
from steerlab.interventions.specs import Spec, resolve_specs, specs_to_json
from steerlab.prompts.chat import check_context, render
from steerlab.store.rowstore import Codec, RowStore, model_identity

FirstLogitsFn = Callable[[list[int], torch.Tensor], None]
"""``on_first_logits(input-order row indices, first-token logits [B, V])``."""
StopRule = Callable[[list[int]], bool]
"""``stop_when(token_ids)``: True once a row's tokens so far settle what is measured."""
GroupFirstLogitsFn = Callable[[list[tuple[int, int]], torch.Tensor], None]
"""``on_first_logits([(group, index within the group)], first-token logits [B, V])``."""

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


class GenerationError(SteerlabError):
    """Generation could not run (e.g. out of memory even at batch size 1)."""


@dataclass(frozen=True)
class Generation:
    """One prompt's response. ``finish_reason`` is ``stop`` (EOS), ``length`` or ``rule``
    (cut by ``stop_when``)."""

    index: int
    prompt: str
    system: str | None
    response: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: str
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        """Fields this version knows (a missing one is a TypeError)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class GenerationGroup:
    """Prompts to generate under one steering and system prompt (see :func:`generate_groups`)."""

    prompts: Sequence[Any]
    steer: Spec | Sequence[Spec] = ()
    system: str | Sequence[str | None] | None = None


@dataclass
class _Row:
    index: int
    prompt: str
    system: str | None
    id: str
    ids: list[int]
    group: int = 0
    slot: int = -1  # position in generate_groups' row list (its shared-prefill plan's row)


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    eos: frozenset[int]
    pad: int
    stop_when: StopRule | None = None


# -- token choice ------------------------------------------------------------------------------
def _choose(logits: torch.Tensor, settings: _Settings,
            generators: Sequence[torch.Generator]) -> torch.Tensor:
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, settings.temperature, settings.top_p)
    picks = [torch.multinomial(probs[i], 1, generator=gen) for i, gen in enumerate(generators)]
    return torch.cat(picks)


# -- one batch ---------------------------------------------------------------------------------
def _run_batch(lm: LoadedModel, rows: Sequence[_Row], group_specs: Sequence[Sequence[Spec]],
               settings: _Settings, emit: Callable[[_Row, list[int], str], None],
               on_tokens: Callable[[int], None],
               on_first_logits: Callable[[Sequence[_Row], torch.Tensor], None] | None = None,
               plan: BatchPlan | None = None,
               ) -> None:
    """Generate for ``rows``; call ``emit`` for each row as soon as it finishes.

    Each group present is steered by its own specs; with more than one group in the
    batch, each steering is masked to its group's rows, and the masks follow the
    rows as finished ones leave the batch.
    """
    tokens: list[list[int]] = [[] for _ in rows]
    generators: list[torch.Generator] = []
    first = [on_first_logits is not None]
    present = sorted({r.group for r in rows})
    with ExitStack() as stack:
        plans = [
            stack.enter_context(steering.steer(
                lm, group_specs[g],
                row_mask=None if len(present) == 1 else [r.group == g for r in rows]))
            for g in present if group_specs[g]
        ]

        def step(logits: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, list[int]]:
            if first[0] and on_first_logits is not None:  # the prefill: every row, first token
                first[0] = False
                on_first_logits(rows, logits)
            if settings.do_sample and not generators:
                # logits live where the LM head is (not the embedding's device under a device_map)
                generators.extend(prompt_generator(settings.seed, r.index, logits.device)
                                  for r in rows)
            chosen = _choose(logits, settings,
                             [generators[a] for a in active] if generators else [])
            keep: list[int] = []
            for j, (a, tok) in enumerate(zip(active, chosen.tolist(), strict=True)):
                if tok in settings.eos:
                    emit(rows[a], tokens[a], "stop")
                    continue
                tokens[a].append(tok)
                if len(tokens[a]) >= settings.max_new_tokens:
                    emit(rows[a], tokens[a], "length")
                elif settings.stop_when is not None and settings.stop_when(tokens[a]):
                    emit(rows[a], tokens[a], "rule")
                else:
                    keep.append(j)
            on_tokens(len(active))
            if keep and len(keep) < len(active):
                for plan in plans:  # the row masks follow the rows that stay
                    plan.select_rows(keep)
            return chosen, keep

        decode_loop(lm, [r.ids for r in rows], settings.pad, step,
                    prefill=None if plan is None else plan.prefill)


# -- output file -------------------------------------------------------------------------------
CODEC: Codec[Generation] = Codec(attrgetter("index"), Generation.to_dict, Generation.from_dict)


def _store(lm: LoadedModel, path: Path, specs: list[Spec], settings: _Settings,
           template: str | None, rows: dict[int, _Row], overwrite: bool) -> RowStore[Generation]:
    """The output file, resumed only under the same identity and for the same prompts."""
    sampling = [settings.temperature, settings.top_p, settings.seed] if settings.do_sample else None
    identity = {**model_identity(lm), "steer": json.loads(specs_to_json(specs, indent=None)),
                "max_new_tokens": settings.max_new_tokens, "sampling": sampling,
                "chat_template": hashlib.sha256((template or "").encode()).hexdigest()[:16]}

    def check(gen: Generation) -> str | None:
        row = rows.get(gen.index)
        same = row is not None and (row.prompt, row.system) == (gen.prompt, gen.system)
        return None if same else f"row {gen.index} is for another prompt than this run's"

    return RowStore(path, "generate", identity, CODEC, overwrite=overwrite, check=check)


# -- the public entry point --------------------------------------------------------------------
def _as_rows(lm: LoadedModel, prompts: Iterable[Any], system: str | Sequence[str | None] | None,
             chat_template: str | None, group: int = 0) -> list[_Row]:
    items = list(prompts)
    systems = [system] * len(items) if system is None or isinstance(system, str) else list(system)
    if len(systems) != len(items):
        raise DataError(f"Got {len(systems)} system prompts for {len(items)} prompts.")
    rows = []
    for index, (item, sys_prompt) in enumerate(zip(items, systems, strict=True)):
        text = item if isinstance(item, str) else getattr(item, "prompt", None)
        if not isinstance(text, str):
            raise DataError(f"Prompt {index} is a {type(item).__name__}, not text or a Prompt.")
        rendered = render(lm.tokenizer, text, sys_prompt, chat_template=chat_template)
        ids = list(lm.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        check_context(len(ids), lm.context_length, f"Prompt {index}")
        rows.append(_Row(index, text, sys_prompt, str(getattr(item, "id", "") or ""), ids, group))
    return rows


def eos_ids(lm: LoadedModel) -> frozenset[int]:
    """Every token id that ends a response: the tokenizer's and the generation config's."""
    found: set[int] = set()
    for value in (lm.tokenizer.eos_token_id,
                  getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    if not found:
        raise GenerationError("The tokenizer has no EOS token; set tokenizer.eos_token.")
    return frozenset(found)


def generate(
    lm: LoadedModel,
    prompts: Iterable[Any],
    *,
    system: str | Sequence[str | None] | None = None,
    steer: Spec | Sequence[Spec] = (),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | str = "auto",
    out_jsonl: str | Path | None = None,
    progress: bool = False,
    chat_template: str | None = None,
    on_first_logits: FirstLogitsFn | None = None,
    overwrite: bool = False,
    stop_when: StopRule | None = None,
) -> list[Generation]:
    """Chat-generate a response to each prompt, steered by ``steer`` (specs, in order).

    ``prompts`` are strings or :class:`steerlab.prompts.sets.Prompt`-like objects
    (``.prompt``, optional ``.id``). Returns one :class:`Generation` per prompt,
    in input order (including rows resumed from ``out_jsonl``).

    ``on_first_logits(indices, logits)`` is called once per batch with the
    first response token's logits ``[B, V]`` (rows given by their input-order
    indices): first-token statistics such as KL then cost no extra pass.

    ``out_jsonl`` is resumed only when steerlab wrote it under the same model, dtype,
    steering and settings for the same prompts; ``overwrite`` starts it over instead.

    ``stop_when(token_ids)`` ends a row early (``finish_reason`` ``rule``) once what it
    has generated settles what the caller measures, e.g. a refusal phrase already
    present; such cut responses are not stored, so it cannot go with ``out_jsonl``.
    """
    if stop_when is not None and out_jsonl is not None:
        raise GenerationError("stop_when cuts responses short; it cannot write out_jsonl.")
    settings = _settings(lm, max_new_tokens, do_sample, temperature, top_p, seed, stop_when)
    rows = _as_rows(lm, prompts, system, chat_template)
    specs = resolve_specs(steer, lm=lm)
    steering.check_specs(lm, specs)  # a bad spec fails before out_jsonl is created
    store = None if out_jsonl is None else _store(
        lm, Path(out_jsonl), specs, settings,
        chat_template or getattr(lm.tokenizer, "chat_template", None),
        {r.index: r for r in rows}, overwrite)
    done = {} if store is None else {g.index: g for g in store.rows()}
    pending = sorted((r for r in rows if r.index not in done), key=lambda r: -len(r.ids))
    if pending:
        _generate_to_file(lm, pending, specs, settings, batch_size, store, progress, done,
                          len(rows), on_first_logits)
    return [done[r.index] for r in rows]


def generate_groups(
    lm: LoadedModel,
    groups: Sequence[GenerationGroup],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | str = "auto",
    chat_template: str | None = None,
    on_done: Callable[[int, Generation], None] | None = None,
    on_first_logits: GroupFirstLogitsFn | None = None,
    on_batch: Callable[[list[tuple[int, int]], float], None] | None = None,
    share_prefill: bool = True,
) -> list[list[Generation]]:
    """Generate every group's prompts under that group's steering, rows of all groups
    sharing batches; returns one list per group, in its prompts' order.

    Why: a decode step's cost grows slowly with its rows (it is mostly reading the
    weights on a CPU, launch overhead on a GPU; embedded model, 2-core CPU: 0.14 s for
    16 rows, 0.26 s for 48, 0.43 s for 96), so conditions over the same few dozen
    prompts run together in far fewer steps than one after another. Rows
    are sorted by length across groups into left-padded batches. ``on_done(group,
    generation)`` is called as each row finishes (``generation.index`` is its index
    within the group), so a caller can store rows before an interruption.
    ``on_first_logits`` is as in :func:`generate`, rows named by ``(group, index)``;
    ``on_batch(rows, seconds)`` gets each finished batch's rows and wall time (and each
    shared prefill's rows and time), so a caller can split shared cost between groups.

    With ``share_prefill`` the layers below a group's first steered layer are prefilled once per
    prompt for every group that uses it, not once per group
    (:mod:`steerlab.activations.shared_prefill`): the same tokens up to floating-point rounding,
    less compute.
    """
    settings = _settings(lm, max_new_tokens, do_sample, temperature, top_p, seed)
    rows: list[_Row] = []
    group_specs: list[list[Spec]] = []
    for g, group in enumerate(groups):
        rows += _as_rows(lm, group.prompts, group.system, chat_template, group=g)
        group_specs.append(resolve_specs(group.steer, lm=lm))
    done: dict[tuple[int, int], Generation] = {}

    def emit(row: _Row, tokens: list[int], reason: str) -> None:
        gen = _generation(lm, row, tokens, reason)
        done[(row.group, row.index)] = gen
        if on_done is not None:
            on_done(row.group, gen)

    def keys(batch: Sequence[_Row]) -> list[tuple[int, int]]:
        return [(r.group, r.index) for r in batch]

    sharing = None
    if share_prefill and len(groups) > 1 and rows:
        starts = [steering.first_hooked_layer(lm, specs) for specs in group_specs]
        for slot, row in enumerate(rows):
            row.slot = slot
        sharing = SharedPrefill(lm, [r.ids for r in rows], [starts[r.group] for r in rows],
                                settings.pad)
        pending = [rows[slot] for slot in sharing.order]
    else:
        pending = sorted(rows, key=lambda r: -len(r.ids))
    if pending:
        _generate_batches(
            lm, pending, group_specs, settings, batch_size, emit, lambda _n: None,
            None if on_first_logits is None else
            lambda batch, logits: on_first_logits(keys(batch), logits),
            None if on_batch is None else lambda batch, secs: on_batch(keys(batch), secs),
            sharing=None if sharing is None else (sharing, rows),
        )
    out: list[list[Generation]] = [[] for _ in groups]
    for row in rows:
        out[row.group].append(done[(row.group, row.index)])
    return out


def _settings(lm: LoadedModel, max_new_tokens: int, do_sample: bool, temperature: float,
              top_p: float, seed: int, stop_when: StopRule | None = None) -> _Settings:
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise DataError(f"Sampling needs temperature > 0 and 0 < top_p ≤ 1; got {temperature}, "
                        f"{top_p}.")
    pad = lm.tokenizer.pad_token_id
    return _Settings(max_new_tokens, do_sample, float(temperature), float(top_p), int(seed),
                     eos_ids(lm), int(pad if pad is not None else 0), stop_when)


def _generation(lm: LoadedModel, row: _Row, tokens: list[int], reason: str) -> Generation:
    return Generation(row.index, row.prompt, row.system,
                      lm.tokenizer.decode(tokens, skip_special_tokens=True),
                      len(row.ids), len(tokens), reason, row.id)


def _generate_batches(lm: LoadedModel, pending: list[_Row], group_specs: Sequence[Sequence[Spec]],
                      settings: _Settings, batch_size: int | str,
                      emit: Callable[[_Row, list[int], str], None],
                      on_tokens: Callable[[int], None],
                      on_first_logits: Callable[[Sequence[_Row], torch.Tensor], None] | None,
                      on_batch: Callable[[Sequence[_Row], float], None] | None = None,
                      sharing: tuple[SharedPrefill, Sequence[_Row]] | None = None,
                      ) -> None:
    """Run ``pending`` (sorted longest first, or in ``sharing``'s order) in batches, halving
    the size on out-of-memory and retrying only the rows of the failed batch that had not
    finished. A batch does not cross a shared-prefill chunk."""
    finished: set[int] = set()

    def emit_once(row: _Row, tokens: list[int], reason: str) -> None:
        finished.add(id(row))
        emit(row, tokens, reason)

    if batch_size == "auto":
        size = auto_batch_size(lm, len(pending), max(len(r.ids) for r in pending)
                               + settings.max_new_tokens)
    elif isinstance(batch_size, int) and batch_size >= 1:
        size = batch_size
    else:
        raise DataError(f"batch_size must be 'auto' or a positive integer; got {batch_size!r}.")
    while pending:
        batch = pending[:size]
        if sharing is not None:
            batch = batch[:sharing[0].same_chunk([r.slot for r in batch])]
        rest = pending[len(batch):]
        try:
            plan = None
            if sharing is not None:
                started = time.perf_counter()
                plan = sharing[0].batch([r.slot for r in batch], size)
                if plan.computed and on_batch is not None:
                    on_batch([sharing[1][slot] for slot in plan.computed],
                             time.perf_counter() - started)
            started = time.perf_counter()
            _run_batch(lm, batch, group_specs, settings, emit_once, on_tokens, on_first_logits,
                       plan)
            if on_batch is not None:
                on_batch(batch, time.perf_counter() - started)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(exc):
                raise
            if size == 1:
                raise GenerationError(
                    "Out of memory even at batch size 1; lower --max-new-tokens, use a "
                    "smaller dtype or a machine with more memory."
                ) from exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, min(size, len(batch)) // 2)
            rest = [r for r in batch if id(r) not in finished] + rest
        pending = rest


def _generate_to_file(lm: LoadedModel, pending: list[_Row], specs: list[Spec],
                      settings: _Settings, batch_size: int | str,
                      store: RowStore[Generation] | None, progress: bool,
                      done: dict[int, Generation], total: int,
                      on_first_logits: FirstLogitsFn | None = None) -> None:
    bar = generation_progress(progress)
    task = bar.add_task("generating", total=total, completed=len(done), tokens=0)
    n_tokens = 0
    with ExitStack() as stack:
        put = stack.enter_context(store.appending()) if store is not None else None
        stack.enter_context(bar)

        def emit(row: _Row, tokens: list[int], reason: str) -> None:
            gen = _generation(lm, row, tokens, reason)
            done[row.index] = gen if put is None else put(gen)
            bar.advance(task)

        def on_tokens(count: int) -> None:
            nonlocal n_tokens
            n_tokens += count
            bar.update(task, tokens=n_tokens)

        _generate_batches(lm, pending, [specs], settings, batch_size, emit, on_tokens,
                          None if on_first_logits is None else
                          lambda batch, logits: on_first_logits([r.index for r in batch], logits))

__all__ = ["Generation", "GenerationError", "GenerationGroup", "auto_batch_size", "eos_ids",
           "generate", "generate_groups"]
