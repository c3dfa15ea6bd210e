"""``python -m epas_lightning analyze --checkpoint ...``: how alike are a trained model's layers (Q, K, V, attention)?

Runs the model with every layer computing over a few held-out batches, compares every pair of layers (Q, K, V and
attention maps; cosine and linear CKA), writes heatmaps (PNG and TensorBoard) and a JSON of all matrices, and prints
which deepest region could share with the least change.
"""

from __future__ import annotations

import json as json_lib
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epas_lightning.analysis.capture import Activations, capture_activations
from epas_lightning.analysis.report import DEFAULT_THRESHOLD, Metric, RedundancyReport
from epas_lightning.data.tokenizer import RecordedTokenizer
from epas_lightning.errors import ConfigError, DataError
from epas_lightning.model import Llama
from epas_lightning.model.config import REUSED
from epas_lightning.model.llama import check_has_weights, check_is_llama, holds_token_ids
from epas_lightning.outputs import check_output, output_folder, writing_into
from epas_lightning.progress import progress
from epas_lightning.runtime import DType, check_counts, dtype_name, dtype_overflow, emit_json

if TYPE_CHECKING:
    from epas_lightning.data.token_data import HeldOut


def analyze_model(model: Llama, batches: Iterable[torch.Tensor]) -> RedundancyReport:
    """Similarity matrices of ``model``'s layers over token batches (B, T), every layer in compute mode.

    Activations are kept on the CPU; the comparisons run on the model's device.
    """
    check_is_llama(model)
    check_has_weights(model)
    device = next(model.parameters()).device
    acts = capture_activations(model, _checked(model, batches))
    check_finite(acts, next(model.parameters()).dtype)
    return RedundancyReport.from_activations(acts, device)


def check_finite(acts: Activations, dtype: torch.dtype) -> None:
    """A :class:`ConfigError` where a layer's Q, K or V holds NaN or inf (overflow in float16): its similarities
    would be NaN, and NaN scores ranked the regions."""
    for i in range(acts.n_layer):
        for name in ("q", "k", "v"):
            if not torch.isfinite(getattr(acts, name)[i]).all():
                raise dtype_overflow(  # as every command says an overflow: with the --dtype choices that reach further
                    f"layer {i}'s {name} holds NaN or inf when the model runs in {dtype_name(dtype)} (an overflow), "
                    "so no similarity can be measured",
                    dtype,
                )


def _checked(model: Llama, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches``, each checked against the model's vocabulary, and to be as long as the first, before it is run
    (attention maps of several lengths cannot be compared row by row)."""
    seq_len = None
    for n, batch in enumerate(batches, start=1):
        check_token_batch(batch, f"batch {n}")
        model.config.check_token_ids(int(batch.min()), int(batch.max()), f"batch {n}")
        seq_len = batch.shape[1] if seq_len is None else seq_len
        if batch.shape[1] != seq_len:
            raise DataError(
                f"batch {n} holds sequences of {batch.shape[1]} tokens, batch 1 of {seq_len}",
                f"batch {n}",
                "give batches of one sequence length",
            )
        yield batch


def check_token_batch(batch: object, where: str) -> None:
    """A (B, T) tensor of integer token ids; a :class:`DataError` otherwise (one (B, T) tensor given for the batches
    was iterated row by row and failed with an IndexError in the capture; float ids were truncated)."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or not holds_token_ids(batch):
        got = (
            f"shape {tuple(batch.shape)} of {batch.dtype}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        )
        raise DataError(
            f"a batch must be a (batch, seq_len) tensor of token ids, got {got}",
            where,
            "pass an iterable of such tensors: [ids] for one",
        )


def heldout_batches(
    data_dir: Path | HeldOut,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    tokenizer: Path | RecordedTokenizer | None = None,
    own_data: bool = False,
) -> Iterator[torch.Tensor]:
    """Up to ``n_batches`` token batches (B, seq_len) from the validation split of a prepared data dir, which must
    hold the ids of ``tokenizer`` (the model's, when known; ``own_data``: see ``heldout_loader``). The data is checked
    at once; the batches are read as they are iterated."""
    from epas_lightning.data import heldout_loader

    loader = heldout_loader(data_dir, seq_len, batch_size, vocab_size, tokenizer, own_data)
    return (batch[:, :-1] for batch in islice(loader, n_batches))  # the model's inputs, without the extra target


def write_outputs(report: RedundancyReport, recommendation, output: Path, n_features: int) -> dict:  # noqa: ANN001
    """Write similarity.png, similarity.json and a TensorBoard event file under ``output/tb``; return the record.
    Its recommendation carries what it was measured on, as ``--json`` prints it: ``n_tokens``, and
    ``too_few_tokens`` where fewer than the model's ``n_features`` make the similarities read high."""
    from torch.utils.tensorboard import SummaryWriter

    from epas_lightning.analysis.plots import similarity_figure

    output.mkdir(parents=True, exist_ok=True)
    figure = similarity_figure(report, recommendation)
    png = output / "similarity.png"
    figure.savefig(png, dpi=120)
    record = report.to_dict()
    record["recommendation"] = {
        "metric": recommendation.metric,
        "threshold": recommendation.threshold,
        "start_layer": recommendation.start,
        "source_layer": recommendation.chosen.source,
        "shared_layers": recommendation.shared_layers,
        "meets_threshold": recommendation.meets_threshold,
        "flop_cut": recommendation.chosen.flop_cut,
        "n_tokens": report.n_tokens,
        "too_few_tokens": too_few_tokens(report, n_features),
        "candidates": [c.__dict__ | {"source": c.source} for c in recommendation.candidates],
    }
    path_json = output / "similarity.json"
    path_json.write_text(json_lib.dumps(record, indent=1) + "\n")
    with SummaryWriter(log_dir=str(output / "tb")) as writer:
        writer.add_figure("analysis/similarity", figure, global_step=report.metadata.get("global_step") or 0)
        writer.add_text("analysis/recommendation", "```\n" + recommendation.reasoning + "\n```")
    return record


def too_few_tokens(report: RedundancyReport, n_features: int) -> bool:
    """Whether fewer tokens were measured than the model has features: the standard CKA estimator is biased upwards
    below that (at 2 tokens every pair of layers scores 1)."""
    return report.n_tokens < n_features


def analyze_command(
    checkpoint: Path,
    data: Path | None = None,
    batches: int = 4,
    batch_size: int = 4,
    seq_len: int | None = None,
    metric: Metric | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "auto",
    dtype: DType = "auto",
    output: Path = Path("runs/analyze"),
    overwrite: bool = False,
    json: bool = False,
) -> None:
    """Measure how similar the layers' Q, K, V and attention maps are, and recommend a sharing region.

    Runs the model with every layer computing over held-out batches, compares every pair of layers (cosine and linear
    CKA), writes similarity.png, similarity.json and a TensorBoard image into --output, and prints which deepest
    region could share with the least change.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        data: Prepared data folder whose val split is read (default: the held-out data fit validated the run on: its
            data.val_dir, or the val splits of its data folders, mixed as fit mixes them).
        batches: Held-out batches to measure on.
        batch_size: Sequences per held-out batch.
        seq_len: Tokens per sequence, up to the model's context length (default: min(block_size, 256)).
        metric: The similarity the recommendation is based on (default: of what a sharing layer reuses: attn/cka in
            qk mode, kv/cka, the lower of the K and V similarity, in kv mode).
        threshold: Lowest similarity a region may have to its source layer.
        device: Where model and comparisons run: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32
            elsewhere (the comparisons are float64).
        output: Folder for similarity.png, similarity.json and tb/.
        overwrite: Replace --output if it is an analysis folder written by this command.
        json: End with one JSON line of the recommendation.
    """
    import matplotlib

    matplotlib.use("Agg")
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.data.token_data import check_data_flag, check_seq_len, data_record
    from epas_lightning.inference.generate_cli import check_device, load_for_inference

    check_counts({"--batches": batches, "--batch-size": batch_size})
    if not threshold <= 1:  # no region could meet it; the closest was recommended as if it had
        raise ConfigError(
            f"similarities are at most 1 (cosine and CKA), so no region can meet {threshold}",
            "--threshold",
            f"give at most 1 (default {DEFAULT_THRESHOLD})",
        )
    check_data_flag(data)
    check_device(device, dtype)
    read = [path for path in (checkpoint, data) if path is not None]  # no output inside what it reads
    check_output(output, "analysis", overwrite, read)
    recorded = describe_checkpoint(checkpoint)  # everything checked before the weights load
    config = recorded.config
    if config.n_layer < 2:
        raise ConfigError(
            f"a {config.n_layer}-layer model has no layer that could share (layer 0 always computes)",
            f"--checkpoint {checkpoint}",
            "analyse a model of 2 or more layers",
        )
    seq_len = min(config.block_size, 256) if seq_len is None else seq_len
    if seq_len < 2:
        raise ConfigError(f"must be at least 2, got {seq_len}", "--seq-len", "give 2 or more tokens per sequence")
    check_seq_len(seq_len, config, where="--seq-len")
    data_dir = data or recorded.own_heldout()
    if data_dir is None:
        raise ConfigError(
            f"{recorded.no_data()}, and held-out text in another tokenization would measure nothing",
            "--data",
            "pass --data with the prepared folder the model trained on",
        )
    if data is None and (note := recorded.mixed_data_note("analyze")):
        print(note, file=sys.stderr)
    if note := recorded.unrun_region_note(checkpoint, "analyze"):
        print(note, file=sys.stderr)
    own_data = recorded.own_data_instead_of(data)
    held_out = heldout_batches(  # a data folder that cannot work is said alone, before any output
        data_dir, config.vocab_size, seq_len, batch_size, batches, recorded.recorded_tokenizer, own_data
    )
    loaded = load_for_inference(checkpoint, device, dtype, attention_reuse=False)  # every layer computes here
    model = loaded.model
    with output_folder(output, "analysis", overwrite, inputs=read) as build:
        print(f"analysing {checkpoint} ({config.n_layer} layers) on {data_dir}", file=sys.stderr)
        held_out = progress(held_out, "analyze: capturing activations", batches, "batch")
        report = analyze_model(model, held_out)
        report.metadata.update(
            checkpoint=str(checkpoint),
            data=data_record(data_dir),
            global_step=loaded.global_step,
            dtype=dtype_name(next(model.parameters()).dtype),
            trained_shared_layers=loaded.trained_shared_layers,
            trained_region=loaded.region.to_record(),
            weights_trained_region=loaded.region.unrun_record(),
        )
        recommendation = report.recommend(metric, threshold, config)
        with writing_into(build):
            record = write_outputs(report, recommendation, build, config.n_embd)
    if too_few_tokens(report, config.n_embd):
        print(
            f"note: only {report.n_tokens} tokens were measured, fewer than the model's {config.n_embd} features: the "
            "similarities read high (CKA most); raise --batches, --batch-size or --seq-len before choosing a region",
            file=sys.stderr,
        )
    print(recommendation.reasoning)
    if trained := (loaded.region if loaded.region.layers else loaded.weights_region):  # a stock export's too
        print(
            f"Note: the checkpoint was trained with layers {list(trained.layers)} sharing; their own "
            f"{REUSED[config.sharing_mode].lower()} "
            "weights stopped training when they started to share, so their scores describe those frozen weights. "
            "Analyse a dense (or earlier) checkpoint to choose a region."
        )
    print(f"wrote {Path(output) / 'similarity.png'}, similarity.json and tb/")
    emit_json(record["recommendation"], json)
