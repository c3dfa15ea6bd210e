"""Smoke tests of the peer benchmarks and the pretraining comparison: each runs its ``--quick`` mode and must end with
one JSON line holding the numbers the RESULTS table is built from. No timing is asserted. One script runs in a
subprocess, as a user runs it; the others run their ``main`` in this process (no interpreter to start)."""

import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import strict_json

ROOT = Path(__file__).resolve().parents[1]


def last_json_line(script: str, *args: str, cwd: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--quick", "--threads", "1", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def quick_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``quick_main(script, *args)``: the script's ``main(["--quick", "--threads", "1", *args])`` in this process, with
    its folder on ``sys.path`` as when it runs as a script; torch's thread count and the loggers' levels (a script may
    quiet Lightning's) are put back after. Returns the last line of what it printed, as JSON."""
    threads = torch.get_num_threads()
    loggers = [log for log in logging.root.manager.loggerDict.values() if isinstance(log, logging.Logger)]
    levels = [(log, log.level) for log in [logging.root, *loggers]]

    def run(script: str, *args: str) -> dict:
        path = ROOT / script
        monkeypatch.syspath_prepend(str(path.parent))
        importlib.import_module(path.stem).main(["--quick", "--threads", "1", *args])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    yield run
    torch.set_num_threads(threads)
    for log, level in levels:
        log.setLevel(level)


@pytest.mark.slow
def test_vs_hf_reports_a_ratio_on_identical_logits(quick_main):
    pytest.importorskip("transformers")
    r = quick_main("benchmarks/vs_hf.py")
    assert {"ratio", "ours_step_s", "hf_step_s", "logits_max_abs_diff", "target_met"} <= set(r)
    assert r["ratio"] > 0 and r["logits_max_abs_diff"] < 1e-3
    assert len(r["ours_rep_seconds"]) == len(r["hf_rep_seconds"]) == r["reps"]


@pytest.mark.slow
def test_vs_peers_reports_each_system_against_the_best_peer(quick_main):
    pytest.importorskip("transformers")
    r = quick_main("benchmarks/vs_peers.py", "--batch-size", "2", "--profile", "3")  # HF's loss: several rows
    assert {"device", "flop_cut", "tokens_per_s", "best_peer", "dense_vs_best_peer", "epas_vs_best_peer", "mfu"} <= set(
        r
    )
    expected = {"dense", "epas", "hf"} | ({"litgpt"} if "litgpt" not in r["skipped"] else set())
    assert set(r["tokens_per_s"]) == expected and r["best_peer"] in {"hf", "litgpt"}
    assert all(diff < 1e-3 for diff in r["logits_max_abs_diff"].values())  # every peer computes our function
    assert r["dense_vs_best_peer"] > 0 and r["flop_cut"] > 0 and r["mfu"] is None  # no MFU without a known peak
    assert set(r["profile"]) == expected and all(len(p["ops"]) == 3 for p in r["profile"].values())


def test_vs_peers_reports_the_kernel_order_its_dense_arm_ran(quick_main, monkeypatch):
    """The order ``attention_kernel='auto'`` chose, not the model's before the dense arm switched to it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    vs_peers = importlib.import_module("vs_peers")
    from epas_lightning.attention_kernels import sdpa_order

    monkeypatch.setattr(vs_peers, "sdpa_order", lambda setting, device, config: sdpa_order("flash", device, config))
    r = quick_main("benchmarks/vs_peers.py", "--systems", "dense", "torch_sdpa", "--reps", "1", "--warmup", "0")
    assert r["sdpa_order"] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    assert "torch_sdpa" in r["tokens_per_s"]  # the arm that runs torch's own order


def test_block_vs_litgpt_times_each_part_of_both_on_the_same_function(quick_main):
    pytest.importorskip("litgpt")
    r = quick_main("benchmarks/block_vs_litgpt.py")
    assert set(r["ms_per_pass"]) == {"ours", "ours_bthd", "litgpt", "ours_head", "litgpt_head"}
    assert all(ms > 0 for ms in r["ms_per_pass"].values())
    assert r["block_vs_litgpt"] == r["ms_per_pass"]["ours"] / r["ms_per_pass"]["litgpt"]
    assert r["max_abs_diff_vs_ours"]["ours_bthd"] == 0.0  # RoPE before the transpose: the same numbers
    assert r["max_abs_diff_vs_ours"]["litgpt"] < 1e-4 and r["compiled"] is False  # fp32 on the CPU, eager
    assert r["max_abs_diff_vs_ours"]["litgpt_head"] < 1e-4  # the two loss heads: the same loss


def test_block_vs_litgpt_without_litgpt_says_how_to_install_it():
    """Where litgpt is not installed (CI's install), the script ended in a ModuleNotFoundError traceback."""
    last = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['litgpt'] = None; import runpy; "
         "runpy.run_path('benchmarks/block_vs_litgpt.py', run_name='__main__')", "--quick"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert last.returncode == 2 and "Traceback" not in last.stderr, last.stderr
    assert last.stderr.strip().splitlines() == [
        "error: litgpt is not installed — benchmarks/block_vs_litgpt.py — install it: pip install --no-deps "
        '"litgpt==0.5.13"'
    ]


@pytest.mark.slow
def test_lightning_overhead_reports_ratios_and_same_losses(quick_main):
    r = quick_main("benchmarks/lightning_overhead.py")
    assert {"ratio", "ratio_default", "bare_step_ms", "lightning_step_ms", "target_met"} <= set(r)
    assert r["ratio"] > 0 and r["ratio_default"] > 0
    assert r["loss_max_abs_diff"] < 1e-4  # Trainer.fit and the bare loop did the same work


@pytest.mark.slow
def test_mfu_reports_utilisation_against_measured_peaks(quick_main):
    r = quick_main("benchmarks/mfu.py")
    assert {"mfu", "mfu_vs_fp32_peak", "peak_bf16_gflops", "peak_fp32_gflops", "achieved_gflops"} <= set(r)
    assert r["mfu"] > 0 and r["peak_bf16_gflops"] > 0 and r["mfu_fp32"] > 0
    assert set(r["peak_bf16"]["by_layout"]) == {"nn", "nt", "tn"}


@pytest.mark.slow
def test_pretrain_compare_writes_every_output(quick_main, tmp_path):
    r = quick_main("experiments/pretrain_compare.py", "--output", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["out"]  # no build folder left beside it
    tmp_path = tmp_path / "out"
    assert set(r["variants"]) == {"dense", "epas", "static", "shallow"}
    v = r["variants"]
    assert v["dense"]["final_shared_layers"] == []
    assert v["epas"]["final_shared_layers"] == v["static"]["final_shared_layers"] == [2, 3]
    assert v["shallow"]["final_shared_layers"] == [1, 2]
    assert v["static"]["mean_shared_layers"] == 2 > v["epas"]["mean_shared_layers"] > 0
    for key in ("final_val_loss", "val_loss_at_equal_time", "tokens_per_s", "delta_final_vs_dense"):
        assert all(key in row for row in v.values())
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "results.md").is_file()
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["dense", "epas", "shallow", "static"]


@pytest.mark.slow
def test_serve_throughput_reports_both_budgets(quick_main):
    pytest.importorskip("litserve")
    r = quick_main("benchmarks/serve_throughput.py")
    dense, trained = r["results"]["dense"], r["results"]["trained"]
    assert dense["sharing_layers"] == 0 and trained["sharing_layers"] == r["n_layer"] // 2 > 0
    assert dense["requests_per_s"] > 0 and trained["tokens_per_s"] > 0 and "gain_tokens_per_s" in r
    assert dense["kv_cache_saving"] == 0 and trained["kv_cache_saving"] == pytest.approx(0.25)  # V-only cache
    assert r["server_exit_code"] == 0  # SIGTERM shut the server down cleanly


def test_gpu_session_retries_vs_peers_at_half_batch_after_out_of_memory(tmp_path, monkeypatch):
    """The GPU session's own logic, without a GPU: an out-of-memory run is retried at half the micro-batch, a clean
    one is not, and the table renders even when every peer was dropped."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    calls = []

    def fake_run_logged(cmd, log, timeout):
        batch = int(cmd[cmd.index("--batch-size") + 1])
        calls.append(batch)
        if batch == 4:
            log.write_text("torch.OutOfMemoryError: CUDA out of memory\n")
            return 1, 1.0
        result = {"batch_size": batch, "tokens_per_s": {"dense": 10.0, "epas": 11.0}, "best_peer": None}
        result |= {"model": "tinyllama-1.1b", "seq_len": 2048, "precision": "bf16-mixed"}
        result |= {"mfu": None, "step_peak_memory_mib": {"dense": 1.0, "epas": 1.0}, "targets": {}}
        log.write_text("table\n" + json.dumps(result | {"targets_met": {}, "skipped": {"hf": "OutOfMemoryError"}}))
        return 0, 1.0

    monkeypatch.setattr(gpu_session, "run_logged", fake_run_logged)
    args = gpu_session.parse_args(["run", "--output", str(tmp_path)])
    assert gpu_session.parse_args(["run", "--out", str(tmp_path)]) == args  # the spelling of the recorded runs
    with pytest.raises(SystemExit):
        gpu_session.parse_args(["run", "--fit-batch", "4"])  # an abbreviation is not the flag it begins
    peers = gpu_session.peers_part(args, time.monotonic() + 300)
    assert calls == [4, 2, 1]  # the batch-2 run still dropped a peer for memory: one more halving
    assert [a["batch_size"] for a in peers["attempts"]] == [4, 2, 1] and peers["exit_code"] == 0
    text = gpu_session.table({"device": "x", "torch": "y", "fit": {"batch_size": 8}, "peers": peers})
    assert "| dense | 10 | nan |" in text and "MFU target 0.45 (dense) met: False" in text


def test_gpu_session_retries_no_run_that_lacks_a_system_for_another_reason(tmp_path, monkeypatch):
    """A required peer failing at micro-batch 4 for another reason (HF's label view) while an optional system ran out
    of memory sent vs_peers again at 2: the peers' time spent on the same failure, b2's table in place of b4's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    calls = []

    def fake_run_logged(cmd, log, timeout):
        calls.append(int(cmd[cmd.index("--batch-size") + 1]))
        skipped = {"hf": "RuntimeError: view size is not compatible", "whole_compile": "OutOfMemoryError: CUDA"}
        result = {"tokens_per_s": {"dense": 10.0, "epas": 11.0, "litgpt": 10.0}, "skipped": skipped}
        log.write_text(json.dumps(result) + "\n")
        return 0, 1.0

    monkeypatch.setattr(gpu_session, "run_logged", fake_run_logged)
    peers = gpu_session.peers_part(gpu_session.parse_args(["run", "--output", str(tmp_path)]), time.monotonic() + 300)
    assert calls == [4] and peers["batch_size"] == 4 and peers["skipped"]["hf"].startswith("RuntimeError")


def test_gpu_session_reads_vs_peers_json_before_what_the_process_printed_while_it_exited(tmp_path, monkeypatch):
    """The log holds stderr too: a library's warning printed as vs_peers exited, after its JSON line, made the session
    stop with a JSONDecodeError traceback, writing neither gpu_session.json nor its tables."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    def fake_run_logged(cmd, log, timeout):
        log.write_text('table\n{"tokens_per_s": {"dense": 10.0}}\n[W1203 13:00:00] a warning at exit\n')
        return 0, 1.0

    monkeypatch.setattr(gpu_session, "run_logged", fake_run_logged)
    result = gpu_session.peers_run(gpu_session.parse_args(["run", "--output", str(tmp_path)]), 4, 60)
    assert result["tokens_per_s"] == {"dense": 10.0} and result["exit_code"] == 0


def test_gpu_session_tables_what_vs_peers_measured_before_its_time_ran_out(tmp_path, monkeypatch):
    """vs_peers stopped at its limit (or by an error after the timing) left its numbers only as per-rep lines in the
    log: the session's table said it did not finish. It holds the systems measured and why the others are not."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    limits = []

    def stopped_at_its_limit(cmd, log, timeout):
        limits.append((int(cmd[cmd.index("--time-limit") + 1]), timeout))
        partial = {"model": "tinyllama-1.1b", "seq_len": 2048, "batch_size": 4, "precision": "bf16-mixed"}
        partial |= {"tokens_per_s": {"dense": 9.0, "epas": 10.0, "litgpt": 10.0}, "best_peer": "litgpt", "mfu": None}
        partial |= {"step_peak_memory_mib": {"dense": 1, "epas": 1, "litgpt": 2}, "targets": {}, "targets_met": {}}
        partial |= {"reps_done": {"dense": 3, "epas": 3, "litgpt": 3}, "skipped": {}, "complete": False}
        Path(cmd[cmd.index("--partial") + 1]).write_text(json.dumps(partial))
        log.write_text("  rep 2: litgpt  0.120 s\n")
        return 124, float(timeout)

    monkeypatch.setattr(gpu_session, "run_logged", stopped_at_its_limit)
    monkeypatch.setattr(gpu_session, "check_packages", lambda args, cuda: None)  # CI installs no peer
    args = ["run", "--output", str(tmp_path), "--skip-tests", "--skip-fit", "--peers-timeout", "100"]
    gpu_session.run(gpu_session.parse_args(args))
    assert limits == [(85, 100)]  # vs_peers starts nothing optional that its last seconds could not end
    peers = strict_json((tmp_path / "gpu_session.json").read_text())["peers"]
    assert peers["exit_code"] == 124 and peers["tokens_per_s"] == {"dense": 9.0, "epas": 10.0, "litgpt": 10.0}
    text = (tmp_path / "gpu_session.md").read_text()
    assert "| dense | 9 | 0.900 | None | 1 | 3 |" in text and "| litgpt | 10 | 1.000 | None | 2 | 3 |" in text
    why = "timed out: vs_peers stopped at its limit, 100 s"
    assert f"not measured: hf, liger, eager_ce, torch_sdpa, whole_compile ({why})" in text
    assert f"vs_peers stopped early ({why}): the rates above are over the reps it had done" in text


def test_gpu_session_writes_each_part_as_it_ends(tmp_path, monkeypatch):
    """The report was written once, at the end: a part that raised (reading fit's logs) or a session stopped during
    vs_peers left no gpu_session.json, whatever the parts before had measured."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    def unreadable_logs(args, timeout):
        raise ValueError("no config.yaml in the run folder")

    def stopped(args, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_session, "tests_part", lambda args, timeout: {"exit_code": 0, "summary": "6 passed"})
    monkeypatch.setattr(gpu_session, "fit_part", unreadable_logs)
    monkeypatch.setattr(gpu_session, "peers_part", stopped)
    monkeypatch.setattr(gpu_session, "check_packages", lambda args, cuda: None)  # CI installs no peer
    with pytest.raises(KeyboardInterrupt):
        gpu_session.run(gpu_session.parse_args(["run", "--output", str(tmp_path)]))
    report = strict_json((tmp_path / "gpu_session.json").read_text())
    assert report["cuda_tests"]["summary"] == "6 passed" and "peers" not in report
    assert report["fit"] == {"error": "ValueError: no config.yaml in the run folder"}
    text = (tmp_path / "gpu_session.md").read_text()
    assert "CUDA tests (exit 0): 6 passed" in text and "fit part failed: ValueError: no config.yaml" in text
    assert sorted(os.listdir(tmp_path)) == ["gpu_session.json", "gpu_session.md"]


def test_gpu_session_stops_before_any_part_where_a_package_it_needs_did_not_travel(tmp_path, monkeypatch, capsys):
    """A device call without ``.whl`` carried (the device image lacks litgpt, Liger, jsonargparse): ``fit`` failed and
    vs_peers ran without LitGPT after minutes of scarce device time. It stops first, in one line, exit 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    ran = []
    parts = {"tests_part": {"exit_code": 0, "summary": ""}, "fit_part": {"skipped": True}}
    parts["peers_part"] = {"exit_code": None}
    for name, result in parts.items():
        monkeypatch.setattr(gpu_session, name, lambda args, name=name, result=result: ran.append(name) or result)
    monkeypatch.setattr(gpu_session, "install_wheels", lambda: None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litgpt" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stopped:
        gpu_session.run(gpu_session.parse_args(["run", "--output", str(tmp_path / "out"), "--skip-tests"]))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and ran == [] and not (tmp_path / "out").exists()
    assert err.startswith("error: litgpt cannot be imported — ") and err.count("\n") == 1 and "carry .whl" in err


def test_gpu_session_tables_name_the_shapes_that_ran(tmp_path, monkeypatch):
    """A dry run with ``--fit-args "--model.config.block_size=64"`` and vs_peers' own shape: the tables said 2048
    tokens, tinyllama-1.1b and bf16-mixed whatever ran."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    (tmp_path / "config.yaml").write_text("model:\n  config:\n    name: debug\n    block_size: 64\n")
    fit = {"batch_size": 2, "seq_len": gpu_session.trained_block_size(tmp_path)}
    peers = {"model": "debug", "seq_len": 32, "batch_size": 1, "precision": "32-true", "best_peer": "hf"}
    peers |= {"tokens_per_s": {"dense": 9.0, "hf": 10.0}, "mfu": None, "step_peak_memory_mib": {"dense": 1, "hf": 1}}
    peers |= {"targets": {}, "targets_met": {}, "skipped": {}}
    text = gpu_session.table({"device": "x", "torch": "y", "fit": fit, "peers": peers})
    assert "| system (vs_peers, debug, 32 x 1, 32-true) |" in text and "| dense | 9 | 0.900 | None | 1 |" in text
    assert "| fit (Lightning + FSDP2, 1 GPU, batch 2 x 64) |" in text
    fit["command"] = "-m epas_lightning fit --config tinyllama-1gpu --trainer.strategy=auto --data.batch_size=2"
    text = gpu_session.table({"device": "x", "torch": "y", "fit": fit, "peers": peers})  # --fit-args chose it
    assert "| fit (Lightning + strategy auto, 1 GPU, batch 2 x 64) |" in text


def test_linear_ce_precision_compares_chunk_counts_with_the_plain_path():
    r = last_json_line("benchmarks/linear_ce_precision.py", "--chunks", "8", "1")
    errors = r["relative_error_vs_fp64"]
    assert set(errors) == {"plain", "chunked_8", "chunked_1"}
    assert 0 < errors["plain"]["weight"] < 2e-2  # bf16 rounding, not a broken gradient
    # one chunk rounds the weight gradient once, as the plain path does; eight chunks round it eight times
    assert errors["chunked_1"]["weight"] == pytest.approx(errors["plain"]["weight"], rel=0.05)
    assert errors["chunked_8"]["weight"] > errors["chunked_1"]["weight"]


SCRIPTS = sorted(ROOT.glob("benchmarks/*.py")) + sorted(ROOT.glob("experiments/*.py"))


@pytest.fixture
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_gpu_session_names_vs_peers_systems_as_vs_peers_does(benchmarks_importable):
    """gpu_session keeps its own list of vs_peers' systems (its process imports torch alone, not vs_peers): the same
    names in the same order, the targets' four first, so that what it asks for and checks is what vs_peers times."""
    import gpu_session
    import vs_peers

    assert gpu_session.PEERS_SYSTEMS == vs_peers.SYSTEMS
    assert gpu_session.REQUIRED_PEERS_SYSTEMS == vs_peers.REQUIRED


def test_every_script_reports_a_user_error_in_one_line(benchmarks_importable, capsys):
    """A bad flag value (an unknown preset, CUDA on a CPU machine) ends the script with one line and status 2."""
    import memory

    from epas_lightning.errors import run_script

    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: memory.main(["--model", "nope"]))
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and out == ""
    assert err.startswith("error: unknown model preset 'nope'") and err.count("\n") == 1
    mains = [p.name for p in SCRIPTS if 'if __name__ == "__main__":' in p.read_text()]
    wrapped = [p.name for p in SCRIPTS if p.read_text().endswith("    run_script(main)\n")]
    assert sorted(set(mains) - set(wrapped)) == ["gpu_session.py"]  # it runs before the package's dependencies exist


def test_every_script_refuses_a_bad_count_in_one_line(benchmarks_importable, monkeypatch, capsys):
    """``--reps 0``, ``--seq-len abc``: one line naming the flag and exit 2 before any work, in every script (they
    were tracebacks, a ZeroDivisionError or an empty median, after the timing). ``--seq-le 4`` is no ``--seq-len``."""
    from epas_lightning.errors import run_script

    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    for path in [p for p in SCRIPTS if p.name not in ("harness.py", "host_syncs.py", "gpu_session.py")]:
        text = path.read_text()
        flag = "--seq-len" if "shape_flags(" in text else re.search(r'"(--[a-z-]+)",\s+type=count', text)[1]
        module = importlib.import_module(path.stem)
        for value, message in (("0", "must be at least 1, got 0"), ("abc", "takes a whole number, not 'abc'")):
            monkeypatch.setattr(sys, "argv", [path.name, flag, value])
            with pytest.raises(SystemExit) as stopped:
                run_script(module.main)
            out, err = capsys.readouterr()
            assert stopped.value.code == 2 and out == "", path.name
            assert err == f"error: {message} — {flag} — see `{path.name} --help`\n"
        monkeypatch.setattr(sys, "argv", [path.name, flag[:-1], "4"])  # an abbreviation is not the flag it begins
        with pytest.raises(SystemExit):
            run_script(module.main)
        meant = f"{path.name} has no option {flag[:-1]} (did you mean {flag}?)"
        assert capsys.readouterr().err == f"error: {meant} — {path.name} — see `{path.name} --help`\n", path.name


def test_a_script_stopped_with_ctrl_c_says_so_in_one_line(monkeypatch, capsys):
    """Ctrl+C in a benchmark or experiment printed a KeyboardInterrupt traceback and exited 1; it is one line and 130,
    as the commands end."""
    from epas_lightning.errors import run_script

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["pretrain_compare.py", "--quick"])
    with pytest.raises(SystemExit) as stopped:
        run_script(interrupted)
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted: pretrain_compare.py stopped (Ctrl+C)\n"


def test_the_last_json_line_of_a_benchmark_writes_non_finite_numbers_as_null(benchmarks_importable, capsys):
    """A ratio of a zero time (NaN, inf) ended a script with ``Infinity``, which jq and JavaScript refuse."""
    import harness

    harness.emit({"speedup": float("inf"), "runs": [float("nan"), 1.5]})
    assert strict_json(capsys.readouterr().out.splitlines()[-1]) == {"speedup": None, "runs": [None, 1.5]}


def test_the_gpu_session_writes_strict_json_and_no_script_writes_python_json(tmp_path, monkeypatch, capsys):
    """gpu_session.json and its last line held a NaN median (a rate TensorBoard logged as NaN) as ``NaN``; the
    experiments' results and the other scripts' files wrote Python's ``json.dumps`` too."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_session

    monkeypatch.setattr(gpu_session, "fit_part", lambda args, timeout: {"batch_size": 8, "dense_mfu": float("nan")})
    gpu_session.run(gpu_session.parse_args(["run", "--output", str(tmp_path), "--skip-tests", "--skip-peers"]))
    assert strict_json((tmp_path / "gpu_session.json").read_text())["fit"]["dense_mfu"] is None
    assert strict_json(capsys.readouterr().out.splitlines()[-1])["fit"]["dense_mfu"] is None
    plain = [p.name for p in SCRIPTS if re.search(r"\bjson\.dumps?\(", p.read_text())]
    assert plain == [], f"{plain} write JSON without epas_lightning.runtime.json_text"


def test_cuda_on_a_cpu_machine_is_a_user_error(benchmarks_importable, monkeypatch):
    import harness

    from epas_lightning.errors import ConfigError

    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        harness.resolve_device("cuda")


def test_memory_caps_the_region_below_the_layer_count(benchmarks_importable, monkeypatch):
    """``--sharing 1.0`` measures the largest region a model can have (every layer but layer 0), as the other
    benchmarks do, instead of failing in ``deepest_layers``."""
    import memory

    regions = []
    monkeypatch.setattr(memory, "measure", lambda args, device, shared, ac: regions.append(shared) or 1.0)
    result = memory.main(["--model", "debug", "--sharing", "1.0", "--device", "cpu"])
    assert regions == [[], [1], [], [1]] and result["n_shared"] == 1


def test_generate_throughput_always_measures_the_dense_baseline(benchmarks_importable, capsys):
    """Gains are relative to dense: ``--sharing 0.5`` alone used to fail with KeyError 'dense' after all the work. The
    table's KV cache column is in a unit that shows a tiny model's cache (it said 0.00 under "KV MB", in MiB)."""
    import generate_throughput

    args = ["--model", "debug", "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "3", "--reps", "1"]
    result = generate_throughput.main([*args, "--device", "cpu", "--sharing", "0.5"])
    rows = result["results"][1]
    assert list(rows) == ["dense", "0.5"] and rows["dense"]["gain"] == 0 and result["gain_50"] is not None
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("batch "))
    assert lines[head].endswith("KV cache")
    assert lines[head + 1].endswith(generate_throughput.size_text(rows["dense"]["kv_cache_bytes"]))


def test_generate_throughput_refuses_arguments_it_cannot_measure(benchmarks_importable):
    import generate_throughput

    from epas_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2 new tokens"):  # was a ZeroDivisionError after the runs
        generate_throughput.main(["--model", "debug", "--new-tokens", "1", "--device", "cpu"])
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):  # was a ValueError traceback
        generate_throughput.main(["--model", "debug", "--cuda-graph", "on", "--device", "cpu"])


def test_a_missing_peer_package_says_what_to_install(benchmarks_importable, monkeypatch):
    import vs_hf
    import vs_peers

    from epas_lightning.errors import ConfigError

    monkeypatch.setattr(vs_peers.importlib.util, "find_spec", lambda name: None)
    requested = ["dense", "litgpt", "hf", "eager_ce", "whole_compile"]
    systems, skipped = vs_peers.available_systems(requested, torch.device("cpu"), "none")
    assert systems == ["dense"]
    assert skipped == {
        "litgpt": 'litgpt not installed: pip install --no-deps "litgpt==0.5.13"',
        "hf": 'transformers not installed: pip install ".[bench]"',
        "eager_ce": "the same step as dense without --compile all",
        "whole_compile": "the same step as dense without --compile all",
    }
    with pytest.raises(ConfigError, match=r"transformers is not installed .* pip install \"\.\[bench\]\""):
        vs_hf.main(["--quick"])  # was a ModuleNotFoundError traceback


def test_the_whole_compile_arm_is_one_graph_of_every_block_and_the_dense_loss(benchmarks_importable):
    """vs_peers' ``whole_compile`` arm traces the per-block compiled model into one graph, embedding to final norm,
    and trains the same numbers as ``dense`` (``train_loss``)."""
    import vs_peers

    from epas_lightning.loss import train_loss
    from epas_lightning.model import Llama, LlamaConfig
    from epas_lightning.parallel import parallelize

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = parallelize(Llama(LlamaConfig.from_name("debug", n_layer=3)), None, compile=backend)
    batch = torch.randint(0, 512, (2, 17))

    def loss_and_grads(loss_fn) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.parameters())]

    dense = loss_and_grads(lambda b: train_loss(model, b, compile=backend))  # a block graph, the loss's graph
    before = len(graphs)
    whole = loss_and_grads(vs_peers.whole_model_loss(model, backend))
    assert len(graphs) == before + 1  # one graph, the loss's reused
    calls = [n.target for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert calls.count(torch.nn.functional.embedding) == 1
    assert calls.count(torch.nn.functional.scaled_dot_product_attention) == 3  # every block
    for a, b in zip(dense, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.fixture
def vs_peers_everywhere(benchmarks_importable, monkeypatch, capsys):
    """vs_peers with every requested system run here (``eager_ce``: ``dense`` without ``--compile all``); ``run(*args)``
    is its ``main`` on the debug shape, one thread."""
    import vs_peers

    threads = torch.get_num_threads()
    monkeypatch.setattr(vs_peers, "available_systems", lambda requested, device, compile_mode: (requested, {}))
    yield lambda *args: vs_peers.main(["--quick", "--threads", "1", "--systems", "dense", "epas", "eager_ce", *args])
    torch.set_num_threads(threads)
    capsys.readouterr()


def test_vs_peers_times_the_optional_systems_after_the_required_ones(vs_peers_everywhere, monkeypatch, tmp_path):
    """The optional systems (and their whole-model compilations) came before the targets' systems were timed, and an
    error in the profile after the timing lost every number: they come after, alternating with dense again."""
    import vs_peers

    def failing_profile(*args):
        raise RuntimeError("profiler broke")

    monkeypatch.setattr(vs_peers, "profile_step", failing_profile)
    r = vs_peers_everywhere("--profile", "3", "--partial", str(tmp_path / "partial.json"))
    assert list(r["tokens_per_s"]) == ["dense", "epas", "eager_ce"] and r["complete"]
    assert r["reps_done"] == {"dense": 2, "epas": 2, "eager_ce": 2} and r["optional_reference"]["reps_done"] == 2
    assert r["optional_reference"]["dense_tokens_per_s"] > 0 and r["epas_vs_dense"] > 0
    assert r["profile"]["dense"] == {"error": "RuntimeError: profiler broke"}
    assert strict_json((tmp_path / "partial.json").read_text()) == json.loads(json.dumps(r))
    assert os.listdir(tmp_path) == ["partial.json"]


def test_vs_peers_starts_no_optional_system_past_its_time_limit(vs_peers_everywhere, tmp_path):
    r = vs_peers_everywhere("--profile", "3", "--time-limit", "0")
    assert list(r["tokens_per_s"]) == ["dense", "epas"] and "optional_reference" not in r  # the targets' systems
    assert r["skipped"]["eager_ce"].startswith("not started: 0 s of --time-limit left")
    assert r["profile"] == {name: {"skipped": "not started: --time-limit reached"} for name in ("dense", "epas")}


def test_vs_peers_leaves_its_time_to_a_smaller_batch_when_a_peer_ran_out_of_memory(vs_peers_everywhere, monkeypatch):
    """A required peer dropped for memory at its first step left the table without it, and the optional systems and
    profiles then took the time until --time-limit: gpu_session's retry at half the batch found too little left."""
    import vs_peers

    build = vs_peers.build_systems

    def hf_out_of_memory(*args):
        systems, *rest = build(*args)
        systems["hf"].step = lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        return (systems, *rest)

    monkeypatch.setattr(vs_peers, "build_systems", hf_out_of_memory)
    r = vs_peers_everywhere("hf", "--profile", "3")
    assert list(r["tokens_per_s"]) == ["dense", "epas"] and r["skipped"]["hf"].startswith("OutOfMemoryError: CUDA")
    assert r["skipped"]["eager_ce"] == "not started: hf ran out of memory (time left to a smaller --batch-size)"
    assert "profile" not in r and "optional_reference" not in r


def test_vs_peers_partial_file_keeps_the_repetitions_of_a_killed_run(vs_peers_everywhere, monkeypatch, tmp_path):
    """Killed during the timing (a time limit, an error), vs_peers left only per-rep lines in its log."""
    import harness

    timed, calls = harness.timed, []

    def killed_in_the_second_repetition(fn, device):
        calls.append(1)
        if len(calls) == 4:  # dense, epas in rep 0; epas, then dense in rep 1
            raise KeyboardInterrupt
        return timed(fn, device)

    monkeypatch.setattr(harness, "timed", killed_in_the_second_repetition)
    with pytest.raises(KeyboardInterrupt):
        vs_peers_everywhere("--partial", str(tmp_path / "partial.json"))
    r = strict_json((tmp_path / "partial.json").read_text())
    assert r["complete"] is False and r["reps_done"] == {"dense": 1, "epas": 1} and r["epas_vs_dense"] > 0


def test_vs_peers_refuses_a_partial_file_it_cannot_write_before_timing(
    benchmarks_importable, monkeypatch, capsys, tmp_path
):
    """``--partial`` in a folder that does not exist, naming a folder or too long a name: a traceback after the first
    repetition (its first write). One line, exit 2, before any model is built."""
    import vs_peers

    from epas_lightning.errors import run_script

    for where in (tmp_path / "absent" / "partial.json", tmp_path, tmp_path / ("p" * 300)):
        monkeypatch.setattr(sys, "argv", ["vs_peers.py", "--quick", "--threads", "1", "--partial", str(where)])
        with pytest.raises(SystemExit) as stopped:
            run_script(vs_peers.main)
        out, err = capsys.readouterr()
        assert stopped.value.code == 2 and out == "" and err.count("\n") == 1 and " — --partial — " in err, err


def test_vs_peers_table_prints_mfu_without_memory(benchmarks_importable, capsys):
    """``--peak-tflops`` on the CPU gives an MFU column but no CUDA memory; the table used to crash on it."""
    import vs_peers

    result = {"model": "debug", "seq_len": 8, "batch_size": 1, "precision": "32-true", "device_name": "cpu"}
    result |= {"tokens_per_s": {"dense": 10.0, "hf": 8.0}, "best_peer": "hf", "mfu": {"dense": 0.5, "hf": 0.4}}
    result |= {"step_peak_memory_mib": None, "rep_foreign_load": {}, "flop_cut": 0.05, "targets": {}}
    vs_peers.print_table(result | {"targets_met": {}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["system", "tokens/s", "vs", "best", "peer", "MFU"]
    assert lines[3].split() == ["dense", "10.0", "1.250", "0.500"]


def test_serve_throughput_says_why_the_server_did_not_start(benchmarks_importable, monkeypatch, tmp_path):
    """The server's log is in a temporary folder that is gone when the script ends: its last line is the message."""
    import serve_throughput

    from epas_lightning.errors import ConfigError

    class ExitedServer:
        def __init__(self, command, env, stdout, stderr):  # noqa: ANN001
            stdout.write("Loading\nerror: CUDA is not available on this machine — --device cuda — use --device cpu\n")
            stdout.flush()

        def poll(self) -> int:
            return 2

        terminate = poll

        def wait(self, timeout: float) -> int:
            return 2

    monkeypatch.setattr(serve_throughput.subprocess, "Popen", ExitedServer)
    args = serve_throughput.parse_args(["--quick", "--device", "cuda"])
    with pytest.raises(ConfigError, match="^the server did not start: CUDA is not available .* use --device cpu$"):
        serve_throughput.Server(tmp_path, args, tmp_path / "server.log")


def test_pretrain_compare_refuses_to_mix_its_tensorboard_runs_with_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import pretrain_compare

    from epas_lightning.errors import OutputError

    (tmp_path / "tb" / "dense").mkdir(parents=True)
    (tmp_path / "tb" / "dense" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    with pytest.raises(OutputError, match="earlier comparison"):  # before any training
        pretrain_compare.main(["--quick", "--output", str(tmp_path)])


def test_pretrain_compare_refuses_an_output_it_would_replace_and_names_its_own_flags(tmp_path, monkeypatch):
    """A results.md (or .json, loss.png) in --output was replaced when no TensorBoard run was there, and a file as
    --output was a FileExistsError traceback; a region or preset these flags cannot make named the fit command's
    sharing.target or model.config.name. All before any training."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import pretrain_compare

    from epas_lightning.errors import ConfigError, OutputError

    monkeypatch.setattr(pretrain_compare, "load_batches", lambda *a: pytest.fail("loaded data before the checks"))
    (tmp_path / "results.md").write_text("mine\n")
    with pytest.raises(OutputError, match=r"^holds results.md, which this run would replace —"):
        pretrain_compare.main(["--quick", "--output", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == "mine\n"
    with pytest.raises(OutputError, match="^is a file, not a folder —"):
        pretrain_compare.main(["--quick", "--output", str(tmp_path / "results.md")])
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="rounds down to 0 layers") as refused:
        pretrain_compare.main(["--quick", "--sharing", "0.1", "--output", out])
    assert refused.value.where == "--sharing 0.1"
    with pytest.raises(ConfigError, match="unknown model preset") as refused:
        pretrain_compare.main(["--quick", "--model", "nosuch", "--output", out])
    assert refused.value.where == "--model nosuch" and refused.value.fix.startswith("choose one of debug, demo")


def test_pretrain_compare_leaves_nothing_when_it_fails_midway(tmp_path, monkeypatch):
    """results.md and results.json were written straight into --output before the plot: a run that failed (or was
    killed) there left a half set of results, which also blocked the next run at the same --output."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import pretrain_compare

    def failing_plot(runs, path):
        assert (path.parent / "results.md").is_file() and (path.parent / "tb" / "dense").is_dir()  # midway
        raise RuntimeError("plot failed")

    monkeypatch.setattr(pretrain_compare, "plot", failing_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        pretrain_compare.main(["--quick", "--threads", "1", "--steps", "2", "--output", str(tmp_path / "out")])
    assert os.listdir(tmp_path) == []  # neither the output nor a hidden build folder


def test_the_experiments_refuse_an_existing_output_folder_before_any_work(tmp_path, monkeypatch):
    """Their outputs are built beside --output and renamed into place: a folder already there (the user's own, or
    one made beforehand) is refused, not written into."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual
    import pretrain_compare

    from epas_lightning.errors import OutputError

    monkeypatch.setattr(pretrain_compare, "load_batches", lambda *a: pytest.fail("loaded data before the checks"))
    monkeypatch.setattr(continual, "train", lambda *a, **k: pytest.fail("trained before checking --output"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    (tmp_path / "empty").mkdir()
    for name in ("mine", "empty"):
        out = str(tmp_path / name)
        with pytest.raises(OutputError, match="^the output already exists") as refused:
            pretrain_compare.main(["--quick", "--output", out])
        assert refused.value.where == f"--output {out}"
        monkeypatch.setattr(sys, "argv", ["continual.py", "--quick", "--output", out])
        with pytest.raises(OutputError, match="^the output already exists") as refused:
            continual.main()
        assert refused.value.where == f"--output {out}"
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and os.listdir(tmp_path / "empty") == []


def test_continual_leaves_nothing_when_it_fails_midway_and_everything_when_it_succeeds(tmp_path, monkeypatch):
    """The pretrained checkpoint was saved straight into --output/checkpoints: a run that failed after it left it
    there, and the next run at that --output was refused for the checkpoints of an earlier run."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual

    trained = []

    def fake_train(args, steps, lr, callback, init_from, out):
        if len(trained) == fail_at:
            raise RuntimeError("training failed")
        path = out / "checkpoints" / f"{['pretrained', *continual.RUNS][len(trained)]}.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"checkpoint")
        trained.append(path)
        return path

    monkeypatch.setattr(continual, "train", fake_train)
    monkeypatch.setattr(continual, "evaluate_all", lambda path, args: [1.0] * (args.target + 1))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["continual.py", "--quick", "--threads", "1", "--output", str(out)])
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]  # main quiets them
    levels = [log.level for log in loggers]
    try:
        fail_at = 1  # after the pretraining
        with pytest.raises(RuntimeError, match="training failed"):
            continual.main()
        assert len(trained) == 1 and os.listdir(tmp_path) == []  # neither the output nor a hidden build folder
        trained.clear()
        fail_at = None
        continual.main()
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
    assert os.listdir(tmp_path) == ["out"]
    assert sorted(os.listdir(out)) == sorted([".epas_output.json", *continual.OUTPUTS])
    assert sorted(os.listdir(out / "checkpoints")) == sorted(f"{name}.ckpt" for name in ["pretrained", *continual.RUNS])
    assert (out / "results.csv").read_text().splitlines()[0] == "run,loss_N0,loss_N1,loss_N2,loss_N3"


def test_pretrain_compare_reports_the_region_its_last_step_trained_with(monkeypatch):
    """``final_shared_layers`` was the schedule's region at step ``--steps``, one past the last step (0-based): a
    region that grew there was reported though no step trained (or was scored) with it."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import pretrain_compare

    args = pretrain_compare.parse_args(["--quick", "--start-step", "11", "--interval", "1"])  # 12 steps
    config = pretrain_compare.build_config(args)
    runs = {
        name: SimpleNamespace(
            sharing=sharing,
            val=[(0, 0.0, 6.0), (args.steps, 1.0, 5.0)],
            n_shared=[len(sharing.shared_layers_at(step)) for step in range(args.steps)],
            own_seconds=1.0,
            step_seconds=[1.0 / args.steps] * args.steps,
        )
        for name, sharing in pretrain_compare.schedules(args, config.n_layer).items()
    }
    variants = pretrain_compare.summarize(runs, args, config, "random tokens")["variants"]
    assert variants["epas"]["final_shared_layers"] == [3]  # step 11's; layers 2-3 only from step 12
    assert variants["shallow"]["final_shared_layers"] == [1] and variants["static"]["final_shared_layers"] == [2, 3]


def test_continual_refuses_a_model_or_region_its_flags_cannot_make_before_pretraining(tmp_path, monkeypatch):
    """--target 8 of 8 layers pretrained first, then failed naming the fit command's sharing.target, and the
    pretrained checkpoint left in --output refused the next run; --n-embd 36 (head width 9) named model.config."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual

    from epas_lightning.errors import ConfigError

    monkeypatch.setattr(continual, "train", lambda *a, **k: pytest.fail("trained before checking the flags"))
    for flags, where in [(["--target", "8"], "--target 8"), (["--n-embd", "36"], "--n-embd 36")]:
        monkeypatch.setattr(sys, "argv", ["continual.py", "--quick", *flags, "--output", str(tmp_path / "out")])
        with pytest.raises(ConfigError) as refused:
            continual.main()
        assert refused.value.where == where
    assert not (tmp_path / "out").exists()


def test_the_experiments_refuse_a_seed_numpy_cannot_take_with_their_flag(tmp_path, monkeypatch):
    """continual.py --seed -1 was Lightning's ValueError traceback, after making --output; pretrain_compare.py named
    the fit command's data.seed, after loading the corpus."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual
    import pretrain_compare

    from epas_lightning.errors import ConfigError

    for seed in ("-1", str(2**32)):
        with pytest.raises(ConfigError) as refused:
            pretrain_compare.main(["--seed", seed, "--output", str(tmp_path / "out")])
        assert (refused.value.what, refused.value.where) == (f"seed must lie in 0..2**32-1, got {seed}", "--seed")
        monkeypatch.setattr(sys, "argv", ["continual.py", "--quick", "--seed", seed, "--output", str(tmp_path / "out")])
        with pytest.raises(ConfigError) as refused:
            continual.main()
        assert (refused.value.what, refused.value.where) == (f"seed must lie in 0..2**32-1, got {seed}", "--seed")
    assert not (tmp_path / "out").exists()


def test_continual_refuses_to_replace_an_earlier_runs_outputs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual

    from epas_lightning.errors import OutputError

    (tmp_path / "results.md").write_text("an earlier run's table\n")
    monkeypatch.setattr(continual, "train", lambda *a, **k: pytest.fail("trained before checking --output"))
    monkeypatch.setattr(sys, "argv", ["continual.py", "--quick", "--output", str(tmp_path)])
    with pytest.raises(OutputError, match=r"earlier run \(results.md\)") as refused:
        continual.main()
    assert refused.value.where == f"--output {tmp_path}" and "another --output" in refused.value.fix
    assert (tmp_path / "results.md").read_text() == "an earlier run's table\n"
    # refused before it quiets Lightning's loggers for its own run: later tests read their INFO lines
    assert logging.getLogger("lightning.pytorch").level != logging.ERROR


def test_data_throughput_names_its_own_flag_when_the_budget_selects_no_file(benchmarks_importable, monkeypatch):
    import data_throughput

    from epas_lightning.errors import ConfigError

    monkeypatch.setattr(sys, "argv", ["data_throughput.py", "--mb", "0.00001"])
    with pytest.raises(ConfigError, match="selects no source file") as refused:
        data_throughput.main()
    assert refused.value.where == "--mb"


def test_pretrain_compare_names_its_own_data_flag(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import pretrain_compare

    from epas_lightning.errors import DataError

    with pytest.raises(DataError, match="does not exist") as refused:
        pretrain_compare.main(["--data-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert refused.value.where.startswith("--data-dir ") and "leave --data-dir unset" in refused.value.fix


def test_quick_sets_only_the_flags_not_given(benchmarks_importable):
    """``--quick --seq-len 128`` runs at 128: --quick's values replaced flags given on the command line too."""
    import vs_peers

    args = vs_peers.parse_args(["--quick", "--seq-len", "128"])
    assert (args.model, args.seq_len, args.reps) == ("debug", 128, 2)
    assert vs_peers.parse_args(["--seq-len", "128"]).model != "debug"


def test_host_memory_reports_peaks_as_multiples_of_the_weights(quick_main):
    """Two cases of the benchmark (each a fresh process); the consolidated/HF folders are made only when measured."""
    result = quick_main("benchmarks/host_memory.py", "--cases", "inspect fp32", "load hf")
    assert set(result["peaks"]) == {"inspect fp32.ckpt", "load hf as float32"}
    assert all(row["rss_x"] > 0 for row in result["peaks"].values())


def test_a_script_says_to_give_a_flag_its_value(benchmarks_importable, monkeypatch, capsys):
    """A flag without its value says to give it one (as the commands do), not to read ``--help``."""
    import memory

    from epas_lightning.errors import run_script

    monkeypatch.setattr(sys, "argv", ["memory.py", "--model"])
    with pytest.raises(SystemExit) as stopped:
        run_script(memory.main)
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and out == ""
    assert err == "error: argument --model: expected one argument — memory.py — give --model a value\n"
    monkeypatch.setattr(sys, "argv", ["memory.py", "--model", "-tiny"])  # a value that argparse reads as a flag
    with pytest.raises(SystemExit):
        run_script(memory.main)
    assert capsys.readouterr().err.endswith('give --model a value; write --model=-tiny for one that starts with "-"\n')
    monkeypatch.setattr(sys, "argv", ["memory.py", "--seed", "-5", "--seed", "-x"])  # -5 is a value argparse takes
    with pytest.raises(SystemExit):
        run_script(memory.main)
    assert capsys.readouterr().err.endswith('give --seed a value; write --seed=-x for one that starts with "-"\n')


def test_vs_peers_step_memory_counts_only_the_timed_steps(benchmarks_importable, monkeypatch):
    """On CUDA the first step an optimizer takes allocates AdamW's state: that warm-up step's peak counted for dense
    and the peers (which warm their optimizers up) but not for epas (sharing dense's), so dense looked larger."""
    import argparse

    import vs_peers

    from epas_lightning.model import LlamaConfig

    monkeypatch.setattr(vs_peers, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(vs_peers, "peak_flops", lambda device, dtype: None)
    mib = 2**20
    systems = {name: vs_peers.System(None, None, None) for name in ("dense", "epas")}
    systems["dense"].peak = [900 * mib, 500 * mib, 510 * mib, 505 * mib]  # warm-up (state allocated), then 3 timed
    systems["epas"].peak = [480 * mib, 470 * mib, 490 * mib, 475 * mib]
    args = argparse.Namespace(
        model="debug", seq_len=8, batch_size=1, reps=3, steps_per_rep=1, peak_tflops=None, precision="bf16-mixed",
        compile="all", attention_reuse=False, tune_malloc=False,
    )  # fmt: skip
    times = {"dense": [1.0, 1.0, 1.0], "epas": [0.9, 0.9, 0.9]}
    config = LlamaConfig.from_name("debug")
    result = vs_peers.summarize(args, config, torch.device("cuda"), systems, times, {}, [1])
    assert result["step_peak_memory_mib"] == {"dense": 510.0, "epas": 490.0}


def test_host_sync_watch_counts_the_watched_steps_syncs_by_place(
    benchmarks_importable, tiny_corpus, tmp_path, monkeypatch
):
    """gpu_session's fit run reports where a step makes the host wait for the GPU. CUDA's own warning cannot fire on
    a CPU: the same words, warned from inside our training loss, stand in for it (once a micro-batch)."""
    import warnings

    from helpers import cpu_trainer
    from host_syncs import HostSyncWatch

    import epas_lightning.module as module_file
    from epas_lightning import EPASModule, LlamaConfig, TokenDataModule

    def syncing_loss(*args, **kwargs):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("another warning, left to the filters", stacklevel=1)
        return train_loss(*args, **kwargs)

    train_loss = module_file.train_loss
    monkeypatch.setattr(module_file, "train_loss", syncing_loss)
    config = LlamaConfig.from_name("debug", n_layer=2, block_size=16)
    data = TokenDataModule(data_dir=str(tiny_corpus), seq_len=16, batch_size=2, vocab_size=config.vocab_size)
    watch = HostSyncWatch(str(tmp_path / "syncs.json"), first_step=2, steps=2)
    with warnings.catch_warnings(record=True) as others:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path, 5, [watch], accumulate_grad_batches=2).fit(EPASModule(config), datamodule=data)
    report = json.loads((tmp_path / "syncs.json").read_text())
    assert (report["watched_steps"], report["syncs_per_step"]) == (2, 2.0)  # steps 2 and 3, 2 micro-batches each
    [site] = report["sites"]
    assert re.fullmatch(r"epas_lightning/module\.py:\d+ \(training_step\)", site["ours"]), site
    assert "test_benchmarks_smoke.py" in site["innermost"] and site["per_step"] == 2.0
    assert any("another warning" in str(w.message) for w in others)  # other warnings pass through


def run_stopped_script(main, argv: list[str], monkeypatch) -> int:  # noqa: ANN001
    """``run_script(main)`` with ``sys.argv`` set to ``argv``, putting back what a fit stopped by Ctrl+C leaves changed
    (Lightning ignores SIGINT for its shutdown and leaves it so; the scripts quiet Lightning's loggers); its exit
    status."""
    from epas_lightning.errors import run_script

    monkeypatch.setattr(sys, "argv", argv)
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]
    levels = [log.level for log in loggers]
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            run_script(main)
    finally:
        signal.signal(signal.SIGINT, sigint)
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
    return stopped.value.code


class CtrlCInSetup(L.Callback):
    def setup(self, trainer, pl_module, stage):  # noqa: ANN001
        raise KeyboardInterrupt


def test_continual_stopped_with_ctrl_c_in_training_says_so_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Lightning ends a fit that Ctrl+C stops with ``sys.exit(1)``: the script exited 1 without a word, where
    ``run_script`` says "interrupted: ... (Ctrl+C)" and exits 130."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import continual

    monkeypatch.setattr(continual, "sharing_callback", lambda kind, args: CtrlCInSetup())
    monkeypatch.setattr(continual, "TokenDataModule", lambda **kwargs: L.LightningDataModule())  # no corpus needed
    argv = ["continual.py", "--quick", "--output", str(tmp_path / "out")]
    assert run_stopped_script(continual.main, argv, monkeypatch) == 130
    assert capsys.readouterr().err.endswith("interrupted: continual.py stopped (Ctrl+C)\n")
    assert os.listdir(tmp_path) == []  # neither the output nor its hidden build folder


def test_lightning_overhead_stopped_with_ctrl_c_in_its_fit_says_so(benchmarks_importable, monkeypatch, capsys):
    """The benchmark's Lightning fit ended silently with Lightning's exit status 1 after Ctrl+C, as continual.py did."""
    import lightning_overhead

    monkeypatch.setattr(lightning_overhead, "StepClock", CtrlCInSetup)
    argv = ["lightning_overhead.py", "--quick", "--threads", "1"]
    assert run_stopped_script(lightning_overhead.main, argv, monkeypatch) == 130
    assert capsys.readouterr().err.endswith("interrupted: lightning_overhead.py stopped (Ctrl+C)\n")


class SigtermInSetup(L.Callback):
    def setup(self, trainer, pl_module, stage):  # noqa: ANN001
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException  # as Lightning's loops raise it once its SIGTERM handler ran


def test_lightning_overhead_stopped_by_sigterm_in_its_fit_does_not_say_ctrl_c(
    benchmarks_importable, monkeypatch, capsys
):
    """Lightning's SIGTERM stop (a SystemExit that leaves trainer.interrupted, as Ctrl+C's) was said as Ctrl+C, with
    130; it is SIGTERM's, with 143, as the commands say it."""
    import lightning_overhead

    monkeypatch.setattr(lightning_overhead, "StepClock", SigtermInSetup)
    argv = ["lightning_overhead.py", "--quick", "--threads", "1"]
    assert run_stopped_script(lightning_overhead.main, argv, monkeypatch) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.endswith("interrupted: lightning_overhead.py stopped (SIGTERM)\n")


def test_scripts_fit_through_fit_in_script():
    """A script's own ``trainer.fit`` loses Ctrl+C to Lightning's ``sys.exit(1)``; ``fit_in_script`` keeps it."""
    direct = [p.name for p in SCRIPTS if re.search(r"\btrainer\.fit\(", p.read_text())]
    assert direct == [], f"{direct} call trainer.fit without epas_lightning.errors.fit_in_script"
