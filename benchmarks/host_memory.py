"""Host-memory peak of the commands that read a checkpoint, as multiples of the checkpoint's weight bytes.

Builds a random model's checkpoints in a temporary folder: a ``.ckpt`` as ``fit`` writes it (fp32, with AdamW state),
the same in bf16, an FSDP2 (DCP) folder, then a consolidated and a Hugging Face folder made from the fp32 one. Each
command then runs in a fresh process, watched every 2 ms through ``/proc`` (Linux only): its peak resident memory
(``VmHWM``, which counts the pages of memory-mapped files it read) and its peak private memory (``RssAnon``: what can
run a machine out of memory), minus those of a process that only imports the commands.

Usage::

    python benchmarks/host_memory.py                     # 4 layers, d 1024, vocab 32000: 410 MiB of fp32 weights
    python benchmarks/host_memory.py --layers 8 --dim 2048

A table goes to stdout, and the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from harness import emit

from epas_lightning.errors import ConfigError, run_script
from epas_lightning.script_args import ScriptParser, count

MIB = 2**20
CHILD = """
import sys
from epas_lightning.cli import main
import epas_lightning.consolidation, epas_lightning.hf.export, epas_lightning.inspect_cli  # noqa: baseline imports
from epas_lightning.inference.generate_cli import load_for_inference
args = sys.argv[1:]
if args[0] == "load":
    load_for_inference(args[1], "cpu", args[2])
elif args[0] != "baseline":
    sys.exit(main(args))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=count, default=4)
    p.add_argument("--dim", type=count, default=1024, help="n_embd (heads of 64; SwiGLU 2 x dim)")
    p.add_argument("--vocab", type=count, default=32000)
    p.add_argument("--threads", type=count, default=1, help="torch threads of each command's process")
    p.add_argument("--cases", nargs="+", default=[], help="measure only the cases whose names contain one of these")
    p.add_quick("a 2-layer d 128 model", layers=2, dim=128, vocab=512)
    return p.parse_args(argv)


def build_checkpoints(root: Path, layers: int, dim: int, vocab: int) -> int:
    """The checkpoints the commands read, under ``root``; returns the fp32 weight bytes."""
    from torch.distributed.checkpoint import save as dcp_save

    from epas_lightning import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig.from_name(
        "debug", n_layer=layers, n_embd=dim, n_head=dim // 64, n_kv_head=dim // 64, intermediate_size=2 * dim,
        vocab_size=vocab, block_size=256,
    )  # fmt: skip
    model = Llama(config)
    shared = list(range(layers - 1, layers // 2 - 1, -1))
    model.set_shared_layers(shared)
    region = {"layers": shared, "order": "deep_first"}
    for dtype, name in ((torch.float32, "fp32.ckpt"), (torch.bfloat16, "bf16.ckpt")):
        state = {"model." + k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        weights = [k for k, v in state.items() if v.is_floating_point()]
        adamw = {i: {"step": torch.tensor(6.0), "exp_avg": torch.randn_like(state[k]),
                     "exp_avg_sq": torch.rand_like(state[k])} for i, k in enumerate(weights)}  # fmt: skip
        optimizer = {"state": adamw, "param_groups": [{"lr": 1e-3, "params": list(range(len(weights)))}]}
        record = {"state_dict": state, "model_config": config.to_dict(), "sharing_region": region, "global_step": 6}
        torch.save({**record, "epoch": 0, "optimizer_states": [optimizer], "callbacks": {}}, root / name)
        del state, adamw, optimizer
    with warnings.catch_warnings():  # DCP's "torch.distributed is disabled ... a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        state = {"model." + k: v for k, v in model.state_dict().items()}
        dcp_save({"state_dict": state}, checkpoint_id=root / "sharded", no_dist=True)
    torch.save(
        {"model_config": config.to_dict(), "sharing_region": region, "global_step": 6}, root / "sharded" / "meta.pt"
    )
    return 4 * sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())


def peaks(args: list[str], out: Path, threads: int = 1) -> tuple[int | None, int | None]:
    """Peak resident and peak private bytes of ``python -c CHILD args``, read from ``/proc`` (``VmHWM``, ``RssAnon``;
    ``None`` without it). Not ``ru_maxrss``: it keeps the high-water mark of the image before ``exec``, here this
    script's, which holds the checkpoints it built."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seen: dict[str, int] = {}
    while True:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in ("VmHWM", "RssAnon"):
                        seen[name] = max(seen.get(name, 0), int(value.split()[0]) * 1024)
        except OSError:
            pass
        pid, code, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.002)
    if code:
        raise RuntimeError(f"{' '.join(args)} failed:\n{process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return seen.get("VmHWM"), seen.get("RssAnon")


def make_folder(command: str, checkpoint: Path, output: Path) -> None:
    """``consolidate`` or ``export`` ``checkpoint`` to ``output`` in this process (what they take is not measured)."""
    from epas_lightning.consolidation import consolidate
    from epas_lightning.hf.export import export

    with warnings.catch_warnings():  # this random model's checkpoint records no tokenizer, which they say
        warnings.simplefilter("ignore")
        {"consolidate": consolidate, "export": export}[command](checkpoint, output)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="epas_host_memory_") as scratch:
        root, out = Path(scratch) / "ckpt", Path(scratch) / "out"
        root.mkdir()
        out.mkdir()
        fp32_bytes = build_checkpoints(root, args.layers, args.dim, args.vocab)
        cases = {
            f"{command} {source}": [command, "--checkpoint", str(root / source), "--output", str(out / command)]
            for command in ("consolidate", "export")
            for source in ("fp32.ckpt", "bf16.ckpt", "sharded")
        }
        cases |= {f"inspect {s}": ["inspect", "--checkpoint", str(root / s)] for s in ("fp32.ckpt", "sharded")}
        cases |= {
            f"load {source} as {dtype}": ["load", str(root / source), dtype]
            for source, dtype in (("fp32.ckpt", "float32"), ("bf16.ckpt", "bfloat16"), ("sharded", "float32"),
                                  ("consolidated", "float32"), ("hf", "float32"))
        }  # fmt: skip
        names = list(cases)
        cases = {name: case for name, case in cases.items() if not args.cases or any(c in name for c in args.cases)}
        if not cases:
            raise ConfigError("no case's name contains any of these", "--cases", f"pick from: {', '.join(names)}")
        for command, folder in (("consolidate", "consolidated"), ("export", "hf")):  # made from the fp32 checkpoint
            if any(case[1] == str(root / folder) for case in cases.values()):
                make_folder(command, root / "fp32.ckpt", root / folder)
        baseline = [peaks(["baseline"], out, args.threads) for _ in range(2)]
        if baseline[0][0] is None:
            raise ConfigError(
                "this system has no /proc/<pid>/status to read memory from", "host_memory.py", "run it on Linux"
            )
        base_rss, base_private = min(b[0] for b in baseline), min(b[1] for b in baseline)
        rows = {}
        for name, case in cases.items():
            for leftover in out.iterdir():  # the previous case's output (this script's own temporary folder)
                shutil.rmtree(leftover)
            rss, private = peaks(case, out, args.threads)
            weights = fp32_bytes // 2 if "bf16" in name else fp32_bytes
            rows[name] = {
                "rss_x": round((rss - base_rss) / weights, 2),
                "private_x": round((private - base_private) / weights, 2),
            }
    print(f"{args.layers} layers, d {args.dim}, vocab {args.vocab}: {fp32_bytes / MIB:.0f} MiB of fp32 weights; "
          f"baseline {base_rss / MIB:.0f} MiB resident")  # fmt: skip
    print(f"{'command':<32}{'resident x weights':>20}{'private x weights':>20}")
    for name, row in rows.items():
        print(f"{name:<32}{row['rss_x']:>20.2f}{row['private_x']:>20.2f}")
    return emit({"weights_mib": round(fp32_bytes / MIB, 1), "torch": torch.__version__, "peaks": rows})


if __name__ == "__main__":
    run_script(main)
