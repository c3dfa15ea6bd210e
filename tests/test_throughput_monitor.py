"""TokenThroughputMonitor during fit: tokens/s always; MFU and peak memory where the device has them (CUDA)."""

import lightning as L
import pytest
import torch
from helpers import FakeClock, Keys, Steps, cpu_trainer
from lightning.pytorch.callbacks import Callback

import epas_lightning.callbacks as callbacks
from epas_lightning import EPASModule, LlamaConfig, ProgressiveSharing, TokenThroughputMonitor
from epas_lightning.flops import estimate_flops, peak_dtype_name, peak_flops


def fit_keys(tmp_path) -> set[str]:
    L.seed_everything(0)
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    logger = Keys()
    trainer = cpu_trainer(tmp_path, 4, [TokenThroughputMonitor(window_size=2)], logger=logger, log_every_n_steps=1)
    trainer.fit(module, data)
    return logger.keys


def test_cpu_logs_tokens_and_flops_but_no_mfu_or_memory(tmp_path):
    keys = fit_keys(tmp_path)
    assert {"train/device/items_per_sec", "train/device/flops_per_sec"} <= keys
    assert "train/device/mfu" not in keys and callbacks.PEAK_MEMORY_KEY not in keys


def test_mfu_and_peak_memory_are_logged_where_the_device_has_them(tmp_path, monkeypatch, recwarn, caplog):
    """Our peak table knows devices Lightning's lacks: its "FLOPs not found for 'NVIDIA H200'" (seen on the lent H200)
    must not appear where ours supplies the peak. The peak MFU divides by is said, once (it was nowhere to see)."""
    import lightning.pytorch.callbacks.throughput_monitor as lightning_monitor
    from lightning.pytorch.utilities import rank_zero_warn

    def lightning_lookup(device, dtype):
        rank_zero_warn("FLOPs not found for 'NVIDIA H200', chip is 'nvidia h200'")

    monkeypatch.setattr(lightning_monitor, "get_available_flops", lightning_lookup)
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: 1e12)
    monkeypatch.setattr(callbacks, "peak_memory_gib", lambda device: 1.5)
    with caplog.at_level("INFO"):
        keys = fit_keys(tmp_path)
    assert {"train/device/mfu", callbacks.PEAK_MEMORY_KEY} <= keys
    said = [r.getMessage() for r in caplog.records if "train/device/mfu" in r.getMessage()]
    assert said == [
        "MFU (train/device/mfu) divides each device's FLOP/s by 1.0 TFLOP/s: the dense float32 peak taken for its cpu"
    ]
    assert not [w for w in recwarn if "FLOPs not found" in str(w.message)]


def test_validation_flops_count_the_forward_passes_of_the_validation_batch(tmp_path):
    """One forward at the training region, and one per region length ``val_sharing_layers`` also scores (their time
    was counted, their FLOPs were not: validate/device/flops_per_sec and MFU came out a third here)."""
    seen = {}

    class ReadFlops(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["train"] = pl_module.flops_per_batch

        def on_validation_batch_end(self, trainer, pl_module, *args):
            seen["val"] = pl_module.flops_per_batch

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    train = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    val = torch.utils.data.DataLoader(torch.randint(0, 512, (3, 9)), batch_size=3)
    sharing = ProgressiveSharing(target=1, interval=2, val_sharing_layers=[0, 1])  # dense until validation
    trainer = cpu_trainer(tmp_path, 2, [sharing, ReadFlops()], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    config = module.config
    assert seen["train"] == 2 * estimate_flops(config, 0, 16)
    forwards = [estimate_flops(config, n, 8, backward=False) for n in (0, 0, 1)]  # not the last training batch's 3x
    assert seen["val"] == 3 * sum(forwards)


def test_validation_throughput_is_logged_at_the_step_the_validation_ran(tmp_path):
    """Lightning logs it at every validation batch with the count of validation batches as the step: a fit validating
    after steps 2 and 4 plotted validate/* at steps 1 to 6, among the training steps."""

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    train = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    val = torch.utils.data.DataLoader(torch.randint(0, 512, (6, 17)), batch_size=2)
    logger = Steps()
    monitor = TokenThroughputMonitor(window_size=2)
    trainer = cpu_trainer(
        tmp_path, 4, [monitor], logger=logger, log_every_n_steps=1, val_check_interval=2, limit_val_batches=3
    )
    trainer.fit(module, train, val)
    assert logger.steps["val/loss"] == [1, 3]
    assert logger.steps["validate/device/items_per_sec"] == logger.steps["validate/batches"] == [1, 3]


def test_training_throughput_is_logged_at_the_steps_of_the_losses_without_a_second_epoch(tmp_path):
    """Logged without a step, Lightning added ``epoch`` to the monitor's metrics: TensorBoard got it twice per step."""
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    train = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    logger = Steps()
    trainer = cpu_trainer(tmp_path, 4, [TokenThroughputMonitor(window_size=2)], logger=logger, log_every_n_steps=1)
    trainer.fit(module, train)
    assert logger.steps["train/device/items_per_sec"] == logger.steps["train/loss"][1:] == [1, 2, 3]
    assert logger.steps["epoch"] == [0, 1, 2, 3]


def test_under_gradient_accumulation_the_rates_are_of_whole_optimizer_steps(tmp_path, monkeypatch):
    """A fake clock: 1 s per micro-batch, 3 s per optimizer update (the gradient sync, AdamW), 10 s per validation
    batch. Lightning's window ran over micro-batches: 2 entries gave one micro-batch's tokens over that micro-batch and
    an update (32 / 4 s), not a step's tokens over the step (64 / 5 s); windows of other lengths over- or
    under-weighted the updates. A validation in the middle of a step (after 3 micro-batches) is no training time."""

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=1)
    logger, monitor = Steps(), TokenThroughputMonitor(window_size=2)
    options = {"logger": logger, "log_every_n_steps": 1, "accumulate_grad_batches": 2}
    validation = {"val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    cpu_trainer(tmp_path, 4, [FakeClock(monkeypatch), monitor], **options, **validation).fit(module, data, data)
    assert logger.steps["validate/batches"] == [1, 2]
    assert logger.steps["train/device/items_per_sec"] == [1, 2, 3]
    assert logger.values["train/device/items_per_sec"] == [32 / 5] * 3  # 2 x 16 tokens in 2 x 1 s + 3 s
    flops = 2 * estimate_flops(module.config, 0, 16)
    assert logger.values["train/device/flops_per_sec"] == [pytest.approx(flops / 5)] * 3
    assert logger.values["train/time"] == [5, 10, 15, 20]


@pytest.mark.parametrize(("accumulate", "lengths"), [(2, [192, 256]), (1, [160, 192])])
def test_the_run_totals_continue_across_a_resume(tmp_path, accumulate, lengths):
    """Lightning counted train/time, batches, samples and lengths (tokens) from 0 again in a resumed session. A resume
    with another global batch (accumulate_grad_batches 2 -> 1) counts on with the tokens its steps train, and says
    once that its steps train other tokens than the checkpoint's, which the schedules count in."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path=None, accumulate_grad_batches=2) -> Steps:
        module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
        data = torch.utils.data.DataLoader(torch.randint(0, 512, (16, 17)), batch_size=2)
        logger, checkpoint = Steps(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        monitor = TokenThroughputMonitor(window_size=2)
        options = {"logger": logger, "log_every_n_steps": 1, "accumulate_grad_batches": accumulate_grad_batches}
        cpu_trainer(tmp_path, max_steps, [monitor, checkpoint], **options).fit(module, data, ckpt_path=ckpt_path)
        return logger

    first = fit(2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        resumed = fit(4, tmp_path / "ckpt" / "last.ckpt", accumulate)
    changed = [str(w.message) for w in said if "global batch" in str(w.message)]
    assert resumed.steps["train/lengths"] == [2, 3]
    assert first.values["train/lengths"] == [64, 128] and resumed.values["train/lengths"] == lengths  # 2 x 16 a batch
    assert resumed.values["train/samples"] == [n // 16 for n in lengths]
    assert resumed.values["train/time"][0] > first.values["train/time"][-1]
    if accumulate == 2:
        assert changed == []
        return
    assert changed == [
        "resumed with another global batch: 4 -> 2 sequences (64 -> 32 tokens) an optimizer step (data.batch_size x "
        "trainer.accumulate_grad_batches x processes: 2 x 2 x 1 -> 2 x 1 x 1); the LR schedule, its warmup and the "
        "sharing schedule count optimizer steps, so each step now trains 0.5x the tokens it did; "
        "--trainer.accumulate_grad_batches 2 keeps the checkpoint's"
    ]


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM2e", 756.0),  # an H100 PCIe too (Lambda's, RunPod's): it was taken for the SXM's 989.4
        ("NVIDIA L40S", 362.05),  # Lightning's lookup takes an L40S or L40 for an L4 (121): MFU 3x or 1.5x too high
        ("NVIDIA L40", 181.05),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA RTX A1000", None),  # not an A100 (it matched "A100" inside its name: MFU from a 312 TFLOP/s peak)
        ("NVIDIA GH200 480GB", 989.4),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_are_dense_bf16_datasheet_figures(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == (tflops * 1e12 if tflops else None)
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("name", "tf32", "fp32"),
    [
        ("NVIDIA H200", 494.7, 66.9),
        ("NVIDIA H100 80GB HBM3", 494.7, 66.9),
        ("NVIDIA H100 PCIe", 378.0, 51.2),
        ("NVIDIA H100 NVL", 417.5, 60.0),  # Lightning's: the figures of a pair (989.4, 133.8), MFU half the truth
        ("NVIDIA L40S", 183.0, 91.6),  # Lightning's: an L4's (60, 30.3), MFU 3x too high
        ("NVIDIA L40", 90.5, 90.5),
        ("NVIDIA A100-SXM4-80GB", 156.0, 19.5),
        ("Tesla T4", None, None),  # not ours: Lightning's figure, where it has one
    ],
)
def test_a_32_true_run_divides_by_the_tf32_or_fp32_peak_its_matmuls_run_at(monkeypatch, name, tf32, fp32):
    """32-true fell through to Lightning's table, whose L40S is an L4 and whose H100 NVL is a pair of GPUs."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    for precision, tflops, said in (("high", tf32, "tf32"), ("highest", fp32, "float32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda precision=precision: precision)
        assert peak_flops(torch.device("cuda"), torch.float32) == (tflops * 1e12 if tflops else None)
        assert peak_dtype_name(torch.float32) == said
    assert peak_dtype_name(torch.bfloat16) == "bfloat16"
    assert peak_flops(torch.device("cuda"), torch.float64) is None  # none of ours: Lightning's fp64 figure


def test_the_mfu_line_names_the_peak_of_the_runs_precision(tmp_path, monkeypatch, caplog):
    """A 64-true run was taken for a float32 one (the fp32 peak, said as such); a 32-true run whose matmuls run in
    tf32 was said to divide by the 'float32' peak."""
    asked = []
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: asked.append(dtype) or 1e12)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    for precision, said in (("32-true", "tf32"), ("64-true", "float64")):
        caplog.clear()
        with caplog.at_level("INFO"):
            cpu_trainer(tmp_path, 1, [TokenThroughputMonitor()], precision=precision).fit(module, data)
        lines = [r.getMessage() for r in caplog.records if "train/device/mfu" in r.getMessage()]
        assert lines == [
            f"MFU (train/device/mfu) divides each device's FLOP/s by 1.0 TFLOP/s: the dense {said} peak taken for "
            "its cpu"
        ]
    assert asked == [torch.float32, torch.float64]


def test_values_logged_every_step_are_host_tensors(tmp_path, monkeypatch):
    """Lightning makes a logged Python number a tensor on the module's device: on CUDA a blocking host-to-device copy
    (a device sync) at every step, for ``sharing/layers``, ``sharing/flop_cut`` and the peak memory alike."""
    logged: dict[str, list] = {}
    log = EPASModule.log

    def spy(self, name, value, *args, **kwargs):
        logged.setdefault(name, []).append(value)
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(EPASModule, "log", spy)
    monkeypatch.setattr(callbacks, "peak_memory_gib", lambda device: 1.5)
    L.seed_everything(0)
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    monitors = [TokenThroughputMonitor(window_size=2), ProgressiveSharing(target=1, interval=2)]
    cpu_trainer(tmp_path, 4, monitors, logger=Keys(), log_every_n_steps=1).fit(module, data)
    for key in ("sharing/layers", "sharing/flop_cut", callbacks.PEAK_MEMORY_KEY):
        assert len(logged[key]) == 4
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in logged[key]), key


def test_with_attention_reuse_the_flops_drop_by_the_attention_products_the_sharing_layers_skip(tmp_path):
    """A sharing layer that reuses the source's attention probabilities computes P @ V alone, not Q K^T: the FLOPs
    logged (and MFU) counted Q K^T in every layer, 7% over what ran here, and sharing/flop_cut half the cut."""
    from lightning.fabric.utilities.throughput import measure_flops

    from epas_lightning.model import Llama

    config = LlamaConfig.from_name("debug", n_layer=4, block_size=16)
    with torch.device("meta"):
        model = Llama(config, attention_reuse=True)
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    measured = []  # the model's FLOPs, forward and backward, as torch counts them, per sharing layer count
    for n in range(3):
        model.set_shared_layers(range(4 - n, 4))
        measured.append(measure_flops(model, lambda: model(x), lambda y: y.sum()))
    seen = []

    class ReadFlops(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((pl_module.n_shared, pl_module.flops_per_batch, trainer.callback_metrics["sharing/flop_cut"]))

    module = EPASModule(config, attention_reuse=True)
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    sharing = ProgressiveSharing(target=2, interval=1)
    cpu_trainer(tmp_path, 3, [sharing, ReadFlops()]).fit(module, data)
    assert [(n, flops) for n, flops, _ in seen] == [(n, measured[n]) for n in range(3)]
    assert [float(cut) for *_, cut in seen] == pytest.approx([1 - measured[n] / measured[0] for n in range(3)])


def test_the_peak_of_a_transformer_engine_run_is_not_taken_for_an_fp32_one(tmp_path, monkeypatch):
    """The dtype is Lightning's reading of the precision plugin: taken from the precision's name, "transformer-engine"
    (fp8 matmuls) would be 32-true, and MFU would divide fp8 work by the tf32 peak."""
    from lightning.pytorch.plugins.precision import TransformerEnginePrecision
    from lightning.pytorch.trainer.states import RunningStage

    asked = []
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: asked.append(dtype))
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    trainer = cpu_trainer(tmp_path, 1)
    plugin = object.__new__(TransformerEnginePrecision)  # without transformer_engine installed
    plugin.precision = "transformer-engine"
    monkeypatch.setattr(trainer.strategy, "_precision_plugin", plugin)
    trainer.state.stage = RunningStage.TRAINING
    TokenThroughputMonitor().setup(trainer, module, "fit")
    assert asked == [torch.int8]


def test_held_out_throughput_counts_the_real_rows_not_the_pad_rows(tmp_path, monkeypatch):
    """Held-out batches end in pad rows (every rank reads as many full batches): validate/samples and lengths counted
    them as sequences and tokens (here 4 and 64, where val/tokens scored 48), and the rates and FLOPs with them."""
    from epas_lightning.loss import PAD

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    train = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    held_out = torch.cat([torch.randint(0, 512, (3, 17)), torch.full((1, 17), PAD)])  # 3 sequences, one pad row
    logger = Steps()
    options = {"logger": logger, "log_every_n_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": 2}
    callbacks = [FakeClock(monkeypatch, update=0.0), TokenThroughputMonitor(window_size=2)]
    trainer = cpu_trainer(tmp_path, 2, callbacks, **options)
    trainer.fit(module, train, torch.utils.data.DataLoader(held_out, batch_size=2))
    assert logger.values["val/tokens"] == [48]
    assert logger.values["validate/samples"] == [3] and logger.values["validate/lengths"] == [48]
    assert logger.values["validate/device/items_per_sec"] == [16 / 10]  # the second batch: one sequence in 10 s
    forward = estimate_flops(module.config, 0, 16, backward=False)
    assert logger.values["validate/device/flops_per_sec"] == [pytest.approx(forward / 10)]


def test_a_held_out_batch_of_pad_rows_alone_is_no_batch(tmp_path):
    """A batch of pad rows only (a rank with fewer held-out sequences than the others) holds no sequence to count."""
    from epas_lightning.loss import PAD

    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, block_size=16))
    held_out = torch.cat([torch.full((2, 17), PAD), torch.randint(0, 512, (3, 17))])
    logger = Steps()
    monitor = TokenThroughputMonitor(window_size=2)
    trainer = cpu_trainer(tmp_path, 1, [monitor], logger=logger, log_every_n_steps=1, limit_val_batches=1.0)
    trainer.validate(module, torch.utils.data.DataLoader(held_out, batch_size=2))
    assert logger.steps["validate/samples"] == [2, 3] and logger.values["validate/samples"] == [2, 3]
    assert logger.values["validate/lengths"] == [32, 48]
