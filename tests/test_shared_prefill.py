"""Shared prefills: conditions over the same prompts compute their unsteered lower layers once."""

from __future__ import annotations

import pytest
import torch

import steerlab.activations.shared_prefill as shared_prefill
from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.generation.decoding import decode_loop, forward_step, left_pad
from steerlab.generation.generate import GenerationGroup, generate_groups
from steerlab.interventions.specs import Ablate, Add, Project
from steerlab.interventions.steering import count_hooks, first_hooked_layer
from tests.tiny import tiny_model

PROMPTS = [
    "hello world",
    "how do i make a cake with bread and five eggs for my friend",
    "write a poem about the sky",
    "what is the number",
]


def _direction(lm) -> Direction:
    torch.manual_seed(0)
    return Direction(torch.randn(lm.n_layers, lm.d_model) * 8, tuple(range(lm.n_layers)),
                     DirectionMeta(best_layer=1))


def _groups(d: Direction) -> list[GenerationGroup]:
    return [
        GenerationGroup(PROMPTS),
        GenerationGroup(PROMPTS, [Add(d, 1.0, layers=[1])]),
        GenerationGroup(PROMPTS, [Add(d, 1.0, layers=[2])]),
        GenerationGroup(PROMPTS[1:], [Project(d, layers=[2]), Add(d, -1.0, layers=[1])]),
        GenerationGroup(PROMPTS, [Ablate(d)]),  # every layer: prefills whole
    ]


def _token_counter(module: torch.nn.Module) -> tuple[list[int], object]:
    """Tokens a module really computed (a stand-in layer never calls its attention)."""
    seen = [0]

    def hook(_m, args, _out):
        seen[0] += args[0].shape[0] * args[0].shape[1]

    return seen, module.register_forward_hook(hook)


def test_first_hooked_layer_is_the_lowest_layer_a_spec_changes() -> None:
    lm = tiny_model("qwen2")
    d = _direction(lm)
    assert first_hooked_layer(lm, []) == lm.n_layers
    assert first_hooked_layer(lm, [Add(d, 1.0, layers=[2])]) == 2
    assert first_hooked_layer(lm, [Add(d, 1.0, layers=[2]), Project(d, layers=[1])]) == 1
    assert first_hooked_layer(lm, [Ablate(d)]) == 0
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize(("arch", "common"), [("qwen2", 0), ("qwen2", 10), ("llama", 10),
                                              ("phi3", 0)])
def test_a_prefill_from_stored_lower_layers_equals_the_whole_prefill(arch: str,
                                                                      common: int) -> None:
    """Stored K/V and residual (computed with ``common`` shared leading tokens run once),
    put back under a different padding, give the same logits at prefill and at the next
    decode step (float32)."""
    lm = tiny_model(arch, dtype=torch.float32)
    head = list(range(5, 5 + common))
    ids = [head + lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert shared_prefill._common_prefix(ids[:3]) == common
    start = 2
    states = shared_prefill.compute_states(lm, ids, [[1, start]] * len(ids), 0, batch_size=3)
    assert [s.keys[0].shape[1] for s in states] == [len(i) for i in ids]
    batch, mask = left_pad(ids, 0)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    results = []
    for prefill in (None, shared_prefill.prefill_from(lm, start, states)):
        with torch.inference_mode():
            if prefill is None:
                logits, cache = forward_step(lm, batch, mask, position, None)
            else:
                logits, cache = prefill(batch, mask, position)
            nxt = logits.argmax(-1, keepdim=True)
            step, _ = forward_step(lm, nxt, torch.cat([mask, mask[:, :1]], 1),
                                   position[:, -1:] + 1, cache)
        results.append((logits, step))
    (a0, a1), (b0, b1) = results
    assert torch.allclose(a0, b0, atol=1e-4) and torch.allclose(a1, b1, atol=1e-4)
    assert not any("forward" in layer.__dict__ for layer in lm.layers)


@pytest.mark.parametrize("arch", ["qwen2", "olmo2"])
def test_shared_generation_gives_the_same_tokens_with_less_lower_layer_compute(arch: str) -> None:
    lm = tiny_model(arch, dtype=torch.float32)
    d = _direction(lm)
    counts = {}
    outputs = {}
    firsts: dict[bool, dict[tuple[int, int], torch.Tensor]] = {}
    for share in (False, True):
        seen, handle = _token_counter(lm.layout.attn_residual[0])
        kept: dict[tuple[int, int], torch.Tensor] = {}

        def first(keys, logits, kept=kept):
            kept.update({k: logits[i] for i, k in enumerate(keys)})

        try:
            out = generate_groups(lm, _groups(d), max_new_tokens=6, batch_size=7,
                                  share_prefill=share, on_first_logits=first)
        finally:
            handle.remove()
        counts[share], firsts[share] = seen[0], kept
        outputs[share] = [[(g.response, g.finish_reason) for g in rows] for rows in out]
    assert outputs[True] == outputs[False]
    assert len({r for rows in outputs[True] for r, _ in rows}) > len(PROMPTS)  # steering acts
    assert counts[True] < counts[False]
    for key, logits in firsts[False].items():
        assert torch.allclose(firsts[True][key], logits, atol=1e-4)
    assert count_hooks(lm.model) == 0
    assert not any("forward" in layer.__dict__ for layer in lm.layers)


def test_state_bytes_is_what_compute_states_stores() -> None:
    lm = tiny_model("qwen2", dtype=torch.bfloat16)
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    states = shared_prefill.compute_states(lm, ids, [[1, 3]] * len(ids), 0, batch_size=2)
    for row, state in zip(ids, states, strict=True):
        stored = sum(t.numel() * t.element_size()
                     for t in [*state.keys, *state.values, *state.residual.values()])
        assert stored == shared_prefill.state_bytes(lm, len(row), 3, 2)


def test_prompts_split_into_chunks_by_state_memory_and_give_the_same_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget that holds two prompts' states makes several chunks; the tokens are those of
    whole prefills either way."""
    assert shared_prefill._chunks([3, 3, 3, 7, 1], 6) == [[0, 1], [2], [3], [4]]
    lm = tiny_model("qwen2", dtype=torch.float32)
    d = _direction(lm)
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    starts = [1, 2]
    rows = [i for i in ids for _ in starts]
    row_starts = starts * len(ids)
    pad = lm.tokenizer.pad_token_id or 0
    assert shared_prefill.state_budget(lm) == shared_prefill.STATE_BUDGET_BYTES  # on the CPU
    assert len(shared_prefill.SharedPrefill(lm, rows, row_starts, pad).chunks) == 1
    longest = sorted((len(i) for i in ids), reverse=True)
    budget = sum(shared_prefill.state_bytes(lm, n, 2, 2) for n in longest[:2])
    small = shared_prefill.SharedPrefill(lm, rows, row_starts, pad, budget_bytes=budget)
    assert len(small.chunks) == 2 and sorted(len(c) for c in small.chunks) == [2, 2]
    whole = generate_groups(lm, _groups(d), max_new_tokens=5, batch_size=3, share_prefill=False)
    monkeypatch.setattr(shared_prefill, "STATE_BUDGET_BYTES", budget)
    chunked = generate_groups(lm, _groups(d), max_new_tokens=5, batch_size=3)
    assert [[g.response for g in group] for group in chunked] == \
        [[g.response for g in group] for group in whole]


def test_a_sliding_window_model_prefills_whole_and_gives_the_same_tokens() -> None:
    lm = tiny_model("gemma2", dtype=torch.float32)
    d = _direction(lm)
    seen, handle = _token_counter(lm.layout.attn_residual[0])
    try:
        shared = generate_groups(lm, _groups(d), max_new_tokens=4, share_prefill=True)
        on_count = seen[0]
        whole = generate_groups(lm, _groups(d), max_new_tokens=4, share_prefill=False)
    finally:
        handle.remove()
    assert shared_prefill.supported(lm, [1, 2, 3]) is False
    assert [[g.response for g in rows] for rows in shared] == \
        [[g.response for g in rows] for rows in whole]
    assert on_count == seen[0] - on_count


def test_stand_ins_are_removed_when_the_forward_fails_and_a_wrapped_forward_is_restored() -> None:
    """A layer's own instance ``forward`` (as accelerate installs) is put back, and a failure
    inside the steered layers leaves no stand-in and no hook behind."""
    lm = tiny_model("qwen2", dtype=torch.float32)
    d = _direction(lm)
    wrapped = lm.layers[0].forward

    def wrapper(*args, **kwargs):
        return wrapped(*args, **kwargs)

    lm.layers[0].forward = wrapper
    try:
        generate_groups(lm, _groups(d)[1:3], max_new_tokens=3)  # the once-per-model check
        assert shared_prefill.supported(lm, [1, 2, 3]) is True

        def boom(*_args):
            raise ValueError("boom in the top layer")

        handle = lm.layers[-1].register_forward_hook(boom)
        try:
            with pytest.raises(ValueError, match="boom"):
                generate_groups(lm, _groups(d)[1:3], max_new_tokens=3)
        finally:
            handle.remove()
        assert lm.layers[0].__dict__["forward"] is wrapper
        assert not any("forward" in layer.__dict__ for layer in lm.layers[1:])
        assert count_hooks(lm.model) == 0
        out = generate_groups(lm, _groups(d)[1:3], max_new_tokens=3)  # still works after
        assert all(len(rows) == len(PROMPTS) for rows in out)
    finally:
        del lm.layers[0].forward


def test_decode_loop_uses_a_given_prefill() -> None:
    lm = tiny_model("qwen2", dtype=torch.float32)
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    calls = []

    def prefill(batch, mask, position):
        calls.append(batch.shape)
        return forward_step(lm, batch, mask, position, None)

    def step(logits, live):
        return logits.argmax(-1), []

    assert decode_loop(lm, ids, 0, step, prefill=prefill) == 1
    assert calls == [torch.Size([2, max(len(i) for i in ids)])]
