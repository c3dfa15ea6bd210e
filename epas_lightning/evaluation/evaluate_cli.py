"""``python -m epas_lightning evaluate --checkpoint CKPT --sharing-layers N|all [--data DIR] [--tasks T.jsonl ...]``.

Scores one trained model at one or every sharing-region length (the deepest N layers share; ``all`` sweeps
0..trained maximum): held-out perplexity on a prepared data directory's ``val`` split, and multiple-choice accuracy
(``acc``, ``acc_norm``) on local JSONL tasks. Prints a table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epas_lightning.checkpoint import LoadedModel, load_model
from epas_lightning.evaluation.multiple_choice import evaluate_task, load_task
from epas_lightning.evaluation.perplexity import perplexity_of_batches
from epas_lightning.inference.generate import set_region


def region_lengths(spec: str | None, loaded: LoadedModel, force: bool) -> list[int]:
    """``None``: the trained region; ``all``: 0..trained max (0..n_layer-1 with ``force``); else one N."""
    if spec is None:
        return [loaded.max_shared]
    if spec == "all":
        top = loaded.model.config.n_layer - 1 if force else loaded.max_shared
        return list(range(top + 1))
    try:
        return [int(spec)]
    except ValueError:
        raise ValueError(f"--sharing-layers takes a layer count or 'all', got {spec!r}.") from None


def evaluate(
    checkpoint: str | Path,
    sharing_layers: str | None = None,
    data: str | Path | None = None,
    tasks: list[str | Path] = (),
    max_batches: int | None = None,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
) -> list[dict]:
    """One row per region length: ``{"sharing_layers", "val_loss", "val_ppl", "<task>/acc", "<task>/acc_norm"}``."""
    loaded = load_model(checkpoint, device)
    lengths = region_lengths(sharing_layers, loaded, force)
    for n in lengths:  # fail on a bad region before any scoring
        set_region(loaded.model, n, loaded.max_shared, force)
    questions = {Path(t).stem: load_task(t) for t in tasks}
    text_tokenizer = None
    if questions:
        from epas_lightning.data import load_tokenizer

        path = tokenizer or loaded.tokenizer_path
        if path is None:
            raise ValueError(f"{checkpoint} records no tokenizer; pass --tokenizer to score --tasks.")
        text_tokenizer = load_tokenizer(path)
    loader = None
    if data is not None:  # set up (and checked) once; every region reads the same batches
        from epas_lightning.data import heldout_loader

        config = loaded.model.config
        loader = heldout_loader(data, config.block_size, batch_size, config.vocab_size)
    rows = []
    for n in lengths:
        set_region(loaded.model, n, loaded.max_shared, force)
        row: dict = {"sharing_layers": n}
        if loader is not None:
            result = perplexity_of_batches(loaded.model, loader, max_batches)
            row.update(val_loss=result["loss"], val_ppl=result["ppl"], val_tokens=result["tokens"])
        for name, items in questions.items():
            result = evaluate_task(loaded.model, text_tokenizer, items, batch_size)
            row.update({f"{name}/acc": result["acc"], f"{name}/acc_norm": result["acc_norm"]})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (numbers to 4 decimals)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:  # noqa: ANN001
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epas_lightning evaluate",
        description="Held-out perplexity and multiple-choice accuracy of a checkpoint at given sharing-region lengths.",
    )
    parser.add_argument("--checkpoint", "-c", type=Path, required=True, help=".ckpt, FSDP2 dir or consolidated dir")
    parser.add_argument(
        "--sharing-layers",
        default=None,
        help="region length N (deepest N layers share), or 'all' for 0..trained max; default: the trained region",
    )
    parser.add_argument("--data", type=Path, default=None, help="prepared data dir: perplexity on its val split")
    parser.add_argument("--tasks", type=Path, nargs="*", default=[], help='JSONL tasks {"context","choices","label"}')
    parser.add_argument("--max-batches", type=int, default=None, help="held-out batches to score (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer for --tasks (default: recorded one)")
    parser.add_argument("--force", action="store_true", help="allow regions longer than the trained one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.data is None and not args.tasks:
        parser.error("nothing to evaluate: give --data (perplexity) and/or --tasks (multiple choice).")
    rows = evaluate(
        args.checkpoint,
        args.sharing_layers,
        args.data,
        args.tasks,
        args.max_batches,
        args.batch_size,
        args.tokenizer,
        args.force,
        args.device,
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
