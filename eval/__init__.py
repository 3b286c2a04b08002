"""Evaluation of trained and generated ViTs: batched metrics, selection on validation, reports."""

from vitzoo.eval.evaluation import Result, evaluate

__all__ = ["Result", "evaluate"]
