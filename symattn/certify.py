"""Correctly rounded decimals from exact numbers and from enclosures.

A value is printed with d significant digits only when both ends of its
enclosure round to the same d digits (rounding is monotone, so then every
number in between, the true value included, rounds to them too).  Exact
rationals are rounded directly.  Rounding is half-to-even throughout.

Numbers are exact rationals, given as a ``Fraction`` or as a pair
``(numerator, denominator)`` with a positive, not necessarily reduced,
denominator: the engines hand over the ends of their balls that way, with no
GCD to pay for.
"""

from __future__ import annotations

from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from functools import lru_cache

LOG10_2 = 0.30102999566398120

Rational = Fraction | tuple  # (numerator, denominator > 0)


@lru_cache(maxsize=4096)
def _pow10(k: int) -> int:
    return 10**k


def _pair(x: Rational) -> tuple[int, int]:
    if isinstance(x, tuple):
        return x
    return x.numerator, x.denominator


def _round_half_even(num: int, den: int) -> int:
    """num/den rounded to the nearest integer, ties to even (den > 0)."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q % 2):
        q += 1
    return q


def round_significant(x: Rational, digits: int) -> tuple[int, int]:
    """(q, e) with x ≈ q·10**(e - digits + 1), |q| having exactly ``digits`` digits; (0, 0) for zero.

    >>> round_significant(Fraction(2, 3), 3)
    (667, -1)
    """
    num, den = _pair(x)
    if num == 0:
        return 0, 0
    negative = num < 0
    num = -num if negative else num
    # e estimates floor(log10(x)) to within one or two; the truncated digits tell which way to correct it
    e = int((num.bit_length() - den.bit_length()) * LOG10_2)
    top, bottom = _pow10(digits), _pow10(digits - 1)
    while True:
        shift = digits - 1 - e
        n, d = (num * _pow10(shift), den) if shift >= 0 else (num, den * _pow10(-shift))
        q, r = divmod(n, d)
        if q >= top:
            e += 1
        elif q < bottom:
            e -= 1
        else:
            break
    if 2 * r > d or (2 * r == d and q % 2):
        q += 1
        if q == top:  # 9.99… rounded up into the next decade
            q, e = bottom, e + 1
    return (-q if negative else q), e


def round_places(x: Rational, places: int) -> int:
    """q with x ≈ q·10**-places, ties to even (places may be negative)."""
    num, den = _pair(x)
    if places >= 0:
        return _round_half_even(num * _pow10(places), den)
    return _round_half_even(num, den * _pow10(-places))


def format_significant(q: int, e: int, digits: int) -> str:
    """The decimal string of round_significant's result: positional for moderate exponents
    (Python's Decimal rules, with a lower-case e).

    >>> format_significant(667, -1, 3), format_significant(123, 5, 3), format_significant(0, 0, 3)
    ('0.667', '1.23e+5', '0')
    """
    if q == 0:
        return "0"
    return _text(_context(digits).create_decimal(q).scaleb(e - digits + 1, _context(digits)))


@lru_cache(maxsize=64)
def _context(digits: int) -> Context:
    return Context(prec=digits, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _text(value: Decimal) -> str:
    return str(value).replace("E", "e")


def certified_string(lo: Rational, hi: Rational, digits: int) -> str | None:
    """The ``digits``-digit decimal that every number in [lo, hi] rounds to, or None."""
    a = round_significant(lo, digits)
    if _pair(lo) == _pair(hi):
        return format_significant(*a, digits)
    if a != round_significant(hi, digits):  # an enclosure around 0 never proves 0: its ends differ in sign
        return None
    return format_significant(*a, digits)


def exact_string(x: Rational, digits: int) -> str:
    num, den = _pair(x)
    if den == 1 and len(str(abs(num))) <= digits:  # integers, the common exact case: no division
        text = str(abs(num))
        return format_significant((-1 if num < 0 else 1) * int(text.ljust(digits, "0")), len(text) - 1, digits)
    return format_significant(*round_significant(x, digits), digits)


def certified_decimal(lo: int, hi: int, exp10: int, digits: int) -> str | None:
    """Like certified_string for the enclosure [lo, hi]·10**exp10 (integers): the engines' fast path,
    rounding in C through the decimal module."""
    context = _context(digits)
    a = context.create_decimal(lo)
    if a != context.create_decimal(hi):  # an enclosure around 0 never proves 0: its ends differ in sign
        return None
    if not a:
        return "0"  # lo = hi = 0: a point at zero
    if lo == hi:  # an exact point may have fewer digits than asked: pad with zeros
        sign, coefficient, exponent = a.as_tuple()
        pad = digits - len(coefficient)
        if pad > 0:
            a = Decimal((sign, coefficient + (0,) * pad, exponent - pad))
    return _text(a.scaleb(exp10, context))
