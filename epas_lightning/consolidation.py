"""``consolidate``: a training checkpoint (a ``.ckpt`` file or an FSDP2 folder) turned into one folder of
``model.safetensors`` + ``config.json``, built beside the target and renamed into place, and its command
``python -m epas_lightning consolidate --checkpoint <ckpt> --output <dir>``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from epas_lightning.checkpoint import STORED, LoadedModel, load_model
from epas_lightning.checkpoint_formats import CONFIG_FILE, EXPORTED_KEY, WEIGHTS_FILE, WEIGHTS_REGION_KEY
from epas_lightning.data.tokenizer import TokenizerError, load_tokenizer
from epas_lightning.errors import sentence_start
from epas_lightning.hf.convert import saveable
from epas_lightning.outputs import check_output, output_folder, writing_into
from epas_lightning.provenance import TRAINING_KEY, carried, checked, from_consolidated, relative_path, relative_paths
from epas_lightning.runtime import DType, emit_json, json_text, named_dtype

log = logging.getLogger(__name__)


def consolidate(
    checkpoint: str | Path, output: str | Path, overwrite: bool = False, dtype: DType | torch.dtype = "auto"
) -> Path:
    """Write ``output/model.safetensors`` and ``output/config.json`` from a training checkpoint; return ``output``.

    The weights keep the dtype the checkpoint stores them in (``dtype="auto"``), or are cast to ``dtype``
    (``float32``, ``bfloat16``, ``float16``: the floating-point tensors only; one past its range is refused, as every
    command that casts refuses it): the safetensors file records each tensor's dtype, and ``config.json`` names none.
    ``config.json`` records their provenance (:mod:`epas_lightning.provenance`). The tokenizer the run trained with
    (recorded in the checkpoint) is copied beside them when it still exists, is the file it trained with (its recorded
    hash) and parses as a tokenizer; only the tokenizer file itself is copied, under its standard name, with the chat
    template and the end tokens found beside it, and its hash is recorded. Otherwise a warning says so, and the
    recorded hash is kept (a ``--tokenizer`` given for the folder is compared with it).
    """
    from epas_lightning.data.tokenizer import copy_tokenizer

    checkpoint = Path(checkpoint).expanduser()
    cast = STORED if dtype == "auto" else named_dtype(dtype)  # an unknown name: one line, before any weight is read
    check_output(output, "consolidated", overwrite, [checkpoint])
    loaded = load_model(checkpoint, dtype=cast, flag="--checkpoint")  # no wider copy of the weights
    state = loaded.model.state_dict()
    training = carried(loaded.training, checkpoint)
    record: dict[str, Any] = {
        "model": loaded.model.config.to_dict(),
        "sharing": {
            "shared_layers": loaded.trained_shared_layers,
            "mode": loaded.model.config.sharing_mode,
            "region": loaded.region.to_record(),
            **carried_weights_region(loaded),
        },
        "global_step": training.pop("global_step"),
        TRAINING_KEY: relative_paths(training, output),  # epoch, tokens, val_loss, heldout, source
    }
    with output_folder(output, "consolidated", overwrite, inputs=[checkpoint]) as build:
        save_file(saveable(state), build / WEIGHTS_FILE)
        if loaded.tokenizer_path is None:
            log.warning(f"{sentence_start(loaded.no_tokenizer())}: consolidated weights and config only")
            if sha256 := loaded.tokenizer_sha256:  # what a --tokenizer given for the folder is compared with
                record["tokenizer"] = {"sha256": sha256, "bos_id": loaded.bos_id, "eos_id": loaded.eos_id}
        else:
            try:
                tokenizer = load_tokenizer(loaded.tokenizer_path, bos_id=loaded.bos_id, eos_id=loaded.eos_id)
            except (TokenizerError, OSError):
                tokenizer = None  # not a tokenizer after all: copy nothing
                log.warning(
                    f"The tokenizer the checkpoint names ({loaded.tokenizer_path}) is not a tokenizer: consolidated "
                    "weights and config only"
                )
            if tokenizer is not None:
                name = copy_tokenizer(tokenizer, build)
                record["tokenizer"] = {
                    "path": name,
                    "bos_id": tokenizer.bos_id,  # the checkpoint's, when it recorded them
                    "eos_id": tokenizer.eos_id,
                    "data_dir": relative_path(str(loaded.data_dir), output) if loaded.data_dir else None,
                    "sha256": tokenizer.sha256,  # the copy's: a folder whose tokenizer is replaced is refused too
                }
        with writing_into(build):
            (build / CONFIG_FILE).write_text(json_text(record, indent=2) + "\n")  # a non-finite val loss: null
    return Path(output).expanduser().absolute()


def carried_weights_region(loaded: LoadedModel) -> dict[str, Any]:
    """The ``sharing`` entry of a copy of an export: of a stock one, the region its weights trained, which the copy
    does not run either (:data:`WEIGHTS_REGION_KEY`); of one that chose fewer layers than its region, that choice
    (:data:`EXPORTED_KEY`), which the copy runs by default; none for other checkpoints."""
    record = loaded.region.unrun_record()
    if loaded.exported_sharing is not None and loaded.exported_sharing < loaded.region.size:
        return {EXPORTED_KEY: sorted(loaded.region.layers[: loaded.exported_sharing])}
    return {WEIGHTS_REGION_KEY: record} if record else {}


def consolidated_summary(folder: Path) -> dict[str, Any]:
    """What a consolidated folder holds, for ``--json``: its files, trained region, step, tokenizer file and where the
    weights came from (:mod:`~epas_lightning.provenance`)."""
    record = json.loads((folder / CONFIG_FILE).read_text())
    return {
        "output": str(folder),
        "weights": str(folder / WEIGHTS_FILE),
        "trained_region": record["sharing"]["region"],
        "global_step": record["global_step"],
        "tokenizer": (record.get("tokenizer") or {}).get("path"),
        "training": checked(from_consolidated(record, folder)),  # the folder was just written: it has the record
    }


def consolidate_command(
    checkpoint: Path, output: Path, overwrite: bool = False, dtype: DType = "auto", json: bool = False
) -> None:
    """Turn a training checkpoint (.ckpt file or FSDP2 folder) into model.safetensors + config.json.

    The folder is built beside the target and renamed into place when complete; it records the model config, the
    trained sharing region in growth order, the tokenizer (copied when it still exists) and where the weights came
    from: the step, epoch, tokens trained and latest validation loss of the training checkpoint, and its path (with
    the data folders', relative to the folder, which names no local folder when handed on).

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        output: The folder to write.
        overwrite: Replace --output if it is a consolidated folder written by this command.
        dtype: Weight dtype of the folder written (floating-point tensors only: bfloat16 halves a float32
            checkpoint); auto keeps the checkpoint's.
        json: End with one JSON line of what was written.
    """
    out = consolidate(checkpoint, output, overwrite, dtype)
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE}")
    emit_json(consolidated_summary(out), json)
