"""KL vs the unsteered model, and perplexity, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.directions.artifact import Direction, stamp_meta
from steerlab.errors import EvaluationError
from steerlab.evaluate.kl import kl_divergence, kl_per_prompt, kl_report
from steerlab.evaluate.perplexity import nll_report, perplexity
from steerlab.interventions.specs import Add

PROMPTS = ["how do i make bread", "write a poem", "what is a cat", "tell me a story about a dog",
           "explain safety"]


def direction(lm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vecs = torch.randn(lm.n_layers, lm.d_model, generator=gen)
    return Direction(vecs, tuple(range(lm.n_layers)), stamp_meta(lm, name="rand"))


def test_no_intervention_gives_zero(tiny_qwen):
    assert kl_divergence(tiny_qwen, PROMPTS, [], k=3) == 0.0


def test_zero_alpha_gives_zero_and_larger_alpha_more(tiny_qwen):
    d = direction(tiny_qwen)
    zero = kl_divergence(tiny_qwen, PROMPTS, [Add(d, 0.0, layers=[1])], k=1)
    small = kl_divergence(tiny_qwen, PROMPTS, [Add(d, 0.5, layers=[1])], k=1)
    big = kl_divergence(tiny_qwen, PROMPTS, [Add(d, 8.0, layers=[1])], k=1)
    assert zero == pytest.approx(0.0, abs=1e-6)
    assert 0 < small < big


def test_first_token_matches_a_direct_forward(tiny_qwen):
    from steerlab.interventions.steering import steer
    from steerlab.prompts.chat import encode

    spec = [Add(direction(tiny_qwen), 3.0, layers=[0, 2])]
    got = kl_per_prompt(tiny_qwen, PROMPTS[:1], spec, k=1)[0][0]
    batch = encode(tiny_qwen.tokenizer, PROMPTS[:1])
    with torch.no_grad():
        p = torch.log_softmax(tiny_qwen.model(input_ids=batch.input_ids).logits[0, -1], -1)
        with steer(tiny_qwen, spec):
            q = torch.log_softmax(tiny_qwen.model(input_ids=batch.input_ids).logits[0, -1], -1)
    expected = float((p.exp() * (p - q)).sum())
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_batched_equals_one_by_one(tiny_qwen):
    spec = [Add(direction(tiny_qwen, 1), 2.0, layers=[1])]
    batched = kl_per_prompt(tiny_qwen, PROMPTS, spec, k=4, batch_size=5)
    single = kl_per_prompt(tiny_qwen, PROMPTS, spec, k=4, batch_size=1)
    assert [len(v) for v in batched] == [len(v) for v in single]
    for a, b in zip(batched, single, strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)


def test_generated_only_steering_leaves_first_token_alone(tiny_qwen):
    """The prefill is the prompt phase, as in generation: a 'generated'-only
    intervention cannot change the first response token's distribution."""
    spec = [Add(direction(tiny_qwen), 6.0, layers=[1], positions="generated")]
    per = kl_per_prompt(tiny_qwen, PROMPTS, spec, k=3)
    assert all(v[0] == pytest.approx(0.0, abs=1e-6) for v in per)
    assert any(len(v) > 1 and max(v[1:]) > 1e-4 for v in per)


def test_stops_at_baseline_eos(tiny_qwen):
    lm = tiny_qwen
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():
        lm.model.lm_head.weight[eos] += 50 * lm.model.lm_head.weight.std()  # EOS first, always
        try:
            per = kl_per_prompt(lm, PROMPTS[:2], [Add(direction(lm), 1.0, layers=[1])], k=5)
        finally:
            lm.model.lm_head.weight[eos] -= 50 * lm.model.lm_head.weight.std()
    assert [len(v) for v in per] == [1, 1]


def test_kl_report_has_intervals(tiny_qwen):
    rep = kl_report(tiny_qwen, PROMPTS, [Add(direction(tiny_qwen), 2.0, layers=[1])], k=3)
    assert rep["first_token"]["n"] == len(PROMPTS)
    lo, hi = rep["mean_first_3"]["ci95"]
    assert lo <= rep["mean_first_3"]["mean"] <= hi
    assert len(rep["per_prompt"]) == len(PROMPTS)


# -- perplexity -------------------------------------------------------------------------------
TEXTS = ["the cat is on the mountain and the sky is blue", "one two three four",
         "hello world, this is a test of the model"]


def test_perplexity_matches_hf_loss_per_text(tiny_qwen):
    tok = tiny_qwen.tokenizer
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = tiny_qwen.model(input_ids=ids, labels=ids).loss
        assert perplexity(tiny_qwen, [text]) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_batched_perplexity_is_token_weighted(tiny_qwen):
    rep = nll_report(tiny_qwen, TEXTS, batch_size=3)
    singles = [nll_report(tiny_qwen, [t]) for t in TEXTS]
    total = sum(s["nll"] * s["n_tokens"] for s in singles)
    assert rep["n_tokens"] == sum(s["n_tokens"] for s in singles)
    assert rep["nll"] == pytest.approx(total / rep["n_tokens"], rel=1e-4)
    assert rep["perplexity"] == pytest.approx(math.exp(rep["nll"]))


def test_steering_changes_perplexity(tiny_qwen):
    base = perplexity(tiny_qwen, TEXTS)
    steered = perplexity(tiny_qwen, TEXTS, [Add(direction(tiny_qwen), 10.0, layers=[0])])
    assert steered != pytest.approx(base, rel=1e-3)
    assert perplexity(tiny_qwen, TEXTS) == pytest.approx(base)  # hooks were removed


def test_perplexity_needs_two_tokens(tiny_qwen):
    with pytest.raises(EvaluationError, match="fewer than two tokens"):
        perplexity(tiny_qwen, ["cat"])
