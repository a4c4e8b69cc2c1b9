"""What every run records beside its results: config, seed, versions, machine,
and the model's identity, so a reader can tell exactly what produced a number."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

_PACKAGES = ("steerlab", "torch", "transformers", "tokenizers", "safetensors", "numpy", "peft",
             "accelerate", "gguf")


def versions() -> dict[str, str]:
    """Installed versions of Python and the packages whose behaviour affects results."""
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it: ``steerlab extract ...``, never the absolute path
    of the executable (a record must not carry one machine's paths)."""
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "steerlab"
    if program in ("__main__.py", "-m", "-c", ""):
        program = "python -m steerlab"
    return " ".join([program, shlex.join(argv[1:])]).strip()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what platform reports)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where it ran. The CPU and the kernels torch picked for it are recorded because
    bfloat16 results differ between CPUs: the same code and versions can write other tokens."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(
    lm: LoadedModel | None = None,
    *,
    config: Any = None,
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON-able record of everything that produced a result."""
    record: dict[str, Any] = {
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "seed": seed,
        "versions": versions(),
        "machine": machine(),
    }
    if config is not None:
        record["config"] = config.model_dump() if hasattr(config, "model_dump") else config
    if lm is not None:
        record["model"] = lm.info()
    if extra:
        record.update(extra)
    return record
