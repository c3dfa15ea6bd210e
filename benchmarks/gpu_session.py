"""One lent-GPU session, about 8 minutes: the CUDA-only tests (``-m cuda``: CUDA-graph decoding, the bf16 chunked
loss, fused AdamW, the preferred SDPA kernel), the MFU of the real ``fit`` path (Lightning + FSDP2 on one GPU,
``configs/tinyllama-1gpu.yaml``) and where its steps make the host wait for the GPU (``host_syncs.py``), then ours
vs LitGPT and transformers on TinyLlama-1.1B (``vs_peers.py`` on CUDA).
Writes ``gpu_session.json`` (every number), ``gpu_session.md`` (the tables for RESULTS.md) and the logs to ``--output``
(``vs_peers-b4.log`` and ``vs_peers-b4.json``, and ``-b2`` if a system the targets need ran out of memory at
micro-batch 4). Both reports are rewritten after each part, so a session stopped later keeps the parts before.

The device machine reaches no package index, so what it lacks travels as wheels (pure Python, ~19 MB)::

    python benchmarks/gpu_session.py wheels             # here, once: downloads them into .whl/ (git ignores it)
    # then one device call, carrying .whl:
    #   run(command="python3 benchmarks/gpu_session.py run --output $OUT", carry=[".whl"], timeout_s=600)

``run`` installs ``.whl/`` into ``/tmp/site`` (no dependencies resolved: the machine's torch, lightning, transformers
and tensorboard are used), then runs the parts with their own time limits (tests 75 s, fit 120 s, vs_peers 300 s), none
past ``--session-limit`` (540 s from the start, the install included), so a slow part cannot cost the others. vs_peers
times the systems the targets need first (dense, epas, LitGPT, HF), then the optional ones while its time allows, and
keeps its result so far in ``vs_peers-b4.json`` after each repetition: stopped at its limit or by an error, the table
holds what it measured and names each system it did not, and why. A package a part needs that cannot be imported
(``.whl`` not carried) stops it before any part, in one line (exit 2).

A CPU dry run of the session's own logic: ``run --skip-tests --fit-args "..." --peers-args "--device cpu --model debug
--seq-len 64 --threads 1"`` (a small ``--peers-timeout`` stops vs_peers part way).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = (
    "litgpt==0.5.13",
    "liger-kernel==0.8.5",
    "jsonargparse==4.53.0",
    "docstring-parser==0.18.0",
    "typeshed-client==2.15.0",
    "litdata==0.2.76",
    "boto3==1.44.8",
    "botocore==1.44.8",
    "s3transfer==0.19.3",
    "jmespath==1.1.0",
)
"""What the device image lacks for the fit path (jsonargparse, litdata and theirs) and the benchmark (peers, Liger)."""
SITE = Path("/tmp/site")
FIT_PACKAGES = ("jsonargparse", "litdata", "tensorboard")
PEER_PACKAGES = ("litgpt", "transformers")
"""What each part imports that a device image may lack (and, on CUDA, the peers part ``liger_kernel`` too)."""
FIT_STEPS = 60
DENSE_STEPS = (15, 30)
"""Steps whose logged rates are dense (the region switches at step 30; earlier steps include compilation)."""
EPAS_STEPS = (40, 60)
"""Steps whose logged rates are EPAS (after the switch's recompilation and a full rate window)."""
SYNC_STEPS = (33, 3)
"""The optimizer steps whose host syncs ``host_syncs.HostSyncWatch`` reports (first, count): after the region's
switch at step 30 and its recompilation, before the EPAS rate window (5 steps ending at step 40 and later)."""
MFU_TARGET = 0.45


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("wheels", help="download the wheels into .whl/ (run where pip reaches the index)")
    run = sub.add_parser(  # --fit-batch 4 is a misspelt flag, not --fit-batch-size 4
        "run", help="run the GPU comparison and the fit-path MFU (on the device machine)", allow_abbrev=False
    )
    run.add_argument("--output", "--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    run.add_argument("--batch-size", type=int, default=4, help="vs_peers micro-batch (sequences of 2048 tokens)")
    run.add_argument("--fit-batch-size", type=int, default=8, help="fit micro-batch (activation checkpointing: auto)")
    # the limits of the parts (seconds): 495 in all, and no part runs past --session-limit from the start (install
    # included), within the device call's 600; fit used 52 s of 180 (benchmarks/RESULTS.md), the tests compile cold
    run.add_argument("--tests-timeout", type=int, default=75)
    run.add_argument("--fit-timeout", type=int, default=120)
    run.add_argument("--peers-timeout", type=int, default=300)
    run.add_argument("--session-limit", type=int, default=540)
    run.add_argument("--fit-args", default="", help="more `fit` flags, space-separated (e.g. a CPU dry run)")
    run.add_argument("--peers-args", default="", help="more vs_peers flags (e.g. a CPU dry run: --device cpu)")
    run.add_argument("--skip-peers", action="store_true")
    run.add_argument("--skip-fit", action="store_true", help="a rerun of the comparison alone")
    run.add_argument("--skip-tests", action="store_true", help="a rerun without the CUDA tests")
    return p.parse_args(argv)


def download_wheels() -> None:
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "any")]
    for wheel in WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        subprocess.run([*cmd, "--implementation", "cp", *platforms, "-d", str(REPO / ".whl"), wheel], check=True)
    print(f"{len(list((REPO / '.whl').glob('*.whl')))} wheels in {REPO / '.whl'}")


def install_wheels() -> None:
    wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*pip, "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)


def check_packages(args: argparse.Namespace, cuda: bool) -> None:
    """Stop before any part runs where a package it needs cannot be imported (a device call that did not carry
    ``.whl``): one line and exit 2, instead of a ``fit`` that fails and a comparison without LitGPT and Liger after
    minutes of device time."""
    needed = [*(() if args.skip_fit else FIT_PACKAGES), *(() if args.skip_peers else PEER_PACKAGES)]
    needed += ["liger_kernel"] if cuda and not args.skip_peers else []
    importlib.invalidate_caches()  # SITE was just filled
    sys.path.insert(0, str(SITE))
    try:
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
    finally:
        sys.path.remove(str(SITE))
    if missing:
        fix = "run `python benchmarks/gpu_session.py wheels` where pip reaches the index, then carry .whl in the call"
        print(f"error: {', '.join(missing)} cannot be imported — {REPO / '.whl'} — {fix}", file=sys.stderr)
        raise SystemExit(2)


def json_text(record: object, **dumps_options: object) -> str:
    """``epas_lightning.runtime.json_text`` (strict JSON: a non-finite number is null) from this checkout, imported
    when first needed: the device machine runs this file uninstalled, and that module needs only torch."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from epas_lightning.runtime import json_text as strict_json_text

    return strict_json_text(record, **dumps_options)


def run_logged(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    """Run ``cmd`` in the repository with the carried packages importable; output to ``log``. (exit code, seconds)"""
    path = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), str(SITE)])  # benchmarks: fit's host_syncs callback
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


CUDA_TEST_FILES = (
    "tests/test_inference.py",
    "tests/test_linear_ce.py",
    "tests/test_optim.py",
    "tests/test_attention_kernels.py",
)
"""The files holding ``@pytest.mark.cuda`` tests (named, so that no other test module needs importing there)."""


def tests_part(args: argparse.Namespace, timeout: int) -> dict:
    """The tests that skip on the CPU; the summary line of pytest (e.g. ``4 passed, 52 deselected``)."""
    # one process, whatever pyproject.toml adds (pytest-xdist need not be on the device machine)
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "cuda", "-p", "no:cacheprovider"]
    cmd += CUDA_TEST_FILES
    code, seconds = run_logged(cmd, args.output / "cuda_tests.log", timeout)
    lines = (args.output / "cuda_tests.log").read_text().strip().splitlines()
    return {"command": " ".join(cmd[1:]), "exit_code": code, "wall_s": seconds, "summary": lines[-1] if lines else ""}


def fit_part(args: argparse.Namespace, timeout: int) -> dict:
    """``fit`` 60 steps of tinyllama-1gpu (dense to step 30, then half the layers sharing); rates from TensorBoard, and
    where steps 33-35 made the host wait for the GPU (``host_syncs.json``)."""
    with tempfile.TemporaryDirectory(prefix="epas_runs_") as runs:  # its logs are read here, then removed
        return fit_in(Path(runs), args, timeout)


def fit_in(runs: Path, args: argparse.Namespace, timeout: int) -> dict:
    """``fit_part`` logging into ``runs``."""
    cmd = [sys.executable, "-m", "epas_lightning", "fit", "--config", "tinyllama-1gpu"]
    cmd += [f"--trainer.max_steps={FIT_STEPS}", f"--data.batch_size={args.fit_batch_size}"]
    cmd += [f"--trainer.logger.init_args.save_dir={runs}", "--checkpoint.save_last=false", "--checkpoint.save_top_k=0"]
    syncs = args.output / "host_syncs.json"
    watch = {"output": str(syncs), "first_step": SYNC_STEPS[0], "steps": SYNC_STEPS[1]}
    cmd += ["--trainer.callbacks+=" + json_text({"class_path": "host_syncs.HostSyncWatch", "init_args": watch})]
    cmd += args.fit_args.split()
    code, seconds = run_logged(cmd, args.output / "fit.log", timeout)
    result = {"command": " ".join(cmd[1:]), "exit_code": code, "wall_s": seconds, "batch_size": args.fit_batch_size}
    events = sorted(runs.glob("tinyllama-1gpu/version_*"))
    if not events:
        return result
    result["seq_len"] = trained_block_size(events[-1])
    scalars = read_scalars(events[-1])
    for arm, (first, last) in (("dense", DENSE_STEPS), ("epas", EPAS_STEPS)):
        for key, name in (("train/device/items_per_sec", "tokens_per_s"), ("train/device/mfu", "mfu")):
            values = [v for step, v in scalars.get(key, []) if first <= step <= last]
            result[f"{arm}_{name}"] = statistics.median(values) if values else None
    memory = [v for _, v in scalars.get("train/device/peak_memory_gib", [])]
    result["peak_memory_gib"] = max(memory) if memory else None
    result["shared_layers_at_end"] = scalars.get("sharing/layers", [(None, None)])[-1][1]
    result["checkpointed_blocks"] = next(
        (
            line.split(":")[1].split("of")[0].strip()
            for line in (args.output / "fit.log").read_text().splitlines()
            if "activation_checkpointing='auto'" in line
        ),
        None,
    )
    if syncs.exists():
        result["host_syncs"] = json.loads(syncs.read_text())
    if result.get("dense_tokens_per_s") and result.get("epas_tokens_per_s"):
        result["epas_vs_dense"] = result["epas_tokens_per_s"] / result["dense_tokens_per_s"]
    return result


def trained_block_size(run_dir: Path) -> int:
    """The sequence length ``fit`` trained at (the run's ``model.config.block_size``; ``--fit-args`` may change it)."""
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["config"]["block_size"]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


PEERS_SYSTEMS = ("dense", "epas", "litgpt", "hf", "liger", "eager_ce", "torch_sdpa", "whole_compile")
"""vs_peers' systems: the targets' four (timed first), then the optional ones (after them, while time is left); a
copy of ``vs_peers.SYSTEMS`` (this process does not import vs_peers), held equal to it by a test."""
REQUIRED_PEERS_SYSTEMS = PEERS_SYSTEMS[:4]
PEERS_EXIT_S = 15
"""Seconds of vs_peers' limit kept from its ``--time-limit``: the last step or profile started, the JSON, its exit."""


def peers_part(args: argparse.Namespace, deadline: float) -> dict:
    """vs_peers on CUDA until ``deadline``; when a system the targets need runs out of memory, again at half the
    micro-batch while time is left. Every attempt's rates stay in ``attempts``."""
    batch_size, attempts = args.batch_size, []
    while True:
        result = peers_run(args, batch_size, round(deadline - time.monotonic()))
        attempts.append({k: result.get(k) for k in ("batch_size", "exit_code", "wall_s", "tokens_per_s", "missing")})
        log = (args.output / f"vs_peers-b{batch_size}.log").read_text()
        lacking = set(REQUIRED_PEERS_SYSTEMS) - set(result.get("tokens_per_s", {}))
        out_of_memory = any(lacks_memory(name, result, log) for name in lacking)
        if not out_of_memory or batch_size == 1 or deadline - time.monotonic() < 90:
            return result | {"attempts": attempts}
        batch_size //= 2


def lacks_memory(name: str, result: dict, log: str) -> bool:
    """Whether vs_peers measured no ``name`` for memory: its reason in ``skipped`` (a peer dropped) says so or, not
    skipped (ours raise, ending the run), the log does; not an optional system out of memory beside another failure."""
    reason = (result.get("skipped") or {}).get(name)
    return "OutOfMemoryError" in (log if reason is None else reason)


def peers_run(args: argparse.Namespace, batch_size: int, timeout: int) -> dict:
    """One vs_peers run; its result is its last JSON line, or what its ``--partial`` file held when it was stopped
    (a timeout, an error), with each system it had not measured in ``missing`` and why."""
    partial, log = args.output / f"vs_peers-b{batch_size}.json", args.output / f"vs_peers-b{batch_size}.log"
    cmd = [sys.executable, "benchmarks/vs_peers.py", "--device", "cuda", "--model", "tinyllama-1.1b"]
    cmd += ["--seq-len", "2048", "--batch-size", str(batch_size), "--reps", "5", "--warmup", "3", "--profile", "25"]
    cmd += ["--systems", *PEERS_SYSTEMS, "--time-limit", str(max(timeout - PEERS_EXIT_S, 0)), "--partial", str(partial)]
    cmd += args.peers_args.split()
    partial.unlink(missing_ok=True)  # an earlier session's, into the same --output: not this run's numbers
    code, seconds = run_logged(cmd, log, timeout)
    result: dict = {"command": " ".join(cmd[1:]), "exit_code": code, "wall_s": seconds, "batch_size": batch_size}
    measured = last_json_object(log.read_text()) if code == 0 else {}
    if not measured and partial.exists():
        with contextlib.suppress(ValueError):
            measured = json.loads(partial.read_text())
    result |= measured
    done = {*result.get("tokens_per_s", {}), *result.get("skipped", {})}
    if code == 124:
        why = f"timed out: vs_peers stopped at its limit, {timeout} s"
    else:
        lines = log.read_text().strip().splitlines()
        why = f"vs_peers exited with {code}: {lines[-1][:200] if lines else 'no output'}"
    missing = {name: why for name in requested_systems(cmd) if name not in done}
    return result | ({"missing": missing} if missing else {}) | ({"stopped": why} if code else {})


def requested_systems(cmd: list[str]) -> list[str]:
    """The systems vs_peers' command asks for: its last ``--systems`` (``--peers-args`` may give one)."""
    names = cmd[len(cmd) - cmd[::-1].index("--systems") :]
    return names[: next((i for i, word in enumerate(names) if word.startswith("-")), len(names))]


def last_json_object(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (vs_peers' result), whatever the process printed after it while
    it exited (the log holds stderr too: a library's warning at exit); ``{}`` where there is none."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def table(report: dict) -> str:
    rows = [f"GPU: {report['device']}; torch {report['torch']}", ""]
    if "cuda_tests" in report:
        tests = report["cuda_tests"]
        rows += [f"CUDA tests (exit {tests.get('exit_code')}): {tests.get('summary', tests.get('error'))}", ""]
    if "peers" in report:
        rows += peers_rows(report["peers"])
    if "fit" in report:
        rows += fit_rows(report["fit"])
    return "\n".join(rows).rstrip("\n") + "\n"


def peers_rows(peers: dict) -> list[str]:
    """vs_peers' table: the systems it measured (all of them or, stopped early, those it had), and the others."""
    rows = []
    if peers.get("exit_code", 0) is None:
        return ["vs_peers not run (--skip-peers)", ""]
    if "tokens_per_s" in peers:
        rows += [
            f"| system (vs_peers, {peers['model']}, {peers['seq_len']} x {peers['batch_size']}, {peers['precision']}) "
            "| tokens/s | × best peer "
            "| MFU | step peak MiB | reps |",
            "|---|---|---|---|---|---|",
        ]
        best = peers["tokens_per_s"].get(peers["best_peer"]) or float("nan")  # nan when every peer was skipped
        for name, tps in peers["tokens_per_s"].items():
            mfu = peers["mfu"][name] if peers.get("mfu") else None
            mem = (peers.get("step_peak_memory_mib") or {}).get(name)
            reps = peers.get("reps_done", {}).get(name, peers.get("reps"))
            rows.append(
                f"| {name} | {tps:,.0f} | {tps / best:.3f} | {mfu if mfu is None else f'{mfu:.3f}'} "
                f"| {mem if mem is None else f'{mem:,.0f}'} | {reps} |"
            )
        order = ", ".join(peers.get("sdpa_order") or ["torch's own"])
        rows += ["", f"targets {peers['targets']}, met {peers['targets_met']}; skipped {peers.get('skipped')}"]
        if reference := peers.get("optional_reference"):
            rows += [
                f"optional systems timed after the others, with dense again: {reference['dense_tokens_per_s']:,.0f}"
            ]
            rows[-1] += f" tokens/s in their {reference['reps_done']} reps"
        rows += [f"our SDPA kernel order (attention_kernel='auto'): {order}"]
    if "error" in peers:
        rows += [f"vs_peers part failed: {peers['error']}"]
    elif "tokens_per_s" not in peers:
        rows += [f"vs_peers measured nothing (exit {peers['exit_code']}); see vs_peers-b*.log"]
    if "stopped" in peers and "tokens_per_s" in peers:
        rows += [f"vs_peers stopped early ({peers['stopped']}): the rates above are over the reps it had done"]
    if missing := peers.get("missing"):
        reasons: dict[str, list[str]] = {}
        for name, why in missing.items():
            reasons.setdefault(why, []).append(name)
        rows += [f"not measured: {', '.join(names)} ({why})" for why, names in reasons.items()]
    return [*rows, ""]


def fit_strategy(command: str) -> str:
    """The strategy ``fit`` ran with: the config's FSDP2, or the last ``--trainer.strategy=`` of ``--fit-args``."""
    given = [flag.split("=", 1)[1] for flag in command.split() if flag.startswith("--trainer.strategy=")]
    return f"strategy {given[-1]}" if given else "FSDP2"


def fit_rows(fit: dict) -> list[str]:
    if fit.get("skipped"):
        return ["fit not run (--skip-fit)"]
    if "error" in fit:
        return [f"fit part failed: {fit['error']}"]
    rows = [
        f"| fit (Lightning + {fit_strategy(fit.get('command', ''))}, 1 GPU, batch {fit['batch_size']} x "
        f"{fit.get('seq_len')}) | tokens/s | MFU |",
        "|---|---|---|",
    ]
    for arm in ("dense", "epas"):
        tps, mfu = fit.get(f"{arm}_tokens_per_s"), fit.get(f"{arm}_mfu")
        rows.append(f"| {arm} | {tps if tps is None else f'{tps:,.0f}'} | {mfu if mfu is None else f'{mfu:.3f}'} |")
    rows += [
        "",
        f"fit (exit {fit.get('exit_code')}): peak memory {fit.get('peak_memory_gib')} GiB, blocks checkpointed "
        f"{fit.get('checkpointed_blocks')}, MFU target {MFU_TARGET} (dense) met: "
        f"{(fit.get('dense_mfu') or 0) >= MFU_TARGET}",
    ]
    if (syncs := fit.get("host_syncs")) and not syncs["cuda"]:
        rows += ["", "host syncs: not watched (no CUDA device)"]
    elif syncs:
        rows += [
            "",
            f"host syncs per optimizer step (steps {syncs['first_step']}+, {syncs['watched_steps']} watched): ",
        ]
        rows[-1] += f"{syncs['syncs_per_step']:g}" + "".join(
            f"\n- {site['per_step']:g} × {site['innermost']}, through {site['ours']}" for site in syncs["sites"]
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    """Each part in turn within its limit and the session's; after each, ``gpu_session.json`` and ``.md`` hold every
    part so far (a part that raised: its error), so a session stopped later keeps what the earlier parts measured."""
    session_deadline = time.monotonic() + args.session_limit
    install_wheels()
    import torch

    check_packages(args, torch.cuda.is_available())
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "torch": torch.__version__,
    }

    def left(limit: int) -> int:  # seconds for a part: its limit, or what the session has left
        return max(min(limit, int(session_deadline - time.monotonic())), 1)

    def deadline(limit: int) -> float:
        return time.monotonic() + left(limit)

    parts = {
        "cuda_tests": lambda: tests_part(args, left(args.tests_timeout)),
        "fit": lambda: {"skipped": True} if args.skip_fit else fit_part(args, left(args.fit_timeout)),
        "peers": lambda: {"exit_code": None} if args.skip_peers else peers_part(args, deadline(args.peers_timeout)),
    }
    for name, part in parts.items():
        if name == "cuda_tests" and args.skip_tests:
            continue
        try:
            report[name] = part()
        except Exception as error:  # noqa: BLE001 - the other parts' numbers are still written
            report[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        write_report(report, args.output)
    text = table(report)
    print(text)
    print(json_text({k: report[k] for k in ("device", "torch", "cuda_tests", "fit") if k in report}))
    return report


def write_report(report: dict, output: Path) -> None:
    """``gpu_session.json`` (every number) and ``gpu_session.md`` (the tables), each written whole."""
    text = json_text(report, indent=1)  # (and this checkout importable)
    from epas_lightning.runtime import write_whole

    write_whole(output / "gpu_session.json", text)
    write_whole(output / "gpu_session.md", table(report))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    download_wheels() if args.command == "wheels" else run(args)


if __name__ == "__main__":
    main()
