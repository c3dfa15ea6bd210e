"""How far the chunked linear cross-entropy's gradients in 16-bit compute lie from exact ones, against the plain path.

The same random hidden states, LM head and targets go through ``F.cross_entropy(hidden @ weight.T)`` under autocast
(the plain path) and through ``linear_ce.linear_cross_entropy`` at several chunk sizes; each gradient is compared
with the fp64 plain path (relative Frobenius error). The default shape splits into 32, 4 and 1 chunks.

    python benchmarks/linear_ce_precision.py                          # CPU autocast bf16
    python benchmarks/linear_ce_precision.py --quick                  # tiny shape (smoke test)
    python benchmarks/linear_ce_precision.py --device cuda --tokens 16384 --vocab 32000 --dim 2048
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import device_name, emit, resolve_device

from epas_lightning.errors import run_script
from epas_lightning.linear_ce import linear_cross_entropy
from epas_lightning.script_args import ScriptParser, count


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def gradients(loss_fn, hidden, weight, targets, dtype, device_type):  # noqa: ANN001, ANN201
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        loss_fn(hidden, weight, targets).backward()
    return {"hidden": hidden.grad.double(), "weight": weight.grad.double()}


def relative_errors(grads: dict, exact: dict) -> dict[str, float]:
    return {name: ((grads[name] - exact[name]).norm() / exact[name].norm()).item() for name in exact}


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tokens", type=count, default=4096)
    parser.add_argument("--dim", type=count, default=256)
    parser.add_argument("--vocab", type=count, default=2000)
    parser.add_argument("--chunks", type=count, nargs="+", default=[32, 4, 1])
    parser.add_argument("--threads", type=count, default=None)
    parser.add_quick("256 tokens, d 32, vocab 300", tokens=256, dim=32, vocab=300)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=generator).to(device)
    weight = (torch.randn(args.vocab, args.dim, generator=generator) * args.dim**-0.5).to(device)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    dtype = getattr(torch, args.dtype)

    exact = gradients(plain, hidden.double(), weight.double(), targets, None, device.type)
    errors = {"plain": relative_errors(gradients(plain, hidden, weight, targets, dtype, device.type), exact)}
    for chunks in args.chunks:
        rows = -(-args.tokens // chunks)

        def chunked(h, w, t, rows=rows):  # noqa: ANN001, ANN202
            return linear_cross_entropy(h, w, t, chunk_rows=rows)

        grads = gradients(chunked, hidden, weight, targets, dtype, device.type)
        errors[f"chunked_{chunks}"] = relative_errors(grads, exact)
    for arm, errs in errors.items():
        print(f"{arm:>12}: " + ", ".join(f"{name} {err:.2e}" for name, err in errs.items()))
    emit(
        {
            "device": device.type,
            "device_name": device_name(device),
            "dtype": args.dtype,
            "shape": {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab},
            "relative_error_vs_fp64": errors,
        }
    )


if __name__ == "__main__":
    run_script(main)
