"""Data throughput: ``prepare`` tokens/s and ``TokenDataModule`` loader tokens/s, on the standard library's sources.

    python benchmarks/data_throughput.py --mb 8 --vocab-size 4096 --seq-len 256 --batch-size 8

Prepare: the first ``--mb`` MB of the running interpreter's stdlib (text files), a byte-level BPE trained on it,
``--num-workers`` tokenizer processes. Loader: shuffled training batches of ``batch_size x (seq_len + 1)`` tokens from
the prepared stream, counted as ``batch_size x seq_len`` training tokens. The last line is JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from harness import emit

from epas_lightning.data import TokenDataModule
from epas_lightning.data.builtin import collect_source_files, stdlib_root
from epas_lightning.data.prepare import prepare_dataset
from epas_lightning.data.writing import default_num_workers
from epas_lightning.errors import ConfigError, run_script
from epas_lightning.script_args import ScriptParser, count, positive_number, whole_number


def main() -> None:
    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=positive_number, default=8.0, help="MB of stdlib sources to prepare")
    p.add_argument("--vocab-size", type=count, default=4096)
    p.add_argument("--seq-len", type=count, default=256)
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--num-workers", type=count, default=default_num_workers(), help="prepare processes")
    p.add_argument("--loader-workers", type=whole_number(0), default=0, help="dataloader workers")
    p.add_argument("--batches", type=count, default=2000)
    args = p.parse_args()

    files, _ = collect_source_files(stdlib_root(), int(args.mb * 1e6))
    if not files:  # whole files only: a budget below the smallest one selects none
        raise ConfigError(f"{args.mb:g} MB selects no source file", "--mb", "raise it (the default is 8)")
    with tempfile.TemporaryDirectory() as tmp:
        out = prepare_dataset(
            [f.path for f in files],
            Path(tmp) / "data",
            train_tokenizer=True,
            vocab_size=args.vocab_size,
            val_fraction=0.02,
            num_workers=args.num_workers,
        )
        meta = json.loads((out / "meta.json").read_text())
        tokenize_s = sum(v for k, v in meta["seconds_by_step"].items() if k.startswith("tokenize"))

        dm = TokenDataModule(
            str(out),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            vocab_size=args.vocab_size,
            num_workers=args.loader_workers,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        n_batches, start = 0, None
        while n_batches < args.batches:
            for _batch in loader:
                if start is None:  # the first batch includes opening the stream
                    start = time.perf_counter()
                    continue
                n_batches += 1
                if n_batches >= args.batches:
                    break
        load_s = time.perf_counter() - start
    load_tokens_per_s = n_batches * args.batch_size * args.seq_len / load_s
    result = {
        "bytes": meta["bytes"],
        "documents": meta["documents"],
        "tokens": meta["tokens"],
        "prepare_seconds": meta["seconds"],
        "prepare_seconds_by_step": meta["seconds_by_step"],
        "prepare_tokens_per_s": round(meta["tokens"] / tokenize_s),
        "prepare_tokens_per_s_with_tokenizer_training": round(meta["tokens"] / meta["seconds"]),
        "load_batches": n_batches,
        "load_tokens_per_s": round(load_tokens_per_s),
        "num_workers": args.num_workers,
        "loader_workers": args.loader_workers,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    emit(result)


if __name__ == "__main__":
    run_script(main)
