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

import logging
import os
import random
import re
import sys
import typing
import warnings
from argparse import ArgumentError
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from epas_lightning.callbacks import (
    SCORING_A_CHECKPOINT,
    ProgressiveSharing,
    StepLearningRateMonitor,
    TokenThroughputMonitor,
    refuse_static_graph,
)
from epas_lightning.checkpoint import recorded_config
from epas_lightning.checkpoint_formats import read_checkpoint, read_lightning_metadata
from epas_lightning.checkpoint_io import AtomicCheckpointIO, sharded_needs_fsdp2
from epas_lightning.child_ranks import EndChildRanksOnError, peer_rank_ended, watch_from_launch
from epas_lightning.cli import (
    DURATION,
    LIGHTNING_COMMANDS,
    LIGHTNING_HELP,
    PROG,
    print_config_options,
    unknown_option,
)
from epas_lightning.config_resolution import (
    LINKED_FIELDS,
    LinkedField,
    as_model_config,
    drop_overridden_builtin_settings,
    missing_init_from,
    resolve_config_names,
    resolve_model,
)
from epas_lightning.data import TokenDataModule
from epas_lightning.data.token_data import check_data_section
from epas_lightning.divergence import DivergenceGuard
from epas_lightning.errors import ConfigError, UserError, check_path_name
from epas_lightning.init_from import resumed_instead
from epas_lightning.interrupt import GracefulStop
from epas_lightning.interrupted import Interrupted
from epas_lightning.launch import check_processes_meet, check_slurm_tasks, missing_slurm_task, port_in_use
from epas_lightning.lightning_messages import (
    IGNORED_WARNINGS,
    LIGHTNING_LOGGERS,
    RESUMING_ELSEWHERE_QUIET_WARNINGS,
    RESUMING_QUIET_WARNINGS,
    SCORING_QUIET_INFO,
    SCORING_QUIET_WARNINGS,
    QuietInfo,
    print_our_warnings_as_lines,
    quiet_messages,
)
from epas_lightning.model.config import OTHER_NAMES
from epas_lightning.module import EPASModule, check_resumed_model, check_trainable_precision
from epas_lightning.option_help import HELP_HERE
from epas_lightning.resume import (
    RESUME_WORDS,
    check_checkpoint_folder_free,
    check_logger_folders_free,
    check_no_slurm_checkpoint,
    check_not_empty,
    check_resume_word,
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
from epas_lightning.safe_load import is_sharded_checkpoint, load_torch_file, release_kept_read, verify_checkpoint
from epas_lightning.seeds import SEED_FIX, TRAINING_SEEDS, seed_out_of_range
from epas_lightning.sigterm_in_setup import answer_sigterm_in_setup
from epas_lightning.strategy import STRATEGY_NAME, check_data_parallel_only, check_strategy_name
from epas_lightning.trainer_checks import (
    check_accelerator_available,
    check_counts,
    check_gradient_clip,
    check_precision_available,
    check_scores_something,
    check_validation_interval,
)
from epas_lightning.trainer_errors import (
    misconfigured,
    one_line,
    refused_setting,
    save_triggers_refused,
    setting_that_raised,
    settings_of_class,
    settings_where,
    unlogged_monitor,
)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "epas", "default_hp_metric": False},
}


OTHER_FIT_FLAG_NAMES = {
    "sharing-layers": "sharing.target",
    "sharing_layers": "sharing.target",
    "dtype": "trainer.precision",
    "precision": "trainer.precision",
    "device": "trainer.accelerator",
    "devices": "trainer.devices",
    "max_steps": "trainer.max_steps",
}
"""The tools' and LitGPT's names of a fit setting -> its flag: ``--sharing-layers`` was said to mean
``sharing.n_layer`` (by its spelling), a field fit links from the model, not one to set."""


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
    _seed: int | None = None
    """The seed the command set (``None``: ``seed_everything: false``), said as it runs."""

    def __init__(self, *args: Any, commands: tuple[str, ...] = LIGHTNING_COMMANDS, **kwargs: Any) -> None:
        self._commands = commands
        forget_cached_unions()  # before jsonargparse reads the signatures
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
            # what the command does here, not the first line of Lightning's Trainer.<name> docstring (test's stops
            # mid-sentence), also as the title of --ckpt_path's group
            subcommand_parser.description = LIGHTNING_HELP[name]
            for group in subcommand_parser._action_groups:
                if any(action.dest == "ckpt_path" for action in group._group_actions):
                    group.title = LIGHTNING_HELP[name].rstrip(".")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for section, callback in RUN_SECTIONS.items():
            parser.add_lightning_class_args(callback, section)
        for target, field in LINKED_FIELDS.items():
            parser.link_arguments(("model.config", "model.init_from"), target, compute_fn=LinkedField(field))
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
            aliases.update(OTHER_FIT_FLAG_NAMES)
            if (unknown := unknown_option(e, parsers.get(args[0]) if args else None, aliases, args)) is None:
                raise
            raise unknown from e
        finally:
            PARSED_COMMAND.reset(command)
        if (subcommand := self.config.get("subcommand")) is not None:  # SIGTERM since the command started: answered,
            answer_sigterm_in_setup(self.config[subcommand].interrupt.enabled)  # or left to Lightning
        if printing:
            subcommand = self.config.subcommand
            config = self.config[subcommand].clone()
            ckpt_path = config.get("ckpt_path")  # a resume's model is its checkpoint's: init_from may be gone
            if not ckpt_path and (missing := missing_init_from(config)):  # printed as configured, not refused
                note = "model.config is printed as configured, without the fields fit reads from it"
                print(f"note: model.init_from {missing} does not exist here: {note}", file=sys.stderr)
            else:
                resolve_model(config, run_last_checkpoint(config) if ckpt_path in RESUME_WORDS else ckpt_path)
                config.model.config = Namespace(**as_model_config(config.model.config).to_dict())
            print(self._subcommand_parsers[subcommand].dump(config, skip_link_targets=False, **dump_options))
            raise SystemExit(0)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``/``auto`` and check the checkpoint is safe to load, before anything opens it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:  # run=False: the objects are built, with the model config whole
            resolve_model(self.config)
            return
        config = self.config[subcommand]
        check_not_empty(config.get("ckpt_path"))
        fitting = subcommand == "fit"
        if not fitting:  # it resumes no run: even its checkpoint's run folder is another run's, before it is read
            self._check_log_folders_free(config, None)
        if config.get("ckpt_path") in RESUME_WORDS:
            config.ckpt_path = resume_checkpoint(config, config.ckpt_path, fitting)
        elif not config.get("ckpt_path"):
            check_no_slurm_checkpoint(config)
        if config.get("ckpt_path"):  # Path.exists() of one raised "File name too long"
            check_path_name(config.ckpt_path, f"--ckpt_path {config.ckpt_path}")
        if fitting:
            check_checkpoint_folder_free(config, config.get("ckpt_path"))
        if config.get("ckpt_path"):
            check_resume_word(config.ckpt_path)
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
            else:
                self._quiet = ((), RESUMING_ELSEWHERE_QUIET_WARNINGS)
            if config.model.get("init_from"):  # never read: a folder deleted or unmounted since must not stop this
                say(resumed_instead(config.ckpt_path))
                config.model.init_from = None
        if fitting:
            self._check_log_folders_free(config, config.get("ckpt_path"))
        if config.get("ckpt_path") and holds_hyperparameters(Path(config.ckpt_path)):
            release_kept_read(Path(config.ckpt_path))  # Lightning reads it whole: not held beside that
            super()._parse_ckpt_path()

    def _check_log_folders_free(self, config: Namespace, ckpt_path: str | None) -> None:
        """The version folders the config gives its loggers hold no other run's config or logs, but those of the run
        a ``fit`` resumes from ``ckpt_path``."""
        scoring = self.config.get("subcommand") != "fit"
        if self.save_config_callback is not None:
            config_filename = self.save_config_kwargs.get("config_filename", "config.yaml")
            check_version_folder_free(config, config_filename, ckpt_path, scoring=scoring)
        check_logger_folders_free(config, ckpt_path, scoring)

    @property
    def _section(self) -> Namespace:
        """The parsed config of the command being run (``fit``'s, ...), or the whole config without subcommands."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def _set_seed(self) -> None:
        """``true`` draws a seed (Lightning's ``seed_everything()`` seeds 0); a seed numpy cannot take is one line.

        The chosen seed replaces ``true`` in the config, so the run's ``config.yaml`` can repeat it. The ranks a run
        starts find rank zero's in ``PL_GLOBAL_SEED``, as Lightning reads it. Lightning's "Seed set to" line is said
        once the command runs (:meth:`_run_subcommand`), so that a start refused by a later check prints only its
        one line.
        """
        seed = self._get(self.config, "seed_everything")
        if seed is True and "PL_GLOBAL_SEED" not in os.environ:
            seed = self._section["seed_everything"] = random.SystemRandom().choice(TRAINING_SEEDS)
        elif type(seed) is int and (problem := seed_out_of_range(seed, TRAINING_SEEDS)):
            raise ConfigError(problem, f"--seed_everything {seed}", f"{SEED_FIX}, or false")
        if seed is False:
            return
        self._seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        self._section["seed_everything"] = self._seed
        if not self.subcommand:  # run=False: objects only, no command to say it at
            self._say_seed()

    def _say_seed(self) -> None:
        if self._seed is not None:
            rank_zero_info(f"Seed set to {self._seed}")  # Lightning's line, as it says it

    def before_instantiate_classes(self) -> None:
        section = self._section
        if self.subcommand and section.get("weights_only") is False:
            raise ConfigError(
                "checkpoints always load with weights_only=True here", "--weights_only false", "leave it unset"
            )
        trainer = section.trainer
        check_accelerator_available(trainer.get("accelerator"))
        check_scores_something(self.subcommand, trainer)
        check_strategy_name(trainer.get("strategy"))
        check_counts(trainer)
        check_gradient_clip(trainer.get("gradient_clip_val"))
        check_validation_interval(trainer)
        check_precision_available(trainer.get("precision"))
        drop_overridden_builtin_settings(section.data, self._command_line)
        if self.subcommand:
            check_run_folders_writable(section, fitting=self.subcommand == "fit")
        if self.subcommand == "fit":
            check_trainable_precision(trainer.get("precision"))
        if self.subcommand:
            data = section.data
            check_data_section(data.get("data_dir"), data.get("val_dir"), data.get("vocab_size"))

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
            raise save_triggers_refused(e, section.get("checkpoint")) or refused_setting(e) from e
        finally:
            SCORING_A_CHECKPOINT.reset(token)
        if isinstance(self.model, EPASModule):  # it reads init_from (a resume's was set aside): before any data
            self.model.check_init_from()
            resumed = section.get("ckpt_path") if self.subcommand == "fit" else None
            early = resumed and self.model.reads_checkpoints_as_saved()
            if early and (metadata := read_lightning_metadata(resumed)) is not None:  # before any data is prepared
                self.model.check_resumable(metadata, resumed)

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
        check_data_parallel_only(trainer.strategy, trainer.num_devices, trainer.num_nodes)
        growing = [c for c in trainer.callbacks if isinstance(c, ProgressiveSharing) and c.enabled]
        for sharing in growing if self.subcommand == "fit" else []:
            # before Lightning starts the ranks (each would refuse it in setup, one line each); n_layer is linked
            refuse_static_graph(trainer.strategy, sharing.schedule)
        watch_from_launch(trainer)  # a rank that fails before fit's setup: rank 0 says so and exits with its status
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        for guard in (c for c in self.trainer.callbacks if isinstance(c, DivergenceGuard)):
            guard.command_line = True  # resuming is this command with --ckpt_path
        stop = next((c for c in self.trainer.callbacks if isinstance(c, GracefulStop) and c.enabled), None)
        info, warning_patterns = self._quiet
        if stop is not None:  # it says what a signal does; Lightning's "attempting graceful shutdown" is not it
            info = (*info, "Detected KeyboardInterrupt", "Received SIGTERM")
            stop.command_line = True  # resuming is this command with --ckpt_path last
        if subcommand != "fit" and (ckpt_path := self.config[subcommand].get("ckpt_path")):
            check_scored_regions(self.trainer.callbacks, ckpt_path)
        self._say_seed()  # once no start-up check refused the run
        folders = RunFolders.before_run(self.trainer) if self.trainer.is_global_zero else None
        try:
            with quiet_messages(info, warning_patterns):
                try:
                    super()._run_subcommand(subcommand)
                except (MisconfigurationException, RuntimeError) as e:
                    trainer = self.config[subcommand].trainer
                    error = unlogged_monitor(e, self.trainer) or port_in_use(e) or misconfigured(e, trainer)
                    if (error := error or peer_rank_ended(e, self.trainer)) is None:
                        raise
                    raise error from e
        except UserError:
            if folders is not None:  # refused at start-up: no empty run folder
                folders.remove_unused(self.trainer)
            raise
        except SystemExit as e:  # Lightning's exit after a signal: 1 after Ctrl+C, 0 after SIGTERM
            if stop is None or stop.interrupted_by is None:
                raise
            if folders is not None:  # a stop before the first step (Ctrl+C, SIGTERM): as a refused start
                folders.remove_unused(self.trainer)
            raise Interrupted(stop.interrupted_by, stop.interrupted_reason, stop.interrupted_announce) from e

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True  # checkpoints hold tensors and plain data only: never unpickle anything else
        return kwargs


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
    check_resumed_model(
        as_model_config(model_config), recorded_config(ckpt_path, "--ckpt_path"), f"--ckpt_path {ckpt_path}"
    )


def forget_cached_unions() -> None:
    """Empty typing's caches of subscripted types, so that the options' unions keep their signatures' order.

    jsonargparse makes a union whose default is ``None`` ``Optional[...]`` as it reads a signature; typing caches
    ``Union[...]`` by its members, and unions of the same members in another order are equal: once the process had
    read ``float | int | None = None`` (a notebook's own parser, a test before), Lightning's ``limit_train_batches:
    int | float | None`` came back float first: ``-1`` parsed as ``-1.0``, and ``3`` as ``3.0``, which Lightning
    reads as a fraction. The caches only save time; CPython's own test runner empties them the same way."""
    for cache_clear in getattr(typing, "_cleanups", ()):
        cache_clear()


def check_scored_regions(callbacks: list[Any], ckpt_path: str) -> None:
    """``validate``/``test --ckpt_path``: ``val_sharing_layers`` past the region the checkpoint trained, refused from
    its metadata before Lightning reads it whole (:meth:`ProgressiveSharing.check_scored_checkpoint`)."""
    sharing = [c for c in callbacks if isinstance(c, ProgressiveSharing) and c.val_sharing_layers]
    if sharing:
        metadata = read_checkpoint(ckpt_path, weights=False, flag="--ckpt_path")[1]
        for callback in sharing:
            callback.check_scored_checkpoint(metadata)


def holds_hyperparameters(ckpt_path: Path) -> bool:
    """Whether the checkpoint file ``ckpt_path`` holds hyperparameters for Lightning's ``_parse_ckpt_path`` to put into
    the config (``EPASModule`` saves none): that reads the whole file (not mapped) to find out, this the mapped metadata
    (:func:`~epas_lightning.safe_load.load_torch_file`). A folder holds none Lightning reads."""
    if not ckpt_path.is_file():
        return False
    loaded = load_torch_file(ckpt_path, mmap=True, where=f"--ckpt_path {ckpt_path}", keep=True)
    hparams = loaded.get("hyper_parameters") if isinstance(loaded, dict) else None
    return isinstance(hparams, dict) and bool(hparams.keys() - {"_instantiator"})


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


def exit_status(cli: EPASCLI) -> int:
    """0, or 128 + the signal (130 Ctrl+C, 143 SIGTERM) when ``GracefulStop`` ended ``fit`` early."""
    callbacks = cli.trainer.callbacks if getattr(cli, "trainer", None) is not None else []
    stops = [c.exit_status for c in callbacks if isinstance(c, GracefulStop) and c.exit_status is not None]
    return stops[0] if stops else 0


def lightning_cli(args: ArgsType = None, run: bool = True) -> EPASCLI:
    """Run ``fit``/``validate``/``test`` (``args`` replaces ``sys.argv[1:]``); ``run=False`` only builds the objects."""
    print_our_warnings_as_lines()
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        for handler in logging.getLogger(name).handlers:  # handlers see the records of every child logger
            handler.addFilter(QuietInfo())
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
