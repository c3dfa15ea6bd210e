"""What is safe (README "What is safe"): untrusted files run no code, a diverging run stops, nothing the user owns is
deleted or replaced, and user errors are one line. Each guarantee has a test here."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import Recorder, cpu_trainer, train_tiny_sentencepiece
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from model_dirs import save_consolidated

from epas_lightning import (
    AtomicCheckpointIO,
    DivergenceGuard,
    EPASModule,
    Llama,
    LlamaConfig,
    TokenDataModule,
    TrainingDiverged,
    WarmupCosineLR,
    outputs,
)
from epas_lightning.cli import main
from epas_lightning.consolidation import consolidate
from epas_lightning.data.prepare import prepare_dataset
from epas_lightning.data.sources import DataPreparationError
from epas_lightning.errors import CheckpointError, OutputError
from epas_lightning.outputs import MARKER, output_folder, remove_stale_builds
from epas_lightning.safe_load import load_torch_file

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
VOCAB = 512


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path: Path) -> SimpleNamespace:
    """A malicious .ckpt file (zip, and torch's legacy format: read whole, and kept for the next read of its
    metadata), sharded checkpoint folder and HF folder; each would create ``marker`` if unpickled."""
    marker = tmp_path / "PWNED"
    file, legacy = tmp_path / "evil.ckpt", tmp_path / "evil_legacy.ckpt"
    for path, zipped in ((file, True), (legacy, False)):
        payload = {"state_dict": {}, "model_config": {}, "payload": Evil(marker)}
        torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    sharded = tmp_path / "evil_sharded"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    torch.save({"epoch": 0}, sharded / "meta.pt")
    hf = tmp_path / "evil_hf"
    hf.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    config |= {"num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 32}
    (hf / "config.json").write_text(json.dumps(config))
    torch.save({"model.embed_tokens.weight": Evil(marker)}, hf / "pytorch_model.bin")
    # the files are really malicious: a plain unpickler runs them
    for path in (file, legacy):
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    return SimpleNamespace(marker=marker, file=file, legacy=legacy, sharded=sharded, hf=hf)


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# No code runs from a file a user hands us
# ---------------------------------------------------------------------------------------------------------------------

TOOL_ARGS = {
    "generate": ["--prompt", "x"],
    "bench": [],
    "evaluate": [],
    "export": ["--output", "{tmp}/out"],
    "consolidate": ["--output", "{tmp}/out"],
    "analyze": ["--output", "{tmp}/out"],
    "serve": [],
}


@pytest.mark.parametrize("form", ["file", "legacy", "sharded"])
@pytest.mark.parametrize("command", sorted(TOOL_ARGS))
def test_tools_refuse_malicious_checkpoints(command, form, evil, tmp_path, capsys):
    path = getattr(evil, form)
    extra = [a.format(tmp=tmp_path) for a in TOOL_ARGS[command]]
    err = one_line_error(capsys, [command, "--checkpoint", str(path), *extra])
    assert str(path) in err
    assert not evil.marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("form", ["file", "legacy", "sharded"])
@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_lightning_commands_refuse_malicious_checkpoints(command, form, evil, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = getattr(evil, form)
    err = one_line_error(capsys, [command, "--config", DEBUG, "--ckpt_path", str(path)])
    assert "--ckpt_path" in err and not evil.marker.exists()


def test_init_from_refuses_malicious_checkpoints_and_hf_weights(evil, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for path in (evil.file, evil.legacy, evil.sharded):
        err = one_line_error(capsys, ["fit", "--config", DEBUG, "--model.init_from", str(path)])
        assert "model.init_from" in err
    from epas_lightning.hf.convert import read_hf_weights

    with pytest.raises(CheckpointError, match="never unpickle"):
        read_hf_weights(evil.hf)
    assert not evil.marker.exists()


def test_fsdp2_resume_reads_sharded_metadata_safely(evil):
    """The resume path Lightning takes for a sharded folder goes through the restricted unpickler; also under
    Lightning's own ModelParallelStrategy, which ``EPASModule.setup`` has read as FSDP2Strategy does (its own
    unpickled the metadata, whatever weights_only said)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from epas_lightning.checkpoint_io import load_safely
    from epas_lightning.strategy import FSDP2Strategy

    lightnings = ModelParallelStrategy()
    load_safely(lightnings)
    for strategy in (FSDP2Strategy(), lightnings):
        with pytest.raises(CheckpointError, match="unsafe or corrupt distributed-checkpoint metadata"):
            strategy.load_checkpoint(evil.sharded, weights_only=False)
    assert not evil.marker.exists()


def test_sharded_metadata_reaching_a_function_through_an_allowed_module_is_refused(tmp_path):
    """The metadata unpickler allows the classes of torch's checkpoint metadata module by module name; a pickle naming
    ``os.system`` in it (a dotted name, which protocol 4 follows attribute by attribute) ran that command."""
    import pickle

    from epas_lightning.safe_dcp import read_dcp_metadata

    def text(value: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(value)]) + value.encode()

    marker = tmp_path / "PWNED"
    call = text("torch.distributed.checkpoint.metadata") + text("os.system") + pickle.STACK_GLOBAL
    payload = b"\x80\x04" + call + text(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    with pytest.raises(CheckpointError, match="unsafe or corrupt distributed-checkpoint metadata"):
        read_dcp_metadata(payload, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("elsewhere", ["absolute", "parent"])
def test_sharded_metadata_placing_shards_outside_its_folder_is_refused(tmp_path, elsewhere):
    """A ``.metadata`` naming its shard by an absolute path, or one through ``..``, made every reader (resume,
    consolidate, export) read weights from that file outside the folder: any file the user can read, written on into
    a consolidated or exported model."""
    import pickle

    from torch.distributed.checkpoint import save as dcp_save

    from epas_lightning.safe_dcp import SafeFileSystemReader, load_shards

    folder, outside = tmp_path / "ckpt", tmp_path / "outside.distcp"
    dcp_save({"state_dict": {"w": torch.ones(4)}}, checkpoint_id=folder, no_dist=True)
    (shard,) = folder.glob("*.distcp")
    shard.rename(outside)
    metadata = SafeFileSystemReader(folder).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = str(outside) if elsewhere == "absolute" else f"../{outside.name}"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"shard file .*outside.distcp.* outside its folder"):
        load_shards({"state_dict": {"w": torch.zeros(4)}}, folder, no_dist=True)


def test_fsdp2_resume_reads_non_tensor_shard_entries_safely(tmp_path):
    """A sharded checkpoint keeps the optimizer's hyperparameters as pickles inside the shards, which
    torch.distributed.checkpoint would load with ``weights_only=False``; the resume path refuses a malicious one."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from epas_lightning.safe_dcp import load_sharded_checkpoint

    marker, module = tmp_path / "PWNED", torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    state = get_optimizer_state_dict(module, optimizer)
    state["param_groups"][0]["lr"] = Evil(marker)
    dcp_save({"state_dict": module.state_dict(), "optimizer_0": state}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(CheckpointError, match="cannot read this file safely"):
        load_sharded_checkpoint(tmp_path, module, [optimizer])
    assert not marker.exists()


def test_a_corrupt_shard_is_not_answered_with_torchs_advice_to_unpickle_it(tmp_path):
    """A shard of garbage at its full length was "cannot read the shards (Weights only load failed. ... Re-running
    `torch.load` with `weights_only` set to `False` will likely succeed ...)": advice no one should take here."""
    from torch.distributed.checkpoint import save as dcp_save

    from epas_lightning.safe_dcp import load_shards

    module = torch.nn.Linear(2, 2)
    dcp_save({"state_dict": module.state_dict()}, checkpoint_id=tmp_path, no_dist=True)
    shard = tmp_path / "__0_0.distcp"
    shard.write_bytes(random.Random(0).randbytes(shard.stat().st_size))
    with pytest.raises(CheckpointError, match=r"^cannot read the shards \(corrupt, or holding objects other") as e:
        load_shards({"state_dict": module.state_dict()}, tmp_path, no_dist=True)
    assert "weights_only" not in str(e.value)


def test_a_file_torch_save_did_not_write_is_not_called_unsafe(tmp_path):
    """``--checkpoint hparams.yaml`` (it lies beside the .ckpt files) was refused as holding objects we never
    unpickle, as if it were a malicious pickle."""
    from epas_lightning.safe_load import load_torch_file

    text = tmp_path / "hparams.yaml"
    text.write_text("model:\n  lr: 0.001\n")
    with pytest.raises(CheckpointError, match="^not a checkpoint file: torch.save writes a zip archive or a pickle"):
        load_torch_file(text)
    text.write_text("hello world\n")  # fails torch's legacy loader with a KeyError: it said "corrupt or truncated"
    with pytest.raises(CheckpointError, match="^not a checkpoint file: torch.save writes a zip archive or a pickle"):
        load_torch_file(text)


def test_a_run_folder_given_to_ckpt_path_names_the_checkpoints_in_it(tmp_path):
    """``--ckpt_path runs/demo/version_0`` said only 'pass a .ckpt file or a checkpoint directory written by fit with
    FSDP2', where the tools' --checkpoint names the checkpoints the folder holds."""
    from epas_lightning.safe_load import verify_checkpoint

    last = tmp_path / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.touch()
    for folder, fix in (
        (last.parent.parent, "pass one of the checkpoints it holds: "),
        (tmp_path, "pass a checkpoint "),
    ):
        with pytest.raises(CheckpointError) as error:
            verify_checkpoint(folder)
        assert error.value.fix.startswith(fix) and str(last) in error.value.fix, error.value.fix


def test_load_model_from_python_names_its_argument_not_a_flag(tmp_path):
    """``load_model(path)`` in a notebook said '— --checkpoint <path> —', a flag nobody typed."""
    from epas_lightning import load_model

    with pytest.raises(CheckpointError, match=f"^checkpoint does not exist — path {tmp_path / 'nope.ckpt'} — "):
        load_model(tmp_path / "nope.ckpt")
    (tmp_path / "hparams.yaml").write_text("lr: 0.001\n")
    with pytest.raises(CheckpointError, match=f"— path {tmp_path / 'hparams.yaml'} — "):
        load_model(tmp_path / "hparams.yaml")


def test_load_from_checkpoint_refuses_malicious_checkpoints_whatever_weights_only_says(evil):
    """``EPASModule.load_from_checkpoint(path, weights_only=False)`` (Lightning's way back to a module) ran the file."""
    for weights_only in (None, False):
        with pytest.raises(CheckpointError, match=r"cannot read this file safely .* — EPASModule.load_from_checkpoint"):
            EPASModule.load_from_checkpoint(evil.file, config=LlamaConfig.from_name("debug"), weights_only=weights_only)
    assert not evil.marker.exists()


class OwnCheckpointIO(TorchCheckpointIO):
    """A user's own ``CheckpointIO``: kept, and asked to load with ``weights_only=True``."""


@pytest.mark.parametrize("plugin", [AtomicCheckpointIO, None, AsyncCheckpointIO, OwnCheckpointIO])
def test_a_trainer_of_ones_own_refuses_malicious_checkpoints_whatever_weights_only_says(plugin, evil, tmp_path):
    """``trainer.fit(..., ckpt_path=path, weights_only=False)`` (or ``validate``) from Python ran the file's code, with
    a plain ``Trainer`` (Lightning's ``TorchCheckpointIO``) too; a missing or corrupt file was a FileNotFoundError or an
    UnpicklingError traceback. ``EPASModule.setup`` has Lightning's own loader replaced by ``AtomicCheckpointIO``."""
    import lightning as L

    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    refused = {
        evil.file: "cannot read this file safely",
        tmp_path / "garbage.ckpt": "not a checkpoint file",
        tmp_path / "none.ckpt": "checkpoint does not exist",
    }
    if plugin is not AtomicCheckpointIO:
        refused = {evil.file: "cannot read this file safely"}
    for (path, message), stage in zip(refused.items(), ["fit", "validate", "fit"], strict=False):
        module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=8))
        plugins = [] if plugin is None else [plugin()]
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=plugins, enable_progress_bar=False)
        data = torch.utils.data.DataLoader([torch.zeros(9, dtype=torch.long)])
        if plugin is OwnCheckpointIO:  # its own torch.load, with weights_only=True
            with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
                getattr(trainer, stage)(module, data, ckpt_path=path, weights_only=False)
            assert type(trainer.strategy.checkpoint_io) is OwnCheckpointIO
        else:
            with pytest.raises(CheckpointError, match=f"{message}.* — ckpt_path {path}"):
                getattr(trainer, stage)(module, data, ckpt_path=path, weights_only=False)
    assert not evil.marker.exists()


def test_lm_eval_adapter_refuses_malicious_checkpoints(evil):
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    with pytest.raises(CheckpointError):
        EPASLM(str(evil.file))
    assert not evil.marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# A diverging run stops
# ---------------------------------------------------------------------------------------------------------------------


def finite_weights(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
def test_a_diverging_fit_stops_with_one_line_and_writes_no_bad_checkpoint(tiny_corpus, tmp_path, capsys, monkeypatch):
    """The command line through ``main`` in this process: its exit status and its last line on stderr."""
    args = ["fit", "--config", DEBUG, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "1e6"]
    args += ["--trainer.max_steps", "20", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tiny_corpus.parent))
    code, err = main(args), capsys.readouterr().err
    assert code == 3, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged: non-finite") and "at step " in last_line, last_line
    assert "last good checkpoint: runs/debug/version_0/checkpoints/" in last_line and "--ckpt_path" in last_line
    step = int(last_line.split("at step ")[1].split()[0])
    checkpoints = sorted((tmp_path / "runs" / "debug" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(finite_weights(p) for p in checkpoints)
    assert all(torch.load(p, weights_only=True)["global_step"] <= step for p in checkpoints)
    named = tmp_path / last_line.split("--ckpt_path ")[1]  # written before the bad step: not the one at it
    assert torch.load(named, weights_only=True)["global_step"] < step


class NaNLossAt(EPASModule):
    """EPASModule whose loss is NaN at the given optimizer steps."""

    def __init__(self, config: LlamaConfig, bad_steps: set[int]) -> None:
        super().__init__(config)
        self.bad_steps = bad_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in self.bad_steps else loss


class WeightTrace(Callback):
    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.before[trainer.global_step] = pl_module.model.layers[0].mlp.up_proj.weight.detach().clone()


def guarded_fit(tiny_corpus: Path, root: Path, bad_steps: set[int], guard: DivergenceGuard, steps: int = 6):
    torch.manual_seed(0)
    module = NaNLossAt(LlamaConfig.from_name("debug", block_size=32), bad_steps)
    trace = WeightTrace()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = cpu_trainer(root, steps, [guard, trace, checkpoint])
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
    return module, trace, trainer, data


def all_finite(module: EPASModule) -> bool:
    return all(torch.isfinite(p).all() for p in module.model.parameters())


def test_guard_stops_before_the_bad_update(tiny_corpus, tmp_path):
    """The checkpoint it names was written before the bad step: last.ckpt, written at it, holds the weights that step
    diverged from (a resume from it, whatever the learning rate, diverged again, and named it again)."""
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path, {3}, DivergenceGuard())
    good = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.raises(TrainingDiverged, match=f"non-finite loss at step 3 — last good checkpoint: {good} ") as stop:
        trainer.fit(module, data)
    assert "warmup" not in str(stop.value)  # a resumed run keeps its finished warmup: only the LR or clipping help
    python = f"then resume with trainer.fit(..., ckpt_path='{good}')"  # not a CLI flag
    assert str(stop.value).endswith(python), stop.value
    assert all_finite(module) and trainer.global_step == 3
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert {torch.load(p, weights_only=True)["global_step"] for p in saved} == {1, 2, 3}
    assert all(finite_weights(p) for p in saved)
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path / "first", {1}, DivergenceGuard(), steps=2)
    last = tmp_path / "first" / "ckpt" / "last.ckpt"
    says = f"before this step: {last} holds its weights .* — resume with trainer.fit\\(..., ckpt_path='{last}'\\) and "
    with pytest.raises(TrainingDiverged, match=says + "DivergenceGuard\\('skip'\\) to drop that step"):
        trainer.fit(module, data)
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path / "again", {1}, DivergenceGuard("skip"), steps=2)
    trainer.fit(module, data, ckpt_path=last)  # as it says: the step is dropped, the run goes on
    assert trainer.global_step == 2 and all_finite(module)


def test_a_weights_only_checkpoint_is_named_to_start_a_new_run_from_not_to_resume(tiny_corpus, tmp_path):
    """A divergence said to resume a weights-only checkpoint (checkpoint.save_weights_only), which holds no training
    state: the resume failed with Lightning's KeyError. A new run starts from its weights."""
    torch.manual_seed(0)
    module = NaNLossAt(LlamaConfig.from_name("debug", block_size=32), {2})
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_weights_only=True)
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
    good = tmp_path / "epoch=0-step=1.ckpt"
    says = f"last good checkpoint: {good} \\(written after step 1; weights only\\) — .* then start a new run from its "
    with pytest.raises(TrainingDiverged, match=f"{says}weights with EPASModule\\(init_from='{good}'\\)$"):
        cpu_trainer(tmp_path, 3, [DivergenceGuard(), checkpoint]).fit(module, data)
    # resuming it anyway was Lightning's KeyError traceback
    with pytest.raises(CheckpointError, match=f"weights-only .* no training state to resume — --ckpt_path {good} — "):
        cpu_trainer(tmp_path, 3).fit(module, data, ckpt_path=good)
    # nor is one written at the bad step to be resumed skipping it
    module = NaNLossAt(LlamaConfig.from_name("debug", block_size=32), {1})
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=1, save_weights_only=True)
    with pytest.raises(TrainingDiverged, match="at step 1 — no good checkpoint was written before it — lower"):
        cpu_trainer(tmp_path, 2, [DivergenceGuard(), checkpoint]).fit(module, data)


def test_guard_skips_bad_steps_up_to_max_skips(tiny_corpus, tmp_path):
    module, trace, trainer, data = guarded_fit(tiny_corpus, tmp_path / "a", {2, 4}, DivergenceGuard("skip", 2))
    trainer.fit(module, data)
    assert trainer.global_step == 6 and all_finite(module)
    assert torch.equal(trace.before[2], trace.before[3]) and not torch.equal(trace.before[1], trace.before[2])
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path / "b", {2, 3, 4}, DivergenceGuard("skip", 2))
    good = tmp_path / "b" / "ckpt" / "epoch=0-step=1.ckpt"  # those of steps 2 and 3 hold weights that gave bad steps
    with pytest.raises(TrainingDiverged, match=f"at step 4 — last good checkpoint: {good} "):
        trainer.fit(module, data)


class InfGradients(Callback):
    """fp16 gradients that overflow at every step, whatever the loss scale."""

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        pl_module.model.norm.weight.grad[0] = float("inf")


def fp16_fit(tiny_corpus: Path, root: Path, module: EPASModule, callbacks: list, steps: int = 4):
    from lightning.pytorch.plugins import MixedPrecision

    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
    plugin = MixedPrecision("16-mixed", "cpu")  # Lightning swaps a CPU's 16-mixed for bf16-mixed
    cpu_trainer(root, steps, callbacks, plugins=[plugin]).fit(module, data)


def test_under_fp16_loss_scaling_a_guard_stops_gradients_that_overflow_at_the_minimum_scale(tiny_corpus, tmp_path):
    """The guard left every inf gradient to the GradScaler, which skipped each step and halved the scale to 0: a run
    whose gradients never came back finished all its steps without one update, and said nothing."""
    torch.manual_seed(0)
    module = EPASModule(LlamaConfig.from_name("debug", block_size=32))
    guard = DivergenceGuard(min_loss_scale=2.0**14)  # 65536 at step 0, 32768 at 1, 16384 at 2
    with pytest.raises(TrainingDiverged, match="non-finite gradients at step 2 with the fp16 loss scale down to 16384"):
        fp16_fit(tiny_corpus, tmp_path, module, [guard, InfGradients()])


def test_the_summary_counts_the_steps_the_fp16_loss_scaler_skipped(tiny_corpus, tmp_path):
    """A skipped step still advances the step counter, the LR schedule and the sharing schedule (Lightning's rule);
    nothing said how many there were. The summary does now, and train/loss_scale follows the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    from epas_lightning.run_summary import RunSummary

    class InfGradientsAt(Callback):
        def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.global_step in (1, 2):
                pl_module.model.norm.weight.grad[0] = float("inf")

    class ReadScale(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            scales.append(trainer.callback_metrics["train/loss_scale"].item())

    torch.manual_seed(0)
    module, summary, scales = EPASModule(LlamaConfig.from_name("debug", block_size=32)), RunSummary(), []
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
    plugin = MixedPrecision("16-mixed", "cpu")  # Lightning swaps a CPU's 16-mixed for bf16-mixed
    trainer = cpu_trainer(tmp_path, 4, [summary, InfGradientsAt(), ReadScale()], plugins=[plugin])
    trainer.fit(module, data)
    assert scales == [65536.0, 32768.0, 16384.0, 16384.0]
    assert "the loss scaler skipped 2 steps" in summary.summary(trainer, module, None)


def test_under_fp16_loss_scaling_a_fused_optimizer_skips_a_bad_step(tiny_corpus, tmp_path):
    """``action: skip`` dropped the gradients before the GradScaler had checked a fused optimizer's (it unscales them
    in its step), and the scaler's update raised "No inf checks were recorded prior to update"."""
    torch.manual_seed(0)
    module = NaNLossAt(LlamaConfig.from_name("debug", block_size=32), {1})
    module.optimizer_factory = lambda groups: torch.optim.AdamW(groups, fused=True)
    trace = WeightTrace()
    fp16_fit(tiny_corpus, tmp_path, module, [DivergenceGuard("skip", 1), trace], steps=3)
    assert all_finite(module) and torch.equal(trace.before[1], trace.before[2])


def test_without_the_guard_nan_reaches_the_weights(tiny_corpus, tmp_path):
    """What the guard prevents: with it off, one NaN step poisons the model (and every later checkpoint)."""
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path, {2}, DivergenceGuard("off"), steps=3)
    trainer.fit(module, data)
    assert not all_finite(module)


def test_no_checkpoint_with_non_finite_weights_is_written(tiny_corpus, tmp_path):
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path, set(), DivergenceGuard(), steps=1)
    trainer.fit(module, data)
    # an exp_avg_sq overflowed by a finite gradient (> 1.8e19): the parameter never moves again; a resume refuses it
    state = trainer.optimizers[0].state[module.model.norm.weight]["exp_avg_sq"]
    state[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite optimizer state at step 1; no checkpoint written"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)  # holds no optimizer state
    state[0] = 1.0
    with torch.no_grad():
        module.model.norm.weight[0] = float("inf")
    for weights_only in (False, True):  # Lightning calls no callback's on_save_checkpoint for a weights-only save
        with pytest.raises(TrainingDiverged, match="non-finite weights"):
            trainer.save_checkpoint(tmp_path / "bad.ckpt", weights_only=weights_only)
        assert not (tmp_path / "bad.ckpt").exists()


def test_a_resumed_checkpoint_holding_nan_or_inf_is_refused_before_use(tiny_corpus, tmp_path):
    """Resumed NaN weights trained a step and stopped as a divergence ("lower the learning rate", which could not help);
    an inf exp_avg_sq froze its parameter silently; validate scored NaN weights as val/loss nan, exit status 0."""
    module, _, trainer, data = guarded_fit(tiny_corpus, tmp_path, set(), DivergenceGuard(), steps=1)
    trainer.fit(module, data)
    weights, state = (torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True) for _ in range(2))
    weights["state_dict"]["model.norm.weight"][1] = float("nan")
    state["optimizer_states"][0]["state"][0]["exp_avg_sq"][2] = float("inf")
    torch.save(weights, tmp_path / "weights.ckpt")
    torch.save(state, tmp_path / "state.ckpt")
    for bad, what, fix in (
        ("weights", r"the weights hold NaN or inf \(norm.weight\)", "use another checkpoint, e.g. an earlier one"),
        ("state", r"the optimizer state holds NaN or inf \(exp_avg_sq of embed_tokens.weight\)", "resume an earlier"),
    ):
        bad = tmp_path / f"{bad}.ckpt"
        module, trace, trainer, data = guarded_fit(tiny_corpus, tmp_path / "again", set(), DivergenceGuard(), steps=2)
        with pytest.raises(CheckpointError, match=f"^{what} — --ckpt_path {bad} — {fix}"):
            trainer.fit(module, data, ckpt_path=bad)
        assert not trace.before  # refused before the first step
    with pytest.raises(CheckpointError, match=r"the weights hold NaN or inf \(norm.weight\)"):
        cpu_trainer(tmp_path, 1, limit_val_batches=1).validate(module, data, ckpt_path=tmp_path / "weights.ckpt")


def test_a_resumed_checkpoint_names_the_bad_weights_of_whichever_rank_holds_them(monkeypatch):
    """Each rank checks its own shards of a sharded checkpoint: the first rank, which says it, had none to name and
    said "the weights hold NaN or inf (on another rank)". The ranks' names are gathered (here, a second rank's)."""
    import torch.distributed as dist

    from epas_lightning.divergence import check_resumed_finite

    trainer = SimpleNamespace(
        optimizers=[], ckpt_path="run/last.ckpt", is_global_zero=True, world_size=2,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: True),  # another rank found NaN
    )  # fmt: skip
    with monkeypatch.context() as patch:  # undone before conftest's teardown asks torch about process groups
        patch.setattr(dist, "is_initialized", lambda: True)
        patch.setattr(dist, "get_world_size", lambda: 2)
        patch.setattr(dist, "all_gather_object", lambda out, names: out.__setitem__(slice(None), [names, ["x.w"]]))
        with pytest.raises(CheckpointError, match=r"^the weights hold NaN or inf \(x.w\) — --ckpt_path run/last.ckpt"):
            check_resumed_finite(trainer, torch.nn.Linear(2, 2))


def test_a_divergence_is_said_once_however_many_ranks_stop(capsys, monkeypatch):
    """Every rank raises TrainingDiverged together; each printed the same error line (twice on 2 ranks, 16 times on
    two 8-GPU nodes). Only the first says it; every rank still exits 3."""
    import epas_lightning.cli as cli

    guard = DivergenceGuard()
    for rank in (0, 1):
        said = iter([True, False])  # another rank saw NaN gradients: any rank's bad step, yes; any rank's bad loss, no
        trainer = SimpleNamespace(
            global_step=7, global_rank=rank, is_global_zero=rank == 0, checkpoint_callbacks=[], precision_plugin=None,
            world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all, said=said: next(said)),
        )  # fmt: skip
        with pytest.raises(TrainingDiverged, match="non-finite gradients at step 7") as stopped:
            guard.on_before_optimizer_step(trainer, None, SimpleNamespace(param_groups=[]))
        monkeypatch.setattr(cli, "dispatch", lambda argv, error=stopped.value: (_ for _ in ()).throw(error))
        assert main(["fit"]) == 3
        assert capsys.readouterr().err.count("error: training diverged") == (rank == 0)


def test_guard_settings_come_from_yaml(tmp_path):
    from epas_lightning.lightning_cli import lightning_cli

    config = tmp_path / "guard.yaml"
    config.write_text("divergence:\n  action: skip\n  max_skips: 3\n")
    cli = lightning_cli(["--config", DEBUG, "--config", str(config), "--trainer.logger", "false"], run=False)
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard)]
    assert (guard.action, guard.max_skips) == ("skip", 3)


def test_guard_settings_refused_from_python_are_user_errors():
    """From a script, a bad setting was a plain ValueError; it is now the one-line ConfigError every command prints."""
    from epas_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown action 'halt' — divergence.action — use 'stop', 'skip' or 'off'"):
        DivergenceGuard("halt")
    with pytest.raises(ConfigError, match="max_skips must be >= 0, got -1 — divergence.max_skips"):
        DivergenceGuard("skip", max_skips=-1)


def test_a_checkpoint_file_is_renamed_into_place_never_rewritten_in_place(tmp_path, monkeypatch):
    """Lightning stages a checkpoint in the system temp folder and moves it; across file systems (a local /tmp, runs
    on a network disk) the move rewrote the previous ``last.ckpt`` in place, so a kill or a full disk mid-copy left no
    good one. fit's trainer writes the file beside its name and renames it."""
    import errno

    from epas_lightning.lightning_cli import lightning_cli

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    cli = lightning_cli(["--config", DEBUG, "--trainer.logger", "false"], run=False)
    path, kept = tmp_path / "last.ckpt", tmp_path / "kept.ckpt"
    io = cli.trainer.strategy.checkpoint_io
    io.save_checkpoint({"step": 1}, path)
    os.link(path, kept)  # the previous checkpoint's bytes, wherever its name points next
    monkeypatch.setattr(os, "rename", cross_device)
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert torch.load(kept, weights_only=True) == {"step": 1}  # never overwritten: a new file took the name
    with pytest.raises(AttributeError, match="pickle"):  # a failed save leaves the last one and nothing else
        io.save_checkpoint({"step": 3, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.ckpt", "last.ckpt"]


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        ("ENOSPC", "no space left on the device"),
        ("EACCES", r"cannot write this checkpoint \(permission denied\)"),
        ("EROFS", r"cannot write this checkpoint \(read-only file system\)"),
    ],
)
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, failure, says
):
    """A full disk mid-save ended fit with two tracebacks and torch's 'RuntimeError: unexpected pos 706304 vs 706192'
    (seen on a 4 MB tmpfs). It is one line naming the file, with what to do; the previous checkpoint stays. So is a
    checkpoint folder made read-only mid-run (its permissions changed, its file system remounted read-only after an
    error): it was a traceback."""
    import errno

    from epas_lightning.checkpoint_io import AtomicCheckpointIO
    from epas_lightning.errors import OutputError

    def disk_full(obj, f):
        f.write(b"partial")
        code = getattr(errno, failure)
        try:
            raise OSError(code, os.strerror(code))
        except OSError as e:
            if failure != "ENOSPC":
                raise
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 706304 vs 706192") from e

    path, io = tmp_path / "last.ckpt", AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OutputError, match=says) as raised:
        io.save_checkpoint({"step": 2}, path)
    assert raised.value.where == str(path) and "--ckpt_path auto" in raised.value.fix  # `last` fails on a first save
    assert torch.load(path, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(("failure", "says"), [("EACCES", "permission denied"), ("ENOSPC", "no space left")])
def test_a_checkpoint_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, failure, says):
    """The checkpoint folder was created before the save's error handling: a folder deleted mid-run under a parent
    made read-only (or a full disk) was a traceback from ``mkdir``."""
    import errno

    from epas_lightning.checkpoint_io import AtomicCheckpointIO
    from epas_lightning.errors import OutputError

    def refused(self, *args, **kwargs):
        code = getattr(errno, failure)
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    path = tmp_path / "gone" / "last.ckpt"
    with pytest.raises(OutputError, match=says) as raised:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    assert raised.value.where == str(path) and not path.parent.exists()


@pytest.mark.parametrize("stem", ["x" * 248, "é" * 124])  # 248 bytes: `.{stem}.ckpt.saving` is 261
def test_a_checkpoint_name_near_the_length_limit_saves_and_its_hidden_names_are_found(tmp_path, stem):
    """A ModelCheckpoint filename of 248 bytes or more failed every save with ENAMETOOLONG: the hidden name it is
    written under (`.NAME.saving`) is 8 bytes longer. That name is shortened (its head, a hash, `.ckpt.saving`); the
    sweep of killed saves and the recovery of a moved-aside sharded one still find theirs."""
    from epas_lightning.checkpoint_io import AtomicCheckpointIO, remove_unfinished_saves
    from epas_lightning.strategy import REPLACED, STAGING, hidden_beside, recover_replaced

    path = tmp_path / f"{stem}.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]
    staging = hidden_beside(path, STAGING)
    assert len(os.fsencode(staging.name)) <= 255 and staging != hidden_beside(path.with_name(f"{stem}1.ckpt"), STAGING)
    staging.write_bytes(b"a save killed midway")
    os.utime(staging, (time.time() - 3600,) * 2)
    remove_unfinished_saves(tmp_path)
    assert not staging.exists()
    path.rename(hidden_beside(path, REPLACED))
    assert recover_replaced(path) and torch.load(path, weights_only=True) == {"step": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Nothing the user owns is deleted or replaced; writers are atomic
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "some words here " * 50)
    return root


def prepare(corpus: Path, output: Path, **kwargs) -> Path:
    return prepare_dataset(corpus, output, train_tokenizer=True, vocab_size=300, num_workers=1, **kwargs)


@pytest.mark.parametrize(
    ("command", "flags"),
    [("fit", []), ("validate", []), ("test", []), ("fit", ["--trainer.logger.init_args.sub_dir", "sub"])],
    ids=["fit", "validate", "test", "fit, a logger's sub_dir"],
)
def test_a_run_refused_at_start_up_leaves_no_run_folder_of_its_own(capsys, monkeypatch, tmp_path, command, flags):
    """Lightning makes the logger's version folder before the data is checked: a refused start left
    runs/debug/version_0 (an event file), and the run after the fix became version_1 (validate and test kept theirs
    after fit's was removed; a TensorBoardLogger's sub_dir kept its files in version_0/sub). Folders it did not make
    stay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notdata").mkdir()
    argv = [command, "--config", DEBUG, "--data.data_dir", "notdata", *flags]
    assert "incomplete data directory" in one_line_error(capsys, argv)
    assert not (tmp_path / "runs").exists()
    earlier = tmp_path / "runs" / "debug" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("mine")
    one_line_error(capsys, argv)
    left = sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").rglob("*"))
    assert left == ["debug", "debug/version_0", "debug/version_0/notes.txt"]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--data.data_dir", "notdata"], "error: incomplete data directory"),
        (["--data.batch_size", "100000"], "error: the training stream holds fewer than"),  # after the loops' restore
        (["--data.data_dir", "notdata", "--trainer.logger.init_args.sub_dir", "sub"], "error: incomplete data"),
    ],
    ids=["before the restore", "after the restore", "a logger's sub_dir"],
)
def test_a_resume_refused_at_start_up_leaves_the_run_folder_as_it_was(
    debug_fit_run, capsys, monkeypatch, tmp_path, flags, error
):
    """A refused resume added a second event file (and, refused later, a config-resume-N.yaml) to the run it
    resumes; the files that were there stay, a file of the user's too. Refused once Lightning had restored the loops
    (the step no longer 0, no step trained), it kept its start-up files."""
    shutil.copytree(debug_fit_run[1] / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notdata").mkdir()
    (tmp_path / "runs/debug/version_0/config-resume-1.yaml").write_text("mine")  # named as ours, but not made now
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*"))
    argv = ["fit", "--config", DEBUG, "--sharing.interval", "3", "--ckpt_path", "last", *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(error)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*")) == before


def test_a_resume_with_other_checkpoint_settings_goes_on_writing_the_runs_last_ckpt(
    debug_fit_run, capsys, monkeypatch, tmp_path
):
    """A resume whose checkpoint section differs from the checkpoint's (every_n_train_steps, train_time_interval,
    save_top_k, monitor: its state goes unrestored, Lightning only warns) wrote last-v1.ckpt beside the run's
    last.ckpt, and the next `--ckpt_path last` resumed that stale last.ckpt, training its steps again."""
    shutil.copytree(debug_fit_run[1] / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "runs/debug/version_0/checkpoints"
    fit = ["fit", "--config", DEBUG, "--sharing.interval", "3", "--ckpt_path", "last"]
    assert main([*fit, "--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "5"]) == 0
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]
    assert load_torch_file(checkpoints / "last.ckpt")["global_step"] == 10
    assert (checkpoints / "epoch=0-step=8.ckpt").exists()  # kept by the earlier settings: not this run's to remove
    capsys.readouterr()
    assert main([*fit, "--trainer.max_steps", "11"]) == 0
    assert "Run finished: 11 optimizer steps (1 in this session, resumed at step 10)" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]


def _saved_state(folder: Path, last: str) -> dict:
    return {"dirpath": str(folder), "last_model_path": str(folder / last), "best_model_path": ""}


def test_a_resume_with_other_checkpoint_settings_leaves_another_callbacks_last_checkpoint(tmp_path):
    """Its RunCheckpoint took the last checkpoint name of the first callback state saved in its folder: a user's own
    checkpoint callback with save_last there (listed before the run's), whose file the two then both wrote, and the
    run's own last checkpoint went stale."""
    from epas_lightning.run_checkpoint import RunCheckpoint, StepCheckpoint, adopt_model_checkpoint_states

    folder = (tmp_path / "checkpoints").resolve()
    users = StepCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2)
    run = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=5)
    earlier = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=3)
    states = {
        users.state_key: _saved_state(folder, "last.ckpt"),
        earlier.state_key: _saved_state(folder, "last-v1.ckpt"),
    }
    adopt_model_checkpoint_states(SimpleNamespace(callbacks=[users, run]), {"callbacks": states})
    assert run.last_model_path == str(folder / "last-v1.ckpt")


def test_a_resume_with_other_checkpoint_settings_takes_the_last_name_of_the_runs_own_checkpoint(tmp_path):
    """A callback the checkpoint holds but this run has not (a user's, listed first) is not the run's checkpoint; and
    two RunCheckpoints of one folder do not both take the one name."""
    from epas_lightning.run_checkpoint import RunCheckpoint, StepCheckpoint, adopt_model_checkpoint_states

    folder = (tmp_path / "checkpoints").resolve()
    gone = StepCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2)
    earlier = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=3)
    states = {
        gone.state_key: _saved_state(folder, "last.ckpt"),
        earlier.state_key: _saved_state(folder, "last-v1.ckpt"),
    }
    run = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=5)
    other = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=7)
    adopt_model_checkpoint_states(SimpleNamespace(callbacks=[run, other]), {"callbacks": states})
    assert run.last_model_path == str(folder / "last-v1.ckpt")
    assert other.last_model_path == ""


def test_a_resume_with_other_checkpoint_settings_says_so_rather_than_lightnings_please_add_the_callback(
    tmp_path, capsys
):
    """Lightning warned "callbacks used to create the checkpoint need to be provided ... Please add the following
    callbacks: [RunCheckpoint{...the earlier settings...}]": settings changed on purpose, whose last name was taken."""
    from epas_lightning.run_checkpoint import RunCheckpoint, adopt_model_checkpoint_states

    folder = (tmp_path / "checkpoints").resolve()
    run = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=5)
    earlier = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=3)
    states = {earlier.state_key: _saved_state(folder, "last.ckpt")}
    adopt_model_checkpoint_states(SimpleNamespace(callbacks=[run]), {"callbacks": states})
    assert states == {}
    assert capsys.readouterr().err == (
        f"{folder / 'last.ckpt'} goes on as the run's last checkpoint: the checkpoint section's settings are not those "
        "it was saved with; the step checkpoints they kept stay\n"
    )


def test_a_resume_with_other_checkpoint_settings_names_the_last_checkpoint_of_a_url_folder_as_lightning_does():
    """The name was built as a local path (memory://run/... became memory:/run/...): Lightning, finding the folder's
    last.ckpt under another name than the callback's, wrote last-v1.ckpt beside it, as before the fix."""
    from epas_lightning.run_checkpoint import RunCheckpoint, adopt_model_checkpoint_states

    run = RunCheckpoint(dirpath="memory://run/checkpoints", save_last=True, every_n_train_steps=5)
    earlier = RunCheckpoint(dirpath="memory://run/checkpoints", save_last=True, every_n_train_steps=3)
    state = {"dirpath": run.dirpath, "last_model_path": f"{run.dirpath}/last.ckpt", "best_model_path": ""}
    adopt_model_checkpoint_states(SimpleNamespace(callbacks=[run]), {"callbacks": {earlier.state_key: state}})
    assert run.last_model_path == run.format_checkpoint_name({}, run.CHECKPOINT_NAME_LAST)


def test_the_run_folder_look_at_start_up_stays_out_of_checkpoint_folders(tmp_path):
    """Every start lists the run folders it may resume into (a sub_dir's start-up files too): walking their
    checkpoints/ went through every shard file of every sharded checkpoint of every version, slow on a cluster's file
    system, though no start-up file lies there."""
    from epas_lightning.run_folder import _entries

    version = tmp_path / "version_0"
    (version / "sub").mkdir(parents=True)
    (version / "sub" / "events.out.tfevents.1").touch()
    (version / "checkpoints" / "step=1").mkdir(parents=True)
    (version / "checkpoints" / "step=1" / "__0_0.distcp").touch()
    listed = sorted(p.relative_to(version).as_posix() for p in _entries(version))
    assert listed == ["checkpoints", "sub", "sub/events.out.tfevents.1"]


def test_overwrite_never_replaces_a_folder_we_did_not_write(text_corpus, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="already exists") as refused:
        prepare(text_corpus, user)
    assert "--overwrite" not in str(refused.value).split(" — ")[-1]  # advised only where it would be taken
    with pytest.raises(OutputError, match="its dataset output, and this is a folder it did not write"):
        prepare(text_corpus, user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    with pytest.raises(OutputError, match="and this is not a folder"):
        prepare(text_corpus, user / "thesis.tex", overwrite=True)
    (tmp_path / "made").mkdir()  # `mkdir made` first, as other tools want: the line said only to choose another
    with pytest.raises(OutputError, match=r"already exists — .*made — remove the empty folder \(rmdir\) or choose"):
        prepare(text_corpus, tmp_path / "made")


def test_output_may_not_contain_or_lie_inside_an_input(text_corpus, tmp_path):
    with pytest.raises(OutputError, match="contains the input"):
        prepare(text_corpus, text_corpus.parent, overwrite=True)
    with pytest.raises(OutputError, match="lies inside the input"):
        prepare(text_corpus, text_corpus / "data")
    assert sorted(p.name for p in text_corpus.iterdir()) == [f"doc{i}.txt" for i in range(6)]


@pytest.mark.parametrize("command", ["consolidate", "export", "bench", "analyze"])
def test_an_output_in_the_way_is_refused_before_the_model_loads(command, tmp_path, capsys, monkeypatch):
    """Loading a 7B checkpoint takes minutes: a taken --output must not wait for it."""

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before --output was checked")

    monkeypatch.setattr("epas_lightning.checkpoint.read_any", never)  # where load_model looks it up
    (tmp_path / "mine").mkdir()
    argv = [command, "--checkpoint", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "mine")]
    assert "the output already exists" in one_line_error(capsys, argv)


def test_overwrite_replaces_our_own_dataset_completely(text_corpus, tmp_path):
    out = prepare(text_corpus, tmp_path / "data")
    (out / "stale.bin").write_bytes(b"left over")
    with pytest.raises(OutputError, match="already exists .* choose a new folder or pass --overwrite"):
        prepare(text_corpus, out)
    again = prepare(text_corpus, out, overwrite=True)
    assert again == out and not (out / "stale.bin").exists() and (out / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left beside it


def test_a_dataset_prepared_before_markers_is_replaced_and_else_left_as_it_was(text_corpus, tmp_path):
    """prepare --overwrite marked a dataset prepared before output folders carried a marker ours before anything was
    checked: the marker stayed when the build failed or the output was refused (it holds the input), and a kill left
    the marker's temporary file in it. Nothing is written into it until it is replaced; --overwrite is advised."""
    out = prepare(text_corpus, tmp_path / "data")
    (out / MARKER).unlink()
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataPreparationError, match="no input files found"):
        prepare(tmp_path / "nothing", out, overwrite=True)
    with pytest.raises(OutputError, match="^the output contains the input"):
        prepare(out / "train", out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    with pytest.raises(OutputError, match="choose a new folder or pass --overwrite$"):
        prepare(text_corpus, out)
    assert prepare(text_corpus, out, overwrite=True) == out and sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "nothing",
    ]
    assert json.loads((out / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "dataset"}


def test_builds_left_by_killed_runs_are_cleaned_by_the_next(tmp_path):
    target = tmp_path / "data"
    dead = tmp_path / ".data.tmp-deadbeef"
    dead.mkdir()
    record = {"created_by": "epas_lightning", "kind": "dataset", "pid": 2**22 + 12345, "host": os.uname().nodename}
    (dead / MARKER).write_text(json.dumps(record))
    alive = tmp_path / ".data.tmp-cafecafe"
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps(record | {"pid": os.getpid()}))
    foreign = tmp_path / ".data.tmp-notours"
    foreign.mkdir()
    mine = tmp_path / ".data.del-notours"  # a removal of ours is named so, with 8 hex digits
    mine.mkdir()
    assert remove_stale_builds(target) == [dead]
    assert alive.exists() and foreign.exists() and mine.exists()


def test_folders_named_as_our_hidden_ones_are_left_unless_their_marker_says_this_output(tmp_path):
    """A user's folder named as a removal of ours (`.data.del-` and 8 hex digits) was deleted by any run at `data`,
    whatever it held; a killed build of the output `data.old-b` (`.data.old-b.tmp-...`) was put in place as `data`,
    half-built, by a run at `data`. Only a folder whose marker says a run of ours made it for this output is removed or
    put back (or an empty one a removal left when killed after its marker went, by the claim it made before)."""
    target = tmp_path / "data"
    dead = {"created_by": "epas_lightning", "kind": "dataset", "pid": 2**22 + 12345, "host": os.uname().nodename}
    users = tmp_path / ".data.del-1234abcd"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    other = tmp_path / ".data.old-b.tmp-deadbeef"  # a killed build of the output data.old-b
    other.mkdir()
    (other / MARKER).write_text(json.dumps(dead | {"output": "data.old-b"}))
    for name, output in ((".data.old-cafecafe", "data2"), (".data.tmp-cafecafe", "data2")):  # another output's
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text(json.dumps(dead | {"output": output}))
    ours = tmp_path / ".data.del-5678abcd"  # a removal of ours killed midway: its marker is there until the end
    ours.mkdir()
    (ours / "half.bin").write_text("x")
    (ours / MARKER).write_text(json.dumps(dead | {"output": "data"}))
    emptied = tmp_path / ".data.del-9999abcd"  # killed after its marker went: its claim says whose it was
    emptied.mkdir()
    (tmp_path / ".data.end-9999abcd").symlink_to(json.dumps(dead | {"output": "data"}))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert remove_stale_builds(target) == [ours, emptied] and not target.exists()
    gone = {ours.name, emptied.name, ".data.end-9999abcd"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) - gone)
    assert (users / "notes.txt").read_text() == "mine"


def test_a_users_empty_folders_named_as_our_hidden_ones_are_left(tmp_path):
    """A run at `out` removed any empty folder named as a removal of ours (`.out.del-` and 8 hex digits), taken for one
    killed after its marker went: a user's, made with no marker or claim of ours. Only one whose claim says a removal
    of ours, for this output, by a process now gone, emptied it is removed (with that claim)."""
    names = [".out.del-1234abcd", ".out.tmp-1234abcd", ".out.old-1234abcd", ".out.new-1234abcd", ".out.end-1234abcd"]
    for name in names:
        (tmp_path / name).mkdir()
    with output_folder(tmp_path / "out", "bench") as build:
        (build / "a.txt").write_text("ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "out"])
    dead = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": socket.gethostname()}
    emptied = tmp_path / ".out.del-5678abcd"  # a removal of ours killed after its marker went
    emptied.mkdir()
    (tmp_path / ".out.end-5678abcd").symlink_to(json.dumps(dead | {"output": "out"}))
    for tag, record in (("9999abcd", {"output": "out2"}), ("aaaaabcd", {"output": "out", "pid": os.getpid()})):
        (tmp_path / f".out.del-{tag}").mkdir()  # another output's, or a live run's: left
        (tmp_path / f".out.end-{tag}").symlink_to(json.dumps(dead | record))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert remove_stale_builds(tmp_path / "out") == [emptied]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) - {emptied.name, ".out.end-5678abcd"})


def test_a_removal_killed_after_its_marker_went_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """A removal's folder is empty once its marker went: killed before its rmdir, it was told from a user's empty
    folder by nothing. Its claim, made before the marker goes, says whose it is; the next run removes both."""
    target = tmp_path / "out"
    first_output(target)
    rmdir = Path.rmdir

    def killed_before_a_removals_rmdir(folder: Path) -> None:
        if ".del-" in folder.name:
            raise KeyboardInterrupt
        rmdir(folder)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rmdir", killed_before_a_removals_rmdir)
        with pytest.raises(KeyboardInterrupt), output_folder(target, "bench", overwrite=True) as build:
            (build / "a.txt").write_text("second")
    [doomed] = tmp_path.glob(".out.del-*")
    claim = doomed.with_name(doomed.name.replace(".del-", ".end-"))
    assert list(doomed.iterdir()) == [] and claim.is_symlink() and (target / "a.txt").read_text() == "second"
    assert remove_stale_builds(target) == []  # its writer, this process, still runs
    record = json.loads(os.readlink(claim)) | {"pid": 2**22 + 12345}  # as the killed process's
    claim.unlink()
    claim.symlink_to(json.dumps(record))
    assert remove_stale_builds(target) == [doomed] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_removal_two_runs_share_keeps_its_marker_while_a_folder_in_it_is_left(tmp_path, monkeypatch):
    """Two runs at one output remove one killed run's folder at once: the files of a folder in it the other run lists
    and removes first are not found, and that folder was taken for removed. Killed then, the other run left it, the
    marker went, and its folder stayed unmarked, not empty, beside the output for good. The marker stays while
    anything else does; the next run removes the rest."""
    dead = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": socket.gethostname()}
    doomed = tmp_path / ".out.del-1234abcd"
    (doomed / "sub").mkdir(parents=True)
    for name in "ab":
        (doomed / "sub" / name).write_text(name)
    (doomed / MARKER).write_text(json.dumps(dead | {"output": "out"}))
    (tmp_path / ".out.end-1234abcd").symlink_to(json.dumps(dead | {"output": "out"}))  # the other run's, killed
    rmtree = shutil.rmtree

    def the_other_run_removed_a_first(name, *args, dir_fd=None, **kwargs):
        os.unlink(os.path.join(name, "a"), dir_fd=dir_fd)  # then killed, before b
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "a")

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", the_other_run_removed_a_first)
        assert remove_stale_builds(tmp_path / "out") == []
    assert sorted(p.name for p in doomed.iterdir()) == [MARKER, "sub"]
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert remove_stale_builds(tmp_path / "out") == [doomed] and list(tmp_path.iterdir()) == []


def test_a_parent_folder_someone_else_made_as_a_run_started_is_left_when_the_run_fails(tmp_path, monkeypatch):
    """A failed run removes the missing parents it made for its output, while empty: they were listed before they were
    made, and one another process made meanwhile (a run at a sibling output, the user) was removed as the run's."""
    parent = tmp_path / "new"
    mkdir = Path.mkdir

    def made_first_by_someone_else(folder: Path, *args, **kwargs) -> None:
        if folder == parent and not parent.exists():
            mkdir(parent)
        mkdir(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", made_first_by_someone_else)
    with pytest.raises(RuntimeError, match="the command failed"), output_folder(parent / "a" / "out", "bench"):
        raise RuntimeError("the command failed")
    assert [p.name for p in tmp_path.iterdir()] == ["new"] and list(parent.iterdir()) == []


def test_a_users_empty_folder_of_the_name_drawn_to_move_an_output_aside_is_not_replaced(tmp_path, monkeypatch):
    """The previous output was renamed aside, then to a removal's name, each drawn at random: a rename onto an empty
    folder replaces it, and a user's folder of the name drawn (`.out.old-1234abcd`, `.out.del-1234abcd`) was lost."""
    target = tmp_path / "out"
    first_output(target)
    users = [tmp_path / ".out.old-1234abcd", tmp_path / ".out.del-1234abcd"]
    for folder in users:
        folder.mkdir()
    hidden, drawn = outputs._hidden, []

    def the_users_name_drawn_first(target: Path, kind: str) -> Path:
        if kind in (".old-", ".del-") and kind not in drawn:
            drawn.append(kind)
            return target.parent / f".out{kind}1234abcd"
        return hidden(target, kind)

    monkeypatch.setattr(outputs, "_hidden", the_users_name_drawn_first)
    with output_folder(target, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
    assert drawn == [".old-", ".del-"] and (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in users), "out"])


def test_a_users_folder_beside_a_killed_runs_claim_of_its_name_keeps_what_it_holds(tmp_path):
    """A run claims its build's name, then makes the folder: killed after a claim whose folder a user already had (the
    random name drawn again), it left a claim the next run took for that folder's, and deleted what the user's held. A
    claimed folder is removed only as it can be ours: empty, or holding the marker being written."""
    dead = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": socket.gethostname()}
    users = tmp_path / ".out.tmp-1234abcd"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (tmp_path / ".out.new-1234abcd").symlink_to(json.dumps(dead | {"output": "out"}))
    assert remove_stale_builds(tmp_path / "out") == [] and [p.name for p in tmp_path.iterdir()] == [users.name]
    assert (users / "notes.txt").read_text() == "mine"


def test_a_removal_by_a_live_run_is_left_to_it(tmp_path):
    """A run starting at an output deleted a live run's `.del-` folder (the previous output it had just replaced)
    under it: the live run's own deletion then met files already gone and failed with "the previous one could not be
    removed", exit 2. A removal whose writer still runs on this host is its own; only a killed one is cleaned."""
    record = {"created_by": "epas_lightning", "kind": "dataset", "pid": os.getpid(), "host": os.uname().nodename}
    live = tmp_path / ".data.del-1234abcd"
    live.mkdir()
    (live / "half.bin").write_text("x")
    (live / MARKER).write_text(json.dumps(record | {"output": "data"}))
    elsewhere = tmp_path / ".data.del-5678abcd"  # a run on another host sharing the file system: its own
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text(json.dumps(record | {"host": "another-host", "output": "data"}))
    assert remove_stale_builds(tmp_path / "data") == [] and (live / "half.bin").exists() and elsewhere.exists()


def test_a_run_starting_as_a_live_removal_empties_its_folder_does_not_fail_it(tmp_path, monkeypatch):
    """A removal's folder is empty once its marker went, and a run starting at that instant removes it (as a killed
    removal's): the live run's own rmdir then found it gone and failed its replacement with exit 2."""
    target = tmp_path / "out"
    with output_folder(target, "bench") as build:
        (build / "a.txt").write_text("first")
    unlink, started = os.unlink, []

    def unlink_then_another_run_starts(name, *, dir_fd=None):  # a removal's folder is emptied through its handle
        unlink(name, dir_fd=dir_fd)
        if name == MARKER and dir_fd is not None and not started:
            started.append(name)
            remove_stale_builds(target)

    monkeypatch.setattr(os, "unlink", unlink_then_another_run_starts)
    with output_folder(target, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
    assert started and (target / "a.txt").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out"]


def moved_aside_by_a_killed_run(tmp_path: Path, host: str | None = None) -> tuple[Path, Path]:
    """``(target, aside)``: our output ``out`` (``a.txt`` = "first") that a replacement killed on ``host`` (default:
    this one) moved aside to ``aside``, marked with its writer, a process that is gone."""
    target, aside = tmp_path / "out", tmp_path / ".out.old-deadbeef"
    first_output(target)
    os.replace(target, aside)
    host = host or os.uname().nodename
    record = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": host}
    (aside / MARKER).write_text(json.dumps(record))  # as the killed run marked it
    return target, aside


def test_a_previous_output_put_back_after_a_killed_replacement_names_no_host(tmp_path, monkeypatch):
    """A replacement killed after it moved the previous output aside leaves it marked with its process and host (so
    the next run knows the mover is gone): put back, it kept them, and a folder pushed to the Hub leaked the host."""
    monkeypatch.setattr("socket.gethostname", lambda: "bq-private-host")
    target, _ = moved_aside_by_a_killed_run(tmp_path, host="bq-private-host")
    assert remove_stale_builds(target) == [] and (target / "a.txt").read_text() == "first"
    assert json.loads((target / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "bench"}


def test_a_previous_output_put_back_at_start_refuses_the_run_before_its_work(tmp_path):
    """A previous output that a killed replacement had moved aside is put back as a run starts: without --overwrite
    that run did all its work (a whole prepare) before it found the output there and was refused."""
    target, _ = moved_aside_by_a_killed_run(tmp_path)
    worked = []
    refused = "^the output already exists .* choose a new folder or pass --overwrite$"
    with pytest.raises(OutputError, match=refused), output_folder(target, "bench") as build:
        worked.append(build)
    assert not worked and [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "first"


def test_two_runs_starting_together_put_a_killed_replacements_previous_output_back_once(tmp_path, monkeypatch):
    """Two runs starting at an output whose replacement was killed after it moved the previous output aside both put
    it back: the second found it gone, failed with "cannot create the output folder (no such file or directory)", exit
    2, and left its pending marker in the output."""
    target, aside = moved_aside_by_a_killed_run(tmp_path)
    pending_marker = outputs._pending_marker

    def then_the_other_run_puts_it_back(*args, **kwargs):
        written = pending_marker(*args, **kwargs)
        monkeypatch.setattr(outputs, "_pending_marker", pending_marker)
        remove_stale_builds(target)
        return written

    monkeypatch.setattr(outputs, "_pending_marker", then_the_other_run_puts_it_back)
    assert remove_stale_builds(target) == [] and (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in target.iterdir()) == [
        MARKER,
        "a.txt",
    ]


KILLED_AT_A_STEP = """
import os, signal, sys
from epas_lightning.outputs import output_folder

target, step = sys.argv[1], int(sys.argv[2])
if step >= 0:  # -1: the first output
    with output_folder(target, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
        steps = iter(range(step, -1, -1))
        for name in ("replace", "unlink"):  # killed outright (kill -9) before the step-th rename or removal
            def killing(*args, call=getattr(os, name), **kwargs):
                if next(steps) == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                return call(*args, **kwargs)
            setattr(os, name, killing)
else:
    with output_folder(target, "bench") as build:
        (build / "a.txt").write_text("first")
"""


@pytest.mark.parametrize("step", range(7))
def test_a_replacement_killed_at_any_step_is_cleaned_or_put_back_by_the_next_run(step, tmp_path):
    """A build switched to the finished marker before its rename, and a previous output moved aside before it was
    marked with its mover: killed there, the next run could tell neither from a live run's, so the build stayed
    forever and the previous output was never put back. Whatever step the kill hits, the next run leaves the target
    (the previous output or the new one) and nothing beside it."""
    target = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for at in (-1, step):
        run = subprocess.run([sys.executable, "-c", KILLED_AT_A_STEP, str(target), str(at)], env=env, timeout=60)
        assert run.returncode == (0 if at < 0 else -signal.SIGKILL)  # each step is reached: the removal's too
    remove_stale_builds(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "a.txt").read_text() in ("first", "second")
    assert json.loads((target / MARKER).read_text())["kind"] == "bench"


KILLED_WHILE_A_BUILD_IS_REMOVED = """
import os, signal, sys
from epas_lightning.outputs import MARKER, output_folder

real = os.unlink

def killing(path, *args, **kwargs):
    real(path, *args, **kwargs)
    if os.path.basename(path) == MARKER:  # the marker went first: killed before the rest (kill -9)
        os.kill(os.getpid(), signal.SIGKILL)

with output_folder(sys.argv[1], "bench") as build:
    for name in "abcdefgh":
        (build / name).write_text(name)
    os.unlink = killing
    raise KeyboardInterrupt  # Ctrl+C: the build is removed, and the kill comes midway
"""


def test_a_build_killed_while_it_is_removed_is_removed_by_the_next_run(tmp_path):
    """Removing a build (after Ctrl+C or SIGTERM, as a large dataset takes seconds) could delete its marker before its
    other files: killed then (a second Ctrl+C, a scheduler's kill -9 after its grace time), the rest stayed under the
    build's name, naming no writer, and no later run removed it."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    script = [sys.executable, "-c", KILLED_WHILE_A_BUILD_IS_REMOVED, str(tmp_path / "out")]
    assert subprocess.run(script, env=env, timeout=60).returncode == -signal.SIGKILL
    remove_stale_builds(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


KILLED_AS_A_BUILD_STARTS = """
import os, signal, sys
from pathlib import Path
from epas_lightning.outputs import output_folder

left = [int(sys.argv[2])]

def killing_after(call):
    def killing(*args, **kwargs):
        result = call(*args, **kwargs)
        if left and left[0] == 0:  # killed outright (kill -9) right after the step-th call that changed a folder
            os.kill(os.getpid(), signal.SIGKILL)
        if left:
            left[0] -= 1
        return result
    return killing

for name in ("mkdir", "symlink", "replace", "unlink"):
    setattr(os, name, killing_after(getattr(os, name)))
Path.write_text = killing_after(Path.write_text)
with output_folder(sys.argv[1], "bench") as build:
    left.clear()  # the build has started: the steps after are another test's
"""


@pytest.mark.parametrize("step", range(5))
def test_a_build_killed_as_it_starts_is_removed_by_the_next_run(step, tmp_path):
    """Killed between the mkdir of the hidden build folder and its first marker, a run left an unmarked folder that no
    later run could tell from a user's, so none removed it. Whatever step of starting a build the kill hits, the next
    run leaves nothing beside the output."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    script = [sys.executable, "-c", KILLED_AS_A_BUILD_STARTS, str(tmp_path / "out"), str(step)]
    assert subprocess.run(script, env=env, timeout=60).returncode == -signal.SIGKILL  # each step is reached
    assert list(tmp_path.iterdir())  # the kill left something
    remove_stale_builds(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_build_claimed_by_a_live_run_another_output_or_no_run_of_ours_is_left(tmp_path):
    """A claim says a build is ours before its folder holds a marker: only a claim of ours, for this output, whose
    writer is gone lets a later run remove the folder it names."""
    record = {"created_by": "epas_lightning", "kind": "bench", "pid": os.getpid(), "host": os.uname().nodename}
    claims = {
        "1234abcd": record | {"output": "out"},  # a live run's, this instant between its mkdir and its marker
        "5678abcd": record | {"output": "out2", "pid": 2**22 + 12345},  # a killed build of another output
        "9999abcd": {"created_by": "someone", "output": "out", "pid": 2**22 + 12345},
    }
    for tag, claim in claims.items():
        (tmp_path / f".out.tmp-{tag}").mkdir()
        (tmp_path / f".out.new-{tag}").symlink_to(json.dumps(claim))
    (tmp_path / ".out.tmp-0000abcd").mkdir()
    (tmp_path / ".out.new-0000abcd").write_text(json.dumps(record | {"output": "out", "pid": 2**22 + 12345}))  # a file
    before = sorted(p.name for p in tmp_path.iterdir())
    assert remove_stale_builds(tmp_path / "out") == [] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_build_on_a_file_system_without_links_starts_and_leaves_nothing(tmp_path, monkeypatch):
    """The link that says a build is ours before its folder holds a marker: a file system that has none (FAT, some
    network mounts) builds as before."""

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(args[1]))

    monkeypatch.setattr(os, "symlink", no_links)
    first_output(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "first"


def test_ctrl_c_while_the_new_output_takes_the_old_ones_place_puts_the_old_one_back(tmp_path, monkeypatch):
    """Interrupted between moving the previous output aside and renaming the build into place, the run removed its
    build and left the target missing, the previous output hidden beside it until a later run at the same target."""
    target = tmp_path / "out"
    with output_folder(target, "bench") as build:
        (build / "a.txt").write_text("first")
    real, interrupts = os.replace, [KeyboardInterrupt()]

    def interrupted(source, destination):
        if Path(destination) == target and Path(source).name.startswith(".out.tmp-") and interrupts:
            raise interrupts.pop()
        real(source, destination)

    with pytest.raises(KeyboardInterrupt), output_folder(target, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
        monkeypatch.setattr(os, "replace", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "first"
    assert json.loads((target / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "bench"}


def first_output(target: Path, kind: str = "bench") -> None:
    """An output of ours at ``target``, holding ``a.txt`` = "first", for a test to replace."""
    with output_folder(target, kind) as build:
        (build / "a.txt").write_text("first")


def replace_failing(when, code: int):
    """``os.replace`` that raises the OS error ``code`` where ``when(source, destination)``, else renames."""
    real = os.replace

    def replace(source, destination):
        if when(source, destination):
            raise OSError(code, os.strerror(code), str(source))
        real(source, destination)

    return replace


def test_a_previous_output_that_cannot_be_moved_aside_keeps_a_marker_naming_no_host(tmp_path, monkeypatch):
    """Marked with this process and host to be moved aside, it kept that marker when the move failed (a busy mount
    point, a folder others may not rename): a finished folder naming the host."""
    monkeypatch.setattr("socket.gethostname", lambda: "bq-private-host")
    target = tmp_path / "out"
    first_output(target)
    busy = replace_failing(lambda source, destination: Path(source) == target, errno.EBUSY)
    move_aside = pytest.raises(OutputError, match=r"^cannot move the previous output aside \(device or resource busy\)")
    with move_aside, output_folder(target, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
        monkeypatch.setattr(os, "replace", busy)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "first"
    assert json.loads((target / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "bench"}


def test_a_full_disk_at_the_builds_first_marker_leaves_nothing(tmp_path, monkeypatch):
    """The build's first marker was written outside the cleanup: a full disk there left the empty hidden build, naming
    no writer (so no later run removed it), and raised the bare OSError."""
    real = Path.write_text

    def full(path: Path, *args, **kwargs):
        if path.name.startswith(MARKER):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match="^no space left on the device"), output_folder(tmp_path / "out", "bench"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_a_builds_first_file_leaves_nothing_though_the_removals_claim_finds_no_room(
    tmp_path, monkeypatch
):
    """A disk full at the build's first file (created empty, its write refused) frees no room as the build is emptied:
    the link that claims a removal's folder before its marker goes (as much as a file where its text is long) was
    refused too, and the build stayed, marked, under a removal's name, while the line said nothing was left behind."""
    real = os.symlink

    def full(text, link, *args, **kwargs):
        if ".end-" in os.fspath(link):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(link))
        real(text, link, *args, **kwargs)

    no_space = pytest.raises(OutputError, match="^no space left on the device")
    with no_space, output_folder(tmp_path / "out", "bench") as build:
        (build / "a.bin").touch()
        monkeypatch.setattr(os, "symlink", full)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(build / "a.bin"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EACCES, "check the permissions of the folder"),
        (errno.EROFS, "the file system is read-only"),
        (errno.ENAMETOOLONG, "choose a shorter output path"),
        (errno.EIO, "the disk or its file system failed"),
    ],
)
def test_an_os_error_of_a_commands_own_write_into_its_build_is_one_line_and_leaves_nothing(code, fix, tmp_path):
    """Only the steps of output_folder's own were one line: an OS error other than a full disk while a command wrote a
    file into its build (a folder made read-only meanwhile, a failing disk) was a traceback. Whether raised as an
    OSError naming the file, or quoted by a worker process's traceback or a Rust library (safetensors), it is one line
    naming the output and what to do, and nothing is left."""
    target = tmp_path / "out"
    reason = os.strerror(code).lower()
    with pytest.raises(OutputError) as raised, output_folder(target, "bench") as build:
        raise OSError(code, os.strerror(code), str(build / "sub" / "a.bin"))
    assert str(raised.value).startswith(f"cannot write sub/a.bin into the output folder being built ({reason}) — ")
    assert f" — --output {target} — {fix}" in str(raised.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError) as raised, output_folder(target, "dataset") as build:
        crash = f"Traceback ...\nOSError: [Errno {code}] {os.strerror(code)}: '{build}/train/chunk-0-0.bin'\n"
        raise RuntimeError(f"Tokenizing the train split failed in a worker:\n{crash}")
    assert str(raised.value).startswith(
        f"cannot write train/chunk-0-0.bin into the output folder being built ({reason})"
    )
    assert list(tmp_path.iterdir()) == []
    serializing = f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})"
    with pytest.raises(OutputError) as raised, output_folder(target, "hf-export"):
        raise RuntimeError(serializing)  # as safetensors' SafetensorError says it, naming no file
    assert str(raised.value).startswith(f"cannot write into the output folder being built ({reason}) — --output")
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_reading_an_input_while_building_is_not_said_as_the_outputs(tmp_path):
    """A command reads its inputs while it builds (a prepare its corpus, analyze its data): their errors are theirs
    to say, not a write into the output; an error that is not about the location (a missing file of the build: a bug)
    keeps its traceback too."""
    target, corpus = tmp_path / "out", tmp_path / "corpus.txt"
    quoted = f"OSError: [Errno {errno.EACCES}] Permission denied: '{corpus}'"
    for error in (
        OSError(errno.EACCES, "Permission denied", str(corpus)),
        RuntimeError(f"Tokenizing the train split into {target}/train failed: {quoted}"),
        OSError(errno.ENOENT, "No such file or directory", str(target / "a.bin")),
    ):
        with pytest.raises(type(error)) as raised, output_folder(target, "bench"):
            raise error
        assert raised.value is error and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["o" * 255, "é" * 127, "oé" * 85, "run[1]"])
def test_any_legal_output_name_builds_and_replaces(name, tmp_path):
    """A name of 242+ bytes made the hidden build folder's name longer than 255 bytes: 'cannot create the output
    folder (file name too long) — choose a writable location'. A name with [ ] never matched its own stale builds. A
    long name was cut at a byte count: half of a UTF-8 character, a name no message could print."""
    target = tmp_path / name
    for overwrite in (False, True):
        with output_folder(target, "bench", overwrite=overwrite) as build:
            assert len(os.fsencode(build.name)) <= 255 and build.name.encode("utf-8")
            (build / "a.txt").write_text(str(overwrite))
    assert [p.name for p in tmp_path.iterdir()] == [name] and (target / "a.txt").read_text() == "True"
    with pytest.raises(RuntimeError), output_folder(target, "bench", overwrite=True) as build:
        record = json.loads((build / MARKER).read_text())
        (build / MARKER).write_text(json.dumps(record | {"pid": 2**22 + 12345}))  # as if its process were killed
        shutil.copytree(build, build.with_name(build.name[:-8] + "deadbeef"))
        raise RuntimeError("killed")
    assert len(remove_stale_builds(target)) == 1 and [p.name for p in tmp_path.iterdir()] == [name]


def test_a_failed_build_leaves_nothing_and_the_old_output_intact(tmp_path):
    with output_folder(tmp_path / "out", "bench") as build:
        (build / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), output_folder(tmp_path / "out", "bench", overwrite=True) as build:
        (build / "b.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError), output_folder(tmp_path / "new" / "er" / "out", "bench"):
        raise RuntimeError("killed")  # the parent folders it made were left, empty
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_while_an_output_is_built_removes_the_build(tmp_path):
    """SIGTERM (kill, a scheduler's stop) ended consolidate or export at once, leaving the hidden build folder (as large
    as the model) until a later run at the same target; now it is removed, as after Ctrl+C, and the command says so."""
    script = f"""
import os, signal, sys
from epas_lightning.cli import _run
from epas_lightning.outputs import output_folder

def build(argv):
    with output_folder({str(tmp_path / "out")!r}, "bench") as folder:
        (folder / "half.bin").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        (folder / "more.bin").write_bytes(b"not reached")

import epas_lightning.cli
epas_lightning.cli.dispatch = build
sys.exit(_run(["consolidate"], False))
"""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (143, "interrupted: consolidate stopped (SIGTERM)\n")
    assert list(tmp_path.iterdir()) == []
    outer = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # in this process: a handler for the build alone
    try:
        with output_folder(tmp_path / "kept", "bench"):
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and (tmp_path / "kept").is_dir()
    finally:
        signal.signal(signal.SIGTERM, outer)


def test_an_output_that_cannot_be_created_is_a_user_error(tmp_path):
    """An output under a file: one line naming that file, before any work (it was "cannot create the output folder
    (File exists)", once the work was done)."""
    (tmp_path / "file").write_text("x")
    under_a_file = pytest.raises(
        OutputError, match=rf"^{tmp_path / 'file'} is a file, not a folder — --output .*file/out"
    )
    with under_a_file, output_folder(tmp_path / "file" / "out", "dataset"):
        pass


def test_a_link_loop_as_input_and_the_root_or_a_dash_as_output_are_one_line(tmp_path, capsys, monkeypatch):
    """The check that an output lies apart from its inputs raised on a link loop (``Path.resolve``: a RuntimeError
    traceback), and the search for an output's nearest existing folder on the root, which has none (StopIteration);
    `--output -` made a folder named "-"."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for command in ("consolidate", "export"):
        argv = [command, "--checkpoint", str(tmp_path / "a"), "--output", str(tmp_path / "out")]
        assert "checkpoint does not exist" in one_line_error(capsys, argv)
    argv = ["consolidate", "--checkpoint", str(tmp_path / "x.ckpt"), "--output", "/"]
    assert "the output contains the input" in one_line_error(capsys, argv)
    monkeypatch.chdir(tmp_path)
    says = "the output is a folder, and '-' is no stdout here — --output - — name the folder to write"
    for command in ("consolidate", "export"):  # a folder named "-" was made
        assert says in one_line_error(capsys, [command, "--checkpoint", str(tmp_path / "x.ckpt"), "--output", "-"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_output_that_appears_while_building_is_not_replaced(tmp_path):
    """A second run (or the user) created it meanwhile: without --overwrite it is not ours to replace."""
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists"), output_folder(target, "dataset") as build:
        (build / "data.bin").write_text("ours")
        target.mkdir()
        (target / "precious.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def small_checkpoint(tmp_path: Path, tiny_corpus: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=VOCAB, block_size=32)
    model = Llama(config)
    model.set_shared_layers([3])
    return save_consolidated(model, tmp_path / "ckpt", tiny_corpus / "tokenizer.json")


def test_exported_weights_are_as_readable_as_the_umask_allows(small_checkpoint, tmp_path):
    """safetensors writes its file 0600: a teammate could not load an export or a consolidated folder we shared."""
    old = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(small_checkpoint), "--output", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}["model.safetensors"] == 0o644


def test_a_file_system_that_refuses_chmod_keeps_the_finished_output_with_a_warning(
    small_checkpoint, tmp_path, capsys, monkeypatch
):
    """A network or FUSE mount that refuses ``chmod`` failed the whole export after every weight was written (a
    traceback, then one line with exit 2), and a replaced output was put back: the work was lost for a permission
    that only matters to others. The output is kept, complete; one warning says which files may be the owner's only."""
    out = tmp_path / "hf"
    with output_folder(out, "hf-export") as previous:
        (previous / "a.txt").write_text("first")

    def refused(path, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(path))

    monkeypatch.setattr(Path, "chmod", refused)
    argv = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out), "--overwrite"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and not (out / "a.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "refused to change their permissions" in line]
    assert len(warned) == 1 and f"run chmod on {out} yourself" in warned[0], warned


def test_a_finished_export_names_no_host_process_or_local_path_and_stays_ours(small_checkpoint, tmp_path, monkeypatch):
    """Its marker held the writer's process id and host name (socket.gethostname()), which only a hidden folder being
    built needs, and huggingface_hub's upload_folder pushes dotfiles: the host leaked to the Hub. A finished folder's
    marker says only whose and what it is; one that still has them (written before) is ours all the same."""
    monkeypatch.setattr("socket.gethostname", lambda: "bq-private-host")
    out = tmp_path / "hf"
    base = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out)]
    assert main(base) == 0
    assert json.loads((out / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "hf-export"}
    for file in out.rglob("*"):
        data = file.read_bytes()
        assert b"bq-private-host" not in data and os.fsencode(tmp_path) not in data, file
    record = {"created_by": "epas_lightning", "kind": "hf-export", "pid": 1, "host": "bq-private-host"}
    (out / MARKER).write_text(json.dumps(record))  # an export of an earlier version
    assert main([*base, "--overwrite"]) == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_export_is_atomic_and_a_reexport_leaves_no_stale_file(small_checkpoint, tmp_path, capsys, monkeypatch):
    from epas_lightning.hf import export as export_module

    out = tmp_path / "hf"
    base = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out)]
    real = export_module.export_tokenizer
    monkeypatch.setattr(export_module, "export_tokenizer", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        main(base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written that looks loadable
    monkeypatch.setattr(export_module, "export_tokenizer", real)
    # a full disk is one line (safetensors reported it in a traceback, as a SafetensorError)
    from safetensors import SafetensorError

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(full))
        assert "no space left on the device (or quota)" in one_line_error(capsys, base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert main(base) == 0 and (out / "modeling_epas_llama.py").is_file()
    capsys.readouterr()
    assert main([*base, "--sharing-layers", "0"]) == 2  # exists: refuse without --overwrite
    assert main([*base, "--sharing-layers", "0", "--overwrite"]) == 0
    assert "stock LlamaForCausalLM" in capsys.readouterr().out
    assert not (out / "modeling_epas_llama.py").exists() and not (out / "configuration_epas_llama.py").exists()
    user = tmp_path / "user"
    user.mkdir()
    err = one_line_error(
        capsys, ["export", "--checkpoint", str(small_checkpoint), "--output", str(user), "--overwrite"]
    )
    assert "replaces only a folder epas_lightning wrote as its hf-export output" in err


def test_an_os_error_of_an_exports_own_writes_is_one_line_and_leaves_nothing(small_checkpoint, tmp_path, capsys):
    """export's own writes into its build (safetensors' weights, config.json) failing with an OS error other than a
    full disk were tracebacks."""
    from safetensors import SafetensorError

    from epas_lightning.hf import export as export_module

    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out)]
    refused = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    real = Path.write_text

    def config_read_only(path: Path, *args, **kwargs):
        if path.name == "config.json":
            read_only.filename = str(path)
            raise read_only
        return real(path, *args, **kwargs)

    def failing_disk(path: Path, *args, **kwargs):  # a write's error names no file, an open's does
        if path.name == "generation_config.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(path, *args, **kwargs)

    for owner, name, failing, says in (
        (export_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(refused), "write into"),
        (Path, "write_text", config_read_only, "write config.json into"),
        (Path, "write_text", failing_disk, "write into"),
    ):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(owner, name, failing)
            line = one_line_error(capsys, argv)
        assert (
            line.startswith(f"error: cannot {says} the output folder being built (") and f"— --output {out} —" in line
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def failing_call(step: str, out: Path):
    """``(owner, name, replacement)``: the OS call of :func:`failing_at` and a stand-in for it that raises its error
    when the step comes, and otherwise calls through."""
    owner, name, when, code = failing_at(step, out)
    real = getattr(owner, name)

    def fails(*args, **kwargs):
        if when(*args, **kwargs):
            raise OSError(code, os.strerror(code), str(args[0]))
        return real(*args, **kwargs)

    return owner, name, fails


def failing_at(step: str, out: Path):
    """``(owner, name, when, errno)``: the OS call that fails at ``step`` of writing ``out``, and when it does."""
    build, aside = f".{out.name}.tmp-", f".{out.name}.old-"
    return {
        "the build's mkdir": (Path, "mkdir", lambda path, *a, **k: path.name.startswith(build), errno.EACCES),
        "the build's marker": (
            Path, "write_text", lambda path, *a, **k: path.parent.name.startswith(build), errno.EROFS
        ),
        "marking the previous output": (
            Path, "write_text", lambda path, *a, **k: path.parent == out and path.name.startswith(MARKER), errno.EACCES
        ),
        "moving the previous output aside": (
            os, "replace", lambda source, destination: Path(source) == out, errno.EXDEV
        ),
        "renaming the build into place": (
            os, "replace", lambda source, destination: Path(destination) == out and Path(source).name.startswith(build),
            errno.EBUSY
        ),
        "renaming the build into place, raced": (
            os, "replace", lambda source, destination: Path(destination) == out and Path(source).name.startswith(build),
            errno.ENOTEMPTY
        ),
        "finishing the marker in place": (
            os, "replace", lambda source, destination: Path(destination) == out / MARKER, errno.EACCES
        ),
        "removing the previous output": (
            os, "replace", lambda source, destination: Path(source).name.startswith(aside), errno.EACCES
        ),
        "removing the previous output, a busy file": (
            # a file of the folder being removed (which is emptied through its handle), by name
            os, "unlink", lambda name, *a, dir_fd=None, **k: dir_fd is not None and name != MARKER, errno.EBUSY,
        ),
    }[step]  # fmt: skip


@pytest.mark.parametrize(
    ("step", "says"),
    [
        ("the build's mkdir", "cannot create the output folder (permission denied) — --output {out} — check the"),
        ("the build's marker", "cannot write into the output folder being built (read-only file system) — --output"),
        ("marking the previous output", "cannot mark the previous output as being replaced (permission denied)"),
        ("moving the previous output aside", "cannot move the previous output aside (invalid cross-device link) — --"),
        ("renaming the build into place", "cannot rename the finished output into place (device or resource busy)"),
        ("renaming the build into place, raced", "into place (directory not empty) — --output {out} — something else"),
        ("finishing the marker in place", "output is in place, but its marker could not be finished (permission"),
    ],
)
def test_an_os_error_at_any_step_of_writing_an_output_is_one_line_and_loses_nothing(
    step, says, small_checkpoint, tmp_path, capsys, monkeypatch
):
    """An OS error other than a full disk while the output folder was built or replaced (a read-only or foreign-owned
    folder, a read-only mount, a busy mount point or a file open on a network file system, an overlay that cannot
    rename a folder, another writer's race) was a Python traceback. It is one line saying what failed, where and what
    to do; a previous output is back in place, or left where the line says, marked for the next run."""
    out = tmp_path / "out"
    replacing = not step.endswith(("raced", "in place"))
    if replacing:
        with output_folder(out, "hf-export") as previous:
            (previous / "a.txt").write_text("first")
    owner, name, fails = failing_call(step, out)
    argv = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out), *(["--overwrite"] * replacing)]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, fails)
        assert says.format(out=out, tmp=tmp_path) in one_line_error(capsys, argv)
    left = sorted(p.name for p in tmp_path.iterdir())
    if step == "finishing the marker in place":
        assert left == ["ckpt", "out"] and json.loads((out / MARKER).read_text())["kind"] == "hf-export"
    else:
        assert left == (["ckpt", "out"] if replacing else ["ckpt"])
    if replacing:
        assert (out / "a.txt").read_text() == "first"
        assert json.loads((out / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "hf-export"}


@pytest.mark.parametrize(
    ("step", "leftover"),
    [("removing the previous output", ".out.old-"), ("removing the previous output, a busy file", ".out.del-")],
)
def test_a_previous_output_that_cannot_be_removed_after_its_replacement_is_a_warning(
    step, leftover, small_checkpoint, tmp_path, capsys, monkeypatch
):
    """The removal of the previous output, once the new one had taken its place, failed the command with exit 2: its
    work was done and the new output complete. It is one warning naming the folder left, and exit 0; the folder, marked
    ours, is removed by the next run once this process is gone."""
    out = tmp_path / "out"
    with output_folder(out, "hf-export") as previous:
        (previous / "a.txt").write_text("first")
    owner, name, fails = failing_call(step, out)
    argv = ["export", "--checkpoint", str(small_checkpoint), "--output", str(out), "--overwrite"]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, fails)
        assert main(argv) == 0
    (hidden,) = {p.name for p in tmp_path.iterdir()} - {"ckpt", "out"}
    warned = [line for line in capsys.readouterr().err.splitlines() if "could not be removed" in line]
    assert len(warned) == 1 and f"{tmp_path / hidden} — remove it yourself" in warned[0], warned
    assert hidden.startswith(leftover) and (out / "model.safetensors").is_file() and not (out / "a.txt").exists()
    assert json.loads((out / MARKER).read_text()) == {"created_by": "epas_lightning", "kind": "hf-export"}
    record = json.loads((tmp_path / hidden / MARKER).read_text())
    (tmp_path / hidden / MARKER).write_text(json.dumps(record | {"pid": 2**22 + 12345}))  # once this process ends
    assert remove_stale_builds(out) == [tmp_path / hidden]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_an_output_folder_that_cannot_be_created_leaves_no_parent_folder_it_made(tmp_path, monkeypatch):
    """The parents made for an output stayed, empty, when its hidden build folder could not be created (a failure
    later on removed them)."""
    real = Path.mkdir

    def refused(path: Path, *args, **kwargs):
        if path.name.startswith(".out.tmp-"):
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    refused_line = pytest.raises(OutputError, match=r"^cannot create the output folder \((?i:permission denied)\)")
    with refused_line, output_folder(tmp_path / "new" / "er" / "out", "bench"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_previous_output_that_cannot_be_put_back_is_named_and_put_back_by_the_next_run(tmp_path, monkeypatch):
    """A replacement whose build could not take the target's place (a folder made read-only meanwhile) puts the
    previous output back; where that fails as well, the line names where it is, and the next run puts it back."""
    out = tmp_path / "out"
    first_output(out)
    real = os.replace
    refused = replace_failing(lambda source, destination: Path(destination) == out, errno.EACCES)
    with pytest.raises(OutputError) as raised, output_folder(out, "bench", overwrite=True) as build:
        (build / "a.txt").write_text("second")
        monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(os, "replace", real)
    (aside,) = tmp_path.iterdir()
    assert str(raised.value) == (
        f"cannot put the previous output back (permission denied) — {aside} — rename it to {out} yourself (the next "
        "run at this output also does)"
    )
    record = json.loads((aside / MARKER).read_text())
    assert (aside / "a.txt").read_text() == "first" and record["output"] == "out"
    (aside / MARKER).write_text(json.dumps(record | {"pid": 2**22 + 12345}))  # as once this process is gone
    assert remove_stale_builds(out) == [] and (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_previous_output_that_cannot_be_put_back_as_a_run_starts_is_named(tmp_path, monkeypatch):
    """A run starting after a killed replacement puts the previous output it had moved aside back; where that failed,
    the line said "cannot create the output folder" and named the target, not the hidden folder holding the output."""
    target, aside = moved_aside_by_a_killed_run(tmp_path)
    monkeypatch.setattr(
        os, "replace", replace_failing(lambda source, destination: Path(destination) == target, errno.EACCES)
    )
    with pytest.raises(OutputError) as raised, output_folder(target, "bench", overwrite=True):
        pass
    assert str(raised.value) == (
        f"cannot put the previous output back (permission denied) — {aside} — rename it to {target} yourself (the next "
        "run at this output also does)"
    )
    assert [p.name for p in tmp_path.iterdir()] == [aside.name] and (aside / "a.txt").read_text() == "first"


@pytest.mark.parametrize("previous", [False, True])
def test_a_build_that_cannot_be_renamed_across_devices_is_not_told_to_move_an_output_away(
    previous, tmp_path, monkeypatch
):
    """EXDEV advised "move it away yourself" at any rename: with no previous output, or with one already put back
    after the build could not take its place, there is nothing to move away. Only a previous output that cannot be
    moved aside is the user's to move."""
    out = tmp_path / "out"
    if previous:
        first_output(out)
    build_into_place = replace_failing(
        lambda source, destination: Path(destination) == out and ".out.tmp-" in str(source), errno.EXDEV
    )
    with pytest.raises(OutputError) as raised, output_folder(out, "bench", overwrite=previous) as build:
        (build / "a.txt").write_text("second")
        monkeypatch.setattr(os, "replace", build_into_place)
    assert str(raised.value).startswith("cannot rename the finished output into place (invalid cross-device link)")
    assert "move" not in str(raised.value).split(" — ")[-1], raised.value
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if previous else [])
    if not previous:
        first_output(out)
    aside = replace_failing(lambda source, destination: Path(source) == out, errno.EXDEV)
    with pytest.raises(OutputError) as raised, output_folder(out, "bench", overwrite=True):
        monkeypatch.setattr(os, "replace", aside)
    assert str(raised.value).startswith("cannot move the previous output aside (invalid cross-device link)")
    assert "move the previous output away yourself" in str(raised.value).split(" — ")[-1]


def test_consolidate_copies_only_a_real_tokenizer(tmp_path, tiny_corpus, caplog):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    config = LlamaConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, block_size=32)
    state = {f"model.{k}": v for k, v in Llama(config).state_dict().items()}

    def checkpoint(name: str, tokenizer: Path) -> Path:
        path = tmp_path / name
        record = {"path": str(tokenizer), "bos_id": 0, "eos_id": 1}
        torch.save({"state_dict": state, "model_config": config.to_dict(), "tokenizer": record}, path)
        return path

    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = consolidate(checkpoint("a.ckpt", secret), tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", "model.safetensors"]
    assert "tokenizer" not in json.loads((out / "config.json").read_text())
    # it says so (it said nothing, and export of the folder then blamed the checkpoint for naming none)
    assert f"The tokenizer the checkpoint names ({secret}) is not a tokenizer: consolidated weights" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="epas_lightning"):
        consolidate(checkpoint("gone.ckpt", tmp_path / "gone" / "tokenizer.json"), tmp_path / "g")
    assert f"is gone ({tmp_path / 'gone' / 'tokenizer.json'}): consolidated weights and config only" in caplog.text
    caplog.clear()
    out = consolidate(checkpoint("b.ckpt", tiny_corpus / "tokenizer.json"), tmp_path / "b")
    assert (out / "tokenizer.json").read_bytes() == (tiny_corpus / "tokenizer.json").read_bytes()
    assert not caplog.text


def test_weights_only_warning_names_the_tokenizer_path_as_it_is(tmp_path, caplog):
    """consolidate and export name the gone tokenizer's path in its own case (they lowercased the whole line)."""
    from epas_lightning.hf.export import export

    config = LlamaConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, block_size=16)
    state = {f"model.{k}": v for k, v in Llama(config).state_dict().items()}
    gone = tmp_path / "Run" / "Tokenizer.json"
    record = {"path": str(gone), "bos_id": 0, "eos_id": 1}
    torch.save({"state_dict": state, "model_config": config.to_dict(), "tokenizer": record}, tmp_path / "a.ckpt")
    with caplog.at_level("WARNING", logger="epas_lightning"):
        consolidate(tmp_path / "a.ckpt", tmp_path / "consolidated")
        export(tmp_path / "a.ckpt", tmp_path / "exported")
    assert caplog.text.count(f"The tokenizer the checkpoint was trained with is gone ({gone})") == 2


# ---------------------------------------------------------------------------------------------------------------------
# Resume says what it does: the LR schedule follows the configured max_steps
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_with_a_new_max_steps_follows_the_new_horizon(tiny_corpus, tmp_path, caplog):
    """The configuration resumed with wins: the LR schedule's shape, and the optimizer's other settings (loading the
    checkpoint's optimizer state had put back its weight decay and betas, silently)."""

    def run(max_steps: int, ckpt_path: Path | None = None, **adamw) -> tuple[Recorder, torch.optim.Optimizer]:
        torch.manual_seed(0)
        module = EPASModule(
            LlamaConfig.from_name("debug", block_size=32),
            optimizer=lambda groups: torch.optim.AdamW(groups, lr=3e-4, **adamw),
            lr_scheduler=lambda optimizer: WarmupCosineLR(optimizer, warmup_steps=2),
        )
        recorder = Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        trainer = cpu_trainer(tmp_path, max_steps, [recorder, checkpoint])
        data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return recorder, trainer.optimizers[0]

    run(8, weight_decay=0.1)
    with caplog.at_level("INFO", logger="epas_lightning"):
        resumed, optimizer = run(16, tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weight_decay=0.05, betas=(0.8, 0.9))
    assert "max_steps 8 -> 16" in caplog.text
    reference = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=3e-4), warmup_steps=2, max_steps=16)
    for step in range(4, 16):
        assert resumed.lrs[step] == pytest.approx(3e-4 * reference.lr_factor(step)), step
    assert [(g["weight_decay"], g["betas"]) for g in optimizer.param_groups] == [(0.05, (0.8, 0.9)), (0.0, (0.8, 0.9))]
    assert "optimizer: resumed with the configured betas (0.9, 0.999) -> (0.8, 0.9), weight_decay 0.1 -> 0.05" in (
        caplog.text
    )


def test_a_resumed_run_never_warms_up_again(caplog):
    """The default warmup is min(100, max_steps // 10): resuming at step 60 with a larger max_steps must not put the
    run back into a warmup that now lasts 100 steps."""
    before = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=50, max_steps=500)
    for _ in range(60):
        before.optimizer.step()
        before.step()
    after = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=100, max_steps=2000)
    with caplog.at_level("INFO", logger="epas_lightning"):
        after.load_state_dict(before.state_dict())
    assert after.warmup_steps == 50 and "warmup_steps 50 kept" in caplog.text
    lr_before, lr_after = before.get_last_lr()[0], after.get_last_lr()[0]  # the jump a new max_steps makes is said
    assert f"max_steps 500 -> 2000): the learning rate goes from {lr_before:.2e} to {lr_after:.2e}" in caplog.text
    assert after.optimizer.param_groups[0]["lr"] > 0.99  # cosine at its start, not 61/101 of the way up
    early = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=100, max_steps=2000)
    early.load_state_dict(WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=50).state_dict())
    assert early.warmup_steps == 100  # still warming up at step 0: the new warmup applies


def test_a_resumed_schedule_is_said_once_not_by_every_rank(caplog, monkeypatch):
    """Every rank of a distributed run loads the schedule: only the first says how it changed."""
    from lightning.pytorch.utilities import rank_zero_only

    saved = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=5, max_steps=50).state_dict()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level("INFO", logger="epas_lightning"):
        WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=5, max_steps=80).load_state_dict(saved)
    assert "LR schedule" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# User mistakes end in one line
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_data_dir_bad_schedule_and_truncated_checkpoints_are_one_line(tmp_path, capsys, monkeypatch, evil):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["fit", "--config", DEBUG, "--data.data_dir", str(tmp_path / "nowhere")])
    assert "data directory does not exist — data.data_dir" in err
    assert "sharing.target" in one_line_error(capsys, ["fit", "--config", DEBUG, "--sharing.target", "5"])
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(evil.file.read_bytes()[:100])
    assert str(truncated) in one_line_error(capsys, ["fit", "--config", DEBUG, "--ckpt_path", str(truncated)])
    for command, extra in (("export", ["--output", str(tmp_path / "o")]), ("evaluate", []), ("serve", [])):
        assert "corrupt or truncated" in one_line_error(capsys, [command, "--checkpoint", str(truncated), *extra])
    text = tmp_path / "notes.ckpt"  # not a pickle at all: the unpickler fails with a KeyError, not an UnpicklingError
    text.write_text("hello")
    assert "not a checkpoint file" in one_line_error(capsys, ["generate", "--checkpoint", str(text), "--prompt", "x"])
    (tmp_path / "zero.ckpt").touch()  # said "(EOFError: )"
    assert "(EOFError: the file is empty)" in one_line_error(
        capsys, ["evaluate", "--checkpoint", str(tmp_path / "zero.ckpt")]
    )
    assert "model.init_from" in one_line_error(capsys, ["fit", "--config", DEBUG, "--model.init_from", str(truncated)])
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, ["fit", "--config", DEBUG, "--model.init_from", str(tmp_path / "empty")])
    assert f"not a checkpoint — model.init_from {tmp_path / 'empty'}" in err
    torch.save({"weights": 1}, tmp_path / "plain.pt")  # a safe pickle, but not a checkpoint of fit
    err = one_line_error(capsys, ["fit", "--config", DEBUG, "--model.init_from", str(tmp_path / "plain.pt")])
    assert f"(no state_dict) — model.init_from {tmp_path / 'plain.pt'}" in err
    assert "unknown command 'predict'" in one_line_error(capsys, ["predict"])
    assert "unknown command 'fi' (did you mean fit?)" in one_line_error(capsys, ["fi"])
    err = one_line_error(capsys, ["fit", "--config", DEBUG, "--model.config.n_layer=0"])  # checked inside a link
    assert err.startswith("error: model sizes must be positive integers, got {'n_layer': 0} — model.config")
    # what Lightning refuses while building the trainer is one line too
    fsdp_on_cpu = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=fsdp"]
    assert "requires a GPU accelerator" in one_line_error(capsys, ["fit", "--config", DEBUG, *fsdp_on_cpu])
    if not torch.cuda.is_available():
        err = one_line_error(capsys, ["fit", "--config", "tinyllama-1gpu"])
        assert err.startswith("error: no CUDA GPU is visible to this process — trainer.accelerator: gpu")


def test_an_unreadable_checkpoint_says_permission_denied_not_corrupt(tmp_path, monkeypatch):
    from epas_lightning import safe_load

    def denied(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(safe_load.torch, "load", denied)  # root reads any file, so a chmod cannot show it here
    with pytest.raises(CheckpointError, match="permission denied .* make it readable"):
        safe_load.load_torch_file(tmp_path / "last.ckpt")


def test_a_sharded_checkpoint_with_a_truncated_or_missing_shard_is_one_line(tmp_path, capsys, monkeypatch):
    """Every shard file the metadata names is checked (there, at full length) before anything reads one. A resume
    whose missing shard did not hold the sharing mask got past the checks and failed inside torch.distributed.checkpoint
    on one rank: a traceback from every rank, exit 1."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from epas_lightning.safe_dcp import read_dcp_metadata

    model = Llama(LlamaConfig.from_name("debug"))
    sharded = tmp_path / "last.ckpt"
    state = {"model." + key: t for key, t in model.state_dict().items()}
    writer = FileSystemWriter(sharded, single_file_per_rank=False)  # one file per tensor: several shard files
    dcp_save({"state_dict": state}, storage_writer=writer, no_dist=True)
    torch.save({"model_config": model.config.to_dict()}, sharded / "meta.pt")
    metadata = read_dcp_metadata((sharded / ".metadata").read_bytes(), sharded)
    files = {index.fqn: info.relative_path for index, info in metadata.storage_data.items()}
    shard = sharded / files["state_dict.model.layers.0.mlp.up_proj.weight"]
    assert shard.name != files["state_dict.model.sharing.mask"]
    argv = ["consolidate", "--checkpoint", str(sharded), "--output", str(tmp_path / "out")]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:3000])
    truncated = f"error: shard {shard.name} is truncated (3000 of {size} bytes) — --checkpoint"
    assert truncated in one_line_error(capsys, argv)
    shard.unlink()
    assert f"error: shard {shard.name} is missing" in one_line_error(capsys, argv)
    monkeypatch.chdir(tmp_path)
    resume = ["fit", "--config", DEBUG, "--trainer.strategy=fsdp2", "--ckpt_path", str(sharded)]
    assert f"error: shard {shard.name} is missing" in one_line_error(capsys, resume)


def test_ctrl_c_while_reading_shards_is_an_interrupt_not_a_bad_checkpoint(tmp_path, monkeypatch):
    """torch.distributed.checkpoint wraps a Ctrl+C during a read into its CheckpointException: `fit` resuming a large
    sharded checkpoint said "cannot read the shards (KeyboardInterrupt) ... copy it again" and exited 2."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import save as dcp_save

    from epas_lightning.safe_dcp import load_shards

    dcp_save({"state_dict": {"w": torch.ones(3)}}, checkpoint_id=tmp_path, no_dist=True)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        load_shards({"state_dict": {"w": torch.zeros(3)}}, tmp_path, no_dist=True)


def test_resuming_into_another_architecture_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configured = LlamaConfig.from_name("debug")
    other = LlamaConfig.from_name("debug", n_layer=configured.n_layer + 1)
    torch.save({"model_config": other.to_dict(), "state_dict": {}}, tmp_path / "other.ckpt")
    for command in ("fit", "validate"):
        err = one_line_error(capsys, [command, "--config", DEBUG, "--ckpt_path", str(tmp_path / "other.ckpt")])
        assert f"n_layer: model {configured.n_layer} vs checkpoint {other.n_layer} — --ckpt_path" in err
        assert "init_from" not in err  # it checks the same architecture: no way around the checkpoint's config
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # not written by fit: nothing says what it holds
    err = one_line_error(capsys, ["fit", "--config", DEBUG, "--ckpt_path", str(tmp_path / "foreign.ckpt")])
    assert "no 'model_config': it was not written by EPASModule" in err


def test_a_fresh_fit_refuses_a_checkpoint_folder_holding_another_runs_checkpoints(tmp_path, capsys, monkeypatch):
    """A new run into a checkpoint.dirpath that held an earlier run's checkpoints (Lightning only warned) saved
    last-v1.ckpt beside them, replaced that run's last.ckpt at its stop or end, and `--ckpt_path last` meanwhile
    resumed the earlier run's. Refused in one line; resuming from that folder still works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    torch.save({"state_dict": {}, "global_step": 8}, tmp_path / "ck" / "last.ckpt")
    for argv in (["--checkpoint.dirpath", "ck"], ["--trainer.logger", "false", "--trainer.default_root_dir", "."]):
        if argv[0] == "--trainer.logger":
            (tmp_path / "ck").rename(tmp_path / "checkpoints")  # without a logger: <default_root_dir>/checkpoints
        err = one_line_error(capsys, ["fit", "--config", DEBUG, *argv])
        assert "holds another run's checkpoints (last.ckpt)" in err
    assert main(["fit", "--config", DEBUG, "--trainer.logger", "false", "--ckpt_path", "last"]) == 2
    assert "error: no 'model_config'" in capsys.readouterr().err  # resuming it is allowed (this is no real checkpoint)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


@pytest.mark.parametrize("target", ["loop", "missing"])
def test_a_run_folder_through_a_symbolic_link_to_nothing_is_one_line_before_any_work(target, tmp_path, capsys):
    """A default_root_dir through a link loop or a dangling link passed the check: mkdir failed at the first save,
    after training, with an OSError (ELOOP) or FileExistsError traceback."""
    if target == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
    else:
        (tmp_path / "a").symlink_to(tmp_path / "gone")
    argv = ["fit", "--config", DEBUG, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "a")]
    err = one_line_error(capsys, argv)
    assert f"{tmp_path / 'a'} is a symbolic link to nothing (a loop, or its target is missing)" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--checkpoint.dirpath", "s3://bucket/run"],
        ["--trainer.logger", "false", "--trainer.default_root_dir", "s3://bucket/run"],
    ],
)
def test_a_checkpoint_folder_given_as_a_url_is_one_line_before_any_work(argv, tmp_path, capsys, monkeypatch):
    """A URL as checkpoint.dirpath (or as default_root_dir without a logger, where Lightning's help says remote paths
    work) on a machine without its fsspec file system (s3fs) was an ImportError traceback ("Install s3fs to access
    S3") once the data was prepared."""
    pytest.importorskip("fsspec")
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed: the URL is written to")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["fit", "--config", DEBUG, *argv])
    assert "a URL this machine has no file system for (Install s3fs to access S3) — " in err and "s3://" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """A logger's save_dir that cannot be made (read-only, a file on the way) was a traceback from TensorBoard at
    set-up, once the data was prepared; a checkpoint.dirpath was one after training up to the first save; a full disk
    was a traceback writing the logger's files."""
    import shutil
    from collections import namedtuple

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    logger, checkpoints = "--trainer.logger.init_args.save_dir", "--checkpoint.dirpath"
    for argv in ([logger, "afile/runs"], [checkpoints, "afile/ck"]):
        err = one_line_error(capsys, ["fit", "--config", DEBUG, *argv])
        assert f"afile is a file, not a folder — {Path('afile', argv[1].split('/')[1])}" in err, err
    if os.geteuid() != 0:  # root writes into a read-only folder
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "is not writable" in one_line_error(capsys, ["fit", "--config", DEBUG, checkpoints, "ro/ck"])
    # a parent it cannot search (another user's home) or a name too long: the check's own traceback (OSError)
    for flag in (logger, checkpoints):
        assert "File name too long — " in one_line_error(capsys, ["fit", "--config", DEBUG, flag, "x" * 300])
    if Path("/proc/self").is_dir():  # a special file system: it was "no space left on the device"
        err = one_line_error(capsys, ["fit", "--config", DEBUG, checkpoints, "/proc/nope"])
        assert "/proc cannot be written: a special file system (such as /proc or /sys), not a disk — /proc/nope" in err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    assert "no space left on the device" in one_line_error(capsys, ["fit", "--config", DEBUG])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] + (["ro"] if os.geteuid() != 0 else [])


def test_under_slurm_a_stray_hpc_checkpoint_is_never_loaded_unannounced(tmp_path, capsys, monkeypatch):
    """Under SLURM Lightning loads the newest hpc_ckpt_N.ckpt of the working directory when no --ckpt_path is given:
    fit resumed it (after `--ckpt_path auto` had said "starting from scratch"), validate scored it instead of the
    configured model, without verify_checkpoint or the architecture check. Refused in one line, before any work."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"left by another program")
    for argv in (["fit"], ["fit", "--ckpt_path", "auto"], ["validate"]):
        err = one_line_error(capsys, [*argv, "--config", DEBUG])
        assert "--ckpt_path hpc_ckpt_1.ckpt to use it" in err


def test_a_sharded_checkpoint_under_a_strategy_that_cannot_read_it_is_one_line(tmp_path):
    from epas_lightning.lightning_cli import check_strategy_reads

    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    model_parallel = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}  # loads it unsafely
    for strategy in (None, "auto", "ddp", {"class_path": "lightning.pytorch.strategies.DDPStrategy"}, model_parallel):
        with pytest.raises(CheckpointError, match="loads only under the fsdp2 strategy") as refused:
            check_strategy_reads(strategy, sharded)
        assert "--trainer.strategy=fsdp2" in str(refused.value)
        assert "`python -m epas_lightning evaluate --checkpoint" in str(refused.value)  # consolidate gives no .ckpt
    for strategy in ("fsdp2", {"class_path": "epas_lightning.strategy.FSDP2Strategy"}, None):
        check_strategy_reads(strategy, sharded if strategy else tmp_path / "one-file.ckpt")  # no error


def test_a_sharded_checkpoint_resumed_from_python_without_fsdp2_is_one_line(tmp_path):
    """From Python (one device or DDP, with the README's AtomicCheckpointIO) Lightning opened the folder as a file:
    an IsADirectoryError traceback where the command line says what to do in one line."""
    import lightning as L

    from epas_lightning import AtomicCheckpointIO, EPASModule, LlamaConfig

    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=8))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=[AtomicCheckpointIO()])
    with pytest.raises(CheckpointError, match="loads only under the fsdp2 strategy") as refused:
        trainer.fit(module, torch.utils.data.DataLoader([torch.zeros(9, dtype=torch.long)]), ckpt_path=sharded)
    assert "strategy=FSDP2Strategy()" in str(refused.value) and "\n" not in str(refused.value)


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: checkpoint does not exist")


def test_binary_looking_text_files_are_skipped_by_name(text_corpus, tmp_path, caplog):
    corpus = tmp_path / "corpus"
    shutil.copytree(text_corpus, corpus)
    (corpus / "zeros.txt").write_bytes(b"\0" * 4096)
    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = prepare(corpus, tmp_path / "data", val_fraction=0.3)
    assert f"Skipped {corpus / 'zeros.txt'}: looks binary" in caplog.text
    assert json.loads((out / "meta.json").read_text())["documents"] == 6


# ---------------------------------------------------------------------------------------------------------------------
# No silent wrong answers
# ---------------------------------------------------------------------------------------------------------------------


def test_init_from_our_checkpoint_compares_rope_theta_and_norm_eps(small_checkpoint):
    config = LlamaConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=VOCAB, block_size=32)
    EPASModule(config, init_from=str(small_checkpoint))  # the same architecture: accepted
    other = LlamaConfig(**{**config.to_dict(), "rope_theta": 50000.0, "norm_eps": 1e-6})
    with pytest.raises(CheckpointError, match=r"rope_theta: model 50000.0 vs checkpoint 10000.0; norm_eps"):
        EPASModule(other, init_from=str(small_checkpoint))  # at construction, before any work


def test_analyze_refuses_without_the_data_the_model_trained_on(tmp_path, capsys):
    config = LlamaConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, block_size=32)
    ckpt = save_consolidated(Llama(config), tmp_path / "ckpt")  # records no tokenizer, so no data
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(ckpt), "--output", str(tmp_path / "a")])
    assert "does not say which data it trained on" in err and "— --data —" in err and not (tmp_path / "a").exists()


def test_weights_that_do_not_fit_their_config_are_summed_up_in_one_short_line(tmp_path, capsys):
    """A 2-layer state under a 4-layer config: 18 missing tensors are counted, not all listed."""
    small = Llama(LlamaConfig.from_name("debug")).state_dict()
    state = {"model." + key: t for key, t in small.items()} | {"model.extra.weight": torch.zeros(1)}
    config = LlamaConfig.from_name("debug", n_layer=4).to_dict()
    torch.save({"state_dict": state, "model_config": config}, tmp_path / "x.ckpt")
    err = one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "x.ckpt"), "--prompt", "x"])
    assert "missing: layers.2.input_layernorm.weight, " in err and ", ... (18 in all)" in err, err
    assert "unexpected: extra.weight" in err
    assert "other shape: sharing.mask [2] where the model has [4]" in err
    assert len(err) < 600, err


def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_consumer(tmp_path, capsys):
    """Weights with NaN or inf (a run without the guard, a bad copy) were consolidated and exported as they were, and
    generate died in sampling with a traceback."""
    model = Llama(LlamaConfig.from_name("debug"))
    state = {"model." + key: t for key, t in model.state_dict().items()}
    state["model.norm.weight"][0] = float("nan")
    torch.save({"state_dict": state, "model_config": model.config.to_dict()}, tmp_path / "nan.ckpt")
    tokenizer = ["--tokenizer", str(train_tiny_sentencepiece(tmp_path / "tokenizer.model"))]  # generate checks it first
    generate = ["--prompt", "x", *tokenizer]
    for command, extra in (("consolidate", ["--output", str(tmp_path / "out")]), ("generate", generate)):
        err = one_line_error(capsys, [command, "--checkpoint", str(tmp_path / "nan.ckpt"), *extra])
        assert err.startswith("error: the weights hold NaN or inf (norm.weight) — ") and "an earlier one" in err
    assert not (tmp_path / "out").exists()


def test_weights_past_the_range_of_the_requested_dtype_are_refused_before_anything_runs(tmp_path, capsys):
    """An embedding past 65504 ran at --dtype float16 as inf: generate died in sampling with a traceback, evaluate
    printed nan and export wrote inf weights without a word."""
    model = Llama(LlamaConfig.from_name("debug"))
    with torch.no_grad():
        model.embed_tokens.weight[3, 5] = 7e4
    ckpt = save_consolidated(model, tmp_path / "ckpt", train_tiny_sentencepiece(tmp_path / "tokenizer.model"))
    says = "(embed_tokens.weight max |value| 7e+04); float16 holds at most 65504 — --dtype float16 — use --dtype bf"
    for command, extra in (("generate", ["--prompt", "x"]), ("export", ["--output", str(tmp_path / "hf")])):
        err = one_line_error(capsys, [command, "--checkpoint", str(ckpt), "--dtype", "float16", *extra])
        assert err.startswith("error: the weights do not fit float16 (") and says in err.replace("model.", ""), err
    assert not (tmp_path / "hf").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0


def test_a_model_loads_straight_into_the_requested_dtype_without_a_wider_copy(tmp_path, monkeypatch):
    """Inference loaded the fp32 model on the device, with a second copy of the weights there, and cast it after:
    about 8 bytes per parameter on the GPU at load time for a model served in bf16 (2). Now each tensor is copied
    into weights already in the dtype; the values are those of the cast, the sharing mask stays bool."""
    from epas_lightning.checkpoint import load_model

    model = Llama(LlamaConfig.from_name("debug", n_layer=4))
    model.set_shared_layers([3])
    ckpt = save_consolidated(model, tmp_path / "ckpt")
    moved = []
    to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda t, *a, **k: moved.append(0 if t.is_meta else t.numel()) or to(t, *a, **k)
    )
    loaded = load_model(ckpt, "cpu", torch.bfloat16).model
    assert sum(moved) < max(p.numel() for p in model.parameters())  # no tensor moved or cast whole beforehand
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and loaded.sharing.mask.dtype == torch.bool
    cast = model.to(torch.bfloat16).state_dict()
    for name, ours in loaded.state_dict().items():
        assert torch.equal(ours, cast[name]), name
    assert loaded.sharing.shared_layers == [3]


def test_a_model_folder_where_a_checkpoint_belongs_says_to_start_from_it(small_checkpoint, tmp_path, capsys):
    """--ckpt_path resumes training state, which a model folder lacks; --checkpoint reads an HF folder, and an
    incomplete one is one line naming it (its config.json was a KeyError traceback)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"")
    err = one_line_error(capsys, ["generate", "--checkpoint", str(hf), "--prompt", "x"])
    assert "config.json lacks num_hidden_layers, hidden_size" in err and f"— --checkpoint {hf}" in err, err
    for folder in (hf, small_checkpoint):
        err = one_line_error(capsys, ["fit", "--config", DEBUG, "--ckpt_path", str(folder)])
        assert "no training state to resume" in err and f"--model.init_from {folder}" in err, err
    # validate/test score it: init_from would score it dense (its schedule at step 0), evaluate at its region
    err = one_line_error(capsys, ["test", "--config", DEBUG, "--ckpt_path", str(small_checkpoint)])
    assert "is no Lightning checkpoint" in err and f"evaluate --checkpoint {small_checkpoint}" in err, err


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_non_finite_loss_on_another_rank_is_named_once_as_the_loss(action, caplog):
    """Rank 1's loss is NaN (a corrupt batch); on rank 0 it shows as NaN gradients after their all-reduce. Every rank
    named its own view: a skip was logged twice, 'non-finite loss' by rank 1 and 'non-finite gradients' by rank 0, and
    a stop said 'gradients'. Now the ranks agree on the loss, and only the first one logs the skip."""
    guard = DivergenceGuard(action)
    strategy = SimpleNamespace(reduce_boolean_decision=lambda local_bad, all: True)  # some rank's loss and grads
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.full((2,), float("nan"))  # this rank's loss was finite
    optimizer = SimpleNamespace(param_groups=[{"params": [param]}])
    for rank in (0, 1):
        trainer = SimpleNamespace(strategy=strategy, global_step=3, is_global_zero=rank == 0, precision_plugin=None)
        trainer.world_size = 2
        trainer.checkpoint_callbacks = []
        guard.on_before_backward(trainer, None, torch.tensor(float("nan") if rank else 1.0))
        if action == "stop":
            with pytest.raises(TrainingDiverged, match="non-finite loss at step 3"):
                guard.on_before_optimizer_step(trainer, None, optimizer)
        else:
            guard.on_before_optimizer_step(trainer, SimpleNamespace(log=lambda *a, **k: None), optimizer)
            param.grad = torch.full((2,), float("nan"))
    skips = [r.getMessage() for r in caplog.records if "Divergence guard" in r.getMessage()]
    assert skips == (
        []
        if action == "stop"
        else ["Divergence guard: non-finite loss at step 3; skipped its update (1 of 10 allowed)."]
    )


def test_the_fp16_loss_scale_is_read_once_per_optimizer_step(tiny_corpus, tmp_path, monkeypatch):
    """Reading the scale is a device sync (``GradScaler.get_scale`` takes ``.item()``): the summary read it at every
    micro-batch, so under gradient accumulation on a GPU the host waited for each micro-batch's backward."""
    from lightning.pytorch.plugins import MixedPrecision

    from epas_lightning.run_summary import RunSummary

    reads = []
    get_scale = torch.amp.GradScaler.get_scale

    def counted(self):  # noqa: ANN001, ANN202
        reads.append(sys._getframe(1).f_code.co_filename)  # a checkpoint's scaler state reads it too
        return get_scale(self)

    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", counted)
    torch.manual_seed(0)
    module = EPASModule(LlamaConfig.from_name("debug", block_size=32))
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=2, vocab_size=VOCAB)
    plugin = MixedPrecision("16-mixed", "cpu")  # Lightning swaps a CPU's 16-mixed for bf16-mixed
    trainer = cpu_trainer(tmp_path, 3, [RunSummary()], plugins=[plugin], accumulate_grad_batches=2)
    trainer.fit(module, data)
    assert sum(path.endswith("run_summary.py") for path in reads) == 1 + 3  # at the start, after each step
    assert trainer.callback_metrics["train/loss_scale"].item() == 65536.0


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC])
@pytest.mark.parametrize("raised", [KeyboardInterrupt, CheckpointError])
def test_ctrl_c_or_a_user_error_raised_while_handling_a_write_error_into_the_build_passes_through(
    code, raised, tmp_path
):
    """An error raised while a command handled a failed write into its build (its own user error, Ctrl+C or SIGTERM in
    its clean-up) was said as that write's one line: exit 2, not the user error's line, nor a stop at a signal."""
    error = raised() if raised is KeyboardInterrupt else raised("the checkpoint is bad", "ckpt", "use another one")
    with pytest.raises(raised) as caught, output_folder(tmp_path / "out", "bench") as build:
        try:
            raise OSError(code, os.strerror(code), str(build / "a.txt"))
        except OSError:
            raise error from None
    assert caught.value is error and list(tmp_path.iterdir()) == []


def test_a_bug_raised_while_handling_a_write_error_into_the_build_is_that_writes_line_and_keeps_its_traceback(tmp_path):
    """A library's handler of a failed write into the build that fails itself (a bug's ValueError) is said as that
    write's one line: the write is what the user can act on, and an implicit wrap (`except OSError: raise
    RuntimeError(...)`) looks the same. The bug stays the line's cause, which --debug prints with its traceback."""
    bug = ValueError("a bug in the handler")
    with pytest.raises(OutputError) as caught, output_folder(tmp_path / "out", "bench") as build:
        try:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(build / "a.txt"))
        except OSError:
            raise bug  # noqa: B904 (an implicit chain is the case)
    assert str(caught.value).startswith("cannot write a.txt into the output folder being built (permission denied)")
    assert caught.value.__cause__ is bug and list(tmp_path.iterdir()) == []


def test_a_build_of_a_process_in_another_pid_namespace_of_this_host_name_is_left(tmp_path):
    """Containers that share a host name (Docker's --network host, Kubernetes' hostNetwork pods) on one volume: a live
    run's process id, looked up in another container's process namespace, is no process there, and its build (marked,
    or only claimed) was removed under it. A writer's namespace is in its record: one not ours is not ours to judge."""
    record = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": socket.gethostname()}
    elsewhere = record | {"output": "out", "pid_namespace": "pid:[1]"}
    (tmp_path / ".out.tmp-1234abcd").mkdir()
    (tmp_path / ".out.tmp-1234abcd" / MARKER).write_text(json.dumps(elsewhere))
    (tmp_path / ".out.tmp-5678abcd").mkdir()
    (tmp_path / ".out.new-5678abcd").symlink_to(json.dumps(elsewhere))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert remove_stale_builds(tmp_path / "out") == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    with output_folder(tmp_path / "out2", "bench") as build:  # this run's own namespace: a kill of it is removed
        ours = json.loads((build / MARKER).read_text())
    assert remove_stale_builds(tmp_path / "out2") == []
    (tmp_path / ".out2.tmp-1234abcd").mkdir()
    (tmp_path / ".out2.tmp-1234abcd" / MARKER).write_text(json.dumps(ours | {"pid": 2**22 + 12345}))
    assert [p.name for p in remove_stale_builds(tmp_path / "out2")] == [".out2.tmp-1234abcd"]


def test_a_claimed_build_swapped_for_a_link_as_it_is_removed_deletes_nothing_the_link_points_to(tmp_path, monkeypatch):
    """A build claimed by a killed run was emptied through its name: a folder swapped for a link meanwhile (another user
    of a shared /tmp, between the check that it is a folder and its removal) had the files it points to deleted."""
    yours, work = tmp_path / "yours", tmp_path / "work"
    yours.mkdir(), work.mkdir()
    (yours / "thesis.tex").write_text("years of work")
    dead = {"created_by": "epas_lightning", "kind": "bench", "pid": 2**22 + 12345, "host": socket.gethostname()}
    build = work / ".out.tmp-1234abcd"
    build.mkdir()
    (work / ".out.new-1234abcd").symlink_to(json.dumps(dead | {"output": "out"}))
    read_marker, reads = outputs.read_marker, []

    def swapped_meanwhile(folder: Path) -> dict | None:
        reads.append(folder)
        if reads.count(build) == 2:  # the check of the claim's build: the last before its removal
            build.rmdir()
            build.symlink_to(yours)
        return read_marker(folder)

    monkeypatch.setattr(outputs, "read_marker", swapped_meanwhile)
    remove_stale_builds(work / "out")
    assert [p.name for p in yours.iterdir()] == ["thesis.tex"] and build.is_symlink()


def test_a_quoted_os_error_names_its_file_however_python_quotes_it():
    """A worker's traceback quotes an OS error's file as repr() does: a name holding ' in ", a bytes name as b'...'.
    Read as naming no file, an input's error there was taken for a write into the output."""
    from epas_lightning.outputs import quoted_os_errors

    for name in ("/in/a.txt", "/in/it's.txt", "/in/a\\b\"c'd", b"/in/a.txt", "/in/\udcff.txt"):
        quote = f"Traceback ...\nPermissionError: {PermissionError(errno.EACCES, 'Permission denied', name)}\n"
        assert quoted_os_errors(quote) == [(errno.EACCES, os.fsdecode(name))], quote


QUOTED_FULL_DISKS = {
    "python, no file": ("[Errno 28] No space left on device", [(errno.ENOSPC, None)]),
    "python, a file": ("[Errno 28] No space left on device: '/out/a.bin'", [(errno.ENOSPC, "/out/a.bin")]),
    "python, the code alone": ("a worker's write failed: [Errno 28]", [(errno.ENOSPC, None)]),
    "rust, no path": ("Error while serializing: I/O error: No space left on device (os error 28)", [(28, None)]),
    "rust, a path": ('No space left on device (os error 28) at path "/out/a.bin"', [(errno.ENOSPC, "/out/a.bin")]),
    "litdata worker": (
        f'Traceback (most recent call last):\n  File "w.py", line 9, in run\nOSError: [Errno {errno.EDQUOT}] Disk '
        "quota exceeded\n",
        [(errno.EDQUOT, None)],
    ),
}


@pytest.mark.parametrize(("text", "quoted"), QUOTED_FULL_DISKS.values(), ids=QUOTED_FULL_DISKS)
def test_a_full_disk_an_error_quotes_is_read_by_the_parser_of_quoted_os_errors(text, quoted):
    """out_of_space looked for a quoted full disk by its own substrings, apart from quoted_os_errors' patterns, which
    took `[Errno N]` only followed by a space: one parser serves both, and reads every form either read (the code
    alone, no file, a worker's traceback), in an error or in one it was raised from or while handling."""
    from epas_lightning.outputs import out_of_space, quoted_os_errors

    assert quoted_os_errors(text) == quoted
    assert out_of_space(RuntimeError(text))
    for link in ("__cause__", "__context__"):
        chained = ValueError("saving failed")
        setattr(chained, link, RuntimeError(text))
        assert out_of_space(chained), link


def test_a_code_in_a_quoted_file_name_is_no_quoted_os_error():
    """A full disk's code inside a file name an error quotes (`[Errno 28]` in `'/in/[Errno 28].txt'`) was taken by
    out_of_space for a full disk: a permission error on an input was said as no space left on the output's device."""
    from epas_lightning.outputs import out_of_space, quoted_os_errors

    text = str(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/in/[Errno 28].txt"))
    assert quoted_os_errors(text) == [(errno.EACCES, "/in/[Errno 28].txt")]
    assert not out_of_space(RuntimeError(text))


def test_a_code_of_either_quoting_inside_a_file_name_the_other_quotes_is_no_quoted_os_error(tmp_path):
    """Python's quoting and a Rust library's were each read over the whole text: a full disk's code of one inside a
    file name the other quotes (`'/in/(os error 28).txt'`, `at path "/in/[Errno 28].txt"`) was taken for a full disk,
    and an input's error while serializing for a failing write into the build."""
    from epas_lightning.outputs import build_write_error, out_of_space, quoted_os_errors

    python = str(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/in/(os error 28).txt"))
    rust = 'Error while serializing: Permission denied (os error 13) at path "/in/[Errno 5].txt"'
    assert quoted_os_errors(python) == [(errno.EACCES, "/in/(os error 28).txt")]
    assert not out_of_space(RuntimeError(python))
    assert quoted_os_errors(rust) == [(errno.EACCES, "/in/[Errno 5].txt")]
    assert build_write_error(RuntimeError(rust), tmp_path / ".out.tmp-1234abcd") is None


def test_a_users_folder_named_as_the_build_would_be_is_left(tmp_path, monkeypatch):
    """A folder of the hidden build's name (its random tag drawn again) made the build's mkdir fail, and the clean-up
    after that failure removed the folder as the build: a user's, not ours."""
    tag = "1234abcd" + "0" * 24
    (tmp_path / f".out.tmp-{tag[:8]}").mkdir()
    (tmp_path / f".out.tmp-{tag[:8]}" / "notes.txt").write_text("mine")
    monkeypatch.setattr(outputs.uuid, "uuid4", lambda: SimpleNamespace(hex=tag))
    exists = pytest.raises(OutputError, match=r"^cannot create the output folder \(file exists\)")
    with exists, output_folder(tmp_path / "out", "bench"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [f".out.tmp-{tag[:8]}"]
    assert (tmp_path / f".out.tmp-{tag[:8]}" / "notes.txt").read_text() == "mine"


def test_one_process_decides_alone_without_a_device_round_trip():
    """Lightning's parallel strategies (FSDP2 on one GPU: ``tinyllama-1gpu``) reduce every boolean decision as a
    device tensor even in a world of one process: on the H200 the divergence guard's and the interrupt check's
    decisions were 4 of the 9 host syncs per optimizer step (benchmarks/RESULTS.md). One process now decides alone;
    several still reduce."""
    from epas_lightning.interrupt import GracefulStop
    from epas_lightning.rank_agreement import ranks_agree

    def no_reduce(decision, all):  # noqa: A002
        raise AssertionError("one process reduced its decision")

    alone = SimpleNamespace(world_size=1, strategy=SimpleNamespace(reduce_boolean_decision=no_reduce))
    assert ranks_agree(alone, True) is True and ranks_agree(alone, 0, all=False) is False
    calls = []
    several = SimpleNamespace(
        world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: calls.append((d, all)) or True)
    )
    assert ranks_agree(several, False, all=False) is True and calls == [(False, False)]

    guard = DivergenceGuard("stop")
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.zeros(2)
    trainer = SimpleNamespace(
        world_size=1, strategy=alone.strategy, global_step=3, is_global_zero=True, precision_plugin=None,
        checkpoint_callbacks=[],
    )  # fmt: skip
    guard.on_before_backward(trainer, None, torch.tensor(1.0))
    guard.on_before_optimizer_step(trainer, None, SimpleNamespace(param_groups=[{"params": [param]}]))
    param.grad = torch.full((2,), float("nan"))
    guard.on_before_backward(trainer, None, torch.tensor(1.0))
    with pytest.raises(TrainingDiverged, match="non-finite gradients at step 3"):
        guard.on_before_optimizer_step(trainer, None, SimpleNamespace(param_groups=[{"params": [param]}]))
    stop = GracefulStop()
    assert stop._agreed_stop(trainer) == (None, False)
    stop.received = signal.SIGTERM
    assert stop._agreed_stop(trainer) == (signal.SIGTERM, False)
