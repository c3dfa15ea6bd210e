"""What every command means by ``--device``, ``--dtype``, ``--json``, a count and a size: one definition for all."""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from epas_lightning.errors import ConfigError, gpu_number_fix

DType = Literal["auto", "float32", "bfloat16", "float16"]
"""``--dtype`` choices; ``auto`` is bfloat16 on CUDA (float16 on GPUs without native bfloat16) and float32 elsewhere."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

GPU_SPELLING = re.compile(r"(?:gpu|cuda)[:_-]?(\d*)", re.IGNORECASE)
"""A GPU named as torch does not (``gpu``, ``gpu0``, ``cuda1``, ``GPU:1``): the group is its number, if any."""


def resolve_device(device: str | torch.device = "auto", flag: str = "--device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N`` (``mps`` where available).

    A device this machine lacks (no CUDA, an index past the GPU count, anything else) is one :class:`ConfigError`
    naming ``flag`` (the argument's name from Python), before any model loads.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where, fix = f"{flag} {device}", "use auto, cpu, cuda or cuda:N"
    if isinstance(device, str) and device.isdigit():  # Hugging Face's and vLLM's GPU 0 (an int from Python is torch's)
        raise ConfigError(f"unknown device {device!r}", where, gpu_number_fix(device))
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:  # TypeError: None, a list
        if isinstance(device, str) and (gpu := GPU_SPELLING.fullmatch(device)):
            fix = gpu_number_fix(gpu[1]) if gpu[1] else "use cuda for the GPU (or auto, cpu, cuda:N)"
        raise ConfigError(f"unknown device {device!r}", where, fix) from e
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", where, f"use {flag} cpu (or auto)")
        count = torch.cuda.device_count()
        if (resolved.index or 0) >= count:
            gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ConfigError(f"no such GPU: this machine has {count} ({gpus})", where, f"use {gpus} (or auto)")
        return resolved
    if resolved.type == "mps" and torch.backends.mps.is_available():
        return resolved
    raise ConfigError(f"device {device!r} is not available to these commands on this machine", where, fix)


_auto_choice: tuple[torch.dtype, str] | None = None
"""The dtype the last :func:`resolve_dtype` chose for ``auto``, and where (``None``: it was given), so that an overflow
names the flag as the user typed it."""


def resolve_dtype(dtype: DType | None, device: torch.device) -> torch.dtype:
    """The torch dtype for ``--dtype`` on ``device``: ``auto`` is bfloat16 on a CUDA GPU that has it natively (compute
    capability 8.0 or later), float16 on an older one (V100, T4: bfloat16 would be emulated, far slower), float32
    elsewhere."""
    global _auto_choice
    _auto_choice = None
    if dtype in (None, "auto"):
        if device.type != "cuda":
            chosen = torch.float32
        else:
            chosen = torch.bfloat16 if has_native_bf16(device) else torch.float16
        _auto_choice = chosen, "GPU" if device.type == "cuda" else "machine"
        return chosen
    return named_dtype(dtype)


def named_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype a ``--dtype`` other than ``auto`` names (from Python, that torch dtype itself: ``export(...,
    dtype=torch.bfloat16)`` was an unknown dtype); an unknown name is one :class:`ConfigError`."""
    if name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", "--dtype", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def has_native_bf16(device: torch.device) -> bool:
    """Whether a CUDA ``device`` computes in bfloat16 natively (compute capability 8.0 or later); older GPUs (V100,
    T4) emulate it, far slower. (``torch.cuda.is_bf16_supported()`` counts emulation as support.)"""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_overflow(what: str, dtype: torch.dtype) -> ConfigError:
    """The one line for values past ``dtype``'s range: ``what``, the largest value it holds, and the ``--dtype``
    choices that reach further."""
    limit = torch.finfo(dtype).max
    wider = sorted((d for d in DTYPES.values() if torch.finfo(d).max > limit), key=lambda d: d.itemsize)  # bf16 first
    wider = [dtype_name(d) for d in wider]
    fix = f"use --dtype {' or '.join(wider)}" if wider else "use another checkpoint, e.g. an earlier one of the run"
    name = flag = dtype_name(dtype)
    if _auto_choice is not None and _auto_choice[0] == dtype:
        name, flag = f"{name} (what --dtype auto chose on this {_auto_choice[1]})", "auto"
    return ConfigError(f"{what}; {name} holds at most {limit:g}", f"--dtype {flag}", fix)


def activations_overflow(what: str, dtype: torch.dtype) -> ConfigError:
    """The one line for a model output (``what``: its logits, a loss) that came out NaN or inf from finite weights."""
    return dtype_overflow(f"{what} came out NaN or inf: the activations overflow {dtype_name(dtype)}", dtype)


def is_whole_number(value: object) -> bool:
    """An integer: Python's, numpy's or a 0-d integer tensor's (each worked before the checks), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real_number(value: object) -> bool:
    """A real number: Python's, numpy's or a 0-d tensor's (each worked before the checks), not a bool or a string."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_counts(counts: dict[str, int | None]) -> None:
    """Fail with one line at the first flag whose count (``{"--batches": 0}``) is below 1, above ``sys.maxsize`` or no
    whole number (from Python: ``"8"`` failed comparing str and int, ``1.5`` ran); ``None`` is its default."""
    for flag, value in counts.items():
        if value is not None and not is_whole_number(value):
            raise ConfigError(f"must be a whole number, got {value!r}", flag, "give 1 or more")
        if value is not None and value < 1:
            raise ConfigError(f"must be at least 1, got {value}", flag, "give 1 or more")
        if value is not None and value > sys.maxsize:  # islice, range and lists of that many: OverflowError
            raise ConfigError(f"must be at most {sys.maxsize}, got {value}", flag, "give a smaller number")


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float in it (NaN, inf: at any depth of dicts, lists and tuples) as ``None``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def json_text(record: Any, **dumps_options: Any) -> str:
    """``record`` as strict JSON (RFC 8259, as jq and JavaScript read it): a non-finite number is ``null``, where
    Python's ``json`` writes ``NaN``/``Infinity``; anything else JSON has no type for is its ``str``."""
    return json.dumps(finite_or_null(record), default=str, allow_nan=False, **dumps_options)


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` through a hidden file beside it, renamed over it: a reader, or a process stopped
    meanwhile, finds the previous text or this one, never part of it."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text)
    os.replace(staging, path)


def emit_json(record: Any, enabled: bool) -> None:
    """``--json``: print the command's result as one JSON line, the last line of stdout (redirect it to keep it); a
    non-finite number is ``null`` (:func:`json_text`)."""
    if enabled:
        print(json_text(record))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed), 0 when there is none."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB")
"""The units :func:`size_text` writes above 1023 bytes, each 1024 of the one before."""


def size_text(n_bytes: int) -> str:
    """``n_bytes`` as every message writes a size, in the largest unit that shows it as 1 or more: ``1.5 GiB``,
    ``12.0 MiB``, ``21.0 KiB``, ``600 bytes`` (a tiny model's KV cache was "0.00 MiB")."""
    if n_bytes < 1024:
        return f"{n_bytes} byte{'' if n_bytes == 1 else 's'}"
    value = n_bytes / 1024
    for unit in SIZE_UNITS[:-1]:
        if round(value, 1) < 1024:  # 1048575 bytes is 1.0 MiB, not 1024.0 KiB
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {SIZE_UNITS[-1]}"
