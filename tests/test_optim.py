"""The default optimizer: AdamW over two parameter groups, fused where every parameter is on CUDA."""

from types import SimpleNamespace

import pytest
import torch

from epas_lightning import EPASModule, LlamaConfig
from epas_lightning.optim import default_optimizer


def test_default_optimizer_is_fused_only_on_cuda():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = default_optimizer(model)
    assert not optimizer.defaults["fused"]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # matrices decay, vectors do not
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert default_optimizer(model, fused=False).defaults["fused"] is False


@pytest.mark.parametrize("implementation", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_every_adamw_leaves_a_sharing_layers_qk_and_their_state_as_they_were(implementation):
    """EPAS: a sharing layer's q/k get no grad, so AdamW (fused on GPUs, foreach or for-loop elsewhere) applies neither
    an update nor weight decay to them, nor touches their moments; computing again, the layer starts from both."""
    from epas_lightning import Llama

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("debug", n_layer=3))
    optimizer = default_optimizer(model, lr=1e-2, **implementation)
    tokens = torch.randint(0, 512, (2, 16))
    q = model.layers[2].self_attn.q_proj.weight

    def step() -> None:
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    before = [q.detach().clone()] + [t.clone() for t in optimizer.state[q].values()]
    model.set_shared_layers([2])
    step(), step()
    assert all(torch.equal(a, b) for a, b in zip(before, [q, *optimizer.state[q].values()], strict=True))
    model.set_shared_layers([])
    step()
    assert not torch.equal(before[0], q) and optimizer.state[q]["step"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_optimizer_is_fused_on_cuda():
    assert default_optimizer(torch.nn.Linear(4, 4).cuda()).defaults["fused"] is True


def test_a_run_without_a_step_limit_gets_warmup_then_a_constant_lr():
    """max_epochs=-1 and max_steps=-1 (a run bounded by max_time) has no total step count: the default schedule
    warms up and then holds the peak LR, and says so, instead of failing on int(inf)."""
    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    module.configure_model()
    module.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.warns(UserWarning, match="no step limit"):
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.warmup_steps == 100 and scheduler.max_steps is None
    assert scheduler.lr_factor(100) == scheduler.lr_factor(10**9) == 1.0


def test_a_metric_driven_lr_scheduler_is_refused_in_one_line():
    """ReduceLROnPlateau steps on a metric, not per optimizer step: Lightning failed with a traceback; it is a user
    error that names the setting and the schedulers that work."""
    from functools import partial

    from epas_lightning.errors import ConfigError

    scheduler = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=2)
    module = EPASModule(LlamaConfig.from_name("debug", block_size=16), lr_scheduler=scheduler)
    module.configure_model()
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    with pytest.raises(ConfigError, match="model.lr_scheduler"):
        module.configure_optimizers()
