"""The openai backend evaluating a model served by ``steerlab serve`` matches the
in-process result under greedy decoding (real HTTP on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerlab.evaluate.backends import InProcessBackend, OpenAIBackend
from steerlab.evaluate.run import run_eval
from steerlab.serve import create_app
from steerlab.serve.runner import background
from steerlab.store.rowstore import read_rows
from tests.tiny import tiny_model

PROMPTS = ["how do i make a cake ?", "write a poem about the river", "tell me a story",
           "explain how a computer works", "give steps to sort a list"]


def _rows(out: Path) -> list[dict]:
    return read_rows(out / "responses.jsonl")


def _compare(lm, tmp_path: Path, n_tokens: int) -> None:  # type: ignore[no-untyped-def]
    local = tmp_path / "inprocess"
    run_eval(PROMPTS, InProcessBackend(lm, max_new_tokens=n_tokens, batch_size=2), local)
    served = tmp_path / "served"
    with background(create_app(lm, {}, model_id="m")) as url:
        backend = OpenAIBackend(f"{url}/v1", "m", max_new_tokens=n_tokens, max_concurrency=3)
        summary = run_eval(PROMPTS, backend, served)
    a = {r["prompt"]: r["response"] for r in _rows(local)}
    b = {r["prompt"]: r["response"] for r in _rows(served)}
    assert a == b and len(a) == len(PROMPTS)
    assert summary is not None
    local_summary = json.loads((local / "summary.json").read_text())
    served_summary = json.loads((served / "summary.json").read_text())
    assert local_summary["refusal_rate"] == served_summary["refusal_rate"]
    assert local_summary["n"] == served_summary["n"] == len(PROMPTS)


def test_openai_backend_on_served_tiny_model_matches_inprocess(tmp_path: Path) -> None:
    _compare(tiny_model("qwen2"), tmp_path, n_tokens=8)


@pytest.mark.real
def test_openai_backend_on_served_real_model_matches_inprocess(real_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _compare(real_lm, tmp_path, n_tokens=12)


def test_wrong_served_model_name_fails_with_the_name_the_server_serves(tmp_path: Path) -> None:
    from steerlab.errors import EvaluationError

    lm = tiny_model("qwen2")
    with background(create_app(lm, {}, model_id="m")) as url:
        backend = OpenAIBackend(f"{url}/v1", "default", max_new_tokens=4, max_concurrency=2)
        with pytest.raises(EvaluationError) as caught:
            run_eval(PROMPTS, backend, tmp_path / "served")
    message = str(caught.value)
    assert "HTTP 404" in message and "'default'" in message and "serves 'm'" in message
    # a refusal is final: no retries, and the run stops instead of asking for every prompt
    assert backend.client.requests < len(PROMPTS)
