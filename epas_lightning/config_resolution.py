"""The configuration of ``fit``/``validate``/``test`` completed from its sources, before anything is built.

``--config demo`` names a packaged config; ``model.config`` is filled from ``model.init_from`` (or a resumed
checkpoint) and gives the sections linked to it; a prepared ``data.data_dir`` unsets the built-in corpus settings an
earlier source gave.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from epas_lightning.checkpoint import recorded_config
from epas_lightning.cli import config_positions
from epas_lightning.data.token_data import BUILTIN_SETTINGS
from epas_lightning.errors import ConfigError, did_you_mean
from epas_lightning.init_from import config_from_source, filled_from
from epas_lightning.model import LlamaConfig
from epas_lightning.model.config import OTHER_NAMES

CONFIG_DIR = Path(__file__).parent / "configs"
"""The YAML configs shipped with the package (``--config demo`` finds ``demo.yaml`` here)."""


def packaged_config(name: str) -> Path | None:
    """A config shipped with the package, by name (``demo`` or ``demo.yaml``), if there is one."""
    for candidate in (name, f"{name}.yaml"):
        path = CONFIG_DIR / candidate
        if "/" not in name and path.is_file():
            return path
    return None


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config demo`` -> the packaged ``demo.yaml`` when no file of that name exists here."""
    out = list(argv)
    for i, token in enumerate(out):
        name, sep, value = token.partition("=")
        if name not in ("--config", "-c"):
            continue
        target = value if sep else (out[i + 1] if i + 1 < len(out) else None)
        if target is None or Path(target).expanduser().exists():
            continue
        packaged = packaged_config(target)
        if packaged is None:
            shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError("config file does not exist", f"--config {target}", f"give a path, or one of: {shipped}")
        if sep:
            out[i] = f"{name}={packaged}"
        else:
            out[i + 1] = str(packaged)
    return out


def _config_fields(value: Any) -> dict[str, Any]:
    """The fields of a parsed ``model.config`` value (a namespace, dict or dataclass)."""
    if isinstance(value, LlamaConfig):
        return value.to_dict()
    data = value.as_dict() if hasattr(value, "as_dict") else dict(value or {})
    data = data.get("init_args", data)
    if isinstance(scaling := data.get("rope_scaling"), dict):  # an optional dataclass parses as class_path/init_args
        data["rope_scaling"] = scaling.get("init_args", scaling)
    return data


def as_model_config(value: Any) -> LlamaConfig:
    """The model config from a parsed ``model.config`` value (a namespace, dict or dataclass); a field it does not
    have (``n_layers`` in a YAML) is one line naming it, not the link's message with the whole namespace."""
    if isinstance(value, LlamaConfig):
        return value
    given = _config_fields(value)
    known = [field.name for field in dataclasses.fields(LlamaConfig)]
    for name in given:
        if name not in known:
            raise ConfigError(
                f"model.config has no field {name!r}{did_you_mean(name, known, OTHER_NAMES)}",
                f"model.config.{name}",
                f"use one of {', '.join(known)}",
            )
    return LlamaConfig(**given)


LINKED_FIELDS = {"sharing.n_layer": "n_layer", "data.seq_len": "block_size", "data.vocab_size": "vocab_size"}
"""The values of other sections that ``model.config`` gives (linked: the parser refuses them set by hand)."""


class LinkedField:
    """The link's function: ``field`` of ``model.config``; with ``init_from``, ``None`` until :func:`resolve_model`
    has read the source, after parsing (a resume reads its checkpoint instead). A class, not a closure: the parser
    (in ``SaveConfigCallback``) is pickled to the processes ``ddp_spawn`` starts."""

    def __init__(self, field: str) -> None:
        self.field, self.__name__ = field, f"config_{field}"

    def __call__(self, config: Any, init_from: str | None) -> Any:
        return None if init_from else getattr(as_model_config(config), self.field)


def missing_init_from(section: Namespace) -> str | None:
    """``model.init_from`` where it names a path that does not exist (a config's placeholder, to be replaced), else
    ``None``."""
    init_from = section.model.get("init_from")
    return None if not init_from or Path(init_from).expanduser().exists() else str(init_from)


def resolve_model(section: Namespace, ckpt_path: str | None = None) -> None:
    """With ``model.init_from``, ``model.config`` whole: the fields left unset taken from the source model, or when
    resuming ``ckpt_path`` from that checkpoint; the sections linked to it set from it."""
    init_from = section.model.get("init_from")
    if not init_from:
        return
    fields = _config_fields(section.model.config)
    if ckpt_path:  # a resume wins: init_from is not read, its folder may be gone
        config = filled_from(recorded_config(ckpt_path, "--ckpt_path"), fields, ours=True)
    else:
        config = config_from_source(init_from, fields)
    section.model.config = Namespace(**config.to_dict())
    for target, field in LINKED_FIELDS.items():
        section[target] = getattr(config, field)


def drop_overridden_builtin_settings(data: Namespace, command_line: list[str]) -> None:
    """With a prepared ``data.data_dir``, unset the built-in corpus's settings (:data:`BUILTIN_SETTINGS`) that an
    earlier source gave than ``data_dir``'s: ``configs/debug.yaml``'s ``max_bytes`` sized its corpus, and a folder
    given after it replaces that corpus. One given with ``data_dir`` or after it (in the same config file, on the
    command line) is left for the data module to refuse."""
    if not data.get("data_dir"):
        return
    sources = data_sources(command_line)
    folder = last_source(sources, "data_dir")
    for name in BUILTIN_SETTINGS:
        given = last_source(sources, name)
        if data.get(name) is not None and given is not None and (folder is None or given < folder):
            data[name] = None


def data_sources(command_line: list[str]) -> list[set[str]]:
    """The ``data`` keys each source of ``command_line`` sets, in the order they are parsed: a ``--config`` file's,
    a ``--data.KEY`` flag's."""
    import yaml

    configs = config_positions(command_line)
    sources: list[set[str]] = []
    for i, arg in enumerate(command_line):
        if arg.startswith("--data."):
            sources.append({arg.partition("=")[0].removeprefix("--data.")})
        elif i in configs:
            try:
                config = yaml.safe_load(Path(configs[i]).expanduser().read_text())
            except (OSError, yaml.YAMLError):  # parsed already: a config given otherwise than as a file
                config = None
            section = config.get("data") if isinstance(config, dict) else None
            sources.append({key for key, v in section.items() if v is not None} if isinstance(section, dict) else set())
    return sources


def last_source(sources: list[set[str]], key: str) -> int | None:
    """The position of the last of ``sources`` that sets ``key``; ``None``: none of them does."""
    return max((i for i, keys in enumerate(sources) if key in keys), default=None)
