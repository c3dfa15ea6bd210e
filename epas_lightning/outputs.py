"""Output folders that never destroy what we did not create, and never look complete when they are not.

Every command that writes a folder (``prepare``, ``consolidate``, ``export``, ``bench``, ``analyze``, ``evaluate``,
``lm-eval``) goes through :func:`output_folder`:

- the folder is built under a hidden temporary name beside the target and renamed into place at the end, so a
  failure or a kill leaves nothing that looks loadable, and a rewrite leaves no stale file behind;
- an existing target is replaced only with ``overwrite=True`` *and* only if its marker file says this project wrote
  it, as the same kind of output (a user's own folder is never touched);
- an output that contains, or lies inside, one of the command's inputs is refused;
- temporary folders of earlier runs that were killed (their process is gone) are removed: only those whose marker
  (or, killed before the marker was in or after it went, the claim made before the folder or before its marker went)
  says a run of ours made them for this very target;
- an OS error at any step of its own (a read-only or foreign-owned folder, a busy mount point), or of a command's own
  write into the build (:func:`build_write_error`, :func:`writing_into`), is one :class:`OutputError` saying what it
  was doing, and where, leaving the target as it was (or a previous output, where it could not be put back, under a
  name the line gives and the next run recognises); one removing the previous output once replaced is a warning;
- a finished folder names no process or host (it may be pushed to the Hub as it is): only a hidden one does.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from epas_lightning.errors import OutputError, UserError, exception_chain, os_reason

log = logging.getLogger(__name__)

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

MARKER = ".epas_output.json"
"""Written into every folder we create: who wrote it and what it is (``kind``); a hidden folder being built or moved
aside also names its writer's process and host (:func:`write_marker`)."""
_TMP = ".tmp-"
_OLD = ".old-"
_DOOMED = ".del-"
_CLAIM = ".new-"
_EMPTIED = ".end-"
"""The claim of a removal's folder, once its marker is to go (:func:`_delete`); each hidden kind has 5 characters."""
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)
"""What ``symlink`` raises on a file system that has no links (FAT, some network mounts)."""
NAME_MAX = 255
"""Bytes in one file name (ext4, xfs, btrfs, APFS...)."""
_TAG = 8
"""Random hex digits that end a hidden build folder's name."""
FIXES = {
    errno.EACCES: "check the permissions of the folder and the one holding it, or choose another output folder",
    errno.EPERM: "check the permissions of the folder and the one holding it, or choose another output folder",
    errno.EROFS: "the file system is read-only: choose an output folder on a writable one",
    errno.EBUSY: "it is in use (a mount point, a file open on a network file system): choose another output folder",
    errno.EXDEV: "this file system cannot rename the folder (a container image's layer): choose an output folder on "
    "another one (a mounted volume)",
    errno.ENAMETOOLONG: "choose a shorter output path",
    errno.ENOTEMPTY: "something else wrote there meanwhile: choose another output folder",
    errno.EEXIST: "something else wrote there meanwhile: choose another output folder",
    errno.EIO: "the disk or its file system failed (see dmesg): check it, or choose an output folder on another one",
    errno.EFBIG: "a file is larger than this file system takes (FAT: 4 GiB): choose an output folder on another one",
    errno.ESTALE: "the network file system lost the folder: run again, or choose an output folder on another one",
}
"""What to do when a step of writing an output fails with an OS error, by its ``errno``."""
MOVE_ASIDE_FIXES = {
    errno.EXDEV: "this file system cannot rename the folder (a container image's layer): move the previous output "
    "away yourself, or choose another output folder",
}
"""What to do, where it differs, when the previous output cannot be moved aside."""
WRITE_ERRORS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EIO, errno.EFBIG, errno.EBUSY, errno.ESTALE}
)
"""The OS errors of a command's own write into its build that are about the output's location, not a bug of ours."""
QUOTED_OS_ERROR = re.compile(
    # Python's, in a worker process's traceback: the file as repr() quotes it (with " where its name holds a ', a bytes
    # name as b'...'); the code alone where a message quotes only that
    r"""\[Errno (\d+)\](?: [^\n:'"]*(?:: (b?'(?:[^'\\\n]|\\.)+'|b?"(?:[^"\\\n]|\\.)+"))?)?"""
    r"""|\(os error (\d+)\)(?: at path "([^"\n]+)")?"""  # a Rust library's (safetensors)
)
"""An OS error an exception quotes, with the file it names if any: what :func:`out_of_space` and
:func:`build_write_error` read in an error's text, in one pass from its start (a code of either form inside a file name
the other quotes is part of that name)."""
SERIALIZING = "Error while serializing"
"""How safetensors starts an error of writing a file (which it may not name)."""


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


def _unused_hidden(target: Path, kind: str) -> Path:
    """A new hidden name of ``kind`` beside ``target`` (:func:`_hidden`) that nothing has: a folder is renamed to it,
    and a rename onto an empty folder replaces it (a user's of the name drawn is not ours to replace)."""
    while os.path.lexists(hidden := _hidden(target, kind)):
        continue
    return hidden


def _partner(hidden: Path, kind: str) -> Path:
    """The name of ``kind`` that goes with the ``hidden`` one beside the same target: the build ``.out.tmp-1234abcd``
    and its claim ``.out.new-1234abcd``."""
    return hidden.with_name(hidden.name[: -len(kind) - _TAG] + kind + hidden.name[-_TAG:])


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder we wrote, or ``None``."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("created_by") == "epas_lightning" else None


def write_marker(folder: Path, kind: str, output: str | None = None) -> None:
    """Mark ``folder`` ours, as a ``kind`` output, in one step (a reader never sees half a marker). ``output``: the
    name of the output a hidden folder is built for or moved aside from, with this process's id and host, which it
    carries meanwhile (a later run at that output removes or puts it back once that process is gone); a finished
    folder names none of them, as it may be handed on or pushed to the Hub as it is (``huggingface_hub.upload_folder``
    uploads dotfiles)."""
    written = _pending_marker(folder, kind, output)
    try:
        os.replace(written, folder / MARKER)
    except BaseException:
        written.unlink(missing_ok=True)
        raise


def _record(kind: str, output: str | None = None) -> dict:
    """What a marker says (see :func:`write_marker`)."""
    record = {"created_by": "epas_lightning", "kind": kind}
    if output is not None:
        record |= {"pid": os.getpid(), "host": socket.gethostname(), "output": output}
        if (namespace := _pid_namespace()) is not None:
            record["pid_namespace"] = namespace
    return record


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux: ``pid:[4026531836]``), or ``None`` where there is none to name: containers
    that share a host name (``--network host``) each have their own, in which another's process ids mean nothing."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pending_marker(folder: Path, kind: str, output: str | None = None) -> Path:
    """A marker written beside ``folder``'s own, in effect once renamed onto it."""
    written = folder / f"{MARKER}.{uuid.uuid4().hex[:_TAG]}"
    try:
        written.write_text(json.dumps(_record(kind, output)) + "\n")
    except BaseException:
        written.unlink(missing_ok=True)
        raise
    return written


def _put_in_place(hidden: Path, target: Path, kind: str) -> None:
    """Rename the ``hidden`` folder (a build, or a previous output put back) to the missing ``target``, its marker then
    the finished one: it names its writer for as long as it is hidden, so a later run tells a killed writer's folder
    from a live one's at any moment; a kill between the two renames leaves a complete output whose marker still names
    the writer (and the finished marker beside it), never a hidden folder no run can classify."""
    with _step("cannot rename the finished output into place"):
        finished = _pending_marker(hidden, kind)
        try:
            os.replace(hidden, target)
        except BaseException:
            finished.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # where another run put ``hidden`` meanwhile (a file: not a folder)
                (target / finished.name).unlink(missing_ok=True)
            raise
    with _step("the output is in place, but its marker could not be finished", target, "run again with --overwrite"):
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


def _owned_by_dead_process(folder: Path, target: Path) -> bool:
    return _written_by_dead_process(_ours_for(folder, target))


def _written_by_dead_process(record: dict | None) -> bool:
    """``record`` (a marker, or a claim) names a process of this host, and of this process's PID namespace where it
    names one (a record written before records named it: as this one's), that is gone."""
    if record is None or record.get("host") != socket.gethostname():
        return False
    if record.get("pid_namespace", _pid_namespace()) != _pid_namespace():  # another container's: not ours to judge
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):
        return False
    return False


def _hidden_beside(target: Path, kind: str) -> list[Path]:
    """The folders beside ``target`` named as :func:`_hidden` names its ``kind``: exactly, as ``.out.old-*`` also
    matches the build of an output named ``out.old-b``."""
    return sorted(target.parent.glob(f".{glob.escape(_hidden_stem(target))}{kind}{'[0-9a-f]' * _TAG}"))


def _ours_for(folder: Path, target: Path) -> dict | None:
    """The marker of ``folder`` where it says a run of ours made it for ``target`` (it names the writer, and this
    output: a marker written before markers named their output counts as this one's), else ``None``."""
    record = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if record is None or "pid" not in record or record.get("output", target.name) != target.name:
        return None
    return record


def _claim(build: Path, target: Path, kind: str, link: str = _CLAIM) -> Path | None:
    """Claim the ``build`` folder about to be made for ``target`` as this process's, in the one step that makes a link
    beside it whose text is the marker its folder gets next (a folder is made empty, and a kill before its marker is in
    left one no later run could tell from a user's); return the link, removed once the marker is in. ``None`` where the
    file system has no links. ``link``: ``_EMPTIED`` claims a removal's folder as its marker goes (:func:`_delete`)."""
    claim = _partner(build, link)
    try:
        os.symlink(json.dumps(_record(kind, target.name)), claim)
    except OSError as e:
        if e.errno in NO_LINKS:
            return None
        raise
    return claim


def _claimed_for(claim: Path, target: Path) -> dict | None:
    """The record of ``claim`` where it is a link :func:`_claim` made for ``target``, else ``None``."""
    try:
        record = json.loads(os.readlink(claim))
    except (OSError, ValueError):
        return None
    ours = isinstance(record, dict) and record.get("created_by") == "epas_lightning" and "pid" in record
    return record if ours and record.get("output") == target.name else None


def interrupted_build(target: Path) -> Path | None:
    """A hidden build folder of ours beside a missing ``target``: a killed (or a running) build of it, if any."""
    return next((p for p in _hidden_beside(target, _TMP) if p.is_dir()), None)


def remove_stale_builds(target: Path) -> list[Path]:
    """Clean up after killed runs of ours beside ``target``; return the folders removed.

    Their half-built folders are deleted (one killed before its marker was in, by the claim made before it), as are
    folders a removal of ours was killed in (one emptied of its marker, by the claim made before it went; a live run's
    removal is its own). A previous output moved aside for a replacement that never finished is put back when the
    target is missing, else deleted.
    """
    removed = []
    for doomed in _hidden_beside(target, _DOOMED):  # a removal killed midway (its marker goes last, then the folder)
        emptied = _written_by_dead_process(_claimed_for(_partner(doomed, _EMPTIED), target))  # after its marker went
        if _owned_by_dead_process(doomed, target) or (emptied and _is_empty_folder(doomed)):
            with contextlib.suppress(OSError):  # what cannot go is left, marked, to a later run
                _delete(doomed, target)
                removed.append(doomed)
    for claim in _hidden_beside(target, _EMPTIED):  # its folder gone (above, or by its killed run)
        if _written_by_dead_process(_claimed_for(claim, target)) and not os.path.lexists(_partner(claim, _DOOMED)):
            with contextlib.suppress(OSError):
                claim.unlink()
    for stale in _hidden_beside(target, _TMP):
        if _owned_by_dead_process(stale, target):
            with contextlib.suppress(OSError):
                remove_hidden(stale, target)
                removed.append(stale)
    for claim in _hidden_beside(target, _CLAIM):  # a build killed before its marker was in: its claim says it is ours
        if not _written_by_dead_process(_claimed_for(claim, target)):
            continue
        build = _partner(claim, _TMP)
        with contextlib.suppress(OSError):
            # a marked one: removed above; one holding anything but the marker being written: a user's of its name
            if build.is_dir() and not build.is_symlink() and read_marker(build) is None and _holds_markers_only(build):
                _delete(build, target)
                removed.append(build)
            claim.unlink()
    for old in _hidden_beside(target, _OLD):
        if not _owned_by_dead_process(old, target):
            continue
        if target.exists():
            with contextlib.suppress(OSError):
                remove_hidden(old, target)
                removed.append(old)
        elif (record := read_marker(old)) is not None:  # else put back meanwhile, by a run that started with this one
            try:
                with _step("cannot put the previous output back", old, _put_back(target)):
                    _put_in_place(old, target, record["kind"])  # finished again: the dead writer's host goes
            except FileNotFoundError:
                if old.exists():
                    raise
    return removed


def _put_back(target: Path) -> str:
    """What to do with a previous output of ``target`` that could not be put back."""
    return f"rename it to {target} yourself (the next run at this output also does)"


def remove_hidden(folder: Path, target: Path) -> None:
    """Delete ``folder``, a hidden folder of ours beside ``target``, renamed first to one a later run removes (its
    marker goes last, so a kill midway, a second Ctrl+C or a scheduler's kill after SIGTERM, leaves it marked ours).
    An ``OSError`` leaves it under one of those names, with its marker, and is raised naming it (``filename``)."""
    doomed = _unused_hidden(target, _DOOMED)
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:  # gone already (another run's cleanup, or a build already in place)
        return
    _delete(doomed, target)


def _delete(folder: Path, target: Path) -> None:
    """Delete ``folder``, a hidden folder of ours beside ``target``, as far as it goes, its marker last; raise the first
    ``OSError`` (naming ``folder``, which is left with its marker) once the rest is gone. It is opened once, not
    followed if it is a link, and emptied through that handle: a folder swapped for a link meanwhile (another user of a
    shared ``/tmp``) has nothing it points to deleted. Its marker goes once a claim beside it (:func:`_claim`) says
    whose it is: a kill before the folder goes leaves an empty folder a later run tells from a user's."""
    failed, claim = None, None
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        names = sorted(os.listdir(handle))
        for name in names:
            if name == MARKER:
                continue
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=handle, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=handle)
                else:
                    os.unlink(name, dir_fd=handle)
            except FileNotFoundError:  # removed meanwhile (a run that started as this one emptied the folder)
                continue
            except OSError as e:
                failed = failed or e
                shutil.rmtree(name, dir_fd=handle, ignore_errors=True)
        if failed is None and set(os.listdir(handle)) - {MARKER}:  # one another run removes as this one: not yet gone
            failed = OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
        if failed is not None:
            raise failed
        if MARKER in names:
            claim = _removal_claim(folder, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(MARKER, dir_fd=handle)
    except OSError as e:
        e.filename = str(folder)  # the entry's name alone, relative to the handle
        raise
    finally:
        os.close(handle)
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile (by an earlier version, as a killed one)
        folder.rmdir()
    if claim is not None:
        claim.unlink(missing_ok=True)


def _removal_claim(folder: Path, target: Path) -> Path | None:
    """A claim of ``folder``, being removed, as this process's (:func:`_claim`), or a killed run's that was removing
    it: ``None`` where the file system has no links, a user's entry has its name, or a full disk has no room for it
    (emptying a build whose first file got none frees none, and the removal goes on unclaimed)."""
    try:
        return _claim(folder, target, "removal", _EMPTIED)
    except FileExistsError:
        return _partner(folder, _EMPTIED) if _claimed_for(_partner(folder, _EMPTIED), target) else None
    except OSError as e:
        if e.errno in NO_SPACE:
            return None
        raise


def _holds_markers_only(folder: Path) -> bool:
    """``folder`` is empty, or holds only markers (one being written, :func:`_pending_marker`)."""
    try:
        return all(name.startswith(MARKER) for name in os.listdir(folder))
    except OSError:  # not ours to list
        return False


def _is_empty_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and _is_empty(folder)


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
    build, claim, foreign = _hidden(target, _TMP), None, False
    made: list[Path] = []  # created here, innermost first: removed on a failure
    try:
        with _step("cannot create the output folder"):
            make_folder(target.parent, made)
            remove_stale_builds(target)
        check_replaceable(target, kind, overwrite, flag, unmarked_ours)  # a previous output put back: before any work
        with _step("cannot create the output folder"):
            try:
                claim = _claim(build, target, kind)
                build.mkdir()
            except FileExistsError:  # a folder of its name (its random tag drawn again): not ours to remove
                foreign = True
                raise
        with _step("cannot write into the output folder being built"):
            write_marker(build, kind, output=target.name)
            if claim is not None:
                claim.unlink()
        with stopping_on_sigterm():
            yield build
        # it may have appeared meanwhile (another run, the user)
        check_replaceable(target, kind, overwrite, flag, unmarked_ours)
        honour_umask(build, target)  # a refused chmod loses no output: a warning
        replace_folder(build, target, kind)
    except BaseException as e:
        with contextlib.suppress(OSError):  # left, marked, to a later run: the error says what went wrong
            if not foreign:
                remove_hidden(build, target)
            # after its build: a kill between leaves a claim of nothing, which a later run removes
            if claim is not None:
                claim.unlink(missing_ok=True)
        remove_empty(made)
        if (failure := step_failure(e, f"{flag} {target}", build)) is not None:
            raise failure from e
        raise


@contextlib.contextmanager
def _step(
    what: str, left: Path | None = None, fix: str | None = None, fixes: dict[int, str] | None = None
) -> Iterator[None]:
    """A context in which an ``OSError`` is a step of writing an output that failed: :func:`step_failure` says it as
    ``what``, and where it ``left`` something the user should act on (``fix``) if anything; ``fixes``: what to do by
    ``errno`` where this step's case differs from :data:`FIXES`."""
    try:
        yield
    except OSError as e:
        if getattr(e, "output_step", (None, None))[1] is None:  # the outermost says it, unless one left something
            e.output_step = (what, left, fix)
            e.output_fixes = fixes or {}
        raise


def step_failure(error: BaseException, where: str, build: Path | None = None) -> OutputError | None:
    """The one line for ``error``, raised while writing the output ``where`` names (its flag and path): a step that
    left something for the user says where; else a full disk (or quota) anywhere, the failed step, or the command's own
    write into ``build`` (:func:`build_write_error`), with what to do by its ``errno``. ``None`` for any other error (a
    bug, an error of the command's own work), and for Ctrl+C, SIGTERM or a user error, whatever they were raised while
    handling, or raised by work apart from the output (:func:`apart_from_the_output`)."""
    if not isinstance(error, Exception) or isinstance(error, UserError):
        return None
    if getattr(error, "apart_from_the_output", False):
        return None
    what, left, fix = getattr(error, "output_step", (None, None, None))
    if what is not None and left is not None:
        return OutputError(f"{what} ({os_reason(error)})", left, fix)
    if out_of_space(error):
        return OutputError(
            "no space left on the device (or quota) while writing; nothing was left behind",
            where,
            "free space, or choose an --output on another disk",
        )
    if what is not None:
        fixes = FIXES | getattr(error, "output_fixes", {})
        return OutputError(f"{what} ({os_reason(error)})", where, fixes.get(error.errno, "choose a writable location"))
    if build is not None and (written := build_write_error(error, build)) is not None:
        code, file = written
        what = "cannot write " + (f"{file} " if file else "") + "into the output folder being built"
        return OutputError(
            f"{what} ({os.strerror(code).lower()})", where, FIXES.get(code, "choose a writable location")
        )
    return None


def quoted_os_errors(text: str) -> list[tuple[int, str | None]]:
    """The OS errors ``text`` quotes (:data:`QUOTED_OS_ERROR`), each ``(errno, file)`` (``None``: it names none)."""
    return [
        (int(python or rust), _unquoted(python_file or rust_file))
        for python, python_file, rust, rust_file in QUOTED_OS_ERROR.findall(text)
    ]


def _unquoted(file: str) -> str | None:
    """A file name as an OS error quotes it: repr()'s, read back (its escapes too); a Rust library's, as it is."""
    if file[:1] in ("'", '"') or file[:2] in ("b'", 'b"'):
        with contextlib.suppress(ValueError, SyntaxError):
            return os.fsdecode(ast.literal_eval(file))
    return file or None


def build_write_error(error: BaseException, build: Path) -> tuple[int, str | None] | None:
    """``(errno, file)`` where ``error`` is, was raised from, or quotes (a worker process's traceback, a Rust library's
    message) an OS error of :data:`WRITE_ERRORS` at a file in ``build`` (``file``: its path there, ``None`` where
    safetensors names none while it writes); else ``None``: an error about an input, or a bug, is not the output's."""
    for e in exception_chain(error):
        if isinstance(e, OSError):
            named = [name for name in (e.filename, e.filename2) if isinstance(name, str | bytes | os.PathLike)]
            quoted = [(e.errno, os.fsdecode(name)) for name in named]
        else:
            quoted = quoted_os_errors(str(e))
        for code, file in quoted:
            if code not in WRITE_ERRORS:
                continue
            if file is None and SERIALIZING in str(e):
                return code, None
            if file is not None and Path(file).is_relative_to(build):
                return code, str(Path(file).relative_to(build)) if Path(file) != build else None
    return None


@contextlib.contextmanager
def apart_from_the_output() -> Iterator[None]:
    """A context for a command's work that writes nothing of the output, run while it is built (``lm-eval``'s scoring,
    between its writes of each region's samples): an error raised there is said as outside :func:`output_folder`, not
    as the output's (a full disk while a library fills its cache is not the output's disk to change)."""
    try:
        yield
    except Exception as e:
        with contextlib.suppress(AttributeError):  # an exception that takes no attribute is said as before
            e.apart_from_the_output = True
        raise


@contextlib.contextmanager
def writing_into(build: Path) -> Iterator[None]:
    """A context that only writes into ``build`` (a command's own writes): an OS error that names no file (a failing
    disk's, raised by a write where an open names its file) is said as a write into it, as :func:`step_failure` says
    one that names a file there."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(build)
        raise


def make_folder(folder: Path, made: list[Path]) -> None:
    """Make ``folder`` and its missing parents, adding each made here to ``made``, innermost first: one another process
    made meanwhile (a run at a sibling output, the user) is not this run's to remove."""
    for missing in [p for p in [*reversed(folder.parents), folder] if not p.exists()]:
        try:
            missing.mkdir()
        except FileExistsError:
            if not missing.is_dir():
                raise
            continue
        made.insert(0, missing)


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
    ``OSError``, or an error that quotes one (:func:`quoted_os_errors`): a Rust library's, as safetensors and tokenizers
    raise, or a Python traceback from another process, as litdata raises for its workers)."""
    for e in exception_chain(error):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(code in NO_SPACE for code, _ in quoted_os_errors(str(e))):
            return True
    return False


def honour_umask(folder: Path, target: Path) -> None:
    """Give the files under ``folder`` the permissions the umask allows: libraries that write through a private temp
    file (safetensors: 0600) would otherwise keep others from reading an output meant to be shared. A file system
    that refuses ``chmod`` (some network and FUSE mounts) keeps the output, complete and readable by its owner: a
    warning says so, once."""
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o666 & ~umask
    for file in folder.rglob("*"):
        try:
            if file.is_file() and not file.is_symlink() and stat.S_IMODE(file.stat().st_mode) != wanted:
                file.chmod(wanted)
        except OSError as e:
            log.warning(
                f"{target / file.relative_to(folder)} and the output's other files may be readable by their owner "
                f"only: the file system refused to change their permissions ({os_reason(e)}); run chmod on "
                f"{target} yourself to share it"
            )
            return


def replace_folder(build: Path, target: Path, kind: str) -> None:
    """Move ``build`` to ``target``; an existing ``target`` (already checked as ours) is moved aside, then deleted.

    The previous output is marked with this process (in place: aside, it would name no writer for a moment, and a
    kill then left it hidden for good), so the next run puts it back if this one dies before ``build`` takes its
    place; an exception there (Ctrl+C, an OS error) puts it back at once. An OS error says its step to
    :func:`step_failure`, and where it left the previous output if it could not be put back; one removing it once the
    new output is in place is a warning naming what is left."""
    if not target.exists():
        _put_in_place(build, target, kind)
        return
    with _step("cannot mark the previous output as being replaced"):
        write_marker(target, kind, output=target.name)
    old = _unused_hidden(target, _OLD)
    try:
        with _step("cannot move the previous output aside", fixes=MOVE_ASIDE_FIXES):
            os.replace(target, old)
    except BaseException:
        with _step(
            "the previous output stays, but its marker names this process", target, "run again with --overwrite"
        ):
            write_marker(target, kind)  # it stays in place: finished again
        raise
    try:
        _put_in_place(build, target, kind)
    except BaseException:
        if not target.exists():
            with _step("cannot put the previous output back", old, _put_back(target)):
                _put_in_place(old, target, kind)
        raise
    try:
        remove_hidden(old, target)
    except OSError as e:  # the output is complete: what is left, marked ours, is a later run's to remove
        log.warning(
            f"The new output is in place, but the previous one could not be removed ({os_reason(e)}) — {e.filename} — "
            "remove it yourself (the next run at this output tries again)"
        )
