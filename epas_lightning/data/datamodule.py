"""``TokenDataModule``: fixed-length blocks from a prepared litdata token stream."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from epas_lightning.data.layout import tokenizer_file
from epas_lightning.data.token_data import TokenData, check_seq_len, check_tokenized_as
from epas_lightning.data.tokenizer import RecordedTokenizer, tokenizer_sha256
from epas_lightning.errors import ConfigError, DataError
from epas_lightning.model.config import LlamaConfig
from epas_lightning.trainer_call import check_restored, restored_checkpoint

if TYPE_CHECKING:
    from litdata import StreamingDataLoader
    from torch.utils.data import DataLoader

    from epas_lightning.data.epochs import EpochLoader


class TokenDataModule(TokenData, LightningDataModule):
    """Batches of ``seq_len + 1`` consecutive tokens from prepared token streams (inputs and shifted targets).

    Each batch is an integer tensor of shape ``(batch_size, seq_len + 1)``: the model reads ``batch[:, :-1]`` and
    predicts ``batch[:, 1:]``. Tokens are stored as int32 and cast to int64 once the batch is on the device. Training
    batches are shuffled with ``seed``; under several ranks each rank reads its own part of every stream. Validation
    and test read every held-out sequence once, whatever the batch size and rank count (:meth:`val_dataloader`). The
    training loader's position is saved in checkpoints (Lightning stores stateful loaders), so a resumed run continues
    mid-epoch with the batches an uninterrupted run would have seen (with the same batch size, worker and rank
    counts), also from a data folder moved since (the same chunks: each stream's ``index.json``).

    Args:
        data_dir: Prepared data directory (``python -m epas_lightning prepare``) with ``train/``, ``val/``, the
            tokenizer and ``meta.json``, or a list of them to mix (see ``weights``). Leave unset to use the built-in
            corpus: the Python standard library of the running interpreter, tokenized once into the cache (no
            download).
        seq_len: Tokens per training sequence: the model's ``block_size`` (checked when a trainer runs an
            ``EPASModule``: equal for training, at most its context length for validation and testing).
        batch_size: Sequences per batch on each device.
        vocab_size: The model's vocabulary size (checked like ``seq_len``; unset: the model's, or 4096 without a
            trainer). The tokenizer must not have more tokens. With the built-in corpus it is also the size of the
            BPE vocabulary trained for it.
        num_workers: Dataloader worker processes (0 loads in the main process).
        seed: Seed of the shuffling order of the training stream (and of the mixing of several).
        weights: Sampling weights of the ``data_dir`` list (litdata ``CombinedStreamingDataset``): an epoch ends when
            one stream runs out. Unset: every stream is read in full, mixed in proportion to its length. All the
            directories must hold the same tokenizer.
        val_dir: Held-out data to validate and test on: a prepared directory (its ``val/`` is used) or a token
            stream directory (with ``index.json``). Default: the ``val/`` split of every ``data_dir``.
        max_bytes: Built-in corpus only: use just the first files totalling at most this many bytes (fast tests).
            Refused beside ``data_dir``, which is read whole; on the command line, one from a config file that a
            later ``data_dir`` overrides (``configs/debug.yaml``'s, with ``--data.data_dir``) is dropped.
        cache_dir: Built-in corpus only: where prepared corpora are cached. Default: ``$EPAS_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/epas_lightning`` or ``~/.cache/epas_lightning``. Refused beside ``data_dir``, as
            ``max_bytes`` is.
        resume_position: On resume, continue at the checkpoint's position in the data, which holds only for the data
            settings it was saved with (others are refused). ``False`` starts this data from its beginning instead,
            while the run's steps, optimizer, LR and sharing schedules resume: to go on with other data (a new
            mixture, more data prepared with the same tokenizer).
    """

    _train_loader: StreamingDataLoader | None = None
    """The training loader ``train_dataloader`` built last."""
    _val_check_batch: int | None = None
    """Lightning's ``val_check_batch`` while it is changed for an epoch that ended early
    (:meth:`_validate_at_an_early_epoch_end`)."""

    _moved_streams: dict[int, tuple[str, str]] = {}
    """The streams of a resumed position now at another path with the same chunks (:func:`moved_streams`)."""

    _resplit_note: str | None = None
    """What a resume under another batch size, worker or rank count does to the position, until it is said."""

    _train_contents: list[str | None] | None = None
    """The train streams' fingerprints (:func:`stream_fingerprint`), taken at ``fit``'s setup for its saves."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, TrainerFn.FITTING):
            self._train_contents = self._stream_fingerprints()
        trainer = getattr(self, "trainer", None)
        own = type(self).load_state_dict is TokenDataModule.load_state_dict  # one's own may rewrite what it reads
        if stage == TrainerFn.FITTING and trainer is not None and own:  # before Lightning loads the checkpoint
            check_restored(trainer, lambda ckpt_path, metadata: self.check_resumed_position(metadata, ckpt_path))

    def _stream_fingerprints(self) -> list[str | None]:
        return [stream_fingerprint(stream) for stream in self.train_streams()]

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints beside the loader's position: the settings that position only holds for."""
        return {"position_settings": self._position_settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before any batch, to resume a loader position under settings it cannot continue with (litdata
        fails inside a loader worker, or reads other samples): other streams, seed or sequence length, and for mixed
        streams another weighting, batch size, worker count or rank count. One stream resumes under another batch
        size, worker or rank count, inexactly (litdata splits the rest of the epoch anew), and says so."""
        saved = state_dict.get("position_settings")
        trainer = getattr(self, "trainer", None)
        if not saved or (trainer is not None and trainer.state.fn != TrainerFn.FITTING):  # validate/test: no position
            return
        self._adopt_position(saved)

    def _adopt_position(self, saved: dict[str, Any]) -> None:
        """Check the settings a saved position holds for (``saved``; a key it lacks is not compared) against this
        data's, or note that this data starts from its beginning (``resume_position`` false)."""
        self._position_settled = True
        trainer = getattr(self, "trainer", None)
        if not self.resume_position:
            self._fresh_position = True
            rank_zero_info(
                "data: resume_position is false: this data starts from its beginning; the run's steps, optimizer, LR "
                "and sharing schedules resume"
            )
            return
        current = self._position_settings()
        self._moved_streams = moved_streams(saved, current)
        if moved := self._moved_streams:  # the same chunks at another path: the position holds there
            rank_zero_info(
                "data: the checkpoint's data moved ("
                + "; ".join(f"{saved_path} -> {path}" for saved_path, path in moved.values())
                + "), its chunks the same (index.json): its position resumes there"
            )
        where = f"--ckpt_path {trainer.ckpt_path}" if trainer is not None else "--ckpt_path"
        if moved := self._refuse_other_position(saved, current, where):  # one stream: litdata's elastic resume
            self._resplit_note = (
                f"data: resumed with {', '.join(moved)}: litdata splits the rest of the epoch anew, so a few samples "
                "at the resumed position may be read twice or skipped"
            )
            if trainer is None:  # no fit's first batch to say it at
                rank_zero_info(self.take_resplit_note())

    def check_resumed_position(self, checkpoint: dict[str, Any], ckpt_path: object) -> None:
        """Refuse a resumed fit's position from the checkpoint's metadata (``checkpoint``, without its weights) before
        Lightning loads it, as :meth:`load_state_dict` does once it has: other streams, seed, sequence length, ...
        Nothing is adopted here, nor said; a checkpoint whose position says nothing readable is left to that check."""
        if not self.resume_position:
            return
        saved = (checkpoint.get(type(self).__qualname__) or {}).get("position_settings")
        if not isinstance(saved, dict):  # older than position_settings: the loader state litdata saved says them
            fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
            loaders = (fit_loop.get("state_dict") or {}).get("combined_loader")
            first = loaders[0] if isinstance(loaders, list) and loaders else None
            saved = position_settings_of(first, self.num_workers) if isinstance(first, dict) else None
        if saved:
            self._refuse_other_position(saved, self._position_settings(), f"--ckpt_path {ckpt_path}")

    def _refuse_other_position(self, saved: dict[str, Any], current: dict[str, Any], where: str) -> list[str]:
        """Refuse a saved position (``saved``, its settings) that this data (``current``) cannot continue: its data
        gone, or other streams, seed, sequence length (a mixture's: weights and layout too), or a folder prepared again
        since. Return how the layout (batch size, workers, ranks) of one stream changed: litdata resumes it anew."""
        if moved_streams(saved, current):  # the same chunks at another path: the position holds there
            saved = {**saved, "streams": current["streams"]}
        fixed, layout = ["streams", "seed", "seq_len"], ["batch_size", "num_workers", "world_size"]
        if len(current["streams"]) > 1 or len(saved["streams"]) > 1:
            fixed += ["weights", *layout]

        if saved.get("streams") == current["streams"]:  # the same folders, prepared again since: other samples
            fixed.append("contents")

        def differ(keys: list[str]) -> list[str]:
            kept = [key for key in keys if key in saved and not same_setting(key, saved[key], current[key])]
            return [PREPARED_AGAIN if key == "contents" else f"{key} {saved[key]} -> {current[key]}" for key in kept]

        changed = differ(fixed)
        gone = [stream for stream in saved.get("streams", []) if not Path(stream).exists()]
        if "streams" in saved and saved["streams"] != current["streams"] and gone:
            raise DataError(  # "resume with those settings" cannot be followed: the built-in corpus of an older version
                f"the data the checkpoint's position belongs to is gone ({', '.join(gone)})",
                where,
                "go on with this data from its beginning with --data.resume_position false (the run's steps, "
                "optimizer, LR and sharing schedules resume), or give the folder that data is in now, or move it back "
                "to its path (or prepare it again there), to resume its position",
            )
        if changed:
            fix = "go on with this data from its beginning with --data.resume_position false"
            if changed != [PREPARED_AGAIN]:  # settings one can give again; a folder prepared anew is not
                fix = f"resume with those settings (data.*, trainer.devices/num_nodes), or {fix}"
            raise DataError(
                "the checkpoint's position in the data holds only for the data settings it was saved with ("
                + "; ".join(changed)
                + ")",
                where,
                fix,
            )
        return differ([key for key in layout if key not in fixed])

    @property
    def _data_dir_flag(self) -> str:
        """Where the user set the data folders, as errors name it."""
        return f"data.data_dir {', '.join(map(str, self.data_dirs))}"

    def _position_settings(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        return {
            "streams": [str(stream.resolve()) for stream in self.train_streams()],
            "contents": self._stream_fingerprints() if self._train_contents is None else self._train_contents,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "weights": self.weights,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": trainer.world_size if trainer is not None else 1,
        }

    def check_fits_model(self) -> None:
        """Before any data is read, check the data against the model the trainer runs (the CLI links the two; a
        script of your own may not): ``vocab_size`` is the model's (unset: taken from it), ``seq_len`` is its
        ``block_size`` for training and within its context length for validation and testing."""
        trainer = self.trainer
        config = getattr(trainer.lightning_module, "config", None) if trainer is not None else None
        if not isinstance(config, LlamaConfig):
            return
        if self.vocab_size is None:
            self.vocab_size = config.vocab_size
        elif self.vocab_size != config.vocab_size:
            raise ConfigError(
                f"the data's vocab_size ({self.vocab_size}) is not the model's ({config.vocab_size})",
                "data.vocab_size",
                "set it to model.config.vocab_size, or leave it unset to take the model's",
            )
        check_seq_len(self.seq_len, config, fitting=trainer.state.fn == TrainerFn.FITTING)

    def check_model_tokenizer(self) -> None:
        """Data tokenized with another vocabulary than the model the run starts from (the module's
        ``source_tokenizer``: ``init_from``'s, where it has one) is refused before any step: its ids would stand for
        other tokens than the weights learned, and days of training would fit them to noise."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        source = getattr(module, "source_tokenizer", None)
        if source is None:
            if not getattr(module, "starts_from_untokenized_source", False):
                return
            if sha256 := getattr(module, "source_tokenizer_sha256", None):  # its file gone when it was consolidated
                self._check_tokenizer_hash(sha256, module.init_from)
            else:
                rank_zero_warn(
                    f"model.init_from {module.init_from} holds no tokenizer (tokenizer.json or tokenizer.model): the "
                    f"data's ids ({tokenizer_file(self.data_dirs[0])}) are not checked against the vocabulary its "
                    "weights learned; prepare data.data_dir with the model's own tokenizer"
                )
            return
        fix = f"prepare the data with --tokenizer {source.path} (the tokenizer of model.init_from)"
        # setup found every data_dir, and a prepared val_dir, tokenized with one file: comparing the first suffices
        check_tokenized_as(self.data_dirs[0], source, self._data_dir_flag, fix)

    def _check_tokenizer_hash(self, sha256: str, init_from: str) -> None:
        """Data whose tokenizer file is not the one ``init_from``'s weights trained with (the ``sha256`` it records
        without the file) is refused: the hash is all that can be compared."""
        data_tokenizer = tokenizer_file(self.data_dirs[0])
        if tokenizer_sha256(data_tokenizer) != sha256:
            raise DataError(
                f"prepared with another tokenizer ({data_tokenizer}) than the one the weights of model.init_from "
                f"{init_from} trained with (it records the file's hash, not the file)",
                self._data_dir_flag,
                "prepare the data with the tokenizer the weights trained with",
            )

    def vocab_size_fix(self) -> str:
        """A fit that starts from ``init_from`` takes its vocabulary from those weights (a ``model.config.vocab_size``
        of another size is refused): the data must be of a tokenizer that fits them."""
        trainer = self.trainer
        init_from = getattr(trainer.lightning_module, "init_from", None) if trainer is not None else None
        if init_from is None or restored_checkpoint(trainer) is not None:
            return super().vocab_size_fix()
        return f"prepare the data with the tokenizer of model.init_from {init_from} (at most {self.vocab_size} ids)"

    def check_checkpoint_tokenizer(self, recorded: dict[str, Any] | None, trained_on: list[str] | None = None) -> None:
        """Data tokenized with another vocabulary than the checkpoint a run resumes (or scores) is refused before its
        weights load: ``recorded`` is the checkpoint's tokenizer entry, checked where its file still exists, and by
        the hash it records where the checkpoint's data folder was prepared again since (the file changed or gone).
        The refusal names the data folders the checkpoint trained on (``trained_on``) where they are still there:
        a resume that left out its ``--data.data_dir`` reads the built-in corpus."""
        if not recorded or not recorded.get("path") or not self.data_dirs:
            return
        tokenizer = RecordedTokenizer(Path(recorded["path"]), recorded.get("sha256"))
        fix = f"use data prepared with --tokenizer {tokenizer.path}, the checkpoint's"
        if own := existing_data_dirs(trained_on):
            fix = f"set data.data_dir to {own} (the data the checkpoint trained on), or {fix}"
        check_tokenized_as(self.data_dirs[0], tokenizer, self._data_dir_flag, fix, whose="the checkpoint's")

    def _ranks(self) -> tuple[int, int, int] | None:
        """The trainer's ranks: litdata took the environment's ``WORLD_SIZE``, ``GLOBAL_RANK`` and ``NNODES`` over
        them, so that a job script's leftover export made a fit on one device train and validate on a quarter of its
        data, without a word. ``None`` without a trainer (litdata's own: a process group's, or the environment's)."""
        trainer = getattr(self, "trainer", None)
        ranks = tuple(getattr(trainer, name, None) for name in ("world_size", "global_rank", "num_nodes"))
        return ranks if all(isinstance(n, int) for n in ranks) else None  # type: ignore[return-value]

    def train_dataloader(self) -> StreamingDataLoader:
        from epas_lightning.data.epochs import EpochLoader

        # overfit_batches: the same first batches each epoch (Lightning turns shuffling off through a sampler, which
        # a streaming dataset does not use)
        shuffle = not getattr(self.trainer, "overfit_batches", 0)
        loader = self._dataloader(self.train_streams(), shuffle=shuffle, weights=self.weights, loader=EpochLoader)
        loader.trainer_epoch = self._trainer_epoch
        loader.read_ahead = self.weights is not None and len(self.data_dirs) > 1  # its epoch may end before its length
        self._end_epochs_together(loader)
        self._train_loader = loader
        restore = loader.load_state_dict

        def load_position(state: dict[str, Any]) -> None:  # Lightning hands a resumed fit's position to the loader
            if not self._position_settled:  # a checkpoint older than position_settings: litdata's state says them
                self._adopt_position(position_settings_of(state, self.num_workers))
            if not self._fresh_position:  # else this loader keeps its own
                with _ranks_in_environment(self._ranks()):
                    restore(relocated(state, self._moved_streams, loader.dataset))

        loader.load_state_dict = load_position
        if len(loader) == 0:
            raise self._too_short_to_train(loader)
        self._check_validation_interval(len(loader))
        return loader

    def _end_epochs_together(self, loader: EpochLoader) -> None:
        """Under several ranks, have every rank end each epoch at one batch: the loaders' length is the shortest
        rank's (one stream's parts can be of other lengths too: a rank that read on would hang), and for a weighted
        mixture the ranks agree on each batch whether all have the next (``EpochLoader``'s ``every_rank_has``).
        Lightning asks every rank for its training loader at once."""
        trainer = getattr(self, "trainer", None)
        if getattr(trainer, "world_size", 1) < 2:  # no trainer, one rank, or a test's stand-in
            return
        strategy = trainer.strategy  # its device: NCCL reduces CUDA tensors only
        length = torch.tensor(len(loader), device=strategy.root_device)
        loader.agreed_length = int(strategy.reduce(length, reduce_op="min"))
        if loader.read_ahead:
            loader.every_rank_has = strategy.reduce_boolean_decision

    def _too_short_to_train(self, loader: StreamingDataLoader) -> DataError:
        """The training data holds not one batch. In a weighted mixture, whose epoch ends when a stream runs out, the
        streams too short for one batch at their weight are named (the error named every folder of the mixture)."""
        where, what, per = self._data_dir_flag, "the training stream holds", "each rank and loader worker"
        if short := self._short_of_a_batch(loader):
            where, per = f"data.data_dir {', '.join(map(str, short))}", f"{per}, at its weight"
            what = (
                "with data.weights an epoch ends when a stream runs out, and the training stream of this folder holds"
            )
        return DataError(
            f"{what} fewer than batch_size={self.batch_size} sequences of {self.seq_len + 1} tokens (for {per}): not "
            "one training step",
            where,
            "lower data.batch_size, data.num_workers or the sequence length (model.config.block_size), or prepare more "
            "data" + (" (or leave the folder out of the mixture)" if short else ""),
        )

    def _short_of_a_batch(self, loader: StreamingDataLoader) -> list[Path]:
        """The folders of a weighted mixture whose training stream alone ends an epoch before one batch."""
        weights = getattr(loader.dataset, "_weights", None)
        if self.weights is None or weights is None or len(self.data_dirs) < 2:
            return []
        lengths = [d.get_len(self.num_workers, self.batch_size) for d in loader.dataset._datasets]
        return [d for d, n, w in zip(self.data_dirs, lengths, weights, strict=True) if w and n / w < self.batch_size]

    def _trainer_epoch(self) -> int | None:
        """The epoch the training loader is read for: the fit loop's epochs done so far (also when a resume starts it,
        before Lightning counts the checkpoint's last epoch as done); ``None`` (litdata's own count) without a trainer
        or after ``resume_position: false``."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._fresh_position:
            return None
        fit_loop = trainer.fit_loop
        return fit_loop.epoch_progress.current.processed + resumed_after_its_epochs_last_batch(fit_loop)

    def _check_validation_interval(self, epoch: int) -> None:
        """A validation interval in batches longer than the data's epoch of ``epoch`` batches, where Lightning refuses
        it once the data is read, with a traceback (``trainer_checks`` checks it against ``limit_train_batches``)."""
        trainer = getattr(self, "trainer", None)
        interval = getattr(trainer, "val_check_interval", None)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= epoch:
            return
        if trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches:  # across epochs, or none at all
            return
        if getattr(trainer, "_val_check_time_interval", None) is not None:  # Lightning's time-based validation
            return
        batches = f"{epoch} batch{'es' if epoch != 1 else ''}"
        raise DataError(
            f"an epoch of the training stream is {batches}, fewer than trainer.val_check_interval ({interval})",
            self._data_dir_flag,
            f"lower trainer.val_check_interval to at most {epoch}, set trainer.check_val_every_n_epoch: null to count "
            "batches across epochs, or prepare more data",
        )

    def _validate_at_an_early_epoch_end(self) -> None:
        """Let Lightning validate at the end of an epoch that came before the loader's length. A weighted mixture's
        epoch ends when a stream runs out, which its length only estimates (a few batches short where some workers'
        parts of a stream are shorter, or by chance); validation at a fraction of an epoch (``val_check_interval``
        1.0, Lightning's default: at each epoch's end) counts batches up to that length, so it never came, nor a save
        on ``val/loss``. On such an epoch's last batch (the loader reads one ahead) Lightning's batch count to validate
        at becomes this batch's; the next batch (or the end of the stage) puts Lightning's back."""
        trainer = getattr(self, "trainer", None)
        self._put_back_val_check_batch()
        if trainer is None or not trainer.training or not getattr(self._train_loader, "last_batch", False):
            return
        batches = trainer.fit_loop.epoch_loop.batch_idx + 2  # this batch's count: Lightning counts it ready after us
        every = trainer.val_check_batch
        if batches >= trainer.num_training_batches or every in (None, float("inf")) or batches % every == 0:
            return  # the end Lightning counts on, or validation due at this batch anyway
        by_fraction = isinstance(trainer.val_check_interval, float) and trainer.check_val_every_n_epoch is not None
        if by_fraction and getattr(trainer, "_val_check_time_interval", None) is None:
            self._val_check_batch, trainer.val_check_batch = every, batches

    def teardown(self, stage: str) -> None:
        self._put_back_val_check_batch()

    def _put_back_val_check_batch(self) -> None:
        """Put back Lightning's ``val_check_batch`` where :meth:`_validate_at_an_early_epoch_end` changed it."""
        if self._val_check_batch is not None and (trainer := getattr(self, "trainer", None)) is not None:
            trainer.val_check_batch = self._val_check_batch
        self._val_check_batch = None

    def val_dataloader(self) -> DataLoader:
        """The held-out split, every sequence once at any batch size and rank count (a rank's last batches filled
        with pad rows the loss ignores). Without one sequence, ``fit`` skips validation (and says so); ``validate``
        is refused, with nothing to validate."""
        loader = self.heldout_dataloader()
        if len(loader) == 0:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.state.fn == TrainerFn.VALIDATING:
                raise self._heldout_too_short("validate")
            rank_zero_warn(
                f"The validation stream {self.val_streams()[0]} holds no sequence of {self.seq_len + 1} tokens: "
                "validation will be skipped."
            )
        return loader

    def test_dataloader(self) -> DataLoader:
        """The held-out split (there is no separate test split): ``test`` reports held-out loss and perplexity."""
        loader = self.heldout_dataloader()
        if len(loader) == 0:
            raise self._heldout_too_short("test")
        return loader

    def _heldout_too_short(self, command: str) -> DataError:
        """``validate`` or ``test`` on a held-out split without one sequence: it ran nothing and exited 0."""
        return DataError(
            f"the held-out stream holds no sequence of {self.seq_len + 1} tokens: nothing to {command}",
            self.val_streams()[0],
            "lower the sequence length (model.config.block_size), or hold out more data (data.val_dir)",
        )

    def take_resplit_note(self) -> str | None:
        """The line a resume under another batch size, worker or rank count gets (the position is inexact), once;
        ``None`` where there is none. A LightningModule takes it before the first batch to say it in its own line
        (``EPASModule``: with the global batch that changed with it); else the first training batch says it."""
        note, self._resplit_note = self._resplit_note, None
        return note

    def on_before_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        """Refuse token ids outside the vocabulary on the host, before a GPU's embedding ends the run with a
        device-side assert (:meth:`TokenData.check_batch`); validate at an epoch's end that came early. The first
        training batch says a resumed position's :meth:`take_resplit_note` that no LightningModule took."""
        self._validate_at_an_early_epoch_end()
        trainer = getattr(self, "trainer", None)
        heldout = trainer is not None and not trainer.training
        if trainer is not None and not heldout and (note := self.take_resplit_note()) is not None:  # not at the
            rank_zero_info(note)  # sanity validation, which runs before fit's on_train_start
        return self.check_batch(batch, heldout=heldout)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        """Tokens are stored as int32; embeddings and cross-entropy targets want int64 (cast on the device)."""
        return batch.long()


def resumed_after_its_epochs_last_batch(fit_loop: Any) -> bool:
    """Whether a resumed fit's checkpoint was saved after its epoch's last batch, inside that epoch (at the batch's
    end: ``every_n_train_steps``, ``train_time_interval``). Lightning counts that epoch done as its loop resets, after
    it started the training loader: the loader took the position for one in the epoch under way, and read the rest of
    the data after it (a weighted mixture's other streams, what ``limit_train_batches`` left) as the next epoch."""
    if not fit_loop.restarting:
        return False
    epochs, progress = fit_loop.epoch_progress.total, fit_loop.epoch_loop.batch_progress
    batches = progress.total
    inside_the_epoch = epochs.ready == epochs.started == epochs.processed + 1 == epochs.completed + 1
    at_a_batch_end = batches.ready == batches.started == batches.processed == batches.completed + 1
    return inside_the_epoch and at_a_batch_end and progress.is_last_batch


def moved_streams(saved: dict[str, Any], current: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """The streams of a saved position (``saved``, its settings) that are now at another path with the same chunks
    (their ``index.json`` fingerprints), by index: (saved path, current path). Empty where any stream differs in
    contents, or their number differs: that is other data."""
    paths, contents = saved.get("streams"), saved.get("contents")
    if not paths or not contents or None in contents or contents != current["contents"]:
        return {}
    return {i: (old, new) for i, (old, new) in enumerate(zip(paths, current["streams"], strict=True)) if old != new}


def relocated(state: dict[str, Any], moved: dict[int, tuple[str, str]], dataset: Any) -> dict[str, Any]:
    """A litdata loader ``state`` whose streams ``moved`` (:func:`moved_streams`) name their current folders, as the
    loader's ``dataset`` has them (litdata refuses a position saved under another ``input_dir``)."""
    if not moved or not isinstance(state.get("dataset"), dict):
        return state
    streams = getattr(dataset, "_datasets", [dataset])  # a mixture's, or the one stream
    saved = dict(state["dataset"])
    if "input_dir_path" in saved:  # one stream
        return {**state, "dataset": {**saved, "input_dir_path": streams[0].input_dir.path}}
    for i in moved:
        if isinstance(saved.get(str(i)), dict):
            saved[str(i)] = {**saved[str(i)], "input_dir_path": streams[i].input_dir.path}
    return {**state, "dataset": saved}


RANK_VARIABLES = ("WORLD_SIZE", "GLOBAL_RANK", "NNODES")
"""What litdata's ``_DistributedEnv.detect`` reads of the environment, over the process group's ranks."""


@contextmanager
def _ranks_in_environment(ranks: tuple[int, int, int] | None) -> Iterator[None]:
    """The environment naming ``ranks`` (the trainer's, which the datasets are dealt to) while a loader loads its
    position: litdata reads it there again, and took a job script's leftover ``WORLD_SIZE`` for a resume on other
    ranks than the position's (a mixture's it refused: "support resume only when world_size ... match")."""
    if ranks is None:
        yield
        return
    kept = {name: os.environ.get(name) for name in RANK_VARIABLES}
    os.environ.update(zip(RANK_VARIABLES, map(str, ranks), strict=True))
    try:
        yield
    finally:
        for name, value in kept.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def position_settings_of(state: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """The settings a litdata loader ``state`` holds for, as ``TokenDataModule`` saves them beside it (checkpoints
    written before it did have this state only; a mixture's weights are not in it). litdata counts ``num_workers``
    0 as 1: such a count is taken as the current one, ``num_workers``."""
    dataset = state.get("dataset") or {}
    streams = [dataset] if "input_dir_path" in dataset else [s for s in dataset.values() if isinstance(s, dict)]
    if not streams or any("input_dir_path" not in s for s in streams):
        return {}
    first, settings = streams[0], {"streams": [str(Path(s["input_dir_path"]).resolve()) for s in streams]}
    for key in ("seed", "batch_size", "world_size"):
        if key in first:
            settings[key] = first[key]
    if block := (first.get("item_loader") or {}).get("block_size"):
        settings["seq_len"] = block - 1  # seq_len + 1 tokens a sample
    if "num_workers" in first:
        settings["num_workers"] = num_workers if first["num_workers"] == max(num_workers, 1) else first["num_workers"]
    return settings


def same_setting(key: str, saved: Any, current: Any) -> bool:
    """Whether a saved position's setting ``key`` is the current one: weights by the mix they make (litdata divides
    them by their sum, so ``[1, 2]`` and ``[0.5, 1]`` draw the same streams), the others as they are."""
    if key != "weights" or saved is None or current is None or len(saved) != len(current):
        return saved == current
    return all(math.isclose(a / sum(saved), b / sum(current)) for a, b in zip(saved, current, strict=True))


PREPARED_AGAIN = "data.data_dir prepared again since: its chunks are others"
"""How a resume names a data folder whose streams changed under the same path."""


def stream_fingerprint(stream: Path) -> str | None:
    """A short hash of a token stream's ``index.json`` (its chunks and their sizes), which changes when the folder is
    prepared again; ``None`` without one."""
    try:
        return hashlib.sha256((stream / "index.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def existing_data_dirs(data_dirs: list[str] | None) -> str | None:
    """``data_dirs`` as ``data.data_dir`` takes them (one folder, or a YAML list), where every one still exists."""
    if not data_dirs or not all(Path(folder).is_dir() for folder in data_dirs):
        return None
    return data_dirs[0] if len(data_dirs) == 1 else f"[{', '.join(data_dirs)}]"
