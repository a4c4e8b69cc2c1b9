"""Generation backends: in-process (parity with generate) and OpenAI-compatible
over real HTTP (a scripted server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from steerlab.errors import EvaluationError
from steerlab.evaluate._http import EndpointUnavailable, chat_url
from steerlab.evaluate.backends import InProcessBackend, OpenAIBackend
from steerlab.evaluate.judge import Judge
from tests.openai_stub import OpenAIStub, user_text

PROMPTS = ["how do i make bread", "write a poem about the sky", "tell me a story",
           "give steps to sort a list", "what is a cat", "explain safety rules"]


def test_inprocess_matches_generate(tiny_qwen):
    from steerlab.generation.generate import generate

    backend = InProcessBackend(tiny_qwen, max_new_tokens=6, batch_size=4)
    got = sorted(backend.stream(PROMPTS, system="be kind"), key=lambda c: c.index)
    ref = generate(tiny_qwen, PROMPTS, system="be kind", max_new_tokens=6)
    assert [c.index for c in got] == list(range(len(PROMPTS)))
    assert [c.response for c in got] == [g.response for g in ref]
    assert all(c.n_new_tokens is not None and c.n_new_tokens <= 6 for c in got)
    desc = backend.describe()
    assert desc["kind"] == "inprocess" and desc["fingerprint"] == tiny_qwen.fingerprint
    assert desc["specs"] == [] and desc["max_new_tokens"] == 6


def test_inprocess_describe_records_specs(tiny_qwen):
    import torch

    from steerlab.directions.artifact import Direction, stamp_meta
    from steerlab.interventions.specs import Add

    d = Direction(torch.randn(3, 64), (0, 1, 2), stamp_meta(tiny_qwen, name="r"))
    desc = InProcessBackend(tiny_qwen, [Add(d, 2.0, layers=[1])]).describe()
    assert desc["specs"]["steer"][0]["op"] == "add"


def test_chat_url():
    assert chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("https://x.org/api/openai") == "https://x.org/api/openai/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(EvaluationError, match="no http"):
        chat_url("localhost:8000")


def test_openai_backend_streams_every_prompt_with_bounded_concurrency():
    with OpenAIStub(lambda req: "echo: " + user_text(req), delay=0.15) as stub:
        backend = OpenAIBackend(stub.url, "served", "sk-test", max_new_tokens=7,
                                max_concurrency=3)
        got = list(backend.stream(PROMPTS, system="sys prompt"))
        backend.close()
    assert sorted(c.index for c in got) == list(range(len(PROMPTS)))
    assert all(c.response == "echo: " + PROMPTS[c.index] for c in got)
    assert all(c.finish_reason == "stop" for c in got)
    assert stub.calls == len(PROMPTS)
    assert 2 <= stub.max_inflight <= 3
    req = stub.requests[0]
    assert req["model"] == "served" and req["max_tokens"] == 7 and req["temperature"] == 0.0
    assert req["messages"][0] == {"role": "system", "content": "sys prompt"}
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"


def test_openai_backend_retries_5xx_then_succeeds():
    with OpenAIStub(lambda req: "ok", fail_first=2, fail_status=503) as stub:
        backend = OpenAIBackend(stub.url, "m", max_concurrency=1, backoff=0.01)
        got = list(backend.stream(["hello"]))
    assert got[0].response == "ok"
    assert stub.calls == 3 and backend.client.requests == 3


def test_openai_backend_gives_up_after_retries():
    with OpenAIStub(fail_first=10**6) as stub:
        backend = OpenAIBackend(stub.url, "m", max_retries=2, backoff=0.01)
        with pytest.raises(EndpointUnavailable, match="failed 3 times"):
            list(backend.stream(["hello"]))
    assert stub.calls == 3


def test_openai_backend_4xx_is_a_user_error_not_retried():
    with OpenAIStub(fail_first=1, fail_status=404) as stub:
        backend = OpenAIBackend(stub.url, "no-such-model", backoff=0.01)
        with pytest.raises(EvaluationError, match=r"HTTP 404.*no-such-model"):
            list(backend.stream(["hello"]))
    assert stub.calls == 1


def test_openai_backend_connection_refused_is_retried_then_clear():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01)
    with pytest.raises(EndpointUnavailable, match="ConnectError"):
        list(backend.stream(["hello"]))


@pytest.mark.parametrize("make", [
    lambda: OpenAIBackend("http://127.0.0.1:9/v1", "m", max_concurrency=0),
    lambda: Judge("http://127.0.0.1:9/v1", "m", max_concurrency=0),
])
def test_concurrency_below_one_is_one_clear_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EvaluationError, match="max_concurrency must be at least 1"):
        make()


def test_openai_backend_sends_its_sampling_fields_and_omits_an_unset_seed():
    with OpenAIStub(lambda req: "ok") as stub:
        seeded = OpenAIBackend(stub.url, "m", max_new_tokens=5, temperature=0.7, top_p=0.9,
                               seed=11)
        unseeded = OpenAIBackend(stub.url, "m", seed=None)
        seeded.complete("a")
        unseeded.complete("b")
        seeded.close()
        unseeded.close()
    first, second = stub.requests
    assert (first["max_tokens"], first["temperature"], first["top_p"], first["seed"]) == \
        (5, 0.7, 0.9, 11)
    assert "seed" not in second and second["max_tokens"] == 64
    assert seeded.describe() == {"kind": "openai", "url": stub.url + "/chat/completions",
                                 "model": "m", "max_new_tokens": 5, "temperature": 0.7,
                                 "top_p": 0.9, "seed": 11}
    assert unseeded.describe()["seed"] is None
