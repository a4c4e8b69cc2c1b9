"""Property-based tests (Hypothesis): whatever the input, the compact spec parser, the prompt
file loaders and the server's request handling end in a result or a named error
(``SteerlabError`` in the library, a 4xx for the server), never another exception.

Bounded and derandomized so they run in the default test command in seconds, the same way
every time.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import SteerlabError
from steerlab.interventions.specs import Add, parse_compact, to_compact
from steerlab.prompts.sets import load_prompts
from steerlab.serve import schemas as S
from steerlab.serve.prepare import (
    Limits,
    chat_prompt_ids,
    completion_prompt_ids,
    openai_error,
    sampling_params,
)
from steerlab.serve.specs import SteerRegistry
from steerlab.serve.validation import format_validation_error
from tests.tiny import tiny_model

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- compact spec parser ------------------------------------------------------------------------
OPS = st.sampled_from(["add", "ablate", "project", "subspace", "ADD", "nope", ""])
REFS = st.one_of(st.sampled_from(["runs/persona", "d", "random_like(d, 3)", "a+b", "x[2]", "",
                                  "random_like(d, 99999999999999999999)"]),
                 st.text(max_size=12))
LAYERS = st.one_of(st.sampled_from(["all", "12", "3-5", "7-10>12-20", "0-99999999999", "-1",
                                    "1,2,,3", "5-2", ">", "x"]), st.text(max_size=8))
OPTIONS = st.lists(st.one_of(st.sampled_from(["4.0", "-1e300", "nan", "inf", "1e6", "prompt",
                                              "generated", "unit", "mean_norm", "raw", "x"]),
                             st.text(max_size=6)), max_size=3)


@st.composite
def compact_specs(draw: Any) -> str:
    text = f"{draw(OPS)}:{draw(REFS)}@{draw(LAYERS)}"
    return ":".join([text, *draw(OPTIONS)])


@FAST
@given(st.one_of(compact_specs(), st.text(max_size=40)))
def test_compact_parser_gives_a_spec_or_a_steerlab_error(text: str) -> None:
    try:
        spec = parse_compact(text)
    except SteerlabError:
        return
    if isinstance(spec, Add):
        assert math.isfinite(spec.alpha) and abs(spec.alpha) <= 1e6
    again = to_compact(spec)  # a parsed spec has a compact form that reads back the same
    assert parse_compact(again) == spec


# -- prompt file loaders ------------------------------------------------------------------------
ROW_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                       st.text(max_size=10), st.lists(st.integers(), max_size=2))
JSON_ROWS = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["id", "prompt", "label", "category", "pair_id", "text",
                                     "x"]), ROW_VALUES, max_size=5),
    st.text(max_size=10), st.integers(), st.lists(st.text(max_size=3), max_size=2)), max_size=5)


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _json(rows: list[Any]) -> bytes:
    return json.dumps(rows).encode()


def _csv(rows: list[Any]) -> bytes:
    lines = ["id,prompt,label"] + [",".join(str(v) for v in (r.values() if isinstance(r, dict)
                                                             else [r]))
                                   for r in rows]
    return "\n".join(lines).encode()


FILES = st.one_of(
    st.tuples(st.just(".jsonl"), JSON_ROWS.map(_jsonl)),
    st.tuples(st.just(".json"), JSON_ROWS.map(_json)),
    st.tuples(st.just(".csv"), JSON_ROWS.map(_csv)),
    st.tuples(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), st.binary(max_size=60)),
    st.tuples(st.just(".txt"), st.text(max_size=60).map(lambda t: t.encode("utf-8", "replace"))),
)


@FAST
@given(FILES, st.sampled_from([None, "train", "val", "test", "bogus"]))
def test_prompt_loaders_give_prompts_or_a_steerlab_error(file: tuple[str, bytes],
                                                         split: str | None) -> None:
    suffix, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_bytes(data)
        try:
            pset = load_prompts(str(path), split=split)
        except SteerlabError:
            return
        assert len(pset) > 0
        assert all(isinstance(p.prompt, str) and p.prompt for p in pset)
        assert len({p.id for p in pset}) == len(pset)


# -- the server's request handling ----------------------------------------------------------------
@pytest.fixture(scope="module")
def served() -> tuple[Any, SteerRegistry, Limits]:
    lm = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(0)
    persona = Direction(torch.randn(lm.n_layers, lm.d_model, generator=gen),
                        tuple(range(lm.n_layers)), DirectionMeta(name="persona", best_layer=1))
    return lm, SteerRegistry({"persona": persona}, lm.n_layers, ()), Limits.for_model(lm, 16)


TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "", "hi"]))
NUMBER = st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.floats(), TEXT,
                   st.none(), st.booleans())
LAYER_VALUES = st.one_of(st.sampled_from(["all", "1", "0-2", "0-99999999999", "x"]),
                         st.integers(-2, 5), st.lists(st.integers(-2, 5), max_size=3), TEXT)
STEER = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "ablate", "project", "subspace", "boom"])},
    optional={"direction": st.one_of(st.sampled_from(
                  ["persona", "nope", "random_like(persona, 7)", "random_like(persona, -1)",
                   f"random_like(persona, {'9' * 60})"]), TEXT),
              "directions": st.lists(st.sampled_from(["persona", "x"]), max_size=2),
              "alpha": NUMBER, "layers": LAYER_VALUES, "source_layer": NUMBER,
              "source_layers": LAYER_VALUES,
              "positions": st.sampled_from(["all", "prompt", "x"]),
              "scale": st.sampled_from(["raw", "unit", "mean_norm", "x"]),
              "sites": st.lists(st.sampled_from(["input", "attn", "x"]), max_size=2)})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
     "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image"]), "text": TEXT}), max_size=2), NUMBER)})
BODY = st.fixed_dictionaries(
    {},
    optional={"model": TEXT, "messages": st.lists(MESSAGE, max_size=3), "prompt": st.one_of(
        TEXT, st.lists(TEXT, max_size=2)), "max_tokens": NUMBER, "temperature": NUMBER,
        "top_p": NUMBER, "seed": NUMBER, "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5)),
        "n": NUMBER, "steer": st.one_of(st.none(), st.lists(STEER, max_size=3)),
        "stream": st.booleans(), "logprobs": NUMBER})


@FAST
@given(BODY, st.booleans())
def test_request_handling_gives_a_job_or_a_4xx(served: Any, body: dict[str, Any],
                                               chat: bool) -> None:
    lm, registry, limits = served
    schema = S.ChatCompletionRequest if chat else S.CompletionRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        status, param, message = format_validation_error(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        assert 400 <= status < 500 and param and message
        return
    try:
        registry.resolve(request.steer)
        if isinstance(request, S.ChatCompletionRequest):
            ids = chat_prompt_ids(lm, request.messages)
        else:
            prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
            ids = completion_prompt_ids(lm, prompt, "prompt")
        params = sampling_params(request, len(ids), limits, request.max_tokens, "prompt")
    except S.RequestError as exc:
        assert 400 <= exc.status < 500, exc
        reply = openai_error(exc.status, str(exc), exc.param, exc.code)
        json.dumps(reply, ensure_ascii=False).encode("utf-8")  # the reply can be written
        return
    assert params.max_new_tokens >= 1
