"""Redundancy analysis: similarity measures, activation capture, the region advice and `analyze` end to end."""

import json
from pathlib import Path

import pytest
import torch
from helpers import cpu_trainer, without_heldout_sequences
from model_dirs import save_consolidated
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from epas_lightning import EPASModule, Llama, LlamaConfig, ProgressiveSharing, TokenDataModule
from epas_lightning.analysis import analyze_model, capture_activations, linear_cka, mean_cosine, similarity_matrix
from epas_lightning.cli import main as cli_main
from epas_lightning.errors import ConfigError, DataError


def naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC with the centring matrix, straight from the definition (biased estimator)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(gram_x, gram_y) / (hsic(gram_x, gram_x) * hsic(gram_y, gram_y)).sqrt())


# --- similarity measures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, p, q", [(200, 8, 5), (6, 30, 40)])  # feature-space form and Gram form
def test_cka_matches_the_definition_and_is_one_for_identical_inputs(n, p, q):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y), rel=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling_but_not_to_any_linear_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 16, generator=g, dtype=torch.float64) + 0.5 * torch.randn_like(x)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ rotation, 7.5 * y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x + 3.0, y - 1.0) == pytest.approx(base, rel=1e-9)  # centring removes offsets
    stretch = torch.diag(torch.logspace(-2, 2, 16, dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - base) > 0.05  # anisotropic scaling does change it


def test_independent_random_activations_are_dissimilar():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    assert linear_cka(x, y) < 0.02
    assert abs(mean_cosine(x, y)) < 0.05
    assert mean_cosine(x, x) == pytest.approx(1.0) and mean_cosine(x, -2 * x) == pytest.approx(-1.0)


def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(100, 6, generator=g)
    feats = [base, base * 2, torch.randn(100, 6, generator=g)]
    for measure in ("cosine", "cka"):
        m = similarity_matrix(feats, measure)
        assert torch.equal(m, m.T) and torch.all(m.diagonal() == 1)
        assert m[0, 1] == pytest.approx(1.0) and m[0, 2] < 0.5
    with pytest.raises(ValueError, match="cosine' or 'cka"):
        similarity_matrix(feats, "l2")


# --- capture -----------------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(
        **{
            "name": "debug",
            "n_layer": 4,
            "n_embd": 32,
            "n_head": 4,
            "n_kv_head": 2,
            "vocab_size": 128,
            "block_size": 16,
            **overrides,
        }
    )


def test_capture_shapes_causal_probabilities_and_agreement_with_the_model():
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    model.set_shared_layers([2, 3])
    ids = torch.randint(0, 128, (2, 16))
    seen: dict[int, tuple] = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out[0])))
        for i, layer in enumerate(model.layers)
    ]
    model.set_shared_layers([])
    model(ids)  # reference: the model's own attention inputs and outputs in compute mode
    for hook in hooks:
        hook.remove()
    model.set_shared_layers([2, 3])
    acts = capture_activations(model, [ids[:1], ids[1:]])
    assert model.sharing.shared_layers == [2, 3]  # the mask is restored
    assert acts.n_layer == 4 and acts.n_tokens == 32
    for i, layer in enumerate(model.layers):
        q, k, p = acts.q[i], acts.k[i], acts.attn[i]
        assert q.shape == (2, 4, 16, 8) and k.shape == (2, 2, 16, 8) and p.shape == (2, 4, 16, 16)
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, 16), atol=1e-6)
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        assert torch.all(p[..., ~causal] == 0) and torch.all(p[..., causal] > 0)
        x, out = seen[i]
        v = layer.self_attn.v_proj(x).view(2, 16, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        rebuilt = layer.self_attn.o_proj((p @ v).transpose(1, 2).reshape(2, 16, 32))
        torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)  # captured Q/K/probs are the model's


def planted_model(source: int = 1, projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"), **config) -> Llama:
    """Layers after ``source`` see the same input as ``source`` (the layers in between write nothing into the
    residual stream) and carry its ``projections``' weights: those projections equal the source's exactly (with q and
    k, its attention maps too)."""
    torch.manual_seed(0)
    model = Llama(tiny_config(init_std=0.3, **config)).eval()  # large enough weights for peaked, distinct attention
    layers = model.layers
    with torch.no_grad():
        for layer in layers[source:-1]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for layer in layers[source + 1 :]:
            for name in projections:
                getattr(layer.self_attn, name).weight.copy_(getattr(layers[source].self_attn, name).weight)
            layer.input_layernorm.weight.copy_(layers[source].input_layernorm.weight)
    return model


def test_identical_qk_give_similarity_one_and_the_planted_region_is_recommended():
    model = planted_model(source=1)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    report = analyze_model(model, [ids[:4], ids[4:]])
    for metric, matrix in report.matrices.items():
        for i in (2, 3):
            assert matrix[i, 1] == pytest.approx(1.0, abs=1e-6), (metric, i)
    assert report.matrices["q/cka"][1, 0] < 0.9 and report.matrices["attn/cka"][1, 0] < 0.9
    rec = report.recommend("attn/cka", threshold=0.99, config=model.config)
    assert rec.meets_threshold and rec.start == 2 and rec.shared_layers == [2, 3] and rec.chosen.source == 1
    assert rec.chosen.flop_cut > 0 and "layers 2..3" in rec.reasoning
    assert "`sharing.target: 2` with `sharing.order: deep_first`" in rec.reasoning  # shallow_first: layers 1, 2
    strict = report.recommend("q/cka", threshold=1.5)  # nothing qualifies: the best region, flagged
    assert not strict.meets_threshold and "No region" in strict.reasoning
    assert strict.start == 2  # region 3..3 (source 2) and 2..3 (source 1) both score 1: the larger one wins


def test_a_kv_model_is_scored_by_the_k_and_v_its_sharing_layers_reuse():
    """A kv-mode sharing layer attends with its own Q over its source's K and V: its region was scored by attention
    maps (which its own Q makes) and said to reuse the source's Q/K, and V was not measured."""
    model = planted_model(source=1, projections=("k_proj", "v_proj"), sharing_mode="kv")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    report = analyze_model(model, [ids[:4], ids[4:]])
    for i in (2, 3):
        assert report.matrices["v/cka"][i, 1] == pytest.approx(1.0) and report.matrices["attn/cka"][i, 1] < 0.99
    rec = report.recommend(threshold=0.99, config=model.config)
    assert rec.metric == "kv/cka" and rec.meets_threshold and rec.shared_layers == [2, 3]
    assert "reuse the K/V of layer s-1" in rec.reasoning
    assert report.recommend(threshold=0.99, config=planted_model(source=1).config).metric == "attn/cka"  # qk mode


def test_analyze_model_refuses_token_ids_outside_the_vocabulary():
    model = Llama(tiny_config()).eval()
    good, bad = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 128]])
    with pytest.raises(DataError, match=r"token ids must lie in 0\.\.127 .*, got 1\.\.128 — batch 2 — "):
        analyze_model(model, [good, bad])
    shapes = [
        (good, r"shape \(4,\) of torch.int64"),
        ([good.float()], r"shape \(1, 4\) of torch.float32"),
        ([[1]], "list"),
    ]
    for batches, got in shapes:  # one tensor for the batches: an IndexError in the capture; float ids were truncated
        with pytest.raises(
            DataError, match=rf"^a batch must be a \(batch, seq_len\) tensor of token ids, got {got} — "
        ):
            analyze_model(model, batches)
    with pytest.raises(DataError, match=r"^batch 2 holds sequences of 3 tokens, batch 1 of 4 — batch 2 — "):
        analyze_model(model, [good, torch.zeros(2, 3, dtype=torch.long)])  # a RuntimeError of torch.cat, at the end
    with pytest.raises(ConfigError, match="^model must be a Llama, not a object — model"):
        analyze_model(object(), [good])  # an AttributeError on parameters


def test_activations_that_overflowed_are_refused_not_scored():
    """A float16 model whose layer-1 queries overflow to inf: its NaN similarities ranked the regions and the largest
    was recommended, "lowest nan"."""
    model = Llama(tiny_config()).eval()
    with torch.no_grad():
        model.layers[1].self_attn.q_proj.weight.fill_(6e4)  # finite in float16; q = 6e4 * sum(x) is not
    with pytest.raises(ConfigError, match=r"^layer 1's q holds NaN or inf .*float16.* — .* — .*float32"):
        analyze_model(model.half(), [torch.randint(0, 128, (1, 8))])


# --- the command -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analysis_run")
    module = EPASModule(LlamaConfig(name="debug", block_size=32))
    data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=512)
    trainer = cpu_trainer(root, max_steps=2, callbacks=[ProgressiveSharing(target=1, interval=1)])
    trainer.fit(module, data)
    trainer.save_checkpoint(root / "tiny.ckpt")
    return root / "tiny.ckpt"


def test_analyze_command_writes_heatmap_json_and_tensorboard_image(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--batches", "2"]
    assert cli_main([*args, "--batch-size", "2", "--seq-len", "16", "--dtype", "bfloat16", "--json"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    line = json.loads(printed.splitlines()[-1])  # what it was measured on, for a script choosing a region
    assert (line["n_tokens"], line["too_few_tokens"], line["shared_layers"]) == (2 * 2 * 16, False, [1])
    assert str(tiny_corpus) in captured.err  # the data the checkpoint's tokenizer came from
    assert "note: only" not in captured.err  # 64 tokens, as many as the model's features
    assert "trained with layers [1] sharing" in printed  # the caveat for regions trained with sharing
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "similarity.json").read_text())
    assert set(record["matrices"]) == {f"{s}/{m}" for s in ("q", "k", "v", "attn") for m in ("cosine", "cka")}
    assert len(record["matrices"]["attn/cka"]) == 2 and record["n_tokens"] == 2 * 2 * 16
    assert record["dtype"] == "bfloat16"  # --dtype as generate, bench and evaluate take it
    assert record["recommendation"]["start_layer"] == 1 and record["recommendation"]["shared_layers"] == [1]
    meets = record["recommendation"]["meets_threshold"]  # a random 2-layer model: either, but said as recorded
    assert ("Recommendation: share layers 1..1" in printed, "No region keeps" in printed) == (meets, not meets)
    assert "`sharing.target: 1` with `sharing.order: deep_first`, the default (the deepest layer; " in printed
    events = EventAccumulator(str(out / "tb")).Reload()
    assert "analysis/similarity" in events.Tags()["images"]


def test_analyze_says_when_too_few_tokens_were_measured(tiny_checkpoint, tmp_path, capsys):
    """2 tokens made CKA 1 for every pair of layers: the recommendation (share them all) read as if measured."""
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(tmp_path / "a"),
        "--batches",
        "1",
        "--batch-size",
        "1",
    ]
    assert cli_main(["analyze", *args, "--seq-len", "2", "--json"]) == 0
    captured = capsys.readouterr()
    says = "note: only 2 tokens were measured, fewer than the model's 64 features: the similarities read high"
    assert says in captured.err
    assert json.loads(captured.out.splitlines()[-1])["too_few_tokens"] is True  # --json says so too


def test_analyze_reports_bad_inputs_before_work(tiny_checkpoint, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --output runs/analyze would go

    def fails(*argv: str) -> str:
        assert cli_main(["analyze", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
        return err

    assert "checkpoint does not exist" in fails("--checkpoint", str(tmp_path / "nope.ckpt"))
    assert "does not exist" in fails("--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "missing"))
    too_long = fails("--checkpoint", str(tiny_checkpoint), "--seq-len", "999")
    assert "exceeds the model's context length (32) — --seq-len — use at most 32" in too_long
    for short in ("1", "0"):  # 0 ran silently at the default length
        assert f"must be at least 2, got {short} — --seq-len — give 2" in fails(
            "--checkpoint", str(tiny_checkpoint), "--seq-len", short
        )
    unreachable = fails("--checkpoint", str(tiny_checkpoint), "--threshold", "1.5")  # recommended the closest region
    assert "similarities are at most 1 (cosine and CKA), so no region can meet 1.5 — --threshold" in unreachable
    empty = without_heldout_sequences(tiny_corpus, tmp_path / "empty")
    too_few = fails("--checkpoint", str(tiny_checkpoint), "--data", str(empty))  # after "analysing ..." it was
    assert too_few.startswith("error: the validation split holds no sequence of 33 tokens")  # a second line
    single = save_consolidated(Llama(LlamaConfig.from_name("debug", n_layer=1)), tmp_path / "one")
    one_layer = fails("--checkpoint", str(single), "--data", str(tiny_corpus))  # was a ValueError traceback
    assert "a 1-layer model has no layer that could share" in one_layer
    assert not (tmp_path / "runs").exists()


def test_analyze_seq_len_goes_up_to_the_context_length(tiny_checkpoint, tmp_path, capsys):
    """`analyze --seq-len` stopped at block_size while evaluate_perplexity runs up to the context length, longer
    after a continual run from a longer-context model (max_position_embeddings)."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["model_config"]["max_position_embeddings"] = 64  # block_size 32
    torch.save(checkpoint, tmp_path / "long.ckpt")
    out = tmp_path / "analysis"
    args = ["--checkpoint", str(tmp_path / "long.ckpt"), "--output", str(out), "--batches", "1", "--batch-size", "1"]
    assert cli_main(["analyze", *args, "--seq-len", "48"]) == 0, capsys.readouterr().err
    assert json.loads((out / "similarity.json").read_text())["seq_len"] == 48


def test_the_trained_region_note_names_the_weights_a_kv_region_stopped_training(tiny_checkpoint, tmp_path, capsys):
    """A kv-mode sharing layer still computes its Q: the note said its q/k weights stopped training, not its k/v."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["model_config"]["sharing_mode"] = "kv"
    torch.save(checkpoint, tmp_path / "kv.ckpt")
    args = ["--checkpoint", str(tmp_path / "kv.ckpt"), "--output", str(tmp_path / "a"), "--batches", "1"]
    assert cli_main(["analyze", *args, "--batch-size", "1", "--seq-len", "8"]) == 0
    assert "trained with layers [1] sharing; their own k/v weights stopped training" in capsys.readouterr().out
