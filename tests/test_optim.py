"""The default optimizer: AdamW over two parameter groups, fused where every parameter is on CUDA."""

import pytest
import torch

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
