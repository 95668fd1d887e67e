"""Correctly rounded decimals from exact numbers and from enclosures.

A value is printed with d significant digits only when both ends of its
enclosure round to the same d digits (rounding is monotone, so then every
number in between, the true value included, rounds to them too).  Exact
rationals are rounded directly.  Rounding is half-to-even throughout.

Numbers are exact rationals, given as a ``Fraction`` or as a pair
``(numerator, denominator)`` with a positive, not necessarily reduced,
denominator: the engines hand over the ends of their balls that way, with no
GCD to pay for.  Exponents are Python integers of any size: a value far below
every float (exp(-10**18)) prints with its true exponent, never as a clamped 0.
Digits go through the decimal module, which has no limit on the length of the
integers it converts.
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
        num *= _pow10(places)
    else:
        den *= _pow10(-places)
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    return q


def round_scaled(v: int, e: int, places: int) -> int | None:
    """v·10**e rounded to ``places`` decimals (half to even), as q with value ≈ q·10**-places; None when the
    value is too large to be worth the integer (more than 10**5 digits before the point).  Tiny values round
    to 0 without building 10**-e."""
    k = e + places
    if k >= 0:
        if k > 100_000:
            return None
        return v * _pow10(k)
    if -k > int(abs(v).bit_length() * 0.30103) + 2:  # |v| < 10**(-k - 1): |v·10**k| < 1/10 rounds to 0
        return 0
    return _round_half_even(v, _pow10(-k))


def _round_half_even(num: int, den: int) -> int:
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    return q


def digits_of(n: int) -> str:
    """The decimal digits of |n| (no limit on their number, unlike str(int))."""
    return str(Decimal(abs(n)))


def layout(negative: bool, coefficient: str, exponent: int) -> str:
    """The text of ±coefficient·10**exponent by the decimal module's rules (positional for moderate
    exponents, else one digit before the point and a lower-case e), for exponents of any size."""
    left = exponent + len(coefficient)  # digits left of the point in positional notation
    dot = left if exponent <= 0 and left > -6 else 1
    if dot <= 0:
        text = "0." + "0" * -dot + coefficient
    elif dot >= len(coefficient):
        text = coefficient + "0" * (dot - len(coefficient))
    else:
        text = coefficient[:dot] + "." + coefficient[dot:]
    if left != dot:
        text += f"e{left - dot:+d}"
    return ("-" if negative else "") + text


def format_significant(q: int, e: int, digits: int) -> str:
    """The decimal string of round_significant's result.

    >>> format_significant(667, -1, 3), format_significant(123, 5, 3), format_significant(0, 0, 3)
    ('0.667', '1.23e+5', '0')
    >>> format_significant(163, -10**18, 3)
    '1.63e-1000000000000000000'
    """
    if q == 0:
        return "0"
    return layout(q < 0, digits_of(q), e - digits + 1)


@lru_cache(maxsize=64)
def decimal_context(digits: int) -> Context:
    """The decimal module's context that rounds to ``digits`` significant digits, half to even, at any exponent."""
    return Context(prec=digits, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN)


SAFE_EXPONENT = 10**15  # below this the decimal module's own scaleb and str are exact (its limit is 10**18)


def certified_string(lo: Rational, hi: Rational, digits: int) -> str | None:
    """The ``digits``-digit decimal that every number in [lo, hi] rounds to, or None."""
    a = round_significant(lo, digits)
    if _pair(lo) == _pair(hi):
        return format_significant(*a, digits)
    if a != round_significant(hi, digits):  # an enclosure around 0 never proves 0: its ends differ in sign
        return None
    return format_significant(*a, digits)


def exact_string(x: Rational, digits: int) -> str:
    return format_significant(*round_significant(x, digits), digits)


def certified_decimal(lo: int, hi: int, exp10: int, digits: int) -> str | None:
    """Like certified_string for the enclosure [lo, hi]·10**exp10 (integers): the engines' fast path,
    rounding in C through the decimal module.  Only the integers' own (small) exponent goes through the
    module's context; exp10 is added as a Python integer, so no exponent is ever clamped."""
    context = decimal_context(digits)
    a = context.create_decimal(lo)
    if a != context.create_decimal(hi):  # an enclosure around 0 never proves 0: its ends differ in sign
        return None
    if not a:
        return "0"  # lo = hi = 0: a point at zero
    if lo != hi and -SAFE_EXPONENT < exp10 < SAFE_EXPONENT:  # the common case, all in C
        return str(a.scaleb(exp10, context)).replace("E", "e")
    sign, coefficient, exponent = a.as_tuple()
    text = "".join(map(str, coefficient))
    if len(text) < digits:  # an exact point may have fewer digits than asked: pad with zeros
        exponent -= digits - len(text)
        text += "0" * (digits - len(text))
    return layout(bool(sign), text, exponent + exp10)


def settle_by_side(lo: int, hi: int, exp10: int, digits: int, sign_of) -> str | None:
    """The certified string of a value in [lo, hi]·10**exp10 whose two ends round to neighbouring ``digits``-digit
    decimals, given ``sign_of(boundary)``: the proven sign of (value - the boundary between them)."""
    scale = (_pow10(exp10), 1) if exp10 >= 0 else (1, _pow10(-exp10))
    a = round_significant((lo * scale[0], scale[1]), digits)
    b = round_significant((hi * scale[0], scale[1]), digits)
    if a == b:
        return format_significant(*a, digits)
    # the two neighbours and the boundary halfway between them (a value on the boundary is rational: decided
    # exactly before this is asked)
    low = Fraction(a[0]) * Fraction(10) ** (a[1] - digits + 1)
    high = Fraction(b[0]) * Fraction(10) ** (b[1] - digits + 1)
    if not a[0] or not b[0] or high - low != Fraction(10) ** (min(a[1], b[1]) - digits + 1):
        return None  # not neighbours (0 has none: every decade lies between): more precision must narrow it
    boundary = (low + high) / 2
    if not (Fraction(lo * scale[0], scale[1]) <= boundary <= Fraction(hi * scale[0], scale[1])):
        return None
    # the enclosure must cross only this boundary: its ends are within half a unit of the neighbours
    sign = sign_of(boundary)
    if sign is None or sign == 0:
        return None
    return format_significant(*(b if sign > 0 else a), digits)


def bound_string(lo: int, hi: int, exp10: int) -> str:
    """ "<1e-N" for an enclosure [lo, hi]·10**exp10 that contains zero: the smallest power of ten above
    both ends in magnitude (N may be negative for a wide enclosure: "<1e+3")."""
    top = max(abs(lo), abs(hi))
    if top == 0:
        return "0"
    power = len(digits_of(top)) + exp10  # 10**power > top·10**exp10
    return f"<1e{power:+d}" if power > 0 else f"<1e{power}"


def to_decimal(text: str):
    """A value string as a Decimal where the decimal module can hold its exponent, else the string itself
    (bounds such as "<1e-40" stay strings; "-inf" and "nan" become Decimal's own)."""
    if text.startswith("<"):
        return text
    try:
        value = Decimal(text)
    except ArithmeticError:
        return text
    if value.is_finite() and value and not (-999_999_999_999_999_999 <= value.adjusted() <= 999_999_999_999_999_999):
        return text
    return value
