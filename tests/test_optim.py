"""The default optimizer: AdamW over two parameter groups, fused where every parameter is on CUDA."""

from types import SimpleNamespace

import pytest
import torch
from helpers import DEBUG_CONFIG as DEBUG

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


def test_a_warmup_as_long_as_the_run_is_warned_about():
    """A WarmupStableDecayLR keeps its 100 warmup steps in a 8-step run: the learning rate never reached its peak
    nor decayed, without a word."""
    from functools import partial

    from epas_lightning import WarmupStableDecayLR

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16), lr_scheduler=partial(WarmupStableDecayLR))
    module.configure_model()
    module.trainer = SimpleNamespace(estimated_stepping_batches=8)
    with pytest.warns(UserWarning, match="warms up for 100 optimizer steps but the run has 8: .* ends at 8% of it"):
        module.configure_optimizers()


@pytest.mark.parametrize("total", [1, float("inf")])
def test_a_warmup_of_one_step_is_said_in_the_singular(total):
    """Both warmup warnings said "warms up for 1 steps"."""
    from functools import partial

    from epas_lightning import WarmupStableDecayLR

    scheduler = partial(WarmupStableDecayLR, warmup_steps=1)
    module = EPASModule(LlamaConfig.from_name("debug", block_size=16), lr_scheduler=scheduler)
    module.configure_model()
    module.trainer = SimpleNamespace(estimated_stepping_batches=total)
    with pytest.warns(UserWarning, match=r"warms up for 1 optimizer step (but|and) ") as warned:
        module.configure_optimizers()
    assert not any("1 optimizer steps" in str(w.message) for w in warned)


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


def wsd(**kwargs):  # noqa: ANN201
    from epas_lightning import WarmupStableDecayLR

    return WarmupStableDecayLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), **kwargs)


@pytest.mark.parametrize(
    ("shape", "quarter"), [("linear", 0.775), ("cosine", 0.1 + 0.45 * (1 + 0.5**0.5)), ("1-sqrt", 0.55)]
)
def test_warmup_stable_decay_holds_the_peak_then_decays_over_its_last_steps(shape, quarter):
    """WSD: warmup as WarmupCosineLR, the peak until the decay's start, the decay's shape, the floor at max_steps."""
    schedule = wsd(warmup_steps=10, max_steps=100, decay_steps=20, decay_shape=shape, min_lr_ratio=0.1)
    assert schedule.lr_factor(0) == pytest.approx(1 / 11) and schedule.lr_factor(9) == pytest.approx(10 / 11)
    assert schedule.lr_factor(10) == schedule.lr_factor(79) == schedule.lr_factor(80) == 1.0
    assert schedule.lr_factor(85) == pytest.approx(quarter)
    assert schedule.lr_factor(100) == pytest.approx(0.1) and schedule.lr_factor(81) < 1.0
    factors = [schedule.lr_factor(step) for step in range(80, 101)]
    assert factors == sorted(factors, reverse=True)


def test_warmup_stable_decay_lengths():
    """The decay is 20% of max_steps unless set; a fraction or step count longer than what follows warmup starts at
    the end of warmup; without max_steps the peak is held."""
    assert wsd(warmup_steps=10, max_steps=1000).decay_length() == 200
    assert wsd(warmup_steps=10, max_steps=1000, decay_fraction=0.1).decay_length() == 100
    assert wsd(warmup_steps=10, max_steps=100, decay_steps=500).decay_length() == 90
    assert wsd(warmup_steps=10, max_steps=100, decay_fraction=1.0).lr_factor(10) == 1.0
    held = wsd(warmup_steps=10)
    assert held.decay_length() == 0 and held.lr_factor(10**9) == 1.0
    assert wsd(warmup_steps=10, max_steps=100, decay_steps=0).lr_factor(99) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"decay_steps": 10, "decay_fraction": 0.1}, "decay_steps"),
        ({"decay_fraction": 1.5}, "decay_fraction"),
        ({"decay_steps": -1}, "decay_steps"),
        ({"decay_shape": "exp"}, "decay_shape"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"warmup_steps": -5}, "warmup_steps"),
    ],
)
def test_bad_schedule_arguments_name_the_setting(kwargs, where):
    from epas_lightning.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        wsd(**kwargs)
    assert error.value.where == f"model.lr_scheduler.init_args.{where}"


def test_a_wsd_run_extended_from_its_stable_phase_keeps_its_learning_rate(caplog):
    """The point of WSD: resuming mid-plateau with a larger max_steps moves the decay, not the learning rate; resuming
    with max_steps = step + decay_steps anneals from there."""
    before = wsd(warmup_steps=10, max_steps=1000, decay_steps=100)
    for _ in range(500):
        before.optimizer.step()
        before.step()
    longer = wsd(warmup_steps=10, max_steps=5000, decay_steps=100)
    with caplog.at_level("INFO", logger="epas_lightning"):
        longer.load_state_dict(before.state_dict())
    assert longer.get_last_lr() == before.get_last_lr() == [1.0]
    assert "max_steps 1000 -> 5000)." in caplog.text and "the learning rate goes" not in caplog.text
    anneal = wsd(warmup_steps=10, max_steps=600, decay_steps=100)
    anneal.load_state_dict(before.state_dict())
    assert anneal.get_last_lr() == [1.0] and anneal.lr_factor(550) == pytest.approx(0.5)


@pytest.mark.parametrize("recorded", [True, False])
def test_a_resume_under_another_schedule_class_names_both(caplog, recorded):
    """A WSD run resumed without its --model.lr_scheduler flag gets the default cosine: the line named only changed
    numbers (max_steps, min_lr_ratio), not that the schedule itself was another one. Checkpoints written before the
    class was recorded are recognised by their keys."""
    from epas_lightning import WarmupCosineLR

    before = wsd(warmup_steps=10, max_steps=1000, decay_steps=100)
    for _ in range(500):
        before.optimizer.step()
        before.step()
    state = before.state_dict()
    if not recorded:
        state.pop("schedule", None)
    cosine = WarmupCosineLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=10, max_steps=1000)
    with caplog.at_level("INFO", logger="epas_lightning"):
        cosine.load_state_dict(state)
    assert "configured WarmupCosineLR, not the checkpoint's WarmupStableDecayLR" in caplog.text
    assert "to keep the WarmupStableDecayLR, set model.lr_scheduler" in caplog.text
    assert not hasattr(cosine, "decay_shape") and cosine.last_epoch == 500
    caplog.clear()
    with caplog.at_level("INFO", logger="epas_lightning"):
        wsd(warmup_steps=10, max_steps=1000, decay_steps=100).load_state_dict(state)
    assert "LR schedule" not in caplog.text


def test_fit_fills_in_max_steps_of_a_wsd_from_the_command_line():
    """Configured by class path in YAML or flags, as WarmupCosineLR: its max_steps comes from the trainer."""
    from epas_lightning.lightning_cli import lightning_cli

    flags = ["--model.lr_scheduler", "epas_lightning.WarmupStableDecayLR", "--model.lr_scheduler.decay_shape"]
    cli = lightning_cli(["--config", DEBUG, *flags, "1-sqrt", "--trainer.max_steps", "400"], run=False)
    cli.model.configure_model()
    cli.model.trainer = SimpleNamespace(estimated_stepping_batches=400)
    scheduler = cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert type(scheduler).__name__ == "WarmupStableDecayLR" and scheduler.decay_shape == "1-sqrt"
    assert scheduler.max_steps == 400 and scheduler.decay_length() == 80


def test_a_resume_names_only_the_settings_that_differ_from_the_checkpoints():
    """FSDP2 restores AdamW's betas as a list: a resume under it said "optimizer: resumed with the
    configured betas [0.9, 0.95] -> (0.9, 0.95)", a change that was none."""
    from epas_lightning.optim import restore_settings

    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 0.95))
    optimizer.param_groups[0]["betas"] = [0.9, 0.95]  # as loaded from the checkpoint
    assert restore_settings(optimizer, [{"betas": (0.9, 0.95), "weight_decay": 0.01}]) == ""
    optimizer.param_groups[0]["betas"] = [0.9, 0.999]
    assert restore_settings(optimizer, [{"betas": (0.9, 0.95)}]) == "betas [0.9, 0.999] -> (0.9, 0.95)"
