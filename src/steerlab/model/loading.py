"""Load any Hugging Face chat model (directory, cached hub id, GGUF, or the
embedded default) into a :class:`LoadedModel` that knows its own layout.

steerlab never wraps or mutates the user's model: a ``LoadedModel`` is just
the model, its tokenizer, the resolved module layout and a fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.errors import ModelLoadError
from steerlab.model.architectures import Architecture, ResolvedLayout, architecture_for
from steerlab.model.embedded import DEFAULT_MODEL_NAME, safetensors_dir

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, module layout and identity.

    Example:
        >>> lm = load_model("default")            # doctest: +SKIP
        >>> lm.n_layers, lm.d_model               # doctest: +SKIP
        (24, 896)
    """

    model: Any
    tokenizer: Any
    arch: Architecture
    spec: str
    dtype: torch.dtype
    dtype_reason: str = ""
    fingerprint: str = ""
    layout: ResolvedLayout = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layout = self.arch.resolve(self.model)
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self.model)

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        return self.layout.layers

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in one layer's cache: what memory
        budgets for cached or stored prefills are counted in."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        return 2 * int(heads) * int(head_dim) * (torch.finfo(self.dtype).bits // 8)

    @property
    def n_layers(self) -> int:
        return len(self.layout.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where input ids must go)."""
        return next(self.layout.embed.parameters()).device

    def layer_device(self, index: int) -> torch.device:
        """Device of decoder layer ``index`` (layers may be spread over several)."""
        return next(self.layout.layers[index].parameters()).device

    @property
    def name(self) -> str:
        if self.spec == "default":
            return DEFAULT_MODEL_NAME
        return str(getattr(self.model.config, "_name_or_path", "") or self.spec)

    @property
    def context_length(self) -> int | None:
        """Most tokens one sequence may hold (``max_position_embeddings``; None if unknown)."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def info(self) -> dict[str, Any]:
        """What ``steerlab info`` prints and what reports record about the model."""
        return {
            "spec": self.spec,
            "name": self.name,
            "architecture": self.arch.name,
            "model_type": self.model.config.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "chat_template": self.has_chat_template,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
        }


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(
    dtype: str | torch.dtype, device: str | torch.device | None
) -> tuple[torch.dtype, str]:
    """Resolve ``dtype`` ("auto", a name or a torch dtype) and say why it was chosen."""
    if isinstance(dtype, torch.dtype):
        return dtype, "requested"
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelLoadError(
                f"Unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(DTYPES)))}."
            )
        return DTYPES[dtype], "requested"
    wants_gpu = torch.cuda.is_available() and (device is None or "cuda" in str(device))
    if wants_gpu:
        return torch.bfloat16, "auto: GPU"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: CPU with native bfloat16"
    return torch.float32, "auto: CPU without native bfloat16"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the config and a sample of weights.

    Weights are sampled in bfloat16 so the same model loaded in float32 or
    bfloat16 gets the same fingerprint; an edited model gets another one.
    """
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    digest = hashlib.sha256(
        json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode()
    )
    params = dict(model.named_parameters())
    for name in sorted(params)[:: max(1, len(params) // 8)]:
        flat = params[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(source: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(source)``, except that a folder whose
    ``tokenizer_config.json`` names the generic fast class is loaded from its
    ``tokenizer.json`` exactly as saved.

    Why: transformers 5 rebuilds the tokenizer of some model types (qwen2 among
    them) from the vocabulary alone, whatever class the folder declares, so a
    custom tokenizer (e.g. a word-level one) saved beside such a model would
    come back as a different tokenizer with different token ids.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(source)
    config = folder / "tokenizer_config.json"
    if "gguf_file" not in kwargs and config.is_file() and (folder / "tokenizer.json").is_file():
        try:
            declared = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            declared = None
        if declared in GENERIC_TOKENIZER_CLASSES:
            kwargs.pop("trust_remote_code", None)  # the generic class runs no remote code
            return PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    return AutoTokenizer.from_pretrained(str(source), **kwargs)


def load_model(
    spec: str = "default",
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    architecture: Architecture | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a chat model for steering.

    ``spec`` is a local HF model directory, a hub id already in the local HF
    cache (never downloaded), a ``.gguf`` file, or ``"default"`` for the
    embedded Qwen2.5-Coder-0.5B-Instruct.

    Example:
        >>> lm = load_model("default", dtype="float32")   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype, reason = choose_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    source, tok_kwargs = _resolve_source(spec)
    kwargs.update(tok_kwargs)
    try:
        tokenizer = load_tokenizer(source, **tok_kwargs, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load model {spec!r}: {exc}. Give a local model directory, a .gguf file, "
            "'default', or a hub id that is already in your Hugging Face cache."
        ) from exc
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        if "gguf_file" not in tok_kwargs:
            raise
        raise ModelLoadError(
            f"Could not read GGUF file {spec!r}: {exc}. It is truncated or corrupt, or holds an "
            "architecture transformers cannot load; check the file or give a model directory."
        ) from exc
    if device is not None and device_map is None:
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    arch = architecture_for(model, architecture)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        spec=spec,
        dtype=torch_dtype,
        dtype_reason=reason,
    )


def _resolve_source(spec: str) -> tuple[str, dict[str, Any]]:
    """Map a spec to (path or id, extra from_pretrained kwargs), offline only."""
    if spec == "default":
        return str(safetensors_dir()), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path.")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json; point to a Hugging Face model "
                "directory (config.json, weights, tokenizer)."
            )
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(
            f"Model {spec!r} is neither a model directory nor a .gguf file; check the path."
        )
    return _cached_hub_snapshot(spec), {}


def _cached_hub_snapshot(repo_id: str) -> str:
    """Find ``repo_id`` in the local HF cache without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several kinds for "not cached"
        raise ModelLoadError(
            f"Model {repo_id!r} is not in the local Hugging Face cache and steerlab never "
            "downloads at run time. Download it once (huggingface-cli download "
            f"{repo_id}) or pass a local model directory or .gguf file."
        ) from exc
