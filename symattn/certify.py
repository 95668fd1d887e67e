"""Correctly rounded decimals from exact numbers and from enclosures.

A value is printed with d significant digits only when both ends of its
enclosure round to the same d digits (rounding is monotone, so then every
number in between, the true value included, rounds to them too).  Exact
rationals are rounded directly.  Rounding is half-to-even throughout.
"""

from __future__ import annotations

from fractions import Fraction

LOG10_2 = 0.30102999566398120


def _round_half_even(num: int, den: int) -> int:
    """num/den rounded to the nearest integer, ties to even (den > 0)."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q % 2):
        q += 1
    return q


def _decade(x: Fraction) -> int:
    """floor(log10(|x|)) for x != 0, exactly."""
    num, den = abs(x.numerator), x.denominator
    e = int((num.bit_length() - den.bit_length()) * LOG10_2)
    while True:  # the estimate is off by at most one or two; settle it exactly
        if e >= 0:
            low, high = num >= den * 10**e, num < den * 10 ** (e + 1)
        else:
            low, high = num * 10**-e >= den, num * 10 ** (-e - 1) < den
        if low and high:
            return e
        e += 1 if not high else -1


def round_significant(x: Fraction, digits: int) -> tuple[int, int]:
    """(q, e) with x ≈ q·10**(e - digits + 1), |q| having exactly ``digits`` digits; (0, 0) for zero.

    >>> round_significant(Fraction(2, 3), 3)
    (667, -1)
    """
    if x == 0:
        return 0, 0
    e = _decade(x)
    shift = digits - 1 - e
    num, den = abs(x.numerator), x.denominator
    if shift >= 0:
        q = _round_half_even(num * 10**shift, den)
    else:
        q = _round_half_even(num, den * 10**-shift)
    if q == 10**digits:  # 9.99… rounded up into the next decade
        q, e = q // 10, e + 1
    return (q if x > 0 else -q), e


def round_places(x: Fraction, places: int) -> int:
    """q with x ≈ q·10**-places, ties to even (places may be negative)."""
    num, den = x.numerator, x.denominator
    if places >= 0:
        return _round_half_even(num * 10**places, den)
    return _round_half_even(num, den * 10**-places)


def format_significant(q: int, e: int, digits: int) -> str:
    """The decimal string of round_significant's result: positional for moderate exponents.

    >>> format_significant(667, -1, 3), format_significant(123, 5, 3), format_significant(0, 0, 3)
    ('0.667', '1.23e+5', '0')
    """
    if q == 0:
        return "0"
    sign = "-" if q < 0 else ""
    text = str(abs(q))
    if -6 <= e < digits:
        if e >= 0:
            whole, frac = text[: e + 1], text[e + 1 :]
            return sign + whole + ("." + frac if frac else "")
        return sign + "0." + "0" * (-e - 1) + text
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    return f"{sign}{mantissa}e{e:+d}"


def certified_string(lo: Fraction, hi: Fraction, digits: int) -> str | None:
    """The ``digits``-digit decimal that every number in [lo, hi] rounds to, or None."""
    a = round_significant(lo, digits)
    if lo == hi:
        return format_significant(*a, digits)
    b = round_significant(hi, digits)
    if a != b or a[0] == 0:  # an enclosure containing 0 never proves 0
        return None
    return format_significant(*a, digits)


def exact_string(x: Fraction, digits: int) -> str:
    return format_significant(*round_significant(x, digits), digits)
