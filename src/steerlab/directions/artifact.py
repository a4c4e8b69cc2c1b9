"""Directions: one vector per layer, immutable, with metadata and a versioned
save format (``direction.safetensors`` + ``direction.json`` in a folder).

A direction's folder path is accepted anywhere a direction is expected.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from steerlab.directions.files import (
    check_finite,
    commit_folder,
    fsync_file,
    read_manifest,
    read_vectors,
)
from steerlab.errors import DirectionError
from steerlab.store.atomic import write_json
from steerlab.version import __version__

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

FORMAT_VERSION = 1
TENSOR_FILE = "direction.safetensors"
META_FILE = "direction.json"


class ModelMismatchWarning(UserWarning):
    """A direction made on another model is used anyway (``allow_mismatch=True``)."""


@dataclass(frozen=True)
class DirectionMeta:
    """Where a direction came from: enough to reproduce it and to refuse misuse."""

    name: str = "direction"
    kind: str = "custom"
    method: str = "diff_in_means"
    position: str = "last"
    model_name: str = ""
    model_fingerprint: str = ""
    d_model: int = 0
    datasets: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    best_layer: int | None = None
    created_by: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Direction:
    """Raw (un-normalised) vectors ``[len(layers), d_model]`` for the model layers ``layers``.

    Supports ``+ - * /`` (with another direction on the same layers, or a
    scalar), ``.unit()``, ``.to()``, ``.vector(layer)``, ``save``/``load``.

    Example:
        >>> d = Direction(torch.randn(2, 8), layers=(3, 4))
        >>> (2 * d).vector(3).shape
        torch.Size([8])
    """

    vectors: torch.Tensor
    layers: tuple[int, ...]
    meta: DirectionMeta = field(default_factory=DirectionMeta)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.layers):
            raise DirectionError(
                f"Direction vectors must have shape [n_layers, d_model] matching "
                f"{len(self.layers)} "
                f"layers; got {tuple(self.vectors.shape)}."
            )
        if len(set(self.layers)) != len(self.layers):
            raise DirectionError(f"Direction layers repeat: {self.layers}.")
        check_finite(self.vectors, f"Direction {self.meta.name!r}")

    # -- access -------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.vectors, strict=True)}

    def vector(self, layer: int | None = None, *, unit: bool = False) -> torch.Tensor:
        """The vector for ``layer`` (default: ``meta.best_layer``, or the only layer)."""
        if layer is None:
            if self.meta.best_layer is not None:
                layer = self.meta.best_layer
            elif len(self.layers) == 1:
                layer = self.layers[0]
            else:
                raise DirectionError(
                    f"Direction {self.meta.name!r} has {len(self.layers)} layers and no best "
                    "layer; "
                    "say which layer's vector to use (e.g. DIR[14] on the command line)."
                )
        if layer not in self.layers:
            raise DirectionError(
                f"Direction {self.meta.name!r} has no vector for layer {layer}; it has layers "
                f"{_compact(self.layers)}."
            )
        vec = self.vectors[self.layers.index(layer)]
        return vec / vec.norm().clamp_min(1e-12) if unit else vec

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.vector(layer)

    def select(self, layers: Iterable[int]) -> Direction:
        """A direction restricted to ``layers``."""
        chosen = tuple(layers)
        return dataclasses.replace(
            self, vectors=torch.stack([self.vector(i) for i in chosen]), layers=chosen
        )

    # -- algebra ------------------------------------------------------------------------------
    def _with(self, vectors: torch.Tensor, **meta: Any) -> Direction:
        new_meta = dataclasses.replace(self.meta, **meta) if meta else self.meta
        return Direction(vectors, self.layers, new_meta)

    def unit(self) -> Direction:
        """Each layer's vector scaled to norm 1."""
        return self._with(self.vectors / self.vectors.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def to(self, *args: Any, **kwargs: Any) -> Direction:
        return self._with(self.vectors.to(*args, **kwargs))

    def _other(self, other: Direction | float | int) -> torch.Tensor | float:
        if isinstance(other, Direction):
            if other.layers != self.layers:
                raise DirectionError(
                    f"Cannot combine directions on layers {_compact(self.layers)} and "
                    f"{_compact(other.layers)}; use .select() to align them first."
                )
            return other.vectors.to(self.vectors)
        return float(other)

    def __add__(self, other: Direction | float) -> Direction:
        return self._with(self.vectors + self._other(other))

    def __sub__(self, other: Direction | float) -> Direction:
        return self._with(self.vectors - self._other(other))

    def __mul__(self, other: float) -> Direction:
        return self._with(self.vectors * self._other(other))

    __rmul__ = __mul__
    __radd__ = __add__

    def __truediv__(self, other: float) -> Direction:
        return self._with(self.vectors / self._other(other))

    def __neg__(self) -> Direction:
        return self._with(-self.vectors)

    def cosine(self, other: Direction) -> dict[int, float]:
        """Per-layer cosine similarity with ``other`` on the layers both have."""
        out = {}
        for layer in self.layers:
            if layer in other.layers:
                a, b = (
                    self.vector(layer).float(),
                    other.vector(layer).float().to(self.vectors.device),
                )
                out[layer] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path/direction.safetensors`` and ``path/direction.json`` as one unit.

        Both files go into a sibling folder that replaces ``path`` in one rename, so an
        interrupted save leaves the previous direction whole (other files in ``path`` stay).
        """
        folder = Path(path)

        def write(stage: Path) -> None:
            save_file(
                {"vectors": self.vectors.detach().float().cpu().contiguous()},
                str(stage / TENSOR_FILE),
                metadata={"format_version": str(FORMAT_VERSION)},
            )
            fsync_file(stage / TENSOR_FILE)
            write_json(
                stage / META_FILE,
                {
                    "format_version": FORMAT_VERSION,
                    "layers": list(self.layers),
                    "meta": dataclasses.asdict(self.meta),
                },
            )

        commit_folder(folder, write, own=(TENSOR_FILE, META_FILE))
        return folder

    @classmethod
    def load(
        cls, path: str | Path, lm: LoadedModel | None = None, *, allow_mismatch: bool = False
    ) -> Direction:
        """Load a saved direction; with ``lm``, refuse one made for another model."""
        folder = Path(path)
        if folder.is_file() and folder.name in (TENSOR_FILE, META_FILE):
            folder = folder.parent
        meta_path, tensor_path = folder / META_FILE, folder / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise DirectionError(
                f"{folder} is not a direction folder: expected {META_FILE} and {TENSOR_FILE} in it "
                "(make one with `steerlab extract ... --out DIR`)."
            )
        version, layers, meta = read_manifest(meta_path, DirectionMeta)
        if version > FORMAT_VERSION:
            raise DirectionError(
                f"{meta_path} has format version {version}, newer than this steerlab supports "
                f"({FORMAT_VERSION}); upgrade steerlab."
            )
        vectors = read_vectors(tensor_path)
        if vectors.shape[0] != len(layers):
            raise DirectionError(
                f"{folder}: {TENSOR_FILE} holds {vectors.shape[0]} vectors but {META_FILE} lists "
                f"{len(layers)} layers; the two files do not belong together, re-extract it."
            )
        direction = cls(vectors, layers, meta)
        if lm is not None:
            direction.check_compatible(lm, allow_mismatch=allow_mismatch)
        return direction

    def check_compatible(self, lm: LoadedModel, *, allow_mismatch: bool = False) -> None:
        """Raise unless this direction was made for ``lm`` (d_model always must match)."""
        if self.d_model != lm.d_model:
            raise DirectionError(
                f"Direction {self.meta.name!r} has d_model {self.d_model} but the model has "
                f"{lm.d_model}: it was made for another model."
            )
        if max(self.layers) >= lm.n_layers:
            raise DirectionError(
                f"Direction {self.meta.name!r} has layers up to {max(self.layers)} but the "
                "model has "
                f"{lm.n_layers} layers."
            )
        fp = self.meta.model_fingerprint
        if fp and fp != lm.fingerprint and allow_mismatch:
            warnings.warn(
                f"Direction {self.meta.name!r} was extracted from model fingerprint {fp} "
                f"({self.meta.model_name or 'unknown'}), not from this model ({lm.name}, "
                f"fingerprint {lm.fingerprint}); using it anyway because of --allow-mismatch.",
                ModelMismatchWarning,
                stacklevel=2,
            )
        elif fp and fp != lm.fingerprint:
            raise DirectionError(
                f"Direction {self.meta.name!r} was extracted from model fingerprint {fp} "
                f"({self.meta.model_name or 'unknown'}) but this model's fingerprint is "
                f"{lm.fingerprint}. Re-extract it on this model, or pass allow_mismatch=True "
                "(--allow-mismatch) if you know the models share a residual stream."
            )


def stamp_meta(lm: LoadedModel, **fields: Any) -> DirectionMeta:
    """Metadata for a direction just made on ``lm``: model identity, version, time."""

    return DirectionMeta(
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        d_model=lm.d_model,
        created_by=f"steerlab {__version__}",
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **fields,
    )


def _compact(layers: Iterable[int]) -> str:
    items = sorted(layers)
    if items and items == list(range(items[0], items[-1] + 1)) and len(items) > 2:
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))
