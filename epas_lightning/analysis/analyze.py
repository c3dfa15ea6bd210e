"""``python -m epas_lightning analyze --checkpoint ...``: where in a trained model are Q/K (and attention) redundant?

Runs the model with every layer computing over a few held-out batches, compares every pair of layers (Q, K and
attention maps; cosine and linear CKA), writes heatmaps (PNG and TensorBoard) and a JSON of all matrices, and prints
which deepest region could share with the least change.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from epas_lightning.analysis.capture import capture_activations
from epas_lightning.analysis.report import DEFAULT_METRIC, DEFAULT_THRESHOLD, METRICS, RedundancyReport
from epas_lightning.model import Llama


def analyze_model(model: Llama, batches: Iterable[torch.Tensor]) -> RedundancyReport:
    """Similarity matrices of ``model``'s layers over token batches (B, T), every layer in compute mode.

    Activations are kept on the CPU; the comparisons run on the model's device.
    """
    device = next(model.parameters()).device
    return RedundancyReport.from_activations(capture_activations(model, batches), device)


def heldout_batches(
    data_dir: Path | None, vocab_size: int, seq_len: int, batch_size: int, n_batches: int
) -> Iterator[torch.Tensor]:
    """Up to ``n_batches`` token batches (B, seq_len) from the validation split of a prepared data dir."""
    from epas_lightning.data import heldout_loader

    for batch in islice(heldout_loader(data_dir, seq_len, batch_size, vocab_size), n_batches):
        yield batch[:, :-1]  # the model's inputs; the extra target token is not needed


def write_outputs(report: RedundancyReport, recommendation, output: Path) -> list[Path]:  # noqa: ANN001
    """similarity.png, similarity.json and a TensorBoard event file under ``output/tb``."""
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
        "candidates": [c.__dict__ | {"source": c.source} for c in recommendation.candidates],
    }
    path_json = output / "similarity.json"
    path_json.write_text(json.dumps(record, indent=1) + "\n")
    with SummaryWriter(log_dir=str(output / "tb")) as writer:
        writer.add_figure("analysis/similarity", figure, global_step=report.metadata.get("global_step") or 0)
        writer.add_text("analysis/recommendation", "```\n" + recommendation.reasoning + "\n```")
    return [png, path_json, output / "tb"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m epas_lightning analyze",
        description="Measure how similar the layers' Q, K and attention maps are and recommend a sharing region.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help=".ckpt file, FSDP2 dir or consolidated dir")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="prepared data dir whose val/ split is read (default: the data the checkpoint's tokenizer came from, "
        "else the built-in corpus)",
    )
    parser.add_argument("--batches", type=int, default=4, help="batches to measure on (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(block_size, 256))")
    parser.add_argument("--output", "-o", type=Path, default=Path("runs/analysis"), help="directory to write")
    parser.add_argument("--metric", choices=METRICS, default=DEFAULT_METRIC, help="similarity the advice is based on")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="lowest acceptable similarity")
    parser.add_argument("--device", default="cpu", help="where model and comparisons run (default cpu)")
    return parser


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from epas_lightning.checkpoint import load_model

    args = _parser().parse_args(argv)
    if args.batches < 1 or args.batch_size < 1:
        raise SystemExit("--batches and --batch-size must be positive.")
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a directory (create one with `python -m epas_lightning prepare`).")
    loaded = load_model(args.checkpoint, args.device)
    model, config = loaded.model, loaded.model.config
    seq_len = args.seq_len or min(config.block_size, 256)
    if not 2 <= seq_len <= config.block_size:
        raise SystemExit(f"--seq-len must be in [2, block_size={config.block_size}], got {seq_len}.")
    data_dir = args.data or loaded.data_dir  # None: the built-in corpus
    print(f"analysing {args.checkpoint} ({config.n_layer} layers) on {data_dir or 'the built-in corpus'}")
    batches = heldout_batches(data_dir, config.vocab_size, seq_len, args.batch_size, args.batches)
    report = analyze_model(model, batches)
    report.metadata.update(
        checkpoint=str(args.checkpoint),
        data=str(data_dir) if data_dir else "builtin",
        global_step=loaded.global_step,
        trained_shared_layers=loaded.trained_shared_layers,
    )
    recommendation = report.recommend(args.metric, args.threshold, config)
    written = write_outputs(report, recommendation, args.output)
    print(recommendation.reasoning)
    if loaded.trained_shared_layers:
        print(
            f"Note: the checkpoint was trained with layers {loaded.trained_shared_layers} sharing; their own q/k "
            "weights stopped training when they started to share, so their scores describe those frozen weights. "
            "Analyse a dense (or earlier) checkpoint to choose a region."
        )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
