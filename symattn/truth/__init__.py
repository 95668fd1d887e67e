"""Certified ground truth: ``evaluate`` (evaluation.py), what it returns (result.py), the exact decisions
(decide.py) and the large path (large.py)."""

from symattn.truth.evaluation import check_digits, evaluate
from symattn.truth.result import CertifiedMatrix, Truth

__all__ = ["CertifiedMatrix", "Truth", "check_digits", "evaluate"]
