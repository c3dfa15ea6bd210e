"""Tokenizing documents into litdata token streams, in worker processes, with progress.

Every document becomes ``BOS + tokens + EOS`` (int32) in litdata chunks; several processes tokenize groups of files
(or parts of a large file, :mod:`~epas_lightning.data.parts`) of about equal size, and the stream keeps the input
order.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import multiprocessing
import os
import queue
import random
import shutil
import signal
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from epas_lightning.data.layout import count_stream_tokens
from epas_lightning.data.sources import BadDocument, DataPreparationError, InputFile, split_documents
from epas_lightning.data.tokenizer import load_tokenizer_once
from epas_lightning.errors import process_ending
from epas_lightning.outputs import WRITE_ERRORS, quoted_os_errors
from epas_lightning.worker_processes import never_collect_inherited_objects, print_stack_on_crash

if TYPE_CHECKING:
    import torch

TOKEN_DTYPE = np.int32
CHUNK_BYTES = "8MB"
_DOCS_PER_BATCH = 256
_BYTES_PER_BATCH = 4 * 2**20
"""Documents are encoded in batches of at most ``_DOCS_PER_BATCH`` documents or this many bytes: a tokenizer holds many
times a batch's size in memory while it encodes it (256 books would not fit)."""
_BYTES_PER_WORK_ITEM = 32 * 2**20
_MIN_PART_BYTES = 2**20
"""A large JSONL or parquet file is cut into parts of the bytes a work item reads, but none smaller than this."""


@dataclass(frozen=True)
class WorkItem:
    """One ``litdata.optimize`` input: some files, tokenized for one split by one worker."""

    files: tuple[InputFile, ...]
    split: str
    val_fraction: float
    text_field: str
    tokenizer_path: str
    bos_token: str | None
    eos_token: str | None
    on_bad: str
    stats_dir: str


def tokenize_work_item(item: WorkItem) -> Iterator[torch.Tensor]:
    """``litdata.optimize`` work function: one ``BOS + tokens + EOS`` int32 tensor per document.

    Writes ``documents/bytes/tokens/copies_of_val/skipped`` to a file in ``item.stats_dir`` (workers are separate
    processes), the message of a fatal input error to ``error-*.txt`` there and the traceback of any other failure to
    ``crash-*.txt``, so the parent can re-raise them cleanly.
    """
    import torch

    stats = {"documents": 0, "bytes": 0, "tokens": 0, "copies_of_val": 0, "skipped": []}

    def on_bad(bad: BadDocument) -> None:
        if item.on_bad == "fail":
            raise DataPreparationError(bad.reason, bad.where, "pass --on-bad skip to skip it")
        stats["skipped"].append([bad.where, bad.reason])

    def on_held() -> None:  # a training document that is a copy of a validation one: left out
        stats["copies_of_val"] += 1

    def encode(texts: list[str]) -> Iterator[torch.Tensor]:
        for ids in tokenizer.encode_batch(texts, threads=False):  # forked: starting threads is unsafe
            stats["tokens"] += len(ids) + 2
            yield torch.from_numpy(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=TOKEN_DTYPE))

    try:
        tokenizer = load_tokenizer_once(item.tokenizer_path, item.bos_token, item.eos_token)
        batch: list[str] = []
        batch_bytes = 0
        for text in split_documents(item.files, item.split, item.val_fraction, item.text_field, on_bad, on_held):
            n_bytes = len(text.encode("utf-8"))
            if batch and batch_bytes + n_bytes > _BYTES_PER_BATCH:
                yield from encode(batch)
                batch, batch_bytes = [], 0
            stats["documents"] += 1
            stats["bytes"] += n_bytes
            batch.append(text)
            batch_bytes += n_bytes
            if len(batch) >= _DOCS_PER_BATCH:
                yield from encode(batch)
                batch, batch_bytes = [], 0
        yield from encode(batch)
    except DataPreparationError as e:
        # Returning (not raising) lets litdata shut down cleanly: after a worker raises, it leaves an orphaned
        # helper process behind. The parent raises the error once ``optimize`` returns.
        Path(item.stats_dir, f"error-{uuid.uuid4().hex}.txt").write_text(json.dumps([e.what, e.where, e.fix]))
        return
    except Exception:  # a bug: the same way out, for the same reason
        Path(item.stats_dir, f"crash-{uuid.uuid4().hex}.txt").write_text(traceback.format_exc())
        return
    Path(item.stats_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(stats))


def default_num_workers() -> int:
    """CPU cores available to this process."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_start_method() -> str:
    """``fork`` on Linux: workers start instantly and never re-import ``__main__``.

    Under ``spawn`` (litdata's default) each worker re-imports torch, and a script without an
    ``if __name__ == "__main__"`` guard would re-run its top level in every worker.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


def work_item_count(total_bytes: int, num_workers: int) -> int:
    """Work items enough to share the input among the workers (some finish early) and to keep each small."""
    return max(max(1, num_workers) * 4, total_bytes // _BYTES_PER_WORK_ITEM)


def part_bytes(files: Sequence[InputFile], num_workers: int) -> int:
    """The bytes of input of a work item: a larger file is cut into parts this large (:mod:`~.parts`)."""
    total = sum(f.n_bytes for f in files)
    return max(_MIN_PART_BYTES, total // work_item_count(total, num_workers))


def make_work_groups(files: Sequence[InputFile], n_groups: int) -> list[tuple[InputFile, ...]]:
    """Cut the (ordered) files into at most ``n_groups`` contiguous groups of roughly equal byte size."""
    n_groups = max(1, min(n_groups, len(files)))
    target = sum(f.n_bytes for f in files) / n_groups
    groups: list[list[InputFile]] = [[]]
    filled = 0
    for f in files:
        if groups[-1] and filled >= target * len(groups) and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(f)
        filled += f.n_bytes
    return [tuple(g) for g in groups]


@contextlib.contextmanager
def isolated_litdata(scratch_dir: Path) -> Iterator[None]:
    """Undo ``litdata.optimize``'s process-wide side effects.

    It reseeds the global ``random``/NumPy/torch RNGs (which would override a user's ``seed_everything`` on the
    first run only), forces the multiprocessing start method, sets an env var, and wipes its shared scratch dirs
    under ``/tmp`` (which would break concurrent builds). Give it private scratch dirs instead. Its Ctrl+C handler
    ends the process with exit status 0 and no clean-up (a half-built output stays, a script carries on), and
    SIGTERM ended the parent alone: here either stops the workers (:class:`_WorkerStopper`) and raises
    ``KeyboardInterrupt``. A worker that fails in litdata's own code (a chunk it cannot write) ends its helper
    processes, which litdata leaves waiting for work, and its error is raised even when it came after its last item
    (litdata returned as if the stream were complete). A document larger than a chunk makes that chunk larger, as it
    should, without litdata's warning (forked workers inherit the filter).
    """
    import torch
    from litdata.processing.data_processor import BaseWorker, DataProcessor, DataWorkerProcess

    rng_states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    start_method = multiprocessing.get_start_method(allow_none=True)
    signal_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    litdata_logger = logging.getLogger("litdata")
    litdata_level = litdata_logger.level
    litdata_logger.setLevel(logging.WARNING)
    env_overrides = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(scratch_dir / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(scratch_dir / "data"),
        "DATA_OPTIMIZER_NUM_WORKERS": None,
        # Forked workers must not use the tokenizer's thread pool (already started by training): say so quietly.
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved_env = {k: os.environ.get(k) for k in env_overrides}
    for key, value in env_overrides.items():
        if value is not None:
            os.environ[key] = value
    litdata_interrupt = DataProcessor._signal_handler
    litdata_run, litdata_worker_run = DataProcessor.run, BaseWorker.run
    stopper = _WorkerStopper()
    DataProcessor._signal_handler = stopper.handler()
    DataProcessor.run = _checked_run(litdata_run)
    BaseWorker.run = _ending_helpers(litdata_worker_run, parent=os.getpid())
    litdata_start = vars(DataWorkerProcess).get("start")  # None: inherited from Process
    DataWorkerProcess.start = stopper.starting_worker(DataWorkerProcess.start)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "An item was larger than the target chunk size", UserWarning)
            yield
    finally:
        DataProcessor._signal_handler = litdata_interrupt
        DataProcessor.run, BaseWorker.run = litdata_run, litdata_worker_run
        if litdata_start is None:
            del DataWorkerProcess.start
        else:
            DataWorkerProcess.start = litdata_start
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for signum, handler in signal_handlers.items():
            signal.signal(signum, handler)
        litdata_logger.setLevel(litdata_level)
        multiprocessing.set_start_method(start_method, force=True)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.random.set_rng_state(rng_states[2])
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _ending_helpers(run: Callable[[Any], None], parent: int) -> Callable[[Any], None]:
    """A litdata worker's ``run`` that ends the worker's helper processes however it ends, and the worker when the
    command (``parent``) dies. After a failure litdata leaves them waiting for work: the worker could not exit (its last
    chunk unwritten, the parent waited for it forever), or they outlived the command."""

    @functools.wraps(run)
    def run_then_end_helpers(worker: Any) -> None:
        _stop_with(parent)
        print_stack_on_crash()
        os.register_at_fork(after_in_child=_killed_with_parent)  # its helpers: a worker killed outright leaves them
        try:
            run(worker)
        finally:
            for helper in multiprocessing.active_children():
                helper.terminate()

    return run_then_end_helpers


_PR_SET_PDEATHSIG = 1


def _killed_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux): a helper of a worker that was killed outright
    (``kill -9``, the OOM killer) waited for work for good, an orphan. Helpers hold nothing worth a clean end."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop_with(parent: int) -> None:
    """Have the kernel send this worker SIGTERM (its handler ends it and its helpers) when the command that started it
    dies, killed outright too (``kill -9``, the OOM killer), on Linux: orphaned, it tokenized on for as long as its
    share took."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl (macOS): left to run
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before that
        os.kill(os.getpid(), signal.SIGTERM)


def _checked_run(run: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """litdata's ``DataProcessor.run`` that stops on SIGTERM as on Ctrl+C, and raises, as litdata does for the others,
    a worker's error reported after its last item was counted (writing its last chunk): litdata checks for errors
    only until then."""

    @functools.wraps(run)
    def run_then_raise(processor: Any, recipe: Any) -> None:
        signal.signal(signal.SIGTERM, processor._signal_handler)  # litdata sets it for SIGINT; workers inherit both
        run(processor, recipe)
        with contextlib.suppress(queue.Empty):  # the workers have exited: what they reported is in the queue
            raise RuntimeError(f"We found the following error {processor.error_queue.get_nowait()}.")
        # litdata takes workers that all ended for workers that all finished: one killed (the OOM killer, a C++
        # abort) left its share out of a dataset called complete.
        if ended := next((worker.exitcode for worker in processor.workers if worker.exitcode), None):
            raise WorkerEnded(ended)

    return run_then_raise


class WorkerEnded(RuntimeError):
    """A tokenizing worker process that ended before its share was done; ``status``: its exit status (negative: the
    signal that ended it), or None when it is not known."""

    def __init__(self, status: int | None) -> None:
        self.status = status
        ended = "ended" if status is None else ("was " if status < 0 else "ended with ") + process_ending(status)
        super().__init__(f"a tokenizing worker process {ended} before it finished its share")


_STOP_ATTEMPTS = 5
"""Times a worker is signalled, a second apart, before it is killed."""


class _WorkerStopper:
    """A Ctrl+C (and SIGTERM) handler for litdata's ``DataProcessor``: the parent passes the signal to the worker
    processes this run started, waits for them and raises ``KeyboardInterrupt``. A worker, or a helper process of one
    (forked with this handler, and signalled too by a Ctrl+C in a terminal), ends its own helpers and exits.

    The workers are the parent's live child processes that were not there before (litdata records its workers only
    once all have started: a worker that signalled before that outlived the command, which then waited for it). A
    signal that comes while a worker is being started is acted on once it is a known child.
    """

    def __init__(self) -> None:
        self.parent_pid = os.getpid()
        self.others = set(multiprocessing.active_children())  # the caller's own processes: never signalled
        self.starting = False
        self.pending: int | None = None

    def handler(self) -> Callable[[Any, int, Any], None]:
        """The ``DataProcessor._signal_handler`` to install."""

        def handler(processor: Any, signum: int, frame: Any) -> None:
            self.stop(signum)

        return handler

    def stop(self, signum: int) -> None:
        if os.getpid() != self.parent_pid:  # a worker, or a helper of one: its helpers hold nothing worth a clean end
            for helper in multiprocessing.active_children():
                helper.kill()  # a SIGTERM to a helper just forked could be lost (below), leaving it waiting for good
            os._exit(128 + signum)
        if self.starting:
            self.pending = signum
            return
        workers = [p for p in multiprocessing.active_children() if p not in self.others]
        # A signal that reaches a process in the instant after its fork is lost (Python clears pending signals
        # there): one a worker missed is sent again, so that the worker still ends its helpers, before it is killed.
        for _ in range(_STOP_ATTEMPTS):
            if not (alive := [worker for worker in workers if worker.is_alive()]):
                break
            for worker in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)
            deadline = time.monotonic() + 1
            for worker in alive:
                worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        interrupt = KeyboardInterrupt()
        interrupt.signum = signum  # the command line exits with 128 + signum, naming the signal
        raise interrupt

    def starting_worker(self, start: Callable[[Any], None]) -> Callable[[Any], None]:
        """A worker's ``start`` during which a signal waits until the worker is a known child."""

        @functools.wraps(start)
        def start_then_stop_if_signalled(worker: Any) -> None:
            self.starting = True
            try:
                start(worker)
            finally:
                self.starting = False
            if self.pending is not None:
                self.stop(self.pending)

        return start_then_stop_if_signalled


def write_split(
    files: Sequence[InputFile],
    split: str,
    output_dir: Path,
    *,
    tokenizer_path: Path,
    val_fraction: float,
    text_field: str = "text",
    bos_token: str | None = None,
    eos_token: str | None = None,
    on_bad: str = "skip",
    num_workers: int = 1,
    progress: bool = False,
) -> dict:
    """Tokenize the ``split`` documents of ``files`` into a litdata token stream; returns its statistics."""
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    files = [f for f in files if f.split in (split, "hash")]
    scratch = output_dir.parent / f".scratch-{output_dir.name}"
    stats_dir = scratch / "stats"
    stats_dir.mkdir(parents=True)
    groups = make_work_groups(files, n_groups=work_item_count(sum(f.n_bytes for f in files), num_workers))
    items = [
        WorkItem(g, split, val_fraction, text_field, str(tokenizer_path), bos_token, eos_token, on_bad, str(stats_dir))
        for g in groups
    ]
    workers = max(1, min(num_workers, len(items)))
    never_collect_inherited_objects()
    with isolated_litdata(scratch / "litdata"), progress_bar(stats_dir, len(items), split, enabled=progress):
        try:
            optimize(
                fn=tokenize_work_item,
                inputs=items,
                output_dir=str(output_dir),
                chunk_bytes=CHUNK_BYTES,
                item_loader=TokensLoader(),
                num_workers=workers,
                keep_data_ordered=True,
                start_method=worker_start_method(),
                verbose=False,
            )
        except WorkerEnded as e:
            raise worker_lost(e, split, workers) from None
        except RuntimeError as e:
            # litdata's own writes (a worker's reads end in tokenize_work_item): a failing disk names no file, and one
            # naming a file outside this split's folders (an input) is not the output's
            quoted = quoted_os_errors(str(e))
            if written := [code for code, file in quoted if code in WRITE_ERRORS and in_split(file, output_dir)]:
                raise OSError(written[0], os.strerror(written[0]), str(output_dir)) from e
            raise RuntimeError(f"Tokenizing the {split} split into {output_dir} failed: {e}") from e
    if errors := sorted(stats_dir.glob("error-*.txt")):
        raise DataPreparationError(*json.loads(errors[0].read_text()))
    if crashes := sorted(stats_dir.glob("crash-*.txt")):
        raise RuntimeError(f"Tokenizing the {split} split failed in a worker:\n{crashes[0].read_text()}")
    if len(list(stats_dir.glob("*.json"))) < len(items):  # each work item done writes one
        raise worker_lost(WorkerEnded(None), split, workers)
    stats = {"documents": 0, "bytes": 0, "tokens": 0, "copies_of_val": 0, "skipped": []}
    for path in stats_dir.glob("*.json"):
        for key, value in json.loads(path.read_text()).items():
            stats[key] += value
    shutil.rmtree(scratch, ignore_errors=True)
    stats["skipped"].sort()
    stats["files"] = len({f.path for f in files} - {where for where, _ in stats["skipped"]})  # skipped whole
    if stats["documents"] == 0:
        shutil.rmtree(output_dir, ignore_errors=True)
        return stats
    stats["tokens"] = count_stream_tokens(output_dir)
    return stats


def in_split(file: str | None, output_dir: Path) -> bool:
    """A file an OS error names (``None``: it names none) is one :func:`write_split` writes for ``output_dir``: in
    it, or in its scratch folder beside it."""
    scratch = output_dir.parent / f".scratch-{output_dir.name}"
    return file is None or any(Path(file).is_relative_to(folder) for folder in (output_dir, scratch))


class WorkerLost(DataPreparationError):
    """The build failed because a tokenizing worker process ended before its share was done (:class:`WorkerEnded`);
    ``killed``: by a signal, as the out-of-memory killer ends one."""

    def __init__(self, what: str, where: object = None, fix: str | None = None, killed: bool = False) -> None:
        super().__init__(what, where, fix)
        self.killed = killed

    def __reduce__(self):  # noqa: ANN204 - as UserError's, with ``killed``
        return type(self), (self.what, self.where, self.fix, self.killed)


def worker_lost(error: WorkerEnded, split: str, num_workers: int) -> WorkerLost:
    killed = error.status is not None and error.status < 0
    return WorkerLost(
        f"{error} of the {split} split, so nothing was written",
        f"--num-workers {num_workers}",
        ("the system may have run out of memory: " if killed else "")
        + "prepare again with fewer workers, or find what ended it",
        killed=killed,
    )


@contextlib.contextmanager
def progress_bar(stats_dir: Path, total: int, split: str, enabled: bool) -> Iterator[None]:
    """A tqdm bar over work items, fed from the statistics files that workers write when they finish one."""
    if not enabled:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    done = threading.Event()

    def poll(bar: tqdm) -> None:
        while True:
            finished = done.wait(0.5)
            paths = list(stats_dir.glob("*.json"))
            tokens = 0
            for path in paths:
                with contextlib.suppress(OSError, ValueError):
                    tokens += json.loads(path.read_text())["tokens"]
            bar.n = len(paths)
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=True)
            if finished:
                return

    terminal = sys.stderr.isatty()  # in a log file: one line per split, not a redrawn bar
    with tqdm(total=total, desc=f"Tokenizing {split}", unit="shard", dynamic_ncols=True, disable=not terminal) as bar:
        thread = threading.Thread(target=poll, args=(bar,), daemon=True)
        thread.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            thread.join()
        if not terminal:
            shards = f"{total} shard{'' if total == 1 else 's'}"
            print(f"Tokenized {split}: {shards} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
