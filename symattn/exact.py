"""The exact structure of attention on rational inputs, without SymPy.

With rational inputs, Q, K, V and R = Q·Kᵀ are rational matrices and every
score is ``scale·R[r, k]``.  Shifting each softmax row by its smallest score,
every exponent is an integer multiple of one number g = |scale|·G, so with
``t = exp(g)`` each weight is ``t**e / Z(t)``, each head entry ``N(t) / Z(t)``
and each entry of M a sum of such fractions: rational functions of t with
rational coefficients.  When the scale is algebraic and non-zero, t is
transcendental (Lindemann), so two such functions are equal as numbers exactly
when they are equal as rational functions.  That decides exactly which entries
are zero or rational (the cases where a ball can never prove its digits), and
gives compact closed forms (``trace.py`` prints them with SymPy).

Polynomials are sparse: ``{exponent: Fraction}``.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from functools import reduce

import numpy as np

from .entries import Entry, to_ball
from .errors import SymattnError

Poly = dict  # {int exponent: Fraction coefficient}, no zero coefficients

MAX_TERMS = 200_000  # beyond this an exact decision is given up (the caller says so)
PRIME = 2**61 - 1  # for the modular certificate that a rational function is not constant


class RatMat:
    """An exact rational matrix: integer numerators over one common denominator."""

    def __init__(self, num: np.ndarray, den: int):
        self.num = num  # object array of Python ints
        self.den = den

    @classmethod
    def from_entries(cls, rows) -> RatMat:
        den = reduce(math.lcm, (e.denominator for row in rows for e in row), 1)
        num = np.array([[e.numerator * (den // e.denominator) for e in row] for row in rows], dtype=object)
        return cls(num, den)

    @property
    def shape(self) -> tuple:
        return self.num.shape

    def __matmul__(self, other: RatMat) -> RatMat:
        return RatMat(self.num @ other.num, self.den * other.den)

    @property
    def T(self) -> RatMat:
        return RatMat(self.num.T, self.den)

    def rows(self, start: int, stop: int) -> RatMat:
        return RatMat(self.num[start:stop], self.den)

    def __getitem__(self, index) -> Fraction:
        return Fraction(self.num[index], self.den)

    def fractions(self) -> list:
        return [[Fraction(v, self.den) for v in row] for row in self.num.tolist()]


def padd(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for e, c in b.items():
        s = out.get(e, 0) + c
        if s:
            out[e] = s
        else:
            out.pop(e, None)
    return out


def pmul(a: Poly, b: Poly) -> Poly:
    if len(a) * len(b) > MAX_TERMS:
        raise _TooBig
    out: dict = {}
    for ea, ca in a.items():
        for eb, cb in b.items():
            out[ea + eb] = out.get(ea + eb, 0) + ca * cb
    return {e: c for e, c in out.items() if c}


def constant_ratio(num: Poly, den: Poly) -> Fraction | None:
    """c when num == c·den as polynomials, else None."""
    if not num:
        return Fraction(0)
    lead_n, lead_d = max(num), max(den)
    c = Fraction(num[lead_n]) / den[lead_d]
    if len(num) != len(den) or any(num.get(e) != c * v for e, v in den.items()):
        return None
    return c


class _TooBig(Exception):
    pass


MAX_DENSE = 4096  # cancel common factors only below this degree (dense GCD cost grows with it)


def reduced(num: Poly, den: Poly) -> tuple[Fraction, Poly, Poly]:
    """(c, N, Z) with num/den = c·N/Z, N and Z primitive integer polynomials, Z's leading coefficient
    positive, and common factors cancelled when the degrees allow (python-flint's GCD)."""
    if not num:
        return Fraction(0), {}, {0: 1}
    ratio = constant_ratio(num, den)
    if ratio is not None:
        return ratio, {0: 1}, {0: 1}
    c_num, num = _primitive(num)
    c_den, den = _primitive(den)
    low = min(num)
    if max(num) - low <= MAX_DENSE and max(den) <= MAX_DENSE:
        try:
            from flint import fmpz_poly
        except ImportError:
            fmpz_poly = None
        if fmpz_poly is not None:
            n = fmpz_poly([int(num.get(e, 0)) for e in range(low, max(num) + 1)])
            d = fmpz_poly([int(den.get(e, 0)) for e in range(max(den) + 1)])
            g = n.gcd(d)
            if g.degree() > 0:
                n, d = n // g, d // g
                num = {e + low: Fraction(int(v)) for e, v in enumerate(n.coeffs()) if v}
                den = {e: Fraction(int(v)) for e, v in enumerate(d.coeffs()) if v}
                c2, num = _primitive(num)
                c3, den = _primitive(den)
                c_num, c_den = c_num * c2, c_den * c3
    return c_num / c_den, num, den


def _primitive(poly: Poly) -> tuple[Fraction, Poly]:
    """(c, p) with poly = c·p, p with coprime integer coefficients and a positive leading one."""
    den = reduce(math.lcm, (Fraction(v).denominator for v in poly.values()), 1)
    ints = {e: int(v * den) for e, v in poly.items()}
    g = reduce(math.gcd, ints.values())
    if ints[max(ints)] < 0:
        g = -g
    return Fraction(g, den), {e: v // g for e, v in ints.items()}


class ExactAttention:
    """The rational skeleton of a spec whose inputs are all rational.

    >>> from symattn.spec import load_spec
    >>> ex = ExactAttention(load_spec("notebook"), sign=1)
    >>> ex.G, ex.rational_function("head1", 0, 0)
    (Fraction(2, 1), ({0: Fraction(1, 1), 3: Fraction(3, 1)}, {0: 1, 3: 1}))
    """

    def __init__(self, spec, sign: int):
        self.spec = spec
        self.sign = sign  # sign of the scale: +1, -1, or 0 (uniform attention)
        x = RatMat.from_entries(spec.x)
        self.Q, self.K, self.V, self.R = [], [], [], []
        for head in spec.heads:
            q, k, v = (x @ RatMat.from_entries(w) for w in (head.wq, head.wk, head.wv))
            self.Q.append(q)
            self.K.append(k)
            self.V.append(v)
            self.R.append(q @ k.T)  # the scores are scale·R
        self.wo = RatMat.from_entries(spec.wo)
        d_v = spec.d_v
        self.VWo = [v @ self.wo.rows(i * d_v, (i + 1) * d_v) for i, v in enumerate(self.V)]
        # Integer exponents: the gaps sign·(R - row minimum), over G, the gcd of all the gaps.
        gaps = []  # per head: n × n integer numerators over r.den
        for r in self.R:
            u = (r.num * self.sign).tolist()
            gaps.append([[v - low for v in row] for row, low in zip(u, map(min, u), strict=True)])
        per_head = [
            Fraction(reduce(math.gcd, (v for row in g for v in row), 0), r.den)
            for g, r in zip(gaps, self.R, strict=True)
        ]
        positive = [g for g in per_head if g]
        self.G = reduce(_gcd, positive) if positive else Fraction(1)
        self.exponents = []  # per head: n × n non-negative integers, 0 at each row's minimum
        for g, r in zip(gaps, self.R, strict=True):
            scale = self.G.denominator, self.G.numerator * r.den  # gap/r.den/G as integer arithmetic
            self.exponents.append([[v * scale[0] // scale[1] for v in row] for row in g])

    # The denominators Z(t) and numerators N(t), row by row.
    def Z(self, head: int, row: int) -> Poly:
        out: dict = {}
        for e in self.exponents[head][row]:
            out[e] = out.get(e, 0) + 1
        return out

    def _numerator(self, head: int, row: int, values: RatMat, col: int) -> Poly:
        out: dict = {}
        for k, e in enumerate(self.exponents[head][row]):
            out[e] = out.get(e, 0) + values[k, col]
        return {e: c for e, c in out.items() if c}

    def rational_function(self, step: str, i: int, j: int) -> tuple[Poly, Poly]:
        """(N, Z) with entry = N(t)/Z(t), for a weights, head, concat_heads or M entry."""
        kind, head = _split(step)
        if kind == "weights":
            return {self.exponents[head][i][j]: Fraction(1)}, self.Z(head, i)
        if kind == "head":
            return self._numerator(head, i, self.V[head], j), self.Z(head, i)
        if kind == "concat_heads":
            d_v = self.spec.d_v
            return self.rational_function(f"head{j // d_v + 1}", i, j % d_v)
        if kind == "M":
            return self._output(i, j)
        raise ValueError(step)

    def output_terms(self, row: int, col: int) -> list[tuple[int, Poly, Poly]]:
        """M[row, col] as Σ N(t)/Z(t) over the heads, heads with the same Z(t) added up.

        Each term is (first head, N, Z); terms with N = 0 are left out.
        """
        groups: dict = {}
        for head in range(self.spec.h):
            z = self.Z(head, row)
            key = tuple(sorted(z.items()))
            first, numerator = groups.get(key, (head, {}))
            groups[key] = (first, padd(numerator, self._numerator(head, row, self.VWo[head], col)))
        return [(first, num, dict(key)) for key, (first, num) in groups.items() if num]

    def _output(self, row: int, col: int) -> tuple[Poly, Poly]:
        terms = self.output_terms(row, col)
        num: Poly = {}
        for _, part, z in terms:
            for _, _, other in terms:
                if other is not z:
                    part = pmul(part, other)
            num = padd(num, part)
        den = reduce(pmul, (z for _, _, z in terms), {0: Fraction(1)})
        return num, den

    def exact_value(self, step: str, i: int, j: int) -> Fraction | None:
        """The entry as a Fraction when it is rational, None when it is irrational.

        Raises SymattnError when the decision would take too much work.
        """
        kind, head = _split(step)
        if kind in ("Q", "K", "V"):
            return getattr(self, kind)[head][i, j]
        if kind == "scores":
            r = self.R[head][i, j]
            scale = self.spec.effective_scale
            if r == 0:
                return Fraction(0)
            return r * scale if isinstance(scale, Fraction) else None
        if self.sign != 0 and not self.spec.scale_is_algebraic:
            raise SymattnError(
                f"{step}[{i}, {j}]: cannot decide exactly whether this entry is rational: "
                f"the scale {self.spec.effective_scale} is not algebraic"
            )
        if kind == "M":
            terms = [(num, z) for _, num, z in self.output_terms(i, j)]
        else:
            terms = [self.rational_function(step, i, j)]
        if not terms:
            return Fraction(0)
        if len(terms) == 1:
            return constant_ratio(*terms[0])
        if not_constant(terms):
            return None
        try:
            return constant_ratio(*self._output(i, j))
        except _TooBig:
            raise SymattnError(
                f"{step}[{i}, {j}]: deciding this entry exactly needs more than {MAX_TERMS} polynomial terms"
            ) from None


def not_constant(terms: list[tuple[Poly, Poly]], tries: int = 8) -> bool:
    """True when Σ N/Z provably is not a constant: two values of it modulo a prime differ.

    Reduction modulo p is a ring homomorphism wherever the denominators are invertible, so a
    constant would take one value at every point; False means "probably constant", not a proof.
    """
    rng = random.Random(20240611)  # fixed: the same spec gives the same work every run
    seen = set()
    for _ in range(tries):
        t = rng.randrange(2, PRIME - 1)
        total = 0
        for num, den in terms:
            z = _mod_value(den, t)
            n = _mod_value(num, t)
            if z is None or n is None or z == 0:
                break
            total += n * pow(z, -1, PRIME)
        else:
            seen.add(total % PRIME)
            if len(seen) > 1:
                return True
    return False


def _mod_value(poly: Poly, t: int) -> int | None:
    total = 0
    for e, c in poly.items():
        c = Fraction(c)
        if c.denominator % PRIME == 0:
            return None
        total += c.numerator * pow(c.denominator, -1, PRIME) * pow(t, e, PRIME)
    return total % PRIME


def _gcd(a: Fraction, b: Fraction) -> Fraction:
    den = math.lcm(a.denominator, b.denominator)
    return Fraction(math.gcd(int(a * den), int(b * den)), den)


def _split(step: str) -> tuple[str, int]:
    if step in ("concat_heads", "M"):
        return step, -1
    kind = step.rstrip("0123456789")
    return kind, int(step[len(kind) :]) - 1


def scale_sign(scale: Entry) -> int:
    """The sign of an exact scale, proven with interval arithmetic."""
    if isinstance(scale, Fraction):
        return (scale > 0) - (scale < 0)
    from .engines import MpmathEngine

    for bits in (64, 512, 4096):
        engine = MpmathEngine(bits)
        (lo, _), (hi, _) = engine.enclosure(to_ball(scale, engine))  # numerators carry the signs
        if lo > 0:
            return 1
        if hi < 0:
            return -1
    raise SymattnError(f"scale: cannot prove the sign of {scale}; give a scale that is clearly non-zero")
