"""In-process checks of ``parallelize`` and meta-device init on a one-rank gloo group, and compile recompiles."""

from __future__ import annotations

import resource
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.init import _materialize_distributed_module
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from epas_lightning import EPASModule, Llama, LlamaConfig
from epas_lightning.loss import train_loss
from epas_lightning.memory_plan import plan_checkpointing
from epas_lightning.parallel import blocks_to_checkpoint, checkpointed_blocks, mixed_precision_policy, parallelize


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
    torch.manual_seed(0)
    expected = Llama(config).state_dict()  # one device and DDP build it so: the same weights from the same seed
    state = module.model.state_dict()
    assert sorted(state) == sorted(expected)  # no checkpoint-wrapper prefixes
    for name, tensor in state.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        torch.testing.assert_close(full, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("activation_checkpointing", "chunked_loss"), [(False, False), (True, False), (2, True)])
def test_fsdp2_model_matches_eager_through_sharing(mesh, activation_checkpointing, chunked_loss):
    """Same gradients sharded as eager; with the chunked training loss (the LM head's weight gathered by FSDP inside
    forward) too, and with only the first 2 of 4 blocks checkpointed."""
    config = LlamaConfig.from_name("debug", n_layer=4)
    torch.manual_seed(0)
    module = sharded_module(config, mesh, activation_checkpointing=activation_checkpointing)
    _materialize_distributed_module(module, torch.device("cpu"))
    module.on_fit_start()
    wrapped = [isinstance(block, CheckpointWrapper) for block in module.model.layers]
    assert wrapped == [i < checkpointed_blocks(activation_checkpointing, 4) for i in range(4)]
    eager = Llama(config)
    torch.manual_seed(0)
    eager.init_weights()
    tokens = torch.randint(0, 512, (2, 17))
    for model in (module.model, eager):
        model.set_shared_layers([2, 3])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if chunked_loss and model is module.model:
                train_loss(model, tokens).backward()
            else:
                F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        assert not [w for w in caught if "view" in str(w.message)]  # sharing layers return no view of their input
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


def test_checkpointing_settings_and_the_memory_plan():
    assert [checkpointed_blocks(x, 4) for x in (False, True, 0, 3)] == [0, 4, 0, 3]
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpointed_blocks(5, 4)
    from epas_lightning.errors import ConfigError

    for wrong in (5, "yes"):  # "yes" was a TypeError about comparing int and str
        with pytest.raises(ConfigError, match="model.activation_checkpointing"):  # at construction, not mid-fit
            EPASModule(LlamaConfig.from_name("debug"), activation_checkpointing=wrong)
    assert blocks_to_checkpoint(4, block_bytes=10, kept_bytes=1, budget=40) == 0
    assert blocks_to_checkpoint(4, block_bytes=10, kept_bytes=1, budget=25) == 2  # 2 * 10 + 2 * 1
    assert blocks_to_checkpoint(4, block_bytes=10, kept_bytes=1, budget=3) == 4  # does not fit at all: every block
    config = LlamaConfig.from_name("tinyllama-1.1b")
    gib = 2**30
    assert plan_checkpointing(config, 4 * 2048, free_bytes=139 * gib) == 0  # one H200, 4 x 2048 tokens
    more = [plan_checkpointing(config, b * 2048, free_bytes=139 * gib) for b in (8, 32, 64)]
    assert more == sorted(more) and 0 < more[-1] <= config.n_layer  # bigger micro-batches checkpoint more blocks
    assert plan_checkpointing(config, 32 * 2048, 139 * gib, shards=8) <= more[1]  # sharded state leaves more room


def test_auto_checkpointing_counts_weights_already_on_the_gpu_once(monkeypatch):
    """One device and DDP build the model on the GPU before "auto" reads its free memory: the plan, which counts the
    weights in the training state, counted them a second time (more blocks checkpointed than needed: slower)."""
    from types import SimpleNamespace

    from epas_lightning import module as module_file
    from epas_lightning.memory_plan import on_device_bytes

    model = Llama(LlamaConfig.from_name("debug", n_layer=2))
    assert on_device_bytes(model, torch.device("cpu")) == sum(p.numel() * 4 for p in model.parameters())
    with torch.device("meta"):
        assert on_device_bytes(Llama(LlamaConfig.from_name("debug", n_layer=2)), torch.device("cpu")) == 0
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2), activation_checkpointing="auto")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=2))
    cuda = torch.device("cuda", 0)
    planned = []
    monkeypatch.setattr(module, "_root_device", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 4000))
    monkeypatch.setattr(module_file, "on_device_bytes", lambda m, device: 24 if m is model and device == cuda else 0)
    monkeypatch.setattr(module_file, "plan_checkpointing", lambda config, tokens, free, shards: planned.append(free))
    module._checkpointing(None, model)
    assert planned == [1024]


def test_auto_checkpointing_is_off_on_cpu(mesh):
    module = sharded_module(LlamaConfig.from_name("debug", n_layer=2), mesh, activation_checkpointing="auto")
    assert not any(isinstance(block, CheckpointWrapper) for block in module.model.layers)


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
