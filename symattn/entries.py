"""Exact matrix entries: a whitelist parser over Python's ``ast`` and a tiny expression tree.

An entry is a ``Fraction`` (integers, decimals and fractions fold to one) or an
``Expr`` node for anything irrational or symbolic (``sqrt(2)/2``, ``exp(1)``,
``a``).  The tree converts to SymPy for printing and to a ball for the engines,
so neither the parser nor the truth ever needs SymPy.  User text is never
handed to ``eval``, ``sympify`` or ``parse_expr``.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from .errors import SymattnError

FUNCTIONS = ("sqrt", "exp", "log")
CONSTANTS = ("pi",)
ALLOWED = (
    "integers, decimals, fractions such as '3/4', symbol names, "
    "+ - * / **, and the functions sqrt, exp, log (pi is the constant)"
)
MAX_TEXT = 10_000  # longer strings are refused before parsing
MAX_POWER = 10_000  # |integer exponent| allowed in '**', to keep folding cheap


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


def parse_entry(value: object, where: str) -> Entry:
    """Read one matrix entry exactly.

    >>> parse_entry("3/4", "x[0][0]")
    Fraction(3, 4)
    >>> parse_entry(Decimal("0.1"), "x[0][0]")
    Fraction(1, 10)
    """
    if isinstance(value, bool):
        raise SymattnError(f"{where}: expected a number or an exact expression ({ALLOWED}), received {value!r}")
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    if isinstance(value, (Decimal, float)):
        if not math.isfinite(value):
            raise SymattnError(f"{where}: expected a finite number, received {value}")
        return Fraction(value)  # a float means its exact binary value
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return _parse_text(value, where)
    raise SymattnError(
        f"{where}: expected a number or an exact expression ({ALLOWED}), received {type(value).__name__} {value!r}"
    )


def _parse_text(text: str, where: str) -> Entry:
    if len(text) > MAX_TEXT:
        raise SymattnError(f"{where}: expected an expression of at most {MAX_TEXT} characters, received {len(text)}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise SymattnError(f"{where}: expected {ALLOWED}; received {text!r}, which does not parse") from None
    try:
        return _Reader(text.strip(), where).read(tree.body)
    except RecursionError:
        raise SymattnError(f"{where}: expression {text!r} is nested too deeply") from None


class _Reader:
    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where

    def refuse(self, what: str) -> SymattnError:
        return SymattnError(f"{self.where}: {what} is not allowed in {self.text!r}; allowed: {ALLOWED}")

    def read(self, node: ast.AST) -> Entry:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.refuse(f"the literal {node.value!r}")
            # the literal's own text, so that 0.1 means 1/10 and not a binary double
            literal = ast.get_source_segment(self.text, node) or repr(node.value)
            return Fraction(literal.replace("_", ""))
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
            try:
                return ops[type(node.op)](self.read(node.left), self.read(node.right))
            except ZeroDivisionError:
                raise SymattnError(f"{self.where}: {self.text!r} divides by zero") from None
            except _Refused as refused:
                raise SymattnError(f"{self.where}: {self.text!r}: {refused}") from None
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise self.refuse("a call of " + (node.func.id if isinstance(node.func, ast.Name) else "an expression"))
            if len(node.args) != 1 or node.keywords:
                raise SymattnError(f"{self.where}: {node.func.id} takes exactly one argument, in {self.text!r}")
            try:
                return function(node.func.id, self.read(node.args[0]))
            except _Refused as refused:
                raise SymattnError(f"{self.where}: {self.text!r}: {refused}") from None
        raise self.refuse(f"the syntax {type(node).__name__}")


class _Refused(Exception):
    """A value outside the reals or too large to fold; the parser adds the context."""


# Constructors that fold rationals, so that an entry is a Fraction whenever it can be.


def neg(a: Entry) -> Entry:
    return mul(Fraction(-1), a)


def add(a: Entry, b: Entry) -> Entry:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return Expr("add", (a, b))


def sub(a: Entry, b: Entry) -> Entry:
    return add(a, neg(b))


def mul(a: Entry, b: Entry) -> Entry:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a * b
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
    return mul(a, Expr("pow", (b, Fraction(-1))))


def power(base: Entry, exponent: Entry) -> Entry:
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and abs(exponent) > MAX_POWER:
        raise _Refused(f"the exponent {exponent} is larger than {MAX_POWER}")
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        if exponent.denominator == 1:
            if base == 0 and exponent < 0:
                raise ZeroDivisionError
            return base ** int(exponent)
        if base < 0:
            raise _Refused(f"{base} ** {exponent} is not a real number")
        if exponent.denominator == 2:
            return power(sqrt_fraction(base), Fraction(exponent.numerator))
    if exponent == 1:
        return base
    if exponent == 0:
        return Fraction(1)
    return Expr("pow", (base, exponent))


def sqrt_fraction(q: Fraction) -> Entry:
    num, den = math.isqrt(q.numerator), math.isqrt(q.denominator)
    if num * num == q.numerator and den * den == q.denominator:
        return Fraction(num, den)
    return Expr("sqrt", (q,))


def function(name: str, arg: Entry) -> Entry:
    if isinstance(arg, Fraction):
        if name == "sqrt":
            if arg < 0:
                raise _Refused(f"sqrt({arg}) is not a real number")
            return sqrt_fraction(arg)
        if name == "log":
            if arg <= 0:
                raise _Refused(f"log({arg}) is not a real number")
            if arg == 1:
                return Fraction(0)
        if name == "exp" and arg == 0:
            return Fraction(1)
    return Expr(name, (arg,))


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
    """A readable rendering, for messages (SymPy is not needed)."""
    if isinstance(entry, Fraction):
        return str(entry)
    if entry.op in ("sym", "const"):
        return entry.args[0]
    if entry.op == "add":
        return "(" + " + ".join(to_text(a) for a in entry.args) + ")"
    if entry.op == "mul":
        return "*".join(to_text(a) for a in entry.args)
    if entry.op == "pow":
        return f"({to_text(entry.args[0])})**({to_text(entry.args[1])})"
    return f"{entry.op}({to_text(entry.args[0])})"


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
