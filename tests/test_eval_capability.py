"""Capability grading and accuracy, through a real HTTP backend and in-process."""

from __future__ import annotations

import pytest

from steerlab.evaluate.backends import OpenAIBackend
from steerlab.evaluate.capability import (
    capability_accuracy,
    capability_eval,
    capability_items,
    grade,
)
from tests.openai_stub import OpenAIStub, user_text

CHOICES = ["A) 32", "B) 42", "C) 44", "D) 52"]


@pytest.mark.parametrize("response", [
    "43", "43.", " 43\n", "The answer is 43.", "**43**", "17 + 26 = 43", "forty-three",
    "43\nBecause 17 + 26 is 43.",
])
def test_grade_numeric_accepts(response):
    assert grade(response, "43", ["forty-three"])


@pytest.mark.parametrize("response", ["44", "The answer is 44.", "17 + 26", "I don't know", ""])
def test_grade_numeric_rejects(response):
    assert not grade(response, "43", ["forty-three"])


@pytest.mark.parametrize("response", ["B", "B)", "(B)", "B) 42", "b) 42", "B.", "42",
                                      "The answer is B.", "**B**"])
def test_grade_choice_accepts(response):
    assert grade(response, "B", ["B) 42", "42"], CHOICES)


@pytest.mark.parametrize("response", ["A", "C) 44", "A good question! It is 44.", "D"])
def test_grade_choice_rejects(response):
    assert not grade(response, "B", ["B) 42", "42"], CHOICES)


def test_grade_code_quotes_and_case():
    assert grade("'hello'", "'hello'", ["hello", '"hello"'])
    assert grade("hello", "'hello'")
    assert grade("`HELLO`", "'hello'")
    assert not grade("'world'", "'hello'")


def test_capability_items_round_robin():
    items = capability_items(8)
    assert len(items) == 8
    assert {p.category for p in items} == {"arithmetic", "facts", "reading", "code"}
    assert capability_items(8) == items
    assert len(capability_items()) == 189


def _oracle(req):
    by_prompt = {p.prompt: p for p in capability_items()}
    item = by_prompt[user_text(req)]
    return item.extra["answer"] if item.category != "facts" else "I am not sure."


def test_capability_eval_over_http():
    with OpenAIStub(_oracle) as stub:
        result = capability_eval(OpenAIBackend(stub.url, "m", max_concurrency=4), limit=12)
    assert result["n"] == 12 and result["k"] == 9
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["by_category"]["facts"]["rate"] == 0.0
    assert result["by_category"]["code"]["rate"] == 1.0
    lo, hi = result["ci95"]
    assert lo < 0.75 < hi
    assert [r["id"] for r in result["items"]] == [p.id for p in capability_items(12)]


def test_capability_accuracy_in_process(tiny_qwen):
    result = capability_accuracy(tiny_qwen, limit=4, max_new_tokens=3)
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert len(result["by_category"]) == 4
    assert all(isinstance(r["response"], str) for r in result["items"])
