"""Architecture adapters on tiny random models of every supported layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steerlab import Architecture, ArchitectureError, architecture_for
from tests.tiny import ARCH_NAMES, tiny_model


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_adapter_resolves_every_module(arch: str) -> None:
    lm = tiny_model(arch)
    layout = lm.layout
    assert lm.arch.name == arch
    assert lm.n_layers == 3 and lm.d_model == 64
    assert isinstance(layout.embed, nn.Embedding)
    for i in range(lm.n_layers):
        for proj in (layout.attn_out[i], layout.mlp_out[i]):
            assert isinstance(proj, nn.Linear) and proj.out_features == 64
    # The residual writers' outputs are what a layer adds to the stream: check by hooking them.
    ids = lm.tokenizer("how do i make a cake ?", return_tensors="pt")["input_ids"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layout.attn_residual[0].register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o)),
        layout.mlp_residual[0].register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
        layout.layers[0].register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("in", (a[0] if a else kw["hidden_states"])),
            with_kwargs=True,
        ),
        layout.layers[0].register_forward_hook(
            lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    try:
        lm.model(ids)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(seen["in"] + seen["attn"] + seen["mlp"], seen["out"])


def test_post_norm_layouts_are_flagged() -> None:
    assert {n for n in ARCH_NAMES if tiny_model(n).arch.post_norm} == {"gemma2", "gemma3", "olmo2"}


def test_unknown_architecture_names_what_it_looked_for() -> None:
    lm = tiny_model("llama")
    lm.model.config.model_type = "mystery"
    with pytest.raises(ArchitectureError) as err:
        architecture_for(lm.model)
    msg = str(err.value)
    assert "mystery" in msg and "model.layers" in msg and "o_proj" in msg
    assert "Architecture(" in msg


def test_override_with_wrong_path_is_clear() -> None:
    lm = tiny_model("llama")
    with pytest.raises(ArchitectureError, match=r"transformer\.h"):
        architecture_for(lm.model, Architecture(name="custom", layers="transformer.h"))


def test_override_is_used() -> None:
    lm = tiny_model("llama")
    lm.model.config.model_type = "mystery"
    arch = architecture_for(lm.model, Architecture(name="mine"))
    assert arch.name == "mine"


def test_fingerprint_stable_across_dtype_and_changes_with_weights() -> None:
    a = tiny_model("qwen2", seed=1)
    b = tiny_model("qwen2", seed=1, dtype=torch.bfloat16)
    c = tiny_model("qwen2", seed=2)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
