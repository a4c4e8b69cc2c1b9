"""Readers for prompt files in the layouts researchers already have on disk.

Each reader turns a file's text into plain records, and :func:`normalize` maps a
record onto the fields of a :class:`steerlab.prompts.sets.Prompt`. Known layouts:

- JSONL (one object per line) and JSON (a list of objects or strings) with the
  prompt in ``prompt``, ``instruction``, ``goal``, ``Goal``, ``forbidden_prompt``
  or ``Behavior`` (the first present wins; JailbreakBench has both ``Goal`` and a
  short ``Behavior`` name, and ``Goal`` is the request);
- CSV in the original column layouts of AdvBench (``goal,target``), HarmBench
  (``Behavior`` with ``ContextString``, which is put before the behavior the way
  HarmBench's own templates do: ``context\\n\\n---\\n\\nbehavior``), JailbreakBench
  JBB-Behaviors (``Goal``), StrongREJECT (``forbidden_prompt``) and XSTest
  (``prompt``, ``type`` becomes the category, ``label`` stays ``safe``/``unsafe``);
- Alpaca JSON: ``instruction`` with a non-empty ``input`` appended after a blank line;
- plain text: one prompt per non-blank line.

Columns that do not become a Prompt field are kept in ``extra``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from steerlab.errors import DataError

TEXT_FIELDS = ("prompt", "instruction", "goal", "Goal", "forbidden_prompt", "Behavior")
ID_FIELDS = ("id", "BehaviorID", "Index")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "type")
LABEL_FIELDS = ("label", "pole")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
HARMBENCH_CONTEXT = "ContextString"
ALPACA_INPUT = "input"

Record = tuple[str, Any]  # (where in the file, e.g. "line 3", the raw record)


def read_records(text: str, name: str, suffix: str) -> list[Record]:
    """Parse the text of ``name`` into raw records, by file suffix."""
    suffix = suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".txt": _txt}
    if suffix not in readers:
        raise DataError(
            f"{name}: unknown prompt file type {suffix or '(no suffix)'!r}. steerlab reads "
            f"{', '.join(SUFFIXES)}; rename the file or convert it to one of them."
        )
    return list(readers[suffix](text, name))


def _jsonl(text: str, name: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        record = _loads(line, name, "Each line of a .jsonl file must hold one complete JSON "
                        "object.", lineno)
        yield f"line {lineno}", record


def _loads(text: str, name: str, hint: str, lineno: int | None = None) -> Any:
    """``json.loads`` whose error names the file, the line (``lineno`` or the parser's) and
    what the file should hold."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = exc.lineno if lineno is None else lineno
        raise DataError(f"{name}, line {line}: not valid JSON ({exc.msg}, column {exc.colno}). "
                        f"{hint}") from exc


def _json(text: str, name: str) -> Iterator[Record]:
    data = _loads(text, name, "A .json prompt file must hold one JSON list (use .jsonl for one "
                  "object per line).")
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a JSON list of objects or strings at the top level, got "
            f"{type(data).__name__}. Put the prompts in a list, e.g. [{{\"prompt\": \"...\"}}]."
        )
    for index, record in enumerate(data, 1):
        yield f"item {index}", record


def _csv(text: str, name: str) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames
    if not columns:
        raise DataError(f"{name}: the CSV file is empty; it needs a header row and prompt rows.")
    if not any(field in columns for field in TEXT_FIELDS):
        raise DataError(
            f"{name}: no prompt column. Looked for the columns {', '.join(TEXT_FIELDS)}; the "
            f"header has {', '.join(c for c in columns if c) or 'no names'}. Rename the column "
            "that holds the prompts to one of those."
        )
    for row in reader:
        row.pop(None, None)  # type: ignore[call-overload]  # surplus cells of ragged rows
        yield f"line {reader.line_num}", row


def _txt(text: str, name: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"line {lineno}", {"prompt": line.strip()}


def _first(record: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, Any]:
    for field in fields:
        value = record.get(field)
        if value is not None and value != "":
            return field, value
    return None, None


def normalize(record: Any, where: str, name: str, default_id: str) -> dict[str, Any]:
    """Map one raw record onto Prompt keyword arguments (id, prompt, category, ...)."""
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict):
        raise DataError(
            f"{name}, {where}: expected a JSON object or string, got {type(record).__name__}."
        )
    text_field, text = _first(record, TEXT_FIELDS)
    if text_field is None:
        raise DataError(
            f"{name}, {where}: no prompt text. Looked for the fields {', '.join(TEXT_FIELDS)}; "
            f"this record has {', '.join(map(str, record)) or 'no fields'}."
        )
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{name}, {where}: the {text_field!r} field must be a non-empty string.")
    text = text.strip()
    context = record.get(HARMBENCH_CONTEXT)
    if isinstance(context, str) and context.strip():
        text = f"{context.strip()}\n\n---\n\n{text}"
    extra_input = record.get(ALPACA_INPUT)
    if text_field == "instruction" and isinstance(extra_input, str) and extra_input.strip():
        text = f"{text}\n\n{extra_input.strip()}"
    id_field, ident = _first(record, ID_FIELDS)
    cat_field, category = _first(record, CATEGORY_FIELDS)
    label_field, label = _first(record, LABEL_FIELDS)
    pair_id = record.get("pair_id")
    consumed = {text_field, id_field, cat_field, "pair_id", HARMBENCH_CONTEXT}
    if label_field == "label":
        consumed.add("label")  # a persona "pole" is also kept in extra
    if text_field == "instruction":
        consumed.add(ALPACA_INPUT)
    return {
        "id": str(ident) if ident is not None else default_id,
        "prompt": text,
        "category": str(category) if category is not None else "",
        "pair_id": str(pair_id) if pair_id not in (None, "") else None,
        "label": str(label) if label is not None else None,
        "extra": {k: v for k, v in record.items() if k not in consumed},
    }
