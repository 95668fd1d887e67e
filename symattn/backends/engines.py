"""Ball arithmetic engines: Arb balls (python-flint) and mpmath intervals, behind one small interface.

An engine holds a working precision in bits and offers the scalar operations
the truth needs (rationals, pi, sqrt, exp, log, tanh, integer powers, + - * /),
a matrix product over object arrays of its balls, and the decimal enclosure of
a ball.  Decimals always go through Arb's ``mid_rad_10exp``, which handles
exponents of any size (exp(-10**18) is about 10**(-4.3·10**17)); an mpmath
interval's exact ends are handed to Arb for that.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np

from symattn.errors import SymattnError

ENGINES = ("mpmath", "arb", "auto")


@contextmanager
def precision(bits: int):
    """Arb's working precision set to ``bits`` inside the block and restored after it: the one place where
    python-flint's global precision changes.

    >>> import flint
    >>> with precision(200):
    ...     flint.ctx.prec
    200
    """
    import flint

    saved = flint.ctx.prec
    flint.ctx.prec = bits
    try:
        yield
    finally:
        flint.ctx.prec = saved


class ArbEngine:
    """Arb balls from python-flint (FLINT's certified ball arithmetic).  flint's precision is global: the
    engine's arithmetic runs inside ``with engine.active():``, which sets it to ``bits`` for the block."""

    name = "arb"

    def __init__(self, bits: int):
        import flint

        self.flint = flint
        self.arb = flint.arb
        self.bits = bits

    def active(self):
        """A context manager: Arb's working precision is this engine's inside the block."""
        return precision(self.bits)

    def rational(self, p: int, q: int = 1):
        return self.arb(p) / q if q != 1 else self.arb(p)

    def pi(self):
        return self.arb.pi()

    def sqrt(self, x):
        return x.sqrt()

    def exp(self, x):
        return x.exp()

    def log(self, x):
        return x.log()

    def log1p(self, x):
        return x.log1p()

    def tanh(self, x):
        return x.tanh()

    def integer_power(self, x, n: int):
        from symattn.entries import integer_power

        return integer_power(x, n)

    def zero(self):
        return self.arb(0)

    def one(self):
        return self.arb(1)

    def nan(self):
        return self.arb.nan()

    def point(self, x):
        """The exact midpoint of a ball, as an exact ball."""
        return x.mid()

    def mid_float(self, x) -> float:
        return float(x.mid())

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        flint = self.flint
        product = flint.arb_mat(a.tolist()) * flint.arb_mat(b.tolist())
        out = np.empty((a.shape[0], b.shape[1]), dtype=object)
        if out.size:
            out[:] = product.tolist()
        return out

    def combination(self, terms, const) -> np.ndarray:
        """Σ g·A + B for balls g and RatMats A, B, as an object array of balls (Arb matrices: C speed)."""
        flint = self.flint
        total = flint.arb_mat(flint.fmpz_mat(const.num.tolist())) / const.den
        for g, m in terms:
            total = total + flint.arb_mat(flint.fmpz_mat(m.num.tolist())) * (g / m.den)
        out = np.empty(const.shape, dtype=object)
        if out.size:
            out[:] = total.tolist()
        return out

    def sign(self, x) -> int | None:
        """The sign of a ball's value where the ball decides it (0 for an exact zero), else None."""
        if x > 0:
            return 1
        if x < 0:
            return -1
        return 0 if self.is_exact_zero(x) else None

    def hull(self, a, b):
        """A ball containing both."""
        return a.union(b)

    def is_exact_zero(self, x) -> bool:
        return x.is_zero() and x.is_exact()

    def contains_zero(self, x) -> bool:
        return x.contains(0)

    def is_exact(self, x) -> bool:
        return x.is_exact()

    def is_nan(self, x) -> bool:
        return x.is_nan()

    def decimal(self, x, digits: int, convert: int | None = None) -> tuple[int, int, int] | None:
        """(lo, hi, e): integers with x ⊂ [lo, hi]·10**e (Arb rounds outward); None if not finite.  ``convert``
        digits are converted (by default as many as the working precision carries, so that raising it narrows
        this enclosure too)."""
        if not x.is_finite():
            return None
        mid, rad, e = x.mid_rad_10exp(convert or max(digits + 5, int(self.bits * 0.30103) + 2))
        mid, rad = int(mid), int(rad)
        return mid - rad, mid + rad, int(e)

    def strings(self, balls: list, digits: int) -> list:
        """certify.certified_decimal of each ball converted at digits + 5, in one loop (None where that does not
        settle it: the caller tries harder)."""
        from symattn.certify import decimal_context, layout

        context = decimal_context(digits)
        create, convert = context.create_decimal, digits + 5
        out = []
        for ball in balls:
            if not ball.is_finite():
                out.append(None)
                continue
            mid, rad, e = ball.mid_rad_10exp(convert)
            mid, rad = int(mid), int(rad)  # Python ints: faster arithmetic than fmpz's wrappers
            if not rad:
                out.append(None)  # an exact point: the careful path pads its digits
                continue
            a = create(mid - rad)
            if a != create(mid + rad) or not a:
                out.append(None)
                continue
            e = int(e)
            if -(10**15) < e < 10**15:
                out.append(str(a.scaleb(e, context)).replace("E", "e"))
            else:
                sign, coefficient, exponent = a.as_tuple()
                out.append(layout(bool(sign), "".join(map(str, coefficient)), exponent + e))
        return out

    def to_arb(self, x):
        return x

    def accuracy(self, x) -> int:
        """Bits of relative accuracy (Arb's rel_accuracy_bits; large for an exact ball)."""
        return 1 << 30 if x.is_exact() else x.rel_accuracy_bits()


class MpmathEngine:
    """Outward-rounded intervals from ``mpmath.iv`` (a private context: the global one is left alone)."""

    name = "mpmath"

    def __init__(self, bits: int):
        from mpmath.ctx_iv import MPIntervalContext

        self.ctx = MPIntervalContext()
        self.ctx.prec = bits
        self.bits = bits

    def active(self):
        """mpmath's context here is private: nothing global to set."""
        return nullcontext()

    def rational(self, p: int, q: int = 1):
        return self.ctx.mpf(p) / q if q != 1 else self.ctx.mpf(p)

    def pi(self):
        return +self.ctx.pi

    def sqrt(self, x):
        return self.ctx.sqrt(x)

    def exp(self, x):
        return self.ctx.exp(x)

    def log(self, x):
        return self.ctx.log(x)

    def log1p(self, x):
        return self.ctx.log1p(x)

    def tanh(self, x):
        # mpmath.iv has no tanh: tanh(x) = 1 - 2/(exp(2x) + 1), monotone, so the interval stays sharp; that form
        # would make a nan's unbounded interval [-1, 1], so a nan stays a nan here, as in Arb
        if self.is_nan(x):
            return self.nan()
        return 1 - 2 / (self.ctx.exp(2 * x) + 1)

    def integer_power(self, x, n: int):
        from symattn.entries import integer_power

        return integer_power(x, n)

    def zero(self):
        return self.ctx.mpf(0)

    def one(self):
        return self.ctx.mpf(1)

    def nan(self):
        # not mpmath's nan interval, which its arithmetic loses (nan·x gives 0, nan + x gives [-inf, inf]): the
        # whole line, which every operation keeps unbounded (0·[-inf, inf] too), as Arb keeps its nan a nan
        return self.ctx.mpf(["-inf", "+inf"])

    def point(self, x):
        return self.ctx.mpf(x.mid)

    def mid_float(self, x) -> float:
        return float(x.mid)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        fsum = self.ctx.fsum
        cols = [b[:, c].tolist() for c in range(b.shape[1])]
        out = np.empty((a.shape[0], b.shape[1]), dtype=object)
        for r, row in enumerate(a.tolist()):
            for c, col in enumerate(cols):
                out[r, c] = fsum(x * y for x, y in zip(row, col, strict=True))
        return out

    def combination(self, terms, const) -> np.ndarray:
        out = np.empty(const.shape, dtype=object)
        for idx in np.ndindex(const.shape):
            total = self.rational(const.num[idx], const.den)
            for g, m in terms:
                if m.num[idx]:
                    total = total + g * self.rational(m.num[idx], m.den)
            out[idx] = total
        return out

    def sign(self, x) -> int | None:
        """The sign of an interval's value where the interval decides it (0 for an exact zero), else None."""
        if x.a > 0:
            return 1
        if x.b < 0:
            return -1
        return 0 if self.is_exact_zero(x) else None

    def hull(self, a, b):
        """An interval containing both."""
        return self.ctx.mpf([min(a.a, b.a), max(a.b, b.b)])

    def is_exact_zero(self, x) -> bool:
        return x.a == 0 and x.b == 0

    def contains_zero(self, x) -> bool:
        return 0 in x

    def is_exact(self, x) -> bool:
        return x.a == x.b

    def is_nan(self, x) -> bool:
        """An unbounded interval is a nan: mpmath's exponents never overflow, and no divisor of the computation
        contains 0 (softmax's sums of exponentials, tanh's exp(2x) + 1), so only a nan makes an end infinite."""
        (_, ma, ea, _), (_, mb, eb, _) = x._mpi_
        return (ma == 0 and ea != 0) or (mb == 0 and eb != 0)  # mpmath's inf and nan: zero mantissa, exponent ≠ 0

    def to_arb(self, x):
        """The interval as an Arb ball containing it: its ends (mantissa, exponent) read exactly by Arb, never
        expanded into integers (an exponent may be near 2**64)."""
        import flint

        (sa, ma, ea, _), (sb, mb, eb, _) = x._mpi_
        if (ma == 0 and ea != 0) or (mb == 0 and eb != 0):  # inf or nan
            return flint.arb.nan()
        with precision(max(self.bits, ma.bit_length(), mb.bit_length()) + 8):  # the ends exactly
            lo = flint.arb((-ma if sa else ma, ea))
            hi = flint.arb((-mb if sb else mb, eb))
            return lo.union(hi)

    def accuracy(self, x) -> int:
        ball = self.to_arb(x)
        return 1 << 30 if ball.is_exact() else ball.rel_accuracy_bits()

    def decimal(self, x, digits: int, convert: int | None = None) -> tuple[int, int, int] | None:
        # Arb's decimal conversion (mid_rad_10exp) does not depend on the working precision
        return ArbEngine(self.bits).decimal(self.to_arb(x), digits, convert)

    def strings(self, balls: list, digits: int) -> list:
        return [None] * len(balls)  # everything through the careful path


def engine_class(name: str):
    """The engine class for ``name`` (mpmath, arb or auto: Arb)."""
    if name not in ENGINES:
        raise SymattnError(f"engine: expected one of {', '.join(ENGINES)}, received {name!r}")
    return MpmathEngine if name == "mpmath" else ArbEngine
