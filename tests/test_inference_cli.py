"""`generate` and `bench` on a checkpoint trained with progressive sharing (tiny, CPU)."""

from __future__ import annotations

import csv
import io
import json
import os
import threading

import pytest
import torch
from helpers import DEBUG_CONFIG as DEBUG
from helpers import cpu_trainer, strict_json, train_tiny_checkpoint, train_tiny_sentencepiece
from model_dirs import save_scripted

from epas_lightning import EPASModule, LlamaConfig, ProgressiveSharing, TokenDataModule
from epas_lightning.checkpoint import load_model
from epas_lightning.cli import main as cli_main
from epas_lightning.consolidation import consolidate
from epas_lightning.errors import ConfigError
from epas_lightning.inference import generate, set_region
from epas_lightning.inference.bench import flops_ratio, region_for_budget

TRAINING_STATE = ("callbacks", "optimizer_states", "lr_schedulers")
"""What a weights-only checkpoint lacks of a full one."""


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A 4-layer model trained 6 steps while its region grew to the deepest 2 layers; its last.ckpt."""
    return train_tiny_checkpoint(tiny_corpus, tmp_path_factory.mktemp("run"), ProgressiveSharing(target=2, interval=2))


@pytest.fixture(scope="module")
def stock_export(trained, tmp_path_factory):
    """``export --sharing-layers 0`` of ``trained``: a stock LLaMA folder that runs dense and records, in the metadata
    of its model.safetensors, the region its weights trained (layers [3, 2], deep-first)."""
    from epas_lightning.hf.export import export

    return export(trained, tmp_path_factory.mktemp("stock") / "hf", sharing_layers=0)


def shallow_stock_copy(stock_export, folder):
    """A copy of ``stock_export`` whose record says its weights trained layers [1, 2], shallow-first: a growth order
    that a region counted deep-first from the last layer does not follow."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(stock_export, folder)
    with safe_open(copy / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    record = json.dumps({"layers": [1, 2], "order": "shallow_first"})
    save_file(
        load_file(copy / "model.safetensors"), copy / "model.safetensors", {**metadata, "epas_trained_region": record}
    )
    return copy


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    if rc == 2:
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err  # one line, no traceback
    return rc, out.out, out.err


def test_checkpoint_knows_its_trained_region_and_tokenizer(trained, tiny_corpus):
    loaded = load_model(trained)
    assert loaded.trained_shared_layers == [2, 3]
    assert loaded.tokenizer_path is not None and loaded.tokenizer_path.parent == tiny_corpus.resolve()
    assert not loaded.model.training


def test_commands_wrap_prompts_in_the_bos_the_checkpoint_recorded(trained, tiny_corpus, tmp_path):
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.data.tokenizer import TokenizerError
    from epas_lightning.inference.generate_cli import resolve_tokenizer

    state = torch.load(trained, weights_only=True)
    state["tokenizer"] |= {"bos_id": 7, "eos_id": 9}  # as after `prepare --bos-token X --eos-token Y`
    custom = tmp_path / "custom.ckpt"
    torch.save(state, custom)
    info = describe_checkpoint(custom)
    tokenizer = resolve_tokenizer(info, None)  # generate, evaluate and serve
    assert (tokenizer.bos_id, tokenizer.eos_id) == (7, 9)  # not the tokenizer's default <|bos|>/<|eos|>
    consolidated = json.loads((consolidate(custom, tmp_path / "model") / "config.json").read_text())
    assert (consolidated["tokenizer"]["bos_id"], consolidated["tokenizer"]["eos_id"]) == (7, 9)
    state["tokenizer"]["bos_id"] = 600  # beyond the 512 ids of the tokenizer
    torch.save(state, custom)
    with pytest.raises(TokenizerError, match="BOS id 600 is not in this tokenizer"):
        resolve_tokenizer(describe_checkpoint(custom), None)


def test_generate_reports_the_analytic_cache_saving(trained, capsys):
    rc, out, err = run_cli(
        capsys, "generate", "--checkpoint", str(trained), "--prompt", "def main(", "--prompt", "import",
        "--sharing-layers", "1", "--max-new-tokens", "5", "--temperature", "0", "--json",
    )  # fmt: skip
    assert rc == 0, err
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["shared_layers"] == [3]
    assert numbers["kv_cache_saving"] == pytest.approx(1 / 8) == numbers["kv_cache_saving_analytic"]
    assert out.startswith("def main(") and "\nimport" in out
    assert "layers [3] share (1/4; trained region: layers [3, 2], deep-first, attention reuse)" in err
    # a tiny model's few KiB of cache said "0.00 MiB"
    assert f"KV cache: {numbers['kv_cache_bytes'] / 1024:.1f} KiB (dense " in err and "0.00 MiB" not in err


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (12 * 2**20, "12.0 MiB"),
        (3 * 2**30 // 2, "1.5 GiB"),
        (5 * 2**40, "5.0 TiB"),
    ],
)
def test_sizes_are_written_in_a_unit_that_shows_them(n_bytes, text):
    """One helper writes every size a command prints (generate's KV cache, inspect's files, the free space a run
    warns of): a size under 1 MiB was "0.0 MiB"."""
    from epas_lightning.runtime import size_text

    assert size_text(n_bytes) == text


def test_generate_refuses_more_than_the_trained_region_unless_forced(trained, capsys):
    args = ["generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "2", "--sharing-layers", "3"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "trained with at most 2 sharing layers (layers [3, 2], deep-first); 3 were asked for" in err
    assert "— --sharing-layers — choose 0..2, or pass --force to run a region it never trained" in err
    rc, _, err = run_cli(capsys, *args, "--force")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(trained.parent / "nope.ckpt"), "--prompt", "x")
    assert rc == 2 and "does not exist" in err


def test_a_stock_export_exported_again_runs_the_region_its_weights_trained(stock_export, tmp_path, capsys):
    """`export --remote-code` of a stock export wrote a folder with no region (its record dropped), and
    `export --sharing-layers N --force` of one was refused as 'trained dense': the region it recorded is the new
    folder's, and N counts in it, in its growth order."""
    rc, _, err = run_cli(
        capsys, "export", "--checkpoint", str(stock_export), "--remote-code", "--output", str(tmp_path / "z")
    )
    assert rc == 0, err
    config = json.loads((tmp_path / "z" / "config.json").read_text())
    assert (config["epas_trained_region"], config["epas_shared_layers"]) == ([3, 2], [])
    loaded = load_model(tmp_path / "z")
    assert (loaded.region.layers, loaded.default_sharing, loaded.model.sharing.shared_layers) == ((3, 2), 0, [2, 3])
    shallow = shallow_stock_copy(stock_export, tmp_path / "shallow")
    forced = ["--sharing-layers", "1", "--force", "--output", str(tmp_path / "s")]
    rc, _, err = run_cli(capsys, "export", "--checkpoint", str(shallow), *forced)
    assert rc == 0, err
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["epas_trained_region"], config["epas_growth_order"], config["epas_shared_layers"]) == (
        [1, 2],
        "shallow_first",
        [1],
    )
    export = ["export", "--checkpoint", str(stock_export), "--sharing-layers", "2", "--output", str(tmp_path / "two")]
    rc, out, err = run_cli(capsys, *export, "--force", "--json")
    assert rc == 0 and json.loads(out.splitlines()[-1])["shared_layers"] == [3, 2], err  # in growth order


@pytest.mark.parametrize("copy", [False, True])
def test_export_of_a_stock_export_needs_force_for_sharing_layers_as_every_command(stock_export, copy, tmp_path, capsys):
    """`export --sharing-layers 1` of a stock export (or of a consolidated copy of one) wrote the region without
    `--force`, where generate, evaluate, bench, chat, serve, lm-eval and inspect's row refuse it: it runs dense; the
    same refusal now, and with --force N counts in the region its weights trained."""
    source = consolidate(stock_export, tmp_path / "copy") if copy else stock_export
    said = {}
    for command, options in (("generate", ["--prompt", "x", "--max-new-tokens", "1"]), ("export", [])):
        argv = [command, "--checkpoint", str(source), "--sharing-layers", "1", "--output", str(tmp_path / command)]
        rc, _, said[command] = run_cli(capsys, *(argv if command == "export" else argv[:-2]), *options)
        assert rc == 2 and "runs dense: it holds weights that trained 2 sharing layers" in said[command]
    assert said["export"].split(" — ")[:2] == said["generate"].split(" — ")[:2] and not (tmp_path / "export").exists()
    argv = ["export", "--checkpoint", str(source), "--sharing-layers", "1", "--force", "--output", str(tmp_path / "f")]
    rc, _, err = run_cli(capsys, *argv)
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert rc == 0 and (config["epas_shared_layers"], config["epas_trained_region"]) == ([3], [3, 2]), err


@pytest.mark.parametrize("remote_code", [[], ["--remote-code"]])
def test_exports_refusal_of_a_stock_exports_region_advises_what_export_takes(
    stock_export, remote_code, tmp_path, capsys
):
    """`export [--remote-code] --sharing-layers 1` of a stock export advised 'export the checkpoint again with
    --remote-code' (this command, the flag given) and '--force to run it from this folder' (export runs nothing): it
    advises --remote-code at 0, which carries the region, or --force to export the layers; generate keeps its own."""
    argv = ["export", "--checkpoint", str(stock_export), *remote_code, "--sharing-layers", "1"]
    rc, _, err = run_cli(capsys, *argv, "--output", str(tmp_path / "e"))
    fix = err.rstrip("\n").split(" — ")[-1]
    assert rc == 2 and "export the checkpoint again" not in fix and "run it from this folder" not in fix, err
    assert "with --remote-code the folder carries the region" in fix and "--force to export" in fix, err
    rc, _, err = run_cli(
        capsys, "generate", "--checkpoint", str(stock_export), "--sharing-layers", "1", "--prompt", "x"
    )
    assert rc == 2 and "export the checkpoint again with --remote-code" in err and "run it from this folder" in err


def test_sharing_layers_on_a_stock_export_is_refused_as_it_runs_dense_or_forced_in_its_trained_order(
    stock_export, tmp_path, capsys
):
    """`--sharing-layers 1` on a stock export (and serve's sharing_layers) said it 'was trained dense', and `--force`
    shared the deepest layers whatever the recorded region: the refusal says what its weights trained and how to run
    it, and --force counts in the recorded region's growth order."""
    args = ["generate", "--prompt", "x", "--max-new-tokens", "1", "--sharing-layers", "1", "--json"]
    rc, _, err = run_cli(capsys, *args, "--checkpoint", str(stock_export))
    assert (
        rc == 2 and "this checkpoint runs dense: it holds weights that trained 2 sharing layers (layers [3, 2]" in err
    )
    assert "— --sharing-layers — choose 0, or export the checkpoint again with --remote-code for the region" in err
    rc, _, err = run_cli(capsys, *args[:-3], "--sharing-layers", "5", "--checkpoint", str(stock_export))
    assert rc == 2 and (  # said "(it trained 0: dense, no sharing layers)"
        "a 4-layer model can share at most 3 (it runs dense; its weights trained 2: layers [3, 2], deep-first)" in err
    ), err
    rc, out, err = run_cli(
        capsys, *args, "--checkpoint", str(shallow_stock_copy(stock_export, tmp_path / "s")), "--force"
    )
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["shared_layers"] == [1], err
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.data import load_tokenizer
    from epas_lightning.serve.model_card import ServedModel
    from epas_lightning.serve.protocol import RequestError

    tokenizer = load_tokenizer(stock_export / "tokenizer.json")
    served = ServedModel.build(describe_checkpoint(stock_export), tokenizer, "m", None, None, 1)
    with pytest.raises(RequestError, match=r"this model runs dense: it holds weights that trained 2 sharing layers"):
        served.resolve_region(1, None)  # a request's sharing_layers: said 'was trained dense'


@pytest.mark.parametrize(
    "command,options",
    [
        ("generate", ["--prompt", "x", "--max-new-tokens", "1"]),
        ("evaluate", ["--batches", "1", "--seq-len", "16"]),
        ("bench", ["--batches", "1", "--seq-len", "16", "--reps", "1", "--prompt-len", "4", "--max-new-tokens", "2"]),
        ("analyze", ["--batches", "1", "--seq-len", "16", "--output", "a"]),
    ],
)
def test_commands_on_a_stock_export_say_the_region_its_weights_trained(
    stock_export, command, options, tmp_path, capsys, monkeypatch
):
    """generate, evaluate, bench and analyze of a stock export said only that it runs dense (bench: 'trained with up
    to 0 sharing', generate's summary: 'trained region: dense'), and analyze left out its note on the frozen q/k of the
    layers that trained sharing."""
    from epas_lightning.analysis import analyze

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(analyze, "write_outputs", lambda *_: {"recommendation": None})  # no TensorBoard import (7 s)
    argv = [command, "--checkpoint", str(stock_export), "--batch-size", "1", *options]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    said = (
        f"{command}: the region is dense: a stock export of weights that trained 2 sharing layers (layers [3, 2], "
        "deep-first); our commands and transformers run it dense (export the checkpoint again with --remote-code for "
        "the region)\n"
    )
    assert said in err, err
    if command == "generate":  # its summary said "trained region: dense, no sharing layers" right after
        summary = "\nregion: no layers share (0/4; runs dense; its weights trained layers [3, 2], deep-first)\n"
        assert summary in err, err
    if command == "analyze":
        assert "Note: the checkpoint was trained with layers [3, 2] sharing; their own q/k" in out, out


def test_generate_decodes_a_prompt_file_in_bounded_batches_with_the_one_batch_completions(
    trained, tmp_path, capsys, monkeypatch
):
    """A --prompt-file of thousands of prompts was one batch (one KV cache for all: the process was killed)."""
    from epas_lightning.inference import generate_cli

    batches = []

    def recording(model, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        batches.append(len(prompts))
        return generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generate_cli, "generate", recording)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\nx\nclass A:\n    return self.value\n")
    args = ["generate", "--checkpoint", str(trained), "--prompt-file", str(prompts), "--temperature", "0", "--json"]
    completions = {}
    for batch_size in (2, 5):
        rc, out, err = run_cli(capsys, *args, "--max-new-tokens", "6", "--batch-size", str(batch_size))
        assert rc == 0, err
        completions[batch_size] = json.loads(out.strip().splitlines()[-1])["completions"]
    assert batches == [2, 2, 1, 5]
    assert completions[2] == completions[5] and [c["prompt"] for c in completions[2]][1] == "import os"
    prompts.write_text("def main(\n" * 4)  # four samples of one prompt: each batch sampled as the first one was
    sampled = ["--temperature", "1", "--seed", "7", "--max-new-tokens", "8", "--batch-size", "2"]
    rc, out, err = run_cli(capsys, *args[:-3], *sampled, "--json")
    assert rc == 0, err
    texts = [c["completion"] for c in json.loads(out.strip().splitlines()[-1])["completions"]]
    assert texts[:2] != texts[2:], texts


def test_generate_ignore_eos_counts_the_end_tokens_the_model_emits(trained, capsys, monkeypatch):
    """--ignore-eos asks for exactly --max-new-tokens tokens: an EOS the model emitted on the way was dropped from the
    completion's new_tokens (a benchmark read 4 asked, 3 generated)."""
    from epas_lightning.inference import generate_cli

    def emitting_eos(model, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        result = generate(model, prompts, *args, **kwargs)
        result.tokens = [[row[0], eos, *row[2:]] for row in result.tokens]  # an EOS second, as a model may emit
        return result

    eos = load_model(trained).eos_id
    monkeypatch.setattr(generate_cli, "generate", emitting_eos)
    args = ["generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "4", "--temperature", "0"]
    rc, out, err = run_cli(capsys, *args, "--ignore-eos", "--json")
    assert rc == 0, err
    (completion,) = json.loads(out.strip().splitlines()[-1])["completions"]
    assert completion["new_tokens"] == 4, completion
    rc, out, err = run_cli(capsys, *args, "--json")  # without it, the end token is not counted
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["completions"][0]["new_tokens"] == 3


def test_generate_top_p_0_is_greedy_as_serve_reads_it(trained, capsys):
    """serve takes OpenAI's top_p 0 (the most likely token alone: greedy) while generate refused --top-p 0; both read
    it through one helper now: the greedy completion, whatever the temperature and seed."""
    args = ["generate", "--checkpoint", str(trained), "--prompt", "def", "--max-new-tokens", "8", "--json"]
    completions = {}
    for name, flags in {
        "greedy": ["--temperature", "0"],
        "top_p 0": ["--temperature", "1.5", "--top-p", "0", "--seed", "3"],
        "sampled": ["--temperature", "1.5", "--top-p", "1", "--seed", "3"],
    }.items():
        rc, out, err = run_cli(capsys, *args, *flags)
        assert rc == 0, err
        completions[name] = json.loads(out.strip().splitlines()[-1])["completions"][0]["completion"]
    assert completions["top_p 0"] == completions["greedy"] != completions["sampled"], completions


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--temperature", "-1"), ("--top-k", "0"), ("--top-p", "2"), ("--max-new-tokens", "0"), ("--seed", str(2**64))],
)  # a seed past 64 bits was "Overflow when unpacking long long — generate — see --help" (chat: a traceback)
def test_generate_names_a_bad_sampling_flag_before_loading_anything(flag, value, tmp_path, capsys):
    missing = str(tmp_path / "nope.ckpt")  # never opened: the flag is checked first
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", missing, "--prompt", "x", flag, value)
    assert rc == 2 and f"— {flag} — " in err and "does not exist" not in err, err  # what to do, too


@pytest.mark.parametrize(
    ("content", "says"), [(b"\xa8\x00\x01", "not UTF-8 text (byte 0xa8 at offset 0)"), (None, "a folder")]
)
def test_a_prompt_file_that_is_not_text_is_named_before_loading_anything(content, says, tmp_path, capsys):
    """A binary --prompt-file was a UnicodeDecodeError traceback; a folder was said not to exist."""
    prompts = tmp_path / "prompts"
    prompts.write_bytes(content) if content is not None else prompts.mkdir()
    missing = str(tmp_path / "nope.ckpt")
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", missing, "--prompt-file", str(prompts))
    assert rc == 2 and says in err and f"— --prompt-file {prompts} — " in err, err


def test_a_prompt_file_may_be_a_pipe(tmp_path, capsys):
    """`--prompt-file <(make_prompts)` (a pipe, not a regular file) was said not to exist."""
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    threading.Thread(target=fifo.write_text, args=("x\n",), daemon=True).start()  # blocks until it is read
    missing = str(tmp_path / "nope.ckpt")
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", missing, "--prompt-file", str(fifo))
    assert rc == 2 and "checkpoint does not exist" in err, err  # the prompts were read: the next check speaks


@pytest.mark.parametrize(
    ("stdin", "says"),
    [(b"x\r\ny\n", "checkpoint does not exist"), (b"\n\n", "nothing to continue"), (b"\xa8", "not UTF-8 text")],
)
def test_a_prompt_file_of_a_dash_reads_standard_input(stdin, says, tmp_path, capsys, monkeypatch):
    """`--prompt-file -` (prompts piped in, as `-` reads standard input in most tools) was said not to exist."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    missing = str(tmp_path / "nope.ckpt")
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", missing, "--prompt-file", "-")
    assert rc == 2 and says in err and "prompt file does not exist" not in err, err  # read: the next check speaks
    if says == "not UTF-8 text":
        assert "— --prompt-file - — " in err, err


def test_a_prompt_file_line_is_one_prompt_whatever_separators_it_holds(tiny_corpus, tmp_path, capsys):
    """A line holding a form feed (as Python sources do), U+0085 or U+2028 was cut into several prompts there (the
    file was split as str.splitlines splits), each completed on its own; CRLF files still end their lines."""
    from model_dirs import save_consolidated

    from epas_lightning import Llama

    model = Llama(LlamaConfig.from_name("debug", block_size=32)).eval()
    ckpt = save_consolidated(model, tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    lines = ["def main(\x0c):", "class A\u2028B", "x\x85y", "z"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    args = ["generate", "--checkpoint", str(ckpt), "--prompt-file", str(prompts), "--device", "cpu"]
    rc, out, err = run_cli(capsys, *args, "--temperature", "0", "--max-new-tokens", "2", "--json")
    assert rc == 0, err
    assert [c["prompt"] for c in json.loads(out.strip().splitlines()[-1])["completions"]] == lines


def test_default_lengths_fit_a_short_block_size_and_explicit_ones_are_checked(trained, tmp_path, capsys):
    """block_size is 32: the default 100 new tokens (generate) and 64 + 64 (bench) are cut to fit, as the run
    summary's `next:` commands rely on; an explicit length that cannot fit says how many can."""
    rc, out, err = run_cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "x", "--ignore-eos", "--json")
    assert rc == 0, err
    (completion,) = json.loads(out.strip().splitlines()[-1])["completions"]  # 32 positions: BOS, "x" and 30 new
    assert completion["prompt"] == "x" and completion["new_tokens"] == 30 and f"x{completion['completion']}" in out
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "40")
    assert rc == 2 and "--max-new-tokens — ask for at most" in err
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "x " * 40)
    assert rc == 2 and "no room left in the model's context length 32" in err
    bench = ["bench", "--checkpoint", str(trained), "--reps", "1", "--batches", "1", "--json"]
    rc, out, err = run_cli(capsys, *bench, "--output", str(tmp_path / "bench"))
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["prompt_len"], summary["max_new_tokens"]) == (16, 16)
    assert [row["shared_layers"] for row in summary["rows"]] == [[], [3], [3, 2]]  # in growth order


def test_bench_prompts_have_the_length_it_reports(tiny_corpus, tmp_path, capsys):
    """A model whose context (max_position_embeddings 64) is longer than the sequences it trained on (block_size 32):
    bench --prompt-len 40 cut its prompts to the 33 tokens of a held-out sequence and reported 40, and --prompt-len 64
    (no room left) blamed a --max-new-tokens of 0 that nobody typed."""
    from model_dirs import save_consolidated

    from epas_lightning import Llama

    model = Llama(LlamaConfig.from_name("debug", block_size=32, max_position_embeddings=64)).eval()
    ckpt = save_consolidated(model, tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    bench = ["bench", "--checkpoint", str(ckpt), "--data", str(tiny_corpus), "--reps", "1", "--device", "cpu"]
    lengths = ["--prompt-len", "40", "--max-new-tokens", "4", "--batches", "2"]
    rc, out, err = run_cli(capsys, *bench, *lengths, "--output", str(tmp_path / "bench"), "--json")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["prompt_len"] == 40
    assert summary["rows"][0]["kv_cache_bytes"] == generate(model, [[1] * 40], 4).cache_bytes
    rc, _, err = run_cli(capsys, *bench, "--prompt-len", "64", "--output", str(tmp_path / "full"))
    assert rc == 2 and "— --prompt-len — use at most 63" in err, err


def test_bench_without_held_out_data_writes_well_formed_json(tmp_path, capsys):
    """A checkpoint that records no data (an HF folder, a bare export): bench wrote val_loss NaN into --json and
    many_in_one.json, which is not JSON (RFC 8259): strict parsers (JavaScript, Go, serde) refuse the file."""
    from model_dirs import save_consolidated

    from epas_lightning import Llama

    ckpt = save_consolidated(Llama(LlamaConfig.from_name("debug", block_size=32)), tmp_path / "ckpt")
    out = tmp_path / "bench"
    bench = ["bench", "--checkpoint", str(ckpt), "--reps", "1", "--output", str(out), "--json"]
    rc, printed, err = run_cli(capsys, *bench)
    assert rc == 0, err
    summary = strict_json(printed.strip().splitlines()[-1])
    assert summary == strict_json((out / "many_in_one.json").read_text())
    assert (summary["val_tokens"], summary["rows"][0]["val_loss"], summary["rows"][0]["val_ppl"]) == (0, None, None)
    assert printed.splitlines()[2].endswith(" -")  # the table's val loss column


def test_one_new_token_has_no_decode_speed_rather_than_zero(tiny_corpus, tmp_path, capsys):
    """--max-new-tokens 1 has no decode step (the token comes from the prefill): generate and bench said
    "0.0 tok/s", a speed of zero, in their text and JSON."""
    from model_dirs import save_consolidated

    from epas_lightning import Llama

    ckpt = save_consolidated(
        Llama(LlamaConfig.from_name("debug", block_size=32)), tmp_path / "ckpt", tiny_corpus / "tokenizer.json"
    )
    one = ["--checkpoint", str(ckpt), "--max-new-tokens", "1", "--device", "cpu", "--json"]
    rc, out, err = run_cli(capsys, "generate", *one, "--prompt", "x")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["decode_tokens_per_s"] is None
    assert "decode: 0 tokens, n/a tok/s" in err, err
    rc, out, err = run_cli(capsys, "bench", *one, "--reps", "1", "--output", str(tmp_path / "bench"))
    assert rc == 0, err
    (row,) = json.loads(out.strip().splitlines()[-1])["rows"]
    assert row["decode_tokens_per_s"] is None and row["prefill_tokens_per_s"] > 0
    assert out.splitlines()[2].split()[3] == "-", out  # the table's decode tok/s column


def test_consolidated_checkpoint_generates_the_same_tokens(trained, tmp_path):
    out = consolidate(trained, tmp_path / "model")
    assert (out / "tokenizer.json").is_file()
    a, b = load_model(trained), load_model(out)
    assert b.trained_shared_layers == [2, 3] and b.tokenizer_path == out / "tokenizer.json"
    assert a.data_dir == b.data_dir == a.tokenizer_path.parent  # bench finds held-out tokens from either
    prompt = [[1, 5, 9, 12]]
    for n in range(3):
        set_region(a.model, n)
        set_region(b.model, n)
        assert generate(a.model, prompt, 6).tokens == generate(b.model, prompt, 6).tokens


def test_bench_writes_the_many_in_one_table(trained, tiny_corpus, tmp_path, capsys):
    out_dir = tmp_path / "bench"
    rc, out, err = run_cli(
        capsys, "bench", "--checkpoint", str(trained), "--output", str(out_dir), "--reps", "1",
        "--prompt-len", "8", "--max-new-tokens", "4", "--batches", "2", "--budget", "0.99", "--json",
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads((out_dir / "many_in_one.json").read_text())
    assert summary["data"] == [str(tiny_corpus.resolve())]  # a list, as for a mixture's several folders
    tmp_path = out_dir
    rows = list(csv.DictReader((tmp_path / "many_in_one.csv").open()))
    assert [int(r["sharing_layers"]) for r in rows] == [0, 1, 2]
    ratios = [float(r["flops_ratio"]) for r in rows]
    assert ratios[0] == 1.0 and ratios[0] > ratios[1] > ratios[2]
    assert all(torch.isfinite(torch.tensor(float(r["val_loss"]))) for r in rows)
    assert [float(r["kv_cache_saving"]) for r in rows] == pytest.approx([0, 1 / 8, 2 / 8])
    assert (tmp_path / "many_in_one.png").stat().st_size > 1000
    config = load_model(trained).model.config
    assert summary["budget_pick"] == region_for_budget(config, 0.99, 2, config.block_size)
    assert flops_ratio(config, summary["budget_pick"], 32) <= 0.99


def test_a_budget_read_off_the_bench_table_picks_that_row(capsys):
    """The FLOPs column was rounded to 3 decimals, sometimes below the true ratio (0.96739 shown 0.967): --budget
    0.967 typed from the table skipped that row for one with more sharing. The column never shows less than it."""
    from epas_lightning.inference.bench import print_table

    config = LlamaConfig.from_name("debug", n_layer=4, n_kv_head=2, block_size=32)
    rows = [
        {"sharing_layers": n, "flops_ratio": flops_ratio(config, n, 16), "prefill_tokens_per_s": None,
         "decode_tokens_per_s": None, "kv_cache_bytes": 0, "kv_cache_saving": 0.0, "val_loss": None}
        for n in range(4)
    ]  # fmt: skip
    summary = dict.fromkeys(("checkpoint", "n_layer", "trained_max_shared", "device", "dtype", "prompts"), "x")
    summary |= {"prompt_len": 1, "max_new_tokens": 1, "reps": 1, "val_tokens": 0, "seq_len": 16, "rows": rows}
    print_table({**summary, "budget_pick": None})
    shown = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()[2:]]
    assert [region_for_budget(config, budget, 3, 16) for budget in shown] == [0, 1, 2, 3]


def test_budget_nothing_meets_says_the_figure_the_table_shows():
    """The refusal said the largest region "needs 0.9464 x dense" where the table shows 0.9465, the least budget that
    picks it: a --budget of the figure the error named was refused again."""
    from epas_lightning.errors import ConfigError

    config = LlamaConfig.from_name("debug", block_size=32)
    with pytest.raises(ConfigError) as refused:
        region_for_budget(config, 0.5, 1, 32)
    needs = float(str(refused.value).split(" needs ")[1].split()[0])
    assert region_for_budget(config, needs, 1, 32) == 1


def test_bench_budget_below_the_trained_region_is_an_error(trained, capsys):
    rc, _, err = run_cli(capsys, "bench", "--checkpoint", str(trained), "--budget", "0.5")
    assert rc == 2 and "the largest region (2 sharing layers) needs" in err
    assert "— --budget — raise --budget to at least" in err
    rc, _, err = run_cli(capsys, "bench", "--checkpoint", str(trained), "--sharing-layers", "1", "--budget", "0.5")
    assert rc == 2 and "the largest region (1 sharing layer) needs" in err  # it said "(1 layers)"


def test_bench_budget_that_the_unmeasured_trained_region_meets_names_it(trained, stock_export, capsys):
    """A budget that only the trained region's longer lengths meet (--sharing-layers below it, or a stock export that
    runs dense) said 'raise --budget to at least 1': dense, whatever the budget was for. It names the one that fits."""
    rc, _, err = run_cli(capsys, "bench", "--checkpoint", str(trained), "--sharing-layers", "1", "--budget", "0.95")
    assert rc == 2 and "— --sharing-layers — pass --sharing-layers 2" in err
    rc, _, err = run_cli(capsys, "bench", "--checkpoint", str(stock_export), "--budget", "0.99")
    assert rc == 2 and "pass --sharing-layers 1 --force" in err


def test_one_heldout_loss_for_validate_test_evaluate_and_bench(trained, tiny_corpus, tmp_path, capsys):
    """fit's validation, `test`, `evaluate` and `bench` measure one thing: on the same tokens, the same number."""
    config = LlamaConfig.from_name("debug", n_layer=4, block_size=32)
    data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=config.vocab_size)
    trainer = cpu_trainer(tmp_path, 1, limit_val_batches=3, limit_test_batches=3)
    (validated,) = trainer.validate(EPASModule(config), datamodule=data, ckpt_path=trained)
    (tested,) = trainer.test(EPASModule(config), datamodule=data, ckpt_path=trained)
    common = ["--checkpoint", str(trained), "--batches", "3", "--batch-size", "4", "--json"]
    rc, out, err = run_cli(capsys, "evaluate", *common, "--data", str(tiny_corpus))
    assert rc == 0, err
    [evaluated] = json.loads(out.strip().splitlines()[-1])  # the trained region, as the checkpoint holds it
    rc, out, err = run_cli(
        capsys, "bench", *common, "--output", str(tmp_path / "bench"), "--reps", "1", "--prompt-len", "8",
        "--max-new-tokens", "2",
    )  # fmt: skip
    assert rc == 0, err
    bench = json.loads(out.strip().splitlines()[-1])
    tokens = 3 * 4 * 32
    assert validated["val/tokens"] == tested["test/tokens"] == evaluated["val_tokens"] == bench["val_tokens"] == tokens
    loss = validated["val/loss"]
    assert tested["test/loss"] == pytest.approx(loss, rel=1e-6)
    assert evaluated["val_loss"] == pytest.approx(loss, rel=1e-5)  # attention reuse: the same model, other rounding
    assert bench["rows"][-1]["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_init_from_a_checkpoint_that_shared_says_this_run_starts_dense(trained):
    from epas_lightning.init_from import read_init_state

    config = load_model(trained).model.config
    with pytest.warns(UserWarning, match=r"trained layers \[3, 2\] sharing; this run starts every layer computing"):
        state = read_init_state(trained, config)
    assert "sharing.mask" not in state  # the new run's schedule decides the region


def test_init_from_a_kv_checkpoint_says_its_layers_compute_their_own_k_and_v(tmp_path):
    """A kv-mode source's sharing layers took K/V and computed their own Q: the warning said they compute their own
    Q/K again with the 'q/k weights' left from before they shared."""
    from model_dirs import save_consolidated

    from epas_lightning import Llama
    from epas_lightning.init_from import read_init_state

    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=16, sharing_mode="kv")
    model = Llama(config)
    model.set_shared_layers([1])
    source = save_consolidated(model, tmp_path / "kv")
    with pytest.warns(
        UserWarning, match=r"\[1\] sharing; this run starts every layer computing its own K/V \(their k/v "
    ):
        read_init_state(source, config)


def test_validate_from_init_from_says_it_scores_every_layer_computing(trained, tiny_corpus, tmp_path):
    """`validate --model.init_from` of a checkpoint that shared scores it as a fit from it starts, every layer
    computing; it said "this run starts ... its sharing schedule decides the region", as if training, not which region
    it scored nor how to score the trained one."""
    config = load_model(trained).model.config
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=config.vocab_size)
    module = EPASModule(config, init_from=str(trained))
    said = rf"\[3, 2\] sharing; validate scores it with every layer computing .* evaluate --checkpoint {trained} scores"
    with pytest.warns(UserWarning, match=said):
        cpu_trainer(tmp_path, 1, limit_val_batches=1).validate(module, data, verbose=False)
    assert module.model.sharing.shared_layers == []


def test_predict_from_init_from_runs_the_source_weights_as_validate_scores_them(trained, tmp_path):
    """``trainer.predict(EPASModule(config, init_from=path))`` predicted with the random init: only fit, validate and
    test read init_from. It runs them as validate scores them, every layer computing, and says so."""
    source = load_model(trained).model
    source.set_shared_layers([])
    tokens = torch.randint(0, source.config.vocab_size, (1, 16))
    module = EPASModule(source.config, init_from=str(trained))
    with pytest.warns(UserWarning, match=r"\[3, 2\] sharing; predict runs it with every layer computing"):
        logits = cpu_trainer(tmp_path, 1).predict(module, torch.utils.data.DataLoader(tokens))[0]
    with torch.no_grad():
        torch.testing.assert_close(logits, source(tokens))


@pytest.mark.parametrize("weights_only", [False, True])
def test_validate_a_checkpoint_counts_val_sharing_layers_in_the_region_it_trained(
    trained, tiny_corpus, tmp_path, weights_only
):
    """`validate --ckpt_path` with other sharing settings than the checkpoint's counted val_sharing_layers in the
    configured target (shallow-first here: layers 1, 2, which it never trained), not in the region it trained. A
    weights-only checkpoint holds no schedule state: its recorded region is what it trained."""
    config = load_model(trained).model.config
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=config.vocab_size)
    sharing = ProgressiveSharing(target=2, order="shallow_first", val_sharing_layers=[1, 2])
    trainer = cpu_trainer(tmp_path, 1, [sharing], limit_val_batches=1)
    if weights_only:  # what checkpoint.save_weights_only writes: no callbacks' state or optimizer
        state = {k: v for k, v in torch.load(trained, weights_only=True).items() if k not in TRAINING_STATE}
        torch.save(state, trained := tmp_path / "weights.ckpt")
    scores = trainer.validate(EPASModule(config), data, ckpt_path=trained, verbose=False)[0]
    assert scores["val/loss_at_sharing/2"] == pytest.approx(scores["val/loss"])  # the trained region, [2, 3]
    assert sharing._val_regions == {1: [3], 2: [3, 2]}
    shorter = ProgressiveSharing(target=1, val_sharing_layers=[2])  # 2 past the configured target: was refused
    cpu_trainer(tmp_path, 1, [shorter], limit_val_batches=1).validate(EPASModule(config), data, ckpt_path=trained)
    assert shorter._val_regions == {2: [3, 2]}


def test_validate_a_checkpoint_from_the_command_line_checks_val_sharing_layers_against_its_region(
    trained, tiny_corpus, tmp_path, capsys, monkeypatch
):
    """`validate --ckpt_path` with val_sharing_layers past the configured target but within the checkpoint's region
    was refused when the callback was built (naming the configured target); a length past the checkpoint's region is
    refused naming it. fit still refuses before anything runs (test_cli)."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", DEBUG, "--data.data_dir", str(tiny_corpus), "--ckpt_path", str(trained)]
    args += ["--model.config.n_layer", "4", "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]
    rc, _, err = run_cli(capsys, *args, "--sharing.target", "1", "--sharing.val_sharing_layers", "[2]")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *args, "--sharing.target", "1", "--sharing.val_sharing_layers", "[3]")
    assert rc == 2 and "3 sharing layers were asked for; the checkpoint's target region has 2 (layers [3, 2])" in err


@pytest.mark.parametrize("weights_only", [False, True])
def test_validate_refuses_val_sharing_layers_past_the_checkpoints_region_before_lightning_reads_it(
    trained, tiny_corpus, tmp_path, capsys, monkeypatch, weights_only
):
    """`validate`/`test --ckpt_path` with val_sharing_layers past the region the checkpoint trained (its schedule's
    target; of a weights-only one, the region it records) was refused only once Lightning had read the whole checkpoint
    (minutes for a large one); now from its metadata, before Lightning opens it, in one line."""
    from epas_lightning.checkpoint_io import AtomicCheckpointIO

    def read(*args, **kwargs):
        raise AssertionError("Lightning read the checkpoint")

    if weights_only:
        state = {k: v for k, v in torch.load(trained, weights_only=True).items() if k not in TRAINING_STATE}
        torch.save(state, trained := tmp_path / "weights.ckpt")
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", read)
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "test"):
        args = [command, "--config", DEBUG, "--data.data_dir", str(tiny_corpus), "--ckpt_path", str(trained)]
        args += ["--model.config.n_layer", "4", "--trainer.logger", "false", "--sharing.target", "1"]
        rc, _, err = run_cli(capsys, *args, "--sharing.val_sharing_layers", "[1, 3]")
        whose = "region" if weights_only else "target region"
        assert rc == 2 and f"3 sharing layers were asked for; the checkpoint's {whose} has 2 (layers [3, 2])" in err


@pytest.mark.parametrize("weights_only", [False, True])
def test_python_validate_refuses_val_sharing_layers_past_the_checkpoints_region_before_it_loads(
    trained, tiny_corpus, tmp_path, monkeypatch, weights_only
):
    """``trainer.validate(module, data, ckpt_path=...)`` (and ``test``) with val_sharing_layers past the region the
    checkpoint trained was refused only once Lightning had loaded its weights; now from its metadata, before Lightning
    opens it, as the command line does (above)."""
    from epas_lightning.checkpoint_io import AtomicCheckpointIO

    def read(*args, **kwargs):
        raise AssertionError("Lightning read the checkpoint")

    config = load_model(trained).model.config
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=config.vocab_size)
    if weights_only:
        state = {k: v for k, v in torch.load(trained, weights_only=True).items() if k not in TRAINING_STATE}
        torch.save(state, trained := tmp_path / "weights.ckpt")
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", read)
    whose = "region" if weights_only else "target region"
    for stage in ("validate", "test"):
        sharing = ProgressiveSharing(target=1, val_sharing_layers=[1, 3])
        trainer = cpu_trainer(tmp_path, 1, [sharing], limit_val_batches=1, limit_test_batches=1)
        with pytest.raises(ConfigError, match=rf"3 sharing layers were asked for; the checkpoint's {whose} has 2 "):
            getattr(trainer, stage)(EPASModule(config), data, ckpt_path=trained, verbose=False)


def reads_of(path, monkeypatch) -> list[str]:
    """The calls of ``torch.load`` on ``path`` from here on, each named by its caller (filled as they happen)."""
    import sys

    reads, load = [], torch.load

    def counting(f, *args, **kwargs):
        if str(f) == str(path):
            reads.append(sys._getframe(1).f_code.co_name)
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return reads


def test_a_legacy_checkpoint_is_read_once_before_fit_resumes_it(trained, tiny_corpus, tmp_path, capsys, monkeypatch):
    """A .ckpt in torch's legacy format (not a zip, which is mapped: an older version's, a user's torch.save) was read
    whole by each look at its metadata before Lightning restored it: the checks of --ckpt_path twice, and Lightning's
    look for hyperparameters (EPASModule saves none), four reads at fit start. Now one, and Lightning's restore."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(trained, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    monkeypatch.chdir(tmp_path)
    reads = reads_of(legacy, monkeypatch)
    args = ["fit", "--config", DEBUG, "--data.data_dir", str(tiny_corpus), "--ckpt_path", str(legacy)]
    args += ["--model.config.n_layer", "4", "--sharing.target", "2", "--sharing.interval", "2"]
    args += ["--trainer.max_steps", "7", "--trainer.logger", "false", "--trainer.limit_val_batches", "1"]
    rc, _, err = run_cli(capsys, *args, "--checkpoint.dirpath", str(tmp_path / "out"))
    assert rc == 0, err
    assert reads == ["read", "load_torch_file"], reads  # the kept metadata read, then the restore


def test_a_legacy_checkpoint_with_hyperparameters_is_not_kept_while_lightning_reads_it(
    trained, tiny_corpus, tmp_path, capsys, monkeypatch
):
    """A legacy .ckpt that holds hyperparameters (of a LightningModule that saves them) is read whole by Lightning's
    LightningCLI._parse_ckpt_path, which merges them into the config: the kept read of its metadata was held beside
    that read, two copies of the checkpoint at once where there had been one. It is freed first."""
    import gc
    import sys

    from epas_lightning import safe_load

    legacy = tmp_path / "legacy.ckpt"
    checkpoint = {**torch.load(trained, weights_only=True), "hyper_parameters": {"compile": False}}
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    held, load = [], torch.load

    def reading(f, *args, **kwargs):
        if sys._getframe(1).f_code.co_name == "_parse_ckpt_path":
            gc.collect()
            held.append(safe_load._LEGACY_READS._kept is not None)
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", reading)
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", DEBUG, "--data.data_dir", str(tiny_corpus), "--ckpt_path", str(legacy)]
    rc, _, err = run_cli(capsys, *args, "--model.config.n_layer", "4", "--trainer.logger", "false")
    assert rc == 0, err
    assert held == [False], held


def test_a_legacy_init_from_is_not_kept_in_memory_through_a_resumed_fit(trained, tiny_corpus, tmp_path):
    """``trainer.fit(EPASModule(config, init_from=legacy.ckpt), ckpt_path=...)``: the module's checks of init_from read
    its metadata, and a legacy (non-zip) file's whole read was kept for a next read that a resume never makes (only a
    read of that file's weights or a full load of it freed it): the whole init_from checkpoint, its optimizer state
    too, stayed in memory beside the restored one for the whole run. A full load of any file frees it."""
    import gc

    from lightning.pytorch.callbacks import LambdaCallback

    from epas_lightning import safe_load

    legacy = tmp_path / "init_from.ckpt"
    torch.save(torch.load(trained, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    config = LlamaConfig.from_name("debug", n_layer=4, block_size=32)
    kept = []

    def look(*_) -> None:
        gc.collect()
        kept.append(safe_load._LEGACY_READS._kept is not None)

    probe = LambdaCallback(on_train_batch_start=look)
    trainer = cpu_trainer(tmp_path, max_steps=7, callbacks=[probe, ProgressiveSharing(target=2, interval=2)])
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=4, vocab_size=config.vocab_size)
    trainer.fit(EPASModule(config, init_from=str(legacy)), data, ckpt_path=trained)
    assert kept == [False], kept


def test_a_legacy_checkpoint_changed_since_its_metadata_was_read_is_read_again(trained, tmp_path, monkeypatch):
    """The metadata read of a legacy .ckpt is kept for the next read: the read of its weights takes it, and frees it
    (as Lightning's load_from_checkpoint, which reads the file itself); a file written again since (in place, the same
    size) is read again, not answered from what was kept."""
    from epas_lightning.checkpoint_formats import read_checkpoint

    loaded = torch.load(trained, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({**loaded, "global_step": 111}, legacy, _use_new_zipfile_serialization=False)
    reads = reads_of(legacy, monkeypatch)
    assert read_checkpoint(legacy, weights=False)[1]["global_step"] == 111
    assert read_checkpoint(legacy)[1]["global_step"] == 111 and len(reads) == 1
    read_checkpoint(legacy, weights=False)
    assert len(reads) == 2  # the weights' read freed what was kept
    EPASModule.load_from_checkpoint(legacy)
    read_checkpoint(legacy, weights=False)
    assert len(reads) == 3  # not kept beside Lightning's own read (of an open file, not counted here)
    written, size = legacy.stat().st_mtime_ns, legacy.stat().st_size
    with legacy.open("r+b") as f:  # the same bytes but the step's
        torch.save({**loaded, "global_step": 222}, f, _use_new_zipfile_serialization=False)
    os.utime(legacy, ns=(written + 1_000_000, written + 1_000_000))  # a coarse clock may not have moved
    assert legacy.stat().st_size == size
    assert read_checkpoint(legacy, weights=False)[1]["global_step"] == 222 and len(reads) == 4


def test_a_legacy_checkpoint_copied_over_with_its_times_kept_is_read_again(trained, tmp_path, monkeypatch):
    """The kept metadata read of a legacy .ckpt was keyed on its path, size, mtime and inode: another checkpoint of the
    same size copied over it in place with its modification time kept (``cp -p``, ``rsync --inplace -t``) was answered
    from what was kept, the old step; as was a file of the same inode on another file system mounted there. The key
    holds the change time (which no program sets) and the device."""
    import time
    from pathlib import Path

    from epas_lightning.checkpoint_formats import read_checkpoint

    loaded = torch.load(trained, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({**loaded, "global_step": 111}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy, weights=False)[1]["global_step"] == 111
    before = legacy.stat()
    time.sleep(0.05)  # past a coarse clock's tick
    with legacy.open("r+b") as f:
        torch.save({**loaded, "global_step": 222}, f, _use_new_zipfile_serialization=False)
    os.utime(legacy, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (legacy.stat().st_size, legacy.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert read_checkpoint(legacy, weights=False)[1]["global_step"] == 222

    class OnAnotherDevice:
        def __init__(self, stat: os.stat_result) -> None:
            self.stat = stat

        def __getattr__(self, name: str) -> object:
            return getattr(self.stat, name) + (name == "st_dev")

    reads, stat = reads_of(legacy, monkeypatch), Path.stat
    read_checkpoint(legacy, weights=False)
    assert not reads  # unchanged: what was kept
    monkeypatch.setattr(Path, "stat", lambda path, **kwargs: OnAnotherDevice(stat(path, **kwargs)))
    read_checkpoint(legacy, weights=False)
    assert len(reads) == 1


def test_a_recorded_tokenizer_that_is_gone_is_named_in_the_error(tmp_path):
    """The error said only 'the checkpoint does not name an existing tokenizer': which file went missing was lost."""
    from epas_lightning.checkpoint import _info
    from epas_lightning.errors import ConfigError
    from epas_lightning.inference.generate_cli import resolve_tokenizer
    from epas_lightning.model import Llama, LlamaConfig

    model = Llama(LlamaConfig.from_name("debug", n_layer=2))
    gone = tmp_path / "data" / "tokenizer.json"
    with pytest.raises(ConfigError, match=f"trained with is gone \\({gone}\\) — --tokenizer — pass --tokenizer PATH"):
        resolve_tokenizer(_info({"tokenizer": {"path": str(gone)}}, model), None)
    with pytest.raises(ConfigError, match="^the checkpoint does not name a tokenizer — --tokenizer"):
        resolve_tokenizer(_info({}, model), None)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_any_text(trained, tmp_path, capsys):
    """generate and evaluate --tasks with another model's larger --tokenizer: one line naming it, before any text
    is encoded (ids past the vocabulary end in the embedding's IndexError, or a device-side assert on a GPU)."""
    from epas_lightning.data.tokenizer import train_byte_level_bpe

    other = tmp_path / "tokenizer.json"
    train_byte_level_bpe([f"w{i} v{i * 7} z{i * 13}" for i in range(3000)], 700).save(str(other))
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "q", "choices": ["a", "b"], "label": 0}) + "\n")
    for argv in (["generate", "--prompt", "def"], ["evaluate", "--tasks", str(task)]):
        rc, _, err = run_cli(capsys, *argv, "--checkpoint", str(trained), "--tokenizer", str(other), "--device", "cpu")
        assert rc == 2 and "tokens but the model's vocab_size is 512" in err and f"— {other} —" in err, err


@pytest.mark.parametrize(
    ("vocab", "flags", "says"),
    [
        (64, [], "the tokenizer has 300 tokens but the model's vocab_size is 64"),
        (320, ["--sharing-layers", "1"], "trained dense (no sharing layers); 1 was asked for — --sharing-layers —"),
        (320, ["--max-new-tokens", "100"], "exceeds the model's context length 64"),
    ],
)
def test_generate_names_a_bad_tokenizer_region_or_length_before_loading_the_weights(
    vocab, flags, says, tmp_path, capsys, monkeypatch
):
    """A tokenizer larger than the model, more sharing layers than it trained, or a prompt and --max-new-tokens past
    its context were said only after the weights loaded (minutes for a large checkpoint); chat and serve check them
    from the checkpoint's description first, and generate now does too."""
    from epas_lightning.inference import generate_cli

    ckpt = save_scripted(tmp_path / "ckpt", train_tiny_sentencepiece(tmp_path / "tokenizer.model"), vocab, [3, 4])
    loads, load = [], generate_cli.load_for_inference
    monkeypatch.setattr(generate_cli, "load_for_inference", lambda *args: loads.append(args) or load(*args))
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "ka", "--device", "cpu", *flags)
    assert rc == 2 and says in err and loads == [], err


def test_generate_keeps_the_space_before_the_first_word_of_a_sentencepiece_continuation(tmp_path, capsys):
    """Completions were decoded alone, and sentencepiece drops the space of a text's first token: "hello" went on
    as "hellolo ka", with its word glued on. Decoded after the prompt, it keeps it; at a text's start it has none."""
    import sentencepiece as spm

    model = train_tiny_sentencepiece(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    words = sp.encode(" lo ka")[-2:]
    assert sp.id_to_piece(words[0]).startswith("\u2581")
    save_scripted(tmp_path / "ckpt", model, sp.get_piece_size(), words)
    rc, out, _ = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hello",
                         "--prompt", "", "--max-new-tokens", "4")  # fmt: skip
    assert rc == 0 and out.split("\n\n")[:2] == ["hello lo ka lo ka", "lo ka lo ka"]


def test_generate_and_export_stop_at_every_end_token_the_model_names(tmp_path, capsys):
    """Llama 3 Instruct names several end tokens (eos_token_id [<|end_of_text|>, <|eom_id|>, <|eot_id|>]): generate
    went on past <|eot_id|>, as only the EOS documents end with stopped it, and export's generation_config.json named
    that one alone, so transformers went on too. Both stop at every end token named beside the tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model := train_tiny_sentencepiece(tmp_path / "tokenizer.model")))
    end_of_turn = 7
    save_scripted(tmp_path / "ckpt", model, sp.get_piece_size(), [*sp.encode(" lo ka")[-2:], end_of_turn])
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, end_of_turn]}))
    rc, out, _ = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hello",
                         "--max-new-tokens", "6")  # fmt: skip
    assert rc == 0 and out == "hello lo ka\n\n"
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    for name in ("generation_config.json", "config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == [2, end_of_turn]


def scripted_past_the_tokenizer(tmp_path):
    """A sentencepiece model and a checkpoint whose vocabulary is 20 ids larger (allowed): greedy after "lo" it
    prefers an id the tokenizer lacks, and " ka" next; after that id, "lo" again. (checkpoint, tokenizer, lo, ka)."""
    import sentencepiece as spm
    from safetensors.torch import load_file, save_file

    sp = spm.SentencePieceProcessor(model_file=str(model := train_tiny_sentencepiece(tmp_path / "tokenizer.model")))
    lo, ka, size = sp.encode(" lo")[-1], sp.encode(" ka")[-1], sp.get_piece_size()
    ckpt = save_scripted(tmp_path / "ckpt", model, size + 20, [lo, size + 3])
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"][ka, 1] = 5.0  # the feature of "lo" (the script's first token): " ka" second best
    save_file(weights, ckpt / "model.safetensors")
    return ckpt, model, lo, ka


def test_generate_never_emits_an_id_the_tokenizer_lacks(tmp_path, capsys):
    """A model whose vocabulary is larger than its tokenizer (a padded vocabulary) emitted ids the tokenizer cannot
    decode: they decoded to nothing (sentencepiece raised IndexError before), so the text lost a word and --json
    counted tokens nobody sees. They are masked as the padded rows are: the best id the tokenizer has is chosen."""
    from epas_lightning.data.tokenizer import load_tokenizer

    ckpt, model, lo, ka = scripted_past_the_tokenizer(tmp_path)
    tokenizer = load_tokenizer(model)
    assert tokenizer.decode([lo, tokenizer.vocab_size + 3, lo]) == "lo lo"  # past it: nothing, no IndexError
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "ka", "--max-new-tokens", "4", "--json"]
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0 and out.startswith("ka lo ka lo ka\n"), out
    assert strict_json(out.splitlines()[-1])["completions"][0]["new_tokens"] == 4


def checkpoint_on_its_own_data(tiny_corpus, tmp_path):
    """A tiny untrained checkpoint whose tokenizer is a copy of the tiny corpus's in its own data folder (the
    streams linked), recorded as fit records it (with the file's hash); then that folder's tokenizer is replaced,
    as `prepare --overwrite` with another tokenizer does: (checkpoint, data folder, a copy of the original)."""
    import shutil

    from helpers import record_tokenizer_of

    from epas_lightning.data.tokenizer import file_sha256, train_byte_level_bpe
    from epas_lightning.model import Llama

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "val"):
        (data / name).symlink_to(tiny_corpus / name)
    original = tmp_path / "original.json"
    shutil.copy(tiny_corpus / "tokenizer.json", original)
    shutil.copy(original, data / "tokenizer.json")
    config = LlamaConfig.from_name("debug", n_layer=2, vocab_size=512, block_size=32)
    record = {"path": str(data / "tokenizer.json"), "bos_id": 0, "eos_id": 1, "sha256": file_sha256(original)}
    state = {f"model.{k}": v for k, v in Llama(config).state_dict().items()}
    torch.save({"state_dict": state, "model_config": config.to_dict(), "tokenizer": record}, tmp_path / "m.ckpt")
    texts = ["def main():\n    return 0\n", "import os, sys\n"] * 20
    train_byte_level_bpe(texts, 300).save(str(data / "tokenizer.json"))  # prepared again: another vocabulary
    record_tokenizer_of(data, tiny_corpus)
    return tmp_path / "m.ckpt", data, original


def test_a_checkpoint_whose_tokenizer_file_changed_since_it_trained_is_refused(tiny_corpus, tmp_path, capsys):
    """A data folder prepared again in place: `generate` decoded with the new tokenizer and `export` shipped it,
    `evaluate` scored the new ids, all without a word. Weight-only `consolidate` goes on without the tokenizer."""
    ckpt, data, original = checkpoint_on_its_own_data(tiny_corpus, tmp_path)
    gen = ["generate", "--checkpoint", str(ckpt), "--prompt", "def", "--max-new-tokens", "2", "--device", "cpu"]
    refusal = "tokenizer file changed since the checkpoint trained (its data folder prepared again?): the model's "
    for argv in (gen, ["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and refusal in err and f" — {data / 'tokenizer.json'} — restore it, or pass --tokenizer" in err
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--batches", "1")
    assert rc == 2 and "the data the checkpoint trained on was prepared again since" in err, err
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--data", str(data))
    assert rc == 2 and f"tokenizer {data / 'tokenizer.json'} changed since the checkpoint was saved" in err, err
    rc, _, err = run_cli(capsys, "consolidate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "c"))
    assert rc == 0 and "changed since (" in err and not (tmp_path / "c" / "tokenizer.json").exists()
    rc, out, err = run_cli(capsys, *gen, "--tokenizer", str(original))  # the original: no word
    assert rc == 0 and out.startswith("def") and "not the tokenizer" not in err, err
    rc, _, err = run_cli(capsys, *gen, "--checkpoint", str(tmp_path / "c"), "--tokenizer", str(data))
    assert rc == 0 and f"--tokenizer {data} is not the tokenizer the checkpoint trained with (its hash" in err, err


def test_a_tokenizer_override_is_warned_about_only_when_it_tokenizes_otherwise(tmp_path, caplog):
    """`--tokenizer` took any tokenizer whose vocabulary fits; the tokenizer.json export writes from a sentencepiece
    model is the same vocabulary (no warning), a BPE of as many tokens is not (one line naming a text it splits
    otherwise)."""
    from helpers import train_tiny_sentencepiece

    from epas_lightning.checkpoint import _info
    from epas_lightning.data.tokenizer import file_sha256, train_byte_level_bpe
    from epas_lightning.hf.export import export_tokenizer
    from epas_lightning.model import Llama

    sentencepiece = train_tiny_sentencepiece(tmp_path / "tokenizer.model")
    (tmp_path / "hf").mkdir()
    export_tokenizer(sentencepiece, tmp_path / "hf", 32, None, None)
    other = train_tiny_sentencepiece(tmp_path / "other.model", add_dummy_prefix=False)  # as many tokens
    bpe = tmp_path / "bpe.json"
    train_byte_level_bpe(["ka lo mine su tari po anel or"] * 20, 300).save(str(bpe))
    record = {"path": str(sentencepiece), "sha256": file_sha256(sentencepiece)}
    info = _info({"tokenizer": record}, Llama(LlamaConfig.from_name("debug", n_layer=2, vocab_size=512)))
    with caplog.at_level("WARNING", logger="epas_lightning"):
        assert info.tokenizer_file(tmp_path / "hf") == tmp_path / "hf" / "tokenizer.json"
        assert not caplog.text
        assert info.tokenizer_file(other) == other
        info.tokenizer_file(bpe)
    assert f'--tokenizer {other} is not the tokenizer the checkpoint trained with ("Hello world' in caplog.text
    assert f"--tokenizer {bpe} is not the tokenizer the checkpoint trained with (278 tokens, not 300 as " in caplog.text


def test_init_from_a_checkpoint_whose_tokenizer_changed_refuses_the_new_data(tiny_corpus, tmp_path):
    """Continual training from our checkpoint compared its data with the tokenizer file it names: after that file's
    folder was prepared again with another tokenizer, the new ids were taken as the ones the weights learned."""
    from epas_lightning.errors import DataError

    ckpt, data, _ = checkpoint_on_its_own_data(tiny_corpus, tmp_path)
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=2, vocab_size=512, block_size=32), init_from=str(ckpt))
    datamodule = TokenDataModule(data_dir=str(data), seq_len=32, batch_size=4, vocab_size=512)
    with pytest.raises(DataError, match=f"tokenizer {data / 'tokenizer.json'} changed since the checkpoint was saved"):
        cpu_trainer(tmp_path / "run", 1).fit(module, datamodule)


def test_commands_say_which_folder_of_a_mixed_run_they_read_held_out_data_from(trained, tiny_corpus, tmp_path, capsys):
    """A checkpoint that does not record what fit validated on (written before it did) records the first folder's
    tokenizer of a run that mixed several: evaluate, bench and analyze read that folder's val split alone, without a
    word, where `--help` said "the data the run trained on" (and fit's validation read every folder's)."""
    state = torch.load(trained, weights_only=True)
    del state["heldout"]  # as written before fit recorded it
    other = tmp_path / "other"
    state["TokenDataModule"]["position_settings"]["streams"].append(str(other / "train"))
    torch.save(state, mixed := tmp_path / "mixed.ckpt")
    says = (
        f"held-out data is the val split of {tiny_corpus.resolve()}, the first of the 2 data folders the run mixed, "
        f"not their mixture; pass --data for another ({other})"
    )
    for command, args in (
        ("evaluate", []),
        ("analyze", ["--output", str(tmp_path / "analysis")]),
        ("bench", ["--output", str(tmp_path / "bench"), "--reps", "1", "--prompt-len", "8", "--max-new-tokens", "2"]),
    ):
        rc, _, err = run_cli(capsys, command, "--checkpoint", str(mixed), "--batches", "1", "--device", "cpu", *args)
        assert rc == 0 and f"{command}: {says}" in err, err
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(trained), "--batches", "1", "--device", "cpu")
    assert rc == 0 and "held-out data is" not in err  # one folder: nothing to say


def other_data(tiny_corpus, tmp_path):
    """A data folder prepared with the tiny corpus's tokenizer whose val split is other text (the corpus's train
    split, linked)."""
    import shutil

    from helpers import record_tokenizer_of

    folder = tmp_path / "other"
    folder.mkdir()
    for name in ("train", "val"):
        (folder / name).symlink_to(tiny_corpus / "train")
    shutil.copy(tiny_corpus / "tokenizer.json", folder / "tokenizer.json")
    record_tokenizer_of(folder, tiny_corpus)
    return folder


@pytest.mark.parametrize("validated_on", ["val_dir", "mixture"])
def test_commands_read_the_held_out_data_fit_validated_on(trained, tiny_corpus, tmp_path, capsys, validated_on):
    """A run that validated on a data.val_dir was scored by evaluate, bench and analyze on its data folder's val split
    without a word; one that mixed folders (fit validates on all their val splits) on the first folder's, with a note
    that consolidate lost and export had no data at all. The checkpoint records what fit validated on, consolidate and
    export carry it, and the commands read it as fit did: its val/loss again."""
    from epas_lightning.hf.export import export

    other = other_data(tiny_corpus, tmp_path)
    dirs, val_dir = ([str(tiny_corpus), str(other)], None) if validated_on == "mixture" else (str(tiny_corpus), other)
    data = TokenDataModule(dirs, seq_len=32, batch_size=4, vocab_size=512, val_dir=val_dir and str(val_dir), seed=5)
    data.setup("validate")
    state = torch.load(trained, weights_only=True)
    state["heldout"] = data.heldout().to_record()  # as fit records it (test_inspect checks it does)
    state["last_validation"] = {"loss": 5.0, "step": 6}
    torch.save(state, ckpt := tmp_path / "run.ckpt")
    config = LlamaConfig.from_name("debug", n_layer=4, block_size=32)
    trainer = cpu_trainer(tmp_path, 1, limit_val_batches=2)
    loss = trainer.validate(EPASModule(config), datamodule=data, ckpt_path=ckpt)[0]["val/loss"]
    if validated_on == "val_dir":  # a resume with other held-out data (restored as fit does) paired its loss with them
        trainer.save_checkpoint(tmp_path / "same.ckpt")
        assert torch.load(tmp_path / "same.ckpt", weights_only=True)["last_validation"] == state["last_validation"]
        plain = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=512, seed=5)
        cpu_trainer(tmp_path, 1, limit_val_batches=1).validate(EPASModule(config), datamodule=plain, ckpt_path=ckpt)
        plain.trainer.save_checkpoint(tmp_path / "other.ckpt")
        resaved = torch.load(tmp_path / "other.ckpt", weights_only=True)
        assert resaved["heldout"]["val_dir"] is None and "last_validation" not in resaved
    exported = export(consolidate(ckpt, tmp_path / "consolidated"), tmp_path / "hf")
    for checkpoint in (ckpt, tmp_path / "consolidated", exported):
        argv = ["evaluate", "--checkpoint", str(checkpoint), "--batches", "2", "--batch-size", "4", "--json"]
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0 and "held-out data is" not in err, err
        assert json.loads(out.splitlines()[-1])[0]["val_loss"] == pytest.approx(loss, rel=1e-5), checkpoint
    if validated_on == "mixture":  # bench and analyze read it alike (once is enough: the suite's time)
        bench = ["bench", "--checkpoint", str(ckpt), "--output", str(tmp_path / "bench"), "--batches", "2", "--json"]
        rc, out, err = run_cli(capsys, *bench, "--reps", "1", "--prompt-len", "8", "--max-new-tokens", "2")
        summary = json.loads(out.splitlines()[-1])
        assert rc == 0 and summary["rows"][-1]["val_loss"] == pytest.approx(loss, rel=1e-5), err
        assert summary["data"] == [str(tiny_corpus.resolve()), str(other)]  # was "A, B": a path to a reader
        analyze = ["analyze", "--checkpoint", str(ckpt), "--output", str(tmp_path / "analysis"), "--batches", "1"]
        rc, _, err = run_cli(capsys, *analyze)
        assert rc == 0 and f"on {tiny_corpus.resolve()}, {other}\n" in err, err
        assert json.loads((tmp_path / "analysis" / "similarity.json").read_text())["data"] == summary["data"]

    (other / "val").unlink()
    other.rename(tmp_path / "moved")  # gone: the commands say so, and to pass --data
    for checkpoint in (ckpt, exported):
        rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(checkpoint), "--device", "cpu")
        whose = "validated" if val_dir else "trained"
        assert rc == 2 and f"the data the checkpoint {whose} on is gone ({other}) — --data / --tasks —" in err, err


def test_python_validate_of_a_remote_checkpoint_with_val_sharing_layers(trained, tiny_corpus, tmp_path):
    """A remote ``ckpt_path`` (an fsspec URL: Lightning reads it, our local checks cannot) with ``val_sharing_layers``
    was refused before Lightning read it, as a local file that does not exist; its region is checked once loaded."""
    import fsspec

    fsspec.filesystem("memory").pipe("/remote/last.ckpt", trained.read_bytes())
    config = load_model(trained).model.config
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=config.vocab_size)
    for lengths in ([1, 2], [1, 3]):
        sharing = ProgressiveSharing(target=1, val_sharing_layers=lengths)
        trainer = cpu_trainer(tmp_path, 1, [sharing], limit_val_batches=1)
        if lengths == [1, 2]:  # within the region the checkpoint trained: scored
            (scores,) = trainer.validate(EPASModule(config), data, ckpt_path="memory://remote/last.ckpt", verbose=False)
            assert {"val/loss_at_sharing/1", "val/loss_at_sharing/2"} <= scores.keys()
            continue
        with pytest.raises(ConfigError, match=r"3 sharing layers were asked for; the checkpoint's target region has 2"):
            trainer.validate(EPASModule(config), data, ckpt_path="memory://remote/last.ckpt", verbose=False)


def test_a_refused_python_validate_does_not_keep_a_legacy_checkpoint_in_memory(trained, tiny_corpus, tmp_path):
    """``trainer.validate(..., ckpt_path=legacy.ckpt)`` (torch's legacy format, read whole to see its metadata) with
    val_sharing_layers past its region is refused from that read; the read was kept for a next look that never comes
    (Lightning reads the file again, whole), so a notebook held the whole checkpoint after the refusal."""
    from epas_lightning import safe_load

    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(trained, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    config = load_model(trained).model.config
    data = TokenDataModule(tiny_corpus, seq_len=32, batch_size=2, vocab_size=config.vocab_size)
    trainer = cpu_trainer(tmp_path, 1, [ProgressiveSharing(target=1, val_sharing_layers=[1, 3])], limit_val_batches=1)
    with pytest.raises(ConfigError, match=r"3 sharing layers were asked for; the checkpoint's target region has 2"):
        trainer.validate(EPASModule(config), data, ckpt_path=legacy, verbose=False)
    assert safe_load._LEGACY_READS._kept is None
