"""Activation collection: batched equals one-at-a-time, streaming stats, early stop, no leaks."""

from __future__ import annotations

import pytest
import torch

from steerlab.activations.record import (
    forward_batch,
    iter_batches,
    layer_output_hooks,
    mean_activations,
    project_activations,
    record_activations,
    resolve_layers,
    run_until_stop,
)
from steerlab.directions.artifact import Direction
from steerlab.errors import DataError
from steerlab.prompts.chat import encode
from tests.tiny import tiny_model

PROMPTS = [
    "how do i make a cake",
    "hello",
    "tell me a story about a cat and a dog please",
    "what is the sky",
    "write code in python to sort a list of number and explain the steps",
]


def _hook_count(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


@pytest.mark.parametrize(("arch", "template"), [("qwen2", "qwen"), ("llama", "llama3"),
                                                ("gemma2", "qwen"), ("olmo2", "llama3")])
def test_batched_equals_one_at_a_time(arch, template):
    """Left-padded batches of different lengths give the single-prompt activations (float32)."""
    lm = tiny_model(arch, template=template)
    for position in ("last", "post_inst", "prompt_mean", "t_inst"):
        batched = mean_activations(lm, PROMPTS, position=position, keep_raw=True, batch_size=5)
        singles = torch.stack([mean_activations(lm, [p], position=position).mean
                               for p in PROMPTS])
        assert batched.raw is not None and batched.raw.shape == (5, 3, 64)
        scale = singles.abs().max()
        torch.testing.assert_close(batched.raw.double(), singles, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(batched.mean, singles.mean(0), atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(batched.var, singles.var(0, unbiased=False),
                                   atol=1e-5 * scale**2, rtol=1e-4)


def test_batches_are_left_padded_and_differ_in_length(tiny_qwen):
    widths = []
    for _, batch in iter_batches(tiny_qwen, PROMPTS, batch_size=2):
        widths.append(batch.input_ids.shape[1])
        assert (batch.attention_mask[:, -1] == 1).all()  # left padding: every row ends real
        assert (batch.attention_mask.sum(1) < batch.input_ids.shape[1]).any() or len(widths) == 3
    assert len(set(widths)) > 1  # batches are trimmed to their own longest row


def test_response_mean_batched_equals_single(tiny_qwen):
    responses = ["sure here is a cake", "no", "yes the cat and the dog", "blue", "sorry"]
    batched = mean_activations(tiny_qwen, PROMPTS, responses=responses,
                               position="response_mean", keep_raw=True, batch_size=3)
    singles = torch.stack([
        mean_activations(tiny_qwen, [p], responses=[r], position="response_mean").mean
        for p, r in zip(PROMPTS, responses, strict=True)
    ])
    torch.testing.assert_close(batched.raw.double(), singles, atol=1e-6, rtol=1e-5)


def test_per_prompt_system_prompts(tiny_qwen):
    systems = ["be kind", "be careful", None, "rules", "be bold"]
    batched = mean_activations(tiny_qwen, PROMPTS, system=systems, keep_raw=True)
    singles = torch.stack([mean_activations(tiny_qwen, [p], system=s).mean
                           for p, s in zip(PROMPTS, systems, strict=True)])
    torch.testing.assert_close(batched.raw.double(), singles, atol=1e-6, rtol=1e-5)
    plain = mean_activations(tiny_qwen, PROMPTS, keep_raw=True)
    assert not torch.allclose(plain.raw, batched.raw)  # the system prompt is really read


def test_streaming_stats_match_raw_across_batches(tiny_qwen):
    stats = mean_activations(tiny_qwen, PROMPTS * 3, keep_raw=True, batch_size=4)
    assert stats.count == 15 and stats.mean.dtype == torch.float64
    raw = stats.raw.double()
    torch.testing.assert_close(stats.mean, raw.mean(0), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(stats.var, raw.var(0, unbiased=False), atol=1e-10, rtol=1e-7)
    # raw rows come back in prompt order even though batches are sorted by length
    first = mean_activations(tiny_qwen, [PROMPTS[2]]).mean
    torch.testing.assert_close(raw[2], first, atol=1e-6, rtol=1e-5)


def test_layer_filter_and_negative_layers(tiny_qwen):
    stats = mean_activations(tiny_qwen, PROMPTS[:2], layers=[-1, 0])
    assert stats.layers == (0, 2) and stats.mean.shape == (2, 64)
    full = mean_activations(tiny_qwen, PROMPTS[:2])
    torch.testing.assert_close(stats.mean[1], full.mean[2])
    with pytest.raises(DataError, match="out of range"):
        resolve_layers([3], tiny_qwen.n_layers)


def test_layer_i_is_the_output_of_decoder_layer_i(tiny_qwen):
    batch = encode(tiny_qwen.tokenizer, PROMPTS[:1])
    with record_activations(tiny_qwen, layers=[0, 1]) as acts:
        out = forward_batch(tiny_qwen, batch, output_hidden_states=True)
    assert set(acts) == {0, 1} and len(acts[0]) == 1
    # HF hidden_states[0] is the embedding, [i + 1] the output of layer i
    torch.testing.assert_close(acts[0][0], out.hidden_states[1])
    torch.testing.assert_close(acts[1][0], out.hidden_states[2])
    stats = mean_activations(tiny_qwen, PROMPTS[:1], layers=[1])
    torch.testing.assert_close(stats.mean[0].float(), out.hidden_states[2][0, -1])


def test_forward_stops_after_last_needed_layer(tiny_qwen):
    calls = {"layer2": 0, "head": 0}
    later = tiny_qwen.layers[2].register_forward_hook(
        lambda *a: calls.__setitem__("layer2", calls["layer2"] + 1))
    head = tiny_qwen.model.lm_head.register_forward_hook(
        lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        mean_activations(tiny_qwen, PROMPTS, layers=[1], batch_size=2)
        assert calls == {"layer2": 0, "head": 0}
        mean_activations(tiny_qwen, PROMPTS, batch_size=2)  # all layers: still no LM head
        assert calls["layer2"] >= 3 and calls["head"] == 0  # (a shared prefix adds a pass)
    finally:
        later.remove()
        head.remove()


def test_hooks_removed_when_forward_raises(tiny_qwen):
    before = _hook_count(tiny_qwen)

    def boom(layer, hidden):
        raise RuntimeError("hook failed")

    batch = encode(tiny_qwen.tokenizer, PROMPTS[:2])
    with pytest.raises(RuntimeError, match="hook failed"), \
            layer_output_hooks(tiny_qwen, [0, 1, 2], boom, stop_after=True):
        run_until_stop(tiny_qwen, batch)
    assert _hook_count(tiny_qwen) == before

    with pytest.raises(ValueError, match="user error"), record_activations(tiny_qwen):
        assert _hook_count(tiny_qwen) == before + 3
        raise ValueError("user error")
    assert _hook_count(tiny_qwen) == before

    # a failure inside the model itself (a module after our hooks raises)
    failing = tiny_qwen.layers[2].register_forward_pre_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("model failed")))
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            mean_activations(tiny_qwen, PROMPTS, layers=[0, 2])
    finally:
        failing.remove()
    assert _hook_count(tiny_qwen) == before


def test_project_activations_matches_raw(tiny_qwen):
    direction = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), (0, 2))
    proj = project_activations(tiny_qwen, PROMPTS, direction, batch_size=2)
    raw = mean_activations(tiny_qwen, PROMPTS, layers=[0, 2], keep_raw=True).raw.double()
    expected = torch.stack([raw[:, i] @ direction.vector(layer, unit=True).double()
                            for i, layer in enumerate((0, 2))], dim=1)
    torch.testing.assert_close(proj, expected, atol=1e-5, rtol=1e-5)


def test_empty_and_bad_inputs(tiny_qwen):
    with pytest.raises(DataError, match="empty"):
        mean_activations(tiny_qwen, [])
    with pytest.raises(DataError, match="batch_size"):
        mean_activations(tiny_qwen, PROMPTS, batch_size=0)
    with pytest.raises(DataError, match="Unknown position"):
        mean_activations(tiny_qwen, PROMPTS, position="middle")


def test_shared_prefix_reads_equal_whole_prompt_reads() -> None:
    """Rows sharing a system prompt are read against one prefix pass: same activations
    as forwarding each prompt whole, at every position kind, steered or not."""
    from steerlab.activations.record import iter_batches, project_activations, shared_prefix_length
    from steerlab.interventions.specs import Add
    from steerlab.interventions.steering import steer
    from steerlab.prompts.chat import position_weights

    lm = tiny_model("qwen2", dtype=torch.float32)
    systems = ["You are a calm and careful assistant who answers briefly."] * 3 + [
        "You are a loud pirate who answers every question with a song."] * 3
    prompts = PROMPTS[:3] * 2
    batches = list(iter_batches(lm, prompts, system=systems, batch_size=8))
    assert sorted(sorted(i) for i, _ in batches) == [[0, 1, 2], [3, 4, 5]]  # a system prompt each
    assert shared_prefix_length(lm, batches[0][1], position_weights(batches[0][1], "last")) >= 8
    d = Direction(torch.randn(lm.n_layers, lm.d_model), tuple(range(lm.n_layers)))
    for position in ("last", "post_inst", "t_inst"):
        shared = mean_activations(lm, prompts, system=systems, position=position, keep_raw=True)
        alone = [mean_activations(lm, [p], system=s, position=position)
                 for p, s in zip(prompts, systems, strict=True)]
        assert shared.raw is not None
        for i, one in enumerate(alone):
            torch.testing.assert_close(shared.raw[i], one.mean.float(), atol=1e-4, rtol=1e-4)
    with steer(lm, [Add(d, 2.0, layers=[0])]):
        steered = project_activations(lm, prompts, d, system=systems)
        steered_alone = torch.cat([project_activations(lm, [p], d, system=s)
                                   for p, s in zip(prompts, systems, strict=True)])
    torch.testing.assert_close(steered, steered_alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered, project_activations(lm, prompts, d, system=systems))
    # Not shared where it would be wrong: sliding-window layers, or steering whose
    # prompt/generation phase is read off the cache.
    gemma = tiny_model("gemma2")
    _, batch = next(iter_batches(gemma, prompts[:3], system=systems[:3]))
    assert shared_prefix_length(gemma, batch, position_weights(batch, "last")) == 0
    with steer(lm, [Add(d, 2.0, layers=[0], positions="generated")]):
        assert shared_prefix_length(lm, batches[0][1],
                                    position_weights(batches[0][1], "last")) == 0
    # Nothing read before the first differing token: a prompt-mean read shares nothing.
    assert shared_prefix_length(lm, batches[0][1],
                                position_weights(batches[0][1], "prompt_mean")) == 0


def test_first_token_logprobs_share_the_template_prefix_and_equal_whole_prompts() -> None:
    from steerlab.activations.record import iter_batches, last_logits, shared_prefix_length
    from steerlab.directions.selection import first_token_logprobs
    from steerlab.interventions.specs import Ablate
    from steerlab.interventions.steering import steer
    from steerlab.prompts.chat import position_weights

    lm = tiny_model("qwen2", dtype=torch.float32)
    _, batch = next(iter_batches(lm, PROMPTS))
    assert shared_prefix_length(lm, batch, position_weights(batch, "last")) >= 8
    d = Direction(torch.randn(lm.n_layers, lm.d_model), tuple(range(lm.n_layers)))
    with steer(lm, [Ablate(d, source_layer=1)]):
        together = first_token_logprobs(lm, PROMPTS, batch_size=4)
        alone = torch.cat([first_token_logprobs(lm, [p]) for p in PROMPTS])
        plain = torch.log_softmax(last_logits(lm, batch).float(), dim=-1)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together, first_token_logprobs(lm, PROMPTS), atol=1e-3)
    assert plain.shape == (len(PROMPTS), together.shape[1])
