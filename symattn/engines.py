"""Ball arithmetic engines: mpmath intervals and Arb balls, behind one small interface.

An engine holds a working precision in bits and offers the scalar operations
the truth needs (rationals, pi, sqrt, exp, log, integer powers, + - * /), the
matrix operations (from exact rationals, from balls, product, entries), and the
exact ends of an enclosure as Fractions.  ``truth.py`` writes the attention
math once against this interface.
"""

from __future__ import annotations

from .errors import SymattnError

ENGINES = ("mpmath", "arb", "auto")


def _dyadic(man: int, exp: int) -> tuple[int, int]:
    """man·2**exp as a (numerator, denominator) pair."""
    return (man << exp, 1) if exp >= 0 else (man, 1 << -exp)


class MpmathEngine:
    """Outward-rounded intervals from ``mpmath.iv`` (a private context: the global one is left alone)."""

    name = "mpmath"

    def __init__(self, bits: int):
        from mpmath.ctx_iv import MPIntervalContext

        self.ctx = MPIntervalContext()
        self.ctx.prec = bits
        self.bits = bits

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

    def integer_power(self, x, n: int):
        return x**n

    def one(self):
        return self.ctx.mpf(1)

    # Matrices are lists of rows of intervals.
    def from_ratmat(self, m):
        mpf, den = self.ctx.mpf, m.den
        if den == 1:
            return [[mpf(v) for v in row] for row in m.num.tolist()]
        return [[mpf(v) / den for v in row] for row in m.num.tolist()]

    def from_rows(self, rows):
        return rows

    def rows(self, m):
        return m

    def matmul(self, a, b):
        cols = list(zip(*b, strict=True))
        fsum = self.ctx.fsum
        return [[fsum(x * y for x, y in zip(row, col, strict=True)) for col in cols] for row in a]

    def decimal(self, x, digits: int) -> tuple[int, int, int] | None:
        """(lo, hi, e): integers with x ⊂ [lo, hi]·10**e, about digits + 10 digits long; None if not finite."""
        ends = self.enclosure(x)
        if ends is None:
            return None
        (an, ad), (bn, bd) = ends
        if an == bn == 0:
            return 0, 0, 0
        big = max(abs(an), abs(bn))
        decade = int((big.bit_length() - max(ad, bd).bit_length()) * 0.30103)
        k = max(digits + 10, int(self.bits * 0.30103) + 2) - decade  # as fine as the working precision
        scale, down = (10**k, 1) if k >= 0 else (1, 10**-k)
        lo = (an * scale) // (ad * down)  # floor and ceiling: the decimal enclosure contains the binary one
        hi = -((-bn * scale) // (bd * down))
        return lo, hi, -k

    def enclosure(self, x) -> tuple[tuple, tuple] | None:
        """The exact ends of an interval as (numerator, denominator) pairs; None if not finite."""
        (sa, ma, ea, _), (sb, mb, eb, _) = x._mpi_
        if (ma == 0 and ea != 0) or (mb == 0 and eb != 0):  # inf or nan
            return None
        return _dyadic(-ma if sa else ma, ea), _dyadic(-mb if sb else mb, eb)


class ArbEngine:
    """Arb balls from python-flint (FLINT's certified ball arithmetic)."""

    name = "arb"

    def __init__(self, bits: int):
        import flint

        self.flint = flint
        flint.ctx.prec = bits  # flint's context is global; evaluate() restores it
        self.bits = bits

    def rational(self, p: int, q: int = 1):
        arb = self.flint.arb
        return arb(p) / q if q != 1 else arb(p)

    def pi(self):
        return self.flint.arb.pi()

    def sqrt(self, x):
        return x.sqrt()

    def exp(self, x):
        return x.exp()

    def log(self, x):
        return x.log()

    def integer_power(self, x, n: int):
        return x**n

    def one(self):
        return self.flint.arb(1)

    def from_ratmat(self, m):
        flint = self.flint
        mat = flint.arb_mat(flint.fmpz_mat(m.num.tolist()))
        return mat / m.den if m.den != 1 else mat

    def from_rows(self, rows):
        return self.flint.arb_mat(rows)

    def rows(self, m):
        return m.tolist()

    def matmul(self, a, b):
        return a * b

    def decimal(self, x, digits: int) -> tuple[int, int, int] | None:
        """(lo, hi, e): integers with x ⊂ [lo, hi]·10**e (Arb rounds outward); None if not finite."""
        if not x.is_finite():
            return None
        # as many digits as the working precision carries, so that raising it narrows this enclosure too
        mid, rad, e = x.mid_rad_10exp(max(digits + 5, int(self.bits * 0.30103) + 2))
        mid, rad = int(mid), int(rad)
        return mid - rad, mid + rad, int(e)

    def enclosure(self, x) -> tuple[tuple, tuple] | None:
        """The exact ends of a ball as (numerator, denominator) pairs; None if not finite."""
        if not x.is_finite():
            return None
        mm, me = x.mid().man_exp()
        rm, re = x.rad().man_exp()
        mm, me, rm, re = int(mm), int(me), int(rm), int(re)
        e = min(me, re)
        mid, rad = mm << (me - e), rm << (re - e)
        return _dyadic(mid - rad, e), _dyadic(mid + rad, e)


def available() -> list[str]:
    names = ["mpmath"]
    try:
        import flint  # noqa: F401

        names.append("arb")
    except ImportError:
        pass
    return names


def engine_class(name: str):
    """The engine class for ``name`` (mpmath, arb or auto: Arb when python-flint is installed)."""
    if name not in ENGINES:
        raise SymattnError(f"engine: expected one of {', '.join(ENGINES)}, received {name!r}")
    if name == "auto":
        name = "arb" if "arb" in available() else "mpmath"
    if name == "arb":
        if "arb" not in available():
            raise SymattnError("engine: 'arb' needs python-flint, which is not installed (pip install python-flint)")
        return ArbEngine
    return MpmathEngine
