"""A writer killed (SIGKILL, a real subprocess) at each write step of a JSONL append and
of a report/results write leaves the old artifact or the new one, never a third thing;
a resumed row store then loses and repeats nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import steerlab
from steerlab.store.rowstore import RowStore, dict_codec

IDENTITY = {"model_fingerprint": "0123", "dtype": "float32"}
CODEC = dict_codec("id")
OLD_ROWS = [{"id": f"r{i}", "response": "x" * 50} for i in range(3)]
NEW_ROW = {"id": "new", "response": "y" * 5000}  # long enough to take several writes
OLD_REPORT = {"refusal_rate": 0.25, "n": 4}
NEW_REPORT = {"refusal_rate": 0.5, "n": 8, "rows": ["z" * 100] * 200}

# The child imports only the modules under test (not the package's torch-heavy __init__),
# then counts every I/O call the write makes and kills itself at call number KILL_AT.
CHILD = """
import json, os, signal, sys, types
mode, path, kill_at, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
package = types.ModuleType("steerlab")
package.__path__ = [src]
sys.modules["steerlab"] = package
from steerlab.store.atomic import write_json
from steerlab.store.rowstore import RowStore, dict_codec
STEPS = {"open", "write", "flush", "fsync", "fchmod", "replace", "truncate", "close"}
count = [0]
def profile(frame, event, arg):
    if event == "c_call" and getattr(arg, "__name__", "") in STEPS:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
if mode == "append":
    store = RowStore(path, "t", json.loads(sys.argv[5]), dict_codec("id"))
    row = json.loads(sys.argv[6])
    sys.setprofile(profile)
    store.append([row])
else:
    report = json.loads(sys.argv[5])
    sys.setprofile(profile)
    write_json(path, report)
sys.setprofile(None)
print(count[0])
"""


def _kill_at(step: int, *args: str) -> int:
    """Run the child killed at I/O call ``step``; its return code (-9 when killed)."""
    src = str(Path(steerlab.__file__).parent)
    proc = subprocess.run([sys.executable, "-c", CHILD, args[0], args[1], str(step), src,
                           *args[2:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


def test_kill_at_each_step_of_a_jsonl_append_leaves_old_or_new_and_resume_is_exact(
    tmp_path: Path,
) -> None:
    states = set()
    for step in range(1, 50):
        path = tmp_path / f"rows-{step}.jsonl"
        RowStore(path, "t", IDENTITY, CODEC).append(OLD_ROWS)
        code = _kill_at(step, "append", str(path), json.dumps(IDENTITY), json.dumps(NEW_ROW))
        reopened = RowStore(path, "t", IDENTITY, CODEC)  # checks, then repairs a torn tail
        ids = [r["id"] for r in reopened.rows()]
        assert ids in (["r0", "r1", "r2"], ["r0", "r1", "r2", "new"]), (step, ids)
        states.add(len(ids))
        if "new" not in reopened:  # resume: the missing row once, nothing twice
            reopened.append([NEW_ROW])
        again = RowStore(path, "t", IDENTITY, CODEC)
        assert [r["id"] for r in again.rows()] == ["r0", "r1", "r2", "new"]
        assert again.get(("new",)) == NEW_ROW
        if code == 0:  # the write ran to its end without reaching this step: all covered
            break
    else:
        pytest.fail("the append never finished within 50 steps")
    assert states == {3, 4}  # kills before and after the row reached the disk


def test_torn_append_at_every_byte_resumes_without_loss_or_repeat(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    RowStore(path, "t", IDENTITY, CODEC).append(OLD_ROWS)
    old = path.read_bytes()
    line = (json.dumps({"id": "new", "response": "yé"}, ensure_ascii=False) + "\n").encode()
    for cut in range(len(line)):
        path.write_bytes(old + line[:cut])
        store = RowStore(path, "t", IDENTITY, CODEC)
        assert [r["id"] for r in store.rows()] == ["r0", "r1", "r2"] and path.read_bytes() == old
        store.append([{"id": "new", "response": "yé"}])
        assert path.read_bytes() == old + line


def test_kill_at_each_step_of_a_report_write_leaves_old_or_new(tmp_path: Path) -> None:
    seen = set()
    for step in range(1, 50):
        path = tmp_path / f"results-{step}.json"
        path.write_text(json.dumps(OLD_REPORT))
        code = _kill_at(step, "report", str(path), json.dumps(NEW_REPORT))
        found = json.loads(path.read_text())
        assert found in (OLD_REPORT, NEW_REPORT), step
        seen.add(found == NEW_REPORT)
        if code == 0:
            break
    else:
        pytest.fail("the report write never finished within 50 steps")
    assert seen == {False, True}
