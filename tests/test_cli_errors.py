"""The CLI's one error boundary: every user mistake or unreadable input is one line on stderr
and exit 2, printed literally (no rich markup); ``--system`` values that look like paths must
be files; prompts longer than the model's context and huge prompt lines are handled."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
import yaml
from safetensors import SafetensorError

from steerlab.cli import main, run_app
from steerlab.cli.common import read_system
from steerlab.errors import DataError, DirectionError
from steerlab.generation.generate import generate
from steerlab.prompts.chat import encode
from tests.tiny import save_tiny, tiny_model


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> Path:
    return save_tiny(tiny, tmp_path_factory.mktemp("model") / "tiny")


# -- the boundary --------------------------------------------------------------------------------
def _raiser(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise exc

    return app


def _json_error() -> Exception:
    try:
        json.loads("{bad")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError


def _yaml_error() -> Exception:
    try:
        yaml.safe_load("a: [")
    except yaml.YAMLError as exc:
        return exc
    raise AssertionError


KNOWN = {
    "steerlab error with markup": (DirectionError("bad [/bold] and [abc] and [red]x[/red]\nz"),
                                   "bad [/bold] and [abc] and [red]x[/red] z"),
    "file not found": (FileNotFoundError(2, "No such file or directory", "runs/[abc].json"),
                       "cannot use runs/[abc].json: No such file or directory"),
    "permission": (PermissionError(13, "Permission denied", "private/secret"),
                   "cannot use private/secret: Permission denied"),
    "json": (_json_error(), "JSON"),
    "yaml": (_yaml_error(), "cannot read an input"),
    "unicode": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
    "safetensors": (SafetensorError("header too large"), "header too large"),
}


@pytest.mark.parametrize("case", list(KNOWN), ids=list(KNOWN))
def test_known_errors_are_one_literal_line_and_exit_2(case, capsys):
    exc, expected = KNOWN[case]
    with pytest.raises(SystemExit) as caught:
        run_app(_raiser(exc), [])
    assert caught.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_app(_raiser(ZeroDivisionError("bug")), [])


def test_markup_in_a_real_error_is_printed_literally(tmp_path, capsys):
    missing = tmp_path / "no[/bold]such[abc].jsonl"
    assert run_cli("data", "show", str(missing)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no[/bold]such[abc].jsonl" in line


def test_success_messages_print_paths_and_prompts_literally(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p[abc].txt"
    prompts.write_text("what does [/] mean in [bold]rich[/bold]?\n")
    assert run_cli("data", "show", str(prompts)) == 0
    out = capsys.readouterr().out
    assert "p[abc].txt" in out and "what does [/] mean in [bold]rich[/bold]?" in out
    target = tmp_path / "runs[x]" / "o.jsonl"
    assert run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype", "float32",
                   "--max-new-tokens", "2", "--out", str(target)) == 0
    assert f"wrote {target}" in capsys.readouterr().out.replace("\n", "")


def test_out_under_a_file_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    code = run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype", "float32",
                   "--max-new-tokens", "2", "--out", str(tmp_path / "file" / "o.jsonl"))
    assert code == 2
    one_error_line(capsys.readouterr().err)
    assert (tmp_path / "file").read_text() == "x"


def test_long_error_is_not_wrapped(capsys):
    with pytest.raises(SystemExit):
        run_app(_raiser(DataError("word " * 100)), [])
    assert one_error_line(capsys.readouterr().err).count("word") == 100


# -- --system --------------------------------------------------------------------------------------
def test_system_rule(tmp_path):
    good = tmp_path / "sys.txt"
    good.write_text("  You are terse.\n")
    assert read_system(None) is None
    assert read_system("You are a helpful assistant. Answer yes/no.") \
        == "You are a helpful assistant. Answer yes/no."
    assert read_system("Be brief") == "Be brief"
    assert read_system(str(good)) == "You are terse."
    assert read_system(f"@{good}") == "You are terse."
    for mistyped in (str(tmp_path / "sys.tx"), "prompts/system.txt", "system.md",
                     f"@{tmp_path / 'none'}", "./x"):
        with pytest.raises(DataError, match="looks like a file path"):
            read_system(mistyped)
    with pytest.raises(DataError, match="is a folder"):
        read_system(str(tmp_path) + "/")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="binary"):
        read_system(str(binary))
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_system(f"@{latin}")


def test_mistyped_system_path_fails_before_writing(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "o.jsonl"
    for value in (str(tmp_path / "sytem.txt"), "@missing"):
        code = run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype",
                       "float32", "--system", value, "--out", str(out))
        assert code == 2
        assert "--system" in one_error_line(capsys.readouterr().err)
        assert not out.exists()


def test_system_rule_is_in_the_help(capsys):
    assert run_cli("generate", "--help") == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "@FILE" in text and "must exist" in text, text


# -- a prompt longer than the model's context ------------------------------------------------------
def test_prompt_longer_than_context_refused(tiny, tiny_dir, tmp_path, capsys):
    assert tiny.context_length == 256
    long_prompt = " ".join(["hello"] * 400)
    with pytest.raises(DataError, match="context of 256 tokens"):
        generate(tiny, ["hi", long_prompt], max_new_tokens=2)
    with pytest.raises(DataError, match=r"Prompt 1 is \d+ tokens long"):
        encode(tiny.tokenizer, ["hi", long_prompt], max_length=tiny.context_length)
    assert encode(tiny.tokenizer, ["hi"], max_length=tiny.context_length).input_ids.shape[0] == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"hi\n{long_prompt}\n")
    out = tmp_path / "o.jsonl"
    code = run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype", "float32",
                   "--max-new-tokens", "2", "--out", str(out))
    assert code == 2
    assert "max_position_embeddings" in one_error_line(capsys.readouterr().err)


# -- data show on a huge line ----------------------------------------------------------------------
def test_data_show_on_a_5mb_line_is_fast(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    rows = [{"id": "a", "prompt": "short one"},
            {"id": "b" * 1000, "prompt": "x[y] " * 1_000_000, "category": "c" * 500}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert path.stat().st_size > 5_000_000
    start = time.perf_counter()
    assert run_cli("data", "show", str(path), "--examples", "2") == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert elapsed < 10, elapsed
    assert len(out) < 5000 and "more characters" in out and "x[y]" in out
