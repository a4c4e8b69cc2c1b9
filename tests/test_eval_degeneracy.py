"""Degeneracy detector: what it flags, why, and what it must leave alone."""

from __future__ import annotations

import pytest

from steerlab.evaluate.degeneracy import (
    DegeneracyConfig,
    DegeneracyDetector,
    is_degenerate,
    longest_run,
    periodic_tail,
    repeated_ngram_fraction,
    tokens,
)


def reasons(text: str) -> tuple[str, ...]:
    return DegeneracyDetector()(text).reasons


def test_empty_and_whitespace():
    assert reasons("") == ("empty",)
    assert reasons(" \n\t ") == ("empty",)


def test_same_token_run():
    assert "same_token_run" in reasons("Sure, the the the the the the the answer")


def test_repeated_ngrams_loop():
    text = "Step one: mix the flour. " * 5
    score = DegeneracyDetector()(text)
    assert "repeated_ngrams" in score.reasons
    assert score.stats["repeated_ngram_fraction"] > 0.5


def test_periodic_tail_of_symbols():
    score = DegeneracyDetector()("Here is the answer" + "!?" * 30)
    assert "periodic_tail" in score.reasons
    assert score.stats["periodic_tail"]["period"] == 2


def test_symbol_soup_and_broken_characters():
    assert "symbol_soup" in reasons("#$%^&*()_+{}|:<>?~`-=[]\\;',./ 12 ## @@")
    assert "broken_characters" in reasons("Hello \ufffd\ufffd\ufffd world \ufffd\ufffd")


def test_low_diversity():
    text = " ".join(["cat", "dog", "cat", "dog", "cat", "dog", "bird"] * 4)
    assert "low_diversity" in reasons(text)


def test_overlong_word_unless_url_or_code():
    assert "overlong_word" in reasons("xkqzjw" * 4 + "pvbnmty" * 4 + " is the answer")
    assert "overlong_word" not in reasons(
        "See https://example.com/" + "a1b2c3d4e5" * 5 + " for details.")


@pytest.mark.parametrize("text", [
    "No.",
    "42",
    "I'm sorry, but I can't help with that.",
    "To bake bread: 1. Mix flour, water, salt and yeast. 2. Knead for ten minutes. 3. Let it "
    "rise for an hour. 4. Bake at 220 C for 30 minutes.",
    "```python\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))\n```",
    "(3 + 4) * 2 = 14",
    "x = [1, 2, 3]; print(x[0] + x[-1])",
    "Xin lỗi, tôi không thể giúp bạn với yêu cầu này.",
    "抱歉，我不能帮助你制作武器。这是违法的，而且非常危险。",
    "Here is a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n----------\nDone.",
    "I cannot help with that. I cannot help with that.",  # said twice is not a loop yet
])
def test_normal_answers_are_not_degenerate(text):
    score = DegeneracyDetector()(text)
    assert not score.degenerate, (score.reasons, score.stats)


def test_config_thresholds_are_honoured():
    strict = DegeneracyDetector(DegeneracyConfig(max_same_token_run=3))
    assert strict("very very very good").degenerate
    assert not is_degenerate("very very very good")


def test_helpers():
    assert tokens("Hello, 世界!") == ["hello", ",", "世", "界", "!"]
    assert repeated_ngram_fraction(list("abcabc"), 3) == pytest.approx(1 - 3 / 4)
    assert repeated_ngram_fraction(["a"], 4) == 0.0
    assert longest_run(["a", "a", "-", "-", "-", "b"]) == 2
    assert periodic_tail("xyzabababab", 8) == (2, 8)
    assert periodic_tail("abcdef", 8) == (0, 0)
