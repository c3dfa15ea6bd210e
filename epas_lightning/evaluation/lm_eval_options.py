"""The ``lm-eval`` command's options that are lm-eval's own (``--seed``, ``--gen-kwargs``, ``--apply-chat-template``,
``--fewshot-as-multiturn``, ``--log-samples``, ``--batch-size auto``): read and checked as lm-eval 0.4.13's
``lm_eval run`` reads them, each refusal one :class:`ConfigError` before the model loads; and the per-sample files
``--log-samples`` writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from epas_lightning.errors import ConfigError
from epas_lightning.runtime import check_counts, is_real_number, is_whole_number

DEFAULT_SEED = "0,1234,1234,1234"
"""lm-eval's seeds for Python's ``random``, NumPy, torch and the few-shot sampler, where ``--seed`` is not given."""
SEED_NAMES = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
"""``simple_evaluate``'s arguments for the four seeds, in ``--seed``'s order."""
SEED_RANGES = {
    "numpy_random_seed": ("NumPy's seed (the second)", 0, 2**32 - 1),
    "torch_random_seed": ("torch's seed (the third)", -(2**63), 2**64 - 1),
}
"""The seeds NumPy and torch take (their ``ValueError`` inside lm-eval past them); Python's ``random`` and the few-shot
sampler (a ``random.Random``) take any whole number."""
SEED_FIX = (
    "give one whole number from 0 to 4294967295 for all four seeds, or four (three: the fourth is 1234) separated by "
    "commas, None for one left unseeded (e.g. 0,None,8,52)"
)
LENGTH_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "max_length"}
"""Generation kwargs lm-eval's ``HFLM`` reads itself (the stop strings, the tokens to generate, and ``max_length``: the
prompt, its left padding included, and the generated tokens together), before decoding."""


def parse_seed(seed: str | int | Sequence[int | None] | None) -> dict[str, int | None]:
    """``--seed`` as ``simple_evaluate``'s four seed arguments, read as ``lm_eval run --seed`` reads it: one value for
    all four, or three or four comma-separated (a missing fourth is lm-eval's default), ``None`` leaving one unseeded;
    each in its generator's range (:data:`SEED_RANGES`). A list (a ``--config`` file's ``seed: [0, null, 8, 52]``, as
    lm-eval's YAML config takes it) is read as those values separated by commas. ``None`` (``seed: null``) leaves all
    four unseeded, as in lm-eval's YAML config and ``--seed None``; where no seed is given, lm-eval's defaults are
    :data:`DEFAULT_SEED`."""
    from lm_eval._cli.utils import _int_or_none_list_arg_type

    if seed is None:
        text = "None"
    elif isinstance(seed, (str, int)):
        text = str(seed)
    else:
        text = ",".join(str(value) for value in seed)
    try:
        seeds = _int_or_none_list_arg_type(3, 4, DEFAULT_SEED, text)
    except ValueError as e:
        shown = repr(text) if isinstance(seed, (str, int)) else str(list(seed))
        raise ConfigError(f"{e} (got {shown})", "--seed", SEED_FIX) from e
    named = dict(zip(SEED_NAMES, seeds, strict=True))
    for name, (which, low, high) in SEED_RANGES.items():
        if named[name] is not None and not low <= named[name] <= high:
            raise ConfigError(f"{which} must be from {low} to {high}, got {named[name]}", "--seed", SEED_FIX)
    return named


AUTO_BATCH = re.compile(r"auto(?::(\d+(?:\.\d*)?|\.\d+))?")
"""lm-eval's ``--batch_size auto`` (the largest that fits, found once) and ``auto:N`` (found again N times in a run)."""


def check_batch_size(batch_size: int | str) -> None:
    """``--batch-size``: a whole number from 1, or lm-eval's ``auto`` or ``auto:N`` (N above 0)."""
    if isinstance(batch_size, str):
        match = AUTO_BATCH.fullmatch(batch_size)
        if match is None or (match[1] is not None and not float(match[1]) > 0):
            raise ConfigError(
                f"must be a whole number, auto or auto:N, got {batch_size!r}",
                "--batch-size",
                "give 1 or more, auto (the largest batch that fits, up to 64) or auto:N (found again N times)",
            )
        return
    check_counts({"--batch-size": batch_size})


def parse_gen_kwargs(values: Sequence[str] | dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``--gen-kwargs`` as ``lm_eval run --gen_kwargs`` reads it: each value a JSON object or ``key=value`` pairs
    separated by commas outside brackets and quotes (values read as Python literals, else kept as text), later keys
    replacing earlier ones; a ``--config`` file's mapping as it is, and its one text as one value, as lm-eval's YAML
    config takes them. ``None`` where none is given. Keys our decoding does not honour are refused here, before the
    model loads (:func:`~epas_lightning.evaluation.lm_eval_adapter.check_decoding_settings`)."""
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    from epas_lightning.evaluation.lm_eval_adapter import check_decoding_settings

    merged: dict[str, Any] = dict(values) if isinstance(values, dict) else {}
    texts = [values] if isinstance(values, str) else [] if isinstance(values, dict) else list(values or ())
    for value in texts:
        try:
            parsed = try_parse_json(value)
            merged.update(parsed if isinstance(parsed, dict) else key_val_to_dict(value))
        except ValueError as e:
            raise ConfigError(
                " ".join(str(e).split()),
                f"--gen-kwargs {value}",
                'give key=value pairs separated by commas (temperature=0.8,top_p=0.95,until=["\\n\\n"]), or a JSON '
                "object",
            ) from e
    check_setting_types(merged)
    check_sampling_temperature(merged)
    check_decoding_settings({k: v for k, v in merged.items() if k not in LENGTH_KEYS}, where="--gen-kwargs")
    return merged or None


def check_setting_types(kwargs: dict[str, Any]) -> None:
    """The ``--gen-kwargs`` lm-eval and our decoding read, of the types they take: a stop string or a list of them, a
    whole number of tokens, ``do_sample`` true or false (or 1 or 0: lm-eval reads ``do_sample=1`` as the int 1, which
    transformers' ``generate`` takes for true), ``temperature`` and ``top_p`` numbers from 0, ``top_k`` a whole number
    from 0 or None. (Others were a ``ValueError`` or ``TypeError`` traceback once the model had loaded.)"""

    def stops(v: object) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(item, str) for item in v))

    takes = {
        "until": ("text or a list of texts", stops),
        "do_sample": (
            "True or False (or 1 or 0)",
            lambda v: isinstance(v, bool) or (is_real_number(v) and v in (0, 1)),
        ),
        "temperature": ("a number from 0", lambda v: is_real_number(v) and v >= 0),
        "top_p": ("a number from 0", lambda v: is_real_number(v) and v >= 0),
        "top_k": ("a whole number from 0, or None", lambda v: v is None or (is_whole_number(v) and v >= 0)),
        **{key: ("a whole number from 1", lambda v: is_whole_number(v) and v >= 1) for key in LENGTH_KEYS - {"until"}},
    }
    for key, value in kwargs.items():
        if key in takes and not takes[key][1](value):
            raise ConfigError(
                f"{key} takes {takes[key][0]}, got {value!r}",
                "--gen-kwargs",
                f"give {key} {takes[key][0]}, as a Python literal (lm-eval reads -3 as -3.0)",
            )


def check_sampling_temperature(kwargs: dict[str, Any]) -> None:
    """``do_sample=True`` (or 1) at ``temperature=0``, refused before the model loads, as our decoding refuses it for a
    task (:func:`~epas_lightning.evaluation.lm_eval_adapter.check_sampling_temperature`: transformers' ``generate``
    refuses it for the export)."""
    if kwargs.get("do_sample") and "temperature" in kwargs and kwargs["temperature"] == 0:
        raise ConfigError(
            f"--gen-kwargs samples (do_sample={kwargs['do_sample']!r}) at temperature 0, which transformers' generate "
            "refuses for the export",
            "--gen-kwargs",
            "give a temperature above 0 (1 samples from the model's distribution), or do_sample=False for greedy "
            "decoding",
        )


TOKENS_TO_GENERATE = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
"""The names of the tokens to generate, in the order lm-eval reads them: the first given is the one it generates."""


def check_generation_length(kwargs: dict[str, Any] | None, context_length: int) -> None:
    """``--gen-kwargs``' tokens to generate (the first of :data:`TOKENS_TO_GENERATE` given, the one lm-eval reads)
    below the model's context length, which lm-eval's ``HFLM`` asserts once the model has loaded (room must be left for
    the prompt); ``max_length`` (the prompt and the generated tokens together) at most the context length, as our model
    has no positions past it."""
    key = next((key for key in TOKENS_TO_GENERATE if kwargs and key in kwargs), None)
    if key is not None and kwargs[key] >= context_length:
        raise ConfigError(
            f"{key} {kwargs[key]} leaves no room for a prompt in the model's context length of {context_length}",
            "--gen-kwargs",
            f"give {key} below {context_length}",
        )
    if kwargs and "max_length" in kwargs and kwargs["max_length"] > context_length:
        raise ConfigError(
            f"max_length {kwargs['max_length']} is past the model's context length of {context_length} (the prompt "
            "and the generated tokens together)",
            "--gen-kwargs",
            f"give max_length {context_length} or less, or max_gen_toks for the tokens to generate",
        )


def fewshot_turns(apply_chat_template: bool, fewshot_as_multiturn: bool | None) -> bool:
    """``--fewshot-as-multiturn`` as lm-eval settles it: on by default with ``--apply-chat-template``, refused without
    it."""
    if fewshot_as_multiturn is None:
        return apply_chat_template
    if fewshot_as_multiturn and not apply_chat_template:
        raise ConfigError(
            "few-shot examples as turns of a chat need the chat template",
            "--fewshot-as-multiturn",
            "add --apply-chat-template, or leave --fewshot-as-multiturn out",
        )
    return fewshot_as_multiturn


def check_chat_template(tokenizer_file: Path) -> None:
    """``--apply-chat-template``: a :class:`ConfigError` unless a usable chat template lies beside the tokenizer file
    (lm-eval failed on none with a traceback, once the model had loaded)."""
    from epas_lightning.serve.chat import checked_chat_template

    template, why = checked_chat_template(tokenizer_file)
    if template is None:
        raise ConfigError(
            why,
            "--apply-chat-template",
            "pass --tokenizer <a folder holding this tokenizer and its chat_template.jinja>, or leave "
            "--apply-chat-template out",
        )


def check_log_samples(log_samples: bool, output: Path | None) -> None:
    """``--log-samples`` writes into ``--output``: refused without it, as lm-eval refuses it without
    ``--output_path``."""
    if log_samples and output is None:
        raise ConfigError(
            "the samples are written into the --output folder, and none was given",
            "--log-samples",
            "add --output FOLDER",
        )


FILE_NAME_CHARACTER = re.compile(r"[\w.-]")
"""A character a task name keeps in its samples file's name (any other is ``_``: a task YAML names its task freely)."""
MAX_TASK_NAME_BYTES = 200
"""The longest task name kept whole in a file name (file names end at 255 bytes)."""


def samples_file(task: str, sharing_layers: int) -> str:
    """lm-eval's ``samples_<task>_<date>.jsonl``, with the region in place of the date: one file per task and region.
    A task name that is no file name (``my/task``, one too long) has its other characters as ``_``, cut at
    :data:`MAX_TASK_NAME_BYTES`, and the hash of the name after a dash, apart from a task named ``my_task``."""
    name = "".join(c if FILE_NAME_CHARACTER.fullmatch(c) else "_" for c in task)
    if name != task or len(name.encode()) > MAX_TASK_NAME_BYTES:
        short = name.encode()[:MAX_TASK_NAME_BYTES].decode(errors="ignore")
        name = f"{short}-{hashlib.sha256(task.encode(errors='surrogatepass')).hexdigest()[:8]}"
    return f"samples_{name}_sharing{sharing_layers}.jsonl"


def write_samples(samples: dict[int, dict[str, list[dict]]], folder: Path) -> list[str]:
    """``{region: {task: lm-eval's samples}}`` as one JSON line per sample, as ``lm_eval run --log_samples`` writes them
    (its ``EvaluationTracker.save_results_samples``, whose errors only warn); return the file names."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    names = []
    for n, tasks in samples.items():
        for task, rows in tasks.items():
            names.append(samples_file(task, n))
            with (folder / names[-1]).open("w", encoding="utf-8") as f:
                for sample in rows:
                    arguments = {
                        f"gen_args_{i}": {f"arg_{j}": value for j, value in enumerate(argument)}
                        for i, argument in enumerate(sample["arguments"])
                    }
                    sample = {  # noqa: PLW2901 - lm-eval's sanitized copy
                        **sample,
                        "arguments": arguments,
                        "resps": sanitize_list(sample["resps"]),
                        "filtered_resps": sanitize_list(sample["filtered_resps"]),
                        "target": str(sample["target"]),
                    }
                    f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return names
