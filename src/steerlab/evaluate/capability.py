"""Accuracy on the built-in capability set: does the model still work?

Greedy short answers, graded by normalised exact match against the answer and
its aliases; multiple-choice items also accept the letter ("B", "(B)",
"B) 42", "The answer is B"). Numeric answers also match the first number of
the reply or the number after "answer is"/"=" ("43.", "The answer is 43").
Graders are lenient on form, strict on content.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steerlab.evaluate.backends import InProcessBackend
from steerlab.evaluate.stats import rate_summary
from steerlab.prompts.sets import load_prompts

if TYPE_CHECKING:
    from steerlab.evaluate.backends import Backend
    from steerlab.model.loading import LoadedModel
    from steerlab.prompts.sets import Prompt

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"^\(?([A-Z])(?:\)|\.|:|$)")
_ANSWER_IS = re.compile(r"(?:answer is|answer:|=)\s*(.+)")


def normalise_answer(text: str) -> str:
    """Trim, case-fold, drop markdown emphasis and trailing punctuation, squeeze spaces."""
    s = text.strip().casefold().replace("**", "").replace("`", "")
    s = re.sub(r"\s+", " ", s)
    return s.strip().rstrip(".!;:,").strip()


def _forms(text: str) -> set[str]:
    s = normalise_answer(text)
    return {s, s.strip("'\"")} - {""}


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def grade(response: str, answer: str, aliases: Sequence[str] = (),
          choices: Sequence[str] | None = None) -> bool:
    """True when ``response`` gives ``answer`` (or an alias), in a lenient form."""
    accepted: set[str] = set()
    for a in (answer, *aliases):
        accepted |= _forms(a)
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    candidates = _forms(response) | _forms(first)
    for match in _ANSWER_IS.finditer(normalise_answer(response)):
        candidates |= _forms(match.group(1).split(". ")[0])
    if choices:
        letter = _LETTER.match(first.strip().replace("**", ""))
        if letter:
            candidates.add(letter.group(1).casefold())
        said = re.search(r"answer is \(?([a-z])\)?(?:\W|$)", normalise_answer(response))
        if said:
            candidates.add(said.group(1))
    if candidates & accepted:
        return True
    targets = {n for a in accepted if (n := _as_number(a)) is not None}
    if targets:
        numbers = [_NUMBER.search(first)] + [
            _NUMBER.match(m.group(1).strip()) for m in _ANSWER_IS.finditer(response.casefold())]
        for found in numbers:
            if found is not None and float(found.group(0)) in targets:
                return True
    return False


def capability_items(limit: int | None = None) -> list[Prompt]:
    """The built-in capability prompts; ``limit`` takes them round-robin over categories
    (deterministic), so a small limit still covers every category."""
    items = list(load_prompts("capability"))
    if limit is None or limit >= len(items):
        return items
    by_cat: dict[str, list[Prompt]] = {}
    for p in items:
        by_cat.setdefault(p.category, []).append(p)
    picked: list[Prompt] = []
    queues = list(by_cat.values())
    i = 0
    while len(picked) < limit:
        queue = queues[i % len(queues)]
        j = i // len(queues)
        if j < len(queue):
            picked.append(queue[j])
        i += 1
    return picked


def capability_eval(backend: Backend, limit: int | None = None, *,
                    system: str | None = None) -> dict[str, Any]:
    """Accuracy of any backend on the capability set: overall and per category, with CIs."""
    items = capability_items(limit)
    rows: list[dict[str, Any]] = [{} for _ in items]
    for comp in backend.stream([p.prompt for p in items], system):
        item = items[comp.index]
        rows[comp.index] = {
            "id": item.id, "category": item.category, "response": comp.response,
            "correct": grade(comp.response, str(item.extra.get("answer", "")),
                             item.extra.get("aliases") or (), item.extra.get("choices")),
        }
    summary = rate_summary([r["correct"] for r in rows])
    cats = sorted({r["category"] for r in rows})
    return {
        "n": summary["n"], "k": summary["k"], "accuracy": summary["rate"],
        "ci95": summary["ci95"],
        "by_category": {c: rate_summary([r["correct"] for r in rows if r["category"] == c])
                        for c in cats},
        "items": rows,
    }


def capability_accuracy(lm: LoadedModel, specs: Sequence[Any] = (), limit: int | None = None,
                        *, system: str | None = None, max_new_tokens: int = 16,
                        batch_size: int = 16) -> dict[str, Any]:
    """Greedy accuracy of ``lm`` (with ``specs`` applied) on the capability set.

    Returns ``{"n", "k", "accuracy", "ci95", "by_category", "items"}``.

    Example:
        >>> capability_accuracy(lm, specs, limit=40)["accuracy"]  # doctest: +SKIP
        0.45
    """
    backend = InProcessBackend(lm, specs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return capability_eval(backend, limit, system=system)
