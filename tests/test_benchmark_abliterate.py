"""benchmarks/abliterate.py: argument handling and the prompt files both tools read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from steerlab.abliterate import AbliterateConfig
from steerlab.abliterate.search import prompt_sets as search_prompt_sets

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_abliterate", BENCH / "abliterate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def fake_data(folder: Path) -> Path:
    folder.mkdir()
    for name, n in (("harmful_train", 130), ("harmless_train", 129), ("harmful_val", 39),
                    ("harmless_val", 60)):
        rows = [{"instruction": f"{name} prompt {i}", "category": "x"} for i in range(n)]
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


def test_arguments(bench, monkeypatch):
    args = bench.parse_args(["--steps", "steerlab,score"])
    assert args.trials == 40 and args.steps == ["steerlab", "score"]
    assert args.data == bench.ROOT.parent / "shared" / "data"
    for bad in (["--trials", "0"], ["--steps", "steerlab,nope"], ["--steps", ","]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "heretic", "--peers-python", ""])
    assert bench.parse_args(["--steps", "heretic", "--peers-python", "/x/bin/python"]).steps \
        == ["heretic"]


def test_both_tools_read_the_same_prompts(bench, tmp_path):
    sets = bench.prompt_sets(fake_data(tmp_path / "data"))
    assert [len(sets[k]) for k in bench.SETS] == [128, 128, 39, 48]
    files = bench.write_prompt_files(sets, tmp_path / "work")
    config = AbliterateConfig(**bench.steerlab_config(files, 40, 32))
    loaded = search_prompt_sets(config.model_copy(update={"over_refusal_limit": 0}))
    for name in bench.SETS:
        assert loaded[name] == sets[name]
        heretic = (tmp_path / "work" / "heretic-data" / name / "data.jsonl").read_text()
        assert [json.loads(line)["text"] for line in heretic.splitlines()] == sets[name]
    cmd = bench.heretic_command(Path("/venv/bin/python"), Path("/m"), tmp_path / "work", 40, 32)
    assert cmd[0] == "/venv/bin/heretic" and cmd[cmd.index("--n-trials") + 1] == "40"
    assert str(tmp_path / "work" / "heretic-data" / "harmful_val") in cmd
    with pytest.raises(SystemExit, match="harmful_train"):
        bench.prompt_sets(tmp_path)
