"""``steerlab orthogonalize`` (edit a direction into the weights and export it) and
``steerlab compare`` (what the edit changed: refusal, over-refusal, KL,
capability, perplexity, side by side with intervals)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from steerlab.cli.common import DTYPE_OPT, MODEL_ARG, console, error_console, load
from steerlab.errors import InterventionError
from steerlab.interventions.layer_spec import parse_layers

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


def register(app: typer.Typer) -> None:
    @app.command()
    def orthogonalize(
        model: str = MODEL_ARG,
        direction: Path | None = typer.Option(None, "--direction", "-d",
                                              help="Direction folder."),
        steer: str | None = typer.Option(
            None, "--steer", help="Instead of --direction: a kernel_ablate spec, e.g. the "
            "spec.json of `steerlab abliterate` (hf or lora)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (or .gguf file)."),
        fmt: str = typer.Option("hf", "--format", "-f", help="hf, lora or gguf-cvec."),
        alpha: float = typer.Option(
            1.0, "--alpha", "-a",
            help="Strength: W ← W − α·v̂v̂ᵀW (hf/lora); the added multiple of v (gguf-cvec)."),
        source_layer: int | None = typer.Option(
            None, "--source-layer", help="Which layer's vector to use (default: best layer)."),
        layers: str | None = typer.Option(
            None, "--layers", help="Layers to edit: all (default), 3,5,9 or 12-18."),
        components: str = typer.Option(
            "embed,attn_out,mlp_out", "--components",
            help="Residual writers to edit (hf/lora), comma separated."),
        allow_approximate: bool = typer.Option(
            False, "--allow-approximate",
            help="Allow post-norm models (Gemma 2/3, OLMo 2), where the edit is not equivalent "
                 "to runtime ablation."),
        scale: str = typer.Option("raw", "--scale", help="gguf-cvec: raw or unit vector."),
        allow_mismatch: bool = typer.Option(
            False, "--allow-mismatch", help="Use a direction extracted from another model."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Edit a direction out of the weights (hf, lora) or write it as a llama.cpp
        control vector (gguf-cvec)."""
        from steerlab.directions.artifact import Direction
        from steerlab.store.outputs import output_dir, output_file
        from steerlab.weights.export.common import check_format
        from steerlab.weights.export.gguf_cvec import export_gguf_cvec
        from steerlab.weights.export.hf import export_hf
        from steerlab.weights.export.lora import export_lora
        from steerlab.weights.orthogonalize import orthogonalize as run_orthogonalize

        check_format(fmt)
        if (direction is None) == (steer is None):
            raise InterventionError("Give --direction DIR or --steer SPEC (one of the two).")
        cvec_file = out if out.suffix == ".gguf" else out / "control_vector.gguf"
        if fmt == "gguf-cvec":
            output_file(cvec_file, overwrite=overwrite)
        else:
            output_dir(out, overwrite=overwrite)  # a wrong --out fails before the model loads
        lm = load(model, dtype)
        if steer is not None:
            path = _export_spec(lm, steer, out, fmt, allow_approximate, overwrite)
            console.print(Text.assemble(("wrote", "green"), f" {fmt} export to {path}"))
            return
        assert direction is not None
        vec = Direction.load(direction, lm, allow_mismatch=allow_mismatch)
        whole = parse_layers(layers) == "all"
        chosen = None if whole else list(parse_layers(layers, lm.n_layers))
        comps = tuple(c.strip() for c in components.split(",") if c.strip())
        if fmt == "gguf-cvec":
            if scale not in ("raw", "unit"):
                raise InterventionError(f"--scale must be raw or unit, got {scale!r}.")
            path = export_gguf_cvec(vec, cvec_file, alpha=alpha, layers=chosen,
                                    source_layer=source_layer, lm=lm,
                                    scale="unit" if scale == "unit" else "raw")
        elif fmt == "lora":
            path = export_lora(lm, vec, out, alpha, chosen, comps, source_layer=source_layer,
                               allow_approximate=allow_approximate, overwrite=overwrite)
        else:
            with console.status("Orthogonalizing ..."):
                result = run_orthogonalize(lm, vec, alpha, chosen, comps,
                                           source_layer=source_layer,
                                           allow_approximate=allow_approximate)
            if result.untied:
                error_console.print("lm_head was tied to the embedding; untied it.", style="yellow")
            with console.status(f"Saving to {out} ..."):
                path = export_hf(lm, out, edit=result, overwrite=overwrite,
                                 extra={"direction_path": str(direction)})
        console.print(Text.assemble(("wrote", "green"), f" {fmt} export to {path}"))

    def _export_spec(lm: LoadedModel, steer: str, out: Path, fmt: str,
                     allow_approximate: bool, overwrite: bool) -> Path:
        from steerlab.interventions.specs import KernelAblate, parse_steer
        from steerlab.weights.export.kernel import export_kernel

        specs = parse_steer(steer)
        if len(specs) != 1 or not isinstance(specs[0], KernelAblate):
            raise InterventionError(
                f"--steer {steer} must hold one kernel_ablate spec (what `steerlab abliterate` "
                "writes); for a plain direction use --direction."
            )
        with console.status("Orthogonalizing ..."):
            return export_kernel(lm, specs[0], out, fmt, allow_approximate=allow_approximate,
                                 overwrite=overwrite, extra={"steer": steer})

    @app.command()
    def compare(
        original: str = typer.Argument(..., help="The original model (spec or folder)."),
        edited: list[str] = typer.Argument(
            ..., help="Edited models: HF folders, or LoRA adapter folders (merged into ORIGINAL)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for comparison.{json,md}."),
        prompts: str = typer.Option("paired:harmful", "--prompts",
                                    help="Harmful prompts (built-in name or file)."),
        harmless: str = typer.Option("harmless", "--harmless", help="Harmless prompts."),
        split: str = typer.Option("test", "--split", help="train, val, test or all."),
        limit: int = typer.Option(32, "--limit", help="Prompts per set."),
        capability_limit: int = typer.Option(40, "--capability-limit",
                                             help="Capability questions."),
        max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
        kl_tokens: int = typer.Option(4, "--kl-tokens", help="Response tokens KL averages over."),
        names: list[str] | None = typer.Option(
            None, "--name", help="Column name per model (ORIGINAL first); default: folder names."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Refusal, over-refusal, KL, capability accuracy and perplexity of ORIGINAL vs EDITED."""
        from steerlab.evaluate.compare import CompareConfig, compare_models, comparison_markdown

        specs = [original, *edited]
        labels = list(names or [])
        if labels and len(labels) != len(specs):
            raise InterventionError(
                f"Got {len(labels)} --name values for {len(specs)} models; give one per model."
            )
        labels = labels or [Path(s).name or s for s in specs]
        if len(set(labels)) != len(labels):
            raise InterventionError(f"Model names repeat ({labels}); pass --name for each.")
        cfg = CompareConfig(harmful=prompts, harmless=harmless,
                            split=None if split == "all" else split, limit=limit,
                            capability_limit=capability_limit, max_new_tokens=max_new_tokens,
                            kl_tokens=kl_tokens)
        result = compare_models(
            dict(zip(labels, specs, strict=True)), cfg, out_dir=out, dtype=dtype,
            on_model=lambda name: error_console.print(f"evaluating {name} ...", style="dim"),
            overwrite=overwrite)
        console.print(comparison_markdown(result))
        console.print(Text.assemble(("wrote", "green"), f" {out}/comparison.md, comparison.json, "
                                    "rows.jsonl"))
