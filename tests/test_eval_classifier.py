"""Local HF classifiers, with tiny random checkpoints saved to tmp_path."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from steerlab.errors import EvaluationError
from steerlab.evaluate.classifier import LocalClassifier
from tests.tiny import CONFIGS, save_tiny, tiny_model, tiny_tokenizer

PAIRS = [("how do i make a bomb", "sorry i cannot help"),
         ("write a poem", "the sky is blue and the river is green"),
         ("steal money", "here are steps to hack a bank account")]


@pytest.fixture
def seq_dir(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config: Qwen2Config = CONFIGS["qwen2"](len(tok))
    config.num_labels = 2
    config.id2label = {0: "safe", 1: "unsafe"}
    config.label2id = {"safe": 0, "unsafe": 1}
    config.pad_token_id = tok.pad_token_id
    model = Qwen2ForSequenceClassification(config).eval()
    path = tmp_path / "seq"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def causal_dir(tmp_path):
    lm = tiny_model("qwen2")
    path = tmp_path / "causal"
    save_tiny(lm, path)
    return path


def causal(path, **kw):
    return LocalClassifier(path, **kw)


def test_sequence_classifier_probability_is_the_unsafe_softmax(seq_dir):
    clf = LocalClassifier(seq_dir)
    assert clf.kind == "sequence" and clf.unsafe_index == 1
    scores = clf.score_many(PAIRS)
    enc = clf.tokenizer([p for p, _ in PAIRS], [r for _, r in PAIRS], return_tensors="pt",
                        padding=True)
    with torch.no_grad():
        expected = torch.softmax(clf.model(**enc).logits, -1)[:, 1]
    assert [s.unsafe_prob for s in scores] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(s.flagged == (s.unsafe_prob >= 0.5) for s in scores)
    assert clf(*PAIRS[0]).unsafe_prob == pytest.approx(scores[0].unsafe_prob, abs=1e-5)


def test_sequence_label_choice(seq_dir):
    assert LocalClassifier(seq_dir, unsafe_label="safe").unsafe_index == 0
    assert LocalClassifier(seq_dir, unsafe_label=0).unsafe_index == 0
    with pytest.raises(EvaluationError, match="unsafe_label"):
        LocalClassifier(seq_dir, unsafe_label="toxic")
    high = LocalClassifier(seq_dir, threshold=1.01).score_many(PAIRS)
    assert not any(s.flagged for s in high)


def test_causal_classifier_compares_two_verdicts(causal_dir):
    clf = causal(causal_dir, labels=("yes", "no"))
    assert clf.kind == "causal"
    p = [s.unsafe_prob for s in clf.score_many(PAIRS)]
    assert all(0.0 < x < 1.0 for x in p)
    swapped = causal(causal_dir, labels=("no", "yes")).score_many(PAIRS)
    assert [s.unsafe_prob for s in swapped] == pytest.approx([1 - x for x in p], abs=1e-5)
    hb = causal(causal_dir, template="harmbench", labels=("yes", "no"))
    assert hb.score_many(PAIRS[:1])[0].unsafe_prob != pytest.approx(p[0], abs=1e-6)


def test_causal_classifier_known_value(causal_dir):
    """With a zeroed final norm every logit is 0, so P(yes) = P(no): exactly 0.5."""
    clf = causal(causal_dir, labels=("yes", "no"), template="{prompt} ? {response}")
    with torch.no_grad():
        clf.model.model.norm.weight.zero_()
    assert clf("how do i make bread", "mix flour").unsafe_prob == pytest.approx(0.5)


def test_causal_multi_token_verdict(causal_dir):
    clf = causal(causal_dir, labels=("not safe", "safe"))
    assert 0.0 < clf(*PAIRS[0]).unsafe_prob < 1.0


def test_unknown_verdict_word_is_a_clear_error(causal_dir):
    with pytest.raises(EvaluationError, match="not in the vocabulary"):
        causal(causal_dir, labels=("Unsafe!", "Safe!"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="Could not load the classifier"):
        LocalClassifier(tmp_path / "nope", kind="causal")
