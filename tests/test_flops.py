"""The analytic FLOPs model: the paper's Table 1, and agreement with Lightning's measure_flops."""

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops

from epas_lightning.errors import ConfigError
from epas_lightning.flops import estimate_flops, flop_cut
from epas_lightning.model import Llama, LlamaConfig


@pytest.mark.parametrize("name,dense_tf,shared_tf", [("llama-125m", 1.81, 1.72), ("tinyllama-1.1b", 14.98, 14.34)])
def test_reproduces_paper_table_1(name, dense_tf, shared_tf):
    config = LlamaConfig.from_name(name)
    half = config.n_layer // 2
    assert round(estimate_flops(config, 0, 2048) / 1e12, 2) == dense_tf
    assert round(estimate_flops(config, half, 2048) / 1e12, 2) == shared_tf


@pytest.mark.parametrize("mode", ["qk", "kv"])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}, {"tie_embeddings": True}, {"vocab_size": 500}])
def test_matches_measure_flops_on_meta_model(mode, overrides):
    config = LlamaConfig.from_name("debug", n_layer=4, sharing_mode=mode, **overrides)
    with torch.device("meta"):
        model = Llama(config)
    batch, seq_len = 3, 32
    x = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    for n_shared in range(config.n_layer):
        model.set_shared_layers(range(config.n_layer - n_shared, config.n_layer))
        measured = measure_flops(model, lambda: model(x), lambda y: y.sum())
        assert measured == batch * estimate_flops(config, n_shared, seq_len), n_shared
    if mode == "qk":  # sharing layers that reuse the source's attention probabilities compute PV alone
        model.attention_reuse = True
        for n_shared in range(config.n_layer):
            model.set_shared_layers(range(config.n_layer - n_shared, config.n_layer))
            measured = measure_flops(model, lambda: model(x), lambda y: y.sum())
            assert measured == batch * estimate_flops(config, n_shared, seq_len, attention_reuse=True), n_shared


def test_flop_cut_and_bounds():
    config = LlamaConfig.from_name("llama-125m")
    assert flop_cut(config, 0, 2048) == 0.0
    assert 0.04 < flop_cut(config, 6, 2048) < 0.06
    with pytest.raises(ValueError, match="n_shared"):
        estimate_flops(config, 12, 2048)


def test_flops_refuse_a_region_or_length_no_model_has():
    """estimate_flops(config, 0.5, 8) counted half a layer, a negative seq_len gave negative FLOPs and flop_cut at
    seq_len 0 was a ZeroDivisionError; 1.5 layers of a 2-layer model were 'not in [0, n_layer - 1 = 1]'."""
    config = LlamaConfig.from_name("debug")  # 2 layers
    for n_shared in (0.5, 1.5, 2, -1):
        with pytest.raises(ConfigError, match=rf"n_shared={n_shared} is not a whole number of layers in 0\.\.1 — "):
            estimate_flops(config, n_shared, 8)
    for seq_len in (0, -5):
        with pytest.raises(ConfigError, match=rf"seq_len={seq_len} must be at least 1 token — seq_len"):
            flop_cut(config, 1, seq_len)
    for seq_len in ("2048", None):  # a TypeError comparing str (or None) and int
        with pytest.raises(
            ConfigError,
            match=rf"^seq_len must be a number of tokens, got {seq_len!r} — seq_len — pass an int, e.g. 2048$",
        ):
            estimate_flops(config, 1, seq_len)
