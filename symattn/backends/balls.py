"""The ball backend of the op graph: certified enclosures at any precision.

Values stay exact as long as the computation allows: rational inputs give
rational projections (``RatMat``), the scores stay ``Lin`` combinations of
rational matrices (``rational.py``) so that equal exponents share one
exponential, and from the first irrational operation on each entry is a ball
of the engine (Arb, or mpmath intervals) in an object array.  Exact zeros stay
exact zeros: a masked weight is an exact 0, and so is every sum of products of
exact zeros, which is how a masked key's dK row certifies as "0".
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from symattn.backends.rational import Lin, ObjectArray, RationalXP, map_values
from symattn.entries import to_ball
from symattn.graph.xp import union
from symattn.matrix import RatMat
from symattn.semantics import NAN


class Balls(ObjectArray):
    """An object array of engine balls; ``excluded`` marks entries that are not numbers (masked scores)."""

    __slots__ = ()


class FloatMat:
    """A float matrix taken exactly (``BallXP(floats=True)``): products go through one Arb matrix, made once."""

    __slots__ = ("array", "_mat", "excluded")

    def __init__(self, array: np.ndarray):
        self.array = array
        self._mat = None
        self.excluded = None

    @property
    def shape(self) -> tuple:
        return self.array.shape

    def mat(self):
        if self._mat is None:
            import flint

            self._mat = flint.arb_mat(self.array.tolist())  # every float is an exact ball
        return self._mat


class BallXP(RationalXP):
    """The graph's ``xp`` over an engine at its working precision (Arb's is global: use it inside the engine's
    ``active()``).  ``careful``: slower enclosures that do not cancel (``centered``), for entries recomputed on
    their own rows."""

    Array = Balls

    def __init__(self, engine, floats: bool = False, float_products: bool = False, careful: bool = False):
        self.engine = engine
        self.floats = floats  # float inputs as balls at once (no exact rational forms: fast, for few rows)
        # products of float matrices from their double-float enclosures (about 2**-100 relatively: the first
        # try; Arb's own products, exact to the working precision, once more precision is needed)
        self.float_products = float_products
        self._rationals: dict = {}  # (p, q) -> ball
        self._generators: dict = {}  # generator key -> ball
        self._exps: dict = {}  # exact exponent key -> exp ball, shared by every entry with that exponent
        self.careful = careful

    # Conversions.
    def leaf(self, name, matrix):
        if self.floats and matrix.is_float and self.engine.name == "arb":
            return FloatMat(matrix.float64())
        if matrix.is_rational:
            return matrix.ratmat
        return Balls(np.array([[to_ball(e, self.engine) for e in row] for row in matrix.rows], dtype=object))

    def _rational(self, p: int, q: int):
        key = (p, q)
        if key not in self._rationals:
            self._rationals[key] = self.engine.rational(p, q)
        return self._rationals[key]

    def _generator(self, key, value):
        if key not in self._generators:
            self._generators[key] = to_ball(value, self.engine)
        return self._generators[key]

    def scalar(self, s):
        if isinstance(s, Fraction):
            return self._rational(s.numerator, s.denominator)
        return self._generator(s.key, s.generator) * self._rational(s.coefficient.numerator, s.coefficient.denominator)

    def array(self, a) -> Balls:
        return self.balls(a)

    def balls(self, a) -> Balls:
        """Any value as balls."""
        if isinstance(a, Balls):
            return a
        if isinstance(a, FloatMat):
            values = np.empty(a.shape, dtype=object)
            if values.size:
                values[:] = a.mat().tolist()
            return Balls(values)
        if isinstance(a, RatMat):
            out = np.empty(a.shape, dtype=object)
            flat, den = out.reshape(-1), a.den
            for k, v in enumerate(a.num.reshape(-1).tolist()):
                flat[k] = self._rational(v, den)
            return Balls(out)
        return Balls(self._lin_balls(a), a.excluded)

    def _lin_balls(self, a: Lin) -> np.ndarray:
        """Σ g·A + B as balls, by matrix operations of the engine (in C for Arb); equal entries share a ball."""
        cached = a.balls_cache
        if cached is not None and cached[0] is self:
            return cached[1]
        terms = [(self._generator(k, a.generators[k]), m) for k, m in a.terms.items()]
        values = self.engine.combination(terms, a.const)
        flat, shared = values.reshape(-1), {}
        signature = a.signature
        for k, key in enumerate(a.keys()):
            first = shared.setdefault((signature, key), flat[k])
            flat[k] = first
        a.balls_cache = (self, values)
        return values

    # Products.
    def matmul(self, a, b):
        if isinstance(a, RatMat) and isinstance(b, RatMat):
            return a @ b
        if isinstance(a, FloatMat) and isinstance(b, FloatMat) and self.float_products:
            return self._float_product(a.array, b.array)
        if isinstance(a, FloatMat) or isinstance(b, FloatMat):
            import flint

            left = a.mat() if isinstance(a, FloatMat) else flint.arb_mat(self.balls(a).values.tolist())
            right = b.mat() if isinstance(b, FloatMat) else flint.arb_mat(self.balls(b).values.tolist())
            out = np.empty((a.shape[0], b.shape[1]), dtype=object)
            if out.size:
                out[:] = (left * right).tolist()
            return Balls(out)
        return Balls(self.engine.matmul(self.balls(a).values, self.balls(b).values))

    def _float_product(self, a: np.ndarray, b: np.ndarray) -> Balls:
        """The product of two float matrices as balls: its double-float enclosure (``doublefloat.sliced_product``,
        within about 2**-100 relatively) read into Arb, instead of an Arb matrix product."""
        import flint

        from symattn.backends.doublefloat import sliced_product

        with np.errstate(all="ignore"):
            hi, lo, rad = sliced_product(a, b)
        out = np.empty(hi.shape, dtype=object)
        flat = out.reshape(-1)
        arb = flint.arb
        for k, (h, low, r) in enumerate(zip(hi.reshape(-1).tolist(), lo.reshape(-1).tolist(),
                                            rad.reshape(-1).tolist(), strict=True)):  # fmt: skip
            flat[k] = arb(h) + arb(low) + arb(0, r) if r else arb(h) + arb(low)
        return Balls(out)

    def transpose(self, a):
        if isinstance(a, RatMat):
            return a.T
        if isinstance(a, FloatMat):
            return FloatMat(a.array.T)
        return Balls(self.balls(a).values.T)

    # Elementwise.
    def _general_combine(self, x, y, sign):
        values = x.values + y.values if sign > 0 else x.values - y.values
        return Balls(values, union(x.excluded, y.excluded))

    def _general_mul(self, x, y):
        return Balls(x.values * y.values)

    def _general_one_minus(self, x):
        one = self.engine.one()  # element by element: an mpmath interval minus an array raises, it does not broadcast
        return Balls(map_values(lambda v: one - v, x.values))

    def _general_scale(self, x, s):
        return Balls(x.values * self.scalar(s), x.excluded)

    def tanh(self, a):
        x = self.balls(a)
        return Balls(map_values(self.engine.tanh, x.values), x.excluded)

    def exp(self, a):
        if isinstance(a, RatMat):
            a = Lin.lift(a)
        if isinstance(a, Lin):
            out = np.empty(a.shape, dtype=object)
            flat, exps, signature = out.reshape(-1), self._exps, a.signature
            arguments = self._lin_balls(a).reshape(-1)
            excluded = [False] * out.size if a.excluded is None else a.excluded.reshape(-1).tolist()
            zero, exp = self.engine.zero(), self.engine.exp
            for k, (key, skip) in enumerate(zip(a.keys(), excluded, strict=True)):
                if skip:
                    flat[k] = zero
                    continue
                value = exps.get((signature, key))
                if value is None:
                    value = exps[signature, key] = exp(arguments[k])
                flat[k] = value
            return Balls(out)
        out = map_values(self.engine.exp, a.values)
        if a.excluded is not None:
            out[a.excluded] = self.engine.zero()
        return Balls(out)

    def log(self, z):
        """log of each entry (a row sum: an exact 1, a one-key row's, has the exact log 0)."""
        return Balls(map_values(self.engine.log, self.balls(z).values))

    def logsumexp(self, s, empty=None, kept=None, sink=None):
        """shift + log1p(the row's terms exp(s − shift) but the shift's own, an exact 1): a row sum just above 1
        (one key far above the others, log Σ ≈ 1e-400000) keeps its relative accuracy, which log of the sum
        would lose to the 1's ulp at any working precision; a one-key row's is its score, exactly."""
        if sink is not None:
            s = self.hstack([s, sink])
        top = self.shift(s)
        terms = self.balls(self.exp(self.sub(s, top))).values
        engine, zero = self.engine, self.engine.zero()
        out = np.empty((terms.shape[0], 1), dtype=object)
        rows = np.zeros(terms.shape[0], bool) if empty is None else np.broadcast_to(empty, out.shape)[:, 0]
        for i, row in enumerate(terms.tolist()):
            if rows[i]:  # no term: excluded below
                out[i, 0] = zero
                continue
            rest, one = zero, False
            for t in row:
                if not one and engine.is_exact(t) and t == 1:
                    one = True
                else:
                    rest = rest + t
            out[i, 0] = engine.log1p(rest) if one else engine.log(rest)
        lse = self.add(top, Balls(out))
        return lse if kept is None else self.mask(lse, kept)

    def shift(self, a):
        if isinstance(a, RatMat):
            a = Lin.lift(a)
        if isinstance(a, Lin):
            return a.shift()
        mids = np.vectorize(self.engine.mid_float, otypes=[float])(a.values)
        if a.excluded is not None:
            mids = np.where(a.excluded, -np.inf, mids)
        best = np.argmax(np.where(np.isnan(mids), -np.inf, mids), axis=1)
        column = np.empty((a.shape[0], 1), dtype=object)
        for i, j in enumerate(best):
            ok = a.excluded is None or not a.excluded[i, j]
            column[i, 0] = self.engine.point(a.values[i, j]) if ok else self.engine.zero()
        return Balls(column)

    # Conditions: a ball decides where it excludes 0; a Lin's entries that no ball decides are decided exactly.
    def _general_signs(self, x) -> np.ndarray:
        sign = self.engine.sign
        return np.vectorize(lambda v: 2 if (r := sign(v)) is None else r, otypes=[np.int8])(x.values)

    def _lin_signs(self, a: Lin) -> np.ndarray:
        signs = self._general_signs(Balls(self._lin_balls(a)))
        for i, j in zip(*np.nonzero(signs == 2), strict=True):
            signs[i, j] = exact_sign(a, int(i), int(j))
        return signs

    def _hull(self, a, b):
        return self.engine.hull(a, b)

    def _general_rowsum(self, values):
        return Balls(np.array([[_sum(row)] for row in values], dtype=object).reshape(-1, 1))

    def centered(self, g, p, rest=None):
        """g − rowsum(g∘p) (rows of p summing to 1 − rest, the sink's weight) as g_j·(Σ_{k≠j} p_k + rest) −
        Σ_{k≠j} p_k·g_k: the sums of the others by prefix and suffix sums, so that no enclosure cancels where
        p_j is nearly 1."""
        if isinstance(g, RatMat) and isinstance(p, RatMat):
            return g - g.mul(p).rowsum()
        if self.careful and isinstance(g, RatMat):
            return self._centered_grouped(g, p, rest)
        G, P = self.balls(g).values, self.balls(p).values
        R = None if rest is None else self.balls(rest).values
        out = np.empty(G.shape, dtype=object)
        zero = self.engine.zero()
        for i in range(G.shape[0]):
            gs, ps = G[i].tolist(), P[i].tolist()
            gp = [a * b for a, b in zip(gs, ps, strict=True)]
            n = len(ps)
            before_p, before_gp = [zero] * n, [zero] * n
            acc_p = acc_gp = zero
            for j in range(n):
                before_p[j], before_gp[j] = acc_p, acc_gp
                acc_p, acc_gp = acc_p + ps[j], acc_gp + gp[j]
            acc_p, acc_gp = (zero if R is None else R[i, 0]), zero
            for j in range(n - 1, -1, -1):
                out[i, j] = gs[j] * (before_p[j] + acc_p) - (before_gp[j] + acc_gp)
                acc_p, acc_gp = acc_p + ps[j], acc_gp + gp[j]
        return Balls(out)

    def _centered_grouped(self, g: RatMat, p, rest=None):
        """With g exact: Σ_v (g_j − v)·P_v over the distinct values v of the row's g, P_v the sum of the weights
        where g is v.  Keys with g_k = g_j add exactly nothing, so a value that is tiny because g_j equals the
        g of the dominant key is enclosed relatively (the prefix and suffix sums cancel there)."""
        P = self.balls(p).values
        R = None if rest is None else self.balls(rest).values
        out = np.empty(g.shape, dtype=object)
        den = g.den
        for i in range(g.shape[0]):
            row = g.num[i].tolist()
            groups: dict = {} if R is None else {0: R[i, 0]}  # the sink: a key whose g is 0
            for value, weight in zip(row, P[i].tolist(), strict=True):
                groups[value] = weight if value not in groups else groups[value] + weight
            for j, value in enumerate(row):
                total = self.engine.zero()
                for other, weight in groups.items():
                    if other != value:
                        total = total + weight * self._rational(value - other, den)
                out[i, j] = total
        return Balls(out)

    def _general_colsum(self, values):
        return Balls(np.array([[_sum(col) for col in values.T]], dtype=object))

    def div(self, a, z):
        return Balls(self.balls(a).values / self.balls(z).values)

    def fill_rows(self, a, rows, value):
        if isinstance(a, RatMat) and value != NAN:
            return a.fill_rows(rows, value)
        x = self.balls(a)
        fill = (
            self.engine.nan()
            if value == NAN
            else self._rational(Fraction(value).numerator, Fraction(value).denominator)
        )
        values = x.values.copy()
        values[np.broadcast_to(rows, values.shape)] = fill
        return Balls(values, x.excluded)


def exact_sign(a: Lin, i: int, j: int) -> int:
    """The sign of a Lin's entry (i, j) from its exact form (2 where even that cannot decide)."""
    from symattn.backends.exact import ExactXP, element_sign

    entry = Lin({k: RatMat(m.num[i : i + 1, j : j + 1], m.den) for k, m in a.terms.items()},
                RatMat(a.const.num[i : i + 1, j : j + 1], a.const.den), a.generators)  # fmt: skip
    xp = ExactXP()
    sign = element_sign(xp.alg, xp.elems(entry).values[0, 0])
    return 2 if sign is None else sign


def _sum(items):
    items = list(items)
    total = items[0]
    for v in items[1:]:
        total = total + v
    return total
