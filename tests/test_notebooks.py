"""The notebooks run top to bottom on tiny inputs, and are committed without outputs."""

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from epas_lightning.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "epas-test-python"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernelspec for this interpreter (found through JUPYTER_PATH), our package importable, inline plots.

    Returns a scratch directory for the notebook to run in, so nothing it might write lands in the repository.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # no window: PNGs in the outputs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def text_output(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def image_count(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def test_committed_notebooks_have_no_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_prototype.ipynb", "02_read_a_run.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


def test_notebooks_use_only_the_public_api():
    """A notebook is what a user copies from: it imports epas_lightning's public names, not a private module's
    helpers (01 imported ``apply_rope`` from ``epas_lightning.model.rope``)."""
    import epas_lightning

    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module == "epas_lightning":
                assert {alias.name for alias in node.names} <= set(epas_lightning.__all__), path.name
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("epas_lightning."), f"{path.name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("epas_lightning.") for alias in node.names), path.name


@pytest.mark.slow
def test_prototype_notebook_runs_and_its_checks_pass(kernel_env):
    nb = execute("01_prototype.ipynb", kernel_env)
    out = text_output(nb)
    assert "logits identical" in out and "equivalence checks passed" in out
    assert "layer 3: output == Attn(Q_1, K_1, V_3)" in out
    assert image_count(nb) == 2  # the schedule and the FLOPs per step
    assert not list(kernel_env.iterdir())  # the notebook writes no files


@pytest.fixture(scope="module")
def tiny_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 steps of the debug config on the tiny corpus (region grows at step 8), logged like any CLI run."""
    root = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(tiny_corpus)]
    args += ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "runs")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["epas_lightning"])  # LightningCLI reads sys.argv when args are given too
        cli_main(
            [*args, "--trainer.max_steps", "16", "--sharing.interval", "8", "--trainer.enable_progress_bar", "false"]
        )
    return root / "runs" / "debug" / "version_0"


@pytest.mark.slow
def test_read_a_run_notebook_plots_a_fresh_run(tiny_run, kernel_env, monkeypatch):
    monkeypatch.setenv("EPAS_RUN_DIR", str(tiny_run))
    nb = execute("02_read_a_run.ipynb", kernel_env)
    out = text_output(nb)
    assert f"run: {tiny_run}" in out
    assert "train/device/items_per_sec" in out and "sharing/layers" in out
    assert "16 loss points" in out and "4 validation points" in out
    assert image_count(nb) == 1
    table = out[out.index("sharing layers") :].splitlines()[1:]
    assert [line.split()[:2] for line in table] == [["0", "4"], ["1", "4"]]  # 4 clean points either side of step 8


@pytest.mark.slow
def test_read_a_run_notebook_finds_the_newest_run_or_says_how_to_make_one(tiny_run, kernel_env, monkeypatch):
    monkeypatch.delenv("EPAS_RUN_DIR", raising=False)
    with pytest.raises(Exception, match="No run under runs/"):
        execute("02_read_a_run.ipynb", kernel_env)
    (kernel_env / "runs").symlink_to(tiny_run.parents[1])
    assert "run: runs/debug/version_0" in text_output(execute("02_read_a_run.ipynb", kernel_env))


def first_error(name: str, workdir: Path) -> list[str]:
    """The traceback lines of the first cell that raised when the notebook ran (it stops there)."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(workdir)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    return next(o.traceback for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error")


@pytest.mark.slow
def test_read_a_run_notebook_says_in_one_line_that_it_has_no_run_to_read(kernel_env, monkeypatch):
    """No run, an EPAS_RUN_DIR that does not exist, or one without logs: the cell showed a traceback of the notebook's
    own code above the message, where one line says what is missing and what to do."""
    monkeypatch.delenv("EPAS_RUN_DIR", raising=False)
    assert first_error("02_read_a_run.ipynb", kernel_env) == [
        "NoRun: No run under runs/ or ../runs/ logged a train/loss (validate and test runs do not). Train one (python "
        "-m epas_lightning fit --config configs/debug.yaml) or set EPAS_RUN_DIR to a runs/<name>/version_N directory."
    ]
    missing = kernel_env / "runs" / "debug" / "version_9"
    monkeypatch.setenv("EPAS_RUN_DIR", str(missing))
    assert first_error("02_read_a_run.ipynb", kernel_env) == [
        f"NoRun: {missing} does not exist: set EPAS_RUN_DIR to a run's version_N directory (runs/<name>/version_N), "
        "or unset it to read the newest fit run."
    ]
    missing.mkdir(parents=True)
    assert first_error("02_read_a_run.ipynb", kernel_env) == [
        f"NoRun: {missing} holds no TensorBoard event files and no metrics.csv: set EPAS_RUN_DIR to a run's version_N "
        "directory (runs/<name>/version_N)."
    ]
    checkpoint = missing / "checkpoints" / "last.ckpt"  # a file of the run, not its folder: said 'does not exist'
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    monkeypatch.setenv("EPAS_RUN_DIR", str(checkpoint))
    assert first_error("02_read_a_run.ipynb", kernel_env) == [
        f"NoRun: {checkpoint} is a file: set EPAS_RUN_DIR to the run's version_N directory it lies in, {missing}."
    ]
    loose = kernel_env / "notes.txt"
    loose.write_text("")
    monkeypatch.setenv("EPAS_RUN_DIR", str(loose))
    assert first_error("02_read_a_run.ipynb", kernel_env) == [
        f"NoRun: {loose} is a file: set EPAS_RUN_DIR to a run's version_N directory (runs/<name>/version_N)."
    ]


def notebook_functions(name: str) -> dict:
    """The imports, classes and functions a notebook defines, without running its cells."""
    code = "\n".join(
        c.source for c in nbformat.read(REPO / "notebooks" / name, as_version=4).cells if c.cell_type == "code"
    )
    definitions = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)
    kept = [node for node in ast.parse(code).body if isinstance(node, definitions)]
    names: dict = {"RUN_FILES": ("events.out.tfevents.*", "metrics.csv")}
    exec(compile(ast.Module(body=kept, type_ignores=[]), name, "exec"), names)
    return names


def log_scalar(folder: Path, tag: str, csv: bool = False) -> Path:
    """A run's log file holding one point of ``tag``: a CSVLogger's metrics.csv, or a TensorBoard event file."""
    folder.mkdir(parents=True)
    if csv:
        (folder / "metrics.csv").write_text(f"step,{tag}\n0,1.0\n")
        return folder / "metrics.csv"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        writer.add_scalar(tag, 1.0, 0)
    return next(folder.glob("events.out.tfevents.*"))


def test_read_a_run_notebook_finds_the_newest_run_in_a_sub_dir_or_without_a_logger_name(tmp_path):
    """The newest run was looked for at runs/<name>/version_N/ only: a TensorBoard ``sub_dir`` (events one folder
    deeper) or a logger named '' (runs/version_N) was "No run under runs/"."""
    newest_run = notebook_functions("02_read_a_run.ipynb")["newest_run"]
    runs = tmp_path / "runs"
    older = log_scalar(runs / "debug" / "version_0" / "tb", "train/loss")
    newer = log_scalar(runs / "version_3", "train/loss", csv=True)
    checkpoint = runs / "debug" / "version_1" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("")
    for i, path in enumerate([older, newer, checkpoint]):
        os.utime(path, (i, i))
    assert newest_run((runs,)) == runs / "version_3"
    os.utime(older, (9, 9))
    assert newest_run((tmp_path / "elsewhere", runs)) == runs / "debug" / "version_0"


@pytest.mark.parametrize("csv", [False, True])
def test_read_a_run_notebook_passes_over_validate_and_test_runs(tmp_path, csv):
    """`validate` and `test` log to a version folder of their own, newer than the fit run they score: the notebook
    read that folder by default and stopped with "has no train/loss: is it an epas_lightning fit run?"."""
    newest_run = notebook_functions("02_read_a_run.ipynb")["newest_run"]
    runs = tmp_path / "runs"
    fit = log_scalar(runs / "debug" / "version_0", "train/loss", csv)
    validate = log_scalar(runs / "debug" / "version_1", "val/loss", csv)
    os.utime(fit, (1, 1))
    os.utime(validate, (2, 2))
    assert newest_run((runs,)) == runs / "debug" / "version_0"
    fit.unlink()
    with pytest.raises(FileNotFoundError, match="No run under runs/ or ../runs/ logged a train/loss"):
        newest_run((runs,))


@pytest.mark.slow
def test_read_a_run_notebook_reads_a_csv_logger_run(kernel_env, monkeypatch):
    """A run logged by a CSVLogger alone has no TensorBoard event files: the notebook said it had no train/loss ("is
    it an epas_lightning fit run?"). It reads its metrics.csv, as Lightning's CSVLogger writes it (a row per logging
    call, empty cells for the metrics it did not hold)."""
    run = kernel_env.parent / "runs" / "debug" / "version_0"
    run.mkdir(parents=True)
    rows = ["epoch,sharing/layers,step,train/device/items_per_sec,train/loss,val/loss"]
    rows += [f"0,{int(step >= 4)},{step},{1000 + step if step else ''},{6 - step / 10}," for step in range(8)]
    rows += ["0,,3,,,6.2", "0,,7,,,6.1"]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("EPAS_RUN_DIR", str(run))
    nb = execute("02_read_a_run.ipynb", kernel_env)
    assert "8 loss points, 2 validation points, 7 throughput points, 8 region points" in text_output(nb)
    assert image_count(nb) == 1
