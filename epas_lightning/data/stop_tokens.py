"""The tokens a model's generation stops at, kept with the tokenizer file wherever we copy it (``prepare``,
``consolidate``), as its chat template is.

An HF model folder names them as ``eos_token_id`` (an id or a list) in ``generation_config.json`` and ``config.json``:
Llama 3.x Instruct ends a turn with ``<|eot_id|>`` and lists it beside ``<|end_of_text|>``, the token its documents
end with. ``generate``, ``serve`` and ``lm-eval`` stop at any of them, as ``transformers`` does, and ``export`` writes
them all. They are kept as the ``eos_token_id`` list of a ``generation_config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
FILES = (GENERATION_CONFIG, "config.json")


def stop_ids_beside(tokenizer_file: Path) -> list[int]:
    """The ``eos_token_id`` entries of the ``generation_config.json`` and ``config.json`` in the folder
    ``tokenizer_file`` lies in, in order and once each; ``[]`` when there are none (or a file is unreadable, with a
    warning naming it)."""
    ids: list[int] = []
    for name in FILES:
        path = Path(tokenizer_file).parent / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            value = record.get("eos_token_id") if isinstance(record, dict) else None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning(f"{path} is unreadable ({e}): the end tokens it may name are not read")
            continue
        value = [value] if isinstance(value, int) else value or []
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            log.warning(f"eos_token_id in {path} is neither an id nor a list of ids: it is not read")
            continue
        ids += [i for i in value if i not in ids]
    return ids


def keep_stop_ids(tokenizer_file: Path, folder: Path) -> None:
    """Write the end tokens beside ``tokenizer_file`` (if any) into ``folder``'s ``generation_config.json``, where
    :func:`stop_ids_beside` finds them again for the tokenizer file copied into ``folder``."""
    if ids := stop_ids_beside(tokenizer_file):
        (folder / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": ids}, indent=2) + "\n")
