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
The elementary functions the graph needs (exp, tanh) are ``elementary``'s.

An enclosure is only as good as its width: ``truth`` certifies from it the
entries whose enclosure is narrow enough for the digits asked and computes the
others again in Arb, on their query rows alone.
"""

from __future__ import annotations

import math

import numpy as np

from symattn.graph.xp import union

U = 2.0**-53  # unit roundoff of float64
ETA = 2.0**-1074  # smallest subnormal: the absolute error of an underflow
INFLATE = 1 + 2.0**-44  # each radius formula's own roundings, with a large margin
SPLIT = 134217729.0  # 2**27 + 1: Dekker's splitter
CHUNK = 128  # the terms of a product's rest summed in one matrix product (its rounding error is γ_CHUNK)


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


def dekker_split(a):
    c = SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a, b):
    """p + e = a·b exactly (Dekker; |a|, |b| below 2**995, no underflow in the parts)."""
    p = a * b
    ah, al = dekker_split(a)
    bh, bl = dekker_split(b)
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
    if a.excluded is not None or not largest_magnitude(hi) <= 2.0**995 or not 2.0**-900 <= abs(sh) <= 2.0**995:
        return mul(a, s)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        p = hi * sh
        big = hi * SPLIT  # Dekker's split of hi: big − (big − hi) and its rest
        rest = big - hi
        np.subtract(big, rest, out=big)
        np.subtract(hi, big, out=rest)
        bh, bl = dekker_split(np.float64(sh))
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


def largest_magnitude(lo) -> float:
    """max |lo| (0 for None)."""
    return 0.0 if lo is None else max(float(np.max(lo, initial=0.0)), -float(np.min(lo, initial=0.0)))
