"""A right implementation's rounding-error budget, propagated through the op graph (first order).

``BudgetXP`` runs the graph on pairs (value, error budget) of float64 arrays (float32
ones at kernel sizes: a budget needs its magnitudes, not its last digits).
Each operation's result is taken as stored in the dtype under test (one
rounding, ``u``) after being accumulated in the compute dtype (float32 for
float16 and bfloat16, as kernels do; ``u_c``); a dot product or sum of n terms
adds λ·√n·u_c·Σ|terms| (the probabilistic bound of Higham and Mary, "A new
approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019, instead of the worst case n·u), and errors already present
propagate through each op's derivative in magnitude.  The result bounds what a
right implementation (straightforward, reordered, blocked online softmax, in
that dtype) is off by, entry by entry, with high probability; the verifier's
default rule allows twice it (or twice the error of its reference runs, if
larger).  It is a model, not a certificate: certificates come from ``truth``.
"""

from __future__ import annotations

import math

import numpy as np

from symattn.backends.floats import FP8, exact_float, unit_roundoff
from symattn.graph.xp import ArrayXP, true
from symattn.semantics import NAN, row_shift

LAMBDA = 4.0  # Higham–Mary's λ: a bound that fails with probability about 2·exp(-λ²/2) per dot product


class Budget:
    """A value (float64, the graph's own arithmetic at the rounded inputs) and its error budget (>= 0)."""

    __slots__ = ("value", "error")

    def __init__(self, value, error):
        self.value = value
        self.error = error


class BudgetXP(ArrayXP):
    """The graph's ``xp`` over Budgets, for a dtype under test."""

    def __init__(self, dtype: str, arrays: dict, working=np.float64):
        self.u = unit_roundoff(dtype)
        self.u_c = min(self.u, unit_roundoff("float32"))  # half types accumulate in float32
        self.arrays = arrays
        self.working = working

    def _stored(self, value, error):
        """One more rounding: the result stored in the dtype (none for an infinite or nan value)."""
        with np.errstate(invalid="ignore"):
            out = np.abs(np.asarray(value, dtype=np.result_type(value, error)))
            out *= self.u
            out = np.add(out, error, out=out if out.shape == np.broadcast_shapes(out.shape, np.shape(error)) else None)
            if not np.isfinite(out).all():
                bad = np.broadcast_to(~np.isfinite(value), out.shape)
                out[bad] = np.broadcast_to(error, out.shape)[bad]
        return Budget(value, out)

    def leaf(self, name, matrix):
        value = self.arrays[name] if name in self.arrays else matrix.float64()
        value = np.asarray(value, dtype=self.working)
        return Budget(value, np.zeros_like(value))

    def param(self, p):
        v = exact_float(p.value)
        return Budget(v, self.u_c * abs(v))  # the scalar rounded to the compute dtype

    def const(self, c):
        if c.value.dtype == bool:
            return c.value
        value = c.value.astype(self.working)
        if c.value.dtype == object:  # a score_mod's rationals, rounded to the compute dtype
            return Budget(value, self.u_c * np.abs(value))
        return Budget(value, np.zeros(c.value.shape, dtype=self.working))

    def _dot(self, a, b, n):
        abs_a, abs_b = np.abs(a.value), np.abs(b.value)
        with np.errstate(over="ignore", invalid="ignore"):  # products beyond the working range: inf, no warning
            value = a.value @ b.value
            error = (LAMBDA * math.sqrt(n) * self.u_c) * (abs_a @ abs_b)
            a_err, b_err = a.error.any(), b.error.any()  # exact inputs (the leaves): no product of their errors
            if b_err:
                error += abs_a @ b.error
            if a_err:
                error += a.error @ (abs_b + b.error if b_err else abs_b)
        return self._stored(value, error)

    def matmul(self, a, b):
        return self._dot(a, b, a.value.shape[-1])

    def matmul_nt(self, a, b):
        return self._dot(a, _t(b), b.value.shape[-1])

    def matmul_tn(self, a, b):
        return self._dot(_t(a), b, a.value.shape[-2])

    def add(self, a, b):
        return self._stored(a.value + b.value, a.error + b.error)

    def sub(self, a, b):
        with np.errstate(invalid="ignore"):
            value = a.value - b.value
        return self._stored(value, a.error + b.error)

    def mul(self, a, b):
        return self._stored(a.value * b.value, np.abs(a.value) * b.error + a.error * np.abs(b.value))

    def one_minus(self, a):
        return self._stored(1 - a.value, a.error)

    def scale(self, a, s):
        value = a.value * s.value
        return self._stored(value, abs(s.value) * a.error + np.abs(a.value) * s.error)

    def tanh(self, a):
        value = np.tanh(a.value)
        return self._stored(value, (1 - value**2) * a.error + self.u_c * np.abs(value))

    def exp(self, a):
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.exp(a.value)
            if float(np.max(a.error, initial=0.0)) <= 2.0**-10:  # e**err − 1 <= err·(1 + err) <= 1.001·err
                error = value * (1.001 * a.error + 2 * self.u_c)
            else:
                error = value * np.expm1(np.minimum(a.error, 700)) + 2 * self.u_c * value
        return self._stored(value, np.where(np.isfinite(a.value), error, 0))

    def log(self, z):
        """δ log z = δz / z, plus log's own rounding."""
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.log(z.value)
            error = z.error / np.abs(z.value) + self.u_c * np.abs(value)
        return self._stored(value, np.where(np.isfinite(error), error, 0))

    def positive(self, a, strict):
        return a.value > 0 if strict else a.value >= 0

    def select(self, condition, a, b):
        """The branch the rounded values take, with its budget (abs, min and max are continuous: a right
        implementation that takes the other branch near a tie is off by about the budget of the difference)."""
        take = true(condition)
        value = np.where(take, a.value, b.value)
        error = np.where(take, a.error, b.error)
        return Budget(value, error)

    def mask(self, a, allowed):
        return Budget(np.where(allowed, a.value, -np.inf), np.where(allowed, a.error, 0))

    def shift(self, a):
        # the softmax does not depend on its shift: an error in it cancels between numerator and denominator
        top = row_shift(a.value.max(axis=-1, keepdims=True))
        return Budget(top, np.zeros_like(top))

    def _rowsum(self, a) -> tuple:
        """(the row sum, the part of its budget that is the terms' own)."""
        value = a.value.sum(axis=-1, keepdims=True)
        n = a.value.shape[-1]
        carried = a.error.sum(axis=-1, keepdims=True)
        own = LAMBDA * math.sqrt(n) * self.u_c * np.abs(a.value).sum(axis=-1, keepdims=True)
        return self._stored(value, carried + own), carried

    def rowsum(self, a):
        return self._rowsum(a)[0]

    def softmax(self, s, empty=None, fill=0, sink=None):
        """The terms over their own sum: what the terms' errors share cancels between numerator and denominator,
        δw_j = ((1 − w_j)·δe_j − w_j·Σ_{k≠j} δe_k) / z, plus the sum's and the division's own roundings.  A
        sink is one more term of each row."""
        if sink is not None:
            s = self.hstack([s, sink])
        e = self.exp(self.sub(s, self.shift(s)))
        z, carried = self._rowsum(e)
        if empty is not None:  # an empty row's sum set to 1 (its terms are all 0)
            z = Budget(np.where(empty, 1.0, z.value), np.where(empty, 0, z.error))
            carried = np.where(empty, 0, carried)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = e.value / z.value
            w = np.abs(value)
            own = z.error - carried
            error = (np.abs(1 - value) * e.error + w * (carried - e.error) + w * own) / np.abs(z.value)
            error = error + self.u_c * w
        p = self._stored(value, np.where(np.isfinite(error), error, 0))
        return p if empty is None else self.fill_rows(p, empty, fill)

    def colsum(self, a):
        value = a.value.sum(axis=-2, keepdims=True)
        n = a.value.shape[-2]
        error = a.error.sum(axis=-2, keepdims=True) + LAMBDA * math.sqrt(n) * self.u_c * np.abs(a.value).sum(
            axis=-2, keepdims=True
        )
        return self._stored(value, error)

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            value = a.value / z.value
            w = np.abs(value)
            error = (a.error + w * z.error) / np.abs(z.value)
            error = error + self.u_c * w
        return self._stored(value, np.where(np.isfinite(error), error, 0))

    def fill_rows(self, a, rows, value):
        fill = np.nan if value == NAN else float(value)
        return Budget(np.where(rows, fill, a.value), np.where(rows, 0, a.error))

    def hstack(self, parts):
        lead = np.broadcast_shapes(*(p.value.shape[:-1] for p in parts))  # a sink's column beside batched scores
        wide = [
            (np.broadcast_to(p.value, lead + p.value.shape[-1:]), np.broadcast_to(p.error, lead + p.error.shape[-1:]))
            for p in parts
        ]
        return Budget(np.concatenate([v for v, _ in wide], -1), np.concatenate([e for _, e in wide], -1))

    def cols(self, a, start, stop):
        return Budget(a.value[..., start:stop], a.error[..., start:stop])

    def unbroadcast(self, g, like):
        return g


def _t(a: Budget) -> Budget:
    return Budget(np.swapaxes(a.value, -1, -2), np.swapaxes(a.error, -1, -2))


def budgets(graph, arrays: dict, dtype: str, names=None, working=np.float64) -> dict:
    """Every step's error budget (by name) for a right implementation in ``dtype`` at the given inputs,
    computed in ``working`` precision."""
    if dtype in FP8:  # FlashAttention-3's computation (``backends/fp8.py``)
        from symattn.backends.fp8 import Fa3BudgetXP

        xp = Fa3BudgetXP(dtype, arrays, working)
    else:
        xp = BudgetXP(dtype, arrays, working)
    values = graph.values(xp, [n.name for n in graph.nodes] if names is None else names)
    return {name: v.error for name, v in values.items()}
