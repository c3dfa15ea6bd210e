"""The model: plain LLaMA when nothing shares, exact sharing semantics, gradients and FLOPs when layers share."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_blocks_eagerly
from torch.utils.flop_counter import FlopCounterMode

from epas_lightning.errors import ConfigError
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.attention import Shared
from epas_lightning.model.rope import RotaryEmbedding, apply_rope


def tiny(n_layer: int = 4, **kw) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_name("debug", n_layer=n_layer, **kw))


def tokens(B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))


def reference_llama(model: Llama, input_ids: torch.Tensor) -> torch.Tensor:
    """A from-scratch LLaMA forward (explicit softmax attention, repeated KV heads) over the model's weights."""
    c = model.config
    B, T = input_ids.shape
    pos = torch.arange(T, dtype=torch.float32)
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
    ang = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)

    def rope(x):
        x1, x2 = x[..., : c.head_dim // 2], x[..., c.head_dim // 2 :]
        return x * ang.cos() + torch.cat((-x2, x1), dim=-1) * ang.sin()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = model.embed_tokens.weight[input_ids]
    for layer in model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q = rope((h @ a.q_proj.weight.T).view(B, T, c.n_head, c.head_dim).transpose(1, 2))
        k = rope((h @ a.k_proj.weight.T).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2))
        v = (h @ a.v_proj.weight.T).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, -1) @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_empty_region_is_plain_llama(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    x = tokens()
    torch.testing.assert_close(model(x), reference_llama(model, x), atol=1e-5, rtol=1e-4)


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny().parameters())


def capture_attention_inputs(model: Llama, input_ids: torch.Tensor) -> dict:
    """Run the model and record each attention's input (normed x), the pair it reused, its output and the pair
    it handed on."""
    seen = {}
    for i, layer in enumerate(model.layers):

        def hook(mod, args, out, i=i):
            reuse = args[2] if len(args) > 2 else None
            seen[i] = {"x": args[0], "reused": reuse, "out": out[0], "shared": out[1]}

        layer.self_attn.register_forward_hook(hook)
    model(input_ids)
    return seen


def test_qk_sharing_layer_attends_with_source_qk_and_own_v():
    model = tiny()
    model.set_shared_layers([2, 3])
    x = tokens()
    seen = capture_attention_inputs(model, x)
    c = model.config
    q_src, k_src = seen[1]["shared"].pair
    for i in (2, 3):
        attn = model.layers[i].self_attn
        B, T, _ = seen[i]["x"].shape
        v = attn.v_proj(seen[i]["x"]).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q_src, k_src, v, is_causal=True, enable_gqa=True)
        expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        torch.testing.assert_close(seen[i]["out"], expected)
        assert seen[i]["reused"].pair[0] is q_src and seen[i]["reused"].pair[1] is k_src
        assert seen[i]["shared"] is None  # a sharing layer hands nothing new on
    # the source pair is the post-RoPE projection of layer 1's own input
    cos, sin = model.rotary_emb(x.shape[1])
    B, T, _ = seen[1]["x"].shape
    q1 = model.layers[1].self_attn.q_proj(seen[1]["x"]).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
    torch.testing.assert_close(q_src, apply_rope(q1, cos, sin))


@pytest.mark.parametrize(
    "bias,biased", [("qkv", {"q_proj", "k_proj", "v_proj"}), ("qkvo", {"q_proj", "k_proj", "v_proj", "o_proj"})]
)
def test_attention_biases_start_at_zero_without_weight_decay(bias, biased):
    """Qwen2's q/k/v biases ('qkv') or HF LLaMA's on all four projections ('qkvo'): zero at init (nn.Linear's own
    init is random) and in the optimizer's group without weight decay, as norm gains are."""
    from epas_lightning.optim import param_groups

    model = tiny(attention_bias=bias)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert {n.split(".")[-2] for n in biases} == biased and len(biases) == 4 * len(biased)
    assert all(not p.any() for p in biases.values())
    no_decay = next(g["params"] for g in param_groups(model) if g.get("weight_decay") == 0.0)
    assert {id(p) for p in biases.values()} <= {id(p) for p in no_decay}


def test_kv_sharing_layer_reuses_source_kv_and_projects_own_q():
    model = tiny(sharing_mode="kv")
    model.set_shared_layers([3])
    seen = capture_attention_inputs(model, tokens())
    k_src, v_src = seen[2]["shared"].pair
    assert seen[3]["reused"].pair[0] is k_src and seen[3]["reused"].pair[1] is v_src and seen[3]["shared"] is None


@pytest.mark.parametrize("bias", [None, "qkvo"])
@pytest.mark.parametrize("mode,skipped", [("qk", ("q_proj", "k_proj")), ("kv", ("k_proj", "v_proj"))])
def test_sharing_layers_get_no_grad_and_source_gets_theirs(mode, skipped, bias):
    model = tiny(sharing_mode=mode, attention_bias=bias)
    model.set_shared_layers([2, 3])
    model(tokens()).logsumexp(-1).mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    kinds = ("weight", "bias") if bias else ("weight",)  # a skipped projection's bias is skipped with it
    assert no_grad == {f"layers.{i}.self_attn.{p}.{kind}" for i in (2, 3) for p in skipped for kind in kinds}

    # The source layer's projections receive gradient through the sharing layers (no detach): compare with
    # the gradient when the shared tensors are cut off from layer 1.
    src = model.layers[1].self_attn
    with_flow = src.q_proj.weight.grad.clone() if mode == "qk" else src.v_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    detach_reuse = {}

    def detach_hook(mod, args, out):
        return out[0], Shared(tuple(t.detach() for t in out[1].pair))

    detach_reuse["h"] = src.register_forward_hook(detach_hook)
    model(tokens()).logsumexp(-1).mean().backward()
    detach_reuse["h"].remove()
    without_flow = src.q_proj.weight.grad if mode == "qk" else src.v_proj.weight.grad
    assert not torch.allclose(with_flow, without_flow)


@pytest.mark.parametrize("mode,bias", [("qk", None), ("kv", "qkv")])
def test_compiled_compute_layers_project_qkv_in_one_matmul_with_the_same_numbers(mode, bias):
    """Compiled, a compute layer projects q, k and v with one matmul of the stacked weights (LitGPT's fused qkv: in
    backward one input-gradient matmul instead of three summed); eager keeps three. Same loss and gradients."""
    model = tiny(3, sharing_mode=mode, attention_bias=bias)
    model.set_shared_layers([2])
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and bias:  # the biases start at zero: make them count
                p.normal_()

    def loss_and_grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(tokens()).float().logsumexp(-1).mean()
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}

    eager = loss_and_grads()
    graphs = compile_blocks_eagerly(model)
    compiled = loss_and_grads()
    linears = [sum(n.target is F.linear for n in g.graph.nodes) for g in graphs]
    assert linears == [5, 5]  # compute: qkv, o, gate, up, down; sharing: its one projection, o, gate, up, down
    assert compiled.keys() == eager.keys()
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_a_compiled_layer_keeps_no_view_of_the_fused_projection_for_backward():
    """Attention keeps v for backward; as a view of the fused q/k/v output it would keep all of that output alive
    until backward: every saved tensor owns exactly its storage."""
    model = tiny(1)
    compile_blocks_eagerly(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    pinned = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > t.numel() * t.element_size():
            pinned.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens())
    assert pinned == []


def test_region_switch_is_at_runtime_and_reversible():
    model = tiny()
    x = tokens()
    dense = model(x)
    model.set_shared_layers([3])
    shared = model(x)
    assert not torch.allclose(dense, shared)
    model.set_shared_layers([])
    torch.testing.assert_close(model(x), dense)


def test_layer_zero_never_shares():
    with pytest.raises(ValueError, match="cannot share"):
        tiny().set_shared_layers([0, 1])
    with pytest.raises(ValueError, match="cannot share"):
        tiny().set_shared_layers([4])


def test_shared_layers_are_read_as_integer_indices():
    """A tensor or numpy array of layers makes them share (a set of 0-d tensors matched no layer: nothing shared);
    a non-integer index is refused instead of matching no layer, and a bool too (a mask's True read as layer 1)."""
    model = tiny()
    model.set_shared_layers(torch.tensor([2, 3]))
    assert model.sharing.shared_layers == [2, 3]
    for bad in ([2.5], 3, ["3"], [True, True], torch.tensor([False, True, True])):
        with pytest.raises(TypeError, match="integer layer indices"):
            model.set_shared_layers(bad)
    assert model.sharing.shared_layers == [2, 3]


def count_flops(model: Llama, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def test_sharing_step_does_fewer_flops():
    model = tiny()
    x = tokens()
    dense = count_flops(model, x)
    model.set_shared_layers([3])
    one = count_flops(model, x)
    model.set_shared_layers([2, 3])
    two = count_flops(model, x)
    assert dense > one > two
    c = model.config
    per_layer_qk = 6 * x.numel() * c.n_embd * (c.n_embd + c.n_kv_head * c.head_dim)  # fwd+bwd of q_proj, k_proj
    assert dense - one == per_layer_qk and one - two == per_layer_qk


def test_sharing_mask_round_trips_through_state_dict():
    model = tiny()
    model.set_shared_layers([2, 3])
    state = model.state_dict()
    assert state["sharing.mask"].tolist() == [False, False, True, True]
    fresh = tiny()
    fresh.load_state_dict(state)
    assert fresh.sharing.shared_layers == [2, 3]
    x = tokens()
    torch.testing.assert_close(fresh(x), model(x))


def test_a_mask_of_another_layer_count_is_a_size_mismatch_not_a_corrupt_mask():
    state = tiny(n_layer=3).state_dict()
    model = tiny()
    model.sharing.mask[0] = True  # what an uninitialised (to_empty) buffer may hold
    with pytest.raises(RuntimeError, match="size mismatch for sharing.mask"):
        model.load_state_dict(state)


def test_one_seed_gives_the_meta_built_model_the_same_weights():
    """The layers' default init drew from the seed before init_weights: ``seed; Llama(config)`` (one device, DDP)
    started from other weights than the meta-device build FSDP2 initialises from the same seed."""
    config = LlamaConfig.from_name("debug")
    torch.manual_seed(0)
    built = Llama(config)
    after_build = torch.rand(3)
    with torch.device("meta"):
        meta = Llama(config)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    assert torch.equal(torch.rand(3), after_build)  # the generator advanced by init_weights' draws alone
    for (name, a), b in zip(built.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_meta_device_build_then_init_has_no_garbage():
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("debug"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.sharing.mask.tolist() == [False, False]
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert torch.isfinite(model(tokens())).all()


def test_compiled_rope_is_one_pass_over_x_with_the_rotate_half_numbers():
    """RoPE without a concatenation: inductor reads x and the tables once and writes the result, where
    ``torch.cat`` made a rotated fp32 copy that was written and read again; the numbers are rotate-half's, exactly."""
    import torch._inductor.metrics as metrics

    cos, sin = RotaryEmbedding(16)(8)
    x = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
    xf = x.float()
    rotate_half = xf * cos + torch.cat((-xf[..., 8:], xf[..., :8]), dim=-1) * sin
    assert torch.equal(apply_rope(xf, cos, sin), rotate_half)
    assert torch.equal(apply_rope(x, cos, sin), rotate_half.to(x.dtype))

    torch._dynamo.reset()
    metrics.reset()
    torch._logging.set_logs(inductor_metrics=True)  # makes inductor count the bytes its kernels access
    try:
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            torch.compile(apply_rope, fullgraph=True)(x, cos, sin)
    finally:
        torch._logging.set_logs()
    one_pass = 2 * x.numel() * x.element_size() + cos.nbytes + sin.nbytes
    assert 0 < metrics.num_bytes_accessed <= one_pass


def test_rope_stays_fp32_when_the_model_is_cast_to_bf16():
    model = tiny().to(torch.bfloat16)
    cos, sin = model.rotary_emb(2048)
    assert cos.dtype == sin.dtype == torch.float32
    angle = 2047 * model.rotary_emb.inv_freq()[1]  # a long position: bf16 frequencies would be visibly off
    torch.testing.assert_close(cos[2047, 1], torch.cos(angle))


def test_a_config_of_numpy_numbers_is_a_config_of_python_numbers():
    """``LlamaConfig(n_layer=np.int64(4))`` (a sweep over np.arange) said 'model sizes must be positive integers,
    got {'n_layer': np.int64(4)}'."""
    import numpy as np

    config = LlamaConfig.from_name("debug", n_layer=np.int64(4), init_std=np.float64(0.01))
    assert type(config.n_layer) is int and type(config.init_std) is float and config.n_layer == 4


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("padding_multiple", 0, "padding_multiple must be a positive integer, got 0"),  # was a ZeroDivisionError
        ("padding_multiple", -64, "padding_multiple must be a positive integer, got -64"),
        ("n_layer", True, "model sizes must be positive integers, got {'n_layer': True}"),
        ("rope_theta", 0.0, "rope_theta must be a positive number"),
        ("norm_eps", -1e-5, "norm_eps and init_std non-negative ones (finite), got {'norm_eps': -1e-05}"),
        ("init_std", "0.02", "got {'init_std': '0.02'}"),
        ("norm_eps", float("nan"), "got {'norm_eps': nan}"),  # NaN is no number below 0: every output was NaN
        ("rope_theta", float("inf"), "rope_theta must be a positive number"),  # no rotation: positions unseen
        ("init_std", float("inf"), "got {'init_std': inf}"),  # weights of inf
        ("rope_theta", 10**400, "rope_theta must be a positive number"),  # no float holds it: OverflowError traceback
        ("tie_embeddings", "yes", "tie_embeddings must be true or false, got 'yes'"),
        ("rope_scaling", "llama3", "rope_scaling must be a mapping like"),
        ("rope_scaling", {"rope_type": "linear", "factor": float("inf")}, "all finite, got {'rope_type': 'linear', "),
        (
            "rope_scaling",
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": float("inf"),
             "original_max_position_embeddings": 64},
            "and 0 < low_freq_factor < high_freq_factor, all finite",
        ),
        ("rope_scaling", {"rope_type": "linear", "factor": 10**400}, "all finite, got {'rope_type': 'linear', "),
        ("n_head", 3, "n_embd=64 must be divisible by n_head=3 — model.config — set n_head to 2 or 4, or n_embd to a "
         "multiple of 6"),
        ("n_kv_head", 3, "n_head=4 must be divisible by n_kv_head=3 — model.config — set n_kv_head to one of 1, 2, 4"),
        ("padded_vocab_size", 100, "padded_vocab_size=100 < vocab_size=512"),
        ("padded_vocab_size", "600", "got {'padded_vocab_size': '600'}"),  # a TypeError comparing str and int
        ("padded_vocab_size", 576.0, "got {'padded_vocab_size': 576.0}"),  # failed in nn.Embedding
        ("max_position_embeddings", "128", "got {'max_position_embeddings': '128'}"),
        ("sharing_mode", "vq", "sharing_mode must be 'qk' or 'kv', got 'vq'"),
    ],
)  # fmt: skip
def test_config_fields_of_the_wrong_kind_are_one_line_naming_the_field(field, value, said):
    """Each was accepted (and failed later, deep inside, or trained another model) or a bare exception. Each line says
    what to do (the shape's had no advice: which head counts divide the width)."""
    with pytest.raises(ConfigError, match=re.escape(said)) as refused:
        LlamaConfig.from_name("debug", **{field: value})
    assert refused.value.fix


def test_fields_left_unset_take_their_defaults_and_a_checkpoint_records_values():
    """rope_theta, norm_eps and tie_embeddings default to None (unset, for init_from to fill): a config resolves them
    to 10000.0, 1e-5 and False, records those values, and a record of an older version (values spelled) still loads."""
    config = LlamaConfig.from_name("debug")
    recorded = config.to_dict()
    assert (recorded["rope_theta"], recorded["norm_eps"], recorded["tie_embeddings"]) == (10000.0, 1e-5, False)
    assert LlamaConfig.from_dict(recorded) == config
    assert LlamaConfig.from_name("debug", rope_theta=5e5, tie_embeddings=True).to_dict()["rope_theta"] == 5e5


def test_token_ids_without_a_batch_dimension_or_of_a_float_dtype_are_refused_in_one_sentence():
    """A 1-D tensor of ids failed with "IndexError: tuple index out of range", float ids deep in the embedding."""
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\) token ids, got shape \(5,\)"):
        tiny()(torch.zeros(5, dtype=torch.long))
    for dtype in (torch.float32, torch.bool):  # failed in the embedding: "Expected tensor for argument #1 'indices'"
        with pytest.raises(ValueError, match=rf"^input_ids must be integer token ids \(torch.long\), got {dtype}$"):
            tiny()(torch.zeros(1, 5, dtype=dtype))
    assert tiny()(torch.zeros(1, 5, dtype=torch.int32)).shape[:2] == (1, 5)
