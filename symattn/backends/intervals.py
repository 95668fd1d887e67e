"""Rigorous enclosures at kernel sizes: the graph's ``xp`` over double-float intervals (``doublefloat``).

An enclosure is only as good as its width: ``truth`` certifies from it the
entries whose enclosure is narrow enough for the digits asked and computes the
others again in Arb, on their query rows alone.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from symattn.backends.doublefloat import ETA, Iv, U, add, divide, mul, scale, split_product, up
from symattn.backends.elementary import STEPS, exp, tanh
from symattn.graph.xp import ArrayXP, true, union
from symattn.semantics import NAN


class IntervalXP(ArrayXP):
    """The graph's ``xp`` over Iv (see the module docstring for what the radii bound).  ``precise``: the
    softmax's exponentials to 2**-73 rather than 2**-62 (``elementary.exp``), for gradients."""

    def __init__(self, precise: bool = False):
        self.precise = precise

    # Conversions.
    def leaf(self, name, matrix):
        hi = np.asarray(matrix.float64(), dtype=np.float64)
        if matrix.is_float or (matrix.is_rational and _dyadic(matrix)):
            return Iv(hi)
        return _entries(matrix)

    def param(self, p):
        return scalar(p.value)

    def const(self, c):
        if c.value.dtype == bool:
            return c.value
        if c.value.dtype == object:  # a score_mod's rationals: each enclosed
            values = c.value.reshape(-1).tolist()
            if not all(Fraction(float(v)) == v for v in values):
                parts = [scalar(Fraction(v)) for v in values]
                pick = lambda f: np.array([float(f(p)) for p in parts]).reshape(c.value.shape)  # noqa: E731
                return Iv(pick(lambda v: v.hi), pick(lambda v: v.lo), pick(lambda v: v.rad))
        return Iv(c.value.astype(np.float64))  # ALiBi's integer distances, dyadic rationals: exact

    # Products.
    def _product(self, a, b) -> Iv:
        """a·b for a (…, m, n) and b (…, n, p)."""
        a, b = _materialized(a), _materialized(b)
        return Iv(*split_product(a.hi, a.lo, b.hi, b.lo, a.rad, b.rad, a.below))

    def matmul(self, a, b):
        return self._product(a, b)

    def matmul_nt(self, a, b):
        return self._product(a, _transposed(_materialized(b)))

    def scaled_scores(self, q, k, scale):
        """The scale applied to q (m × n) rather than to the product (m × p): the same exactness (a power of
        two) or the same product of enclosures, on the smaller operand."""
        return self.matmul_nt(self.scale(q, scale), k)

    def matmul_tn(self, a, b):
        return self._product(_transposed(_materialized(a)), b)

    # Elementwise.
    def add(self, a, b):
        return add(_materialized(a), _materialized(b), 1)

    def sub(self, a, b):
        return add(_materialized(a), _materialized(b), -1)

    def mul(self, a, b):
        return mul(_materialized(a), _materialized(b))

    def scale(self, a, s):
        a = _materialized(a)
        if s.lo is not None and not s.lo and not s.rad and s.hi and math.frexp(float(s.hi))[0] == 0.5:
            f = float(s.hi)  # a power of two (1/8 for d_k = 64): exact, unless it underflows
            rad = None if a.rad is None else np.where(a.rad == 0, 0.0, up(a.rad * f))
            hi, lo = a.hi * f, None if a.lo is None else a.lo * f
            with np.errstate(over="ignore", invalid="ignore"):
                inexact = hi / f != a.hi  # dividing by a power of two undoes an exact product exactly
                if lo is not None:
                    inexact |= lo / f != a.lo
            if inexact.any():  # an underflow: within η of the product, each part
                rad = (np.zeros_like(hi) if rad is None else rad) + np.where(inexact, 2 * ETA, 0.0)
            return Iv(hi, lo, rad, a.excluded)
        return scale(a, s) if np.ndim(s.hi) == 0 else mul(a, s)

    def one_minus(self, a):
        a = _materialized(a)
        one = Iv(np.ones_like(a.hi))
        return add(one, a, -1)

    def tanh(self, a):
        return tanh(_materialized(a))

    def scaled_tanh(self, a, inner, outer):
        """The multiplication by ``outer`` folded into tanh's tables when it is an exact float64 number
        (``elementary.tanh`` multiplies afterwards one below 2**-900 or above 2**900)."""
        exact = outer.lo is not None and not outer.lo and not outer.rad
        if not exact:
            return super().scaled_tanh(a, inner, outer)
        return tanh(self.scale(a, inner), float(outer.hi))

    def exp(self, a):
        return exp(_materialized(a))

    def positive(self, a, strict):
        """Never asked: a score_mod that compares values of s does not take the large path (``truth.large``)."""
        raise NotImplementedError("intervals: a score_mod's decisions are the ball path's")

    def select(self, condition, a, b):
        take = true(condition)
        a, b = _materialized(a), _materialized(b)
        return Iv(
            np.where(take, a.hi, b.hi),
            np.where(take, a.low(), b.low()),
            np.where(take, a.radius(), b.radius()),
            union(a.excluded, b.excluded),
        )

    def mask(self, a, allowed):
        """Excluded entries get hi −inf (their lo and rad mean nothing)."""
        a = _materialized(a)
        excluded = ~np.broadcast_to(allowed, a.hi.shape)
        return Iv(np.where(excluded, -np.inf, a.hi), a.lo, a.rad, union(a.excluded, excluded))

    def shift(self, a):
        """The row maxima of hi rounded up to multiples of 1/STEPS, taken as exact: the softmax does not depend
        on its shift, and ``softmax``'s exp reads it without subtracting it (``elementary.exp``)."""
        top = _materialized(a).hi.max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):
            return Iv(np.where(top == -np.inf, 0.0, np.ceil(top * STEPS) / STEPS))

    def rowsum(self, a):
        a = _materialized(a)
        return self._product(a, Iv(np.ones(a.hi.shape[:-2] + (a.hi.shape[-1], 1))))

    def softmax(self, s, empty=None, fill=0, sink=None):
        """The exponentials exp(s − shift) by the table, the shift folded into its index (``elementary.exp``),
        kept with the empty rows until read (``_Weights``).  A sink is one more entry of each row: it joins the
        shift and the row sum, and a row whose scores are all excluded gets weights exactly 0 (its sink is its
        one key)."""
        s = _materialized(s) if sink is None else self.hstack([s, sink])
        return _Weights(exp(s, self.shift(s).hi, self.precise), self, empty, fill)

    def logsumexp(self, s, empty=None, kept=None, sink=None):
        """shift + log(rowsum(exp(s − shift))) with the exponentials by the table, the shift folded into its
        index as in ``softmax``; a row with one entry not excluded (and no sink) is that entry, exactly."""
        s = _materialized(s) if sink is None else self.hstack([s, sink])
        top = self.shift(s)
        terms = exp(s, top.hi, self.precise)
        z = self.rowsum(terms)
        if empty is not None:
            z = self.fill_rows(z, empty, 1)
        out = self.add(top, self.log(z))
        if terms.one_key is not None:  # log Σ = that entry: no exp, no log
            rows, keys = terms.one_key
            out.hi[rows, 0], out.lo[rows, 0], out.rad[rows, 0] = (
                s.hi[rows, keys],
                s.low()[rows, keys],
                s.radius()[rows, keys],
            )
        return out if kept is None else self.mask(out, kept)

    def log(self, z):
        """log of each entry, in Arb from its enclosure's ends (only a softmax's row sums: H·L of them)."""
        return log(_materialized(z))

    def weighted_sum(self, p, v):
        """Weights from ``softmax`` times V: one split product of their exponentials with [V 1]."""
        if isinstance(p, _Weights):
            return p.times(_materialized(v))
        return self._product(p, v)

    def centered(self, g, p, rest=None):
        """g − rowsum(g∘p) (rows of p summing to 1 − rest): at each row's largest weight j (the one key whose
        weight can be near 1) as g_j·(Σ_{k≠j} p_k + rest) − Σ_{k≠j} p_k·g_k, sums of the others taken with p_j
        set to 0, so that no enclosure cancels there; elsewhere g_k − rowsum(g∘p), whose weight is at most
        1/2."""
        g, p = _materialized(g), _materialized(p)
        top = np.argmax(p.hi, axis=-1)[..., None]  # (…, m, 1)
        products = self.mul(g, p)
        without = self.rowsum(_zeroed(products, top))  # Σ_{k≠j} p_k·g_k
        out = self.sub(g, self.add(without, _taken(products, top)))
        total = self.rowsum(_zeroed(p, top))
        if rest is not None:
            total = self.add(total, _materialized(rest))
        value = self.sub(self.mul(_taken(g, top), total), without)
        for part, new in ((out.hi, value.hi), (out.lo, value.low()), (out.rad, value.radius())):
            np.put_along_axis(part, top, new, axis=-1)
        return out

    def colsum(self, a):
        a = _materialized(a)
        ones = Iv(np.ones(a.hi.shape[:-2] + (1, a.hi.shape[-2])))
        return self._product(ones, a)

    def div(self, a, z):
        return divide(_materialized(a), _materialized(z))

    def fill_rows(self, a, rows, value):
        a = _materialized(a)
        rows = np.broadcast_to(rows, a.hi.shape)
        if value == NAN:
            fill = Iv(np.full(a.hi.shape, np.nan))
        else:
            fill = scalar(Fraction(value))
        hi = np.where(rows, fill.hi, a.hi)
        lo = np.where(rows, fill.low(), a.low())
        rad = np.where(rows, fill.radius(), a.radius())
        return Iv(hi, lo, rad)

    def hstack(self, parts):
        parts = [_materialized(p) for p in parts]
        hi = np.concatenate([p.hi for p in parts], axis=-1)
        lo = np.concatenate([p.low() for p in parts], axis=-1)
        excluded = None
        if any(p.excluded is not None for p in parts):  # excluded entries stay excluded (a sink beside scores)
            excluded = np.concatenate(
                [np.zeros(p.hi.shape, bool) if p.excluded is None else p.excluded for p in parts], axis=-1
            )
        return Iv(hi, lo, np.concatenate([p.radius() for p in parts], axis=-1), excluded)

    def cols(self, a, start, stop):
        if isinstance(a, _Weights) and start == 0 and a.keys is None and a.empty is None:  # beside a sink: lazy
            return _Weights(a.terms, self, a.empty, a.fill, keys=stop)
        a = _materialized(a)
        return Iv(a.hi[..., start:stop], _slice(a.lo, start, stop), _slice(a.rad, start, stop))

    def unbroadcast(self, g, like):
        return g


def log(z: Iv) -> Iv:
    """log of positive enclosures entry by entry, in Arb at 128 bits from the exact double-float ends; an
    entry whose enclosure reaches 0 (or is not finite) gets an infinite radius, for Arb to settle."""
    import flint

    from symattn.backends.engines import precision

    hi, lo, rad = z.hi, z.low(), z.radius()
    out_hi, out_lo, out_rad = np.zeros(hi.shape), np.zeros(hi.shape), np.full(hi.shape, np.inf)
    arb = flint.arb
    with precision(128):
        for index in np.ndindex(hi.shape):
            h, low, r = float(hi[index]), float(lo[index]), float(rad[index])
            if not (math.isfinite(h) and math.isfinite(low) and math.isfinite(r)):
                continue
            ball = arb(h) + arb(low) + arb(0, r) if r else arb(h) + arb(low)
            if not ball > 0:
                continue
            value = ball.log()
            mid = value.mid()
            first = float(mid)
            rest = mid - arb(first)
            second = float(rest)
            err = abs(rest - arb(second))  # the low part's own rounding, which the radius covers too
            out_hi[index], out_lo[index] = first, second
            out_rad[index] = (float(value.rad()) + float(err.upper())) * 2 + 2 * ETA
    return Iv(out_hi, out_lo, out_rad)


def _slice(a, start, stop):
    return None if a is None else a[..., start:stop]


def _zeroed(a: Iv, index) -> Iv:
    """a with the entries at ``index`` (one per row, (…, m, 1)) set to exactly 0."""
    parts = []
    for part in (a.hi, a.low(), a.radius()):
        part = part.copy()
        np.put_along_axis(part, index, 0.0, axis=-1)
        parts.append(part)
    return Iv(*parts)


def _taken(a: Iv, index) -> Iv:
    """The entries at ``index`` (one per row, (…, m, 1)): a column."""
    return Iv(*(np.take_along_axis(part, index, axis=-1) for part in (a.hi, a.low(), a.radius())))


def _transposed(a: Iv) -> Iv:
    t = lambda x: None if x is None else np.swapaxes(x, -1, -2)  # noqa: E731
    return Iv(t(a.hi), t(a.lo), t(a.rad))


class _Weights:
    """A softmax's weights terms / rowsum(terms), kept as their exponentials ``terms`` until read
    (``IntervalXP.softmax``): ``IntervalXP.weighted_sum`` multiplies them by V as (terms·[V 1]) divided by its
    last column, one split product; anything else reads the weights themselves (``value``).  ``empty``:
    bools (…, m, 1) of the rows with no allowed key, filled with ``fill``, or None.  ``keys``: the weights of
    the first ``keys`` columns only (the scores' beside a sink, the last column: it joins each row's sum)."""

    def __init__(self, terms: Iv, xp: IntervalXP, empty=None, fill=0, keys=None):
        self.terms, self.xp, self.empty, self.fill, self.keys = terms, xp, empty, fill, keys
        self._value = None
        self.excluded = None

    def _one_key(self):
        """The terms' (rows, columns) of a weight exactly 1, within the columns kept."""
        if self.terms.one_key is None:
            return None
        rows, keys = self.terms.one_key
        kept = keys < (self.keys if self.keys is not None else self.terms.hi.shape[-1])
        return (rows[kept], keys[kept]) if kept.any() else None

    def _kept(self, a: Iv) -> Iv:
        return a if self.keys is None else Iv(a.hi[..., : self.keys], _slice(a.lo, 0, self.keys),
                                              _slice(a.rad, 0, self.keys), below=a.below)  # fmt: skip

    def value(self) -> Iv:
        if self._value is None:
            t, xp = self.terms, self.xp
            z = xp.rowsum(t)
            if self.empty is not None:
                z = xp.fill_rows(z, self.empty, 1)
            w = divide(self._kept(t), z)
            one = self._one_key()
            if one is not None:  # exactly 1 there, and exactly 0 beside it (excluded entries)
                rows, keys = one
                w.hi[rows, keys], w.lo[rows, keys], w.rad[rows, keys] = 1.0, 0.0, 0.0
            self._value = w if self.empty is None else xp.fill_rows(w, self.empty, self.fill)
        return self._value

    def times(self, v: Iv) -> Iv:
        ones = Iv(np.ones(v.hi.shape[:-1] + (1,)), None if v.lo is None else np.zeros(v.hi.shape[:-1] + (1,)))
        extended = Iv(
            np.concatenate([v.hi, ones.hi], axis=-1),
            None if v.lo is None else np.concatenate([v.lo, ones.lo], axis=-1),
            None if v.rad is None else np.concatenate([v.rad, np.zeros(ones.hi.shape)], axis=-1),
        )
        product = self.xp._product(self._kept(self.terms), extended)  # the terms' bound (below) saves a pass
        numerator = Iv(product.hi[..., :-1], _slice(product.lo, 0, -1), _slice(product.rad, 0, -1))
        z = Iv(product.hi[..., -1:], _slice(product.lo, -1, None), _slice(product.rad, -1, None))
        if self.keys is not None:  # the columns left out (a sink's) join the row sums
            t = self.terms
            z = add(z, self.xp.rowsum(Iv(t.hi[..., self.keys :], _slice(t.lo, self.keys, None),
                                         _slice(t.rad, self.keys, None))), 1)  # fmt: skip
        out = divide(numerator, z)
        one = self._one_key()
        if one is not None:  # one weight of exactly 1: that row of V, exactly
            rows, keys = one
            out.hi[rows], out.lo[rows], out.rad[rows] = v.hi[keys], v.low()[keys], v.radius()[keys]
        if self.empty is not None:  # an empty row's terms are all 0 (z too): its filled weights times V
            rows = np.broadcast_to(self.empty, out.hi.shape[:-1] + (1,))[..., 0]
            if rows.any():
                fill = self.xp.fill_rows(
                    Iv(np.zeros(self.terms.hi[rows].shape)), np.ones((int(rows.sum()), 1), bool), self.fill
                )
                filled = self.xp._product(fill, v) if out.hi.ndim == 2 else None
                if filled is None:  # batched: the filled weights of every row, those rows kept
                    filled = self.xp._product(self.value(), v)
                    filled = Iv(filled.hi[rows], filled.low()[rows], filled.radius()[rows])
                out.hi[rows], out.lo[rows], out.rad[rows] = filled.hi, filled.low(), filled.radius()
        return out


def _materialized(a):
    if isinstance(a, _Weights):
        return a.value()
    return a


def result(value) -> Iv:
    """A graph value as an Iv (a softmax's weights computed if they were kept lazy)."""
    return _materialized(value)


def scalar(value) -> Iv:
    """An exact scalar as a double-float with its radius (Arb at 160 bits)."""
    if isinstance(value, Fraction):
        hi = float(value)
        rest = value - Fraction(hi)
        lo = float(rest)
        err = abs(rest - Fraction(lo))
        return Iv(np.array(hi), np.array(lo), np.array(float(err) * 2 + 2 * ETA if err else 0.0))
    import flint

    from symattn.backends.engines import precision
    from symattn.entries import ball

    with precision(160):
        b = ball(value, 160)
        mid = b.mid()
        hi = float(mid)
        rest = mid - flint.arb(hi)  # exact: mid's 160 bits less its own leading 53
        lo = float(rest)
        err = abs(rest - flint.arb(lo))  # lo's own rounding (exact in Arb), which the radius must cover too
        rad = (float(b.rad()) + float(err.upper())) * 2 + abs(hi) * 2.0**-150 + 2 * ETA
    return Iv(np.array(hi), np.array(lo), np.array(rad))


def _entries(matrix) -> Iv:
    """A matrix of exact entries that are not all float64 numbers, as double-floats."""
    rows = [[scalar(e) for e in row] for row in matrix.rows]
    pick = lambda f: np.array([[float(f(v)) for v in row] for row in rows])  # noqa: E731
    return Iv(pick(lambda v: v.hi), pick(lambda v: v.lo), pick(lambda v: v.rad))


def _dyadic(matrix) -> bool:
    """A rational matrix whose entries are float64 numbers exactly."""
    r = matrix.ratmat
    den = r.den
    if den & (den - 1):
        return False
    return all(Fraction(float(Fraction(n, den))) == Fraction(n, den) for n in r.num.reshape(-1).tolist())


def enclose(graph, names) -> dict:
    """Enclosures (Iv) of the steps ``names`` of the graph: forward ones, and backward ones (names with a d
    prefix, of this graph's query rows: a query-row block's gradients of keys and values are its rows' share)."""
    # a gradient summed over every query row (dk, dv) may cancel far below its terms: its weights' relative error
    # decides its digits, and the precise exponentials give it about 11 more bits
    xp = IntervalXP(precise=any(graph.step(name).backward for name in names))
    with np.errstate(all="ignore"):
        values = graph.values(xp, names)
        return {name: result(v) for name, v in values.items()}


def certifiable(mid: np.ndarray, rad: np.ndarray, digits: int) -> np.ndarray:
    """Bools: every number in [mid − rad, mid + rad] has the same ``digits``-digit decimal rounding (decided
    in floats where that is safe, else by Python's correctly rounded formatting of both ends)."""
    with np.errstate(all="ignore"):
        # outward: each end's rounding (at most u·(|mid| + rad)) is below the margin when rad <= 7|mid|, and
        # for a wider radius both ends have opposite signs anyway
        width = np.abs(mid)
        width *= 2.0**-50
        width += rad
        width += 2.0**-1070
        lo, hi = mid - width, mid + width
        ok = np.isfinite(lo) & np.isfinite(hi) & ((lo > 0) | (hi < 0))  # an enclosure of zero never certifies
        small = np.where(ok, np.minimum(np.abs(lo), np.abs(hi)), 1.0)
        large = np.where(ok, np.maximum(np.abs(lo), np.abs(hi)), 1.0)
        e = np.floor(np.log10(small))
        power = 10.0**e
        same_decade = (small >= power * (1 + 1e-14)) & (large <= 10.0 * power * (1 - 1e-14))
        scale = 10.0 ** (digits - 1 - e)
        t_lo, t_hi = small * scale, large * scale  # both in [10**(digits-1), 10**digits), each off by ≤ 4 ulps
        margin = 8 * U * 10.0**digits
        frac_lo, frac_hi = t_lo - np.floor(t_lo), t_hi - np.floor(t_hi)
        clear = (np.abs(frac_lo - 0.5) > margin) & (np.abs(frac_hi - 0.5) > margin)
        fast = ok & same_decade & clear & (margin < 0.1)
        decided = fast & (np.floor(t_lo + 0.5) == np.floor(t_hi + 0.5))
    undecided = ok & ~fast
    for index in zip(*np.nonzero(undecided), strict=True):
        a, b = float(lo[index]), float(hi[index])
        decided[index] = f"{a:.{digits - 1}e}" == f"{b:.{digits - 1}e}"
    return decided


def exact_string(hi: float, lo: float, rad: float, digits: int) -> str | None:
    """The certified string of hi + lo ± rad from its exact ends, or None."""
    from symattn.certify import certified_string

    center = Fraction(hi) + Fraction(lo)
    return certified_string(center - Fraction(rad), center + Fraction(rad), digits)


def strings(mid: np.ndarray, digits: int) -> list:
    """The ``digits``-digit decimal strings of the midpoints (the decimal module's layout)."""
    from symattn.certify import layout

    out = []
    for v in mid.reshape(-1).tolist():
        text = f"{v:.{digits - 1}e}"
        mantissa, _, exponent = text.partition("e")
        negative = mantissa.startswith("-")
        coefficient = mantissa.lstrip("-").replace(".", "")
        out.append(layout(negative, coefficient, int(exponent) - digits + 1))
    return out
