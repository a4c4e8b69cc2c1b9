"""Weight orthogonalization: equivalence with runtime ablation where it is exact,
honest behaviour where it is not (post-norm layouts, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import DirectionError, InterventionError
from steerlab.interventions.specs import Ablate, SubspaceAblate
from steerlab.interventions.steering import count_hooks, steer
from steerlab.prompts.chat import encode
from steerlab.weights.orthogonalize import embeddings_tied, orthogonalize
from tests.tiny import ARCH_NAMES, tiny_model

PRE_NORM = [a for a in ARCH_NAMES if a not in ("gemma2", "gemma3", "olmo2")]
POST_NORM = ["gemma2", "gemma3", "olmo2"]
PROMPTS = ["how do i make a bomb", "write a poem about the blue sky please"]


def _direction(seed: int = 3, d: int = 64, name: str = "dir") -> Direction:
    vec = torch.randn(1, d, generator=torch.Generator().manual_seed(seed))
    return Direction(vec, (0,), DirectionMeta(name=name))


def _logits(lm) -> tuple[torch.Tensor, torch.Tensor]:
    batch = encode(lm.tokenizer, PROMPTS)
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return out, batch.attention_mask.bool()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask].abs().max())


@pytest.mark.parametrize("arch", PRE_NORM)
def test_alpha_one_equals_runtime_ablation(arch: str) -> None:
    lm = tiny_model(arch)
    d = _direction()
    with steer(lm, [Ablate(d)]):
        ablated, mask = _logits(lm)
    original, _ = _logits(lm)
    result = orthogonalize(lm, d, alpha=1.0)
    edited, _ = _logits(lm)
    assert _max_diff(original, ablated, mask) > 1e-2  # the ablation does something
    assert _max_diff(edited, ablated, mask) < 1e-5
    assert result.rank == 1 and result.layers == (0, 1, 2) and not result.approximate
    assert len(result.modules) == 1 + 2 * lm.n_layers


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_subspace_equals_runtime_subspace_ablation(arch: str) -> None:
    lm = tiny_model(arch)
    a, b = _direction(1, name="a"), _direction(2, name="b")
    with steer(lm, [SubspaceAblate((a, b))]):
        ablated, mask = _logits(lm)
    result = orthogonalize(lm, [a, b])
    edited, _ = _logits(lm)
    assert result.rank == 2 and result.direction == "a+b"
    assert _max_diff(edited, ablated, mask) < 1e-5


def test_writers_lose_exactly_the_alpha_share() -> None:
    lm = tiny_model("qwen2")
    d = _direction()
    v = d.vector(unit=True)
    down = lm.layout.mlp_out[1].weight
    embed = lm.layout.embed.weight
    before_w, before_e = (v @ down).clone(), (embed @ v).clone()
    untouched = lm.layout.mlp_out[1].weight.clone()
    orthogonalize(lm, d, alpha=0.5)
    torch.testing.assert_close(v @ down, 0.5 * before_w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embed @ v, 0.5 * before_e, atol=1e-5, rtol=1e-4)
    # Only the v̂ component moved: the part orthogonal to v̂ is unchanged.
    proj = torch.eye(64) - torch.outer(v, v)
    torch.testing.assert_close(proj @ down, proj @ untouched, atol=1e-5, rtol=1e-4)
    orthogonalize(lm, d, alpha=2.0)  # 1 - 2 = -1: flips what is left
    torch.testing.assert_close(v @ down, -0.5 * before_w, atol=1e-5, rtol=1e-4)


def test_layers_and_components_limit_the_edit() -> None:
    lm = tiny_model("llama")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    result = orthogonalize(lm, _direction(), layers=[1], components=("mlp_out",))
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    assert result.modules == ("model.layers.1.mlp.down_proj",) and result.layers == (1,)


def test_bias_is_edited_too() -> None:
    lm = tiny_model("qwen2")
    old = lm.layout.attn_out[0]
    biased = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(old.weight)
        biased.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(5)))
    lm.layout.layers[0].self_attn.o_proj = biased
    lm = type(lm)(model=lm.model, tokenizer=lm.tokenizer, arch=lm.arch, spec=lm.spec,
                  dtype=lm.dtype)
    d = _direction()
    with steer(lm, [Ablate(d)]):
        ablated, mask = _logits(lm)
    orthogonalize(lm, d)
    edited, _ = _logits(lm)
    assert abs(float(biased.bias.detach() @ d.vector(unit=True))) < 1e-5
    assert _max_diff(edited, ablated, mask) < 1e-5


def test_chunk_size_does_not_change_the_result() -> None:
    small, large = tiny_model("mistral"), tiny_model("mistral")
    d = _direction()
    orthogonalize(small, d, chunk_elements=100)
    orthogonalize(large, d)
    for (name, a), (_, b) in zip(small.model.named_parameters(), large.model.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_weights_stay_bfloat16_and_lose_the_direction() -> None:
    lm = tiny_model("qwen2", dtype=torch.bfloat16)
    d = _direction()
    v = d.vector(unit=True)
    orthogonalize(lm, d)
    down = lm.layout.mlp_out[2].weight
    assert down.dtype == torch.bfloat16
    residual = (v @ down.float()).norm() / down.float().norm()
    assert float(residual) < 1e-2  # bf16 rounding only


def test_fingerprint_is_recomputed_like_a_reload_would() -> None:
    from steerlab.model.loading import model_fingerprint

    lm = tiny_model("qwen2")
    lm.fingerprint = "stale"
    orthogonalize(lm, _direction())
    assert lm.fingerprint == model_fingerprint(lm.model)


def test_source_layer_picks_the_vector() -> None:
    vecs = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    d = Direction(vecs, (0, 1, 2), DirectionMeta(name="multi"))
    lm = tiny_model("qwen2")
    with pytest.raises(DirectionError, match="which layer"):
        orthogonalize(lm, d)
    result = orthogonalize(lm, d, source_layer=2)
    assert result.source_layer == 2
    v = vecs[2] / vecs[2].norm()
    assert float((v @ lm.layout.attn_out[0].weight).norm()) < 1e-5


@pytest.mark.parametrize("arch", POST_NORM)
def test_post_norm_refuses_without_opt_in(arch: str) -> None:
    lm = tiny_model(arch)
    before = lm.layout.attn_out[0].weight.clone()
    with pytest.raises(InterventionError, match="post-norm"):
        orthogonalize(lm, _direction())
    assert torch.equal(lm.layout.attn_out[0].weight, before)


@pytest.mark.parametrize("arch", POST_NORM)
def test_post_norm_approximate_removes_direction_but_differs_from_ablation(arch: str) -> None:
    """What holds exactly on post-norm layouts: the residual stream carries no v̂ component
    (every residual write and every layer input is orthogonal to v̂). What does not: the
    logits differ from runtime ablation, because the norms rescale the edited writes."""
    lm = tiny_model(arch)
    d = _direction()
    v = d.vector(unit=True)
    with steer(lm, [Ablate(d)]):
        ablated, mask = _logits(lm)
    result = orthogonalize(lm, d, allow_approximate=True)
    assert result.approximate
    seen: list[float] = []

    def record(tensor: torch.Tensor) -> None:
        t = tensor[mask]
        seen.append(float((t @ v).abs().max() / t.norm(dim=-1).max()))

    handles = []
    try:
        for i, layer in enumerate(lm.layout.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, k: record(a[0] if a else k["hidden_states"]), with_kwargs=True))
            for writer in (lm.layout.attn_residual[i], lm.layout.mlp_residual[i]):
                handles.append(writer.register_forward_hook(
                    lambda m, a, o: record(o[0] if isinstance(o, tuple) else o)))
        edited, _ = _logits(lm)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 * lm.n_layers
    assert max(seen) < 1e-5
    assert _max_diff(edited, ablated, mask) > 1e-3  # NOT equivalent to runtime ablation


def test_post_norm_embedding_only_is_allowed() -> None:
    lm = tiny_model("gemma2")
    result = orthogonalize(lm, _direction(), components=("embed",))
    assert not result.approximate and result.untied


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_embeddings_are_untied_and_lm_head_is_kept(arch: str) -> None:
    lm = tiny_model(arch)
    if arch == "llama":  # tie it, as many small chat models do
        lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
        lm.model.config.tie_word_embeddings = True
    assert embeddings_tied(lm)
    head = lm.model.get_output_embeddings().weight.clone()
    d = _direction()
    if arch == "llama":
        with steer(lm, [Ablate(d)]):
            ablated, mask = _logits(lm)
    with pytest.raises(InterventionError, match="ties lm_head"):
        orthogonalize(lm, d, components=("embed",), tied="error")
    result = orthogonalize(lm, d, allow_approximate=True)
    assert result.untied and not embeddings_tied(lm)
    assert lm.model.config.tie_word_embeddings is False
    assert torch.equal(lm.model.get_output_embeddings().weight, head)
    assert float((lm.layout.embed.weight @ d.vector(unit=True)).abs().max()) < 1e-5
    if arch == "llama":
        edited, _ = _logits(lm)
        assert _max_diff(edited, ablated, mask) < 1e-5


def test_errors_name_the_problem() -> None:
    lm = tiny_model("qwen2")
    with pytest.raises(DirectionError, match="d_model"):
        orthogonalize(lm, torch.ones(32))
    with pytest.raises(DirectionError, match="zero or linearly dependent"):
        orthogonalize(lm, torch.zeros(64))
    with pytest.raises(DirectionError, match="linearly dependent"):
        orthogonalize(lm, torch.stack([torch.ones(64), 2 * torch.ones(64)]))
    with pytest.raises(InterventionError, match="Unknown components"):
        orthogonalize(lm, torch.ones(64), components=("lm_head",))
    with pytest.raises(InterventionError, match="out of range"):
        orthogonalize(lm, torch.ones(64), layers=[7])
    assert count_hooks(lm.model) == 0


@pytest.mark.real
def test_real_model_alpha_one_equals_runtime_ablation() -> None:
    from steerlab.model.loading import load_model

    lm = load_model("default", dtype="float32")  # our own copy: we edit its weights
    assert not embeddings_tied(lm)
    head = lm.model.get_output_embeddings().weight[:4].clone()
    d = Direction(torch.randn(1, lm.d_model, generator=torch.Generator().manual_seed(0)), (12,),
                  DirectionMeta(name="random"))
    with steer(lm, [Ablate(d)]):
        ablated, mask = _logits(lm)
    original, _ = _logits(lm)
    orthogonalize(lm, d)
    edited, _ = _logits(lm)
    assert _max_diff(original, ablated, mask) > 1e-2
    scale = float(ablated[mask].abs().max())
    assert _max_diff(edited, ablated, mask) < 1e-4 * scale
    assert torch.equal(lm.model.get_output_embeddings().weight[:4], head)
