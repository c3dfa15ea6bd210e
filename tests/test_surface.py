"""One product surface: every command from one CLI, the trained region as a record, a run that says what happened."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import get_type_hints

import docstring_parser.parser
import pytest
import torch
from helpers import DEBUG_CONFIG as DEBUG
from helpers import REPO, run_cli, signal_fit_once_training, train_tiny_checkpoint
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from epas_lightning import ProgressiveSharing
from epas_lightning.checkpoint import REGION_KEY, load_model
from epas_lightning.cli import LIGHTNING_COMMANDS, OTHER_FLAG_NAMES, TOOLS, function_parser, main, tool, tool_docstring
from epas_lightning.errors import CheckpointError, ConfigError, OutputError
from epas_lightning.resume import check_version_folder_free, continue_version, resume_checkpoint
from epas_lightning.runtime import DType, resolve_dtype

# ---------------------------------------------------------------------------------------------------------------------
# One CLI
# ---------------------------------------------------------------------------------------------------------------------


def option_help(help_text: str, usage: str) -> str:
    """The help of one option of ``--help``'s output, ``usage`` being how its line starts, on one line."""
    return " ".join(help_text.split(f"\n  {usage}")[-1].split("\n  --")[0].split())


def test_top_level_help_lists_every_command_with_a_description(capsys, monkeypatch):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in (*LIGHTNING_COMMANDS, *TOOLS):
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split(maxsplit=1)[1]) > 20, line
    assert "predict" not in out
    built, prepare = [], LightningCLI._prepare_subcommand_parser
    monkeypatch.setattr(
        LightningCLI, "_prepare_subcommand_parser", lambda *a, **k: built.append(a[2]) or prepare(*a, **k)
    )
    read_source = []  # reading attribute docstrings reads the source of every class, Lightning's Trainer included
    monkeypatch.setattr(docstring_parser.parser, "add_attribute_docstrings", lambda obj, _: read_source.append(obj))
    assert main(["fit", "--help"]) == 0
    assert built == ["fit"]  # the parsers of validate and test cost as much, and are not used
    assert read_source == []
    fit_help = capsys.readouterr().out
    assert "Number of decoder layers." in fit_help  # LlamaConfig's fields are documented all the same
    assert fit_help.startswith("usage: python -m epas_lightning fit [-c CONFIG]")  # was `epas_lightning [options] fit`
    assert "use ``weights_only=False``" not in fit_help  # Lightning's advice, refused here
    ckpt_path_help = " ".join(fit_help.split("--ckpt_path CKPT_PATH\n")[-1].split("\n  --")[0].split())
    assert "Model Registry" not in ckpt_path_help and "previous ``trainer.fit`` call" not in ckpt_path_help  # paths
    assert "`last`: the newest last.ckpt of this run" in ckpt_path_help and "`auto`" in ckpt_path_help
    interval_help = fit_help.split("--checkpoint.train_time_interval TRAIN_TIME_INTERVAL")[-1].split("\n  --")[0]
    assert '"H:MM:SS" (e.g. "0:30:00")' in " ".join(interval_help.split())  # the format it takes
    lr_interval_help = fit_help.split("--lr_monitor.logging_interval LOGGING_INTERVAL")[-1].split("\n  --")[0]
    lr_interval_help = " ".join(lr_interval_help.split())
    assert "Defaults to ``None``" not in lr_interval_help and "default: step" in lr_interval_help  # it is step here
    save_last_help = option_help(fit_help, "--checkpoint.save_last SAVE_LAST")  # said Lightning's default, None
    assert "Default: ``None``" not in save_last_help and "true (the default here)" in save_last_help
    dirpath_help = option_help(fit_help, "--checkpoint.dirpath DIRPATH")  # said None saves nothing to disk
    assert "do not save anything to disk" not in dirpath_help and "runs/epas/version_N/checkpoints" in dirpath_help
    logger_help = option_help(fit_help, "--trainer.logger LOGGER")  # said Lightning's default, True
    assert "Default: ``True``" not in logger_help and "runs/epas/version_N" in logger_help
    assert main(["fit", "--config", DEBUG, "--weights_only", "false"]) == 2
    assert "— --weights_only false — leave it unset" in capsys.readouterr().err
    assert main(["fit", "--trainer.callbacks.help", "EarlyStopping"]) == 0  # its usage line read `__main__.py`
    assert capsys.readouterr().out.startswith("usage: python -m epas_lightning fit --trainer.callbacks.monitor")


def test_help_lists_a_tools_switches_in_the_order_of_its_arguments():
    """The switches (--force, --json, --overwrite...) were added from a set: each run's --help listed them in another
    order (the hash seed's), so two runs of ``generate --help`` differed."""
    for name in TOOLS:
        fn = tool(name)
        hints = get_type_hints(fn)
        switches = [p for p in inspect.signature(fn).parameters if hints.get(p) in (bool, bool | None)]
        listed = [a.dest for a in function_parser(fn, name)._actions if a.dest in switches]
        assert listed == switches, name


@pytest.mark.parametrize("command", sorted(TOOLS))
def test_every_tool_speaks_the_same_vocabulary(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config CONFIG" in out
    assert "``" not in out  # the docstrings' reStructuredText literals read as `name`
    runs_a_model = ("generate", "chat", "bench", "evaluate", "analyze", "serve", "lm-eval")
    writes = ("prepare", "consolidate", "export", "bench", "evaluate", "analyze", "lm-eval")
    vocabulary = {
        "--checkpoint": command != "prepare",
        "--output": command in writes,
        "--device": command in runs_a_model,
        "--dtype": command in (*runs_a_model, "export", "consolidate"),
        "--sharing-layers": command in ("generate", "chat", "bench", "evaluate", "export", "serve", "lm-eval"),
        "--force": command in ("generate", "chat", "bench", "evaluate", "export", "lm-eval"),  # serve: none past it
        "--json": command not in ("serve", "chat"),  # a server and a conversation have no result line
    }
    parser = function_parser(tool(command), command)
    options = [o for a in parser._actions if a.dest not in ("help", "print_config") for o in a.option_strings]
    assert {flag: flag in options for flag in vocabulary} == vocabulary, command
    helps = {o: " ".join(a.help.split()) for a in parser._actions for o in a.option_strings if a.help}
    said = {  # one flag, one meaning, said the same way
        "--checkpoint": "A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA "
        "folder.",
        "--device": "auto (CUDA when available), cpu, cuda, cuda:1, ...",
        "--json": "End with one JSON line of ",
        "--force": "Allow a region longer than the trained one (its extra layers never learned to share: quality "
        "drops sharply); of a stock export, which runs dense, any region above 0.",  # was said three ways
    }
    assert all(text in helps[flag] for flag, text in said.items() if vocabulary[flag]), command
    held_out = ("bench", "evaluate", "analyze")
    said_where = [  # one meaning where some commands share it, said the same way (they were said two ways each)
        ("--dtype", ("consolidate", "export"), "Weight dtype of the folder written (floating-point tensors only: "
         "bfloat16 halves a float32 checkpoint); auto keeps the checkpoint's."),
        ("--dtype", runs_a_model, "Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, "
         "T4), float32 elsewhere"),
        ("--sharing-layers", ("generate", "chat", "serve", "evaluate", "lm-eval", "export"),
         "(an export's folder: the N it was exported with)"),
        ("--overwrite", writes, "Replace --output if it is "),
        ("--attention-reuse", ("generate", "chat", "serve", "bench"),
         "Sharing layers reuse the source layer's attention probabilities (the same model, less work)."),
        ("--data", held_out, "(default: the held-out data fit validated the run on: its data.val_dir, or the val "
         "splits of its data folders, mixed as fit mixes them"),
        ("--batch-size", held_out, "Sequences per held-out batch"),
        ("--tokenizer", ("generate", "chat", "serve", "evaluate", "lm-eval", "export"),
         "(default: the one the checkpoint records)"),
        ("--top-p", ("generate", "chat"), "0 keeps the most likely alone (greedy decoding, as serve's top_p 0)"),
    ]  # fmt: skip
    wrong = [flag for flag, commands, text in said_where if command in commands and text not in helps.get(flag, "")]
    assert not wrong, (command, wrong)
    assert not [o for o in options if "_" in o], options  # dashes, never underscores
    assert "LIST_OF" not in out and "[ITEM,...]" not in out  # a list flag repeats; a file or - is read as one path
    fn, hints = tool(command), get_type_hints(tool(command))
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()}
    if "device" in hints:  # one meaning: resolve_device's
        assert (hints["device"], defaults["device"]) == (str, "auto"), command
    if "dtype" in hints:  # the same choices; auto: bfloat16 on CUDA (export: the checkpoint's, it runs nothing)
        assert (hints["dtype"], defaults["dtype"]) == (DType, "auto"), command


DEVICE_COMMANDS = {
    "generate": ["--prompt", "x"],
    "chat": [],
    "bench": [],
    "evaluate": [],
    "analyze": [],
    "serve": [],
    "lm-eval": ["--tasks", "no_such_task"],
}
"""Every command with --device, and the other flags it needs to get as far as checking it."""


@pytest.mark.parametrize(
    ("cuda", "device", "says"),
    [
        (2, "cuda:2", "no such GPU: this machine has 2 (cuda:0 to cuda:1) — --device cuda:2 — use cuda:0 to cuda:1"),
        (1, "cuda:1", "no such GPU: this machine has 1 (cuda:0) — --device cuda:1 — use cuda:0 (or auto)"),
        (0, "cuda", "CUDA is not available on this machine — --device cuda — use --device cpu (or auto)"),
        (0, "gpu0", "unknown device 'gpu0' — --device gpu0 — use cuda:0 for GPU 0 (or auto, cpu, cuda)"),
        (0, "cuda1", "unknown device 'cuda1' — --device cuda1 — use cuda:1 for GPU 1 (or auto, cpu, cuda)"),
        (0, "GPU:1", "unknown device 'GPU:1' — --device GPU:1 — use cuda:1 for GPU 1 (or auto, cpu, cuda)"),
        (0, "gpu", "unknown device 'gpu' — --device gpu — use cuda for the GPU (or auto, cpu, cuda:N)"),
        (0, "tpu", "unknown device 'tpu' — --device tpu — use auto, cpu, cuda or cuda:N"),
        (1, "0", "unknown device '0' — --device 0 — use cuda:0 for GPU 0 (or auto, cpu, cuda)"),  # HF's, vLLM's
        (0, "meta", "device 'meta' is not available to these commands on this machine — --device meta — use auto"),
    ],
)
def test_a_missing_device_is_one_line_before_anything_loads(cuda, device, says, tmp_path, capsys, monkeypatch):
    """The same line from every command, before the checkpoint is read (it does not even exist here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for command, extra in DEVICE_COMMANDS.items():
        argv = [command, "--checkpoint", str(tmp_path / "missing.ckpt"), "--device", device, *extra]
        assert main([*argv, "--output", str(tmp_path / command)] if command in ("bench", "analyze") else argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says}") and err.count("\n") == 1, (command, err)


def test_a_gpu_number_as_the_device_in_a_config_says_cuda_n(tmp_path, capsys):
    """``device: 0`` in a config (HF's and vLLM's spelling of GPU 0) said '--device takes text, not '0'', without the
    name it takes, nor the config that gives it; ``--device 0`` says ``cuda:0`` too."""
    (tmp_path / "gpu.yaml").write_text("device: 0\n")
    for command, extra in DEVICE_COMMANDS.items():
        argv = [command, "--config", str(tmp_path / "gpu.yaml"), "--checkpoint", str(tmp_path / "missing.ckpt"), *extra]
        assert main([*argv, "--output", str(tmp_path / command)] if command in ("bench", "analyze") else argv) == 2
        assert capsys.readouterr().err == (
            f"error: --device takes a device name, not the number 0 — --config {tmp_path / 'gpu.yaml'} — use cuda:0 "
            "for GPU 0 (or auto, cpu, cuda)\n"
        ), command


def test_load_model_from_python_checks_its_device_argument(tmp_path, monkeypatch):
    """``load_model(path, device="cuda")`` without CUDA was torch's 'Torch not compiled with CUDA enabled' traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^CUDA is not available on this machine — device cuda — use device cpu "):
        load_model(tmp_path / "missing.ckpt", device="cuda")  # checked before the path is read


@pytest.mark.parametrize(
    ("capability", "dtype"), [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16)]
)
def test_dtype_auto_is_float16_on_a_gpu_without_native_bfloat16(capability, dtype, monkeypatch):
    """A V100 (7.0) or T4 (7.5) got bfloat16, which it only emulates (torch.cuda.is_bf16_supported() says True)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda:0")) == dtype
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", torch.device("cuda:0")) == torch.float32


@pytest.mark.parametrize(("capability", "warned"), [((7, 0), True), ((7, 5), True), ((8, 0), False)])
def test_training_in_bf16_on_a_gpu_without_native_bfloat16_is_warned_about(capability, warned, monkeypatch):
    """The GPU configs train in bf16-mixed; on a V100 every bf16 operation is emulated, far slower, without a word."""
    from epas_lightning.module import warn_emulated_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for precision in ("bf16-mixed", "bf16-true"):
            warn_emulated_bf16(precision, torch.device("cuda:0"))
        warn_emulated_bf16("16-mixed", torch.device("cuda:0"))
        warn_emulated_bf16("bf16-mixed", torch.device("cpu"))
    said = [str(w.message) for w in caught if "no native bfloat16" in str(w.message)]
    assert len(said) == (2 if warned else 0) and all("Train in 16-mixed there" in line for line in said)


def test_fsdp2_with_a_precision_it_has_no_policy_for_is_one_line():
    """16-mixed under FSDP2 on a GPU reached parallelize's ValueError traceback while the model was built."""
    from epas_lightning.errors import ConfigError
    from epas_lightning.module import check_sharded_precision

    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        check_sharded_precision(precision)
    with pytest.raises(
        ConfigError, match=r"FSDP2 trains in 32-true, bf16-mixed, bf16-true — trainer.precision: 16-mix"
    ):
        check_sharded_precision("16-mixed")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "--reps", "0"], "must be at least 1, got 0 — --reps"),  # was a StatisticsError traceback
        (["bench", "--prompts", "0"], "must be at least 1, got 0 — --prompts"),  # an IndexError
        (["bench", "--max-new-tokens", "0"], "must be at least 1, got 0 — --max-new-tokens"),  # a ValueError
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "must be at least 1, got 0 — --max-new-tokens"),
        (["generate", "--prompt", "x", "--batch-size", "0"], "must be at least 1, got 0 — --batch-size"),
        (["chat", "--max-new-tokens", "0"], "must be at least 1, got 0 — --max-new-tokens"),
        (["evaluate", "--batches", "0"], "must be at least 1, got 0 — --batches"),  # a ValueError
        (["evaluate", "--batch-size", "0"], "must be at least 1, got 0 — --batch-size"),  # '... — data'
        (["analyze", "--batch-size", "-3"], "must be at least 1, got -3 — --batch-size"),
        (["lm-eval", "--tasks", "x", "--batch-size", "0"], "must be at least 1, got 0 — --batch-size"),
        (["serve", "--max-batch-size", "0"], "must be at least 1, got 0 — --max-batch-size"),
    ],
)
def test_a_count_below_one_is_the_same_line_in_every_command(argv, says, tmp_path, capsys):
    """Checked before the checkpoint is read (it does not exist here)."""
    extra = ["--output", str(tmp_path / "out")] if argv[0] in ("bench", "analyze") else []
    assert main([argv[0], "--checkpoint", str(tmp_path / "missing.ckpt"), "--device", "cpu", *argv[1:], *extra]) == 2
    assert capsys.readouterr().err == f"error: {says} — give 1 or more\n"  # what, where, what to do


@pytest.mark.parametrize("flag", ["--batches", "--prompts", "--reps"])
def test_a_count_too_large_for_an_index_is_one_line(flag, tmp_path, capsys):
    """10**20 ended in islice's ValueError or an OverflowError traceback, after the checkpoint was read."""
    argv = ["bench", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out"), flag]
    assert main([*argv, str(10**20)]) == 2
    says = f"error: must be at most {sys.maxsize}, got {10**20} — {flag} — give a smaller number\n"
    assert capsys.readouterr().err == says


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["inspect", "--checkpoint", "LONG"], "--checkpoint"),
        (["consolidate", "--checkpoint", "x.ckpt", "--output", "LONG"], "--output"),
        (["prepare", "--input", ".", "--output", "out", "--tokenizer", "LONG"], "--tokenizer"),
        (["evaluate", "--checkpoint", "x.ckpt", "--tasks", "LONG"], "--tasks"),
        (["generate", "--config", "LONG"], "--config"),
    ],
)
@pytest.mark.parametrize("long", ["name", "path"])
def test_a_path_too_long_to_name_a_file_is_one_line(argv, flag, long, tmp_path, capsys):
    """A file name over 255 bytes, or a path over the system's limit: Path.exists() raised "File name too long"."""
    path = str(tmp_path / ("a" * 300 if long == "name" else "/".join(["b" * 200] * 25)))
    assert main([path if arg == "LONG" else arg for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"error: the path is too long (file name too long) — {flag} {path} — give a shorter path\n"


@pytest.mark.parametrize("flag", ["--ckpt_path", "--data.data_dir"])
def test_a_path_too_long_in_fit_is_one_line(flag, tmp_path, capsys, monkeypatch):
    """Path.exists() of the checkpoint (resume.check_resume_word) or data folder raised "File name too long"."""
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / ("a" * 300))
    assert main(["fit", "--config", DEBUG, "--trainer.logger", "false", flag, path]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    where = "--ckpt_path" if flag == "--ckpt_path" else "data.data_dir"
    assert last == f"error: the path is too long (file name too long) — {where} {path} — give a shorter path"


def test_cuda_graph_on_without_a_cuda_device_is_one_line_before_anything_loads(tmp_path, capsys):
    """generate said '— generate — see --help' after loading the model; bench died with a ValueError traceback."""
    says = "error: CUDA graphs need a CUDA device — --cuda-graph on --device cpu — use --cuda-graph auto or off\n"
    for argv in (["generate", "--prompt", "x"], ["bench", "--output", str(tmp_path / "out")]):
        argv += ["--checkpoint", str(tmp_path / "missing.ckpt"), "--device", "cpu", "--cuda-graph", "on"]
        assert main(argv) == 2 and capsys.readouterr().err == says


def test_a_missing_tokenizer_names_the_flag_before_anything_loads(tmp_path, capsys):
    """It said 'tokenizer file does not exist — <path>' without the flag, after loading the model."""
    nowhere = tmp_path / "nowhere.json"
    says = f"error: tokenizer file does not exist — --tokenizer {nowhere} — check the path\n"
    commands = (["generate", "--prompt", "x"], ["chat"], ["serve"], ["evaluate"], ["lm-eval", "--tasks", "x"])
    for argv in (*commands, ["export"]):
        argv += ["--checkpoint", str(tmp_path / "missing.ckpt"), "--tokenizer", str(nowhere)]
        assert main([*argv, "--output", str(tmp_path / "out")] if argv[0] == "export" else argv) == 2
        assert capsys.readouterr().err == says


@pytest.mark.parametrize(
    ("content", "says", "fix"),
    [
        (b'{"a": 1}', "not a readable HF tokenizer.json", "pass a tokenizer.json (HF tokenizers) or tokenizer.model"),
        (b'{"model": {"type": "BPE", "vocab": {}, "merges": []}}', "the HF tokenizer.json holds no tokens", "pass a"),
        (b"\x00\x01 not a model", "neither a tokenizer.json nor a sentencepiece model", "pass a tokenizer.json"),
        (None, "tokenizer is not a regular file (a pipe or device)", "save it to a file and pass that file"),
        ("folder", "no tokenizer.json or tokenizer.model in the tokenizer folder", "pass a tokenizer.json or"),
    ],
)  # each said what without what to do (after loading the model; a folder without one still did); the pipe was said
# not to exist; an empty vocabulary was a ValueError traceback (max() of an empty sequence)
def test_a_tokenizer_that_is_no_tokenizer_file_says_what_to_pass_before_anything_loads(
    content, says, fix, tmp_path, capsys
):
    tokenizer = tmp_path / "tok"
    if content == "folder":
        tokenizer.mkdir()
    else:
        os.mkfifo(tokenizer) if content is None else tokenizer.write_bytes(content)
    argv = ["generate", "--prompt", "x", "--checkpoint", str(tmp_path / "missing.ckpt"), "--tokenizer", str(tokenizer)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and f" — --tokenizer {tokenizer} — {fix}" in err and err.count("\n") == 1, (
        err
    )


def test_data_that_is_missing_or_incomplete_names_the_data_flag(tmp_path, capsys):
    """bench and evaluate said 'data.data_dir' (fit's key) and to leave it unset for the built-in corpus."""
    (tmp_path / "empty").mkdir()
    for command in ("bench", "evaluate", "analyze"):
        argv = [command, "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out")]
        argv = argv[:3] if command == "evaluate" else argv
        fix = "create it with `python -m epas_lightning prepare --input ... --output ...`\n"
        assert main([*argv, "--data", str(tmp_path / "nowhere")]) == 2
        assert capsys.readouterr().err == f"error: data directory does not exist — --data {tmp_path}/nowhere — {fix}"
        assert main([*argv, "--data", str(tmp_path / "empty")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: incomplete data directory: missing train/index.json") and err.endswith(fix)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate", "--sharing-layers", "all"], "--sharing-layers takes a whole number, not 'all'"),
        (["evaluate", "--sharing-layers", "lots"], "--sharing-layers takes a whole number or one of all, not 'lots'"),
        (["generate", "--dtype", "fp16"], "--dtype takes one of auto, float32, bfloat16, float16, not 'fp16'"),
        (["bench", "--budget", "x"], "--budget takes a number, not 'x'"),
        # an abbreviation was taken for the flag it begins
        (["generate", "--max-new", "5"], "generate has no option max-new (did you mean max-new-tokens?)"),
        (["generate", "--prompt", "ab\udcff"], "--prompt is not UTF-8 text (byte 0xff at character 2)"),  # "invalid
        (["chat", "--system", "\udce9t\udce9"], "--system is not UTF-8 text (byte 0xe9 at character 0)"),  # value"
    ],
)
def test_a_value_of_the_wrong_kind_says_what_the_flag_takes(argv, says, capsys):
    assert main([argv[0], "--checkpoint", "x.ckpt", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says} — python -m epas_lightning {argv[0]}") and err.count("\n") == 1, err


def test_a_misspelt_key_in_a_commands_config_names_the_one_meant_and_the_file(tmp_path, capsys):
    """A tool's config with a misspelt key said "Option 'max_new_tokns' is not accepted", with neither the key it
    meant nor the file (of several) it is in."""
    first, typo = tmp_path / "first.yaml", tmp_path / "typo.yaml"
    first.write_text("max_new_tokens: 3\n")
    typo.write_text("max_new_tokns: 3\n")
    assert main(["generate", "--config", str(first), "--config", str(typo), "--checkpoint", "x.ckpt"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: generate has no option max_new_tokns (did you mean max_new_tokens?) — --config {typo} — see "
        "`python -m epas_lightning generate --help`\n"
    )


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["inspect", "--ckpt", "x.ckpt"], "checkpoint"),  # the names of other tools (LitGPT, scripts) for our flags
        (["generate", "--checkpoint", "c", "--prompt", "x", "--ckpt_path", "x.ckpt"], "checkpoint"),
        (["consolidate", "--checkpoint", "c", "--out", "o"], "output"),
        (["export", "--checkpoint", "c", "--out-dir", "o"], "output"),
        (["bench", "--checkpoint", "c", "--output_dir", "o"], "output"),
        (["generate", "--checkpoint", "c", "--prompt", "x", "--precision", "bf16-true"], "dtype"),
        (["evaluate", "--checkpoint", "c", "--layers", "2"], "sharing-layers"),
        (["inspect", "--checkpoint", "c", "--out", "o"], None),  # a flag the command does not have is never meant
        (["analyze", "--checkpoint", "c", "--layers", "2"], None),
    ],
)
def test_another_tools_name_of_a_flag_names_ours(argv, meant, tmp_path, capsys):
    """--ckpt, --out or --precision said only "has no option ckpt" (--out: "did you mean output?" by its spelling)."""
    assert main(argv) == 2
    key = next(arg[2:] for arg in argv if arg.startswith("--") and arg[2:] in OTHER_FLAG_NAMES)
    hint = f" (did you mean {meant}?)" if meant else ""
    assert capsys.readouterr().err.startswith(f"error: {argv[0]} has no option {key}{hint} — ")
    config = tmp_path / "config.yaml"  # a --config's key, by its underscored name
    config.write_text(f"{key}: 2\n")
    assert main([argv[0], "--config", str(config)]) == 2
    hint = f" (did you mean {meant.replace('-', '_')}?)" if meant else ""
    assert capsys.readouterr().err.startswith(f"error: {argv[0]} has no option {key}{hint} — --config {config} — ")


@pytest.mark.parametrize(
    ("flag", "meant"),
    [
        ("--sharing-layers", "sharing.target"),  # was "did you mean sharing.n_layer?", a field fit links, not set
        ("--sharing_layers", "sharing.target"),
        ("--dtype", "trainer.precision"),
        ("--precision", "trainer.precision"),
        ("--device", "trainer.accelerator"),
        ("--devices", "trainer.devices"),
        ("--max_steps", "trainer.max_steps"),
    ],
)
def test_the_tools_or_litgpts_name_of_a_fit_setting_names_fits(flag, meant, capsys):
    assert main(["fit", "--config", DEBUG, flag, "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: fit has no option {flag[2:]} (did you mean {meant}?) — ")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["consolidate"],
            "the following arguments are required: checkpoint, output — {} — add --checkpoint and --output",
        ),
        (["generate", "--checkpoint"], "argument --checkpoint: expected one argument — {} — give --checkpoint a value"),
        (["fit", "--config"], "argument -c/--config: expected one argument — {} — give --config a value"),
        (
            ["generate", "--checkpoint", "c", "--prompt", "-x"],
            "argument --prompt/--prompt+: expected one argument — {} — give --prompt a value; write --prompt=-x for "
            'one that starts with "-"',
        ),
        (  # the value it refused, not an earlier one it took (-5, "-c x"): that one was "write --prompt=-5"
            ["generate", "--checkpoint", "c", "--prompt", "-5", "--prompt", "-c x", "--prompt", "-x"],
            "argument --prompt/--prompt+: expected one argument — {} — give --prompt a value; write --prompt=-x for "
            'one that starts with "-"',
        ),
        (
            ["generate", "--checkpoint", "c", "--prompt", "--ignore-eos"],
            "argument --prompt/--prompt+: expected one argument — {} — give --prompt a value",
        ),
        (
            ["fit", "--trainer.default_root_dir", "-runs"],
            "argument --trainer.default_root_dir: expected one argument — {} — give --trainer.default_root_dir a "
            'value; write --trainer.default_root_dir=-runs for one that starts with "-"',
        ),
    ],
)
def test_a_missing_flag_or_value_says_which_to_give(argv, says, capsys):
    """They said only "see `... --help`": the flags to add, or the one to give a value, are known; a value that starts
    with "-" (a prompt "-x"), which argparse reads as a flag, is said to need the `--flag=value` form."""
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {says.format('python -m epas_lightning ' + argv[0])}\n"


def test_a_missing_config_file_is_named_by_every_tool_as_fit_names_it(tmp_path, capsys):
    """A tool's --config that does not exist said only "invalid value for --config" (fit says which file)."""
    missing = tmp_path / "missing.yaml"
    assert main(["generate", "--config", str(missing)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: config file does not exist — --config {missing} — give the path of a YAML file\n"
    )


def test_a_list_flag_given_one_value_in_a_config_file_reads_it_as_a_list_of_one(tmp_path, capsys):
    """`input: corpus/` in prepare's YAML was refused ("--input takes a list"), while `--input corpus/` works: it is
    now the list of that one folder, and prepare goes on to its next check (here: no tokenizer given)."""
    config = tmp_path / "prepare.yaml"
    config.write_text(f"input: {tmp_path}\noutput: {tmp_path / 'out'}\n")
    assert main(["prepare", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pass either a tokenizer file or --train-tokenizer with --vocab-size — "), err
    assert "takes a list" not in err


def test_a_config_file_that_is_not_yaml_is_named_with_the_line(tmp_path, capsys):
    """A YAML syntax error said "Problems parsing config: while parsing a flow sequence", naming no file or line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1, 2\n")
    for argv in (["fit", "--config", DEBUG, f"--config={bad}"], ["generate", "--config", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        says = "error: the config is not valid YAML: did not find expected ',' or ']' at line 3, column 1 (while "
        assert err.startswith(says) and err.endswith(f"line 2, column 14) — --config {bad} — fix its syntax\n"), err
    assert main(["fit", "--config", DEBUG, "--model.config", "{n_layer: [1,"]) == 2  # a value, not a file
    err = capsys.readouterr().err
    assert err.startswith("error: a value is not valid YAML: ") and err.endswith("given on the command line\n"), err


def test_a_config_that_is_a_folder_or_not_utf8_is_one_line(tmp_path, capsys):
    """A config of another encoding was jsonargparse's UnicodeDecodeError traceback (fit and every tool); a folder,
    "invalid value for --config"."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"system: \xe9t\xe9\n")
    for argv, config, says in [
        (["fit", "--config", DEBUG], latin, "the config is not UTF-8 text (byte 0xe9 at offset 8)"),
        (["chat"], latin, "the config is not UTF-8 text (byte 0xe9 at offset 8)"),
        (["generate"], tmp_path, "the config is a folder"),
    ]:
        assert main([*argv, f"--config={config}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says} — --config {config} — ") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_checkpoint_given_to_fits_checkpoint_section_says_to_give_it_as_ckpt_path(command, tmp_path, capsys):
    """The tools' --checkpoint is a checkpoint; fit's is its save settings: a .ckpt there was jsonargparse's
    UnicodeDecodeError traceback (reading it as YAML), and a checkpoint folder "invalid value for --checkpoint"."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    resume = " to resume the run, or --model.init_from to start from its weights" if command == "fit" else ""
    for given in (ckpt, folder):
        assert main([command, "--config", DEBUG, "--checkpoint", str(given)]) == 2
        assert capsys.readouterr().err == (
            f"error: {command}'s --checkpoint takes the checkpoint section's settings (a YAML file or mapping), not a "
            f"checkpoint — --checkpoint {given} — give it as --ckpt_path {given}{resume}\n"
        )
    settings = tmp_path / "checkpoint.json"  # settings in JSON, which is YAML, are the section's
    settings.write_text('{"every_n_train_steps": 2}')
    assert main([command, "--config", DEBUG, "--checkpoint", str(settings), "--print_config"]) == 0
    assert "every_n_train_steps: 2" in capsys.readouterr().out
    latin = tmp_path / "latin.yaml"  # any section's settings file: as a --config of another encoding
    latin.write_bytes(b"max_steps: \xe9\n")
    assert main([command, "--config", DEBUG, f"--trainer={latin}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the settings file is not UTF-8 text (byte 0xe9 at offset 11) — --trainer {latin} — ")


def test_a_data_folder_given_to_fits_data_section_says_to_give_it_as_data_dir(tmp_path, capsys):
    """evaluate, bench and analyze take --data FOLDER; fit's --data is its section: "invalid value for --data"."""
    assert main(["fit", "--config", DEBUG, "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: fit's --data takes the data section's settings (a YAML file or mapping), not a data folder — --data "
        f"{tmp_path} — give it as --data.data_dir {tmp_path}\n"
    )


@pytest.mark.parametrize(("command", "setting"), [("generate", "temperature: .nan"), ("serve", "max_request_mb: .inf")])
def test_a_config_value_that_is_not_a_finite_number_is_refused_as_on_the_command_line(
    command, setting, tmp_path, capsys
):
    """YAML's .nan and .inf passed as numbers where the command line's nan and inf are refused: generate's
    temperature ended in torch's multinomial RuntimeError, serve's max_request_mb in an OverflowError."""
    config = tmp_path / "config.yaml"
    config.write_text(setting + "\n")
    assert main([command, "--checkpoint", "x.ckpt", "--config", str(config)]) == 2
    flag, value = setting.split(": .")
    says = f"error: --{flag.replace('_', '-')} takes a number, not '{value}' — python -m epas_lightning {command} — "
    assert capsys.readouterr().err.startswith(says)


@pytest.mark.parametrize(
    ("flag", "value", "takes"),
    [
        ("--trainer.max_steps", "abc", "a whole number"),
        ("--trainer.precision", "17", "one of 64, 32, 16, transformer-engine, transformer-engine-float16, 16-true, "
         "16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16"),
        ("--sharing.order", "middle", "one of deep_first, shallow_first"),
        ("--sharing.target", "abc", "a whole number or a number"),  # a list too, said by the help
        ("--model.activation_checkpointing", "sometimes", "auto or true or false or a whole number"),
    ],
)  # fmt: skip
def test_a_lightning_cli_value_error_says_what_the_flag_takes(capsys, flag, value, takes):
    """Was "invalid value for --flag (Expected a typing.Literal[...]. Got value: ...)", or for a union of choices
    "(Given value: 17)" alone, without what it takes."""
    assert main(["fit", "--config", DEBUG, flag, value, "--print_config"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} takes {takes}, not '{value}' — ")


def test_a_lightning_cli_value_error_names_the_flag_as_typed(capsys):
    assert main(["fit", "--config", DEBUG, "--checkpoint.train_time_interval", "30 minutes"]) == 2
    says = """--checkpoint.train_time_interval takes a duration "H:MM:SS" (e.g. "0:30:00"), not '30 minutes'"""
    assert capsys.readouterr().err.startswith(f"error: {says} — ")
    # a value linked from model.config: "data.vocab_size: int | None is not callable" said nothing of the link
    for flag in ("--data.vocab_size", "--data.seq_len"):
        assert main(["fit", "--config", DEBUG, flag, "64"]) == 2
        says = f"error: {flag} is taken from model.config (a linked value) — python -m epas_lightning fit — set it "
        assert capsys.readouterr().err.startswith(f"{says}through model.config")


def test_ctrl_c_in_a_command_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("epas_lightning.cli.dispatch", interrupted)
    assert main(["prepare", "--input", "x"]) == 130
    assert capsys.readouterr().err == "interrupted: prepare stopped (Ctrl+C)\n"


HEAVY = ("torch", "lightning", "litdata", "transformers", "torch.distributed.tensor", "torch.distributed.checkpoint")
IMPORTED_BY_HELP = """
import json, sys
from epas_lightning.cli import TOOLS, main
def heavy():
    return [name for name in {heavy} if name in sys.modules]
import epas_lightning, epas_lightning.data, epas_lightning.hf
seen = {{"import": heavy()}}
for argv in (["--help"], ["prepare", "--help"], *([name, "--help"] for name in TOOLS if name != "prepare")):
    assert main(argv) == 0, argv
    seen[argv[0]] = heavy()
from epas_lightning.data import heldout_loader
next(iter(heldout_loader({corpus!r}, 16, 2)))
seen["heldout_loader"] = heavy()
print(json.dumps(seen))
"""


def test_import_and_help_load_only_what_they_need(tmp_path, tiny_corpus):
    """`import epas_lightning`, the top-level --help and prepare's load neither torch nor Lightning; the other
    commands' --help need torch (their modules are torch code) but not Lightning, litdata, transformers nor the
    DTensor and distributed-checkpoint modules (sharded checkpoints only); nor does reading held-out data (evaluate,
    bench, analyze) load Lightning."""
    script = IMPORTED_BY_HELP.format(heavy=HEAVY, corpus=str(tiny_corpus))
    done = run_cli(["-c", script], tmp_path, tmp_path, [sys.executable])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen.pop("import") == seen.pop("--help") == seen.pop("prepare") == []
    assert seen.pop("heldout_loader") == ["torch", "litdata"]
    assert all(modules == ["torch"] for modules in seen.values()), seen


def test_every_public_name_is_its_defining_modules_object():
    import epas_lightning

    assert set(epas_lightning.__all__) <= set(dir(epas_lightning))
    for name in epas_lightning.__all__:
        value = getattr(epas_lightning, name)
        assert getattr(sys.modules[value.__module__], name) is value, name
    assert epas_lightning.checkpoint.load_model is epas_lightning.load_model  # submodules stay attributes
    assert epas_lightning.hf.export.export is epas_lightning.export
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        epas_lightning.nothing  # noqa: B018


def test_the_top_level_help_reads_each_tools_docstring_from_its_source():
    for name in TOOLS:
        assert tool_docstring(name) == inspect.getdoc(tool(name)), name


def test_progress_lines_in_a_log_say_batches(capsys):
    from epas_lightning.progress import progress

    assert list(progress(range(2), "evaluate", 2, "batch")) == [0, 1]
    assert capsys.readouterr().err.startswith("evaluate: 2/2 batches in ")


def test_epas_console_script_exits_zero(tmp_path):
    script = Path(sys.executable).with_name("epas")
    assert script.is_file(), "the package's console script is installed with it"
    assert run_cli(["--version"], tmp_path, tmp_path, [str(script)]).returncode == 0
    bad = run_cli(
        ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"], tmp_path, tmp_path, [str(script)]
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint does not exist")


def test_the_process_freezes_its_objects_before_shutdown(tmp_path):
    """Shutdown's garbage collections would walk every object torch and Lightning made, for nothing."""
    report = "import atexit, gc; atexit.register(lambda: print('frozen:', gc.get_freeze_count() > 0))"
    done = run_cli(["-c", f"{report}; import runpy; runpy.run_module('epas_lightning', run_name='__main__')",
                    "--version"], tmp_path, tmp_path, [sys.executable])  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "frozen: True", done
    assert (
        '\nepas = "epas_lightning.console:entry_point"\n' in (REPO / "pyproject.toml").read_text()
    )  # the `epas` script


CTRL_C_AT_THE_CLI_IMPORT = (
    "import signal, sys\n"
    "class CtrlC:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'epas_lightning.errors':\n"
    "            signal.raise_signal(signal.SIGINT)\n"
    "sys.meta_path.insert(0, CtrlC())\n"
)
"""Python code that raises Ctrl+C as the CLI's first module of its own (``errors``) is looked up."""


@pytest.mark.parametrize(
    ("args", "command"),
    [(["fit", "--help"], "fit"), (["--debug", "fit", "--help"], "fit"), (["--help"], "python -m epas_lightning")],
)
def test_ctrl_c_while_the_cli_imports_ends_in_one_line(tmp_path, args, command):
    """Ctrl+C in the first moments of ``python -m epas_lightning`` (the CLI module's own imports, before ``main``
    answers it) printed a Python traceback and ended by the signal; every command ends a Ctrl+C in one line with
    status 130, naming the command as ``main`` does (``--debug`` is no command, nor is ``--help``)."""
    hook = (
        CTRL_C_AT_THE_CLI_IMPORT
        + "import runpy; runpy.run_module('epas_lightning', run_name='__main__', alter_sys=True)"
    )
    done = run_cli(["-c", hook, *args], tmp_path, tmp_path, [sys.executable])
    assert (done.returncode, done.stdout) == (130, "")
    assert done.stderr.endswith(f"interrupted: {command} stopped (Ctrl+C)\n")
    assert "Traceback" in done.stderr if "--debug" in args else done.stderr.count("\n") == 1


def test_ctrl_c_while_the_epas_script_imports_ends_in_one_line(tmp_path):
    """The ``epas`` console script, as pip writes it from pyproject's entry point (``from module import function``,
    then ``sys.exit(function())``), printed a traceback for a Ctrl+C during the CLI's imports, as ``python -m`` did."""
    entry = re.search(r'^epas = "(.+):(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert entry is not None, "pyproject.toml names the epas script's entry point"
    script = f"from {entry[1]} import {entry[2]}\nsys.argv[0] = 'epas'\nsys.exit({entry[2]}())"
    done = run_cli(["-c", CTRL_C_AT_THE_CLI_IMPORT + script, "fit", "--help"], tmp_path, tmp_path, [sys.executable])
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted: fit stopped (Ctrl+C)\n")


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """``python -m epas_lightning --help | head -3``: a reader that exits before the output ends closed the pipe, and
    the next write raised BrokenPipeError, printed as a traceback after the lines the reader wanted."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "epas_lightning", "--help"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    child.stdout.close()  # before the child writes: its first write finds no reader
    stderr = child.communicate(timeout=60)[1]
    assert child.returncode == 128 + signal.SIGPIPE and stderr == ""


# ---------------------------------------------------------------------------------------------------------------------
# The trained region is a record
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shallow(tiny_corpus, tmp_path_factory):
    """A 4-layer model trained with shallow-first growth to layers [1, 2]; its last.ckpt."""
    sharing = ProgressiveSharing(target=2, interval=2, order="shallow_first")
    return train_tiny_checkpoint(tiny_corpus, tmp_path_factory.mktemp("shallow"), sharing, seed=5)


def test_checkpoints_record_the_region_in_growth_order(shallow, tmp_path, capsys):
    assert torch.load(shallow, weights_only=True)[REGION_KEY] == {"layers": [1, 2], "order": "shallow_first"}
    loaded = load_model(shallow)
    assert loaded.region.layers == (1, 2) and loaded.region.order == "shallow_first"
    assert loaded.region.first(1) == [1]  # not the deepest layer
    with pytest.raises(ConfigError) as beyond:
        loaded.region.first(4)
    assert beyond.value.what == (
        "4 sharing layers were asked for; a 4-layer model can share at most 3 "
        "(it trained 2: layers [1, 2], shallow-first)"
    )
    assert main(["consolidate", "--checkpoint", str(shallow), "--output", str(tmp_path / "c"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["trained_region"] == {"layers": [1, 2], "order": "shallow_first"} and summary["global_step"] == 6
    assert (summary["training"]["global_step"], summary["training"]["source"]) == (6, str(shallow))
    assert load_model(summary["output"]).region == loaded.region


def test_checkpoints_from_before_the_record_keep_working(shallow, tmp_path):
    old = torch.load(shallow, weights_only=True)
    del old[REGION_KEY]  # written before this change: the schedule's state still says shallow-first
    torch.save(old, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt").region.first(1) == [1]
    for state in old["callbacks"].values():
        state.pop("order", None)  # older still: deep-first was the only order
    old["state_dict"]["model.sharing.mask"] = torch.tensor([False, False, True, True])
    torch.save(old, tmp_path / "older.ckpt")
    assert load_model(tmp_path / "older.ckpt").region.first(1) == [3]


@pytest.mark.parametrize("kind", ["ModelCheckpoint", "RunCheckpoint"])
def test_weights_only_checkpoints_record_the_region(tiny_corpus, tmp_path, kind):
    """Lightning calls no callback's ``on_save_checkpoint`` in a weights-only save: the order was guessed from the
    mask (deep-first, as it holds the last layer), and N = 1 of a shallow-first [1, 2, 3] was layer 3. The run's
    checkpoint (fit's ``checkpoint`` section) wrote its last.ckpt at the end with the optimizer state all the same."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig, TokenDataModule
    from epas_lightning.run_checkpoint import RunCheckpoint

    config = LlamaConfig.from_name("debug", n_layer=4, block_size=16)
    data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=16, batch_size=1, vocab_size=config.vocab_size)
    sharing = ProgressiveSharing(target=3, growth=3, interval=1, start_step=0, order="shallow_first")
    checkpoint = {"ModelCheckpoint": ModelCheckpoint, "RunCheckpoint": RunCheckpoint}[kind]
    saved = checkpoint(dirpath=tmp_path, save_last=True, save_weights_only=True, every_n_train_steps=2)
    cpu_trainer(tmp_path, 3, [sharing, saved]).fit(EPASModule(config), datamodule=data)  # ends between two saves
    region = load_model(tmp_path / "last.ckpt").region
    assert (region.layers, region.order, region.first(1)) == ((1, 2, 3), "shallow_first", [1])
    assert "optimizer_states" not in torch.load(tmp_path / "last.ckpt", weights_only=True)


def test_every_consumer_reads_n_sharing_layers_in_growth_order(shallow, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(shallow), "--prompt", "def", "--sharing-layers", "1",
                 "--max-new-tokens", "2", "--json"]) == 0  # fmt: skip
    generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (generated["sharing_layers"], generated["shared_layers"]) == (1, [1])  # N named as the flag names it
    assert main(["bench", "--checkpoint", str(shallow), "--output", str(tmp_path / "b"), "--reps", "1",
                 "--prompt-len", "4", "--max-new-tokens", "2", "--batches", "1"]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "b" / "many_in_one.json").read_text())["rows"]
    assert [(r["sharing_layers"], r["shared_layers"]) for r in rows] == [(0, []), (1, [1]), (2, [1, 2])]
    assert main(["evaluate", "--checkpoint", str(shallow), "--sharing-layers", "all", "--batches", "1", "--json"]) == 0
    assert [r["shared_layers"] for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])] == [
        [],
        [1],
        [1, 2],
    ]
    export = ["export", "--checkpoint", str(shallow), "--output", str(tmp_path / "hf"), "--sharing-layers", "1"]
    assert main([*export, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["model_type"], summary["shared_layers"], summary["tokenizer"]) == ("epas_llama", [1], True)
    assert (summary["training"]["global_step"], summary["training"]["source"]) == (6, str(shallow))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["epas_shared_layers"] == [1] and config["epas_trained_region"] == [1, 2]
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    assert EPASLM(str(shallow), sharing_layers=1).model.llama.sharing.shared_layers == [1]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(shallow), "--prompt", "x", "--sharing-layers", "3"]) == 2
    assert "trained with at most 2 sharing layers (layers [1, 2], shallow-first)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# A run that says what happened, resumes with `last`, and merges callbacks
# ---------------------------------------------------------------------------------------------------------------------


def test_the_summary_points_only_at_logs_that_exist(tmp_path):
    """`trainer.logger: false` writes no logs, yet Lightning's log_dir is then the working directory: the summary
    must not send the user to `tensorboard --logdir` there; a CSV logger gets its folder, no TensorBoard hint."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from epas_lightning.run_summary import RunSummary

    module = SimpleNamespace(
        model=SimpleNamespace(sharing=SimpleNamespace(shared_layers=[])), config=SimpleNamespace(n_layer=2)
    )

    def summary(loggers: list) -> str:
        trainer = SimpleNamespace(
            global_step=3, checkpoint_callbacks=[], callback_metrics={}, callbacks=[], loggers=loggers
        )
        return RunSummary().summary(trainer, module, loggers[0].log_dir if loggers else str(tmp_path))

    assert "  logs " not in summary([]) and "tensorboard" not in summary([])
    csv, tb = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    assert f"logs         {csv.log_dir}\n" in summary([csv]) and "tensorboard" not in summary([csv])
    assert f"(tensorboard --logdir {tb.log_dir})" in summary([csv, tb])


def test_the_summary_counts_one_skipped_step_in_the_singular(tmp_path):
    """fp16's line said "the loss scaler skipped 1 steps"."""
    from types import SimpleNamespace

    from epas_lightning.run_summary import RunSummary

    model = SimpleNamespace(sharing=SimpleNamespace(shared_layers=[]))
    module = SimpleNamespace(model=model, config=SimpleNamespace(n_layer=2))
    trainer = SimpleNamespace(global_step=3, checkpoint_callbacks=[], callback_metrics={}, callbacks=[], loggers=[])
    summary = RunSummary()
    summary._skipped = 1  # what one overflowing step of fp16 counts
    assert "the loss scaler skipped 1 step (overflowing gradients" in summary.summary(trainer, module, str(tmp_path))


def test_the_summary_says_how_to_resume_where_the_run_was_started(tmp_path, monkeypatch):
    """`--ckpt_path last` only after the command line's fit; a requeued SLURM job resumes with --ckpt_path auto on its
    command line; a script of your own (no command line) passes the checkpoint's path to `trainer.fit`."""
    import signal
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping, Timer
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    from epas_lightning import GracefulStop, run_summary
    from epas_lightning.run_summary import RunSummary

    last = tmp_path / "last.ckpt"
    last.touch()
    module = SimpleNamespace(
        model=SimpleNamespace(sharing=SimpleNamespace(shared_layers=[])), config=SimpleNamespace(n_layer=2)
    )

    def resume_line(
        summary: RunSummary, callbacks: list, max_steps: int = 10, max_epochs: int = -1, line=-1, saved=last
    ) -> str:
        trainer = SimpleNamespace(global_step=3, checkpoint_callbacks=[SimpleNamespace(last_model_path=str(saved))],
                                  callback_metrics={}, callbacks=callbacks, loggers=[], max_steps=max_steps,
                                  max_epochs=max_epochs, current_epoch=1)  # fmt: skip
        return summary.summary(trainer, module, None).splitlines()[line]

    assert resume_line(RunSummary(command_line=True), []) == "  resume: the same command with --ckpt_path last"
    assert resume_line(RunSummary(), []) == f"  resume: trainer.fit(..., ckpt_path={str(last)!r})"
    # a run that reached its max_steps (or max_epochs) trains nothing more when resumed as it is
    finished = "  resume: to train further, raise --trainer.max_steps and resume with --ckpt_path last"
    assert resume_line(RunSummary(command_line=True), [], max_steps=3) == finished
    assert resume_line(RunSummary(command_line=True), [], -1, 1) == finished.replace("max_steps", "max_epochs")
    assert resume_line(RunSummary(), [], max_steps=3).startswith("  resume: to train further, raise the Trainer's max_")
    # checkpoint.save_last: false writes no last.ckpt: `--ckpt_path last` resumed another run's, or found none
    step = tmp_path / "epoch=0-step=3.ckpt"
    step.touch()
    assert (
        resume_line(RunSummary(command_line=True), [], saved=step)
        == f"  resume: the same command with --ckpt_path {step}"
    )
    assert resume_line(RunSummary(command_line=True), [], max_steps=3, saved=step).endswith(f"with --ckpt_path {step}")
    requeued = GracefulStop()
    requeued.requeue_signal = requeued.stopped_by = signal.SIGUSR1
    line = "  resume: the requeued job resumes from it when its command has --ckpt_path auto"
    assert resume_line(RunSummary(command_line=True), [requeued]) == line
    stopped = GracefulStop()
    stopped.requeue_signal, stopped.stopped_by = signal.SIGUSR1, signal.SIGTERM  # not requeued: resumed by hand
    assert resume_line(RunSummary(command_line=True), [stopped]).endswith("--ckpt_path last")
    # a signal ended it before max_steps: the summary began "Run finished: 3 optimizer steps" and said nothing of it
    assert resume_line(RunSummary(command_line=True), [stopped], line=1) == (
        "  stopped      by SIGTERM after step 3 of max_steps 10"
    )
    stopped.stopped_by = signal.SIGINT
    assert resume_line(RunSummary(command_line=True), [stopped], line=1, max_steps=-1) == (
        "  stopped      by SIGINT (Ctrl+C) after step 3"
    )
    assert resume_line(RunSummary(command_line=True), [requeued], line=1) == (
        "  stopped      by SIGUSR1 after step 3 of max_steps 10 (the job is requeued)"
    )
    # max_time ended it before max_steps: the summary began "Run finished: 3 optimizer steps" and said nothing of it
    timed = Timer(duration="00:01:00:00")
    timed._offset = 3600.0  # the training time so far: the hour is up
    assert resume_line(RunSummary(command_line=True), [timed], line=1) == (
        "  stopped      by max_time 00:01:00:00 (the training time of all sessions together) after step 3 of "
        "max_steps 10"
    )
    assert resume_line(RunSummary(command_line=True), [timed]).startswith(
        "  resume: to train further, raise --trainer.max_time"
    )
    # an EarlyStopping of the user's ended it before its limit: the summary said nothing, and "the same command"
    early = EarlyStopping(monitor="val/loss")
    assert resume_line(RunSummary(command_line=True), [early]) == "  resume: the same command with --ckpt_path last"
    early.stopping_reason, early.stopping_reason_message = (
        EarlyStoppingReason.PATIENCE_EXHAUSTED,
        "No gain. Signaling Trainer to stop.",
    )
    assert resume_line(RunSummary(command_line=True), [early], line=1) == "  stopped      by EarlyStopping: No gain."
    assert resume_line(RunSummary(command_line=True), [early]) == (
        "  resume: EarlyStopping ended it; --ckpt_path last trains on until val/loss stops improving again"
    )
    assert resume_line(RunSummary(command_line=True), [early], max_steps=3) == finished  # resumed, then its limit
    looked = []  # the stopper is found once a summary (its stop line and its resume advice)
    monkeypatch.setattr(run_summary, "_early_stop", lambda trainer: looked.append(trainer) or early)
    assert resume_line(RunSummary(command_line=True), [early]).startswith("  resume: EarlyStopping ended it;")
    assert len(looked) == 1


def test_the_summary_throughput_is_the_optimizer_steps_wall_clock_rate(tmp_path):
    """The median was over micro-batches, each timed from its start to its end: under gradient accumulation it
    picked the batches with no optimizer step (nor DDP's all-reduce), and it never counted the time spent loading
    data; a 2-process DDP run with accumulation 4 said 26,289 tokens/s where TensorBoard measured 17,549."""
    import time

    from helpers import cpu_trainer
    from lightning.pytorch.callbacks import Callback

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import RunSummary

    class SlowLoading(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> torch.Tensor:
            time.sleep(0.01)  # 0.02 s a micro-batch of 2
            return torch.full((17,), i)

    class SlowOptimizerStep(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            time.sleep(0.05)

    summary = RunSummary()
    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    loader = torch.utils.data.DataLoader(SlowLoading(), batch_size=2)
    trainer = cpu_trainer(
        tmp_path, 5, [summary, SlowOptimizerStep()], accumulate_grad_batches=2, enable_checkpointing=False
    )
    trainer.fit(module, loader)
    lines = summary.summary(trainer, module, None).splitlines()
    line = next(line for line in lines if line.startswith("  throughput"))
    rate = float(re.search(r"([\d,]+) tokens/s", line)[1].replace(",", ""))
    step_tokens, least_step_seconds = 2 * 2 * 16, 0.05 + 2 * 0.02
    assert rate <= step_tokens / least_step_seconds and "median over 3 optimizer steps" in line, line


def test_the_summary_names_the_step_of_the_validation_its_loss_is_from(tmp_path):
    """A run whose length is no multiple of its validation interval ends steps after its last validation: the summary
    said "at the last validation", read as the loss the run ended with."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import RunSummary, _with_perplexity

    module, summary = EPASModule(LlamaConfig.from_name("debug", block_size=16)), RunSummary()
    loader = torch.utils.data.DataLoader(torch.randint(0, 512, (16, 17)), batch_size=2)
    options = {"limit_val_batches": 1, "val_check_interval": 2, "num_sanity_val_steps": 0}
    trainer = cpu_trainer(tmp_path, 5, [summary], enable_checkpointing=False, **options)
    trainer.fit(module, loader, loader)
    line = next(line for line in summary.summary(trainer, module, None).splitlines() if "val loss" in line)
    loss = _with_perplexity(float(trainer.callback_metrics["val/loss"]))
    assert line == f"  val loss     {loss} at the last validation (step 4)"


def test_the_summary_throughput_of_a_step_a_validation_interrupts_counts_the_whole_step(tmp_path, monkeypatch):
    """A fake clock: 1 s a micro-batch, 3 s an update, 10 s a validation after every 2 micro-batches of 4-batch steps.
    The step a validation interrupted was timed from its end only: its last 2 micro-batches and the update (32 tokens
    in 5 s), said as 6 tokens/s where every step trains 64 tokens in 7 s."""
    from helpers import FakeClock, cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import RunSummary

    summary, module = RunSummary(), EPASModule(LlamaConfig.from_name("debug", block_size=16))
    loader = torch.utils.data.DataLoader(torch.randint(0, 512, (40, 17)), batch_size=1)
    options = {"accumulate_grad_batches": 4, "val_check_interval": 2, "limit_val_batches": 1}
    trainer = cpu_trainer(
        tmp_path, 5, [summary, FakeClock(monkeypatch)], enable_checkpointing=False, num_sanity_val_steps=0, **options
    )
    trainer.fit(module, loader, loader)
    line = next(line for line in summary.summary(trainer, module, None).splitlines() if "throughput" in line)
    assert line == "  throughput   9 tokens/s (median over 3 optimizer steps)", line  # 64 / 7


def test_the_summary_of_a_resume_with_nothing_left_to_train_says_so(tmp_path):
    """A resume at or past max_steps trains nothing: the summary said "Run finished: 4 optimizer steps in 0 s.". Nor
    does it validate: the summary had no val loss line, though the checkpoint holds the last one (at step 4)."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import RunSummary

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    loader = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    first_run = cpu_trainer(tmp_path, 4, [ModelCheckpoint(tmp_path / "ckpt", save_last=True)], limit_val_batches=1)
    first_run.fit(module, loader, loader)
    validated = float(first_run.callback_metrics["val/loss"])
    summary, resumed = RunSummary(), EPASModule(LlamaConfig.from_name("debug", block_size=16))
    trainer = cpu_trainer(tmp_path, 3, [summary], enable_checkpointing=False)
    trainer.fit(resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    lines = summary.summary(trainer, resumed, None).splitlines()
    assert lines[0].startswith(
        "Run finished: 4 optimizer steps (none in this session: resumed at step 4, where max_steps"
    )
    assert f"  val loss     {validated:.4f} (perplexity " in "\n".join(lines)
    assert lines[1].endswith(") at the validation of step 4, before this session (which ran none)")
    # the loader's 4 batches are one epoch: max_epochs is the limit reached (it named max_steps -1)
    trainer = cpu_trainer(tmp_path, -1, [summary], enable_checkpointing=False, max_epochs=1)
    trainer.fit(module, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    first = summary.summary(trainer, module, None).splitlines()[0]
    assert "resumed at step 4, where max_epochs 1 had been reached; raise it to train further" in first, first
    # max_time counts the training time of every session (Lightning's Timer resumes it): the same command trains
    # nothing, and the summary said that max_steps 10 had been reached and to resume "the same command"
    cpu_trainer(tmp_path, 4, [ModelCheckpoint(tmp_path / "timed", save_last=True)], max_time="00:01:00:00").fit(
        module, loader
    )
    summary = RunSummary(command_line=True)
    timed = ModelCheckpoint(tmp_path / "timed", save_last=True)
    trainer = cpu_trainer(tmp_path, 10, [summary, timed], max_time={"microseconds": 1})
    trainer.fit(module, loader, ckpt_path=tmp_path / "timed" / "last.ckpt")
    lines = summary.summary(trainer, module, None).splitlines()
    assert "resumed at step 4, where max_time 00:00:00:00 had been reached; raise it to train further" in lines[0]
    assert lines[-1] == (
        "  resume: to train further, raise --trainer.max_time (the training time of all sessions together) and "
        "resume with --ckpt_path last"
    ), lines[-1]


@pytest.mark.slow
def test_fit_summary_and_a_resume_that_continues_the_run(tiny_corpus, debug_fit_run, tmp_path, capsys, monkeypatch):
    """The first run is the entry point's (a process of its own); the resume runs in this process."""
    first, first_cwd = debug_fit_run  # fit --config configs/debug.yaml --sharing.interval 3
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    run = "runs/debug/version_0"
    assert f"checkpoints  {run}/checkpoints  (last: last.ckpt)" in out and f"logs         {run}" in out
    assert (
        "val loss" in out and "tokens/s (median over" in out and "1/2 layers share [1]; full region since step 3" in out
    )
    assert f"python -m epas_lightning generate --checkpoint {run}/checkpoints/last.ckpt" in out
    assert "Warning" not in first.stderr and "warn" not in first.stderr.lower(), first.stderr
    assert "Epoch 0 " in out and "Epoch 0/-2" not in out  # a run bounded by max_steps has no epoch total
    assert "v_num: 0 " in out
    shutil.copytree(first_cwd / "runs", tmp_path / "runs")  # resume a copy: other tests read the first run
    hparams = (tmp_path / run / "hparams.yaml").read_text()
    # a path, not `last` (the Ctrl+C test resumes with `last`): a checkpoint inside a version folder continues it
    resume = ["--sharing.interval", "3", "--ckpt_path", f"{run}/checkpoints/last.ckpt", "--trainer.max_steps", "10"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tiny_corpus.parent))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["fit", "--config", DEBUG, *resume])
    resumed = capsys.readouterr()
    assert code == 0, resumed.err[-3000:]
    warned = [str(w.message) for w in caught]
    # Lightning's warning: a resume is meant to write there
    assert not [w for w in warned if "exists and is not empty" in w] and "exists and is not empty" not in resumed.err
    assert sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir()) == ["version_0"]  # the same run
    assert f"logs         {run}" in resumed.out and "v_num: 0 " in resumed.out
    assert " 10/10 " in resumed.out  # the bar counts on from batch 8 of the epoch: its total too (it said 10/1)
    assert torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert (tmp_path / run / "config.yaml").is_file() and (tmp_path / run / "config-resume-1.yaml").is_file()
    assert (tmp_path / run / "hparams.yaml").read_text() == hparams
    events = EventAccumulator(str(tmp_path / run)).Reload()
    # one curve, each step once (sorted: two event files made within one second are read in the order of their
    # process ids, the resumed one's first where its id is lower)
    assert sorted(e.step for e in events.Scalars("train/loss")) == list(range(10))
    layers = events.Scalars("sharing/layers")
    assert len({e.step for e in layers}) == len(layers)  # logged once per step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--data.seed", "7"], r"holds only for the data settings it was saved with \(seed 42 -> 7\)"),
        (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.01"], "not the configured SGD's"),
    ],
    ids=["seed", "optimizer"],
)
def test_fit_refuses_a_resume_its_checkpoint_metadata_refuses_before_restoring_it(
    flags, says, tiny_corpus, debug_fit_run, tmp_path, capsys, monkeypatch
):
    """``fit --ckpt_path`` with another data seed or another optimizer than the checkpoint's said its one line after
    Lightning's "Restoring states from the checkpoint path" (the whole checkpoint loaded: minutes for a large model).
    The optimizer is refused before any data is prepared; the position once the data is found (its streams count)."""
    _, first_cwd = debug_fit_run
    shutil.copytree(first_cwd / "runs", tmp_path / "runs")  # other tests read the first run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tiny_corpus.parent))
    ckpt_path = "runs/debug/version_0/checkpoints/last.ckpt"

    def load(connector, checkpoint_path=None, weights_only=None):  # Lightning's "Restoring states ..." and its load
        assert not checkpoint_path, f"Lightning loaded {checkpoint_path} before the refusal"

    monkeypatch.setattr(_CheckpointConnector, "resume_start", load)
    code = main(["fit", "--config", DEBUG, "--sharing.interval", "3", "--ckpt_path", ckpt_path, *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.search(says, err), err
    *before, refusal = err.splitlines()
    assert refusal.startswith("error: ") and f"— --ckpt_path {ckpt_path} —" in refusal, err
    assert len(before) == (0 if "--model.optimizer" in flags else 1), err  # the corpus found, for the position
    assert all(line.startswith("Reusing prepared corpus at ") for line in before), err


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes(tiny_corpus, tmp_path, capsys, monkeypatch):
    """The signalled run is a process of its own; the resume runs the same command line in this process."""
    env = {**os.environ, "EPAS_CACHE_DIR": str(tiny_corpus.parent), "PYTHONPATH": str(REPO)}
    args = ["fit", "--config", DEBUG, "--trainer.max_steps", "100000", "--trainer.val_check_interval", "1000"]
    code, out, err = signal_fit_once_training(args, tmp_path, env, signal.SIGINT)
    assert code == 130, err[-3000:]
    stopped = re.search(r"stopped by SIGINT after step (\d+); saved (\S+) — resume with the same command", err)
    assert stopped, err[-3000:]
    step, saved = int(stopped.group(1)), tmp_path / stopped.group(2)
    assert step >= 4 and saved == tmp_path / "runs/debug/version_0/checkpoints/last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == step and f"Run finished: {step} optimizer" in out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tiny_corpus.parent))
    code = main(["fit", "--config", DEBUG, "--ckpt_path", "last", "--trainer.max_steps", str(step + 2)])
    resumed = capsys.readouterr()
    assert code == 0, resumed.err[-3000:]
    assert f"Run finished: {step + 2} optimizer steps (2 in this session, resumed at step {step}) in" in resumed.out
    assert f"Resuming from {saved.relative_to(tmp_path)}" in resumed.err
    assert sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir()) == ["version_0"]  # the same run


def test_validate_of_a_run_checkpoint_resumes_nothing_and_leaves_the_run_folder(
    debug_fit_run, tmp_path, capsys, caplog, monkeypatch
):
    """`validate --ckpt_path last` loads the run's weights: no "Resuming"/"Restoring states" lines, no warning about a
    checkpoint folder it never writes or about callback settings (other checkpoint settings here) it never restores,
    and no val/loss at step 0 among the training run's curves."""
    shutil.copytree(debug_fit_run[1] / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other_checkpoint_settings = ["--checkpoint.every_n_train_steps", "6"]
        assert main(["validate", "--config", DEBUG, "--ckpt_path", "last", *other_checkpoint_settings]) == 0
    said = [record.getMessage() for record in caplog.records] + capsys.readouterr().err.splitlines()
    assert "Loaded model weights from the checkpoint at runs/debug/version_0/checkpoints/last.ckpt" in said
    assert not [line for line in said if line.startswith(("Resuming", "Restoring"))], said
    assert not [w for w in caught if re.search("dirpath has changed|callbacks used to create", str(w.message))]
    assert len(list(Path("runs/debug/version_0").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_or_test_into_a_run_folder_given_as_a_logger_version_is_refused(
    subcommand, debug_fit_run, tmp_path, capsys, monkeypatch
):
    """`validate`/`test --trainer.logger.init_args.version 0` into the folder a fit wrote stopped with Lightning's
    SaveConfigCallback traceback, an event file added to that run's; beside a CSVLogger given the version of a run's
    metrics.csv, it ended with exit 0, that file rewritten with the score alone; into a folder holding only a run's
    checkpoints (its logs in a sub_dir) it wrote its config and logs beside them. Now one line each, nothing written."""
    shutil.copytree(debug_fit_run[1] / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    (csv_folder := Path("runs/csv/version_0")).mkdir(parents=True)
    (csv_folder / "metrics.csv").write_text("epoch,step,train/loss\n0,0,6.23\n")
    shutil.copytree("runs/debug/version_0/checkpoints", "runs/debug/exp1/checkpoints")
    before = {path: path.read_bytes() for path in Path("runs").rglob("*") if path.is_file()}
    csv = ["--trainer.logger+=CSVLogger", *(f"--trainer.logger.init_args.{k}" for k in ("save_dir=runs", "name=csv"))]
    refusals = {
        "runs/debug/version_0": ["--trainer.logger.init_args.version", "0"],
        "runs/csv/version_0": [*csv, "--trainer.logger.init_args.version=0"],
        "runs/debug/exp1": ["--trainer.logger.init_args.version", "exp1"],
    }
    for folder, settings in refusals.items():
        for ckpt_path in ([], ["--ckpt_path", "last"]):
            assert main([subcommand, "--config", DEBUG, *settings, *ckpt_path]) == 2, (folder, ckpt_path)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f" — {folder} — give " in err, err[-3000:]
            assert err.endswith("version), or none for a new version_N\n"), err
    assert {path: path.read_bytes() for path in Path("runs").rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_fit_at_once_with_one_line_and_its_status(
    signum, tiny_corpus, tmp_path, capfd, monkeypatch
):
    """Lightning ended a fit interrupted during the graceful stop with "Detected KeyboardInterrupt, attempting graceful
    shutdown" and exit status 1 (after Ctrl+C), or 0 after the step (SIGTERM)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        logging.getLogger("epas_lightning"), "handlers", []
    )  # not one bound to an earlier test's capture
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # Lightning ignores Ctrl+C
    signals = ["--trainer.callbacks+=helpers.SignalTwice", f"--trainer.callbacks.signum={int(signum)}"]
    try:
        code = main(["fit", "--config", DEBUG, *signals])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capfd.readouterr().err
    what = "Ctrl+C" if signum == signal.SIGINT else "SIGTERM"
    assert code == 128 + signum and err.endswith(f"interrupted: fit stopped ({what})\n"), err[-2000:]
    assert "Traceback" not in err and "Detected KeyboardInterrupt" not in err and "stopped by" not in err


@pytest.mark.parametrize(("enabled", "subcommand"), [(True, "fit"), (False, "fit"), (True, "validate")])
def test_a_sigterm_while_fit_sets_up_stops_it_with_one_line_and_its_status(
    enabled, subcommand, tiny_corpus, tmp_path, capfd, monkeypatch
):
    """SIGTERM before Lightning registers its handler (here as the callbacks set up; also during the imports, the data
    preparation and checks, the model build, a resume's read) took its default action: exit status 143 and nothing
    said, so a scheduler's preemption in a job's first seconds read as a crash. It stops as Ctrl+C does there: one
    line, the same status, and the run folder it had just made is removed, as after a refused start (the same command
    again is the same run). ``interrupt.enabled: false`` keeps the default action. So does ``validate``, whose run
    folder was left behind too. The answered cases run ``main`` in this process (``python -m epas_lightning`` exits
    with its status; a default action would end this process, failing the test); the default action needs a process
    of its own."""
    from epas_lightning.sigterm_in_setup import EVALUATION_STOPPED_IN_SETUP, STOPPED_IN_SETUP

    args = [subcommand, "--config", DEBUG, "--trainer.callbacks+=helpers.SigtermInSetup"]
    args.append(f"--interrupt.enabled={str(enabled).lower()}")
    reason = STOPPED_IN_SETUP if subcommand == "fit" else EVALUATION_STOPPED_IN_SETUP
    said = f"interrupted: {subcommand} stopped ({reason})\n"
    if enabled:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(logging.getLogger("epas_lightning"), "handlers", [])  # not one bound to an earlier test's
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = main(args)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        err = capfd.readouterr().err
        assert code == 143 and err.endswith(said), err[-3000:]
        assert not (tmp_path / "runs").exists()
    else:
        env = {**os.environ, "EPAS_CACHE_DIR": str(tiny_corpus.parent)}
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'tests'}"
        command = [sys.executable, "-m", "epas_lightning", *args]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        err = done.stderr
        assert done.returncode == -signal.SIGTERM and "interrupted" not in err, err[-3000:]
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("signum", "batch", "command"),
    [
        (signal.SIGTERM, 0, "fit"),
        (signal.SIGTERM, 1, "fit"),
        (signal.SIGTERM, None, "fit"),
        (signal.SIGINT, 0, "fit"),
        (signal.SIGTERM, "start", "validate"),
    ],
    ids=["SIGTERM, sanity batch 0 of 2", "SIGTERM, its last batch", "SIGTERM, as it ends", "Ctrl+C", "validate"],
)
def test_a_signal_in_the_sanity_validation_stops_fit_before_training_and_removes_its_run_folder(
    signum, batch, command, tiny_corpus, tmp_path, capfd, caplog, monkeypatch
):
    """Once Lightning registered its SIGTERM handler (the sanity validation), a SIGTERM in the validation's last batch,
    or after it, only set Lightning's flag: fit trained its first step, then ended with "(SIGTERM)", nothing saved; one
    in an earlier batch said "(SIGTERM)" and Lightning's "Received SIGTERM" too. Both stop before training, as a
    SIGTERM in set-up does, and remove the run folder they had just made (never another); Ctrl+C there left it.
    ``validate`` in one process stops alike after its first batch (as on several ranks, where it hung)."""
    from epas_lightning.sigterm_in_setup import STOPPED_IN_SETUP

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger("epas_lightning"), "handlers", [])  # not one bound to an earlier test's
    (theirs := tmp_path / "runs" / "debug" / "version_0").mkdir(parents=True)
    (theirs / "notes.txt").write_text("a run folder of someone else's")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # Lightning ignores Ctrl+C
    args = ["--trainer.callbacks+=helpers.SignalBeforeTraining", f"--trainer.callbacks.signum={int(signum)}"]
    args.append(f"--trainer.callbacks.batch={batch if isinstance(batch, str) else json.dumps(batch)}")
    try:
        code = main([command, "--config", DEBUG, *args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capfd.readouterr().err
    what = "Ctrl+C" if signum == signal.SIGINT else STOPPED_IN_SETUP if command == "fit" else "SIGTERM"
    assert code == 128 + signum and err.endswith(f"interrupted: {command} stopped ({what})\n"), err[-2000:]
    said = err + caplog.text  # Lightning's log lines reach stderr through pytest's capture
    assert "Traceback" not in said and "Received SIGTERM" not in said and "Detected KeyboardInterrupt" not in said
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == [
        "runs/debug/version_0/notes.txt"
    ]


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_an_empty_ckpt_path_is_one_line(tmp_path, capsys, monkeypatch, command):
    """``--ckpt_path "$CKPT"`` with CKPT unset was Lightning's ValueError traceback ("found no path for the best
    weights: ''"), status 1."""
    monkeypatch.chdir(tmp_path)
    assert main([command, "--config", DEBUG, "--ckpt_path", ""]) == 2
    assert capsys.readouterr().err == (
        "error: --ckpt_path is given an empty path — --ckpt_path '' — give a checkpoint's path, last or auto (is a "
        "variable unset?)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_resume_word_names_the_words(tmp_path, capsys, monkeypatch):
    """``--ckpt_path lst`` said "checkpoint does not exist — check the path", not which words there are."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--ckpt_path", "lst"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint named 'lst' here (did you mean last?) — --ckpt_path lst — give last")
    (tmp_path / "lst").mkdir()  # a folder of that name is a path: what is in it is checked as a checkpoint
    assert main(["fit", "--config", DEBUG, "--ckpt_path", "lst"]) == 2
    assert "no checkpoint named" not in capsys.readouterr().err


def test_resume_last_without_a_checkpoint_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no last.ckpt of this run to resume — runs/debug/version_*/checkpoints")
    assert main(["validate", "--config", DEBUG, "--ckpt_path", "last"]) == 2  # validate resumes nothing
    assert capsys.readouterr().err.startswith("error: no last.ckpt of this run to score — runs/debug/version_*/")
    # a first run given its own checkpoint folder: its saved config says where (a config that won't read is passed by)
    (tmp_path / "runs" / "debug" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "debug" / "version_0" / "config.yaml").write_text("checkpoint:\n  dirpath: ckpts\n")
    (tmp_path / "runs" / "debug" / "version_1").mkdir()
    (tmp_path / "runs" / "debug" / "version_1" / "config.yaml").write_text("checkpoint: [\n")
    assert main(["fit", "--config", DEBUG, "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "— runs/debug/version_0/config.yaml names checkpoint.dirpath ckpts: add --checkpoint.dirpath ckpts, or pass "
        "the checkpoint's path to --ckpt_path"
    )


def test_resume_last_without_a_logger_finds_the_root_folder_checkpoint(tmp_path, capsys, monkeypatch):
    """Without a logger Lightning saves into <default_root_dir>/checkpoints: the printed resume hint must work."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", DEBUG, "--trainer.logger", "false", "--trainer.default_root_dir", "run", "--ckpt_path"]
    assert main([*args, "last"]) == 2
    assert capsys.readouterr().err.startswith("error: no last.ckpt of this run to resume — run/checkpoints")
    config = Namespace(trainer=Namespace(logger=False, default_root_dir="run"), checkpoint=Namespace(dirpath=None))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").touch()
    assert resume_checkpoint(config, "last") == "run/checkpoints/last.ckpt"


@pytest.mark.parametrize("word", ["last", "auto"])
def test_resume_refuses_a_logger_without_save_dir_it_cannot_find_the_checkpoints_of(tmp_path, word, monkeypatch):
    """A logger configured without a save_dir (WandbLogger's kind) checkpoints under <default_root_dir>/<its name>/
    <its version>, known only once it runs: `last` said "no last.ckpt of this run to resume — train first" without
    where it looked, and `auto` "no last.ckpt under ;" and started from scratch beside the run's checkpoints. Now one
    line names the logger and what to pass; a checkpoint folder of its own (checkpoint.dirpath) is looked in."""
    monkeypatch.chdir(tmp_path)
    logger = Namespace(class_path="my_loggers.RemoteLogger", init_args=Namespace(project="p"))
    config = Namespace(trainer=Namespace(logger=logger), checkpoint=Namespace(dirpath=None))
    with pytest.raises(CheckpointError) as refused:
        resume_checkpoint(config, word)
    assert str(refused.value) == (
        f"cannot tell which folder my_loggers.RemoteLogger checkpoints into: it is given no save_dir — --ckpt_path "
        f"{word} — give the run a checkpoint folder (--checkpoint.dirpath; last and auto look there), or pass the "
        "checkpoint's path to --ckpt_path"
    )
    config.checkpoint.dirpath = "ckpts"
    Path("ckpts").mkdir()
    Path("ckpts/last.ckpt").touch()
    assert resume_checkpoint(config, word) == "ckpts/last.ckpt"


def test_resume_puts_back_a_last_checkpoint_a_killed_sharded_save_had_moved_aside(tmp_path, capsys):
    """A sharded save renames last.ckpt to .last.ckpt.replaced, then its new folder to last.ckpt; a job killed between
    the two (SLURM's time limit) left no last.ckpt, and `--ckpt_path auto` of the requeued job started from scratch."""
    logger = Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(tmp_path), name="run"))
    config = Namespace(trainer=Namespace(logger=logger), checkpoint=Namespace(dirpath=None))
    folder = tmp_path / "run" / "version_0" / "checkpoints"
    (folder / ".last.ckpt.replaced").mkdir(parents=True)
    (folder / ".last.ckpt.replaced" / ".metadata").write_bytes(b"the previous save")
    (folder / ".last.ckpt.saving").mkdir()  # the new save, complete or not: the next save starts it again
    assert resume_checkpoint(config, "auto") == str(folder / "last.ckpt")
    assert (folder / "last.ckpt" / ".metadata").read_bytes() == b"the previous save"
    assert not (folder / ".last.ckpt.replaced").exists()
    assert "restored: a sharded save stopped between" in capsys.readouterr().err


def test_a_resume_from_before_the_end_of_a_run_starts_a_new_version_folder(tmp_path, capsys, monkeypatch):
    """Resuming the run's latest state continues its version folder; an earlier checkpoint of it (a rewind) must not,
    or the new run's checkpoints would replace the later ones of that run."""
    monkeypatch.chdir(tmp_path)
    folder = Path("runs/debug/version_3/checkpoints")
    folder.mkdir(parents=True)
    for name, step in (("epoch=0-step=4.ckpt", 4), ("epoch=0-step=8.ckpt", 8), ("last.ckpt", 8)):
        torch.save({"state_dict": {}, "global_step": step}, folder / name)

    def resumed_into(name: str) -> tuple[Path | None, int | None]:
        logger = Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir="runs", name="debug"))
        config = Namespace(trainer=Namespace(logger=logger), checkpoint=Namespace(dirpath=None))
        return continue_version(config, folder / name), logger.init_args.get("version")

    assert resumed_into("last.ckpt") == resumed_into("epoch=0-step=8.ckpt") == (folder.parent, 3)
    assert capsys.readouterr().err == ""
    assert resumed_into("epoch=0-step=4.ckpt") == (None, None)
    assert capsys.readouterr().err.startswith(f"{folder.parent} went on to step 8: this run logs and checkpoints into")


def test_a_rewind_into_a_fixed_checkpoint_folder_is_refused(tmp_path, capsys, monkeypatch):
    """With checkpoint.dirpath fixed, a resume of a checkpoint of a run that went on past it trained into that run's
    folder: its last.ckpt (step 12) became the rewound run's step 10, beside 'epoch=0-step=8-v1.ckpt' and
    'last-v1.ckpt'. Refused in one line before anything loads; resuming the newest state there stays allowed."""
    from epas_lightning.resume import check_checkpoint_folder_free

    monkeypatch.chdir(tmp_path)
    folder = Path("fixed")
    folder.mkdir()
    for name, step in (("epoch=0-step=4.ckpt", 4), ("epoch=0-step=12.ckpt", 12), ("last.ckpt", 12)):
        torch.save({"state_dict": {}, "global_step": step}, folder / name)
    config = Namespace(trainer=Namespace(logger=False), checkpoint=Namespace(dirpath="fixed"))
    with pytest.raises(CheckpointError, match="folder went on to step 12 after epoch=0-step=4.ckpt") as refused:
        check_checkpoint_folder_free(config, "fixed/epoch=0-step=4.ckpt")
    assert "— checkpoint.dirpath fixed — give the resumed run an empty folder" in str(refused.value)
    check_checkpoint_folder_free(config, "fixed/epoch=0-step=12.ckpt")
    check_checkpoint_folder_free(config, "fixed/last.ckpt")


def test_a_rewind_into_a_fixed_folder_without_last_checkpoints_is_refused(tmp_path, monkeypatch):
    """With save_last off the folder has no last.ckpt to tell the run went on: a resume of its step 4 trained there,
    beside that run's later checkpoints ('epoch=0-step=8.ckpt' of one run, 'epoch=0-step=8-v1.ckpt' of the other).
    Its newest checkpoint tells instead; resuming that one stays allowed."""
    import os

    from epas_lightning.resume import check_checkpoint_folder_free

    monkeypatch.chdir(tmp_path)
    folder = Path("fixed")
    folder.mkdir()
    for written, (name, step) in enumerate((("epoch=0-step=4.ckpt", 4), ("epoch=0-step=12.ckpt", 12))):
        torch.save({"state_dict": {}, "global_step": step}, folder / name)
        os.utime(folder / name, (1_000_000 + written, 1_000_000 + written))  # saved in that order
    config = Namespace(trainer=Namespace(logger=False), checkpoint=Namespace(dirpath="fixed"))
    with pytest.raises(CheckpointError, match="folder went on to step 12 after epoch=0-step=4.ckpt") as refused:
        check_checkpoint_folder_free(config, "fixed/epoch=0-step=4.ckpt")
    assert str(refused.value).endswith("or resume the newest with --ckpt_path fixed/epoch=0-step=12.ckpt")  # no last
    check_checkpoint_folder_free(config, "fixed/epoch=0-step=12.ckpt")
    (folder / "stray.ckpt").write_bytes(b"not a checkpoint")  # newest, but no step to judge by: the next one tells
    with pytest.raises(CheckpointError, match="folder went on to step 12 after epoch=0-step=4.ckpt"):
        check_checkpoint_folder_free(config, "fixed/epoch=0-step=4.ckpt")


def test_a_rewind_into_a_folder_without_last_is_judged_by_steps_not_file_times(tmp_path, monkeypatch):
    """``cp`` gives a copied checkpoint a new time: judged by the newest file, a resume of step 8 copied back in (the
    newest file) was let train beside the run's step 12, and a resume of step 4 was told the run went on to step 8. The
    steps the checkpoints say tell, whatever their times; the newest by step resumes; one that does not read (a sharded
    folder without its metadata, a truncated file) is passed over."""
    import os

    from epas_lightning.resume import check_checkpoint_folder_free

    monkeypatch.chdir(tmp_path)
    folder = Path("fixed")
    folder.mkdir()
    for written, step in enumerate((12, 4, 8)):  # step 12 saved first, then 4 and 8 copied in
        torch.save({"state_dict": {}, "global_step": step}, folder / f"epoch=0-step={step}.ckpt")
        os.utime(folder / f"epoch=0-step={step}.ckpt", (1_000_000 + written, 1_000_000 + written))
    (folder / "epoch=0-step=16.ckpt").mkdir()  # a sharded folder copied without its files
    (folder / "truncated.ckpt").write_bytes(b"PK\x03\x04")
    config = Namespace(trainer=Namespace(logger=False), checkpoint=Namespace(dirpath="fixed"))
    for resumed in ("epoch=0-step=8.ckpt", "epoch=0-step=4.ckpt"):
        with pytest.raises(CheckpointError, match=f"folder went on to step 12 after {resumed}") as refused:
            check_checkpoint_folder_free(config, f"fixed/{resumed}")
        assert str(refused.value).endswith("or resume the newest with --ckpt_path fixed/epoch=0-step=12.ckpt")
    check_checkpoint_folder_free(config, "fixed/epoch=0-step=12.ckpt")


def test_a_logger_given_a_version_refuses_a_folder_with_another_runs_logs(tmp_path, monkeypatch):
    """A logger given a version logged into another run's folder: a CSVLogger after the first deleted that run's
    metrics.csv (Lightning warned and went on), a TensorBoardLogger added its events to that run's. Now one line before
    anything runs; a resume may add TensorBoard events to its own run's folder. validate/test into a folder that holds
    a run's checkpoints alone (its logs in a sub_dir) wrote their config and logs beside them."""
    from epas_lightning.resume import check_logger_folders_free

    monkeypatch.chdir(tmp_path)
    tb = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(save_dir="runs"))
    csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs", name="c"))
    config = Namespace(trainer=Namespace(logger=[tb, csv]), checkpoint=Namespace(dirpath=None))
    check_logger_folders_free(config, None)  # no version given: each run gets a new version_N
    csv.init_args.version = 0
    Path("runs/c/version_0").mkdir(parents=True)
    check_logger_folders_free(config, None)  # an empty folder holds no run's logs
    Path("runs/c/version_0/metrics.csv").write_text("step,loss\n")
    for ckpt_path in (None, "runs/lightning_logs/version_0/checkpoints/last.ckpt"):
        with pytest.raises(OutputError) as refused:
            check_logger_folders_free(config, ckpt_path)
        assert str(refused.value) == (
            "CSVLogger would rewrite another run's logs (metrics.csv) in the version folder it is given — "
            "runs/c/version_0 — give it another version (trainer.logger[1].init_args.version), or none for a new "
            "version_N"
        )
    config.trainer.logger = tb
    tb.init_args.version, tb.init_args.sub_dir = "exp", "tb"
    Path("runs/lightning_logs/exp/tb").mkdir(parents=True)
    Path("runs/lightning_logs/exp/tb/events.out.tfevents.1.host.0").touch()
    with pytest.raises(OutputError, match=r"^TensorBoardLogger would add to another run's logs \(events.out.tfevents"):
        check_logger_folders_free(config, None)
    check_logger_folders_free(config, "runs/lightning_logs/exp/checkpoints/last.ckpt")  # a resume adds to its events
    Path("runs/lightning_logs/exp/tb/events.out.tfevents.1.host.0").unlink()
    (checkpoints := Path("runs/lightning_logs/exp/checkpoints")).mkdir()
    (checkpoints / "last.ckpt").touch()
    check_logger_folders_free(config, None)  # fit: check_checkpoint_folder_free says it, as that run's checkpoints
    tb.init_args.sub_dir = None  # validate/test into that run's folder: its config and logs beside the checkpoints
    with pytest.raises(OutputError) as refused:
        check_logger_folders_free(config, None, scoring=True)
    assert str(refused.value) == (
        "TensorBoardLogger would log into another run's version folder, which holds its checkpoints (last.ckpt) — "
        "runs/lightning_logs/exp — give it another version (trainer.logger.init_args.version), or none for a new "
        "version_N"
    )


def test_a_resume_with_a_csv_logger_keeps_the_earlier_metrics(tmp_path, capsys, monkeypatch):
    """Lightning's CSVLogger deletes the metrics.csv of a version folder it starts logging into: `--ckpt_path last`
    with it left 7 of the first run's 16 lines. Such a resume logs into a new version folder."""
    monkeypatch.chdir(tmp_path)
    folder = Path("runs/debug/version_0/checkpoints")
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 4}, folder / "last.ckpt")
    csv = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs", name="debug")
    )
    config = Namespace(trainer=Namespace(logger=[csv]), checkpoint=Namespace(dirpath=None))
    assert continue_version(config, folder / "last.ckpt") is None and csv.init_args.get("version") is None
    assert "CSVLogger would rewrite runs/debug/version_0/metrics.csv" in capsys.readouterr().err
    # given that version, it cannot log elsewhere: the line said "resume that run with --ckpt_path", as it was doing
    (folder.parent / "config.yaml").write_text("the first run's\n")
    csv.init_args.version = 0
    with pytest.raises(OutputError, match="CSVLogger would rewrite runs/debug/version_0/metrics.csv, the metrics of"):
        check_version_folder_free(config, "config.yaml", str(folder / "last.ckpt"))
    with pytest.raises(OutputError, match="holds another run"):  # a new run, not a resume
        check_version_folder_free(config, "config.yaml")


def test_a_run_with_a_named_logger_version_resumes_into_it_and_a_rerun_is_refused(tmp_path, capsys, monkeypatch):
    """A logger given a name as its version (`version: exp1`) checkpoints into runs/debug/exp1/checkpoints:
    `--ckpt_path last` looked only in version_* folders ("no last.ckpt of this run"), and a resume by path or a rerun
    stopped with Lightning's SaveConfigCallback traceback about that folder's config.yaml, after the training data
    was prepared and a new event file had been added to the earlier run's folder."""
    monkeypatch.chdir(tmp_path)
    folder = Path("runs/debug/exp1/checkpoints")
    folder.mkdir(parents=True)
    (folder.parent / "config.yaml").write_text("the first run's\n")
    named = ["fit", "--config", DEBUG, "--trainer.logger.init_args.version", "exp1"]
    assert main(named) == 2  # stopped before its first checkpoint
    assert "error: the logger's version folder holds another run (config.yaml)" in capsys.readouterr().err
    torch.save({"state_dict": {}, "global_step": 8}, folder / "last.ckpt")
    assert main(named) == 2
    err = capsys.readouterr().err
    assert "error: the checkpoint folder holds another run's checkpoints (last.ckpt)" in err
    assert err.endswith("(checkpoint.dirpath, or another trainer.logger.init_args.version)\n")
    assert main([*named, "--ckpt_path", "last"]) == 2
    assert "error: no 'model_config'" in capsys.readouterr().err  # found and resumed (no real checkpoint)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoints", "config.yaml"]
    # resumed by path without a version, it logs into that folder by its name (a folder named "7" is not version_7)
    for name in ("exp1", "7"):
        folder = folder.parent.rename(Path("runs/debug", name)) / "checkpoints"
        logger = Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir="runs", name="debug"))
        config = Namespace(trainer=Namespace(logger=logger), checkpoint=Namespace(dirpath=None))
        assert continue_version(config, folder / "last.ckpt") == folder.parent and logger.init_args.version == name


def test_a_resume_of_a_logger_with_a_sub_dir_saves_its_config_beside_the_runs(tmp_path, monkeypatch):
    """A TensorBoardLogger's sub_dir holds the run's config.yaml (its checkpoints stay in version_N/checkpoints): the
    second resume named its config config-resume-1.yaml again, looked for in version_N, and stopped with
    SaveConfigCallback's traceback; a rerun into a version given to the logger was not refused."""
    from epas_lightning.resume import resume_config_name

    monkeypatch.chdir(tmp_path)
    (folder := Path("runs/debug/version_0/sub")).mkdir(parents=True)
    (folder / "config.yaml").write_text("the first run's\n")
    (folder / "config-resume-1.yaml").write_text("the first resume's\n")
    init = Namespace(save_dir="runs", name="debug", version=0, sub_dir="sub")
    config = Namespace(trainer=Namespace(logger=Namespace(class_path="TensorBoardLogger", init_args=init)))
    assert resume_config_name(config, folder.parent) == "config-resume-2.yaml"
    with pytest.raises(OutputError, match="holds another run"):
        check_version_folder_free(config, "config.yaml")


def test_a_resume_with_lightnings_own_logger_continues_its_version_folder(debug_fit_run, tmp_path, monkeypatch):
    """`trainer.logger: true` is Lightning's TensorBoardLogger in <default_root_dir>/lightning_logs: `--ckpt_path last`
    resumed version_0's last.ckpt into a new version_1 (named its config config-resume-1.yaml there, beside no
    config.yaml), as no configured logger took the version."""
    from epas_lightning.lightning_cli import EPASCLI

    shutil.copytree(debug_fit_run[1] / "runs" / "debug" / "version_0", tmp_path / "lightning_logs" / "version_0")
    monkeypatch.chdir(tmp_path)
    versions = []
    monkeypatch.setattr(EPASCLI, "_run_subcommand", lambda cli, _: versions.append(cli.trainer.logger.version))
    args = ["fit", "--config", DEBUG, "--sharing.interval", "3", "--trainer.logger", "true", "--ckpt_path", "last"]
    assert main(args) == 0 and versions == [0]


def test_last_with_a_fixed_checkpoint_folder_looks_only_there(tmp_path, capsys):
    """`--trainer.logger.init_args.version exp1 --ckpt_path last` resumed the newer runs/debug/exp2/.../last.ckpt of
    another run (then refused exp1's checkpoints as another run's, telling to resume with --ckpt_path last)."""
    for age, version in enumerate(("exp1", "version_0", "exp2", "version_1")):  # the later ones newer
        (tmp_path / version / "checkpoints").mkdir(parents=True)
        torch.save({}, last := tmp_path / version / "checkpoints" / "last.ckpt")
        os.utime(last, (1000 + age, 1000 + age))
    for version, folder in (("exp1", "exp1"), (0, "version_0"), (None, "version_1")):
        init = Namespace(save_dir=str(tmp_path.parent), name=tmp_path.name, version=version)
        config = Namespace(trainer=Namespace(logger=Namespace(class_path="TensorBoardLogger", init_args=init)))
        assert resume_checkpoint(config, "last") == str(tmp_path / folder / "checkpoints" / "last.ckpt"), version


@pytest.mark.parametrize(
    ("logger", "run_dir"),
    [
        (Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir="runs", name="")), "runs"),
        (Namespace(class_path="CSVLogger", init_args=Namespace(save_dir="runs", name=None)), "runs"),
        (Namespace(class_path="CSVLogger", init_args=Namespace(save_dir="runs")), "runs/lightning_logs"),
        (True, "root/lightning_logs"),
        (None, "root/lightning_logs"),
    ],
    ids=["name ''", "name null", "name unset", "logger true", "logger null"],
)
def test_last_finds_the_checkpoints_of_a_logger_with_no_name_or_lightnings_own(tmp_path, monkeypatch, logger, run_dir):
    """A logger given `name: ''` (or null) keeps its version folders in save_dir itself, and `trainer.logger: true`
    is Lightning's TensorBoardLogger in <default_root_dir>/lightning_logs: `--ckpt_path last` looked in
    runs/lightning_logs (or nowhere) and said there was no last.ckpt of the run it had just trained."""
    monkeypatch.chdir(tmp_path)
    folder = Path(run_dir, "version_0", "checkpoints")
    folder.mkdir(parents=True)
    torch.save({}, folder / "last.ckpt")
    config = Namespace(trainer=Namespace(logger=logger, default_root_dir="root"), checkpoint=Namespace(dirpath=None))
    assert resume_checkpoint(config, "last") == str(folder / "last.ckpt")


def test_user_callbacks_add_to_the_defaults_without_inheriting_them(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    from epas_lightning import DivergenceGuard, TokenThroughputMonitor
    from epas_lightning.lightning_cli import lightning_cli
    from epas_lightning.run_summary import StepRunProgressBar

    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        dirpath: best\n        monitor: val/loss\n"
    )
    monkeypatch.chdir(tmp_path)  # the default logger's run folder
    cli = lightning_cli(["--config", DEBUG, "--config", str(config)], run=False)
    callbacks = cli.trainer.callbacks
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 2
    mine = next(c for c in checkpoints if c.monitor == "val/loss")
    assert not mine.save_last  # not inherited from the default checkpoint by position
    assert type(next(c for c in checkpoints if c is not mine)).__name__ == "RunCheckpoint"  # last.ckpt at the end
    for kind in (TokenThroughputMonitor, LearningRateMonitor, DivergenceGuard, ProgressiveSharing, StepRunProgressBar):
        assert sum(isinstance(c, kind) for c in callbacks) == 1, kind
    no_bar = ["--config", DEBUG, "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    quiet = lightning_cli(no_bar, run=False)
    assert not any(isinstance(c, ProgressBar) for c in quiet.trainer.callbacks)  # switched off: no bar forced in
    no_checkpoints = lightning_cli([*no_bar, "--trainer.enable_checkpointing=false"], run=False)
    assert not any(isinstance(c, ModelCheckpoint) for c in no_checkpoints.trainer.callbacks)
    no_logger = [type(c).__name__ for c in quiet.trainer.callbacks]  # --trainer.logger=false (in no_bar)
    assert "StepLearningRateMonitor" not in no_logger and "SaveConfigCallback" not in no_logger


@pytest.mark.parametrize(
    ("class_path", "section"),
    [
        ("epas_lightning.ProgressiveSharing", "sharing"),
        ("helpers.SubclassedSharing", "sharing"),  # Lightning refuses a second of one class only: they fought
        ("lightning.pytorch.callbacks.LearningRateMonitor", "lr_monitor"),  # each rate logged twice a step
    ],
)
def test_a_section_callback_repeated_in_trainer_callbacks_is_one_line(tmp_path, monkeypatch, class_path, section):
    """A second ProgressiveSharing in trainer.callbacks would fight the `sharing` section over the mask; Lightning
    refused it with a RuntimeError traceback about stateful callbacks. It is a user error naming the section."""
    from epas_lightning.lightning_cli import lightning_cli

    config = tmp_path / "callbacks.yaml"
    args = "        target: 1\n        interval: 2\n" if section == "sharing" else "        logging_interval: step\n"
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args:\n{args}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"the `{section}` section already adds one — trainer.callbacks"):
        lightning_cli(["--config", DEBUG, "--config", str(config)], run=False)


def test_configs_travel_with_the_package():
    import epas_lightning

    shipped = Path(epas_lightning.__file__).parent / "configs"
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'epas_lightning = ["configs/*.yaml"]' in pyproject
    assert shutil.which("python") is not None


@pytest.mark.parametrize(
    "accumulate,global_step,done,expected", [(1, 0, 0, 10), (2, 0, 0, 20), (4, 7, 0, 12), (1, 6, 6, 10), (2, 3, 7, 20)]
)
def test_the_progress_bar_counts_the_batches_of_a_step_bounded_run(accumulate, global_step, done, expected):
    """``done``: the batches of the epoch the run has behind it, from where a resumed run's bar counts on."""
    from types import SimpleNamespace

    from epas_lightning.run_summary import StepRunProgressBar

    bar = StepRunProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(ready=done))
    bar._trainer = SimpleNamespace(
        max_epochs=-1,
        max_steps=10,
        global_step=global_step,
        accumulate_grad_batches=accumulate,
        num_training_batches=100,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    # Lightning's own bar read 10 for 20 batches of 10 steps of 2, and 10/4 resumed at step 6
    assert bar.total_train_batches == expected


def test_without_a_terminal_fit_prints_step_and_validation_lines(tmp_path, capsys):
    """In a log file (SLURM, nohup) the rich bar is drawn only when the epoch ends, which may be the end of the run: a
    200-step demo said nothing between its "EPAS: step" lines. Step lines (loss, tokens/s, time left) and a line per
    validation now come on stderr."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import StepRunProgressBar

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (12, 17)), batch_size=2)
    callbacks = [StepRunProgressBar(line_every_s=0)]
    trainer = cpu_trainer(tmp_path, 4, callbacks, enable_progress_bar=True, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, data, data)
    lines = [line for line in capsys.readouterr().err.splitlines() if re.match(r"\d+/4 steps|val/loss", line)]
    step = r"{}/4 steps · train/loss \d+\.\d{{4}} · [\d,]+ tokens/s"
    validation = r"val/loss \d+\.\d{{4}} \(perplexity [\d.]+\) after {} steps"
    left = r" · \d+ s left"
    expected = [step.format(1) + left, step.format(2) + left, validation.format(2), step.format(3) + left]
    expected += [step.format(4), validation.format(4)]  # the last step: nothing left
    assert len(lines) == len(expected) and all(map(re.fullmatch, expected, lines)), lines


def test_without_a_terminal_a_validation_after_one_step_says_one_step(tmp_path, capsys):
    """The validation line said "after 1 steps"."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import StepRunProgressBar

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    callbacks = [StepRunProgressBar(line_every_s=0)]
    trainer = cpu_trainer(tmp_path, 1, callbacks, enable_progress_bar=True, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, data, data)
    assert re.search(r"^val/loss .* after 1 step$", capsys.readouterr().err, re.MULTILINE)


def test_without_a_terminal_step_lines_come_at_whole_steps_with_their_loss(tmp_path, capsys):
    """Under gradient accumulation a line came after any micro-batch: "1/2 steps · train/loss X" with X the loss of
    step 2's first micro-batch (the running mean of the step in progress), not step 1's."""
    from helpers import cpu_trainer
    from lightning.pytorch.callbacks import Callback

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import StepRunProgressBar

    step_losses = []

    class StepLoss(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx % 2 == 1:  # a step's last micro-batch: train/loss is the step's
                step_losses.append(f"{trainer.callback_metrics['train/loss'].item():.4f}")

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, 17)), batch_size=2)
    callbacks = [StepLoss(), StepRunProgressBar(line_every_s=0)]
    trainer = cpu_trainer(tmp_path, 2, callbacks, enable_progress_bar=True, accumulate_grad_batches=2)
    trainer.fit(module, data)
    lines = [line for line in capsys.readouterr().err.splitlines() if re.match(r"\d+/2 steps", line)]
    assert [re.match(r"(\d)/2 steps · train/loss ([\d.]+)", line).groups() for line in lines] == [
        ("1", step_losses[0]),
        ("2", step_losses[1]),
    ]


def test_the_bar_shows_the_train_loss_before_the_validation_loss(tmp_path):
    """``train/loss`` came after ``val/loss`` on the bar ("v_num: 0 val/loss: 6.236 train/loss: 6.222") once the bar
    read it from ``callback_metrics``: it was first as a progress-bar metric (the training step logs it first)."""
    from helpers import cpu_trainer

    from epas_lightning import EPASModule, LlamaConfig
    from epas_lightning.run_summary import StepRunProgressBar

    module = EPASModule(LlamaConfig.from_name("debug", block_size=16))
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (4, 17)), batch_size=2)
    bar = StepRunProgressBar(line_every_s=0)
    trainer = cpu_trainer(tmp_path, 2, [bar], enable_progress_bar=True, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, data, data)
    metrics = bar.get_metrics(trainer, module)
    assert [name for name in metrics if name.endswith("/loss")] == ["train/loss", "val/loss"]
    assert metrics["train/loss"] == trainer.callback_metrics["train/loss"].item()


def test_out_of_memory_advice_names_flags_each_command_has():
    from epas_lightning.cli import function_parser, tool
    from epas_lightning.errors import OUT_OF_MEMORY_ADVICE

    for command, advice in OUT_OF_MEMORY_ADVICE.items():
        if command in TOOLS:
            options = function_parser(tool(command), command)._option_string_actions
            assert set(re.findall(r"--[a-z-]+", advice)) <= set(options), (command, advice)


def test_a_resume_that_drops_max_time_is_not_told_to_add_a_timer_callback():
    """Resuming a checkpoint written under --trainer.max_time without it printed Lightning's "Please add the following
    callbacks: ['Timer']": dropping the limit is the user's choice. Any other missing callback is still said."""
    import re

    from epas_lightning.lightning_messages import IGNORED_WARNINGS

    def message(missing: list[str]) -> str:  # as lightning/pytorch/trainer/call.py words it
        return (
            "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
            f"`Trainer` instantiation. Please add the following callbacks: {missing}."
        )

    def ignored(text: str) -> bool:
        return any(re.compile(pattern, re.I).match(text) for pattern in IGNORED_WARNINGS)

    assert ignored(message(["Timer"]))
    assert not ignored(message(["Timer", "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"]))
    assert not ignored(message(["EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"]))


def test_the_flops_line_gives_the_figure_it_explains():
    """The line under the model summary read "FLOPs: training FLOPs per sequence of 32 tokens, dense; ..." without the
    figure, a sentence missing its number (the figure was only in the summary's table, on stdout)."""
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    from epas_lightning import LlamaConfig
    from epas_lightning.flops import estimate_flops
    from epas_lightning.run_summary import flops_line

    config = LlamaConfig.from_name("debug", block_size=32)
    dense = get_human_readable_count(int(estimate_flops(config, 0, 32)))
    assert flops_line(config, 1).startswith(f"FLOPs: {dense} training FLOPs per sequence of 32 tokens, dense; ")
    assert flops_line(config, 1).endswith("fewer once 1 layer(s) share.")
    assert flops_line(config, 0) == f"FLOPs: {dense} training FLOPs per sequence of 32 tokens, dense."
    reused = 1 - estimate_flops(config, 1, 32, attention_reuse=True) / estimate_flops(config, 0, 32)
    assert flops_line(config, 1, attention_reuse=True).endswith(f"; {reused:.1%} fewer once 1 layer(s) share.")


# Constructions of the UserError family that may go without a fix, keyed "file::function" (as the test lists them),
# each with why it may. None now: every user error says what to do, however plain (a range names the values to give).
ERRORS_WITHOUT_A_FIX: dict[str, str] = {}


def user_errors_without_a_fix() -> list[str]:
    """``file::function: message`` of every construction of a :class:`UserError` (or a subclass defined in the
    package) that passes no ``fix`` (none, ``None`` or ``""``)."""
    import ast

    def name(node: ast.expr) -> str:  # ConfigError, errors.ConfigError
        return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")

    def calls(node: ast.AST, function: str) -> Iterator[tuple[str, ast.Call]]:  # with the function they are in
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                yield function, child
            yield from calls(child, inner)

    package = REPO / "epas_lightning"
    trees = {path.relative_to(package): ast.parse(path.read_text()) for path in sorted(package.rglob("*.py"))}
    classes = [node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    family = {"UserError"}
    for _ in range(3):  # subclasses of subclasses (HFCheckpointError of CheckpointError)
        family |= {c.name for c in classes if any(name(base) in family for base in c.bases)}
    found = set()
    for path, tree in trees.items():
        for function, call in calls(tree, "<module>"):
            if name(call.func) not in family:
                continue
            keywords = {k.arg: k.value for k in call.keywords}
            fix = call.args[2] if len(call.args) > 2 else keywords.get("fix")
            unpacked = any(isinstance(a, ast.Starred) for a in call.args) or None in keywords
            if not unpacked and (fix is None or (isinstance(fix, ast.Constant) and fix.value in (None, ""))):
                message = ast.unparse(call.args[0]) if call.args else ""
                found.add(f"{path}::{function}: {message[:60]}")
    return sorted(found)


def test_every_user_error_says_what_to_do():
    """The error policy is one line: what is wrong, where, and what to do. About 60 errors said no more than what and
    where (`prepare --train-tokenizer` without --vocab-size, a Hugging Face folder without config.json, ...)."""
    missing = [site for site in user_errors_without_a_fix() if site.split(": ")[0] not in ERRORS_WITHOUT_A_FIX]
    assert not missing, "\n".join(missing)


def test_the_summary_lists_the_region_in_growth_order():
    """The run summary's "2/4 layers share [2, 3]" listed a deep-first region ascending: [3, 2] is its order."""
    from types import SimpleNamespace

    from epas_lightning.run_summary import _region_line

    model = SimpleNamespace(sharing=SimpleNamespace(shared_layers=[2, 3]))
    module = SimpleNamespace(model=model, config=SimpleNamespace(n_layer=4))
    trainer = SimpleNamespace(callbacks=[ProgressiveSharing(target=2, n_layer=4)])
    assert _region_line(trainer, module).startswith("2/4 layers share [3, 2]; full region since")


@pytest.mark.slow
def test_a_resume_into_a_new_version_folder_prints_no_lightning_warning_about_it(
    tiny_corpus, debug_fit_run, tmp_path, capsys, monkeypatch
):
    """A checkpoint resumed into another folder than it was saved in (a copy, a rewind of a run that went on) printed
    Lightning's "<path>/model_checkpoint.py:566: The dirpath has changed from ... won't be reloaded": the new folder's
    checkpoints are this run's alone, as meant, and the summary names that folder."""
    shutil.copytree(debug_fit_run[1] / "runs", tmp_path / "runs")  # the resume starts version_1 beside it
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "runs/debug/version_0/checkpoints/last.ckpt", tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tiny_corpus.parent))
    resume = ["--sharing.interval", "3", "--ckpt_path", "elsewhere/last.ckpt", "--trainer.max_steps", "9"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["fit", "--config", DEBUG, *resume])
    resumed = capsys.readouterr()
    assert code == 0, resumed.err[-3000:]
    assert "checkpoints  runs/debug/version_1/checkpoints" in resumed.out
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert "dirpath has changed" not in resumed.err
