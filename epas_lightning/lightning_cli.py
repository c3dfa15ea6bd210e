"""``fit``, ``validate`` and ``test``: the LightningCLI wiring of the project, and nothing else.

Beside the trainer, model and data, every run has these sections, each a callback that user lists add to (a
``trainer.callbacks`` list in YAML never replaces them):

- ``sharing``: ``ProgressiveSharing``, the growth schedule;
- ``divergence``: ``DivergenceGuard``, on by default (``action: stop``);
- ``checkpoint``: the run's ``ModelCheckpoint`` (``save_last: true``; ``last.ckpt`` also written when training ends);
- ``throughput``: tokens/s and FLOPs/s (``TokenThroughputMonitor``); ``lr_monitor``: the learning rate per step;
- ``interrupt``: ``GracefulStop``, SIGTERM or Ctrl+C stop between steps with a ``last.ckpt`` (exit 143 / 130).

An error on rank 0 of a one-node multi-process run also ends the ranks it started (``EndChildRanksOnError``), so
they do not hold their GPUs until a collective times out.

Checkpoint files are written beside their name and renamed into place (``AtomicCheckpointIO``) unless the
configuration names its own ``CheckpointIO``.

``--ckpt_path last`` resumes the newest ``last.ckpt`` of the same run (logger ``save_dir``/``name``); ``auto`` does the
same or starts fresh when there is none. ``fit`` from a checkpoint in a run's ``version_N/checkpoints`` folder
(``last``, or a path) keeps logging and checkpointing into that version folder, unless that run went on past it. Every
checkpoint is checked to load without running code (:func:`~epas_lightning.safe_load.verify_checkpoint`) before
Lightning opens it, and loads with ``weights_only=True``. ``--print_config`` prints the resolved model config: its
preset, and with ``init_from`` the fields read from the source (as configured, with a note, where that path does not
exist: a config's placeholder).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import random
import re
import sys
import traceback
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from epas_lightning.callbacks import (
    SCORING_A_CHECKPOINT,
    ProgressiveSharing,
    StepLearningRateMonitor,
    TokenThroughputMonitor,
)
from epas_lightning.checkpoint import recorded_config
from epas_lightning.checkpoint_io import AtomicCheckpointIO, sharded_needs_fsdp2
from epas_lightning.child_ranks import EndChildRanksOnError
from epas_lightning.cli import (
    DURATION,
    LIGHTNING_COMMANDS,
    PROG,
    config_positions,
    flag_value,
    print_config_options,
    unknown_option,
)
from epas_lightning.data import TokenDataModule
from epas_lightning.data.token_data import BUILTIN_SETTINGS
from epas_lightning.divergence import DivergenceGuard
from epas_lightning.errors import ConfigError, UserError, did_you_mean
from epas_lightning.init_from import config_from_source, filled_from, resumed_instead
from epas_lightning.interrupt import GracefulStop, Interrupted
from epas_lightning.launch import check_processes_meet, check_slurm_tasks, missing_slurm_task, port_in_use
from epas_lightning.model import LlamaConfig
from epas_lightning.model.config import OTHER_NAMES
from epas_lightning.module import EPASModule, check_resumed_model, check_trainable_precision
from epas_lightning.resume import (
    RESUME_WORDS,
    check_checkpoint_folder_free,
    check_no_slurm_checkpoint,
    check_version_folder_free,
    checkpoint_folder,
    continue_version,
    keep_version,
    resume_checkpoint,
    resume_config_name,
    run_last_checkpoint,
    same_folder,
)
from epas_lightning.run_checkpoint import RunCheckpoint, save_between_steps
from epas_lightning.run_folder import RunFolders, check_run_folders_writable
from epas_lightning.run_summary import FlopsModelSummary, RunSummary, progress_bar_for, say
from epas_lightning.safe_load import is_sharded_checkpoint, verify_checkpoint
from epas_lightning.strategy import STRATEGY_NAME, check_strategy_name

CONFIG_DIR = Path(__file__).parent / "configs"
"""The YAML configs shipped with the package (``--config demo`` finds ``demo.yaml`` here)."""
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "epas", "default_hp_metric": False},
}
WEIGHTS_ONLY_HELP = (
    "Always true: a checkpoint loads with weights_only=True (tensors and plain data; nothing else is unpickled), "
    "and false is refused."
)
CKPT_PATH_HELP = (
    "The checkpoint to resume (fit) or score (validate, test): a .ckpt file or a sharded (FSDP2) checkpoint folder, "
    "checked to read without running code; `last`: the newest last.ckpt of this run (checkpoint.dirpath, or the "
    "version_*/checkpoints folders of the logger's save_dir/name), an error when there is none; `auto`: the same, or "
    "with none, fit starts from scratch and validate/test score the configured model. Lightning's best, hpc and "
    "registry are not keywords here."
)
LR_MONITOR_INTERVAL_HELP = (
    "`step` (the default here): the learning rate of every optimizer, once per optimizer step; `epoch`: once per "
    "epoch; null: at each scheduler's own interval (`step` for the default WarmupCosineLR)."
)
SAVE_LAST_HELP = (
    "true (the default here): last.ckpt is written with every save, at a graceful stop and when training ends, and "
    "holds the step training ended at (what --ckpt_path last resumes); `link`: last.ckpt is a symbolic link to the "
    "newest checkpoint; false: only a graceful stop (SIGTERM, Ctrl+C) writes one."
)
LOGGER_HELP = (
    "Logger (or list of loggers) for experiment tracking. Default here: a TensorBoardLogger writing "
    "runs/epas/version_N (save_dir runs, name epas); true: Lightning's TensorBoardLogger in "
    "lightning_logs/version_N under trainer.default_root_dir; false: no logging. With several loggers, the run's "
    "checkpoints go into the first one's log_dir."
)
DIRPATH_HELP = (
    "The folder of the run's checkpoints. Default: the checkpoints/ folder of the first logger's version folder "
    "(runs/epas/version_N/checkpoints), or <trainer.default_root_dir>/checkpoints without a logger. A fit that does "
    "not resume from it refuses a folder that already holds checkpoints; on several nodes every node must mount it "
    "at the same path."
)
HELP_HERE = {
    "weights_only": WEIGHTS_ONLY_HELP,  # Lightning's help advises false for trusted checkpoints
    "ckpt_path": CKPT_PATH_HELP,  # Lightning's names its own keywords, not resume.py's
    "lr_monitor.logging_interval": LR_MONITOR_INTERVAL_HELP,  # Lightning's says it defaults to None
    "checkpoint.save_last": SAVE_LAST_HELP,  # Lightning's says it defaults to None
    "checkpoint.dirpath": DIRPATH_HELP,  # Lightning's says None keeps checkpoints in memory, saving nothing to disk
    "trainer.logger": LOGGER_HELP,  # Lightning's says it defaults to True
}
"""The help of the options whose Lightning docstring does not say what they do here."""
IGNORED_WARNINGS = (
    # The token loader reads memory-mapped chunks in the main process far faster than any model trains.
    r".*does not have many workers which may be a bottleneck.*",
    # litdata's streams know their length per rank and worker; the generic caution does not apply.
    r".*Your `IterableDataset` has `__len__` defined.*",
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Materialising a meta-device model on CPU runs nn.Linear's own random init on sharded weights; `init_weights`
    # then draws every weight again, whole, so the model does not depend on that init or on the rank count.
    r".*DTensor random operators may not have complete support on cpu device mesh.*",
    # A resume without --trainer.max_time drops the time limit its checkpoint ran under: the user's choice, not a
    # callback missing (only when the Timer is the one callback the checkpoint has and the run lacks).
    r".*Please add the following callbacks: \['Timer'\]\.$",
)


def _config_fields(value: Any) -> dict[str, Any]:
    """The fields of a parsed ``model.config`` value (a namespace, dict or dataclass)."""
    if isinstance(value, LlamaConfig):
        return value.to_dict()
    data = value.as_dict() if hasattr(value, "as_dict") else dict(value or {})
    data = data.get("init_args", data)
    if isinstance(scaling := data.get("rope_scaling"), dict):  # an optional dataclass parses as class_path/init_args
        data["rope_scaling"] = scaling.get("init_args", scaling)
    return data


def _as_config(value: Any) -> LlamaConfig:
    """The model config from a parsed ``model.config`` value (a namespace, dict or dataclass); a field it does not
    have (``n_layers`` in a YAML) is one line naming it, not the link's message with the whole namespace."""
    if isinstance(value, LlamaConfig):
        return value
    given = _config_fields(value)
    known = [field.name for field in dataclasses.fields(LlamaConfig)]
    for name in given:
        if name not in known:
            raise ConfigError(
                f"model.config has no field {name!r}{did_you_mean(name, known, OTHER_NAMES)}",
                f"model.config.{name}",
                f"use one of {', '.join(known)}",
            )
    return LlamaConfig(**given)


LINKED_FIELDS = {"sharing.n_layer": "n_layer", "data.seq_len": "block_size", "data.vocab_size": "vocab_size"}
"""The values of other sections that ``model.config`` gives (linked: the parser refuses them set by hand)."""


class _Linked:
    """The link's function: ``field`` of ``model.config``; with ``init_from``, ``None`` until :func:`resolve_model`
    has read the source, after parsing (a resume reads its checkpoint instead). A class, not a closure: the parser
    (in ``SaveConfigCallback``) is pickled to the processes ``ddp_spawn`` starts."""

    def __init__(self, field: str) -> None:
        self.field, self.__name__ = field, f"config_{field}"

    def __call__(self, config: Any, init_from: str | None) -> Any:
        return None if init_from else getattr(_as_config(config), self.field)


def missing_init_from(section: Namespace) -> str | None:
    """``model.init_from`` where it names a path that does not exist (a config's placeholder, to be replaced), else
    ``None``."""
    init_from = section.model.get("init_from")
    return None if not init_from or Path(init_from).expanduser().exists() else str(init_from)


def resolve_model(section: Namespace, ckpt_path: str | None = None) -> None:
    """With ``model.init_from``, ``model.config`` whole: the fields left unset taken from the source model, or when
    resuming ``ckpt_path`` from that checkpoint; the sections linked to it set from it."""
    init_from = section.model.get("init_from")
    if not init_from:
        return
    fields = _config_fields(section.model.config)
    if ckpt_path:  # a resume wins: init_from is not read, its folder may be gone
        config = filled_from(recorded_config(ckpt_path, "--ckpt_path"), fields, ours=True)
    else:
        config = config_from_source(init_from, fields)
    section.model.config = Namespace(**config.to_dict())
    for target, field in LINKED_FIELDS.items():
        section[target] = getattr(config, field)


RUN_SECTIONS = {
    "sharing": ProgressiveSharing,
    "divergence": DivergenceGuard,
    "checkpoint": RunCheckpoint,
    "throughput": TokenThroughputMonitor,
    "lr_monitor": StepLearningRateMonitor,
    "interrupt": GracefulStop,
}
"""The callback sections of every run; a ``Trainer`` of one's own adds the same callbacks (README, "In Python")."""
SINGLE_SECTIONS = {
    ProgressiveSharing: "sharing",
    DivergenceGuard: "divergence",
    GracefulStop: "interrupt",
    LearningRateMonitor: "lr_monitor",
    StepLearningRateMonitor: "lr_monitor",
}
"""Run sections whose callback must exist once: a second schedule would fight over the mask, Lightning checkpoints
one state per type, and a second learning-rate monitor logged every rate twice."""


def check_no_repeated_section(user_callbacks: Any) -> None:
    """Refuse a ``trainer.callbacks`` entry that repeats one of :data:`SINGLE_SECTIONS`."""
    listed = user_callbacks if isinstance(user_callbacks, list) else [user_callbacks]
    for callback in listed:
        section = next((name for kind, name in SINGLE_SECTIONS.items() if isinstance(callback, kind)), None)
        if section is not None:
            raise ConfigError(
                f"{type(callback).__name__} is listed, and the `{section}` section already adds one",
                "trainer.callbacks",
                f"remove it from the list and set its values under `{section}:`",
            )


def drop_overridden_builtin_settings(data: Namespace, command_line: list[str]) -> None:
    """With a prepared ``data.data_dir``, unset the built-in corpus's settings (:data:`BUILTIN_SETTINGS`) that an
    earlier source gave than ``data_dir``'s: ``configs/debug.yaml``'s ``max_bytes`` sized its corpus, and a folder
    given after it replaces that corpus. One given with ``data_dir`` or after it (in the same config file, on the
    command line) is left for the data module to refuse."""
    if not data.get("data_dir"):
        return
    sources = data_sources(command_line)
    folder = last_source(sources, "data_dir")
    for name in BUILTIN_SETTINGS:
        given = last_source(sources, name)
        if data.get(name) is not None and given is not None and (folder is None or given < folder):
            data[name] = None


def data_sources(command_line: list[str]) -> list[set[str]]:
    """The ``data`` keys each source of ``command_line`` sets, in the order they are parsed: a ``--config`` file's,
    a ``--data.KEY`` flag's."""
    import yaml

    configs = config_positions(command_line)
    sources: list[set[str]] = []
    for i, arg in enumerate(command_line):
        if arg.startswith("--data."):
            sources.append({arg.partition("=")[0].removeprefix("--data.")})
        elif i in configs:
            try:
                config = yaml.safe_load(Path(configs[i]).expanduser().read_text())
            except (OSError, yaml.YAMLError):  # parsed already: a config given otherwise than as a file
                config = None
            section = config.get("data") if isinstance(config, dict) else None
            sources.append({key for key, v in section.items() if v is not None} if isinstance(section, dict) else set())
    return sources


def last_source(sources: list[set[str]], key: str) -> int | None:
    """The position of the last of ``sources`` that sets ``key``; ``None``: none of them does."""
    return max((i for i, keys in enumerate(sources) if key in keys), default=None)


COUNTS_AT_LEAST_ONE = {
    "val_check_interval": "set 1 or more (trainer.limit_val_batches: 0 trains without validation)",
    "check_val_every_n_epoch": "set 1 or more (trainer.limit_val_batches: 0 trains without validation)",
    "accumulate_grad_batches": "set 1 (no accumulation) or more",
}
"""Trainer counts that Lightning divides by, inside its loops (0 was a ZeroDivisionError traceback), and the fix."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_counts(trainer: Namespace) -> None:
    """Refuse a count of :data:`COUNTS_AT_LEAST_ONE` below 1 before anything is built."""
    for key, fix in COUNTS_AT_LEAST_ONE.items():
        if _whole(value := trainer.get(key)) and value < 1:
            raise ConfigError(f"trainer.{key} must be at least 1, not {value}", f"trainer.{key}", fix)


def check_validation_interval(trainer: Namespace) -> None:
    """A validation interval in batches must fit in an epoch that ``limit_train_batches`` (or ``overfit_batches``,
    which replaces it) caps; Lightning checks this only once the data is set up, with a traceback. ``fast_dev_run``
    sets its own interval."""
    overfit = trainer.get("overfit_batches")
    cap = "overfit_batches" if _whole(overfit) and overfit > 0 else "limit_train_batches"
    interval, limit = trainer.get("val_check_interval"), trainer.get(cap)
    checked = trainer.get("check_val_every_n_epoch") is not None and not trainer.get("fast_dev_run")
    if _whole(interval) and _whole(limit) and checked and interval > limit:
        raise ConfigError(
            f"trainer.val_check_interval ({interval}) is longer than an epoch of {limit} training batches "
            f"(trainer.{cap})",
            "trainer.val_check_interval",
            "lower it, or set trainer.check_val_every_n_epoch: null to count batches across epochs",
        )


def check_scores_something(subcommand: str | None, trainer: Namespace) -> None:
    """``validate`` with ``limit_val_batches: 0`` (``test`` with ``limit_test_batches: 0``, ``fit`` with
    ``limit_train_batches``, ``max_steps`` or ``max_epochs`` 0) ended with status 0, having scored (trained) nothing."""
    key = {"validate": "limit_val_batches", "test": "limit_test_batches", "fit": "limit_train_batches"}.get(
        subcommand or ""
    )
    if key and trainer.get(key) == 0 and not isinstance(trainer.get(key), bool):
        does = "train" if subcommand == "fit" else "score"
        raise ConfigError(
            f"trainer.{key} is 0: {subcommand} would {does} no batch", f"trainer.{key}", "set it to 1 or more, or null"
        )
    for limit in ("max_steps", "max_epochs") if subcommand == "fit" else ():
        if _whole(trainer.get(limit)) and trainer.get(limit) == 0:  # ended with status 0, having trained nothing
            raise ConfigError(
                f"trainer.{limit} is 0: fit would train no step",
                f"trainer.{limit}",
                "set it to 1 or more, or -1 for no limit",
            )


def packaged_config(name: str) -> Path | None:
    """A config shipped with the package, by name (``demo`` or ``demo.yaml``), if there is one."""
    for candidate in (name, f"{name}.yaml"):
        path = CONFIG_DIR / candidate
        if "/" not in name and path.is_file():
            return path
    return None


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config demo`` -> the packaged ``demo.yaml`` when no file of that name exists here."""
    out = list(argv)
    for i, token in enumerate(out):
        name, sep, value = token.partition("=")
        if name not in ("--config", "-c"):
            continue
        target = value if sep else (out[i + 1] if i + 1 < len(out) else None)
        if target is None or Path(target).expanduser().exists():
            continue
        packaged = packaged_config(target)
        if packaged is None:
            shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError("config file does not exist", f"--config {target}", f"give a path, or one of: {shipped}")
        if sep:
            out[i] = f"{name}={packaged}"
        else:
            out[i + 1] = str(packaged)
    return out


PARSED_COMMAND: ContextVar[str] = ContextVar("parsed_command", default=PROG)
"""The command line being parsed (``python -m epas_lightning fit``), for the parsers made while parsing it."""


class CommandParser(LightningArgumentParser):
    """Lightning's parser, whose parsers made while parsing (``--trainer.callbacks.help CLASS`` prints the help of
    one) name the command being parsed in their usage line: they were ``__main__.py``, the script's name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", PARSED_COMMAND.get())
        super().__init__(*args, **kwargs)


class EPASCLI(LightningCLI):
    """LightningCLI with the project's sections, one source of truth for layer count, length and vocab, safe resume."""

    _quiet: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    """Lightning's INFO lines and warnings that mislead in this run (:func:`quiet_messages`), set with ``ckpt_path``."""
    _command_line: list[str] = []
    """The arguments parsed, config files named rather than read."""
    _continued: Path | None = None
    """The version folder a resuming ``fit`` logs into (:func:`~epas_lightning.resume.continue_version`)."""

    def __init__(self, *args: Any, commands: tuple[str, ...] = LIGHTNING_COMMANDS, **kwargs: Any) -> None:
        self._commands = commands
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  # Lightning's is static
        """``commands`` of ``fit``, ``validate`` and ``test``: the parser of each is built whole, signatures and
        docstrings of every class read, so a command line builds only its own."""
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in self._commands}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, subcommand_parser in self._subcommand_parsers.items():  # jsonargparse's `PROG [options] fit`
            subcommand_parser.prog = f"{PROG} {name}"  # usage lines read as the command is typed

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for section, callback in RUN_SECTIONS.items():
            parser.add_lightning_class_args(callback, section)
        for target, field in LINKED_FIELDS.items():
            parser.link_arguments(("model.config", "model.init_from"), target, compute_fn=_Linked(field))
        parser.set_defaults(
            {
                "trainer.logger": DEFAULT_LOGGER,
                "checkpoint.save_last": True,
                "lr_monitor.logging_interval": "step",
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (a list; ``--print_config`` prints the config with the model preset resolved)."""
        for subcommand_parser in getattr(self, "_subcommand_parsers", {}).values():  # none when run=False
            for action in subcommand_parser._actions:
                if action.dest in HELP_HERE:
                    action.help = HELP_HERE[action.dest]
                elif action.dest == "checkpoint.train_time_interval" and DURATION not in action.help:
                    action.help += f" Give {DURATION}."
        args = list(sys.argv[1:] if args is None else args)
        self._command_line = args
        printing = [a for a in args if a.split("=")[0] == "--print_config"]
        args = [a for a in args if a not in printing]
        dump_options = print_config_options(printing)
        command = PARSED_COMMAND.set(f"{PROG} {args[0]}" if args and args[0] in LIGHTNING_COMMANDS else PROG)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as e:
            parsers = getattr(self, "_subcommand_parsers", {})  # none when run=False
            aliases = {f"model.config.{name}": f"model.config.{field}" for name, field in OTHER_NAMES.items()}
            if (unknown := unknown_option(e, parsers.get(args[0]) if args else None, aliases)) is None:
                raise
            raise unknown from e
        finally:
            PARSED_COMMAND.reset(command)
        if printing:
            subcommand = self.config.subcommand
            config = self.config[subcommand].clone()
            ckpt_path = config.get("ckpt_path")  # a resume's model is its checkpoint's: init_from may be gone
            if not ckpt_path and (missing := missing_init_from(config)):  # printed as configured, not refused
                note = "model.config is printed as configured, without the fields fit reads from it"
                print(f"note: model.init_from {missing} does not exist here: {note}", file=sys.stderr)
            else:
                resolve_model(config, run_last_checkpoint(config) if ckpt_path in RESUME_WORDS else ckpt_path)
                config.model.config = Namespace(**_as_config(config.model.config).to_dict())
            print(self._subcommand_parsers[subcommand].dump(config, skip_link_targets=False, **dump_options))
            raise SystemExit(0)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``/``auto`` and check the checkpoint is safe to load, before anything opens it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:  # run=False: the objects are built, with the model config whole
            resolve_model(self.config)
            return
        config = self.config[subcommand]
        fitting = subcommand == "fit"
        if config.get("ckpt_path") in RESUME_WORDS:
            config.ckpt_path = resume_checkpoint(config, config.ckpt_path, fitting)
        elif not config.get("ckpt_path"):
            check_no_slurm_checkpoint(config)
        if fitting:
            check_checkpoint_folder_free(config, config.get("ckpt_path"))
        if config.get("ckpt_path"):
            config.ckpt_path = str(verify_checkpoint(config.ckpt_path, "--ckpt_path", scoring=not fitting))
        resolve_model(config, config.get("ckpt_path"))
        if config.get("ckpt_path"):
            check_same_model(config.model.config, config.ckpt_path)
            check_strategy_reads(config.trainer.get("strategy"), Path(config.ckpt_path))
            if not fitting:
                self._quiet = (SCORING_QUIET_INFO, SCORING_QUIET_WARNINGS)
            elif version_dir := continue_version(config, Path(config.ckpt_path)):
                # the resumed run logs into the same folder: keep its config.yaml, add this run's beside it
                self.save_config_kwargs["config_filename"] = resume_config_name(config, version_dir)
                self._quiet = ((), RESUMING_QUIET_WARNINGS)
                self._continued = version_dir
            elif same_folder(checkpoint_folder(config), Path(config.ckpt_path).parent):
                self._quiet = ((), RESUMING_QUIET_WARNINGS)
            if config.model.get("init_from"):  # never read: a folder deleted or unmounted since must not stop this
                say(resumed_instead(config.ckpt_path))
                config.model.init_from = None
        if fitting and self.save_config_callback is not None:
            config_filename = self.save_config_kwargs.get("config_filename", "config.yaml")
            check_version_folder_free(config, config_filename, config.get("ckpt_path"))
        super()._parse_ckpt_path()

    @property
    def _section(self) -> Namespace:
        """The parsed config of the command being run (``fit``'s, ...), or the whole config without subcommands."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def _set_seed(self) -> None:
        """``true`` draws a seed (Lightning's ``seed_everything()`` seeds 0); a seed numpy cannot take is one line.

        The chosen seed replaces ``true`` in the config, so the run's ``config.yaml`` can repeat it. The ranks a run
        starts find rank zero's in ``PL_GLOBAL_SEED``, as Lightning reads it.
        """
        if self._get(self.config, "seed_everything") is True and "PL_GLOBAL_SEED" not in os.environ:
            self._section["seed_everything"] = random.SystemRandom().randint(min_seed_value, max_seed_value)
        try:
            super()._set_seed()
        except ValueError as e:
            seed = self._get(self.config, "seed_everything")
            raise ConfigError(str(e), f"--seed_everything {seed}", "give a seed in that range, or false") from e

    def before_instantiate_classes(self) -> None:
        section = self._section
        if self.subcommand and section.get("weights_only") is False:
            raise ConfigError(
                "checkpoints always load with weights_only=True here", "--weights_only false", "leave it unset"
            )
        trainer = section.trainer
        accelerator = trainer.get("accelerator")
        if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "no CUDA GPU is visible to this process",
                f"trainer.accelerator: {accelerator}",
                "run on a machine with a GPU, or pass --trainer.accelerator=cpu (CPUs train best in 32-true)",
            )
        if accelerator == "tpu" and importlib.util.find_spec("torch_xla") is None:  # was Lightning's traceback
            raise ConfigError(
                "the tpu accelerator needs torch_xla, which is not installed",
                "trainer.accelerator: tpu",
                "install torch_xla on a TPU machine, or pass --trainer.accelerator=cpu",
            )
        check_scores_something(self.subcommand, trainer)
        check_strategy_name(trainer.get("strategy"))
        check_counts(trainer)
        check_validation_interval(trainer)
        check_precision_available(trainer.get("precision"))
        drop_overridden_builtin_settings(section.data, self._command_line)
        if self.subcommand:
            check_run_folders_writable(section, fitting=self.subcommand == "fit")
        if self.subcommand == "fit":
            check_trainable_precision(trainer.get("precision"))

    def instantiate_classes(self) -> None:
        section = self._section
        scoring = self.subcommand in ("validate", "test") and bool(section.get("ckpt_path"))
        token = SCORING_A_CHECKPOINT.set(scoring)  # val_sharing_layers count the checkpoint's region, read later
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except (ValueError, TypeError, MisconfigurationException, ModuleNotFoundError) as e:
            # a constructor refused a configured value, or needs a package that is not installed (strategy: xla)
            if needs := re.search(r"(?:class_path '([\w.]+)': )?Requirement '([^']+)' not met", one_line(e)):
                class_path, requirement = needs.groups()  # WandbLogger; strategy xla (no class named)
                trainer = section.trainer
                keys = settings_of_class(trainer, class_path) if class_path else setting_that_raised(e, trainer)
                raise ConfigError(
                    f"{class_path or 'a configured setting'} needs {requirement}, which is not installed",
                    settings_where(trainer, keys),
                    f"pip install '{requirement}', or choose another {'class' if class_path else 'setting'}",
                ) from e
            if isinstance(e, ModuleNotFoundError):
                raise
            raise refused_setting(e) from e
        finally:
            SCORING_A_CHECKPOINT.reset(token)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        check_no_repeated_section(config.get("callbacks"))
        listed = config.get("callbacks")
        save_between_steps(listed if isinstance(listed, list) else [listed])  # as the run's checkpoint saves
        if config.get("enable_checkpointing") is False:  # the checkpoint section steps aside rather than conflict
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if config.get("logger") in (False, []):
            # No run folder: nothing to monitor the LR into, and config.yaml would land in the working directory
            # (where a user's own config.yaml may be, and a second run would refuse to start).
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            self.save_config_callback = None
        check_slurm_tasks()
        callbacks = [*callbacks, *progress_bar_for(config)]
        try:
            trainer = super()._instantiate_trainer(with_atomic_checkpoint_io(config), callbacks)
        except KeyError as e:
            if (error := missing_slurm_task(e)) is None:
                raise
            raise error from e
        except (ValueError, TypeError, MisconfigurationException) as e:  # devices 0, an unknown accelerator name
            if isinstance(e, UserError):
                raise
            raise refused_setting(e, config) from e
        keep_version(trainer.loggers, self._continued)
        check_processes_meet(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        for guard in (c for c in self.trainer.callbacks if isinstance(c, DivergenceGuard)):
            guard.command_line = True  # resuming is this command with --ckpt_path
        stop = next((c for c in self.trainer.callbacks if isinstance(c, GracefulStop) and c.enabled), None)
        info, warning_patterns = self._quiet
        if stop is not None:  # it says what a signal does; Lightning's "attempting graceful shutdown" is not it
            info = (*info, "Detected KeyboardInterrupt")
            stop.command_line = True  # resuming is this command with --ckpt_path last
        folders = RunFolders.before_run(self.trainer) if self.trainer.is_global_zero else None
        try:
            with quiet_messages(info, warning_patterns):
                try:
                    super()._run_subcommand(subcommand)
                except (MisconfigurationException, RuntimeError) as e:
                    trainer = self.config[subcommand].trainer
                    if (
                        error := unlogged_monitor(e, self.trainer) or port_in_use(e) or misconfigured(e, trainer)
                    ) is None:
                        raise
                    raise error from e
        except UserError:
            if folders is not None:  # refused at start-up: no empty run folder
                folders.remove_unused(self.trainer)
            raise
        except SystemExit as e:  # Lightning's exit after a signal: 1 after Ctrl+C, 0 after SIGTERM
            if stop is None or stop.interrupted_by is None:
                raise
            raise Interrupted(stop.interrupted_by) from e

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True  # checkpoints hold tensors and plain data only: never unpickle anything else
        return kwargs


UNLOGGED_MONITOR = {
    "ModelCheckpoint": re.compile(
        r"ModelCheckpoint\(monitor='(?P<key>[^']*)'\)` could not find the monitored key in the returned metrics: "
        r"\[(?P<keys>[^\]]*)\]"
    ),
    "EarlyStopping": re.compile(
        r"Early stopping conditioned on metric `(?P<key>[^`]*)` which is not available\..* following: (?P<keys>.*)$"
    ),
}
"""Lightning's errors, with a traceback once training is under way, for a ``monitor`` that names no logged metric."""


def unlogged_monitor(error: BaseException, trainer: Any) -> ConfigError | None:
    """The one line for ``error`` if it is a checkpoint's or early stopping's ``monitor`` naming a metric that is not
    logged (a typo such as ``val/los``); ``None`` for any other error."""
    for name, pattern in UNLOGGED_MONITOR.items():
        if found := pattern.search(" ".join(str(error).split())):
            key, logged = found["key"], re.findall(r"[`']([^`']+)[`']", found["keys"])
            section = name == "ModelCheckpoint" and any(
                isinstance(c, RunCheckpoint) and c.monitor == key for c in trainer.callbacks
            )
            return ConfigError(
                f"{name} monitors {key!r}, which is not among the logged metrics ({', '.join(logged)})",
                "checkpoint.monitor" if section else f"trainer.callbacks ({name})",
                "monitor one of those",
            )
    return None


def misconfigured(error: BaseException, trainer: Any = None) -> ConfigError | None:
    """Lightning's word for a setting that cannot work, found once ``fit`` sets up (``DeviceStatsMonitor`` listed
    with ``trainer.logger: false``), as one line (at the ``trainer`` settings it names); ``None`` for any other
    error."""
    return refused_setting(error, trainer) if isinstance(error, MisconfigurationException) else None


def refused_setting(error: BaseException, trainer: Any = None) -> ConfigError:
    """The one line for a configured value Lightning or a constructor refused, in its own words; where the words
    name arguments of ``trainer`` (its settings) in backquotes (devices in "`devices` selected...", "`Trainer(devices=
    '0')`"; strategy in "The strategy `fsdp`"; "invalid value 1.5 for val_check_interval"; what Lightning builds of one,
    :data:`SETTING_OF`), at those settings with their values; where they name none, at the
    setting whose class raised it (:func:`setting_that_raised`)."""
    what = one_line(error)
    spans = re.findall(r"(?:(\w+) )?`(?:Trainer\()?(\w+)[^`]*`", what)  # the word before a `span`, its first name
    named = dict.fromkeys(name for span in spans for name in span)
    named |= dict.fromkeys(re.findall(r"invalid value \S+ for (\w+)", what))  # "... for val_check_interval, it has"
    keys = list(dict.fromkeys(SETTING_OF.get(name, name) for name in named))
    keys = [key for key in keys if trainer is not None and key in trainer]
    if not keys and trainer is not None:  # "To use the `DeepSpeedStrategy`, you must have DeepSpeed installed"
        keys = setting_that_raised(error, trainer)
    return ConfigError(what, settings_where(trainer, keys), "fix the value in the YAML or the flag")


SETTING_OF = {"Timer": "max_time"}
"""The ``trainer`` settings Lightning's words name by what it builds of them: ``Timer(duration='abc')`` is
``max_time: abc``."""


def one_line(error: BaseException) -> str:
    """Lightning's (or a constructor's) words in ``error`` as one line: its messages may span lines."""
    return " ".join(str(error).split()).rstrip(".!")


def settings_where(trainer: Any, keys: list[str]) -> str:
    """Where a line says the ``trainer`` settings ``keys`` are: ``trainer.devices: -2, trainer.accelerator: cpu``;
    with none, the configuration."""
    return ", ".join(f"trainer.{key}: {setting_value(trainer[key])}" for key in keys) or "the configuration"


def setting_value(value: Any) -> str:
    """A configured value as its line shows it: ``0``, ``false``, ``[0,1]``; a class (given or built) by its name, a
    list of classes as ``[TensorBoardLogger,WandbLogger]``."""
    if isinstance(value, list | tuple) and not all(isinstance(v, str | int | float | bool) for v in value):
        return f"[{','.join(setting_value(v) for v in value)}]"
    if isinstance(value, str | int | float | bool | list | tuple) or value is None:
        return flag_value(value)
    class_path = value.get("class_path") if isinstance(value, dict | Namespace) else None
    return str(class_path).rsplit(".", 1)[-1] if class_path else type(value).__name__


def settings_of_class(trainer: Any, class_path: str) -> list[str]:
    """The ``trainer`` settings that give the class ``class_path`` (``logger``, alone or in a list)."""
    keys = []
    for key, value in vars(trainer).items():  # its own settings (a Namespace's keys() are the nested ones)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict | Namespace) and v.get("class_path") == class_path for v in values):
            keys.append(key)
    return keys


BUILT_BY_NAME = {"strategy": "lightning.pytorch.strategies.", "accelerator": "lightning.pytorch.accelerators."}
"""The ``trainer`` settings whose names (``strategy: xla``) Lightning builds into classes, and where those live."""


def setting_that_raised(error: BaseException, trainer: Any) -> list[str]:
    """The ``trainer`` setting (a strategy, an accelerator) whose class raised ``error`` (``strategy: xla`` without
    torch_xla, in its constructor), as a list of its key; none when code of another raised it."""
    frame = list(traceback.walk_tb(error.__traceback__))[-1][0] if error.__traceback__ else None
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return [key for key, package in BUILT_BY_NAME.items() if module.startswith(package) and key in trainer]


def with_atomic_checkpoint_io(trainer_config: dict[str, Any]) -> dict[str, Any]:
    """The trainer arguments with ``AtomicCheckpointIO`` among the plugins, unless they or the strategy name a
    ``CheckpointIO`` already."""
    plugins = trainer_config.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    strategy = trainer_config.get("strategy")
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None) is not None:
        return trainer_config
    return {**trainer_config, "plugins": [*plugins, AtomicCheckpointIO()]}


def check_same_model(model_config: Any, ckpt_path: str) -> None:
    """Before Lightning loads ``ckpt_path`` into the configured model: the same architecture, or one line naming every
    field that differs (instead of a wall of size mismatches from ``load_state_dict``)."""
    check_resumed_model(_as_config(model_config), recorded_config(ckpt_path, "--ckpt_path"), f"--ckpt_path {ckpt_path}")


SHARDED_READERS = ("FSDP2Strategy",)
"""Strategies that read a sharded (torch.distributed.checkpoint) folder, on any number of devices, and safely
(Lightning's own ``ModelParallelStrategy`` unpickles its metadata and optimizer entries freely)."""


def check_strategy_reads(strategy: Any, ckpt_path: Path) -> None:
    """A sharded checkpoint folder loads only under FSDP2: say so before Lightning tries to open it as a file."""
    if not is_sharded_checkpoint(ckpt_path):
        return
    name = strategy if isinstance(strategy, str) else strategy.get("class_path", "") if strategy else ""
    if name == STRATEGY_NAME or str(name).endswith(SHARDED_READERS):
        return
    raise sharded_needs_fsdp2(ckpt_path, name or "auto", f"--ckpt_path {ckpt_path}", "add --trainer.strategy=fsdp2")


QUIET_INFO = (
    "Skipping setting a default `ModelSummary`",  # we install our own summary on purpose
    "Tip: For seamless cloud logging",  # an advertisement
)


LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
PACKAGE_DIR = Path(__file__).resolve().parent
"""Where our warnings come from (:func:`print_our_warnings_as_lines`)."""
SCORING_QUIET_INFO = ("Restoring states from the checkpoint path at",)
"""``validate``/``test --ckpt_path``: nothing is resumed; Lightning's next line says it loaded the file's weights."""
SCORING_QUIET_WARNINGS = (
    r"The dirpath has changed from .* won't be reloaded",
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
)
"""``validate``/``test --ckpt_path``: they write no checkpoints (from another version folder too) and restore no
callback state (from callbacks configured otherwise too)."""
RESUMING_QUIET_WARNINGS = (r"Checkpoint directory .* exists and is not empty",)
"""``fit`` resuming into the folder its checkpoint came from: that folder is meant to hold the run's checkpoints."""


class _QuietInfo(logging.Filter):
    def __init__(self, texts: tuple[str, ...] = QUIET_INFO) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


@contextmanager
def quiet_messages(info: tuple[str, ...], warning_patterns: tuple[str, ...]) -> Iterator[None]:
    """Leave out Lightning's INFO lines containing one of ``info`` and the warnings matching ``warning_patterns``."""
    quiet = _QuietInfo(info)
    # Lightning's loggers print through their own handler, or through the root logger's where it has one
    handlers = [handler for name in (*LIGHTNING_LOGGERS, None) for handler in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for pattern in warning_patterns:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def check_precision_available(precision: object) -> None:
    """Refuse a Transformer Engine precision when the package is missing (Lightning raised a ModuleNotFoundError)."""
    if str(precision).startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "this precision needs NVIDIA Transformer Engine, which is not installed",
            f"trainer.precision: {precision}",
            "install transformer_engine (GPUs only) or train in bf16-mixed",
        )


def exit_status(cli: EPASCLI) -> int:
    """0, or 128 + the signal (130 Ctrl+C, 143 SIGTERM) when ``GracefulStop`` ended ``fit`` early."""
    callbacks = cli.trainer.callbacks if getattr(cli, "trainer", None) is not None else []
    stops = [c.exit_status for c in callbacks if isinstance(c, GracefulStop) and c.exit_status is not None]
    return stops[0] if stops else 0


def print_our_warnings_as_lines() -> None:
    """Our warnings (``rank_zero_warn`` in the callbacks, the module) print as their message alone, like our log lines:
    Lightning formats every warning from a path containing "lightning" as ``<file>:<line>: <message>``, ours too."""
    previous = warnings.formatwarning
    if getattr(previous, "ours", False):
        return

    def format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return f"{message}\n"
        return previous(message, category, filename, lineno, line)

    format_warning.ours = True
    warnings.formatwarning = format_warning


def lightning_cli(args: ArgsType = None, run: bool = True) -> EPASCLI:
    """Run ``fit``/``validate``/``test`` (``args`` replaces ``sys.argv[1:]``); ``run=False`` only builds the objects."""
    print_our_warnings_as_lines()
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        for handler in logging.getLogger(name).handlers:  # handlers see the records of every child logger
            handler.addFilter(_QuietInfo())
    args = resolve_config_names(list(sys.argv[1:] if args is None else args))
    commands = (args[0],) if run and args and args[0] in LIGHTNING_COMMANDS else LIGHTNING_COMMANDS
    return EPASCLI(
        EPASModule,
        TokenDataModule,
        seed_everything_default=1234,
        auto_configure_optimizers=False,
        parser_class=CommandParser,
        trainer_defaults={"callbacks": [RunSummary(command_line=True), FlopsModelSummary(), EndChildRanksOnError()]},
        parser_kwargs={
            "prog": PROG,  # usage lines read `python -m epas_lightning fit`, not `__main__.py fit`
            "exit_on_error": False,
            "allow_abbrev": False,  # --trainer.max_step is a misspelt key, not max_steps (the subcommands inherit it)
            **{name: {"exit_on_error": False} for name in commands},
        },
        args=args,
        run=run,
        commands=commands,
    )
