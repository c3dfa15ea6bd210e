"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

import json
import os
import signal
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from epas_lightning.callbacks import ProgressiveSharing

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(REPO / "configs" / "debug.yaml")


def strict_json(text: str):
    """``text`` read as strict JSON (RFC 8259, as jq and JavaScript read it): ``NaN``/``Infinity`` fail the test."""
    import pytest

    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def run_cli(
    args: list[str], cwd: Path, cache_dir: Path, program: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m epas_lightning <args>`` (or ``program <args>``) in a fresh process run from ``cwd``."""
    env = {**os.environ, "EPAS_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    program = program or [sys.executable, "-m", "epas_lightning"]
    return subprocess.run([*program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def run_cli_commands(commands: list[list[str]], cwd: Path, cache_dir: Path, err_dir: Path) -> list[tuple[int, str]]:
    """Each of ``commands`` (``python -m epas_lightning``'s arguments) run by :func:`~epas_lightning.cli.main` one after
    the other in one fresh process run from ``cwd`` (``tests/scripts/cli_commands.py``): each one's (exit status,
    stderr), its stderr kept in ``err_dir/<i>.err``."""
    env = {**os.environ, "EPAS_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    err_dir.mkdir(parents=True, exist_ok=True)
    script = [sys.executable, str(REPO / "tests" / "scripts" / "cli_commands.py"), str(err_dir), json.dumps(commands)]
    done = subprocess.run(script, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = [int(line) for line in done.stdout.split()]
    assert len(statuses) == len(commands), done.stdout[-3000:]
    return [(status, (err_dir / f"{i}.err").read_text()) for i, status in enumerate(statuses)]


def run_ranks_at_once(
    command: list[str], env: dict, logs: Path, ranks: int = 2, cwd: Path | None = None, timeout: float = 300
) -> list[tuple[str, str]]:
    """Start ``ranks`` processes of ``command`` together with a launcher's environment (``LOCAL_RANK`` and the rest, as
    ``torchrun`` or a scheduler sets them), check each exits 0, and return each one's (stdout, stderr), also kept in
    ``logs/rank<R>.out``/``.err``. Lightning's own re-launch of a command starts rank 1 only after rank 0 has imported
    torch and Lightning (seconds each): here they import at the same time, on a core each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launched = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "WORLD_SIZE": str(ranks)}
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], [(logs / f"rank{rank}.out", logs / f"rank{rank}.err") for rank in range(ranks)]
    for rank, (out, err) in enumerate(files):
        with out.open("w") as stdout, err.open("w") as stderr:
            rank_env = {**env, **launched, "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=rank_env, cwd=cwd))
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in files]
    for rank, (code, (stdout, stderr)) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"rank {rank} exited {code}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return outputs


def cpu_trainer(root: Path, max_steps: int, callbacks=(), **overrides) -> L.Trainer:
    """A quiet single-process CPU Trainer: no logger, progress bar, summary or validation unless overridden."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    return L.Trainer(**{**kwargs, **overrides})


def train_tiny_checkpoint(corpus: Path, root: Path, sharing: L.Callback, steps: int = 6, seed: int = 3) -> Path:
    """A 4-layer debug model trained ``steps`` steps on ``corpus`` with the ``sharing`` schedule; its last.ckpt."""
    from epas_lightning import EPASModule, LlamaConfig, TokenDataModule

    L.seed_everything(seed)
    config = LlamaConfig.from_name("debug", n_layer=4, block_size=32)
    data = TokenDataModule(data_dir=str(corpus), seq_len=32, batch_size=4, vocab_size=config.vocab_size)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    cpu_trainer(root, steps, [sharing, checkpoint]).fit(EPASModule(config), datamodule=data)
    return root / "ckpt" / "last.ckpt"


def signal_fit_once_training(
    args: list[str], cwd: Path, env: dict, signum: int, after: str = "EPAS: step 4:", timeout: float = 180
) -> tuple[int, str, str]:
    """Start ``python -m epas_lightning <args>``, send ``signum`` once a stderr line contains ``after`` (training is
    under way), and wait for it to end (killed after ``timeout`` s): (exit status, stdout, stderr)."""
    import subprocess
    import sys
    import threading

    out = cwd / "signalled.stdout"
    with out.open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "epas_lightning", *args], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        lines, sent = [], False
        for line in proc.stderr:  # to the end of the output: the process has exited (or was killed)
            lines.append(line)
            if not sent and after in line:
                proc.send_signal(signum)
                sent = True
        proc.wait()
        watchdog.cancel()
    return proc.returncode, out.read_text(), "".join(lines)


class FakeClock(L.Callback):
    """``time.perf_counter`` replaced (through ``monkeypatch``) by a clock that this callback moves on: ``batch``
    seconds per training micro-batch, ``update`` per optimizer update, ``validation`` per held-out batch."""

    def __init__(self, monkeypatch, batch: float = 1.0, update: float = 3.0, validation: float = 10.0) -> None:  # noqa: ANN001
        import time

        self.now, self.batch, self.update, self.validation = 0.0, batch, update, validation
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)

    def on_train_batch_start(self, *args) -> None:
        self.now += self.batch

    def on_before_optimizer_step(self, *args) -> None:
        self.now += self.update

    def on_validation_batch_start(self, *args) -> None:
        self.now += self.validation


class Validation(NamedTuple):
    """One validation of a fit: its global step, the step loggers log it at, its epoch, and its ``val/loss``."""

    step: int
    logged_step: int
    epoch: int
    loss: float


class Recorder(L.Callback):
    """Records what a fit of an ``EPASModule`` did. Per optimizer step (counted from 0): ``lrs``, the first optimizer's
    learning rate as it starts; ``losses`` and ``masks``, the training loss and the sharing layers after it. Per
    micro-batch: ``batches``, by (epoch, index in it), the global step it starts at and its rows' first 3 tokens;
    ``micro_batches``, by (global step after it, index), its loss and epoch. ``validations``: each one but the sanity
    check's, in order."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.masks: dict[int, list[int]] = {}
        self.batches: dict[tuple[int, int], tuple[int, list]] = {}
        self.micro_batches: dict[tuple[int, int], tuple[float, int]] = {}
        self.validations: list[Validation] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches[(trainer.current_epoch, batch_idx)] = (trainer.global_step, batch[:, :3].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, loss = trainer.global_step - 1, outputs["loss"].item()
        self.losses[step], self.masks[step] = loss, pl_module.model.sharing.shared_layers
        self.micro_batches[(trainer.global_step, batch_idx)] = (loss, trainer.current_epoch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            logged_step = trainer.fit_loop.epoch_loop._batches_that_stepped
            loss = float(trainer.callback_metrics["val/loss"])
            self.validations.append(Validation(trainer.global_step, logged_step, trainer.current_epoch, loss))


class HostReads(L.Callback):
    """Counts, per optimizer step (micro-batch, without gradient accumulation: from one ``on_train_batch_start`` to the
    next, so the logging and the loading of the next batch count too), each read of a tensor's value into Python:
    ``item``, ``tolist``, ``numpy``, ``bool``/``float``/``int``/``index`` of a tensor. On CUDA each read of a device
    tensor makes the host wait for the GPU. On a CPU every tensor is on the host, so the reads of values that a CUDA run
    keeps on the host too are left out (:data:`HOST_SIDE`). ``reads[step]``: a ``Counter`` of ``file:function``, the
    innermost frame of ``epas_lightning`` (the innermost frame where none of ours is on the stack)."""

    READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    HOST_SIDE = (
        ("optimizer.py", "_get_value"),  # AdamW's step count: a CPU tensor (on the device the fused one reads none)
        ("datamodule.py", "on_before_batch_transfer"),  # the batch checked before it moves to the device
    )
    CPU_ONLY = 'device.type == "cpu"'  # a read in a line that makes it only for a CPU tensor

    watching: "HostReads | None" = None
    """The instance counting now."""

    def __init__(self) -> None:
        self.reads: dict[int, Counter] = {}
        self.logged: set[int] = set()
        self._step = 0

    @classmethod
    def watch(cls, monkeypatch) -> None:
        """Wrap the tensor reads for the test (``monkeypatch`` puts them back): an instance counts while it trains."""
        monkeypatch.setattr(cls, "watching", None)
        for name in cls.READS:
            monkeypatch.setattr(torch.Tensor, name, cls._counted(getattr(torch.Tensor, name)))

    @classmethod
    def _counted(cls, read):
        def counted(tensor, *args, **kwargs):
            if cls.watching is not None:
                cls.watching._count(traceback.extract_stack()[:-1])
            return read(tensor, *args, **kwargs)

        return counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        HostReads.watching, self._step = self, trainer.global_step
        self.reads[self._step] = Counter()
        if trainer._logger_connector.should_update_logs:
            self.logged.add(self._step)

    def on_train_end(self, trainer, pl_module) -> None:
        HostReads.watching = None

    def _count(self, frames: list) -> None:
        if any((Path(f.filename).name, f.name) in self.HOST_SIDE or self.CPU_ONLY in (f.line or "") for f in frames):
            return
        ours = [f for f in frames if f"{os.sep}epas_lightning{os.sep}" in f.filename]
        frame = (ours or frames)[-1]
        self.reads[self._step][f"{Path(frame.filename).name}:{frame.name}"] += 1


class SignalInStep(L.Callback):
    """Records SIGTERM in ``stop`` (a ``GracefulStop``) as optimizer step ``step`` (counted from 1) starts, as its
    signal handler does when the signal comes inside that step; ``step`` ``None``: never."""

    def __init__(self, stop: L.Callback, step: int | None) -> None:
        self.stop, self.step = stop, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self.step is not None and trainer.global_step + 1 == self.step:
            self.stop.received = signal.SIGTERM


class Keys(Logger):
    """Remembers every metric name logged."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    @property
    def name(self) -> str:
        return "keys"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.keys |= set(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class Steps(Keys):
    """Remembers the steps each metric was logged at, and its values."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, list[int]] = {}
        self.values: dict[str, list[float]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.steps.setdefault(key, []).append(step)
            self.values.setdefault(key, []).append(float(value))


class SubclassedSharing(ProgressiveSharing):
    """A schedule of one's own, listed in ``trainer.callbacks`` beside the ``sharing`` section's."""


class SignalTwice(L.Callback):
    """Sends this process ``signum`` twice after optimizer step ``step``: a user pressing Ctrl+C again, or a scheduler
    signalling again, while the run stops."""

    def __init__(self, signum: int = 2, step: int = 2) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)


class SigtermInSetup(L.Callback):
    """Sends this process SIGTERM as ``fit`` sets up, before Lightning registers its handler: a scheduler's preemption
    in a job's first seconds."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class SignalBeforeTraining(L.Callback):
    """Sends this process ``signum`` once Lightning registered its handlers, before the first training step: as the
    sanity validation's batch ``batch`` (counted from 0) ends, or, with ``batch`` ``None``, as that validation ends;
    with ``batch`` ``"start"``, in the first callback hook after the registration (the sanity validation's start, or
    without one training's; in ``validate``, the validation's; listed before ``GracefulStop``, as ``trainer.callbacks``
    are, this one's hook runs first); with ``rank``, in that rank's process only (a scheduler signalling one node)."""

    def __init__(self, signum: int = 15, batch: int | str | None = 0, rank: int | None = None) -> None:  # SIGTERM
        self.signum, self.batch, self.rank = signum, batch, rank

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch == "start":
            self._signal(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch == "start" and trainer.num_sanity_val_steps == 0:
            self._signal(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch == "start" and trainer.state.fn == "validate":
            self._signal(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, *args) -> None:
        if trainer.sanity_checking and batch_idx == self.batch:
            self._signal(trainer)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch is None:
            self._signal(trainer)

    def _signal(self, trainer: L.Trainer) -> None:
        if self.rank is None or trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


def train_tiny_sentencepiece(path: Path, **options) -> Path:
    """A tiny sentencepiece model (BPE unless ``options`` say otherwise) with byte fallback, trained on text with runs
    of spaces, tabs and newlines."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["ka", "lo", "mine", "su", "tari", "po", "anel", "or", "café", "日本"]
    text = "\n".join(
        " ".join(rng.choice(words) for _ in range(8)) + rng.choice(["", "  x", "\ty", " 🙂"]) for _ in range(400)
    )
    path.with_suffix(".txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(path.with_suffix(".txt")), model_prefix=str(path.with_suffix("")),
        **{"vocab_size": 300, "model_type": "bpe", "byte_fallback": True, "minloglevel": 2, **options},
    )  # fmt: skip
    return path.with_suffix(".model")


def compile_blocks_eagerly(model) -> list:
    """Compile each block with dynamo's graphs run as plain torch ops (no code generation); returns the graphs."""
    torch._dynamo.reset()  # each model compiles afresh: earlier tests' graphs count towards the recompile limit
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for block in model.layers:
        block.compile(backend=backend, fullgraph=True)
    return graphs


def record_tokenizer_of(data_dir: Path, source: Path) -> None:
    """Write ``source``'s ``meta.json`` into ``data_dir`` (its streams linked from ``source``), recording the hash of
    ``data_dir``'s own tokenizer file: as ``prepare`` records the tokenizer it prepared with."""
    import json

    from epas_lightning.data.tokenizer import tokenizer_sha256

    meta = json.loads((source / "meta.json").read_text())
    meta["tokenizer_sha256"] = tokenizer_sha256(data_dir / meta["tokenizer"])
    (data_dir / "meta.json").write_text(json.dumps(meta))


def write_token_stream(stream: Path, documents: list[int]) -> Path:
    """A litdata token stream of one chunk per document, of ``documents`` tokens each: the ids 0, 1, 2, ... in turn
    (no two samples alike while they total fewer tokens than the vocabulary)."""
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    writer, start = BinaryWriter(str(stream), chunk_size=1, item_loader=TokensLoader()), 0
    for i, length in enumerate(documents):
        writer[i], start = torch.arange(start, start + length, dtype=torch.int32), start + length
    writer.done()
    writer.merge()
    return stream


def without_heldout_sequences(source: Path, data_dir: Path) -> Path:
    """A prepared folder ``data_dir`` of ``source``'s training stream and tokenizer whose ``val`` split holds no
    sequence (one chunk of 8 tokens)."""
    import json
    import shutil

    data_dir.mkdir()
    (data_dir / "train").symlink_to(source / "train")
    tokenizer = json.loads((source / "meta.json").read_text())["tokenizer"]
    shutil.copy(source / tokenizer, data_dir / tokenizer)
    record_tokenizer_of(data_dir, source)
    write_token_stream(data_dir / "val", [8])
    return data_dir
