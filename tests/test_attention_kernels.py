"""The SDPA kernel order: the same model whichever kernel runs, and ``auto``'s choice (cuDNN only on Hopper, only
after it agreed with FlashAttention on the model's attention)."""

import pytest
import torch
from helpers import compile_blocks_eagerly
from torch.nn.attention import SDPBackend

from epas_lightning import attention_kernels
from epas_lightning.attention_kernels import agrees, sdpa_order
from epas_lightning.errors import ConfigError
from epas_lightning.model import Llama, LlamaConfig

CPU = torch.device("cpu")
CONFIG = LlamaConfig.from_name("debug", n_layer=2, n_kv_head=2)  # grouped KV heads, as TinyLlama


def logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    logits.float().square().mean().backward()
    return [logits.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]


def test_a_kernel_order_changes_no_number_and_compiles_as_a_constant():
    torch.manual_seed(0)
    model = Llama(CONFIG)
    model.set_shared_layers([1])
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))
    plain = logits_and_grads(model, tokens)
    graphs = compile_blocks_eagerly(model)
    model.sdpa_order = sdpa_order("cudnn", CPU, CONFIG)  # on a CPU, cuDNN cannot run: the next kernel does
    assert model.sdpa_order[0] == SDPBackend.CUDNN_ATTENTION
    before = torch._C._get_sdp_priority_order()
    ordered = logits_and_grads(model, tokens)
    assert torch._C._get_sdp_priority_order() == before  # the order applies inside attention only
    for a, b in zip(plain, ordered, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    compiled = len(graphs)
    model.sdpa_order = None
    logits_and_grads(model, tokens)
    assert len(graphs) > compiled  # the order is part of what the compiled graph was specialised on


def test_auto_keeps_torchs_order_off_hopper_and_prefers_cudnn_only_where_it_agrees(monkeypatch):
    assert sdpa_order("auto", CPU, CONFIG) is None
    assert sdpa_order("torch", CPU, CONFIG) is None
    assert sdpa_order("flash", CPU, CONFIG)[0] == SDPBackend.FLASH_ATTENTION
    monkeypatch.setattr(attention_kernels, "is_hopper", lambda device: True)
    monkeypatch.setattr(attention_kernels, "cudnn_agrees", lambda config, device: True)
    assert sdpa_order("auto", CPU, CONFIG)[0] == SDPBackend.CUDNN_ATTENTION
    monkeypatch.setattr(attention_kernels, "cudnn_agrees", lambda config, device: False)
    assert sdpa_order("auto", CPU, CONFIG) is None
    with pytest.raises(ConfigError, match="model.attention_kernel"):
        sdpa_order("fastest", CPU, CONFIG)


def test_the_agreement_check_runs_both_kernels_and_refuses_one_that_is_off_or_missing(monkeypatch):
    assert agrees(SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, CONFIG, CPU)
    assert not agrees(SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, CONFIG, CPU)  # no cuDNN on a CPU
    attend = attention_kernels._attend

    def off_by_a_little(inputs, grad_out, kernel, dtype):
        results = attend(inputs, grad_out, kernel, dtype)
        if kernel == SDPBackend.MATH and dtype == torch.bfloat16:
            results[2] = results[2] * 1.05  # dk 5% off
        return results

    monkeypatch.setattr(attention_kernels, "_attend", off_by_a_little)
    assert not agrees(SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, CONFIG, CPU)


def test_the_agreement_check_runs_where_gradients_are_off():
    """A model built under no_grad or inference_mode (``configure_model()`` in a script's generation code) on a Hopper
    GPU, with ``auto``, failed in the check's backward: 'element 0 of tensors does not require grad'."""
    for off in (torch.no_grad, torch.inference_mode):
        with off():
            assert agrees(SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, CONFIG, CPU)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_the_preferred_kernel_gives_the_same_model_in_bf16():
    device = torch.device("cuda")
    config = LlamaConfig.from_name("debug", n_layer=2, n_head=8, n_kv_head=2, n_embd=512, block_size=256)  # D 64
    torch.manual_seed(0)
    model = Llama(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (2, 256), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = logits_and_grads(model, tokens)
        model.sdpa_order = sdpa_order("cudnn", device, config)
        preferred = logits_and_grads(model, tokens)
    for a, b in zip(plain, preferred, strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
