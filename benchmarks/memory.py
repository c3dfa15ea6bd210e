"""Peak memory of one training step: dense vs EPAS (QK sharing), with and without activation checkpointing.

A step is forward, cross-entropy on random tokens, backward and an AdamW step (its state already exists: a warm-up
step runs first). Reported per arm: the step's peak allocation above what was allocated before it (weights,
gradients-free optimizer state), in MiB.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- CPU: the profiler's allocator accounting (``profile_memory=True``): each op's own net allocation and the frees
  between ops, summed in time order; the maximum of the running total (op granularity: a transient inside one op
  that it frees before returning is not seen).

EPAS arms share the deepest ``round(sharing * n_layer)`` layers: those keep no Q/K activations for backward.

Usage::

    python benchmarks/memory.py --model demo --seq-len 256 --batch-size 4

A table goes to stdout, and the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse

import torch
from harness import device_name, emit, resolve_device, shape_flags, sharing_layers
from torch.profiler import ProfilerActivity, profile

from epas_lightning.errors import run_script
from epas_lightning.loss import train_loss
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.parallel import parallelize
from epas_lightning.script_args import ScriptParser, fraction

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(p, model="demo", seq_len=256, batch_size=4)
    p.add_argument("--sharing", type=fraction, default=0.5, help="fraction of layers that share in the EPAS arms")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_step(model: Llama, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    train_loss(model, tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cpu_step_peak(step) -> int:
    """Peak bytes above the starting point during ``step()``, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # per op its own net allocation (children excluded), plus "[memory]" events: frees outside any op
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def cuda_step_peak(step, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(args: argparse.Namespace, device: torch.device, shared: list[int], checkpointing: bool) -> float:
    torch.manual_seed(args.seed)
    config = LlamaConfig.from_name(args.model, block_size=args.seq_len)
    model = parallelize(Llama(config).to(device), None, activation_checkpointing=checkpointing)
    model.set_shared_layers(shared)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    train_step(model, optimizer, tokens)  # warm-up: optimizer state exists before the measured step

    def step():
        train_step(model, optimizer, tokens)

    peak = cuda_step_peak(step, device) if device.type == "cuda" else cpu_step_peak(step)
    return peak / MIB


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    n_layer = LlamaConfig.from_name(args.model).n_layer
    region = sharing_layers(n_layer, args.sharing)
    arms = {}
    for checkpointing in (False, True):
        for label, shared in (("dense", []), ("epas", region)):
            key = f"{label}{'+ac' if checkpointing else ''}"
            arms[key] = round(measure(args, device, shared, checkpointing), 1)
            print(f"{key:10s} peak above start of step: {arms[key]:9.1f} MiB")
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "n_shared": len(region),
        "n_layer": n_layer,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "peak_mib": arms,
        "epas_saving": round(1 - arms["epas"] / arms["dense"], 4),
        "epas_saving_with_ac": round(1 - arms["epas+ac"] / arms["dense+ac"], 4),
    }
    emit(result)
    return result


if __name__ == "__main__":
    run_script(main)
