"""Which checkpoint ``--ckpt_path last|auto`` means, and where a resumed ``fit`` logs and checkpoints.

``last`` (``auto``: or nothing) is the newest ``last.ckpt`` of the same run: the ``checkpoint`` section's ``dirpath``,
or the logger's ``save_dir``/``name``/``<version>/checkpoints`` (``version_N``, or the name a config gives it). A
``fit`` from a checkpoint in a run's version folder keeps logging and checkpointing into that folder, unless that run
went on past it; a fixed checkpoint folder (``checkpoint.dirpath``, or a version the config gives the logger) whose
run went on past the checkpoint is refused, and so is a new run into one holding an earlier run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment

from epas_lightning.checkpoint_formats import read_checkpoint
from epas_lightning.errors import CheckpointError, OutputError, UserError, did_you_mean
from epas_lightning.run_summary import say
from epas_lightning.strategy import REPLACED, recover_replaced

RESUME_WORDS = ("last", "auto")


def check_not_empty(ckpt_path: object) -> None:
    """Refuse an empty ``--ckpt_path`` (``"$CKPT"``, CKPT unset): Lightning took it for a word it did not know and
    raised a ValueError traceback once the data was prepared."""
    if isinstance(ckpt_path, str) and not ckpt_path.strip():
        raise CheckpointError(
            "--ckpt_path is given an empty path",
            f"--ckpt_path {ckpt_path!r}",
            "give a checkpoint's path, last or auto (is a variable unset?)",
        )


def check_resume_word(ckpt_path: str) -> None:
    """Refuse a bare word that names no file or folder here (``--ckpt_path lst``, ``Last``) as a misspelt resume word:
    "check the path" did not say which words there are."""
    word = str(ckpt_path)
    if Path(word).expanduser().exists() or "/" in word or os.sep in word or "." in word:
        return
    raise CheckpointError(
        f"no checkpoint named {word!r} here{did_you_mean(word.lower(), RESUME_WORDS)}",
        f"--ckpt_path {word}",
        "give last (this run's newest checkpoint), auto (that, or a fresh start where there is none) or a "
        "checkpoint's path",
    )


def logger_run_dirs(config: Namespace) -> list[Path]:
    """The folders whose subfolders hold this run's versions (logger ``save_dir``/``name``): ``version_N``, or a
    logger's own version name."""
    given = config.trainer.get("logger")
    if given is True or given is None:  # Lightning's own: TensorBoardLogger(default_root_dir, "lightning_logs")
        return [Path(config.trainer.get("default_root_dir") or ".").expanduser() / DEFAULT_LOGGER_NAME]
    return [run_dir for logger in configured_loggers(config) if (run_dir := _run_dir(logger)) is not None]


def configured_loggers(config: Namespace) -> list[Any]:
    """``trainer.logger`` as a list of the configured loggers (``true``, ``false`` or null: that value alone)."""
    loggers = config.trainer.get("logger")
    return loggers if isinstance(loggers, list) else [loggers]


def _first_logger(config: Namespace) -> Any:
    """The first configured logger: the one ``ModelCheckpoint`` saves under and ``config.yaml`` is written beside
    (``None`` for an empty list)."""
    return next(iter(configured_loggers(config)), None)


DEFAULT_LOGGER_NAME = "lightning_logs"
"""The ``name`` of a logger that is not given one (Lightning's loggers, and the one ``trainer.logger: true`` makes)."""


def _run_dir(logger: object) -> Path | None:
    """A configured logger's ``save_dir``/``name``, if it has a ``save_dir``; ``name: ''`` or null: ``save_dir``
    itself, as Lightning's loggers read it (their version folders lie directly in it)."""
    init = logger.get("init_args") if isinstance(logger, Namespace | dict) else None
    if not init or not init.get("save_dir"):
        return None
    name = init.get("name", DEFAULT_LOGGER_NAME)
    return Path(init["save_dir"]).expanduser() / (str(name) if name else "")


def _fixed_version_folder(config: Namespace) -> Path | None:
    """The version folder of the first logger (the one ``ModelCheckpoint`` saves under) where the config gives it a
    version: ``<save_dir>/<name>/version_N``, or ``<save_dir>/<name>/<version>`` for a version given as a name."""
    first = _first_logger(config)
    run_dir = _run_dir(first)
    version = first["init_args"].get("version") if run_dir is not None else None
    return None if version is None else version_folder(run_dir, version)


def version_folder(run_dir: Path, version: int | str) -> Path:
    """The folder of a logger's ``version`` under its ``save_dir``/``name``: ``version_N``, or the name it was given."""
    return run_dir / (version if isinstance(version, str) else f"version_{version}")


def resume_checkpoint(config: Namespace, word: str, fitting: bool = True) -> str | None:
    """The newest ``last.ckpt`` of this run for ``--ckpt_path last|auto`` (``fit`` says it resumes it).

    ``last`` with no checkpoint is an error; ``auto`` then starts from scratch, or scores the configured model (and
    says so).
    """
    dirpath, run_dirs = _last_checkpoint_folders(config)
    if not dirpath:
        check_run_folder_known(config, word)
    newest = newest_last_checkpoint(dirpath, run_dirs)
    if newest is None and word == "auto":
        check_no_slurm_checkpoint(config)
        instead = "starting from scratch" if fitting else "scoring the configured model"
        say(f"--ckpt_path auto: no last.ckpt under {_last_checkpoint_places(dirpath, run_dirs)}; {instead}.")
        return None
    if newest is None:
        by_path = "pass the checkpoint's path to --ckpt_path"
        fix = f"train first, or {by_path}"
        if saved := saved_checkpoint_folder(run_dirs):
            config_file, folder = saved
            fix = f"{config_file} names checkpoint.dirpath {folder}: add --checkpoint.dirpath {folder}, or {by_path}"
        raise _no_last_checkpoint(dirpath, run_dirs, fix, "resume" if fitting else "score")
    if fitting:  # validate/test: Lightning says which file it loaded the weights from
        say(f"Resuming from {newest}")
    return str(newest)


def check_run_folder_known(config: Namespace, word: str) -> None:
    """Refuse ``last``/``auto`` where the logger ``ModelCheckpoint`` saves under (the first) is configured without a
    ``save_dir``: Lightning then checkpoints under ``<default_root_dir>/<the logger's name>/<its version>``, names known
    only once it runs, so ``last`` found nothing ("under ;") and ``auto`` started from scratch beside the run's
    checkpoints."""
    first = _first_logger(config)
    if not isinstance(first, Namespace | dict) or not first.get("class_path") or _run_dir(first) is not None:
        return
    raise CheckpointError(
        f"cannot tell which folder {first['class_path']} checkpoints into: it is given no save_dir",
        f"--ckpt_path {word}",
        "give the run a checkpoint folder (--checkpoint.dirpath; last and auto look there), or pass the checkpoint's "
        "path to --ckpt_path",
    )


def saved_checkpoint_folder(run_dirs: list[Path]) -> tuple[Path, str] | None:
    """The newest config a run saved in one of ``run_dirs``' version folders that names a ``checkpoint.dirpath``, and
    that folder: a run given its own checkpoint folder keeps no checkpoint in its version folder."""
    saved = sorted((p for d in run_dirs for p in d.glob("*/config*.yaml")), key=_mtime, reverse=True)
    for path in saved:
        if dirpath := _checkpoint_dirpath(path):
            return path, dirpath
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _checkpoint_dirpath(config_file: Path) -> str | None:
    """The ``checkpoint.dirpath`` a saved config names (``None`` for none, or a file that does not read as one)."""
    import yaml

    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = config.get("checkpoint") if isinstance(config, dict) else None
    dirpath = section.get("dirpath") if isinstance(section, dict) else None
    return dirpath if isinstance(dirpath, str) and dirpath else None


def run_last_checkpoint(config: Namespace) -> Path | None:
    """The ``last.ckpt`` that ``--ckpt_path last|auto`` would resume, if there is one (nothing said)."""
    return newest_last_checkpoint(*_last_checkpoint_folders(config))


def _last_checkpoint_folders(config: Namespace) -> tuple[str | None, list[Path]]:
    """Where ``last`` looks: the run's fixed checkpoint folder (:func:`checkpoint_folder`) alone where it has one, else
    every version folder of the loggers' run folders."""
    dirpath = checkpoint_folder(config)
    return dirpath, [] if dirpath else logger_run_dirs(config)


def newest_last_checkpoint(dirpath: str | Path | None, run_dirs: list[Path]) -> Path | None:
    """The newest ``last.ckpt`` in ``dirpath`` or in a version folder's ``checkpoints`` folder of one of ``run_dirs``
    (``version_N``, or a version given as a name)."""
    candidates = [Path(dirpath).expanduser() / "last.ckpt"] if dirpath else []
    for run_dir in run_dirs:
        candidates += run_dir.glob("*/checkpoints/last.ckpt")
        candidates += (p.with_name("last.ckpt") for p in run_dir.glob(f"*/checkpoints/.last.ckpt{REPLACED}"))
    for path in candidates:
        if recover_replaced(path):  # a sharded save killed between its renames: the previous last.ckpt is back
            say(f"{path} restored: a sharded save stopped between moving it aside and moving its successor in")
    found = [p for p in set(candidates) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def last_checkpoint_of_run(dirpath: str | Path | None, run_dirs: list[Path], fix: str) -> Path:
    """:func:`newest_last_checkpoint`, or a ``CheckpointError`` (saying ``fix``) when there is none."""
    newest = newest_last_checkpoint(dirpath, run_dirs)
    if newest is None:
        raise _no_last_checkpoint(dirpath, run_dirs, fix)
    return newest


def _no_last_checkpoint(
    dirpath: str | Path | None, run_dirs: list[Path], fix: str, use: str = "resume"
) -> CheckpointError:
    return CheckpointError(f"no last.ckpt of this run to {use}", _last_checkpoint_places(dirpath, run_dirs), fix)


def _last_checkpoint_places(dirpath: str | Path | None, run_dirs: list[Path]) -> str:
    places = [Path(dirpath)] if dirpath else []
    return ", ".join(str(place) for place in (*places, *(d / "version_*/checkpoints" for d in run_dirs)))


def checkpoint_folder(config: Namespace) -> str | None:
    """The folder ``fit`` checkpoints into where it does not depend on the version a logger picks: the ``checkpoint``
    section's ``dirpath``, without a logger ``<default_root_dir>/checkpoints``, or the ``checkpoints`` folder of the
    version the config gives the logger."""
    dirpath = config.get("checkpoint", {}).get("dirpath") if config.get("checkpoint") else None
    if not dirpath and config.trainer.get("logger") is False:  # no logger: Lightning saves into the root folder
        dirpath = str(Path(config.trainer.get("default_root_dir") or ".") / "checkpoints")
    if not dirpath and (version_folder := _fixed_version_folder(config)) is not None:
        dirpath = str(version_folder / "checkpoints")
    return dirpath


def check_checkpoint_folder_free(config: Namespace, ckpt_path: str | None) -> None:
    """A ``fit`` that does not resume from a checkpoint of its own checkpoint folder must find that folder without
    checkpoints: Lightning only warns, then names its saves ``last-v1.ckpt``, ``...-v1.ckpt`` beside the other run's
    while the ``last.ckpt`` of the stop and of the end replaced that run's, and ``--ckpt_path last`` resumed either.
    (Without a fixed folder every run gets a new version folder.)"""
    folder = checkpoint_folder(config)
    if not folder or config.trainer.get("enable_checkpointing") is False:
        return
    where = f"checkpoint.dirpath {folder}" if config.get("checkpoint") and config.checkpoint.get("dirpath") else folder
    if ckpt_path and same_folder(folder, Path(ckpt_path).parent):
        if further := further_checkpoint(Path(ckpt_path)):  # a rewind would mix two runs here, replace the later ones
            newest = "last" if further[0].name == "last.ckpt" else str(further[0])
            raise CheckpointError(
                f"the run in this checkpoint folder {went_on_words(further)} after {Path(ckpt_path).name}, which this "
                "run would mix with its own checkpoints and replace",
                where,
                "give the resumed run an empty folder (checkpoint.dirpath), or resume the newest with --ckpt_path "
                + newest,
            )
        return
    try:
        found = sorted(p.name for p in Path(folder).expanduser().glob("*.ckpt"))
    except OSError:  # a parent that cannot be searched, a name too long: check_run_folders_writable says it
        found = []
    if found:
        raise CheckpointError(
            f"the checkpoint folder holds another run's checkpoints ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}), which this run would mix with its own and partly replace",
            where,
            "resume that run with --ckpt_path last, or give this one an empty folder (checkpoint.dirpath"
            + (", or another trainer.logger.init_args.version)" if _fixed_version_folder(config) else ")"),
        )


def check_version_folder_free(
    config: Namespace, config_filename: str, ckpt_path: str | None = None, scoring: bool = False
) -> None:
    """A ``fit`` into the version folder the config gives its logger must not find another run's saved config there
    (a rerun of a run stopped before its first checkpoint): Lightning's ``SaveConfigCallback`` stopped with a traceback,
    once the data was prepared and an event file added to that run's folder. A resume of that folder's checkpoint
    (``ckpt_path``) finds one where a ``CSVLogger`` keeps it from logging there (:func:`version_to_continue`).
    ``scoring``: a ``validate``/``test``, which resumes no run, so ``ckpt_path`` is not given."""
    folder = _fixed_version_folder(config)
    if folder is None or not (log_folder(config, folder) / config_filename).exists():
        return
    if ckpt_path and same_folder(str(folder / "checkpoints"), Path(ckpt_path).parent) and has_csv_logger(config):
        raise OutputError(
            f"CSVLogger would rewrite {folder / 'metrics.csv'}, the metrics of the run this one resumes",
            folder,
            "give the resumed run another version (trainer.logger.init_args.version), and the checkpoint's path as "
            "--ckpt_path",
        )
    raise OutputError(
        f"the logger's version folder holds another run ({config_filename}), which this run would mix its logs with",
        folder,
        "give this run another version (trainer.logger.init_args.version), or "
        + ("none for a new version_N" if scoring else "resume that run with --ckpt_path"),
    )


LOG_FILES = ("metrics.csv", "events.out.tfevents.*")
"""The files Lightning's CSV and TensorBoard loggers write into their version folder."""


def check_logger_folders_free(config: Namespace, ckpt_path: str | None, scoring: bool = False) -> None:
    """Each logger given a version must find its version folder without another run's logs: a ``CSVLogger`` deleted
    that run's ``metrics.csv`` (Lightning only warned), a ``TensorBoardLogger`` added its events to that run's. A resume
    (``ckpt_path``) may add to them, not rewrite them: a ``CSVLogger`` still may not log there. A ``validate``/``test``
    (``scoring``), which writes no checkpoint, must also find no run's checkpoints there (that run's logs in a
    ``sub_dir``, or deleted): its config and logs were written beside them."""
    loggers = configured_loggers(config)
    for index, logger in enumerate(loggers):
        run_dir = _run_dir(logger)
        version = logger["init_args"].get("version") if run_dir is not None else None
        if version is None:
            continue
        folder, kind = version_folder(run_dir, version), str(logger["class_path"]).rsplit(".", 1)[-1]
        found = _log_files(folder, logger["init_args"])
        csv = kind.endswith("CSVLogger")
        fix = f"give it another version (trainer.logger{f'[{index}]' if len(loggers) > 1 else ''}.init_args.version)"
        if found and (csv or not ckpt_path):
            raise OutputError(
                f"{kind} would {'rewrite' if csv else 'add to'} another run's logs ({found[0].name}) in the version "
                "folder it is given",
                found[0].parent,
                f"{fix}, or none for a new version_N",
            )
        if scoring and (checkpoints := sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt"))):
            raise OutputError(
                f"{kind} would log into another run's version folder, which holds its checkpoints ({checkpoints[0]})",
                folder,
                f"{fix}, or none for a new version_N",
            )


def _log_files(folder: Path, init_args: Namespace) -> list[Path]:
    """The loggers' files (:data:`LOG_FILES`) in a version folder and in its ``sub_dir`` (a TensorBoardLogger's)."""
    sub_dir = init_args.get("sub_dir")
    return [path for f in {folder, folder / (sub_dir or "")} for name in LOG_FILES for path in sorted(f.glob(name))]


def same_folder(folder: str | None, other: Path) -> bool:
    return bool(folder) and Path(folder).expanduser().resolve() == other.resolve()


def continue_version(config: Namespace, ckpt_path: Path) -> Path | None:
    """Set the loggers' version so that ``fit`` resuming ``ckpt_path`` logs and checkpoints into the version folder the
    checkpoint lives in (:func:`version_to_continue`); return that folder. ``None`` also where the ``checkpoint``
    section names its own folder. A logger given a version keeps it.
    """
    if config.get("checkpoint") and config.checkpoint.get("dirpath"):
        return None
    version_dir = version_to_continue(ckpt_path, logger_run_dirs(config), csv_logger=has_csv_logger(config))
    if version_dir is None:
        return None
    for logger in configured_loggers(config):
        if isinstance(logger, Namespace) and logger.get("init_args") and logger.init_args.get("version") is None:
            logger.init_args.version = version_of(version_dir)
    return version_dir


def keep_version(loggers: list[Any], version_dir: Path | None) -> None:
    """The loggers of ``version_dir``'s run folder that the config could not give its version (Lightning's own, of
    ``trainer.logger: true``) log into it too, as :func:`continue_version` set the configured ones to."""
    for logger in loggers if version_dir is not None else []:
        root = getattr(logger, "root_dir", None)
        if getattr(logger, "_version", "") is None and root and Path(root).resolve() == version_dir.parent.resolve():
            logger._version = version_of(version_dir)


def has_csv_logger(config: Namespace) -> bool:
    """Whether one of the configured loggers is a ``CSVLogger``."""
    return any(
        isinstance(lg, Namespace) and str(lg.get("class_path", "")).endswith("CSVLogger")
        for lg in configured_loggers(config)
    )


def version_to_continue(ckpt_path: Path, run_dirs: list[Path], csv_logger: bool = False) -> Path | None:
    """The version folder (``<run_dir>/version_N``, ``run_dir`` one of ``run_dirs``) that ``fit`` resuming
    ``ckpt_path`` from its ``checkpoints`` folder keeps logging and checkpointing into.

    ``None`` (Lightning then starts a new version folder) where the checkpoint lives elsewhere, that run went on past
    the checkpoint (resuming it there would overwrite the later checkpoints), or the run logs with a ``CSVLogger``
    (``csv_logger``), which deletes the ``metrics.csv`` of a folder it starts logging into.
    """
    version_dir = ckpt_path.parent.parent
    if ckpt_path.parent.name != "checkpoints":
        return None
    if not any(run_dir.resolve() == version_dir.parent.resolve() for run_dir in run_dirs):
        return None
    if went_on := went_on_past(ckpt_path):
        say(f"{version_dir} {went_on}: this run logs and checkpoints into a new version folder; that one stays")
        return None
    if csv_logger:
        say(f"CSVLogger would rewrite {version_dir / 'metrics.csv'}: this run logs into a new version folder")
        return None
    return version_dir


def went_on_past(ckpt_path: Path) -> str | None:
    """How the run whose checkpoint folder holds ``ckpt_path`` went on past it (``"went on to step 12"``), or ``None``
    where it did not (:func:`further_checkpoint`): resuming there would replace its later checkpoints, or mix its own
    with them."""
    further = further_checkpoint(ckpt_path)
    return None if further is None else went_on_words(further)


def went_on_words(further: tuple[Path, int | None]) -> str:
    """``"went on to step 12"`` for :func:`further_checkpoint`'s answer (a ``last.ckpt`` that does not load: so)."""
    return f"went on to step {further[1]}" if further[1] is not None else "has a last.ckpt that won't load"


def further_checkpoint(ckpt_path: Path) -> tuple[Path, int | None] | None:
    """The checkpoint, with its step, of the run that went on past ``ckpt_path`` in its folder: the folder's
    ``last.ckpt`` (step ``None`` where it does not load), or without one (``save_last`` off) the checkpoint of the
    highest step above ``ckpt_path``'s; ``None`` where the run did not go on, or ``ckpt_path`` does not say its step."""
    latest = ckpt_path.parent / "last.ckpt"
    if not latest.exists():
        return _furthest_by_step(ckpt_path)
    if latest.samefile(ckpt_path):
        return None
    step, latest_step = global_step_of(ckpt_path), global_step_of(latest)
    if latest_step is not None and step is not None and latest_step <= step:
        return None
    return latest, latest_step


def _furthest_by_step(ckpt_path: Path) -> tuple[Path, int] | None:
    """:func:`further_checkpoint` for a folder without ``last.ckpt``, judged by the steps the checkpoints say, not by
    their times (``cp`` gives a copy a new one): each checkpoint's metadata is read once, no weights; one that does
    not read is passed over."""
    step = global_step_of(ckpt_path)
    if step is None:
        return None
    others = (p for p in ckpt_path.parent.glob("*.ckpt") if os.path.exists(p) and not p.samefile(ckpt_path))
    steps = [(p, s) for p in sorted(others) if (s := global_step_of(p)) is not None and s > step]
    return max(steps, key=lambda found: found[1], default=None)


def version_of(version_dir: Path) -> int | str:
    """A logger's version for the folder ``version_dir``: ``version_3`` -> 3; another name is the version itself."""
    number = version_dir.name.removeprefix("version_")
    return int(number) if number.isdigit() and number != version_dir.name else version_dir.name


def global_step_of(ckpt_path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at, or ``None`` when it does not load or does not say."""
    try:
        step = read_checkpoint(ckpt_path, weights=False, flag="--ckpt_path")[1].get("global_step")
    except UserError:
        return None
    return step if isinstance(step, int) else None


def log_folder(config: Namespace, version_dir: Path) -> Path:
    """Where the first logger writes in ``version_dir``, the run's ``config.yaml`` too: a TensorBoardLogger's
    ``sub_dir`` there (its checkpoints stay in ``version_dir/checkpoints``)."""
    first = _first_logger(config)
    init = first.get("init_args") if isinstance(first, Namespace | dict) else None
    sub_dir = init.get("sub_dir") if init else None
    return version_dir / sub_dir if sub_dir else version_dir


def resume_config_name(config: Namespace, version_dir: Path) -> str:
    """The name of the config a resume into ``version_dir`` saves beside the run's ``config.yaml``:
    ``config-resume-N.yaml``, the first not taken."""
    return free_name(log_folder(config, version_dir), "config-resume", ".yaml")


def free_name(folder: Path, stem: str, suffix: str) -> str:
    """``stem-1.suffix``, ``stem-2.suffix``, ...: the first name not taken in ``folder``."""
    n = 1
    while (folder / f"{stem}-{n}{suffix}").exists():
        n += 1
    return f"{stem}-{n}{suffix}"


def check_no_slurm_checkpoint(config: Namespace) -> None:
    """Under SLURM, refuse to start from no checkpoint (no ``--ckpt_path``, or ``auto`` finding none) beside a
    Lightning ``hpc_ckpt_N.ckpt``: Lightning would resume it (``fit``) or score it (``validate``/``test``) unannounced,
    past every check of ``--ckpt_path``. ``fit`` writes none (its requeue saves ``last.ckpt``): another program did."""
    if not SLURMEnvironment.detect():
        return
    root = Path(config.trainer.get("default_root_dir") or ".").expanduser()
    found = list(root.glob("hpc_ckpt_*.ckpt")) if root.is_dir() else []
    if found:
        newest = max(found, key=lambda p: int("0" + "".join(c for c in p.stem if c.isdigit())))  # Lightning's pick
        raise CheckpointError(
            "under SLURM, Lightning would load this checkpoint without --ckpt_path, unchecked and unannounced",
            newest,
            f"pass --ckpt_path {newest} to use it, or move the hpc_ckpt_*.ckpt files out of {root.resolve()}",
        )
