"""Output folders that never destroy what we did not create, and never look complete when they are not.

Every command that writes a folder (``prepare``, ``consolidate``, ``export``, ``bench``, ``analyze``, ``lm-eval``) goes
through :func:`output_folder`:

- the folder is built under a hidden temporary name beside the target and renamed into place at the end, so a
  failure or a kill leaves nothing that looks loadable, and a rewrite leaves no stale file behind;
- an existing target is replaced only with ``overwrite=True`` *and* only if its marker file says this project wrote
  it, as the same kind of output (a user's own folder is never touched);
- an output that contains, or lies inside, one of the command's inputs is refused;
- temporary folders of earlier runs that were killed (their process is gone) are removed;
- a finished folder names no process or host (it may be pushed to the Hub as it is): only a hidden one does.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from epas_lightning.errors import OutputError, exception_chain

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

MARKER = ".epas_output.json"
"""Written into every folder we create: who wrote it and what it is (``kind``); a hidden folder being built or moved
aside also names its writer's process and host (:func:`write_marker`)."""
_TMP = ".tmp-"
_OLD = ".old-"
_DOOMED = ".del-"
NAME_MAX = 255
"""Bytes in one file name (ext4, xfs, btrfs, APFS...)."""
_TAG = 8
"""Random hex digits that end a hidden build folder's name."""


def shortened_name(name: str, tail: str, room: int) -> str:
    """``name`` where it fits ``room`` bytes, else its head in whole characters (never half of a UTF-8 one), ``~``, a
    hash of the whole name and ``tail``: each name keeps its own, and the result fits ``room``."""
    if len(os.fsencode(name)) <= room:
        return name
    ending = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16] + tail
    head, size = [], len(os.fsencode(ending))
    for character in name:
        size += len(os.fsencode(character))
        if size > room:
            break
        head.append(character)
    return "".join(head) + ending


def _hidden_stem(target: Path) -> str:
    """``target``'s name as its hidden folders beside it carry it (``.{stem}.tmp-1234abcd``): the whole name where that
    fits a file name's 255 bytes, else the name's head and a hash of the whole name (any name a target may have
    works, and each target keeps its own)."""
    return shortened_name(target.name, "", NAME_MAX - 1 - len(_TMP) - _TAG)


def _hidden(target: Path, kind: str) -> Path:
    """A new hidden folder name beside ``target``: ``kind`` is ``_TMP`` (a build), ``_OLD`` (the old output) or
    ``_DOOMED`` (one being removed)."""
    return target.parent / f".{_hidden_stem(target)}{kind}{uuid.uuid4().hex[:_TAG]}"


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder we wrote, or ``None``."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("created_by") == "epas_lightning" else None


def write_marker(folder: Path, kind: str, writer: bool = False) -> None:
    """Mark ``folder`` ours, as a ``kind`` output, in one step (a reader never sees half a marker). ``writer``: with
    this process's id and host, which a hidden folder carries while it is built or moved aside (a later run removes
    or puts it back once that process is gone); a finished folder names neither, as it may be handed on or pushed to
    the Hub as it is (``huggingface_hub.upload_folder`` uploads dotfiles)."""
    written = _pending_marker(folder, kind, writer)
    try:
        os.replace(written, folder / MARKER)
    except BaseException:
        written.unlink(missing_ok=True)
        raise


def _pending_marker(folder: Path, kind: str, writer: bool = False) -> Path:
    """A marker written beside ``folder``'s own, in effect once renamed onto it."""
    record = {"created_by": "epas_lightning", "kind": kind}
    if writer:
        record |= {"pid": os.getpid(), "host": socket.gethostname()}
    written = folder / f"{MARKER}.{uuid.uuid4().hex[:_TAG]}"
    try:
        written.write_text(json.dumps(record) + "\n")
    except BaseException:
        written.unlink(missing_ok=True)
        raise
    return written


def _put_in_place(hidden: Path, target: Path, kind: str) -> None:
    """Rename the ``hidden`` folder (a build, or a previous output put back) to the missing ``target``, its marker then
    the finished one: it names its writer for as long as it is hidden, so a later run tells a killed writer's folder
    from a live one's at any moment; a kill between the two renames leaves a complete output whose marker still names
    the writer (and the finished marker beside it), never a hidden folder no run can classify."""
    finished = _pending_marker(hidden, kind)
    try:
        os.replace(hidden, target)
    except BaseException:
        finished.unlink(missing_ok=True)
        raise
    os.replace(target / finished.name, target / MARKER)


def check_apart(output: Path, inputs: Iterable[str | Path], flag: str = "--output") -> None:
    """Refuse an output that is an input, contains one, or lies inside one."""
    out = _real(output)
    for raw in inputs:
        source = _real(raw)
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            relation = "is" if out == source else ("contains" if source.is_relative_to(out) else "lies inside")
            raise OutputError(
                f"the output {relation} the input {source}", f"{flag} {out}", "choose an output folder apart from it"
            )


def _real(path: str | Path) -> Path:
    """``path`` with its links resolved as far as they go: a link loop stays as it is (the reader of an input says it
    does not exist), where ``Path.resolve`` raises."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _owned_by_dead_process(folder: Path) -> bool:
    record = read_marker(folder)
    if record is None or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):
        return False
    return False


def interrupted_build(target: Path) -> Path | None:
    """A hidden build folder of ours beside a missing ``target``: a killed (or a running) build of it, if any."""
    stem = glob.escape(_hidden_stem(target))
    return next((p for p in sorted(target.parent.glob(f".{stem}{_TMP}*")) if p.is_dir()), None)


def remove_stale_builds(target: Path) -> list[Path]:
    """Clean up after killed runs of ours beside ``target``; return the folders removed.

    Their half-built folders are deleted, as are folders a removal of ours was killed in. A previous output moved
    aside for a replacement that never finished is put back when the target is missing, else deleted.
    """
    removed = []
    stem = glob.escape(_hidden_stem(target))
    for doomed in sorted(target.parent.glob(f".{stem}{_DOOMED}{'[0-9a-f]' * _TAG}")):  # a removal killed midway
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(doomed)
    for stale in sorted(target.parent.glob(f".{stem}{_TMP}*")):
        if stale.is_dir() and _owned_by_dead_process(stale):
            remove_hidden(stale, target)
            removed.append(stale)
    for old in sorted(target.parent.glob(f".{stem}{_OLD}*")):
        if not (old.is_dir() and _owned_by_dead_process(old)):
            continue
        if target.exists():
            remove_hidden(old, target)
            removed.append(old)
        else:
            _put_in_place(old, target, read_marker(old)["kind"])  # finished again: the dead writer's host goes
    return removed


def remove_hidden(folder: Path, target: Path) -> None:
    """Delete ``folder``, a hidden folder of ours beside ``target``, renamed first to one any later run removes: its
    marker may go before its other files, and a kill midway (a second Ctrl+C, a scheduler's kill after SIGTERM) left
    them under a name no run could classify."""
    doomed = _hidden(target, _DOOMED)
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:  # gone already (another run's cleanup, or a build already in place)
        return
    shutil.rmtree(doomed, ignore_errors=True)


def check_replaceable(
    target: Path,
    kind: str,
    overwrite: bool,
    flag: str = "--output",
    unmarked_ours: Callable[[Path], bool] | None = None,
) -> None:
    """Fail unless ``target`` may be written: absent, or (with ``overwrite``) a folder we wrote as ``kind``.
    ``unmarked_ours``: whether a folder without a marker is one of ``kind`` written before folders carried one (it is
    marked only once replaced)."""
    if not target.exists() and not target.is_symlink():
        return
    is_folder = target.is_dir() and not target.is_symlink()
    record = read_marker(target) if is_folder else None
    if record is not None:
        ours = record.get("kind") == kind
    else:
        ours = is_folder and unmarked_ours is not None and unmarked_ours(target)
    if not overwrite:  # --overwrite is advised only where it would be taken
        fix = "choose a new folder or pass --overwrite" if ours else "choose a new folder"
        if is_folder and _is_empty(target):  # made beforehand (`mkdir out`): what it is for is not ours to say
            fix = "remove the empty folder (rmdir) or choose a new one: the output is built beside it and renamed"
        raise OutputError("the output already exists", f"{flag} {target}", fix)
    if not ours:
        if record is not None:
            what = f"its {record.get('kind')} output"
        else:
            what = "a folder it did not write" if is_folder else "not a folder"
        raise OutputError(
            f"--overwrite replaces only a folder epas_lightning wrote as its {kind} output, and this is {what}",
            f"{flag} {target}",
            "choose a new folder, or move it away yourself",
        )


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:  # not ours to list
        return False


def check_output(
    target: str | Path,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    flag: str = "--output",
    unmarked_ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Fail before any work unless :func:`output_folder` may build ``target`` (``unmarked_ours``: see
    :func:`check_replaceable`); return its absolute path."""
    target = Path(target).expanduser().absolute()
    if target.name == "-":  # the usual name of stdout: a folder named "-" in the working folder is no one's intent
        raise OutputError("the output is a folder, and '-' is no stdout here", f"{flag} -", "name the folder to write")
    parent = next((p for p in target.parents if p.exists()), target)  # the root always does; the root has none
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, not a folder", f"{flag} {target}", "choose an output inside a folder")
    check_apart(target, inputs, flag)
    check_replaceable(target, kind, overwrite, flag, unmarked_ours)
    return target


@contextlib.contextmanager
def output_folder(
    target: str | Path,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    flag: str = "--output",
    unmarked_ours: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Build the folder ``target`` atomically: yield a temporary folder beside it, rename it into place on success.

    On an exception the temporary folder (and any parent folder made for it) is removed and ``target`` is left as
    it was.
    """
    target = check_output(target, kind, overwrite, inputs, flag, unmarked_ours)
    build = _hidden(target, _TMP)
    made = [p for p in target.parents if not p.exists()]  # created here, innermost first: removed on a failure
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(target)
        build.mkdir()
    except OSError as e:
        raise OutputError(
            f"cannot create the output folder ({e.strerror or e})", f"{flag} {target}", "choose a writable location"
        ) from e
    try:
        write_marker(build, kind, writer=True)
        with stopping_on_sigterm():
            yield build
        # it may have appeared meanwhile (another run, the user)
        check_replaceable(target, kind, overwrite, flag, unmarked_ours)
        honour_umask(build)
        replace_folder(build, target, kind)
    except BaseException as e:
        remove_hidden(build, target)
        remove_empty(made)
        if out_of_space(e):
            raise OutputError(
                "no space left on the device (or quota) while writing; nothing was left behind",
                f"{flag} {target}",
                "free space, or choose an --output on another disk",
            ) from e
        raise


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty: the parents an output that failed had created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile
            return


@contextlib.contextmanager
def stopping_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's or container's stop) raises ``KeyboardInterrupt`` here, as Ctrl+C does, so the
    folder being built is removed: by default it ends the process at once, leaving the hidden folder (the size of the
    output) until a later run at the same target. A handler of the caller's own is kept; a process forked meanwhile
    ends as by default."""
    owner = os.getpid()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        interrupt = KeyboardInterrupt()
        interrupt.signum = signum  # the command line exits with 128 + signum, naming the signal
        raise interrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def out_of_space(error: BaseException | None) -> bool:
    """``error``, or an error it was raised from or while handling, is a full disk or an exceeded quota (an
    ``OSError``, or an error that quotes one: a Rust library's, as safetensors and tokenizers raise, or a Python
    traceback from another process, as litdata raises for its workers)."""
    for e in exception_chain(error):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(quote in str(e) for code in NO_SPACE for quote in (f"(os error {code})", f"[Errno {code}]")):
            return True
    return False


def honour_umask(folder: Path) -> None:
    """Give the files under ``folder`` the permissions the umask allows: libraries that write through a private temp
    file (safetensors: 0600) would otherwise keep others from reading an output meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def replace_folder(build: Path, target: Path, kind: str) -> None:
    """Move ``build`` to ``target``; an existing ``target`` (already checked as ours) is moved aside, then deleted.

    The previous output is marked with this process (in place: aside, it would name no writer for a moment, and a
    kill then left it hidden for good), so the next run puts it back if this one dies before ``build`` takes its
    place; an exception there (Ctrl+C) puts it back at once."""
    if not target.exists():
        _put_in_place(build, target, kind)
        return
    write_marker(target, kind, writer=True)
    old = _hidden(target, _OLD)
    try:
        os.replace(target, old)
    except BaseException:
        write_marker(target, kind)  # it stays in place: finished again
        raise
    try:
        _put_in_place(build, target, kind)
    except BaseException:
        if not target.exists():
            _put_in_place(old, target, kind)
        raise
    remove_hidden(old, target)
