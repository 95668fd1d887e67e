"""Exact matrix entries: a whitelist parser over Python's ``ast`` and a tiny expression tree.

An entry is a ``Fraction`` (integers, decimals and fractions fold to one) or an
``Expr`` node for anything irrational or symbolic (``sqrt(2)/2``, ``exp(1)``,
``a``).  The tree converts to SymPy for printing and to a ball for the engines,
so neither the parser nor the truth ever needs SymPy.  User text is never
handed to ``eval``, ``sympify`` or ``parse_expr``.

Everything is bounded before any work that could take long: the text's length
and nesting, the digits of a literal, the bits of a folded rational, and the
magnitude of every numeric value (|x| below 2**MAX_EXPONENT).  What is not a
real number (``sqrt`` of a negative, ``log`` of a non-positive, a non-integer
power of a negative, a division by zero) is refused; for irrational arguments
the sign is proven with Arb balls, and an argument whose sign cannot be proven
(``sqrt(2) - sqrt(2)`` is exactly zero) is refused too.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from symattn.errors import SymattnError

FUNCTIONS = ("sqrt", "exp", "log")
CONSTANTS = ("pi",)
ALLOWED = (
    "integers, decimals, fractions such as '3/4', symbol names, "
    "+ - * / **, and the functions sqrt, exp, log (pi is the constant)"
)
MAX_TEXT = 10_000  # characters of an expression string
MAX_OPERATORS = 1_000  # operators and parentheses in one expression
MAX_DEPTH = 100  # nesting of parentheses and calls
MAX_LITERAL_DIGITS = 4_300  # digits of a literal, and of an integer's or rational's parts: Python's default
# int-string limit (sys.get_int_max_str_digits), so that every entry converts to and from text
MAX_EXPONENT = 16_384  # every numeric value has |x| < 2**MAX_EXPONENT, and a non-zero one |x| > 2**-MAX_EXPONENT
MAX_BITS = 2 * MAX_EXPONENT + 64  # bits of a folded rational's numerator or denominator
MAX_POWER = 10_000  # |integer exponent| allowed in '**'
EXP_LIMIT = 11_000  # exp(x) needs x < EXP_LIMIT (e**11000 < 2**16384)
SIGN_BITS = (64, 256, 1024)  # precisions tried to prove the sign of an irrational value

_LITERAL = re.compile(r"^(\d[\d_]*)?(\.[\d_]*)?([eE][+-]?\d[\d_]*)?$")


@dataclass(frozen=True)
class Expr:
    """An irrational or symbolic exact value.

    ``op`` is one of ``sym`` (args: name), ``const`` (args: name), ``add``,
    ``mul`` (args: operands), ``pow`` (args: base, exponent) or a function name
    from ``FUNCTIONS`` (args: argument).  Rational sub-terms are ``Fraction``.
    """

    op: str
    args: tuple

    def __str__(self) -> str:
        return to_text(self)


Entry = Fraction | Expr


def max_digits() -> int:
    """The digits allowed in a literal or an entry's integers: MAX_LITERAL_DIGITS, or less where Python's
    int-string limit is set lower (PYTHONINTMAXSTRDIGITS)."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    return min(MAX_LITERAL_DIGITS, limit) if limit else MAX_LITERAL_DIGITS


def digit_count(n: int) -> int:
    """The decimal digits of |n|, counted without converting it to text (which Python limits)."""
    return len(Decimal(abs(n)).as_tuple().digits) if n else 1


def too_many_digits(n: int) -> int:
    """The digits of |n| when there are more than ``max_digits()``, else 0."""
    if n.bit_length() <= 3 * max_digits():  # 2**(3k) < 10**k: short enough without counting
        return 0
    digits = digit_count(n)
    return digits if digits > max_digits() else 0


def quoted(text: str) -> str:
    """User text quoted for a message: a long one cut to its first 40 characters, and its length."""
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}… ({len(text)} characters)"


def parse_entry(value: object, where: str) -> Entry:
    """Read one matrix entry exactly.

    >>> parse_entry("3/4", "x[0][0]")
    Fraction(3, 4)
    >>> parse_entry(Decimal("0.1"), "x[0][0]")
    Fraction(1, 10)
    """
    if isinstance(value, bool):
        raise SymattnError(f"{where}: expected a number or an exact expression ({ALLOWED}), received {value!r}")
    if isinstance(value, int):
        if -(2**64) < value < 2**64:  # the common case: nothing to check
            return Fraction(value)
        digits = too_many_digits(value)
        if digits:
            raise SymattnError(
                f"{where}: expected an integer of at most {max_digits()} digits, received one of {digits}"
            )
        return _checked(Fraction(value), where)
    if isinstance(value, Fraction):
        return _checked(value, where)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise SymattnError(f"{where}: expected a finite number, received {value}")
        return _checked(_decimal_fraction(value, where), where)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SymattnError(f"{where}: expected a finite number, received {value}")
        return Fraction(value)  # a float means its exact binary value
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return _parse_text(value, where)
    raise SymattnError(
        f"{where}: expected a number or an exact expression ({ALLOWED}), received {type(value).__name__} {_repr(value)}"
    )


def _decimal_fraction(value: Decimal, where: str) -> Fraction:
    """A decimal's exact value, refused before the conversion when it is too large to be useful."""
    sign, digits, exponent = value.as_tuple()
    if len(digits) > max_digits():
        raise SymattnError(
            f"{where}: expected a number of at most {max_digits()} digits, received one of {len(digits)}"
        )
    if any(digits):
        magnitude = len(digits) + exponent - 1  # the decimal exponent of the leading digit
        if abs(magnitude) > MAX_EXPONENT * 0.30103:
            raise SymattnError(
                f"{where}: expected a magnitude between 1e-4932 and 1e4932, received one about 1e{magnitude}"
            )
    return Fraction(value)


def _checked(q: Fraction, where: str) -> Fraction:
    if q and (
        q.numerator.bit_length() - q.denominator.bit_length() > MAX_EXPONENT
        or q.denominator.bit_length() - q.numerator.bit_length() > MAX_EXPONENT
    ):
        raise SymattnError(
            f"{where}: expected a magnitude between 2**-{MAX_EXPONENT} and 2**{MAX_EXPONENT}, "
            f"received one about 2**{q.numerator.bit_length() - q.denominator.bit_length()}"
        )
    if max(q.numerator.bit_length(), q.denominator.bit_length()) > MAX_BITS:
        raise SymattnError(f"{where}: expected a rational of at most {MAX_BITS} bits, received a larger one")
    digits = max(too_many_digits(q.numerator), too_many_digits(q.denominator))
    if digits:
        raise SymattnError(
            f"{where}: expected a value whose numerator and denominator have at most {max_digits()} digits, "
            f"received one with {digits}"
        )
    return q


def _parse_text(text: str, where: str) -> Entry:
    if len(text) > MAX_TEXT:
        raise SymattnError(f"{where}: expected an expression of at most {MAX_TEXT} characters, received {quoted(text)}")
    text = text.strip()
    operators = sum(text.count(c) for c in "+-*/(")
    if operators > MAX_OPERATORS:
        raise SymattnError(
            f"{where}: expected an expression with at most {MAX_OPERATORS} operators, received {operators}"
        )
    longest = max((len(run.replace("_", "")) for run in re.findall(r"[\d_]+", text)), default=0)
    if longest > max_digits():
        raise SymattnError(
            f"{where}: expected numbers of at most {max_digits()} digits, received {quoted(text)}, "
            f"with one of {longest} digits"
        )
    depth = deepest = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise SymattnError(f"{where}: expected parentheses nested at most {MAX_DEPTH} deep, received {deepest}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise SymattnError(f"{where}: expected {ALLOWED}; received {quoted(text)}, which does not parse") from None
    except (RecursionError, MemoryError):
        raise SymattnError(f"{where}: expression {quoted(text)} is nested too deeply") from None
    try:
        entry = _Reader(text, where).read(tree.body)
    except RecursionError:
        raise SymattnError(f"{where}: expression {quoted(text)} is nested too deeply") from None
    if isinstance(entry, Fraction):
        return _checked(entry, where)
    if not symbols(entry):
        try:
            check_magnitude(entry)
        except _Refused as refused:
            raise SymattnError(f"{where}: {quoted(text)}: {refused}") from None
    return entry


def _repr(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's int-string limit, maybe inside a list
        return "holding an integer too long to print"
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


class _Reader:
    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where

    def refuse(self, what: str) -> SymattnError:
        return SymattnError(f"{self.where}: {what} is not allowed in {quoted(self.text)}; allowed: {ALLOWED}")

    def read(self, node: ast.AST) -> Entry:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.refuse(f"the literal {node.value!r}")
            # the literal's own text, so that 0.1 means 1/10 and not a binary double
            literal = (ast.get_source_segment(self.text, node) or repr(node.value)).replace("_", "")
            if not _LITERAL.match(literal) or literal in ("", "."):
                raise self.refuse(f"the literal {literal!r} (only decimal literals)")
            return _decimal_fraction(Decimal(literal), self.where)
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return Expr("const", (node.id,))
            if node.id in FUNCTIONS:
                raise self.refuse(f"the function name {node.id!r} without a call")
            return Expr("sym", (node.id,))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.read(node.operand)
            return neg(operand) if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: add, ast.Sub: sub, ast.Mult: mul, ast.Div: div, ast.Pow: power}
            if type(node.op) not in ops:
                raise self.refuse(f"the operator {type(node.op).__name__}")
            left, right = self.read(node.left), self.read(node.right)
            try:
                return ops[type(node.op)](left, right)
            except ZeroDivisionError:
                raise SymattnError(f"{self.where}: {quoted(self.text)} divides by zero") from None
            except _Refused as refused:
                raise SymattnError(f"{self.where}: {quoted(self.text)}: {refused}") from None
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise self.refuse("a call of " + (node.func.id if isinstance(node.func, ast.Name) else "an expression"))
            if len(node.args) != 1 or node.keywords:
                raise SymattnError(f"{self.where}: {node.func.id} takes exactly one argument, in {quoted(self.text)}")
            argument = self.read(node.args[0])
            try:
                return function(node.func.id, argument)
            except _Refused as refused:
                raise SymattnError(f"{self.where}: {quoted(self.text)}: {refused}") from None
        raise self.refuse(f"the syntax {type(node).__name__}")


class _Refused(Exception):
    """A value outside the reals or beyond the limits; the parser adds the context."""


# Constructors that fold rationals, so that an entry is a Fraction whenever it can be.


def neg(a: Entry) -> Entry:
    return mul(Fraction(-1), a)


def add(a: Entry, b: Entry) -> Entry:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return _fold(a + b)
    if a == 0:
        return b
    if b == 0:
        return a
    return Expr("add", (a, b))


def sub(a: Entry, b: Entry) -> Entry:
    return add(a, neg(b))


def mul(a: Entry, b: Entry) -> Entry:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if a and b and a.numerator.bit_length() + b.numerator.bit_length() > MAX_BITS + 64:
            raise _Refused(f"the product is larger than {MAX_BITS} bits")
        return _fold(a * b)
    if a == 0 or b == 0:
        return Fraction(0)
    if a == 1:
        return b
    if b == 1:
        return a
    return Expr("mul", (a, b))


def div(a: Entry, b: Entry) -> Entry:
    if isinstance(b, Fraction):
        if b == 0:
            raise ZeroDivisionError
        return mul(a, 1 / b)
    if not symbols(b) and sign(b) == 0:
        raise _Refused(f"cannot prove that the divisor {to_text(b)} is not zero")
    return mul(a, Expr("pow", (b, Fraction(-1))))


def _brief(q: Fraction) -> str:
    """A rational for a message: its digits, or how many it has (an error never prints 5000 of them)."""
    if max(q.numerator.bit_length(), q.denominator.bit_length()) <= 200:
        return str(q)
    return f"a number of about {int(q.numerator.bit_length() * 0.30103)} digits"


def power(base: Entry, exponent: Entry) -> Entry:
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and abs(exponent) > MAX_POWER:
        raise _Refused(f"the exponent {_brief(exponent)} is larger than {MAX_POWER}")
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        if exponent.denominator == 1:
            if base == 0 and exponent < 0:
                raise ZeroDivisionError
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if bits * abs(exponent) > MAX_BITS:
                raise _Refused(f"{_brief(base)} ** {_brief(exponent)} has more than {MAX_BITS} bits")
            return base ** int(exponent)
        if base < 0:
            raise _Refused(f"{_brief(base)} ** {_brief(exponent)} is not a real number")
        if exponent.denominator == 2:
            return power(sqrt_fraction(base), Fraction(exponent.numerator))
    if exponent == 1:
        return base
    if exponent == 0:
        return Fraction(1)
    if not symbols(base):
        integer = isinstance(exponent, Fraction) and exponent.denominator == 1
        s = sign(base)
        if integer and s == 0 and exponent < 0:
            raise _Refused(f"cannot prove that {to_text(base)} is not zero")
        if not integer and s < 0:
            raise _Refused(f"({to_text(base)}) ** ({to_text(exponent)}) is not a real number: the base is negative")
        if not integer and s == 0:
            raise _Refused(
                f"cannot prove that {to_text(base)} is positive, so ({to_text(base)}) ** "
                f"({to_text(exponent)}) may not be a real number"
            )
    return Expr("pow", (base, exponent))


def _fold(q: Fraction) -> Fraction:
    if max(q.numerator.bit_length(), q.denominator.bit_length()) > MAX_BITS:
        raise _Refused(f"an intermediate rational has more than {MAX_BITS} bits")
    return q


def sqrt_fraction(q: Fraction) -> Entry:
    import math

    num, den = math.isqrt(q.numerator), math.isqrt(q.denominator)
    if num * num == q.numerator and den * den == q.denominator:
        return Fraction(num, den)
    return Expr("sqrt", (q,))


def function(name: str, arg: Entry) -> Entry:
    if isinstance(arg, Fraction):
        if name == "sqrt":
            if arg < 0:
                raise _Refused(f"sqrt({_brief(arg)}) is not a real number")
            return sqrt_fraction(arg)
        if name == "log":
            if arg <= 0:
                raise _Refused(f"log({_brief(arg)}) is not a real number")
            if arg == 1:
                return Fraction(0)
        if name == "exp":
            if arg == 0:
                return Fraction(1)
            if arg >= EXP_LIMIT:
                raise _Refused(f"exp({_brief(arg)}) is larger than 2**{MAX_EXPONENT}")
    elif not symbols(arg):
        if name in ("sqrt", "log"):
            s = sign(arg)
            if s < 0:
                raise _Refused(f"{name}({to_text(arg)}) is not a real number: the argument is negative")
            if s == 0:
                raise _Refused(f"cannot prove that {to_text(arg)} is positive, so {name} of it may not be real")
        if name == "exp":
            hi = _upper(arg)
            if hi is None or hi >= EXP_LIMIT:
                raise _Refused(f"cannot prove that exp({to_text(arg)}) is below 2**{MAX_EXPONENT}")
    return Expr(name, (arg,))


# Numeric questions about an entry without symbols, answered with Arb balls.


def ball(entry: Entry, bits: int):
    """An Arb ball containing the entry, at ``bits`` of working precision."""
    import flint

    from symattn.backends.engines import precision

    with precision(bits):
        return _arb(entry, flint.arb)


def _arb(entry: Entry, arb):
    if isinstance(entry, Fraction):
        return arb(entry.numerator) / entry.denominator
    op, args = entry.op, entry.args
    if op == "sym":
        raise SymattnError(f"symbol {args[0]!r}: a numeric value is needed here, received a symbol")
    if op == "const":
        return arb.pi()
    if op == "add":
        return _arb(args[0], arb) + _arb(args[1], arb)
    if op == "mul":
        return _arb(args[0], arb) * _arb(args[1], arb)
    if op == "pow":
        base, exponent = args
        if isinstance(exponent, Fraction) and exponent.denominator == 1:
            return integer_power(_arb(base, arb), int(exponent))
        return (_arb(exponent, arb) * _arb(base, arb).log()).exp()
    return getattr(_arb(args[0], arb), op)()


def integer_power(x, n: int):
    """x**n by squaring (python-flint's arb ** int is NaN for a ball that contains zero)."""
    if n < 0:
        return 1 / integer_power(x, -n)
    result, base = None, x
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return type(x)(1) if result is None else result


def sign(entry: Entry) -> int:
    """-1, 1, or 0 when the sign cannot be proven (the value may be zero)."""
    if isinstance(entry, Fraction):
        return (entry > 0) - (entry < 0)
    for bits in SIGN_BITS:
        b = ball(entry, bits)
        if b > 0:
            return 1
        if b < 0:
            return -1
    return 0


def _upper(entry: Entry) -> float | None:
    b = ball(entry, 64)
    if not b.is_finite():
        return None
    return float(b.upper())


def check_magnitude(entry: Entry) -> None:
    """Refuse a value with |x| >= 2**MAX_EXPONENT, or one that is not finite."""
    b = ball(entry, 64)
    if not b.is_finite():
        raise _Refused("its value is not a finite real number")
    if b.abs_upper() >= ball(Fraction(2**MAX_EXPONENT), 64):
        raise _Refused(f"its magnitude is not below 2**{MAX_EXPONENT}")


# Questions asked of an entry.


def symbols(entry: Entry) -> set[str]:
    """Names of the free symbols in ``entry``."""
    if isinstance(entry, Fraction):
        return set()
    if entry.op == "sym":
        return {entry.args[0]}
    if entry.op == "const":
        return set()
    return set().union(*(symbols(a) for a in entry.args))


def is_algebraic(entry: Entry) -> bool:
    """True when ``entry`` is built from rationals by + - * / and rational powers only."""
    if isinstance(entry, Fraction):
        return True
    if entry.op in ("sym", "const", "exp", "log"):
        return False
    if entry.op == "pow":
        base, exponent = entry.args
        return isinstance(exponent, Fraction) and is_algebraic(base)
    return all(is_algebraic(a) for a in entry.args)


def to_text(entry: Entry) -> str:
    """A readable rendering, for messages and spec files (SymPy is not needed)."""
    if isinstance(entry, Fraction):
        return str(entry)
    if entry.op in ("sym", "const"):
        return entry.args[0]
    if entry.op == "add":
        return "(" + " + ".join(to_text(a) for a in entry.args) + ")"
    if entry.op == "mul":
        rational = [a for a in entry.args if isinstance(a, Fraction)]
        others = [a for a in entry.args if not isinstance(a, Fraction)]
        if len(rational) == 1 and others:  # q·x reads as x/n, p*x/n or -x
            q, text = rational[0], "*".join(_factor(a) for a in others)
            sign, q = ("-" if q < 0 else ""), abs(q)
            head = text if q.numerator == 1 else f"{q.numerator}*{text}"
            return sign + (head if q.denominator == 1 else f"{head}/{q.denominator}")
        return "*".join(_factor(a) for a in entry.args)
    if entry.op == "pow":
        return f"({to_text(entry.args[0])})**({to_text(entry.args[1])})"
    return f"{entry.op}({to_text(entry.args[0])})"


def _factor(entry: Entry) -> str:
    text = to_text(entry)
    return f"({text})" if isinstance(entry, Fraction) and ("/" in text or text.startswith("-")) else text


def to_sympy(entry: Entry):
    """The SymPy value of ``entry``; symbols are real."""
    import sympy

    if isinstance(entry, Fraction):
        return sympy.Rational(entry.numerator, entry.denominator)
    op, args = entry.op, entry.args
    if op == "sym":
        return sympy.Symbol(args[0], real=True)
    if op == "const":
        return sympy.pi
    if op == "add":
        return sympy.Add(*(to_sympy(a) for a in args))
    if op == "mul":
        return sympy.Mul(*(to_sympy(a) for a in args))
    if op == "pow":
        return sympy.Pow(to_sympy(args[0]), to_sympy(args[1]))
    return getattr(sympy, op)(to_sympy(args[0]))


def to_ball(entry: Entry, engine):
    """The value of ``entry`` as a ball (or interval) of ``engine`` at its working precision."""
    if isinstance(entry, Fraction):
        return engine.rational(entry.numerator, entry.denominator)
    op, args = entry.op, entry.args
    if op == "sym":
        raise SymattnError(f"symbol {args[0]!r}: a numeric value is needed here, received a symbol")
    if op == "const":
        return engine.pi()
    if op == "add":
        return to_ball(args[0], engine) + to_ball(args[1], engine)
    if op == "mul":
        return to_ball(args[0], engine) * to_ball(args[1], engine)
    if op == "pow":
        base, exponent = args
        if isinstance(exponent, Fraction) and exponent.denominator == 1:
            return engine.integer_power(to_ball(base, engine), int(exponent))
        return engine.exp(to_ball(exponent, engine) * engine.log(to_ball(base, engine)))
    return getattr(engine, op)(to_ball(args[0], engine))
