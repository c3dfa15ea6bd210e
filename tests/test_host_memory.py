"""Host memory of the commands that read a checkpoint: no copy of the weights beyond the model's own, and none wider.

Checked by what is read and allocated (safe readers' arguments, tensors created, by dtype), not by timing or RSS."""

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import save as dcp_save
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from epas_lightning import Llama, LlamaConfig, checkpoint_formats, init_from, weight_checks
from epas_lightning import checkpoint as checkpoint_module
from epas_lightning.checkpoint import load_model
from epas_lightning.consolidation import consolidate
from epas_lightning.errors import CheckpointError
from epas_lightning.hf import convert
from epas_lightning.hf.export import export


class Created(TorchDispatchMode):
    """Counts the elements of every tensor an op creates (views and in-place results excepted), by op and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.numel: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and not t.is_meta]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in inputs:
                self.numel[func.overloadpacket.__name__, t.dtype] += t.numel()
        return out

    def of(self, dtype: torch.dtype, op: str | None = None) -> int:
        return sum(n for (name, d), n in self.numel.items() if d == dtype and op in (None, name))


def tied_model() -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("debug", tie_embeddings=True))
    model.tie_weights()
    model.set_shared_layers([1])
    return model


def save_ckpt(model: Llama, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """``model`` as fit's ``.ckpt`` (weights in ``dtype``) with an optimizer state, which no reader needs."""
    state = {"model." + k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    adam = {i: {"exp_avg": torch.zeros_like(t)} for i, t in enumerate(state.values())}
    checkpoint = {"state_dict": state, "model_config": model.config.to_dict(), "optimizer_states": [{"state": adam}]}
    torch.save(checkpoint, path)
    return path


def test_consolidate_and_export_of_a_bf16_checkpoint_make_no_float32_copy_and_no_needless_clone(tmp_path):
    """A bf16 checkpoint was loaded into a float32 model, cast back, and every tensor cloned for safetensors: about
    4 bytes per parameter more than the checkpoint's 2 (export: 2 more for the bf16 copy). Now the model is built in
    the stored dtype, and only a tensor that shares memory with another (a tied embedding) is copied for saving."""
    model = tied_model()
    ckpt = save_ckpt(model, tmp_path / "bf16.ckpt", torch.bfloat16)
    embedding = model.embed_tokens.weight.numel()
    for command, output, copied in ((consolidate, "c", embedding), (export, "hf", 0)):
        with Created() as created:
            command(ckpt, tmp_path / output)
        assert created.of(torch.float32) == 0, (command.__name__, created.numel)
        assert created.of(torch.bfloat16, "clone") == copied, (command.__name__, created.numel)
    consolidated = load_model(tmp_path / "c", dtype="bfloat16").model.state_dict()
    exported = load_model(tmp_path / "hf", dtype="bfloat16").model.state_dict()
    for key, t in model.to(torch.bfloat16).state_dict().items():
        assert torch.equal(consolidated[key], t) and torch.equal(exported[key], t), key


def test_load_model_reads_the_weights_a_tensor_or_a_batch_at_a_time(tmp_path, monkeypatch):
    """Every form was read whole beside the model it loads into: a .ckpt (optimizer state and all) by torch.load
    without mmap, a consolidated or HF folder by safetensors' load_file, a sharded folder into a full state dict.
    Now a .ckpt is mapped (weights_only, as before), safetensors are read a tensor at a time, shards a batch of at most
    SHARD_READ_BYTES (or one tensor) at a time; the loaded weights are those stored."""
    model = tied_model()
    fp32 = model.state_dict()
    sharded = tmp_path / "sharded"
    dcp_save({"state_dict": {"model." + k: v for k, v in fp32.items()}}, checkpoint_id=sharded, no_dist=True)
    torch.save({"model_config": model.config.to_dict()}, sharded / "meta.pt")
    forms = [save_ckpt(model, tmp_path / "fp32.ckpt"), sharded, consolidate(sharded, tmp_path / "c")]
    forms.append(export(sharded, tmp_path / "hf", sharing_layers=0))

    loads, batches = [], []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **k: loads.append((f, k)) or torch_load(f, **k))
    for module in (checkpoint_formats, convert):

        def whole(*args, **kwargs):
            raise AssertionError("a whole safetensors file was read")

        monkeypatch.setattr(module, "load_file", whole, raising=False)
    read_shards = checkpoint_formats.read_shards
    largest = max(t.numel() * t.element_size() for t in fp32.values())
    monkeypatch.setattr(checkpoint_formats, "SHARD_READ_BYTES", largest // 4, raising=False)

    def batch(state, path):
        batches.append(sum(t.numel() * t.element_size() for t in state.values()))
        read_shards(state, path)

    monkeypatch.setattr(checkpoint_formats, "read_shards", batch)
    for path in forms:
        loaded = load_model(path, dtype="float32").model.state_dict()
        expected = {k: v for k, v in fp32.items() if k != "sharing.mask" or path.name != "hf"}  # a dense export
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), path
    files = [k for f, k in loads if isinstance(f, Path) and f.suffix == ".ckpt"]
    assert files and all(k["mmap"] and k["weights_only"] for k in files), loads
    weights = sum(t.numel() * t.element_size() for k, t in fp32.items() if k != "lm_head.weight")
    assert len(batches) > 2 and max(batches[1:]) <= largest + largest // 4 < weights, batches  # [0]: the mask


def test_the_check_for_nan_and_inf_reads_a_slice_of_a_weight_at_a_time(tmp_path, monkeypatch):
    """load_model checked each weight with one isfinite of the whole tensor, whose temporaries (its absolute value,
    then comparisons) took two to three times the largest weight's bytes beside the model. Now CHECK_ELEMENTS at a
    time; a NaN in the last slice is still found."""
    model = tied_model()
    monkeypatch.setattr(weight_checks, "CHECK_ELEMENTS", 1000, raising=False)
    seen, isfinite = [], torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    load_model(save_ckpt(model, tmp_path / "ok.ckpt"))
    assert seen and max(seen) <= 1000, max(seen)
    with torch.no_grad():
        model.embed_tokens.weight[-1, -1] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or inf \(embed_tokens.weight"):
        load_model(save_ckpt(model, tmp_path / "nan.ckpt"))


def reading_without_the_norm(monkeypatch) -> None:
    """The weight reader gives every weight but ``norm.weight`` (as if the file changed after its header was read)."""
    stored_weights = checkpoint_formats.stored_weights

    def without_norm(*args):
        return ((key, t) for key, t in stored_weights(*args) if key != "norm.weight")

    for module in (checkpoint_module, checkpoint_formats):  # where load_model and init_from look it up
        monkeypatch.setattr(module, "stored_weights", without_norm)


def test_a_weight_that_is_named_but_not_read_is_refused_not_left_uninitialised(tmp_path, monkeypatch):
    """The model's weights are allocated empty and filled from the file as it is read: a weight the header names but
    the read does not give (a file changed in between) would be left as whatever memory held."""
    ckpt = save_ckpt(tied_model(), tmp_path / "fp32.ckpt")
    reading_without_the_norm(monkeypatch)
    with pytest.raises(CheckpointError, match=r"weights named in its header were not found \(norm.weight\)"):
        load_model(ckpt)


def test_init_from_hands_the_model_bounded_batches_in_its_dtype(tmp_path, monkeypatch):
    """fit's init_from read the whole source on every rank (eight copies on an 8-GPU node): ours into a float32 model,
    then a copy in the model's dtype, all handed to set_model_state_dict at once. Now every form is read a tensor (or
    a shard batch) at a time and handed over about INIT_READ_BYTES at a time in the model's dtype (the tied head with
    the embedding); a bf16 source into a bf16 model makes no float32 tensor, and the weights are those stored."""
    model = tied_model().to(torch.bfloat16)
    bf16 = model.state_dict()
    sharded = tmp_path / "sharded"
    dcp_save({"state_dict": {"model." + k: v for k, v in bf16.items()}}, checkpoint_id=sharded, no_dist=True)
    torch.save({"model_config": model.config.to_dict()}, sharded / "meta.pt")
    forms = [save_ckpt(model, tmp_path / "bf16.ckpt", torch.bfloat16), sharded, consolidate(sharded, tmp_path / "c")]
    forms.append(export(sharded, tmp_path / "hf", sharing_layers=0))

    batches = []
    set_model_state_dict = init_from.set_model_state_dict

    def record(model, state, **kwargs):
        assert {t.dtype for t in state.values()} == {torch.bfloat16}, state.keys()
        batches.append(sum({t.data_ptr(): t.numel() * t.element_size() for t in state.values()}.values()))
        return set_model_state_dict(model, state, **kwargs)

    monkeypatch.setattr(init_from, "set_model_state_dict", record)
    largest = max(t.numel() * t.element_size() for t in bf16.values())
    monkeypatch.setattr(init_from, "INIT_READ_BYTES", largest // 4, raising=False)
    for path in forms:
        torch.manual_seed(1)
        target, batches[:] = Llama(model.config).to(torch.bfloat16), []
        with Created() as created, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the source trained layer 1 sharing: this run starts dense
            init_from.load_initial_weights(target, path)
        assert created.of(torch.float32) == 0, (path, created.numel)
        assert len(batches) > 3 and max(batches) < largest + largest // 4, (path, batches)
        for key, t in target.state_dict().items():
            assert key == "sharing.mask" or torch.equal(t, bf16[key]), (path, key)


def test_init_from_refuses_a_weight_that_is_named_but_not_read(tmp_path, monkeypatch):
    """init_from reads the weights after checking their names and shapes: one the header names but the read does not
    give (a file changed in between) is refused, not left as the model's random init."""
    ckpt = save_ckpt(tied_model(), tmp_path / "fp32.ckpt")
    reading_without_the_norm(monkeypatch)
    with pytest.raises(CheckpointError, match=r"weights named in its header were not found \(norm.weight\) — model"):
        init_from.load_initial_weights(tied_model(), ckpt)


def test_init_from_checks_a_legacy_bin_folder_without_holding_its_weights(tmp_path, monkeypatch):
    """The shapes of an HF folder's pytorch_model.bin written in torch's legacy (non-zip) format, which cannot be
    mapped, were read by loading it whole: EPASModule's check of init_from held a copy of the model on every rank of
    rank 0's node, before any data (and fit's load read it whole once more for the shapes alone). Now the shapes
    load to the meta device (weights_only, as before); the full load still reads the weights stored."""
    from safetensors.torch import load_file

    model = tied_model()
    folder = export(save_ckpt(model, tmp_path / "a.ckpt"), tmp_path / "hf", sharing_layers=0)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    held, torch_load = [], torch.load

    def load(f, **kwargs):
        loaded = torch_load(f, **kwargs)
        assert kwargs["weights_only"], kwargs
        held.extend(key for key, t in loaded.items() if not t.is_meta)
        return loaded

    monkeypatch.setattr(torch, "load", load)
    init_from.check_init_weights(folder, model.config)
    assert not held, held
    target = Llama(model.config)
    init_from.load_initial_weights(target, folder)
    for key, t in target.state_dict().items():
        assert key == "sharing.mask" or torch.equal(t, model.state_dict()[key]), key
