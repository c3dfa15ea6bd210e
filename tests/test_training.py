"""Lightning integration on CPU: growth during fit, mask and FLOPs bookkeeping, exact resume mid-growth."""

import contextlib
import os
import re
import time
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import DEBUG_CONFIG, HostReads, Recorder, SignalInStep, cpu_trainer, train_tiny_checkpoint
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from epas_lightning import EPASModule, LlamaConfig, ProgressiveSharing, TokenDataModule
from epas_lightning.flops import estimate_flops
from epas_lightning.lightning_cli import lightning_cli


def make_trainer(root: Path, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return cpu_trainer(root, max_steps, callbacks, **kwargs)


def make_run(corpus: Path, n_layer: int = 4, module_class: type[EPASModule] = EPASModule):
    L.seed_everything(7)
    config = LlamaConfig.from_name("debug", n_layer=n_layer, block_size=32)
    module = module_class(config)
    data = TokenDataModule(data_dir=str(corpus), seq_len=32, batch_size=4, vocab_size=config.vocab_size)
    return module, data


def test_compiled_blocks_and_loss_train_as_the_eager_model_through_a_region_switch(tiny_corpus, tmp_path, monkeypatch):
    """``EPASModule(compile=...)`` compiles every block and the training loss's softmax (aot_eager here: the same
    graphs inductor gets, without its code generation); the losses of each step equal the eager run's."""
    from epas_lightning import linear_ce

    backends = []
    compiled = linear_ce._compiled
    monkeypatch.setattr(linear_ce, "_compiled", lambda backend: backends.append(backend) or compiled(backend))
    losses = {}
    for compile in (False, "aot_eager"):
        module, data = make_run(tiny_corpus, n_layer=2)
        module.compile_blocks = compile
        recorder = Recorder()
        make_trainer(tmp_path / str(compile), 4, [ProgressiveSharing(target=1, interval=2), recorder]).fit(module, data)
        losses[compile] = recorder.losses
        assert recorder.masks[3] == [1]
    assert losses[False] == pytest.approx(losses["aot_eager"], rel=1e-5)
    assert set(backends) == {"aot_eager"}  # the loss was compiled too, only in the compiled run


def test_region_grows_during_fit_and_frozen_qk_stay_put(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus)
    sharing = ProgressiveSharing(target=2, growth=1, interval=3)
    recorder = Recorder()
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = pl_module.model.layers[3].self_attn.q_proj.weight.detach().clone()

    trainer = make_trainer(tmp_path, 8, [sharing, Snapshot(), recorder])
    trainer.fit(module, data)
    assert [len(recorder.masks[s]) for s in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert recorder.masks[3] == [3] and recorder.masks[7] == [2, 3]
    # layer 3's q_proj trains while it computes and is left untouched (no grad, no weight decay) once it shares
    assert not torch.equal(snapshots[0], snapshots[3])
    assert torch.equal(snapshots[4], snapshots[7])
    assert module.model.sharing.mask.tolist() == [False, False, True, True]


def test_flops_per_batch_follows_the_mask(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus)
    seen = []

    class ReadFlops(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.n_shared, pl_module.flops_per_batch))

    trainer = make_trainer(tmp_path, 4, [ProgressiveSharing(target=2, interval=2), ReadFlops()])
    trainer.fit(module, data)
    config = module.config
    assert seen == [(n, 4 * estimate_flops(config, n, 32)) for n in (0, 0, 1, 1)]


def test_train_loss_is_the_mean_of_the_steps_micro_batches(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus, n_layer=2)
    micro_losses, logged = [], {}
    step_loss = module.training_step

    def recording_step(batch, batch_idx):
        loss = step_loss(batch, batch_idx)
        micro_losses.append(loss.item())
        return loss

    module.training_step = recording_step

    class ReadLogged(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged[batch_idx] = trainer.callback_metrics["train/loss"].item()

    make_trainer(tmp_path, 2, [ReadLogged()], accumulate_grad_batches=3).fit(module, data)
    assert len(micro_losses) == 6
    for step in range(2):  # what the step's last micro-batch leaves in the logs is the mean of its three
        expected = sum(micro_losses[3 * step : 3 * step + 3]) / 3
        assert logged[3 * step + 2] == pytest.approx(expected, rel=1e-6)


def test_a_fit_step_that_logs_nothing_reads_only_the_divergence_guards_decision(
    tiny_corpus, tmp_path, monkeypatch, capsys
):
    """The steps of a ``fit`` through the entry point (its bar, learning-rate monitor, guard, throughput monitor) that
    neither log nor print read one value back to the host: the divergence guard's decision (on CUDA each read waits
    for the GPU). Lightning converted ``train/loss`` as a progress-bar metric after every batch, and the bar read it."""
    monkeypatch.chdir(tmp_path)
    HostReads.watch(monkeypatch)
    steps = ["--trainer.max_steps", "7", "--trainer.log_every_n_steps", "5", "--trainer.limit_val_batches", "0"]
    # the bar's step line only at the last step: a step line every 10 s printed (and read the loss) at any step of a
    # machine slow enough (a loaded CI runner), failing the count there
    bar = ["--trainer.callbacks+=epas_lightning.run_summary.StepRunProgressBar", "--trainer.callbacks.line_every_s=1e9"]
    cli = lightning_cli(["fit", "--config", DEBUG_CONFIG, *steps, *bar, "--trainer.callbacks+=helpers.HostReads"])
    reads = next(c for c in cli.trainer.callbacks if isinstance(c, HostReads))
    assert reads.logged == {4}  # log_every_n_steps: the 5th step; the last (6) prints the run's line and saves
    for step in (1, 2, 3, 5):
        assert reads.reads[step] == {"divergence.py:on_before_optimizer_step": 1}, step
    assert reads.reads[6]["run_summary.py:_print_line"] == 1  # the count sees the bar's read where it prints
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert f"7/7 steps · train/loss {loss:.4f} · " in capsys.readouterr().err
    assert cli.trainer.progress_bar_callback._metric_component._metrics["train/loss"] == loss  # the bar's, drawn last


@pytest.mark.parametrize("clip", [None, 0.05, -1.0])  # Lightning does not clip at <= 0 (ours reversed the gradients)
def test_grad_norm_is_logged_before_clipping_and_clipping_is_lightnings(tiny_corpus, tmp_path, clip):
    norms, logged = [], []

    class ReadNorms(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before clipping
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(trainer.callback_metrics["train/grad_norm"].item())

    def run(module, callbacks):
        logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
        trainer = make_trainer(tmp_path, 3, callbacks, gradient_clip_val=clip, logger=logger, log_every_n_steps=1)
        trainer.fit(module, data)
        return module.model.state_dict()

    module, data = make_run(tiny_corpus, n_layer=2)
    ours = run(module, [ReadNorms()])
    assert logged == pytest.approx(norms, rel=1e-5) and len(logged) == 3
    if clip is not None:  # the same clipping as Lightning's own: identical weights after three clipped steps
        assert min(norms) > clip
        module, data = make_run(tiny_corpus, n_layer=2)
        module.configure_gradient_clipping = module.clip_gradients  # LightningModule's default hook
        theirs = run(module, [])
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_nan_gradient_clip_value_from_python_is_refused_before_training_as_the_command_line_does(tmp_path):
    """``Trainer(gradient_clip_val=float("nan"))`` was not checked (the command line's .nan is): every gradient came
    out NaN."""
    from epas_lightning.errors import ConfigError

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    trainer = cpu_trainer(tmp_path, 2, gradient_clip_val=float("nan"))
    with pytest.raises(ConfigError) as refused:
        trainer.fit(module, data)
    assert str(refused.value) == (
        "trainer.gradient_clip_val must be a number, not nan — trainer.gradient_clip_val — set a positive number, or "
        "leave it unset for no clipping"
    )
    assert trainer.global_step == 0


def test_fp16_loss_scaling_clips_a_fused_optimizer_and_logs_the_unscaled_norm(tiny_corpus, tmp_path):
    """16-mixed with a fused optimizer (AdamW is fused by default on GPUs) and clipping raised Lightning's "does not
    allow for gradient clipping" at step 0, and no train/grad_norm was logged under fp16. Both now clip the same (SGD,
    where clipping shows in the weights)."""
    from lightning.pytorch.plugins import MixedPrecision

    class ReadNorms(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            norms.append(trainer.callback_metrics["train/grad_norm"].item())

    def run(fused):
        module, data = make_run(tiny_corpus, n_layer=2)
        module.optimizer_factory = lambda groups: torch.optim.SGD(groups, lr=0.1, fused=fused)
        plugin = MixedPrecision("16-mixed", "cpu")  # Lightning swaps a CPU's 16-mixed for bf16-mixed
        logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
        trainer = make_trainer(
            tmp_path, 2, [ReadNorms()], plugins=[plugin], gradient_clip_val=0.05, logger=logger, log_every_n_steps=1
        )
        trainer.fit(module, data)
        weights = [p.detach().clone() for p in module.model.parameters()]
        return list(norms), weights, plugin.scaler.get_scale()

    norms = []
    fused = run(True)
    norms.clear()
    foreach = run(False)

    assert fused[2] == foreach[2] == 65536.0  # no step was skipped
    assert fused[0] == pytest.approx(foreach[0], rel=1e-4) and min(fused[0]) > 0.05
    diffs = [(a - b).abs().max().item() for a, b in zip(fused[1], foreach[1], strict=True)]
    assert max(diffs) < 1e-5, diffs


def test_resume_mid_growth_matches_uninterrupted_run(tiny_corpus, tmp_path):
    def run(max_steps, ckpt_path=None, checkpoint=None):
        module, data = make_run(tiny_corpus)
        recorder = Recorder()
        callbacks = [ProgressiveSharing(target=3, interval=2), recorder] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(tmp_path / "run", max_steps, callbacks, gradient_clip_val=1.0)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return recorder, module

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    full, full_module = run(10, checkpoint=checkpoint)
    mid = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert mid.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, resumed_module = run(10, ckpt_path=mid)

    assert full.masks[2] == [3] and full.masks[9] == [1, 2, 3]  # the checkpoint is taken mid-growth
    assert sorted(resumed.losses) == list(range(3, 10))
    assert resumed.masks == {s: full.masks[s] for s in range(3, 10)}
    assert [resumed.losses[s] for s in range(3, 10)] == pytest.approx([full.losses[s] for s in range(3, 10)], rel=1e-6)
    assert resumed_module.model.sharing.mask.tolist() == full_module.model.sharing.mask.tolist()
    for (name, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_resume_with_another_schedule_says_what_it_does_to_the_trained_region(tiny_corpus, tmp_path, caplog):
    """The region follows the configured schedule from the resumed step. Where that shrinks the region the checkpoint
    trained, the layers that leave it compute again with q/k weights untouched since they started sharing: one warning
    names them (it printed only both settings dicts). A new target also restarts the 'full since' step. The warning
    and the step's line list the layers in growth order, as "N sharing layers" counts them (they were ascending)."""
    module, data = make_run(tiny_corpus)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 6, [ProgressiveSharing(target=2, interval=2), checkpoint]).fit(module, data)
    last = tmp_path / "ckpt" / "last.ckpt"  # layers 2-3 share, the full region since step 4

    def resume(sharing: ProgressiveSharing) -> EPASModule:
        module, data = make_run(tiny_corpus)
        make_trainer(tmp_path / "resumed", 7, [sharing]).fit(module, data, ckpt_path=last)
        return module

    slower = ProgressiveSharing(target=2, interval=4)
    says = (
        r"EPAS: resumed at step 6 with another sharing schedule than the checkpoint's \(interval 2 -> 4\): the region "
        r"goes from layers \[3, 2\] to \[3\]; layers \[2\] compute again with the q/k weights they had before they "
        r"shared \(keep the checkpoint's sharing settings to continue its region\)"
    )
    with pytest.warns(UserWarning, match=says):
        assert resume(slower).model.sharing.shared_layers == [3]
    wider = ProgressiveSharing(target=3, interval=2)
    with pytest.warns(UserWarning, match=r"\(target 2 -> 3\): the region goes from layers \[3, 2\] to \[3, 2, 1\]$"):
        assert resume(wider).model.sharing.shared_layers == [1, 2, 3]
    assert "EPAS: step 6: 3 sharing layer(s) [3, 2, 1]" in caplog.text
    assert wider.reached_at == 6  # not the step 4 at which the 2-layer region was full
    same = ProgressiveSharing(target=[3, 2], interval=2, start_step=2)  # the checkpoint's schedule, spelled out
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert resume(same).model.sharing.shared_layers == [2, 3]
    assert not [w for w in said if "another sharing schedule" in str(w.message)]  # it said "target 2 -> [3, 2]"


def test_checkpoint_holds_the_mask_and_the_schedule(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, 5, [ProgressiveSharing(target=2, interval=2), checkpoint])
    trainer.fit(module, data)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["model.sharing.mask"].tolist() == [False, False, True, True]
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ProgressiveSharing")]
    assert state["shared_layers"] == [2, 3] and state["interval"] == 2

    restored = EPASModule(module.config)
    restored.configure_model()
    restored.load_state_dict(ckpt["state_dict"])
    assert restored.model.sharing.shared_layers == [2, 3]


class ValidationRecord(Callback):
    """Per validation of a fit: what it logged, the mask it left, and the mask the next training batch found (listed
    before ProgressiveSharing, so it sees the mask before the schedule sets it again)."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []
        self.left: list[list[int]] = []
        self.found: dict[int, list[int]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.logged.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
            self.left.append(pl_module.model.sharing.shared_layers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.found[trainer.global_step] = pl_module.model.sharing.shared_layers


def test_validation_scores_the_asked_region_lengths_as_evaluate_does_and_leaves_the_training_region(
    tiny_corpus, tmp_path
):
    """``val_sharing_layers``: each validation (mid-epoch, and at the end, before last.ckpt is written) and ``test``
    score their batches at those lengths too, the numbers ``evaluate`` gives the checkpoint, and training goes on
    with the region it had."""
    from epas_lightning.evaluation.evaluate_cli import evaluation_summary

    module, data = make_run(tiny_corpus, n_layer=2)
    record = ValidationRecord()
    sharing = ProgressiveSharing(target=1, interval=3, val_sharing_layers=[1, 0])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(
        tmp_path, 4, [record, sharing, checkpoint], val_check_interval=2, limit_val_batches=2, limit_test_batches=2
    )
    trainer.fit(module, data)
    assert record.left == [[], [1]] and record.found == {0: [], 1: [], 2: [], 3: []}  # region [1] from step 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["sharing_region"]["layers"] == [1]
    mid, end = record.logged
    assert mid["val/loss_at_sharing/0"] == mid["val/loss"] != mid["val/loss_at_sharing/1"]
    assert end["val/loss_at_sharing/1"] == end["val/loss"]
    rows = evaluation_summary(tmp_path / "last.ckpt", "all", data=tiny_corpus, batches=2, batch_size=4)["rows"]
    (tested,) = trainer.test(module, data)
    for n, row in enumerate(rows):  # attention reuse in evaluate: the same model, other rounding
        assert end[f"val/loss_at_sharing/{n}"] == pytest.approx(row["val_loss"], rel=1e-5)
        assert tested[f"test/loss_at_sharing/{n}"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert module.model.sharing.shared_layers == [1]


def test_held_out_batches_switch_the_mask_between_regions_without_host_to_device_copies(
    tiny_corpus, tmp_path, monkeypatch
):
    """``val_sharing_layers`` switch the region k+1 times per held-out batch: each switch built the mask on the host
    and copied it to the device (on CUDA a sync). The mask of each region is made on the device once; later batches
    switch with device-side copies only, and the numbers are a direct forward's."""
    from epas_lightning.evaluation.perplexity import perplexity_of_batches
    from epas_lightning.model import sharing as sharing_module

    class CountingTorch:  # the sharing module's torch, counting the masks it builds from host data
        made = 0

        def __getattr__(self, name):
            return getattr(torch, name)

        def tensor(self, *args, **kwargs):
            CountingTorch.made += 1
            return torch.tensor(*args, **kwargs)

    class PerBatch(Callback):  # listed after ProgressiveSharing: sees each batch's switches
        made: list[int] = []

        def on_validation_batch_end(self, *args, **kwargs):
            self.made.append(CountingTorch.made)

    monkeypatch.setattr(sharing_module, "torch", CountingTorch())
    module, data = make_run(tiny_corpus, n_layer=2)
    record = ValidationRecord()
    sharing = ProgressiveSharing(target=1, interval=100, val_sharing_layers=[0, 1])  # dense throughout
    trainer = make_trainer(
        tmp_path, 1, [record, sharing, PerBatch()], val_check_interval=1, limit_val_batches=3, num_sanity_val_steps=0
    )
    trainer.fit(module, data)
    made = [b - a for a, b in zip([0, *PerBatch.made], PerBatch.made, strict=False)]
    assert len(made) == 3 and made[1:] == [0, 0], made
    assert module.model.sharing.shared_layers == [] and not module.model.sharing.mask.any()
    batches = list(islice(data.val_dataloader(), 3))
    for n, layers in enumerate(([], [1])):
        module.model.set_shared_layers(layers)
        assert module.model.sharing.mask.tolist() == [False, bool(layers)]
        direct = perplexity_of_batches(module.model, batches)["loss"]
        assert record.logged[-1][f"val/loss_at_sharing/{n}"] == pytest.approx(direct, rel=1e-6)


def test_a_validation_batch_with_a_nan_loss_makes_the_held_out_loss_nan():
    """torchmetrics' MeanMetric dropped a NaN batch with a UserWarning: val/loss (and val/loss_at_sharing/N) came out
    finite, the mean of the other batches, however many were NaN (an fp16 overflow, weights gone bad). A batch of
    nothing but pad rows adds nothing, and is no NaN."""
    module = EPASModule(LlamaConfig.from_name("debug", block_size=32))
    sharing = ProgressiveSharing(target=1, interval=1)
    sharing._val_regions = {1: [1]}
    sharing.on_validation_epoch_start(None, module)
    real, pad = torch.ones(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool)
    for mean in (module.val_loss, sharing._heldout[1]):
        mean.update(torch.full((64,), 2.0), real)
        mean.update(torch.zeros(64), pad)  # a rank's last batch, all padding
        assert mean.compute() == 2.0
        mean.update(torch.tensor([float("nan"), *[2.0] * 63]), real)
        assert mean.compute().isnan()


def test_held_out_loss_is_the_same_at_any_batch_size_and_scores_every_sequence_once(tiny_corpus, tmp_path):
    """Validation dropped a partial last batch: 13 held-out sequences scored 12 at batch size 3 or 4 and 7 at 7, so
    val/loss of a batch-size sweep came from other tokens each time. Every sequence is scored once now (the last
    batch padded with rows the loss leaves out), and val/loss is the loss over all of them."""
    from helpers import write_token_stream

    from epas_lightning.loss import next_token_loss

    val = write_token_stream(tmp_path / "val", [63, 36, 18])  # 7 + 4 + 2 = 13 sequences of 9 tokens
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=512, block_size=8)
    torch.manual_seed(0)
    module = EPASModule(config)
    results = []
    for batch_size in (3, 4, 7):
        data = TokenDataModule(str(tiny_corpus), seq_len=8, batch_size=batch_size, vocab_size=512, val_dir=str(val))
        (validated,) = cpu_trainer(tmp_path, 1, limit_val_batches=1.0).validate(module, data, verbose=False)
        results.append(validated)
    samples = torch.stack([torch.arange(9 * i, 9 * i + 9) for i in range(13)])  # the stream's, as written
    with torch.no_grad():
        expected = next_token_loss(module.model, samples).item()
    assert [r["val/tokens"] for r in results] == [13 * 8] * 3
    assert [r["val/loss"] for r in results] == pytest.approx([expected] * 3, rel=1e-6)


def test_validation_regions_run_in_the_trainer_precision(tiny_corpus, tmp_path):
    """The extra forwards run in a callback hook, outside the precision plugin's context around ``validation_step``:
    under ``bf16-mixed`` they ran in fp32 (other numbers than ``val/loss`` at the same region, and slower)."""
    module, data = make_run(tiny_corpus, n_layer=2)
    record = ValidationRecord()
    sharing = ProgressiveSharing(target=1, interval=100, val_sharing_layers=[0])  # dense throughout
    trainer = make_trainer(
        tmp_path, 1, [record, sharing], val_check_interval=1, limit_val_batches=1, precision="bf16-mixed"
    )
    trainer.fit(module, data)
    assert record.logged[-1]["val/loss_at_sharing/0"] == record.logged[-1]["val/loss"]


def test_validation_regions_under_fsdp2_with_compiled_blocks_compile_once(tiny_corpus, tmp_path):
    """Sharded (FSDP2, one rank) and compiled blocks: the extra losses are a direct forward's at that region, and a
    later validation compiles nothing new (the sharing flags are constants of each block's few graphs)."""
    from torch._dynamo.utils import counters

    from epas_lightning import FSDP2Strategy
    from epas_lightning.evaluation.perplexity import perplexity_of_batches

    graphs = []

    class CountGraphs(Callback):
        def on_validation_end(self, trainer, pl_module):
            graphs.append(counters["stats"]["unique_graphs"])

    module, data = make_run(tiny_corpus, n_layer=2)
    module.compile_blocks = "eager"  # dynamo's graphs and guards, no code generation
    record = ValidationRecord()
    sharing = ProgressiveSharing(target=1, interval=1, val_sharing_layers=[0, 1])
    trainer = make_trainer(
        tmp_path, 3, [record, sharing, CountGraphs()], val_check_interval=1, limit_val_batches=2,
        num_sanity_val_steps=0, strategy=FSDP2Strategy(),
    )  # fmt: skip
    trainer.fit(module, data)
    assert record.left == [[], [1], [1]] and graphs[1] == graphs[2]
    batches = list(islice(data.val_dataloader(), 2))
    for n, layers in enumerate(([], [1])):
        module.model.set_shared_layers(layers)
        direct = perplexity_of_batches(module.model, batches)["loss"]
        assert record.logged[-1][f"val/loss_at_sharing/{n}"] == pytest.approx(direct, rel=1e-6)


def test_numpy_numbers_in_the_settings_leave_a_checkpoint_that_loads(tmp_path):
    """A sweep's numpy values (``np.float64`` target, learning rate, init_std) went into the checkpoint as numpy
    objects, which ``weights_only=True`` refuses: neither ``--ckpt_path`` nor ``load_model`` could read the run."""
    import numpy as np

    from epas_lightning import load_model

    config = LlamaConfig.from_name("debug", n_layer=4, block_size=16, init_std=np.float64(0.02))
    module = EPASModule(config, optimizer=lambda params: torch.optim.AdamW(params, lr=np.float64(1e-3)))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    sharing = ProgressiveSharing(target=np.float64(0.5), interval=np.int64(1))
    make_trainer(tmp_path, 2, [sharing, checkpoint]).fit(module, data)
    assert load_model(tmp_path / "last.ckpt").region.layers == (3,)


def test_progressive_sharing_grows_the_llama_of_a_lightning_module_of_ones_own(tmp_path):
    """ProgressiveSharing needed EPASModule's ``config``, ``model`` and ``set_shared_layers``: a module of one's own
    holding the Llama under another name failed with an AttributeError; one without a Llama is told what it needs."""
    from epas_lightning import Llama
    from epas_lightning.errors import ConfigError
    from epas_lightning.loss import next_token_loss

    class Own(L.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return next_token_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    own = Own(Llama(LlamaConfig.from_name("debug", n_layer=4, block_size=16)))
    make_trainer(tmp_path, 2, [ProgressiveSharing(target=2, interval=1)]).fit(own, data)
    assert own.net.sharing.shared_layers == [3]
    with pytest.raises(ConfigError, match="found no epas_lightning.Llama in Own"):
        make_trainer(tmp_path, 1, [ProgressiveSharing(target=2)]).fit(Own(torch.nn.Linear(2, 2)), data)


def test_configure_model_is_idempotent_and_meta_init_leaves_no_garbage():
    from lightning.fabric.utilities.init import _materialize_distributed_module

    module = EPASModule(LlamaConfig.from_name("debug"))
    with torch.device("meta"):
        module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model
    _materialize_distributed_module(module, torch.device("cpu"))  # what ModelParallelStrategy does
    module.on_fit_start()
    reference = EPASModule(LlamaConfig.from_name("debug"))
    reference.configure_model()
    assert module.model.sharing.mask.tolist() == [False, False]
    for (name, p), q in zip(module.model.state_dict().items(), reference.model.state_dict().values(), strict=True):
        assert torch.isfinite(p).all(), name
        if p.ndim == 2:  # freshly drawn N(0, std): same statistics, not uninitialised memory
            assert abs(p.float().std().item() - q.float().std().item()) < 0.2 * q.float().std().item(), name
        else:
            torch.testing.assert_close(p, q, msg=name)


def test_schedule_too_large_for_the_model_fails_before_training(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus, n_layer=2)
    trainer = make_trainer(tmp_path, 2, [ProgressiveSharing(target=2)])
    with pytest.raises(ValueError, match="between 1 and n_layer - 1 = 1"):
        trainer.fit(module, data)


@pytest.mark.parametrize(
    ("model_vocab", "data_kwargs", "refused"),
    [
        (512, {"seq_len": 64}, r"ConfigError: the data's seq_len \(64\) is not the model's block_size \(32\)"),
        (512, {"seq_len": 16}, r"ConfigError: the data's seq_len \(16\) is not the model's block_size \(32\)"),
        (256, {"vocab_size": 512}, r"ConfigError: the data's vocab_size \(512\) is not the model's \(256\)"),
        (256, {"vocab_size": None}, r"DataError: the tokenizer has 512 tokens but the model's vocab_size is 256"),
    ],
    ids=["longer", "shorter", "other-vocab", "vocab-unset"],
)
def test_data_that_does_not_fit_the_model_is_refused_before_training(
    tiny_corpus, tmp_path, model_vocab, data_kwargs, refused
):
    """A script of one's own passes the model and the data their lengths and vocabularies separately (the CLI links
    them): a longer seq_len failed in the first forward, a shorter one trained the model at another length than its
    block_size, and a tokenizer larger than the model's vocabulary failed inside the embedding (IndexError)."""
    from epas_lightning.errors import UserError

    module = EPASModule(LlamaConfig.from_name("debug", block_size=32, vocab_size=model_vocab))
    data = TokenDataModule(
        data_dir=str(tiny_corpus), **{"seq_len": 32, "batch_size": 4, "vocab_size": 512, **data_kwargs}
    )
    with pytest.raises(UserError) as error:
        make_trainer(tmp_path, 1, []).fit(module, data)
    assert re.search(refused, f"{type(error.value).__name__}: {error.value}")
    assert module.model is None  # before the model was built


def test_pure_fp16_training_is_refused_before_it_starts(tiny_corpus, tmp_path):
    """16-true keeps fp16 weights and AdamW state with no loss scaling: eps 1e-8 is 0 in fp16, so the first update
    divided 0 by 0 and the run died at step 1 with "non-finite loss"; ``fit`` now refuses it up front."""
    from epas_lightning.errors import ConfigError

    module, data = make_run(tiny_corpus, n_layer=2)
    with pytest.raises(ConfigError, match="16-true") as refused:
        make_trainer(tmp_path, 2, [], precision="16-true").fit(module, data)
    assert "bf16-true" in str(refused.value) and "16-mixed" in str(refused.value)
    assert module.model is None  # nothing was built


def test_a_resume_on_data_of_another_tokenizer_is_refused_as_such(tiny_corpus, tmp_path):
    """Data prepared with another tokenizer than the checkpoint trained with was refused only for its other streams,
    with advice to start from the weights with init_from (refused again, for the tokenizer); streams that resolve to
    the same files trained on, their ids read as other tokens. The tokenizer is named first, before any weight loads,
    with the data folder the checkpoint trained on (a resume that left out its --data.data_dir read the built-in
    corpus, and was told only to prepare data with the checkpoint's tokenizer)."""
    from helpers import record_tokenizer_of

    from epas_lightning.errors import DataError

    last = train_tiny_checkpoint(tiny_corpus, tmp_path, ProgressiveSharing(target=1, interval=2), steps=1)
    other = tmp_path / "other"  # the same streams, with two ids of the tokenizer swapped: another vocabulary
    other.mkdir()
    for name in ("train", "val"):
        (other / name).symlink_to(tiny_corpus / name)
    (other / "tokenizer.json").write_text(swapped_vocab(tiny_corpus / "tokenizer.json"))
    record_tokenizer_of(other, tiny_corpus)
    module, _ = make_run(tiny_corpus)
    data = TokenDataModule(data_dir=str(other), seq_len=32, batch_size=4, vocab_size=module.config.vocab_size)
    says = rf"prepared with another tokenizer \({other / 'tokenizer.json'}\) than the checkpoint's \(.*tokenizer.json\)"
    fix = rf"set data.data_dir to {tiny_corpus} \(the data the checkpoint trained on\), or use data prepared with"
    with pytest.raises(DataError, match=says + rf".* — data.data_dir {other} — {fix} --tokenizer"):
        make_trainer(tmp_path / "resumed", 2, []).fit(module, data, ckpt_path=last)


def swapped_vocab(tokenizer_json: Path) -> str:
    """The text of ``tokenizer_json`` with two ids swapped: another vocabulary of the same size."""
    import json

    tokenizer = json.loads(tokenizer_json.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return json.dumps(tokenizer)


def test_a_resume_on_its_data_folder_prepared_again_with_another_tokenizer_is_refused(tiny_corpus, tmp_path):
    """`prepare --overwrite` of the run's own data folder with another tokenizer resumed silently: the checkpoint
    names the folder's tokenizer file, which then held the new vocabulary (or was gone, another format). The
    checkpoint records the file's hash."""
    import shutil

    from helpers import record_tokenizer_of

    from epas_lightning.errors import DataError

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("train", "val", "meta.json"):
        (data_dir / name).symlink_to(tiny_corpus / name)
    shutil.copy(tiny_corpus / "tokenizer.json", data_dir / "tokenizer.json")
    last = train_tiny_checkpoint(data_dir, tmp_path, ProgressiveSharing(target=1, interval=2), steps=1)
    (data_dir / "tokenizer.json").write_text(swapped_vocab(tiny_corpus / "tokenizer.json"))  # prepared again
    (data_dir / "meta.json").unlink()
    record_tokenizer_of(data_dir, tiny_corpus)
    module, data = make_run(data_dir)
    with pytest.raises(DataError, match=rf"tokenizer {data_dir / 'tokenizer.json'} changed since the checkpoint"):
        make_trainer(tmp_path / "resumed", 2, []).fit(module, data, ckpt_path=last)


def test_checkpoints_record_the_tokenizer_the_run_read_though_its_file_changes_or_goes(tiny_corpus, tmp_path):
    """The hash was taken at every save: a data folder prepared again mid-run made later checkpoints record the new
    vocabulary (so the resume check passed), and a tokenizer file removed mid-run made the save raise."""
    import shutil

    from epas_lightning.data.tokenizer import file_sha256

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("train", "val", "meta.json"):
        (data_dir / name).symlink_to(tiny_corpus / name)
    shutil.copy(tiny_corpus / "tokenizer.json", data_dir / "tokenizer.json")

    class RemoveTokenizer(Callback):
        def on_train_start(self, trainer, pl_module):
            (data_dir / "tokenizer.json").unlink()

    last = train_tiny_checkpoint(data_dir, tmp_path, RemoveTokenizer(), steps=1)
    recorded = torch.load(last, weights_only=True)["tokenizer"]["sha256"]
    assert recorded == file_sha256(tiny_corpus / "tokenizer.json")


def test_validate_and_test_from_a_checkpoint_use_its_mask(tiny_corpus, tmp_path):
    module, data = make_run(tiny_corpus)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, 5, [ProgressiveSharing(target=2, interval=2), checkpoint])
    trainer.fit(module, data)
    eval_trainer = make_trainer(tmp_path, 1, [], limit_val_batches=3, limit_test_batches=3)
    expected = eval_trainer.validate(module, data)[0]["val/loss"]

    fresh, fresh_data = make_run(tiny_corpus)
    (metrics,) = make_trainer(tmp_path, 1, [], limit_val_batches=3).validate(
        fresh, fresh_data, ckpt_path=tmp_path / "last.ckpt"
    )
    assert fresh.model.sharing.shared_layers == [2, 3]
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)
    (tested,) = make_trainer(tmp_path, 1, [], limit_test_batches=3).test(fresh, fresh_data)
    assert tested["test/loss"] == pytest.approx(expected, rel=1e-6) and tested["test/ppl"] > 1


@pytest.mark.parametrize(
    "changed", [{"rope_theta": 500000.0}, {"n_embd": 32, "n_head": 2}], ids=["same-shapes", "shapes"]
)
def test_resuming_a_checkpoint_of_another_architecture_is_refused_in_one_line(tiny_corpus, tmp_path, changed):
    """``Trainer.fit(ckpt_path=...)`` from a script: another width failed with a wall of load_state_dict size
    mismatches; another RoPE base, same shapes, silently went on training a different function."""
    from epas_lightning.errors import CheckpointError

    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    other = EPASModule(LlamaConfig.from_name("debug", block_size=32, **changed))
    with pytest.raises(CheckpointError, match="model.config does not match the checkpoint") as refused:
        make_trainer(tmp_path, 2, []).fit(other, data, ckpt_path=tmp_path / "last.ckpt")
    assert all(f"{field}: model" in str(refused.value) for field in changed)
    assert "\n" not in str(refused.value)


def test_resuming_with_another_optimizer_is_refused_in_one_line(tiny_corpus, tmp_path):
    """A run trained with SGD resumed under the default AdamW: torch's KeyError 'step' traceback while loading."""
    from functools import partial

    from epas_lightning.errors import CheckpointError

    sgd = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    module, data = make_run(tiny_corpus, n_layer=2)
    module.optimizer_factory = sgd
    make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    with pytest.raises(CheckpointError, match=r"not the configured AdamW's \(it has dampening, momentum, nesterov;"):
        make_trainer(tmp_path, 2, []).fit(make_run(tiny_corpus, n_layer=2)[0], data, ckpt_path=tmp_path / "last.ckpt")
    module = make_run(tiny_corpus, n_layer=2)[0]
    module.optimizer_factory = sgd  # the run's own optimizer resumes
    make_trainer(tmp_path, 2, []).fit(module, data, ckpt_path=tmp_path / "last.ckpt")


class SGDModule(EPASModule):
    """A module of one's own that builds its optimizer itself (no ``model.optimizer``)."""

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def test_a_module_building_its_own_optimizer_resumes_its_checkpoint(tiny_corpus, tmp_path):
    """A subclass's own ``configure_optimizers`` (SGD) resumed its run's checkpoint; the early check compared it to
    the default AdamW (the module's ``optimizer`` unset) and refused it as another optimizer's state."""
    module, data = make_run(tiny_corpus, n_layer=2, module_class=SGDModule)
    make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    module = make_run(tiny_corpus, n_layer=2, module_class=SGDModule)[0]
    make_trainer(tmp_path, 2, []).fit(module, data, ckpt_path=tmp_path / "last.ckpt")
    assert module.trainer.global_step == 2
    assert isinstance(module.trainer.optimizers[0], torch.optim.SGD)


class MigratingModule(EPASModule):
    """A module of one's own that rewrites an older checkpoint as it loads (a model setting renamed since)."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"]["rope_theta"] = checkpoint["model_config"].pop("old_rope_theta")
        super().on_load_checkpoint(checkpoint)


class MigratingData(TokenDataModule):
    """A data module of one's own that rewrites an older checkpoint's position as it loads (its default seed was
    written as -1)."""

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["position_settings"]["seed"] == -1:
            state_dict["position_settings"]["seed"] = self.seed
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("rewriter", ["module", "data"])
def test_a_run_that_rewrites_its_checkpoint_as_it_loads_resumes_it(rewriter, tiny_corpus, tmp_path):
    """A module's own ``on_load_checkpoint`` (a data module's own ``load_state_dict``) that rewrites an older
    checkpoint as it loads resumed it; the early checks read the checkpoint as it lies on disk and refused it (another
    model config, another data position): they wait for the rewrite where one's own hook reads it."""
    module_class = MigratingModule if rewriter == "module" else EPASModule
    module, _ = make_run(tiny_corpus, n_layer=2, module_class=module_class)
    data = MigratingData(data_dir=str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=512)
    if rewriter == "module":
        data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=512)
    make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    older = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if rewriter == "module":
        older["model_config"]["old_rope_theta"] = older["model_config"].pop("rope_theta")
    else:
        older["MigratingData"]["position_settings"]["seed"] = -1
    torch.save(older, tmp_path / "last.ckpt")
    module = make_run(tiny_corpus, n_layer=2, module_class=module_class)[0]
    make_trainer(tmp_path, 2, []).fit(module, data, ckpt_path=tmp_path / "last.ckpt")
    assert module.trainer.global_step == 2


def test_a_checkpoint_io_of_ones_own_resumes_the_checkpoints_it_wrote(tiny_corpus, tmp_path):
    """A ``CheckpointIO`` of one's own that keeps the checkpoint inside a dict of its own resumed its checkpoints; the
    early check read the file with ``torch.load`` (no ``lr_schedulers`` at its top) and refused it as weights-only."""
    from lightning.fabric.plugins import TorchCheckpointIO

    class WrappingIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):  # noqa: ANN001, ANN202
            super().save_checkpoint({"wrapped": checkpoint}, path, storage_options)

        def load_checkpoint(self, path, map_location=None, weights_only=None):  # noqa: ANN001, ANN202
            return super().load_checkpoint(path, map_location, weights_only)["wrapped"]

    module, data = make_run(tiny_corpus, n_layer=2)
    saves = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, 1, [saves], plugins=[WrappingIO()]).fit(module, data)
    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, 2, [], plugins=[WrappingIO()]).fit(module, data, ckpt_path=tmp_path / "last.ckpt")
    assert module.trainer.global_step == 2


@pytest.mark.parametrize(
    "case",
    ["optimizer", "optimizer-sharded", "weights-only", "model", "seed", "seed-older", "seed-legacy", "tokenizer"],
)
def test_a_resume_its_checkpoint_metadata_refuses_is_refused_before_the_checkpoint_loads(
    case, tiny_corpus, tmp_path, monkeypatch
):
    """``Trainer.fit(ckpt_path=...)`` refused another optimizer's state, a weights-only save, another model config,
    another data seed (also from the loader state of a checkpoint older than the data module's settings) and data of
    another tokenizer once Lightning had loaded the whole checkpoint, weights and optimizer state: minutes for a large
    model. Its metadata says them all: refused before it loads. A sharded checkpoint of another optimizer failed as
    unreadable shards ("copy it again"): its metadata names the optimizer's settings."""
    from functools import partial

    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    from epas_lightning import FSDP2Strategy, safe_load
    from epas_lightning.errors import CheckpointError, DataError

    module, data = make_run(tiny_corpus, n_layer=2)
    if case.startswith("optimizer"):
        module.optimizer_factory = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    saves = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=case == "weights-only")
    strategy = FSDP2Strategy if case == "optimizer-sharded" else lambda: "auto"
    make_trainer(tmp_path, 1, [saves], strategy=strategy()).fit(module, data)
    assert (tmp_path / "last.ckpt").is_dir() == (case == "optimizer-sharded")  # a sharded save is a folder
    if case == "seed-older":  # written before TokenDataModule saved its settings: litdata's loader state says them
        older = torch.load(tmp_path / "last.ckpt", weights_only=True)
        del older["TokenDataModule"]
        torch.save(older, tmp_path / "last.ckpt")
    if case == "seed-legacy":  # a legacy file (not a zip) cannot be mapped: its metadata is read whole, once
        legacy = torch.load(tmp_path / "last.ckpt", weights_only=True)
        torch.save(legacy, tmp_path / "last.ckpt", _use_new_zipfile_serialization=False)
    if case == "tokenizer":  # the data's tokenizer.json is not the one the checkpoint read
        other = torch.load(tmp_path / "last.ckpt", weights_only=True)
        other["tokenizer"]["sha256"] = "0" * 64
        torch.save(other, tmp_path / "last.ckpt")
    module, data = make_run(tiny_corpus, n_layer=3 if case == "model" else 2)
    if case.startswith("seed"):
        data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=512, seed=7)
    said = {
        "optimizer": (CheckpointError, r"not the configured AdamW's \(it has dampening, momentum, nesterov;"),
        "optimizer-sharded": (CheckpointError, r"not the configured AdamW's \(it has dampening, momentum, nesterov;"),
        "weights-only": (CheckpointError, "a weights-only checkpoint .* holds no training state to resume"),
        "model": (CheckpointError, "model.config does not match the checkpoint"),
        "seed": (DataError, r"holds only for the data settings it was saved with \(seed 42 -> 7\)"),
        "seed-older": (DataError, r"holds only for the data settings it was saved with \(seed 42 -> 7\)"),
        "seed-legacy": (DataError, r"holds only for the data settings it was saved with \(seed 42 -> 7\)"),
        "tokenizer": (DataError, "tokenizer .*tokenizer.json changed since the checkpoint"),
    }

    def load(connector, checkpoint_path=None, weights_only=None):
        assert not checkpoint_path, f"Lightning loaded {checkpoint_path} before the refusal"

    monkeypatch.setattr(_CheckpointConnector, "resume_start", load)
    with pytest.raises(said[case][0], match=said[case][1]) as refused:
        make_trainer(tmp_path, 2, [], strategy=strategy()).fit(module, data, ckpt_path=tmp_path / "last.ckpt")
    assert "\n" not in str(refused.value)
    assert (str(tmp_path / "last.ckpt") in str(refused.value)) == (case != "tokenizer")  # that one names the data
    assert safe_load._LEGACY_READS._kept is None  # a legacy file's whole read, kept for the next look, is freed


def test_a_script_fit_says_when_no_region_grows_or_a_checkpoint_could_save_inside_a_step(tmp_path):
    """A Trainer of one's own without ProgressiveSharing trained dense, and one with a plain ModelCheckpoint (or a
    subclass of it, also under `trainer.callbacks`) under gradient accumulation saved inside optimizer steps: all
    silently."""
    from epas_lightning import StepCheckpoint

    config = LlamaConfig.from_name("debug", n_layer=2, block_size=8)
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 9)), batch_size=2)

    class EveryStepCheckpoint(ModelCheckpoint):  # a subclass: the command line leaves it as it is
        pass

    runs = {
        "plain": [ModelCheckpoint(dirpath=tmp_path / "plain")],
        "ours": [ProgressiveSharing(target=1, interval=1), StepCheckpoint(dirpath=tmp_path / "ours")],
        "subclass": [ProgressiveSharing(target=1, interval=1), EveryStepCheckpoint(dirpath=tmp_path / "subclass")],
    }
    said = {}
    for name, callbacks in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path / name, 1, callbacks, accumulate_grad_batches=2).fit(EPASModule(config), data)
        said[name] = " ".join(str(w.message) for w in caught)
    assert "no ProgressiveSharing among the Trainer's callbacks" in said["plain"]
    assert "use epas_lightning.StepCheckpoint (the same arguments)" in said["plain"]
    assert "ProgressiveSharing" not in said["ours"] and "StepCheckpoint" not in said["ours"]
    subclass = "EveryStepCheckpoint (ModelCheckpoint's subclass, not StepCheckpoint's) saves inside an optimizer step"
    assert f"{subclass} under accumulate_grad_batches=2 when" in said["subclass"] and "subclass" not in said["plain"]
    assert "micro-batches; derive it from epas_lightning.StepCheckpoint instead" in said["subclass"]


def test_a_batch_or_input_the_model_cannot_take_and_a_model_not_built_yet_are_one_line(tmp_path):
    """A TensorDataset's batches (a list holding the tensor) failed with "'list' object has no attribute 'shape'", an
    unbuilt module's forward with "'NoneType' object is not callable"."""
    from epas_lightning.errors import ConfigError, DataError

    rows = torch.utils.data.TensorDataset(torch.randint(0, 512, (4, 9)))
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=8))
    with pytest.raises(DataError, match=r"tensor of token ids, got a list — the Trainer's dataloader — use TokenDat"):
        make_trainer(tmp_path, 1, []).fit(module, torch.utils.data.DataLoader(rows, batch_size=2))
    with pytest.raises(ValueError, match=r"^input_ids must be a \(batch, seq_len\) tensor of token ids, not a list$"):
        module.model([[1, 2, 3]])
    unbuilt = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=8))  # "'NoneType' is not callable"
    for use in (lambda: unbuilt(torch.zeros(1, 4, dtype=torch.long)), lambda: unbuilt.set_shared_layers([1])):
        with pytest.raises(
            ConfigError, match=r"^the model is not built yet: .* — call module.configure_model\(\) first"
        ):
            use()


def test_load_from_checkpoint_outside_a_trainer_reads_the_weights_and_checks_the_config(tmp_path):
    """``EPASModule.load_from_checkpoint(path, config=config)`` (Lightning's way back to a module in a notebook) failed
    in ``on_load_checkpoint`` with "EPASModule is not attached to a `Trainer`"."""
    from epas_lightning.errors import CheckpointError

    config = LlamaConfig.from_name("debug", block_size=16)
    module = EPASModule(config)
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (2, 17)), batch_size=2)
    make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    expected = module.state_dict()
    for loaded in (  # without config=, the one the checkpoint records (Lightning's own failed: no hyper_parameters)
        EPASModule.load_from_checkpoint(tmp_path / "last.ckpt", config=config),
        EPASModule.load_from_checkpoint(tmp_path / "last.ckpt"),
    ):
        assert loaded.config == config
        assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="a folder, not a .ckpt file — EPASModule.load_from_checkpoint"):
        EPASModule.load_from_checkpoint(tmp_path)
    other = LlamaConfig.from_name("debug", block_size=16, rope_theta=500000.0)
    with pytest.raises(
        CheckpointError,
        match="rope_theta: model .* — EPASModule.load_from_checkpoint — leave config= out: the checkpoint's own",
    ):
        EPASModule.load_from_checkpoint(tmp_path / "last.ckpt", config=other)


@pytest.mark.parametrize("config", [{"name": "debug"}, "debug"], ids=["dict", "name"])
def test_a_config_that_is_not_a_llama_config_is_one_line(config):
    """``EPASModule({"name": "debug"})`` (the YAML's form) raised "'dict' object has no attribute 'n_layer'"."""
    from epas_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config must be a LlamaConfig, not a (dict|str) — EPASModule\(config=...\)"):
        EPASModule(config)
    from epas_lightning import Llama, estimate_flops, load_hf_state  # each an AttributeError on the config

    for build, where in [
        (Llama, r"Llama\(config=...\)"),
        (lambda c: estimate_flops(c, 0, 8), "config"),
        (lambda c: load_hf_state("/nowhere", c), r"load_hf_state\(config=...\)"),
    ]:
        with pytest.raises(ConfigError, match=rf"^config must be a LlamaConfig, not a (dict|str) — {where} — "):
            build(config)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # failed in fit: "is not callable"
    with pytest.raises(
        ConfigError, match=r"optimizer must be a callable that builds one, not a SGD object — EPASModule"
    ):
        EPASModule(LlamaConfig.from_name("debug"), optimizer=optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(ConfigError, match=r"lr_scheduler must be a callable that builds one, not a StepLR object"):
        EPASModule(LlamaConfig.from_name("debug"), lr_scheduler=scheduler)


def test_sharded_checkpoints_are_replaced_whole_and_a_killed_save_leaves_no_trace(tiny_corpus, tmp_path):
    """FSDP2 sharded checkpoints are written beside the target and renamed into place: a save killed halfway (its
    partial folder left behind) is cleaned by the next, the previous checkpoint is swapped out whole, and DCP never
    overwrites shards in place (which would mix two steps' shards if the save died)."""
    import warnings

    from epas_lightning import FSDP2Strategy, load_model

    module, data = make_run(tiny_corpus)
    ckpt_dir = tmp_path / "ckpt"
    (ckpt_dir / ".last.ckpt.saving").mkdir(parents=True)  # what a killed save leaves
    (ckpt_dir / ".last.ckpt.saving" / "__0_0.distcp").write_bytes(b"partial")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2, save_top_k=0)
    trainer = make_trainer(
        tmp_path, 4, [ProgressiveSharing(target=1, interval=2), checkpoint], strategy=FSDP2Strategy()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    assert not [w for w in caught if "existing checkpoint" in str(w.message)]  # never overwritten in place
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # saved twice; nothing left beside it
    assert (ckpt_dir / "last.ckpt" / ".metadata").is_file()
    assert torch.load(ckpt_dir / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 4
    assert load_model(ckpt_dir / "last.ckpt").model.sharing.shared_layers == [3]


def test_a_sharded_checkpoint_mixing_two_saves_is_refused_in_one_line(tiny_corpus, tmp_path):
    """A folder with the .metadata of one save and the .distcp shard (or meta.pt) of another, same layout and sizes,
    resumed silently: weights and optimizer of one step, counters of another. Each save's id refuses it now."""
    import shutil

    from epas_lightning import FSDP2Strategy
    from epas_lightning.errors import CheckpointError
    from epas_lightning.safe_load import verify_checkpoint

    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    make_trainer(tmp_path, 2, [checkpoint], strategy=FSDP2Strategy()).fit(module, datamodule=data)
    first, second = (tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt" for step in (1, 2))
    for name in ("__0_0.distcp", "meta.pt", ".metadata"):
        mixed = shutil.copytree(second, tmp_path / f"mixed{name}")
        shutil.copy(first / name, mixed / name)
        with pytest.raises(CheckpointError, match="its files come from two saves") as refused:
            verify_checkpoint(mixed)
        assert str(mixed) in str(refused.value) and "\n" not in str(refused.value)
    damaged = shutil.copytree(second, tmp_path / "damaged")  # bytes changed in place: it said "from two saves"
    shard = bytearray((damaged / "__0_0.distcp").read_bytes())
    shard[::97] = bytes((b + 77) % 256 for b in shard[::97])
    (damaged / "__0_0.distcp").write_bytes(shard)
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt or of another save: it holds no save record"):
        verify_checkpoint(damaged)
    assert verify_checkpoint(second) == second


@pytest.mark.parametrize("sharded", [False, True])
def test_a_graceful_stop_never_writes_through_a_linked_last_ckpt(tiny_corpus, tmp_path, sharded):
    """With ``save_last: link`` last.ckpt is a link to the newest top-k checkpoint: the stop's save replaces the link
    with a checkpoint of its own instead of overwriting the linked one (or failing to remove a link as a folder)."""
    from epas_lightning import FSDP2Strategy, GracefulStop

    stop = GracefulStop()
    module, data = make_run(tiny_corpus)
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last="link", every_n_train_steps=2, save_top_k=1)
    strategy = {"strategy": FSDP2Strategy()} if sharded else {}
    make_trainer(tmp_path, 100, [SignalInStep(stop, 4), stop, checkpoint], **strategy).fit(module, datamodule=data)
    assert stop.exit_status == 143
    for path in ckpt_dir.glob("epoch=*-step=*.ckpt"):  # each still holds the step it is named after
        meta = path / "meta.pt" if sharded else path
        assert torch.load(meta, weights_only=True)["global_step"] == int(path.stem.split("step=")[1])
    last = ckpt_dir / "last.ckpt"
    assert torch.load(last / "meta.pt" if sharded else last, weights_only=True)["global_step"] == 4


def test_last_ckpt_holds_the_step_training_ended_at(tiny_corpus, tmp_path):
    """Lightning writes last.ckpt only beside a scheduled save: 5 steps saving every 2 ended with last.ckpt at step 4
    (a 3815-step run saving every 500 lost its last 315 steps). The run's checkpoint writes the final step too, within
    the epoch it is in: Lightning counts an epoch that max_steps ends as done."""
    from epas_lightning.run_checkpoint import RunCheckpoint

    module, data = make_run(tiny_corpus)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, 5, [checkpoint]).fit(module, datamodule=data)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"
    ]  # fmt: skip
    # max_steps ended the run mid-epoch: a resume goes on in epoch 0 (it began epoch 1; max_epochs 1 trained nothing)
    module, data = make_run(tiny_corpus)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, -1, [checkpoint], max_epochs=1, limit_train_batches=7)
    trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert (trainer.global_step, trainer.current_epoch) == (7, 1)
    assert (tmp_path / "ckpt" / "epoch=0-step=6.ckpt").exists()


def test_fast_dev_run_writes_no_checkpoint(tiny_corpus, tmp_path):
    """Lightning says fast_dev_run suppresses checkpointing, yet its end-of-training save wrote last.ckpt (a new
    last-vN.ckpt each run) into the working folder's checkpoints/."""
    from epas_lightning.run_checkpoint import RunCheckpoint

    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, -1, [RunCheckpoint(save_last=True)], fast_dev_run=2).fit(module, datamodule=data)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_from_before_run_checkpoint_resumes_its_checkpoint_state(tiny_corpus, tmp_path):
    """Checkpoints written when the run's checkpoint was a plain ModelCheckpoint keep its state under that class's
    key: Lightning asked for "the following callbacks: ['ModelCheckpoint{...}']" and restored nothing, so the best
    checkpoint it had kept (top 1 here) was never replaced and stayed on disk for ever."""
    import warnings

    from epas_lightning.run_checkpoint import RunCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None) -> None:
        checkpoint = RunCheckpoint(tmp_path / "ckpt", monitor="step", mode="max", every_n_train_steps=2, save_last=True)
        make_trainer(tmp_path, max_steps, [checkpoint]).fit(*make_run(tiny_corpus, n_layer=2), ckpt_path=ckpt_path)

    fit(2)
    saved = tmp_path / "ckpt" / "last.ckpt"
    older = torch.load(saved, weights_only=True)
    older["callbacks"] = {key.replace("RunCheckpoint", "ModelCheckpoint"): s for key, s in older["callbacks"].items()}
    torch.save(older, saved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(4, saved)
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_a_resume_under_gradient_accumulation_saves_no_half_step(tiny_corpus, tmp_path):
    """Resumed at a step its interval divides, Lightning's checkpoint saved that step again after the first
    micro-batch of the next one, over the file it resumed (or as 'epoch=0-step=2-v1.ckpt' beside it) and last.ckpt:
    half an accumulation window, whose resume skips a micro-batch and steps on the other alone."""
    from epas_lightning.run_checkpoint import RunCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None) -> None:
        checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
        trainer = make_trainer(tmp_path, max_steps, [checkpoint], accumulate_grad_batches=2)
        trainer.fit(*make_run(tiny_corpus, n_layer=2), ckpt_path=ckpt_path)

    fit(2)
    fit(4, tmp_path / "ckpt" / "last.ckpt")
    for path in (tmp_path / "ckpt").iterdir():  # whole windows of 2 micro-batches: 2 batches read per step
        saved = torch.load(path, weights_only=True)
        batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"]
        assert (path.name, batches) == (path.name, 2 * saved["global_step"])


def test_an_epochs_short_last_step_takes_the_mean_gradient_of_its_micro_batches(tiny_corpus, tmp_path):
    """An epoch of 2 batches under accumulation over 4 ends in a step of 2 micro-batches: Lightning divides each loss
    by 4, so that step's gradient was half the mean of its micro-batches (the logged norm, clipping and the update
    with it). It is the gradient of a full step over those 2, as accumulation over 2 gives it."""
    weights = {}
    for accumulate in (2, 4):
        module, data = make_run(tiny_corpus, n_layer=2)
        module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=1.0)  # the update is the gradient
        step = {"accumulate_grad_batches": accumulate, "gradient_clip_val": 1e6}  # clipping by norm logs the norm
        trainer = make_trainer(tmp_path, 1, [], limit_train_batches=2, **step)
        trainer.fit(module, data)
        norm = float(trainer.callback_metrics["train/grad_norm"])
        weights[accumulate] = ({k: v.clone() for k, v in module.model.state_dict().items()}, norm)
    (short, short_norm), (full, full_norm) = weights[4], weights[2]
    assert short_norm == pytest.approx(full_norm, rel=1e-5)
    for name in full:
        torch.testing.assert_close(short[name], full[name], msg=name)


@pytest.mark.parametrize("listed", [False, True], ids=["run checkpoint", "trainer.callbacks ModelCheckpoint"])
def test_a_validation_inside_an_optimizer_step_saves_when_the_step_is_done(tiny_corpus, tmp_path, listed):
    """Validating every 3 micro-batches under accumulation over 2, the run's checkpoint (and a ModelCheckpoint of
    trainer.callbacks, which the CLI passes to save_between_steps) saved after micro-batch 3 (step 1 and half of
    step 2): a resume lost that half and stepped on the other micro-batch alone."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from epas_lightning.run_checkpoint import RunCheckpoint, save_between_steps

    kind = ModelCheckpoint if listed else RunCheckpoint
    checkpoint = kind(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, monitor="val/loss")
    save_between_steps([checkpoint])
    validation = {"val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    make_trainer(tmp_path, 4, [checkpoint], accumulate_grad_batches=2, **validation).fit(*make_run(tiny_corpus, 2))
    saved = _saved_steps(tmp_path / "ckpt")
    end = {} if listed else {4: 8}  # only the run's checkpoint writes last.ckpt at the end of every run
    assert saved == {2: 4, 3: 6, **end}  # after the validations at micro-batches 3 and 6


def test_an_early_stop_inside_an_optimizer_step_ends_the_run_when_the_step_is_done(tiny_corpus, tmp_path):
    """EarlyStopping at the validation after micro-batch 3 (accumulation over 2) ended the run there, and last.ckpt
    held step 1 and half of step 2: a resume lost that half. The run now ends once step 2 is done, saving it, with no
    second validation there."""
    from lightning.pytorch.callbacks import EarlyStopping

    from epas_lightning.run_checkpoint import RunCheckpoint

    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    stop = EarlyStopping(monitor="val/loss", stopping_threshold=1e9)  # stops at the first validation
    validation = {"val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    trainer = make_trainer(tmp_path, 8, [checkpoint, stop], accumulate_grad_batches=2, **validation)
    trainer.fit(*make_run(tiny_corpus, 2))
    assert _saved_steps(tmp_path / "ckpt") == {2: 4}
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 1


def test_a_save_due_by_time_inside_an_optimizer_step_waits_for_its_end(tiny_corpus, tmp_path, monkeypatch):
    """train_time_interval elapsing inside an optimizer step (at micro-batch 3 here, accumulation over 2) saved there:
    step 1 and half of step 2. The save now waits until step 2 is done."""
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import model_checkpoint

    from epas_lightning.run_checkpoint import RunCheckpoint

    clock = SimpleNamespace(now=0.0)

    class Clock(Callback):  # the hour has passed from micro-batch 3 on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.now = 3600.0 if batch_idx >= 2 else 0.0

    monkeypatch.setattr(model_checkpoint, "time", SimpleNamespace(monotonic=lambda: clock.now))
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", train_time_interval=timedelta(hours=1), save_top_k=-1)
    make_trainer(tmp_path, 4, [Clock(), checkpoint], accumulate_grad_batches=2).fit(*make_run(tiny_corpus, 2))
    assert _saved_steps(tmp_path / "ckpt") == {2: 4}


def test_max_time_inside_an_optimizer_step_ends_the_run_when_the_step_is_done(tiny_corpus, tmp_path, monkeypatch):
    """max_time's Timer, elapsed at micro-batch 4 (accumulation over 3), ended the run there (last.ckpt: step 1 and a
    third of step 2); then, holding that stop, Lightning validated again at each micro-batch left in the step. The run
    now ends once step 2 is done, without a validation (none is due there: the one Lightning runs when a fit stops
    early is left out where max_time ends it)."""
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import timer

    from epas_lightning.run_checkpoint import RunCheckpoint

    clock = SimpleNamespace(now=0.0)

    class Clock(Callback):  # the hour has passed from micro-batch 4 on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.now = 3600.0 if batch_idx >= 3 else 0.0

    monkeypatch.setattr(timer, "time", SimpleNamespace(monotonic=lambda: clock.now))
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    validation = {"val_check_interval": 50, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    trainer = make_trainer(
        tmp_path, 8, [Clock(), checkpoint], accumulate_grad_batches=3, max_time=timedelta(hours=1), **validation
    )
    trainer.fit(*make_run(tiny_corpus, 2))
    assert _saved_steps(tmp_path / "ckpt") == {2: 6}
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 0


@pytest.mark.parametrize(
    ("limits", "first", "saved"),
    [
        ({"max_epochs": 3}, {"max_epochs": 1}, "last.ckpt"),
        ({"max_epochs": 3}, {"max_epochs": 3, "max_steps": 3}, "last.ckpt"),
        ({"max_steps": 6}, {"max_steps": 3}, "last.ckpt"),
        ({"max_steps": 6}, {"max_steps": 6}, "epoch=0-step=2.ckpt"),
        ({"max_steps": 6}, {"max_steps": 6, "every_n_train_steps": 2}, "epoch=0-step=2.ckpt"),
    ],
    ids=[
        "max_epochs, resumed at an epoch end",
        "max_epochs, resumed mid-epoch",
        "max_steps, resumed mid-epoch",
        "max_steps, resumed from a save at an epoch's end",
        "max_steps, resumed from a save after an epoch's last batch",
    ],
)
def test_a_resumed_run_reads_each_epoch_as_the_uninterrupted_run(tiny_corpus, tmp_path, limits, first, saved):
    """litdata counts the epochs its loader was iterated. Resumed at an epoch end under max_epochs (Lightning then
    restores no loader position), the run read its first epoch's order again; resumed mid-epoch, the restored position
    outlived that epoch (Lightning stops reading at the epoch's length), so the next epoch read nothing: an empty
    epoch, one of max_epochs lost. Under max_steps, a checkpoint saved at an epoch's end (no validation; every_n_epochs)
    resumed with one more batch in that epoch, the next one's first, and the next epoch started on a new order, its
    other batches skipped. A save after an epoch's last batch (every_n_train_steps) resumed the data in that epoch,
    which Lightning counted done: the next epoch read the rest of the old one's data (here what limit_train_batches
    left; a weighted mixture's other streams). Each epoch now reads the batches the uninterrupted run read in it."""
    from epas_lightning.run_checkpoint import RunCheckpoint

    def fit(folder: str, ckpt_path: Path | None = None, **limit) -> dict:
        read = {}

        class ReadBatches(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                read[(trainer.current_epoch, batch_idx)] = batch[:, :3].tolist()

        every = limit.pop("every_n_train_steps", None)
        checkpoint = RunCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=-1, every_n_train_steps=every)
        steps = limit.pop("max_steps", -1)
        trainer = make_trainer(tmp_path, steps, [ReadBatches(), checkpoint], limit_train_batches=2, **limit)
        trainer.fit(*make_run(tiny_corpus, n_layer=2), ckpt_path=ckpt_path)
        return read

    uninterrupted = fit("whole", **limits)
    fit("first", **first)
    resumed = fit("resumed", tmp_path / "first" / saved, **limits)
    assert resumed == {key: batches for key, batches in uninterrupted.items() if key >= min(resumed)}
    assert max(resumed) == max(uninterrupted)


@pytest.mark.parametrize(
    ("stop_at", "first_steps", "limits"),
    [(4, 12, {}), (3, 12, {"limit_train_batches": 3, "val_check_interval": 3}), (12, 12, {}), (None, 8, {})],
    ids=["signal at a validation step", "signal at an epoch's end", "signal in the last step", "a run extended"],
)
def test_a_run_resumed_after_a_stop_validates_at_the_step_it_stopped(
    tiny_corpus, tmp_path, stop_at, first_steps, limits
):
    """A stop (SIGTERM, Ctrl+C) at a step whose validation is due skips it and saves; Lightning resumed that checkpoint
    counting the validation as run, so no session scored that step: its val/loss point was missing from the curve the
    uninterrupted run drew. The resumed run validates there first, logged at the uninterrupted run's step. A checkpoint
    saved before a validation that then ran (every_n_train_steps, here last.ckpt of a finished run) validates no
    step twice. A stop in the run's last step skipped its last validation for good (nothing is left to resume); it
    runs there now."""
    from epas_lightning import GracefulStop, RunCheckpoint

    def fit(folder: str, max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None) -> dict:
        recorder, stop = Recorder(), GracefulStop()
        checkpoint = RunCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=2, save_top_k=-1)
        validation = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0, **limits}
        callbacks = [SignalInStep(stop, stop_at), recorder, stop, checkpoint]
        trainer = make_trainer(tmp_path, max_steps, callbacks, **validation)
        module, data = make_run(tiny_corpus, n_layer=2)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        assert stop.exit_status == (143 if stop_at and not ckpt_path and stop_at < max_steps else None)  # 0: complete
        return {(v.step, v.logged_step): v.loss for v in recorder.validations}

    whole = fit("whole", 12)
    assert sorted(whole) == ([(4, 3), (8, 7), (12, 11)] if not limits else [(3, 2), (6, 5), (9, 8), (12, 11)])
    first = fit("first", first_steps, stop_at=stop_at)
    # the stop skips the validation due at its step, but for the run's last
    assert sorted(first) == ([(4, 3), (8, 7)] if not stop_at else sorted(whole) if stop_at == 12 else [])
    resumed = fit("first", 12, tmp_path / "first" / "last.ckpt")
    assert first.keys().isdisjoint(resumed)  # no step validated twice
    if stop_at:
        assert {**first, **resumed} == pytest.approx(whole)
    else:  # its learning rate decayed over 8 steps: other scores than the whole run's
        assert sorted(resumed) == [(12, 11)]


def test_another_checkpoint_saved_at_a_stop_marks_the_validation_the_stop_skipped(tiny_corpus, tmp_path):
    """A checkpoint of one's own (a StepCheckpoint) saving at the stop's step, after the stop's save (Lightning runs
    checkpoints last), lacked the mark of the validation the stop skipped: resumed from it, no session validated that
    step. Every checkpoint saved at the stop's step now carries the mark."""
    from epas_lightning import GracefulStop, RunCheckpoint, StepCheckpoint
    from epas_lightning.run_checkpoint import VALIDATION_SKIPPED_KEY

    def fit(max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None) -> list[int]:
        recorder, stop = Recorder(), GracefulStop()
        run = RunCheckpoint(dirpath=tmp_path / "run", save_last=True)
        own = StepCheckpoint(dirpath=tmp_path / "own", every_n_train_steps=4, save_top_k=-1)
        validation = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        callbacks = [SignalInStep(stop, stop_at), recorder, stop, run, own]
        trainer = make_trainer(tmp_path, max_steps, callbacks, **validation)
        trainer.fit(*make_run(tiny_corpus, n_layer=2), ckpt_path=ckpt_path)
        return [v.step for v in recorder.validations]

    assert fit(8, stop_at=4) == []  # the stop skips the validation due at its step
    own = tmp_path / "own" / "epoch=0-step=4.ckpt"
    assert torch.load(own, weights_only=True).get(VALIDATION_SKIPPED_KEY) == 4
    assert fit(8, own) == [4, 8]


def test_a_run_resumed_with_checkpointing_off_trains_as_the_uninterrupted_run(tiny_corpus, tmp_path):
    """Resumed with checkpointing off (no StepCheckpoint, which finished the resume), the validation the stop skipped
    never ran, and a ReduceLROnPlateau stepped per step found no val/loss until the next validation (the checkpoint's
    was not put back): its learning rate never halved where the uninterrupted run's halved at each step."""
    from epas_lightning import GracefulStop, RunCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None) -> dict:
        recorder, stop = Recorder(), GracefulStop()
        checkpointing = ckpt_path is None
        folder = tmp_path / ("first" if stop_at else "whole")
        checkpoints = [RunCheckpoint(dirpath=folder, save_last=True)] * checkpointing
        callbacks = [SignalInStep(stop, stop_at), recorder, stop, *checkpoints]
        options = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        trainer = make_trainer(tmp_path, max_steps, callbacks, enable_checkpointing=checkpointing, **options)
        module, data = make_run(tiny_corpus, n_layer=2, module_class=PlateauModule)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return {"lr": recorder.lrs, "val": [v.step for v in recorder.validations]}

    whole = fit(8)
    first = fit(8, stop_at=4)
    resumed = fit(8, tmp_path / "first" / "last.ckpt")
    assert first["val"] + resumed["val"] == whole["val"] == [4, 8]
    assert {**first["lr"], **resumed["lr"]} == pytest.approx(whole["lr"])


@pytest.mark.parametrize("validate", [False, True])
def test_a_run_stopped_at_two_epoch_ends_reads_each_epoch_as_the_uninterrupted_run(tiny_corpus, tmp_path, validate):
    """Resumed from a stop after an epoch's last batch, Lightning began the next epoch uncounted, so a second stop
    after that epoch's last batch saved it as never begun: the third session trained it again under its old number
    (with validation) or read other batches than the uninterrupted run's in the next one (without)."""
    from epas_lightning import GracefulStop, RunCheckpoint

    def fit(folder: str, ckpt_path: Path | None = None, stop_at: int | None = None) -> dict:
        recorder, stop = Recorder(), GracefulStop()
        checkpoint = RunCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        validation = {"val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0} if validate else {}
        callbacks = [SignalInStep(stop, stop_at), recorder, stop, checkpoint]
        trainer = make_trainer(tmp_path, 8, callbacks, limit_train_batches=3, **validation)
        trainer.fit(*make_run(tiny_corpus, n_layer=2), ckpt_path=ckpt_path)
        return recorder.batches

    whole = fit("whole")
    sessions = [fit("stopped", stop_at=3), fit("stopped", tmp_path / "stopped" / "last.ckpt", stop_at=6)]
    sessions.append(fit("stopped", tmp_path / "stopped" / "last.ckpt"))
    assert [sorted(read) for read in sessions] == [sorted(whole)[:3], sorted(whole)[3:6], sorted(whole)[6:]]
    assert {key: batches for read in sessions for key, batches in read.items()} == whole


class PlateauModule(EPASModule):
    """An ``EPASModule`` of one's own whose learning rate halves each time ``val/loss`` (``plateau_monitor``) does not
    rise (so, in a few steps): a ``ReduceLROnPlateau`` stepped every ``plateau_every`` optimizer steps
    (``plateau_interval`` "epoch": epochs), ``plateau_strict`` as Lightning's ``strict``."""

    plateau_every, plateau_interval, plateau_strict, plateau_monitor = 1, "step", False, "val/loss"

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, factor=0.5)
        every = {"interval": self.plateau_interval, "frequency": self.plateau_every, "monitor": self.plateau_monitor}
        every["strict"] = self.plateau_strict
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, **every}}


epochs_of_3 = {"limit_train_batches": 3, "val_check_interval": 3}  # a validation at each epoch's end


@pytest.mark.parametrize(
    ("stop_at", "first_steps", "settings"),
    [
        (4, 8, {"plateau_every": 1}),
        (3, 6, {"log_every_n_steps": 2}),
        (None, 8, {"plateau_every": 4, "every_n_train_steps": 2, "limit_train_batches": 4}),
        (3, 6, {"limit_train_batches": 3, "val_check_interval": 3}),
        (6, 9, {"limit_train_batches": 3, "check_val_every_n_epoch": 2, "val_check_interval": None}),
        (2, 9, {"plateau_every": 1, "plateau_interval": "epoch", **epochs_of_3}),
        (3, 9, {"plateau_every": 1, "plateau_interval": "epoch", **epochs_of_3}),
        (5, 8, {"plateau_every": 1}),
        (5, 8, {"plateau_every": 6, "plateau_strict": True}),
        (3, 9, {"plateau_every": 6, "accumulate_grad_batches": 2}),
        (None, 6, {"plateau_every": 1, "plateau_interval": "epoch", "every_n_train_steps": 3, **epochs_of_3}),
        (4, 8, {"plateau_every": 4, "plateau_strict": True}),
        (3, 9, {"plateau_every": 1, "plateau_interval": "epoch", "plateau_strict": True, **epochs_of_3}),
        (None, 8, {"plateau_every": 1, "time_out_at": 3}),
        (None, 8, {"time_out_at": 4}),
        (None, 8, {"plateau_every": 1, "monitor": "val/loss"}),
        (None, 6, {"plateau_every": 1, "plateau_interval": "epoch", "save_on_train_epoch_end": True, **epochs_of_3}),
        (None, 6, {"plateau_every": 1, "save_on_train_epoch_end": True, **epochs_of_3}),
        (None, 6, {"plateau_every": 1, "plateau_interval": "epoch", **epochs_of_3}),
    ],
    ids=[
        "a plateau scheduler stepped per step",
        "a stop between logged steps",
        "a finished run extended",
        "a stop at an epoch's end",
        "a stop at an epoch's end validating every 2 epochs",
        "a plateau scheduler stepped per epoch, a stop inside an epoch",
        "a plateau scheduler stepped per epoch, a stop at an epoch's end",
        "a plateau scheduler stepped per step, a stop without a validation",
        "a strict plateau scheduler stepped every 6 steps, a stop before one without a validation",
        "a plateau scheduler stepped every 3 steps, a validation every 2, under gradient accumulation",
        "a plateau scheduler stepped per epoch, a run finished after a save at an epoch's end extended",
        "a strict plateau scheduler, a stop at the first validation",
        "a strict plateau scheduler stepped per epoch, a stop at the first epoch's end",
        "max_time ending between validations",
        "max_time ending at a validation",
        "a plateau scheduler stepped per step, a run finished after a monitored save at its last validation extended",
        "a plateau scheduler stepped per epoch, a run finished after a save at its last epoch's end extended",
        "a plateau scheduler stepped per step, a run finished after a save at its last epoch's end extended",
        "a plateau scheduler stepped per epoch, a run finished after a save at its last validation extended",
    ],
)
def test_two_sessions_log_and_train_as_the_uninterrupted_run(
    tiny_corpus, tmp_path, monkeypatch, stop_at, first_steps, settings
):
    """A run stopped (SIGTERM) and resumed, or finished and extended from its last.ckpt, trains and logs as the run
    that went through at once: the same loss, learning rate and epoch at each step, each validation at its step and
    epoch, each logged point once; last.ckpt holds its session's last validation, in the epoch of its step. Where they
    differed: a ReduceLROnPlateau stepped per step skipped its step at the stop's validation, which the resume runs
    (the learning rate halved one step late); the stop logged its step's metrics where log_every_n_steps would not
    have; last.ckpt was saved before the final validation, so a run extended from it stepped no plateau scheduler
    there; the validation a stop at an epoch's last batch skipped ran under the next epoch's number, or (every 2
    epochs) not at all; a ReduceLROnPlateau stepped per epoch skipped its step at the end of the epoch a run resumed
    in, and the step of the epoch a stop at its last batch ended; a ReduceLROnPlateau stepped after a resume before the
    next validation found no val/loss (strict: an error), and none took the step at a resumed step without a
    validation; a strict one raised in the stop's session, after its save, where the validation it skipped was the
    first. A run max_time ended (resumed with a larger max_time) validated at its last step, where the
    uninterrupted run did not: Lightning validates whenever a fit stops early (an extra val/loss point, and a plateau
    step on it). A run extended from a save at an epoch's end (save_on_train_epoch_end) skipped the epoch's plateau
    step, and took a second one of interval "step"."""
    from datetime import timedelta
    from types import SimpleNamespace

    from helpers import Steps
    from lightning.pytorch.callbacks import timer

    from epas_lightning import GracefulStop, RunCheckpoint
    from epas_lightning.provenance import LAST_VALIDATION_KEY

    settings = dict(settings)
    plateau_every = settings.pop("plateau_every", None)
    saving = ("every_n_train_steps", "monitor", "save_on_train_epoch_end")  # the checkpoint's
    saving = {key: settings.pop(key) for key in saving if key in settings}
    plateau = {key: settings.pop(key) for key in ("plateau_interval", "plateau_strict") if key in settings}
    time_out_at = settings.pop("time_out_at", None)  # max_time (an hour) runs out at this step of the first session
    whole_steps = first_steps if stop_at or time_out_at else first_steps + 4
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timer, "time", SimpleNamespace(monotonic=lambda: clock.now))

    def fit(
        folder: str, max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None, timed: bool = False
    ) -> dict:
        recorder, stop, logger = Recorder(), GracefulStop(), Steps()
        clock.now = 0.0

        class TimeOut(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if timed and trainer.global_step + 1 == time_out_at:
                    clock.now = 3600.0

        checkpoint = RunCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=-1, **saving)
        validation = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        options = {**validation, "log_every_n_steps": 1, **settings}
        if time_out_at:
            options["max_time"] = timedelta(hours=1 if timed else 2)
        callbacks = [TimeOut(), SignalInStep(stop, stop_at), recorder, stop, checkpoint]
        trainer = make_trainer(tmp_path, max_steps, callbacks, logger=logger, **options)
        module, data = make_run(tiny_corpus, n_layer=2, module_class=PlateauModule if plateau_every else EPASModule)
        module.plateau_every = plateau_every
        for key, value in plateau.items():
            setattr(module, key, value)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        micro_batches = recorder.micro_batches.items()  # several a step under gradient accumulation
        record = {"lr": recorder.lrs, "val": {(v.step, v.epoch): v.loss for v in recorder.validations}}
        record["loss"] = {micro_batch: loss for micro_batch, (loss, _) in micro_batches}
        record["epoch"] = {micro_batch: epoch for micro_batch, (_, epoch) in micro_batches}
        logged = {tag: zip(steps, logger.values[tag], strict=True) for tag, steps in logger.steps.items()}
        points = [((tag, step), value) for tag, values in logged.items() for step, value in values]
        record["points"], record["logged"] = Counter(point for point, _ in points), dict(points)
        return record

    whole = fit("whole", whole_steps)
    first = fit("first", first_steps, stop_at=stop_at, timed=True)
    saved = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    at_save = next(epoch for (step, _), epoch in whole["epoch"].items() if step == saved["global_step"])  # its end
    assert saved["epoch"] == at_save
    assert saved.get(LAST_VALIDATION_KEY, {}).get("step") == max((step for step, _ in first["val"]), default=None)
    resumed = fit("first", whole_steps, tmp_path / "first" / "last.ckpt")
    for key in ("loss", "lr", "epoch", "val"):
        assert first[key].keys().isdisjoint(resumed[key]), key
        assert {**first[key], **resumed[key]} == pytest.approx(whole[key]), key
    assert first["points"] + resumed["points"] == whole["points"]  # each (tag, step) as often
    assert {**first["logged"], **resumed["logged"]} == pytest.approx(whole["logged"])


@pytest.mark.parametrize("minimum", [{"min_steps": 9}, {"min_epochs": 3}], ids=["min_steps", "min_epochs"])
def test_a_stop_min_steps_keeps_going_trains_and_logs_as_the_run_without_it(tiny_corpus, tmp_path, capsys, minimum):
    """A signal before min_steps: fit cannot stop there, and the run went on, but as a run stopping: it logged every
    step (Lightning logs whenever should_stop is set), skipped the validation due at the signal's step and lost the
    ReduceLROnPlateau step of that step, saved last.ckpt and said "stopped" again after every step. The stop now waits
    for min_steps (min_epochs): saved once at the signal's step, the run trains, logs and checkpoints as without the
    signal until they are met (no checkpoint says the validation then due was skipped), where it stops as a stop does.
    """
    from helpers import Recorder, SignalInStep, Steps

    from epas_lightning import GracefulStop, RunCheckpoint, StepCheckpoint
    from epas_lightning.run_checkpoint import VALIDATION_SKIPPED_KEY

    def fit(folder: str, stop_at: int | None = None) -> dict:
        recorder, stop, logger = Recorder(), GracefulStop(), Steps()
        options = {"limit_val_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 2, **epochs_of_3}
        own = StepCheckpoint(dirpath=tmp_path / folder / "own", every_n_train_steps=6, save_top_k=-1)
        callbacks = [
            recorder,
            SignalInStep(stop, stop_at),
            stop,
            RunCheckpoint(dirpath=tmp_path / folder, save_last=True),
            own,
        ]
        trainer = make_trainer(tmp_path, 12, callbacks, logger=logger, **minimum, **options)
        trainer.fit(*make_run(tiny_corpus, n_layer=2, module_class=PlateauModule))
        return {
            "lr": recorder.lrs,
            "val": [validation.step for validation in recorder.validations],
            "logged": sorted(set(logger.steps["train/loss"])),
            "status": stop.exit_status,
        }

    whole, stopped = fit("whole"), fit("stopped", stop_at=4)
    (name, value), err = next(iter(minimum.items())), capsys.readouterr().err
    assert err.count("SIGTERM after step 4: saved") == 1 and f"{name}={value} keeps training" in err, err
    assert err.count("stopped by SIGTERM") == 1 and "stopped by SIGTERM after step 9" in err, err
    assert stopped["status"] == 143
    assert torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["global_step"] == 9
    own = torch.load(tmp_path / "stopped" / "own" / "epoch=1-step=6.ckpt", weights_only=True)
    assert VALIDATION_SKIPPED_KEY not in own
    assert stopped["val"] == [3, 6] and whole["val"] == [3, 6, 9, 12]  # the stop skips the one at its step
    assert stopped["lr"] == {step: lr for step, lr in whole["lr"].items() if step < 9}
    assert stopped["logged"] == [step for step in whole["logged"] if step < 9]


def test_a_stop_kept_going_by_lightnings_min_epochs_says_where_it_comes_from():
    """Lightning sets min_epochs to 1 wherever min_steps is given: a signal after min_steps, in the first epoch, said
    "min_epochs=1 keeps training" to a run that never set min_epochs."""
    from types import SimpleNamespace

    from epas_lightning.interrupt import _unmet_minimum

    def unmet(min_steps: int | None, min_epochs: int | None, step: int = 4) -> str | None:
        epoch_loop = SimpleNamespace(_num_ready_batches_reached=lambda: False)
        progress = SimpleNamespace(current=SimpleNamespace(processed=0))
        fit_loop = SimpleNamespace(
            min_steps=min_steps, min_epochs=min_epochs, epoch_progress=progress, epoch_loop=epoch_loop
        )
        return _unmet_minimum(SimpleNamespace(fit_loop=fit_loop, global_step=step))

    assert unmet(2, 1) == "min_epochs=1 (Lightning's default with min_steps)"
    assert unmet(9, 1) == "min_steps=9"
    assert unmet(None, 1) == unmet(2, 3).replace("3", "1") == "min_epochs=1"
    assert unmet(2, 1, step=4) is not None and unmet(None, None) is None


def test_a_resume_of_a_save_before_a_validation_its_run_went_on_to_takes_no_plateau_step(tiny_corpus, tmp_path):
    """A save between steps before the validation due at its step (every_n_train_steps), resumed after its run went on:
    Lightning counts that validation, and the plateau steps after it, as done. The resume took the plateau step without
    the validation, on the value before it: a strict scheduler whose metric that validation first logged raised."""
    from epas_lightning import RunCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None) -> None:
        checkpoint = RunCheckpoint(dirpath=tmp_path / "run", every_n_train_steps=4, save_top_k=-1)
        options = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        trainer = make_trainer(tmp_path, max_steps, [checkpoint], **options)
        module, data = make_run(tiny_corpus, n_layer=2, module_class=PlateauModule)
        module.plateau_every, module.plateau_strict = 4, True
        trainer.fit(module, data, ckpt_path=ckpt_path)

    fit(5)
    fit(8, tmp_path / "run" / "epoch=0-step=4.ckpt")


def test_a_resume_of_a_checkpoint_without_plateau_metrics_skips_the_plateau_step_it_cannot_take(tiny_corpus, tmp_path):
    """A checkpoint written before checkpoints saved the plateau metrics, or by a run with Lightning's ModelCheckpoint
    alone, resumed at a step without a validation where a strict ReduceLROnPlateau steps: the resume took that step
    (Lightning's took none) with no val/loss to step on, and raised. It now skips it, as Lightning did, and says so once
    naming both writers (the warning called the ModelCheckpoint's "an older version"); not for a checkpoint of this
    version saved before any validation (an empty record), whose resume steps as the uninterrupted run (here:
    Lightning's own warning)."""
    import warnings

    from helpers import Recorder, SignalInStep
    from lightning.pytorch.callbacks import ModelCheckpoint

    from epas_lightning import GracefulStop, RunCheckpoint
    from epas_lightning.plateau_metrics import PLATEAU_METRICS_KEY

    def fit(
        folder: str, every: int, stop_at: int | None = None, old: bool = False, plain: bool = False
    ) -> tuple[list[float], list[str]]:
        recorder, stop, path = Recorder(), GracefulStop(), tmp_path / folder / "last.ckpt"
        if old:
            saved = torch.load(path, weights_only=True)
            del saved[PLATEAU_METRICS_KEY]  # as an older version wrote it
            torch.save(saved, path)
        options = {"val_check_interval": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        callbacks = [
            recorder,
            SignalInStep(stop, stop_at),
            stop,
            (ModelCheckpoint if plain else RunCheckpoint)(dirpath=tmp_path / folder, save_last=True),
        ]
        module, data = make_run(tiny_corpus, n_layer=2, module_class=PlateauModule)
        module.plateau_every, module.plateau_strict = every, every > 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer(tmp_path, 12 if stop_at else 8, callbacks, **options)
            trainer.fit(module, data, ckpt_path=None if stop_at else path)
        return list(recorder.lrs.values()), [str(w.message) for w in caught if "ReduceLROnPlateau" in str(w.message)]

    fit("old", 6, stop_at=6)
    rates, said = fit("old", 6, old=True)
    assert len(said) == 1 and "saved without the value of val/loss (by an older epas_lightning, or" in said[0]
    assert rates[:2] == [1e-3] * 2  # trained on
    fit("plain", 6, stop_at=6, plain=True)
    rates, said = fit("plain", 6)
    assert len(said) == 1 and "such as one with Lightning's ModelCheckpoint alone" in said[0]
    assert rates[:2] == [1e-3] * 2
    fit("new", 1, stop_at=2)  # a checkpoint before the first validation, saved with no val/loss yet
    _, said = fit("new", 1)
    assert said and not any("saved without" in message for message in said)


def test_overfit_batches_trains_on_the_same_batches_every_epoch(tiny_corpus, tmp_path):
    """Lightning turns shuffling off for overfit_batches through the loader's sampler, which a streaming dataset does
    not use: each epoch read other batches, and the loss never showed the model overfitting them."""
    read = {}

    class ReadBatches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            read.setdefault(trainer.current_epoch, []).append(batch.tolist())

    make_trainer(tmp_path, 4, [ReadBatches()], overfit_batches=2).fit(*make_run(tiny_corpus, n_layer=2))
    assert list(read) == [0, 1] and read[0] == read[1]


def _saved_steps(folder: Path) -> dict[int, int]:
    """Each checkpoint of ``folder`` as its optimizer step and the micro-batches trained until then."""
    saved = {}
    for path in folder.iterdir():
        state = torch.load(path, weights_only=True)
        saved[state["global_step"]] = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"]
    return saved


def test_the_learning_rate_is_logged_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    """Lightning's LearningRateMonitor logged at every micro-batch: each step's rate twice with 2 micro-batches."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from epas_lightning.lightning_cli import RUN_SECTIONS

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (12, 17)), batch_size=2)
    monitor = RUN_SECTIONS["lr_monitor"](logging_interval="step")
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, 3, [monitor], logger=logger, log_every_n_steps=1, accumulate_grad_batches=2)
    trainer.fit(module, data)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        steps = [row["step"] for row in csv.DictReader(f) if row.get("lr-AdamW/pg1")]
    assert steps == ["0", "1", "2"]


def test_the_learning_rate_monitor_gives_callbacks_the_rates_as_host_tensors():
    """Lightning's LearningRateMonitor put each rate it logs into ``callback_metrics`` as a tensor made on the root
    device: on CUDA a blocking host-to-device copy (a device sync) per rate at every logged step. A ``meta`` root
    device shows where it makes them."""
    from types import SimpleNamespace

    from epas_lightning.lightning_cli import RUN_SECTIONS

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in (1e-3, 2e-3)]
    trainer = SimpleNamespace(
        optimizers=[torch.optim.AdamW(groups)],
        lr_scheduler_configs=[],
        loggers=[None],
        callback_metrics={"train/loss": torch.tensor(1.0)},
        strategy=SimpleNamespace(root_device=torch.device("meta")),
    )
    monitor = RUN_SECTIONS["lr_monitor"](logging_interval="step")
    monitor.on_train_start(trainer)
    assert monitor._extract_stats(trainer, "step") == {"lr-AdamW/pg1": 1e-3, "lr-AdamW/pg2": 2e-3}
    rates = {name: value for name, value in trainer.callback_metrics.items() if name.startswith("lr-")}
    assert {value.device.type for value in rates.values()} == {"cpu"}
    assert rates == {"lr-AdamW/pg1": torch.tensor(1e-3), "lr-AdamW/pg2": torch.tensor(2e-3)}
    assert trainer.callback_metrics["train/loss"] == 1.0


def test_a_run_warns_before_training_when_its_checkpoints_may_not_fit(tiny_corpus, tmp_path, monkeypatch, capsys):
    """A full checkpoint disk showed only at the first save, hours into a run. Before training, the run's checkpoint
    now warns when the free space is less than the checkpoints it keeps at once (top 1, last, the one being written),
    sized from the model and AdamW within 20% of the real file. The hidden file a save killed midway left (as large as
    a checkpoint; no later save of another step writes it again) is removed first, and said."""
    import shutil
    import warnings

    from epas_lightning import checkpoint_space
    from epas_lightning.run_checkpoint import RunCheckpoint

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_space.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    (tmp_path / "ckpt").mkdir()
    (stale := tmp_path / "ckpt" / ".epoch=0-step=7.ckpt.saving").write_bytes(b"a save killed midway")
    os.utime(stale, (time.time() - 3600,) * 2)
    (saving := tmp_path / "ckpt" / ".epoch=0-step=9.ckpt.saving").write_bytes(b"another process saving now")
    trainer = make_trainer(tmp_path, 1, [checkpoint])
    with pytest.warns(UserWarning, match=r"checkpoints may not fit: 3 of .*, and 1\.0 KiB is free in .*ckpt"):
        trainer.fit(module, datamodule=data)
    assert not stale.exists() and saving.exists()  # a file written to minutes ago may be a save still running
    assert f"removed {stale} (20 bytes): a checkpoint save killed before it finished" in capsys.readouterr().err
    estimate = checkpoint_space.checkpoint_bytes(module, trainer.optimizers)
    assert abs(estimate / (tmp_path / "ckpt" / "last.ckpt").stat().st_size - 1) < 0.2
    monkeypatch.setattr(checkpoint_space.shutil, "disk_usage", lambda path: usage._replace(free=estimate * 3 // 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint_space.warn_if_disk_too_small(trainer, module, checkpoint)  # the saved files count as free


@pytest.mark.parametrize("shared", [True, False])
def test_a_multi_node_run_refuses_a_checkpoint_folder_its_nodes_do_not_share(tmp_path, monkeypatch, shared):
    """On node-local disks each node kept only its own ranks' shards of every checkpoint (rank 1's stayed in a hidden
    staging folder on its node) and the run learnt it at resume, from a missing shard. A multi-node fit now checks
    before training that every rank sees a file rank 0 writes where the checkpoints go, and leaves nothing there. Rank
    1 "on another node" is emulated: it looks for that file from its own working directory."""
    from types import SimpleNamespace

    from epas_lightning.checkpoint_space import check_folder_shared_by_nodes
    from epas_lightning.errors import CheckpointError

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (node0 / "runs").mkdir(parents=True)
    (node1 / "runs").mkdir(parents=True)
    monkeypatch.chdir(node0)
    other = node0 if shared else node1

    def marker_of(root: Path) -> Path:
        return next((root / "runs").glob(".epas-shared-*")).relative_to(root)

    strategy = SimpleNamespace(
        broadcast=lambda marker: marker,
        reduce_boolean_decision=lambda seen, all: seen and (other / marker_of(node0)).exists(),
    )
    trainer = SimpleNamespace(num_nodes=2, is_global_zero=True, strategy=strategy)
    folder = Path("runs/version_0/checkpoints")  # not made yet: the file goes where it will be
    if shared:
        check_folder_shared_by_nodes(trainer, folder, wait_s=0)
    else:
        with pytest.raises(CheckpointError, match="not one folder for all 2 nodes"):
            check_folder_shared_by_nodes(trainer, folder, wait_s=0)
    assert not list((node0 / "runs").iterdir())


def test_a_fit_that_trains_nothing_after_its_sanity_validation_leaves_no_handler_to_the_next(tiny_corpus, tmp_path):
    """A fit whose sanity validation ran but trained nothing (``limit_train_batches=0``) kept its Trainer's SIGTERM
    handler (and so that Trainer and its model) in the GracefulStop: the next fit without a sanity validation put it
    back after training, and a SIGTERM there reached the first Trainer instead of the running one."""
    import signal

    from epas_lightning import GracefulStop

    class SigtermAfterTraining(Callback):
        def on_train_end(self, trainer, pl_module):  # after GracefulStop's own, listed before
            os.kill(os.getpid(), signal.SIGTERM)

    stop, before = GracefulStop(), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # not the default action: the test runs on
    try:
        first = make_trainer(tmp_path, 2, [stop], limit_train_batches=0, limit_val_batches=1, num_sanity_val_steps=1)
        first.fit(*make_run(tiny_corpus, 2))
        second = make_trainer(tmp_path, 1, [stop, SigtermAfterTraining()], limit_val_batches=1, num_sanity_val_steps=0)
        second.fit(*make_run(tiny_corpus, 2))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert second.received_sigterm and not first.received_sigterm


def test_a_fit_that_failed_before_lightning_registered_its_handlers_leaves_the_next_predict_lightnings(
    tiny_corpus, tmp_path
):
    """GracefulStop puts its SIGTERM handler in place as Lightning registers its own in fit. A fit that failed before
    (here in another callback's on_fit_start) must not leave that to the Trainer's next run: a predict (which
    GracefulStop leaves to Lightning; validate and test it answers itself) would have answered SIGTERM with a flag
    nothing reads instead of Lightning's stop."""
    import signal

    from torch.utils.data import DataLoader

    from epas_lightning import GracefulStop

    class FailAtFitStart(Callback):
        def on_fit_start(self, trainer, pl_module):  # after GracefulStop's own, listed after it
            raise ValueError("a failure before the handlers")

    handlers = []

    class RecordHandler(Callback):
        def on_predict_start(self, trainer, pl_module):
            handlers.append(signal.getsignal(signal.SIGTERM))

    stop = GracefulStop()
    module, data = make_run(tiny_corpus, 2)
    trainer = make_trainer(tmp_path, 1, [stop, FailAtFitStart(), RecordHandler()], limit_val_batches=1)
    with pytest.raises(ValueError, match="a failure before the handlers"):
        trainer.fit(module, datamodule=data)
    trainer.predict(module, DataLoader(torch.randint(0, 512, (1, 8))))
    assert len(handlers) == 1 and getattr(handlers[0], "__self__", None) is not stop


@pytest.mark.parametrize("fails", [False, True], ids=["fit", "fit failing before the registration"])
def test_a_register_signal_handlers_set_on_the_trainers_connector_is_kept(tiny_corpus, tmp_path, fails):
    """GracefulStop wraps Lightning's ``register_signal_handlers`` on the Trainer's signal connector for one fit. One
    set there before (a script's own, say one that keeps Lightning off the signal handlers) was removed as it wrapped
    (Lightning's registered its handlers instead) or as a fit failed: now it runs in the fit and stays after it."""
    from epas_lightning import GracefulStop

    class FailAtFitStart(Callback):
        def on_fit_start(self, trainer, pl_module):  # after GracefulStop's own, listed after it
            raise ValueError("a failure before the handlers")

    calls = []

    def own() -> None:
        calls.append("own")

    trainer = make_trainer(tmp_path, 1, [GracefulStop(), *([FailAtFitStart()] if fails else [])])
    trainer._signal_connector.register_signal_handlers = own
    with pytest.raises(ValueError, match="a failure before") if fails else contextlib.nullcontext():
        trainer.fit(*make_run(tiny_corpus, 2))
    assert trainer._signal_connector.register_signal_handlers is own and calls == ([] if fails else ["own"])


@pytest.mark.parametrize("run_checkpoint", [False, True])
def test_a_graceful_stop_saves_its_step_once(tiny_corpus, tmp_path, capsys, run_checkpoint):
    """After the stop's last.ckpt, the validation Lightning runs when fit stops early made ModelCheckpoint save the
    same step again (a step file): more full saves inside a scheduler's grace period than the one needed. That whole
    validation ran after the save, within the grace period, before the loggers were flushed; it runs no more.
    From a script it said to resume "with the same command and --ckpt_path last": it names ``trainer.fit`` now."""
    from epas_lightning import GracefulStop, RunCheckpoint

    saves, validations = [], []

    class Count(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saves.append(trainer.global_step)

        def on_validation_start(self, trainer, pl_module):
            validations.append(trainer.sanity_checking)

    stop = GracefulStop()
    module, data = make_run(tiny_corpus)
    checkpoint_class = RunCheckpoint if run_checkpoint else ModelCheckpoint
    checkpoint = checkpoint_class(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=100, save_top_k=-1)
    trainer = make_trainer(tmp_path, 100, [SignalInStep(stop, 3), Count(), stop, checkpoint], limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert stop.exit_status == 143 and saves == [3] and not [v for v in validations if not v]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    last = tmp_path / "ckpt" / "last.ckpt"  # "last" finds it from a new Trainer only with RunCheckpoint
    resume = 'ckpt_path="last"' if run_checkpoint else f"ckpt_path={str(last)!r}"
    assert f"saved {last} — resume with trainer.fit(..., {resume})\n" in capsys.readouterr().err


def test_a_graceful_stop_saves_into_the_run_checkpoint_before_a_listed_one(tiny_corpus, tmp_path, capsys):
    """With a ModelCheckpoint of trainer.callbacks (listed before the run's checkpoint, as the CLI orders them), the
    stop wrote last.ckpt into that one's folder, and said to resume with "last", which finds the run's own."""
    from epas_lightning import GracefulStop, RunCheckpoint

    stop = GracefulStop()
    listed = ModelCheckpoint(dirpath=tmp_path / "mine", every_n_train_steps=100)
    run = RunCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_train_steps=100)
    make_trainer(tmp_path, 100, [SignalInStep(stop, 3), stop, listed, run]).fit(*make_run(tiny_corpus, 2))
    assert stop.exit_status == 143 and [p.name for p in (tmp_path / "run").iterdir()] == ["last.ckpt"]
    assert not (tmp_path / "mine").exists()
    assert 'resume with trainer.fit(..., ckpt_path="last")' in capsys.readouterr().err


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_graceful_stop_at_a_scheduled_save_keeps_its_step_checkpoint(tiny_corpus, tmp_path, accumulate):
    """A stop in a step every_n_train_steps saves at wrote last.ckpt alone and counted the step as saved: its
    epoch=0-step=N.ckpt, which the uninterrupted run keeps (save_top_k -1), was never written, and the run resumed
    from last.ckpt went on without it. The stop writes it too, with the same state as last.ckpt."""
    from epas_lightning import GracefulStop, RunCheckpoint

    def fit(max_steps: int, ckpt_path: str | None = None, stop_at: int | None = None) -> GracefulStop:
        stop = GracefulStop()
        run = RunCheckpoint(dirpath=tmp_path / "run", save_last=True, every_n_train_steps=2, save_top_k=-1)
        callbacks = [SignalInStep(stop, stop_at), stop, run]
        trainer = make_trainer(tmp_path, max_steps, callbacks, accumulate_grad_batches=accumulate)
        trainer.fit(*make_run(tiny_corpus, 2), ckpt_path=ckpt_path)
        return stop

    assert fit(6, stop_at=4).exit_status == 143
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    kept, last = (
        torch.load(tmp_path / "run" / name, weights_only=True) for name in ("epoch=0-step=4.ckpt", "last.ckpt")
    )
    assert kept["global_step"] == last["global_step"] == 4
    for name, tensor in last["state_dict"].items():
        assert torch.equal(kept["state_dict"][name], tensor), name
    fit(6, ckpt_path="last")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [f"epoch=0-step={n}.ckpt" for n in (2, 4, 6)] + ["last.ckpt"]  # as the uninterrupted run's


def fake_slurm_task(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """The environment of SLURM array task 70_3 (job 77), with an `scontrol` that writes its arguments into the file
    returned."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "x",
                        "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    scontrol = root / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {root / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    return root / "scontrol.log"


def test_a_second_signal_while_the_stop_writes_shards_stops_at_once(tiny_corpus, tmp_path, monkeypatch):
    """The stop's save says "again: at once, without one"; with FSDP2 a second signal during it was caught by
    torch.distributed.checkpoint and raised as its CheckpointException (a traceback, exit 1). It stops at once now,
    the previous last.ckpt whole."""
    import signal

    from torch.distributed.checkpoint import FileSystemWriter

    from epas_lightning import FSDP2Strategy, GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint

    write_data = FileSystemWriter.write_data

    def signalled_write(self, *args):
        if stop.received is not None:  # the stop's save
            os.kill(os.getpid(), signal.SIGTERM)
        return write_data(self, *args)

    class SignalAtStep(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FileSystemWriter, "write_data", signalled_write)
    stop = GracefulStop()
    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)
    trainer = make_trainer(tmp_path, 100, [SignalAtStep(), stop, checkpoint], strategy=FSDP2Strategy())
    with pytest.raises(SystemExit):  # Lightning's exit after an interrupt
        trainer.fit(module, datamodule=data)
    assert stop.interrupted_by == signal.SIGTERM
    assert torch.load(tmp_path / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2


class SignalMidStep(Callback):
    """Sends this process ``signum`` during optimizer step ``step`` (before the optimizer runs)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_slurm_requeue_signal_stops_with_last_ckpt_then_requeues(tiny_corpus, tmp_path, monkeypatch):
    """Under SLURM, Lightning answered SIGUSR1 by saving hpc_ckpt_1.ckpt from the signal handler, mid-step, into the
    working directory, and trained on; a requeued job without --ckpt_path then resumed that older file. The signal
    now stops like SIGTERM: last.ckpt of the step in the run's folder, then `scontrol requeue` of the job."""
    import signal

    from epas_lightning import GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint

    fake_slurm_task(monkeypatch, tmp_path)
    stop = GracefulStop()
    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 100, [SignalMidStep(2, signal.SIGUSR1), stop, checkpoint]).fit(module, datamodule=data)
    assert stop.exit_status == 128 + signal.SIGUSR1
    assert (tmp_path / "scontrol.log").read_text() == "requeue 70_3\n"
    assert not list(tmp_path.glob("hpc_ckpt_*")) and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"], ids=["SIGTERM", "SLURM's requeue signal"])
def test_a_signal_in_the_last_step_ends_the_run_complete(tiny_corpus, tmp_path, monkeypatch, capsys, signum):
    """A stop asked for in the run's last step said to resume with --ckpt_path last (nothing was left to train), exited
    143, and under SLURM requeued the finished job (exit 138), which started again only to end at once. The run now
    says training is complete, requeues nothing and exits 0, with last.ckpt of its last step."""
    import signal

    from epas_lightning import GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint

    log = fake_slurm_task(monkeypatch, tmp_path)
    stop, signum = GracefulStop(), signal.Signals[signum]
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 3, [SignalMidStep(2, signum), stop, checkpoint]).fit(*make_run(tiny_corpus, n_layer=2))
    err = capsys.readouterr().err
    assert f"{signum.name} in the last step (3): training is complete" in err and "resume with" not in err, err
    assert stop.exit_status is None and not stop.requeued and not log.exists()
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"], ids=["SIGTERM", "SLURM's requeue signal"])
def test_a_signal_in_the_step_max_time_ends_says_to_raise_max_time(tiny_corpus, tmp_path, monkeypatch, capsys, signum):
    """A stop asked for in the step where max_time ran out said to resume with --ckpt_path last (a resume under the
    same max_time trains nothing: the Timer goes on from the checkpoint's training time), exited 143, and under SLURM
    requeued the job, which started again only to end. The time limit ends that run: the stop now says so and to
    raise max_time, requeues nothing and exits 0, as a run max_time ends without a signal."""
    import signal
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import timer

    from epas_lightning import GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint

    clock = SimpleNamespace(now=0.0)

    class Clock(Callback):  # the hour has passed from the second step on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.now = 3600.0 if batch_idx >= 1 else 0.0

    monkeypatch.setattr(timer, "time", SimpleNamespace(monotonic=lambda: clock.now))
    log = fake_slurm_task(monkeypatch, tmp_path)
    stop, signum = GracefulStop(), signal.Signals[signum]
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [Clock(), SignalMidStep(1, signum), stop, checkpoint]
    make_trainer(tmp_path, 6, callbacks, max_time=timedelta(hours=1)).fit(*make_run(tiny_corpus, n_layer=2))
    err = capsys.readouterr().err
    assert f"{signum.name} in the step where max_time ran out (2): max_time ends the run here" in err, err
    assert "to train further, raise the Trainer's max_time and call trainer.fit(" in err, err
    assert stop.exit_status is None and not stop.requeued and not log.exists()
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize(
    "early_stopping",
    [None, 1e9, -1e9],
    ids=["max_steps", "EarlyStopping ending the run", "EarlyStopping letting it go on"],
)
def test_a_signal_during_the_final_validation_says_the_run_ends_after_it(tiny_corpus, tmp_path, capsys, early_stopping):
    """A signal during the validation after the run's last step said "stopping after this optimizer step with a
    checkpoint", though no step followed: the run ended as it would have (exit status 0). It now says that; also where
    an EarlyStopping ends the run after that validation (known once it judged it: said then), and not where it lets the
    run go on (the stop then comes after the next step)."""
    import signal

    from lightning.pytorch.callbacks import EarlyStopping

    from epas_lightning import GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint

    class SignalInFinalValidation(Callback):
        def on_validation_batch_start(self, trainer, *args):
            if trainer.global_step == 3 and not trainer.sanity_checking:
                os.kill(os.getpid(), signal.SIGTERM)

    stop, checkpoint = GracefulStop(), RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [SignalInFinalValidation(), stop, checkpoint]
    if early_stopping:  # below the threshold: stop
        callbacks.insert(1, EarlyStopping("val/loss", patience=100, stopping_threshold=early_stopping))
    validation = {"val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    trainer = make_trainer(tmp_path, 9 if early_stopping else 3, callbacks, **validation)
    trainer.fit(*make_run(tiny_corpus, n_layer=2))
    err = capsys.readouterr().err
    if early_stopping == -1e9:
        assert "SIGTERM: stopping after this optimizer step with a checkpoint" in err, err
        assert stop.exit_status == 143
        assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
        return
    assert "SIGTERM after the last step (3): nothing to stop, the run ends after this validation" in err, err
    assert "stopping after this optimizer step" not in err and stop.exit_status is None
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_slurm_requeue_signal_with_checkpointing_off_does_not_requeue_the_job(tiny_corpus, tmp_path, monkeypatch):
    """With checkpointing off the requeue signal still requeued the job, which started over from step 0, was
    signalled at the same point and requeued again, until someone cancelled it. It stops without a requeue now."""
    import signal

    from epas_lightning import GracefulStop

    log = fake_slurm_task(monkeypatch, tmp_path)
    stop = GracefulStop()
    module, data = make_run(tiny_corpus, n_layer=2)
    trainer = make_trainer(tmp_path, 100, [SignalMidStep(1, signal.SIGUSR1), stop], enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert stop.exit_status == 128 + signal.SIGUSR1 and trainer.global_step == 2 and not log.exists()


def test_slurm_requeue_signal_during_setup_requeues_the_job_without_training(
    tiny_corpus, tmp_path, monkeypatch, capsys
):
    """SIGUSR1 (SLURM's `--signal=USR1@...`) that came while `fit` imported, built or checked anything ended the job by
    the signal's default action: not requeued, so the run stopped for good at the time limit. It is now remembered
    from the start of the command, and `fit` stops before its first step: no checkpoint (nothing trained), the job
    requeued, exit status 138."""
    import signal

    from helpers import DEBUG_CONFIG

    from epas_lightning import lightning_cli as cli_module
    from epas_lightning.cli import main

    log = fake_slurm_task(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    build = cli_module.lightning_cli

    def signalled_while_parsing(args):
        assert signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL, "SIGUSR1 would end the job"
        os.kill(os.getpid(), signal.SIGUSR1)
        return build(args)

    monkeypatch.setattr(cli_module, "lightning_cli", signalled_while_parsing)
    ctrl_c = signal.getsignal(signal.SIGINT)
    assert main(["fit", "--config", DEBUG_CONFIG]) == 128 + signal.SIGUSR1
    assert "SIGUSR1 before the first step: nothing was trained" in capsys.readouterr().err
    assert log.read_text() == "requeue 70_3\n" and not list(tmp_path.rglob("*.ckpt"))
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    # Lightning's stop (its KeyboardInterrupt path) left Ctrl+C ignored after main returned: a notebook or script that
    # ran it could no longer be interrupted (and a later test's Ctrl+C was lost)
    assert signal.getsignal(signal.SIGINT) == ctrl_c


def test_a_requeued_job_signalled_again_before_its_first_step_is_not_requeued_again(
    tiny_corpus, tmp_path, monkeypatch, capsys
):
    """A job whose time limit was shorter than its start-up plus the signal's lead was requeued by every run, each
    stopped before its first step: it started, stopped and requeued until someone cancelled it. A requeued job
    (SLURM_RESTART_COUNT) signalled again before its first step is not requeued: one line, exit status 2."""
    import signal
    import time

    from helpers import DEBUG_CONFIG

    from epas_lightning import lightning_cli as cli_module
    from epas_lightning.cli import main

    log = fake_slurm_task(monkeypatch, tmp_path)
    now = int(time.time())
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("SLURM_JOB_START_TIME", str(now - 100))
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(now + 300))
    monkeypatch.chdir(tmp_path)
    build = cli_module.lightning_cli

    def signalled_while_parsing(args):
        os.kill(os.getpid(), signal.SIGUSR1)
        return build(args)

    monkeypatch.setattr(cli_module, "lightning_cli", signalled_while_parsing)
    assert main(["fit", "--config", DEBUG_CONFIG]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no progress since its last requeue" in error[0], error
    assert " s into this run and " in error[0] and " s before its time limit of 400 s" in error[0]
    assert not log.exists() and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_slurm_requeue_signal_during_the_sanity_check_stops_before_the_first_step(tiny_corpus, tmp_path, monkeypatch):
    """The requeue signal remembered since `fit` started is honoured just before the first step too (it came while
    resuming or validating): the ranks agree, nothing is saved, the job is requeued."""
    import signal

    from epas_lightning import GracefulStop
    from epas_lightning.run_checkpoint import RunCheckpoint
    from epas_lightning.slurm import remembering_requeue_signal

    log = fake_slurm_task(monkeypatch, tmp_path)
    steps = []

    class SignalInSanityCheck(Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            os.kill(os.getpid(), signal.SIGUSR1)

        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    stop = GracefulStop()
    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, 5, [SignalInSanityCheck(), stop, checkpoint], limit_val_batches=1)
    with remembering_requeue_signal(), pytest.raises(SystemExit):  # Lightning's exit after an interrupt
        trainer.fit(module, datamodule=data)
    assert stop.interrupted_by == signal.SIGUSR1 and not steps and not (tmp_path / "ckpt").exists()
    assert log.read_text() == "requeue 70_3\n" and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_ckpt_path_last_from_a_script_resumes_the_run_in_its_version_folder(tiny_corpus, tmp_path):
    """A script's `trainer.fit(..., ckpt_path="last")` looked only in the new version folder the fresh Trainer logs
    into, found nothing and trained from step 0 (with a hint to set save_last, which was set). With RunCheckpoint it
    resumes the newest last.ckpt of the run, as `--ckpt_path last` does, into that version folder; none is an error."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from epas_lightning.errors import CheckpointError
    from epas_lightning.run_checkpoint import RunCheckpoint

    starts = []

    class RecordStart(Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(trainer.global_step)

    def fit(steps: int, ckpt_path: str | None = None, version: str | None = None) -> L.Trainer:
        module, data = make_run(tiny_corpus, n_layer=2)
        logger = TensorBoardLogger(tmp_path / "runs", name="epas", version=version)
        trainer = make_trainer(tmp_path, steps, [RunCheckpoint(save_last=True), RecordStart()], logger=logger)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    with pytest.raises(CheckpointError, match="no last.ckpt"):
        fit(2, ckpt_path="last")
    assert fit(2).global_step == 2
    resumed = fit(3, ckpt_path="last")
    assert starts == [0, 2] and resumed.global_step == 3 and resumed.logger.version == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "epas").iterdir()) == ["version_0"]
    assert torch.load(tmp_path / "runs/epas/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    # a logger given its version resumes that version's last.ckpt, not the run's newest (it took version_0's)
    fit(2, version="exp1")
    fit(3, version="exp2")  # the newest last.ckpt of the run
    resumed = fit(4, ckpt_path="last", version="exp1")
    assert starts[-1] == 2 and resumed.logger.version == "exp1"


def test_a_resume_in_a_narrower_precision_says_the_weights_are_rounded(tiny_corpus, tmp_path):
    """A 32-true checkpoint resumed in bf16-true rounds the master weights and AdamW's state to bf16 for good, and
    said nothing; the same precision says nothing still."""
    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, 2, [ModelCheckpoint(tmp_path / "ckpt", save_last=True)]).fit(module, datamodule=data)
    for precision, says in (("32-true", False), ("bf16-true", True)):
        module, data = make_run(tiny_corpus, n_layer=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer(tmp_path, 3, [], precision=precision, enable_checkpointing=False)
            trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
        rounded = [w for w in caught if "rounded to bfloat16 for good" in str(w.message)]
        assert len(rounded) == says, [str(w.message) for w in caught]
        if says:
            assert str(rounded[0].message).startswith("resuming float32 weights with bfloat16 parameters")


def test_a_resume_with_another_batch_size_says_the_global_batch_changed_once(tiny_corpus, tmp_path):
    """A resume with another data.batch_size (or accumulation, or processes) trains other tokens per optimizer step
    under schedules that count steps, and only the data's position said anything. It now says old -> new once, and
    how to keep the checkpoint's; a checkpoint of an older version, without the record, says nothing."""
    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, 1, [ModelCheckpoint(tmp_path / "ckpt", save_last=True)]).fit(module, datamodule=data)
    last = tmp_path / "ckpt" / "last.ckpt"
    older = torch.load(last, weights_only=True)
    assert older.pop("global_batch") == {"batch_size": 4, "accumulate_grad_batches": 1, "world_size": 1, "seq_len": 32}
    torch.save(older, tmp_path / "older.ckpt")
    said = {}
    for name, ckpt_path in (("recorded", last), ("older", tmp_path / "older.ckpt")):
        module, data = make_run(tiny_corpus, n_layer=2)
        data.batch_size = 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer(tmp_path / name, 3, [], enable_checkpointing=False)
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        said[name] = [str(w.message) for w in caught if "global batch" in str(w.message)]
    assert said["older"] == []
    assert len(said["recorded"]) == 1
    assert said["recorded"][0].startswith(
        "resumed with another global batch: 4 -> 2 sequences (128 -> 64 tokens) an optimizer step (data.batch_size x "
        "trainer.accumulate_grad_batches x processes: 4 x 1 x 1 -> 2 x 1 x 1); the LR schedule"
    )
    assert "--trainer.accumulate_grad_batches 2 keeps the checkpoint's; data: resumed with" in said["recorded"][0]


@pytest.mark.parametrize(("batch_size", "accumulate", "global_batch_changed"), [(2, 1, True), (2, 2, False)])
def test_a_resume_that_splits_the_data_anew_says_it_in_one_line(
    tiny_corpus, tmp_path, caplog, batch_size, accumulate, global_batch_changed
):
    """Another batch size (or number of processes) on resume said two lines, each its own account of one change: the
    data's "data: resumed with batch_size 4 -> 2: litdata splits ..." at the restore, then the global batch's. The
    global batch's line says both; where the global batch is the same (twice the accumulation), the data's alone."""
    module, data = make_run(tiny_corpus, n_layer=2)
    make_trainer(tmp_path, 1, [ModelCheckpoint(tmp_path / "ckpt", save_last=True)]).fit(module, datamodule=data)
    module, data = make_run(tiny_corpus, n_layer=2)
    data.batch_size = batch_size
    trainer = make_trainer(tmp_path / "again", 3, [], enable_checkpointing=False, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    said = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    resplit = [line for line in said if "litdata splits the rest of the epoch anew" in line]
    assert len(resplit) == 1, resplit
    data_line = (
        "data: resumed with batch_size 4 -> 2: litdata splits the rest of the epoch anew, so a few samples at the "
        "resumed position may be read twice or skipped"
    )
    if global_batch_changed:
        assert resplit[0].startswith("resumed with another global batch: 4 -> 2 sequences (128 -> 64 tokens) ")
        assert resplit[0].endswith(f"--trainer.accumulate_grad_batches 2 keeps the checkpoint's; {data_line}")
    else:
        assert resplit == [data_line] and not any("global batch" in line for line in said)


@pytest.mark.parametrize(
    ("saved", "now", "keep"),
    [
        ((4, 1, 2, 32), (4, 1, 2, 32), None),  # the same: nothing said
        ((4, 1, 2, 32), (4, 2, 1, 32), None),  # 2 processes -> 1 under twice the accumulation: the same tokens
        ((4, 1, 2, 32), (4, 1, 1, 32), "--trainer.accumulate_grad_batches 2 keeps the checkpoint's"),  # 2 -> 1 process
        ((4, 1, 1, 32), (4, 1, 2, 32), "processes 4 again"),  # twice the processes: no accumulation halves it
        ((4, 3, 1, 32), (2, 1, 4, 32), "processes 12 again"),  # 12 sequences; 8 a micro-batch: no whole number
        ((4, 1, 1, 32), (4, 1, 1, 64), "x seq_len 128 again"),  # twice the tokens a sequence
        ((4, 1, 1, 64), (4, 1, 1, 32), "--trainer.accumulate_grad_batches 2 keeps the checkpoint's"),
        ({"batch_size": 4.0}, (4, 1, 1, 32), None),  # a foreign record: nothing said, nothing raised
        ("4x1x1", (4, 1, 1, 32), None),
    ],
)
def test_the_global_batch_change_names_old_and_new_and_how_to_keep_the_old(saved, now, keep):
    """The world-size case needs several processes: the comparison of the records (global_batch_change) alone."""
    from epas_lightning.global_batch import FACTORS, global_batch_change, sequences, tokens

    def record(values):
        return dict(zip((*FACTORS, "seq_len"), values, strict=True)) if isinstance(values, tuple) else values

    said = global_batch_change(record(saved), record(now))
    if keep is None:
        assert said is None
        return
    old, new = record(saved), record(now)
    assert said.startswith(
        f"resumed with another global batch: {sequences(old)} -> {sequences(new)} sequences ({tokens(old)} -> "
        f"{tokens(new)} tokens) an optimizer step (data.batch_size x trainer.accumulate_grad_batches x processes: "
        f"{' x '.join(map(str, saved[:3]))} -> {' x '.join(map(str, now[:3]))}); the LR schedule, its warmup and the "
        f"sharing schedule count optimizer steps, so each step now trains {tokens(new) / tokens(old):.3g}x the tokens"
    )
    assert said.endswith(keep)


def test_the_global_batch_counts_the_data_parallel_processes_and_the_loaders_batch_size():
    """The record takes the training loader's batch size (else the datamodule's; neither: no record) and the
    strategy's data-parallel replicas (a single device has none: the world size)."""
    from types import SimpleNamespace

    from epas_lightning.global_batch import global_batch

    def trainer(loader_batch, data_batch, strategy):
        loader, data = SimpleNamespace(batch_size=loader_batch), SimpleNamespace(batch_size=data_batch)
        return SimpleNamespace(
            train_dataloader=loader, datamodule=data, strategy=strategy, accumulate_grad_batches=3, world_size=4
        )

    ddp = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})  # tensor parallel over 2 of 4
    expected = {"batch_size": 5, "accumulate_grad_batches": 3, "world_size": 2, "seq_len": 32}
    assert global_batch(trainer(5, 7, ddp), 32) == expected
    assert global_batch(trainer(None, 5, ddp), 32) == expected
    assert global_batch(trainer(5, None, SimpleNamespace()), 32) == {**expected, "world_size": 4}
    assert global_batch(trainer(None, None, ddp), 32) is None


def test_a_resume_of_a_sharded_checkpoint_in_a_narrower_precision_says_so_too(tiny_corpus, tmp_path):
    """The weights of a sharded checkpoint load straight into the model, so the warning above (which read the dtype
    from the checkpoint's state_dict) never came: the checkpoint records its weights' dtype."""
    from epas_lightning import FSDP2Strategy

    module, data = make_run(tiny_corpus, n_layer=2)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 2, [checkpoint], strategy=FSDP2Strategy()).fit(module, datamodule=data)
    assert (tmp_path / "ckpt" / "last.ckpt" / ".metadata").is_file()
    module, data = make_run(tiny_corpus, n_layer=2)
    trainer = make_trainer(tmp_path, 3, [], precision="bf16-true", enable_checkpointing=False, strategy=FSDP2Strategy())
    with pytest.warns(UserWarning, match="resuming float32 weights with bfloat16 parameters"):
        trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("saved_by", ["fsdp2", "one device"])
def test_fsdp2_resumes_a_run_whose_sharing_layers_never_had_optimizer_state(tiny_corpus, tmp_path, saved_by):
    """With start_step 0 the region's q/k never get a gradient, so AdamW holds no state for them: FSDP2's resume failed
    on that 'missing' state (a sharded checkpoint: 'cannot read the shards ... copy it again'). They stay stateless,
    as in the run that saved (not a zero state at step 1, which shrinks their first update should they compute)."""
    from epas_lightning import FSDP2Strategy

    def sharing() -> ProgressiveSharing:
        return ProgressiveSharing(target=1, interval=2, start_step=0)

    module, data = make_run(tiny_corpus, n_layer=2)
    saving = FSDP2Strategy() if saved_by == "fsdp2" else "auto"
    make_trainer(tmp_path, 1, [sharing(), ModelCheckpoint(tmp_path / "ckpt", save_last=True)], strategy=saving).fit(
        module, datamodule=data
    )
    module, data = make_run(tiny_corpus, n_layer=2)
    trainer = make_trainer(tmp_path, 2, [sharing()], enable_checkpointing=False, strategy=FSDP2Strategy())
    trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    params, state = dict(module.model.named_parameters()), trainer.optimizers[0].state
    assert params["layers.1.self_attn.q_proj.weight"] not in state
    assert state[params["layers.1.self_attn.v_proj.weight"]]["step"] == 2


def test_the_held_out_loss_and_token_count_stay_exact_past_two_to_the_24_tokens():
    """Both were float32 sums: at 2**24 tokens (a validation of 16.8M tokens: 50 batches x 16 ranks x 10 x 2048) one
    more no longer counted, and val/tokens, with the loss it divides, stopped being exact."""
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2))
    module._new_heldout_metrics()
    many = 2**24
    module.val_loss.update(torch.ones(many), torch.ones(many, dtype=torch.bool))
    module.val_loss.update(torch.full((1,), 3.0), torch.ones(1, dtype=torch.bool))
    assert int(module.val_loss.total_tokens()) == many + 1  # what val/tokens logs
    assert module.val_loss.tokens == many + 1 and module.val_loss.compute() == (many + 3) / (many + 1)


def test_a_run_without_validation_extended_from_its_epoch_end_save_takes_the_epochs_plateau_step(tiny_corpus, tmp_path):
    """Without validation a checkpoint saves at each epoch's end (on_train_epoch_end), before Lightning steps the
    ReduceLROnPlateau schedulers of interval "epoch": a run extended from it never took that epoch's step (here on
    train/loss), and its learning rate halved one epoch after the uninterrupted run's."""
    from helpers import Steps

    from epas_lightning import RunCheckpoint

    class TrainLossPlateau(PlateauModule):
        plateau_interval = "epoch"

        def configure_optimizers(self):
            config = super().configure_optimizers()
            config["lr_scheduler"]["monitor"] = "train/loss"
            return config

    def fit(folder: str, max_steps: int, ckpt_path: Path | None = None) -> dict:
        recorder, logger = Recorder(), Steps()
        callbacks = [recorder, RunCheckpoint(dirpath=tmp_path / folder, save_last=True)]
        options = {"limit_train_batches": 3, "logger": logger, "log_every_n_steps": 1}
        module, data = make_run(tiny_corpus, n_layer=2, module_class=TrainLossPlateau)
        make_trainer(tmp_path, max_steps, callbacks, **options).fit(module, data, ckpt_path=ckpt_path)
        return {"lr": recorder.lrs, "loss": recorder.losses, "logged": logger.steps["train/loss"]}

    whole, first = fit("whole", 9), fit("first", 6)
    resumed = fit("first", 9, tmp_path / "first" / "last.ckpt")
    for key in ("lr", "loss"):
        assert {**first[key], **resumed[key]} == pytest.approx(whole[key]), key
    assert first["logged"] + resumed["logged"] == whole["logged"]


@pytest.mark.parametrize(
    "plateau",
    [
        {"plateau_interval": "epoch"},
        {"plateau_interval": "step", "plateau_monitor": "train/loss", "check_val_every_n_epoch": 2},
    ],
    ids=["a validation due at the stop's step", "none due there, a plateau scheduler stepped per step"],
)
def test_a_checkpoint_saved_at_the_epoch_end_of_a_stops_step_resumes_as_the_uninterrupted_run(
    tiny_corpus, tmp_path, plateau
):
    """A checkpoint of one's own saved at the end of the epoch (save_on_train_epoch_end) whose last step a stop ended,
    after the stop's save: Lightning had counted the step's end as done, so its resume ran neither the validation the
    stop skipped (its val/loss point missing) nor the step's plateau steps (the learning rate halved one epoch late).
    Where no validation was due at that step, the resume took the epoch's plateau step but not the step's, which the
    stop had held too (the learning rate then followed the uninterrupted run's one step late)."""
    from helpers import Recorder, SignalInStep, Steps

    from epas_lightning import GracefulStop, RunCheckpoint, StepCheckpoint

    def fit(max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None) -> dict:
        recorder, stop, logger = Recorder(), GracefulStop(), Steps()
        folder = tmp_path / ("first" if stop_at or ckpt_path else "whole")
        own = StepCheckpoint(dirpath=folder / "own", save_on_train_epoch_end=True, save_top_k=-1)
        callbacks = [recorder, SignalInStep(stop, stop_at), stop, RunCheckpoint(dirpath=folder, save_last=True), own]
        options = {"limit_val_batches": 1, "num_sanity_val_steps": 0, "logger": logger, "log_every_n_steps": 1}
        module, data = make_run(tiny_corpus, n_layer=2, module_class=PlateauModule)
        module.plateau_interval = plateau["plateau_interval"]
        module.plateau_monitor = plateau.get("plateau_monitor", "val/loss")
        validation = {"check_val_every_n_epoch": plateau.get("check_val_every_n_epoch", 1)}
        trainer = make_trainer(tmp_path, max_steps, callbacks, **options, **epochs_of_3, **validation)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return {
            "lr": recorder.lrs,
            "val": [(validation.step, validation.epoch) for validation in recorder.validations],
            "logged": Counter((tag, step) for tag, steps in logger.steps.items() for step in steps),
        }

    whole, first = fit(9), fit(9, stop_at=3)
    resumed = fit(9, tmp_path / "first" / "own" / "epoch=0-step=3.ckpt")
    assert first["val"] + resumed["val"] == whole["val"]
    assert {**first["lr"], **resumed["lr"]} == pytest.approx(whole["lr"])
    assert first["logged"] + resumed["logged"] == whole["logged"]


@pytest.mark.parametrize(
    ("signals", "reported"),
    [((None, "SIGINT"), "SIGINT"), (("SIGINT", "SIGINT"), "SIGINT"), (("SIGINT", "SIGTERM"), "SIGTERM")],
)
def test_every_rank_reports_the_signal_of_a_stop_alike(signals, reported):
    """Ctrl+C to one rank alone (a ``kill -INT`` of rank 1) stopped every rank, but the others reported SIGTERM: rank 0
    said "stopped by SIGTERM" and the command exited 143, not 130. The ranks (two threads here, their boolean
    all-reduces met at a barrier) now report one signal: Ctrl+C where every signalled rank got it, else SIGTERM."""
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from epas_lightning import GracefulStop

    barrier, decisions = threading.Barrier(2, timeout=10), [False, False]  # a rank that fails breaks it

    def agreed_stop(rank: int) -> tuple:
        def reduce(decision: bool, all: bool) -> bool:  # noqa: A002 (Lightning's keyword)
            decisions[rank] = decision
            barrier.wait()
            agreed = (min if all else max)(decisions)
            barrier.wait()  # both read it before the next reduce writes
            return agreed

        stop = GracefulStop()
        stop.received = signals[rank] and signal.Signals[signals[rank]]
        return stop._agreed_stop(
            SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=reduce))
        )

    with ThreadPoolExecutor(2) as ranks:
        results = list(ranks.map(agreed_stop, range(2)))
    assert results == [(signal.Signals[reported], False)] * 2


@pytest.mark.parametrize("counts", [(20, 3), (20, float("inf"))], ids=["unequal", "one not known"])
def test_ranks_of_a_validate_with_unequal_batches_agree_only_where_each_has_a_batch(counts):
    """``validate`` on several ranks agreed on a signal every 8 held-out batches: with a loader of the user's that gives
    the ranks unequal counts (or a length-less one), a rank with 20 batches waited at batch 9 for one that had ended its
    3: a hang. The ranks (two threads, their all-reduces met at a barrier) now agree only up to the fewest batches of
    any rank (none where a rank's count is not known), and once more as the evaluation ends; a SIGTERM to rank 1
    after its last agreement still stops both."""
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from epas_lightning import GracefulStop
    from epas_lightning.interrupted import Interrupted

    barrier, values, agreements = threading.Barrier(2, timeout=10), [0.0, 0.0], []  # a rank left waiting breaks it

    def met(rank: int, value: float, op) -> float:  # noqa: ANN001
        values[rank] = value
        barrier.wait()
        agreed = op(values)
        barrier.wait()  # both read it before the next one writes
        return agreed

    def validate(rank: int) -> tuple:
        strategy = SimpleNamespace(
            root_device=torch.device("cpu"),
            reduce=lambda tensor, reduce_op: torch.tensor(met(rank, float(tensor), {"min": min}[reduce_op])),
            reduce_boolean_decision=lambda decision, all: bool(met(rank, float(decision), min if all else max)),  # noqa: A006
        )
        trainer = SimpleNamespace(
            strategy=strategy,
            state=SimpleNamespace(fn=TrainerFn.VALIDATING),
            num_val_batches=[counts[rank]],
            is_global_zero=rank == 0,
            world_size=2,
        )
        stop = GracefulStop()
        stop._evaluated = 0  # as its setup for validate leaves it
        agreed = stop._agreed_stop

        def recorded(trainer) -> tuple:  # noqa: ANN001
            agreements.append((rank, stop._evaluated))
            return agreed(trainer)

        stop._agreed_stop = recorded
        try:
            stop.on_validation_start(trainer, None)
            for batch in range(20 if rank == 0 else 3):
                if rank == 1 and batch == 2:
                    stop._on_signal_in_evaluation(signal.SIGTERM, None)  # after the first agreement
                stop.on_validation_batch_end(trainer)
            stop.on_validation_end(trainer, None)
        except Interrupted as stopped:
            return stopped.signum, stopped.announce
        return None, None

    with ThreadPoolExecutor(2) as ranks:
        results = list(ranks.map(validate, range(2)))
    assert results == [(signal.SIGTERM, True), (signal.SIGTERM, False)]
    ended = [(0, 20), (1, 3)]  # (rank, its batches so far): as each ends; with known counts, after the first batch
    assert sorted(agreements) == sorted(ended + [(0, 1), (1, 1)] if counts[1] == 3 else ended)


def test_a_validate_after_a_stopped_fit_keeps_the_fits_exit_status(tiny_corpus, tmp_path):
    """A script that validates after ``fit`` (the same Trainer and ``GracefulStop``) and exits with
    ``stop.exit_status``: the validate's set-up cleared the fit's stop, so a fit stopped by SIGTERM exited 0."""
    from epas_lightning import GracefulStop

    stop = GracefulStop()
    module, data = make_run(tiny_corpus, 2)
    trainer = make_trainer(tmp_path, 100, [SignalInStep(stop, 2), stop], limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert stop.exit_status == 143
    trainer.validate(module, datamodule=data, verbose=False)
    assert stop.exit_status == 143 and stop.received is None


def test_ctrl_c_stops_a_one_process_validate_of_a_loader_without_length_within_its_first_batches(tmp_path):
    """A validate's batches agree on a signal only up to the fewest any rank has, none when a loader has no length: in
    one process, where no rank can be missing, Ctrl+C was then answered only after the last batch (Lightning's stopped
    at once)."""
    import signal

    from torch.utils.data import DataLoader, IterableDataset

    from epas_lightning import GracefulStop

    class NoLength(IterableDataset):
        def __iter__(self):
            return iter(torch.randint(0, 64, (12, 4, 17)))

    batches = []

    class CtrlC(Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
            batches.append(batch_idx)
            if batch_idx == 1:
                os.kill(os.getpid(), signal.SIGINT)

    stop = GracefulStop()
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16, vocab_size=64))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # Lightning ignores Ctrl+C
    try:
        with pytest.raises(SystemExit):
            trainer = cpu_trainer(tmp_path, 1, [CtrlC(), stop], limit_val_batches=1.0)
            trainer.validate(module, DataLoader(NoLength(), batch_size=None), verbose=False)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert stop.interrupted_by == signal.SIGINT and batches == list(range(9))


@pytest.mark.parametrize("save_last", [True, False])
def test_a_rewind_into_its_own_checkpoint_folder_leaves_the_later_checkpoints_alone(
    save_last, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """A fit resuming its run's step 4 into that run's checkpoint folder, where the run went on to step 8: its saves
    would replace that run's last.ckpt (or, save_last off, train beside its later checkpoints). One line before
    training, nothing written; the newest checkpoint resumes there as before."""
    from helpers import DEBUG_CONFIG

    from epas_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    run = ["fit", "--config", DEBUG_CONFIG, "--checkpoint.dirpath", "ck", "--checkpoint.every_n_train_steps", "4"]
    run += ["--checkpoint.save_top_k", "-1", "--checkpoint.save_last", str(save_last).lower()]
    run += ["--trainer.enable_progress_bar", "false"]
    assert main(run) == 0
    written = {path.name: path.read_bytes() for path in Path("ck").iterdir()}
    capsys.readouterr()
    assert main([*run, "--trainer.max_steps", "12", "--ckpt_path", "ck/epoch=0-step=4.ckpt"]) == 2
    newest = "last" if save_last else "ck/epoch=0-step=8.ckpt"
    assert capsys.readouterr().err == (
        "error: the run in this checkpoint folder went on to step 8 after epoch=0-step=4.ckpt, which this run would "
        "mix with its own checkpoints and replace — checkpoint.dirpath ck — give the resumed run an empty folder "
        f"(checkpoint.dirpath), or resume the newest with --ckpt_path {newest}\n"
    )
    assert {path.name: path.read_bytes() for path in Path("ck").iterdir()} == written
    assert main([*run, "--trainer.max_steps", "12", "--ckpt_path", newest]) == 0
    assert torch.load(f"ck/{'last' if save_last else 'epoch=0-step=12'}.ckpt", weights_only=True)["global_step"] == 12
