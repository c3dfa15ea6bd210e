"""What every command means by ``--device``, ``--dtype`` and ``--json``: one definition for all of them."""

from __future__ import annotations

import json
from typing import Any, Literal

import torch

from epas_lightning.errors import ConfigError

DType = Literal["auto", "float32", "bfloat16", "float16"]
"""``--dtype`` choices; ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise any torch device name (``cpu``, ``cuda:1``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {device!r}", "--device", "use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", f"--device {device}", "use --device cpu")
    return resolved


def resolve_dtype(dtype: DType | None, device: torch.device) -> torch.dtype:
    """The torch dtype for ``--dtype`` on ``device``."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", "--dtype", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def emit_json(record: Any, enabled: bool) -> None:
    """``--json``: print the command's result as one JSON line, the last line of stdout (redirect it to keep it)."""
    if enabled:
        print(json.dumps(record, default=str))
