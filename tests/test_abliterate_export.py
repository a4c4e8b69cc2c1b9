"""A kernel_ablate spec as weights: the HF edit and the LoRA merge equal the runtime hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from steerlab.cli import main
from steerlab.directions.artifact import Direction
from steerlab.generation.generate import generate
from steerlab.interventions.kernel_ablate import KernelAblate
from steerlab.interventions.specs import specs_to_json
from steerlab.interventions.steering import steer
from steerlab.store.rowstore import read_rows
from steerlab.weights.export.common import ExportError, edit_record
from steerlab.weights.export.hf import export_hf
from steerlab.weights.export.kernel import export_kernel
from steerlab.weights.export.lora import load_edited
from steerlab.weights.orthogonalize import orthogonalize_spec
from tests.tiny import save_tiny, tiny_model

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 11]])


def direction(lm) -> Direction:
    gen = torch.Generator().manual_seed(3)
    return Direction(torch.randn(lm.n_layers, lm.d_model, generator=gen),
                     tuple(range(lm.n_layers)))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_weight_edit_and_lora_merge_equal_the_runtime_hooks(arch, tmp_path):
    lm = tiny_model(arch)
    spec = KernelAblate(direction(lm), 1.3, [1.2, 1.0, 1.5, 0.2], [0.8, 2.0, 1.0, 0.0], rank=2)
    with steer(lm, [spec]):
        hooked = logits(lm.model)
    assert not torch.allclose(hooked, logits(lm.model), atol=1e-3)
    export_kernel(lm, spec, tmp_path / "lora", "lora")  # leaves lm unedited
    merged = PeftModel.from_pretrained(tiny_model(arch).model,
                                       str(tmp_path / "lora")).merge_and_unload()
    torch.testing.assert_close(logits(merged), hooked, atol=1e-4, rtol=1e-4)
    result = orthogonalize_spec(lm, spec)
    torch.testing.assert_close(logits(lm.model), hooked, atol=1e-4, rtol=1e-4)
    assert result.weights is not None and result.rank == 2


def test_cli_orthogonalize_takes_the_abliterate_spec(tmp_path: Path, capsys):
    lm = tiny_model("qwen2")
    base = export_hf(tiny_model("qwen2"), tmp_path / "base")
    spec = KernelAblate(direction(lm), 0.6, [1.0, 1.0, 1.0, 0.3], [1.1, 1.5, 2.0, 0.0])
    (tmp_path / "spec.json").write_text(specs_to_json([spec]))
    with steer(lm, [spec]):
        hooked = logits(lm.model)
    common = [str(base), "--steer", str(tmp_path / "spec.json"), "--dtype", "float32"]
    main(["orthogonalize", *common, "--format", "hf", "--out", str(tmp_path / "hf")])
    main(["orthogonalize", *common, "--format", "lora", "--out", str(tmp_path / "lora")])
    for folder in ("hf", "lora"):
        edited = load_edited(str(tmp_path / folder), dtype="float32")
        torch.testing.assert_close(logits(edited.model), hooked, atol=1e-4, rtol=1e-4)
    assert edit_record(tmp_path / "hf")["edit"]["weights"]["attn"][1] == pytest.approx(1.0)
    with pytest.raises(SystemExit) as exc:
        main(["orthogonalize", *common, "--format", "gguf-cvec", "--out", str(tmp_path / "cv")])
    assert exc.value.code == 2
    assert "cannot remove" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ExportError, match="cannot"):
        export_kernel(lm, spec, tmp_path / "x", "gguf-cvec")


def test_generate_and_eval_take_the_spec_file(tmp_path: Path):
    lm = tiny_model("qwen2")
    model_dir = save_tiny(lm, tmp_path / "model")
    spec = KernelAblate(direction(lm), 1.5, [1.4, 1.0, 1.0, 0.5], [1.2, 2.0, 1.0, 0.0])
    (tmp_path / "spec.json").write_text(specs_to_json([spec]))
    (tmp_path / "p.txt").write_text("hello world\na red car\n")
    main(["generate", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "--steer",
          str(tmp_path / "spec.json"), "--out", str(tmp_path / "g.jsonl"), "--dtype", "float32",
          "--max-new-tokens", "6"])
    got = sorted(row["response"] for row in read_rows(tmp_path / "g.jsonl"))
    want = sorted(g.response for g in generate(lm, ["hello world", "a red car"], steer=[spec],
                                               max_new_tokens=6))
    plain = sorted(g.response for g in generate(lm, ["hello world", "a red car"],
                                                max_new_tokens=6))
    assert got == want and got != plain
    main(["eval", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "--steer",
          str(tmp_path / "spec.json"), "--out", str(tmp_path / "ev"), "--dtype", "float32",
          "--max-new-tokens", "6"])
    assert (tmp_path / "ev").is_dir()
