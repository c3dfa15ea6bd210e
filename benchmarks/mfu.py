"""CPU model-FLOPs utilisation of a bf16-mixed dense training step against this machine's measured matmul peak.

1. The peak: square ``torch.mm`` in bf16 (and fp32, for context) for several sizes and the three operand layouts a
   linear layer's forward and backward use (``A @ B``, ``A @ B^T``, ``A^T @ B``); the best GFLOP/s (2 n^3 per
   product, best of ``--mm-reps``) over sizes and layouts is the peak. A layout whose product already took more than
   ``--mm-budget`` seconds is not tried at larger sizes.
2. The step: ``Llama`` of the ``--model`` shape (default llama-125m), dense, forward and cross-entropy under
   ``torch.autocast(bfloat16)`` (fp32 weights), backward, ``AdamW.step``, ``zero_grad``; one untimed warm-up step,
   then the median of ``--reps`` steps. Model FLOPs per step = ``batch * estimate_flops(config, 0, seq_len)``
   (``epas_lightning/flops.py``: 6 N s plus attention, the paper's convention).
3. ``mfu = model FLOPs/s / bf16 peak`` (target >= 0.40). For context the same step in fp32 is timed too, with
   ``mfu_fp32 = its model FLOPs/s / fp32 peak``.

CPUs without bf16 matrix units (AVX2-only Zen 3 here) run bf16 GEMMs far below fp32 and some layouts far below
others, so a bf16-mixed step here is slow (tens of seconds for llama-125m at seq 128): keep ``--seq-len`` small.

``--device cuda`` measures the same on a GPU (for context; the target is about this CPU): there TF32 is turned off
so the fp32 peak is plain fp32.

Usage::

    python benchmarks/mfu.py --model llama-125m --seq-len 128 --batch-size 1 --reps 2
    python benchmarks/mfu.py --quick      # tiny shapes, seconds (smoke test)

The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from harness import cpu_ticks, device_name, emit, foreign_load, preset_config, resolve_device, shape_flags, synchronize

from epas_lightning.errors import run_script
from epas_lightning.flops import estimate_flops
from epas_lightning.loss import train_loss
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.script_args import ScriptParser, count, positive_number

LAYOUTS = ("nn", "nt", "tn")
"""A @ B (input gradient of a linear layer), A @ B^T (forward), A^T @ B (weight gradient)."""
TARGET = 0.40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(p, model="llama-125m", seq_len=128, batch_size=1)
    p.add_argument("--reps", type=count, default=2, help="timed bf16-mixed steps (fp32: 2 more than this)")
    p.add_argument("--sizes", type=count, nargs="+", default=[512, 1024, 2048, 4096], help="square matmul sizes")
    p.add_argument("--mm-reps", type=count, default=3)
    p.add_argument(
        "--mm-budget", type=positive_number, default=2.0, help="seconds per product above which sizes stop growing"
    )
    p.add_argument("--no-fp32-step", action="store_true", help="skip the fp32 context step")
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="the target is CPU MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_quick("debug model, small matmuls", model="debug", seq_len=32, reps=1, sizes=[128, 256], mm_reps=1)
    return p.parse_args(argv)


def matmul_peak(dtype: torch.dtype, sizes: list[int], reps: int, budget: float, device: torch.device) -> dict:
    """Best GFLOP/s of square products per layout and overall."""
    table: dict[str, dict[int, float]] = {layout: {} for layout in LAYOUTS}
    for layout in LAYOUTS:
        for n in sorted(sizes):
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
            a = a.t() if layout == "tn" else a
            b = b.t() if layout == "nt" else b
            torch.mm(a, b)  # warm-up (oneDNN primitive creation)
            best = min(timed(lambda a=a, b=b: torch.mm(a, b), device) for _ in range(reps))
            table[layout][n] = 2 * n**3 / best / 1e9
            if best > budget:
                break
    best_layout, best_n = max(((lay, n) for lay in LAYOUTS for n in table[lay]), key=lambda k: table[k[0]][k[1]])
    return {
        "gflops": table[best_layout][best_n],
        "layout": best_layout,
        "size": best_n,
        "by_layout": {lay: {str(n): round(g, 2) for n, g in table[lay].items()} for lay in LAYOUTS},
    }


def timed(fn, device: torch.device) -> float:  # noqa: ANN001
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def step_seconds(
    config: LlamaConfig, args: argparse.Namespace, bf16: bool, reps: int, device: torch.device
) -> tuple[list[float], list]:
    """Times of ``reps`` dense training steps after one warm-up, and the foreign CPU load during each."""
    torch.manual_seed(args.seed)
    model = Llama(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = train_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times, loads = [], []
    for _ in range(reps):
        ticks = cpu_ticks() if device.type == "cpu" else None
        seconds = timed(step, device)
        times.append(seconds)
        loads.append(foreign_load(ticks, cpu_ticks(), seconds))
        print(f"  {'bf16-mixed' if bf16 else 'fp32'} step {seconds:8.4f} s", flush=True)
    return times, loads


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset_config(args.model, args.seq_len)
    print("matmul peak (GFLOP/s, best over sizes and layouts) ...", flush=True)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak means fp32, as on CPU
    peak_bf16 = matmul_peak(torch.bfloat16, args.sizes, args.mm_reps, args.mm_budget, device)
    peak_fp32 = matmul_peak(torch.float32, args.sizes, args.mm_reps, args.mm_budget, device)
    print(f"  bf16 {peak_bf16['gflops']:.1f} {peak_bf16['by_layout']}", flush=True)
    print(f"  fp32 {peak_fp32['gflops']:.1f} {peak_fp32['by_layout']}", flush=True)
    flops = args.batch_size * estimate_flops(config, 0, args.seq_len)
    bf16_times, bf16_loads = step_seconds(config, args, bf16=True, reps=args.reps, device=device)
    bf16_s = statistics.median(bf16_times)
    achieved = flops / bf16_s / 1e9
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "precision": "bf16-mixed",
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "model_flops_per_step": flops,
        "bf16_step_s": bf16_s,
        "achieved_gflops": achieved,
        "peak_bf16_gflops": peak_bf16["gflops"],
        "peak_fp32_gflops": peak_fp32["gflops"],
        "mfu": achieved / peak_bf16["gflops"],
        "mfu_vs_fp32_peak": achieved / peak_fp32["gflops"],
        "target": f"mfu >= {TARGET}",
        "target_met": achieved / peak_bf16["gflops"] >= TARGET,
        "peak_bf16": peak_bf16,
        "peak_fp32": peak_fp32,
        "bf16_step_seconds": bf16_times,
        "bf16_step_foreign_load": bf16_loads,
        "torch": torch.__version__,
    }
    if not args.no_fp32_step:
        fp32_times, fp32_loads = step_seconds(config, args, bf16=False, reps=args.reps + 2, device=device)
        fp32_s = statistics.median(fp32_times)
        result |= {
            "fp32_step_s": fp32_s,
            "fp32_achieved_gflops": flops / fp32_s / 1e9,
            "mfu_fp32": flops / fp32_s / 1e9 / peak_fp32["gflops"],
            "fp32_step_seconds": fp32_times,
            "fp32_step_foreign_load": fp32_loads,
        }
    fp32 = f", fp32 step {result['mfu_fp32']:.3f} of the fp32 peak" if "mfu_fp32" in result else ""
    print(
        f"bf16-mixed step {bf16_s:.2f} s = {achieved:.1f} GFLOP/s: mfu {result['mfu']:.3f} of the bf16 peak "
        f"{peak_bf16['gflops']:.1f} ({result['mfu_vs_fp32_peak']:.3f} of the fp32 peak){fp32}"
    )
    emit(result)
    return result


if __name__ == "__main__":
    run_script(main)
