"""``python -m epas_lightning inspect --checkpoint PATH``: which checkpoint is which, without loading a model.

One checkpoint is described from its metadata and the shapes of its tensors, read by the safe readers every command
uses (:func:`~epas_lightning.checkpoint.read_description`); its weights, and a training checkpoint's optimizer state
(which ``fit --ckpt_path`` refuses when it is not finite), are then read one tensor at a time to check that they are
finite. A folder that is no checkpoint (a run folder, its ``checkpoints/``) lists the checkpoints under
it, one line each, by step, from their metadata alone: their weights are checked only when asked (``--check-weights``),
since a run folder may hold many checkpoints of many GB, and the listing says "not checked" otherwise.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from epas_lightning.checkpoint import CheckpointInfo, read_description
from epas_lightning.checkpoint_formats import (
    HF_SHARED_KEY,
    MODEL_PREFIX,
    WEIGHTS_FILE,
    check_complete,
    checkpoint_kind,
    shard_tensors,
    stored_shards,
)
from epas_lightning.errors import CheckpointError, UserError, listed, os_reason
from epas_lightning.hf.convert import hf_weight_files
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.config import REUSED
from epas_lightning.optim import grouped_parameter_names, state_entry, state_tensors
from epas_lightning.provenance import MOVED
from epas_lightning.region import TrainedRegion, choices, sharing_layers_text, unrun_region_text
from epas_lightning.runtime import dtype_name, emit_json, folder_bytes, size_text
from epas_lightning.safe_load import load_torch_file
from epas_lightning.weight_checks import is_finite_tensor

KINDS = {
    "ckpt": "training checkpoint (.ckpt file)",
    "sharded": "training checkpoint (FSDP2 sharded folder)",
    "consolidated": "consolidated folder (model.safetensors + config.json)",
    "hf": "Hugging Face folder",
}
TOKENIZER_NOTES = {"ok": "", "gone": " (the file is gone)", "changed": " (the file changed since it trained)"}
LISTING_DEPTH = 5
"""Folder levels searched for checkpoints: ``runs/<name>/version_N/checkpoints/`` from the folder holding ``runs``."""


def describe(path: Path, check_weights: bool = True) -> dict[str, Any]:
    """What the checkpoint ``path`` holds, as plain data (the ``--json`` record)."""
    info, state, metadata = read_description(path)
    kind = checkpoint_kind(path)
    config, region = info.config, info.region
    weights = {key: t for key, t in state.items() if t.is_floating_point()}
    tied = config.tie_embeddings and "lm_head.weight" in weights
    dtypes = Counter()
    for t in weights.values():
        dtypes[dtype_name(t.dtype)] += t.numel()
    recorded, training = info.recorded_tokenizer, info.training
    return {
        "path": str(path),
        "kind": kind,
        "global_step": training["global_step"],
        "epoch": training["epoch"],
        "tokens": training["tokens"],
        "trained_region": region.to_record(),
        "sharing_layers": {
            "default": info.default_sharing,
            "max": region.size,
            "max_forced": len(region.growth_order()),
        },
        "transformers_shared_layers": metadata.get(HF_SHARED_KEY) if kind == "hf" else None,
        "weights_trained_region": info.region.unrun_record(),
        "model": {
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "n_head": config.n_head,
            "n_kv_head": config.n_kv_head,
            "vocab_size": config.vocab_size,
            "block_size": config.block_size,
            "parameters": sum(t.numel() for t in weights.values()) - (weights["lm_head.weight"].numel() if tied else 0),
            "sharing_mode": config.sharing_mode,
        },
        "weights_dtype": [name for name, _ in dtypes.most_common()],
        "non_finite": non_finite_weights(path, kind, state) if check_weights else None,
        "non_finite_optimizer_state": non_finite_state(path, kind, metadata, config) if check_weights else None,
        "tokenizer": None
        if recorded is None
        else {"path": str(recorded.path), "sha256": recorded.sha256, "state": tokenizer_state(info)},
        "val_loss": training["val_loss"],
        "heldout": heldout_record(info),
        "source": training["source"],
        "moved": info.moved,
        "size_bytes": path.stat().st_size if path.is_file() else folder_bytes(path),
    }


def heldout_record(info: CheckpointInfo) -> dict[str, Any] | None:
    """The held-out data the run validated on, which evaluate, bench and analyze read without ``--data``
    (``data_dirs``, ``val_dir``, ``seed``, and the first of its folders that is ``missing``); ``None``: not recorded."""
    if info.heldout is None:
        return None
    missing = info.heldout.missing()
    return info.heldout.to_record() | {"missing": None if missing is None else str(missing)}


def heldout_text(record: dict[str, Any] | None) -> str:
    """The ``held-out data`` row: the ``data.val_dir``, or the val split(s) of the data folders, and what is gone."""
    if record is None:
        return "not recorded"
    dirs = record["data_dirs"]
    if record["val_dir"] is not None:
        text = f"data.val_dir {record['val_dir']}"
    elif len(dirs) == 1:
        text = f"the val split of {dirs[0]}"
    else:
        text = f"the val splits of {', '.join(dirs)} (mixed, seed {record['seed']})"
    if (missing := record["missing"]) is None:
        return text
    return f"{text} ({'a file now, not a folder' if Path(missing).exists() else 'gone'}: {missing})"


def tokenizer_state(info: CheckpointInfo) -> str:
    """``ok``, ``gone`` or ``changed`` (since the checkpoint trained: its data folder prepared again)."""
    return "changed" if info.changed_tokenizer else "gone" if info.gone_tokenizer else "ok"


def non_finite_weights(path: Path, kind: str, state: dict[str, torch.Tensor]) -> list[str]:
    """The weights of ``path`` that hold NaN or inf, read one tensor (or one batch of shards) at a time."""
    bad = []
    for key, t in weight_tensors(path, kind, state):
        if t.is_floating_point() and not is_finite_tensor(t):
            bad.append(key)
    return bad


def non_finite_state(path: Path, kind: str, metadata: dict[str, Any], config: LlamaConfig) -> list[str] | None:
    """The optimizer-state tensors of the training checkpoint ``path`` that hold NaN or inf (``exp_avg_sq of
    norm.weight``), read one tensor (or one batch of shards) at a time; ``None`` where it holds no optimizer state."""
    bad, seen = [], False
    for name, t in optimizer_state_tensors(path, kind, metadata, config):
        seen = True
        if not is_finite_tensor(t):
            bad.append(name)
    return bad if seen else None


def optimizer_state_tensors(
    path: Path, kind: str, metadata: dict[str, Any], config: LlamaConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored optimizer-state tensor of the checkpoint ``path`` (``metadata``: what :func:`read_description`
    read beside the weights, a ``.ckpt``'s mapped optimizer states among it), by name."""
    if kind == "sharded":
        yield from sharded_optimizer_state(path)
        return
    for saved in (metadata.get("optimizer_states") or []) if kind == "ckpt" else []:
        state = saved.get("state") if isinstance(saved, dict) else None
        if isinstance(state, dict):
            state = {parameter: entries for parameter, entries in state.items() if isinstance(entries, dict)}
            names = parameter_names(saved, state, config)
            for parameter, key, t in state_tensors(state):
                yield state_entry(key, names.get(parameter, f"parameter {parameter}")), t


def parameter_names(saved: dict[str, Any], state: dict[Any, Any], config: LlamaConfig) -> dict[Any, str]:
    """The names of the parameters an optimizer's saved ``state`` keys: a number as the model's parameters are grouped
    (:func:`~epas_lightning.optim.param_groups`, the order fit's optimizer numbers them), where the count and the
    shapes agree; a name (FSDP2's single files) as it is. None named where they do not (an optimizer of one's own)."""
    groups = [group for group in saved.get("param_groups") or [] if isinstance(group, dict)]
    numbers = [n for group in groups for n in group.get("params") or []]
    if numbers and all(isinstance(n, str) for n in numbers):
        return {n: n.removeprefix(MODEL_PREFIX) for n in numbers}
    with torch.device("meta"):
        model = Llama(config)
    order, shapes = grouped_parameter_names(model), {name: p.shape for name, p in model.named_parameters()}
    names = dict(zip(numbers, order, strict=True)) if len(numbers) == len(order) else {}
    fits = all(shapes[names[n]] == t.shape for n, _, t in state_tensors(state) if n in names)
    return names if fits else {}


OPTIMIZER_ENTRY = re.compile(r"(?P<state>optimizer_\d+\.state\.(?P<parameter>.+))\.(?P<key>[^.]+)")
"""A sharded checkpoint's key of an optimizer-state tensor: ``optimizer_0.state.model.norm.weight.exp_avg_sq``."""


def sharded_optimizer_state(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimizer-state tensors of the sharded checkpoint ``path``, by name, read a batch of shards at a time."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from epas_lightning.safe_dcp import SafeFileSystemReader

    state: dict[str, dict[str, torch.Tensor]] = {}  # meta tensors, by parameter (as stored) and key
    parameters: dict[str, str] = {}
    for key, meta in SafeFileSystemReader(path).read_metadata().state_dict_metadata.items():
        if (entry := OPTIMIZER_ENTRY.fullmatch(key)) and isinstance(meta, TensorStorageMetadata):
            shape = torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
            state.setdefault(entry["state"], {})[entry["key"]] = shape
            parameters[entry["state"]] = entry["parameter"].removeprefix(MODEL_PREFIX)
    metas, names = {}, {}
    for stored, key, meta in state_tensors(state):
        metas[f"{stored}.{key}"], names[f"{stored}.{key}"] = meta, state_entry(key, parameters[stored])
    yield from ((names[key], t) for key, t in stored_shards(path, metas))


def weight_tensors(path: Path, kind: str, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored weight of the checkpoint ``path`` of ``kind``, as few at a time as its format allows."""
    if kind == "sharded":
        yield from shard_tensors(path, state)
        return
    files = {"ckpt": [path], "consolidated": [path / WEIGHTS_FILE]}.get(kind) or hf_weight_files(path)
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt") as f:
                    yield from ((key, f.get_tensor(key)) for key in f.keys())  # noqa: SIM118 - no dict
            except SafetensorError as e:
                raise CheckpointError(f"corrupt or truncated weights ({e})", file, "copy it again") from e
        else:  # mapped, not read into memory; a .ckpt's optimizer state is not checked
            loaded = load_torch_file(file, mmap=True, where=f"--checkpoint {file}")
            yield from loaded.get("state_dict", loaded).items()


def checkpoints_in(folder: Path, depth: int = LISTING_DEPTH) -> dict[Path, str | None]:
    """The checkpoints under ``folder`` (``.ckpt`` files and checkpoint folders), ``depth`` levels down at most, each
    with ``None``; a folder under it that this user may not read (another user's run), with why. Hidden entries (saves
    in the making) are skipped."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise CheckpointError(
            f"cannot list the folder: {os_reason(e)}",
            f"--checkpoint {folder}",
            "make it readable for this user",
        ) from e
    found = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.suffix == ".ckpt" and entry.is_file() or entry.is_dir() and checkpoint_kind(entry):
                found[entry] = None
            elif entry.is_dir() and depth > 1 and not _links_back(entry):
                found |= checkpoints_in(entry, depth - 1)
        except CheckpointError as e:
            found[entry] = e.what
        except OSError as e:
            found[entry] = f"cannot read it: {os_reason(e)}"
    return found


def _links_back(folder: Path) -> bool:
    """``folder`` is a link to a folder above it (``up -> ..``): what lies under it is listed already."""
    real = Path(os.path.realpath(folder))
    return folder.is_symlink() and Path(os.path.realpath(folder.parent)).is_relative_to(real)


def once_each(found: dict[Path, str | None]) -> dict[Path, str | None]:
    """``found`` with each checkpoint once, named by its path through the fewest links (a ``latest`` link to a
    version folder lists that folder's checkpoints once, under the folder's own name)."""
    best: dict[str, tuple[int, Path]] = {}
    for path in found:
        links = sum(p.is_symlink() for p in (path, *path.parents))
        real = os.path.realpath(path)
        if real not in best or links < best[real][0]:
            best[real] = (links, path)
    return {path: found[path] for _, path in best.values()}


def listing(folder: Path, check_weights: bool = False) -> list[dict[str, Any]]:
    """A record of each checkpoint under ``folder`` by step (its weights unread unless ``check_weights``); one that
    cannot be read, and a folder that cannot, says why. A checkpoint reached through links too is listed once."""
    records = []
    for path, unreadable in once_each(checkpoints_in(folder)).items():
        if unreadable:
            records.append({"path": str(path), "error": unreadable})
            continue
        try:
            records.append(describe(path, check_weights))
        except UserError as e:
            records.append({"path": str(path), "error": e.what})
    return sorted(records, key=lambda r: ("error" in r, r.get("global_step") is None, r.get("global_step") or 0))


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def describe_text(record: dict[str, Any]) -> str:
    """The lines ``inspect`` prints for one checkpoint."""
    region, allowed, model = record["trained_region"], record["sharing_layers"], record["model"]
    n = allowed["max"]
    step = _number(record["global_step"]) + (f" (epoch {record['epoch']})" if record["epoch"] is not None else "")
    trained = f"{sharing_layers_text(n)}: {TrainedRegion.from_record(region, model['n_layer']).describe()}"
    forced, unrun = allowed["max_forced"], record["weights_trained_region"]
    never = "the folder does not carry the region its weights trained" if unrun else "never trained"
    more = f"; {_span(n + 1, forced)} only with --force ({never})" if forced > n else ""
    kv, mode = model["n_kv_head"], model["sharing_mode"]  # what a sharing layer reuses: qk, Q/K; kv, K/V
    heads = f"{model['n_head']} heads" + (f" / {kv} KV heads" if kv != model["n_head"] else "")
    tokenizer = record["tokenizer"]
    val = record["val_loss"]
    finite = finiteness(record["non_finite"], record["non_finite_optimizer_state"], named=True)
    rows = {"kind": KINDS[record["kind"]]}
    unknown = f"not known here ({MOVED})" if record["moved"] else "not recorded"
    if record["kind"] in ("consolidated", "hf"):  # a training checkpoint is its own source
        rows["made from"] = record["source"] or unknown
    rows |= {
        "step": step,
        "tokens": _number(record["tokens"]) + (" trained" if record["tokens"] is not None else " (not recorded)"),
        "region": trained if n else dense_region_row(unrun, model["n_layer"], record["kind"]),
        "--sharing-layers": f"{choices(n)} (default {allowed['default']}){more}",
        **transformers_row(record["transformers_shared_layers"], TrainedRegion.from_record(region, model["n_layer"])),
        "model": f"{model['n_layer']} layers, d {model['n_embd']}, {heads}, vocab {model['vocab_size']:,}, "
        f"block size {model['block_size']:,}, {model['parameters']:,} parameters, sharing mode {mode} "
        f"({REUSED[mode]})",
        "weights": ", ".join([*record["weights_dtype"], finite]),
        "tokenizer": "none recorded" if tokenizer is None else tokenizer["path"] + TOKENIZER_NOTES[tokenizer["state"]],
        "val loss": "not recorded"
        if val is None
        else f"{val['loss']:.4f}" + (f" at step {val['step']:,}" if val["step"] is not None else ""),
        "held-out data": heldout_text(record["heldout"]) if record["heldout"] else unknown,
        "size": size_text(record["size_bytes"]),
    }
    width = max(map(len, rows))
    return "\n".join([record["path"], *(f"  {name:<{width}}  {value}" for name, value in rows.items())])


def dense_region_row(unrun: dict[str, Any] | None, n_layer: int, kind: str = "hf") -> str:
    """The ``region`` row of a dense checkpoint; of a stock export or a copy of one (``unrun``: the region its weights
    trained, as it recorded it), that it runs dense and how to get the region."""
    if unrun is None:
        return "dense (no sharing layers trained)"
    return unrun_region_text(TrainedRegion.from_record(unrun, n_layer), stock=kind == "hf")


def transformers_row(shared: Any, trained: TrainedRegion) -> dict[str, str]:
    """For a Hugging Face folder: the sharing layers transformers loads it with (what ``export --sharing-layers``
    wrote into config.json, listed in the growth order of the ``trained`` region), and whether they lie outside it."""
    n_layer = trained.n_layer
    if shared is None:
        return {}
    if not isinstance(shared, list) or not all(type(i) is int and 1 <= i < n_layer for i in shared):
        return {"transformers": f"refuses its epas_shared_layers {shared!r} (config.json): not layers 1..{n_layer - 1}"}
    shared = trained.in_growth_order(shared)
    if not shared:
        return {"transformers": "loads it dense (no epas_shared_layers in config.json)"}
    outside = sorted(set(shared) - set(trained.layers))
    forced = f"; layers {outside} never trained to share (exported with --force)" if outside else ""
    loads = f"loads it with {sharing_layers_text(len(shared))}: layers {shared} (config.json epas_shared_layers)"
    return {"transformers": loads + forced}


def finiteness(non_finite: list[str] | None, non_finite_state: list[str] | None = None, named: bool = False) -> str:
    """What the check of the weights (``None``: not checked) and of the optimizer state (``None``: none held) found,
    the tensors that failed it ``named``."""
    if non_finite is None:
        return "not checked"
    weights = (f"NaN or inf in {listed(non_finite)}" if named else "NaN or inf") if non_finite else "finite"
    if non_finite_state:
        state = f"holds NaN or inf ({listed(non_finite_state)})" if named else "NaN or inf"
        return f"{weights}; the optimizer state {state}"
    if non_finite:
        return weights
    return "all finite (the optimizer state too)" if named and non_finite_state == [] else "all finite"


def listing_text(records: list[dict[str, Any]], folder: Path) -> str:
    """One line per checkpoint: step, tokens, region size (:func:`region_cell`), val loss, whether its
    weights are finite (or not checked), size and its path under ``folder``."""
    header = ("step", "tokens", "region", "val loss (at step)", "weights", "size", "checkpoint")
    rows = []
    for r in records:
        path = str(Path(r["path"]).relative_to(folder))
        if "error" in r:
            rows.append(("?", "", "", "", "", "", f"{path}  (unreadable: {r['error']})"))
            continue
        val = r["val_loss"]
        cells = (_number(r["global_step"]), _number(r["tokens"]), region_cell(r))
        loss = "-" if val is None else f"{val['loss']:.4f}" + (f" ({val['step']:,})" if val["step"] is not None else "")
        finite = finiteness(r["non_finite"], r["non_finite_optimizer_state"])
        rows.append((*cells, loss, finite, size_text(r["size_bytes"]), path))
    rows.insert(0, header)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*map(str.ljust, row[:-1], widths), row[-1]]) for row in rows)


def region_cell(record: dict[str, Any]) -> str:
    """The listing's ``region`` cell: the sharing layers the checkpoint runs by default; the trained region's too where
    it is longer (an export at a shorter region), or where the folder does not carry it (a stock export)."""
    unrun, allowed = record["weights_trained_region"], record["sharing_layers"]
    runs = str(allowed["default"])
    if unrun:
        return f"{runs} (trained {len(unrun['layers'])}, not carried)"
    return runs if allowed["default"] == allowed["max"] else f"{runs} (trained {allowed['max']})"


def inspect_command(checkpoint: Path, check_weights: bool | None = None, json: bool = False) -> None:
    """What a checkpoint holds (step, tokens, trained region, val loss, ...), or which checkpoints a run folder holds.

    For one checkpoint: its kind, step and epoch, the tokens trained, the trained sharing region in growth order and
    the --sharing-layers values generate, serve and evaluate accept for it, the model's shape, the dtype of its
    weights and whether they are all finite, the tokenizer it recorded, the latest validation loss and the held-out
    data it was measured on (which evaluate, bench and analyze read without --data), its size on disk; for a
    consolidated or Hugging Face folder, the training checkpoint it was made from, whose step, tokens, validation loss
    and held-out data consolidate and export carry. A folder that is not a checkpoint (a run folder, its checkpoints/
    folder, runs/) lists the checkpoints under it, one line each, by step. Nothing is loaded as a model; checkpoints
    are read as safely as by every command.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder. A
            run folder, or its checkpoints/ folder, lists the checkpoints it holds.
        check_weights: Read every weight and a training checkpoint's optimizer state, a tensor at a time, to check
            that they are finite. Default: on for one checkpoint; off for a folder's listing, whose weights column then
            says "not checked" (--check-weights reads every checkpoint listed: slow for a run of many large
            checkpoints). In --json, non_finite is null where not checked, non_finite_optimizer_state also where the
            checkpoint holds no optimizer state.
        json: End with one JSON line of what was found.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir() and checkpoint_kind(path) is None:
        records = listing(path, bool(check_weights))
        if not records:
            check_complete(path)
            raise CheckpointError(
                f"no checkpoints in this folder (nor {LISTING_DEPTH - 1} levels below)",
                f"--checkpoint {path}",
                "pass a checkpoint, a run folder or its checkpoints/ folder",
            )
        print(listing_text(records, path))
        emit_json({"folder": str(path), "checkpoints": records}, json)
        return
    record = describe(path, check_weights is not False)
    print(describe_text(record))
    emit_json(record, json)
