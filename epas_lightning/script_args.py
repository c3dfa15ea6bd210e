"""The flags of the scripts in ``benchmarks/`` and ``experiments/``: argparse under the commands' error policy.

A bad flag value (``--reps 0``, ``--seq-len abc``, an unknown flag) is one :class:`ConfigError` naming the flag, which
``run_script`` prints as one line with exit status 2, before any model is built; the ``type`` functions below say
what a count, a fraction or a positive number takes.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from epas_lightning.errors import ConfigError, did_you_mean, path_too_long
from epas_lightning.seeds import TRAINING_SEEDS, seed_out_of_range


class ScriptParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are a :class:`ConfigError` (``--help`` still prints and exits).

    :meth:`add_quick` adds ``--quick``, a smoke-test size, whose values stand in for the defaults only: a flag given on
    the command line keeps its value (``--quick --seq-len 128`` runs at 128).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("allow_abbrev", False)  # as the commands: --rep is no --reps
        super().__init__(*args, **kwargs)
        self._quick: dict[str, object] = {}
        self._argv: list[str] = []

    def add_quick(self, help: str, **values: object) -> None:
        """``--quick``: ``values`` (by argument name) replace the defaults of the flags not given."""
        self.add_argument("--quick", action="store_true", help=f"{help} (smoke test; flags given still apply)")
        self._quick = values

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # noqa: ANN001
        self._argv = sys.argv[1:] if args is None else list(args)  # for the fix of an error
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False):
            given = self._given(args)
            for name, value in self._quick.items():
                if name not in given:
                    setattr(parsed, name, value)
        return parsed

    def _given(self, args: list[str] | None) -> set[str]:
        """The names of the arguments the command line sets (parsed again with every default left out)."""
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            return set(vars(super().parse_args(args)))
        finally:
            for action, default in defaults:
                action.default = default

    def error(self, message: str) -> NoReturn:
        if fix := missing_argument_fix(message, dashed=True, argv=self._argv):
            raise ConfigError(message, self.prog, fix)
        if unknown := re.match(r"unrecognized arguments: (-[^=\s]+)", message):
            meant = did_you_mean(unknown[1], self._option_string_actions)
            raise ConfigError(f"{self.prog} has no option {unknown[1]}{meant}", self.prog, f"see `{self.prog} --help`")
        flag = re.match(r"argument ([^:]+): (.*)", message, flags=re.DOTALL)
        what, where = (flag[2], flag[1]) if flag else (message, self.prog)
        raise ConfigError(what, where, f"see `{self.prog} --help`")


def missing_argument_fix(what: str, dashed: bool, argv: Sequence[str] = ()) -> str | None:
    """What to add for argparse's "the following arguments are required: checkpoint, output" (the flags, as typed:
    ``dashed`` for our tools' ``--max-new-tokens``) or "argument --checkpoint: expected one argument"; else ``None``.
    Where ``argv`` gave the flag a value that starts with "-" (``--prompt -x``), which argparse reads as a flag, the
    fix says to write it ``--prompt=-x`` (``--prompt+=-x`` where it was typed ``--prompt+``)."""
    if required := re.fullmatch(r"the following arguments are required: ([\w.,/ -]+)", what):
        keys = [key.strip().split("/")[-1].lstrip("-") for key in required.group(1).split(",")]
        return "add " + " and ".join("--" + (key.replace("_", "-") if dashed else key) for key in keys)
    if valueless := re.fullmatch(r"argument (\S+): expected one argument", what):  # -c/--config, --input/--input+
        names = valueless.group(1).split("/")
        flag = next((name for name in names if name.startswith("--")), valueless.group(1))
        fix = f"give {flag} a value"
        if dashed := _dash_value(argv, names):
            typed, value = dashed
            written = typed if typed.startswith("--") else flag  # --prompt+ as typed; -c as --config
            fix += f'; write {shlex.quote(f"{written}={value}")} for one that starts with "-"'
        return fix
    return None


def _dash_value(argv: Sequence[str], names: list[str]) -> tuple[str, str] | None:
    """The flag of ``names`` in ``argv``, as typed, and its value that starts with "-" and is no other flag (``-x``,
    not ``--json``): the value argparse took for a flag (not one it took as a value before it: ``-5``, ``"-c x"``)."""
    for name, value in zip(argv, argv[1:], strict=False):
        if name in names and not read_as_value(value) and not re.fullmatch(r"--[\w.+-]+(=.*)?", value, re.DOTALL):
            return name, value
    return None


def read_as_value(token: str) -> bool:
    """Whether argparse takes ``token`` after a flag as its value (not as a flag: ``-x``, ``--json``): it does not start
    with "-", or is "-", a negative number or holds a space."""
    return (
        not token.startswith("-") or token == "-" or " " in token or re.fullmatch(r"-\d+|-\d*\.\d+", token) is not None
    )


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (1 for counts: reps, steps, tokens, batch)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


count = whole_number(1)
"""How many of something: at least 1."""


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number, not {text!r}") from None


def fraction(text: str) -> float:
    """An argparse ``type``: a fraction from 0 to 1 (of the layers that share)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text}")
    return value


def positive_number(text: str) -> float:
    """An argparse ``type``: a number above 0 (a peak in TFLOP/s, megabytes of input)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def file_to_write(text: str) -> Path:
    """An argparse ``type``: a file the script writes (``vs_peers --partial``): in a folder that exists, no folder."""
    path = Path(text)
    if reason := path_too_long(path):
        raise argparse.ArgumentTypeError(f"the path is too long ({reason}); give a shorter path")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file in it, e.g. {path / 'result.json'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"its folder {path.parent} does not exist; create it or name another")
    return path


def training_seed(text: str) -> int:
    """An argparse ``type``: a seed of training (numpy's, through Lightning's ``seed_everything`` and the data's
    shuffle), as ``fit`` takes it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None
    if problem := seed_out_of_range(value, TRAINING_SEEDS):
        raise argparse.ArgumentTypeError(problem)
    return value
