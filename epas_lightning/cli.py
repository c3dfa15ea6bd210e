"""``python -m epas_lightning <command>`` (also ``epas <command>``): every command, one vocabulary, one error policy.

``fit``, ``validate`` and ``test`` are LightningCLI (:mod:`epas_lightning.lightning_cli`). Every other command is a
typed function exposed through jsonargparse, as LitGPT does for ``litgpt <command>``: its ``--help`` comes from the
function's docstring, ``--config FILE`` sets any of its arguments from YAML, flags are spelled with dashes
(``--sharing-layers``), booleans are switches (``--force``, ``--no-force``) and list flags repeat (``--prompt a
--prompt b``; each value of a list flag is one item, as typed, not YAML; a config's single value is a list of one).

A user error prints ``error: <what> — <where> — <what to do>`` on stderr and exits 2; ``--debug`` (anywhere on the
line) or ``EPAS_DEBUG=1`` shows its traceback. A diverged training run exits 3. Unexpected errors keep their traceback.
"""

from __future__ import annotations

import ast
import gc
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import traceback
import uuid
from argparse import ArgumentError
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from epas_lightning.console import PROG, command_named
from epas_lightning.errors import (
    DEBUG_ENV,
    EXIT_DIVERGED,
    EXIT_USER_ERROR,
    RESUME_AFTER_A_FAILED_FIT,
    ConfigError,
    TrainingDiverged,
    UserError,
    check_path_name,
    debug_enabled,
    did_you_mean,
    error_line,
    exception_chain,
    gpu_number_fix,
    is_out_of_memory,
    lost_data_worker,
    not_utf8,
    out_of_memory,
    read_text_file,
)
from epas_lightning.interrupted import stopped_line
from epas_lightning.outputs import out_of_space
from epas_lightning.script_args import missing_argument_fix, read_as_value
from epas_lightning.sigterm_in_setup import answering_sigterm_in_setup
from epas_lightning.slurm import remembering_requeue_signal

LIGHTNING_COMMANDS = ("fit", "validate", "test")
TOOLS: dict[str, str] = {
    "prepare": "epas_lightning.data.prepare:prepare_command",
    "consolidate": "epas_lightning.consolidation:consolidate_command",
    "inspect": "epas_lightning.inspect_cli:inspect_command",
    "generate": "epas_lightning.inference.generate_cli:generate_command",
    "chat": "epas_lightning.inference.chat_cli:chat_command",
    "bench": "epas_lightning.inference.bench:bench_command",
    "serve": "epas_lightning.serve.command:serve_command",
    "evaluate": "epas_lightning.evaluation.evaluate_cli:evaluate_command",
    "lm-eval": "epas_lightning.evaluation.harness:lm_eval_command",
    "export": "epas_lightning.hf.export:export_command",
    "analyze": "epas_lightning.analysis.analyze:analyze_command",
}
"""Command name -> ``module:function``; the function's docstring is its help."""
LIGHTNING_HELP = {
    "fit": "Train a model (LightningCLI; the sharing region grows as configured).",
    "validate": "Held-out loss and perplexity of a checkpoint, as during fit (LightningCLI).",
    "test": "The same as validate, logged as test/* (LightningCLI).",
}


def tool(name: str) -> Callable[..., Any]:
    """The function behind a tool command."""
    module, function = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), function)


def overview() -> str:
    """The top-level ``--help``: every command with its one-line description."""
    from epas_lightning import __version__

    lines = [
        f"usage: {PROG} <command> [--help] [options]   (also: epas <command>)",
        "",
        f"epas_lightning {__version__}: LLaMA training with EPAS progressive activation sharing.",
        "",
        "commands:",
    ]
    descriptions = dict(LIGHTNING_HELP)
    descriptions.update({name: _first_paragraph(tool_docstring(name)) for name in TOOLS})
    width = max(map(len, descriptions))
    lines += [f"  {name:<{width}}  {text}" for name, text in descriptions.items()]
    lines += [
        "",
        f"`{PROG} <command> --help` documents a command's options; every command takes --config FILE (YAML).",
        "--debug (or EPAS_DEBUG=1) shows the traceback of an error.",
    ]
    return "\n".join(lines)


def tool_docstring(name: str) -> str:
    """The docstring of the function behind a tool command, read from its source file without importing it (the
    top-level ``--help`` would otherwise pay for torch)."""
    module, function = TOOLS[name].split(":")
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return ast.get_docstring(node) or ""


def _first_paragraph(doc: str) -> str:
    return doc.split("\n\n")[0].replace("\n", " ").strip()


# ---------------------------------------------------------------------------------------------------------------------
# Typed functions as commands (jsonargparse)
# ---------------------------------------------------------------------------------------------------------------------


def _is_bool(annotation: Any) -> bool:
    """``bool``, or ``bool | None``: a switch whose default, ``None``, leaves the choice to the command."""
    return annotation is bool or set(get_args(annotation)) == {bool, type(None)}


def _is_list(annotation: Any) -> bool:
    options = get_args(annotation) if get_origin(annotation) is not list else (annotation,)
    return get_origin(annotation) is list or any(get_origin(a) is list for a in options)


def _takes_only_lists(annotation: Any) -> bool:
    """``list[Path]`` or ``list[str] | None``, not ``list[str] | dict | str`` (lm-eval's ``gen_kwargs``, whose single
    value is one of its own choices): a flag whose single value in a config is a list of one."""
    options = (annotation,) if get_origin(annotation) is list else get_args(annotation)
    options = [option for option in options if option is not type(None)]
    return bool(options) and all(get_origin(option) is list for option in options)


def _takes_paths(annotation: Any) -> bool:
    """``Path``, or a list or optional of it (``list[Path] | None``): a flag whose values are paths."""
    return annotation is Path or any(_takes_paths(a) for a in get_args(annotation))


def function_parser(fn: Callable, prog: str):  # noqa: ANN201 - jsonargparse.ArgumentParser
    """A jsonargparse parser for ``fn``'s typed keyword arguments, with dashed flags and switch booleans."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    described = {p.arg_name: p.description for p in doc.params}
    params = inspect.signature(fn).parameters
    hints = get_type_hints(fn)
    switches = [name for name in params if _is_bool(hints.get(name))]  # in --help in the arguments' order
    description = _plain("\n\n".join(part for part in (doc.short_description, doc.long_description) if part))
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file setting any of the options below.")
    parser.add_function_arguments(fn, skip=set(switches), as_group=False)
    for name in switches:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=ActionYesNo(no_prefix="no-"),
            default=params[name].default,
            help=described.get(name),  # made plain with the others below
        )
    for action in parser._actions:  # --sharing_layers -> --sharing-layers (the option names, not the config keys)
        if action.dest not in params:
            continue
        action.help = _plain(action.help)
        if _is_list(hints.get(action.dest)):  # not jsonargparse's "'[...]' | LIST_OF_PATHS_FILE | -": a flag repeats
            action.metavar = None
        for i, option in enumerate(action.option_strings):
            if option.startswith("--") and "_" in option:
                dashed = option.replace("_", "-")
                parser._option_string_actions.pop(option, None)
                parser._option_string_actions[dashed] = action
                action.option_strings[i] = dashed
    parser.list_options = {"--" + name.replace("_", "-") for name in params if _is_list(hints.get(name))}
    parser.path_options = {"--" + name.replace("_", "-") for name in params if _takes_paths(hints.get(name))}
    _read_single_values_as_lists(parser, {name for name in params if _takes_only_lists(hints.get(name))})
    return parser


def _read_single_values_as_lists(parser: Any, list_keys: set[str]) -> None:
    """A config's single value for a list option (``input: a.txt``, ``prompt: hello``) read as a list of that one
    item, as the flag given once is: jsonargparse refused it as "takes a list", or read a string again as YAML
    (``prompt: "[a, b]"`` two prompts, ``prompt: "#include <x>"`` none). ``null`` stays no list."""
    apply_actions = parser._apply_actions  # jsonargparse's check of each key of a config (a --config file's mapping)

    def apply_with_single_values_as_lists(cfg: Any, parent_key: str = "", *args: Any, **kwargs: Any) -> Any:
        if isinstance(cfg, dict) and not parent_key:
            cfg = {key: [value] if key in list_keys and _is_single(value) else value for key, value in cfg.items()}
        return apply_actions(cfg, parent_key, *args, **kwargs)

    parser._apply_actions = apply_with_single_values_as_lists


def _is_single(value: Any) -> bool:
    return value is not None and not isinstance(value, list | tuple)


def _plain(text: str | None) -> str | None:
    """A docstring's text as ``--help`` shows it: ``name`` (reStructuredText literals) as `name`."""
    return None if text is None else text.replace("``", "`")


def _append_lists(argv: Sequence[str], list_options: set[str]) -> list[str]:
    """``--prompt a --prompt b`` -> jsonargparse's ``--prompt=[] --prompt+ a --prompt+ b``: the flags add up, and
    replace the list of a ``--config`` before them as any flag overrides it. A ``--prompt+`` of the user's own adds to
    what is there, as jsonargparse documents."""
    out, given = [], set()
    for token in argv:
        name, equals, value = token.partition("=")
        if name == "--config":  # the flags after it replace its lists
            given = set()
        if name in list_options:
            if name not in given:
                out.append(name + "=[]")
            token = name + "+" + equals + value
        if name.removesuffix("+") in list_options:
            given.add(name.removesuffix("+"))
        out.append(token)
    return out


def _verbatim_values(argv: Sequence[str], list_options: set[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` with each value of a list flag (``--prompt``, ``--input``) replaced by a placeholder word, and the
    values by placeholder: the parser reads a value as YAML, where ``#include <x>`` is a comment (no prompt at all),
    ``null`` no list, ``[a, b]`` two items and ``[x for x in y]`` the text "x for x in y"; :func:`_restore_values`
    puts each value back as typed, one item. A value that argparse reads as a flag (``--prompt -x``) is left for it
    to refuse."""
    nonce, out, values = uuid.uuid4().hex, [], {}

    def placeholder(value: str) -> str:
        values[word := f"epas-value-{nonce}-{len(values)}"] = value
        return word

    takes_value = False
    for token in argv:
        name, equals, value = token.partition("=")
        if takes_value and read_as_value(token):
            token = placeholder(token)
        elif name.removesuffix("+") in list_options and equals:
            token = name + equals + placeholder(value)
        takes_value = name.removesuffix("+") in list_options and not equals
        out.append(token)
    return out, values


def _print_as_typed(parser: Any, values: dict[str, str]) -> None:
    """``--print_config`` (jsonargparse's, which dumps the config as it parses) writes the values
    :func:`_verbatim_values` replaced as typed."""
    dump = parser.dump

    def dump_as_typed(config: Any, *args: Any, **kwargs: Any) -> str:
        config = config.clone()
        _restore_values(config, parser.list_options, values)
        return dump(config, *args, **kwargs)

    parser.dump = dump_as_typed


def _restore_values(config: Any, list_options: set[str], values: dict[str, str]) -> None:
    """The values :func:`_verbatim_values` replaced, back in ``config`` as typed (a path as a path)."""
    for option in list_options:
        key = option.removeprefix("--").replace("-", "_")
        if isinstance(items := getattr(config, key, None), list):
            setattr(config, key, [type(item)(values[str(item)]) if str(item) in values else item for item in items])


DURATION = 'a duration "H:MM:SS" (e.g. "0:30:00")'
"""How a ``timedelta`` flag is written (jsonargparse also reads "D days, H:MM:SS")."""
TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text", Path: "a path",
              timedelta: DURATION}  # fmt: skip
LISTED_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "datetime.timedelta": timedelta}


def describe_type(hint: Any) -> str | None:
    """``int | None`` -> "a whole number", ``Literal["a", "b"]`` -> "one of a, b": what a flag of that type takes."""
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(option) for option in get_args(hint))
    if get_origin(hint) is list:  # a repeated flag on the command line; in a YAML file, a list even of one
        item = describe_type(get_args(hint)[0])
        return item and f"a list, each item {item} ([A, B] in a YAML file)"
    if get_origin(hint) is Sequence:  # a list in a YAML file (lm-eval's seed: [0, null, 8, 52]), not a repeated flag
        item = describe_type(get_args(hint)[0])
        return item and f"a list, each item {item} ([A, B])"
    options = [option for option in get_args(hint) if option is not type(None)]
    if options:  # a union: describe each choice
        described = [describe_type(option) for option in options]
        return " or ".join(described) if all(described) else None
    return TYPE_NAMES.get(hint)


def describe_subtypes(message: str) -> str | None:
    """What a LightningCLI flag takes, from the types jsonargparse lists in its error (``Subtypes: [<class 'int'>,
    <class 'NoneType'>]``): the flags of Lightning's classes have no type hints of ours to read."""
    listed = re.search(r"Subtypes: \[(.*)\]", message)
    single = re.search(r"Expected an? (<class '[\w.]+'>|typing\.Literal\[.*?\])\. Got value", message)
    items = _top_level_items(listed.group(1)) if listed else [single.group(1)] if single else []
    described, choices = [], []
    for item in items:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", item)
        listed_class = re.fullmatch(r"<class '([\w.]+)'>", item)
        if literal:  # --trainer.precision: one of 64, 32, ..., bf16-mixed
            choices += [option.strip(" '\"") for option in literal.group(1).split(",")]
        elif listed_class is None:  # a list or callable choice: described by the others, as before
            continue
        elif listed_class.group(1) != "NoneType":
            described.append(TYPE_NAMES.get(LISTED_TYPES.get(listed_class.group(1))))
    if choices:
        choices = list(dict.fromkeys(choices))
        described.insert(0, choices[0] if len(choices) == 1 else "one of " + ", ".join(choices))
    return " or ".join(described) if described and all(described) else None


def _top_level_items(listed: str) -> list[str]:
    """``a, b[c, d], e`` -> ``["a", "b[c, d]", "e"]``: the items of jsonargparse's list of subtypes."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(listed):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(listed[start:i].strip())
            start = i + 1
    return [*items, listed[start:].strip()]


def parse_error(error: Exception, prog: str, fn: Callable | None = None, argv: Sequence[str] = ()) -> UserError:
    """One line for a jsonargparse/argparse error: the flag, the value and what it takes (from ``fn``'s type hints
    where known); where one of our own checks failed inside the parser (a config linked to other sections), that
    check's error; a ``--config`` file of ``argv`` that is not YAML, named with the line and column."""
    import yaml

    for cause in exception_chain(error)[1:]:
        if isinstance(cause, UserError):
            return cause
        if isinstance(cause, yaml.YAMLError):
            return _yaml_error(cause, prog, argv)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    what = lines[0] if lines else "invalid arguments"
    linked = re.search(r'\(([\w.]+)[^)]*\) --> ([\w.]+): |Linked "([\w.]+)" must be given via "([\w.]+)', what)
    if linked:  # jsonargparse's words for a value given to a link's target: "...: int | None is not callable"
        source, target = linked.group(1, 2) if linked.group(1) else linked.group(4, 3)
        what = f"--{target} is taken from {source} (a linked value)"
        return ConfigError(what, prog, f"set it through {source}: `{prog} --help` lists the links")
    if fix := missing_argument_fix(what, fn is not None, argv):
        return ConfigError(what, prog, fix)
    given = next((line for line in lines if line.startswith(("Given value:", "Got value:"))), None)
    expected = next((line for line in lines if line.startswith("Expected")), None)
    missing_config = re.match(r'Parser key "config": File does not exist: (.*)$', what)
    if missing_config:  # as fit says it (config_resolution.py), not "invalid value for --config"
        path = missing_config.group(1).strip("'\"")
        return ConfigError("config file does not exist", f"--config {path}", "give the path of a YAML file")
    if what.startswith("Parser key"):
        key = what.split('"')[1] if '"' in what else what
        flag = "--" + (key.replace("_", "-") if fn is not None else key)  # LightningCLI keeps --trainer.max_steps
        takes = describe_type(get_type_hints(fn).get(key)) if fn is not None else describe_subtypes(str(error))
        value = re.search(r"(?:Given|Got) value: (.*)$", str(error), re.MULTILINE)
        nested = re.search(r"NestedArg\(key='([^']*)', val=(.*)\)$", str(error), re.MULTILINE)
        chosen = re.search(r"class_path[= ]'([\w.]+)'", str(error))
        base = re.search(r"Subtypes: \[typing\.Callable\[\[.*?\], ([\w.]+)\]", str(error))  # what no class means
        classless = chosen is None or chosen.group(1).startswith("typing.")
        classless = classless or (base is not None and base.group(1).split(".")[-1] == chosen.group(1).split(".")[-1])
        if value and (absent := missing_class(error, value.group(1).strip(), flag, prog)):
            return absent
        if unknown := unknown_class(str(error), flag, prog):
            return unknown
        if several := re.search(
            r"Multiple subclasses with name (\w+)\. Give the full class path[^:]*: (.+?)\.?$", str(error), re.M
        ):
            name, paths = several.groups()
            return ConfigError(f"{name} names several classes ({paths})", flag, "give the full class path of one")
        if not classless:  # a bad argument of the class given
            argument = (nested.group(1), nested_value(nested.group(2))) if nested else None
            if bad := class_argument_error(str(error), prog, flag, chosen.group(1), argument):
                return bad
        if nested:  # `--model.optimizer.lr 1e-3` where no class was given for --model.optimizer
            name, val = nested.group(1), nested_value(nested.group(2))
            what = f"{flag}.{name} sets an argument of the class of {flag}, and none was given"
            if flag == "--model.optimizer":  # AdamW's own defaults would replace fit's betas and weight decay
                return ConfigError(
                    what, prog, f"name the class first, with fit's default settings: {adamw_flags(name, val)}"
                )
            return ConfigError(what, prog, f"name the class first: {flag} CLASS {flag}.{name} {val}")
        if flag == "--device" and value and (number := value.group(1).strip()).isdigit():  # `device: 0` in a config
            where = f"--config {holding}" if (holding := config_holding("device", argv)) else prog
            return ConfigError(f"--device takes a device name, not the number {number}", where, gpu_number_fix(number))
        if takes and value:
            what = f"{flag} takes {takes}, not {typed_value(flag, argv, value.group(1).strip())!r}"
        else:
            detail = "; ".join(part for part in (expected, given) if part)
            what = f"invalid value for {flag}" + (f" ({detail})" if detail else "")
    return ConfigError(what, prog, f"see `{prog} --help`")


def typed_value(flag: str, argv: Sequence[str], parsed: str) -> str:
    """The value of ``flag`` the parser refused, ``parsed`` as it reports it, as typed on the command line (``30:00``,
    which it reads as YAML 1.1's 1800); ``parsed`` itself where no value typed reads as it (it came from a
    ``--config``)."""
    import yaml
    from jsonargparse import get_loader

    load = get_loader("yaml")  # the parser's own reading: `1e3` is 1000.0, as it reports it
    for i, token in enumerate(argv):
        typed = token.partition("=")[2] if token.startswith(flag + "=") else None
        if token == flag and i + 1 < len(argv):
            typed = argv[i + 1]
        try:
            if typed is not None and str(load(typed)) == parsed:
                return typed
        except (yaml.YAMLError, ValueError):
            continue
    return parsed


def adamw_flags(name: str, value: str) -> str:
    """``--model.optimizer AdamW`` with ``--model.optimizer.<name> <value>`` and the other settings of fit's default
    optimizer (``optim.DEFAULT_ADAMW``): ``--model.optimizer AdamW`` alone takes AdamW's own (betas 0.999, weight decay
    0.01)."""
    from epas_lightning.optim import DEFAULT_ADAMW  # only on this error's path: --help stays light

    others = " ".join(f"--model.optimizer.{k} {flag_value(v)}" for k, v in DEFAULT_ADAMW.items() if k != name)
    return f"--model.optimizer AdamW --model.optimizer.{name} {value} {others}"


def flag_value(value: Any) -> str:
    """A value as one shell word of a flag: ``(0.9, 0.95)`` -> ``[0.9,0.95]``; text as it is."""
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def nested_value(given: str) -> str:
    """The value of jsonargparse's ``NestedArg(key=..., val=<given>)`` as a flag's word: ``'1e-3'`` -> ``1e-3``,
    ``[0.9, 0.9]`` -> ``[0.9,0.9]`` (the command line's lists and numbers reach it parsed)."""
    try:
        return flag_value(ast.literal_eval(given))
    except (ValueError, SyntaxError):  # a value Python cannot read back: as jsonargparse wrote it
        return given


def class_argument_error(
    message: str, prog: str, flag: str, class_path: str, argument: tuple[str, str] | None
) -> ConfigError | None:
    """One line for a bad argument of the class given to a flag, on the command line (``argument``: the name and value
    of ``--model.lr_scheduler.decay_shape exp``, where jsonargparse's union error reads as if no class had been given)
    or in a config's ``init_args`` (read from the ``message``); ``None`` where the message names no argument."""
    short = class_path.rsplit(".", 1)[-1]
    fix = f"`{prog} {flag}.help {class_path}` lists its arguments"
    required = re.search(
        r"(?:callable class|class_path '[\w.]+'):\s*the following arguments are required: ([\w, ]+)", message
    )
    if required:
        return ConfigError(f"{short} (given to {flag}) needs {required.group(1)}", prog, fix)
    if argument is None:
        named = re.search(
            r"callable class: (?:Parser key \"(\w+)\":\s*.*?Got value: (.*?)\. Got value|Option '(\w+)')", message
        )
        if named is None:
            return None
        argument = (named.group(1), named.group(2)) if named.group(1) else (named.group(3), "")
    name, value = argument
    expected = re.search(rf'Parser key "{re.escape(name)}":\s*Expected an? (.+?)\. Got value', message)
    if expected:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected.group(1))
        listed = re.fullmatch(r"<class '([\w.]+)'>", expected.group(1))
        if literal:
            takes = "one of " + ", ".join(option.strip(" '\"") for option in literal.group(1).split(","))
        else:
            takes = TYPE_NAMES.get(LISTED_TYPES.get(listed.group(1))) if listed else None
        what = f"{flag}.{name} of {short} takes {takes or expected.group(1)}, not {value!r}"
    elif f"Option '{name}' is not accepted" in message:
        what = f"{short} (given to {flag}) has no argument {name!r}{did_you_mean(name, class_arguments(class_path))}"
    else:
        what = f"invalid value {value!r} for {flag}.{name} of {short}"
    return ConfigError(what, prog, fix)


def missing_class(error: BaseException, given: str, flag: str, prog: str) -> ConfigError | None:
    """The one line for a class path given to ``flag`` that does not import: its module is not installed
    (``foo_pkg.Callback``) or has no such name (``torch.optim.NoSuch``); ``None`` for any other error."""
    for cause in exception_chain(error)[1:]:
        if isinstance(cause, ModuleNotFoundError) and cause.name and given.startswith(cause.name):
            what = f"{given} cannot be imported: no module named {cause.name!r} is installed"
            return ConfigError(what, flag, "install it, or check the class path")
        absent = re.fullmatch(r"module '([\w.]+)' has no attribute '(\w+)'", str(cause))
        if isinstance(cause, AttributeError) and absent and given == f"{absent.group(1)}.{absent.group(2)}":
            module, name = absent.groups()
            names = [n for n in dir(sys.modules.get(module)) if n[:1].isupper() == name[:1].isupper()]
            what = f"{module} has no {name}{did_you_mean(name, names)}"
            return ConfigError(what, flag, f"check the class path (`{prog} --help` lists known classes under {flag})")
    return None


def unknown_class(message: str, flag: str, prog: str) -> ConfigError | None:
    """The one line for a class name that names no class ``flag`` takes (``TensorboardLogger``, ``Adamw``; given alone
    or as a ``class_path``), with the nearest known one; or a class path of another kind than ``flag`` takes."""
    subtypes = re.search(r"Subtypes: \[(.*)\]$", message, re.MULTILINE)
    bases = [base for path in re.findall(r"[\w.]+", subtypes.group(1) if subtypes else "") if (base := _class_at(path))]
    if unresolved := re.search(r"Expected a dot import path string: (\S+)$", message, re.MULTILINE):
        given = unresolved.group(1)
        if flag == "--trainer.strategy" and (named := registered_strategy(given)) is not None:
            named_class, settings = named
            path = f"{named_class.__module__}.{named_class.__qualname__}"
            flags = "".join(f" {flag}.init_args.{k}={flag_value(v)}" for k, v in settings.items())
            yaml = "".join(f"{k}: {flag_value(v)}, " for k, v in settings.items())
            return ConfigError(  # a name given init_args: jsonargparse looked for a class of that name
                f"{given} is a strategy name, which takes no init_args",
                flag,
                f"give its class to set them: {flag}.class_path={path}{flags} "
                f"(YAML: strategy: {{class_path: {path}, init_args: {{{yaml}...}}}})",
            )
        known = sorted({cls.__name__ for base in bases for cls in imported_subclasses(base)})
        same_letters = [name for name in known if name.lower() == given.lower()]  # Adamw: AdamW, not the closer Adam
        meant = did_you_mean(given, known, {given: same_letters[0]} if same_letters else None)
        what = f"no class named {given} is known{meant}"
        return ConfigError(
            what, flag, f"check the name, or give the full import path (`{prog} --help` lists known classes)"
        )
    kind = re.search(r"Import path (?:([\w.]+) )?does not correspond to a subclass of (\w+)", message)
    given = re.search(r"Given value: ([\w.]+)", message)
    if kind and (kind.group(1) or given):
        path, base = kind.group(1) or given.group(1), kind.group(2)
        full = next((f"{cls.__module__}.{cls.__qualname__}" for cls in bases if cls.__name__ == base), base)
        what = f"{path} is not a {full}, which {flag} takes"  # LitLogger: a Fabric logger, not the Trainer's
        return ConfigError(what, flag, f"give a subclass of {base} (`{prog} --help` lists known ones)")
    return None


def registered_strategy(name: str) -> tuple[type, dict[str, Any]] | None:
    """The class Lightning's ``StrategyRegistry`` gives ``name`` (``fsdp2``: ``FSDP2Strategy``) and the arguments the
    name sets that differ from the class's defaults (``ddp_spawn``: ``start_method`` ``spawn``), else ``None``."""
    from lightning.pytorch.strategies import StrategyRegistry

    if name.lower() not in StrategyRegistry:
        return None
    entry = StrategyRegistry[name.lower()]
    defaults = inspect.signature(entry["strategy"]).parameters
    settings = {
        k: v for k, v in entry["init_params"].items() if k not in defaults or defaults[k].default != v
    }  # ddp's start_method popen is DDPStrategy's own
    return entry["strategy"], dict(sorted(settings.items()))


def _class_at(path: str) -> type | None:
    """The class at an import path that is already imported (``None`` for anything else: no import happens here)."""
    module, _, name = path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def imported_subclasses(cls: type) -> set[type]:
    """Every class below ``cls`` that is imported (the short names jsonargparse resolves)."""
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *imported_subclasses(sub)}
    return found


def class_arguments(class_path: str) -> list[str]:
    """The argument names of the class at ``class_path`` (``[]`` where it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _yaml_error(error: Exception, prog: str, argv: Sequence[str]) -> ConfigError:
    """The YAML syntax ``error`` of a config, where it is: the ``--config`` file of ``argv`` that does not parse (the
    parser's message names no file), its line and column; else a value given on the command line."""
    import yaml

    def at(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = (getattr(error, "problem", None) or str(error).splitlines()[0]) + at(getattr(error, "problem_mark", None))
    if context := getattr(error, "context", None):  # "while parsing a flow sequence", where it began
        problem += f" ({context}{at(getattr(error, 'context_mark', None))})"
    for path in map(Path, config_arguments(argv)):
        try:
            yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError:
            return ConfigError(f"the config is not valid YAML: {problem}", f"--config {path}", "fix its syntax")
        except (OSError, UnicodeDecodeError):
            continue
    return ConfigError(f"a value is not valid YAML: {problem}", prog, "fix the value given on the command line")


def check_utf8(argv: Sequence[str], prog: str) -> None:
    """A :class:`ConfigError` naming the first flag whose value is not UTF-8 text (bytes of another encoding): a text
    flag (--system) took it and failed on it later with a traceback, a path flag said "invalid value"."""
    for i, token in enumerate(argv):
        if (where := not_utf8(token)) is None:
            continue
        name, equals, _ = token.partition("=")
        if equals and name.startswith("--") and not_utf8(name) is None:  # --flag=value: where in the value
            flag, where = name, not_utf8(token[len(name) + 1 :])
        else:
            flag = argv[i - 1] if i > 0 and argv[i - 1].startswith("--") else "an argument"
        raise ConfigError(f"{flag} is not UTF-8 text ({where})", prog, "give it in UTF-8")


def check_no_empty_paths(argv: Sequence[str], path_options: set[str]) -> None:
    """A :class:`ConfigError` for a path flag given an empty value (``--input "$DATA"``, DATA unset): it was the current
    folder, read (prepare took every file in it as the corpus) or written into without a word."""
    for i, token in enumerate(argv):
        flag, equals, value = token.partition("=")
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else "-"
        if flag in path_options and not value.strip():
            raise ConfigError(
                f"{flag} is given an empty path", f"{flag} {value!r}", "give a path (is a variable unset?)"
            )


def check_no_empty_config_paths(argv: Sequence[str], path_options: set[str]) -> None:
    """:func:`check_no_empty_paths` for the values of ``argv``'s ``--config`` files (``input: [""]``, a template whose
    variable was unset), which the scan of ``argv`` does not see: they were the current folder too. A config that does
    not read is left to the parser's error."""
    import yaml

    for given in config_arguments(argv):
        try:
            data = yaml.safe_load(Path(given).expanduser().read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for key, value in data.items() if isinstance(data, dict) else ():
            values = value if isinstance(value, list) else [value]
            empty = any(isinstance(v, str) and not v.strip() for v in values)
            if empty and "--" + str(key).replace("_", "-") in path_options:
                raise ConfigError(
                    f"{key} is given an empty path", f"--config {given}", "give a path (is a variable unset?)"
                )


UNKNOWN_OPTION = re.compile(
    r"does not accept option '([^']+)'|\AOption '([^']+)' is not accepted\Z|unrecognized arguments: --(\S+?)(?:=|\s|$)"
)
"""jsonargparse's words for a key no section has: in a config file (a command's, a tool's), and on the command
line."""


OTHER_FLAG_NAMES = {
    "ckpt": "checkpoint",
    "ckpt-path": "checkpoint",
    "ckpt_path": "checkpoint",
    "out": "output",
    "out-dir": "output",
    "out_dir": "output",
    "output-dir": "output",
    "output_dir": "output",
    "precision": "dtype",
    "layers": "sharing-layers",
}
"""Other programs' names (LitGPT's, training scripts') of the tools' shared flags -> ours, for the hint of a command
that has the flag: their spelling is too far from ours for ``did_you_mean`` to guess."""


def unknown_option(
    error: ArgumentError, parser: Any, aliases: dict[str, str] | None = None, argv: Sequence[str] = ()
) -> ConfigError | None:
    """The one line for a key of the command line or a config that ``parser`` does not have (``trainer.max_stepz``;
    an abbreviation, ``--trainer.max_step``, as the parsers refuse them), with the option it most likely meant (or
    that ``aliases`` gives for it), and for a config's key the ``--config`` file of ``argv`` that holds it; ``None``
    for any other parse error."""
    if parser is not None and (stray := re.search(r"unrecognized arguments: ([^-\s]\S*|(?=\s|\Z))", str(error))):
        return stray_argument(stray.group(1), parser)
    found = UNKNOWN_OPTION.search(str(error))
    if found is None or parser is None:
        return None
    in_config = found.group(1) or found.group(2)
    key = in_config or found.group(3)
    if in_config:  # a config's key: the parser's keys, without its own options
        known = [action.dest for action in parser._actions if action.dest not in ("help", "config", "print_config")]
    else:  # a flag: the parser's flags (a command's are dashed: --max-new-tokens)
        known = [option[2:] for option in parser._option_string_actions if option.startswith("--")]
    command = parser.prog.split()[-1]
    if key == "model.lr" and not in_config:  # LitGPT's --lr, under model.
        value = re.search(r"--model\.lr[= ](\S+)", str(error))
        what = "--model.lr is no option: the learning rate is an argument of the optimizer"
        fix = f"give it with fit's other default settings: {adamw_flags('lr', value[1] if value else 'LR')}"
        return ConfigError(what, f"{PROG} {command}", fix)
    if in_config and aliases:  # a config's keys are underscored: sharing_layers
        aliases = {name: meant.replace("-", "_") for name, meant in aliases.items()}
    holding = config_holding(key, argv) if in_config else None
    return ConfigError(
        f"{command} has no option {key}{did_you_mean(key, known, aliases)}",
        f"--config {holding}" if holding else f"{PROG} {command}",
        f"see `{PROG} {command} --help`",
    )


def config_holding(key: str, argv: Sequence[str]) -> str | None:
    """The last ``--config`` file of ``argv`` that sets ``key`` (``trainer.max_steps``: nested, or dotted at any
    level), as jsonargparse merges them; ``None`` where none readable does."""
    import yaml

    def holds(tree: Any, parts: list[str]) -> bool:
        return isinstance(tree, dict) and any(
            ".".join(parts[:i]) in tree and (i == len(parts) or holds(tree[".".join(parts[:i])], parts[i:]))
            for i in range(1, len(parts) + 1)
        )

    holding = None
    for path in config_arguments(argv):
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if holds(tree, key.split(".")):
            holding = path
    return holding


PRINT_CONFIG_FLAGS = {"skip_default": "skip_default", "skip_unset": "skip_unset", "skip_null": "skip_unset"}
"""``--print_config=FLAG,...`` as jsonargparse reads it (``skip_null``: its older name of ``skip_unset``; ``comments``
needs ruamel.yaml, not installed here) -> the keyword of ``dump`` it sets."""


def print_config_options(given: list[str]) -> dict[str, bool]:
    """The ``dump`` keywords of the ``--print_config[=FLAG,...]`` tokens ``given``, each flag checked: ``fit`` prints
    the config itself, with the model preset resolved, so the parser never checked them (``=foo`` printed as if
    plain); the tools' parser refused one without naming those it takes."""
    options = {"skip_unset": False, "skip_default": False}
    accepted = [flag for flag, keyword in PRINT_CONFIG_FLAGS.items() if flag == keyword]
    for token in given:
        for flag in filter(None, token.partition("=")[2].split(",")):
            if flag not in PRINT_CONFIG_FLAGS:
                raise ConfigError(
                    f"--print_config has no flag {flag!r}{did_you_mean(flag, accepted)}",
                    token,
                    f"give --print_config alone, or with one or more of {', '.join(accepted)} (--print_config="
                    f"{','.join(accepted)})",
                )
            options[PRINT_CONFIG_FLAGS[flag]] = True
    return options


def stray_argument(value: str, parser: Any) -> ConfigError:
    """The one line for a value given without its flag (``inspect runs/x/last.ckpt``): the commands take flags only;
    the fix spells it with the flag it most likely is (``--checkpoint``; ``--config`` or ``--ckpt_path`` for fit). An
    empty ``value`` is an empty or blank argument (argparse's message shows nothing of it)."""
    command = parser.prog.split()[-1]
    if not value:  # an empty (or blank) argument: `"$EXTRA"`, EXTRA unset
        what, fix = (
            "takes flags only, not an empty argument",
            "drop it, or give the value it stood for (is a variable unset?)",
        )
        return ConfigError(f"{command} {what}", f"{PROG} {command}", fix)
    flags = parser._option_string_actions  # argparse's: every option string, its action
    if "--ckpt_path" in flags:  # fit, validate, test (whose --checkpoint is the checkpoint section)
        fix = f"give it with its flag: --config {value} for a config, --ckpt_path {value} for a checkpoint"
    elif "--checkpoint" in flags:
        fix = f"give it with its flag, e.g. --checkpoint {value}"
    else:
        fix = "give it with its flag"
    return ConfigError(f"{command} takes flags only, not {value!r} alone", f"{PROG} {command}", fix)


def run_function(fn: Callable, prog: str, argv: Sequence[str]) -> Any:
    """Parse ``argv`` for ``fn`` and call it; ``--help`` and ``--print_config`` exit 0 (``SystemExit``)."""
    parser = function_parser(fn, prog)
    check_utf8(argv, prog)
    check_no_empty_paths(argv, parser.path_options)
    check_no_empty_config_paths(argv, parser.path_options)
    print_config_options([arg for arg in argv if arg.split("=")[0] == "--print_config"])
    try:
        verbatim, values = _verbatim_values(argv, parser.list_options)
        _print_as_typed(parser, values)
        config = parser.parse_args(_append_lists(verbatim, parser.list_options))
    except ArgumentError as e:
        ours = {name: flag for name, flag in OTHER_FLAG_NAMES.items() if f"--{flag}" in parser._option_string_actions}
        raise unknown_option(e, parser, ours, argv) or parse_error(e, prog, fn, argv) from e
    _restore_values(config, parser.list_options, values)
    kwargs = parser.instantiate(config)
    kwargs.pop("config", None)
    check_finite(kwargs, prog)
    check_path_names(kwargs)
    return fn(**kwargs)


def check_finite(kwargs: dict[str, Any], prog: str) -> None:
    """A number that is NaN or infinite, refused as the parser refuses ``nan`` and ``inf`` on the command line: a
    ``--config`` gives them as YAML's ``.nan`` and ``.inf``, which the parser takes."""
    for name, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} takes a number, not '{value}'", prog, f"see `{prog} --help`")


def check_path_names(kwargs: dict[str, Any]) -> None:
    """A path (or one of a list of paths) too long to name any file, refused with its flag: each command's first look
    at it (``Path.exists()``, an output's parents) ended in an OSError traceback "File name too long"."""
    for name, value in kwargs.items():
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, Path):
                check_path_name(path, f"--{name.replace('_', '-')} {path}")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks of user errors are wanted."""
    return [a for a in argv if a != "--debug"], "--debug" in argv or debug_enabled()


def show_package_logs() -> None:
    """Print our INFO lines (data preparation, region growth) on stderr, the way Lightning shows its own."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to ``sys.stderr`` as it is when a line is logged: a later ``main()`` in the same process (a
        notebook, a test) may have redirected it, and the stream of an earlier one may be closed."""

        @property
        def stream(self):  # noqa: ANN202
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:  # noqa: ANN001
            pass

    logger = logging.getLogger("epas_lightning")
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def dispatch(argv: list[str]) -> int:
    """Run one command line (without the program name); errors propagate."""
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    if argv[0] == "--version":
        from epas_lightning import __version__

        print(f"epas_lightning {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        fitting = command == "fit"  # SLURM's requeue signal, from the first second
        with remembering_requeue_signal() if fitting else nullcontext(), answering_sigterm_in_setup(command):
            from epas_lightning.lightning_cli import RUN_SECTIONS, exit_status, lightning_cli

            check_config_files(argv, sections=("trainer", "model", "data", *RUN_SECTIONS))
            check_section_files(argv, ("trainer", "model", "data", *RUN_SECTIONS))
            try:
                cli = lightning_cli(argv)
            except ArgumentError as e:
                raise parse_error(e, f"{PROG} {command}", argv=argv) from e
            return exit_status(cli)
    if command not in TOOLS:
        commands = (*LIGHTNING_COMMANDS, *TOOLS)
        what = f"unknown command {command!r}{did_you_mean(command, commands)}"
        raise ConfigError(what, PROG, f"choose one of {', '.join(commands)}")
    check_config_files(rest)
    result = run_function(tool(command), f"{PROG} {command}", rest)
    return result if isinstance(result, int) else 0


def check_config_files(argv: Sequence[str], sections: Sequence[str] = ()) -> None:
    """Each ``--config`` file of ``argv`` that exists, read as text: a folder or a file that is not UTF-8 is one
    :class:`ConfigError` (jsonargparse said "invalid value for --config", or ended in a UnicodeDecodeError traceback).
    A file that does not exist is left to the parser's error (or a packaged config of that name, for fit). Its YAML
    must be a mapping, and each of ``sections`` in it a mapping too (:func:`check_config_shape`)."""
    for given in config_arguments(argv):
        path = Path(given).expanduser()
        check_path_name(path, f"--config {given}")
        if path.is_file() or path.is_dir():  # not a pipe: read here, it would be empty for the parser
            check_config_shape(read_text_file(path, "config", f"--config {given}"), f"--config {given}", sections)


def check_section_files(argv: Sequence[str], sections: Sequence[str]) -> None:
    """Each file or folder given to a section flag of fit, validate or test (``--trainer FILE``), checked as
    :func:`check_config_files` checks a ``--config``. A checkpoint given to ``--checkpoint`` (the tools' name of one;
    here the checkpoint section's settings) is said to be ``--ckpt_path``'s, and a folder given to ``--data`` (the
    tools' prepared folder) ``--data.data_dir``'s: jsonargparse read a .ckpt as YAML, to a UnicodeDecodeError
    traceback, and said "invalid value for --checkpoint" (``--data``) of a folder."""
    command = argv[0]
    for flag, value in flag_values(argv[1:], [f"--{section}" for section in sections]).values():
        if not value:
            continue
        path, where = Path(value).expanduser(), f"{flag} {value}"
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError:  # a name too long for a file: inline settings, left to the parser
            continue
        if flag == "--checkpoint" and (is_dir or (is_file and path.suffix not in (".yaml", ".yml", ".json"))):
            resume = " to resume the run, or --model.init_from to start from its weights" if command == "fit" else ""
            raise ConfigError(
                f"{command}'s --checkpoint takes the checkpoint section's settings (a YAML file or mapping), not a "
                "checkpoint",
                where,
                f"give it as --ckpt_path {value}{resume}",
            )
        if flag == "--data" and is_dir:  # evaluate's, bench's and analyze's --data: a prepared folder
            raise ConfigError(
                f"{command}'s --data takes the data section's settings (a YAML file or mapping), not a data folder",
                where,
                f"give it as --data.data_dir {value}",
            )
        if is_file:
            read_text_file(path, "settings file", where)


def check_config_shape(text: str, where: str, sections: Sequence[str]) -> None:
    """A config that is empty, a list or a single value was jsonargparse's "Unexpected config: ..."; a section holding
    a list (``sharing: [1]``) silently reset that section to its defaults, and a number (``trainer: 5``) ended in an
    AttributeError traceback. YAML that does not parse is left to the parser's error, which names the line."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(data, dict):
        shape = "empty" if data is None else "a list" if isinstance(data, list) else f"the single value {data!r}"
        what = f"the config is {shape}, not a mapping of options"
        raise ConfigError(what, where, "write one `option: value` line per option")
    for section in sections:
        if not isinstance(data.get(section), dict | str | None):  # a str is a nested config file's path
            raise ConfigError(
                f"`{section}:` holds {data[section]!r}, not its settings",
                where,
                f"indent `key: value` lines under `{section}:`",
            )


def config_arguments(argv: Sequence[str]) -> list[str]:
    """The values of ``--config`` (``-c``) in ``argv``, as ``--config FILE`` or ``--config=FILE``."""
    return list(config_positions(argv).values())


def config_positions(argv: Sequence[str]) -> dict[int, str]:
    """The values of ``--config`` (``-c``) in ``argv`` by the position of their flag, in the order they are given."""
    return {i: value for i, (_, value) in flag_values(argv, ("--config", "-c")).items()}


def flag_values(argv: Sequence[str], flags: Sequence[str]) -> dict[int, tuple[str, str]]:
    """Each of ``flags`` in ``argv`` with its value, as ``--flag VALUE`` or ``--flag=VALUE``, by the position of the
    flag, in the order they are given."""
    given = {}
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag not in flags:
            continue
        if equals:
            given[i] = (flag, value)
        elif i + 1 < len(argv):
            given[i] = (flag, argv[i + 1])
    return given


def main(args: Sequence[str] | None = None) -> int:
    """Run one command line, as ``python -m epas_lightning`` and ``epas`` do; ``args`` replaces ``sys.argv[1:]``.
    Returns the exit status: 0 on success, 2 for a user error, 3 for a diverged training run, 130 after Ctrl+C,
    143 after SIGTERM."""
    argv, debug = _pop_debug(list(sys.argv[1:] if args is None else args))
    show_package_logs()
    before = os.environ.get(DEBUG_ENV)
    if debug:  # for the processes the command starts (serve's worker, data workers) too, while it runs
        os.environ[DEBUG_ENV] = "1"
    try:
        with _signal_handlers_kept():
            return _run(argv, debug)
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back the Ctrl+C and SIGTERM handlers found as a command starts, however it ends: Lightning's own stop after
    a ``KeyboardInterrupt`` (a signal before training) leaves Ctrl+C ignored, so a notebook or script that runs
    :func:`main` could no longer be interrupted. Only where handlers can be set (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in found.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)


def _run(argv: list[str], debug: bool) -> int:
    """:func:`main` after ``--debug``: the command's exit status, its errors as the policy says."""
    try:
        with nullcontext() if debug else quiet_full_disk_in_tensorboard_thread():
            return dispatch(argv)
    except SystemExit as e:  # --help, --print_config
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER_ERROR)
    except (UserError, TrainingDiverged) as e:
        if debug:
            traceback.print_exc()
        if getattr(e, "announce", True):  # a divergence stops every rank; the first one says so
            print(error_line(e), file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else getattr(e, "exit_status", EXIT_USER_ERROR)
    except Exception as e:
        command = argv[0] if argv else PROG
        known = out_of_memory(e, command) if is_out_of_memory(e) else lost_data_worker(e, command)
        known = known or no_space_left(e, command)
        if known is None:
            raise
        if debug:
            traceback.print_exc()
        print(error_line(known), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # Ctrl+C outside fit's graceful stop: output folders in the making are removed
        if debug:
            traceback.print_exc()
        signum = getattr(e, "signum", signal.SIGINT)  # fit ended at once by a signal: which one
        what = getattr(e, "reason", None) or ("Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name)
        if getattr(e, "announce", True):
            print(stopped_line(command_named(argv), what), file=sys.stderr)
        return 128 + signum


def no_space_left(error: BaseException, command: str) -> UserError | None:
    """The one line for a command that filled its disk (or quota) where no writer of ours said so (TensorBoard's event
    file, raised at the next log); ``None`` for any other error."""
    if not out_of_space(error):
        return None
    where = next((e.filename for e in exception_chain(error) if getattr(e, "filename", None)), None)
    fix = "free space"
    if command == "fit":
        fix += f" (or set checkpoint.save_top_k); {RESUME_AFTER_A_FAILED_FIT}"
    return UserError(f"no space left on the device (or quota) while {command} ran", where or command, fix)


@contextmanager
def quiet_full_disk_in_tensorboard_thread() -> Iterator[None]:
    """Keep TensorBoard's event-writer thread from printing its traceback for a full disk: the logger raises the
    same error in the command's thread at its next write, which :func:`no_space_left` turns into one line. Any other
    thread's error, and any other error of that thread, is printed as before."""
    before = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        writer = type(args.thread).__module__.startswith("tensorboard.") if args.thread is not None else False
        if not (writer and out_of_space(args.exc_value)):
            before(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:
            threading.excepthook = before


def entry_point() -> None:
    """The process behind ``python -m epas_lightning`` and ``epas``: :func:`main`, then exit. Its objects are frozen
    first (``gc.freeze``): the interpreter's shutdown then skips the garbage collections that walk every object
    torch and Lightning created, for nothing; exit handlers run as before, and the OS frees the memory.

    A reader of stdout that stops early (``--help | head``) ends the command quietly with the status of a process
    killed by SIGPIPE, as ``yes | head`` does; the rest of the output goes nowhere."""
    try:
        status = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush has no reader
        status = 128 + signal.SIGPIPE
    gc.freeze()
    sys.exit(status)
