"""Write a model of ours as a ``consolidate`` directory (what ``export``, ``evaluate`` and ``load_model`` read)."""

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from epas_lightning import Llama


def save_consolidated(
    model: Llama, path: Path, tokenizer: Path | None = None, bos_id: int = 0, eos_id: int = 1
) -> Path:
    """``model`` (with its current sharing region as the trained one) into ``path``; the tokenizer is copied in."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, path / "model.safetensors")
    record = {"model": model.config.to_dict(), "sharing": {"shared_layers": model.sharing.shared_layers}}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / tokenizer.name)
        record["tokenizer"] = {"path": tokenizer.name, "bos_id": bos_id, "eos_id": eos_id}
    (path / "config.json").write_text(json.dumps(record))
    return path
