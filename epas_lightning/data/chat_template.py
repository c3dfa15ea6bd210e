"""A tokenizer's chat template, kept with the tokenizer file wherever we copy it (``prepare``, ``consolidate``) and
shipped by ``export``: a chat model continually pretrained here exports with the template it came with.

Read as ``transformers`` reads a tokenizer folder: ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``
when present, else the ``chat_template`` entry of ``tokenizer_config.json``. Kept as that entry of a
``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` for several), the form every version of
``transformers`` reads. The template is text: it is copied, never rendered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_FILENAME = "tokenizer_config.json"
TEMPLATE_FILENAME = "chat_template.jinja"
TEMPLATES_DIRNAME = "additional_chat_templates"


def chat_template_beside(tokenizer_file: Path) -> dict[str, Any]:
    """The ``tokenizer_config.json`` entry holding the chat template of the folder ``tokenizer_file`` lies in:
    ``{"chat_template": ...}``, or ``{}`` when it has none (or an unreadable one, with a warning naming it)."""
    try:
        return read_chat_template(tokenizer_file)
    except UnreadableTemplate as e:
        log.warning(f"The chat template beside {tokenizer_file} is unreadable ({e}): it is not kept")
        return {}


class UnreadableTemplate(ValueError):
    """A chat template file, or a ``tokenizer_config.json``, that cannot be read (not UTF-8, not JSON, ...)."""


def read_chat_template(tokenizer_file: Path) -> dict[str, Any]:
    """:func:`chat_template_beside`, raising :class:`UnreadableTemplate` for an unreadable template instead."""
    folder = Path(tokenizer_file).parent
    try:
        templates = _template_files(folder) or _config_templates(folder / CONFIG_FILENAME)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UnreadableTemplate(str(e)) from e
    if not templates:
        return {}
    if list(templates) == ["default"]:
        return {"chat_template": templates["default"]}
    return {"chat_template": [{"name": name, "template": text} for name, text in templates.items()]}


def keep_chat_template(tokenizer_file: Path, folder: Path) -> None:
    """Write the chat template beside ``tokenizer_file`` (if any) into ``folder``'s ``tokenizer_config.json``, where
    :func:`chat_template_beside` finds it again for the tokenizer file copied into ``folder``."""
    if entry := chat_template_beside(tokenizer_file):
        (folder / CONFIG_FILENAME).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")


def _template_files(folder: Path) -> dict[str, str]:
    templates = {}
    if (folder / TEMPLATE_FILENAME).is_file():
        templates["default"] = (folder / TEMPLATE_FILENAME).read_text(encoding="utf-8")
    if (folder / TEMPLATES_DIRNAME).is_dir():
        for path in sorted((folder / TEMPLATES_DIRNAME).glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    return templates


def _config_templates(config_file: Path) -> dict[str, str]:
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    entry = config.get("chat_template") if isinstance(config, dict) else None
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in entry
    ):
        return {t["name"]: t["template"] for t in entry}
    raise ValueError(f"its chat_template in {config_file.name} is neither a string nor a list of named templates")
