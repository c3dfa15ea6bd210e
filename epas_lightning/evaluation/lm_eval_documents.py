"""Multiple-choice documents that lm-eval would score wrong, refused in one line before any scoring.

lm-eval sets a task up from its first document, reading its choices' first characters and the choice its label
names: an empty choice or a label past the choices there was an IndexError traceback. In the documents after it, an
empty choice was scored (with ``target_delimiter: ""`` as certain, log-likelihood 0: it won every question it was in)
and a label outside the choices counted the question wrong, with only a warning in lm-eval's log. ``evaluate
--tasks`` refuses both (:mod:`epas_lightning.evaluation.multiple_choice`); ``lm-eval`` refuses them once lm-eval has
built its tasks, in the documents it is about to score (``--limit``'s), naming the task and lm-eval's ``doc_id``.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from epas_lightning.errors import DataError

CHOICE_FIX = "give every choice its text (the separating space included), or leave that document out"


@contextmanager
def refusing_misscored_documents() -> Iterator[None]:
    """Within, ``lm_eval.simple_evaluate`` checks the multiple-choice documents it is about to score, and lm-eval's
    IndexError at a first document's empty choice or label is one line too: a :class:`DataError` naming the task."""
    import lm_eval.evaluator

    original = getattr(lm_eval.evaluator, "evaluate", None)

    def evaluate(
        lm: Any, task_dict: Any, limit: float | None = None, samples: dict | None = None, **kwargs: Any
    ) -> Any:
        from lm_eval.evaluator_utils import get_sample_size

        for name, task in _tasks(task_dict):  # the documents evaluate scores, as it picks them
            picked = samples.get(name) if samples else None
            size = get_sample_size(task, limit)
            documents = task.doc_iterator(rank=lm.rank, limit=size, world_size=lm.world_size, samples=picked)
            check_documents(name, task, documents)
        return original(lm, task_dict, limit=limit, samples=samples, **kwargs)

    if original is not None:  # another lm-eval than the ones tested: its own evaluation, as it is
        lm_eval.evaluator.evaluate = evaluate
    try:
        yield
    except IndexError as e:
        error = _first_document_error(e.__traceback__)
        if error is None:
            raise
        raise error from e
    finally:
        if original is not None:
            lm_eval.evaluator.evaluate = original


def check_documents(name: str, task: Any, documents: Iterable[tuple[int, Any]]) -> None:
    """A :class:`DataError` for the first of ``documents`` (``doc_id``, document) of a multiple-choice ``task`` that has
    an empty choice or a label (or one of its labels) that is not one of its choices."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or task.config.doc_to_choice is None:
        return
    if getattr(task, "multiple_input", 0):  # the choices are contexts, the target the continuation
        return
    for doc_id, document in documents:
        choices = task.doc_to_choice(document)
        if "" in choices:
            certain = "" if task.config.target_delimiter else ", which lm-eval scores as certain (log-likelihood 0)"
            raise DataError(f"{_document(name, doc_id)} has an empty choice{certain}", "--tasks", CHOICE_FIX)
        target = task.doc_to_target(document)
        for label in target if isinstance(target, list) else [target]:
            label = int(label) if isinstance(label, numbers.Integral) else label  # a NumPy one: lm-eval's index too
            if isinstance(label, int) and 0 <= label < len(choices) or isinstance(label, str) and label in choices:
                continue
            raise _label_error(name, doc_id, label, choices)


def _document(name: str, doc_id: int) -> str:
    return f"task {name}: document {doc_id} (lm-eval's doc_id)"


def _label_error(name: str, doc_id: int, label: Any, choices: list) -> DataError:
    return DataError(
        f"{_document(name, doc_id)} has label {json.dumps(label, ensure_ascii=False)}, not one of its "
        f"{len(choices)} choices",
        "--tasks",
        f"give the index of the right choice, 0 to {len(choices) - 1}, or leave that document out",
    )


def _tasks(task_dict: Any) -> Iterator[tuple[str, Any]]:
    """The tasks of lm-eval's task dictionary by name (its ``tasks``, or the tasks of its older nested form)."""
    from lm_eval.api.task import Task

    for key, value in task_dict.items():
        if isinstance(value, Task):
            yield (key if isinstance(key, str) else value.config.task), value
        elif isinstance(value, dict):
            yield from _tasks(value)


def _first_document_error(trace: TracebackType | None) -> DataError | None:
    """The error for the IndexError lm-eval raised setting a task up (the innermost frame: ``__init__``) at its first
    document's empty choice (it reads the choice's first character) or at a label past its choices; else ``None``."""
    frame = None
    while trace is not None:
        frame, trace = trace.tb_frame, trace.tb_next
    if frame is None or frame.f_code.co_name != "__init__":
        return None
    if not frame.f_code.co_filename.endswith(os.path.join("lm_eval", "api", "task.py")):
        return None
    found = frame.f_locals
    name = getattr(getattr(found.get("self"), "config", None), "task", None)
    if name is None:
        return None
    if found.get("choice", None) == "":
        return DataError(f"lm-eval cannot set up task {name}: its first document has an empty choice", "--tasks",
                         CHOICE_FIX)  # fmt: skip
    label, choices = found.get("test_target"), found.get("test_choice")
    if isinstance(label, int) and isinstance(choices, list) and not label < len(choices):
        return _label_error(name, 0, label, choices)
    return None
