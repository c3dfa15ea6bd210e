"""In-process checks of ``parallelize`` and meta-device init on a one-rank gloo group, and compile recompiles."""

from __future__ import annotations

import resource

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.init import _materialize_distributed_module
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from epas_lightning import EPASModule, Llama, LlamaConfig
from epas_lightning.parallel import mixed_precision_policy, parallelize


@pytest.fixture
def mesh(tmp_path):
    """A one-rank data-parallel mesh (what FSDP2Strategy gives ``configure_model`` on one device)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def sharded_module(config: LlamaConfig, mesh, **kwargs) -> EPASModule:
    module = EPASModule(config, **kwargs)
    module._device_mesh = mesh  # what ModelParallelStrategy.setup_environment sets
    module.configure_model()
    return module


def test_llama_7b_is_sharded_on_meta_without_allocating(mesh):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module = sharded_module(LlamaConfig.from_name("llama-7b"), mesh)
    params = list(module.model.parameters())
    assert all(isinstance(p, DTensor) and p.is_meta for p in params)
    assert 6.5e9 < sum(p.numel() for p in params) < 7e9
    assert module._built_on_meta
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # ru_maxrss is KiB
    assert grown_mib < 500  # the fp32 model would be 27 GB


def test_materialised_sharded_model_equals_a_fresh_init(mesh):
    config = LlamaConfig.from_name("debug", n_layer=3)
    torch.manual_seed(0)
    module = sharded_module(config, mesh, activation_checkpointing=True)
    _materialize_distributed_module(module, torch.device("cpu"))  # what ModelParallelStrategy.setup does
    module.on_fit_start()
    reference = Llama(config)
    torch.manual_seed(0)
    reference.init_weights()
    expected = reference.state_dict()
    state = module.model.state_dict()
    assert sorted(state) == sorted(expected)  # no checkpoint-wrapper prefixes
    for name, tensor in state.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        torch.testing.assert_close(full, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_fsdp2_model_matches_eager_through_sharing(mesh, activation_checkpointing):
    config = LlamaConfig.from_name("debug", n_layer=4)
    torch.manual_seed(0)
    module = sharded_module(config, mesh, activation_checkpointing=activation_checkpointing)
    _materialize_distributed_module(module, torch.device("cpu"))
    module.on_fit_start()
    eager = Llama(config)
    torch.manual_seed(0)
    eager.init_weights()
    tokens = torch.randint(0, 512, (2, 17))
    for model in (module.model, eager):
        model.set_shared_layers([2, 3])
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    eager_grads = dict(eager.named_parameters())
    for name, p in module.model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        expected = eager_grads[name].grad
        if expected is None:  # the sharing layers' q/k
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad.full_tensor(), expected, rtol=1e-5, atol=1e-7, msg=name)
    assert {n for n, p in eager.named_parameters() if p.grad is None} == {
        f"layers.{i}.self_attn.{proj}.weight" for i in (2, 3) for proj in ("q_proj", "k_proj")
    }


def test_mixed_precision_policies():
    assert mixed_precision_policy("bf16-mixed").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert mixed_precision_policy("bf16-true").param_dtype is None
    assert mixed_precision_policy("32-true").param_dtype is None
    with pytest.raises(ValueError, match="16-mixed"):
        mixed_precision_policy("16-mixed")


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_compiled_blocks_recompile_a_bounded_number_of_times(activation_checkpointing):
    """Growing the region deep-first over 5 layers compiles the block graph for compute and sharing mode only."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Llama(LlamaConfig.from_name("debug", n_layer=6))
    parallelize(model, None, activation_checkpointing=activation_checkpointing, compile=counting_backend)
    tokens = torch.randint(0, 512, (2, 16))
    per_region = []
    for n_shared in range(6):
        model.set_shared_layers(range(6 - n_shared, 6))
        model(tokens).sum().backward()
        per_region.append(len(graphs))
    assert per_region[0] >= 1
    assert per_region[-1] <= per_region[0] + 2  # one more forward graph for sharing mode (+ its backward)
    assert per_region[-1] == per_region[2]  # once both modes are compiled, further growth compiles nothing
