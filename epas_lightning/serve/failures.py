"""What the inference worker says of a failed decode: one log line per failure, naming the error's type and text, and
its traceback the first time an error of that type comes from that place (the same path of calls; a failure that
repeats every step logs one traceback, not one per step); its client is told what happened to its request, without
the error's text. A device error after which nothing more runs in this process (a device-side assert, an illegal
memory access) is told apart from those a sequence retried alone survives (out of memory, a bad sequence)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Hashable

import torch

from epas_lightning.errors import exception_chain, is_out_of_memory

logger = logging.getLogger("epas_lightning.serve")


def described(error: BaseException) -> str:
    """``Type: text``, or the type alone for an error without text."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def failed_alone(error: BaseException) -> str:
    """What the client of a sequence that failed alone is told: its type, not its text (paths, the worker's state)."""
    return (
        f"decoding this request failed ({type(error).__name__}; the server's log has the cause); the server goes on "
        "serving"
    )


STICKY_DEVICE_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "the launch timed out and was terminated",
    "hardware stack error",
    "invalid program counter",
    "uncorrectable ECC error encountered",
    "operation not supported on global/shared address space",
)
"""CUDA's texts (``cudaGetErrorString``) of the errors that leave the process's CUDA context unusable: every later
call fails the same way until the process is restarted (CUDA Runtime API, ``cudaError``)."""
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())
"""torch's type of an error the device's runtime reported (torch 2.8 on; before, a ``RuntimeError`` with its text)."""


def device_lost(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) leaves a device that runs nothing more in this process:
    torch's ``AcceleratorError`` or one of :data:`STICKY_DEVICE_ERRORS`; never running out of memory."""
    for cause in exception_chain(error):
        if is_out_of_memory(cause) or "out of memory" in str(cause):
            continue
        if isinstance(cause, ACCELERATOR_ERROR) or any(text in str(cause) for text in STICKY_DEVICE_ERRORS):
            return True
    return False


class DeviceLost(RuntimeError):
    """The engine's device has failed for good (its cause says how): nothing more is decoded."""


def lost_device(error: BaseException) -> str:
    """What the clients in flight are told when the device fails for good."""
    return (
        f"the server's device failed ({type(error).__name__}) and can decode nothing more; the server is stopping: "
        "retry once it has restarted"
    )


def one_line(error: BaseException) -> str:
    """:func:`described` on one line: CUDA's errors add lines of advice (``CUDA_LAUNCH_BLOCKING=1``)."""
    return described(error).splitlines()[0] if str(error) else described(error)


def _place(error: BaseException) -> Hashable:
    """Where ``error`` was raised: its type and the lines of its traceback (the path to the line that raised it)."""
    return type(error), tuple((frame.filename, frame.lineno) for frame in traceback.extract_tb(error.__traceback__))


class FailureLog:
    """Logs failures of the engine's work: the traceback of each place once."""

    def __init__(self) -> None:
        self.places: set[Hashable] = set()

    def log(self, level: int, error: BaseException, message: str, *args: object) -> None:
        """``message % args`` at ``level``, with ``error``'s traceback if its place has not failed before."""
        place = _place(error)
        first = place not in self.places
        self.places.add(place)
        logger.log(level, message, *args, exc_info=error if first else None)
