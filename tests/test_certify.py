from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

import pytest

from symattn import certify


def decimal_round(x: Fraction, digits: int) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = digits + 400
        exact = Decimal(x.numerator) / Decimal(x.denominator)
        ctx.prec = digits
        ctx.rounding = ROUND_HALF_EVEN
        return +exact


@pytest.mark.parametrize(
    "x",
    [
        Fraction(2, 3),
        Fraction(-1, 7),
        Fraction(1, 8),
        Fraction(5, 2),
        Fraction(999_999, 1000),
        Fraction(1, 10**30),
        Fraction(10**40 + 1),
        Fraction(-3, 2**70),
        Fraction(1, 3 * 10**8),
    ],
)
@pytest.mark.parametrize("digits", [1, 2, 3, 7, 30])
def test_exact_rounding_matches_decimal(x, digits):
    assert Decimal(certify.exact_string(x, digits)) == decimal_round(x, digits)


def test_ties_round_to_even():
    assert certify.exact_string(Fraction(125, 1000), 2) == "0.12"
    assert certify.exact_string(Fraction(135, 1000), 2) == "0.14"
    assert certify.exact_string(Fraction(-25, 10), 1) == "-2"


def test_carry_into_next_decade_keeps_the_digit_count():
    assert certify.exact_string(Fraction(99999, 10000), 3) == "10.0"
    assert certify.exact_string(Fraction(9999999, 10), 3) == "1.00e+6"


def test_formats():
    assert certify.exact_string(Fraction(1, 2), 5) == "0.50000"
    assert certify.exact_string(Fraction(0), 5) == "0"
    assert certify.exact_string(Fraction(1, 10**9), 2) == "1.0e-9"
    assert certify.exact_string(Fraction(12345), 5) == "12345"
    assert certify.exact_string(Fraction(123456), 5) == "1.2346e+5"


def test_enclosure_certifies_only_when_both_ends_agree():
    assert certify.certified_string(Fraction(6666, 10000), Fraction(6667, 10000), 3) == "0.667"
    assert certify.certified_string(Fraction(6664, 10000), Fraction(6666, 10000), 3) is None
    assert certify.certified_string(Fraction(-1, 10**9), Fraction(1, 10**9), 3) is None  # never proves 0
    assert certify.certified_string(Fraction(0), Fraction(0), 3) == "0"  # a point at zero does
    assert certify.certified_string(Fraction(99995, 10000), Fraction(99996, 10000), 4) == "10.00"


def test_decimal_fast_path_agrees_with_the_exact_one():
    import random

    rng = random.Random(3)
    for _ in range(20000):
        lo = rng.randint(-(10**12), 10**12)
        hi = lo + rng.choice([0, 0, 1, 2, 10, 1000, rng.randint(0, 10**9)])
        e, digits = rng.randint(-20, 5), rng.randint(1, 14)
        scale = (1, 10**-e) if e < 0 else (10**e, 1)
        expected = certify.certified_string((lo * scale[0], scale[1]), (hi * scale[0], scale[1]), digits)
        assert certify.certified_decimal(lo, hi, e, digits) == expected, (lo, hi, e, digits)


def test_integers_fast_path():
    assert certify.exact_string(Fraction(-42), 5) == "-42.000"
    assert certify.exact_string(Fraction(123456), 3) == "1.23e+5"
    assert certify.exact_string(Fraction(7), 1) == "7"


def test_a_ball_of_millions_of_bits_rounds_to_a_few_places_from_its_first_digits(monkeypatch):
    """A notebook's check asks a value to 57 places after its evaluation rose to 4 million bits (an exact sum
    like −3 + 2**-4194304): converting the whole ball gave 1.26 million digits, which Python turns into text
    in quadratic time (a full-suite run hung there).  Only the digits the places need are converted, and a
    value far below them rounds to 0 from its size alone."""
    import flint

    from symattn.backends.engines import ArbEngine
    from symattn.truth.result import _digits_for_places

    bits = 1 << 22
    engine = ArbEngine(bits)
    with engine.active():
        near = flint.arb(-3) + flint.arb(2) ** -bits
        tiny = flint.arb(2) ** -bits * 3
    for ball, expected in ((near, -3 * 10**57), (tiny, 0)):
        convert = _digits_for_places(engine, ball, 12, 57)
        assert convert < 200
        lo, hi, e = engine.decimal(ball, 12, convert)
        assert certify.round_scaled(lo, e, 57) == certify.round_scaled(hi, e, 57) == expected

    # a huge integer far below the places rounds to 0 from its bit length, without its decimal digits (which
    # Python makes in quadratic time)
    def no_digits(n):
        raise AssertionError("decimal digits of a huge integer")

    monkeypatch.setattr(certify, "digits_of", no_digits)
    assert certify.round_scaled(7**1_500_000, -1_300_000, 10) == 0


def test_a_ball_near_a_rounding_boundary_is_converted_whole_when_its_first_digits_straddle_it():
    """1/(2 + e**-300) is 0.5 − 1e-131: at 0 places the digits the places need (40 more) straddle 0.5, and every
    digit the precision carries (2,000 bits) settles it below: 0.  Before, only the short conversion was tried,
    which no precision could settle."""
    import flint

    from symattn.backends.engines import ArbEngine
    from symattn.truth.result import _digits_for_places, rounded_ends

    engine = ArbEngine(2000)
    with engine.active():
        ball = 1 / (2 + flint.arb(-300).exp())
    lo, hi, e = engine.decimal(ball, 12, _digits_for_places(engine, ball, 12, 0))
    assert certify.round_scaled(lo, e, 0) != certify.round_scaled(hi, e, 0)  # the short conversion straddles
    assert rounded_ends(engine, ball, 12, 0) == (0, 0)
    assert rounded_ends(engine, ball, 12, 3) == (500, 500)
