"""``python -m epas_lightning export --checkpoint CKPT --output DIR``: an HF model directory from a checkpoint of ours.

The directory holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files. It is
built beside the target and renamed into place when complete, so a failed export leaves nothing that looks loadable
and a re-export (``--overwrite``, of a folder this command wrote) leaves no stale file. The metadata of
``model.safetensors`` records where the weights came from (:mod:`epas_lightning.provenance`).

- No sharing region (``--sharing-layers 0``, or a dense checkpoint): a stock ``LlamaForCausalLM`` (a
  ``Qwen2ForCausalLM`` for a model with Qwen2's q/k/v biases); it loads in plain ``transformers`` (and anything that
  reads LLaMA or Qwen2 checkpoints) with the same logits as our model.
- With a region: ``model_type`` ``epas_llama`` plus its own modeling code (``configuration_epas_llama.py``,
  ``modeling_epas_llama.py``, torch + transformers only), loaded with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; the same weights, run with the region.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from epas_lightning.checkpoint import STORED, describe_checkpoint, load_model
from epas_lightning.checkpoint_formats import EXPORT_REGION_KEY, export_record
from epas_lightning.data.added_tokens import AddedToken, decoder_entry, without_texts
from epas_lightning.data.chat_template import chat_template_beside
from epas_lightning.data.tokenizer import (
    HF_FILENAME,
    SENTENCEPIECE_FILENAME,
    TextTokenizer,
    check_tokenizer_flag,
    hf_pipeline,
    load_tokenizer,
    resolve_tokenizer_path,
)
from epas_lightning.errors import sentence_start
from epas_lightning.hf.convert import ours_to_hf
from epas_lightning.inference.generate import set_region
from epas_lightning.model import LlamaConfig
from epas_lightning.outputs import check_output, output_folder, writing_into
from epas_lightning.provenance import carried, checked, export_metadata
from epas_lightning.region import EXPORT_UNRUN_FIX, SHARING_FLAGS, TrainedRegion
from epas_lightning.runtime import DType, dtype_name, emit_json, named_dtype

log = logging.getLogger(__name__)

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_epas_llama.py", "modeling_epas_llama.py")
EXPORT_KIND = "hf-export"


def hf_config(
    config: LlamaConfig,
    shared_layers: list[int] | None = None,
    region: TrainedRegion | None = None,
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The ``config.json`` of an exported model: stock LLaMA (Qwen2 for ``attention_bias: qkv``) when
    ``shared_layers`` is None, else ``epas_llama``; ``eos_id`` may list several end tokens (Llama 3's form), the first
    one the EOS documents ended with.

    RoPE is written both ways: ``rope_theta`` and (when scaled) ``rope_scaling`` for transformers 4.x,
    ``rope_parameters`` for 5.x (which reads ``rope_scaling`` first: the same values).
    """
    scaling = config.rope_scaling.to_dict() if config.rope_scaling else None
    record: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias is not None,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "dtype": dtype_name(dtype),  # transformers >= 4.56 name (`torch_dtype` loads with a deprecation warning)
    }
    if scaling:
        record["rope_scaling"] = scaling
    if config.attention_bias == "qkv" and shared_layers is None:  # Qwen2: biases on q, k and v, never o
        del record["attention_bias"], record["mlp_bias"]
        record.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.n_layer,
            attention_dropout=0.0,
        )
    if shared_layers is None and region and region.size and config.sharing_mode != "qk":
        # a stock folder runs dense, but its weights' region (recorded beside them) ran K/V sharing: read back, a
        # forced region, an init_from or inspect take that mode (transformers keeps the key as an attribute)
        record["epas_sharing_mode"] = config.sharing_mode
    if shared_layers is not None:
        record.update(
            architectures=["EpasLlamaForCausalLM"],
            model_type="epas_llama",
            auto_map={
                "AutoConfig": "configuration_epas_llama.EpasLlamaConfig",
                "AutoModel": "modeling_epas_llama.EpasLlamaModel",  # the base model, as a stock export's AutoModel
                "AutoModelForCausalLM": "modeling_epas_llama.EpasLlamaForCausalLM",
            },
            epas_shared_layers=sorted(shared_layers),
            epas_sharing_mode=config.sharing_mode,
            epas_max_shared_layers=region.size if region else len(shared_layers),
            epas_trained_region=list(region.layers) if region else sorted(shared_layers, reverse=True),
            epas_growth_order=region.order if region else "deep_first",
        )
        if config.attention_bias:
            record["epas_attention_bias"] = config.attention_bias
    return record


def export_tokenizer(
    path: Path, output: Path, block_size: int, bos_id: int | None, eos_id: int | None, rows: int | None = None
) -> None:
    """Write the tokenizer files and a ``tokenizer_config.json`` that ``AutoTokenizer.from_pretrained`` reads.

    Like LLaMA's, the exported tokenizer starts every text with BOS (``tokenizer(text)`` and ``encode(text)``), as
    every document the model trained on did: its ``tokenizer.json`` has a post-processor that adds it. A sentencepiece
    model is shipped as is and as a ``tokenizer.json`` that tokenizes as it does (transformers' own reading of a
    ``tokenizer.model`` does not): a warning says so when that pipeline differs on a probe text or cannot be built.
    Special-token strings in a text are text (``split_special_tokens``), as training read them, unless a chat template
    is shipped: the chat template found beside the tokenizer file is kept, and it writes its control tokens as text
    (``</s>``, ``<|im_start|>``), which must then read as those tokens, as the tokenizer it came with read them.
    ``rows``: the model's embedding rows; the special added tokens past them that
    :meth:`~epas_lightning.data.tokenizer.TextTokenizer.check_fits` drops are not shipped (a chat's ``<pad>`` text
    would read as an id the model has no row for). The other special tokens the folder names (``pad_token``, ...) are
    named too (:func:`other_named_tokens`): a chat template renders them. The files beside ``path`` are only read.
    """
    from tokenizers import processors

    path = resolve_tokenizer_path(path)
    tokenizer = load_tokenizer(path, bos_id=bos_id, eos_id=eos_id)  # only a file that parses as a tokenizer is shipped
    if rows is not None:
        tokenizer.check_fits(rows)
    bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    if tokenizer.kind == "hf":  # without the added tokens check_fits dropped
        pipeline = hf_pipeline(path, below=tokenizer.vocab_size) if rows is not None else tokenizer.backend
    else:
        pipeline = _sentencepiece_pipeline(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    token = tokenizer.id_to_token
    if pipeline is None:  # a word or char sentencepiece model: transformers' LlamaTokenizer reads it (roughly)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False}
    else:
        bos = token(bos_id)
        pipeline.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        pipeline.save(str(output / HF_FILENAME))
    if tokenizer.kind == "sentencepiece":
        shutil.copyfile(path, output / SENTENCEPIECE_FILENAME)
        config["added_tokens_decoder"] = {str(i): decoder_entry(token) for i, token in sorted(tokenizer.added.items())}
    special = {"bos_token": token(bos_id), "eos_token": token(eos_id), **other_named_tokens(tokenizer)}
    chat = chat_template_beside(path)
    # "</s>" in a text is text, as training (TextTokenizer) read it; a chat template's are its control tokens
    tokenizer_config = {**config, **special, "model_max_length": block_size, "split_special_tokens": not chat, **chat}
    (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def other_named_tokens(tokenizer: TextTokenizer) -> dict[str, str | list[str]]:
    """The special tokens besides BOS and EOS that the tokenizer's folder names (``pad_token``, ``unk_token``,
    ``additional_special_tokens``), as our loader kept them: those with an id in ``tokenizer`` (transformers would add
    another as a new id, which the model has no row for)."""

    def no_id(text: str) -> bool:
        return (token_id := tokenizer.token_id(text)) is None or token_id >= tokenizer.vocab_size

    texts = {text for value in tokenizer.named.values() for text in ([value] if isinstance(value, str) else value)}
    kept = without_texts(tokenizer.named, set(filter(no_id, texts)))
    return {key: value for key, value in kept.items() if key not in ("bos_token", "eos_token")}


def _sentencepiece_pipeline(tokenizer: TextTokenizer):  # noqa: ANN202
    """The ``tokenizers`` pipeline shipped as ``tokenizer.json`` for a sentencepiece model, checked on probe texts;
    ``None`` when it cannot be built (a warning says so)."""
    from epas_lightning.hf.sentencepiece_json import (
        PROBE_TEXTS,
        first_difference,
        sentencepiece_tokenizer,
        user_defined_pieces,
    )

    pipeline = sentencepiece_tokenizer(tokenizer.path)
    if pipeline is not None and tokenizer.added:
        add_tokens(pipeline, tokenizer.added, tokenizer.path)
    if pipeline is None:
        log.warning(
            f"{tokenizer.path} is a word or char sentencepiece model: the export has no tokenizer.json, and "
            "transformers may tokenize text differently from training; tokenize with sentencepiece to be sure"
        )
        return None
    texts = [*PROBE_TEXTS, " ".join(user_defined_pieces(tokenizer.path))]
    pipeline.encode_special_tokens = True  # as split_special_tokens makes transformers run it
    if (difference := first_difference(tokenizer, pipeline, texts)) is not None:
        log.warning(
            f"the exported tokenizer.json does not tokenize as {tokenizer.path} the model trained with: {difference}; "
            "transformers users get other tokens for such text (tokenize with sentencepiece to be sure)"
        )
    return pipeline


def add_tokens(pipeline, added: dict[int, AddedToken], path: Path) -> None:  # noqa: ANN001
    """Add a sentencepiece model's added tokens (by id) to its ``tokenizers`` pipeline, at their ids
    (an id the folder leaves unnamed between the pieces and them: a special placeholder); a warning naming ``path``
    when one cannot get its id (its text is one of the pieces)."""
    import tokenizers

    for token_id in range(pipeline.get_vocab_size(with_added_tokens=True), max(added) + 1):
        token = added.get(token_id, AddedToken(f"<|unnamed_{token_id}|>", True))
        hf_token = tokenizers.AddedToken(token.text, lstrip=token.lstrip, rstrip=token.rstrip, normalized=False)
        (pipeline.add_special_tokens if token.special else pipeline.add_tokens)([hf_token])
    if moved := [token.text for token_id, token in added.items() if pipeline.token_to_id(token.text) != token_id]:
        log.warning(
            f"the added tokens {moved} beside {path} are pieces of the model too: the exported tokenizer.json reads "
            "them as those pieces' ids"
        )


def exported_tokenizer(  # noqa: ANN201
    path: Path, block_size: int, bos_id: int | None = None, eos_id: int | None = None, rows: int | None = None
):
    """The ``transformers`` tokenizer that :func:`export` ships for the tokenizer file ``path`` (and a model of
    ``rows`` embedding rows), in memory: what ``AutoTokenizer.from_pretrained(export_dir)`` (and lm-eval's ``hf``
    model) reads."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        export_tokenizer(Path(path), Path(folder), block_size, bos_id, eos_id, rows)
        return AutoTokenizer.from_pretrained(folder)


def export(
    checkpoint: str | Path,
    output: str | Path,
    sharing_layers: int | None = None,
    tokenizer: str | Path | None = None,
    remote_code: bool = False,
    dtype: DType = "auto",
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the HF directory ``output`` for ``checkpoint``; return ``output``.

    Args:
        checkpoint: A ``.ckpt``, FSDP2 checkpoint directory, ``consolidate`` directory or Hugging Face LLaMA folder.
        output: Directory to write (built beside it and renamed into place).
        sharing_layers: Region length N (the first N layers of the trained region; of a stock export, of the region
            it recorded, above 0 only with ``force``). Default: the trained region (an export's folder: the N it was
            exported with).
        tokenizer: Tokenizer file or directory to ship. Default: the one the checkpoint records.
        remote_code: Write the ``epas_llama`` form (own modeling code) even with no region, so a region can be chosen
            at load time (``epas_shared_layers=[...]``).
        dtype: ``float32``, ``bfloat16`` or ``float16``; ``auto``: the checkpoint's.
        force: Allow a region longer than the one the weights were trained with.
        overwrite: Replace ``output`` if it is an export written by this function.
    """
    check_output(output, EXPORT_KIND, overwrite, [checkpoint])
    torch_dtype = None if dtype == "auto" else named_dtype(dtype)
    recorded = describe_checkpoint(checkpoint)  # the region and the tokenizer checked before the weights load
    n = recorded.default_sharing if sharing_layers is None else sharing_layers
    # of a stock export, N above 0 needs --force as in every command (advised as export takes it), and counts in its
    # record, which it writes
    recorded.region.first(n, force, SHARING_FLAGS, unrun_fix=EXPORT_UNRUN_FIX)
    tokenizer_path = recorded.tokenizer_file(tokenizer)
    eos_ids: int | list[int] | None = recorded.eos_id
    if tokenizer_path is not None:
        ids = {"bos_id": recorded.bos_id, "eos_id": recorded.eos_id}
        text_tokenizer = load_tokenizer(tokenizer_path, **ids)
        text_tokenizer.check_fits(recorded.config.vocab_size)  # transformers would fail on ids past the embedding
        stop_ids = list(text_tokenizer.stop_ids)  # Llama 3 Instruct's list, as transformers stops at it
        eos_ids = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    loaded = load_model(checkpoint, dtype=torch_dtype or STORED, flag="--checkpoint")  # no wider copy of the weights
    model, config = loaded.model, loaded.model.config
    shared = set_region(model, n, loaded.region, force, SHARING_FLAGS)
    trained = loaded.weights_region or loaded.region
    use_remote = remote_code or n > 0
    state = ours_to_hf(model.state_dict(), config)  # the model's tensors, not copies
    torch_dtype = torch_dtype or loaded.weights_dtype
    with output_folder(output, EXPORT_KIND, overwrite, inputs=[checkpoint]) as build:
        provenance = export_metadata(carried(loaded.training, checkpoint), output)  # not config.json: see provenance.py
        if not use_remote and trained.size:  # a record only: the stock config.json runs dense
            provenance[EXPORT_REGION_KEY] = json.dumps(trained.to_record())
        save_file(state, build / "model.safetensors", metadata={"format": "pt", **provenance})
        record = hf_config(config, shared if use_remote else None, trained, loaded.bos_id, eos_ids, torch_dtype)
        generation = {"bos_token_id": loaded.bos_id, "eos_token_id": eos_ids}
        with writing_into(build):
            (build / "config.json").write_text(json.dumps(record, indent=2) + "\n")
            (build / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if use_remote:
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_DIR / name, build / name)
        if not use_remote and trained.size:
            log.warning(
                f"The stock folder runs dense in our commands and in transformers: it does not carry the trained "
                f"region ({trained.describe()}), which inspect shows from the record in its model.safetensors; "
                "export with --remote-code to keep the region with 0 sharing layers"
            )
        if tokenizer_path is None:
            log.warning(f"{sentence_start(loaded.no_tokenizer())}: exported weights and config only; pass --tokenizer.")
        else:
            export_tokenizer(
                Path(tokenizer_path), build, config.context_length, loaded.bos_id, loaded.eos_id, config.vocab_size
            )
            if record["model_type"] == "qwen2":
                _check_qwen2_tokenizer(build, text_tokenizer)
    return Path(output).expanduser().absolute()


def _check_qwen2_tokenizer(folder: Path, ours: TextTokenizer) -> None:
    """Warn in one line when ``AutoTokenizer.from_pretrained(folder)`` tokenizes a probe text otherwise than ``ours``:
    transformers builds its own ``Qwen2Tokenizer`` for a qwen2 model (Qwen's pre-tokenizer over the vocabulary and
    merges), whatever ``tokenizer.json`` says, which only Qwen's own tokenizer agrees with."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from transformers import AutoTokenizer

    from epas_lightning.hf.sentencepiece_json import PROBE_TEXTS

    theirs = AutoTokenizer.from_pretrained(folder)
    for text in (t for t in PROBE_TEXTS if "<" not in t):  # special-token text: split_special_tokens decides it
        ids, read = ours.encode(text), theirs(text, add_special_tokens=False)["input_ids"]
        if ids != read:
            log.warning(
                f"transformers reads this stock Qwen2 export's tokenizer as its {type(theirs).__name__}, which "
                f"tokenizes {text!r} as {read} instead of {ids} (the model's tokens): export with --remote-code, "
                "whose AutoTokenizer reads the tokenizer.json the model trained with"
            )
            return


def export_summary(folder: Path) -> dict[str, Any]:
    """What an export folder holds, for ``--json``: its form, region, dtype, whether it ships a tokenizer, and where
    the weights came from (:mod:`~epas_lightning.provenance`)."""
    record = json.loads((folder / "config.json").read_text())
    shared = record.get("epas_shared_layers", [])  # ascending, as transformers reads it: listed in growth order
    if shared:
        n_layer, trained = record["num_hidden_layers"], tuple(record["epas_trained_region"])
        shared = TrainedRegion(n_layer, trained, record["epas_growth_order"]).in_growth_order(shared)
    return {
        "output": str(folder),
        "model_type": record["model_type"],
        "trust_remote_code": record["model_type"] == "epas_llama",
        "sharing_layers": len(shared),
        "shared_layers": shared,
        "dtype": record["dtype"],
        "tokenizer": (folder / "tokenizer_config.json").is_file(),
        "training": checked(export_record(folder)),  # the folder was just written: it has the record
    }


def export_command(
    checkpoint: Path,
    output: Path,
    sharing_layers: int | None = None,
    tokenizer: Path | None = None,
    remote_code: bool = False,
    dtype: DType = "auto",
    force: bool = False,
    overwrite: bool = False,
    json: bool = False,
) -> None:
    """Write a Hugging Face model folder (safetensors, config, tokenizer) from a checkpoint.

    With no sharing region it is a stock LlamaForCausalLM (Qwen2ForCausalLM for a Qwen2 model); with one, an
    epas_llama folder with its own modeling code,
    loaded with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        output: The folder to write.
        sharing_layers: Region length N (the first N layers of the trained region, in its growth order; of a
            stock export, of the region it recorded, above 0 only with --force, as in every command); default: the
            trained region (an export's folder: the N it was exported with); 0 writes a stock LLaMA.
        tokenizer: Tokenizer file or folder to ship (default: the one the checkpoint records).
        remote_code: Write the epas_llama form (own modeling code) even for N = 0.
        dtype: Weight dtype of the folder written (floating-point tensors only: bfloat16 halves a float32
            checkpoint); auto keeps the checkpoint's.
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
        overwrite: Replace --output if it is an export written by this command.
        json: End with one JSON line of what was written.
    """
    check_tokenizer_flag(tokenizer)
    summary = export_summary(
        export(checkpoint, output, sharing_layers, tokenizer, remote_code, dtype, force, overwrite)
    )
    stock = "stock Qwen2ForCausalLM" if summary["model_type"] == "qwen2" else "stock LlamaForCausalLM"
    kind = "epas_llama, loads with trust_remote_code=True" if summary["trust_remote_code"] else stock
    print(f"wrote {summary['output']} ({kind})")
    emit_json(summary, json)
