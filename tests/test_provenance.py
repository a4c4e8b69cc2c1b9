"""Provenance records the command as typed, never one machine's executable path."""

from __future__ import annotations

from steerlab.store.provenance import command_line, provenance


def test_command_line_drops_the_executable_directory() -> None:
    argv = ["/some/venv/bin/steerlab", "extract", "default", "--out", "runs/x y"]
    assert command_line(argv) == "steerlab extract default --out 'runs/x y'"


def test_command_line_of_python_dash_m() -> None:
    argv = ["/repo/src/steerlab/__main__.py", "info", "default"]
    assert command_line(argv) == "python -m steerlab info default"


def test_provenance_command_has_no_absolute_program_path() -> None:
    record = provenance(seed=3)
    assert not record["command"].startswith("/")
    assert record["seed"] == 3


def test_provenance_names_the_cpu_and_the_packages_that_change_numbers() -> None:
    record = provenance()
    machine = record["machine"]
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    assert isinstance(machine["torch_cpu_capability"], str) and machine["torch_cpu_capability"]
    assert {"tokenizers", "gguf", "torch", "transformers"} <= set(record["versions"])
    assert record["versions"]["tokenizers"] != "not installed"
