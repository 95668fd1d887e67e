"""Exact scalars in canonical form, and the scores as linear combinations of rational matrices.

Shared by the ball and the exact backends, and so is ``RationalXP``: their
exact fast paths (rational matrices stay ``RatMat``, scores stay ``Lin``).  An irrational parameter is split
into a rational coefficient and a canonical generator: q·√D with D a square-free
integer where the value is a rational times a square root (``1/sqrt(8)`` and
``sqrt(2)/4`` are both ¼·√2), else the entry itself.  With rational inputs the
scores are then ``Σ_k g_k·A_k + B`` with rational matrices A_k, B and one term
per generator (the scale's, irrational ALiBi slopes'): a ``Lin``.  Kept
unevaluated, equal scores share one exponential in the ball backend and one
monomial in the exact one, and the exact backend reads each exponent as a
rational vector over {1, g_1, g_2, ...}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from symattn.entries import Entry, Expr, to_text
from symattn.graph.xp import ArrayXP, decided, union
from symattn.matrix import RatMat

SMALL_PRIMES = [p for p in range(2, 1000) if all(p % d for d in range(2, int(p**0.5) + 1))]


@dataclass(frozen=True)
class Scalar:
    """An irrational exact scalar as ``coefficient·generator``; ``key`` names the generator: ("sqrt", D)
    or ("expr", text)."""

    coefficient: Fraction
    key: tuple
    generator: Entry  # the generator's exact value

    def __neg__(self) -> Scalar:
        return Scalar(-self.coefficient, self.key, self.generator)


def canonical(entry: Entry) -> Fraction | Scalar:
    """A rational entry as a Fraction, an irrational one as a Scalar.

    >>> canonical(__import__("symattn").entries.parse_entry("1/sqrt(8)", "e"))
    Scalar(coefficient=Fraction(1, 4), key=('sqrt', 2), generator=Expr(op='sqrt', args=(Fraction(2, 1),)))
    """
    if isinstance(entry, Fraction):
        return entry
    split = _root(entry)
    if split is not None:
        q, d = split
        if d == 1:
            return q
        return Scalar(q, ("sqrt", d), Expr("sqrt", (Fraction(d),)))
    return Scalar(Fraction(1), ("expr", to_text(entry)), entry)


def _root(entry) -> tuple | None:
    """(q, D) with entry = q·√D, D square-free as far as small primes show, or None."""
    if isinstance(entry, Fraction):
        return entry, 1
    op, args = entry.op, entry.args
    if op == "sqrt" and isinstance(args[0], Fraction):
        r = args[0]
        square, free = _square_part(r.numerator * r.denominator)
        return Fraction(square, r.denominator), free
    if op == "mul":
        a, b = _root(args[0]), _root(args[1])
        if a is None or b is None:
            return None
        square, free = _square_part(a[1] * b[1])
        return a[0] * b[0] * square, free
    if op == "add":
        a, b = _root(args[0]), _root(args[1])
        if a is None or b is None or (a[1] != b[1] and a[0] and b[0]):
            return None
        return a[0] + b[0], a[1] if a[0] else b[1]
    if op == "pow" and isinstance(args[1], Fraction) and args[1].denominator == 1:
        base = _root(args[0])
        if base is None:
            return None
        n = int(args[1])
        q, d = base
        if q == 0 and n < 0:
            return None
        if n < 0:  # 1/(q√D) = √D/(q·D)
            q, d, n = 1 / (q * d) if d != 1 else 1 / q, d, -n
        return q**n * Fraction(d) ** (n // 2), d if n % 2 else 1
    return None


def _square_part(n: int) -> tuple[int, int]:
    """(s, f) with n = s²·f and f free of the squares of small primes."""
    s, f = 1, n
    for p in SMALL_PRIMES:
        if p * p > f:
            break
        while f % (p * p) == 0:
            f //= p * p
            s *= p
    r = int(f**0.5) if f < 2**52 else None
    if r is not None:
        for c in (r - 1, r, r + 1):
            if c > 1 and c * c == f:
                return s * c, 1
    return s, f


class Lin:
    """Σ_k g_k·A_k + B with exact rational matrices, one term per generator key; ``excluded`` marks entries
    that are not numbers (masked scores, -inf)."""

    __slots__ = ("terms", "const", "generators", "excluded", "balls_cache")

    def __init__(self, terms: dict, const: RatMat, generators: dict, excluded=None):
        self.terms = terms  # key -> RatMat
        self.const = const
        self.generators = generators  # key -> the generator's exact value
        self.excluded = excluded  # bool array or None
        self.balls_cache = None  # (the BallXP, its balls of this Lin): made once per backend

    @property
    def shape(self) -> tuple:
        return self.const.shape

    @staticmethod
    def of(a: RatMat, s: Fraction | Scalar) -> Lin | RatMat:
        """s·a."""
        if isinstance(s, Fraction):
            return a.scaled(s)
        zero = RatMat(np.zeros(a.shape, dtype=object), 1)
        return Lin({s.key: a.scaled(s.coefficient)}, zero, {s.key: s.generator})

    @staticmethod
    def lift(a) -> Lin:
        return a if isinstance(a, Lin) else Lin({}, a, {})

    def combine(self, other, sign: int) -> Lin:
        other = Lin.lift(other)
        terms = dict(self.terms)
        for key, m in other.terms.items():
            m = m if sign > 0 else m.scaled(Fraction(-1))
            terms[key] = terms[key] + m if key in terms else m
        const = self.const + other.const if sign > 0 else self.const - other.const
        return Lin(terms, const, {**self.generators, **other.generators}, union(self.excluded, other.excluded))

    def scaled(self, q: Fraction) -> Lin:
        return Lin(
            {k: m.scaled(q) for k, m in self.terms.items()}, self.const.scaled(q), self.generators, self.excluded
        )

    def masked(self, allowed: np.ndarray) -> Lin:
        return Lin(self.terms, self.const, self.generators, union(self.excluded, ~allowed))

    @property
    def signature(self) -> tuple:
        """What, with an entry's integer numerators, identifies its exact value: generators and denominators."""
        return tuple((k, m.den) for k, m in self.terms.items()) + (self.const.den,)

    def keys(self) -> list:
        """Every entry's integer numerators (terms', then the constant's), row by row: with ``signature``, a
        hashable key of its exact value (plain ints hash far faster than Fractions)."""
        columns = [m.num.reshape(-1).tolist() for m in self.terms.values()] + [self.const.num.reshape(-1).tolist()]
        return list(zip(*columns, strict=True))

    def value(self, key: tuple) -> tuple:
        """(terms as (generator key, Fraction), constant Fraction) of the entry with numerators ``key``."""
        *nums, const = key
        terms = [(k, Fraction(n, m.den)) for (k, m), n in zip(self.terms.items(), nums, strict=True)]
        return terms, Fraction(const, self.const.den)

    def approx(self) -> np.ndarray:
        """Float approximations of every entry (to choose shifts; never to decide anything)."""
        total = _approx(self.const)
        for key, m in self.terms.items():
            total = total + _approx(m) * _float(self.generators[key])
        if self.excluded is not None:
            total = np.where(self.excluded, -np.inf, total)
        return total

    def shift(self) -> Lin:
        """Per row, the entry with the largest approximate value (any exact per-row constant would do)."""
        approx = self.approx()
        best = np.argmax(np.where(np.isnan(approx), -np.inf, approx), axis=1)
        rows = np.arange(self.shape[0])

        def pick(m: RatMat) -> RatMat:
            return RatMat(m.num[rows, best].reshape(-1, 1), m.den)

        return Lin({k: pick(m) for k, m in self.terms.items()}, pick(self.const), self.generators)

    def lowest(self) -> Lin:
        """Per row and per generator, the least coefficient among the entries that are numbers: subtracting
        it leaves every exponent non-negative in each generator (the exact backend's shift)."""

        def low(m: RatMat) -> RatMat:
            num = m.num if self.excluded is None else np.where(self.excluded, None, m.num)
            out = []
            for row in num.tolist():
                values = [v for v in row if v is not None]
                out.append([min(values) if values else 0])
            return RatMat(np.array(out, dtype=object).reshape(-1, 1), m.den)

        return Lin({k: low(m) for k, m in self.terms.items()}, low(self.const), self.generators)


def _approx(m: RatMat) -> np.ndarray:
    out = np.empty(m.shape)
    flat = out.reshape(-1)
    for k, v in enumerate(m.num.reshape(-1).tolist()):
        try:
            flat[k] = v / m.den
        except OverflowError:
            flat[k] = np.inf if (v > 0) == (m.den > 0) else -np.inf
    return out


def _float(entry) -> float:
    from symattn.backends.floats import exact_float

    return exact_float(entry)


class ObjectArray:
    """An object array of a backend's values (balls, field elements); ``excluded`` marks entries that are not
    numbers (masked scores)."""

    __slots__ = ("values", "excluded")

    def __init__(self, values: np.ndarray, excluded=None):
        self.values = values
        self.excluded = excluded

    @property
    def shape(self) -> tuple:
        return self.values.shape


class RationalXP(ArrayXP):
    """The base of ``BallXP`` and ``ExactXP``: rational matrices (``RatMat``) and scores (``Lin``) exact, anything
    else in the backend's own array type ``Array`` (an object array ``values`` and ``excluded``), made by
    ``array(a)``; each ``_general_*`` method is the backend's rule for values that are not exact."""

    Array: type

    def array(self, a):
        raise NotImplementedError

    # Conversions.
    def param(self, p):
        return canonical(p.value)

    def const(self, c):
        """Masks stay bool arrays; numeric constants (ALiBi's distances, a score_mod's numbers) are exact
        rational matrices."""
        if c.value.dtype == bool:
            return c.value
        if c.value.dtype == object:
            return RatMat.from_entries([[Fraction(x) for x in row] for row in c.value.tolist()])
        return RatMat(np.array(c.value.tolist(), dtype=object), 1)

    # Products.
    def matmul_nt(self, a, b):
        return self.matmul(a, self.transpose(b))

    def matmul_tn(self, a, b):
        return self.matmul(self.transpose(a), b)

    def transpose(self, a):
        if isinstance(a, RatMat):
            return a.T
        return self.Array(self.array(a).values.T)

    # Elementwise.
    def add(self, a, b):
        return self._combine(a, b, 1)

    def sub(self, a, b):
        return self._combine(a, b, -1)

    def _combine(self, a, b, sign):
        if isinstance(a, RatMat) and isinstance(b, RatMat):
            return a + b if sign > 0 else a - b
        if isinstance(a, (Lin, RatMat)) and isinstance(b, (Lin, RatMat)):
            return Lin.lift(a).combine(b, sign)
        return self._general_combine(self.array(a), self.array(b), sign)

    def mul(self, a, b):
        if isinstance(a, RatMat) and isinstance(b, RatMat):
            return a.mul(b)
        if isinstance(a, RatMat) and isinstance(b, Lin):
            a, b = b, a
        if isinstance(a, Lin) and isinstance(b, RatMat):  # scores times a score_mod's numbers: still a Lin
            terms = {k: m.mul(b) for k, m in a.terms.items()}
            return Lin(terms, a.const.mul(b), a.generators, a.excluded)
        return self._general_mul(self.array(a), self.array(b))

    # Conditions.
    def positive(self, a, strict):
        """Exact for rational and Lin values (``_lin_signs``); the backend's ``_general_signs`` otherwise."""
        if isinstance(a, RatMat):
            signs = np.sign(np.array(a.num, dtype=object)).astype(np.int8)
        elif isinstance(a, Lin) and not a.terms:
            signs = np.sign(np.array(a.const.num, dtype=object)).astype(np.int8)
        elif isinstance(a, Lin):
            signs = self._lin_signs(a)
        else:
            signs = self._general_signs(self.array(a))
        return _kleene(signs, strict)

    def _lin_signs(self, a: Lin) -> np.ndarray:
        raise NotImplementedError

    def _general_signs(self, x) -> np.ndarray:
        raise NotImplementedError

    def select(self, condition, a, b):
        c = decided(condition)
        if isinstance(a, RatMat) and isinstance(b, RatMat) and not (c == 1).any():
            den = a.den * b.den // math.gcd(a.den, b.den)
            num = np.where(c == 2, a.num * (den // a.den), b.num * (den // b.den))
            return RatMat(np.array(num, dtype=object), den)
        x, y = self.array(a), self.array(b)
        xv, yv, c = np.broadcast_arrays(x.values, y.values, c)
        values = np.where(c == 2, xv, yv)
        for idx in zip(*np.nonzero(c == 1), strict=True):
            values[idx] = self._hull(xv[idx], yv[idx])
        return self.Array(values, union(x.excluded, y.excluded))

    def _hull(self, a, b):
        raise NotImplementedError

    def one_minus(self, a):
        if isinstance(a, RatMat):
            return RatMat(a.den - a.num, a.den)
        return self._general_one_minus(self.array(a))

    def scale(self, a, s):
        if isinstance(a, RatMat):
            return Lin.of(a, s)
        if isinstance(a, Lin) and isinstance(s, Fraction):
            return a.scaled(s)
        return self._general_scale(self.array(a), s)

    # Rows and columns.
    def mask(self, a, allowed):
        if isinstance(a, RatMat):
            a = Lin.lift(a)
        if isinstance(a, Lin):
            return a.masked(allowed)
        return self.Array(a.values, union(a.excluded, ~allowed))

    def rowsum(self, a):
        if isinstance(a, RatMat):
            return a.rowsum()
        return self._general_rowsum(self.array(a).values)

    def colsum(self, a):
        if isinstance(a, RatMat):
            return a.colsum()
        return self._general_colsum(self.array(a).values)

    def hstack(self, parts):
        if all(isinstance(p, RatMat) for p in parts):
            return RatMat.hstack(parts)
        arrays = [self.array(p) for p in parts]
        excluded = None
        if any(a.excluded is not None for a in arrays):  # excluded entries stay excluded (a sink beside scores)
            excluded = np.concatenate(
                [np.zeros(a.values.shape, bool) if a.excluded is None else a.excluded for a in arrays], axis=1
            )
        return self.Array(np.concatenate([a.values for a in arrays], axis=1), excluded)

    def cols(self, a, start, stop):
        if isinstance(a, RatMat):
            return a.cols(start, stop)
        return self.Array(self.array(a).values[:, start:stop])

    def unbroadcast(self, g, like):
        return g


def _kleene(signs: np.ndarray, strict: bool) -> np.ndarray:
    """Signs (1, 0, −1, or 2 for undecided) as the Kleene values of ``> 0`` or ``>= 0``."""
    out = np.where(signs == 1, 2, np.where(signs == -1, 0, np.where(signs == 0, 0 if strict else 2, 1)))
    return out.astype(np.int8)


def map_values(fn, values: np.ndarray) -> np.ndarray:
    """fn of every entry of an object array, as an object array of the same shape."""
    out = np.empty(values.shape, dtype=object)
    flat = out.reshape(-1)
    for k, v in enumerate(values.reshape(-1).tolist()):
        flat[k] = fn(v)
    return out
