"""``steerlab sweep``: a layer × strength grid on a tiny model, its cells generated in
shared batches, each equal to its steering run alone; a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.store.rowstore import read_rows
from tests.tiny import save_tiny, tiny_model


def test_cli_sweep_grid_cells_equal_single_runs_and_resume(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from steerlab.cli import main
    from steerlab.generation.generate import generate
    from steerlab.interventions.specs import parse_steer
    from steerlab.model.loading import load_model
    from steerlab.prompts.sets import load_prompts

    save_tiny(tiny_model("qwen2"), tmp_path / "model")
    Direction(torch.randn(3, 64) * 20, (0, 1, 2), DirectionMeta(best_layer=1)).save(
        tmp_path / "dir")
    template = f"add:{tmp_path / 'dir'}@{{layer}}:{{alpha}}"
    out = tmp_path / "sweep"
    args = ["sweep", str(tmp_path / "model"), "--steer-template", template, "--layers", "0,2",
            "--alphas", "1,4", "--limit", "3", "--max-new-tokens", "3", "--out", str(out),
            "--dtype", "float32"]
    main(args)
    assert "lowest refusal" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    assert [(c["layer"], c["alpha"]) for c in cells] == [(0, 1.0), (0, 4.0), (2, 1.0), (2, 4.0)]
    for cell in cells:
        lo, hi = cell["refusal_rate_ci95"]
        assert cell["n"] == 3 and 0 <= lo <= cell["refusal_rate"] <= hi <= 1
        assert 0 <= cell["vs_baseline_p"] <= 1 and cell["kl_first_4"] >= 0
    assert cells[1]["kl_first_4"] > cells[0]["kl_first_4"] > 0  # a stronger push moves more
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "figures" / "refusal_rate.png").stat().st_size > 0
    # A cell generated beside the others equals its steering generated alone.
    lm = load_model(str(tmp_path / "model"), dtype="float32")
    prompts = load_prompts("paired:harmful", split="val", limit=3)
    alone = generate(lm, prompts.texts(), steer=parse_steer(template.format(layer=2, alpha=4.0)),
                     max_new_tokens=3)
    rows = read_rows(out / "responses.jsonl")
    cell = {r["prompt_id"]: r["response"] for r in rows if r["condition"] == "L2_a4"}
    assert [cell[p.id] for p in prompts] == [g.response for g in alone]
    # Rerunning resumes: nothing is generated again.
    before = (out / "responses.jsonl").read_text()
    main(args)
    assert (out / "responses.jsonl").read_text() == before


def test_sweep_rejects_a_bad_cell_before_generating_anything(tmp_path: Path) -> None:
    import pytest

    from steerlab.errors import InterventionError
    from steerlab.experiments.sweep import run_sweep
    from steerlab.prompts.sets import load_prompts

    lm = tiny_model("qwen2")
    Direction(torch.randn(3, 64), (0, 1, 2), DirectionMeta(best_layer=1)).save(tmp_path / "dir")
    out = tmp_path / "sweep"
    with pytest.raises(InterventionError, match="layer"):  # layer 7 of a 3-layer model
        run_sweep(lm, out, template=f"add:{tmp_path / 'dir'}@{{layer}}:{{alpha}}",
                  layers=[1, 7], alphas=[2.0], prompts=load_prompts("paired:harmful", limit=2),
                  show_progress=False)
    assert not out.exists()


def test_fixed_steering_goes_under_the_baseline_and_every_cell(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from steerlab.cli import main
    from steerlab.generation.generate import generate
    from steerlab.interventions.kernel_ablate import KernelAblate
    from steerlab.interventions.specs import parse_steer, specs_to_json
    from steerlab.model.loading import load_model
    from steerlab.prompts.sets import load_prompts

    save_tiny(tiny_model("qwen2"), tmp_path / "model")
    Direction(torch.randn(3, 64) * 20, (0, 1, 2), DirectionMeta(best_layer=1)).save(
        tmp_path / "dir")
    fixed = KernelAblate(Direction(torch.randn(3, 64), (0, 1, 2)), 1.0, [1.0, 1.0, 1.0, 0.5],
                         [1.0, 1.0, 1.0, 0.5])
    (tmp_path / "spec.json").write_text(specs_to_json([fixed]))  # as abliterate writes it
    template = f"add:{tmp_path / 'dir'}@{{layer}}:{{alpha}}"
    out = tmp_path / "sweep"
    args = ["sweep", str(tmp_path / "model"), "--steer-template", template, "--layers", "1",
            "--alphas", "4", "--limit", "3", "--max-new-tokens", "3", "--harmless", "",
            "--steer", str(tmp_path / "spec.json"), "--out", str(out), "--dtype", "float32"]
    main(args)
    results = json.loads((out / "results.json").read_text())
    assert results["steer"]["ops"] == ["kernel_ablate"] and len(results["steer"]["sha256"]) == 16
    assert "fixed steering kernel_ablate" in (out / "report.md").read_text()
    lm = load_model(str(tmp_path / "model"), dtype="float32")
    prompts = load_prompts("paired:harmful", split="val", limit=3)
    rows = read_rows(out / "responses.jsonl")

    def condition(name: str) -> list[str]:
        got = {r["prompt_id"]: r["response"] for r in rows if r["condition"] == name}
        return [got[p.id] for p in prompts]

    spec = parse_steer(str(tmp_path / "spec.json"))
    assert condition("baseline") == [g.response for g in generate(
        lm, prompts.texts(), steer=spec, max_new_tokens=3)]
    both = spec + parse_steer(template.format(layer=1, alpha=4.0))
    assert condition("L1_a4") == [g.response for g in generate(
        lm, prompts.texts(), steer=both, max_new_tokens=3)]
    # Another fixed spec on the same folder is another run: refused, not mixed.
    (tmp_path / "other.json").write_text(specs_to_json([KernelAblate(
        Direction(torch.randn(3, 64), (0, 1, 2)), 1.0, [0.5, 1.0, 1.0, 0.0],
        [0.5, 1.0, 1.0, 0.0])]))
    with pytest.raises(SystemExit) as exc:
        main([*args[:-6], "--steer", str(tmp_path / "other.json"), *args[-4:]])
    assert exc.value.code == 2
    assert "settings.steer.sha256" in capsys.readouterr().err
    main([*args[:-6], "--steer", str(tmp_path / "other.json"), *args[-4:], "--overwrite"])
    assert json.loads((out / "results.json").read_text())["steer"]["sha256"] \
        != results["steer"]["sha256"]
