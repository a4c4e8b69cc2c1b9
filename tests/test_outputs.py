"""The output-path policy and the run identity, one regression test per class of the
hostile pass: data loss, stale results, mixed rows, silent overwrites, wrong paths,
and artifact modes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import steerlab.store.rowstore as rowstore
from steerlab.cli import main
from steerlab.errors import SteerlabError
from steerlab.evaluate.backends import OpenAIBackend
from steerlab.evaluate.run import run_eval
from steerlab.generation.generate import generate
from steerlab.prompts.sets import Prompt
from steerlab.store.atomic import temp_dir, umask, write_json, write_text
from steerlab.store.outputs import OutputError, clear_run_dir
from tests.openai_stub import OpenAIStub
from tests.tiny import tiny_model

PROMPTS = ["hello world", "write a poem about the sky", "what is the number"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, " ".join(capsys.readouterr().err.split())  # as one line, however wrapped


# -- data loss --------------------------------------------------------------------------------
def test_data_loss_generate_never_writes_over_a_file_it_did_not_write(tmp_path: Path,
                                                                       capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                               for i, t in enumerate(PROMPTS)))
    before = prompts.read_bytes()
    with pytest.raises(OutputError, match=r"not written by steerlab generate.*--overwrite"):
        generate(tiny_model("qwen2"), PROMPTS, max_new_tokens=2, out_jsonl=prompts)
    assert prompts.read_bytes() == before
    # --out = --prompts on the command line: refused before the model loads
    code, err = run_cli(capsys, "generate", "default", "--prompts", str(prompts), "--out",
                        str(prompts))
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert prompts.read_bytes() == before
    # a steerlab file of another kind is not ours either
    eval_rows = tmp_path / "eval.jsonl"
    rowstore.RowStore(eval_rows, "eval", {}, rowstore.dict_codec("id"))
    with pytest.raises(OutputError, match="not written by steerlab generate"):
        generate(tiny_model("qwen2"), PROMPTS, max_new_tokens=2, out_jsonl=eval_rows)
    # --overwrite replaces
    rows = generate(tiny_model("qwen2"), PROMPTS, max_new_tokens=2, out_jsonl=prompts,
                    overwrite=True)
    assert sorted(r["index"] for r in rowstore.read_rows(prompts)) == [r.index for r in rows]


# -- stale results ----------------------------------------------------------------------------
def test_stale_results_eval_never_reuses_answers_to_other_prompt_texts(tmp_path: Path) -> None:
    first = [Prompt(id=f"q{i}", prompt=f"tell me about the {w}")
             for i, w in enumerate(["cat", "sky"])]
    edited = [Prompt(id=p.id, prompt=p.prompt + ", briefly") for p in first]
    with OpenAIStub(lambda req: "Sure.") as stub:
        run_eval(first, OpenAIBackend(stub.url, "m"), tmp_path, extra_config={"src": "a"})
        config = (tmp_path / "config.json").read_bytes()
        rows = (tmp_path / "responses.jsonl").read_bytes()
        calls = stub.calls
        with pytest.raises(SteerlabError, match=r"another text of that prompt.*--overwrite"):
            run_eval(edited, OpenAIBackend(stub.url, "m"), tmp_path, extra_config={"src": "b"})
        assert stub.calls == calls  # nothing generated
        assert (tmp_path / "config.json").read_bytes() == config  # still points at the old run
        assert (tmp_path / "responses.jsonl").read_bytes() == rows
        summary = run_eval(edited, OpenAIBackend(stub.url, "m"), tmp_path, overwrite=True)
    assert summary["n"] == 2 and stub.calls == calls + 2
    assert {r["prompt"] for r in rowstore.read_rows(tmp_path / "responses.jsonl")} == \
        {p.prompt for p in edited}


# -- mixed rows ---------------------------------------------------------------------------------
def test_mixed_rows_generate_resumed_in_another_dtype_refuses(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    generate(tiny_model("qwen2", dtype=torch.float32), PROMPTS, max_new_tokens=2, out_jsonl=out)
    before = out.read_bytes()
    half = tiny_model("qwen2", dtype=torch.bfloat16)  # same weights, same fingerprint
    with pytest.raises(OutputError, match="dtype: \"float32\" -> \"bfloat16\""):
        generate(half, PROMPTS, max_new_tokens=2, out_jsonl=out)
    assert out.read_bytes() == before


def test_mixed_rows_identity_is_checked_before_a_torn_tail_is_repaired(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    generate(tiny_model("qwen2"), PROMPTS, max_new_tokens=2, out_jsonl=out)
    with out.open("a") as handle:
        handle.write('{"index": 3, "prom')  # a torn tail
    before = out.read_bytes()
    with pytest.raises(OutputError, match="max new tokens: 2 -> 3"):
        generate(tiny_model("qwen2"), PROMPTS, max_new_tokens=3, out_jsonl=out)
    assert out.read_bytes() == before  # not repaired under a run it does not belong to


# -- silent overwrites ----------------------------------------------------------------------------
def test_silent_overwrite_extract_refuses_an_existing_direction_folder(tmp_path: Path,
                                                                       capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "refusal"
    folder.mkdir()
    (folder / "direction.json").write_text("{}")
    code, err = run_cli(capsys, "extract", "default", "--out", str(folder))
    assert code == 2 and "--overwrite" in err and "not empty" in err
    assert (folder / "direction.json").read_text() == "{}"


def test_silent_overwrite_compare_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    from steerlab.evaluate.compare import compare_models

    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        compare_models({"a": "x", "b": "y"}, out_dir=tmp_path)


# -- wrong paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["extract", "default"], ["scan", "default"],
                                     ["eval", "default", "--prompts", "harmless"]])
def test_wrong_paths_are_one_clear_line(tmp_path: Path, capsys, command: list[str]) -> None:  # type: ignore[no-untyped-def]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        str(a_file): "is a file",
        str(a_file / "under"): "is a file",
        "/proc/steerlab-no-such-place/out": "Cannot create the folder",
    }
    for out, message in cases.items():
        code, err = run_cli(capsys, *command, "--out", out)
        assert code == 2 and message in err and "Traceback" not in err, (out, err)
    assert a_file.read_text() == "x"


def test_wrong_paths_generate_out_on_a_folder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = run_cli(capsys, "generate", "default", "--prompts", "harmless", "--out",
                        str(tmp_path))
    assert code == 2 and "is a folder" in err


def test_wrong_rows_eval_baseline_row_without_id_is_one_clear_line(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "responses.jsonl").write_text('{"prompt": "hi", "refusal": false}\n')
    with OpenAIStub(lambda req: "Sure.") as stub, \
            pytest.raises(SteerlabError, match='row 1 has no "id"'):
        run_eval(["hi"], OpenAIBackend(stub.url, "m"), tmp_path / "run", baseline=base)


def test_wrong_rows_a_resumed_row_without_id_is_one_clear_line(tmp_path: Path) -> None:
    with OpenAIStub(lambda req: "Sure.") as stub:
        run_eval(["hi"], OpenAIBackend(stub.url, "m"), tmp_path)
        with (tmp_path / "responses.jsonl").open("a") as handle:
            handle.write('{"prompt": "hi"}\n')
        with pytest.raises(SteerlabError, match=r"line 3 is not a steerlab eval row.*no id"):
            run_eval(["hi"], OpenAIBackend(stub.url, "m"), tmp_path)


# -- artifact modes -------------------------------------------------------------------------------
def test_artifact_modes_follow_the_umask_not_mkstemp(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        write_json(tmp_path / "results.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o640
        assert stat.S_IMODE(temp_dir(tmp_path / "export").stat().st_mode) == 0o750
        os.umask(0o022)
        write_text(tmp_path / "report.md", "# r\n")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
        (tmp_path / "results.json").chmod(0o600)  # a mode the user chose is kept on rewrite
        write_json(tmp_path / "results.json", {"a": 2})
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_silent_overwrite_experiment_overwrite_clears_only_a_run_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--overwrite`` on an experiment deletes its run folder (cached steps included) but
    never the working directory, one of its parents, or a git checkout."""
    run = tmp_path / "work" / "run"
    (run / "steps").mkdir(parents=True)
    (run / "steps" / "baseline.json").write_text("{}")
    (tmp_path / "work" / ".git").mkdir()
    monkeypatch.chdir(run)
    for refused in (run, tmp_path / "work", tmp_path):
        with pytest.raises(OutputError, match="working directory or a git checkout"):
            clear_run_dir(refused)
    monkeypatch.chdir(tmp_path)
    clear_run_dir(run)
    assert not run.exists() and (tmp_path / "work" / ".git").is_dir()
    clear_run_dir(run)  # a missing folder is nothing to clear
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        clear_run_dir(tmp_path / "file")
