"""Where a model's weights came from: the step, epoch and tokens the run had trained, its latest validation loss, the
held-out data it validated on, and the path of the training checkpoint (absolute in memory; in the folders
``consolidate`` and ``export`` write, relative to the folder, which may be pushed to the Hub: :func:`relative_paths`).

A training checkpoint says it in Lightning's entries (``global_step``, ``epoch``, the throughput monitor's totals,
``fit``'s ``last_validation``); ``consolidate`` carries it in its ``config.json`` (``training``, beside the
``global_step`` it always kept), ``export`` in the string metadata of its ``model.safetensors`` (``epas_training``, as
JSON: the stock ``config.json`` stays as ``transformers`` writes one, and a tool that rewrites the weights, such as a
fine-tuning run, drops the record with them). ``inspect`` shows the same fields for every form.
"""

from __future__ import annotations

import hashlib
import json
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from epas_lightning.runtime import json_text
from epas_lightning.seeds import TRAINING_SEEDS, seed_out_of_range

LAST_VALIDATION_KEY = "last_validation"
"""Checkpoint entry of ``fit``: ``{"loss": ..., "step": ...}``, the held-out loss of the run's latest validation and the
optimizer step it was measured at."""
THROUGHPUT_STATE = "TokenThroughputMonitor"
"""The callback state holding the run's totals (``lengths``: tokens trained), under its class name."""
TRAINING_KEY = "training"
"""The record in a consolidated ``config.json`` (without ``global_step``, kept beside it), and in the checkpoint-like
metadata the readers of consolidated and Hugging Face folders return."""
EXPORT_METADATA_KEY = "epas_training"
"""The record in an export's ``model.safetensors`` metadata (a JSON string: safetensors metadata holds strings)."""
HELDOUT_KEY = "heldout"
"""Checkpoint entry of ``fit``: the held-out data it validated on (``TokenData.heldout``'s record: ``data_dirs``,
``val_dir``, ``seed``), which ``evaluate``, ``bench`` and ``analyze`` read without ``--data``."""
FOLDER_KEY = "folder"
"""In a record :func:`relative_paths` wrote: a hash of the real path of the folder written (naming none), which tells
the folder read where it was written from a moved or copied one, whose relative paths lead to other folders."""
MOVED_KEY = "moved"
"""In the record :func:`local_paths` reads back: ``True`` where the folder was moved or copied since it was written
(:func:`moved`), so that its relative paths were dropped."""
MOVED = "the folder was moved or copied since it was written, and names its data relative to where it was"
"""Why a :data:`MOVED_KEY` folder's data folders and training checkpoint are not known (``inspect``, ``evaluate``)."""
FIELDS = ("global_step", "epoch", "tokens", "val_loss", "heldout", "source")


def training_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """The provenance of a checkpoint's ``metadata``: the record a consolidated or Hugging Face folder carries, else
    Lightning's entries; each field ``None`` where not recorded (``source`` for a training checkpoint itself)."""
    if isinstance(kept := metadata.get(TRAINING_KEY), dict):
        return checked(kept)
    return checked(
        {
            "global_step": metadata.get("global_step"),
            "epoch": metadata.get("epoch"),
            "tokens": trained_tokens(metadata),
            "val_loss": last_val_loss(metadata),
            "heldout": metadata.get(HELDOUT_KEY),
        }
    )


def carried(record: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The record ``consolidate`` and ``export`` write for weights read from ``checkpoint`` (whose provenance is
    ``record``): the same fields, ``source`` the absolute path of the training checkpoint (``checkpoint`` itself
    unless it names one; its name alone left ``last.ckpt`` of no known run)."""
    return {**record, "source": record.get("source") or os.path.abspath(Path(checkpoint).expanduser())}


def trained_tokens(metadata: dict[str, Any]) -> int | None:
    """The tokens the run had trained when the checkpoint was written (the throughput monitor's total), if kept."""
    state = callback_states(metadata).get(THROUGHPUT_STATE)
    tokens = _number(state.get("lengths"), Real) if isinstance(state, dict) else None
    return None if tokens is None else int(tokens)


def callback_states(metadata: dict[str, Any]) -> dict[str, Any]:
    """The callbacks' states Lightning keeps in a checkpoint (``{}`` where there is none, or a foreign value)."""
    states = metadata.get("callbacks")
    return states if isinstance(states, dict) else {}


def last_val_loss(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """``{"loss", "step"}`` of the run's latest validation before the checkpoint: what ``fit`` records, else the
    score of a ``ModelCheckpoint`` that monitors ``val/loss`` (its step unknown)."""
    if isinstance(record := metadata.get(LAST_VALIDATION_KEY), dict) and "loss" in record:
        return {"loss": record["loss"], "step": record.get("step")}
    for state in callback_states(metadata).values():
        if isinstance(state, dict) and state.get("monitor") == "val/loss" and state.get("current_score") is not None:
            return {"loss": state["current_score"], "step": None}
    return None


def checked(record: dict[str, Any]) -> dict[str, Any]:
    """``record``'s :data:`FIELDS` as plain numbers and text; a value of another type (a hand-edited or foreign
    record) reads as not recorded."""
    val = record.get("val_loss")
    loss = _number(val.get("loss"), Real) if isinstance(val, dict) else None
    return {
        "global_step": _number(record.get("global_step")),
        "epoch": _number(record.get("epoch")),
        "tokens": _number(record.get("tokens")),
        "val_loss": None if loss is None else {"loss": float(loss), "step": _number(val.get("step"))},
        "heldout": _heldout(record.get("heldout")),
        "source": record["source"] if isinstance(record.get("source"), str) else None,
    }


def _heldout(record: Any) -> dict[str, Any] | None:
    """A held-out record (:data:`HELDOUT_KEY`) as ``fit`` writes it, else ``None``: one or more data folders, each
    once, the ``val_dir`` or ``None``, and a seed ``fit`` accepts (what it never writes was read as ``data.seed`` or
    ``data.data_dir`` a user set, and refused so)."""
    if not isinstance(record, dict):
        return None
    dirs, val_dir, seed = record.get("data_dirs"), record.get("val_dir"), _number(record.get("seed"))
    if not isinstance(dirs, list) or not dirs or not all(_is_path(d) for d in dirs) or len(set(dirs)) < len(dirs):
        return None
    if not (val_dir is None or _is_path(val_dir)) or seed is None or seed_out_of_range(seed, TRAINING_SEEDS):
        return None
    return {"data_dirs": list(dirs), "val_dir": val_dir, "seed": seed}


def _is_path(value: Any) -> bool:
    """Whether ``value`` is a folder's path as ``fit`` records one: text, not empty (the current folder)."""
    return isinstance(value, str) and value != "" and "\0" not in value


def _number(value: Any, kind: type = Integral) -> Any:
    """``value`` as an int (a float for ``Real``) if it is one (a 0-d tensor too), else ``None``."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value
    if isinstance(value, bool) or not isinstance(value, kind):
        return None
    return int(value) if kind is Integral else float(value)


def export_metadata(record: dict[str, Any], folder: str | Path) -> dict[str, str]:
    """The safetensors metadata entry of the export ``folder`` carrying ``record`` (strict JSON: a non-finite loss is
    null), its paths relative to ``folder`` (:func:`relative_paths`)."""
    return {EXPORT_METADATA_KEY: json_text(relative_paths(record, folder))}


def relative_paths(record: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``record`` as the output ``folder`` (an export, a consolidated folder) writes it: the local paths it names
    relative to ``folder``, so that a folder pushed to the Hub or handed on names no ``/home/alice``, and the
    :data:`FOLDER_KEY` that tells a copy elsewhere (:func:`local_paths`)."""
    return {**_with_paths(record, lambda path: relative_path(path, folder)), FOLDER_KEY: folder_tag(folder)}


def local_paths(record: dict[str, Any], folder: str | Path, tag: Any) -> dict[str, Any]:
    """``record`` as :func:`relative_paths` wrote it into ``folder`` (``tag``: its :data:`FOLDER_KEY`), its paths as
    they were; of a folder :func:`moved` since, its relative paths are dropped (``None``, a held-out record with one:
    ``None``) and :data:`MOVED_KEY` says so: they lead to whatever is at the same place from the copy."""
    gone = moved(folder, tag)
    return {**_with_paths(record, lambda path: local_path(path, folder, gone)), MOVED_KEY: gone}


def folder_tag(folder: str | Path) -> str:
    """What :data:`FOLDER_KEY` records of ``folder``: a hash of its real path."""
    return hashlib.sha256(os.fsencode(os.path.realpath(Path(folder).expanduser()))).hexdigest()[:16]


def moved(folder: str | Path, tag: Any) -> bool:
    """Whether ``folder``, whose record holds ``tag`` (:data:`FOLDER_KEY`), was moved or copied since it was written
    (an older folder, with no tag: never)."""
    return isinstance(tag, str) and tag != folder_tag(folder)


def _with_paths(record: dict[str, Any], change: Any) -> dict[str, Any]:
    """``record`` (:func:`checked`'s form) with ``change`` applied to the local paths it names: the training checkpoint
    (``source``) and the held-out data folders (the record ``None`` where ``change`` drops one of them)."""
    record = dict(record)
    if record.get("source") is not None:
        record["source"] = change(record["source"])
    if (heldout := record.get("heldout")) is not None:
        val_dir = heldout["val_dir"]
        changed = {
            **heldout,
            "data_dirs": [change(d) for d in heldout["data_dirs"]],
            "val_dir": None if val_dir is None else change(val_dir),
        }
        dropped = None in changed["data_dirs"] or (val_dir is not None and changed["val_dir"] is None)
        record["heldout"] = None if dropped else changed
    return record


def relative_path(path: str, folder: str | Path) -> str:
    """``path`` relative to where the links of ``folder`` lead (as :func:`local_path` reads it back); as it is where
    no relative path leads there (another drive)."""
    try:
        return os.path.relpath(path, os.path.realpath(Path(folder).expanduser()))
    except ValueError:
        return path


def local_path(path: str, folder: str | Path, gone: bool = False) -> str | None:
    """A path :func:`relative_path` wrote for ``folder``, as the path it was (an older folder's absolute one as is);
    ``None`` for a relative one where the folder is ``gone`` from where it was written (:func:`moved`)."""
    if gone and not os.path.isabs(path):
        return None
    return os.path.normpath(os.path.join(os.path.realpath(Path(folder).expanduser()), path))


def from_consolidated(record: dict[str, Any], folder: str | Path) -> dict[str, Any] | None:
    """The record the consolidated ``folder``'s ``config.json`` (``record``) keeps, with the step it keeps beside it
    and its paths as they were (:func:`local_paths`); ``None`` for an older folder, which kept the step alone."""
    training = record.get(TRAINING_KEY)
    if not isinstance(training, dict):
        return None
    kept = {**checked(training), "global_step": record.get("global_step")}
    return local_paths(kept, folder, training.get(FOLDER_KEY))


def from_export_metadata(metadata: dict[str, str] | None, folder: str | Path) -> dict[str, Any] | None:
    """The record the export ``folder`` wrote into its safetensors ``metadata``, its paths as they were
    (:func:`export_metadata`); ``None`` when there is none (or it does not parse)."""
    try:
        record = json.loads((metadata or {})[EXPORT_METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return local_paths(checked(record), folder, record.get(FOLDER_KEY)) if isinstance(record, dict) else None
