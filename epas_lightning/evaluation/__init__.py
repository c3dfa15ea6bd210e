"""Evaluation of a trained model at any sharing-region length: the held-out loss, multiple-choice accuracy on local
tasks, and lm-eval-harness (:mod:`~epas_lightning.evaluation.harness`, needs the ``eval`` extra)."""

from epas_lightning.evaluation.multiple_choice import evaluate_task, load_task, score_continuations
from epas_lightning.evaluation.perplexity import evaluate_perplexity

__all__ = ["evaluate_perplexity", "evaluate_task", "load_task", "score_continuations"]
