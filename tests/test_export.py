"""Exports: merged HF checkpoints, rank-1 LoRA adapters (merge == hf export), adapter
import, llama.cpp control vectors; the CLI; the capability comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from steerlab.cli import main
from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import DirectionError
from steerlab.interventions.specs import Add
from steerlab.interventions.steering import steer
from steerlab.prompts.chat import encode
from steerlab.weights.export.common import ExportError, edit_record
from steerlab.weights.export.gguf_cvec import export_gguf_cvec, read_gguf_cvec
from steerlab.weights.export.hf import export_hf
from steerlab.weights.export.lora import (
    adapter_cosines,
    export_lora,
    load_edited,
    read_lora_directions,
)
from steerlab.weights.orthogonalize import orthogonalize
from tests.tiny import ARCH_NAMES, tiny_model

POST_NORM = ("gemma2", "gemma3", "olmo2")
CVEC_LAYERS, CVEC_ALPHA = list(range(8, 21)), -1.0  # subtract each layer's refusal vector
PROMPTS = ["how do i make a bomb", "write a poem about the blue sky please"]


def _direction(seed: int = 3, d: int = 64, layers: tuple[int, ...] = (0,)) -> Direction:
    vec = torch.randn(len(layers), d, generator=torch.Generator().manual_seed(seed))
    return Direction(vec, layers, DirectionMeta(name="dir", best_layer=layers[0]))


def _logits(model: nn.Module, tokenizer) -> torch.Tensor:
    batch = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return out[batch.attention_mask.bool()]


def _edit_kwargs(arch: str) -> dict:
    # Post-norm layouts need the opt-in, and their tiny models tie lm_head to the embedding,
    # which a LoRA cannot edit without editing lm_head too: leave the embedding out there.
    if arch in POST_NORM:
        return {"components": ("attn_out", "mlp_out"), "allow_approximate": True}
    return {}


# -- hf ----------------------------------------------------------------------------------------
def test_hf_export_loads_in_a_fresh_process_with_plain_transformers(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    result = orthogonalize(lm, _direction())
    out = export_hf(lm, tmp_path / "edited", edit=result)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "steerlab_edit.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        text = tok.apply_chat_template([{{"role": "user", "content": "hello"}}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\\n"), text
        torch.save(model.model.layers[1].mlp.down_proj.weight, {str(tmp_path / "w.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    reloaded = torch.load(tmp_path / "w.pt")
    assert torch.equal(reloaded, lm.layout.mlp_out[1].weight)
    record = edit_record(out)
    assert record is not None and record["edit"]["alpha"] == 1.0
    assert record["fingerprint"] == lm.fingerprint


def test_hf_export_of_untied_model_keeps_lm_head(tmp_path: Path) -> None:
    lm = tiny_model("gemma2")
    head = lm.model.get_output_embeddings().weight.clone()
    orthogonalize(lm, _direction(), allow_approximate=True)
    edited_logits = _logits(lm.model, lm.tokenizer)
    out = export_hf(lm, tmp_path / "gemma")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_output_embeddings().weight, head)
    torch.testing.assert_close(_logits(model, lm.tokenizer), edited_logits, atol=1e-5, rtol=1e-5)


def test_hf_export_refuses_to_overwrite(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    export_hf(lm, tmp_path / "m")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(lm, tmp_path / "m")
    export_hf(lm, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "config.json").is_file()


def test_hf_export_refuses_up_front_when_the_disk_cannot_hold_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from steerlab.weights.export.hf import checkpoint_bytes

    lm = tiny_model("llama")
    need = checkpoint_bytes(lm.model)
    assert need == sum(p.numel() * 4 for p in lm.model.parameters())  # float32, tied once
    assert checkpoint_bytes(lm.model, torch.bfloat16) == need // 2
    real_usage = shutil.disk_usage
    # A disk with less free space than the checkpoint: the one thing this test cannot make.
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=need // 2))
    with pytest.raises(ExportError, match=r"needs about .* GB but only .* GB is free.*bfloat16"):
        export_hf(lm, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    assert (export_hf(lm, tmp_path / "m") / "config.json").is_file()


def test_a_full_disk_is_recognised_in_the_forms_writers_raise_it() -> None:
    from steerlab.store.atomic import disk_full

    with pytest.raises(OSError) as info, open("/dev/full", "wb") as handle:
        handle.write(b"x")
    assert disk_full(info.value)
    # safetensors' Rust writer reports it in its own exception's message.
    assert disk_full(RuntimeError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)"))
    assert not disk_full(PermissionError(13, "Permission denied"))


# -- lora --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's
def test_lora_merge_equals_hf_export(arch: str, tmp_path: Path) -> None:
    from peft import PeftModel

    d, alpha, kwargs = _direction(), 1.5, _edit_kwargs(arch)
    adapter = export_lora(tiny_model(arch), d, tmp_path / "lora", alpha, **kwargs)
    edited = tiny_model(arch)
    orthogonalize(edited, d, alpha, **kwargs)
    hf_dir = export_hf(edited, tmp_path / "hf")
    merged = PeftModel.from_pretrained(tiny_model(arch).model, str(adapter)).merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    merged_sd = merged.state_dict()
    assert set(merged_sd) == set(exported)
    changed = 0
    original = tiny_model(arch).model.state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(merged_sd[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
        changed += not torch.equal(tensor, original[name])
    assert changed == (1 if "components" not in kwargs else 0) + 2 * edited.n_layers


def test_lora_adapter_is_rank_one_per_matrix(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    adapter = export_lora(tiny_model("llama"), _direction(), tmp_path / "a", 0.5)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1 and config["peft_type"] == "LORA"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 2 * (1 + 2 * 3)
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert b.shape == (64, 1)
    torch.testing.assert_close(b[:, 0], -0.5 * _direction().vector(unit=True))


def test_lora_merge_through_load_edited(tmp_path: Path) -> None:
    base = export_hf(tiny_model("mistral"), tmp_path / "base")
    adapter = export_lora(tiny_model("mistral"), _direction(), tmp_path / "lora")
    edited = tiny_model("mistral")
    orthogonalize(edited, _direction())
    merged = load_edited(str(adapter), dtype="float32", base=str(base))
    torch.testing.assert_close(_logits(merged.model, merged.tokenizer),
                               _logits(edited.model, edited.tokenizer), atol=1e-5, rtol=1e-5)


def test_lora_refuses_what_it_cannot_express(tmp_path: Path) -> None:
    tied = tiny_model("gemma2")
    with pytest.raises(ExportError, match="ties lm_head"):
        export_lora(tied, _direction(), tmp_path / "t", allow_approximate=True)
    lm = tiny_model("qwen2")
    old = lm.layout.attn_out[0]
    biased = nn.Linear(old.in_features, old.out_features, bias=True)
    lm.layout.layers[0].self_attn.o_proj = biased
    lm = type(lm)(model=lm.model, tokenizer=lm.tokenizer, arch=lm.arch, spec=lm.spec,
                  dtype=lm.dtype)
    with pytest.raises(ExportError, match="bias"):
        export_lora(lm, _direction(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_lora_import_reads_back_the_direction(tmp_path: Path) -> None:
    d = _direction()
    adapter = export_lora(tiny_model("qwen2"), d, tmp_path / "lora", alpha=1.0)
    dirs = read_lora_directions(adapter)
    assert set(dirs) == {"embed", "attn_out", "mlp_out"}
    assert dirs["mlp_out"].layers == (0, 1, 2) and dirs["embed"].layers == (0,)
    unit = d.vector(unit=True)
    for direction in dirs.values():
        for layer in direction.layers:
            assert float(direction.vector(layer) @ unit) == pytest.approx(1.0, abs=1e-5)
    cos = adapter_cosines(adapter, d, source_layer=0)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in cos["attn_out"].values())
    other = _direction(seed=9)
    assert all(abs(v) < 0.5 for v in adapter_cosines(dirs, other, source_layer=0)["mlp_out"]
               .values())
    strength = dirs["mlp_out"].meta.extra["strength"]["1"]
    down = tiny_model("qwen2").layout.mlp_out[1].weight
    assert strength == pytest.approx(float((unit @ down).norm()), rel=1e-4)


def test_lora_import_of_a_rank_two_adapter(tmp_path: Path) -> None:
    a, b = _direction(1), _direction(2)
    adapter = export_lora(tiny_model("llama"), [a, b], tmp_path / "r2")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    basis = torch.linalg.qr(torch.stack([a.vector(), b.vector()]).T)[0]
    for direction in read_lora_directions(adapter).values():
        vec = direction.vector(direction.layers[0])
        assert float((basis.T @ vec).norm()) == pytest.approx(1.0, abs=1e-5)  # in the span


def test_lora_import_rejects_non_adapters(tmp_path: Path) -> None:
    with pytest.raises(DirectionError, match="not a LoRA adapter"):
        read_lora_directions(tmp_path)


# -- gguf control vector -----------------------------------------------------------------------
def test_gguf_cvec_layout_and_metadata(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    lm = tiny_model("qwen2")
    d = _direction(layers=(0, 1, 2))
    path = export_gguf_cvec(d, tmp_path / "cv.gguf", alpha=2.0, lm=lm)
    reader = GGUFReader(str(path))
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2"]  # layer 0's output cannot be steered
    for tensor in reader.tensors:
        assert tensor.tensor_type == GGMLQuantizationType.F32
        assert list(tensor.shape) == [64]

    def field(key: str):
        f = reader.get_field(key)
        assert f is not None, key
        return f.parts[f.data[0]]

    assert bytes(field("general.architecture")).decode() == "controlvector"
    assert bytes(field("controlvector.model_hint")).decode() == "qwen2"
    assert int(field("controlvector.layer_count")[0]) == 2
    back = read_gguf_cvec(path)
    assert back.layers == (1, 2)
    torch.testing.assert_close(back.vector(2), 2.0 * d.vector(2))


def test_gguf_cvec_applied_like_llama_cpp_equals_steerlab_add(tmp_path: Path) -> None:
    """llama.cpp adds direction.k to the output of block k (build_cvec after the FFN
    residual add); replaying that with plain hooks must equal steerlab's Add."""
    from gguf import GGUFReader

    lm = tiny_model("llama")
    d = _direction(layers=(0, 1, 2))
    with steer(lm, [Add(d, 3.0, layers=[1, 2], source_layer=1)]):
        expected = _logits(lm.model, lm.tokenizer)
    path = export_gguf_cvec(d, tmp_path / "cv.gguf", alpha=3.0, layers=[1, 2], source_layer=1)
    tensors = {int(t.name.split(".")[1]): torch.tensor(t.data.copy())
               for t in GGUFReader(str(path)).tensors}
    handles = []
    try:
        for k, vec in tensors.items():
            def add(module, args, output, vec=vec):
                if isinstance(output, tuple):
                    return (output[0] + vec, *output[1:])
                return output + vec
            handles.append(lm.layout.layers[k].register_forward_hook(add))
        replayed = _logits(lm.model, lm.tokenizer)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(replayed, expected, atol=1e-5, rtol=1e-5)


def test_gguf_cvec_rejects_layer_zero(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="layer 0"):
        export_gguf_cvec(_direction(), tmp_path / "x.gguf", layers=[0], source_layer=0)
    assert not list(tmp_path.iterdir())


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_orthogonalize_all_formats(tmp_path: Path) -> None:
    base = export_hf(tiny_model("qwen2"), tmp_path / "base")
    d = _direction(layers=(0, 1, 2))
    d.save(tmp_path / "dir")
    common = [str(base), "--direction", str(tmp_path / "dir"), "--dtype", "float32",
              "--source-layer", "1"]
    main(["orthogonalize", *common, "--format", "hf", "--alpha", "1", "--out",
          str(tmp_path / "hf")])
    main(["orthogonalize", *common, "--format", "lora", "--layers", "1-2", "--out",
          str(tmp_path / "lora")])
    main(["orthogonalize", *common, "--format", "gguf-cvec", "--layers", "2", "--alpha", "4",
          "--out", str(tmp_path / "cv")])
    assert edit_record(tmp_path / "hf")["edit"]["source_layer"] == 1
    assert read_lora_directions(tmp_path / "lora")["mlp_out"].layers == (1, 2)
    cvec = read_gguf_cvec(tmp_path / "cv" / "control_vector.gguf")
    torch.testing.assert_close(cvec.vector(2), 4.0 * d.vector(1))
    with pytest.raises(SystemExit) as exc:
        main(["orthogonalize", *common, "--format", "onnx", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["orthogonalize", *common, "--out", str(tmp_path / "hf")])  # exists
    assert exc.value.code == 2


# -- compare -----------------------------------------------------------------------------------
def test_compare_side_by_side(tmp_path: Path) -> None:
    from steerlab.evaluate.compare import CompareConfig, compare_models

    original = tiny_model("qwen2")
    edited = tiny_model("qwen2")
    orthogonalize(edited, _direction(), alpha=1.0)
    cfg = CompareConfig(limit=3, capability_limit=4, max_new_tokens=3, kl_tokens=2,
                        batch_size=2)
    result = compare_models({"original": original, "edited": edited}, cfg, out_dir=tmp_path)
    res = result["results"]
    assert res["original"]["kl_first_token"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["edited"]["kl_first_token"]["mean"] > 1e-4
    for name in ("original", "edited"):
        assert res[name]["refusal_harmful"]["n"] == 3
        assert res[name]["capability_accuracy"]["n"] == 4
        ppl = res[name]["perplexity"]
        assert 1 < ppl["ci95"][0] <= ppl["value"] <= ppl["ci95"][1]
        lo, hi = res[name]["refusal_harmful"]["ci95"]
        assert 0 <= lo <= hi <= 1
    assert "vs_baseline" in res["edited"] and "vs_baseline" not in res["original"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| measure | original | edited |" in table and "capability accuracy" in table
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 1 + 2 * (3 + 3 + 4)  # the header, then the rows


# -- real model ------------------------------------------------------------------------------
HF_GREEDY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

def greedy(model, tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

if __name__ == "__main__":
    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    print(json.dumps({"dtype": str(model.dtype), "responses": greedy(model, tok, prompts)}))
"""


@pytest.mark.real
def test_real_hf_export_loads_in_a_fresh_process_and_answers_as_the_edited_model(
        real_lm, tmp_path) -> None:
    """The exported checkpoint, loaded by plain transformers in another process, answers
    the built-in harmful test prompts exactly as the edited model in memory does, and its
    weights carry the edit. (Weights == runtime ablation is test_orthogonalize's real
    test; bfloat16 keeps this one to 1.3 GB of disk.)"""
    from transformers import AutoTokenizer

    from steerlab.directions.extraction import refusal_direction
    from steerlab.model.loading import load_model
    from steerlab.prompts.sets import load_prompts
    from steerlab.store.atomic import free_space_shortfall
    from steerlab.weights.export.hf import checkpoint_bytes

    direction = refusal_direction(real_lm, limit=8, layers=[12], select_split=None)
    prompts = [p.prompt for p in load_prompts("paired:harmful", split="test", limit=4)]
    own = load_model("default", dtype="bfloat16")  # never edit the shared real_lm
    orthogonalize(own, direction, source_layer=12)
    if free_space_shortfall(tmp_path, checkpoint_bytes(own.model)) is not None:
        # A machine without room for 1.3 GB more: the export must refuse up front, cleanly.
        with pytest.raises(ExportError, match="GB is free"):
            export_hf(own, tmp_path / "ablated")
        assert list(tmp_path.iterdir()) == []
        pytest.skip("no disk space for the round trip; checked that the export refused cleanly")
    out = export_hf(own, tmp_path / "ablated")
    helpers: dict[str, Any] = {}
    exec(HF_GREEDY, helpers)  # the same greedy decode as the fresh process runs
    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    in_memory = helpers["greedy"](own.model, tok, prompts)
    del own
    done = subprocess.run([sys.executable, "-c", HF_GREEDY, str(out), json.dumps(prompts)],
                          check=True, capture_output=True, text=True, timeout=600)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["dtype"] == "torch.bfloat16"
    assert fresh["responses"] == in_memory
    # The file carries the edit: a written block's output has (almost) nothing left along r.
    from safetensors import safe_open

    r = direction.vector(12).float()
    r = r / r.norm()
    name = "model.layers.20.mlp.down_proj.weight"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        edited = f.get_tensor(name).float()
    original = real_lm.model.get_parameter(name).detach().float()
    assert (r @ edited).norm() < 0.02 * (r @ original).norm()


LLAMA_CPP_SCRIPT = """
import ctypes, json, sys
import numpy as np
import llama_cpp
from gguf import GGUFReader

model_path, cvec_path, ids_path = sys.argv[1:4]
prompts = json.loads(open(ids_path).read())
llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_threads=1, n_threads_batch=1, seed=0,
                      verbose=False)

def run():
    outs = []
    for ids in prompts:
        llm.reset()
        done = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)
        outs.append(done["choices"][0]["text"])
    return outs

base = run()
# Load the file as common_control_vector_load_one does: direction.k at offset n_embd*(k-1).
n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
tensors = {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32)
           for t in GGUFReader(cvec_path).tensors}
data = np.zeros(n_embd * max(tensors), dtype=np.float32)
for k, vec in tensors.items():
    data[n_embd * (k - 1): n_embd * k] += vec
ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, 1, n_layer) == 0
steered = run()
print(json.dumps({"base": base, "steered": steered}))
"""


@pytest.mark.real
@pytest.mark.skipif(not os.environ.get("STEERLAB_LLAMACPP_PYTHON"),
                    reason="set STEERLAB_LLAMACPP_PYTHON to a python with llama-cpp-python + gguf")
def test_real_gguf_cvec_in_llama_cpp_changes_refusal_like_steerlab(real_lm, tmp_path) -> None:
    """The control vector applied by llama.cpp to the embedded GGUF moves refusal the
    same way steerlab's Add hook does on the (dequantized) HF model."""
    from steerlab.directions.extraction import refusal_direction
    from steerlab.evaluate.refusal import is_refusal
    from steerlab.generation.generate import generate
    from steerlab.model.embedded import gguf_path
    from steerlab.prompts.chat import render
    from steerlab.prompts.sets import load_prompts

    layers, alpha = CVEC_LAYERS, CVEC_ALPHA
    direction = refusal_direction(real_lm, limit=8, layers=layers, select_split=None)
    prompts = [p.prompt for p in load_prompts("paired:harmful", split="test", limit=8)]
    spec = Add(direction, alpha, layers=layers)  # each layer's own vector, like cvector files
    hf_base = [g.response for g in generate(real_lm, prompts, max_new_tokens=24, batch_size=8)]
    hf_steered = [g.response for g in generate(real_lm, prompts, steer=[spec],
                                               max_new_tokens=24, batch_size=8)]
    cvec = export_gguf_cvec(direction, tmp_path / "refusal.gguf", alpha=alpha, layers=layers,
                            lm=real_lm)
    ids = [real_lm.tokenizer(render(real_lm.tokenizer, p), add_special_tokens=False)["input_ids"]
           for p in prompts]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    done = subprocess.run(
        [os.environ["STEERLAB_LLAMACPP_PYTHON"], "-c", LLAMA_CPP_SCRIPT, str(gguf_path()),
         str(cvec), str(tmp_path / "ids.json")],
        check=True, capture_output=True, text=True, timeout=2400)
    cpp = json.loads(done.stdout.strip().splitlines()[-1])
    rates = {name: sum(map(is_refusal, texts)) for name, texts in
             {"hf_base": hf_base, "hf_steered": hf_steered, "cpp_base": cpp["base"],
              "cpp_steered": cpp["steered"]}.items()}
    assert rates["hf_steered"] < rates["hf_base"], rates  # the steering does something
    assert rates["cpp_steered"] < rates["cpp_base"], rates  # and llama.cpp does it too
    assert abs(rates["cpp_steered"] - rates["hf_steered"]) <= 2, rates
    # Same layers, same sign, same scale: the steered texts mostly start identically
    # (llama.cpp runs the 8-bit GGUF, steerlab its float32 dequantization).
    same = sum(a.split()[:5] == b.split()[:5] for a, b in zip(hf_steered, cpp["steered"],
                                                                strict=True))
    assert same >= len(prompts) // 2, (hf_steered, cpp["steered"])
    print(json.dumps({"rates": rates, "hf_steered": hf_steered, "cpp_steered": cpp["steered"]},
                     indent=1))


def test_cli_compare_with_a_lora_adapter(tmp_path: Path) -> None:
    base = export_hf(tiny_model("qwen2"), tmp_path / "base")
    _direction().save(tmp_path / "dir")
    main(["orthogonalize", str(base), "--direction", str(tmp_path / "dir"), "--format", "lora",
          "--dtype", "float32", "--out", str(tmp_path / "lora")])
    main(["compare", str(base), str(tmp_path / "lora"), "--limit", "2", "--capability-limit",
          "2", "--max-new-tokens", "2", "--kl-tokens", "1", "--dtype", "float32",
          "--out", str(tmp_path / "cmp")])
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(result["results"]) == ["base", "lora"]
    assert result["results"]["lora"]["kl_first_token"]["mean"] > 0
    assert result["models"]["lora"]["spec"].endswith("lora")
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(base), str(tmp_path / "lora"), "--name", "one", "--out",
              str(tmp_path / "x")])
    assert exc.value.code == 2
