"""The exact backend of the op graph: every entry as a rational function of a few generators.

With rational inputs the scores are ``Lin`` combinations Σ g_k·A_k + B
(``rational.py``), so each exponential is a monomial in the generators e**1 and
e**g_k with rational exponents, each softmax row sum a polynomial Z, each
weight a monomial over Z, and everything after a sum of polynomials over
products of Z's (``Frac``).  Other values get generators of their own: √D for a
square root (with √D·√D = D), and opaque generators for anything else (tanh of
a score under softcap, the exponential of a non-linear argument, an irrational
input entry, a symbol).

Every relation this arithmetic uses holds for the numbers, so an entry that is
formally a constant c *is* c: that decides exact zeros and rational values on
rounding ties, which no enclosure can prove.  (With only e**1, e**g_k and √D
generators, Lindemann–Weierstrass makes the converse true as well — an entry
that is not formally constant is irrational — but nothing relies on that: an
undecided entry only means the enclosures must do the work.)  The same values
give the trace's closed forms (``trace.py``).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np

from symattn.backends.engines import precision
from symattn.backends.rational import Lin, ObjectArray, RationalXP, Scalar, canonical, map_values
from symattn.entries import Expr
from symattn.errors import SymattnError
from symattn.graph.xp import union
from symattn.matrix import RatMat
from symattn.semantics import NAN

MAX_TERMS = 200_000  # a decision that would expand to more polynomial terms is given up


class TooBig(Exception):
    """A decision would expand to more than MAX_TERMS polynomial terms: given up."""


NANF = {"nan": None}  # the element of an empty row under empty_row "nan"


class Generator:
    """kind "e": e**(basis·x/den) with a rational exponent x (key: (basis, den), basis ("one",) or a scalar
    generator key; info: (the basis's exact value or None for 1, den));
    "sqrt": √D (info D); "opaque": anything else (info: ("entry", Entry), ("tanh", Frac), ("exp", Frac),
    ("log", Frac))."""

    __slots__ = ("kind", "key", "info")

    def __init__(self, kind, key, info):
        self.kind, self.key, self.info = kind, key, info


class Algebra:
    """The generators and denominator atoms of one exact computation, and arithmetic over them.

    A monomial is a sorted tuple of (generator id, exponent); a Poly a dict {monomial: Fraction}; a Frac a
    dict {denominator: Poly}, a denominator being a sorted tuple of (atom id, multiplicity)."""

    def __init__(self):
        self.gens: list = []
        self._gen_ids: dict = {}
        self.atoms: list = []  # Polys
        self._atom_ids: dict = {}

    def gen(self, kind, key, info=None) -> int:
        ident = (kind, key)
        if ident not in self._gen_ids:
            self._gen_ids[ident] = len(self.gens)
            self.gens.append(Generator(kind, key, info))
        return self._gen_ids[ident]

    # Monomials and polynomials.
    def mono_mul(self, a: tuple, b: tuple) -> tuple[tuple, Fraction]:
        if not a:
            return b, 1
        if not b:
            return a, 1
        exps = dict(a)
        for g, e in b:
            exps[g] = exps.get(g, 0) + e
        factor = 1  # an int while it can be: int arithmetic is far faster than Fraction's
        out = []
        for g in sorted(exps):
            e = exps[g]
            gen = self.gens[g]
            if gen.kind == "sqrt" and (e >= 2 or e < 0):
                half = e // 2
                factor *= gen.info**half if half >= 0 else Fraction(1, gen.info**-half)
                e %= 2
            if e:
                out.append((g, e))
        return tuple(out), factor

    def poly_mul(self, a: dict, b: dict) -> dict:
        if len(a) * len(b) > MAX_TERMS:
            raise TooBig
        out: dict = {}
        for ma, ca in a.items():
            for mb, cb in b.items():
                m, f = self.mono_mul(ma, mb)
                out[m] = out.get(m, 0) + ca * cb * f
        return {m: c for m, c in out.items() if c}

    # Field elements.
    def const(self, q) -> dict:
        q = _int(Fraction(q))
        return {(): {(): q}} if q else {}

    def add(self, a: dict, b: dict, sign: int = 1) -> dict:
        if a is NANF or b is NANF:
            return NANF
        out = {d: dict(p) for d, p in a.items()}
        for d, p in b.items():
            target = out.setdefault(d, {})
            for m, c in p.items():
                s = target.get(m, 0) + (c if sign > 0 else -c)
                if s:
                    target[m] = s
                else:
                    target.pop(m, None)
            if not target:
                del out[d]
        return out

    def scale(self, a: dict, q: Fraction) -> dict:
        if a is NANF:
            return NANF
        if not q:
            return {}
        return {d: {m: c * q for m, c in p.items()} for d, p in a.items()}

    def mul(self, a: dict, b: dict) -> dict:
        if a is NANF or b is NANF:
            return NANF
        out: dict = {}
        for da, pa in a.items():
            for db, pb in b.items():
                d = _den_mul(da, db)
                out = self.add(out, {d: self.poly_mul(pa, pb)})
        return out

    def div(self, a: dict, b: dict) -> dict:
        """a / b for b a polynomial (no denominator): a monomial is inverted, anything else becomes an atom."""
        if a is NANF or b is NANF:
            return NANF
        if list(b) != [()]:
            raise ValueError("division by a fraction")
        poly = b[()]
        if len(poly) == 1:
            ((m, c),) = poly.items()
            inverse, f = self._inverse(m)
            return self.mul(a, {(): {inverse: f / c}})
        atom = self.atom(poly)
        return {_den_mul(d, ((atom, 1),)): p for d, p in a.items()}

    def _inverse(self, m: tuple) -> tuple[tuple, Fraction]:
        out, factor = [], Fraction(1)
        for g, e in m:
            gen = self.gens[g]
            if gen.kind == "sqrt":  # 1/√D = √D/D
                factor /= gen.info
                out.append((g, 1))
            else:
                out.append((g, -e))
        return tuple(out), factor

    def atom(self, poly: dict) -> int:
        key = tuple(sorted(poly.items()))
        if key not in self._atom_ids:
            self._atom_ids[key] = len(self.atoms)
            self.atoms.append(poly)
        return self._atom_ids[key]

    # Enclosures of exact elements (for the side of a rounding boundary an entry lies on).
    def ball(self, a: dict, bits: int):
        """An Arb ball containing the element's value: each monomial evaluated directly (e**(-10**7) is an
        accurate ball), so only monomials that are numerically close can cancel."""

        from symattn.entries import ball as entry_ball

        num, den = self.together(a)  # one fraction: what cancels exactly is gone before any ball is made
        with precision(bits):
            cache: dict = {}
            return self._poly_ball(num, cache, entry_ball, bits) / self._poly_ball(den, cache, entry_ball, bits)

    def _poly_ball(self, poly: dict, cache: dict, entry_ball, bits: int):
        """The sum of the monomials' balls, the exact ones first: their sum is exact (1 − 1 of an lse decision
        cancels before a tiny term joins it, which adding it to 1 first would round away)."""
        import flint

        terms = []
        for m, c in poly.items():
            term = flint.arb(c.numerator) / c.denominator if isinstance(c, Fraction) else flint.arb(c)
            exponent, rational = flint.arb(0), Fraction(0)  # a rational exponent summed exactly: e^(a/3)·e^(−a/3) is 1
            for g, e in m:
                gen = self.gens[g]
                if gen.kind == "e":
                    basis, den = gen.info
                    e = Fraction(e)
                    if basis is None:
                        rational += e / den
                    else:
                        exponent = exponent + entry_ball(basis, bits) * flint.arb(e.numerator) / (e.denominator * den)
                elif gen.kind == "sqrt":
                    term = term * flint.arb(gen.info).sqrt() ** int(e)
                else:
                    if g not in cache:
                        kind, value = gen.info
                        if kind == "entry":
                            cache[g] = entry_ball(value, bits)
                        else:
                            if kind == "log":  # log1p of (value − 1), subtracted exactly: a row's sum is 1 + tiny
                                cache[g] = self.ball(self.add(value, self.const(1), -1), bits).log1p()
                            else:
                                inner = self.ball(value, bits)
                                cache[g] = inner.tanh() if kind == "tanh" else inner.exp()
                    term = term * cache[g] ** int(e)
            if rational:
                exponent = exponent + flint.arb(rational.numerator) / rational.denominator
            terms.append(term * exponent.exp())
        total = flint.arb(0)
        for term in sorted(terms, key=lambda t: not t.is_exact()):
            total = total + term
        return total

    # Decisions.
    def value(self, a: dict) -> Fraction | str | None:
        """The entry's exact value when it is formally a constant (a Fraction, or "nan"), else None."""
        if a is NANF:
            return "nan"
        if not a:
            return Fraction(0)
        if len(a) == 1 and () in a:
            poly = a[()]
            return poly.get((), Fraction(0)) if set(poly) <= {()} else None
        if self._surely_not_constant(a):
            return None
        try:
            num, den = self.together(a)
        except TooBig:
            return None
        return constant_ratio(num, den)

    def together(self, a: dict) -> tuple[dict, dict]:
        """(N, D): the entry as one polynomial over the product of its atoms."""
        top: dict = {}
        for d in a:
            for atom, k in d:
                top[atom] = max(top.get(atom, 0), k)
        den = {(): Fraction(1)}
        for atom, k in sorted(top.items()):
            for _ in range(k):
                den = self.poly_mul(den, self.atoms[atom])
        num: dict = {}
        for d, p in a.items():
            have = dict(d)
            part = p
            for atom, k in sorted(top.items()):
                for _ in range(k - have.get(atom, 0)):
                    part = self.poly_mul(part, self.atoms[atom])
            num = _poly_add(num, part)
        return num, den

    def _surely_not_constant(self, a: dict) -> bool:
        """A cheap filter: the entry takes clearly different values at two random points of its generators
        (floats; a constant would agree to rounding).  False is no claim at all."""
        rng = random.Random(20240611)
        values = []
        for _ in range(2):
            point = {}
            for g, gen in enumerate(self.gens):
                if gen.kind == "sqrt":
                    point[g] = math.sqrt(gen.info)
                else:
                    point[g] = rng.uniform(1.02, 1.2) if gen.kind == "e" else rng.uniform(0.5, 1.5)
            try:
                values.append(self._numeric(a, point))
            except (OverflowError, ZeroDivisionError, ValueError):
                return False
        (v1, m1), (v2, m2) = values
        if not all(map(math.isfinite, (v1, v2, m1, m2))):
            return False
        return abs(v1 - v2) > 1e-6 * max(m1, m2, 1e-300)

    def _numeric(self, a: dict, point: dict) -> tuple[float, float]:
        total = magnitude = 0.0
        for d, p in a.items():
            den = 1.0
            for atom, k in d:
                den *= self._poly_numeric(self.atoms[atom], point)[0] ** k
            value, size = self._poly_numeric(p, point)
            total += value / den
            magnitude += size / abs(den)
        return total, magnitude

    def _poly_numeric(self, p: dict, point: dict) -> tuple[float, float]:
        total = size = 0.0
        for m, c in p.items():
            term = float(c)
            for g, e in m:
                term *= point[g] ** float(e)
            total += term
            size += abs(term)
        return total, size


def _den_mul(a: tuple, b: tuple) -> tuple:
    if not a:
        return b
    if not b:
        return a
    out = dict(a)
    for atom, k in b:
        out[atom] = out.get(atom, 0) + k
    return tuple(sorted(out.items()))


def _poly_add(a: dict, b: dict) -> dict:
    out = dict(a)
    for m, c in b.items():
        s = out.get(m, 0) + c
        if s:
            out[m] = s
        else:
            out.pop(m, None)
    return out


def constant_ratio(num: dict, den: dict) -> Fraction | None:
    """c when num == c·den as polynomials, else None."""
    if not num:
        return Fraction(0)
    if len(num) != len(den):
        return None
    lead = max(den)
    if lead not in num:
        return None
    c = Fraction(num[lead]) / den[lead]
    if len(num) != len(den) or any(num.get(m) != c * v for m, v in den.items()):
        return None
    return c


class Elems(ObjectArray):
    """An object array of field elements (dicts); ``excluded`` marks entries that are not numbers."""

    __slots__ = ()


class ExactXP(RationalXP):
    """The graph's ``xp`` over exact values: RatMat, Lin, and Elems of rational functions."""

    Array = Elems

    def __init__(self, algebra: Algebra | None = None):
        self.alg = algebra or Algebra()

    # Conversions.
    def leaf(self, name, matrix):
        if matrix.is_rational:
            return matrix.ratmat
        out = np.empty(matrix.shape, dtype=object)
        for i, row in enumerate(matrix.rows):
            for j, e in enumerate(row):
                out[i, j] = self._scalar_element(canonical(e)) if not isinstance(e, Fraction) else self.alg.const(e)
        return Elems(out)

    def _scalar_element(self, s) -> dict:
        if isinstance(s, Fraction):
            return self.alg.const(s)
        if s.key[0] == "sqrt":
            g = self.alg.gen("sqrt", s.key, s.key[1])
        else:
            info = ("entry", s.generator)
            g = self.alg.gen("opaque", ("scalar",) + s.key, info)
        return {(): {((g, 1),): s.coefficient}}

    def array(self, a) -> Elems:
        return self.elems(a)

    def elems(self, a) -> Elems:
        if isinstance(a, Elems):
            return a
        out = np.empty(a.shape, dtype=object)
        flat = out.reshape(-1)
        if isinstance(a, RatMat):
            for k, v in enumerate(a.num.reshape(-1).tolist()):
                flat[k] = self.alg.const(Fraction(v, a.den))
            return Elems(out)
        # a Lin: Σ g·A + B
        gens = {key: self._scalar_element(Scalar(Fraction(1), key, value)) for key, value in a.generators.items()}
        for k, key in enumerate(a.keys()):
            terms, const = a.value(key)
            element = self.alg.const(const)
            for generator, q in terms:
                if q:
                    element = self.alg.add(element, self.alg.scale(gens[generator], q))
            flat[k] = element
        return Elems(out, a.excluded)

    # Products.
    def matmul(self, a, b):
        if isinstance(a, RatMat) and isinstance(b, RatMat):
            return a @ b
        x, y = self._entries(a), self._entries(b)
        alg = self.alg
        out = np.empty((x.shape[0], y.shape[1]), dtype=object)
        for i in range(x.shape[0]):
            for c in range(y.shape[1]):
                total: dict = {}
                for j in range(x.shape[1]):
                    p, q = x[i, j], y[j, c]
                    if isinstance(p, (int, Fraction)):
                        if p and (q is NANF or q):
                            total = alg.add(
                                total, q if p == 1 else alg.scale(q, p) if isinstance(q, dict) else alg.const(p * q)
                            )
                    elif isinstance(q, (int, Fraction)):
                        if q and (p is NANF or p):
                            total = alg.add(total, p if q == 1 else alg.scale(p, q))
                    else:
                        total = alg.add(total, alg.mul(p, q))
                out[i, c] = total
        return Elems(out)

    def _entries(self, a) -> np.ndarray:
        """Fractions for a RatMat (cheap), field elements otherwise."""
        if isinstance(a, RatMat):
            out = np.empty(a.shape, dtype=object)
            den = a.den
            out.reshape(-1)[:] = [v if den == 1 else _int(Fraction(v, den)) for v in a.num.reshape(-1).tolist()]
            return out
        return self.elems(a).values

    # Elementwise.
    def _general_combine(self, x, y, sign):
        xv, yv = np.broadcast_arrays(x.values, y.values)
        out = np.empty(xv.shape, dtype=object)
        for idx in np.ndindex(out.shape):
            out[idx] = self.alg.add(xv[idx], yv[idx], sign)
        return Elems(out, union(x.excluded, y.excluded))

    def _general_mul(self, x, y):
        xv, yv = np.broadcast_arrays(x.values, y.values)
        out = np.empty(xv.shape, dtype=object)
        for idx in np.ndindex(out.shape):
            out[idx] = self.alg.mul(xv[idx], yv[idx])
        return Elems(out)

    def _general_one_minus(self, x):
        one = self.alg.const(1)
        return Elems(map_values(lambda e: self.alg.add(one, e, -1), x.values))

    def _general_scale(self, x, s):
        factor = self._scalar_element(s)
        return Elems(map_values(lambda e: self.alg.mul(e, factor), x.values), x.excluded)

    def tanh(self, a):
        x = self.elems(a)

        def tanh(e):
            if e is NANF:
                return NANF
            if not e:  # tanh(0) = 0
                return {}
            g = self.alg.gen("opaque", ("tanh", _key(e)), ("tanh", e))
            return {(): {((g, 1),): Fraction(1)}}

        return Elems(map_values(tanh, x.values), x.excluded)

    def exp(self, a):
        if isinstance(a, RatMat):
            a = Lin.lift(a)
        if isinstance(a, Lin):
            # one generator e**(g/den) per basis g and the matrix's denominator: integer exponents (the numerators)
            bases = [self.alg.gen("e", (key, m.den), (a.generators[key], m.den)) for key, m in a.terms.items()]
            bases.append(self.alg.gen("e", (("one",), a.const.den), (None, a.const.den)))
            out = np.empty(a.shape, dtype=object)
            flat = out.reshape(-1)
            excluded = [False] * out.size if a.excluded is None else a.excluded.reshape(-1).tolist()
            for k, (key, skip) in enumerate(zip(a.keys(), excluded, strict=True)):
                if skip:
                    flat[k] = {}
                    continue
                mono = sorted((g, n) for g, n in zip(bases, key, strict=True) if n)
                flat[k] = {(): {tuple(mono): 1}}
            return Elems(out)
        x = self.elems(a)
        out = map_values(self._exp_element, x.values)
        if x.excluded is not None:
            out[x.excluded] = {}
        return Elems(out)

    def _exp_element(self, e):
        if e is NANF:
            return NANF
        if not e:  # exp(0) = 1
            return self.alg.const(1)
        if list(e) == [()]:
            poly = e[()]
            mono = []
            for m, c in poly.items():
                if m == ():
                    mono.append((self.alg.gen("e", (("one",), 1), (None, 1)), c))
                elif len(m) == 1 and m[0][1] == 1 and self.alg.gens[m[0][0]].kind in ("sqrt", "opaque"):
                    gen = self.alg.gens[m[0][0]]
                    if gen.kind == "sqrt" or gen.key[0] == "scalar":
                        base = gen.key if gen.kind == "sqrt" else gen.key[1:]
                        value = Expr("sqrt", (Fraction(gen.info),)) if gen.kind == "sqrt" else gen.info[1]
                        mono.append((self.alg.gen("e", (base, 1), (value, 1)), c))
                        continue
                    break
                else:
                    break
            else:
                return {(): {tuple(sorted(mono)): Fraction(1)}}
        g = self.alg.gen("opaque", ("exp", _key(e)), ("exp", e))
        return {(): {((g, 1),): Fraction(1)}}

    def log(self, z):
        """log 1 = 0 (a one-key row's sum); any other value's log an opaque generator of its own."""
        one = self.alg.const(1)

        def log(e):
            if e is NANF:
                return NANF
            if e == one:
                return {}
            g = self.alg.gen("opaque", ("log", _key(e)), ("log", e))
            return {(): {((g, 1),): Fraction(1)}}

        return Elems(map_values(log, self.elems(z).values))

    def shift(self, a):
        if isinstance(a, RatMat):
            a = Lin.lift(a)
        if isinstance(a, Lin):
            return a.lowest()  # non-negative exponents: Z is a polynomial with a constant term
        return RatMat(np.zeros((a.shape[0], 1), dtype=object), 1)

    def _general_rowsum(self, x):
        out = np.empty((x.shape[0], 1), dtype=object)
        for i in range(x.shape[0]):
            total: dict = {}
            for e in x[i]:
                total = self.alg.add(total, e)
            out[i, 0] = total
        return Elems(out)

    def _general_colsum(self, x):
        return Elems(self._general_rowsum(x.T).values.T)

    def div(self, a, z):
        x, y = self.elems(a).values, self.elems(z).values
        out = np.empty(x.shape, dtype=object)
        for i in range(x.shape[0]):
            zi = y[i, 0]
            for j in range(x.shape[1]):
                out[i, j] = self.alg.div(x[i, j], zi) if x[i, j] else {}
        return Elems(out)

    def fill_rows(self, a, rows, value):
        if isinstance(a, RatMat) and value != NAN:
            return a.fill_rows(rows, value)
        x = self.elems(a)
        fill = NANF if value == NAN else self.alg.const(value)
        values = x.values.copy()
        for idx in zip(*np.nonzero(np.broadcast_to(rows, values.shape)), strict=True):
            values[idx] = fill
        return Elems(values, x.excluded)

    # Conditions: decided exactly, or refused.
    def _lin_signs(self, a: Lin) -> np.ndarray:
        return self._general_signs(self.elems(a))

    def _general_signs(self, x) -> np.ndarray:
        def sign(e):
            out = element_sign(self.alg, e)
            if out is None:
                raise SymattnError("score_mod: a condition on s that its exact form does not decide (symbols, or a "
                                   "value too close to the boundary); give numbers")  # fmt: skip
            return out

        return np.vectorize(sign, otypes=[np.int8])(x.values)

    def _hull(self, a, b):
        raise ValueError("exact values are decided")

    # Reading values back.
    def entry(self, value, i: int, j: int):
        """Entry (i, j) of a value as a field element (None where it is excluded)."""
        if isinstance(value, RatMat):
            return self.alg.const(value[i, j])
        if isinstance(value, Lin):
            if value.excluded is not None and value.excluded[i, j]:
                return None
            return self.elems(Lin(value.terms, value.const, value.generators)).values[i, j]
        if value.excluded is not None and value.excluded[i, j]:
            return None
        return value.values[i, j]


def element_sign(alg: Algebra, e) -> int | None:
    """The sign of an exact element: exactly for a constant, else from balls at rising precision (None when
    even 4096 bits do not decide, or the element holds a symbol)."""
    if e is NANF:
        return None
    value = alg.value(e)
    if isinstance(value, Fraction):
        return (value > 0) - (value < 0)
    for bits in (128, 512, 4096):
        try:
            ball = alg.ball(e, bits)
        except (ValueError, ZeroDivisionError, TooBig, TypeError, SymattnError):
            return None
        if ball > 0:
            return 1
        if ball < 0:
            return -1
    return None


def _int(q: Fraction):
    """An exponent as an int when it is one (int arithmetic is far faster than Fraction's)."""
    return q.numerator if q.denominator == 1 else q


def _key(e: dict):
    return tuple(sorted((d, tuple(sorted(p.items()))) for d, p in e.items()))
