"""The normwise rule (DESIGN.md, "Verdicts in low precision"): besides the per-entry rules, an implementation whose
normwise error ‖out − exact‖₂ / ‖exact‖₂ (over the entries whose truth is finite) exceeds LIMIT times that of the
right reference runs in the same dtype fails; each returned array (the output, the lse, every gradient) on its own.

The reference runs are what right kernels do in the dtype (FlashAttention's tests compare against a same-dtype
reference, normwise), all on the inputs rounded to the dtype:

- ``Wide``: straightforward, every op in float32 (float64 for float64), the result rounded to the dtype once;
- ``WideFlash``: FlashAttention-style, P = exp(s − max) rounded to the dtype before P·V, the row sums from the
  unrounded P, the rest in float32;
- ``WideReordered``: ``Wide`` with products by einsum and division as multiplication by the reciprocal.

Every run's result is rounded to the dtype under test, the lse's too (an lse that kernels return in float32 is
judged at the precision of the dtype computed in: torch's eager FlexAttention takes its scores in bfloat16).
Their normwise error is floored by the truth rounded to the dtype of the array returned (what one rounding
costs) and by FLOOR units roundoff of that dtype (where the truth is representable and no right run errs), and
raised for arrays of few entries; an array of fewer than FEWEST entries is not judged (``verdict``).  fp8 has its
own runs (FlashAttention-3's computation, ``backends/fp8.py``), which already are these.
"""

from __future__ import annotations

import math

import numpy as np

from symattn.backends.floats import FloatXP, exact_float, rounded_to, split_k, unit_roundoff

LIMIT = 2  # an array's normwise error may be at most this many times the reference runs'
FEWEST = 16  # entries (``entries``) an array needs to be judged normwise
SPREAD = 4  # the sampling allowance's: a reference over n entries is raised by 1 + SPREAD/√n
FLOOR = 0.5  # units roundoff of the returned dtype: the least reference (one rounding's normwise error is ~u/2)


class Wide(FloatXP):
    """The graph in float32 (float64 for float64) on the inputs rounded to ``dtype``; ``result`` rounds to it."""

    def __init__(self, dtype: str, arrays: dict | None = None):
        super().__init__(dtype, arrays)
        self.compute = np.dtype(np.float64 if dtype == "float64" else np.float32)

    def _out(self, a):
        return a

    def param(self, p):  # a scale passed as a Python float, read in the working precision
        return self.compute.type(exact_float(p.value))


class WideFlash(Wide):
    """FlashAttention's rounding: P = exp(s − shift) rounded to the dtype before P·V, divided by the row sum of
    the unrounded P (in the working precision); every other product's operands in the dtype (its backward's
    P and dS before dV = Pᵀ·dO, dQ = dS·K and dK = dSᵀ·Q; a projection's q, k, v between kernels)."""

    def _narrow(self, a):
        return rounded_to(a, self.dtype, self.compute)

    def matmul(self, a, b):
        return self._narrow(a) @ self._narrow(b)

    def matmul_nt(self, a, b):
        return self._narrow(a) @ np.swapaxes(self._narrow(b), -1, -2)

    def matmul_tn(self, a, b):
        return np.swapaxes(self._narrow(a), -1, -2) @ self._narrow(b)

    def weighted_sum(self, p, v):  # p: the softmax's, rounded before its normalisation
        return p @ self._narrow(v)

    def softmax_terms(self, s):
        e, z = super().softmax_terms(s)
        return self._narrow(e), z


class WideReordered(Wide):
    """``Wide`` with another order: products in two halves added (``split_k``), division as multiplication by
    the reciprocal."""

    def matmul(self, a, b):
        return split_k(a, b)

    def matmul_nt(self, a, b):
        return split_k(a, np.swapaxes(b, -1, -2))

    def matmul_tn(self, a, b):
        return split_k(np.swapaxes(a, -1, -2), b)

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            return a * (1 / z)


RUNS = (Wide, WideFlash, WideReordered)


def norm_ratio(errors: np.ndarray, exact: np.ndarray) -> float:
    """‖errors‖₂ / ‖exact‖₂ over the entries whose truth is finite (flat arrays): inf where an error there is not
    finite, 0 for no error; scaled by a power of two so that entries near 1e308 do not overflow."""
    finite = np.isfinite(exact)
    errors, exact = np.asarray(errors, dtype=np.float64)[finite], np.abs(exact[finite])
    if not np.all(np.isfinite(errors)):
        return math.inf
    top = float(max(errors.max(initial=0.0), exact.max(initial=0.0)))
    if top == 0:
        return 0.0
    unit = math.ldexp(1.0, -math.frexp(top)[1])
    above = math.sqrt(float(np.sum(np.square(errors * unit))))
    below = math.sqrt(float(np.sum(np.square(exact * unit))))
    return above / below if below else (0.0 if above == 0 else math.inf)


def rounding(exact: np.ndarray, dtype) -> float:
    """The normwise error of the truth rounded to ``dtype`` (a NumPy dtype): what returning it in that dtype costs
    at the least."""
    finite = np.isfinite(exact)
    with np.errstate(over="ignore"):
        rounded = np.where(finite, exact, 0.0).astype(dtype).astype(np.float64)
    return norm_ratio(np.abs(rounded - np.where(finite, exact, 0.0)), exact)


def entries(exact: np.ndarray) -> float:
    """How many entries a normwise measure over ``exact`` averages: (Σx²)² / Σx⁴ over its finite entries (n for
    n entries of one magnitude, 1 where one entry dominates), 0 for a truth that is all 0."""
    x = np.abs(exact[np.isfinite(exact)])
    top = float(x.max(initial=0.0))
    if top == 0:
        return 0.0
    x = x / top
    return float(np.sum(x**2)) ** 2 / float(np.sum(x**4))


def reference(runs: float, exact: np.ndarray, returned) -> float:
    """The reference runs' normwise error for one array (``runs``: the largest of theirs that is finite),
    floored by the truth's rounding to the ``returned`` dtype and FLOOR units roundoff of it, and raised by the
    sampling allowance 1 + SPREAD/√n for n = ``entries(exact)``: over few entries a normwise error is a noisy
    measure (its spread is about 1/√n), so a right implementation's can exceed the runs' by chance on a small
    array; at 1,024 tokens the allowance is under 1%."""
    returned = np.dtype(returned)
    name = "bfloat16" if "bfloat16" in returned.name else returned.name
    u = unit_roundoff(name) if name in ("float64", "float32", "float16", "bfloat16") else 2.0**-53
    n = entries(exact)
    return max(runs, rounding(exact, returned), FLOOR * u) * (1 + SPREAD / math.sqrt(n) if n else 1)


def verdict(error: float, reference_error: float, exact: np.ndarray) -> dict:
    """The rule's figures for one array: its normwise error, the reference's, their ratio and whether it passed.
    An array whose truth is 0 has no normwise error to speak of: ratio nan, passed; one of fewer than FEWEST
    entries (``entries``) is measured but not judged (``judged`` False): over so few a norm is no sharper than
    the per-entry rules, which judge it."""
    if not np.any(np.isfinite(exact) & (exact != 0)):
        return {"error": error, "reference": reference_error, "ratio": math.nan, "judged": False, "passed": True}
    ratio = error / reference_error if reference_error else (0.0 if error == 0 else math.inf)
    judged = entries(exact) >= FEWEST
    return {"error": error, "reference": reference_error, "ratio": ratio, "judged": judged,
            "passed": ratio <= LIMIT or not judged}  # fmt: skip


def runs_of(kind, graph, leaves: dict, dtype: str, names) -> dict:
    """The steps ``names`` of the graph run by ``kind`` (one of RUNS) in ``dtype``, as float64 arrays rounded to
    the dtype."""
    xp = kind(dtype, leaves)
    with np.errstate(all="ignore"):
        values = graph.values(xp, names)
    return {n: np.asarray(xp.result(values[n]), dtype=np.float64) for n in names}
