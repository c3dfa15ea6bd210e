"""What the inference worker says of a failed decode: one log line per failure, naming the error's type and text, and
its traceback the first time an error of that type comes from that place (the same path of calls; a failure that
repeats every step logs one traceback, not one per step); its client is told what happened to its request, without
the error's text."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Hashable

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
