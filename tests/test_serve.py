"""steerlab serve: a real uvicorn server on a free loopback port, talked to with the
``openai`` client and raw HTTP. Unit tier on a tiny model; ``real`` tier on the
embedded Qwen2.5-Coder-0.5B-Instruct."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.generation.generate import generate
from steerlab.interventions.specs import Ablate, Add, KernelAblate, Project, SubspaceAblate
from steerlab.interventions.steering import count_hooks
from steerlab.model.loading import load_model
from steerlab.serve import background, create_app
from steerlab.serve.batcher import Batcher, Job, QueueFull
from steerlab.serve.engine import SamplingParams, TextTracker
from steerlab.serve.validation import field_path
from tests.tiny import save_tiny, tiny_model

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _direction(n_layers: int, d_model: int, name: str, seed: int, norm: float) -> Direction:
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_layers, d_model, generator=gen)
    vectors = vectors / vectors.norm(dim=1, keepdim=True) * norm
    return Direction(vectors, tuple(range(n_layers)), DirectionMeta(name=name, best_layer=1))


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, prompt: str, **kw: Any) -> Any:
    extra = {k: kw.pop(k) for k in ("steer", "ignore_eos") if k in kw}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}],
        temperature=kw.pop("temperature", 0), extra_body=extra or None, **kw)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=HEADERS).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# -- unit tier: a tiny model behind a real server --------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def dirs(tiny: Any) -> dict[str, Direction]:
    return {"persona": _direction(tiny.n_layers, tiny.d_model, "persona", 1, 4.0),
            "other": _direction(tiny.n_layers, tiny.d_model, "other", 2, 4.0)}


DEFAULT_STEER_ALPHA = 3.0


@pytest.fixture(scope="module")
def server(tiny: Any, dirs: dict[str, Direction]) -> Iterator[str]:
    default = [Add(dirs["other"], DEFAULT_STEER_ALPHA, layers=[2])]
    app = create_app(tiny, dirs, default, api_key=KEY, max_batch_size=16, max_wait_ms=30,
                     max_new_tokens_limit=64, max_body_bytes=2**20, model_aliases=["tiny"])
    with background(app) as url:
        yield url


def test_models_health_and_metrics(server: str) -> None:
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-qwen2"]
    health = httpx.get(f"{server}/health", headers=HEADERS)
    assert health.status_code == 200
    assert health.json()["directions"] == ["other", "persona"]
    text = httpx.get(f"{server}/metrics", headers=HEADERS).text
    assert "# TYPE steerlab_requests_total counter" in text
    assert 'steerlab_requests_total{path="/v1/models",status="200"}' in text


def test_chat_equals_offline_generate(server: str, tiny: Any) -> None:
    prompt = "tell me a story about a cat"
    got = _chat(_client(server), prompt, max_tokens=12, steer=[])
    ref = generate(tiny, [prompt], max_new_tokens=12)[0]
    assert got.choices[0].message.content == ref.response
    assert got.choices[0].finish_reason == ref.finish_reason
    assert got.usage.prompt_tokens == ref.n_prompt_tokens
    assert got.usage.completion_tokens == ref.n_new_tokens
    assert got.system_fingerprint == tiny.fingerprint


def test_seeded_sampling_equals_offline_and_repeats(server: str, tiny: Any) -> None:
    prompt = "write a poem about the sky"
    client = _client(server)
    kw: dict[str, Any] = dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=11, steer=[],
                              ignore_eos=True)
    first = _chat(client, prompt, **kw).choices[0].message.content
    assert _chat(client, prompt, **kw).choices[0].message.content == first
    ref = generate(tiny, [prompt], max_new_tokens=12, do_sample=True, temperature=0.9,
                   top_p=0.8, seed=11)[0]
    if ref.finish_reason == "length":  # offline stops at EOS, the request ignored it
        assert first == ref.response
    other = _chat(client, prompt, **{**kw, "seed": 12}).choices[0].message.content
    assert other != first


def test_streaming_equals_non_streaming(server: str) -> None:
    client = _client(server)
    prompt = "how do i make bread"
    full = _chat(client, prompt, max_tokens=16, steer=[], ignore_eos=True)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=16,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"steer": [], "ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finishes == ["length"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_stop_sequences_cut_output_streaming_or_not(server: str) -> None:
    client = _client(server)
    prompt = "give me steps to build a house"
    full = _chat(client, prompt, max_tokens=24, steer=[],
                 ignore_eos=True).choices[0].message.content
    assert len(full) > 12
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    got = _chat(client, prompt, max_tokens=24, steer=[], ignore_eos=True, stop=[stop, "zzzz"])
    assert got.choices[0].message.content == expected
    assert got.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=24,
        temperature=0, stream=True, stop=stop, extra_body={"steer": [], "ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_completions_endpoint(server: str, tiny: Any) -> None:
    client = _client(server)
    got = client.completions.create(model="tiny", prompt=["hello world", "a red car"],
                                    max_tokens=8, temperature=0, extra_body={"steer": []})
    assert [c.index for c in got.choices] == [0, 1]
    ids = tiny.tokenizer("hello world")["input_ids"] + tiny.tokenizer("a red car")["input_ids"]
    assert got.usage.prompt_tokens == len(ids)
    one = client.completions.create(model="tiny", prompt="hello world", max_tokens=8,
                                    temperature=0, extra_body={"steer": []})
    assert one.choices[0].text == got.choices[0].text
    stream = client.completions.create(model="tiny", prompt="hello world", max_tokens=8,
                                       temperature=0, stream=True, extra_body={"steer": []})
    assert "".join(c.choices[0].text for c in stream if c.choices) == one.choices[0].text


def test_per_request_and_default_steering_equal_offline(server: str, tiny: Any,
                                                        dirs: dict[str, Direction]) -> None:
    client = _client(server)
    prompt = "what is the safest city"
    steer = [{"op": "add", "direction": "persona", "layers": [1], "alpha": 4.0}]
    steered = _chat(client, prompt, max_tokens=12, steer=steer).choices[0].message.content
    offline = generate(tiny, [prompt], max_new_tokens=12,
                       steer=[Add(dirs["persona"], 4.0, layers=[1])])[0].response
    plain = generate(tiny, [prompt], max_new_tokens=12)[0].response
    assert steered == offline
    assert steered != plain  # the steering did something
    default = _chat(client, prompt, max_tokens=12).choices[0].message.content
    assert default == generate(tiny, [prompt], max_new_tokens=12, steer=[
        Add(dirs["other"], DEFAULT_STEER_ALPHA, layers=[2])])[0].response
    ablate = [{"op": "ablate", "direction": "persona", "source_layer": 1}]
    got = _chat(client, prompt, max_tokens=12, steer=ablate).choices[0].message.content
    assert got == generate(tiny, [prompt], max_new_tokens=12,
                           steer=[Ablate(dirs["persona"], source_layer=1)])[0].response
    subspace = [{"op": "subspace", "directions": ["persona", "other"], "source_layers": [1]}]
    got = _chat(client, prompt, max_tokens=12, steer=subspace).choices[0].message.content
    assert got == generate(tiny, [prompt], max_new_tokens=12, steer=[SubspaceAblate(
        (dirs["persona"], dirs["other"]), source_layers=[1])])[0].response
    kernel = [{"op": "kernel_ablate", "direction": "persona", "source": 0.5,
               "attn": [1.5, 1.0, 1.0, 0.2], "mlp": [1.2, 2.0, 1.0]}]
    got = _chat(client, prompt, max_tokens=12, steer=kernel).choices[0].message.content
    assert got == generate(tiny, [prompt], max_new_tokens=12, steer=[KernelAblate(
        dirs["persona"], 0.5, [1.5, 1.0, 1.0, 0.2], [1.2, 2.0, 1.0])])[0].response
    assert count_hooks(tiny.model) == 0


def test_concurrent_requests_with_different_steering(server: str, tiny: Any,
                                                     dirs: dict[str, Direction]) -> None:
    prompts = ["hello world", "tell me about a dog", "write python code"]
    steers: list[list[dict[str, Any]]] = [
        [], [{"op": "add", "direction": "persona", "layers": "1-2", "alpha": 5.0}],
        [{"op": "project", "direction": "other", "layers": [0, 2]}]]
    batches_before = _metric(server, "steerlab_batches_total")

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        calls = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10,
            temperature=0, extra_body={"steer": s}) for s in steers for p in prompts]
        return [r.choices[0].message.content or "" for r in await asyncio.gather(*calls)]

    got = asyncio.run(main())
    offline_specs = [[], [Add(dirs["persona"], 5.0, layers="1-2")],
                     [Project(dirs["other"], layers=[0, 2])]]
    expected = [g.response for specs in offline_specs
                for g in generate(tiny, prompts, max_new_tokens=10, steer=specs)]
    assert got == expected
    assert _metric(server, "steerlab_batches_total") - batches_before >= 3  # one per steering


def test_load_64_concurrent_requests_each_answered_once(server: str, tiny: Any) -> None:
    words = ["cat", "dog", "house", "car", "city", "river", "mountain", "sky"]
    prompts = [f"tell me about the {a} and the {b}" for a in words for b in words]
    assert len(prompts) == 64
    rows_before = _metric(server, "steerlab_batch_rows_total")
    tokens_before = _metric(server, "steerlab_completion_tokens_total")
    batches_before = _metric(server, "steerlab_batches_total")

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0,
                                    timeout=300)
        calls = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=16,
            temperature=0, extra_body={"steer": [], "ignore_eos": True}) for p in prompts]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    assert len(results) == 64
    assert len({r.id for r in results}) == 64
    assert all(r.usage.completion_tokens == 16 for r in results)
    assert _metric(server, "steerlab_batch_rows_total") - rows_before == 64
    assert _metric(server, "steerlab_completion_tokens_total") - tokens_before == 64 * 16
    batches = _metric(server, "steerlab_batches_total") - batches_before
    assert 4 <= batches < 64  # batched, and never more than 16 rows at once
    # Each answer belongs to its own prompt: spot-check against offline generation.
    for i in (0, 21, 63):
        ref = generate(tiny, [prompts[i]], max_new_tokens=16)[0]
        if ref.finish_reason == "length":
            assert results[i].choices[0].message.content == ref.response


def test_auth_required(server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(server, key="wrong"), "hello", max_tokens=2)
    for path in ("/health", "/metrics", "/v1/models"):
        reply = httpx.get(f"{server}{path}")
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/health", headers={"Authorization": "Bearer nope"}).status_code \
        == 401


def _good(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, **kw}


BAD_CHAT: list[tuple[str, Any, int, str]] = [
    ("malformed json", '{"messages": [', 400, "body"),
    ("not an object", "[1, 2]", 400, "body"),
    ("bytes that are not utf-8", b"\xff\xfe{", 400, "body"),
    ("no messages", {"model": "tiny"}, 422, "messages"),
    ("empty messages", _good(messages=[]), 422, "messages"),
    ("bad role", _good(messages=[{"role": "wizard", "content": "hi"}]), 422, "messages[0].role"),
    ("unknown steer field", _good(steer=[{"op": "add", "direction": "persona", "alpha": 1,
                                          "layers": [1], "bogus": 1}]), 422, "steer[0].bogus"),
    ("unknown op", _good(steer=[{"op": "explode", "direction": "persona"}]), 422, "steer[0]"),
    ("unknown direction", _good(steer=[{"op": "add", "direction": "nope", "alpha": 1}]), 422,
     "steer[0].direction"),
    ("a path as direction", _good(steer=[{"op": "add", "direction": "/etc/passwd", "alpha": 1}]),
     422, "steer[0].direction"),
    ("layer out of range", _good(steer=[{"op": "add", "direction": "persona", "alpha": 1,
                                         "layers": [3]}]), 422, "steer[0].layers"),
    ("negative layer", _good(steer=[{"op": "add", "direction": "persona", "alpha": 1,
                                     "layers": [-1]}]), 422, "steer[0].layers"),
    ("huge layer range", _good(steer=[{"op": "add", "direction": "persona", "alpha": 1,
                                       "layers": "0-99999999999"}]), 422, "steer[0].layers"),
    ("garbage layers", _good(steer=[{"op": "add", "direction": "persona", "alpha": 1,
                                     "layers": "x-y"}]), 422, "steer[0].layers"),
    ("NaN alpha", '{"messages": [{"role": "user", "content": "hi"}], "steer": [{"op": "add", '
     '"direction": "persona", "alpha": NaN}]}', 422, "steer[0].alpha"),
    ("string alpha", _good(steer=[{"op": "add", "direction": "persona", "alpha": "big"}]), 422,
     "steer[0].alpha"),
    ("source layer out of range", _good(steer=[{"op": "ablate", "direction": "persona",
                                                "source_layer": 7}]), 422,
     "steer[0].source_layer"),
    ("kernel source past the last layer", _good(steer=[{
        "op": "kernel_ablate", "direction": "persona", "source": 9.5, "attn": [1, 1, 1, 0],
        "mlp": [1, 1, 1, 0]}]), 422, "steer[0].source"),
    ("kernel with two numbers", _good(steer=[{
        "op": "kernel_ablate", "direction": "persona", "source": 1, "attn": [1, 1],
        "mlp": [1, 1, 1, 0]}]), 422, "steer[0].attn"),
    ("too many steer items", _good(steer=[{"op": "ablate", "direction": "persona"}] * 17), 422,
     "steer"),
    ("oversize max_tokens", _good(max_tokens=10**6), 422, "max_tokens"),
    ("zero max_tokens", _good(max_tokens=0), 422, "max_tokens"),
    ("temperature too high", _good(temperature=5), 422, "temperature"),
    ("top_p zero", _good(top_p=0), 422, "top_p"),
    ("n > 1", _good(n=2), 422, "n"),
    ("five stops", _good(stop=["a", "b", "c", "d", "e"]), 422, "stop"),
    ("logprobs", _good(logprobs=True), 422, "logprobs"),
    ("prompt longer than context", _good(messages=[{"role": "user", "content": "hello " * 400}]),
     400, "messages"),
    ("prompt + max_tokens over context", _good(
        messages=[{"role": "user", "content": "hello " * 100}], max_tokens=60), 400, "max_tokens"),
]


def test_bad_inputs_get_4xx_naming_the_field_and_server_stays_healthy(server: str) -> None:
    for name, body, status, field in BAD_CHAT:
        content = body if isinstance(body, str | bytes) else json.dumps(body)
        reply = httpx.post(f"{server}/v1/chat/completions", content=content,
                           headers={**HEADERS, "Content-Type": "application/json"}, timeout=60)
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert field in error["message"], (name, error)
        if field != "body":
            assert error["param"].startswith(field.split("[")[0]), (name, error)
    more = [
        ("/v1/completions", {"model": "tiny"}, 422, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, 422, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 422, "prompt"),
        ("/v1/completions", {"prompt": "x" * (2**20 + 10)}, 413, "larger"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ]
    for path, body, status, text in more:
        reply = httpx.post(f"{server}{path}", json=body, headers=HEADERS, timeout=60)
        assert reply.status_code == status, (path, body, reply.text[:200])
        assert text in reply.json()["error"]["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="steer"):
        _chat(_client(server), "hello", max_tokens=2, steer=[{"op": "add", "direction": "x"}])
    assert httpx.get(f"{server}/health", headers=HEADERS).status_code == 200
    ok = _chat(_client(server), "hello", max_tokens=4, steer=[])
    assert ok.choices[0].finish_reason in ("stop", "length")


@contextmanager
def _gated(lm: Any, delay: float = 0.0) -> Iterator[threading.Event]:
    """Hold every forward pass of ``lm`` until the yielded event is set, then slow each by
    ``delay`` seconds: makes "the worker is busy" a fact instead of a race in the tests below."""
    gate = threading.Event()

    def hold(module: Any, args: Any) -> None:
        gate.wait(120)
        time.sleep(delay)

    handle = lm.model.register_forward_pre_hook(hold)
    try:
        yield gate
    finally:
        gate.set()
        handle.remove()


def _wait_for(url: str, name: str, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _metric(url, name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_disconnected_clients_are_dropped(tiny: Any) -> None:
    app = create_app(tiny, {}, max_batch_size=1, max_wait_ms=0, max_new_tokens_limit=200)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 150,
            "temperature": 0, "ignore_eos": True}
    with background(app) as url, _gated(tiny, delay=0.01) as gate:
        long = threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",),
                                kwargs={"json": body, "timeout": 300})
        long.start()
        _wait_for(url, "steerlab_active_rows", 1)  # the worker is inside the long request
        # Queued behind it, then abandoned: dropped before it ever runs.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        _wait_for(url, "steerlab_dropped_total", 1)
        assert _metric(url, "steerlab_queue_depth") == 0
        gate.set()
        long.join(300)
        assert _metric(url, "steerlab_batch_rows_total") == 1
        # A stream abandoned after its first chunks stops its batch early.
        steps_before = _metric(url, "steerlab_forward_passes_total")
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as stream:
            got = []
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    got.append(line)
                if len(got) >= 3:
                    break
        assert len(got) == 3
        _wait_for(url, "steerlab_batches_total", 2)
        assert _metric(url, "steerlab_forward_passes_total") - steps_before < 150
        assert _metric(url, "steerlab_dropped_total") == 2
    assert count_hooks(tiny.model) == 0


def test_full_queue_answers_503_with_retry_after(tiny: Any) -> None:
    app = create_app(tiny, {}, max_batch_size=1, max_wait_ms=0, max_queue=1,
                     max_new_tokens_limit=200)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    with background(app) as url, _gated(tiny) as gate:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                def post() -> Any:
                    return asyncio.ensure_future(
                        client.post(f"{url}/v1/chat/completions", json=body))

                first = post()
                while _metric(url, "steerlab_active_rows") < 1:  # the worker holds it
                    await asyncio.sleep(0.02)
                rest = [post() for _ in range(5)]  # one may wait, four are refused
                while _metric(url, "steerlab_rejected_total") < 4:
                    await asyncio.sleep(0.02)
                gate.set()
                return [await first, *[await r for r in rest]]

        replies = asyncio.run(main())
        assert sorted(r.status_code for r in replies) == [200, 200, 503, 503, 503, 503]
        for reply in replies:
            if reply.status_code == 503:
                assert reply.headers["retry-after"] == "1"
                assert reply.json()["error"]["code"] == "queue_full"
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert ok.status_code == 200


def test_access_log_is_one_json_line_per_request(tiny: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="steerlab.serve.access")
    with background(create_app(tiny, {"p": _direction(3, 64, "p", 3, 2.0)},
                               model_aliases=["tiny"])) as url:
        steer = [{"op": "add", "direction": "p", "alpha": 1.0, "layers": [0]}]
        httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3,
            "temperature": 0,
            "steer": steer, "ignore_eos": True}, timeout=60)
        httpx.post(f"{url}/v1/chat/completions", content="{", timeout=60)
    entries = [json.loads(r.getMessage()) for r in caplog.records
               if r.name == "steerlab.serve.access"]
    assert [e["status"] for e in entries] == [200, 400]
    good = entries[0]
    assert good["tokens_out"] == 3 and good["tokens_in"] > 0
    assert re.fullmatch(r"[0-9a-f]{12}", good["steer_hash"])
    assert good["latency_ms"] > 0 and good["id"] and good["finish_reason"] == "length"
    assert "hello" not in json.dumps(entries)  # no prompt text in the log


# -- pieces ----------------------------------------------------------------------------------------
def test_text_tracker_holds_back_partial_stop_sequences(tiny: Any) -> None:
    tok = tiny.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("hello", " ", "cat", " ", "world")]
    tracker = TextTracker(tok, ["lo c", "t w"])
    out = [tracker.push(i) for i in ids[:2]]
    assert out == [("hel", False), ("", False)]  # "lo" and "lo " may start "lo c"
    delta, stopped = tracker.push(ids[2])
    assert (delta, stopped) == ("", True) and tracker.text == "hel"
    tracker = TextTracker(tok, ["dog"])
    assert [tracker.push(i)[0] for i in ids] == ["hello", " ", "cat", " ", "worl"]
    assert tracker.flush() == "d"  # held back while it could have started "dog"


def test_field_paths() -> None:
    assert field_path(("body", "steer", 0, "add", "alpha")) == "steer[0].alpha"
    assert field_path(("body", "stop", "list[str]", 5)) == "stop[5]"
    assert field_path(("body",)) == "body"


def _job(loop: asyncio.AbstractEventLoop, key: str) -> Job:
    return Job(id=key, prompt_ids=[1], params=SamplingParams(1), steer_key=key, specs=(),
               loop=loop)


def test_batcher_groups_by_steering_bounds_queue_and_survives_errors() -> None:
    loop = asyncio.new_event_loop()
    groups: list[list[str]] = []
    release = threading.Event()

    def run_group(jobs: list[Job], held: list[Any]) -> int:
        groups.append([j.steer_key for j in jobs])
        if jobs[0].steer_key == "boom":
            raise RuntimeError("bug")
        release.wait(10)
        return 1

    batcher = Batcher(run_group, max_batch_size=2, max_wait_s=0.3, max_queue=3)
    batcher.start()
    try:
        jobs = [_job(loop, k) for k in ("a", "b", "a", "b")]
        for job in jobs[:3]:
            batcher.submit(job)
        jobs[3].cancel()
        with pytest.raises(QueueFull):  # 3 waiting: the 4th is refused (the cancelled one
            batcher.submit(_job(loop, "c"))  # above was never queued)
        release.set()
        deadline = time.monotonic() + 10
        while len(groups) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert groups == [["a", "a"], ["b"]]
        boom = _job(loop, "boom")
        batcher.submit(boom)
        deadline = time.monotonic() + 10
        while not boom.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.run_until_complete(asyncio.sleep(0))
        event = boom.events.get_nowait()
        assert (event.kind, event.status) == ("error", 500)
        assert batcher.alive
    finally:
        batcher.stop()
        loop.close()


def test_cli_serve_with_directions_and_default_steer(tmp_path: Path, tiny: Any,
                                                     dirs: dict[str, Direction]) -> None:
    model_dir = tmp_path / "model"
    save_tiny(tiny, model_dir)
    dirs["persona"].save(tmp_path / "persona")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "STEERLAB_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "steerlab", "serve", str(model_dir), "--dtype", "float32",
         "--direction", f"persona={tmp_path / 'persona'}", "--steer", "add:persona@1:4.0",
         "--port", str(port), "--max-tokens-limit", "32", "--model-alias", "tiny"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", headers=HEADERS).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.25)
        got = _chat(_client(url), "what is the safest city", max_tokens=12)
        # Compare with the model as loaded from the same files (a saved tokenizer may
        # tokenize differently from the in-memory one it was saved from).
        loaded = load_model(str(model_dir), dtype="float32")
        ref = generate(loaded, ["what is the safest city"], max_new_tokens=12,
                       steer=[Add(dirs["persona"], 4.0, layers=[1])])[0]
        assert got.choices[0].message.content == ref.response
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["path"] == "/v1/chat/completions" and e["status"] == 200 for e in access)
    assert all(e["steer_hash"] is None or e["steer_hash"].startswith("default-")
               for e in access if e["path"] == "/v1/chat/completions")


# -- real tier: the embedded model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(real_lm: Any) -> Iterator[tuple[str, Direction]]:
    persona = _direction(real_lm.n_layers, real_lm.d_model, "persona", 0, 12.0)
    app = create_app(real_lm, {"persona": persona}, api_key=KEY, max_new_tokens_limit=64,
                     model_aliases=["tiny", "x"])
    with background(app) as url:
        yield url, persona


@pytest.mark.real
def test_real_chat_stream_and_steering_equal_offline(real_server: tuple[str, Direction],
                                                     real_lm: Any) -> None:
    url, persona = real_server
    client = _client(url)
    prompt = "Name a primary color."
    got = _chat(client, prompt, max_tokens=12)
    plain = generate(real_lm, [prompt], max_new_tokens=12)[0]
    assert got.choices[0].message.content == plain.response
    assert got.usage.prompt_tokens == plain.n_prompt_tokens
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0,
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) \
        == plain.response
    steer = [{"op": "add", "direction": "persona", "layers": [8], "alpha": 4.0}]
    steered = _chat(client, prompt, max_tokens=12, steer=steer).choices[0].message.content
    offline = generate(real_lm, [prompt], max_new_tokens=12,
                       steer=[Add(persona, 4.0, layers=[8])])[0].response
    assert steered == offline
    assert steered != plain.response
    assert count_hooks(real_lm.model) == 0


@pytest.mark.real
def test_real_auth_and_bad_inputs(real_server: tuple[str, Direction]) -> None:
    url, _ = real_server
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(url, key="nope"), "hi", max_tokens=2)
    bad = [
        ('{"messages": [', 400, "body"),
        (_good(steer=[{"op": "add", "direction": "persona", "alpha": 1, "oops": 2}]), 422,
         "steer[0].oops"),
        (_good(steer=[{"op": "add", "direction": "refusal", "alpha": 1}]), 422,
         "steer[0].direction"),
        (_good(steer=[{"op": "add", "direction": "persona", "alpha": 1, "layers": [24]}]), 422,
         "steer[0].layers"),
        (_good(max_tokens=100_000), 422, "max_tokens"),
        (_good(messages=[{"role": "user", "content": "hello " * 33_000}]), 400, "messages"),
    ]
    for body, status, field in bad:
        content = body if isinstance(body, str) else json.dumps(body)
        reply = httpx.post(f"{url}/v1/chat/completions", content=content,
                           headers={**HEADERS, "Content-Type": "application/json"}, timeout=120)
        assert reply.status_code == status, (field, reply.text[:300])
        assert field in reply.json()["error"]["message"]
    assert httpx.get(f"{url}/health", headers=HEADERS).status_code == 200
    ok = _chat(_client(url), "Say hi.", max_tokens=4)
    assert ok.choices[0].message.content


def test_cli_direction_arguments() -> None:
    from steerlab.cli.serve import parse_direction_args
    from steerlab.errors import SteerlabError

    assert parse_direction_args(["persona=dirs/p", "r = dirs/r"]) == {"persona": "dirs/p",
                                                                      "r": "dirs/r"}
    for bad in (["persona"], ["=dirs/p"], ["p=a", "p=b"]):
        with pytest.raises(SteerlabError, match="--direction"):
            parse_direction_args(bad)


def test_a_bad_default_steering_fails_at_startup(tiny: Any, dirs: dict[str, Direction]) -> None:
    from steerlab.errors import InterventionError

    with pytest.raises(InterventionError, match="do not exist"):
        create_app(tiny, dirs, [Add(dirs["other"], 1.0, layers=[tiny.n_layers + 2])])
