"""Certified ground truth: ``evaluate`` (evaluation.py), what it returns (result.py), the exact decisions
(decide.py), the large path (large.py), truth files (store.py: ``Truth.save``, ``load``) and the truth cache
(cache.py)."""

from symattn.truth.evaluation import check_digits, evaluate
from symattn.truth.result import CertifiedMatrix, Truth
from symattn.truth.store import load

__all__ = ["CertifiedMatrix", "Truth", "check_digits", "evaluate", "load"]
