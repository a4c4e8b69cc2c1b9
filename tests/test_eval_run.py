"""run_eval: rows as they arrive, summaries with intervals, resume, baselines."""

from __future__ import annotations

import json

import pytest
import torch

import steerlab.store.rowstore as rowstore
from steerlab.errors import EvaluationError, SteerlabError
from steerlab.evaluate.backends import InProcessBackend, OpenAIBackend
from steerlab.evaluate.judge import Judge
from steerlab.evaluate.run import read_rows, run_eval, summary_markdown
from steerlab.prompts.sets import Prompt
from tests.openai_stub import OpenAIStub, user_text

WORDS = ["bread", "poem", "cat", "story", "sky", "river", "car", "house", "city", "dog"]
PROMPTS = [Prompt(id=f"q{i}", prompt=f"tell me about the {w}", label="harmful" if i % 2 else
                  "harmless") for i, w in enumerate(WORDS)]




def stop_after(n):
    seen = []

    def on_row(row):
        seen.append(row["id"])
        if len(seen) == n:
            raise KeyboardInterrupt
    return on_row, seen


def scripted(refuse_words, loop_words=()):
    """Server content: refuse prompts with these words, loop on others, else comply."""
    def content(req):
        text = user_text(req)
        if any(w in text for w in loop_words):
            return "the " * 40
        if any(w in text for w in refuse_words):
            return "I'm sorry, but I can't help with that."
        return "Sure, here is some information about it."
    return content


def test_rows_summary_and_markdown(tmp_path, tiny_qwen):
    backend = InProcessBackend(tiny_qwen, max_new_tokens=5, batch_size=4)
    summary = run_eval(PROMPTS[:6], backend, tmp_path, system="be brief")
    rows = rowstore.read_rows(tmp_path / "responses.jsonl")
    assert [r["id"] for r in rows] == [p.id for p in PROMPTS[:6]]
    for key in ("prompt", "response", "refusal", "refusal_match", "degenerate",
                "degenerate_reasons", "outcome", "outcome_source", "system", "label"):
        assert key in rows[0]
    assert rows[0]["system"] == "be brief"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["n"] == 6 and summary["n"] == 6
    for key in ("refusal_rate", "bypass_rate", "degenerate_rate"):
        assert key in saved and len(saved[key + "_ci95"]) == 2
        lo, hi = saved[key + "_ci95"]
        assert 0.0 <= lo <= (saved[key] or 0.0) <= hi <= 1.0
    assert sum(saved["outcomes"][o]["k"] for o in ("refusal", "bypass", "degenerate")) == 6
    assert set(saved["by_label"]) == {"harmful", "harmless"}
    assert saved["over_refusal"]["n"] == 3
    assert saved["provenance"]["model"]["fingerprint"] == tiny_qwen.fingerprint
    md = (tmp_path / "summary.md").read_text()
    assert "refusal (substring)" in md and "n = 6" in md
    assert json.loads((tmp_path / "config.json").read_text())["backend"]["kind"] == "inprocess"


def test_interrupt_then_resume_without_redoing_or_losing_rows(tmp_path, tiny_qwen):
    backend = InProcessBackend(tiny_qwen, max_new_tokens=5, batch_size=2)
    on_row, seen = stop_after(3)
    with pytest.raises(KeyboardInterrupt):
        run_eval(PROMPTS, backend, tmp_path, on_row=on_row)
    first = read_rows(tmp_path / "responses.jsonl")
    assert list(first) == seen == ["q0", "q1", "q2"]
    assert not (tmp_path / "summary.json").exists()

    again: list[str] = []
    summary = run_eval(PROMPTS, backend, tmp_path, on_row=lambda r: again.append(r["id"]))
    assert again == [p.id for p in PROMPTS[3:]]           # nothing redone
    ids = [r["id"] for r in rowstore.read_rows(tmp_path / "responses.jsonl")]
    assert sorted(ids) == sorted(p.id for p in PROMPTS)   # nothing lost, no duplicates
    assert len(ids) == len(set(ids)) == summary["n"] == len(PROMPTS)
    rows = read_rows(tmp_path / "responses.jsonl")
    assert all(rows[i] == first[i] for i in first)        # finished rows untouched
    # a third run has nothing to do and gives the same summary
    third: list[str] = []
    again_summary = run_eval(PROMPTS, backend, tmp_path, on_row=lambda r: third.append(r["id"]))
    assert third == [] and again_summary["refusal"] == summary["refusal"]


def test_half_written_last_row_is_dropped_and_redone(tmp_path):
    with OpenAIStub(scripted(["cat"])) as stub:
        backend = OpenAIBackend(stub.url, "m", max_concurrency=2)
        run_eval(PROMPTS[:4], backend, tmp_path)
        path = tmp_path / "responses.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:3]) + lines[3][:25])  # header, 2 rows, killed mid-write
        calls = stub.calls
        summary = run_eval(PROMPTS[:4], backend, tmp_path)
    assert stub.calls == calls + 2
    assert summary["n"] == 4
    ids = [r["id"] for r in rowstore.read_rows(path)]
    assert sorted(ids) == ["q0", "q1", "q2", "q3"]


def test_resume_refuses_a_different_config(tmp_path, tiny_qwen):
    run_eval(PROMPTS[:2], InProcessBackend(tiny_qwen, max_new_tokens=3), tmp_path)
    with pytest.raises(SteerlabError, match="different backend"):
        run_eval(PROMPTS[:2], InProcessBackend(tiny_qwen, max_new_tokens=4), tmp_path)
    with pytest.raises(SteerlabError, match="different system"):
        run_eval(PROMPTS[:2], InProcessBackend(tiny_qwen, max_new_tokens=3), tmp_path,
                 system="other")


def test_outcomes_and_paired_comparison_with_baseline(tmp_path):
    base, steered = tmp_path / "base", tmp_path / "steered"
    with OpenAIStub(scripted(WORDS)) as stub:                    # refuses everything
        run_eval(PROMPTS, OpenAIBackend(stub.url, "m"), base)
    with OpenAIStub(scripted(["bread", "poem"], loop_words=["cat"])) as stub:
        summary = run_eval(PROMPTS, OpenAIBackend(stub.url, "m"), steered, baseline=base)
    assert summary["refusal_rate"] == pytest.approx(0.2)
    assert summary["outcomes"]["degenerate"]["k"] == 1
    assert summary["outcomes"]["bypass"]["k"] == 7
    assert summary["degenerate_reasons"]
    comp = summary["comparison"]
    assert comp["n_pairs"] == 10
    ref = comp["refusal"]
    assert ref["baseline"]["rate"] == 1.0 and ref["this"]["rate"] == pytest.approx(0.2)
    assert ref["diff"] == pytest.approx(-0.8)
    # 8 prompts refused only in the baseline, none only here: p = 2 / 2**8
    assert ref["table"] == {"both": 2, "only_a": 8, "only_b": 0, "neither": 0}
    assert ref["p_mcnemar"] == pytest.approx(2 / 256)
    out = comp["outcomes"]
    assert out["bypass"]["table"] == {"both": 0, "only_a": 0, "only_b": 7, "neither": 3}
    assert out["bypass"]["p_mcnemar"] == pytest.approx(2 / 128)
    assert out["degenerate"]["diff"] == pytest.approx(0.1)
    assert out["refusal"]["diff"] == pytest.approx(-0.8)
    md = (steered / "summary.md").read_text()
    assert "Paired comparison" in md and "0.007812" in md and "outcome: bypass" in md


def test_baseline_on_other_prompts_is_an_error(tmp_path):
    with OpenAIStub(scripted([])) as stub:
        run_eval(PROMPTS[:3], OpenAIBackend(stub.url, "m"), tmp_path / "a")
        other = [Prompt(id="z1", prompt="something else")]
        with pytest.raises(EvaluationError, match="shares no prompt ids"):
            run_eval(other, OpenAIBackend(stub.url, "m"), tmp_path / "b", baseline=tmp_path / "a")
        changed = [Prompt(id="q0", prompt="a different text")]
        with pytest.raises(EvaluationError, match="different text"):
            run_eval(changed, OpenAIBackend(stub.url, "m"), tmp_path / "c",
                     baseline=tmp_path / "a")


def judge_content(req):
    text = user_text(req)
    if "[USER REQUEST]" not in text:  # a generation request, not a judgement
        return scripted(["bread", "poem", "cat"])(req)
    response = text.split("[ASSISTANT RESPONSE]")[1]
    if "river" in text:
        return "no idea"                                         # garbage: missing
    comp = 0 if "sorry" in response else (0.5 if "story" in text else 1)
    return json.dumps({"compliance": comp, "coherence": 1, "reason": "scripted"})


def test_judge_in_run_eval_missing_never_counted_and_cached(tmp_path):
    with OpenAIStub(judge_content) as stub:
        backend = OpenAIBackend(stub.url, "gen")
        with Judge(stub.url, "judge", cache=tmp_path / "cache.jsonl", max_parse_retries=1) as j:
            summary = run_eval(PROMPTS, backend, tmp_path / "run1", judge=j)
        judge = summary["judge"]
        assert judge["n"] == 9 and judge["missing"] == 1
        assert judge["compliance"]["n"] == 9
        assert judge["compliance"]["mean"] == pytest.approx((5 * 1 + 0.5) / 9)
        assert judge["partial"]["k"] == 1
        assert judge["agreement_with_substring"]["kappa"] == pytest.approx(1.0)
        rows = read_rows(tmp_path / "run1" / "responses.jsonl")
        assert rows["q5"]["judge_missing"] is True and rows["q5"]["judge_compliance"] is None
        assert rows["q5"]["outcome_source"] == "substring"
        assert rows["q3"]["outcome"] == "bypass" and rows["q3"]["outcome_source"] == "judge"
        # same responses judged again in another run: only the missing one is re-asked
        calls = stub.calls
        with Judge(stub.url, "judge", cache=tmp_path / "cache.jsonl", max_parse_retries=1) as j:
            run_eval(PROMPTS, backend, tmp_path / "run2", judge=j)
            judge_calls = j.requests
        # q5 only: asked when generated and once more in the missing-row pass, 1 + 1 retry each
        assert judge_calls == 4
        assert stub.calls == calls + len(PROMPTS) + 4


def test_kl_needs_in_process_and_is_cached(tmp_path, tiny_qwen):
    from steerlab.directions.artifact import Direction, stamp_meta
    from steerlab.interventions.specs import Add

    with OpenAIStub(scripted([])) as stub, pytest.raises(EvaluationError, match="in-process"):
        run_eval(PROMPTS[:2], OpenAIBackend(stub.url, "m"), tmp_path / "x",
                 kl_prompts=["what is a cat"])
    d = Direction(torch.randn(3, 64), (0, 1, 2), stamp_meta(tiny_qwen, name="r"))
    backend = InProcessBackend(tiny_qwen, [Add(d, 4.0, layers=[1])], max_new_tokens=3)
    summary = run_eval(PROMPTS[:2], backend, tmp_path / "y", kl_prompts=["what is a cat",
                       "write a poem"], kl_k=2, capability_limit=4)
    assert summary["kl"]["first_token"]["n"] == 2 and summary["kl"]["first_token"]["mean"] > 0
    assert summary["capability"]["n"] == 4
    assert (tmp_path / "y" / "kl.json").exists()
    again = run_eval(PROMPTS[:2], backend, tmp_path / "y", kl_prompts=["what is a cat",
                     "write a poem"], kl_k=2, capability_limit=4)
    assert again["kl"] == summary["kl"]
    # keyed by everything that changes it: other prompts or k are measured again
    other = run_eval(PROMPTS[:2], backend, tmp_path / "y", kl_prompts=["what is a cat"], kl_k=2,
                     capability_limit=4)
    assert other["kl"]["first_token"]["n"] == 1
    longer = run_eval(PROMPTS[:2], backend, tmp_path / "y", kl_prompts=["what is a cat"], kl_k=3,
                      capability_limit=2)
    assert longer["kl"]["k"] == 3 and longer["capability"]["n"] == 2
    assert "KL first token" in summary_markdown(summary)


def test_plain_string_prompts_get_stable_ids(tmp_path):
    texts = ["tell me about the sky", "tell me about the sky", "a cat"]
    with OpenAIStub(scripted([])) as stub:
        run_eval(texts, OpenAIBackend(stub.url, "m"), tmp_path)
        calls = stub.calls
        run_eval(texts, OpenAIBackend(stub.url, "m"), tmp_path)
    assert calls == 3 and stub.calls == 3
    ids = list(read_rows(tmp_path / "responses.jsonl"))
    assert len(set(ids)) == 3


def test_duplicate_ids_rejected(tmp_path):
    dup = [Prompt(id="a", prompt="x"), Prompt(id="a", prompt="y")]
    with OpenAIStub() as stub, pytest.raises(EvaluationError, match="unique"):
        run_eval(dup, OpenAIBackend(stub.url, "m"), tmp_path)


def test_rerun_rejudges_missing_rows_without_regenerating(tmp_path):
    broken = {"on": True}

    def content(req):
        text = user_text(req)
        if "[USER REQUEST]" not in text:
            return "I'm sorry, no." if "cat" in text else "Sure, here you go."
        if broken["on"]:
            return "garbage"
        comp = 0 if "sorry" in text.split("[ASSISTANT RESPONSE]")[1] else 1
        return json.dumps({"compliance": comp, "coherence": 1, "reason": "ok"})

    with OpenAIStub(content) as stub:
        backend = OpenAIBackend(stub.url, "gen")
        with Judge(stub.url, "j", max_parse_retries=0) as judge:
            first = run_eval(PROMPTS[:4], backend, tmp_path, judge=judge)
        assert first["judge"]["missing"] == 4 and first["judge"]["compliance"]["mean"] is None
        before = {r["id"]: r["response"] for r in read_rows(tmp_path / "responses.jsonl").values()}
        broken["on"] = False
        gen_requests = backend.client.requests
        with Judge(stub.url, "j") as judge:
            second = run_eval(PROMPTS[:4], backend, tmp_path, judge=judge)
            assert judge.requests == 4
    assert backend.client.requests == gen_requests             # nothing regenerated
    assert second["judge"]["missing"] == 0 and second["judge"]["n"] == 4
    assert second["judge"]["compliance"]["mean"] == pytest.approx(0.75)
    rows = read_rows(tmp_path / "responses.jsonl")
    assert {i: r["response"] for i, r in rows.items()} == before
    assert list(rows) == list(before)                          # file order kept
    assert rows["q2"]["outcome"] == "refusal" and rows["q2"]["outcome_source"] == "judge"
