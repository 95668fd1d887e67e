"""The array interface the ops are written against (``XP``), and the base every backend derives from.

A value is whatever the backend makes of a matrix: a NumPy array, a pair (value,
error budget), an enclosure, an exact rational matrix, ...  Shapes are 2-D
``(rows, cols)``, with leading batch axes where a backend allows them.  Scores
that are not allowed are excluded: −inf in a float backend, and in any backend
an entry whose exponential is exactly 0.

``ArrayXP`` writes the composite rules once (``softmax``, ``logsumexp``,
``weighted_sum``, ``centered``, ``scaled_tanh``) in terms of the primitives.  A backend that computes one of them
better (fused, more precisely, faster) overrides it by name; no backend infers
an op from the order of the calls it receives.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class XP(Protocol):
    """What an op may ask of a backend.  ``a``, ``b``, ``g``: values; ``s``: a scalar parameter's value."""

    # Conversions.
    def leaf(self, name: str, matrix):
        """The input ``name`` (a leaf of the graph, an exact ``Matrix``) as a value."""

    def param(self, p):
        """An exact scalar parameter (``ops.Param``) as a scalar for ``scale``."""

    def const(self, c):
        """A constant array (``ops.Const``): bool arrays (allowed keys, empty rows) stay bool arrays; numeric
        ones (ALiBi's distances, integers) become values, exactly."""

    # Products.
    def matmul(self, a, b):
        """(…, m, k)·(…, k, n); exact where the backend is exact."""

    def matmul_nt(self, a, b):
        """a·bᵀ for a (…, m, k) and b (…, n, k)."""

    def matmul_tn(self, a, b):
        """aᵀ·b for a (…, k, m) and b (…, k, n)."""

    # Elementwise (b may broadcast: a row constant (…, m, 1), a row (…, 1, n)).
    def add(self, a, b):
        """a + b; an entry excluded in either is excluded."""

    def sub(self, a, b):
        """a − b; an entry excluded in either is excluded."""

    def mul(self, a, b):
        """a∘b, elementwise."""

    def div(self, a, z):
        """a / z for z a row constant (…, m, 1)."""

    def one_minus(self, a):
        """1 − a, elementwise."""

    def scale(self, a, s):
        """s·a for a scalar ``s`` from ``param``; excluded entries stay excluded."""

    def tanh(self, a):
        """tanh, elementwise; excluded entries stay excluded."""

    def scaled_tanh(self, a, inner, outer):
        """outer·tanh(inner·a) (a softcap); ``ArrayXP`` composes it from scale and tanh."""

    def exp(self, a):
        """exp, elementwise; an excluded entry gives exactly 0."""

    def log(self, z):
        """The natural log, elementwise, of positive entries (a softmax's row sums); exp's inverse, exact where
        the backend is (log 1 = 0)."""

    # Conditions (a score_mod's abs, min, max, where): bool arrays, or where a backend cannot always decide,
    # Kleene's three values as int8 arrays: 0 false, 1 unknown, 2 true (``decided``).
    def positive(self, a, strict):
        """a > 0 (``strict``) or a >= 0, elementwise; an exact backend decides exactly, a certified one never
        guesses (unknown where its enclosure cannot decide)."""

    def logical(self, op, *conditions):
        """``op`` "and", "or" (two conditions) or "not" (one), elementwise (``ArrayXP``: Kleene's logic)."""

    def select(self, condition, a, b):
        """a where the condition is true, b where it is false; where it is unknown, a value that contains
        both (a certified backend's hull)."""

    # Rows and columns.
    def mask(self, s, allowed):
        """s where ``allowed`` (bools, broadcast to s), excluded elsewhere (not a number: −inf)."""

    def shift(self, s):
        """A row constant (…, m, 1), exact in the backend, that the softmax subtracts before its exp: any one
        gives the same weights; a float backend takes each row's largest allowed entry (so no exp overflows),
        and a row with no allowed entry gets a finite one (0)."""

    def rowsum(self, a):
        """Σ over each row: (…, m, 1)."""

    def colsum(self, a):
        """Σ over each column: (…, 1, n)."""

    def fill_rows(self, a, rows, value):
        """a with the rows where ``rows`` (bools (…, m, 1)) is True set to ``value`` (0, 1, a Fraction, or
        ``semantics.NAN``) in every column."""

    def hstack(self, parts):
        """The parts side by side (concatenated along the last axis)."""

    def cols(self, a, start, stop):
        """Columns start … stop − 1."""

    def unbroadcast(self, g, like):
        """A gradient g summed over the leading axes that the value ``like`` was broadcast along (a weight's
        gradient over a batch), or g itself where the backend keeps no batch axes."""

    # Composite rules (``ArrayXP`` has the defaults).
    def scaled_scores(self, q, k, scale):
        """scale·q·kᵀ for q (…, m, n), k (…, p, n) and a scalar from ``param``."""

    def softmax(self, s, empty=None, fill=0, sink=None):
        """exp(s − shift(s)) / rowsum by rows: 0 on excluded entries; the rows where ``empty`` (bools (…, m, 1)
        from ``const``, or None when no row is empty) is True are filled with ``fill``.  With ``sink`` (a
        column (…, m, 1) of logits), the weights of each row extended by its sink, (…, m, n + 1): the sink joins
        the shift and the row sum, so a row whose entries are all excluded has weights 0 and the sink's 1."""

    def logsumexp(self, s, empty=None, kept=None, sink=None):
        """log Σ exp(s) by rows, (…, m, 1): the log of the softmax's denominator, as shift + log(rowsum(exp(s −
        shift))); excluded entries add 0.  ``empty`` (bools (…, m, 1) from ``const``: rows with no allowed entry)
        and ``kept`` (its negation), or both None: those rows' sums are 0, so their logs are excluded (−inf).
        With ``sink`` (a column (…, m, 1) of logits), the sink is one more term of each row's sum."""

    def weighted_sum(self, p, v):
        """p·v for weights p that this backend's ``softmax`` returned."""

    def centered(self, g, p, rest=None):
        """g − rowsum(g∘p) for weights p whose rows sum to 1 − ``rest`` (the weight (…, m, 1) of a sink, a key
        with no value; None: 0): the softmax's cotangent, centred."""


class ArrayXP:
    """The base of every backend: the composite rules, written once in terms of the primitives."""

    def logical(self, op, *conditions):
        values = [decided(c) for c in conditions]
        if op == "not":
            return 2 - values[0]
        return (np.minimum if op == "and" else np.maximum)(*values)

    def scaled_scores(self, q, k, scale):
        return self.scale(self.matmul_nt(q, k), scale)

    def scaled_tanh(self, a, inner, outer):
        """outer·tanh(inner·a) for scalars from ``param`` (a softcap: c·tanh(s/c)): one hook, so that a backend
        may fuse the three steps (``intervals``)."""
        return self.scale(self.tanh(self.scale(a, inner)), outer)

    def softmax(self, s, empty=None, fill=0, sink=None):
        if sink is not None:  # the sink is one more entry of the row
            s = self.hstack([s, sink])
        e, z = self.softmax_terms(s)
        if empty is None:
            return self.div(e, z)
        return self.fill_rows(self.div(e, self.fill_rows(z, empty, 1)), empty, fill)

    def softmax_terms(self, s):
        """(the numerators exp(s − shift) as the weighted sum reads them, the row sums): a kernel that rounds P
        before P·V (FlashAttention's) overrides this, the row sums staying those of the unrounded P."""
        e = self.exp(self.sub(s, self.shift(s)))  # excluded entries are -inf: exactly 0 here
        return e, self.rowsum(e)

    def logsumexp(self, s, empty=None, kept=None, sink=None):
        if sink is not None:  # the sink is one more entry of the row
            s = self.hstack([s, sink])
        top = self.shift(s)
        z = self.rowsum(self.exp(self.sub(s, top)))  # excluded entries are -inf: exactly 0 here
        if empty is None:
            return self.add(top, self.log(z))
        return self.mask(self.add(top, self.log(self.fill_rows(z, empty, 1))), kept)  # log 1 = 0, then excluded

    def weighted_sum(self, p, v):
        return self.matmul(p, v)

    def centered(self, g, p, rest=None):
        """A backend may compute it as g_j·(Σ_{k≠j} p_k + rest) − Σ_{k≠j} p_k·g_k, the same number without the
        cancellation of g_j − rowsum when p_j is nearly 1 (balls would need hundreds of bits more)."""
        return self.sub(g, self.rowsum(self.mul(g, p)))


def decided(condition) -> np.ndarray:
    """A condition as int8 Kleene values: 0 false, 1 unknown, 2 true (bools: 0 or 2)."""
    c = np.asarray(condition)
    return (c.astype(np.int8) * 2) if c.dtype == bool else c.astype(np.int8)


def true(condition) -> np.ndarray:
    """Where a condition is surely true."""
    return decided(condition) == 2


def union(a, b):
    """The excluded entries of a result from those of its operands (bool arrays, or None for none)."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b
