"""Server limits on a real uvicorn server on a loopback port: the body cap counts bytes
received (chunked uploads too), text is checked before tokenization, seeds and strengths
are bounded, and an unknown ``model`` is a 404 as in the OpenAI API."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.serve import background, create_app
from tests.tiny import tiny_model

LIMIT = 8 << 20  # the server's default body cap


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def server(tiny: Any) -> Iterator[str]:
    gen = torch.Generator().manual_seed(0)
    persona = Direction(torch.randn(tiny.n_layers, tiny.d_model, generator=gen),
                        tuple(range(tiny.n_layers)), DirectionMeta(name="persona", best_layer=1))
    app = create_app(tiny, {"persona": persona}, max_new_tokens_limit=16,
                     model_aliases=["my-alias"])
    with background(app) as url:
        yield url


def chat(**kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **kw}


def post(url: str, body: Any, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json"})


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health").status_code == 200


# -- body cap ------------------------------------------------------------------------------------
def _chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    head = b'{"messages": [{"role": "user", "content": "'
    yield head
    sent = len(head)
    while sent < total:
        step = min(size, total - sent)
        yield b"a" * step
        sent += step
    yield b'"}]}'


def test_chunked_body_over_the_cap_is_413(server: str) -> None:
    reply = httpx.post(f"{server}/v1/chat/completions", content=_chunks(12 << 20), timeout=60,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 413, reply.text[:200]
    assert "larger than" in reply.json()["error"]["message"]
    assert healthy(server)


def test_chunked_body_under_the_cap_is_served(server: str) -> None:
    body = json.dumps(chat(messages=[{"role": "user", "content": "hi " * 20}])).encode()
    reply = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                       content=iter([body[:10], body[10:]]),
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_raw_chunked_upload_over_the_cap_is_413(server: str) -> None:
    """The same over a raw socket, chunk by chunk, with no Content-Length at all."""
    host, port = server.removeprefix("http://").split(":")
    payload = b"x" * (LIMIT + (1 << 20))
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(payload), 1 << 16):
            part = payload[start:start + (1 << 16)]
            try:
                sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            except OSError:
                break
        with contextlib.suppress(OSError):
            sock.sendall(b"0\r\n\r\n")
        head = sock.recv(200)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert healthy(server)


# -- text ------------------------------------------------------------------------------------------
SURROGATES = [
    ("chat content", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "/v1/chat/completions", "messages[0].content"),
    ("chat text part", '{"messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\udfff"}]}], "max_tokens": 2}', "/v1/chat/completions", "messages[0].content"),
    ("completion prompt", '{"prompt": "\\ud800", "max_tokens": 2}', "/v1/completions", "prompt"),
    ("completion prompt list", '{"prompt": ["ok", "\\ud800"], "max_tokens": 2}',
     "/v1/completions", "prompt"),
    ("stop", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
     "/v1/chat/completions", "stop"),
    ("direction name", '{"messages": [{"role": "user", "content": "hi"}], "steer": [{"op": '
     '"ablate", "direction": "\\ud800"}]}', "/v1/chat/completions", "steer[0].direction"),
    ("model name", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
     "/v1/chat/completions", "model"),
]


UNIONS = {"chat text part", "completion prompt list", "stop"}


@pytest.mark.parametrize("case", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_lone_surrogate_is_422(server: str, case: tuple[str, str, str, str]) -> None:
    _, body, path, field = case
    reply = post(server, body, path)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["message"].startswith(field), error
    if case[0] not in UNIONS:  # for a union-typed field pydantic names every branch's error
        assert "surrogate" in error["message"], error
    assert healthy(server)


def test_paired_surrogates_are_ordinary_text(server: str) -> None:
    reply = post(server, '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], '
                 '"max_tokens": 2}')
    assert reply.status_code == 200, reply.text


# -- numeric limits ------------------------------------------------------------------------------
NUMBERS = [
    ("huge random_like seed", chat(steer=[{"op": "add", "direction": f"random_like(persona, "
                                          f"{'9' * 60})", "alpha": 1.0, "layers": [1]}]),
     "steer[0].direction", "2^32"),
    ("5000-digit random_like seed", chat(steer=[{"op": "add", "direction": "random_like(persona, "
                                                f"{'9' * 5000})", "alpha": 1.0}]),
     "steer[0].direction", "at most 128"),
    ("random_like seed 2^32", chat(steer=[{"op": "ablate", "direction":
                                           f"random_like(persona, {2**32})"}]),
     "steer[0].direction", "2^32"),
    ("negative random_like seed", chat(steer=[{"op": "ablate", "direction":
                                               "random_like(persona, -1)"}]),
     "steer[0].direction", "2^32"),
    ("alpha 1e300", chat(steer=[{"op": "add", "direction": "persona", "alpha": 1e300}]),
     "steer[0].alpha", "10000"),
    ("sampling seed 2^70", chat(seed=2**70, temperature=1.0), "seed", "less than or equal"),
    ("sampling seed of 4000 digits", '{"messages": [{"role": "user", "content": "hi"}], '
     f'"seed": {"7" * 4000}}}', "seed", ""),
]


@pytest.mark.parametrize("case", NUMBERS, ids=[c[0] for c in NUMBERS])
def test_numeric_limits_are_422(server: str, case: tuple[str, Any, str, str]) -> None:
    _, body, field, text = case
    reply = post(server, body)
    assert reply.status_code == 422, reply.text[:300]
    message = reply.json()["error"]["message"]
    assert message.startswith(field) and text in message, message
    assert healthy(server)


def test_seeds_in_range_work(server: str) -> None:
    control = f"random_like(persona, {2**32 - 1})"
    ok = post(server, chat(seed=2**63, temperature=1.0,
                           steer=[{"op": "ablate", "direction": control, "layers": [1]}]))
    assert ok.status_code == 200, ok.text


# -- the model name ------------------------------------------------------------------------------
def test_unknown_model_is_404_like_openai(server: str, tiny: Any) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                   "content": "hi"}],
                                       max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert "gpt-4o" in str(caught.value) and tiny.name in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server}/v1/models/nope").status_code == 404
    for name in (tiny.name, tiny.spec, "my-alias"):
        got = client.chat.completions.create(model=name, messages=[{"role": "user",
                                                                     "content": "hi"}],
                                             max_tokens=2)
        assert got.model == tiny.name
        assert httpx.get(f"{server}/v1/models/{name}").status_code == 200
    assert post(server, chat()).status_code == 200  # no "model": the one served model
