"""Apply intervention specs to a model with forward hooks, and always remove them.

``steer(lm, specs)`` is the one way steerlab changes a model's computation
at run time. It never wraps or edits the model: it registers hooks on the
modules the architecture layout names, and removes every one of them when
the ``with`` block ends, however it ends (exception, KeyboardInterrupt, a
generator closed early).

Sites (see :mod:`steerlab.interventions.specs`):

- ``input``: decoder layer ``i``'s input (forward pre-hook);
- ``output``: decoder layer ``i``'s output;
- ``attn`` / ``mlp``: the output of the module that writes attention / MLP
  results into the residual (``lm.layout.attn_residual[i]``,
  ``mlp_residual[i]``; the post-norm in Gemma 2/3 and OLMo 2).

Positions: the first forward of a sequence (empty KV cache) is the prompt;
every later forward (non-empty cache) holds generated tokens. This is read
from the cache passed to the decoder stack, so it also holds for 1-token
prompts. A forward without a cache counts as prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from steerlab.activations.layout_bound import layout_bound
from steerlab.activations.record import layer_output_hooks
from steerlab.directions.artifact import Direction
from steerlab.errors import InterventionError
from steerlab.interventions.compilers import MEAN_NORMS_KEY, Op, _Placed, compile_specs
from steerlab.interventions.spec_resolution import resolve_specs
from steerlab.interventions.spec_types import Spec
from steerlab.model.loading import LoadedModel
from steerlab.prompts.chat import encode


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteInfo:
    """Where a hook sits and what it holds (for inspection and tests)."""

    name: str
    kind: str
    layer: int
    device: torch.device
    dtype: torch.dtype
    ops: tuple[str, ...]


class SteeringPlan:
    """What ``steer`` yields: the resolved specs, the hooked sites, the phase.

    ``select_rows(keep)`` keeps ``row_mask`` aligned when a generation loop
    drops finished rows from its batch.
    """

    def __init__(self, specs: list[Spec], row_mask: torch.Tensor | None) -> None:
        self.specs = specs
        self.row_mask = row_mask
        self.phase = "prompt"
        self.ops: dict[tuple[str, int], list[Op]] = {}
        self.modules: dict[tuple[str, int], nn.Module] = {}
        self.places: dict[tuple[str, int], tuple[torch.device, torch.dtype]] = {}
        self.n_hooks = 0
        self._rows: list[_Placed] = []

    @property
    def needs_phase(self) -> bool:
        return any(op.positions != "all" for ops in self.ops.values() for op in ops)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        out = {}
        for (kind, layer), ops in self.ops.items():
            device, dtype = self.places[(kind, layer)]
            name = f"{kind}[{layer}]"
            out[name] = SiteInfo(name, kind, layer, device, dtype, tuple(op.label for op in ops))
        return out

    def tensor_places(self) -> dict[str, list[tuple[torch.device, torch.dtype]]]:
        """Every place each site's vectors were copied to (one per site unless moved)."""
        return {
            f"{kind}[{layer}]": sorted({p for op in ops for t in op.tensors() for p in t.places},
                                       key=str)
            for (kind, layer), ops in self.ops.items()
        }

    def select_rows(self, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep only rows ``keep`` of ``row_mask`` (after a loop drops finished rows)."""
        if self.row_mask is None:
            return
        index = torch.as_tensor(keep, dtype=torch.long)
        self.row_mask = self.row_mask[index]
        for placed in self._rows:
            placed.base = placed.base[index]
            placed.copies = {k: v[index.to(v.device)] for k, v in placed.copies.items()}

    def add_op(self, lm: LoadedModel, kind: str, layer: int, make: Callable[..., Op],
               label: str, positions: str, **tensors: torch.Tensor) -> None:
        """Add one op at site ``(kind, layer)``, its tensors copied to the site's place."""
        site = (kind, layer)
        if site not in self.modules:
            module = _site_module(lm, kind, layer)
            self.modules[site] = module
            self.places[site] = _place_of(module, lm.layout.layers[layer], lm.dtype)
            self.ops[site] = []
        place = self.places[site]
        rows = None
        if self.row_mask is not None:
            rows = _Placed(self.row_mask.to(torch.float32).view(-1, 1, 1), *place)
            self._rows.append(rows)
        placed = [_Placed(v, *place) for v in tensors.values()]
        self.ops[site].append(make(positions, rows, label, *placed))

    def apply(self, site: tuple[str, int], x: torch.Tensor) -> torch.Tensor:
        phase = self.phase
        for op in self.ops[site]:
            x = op(x, phase)
        return x


def _place_of(module: nn.Module, fallback: nn.Module,
              dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Device of the site's weights; their dtype unless quantized (then the model's)."""
    for source in (module, fallback):
        for param in source.parameters():
            return param.device, param.dtype if param.dtype.is_floating_point else dtype
    raise InterventionError(f"{type(module).__name__} has no parameters to place vectors by.")


def _site_module(lm: LoadedModel, kind: str, layer: int) -> nn.Module:
    layout = lm.layout
    if kind in ("input", "output"):
        return layout.layers[layer]
    return (layout.attn_residual if kind == "attn" else layout.mlp_residual)[layer]


# -- hooks -------------------------------------------------------------------------------------
def _output_hook(plan: SteeringPlan, site: tuple[str, int]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (plan.apply(site, output[0]), *output[1:])
        return plan.apply(site, output)

    return hook


def _input_hook(plan: SteeringPlan, site: tuple[str, int]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (plan.apply(site, args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise InterventionError(
                f"{type(module).__name__} was called without hidden states as its first argument "
                "or `hidden_states=`; steerlab cannot find this layer's input."
            )
        kwargs["hidden_states"] = plan.apply(site, kwargs["hidden_states"])
        return args, kwargs

    return hook


def past_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of this forward (0 for a prompt / no cache)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, tuple | list) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # legacy tuple cache
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    return 0


def _phase_hook(plan: SteeringPlan) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        plan.phase = "prompt" if past_length(kwargs) == 0 else "generated"

    return hook


def backbone(lm: LoadedModel) -> nn.Module:
    """The decoder stack's parent module (where the phase and row-layout pre-hooks sit)."""
    path = lm.arch.layers.rpartition(".")[0]
    return lm.model.get_submodule(path) if path else lm.model


@contextmanager
def steer(
    lm: LoadedModel,
    specs: Spec | Iterable[Spec],
    *,
    row_mask: torch.Tensor | Sequence[bool] | None = None,
) -> Iterator[SteeringPlan]:
    """Apply ``specs`` (in order) to ``lm`` inside a ``with`` block.

    Direction references (paths, ``random_like(...)``) are resolved and
    checked against the model once, and every vector is moved to its site's
    device and dtype once, here. ``row_mask`` (bool ``[B]``) applies the specs
    only to the batch rows where it is True.

    Example:
        >>> with steer(lm, [Add(direction, 4.0, layers=12)]):   # doctest: +SKIP
        ...     out = lm.model.generate(**inputs)
    """
    mask: torch.Tensor | None = None
    if row_mask is not None:
        mask = torch.as_tensor(row_mask).detach().to("cpu")
        if mask.ndim != 1 or mask.dtype != torch.bool:
            raise InterventionError(
                f"row_mask must be a 1-D bool tensor with one flag per batch row; got dtype "
                f"{mask.dtype} and shape {tuple(mask.shape)}."
            )
    plan = _compiled(lm, specs, mask)
    layout = plan.needs_phase or mask is not None
    handles: list[torch.utils.hooks.RemovableHandle] = []
    with layout_bound(lm.model) if layout else nullcontext():
        try:
            if plan.needs_phase:
                handles.append(backbone(lm).register_forward_pre_hook(_phase_hook(plan),
                                                                       with_kwargs=True))
            for site, module in plan.modules.items():
                if site[0] == "input":
                    handles.append(module.register_forward_pre_hook(_input_hook(plan, site),
                                                                    with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_output_hook(plan, site)))
            plan.n_hooks = len(handles)
            yield plan
        finally:
            for handle in handles:
                handle.remove()
            plan.n_hooks = 0


def _compiled(lm: LoadedModel, specs: Spec | Iterable[Spec],
              mask: torch.Tensor | None = None) -> SteeringPlan:
    """The plan of ``specs`` on ``lm``: references resolved, every op on its site, no hooks."""
    resolved = resolve_specs(specs, lm=lm)
    plan = SteeringPlan(resolved, mask)
    compile_specs(lm, resolved, plan)
    return plan


def check_specs(lm: LoadedModel, specs: Spec | Iterable[Spec]) -> None:
    """Raise what :func:`steer` would raise for ``specs`` on ``lm`` (unknown direction,
    layer out of range, wrong width), hooking nothing: for commands that should fail
    before they spend compute or create a run folder."""
    _compiled(lm, specs)


def first_hooked_layer(lm: LoadedModel, specs: Spec | Iterable[Spec]) -> int:
    """The lowest decoder layer whose computation ``specs`` change (``lm.n_layers`` when
    they hook nothing): below it a steered forward is the unsteered one, which
    :mod:`steerlab.activations.shared_prefill` computes once for every condition over a prompt."""
    return min((layer for _kind, layer in _compiled(lm, specs).ops), default=lm.n_layers)


def count_hooks(module: nn.Module) -> int:
    """Forward (pre-)hooks currently registered anywhere in ``module`` (tests, sanity checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def with_mean_norms(
    direction: Direction,
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    batch_size: int = 8,
) -> Direction:
    """``direction`` with ``meta.extra["mean_norms"]``: the mean norm of each layer's
    output over the prompt tokens of ``prompts``, so ``Add(scale="mean_norm")``
    can express α as a fraction of a typical activation."""
    if not prompts:
        raise InterventionError("with_mean_norms needs at least one prompt.")
    totals = torch.zeros(lm.n_layers, dtype=torch.float64)
    count = 0
    real = torch.zeros(0, dtype=torch.bool)

    def record(layer: int, hidden: torch.Tensor) -> None:
        norms = hidden.float().norm(dim=-1)
        totals[layer] += float(norms[real.to(norms.device)].sum())

    with layer_output_hooks(lm, range(lm.n_layers), record), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = encode(lm.tokenizer, list(prompts[start:start + batch_size]), system,
                           max_length=lm.context_length)
            batch = batch.to(lm.device)
            real = batch.attention_mask.bool()
            count += int(real.sum())
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False)
    norms = {str(layer): float(totals[layer] / count) for layer in range(lm.n_layers)}
    meta = replace(direction.meta, extra={**direction.meta.extra, MEAN_NORMS_KEY: norms})
    return Direction(direction.vectors, direction.layers, meta)


__all__ = ["SiteInfo", "SteeringPlan", "backbone", "check_specs", "count_hooks",
           "first_hooked_layer", "past_length", "steer", "with_mean_norms"]
