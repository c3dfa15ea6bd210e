"""Training throughput of dense vs EPAS (QK sharing) on one model, in one process.

What it measures: tokens/s of full training steps (forward, cross-entropy on random tokens, backward, AdamW step,
``zero_grad(set_to_none=True)``) for two arms that use the SAME model and optimizer:

- dense: every layer computes its own Q/K;
- EPAS: the deepest ``round(sharing * n_layer)`` layers share (never layer 0), so they skip q_proj, k_proj and RoPE
  in forward and backward, and AdamW skips their q/k weights (their grad stays None).

The arms alternate per repetition in ABBA order (dense/EPAS, EPAS/dense, ...) so drift (thermal, other load) hits
both; warm-up steps of both arms are not timed. The median tokens/s of each arm gives
``speedup = epas / dense - 1``. On CPU each rep also records how many cores OTHER processes used meanwhile; a shared
machine makes single steps several times slower, so the summary warns and gives the speedup over the unloaded reps too
(use more ``--reps`` there: the effect is a few percent, and one loaded rep moves a 5-rep median by more).

Target (the issue): ``speedup >= 0.9 * flop_cut``, where ``flop_cut`` is the analytic fraction of training FLOPs that
sharing removes (``epas_lightning.flops.flop_cut``, the paper's Table 1 convention).

``--attention-reuse`` adds a third arm, ``reuse``: the same EPAS region, but the source layer keeps its attention
probabilities and the sharing layers compute only P @ V (``Llama.attention_reuse``). All three arms alternate
(forward, then reverse order). ``speedup_reuse = reuse / dense - 1``; its target is ``reuse_over_recompute =
speedup_reuse / speedup >= 2`` at seq >= 1024.

Usage::

    python benchmarks/train_throughput.py --model llama-125m --seq-len 512 --sharing 0.5

A human-readable table goes to stdout, and the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from harness import (
    autocast_context,
    cpu_ticks,
    device_name,
    emit,
    foreign_load,
    preset_config,
    resolve_device,
    sharing_layers,
    synchronize,
    token_batches,
)

from epas_lightning.errors import run_script
from epas_lightning.flops import estimate_flops, flop_cut, peak_flops
from epas_lightning.loss import train_loss
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.script_args import ScriptParser, count, fraction, positive_number, whole_number

REUSE_TARGET = 2.0
"""With --attention-reuse: speedup_reuse must reach this multiple of the recompute path's speedup."""
TARGET_FRACTION = 0.9
"""The target: the measured speedup must reach this fraction of the analytic FLOP cut."""
NOISY_LOAD = 0.1
"""CPU cores used by other processes during a rep above which the summary warns that timings are noisy."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-125m", help="LlamaConfig preset name")
    p.add_argument("--seq-len", type=count, default=512)
    p.add_argument("--sharing", type=fraction, default=0.5, help="fraction of layers that share in the EPAS arm")
    p.add_argument("--batch-size", type=count, default=1)
    p.add_argument("--reps", type=count, default=5, help="timed repetitions per arm")
    p.add_argument("--steps-per-rep", type=count, default=1, help="training steps in one timed repetition")
    p.add_argument("--warmup", type=whole_number(0), default=1, help="untimed steps per arm before timing")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16-mixed", "32-true", "bf16-true"),
        default="auto",
        help="auto: bf16-mixed on CUDA, 32-true on CPU (CPUs without bf16 units run bf16 matmuls 5-60x slower)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--lr", type=positive_number, default=1e-4, help="AdamW learning rate (does not affect the work done)"
    )
    p.add_argument(
        "--fused-adamw",
        action="store_true",
        help="use AdamW(fused=True) instead of EPASModule's default AdamW (a for-loop over parameters on CPU)",
    )
    p.add_argument(
        "--attention-reuse",
        action="store_true",
        help="add an EPAS arm that reuses the source layer's attention probabilities (P @ V in sharing layers)",
    )
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="CPU: keep large tensors in glibc's heap (epas_lightning.cpu.tune_glibc_malloc) instead of fresh mmaps",
    )
    p.add_argument(
        "--peak-tflops",
        type=positive_number,
        default=None,
        help="device peak for MFU (default: the dense bf16 peak of a known GPU: H100/H200 SXM 989 TFLOP/s)",
    )
    return p.parse_args(argv)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    """``--peak-tflops``, else the dense bf16 peak of a known GPU (``epas_lightning.flops.peak_flops``)."""
    if args.peak_tflops:
        return args.peak_tflops
    if args.precision == "32-true":
        return None
    peak = peak_flops(device)
    return peak / 1e12 if peak else None


def arms(args: argparse.Namespace) -> tuple[str, ...]:
    return ("dense", "epas", "reuse") if args.attention_reuse else ("dense", "epas")


@dataclass
class Bench:
    """One model and optimizer, plus the fixed random batches both arms train on."""

    model: Llama
    optimizer: torch.optim.Optimizer
    batches: list[torch.Tensor]  # (B, T + 1) token batches
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    epas_layers: list[int]
    step_count: int = field(default=0)

    def set_arm(self, arm: str) -> None:
        self.model.set_shared_layers([] if arm == "dense" else self.epas_layers)
        self.model.attention_reuse = arm == "reuse"

    def train_step(self) -> None:
        batch = self.batches[self.step_count % len(self.batches)]
        self.step_count += 1
        with self.autocast():
            loss = train_loss(self.model, batch)  # as EPASModule computes it
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_steps(self, arm: str, steps: int) -> tuple[float, float | None]:
        """Seconds for ``steps`` training steps of ``arm`` (device synchronised at both ends), and the CPU load
        other processes put on the host meanwhile (see ``foreign_load``; CPU runs only)."""
        self.set_arm(arm)
        synchronize(self.device)
        ticks = cpu_ticks() if self.device.type == "cpu" else None
        start = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return seconds, foreign_load(ticks, cpu_ticks(), seconds)


def build_bench(args: argparse.Namespace, device: torch.device) -> tuple[Bench, LlamaConfig]:
    if args.precision == "auto":
        args.precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    torch.manual_seed(args.seed)
    config = preset_config(args.model, args.seq_len)
    model = Llama(config).to(device)
    if args.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.train()
    # The optimizer EPASModule configures (default implementation: for-loop on CPU, foreach on CUDA), or its fused form.
    fused = {"fused": True} if args.fused_adamw else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        b.to(device) for b in token_batches(config, args.batch_size, args.seq_len, args.steps_per_rep, generator)
    ]
    bench = Bench(
        model=model,
        optimizer=optimizer,
        batches=batches,
        autocast=autocast_context(args.precision, device),
        device=device,
        epas_layers=sharing_layers(config.n_layer, args.sharing),
    )
    return bench, config


def run_reps(bench: Bench, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float | None]]]:
    """Warm up every arm, then time ``reps`` repetitions per arm in ABBA order: seconds and foreign load per rep."""
    names = arms(args)
    for arm in names:
        bench.timed_steps(arm, args.warmup)
    times: dict[str, list[float]] = {arm: [] for arm in names}
    loads: dict[str, list[float | None]] = {arm: [] for arm in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for arm in order:
            seconds, load = bench.timed_steps(arm, args.steps_per_rep)
            times[arm].append(seconds)
            loads[arm].append(load)
            other = "" if load is None else f"   (other processes: {load:.2f} cores)"
            print(f"  rep {rep}: {arm:5s} {seconds:8.3f} s{other}", flush=True)
    return times, loads


def clean_reps(loads: dict[str, list[float | None]]) -> list[int]:
    """Reps in which no arm shared the CPU with other processes (all reps where the load is unknown)."""
    per_rep = zip(*loads.values(), strict=True)
    return [i for i, rep in enumerate(per_rep) if all(x is None or x <= NOISY_LOAD for x in rep)]


def median_speedup(tps: dict[str, list[float]], reps: list[int], arm: str = "epas") -> float | None:
    """``arm`` / dense - 1 from the median tokens/s of each arm over ``reps`` (None if empty)."""
    if not reps:
        return None
    return statistics.median(tps[arm][i] for i in reps) / statistics.median(tps["dense"][i] for i in reps) - 1.0


def summarize(
    args: argparse.Namespace,
    config: LlamaConfig,
    bench: Bench,
    times: dict[str, list[float]],
    loads: dict[str, list[float | None]],
) -> dict:
    tokens_per_rep = args.steps_per_rep * args.batch_size * args.seq_len
    tps = {arm: [tokens_per_rep / t for t in times[arm]] for arm in times}
    dense, epas = statistics.median(tps["dense"]), statistics.median(tps["epas"])
    n_shared = len(bench.epas_layers)
    cut = flop_cut(config, n_shared, args.seq_len)
    speedup = epas / dense - 1.0
    paired = [d / e - 1.0 for d, e in zip(times["dense"], times["epas"], strict=True)]
    clean = clean_reps(loads)
    name = device_name(bench.device)
    peak = peak_tflops(args, bench.device)
    flops_per_token = {  # the reuse arm's sharing layers skip QK^T too
        arm: estimate_flops(config, 0 if arm == "dense" else n_shared, args.seq_len, attention_reuse=arm == "reuse")
        / args.seq_len
        for arm in times
    }
    mfu = (
        {f"mfu_{arm}": statistics.median(tps[arm]) * flops_per_token[arm] / (peak * 1e12) for arm in times}
        if peak
        else {}
    )
    reuse: dict = {}
    if "reuse" in times:
        speedup_reuse = statistics.median(tps["reuse"]) / dense - 1.0
        ratio = speedup_reuse / speedup if speedup > 0 else None
        reuse = {
            "reuse_tokens_per_s": statistics.median(tps["reuse"]),
            "speedup_reuse": speedup_reuse,
            "reuse_over_recompute": ratio,
            "reuse_target_met": ratio is not None and ratio >= REUSE_TARGET,
            "paired_speedup_reuse_median": statistics.median(
                d / r - 1.0 for d, r in zip(times["dense"], times["reuse"], strict=True)
            ),
            "speedup_reuse_clean": median_speedup(tps, clean, "reuse"),
            "reuse_rep_seconds": times["reuse"],
            "reuse_rep_foreign_load": loads["reuse"],
        }
    return {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": bench.device.type,
        "device_name": name,
        "peak_tflops": peak,
        **mfu,
        "n_layer": config.n_layer,
        "n_shared": n_shared,
        "shared_layers": bench.epas_layers,
        "flop_cut": cut,
        "target_speedup": TARGET_FRACTION * cut,
        "dense_tokens_per_s": dense,
        "epas_tokens_per_s": epas,
        "speedup": speedup,
        "speedup_over_flop_cut": speedup / cut if cut else None,
        "target_met": speedup >= TARGET_FRACTION * cut,
        "paired_speedup_median": statistics.median(paired),
        "dense_tokens_per_s_best": max(tps["dense"]),
        "epas_tokens_per_s_best": max(tps["epas"]),
        "speedup_best": max(tps["epas"]) / max(tps["dense"]) - 1.0,
        "clean_reps": len(clean),
        "speedup_clean": median_speedup(tps, clean),
        "reps": args.reps,
        "steps_per_rep": args.steps_per_rep,
        "warmup": args.warmup,
        "order": "ABBA",
        "optimizer": "AdamW(fused=True)" if args.fused_adamw else "AdamW",
        "dense_rep_seconds": times["dense"],
        "epas_rep_seconds": times["epas"],
        "dense_rep_foreign_load": loads["dense"],
        "epas_rep_foreign_load": loads["epas"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "tune_malloc": args.tune_malloc,
        **reuse,
    }


def print_table(r: dict) -> None:
    print()
    print(f"{r['model']}  seq {r['seq_len']}  batch {r['batch_size']}  {r['precision']}  on {r['device_name']}")
    print(
        f"torch {r['torch']}, {r['threads']} threads, {r['optimizer']}, "
        f"{r['reps']} reps x {r['steps_per_rep']} steps, ABBA order"
    )
    print(f"{'arm':<8}{'shared layers':>15}{'median tok/s':>15}{'best tok/s':>13}   rep seconds")
    for arm, n in (("dense", 0), ("epas", r["n_shared"])):
        secs = " ".join(f"{t:.2f}" for t in r[f"{arm}_rep_seconds"])
        print(f"{arm:<8}{n:>15}{r[f'{arm}_tokens_per_s']:>15.1f}{r[f'{arm}_tokens_per_s_best']:>13.1f}   {secs}")
    print(f"flop_cut {r['flop_cut']:.4f}  target speedup >= {r['target_speedup']:.4f}")
    if r["peak_tflops"]:
        mfus = "  ".join(f"{k[4:]} {v:.3f}" for k, v in r.items() if k.startswith("mfu_"))
        print(f"MFU against {r['peak_tflops']:g} TFLOP/s (paper FLOPs convention, attention not halved): {mfus}")
    ratio = "n/a" if r["speedup_over_flop_cut"] is None else f"{r['speedup_over_flop_cut']:.3f}"
    print(
        f"speedup {r['speedup']:+.4f} (paired median {r['paired_speedup_median']:+.4f}, "
        f"best-rep {r['speedup_best']:+.4f})  speedup/flop_cut {ratio}  target met: {r['target_met']}"
    )
    if "speedup_reuse" in r:
        ratio = "n/a" if r["reuse_over_recompute"] is None else f"{r['reuse_over_recompute']:.2f}"
        secs = " ".join(f"{t:.2f}" for t in r["reuse_rep_seconds"])
        print(f"{'reuse':<8}{r['n_shared']:>15}{r['reuse_tokens_per_s']:>15.1f}{'':>13}   {secs}")
        print(
            f"attention reuse: speedup {r['speedup_reuse']:+.4f} = {ratio}x the recompute path's "
            f"(target >= {REUSE_TARGET:g}x): {r['reuse_target_met']}"
        )
    known = [x for x in r["dense_rep_foreign_load"] + r["epas_rep_foreign_load"] if x is not None]
    if known and max(known) > NOISY_LOAD:
        print(f"WARNING: other processes used up to {max(known):.2f} CPU cores during timed reps: numbers are noisy.")
        clean = "n/a" if r["speedup_clean"] is None else f"{r['speedup_clean']:+.4f}"
        print(f"  reps without such load: {r['clean_reps']}/{r['reps']}, speedup from their medians {clean}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.tune_malloc:
        from epas_lightning.cpu import tune_glibc_malloc

        print(f"glibc malloc tuned: {tune_glibc_malloc()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bench, config = build_bench(args, device)
    print(f"dense vs EPAS: {args.model}, sharing layers {bench.epas_layers}, device {device}", flush=True)
    times, loads = run_reps(bench, args)
    result = summarize(args, config, bench, times, loads)
    print_table(result)
    emit(result)
    return result


if __name__ == "__main__":
    run_script(main)
