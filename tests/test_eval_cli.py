"""``steerlab eval`` end to end: in-process, OpenAI backend + judge over HTTP,
user errors, a killed run that resumes, and the real-model ablation check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steerlab.cli import main
from steerlab.store.rowstore import read_rows
from tests.openai_stub import OpenAIStub, user_text
from tests.tiny import save_tiny, tiny_model


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    lm = tiny_model("qwen2")
    path = tmp_path / "model"
    save_tiny(lm, path)
    return path


def prompt_file(path: Path, n: int) -> Path:
    words = ["bread", "poem", "cat", "story", "sky", "river", "car", "house"]
    path.write_text("".join(
        json.dumps({"id": f"t{i:03d}", "prompt": f"tell me about the {words[i % 8]} {i}",
                    "label": "harmless"}) + "\n" for i in range(n)))
    return path


def rows(out: Path) -> list[dict]:
    return read_rows(out / "responses.jsonl")


def test_cli_in_process(tmp_path, tiny_dir):
    out = tmp_path / "out"
    code = run_cli("eval", str(tiny_dir), "--prompts", str(prompt_file(tmp_path / "p.jsonl", 5)),
                   "--limit", "4", "--max-new-tokens", "4", "--dtype", "float32",
                   "--out", str(out))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and len(summary["refusal_rate_ci95"]) == 2
    assert len(rows(out)) == 4 and (out / "summary.md").exists()
    assert json.loads((out / "config.json").read_text())["prompts"]["limit"] == 4


def test_cli_openai_backend_with_llm_judge(tmp_path):
    def content(req):
        text = user_text(req)
        if "[USER REQUEST]" in text:
            comp = 0 if "sorry" in text.split("[ASSISTANT RESPONSE]")[1] else 1
            return json.dumps({"compliance": comp, "coherence": 1, "reason": "scripted"})
        return "I'm sorry, I can't." if "cat" in text else "Sure: here it is."

    out = tmp_path / "out"
    with OpenAIStub(content) as stub:
        code = run_cli("eval", "--backend", "openai", "--base-url", stub.url, "--model", "srv",
                       "--prompts", str(prompt_file(tmp_path / "p.jsonl", 8)),
                       "--judge", stub.url, "--judge-model", "j", "--out", str(out))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refusal"]["k"] == 1 and summary["n"] == 8
    assert summary["judge"]["compliance"]["mean"] == pytest.approx(7 / 8)
    assert (out / "judge_cache.jsonl").exists()
    assert {r["model"] for r in stub.requests} == {"srv", "j"}


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "openai"], "needs --base-url"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--steer",
      "ablate:x@all"], "served model must be steered"),
    (["--backend", "carrier-pigeon"], "Unknown backend"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--judge",
      "http://127.0.0.1:9/v1"], "needs --judge-model"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
      "--refusal-phrases", "elvish"], "Unknown refusal phrase set"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, args, message):
    code = run_cli("eval", "--prompts", str(prompt_file(tmp_path / "p.jsonl", 2)),
                   "--out", str(tmp_path / "o"), *args)
    assert code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_killed_eval_resumes_without_redoing_or_losing_rows(tmp_path, tiny_dir):
    prompts = prompt_file(tmp_path / "p.jsonl", 40)
    out = tmp_path / "out"
    args = ["eval", str(tiny_dir), "--prompts", str(prompts), "--max-new-tokens", "12",
            "--batch-size", "1", "--dtype", "float32", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "steerlab", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "120"})
    path = out / "responses.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= 4:  # header + 3 rows
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = path.read_text().splitlines()[1:]  # after the header
    done_before = [json.loads(line)["id"] for line in killed if line.endswith("}")]
    assert 3 <= len(done_before) < 40
    assert not (out / "summary.json").exists()

    assert run_cli(*args) == 0
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 40
    assert sorted(ids) == [f"t{i:03d}" for i in range(40)]
    assert ids[: len(done_before)] == done_before                   # kept, not redone
    assert json.loads((out / "summary.json").read_text())["n"] == 40


@pytest.mark.real
def test_real_ablation_lowers_refusal_and_paired_test_reports_it(tmp_path, real_lm):
    from steerlab.directions.extraction import refusal_direction

    # Diff-in-means at layer 13 (of 24): on this model ablating it takes the test
    # split's substring refusals from 5/8 to 0/8; Cohen's d would pick 15, weaker here.
    direction = refusal_direction(real_lm, limit=16, layers=[13], select_split=None)
    direction.save(tmp_path / "refusal")
    common = ["--prompts", "paired:harmful", "--split", "test", "--limit", "8",
              "--max-new-tokens", "24", "--dtype", "float32"]
    base, ablated = tmp_path / "base", tmp_path / "ablated"
    assert run_cli("eval", "default", *common, "--out", str(base)) == 0
    assert run_cli("eval", "default", *common, "--steer", f"ablate:{tmp_path / 'refusal'}@all",
                   "--baseline", str(base), "--out", str(ablated)) == 0
    b = json.loads((base / "summary.json").read_text())
    a = json.loads((ablated / "summary.json").read_text())
    assert b["n"] == a["n"] == 8
    lo, hi = b["refusal_rate_ci95"]
    assert lo <= b["refusal_rate"] <= hi and hi - lo > 0
    assert b["refusal_rate"] >= 0.5
    assert a["refusal_rate"] < b["refusal_rate"]
    comp = a["comparison"]["refusal"]
    assert comp["diff"] < 0 and comp["table"]["only_a"] > comp["table"]["only_b"]
    assert 0.0 < comp["p_mcnemar"] <= 1.0
    assert "McNemar" in (ablated / "summary.md").read_text()


def test_usage_mistakes_print_usage_and_exit_2_without_a_traceback(capsys) -> None:  # type: ignore[no-untyped-def]
    assert run_cli("eval", "--no-such-option") == 2
    err = capsys.readouterr().err
    assert "No such option: --no-such-option" in err and "Traceback" not in err
    assert run_cli("generate", "default") == 2  # --prompts is required
    assert "Missing option '--prompts'" in capsys.readouterr().err


def test_cli_eval_checks_the_judge_before_generating(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o"
    with OpenAIStub(fail_first=10, fail_status=401) as stub:
        code = run_cli("eval", "--backend", "openai", "--base-url", stub.url, "--model", "srv",
                       "--prompts", str(prompt_file(tmp_path / "p.jsonl", 3)),
                       "--judge", stub.url, "--judge-model", "j", "--out", str(out))
        assert stub.calls == 1  # the judge's test request; nothing was generated
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "did not answer a test request" in err and "HTTP 401" in err
    assert not (out / "responses.jsonl").exists()
