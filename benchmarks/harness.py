"""What every benchmark script shares: the device, timing with the device synchronised, A/B alternation, medians, and
the JSON line that ends every script.

Ratios are measured in one process: the arms alternate within each repetition (ABBA..., so slow drifts of the machine
hit every arm alike) and the median over repetitions is reported. On the CPU each timing also records how many cores
other processes used meanwhile (``foreign_load``), so a noisy repetition can be recognised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from epas_lightning.inference import deepest_layers
from epas_lightning.model import LlamaConfig
from epas_lightning.runtime import json_text, resolve_device  # noqa: F401 - resolve_device: the scripts' --device
from epas_lightning.script_args import count

BENCH_EXTRA = 'pip install ".[bench]"'
"""How to install the peers the benchmarks compare against (``transformers``; see ``pyproject.toml``)."""


def sharing_layers(n_layer: int, fraction: float) -> list[int]:
    """The deepest ``round(fraction * n_layer)`` layers, at most ``n_layer - 1`` (layer 0 never shares)."""
    return deepest_layers(n_layer, min(max(round(fraction * n_layer), 0), n_layer - 1))


def shape_flags(parser: argparse.ArgumentParser, model: str, seq_len: int, batch_size: int) -> None:
    """``--model`` (a ``LlamaConfig`` preset), ``--seq-len`` and ``--batch-size``, with this script's defaults."""
    parser.add_argument("--model", default=model, help="LlamaConfig preset name")
    parser.add_argument("--seq-len", type=count, default=seq_len)
    parser.add_argument("--batch-size", type=count, default=batch_size)


def preset_config(name: str, context: int) -> LlamaConfig:
    """The ``name`` preset, its ``block_size`` raised to ``context`` tokens where the preset's is shorter."""
    config = LlamaConfig.from_name(name)
    return config if context <= config.block_size else LlamaConfig.from_name(name, block_size=context)


def token_batches(
    config: LlamaConfig, batch_size: int, seq_len: int, count: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """``count`` random training batches of shape (batch_size, seq_len + 1), on the CPU."""
    shape = (batch_size, seq_len + 1)
    return [torch.randint(0, config.vocab_size, shape, generator=generator) for _ in range(count)]


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context of ``--precision``: bf16 autocast for ``bf16-mixed``, else none."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole host incl. steal, ticks of this process), or None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    except (OSError, ValueError):
        return None
    return user + nice + system + irq + softirq + steal, int(utime) + int(stime)


def foreign_load(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float | None:
    """CPU cores that OTHER processes (or the hypervisor, as steal) used during an interval: timing noise."""
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0) / os.sysconf("SC_CLK_TCK") / seconds


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Seconds ``fn()`` took with the device synchronised at both ends, and the foreign CPU load meanwhile."""
    synchronize(device)
    ticks = cpu_ticks() if device.type == "cpu" else None
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, foreign_load(ticks, cpu_ticks(), seconds) if ticks is not None else None


def alternate(arms: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """``(rep, arm)`` in ABBA order: forward in even repetitions, backward in odd ones."""
    for rep in range(reps):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            yield rep, arm


def time_arms(
    steps: Mapping[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    warmup: int = 1,
    unit: str = "s",
    after_rep: Callable[[dict[str, list[float]], dict[str, list[float | None]]], object] | None = None,
    deadline: float = float("inf"),
) -> tuple[dict[str, list[float]], dict[str, list[float | None]]]:
    """Warm every arm up, then time one call per arm per repetition, alternating; seconds and foreign loads per arm.
    ``after_rep(times, loads)`` runs after each whole repetition; none starts past ``deadline`` (``time.monotonic``)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {arm: [] for arm in steps}
    loads: dict[str, list[float | None]] = {arm: [] for arm in steps}
    for rep, arm in alternate(list(steps), reps):
        if max(map(len, times.values())) == rep and time.monotonic() > deadline:
            break  # this repetition's first arm: none starts past the deadline
        seconds, load = timed(steps[arm], device)
        times[arm].append(seconds)
        loads[arm].append(load)
        other = "" if load is None else f"   (other processes: {load:.2f} cores)"
        print(f"  rep {rep}: {arm:12s} {seconds:8.3f} {unit}{other}", flush=True)
        if after_rep is not None and max(map(len, times.values())) == min(map(len, times.values())):
            after_rep(times, loads)  # every arm timed in this repetition
    return times, loads


def medians(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {key: statistics.median(v) for key, v in values.items()}


def emit(result: dict) -> dict:
    """Print the result as the script's last line, one JSON object (a non-finite number as null); return it."""
    print(json_text(result))
    return result
