"""``python -m epas_lightning fit|validate|test --config ...``: the LightningCLI wiring, and nothing else."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.data import TokenDataModule
from epas_lightning.model import LlamaConfig
from epas_lightning.module import EPASModule

# The Trainer adds its own progress bar (TQDM); `trainer.enable_progress_bar: false` turns it off.
DEFAULT_CALLBACKS = [
    {
        "class_path": "lightning.pytorch.callbacks.ThroughputMonitor",
        "init_args": {
            "batch_size_fn": "epas_lightning.callbacks.batch_size",
            "length_fn": "epas_lightning.callbacks.batch_tokens",  # items/s is then tokens/s
            "window_size": 5,
        },
    },
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
]
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "epas", "default_hp_metric": False},
}


def _as_config(value: Any) -> LlamaConfig:
    """The model config from a parsed ``model.config`` value (a namespace, dict or dataclass)."""
    if isinstance(value, LlamaConfig):
        return value
    data = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    data = data.get("init_args", data)
    return LlamaConfig(**data)


def config_n_layer(value: Any) -> int:
    return _as_config(value).n_layer


def config_block_size(value: Any) -> int:
    return _as_config(value).block_size


def config_vocab_size(value: Any) -> int:
    return _as_config(value).vocab_size


class EPASCLI(LightningCLI):
    """LightningCLI with the ``sharing`` section and one source of truth for layer count, length and vocab."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ProgressiveSharing, "sharing")
        parser.link_arguments("model.config", "sharing.n_layer", compute_fn=config_n_layer)
        parser.link_arguments("model.config", "data.seq_len", compute_fn=config_block_size)
        parser.link_arguments("model.config", "data.vocab_size", compute_fn=config_vocab_size)
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS, "trainer.logger": DEFAULT_LOGGER})


def _show_package_logs() -> None:
    """Print our INFO lines (data preparation, region growth) on stderr, the way Lightning shows its own."""
    logger = logging.getLogger("epas_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Subcommands beside LightningCLI's fit/validate/test/predict: name -> module with ``main(argv: list[str]) -> int``.
TOOLS: dict[str, str] = {
    "prepare": "epas_lightning.data.prepare",
    "consolidate": "epas_lightning.checkpoint",
    "generate": "epas_lightning.inference.generate_cli",
    "bench": "epas_lightning.inference.bench",
    "export": "epas_lightning.hf.export",
    "evaluate": "epas_lightning.evaluation.evaluate_cli",
    "analyze": "epas_lightning.analysis.analyze",
}


def main(args: ArgsType = None, run: bool = True) -> EPASCLI | int:
    """Entry point of ``python -m epas_lightning``; ``args`` replaces ``sys.argv[1:]`` (for use from Python)."""
    _show_package_logs()
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # LlamaConfig field docs become --help text
    return EPASCLI(
        EPASModule,
        TokenDataModule,
        seed_everything_default=1234,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
