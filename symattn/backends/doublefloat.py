"""Double-float interval arithmetic over whole matrices: the numbers under ``intervals.IntervalXP``.

Every value is an array triple (hi, lo, rad): the exact value of each entry
lies within rad of hi + lo (a double-float midpoint, lo much smaller than hi,
and a float64 radius).  The arithmetic is vectorized NumPy:

- products ``a·b`` split each operand into integers and fractions after
  scaling rows (columns) by powers of two (the idea of Ozaki, Ogita, Oishi and
  Rump, "Error-free transformations of matrix multiplication", Numer. Algorithms
  59, 2012): the product of the integer parts is exact in float64 whatever the
  order of summation, and the rest is 2⁻²¹ smaller, so its a-priori error
  γ·Σ|terms| is negligible (the rest is summed by chunks of 128 terms, so γ is
  γ_130 + γ_{n/128+2} rather than γ_{n+2});
- sums (a softmax's row sum) are products with a column of ones, split the same way;
- ``exp`` reduces its argument to r = x − k/2048 (exact) and multiplies a
  double-float table value exp(k/2048) (from Arb) by 1 + expm1(r), expm1(r)
  by its Taylor polynomial of degree 5 (|r| ≤ 2⁻¹² + |lo|); a softmax's shift,
  a multiple of 1/2048, only moves the table's index;
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
``tanh`` (softcap, score_mods) reads a table of tanh(k/2048) and 1 − tanh²
and adds the rest by the addition theorem, its small terms by a short series
in float64; tests/test_intervals.py checks it and the exp against Arb on many
random arguments.

An enclosure is only as good as its width: ``truth`` certifies from it the
entries whose enclosure is narrow enough for the digits asked and computes the
others again in Arb, on their query rows alone.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from symattn.backends.engines import precision
from symattn.graph.xp import union

U = 2.0**-53  # unit roundoff of float64
ETA = 2.0**-1074  # smallest subnormal: the absolute error of an underflow
INFLATE = 1 + 2.0**-44  # each radius formula's own roundings, with a large margin
SPLIT = 134217729.0  # 2**27 + 1: Dekker's splitter
STEPS = 2048  # exp's table: exp(k / STEPS)
CHUNK = 128  # the terms of a product's rest summed in one matrix product (its rounding error is γ_CHUNK)
EXP_LOW, EXP_HIGH = -746, 3  # the table's range: exp underflows below, and the softmax's arguments are ≤ 0


def gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u), rounded up generously."""
    return n * U / (1 - n * U) * (1 + 2.0**-40)


def up(r):
    """A radius computed in round-to-nearest, made an upper bound of the quantity it estimates."""
    return r * INFLATE + 4 * ETA


class Iv:
    """Entries within ``rad`` of hi + lo (lo, rad None: zero).  ``excluded``: masked score entries (hi −inf).
    ``below``: a bound 0 <= hi < below when one is known (a softmax's exponentials), else None.  ``one_key``:
    (rows, columns) of a softmax's exponentials whose row has that one entry not excluded, or None."""

    __slots__ = ("hi", "lo", "rad", "excluded", "below", "one_key")

    def __init__(self, hi, lo=None, rad=None, excluded=None, below=None, one_key=None):
        self.hi, self.lo, self.rad, self.excluded, self.below, self.one_key = hi, lo, rad, excluded, below, one_key

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
            rad = up(self.radius() + U * np.where(np.isfinite(mid), np.abs(mid), 0.0))
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
    return up(np.sqrt(squares) * (1 + gamma(n + 2)))


def _exponents(m) -> np.ndarray:
    """e with max|row| < 2**e (0 for a zero row)."""
    _, e = np.frexp(m)
    return e


def _beta(n: int) -> int:
    """Bits of an integer part: n products of two of them sum exactly in float64 (below 2**52)."""
    return (52 - max(1, math.ceil(math.log2(max(n, 2))))) // 2


def _scalings(m, axis: int, beta: int) -> np.ndarray:
    """Exponents putting every row (axis −1) or column (axis −2) of m below 2**beta."""
    return beta - _exponents(np.abs(m).max(axis=axis, keepdims=True))


def _scaled(x, e, uniform: bool):
    """x·2**e, exactly (barring underflow): one multiplication when e is the same everywhere."""
    if uniform and abs(int(e.flat[0])) < 1000:
        return x * math.ldexp(1.0, int(e.flat[0]))  # one scalar: faster than ldexp over the array
    return np.ldexp(x, e)


def split_product(a_hi, a_lo, b_hi, b_lo, a_rad=None, b_rad=None, a_below=None):
    """(a_hi + a_lo ± a_rad)·(b_hi + b_lo ± b_rad) as (hi, lo, rad): hi + lo lies within rad of every product
    of points of the operands (see the module docstring).  hi is the product of the operands' integer parts,
    exact; lo the rest, much smaller than the product's scale but not normalised against hi.  The low parts
    (at most a few ulps of the high ones) join the fractions.  ``a_below``: a bound 0 <= a_hi < a_below
    known beforehand (a softmax's exponentials): one scaling for every row, no pass to find their maxima."""
    m, n = a_hi.shape[-2:]
    p = b_hi.shape[-1]
    beta = _beta(n)
    nonnegative = a_below is not None
    zero_rows = _zero_rows(a_hi, a_lo, a_rad)  # exactly 0 (an empty row's weights): their products are 0 exactly
    if nonnegative:
        mantissa, e = math.frexp(a_below)  # a_below <= 2**e
        ea = np.full(a_hi.shape[:-1] + (1,), beta - (e - 1 if mantissa == 0.5 else e))
    else:
        ea = _scalings(a_hi, -1, beta)  # rows of a, columns of b below 2**beta
    eb = _scalings(b_hi, -2, beta)
    a_s, b_s = _scaled(a_hi, ea, nonnegative), np.ldexp(b_hi, eb)
    a_int, b_int = np.rint(a_s), np.rint(b_s)
    a_frac = np.subtract(a_s, a_int, out=a_s)  # exact
    b_frac = b_s - b_int
    if a_lo is not None:
        a_frac += _scaled(a_lo, ea, nonnegative)  # rounded: within u·|a_frac|, covered below
    if b_lo is not None:
        b_frac += np.ldexp(b_lo, eb)
        b_s = b_int + b_frac  # rounded: within u·|b_s|
    shift = -ea - eb  # undo the scalings: exact powers of two (the integer part is below 2**52)
    # Where the operands are smaller than the output, the scalings are undone on the operands' parts: each
    # entry's terms then carry the same power of two, so the integer part stays exact, and nothing is
    # scaled back afterwards (possible while no unit 2**shift falls below the subnormals or overflows).
    on_operands = (
        n * (2 * m + 3 * p) <= 4 * m * p  # ldexp on m×n and n×p parts against two on the m×p outputs
        and min(int(np.min(shift)), int(np.min(-ea)), int(np.min(-eb))) >= -1074
        and max(int(np.max(shift)), int(np.max(-ea)), int(np.max(-eb))) <= 1023 - 53
    )
    if on_operands:
        a_int, a_frac = np.ldexp(a_int, -ea), np.ldexp(a_frac, -ea)
        b_int, b_frac, b_u = np.ldexp(b_int, -eb), np.ldexp(b_frac, -eb), np.ldexp(b_s, -eb)
    exact = a_int @ b_int  # integers below n·2**(2·beta) <= 2**52 (times 2**shift): every partial sum exact
    # The rest, by chunks of CHUNK terms summed in turn: its error is then (γ_{c+2} + γ_{n/c+2})·T for
    # T = |a_int|·|b_frac| + |a_frac|·|b_s|, against γ_{n+2}·T in one product, plus the fractions' and the
    # final sum's roundings (3u·T), the radius formula's own roundings (INFLATE) and underflows (η each).
    chunks = range(0, n, CHUNK)
    lo = _rest(a_int, a_frac, b_frac, b_u if on_operands else b_s, nonnegative)
    width = min(n, CHUNK)
    coefficient = (gamma(width + 2) + gamma(len(chunks) + 2) + 3 * U) * INFLATE * (1 + gamma(2 * n + 4))
    if on_operands:  # each part scaled back is exact unless it underflows (η each, times the other's size)
        sizes = _pow2(beta + np.max(-ea, initial=0)) + _pow2(beta + np.max(-eb, initial=0))
        floor = 10 * n * ETA * (1 + sizes) + 4 * ETA
    else:
        floor = 10 * n * ETA * _pow2(np.max(shift, initial=0)) + 4 * ETA
    narrow = p * 4 <= n  # a softmax's weights times V: products of absolute values, else Cauchy–Schwarz
    fused = narrow and a_rad is not None and b_lo is None and b_rad is None
    if narrow:  # in the scaled units, with a's radius (in them: a_rad·2**ea against |b_s| = |b|·2**eb) fused
        sums = (a_int if nonnegative else np.abs(a_int)).sum(axis=-1, keepdims=True)
        weights = np.abs(a_frac, out=a_frac)  # the fractions are not read again: |a_frac| in their place
        if fused:  # the coefficient applied after the product, on the narrow output
            factor = (1 + gamma(n + 4)) * INFLATE / coefficient
            if nonnegative:
                weights += np.ldexp(a_rad * factor, int(ea.flat[0]))
            else:
                weights += np.ldexp(a_rad, ea) * factor
        rad = weights @ np.abs(b_s)
        rad *= coefficient
        rad += sums * (np.abs(b_frac).max(axis=-2, keepdims=True) * coefficient)  # |b_frac| <= 1/2: small
        rad = np.ldexp(up(rad), shift)
    else:  # in the product's units: one rank-2 product of row and column norms
        ua, ub = (0, 0) if on_operands else (-ea, -eb)
        rows = np.stack([_norms(a_int), _norms(a_frac)], axis=-1) * coefficient
        cols = np.stack([_norms(b_frac, axis=-2), _norms(b_s if not on_operands else b_u, axis=-2)], axis=-2)
        rad = up(np.ldexp(rows, ua) @ np.ldexp(cols, ub))
    if not on_operands:
        exact, lo = np.ldexp(exact, shift), np.ldexp(lo, shift)
    rad += floor
    if a_hi.ndim == 2 and (m * n <= 1 << 16 or not nonnegative):  # rows and columns of integer parts only
        exact_rows, exact_cols = ~a_frac.any(axis=-1), ~b_frac.any(axis=-2)
        if exact_rows.any() and exact_cols.any():
            rad[np.ix_(exact_rows, exact_cols)] = 0.0
    if (a_rad is not None and not fused) or b_rad is not None:
        rad += _carried(a_hi, a_lo, None if fused else a_rad, b_hi, b_lo, b_rad)
    if zero_rows is not None:
        rad[zero_rows] = 0.0
    return exact, lo, rad


def _zero_rows(hi, lo, rad):
    """The rows (a bool index over hi's leading axes) whose entries are all exactly 0, or None when there are
    none."""
    zero = ~hi.any(axis=-1)
    if not zero.any():
        return None
    if lo is not None:
        zero &= ~lo.any(axis=-1)
    if rad is not None:
        zero &= ~np.asarray(rad).any(axis=-1) if np.ndim(rad) == hi.ndim else ~np.any(rad)
    return zero if zero.any() else None


def sliced_product(a, b, slices: int = 3):
    """a·b for float matrices a (m × n, few rows) and b (n × p), as (hi, lo, rad) good to about 2**-100
    relatively: each operand cut into ``slices`` slices of beta bits (Ozaki's scheme again), every product
    of slices exact, summed as a double-float; what the slices leave (nothing, for float32 entries within
    2**-45 of their row's largest) bounded by products of absolute values."""
    n = a.shape[-1]
    beta = _beta(n)
    ea, eb = _scalings(a, -1, beta), _scalings(b, -2, beta)

    def cut(x):
        parts, rest = [], x
        for k in range(slices):
            whole = np.ldexp(np.rint(np.ldexp(rest, beta * k)), -beta * k)  # integers times 2**-(beta·k)
            parts.append(whole)
            rest = rest - whole  # exact
        return parts, rest

    a_parts, a_rest = cut(np.ldexp(a, ea))
    b_parts, b_rest = cut(np.ldexp(b, eb))
    hi = lo = spread = None
    for total in range(2 * slices - 1):  # the largest products first
        for i in range(max(0, total - slices + 1), min(total, slices - 1) + 1):
            term = a_parts[i] @ b_parts[total - i]  # integers below n·2**(2·beta), times a power of two: exact
            if hi is None:
                hi, lo, spread = term, np.zeros_like(term), np.zeros_like(term)
                continue
            hi, e = two_sum(hi, term)
            lo += e
            spread += np.abs(lo)  # each addition to lo is off by at most u·|lo|
    rad = spread * (2 * U)
    if a_rest.any() or b_rest.any():
        abs_a = sum(np.abs(p) for p in a_parts)
        rad += (np.abs(a_rest) @ (np.abs(np.ldexp(b, eb)) + np.abs(b_rest)) + abs_a @ np.abs(b_rest)) * (
            1 + gamma(n + 4)
        )
    shift = -ea - eb
    floor = 10 * n * ETA * _pow2(np.max(shift, initial=0)) + 4 * ETA
    return np.ldexp(hi, shift), np.ldexp(lo, shift), up(np.ldexp(rad, shift)) + floor


def _pow2(e) -> float:
    """2**e as a float, inf past float64's range (then the radius is infinite and the entries go to Arb)."""
    return math.inf if e > 1023 else math.ldexp(1.0, int(e))


def _rest(a_int, a_frac, b_frac, b_rest, dense_a: bool):
    """a_int·b_frac + a_frac·b_rest by chunks of CHUNK terms summed in turn, each product only over the columns
    of b_frac and the rows of a_frac that are not all 0 (inputs of few bits, bfloat16's, have many such);
    ``dense_a``: a_frac's rows are taken as nonzero without looking (a softmax's exponentials)."""
    m, p = a_int.shape[-2], b_frac.shape[-1]
    cols = rows = None
    if a_int.ndim == 2:
        cols = np.flatnonzero(b_frac.any(axis=0))
        cols = None if cols.size == p else cols
        if not dense_a:
            rows = np.flatnonzero(a_frac.any(axis=1))
            rows = None if rows.size == m else rows
    lo = np.zeros(a_int.shape[:-1] + (p,))
    for start in range(0, a_int.shape[-1], CHUNK):
        part = slice(start, start + CHUNK)
        term = np.zeros_like(lo) if start else lo  # the first chunk in place
        if cols is None:
            term += a_int[..., part] @ b_frac[..., part, :]
        elif cols.size:
            term[:, cols] = a_int[:, part] @ b_frac[part][:, cols]
        if rows is None:
            term += a_frac[..., part] @ b_rest[..., part, :]
        elif rows.size:
            term[rows] += a_frac[rows, part] @ b_rest[part]
        if start:
            lo += term
    return lo


def _carried(a_hi, a_lo, a_rad, b_hi, b_lo, b_rad):
    """The radii carried in: a_rad·(|b| + b_rad) + |a|·b_rad, by products of absolute values (Cauchy–Schwarz
    would cost less but can be √n wider: a gradient summed over every query row cancels down to it)."""
    n = a_hi.shape[-1]
    abs_a = np.abs(a_hi) if a_lo is None else np.abs(a_hi) + np.abs(a_lo)
    abs_b = np.abs(b_hi) if b_lo is None else np.abs(b_hi) + np.abs(b_lo)
    bound = 0.0
    if a_rad is not None:
        bound = a_rad @ (abs_b if b_rad is None else abs_b + b_rad)
    if b_rad is not None:
        bound = bound + abs_a @ b_rad
    return up(bound * (1 + gamma(n + 2)))


def _pairs(values) -> tuple:
    """Arb values as double-floats (hi, lo): hi the nearest float64 to the midpoint, lo the nearest to the rest
    (at the precision in force)."""
    import flint

    hi, lo = [], []
    for v in values:
        mid = v.mid()
        h = float(mid)
        hi.append(h)
        lo.append(float(mid - flint.arb(h)))
    return np.array(hi), np.array(lo)


@lru_cache(maxsize=1)
def exp_table():
    """0, then exp(k / STEPS) for k from EXP_LOW·STEPS to EXP_HIGH·STEPS, as double-floats (hi, lo) from Arb at
    160 bits (the 0 is what every argument below the table reads): a table of exp(k1) times one of
    exp(k2 / STEPS), multiplied as double-floats."""
    import flint

    with precision(160):
        big_hi, big_lo = _pairs([flint.arb(k).exp() for k in range(EXP_LOW, EXP_HIGH + 1)])
        small_hi, small_lo = _pairs([(flint.arb(k) / STEPS).exp() for k in range(STEPS)])
    # every k = k1·STEPS + k2 (0 <= k2 < STEPS): exp(k1)·exp(k2/STEPS) as a double-float
    a_hi, a_lo = np.repeat(big_hi, STEPS), np.repeat(big_lo, STEPS)
    b_hi, b_lo = np.tile(small_hi, len(big_hi)), np.tile(small_lo, len(big_hi))
    with np.errstate(under="ignore"):
        p, e = two_prod(a_hi, b_hi)
        lo = e + (a_hi * b_lo + a_lo * b_hi)
        hi, lo = two_sum(p, lo)
    return np.concatenate([[0.0], hi]), np.concatenate([[0.0], lo])


# relative error of a table entry: the two Arb roundings (2**-106 each), the cross terms' roundings and the
# dropped a_lo·b_lo; subnormal entries are covered by the absolute ETA terms
TABLE_ERROR = 2.0**-100


def add(a: Iv, b: Iv, sign: int) -> Iv:
    with np.errstate(invalid="ignore"):
        hi, err = two_sum(a.hi, b.hi if sign > 0 else -b.hi)
        excluded = union(a.excluded, b.excluded)
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
        rad = np.where(rad == 0, 0.0, up(rad))  # TwoSum is exact, and so is a sum of exact operands that is
        # not rounded (a rounded lo has rounding > 0; sums of subnormals are exact)
    return Iv(hi, lo, rad, excluded)


def mul(a: Iv, b: Iv) -> Iv:
    """a·b elementwise (b may be a scalar Iv)."""
    with np.errstate(invalid="ignore", over="ignore"):
        hi, err = two_prod(a.hi, b.hi)
        lo = err
        rounding = 0.0
        # every cross term (a.lo·b.lo too: a product's lo is not normalised, up to 2**-20 of its hi) is added
        # in; each product and each sum within u of its result
        for term in (
            None if a.lo is None else a.lo * b.hi,
            None if b.lo is None else a.hi * b.lo,
            None if a.lo is None or b.lo is None else a.lo * b.lo,
        ):
            if term is not None:
                lo = lo + term
                rounding = rounding + U * (np.abs(term) + np.abs(lo))
        mag_a = np.abs(a.hi) + np.abs(a.low())
        mag_b = np.abs(b.hi) + np.abs(b.low())
        rad = rounding + mag_a * b.radius() + a.radius() * mag_b + a.radius() * b.radius() + 8 * ETA
        # an exact 0 times a finite number is an exact 0 (a dropped weight, a zero of V): no underflow term
        zero = (mag_a == 0) & (a.radius() == 0) & np.isfinite(mag_b)
        zero |= (mag_b == 0) & (b.radius() == 0) & np.isfinite(mag_a)
        rad = np.where(zero, 0.0, up(rad))
        excluded = a.excluded
        if excluded is not None:
            hi = np.where(excluded, -np.inf, hi)
            lo = np.where(excluded, 0.0, lo)
            rad = np.where(excluded, 0.0, rad)
    return Iv(hi, lo, rad, excluded)


def scale(a: Iv, s: Iv) -> Iv:
    """a·s for a scalar s (a softcap, a score_mod's numbers): ``mul`` with s's parts read once, its products and
    sums in place.  With p + e = hi·s_hi exactly (Dekker), lo' = (e + hi·s_lo) + lo·s_hi, summed in that order,
    is within |hi|·(3.01u·|s_lo| + 2.02u²·|s_hi|) + |lo|·(2.01u·|s_hi| + |s_lo|) of (hi + lo)·(s_hi + s_lo)
    (two products' and two sums' roundings, |e| <= u·|p|, the dropped lo·s_lo); the radii carry through as in
    ``mul``; an exact 0 stays exactly 0.  A scalar below 2**-900 (whose coefficients would underflow), 0, or
    operands Dekker's split would overflow on go to ``mul``."""
    sh, sl, sr = float(s.hi), float(s.low()), float(s.radius())
    hi, lo, ra = a.hi, a.lo, a.rad
    if a.excluded is not None or not _largest(hi) <= 2.0**995 or not 2.0**-900 <= abs(sh) <= 2.0**995:
        return mul(a, s)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        p = hi * sh
        big = hi * SPLIT  # Dekker's split of hi: big − (big − hi) and its rest
        rest = big - hi
        np.subtract(big, rest, out=big)
        np.subtract(hi, big, out=rest)
        bh, bl = _split(np.float64(sh))
        out_lo = big * bh
        out_lo -= p
        big *= bl
        out_lo += big
        np.multiply(rest, bh, out=big)
        out_lo += big
        rest *= bl
        out_lo += rest  # e = hi·s_hi − p, exactly
        np.abs(hi, out=rest)
        rad = rest * (3.01 * U * abs(sl) + 2.02 * U * U * abs(sh) + sr)
        if sl:
            np.multiply(hi, sl, out=rest)
            out_lo += rest
        if lo is not None:
            np.multiply(lo, sh, out=big)
            out_lo += big
            np.abs(lo, out=big)
            big *= 3.01 * U * abs(sh) + abs(sl) + sr
            rad += big
        if ra is not None:
            np.multiply(ra, abs(sh) + abs(sl) + sr, out=big)
            rad += big
        rad *= INFLATE
        rad += 12 * ETA  # underflows: Dekker's product and the three others
        if not np.all(hi):  # an exact 0 times s: exactly 0
            zero = hi == 0
            if lo is not None:
                zero &= lo == 0
            if ra is not None:
                zero &= ra == 0
            np.copyto(rad, 0.0, where=zero)
    return Iv(p, out_lo, rad)


def divide(a: Iv, z: Iv) -> Iv:
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
        rad = np.where(low > 0, up(rad + 8 * ETA), np.inf)
        zero = (a.hi == 0) & (a.low() == 0) & (a.radius() == 0)  # 0 / z: exactly 0 (a masked weight)
        rad[np.broadcast_to(zero, rad.shape)] = 0.0
    return Iv(q, q_lo, rad)


def exp(a: Iv, shift=None, precise: bool = False) -> Iv:
    """exp(a − shift) by the table and a degree-5 polynomial (module docstring), for ``shift`` (one per row)
    a multiple of 1/STEPS at least the row's largest hi (``IntervalXP.shift``), or None: 0, for arguments
    below EXP_HIGH − 1 (above them the radius is inf).  Excluded entries (−inf) give 0 exactly, arguments
    below the table an enclosure [0, 20η]; rows whose shift is not finite (nan or overflowing scores) get
    an infinite radius, for Arb to settle.

    With x = a.hi and k = rint(x·STEPS), x − k/STEPS is exact, so exp(a − shift) is the table's
    exp((k − shift·STEPS)/STEPS) times exp(r) for r = x − k/STEPS + a.lo: the shift is never subtracted.

    ``precise``: 2**-73 relative rather than 2**-62 (gradients summed over every query row cancel, and their
    digits are only as many as the weights' relative error allows): table·r as an exact TwoProduct, and only
    expm1(r) − r, which is r²/2 or less, by Horner in float64 (to degree 6).  About half as much again."""
    hi_table, lo_table = exp_table()
    x, lo = a.hi, a.lo
    rows = x.shape[:-1] + (1,)
    top = np.zeros(rows) if shift is None else np.broadcast_to(np.asarray(shift, dtype=np.float64), rows)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(top) <= 2.0**40)  # nan, inf: not computed here
    if bad.any():
        top = np.where(bad, 0.0, top)
    # every argument below the table's first entry is raised to the lowest integer there (−inf too): its
    # index then clips to the table's 0, and its r stays finite
    lowest = math.floor(float(np.min(top, initial=0.0))) + EXP_LOW - 2
    low = _largest(lo)
    if not low <= 2.0**-9:  # a far from normalised double-float, or huge arguments: normalised first
        with np.errstate(invalid="ignore"):
            x, lo = two_sum(x, lo)
            lo = np.where(x >= lowest, lo, 0.0)  # below the table (|lo| up to half an ulp of x): unread
        low = _largest(lo)
        if not low <= 2.0**-9:  # not reached for finite arguments (|lo| <= 2**-12 once |x| < 2**41)
            return Iv(np.zeros_like(x), np.zeros_like(x), np.full(x.shape, np.inf))
    with np.errstate(invalid="ignore"):
        x = np.maximum(x, lowest)
        t = x * STEPS
        np.rint(t, out=t)
        r = t * (-1.0 / STEPS)
        r += x  # exact: |r| <= 2**-12 and a multiple of ulp(x)
        if precise:
            return _exp_precise(a, lo, low, r, t, top, bad, shift, hi_table, lo_table)
        if lo is not None:
            r += lo  # rounded: within u·|r|, in the radius below
        q = r * (1 / 120)
        q += 1 / 24
        q *= r
        q += 1 / 6
        q *= r
        q += 0.5
        q *= r
        q += 1
        q *= r  # expm1(r) to degree 5
        t -= top * STEPS + (EXP_LOW * STEPS - 1)  # the table's index (k − shift·STEPS − EXP_LOW·STEPS + 1)
        index = t.astype(np.intp)
    if shift is None:
        above = (index >= len(hi_table) - STEPS) | np.isnan(a.hi)
    table = hi_table.take(index, mode="clip")
    q *= table  # d: |d| <= 2**-10·table, its rounding (u·|d|) in the radius below
    hi = table + q
    lo = np.subtract(table, hi, out=table)
    lo += q  # Fast2Sum: table + d = hi + lo exactly
    lo += lo_table.take(index, mode="clip")  # rounded: u·|lo|, with |lo| <= 2u·hi
    # Relative to hi, for |r| <= R = 2**-12 + max|a.lo| <= 2**-8: Horner's roundings (q within 2.01u·|q|),
    # d's rounding (u·|q|), |q| <= 1.002|r|, the rounding of r (u·|r|): 4.2u·|r| per entry; the truncation
    # R**6/720·e**R and the table's error; then the input's radius through e**rad − 1 <= rad·(1 + rad)
    # (rad <= 1/2) times e**|r| <= 1 + 2|r|: for rad <= 2**-20 at most 1.002·rad (all of it times 1.002).
    big_r = 2.0**-12 + low
    rad = np.abs(r, out=r)
    rad *= 4.2 * U
    rad += TABLE_ERROR + big_r**6 / 720 * 1.01
    if a.rad is not None:
        rad_in = a.rad
        if float(np.max(rad_in, initial=0.0)) <= 2.0**-20:
            rad += rad_in
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                growth = rad_in * (1 + rad_in) * (1 + 2 * big_r + rad)
                growth[~(rad_in <= 0.5)] = np.inf
            rad += growth
    rad *= hi
    rad *= 1.002 * INFLATE
    rad += 20 * ETA
    if a.excluded is not None:  # exactly 0
        np.copyto(rad, 0.0, where=a.excluded)
    if shift is None and above.any():
        rad[above] = np.inf
    if bad.any():
        bad = np.broadcast_to(bad, hi.shape)
        hi[bad], lo[bad], rad[bad] = 0.0, 0.0, np.inf
    return Iv(hi, lo, rad, below=2.0 if shift is not None else math.exp(EXP_HIGH) * 1.01, one_key=_one_key(a))


def _exp_precise(a, lo, low, r, t, top, bad, shift, hi_table, lo_table) -> Iv:
    """``exp``'s precise path, from r = x − k/STEPS (exact) and t = k.  With T = T_hi + T_lo the table's entry
    and ρ = r + lo (rf in float64, within u·|ρ|): exp = T·(1 + ρ + q2), q2 = expm1(ρ) − ρ, and

        hi + lo = T_hi + p + [e + T_hi·(lo + q2) + T_lo·(1 + rf)],   p + e = T_hi·r exactly (TwoProduct),

    T_hi + p by Fast2Sum (|p| <= 2**-12·T_hi).  Relative to T: q2's truncation after ρ⁶ (R⁷/5040·1.01, R =
    2**-12 + max|lo|), q2 read at rf (1.01u·R·|ρ|), Horner's ten roundings (10.1u·|q2| <= 5.1u·rf²),
    T_hi·(lo + q2)'s two, T_lo·(lo + q2) left out, the tail's three sums and the last one: below 10.3u·rf² +
    7.1u·|lo| + 8u² + R⁷/5040·1.01 + the table's error; T <= 1.005·hi (R <= 2**-8)."""
    with np.errstate(invalid="ignore", under="ignore"):
        rf = r if lo is None else r + lo
        q = rf * (1 / 720)
        q += 1 / 120
        q *= rf
        q += 1 / 24
        q *= rf
        q += 1 / 6
        q *= rf
        q += 0.5
        q *= rf
        q *= rf  # expm1(ρ) − ρ to degree 6
        t -= top * STEPS + (EXP_LOW * STEPS - 1)  # the table's index (k − shift·STEPS − EXP_LOW·STEPS + 1)
        index = t.astype(np.intp)
        if shift is None:
            above = (index >= len(hi_table) - STEPS) | np.isnan(a.hi)
        table = hi_table.take(index, mode="clip")
        p, e = two_prod(table, r)
        hi = table + p
        out_lo = np.subtract(table, hi, out=t)
        out_lo += p  # Fast2Sum: T_hi + p = hi + out_lo exactly
        rel = rf * rf
        rel *= 10.3 * U
        if lo is not None:
            q += lo
            np.abs(lo, out=p)
            p *= 7.1 * U
            rel += p
        q *= table
        e += q
        np.add(rf, 1.0, out=q)
        q *= lo_table.take(index, mode="clip", out=table)
        e += q
        out_lo += e
    big_r = 2.0**-12 + low
    rel += TABLE_ERROR + 8 * U * U + big_r**7 / 5040 * 1.01
    if a.rad is not None:  # as in ``exp``
        rad_in = a.rad
        if float(np.max(rad_in, initial=0.0)) <= 2.0**-20:
            rel += rad_in
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                growth = rad_in * (1 + rad_in) * (1 + 2 * big_r + rel)
                growth[~(rad_in <= 0.5)] = np.inf
            rel += growth
    rad = np.multiply(rel, hi, out=rel)
    rad *= 1.005 * INFLATE
    rad += 24 * ETA
    if a.excluded is not None:  # exactly 0
        np.copyto(rad, 0.0, where=a.excluded)
    if shift is None and above.any():
        rad[above] = np.inf
    if bad.any():
        bad = np.broadcast_to(bad, hi.shape)
        hi[bad], out_lo[bad], rad[bad] = 0.0, 0.0, np.inf
    return Iv(hi, out_lo, rad, below=2.0 if shift is not None else math.exp(EXP_HIGH) * 1.01, one_key=_one_key(a))


def _largest(lo) -> float:
    """max |lo| (0 for None)."""
    return 0.0 if lo is None else max(float(np.max(lo, initial=0.0)), -float(np.min(lo, initial=0.0)))


def _one_key(a: Iv):
    """(rows, columns) of the rows of a 2-D a with exactly one entry not excluded (a causal mask's first row),
    whose softmax weight is exactly 1: an enclosure of e/e would only be near it."""
    if a.excluded is None or a.excluded.ndim != 2:
        return None
    rows = np.flatnonzero(np.count_nonzero(~a.excluded, axis=-1) == 1)
    if not rows.size:
        return None
    return rows, np.argmin(a.excluded[rows], axis=-1)


# tanh(k/TANH_STEPS + ρ) = T + D·ρ' for T = tanh(k/TANH_STEPS), D = 1 − T², ρ' = tanh ρ/(1 + T·tanh ρ): T and D from
# a table (``tanh_table``), ρ' by its series in float64 around ρ's double-float part
TANH_STEPS = 2048
TANH_END = 40  # the table's last argument: tanh(y) for y >= TANH_END − 2**-12 is within 2**-114 of 1


@lru_cache(maxsize=1)
def tanh_table():
    """(T_hi, T_lo, D_hi, D_lo, D_hi's two halves) for k from 0 to TANH_END·TANH_STEPS: T = tanh(k/TANH_STEPS)
    and D = 1 − T² as double-floats from Arb at 160 bits (each within 2**-104 of its value, relatively);
    D_hi split (Dekker) once here rather than at every product."""
    import flint

    with precision(160):
        t = [(flint.arb(k) / TANH_STEPS).tanh() for k in range(TANH_END * TANH_STEPS + 1)]
        d = [1 - x * x for x in t]
        t_hi, t_lo = _pairs(t)
        d_hi, d_lo = _pairs(d)
    return (t_hi, t_lo, d_hi, d_lo, *_split(d_hi))


@lru_cache(maxsize=8)
def _tanh_times(c: float) -> tuple:
    """``tanh_table`` times an exact float64 c: (T_hi, c·T as hi and lo, c·D as hi and lo, c·D_hi's two halves),
    each product by TwoProduct plus c times the lo, within 2**-101 of c·T (c·D) relatively."""
    t_hi, t_lo, d_hi, d_lo, *_ = tanh_table()
    if c == 1:
        return (t_hi, t_hi, t_lo, d_hi, d_lo, *_split(d_hi))
    with np.errstate(under="ignore"):
        ct, ct_lo = two_prod(t_hi, np.float64(c))
        ct_lo += t_lo * c
        cd, cd_lo = two_prod(d_hi, np.float64(c))
        cd_lo += d_lo * c
    return (t_hi, ct, ct_lo, cd, cd_lo, *_split(cd))


def tanh(a: Iv, times: float = 1.0) -> Iv:
    """times·tanh(a) as double-floats (softcap, score_mods; ``times`` an exact float64 number) by the table of
    ``tanh_table``, with no branch.  For y = |a.hi|, k = rint(y·TANH_STEPS) and ρ = ρ_hi + ρ_lo, ρ_hi =
    y − k/TANH_STEPS (exact), ρ_lo = ±a.lo, |ρ| <= R = 2**-12 + max|a.lo| <= 2**-11 (a.lo wider than 2**-12
    is normalised first), the addition theorem gives

        tanh(y + lo) = T + D·g,  g = τ/(1 + T·τ) = ρ_hi + ρ_lo + c3 + c2,  τ = tanh ρ,

    T = tanh(k/TANH_STEPS) and D = 1 − T² from the table, c3 = τ − ρ by its series to ρ⁵ (the rest below
    0.054·R⁶·|ρ| <= 2**-70·|ρ|) and c2 = −T·τ²/(1 + T·τ), both from ρ in float64: |c3| <= R²·|ρ|/3, |c2| <= 1.01·R·|ρ|.
    Their errors, with m = |ρ_hi| and n = |ρ_lo|: τ rounded (2.1u·|ρ| through |∂c2/∂τ| <= 2.01·R:
    2**-61.9·(m + n)), T's lo left out of c2 (2**-64), c2's four roundings (2**-62), small = ρ_lo + c3 + c2's
    two (2**-62.8, and 2u·n), D's lo times small (2**-64), the rest's three roundings and the last sum's
    (2**-61.7, and 5u·n): below 2**-59·(m + n) + 8u·n in all; the tables' own (2**-101 of T and of D·g)
    below 2**-96·|result|.  T + D·ρ_hi is summed by TwoProduct (D_hi split in the table) and Fast2Sum
    (|D·ρ_hi| <= 2**-12 < T for k >= 1, and T = 0 for k = 0).  Relative to |tanh|, 2**-58 or better, as near
    0 as anywhere.  |tanh'| <= 1 carries the input's radius; beyond the table, ±1 within 2**-110.  With
    ``times``, T and D are read from tables multiplied by it (``_tanh_times``), and every term but the
    tables' scales by |times|."""
    c = abs(float(times))
    if c != 1 and not 2.0**-900 <= c <= 2.0**900:  # the scaled tables would underflow or overflow
        return mul(tanh(a), Iv(np.array(float(times))))
    plain, t_hi, t_lo, d_hi, d_lo, d_big, d_small = _tanh_times(float(times))
    hi, lo = a.hi, a.lo
    if _largest(lo) > 2.0**-12:  # far from normalised (a product's rest, near 0)
        hi, lo = two_sum(hi, lo)
    # every step in place, in a few buffers (a fresh array costs as much as a dozen operations on it)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        sign = np.copysign(1.0, hi)
        y = np.abs(hi)
        r = y * TANH_STEPS
        np.rint(r, out=r)
        beyond = None
        if not np.max(r, initial=0.0) < len(plain) - 1:  # the table's end, inf and nan
            beyond = ~(r < len(plain) - 1)
            r[beyond] = 0.0
        index = r.astype(np.intp)
        r *= -1.0 / TANH_STEPS
        r += y  # ρ_hi: exact (Sterbenz for k >= 1)
        rad = np.abs(r)
        rad *= 2.0**-59 * c
        rf = np.empty_like(r)
        if lo is None:
            rho_lo = None
            np.copyto(rf, r)
        else:
            rho_lo = np.multiply(lo, sign, out=y)  # exact
            np.abs(rho_lo, out=rf)
            rf *= (2.0**-59 + 8 * U) * c
            rad += rf
            np.add(r, rho_lo, out=rf)  # ρ in float64
        r2 = rf * rf
        c3 = r2 * (2 / 15)
        c3 -= 1 / 3
        c3 *= r2
        c3 *= rf  # tanh ρ − ρ to ρ⁵
        tau = np.add(rf, c3, out=r2)
        th = t_hi.take(index, mode="clip")
        if plain is t_hi:
            x = np.multiply(th, tau, out=rf)
        else:  # T (not times·T) for c2
            x = plain.take(index, mode="clip", out=rf)
            x *= tau
        one_x = x + 1
        np.divide(x, one_x, out=x)
        x *= tau
        small = np.subtract(c3, x, out=c3)  # c3 + c2
        if rho_lo is not None:
            small += rho_lo
        # D·ρ_hi = p + e exactly (Dekker's product, D_hi split in the table)
        p = d_hi.take(index, mode="clip", out=one_x)
        p *= r
        rh = np.multiply(r, SPLIT, out=r2)
        rl = np.subtract(rh, r, out=x)
        np.subtract(rh, rl, out=rh)
        np.subtract(r, rh, out=rl)
        part = d_big.take(index, mode="clip") if rho_lo is None else d_big.take(index, mode="clip", out=y)
        e = part * rh
        e -= p
        part *= rl
        e += part
        d_small.take(index, mode="clip", out=part)
        rh *= part
        e += rh
        rl *= part
        e += rl
        # the rest: e + D_hi·small + D_lo·ρ_hi + T_lo
        small *= d_hi.take(index, mode="clip", out=part)
        e += small
        d_lo.take(index, mode="clip", out=part)
        part *= r
        e += part
        e += t_lo.take(index, mode="clip", out=part)
        out_hi = np.add(th, p, out=r)
        out_lo = np.subtract(out_hi, th, out=th)
        np.subtract(p, out_lo, out=out_lo)  # Fast2Sum: T_hi + p = out_hi + out_lo exactly
        out_lo += e
        np.abs(out_hi, out=part)
        part *= 2.0**-96  # the tables' errors: 2**-98·|T| <= 2**-96·|out_hi|
        rad += part
        out_hi *= sign
        out_lo *= sign
        if a.rad is not None:
            rad += a.rad * c
        rad *= INFLATE
        rad += 36 * ETA  # underflows (of ρ's series and Dekker's product, for |a| below 2**-960)
        if not hi.all():  # tanh of an exact 0 is exactly 0
            zero = hi == 0
            for part in (lo, a.rad):
                if part is not None:
                    zero &= part == 0
            np.copyto(rad, 0.0, where=zero)
        if beyond is not None:
            nan = np.isnan(hi[beyond])
            out_hi[beyond], out_lo[beyond] = np.where(nan, np.nan, sign[beyond] * times), 0.0
            rad[beyond] = np.where(nan, np.inf, (2.0**-110 + a.radius()[beyond]) * c + 36 * ETA)
    return Iv(out_hi, out_lo, rad, a.excluded)
