"""Lightning's refusals of a run's settings (a ``Trainer`` argument, a class that needs a package not installed, a
``monitor`` naming no logged metric) as one-line ``ConfigError`` s at the settings they name."""

from __future__ import annotations

import re
import traceback
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException

from epas_lightning.cli import flag_value
from epas_lightning.errors import ConfigError
from epas_lightning.run_checkpoint import RunCheckpoint

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


SAVE_TRIGGERS = re.compile(
    r"Combination of parameters every_n_train_steps=(?P<every_n_train_steps>\S+), "
    r"every_n_epochs=(?P<every_n_epochs>\S+) and train_time_interval=(?P<train_time_interval>.+) should be mutually "
    r"exclusive"
)
"""Lightning's refusal of a ``ModelCheckpoint`` (the ``checkpoint`` section, one of ``trainer.callbacks``) given two
triggers to save by."""


def save_triggers_refused(error: BaseException, checkpoint_section: Any = None) -> ConfigError | None:
    """The one line for ``error`` if it is a refusal of two triggers (``every_n_train_steps`` with
    ``train_time_interval``), at the settings that are set: of the ``checkpoint`` section where it has two, else of a
    checkpoint callback of ``trainer.callbacks``; ``None`` for any other error."""
    if (found := SAVE_TRIGGERS.search(one_line(error))) is None:
        return None
    unset = {"every_n_train_steps": ("0", "None"), "every_n_epochs": ("0", "None"), "train_time_interval": ("None",)}
    given = {key: value for key, value in found.groupdict().items() if value not in unset[key]}
    if save_triggers(checkpoint_section) > 1:
        where = ", ".join(f"checkpoint.{key}: {value}" for key, value in given.items())
        return ConfigError(
            "the checkpoint section saves by more than one trigger (steps, epochs, time)", where, "set one of them"
        )
    where = "trainer.callbacks: " + ", ".join(f"{key}: {value}" for key, value in given.items())
    what = "a checkpoint callback of trainer.callbacks saves by more than one trigger (steps, epochs, time)"
    return ConfigError(what, where, "set one of them")


def save_triggers(checkpoint_section: Any) -> int:
    """How many triggers to save by the ``checkpoint`` section sets (``ModelCheckpoint`` counts a number of 1 or more,
    a time interval that is set)."""
    if not checkpoint_section:
        return 0
    steps, epochs = checkpoint_section.get("every_n_train_steps"), checkpoint_section.get("every_n_epochs")
    numbers = sum(isinstance(n, int) and n >= 1 for n in (steps, epochs))
    return numbers + (checkpoint_section.get("train_time_interval") is not None)


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
    no_devices = keys == ["devices"] and trainer["devices"] in (0, "0", [])  # Hugging Face's and vLLM's GPU 0
    fix = NO_DEVICES_FIX if no_devices else "fix the value in the YAML or the flag"
    return ConfigError(what, settings_where(trainer, keys), fix)


NO_DEVICES_FIX = "give how many devices to train on (1, 2, ... or auto); for GPU 0 alone, [0]"
"""The fix for ``trainer.devices: 0``, which Lightning reads as no device, where GPU 0 was meant."""


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
