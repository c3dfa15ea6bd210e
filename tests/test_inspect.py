"""``inspect``: which checkpoint is which, read as safely as every command reads them, without loading a model."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import strict_json
from model_dirs import save_consolidated
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import save as dcp_save

from epas_lightning import Llama, LlamaConfig
from epas_lightning.cli import main
from epas_lightning.consolidation import consolidate
from epas_lightning.data.tokenizer import file_sha256
from epas_lightning.hf.export import export


def tiny_ckpt(path: Path, step: int, shared: list[int], tokenizer: Path | None = None, **entries) -> Path:
    """A 4-layer .ckpt as fit writes one (config, region ``shared`` in growth order, callbacks' state), untrained."""
    torch.manual_seed(step)
    model = Llama(LlamaConfig.from_name("debug", n_layer=4))
    model.sharing.set_shared_layers(shared)
    state = {"model." + key: t for key, t in model.state_dict().items()}
    record = {"layers": shared, "order": "deep_first"}
    tokens = {"TokenThroughputMonitor": {"time": 1.0, "batches": step, "samples": 4 * step, "lengths": 128 * step}}
    if tokenizer is not None:
        entries["tokenizer"] = {"path": str(tokenizer), "bos_id": 0, "eos_id": 1, "sha256": file_sha256(tokenizer)}
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": state, "model_config": model.config.to_dict(), "sharing_region": record}
    torch.save({**checkpoint, "global_step": step, "epoch": 0, "callbacks": tokens, **entries}, path)
    return path


def inspected(capsys, path: Path, *flags: str) -> tuple[str, dict]:
    assert main(["inspect", "--checkpoint", str(path), "--json", *flags]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.splitlines()[-1])


def one_line_error(capsys, path: Path) -> str:
    assert main(["inspect", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_checkpoint_says_its_step_tokens_region_shape_tokenizer_and_val_loss(tmp_path, capsys):
    from epas_lightning.inspect_cli import heldout_text

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    validation = {"loss": 5.25, "step": 40}
    heldout = {"data_dirs": [str(tmp_path)], "val_dir": str(tmp_path / "val"), "seed": 7}  # what evaluate reads
    path = tiny_ckpt(tmp_path / "last.ckpt", 48, [3, 2], tokenizer, last_validation=validation, heldout=heldout)
    out, record = inspected(capsys, path)
    assert (record["kind"], record["global_step"], record["epoch"], record["tokens"]) == ("ckpt", 48, 0, 48 * 128)
    assert record["trained_region"] == {"layers": [3, 2], "order": "deep_first"}
    assert record["sharing_layers"] == {"default": 2, "max": 2, "max_forced": 3}
    debug = LlamaConfig.from_name("debug", n_layer=4)
    shape = {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "vocab_size": 512, "block_size": debug.block_size}
    assert record["model"] == {
        **shape, "parameters": sum(p.numel() for p in Llama(debug).parameters()), "sharing_mode": "qk"
    }  # fmt: skip
    assert record["weights_dtype"] == ["float32"] and record["non_finite"] == []
    assert record["tokenizer"] == {"path": str(tokenizer), "sha256": file_sha256(tokenizer), "state": "ok"}
    assert record["val_loss"] == validation and record["size_bytes"] == path.stat().st_size
    assert "  region            2 sharing layers: layers [3, 2], deep-first\n" in out
    assert "  --sharing-layers  0..2 (default 2); 3 only with --force (never trained)\n" in out
    assert "  val loss          5.2500 at step 40\n" in out and "  weights           float32, all finite\n" in out
    assert record["heldout"] == {**heldout, "missing": str(tmp_path / "val")}  # was not shown: evaluate said it gone
    assert f"  held-out data     data.val_dir {tmp_path / 'val'} (gone: {tmp_path / 'val'})\n" in out
    mixed = {"data_dirs": ["/a", "/b"], "val_dir": None, "seed": 7, "missing": None}
    assert heldout_text(mixed) == "the val splits of /a, /b (mixed, seed 7)"
    filed = {**mixed, "missing": str(tokenizer)}  # a file where a folder was: not "gone"
    assert heldout_text(filed).endswith(f"(mixed, seed 7) (a file now, not a folder: {tokenizer})")

    tokenizer.write_text('{"other": 1}')  # its data folder prepared again: the file is not the one it trained with
    state = torch.load(path, weights_only=True)
    state["state_dict"]["model.norm.weight"][1] = float("nan")
    torch.save(state, path)
    out, record = inspected(capsys, path)
    assert record["non_finite"] == ["model.norm.weight"] and record["tokenizer"]["state"] == "changed"
    assert "float32, NaN or inf in model.norm.weight" in out and "(the file changed since it trained)" in out
    out, record = inspected(capsys, path, "--no-check-weights")
    assert record["non_finite"] is None and "  weights           float32, not checked\n" in out


def test_the_finiteness_check_covers_a_training_checkpoints_optimizer_state(tmp_path, capsys):
    """inspect read the weights only: it said "all finite" of a checkpoint whose optimizer state held inf, which
    fit --ckpt_path refuses. A .ckpt numbers its parameters (named here as fit's optimizer groups them); a sharded
    folder names them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from epas_lightning.optim import default_optimizer

    holder = torch.nn.Module()  # parameters named as the LightningModule names them: model.norm.weight
    holder.model = Llama(LlamaConfig.from_name("debug", n_layer=4))  # as tiny_ckpt records
    optimizer = default_optimizer(holder.model)
    for p in holder.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.state[holder.model.norm.weight]["exp_avg_sq"][0] = float("inf")
    ckpt = tiny_ckpt(tmp_path / "last.ckpt", 4, [], optimizer_states=[optimizer.state_dict()])
    state = {"model." + key: t for key, t in holder.model.state_dict().items()}
    sharded = tmp_path / "sharded"
    saved = {"state_dict": state, "optimizer_0": get_optimizer_state_dict(holder, optimizer)}
    dcp_save(saved, checkpoint_id=sharded, no_dist=True)
    torch.save({"model_config": holder.model.config.to_dict()}, sharded / "meta.pt")
    for path in (ckpt, sharded):
        out, record = inspected(capsys, path)
        assert record["non_finite"] == [] and record["non_finite_optimizer_state"] == ["exp_avg_sq of norm.weight"]
        assert "finite; the optimizer state holds NaN or inf (exp_avg_sq of norm.weight)\n" in out, out
    optimizer.state[holder.model.norm.weight]["exp_avg_sq"][0] = 1.0
    tiny_ckpt(ckpt, 4, [], optimizer_states=[optimizer.state_dict()])
    out, record = inspected(capsys, ckpt)
    assert record["non_finite_optimizer_state"] == [] and "float32, all finite (the optimizer state too)\n" in out


def test_a_run_folder_lists_its_checkpoints_by_step_and_refuses_none_unsafely(tmp_path, capsys):
    run = tmp_path / "runs" / "r" / "version_0"
    tiny_ckpt(run / "checkpoints" / "epoch=0-step=8.ckpt", 8, [])
    tiny_ckpt(run / "checkpoints" / "last.ckpt", 16, [3], last_validation={"loss": 4.5, "step": 12})
    tiny_ckpt(tmp_path / "runs" / "r" / "version_1" / "checkpoints" / "epoch=0-step=4.ckpt", 4, [])
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "payload": Evil(marker)}, run / "checkpoints" / "evil.ckpt")
    (run / "checkpoints" / ".last.ckpt.saving").write_bytes(b"a save in the making")
    out, record = inspected(capsys, tmp_path / "runs")
    listed = [
        (Path(r["path"]).relative_to(tmp_path / "runs").as_posix(), r.get("global_step")) for r in record["checkpoints"]
    ]
    assert listed == [
        ("r/version_1/checkpoints/epoch=0-step=4.ckpt", 4),
        ("r/version_0/checkpoints/epoch=0-step=8.ckpt", 8),
        ("r/version_0/checkpoints/last.ckpt", 16),
        ("r/version_0/checkpoints/evil.ckpt", None),
    ]
    assert not marker.exists() and "cannot read this file safely" in record["checkpoints"][-1]["error"]
    lines = out.splitlines()
    header = ["step", "tokens", "region", "val", "loss", "(at", "step)", "weights", "size", "checkpoint"]
    assert lines[0].split() == header
    assert lines[3].split()[:7] == ["16", "2,048", "1", "4.5000", "(12)", "not", "checked"]
    assert lines[3].endswith("last.ckpt")
    assert lines[4].startswith("?") and "evil.ckpt  (unreadable: cannot read this file safely" in lines[4]

    err = one_line_error(capsys, run / "checkpoints" / "evil.ckpt")
    assert "cannot read this file safely" in err and not marker.exists()
    assert "checkpoint does not exist — --checkpoint" in one_line_error(capsys, tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    assert "no checkpoints in this folder" in one_line_error(capsys, tmp_path / "empty")


def test_folders_this_user_may_not_read_are_one_line_or_a_listed_row(tmp_path, capsys, monkeypatch):
    """A folder that could not be read (another user's run under runs/) was a PermissionError traceback, for the
    folder itself and for any folder a listing met under it."""
    for run in ("a", "b", "c"):
        tiny_ckpt(tmp_path / "runs" / run / "checkpoints" / "last.ckpt", 8, [])
    closed, unlisted = tmp_path / "runs" / "b", tmp_path / "runs" / "c"
    stat, iterdir = Path.stat, Path.iterdir

    def denied(path: Path) -> OSError:
        return PermissionError(13, "Permission denied", str(path))

    def closed_stat(self, **kwargs):
        if self.is_relative_to(closed) and self != closed:
            raise denied(self)
        return stat(self, **kwargs)

    def closed_iterdir(self):
        if self in (closed, unlisted):
            raise denied(self)
        return iterdir(self)

    monkeypatch.setattr(Path, "stat", closed_stat)
    monkeypatch.setattr(Path, "iterdir", closed_iterdir)
    _, record = inspected(capsys, tmp_path / "runs")
    rows = {Path(r["path"]).relative_to(tmp_path / "runs").as_posix(): r.get("error") for r in record["checkpoints"]}
    assert rows == {
        "a/checkpoints/last.ckpt": None,
        "b": f"cannot read the folder: permission denied ({closed / 'config.json'})",
        "c": "cannot list the folder: permission denied",
    }
    for command in (["inspect"], ["consolidate", "--output", str(tmp_path / "out")]):
        assert main([*command, "--checkpoint", str(closed)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {rows['b']} — --checkpoint {closed} — make it readable for this user\n"
    assert "error: cannot list the folder" in one_line_error(capsys, unlisted)


def test_weights_this_user_may_not_read_are_not_called_corrupt(tmp_path, capsys, monkeypatch):
    """safetensors reports a file this user may not read as missing: the line was "corrupt or truncated weights (No
    such file or directory: ...) — consolidate again" (for a consolidated folder; for a Hugging Face one, alike)."""
    folder = save_consolidated(Llama(LlamaConfig.from_name("debug", n_layer=2)), tmp_path / "c")
    hf, opened = export(folder, tmp_path / "hf"), Path.open

    def denied(self, *args, **kwargs):
        if self.name == "model.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    capsys.readouterr()  # export's warning (no tokenizer)
    for path in (folder, hf):
        assert one_line_error(capsys, path) == (
            f"error: cannot open the file: permission denied — {path / 'model.safetensors'} — make it readable for "
            "this user\n"
        )


def test_records_of_another_type_are_one_line_or_read_as_not_recorded(tmp_path, capsys):
    """A hand-edited record (config.json, or a checkpoint's entries) was an AttributeError, TypeError or ValueError
    traceback (tokenizer, callbacks, an export's region), or a line naming no file (sharing region)."""
    ckpt = tiny_ckpt(tmp_path / "a.ckpt", 8, [3], callbacks=["not", "states"])
    assert inspected(capsys, ckpt)[1]["tokens"] is None  # the provenance reads as not recorded, as elsewhere
    for entries, says in [
        ({"tokenizer": "tokenizer.json"}, "its tokenizer record is invalid ('tokenizer.json')"),
        ({"tokenizer": {"path": 5}}, "its tokenizer record is invalid (path: 5)"),
        ({"sharing_region": {"layers": [9], "order": "deep_first"}}, "invalid (Invalid trained region [9] for a 4-"),
        ({"sharing_region": ["3"]}, "its recorded sharing region is invalid (Invalid trained region record ['3']"),
    ]:
        state = torch.load(tiny_ckpt(tmp_path / "b.ckpt", 8, [3]), weights_only=True)
        torch.save({**state, **entries}, tmp_path / "b.ckpt")
        err = one_line_error(capsys, tmp_path / "b.ckpt")
        assert says in err and err.endswith("b.ckpt — pass the checkpoint as fit or consolidate wrote it\n"), err
    folder = save_consolidated(Llama(LlamaConfig.from_name("debug", n_layer=2)), tmp_path / "c")
    hf = export(folder, tmp_path / "hf")
    record = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**record, "epas_trained_region": ["x"]}))
    capsys.readouterr()
    says = "its recorded sharing region is invalid (Invalid trained region ['x']: not a list of layer numbers)"
    assert says in one_line_error(capsys, hf)
    (hf / "config.json").write_text('["model_type"]')  # taken for an HF config: a TypeError traceback
    assert "config.json was not written by consolidate (no 'model' entry)" in one_line_error(capsys, hf)
    record = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**record, "sharing": "region"}))  # a TypeError traceback
    assert inspected(capsys, folder)[1]["trained_region"] == {"layers": [], "order": "deep_first"}  # the mask's
    for model in ("debug", None):  # "Unknown LlamaConfig fields: ['b', 'd', 'e', 'g', 'u']"; "'NoneType' object ..."
        (folder / "config.json").write_text(json.dumps({**record, "model": model}))
        assert f"its model config is invalid (not a mapping: {model!r})" in one_line_error(capsys, folder)
    (folder / "config.json").write_text(json.dumps({**record, "tokenizer": {"path": 5, "bos_id": 0}}))
    argv = ["export", "--checkpoint", str(folder), "--output", str(tmp_path / "out")]
    assert main(argv) == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == (
        f"error: its config.json's tokenizer record is invalid (path: 5) — --checkpoint {folder} — pass the "
        "checkpoint as fit or consolidate wrote it\n"
    )


def test_a_damaged_consolidated_folder_names_its_file_and_the_flag_that_gave_it(tmp_path, capsys):
    """Its config.json or model.safetensors unreadable named the file alone (`<folder>/config.json`): not whether it
    was --checkpoint or model.init_from that gave the folder, as every other checkpoint form says."""
    from epas_lightning.errors import CheckpointError
    from epas_lightning.init_from import check_init_source

    folder = save_consolidated(Llama(LlamaConfig.from_name("debug", n_layer=2)), tmp_path / "c")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:100])
    err = one_line_error(capsys, folder)
    assert err.startswith("error: corrupt or truncated model.safetensors (") and err.endswith(
        f" — --checkpoint {folder} — consolidate again\n"
    ), err
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{")
    assert "error: unreadable config.json (" in one_line_error(capsys, folder)
    with pytest.raises(CheckpointError, match=f"^unreadable config.json .* — model.init_from {folder} — consolidate"):
        check_init_source(folder, LlamaConfig.from_name("debug", n_layer=2))


def test_a_held_out_record_fit_never_writes_reads_as_not_recorded(tmp_path):
    """A hand-edited `heldout` entry was read as data.seed, data.data_dir or data.val_dir set wrong, and refused in
    terms of settings the user of evaluate, bench or analyze never gave; it reads as an older checkpoint's (none)."""
    from epas_lightning.checkpoint import describe_checkpoint

    fit_wrote = {"data_dirs": ["/data/a", "/data/b"], "val_dir": "/data/v", "seed": 42}
    assert describe_checkpoint(tiny_ckpt(tmp_path / "fit.ckpt", 8, [3], heldout=fit_wrote)).heldout is not None
    for heldout in [
        {"seed": -1},  # evaluate, bench and analyze said "seed must be from 0 to 4294967295 — data.seed"
        {"seed": 2**32},
        {"data_dirs": ["/data/a", "/data/a"]},  # "one folder is listed twice ... — data.data_dir"
        {"data_dirs": [""]},  # the current folder: "incomplete data directory ... — ."
        {"val_dir": ""},
        {"val_dir": "/data/a\0b"},
    ]:
        ckpt = tiny_ckpt(tmp_path / "a.ckpt", 8, [3], heldout=fit_wrote | heldout)
        assert describe_checkpoint(ckpt).heldout is None, heldout


def test_a_checkpoint_folder_copied_without_one_of_its_files_says_which(tmp_path, capsys):
    """`cp -r run/step-8/* there` leaves a sharded checkpoint's hidden .metadata behind, and a consolidated folder
    copied without config.json lacks its config: both read as "not a checkpoint" or "no checkpoints in this folder"."""
    shards, weights = tmp_path / "shards", tmp_path / "weights"
    shards.mkdir(), weights.mkdir()
    (shards / "__0_0.distcp").write_bytes(b"a shard"), (shards / "meta.pt").write_bytes(b"lightning's")
    (weights / "model.safetensors").write_bytes(b"weights")
    state = {"model." + key: t for key, t in Llama(LlamaConfig.from_name("debug", n_layer=2)).state_dict().items()}
    dcp_save({"state_dict": state}, checkpoint_id=tmp_path / "no_meta", no_dist=True)
    says = "no meta.pt beside the shards (fit keeps the model config there)"  # was: not written by EPASModule
    assert says in one_line_error(capsys, tmp_path / "no_meta")
    for folder, says in [
        (shards, "FSDP2 shards without their .metadata (a hidden file, which `cp folder/*` leaves out)"),
        (weights, "model.safetensors without the config.json beside it"),
    ]:
        for command in (["inspect"], ["consolidate", "--output", str(tmp_path / "out")]):
            assert main([*command, "--checkpoint", str(folder)]) == 2
            assert capsys.readouterr().err == (
                f"error: an incomplete checkpoint: {says} — --checkpoint {folder} — copy the whole folder again\n"
            )


def test_a_listing_names_each_checkpoint_once_whatever_links_lead_to_it(tmp_path, capsys):
    """A `latest` link to the newest version folder listed its checkpoints twice, and a link to a folder above (`up ->
    ..`) every checkpoint again, as far down as the listing looks."""
    for version in (0, 1):
        tiny_ckpt(tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt", 4 + version, [])
    (tmp_path / "latest").symlink_to("version_1")
    (tmp_path / "version_0" / "up").symlink_to("..")
    _, record = inspected(capsys, tmp_path)
    assert [Path(r["path"]).relative_to(tmp_path).as_posix() for r in record["checkpoints"]] == [
        "version_0/checkpoints/last.ckpt",
        "version_1/checkpoints/last.ckpt",
    ]


def test_a_file_of_a_checkpoint_folder_given_for_it_names_the_folder(tmp_path, capsys):
    """`--checkpoint out/model.safetensors` (or config.json, a .distcp shard, meta.pt) was read as a training
    checkpoint: "not a Lightning checkpoint (no state_dict)", for a shard "corrupt or truncated ... copy it again"."""
    folder = save_consolidated(Llama(LlamaConfig.from_name("debug", n_layer=2)), tmp_path / "c")
    tiny_ckpt(folder / "last.ckpt", 8, [])  # a .ckpt file is read wherever it lies
    assert inspected(capsys, folder / "last.ckpt")[1]["global_step"] == 8
    for name in ("model.safetensors", "config.json"):
        argv = ["export", "--checkpoint", str(folder / name), "--output", str(tmp_path / "out")]
        assert main(argv) == 2
        assert capsys.readouterr().err == (
            f"error: a file of a consolidated folder, not a checkpoint itself — --checkpoint {folder / name} — pass "
            f"the folder: --checkpoint {folder}\n"
        )


def test_a_listing_checks_the_weights_only_when_asked_and_says_so(tmp_path, capsys):
    """The listing read no weights and said nothing of it; --check-weights was ignored there."""
    tiny_ckpt(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", 4, [])
    bad = tiny_ckpt(tmp_path / "checkpoints" / "epoch=0-step=8.ckpt", 8, [])
    state = torch.load(bad, weights_only=True)
    state["state_dict"]["model.norm.weight"][0] = float("inf")
    torch.save(state, bad)
    out, record = inspected(capsys, tmp_path)
    assert [r["non_finite"] for r in record["checkpoints"]] == [None, None]
    assert all(line.split()[4:6] == ["not", "checked"] for line in out.splitlines()[1:3])
    out, record = inspected(capsys, tmp_path, "--check-weights")
    assert [r["non_finite"] for r in record["checkpoints"]] == [[], ["model.norm.weight"]]
    lines = out.splitlines()
    assert lines[1].split()[4:6] == ["all", "finite"] and lines[2].split()[4:7] == ["NaN", "or", "inf"]


def test_a_non_finite_validation_loss_is_carried_as_strict_json(tmp_path, capsys):
    """A last validation whose loss came out inf (activations past float16) went into the consolidated config.json and
    the export's model.safetensors metadata as Python's Infinity, which jq and JavaScript refuse: it is null there."""
    from epas_lightning.provenance import EXPORT_METADATA_KEY

    ckpt = tiny_ckpt(tmp_path / "last.ckpt", 8, [3, 2], last_validation={"loss": float("inf"), "step": 8})
    consolidated = consolidate(ckpt, tmp_path / "consolidated")
    assert strict_json((consolidated / "config.json").read_text())["training"]["val_loss"] == {"loss": None, "step": 8}
    with safe_open(export(ckpt, tmp_path / "hf") / "model.safetensors", "pt") as f:
        assert strict_json(f.metadata()[EXPORT_METADATA_KEY])["val_loss"] == {"loss": None, "step": 8}
    out, record = inspected(capsys, consolidated)
    assert record["val_loss"] is None and "  val loss          not recorded\n" in out


def test_an_export_records_its_source_and_held_out_data_relative_to_itself(tmp_path, capsys):
    """An export's model.safetensors named the training checkpoint and the held-out data folders by their absolute
    paths (``/home/alice/...``), which a folder pushed to the Hub leaks and which mean nothing elsewhere: they are
    written relative to the export folder, and read back (inspect, evaluate's held-out data) as the paths they were."""
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.provenance import EXPORT_METADATA_KEY

    (tmp_path / "data" / "val").mkdir(parents=True)
    heldout = {"data_dirs": [str(tmp_path / "data")], "val_dir": str(tmp_path / "data" / "val"), "seed": 7}
    ckpt = tiny_ckpt(tmp_path / "run" / "last.ckpt", 8, [3, 2], heldout=heldout)
    hf = export(ckpt, tmp_path / "exports" / "hf")
    with safe_open(hf / "model.safetensors", "pt") as f:
        written = f.metadata()[EXPORT_METADATA_KEY]
    assert str(tmp_path) not in written, written
    record = strict_json(written)
    assert (record["source"], record["heldout"]["data_dirs"]) == ("../../run/last.ckpt", ["../../data"])
    _, inspected_record = inspected(capsys, hf)
    assert inspected_record["source"] == str(ckpt)
    assert inspected_record["heldout"] == {**heldout, "missing": None}
    assert describe_checkpoint(hf).heldout.data_dirs == (tmp_path / "data",)  # evaluate and bench read it so


def test_a_consolidated_folder_records_its_local_paths_relative_to_itself(tmp_path, tiny_corpus, capsys):
    """A consolidated config.json named the training checkpoint, the held-out data folders and the run's data folder
    by absolute paths, which a folder handed to someone else leaks: they are relative to the folder, and read back
    (inspect, load_model's data folder for evaluate, bench and analyze) as the paths they were."""
    from epas_lightning.checkpoint import load_model

    heldout = {"data_dirs": [str(tiny_corpus)], "val_dir": None, "seed": 7}
    ckpt = tiny_ckpt(tmp_path / "run" / "last.ckpt", 8, [3, 2], tiny_corpus / "tokenizer.json", heldout=heldout)
    folder = consolidate(ckpt, tmp_path / "copies" / "c")
    record = strict_json((folder / "config.json").read_text())
    written = [
        record["training"]["source"],
        *record["training"]["heldout"]["data_dirs"],
        record["tokenizer"]["data_dir"],
    ]
    assert not [path for path in written if os.path.isabs(path)], written
    _, inspected_record = inspected(capsys, folder)
    assert (inspected_record["source"], inspected_record["heldout"]) == (str(ckpt), {**heldout, "missing": None})
    assert load_model(folder).data_dir == tiny_corpus


@pytest.mark.parametrize("form", ["export", "consolidated"])
def test_a_copied_folder_does_not_read_its_relative_paths_as_another_folders_data(form, tmp_path, tiny_corpus, capsys):
    """Written relative to the folder, the held-out data (and the run's data folder) of a folder copied elsewhere read
    as whatever sits at the same relative place there: evaluate without --data scored another corpus, silently (with
    absolute paths it read the run's own data, or refused one gone). A moved folder names none of them now, and
    evaluate without --data says why in one line, naming --data; one that stayed reads them as before."""
    import shutil

    from epas_lightning.checkpoint import describe_checkpoint

    (tmp_path / "a" / "data" / "val").mkdir(parents=True)
    tokenizer = Path(shutil.copy(tiny_corpus / "tokenizer.json", tmp_path / "a" / "data"))
    heldout = {"data_dirs": [str(tmp_path / "a" / "data")], "val_dir": None, "seed": 7}
    run = tmp_path / "a" / "run" / "last.ckpt"
    ckpt = tiny_ckpt(run, 8, [3, 2], tokenizer, heldout=heldout, data_dir=str(tokenizer.parent))
    write = export if form == "export" else consolidate
    folder = write(ckpt, tmp_path / "a" / "out" / "m")
    info = describe_checkpoint(folder)
    assert info.heldout.data_dirs == (tmp_path / "a" / "data",)
    assert info.data_dir == (tmp_path / "a" / "data" if form == "consolidated" else None)
    (tmp_path / "b" / "data" / "val").mkdir(parents=True)  # another corpus, at the same place relative to the copy
    copy = Path(shutil.copytree(folder, tmp_path / "b" / "out" / "m"))
    info = describe_checkpoint(copy)
    assert (info.heldout, info.data_dir, info.training["source"]) == (None, None, None), info.heldout
    out, record = inspected(capsys, copy)
    assert (record["moved"], record["heldout"], record["source"]) == (True, None, None)
    assert main(["inspect", "--checkpoint", str(copy)]) == 0
    assert re.search(r"made from +not known here \(the folder was moved", capsys.readouterr().out)
    assert main(["evaluate", "--checkpoint", str(copy), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moved or copied" in err and "--data" in err, err


def test_consolidate_and_export_carry_the_provenance_inspect_shows_for_the_checkpoint(tmp_path, capsys, monkeypatch):
    """Consolidated folders kept the step alone, exports nothing: inspect could not tell them apart. "made from" named
    the checkpoint's file alone (``last.ckpt`` of which run?): it is its absolute path, from a relative one too."""
    validation = {"loss": 5.25, "step": 40}
    tiny_ckpt(tmp_path / "run" / "epoch=2-step=48.ckpt", 48, [3, 2], last_validation=validation, epoch=2)
    monkeypatch.chdir(tmp_path)
    ckpt = Path("run", "epoch=2-step=48.ckpt")  # as a user types it, relative to where the command runs
    fields = ("global_step", "epoch", "tokens", "val_loss")
    _, record = inspected(capsys, ckpt)
    trained = {key: record[key] for key in fields}
    assert trained == {"global_step": 48, "epoch": 2, "tokens": 48 * 128, "val_loss": validation}
    assert record["source"] is None
    consolidated = consolidate(ckpt, tmp_path / "consolidated")
    through = export(consolidated, tmp_path / "hf")  # the training checkpoint's path is carried through
    direct = export(ckpt, tmp_path / "hf-stock", sharing_layers=0)
    for folder in (consolidated, through, direct):
        out, record = inspected(capsys, folder)
        source = str(tmp_path / "run" / "epoch=2-step=48.ckpt")
        assert {key: record[key] for key in fields} == trained and record["source"] == source, folder
        assert f"  made from         {source}\n" in out and "  step              48 (epoch 2)\n" in out
        assert "  tokens            6,144 trained\n" in out and "  val loss          5.2500 at step 40\n" in out
    with safe_open(direct / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers reads; its config.json is untouched
    assert not any(key.startswith("epas") for key in json.loads((direct / "config.json").read_text()))
    # the stock export runs dense: inspect said "dense (no sharing layers trained)", "1..3 ... (never trained)"
    out, record = inspected(capsys, direct)
    assert record["weights_trained_region"] == {"layers": [3, 2], "order": "deep_first"}, out
    assert record["trained_region"]["layers"] == [] and record["sharing_layers"]["max"] == 0
    assert (
        "  region            dense: a stock export of weights that trained 2 sharing layers (layers [3, 2], "
        "deep-first); our commands and transformers run it dense (export the checkpoint again with --remote-code "
        "for the region)\n" in out
    ), out
    forced = "1..3 only with --force (the folder does not carry the region its weights trained)"
    assert f"  --sharing-layers  0 (default 0); {forced}\n" in out, out
    assert inspected(capsys, through)[1]["weights_trained_region"] is None  # it runs its region
    listed = inspected(capsys, tmp_path)[0].splitlines()  # the run folder's listing said region 0, nothing more
    stock = [re.split(" {2,}", line)[2] for line in listed if line.endswith("hf-stock")]
    assert stock == ["0 (trained 2, not carried)"], listed
    assert [line.split()[2] for line in listed if line.endswith(("hf", "consolidated"))] == ["2", "2"]
    # exported or consolidated again, it ran dense with no record: the region its weights trained was lost
    again, copy = export(direct, tmp_path / "again"), consolidate(direct, tmp_path / "copy")
    for folder in (again, copy, export(copy, tmp_path / "copy-hf")):
        out, record = inspected(capsys, folder)
        assert record["weights_trained_region"] == {"layers": [3, 2], "order": "deep_first"}, folder
        assert record["trained_region"]["layers"] == [] and record["sharing_layers"]["max"] == 0, folder
    assert "  region            dense: a copy of weights that trained 2 sharing layers (" in inspected(capsys, copy)[0]

    # folders written before: the step alone (consolidate), nothing (export); they still inspect
    config = json.loads((consolidated / "config.json").read_text())
    del config["training"]
    (consolidated / "config.json").write_text(json.dumps(config))
    save_file(load_file(direct / "model.safetensors"), direct / "model.safetensors", metadata={"format": "pt"})
    for folder, step in ((consolidated, 48), (direct, None)):
        out, record = inspected(capsys, folder)
        assert (record["global_step"], record["tokens"], record["val_loss"], record["source"]) == (
            step,
            None,
            None,
            None,
        )
        assert "  made from         not recorded\n" in out and "  tokens            - (not recorded)\n" in out
    assert record["weights_trained_region"] is None and "  region            dense (no sharing layers trained)\n" in out


class Evil:
    """Unpickling this runs a shell command that creates ``marker`` (as tests/test_trust.py crafts one)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_consolidated_and_hugging_face_folders_say_their_region_and_stored_dtype(tmp_path, capsys):
    """The headers give a bf16 export's dtype: a shapes-only read had called every such weight float32."""
    model = Llama(LlamaConfig.from_name("debug"))
    model.sharing.set_shared_layers([1])
    consolidated = save_consolidated(model.bfloat16(), tmp_path / "consolidated")
    _, record = inspected(capsys, consolidated)
    assert (record["kind"], record["trained_region"]["layers"], record["weights_dtype"]) == (
        "consolidated", [1], ["bfloat16"]
    )  # fmt: skip
    hf = export(consolidated, tmp_path / "hf", sharing_layers=0)
    out, record = inspected(capsys, hf)
    assert (record["kind"], record["trained_region"]["layers"], record["weights_dtype"]) == ("hf", [], ["bfloat16"])
    assert record["global_step"] is None and record["non_finite"] == [] and "  step              -\n" in out
    assert "  transformers      loads it dense (no epas_shared_layers in config.json)\n" in out


def test_an_export_past_its_trained_region_says_transformers_loads_it_so(tmp_path, capsys):
    """`export --sharing-layers 3 --force` of a 2-layer region showed the trained region alone, not what it runs at."""
    ckpt = tiny_ckpt(tmp_path / "last.ckpt", 8, [3, 2])
    for n, says in ((2, ""), (3, "; layers [1] never trained to share (exported with --force)")):
        hf = export(ckpt, tmp_path / f"hf{n}", sharing_layers=n, force=True)
        out, record = inspected(capsys, hf)
        assert record["transformers_shared_layers"] == list(range(4 - n, 4)), out
        layers = f"{n} sharing layers: layers {list(range(3, 3 - n, -1))}"  # in growth order
        assert f"  transformers      loads it with {layers} (config.json epas_shared_layers){says}\n" in out, out
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"epas_shared_layers": [0, 9]}))  # hand-edited
    assert (
        "  transformers      refuses its epas_shared_layers [0, 9] (config.json): not layers 1..3\n"
        in (inspected(capsys, hf)[0])
    )


def test_a_listing_gives_the_region_an_export_runs_at_beside_the_trained_one(tmp_path, capsys):
    """`export --sharing-layers 1` of a 2-layer region runs 1 sharing layer (transformers and our commands), and its
    own inspect says so (default 1), but a folder's listing gave it 2 as if it ran the whole trained region."""
    ckpt = tiny_ckpt(tmp_path / "runs" / "last.ckpt", 8, [3, 2])
    export(ckpt, tmp_path / "runs" / "hf1", sharing_layers=1)
    out, _ = inspected(capsys, tmp_path / "runs")
    rows = {line.split()[-1]: re.split(r"\s{2,}", line)[2] for line in out.splitlines()[1:-1]}
    assert rows == {"last.ckpt": "2", "hf1": "1 (trained 2)"}, out


def test_fit_records_its_latest_validation_in_its_checkpoints(debug_fit_run, tiny_corpus, capsys):
    """The loss the summary of a run prints was in no checkpoint: `inspect` could not tell the checkpoints apart. Nor
    the data it validated on (a data.val_dir, a mixture's val splits), which `evaluate` now reads without --data."""
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.data.token_data import HeldOut

    result, cwd = debug_fit_run
    assert result.returncode == 0, result.stderr[-2000:]
    _, record = inspected(capsys, cwd / "runs")
    last = next(r for r in record["checkpoints"] if r["path"].endswith("last.ckpt"))
    assert last["global_step"] == 8 and last["tokens"] == 8 * 4 * 32 and last["trained_region"]["layers"] == [1]
    assert last["val_loss"]["step"] in (4, 8) and 0 < last["val_loss"]["loss"] < 10, last
    assert describe_checkpoint(last["path"]).heldout == HeldOut((tiny_corpus.resolve(),), None, 42)


def test_checkpoint_errors_name_the_flag_that_gave_the_checkpoint(tmp_path):
    """Errors about the checkpoint itself named a bare path (``no weights — /x/hf — expected ...``) where the others
    say ``--checkpoint /x/hf``, the flag the user gave it by."""
    from model_dirs import save_hf_config

    from epas_lightning.checkpoint import load_model
    from epas_lightning.errors import CheckpointError
    from epas_lightning.hf import config_from_hf
    from epas_lightning.init_from import source_shapes

    model = Llama(LlamaConfig.from_name("debug", n_layer=2))
    state = {"model." + key: t.clone() for key, t in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "no_config.ckpt")
    state["model.norm.weight"][0] = float("nan")
    torch.save({"state_dict": state, "model_config": model.config.to_dict()}, tmp_path / "nan.ckpt")
    misfit = save_consolidated(model, tmp_path / "misfit")
    record = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**record, "model": {**record["model"], "n_embd": 128}}))
    region = save_consolidated(model, tmp_path / "region")
    (region / "config.json").write_text(json.dumps({**record, "sharing": {"region": ["x"]}}))
    hf = export(save_consolidated(model, tmp_path / "source"), tmp_path / "exported")
    hf_record = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**hf_record, "intermediate_size": 2 * hf_record["intermediate_size"]}))
    for path, says in [
        (save_hf_config(tmp_path / "hf"), "no weights"),
        (tmp_path / "no_config.ckpt", "no 'model_config'"),
        (tmp_path / "nan.ckpt", "the weights hold NaN or inf"),
        (misfit, "the weights do not fit the model config it records"),
        (region, "its recorded sharing region is invalid"),
        (hf, "its config.json and weights disagree"),
    ]:
        with pytest.raises(CheckpointError, match=says) as error:
            load_model(path, flag="--checkpoint")
        assert error.value.where == f"--checkpoint {path}", str(error.value)
    with pytest.raises(CheckpointError, match="no weights") as error:  # fit --model.init_from of that folder
        source_shapes(tmp_path / "hf", config_from_hf(tmp_path / "hf"))
    assert error.value.where == f"model.init_from {tmp_path / 'hf'}", str(error.value)
    with pytest.raises(CheckpointError, match=r"^model.config does not match init_from .* leave those") as error:
        source_shapes(hf, model.config)  # its config.json is not the run's model.config (it named no place)
    assert error.value.where == f"model.init_from {hf}", str(error.value)


def test_a_checkpoint_says_what_its_sharing_layers_reuse(tmp_path, capsys):
    """A kv-mode region read as any other: "2 sharing layers", with nothing saying they reuse K/V, not Q/K."""
    model = Llama(LlamaConfig.from_name("debug", n_layer=4, sharing_mode="kv"))
    model.sharing.set_shared_layers([3, 2])
    out, record = inspected(capsys, save_consolidated(model, tmp_path / "kv"))
    assert record["model"]["sharing_mode"] == "kv" and ", sharing mode kv (K/V)\n" in out
