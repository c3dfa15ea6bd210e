"""Smoke tests of the peer benchmarks and the pretraining comparison: each runs its ``--quick`` mode in a subprocess
and must end with one JSON line holding the numbers the RESULTS table is built from. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_vs_hf_reports_a_ratio_on_identical_logits():
    pytest.importorskip("transformers")
    r = last_json_line("benchmarks/vs_hf.py")
    assert {"ratio", "ours_step_s", "hf_step_s", "logits_max_abs_diff", "target_met"} <= set(r)
    assert r["ratio"] > 0 and r["logits_max_abs_diff"] < 1e-3
    assert len(r["ours_rep_seconds"]) == len(r["hf_rep_seconds"]) == r["reps"]


@pytest.mark.slow
def test_vs_peers_reports_each_system_against_the_best_peer():
    pytest.importorskip("transformers")
    r = last_json_line("benchmarks/vs_peers.py")
    assert {"device", "flop_cut", "tokens_per_s", "best_peer", "dense_vs_best_peer", "epas_vs_best_peer", "mfu"} <= set(
        r
    )
    expected = {"dense", "epas", "hf"} | ({"litgpt"} if "litgpt" not in r["skipped"] else set())
    assert set(r["tokens_per_s"]) == expected and r["best_peer"] in {"hf", "litgpt"}
    assert all(diff < 1e-3 for diff in r["logits_max_abs_diff"].values())  # every peer computes our function
    assert r["dense_vs_best_peer"] > 0 and r["flop_cut"] > 0 and r["mfu"] is None  # no MFU without a known peak


@pytest.mark.slow
def test_lightning_overhead_reports_ratios_and_same_losses():
    r = last_json_line("benchmarks/lightning_overhead.py")
    assert {"ratio", "ratio_default", "bare_step_ms", "lightning_step_ms", "target_met"} <= set(r)
    assert r["ratio"] > 0 and r["ratio_default"] > 0
    assert r["loss_max_abs_diff"] < 1e-4  # Trainer.fit and the bare loop did the same work


@pytest.mark.slow
def test_mfu_reports_utilisation_against_measured_peaks():
    r = last_json_line("benchmarks/mfu.py")
    assert {"mfu", "mfu_vs_fp32_peak", "peak_bf16_gflops", "peak_fp32_gflops", "achieved_gflops"} <= set(r)
    assert r["mfu"] > 0 and r["peak_bf16_gflops"] > 0 and r["mfu_fp32"] > 0
    assert set(r["peak_bf16"]["by_layout"]) == {"nn", "nt", "tn"}


@pytest.mark.slow
def test_pretrain_compare_writes_every_output(tmp_path):
    r = last_json_line("experiments/pretrain_compare.py", "--out", str(tmp_path))
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
def test_serve_throughput_reports_both_budgets():
    pytest.importorskip("litserve")
    r = last_json_line("benchmarks/serve_throughput.py")
    dense, trained = r["results"]["dense"], r["results"]["trained"]
    assert dense["sharing_layers"] == 0 and trained["sharing_layers"] == r["n_layer"] // 2 > 0
    assert dense["requests_per_s"] > 0 and trained["tokens_per_s"] > 0 and "gain_tokens_per_s" in r
    assert dense["kv_cache_saving"] == 0 and trained["kv_cache_saving"] == pytest.approx(0.25)  # V-only cache
    assert r["server_exit_code"] == 0  # SIGTERM shut the server down cleanly
