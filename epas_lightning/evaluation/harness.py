"""``python -m epas_lightning lm-eval --checkpoint CKPT --tasks NAME_OR_YAML [--sharing-layers N|all]``.

Runs lm-eval-harness's own evaluator (``lm_eval.simple_evaluate``) on a checkpoint of ours through the model ``epas``
(:mod:`epas_lightning.evaluation.lm_eval_adapter`), at one sharing region or at each of them, and reports one row per
region with a column per task metric. The checkpoint is loaded once; only the region changes between runs, and
every run scores the same documents.

Tasks are lm-eval task names (glob patterns too), task YAML files, or names defined in ``--include-path`` folders.
lm-eval's own task list is indexed (a few seconds) only when a name is not found in the local ones.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from epas_lightning.checkpoint import describe_checkpoint
from epas_lightning.data.tokenizer import check_tokenizer_flag, resolve_tokenizer_path
from epas_lightning.errors import ConfigError
from epas_lightning.evaluation.evaluate_cli import format_table, region_lengths, write_table
from epas_lightning.evaluation.lm_eval_documents import refusing_misscored_documents
from epas_lightning.evaluation.lm_eval_options import (
    DEFAULT_SEED,
    check_batch_size,
    check_chat_template,
    check_generation_length,
    check_log_samples,
    fewshot_turns,
    parse_gen_kwargs,
    parse_seed,
    write_samples,
)
from epas_lightning.outputs import apart_from_the_output, check_output, output_folder, writing_into
from epas_lightning.runtime import DType, emit_json, json_text, resolve_device

INSTALL = "pip install 'epas_lightning[eval]'"
OUTPUT_KIND = "lm-eval"
SUMMARY_FILE = "lm_eval.json"
TABLE_FILE = "lm_eval.csv"


def require_lm_eval() -> None:
    """A :class:`ConfigError` that says how to install the ``eval`` extra when lm-eval (or what it needs) is missing."""
    missing = []
    for name in ("lm_eval", "transformers", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"lm-eval-harness is not installed ({', '.join(missing)} missing)", "lm-eval", INSTALL)


def check_task_folder(folder: Path) -> None:
    """An ``--include-path``: a folder (a task YAML file given there is named as such)."""
    where = f"--include-path {folder}"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            "a file, not a folder of task YAMLs",
            where,
            f"pass the folder holding the task YAMLs (--include-path {folder.parent}), or give a task YAML file to "
            "--tasks",
        )
    if not folder.is_dir():
        raise ConfigError("task folder does not exist", where, "check the path")


def resolve_tasks(tasks: Sequence[str], include_path: Sequence[str | Path] = ()) -> tuple[list[str], Any]:
    """The task specs for ``simple_evaluate`` (names, glob patterns expanded, YAML files) and the ``TaskManager``."""
    from lm_eval.tasks import TaskManager

    specs = [part.strip() for task in tasks for part in str(task).split(",") if part.strip()]
    if not specs:
        raise ConfigError("no task given", "--tasks", "name an lm-eval task or a task YAML file")
    for folder in include_path:
        check_task_folder(Path(folder))
    files = [spec for spec in specs if spec.endswith((".yaml", ".yml"))]
    for file in files:
        check_task_file(Path(file))
    names = [spec for spec in specs if spec not in files]
    paths = [str(folder) for folder in include_path] or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(not _matches(name, manager.all_tasks) for name in names):
        manager = TaskManager(include_path=paths)  # lm-eval's own tasks
    unknown = [name for name in names if not _matches(name, manager.all_tasks)]
    if unknown:
        check_task_list(tasks, unknown)
        raise ConfigError(
            f"unknown lm-eval task {', '.join(unknown)}",
            "--tasks",
            "`lm_eval ls tasks` lists them; or give a task YAML file, or the folder of yours with --include-path",
        )
    return [*files, *manager.match_tasks(names)], manager


LIST_SYNTAX = re.compile(r"""[\s"']|^\[[^\]]*$|^[^\[]*\]$|^\[[^\[\]]*\]$""")
"""An unknown name from a ``--tasks`` value written as a list (``[a, b]``, ``["a", "b"]``: the names ``[a`` and ``b]``;
``[a]``) or as lm-eval's space-separated names (``a b``): quotes or spaces, which no task name has, or a bracket of a
list (a glob's ``mmlu_[ab]*`` is not one). A task file's path may have spaces: it is no name."""
LIST_PUNCTUATION = re.compile(r"""[\s"'\[\]]+""")


def check_task_list(tasks: Sequence[str], unknown: Sequence[str]) -> None:
    """A :class:`ConfigError` saying how tasks are given, for a ``--tasks`` value written as a list
    (:data:`LIST_SYNTAX` in one of its ``unknown`` names); the names it gives keep the value's known names and files."""
    for value in (str(task).strip() for task in tasks):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if any(part in unknown and LIST_SYNTAX.search(part) for part in parts):
            split = [LIST_PUNCTUATION.split(part) if part in unknown else [part] for part in parts]
            names = [name for names in split for name in names if name]
            raise ConfigError(
                f"--tasks takes task names separated by commas, not a list or spaces: unknown lm-eval task {value}",
                f"--tasks {value}",
                f"give --tasks {','.join(names)} (names separated by commas), or repeat --tasks for each",
            )


def check_task_file(path: Path) -> None:
    """A :class:`ConfigError` unless ``path`` is a YAML file lm-eval reads as a named task or group (its ``!function``
    tags are not run here)."""
    import yaml
    from lm_eval.tasks._index import TaskIndex

    if not path.is_file():
        raise ConfigError("task file does not exist", f"--tasks {path}", "check the path")
    try:
        entry = TaskIndex.entry_from_path(path)
    except (yaml.YAMLError, ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        why = " ".join(str(e).split())
    else:
        why = None if entry is not None else "it names no task or group"
    if why is not None:
        raise ConfigError(
            f"not an lm-eval task file ({why})", f"--tasks {path}", "give a task YAML with a `task:` or `group:` name"
        )


def check_lm_eval_numbers(limit: float | None, num_fewshot: int | None, bootstrap_iters: int) -> None:
    """``--limit`` above 0 (lm-eval failed on 0 and below with a traceback); ``--num-fewshot`` and
    ``--bootstrap-iters`` 0 or more."""
    if limit is not None and not limit > 0:
        raise ConfigError(
            f"must be positive, got {limit}", "--limit", "give a number of documents, or a fraction below 1"
        )
    if limit is not None and limit > sys.maxsize:  # islice's ValueError inside lm-eval
        raise ConfigError(f"must be at most {sys.maxsize}, got {limit}", "--limit", "give a smaller number")
    for flag, value in (("--num-fewshot", num_fewshot), ("--bootstrap-iters", bootstrap_iters)):
        if value is not None and value < 0:
            raise ConfigError(f"must be at least 0, got {value}", flag, "give 0 or more")


def _matches(pattern: str, names: Sequence[str]) -> bool:
    return pattern in names or any(fnmatch(name, pattern) for name in names)


def metric_columns(results: dict[str, dict]) -> dict[str, Any]:
    """lm-eval's ``results`` as ``{"<task>/<metric>": value}`` (a filter other than ``none`` in brackets), no stderr."""
    columns = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr"):
                continue
            columns[f"{task}/{metric}" + ("" if kind == "none" else f"[{kind}]")] = value
    return columns


def run_lm_eval(
    checkpoint: str | Path,
    tasks: Sequence[str],
    include_path: Sequence[str | Path] = (),
    sharing_layers: int | str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str = 16,
    bootstrap_iters: int = 100000,
    tokenizer: str | Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    force: bool = False,
    seeds: dict[str, int | None] | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    log_samples: bool = False,
    samples_into: Path | None = None,
) -> dict:
    """lm-eval on ``checkpoint`` at each requested region: ``{"rows": [one per region], "runs": {n: lm-eval's
    results, versions, n-shot, n-samples}, ...}``, and with ``log_samples`` ``"samples": {n: {task: samples}}``; or,
    given ``samples_into`` (a folder), each region's samples written there as soon as that region has run
    (:func:`~epas_lightning.evaluation.lm_eval_options.write_samples`) and not kept: one region's in memory at a time.
    ``seeds``: :func:`~epas_lightning.evaluation.lm_eval_options.parse_seed`'s (default: lm-eval's), set again before
    each region, so each region's run is the run of that region alone."""
    require_lm_eval()
    import lm_eval

    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    with apart_from_the_output():  # loading, as scoring, writes nothing into samples_into
        specs, manager = resolve_tasks(tasks, include_path)
        recorded = describe_checkpoint(checkpoint)
        lengths = region_lengths(sharing_layers, recorded, force)  # checked before the weights load
        check_generation_length(gen_kwargs, recorded.config.context_length)
        if apply_chat_template:  # before the weights load too; no tokenizer at all: EPASLM says so
            path = resolve_tokenizer_path(tokenizer) if tokenizer is not None else recorded.tokenizer_file()
            if path is not None:
                check_chat_template(path)
        lm = EPASLM(
            checkpoint,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            force=force,
            command_flags=True,
        )
    if limit is not None and limit >= 1:
        limit = int(limit)
    rows, runs, samples = [], {}, {}
    for n in lengths:
        layers = lm.set_sharing_layers(n)
        with (
            apart_from_the_output(),
            task_data_errors(),
            too_few_examples(num_fewshot),
            tasks_given_twice(),
            refusing_misscored_documents(),
            quiet_git_hash(),
        ):
            result = lm_eval.simple_evaluate(
                model=lm,
                batch_size=batch_size,  # recorded in the run's config, as lm-eval records the batch size it is given
                device=str(lm.device),
                tasks=specs,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
                gen_kwargs=gen_kwargs,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
                **(seeds or parse_seed(DEFAULT_SEED)),
            )
        rows.append({"sharing_layers": n, "shared_layers": layers, **metric_columns(result["results"])})
        runs[n] = {key: result.get(key) for key in ("results", "groups", "n-shot", "n-samples", "versions", "config")}
        if log_samples and samples_into is not None:
            with writing_into(samples_into):
                write_samples({n: result.pop("samples")}, samples_into)
        elif log_samples:
            samples[n] = result["samples"]
    summary = {
        "checkpoint": str(checkpoint),
        "trained_region": lm.loaded.region.to_record(),
        "weights_trained_region": lm.loaded.region.unrun_record(),  # a stock export's, which it runs dense
        "tasks": specs,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": fewshot_as_multiturn,
        "lm_eval_version": version("lm_eval"),
        "rows": rows,
        "runs": runs,
    }
    return {**summary, "samples": samples} if log_samples and samples_into is None else summary


@contextmanager
def quiet_git_hash() -> Iterator[None]:
    """lm-eval records the working folder's git commit by running ``git describe``, whose stderr it leaves open:
    outside a git repository every run printed "fatal: not a git repository". The same lookup, git's stderr silenced."""
    import lm_eval.evaluator

    original = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval than the ones tested: its own lookup, as it is
        yield
        return

    def git_hash() -> str | None:
        try:
            described = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
        except (subprocess.CalledProcessError, FileNotFoundError):
            try:
                from lm_eval.loggers.utils import get_commit_from_path
            except ImportError:
                return None
            return get_commit_from_path(os.getcwd())
        return described.strip().decode()

    lm_eval.evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


@contextmanager
def task_data_errors() -> Iterator[None]:
    """A task's data that lm-eval cannot load (a ``data_files`` that is not there, a Hub dataset out of reach or not
    in the cache offline) as one :class:`ConfigError`, instead of the ``datasets`` traceback."""
    try:
        yield
    except (FileNotFoundError, ConnectionError) as e:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise ConfigError(
            f"lm-eval could not load the tasks' data ({' '.join(str(e).split())})",
            "--tasks",
            "check the task's dataset_path and data_files; offline, a Hub dataset must be in the datasets cache",
        ) from e


@contextmanager
def too_few_examples(num_fewshot: int | None) -> Iterator[None]:
    """``--num-fewshot`` above the examples a task can draw them from: lm-eval's sampler raised "Sample larger than
    population" as a traceback."""
    try:
        yield
    except ValueError as e:
        if num_fewshot is None or not str(e).startswith("Sample larger than population"):
            raise
        raise ConfigError(
            f"a task has fewer than {num_fewshot} examples to draw the few-shot ones from",
            f"--num-fewshot {num_fewshot}",
            "lower --num-fewshot, or leave it out for each task's own",
        ) from e


@contextmanager
def tasks_given_twice() -> Iterator[None]:
    """A task given on its own and in a group that holds it (or in two such groups), which lm-eval runs once: its
    ``ValueError`` "Duplicate task", raised as it builds the tasks (before any scoring), was a traceback."""
    try:
        yield
    except ValueError as e:
        if not str(e).startswith("Duplicate task"):
            raise
        raise ConfigError(
            f"lm-eval runs each task once: {e}",
            "--tasks",
            "give each task once: leave out the one given on its own, or one of the groups holding it",
        ) from e


def write_outputs(summary: dict, folder: Path) -> None:
    """``lm_eval.json`` (everything but the samples), ``lm_eval.csv`` (the table: one row per region, one column per
    metric) and, with ``--log-samples``, the samples of each task and region (``samples_<task>_sharing<N>.jsonl``)."""
    summary = dict(summary)
    samples = summary.pop("samples", None)
    (folder / SUMMARY_FILE).write_text(json_text(summary, indent=2) + "\n")
    write_table(summary["rows"], folder / TABLE_FILE)
    if samples is not None:
        write_samples(samples, folder)


def lm_eval_command(
    checkpoint: Path,
    tasks: list[str],
    include_path: list[Path] | None = None,
    sharing_layers: int | Literal["all"] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str = 16,
    bootstrap_iters: int = 100000,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    force: bool = False,
    seed: int | str | Sequence[int | None] | None = DEFAULT_SEED,
    gen_kwargs: list[str] | dict[str, Any] | str | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool | None = None,
    output: Path | None = None,
    overwrite: bool = False,
    log_samples: bool = False,
    json: bool = False,
) -> None:
    """Run lm-eval-harness tasks on a checkpoint, at one sharing region or at every one (needs the eval extra).

    lm-eval's own evaluator scores the model exactly as its hf model scores the export of the same weights (the
    exported tokenizer, BOS included; the softmax over the real vocabulary). Prints a table with one row per region
    and one column per task metric; --output also writes it as lm_eval.csv, with lm-eval's full results per region
    in lm_eval.json.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        tasks: An lm-eval task or group name (glob patterns work), a task YAML file, or a comma-separated list;
            repeat the flag for more.
        include_path: A folder of task YAMLs (lm-eval's --include_path); repeat the flag for more.
        sharing_layers: Region length N (the first N layers of the trained region, in its growth order), or all for
            0..trained max; default: the trained region (an export's folder: the N it was exported with).
        num_fewshot: Few-shot examples per question (default: each task's own).
        limit: Score only the first N documents of each task (a fraction below 1); for quick checks.
        batch_size: Sequences per forward pass; or auto (lm-eval's: the largest batch that fits, up to 64, searched
            in each region for each kind of request) or auto:N (searched again N times over a region's
            log-likelihood requests).
        bootstrap_iters: Bootstrap samples for lm-eval's standard errors (0 skips them).
        tokenizer: Tokenizer file or folder (default: the one the checkpoint records).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
        seed: lm-eval's seeds for Python's random, NumPy, torch and the few-shot sampler: one whole number (0 to
            4294967295) for all four, or four separated by commas (three: the fourth is 1234), None for one left
            unseeded (0,None,8,52; None alone, or seed: null in a --config file, all four, as in lm-eval's); in a
            --config file also a list, as in lm-eval's (seed: [0, null, 8, 52]); NumPy's from 0 to 4294967295,
            torch's from -2**63 to 2**64 - 1, the others any whole number; default 0,1234,1234,1234, as lm-eval's
            where no seed is given. Set again before each region: the same seed gives the same samples and
            metrics.
        gen_kwargs: Generation settings for the generate_until tasks (a key given replaces the task's): key=value pairs
            separated by commas (values read as Python literals: temperature=0.8,do_sample=True,until=["."]) or a
            JSON object; repeat the flag for more. max_length is the prompt and the generated tokens together,
            max_gen_toks the generated ones, as lm-eval's hf model reads them. In a --config file also a mapping or
            one text, as in lm-eval's (gen_kwargs: {temperature: 0.8}).
        apply_chat_template: Render each prompt with the chat template beside the tokenizer (refused when there is
            none).
        fewshot_as_multiturn: Give the few-shot examples as turns of the chat (default: on with
            --apply-chat-template; refused without it).
        output: Folder for lm_eval.csv and lm_eval.json (default: print only).
        overwrite: Replace --output if it is an lm-eval folder written by this command.
        log_samples: Also write every document's prompt, responses and scores into --output, as lm-eval's
            --log_samples: samples_<task>_sharing<N>.jsonl per task and region.
        json: End with one JSON line of the rows.
    """
    resolve_device(device)  # before lm-eval indexes its tasks
    check_batch_size(batch_size)
    check_lm_eval_numbers(limit, num_fewshot, bootstrap_iters)
    check_tokenizer_flag(tokenizer)
    check_log_samples(log_samples, output)
    multiturn = fewshot_turns(apply_chat_template, fewshot_as_multiturn)
    require_lm_eval()
    seeds, generation = parse_seed(seed), parse_gen_kwargs(gen_kwargs)
    read = [path for path in (checkpoint, tokenizer, *(include_path or [])) if path is not None]  # no output inside
    if output is not None:  # refuse a bad output before hours of scoring
        check_output(output, OUTPUT_KIND, overwrite, read)
    arguments = (
        checkpoint, tasks, include_path or [], sharing_layers, num_fewshot, limit, batch_size, bootstrap_iters,
        tokenizer, device, dtype, force, seeds, generation, apply_chat_template, multiturn, log_samples,
    )  # fmt: skip
    if output is None:
        summary = run_lm_eval(*arguments)
        print(format_table(summary["rows"]))
    else:  # each region's samples written into the build as it ends; renamed into place once all are
        with output_folder(output, OUTPUT_KIND, overwrite, inputs=read) as build:
            summary = run_lm_eval(*arguments, samples_into=build)
            print(format_table(summary["rows"]))
            with writing_into(build):
                write_outputs(summary, build)
        samples = " and the samples (samples_<task>_sharing<N>.jsonl)" if log_samples else ""
        print(f"wrote {Path(output) / TABLE_FILE}, {SUMMARY_FILE}{samples}")
    emit_json(summary["rows"], json)
