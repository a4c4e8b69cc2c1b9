"""Where each supported architecture keeps the modules steerlab touches.

One small table keyed by ``config.model_type`` instead of probing with
try/except: a model either matches a known layout or gets an error that names
the attributes looked for and how to pass an override.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from steerlab.errors import ArchitectureError


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one decoder-only layout.

    ``layers``, ``embed`` and ``final_norm`` are paths from the top-level
    ``*ForCausalLM`` module; the others are relative to one decoder layer.
    ``attn_out``/``mlp_out`` are the linear maps whose weights write into the
    residual stream (the ones weight orthogonalization edits).
    ``attn_residual``/``mlp_residual`` are the modules whose *output* is
    added to the residual stream; they differ from the projections only in
    post-norm layouts (Gemma 2/3, OLMo 2) where a norm sits in between.
    """

    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    attn_residual: str = "self_attn.o_proj"
    mlp_residual: str = "mlp.down_proj"
    model_types: tuple[str, ...] = field(default_factory=tuple)

    @property
    def post_norm(self) -> bool:
        """True when a norm sits between the output projections and the residual."""
        return self.attn_residual != self.attn_out or self.mlp_residual != self.mlp_out

    def resolve(self, model: nn.Module) -> ResolvedLayout:
        """Find every module of this layout in ``model`` or raise a clear error."""
        layers = _get(model, self.layers, self)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ArchitectureError(
                f"`{self.layers}` on {type(model).__name__} is not a non-empty ModuleList of "
                f"decoder layers; pass an Architecture override with the right `layers` path."
            )
        return ResolvedLayout(
            arch=self,
            layers=list(layers),
            embed=_get(model, self.embed, self),
            final_norm=_get(model, self.final_norm, self),
            attn_out=[_get(layer, self.attn_out, self) for layer in layers],
            mlp_out=[_get(layer, self.mlp_out, self) for layer in layers],
            attn_residual=[_get(layer, self.attn_residual, self) for layer in layers],
            mlp_residual=[_get(layer, self.mlp_residual, self) for layer in layers],
        )


@dataclass(frozen=True)
class ResolvedLayout:
    """The actual modules of one model, found through an :class:`Architecture`."""

    arch: Architecture
    layers: list[nn.Module]
    embed: nn.Module
    final_norm: nn.Module
    attn_out: list[nn.Module]
    mlp_out: list[nn.Module]
    attn_residual: list[nn.Module]
    mlp_residual: list[nn.Module]


_PRE_NORM = ("llama", "qwen2", "qwen3", "mistral", "phi3")
_POST_NORM = {
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text", "gemma3"),
    "olmo2": ("olmo2",),
}

ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture(name=name, model_types=(name,)) for name in _PRE_NORM},
    **{
        name: Architecture(
            name=name,
            attn_residual="post_attention_layernorm",
            mlp_residual="post_feedforward_layernorm",
            model_types=types,
        )
        for name, types in _POST_NORM.items()
    },
}
"""Supported layouts by name. Add an entry here to support a new architecture."""


def architecture_for(model: nn.Module, override: Architecture | None = None) -> Architecture:
    """Pick the layout for ``model`` from its ``config.model_type`` (or use ``override``)."""
    if override is not None:
        override.resolve(model)
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            arch.resolve(model)
            return arch
    known = ", ".join(sorted(t for a in ARCHITECTURES.values() for t in a.model_types))
    looked_for = ", ".join(
        f"{f}=`{getattr(Architecture('x'), f)}`"
        for f in ("layers", "embed", "final_norm", "attn_out", "mlp_out")
    )
    raise ArchitectureError(
        f"Unknown architecture model_type={model_type!r} ({type(model).__name__}); steerlab knows "
        f"{known}. It looks for {looked_for}. Pass "
        "`architecture=steerlab.Architecture(name=..., layers=..., embed=..., final_norm=..., "
        "attn_out=..., mlp_out=...)` to load_model with this model's attribute paths."
    )


def _get(root: nn.Module, path: str, arch: Architecture) -> nn.Module:
    obj: object = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, nn.ModuleList):
            obj = obj[int(part)]
            continue
        if not hasattr(obj, part):
            raise ArchitectureError(
                f"Architecture {arch.name!r}: {type(root).__name__} has no attribute `{path}` "
                f"(missing `{part}`); pass an Architecture override whose paths match this model."
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise ArchitectureError(
            f"Architecture {arch.name!r}: `{path}` on {type(root).__name__} is a "
            f"{type(obj).__name__}, not a module; fix the path in the Architecture override."
        )
    return obj
