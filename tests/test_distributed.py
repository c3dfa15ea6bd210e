"""Multi-process training on CPU (gloo): FSDP2 and DDP through region switches, sharded resume, two torchrun nodes.

Every multi-process run is a subprocess (``tests/scripts/distributed_fit.py``): Lightning re-launches ``sys.argv`` for
extra ranks, or (``launched_runs``) both ranks start at once as a launcher would, or two ``torchrun`` "nodes" start
one each (``fit_on_two_torchrun_nodes``). Runs that need no fresh processes of their own follow each other in the same
ranks (``--then``; module fixtures, one xdist group each: see conftest's ``SHARED_FIXTURES``): every test's run that
two ranks started at once train to its end is one of ``launched_runs``, trained once for the module.
One-process runs call the script's ``main`` in the test process (no interpreter to start). The script trains a
4-layer debug model on synthetic tokens; layer 3 starts sharing at step 2, layers 2-3 at step 4.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import no_distributed_state_left
from helpers import cpu_trainer, run_ranks_at_once, write_token_stream
from safetensors.torch import load_file

from epas_lightning.checkpoint import load_consolidated
from epas_lightning.cli import main as cli_main

SCRIPT = Path(__file__).parent / "scripts" / "distributed_fit.py"
MASKS = {0: [], 1: [], 2: [3], 3: [3], 4: [2, 3], 5: [2, 3]}

pytestmark = pytest.mark.slow


LAUNCHED_RANK = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")  # set by a launcher


def clean_env() -> dict[str, str]:
    """This environment without what marks a launched rank (an in-process one-rank run leaves ``LOCAL_RANK``)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHED_RANK}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    return env


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def launched(out: Path, *args: str) -> list[str]:
    """One run of ``launched_runs``: the script's arguments for two ranks writing to ``out``."""
    return ["--out", str(out), "--devices", "2", *args]


@pytest.fixture(scope="module")
def launched_runs(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """The runs of this module's tests that two ranks of the script train to their end, one after the other in one pair
    of processes started together as a launcher starts them (``run_ranks_at_once``, ``--then``): each pair of
    interpreters costs seconds of imports on every rank. Lightning's own re-launch (rank 1 started once rank 0 has
    imported everything) is tested from the CLI and by the read error. Each test reads its folder under the returned
    root; (that root, each rank's (stdout, stderr))."""
    root = tmp_path_factory.mktemp("launched")
    runs = [
        *sharded_run_args(root / "sharded", tiny_corpus),
        *train_loss_run_args(root / "train_loss"),
        *rank_zero_logger_run_args(root / "rank_zero_logger"),
        *checkpoint_named_by_train_loss_run_args(root / "named"),
        *checkpoint_named_in_a_step_run_args(root / "named_in_step"),
        *held_out_counting_run_args(root / "held_out", tiny_corpus),
        *map_style_validation_run_args(root / "map_style"),
        *sigterm_to_rank_one_run_args(root / "sigterm", tiny_corpus),
    ]
    command = [sys.executable, str(SCRIPT), *[arg for i, run in enumerate(runs) for arg in ["--then"][: bool(i)] + run]]
    return root, run_ranks_at_once(command, clean_env(), root / "logs", timeout=600)


def fit_on_two_torchrun_nodes(out: Path, *args: str) -> list[dict]:
    """The script under two ``torchrun`` "nodes" of one process each on localhost (c10d rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "epas-test"]
    cmd = [*launcher, *rendezvous, str(SCRIPT), "--out", str(out), "--devices", "1", "--num-nodes", "2", *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())]
    nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()))
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return ranks(out)


def fit_in_this_process(out: Path, *args: str) -> list[dict]:
    """A one-process run of the script inside pytest (``--devices 1``)."""
    spec = importlib.util.spec_from_file_location("distributed_fit", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(out), *args])
    return ranks(out)


def step_means(rank: dict) -> dict[str, float]:
    """Each optimizer step's mean loss over its micro-batches on this rank (the script's ``micro``)."""
    return {s: sum(step["micro"]) / len(step["micro"]) for s, step in rank["steps"].items()}


def global_losses(ranks: list[dict]) -> list[float]:
    """Mean of the per-rank losses per step (equal token counts: the loss of the global batch)."""
    steps = sorted(ranks[0]["steps"], key=int)
    return [sum(r["steps"][s]["loss"] for r in ranks) / len(ranks) for s in steps]


def assert_switches_on_every_rank(ranks: list[dict]) -> None:
    for rank in ranks:
        assert {int(s): v["shared"] for s, v in rank["steps"].items()} == MASKS
        # sharing layers' q/k get no gradient on any rank; every computing layer's do
        assert {int(s): v["qk_no_grad"] for s, v in rank["steps"].items()} == MASKS


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Two torchrun "nodes" of one process each on localhost (c10d rendezvous) train under FSDP2 (with AC and gradient
    clipping), then under DDP (find_unused_parameters) in the same two processes: each run's rank records."""
    root = tmp_path_factory.mktemp("torchrun")
    ddp = ["--out", str(root / "ddp"), "--devices", "1", "--num-nodes", "2", "--strategy", "ddp"]
    fsdp2_args = ["--clip", "0.5", "--activation-checkpointing", "--log-every", "1"]  # every step's train/loss written
    fsdp2 = fit_on_two_torchrun_nodes(root / "fsdp2", *fsdp2_args, "--then", *ddp)
    return {"fsdp2": fsdp2, "ddp": ranks(root / "ddp")}


def test_fsdp2_two_torchrun_nodes_match_one_rank_through_switches(torchrun_runs, tmp_path):
    """Two torchrun "nodes" of one process each, with AC, train as one rank does."""
    one = fit_in_this_process(tmp_path / "one", "--devices", "1", "--clip", "0.5")
    two = torchrun_runs["fsdp2"]
    assert len(two) == 2 and all(r["world_size"] == 2 for r in two)
    assert_switches_on_every_rank(two)
    # each rank holds half of every sharded parameter
    assert one[0]["local_shapes"]["model.embed_tokens.weight"] == [512, 64]
    assert all(r["local_shapes"]["model.embed_tokens.weight"] == [256, 64] for r in two)
    # same init for any number of ranks, same global batch: fp32 sums in another order only (AC recomputes alike)
    assert global_losses(two) == pytest.approx(global_losses(one), rel=2e-6)
    # train/loss (written at every step) and train/grad_norm are the global batch's, the same on every rank
    for rank in two:
        logged = [rank["steps"][s]["logged"] for s in sorted(rank["steps"], key=int)]
        assert [m["train/loss"] for m in logged] == pytest.approx(global_losses(two), rel=1e-6)
        norms = [one[0]["steps"][s]["logged"]["train/grad_norm"] for s in sorted(rank["steps"], key=int)]
        assert [m["train/grad_norm"] for m in logged] == pytest.approx(norms, rel=1e-5)


def test_ddp_with_find_unused_parameters_matches_one_process(torchrun_runs, tmp_path):
    single = fit_in_this_process(tmp_path / "single", "--devices", "1", "--strategy", "single")
    ddp = torchrun_runs["ddp"]
    assert len(ddp) == 2 and all(r["world_size"] == 2 for r in ddp)
    assert_switches_on_every_rank(ddp)
    assert global_losses(ddp) == pytest.approx(global_losses(single), rel=2e-6)


def train_loss_run_args(root: Path) -> list[list[str]]:
    """5 micro-batches an epoch (steps of 2, 2, 1): plain, stopped after step 5, and with train/loss monitored."""
    common = ["--strategy", "ddp", "--samples", "40", "--accumulate", "2", "--log-every", "2"]
    return [
        launched(root / "plain", *common, "--steps", "6"),
        launched(root / "stopped", *common, "--steps", "6", "--stop-after-step", "5"),
        launched(root / "monitored", *common, "--steps", "3", "--monitor-train-loss"),
    ]


def test_train_loss_is_reduced_over_the_ranks_once_where_it_is_written(launched_runs):
    """``train/loss`` was all-reduced at every micro-batch of every rank (a barrier and a collective; on CUDA a stream
    wait), though the loggers write it every ``log_every_n_steps`` steps. Now once, at the last micro-batch of a step
    the loggers write (every 2nd here; a stop makes Lightning write its step too), or at every micro-batch where a
    callback decides on it; the loggers still get the mean over the ranks of the step's mean over its micro-batches (an
    epoch's short last step too), and between the steps they write the progress bar shows this rank's."""
    root = launched_runs[0] / "train_loss"
    for run, written, reduced in [
        ("plain", [1, 3, 5], dict.fromkeys([1, 3, 5], 1)),
        ("stopped", [1, 3, 4], dict.fromkeys([1, 3, 4], 1)),  # stopped after step index 4: Lightning writes it
        ("monitored", [1], {0: 2, 1: 2, 2: 1}),  # EarlyStopping may read it at any micro-batch (a validation's)
    ]:
        two = ranks(root / run)
        means = [step_means(rank) for rank in two]
        for rank, own in zip(two, means, strict=True):
            assert {s: len(step["micro"]) for s, step in rank["steps"].items()} == dict(
                zip(map(str, range(len(own))), [2, 2, 1, 2, 2, 1], strict=False)
            )
            assert {int(s): n for s, n in rank["loss_reduces"].items() if n} == reduced, run
            logged = rank["logged_train_loss"]
            assert sorted(map(int, logged)) == written, run
            for s in logged:
                assert logged[s] == pytest.approx((means[0][s] + means[1][s]) / 2, rel=1e-6), (run, s)
            if run == "plain":
                for s in ("0", "2", "4"):  # not written: this rank's own
                    assert rank["steps"][s]["logged"]["train/loss"] == pytest.approx(own[s], rel=1e-6)
                assert means[0]["0"] != pytest.approx(means[1]["0"])


def rank_zero_logger_run_args(root: Path) -> list[list[str]]:
    """A logger on rank zero alone, under DDP, then FSDP2."""
    common = ["--steps", "4", "--log-every", "2", "--logger-on-rank-zero"]
    return [launched(root / "ddp", "--strategy", "ddp", *common), launched(root / "fsdp2", *common)]


def test_a_logger_on_rank_zero_alone_neither_hangs_nor_loses_the_mean_over_the_ranks(launched_runs):
    """A logger made on rank zero alone (``logger=... if rank_zero_only.rank == 0``) made only rank zero reduce
    ``train/loss`` (and, under FSDP2, the gradient norm) at the steps it writes: the other rank never joined the
    collective and the run hung. Every rank now decides alike; rank zero's logger gets the mean over the ranks."""
    root = launched_runs[0] / "rank_zero_logger"
    for run in ("ddp", "fsdp2"):
        two = ranks(root / run)
        assert "logged_train_loss" not in two[1]
        means = [step_means(rank) for rank in two]
        logged = two[0]["logged_train_loss"]
        assert sorted(map(int, logged)) == [1, 3], run
        for s in logged:
            assert logged[s] == pytest.approx((means[0][s] + means[1][s]) / 2, rel=1e-6), (run, s)


NAMED_BY_TRAIN_LOSS = ["--ckpt-filename", "{step}-loss{train/loss:.6f}"]  # a ModelCheckpoint's filename


def checkpoint_named_by_train_loss_run_args(root: Path) -> list[list[str]]:
    args = ["--strategy", "ddp", "--steps", "3", "--ckpt-dir", str(root / "ckpt"), "--ckpt-every", "1"]
    return [launched(root / "run", *args, *NAMED_BY_TRAIN_LOSS)]


def test_a_checkpoint_named_by_train_loss_has_one_name_on_every_rank(launched_runs):
    """A ``ModelCheckpoint`` whose ``filename`` holds ``{train/loss}`` (no monitor, no logger) named its file with each
    rank's own loss once ``train/loss`` was reduced only at the steps Lightning writes: rank zero wrote its name, the
    other rank's ``best_model_path`` named a file that does not exist (``validate(ckpt_path="best")`` failed there).
    Now the value is the mean over the ranks at every step such a checkpoint may save."""
    ckpt, two = launched_runs[0] / "named" / "ckpt", ranks(launched_runs[0] / "named" / "run")
    means = [step_means(rank) for rank in two]
    mean = (means[0]["2"] + means[1]["2"]) / 2
    named = [rank["best_model_path"] for rank in two]
    assert named == [str(ckpt / f"step=3-losstrain/loss={mean:.6f}.ckpt")] * 2
    assert Path(named[0]).is_file()


def checkpoint_named_in_a_step_run_args(root: Path) -> list[list[str]]:
    args = ["--strategy", "ddp", "--steps", "2", "--accumulate", "3", "--val-every", "4", "--ckpt-every", "0"]
    return [launched(root / "run", *args, "--ckpt-dir", str(root / "ckpt"), *NAMED_BY_TRAIN_LOSS)]


def test_a_checkpoint_named_by_train_loss_in_a_validation_inside_an_optimizer_step_has_one_name(launched_runs):
    """A validation between two micro-batches of a step (``val_check_interval`` 4 batches, 3 a step) saved a
    ``ModelCheckpoint`` named by ``{train/loss}``, the running mean of the step's micro-batches so far: each rank's own,
    reduced over the ranks only at the step's last micro-batch. Rank one's ``best_model_path`` named no file."""
    ckpt, two = launched_runs[0] / "named_in_step" / "ckpt", ranks(launched_runs[0] / "named_in_step" / "run")
    running = [sum(rank["steps"]["1"]["micro"][:1]) for rank in two]  # step 1's first micro-batch: batch 4
    named = [rank["best_model_path"] for rank in two]
    assert named == [str(ckpt / f"step=1-losstrain/loss={sum(running) / 2:.6f}.ckpt")] * 2
    assert Path(named[0]).is_file()


@pytest.mark.parametrize("precision,weights", [("bf16-true", "bfloat16"), ("bf16-mixed", "float32")])
def test_fsdp2_bf16_keeps_the_weights_of_its_precision(tmp_path, precision, weights):
    """bf16-true trains bf16 weights; bf16-mixed (here with AC) keeps fp32 master weights, through the switches."""
    (run,) = fit_in_this_process(tmp_path, "--devices", "1", "--precision", precision, "--activation-checkpointing")
    assert run["param_dtype"] == f"torch.{weights}" and sorted(run["steps"], key=int) == [str(s) for s in range(6)]
    assert_switches_on_every_rank([run])
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in run["steps"].values())


@pytest.fixture(scope="module")
def sharded_runs(launched_runs: tuple[Path, list[tuple[str, str]]]) -> Path:
    """The folder of ``sharded_run_args``'s runs."""
    return launched_runs[0] / "sharded"


def sharded_run_args(root: Path, tiny_corpus: Path) -> list[list[str]]:
    """Three runs on two FSDP2 ranks: the sharded-resume test's first run (from a tied Qwen2, ``hf/``; validated after
    fit on ``val/``) and its resume (``full/``, ``resumed/``), then the init_from test's run (``init/two/``) from the
    sources made here first (``init/``)."""
    from test_hf import save_tiny_hf

    hf, ckpt = save_tiny_hf(root / "hf", tie=True, kind="Qwen2", num_hidden_layers=4), root / "ckpt"
    common = ["--activation-checkpointing", "--data-dir", str(tiny_corpus), "--init-from", str(hf)]
    saves = ["--save-start", str(root / "start.st"), "--save-final", str(root / "final.st")]
    one_by_one = ["--init-read-bytes", "1"]  # init_from hands each rank its shards a tensor (and tied head) at a time
    val = write_token_stream(root / "val", [13 * 33])  # 13 held-out sequences of 33 tokens: 7 and 6 on two ranks
    first = [*common, *one_by_one, "--ckpt-dir", str(ckpt), *saves, "--val-dir", str(val)]  # a resumable loader
    resume = launched(root / "resumed", *common, "--resume", str(ckpt / "epoch=0-step=3.ckpt"))
    init = root / "init"
    with no_distributed_state_left():  # FSDP2's one-device fits leave a process group and a rank's environment
        sharded, checkpoint, consolidated = init_from_sources(init)
    run = launched(init / "two", "--precision", "bf16-true", "--steps", "1", "--init-from", str(sharded))
    run += ["--init-read-bytes", "20000", "--save-start", str(init / "start.st")]
    run += ["--reload", str(checkpoint), "--reload", str(consolidated), "--read-fails-on-rank", "1"]
    return [launched(root / "full", *first), resume, run]


def init_from_sources(root: Path) -> tuple[Path, Path, Path]:
    """Two steps of one bf16-true FSDP2 rank and of one fp32 process: the sharded folder and the .ckpt they save, and
    the folder consolidated from the sharded one; ``bf16.st``/``fp32.st`` hold their trained weights."""
    bf16, fp32 = root / "bf16", root / "fp32"
    source = ["--devices", "1", "--steps", "2", "--ckpt-every", "2"]
    fit_in_this_process(bf16, *source, "--precision", "bf16-true", "--ckpt-dir", str(bf16 / "ckpt"),
                        "--save-final", str(root / "bf16.st"))  # fmt: skip
    fit_in_this_process(fp32, *source, "--strategy", "single", "--ckpt-dir", str(fp32 / "ckpt"),
                        "--save-final", str(root / "fp32.st"))  # fmt: skip
    sharded, ckpt = bf16 / "ckpt" / "epoch=0-step=2.ckpt", fp32 / "ckpt" / "epoch=0-step=2.ckpt"
    assert sharded.is_dir() and ckpt.is_file()
    consolidated = root / "consolidated"
    assert cli_main(["consolidate", "--checkpoint", str(sharded), "--output", str(consolidated)]) == 0
    return sharded, ckpt, consolidated


def test_sharded_resume_mid_growth_and_consolidate(sharded_runs):
    """From a tied Qwen2 (init_from, q/k/v biases, streamed a tensor at a time): each rank loads its shard of the HF
    weights, biases and tied head exactly; sharing layers' q/k biases get no grad; the sharded checkpoint resumes (in
    the same two processes) and consolidates."""
    from epas_lightning.hf.convert import config_from_hf, load_hf_state

    root = sharded_runs
    hf, ckpt, mid = root / "hf", root / "ckpt", root / "ckpt" / "epoch=0-step=3.ckpt"
    full = ranks(root / "full")
    assert_switches_on_every_rank(full)
    assert full[1]["init_batches"] == [[]] * len(full[0]["init_batches"])  # rank 0 reads, rank 1 receives
    tied = ["embed_tokens.weight", "lm_head.weight"]
    assert tied in full[0]["init_batches"] and len(full[0]["init_batches"]) > 20
    assert all(len(keys) == 1 or keys == tied for keys in full[0]["init_batches"])
    bias = "model.layers.3._checkpoint_wrapped_module.self_attn.k_proj.bias"  # 32 values: 16 on each rank
    assert all(r["tied"] and r["local_shapes"][bias] == [16] for r in full)
    start, trained = load_file(root / "start.st"), load_file(root / "final.st")
    for name, tensor in load_hf_state(hf, config_from_hf(hf, block_size=32)).items():
        torch.testing.assert_close(start[name], tensor, rtol=0, atol=0, msg=name)
    assert not torch.equal(start["layers.3.self_attn.k_proj.bias"], trained["layers.3.self_attn.k_proj.bias"])
    assert sorted(p.name for p in mid.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed = ranks(root / "resumed")
    assert len(resumed) == 2
    for a, b in zip(full, resumed, strict=True):
        assert sorted(b["steps"], key=int) == ["3", "4", "5"]
        for step in ("3", "4", "5"):
            assert b["steps"][step]["shared"] == a["steps"][step]["shared"]
            assert b["steps"][step]["loss"] == pytest.approx(a["steps"][step]["loss"], rel=1e-6)

    out = root / "consolidated"
    assert cli_main(["consolidate", "--checkpoint", str(ckpt / "epoch=0-step=6.ckpt"), "--output", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["sharing"]["shared_layers"] == [2, 3] and record["model"]["n_layer"] == 4
    model = load_consolidated(out)
    assert model.sharing.shared_layers == [2, 3]
    state = model.state_dict()
    assert sorted(trained) == sorted(state)  # plain Llama keys: no wrapper prefixes
    for name, tensor in trained.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_two_fsdp2_ranks_validate_every_held_out_sequence_once_as_one_device_does(sharded_runs, tiny_corpus):
    """Each rank validated its own part of the held-out data, cut to whole batches: 13 sequences scored 2 x 4 at batch
    size 4, and val/loss came from other sequences at each rank count. Now the ranks' parts (7 and 6, each padded to
    two batches of 4) hold every sequence once: val/loss and val/tokens are one device's at another batch size."""
    from epas_lightning import EPASModule, TokenDataModule
    from epas_lightning.hf.convert import config_from_hf

    root = sharded_runs
    validated = [rank["validated"] for rank in ranks(root / "full")]
    module = EPASModule(config_from_hf(root / "hf", block_size=32))
    module.configure_model()
    module.model.load_state_dict(load_file(root / "final.st"))  # the weights the two ranks validated
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=3, vocab_size=512, val_dir=str(root / "val"))
    (one,) = cpu_trainer(root / "one", 1, limit_val_batches=1.0).validate(module, data, verbose=False)
    assert validated[0] == validated[1] and validated[0]["val/tokens"] == one["val/tokens"] == 13 * 32
    assert validated[0]["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)


def held_out_counting_run_args(root: Path, tiny_corpus: Path) -> list[list[str]]:
    """One DDP step, then a validation of 9 held-out sequences (``val/``) with a throughput monitor."""
    val = write_token_stream(root / "val", [9 * 33])
    data = ["--data-dir", str(tiny_corpus), "--val-dir", str(val), "--steps", "1"]
    run = [*data, "--strategy", "ddp", "--throughput", "--throughput-window", "2", "--log-every", "1"]
    return [launched(root / "two", *run, "--save-final", str(root / "final.st"))]


def test_two_ddp_ranks_count_and_score_every_held_out_sequence_once(launched_runs, tiny_corpus, tmp_path):
    """9 held-out sequences on two DDP ranks at batch size 4 (5 and 4: the first's last batch holds 1, the second's is
    all pad rows): val/loss and val/tokens are one process's (the pad rows score nothing), and the throughput monitor's
    validate/samples and validate/lengths, rank zero's 5 times 2, counted a sequence that does not exist; now every
    rank's real rows. Its validate/batches (rank zero's 2 times 2) and rates over all ranks (rank zero's times 2: over
    the last batch, 2 sequences where 1 was read) counted the second rank's batch of pad rows too; now the real ones.
    Its FLOP rate over all ranks (rank zero's times 2) too: now the FLOPs of every rank's real rows."""
    from epas_lightning import EPASModule, LlamaConfig, TokenDataModule

    root = launched_runs[0] / "held_out"
    val, validated = root / "val", [rank["validated"] for rank in ranks(root / "two")]
    assert {k: validated[0][k] for k in validated[1]} == validated[1]
    logged = validated[0]
    assert (logged["validate/batches"], logged["validate/samples"], logged["validate/lengths"]) == (3, 9, 9 * 32)
    rates = ("batches_per_sec", "samples_per_sec", "items_per_sec", "flops_per_sec")
    for rate in rates:  # the last batch: 1 row on both ranks, as on one
        assert logged[f"validate/{rate}"] == pytest.approx(logged[f"validate/device/{rate}"]), rate
    module = EPASModule(LlamaConfig.from_name("debug", n_layer=4, block_size=32))
    module.configure_model()
    module.model.load_state_dict(load_file(root / "final.st"))  # the weights the two ranks validated
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=3, vocab_size=512, val_dir=str(val))
    (one,) = cpu_trainer(tmp_path / "one", 1, limit_val_batches=1.0).validate(module, data, verbose=False)
    assert validated[0]["val/tokens"] == one["val/tokens"] == 9 * 32
    assert validated[0]["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)


def map_style_validation_run_args(root: Path) -> list[list[str]]:
    """Fit validating a map-style loader of 12 sequences, then of 13."""
    return [launched(root / str(n), "--strategy=ddp", "--steps=4", f"--val-samples={n}") for n in (12, 13)]


def test_two_ddp_ranks_say_once_that_a_map_style_validation_loader_repeats_samples(launched_runs):
    """A map-style validation loader of one's own gets Lightning's DistributedSampler under fit on two ranks: 13
    sequences became 14 (7 a rank), val/loss counting the first one twice, and Lightning warns only in validate and
    test. Fit now says so once (its sanity validation and two more ran), naming the count and the fixes; 12 repeat
    nothing and are not mentioned."""
    outputs = launched_runs[1]  # every run's: no other run says it
    said = [line for line in outputs[0][1].splitlines() if "repeated sample" in line]
    assert len(said) == 1, outputs[0][1][-3000:]
    assert (
        "val/loss during fit counts 1 repeated sample beside the 13 held-out ones of the validation dataloader"
        in (said[0])
    )
    assert "use TokenDataModule" in said[0] and "divisible by 2" in said[0] and "drop_last=True" in said[0]
    assert not any("repeated sample" in line for line in outputs[1][1].splitlines())  # rank zero's alone


def test_init_from_our_checkpoints_on_two_fsdp2_ranks(sharded_runs):
    """Two bf16-true FSDP2 ranks start from a bf16 sharded folder, then (after fit) load a float32 .ckpt and the folder
    consolidated, each streamed in batches of several tensors: the gathered weights are the sources' bit for bit (the
    .ckpt's cast to bf16). Rank 0 alone reads them: rank 1's reader fails if called (every rank used to read)."""
    tmp_path = sharded_runs / "init"
    out = tmp_path / "two"
    two = ranks(out)
    assert len(two) == 2 and all(r["param_dtype"] == "torch.bfloat16" for r in two)
    expected_bf16 = load_file(tmp_path / "bf16.st")
    expected_fp32 = {k: t.to(torch.bfloat16) for k, t in load_file(tmp_path / "fp32.st").items()}
    weights = sorted(k for k in expected_bf16 if k != "sharing.mask")
    for got, expected, batches in [
        (tmp_path / "start.st", expected_bf16, "init_batches"),  # init_from, before the first step
        (out / "reload0.st", expected_fp32, "reload0_batches"),  # into the trained shards
        (out / "reload1.st", expected_bf16, "reload1_batches"),
    ]:
        assert two[1][batches] == [[]] * len(two[0][batches])  # the same collectives; rank 1 gets them from rank 0
        assert 1 < len(two[0][batches]) < len(weights) and sorted(sum(two[0][batches], [])) == weights
        loaded = load_file(got)
        for name in weights:
            assert loaded[name].dtype == torch.bfloat16, name
            torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0, msg=f"{got.name}: {name}")


def test_a_read_error_on_rank_zero_stops_both_ranks_alike(tmp_path):
    """Rank 0's read of init_from fails after three of its batches (a corrupt file): it tells rank 1, and both
    processes end with the same one-line error and status 2. Rank 1 used to wait for rank 0's next batch in a
    collective (or fail with a broken-connection traceback), as its own read went on."""
    from test_hf import save_tiny_hf

    hf = save_tiny_hf(tmp_path / "hf", num_hidden_layers=4)
    out = tmp_path / "run"
    args = ["--out", str(out), "--init-from", str(hf), "--init-read-bytes", "1", "--steps", "1"]
    args += ["--read-fails-on-rank", "0", "--read-fails-after", "3"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=90,
                          env=clean_env())  # fmt: skip
    line = "error: cannot be read (a test's failing reader) — rank 0 — nothing: a test\n"
    assert proc.returncode == 2 and proc.stderr.count(line) == 2, proc.stderr[-4000:]  # once by each process
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "child_exits.json").read_text()) == [2]


def test_a_one_device_checkpoint_resumes_under_fsdp2(tiny_corpus, tmp_path):
    """A one-device checkpoint numbers AdamW's state in the optimizer's order (matrices, then norm gains); Lightning
    took the numbers for the model's parameter order, and FSDP2's resume of it failed with a size-mismatch traceback
    (or would have given one parameter another's moments). One rank here; two ranks take the same path."""
    ckpt, data = tmp_path / "ckpt", ["--data-dir", str(tiny_corpus)]  # a resumable loader: the same batches
    (single,) = fit_in_this_process(tmp_path / "single", "--devices", "1", "--strategy", "single", *data,
                                    "--ckpt-dir", str(ckpt))  # fmt: skip
    resume = ["--resume", str(ckpt / "epoch=0-step=3.ckpt")]
    (sharded,) = fit_in_this_process(tmp_path / "fsdp2", "--devices", "1", *data, *resume)
    assert sorted(sharded["steps"], key=int) == ["3", "4", "5"]
    for step in ("3", "4", "5"):  # the loss after each resumed update follows AdamW's restored moments
        assert sharded["steps"][step]["loss"] == pytest.approx(single["steps"][step]["loss"], rel=1e-5)


def test_two_rank_fsdp2_fit_from_the_cli_reports_true_held_out_loss_and_resumes(tiny_corpus, tmp_path):
    """From the CLI on two FSDP2 ranks: the end-of-fit summary neither hangs nor crashes on a collective only rank 0
    joins; held-out metrics log without Lightning's sync warning and are real numbers (meta-device materialisation
    used to leave the metrics' states, and the defaults they reset to, as uninitialised memory); the sharded
    last.ckpt resumes, here in two ranks started at once as torchrun or a scheduler starts them (Lightning starts
    rank 1 of the first run). (Plain DDP from the CLI: the SIGTERM test below.)"""
    strategy = "fsdp2"
    args = ["fit", "--config", "debug", f"--trainer.strategy={strategy}", "--trainer.devices=2"]
    args += ["--trainer.accelerator=cpu", "--trainer.max_steps=6", "--trainer.val_check_interval=3"]
    env = clean_env() | {"EPAS_CACHE_DIR": str(tiny_corpus.parent)}

    def run_fit(*more: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "epas_lightning", *args, *more]
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        check(proc)
        return proc

    proc = run_fit()
    assert "step 4: 1 sharing layer(s)" in proc.stderr and "sync_dist" not in proc.stderr
    assert proc.stdout.count("Run finished: 6 optimizer steps") == 1
    assert "logs         runs/debug/version_0" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "debug" / "version_0")).Reload()
    losses = [e.value for e in events.Scalars("val/loss")]
    assert len(losses) == 2 and all(5.5 < loss < 7.0 for loss in losses), losses  # ln(512) = 6.24 at init
    # resume the sharded last.ckpt: said once, read without torch's one-process warning
    args[args.index("--trainer.max_steps=6")] = "--trainer.max_steps=8"
    command = [sys.executable, "-m", "epas_lightning", *args, "--ckpt_path", "last"]
    resumed = run_ranks_at_once(command, env, tmp_path / "resumed", cwd=tmp_path)
    stdout, stderr = "".join(out for out, _ in resumed), "".join(err for _, err in resumed)
    assert stderr.count("Resuming from runs/debug/version_0/checkpoints/last.ckpt") == 1
    assert "Warning" not in stderr and "Run finished: 8 optimizer steps" in stdout
    # tokens trained: both ranks' 4 x 32 a step, counted on from the sharded checkpoint (two sessions, one count)
    events = EventAccumulator(str(tmp_path / "runs" / "debug" / "version_0")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/lengths")] == [(s, 256 * (s + 1)) for s in range(8)]


def test_sigterm_to_the_first_rank_stops_every_rank_after_one_step_with_a_checkpoint(tiny_corpus, tmp_path):
    """A scheduler's SIGTERM (here to rank 0 only) stops both DDP ranks after the same optimizer step; they save
    last.ckpt together and the run exits 143, with no collective broken on the way. Plain ``strategy=ddp``
    (find_unused_parameters off) trains on past the first sharing step, and the summary is printed once."""
    import signal

    from helpers import signal_fit_once_training

    args = ["fit", "--config", "debug", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    args += ["--trainer.max_steps=100000", "--trainer.val_check_interval=1000"]
    env = clean_env() | {"EPAS_CACHE_DIR": str(tiny_corpus.parent)}
    code, out, err = signal_fit_once_training(args, tmp_path, env, signal.SIGTERM)
    assert code == 143, err[-4000:]
    assert "EPAS: DDP set to find_unused_parameters=True" in err and "EPAS: step 4: 1 sharing layer(s)" in err
    assert "Traceback" not in err and "Error" not in err, err[-4000:]
    step = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    last = tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step and out.count(f"Run finished: {step} optim") == 1


def test_slurms_requeue_signal_to_two_srun_tasks_saves_once_and_rank_zero_requeues_the_job(tiny_corpus, tmp_path):
    """Two FSDP2 ranks started as srun's tasks (a simulated SLURM job, with an scontrol that logs its calls), both sent
    SIGUSR1 as `#SBATCH --signal=USR1@...` does: they stop after the same step with one sharded last.ckpt, the first
    rank alone requeues the job, both exit 138; the requeued job's `--ckpt_path auto` resumes that checkpoint."""
    import threading

    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$SLURM_PROCID $@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "77", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip
    env = clean_env() | slurm | {"EPAS_CACHE_DIR": str(tiny_corpus.parent), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{scontrol.parent}{os.pathsep}{env['PATH']}"
    args = ["fit", "--config", "debug", "--trainer.strategy=fsdp2", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    args += ["--trainer.val_check_interval=1000", "--trainer.num_sanity_val_steps=0", "--ckpt_path", "auto"]

    def start_tasks(max_steps: int, restarts: int) -> list[subprocess.Popen]:
        """The job's two tasks; rank 0's stderr is piped, the rest goes to files (a full pipe would block a rank)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "epas_lightning", *args, f"--trainer.max_steps={max_steps}"]
        tasks = []
        for rank in range(2):
            task_env = env | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "MASTER_PORT": str(port)}
            task_env["SLURM_RESTART_COUNT"] = str(restarts)
            log = tmp_path / f"task{rank}-run{restarts}"
            with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
                stderr = subprocess.PIPE if rank == 0 else err
                tasks.append(
                    subprocess.Popen(command, cwd=tmp_path, env=task_env, stdout=out, stderr=stderr, text=True)
                )
        return tasks

    tasks = start_tasks(100000, 0)
    watchdog = threading.Timer(300, lambda: [task.kill() for task in tasks])
    watchdog.start()
    lines = []
    for line in tasks[0].stderr:  # to the end of rank 0's output
        lines.append(line)
        if "EPAS: step 4:" in line:  # training is under way: SLURM signals every task
            for task in tasks:
                task.send_signal(signal.SIGUSR1)
    codes = [task.wait() for task in tasks]
    watchdog.cancel()
    err = "".join(lines)
    assert codes == [138, 138], err[-4000:] + (tmp_path / "task1-run0.err").read_text()[-4000:]
    assert (tmp_path / "scontrol.log").read_text() == "0 requeue 77\n"
    step = int(err.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    last = tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == step
    requeued = start_tasks(step + 1, 1)
    outputs = [task.communicate(timeout=300)[1] for task in requeued]
    assert [task.returncode for task in requeued] == [0, 0], outputs[0][-4000:]
    assert "Resuming from runs/debug/version_0/checkpoints/last.ckpt" in outputs[0]


def sigterm_to_rank_one_run_args(root: Path, tiny_corpus: Path) -> list[list[str]]:
    """FSDP2 stopped by a SIGTERM to rank 1 in step 3, resumed from its last.ckpt; then the run never stopped."""
    ckpt, common = root / "ckpt", ["--data-dir", str(tiny_corpus), "--steps", "5"]
    signal = ["--sigterm-in-step", "3", "--sigterm-rank", "1", "--ckpt-dir", str(ckpt), "--ckpt-every", "100"]
    resume = launched(root / "resumed", *common, "--resume", str(ckpt / "last.ckpt"))
    return [launched(root / "stopped", *common, *signal), resume, launched(root / "whole", *common)]


def test_a_sigterm_to_rank_one_alone_stops_and_resumes_as_the_uninterrupted_run(launched_runs):
    """SIGTERM to the second FSDP2 rank alone (DDP's first rank: the CLI test above) stops both ranks after the same
    step with one sharded last.ckpt; resumed from it (in the same two processes), they train the steps left as the run
    never stopped does: the same losses and sharing layers on each rank, through the growth at step 4."""
    root = launched_runs[0] / "sigterm"
    stopped, resumed = ranks(root / "stopped"), ranks(root / "resumed")
    assert [sorted(rank["steps"], key=int) for rank in stopped + resumed] == [["0", "1", "2"]] * 2 + [["3", "4"]] * 2
    for first, second, whole in zip(stopped, resumed, ranks(root / "whole"), strict=True):
        for step, record in {**first["steps"], **second["steps"]}.items():
            assert record["shared"] == whole["steps"][step]["shared"], step
            assert record["loss"] == pytest.approx(whole["steps"][step]["loss"], rel=1e-6), step


@pytest.mark.parametrize(
    "command, sanity_steps",
    [("fit", 2), ("fit", 0), ("validate", 0)],
    ids=["sanity validation", "no sanity validation", "validate"],
)
def test_a_sigterm_to_rank_one_alone_before_training_stops_fit_before_training(
    tiny_corpus, tmp_path, command, sanity_steps
):
    """A SIGTERM to rank 1 alone in the sanity validation hung the run: Lightning's handler, which answered it there,
    broadcasts from rank 0 inside the signal handler, a collective rank 0 never joined. So did one in the first hook
    after Lightning registered that handler (here the sanity validation's start, or without one training's, in a
    callback before ``GracefulStop``), which answered from then until its own replaced it. Both ranks now stop before
    training as in set-up (exit 143, nothing saved), and the command says so once, where each rank said it. So did
    ``validate`` (its validation's start): both ranks now stop after the first held-out batch, its run folder
    removed."""
    from epas_lightning.sigterm_in_setup import STOPPED_IN_SETUP

    env = clean_env() | {"EPAS_CACHE_DIR": str(tiny_corpus.parent)}
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)
    args = [command, "--config", "debug", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    args += ["--trainer.callbacks+=helpers.SignalBeforeTraining", "--trainer.callbacks.rank=1"]
    args += ["--trainer.callbacks.batch=start", f"--trainer.num_sanity_val_steps={sanity_steps}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "epas_lightning", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: Lightning starts rank 1 in this session
        out, err = proc.communicate()
        pytest.fail(f"the run hung:\n{err[-3000:]}")
    assert proc.returncode == 143, err[-4000:]
    said = STOPPED_IN_SETUP if command == "fit" else "SIGTERM"
    assert err.count(f"interrupted: {command} stopped (") == 1 and f"stopped ({said})" in err, err[-4000:]
    assert "Traceback" not in err and "EPAS: step" not in err and not list(tmp_path.rglob("*.ckpt")), err[-4000:]
    assert command == "fit" or not (tmp_path / "runs").exists()


def test_an_error_on_rank_zero_ends_the_ranks_it_started(tiny_corpus, tmp_path):
    """Rank 0 fails with a user error while rank 1 is stuck (as in an NCCL collective, which waits out its timeout):
    the command says it in one line and exits 2, and rank 1 is gone within seconds instead of outliving it."""
    pid_file = tmp_path / "rank1.pid"
    scripts = Path(__file__).parent / "scripts"
    env = clean_env() | {"EPAS_CACHE_DIR": str(tiny_corpus.parent), "EPAS_TEST_PID_FILE": str(pid_file)}
    env["PYTHONPATH"] += os.pathsep + str(scripts)
    args = ["fit", "--config", "debug", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    args += ["--trainer.logger=false", "--trainer.callbacks+=rank_failure.FailOnRankZero"]
    command = [sys.executable, "-m", "epas_lightning", *args]
    try:
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=90, env=env)
        hung = None
    except subprocess.TimeoutExpired as timeout:
        proc, hung = None, timeout  # rank 0's teardown waited for rank 1
    try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        alive = True
    except ProcessLookupError:
        alive = False
    assert hung is None, f"rank 0 did not exit after its error: {hung.stderr!r:.4000}"
    assert not alive, "rank 1 outlived rank 0's error"
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "error: a failure only rank 0 sees — rank 0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "failing, where",
    [
        ("FailOnRankOne", "rank 0, whose collective broke (Connection closed by peer)"),
        ("FailOnRankOneAtStart", "rank 0, which waited for it to join"),
    ],
    ids=["in training", "before it joins"],
)
def test_a_user_error_on_rank_one_alone_is_one_line_with_its_status(failing, where, tiny_corpus, tmp_path):
    """Rank 1 alone meets a user error and says it; rank 0 ends with one line of its own that points at rank 1's error,
    and the command exits with rank 1's status.

    In training, rank 0's next collective breaks ("Connection closed by peer"): it used to print a 160-line traceback
    under that line and exit 1. It meets the break only after Lightning's observer has polled (its step is long), which
    SIGKILLed it then, without its line (status -9): now it has time to say it. Before it joins, rank 0 waits for rank
    1 in the rendezvous and cannot answer by itself: Lightning's observer SIGKILLed every rank within its 5 s poll,
    rank 0 without a word (status -9, 137 from a shell); now the observer of the ranks rank 0 started, from their
    start, ends it with its line at once."""
    scripts = Path(__file__).parent / "scripts"
    env = clean_env() | {"EPAS_CACHE_DIR": str(tiny_corpus.parent)}
    env["PYTHONPATH"] += os.pathsep + str(scripts)
    args = ["fit", "--config", "debug", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    args += ["--trainer.logger=false", f"--trainer.callbacks+=rank_failure.{failing}"]
    command = [sys.executable, "-m", "epas_lightning", *args]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-4000:])
    assert "Forcefully terminating" not in proc.stderr, proc.stderr[-4000:]  # Lightning's observer: it killed no rank
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "cannot read the data folder — rank 1" in errors[0], proc.stderr[-4000:]  # rank 1's
    if failing == "FailOnRankOne":  # read when training: a line of its own (at start, jsonargparse wraps it)
        assert errors[0] == "error: cannot read the data folder — rank 1 — make it readable on every node", errors
    assert errors[1] == (
        f"error: rank 1 ended (exit status 2) during the run — {where} — its own error, above, says why: fix that, "
        "then run again"
    ), proc.stderr[-4000:]


UNANSWERED = """
import subprocess, sys, time
import torch.distributed as dist
from epas_lightning.child_ranks import watch_patiently
if {joined}:  # past the rendezvous: waiting where it cannot answer (a native collective), or meeting the failure
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # rank 1: waits for the others
procs = [stuck, subprocess.Popen([sys.executable, "-c", "raise SystemExit({status})"])]  # rank 2 fails
watch_patiently(procs, {answer}, 0)
time.sleep({wait})  # a collective or a rendezvous that never ends, or (short) the time to meet the failure
procs.clear()  # the answer: EndChildRanksOnError.on_exception empties the list
time.sleep(6)  # the observer's next poll: it kills nothing
print("answered", stuck.poll())
stuck.kill()
"""


@pytest.mark.parametrize(
    "joined, status, answer, wait",
    [(True, 2, 0.5, 60), (True, 143, 0.5, 60), (True, 2, 0.5, 0), (False, 2, 600, 600), (False, 130, 600, 600)],
    ids=["user error", "stopped", "answered", "user error in the rendezvous", "Ctrl+C in the rendezvous"],
)
def test_the_observer_ends_a_rank_that_does_not_answer_a_failed_child_with_its_status(
    joined, status, answer, wait, tmp_path
):
    """The rank that started a child which failed, and has not answered it within its time (it waits where it cannot),
    exits with the child's status and one line pointing at the child's error, not at a stuck child the observer ended;
    no line after a child a signal stopped at once (it said so itself). A rank that answers in time is left to do so,
    with nothing killed. One that has not joined the process group waits in the rendezvous, which it cannot leave to
    answer: it is ended at once, not after its time (Ctrl+C as a run starts took 20 s, where Lightning took 5)."""
    script = UNANSWERED.format(joined=joined, status=status, answer=answer, wait=wait)
    command = [sys.executable, "-c", script, str(tmp_path / "rendezvous")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_env())
    if not wait:
        assert proc.returncode == 0 and proc.stdout == "answered None\n" and not proc.stderr, proc.stderr
        return
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr
    waited = "which still waited for it 0.5 s later" if joined else "which waited for it to join"
    said = f"error: rank 2 ended (exit status 2) during the run — rank 0, {waited} — "
    assert proc.stderr == (f"{said}its own error, above, says why: fix that, then run again\n" if status == 2 else "")


ANSWERING = """
import subprocess, sys
from types import SimpleNamespace
import torch.distributed as dist
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from epas_lightning.child_ranks import EndChildRanksOnError, watch_patiently
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])  # rank 1
stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # rank 2: in a native collective
failed.wait()
launcher = object.__new__(_SubprocessScriptLauncher)
launcher.procs = [failed, stuck]
watch_patiently(launcher.procs, 1.0, 0)  # it sees the failure at its first poll (5 s), and waits 1 s for the answer
watcher = EndChildRanksOnError(grace_seconds=8.0)  # rank 0 met the failure at once; rank 2 gets its grace to end
trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), global_rank=0, num_nodes=1, callbacks=[watcher])
watcher.on_exception(trainer, None, RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
print("answered", watcher.failed_children, stuck.returncode)
"""


def test_the_observer_leaves_an_answer_under_way_to_end_as_it_would(tmp_path):
    """Rank 0 met a child's failure (its collective broke) and gives the other ranks their grace to end: that is its
    answer, which the observer's time for one ran out in the middle of. The observer ended rank 0 there, with its
    own line ("which still waited for it") in place of rank 0's, which may say another error (a full disk). Now the
    answer, once begun, runs to its end: rank 0 names the failed child, and the stuck one is killed after its grace."""
    command = [sys.executable, "-c", ANSWERING, str(tmp_path / "rendezvous")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "answered [(1, 2)] -9\n", ""), proc.stderr


INTERRUPTED_ANSWER = """
import signal, subprocess, sys
from types import SimpleNamespace
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from epas_lightning.child_ranks import EndChildRanksOnError
stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # rank 1: in a native collective
launcher = object.__new__(_SubprocessScriptLauncher)
launcher.procs = [stuck]
trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), global_rank=0, num_nodes=1, callbacks=[])
signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl+C, 1 s into the grace
signal.alarm(1)
try:
    EndChildRanksOnError(grace_seconds=30).on_exception(trainer, None, RuntimeError("a failure only rank 0 sees"))
except KeyboardInterrupt:
    print("interrupted", stuck.poll(), launcher.procs)
"""


def test_ctrl_c_in_the_grace_after_an_error_ends_the_ranks_it_started():
    """Ctrl+C while rank 0 gives the ranks it started their grace after its error: the list the observer watches is
    already emptied (the answer is under way), so no observer would end them; the answer ends them itself."""
    command = [sys.executable, "-c", INTERRUPTED_ANSWER]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_env())
    assert (proc.returncode, proc.stdout) == (0, "interrupted -9 []\n"), proc.stderr


@pytest.mark.parametrize("child_status", [0, 2, 143])
def test_rank_zero_names_a_failed_child_and_blames_none_that_finished(child_status):
    """Rank 0's collective broke (Connection closed by peer) after the rank it started had ended: a child that failed
    is named with its status; one that had finished cleanly (exit 0: rank 0 went on into a collective it never joined)
    was blamed as well ("another rank ended ... that rank's own error, above, says why", where there was none). Now the
    traceback stays, with a note that no rank failed. A child that a signal stopped at once (SIGTERM to it alone while
    fit set up: exit 143, its "interrupted:" line said) was followed by rank 0's error line as well: now the command
    exits with its status and says nothing more."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from epas_lightning.child_ranks import EndChildRanksOnError, peer_rank_ended

    child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({child_status})"])
    child.wait()
    launcher = object.__new__(_SubprocessScriptLauncher)
    launcher.procs = [child]
    watcher = EndChildRanksOnError(grace_seconds=0.1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), global_rank=0, num_nodes=1)
    trainer.callbacks = [watcher]
    watcher.on_exception(trainer, None, error := RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
    said = peer_rank_ended(error, trainer)
    if child_status == 143:
        assert said.exit_status == 143 and not said.announce
    elif child_status:
        assert str(said).startswith("rank 1 ended (exit status 2) during the run — rank 0") and said.exit_status == 2
        assert said.announce
    else:
        assert said is None and "no rank failed" in error.__notes__[0]
