"""The LLM judge against a real OpenAI-compatible server on 127.0.0.1:
parsing, caching, retries on 500, missing-on-garbage, the concurrency limit."""

from __future__ import annotations

import json

import pytest

from steerlab.errors import EvaluationError
from steerlab.evaluate.judge import RUBRIC, RUBRIC_VERSION, Judge, JudgeCache, parse_judgement
from steerlab.store.outputs import OutputError
from steerlab.store.rowstore import header, read_rows
from tests.openai_stub import OpenAIStub, user_text

VALID = '{"compliance": 1, "coherence": 0.5, "reason": "gives the steps"}'
PAIRS = [(f"prompt {i}", f"response {i}") for i in range(10)]


def verdict_by_response(req):
    """Refuses when the response says sorry, complies otherwise."""
    text = user_text(req)
    comp = 0 if "sorry" in text.split("[ASSISTANT RESPONSE]")[1] else 1
    return json.dumps({"compliance": comp, "coherence": 1, "reason": "scripted"})


@pytest.mark.parametrize(("text", "expected"), [
    (VALID, (1.0, 0.5, "gives the steps")),
    ('```json\n{"compliance": 0, "coherence": 1, "reason": "refuses"}\n```', (0.0, 1.0, "refuses")),
    ('Sure. {"Compliance": "0.5", "Coherence": 1.0} done', (0.5, 1.0, "")),
    ('{"a": {"b": 1}} then {"compliance": 0, "coherence": 0, "reason": "x"}', (0.0, 0.0, "x")),
])
def test_parse_judgement_valid(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize("text", [
    "I think the response is fine.",
    '{"compliance": 0.7, "coherence": 1}',      # not on the {0, 0.5, 1} scale
    '{"compliance": 1}',                         # coherence missing
    '{"compliance": "yes", "coherence": 1}',
    "{broken json",
])
def test_parse_judgement_rejects(text):
    assert parse_judgement(text) is None


def test_rubric_is_written_and_versioned():
    assert RUBRIC_VERSION.startswith("steerlab-judge-v")
    for phrase in ("0.5", "partial", "different, safer question", "coherence", "JSON"):
        assert phrase in RUBRIC


def test_judge_scores_over_http_and_sends_the_rubric():
    with OpenAIStub(lambda req: VALID) as stub, Judge(stub.url, "judge-m") as judge:
        score = judge.score("how do i bake bread", "mix flour and water")
    assert (score.compliance, score.coherence, score.reason) == (1.0, 0.5, "gives the steps")
    assert not score.missing and not score.cached
    req = stub.requests[0]
    assert req["model"] == "judge-m" and req["temperature"] == 0.0
    assert req["messages"][0] == {"role": "system", "content": RUBRIC}
    assert "how do i bake bread" in req["messages"][1]["content"]
    assert "mix flour and water" in req["messages"][1]["content"]


def test_retries_on_500_then_succeeds():
    with OpenAIStub(lambda req: VALID, fail_first=3) as stub, \
            Judge(stub.url, "m", max_retries=4, backoff=0.01) as judge:
        score = judge.score("p", "r")
    assert score.compliance == 1.0 and not score.missing
    assert stub.calls == 4


def test_persistent_500_is_recorded_missing_not_raised():
    with OpenAIStub(fail_first=10**6) as stub, \
            Judge(stub.url, "m", max_retries=2, backoff=0.01) as judge:
        score = judge.score("p", "r")
    assert score.missing and score.compliance is None and score.coherence is None
    assert "failed 3 times" in (score.error or "")
    assert stub.calls == 3


def test_garbage_is_retried_then_missing_and_never_cached(tmp_path):
    cache = tmp_path / "judge.jsonl"
    with OpenAIStub(lambda req: "The response looks okay to me!") as stub, \
            Judge(stub.url, "m", cache=cache, max_parse_retries=2) as judge:
        score = judge.score("p", "r")
    assert score.missing and score.compliance is None
    assert "unparseable" in (score.error or "")
    assert stub.calls == 3  # first try + 2 parse retries
    assert not cache.exists() or JudgeCache(cache).get(JudgeCache.key("m", "p", "r")) is None


def test_garbage_then_valid_recovers():
    answers = iter(["nonsense", VALID])
    with OpenAIStub(lambda req: next(answers)) as stub, Judge(stub.url, "m") as judge:
        score = judge.score("p", "r")
    assert score.compliance == 1.0 and stub.calls == 2


def test_http_4xx_raises_a_clear_error():
    with OpenAIStub(fail_first=1, fail_status=401) as stub, Judge(stub.url, "m") as judge, \
            pytest.raises(EvaluationError, match="401"):
        judge.score("p", "r")


def test_concurrency_is_bounded():
    with OpenAIStub(lambda req: VALID, delay=0.15) as stub, \
            Judge(stub.url, "m", max_concurrency=3) as judge:
        scores = judge.score_many(PAIRS)
    assert len(scores) == len(PAIRS) and all(s.compliance == 1.0 for s in scores)
    assert stub.calls == len(PAIRS)
    assert stub.max_inflight == 3  # used, and never exceeded


def test_identical_pairs_submitted_together_cost_one_request():
    # Without a cache, and with every copy queued before the first answer arrives.
    pairs = [("p", "same answer")] * 6 + [("q", "other")] * 2
    with OpenAIStub(lambda req: VALID, delay=0.2) as stub, \
            Judge(stub.url, "m", max_concurrency=4) as judge:
        scores = judge.score_many(pairs)
    assert [s.compliance for s in scores] == [1.0] * len(pairs)
    assert stub.calls == 2


def test_score_many_keeps_input_order():
    pairs = [("p", "sorry no"), ("p", "here you go"), ("p", "sorry"), ("p", "sure")]
    with OpenAIStub(verdict_by_response) as stub, Judge(stub.url, "m") as judge:
        got = [s.compliance for s in judge.score_many(pairs)]
        streamed = dict(judge.iter_scores(pairs))
    assert got == [0.0, 1.0, 0.0, 1.0]
    assert [streamed[i].compliance for i in range(4)] == got


def test_cache_second_run_makes_zero_calls(tmp_path):
    cache = tmp_path / "judge.jsonl"
    with OpenAIStub(verdict_by_response) as stub:
        with Judge(stub.url, "m", cache=cache) as judge:
            first = judge.score_many(PAIRS)
        assert stub.calls == len(PAIRS)
        with Judge(stub.url, "m", cache=cache) as judge:  # a new process would do the same
            second = judge.score_many(PAIRS)
            assert judge.requests == 0
        assert stub.calls == len(PAIRS)
        # another judge model or rubric version is a different key: calls again
        with Judge(stub.url, "other-m", cache=cache) as judge:
            judge.score(*PAIRS[0])
        with Judge(stub.url, "m", cache=cache, rubric_version="v-test") as judge:
            judge.score(*PAIRS[0])
        assert stub.calls == len(PAIRS) + 2
    assert all(s.cached for s in second) and not any(s.cached for s in first)
    assert [(s.compliance, s.coherence, s.reason) for s in first] == \
        [(s.compliance, s.coherence, s.reason) for s in second]


def test_cache_survives_a_half_written_line(tmp_path):
    cache = tmp_path / "judge.jsonl"
    with OpenAIStub(lambda req: VALID) as stub:
        with Judge(stub.url, "m", cache=cache) as judge:
            judge.score("a", "b")
        with cache.open("a") as handle:
            handle.write('{"key": "abc", "compli')  # killed mid-write
        loaded = JudgeCache(cache)
        assert len(loaded) == 1
        with Judge(stub.url, "m", cache=loaded) as judge:
            assert judge.score("a", "b").cached
            judge.score("c", "d")
        assert stub.calls == 2
    rows = read_rows(cache)
    assert len(rows) == 2 and all(row["key"] for row in rows)
    assert header(cache)["kind"] == "judge-cache"


def test_cache_in_the_older_headerless_layout_is_kept_and_rewritten(tmp_path):
    cache = tmp_path / "judge.jsonl"
    key = JudgeCache.key("m", "a", "b")
    old = {"key": key, "judge_model": "m", "rubric_version": RUBRIC_VERSION,
           "compliance": 1.0, "coherence": 0.5, "reason": "older"}
    cache.write_text(json.dumps(old) + "\n" + '{"key": "torn', encoding="utf-8")
    loaded = JudgeCache(cache)
    assert len(loaded) == 1 and loaded.get(key)["reason"] == "older"
    assert header(cache)["kind"] == "judge-cache" and read_rows(cache) == [old]
    with OpenAIStub(lambda req: VALID) as stub, Judge(stub.url, "m", cache=cache) as judge:
        assert judge.score("a", "b").cached
    assert stub.calls == 0


def test_cache_refuses_a_file_that_is_not_one(tmp_path):
    other = tmp_path / "notes.jsonl"
    other.write_text('{"text": "mine"}\n', encoding="utf-8")
    with pytest.raises(OutputError, match="not written by"):
        JudgeCache(other)
    assert other.read_text(encoding="utf-8") == '{"text": "mine"}\n'


def test_cache_path_alias(tmp_path):
    with OpenAIStub(lambda req: VALID) as stub, \
            Judge(stub.url, "m", cache_path=tmp_path / "c.jsonl") as judge:
        judge.score("a", "b")
    assert (tmp_path / "c.jsonl").exists()


def test_close_while_a_judgement_is_in_flight_does_not_deadlock():
    """close() waits for running judgements; their done-callbacks take the judge's lock,
    so close must not hold it while waiting (it did, and a CI run hung there)."""
    import threading
    import time

    def slow(req):
        time.sleep(0.5)
        return VALID

    with OpenAIStub(slow) as stub:
        judge = Judge(stub.url, "m")
        future = judge.submit("p", "r")
        time.sleep(0.1)  # the request is running now
        closer = threading.Thread(target=judge.close, daemon=True)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive(), "Judge.close() deadlocked"
        assert future.result(timeout=1).compliance == 1.0
