"""The elementary functions of double-float intervals (``doublefloat``) that the graph needs: exp and tanh,
by tables from Arb.

- ``exp`` reduces its argument to r = x − k/2048 (exact) and multiplies a
  double-float table value exp(k/2048) (from Arb) by 1 + expm1(r), expm1(r)
  by its Taylor polynomial of degree 5 (|r| ≤ 2⁻¹² + |lo|); a softmax's shift,
  a multiple of 1/2048, only moves the table's index.  Its precise path (the
  gradients') takes table·r as an exact TwoProduct and only expm1(r) − r in
  float64: 2⁻⁷³ rather than 2⁻⁶².
- ``tanh`` (softcap, score_mods) reads a table of tanh(k/2048) and 1 − tanh²
  and adds the rest by the addition theorem, its small terms by a short series
  in float64; a factor c (c·tanh) is folded into the tables.

tests/test_intervals.py checks both against Arb on many random arguments.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from symattn.backends.doublefloat import (
    ETA,
    INFLATE,
    SPLIT,
    Iv,
    U,
    dekker_split,
    largest_magnitude,
    mul,
    two_prod,
    two_sum,
)
from symattn.backends.engines import precision

STEPS = 2048  # exp's table: exp(k / STEPS)
EXP_LOW, EXP_HIGH = -746, 3  # the table's range: exp underflows below, and the softmax's arguments are ≤ 0


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
    low = largest_magnitude(lo)
    if not low <= 2.0**-9:  # a far from normalised double-float, or huge arguments: normalised first
        with np.errstate(invalid="ignore"):
            x, lo = two_sum(x, lo)
            lo = np.where(x >= lowest, lo, 0.0)  # below the table (|lo| up to half an ulp of x): unread
        low = largest_magnitude(lo)
        if not low <= 2.0**-9:  # not reached for finite arguments (|lo| <= 2**-12 once |x| < 2**41)
            return Iv(np.zeros_like(x), np.zeros_like(x), np.full(x.shape, np.inf))
    with np.errstate(invalid="ignore"):
        x = np.maximum(x, lowest)
        t = x * STEPS
        np.rint(t, out=t)
        r = t * (-1.0 / STEPS)
        r += x  # exact: |r| <= 2**-12 and a multiple of ulp(x)
        t -= top * STEPS + (EXP_LOW * STEPS - 1)  # the table's index (k − shift·STEPS − EXP_LOW·STEPS + 1)
        index = t.astype(np.intp)
    above = (index >= len(hi_table) - STEPS) | np.isnan(a.hi) if shift is None else None
    big_r = 2.0**-12 + low
    if precise:
        hi, lo, rel = _exp_precise(lo, r, t, index, big_r, hi_table, lo_table)
        factor, floor = 1.005, 24 * ETA
    else:
        hi, lo, rel = _exp_plain(lo, r, index, big_r, hi_table, lo_table)
        factor, floor = 1.002, 20 * ETA
    if a.rad is not None:  # the input's radius through e**rad − 1 <= rad·(1 + rad) (rad <= 1/2) times e**|r|
        rad_in = a.rad  # <= 1 + 2|r|: for rad <= 2**-20 at most 1.002·rad (all of it times ``factor``)
        if float(np.max(rad_in, initial=0.0)) <= 2.0**-20:
            rel += rad_in
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                growth = rad_in * (1 + rad_in) * (1 + 2 * big_r + rel)
                growth[~(rad_in <= 0.5)] = np.inf
            rel += growth
    rad = np.multiply(rel, hi, out=rel)
    rad *= factor * INFLATE
    rad += floor
    if a.excluded is not None:  # exactly 0
        np.copyto(rad, 0.0, where=a.excluded)
    if above is not None and above.any():
        rad[above] = np.inf
    if bad.any():
        bad = np.broadcast_to(bad, hi.shape)
        hi[bad], lo[bad], rad[bad] = 0.0, 0.0, np.inf
    return Iv(hi, lo, rad, below=2.0 if shift is not None else math.exp(EXP_HIGH) * 1.01, one_key=_one_key(a))


def _exp_plain(lo, r, index, big_r, hi_table, lo_table) -> tuple:
    """``exp``'s path to 2**-62: (hi, lo, the relative error before the input's radius), from r = x − k/STEPS
    (exact).  Relative to hi, for |r| <= R = 2**-12 + max|a.lo| <= 2**-8: Horner's roundings (q within
    2.01u·|q|), d's rounding (u·|q|), |q| <= 1.002|r|, the rounding of r (u·|r|): 4.2u·|r| per entry; the
    truncation R**6/720·e**R and the table's error."""
    with np.errstate(invalid="ignore"):
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
    table = hi_table.take(index, mode="clip")
    q *= table  # d: |d| <= 2**-10·table, its rounding (u·|d|) in the radius below
    hi = table + q
    lo = np.subtract(table, hi, out=table)
    lo += q  # Fast2Sum: table + d = hi + lo exactly
    lo += lo_table.take(index, mode="clip")  # rounded: u·|lo|, with |lo| <= 2u·hi
    rel = np.abs(r, out=r)
    rel *= 4.2 * U
    rel += TABLE_ERROR + big_r**6 / 720 * 1.01
    return hi, lo, rel


def _exp_precise(lo, r, t, index, big_r, hi_table, lo_table) -> tuple:
    """``exp``'s precise path, as ``_exp_plain``, from r = x − k/STEPS (exact); ``t`` a buffer.  With T = T_hi +
    T_lo the table's entry and ρ = r + lo (rf in float64, within u·|ρ|): exp = T·(1 + ρ + q2), q2 = expm1(ρ) −
    ρ, and

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
    rel += TABLE_ERROR + 8 * U * U + big_r**7 / 5040 * 1.01
    return hi, out_lo, rel


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
    return (t_hi, t_lo, d_hi, d_lo, *dekker_split(d_hi))


@lru_cache(maxsize=8)
def _tanh_times(c: float) -> tuple:
    """``tanh_table`` times an exact float64 c: (T_hi, c·T as hi and lo, c·D as hi and lo, c·D_hi's two halves),
    each product by TwoProduct plus c times the lo, within 2**-101 of c·T (c·D) relatively."""
    t_hi, t_lo, d_hi, d_lo, *_ = tanh_table()
    if c == 1:
        return (t_hi, t_hi, t_lo, d_hi, d_lo, *dekker_split(d_hi))
    with np.errstate(under="ignore"):
        ct, ct_lo = two_prod(t_hi, np.float64(c))
        ct_lo += t_lo * c
        cd, cd_lo = two_prod(d_hi, np.float64(c))
        cd_lo += d_lo * c
    return (t_hi, ct, ct_lo, cd, cd_lo, *dekker_split(cd))


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
    if largest_magnitude(lo) > 2.0**-12:  # far from normalised (a product's rest, near 0)
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
