"""``python -m epas_lightning evaluate --checkpoint CKPT [--sharing-layers N|all] [--data DIR] [--tasks T.jsonl ...]``.

Scores one trained model at one or every sharing-region length (the first N layers of its trained region; ``all``
sweeps 0..trained maximum): the held-out loss of ``fit`` and ``test`` (:mod:`epas_lightning.evaluation.perplexity`)
on a prepared data directory's ``val`` split (the run's own data by default), with the tokens it scored, and
multiple-choice accuracy (``acc``, ``acc_norm``) on local JSONL tasks, scored as lm-eval scores them (the fallback
for installs without the ``eval`` extra; ``lm-eval`` runs any lm-eval task). Prints a table; ``--output`` also writes
it as ``evaluate.csv``, with what was scored and how in ``evaluate.json``.
"""

from __future__ import annotations

import csv
import sys
from itertools import islice
from pathlib import Path
from typing import Literal

from epas_lightning.checkpoint import CheckpointInfo, describe_checkpoint
from epas_lightning.data.tokenizer import check_tokenizer_flag
from epas_lightning.errors import ConfigError
from epas_lightning.evaluation.multiple_choice import evaluate_task, load_tasks
from epas_lightning.evaluation.perplexity import perplexity_of_batches
from epas_lightning.inference.generate import set_region
from epas_lightning.inference.generate_cli import check_device, load_for_inference, resolve_tokenizer
from epas_lightning.outputs import check_output, output_folder, writing_into
from epas_lightning.progress import progress
from epas_lightning.region import SHARING_FLAGS, sharing_layers_text
from epas_lightning.runtime import DType, check_counts, dtype_name, emit_json, json_text

OUTPUT_KIND = "evaluate"
SUMMARY_FILE = "evaluate.json"
TABLE_FILE = "evaluate.csv"


def region_lengths(spec: int | str | None, recorded: CheckpointInfo, force: bool) -> list[int]:
    """``None``: the default (the trained region, or the one an export chose); ``all``: 0..trained max (every possible
    length with ``force``); else one N, refused past the trained region unless ``force`` (before any scoring)."""
    if spec is None:
        return [recorded.default_sharing]
    if spec == "all":
        top = len(recorded.region.growth_order()) if force else recorded.region.size
        return list(range(top + 1))
    try:
        n = int(spec)
    except ValueError:
        raise ConfigError(
            f"a layer count or 'all', not {spec!r}", "--sharing-layers", "give a number of layers, e.g. 4, or all"
        ) from None
    recorded.region.first(n, force, SHARING_FLAGS)
    return [n]


def evaluation_summary(
    checkpoint: str | Path,
    sharing_layers: int | str | None = None,
    data: str | Path | None = None,
    tasks: list[str | Path] = (),
    batches: int | None = None,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: DType = "auto",
    seq_len: int | None = None,
) -> dict:
    """What was scored, and how (the checkpoint, the held-out data read, the tasks, the device and dtype the model ran
    in), with ``rows``: one per region length (``{"sharing_layers", "val_loss", "val_ppl", "<task>/acc", ...}``).

    ``data=None`` scores perplexity on the held-out data the checkpoint's run validated on (or, where it does not say,
    the val split of the data it trained on), when it is known and either no ``tasks`` or ``batches`` are given;
    ``tasks`` alone score the tasks only, as a line on stderr says.
    Held-out sequences are ``seq_len`` tokens (default: the model's ``block_size``).
    """
    from epas_lightning.data.token_data import check_seq_len

    check_device(device, dtype)
    questions = load_tasks(tasks)
    recorded = describe_checkpoint(checkpoint)  # everything checked before the weights load
    config = recorded.config
    seq_len = config.block_size if seq_len is None else seq_len
    check_seq_len(seq_len, config, where="--seq-len")
    lengths = region_lengths(sharing_layers, recorded, force)
    if note := recorded.unrun_region_note(checkpoint, "evaluate"):
        print(note, file=sys.stderr)
    text_tokenizer = resolve_tokenizer(recorded, Path(tokenizer) if tokenizer else None) if questions else None
    own_data = recorded.own_data_instead_of(data)
    if data is None and (not questions or batches is not None):
        data = recorded.own_heldout()
        if note := recorded.mixed_data_note("evaluate"):
            print(note, file=sys.stderr)
    if data is None and not questions:
        raise ConfigError(
            f"nothing to evaluate: {recorded.no_data()}",
            "--data / --tasks",
            "give --data (a folder prepared with the model's tokenizer: perplexity on its val split) and/or --tasks "
            "(multiple choice)",
        )
    if data is None and batches is not None:  # --tasks: the loss it asked for, which nothing gave, said nothing
        print(f"evaluate: no held-out loss: {recorded.no_data()} (pass --data for one)", file=sys.stderr)
    if data is None and batches is None:  # --tasks alone: the loss left out without a word
        own = recorded.own_heldout() is not None
        give = "--batches B or --data DIR for one" if own else f"--data DIR for one ({recorded.no_data()})"
        print(f"evaluate: the tasks only, no held-out loss: give {give}", file=sys.stderr)
    loader = None
    if data is not None:  # set up (and checked) once; every region reads the same batches
        from epas_lightning.data import heldout_loader

        loader = heldout_loader(
            data,
            seq_len,
            batch_size,
            config.vocab_size,
            tokenizer or recorded.recorded_tokenizer,
            own_data=own_data,
        )
    loaded = load_for_inference(Path(checkpoint), device, dtype, attention_reuse=True)
    rows = []
    for n in lengths:
        layers = set_region(loaded.model, n, loaded.region, force)
        row: dict = {"sharing_layers": n, "shared_layers": layers}
        if loader is not None:
            total = len(loader) if batches is None else min(batches, len(loader))
            label = f"evaluate: held-out loss, {sharing_layers_text(n)}"
            scored = progress(islice(loader, total), label, total, "batch")
            result = perplexity_of_batches(loaded.model, scored)
            row.update(val_loss=result["loss"], val_ppl=result["ppl"], val_tokens=result["tokens"])
        for name, items in questions.items():
            result = evaluate_task(loaded.model, text_tokenizer, items, batch_size)
            row.update({f"{name}/acc": result["acc"], f"{name}/acc_norm": result["acc_norm"]})
        rows.append(row)
    from epas_lightning.data.token_data import data_record

    weight = loaded.model.embed_tokens.weight
    return {
        "checkpoint": str(checkpoint),
        "device": str(weight.device),
        "dtype": dtype_name(weight.dtype),
        "trained_region": loaded.region.to_record(),
        "weights_trained_region": loaded.region.unrun_record(),  # a stock export's, which it runs dense
        "data": data_record(data),
        "batches": batches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tasks": {Path(path).stem: str(path) for path in tasks},  # by their column prefix
        "rows": rows,
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (numbers to 4 decimals)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:  # noqa: ANN001
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: list[dict], path: Path) -> None:
    """The rows as CSV: one column per key any row has (a row without one leaves its cell empty)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def evaluate_command(
    checkpoint: Path,
    sharing_layers: int | Literal["all"] | None = None,
    data: Path | None = None,
    tasks: list[Path] | None = None,
    batches: int | None = None,
    batch_size: int = 8,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    force: bool = False,
    seq_len: int | None = None,
    output: Path | None = None,
    overwrite: bool = False,
    json: bool = False,
) -> None:
    """Held-out loss and perplexity, and multiple-choice accuracy, of a checkpoint at chosen sharing regions.

    The held-out loss is fit's validation loss on the val split in stored order: --batches B --batch-size S scores
    the same first B x S sequences as fit with limit_val_batches B and data.batch_size S; val_tokens says how many
    tokens were scored. JSONL tasks are scored as lm-eval scores them (use the lm-eval command for lm-eval's tasks).
    Prints a table with one row per region; --output also writes it as evaluate.csv, with the rows and what was scored
    (checkpoint, held-out data, tasks, batches, device, dtype) in evaluate.json.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        sharing_layers: Region length N (the first N layers of the trained region, in its growth order), or all for
            0..trained max; default: the trained region (an export's folder: the N it was exported with).
        data: Prepared data folder: perplexity on its val split (default: the held-out data fit validated the run on:
            its data.val_dir, or the val splits of its data folders, mixed as fit mixes them; with --tasks only when
            --batches is given: --tasks alone scores the tasks only, and says so on stderr).
        tasks: Multiple-choice JSONL tasks {"context", "choices", "label"}; repeat the flag for several.
        batches: Held-out batches to score (default: the whole val split).
        batch_size: Sequences per held-out batch (and per batch of --tasks questions).
        tokenizer: Tokenizer file or folder for --tasks (default: the one the checkpoint records).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
        seq_len: Tokens per held-out sequence, up to the model's context length (default: the block_size it trained
            at; a Hugging Face folder's is its whole context: give the block_size of the run it is compared with).
        output: Folder for evaluate.csv and evaluate.json (default: print only).
        overwrite: Replace --output if it is an evaluate folder written by this command.
        json: End with one JSON line of the rows.
    """
    from epas_lightning.data.token_data import check_data_flag

    check_counts({"--batches": batches, "--batch-size": batch_size, "--seq-len": seq_len})
    check_data_flag(data)
    check_tokenizer_flag(tokenizer)
    read = [path for path in (checkpoint, data, tokenizer, *(tasks or [])) if path is not None]  # no output inside
    if output is not None:  # refuse a bad output before the weights load and the scoring runs
        check_output(output, OUTPUT_KIND, overwrite, read)
    summary = evaluation_summary(
        checkpoint, sharing_layers, data, tasks or [], batches, batch_size, tokenizer, force, device, dtype, seq_len
    )
    print(format_table(summary["rows"]))
    if output is not None:
        with output_folder(output, OUTPUT_KIND, overwrite, inputs=read) as build, writing_into(build):
            write_table(summary["rows"], build / TABLE_FILE)
            (build / SUMMARY_FILE).write_text(json_text(summary, indent=2) + "\n")
        print(f"wrote {Path(output) / TABLE_FILE} and {SUMMARY_FILE}")
    emit_json(summary["rows"], json)
