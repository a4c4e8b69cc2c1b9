"""Numeric limits: an ``add`` strength that would overflow float32/bfloat16 activations and a
``random_like`` seed outside [0, 2^32 - 1] are refused with one clear message, in the library
and on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlab.cli import main
from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import InterventionError
from steerlab.interventions.limits import MAX_ALPHA, MAX_SEED, check_alpha, check_seed
from steerlab.interventions.specs import Add, parse_compact, random_like, resolve_direction
from tests.tiny import save_tiny, tiny_model


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def direction() -> Direction:
    return Direction(torch.randn(3, 8), (0, 1, 2), DirectionMeta(name="d", best_layer=1))


@pytest.mark.parametrize("alpha", [1e300, -1e300, MAX_ALPHA * 1.0001, float("inf"),
                                   float("nan"), "4", True, None])
def test_alpha_out_of_bounds_refused(alpha):
    with pytest.raises(InterventionError, match="alpha"):
        Add(direction(), alpha, layers=1)


def test_alpha_bound_is_safe_in_low_precision():
    assert Add(direction(), -MAX_ALPHA, layers=1).alpha == -MAX_ALPHA
    assert check_alpha(3) == 3.0
    for dtype in (torch.bfloat16, torch.float32):  # room for alpha times a large norm
        assert torch.isfinite(torch.tensor(MAX_ALPHA * 1e20, dtype=dtype))
        assert not torch.isfinite(torch.tensor(1e300, dtype=dtype))
    with pytest.raises(InterventionError, match=r"\|alpha\| <= 1e\+06"):
        parse_compact("add:runs/x@3:1e300")


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 10**4000, "12a", 1.5, True])
def test_seed_out_of_range_refused(seed):
    with pytest.raises(InterventionError, match=r"0 to 4294967295"):
        random_like(direction(), seed)


def test_seed_in_range_and_in_compact_references():
    d = direction()
    assert check_seed(MAX_SEED) == MAX_SEED and check_seed("0") == 0
    assert torch.equal(random_like(d, MAX_SEED).vectors, random_like(d, MAX_SEED).vectors)
    names = {"d": d}
    huge = "9" * 5000
    for text in (f"random_like(d, {huge})", f"random_like(d, {MAX_SEED + 1})",
                 "random_like(d, -5, orthogonal)"):
        with pytest.raises(InterventionError, match="random_like seed"):
            resolve_direction(text, names=names)
    assert resolve_direction(f"random_like(d, {MAX_SEED})", names=names).meta.kind == "random"


def test_cli_refuses_huge_alpha_and_seed_in_one_line(tmp_path: Path, capsys):
    lm = tiny_model("qwen2")
    model = save_tiny(lm, tmp_path / "m")
    folder = tmp_path / "d"
    Direction(torch.randn(lm.n_layers, lm.d_model), tuple(range(lm.n_layers)),
              DirectionMeta(name="d", best_layer=1)).save(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    for spec in (f"add:{folder}@1:1e300", f"ablate:random_like({folder}, {'9' * 400})@all"):
        out = tmp_path / "o.jsonl"
        code = run_cli("generate", str(model), "--prompts", str(prompts), "--dtype", "float32",
                       "--steer", spec, "--out", str(out))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err
        assert not out.exists()
