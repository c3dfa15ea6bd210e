"""Evaluation of a trained model at any sharing-region length: held-out perplexity and multiple-choice accuracy."""

from epas_lightning.evaluation.multiple_choice import evaluate_task, load_task, score_continuations
from epas_lightning.evaluation.perplexity import evaluate_perplexity

__all__ = ["evaluate_perplexity", "evaluate_task", "load_task", "score_continuations"]
