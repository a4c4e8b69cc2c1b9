"""Prompt sets: steerlab's built-in sets and any prompt file, behind one loader.

``load_prompts(source)`` takes a built-in name (see :func:`builtin_sets`) or a
file path (``.jsonl``, ``.json``, ``.csv``, ``.txt``; layouts in
:mod:`steerlab.prompts.formats`). A built-in name may carry a ``:KEY`` suffix that picks
a label or a category: ``paired:harmful``, ``persona:compliance``,
``capability:arithmetic``.

Splits. Every set has deterministic train/val/test splits (60/20/20). Prompts
are grouped by ``pair_id`` (or their ``id`` when unpaired), so both halves of a
pair always land in the same split. Within each category the groups are ranked
by ``sha256("steerlab-split-v1:" + group)`` and cut at round-half-up 60% and 80%
of the count, so every category is split 60/20/20 as closely as its size
allows, the result never depends on Python's ``hash`` seed, file order or the
machine, and it stays the same across runs. (A category of one or two groups has
nothing in test.) Splits are computed on the whole set before any label,
category or limit filter, so ``paired:harmful`` and ``paired:harmless`` in the
same split are exact twins.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from steerlab.errors import DataError
from steerlab.prompts.formats import SUFFIXES, normalize, read_records

SPLITS = ("train", "val", "test")
SPLIT_SALT = "steerlab-split-v1"
PERSONA_AXES = (
    "compliance", "evil_nurturing", "callous_supportive", "hostile_patient", "arrogant_diplomatic",
)
_PAIR_ORDER = (("harmful", "harmless"), ("positive", "negative"))


@dataclass(frozen=True)
class Prompt:
    """One user prompt (or, in the persona set, one system prompt) with its metadata.

    ``label`` is ``harmful``/``harmless`` in the paired and tier-2 sets, the pole
    (``positive``/``negative``) in the persona set, and whatever a file's ``label``
    column says otherwise (XSTest: ``safe``/``unsafe``).
    """

    id: str
    prompt: str
    category: str = ""
    pair_id: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def group(self) -> str:
        """The unit that splits keep together: the pair, or the prompt itself."""
        return self.pair_id or self.id


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable collection of prompts from one source."""

    name: str
    prompts: tuple[Prompt, ...]
    source: str = ""
    split: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def texts(self) -> list[str]:
        """The prompt strings, in order (what activations and generation take)."""
        return [p.prompt for p in self.prompts]

    def filter(self, *, label: str | None = None, category: str | None = None) -> PromptSet:
        """The prompts with this label and/or category (None means any)."""
        kept = tuple(
            p for p in self.prompts
            if (label is None or p.label == label) and (category is None or p.category == category)
        )
        return replace(self, prompts=kept)

    def limit(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts in file order (deterministic; None keeps all)."""
        if n is None:
            return self
        if n < 0:
            raise DataError(f"limit must be zero or positive, got {n}.")
        return replace(self, prompts=self.prompts[:n])

    def categories(self) -> dict[str, int]:
        """Prompt count per category, in order of first appearance."""
        return dict(Counter(p.category for p in self.prompts))

    def labels(self) -> dict[str, int]:
        """Prompt count per label (unlabelled prompts are left out)."""
        return dict(Counter(p.label for p in self.prompts if p.label is not None))

    def pairs(self) -> list[tuple[Prompt, Prompt]]:
        """The (harmful, harmless) or (positive, negative) twins, in file order.

        Other labels keep file order within the pair. Every pair must have both halves.
        """
        groups: dict[str, list[Prompt]] = {}
        for p in self.prompts:
            if p.pair_id is None:
                raise DataError(f"{self.name}: prompt {p.id!r} has no pair_id, so it has no twin.")
            groups.setdefault(p.pair_id, []).append(p)
        out = []
        for pair_id, members in groups.items():
            if len(members) != 2:
                raise DataError(
                    f"{self.name}: pair {pair_id!r} has {len(members)} prompt(s) here, not 2 (was "
                    "one half filtered out by a label?). Take pairs before filtering by label."
                )
            first, second = members
            for order in _PAIR_ORDER:
                if (second.label, first.label) == order:
                    first, second = second, first
            out.append((first, second))
        return out


@dataclass(frozen=True)
class BuiltinSet:
    """A prompt set shipped as package data, with its data card."""

    name: str
    filename: str
    description: str

    def read_text(self) -> str:
        return (resources.files("steerlab") / "data" / self.filename).read_text(encoding="utf-8")

    def card(self) -> str:
        """The data card (what, how written, intended use), as Markdown."""
        card = self.filename.replace(".jsonl", ".md")
        return (resources.files("steerlab") / "data" / "cards" / card).read_text(encoding="utf-8")


_BUILTINS = {
    b.name: b
    for b in (
        BuiltinSet("paired", "paired_contrasts.jsonl",
                   "harmful requests and harmless twins differing only in intent"),
        BuiltinSet("tier2", "tier2_extreme.jsonl",
                   "gravest-harm requests (murder, terrorism, mass-casualty weapons) with twins"),
        BuiltinSet("persona", "persona_contrasts.jsonl",
                   "system-prompt pairs: compliant/cautious and four relational trait axes"),
        BuiltinSet("neutral", "neutral_questions.jsonl",
                   "ordinary questions to read persona activations on"),
        BuiltinSet("harmless", "harmless_instructions.jsonl",
                   "benign instructions for KL and over-refusal checks"),
        BuiltinSet("capability", "capability.jsonl",
                   "short questions with answers for before/after capability checks"),
    )
}


def builtin_sets() -> dict[str, BuiltinSet]:
    """The built-in prompt sets by name (``load_prompts(name)`` loads one)."""
    return dict(_BUILTINS)


def _digest(group: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{group}".encode()).hexdigest()


def split_of(prompts: PromptSet) -> dict[str, str]:
    """Which split (train/val/test) each group (pair_id or id) belongs to."""
    strata: dict[str, list[str]] = {}
    seen: set[str] = set()
    for p in prompts:
        if p.group not in seen:
            seen.add(p.group)
            strata.setdefault(p.category, []).append(p.group)
    assignment: dict[str, str] = {}
    for groups in strata.values():
        ranked = sorted(groups, key=lambda g: (_digest(g), g))
        n = len(ranked)
        cut_train, cut_val = (6 * n + 5) // 10, (8 * n + 5) // 10  # round half up, in integers
        for i, group in enumerate(ranked):
            assignment[group] = "train" if i < cut_train else "val" if i < cut_val else "test"
    return assignment


def splits(prompts: PromptSet) -> dict[str, PromptSet]:
    """The deterministic 60/20/20 train/val/test split of a set (see module docstring)."""
    assignment = split_of(prompts)
    return {
        name: replace(prompts, prompts=tuple(p for p in prompts if assignment[p.group] == name),
                      split=name)
        for name in SPLITS
    }


def _parse(text: str, source: str, suffix: str, stem: str, name: str) -> PromptSet:
    """The prompts of one file's text; unnamed records get ids ``STEM-0001``, ..."""
    prompts = tuple(
        Prompt(**normalize(rec, where, source, f"{stem}-{i:04d}"))
        for i, (where, rec) in enumerate(read_records(text, source, suffix), 1)
    )
    return PromptSet(name, prompts, source=source)


def _read_builtin(builtin: BuiltinSet) -> PromptSet:
    return _parse(builtin.read_text(), f"builtin:{builtin.filename}", ".jsonl",
                  builtin.filename.removesuffix(".jsonl"), builtin.name)


def _read_file(path: Path) -> PromptSet:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}). Re-save the file as UTF-8.") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc}).") from exc
    return _parse(text, str(path), path.suffix, path.stem, path.stem)


def _unknown_builtin(name: str) -> DataError:
    return DataError(
        f"Unknown built-in prompt set {name!r}. Built-in sets: {', '.join(_BUILTINS)} "
        f"(a ':KEY' suffix picks a label or category, e.g. paired:harmful). To load a file, "
        f"pass its path ({', '.join(SUFFIXES)})."
    )


def _resolve(source: str | Path) -> tuple[PromptSet, str | None]:
    """Load the whole set behind ``source``; return it and any ``:KEY`` suffix."""
    text = str(source)
    base, _, key = text.partition(":")
    if not isinstance(source, Path) and base in _BUILTINS:
        return _read_builtin(_BUILTINS[base]), key or None
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path), None
    if path.exists():
        raise DataError(f"{path} is a directory; pass a prompt file or a built-in set name.")
    if not isinstance(source, Path) and "/" not in text and "\\" not in text \
            and path.suffix.lower() not in SUFFIXES:
        raise _unknown_builtin(base)
    raise DataError(f"Prompt file {path} does not exist. Check the path.")


def _present(pset: PromptSet) -> str:
    labels = ", ".join(pset.labels()) or "none"
    cats = ", ".join(c for c in pset.categories() if c) or "none"
    return f"labels present: {labels}; categories present: {cats}"


def load_prompts(
    source: str | Path,
    *,
    split: str | None = None,
    label: str | None = None,
    category: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load a built-in set or a prompt file, optionally one split, label or category.

    The split is taken first (on the whole set, by pair), then the ``:KEY`` suffix,
    ``label`` and ``category`` filters, then the first ``limit`` prompts.

    Example:
        >>> harmful = load_prompts("paired:harmful", split="train")
        >>> len(harmful), harmful[0].label
        (144, 'harmful')
    """
    full, key = _resolve(source)
    if not full:
        raise DataError(f"{full.source}: no prompts in it. Add at least one prompt.")
    pset = full
    if split is not None:
        if split not in SPLITS:
            raise DataError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        pset = splits(full)[split]
    if key is not None:
        if key in full.labels():
            pset = pset.filter(label=key)
        elif key in full.categories():
            pset = pset.filter(category=key)
        else:
            raise DataError(
                f"{source}: {key!r} is neither a label nor a category of {full.name} "
                f"({_present(full)})."
            )
        pset = replace(pset, name=f"{full.name}:{key}")
    pset = pset.filter(label=label, category=category).limit(limit)
    if not pset:
        asked = ", ".join(
            f"{k}={v!r}" for k, v in
            (("split", split), ("label", label), ("category", category), ("limit", limit))
            if v is not None
        )
        raise DataError(f"No prompts in {full.source} match {asked} ({_present(full)}).")
    return pset


def check_held_out(eval_set: PromptSet, used: Sequence[tuple[str, PromptSet]]) -> None:
    """Refuse evaluation prompts that also served to extract a direction or to choose a
    layer or strength: a result scored on them would be tuned to them.

    ``used`` pairs each set with its role (``"validation"``, ``"extraction"``). Prompts
    match after whitespace and case are normalised.
    """
    def norm(text: str) -> str:
        return " ".join(text.split()).casefold()

    ours = {norm(p.prompt) for p in eval_set}
    for role, pset in used:
        shared = [p.prompt for p in pset if norm(p.prompt) in ours]
        if shared:
            raise DataError(
                f"{len(shared)} of the {len(eval_set)} evaluation prompts ({eval_set.name}) are "
                f"also {role} prompts ({pset.name}{f', {pset.split} split' if pset.split else ''}"
                f"), e.g. {shared[0]!r}. Evaluate on prompts nothing was extracted or chosen on: "
                "the built-in test split, or a file that does not share them."
            )


def persona_pairs(axis: str = "compliance", split: str | None = None) -> list[tuple[str, str]]:
    """System-prompt pairs of one persona axis: (positive pole, negative pole).

    For ``compliance`` that is (compliant/unrestricted, cautious/safety-conscious);
    for the trait axes (evil, nurturing), (callous, supportive), (hostile, patient),
    (arrogant, diplomatic).
    """
    if axis not in PERSONA_AXES:
        raise DataError(f"Unknown persona axis {axis!r}; choose one of {', '.join(PERSONA_AXES)}.")
    pset = load_prompts("persona", split=split, category=axis)
    return [(pos.prompt, neg.prompt) for pos, neg in pset.pairs()]
