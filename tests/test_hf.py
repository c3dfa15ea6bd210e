"""HF interop: HF LLaMA -> our model (logits equal), ``model.init_from`` in ``fit``, export (stock and remote code).

Every HF model here is a tiny random ``transformers.LlamaForCausalLM`` saved into tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import warnings
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import cpu_trainer, train_tiny_sentencepiece
from lightning.pytorch import Callback
from model_dirs import save_consolidated

from epas_lightning import EPASModule, Llama, LlamaConfig
from epas_lightning.checkpoint import STORED, describe_checkpoint, load_model
from epas_lightning.cli import main
from epas_lightning.consolidation import consolidate
from epas_lightning.errors import CheckpointError, ConfigError
from epas_lightning.hf.convert import HFCheckpointError, config_from_hf, load_hf_state, resize_rows
from epas_lightning.inference import set_region
from epas_lightning.init_from import resumed_instead, source_config

transformers = pytest.importorskip("transformers")

VOCAB = 512
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def tiny_hf_config(tie: bool = False, kind: str = "Llama", **overrides) -> transformers.PretrainedConfig:
    """The config of a tiny ``transformers`` model of ``kind`` (``Llama``, ``Mistral``, ``Qwen2``)."""
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    return getattr(transformers, f"{kind}Config")(**{**kwargs, **overrides})


def save_tiny_hf(
    path: Path, tie: bool = False, sharded: bool = False, seed: int = 0, kind: str = "Llama", **overrides
) -> Path:
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(tiny_hf_config(tie, kind, **overrides)).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so a missed one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    return path


def ours_from_hf(path: Path, **overrides) -> Llama:
    config = config_from_hf(path, **overrides)
    model = Llama(config)
    state = load_hf_state(path, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["sharing.mask"] and not unexpected
    return model.eval()


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie,sharded", [(False, False), (True, False), (False, True), (True, True)])
def test_import_logits_equal_transformers(tmp_path: Path, tie: bool, sharded: bool) -> None:
    path = save_tiny_hf(tmp_path / "hf", tie=tie, sharded=sharded)
    if sharded:
        assert (path / "model.safetensors.index.json").is_file()
    config = config_from_hf(path)
    assert (config.rope_theta, config.norm_eps, config.n_kv_head, config.tie_embeddings) == (50000.0, 1e-6, 2, tie)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = ours_from_hf(path)(ids)
    torch.testing.assert_close(ours, hf_logits(path, ids), atol=1e-5, rtol=1e-5)
    # load_model (every --checkpoint) keeps one tensor for a tied head: materialising it had made two equal copies
    loaded = load_model(path).model
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie


def test_a_mistral_without_a_sliding_window_is_our_llama_and_exports_as_one(tmp_path: Path, capsys) -> None:
    """Mistral-7B-v0.3 is a LLaMA under model_type mistral (sliding_window null) and was refused; it now imports with
    transformers' logits (a window that spans the context masks nothing either) and exports as a stock LLaMA. A window
    shorter than the context is refused in one line."""
    ids = torch.randint(0, VOCAB, (2, 24))
    for window in (None, 64):
        path = save_tiny_hf(tmp_path / f"mistral{window}", kind="Mistral", sliding_window=window)
        with torch.no_grad():
            torch.testing.assert_close(ours_from_hf(path)(ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)
    # trained longer than its context, the window (64) masks in transformers: it was taken as masking nothing
    says = r"^sliding_window=64 does not span the 128 tokens model.config runs at .* — set model.config.block_size"
    with pytest.raises(HFCheckpointError, match=says):
        load_hf_state(path, config_from_hf(path, block_size=128))
    with pytest.raises(HFCheckpointError, match=says):
        source_config(path, block_size=128)
    assert source_config(path, block_size=32).context_length == 64
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)
    save_tiny_hf(tmp_path / "windowed", kind="Mistral", sliding_window=16)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "windowed"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sliding_window=16 does not span its context") and err.count("\n") == 1, err
    config = json.loads((tmp_path / "windowed" / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="sliding_window=16 does not span"):  # was a TypeError traceback
        config_from_hf({**config, "max_position_embeddings": None})
    del config[
        "sliding_window"
    ]  # transformers' Mistral then slides its default 4096-token window: it was taken as none
    with pytest.raises(HFCheckpointError, match=r"^sliding_window=4096 \(transformers' default.*\) does not span"):
        config_from_hf({**config, "max_position_embeddings": 8192})
    assert config_from_hf({**config, "max_position_embeddings": 4096}).block_size == 4096


@pytest.mark.parametrize("kind,overrides", [("Qwen2", {}), ("Llama", {"attention_bias": True})], ids=["qwen2", "llama"])
def test_attention_biases_import_with_transformers_logits(tmp_path: Path, kind: str, overrides: dict) -> None:
    """A Qwen2/2.5 (biases on q, k and v) and a LLaMA with attention_bias (on all four projections) were refused; they
    import with transformers' logits, which the model without its biases does not give, and decode through the KV
    cache as the full forward computes, a sharing layer skipping its q/k biases with the projections."""
    path = save_tiny_hf(tmp_path / "hf", tie=True, kind=kind, **overrides)
    ids = torch.randint(0, VOCAB, (2, 24))
    model, expected = ours_from_hf(path), hf_logits(path, ids)
    assert model.config.attention_bias == ("qkv" if kind == "Qwen2" else "qkvo")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        unbiased = Llama(replace(model.config, attention_bias=None))
        unbiased.load_state_dict(model.state_dict(), strict=False)
        assert (unbiased.eval()(ids) - expected).abs().max() > 1e-3
        model.set_shared_layers([1])
        full, cache = model(ids), model.new_cache(2, 24)
        pieces = [model(ids[:, :16], cache)] + [model(ids[:, t : t + 1], cache) for t in range(16, 24)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_a_qwen2_sliding_window_counts_only_when_it_is_on(tmp_path: Path) -> None:
    """Qwen2 bases name a sliding_window they do not use (use_sliding_window: false); one that is on and shorter than
    the context is refused, as Mistral's is."""
    record = json.loads((save_tiny_hf(tmp_path / "hf", kind="Qwen2") / "config.json").read_text())
    assert config_from_hf({**record, "sliding_window": 16}).attention_bias == "qkv"
    windowed = {**record, "sliding_window": 16, "use_sliding_window": True, "layer_types": None}
    with pytest.raises(HFCheckpointError, match=r"^use_sliding_window=true with sliding_window=16 does not span"):
        config_from_hf({**windowed, "max_window_layers": 1})
    # transformers slides the window over the layers from max_window_layers on (or those layer_types names): none here
    for spelled in ({"max_window_layers": 2}, {"max_window_layers": 1, "layer_types": ["full_attention"] * 2}):
        assert config_from_hf({**windowed, **spelled}).attention_bias == "qkv"
    with pytest.raises(HFCheckpointError, match=r"^use_sliding_window=true with sliding_window=16 does not span"):
        config_from_hf({**windowed, "max_window_layers": 2, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(HFCheckpointError, match="use_sliding_window must be true or false, got 'no'"):
        config_from_hf({**windowed, "use_sliding_window": "no", "max_window_layers": 1})


@pytest.mark.parametrize("kind", ["Mistral", "Qwen2", "Llama"])
def test_key_value_heads_left_out_are_read_as_transformers_reads_them(tmp_path: Path, kind: str) -> None:
    """A config.json without num_key_value_heads: transformers' Mistral and Qwen2 then take their class default (8,
    32), its LLaMA the head count; we took the head count for all three, so a Mistral's k_proj did not fit. Where the
    default cannot divide the heads, the refusal says what config.json lacks."""
    record = json.loads(tiny_hf_config(kind=kind, hidden_size=128, num_attention_heads=64).to_json_string())
    del record["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).num_key_value_heads  # 4.x's default or 5.x's alike
    assert config_from_hf(record).n_kv_head == theirs
    if kind != "Llama":
        with pytest.raises(HFCheckpointError, match=rf"^its config.json names no num_key_value_heads, .*as {theirs}"):
            config_from_hf({**record, "num_attention_heads": 4, "head_dim": None})


@pytest.mark.parametrize("kind", ["Mistral", "Qwen2", "Llama"])
def test_a_context_left_out_is_read_as_transformers_reads_it(tmp_path: Path, kind: str) -> None:
    """A config.json without max_position_embeddings: transformers takes its class default (Mistral 131072, Qwen2
    32768, LLaMA 2048); we took 2048 for all, so a Mistral's 4096-token window passed as spanning the context and the
    model attended past it from token 4097 on, silently. A llama3 RoPE's original context defaults to it too."""
    record = json.loads(tiny_hf_config(kind=kind, sliding_window=None).to_json_string())
    del record["max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    context = transformers.AutoConfig.from_pretrained(tmp_path).max_position_embeddings
    if kind != "Llama":
        window = {"sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 0, "layer_types": None}
        says = rf"sliding_window=4096 does not span its context \(max_position_embeddings={context}\)"
        with pytest.raises(HFCheckpointError, match=says):
            config_from_hf({**record, **window})
    assert config_from_hf(record).block_size == context
    if not TRANSFORMERS_5:
        return  # 4.x has no rope_parameters, and its llama3 RoPE no default original context
    record["rope_parameters"] = {**LLAMA3, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(record))
    theirs, ours = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters, config_from_hf(record)
    assert ours.rope_scaling.original_max_position_embeddings == theirs["original_max_position_embeddings"]


@pytest.mark.parametrize("kind", ["Mistral", "Qwen2"])
def test_mlp_bias_is_ignored_where_transformers_ignores_it(tmp_path: Path, kind: str) -> None:
    """transformers' Mistral and Qwen2 have no MLP biases whatever mlp_bias says; we refused such a config.json (a
    LLaMA's mlp_bias: true stays refused: its MLP has them)."""
    record = {**json.loads(tiny_hf_config(kind=kind).to_json_string()), "mlp_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(record))
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert not [name for name, _ in theirs.named_parameters() if "mlp" in name and name.endswith(".bias")]
    assert config_from_hf(record) == config_from_hf({**record, "mlp_bias": False})


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_TINY = {**LLAMA3, "original_max_position_embeddings": 16}
"""Llama 3.x's RoPE scaling with a 16-token original context: over 48 tokens most frequencies turn 8 times slower."""


def without_rope_scaling(model: Llama) -> Llama:
    unscaled = Llama(replace(model.config, rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    return unscaled.eval()


@pytest.mark.parametrize(
    "scaling,field",
    [(LLAMA3_TINY, "rope_parameters"), (LLAMA3_TINY, "rope_scaling"), ({"rope_type": "linear", "factor": 4.0}, "")],
    ids=["llama3-5.x", "llama3-4.x", "linear"],
)
def test_import_scaled_rope_logits_equal_transformers(tmp_path: Path, scaling: dict, field: str) -> None:
    """A Llama 3.x folder (rope_type llama3) was refused; it imports with transformers' logits, which the unscaled
    RoPE does not give."""
    path = save_tiny_hf(tmp_path / "hf", max_position_embeddings=128, rope_scaling=dict(scaling))
    record = json.loads((path / "config.json").read_text())
    if field == "rope_scaling" and "rope_parameters" in record:  # as transformers 4.x and the Hub's Llama 3.x write it
        params = record.pop("rope_parameters")
        record.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
        (path / "config.json").write_text(json.dumps(record))
    ids = torch.randint(0, VOCAB, (2, 48))
    model, expected = ours_from_hf(path), hf_logits(path, ids)
    assert model.config.rope_scaling.to_dict() == scaling
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        assert (without_rope_scaling(model)(ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["equal", "different", "only"])
def test_a_tied_folder_with_its_own_lm_head_is_read_only_where_they_agree(tmp_path: Path, head: str) -> None:
    """tie_word_embeddings true beside an lm_head.weight of other values: transformers 5 does not tie them (it uses
    lm_head.weight), we used the embedding, and every command ran another model than transformers did. A tied matrix
    stored as lm_head.weight alone (transformers ties it to the embedding) ended in a KeyError traceback."""
    from safetensors.torch import load_file, save_file

    if head == "only" and not TRANSFORMERS_5:
        pytest.skip("transformers 4.x leaves such a folder's embedding unset (on the meta device): nothing to compare")
    path = save_tiny_hf(tmp_path / "hf", tie=True)
    state = load_file(path / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = torch.randn_like(embed) if head == "different" else embed.clone()
    if head == "only":
        del state["model.embed_tokens.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    readers = (lambda: load_model(path).model, lambda: ours_from_hf(path))
    if head != "different":  # a head saved beside (or instead of) its tied embedding is that embedding
        ids = torch.randint(0, VOCAB, (1, 8))
        for read in readers:
            with torch.no_grad():
                torch.testing.assert_close(read()(ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)
        return
    says = "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
    for read in readers:
        with pytest.raises(
            HFCheckpointError, match=f'^{says}.* — .*{path}.* — set "tie_word_embeddings": false in config.json'
        ):
            read()


@pytest.mark.parametrize("change", ["no head", "unknown tensor"])
def test_a_folder_missing_its_head_or_holding_other_tensors_is_one_line(tmp_path: Path, change: str) -> None:
    """Said as every refusal is said: "The HF checkpoint has no lm_head.weight ... is false. — ..." had a capital and a
    full stop before its " — "."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_hf(tmp_path / "hf", tie=False)
    state = load_file(path / "model.safetensors")
    if change == "no head":
        del state["lm_head.weight"]
    else:
        state["vision_tower.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    says = {
        "no head": r"the HF checkpoint has no lm_head\.weight but tie_word_embeddings is false — .* — copy the model",
        "unknown tensor": r"unexpected tensors in the HF checkpoint: \['vision_tower\.weight'\] — .* — use a",
    }[change]
    with pytest.raises(HFCheckpointError, match="^" + says):
        ours_from_hf(path)


def test_import_pads_vocab_rows(tmp_path: Path) -> None:
    path = save_tiny_hf(tmp_path / "hf", vocab_size=500)
    model = ours_from_hf(path, padded_vocab_size=512)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape[-1] == 512
    torch.testing.assert_close(ours[..., :500], hf_logits(path, ids), atol=1e-5, rtol=1e-5)


def test_import_reads_pytorch_bin(tmp_path: Path) -> None:
    path = save_tiny_hf(tmp_path / "hf")
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours_from_hf(path)(ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)


def test_import_reads_a_base_llama_model_save_with_tied_embeddings(tmp_path: Path) -> None:
    """A ``LlamaModel`` (no LM head) saves its names without "model.": with tied embeddings transformers runs it as a
    causal LM; we refused every tensor as unexpected."""
    torch.manual_seed(0)
    transformers.LlamaModel(tiny_hf_config(tie=True)).save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "hf").model(ids), hf_logits(tmp_path / "hf", ids))
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**state, "model.norm.weight": state["norm.weight"] + 1}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="^the weights hold norm.weight twice, with and without"):
        load_model(tmp_path / "hf")
    head = torch.randn_like(state["embed_tokens.weight"])
    save_file({**state, "lm_head.weight": head}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="^tie_word_embeddings is true but lm_head.weight differs"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("content", ["nested", "scalar", "tensor"])
def test_import_refuses_a_pytorch_bin_that_holds_no_state_dict(tmp_path: Path, content: str) -> None:
    """A pytorch_model.bin holding a training checkpoint's nesting, a step count or one tensor ended in an
    AttributeError traceback."""
    path = save_tiny_hf(tmp_path / "hf")
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    held = {"nested": {"state_dict": state}, "scalar": {**state, "model.step": 3}, "tensor": torch.zeros(3)}[content]
    torch.save(held, path / "pytorch_model.bin")
    says = rf"^pytorch_model.bin holds no state dict of tensors \(.*\) — {path / 'pytorch_model.bin'} — "
    for read in (lambda: load_model(path), lambda: load_hf_state(path, config_from_hf(path))):
        with pytest.raises(HFCheckpointError, match=says):
            read()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        # these ran as plain weights: a quantization transformers applies on load was ignored
        ({"quantization_config": {"quant_method": "fp8"}}, r"^quantized checkpoints \(quantization_config: fp8\)"),
        # were "n_head=4 must be divisible by n_kv_head=3 — model.config — set n_kv_head": no such flag was given
        (
            {"num_key_value_heads": 3},
            r"^its config.json makes no valid model: n_head=4 must be divisible by n_kv_head=3",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "RoPE scaling 'yarn'.* only llama3 and linear"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, "RoPE scaling takes numbers, got factor '4'"),
        ({"head_dim": 32}, "head_dim"),
        # a string was 'unsupported operand type(s) for //' or a head_dim mismatch: the field's type is named
        (
            {"hidden_size": "64"},
            r"^its config.json's hidden_size must be a whole number, not str, got '64' .*: 64, not",
        ),
        ({"num_attention_heads": 4.0}, "num_attention_heads must be a whole number, not float, got 4.0"),
        ({"head_dim": "16"}, "head_dim must be a whole number, not str, got '16'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive whole number, got 0"),
        ({"vocab_size": True}, "vocab_size must be a whole number, not bool, got True"),
        # these ended in a TypeError, ValueError or AttributeError traceback
        ({"rms_norm_eps": None}, r"^its config.json's rms_norm_eps must be a number, got None"),
        ({"rms_norm_eps": float("nan")}, r"^its config.json makes no valid model: .*got \{'norm_eps': nan\}"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "rope_theta must be a number, got 'x'"),
        ({"rope_parameters": "linear"}, r"^its config.json's rope_parameters must be an object \{...\}, got 'linear'"),
        # a string counted as true (transformers 5 refuses it; 4.x ties, as we did, a "false")
        ({"tie_word_embeddings": "false"}, r"^its config.json's tie_word_embeddings must be true or false, got 'f"),
        ({"attention_bias": 0}, 'attention_bias must be true or false, got 0 .*"attention_bias": false, not'),
    ],
)
def test_import_refuses_unsupported_configs(tmp_path: Path, overrides: dict, message: str) -> None:
    path = save_tiny_hf(tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    if "rope_scaling" in overrides:  # transformers 5 spells it rope_parameters
        config["rope_parameters"] = {**config.get("rope_parameters", {}), **overrides.pop("rope_scaling")}
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=message) as refused:
        config_from_hf(path)
    assert ". — " not in str(refused.value)  # one line: what — where — what to do, as every refusal reads


def test_import_takes_swish_for_silu(tmp_path: Path) -> None:
    """transformers' "swish" is its "silu" (one activation, two names): such a LLaMA was refused."""
    path = save_tiny_hf(tmp_path / "hf", hidden_act="swish")
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours_from_hf(path)(ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)


def test_config_from_hf_given_the_config_file_names_its_folder(tmp_path: Path) -> None:
    """``config_from_hf("model/config.json")`` said "HF model directory does not exist" of a file that exists."""
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(HFCheckpointError, match=f"^a file, not an HF model directory — {file} — give the folder: "):
        config_from_hf(file)


def test_rope_scaling_takes_numpy_numbers_as_python_ones() -> None:
    """A numpy factor (a sweep's) was refused as 'not a number'; kept, it would make checkpoints weights_only can't
    read."""
    import numpy as np

    from epas_lightning.model.config import RopeScaling

    scaling = RopeScaling("llama3", np.float32(8), np.float64(1), 4.0, np.int64(16))
    assert [type(v) for v in scaling.to_dict().values()] == [str, float, float, float, int]


def test_rope_scaling_is_read_or_refused_in_either_field_with_what_to_do() -> None:
    """A config carrying both fields (rope_parameters 'default' beside a 4.x rope_scaling) was accepted silently, and
    the refusal said nothing of what to do."""
    from epas_lightning.hf.convert import rope_of
    from epas_lightning.model.config import RopeScaling

    both = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"type": "dynamic"}}
    with pytest.raises(
        HFCheckpointError, match=r"'dynamic' \(rope_scaling\) is not supported.* — use a LLaMA checkpoint"
    ):
        rope_of(both)
    assert rope_of({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}) == (5e5, None)
    both["rope_scaling"] = {"type": "linear", "factor": 4.0}  # 4.x's legacy spelling (LongChat, Vicuna-16k)
    assert rope_of(both) == (1e4, RopeScaling("linear", 4.0))
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf = {"rope_parameters": llama3, "max_position_embeddings": 4096}  # transformers' default original length
    assert rope_of(hf) == (1e4, RopeScaling("llama3", 8.0, 1.0, 4.0, 4096))
    with pytest.raises(HFCheckpointError, match=r"^rope_parameters \{.*\}: llama3 RoPE scaling needs high_freq_factor"):
        rope_of({"rope_parameters": {**llama3, "high_freq_factor": None}})


@pytest.mark.parametrize(
    "fields",
    [
        {
            "rope_parameters": {**LLAMA3_TINY, "rope_theta": 500.0},
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
            "rope_scaling": {"type": "linear", "factor": 2},
        },
        {"rope_parameters": {**LLAMA3_TINY, "rope_theta": 500.0}, "rope_scaling": {"rope_type": "default"}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rope_theta": 7.0},
        {"rope_scaling": {**LLAMA3_TINY, "rope_theta": 9.0}, "rope_theta": 7.0},
    ],
    ids=["scaling-type", "scaling-theta", "scaling-default", "parameters-theta", "scaling-own-theta"],
)
def test_rope_is_read_from_the_field_transformers_reads(tmp_path: Path, fields: dict) -> None:
    """A config.json carrying both rope_parameters and rope_scaling: transformers reads rope_scaling (its rope_theta,
    else the top-level one), we read rope_parameters first and ran other positions, silently."""
    from epas_lightning.hf.convert import rope_of

    if not TRANSFORMERS_5:
        pytest.skip("transformers 4.x has no rope_parameters (it reads rope_scaling and the top-level rope_theta)")
    record = {**json.loads(tiny_hf_config().to_json_string()), **fields}
    if "rope_theta" not in fields:
        record.pop("rope_theta", None)
    (tmp_path / "config.json").write_text(json.dumps(record))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    theta, scaling = rope_of(record)
    assert theta == theirs["rope_theta"]
    expected = {k: v for k, v in theirs.items() if k not in ("rope_theta", "type")}
    assert (scaling.to_dict() if scaling else {"rope_type": "default"}) == expected


def test_import_errors_name_the_problem(tmp_path: Path) -> None:
    path = save_tiny_hf(tmp_path / "hf")
    with pytest.raises(HFCheckpointError, match="n_layer: model 3 vs"):
        load_hf_state(path, config_from_hf(path, n_layer=3))
    (path / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no weights"):
        load_hf_state(path, config_from_hf(path))
    with pytest.raises(HFCheckpointError, match="does not exist"):
        config_from_hf(tmp_path / "nowhere")


def test_import_refuses_an_unreadable_shard_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A cut or hand-edited model.safetensors.index.json ended every command in a JSONDecodeError traceback."""
    path = save_tiny_hf(tmp_path / "hf", sharded=True)
    index, _ = path / "model.safetensors.index.json", capsys.readouterr()
    shard = "model-00001-of-00006.safetensors"
    weight_maps = [{"model.norm.weight": name} for name in (1, None, "/etc/passwd", "../hf/" + shard)]
    # a shard named by no string was a TypeError traceback; one outside the folder was read
    for text in ("{not json", f'{{"weight_map": ["{shard}"]}}', *(json.dumps({"weight_map": m}) for m in weight_maps)):
        index.write_text(text)
        assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unreadable shard index") and str(index) in err and err.count("\n") == 1, err


def test_import_refuses_a_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    """A shard holding a second model.norm.weight (a stale one): transformers takes the shard the index names, fit's
    init_from and every --checkpoint took the first shard's, silently; it is refused in one line."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_hf(tmp_path / "hf", sharded=True)
    index = path / "model.safetensors.index.json"
    home = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    first = path / "model-00001-of-00006.safetensors"
    assert home != first.name
    state = load_file(first)
    save_file({**state, "model.norm.weight": torch.zeros(64)}, first, metadata={"format": "pt"})
    says = rf"^model.norm.weight is stored in two shards, {first.name} and {home} \(.* — {index} — copy the model"
    for read in (lambda: load_model(path), lambda: load_hf_state(path, config_from_hf(path))):
        with pytest.raises(HFCheckpointError, match=says):
            read()


@pytest.mark.parametrize("rows", [500, 520])
def test_import_refuses_vocabulary_rows_the_config_does_not_count(tmp_path: Path, rows: int) -> None:
    """Embedding rows other than config.json's vocab_size (a resized vocabulary, config not updated): transformers
    refuses to load it; we padded with zero rows or dropped rows, and export wrote a folder transformers then loaded."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_hf(tmp_path / "hf")
    state = load_file(path / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = resize_rows(state[key], rows)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    says = rf"model.embed_tokens.weight has {rows} rows but config.json says vocab_size 512 — (path )?{path} — "
    with pytest.raises(HFCheckpointError, match=says):
        load_model(path)
    with pytest.raises(HFCheckpointError, match=says):
        load_hf_state(path, _module_config())


def test_a_folder_whose_weights_are_not_its_config_says_what_disagrees(tmp_path: Path) -> None:
    """A third-party folder whose config.json describes other shapes than its weights was told to "pass the checkpoint
    as fit or consolidate wrote it" (and model.init_from gave no advice): the tensors and shapes are named as the
    folder names them, with config.json as what disagrees."""
    from epas_lightning.init_from import load_initial_weights

    path = save_tiny_hf(tmp_path / "hf")
    record = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**record, "intermediate_size": 96}))
    says = (
        r"^its config.json and weights disagree \(other shape: model.layers.0.mlp.gate_proj.weight \[128, 64\] where "
        r"config.json makes \[96, 64\], .*\) — {}{} — make config.json describe the weights"
    )
    with pytest.raises(HFCheckpointError, match=says.format("path ", path)):  # load_model's argument
        load_model(path)
    model = Llama(config_from_hf(path))
    with pytest.raises(HFCheckpointError, match=says.format("model.init_from ", path)):
        load_initial_weights(model, path)


class _FirstBatchWeights(Callback):
    """Records the model's weights when the first training batch starts (after init_from, before any update)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if not hasattr(self, "state"):
            self.state = self.full(pl_module)

    @staticmethod
    def full(module: EPASModule) -> dict[str, torch.Tensor]:
        """A copy of the model's weights, FSDP2's DTensors gathered."""
        return {k: getattr(v, "full_tensor", v.detach)().clone() for k, v in module.model.state_dict().items()}


def _module_config() -> LlamaConfig:
    """Our config for the tiny HF model, trained at a shorter sequence length."""
    return LlamaConfig(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_kv_head=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        block_size=32,
        rope_theta=50000.0,
        norm_eps=1e-6,
    )


@pytest.mark.parametrize("kind", ["Llama", "Qwen2"])
def test_fit_init_from_hf_starts_at_hf_weights(tmp_path: Path, tiny_corpus: Path, caplog, kind: str) -> None:
    from epas_lightning import TokenDataModule

    path = save_tiny_hf(tmp_path / "hf", sharded=True, kind=kind)
    config = replace(_module_config(), attention_bias="qkv" if kind == "Qwen2" else None)
    expected = load_hf_state(path, config)
    module = EPASModule(config, init_from=str(path))
    probe = _FirstBatchWeights()
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[probe])
    with caplog.at_level("INFO"):
        trainer.fit(module, TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB))
    for key, tensor in expected.items():
        torch.testing.assert_close(probe.state[key], tensor, msg=key)
    assert f"init_from: the weights start from {path}" in caplog.text  # the user sees that it happened


def test_fit_init_from_refuses_data_of_another_tokenizer(tmp_path: Path, tiny_corpus: Path) -> None:
    """Continual pretraining on data tokenized with another vocabulary than the init_from model's trained its
    weights on ids that stand for other tokens, without a word (evaluate already refused such data)."""
    from epas_lightning import TokenDataModule
    from epas_lightning.errors import DataError

    path = save_tiny_hf(tmp_path / "hf")
    tokenizer = json.loads((tiny_corpus / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another vocabulary
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))

    def fit(root: Path) -> None:
        data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)
        cpu_trainer(root, max_steps=1).fit(EPASModule(_module_config(), init_from=str(path)), data)

    says = rf"another tokenizer .* than the model's \({path / 'tokenizer.json'}\).* — data.data_dir {tiny_corpus}"
    with pytest.raises(DataError, match=says + r" — prepare the data with --tokenizer"):
        fit(tmp_path / "a")
    (path / "tokenizer.json").write_bytes((tiny_corpus / "tokenizer.json").read_bytes())
    fit(tmp_path / "b")  # the model's own tokenizer: trains


def test_fit_init_from_a_folder_without_tokenizer_says_the_data_is_unchecked(
    tmp_path: Path, tiny_corpus: Path, recwarn
) -> None:
    """An HF folder with no tokenizer file (only config.json and the weights copied) trained on data of any
    vocabulary that fit the embedding, without a word: nothing said the data's ids were not checked against the
    weights'. The run says so in one line, naming where the tokenizer would be, and still trains."""
    from epas_lightning import TokenDataModule

    path = save_tiny_hf(tmp_path / "hf")
    assert not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists()
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)
    cpu_trainer(tmp_path, max_steps=1).fit(EPASModule(_module_config(), init_from=str(path)), data)
    warned = [str(w.message) for w in recwarn if "holds no tokenizer" in str(w.message)]
    assert len(warned) == 1 and f"model.init_from {path} holds no tokenizer" in warned[0], warned
    assert str(tiny_corpus / "tokenizer.json") in warned[0]  # the file the data was tokenized with


def test_fit_init_from_a_consolidated_folder_that_records_only_its_tokenizers_hash_compares_it(
    tmp_path: Path, tiny_corpus: Path, recwarn
) -> None:
    """A consolidated folder whose tokenizer was gone when it was consolidated records the file's hash only: it was
    warned of as an HF folder that "holds no tokenizer", and data of another tokenizer trained. The data's tokenizer
    is compared with that hash: another file is refused before the first step, the same one trains without a word."""
    from epas_lightning import TokenDataModule
    from epas_lightning.data.tokenizer import tokenizer_sha256
    from epas_lightning.errors import DataError

    def fit(root: Path, sha256: str) -> None:
        path = save_consolidated(Llama(_module_config()), root / "consolidated")
        record = json.loads((path / "config.json").read_text())
        record["tokenizer"] = {"sha256": sha256, "bos_id": 1, "eos_id": 2}  # as consolidate records a gone tokenizer
        (path / "config.json").write_text(json.dumps(record))
        data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)
        cpu_trainer(root, max_steps=1).fit(EPASModule(_module_config(), init_from=str(path)), data)

    says = rf"^prepared with another tokenizer \({tiny_corpus / 'tokenizer.json'}\) than the one the weights of "
    with pytest.raises(DataError, match=says + rf".* — data.data_dir {tiny_corpus} — "):
        fit(tmp_path / "a", "0" * 64)
    assert not list((tmp_path / "a").rglob("*.ckpt"))
    fit(tmp_path / "b", tokenizer_sha256(tiny_corpus / "tokenizer.json"))
    assert not [w for w in recwarn if "holds no tokenizer" in str(w.message)]


def test_fit_init_from_a_smaller_vocabulary_than_the_data_asks_for_the_models_tokenizer(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    """Data whose tokenizer has more ids than the init_from model's rows was refused with "set
    model.config.vocab_size to at least 512": a fit from init_from that set it was refused in turn (model.config
    must match the source). The refusal asks for data of the model's own tokenizer."""
    from epas_lightning import TokenDataModule
    from epas_lightning.errors import DataError

    path = save_tiny_hf(tmp_path / "hf", vocab_size=256)
    config = replace(_module_config(), vocab_size=256, padded_vocab_size=None)
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=256)
    fix = rf"prepare the data with the tokenizer of model.init_from {path} \(at most 256 ids\)$"
    with pytest.raises(DataError, match=rf"has {VOCAB} tokens but the model's vocab_size is 256 — .* — {fix}"):
        cpu_trainer(tmp_path, max_steps=1).fit(EPASModule(config, init_from=str(path)), data)


def test_init_from_an_hf_folder_with_a_damaged_config_asks_to_copy_it_again(tmp_path: Path) -> None:
    """An HF folder's config.json cut short reads as a consolidated folder (config.json + model.safetensors): the
    refusal said only "consolidate again", a command that never wrote it."""
    from epas_lightning.init_from import check_init_source

    path = save_tiny_hf(tmp_path / "hf")
    (path / "config.json").write_text((path / "config.json").read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"^unreadable config.json .* — model.init_from {path} — .*copy the"):
        check_init_source(path, _module_config())


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors.index.json"])
def test_an_hf_folder_of_other_weight_files_with_a_damaged_config_asks_to_copy_it_again(
    tmp_path: Path, capsys, weights: str
) -> None:
    """Its config.json cut short, an HF folder of pytorch_model.bin or sharded safetensors is no consolidated folder
    either: it was "not a checkpoint" (inspect: "no checkpoints in this folder"), though its config.json was damaged."""
    from epas_lightning.init_from import check_init_source

    path = save_tiny_hf(tmp_path / "hf")
    (path / "config.json").write_text((path / "config.json").read_text()[:40])
    (path / "model.safetensors").rename(path / weights)
    capsys.readouterr()  # the writer's progress bar
    with pytest.raises(CheckpointError, match=rf"^unreadable config.json .* — model.init_from {path} — copy the"):
        check_init_source(path, _module_config())
    for command in (["inspect"], ["generate", "--prompt", "hi"]):
        assert main([*command, "--checkpoint", str(path)]) == 2
        assert capsys.readouterr().err.startswith("error: unreadable config.json (")


def test_validate_and_test_start_from_init_from(tmp_path: Path, tiny_corpus: Path) -> None:
    """`validate`/`test` without --ckpt_path score the init_from weights (the baseline of a continual run), once."""
    from epas_lightning import TokenDataModule

    path = save_tiny_hf(tmp_path / "hf")
    expected = load_hf_state(path, _module_config())
    module = EPASModule(_module_config(), init_from=str(path))
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=1, limit_test_batches=1)
    trainer.validate(module, data, verbose=False)
    for key, tensor in expected.items():
        torch.testing.assert_close(module.model.state_dict()[key], tensor, msg=key)
    with torch.no_grad():
        module.model.norm.weight.fill_(2.0)  # weights changed since: a second stage must not reload init_from
    trainer.test(module, data, verbose=False)
    assert bool((module.model.norm.weight == 2.0).all())


def test_init_from_checks_before_training(tmp_path: Path) -> None:
    path = save_tiny_hf(tmp_path / "hf")
    gone = EPASModule(_module_config(), init_from=str(tmp_path / "missing"))  # a resume does not need it
    with pytest.raises(CheckpointError, match="does not exist — model.init_from"):
        gone.check_init_from()  # a fit that starts from it: test_a_resume_from_python_does_not_need_init_from_any_more
    wide = LlamaConfig(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, block_size=32, rope_theta=50000.0)
    with pytest.raises(HFCheckpointError, match="n_embd: model 128"):
        EPASModule(wide, init_from=str(path))
    # more vocabulary than the HF model: the extra rows would be zeros inside the softmax (a worse loss from step 0)
    with pytest.raises(HFCheckpointError, match="vocab_size: model 32000 vs init_from"):
        EPASModule(replace(_module_config(), vocab_size=32000, padded_vocab_size=None), init_from=str(path))
    # a Llama 3.x folder: a model.config without its RoPE scaling would train other positions
    llama3 = save_tiny_hf(tmp_path / "llama3", max_position_embeddings=128, rope_scaling=dict(LLAMA3_TINY))
    with pytest.raises(HFCheckpointError, match=r"rope_scaling: model None vs init_from .*\{'rope_type': 'llama3'"):
        EPASModule(_module_config(), init_from=str(llama3))
    # a Qwen2 (q/k/v biases): a model.config without them would drop them
    qwen2 = save_tiny_hf(tmp_path / "qwen2", kind="Qwen2")
    with pytest.raises(HFCheckpointError, match="attention_bias: model None vs init_from .* 'qkv'"):
        EPASModule(_module_config(), init_from=str(qwen2))
    # a config we cannot run: the one-line error names the folder (it named nothing)
    biased = save_tiny_hf(tmp_path / "biased", mlp_bias=True)
    says = (
        f"^mlp_bias=true is not supported: our MLP has no biases — model.init_from {biased}"
        " — use a LLaMA checkpoint without MLP biases$"
    )
    with pytest.raises(HFCheckpointError, match=says):
        EPASModule(_module_config(), init_from=str(biased))


def _broken_init_source(root: Path, case: str) -> tuple[Path, str]:
    """A tiny HF folder (sharded for the shard cases), or our consolidated folder (``ours``), broken in ``root`` as
    ``case`` says; what the error says."""
    from safetensors.torch import load_file, save_file

    if case == "ours: missing key":
        path = save_consolidated(Llama(_module_config()), root / "ours")
        state = load_file(path / "model.safetensors")
        del state["norm.weight"]
        save_file(state, path / "model.safetensors")
        return path, "the weights do not fit the model config it records (missing: norm.weight)"
    path = save_tiny_hf(root / "hf", sharded=case in ("missing shard", "index names another file"))
    index = path / "model.safetensors.index.json"
    if case == "missing shard":
        (path / json.loads(index.read_text())["weight_map"]["model.norm.weight"]).unlink()
        return path, "shard listed in model.safetensors.index.json is missing"
    if case == "index names another file":
        record = json.loads(index.read_text())
        record["weight_map"]["model.norm.weight"] = "model-elsewhere.safetensors"
        index.write_text(json.dumps(record))
        return path, "shard listed in model.safetensors.index.json is missing"
    file = path / "model.safetensors"
    if case in ("truncated", "garbage header"):
        file.write_bytes(file.read_bytes()[:100] if case == "truncated" else b"\xff" * 64)
        return path, str(file)
    state = load_file(file)
    if case == "extra key":
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(4)
    elif case == "missing key":
        del state["model.norm.weight"]
    else:  # wrong shape
        state["model.norm.weight"] = torch.ones(32)
    save_file(state, file, metadata={"format": "pt"})
    says = {"extra key": "unexpected: model.layers.0.mlp.extra.weight", "missing key": "missing: model.norm.weight"}
    return path, says.get(case, "other shape: model.norm.weight [32]")


@pytest.mark.parametrize(
    "case",
    [
        "missing shard",
        "index names another file",
        "truncated",
        "garbage header",
        "extra key",
        "missing key",
        "shape",
        "ours: missing key",
    ],
)
def test_fit_refuses_broken_init_from_weights_before_preparing_data(tmp_path: Path, monkeypatch, capsys, case) -> None:
    """Weights that cannot load into the model (a shard gone, a key too many or too few, another shape, a cut or
    garbage header) were refused only when training started, after the data was prepared (the built-in corpus's
    first preparation, a reused one's line): they are one line before any data is touched, read from the headers."""
    from epas_lightning import TokenDataModule

    def prepared(self) -> None:  # noqa: ANN001
        raise AssertionError("data prepared before the weights were checked")

    monkeypatch.setattr(TokenDataModule, "prepare_data", prepared)
    path, says = _broken_init_source(tmp_path, case)
    capsys.readouterr()
    assert main(_fit_args(path, "null", tmp_path / "run", "--model.config.block_size", "32")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_init_from_refuses_hf_weights_holding_nan(tmp_path: Path, dtype: torch.dtype) -> None:
    """An fp8 tensor in a folder that names no quantization (transformers casts it as plain values, as we do) ended
    the NaN check in a NotImplementedError traceback (isfinite has no fp8 kernel)."""
    from safetensors.torch import load_file, save_file

    from epas_lightning.init_from import read_init_state

    path = save_tiny_hf(tmp_path / "hf")
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    read = read_init_state(path, config_from_hf(path))["norm.weight"]
    torch.testing.assert_close(read.float(), state["model.norm.weight"].float())
    state["model.norm.weight"][0] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"NaN or inf \(norm.weight\) — model.init_from"):
        read_init_state(path, _module_config())


def test_a_continual_run_at_a_shorter_block_keeps_the_models_context(tmp_path: Path, tiny_corpus: Path) -> None:
    """init_from an HF model of 64 positions, trained (and resumed) at block 32: the export said
    max_position_embeddings 32 and generate refused longer prompts; the run keeps the 64 positions the model had."""
    from epas_lightning import TokenDataModule
    from epas_lightning.checkpoint import load_model
    from epas_lightning.hf.export import export
    from epas_lightning.inference import generate

    def data() -> TokenDataModule:
        return TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)

    source = save_tiny_hf(tmp_path / "hf")  # max_position_embeddings 64
    trainer = cpu_trainer(tmp_path / "a", max_steps=1)
    trainer.fit(EPASModule(_module_config(), init_from=str(source)), data())
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    trainer = cpu_trainer(tmp_path / "b", max_steps=2)  # a resume does not read init_from again
    trainer.fit(EPASModule(_module_config()), data(), ckpt_path=tmp_path / "first.ckpt")
    trainer.save_checkpoint(tmp_path / "resumed.ckpt")

    out = export(tmp_path / "resumed.ckpt", tmp_path / "export")
    theirs, ours = (json.loads((folder / "config.json").read_text()) for folder in (source, out))
    for key in ("max_position_embeddings", "rms_norm_eps", "hidden_size", "num_key_value_heads"):
        assert ours[key] == theirs[key], key

    def rope_theta(record: dict) -> float:  # transformers 5 writes rope_parameters, 4.57 rope_theta
        return record.get("rope_parameters", {}).get("rope_theta", record.get("rope_theta"))

    assert rope_theta(ours) == rope_theta(theirs) is not None
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
    model = load_model(tmp_path / "resumed.ckpt").model
    assert model.config.block_size == 32
    assert len(generate(model, [list(range(3, 43))], 8).tokens[0]) == 8  # a 40-token prompt


def test_every_checkpoint_flag_reads_a_hugging_face_folder(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    """The dense model a continual run starts from is an HF folder, and the guide says to analyze it first: it loads
    through load_model (so analyze, generate, bench, evaluate, ... take it) as a dense model, its logits HF's, with
    the tokenizer and BOS/EOS ids the folder holds."""
    path = save_tiny_hf(tmp_path / "hf")
    (path / "tokenizer.json").write_bytes((tiny_corpus / "tokenizer.json").read_bytes())
    loaded = load_model(path)
    assert loaded.region.size == 0 and loaded.tokenizer_path == path / "tokenizer.json"
    assert (loaded.bos_id, loaded.eos_id, loaded.data_dir) == (1, 2, None)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf_logits(path, ids), atol=1e-5, rtol=1e-5)
    out = tmp_path / "analysis"
    argv = ["--checkpoint", str(path), "--data", str(tiny_corpus), "--output", str(out), "--batches", "1"]
    assert main(["analyze", *argv, "--batch-size", "1", "--seq-len", "16"]) == 0
    assert json.loads((out / "similarity.json").read_text())["trained_region"]["layers"] == []
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "2"]) == 0
    assert "trained region: dense" in capsys.readouterr().err
    # the baseline of a continual run at its block_size, not the folder's whole context (Llama 3.2: 131072 tokens)
    argv = ["--checkpoint", str(path), "--data", str(tiny_corpus), "--batches", "1", "--batch-size", "2", "--json"]
    assert main(["evaluate", *argv, "--seq-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])[0]["val_tokens"] == 2 * 16
    argv += ["--output", str(tmp_path / "bench"), "--reps", "1", "--prompt-len", "4", "--max-new-tokens", "2"]
    assert main(["bench", *argv, "--seq-len", "16"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["seq_len"], summary["val_tokens"]) == (16, 2 * 16)


# ---------------------------------------------------------------- export


def save_ours(
    path: Path, tokenizer: Path | None = None, n_layer: int = 4, shared: int = 0, tie: bool = False, **fields
) -> Llama:
    """A random model of ours written as a `consolidate` directory (what `export` reads), region ``shared`` deep."""
    torch.manual_seed(1)
    config = LlamaConfig(
        **{
            **dict(n_layer=n_layer, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=VOCAB),
            **dict(block_size=64, rope_theta=50000.0, norm_eps=1e-6, tie_embeddings=tie),
            **fields,
        }
    )
    model = Llama(config)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so a missed one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.set_shared_layers(range(n_layer - shared, n_layer))
    save_consolidated(model, path, tokenizer)
    return model.eval()


def greedy_by_full_forwards(model: Llama, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(ids)[:, -1, : model.config.vocab_size]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("tie", [False, True])
def test_export_dense_loads_in_stock_transformers(tmp_path: Path, tiny_corpus: Path, tie: bool) -> None:
    from epas_lightning.hf.export import export

    ours = save_ours(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", tie=tie, padded_vocab_size=576)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    assert not (out / "modeling_epas_llama.py").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[..., :VOCAB], atol=1e-5, rtol=1e-5)  # padded rows dropped
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from epas_lightning.data import load_tokenizer

    text, ours_tokenizer = "def f(x):\n    return x + 1\n", load_tokenizer(out / "tokenizer.json")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours_tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == [ours_tokenizer.bos_id, *ours_tokenizer.encode(text)]  # BOS first
    # and back: the export imports as the same model
    back = ours_from_hf(out, padded_vocab_size=576)
    torch.testing.assert_close(back(ids)[..., :VOCAB], ours(ids)[..., :VOCAB])


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_export_sharing_remote_code_logits_and_generate(tmp_path: Path, mode: str) -> None:
    from epas_lightning.hf.export import export

    ours = save_ours(tmp_path / "ckpt", n_layer=4, shared=2, sharing_mode=mode)
    out = export(tmp_path / "ckpt", tmp_path / "hf")  # no tokenizer recorded: weights + config only
    assert (out / "modeling_epas_llama.py").is_file() and not (out / "tokenizer_config.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert hf.config.epas_shared_layers == [2, 3]
    back = load_model(out)  # every --checkpoint reads the export with its region, in growth order
    assert back.region.layers == (3, 2) and back.model.sharing.shared_layers == [2, 3]
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        logits = hf(ids).logits
        torch.testing.assert_close(logits, ours(ids), atol=1e-5, rtol=1e-5)
        dense = Llama(ours.config)
        dense.load_state_dict(ours.state_dict())
        dense.set_shared_layers([])
        assert (logits - dense(ids)).abs().max() > 1e-3  # the region really changes the function
    prompt = ids[:, :6]
    expected = greedy_by_full_forwards(ours, prompt, 8)
    for use_cache in (True, False):
        generated = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, use_cache=use_cache
        )
        assert torch.equal(generated, expected), use_cache
    # a left-padded batch generates what each prompt alone does
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt[1:, :4]], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    generated = hf.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, 2:], greedy_by_full_forwards(ours, prompt[1:, :4], 5))


def stock_and_remote_at_region_0(tmp_path: Path, **options: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 2-layer checkpoint (trained region 1) exported stock and with its remote code, both loaded with ``options``;
    the remote model at region 0, where it is the stock model."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    stock_folder = export(tmp_path / "ckpt", tmp_path / "stock", 0)
    stock = transformers.AutoModelForCausalLM.from_pretrained(stock_folder, **options)
    remote = export(tmp_path / "ckpt", tmp_path / "remote")
    ours = transformers.AutoModelForCausalLM.from_pretrained(
        remote, trust_remote_code=True, epas_shared_layers=[], **options
    )
    return stock, ours


def test_the_remote_code_returns_hidden_states_as_the_stock_llama_does(tmp_path: Path) -> None:
    """``output_hidden_states=True`` (a probe, an embedding extractor, ``generate(output_hidden_states=True)``) gave
    ``None`` from the trust_remote_code export: the stock model's tuple (embeddings, each layer's output, the last
    one normed) is what it returns now, equal to the stock export's at region 0, the last entry the head's input."""
    stock, ours = stock_and_remote_at_region_0(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = stock.eval()(ids, output_hidden_states=True).hidden_states
        dense = ours.eval()(ids, output_hidden_states=True).hidden_states
        assert dense is not None and len(dense) == len(expected) == 3
        for got, want in zip(dense, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ours.set_region(1)
        shared = ours(ids, output_hidden_states=True)
        torch.testing.assert_close(ours.lm_head(shared.hidden_states[-1]), shared.logits)
        assert ours(ids).hidden_states is None  # not asked for: none kept


@pytest.mark.parametrize("selection", [[0, -1], 1, -2])
def test_the_remote_code_selects_hidden_states_as_the_stock_llama_does(tmp_path: Path, selection: object) -> None:
    """``output_hidden_states`` may name the layers to keep (transformers 5.24 on: the others are None; before, any
    such value asks for all): the remote code gave every layer's; it gives the stock model's selection now."""
    stock, ours = stock_and_remote_at_region_0(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        expected = stock.eval()(ids, output_hidden_states=selection).hidden_states
        got = ours.eval()(ids, output_hidden_states=selection).hidden_states
    assert [x is None for x in got] == [x is None for x in expected]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_remote_code_returns_attention_maps_as_the_stock_llama_does(tmp_path: Path) -> None:
    """``output_attentions=True`` gave ``None`` from the trust_remote_code export; it gives each layer's attention
    weights, equal to the stock export's (eager attention) at region 0; a sharing layer's (qk) are its source's."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="eager")
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = stock.eval()(ids, attention_mask=mask, output_attentions=True).attentions
        dense = ours.eval()(ids, attention_mask=mask, output_attentions=True)
        assert dense.attentions is not None and len(dense.attentions) == len(expected) == 2
        for got, want in zip(dense.attentions, expected, strict=True):
            torch.testing.assert_close(got[:, :, 3:], want[:, :, 3:], atol=1e-5, rtol=1e-5)  # padded rows aside
        logits = stock(ids, attention_mask=mask).logits
        torch.testing.assert_close(dense.logits[:, 3:], logits[:, 3:], atol=1e-5, rtol=1e-5)
        ours.set_region(1)
        shared = ours(ids, output_attentions=True).attentions
        torch.testing.assert_close(shared[1], shared[0])


def test_the_remote_code_attention_maps_with_a_static_cache_are_the_stock_ones(tmp_path: Path) -> None:
    """``generate(cache_implementation="static", output_attentions=True)``: the first step computed its weights as if
    each query came after the cache's empty slots, so it attended to their zero keys and its scores and tokens differed
    from the stock model's; they match it now (eager attention, region 0), the weights over every slot as stock's."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 6))
    options = dict(max_new_tokens=3, do_sample=False, output_attentions=True, output_scores=True)
    options.update(attention_mask=torch.ones_like(ids), cache_implementation="static", return_dict_in_generate=True)
    expected, got = stock.eval().generate(ids, **options), ours.eval().generate(ids, **options)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.attentions, expected.attentions, atol=1e-5, rtol=1e-5)


def test_the_remote_code_generates_compiled_with_a_static_cache(tmp_path: Path) -> None:
    """``generate(cache_implementation="static")`` compiles the forward in one graph where it can (a GPU; here asked
    for on the CPU): the same tokens as without compiling. The cache's length is a tensor there, so no shape may
    depend on it."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True
    )
    compile_config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # newer transformers: compile off the GPU too
    ids = torch.randint(3, VOCAB, (2, 6))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    expected = hf.eval().generate(ids, **options)
    generated = hf.generate(ids, cache_implementation="static", compile_config=compile_config, **options)
    assert torch.equal(generated, expected)


class _PositionedCache(transformers.DynamicCache):
    """Stores each new K/V at the ``cache_position`` it is handed (from slot 0 when none is), as transformers 4.57's
    ``StaticCache`` does, and returns the slots up to the last one written."""

    def __init__(self) -> None:
        super().__init__()
        self.slots, self.filled = {}, 0

    def update(self, key, value, layer_idx, cache_kwargs=None, *args, **kwargs):  # noqa: ANN001, ANN201
        position = (cache_kwargs or {}).get("cache_position")
        position = torch.arange(key.shape[-2]) if position is None else position
        keys, values = self.slots.setdefault(layer_idx, (torch.zeros(*key.shape[:2], 64, key.shape[-1]),) * 2)
        keys, values = keys.index_copy(2, position, key), values.index_copy(2, position, value)
        self.slots[layer_idx] = keys, values
        self.filled = int(position[-1]) + 1
        return keys[:, :, : self.filled], values[:, :, : self.filled]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_mask_sizes(self, new: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """The keys ``update`` returns (transformers 5 passes how many new tokens, 4.57 their positions)."""
        return self.filled + (new if isinstance(new, int) else len(new)), 0


def test_the_remote_code_tells_the_cache_where_new_keys_go(tmp_path: Path) -> None:
    """The remote forward updated the cache without a ``cache_position``: transformers 4.57's ``StaticCache``
    (``generate(cache_implementation="static")``) then wrote every step's K/V over slot 0, and the tokens after the
    first were wrong. A cache that places K/V where it is told now decodes as a full forward does."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True
    )
    ids = torch.randint(3, VOCAB, (2, 8))
    cache = _PositionedCache()
    field = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # 5.24 / before
    with torch.no_grad():
        expected = hf.eval()(ids).logits
        prefill = hf(ids[:, :6], use_cache=True, **{field: cache}).logits
        steps = [hf(ids[:, i : i + 1], use_cache=True, **{field: cache}).logits for i in (6, 7)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-5, rtol=1e-5)


def test_the_remote_code_decodes_into_a_static_cache_it_is_handed(tmp_path: Path) -> None:
    """A ``StaticCache`` handed to the forward (transformers' static-cache recipe: prefill with the tokenizer's mask,
    then a token at a time, with or without the mask) returns keys for all its slots, but the mask was built for the
    tokens so far only: SDPA refused the shapes. The mask spans the cache's slots now: the logits of a full forward."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True
    )
    ids = torch.randint(3, VOCAB, (2, 8))
    cache = transformers.StaticCache(config=hf.config, max_cache_len=16)
    field = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # 5.24 / before
    with torch.no_grad():
        expected = hf.eval()(ids).logits
        prefill = hf(ids[:, :6], attention_mask=torch.ones(2, 6), use_cache=True, **{field: cache}).logits
        step = hf(ids[:, 6:7], attention_mask=torch.ones(2, 7), use_cache=True, **{field: cache}).logits
        last = hf(ids[:, 7:], use_cache=True, **{field: cache}).logits
    torch.testing.assert_close(torch.cat([prefill, step, last], dim=1), expected, atol=1e-5, rtol=1e-5)


def test_the_remote_code_attends_as_plain_causal_when_nothing_is_padded(tmp_path: Path, monkeypatch) -> None:
    """A tokenizer's batch and the HF Trainer hand an attention mask of ones: the remote forward made it a (B, 1, T, T)
    tensor, which keeps SDPA off its flash kernel in every training step. The stock model drops such a mask and asks
    SDPA for plain causal attention; so does the remote one now (a padded batch keeps its mask), same logits."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="sdpa")
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, attn_mask=None, is_causal=False, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        calls.append(attn_mask is None and is_causal)
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, padded = torch.randint(3, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    padded[1, :2] = 0
    for mask, plain in ((torch.ones_like(ids), True), (padded, False)):
        for model in (stock.train(), ours.train()):
            calls.clear()
            model.got = model(ids, attention_mask=mask).logits
            assert calls == [plain] * 2, (type(model).__name__, calls)
        torch.testing.assert_close(ours.got[:, 2:], stock.got[:, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_remote_code_drops_attention_weights_in_training_as_the_stock_llama_does(tmp_path: Path, attn: str) -> None:
    """``attention_dropout`` (set at load, for fine-tuning) was ignored by the remote forward: training ran without it.
    In training it drops the same attention weights as the stock model does from the same seed (region 0); in eval
    none."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attention_dropout=0.5, attn_implementation=attn)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        for model in (stock.train(), ours.train()):
            torch.manual_seed(0)
            model.dropped = model(ids, output_attentions=attn == "eager")
        torch.testing.assert_close(ours.dropped.logits, stock.dropped.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.dropped.attentions, stock.dropped.attentions, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.eval()(ids).logits, stock.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours.dropped.logits - ours(ids).logits).abs().max() > 1e-3  # it did drop some


def test_the_remote_code_returns_tuples_where_the_stock_llama_does(tmp_path: Path) -> None:
    """``return_dict=False`` to the base model (``model.model``, as a tracer or an exporter calls it) still gave an
    output object; it gives the stock model's tuple now, in its order, as the causal LM already did."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 8))
    options = dict(use_cache=True, output_hidden_states=True, output_attentions=True, return_dict=False)
    with torch.no_grad():
        for expected, got in (
            (stock.eval()(ids, **options), ours.eval()(ids, **options)),
            (stock.model(ids, **options), ours.model(ids, **options)),
        ):
            assert type(got) is tuple and [type(x) for x in got] == [type(x) for x in expected]
            torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[2:], expected[2:], atol=1e-5, rtol=1e-5)


def test_the_remote_code_loads_as_a_base_model_as_the_stock_export_does(tmp_path: Path) -> None:
    """``AutoModel.from_pretrained(export, trust_remote_code=True)`` (an embedding extractor, a feature-extraction
    pipeline) refused the trust_remote_code export, which named no base model: it loads the base model now, whose
    hidden states are the causal LM's, and the stock export's at region 0."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    stock = transformers.AutoModel.from_pretrained(export(tmp_path / "ckpt", tmp_path / "stock", 0)).eval()
    remote = export(tmp_path / "ckpt", tmp_path / "remote")
    ours = transformers.AutoModel.from_pretrained(remote, trust_remote_code=True).eval()
    causal = transformers.AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids).last_hidden_state, causal(ids, output_hidden_states=True).hidden_states[-1]
        )
        ours.config.epas_shared_layers = []
        torch.testing.assert_close(ours(ids).last_hidden_state, stock(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_the_remote_code_calls_its_decoder_layers_as_modules(tmp_path: Path) -> None:
    """The remote forward ran each decoder layer's parts itself, never the layer: a hook on a layer (accelerate's
    ``device_map`` moving inputs to the layer's device, FSDP's gather of its weights, a steering or probing hook) never
    ran. The layers are called now: a forward hook sees each call, and the output it returns (the layer's hidden states,
    a tensor as from the stock layer) is the layer's."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True
    )
    ids = torch.randint(3, VOCAB, (2, 8))
    calls = []

    def steer(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls.append(module)
        return output + 1.0

    with torch.no_grad():
        plain = hf.eval()(ids).logits
        handle = hf.model.layers[1].register_forward_hook(steer)
        steered = hf(ids).logits
        handle.remove()
        assert calls == [hf.model.layers[1]] and (steered - plain).abs().max() > 1e-3
        torch.testing.assert_close(hf(ids).logits, plain)
    assert set(hf._no_split_modules) == {type(hf.model.layers[0]).__name__}  # device_map="auto" keeps a layer whole


def hook_views(model: torch.nn.Module, steer: float) -> list[tuple]:
    """What forward hooks on layer 1's attention (pre and post, with kwargs) and on layer 1 see of one forward; the
    attention hook adds ``steer`` to the attention output it returns."""
    seen, layer = [], model.model.layers[1]

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(("attention in", args, kwargs["hidden_states"]))

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        seen.append(("attention out", type(output), *output))
        return (output[0] + steer, output[1])

    handles = [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)]
    handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    handles.append(layer.register_forward_hook(lambda module, args, output: seen.append(("layer out", output))))
    with torch.no_grad():
        seen.append(("logits", model(torch.arange(3, 11).repeat(2, 1)).logits))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hooks_on_the_remote_codes_attention_see_what_they_see_on_the_stock_llama(tmp_path: Path, attn: str) -> None:
    """The remote decoder layer ran its attention's projections itself, never the attention module: hooks on
    ``layers[i].self_attn`` (a probe, a steering vector) never ran, and the layer returned a tuple where the stock one
    returns its hidden states. Now the attention is called as the stock layer calls it (``hidden_states`` by name in,
    ``(attn_output, attn_weights)`` out, the weights None but under eager attention) and the layer returns a tensor:
    at region 0 each hook sees the stock model's values, and a hook's change to the output changes the logits alike."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation=attn)
    for steer in (0.0, 1.0):
        expected, got = hook_views(stock.eval(), steer), hook_views(ours.eval(), steer)
        assert [view[0] for view in got] == [view[0] for view in expected]
        for want, have in zip(expected, got, strict=True):
            assert [type(x) for x in have] == [type(x) for x in want], want[0]
            tensors = [(h, w) for h, w in zip(have[1:], want[1:], strict=True) if isinstance(w, torch.Tensor)]
            for h, w in tensors:
                torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5, msg=want[0])
        assert (attn == "eager") == isinstance(expected[1][3], torch.Tensor)  # the weights


def test_the_remote_code_returns_attention_maps_only_where_the_stock_llama_does(tmp_path: Path) -> None:
    """Under SDPA (the default) ``output_attentions=True`` gave eager attention weights the stock model does not give
    (it has none to give); the remote code answers as the stock model of the installed transformers does now."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 4.57 warns that SDPA has no attention weights
        expected = stock.eval()(ids, output_attentions=True).attentions
        got = ours.eval()(ids, output_attentions=True).attentions
    assert got == expected and not got  # () from transformers 5, None before


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_the_remote_code_refuses_an_attention_it_does_not_run(tmp_path: Path, attn: str) -> None:
    """``attn_implementation="flash_attention_2"`` loaded, and SDPA ran: timings and memory were not what was asked for,
    with no word said. The remote code runs eager and SDPA attention; it refuses others at load, with transformers'
    error for a model that does not support them, and at run time if one is set on its config afterwards."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    remote = export(tmp_path / "ckpt", tmp_path / "remote")
    with pytest.raises(ValueError, match="does not support"):
        transformers.AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True, attn_implementation=attn)
    ours = transformers.AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True).eval()
    ours.config._attn_implementation = attn  # set behind transformers' checks
    with pytest.raises(ValueError, match=f"runs eager or sdpa attention, not {attn!r}"):
        ours(torch.randint(3, VOCAB, (1, 4)))


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_a_sharing_layer_on_another_device_than_its_source_runs(tmp_path: Path, mode: str) -> None:
    """``device_map`` may place a sharing layer on another device than its source: accelerate moves the layer's
    inputs to its device, but not the pair the relay hands on, and the sharing layer mixed devices. It takes the pair
    onto its own device now (the "meta" device stands for a second accelerator here)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1, sharing_mode=mode)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True
    )
    for module in (hf.model.layers[1], hf.model.norm, hf.lm_head):
        add_hook_to_module(module.to("meta"), AlignDevicesHook(execution_device="meta"))
    with torch.no_grad():
        logits = hf.eval()(torch.randint(3, VOCAB, (2, 8))).logits
    assert logits.device.type == "meta" and logits.shape == (2, 8, VOCAB)


class Captured(Exception):
    """What a calibration tool raises in layer 0 once it holds the layer's inputs."""


def layer_inputs(hf: torch.nn.Module, samples: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """Layer 0's hidden states and keyword arguments for each sample, caught as GPTQ/AWQ tools catch them: a hook on
    layer 0 keeps them and raises, stopping the model's forward there."""
    caught = []

    def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args[0], kwargs))
        raise Captured

    handle = hf.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in samples:
        with pytest.raises(Captured):
            hf(ids, use_cache=False)
    handle.remove()
    return caught


def layer_by_layer(
    hf: torch.nn.Module, inputs: list[torch.Tensor], kwargs: list[dict], quantize: bool = False
) -> list[torch.Tensor]:
    """Each sample's last layer output, normed, as a layer-wise quantizer computes it: every layer alone over every
    sample, its outputs stored (copied, as into a tool's buffer) to be the next layer's inputs. With ``quantize``, as
    GPTQ: a first pass over the layer's inputs (its outputs dropped), the layer's weights rounded, then the pass whose
    outputs go on."""
    for layer in hf.model.layers:
        if quantize:
            for h, options in zip(inputs, kwargs, strict=True):
                layer(h, **options)
            for p in layer.parameters():  # 4-bit symmetric
                scale = p.abs().max() / 7
                p.copy_((p / scale).round() * scale)
        inputs = [layer(h, **options).clone() for h, options in zip(inputs, kwargs, strict=True)]
    return [hf.model.norm(h) for h in inputs]


@pytest.mark.parametrize("mode", ["qk", "kv"])
@pytest.mark.parametrize("kwargs_of", ["each sample", "the first sample"])
def test_a_layer_by_layer_calibration_loop_gets_each_samples_own_pair(
    tmp_path: Path, mode: str, kwargs_of: str
) -> None:
    """GPTQ/AWQ-style tools catch layer 0's inputs and keyword arguments, then call each layer alone over every sample.
    The relay in those arguments held the pair of the last sample the layer before computed, so a sharing layer gave
    every other sample a silently wrong output. A sharing layer now takes the pair computed from the very hidden
    states it is given: the loop's outputs are the model's forward's, whether the tool keeps each sample's arguments
    or the first one's for all."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=4, shared=2, sharing_mode=mode)  # layers 2, 3 reuse layer 1's pair
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    samples = [torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    with torch.no_grad():
        expected = [hf.model(ids).last_hidden_state for ids in samples]
        caught = layer_inputs(hf, samples)
        kwargs = [options for _, options in caught] if kwargs_of == "each sample" else [caught[0][1]] * 2
        got = layer_by_layer(hf, [h for h, _ in caught], kwargs)
    for have, want in zip(got, expected, strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_a_layer_by_layer_quantizer_gets_the_quantized_models_outputs(tmp_path: Path) -> None:
    """GPTQ runs each layer twice over its inputs, before and after quantizing it, and feeds the second pass's outputs
    on: each sharing layer takes the pair of its source's second pass, so the loop's outputs are the quantized model's
    forward's, and the relay keeps the pairs of one pass only."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=4, shared=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    samples = [torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    with torch.no_grad():
        caught = layer_inputs(hf, samples)
        kwargs = [caught[0][1]] * 2  # the first sample's for both
        got = layer_by_layer(hf, [h for h, _ in caught], kwargs, quantize=True)
        expected = [hf.model(ids).last_hidden_state for ids in samples]
    for have, want in zip(got, expected, strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert len(kwargs[0]["epas_relay"].kept) == 4  # layers 2 and 3's for each sample, the first passes' dropped


def test_a_computing_layer_trained_alone_keeps_one_detached_pair_per_input(tmp_path: Path) -> None:
    """A layer-wise reconstruction tool trains a layer alone, epoch after epoch over the same inputs: the pair the
    layer before a sharing one hands on is kept once per input, the latest, without the graph of its step."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        ((h, options),) = layer_inputs(hf.eval(), [ids])
        h = hf.model.layers[0](h, **options)
    layer, relay = hf.model.layers[1].train(), options["epas_relay"]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        layer(h, **options).square().mean().backward()
        optimizer.step()
        assert len(relay.kept) == 1 and not any(x.requires_grad for x in next(iter(relay.kept.values())))
    with torch.no_grad():  # the trained layer's outputs go on to the sharing layer with the pair it computed
        got = hf.model.norm(hf.model.layers[2](layer.eval()(h, **options), **options))
        torch.testing.assert_close(got, hf.model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(relay.kept) == 1


def unchunked_fingerprint(x: torch.Tensor) -> tuple:
    """The fingerprint's checksums computed over the whole tensor at once (int64 copies of all its words)."""
    whole = x.clone(memory_format=torch.contiguous_format)  # stride 1 even for one element, as a view as words needs
    bits = whole.view(torch.int16 if x.element_size() > 1 else torch.int8).flatten().long()
    places = torch.arange(bits.numel()) % 65521 + 1
    return tuple(x.shape), x.dtype, int(bits.sum()), int((bits * places).sum())


def fingerprint_inputs() -> list[torch.Tensor]:
    """Hidden states of several dtypes and shapes, contiguous or not, none a multiple of a 7-word piece."""
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**15), 2**15, (3, 10, 13), dtype=torch.int16, generator=generator)  # 390 words
    half, single = words.view(torch.bfloat16), words[:, :, :12].contiguous().view(torch.float32)
    return [
        half,
        words.view(torch.float16).transpose(1, 2),  # rows of 30 elements, more than a piece
        half[:, ::3, 1:],  # rows of 48, a stride in dim 1
        words[:, :, :12].contiguous().view(torch.float32).transpose(0, 2),  # 2 words an element, 6 rows of 30
        words.view(torch.bfloat16)[0, :, 5],  # 1-D, strided
        words.view(torch.int8)[..., :5],  # 1-byte words
        half.float().double()[:, :2],  # 4 words an element: more than half a piece
        single[:, :, 0],  # rows of 10 strided 2-word elements: pieces of 3, the last of 1 (any stride is contiguous)
        single[0, 0, ::6],  # one 2-word element, stride 6
        half[0, 0, 0],  # 0-d
        half[:, :0],  # empty
    ]


def test_the_fingerprint_reads_its_input_a_bounded_piece_at_a_time(monkeypatch) -> None:
    """The fingerprint keying the pairs handed on to layers called alone made int64 copies of the whole hidden states
    at once. It reads ``FINGERPRINT_WORDS`` words at a time now, contiguous ones where the input is not, with the same
    checksums: same values, same fingerprint; order and values count."""
    from epas_lightning.hf.remote import modeling_epas_llama as remote

    monkeypatch.setattr(remote, "FINGERPRINT_WORDS", 7)
    for x in fingerprint_inputs():
        want = unchunked_fingerprint(x)
        assert remote._fingerprint(x) == want, x.shape
        most = max(1, 7 * (1 if x.element_size() == 1 else 2) // x.element_size())
        pieces = list(remote._pieces(x, most))
        assert all(p.dim() == 1 and p.is_contiguous() and 1 <= p.numel() <= most for p in pieces)
        in_order = torch.cat(pieces) if pieces else x.new_empty(0)  # compared by bits: NaNs do not equal themselves
        whole = x.clone(memory_format=torch.contiguous_format).flatten()  # stride 1, as a view as bytes needs
        assert torch.equal(in_order.view(torch.int8), whole.view(torch.int8))
        with monkeypatch.context() as m:  # one piece
            m.setattr(remote, "FINGERPRINT_WORDS", 1 << 22)
            assert remote._fingerprint(x) == want
    half = fingerprint_inputs()[0]
    assert remote._fingerprint(half.transpose(1, 2).contiguous().transpose(1, 2)) == remote._fingerprint(half)
    assert remote._fingerprint(half.flip(2)) != remote._fingerprint(half)  # order counts
    other = half.clone()
    other[2, 9, 12] = 1.0
    assert remote._fingerprint(other) != remote._fingerprint(half)


def test_the_fingerprints_extra_memory_is_bounded_by_its_piece_not_its_input(monkeypatch) -> None:
    """The fingerprint held about 24 bytes a 16-bit word of its input at once (24 GiB for a 2 GiB calibration batch):
    now 16 bytes a word of a piece (64 pieces here), 18 where it copies a piece of a non-contiguous input, measured by
    torch's profiler of CPU memory (it measured 10, missing the int64 copy an int32 sum makes and frees in one op)."""
    from epas_lightning.hf.remote import modeling_epas_llama as remote

    monkeypatch.setattr(remote, "FINGERPRINT_WORDS", 1 << 14)
    big = torch.randint(-(2**15), 2**15, (4, 256, 1024), dtype=torch.int16, generator=torch.Generator()).view(
        torch.bfloat16
    )
    for x in (big, big.transpose(1, 2), big.float()[:, ::2]):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            remote._fingerprint(x)
        # each allocation and release as the allocator reported it, in order: an op's own net usage (events()) hides
        # a transient it frees before returning (an integer sum's int64 copy), and counts its release at its start
        held = peak = 0
        for event in sorted(profile.profiler.kineto_results.events(), key=lambda event: event.start_ns()):
            if event.name() == "[memory]":
                held += event.nbytes()
                peak = max(peak, held)
        assert peak <= 19 * remote.FINGERPRINT_WORDS, (x.shape, peak)  # 16 or 18 a word, and a few scalars


def test_a_sharing_layer_called_without_its_pair_says_so(tmp_path: Path) -> None:
    """A tool that keeps only the mask and positions of layer 0's inputs (the original GPTQ loop), or that calls a
    sharing layer's attention alone, ran that layer dense, or on the pair another call left: silently another model.
    Its source's pair cannot be recomputed there (it comes from the layer before's input), so the call is refused,
    saying what to do; a computing layer still runs alone, and at region 0 every layer does."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ((h, options),) = layer_inputs(hf, [torch.randint(3, VOCAB, (1, 8))])
        kept = {name: options[name] for name in ("attention_mask", "position_ids", "position_embeddings")}
        h = hf.model.layers[1](hf.model.layers[0](h, **kept), **kept)
        refusal = "Layer 2 reuses layer 1's Q/K.*whole model.*epas_shared_layers=\\[\\].*--sharing-layers 0"
        with pytest.raises(RuntimeError, match=refusal):
            hf.model.layers[2](h, **kept)
        with pytest.raises(RuntimeError, match=refusal):
            hf.model.layers[2].self_attn(hidden_states=h, **kept)
        hf.model.layers[1].self_attn(hidden_states=h, **options)  # alone, with the relay: its pair is another's
        with pytest.raises(RuntimeError, match=refusal):
            hf.model.layers[2].self_attn(hidden_states=h, **options)
        hf.set_region(0)
        assert hf.model.layers[2](h, **kept).shape == h.shape


def test_a_loop_sample_by_sample_through_the_layers_keeps_one_samples_pairs(tmp_path: Path) -> None:
    """A tool may call the layers alone sample by sample, each through every layer, with one sample's arguments: the
    relay kept every sample's pairs for the layers after the source (two more per sample, without bound). Once the
    source runs again, what the layers after it took is spent: one sample's pairs are kept, the outputs unchanged."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=4, shared=2)  # layers 2, 3 reuse layer 1's pair
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    samples = [torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        caught = layer_inputs(hf, samples)
        options = caught[0][1]  # the first sample's for all
        for (h, _), ids in zip(caught, samples, strict=True):
            for layer in hf.model.layers:
                h = layer(h, **options).clone()
            torch.testing.assert_close(hf.model.norm(h), hf.model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(options["epas_relay"].kept) == 2  # the last sample's, for layers 2 and 3


def test_a_sharing_layers_attention_alone_after_its_layer_was_cut_short_says_so(tmp_path: Path) -> None:
    """A tool may stop a layer's call once it holds what it came for (a hook raising in the MLP, as an early stop), then
    call its attention alone over other samples: the pair that cut-short call took stayed in the relay, so the attention
    ran on it for every sample, silently another model. A call cut short leaves nothing to take; the attention alone
    is refused as without it."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=1)  # layer 2 reuses layer 1's pair
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()

    def stop(module: torch.nn.Module, args: tuple) -> None:
        raise Captured

    with torch.no_grad():
        ((h, options),) = layer_inputs(hf, [torch.randint(3, VOCAB, (1, 8))])
        h = hf.model.layers[1](hf.model.layers[0](h, **options), **options)
        handle = hf.model.layers[2].mlp.register_forward_pre_hook(stop)
        with pytest.raises(Captured):
            hf.model.layers[2](h, **options)
        handle.remove()
        with pytest.raises(RuntimeError, match="Layer 2 reuses layer 1's Q/K"):
            hf.model.layers[2].self_attn(hidden_states=torch.randn_like(h), **options)
        torch.testing.assert_close(hf.model.layers[2](h, **options), hf.model.layers[2](h, **options))


def test_a_config_where_layer_0_shares_is_refused_saying_which_layers_may(tmp_path: Path) -> None:
    """``from_pretrained(..., epas_shared_layers=[...])`` sets the region past the config's checks: with layer 0 in it
    the forward failed with "max() arg is an empty sequence". It is refused at load, and a region set on the config
    afterwards in the forward, naming the layers that may share."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=1)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    refusal = "Layer 0 cannot share.*1\\.\\.2"
    with pytest.raises(ValueError, match=refusal):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, epas_shared_layers=[0, 2])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf.config.epas_shared_layers = [0, 2]
    with torch.no_grad(), pytest.raises(ValueError, match=refusal):
        hf(torch.randint(3, VOCAB, (1, 8)))


def test_a_region_past_the_last_layer_set_on_the_loaded_config_is_refused_in_the_next_forward(tmp_path: Path) -> None:
    """A region set on the loaded config past its checks (``model.config.epas_shared_layers = [30]`` on a 3-layer model)
    named no layer, or not all of its layers, that could share: the forward and ``generate`` ran the rest of the model
    silently (dense where none was left). It is refused in the next forward (of the model, a layer called alone, an
    attention called alone), naming the layers and those that may share; loading with it was refused already. So is a
    list of what are no layer indices: a mask ``[True, True]`` (True equals 1) ran layer 1 sharing alone; and a
    generator, which the first check read to its end: the layers found it empty and ran dense."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=1)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(ValueError, match=r"^Layer 30 cannot share: epas_shared_layers may list layers 1\.\.2 "):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, epas_shared_layers=[2, 30])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with pytest.raises(ValueError, match=r"^Layers \[30\] cannot share: valid are 1\.\.2\.$"):
        hf.set_shared_layers([30])
    for bad in ([True, True], torch.tensor([True]), ["2"], [2.0], 2):  # a mask's True was layer 1, "2" layer 2
        with pytest.raises(TypeError, match=r"^The sharing layers must be integer layer indices, like \[2, 3\], not "):
            hf.set_shared_layers(bad)
    hf.set_shared_layers(torch.tensor([2]))  # integer tensors, as the model's own set_shared_layers takes them
    assert hf.config.epas_shared_layers == [2] and type(hf.config.epas_shared_layers[0]) is int
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        ((h, options),) = layer_inputs(hf, [ids])
        says = r" cannot share: epas_shared_layers may list layers 1\.\.2 .*model\.set_region"
        for region, refusal in (
            ([30], "^Layer 30" + says),
            ([2, 30], "^Layer 30" + says),
            ([1, 3, 4], r"^Layers \[3, 4\]" + says),
            (["2"], "^Layer '2'" + says),
            ([True, True], r"^Layers \[True, True\]" + says),  # a mask of layers 1..2, not layer 1 twice
            ([2.0], "^Layer 2.0" + says),
            (2, r"^epas_shared_layers must list layers 1\.\.2, not 2: give a list, or call model\.set_region"),
            ((i for i in [2]), r"^epas_shared_layers must list layers 1\.\.2, not <generator .*: give a list"),
        ):
            hf.config.epas_shared_layers = region
            for run in (
                lambda: hf(ids),
                lambda: hf.generate(ids, max_new_tokens=2, do_sample=False),
                lambda: hf.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False),
                lambda: hf.model.layers[0](h, **options),  # a layer-wise tool's call, the config changed since
                lambda: hf.model.layers[1].self_attn(hidden_states=h, **options),
            ):
                with pytest.raises(ValueError, match=refusal):
                    run()
        hf.set_region(1)  # a valid region runs again
        assert hf(ids).logits.shape == (1, 8, VOCAB)


def test_the_remote_code_builds_each_layer_once_as_the_stock_llama_does(tmp_path: Path) -> None:
    """The remote base model built the stock decoder layers, initialised them, then built its own over them: twice the
    layers to build and initialise in ``from_config`` (pretraining the architecture from scratch), and other random
    weights than the stock Llama's from the same seed. It builds each layer once now: the stock model's weights."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=2, shared=1)
    stock = transformers.AutoConfig.from_pretrained(export(tmp_path / "ckpt", tmp_path / "stock", 0))
    remote = transformers.AutoConfig.from_pretrained(
        export(tmp_path / "ckpt", tmp_path / "remote"), trust_remote_code=True
    )
    torch.manual_seed(0)
    expected = transformers.AutoModelForCausalLM.from_config(stock).state_dict()
    torch.manual_seed(0)
    got = transformers.AutoModelForCausalLM.from_config(remote, trust_remote_code=True).state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_the_remote_code_checkpoints_its_layers_when_asked(tmp_path: Path, mode: str) -> None:
    """``gradient_checkpointing_enable()`` set the flag and the remote forward ignored it: fine-tuning the export
    (the HF Trainer's ``gradient_checkpointing=True``) kept every layer's activations. Now each layer runs again in
    backward, sharing ones too (from the Q/K or K/V their source handed on), with the gradients of a run without
    checkpointing, reentrant or not; the cache is off in training, as on the stock model, and on without gradients."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", n_layer=3, shared=2, sharing_mode=mode)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).train()
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable  # 5.x / 4.57
    disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
    mlp_runs = []
    for layer in hf.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: mlp_runs.append(1))  # torch's recompute stops before its end
    ids = torch.randint(0, VOCAB, (2, 12))

    def step() -> tuple[dict[str, torch.Tensor], int]:
        """Every gradient of one forward + backward, and how many times a layer's MLP ran."""
        hf.zero_grad(set_to_none=True)
        mlp_runs.clear()
        hf(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in hf.named_parameters() if p.grad is not None}, len(mlp_runs)

    for region in (0, 2):  # dense, then layers 1 and 2 sharing layer 0's pair
        hf.set_region(region)
        expected, runs = step()
        assert runs == 3
        for reentrant in (False, True):
            enable({"use_reentrant": reentrant})
            grads, runs = step()
            assert runs == 6, (region, reentrant)  # each layer again in backward
            assert grads.keys() == expected.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)
            caches = {"cache", "past_key_values"}  # the output's name for it from 5.24 / before
            assert not caches & set(hf(ids, use_cache=True))
            with torch.no_grad():  # e.g. generating from a model left in training mode: nothing to recompute
                assert caches & set(hf(ids, use_cache=True))
            disable()
    if "every_n_layers" in inspect.signature(enable).parameters:  # newer transformers: layers 0 and 2 of the 3
        enable(every_n_layers=2)
        assert step()[1] == 5


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_forward_left_without_backward_frees_its_graph(tmp_path: Path, reentrant: bool) -> None:
    """With gradient checkpointing on, a training forward given no backward (a skipped step, an out-of-memory retry,
    an error raised midway) kept its whole graph alive for good: the relay held the pair a checkpoint gave out (and the
    attention weights), whose graph holds that checkpoint's function, which holds the relay, a cycle through autograd
    that Python's collector does not free. The graph is freed now, as the stock model's is."""
    stock, ours = stock_and_remote_at_region_0(tmp_path, attn_implementation="eager")
    ours.set_region(1)
    ids = torch.randint(3, VOCAB, (2, 8))

    def fail(*_: object) -> None:
        raise RuntimeError("midway")

    embedded = []  # the first activation of each forward, which every layer's graph leads back to
    for model in (stock, ours):
        embedded.clear()
        model.get_input_embeddings().register_forward_hook(lambda _, args, out: embedded.append(weakref.ref(out)))
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": reentrant})
        model.train()(ids, labels=ids, output_attentions=True)
        handle = model.model.norm.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="midway"):
            model(ids, labels=ids)
        handle.remove()
        gc.collect()
        assert [ref() is None for ref in embedded] == [True, True], type(model).__name__


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_layer_keeps_for_backward_what_the_stock_one_keeps(tmp_path: Path, reentrant: bool) -> None:
    """Gradient checkpointing handed each layer's checkpoint the Q/K the layer before it computed, sharing or not: a
    computing layer, which never reads them, kept them for its backward, some two to three times the activations the
    stock model keeps for fine-tuning. At region 0 the remote code keeps what the stock model keeps now."""
    stock, ours = stock_and_remote_at_region_0(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 16))

    def kept_for_backward(model: torch.nn.Module) -> int:
        """The bytes of the activations a checkpointed training step of ``model`` keeps for its backward."""
        kept = {}  # storage -> its bytes

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": reentrant})
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model.train()(ids, labels=ids).loss
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for storage, size in kept.items() if storage not in weights)

    assert kept_for_backward(ours) == kept_for_backward(stock)


def test_a_stock_export_of_a_kv_model_reads_back_as_kv(tmp_path: Path) -> None:
    """A stock export (dense) of a kv-trained model read back as qk: inspect said Q/K sharing, and a forced region or
    an init_from that reran its weights' region shared Q/K, which those weights never learned to."""
    from epas_lightning.hf.export import export

    ours = save_ours(tmp_path / "ckpt", n_layer=4, shared=2, sharing_mode="kv")
    out = export(tmp_path / "ckpt", tmp_path / "hf", sharing_layers=0)
    transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # stock: the key is an attribute
    forced = load_model(out)
    assert forced.model.config.sharing_mode == "kv"
    assert set_region(forced.model, 2, forced.weights_region, force=True) == [3, 2]
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(forced.model(ids), ours(ids), atol=1e-5, rtol=1e-5)
    assert config_from_hf(out).sharing_mode == "kv"  # init_from's source config
    save_ours(tmp_path / "qk", n_layer=4, shared=2)
    stock = export(tmp_path / "qk", tmp_path / "hf-qk", sharing_layers=0)
    assert "epas_sharing_mode" not in json.loads((stock / "config.json").read_text())  # qk: as transformers' LLaMA


def test_an_export_runs_with_the_region_it_was_exported_with(tmp_path: Path) -> None:
    """`export --sharing-layers 1` of a 2-layer region: transformers loads it with 1 sharing layer, our commands ran it
    with 2 (the whole trained region). Their default is now the exported choice, and inspect says so; a choice past
    the trained region (--force) is not a default: they keep the trained region, as --sharing-layers allows."""
    from epas_lightning.hf.export import export
    from epas_lightning.inspect_cli import describe

    save_ours(tmp_path / "ckpt", n_layer=4, shared=2)
    out = export(tmp_path / "ckpt", tmp_path / "hf", sharing_layers=1)
    assert json.loads((out / "config.json").read_text())["epas_shared_layers"] == [3]
    assert describe(out, check_weights=False)["sharing_layers"] == {"default": 1, "max": 2, "max_forced": 3}
    loaded = load_model(out)
    assert (loaded.default_sharing, loaded.region.layers, loaded.model.sharing.shared_layers) == (1, (3, 2), [2, 3])
    copy = load_model(consolidate(out, tmp_path / "consolidated"))  # a copy keeps the region and the choice
    assert (copy.region.layers, copy.default_sharing) == ((3, 2), 1)
    again = export(tmp_path / "consolidated", tmp_path / "copy-exported")  # it ran, and was exported, with 2
    assert json.loads((again / "config.json").read_text())["epas_shared_layers"] == [3]
    again = export(out, tmp_path / "again")  # exported again: still the choice
    assert json.loads((again / "config.json").read_text())["epas_shared_layers"] == [3]
    forced = export(tmp_path / "ckpt", tmp_path / "forced", sharing_layers=3, force=True)
    assert describe_checkpoint(forced).default_sharing == 2


def test_export_of_a_llama3_scaled_model_loads_in_transformers_with_its_logits(tmp_path: Path) -> None:
    """Stock (no region) and remote-code (a region) exports of a tied llama3-scaled model, as Llama-3.2-1B is: the
    same logits in transformers, and the same scaling read back."""
    from epas_lightning.hf.export import export

    ours = save_ours(tmp_path / "ckpt", n_layer=2, shared=1, tie=True, block_size=128, rope_scaling=LLAMA3_TINY)
    ids = torch.randint(0, VOCAB, (2, 48))
    for n in (0, 1):
        out = export(tmp_path / "ckpt", tmp_path / f"hf{n}", sharing_layers=n)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=n > 0, dtype=torch.float32)
        ours.set_shared_layers(range(2 - n, 2))
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        assert config_from_hf(out).rope_scaling == ours.config.rope_scaling


@pytest.mark.parametrize("bias,stock", [("qkv", "Qwen2ForCausalLM"), ("qkvo", "LlamaForCausalLM")])
def test_export_of_attention_biases_loads_in_transformers_with_its_logits(
    tmp_path: Path, bias: str, stock: str
) -> None:
    """No region: a stock Qwen2 (q/k/v biases) or LLaMA with attention_bias (all four); a region: the remote code,
    which builds the same biases. The same logits and greedy generation in transformers, and the biases read back."""
    from epas_lightning.hf.export import export

    ours = save_ours(tmp_path / "ckpt", n_layer=2, shared=1, tie=True, attention_bias=bias)
    ids = torch.randint(0, VOCAB, (2, 20))
    for n, kind in ((0, stock), (1, "EpasLlamaForCausalLM")):
        out = export(tmp_path / "ckpt", tmp_path / f"hf{n}", sharing_layers=n)
        hf, loading = transformers.AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=n > 0, dtype=torch.float32, output_loading_info=True
        )
        assert type(hf).__name__ == kind and not loading["missing_keys"]  # (a Qwen2 has no o_proj bias to init)
        ours.set_shared_layers(range(2 - n, 2))
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        prompt = ids[:, :6]
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, greedy_by_full_forwards(ours, prompt, 6))
        assert config_from_hf(out).attention_bias == bias


def test_export_as_a_stock_qwen2_warns_when_transformers_would_tokenize_otherwise(
    tmp_path: Path, tiny_corpus: Path, caplog
) -> None:
    """transformers 5 reads a qwen2 folder's tokenizer as its own Qwen2Tokenizer (Qwen's pre-tokenizer over the
    vocabulary), whatever tokenizer.json says: with another tokenizer than Qwen's, the export says so in one line
    (transformers 4.x reads the tokenizer.json: nothing to say); the remote-code form (AutoTokenizer reads the
    tokenizer.json) is not warned about."""
    from epas_lightning.hf.export import export

    save_ours(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", n_layer=2, attention_bias="qkv")
    export(tmp_path / "ckpt", tmp_path / "stock")
    said = [r.getMessage() for r in caplog.records if "Qwen2Tokenizer" in r.getMessage()]
    assert len(said) == TRANSFORMERS_5 and all("\n" not in line and "--remote-code" in line for line in said)
    caplog.clear()
    export(tmp_path / "ckpt", tmp_path / "remote", remote_code=True)
    assert "Qwen2Tokenizer" not in caplog.text


def test_export_region_checks(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:

    save_ours(tmp_path / "ckpt", n_layer=4, shared=1)
    export = ["export", "--checkpoint", str(tmp_path / "ckpt")]
    assert main([*export, "--output", str(tmp_path / "a"), "--sharing-layers", "2"]) == 2
    assert "trained with at most 1 sharing layer (" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*export, "--output", str(tmp_path / "b"), "--sharing-layers", "0"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "llama"
    said = capsys.readouterr().err  # the stock folder runs dense: inspect shows the region as a record only
    assert "does not carry the trained region (layers [3], deep-first)" in said and "--remote-code" in said, said
    assert main([*export, "--output", str(tmp_path / "c"), "--sharing-layers", "0", "--remote-code"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "c", trust_remote_code=True, epas_shared_layers=[3]
    )
    assert hf.config.epas_shared_layers == [3] and hf.config.epas_max_shared_layers == 1
    assert hf.config.epas_trained_region == [3] and hf.config.epas_growth_order == "deep_first"
    with pytest.raises(ValueError, match=r"^The weights were trained with up to 1 sharing layer, not 2\.$"):
        hf.set_region(2)
    from epas_lightning.init_from import read_init_state  # as init_from, it warns as our checkpoints do

    with pytest.warns(UserWarning, match=r"trained layers \[3\] sharing; this run starts every layer computing"):
        read_init_state(tmp_path / "c", load_model(tmp_path / "ckpt").model.config)
    from epas_lightning.consolidation import consolidate
    from epas_lightning.init_from import source_shapes

    config = load_model(tmp_path / "ckpt").model.config  # the stock export, and a copy of it, said nothing
    for stock in (tmp_path / "b", consolidate(tmp_path / "b", tmp_path / "d")):
        with pytest.warns(UserWarning, match=r"trained layers \[3\] sharing; this run starts every layer computing"):
            read_init_state(stock, config)
    with pytest.warns(UserWarning, match=r"evaluate --checkpoint of the training checkpoint its weights came from"):
        source_shapes(tmp_path / "b", config, "validate")  # not itself: it runs dense
    from lightning.pytorch.utilities import rank_zero_only

    with monkeypatch.context() as m, warnings.catch_warnings():  # every rank reads init_from; rank 0 alone says it
        m.setattr(rank_zero_only, "rank", 1)
        warnings.simplefilter("error")
        read_init_state(tmp_path / "c", load_model(tmp_path / "ckpt").model.config)
    record = json.loads((tmp_path / "c" / "config.json").read_text())  # hand-edited: was a ValueError traceback
    (tmp_path / "c" / "config.json").write_text(json.dumps({**record, "epas_trained_region": ["x"]}))
    with pytest.raises(CheckpointError, match=rf"region is invalid .* — model.init_from {tmp_path / 'c'} — pass"):
        read_init_state(tmp_path / "c", load_model(tmp_path / "ckpt").model.config)


def test_export_and_load_model_from_python_take_dtype_names_and_refuse_unknown_ones(tmp_path: Path) -> None:
    """``export(..., dtype="fp16")`` was a bare KeyError, after the whole model had loaded; ``load_model(...,
    dtype="bfloat16")`` (the name every --dtype takes) a TypeError from ``torch.finfo``."""
    from epas_lightning import export
    from epas_lightning.errors import ConfigError

    save_ours(tmp_path / "ckpt", n_layer=2)
    assert load_model(tmp_path / "ckpt", dtype="bfloat16").model.lm_head.weight.dtype == torch.bfloat16
    unknown = "unknown dtype 'fp16' — --dtype — use auto or one of float32, bfloat16"
    with pytest.raises(ConfigError, match=unknown):
        export(tmp_path / "ckpt", tmp_path / "hf", dtype="fp16")
    with pytest.raises(ConfigError, match=unknown):
        load_model(tmp_path / "missing", dtype="fp16")
    assert load_model(tmp_path / "ckpt", dtype="auto").model.lm_head.weight.dtype == torch.float32  # was refused
    for dtype in (torch.int64, 16):  # failed in Module.to ("only accepts floating point"; "accelerator device")
        with pytest.raises(ConfigError, match=rf"^dtype must be a floating-point torch dtype or its name, got {dtype}"):
            load_model(tmp_path / "ckpt", dtype=dtype)
    with pytest.raises(ConfigError, match="^unknown device None — device None — use auto, cpu"):
        load_model(tmp_path / "ckpt", device=None)  # a TypeError from torch.device
    with pytest.raises(
        CheckpointError,
        match="^a checkpoint path is a str or Path, not a NoneType — path — pass the checkpoint's path$",
    ):
        load_model(None)  # a TypeError from pathlib
    export(tmp_path / "ckpt", tmp_path / "bf16", dtype=torch.bfloat16)  # as load_model takes it: an unknown dtype
    assert load_model(tmp_path / "bf16", dtype=STORED).model.lm_head.weight.dtype == torch.bfloat16


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    """A tokenizer of 512 tokens shipped with a model of 256 rows: the export loaded, and its tokenizer's ids past 255
    failed in transformers' embedding lookup (training and evaluate refuse such a tokenizer)."""
    save_ours(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", n_layer=2, vocab_size=256)
    argv = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the tokenizer has 512 tokens but the model's vocab_size is 256 — " in err
    assert str(tmp_path / "ckpt" / "tokenizer.json") in err
    assert not (tmp_path / "hf").exists()


def test_export_and_consolidate_keep_the_dtype_the_checkpoint_trained_in(tmp_path: Path) -> None:
    """A bf16-true run's checkpoint holds bf16 weights: --dtype auto keeps them, nothing doubles in size."""
    from safetensors import safe_open

    from epas_lightning.consolidation import consolidate
    from epas_lightning.hf.export import export

    model = save_ours(tmp_path / "fp32", shared=1)
    state = {"model." + k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": model.config.to_dict()}, tmp_path / "bf16.ckpt")
    for out in (export(tmp_path / "bf16.ckpt", tmp_path / "hf"), consolidate(tmp_path / "bf16.ckpt", tmp_path / "c")):
        with safe_open(out / "model.safetensors", "pt") as f:
            assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16, out
    from transformers import LlamaConfig as HFLlamaConfig

    record = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert record["dtype"] == "bfloat16" and "torch_dtype" not in record  # the old name warns that it is deprecated
    assert HFLlamaConfig.from_dict(record).dtype == torch.bfloat16
    fp32 = export(tmp_path / "bf16.ckpt", tmp_path / "hf32", dtype="float32")
    with safe_open(fp32 / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float32


def test_consolidate_dtype_casts_the_floating_weights_and_auto_keeps_every_byte(
    tmp_path, tiny_corpus, capsys, monkeypatch
) -> None:
    """consolidate had no --dtype: a release of an fp32-master checkpoint could not be made bf16 (half the size) as
    export's can. --dtype casts the floating-point tensors only (the sharing mask stays bool), the folder still loads
    in generate and evaluate, the default writes the bytes it wrote before, and a dtype that cannot be (an unknown
    name, weights past float16's range) is one line before any weight is read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from epas_lightning import checkpoint
    from epas_lightning.hf.convert import saveable

    model = save_ours(tmp_path / "m", tiny_corpus / "tokenizer.json", n_layer=2, shared=1)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    tokenizer = {"path": str(tiny_corpus / "tokenizer.json"), "bos_id": 0, "eos_id": 1}
    described = {"model_config": model.config.to_dict(), "tokenizer": tokenizer}
    torch.save({"state_dict": state, **described}, tmp_path / "a.ckpt")
    argv = ["consolidate", "--checkpoint", str(tmp_path / "a.ckpt"), "--output"]
    assert main([*argv, str(tmp_path / "c32")]) == 0
    save_file(saveable(model.state_dict()), tmp_path / "expected.safetensors")  # what consolidate always wrote
    written = (tmp_path / "c32" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "expected.safetensors").read_bytes()
    before = {name: (tmp_path / "c32" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    assert main([*argv, str(tmp_path / "c32"), "--dtype", "auto", "--overwrite"]) == 0  # config.json names its folder
    assert {name: (tmp_path / "c32" / name).read_bytes() for name in before} == before
    assert main([*argv, str(tmp_path / "c16"), "--dtype", "bfloat16"]) == 0
    with safe_open(tmp_path / "c16" / "model.safetensors", "pt") as f:
        cast = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert cast["sharing.mask"].dtype == torch.bool and cast["sharing.mask"].equal(model.sharing.mask)
    assert all(cast[k].dtype == torch.bfloat16 and cast[k].equal(v.bfloat16()) for k, v in model.named_parameters())
    assert (tmp_path / "c16" / "model.safetensors").stat().st_size < 0.6 * len(written)
    capsys.readouterr()
    folder = ["--checkpoint", str(tmp_path / "c16"), "--device", "cpu"]
    assert main(["generate", *folder, "--prompt", "the", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["evaluate", *folder, "--data", str(tiny_corpus), "--batches", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["sharing_layers"] == 1 and row["val_loss"] > 0

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    with pytest.raises(ConfigError, match="unknown dtype 'int8' — --dtype — use auto or one of float32, bfloat16"):
        consolidate(tmp_path / "a.ckpt", tmp_path / "bad", dtype="int8")
    assert main([*argv, str(tmp_path / "bad"), "--dtype", "int8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.undo()
    state["model.lm_head.weight"][0, 0] = 1e5  # past float16's 65504
    torch.save({"state_dict": state, **described}, tmp_path / "big.ckpt")
    assert main(["consolidate", "--checkpoint", str(tmp_path / "big.ckpt"), "--output", str(tmp_path / "bad")]) == 0
    capsys.readouterr()
    assert main(["consolidate", "--checkpoint", str(tmp_path / "big.ckpt"), "--output", str(tmp_path / "f16"),
                 "--dtype", "float16"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "float16" in err and not (tmp_path / "f16").exists(), err


def test_a_chat_template_beside_the_tokenizer_reaches_the_export(tmp_path: Path, tiny_corpus: Path) -> None:
    """A chat model's template (in its tokenizer_config.json, or chat_template.jinja and additional_chat_templates/)
    was dropped: consolidate copied only the tokenizer file, and export wrote a tokenizer_config.json without it."""
    from epas_lightning.consolidation import consolidate
    from epas_lightning.hf.export import export

    chat, template = tmp_path / "chat", "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    chat.mkdir()
    (chat / "tokenizer.json").write_bytes((tiny_corpus / "tokenizer.json").read_bytes())
    (chat / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))  # its end of turn too
    model = save_ours(tmp_path / "m", n_layer=2)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    record = {"path": str(chat / "tokenizer.json"), "bos_id": 0, "eos_id": 1}  # as fit records it
    torch.save({"state_dict": state, "model_config": model.config.to_dict(), "tokenizer": record}, tmp_path / "a.ckpt")
    out = export(consolidate(tmp_path / "a.ckpt", tmp_path / "c"), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template
    said = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert said == "<|user|>hi"
    # the template writes control tokens as text: with it, they read as the ids (not as training's plain text)
    assert tokenizer("hi<|eos|>", add_special_tokens=False)["input_ids"][-1] == 1
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [1, 5]  # consolidate kept them
    (chat / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # it wins, as in transformers
    (chat / "additional_chat_templates").mkdir()
    (chat / "additional_chat_templates" / "tool_use.jinja").write_text("tools")
    out = export(tmp_path / "m", tmp_path / "hf2", tokenizer=chat)
    named = {"default": "{{ messages[0]['content'] }}", "tool_use": "tools"}
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == named


# ---------------------------------------------------------------- configs/tinyllama-continual.yaml

CONTINUAL = str(Path(__file__).resolve().parents[1] / "configs" / "tinyllama-continual.yaml")


def test_tinyllama_continual_config_parses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:

    path = save_tiny_hf(tmp_path / "hf")
    assert main(["fit", "--config", CONTINUAL, "--model.init_from", str(path), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert f"init_from: {path}" in out and "target: 5" in out
    assert "n_layer: 2" in out and "rope_theta: 50000.0" in out and "block_size: 2048" in out  # the model's, the YAML's


def test_tinyllama_continual_config_prints_as_shipped(capsys: pytest.CaptureFixture) -> None:
    """`--print_config` of the config as shipped failed on its placeholder init_from ("does not exist"): a user
    could not see what it sets before replacing it. It prints, saying what is left unread; fit still refuses."""
    assert main(["fit", "--config", CONTINUAL, "--print_config"]) == 0
    out, err = capsys.readouterr()
    assert "init_from: /path/to/TinyLlama-1.1B" in out and "block_size: 2048" in out and "n_layer: null" in out
    assert err.strip() == (
        "note: model.init_from /path/to/TinyLlama-1.1B does not exist here: model.config is printed as configured, "
        "without the fields fit reads from it"
    )


def test_tinyllama_continual_config_checks_init_from(tmp_path: Path) -> None:
    """Scaled down to the tiny HF model on CPU: builds with a fitting directory, fails clearly without one."""
    from epas_lightning.lightning_cli import lightning_cli

    path = save_tiny_hf(tmp_path / "hf")
    small = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    small += ["--model.config.block_size", "32", "--sharing.target", "1", "--model.compile", "false"]
    small += ["--trainer.precision", "32-true", "--data.data_dir", "null", "--trainer.logger", "false"]
    cli = lightning_cli(["--config", CONTINUAL, *small, "--model.init_from", str(path)], run=False)
    assert cli.model.init_from == str(path)
    with pytest.raises(CheckpointError, match="init_from"):
        lightning_cli(["--config", CONTINUAL, *small, "--model.init_from", str(tmp_path / "missing")], run=False)


@pytest.mark.parametrize("variable", ["SLURM_NODEID", "GROUP_RANK", "NODE_RANK"])
def test_init_from_missing_on_another_node_says_every_node_reads_it(tmp_path: Path, monkeypatch, variable) -> None:
    """Every rank reads init_from's config as it parses its command line (no process group exists yet to take it
    from rank 0): a node without the path (a node-local disk) said only 'does not exist', though rank 0 had it."""
    from epas_lightning.init_from import source_config

    for name in ("SLURM_NODEID", "GROUP_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    said = rf"^does not exist on node 1, which reads its config .* — model.init_from {tmp_path}/hf — put it on a "
    with pytest.raises(CheckpointError, match=said):
        source_config(tmp_path / "hf", block_size=32)


def _fit_args(path: Path, corpus: Path | str, root: Path, *config: str) -> list[str]:
    """``fit`` of ``path`` for 1 CPU step on ``corpus``, with ``model.config`` set by the flags ``config`` alone."""
    args = ["fit", "--model.init_from", str(path), *config, "--data.data_dir", str(corpus), "--data.batch_size", "2"]
    args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "1"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    return [*args, "--trainer.default_root_dir", str(root)]


def test_fit_from_an_hf_folder_takes_every_unset_field_from_it(tmp_path: Path, tiny_corpus: Path) -> None:
    """`--model.init_from DIR --model.config.block_size N` is a whole config: the source's shape, the same first step
    as the config spelled out (a Qwen2's q/k/v biases and tied embeddings included); without block_size, the source's
    context, up to 8192 tokens."""
    from epas_lightning.lightning_cli import lightning_cli

    path = save_tiny_hf(tmp_path / "hf", tie=True, kind="Qwen2")
    spelled = replace(_module_config(), attention_bias="qkv", tie_embeddings=True)
    fields = [f"--model.config.{k}={v}" for k, v in spelled.to_dict().items() if v is not None and k != "name"]
    runs = {}
    for name, config in (("spelled", fields), ("taken", ["--model.config.block_size", "32"])):
        cli = lightning_cli(_fit_args(path, tiny_corpus, tmp_path / name, *config))
        runs[name] = cli.model.config, cli.trainer.callback_metrics["train/loss"]
    assert runs["taken"] == runs["spelled"] and replace(runs["taken"][0], max_position_embeddings=None) == spelled
    cli = lightning_cli(["--model.init_from", str(path), "--data.data_dir", "null"], run=False)
    assert cli.model.config.block_size == 64 and cli.datamodule.seq_len == 64 and cli.model.config.tie_embeddings


def test_fit_from_a_source_longer_than_8192_tokens_needs_block_size(tmp_path: Path, capsys) -> None:
    """Nobody trains at a Llama 3.x's 131072 tokens: an unset block_size is one line before any work; a set field that
    differs from the source is refused as before, and a missing folder is said first."""
    path = save_tiny_hf(tmp_path / "hf", max_position_embeddings=16384)
    capsys.readouterr()
    assert main(["fit", "--model.init_from", str(path), "--data.data_dir", "null"]) == 2
    err = capsys.readouterr().err
    says = "error: block_size is unset and the init_from model's context is 16384 tokens, longer than 8192"
    assert err.startswith(says) and "— model.config.block_size — set the training sequence length" in err
    assert err.count("\n") == 1
    args = ["fit", "--model.init_from", str(path), "--model.config.block_size", "32", "--data.data_dir", "null"]
    assert main([*args, "--model.config.n_layer", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.config does not match init_from {path}: n_layer: model 3 vs init_from")
    assert f"— model.init_from {path} — leave those model.config fields unset" in err and err.count("\n") == 1
    assert main([*args, "--model.config.name", "demo"]) == 2
    assert "model.config fields unset (drop model.config.name demo: its preset sets them)" in capsys.readouterr().err
    args[2] = str(tmp_path / "missing")
    assert main([*args, "--model.config.name", "nonesuch"]) == 2
    assert capsys.readouterr().err.startswith(f"error: does not exist — model.init_from {tmp_path / 'missing'}")


def test_source_config_fills_a_python_config_from_the_model(tmp_path: Path) -> None:
    """The Python API of the same: ``source_config(path, **fields)``, from an HF folder or one of our checkpoints."""
    from epas_lightning import source_config

    path = save_tiny_hf(tmp_path / "hf")  # its context: 64 positions, kept at block_size 32
    kept = replace(_module_config(), max_position_embeddings=64)
    assert source_config(path, block_size=32) == kept
    assert source_config(path, block_size=32, max_position_embeddings=48).context_length == 48
    with pytest.raises(HFCheckpointError, match="n_embd: model 128 vs init_from .*— leave those arguments of sourc"):
        source_config(path, n_embd=128)  # its arguments, not the fit command's model.config fields
    # a preset sets its fields (checked), the source the ones it leaves unset (its RoPE base and norm epsilon)
    assert source_config(path, name="debug", block_size=32) == replace(kept, name="debug")
    with pytest.raises(HFCheckpointError, match="n_layer: model 8 vs init_from") as refused:
        source_config(path, name="demo")
    assert "arguments of source_config unset (drop name='demo': its preset sets them)" in str(refused.value)
    ours = save_ours(tmp_path / "ours", n_layer=2, padded_vocab_size=576, block_size=32, sharing_mode="kv").config
    taken = source_config(tmp_path / "ours")  # its training length, its padded vocabulary, its sharing mode
    assert taken == ours
    with pytest.raises(HFCheckpointError, match="n_layer: model 3 vs checkpoint 2 .* leave those arguments of source_"):
        source_config(tmp_path / "ours", n_layer=3)


def test_a_resume_does_not_need_init_from_any_more(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    """A resume never reads init_from: a model folder deleted or unmounted since must not stop `--ckpt_path`, also
    where model.config sets only block_size (the other fields are then the checkpoint's), nor its `--print_config`."""
    import shutil

    path = save_tiny_hf(tmp_path / "hf")
    debug = str(Path(CONTINUAL).with_name("debug.yaml"))  # no preset: model.config sets block_size alone
    args = ["--config", debug, "--model.config.name", "null", "--data.data_dir", str(tiny_corpus)]
    args += ["--model.init_from", str(path), "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *args, "--trainer.max_steps", "1"]) == 0
    shutil.rmtree(path)
    capsys.readouterr()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["fit", *args, "--trainer.max_steps", "2", "--ckpt_path", str(ckpt)]) == 0
    assert f"init_from: not applied, the weights resume from {ckpt}" in capsys.readouterr().err
    assert main(["validate", *args, "--trainer.limit_val_batches", "1", "--ckpt_path", str(ckpt)]) == 0  # 0: refused
    capsys.readouterr()
    assert main(["fit", *args, "--ckpt_path", "last", "--print_config"]) == 0  # the config the resume would run
    assert "block_size: 32" in capsys.readouterr().out


def test_a_resume_from_python_does_not_need_init_from_any_more(tmp_path: Path, tiny_corpus: Path, caplog) -> None:
    """``trainer.fit(EPASModule(config, init_from=path), ckpt_path=...)`` was refused as the module was built where
    init_from was gone or broken since, although a resume never reads it (the command line resumes: above). It
    resumes; a fresh fit still refuses it, in one line, before its first step."""
    import shutil

    from epas_lightning import TokenDataModule

    def data() -> TokenDataModule:
        return TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)

    source = save_tiny_hf(tmp_path / "hf")
    config = source_config(source, block_size=32)  # the config of the first run, kept by its script
    trainer = cpu_trainer(tmp_path / "first", max_steps=1, num_sanity_val_steps=0)
    trainer.fit(EPASModule(config, init_from=str(source)), data())
    trainer.save_checkpoint(ckpt := tmp_path / "one_step.ckpt")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    shutil.rmtree(source)
    gone, corrupt = f"does not exist — model.init_from {source}", f"corrupt .* — {broken / 'model.safetensors'}"
    for init_from, refusal in ((source, gone), (broken, corrupt)):
        trainer = cpu_trainer(tmp_path / "resumed", max_steps=2, num_sanity_val_steps=0)
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer.fit(EPASModule(config, init_from=str(init_from)), data(), ckpt_path=ckpt)
        assert trainer.global_step == 2 and resumed_instead(ckpt) in caplog.text
        fresh = cpu_trainer(tmp_path / "fresh", max_steps=2, num_sanity_val_steps=0)
        with pytest.raises(CheckpointError, match=refusal):
            fresh.fit(EPASModule(config, init_from=str(init_from)), data())
        assert fresh.global_step == 0


@pytest.mark.parametrize("fsdp2", [False, True])
def test_resume_wins_over_init_from(tmp_path: Path, tiny_corpus: Path, caplog, fsdp2: bool) -> None:
    """A resume from Python never reads init_from (a full read of the model per rank) and says so; under FSDP2
    Lightning knows the checkpoint only after ``on_fit_start``, where init_from had been loaded and announced."""
    from epas_lightning import FSDP2Strategy, TokenDataModule

    def data() -> TokenDataModule:
        return TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)

    def fit(root: Path, init_from: Path, steps: int, ckpt_path: Path | None = None) -> tuple[EPASModule, dict]:
        probe = _FirstBatchWeights()
        strategy = FSDP2Strategy() if fsdp2 else "auto"
        trainer = cpu_trainer(root, max_steps=steps, callbacks=[probe], strategy=strategy, num_sanity_val_steps=0)
        module = EPASModule(_module_config(), init_from=str(init_from))
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer.fit(module, data(), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / "two_steps.ckpt")  # FSDP2's: a sharded folder
        return module, probe.state

    first = save_tiny_hf(tmp_path / "hf1", seed=1)
    module, start = fit(tmp_path / "a", first, 2)
    for key, tensor in load_hf_state(first, _module_config()).items():
        torch.testing.assert_close(start[key], tensor, msg=key)
    assert f"init_from: the weights start from {first}" in caplog.text
    saved = _FirstBatchWeights.full(module)

    other = save_tiny_hf(tmp_path / "hf2", seed=2)  # a resume must not be overwritten by init_from
    _, start = fit(tmp_path / "b", other, 3, ckpt_path=tmp_path / "two_steps.ckpt")
    for key, tensor in saved.items():
        torch.testing.assert_close(start[key], tensor, msg=key)
    assert "init_from: the weights start from" not in caplog.text
    assert resumed_instead(tmp_path / "two_steps.ckpt") in caplog.text


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"remove_extra_whitespaces": False, "normalization_rule_name": "identity", "split_digits": True},
        {"model_type": "unigram", "normalization_rule_name": "nfkc_cf", "vocab_size": 290},
    ],
    ids=["default-normalization", "llama-style", "unigram"],
)
def test_export_sentencepiece_tokenizes_as_training(tmp_path: Path, options: dict, caplog) -> None:
    """transformers 5 read an exported tokenizer.model otherwise than sentencepiece: a default-trained model's text
    kept its newlines, tabs and runs of spaces (sentencepiece collapses them), a LLaMA-style one lost the dummy-prefix
    space before leading spaces (' hello' was one token short), and both read '</s>' in a text as EOS. The export
    ships a tokenizer.json that agrees (a Unigram model still reads '<s>' as its token: export warns)."""
    from epas_lightning.data import load_tokenizer
    from epas_lightning.hf.export import export_tokenizer

    model = train_tiny_sentencepiece(tmp_path / "tokenizer.model", **options)
    (tmp_path / "hf").mkdir()
    export_tokenizer(model, tmp_path / "hf", 64, None, None)
    exported, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer(model)
    texts = [" hello", "   lo  ka", "a\nb\n\n c", "x\r\ny\tz ", "ﬁ Ａ 🙂 café", "12 345", "", " ", "\u2581o x \u2581"]
    unigram = options.get("model_type") == "unigram"
    for text in texts if unigram else [*texts, "a</s>b<s>"]:
        ids = [ours.bos_id, *ours.encode(text)]
        assert exported(text)["input_ids"] == ids, text
        assert exported.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    warned = "does not tokenize as" in caplog.text
    assert warned == unigram and (not unigram or "'<s> and </s> are text' is tokens" in caplog.text)


def test_export_hf_tokenizer_reads_special_token_text_as_text(tmp_path: Path) -> None:
    """A tokenizer.json's '<|eos|>' in a text is text in training and generate (TextTokenizer): the exported tokenizer
    read it as the EOS id, so transformers and lm-eval saw ids the model never trained on."""
    from epas_lightning.data import load_tokenizer
    from epas_lightning.data.tokenizer import train_byte_level_bpe
    from epas_lightning.hf.export import export_tokenizer

    train_byte_level_bpe(["hello world, a bit of text"] * 20, 270).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "hf").mkdir()
    export_tokenizer(tmp_path / "tokenizer.json", tmp_path / "hf", 64, None, None)
    exported, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer(tmp_path)
    text = "a <|eos|> b<|bos|>"
    assert exported(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]


def test_export_warns_when_the_sentencepiece_json_tokenizes_otherwise(tmp_path: Path, caplog) -> None:
    """A model the tokenizer.json cannot reproduce (whitespace as a suffix) is exported with a one-line warning."""
    from epas_lightning.hf.export import export_tokenizer

    model = train_tiny_sentencepiece(tmp_path / "tokenizer.model", treat_whitespace_as_suffix=True)
    (tmp_path / "hf").mkdir()
    export_tokenizer(model, tmp_path / "hf", 64, None, None)
    warning = f'the exported tokenizer.json does not tokenize as {model} the model trained with: "Hello world'
    assert warning in caplog.text and len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


@pytest.mark.parametrize("case", ["gone", "truncated", "shape"])
def test_a_python_fit_refuses_broken_init_from_before_preparing_data_or_logging(tmp_path: Path, monkeypatch, case):
    """``trainer.fit(EPASModule(config, init_from=broken), data)`` (gone, corrupt, another shape) was refused only
    when training started: after the datamodule's prepare_data ran and the logger made its folder. It is refused before
    either (the command line's order); the module keeps the refusal it read from the headers as it was built."""
    from epas_lightning import TokenDataModule
    from epas_lightning.init_from import source_config

    def prepared(self) -> None:  # noqa: ANN001
        raise AssertionError("data prepared before init_from was refused")

    monkeypatch.setattr(TokenDataModule, "prepare_data", prepared)
    config = source_config(save_tiny_hf(tmp_path / "source"), block_size=32)
    path, says = (tmp_path / "gone", "does not exist") if case == "gone" else _broken_init_source(tmp_path, case)
    module = EPASModule(config, init_from=str(path))
    data = TokenDataModule(tmp_path / "corpus", seq_len=32, batch_size=2, vocab_size=VOCAB)
    trainer = cpu_trainer(tmp_path / "run", max_steps=1, logger=True)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        trainer.fit(module, data)
    assert not (tmp_path / "run").exists()


def test_a_python_resume_where_lightning_keeps_its_checkpoint_elsewhere(tmp_path: Path, tiny_corpus, monkeypatch):
    """The checkpoint a call restores is read from ``Trainer._run``'s ``ckpt_path`` before Lightning opens it; a
    Lightning that keeps it under another name made every resume look like a fresh fit, and a resume with its
    ``init_from`` gone since was refused. Not known, nothing is refused early: the resume runs; a fresh fit is refused
    when training starts."""
    from lightning.pytorch import Trainer

    from epas_lightning import TokenDataModule

    def data() -> TokenDataModule:
        return TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=VOCAB)

    source = save_tiny_hf(tmp_path / "hf")
    config = source_config(source, block_size=32)
    trainer = cpu_trainer(tmp_path / "first", max_steps=1, num_sanity_val_steps=0)
    trainer.fit(EPASModule(config, init_from=str(source)), data())
    trainer.save_checkpoint(ckpt := tmp_path / "one_step.ckpt")
    module = EPASModule(config, init_from=str(tmp_path / "gone"))
    run = Trainer._run

    def renamed(self, model, **arguments):  # noqa: ANN001, ANN003, ANN202  # no ckpt_path of its own
        return run(self, model, *arguments.values())

    monkeypatch.setattr(Trainer, "_run", renamed)
    resumed = cpu_trainer(tmp_path / "resumed", max_steps=2, num_sanity_val_steps=0)
    resumed.fit(module, data(), ckpt_path=ckpt)
    assert resumed.global_step == 2
    fresh = cpu_trainer(tmp_path / "fresh", max_steps=2, num_sanity_val_steps=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        fresh.fit(EPASModule(config, init_from=str(tmp_path / "gone")), data())
    assert fresh.global_step == 0
