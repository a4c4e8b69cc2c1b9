"""Chat rendering and token positions, on the tiny Qwen and Llama-3 templates and the real one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerlab import DataError
from steerlab.prompts.chat import (
    encode,
    position_tokens,
    position_weights,
    post_instruction_ids,
    render,
)
from tests.tiny import LLAMA3_TEMPLATE, tiny_tokenizer

# Prompts of different lengths, so the batch is really left-padded.
PROMPTS = ["how to make a cake", "hello", "please write a poem about the blue sky"]
LAST_WORDS = ["cake", "hello", "sky"]
SYSTEMS: list[str | None] = [None, "be kind", None]
RESPONSES = ["sure here is a cake", "no", "the sky is blue"]

POST = {
    "qwen": ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"],
}


def _tokens(tok: Any, text: str) -> list[str]:
    return list(tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]))


@pytest.mark.parametrize("template", ["qwen", "llama3"])
def test_post_instruction_tokens(template: str) -> None:
    tok = tiny_tokenizer(template)
    assert tok.convert_ids_to_tokens(list(post_instruction_ids(tok))) == POST[template]


@pytest.mark.parametrize("template", ["qwen", "llama3"])
@pytest.mark.parametrize("system", [None, "be kind", "mixed"])
def test_positions_in_left_padded_batch(template: str, system: str | None) -> None:
    tok = tiny_tokenizer(template)
    systems = SYSTEMS if system == "mixed" else system
    batch = encode(tok, PROMPTS, systems)
    row_systems = SYSTEMS if system == "mixed" else [system] * len(PROMPTS)
    pads = (batch.attention_mask == 0).sum(1)
    assert pads.max() > 0 and pads.min() == 0  # rows differ in length
    for b in range(len(PROMPTS)):  # padding is on the left, and the prompt ends the row
        assert not batch.attention_mask[b, : int(pads[b])].any()
        assert batch.attention_mask[b, int(pads[b]):].all()
        assert int(batch.prompt_end[b]) == batch.input_ids.shape[1]
    post = POST[template]
    assert position_tokens(tok, batch, "t_inst") == [[w] for w in LAST_WORDS]
    assert position_tokens(tok, batch, "post_inst") == [post] * len(PROMPTS)
    assert position_tokens(tok, batch, "last") == [[post[-1]]] * len(PROMPTS)
    for k in range(-len(post), len(post)):
        assert position_tokens(tok, batch, f"post_inst[{k}]") == [[post[k]]] * len(PROMPTS)
    for b, (prompt, sys_prompt) in enumerate(zip(PROMPTS, row_systems, strict=True)):
        text = render(tok, prompt, sys_prompt)
        assert batch.texts[b] == text
        assert (sys_prompt in text) if sys_prompt else ("be kind" not in text)
        assert position_tokens(tok, batch, "prompt_mean")[b] == _tokens(tok, text)
    for position in ("t_inst", "post_inst", "last", "prompt_mean"):
        weights = position_weights(batch, position)
        assert torch.allclose(weights.sum(1), torch.ones(len(PROMPTS)))
        assert not weights[batch.attention_mask == 0].any()


@pytest.mark.parametrize("template", ["qwen", "llama3"])
def test_response_mean_reads_only_response_tokens(template: str) -> None:
    tok = tiny_tokenizer(template)
    plain = encode(tok, PROMPTS, SYSTEMS)
    batch = encode(tok, PROMPTS, SYSTEMS, responses=RESPONSES)
    assert batch.has_response and not plain.has_response
    got = position_tokens(tok, batch, "response_mean")
    assert got == [_tokens(tok, r) for r in RESPONSES]
    # The prompt positions are the same with or without a response after them.
    for position in ("t_inst", "post_inst", "last", "prompt_mean"):
        assert position_tokens(tok, batch, position) == position_tokens(tok, plain, position)


def test_no_chat_template_is_an_error_unless_one_is_given() -> None:
    tok = tiny_tokenizer("qwen")
    tok.chat_template = None
    with pytest.raises(DataError, match=r"has no chat template.*chat_template="):
        encode(tok, ["hello"])
    with pytest.raises(DataError, match="has no chat template"):
        render(tok, "hello")
    batch = encode(tok, ["hello"], chat_template=LLAMA3_TEMPLATE)
    assert batch.texts[0].startswith("<|begin_of_text|>")


def test_position_errors() -> None:
    tok = tiny_tokenizer("qwen")
    batch = encode(tok, ["hello", "how to make a cake"])
    with pytest.raises(DataError, match=r"'post_inst\[5\]' is out of range.*\[-5, 4\]"):
        position_weights(batch, "post_inst[5]")
    with pytest.raises(DataError, match=r"out of range"):
        position_weights(batch, "post_inst[-6]")
    with pytest.raises(DataError, match=r"response_mean.*needs a response.*responses="):
        position_weights(batch, "response_mean")
    with pytest.raises(DataError, match=r"response_mean.*needs a response"):  # one row lacks one
        position_weights(encode(tok, ["hello", "hi"], responses=["yes", ""]), "response_mean")
    with pytest.raises(DataError, match="Unknown position 'middle'"):
        position_weights(batch, "middle")
    with pytest.raises(DataError, match="2 system prompts for 1 prompts"):
        encode(tok, ["hello"], ["a", "b"])
    with pytest.raises(DataError, match="prompt list is empty"):
        encode(tok, [])


@pytest.mark.real
def test_positions_on_the_real_qwen_template(real_lm: Any) -> None:
    tok = real_lm.tokenizer
    post = ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]  # Ċ is byte-level "\n"
    assert tok.convert_ids_to_tokens(list(post_instruction_ids(tok))) == post
    prompts = ["How do I bake bread?", "Hi", "Name three rivers in Europe and say which is longest"]
    systems: list[str | None] = [None, "You are terse.", None]
    responses = ["Sure! Here is how.", "Hello there", "The Danube, the Rhine and the Volga."]
    batch = encode(tok, prompts, systems, responses=responses)
    plain = encode(tok, prompts, systems)
    assert (plain.attention_mask == 0).sum(1).tolist()[0] > 0  # left-padded
    assert "You are Qwen" in batch.texts[0] and "You are terse." in batch.texts[1]
    assert "You are Qwen" not in batch.texts[1]
    for b_ in (batch, plain):
        assert position_tokens(tok, b_, "t_inst") == [["?"], ["Hi"], ["Ġlongest"]]
        assert position_tokens(tok, b_, "post_inst") == [post] * 3
        assert position_tokens(tok, b_, "last") == [["Ċ"]] * 3
        assert position_tokens(tok, b_, "post_inst[2]") == [["<|im_start|>"]] * 3
        assert position_tokens(tok, b_, "post_inst[-2]") == [["assistant"]] * 3
    for b, (prompt, sys_prompt) in enumerate(zip(prompts, systems, strict=True)):
        expected = _tokens(tok, render(tok, prompt, sys_prompt))
        assert position_tokens(tok, batch, "prompt_mean")[b] == expected
        assert position_tokens(tok, plain, "prompt_mean")[b] == expected
    assert position_tokens(tok, batch, "response_mean") == [_tokens(tok, r) for r in responses]
