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
