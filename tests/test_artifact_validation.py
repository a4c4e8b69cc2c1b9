"""Direction artifacts and model files that are broken: one validator refuses them with one
clear error, in the library, the CLI (one line, exit 2) and ``serve`` at start-up; and a
save killed at any step leaves the old direction or the new one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steerlab.cli import main
from steerlab.directions.artifact import Direction, DirectionMeta, ModelMismatchWarning
from steerlab.errors import DirectionError, ModelLoadError
from steerlab.model.loading import load_model
from tests.tiny import save_tiny, tiny_model


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> Path:
    return save_tiny(tiny, tmp_path_factory.mktemp("model") / "tiny")


def good(tiny, folder: Path, name: str = "good") -> Path:
    vectors = torch.randn(tiny.n_layers, tiny.d_model)
    meta = DirectionMeta(name=name, best_layer=1, model_fingerprint=tiny.fingerprint)
    Direction(vectors, tuple(range(tiny.n_layers)), meta).save(folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _nan(folder: Path) -> None:
    vectors = torch.full((3, 64), float("nan"))
    save_file({"vectors": vectors}, str(folder / "direction.safetensors"))


def _inf(folder: Path) -> None:
    vectors = torch.randn(3, 64)
    vectors[1, 7] = float("inf")
    save_file({"vectors": vectors}, str(folder / "direction.safetensors"))


def _truncated(folder: Path) -> None:
    path = folder / "direction.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _garbage(folder: Path) -> None:
    (folder / "direction.safetensors").write_bytes(os.urandom(2000))


def _no_vectors(folder: Path) -> None:
    save_file({"weights": torch.randn(3, 64)}, str(folder / "direction.safetensors"))


def _wrong_rank(folder: Path) -> None:
    save_file({"vectors": torch.randn(3, 4, 64)}, str(folder / "direction.safetensors"))


def _int_vectors(folder: Path) -> None:
    save_file({"vectors": torch.ones(3, 64, dtype=torch.int32)},
              str(folder / "direction.safetensors"))


def _edit_json(change):
    def edit(folder: Path) -> None:
        path = folder / "direction.json"
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info))
    return edit


def _not_json(folder: Path) -> None:
    (folder / "direction.json").write_text("{ not json")


def _binary_json(folder: Path) -> None:
    (folder / "direction.json").write_bytes(b"\xff\xfe\x00garbage")


def _layers_mismatch(folder: Path) -> None:
    _edit_json(lambda info: info.update(layers=[0, 1]))(folder)


BROKEN = {
    "nan vectors": (_nan, "NaN or infinite"),
    "one inf value": (_inf, "NaN or infinite"),
    "truncated safetensors": (_truncated, "truncated or corrupt"),
    "garbage safetensors": (_garbage, "truncated or corrupt"),
    "no vectors tensor": (_no_vectors, "no 'vectors' tensor"),
    "vectors of rank 3": (_wrong_rank, "shape [n_layers, d_model]"),
    "integer vectors": (_int_vectors, "floating-point"),
    "meta is a list": (_edit_json(lambda i: i.update(meta=[1, 2])), "malformed"),
    "meta name is a number": (_edit_json(lambda i: i["meta"].update(name=7)), "meta.name"),
    "meta counts not ints": (_edit_json(lambda i: i["meta"].update(counts={"a": "many"})),
                             "meta.counts"),
    "meta best_layer a dict": (_edit_json(lambda i: i["meta"].update(best_layer={})),
                               "meta.best_layer"),
    "layers missing": (_edit_json(lambda i: i.pop("layers")), "layers"),
    "layers empty": (_edit_json(lambda i: i.update(layers=[])), "layers"),
    "format version text": (_edit_json(lambda i: i.update(format_version="one")),
                            "format_version"),
    "json syntax": (_not_json, "not readable JSON"),
    "json not utf-8": (_binary_json, "not readable JSON"),
    "layers disagree with vectors": (_layers_mismatch, "do not belong together"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_direction_validator_refuses(case, tiny, tmp_path):
    breaker, needle = BROKEN[case]
    folder = good(tiny, tmp_path / "d")
    breaker(folder)
    with pytest.raises(DirectionError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Direction.load(folder, tiny)


def test_nan_direction_refused_in_memory_and_unknown_meta_keys_ignored(tiny, tmp_path):
    with pytest.raises(DirectionError, match="NaN"):
        Direction(torch.full((1, 8), float("nan")), (0,))
    folder = good(tiny, tmp_path / "d")
    _edit_json(lambda i: i["meta"].update(future_field={"x": 1}))(folder)
    assert Direction.load(folder, tiny).meta.name == "good"


@pytest.mark.parametrize("case", ["nan vectors", "garbage safetensors", "meta is a list",
                                  "no vectors tensor"])
def test_generate_and_serve_give_one_line(case, tiny, tiny_dir, tmp_path, capsys):
    folder = good(tiny, tmp_path / "d")
    BROKEN[case][0](folder)
    before = snapshot(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    code = run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype", "float32",
                   "--steer", f"add:{folder}@1:2.0", "--out", str(out))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(folder) in lines[0]
    assert not out.exists() and snapshot(folder) == before
    code = run_cli("serve", str(tiny_dir), "--dtype", "float32", "--direction", f"p={folder}",
                   "--port", "1")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")], err


def test_corrupt_gguf_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    for path in (garbage, truncated):
        with pytest.raises(ModelLoadError, match="GGUF file"):
            load_model(str(path))
        assert run_cli("info", str(path)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1, err


def test_allow_mismatch_warns_naming_both_fingerprints(tiny, tmp_path, capsys):
    other = tiny_model("qwen2", seed=1)
    assert other.fingerprint != tiny.fingerprint
    folder = good(tiny, tmp_path / "d")
    with pytest.raises(DirectionError, match="allow-mismatch"):
        Direction.load(folder, other)
    with pytest.warns(ModelMismatchWarning) as caught:
        Direction.load(folder, other, allow_mismatch=True)
    text = str(caught[0].message)
    assert tiny.fingerprint in text and other.fingerprint in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Direction.load(folder, tiny, allow_mismatch=True)  # same model: no warning


def test_allow_mismatch_warning_on_the_command_line(tiny, tiny_dir, tmp_path, capsys):
    other = tiny_model("qwen2", seed=1)
    folder = good(other, tmp_path / "d")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    code = run_cli("generate", str(tiny_dir), "--prompts", str(prompts), "--dtype", "float32",
                   "--steer", f"add:{folder}@1:2.0", "--out", str(tmp_path / "o.jsonl"),
                   "--max-new-tokens", "2", "--allow-mismatch")
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if x.startswith("warning:")]
    assert code == 0 and len(warned) == 1, err
    assert other.fingerprint in warned[0] and "fingerprint" in warned[0]


# -- Direction.save as one unit ------------------------------------------------------------------
def test_save_keeps_other_files_and_leaves_no_staging(tiny, tmp_path):
    folder = good(tiny, tmp_path / "d", "old")
    (folder / "scan.json").write_text("{}")
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"png")
    good(tiny, folder, "new")
    assert Direction.load(folder).meta.name == "new"
    assert (folder / "scan.json").read_text() == "{}"
    assert (folder / "plots" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(DirectionError, match="not a folder"):
        good(tiny, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


KILL_SCRIPT = textwrap.dedent("""
    import json, os, shutil, signal, sys
    import torch
    from steerlab.directions.artifact import Direction, DirectionMeta

    work = sys.argv[1]
    folder, snaps = os.path.join(work, "dir"), os.path.join(work, "snaps")
    WRITES = {"open", "mkdir", "rename", "replace", "link", "unlink", "rmdir", "fsync",
              "serialize_file", "write", "close", "dlopen", "copy2", "copyfile", "chmod"}
    old = Direction(torch.full((2, 8), 1.0), (0, 1), DirectionMeta(name="old"))
    new = Direction(torch.full((3, 8), 2.0), (0, 1, 2), DirectionMeta(name="new", best_layer=2))
    results = []
    for n_kill in range(1, 400):
        old.save(folder)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("mine")
        pid = os.fork()
        if pid == 0:  # the writer: SIGKILLed just before its n-th filesystem call
            count = 0

            def profile(frame, event, arg):
                global count
                if event == "c_call" and getattr(arg, "__name__", "") in WRITES:
                    count += 1
                    if count == n_kill:
                        os.kill(os.getpid(), signal.SIGKILL)

            sys.setprofile(profile)
            new.save(folder)
            sys.setprofile(None)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        shutil.copytree(folder, os.path.join(snaps, str(n_kill)))
        results.append({"n": n_kill, "killed": killed, "status": status})
        if not killed:
            break
    old.save(folder)  # cleans the staging folders the killed writers left
    print(json.dumps(results))
""")


def _state(folder: Path) -> str:
    """'old' or 'new' if both files on disk agree on one direction, else what is wrong."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "direction.json").read_text())
    vectors = load_file(str(folder / "direction.safetensors"))["vectors"]
    loaded = Direction.load(folder)
    name = meta["meta"]["name"]
    fill = {"old": 1.0, "new": 2.0}[name]
    if not torch.equal(vectors, torch.full_like(vectors, fill)) or loaded.meta.name != name:
        return f"torn: {name} metadata over other vectors"
    if meta["layers"] != ([0, 1] if name == "old" else [0, 1, 2]):
        return "torn: layers"
    return name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_save_killed_at_each_step_leaves_old_or_new(tmp_path):
    """SIGKILL a real writer process just before each filesystem call of ``Direction.save``."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(work)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    assert all(r["killed"] for r in results[:-1]) and not results[-1]["killed"]
    assert len(results) >= 8, results  # the writer was killed at every one of its steps
    states = []
    for r in results:
        snap = work / "snaps" / str(r["n"])
        states.append(_state(snap))
        assert (snap / "notes.txt").read_text() == "mine"
    assert set(states) == {"old", "new"}, states
    assert states[-1] == "new" and states[0] == "old"
    assert sorted(p.name for p in work.iterdir()) == ["dir", "snaps"]
