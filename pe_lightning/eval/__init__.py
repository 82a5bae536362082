"""Evaluation: zero-shot classification and image<->text retrieval."""

from .retrieval import recall_at_k, retrieval_eval
from .zeroshot import build_zeroshot_classifier, class_factors, zeroshot_eval

__all__ = ["build_zeroshot_classifier", "zeroshot_eval", "class_factors", "retrieval_eval", "recall_at_k"]
