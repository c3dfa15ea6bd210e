"""What every worker process we fork (data loading, tokenizing) does about what it inherits from its parent."""

from __future__ import annotations

import faulthandler
import gc
import os

_children_freeze_inherited = False


def never_collect_inherited_objects() -> None:
    """Have every process forked from this one from now on freeze what it inherited (``gc.freeze``), once per process.

    A forked child holds a copy of its parent's objects, the garbage not collected yet among them. Collected in the
    child, such an object's native destructor ran on state that does not exist there: a torch.distributed process group
    left in a reference cycle by an earlier in-process run joined threads the child does not have, and the child hung
    or aborted (``std::system_error: Invalid argument``, seen in CI in a tokenizing worker, collecting garbage). The
    parent still collects its own garbage; the child collects what it creates itself."""
    global _children_freeze_inherited
    if not _children_freeze_inherited and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=gc.freeze)
        _children_freeze_inherited = True


def print_stack_on_crash() -> None:
    """In a worker process: a crash of native code in it (a segmentation fault, an abort) prints the Python stack of
    each of its threads on the process's stderr, where only "the worker died" was said."""
    faulthandler.disable()  # inherited enabled (python -X faulthandler): enable() would not take over the signals
    faulthandler.enable(file=2, all_threads=True)  # the process's stderr, whatever sys.stderr was replaced by
