"""Rigorous enclosures at kernel sizes: double-float intervals over whole matrices, the graph's ``xp``.

Every value is an array triple (hi, lo, rad): the exact value of each entry
lies within rad of hi + lo (a double-float midpoint, lo much smaller than hi,
and a float64 radius).  The arithmetic is vectorized NumPy:

- products ``a·b`` split each operand into integers and fractions after
  scaling rows (columns) by powers of two (the idea of Ozaki, Ogita, Oishi and
  Rump, "Error-free transformations of matrix multiplication", Numer. Algorithms
  59, 2012): the product of the integer parts is exact in float64 whatever the
  order of summation, and the rest is 2⁻²¹ smaller, so its a-priori error
  γ_n·Σ|terms| is negligible;
- sums (a softmax's row sum) are products with a column of ones, split the same way;
- ``exp`` reduces its argument to r = x − k/1024 (exact) and multiplies a
  double-float table value exp(k/1024) (from Arb) by 1 + expm1(r), expm1(r)
  by its Taylor polynomial of degree 5 (|r| ≤ 2⁻¹¹: truncation < 2⁻⁶⁴·|r|);
- elementwise sums and products use the error-free TwoSum and Dekker's
  TwoProduct; the radii bound everything not carried exactly, by the standard
  bounds (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1: a
  dot product of n terms is off by at most γ_n·Σ|terms|, γ_n = n·u/(1 − n·u),
  u = 2⁻⁵³; one IEEE operation by u·|result|; underflow by η = 2⁻¹⁰⁷⁴ each),
  with Σ|a_k||b_k| bounded by ‖a‖·‖b‖ (Cauchy–Schwarz) where it is small
  anyway, and each radius formula's own roundings covered by a relative 2⁻⁴⁴.

What the certificate assumes: IEEE float64 arithmetic in round-to-nearest, and
BLAS computing each entry of a product as some sequence of float64 operations
on the operands (OpenBLAS, MKL and Accelerate do; no Strassen-like schemes).
``tanh`` (softcap) is NumPy's, assumed within TANH_ULPS_ASSUMED ulps and used
with a safety factor of 4; tests/test_intervals.py checks it and the exp here
against Arb on many random arguments.

An enclosure is only as good as its width: ``truth`` certifies from it the
entries whose enclosure is narrow enough for the digits asked and computes the
others again in Arb, on their query rows alone.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

from .graph import NAN

U = 2.0**-53  # unit roundoff of float64
ETA = 2.0**-1074  # smallest subnormal: the absolute error of an underflow
TANH_ULPS_ASSUMED = 2.0
TANH_ULPS = 4 * TANH_ULPS_ASSUMED
ULP = 2.0**-52  # one ulp relative to a value's magnitude, at most
INFLATE = 1 + 2.0**-44  # each radius formula's own roundings, with a large margin
SPLIT = 134217729.0  # 2**27 + 1: Dekker's splitter
STEPS = 1024  # exp's table: exp(k / STEPS)
EXP_LOW, EXP_HIGH = -746, 3  # the table's range: exp underflows below, and the softmax's arguments are ≤ 0


def gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u), rounded up generously."""
    return n * U / (1 - n * U) * (1 + 2.0**-40)


def _up(r):
    """A radius computed in round-to-nearest, made an upper bound of the quantity it estimates."""
    return r * INFLATE + 4 * ETA


class Iv:
    """Entries within ``rad`` of hi + lo (lo, rad None: zero).  ``excluded``: masked score entries (hi −inf)."""

    __slots__ = ("hi", "lo", "rad", "excluded")

    def __init__(self, hi, lo=None, rad=None, excluded=None):
        self.hi, self.lo, self.rad, self.excluded = hi, lo, rad, excluded

    @property
    def shape(self) -> tuple:
        return self.hi.shape

    def low(self):
        return np.zeros_like(self.hi) if self.lo is None else self.lo

    def radius(self):
        return np.zeros_like(self.hi) if self.rad is None else self.rad

    def mid(self):
        """hi + lo rounded to float64."""
        return self.hi if self.lo is None else self.hi + self.lo

    def collapsed(self) -> tuple:
        """(mid, rad) with mid = fl(hi + lo) and rad covering that rounding."""
        if self.lo is None:
            return self.hi, self.radius()
        mid = self.hi + self.lo
        with np.errstate(invalid="ignore"):
            rad = _up(self.radius() + U * np.where(np.isfinite(mid), np.abs(mid), 0.0))
            rad[(self.lo == 0) & (self.radius() == 0)] = 0.0  # hi alone, exactly
        return mid, rad


def two_sum(a, b):
    """s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    c = SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a, b):
    """p + e = a·b exactly (Dekker; |a|, |b| below 2**995, no underflow in the parts)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _norms(a, axis=-1) -> np.ndarray:
    """Upper bounds of the 2-norms along ``axis``."""
    n = a.shape[axis]
    squares = np.einsum("...ij,...ij->...i", a, a) if axis == -1 else np.einsum("...ji,...ji->...i", a, a)
    return _up(np.sqrt(squares) * (1 + gamma(n + 2)))


def _exponents(m) -> np.ndarray:
    """e with max|row| < 2**e (0 for a zero row)."""
    _, e = np.frexp(m)
    return e


def split_product(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo)·(b_hi + b_lo) as (hi, lo, rad) with hi + lo within rad of the exact product (see the
    module docstring); the low parts (at most a few ulps of the high ones) join the fractions."""
    n = a_hi.shape[-1]
    beta = (52 - max(1, math.ceil(math.log2(max(n, 2))))) // 2
    ea = beta - _exponents(np.abs(a_hi).max(axis=-1, keepdims=True))  # rows of a, columns of b below 2**beta
    eb = beta - _exponents(np.abs(b_hi).max(axis=-2, keepdims=True))
    a_s, b_s = np.ldexp(a_hi, ea), np.ldexp(b_hi, eb)
    a_int, b_int = np.rint(a_s), np.rint(b_s)
    a_frac, b_frac = a_s - a_int, b_s - b_int  # exact
    if a_lo is not None:
        a_frac += np.ldexp(a_lo, ea)  # rounded: within u·|a_frac|, covered below
    if b_lo is not None:
        b_frac += np.ldexp(b_lo, eb)
        b_s = b_int + b_frac  # rounded: within u·|b_s|
    exact = a_int @ b_int  # integers below n·2**(2·beta) <= 2**52: every partial sum exact
    rest = a_int @ b_frac
    rest += a_frac @ b_s
    hi, lo = two_sum(exact, rest)
    # the rest's error: γ_n·T for T = |a_int|·|b_frac| + |a_frac|·|b_s|, plus the fractions' and the final
    # sum's roundings (3u·T), the radius formula's own roundings (INFLATE) and underflows (η each); T by
    # products of absolute values when the output is narrow, else by Cauchy–Schwarz from row and column norms,
    # scaled back to the product's units before the outer product
    coefficient = (gamma(n + 2) + 3 * U) * INFLATE * (1 + gamma(2 * n + 4))
    shift = -ea - eb  # undo the scalings: exact powers of two
    floor = 10 * n * ETA * 2.0 ** float(np.max(shift, initial=0)) + 4 * ETA
    if b_hi.shape[-1] * 4 <= n:
        total = np.abs(a_int) @ np.abs(b_frac)
        total += np.abs(a_frac) @ np.abs(b_s)
        rad = np.ldexp(total * coefficient, shift) + floor
    else:
        row_scale, col_scale = np.ldexp(coefficient, -ea)[..., 0], np.ldexp(1.0, -eb)[..., 0, :]
        rad = np.multiply.outer(_norms(a_int) * row_scale, _norms(b_frac, axis=-2) * col_scale)
        rad += np.multiply.outer(_norms(a_frac) * row_scale, _norms(b_s, axis=-2) * col_scale)
        rad += floor
    if a_hi.ndim == 2:  # a row of a and a column of b of nothing but integer parts: exact there
        rows, cols = ~a_frac.any(axis=-1), ~b_frac.any(axis=-2)
        if rows.any() and cols.any():
            rad[np.ix_(rows, cols)] = 0.0
    return np.ldexp(hi, shift), np.ldexp(lo, shift), rad


@lru_cache(maxsize=1)
def exp_table():
    """exp(k / STEPS) for k from EXP_LOW·STEPS to EXP_HIGH·STEPS as double-floats (hi, lo), from Arb at 160 bits:
    a table of exp(k1) times one of exp(k2 / STEPS), multiplied as double-floats and checked against Arb."""
    import flint

    saved = flint.ctx.prec
    flint.ctx.prec = 160
    try:

        def pairs(values):
            hi, lo = [], []
            for v in values:
                mid = v.mid()
                h = float(mid)
                hi.append(h)
                lo.append(float(mid - flint.arb(h)))
            return np.array(hi), np.array(lo)

        big_hi, big_lo = pairs([flint.arb(k).exp() for k in range(EXP_LOW, EXP_HIGH + 1)])
        small_hi, small_lo = pairs([(flint.arb(k) / STEPS).exp() for k in range(STEPS)])
    finally:
        flint.ctx.prec = saved
    # every k = k1·STEPS + k2 (0 <= k2 < STEPS): exp(k1)·exp(k2/STEPS) as a double-float
    a_hi, a_lo = np.repeat(big_hi, STEPS), np.repeat(big_lo, STEPS)
    b_hi, b_lo = np.tile(small_hi, len(big_hi)), np.tile(small_lo, len(big_hi))
    with np.errstate(under="ignore"):
        p, e = two_prod(a_hi, b_hi)
        lo = e + (a_hi * b_lo + a_lo * b_hi)
        hi, lo = two_sum(p, lo)
    return hi, lo


# relative error of a table entry: the two Arb roundings (2**-106 each), the cross terms' roundings and the
# dropped a_lo·b_lo; subnormal entries are covered by the absolute ETA terms
TABLE_ERROR = 2.0**-100


class IntervalXP:
    """The graph's ``xp`` over Iv (see the module docstring for what the radii bound)."""

    # Conversions.
    def leaf(self, name, matrix):
        hi = np.asarray(matrix.float64(), dtype=np.float64)
        if matrix.is_float or (matrix.is_rational and _dyadic(matrix)):
            return Iv(hi)
        return _entries(matrix)

    def param(self, p):
        return _scalar(p.value)

    def const(self, c):
        if c.value.dtype == bool:
            return c.value
        return Iv(c.value.astype(np.float64))  # ALiBi's integer distances: exact

    # Products.
    def _product(self, a: Iv, b: Iv):
        """a·b for a (…, m, n) and b (…, n, p)."""
        hi, lo, rad = split_product(a.hi, a.lo, b.hi, b.lo)
        if a.rad is None and b.rad is None:
            return Iv(hi, lo, rad)
        # the radii carried in: ra·(|b| + rb) + |a|·rb, by products when the output is narrow (a softmax's
        # weights times V), else by Cauchy–Schwarz
        n = a.hi.shape[-1]
        if b.hi.shape[-1] * 4 <= n:
            abs_b = np.abs(b.hi) if b.lo is None else np.abs(b.hi) + np.abs(b.lo)
            bound = 0.0
            if a.rad is not None:
                bound = a.rad @ (abs_b if b.rad is None else abs_b + b.rad)
            if b.rad is not None:
                bound = bound + (np.abs(a.hi) if a.lo is None else np.abs(a.hi) + np.abs(a.lo)) @ b.rad
            rad += bound * (1 + gamma(n + 2))
            return Iv(hi, lo, _up(rad))
        na = _norms(np.abs(a.hi) if a.lo is None else np.abs(a.hi) + np.abs(a.lo))
        nb = _norms(np.abs(b.hi) if b.lo is None else np.abs(b.hi) + np.abs(b.lo), axis=-2)
        bound = 0.0
        if a.rad is not None:
            bound = np.multiply.outer(_norms(a.rad), nb if b.rad is None else nb + _norms(b.rad, axis=-2))
        if b.rad is not None:
            bound = bound + np.multiply.outer(na, _norms(b.rad, axis=-2))
        rad += bound
        return Iv(hi, lo, _up(rad))

    def matmul(self, a, b):
        if isinstance(a, _Quotient):
            return a.times(b)
        return self._product(a, b)

    def matmul_nt(self, a, b):
        return self._product(a, _transposed(b))

    def matmul_tn(self, a, b):
        return self._product(_transposed(_materialized(a)), b)

    # Elementwise.
    def add(self, a, b):
        return _add(_materialized(a), _materialized(b), 1)

    def sub(self, a, b):
        if isinstance(b, _RowConstant):  # a softmax's shift: fused into the exp that follows
            return _Shifted(_materialized(a), b)
        return _add(_materialized(a), _materialized(b), -1)

    def mul(self, a, b):
        return _mul(_materialized(a), _materialized(b))

    def scale(self, a, s):
        a = _materialized(a)
        if s.lo is not None and not s.lo and not s.rad and s.hi and math.frexp(float(s.hi))[0] == 0.5:
            f = float(s.hi)  # a power of two (1/8 for d_k = 64): exact, unless it underflows
            rad = None if a.rad is None else np.where(a.rad == 0, 0.0, _up(a.rad * f))
            return Iv(a.hi * f, None if a.lo is None else a.lo * f, rad, a.excluded)
        return _mul(a, s)

    def one_minus(self, a):
        a = _materialized(a)
        one = Iv(np.ones_like(a.hi))
        return _add(one, a, -1)

    def tanh(self, a):
        mid, rad = _materialized(a).collapsed()
        out = np.tanh(mid)
        rad = rad + TANH_ULPS * ULP * np.abs(out) + TANH_ULPS * ETA  # |tanh'| <= 1
        return Iv(out, None, _up(rad), a.excluded)

    def exp(self, a):
        if isinstance(a, _Shifted):
            return _exp(a.terms, a.shift.hi)
        return _exp(_materialized(a))

    def mask(self, a, allowed):
        """Excluded entries get hi −inf (their lo and rad mean nothing)."""
        a = _materialized(a)
        excluded = ~np.broadcast_to(allowed, a.hi.shape)
        return Iv(np.where(excluded, -np.inf, a.hi), a.lo, a.rad, _union(a.excluded, excluded))

    def shift(self, a):
        """The row maxima of hi, taken as exact: the softmax does not depend on its shift."""
        top = a.hi.max(axis=-1, keepdims=True)
        return _RowConstant(np.where(np.isfinite(top), top, 0.0))

    def rowsum(self, a):
        """A row sum, kept with its terms: dividing the terms by it then multiplying by V (a softmax and its
        weighted sum) makes one split product with V and a column of ones (``_Quotient``)."""
        return _RowSum(_materialized(a))

    def colsum(self, a):
        a = _materialized(a)
        ones = Iv(np.ones(a.hi.shape[:-2] + (1, a.hi.shape[-2])))
        return self._product(ones, a)

    def div(self, a, z):
        if isinstance(z, _RowSum) and z.terms is a:
            return _Quotient(a, self)
        return _divide(_materialized(a), _materialized(z))

    def fill_rows(self, a, rows, value):
        a = _materialized(a)
        rows = np.broadcast_to(rows, a.hi.shape)
        if value == NAN:
            fill = Iv(np.full(a.hi.shape, np.nan))
        else:
            fill = _scalar(Fraction(value))
        hi = np.where(rows, fill.hi, a.hi)
        lo = np.where(rows, fill.low(), a.low())
        rad = np.where(rows, fill.radius(), a.radius())
        return Iv(hi, lo, rad)

    def hstack(self, parts):
        parts = [_materialized(p) for p in parts]
        hi = np.concatenate([p.hi for p in parts], axis=-1)
        lo = np.concatenate([p.low() for p in parts], axis=-1)
        return Iv(hi, lo, np.concatenate([p.radius() for p in parts], axis=-1))

    def cols(self, a, start, stop):
        a = _materialized(a)
        return Iv(a.hi[..., start:stop], _slice(a.lo, start, stop), _slice(a.rad, start, stop))

    def unbroadcast(self, g, like):
        return g


def _slice(a, start, stop):
    return None if a is None else a[..., start:stop]


def _transposed(a: Iv) -> Iv:
    t = lambda x: None if x is None else np.swapaxes(x, -1, -2)  # noqa: E731
    return Iv(t(a.hi), t(a.lo), t(a.rad))


def _union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _finite_abs(a):
    return np.where(np.isfinite(a), np.abs(a), 0.0)


def _add(a: Iv, b: Iv, sign: int) -> Iv:
    with np.errstate(invalid="ignore"):
        hi, err = two_sum(a.hi, b.hi if sign > 0 else -b.hi)
        excluded = _union(a.excluded, b.excluded)
        if excluded is not None:  # −inf − x: TwoSum gives nan; the entry is excluded anyway
            hi = np.where(excluded, -np.inf, hi)
            err = np.where(excluded, 0.0, err)
        lo = err
        rounding = 0.0
        for part, s in ((a.lo, 1), (b.lo, sign)):
            if part is not None:
                lo = lo + (part if s > 0 else -part)
                rounding = rounding + U * np.abs(lo)
        rad = a.radius() + b.radius() + rounding
    return Iv(hi, lo, _up(rad), excluded)


def _mul(a: Iv, b: Iv) -> Iv:
    """a·b elementwise (b may be a scalar Iv)."""
    with np.errstate(invalid="ignore", over="ignore"):
        hi, err = two_prod(a.hi, b.hi)
        lo = err
        if a.lo is not None:
            lo = lo + a.lo * b.hi
        if b.lo is not None:
            lo = lo + a.hi * b.lo
        rounding = 3 * U * np.abs(lo)
        if a.lo is not None and b.lo is not None:
            rounding = rounding + np.abs(a.lo * b.lo) * (1 + U)
        mag_a = np.abs(a.hi) + np.abs(a.low())
        mag_b = np.abs(b.hi) + np.abs(b.low())
        rad = rounding + mag_a * b.radius() + a.radius() * mag_b + a.radius() * b.radius() + 8 * ETA
        excluded = a.excluded
        if excluded is not None:
            hi = np.where(excluded, -np.inf, hi)
            lo = np.where(excluded, 0.0, lo)
            rad = np.where(excluded, 0.0, rad)
    return Iv(hi, lo, _up(rad), excluded)


def _divide(a: Iv, z: Iv) -> Iv:
    """a / z for z bounded away from zero."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if a.lo is not None:  # normalised (exactly): |lo| <= u·|hi|
            a = Iv(*two_sum(a.hi, a.lo), a.rad)
        if z.lo is not None:
            z = Iv(*two_sum(z.hi, z.lo), z.rad)
        q = a.hi / z.hi
        p, e = two_prod(q, z.hi)
        r = ((a.hi - p) - e + a.low()) - q * z.low()  # a − q·z, each step's rounding bounded below
        q_lo = r / z.hi
        rounding = 4 * U * (np.abs(a.hi - p) + np.abs(e) + np.abs(a.low()) + np.abs(q * z.low()))
        size = np.abs(z.hi) - np.abs(z.low()) - z.radius()  # a lower bound of |z|
        low = size * (1 - 4 * U)
        # q + q_lo differs from (a.hi + a.lo)/(z.hi + z.lo) by (rounding + |r|·|z.lo|/|z.hi|) / |z|
        rad = (rounding + np.abs(r) * np.abs(z.low()) / np.abs(z.hi) + 2 * U * np.abs(r)) / low
        rad = rad + (a.radius() + (np.abs(q) + np.abs(q_lo)) * z.radius()) / low
        rad = np.where(low > 0, _up(rad + 8 * ETA), np.inf)
        zero = (a.hi == 0) & (a.low() == 0) & (a.radius() == 0)  # 0 / z: exactly 0 (a masked weight)
        rad[np.broadcast_to(zero, rad.shape)] = 0.0
    return Iv(q, q_lo, rad)


def _exp(a: Iv, shift=None) -> Iv:
    """exp(a − shift) by the table and a degree-5 polynomial (module docstring); −inf (excluded) gives 0
    exactly.  ``shift``: exact row constants, subtracted by TwoSum."""
    hi_table, lo_table = exp_table()
    low = a.lo
    low_bound = 0.0  # a bound of |low|'s rounding error / u, below
    with np.errstate(invalid="ignore"):
        if shift is None:
            x = a.hi
        else:
            x, err = two_sum(a.hi, -shift)
            if low is not None:  # rounded: within u·|low| <= u·(u·|x| + max|a.lo|)
                low_bound = U * 1024 + float(np.abs(low).max(initial=0.0))
                err += low
            low = err
        inside = x >= EXP_LOW
        if shift is None:
            inside &= x <= EXP_HIGH - 1  # False for −inf and nan; a shifted argument is <= 0
        outside = ~inside
        everywhere = not outside.any()
        xs = x if everywhere else np.where(inside, x, 0.0)
        t = np.rint(xs * STEPS)
        r = xs - t * (1.0 / STEPS)  # exact: |r| <= 2**-11 and a multiple of ulp(x)
        if low is not None:
            if not everywhere:
                low[outside] = 0.0
            r += low  # rounded: within u·|r|, in `own` below
    q = r * (1 / 120)
    q += 1 / 24
    q *= r
    q += 1 / 6
    q *= r
    q += 0.5
    q *= r
    q += 1
    q *= r  # expm1(r) to degree 5
    t -= EXP_LOW * STEPS
    index = t.astype(np.intp)
    table = np.take(hi_table, index)
    d = table * q  # |d| <= 2**-11·table: its rounding (u·|d|) is in `own` below
    hi = table + d
    lo = table - hi
    lo += d  # Fast2Sum: table + d = hi + lo exactly
    lo += np.take(lo_table, index)  # rounded: u·|lo|, with |lo| <= 2u·hi
    # relative to the table value, for |r| <= 2**-11 + |low|: the truncation |r|**6/720·e**|r| < 2**-64·|r|,
    # Horner's roundings (q within 2.01u·|q|), d's rounding (u·|q|), |q| <= 1.001|r|, the rounding of r + low
    # (u·|r|), low's own rounding, and the table's error; then the input's radius through
    # e**rad − 1 <= rad·(1 + rad) (rad <= 1/2) times e**|r| <= 1 + 2|r|: for rad <= 2**-20 that is at most
    # 1.002·rad
    rad = np.abs(r)
    rad *= 4.2 * U
    rad += TABLE_ERROR + U * low_bound
    if a.rad is not None:
        rad_in = a.rad if everywhere else np.where(inside, a.rad, 0.0)
        if float(rad_in.max(initial=0.0)) <= 2.0**-20:
            rad += rad_in * 1.002
        else:
            growth = rad_in * (1 + rad_in) * (1 + 2 * np.abs(r) + rad)
            growth[rad_in > 0.5] = np.inf
            rad += growth
    rad *= hi
    rad *= INFLATE
    rad += 20 * ETA
    if not everywhere:  # below the table exp < 2**-1076 (an enclosure [0, ETA]); above it, no certificate
        with np.errstate(invalid="ignore"):
            hi[outside] = np.where(np.isnan(x[outside]), np.nan, 0.0)
            lo[outside] = 0.0
            xo = x[outside]
            rad[outside] = np.where((xo < EXP_LOW) & np.isfinite(xo), 2 * ETA, np.where(xo > 0, np.inf, 0.0))
    return Iv(hi, lo, rad)


class _RowConstant(Iv):
    """Exact row constants (a softmax's shift)."""

    def __init__(self, hi):
        super().__init__(hi)


class _Shifted:
    """terms − shift, computed by the exp that reads it (or when anything else does)."""

    def __init__(self, terms: Iv, shift: _RowConstant):
        self.terms, self.shift = terms, shift
        self.excluded = terms.excluded
        self._value = None

    def value(self) -> Iv:
        if self._value is None:
            self._value = _add(self.terms, self.shift, -1)
        return self._value


class _RowSum:
    """rowsum(terms), computed only when something other than a softmax's division reads it."""

    def __init__(self, terms: Iv):
        self.terms = terms
        self._value = None

    def value(self) -> Iv:
        if self._value is None:
            t = self.terms
            ones = Iv(np.ones(t.hi.shape[:-2] + (t.hi.shape[-1], 1)))
            self._value = IntervalXP()._product(t, ones)
        return self._value


class _Quotient:
    """terms / rowsum(terms): the softmax's weights.  Multiplied by V it is (terms·[V 1]) divided by its last
    column, one split product; anything else reads the weights themselves."""

    def __init__(self, terms: Iv, xp: IntervalXP):
        self.terms, self.xp = terms, xp
        self._value = None
        self.excluded = None

    def value(self) -> Iv:
        if self._value is None:
            z = _RowSum(self.terms).value()
            self._value = _divide(self.terms, z)
        return self._value

    def times(self, v: Iv) -> Iv:
        ones = Iv(np.ones(v.hi.shape[:-1] + (1,)), None if v.lo is None else np.zeros(v.hi.shape[:-1] + (1,)))
        extended = Iv(
            np.concatenate([v.hi, ones.hi], axis=-1),
            None if v.lo is None else np.concatenate([v.lo, ones.lo], axis=-1),
            None if v.rad is None else np.concatenate([v.rad, np.zeros(ones.hi.shape)], axis=-1),
        )
        product = self.xp._product(self.terms, extended)
        numerator = Iv(product.hi[..., :-1], _slice(product.lo, 0, -1), _slice(product.rad, 0, -1))
        z = Iv(product.hi[..., -1:], _slice(product.lo, -1, None), _slice(product.rad, -1, None))
        return _divide(numerator, z)


def _materialized(a):
    if isinstance(a, (_Quotient, _RowSum, _Shifted)):
        return a.value()
    return a


def result(value) -> Iv:
    """A graph value as an Iv (a softmax's weights computed if they were kept lazy)."""
    return _materialized(value)


def _scalar(value) -> Iv:
    """An exact scalar as a double-float with its radius (Arb at 160 bits)."""
    if isinstance(value, Fraction):
        hi = float(value)
        rest = value - Fraction(hi)
        lo = float(rest)
        err = abs(rest - Fraction(lo))
        return Iv(np.array(hi), np.array(lo), np.array(float(err) * 2 + 2 * ETA if err else 0.0))
    from .entries import ball

    b = ball(value, 160)
    mid = b.mid()
    hi = float(mid)
    import flint

    lo = float(mid - flint.arb(hi))
    return Iv(np.array(hi), np.array(lo), np.array(float(b.rad()) * 2 + abs(hi) * 2.0**-150 + 2 * ETA))


def _entries(matrix) -> Iv:
    """A matrix of exact entries that are not all float64 numbers, as double-floats."""
    rows = [[_scalar(e) for e in row] for row in matrix.rows]
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
    """Enclosures (Iv) of the steps ``names`` (forward steps) of the graph."""
    xp = IntervalXP()
    with np.errstate(all="ignore"):
        values = graph.forward(xp, names)
        return {name: result(v) for name, v in values.items()}


def certifiable(mid: np.ndarray, rad: np.ndarray, digits: int) -> np.ndarray:
    """Bools: every number in [mid − rad, mid + rad] has the same ``digits``-digit decimal rounding (decided
    in floats where that is safe, else by Python's correctly rounded formatting of both ends)."""
    with np.errstate(all="ignore"):
        lo = np.nextafter(np.nextafter(mid - rad, -np.inf), -np.inf)  # outward: the subtraction rounded
        hi = np.nextafter(np.nextafter(mid + rad, np.inf), np.inf)
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
    from .certify import certified_string

    center = Fraction(hi) + Fraction(lo)
    return certified_string(center - Fraction(rad), center + Fraction(rad), digits)


def strings(mid: np.ndarray, digits: int) -> list:
    """The ``digits``-digit decimal strings of the midpoints (the decimal module's layout)."""
    from .certify import layout

    out = []
    for v in mid.reshape(-1).tolist():
        text = f"{v:.{digits - 1}e}"
        mantissa, _, exponent = text.partition("e")
        negative = mantissa.startswith("-")
        coefficient = mantissa.lstrip("-").replace(".", "")
        out.append(layout(negative, coefficient, int(exponent) - digits + 1))
    return out
