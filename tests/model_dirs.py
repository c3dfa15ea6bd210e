"""Write a model of ours as a ``consolidate`` directory (what ``export``, ``evaluate`` and ``load_model`` read), or the
config.json of an HF folder alone."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from epas_lightning import Llama, LlamaConfig


def save_hf_config(path: Path) -> Path:
    """An HF LLaMA folder with a config.json of the debug preset's shape and no weights: enough for a ``fit`` to read
    ``model.config`` from it (``model.init_from``) and print it (``--print_config``)."""
    path.mkdir()
    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    (path / "config.json").write_text(json.dumps(dict(model_type="llama", intermediate_size=128, **shape)))
    return path


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


def save_scripted(
    path: Path, tokenizer: Path, vocab_size: int, tokens: list[int], bos_id: int = 1, eos_id: int = 2
) -> Path:
    """A 2-layer model whose greedy continuation of any prompt cycles through ``tokens``, consolidated with
    ``tokenizer`` (BOS ``bos_id``, EOS ``eos_id``): attention and MLP add nothing, so each position's logits depend on
    its token only."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("debug", n_layer=2, vocab_size=vocab_size, block_size=64))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.zero_()
        embed, head = model.embed_tokens.weight, model.lm_head.weight
        embed.zero_(), head.zero_()
        embed[:, 0], head[tokens[0], 0] = 1.0, 10.0  # any other token is followed by the first
        for i, token in enumerate(tokens):
            embed[token] = 0.0
            embed[token, 1 + i], head[tokens[(i + 1) % len(tokens)], 1 + i] = 1.0, 10.0
    return save_consolidated(model, path, tokenizer, bos_id=bos_id, eos_id=eos_id)
