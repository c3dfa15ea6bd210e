"""Algorithm 1 as a pure function of the optimizer step, and its validation."""

import pytest

from epas_lightning.errors import ConfigError
from epas_lightning.schedule import SharingSchedule, resolve_target


def test_targets_resolve_deepest_first():
    assert resolve_target(3, 12) == (11, 10, 9)
    assert resolve_target(0.5, 12) == (11, 10, 9, 8, 7, 6)
    assert resolve_target(5 / 22, 22) == (21, 20, 19, 18, 17)
    assert resolve_target([7, 6, 5], 12) == (7, 6, 5)
    assert len(resolve_target(0.29, 100)) == 29  # 0.29 * 100 is 28.999... in floating point
    assert len(resolve_target(0.3, 22)) == 6  # a fraction rounds down


@pytest.mark.parametrize(
    "target,match",
    [
        (12, "between 1 and n_layer - 1"),
        (0, "between 1 and n_layer - 1"),
        (0.01, "rounds down to 0"),
        (1.0, r"in \(0, 1\)"),
        ([11, 10, 0], "layer 0 can never share"),
        ([11, 9], "contiguous"),
        ([9, 10, 11], "contiguous"),
        ([], "empty"),
        (True, "count, a fraction or a list"),
    ],
)
def test_invalid_targets_are_explained(target, match):
    with pytest.raises(ValueError, match=match):
        resolve_target(target, 12)


def test_a_target_read_as_text_is_refused_and_numpy_numbers_are_numbers():
    """``target="6"`` (a script's command-line argument) was read as the list [6]: one middle layer shared, silently;
    a numpy count was refused as not iterable, and a float layer index was truncated."""
    import numpy as np

    from epas_lightning.callbacks import ProgressiveSharing

    for text in ("6", "0.5"):
        with pytest.raises(ValueError, match="not the text"):
            resolve_target(text, 12)
    with pytest.raises(ValueError, match="integer layer indices"):
        resolve_target([11.5, 10.5], 12)
    assert resolve_target(np.int64(2), 12) == (11, 10)
    assert resolve_target(np.array([11, 10]), 12) == (11, 10)
    assert ProgressiveSharing(np.array([11, 10])).state_dict()["target"] == [11, 10]  # compared as such on resume


def test_two_sharing_schedules_in_one_trainer_are_refused_naming_both():
    """A subclass of ProgressiveSharing beside one (Lightning refuses two of one class only) set the region before
    every batch in turn, the last one winning; both saved their state. Setup refuses them, naming both."""
    from types import SimpleNamespace

    from epas_lightning.callbacks import ProgressiveSharing

    class MySharing(ProgressiveSharing):
        pass

    ours, mine = ProgressiveSharing(target=1), MySharing(target=2)
    trainer = SimpleNamespace(callbacks=[ours, mine])
    said = r"2 sharing schedules, ProgressiveSharing\(target=1\) and MySharing\(target=2\).* — trainer.callbacks —"
    with pytest.raises(ConfigError, match=said):
        ours.setup(trainer, None, "fit")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"growth": 0}, "growth must be >= 1"),
        ({"interval": 0}, "interval must be >= 1"),
        ({"growth": 4}, "not a multiple of growth=4"),
        ({"start_step": -1}, "start_step must be >= 0"),
    ],
)
def test_invalid_schedules_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match + r".* — sharing\.\w+ — \w"):  # what, where, what to do
        SharingSchedule.build(12, 6, **kwargs)


@pytest.mark.parametrize("layers", [(0, 1), (), (5, 5), (3, 1), (3.0, 2.0), 3])
def test_a_schedule_built_directly_checks_its_region(layers):
    """SharingSchedule((0, 1)) shared layer 0 at step 100, () shared nothing and (5, 5) shared one layer twice."""
    with pytest.raises(ValueError, match="contiguous run of layers 1 and up.* SharingSchedule.build"):
        SharingSchedule(layers)


def test_a_schedule_built_directly_keeps_a_good_region_as_integers():
    import numpy as np

    schedule = SharingSchedule([np.int64(1), 2], interval=5, start_step=0)  # as a checkpoint can hold it
    assert schedule.target_layers == (1, 2) and {type(i) for i in schedule.target_layers} == {int}
    assert SharingSchedule((11, 10, 9)) == SharingSchedule.build(12, 3)


def test_a_callback_with_an_impossible_pace_fails_at_construction():
    """Without n_layer, ProgressiveSharing(interval=0) was refused only at setup: after the built-in corpus, or any
    data, had been prepared."""
    from epas_lightning.callbacks import ProgressiveSharing

    for kwargs, match in (({"interval": 0}, "interval must be >= 1"), ({"growth": 0}, "growth must be >= 1")):
        with pytest.raises(ValueError, match=match):
            ProgressiveSharing(**kwargs)


def test_growth_follows_algorithm_1():
    s = SharingSchedule.build(12, 0.5, growth=2, interval=10)
    assert s.start_step == 10 and s.n_stages == 3 and s.final_step == 30
    assert s.shared_layers_at(0) == [] and s.shared_layers_at(9) == []
    assert s.shared_layers_at(10) == [10, 11] and s.shared_layers_at(19) == [10, 11]
    assert s.shared_layers_at(20) == [8, 9, 10, 11]
    assert s.shared_layers_at(30) == [6, 7, 8, 9, 10, 11] == s.shared_layers_at(10**6)


def test_start_step_shifts_the_first_stage():
    s = SharingSchedule.build(4, 2, growth=1, interval=5, start_step=0)
    assert [len(s.shared_layers_at(t)) for t in (0, 4, 5, 9, 10)] == [1, 1, 2, 2, 2]


def test_region_only_grows():
    s = SharingSchedule.build(22, 5, growth=1, interval=3, start_step=2)
    sizes = [len(s.shared_layers_at(t)) for t in range(40)]
    assert sizes == sorted(sizes) and sizes[-1] == 5
    assert all(set(s.shared_layers_at(t)) <= set(s.shared_layers_at(t + 1)) for t in range(40))


def test_shallow_first_region_starts_after_layer_0_and_grows_deeper():
    assert resolve_target(3, 12, order="shallow_first") == (1, 2, 3)
    assert resolve_target(0.5, 8, order="shallow_first") == (1, 2, 3, 4)
    assert resolve_target([4, 5, 6], 12, order="shallow_first") == (4, 5, 6)
    s = SharingSchedule.build(8, 0.5, growth=1, interval=5, start_step=0, order="shallow_first")
    assert [s.shared_layers_at(t) for t in (0, 5, 10, 15, 100)] == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]]
    for t in range(30):  # always contiguous, never layer 0, only grows
        layers = s.shared_layers_at(t)
        assert 0 not in layers and layers == list(range(1, len(layers) + 1))
        assert set(layers) <= set(s.shared_layers_at(t + 1))


def test_default_order_is_deep_first():
    assert SharingSchedule.build(12, 0.5, growth=2, interval=10) == SharingSchedule.build(
        12, 0.5, growth=2, interval=10, order="deep_first"
    )


@pytest.mark.parametrize(
    "target,match",
    [
        ([3, 2, 1], "shallowest first"),
        ([1, 3], "contiguous"),
        ([0, 1], "layer 0 can never share"),
        (12, "between 1 and n_layer - 1"),
    ],
)
def test_invalid_shallow_first_targets_are_explained(target, match):
    with pytest.raises(ValueError, match=match):
        resolve_target(target, 12, order="shallow_first")


def test_unknown_order_is_explained():
    with pytest.raises(
        ValueError,
        match=r"unknown growth order 'middle' — sharing.order — use one of \['deep_first', 'shallow_first'\]",
    ):
        SharingSchedule.build(12, 6, order="middle")
    from epas_lightning.callbacks import ProgressiveSharing

    with pytest.raises(ValueError, match="growth order"):
        ProgressiveSharing(target=2, order="backwards")


def test_shallow_first_grows_from_layer_1_during_fit(tmp_path):
    import lightning as L
    import torch
    from helpers import Recorder, cpu_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from epas_lightning import EPASModule, LlamaConfig, set_region
    from epas_lightning.callbacks import ProgressiveSharing

    L.seed_everything(3)
    recorder = Recorder()
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=4, block_size=16))
    tokens = torch.randint(0, 512, (12, 17))
    loader = torch.utils.data.DataLoader(tokens, batch_size=2)
    sharing = ProgressiveSharing(target=3, interval=2, start_step=1, order="shallow_first")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    cpu_trainer(tmp_path, 6, [sharing, recorder, checkpoint]).fit(module, loader)
    assert [recorder.masks[s] for s in range(6)] == [[], [1], [1], [1, 2], [1, 2], [1, 2, 3]]
    assert sharing.state_dict()["order"] == "shallow_first"
    # N sharing layers are the first N of the trained region, as for load_model's: in the module just trained and in
    # one loaded with EPASModule.load_from_checkpoint (both shared the deepest N, and took any N, unchecked)
    assert set_region(module.model, 1) == [1] and set_region(module.model, 3) == [1, 2, 3]
    mid_growth = EPASModule.load_from_checkpoint(tmp_path / "epoch=0-step=4.ckpt").model  # trained layers [1, 2]
    assert set_region(mid_growth, 1) == [1] and set_region(mid_growth, 3, force=True) == [1, 2, 3]
    with pytest.raises(ConfigError, match="was trained with at most 2 sharing layers"):
        set_region(mid_growth, 3)


@pytest.mark.parametrize(
    ("total", "resumed", "warned"), [(6, 0, True), (6, 5, True), (6, 6, False), (7, 0, False), (float("inf"), 0, False)]
)
def test_a_run_too_short_for_the_region_says_so_at_the_start(total, resumed, warned, recwarn):
    """Growth finishing at step 6 (3 stages of 2 from step 2) needs 7 optimizer steps; a 6-step run reaches 2 of 3
    layers, and the user is told before training instead of learning it from the summary. A resume at or past the
    run's end trains nothing (the summary says so): it was told the run 'reaches 2 of the 3 layers'."""
    from types import SimpleNamespace

    from epas_lightning.callbacks import ProgressiveSharing

    sharing = ProgressiveSharing(target=3, interval=2, n_layer=4)
    sharing.on_load_checkpoint(None, None, {"global_step": resumed} if resumed else {})
    sharing.on_fit_start(SimpleNamespace(estimated_stepping_batches=total), None)
    messages = [str(w.message) for w in recwarn]
    assert any("reaches 2 of the 3 layers" in m and "full at step 6" in m for m in messages) == warned
    ProgressiveSharing(target=3, interval=2, n_layer=4, enabled=False).on_fit_start(SimpleNamespace(), None)


def test_a_run_too_short_for_a_region_of_one_layer_says_it_in_the_singular(recwarn):
    """It said "reaches 0 of the 1 layers of its region"."""
    from types import SimpleNamespace

    from epas_lightning.callbacks import ProgressiveSharing

    sharing = ProgressiveSharing(target=1, interval=2, n_layer=2)  # the region is full at step 2
    sharing.on_fit_start(SimpleNamespace(estimated_stepping_batches=1), None)
    (warned,) = [str(w.message) for w in recwarn]
    assert warned.startswith("EPAS: the run ends after 1 optimizer step and reaches 0 of the 1 layer of its region ")


def test_ddp_switched_to_find_unused_parameters_says_torchs_warning_before_the_first_switch_is_expected(monkeypatch):
    """Until the region first grows every parameter gets a gradient, and torch warns once per rank (from C++, past any
    Python filter) that find_unused_parameters=True found none, advising to turn it off: which would fail the first
    sharing step. The line saying the flag was switched on now says when it starts to matter and that the warning is
    expected."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from epas_lightning import callbacks

    said = []
    monkeypatch.setattr(callbacks, "rank_zero_info", said.append)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=1, logger=False, enable_checkpointing=False)
    callbacks.let_ddp_find_unused_parameters(trainer, 4)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert said == [
        "EPAS: DDP set to find_unused_parameters=True (sharing layers' q/k projections get no grad from step 4); "
        "torch's warning that it 'did not find any unused parameters' before step 4 is expected: keep the flag on"
    ]
    # configs/ddp.yaml sets the flag itself: the warning came unexplained
    trainer = L.Trainer(accelerator="cpu", strategy=DDPStrategy(find_unused_parameters=True), devices=1, logger=False)
    callbacks.let_ddp_find_unused_parameters(trainer, 4)
    assert said[1:] == [
        "EPAS: DDP finds unused parameters (sharing layers' q/k projections get no grad from step 4); "
        "torch's warning that it 'did not find any unused parameters' before step 4 is expected: keep the flag on"
    ]


def test_ddp_static_graph_is_refused_before_training():
    """DDP's static_graph=True trained until the region first grew, then failed on every rank with a traceback (exit
    1) saying to set find_unused_parameters=True, which was set: a static graph cannot lose parameters mid-run."""
    from lightning.pytorch.strategies import DDPStrategy

    from epas_lightning import callbacks

    strategy = DDPStrategy(find_unused_parameters=True, static_graph=True)
    with pytest.raises(ConfigError) as refused:
        callbacks.refuse_static_graph(strategy, SharingSchedule.build(2, 1, interval=4))
    assert str(refused.value) == (
        "DDP's static_graph=True cannot train a growing sharing region: the sharing layers' q/k projections stop "
        "getting gradients at step 4, and a static graph fails there — trainer.strategy: static_graph — leave "
        "static_graph unset (find_unused_parameters=True is set for you)"
    )


def test_ddp_static_graph_trains_a_region_that_never_changes():
    """start_step 0 with the whole region in one stage shares the same layers from the first step to the last: the
    parameters that get gradients never change, which a static graph takes (such a fit trained to the end), but fit
    refused it. A region that grows after step 0 is still refused, at its first growth."""
    from lightning.pytorch.strategies import DDPStrategy

    from epas_lightning.callbacks import refuse_static_graph

    strategy = DDPStrategy(static_graph=True)
    refuse_static_graph(strategy, SharingSchedule.build(4, 2, growth=2, interval=10, start_step=0))
    with pytest.raises(ConfigError, match="stop getting gradients at step 10, "):
        refuse_static_graph(strategy, SharingSchedule.build(4, 2, growth=1, interval=10, start_step=0))
    with pytest.raises(ConfigError, match="stop getting gradients at step 5, "):
        refuse_static_graph(strategy, SharingSchedule.build(4, 2, growth=2, interval=10, start_step=5))


def test_a_dense_run_of_one_layer_trains_and_resumes_with_sharing_off(tmp_path):
    """With sharing off, its target was still checked against the model: a 1-layer dense baseline was refused ("a
    sharing target of 1 layers is invalid for a 1-layer model"), at construction and in setup; a resume with another
    target failed comparing them. A target that validation scores (val_sharing_layers) is still checked, and a
    checkpoint that shared resumes dense with sharing off."""
    import lightning as L
    import torch
    from helpers import cpu_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.callbacks import ProgressiveSharing
    from epas_lightning.errors import ConfigError

    L.seed_everything(3)
    config = LlamaConfig.from_name("debug", n_layer=1, block_size=16)
    loader = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cpu_trainer(tmp_path, 2, [ProgressiveSharing(enabled=False, n_layer=1), checkpoint]).fit(EPASModule(config), loader)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = ProgressiveSharing(target=0.25, enabled=False)
    cpu_trainer(tmp_path, 3, [resumed]).fit(EPASModule(config), loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ConfigError, match="of 1 layers rounds down to 0 layers"):
        ProgressiveSharing(enabled=False, n_layer=1, val_sharing_layers=[0])
    # a checkpoint that shared, resumed with sharing off (no schedule now), trains dense
    two = LlamaConfig.from_name("debug", n_layer=2, block_size=16)
    shared = ModelCheckpoint(dirpath=tmp_path / "shared", save_last=True)
    cpu_trainer(tmp_path, 2, [ProgressiveSharing(target=1, interval=1), shared]).fit(EPASModule(two), loader)
    module = EPASModule(two)
    dense = ProgressiveSharing(target=1, interval=1, enabled=False)
    cpu_trainer(tmp_path, 3, [dense]).fit(module, loader, ckpt_path=tmp_path / "shared" / "last.ckpt")
    assert module.model.sharing.shared_layers == []


def test_the_trained_region_is_built_once_per_region_not_at_every_batch(tmp_path, monkeypatch):
    """``ProgressiveSharing`` built the model's ``trained_region`` anew before every training micro-batch (its
    ``TrainedRegion`` checks its layers each time); it is built when the mask changes, and is never stale: after every
    micro-batch it is the region of that step's mask, in growth order, also where the mask was changed in between."""
    import lightning as L
    import torch
    from helpers import cpu_trainer
    from lightning.pytorch.callbacks import Callback

    from epas_lightning import EPASModule, LlamaConfig, callbacks
    from epas_lightning.callbacks import ProgressiveSharing
    from epas_lightning.region import TrainedRegion

    built = []

    class Counted(TrainedRegion):
        def __post_init__(self) -> None:
            built.append(self.layers)
            super().__post_init__()

    monkeypatch.setattr(callbacks, "TrainedRegion", Counted)
    regions = {}

    class Record(Callback):  # after ProgressiveSharing's hooks
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            regions.setdefault(trainer.global_step, []).append(pl_module.model.trained_region.layers)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:  # a mask set between batches (as validation's other lengths do, and put back)
                pl_module.model.set_shared_layers([2])

    L.seed_everything(3)
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=4, n_embd=32, block_size=8))
    loader = torch.utils.data.DataLoader(torch.randint(0, 256, (24, 9)), batch_size=2)
    sharing = ProgressiveSharing(target=3, interval=2, start_step=1)
    cpu_trainer(tmp_path, 6, [sharing, Record()], accumulate_grad_batches=2, enable_checkpointing=False).fit(
        module, loader
    )
    assert [regions[s] for s in range(6)] == [
        [(), ()],
        [(3,), (3,)],
        [(3,), (3,)],
        [(3, 2)] * 2,
        [(3, 2)] * 2,
        [(3, 2, 1)] * 2,
    ]
    # the target (setup), then one per region: the one of the mask set between batches is never built (the next batch
    # sets the schedule's mask back before anything reads it)
    assert built == [(3, 2, 1), (), (3,), (3, 2), (3, 2, 1)]
