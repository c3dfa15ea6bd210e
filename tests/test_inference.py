"""KV-cache decoding and attention-probability reuse are the same model as the plain forward."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from epas_lightning.errors import ConfigError, DataError
from epas_lightning.inference import deepest_layers, generate, sample, set_region
from epas_lightning.inference.generate import Decoder
from epas_lightning.inference.sampling import filtered_logits
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.region import TrainedRegion


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    cfg = dict(name="debug", n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=256, block_size=64)
    cfg.update(overrides)
    return Llama(LlamaConfig(**cfg)).eval()


def tokens(B: int = 2, T: int = 24, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("region", [[3], [2, 3], [1, 2, 3], [2, 3, 1]])
def test_attention_reuse_matches_recompute_logits_and_gradients(region):
    model = tiny()
    model.set_shared_layers(region)
    x = tokens()
    grads = {}
    for reuse in (False, True):
        model.zero_grad(set_to_none=True)
        model.attention_reuse = reuse
        logits = model(x)
        logits.logsumexp(-1).mean().backward()
        grads[reuse] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_grads), (out, out_grads) = grads[False], grads[True]
    # fp32: the two paths differ only in summation order (SDPA kernel vs explicit softmax).
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert out_grads.keys() == ref_grads.keys()  # sharing layers' q/k still get no gradient
    for name, grad in ref_grads.items():
        torch.testing.assert_close(out_grads[name], grad, atol=2e-5, rtol=1e-3, msg=name)


def test_attention_reuse_source_receives_every_sharing_layers_gradient():
    model = tiny()
    model.set_shared_layers([2, 3])
    model.attention_reuse = True
    model(tokens()).logsumexp(-1).mean().backward()
    with_flow = model.layers[1].self_attn.q_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.set_shared_layers([])  # layer 1 alone: its q_proj gradient must differ from the shared case
    model(tokens()).logsumexp(-1).mean().backward()
    assert not torch.allclose(with_flow, model.layers[1].self_attn.q_proj.weight.grad)


def test_attention_reuse_needs_qk_mode():
    with pytest.raises(ValueError, match="sharing_mode='qk'"):
        tiny(sharing_mode="kv").attention_reuse = True


def test_activations_past_float16s_range_are_a_one_line_error_not_nan_or_a_sampling_traceback():
    """Finite float16 weights whose activations overflow (a final norm scaled past 65504 / |x|): sampling died in
    torch.multinomial with a traceback, greedy decoding gave garbage silently and the held-out loss was nan."""
    from epas_lightning.evaluation import score_continuations
    from epas_lightning.evaluation.perplexity import perplexity_of_batches

    model = tiny(n_layer=2, block_size=16)
    model.norm.weight.data.fill_(3e4)
    model.half()
    says = "came out NaN or inf: the activations overflow float16; .* — --dtype float16 — use --dtype bfloat16 or"
    for temperature in (0.0, 1.0):
        with pytest.raises(ConfigError, match="the logits " + says):
            generate(model, [[1, 2, 3], [4]], max_new_tokens=3, temperature=temperature, seed=0)
    with pytest.raises(ConfigError, match="the held-out loss " + says):
        perplexity_of_batches(model, [tokens(2, 9)])
    with pytest.raises(ConfigError, match="the log-probabilities " + says):
        score_continuations(model, [([1, 2], [3])])


def test_an_overflow_at_the_float16_that_dtype_auto_chose_says_auto_chose_it(monkeypatch):
    """On a GPU without native bfloat16, --dtype auto runs float16: its overflow named `--dtype float16`, which the
    user never typed, so "use --dtype bfloat16 or float32" read as a correction of a flag they had not given."""
    from epas_lightning import runtime
    from epas_lightning.evaluation.perplexity import perplexity_of_batches

    monkeypatch.setattr(runtime, "has_native_bf16", lambda device: False)  # a V100 or T4, simulated
    model = tiny(n_layer=2, block_size=16)
    model.norm.weight.data.fill_(3e4)
    model.half()
    gpu = torch.device("cuda")  # only resolved, never used
    assert runtime.resolve_dtype("auto", gpu) == torch.float16
    says = "float16 (what --dtype auto chose on this GPU) holds at most 65504 — --dtype auto — use --dtype bfloat16 or"
    with pytest.raises(ConfigError, match=r"the activations overflow float16; " + re.escape(says)):
        perplexity_of_batches(model, [tokens(2, 9)])
    assert runtime.resolve_dtype("float16", gpu) == torch.float16  # typed: named as typed
    with pytest.raises(ConfigError, match="; float16 holds at most 65504 — --dtype float16 — use --dtype bfloat16"):
        perplexity_of_batches(model, [tokens(2, 9)])


@pytest.mark.parametrize("mode,reuse", [("qk", False), ("qk", True), ("kv", False)])
@pytest.mark.parametrize("n_shared", [0, 1, 3])
def test_incremental_decoding_equals_full_forward(mode, reuse, n_shared):
    model = tiny(sharing_mode=mode)
    set_region(model, n_shared)
    model.attention_reuse = reuse
    x = tokens(T=20)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        pieces = [model(x[:, :8], cache), model(x[:, 8:13], cache)]  # prefill, then a chunk
        pieces += [model(x[:, t : t + 1], cache) for t in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_kv_cache_decoding_applies_llama3_rope_scaling():
    """Prefill, one-token steps and the static (CUDA-graph) steps rotate by the scaled frequencies of the forward."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    model = tiny(rope_scaling={**scaling, "original_max_position_embeddings": 16})
    set_region(model, 1)
    x = tokens(T=40)
    with torch.no_grad():
        full = model(x)
        for static in (False, True):
            cache = model.new_cache(2, 40, static=static)
            pieces = [model(x[:, :30], cache)] + [model(x[:, t : t + 1], cache) for t in range(30, 40)]
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)
        unscaled = Llama(replace(model.config, rope_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        assert (unscaled.eval()(x) - full)[:, 30:].abs().max() > 1e-3  # the scaling matters at these positions


@pytest.mark.parametrize("mode", ["qk", "kv"])
@pytest.mark.parametrize("n_shared", [0, 1, 2, 3])
def test_cache_size_is_the_analytic_saving(mode, n_shared):
    model = tiny(sharing_mode=mode)
    set_region(model, n_shared)
    cache = model.new_cache(2, 16)
    L = model.config.n_layer
    expected = n_shared / (2 * L) if mode == "qk" else n_shared / L  # qk: V kept; kv: nothing kept
    assert cache.nbytes == pytest.approx(cache.dense_nbytes() * (1 - expected))
    per_tensor = 2 * model.config.n_kv_head * 16 * model.config.head_dim * 4
    assert cache.dense_nbytes() == 2 * L * per_tensor


@pytest.mark.parametrize("reuse", [False, True])
def test_left_padded_batch_equals_each_prompt_alone(reuse):
    model = tiny()
    set_region(model, 2)
    model.attention_reuse = reuse
    prompts = [tokens(1, 11, seed=3)[0].tolist(), tokens(1, 5, seed=4)[0].tolist(), tokens(1, 8, seed=5)[0].tolist()]
    batched = generate(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, batched.tokens, strict=True):
        assert got == generate(model, [prompt], max_new_tokens=6).tokens[0]


@pytest.mark.parametrize("reuse", [False, True])
def test_rows_leaving_the_batch_change_nothing_for_the_others(reuse):
    """``Decoder.keep_rows`` mid-decoding (dropping, reordering): each row kept goes on exactly as alone."""
    model = tiny()
    set_region(model, 2)
    model.attention_reuse = reuse
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (11, 5, 11, 8)]  # rows 0 and 2 are the longest
    alone = [generate(model, [prompt], max_new_tokens=9).tokens[0] for prompt in prompts]
    keep = {2: [1, 2, 3], 4: [2, 1], 6: [1]}  # after that many tokens: the rows kept, as indices of the batch then
    rows, out = list(range(4)), [[] for _ in prompts]
    with torch.inference_mode():
        decoder = Decoder(model, prompts, 9)
        token = decoder.prefill()
        for n in range(1, 10):
            for row, t in zip(rows, token.tolist(), strict=True):
                out[row].append(t)
            if n in keep:
                decoder.keep_rows(keep[n])
                rows, token = [rows[i] for i in keep[n]], token[keep[n]]
                assert decoder.batch_size == len(rows) and decoder.cache.nbytes == model.new_cache(len(rows), 20).nbytes
            if n < 9:
                token = decoder.step(token)
    assert rows == [2] and not decoder.cache.padded  # only a longest prompt is left: no padding, as alone
    assert [len(o) for o in out] == [2, 4, 9, 6]
    for got, expected in zip(out, alone, strict=True):
        assert got == expected[: len(got)]
    with pytest.raises(NotImplementedError, match="cuda_graph=False"):
        model.new_cache(2, 16, static=True).keep_rows([0])


def full_forward_greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1, : model.config.vocab_size].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("n_shared", [0, 2, 3])
def test_greedy_generation_equals_repeated_full_forwards(n_shared):
    model = tiny()
    set_region(model, n_shared)
    model.attention_reuse = True
    prompt = tokens(1, 7)[0].tolist()
    result = generate(model, [prompt], max_new_tokens=10)
    assert result.tokens[0] == full_forward_greedy(model, prompt, 10)
    assert result.decode_steps == 9 and result.prompt_tokens == 7
    assert result.cache_bytes == model.new_cache(1, 17).nbytes
    prompts = [prompt, tokens(1, 3, seed=2)[0].tolist(), tokens(1, 5, seed=3)[0].tolist()]  # left-padded to 7
    batched = generate(model, prompts, max_new_tokens=10).tokens
    assert batched == [full_forward_greedy(model, p, 10) for p in prompts]


def test_generation_stops_after_eos_and_sampling_is_seeded():
    model = tiny()
    prompt = tokens(1, 5)[0].tolist()
    greedy = generate(model, [prompt], max_new_tokens=12).tokens[0]
    eos = greedy[3]
    stopped = generate(model, [prompt, prompt], max_new_tokens=12, eos_id=eos).tokens
    assert stopped[0] == greedy[: greedy.index(eos) + 1] and stopped[1] == stopped[0]
    for same in (torch.tensor(eos), [torch.tensor(eos)], {eos}):  # a tensor (or numpy) id; a set was refused
        assert generate(model, [prompt], max_new_tokens=12, eos_id=same).tokens[0] == stopped[0]
    with pytest.raises(ConfigError, match=r"eos_id must be token ids in 0\.\.\d+, got \[100000\] — eos_id"):
        generate(model, [prompt], max_new_tokens=12, eos_id=[eos, 100_000])  # was taken: no row could stop on it
    a = generate(model, [prompt], 12, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    b = generate(model, [prompt], 12, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    assert a == b
    assert generate(model, [prompt], 12, temperature=0.7, top_k=1, seed=3).tokens[0] == greedy


def test_generate_emits_no_id_at_or_past_vocab_size_and_keeps_greedy_tokens_below_it():
    """``vocab_size`` (a tokenizer smaller than the model's vocabulary): no id at or past it is emitted, greedy or
    sampled; greedy rows whose tokens all lie below it are unchanged. A value the model cannot honour is refused."""
    model = tiny(n_layer=2, vocab_size=64, block_size=32)
    prompts = [tokens(1, 5, vocab=64, seed=seed)[0].tolist() for seed in range(8)]
    free = generate(model, prompts, 8).tokens
    limit = 40
    assert any(max(row) >= limit for row in free) and any(max(row) < limit for row in free)  # both kinds of row
    cut = generate(model, prompts, 8, vocab_size=limit).tokens
    assert max(map(max, cut)) < limit
    assert [c for c, f in zip(cut, free, strict=True) if max(f) < limit] == [f for f in free if max(f) < limit]
    sampled = generate(model, prompts, 8, temperature=2.0, seed=1, vocab_size=limit).tokens
    assert max(map(max, sampled)) < limit
    for bad in (0, 65, 2.5, True):
        with pytest.raises(ConfigError, match=rf"^vocab_size must be a whole number in 1\.\.64 .*, got {bad!r} — "):
            generate(model, prompts, 1, vocab_size=bad)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits.expand(400, -1), 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # p(0)=0.70, p(1)=0.26: top_p=0.5 keeps only token 0, top_p=0.9 keeps tokens 0 and 1
    assert set(sample(logits.expand(400, -1), 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample(logits.expand(400, -1), 1.0, top_p=0.9, generator=g).tolist()) == {0, 1}
    # top_p 0 keeps the most likely token alone (greedy, as serve's OpenAI top_p 0): it was refused here
    assert set(sample(logits.expand(400, -1), 1.0, top_k=3, top_p=0.0, generator=g).tolist()) == {0}
    with pytest.raises(ConfigError, match=r"^top_p must lie in \[0, 1\], got -0.1 — top_p — use a fraction, e.g"):
        sample(logits, 1.0, top_p=-0.1)  # what to do, too (the error carries it: commands name their flag instead)
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):  # was torch's multinomial error
        sample(logits, float("nan"))


def test_top_p_keeps_the_whole_nucleus_of_a_large_vocabulary():
    """The nucleus mass was summed from the most likely token down in float32: over 32k tokens it reached top_p early
    and the nucleus lost its tail (a few tokens here, hundreds of a 128k vocabulary at top_p 0.999). It is summed
    from the least likely up."""
    logits = torch.randn(4, 32_000, generator=torch.Generator().manual_seed(0)) * 3
    descending = logits.double().softmax(-1).sort(-1, descending=True).values
    for top_p in (0.9, 0.999):
        kept = torch.isfinite(filtered_logits(logits, 1.0, top_p=top_p)).sum(-1)
        exact = (descending.cumsum(-1) - descending < top_p).sum(-1)  # the tokens whose mass before is short of top_p
        assert kept.tolist() == exact.tolist(), top_p


def test_filtered_logits_are_transformers_warpers_ties_included():
    """Temperature, top-k (> the vocabulary too) and top-p as transformers' logits warpers filter the same logits; of
    tokens tied at the nucleus' edge the same ones are kept (they were the others)."""
    warpers = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for case in range(24):
        logits = (torch.randn(3, 20, generator=g) * 4).round() / 2  # many ties
        temperature, top_k, top_p = (0.7, 1.5)[case % 2], (None, 3, 25)[case % 3], (None, 1e-9, 0.5, 0.9)[case % 4]
        theirs = warpers.TemperatureLogitsWarper(temperature)(None, logits.clone())
        theirs = theirs if top_k is None else warpers.TopKLogitsWarper(top_k)(None, theirs)
        theirs = theirs if top_p is None else warpers.TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(filtered_logits(logits, temperature, top_k, top_p), theirs), (temperature, top_k, top_p)


def test_tiny_temperatures_and_top_p_sample_the_top_token():
    """A temperature or top_p that underflows float32 sampled from NaN probabilities (a RuntimeError)."""
    logits = torch.tensor([[40.0, 30.0, 10.0, 0.0, -10.0]])
    for temperature, top_p in ((1e-45, None), (5e-324, None), (1e-37, None), (1.0, 1e-300)):
        assert sample(logits, temperature, top_p=top_p).tolist() == [0], (temperature, top_p)


def test_region_errors():
    model = tiny()
    assert deepest_layers(4, 2) == [2, 3]
    trained = TrainedRegion(4, (3,))
    with pytest.raises(ValueError, match="trained with at most 1 .* — n_shared — choose 0..1, or pass force=True to"):
        set_region(model, 2, trained)  # from Python: its arguments, not the commands' --sharing-layers and --force
    assert set_region(model, 2, trained, force=True) == [3, 2]  # in growth order
    dense = r"trained dense \(no sharing layers\); 1 was asked for — n_shared — choose 0, or"
    with pytest.raises(ValueError, match=dense):
        set_region(model, 1, TrainedRegion(4, ()))
    with pytest.raises(ValueError, match="can share at most 3 — n_shared — choose 0..3"):
        set_region(model, 4)  # no trained region given: any layer count the model allows
    with pytest.raises(ConfigError, match=r"number of sharing layers, got 'all' — n_shared — choose 0..1 \(1: the"):
        set_region(model, "all", trained)  # a TypeError comparing int and str
    with pytest.raises(ConfigError, match=r"number of sharing layers, got 1.0 — n_shared — choose 0..3$"):
        set_region(model, 1.0)  # a model built here: any layer count it allows (offered "choose 0 (0: the whole ...")
    with pytest.raises(ConfigError, match=r"^region must be a TrainedRegion, not a list — region — pass load_model"):
        set_region(model, 1, [3, 2])  # an AttributeError: 'list' object has no attribute 'first'
    shallow = TrainedRegion(4, (1, 2), "shallow_first")
    assert set_region(model, 1, shallow) == [1] and set_region(model, 3, shallow, force=True) == [1, 2, 3]
    ends = r"the region of this checkpoint \(layers \[2, 1\], deep-first\) grows no further than layer 1 \(layer 0 "
    with pytest.raises(ConfigError, match=ends + r"never shares\): at most 2 — n_shared — choose 0..2$"):
        set_region(model, 3, TrainedRegion(4, (2, 1)), force=True)  # said 'a 4-layer model can share at most 2'
    stock = TrainedRegion(4, unrun=TrainedRegion(4, (2, 1)))  # a stock export: it said 'region of this checkpoint
    ends = r"the region its weights trained \(layers \[2, 1\], deep-first\) grows no further than layer 1 \(layer 0 "
    with pytest.raises(ConfigError, match=ends + r"never shares\): at most 2 \(it runs dense\) — n_shared"):
        set_region(model, 3, stock)  # (dense, no sharing layers) grows no further ... (it trained 0)'
    cache = model.new_cache(1, 8)
    model.set_shared_layers([3])
    with pytest.raises(ValueError, match="build a new cache"):
        model(tokens(1, 2), cache)
    with pytest.raises(ValueError, match=r"^The KV cache holds 2 rows, but input_ids has 1: build the cache with"):
        model(tokens(1, 2), model.new_cache(2, 8))  # a RuntimeError from a reshape deep in attention
    with pytest.raises(ValueError, match="context length"):
        generate(model, [[1] * 60], max_new_tokens=10)


def test_set_region_of_a_loaded_model_counts_in_the_region_it_trained(tmp_path):
    """``set_region(loaded.model, n)`` without ``region=`` took the deepest n layers: layer 3 for n = 1 of a
    shallow-first checkpoint that trained [1, 2]. A loaded model knows its region; a model built here shares deep."""
    from model_dirs import save_consolidated

    from epas_lightning import load_model

    model = tiny()
    model.set_shared_layers([1, 2])  # recorded as shallow-first: it does not hold the last layer
    loaded = load_model(save_consolidated(model, tmp_path / "shallow"))
    assert set_region(loaded.model, 1) == [1] and loaded.model.sharing.shared_layers == [1]
    with pytest.raises(ConfigError, match=r"at most 2 sharing layers \(layers \[1, 2\], shallow-first\); 3 were"):
        set_region(loaded.model, 3)
    assert set_region(loaded.model, 3, force=True) == [1, 2, 3]
    assert set_region(tiny(), 1) == [3]


def test_generate_refuses_a_bad_request_with_the_commands_one_line_errors():
    """From Python as from `generate`: a user error (ConfigError/DataError, still a ValueError), what — where — fix,
    where is the Python argument (it named the command's --max-new-tokens and --prompt, which nobody typed)."""
    model = tiny(n_layer=2, block_size=16)
    with pytest.raises(ConfigError, match="context length 16 — max_new_tokens — ask for at most 6"):
        generate(model, [[1] * 10], max_new_tokens=7)
    with pytest.raises(ConfigError, match="no room left in the model's context length 16 — prompts — "):
        generate(model, [[1] * 16], max_new_tokens=1)
    with pytest.raises(
        ConfigError, match="max_new_tokens must be a whole number >= 1, got 0 — max_new_tokens — pass 1 or more$"
    ):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(DataError, match=r"token ids must lie in 0\.\.255 .*, got -1\.\.300 — prompts — "):
        generate(model, [[1, 300], [-1]], max_new_tokens=1)


def test_generate_refuses_arguments_of_the_wrong_type_before_it_runs_and_keeps_the_models_mode():
    """From a notebook: ``max_new_tokens=None`` or ``"3"``, ``top_k=2.5``, ``temperature="1"`` or ``seed="3"`` were
    TypeErrors from inside torch or a comparison; a bad ``top_p`` failed after the prefill and left a train-mode model
    in eval mode; a model on the meta device failed in ``Tensor.item()``."""
    import numpy as np

    model = tiny(n_layer=2, block_size=16).train()
    bad = [
        (
            dict(max_new_tokens=None),
            "max_new_tokens must be a whole number >= 1, got None — max_new_tokens — pass 1 or more",
        ),
        (
            dict(max_new_tokens="3"),
            "max_new_tokens must be a whole number >= 1, got '3' — max_new_tokens — pass 1 or more",
        ),
        (
            dict(top_k=2.5, temperature=1.0),
            r"top_k must be a whole number, got 2.5 — top_k — use 1 or more \(1 is greedy\), or leave it unset to "
            "sample from every token",
        ),
        (
            dict(temperature="1"),
            "temperature must be a number, got '1' — temperature — use 0 \\(greedy\\) or more; 1 samples from the "
            "model's distribution",
        ),
        (
            dict(temperature=1.0, top_p=3.0),
            r"top_p must lie in \[0, 1\], got 3.0 — top_p — use a fraction, e.g. 0.9 \(0 is greedy\), or leave it "
            "unset for no nucleus cut",
        ),
        (dict(temperature=1.0, seed="3"), "seed must be a whole number, got '3' — seed — pass an int, or None"),
        (  # a ValueError from the capture, after the prefill ("off", the command's word, turned graphs on)
            dict(cuda_graph=True),
            "cuda_graph=True needs a model on a CUDA device, not cpu — cuda_graph — leave it None \\(on for CUDA\\) "
            "or pass False",
        ),
        (
            dict(cuda_graph="off"),
            "cuda_graph must be True, False or None, got 'off' — cuda_graph — leave it None \\(on for CUDA\\) or "
            "pass False",
        ),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            generate(model, [[1, 2]], **{"max_new_tokens": 2, **kwargs})
        assert model.training, kwargs
    assert len(generate(model, [[1, 2]], np.int64(3)).tokens[0]) == 3 and model.training
    numbers = dict(temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9), seed=1)
    as_tensors = {key: torch.tensor(value) for key, value in numbers.items()}  # 0-d tensors ran before the checks
    sampled = generate(model, [[1, 2]], 3, **numbers).tokens
    assert generate(model, [[1, 2]], torch.tensor(3), **as_tensors).tokens == sampled
    with torch.device("meta"):
        meta = Llama(model.config)
    with pytest.raises(ConfigError, match="^model is on the meta device: its weights hold no values — model — load"):
        generate(meta, [[1]], 1)


def test_a_loaded_model_or_a_module_given_for_the_llama_says_which_attribute_to_pass():
    """``generate(load_model(path), ...)`` (and ``set_region``, ``evaluate_perplexity``, or an ``EPASModule``) failed
    deep inside with "'LoadedModel' object has no attribute 'embed_tokens'"."""
    from epas_lightning import EPASModule, LoadedModel, evaluate_perplexity

    model = tiny(n_layer=2, block_size=16)
    loaded = LoadedModel(config=model.config, region=TrainedRegion(2, (1,)), model=model)
    module = EPASModule(model.config)
    module.model = model
    calls = {
        "generate": lambda m: generate(m, [[1]], 1),
        "set_region": lambda m: set_region(m, 1),
        "evaluate_perplexity": lambda m: evaluate_perplexity(m, None),
    }
    for call in calls.values():
        with pytest.raises(
            ConfigError, match=r"^model must be a Llama, not a LoadedModel — model — pass its \.model \(and"
        ):
            call(loaded)
        with pytest.raises(ConfigError, match=r"^model must be a Llama, not a EPASModule — model — pass its \.model$"):
            call(module)
    assert generate(torch.compile(model, backend="eager"), [[1]], 1).tokens == generate(model, [[1]], 1).tokens


def test_generate_takes_a_numpy_seed():
    """``seed=np.int64(0)`` (a sweep's) failed in torch's ``manual_seed`` with "an integer is required"."""
    import numpy as np

    model = tiny(n_layer=2, block_size=16)
    sampled = generate(model, [[1]], max_new_tokens=3, temperature=1.0, seed=0).tokens
    assert generate(model, [[1]], max_new_tokens=3, temperature=1.0, seed=np.int64(0)).tokens == sampled
    assert generate(model, [[1]], 1, temperature=1.0, seed=2**63).tokens  # serve's 2nd choice of seed 2**63 - 1
    with pytest.raises(
        ConfigError,
        match=r"^seed must lie in -2\*\*63\.\.2\*\*64-1, got 18446744073709551616 — seed — give a seed in that range$",
    ):
        generate(model, [[1]], 1, temperature=1.0, seed=2**64)


def test_generate_takes_a_tensor_of_prompts_and_explains_prompts_that_are_not_token_lists():
    """A (B, T) tensor (what a tokenizer returns) failed with "Boolean value of Tensor ... is ambiguous"; one prompt
    as a flat list or text failed deep inside with a TypeError, a pad_id outside the vocabulary with an IndexError."""
    model = tiny(n_layer=2, block_size=16)
    prompts = tokens(2, 3)
    assert generate(model, prompts, 2).tokens == generate(model, prompts.tolist(), 2).tokens
    for bad in ([1, 2, 3], ["some text"]):
        with pytest.raises(DataError, match=r"each a list of token ids .*wrap one prompt as \[ids\]"):
            generate(model, bad, 2)
    with pytest.raises(ConfigError, match=r"pad_id must be a token id in 0\.\.255, got -1 — pad_id"):
        generate(model, [[1, 2], [3]], 2, pad_id=-1)  # sentencepiece's "no pad" id: an IndexError in the embedding


@pytest.mark.parametrize("mode,reuse", [("qk", False), ("qk", True), ("kv", False)])
def test_static_decode_steps_equal_the_dynamic_ones(mode, reuse):
    """The fixed-shape step a CUDA graph captures (all slots, masked; device-side positions) changes nothing."""
    model = tiny(sharing_mode=mode)
    set_region(model, 2)
    model.attention_reuse = reuse
    prompts = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    steps = tokens(2, 6, seed=9)
    outs = {}
    with torch.no_grad():
        for static in (False, True):
            cache = model.new_cache(2, 16, static=static)
            model(prompts, cache, mask)
            outs[static] = torch.cat([model(steps[:, t : t + 1], cache) for t in range(6)], dim=1)
            assert cache.length == (5 if static else 11)  # a static step's length is the graph runner's to count
            assert not static or int(cache.index) == 11
    torch.testing.assert_close(outs[True], outs[False], atol=2e-5, rtol=1e-4)


def test_a_padded_one_token_step_of_a_static_cache_is_refused_not_attending_to_the_pads():
    """A static one-token step ignored ``attention_mask``: a left-padded prompt fed token by token attended to its
    pads and rotated by their positions, silently other logits than the dynamic cache's."""
    model = tiny()
    set_region(model, 2)
    prompts, mask = torch.tensor([[0, 5, 6], [1, 2, 3]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        cache = model.new_cache(2, 8, static=True)
        with pytest.raises(ValueError, match="one-token steps take no padding"):
            model(prompts[:, :1], cache, mask[:, :1])
        model(prompts[:, :1], model.new_cache(2, 8, static=True), torch.ones(2, 1, dtype=torch.long))  # no pads: fine


def test_a_static_cache_refuses_a_chunk_after_one_token_steps_instead_of_overwriting_them():
    """One-token static steps leave the host-side ``length`` to the graph runner: a later chunk of several tokens was
    written from that stale position, over the steps' keys and values, and silently gave other logits."""
    model = tiny()
    set_region(model, 2)
    x = tokens(2, 7)
    with torch.no_grad():
        cache = model.new_cache(2, 8, static=True)
        model(x[:, :4], cache)  # a chunk before the steps: fine
        model(x[:, 4:5], cache)
        with pytest.raises(ValueError, match="only before its one-token steps"):
            model(x[:, 5:7], cache)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reuse", [False, True])
def test_cuda_graph_generation_equals_eager(reuse):
    model = tiny().cuda()
    set_region(model, 2)
    model.attention_reuse = reuse
    prompts = [tokens(1, 9, seed=3)[0].tolist(), tokens(1, 4, seed=4)[0].tolist()]
    eager = generate(model, prompts, max_new_tokens=12, cuda_graph=False).tokens
    assert generate(model, prompts, max_new_tokens=12, cuda_graph=True).tokens == eager


def test_a_cuda_graph_is_captured_on_the_gpu_of_its_cache_not_the_current_one(monkeypatch):
    """With the model on cuda:1 and cuda:0 current (``generate --device cuda:1``), the capture stream was made on
    cuda:0: the model's kernels ran on cuda:1 outside the capture, the graph came out empty and every replayed decode
    step returned the same logits. Here on fakes of torch.cuda's streams and graphs: which device each belongs to."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from epas_lightning.inference.cuda_graph import GraphedDecodeStep
    from epas_lightning.model.kv_cache import StaticKVCache

    current = [0]  # the current CUDA device's index
    captured_on = []

    class Stream:
        def __init__(self, device=None):
            self.device = current[0] if device is None else torch.device(device).index

        def wait_stream(self, other):
            pass

    @contextmanager
    def switched_to(index):
        before, current[0] = current[0], index
        yield
        current[0] = before

    class Graph:  # torch.cuda.graph: captures on `stream`, else on a default stream made on the current device
        def __init__(self, cuda_graph, pool=None, stream=None, **kwargs):
            self.stream = stream or Stream()

        def __enter__(self):
            captured_on.append(self.stream.device)
            self.switch = switched_to(self.stream.device)
            self.switch.__enter__()

        def __exit__(self, *exc):
            self.switch.__exit__(*exc)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: switched_to(stream.device))
    monkeypatch.setattr(torch.cuda, "device", lambda device: switched_to(torch.device(device).index))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    cache = object.__new__(StaticKVCache)  # its tensors stand on the CPU; its device is cuda:1
    cache.batch_size, cache.k, cache.index, cache.next_pos = 2, [torch.zeros(1)], torch.zeros(1), torch.zeros(2)
    cache.valid = SimpleNamespace(device=torch.device("cuda", 1))
    GraphedDecodeStep(lambda tokens, cache: torch.zeros(2, 1, 8), cache)
    assert captured_on == [1]


def test_blockwise_causal_probs_matmul_equals_the_dense_one():
    """Long sequences take the block-skipping P @ V; values and gradients equal the plain matmul."""
    from epas_lightning.model import attention

    torch.manual_seed(0)
    B, H_kv, G, T, D = 2, 2, 2, 3 * attention.CAUSAL_BLOCK + 5, 8
    scores = torch.randn(B, H_kv, G, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1).requires_grad_()
    v = torch.randn(B, H_kv, 1, T, D, requires_grad=True)
    out = attention.CausalProbsMatmul.apply(probs, v)
    ref = probs @ v
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (probs, v), g)
    want = torch.autograd.grad(ref, (probs, v), g)
    torch.testing.assert_close(got[1], want[1])
    lower = torch.ones(T, T, dtype=torch.bool).tril()  # the upper triangle of dP is multiplied by P = 0 downstream
    torch.testing.assert_close(got[0][..., lower], want[0][..., lower])


def test_attention_reuse_on_long_sequences_matches_recompute():
    model = tiny(block_size=320)
    model.set_shared_layers([2, 3])
    x = tokens(1, 300)
    results = []
    for reuse in (False, True):
        model.zero_grad(set_to_none=True)
        model.attention_reuse = reuse
        logits = model(x)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), model.layers[1].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=2e-5, rtol=1e-3)


def test_blockwise_causal_scores_equal_the_masked_dense_ones():
    from epas_lightning.model import attention

    torch.manual_seed(1)
    B, H_kv, G, T, D = 1, 2, 2, 2 * attention.CAUSAL_BLOCK + 7, 8
    q = torch.randn(B, H_kv, G, T, D, requires_grad=True)
    k = torch.randn(B, H_kv, 1, T, D, requires_grad=True)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = attention.CausalScores.apply(q, k).softmax(-1)
    ref = (q @ k.transpose(-2, -1)).masked_fill(upper, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, ref)
    g = torch.randn_like(probs)
    for got, want in zip(torch.autograd.grad(probs, (q, k), g), torch.autograd.grad(ref, (q, k), g), strict=True):
        torch.testing.assert_close(got, want)


HOST_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor}


class HostMadeTensors(torch.overrides.TorchFunctionMode):
    """Records the factory calls that name no device: on CUDA each makes a host tensor whose use on the GPU is a
    blocking copy, i.e. a device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in HOST_FACTORIES and kwargs.get("device") is None:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_padded_batch_decodes_without_tensors_made_on_the_host(temperature):
    """A padded batch's cache made its mask indices with ``torch.arange`` on the host: on CUDA every padded prefill
    and decode step copied them over, a blocking copy (a device sync) per step."""
    model = tiny()
    model.set_shared_layers([2, 3])
    with torch.inference_mode():
        decoder = Decoder(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 5, temperature=temperature, top_k=5, top_p=0.9, seed=1)
        with HostMadeTensors() as made:
            token = decoder.prefill()
            for _ in range(3):
                token = decoder.step(token)
    assert made.calls == []
