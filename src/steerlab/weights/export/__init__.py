"""Export an edit so other tools can use it without steerlab: ``hf`` (a merged checkpoint,
:mod:`.hf`), ``lora`` (a PEFT LoRA adapter, :mod:`.lora`), ``gguf-cvec`` (a llama.cpp
control vector, :mod:`.gguf_cvec`)."""

from __future__ import annotations

from steerlab.weights.export.common import (
    EDIT_FILE,
    FORMATS,
    ExportError,
    check_format,
    edit_record,
)
from steerlab.weights.export.gguf_cvec import cvec_tensor_index, export_gguf_cvec, read_gguf_cvec
from steerlab.weights.export.hf import checkpoint_bytes, export_hf
from steerlab.weights.export.lora import (
    adapter_cosines,
    export_lora,
    load_edited,
    lora_tensors,
    read_lora_directions,
    write_lora,
)

__all__ = [
    "EDIT_FILE", "FORMATS", "ExportError", "adapter_cosines", "check_format", "checkpoint_bytes",
    "cvec_tensor_index", "edit_record", "export_gguf_cvec", "export_hf", "export_lora",
    "load_edited", "lora_tensors", "read_gguf_cvec", "read_lora_directions", "write_lora",
]
