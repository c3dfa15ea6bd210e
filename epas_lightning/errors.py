"""One error policy for every command: a user's mistake is one line on stderr and exit status 2.

A :class:`UserError` carries what is wrong, where (a path, a config key, a flag) and what to do about it; the command
line prints it as ``error: <what> — <where> — <what to do>`` without a traceback (``--debug`` or ``EPAS_DEBUG=1``
shows it). Anything else is unexpected and keeps its traceback. The subclasses are also ``ValueError`` s, so code
that caught the plain errors these replace keeps working.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
"""Exit status of a command stopped by a user error (argparse's convention)."""
EXIT_DIVERGED = 3
"""Exit status of a training run stopped because its loss or gradients became non-finite."""
DEBUG_ENV = "EPAS_DEBUG"
RESUME_AFTER_A_FAILED_FIT = (
    "the checkpoints saved so far are whole: resume with the same command and --ckpt_path auto (it starts again where "
    "none was saved yet)"
)
"""How a ``fit`` that failed mid-run goes on: ``--ckpt_path last`` was advised, which a failure before the first
save answered with "no last.ckpt of this run to resume"."""


class UserError(ValueError):
    """A mistake the user can fix: a bad path, config, data or checkpoint.

    Args:
        what: What is wrong, as a short sentence without the location.
        where: The file, directory, config key or flag it concerns.
        fix: What to do about it.
    """

    def __init__(self, what: str, where: object = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, None if where is None else str(where), fix
        super().__init__(what)

    def __str__(self) -> str:
        return " — ".join(part for part in (self.what, self.where, self.fix) if part)

    def __reduce__(self):  # noqa: ANN204 - survives pickling between processes (litdata workers, DDP ranks)
        return type(self), (self.what, self.where, self.fix)


class ConfigError(UserError):
    """A configuration value that cannot work (schedule, model shape, flags)."""


class CheckpointError(UserError):
    """A checkpoint or model directory that is missing, corrupt, unsafe or does not fit."""


class DataError(UserError):
    """Input data that is missing, incomplete, corrupt or does not fit the model."""


class OutputError(UserError):
    """An output location that we may not write or replace."""


class TrainingDiverged(RuntimeError):
    """Training stopped at a non-finite loss, gradient or weight; the message says where and what to try.

    Every rank raises it together; ``announce`` is ``False`` on all but the first, so the command line says it once.
    """

    def __init__(self, message: str, announce: bool = True) -> None:
        super().__init__(message)
        self.announce = announce


OUT_OF_MEMORY_ADVICE = {
    "fit": "lower data.batch_size (trainer.accumulate_grad_batches keeps the tokens per optimizer step) or set "
    "model.activation_checkpointing: auto",
    "validate": "lower data.batch_size",
    "test": "lower data.batch_size",
    "generate": "lower --batch-size or --max-new-tokens",
    "chat": "lower --max-new-tokens (the conversation is kept short enough to leave a reply that much room)",
    "bench": "lower --batch-size, --seq-len, --prompts or --max-new-tokens",
    "evaluate": "lower --batch-size or --seq-len",
    "lm-eval": "lower --batch-size",
    "analyze": "lower --batch-size or --seq-len",
    "serve": "lower --max-batch-size or --max-tokens",
}
"""What to change, per command, when the device runs out of memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA's, and any other device's), recognised without importing torch."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__)


def out_of_memory(error: BaseException, command: str) -> UserError:
    """The one line for a command that ran out of device memory: torch's facts (what it tried to allocate, what was
    free), then what to change for this command."""
    facts = "; ".join(str(error).split(". ")[:3]).strip().rstrip(".")  # out of memory; what it tried; what was free
    fix = OUT_OF_MEMORY_ADVICE.get(command, "use a smaller batch or free the device")
    return UserError(f"out of device memory ({facts})", command, fix)


LOST_DATA_WORKER = re.compile(
    r"DataLoader worker \(pids?(?:\(s\))? [\d, ]+\) (?:is killed by signal: [\w ]+|exited unexpectedly[^.]*)"
)
"""torch's words for a data worker process that died: killed (the host's out-of-memory killer sends SIGKILL; a full
``/dev/shm``, a bus error) or exited without a Python error."""


def lost_data_worker(error: BaseException, command: str) -> UserError | None:
    """The one line for a command whose data worker process died (torch raised it from any frame of a training step,
    as a traceback); ``None`` for any other error."""
    if not (found := LOST_DATA_WORKER.search(str(error))):
        return None
    fix = "lower data.num_workers or give the job more host memory (or shared memory, /dev/shm, after a bus error)"
    if command == "fit":
        fix += f"; {RESUME_AFTER_A_FAILED_FIT}"
    return UserError(f"a data worker process died ({found[0].strip()})", "data.num_workers", fix)


def gpu_number_fix(number: int | str) -> str:
    """The fix for a ``--device`` given a bare GPU number (``0``, as Hugging Face and vLLM take it): its name."""
    return f"use cuda:{number} for GPU {number} (or auto, cpu, cuda)"


def exception_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def process_ending(status: int) -> str:
    """How a process that ended with exit ``status`` ended, in words: ``exit status 2``, or ``killed by SIGKILL`` for a
    negative status (the signal, as ``subprocess`` and ``multiprocessing`` give it)."""
    if status >= 0:
        return f"exit status {status}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-status).name}"
    return f"killed by signal {-status}"


def not_utf8(text: str) -> str | None:
    """Where ``text`` is not UTF-8 text, as an error says it (``byte 0xff at character 2``), or ``None``: Python reads
    bytes that are not UTF-8 (command-line arguments, stdin in the C locale) as lone surrogates, which no tokenizer
    encodes and no file name in UTF-8 holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte {char - 0xDC00:#04x}" if 0xDC80 <= char <= 0xDCFF else repr(text[e.start])  # an escaped byte
        return f"{what} at character {e.start}"
    return None


def did_you_mean(given: str, known: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """`` (did you mean n_layer?)`` for a misspelt name closest to one of ``known``, for the start of only one
    (``--seed``, of ``--seed_everything``: an abbreviation, which the parsers refuse), or another program's name of one
    (``aliases``: LitGPT's ``n_query_groups`` -> ``n_kv_head``); else ``""``."""
    known = list(known)
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.8)
    started = [name for name in known if given and name.startswith(given)]
    meant = (
        ([aliases[given]] if aliases and given in aliases else [])
        or close
        or (started[:1] if len(started) == 1 else [])
    )
    return f" (did you mean {meant[0]}?)" if meant else ""


def listed(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many there are in all when more."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def sentence_start(text: str) -> str:
    """``text`` with its first letter capitalized and the rest (paths, names) as they are, unlike ``str.capitalize``."""
    return text[:1].upper() + text[1:]


def os_reason(error: OSError) -> str:
    """Why an ``OSError`` happened, as a line quotes it: ``permission denied``."""
    return (error.strerror or str(error)).lower()


NAME_MAX = 255
"""Bytes in one file name (a path's component) on Linux and macOS file systems."""


def path_too_long(path: str | os.PathLike) -> str | None:
    """Why ``path`` can name no file, as an error says it (``file name too long``), or ``None``: a component longer
    than a file name may be, or the whole path longer than the system takes. ``Path.exists()`` and the like raise an
    ``OSError`` for such a path where they answer ``False`` for a missing one."""
    if any(len(os.fsencode(part)) > NAME_MAX for part in Path(path).parts):
        return os.strerror(errno.ENAMETOOLONG).lower()
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return os_reason(e)
    return None


def check_path_name(path: str | os.PathLike, where: str) -> None:
    """One :class:`ConfigError` naming ``where`` (a flag and its value) for a path too long to name any file."""
    if reason := path_too_long(path):
        raise ConfigError(f"the path is too long ({reason})", where, "give a shorter path")


STDIN = "-"
"""The path that names standard input where a command reads a text file (``--prompt-file -``); ``./-`` is a file."""


def read_text_file(path: Path, what: str, where: str, error: type[UserError] = ConfigError) -> str:
    """The text of a user's UTF-8 file (``what``: "prompt file"), or of standard input for :data:`STDIN`; one
    ``error`` naming ``where`` (its flag) when it is missing, a folder, unreadable or not UTF-8 text."""
    if str(path) == STDIN:
        read = sys.stdin.buffer.read
    elif path.is_dir():
        raise error(f"the {what} is a folder", where, "give the path of a text file")
    elif not path.exists():  # a pipe (`<(command)`, /dev/stdin) is read as a file is
        raise error(f"{what} does not exist", where, "check the path")
    else:
        read = path.read_bytes
    try:
        text = read().decode("utf-8-sig")  # a byte order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
        what_byte = f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise error(f"the {what} is not UTF-8 text ({what_byte})", where, "give a UTF-8 text file") from None
    except OSError as e:
        raise error(f"cannot read the {what} ({e.strerror})", where, "check its permissions") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # CRLF and CR newlines read as text mode reads them


def text_lines(text: str) -> list[str]:
    """The lines of a text :func:`read_text_file` read, split at newlines alone (reading made CRLF and CR newlines):
    ``str.splitlines`` also splits at form feeds, U+0085, U+2028 and U+2029, which a prompt or a JSON line may hold."""
    return text.split("\n")


def debug_enabled() -> bool:
    """Whether user errors should show their traceback (``EPAS_DEBUG=1``; ``--debug`` sets it)."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def error_line(error: BaseException) -> str:
    """The one line a command prints for ``error``."""
    return f"error: {error}"


def fit_in_script(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)`` in a script that :func:`run_script` runs: Lightning ends a fit that Ctrl+C
    stopped with ``sys.exit(1)`` after its own clean-up, which ended the script silently with 1; the stop is a
    ``KeyboardInterrupt`` again, so that the script ends with run_script's one line and 130. Lightning's SIGTERM stop
    (its ``SIGTERMException``, also a ``SystemExit``) ends it as SIGTERM's: the one line names it, status 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # a fit's caller has Lightning imported

    try:
        trainer.fit(*args, **kwargs)
    except SystemExit as e:
        if not trainer.interrupted:
            raise
        interrupt = KeyboardInterrupt()  # Lightning's exit after a KeyboardInterrupt, or its SIGTERM stop
        interrupt.signum = signal.SIGTERM if isinstance(e, SIGTERMException) else signal.SIGINT
        raise interrupt from None


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` (``benchmarks/``, ``experiments/``) under this policy: a :class:`UserError` prints one
    line on stderr and exits with status 2, Ctrl+C one line and 130 (a fit SIGTERM stopped: 143), as the commands end
    (with the traceback when ``EPAS_DEBUG=1``)."""
    try:
        main()
    except UserError as error:
        if debug_enabled():
            traceback.print_exc()
        print(error_line(error), file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt as e:
        if debug_enabled():
            traceback.print_exc()
        signum = getattr(e, "signum", signal.SIGINT)  # a fit a signal stopped (fit_in_script): which one
        what = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"interrupted: {Path(sys.argv[0]).name} stopped ({what})", file=sys.stderr)
        raise SystemExit(128 + signum) from None
