from decimal import Decimal
from fractions import Fraction

import pytest
import sympy

from symattn import SymattnError
from symattn.entries import Expr, is_algebraic, parse_entry, symbols, to_sympy


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3/4", Fraction(3, 4)),
        ("-0.125", Fraction(-1, 8)),
        ("0.1", Fraction(1, 10)),
        ("1e-3", Fraction(1, 1000)),
        ("2**-2", Fraction(1, 4)),
        ("sqrt(9/4)", Fraction(3, 2)),
        ("(1 + 2) * 3", Fraction(9)),
        ("1_000", Fraction(1000)),
        ("exp(0)", Fraction(1)),
        ("log(1)", Fraction(0)),
        ("4**(1/2)", Fraction(2)),
    ],
)
def test_rational_text_folds_to_a_fraction(text, value):
    assert parse_entry(text, "x[0][0]") == value


def test_numbers():
    assert parse_entry(3, "e") == Fraction(3)
    assert parse_entry(Decimal("0.1"), "e") == Fraction(1, 10)
    assert parse_entry(0.5, "e") == Fraction(1, 2)
    assert parse_entry(0.1, "e") == Fraction(0.1)  # a float is its exact binary value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sqrt(2)/2", sympy.sqrt(2) / 2),
        ("exp(1)", sympy.E),
        ("a", sympy.Symbol("a", real=True)),
        ("-a*b + 1/3", -sympy.Symbol("a", real=True) * sympy.Symbol("b", real=True) + sympy.Rational(1, 3)),
        ("pi/4", sympy.pi / 4),
        ("log(2)", sympy.log(2)),
        ("2**(1/3)", sympy.cbrt(2)),
    ],
)
def test_irrational_and_symbolic_text(text, expected):
    entry = parse_entry(text, "e")
    assert isinstance(entry, Expr)
    assert sympy.simplify(to_sympy(entry) - expected) == 0


def test_questions():
    assert symbols(parse_entry("a*b + sqrt(c)", "e")) == {"a", "b", "c"}
    assert is_algebraic(parse_entry("sqrt(2)/3 + 2**(1/3)", "e"))
    assert not is_algebraic(parse_entry("exp(1)", "e"))
    assert not is_algebraic(parse_entry("pi", "e"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os')", r"^x\[0\]\[1\]: a call of __import__ is not allowed in .*; allowed: integers"),
        ("a.b", r"^x\[0\]\[1\]: the syntax Attribute is not allowed"),
        ("[1]", r"^x\[0\]\[1\]: the syntax List is not allowed"),
        ("lambda: 1", r"^x\[0\]\[1\]: the syntax Lambda is not allowed"),
        ("1 if 1 else 2", r"^x\[0\]\[1\]: the syntax IfExp is not allowed"),
        ("7 % 2", r"^x\[0\]\[1\]: the operator Mod is not allowed"),
        ("'s'", r"^x\[0\]\[1\]: the literal 's' is not allowed"),
        ("True", r"^x\[0\]\[1\]: the literal True is not allowed"),
        ("1j", r"^x\[0\]\[1\]: the literal 1j is not allowed"),
        ("sin(1)", r"^x\[0\]\[1\]: a call of sin is not allowed"),
        ("sqrt(1, 2)", r"^x\[0\]\[1\]: sqrt takes exactly one argument"),
        ("sqrt", r"^x\[0\]\[1\]: the function name 'sqrt' without a call is not allowed"),
        ("1/0", r"^x\[0\]\[1\]: '1/0' divides by zero"),
        ("sqrt(-1)", r"^x\[0\]\[1\]: 'sqrt\(-1\)': sqrt\(-1\) is not a real number"),
        ("(-8)**(1/3)", r"^x\[0\]\[1\]: .*is not a real number"),
        ("2**100000", r"^x\[0\]\[1\]: '2\*\*100000': the exponent 100000 is larger than 10000"),
        ("1 +", r"^x\[0\]\[1\]: expected integers, .*; received '1 \+', which does not parse"),
        ("", r"^x\[0\]\[1\]: expected integers.*which does not parse"),
    ],
)
def test_refused_text_names_the_entry_and_what_is_allowed(text, message):
    with pytest.raises(SymattnError, match=message):
        parse_entry(text, "x[0][1]")


def test_refused_values():
    with pytest.raises(SymattnError, match=r"^wo\[1\]\[0\]: expected a finite number, received NaN"):
        parse_entry(Decimal("NaN"), "wo[1][0]")
    with pytest.raises(SymattnError, match=r"^wo\[1\]\[0\]: expected a finite number, received inf"):
        parse_entry(float("inf"), "wo[1][0]")
    with pytest.raises(SymattnError, match=r"^wo\[1\]\[0\]: expected a number or an exact expression .*received True"):
        parse_entry(True, "wo[1][0]")
    with pytest.raises(SymattnError, match=r"^wo\[1\]\[0\]: expected a number .*received NoneType None"):
        parse_entry(None, "wo[1][0]")
    with pytest.raises(SymattnError, match=r"at most 10000 characters"):
        parse_entry("1+" * 6000 + "1", "e")
