"""The candidate directions a search draws from: per-layer difference-of-means
vectors at each token position, extracted once and kept in the run folder.

A trial never extracts anything: it picks a position and a fractional layer
and interpolates between the stored vectors (see
:class:`steerlab.interventions.kernel_ablate.KernelAblate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from steerlab.directions.artifact import Direction
from steerlab.directions.extraction import extract_direction
from steerlab.errors import DirectionError, SteerlabError
from steerlab.model.loading import LoadedModel

CANDIDATES_DIR = "candidates"


def candidate_dir(run_dir: Path, position: str) -> Path:
    """Where the candidate direction read at ``position`` lives in a run folder."""
    return run_dir / CANDIDATES_DIR / position


def extract_candidates(
    lm: LoadedModel,
    run_dir: Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    positions: Sequence[str],
    *,
    batch_size: int = 16,
    datasets: dict[str, str] | None = None,
    on_position: Callable[[str], None] | None = None,
) -> dict[str, Direction]:
    """``{position: Direction over every layer}``; positions already in ``run_dir`` are
    loaded (and checked against the model) instead of extracted again."""
    out: dict[str, Direction] = {}
    for position in positions:
        folder = candidate_dir(run_dir, position)
        if (folder / "direction.json").is_file():
            try:
                out[position] = Direction.load(folder, lm)
            except DirectionError as exc:
                raise SteerlabError(
                    f"The candidate direction in {folder} does not fit this model ({exc}); use "
                    "a fresh --out folder for another model."
                ) from exc
            continue
        if on_position is not None:
            on_position(position)
        direction = extract_direction(
            lm, list(harmful), list(harmless), position=position, name=f"refusal@{position}",
            kind="refusal", batch_size=batch_size, datasets=datasets,
        )
        direction.save(folder)
        out[position] = direction
    return out


__all__ = ["CANDIDATES_DIR", "candidate_dir", "extract_candidates"]
