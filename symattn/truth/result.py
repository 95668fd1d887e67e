"""What ``evaluate`` returns: a Truth of certified steps, each read as a CertifiedMatrix.

Decimal strings are made when they are read: each is printed with d digits
only when both ends of its enclosure round to the same d digits
(``certify.py``); a rare enclosure that straddles a rounding boundary at that
moment is asked of its exact form (``decide.py``), else recomputed at a higher
precision for that entry alone (its query row of the forward computation, or
the whole backward one), and gets the digits it does certify if no precision
within MAX_ESCALATION settles it.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

from symattn import certify
from symattn.backends.balls import BallXP
from symattn.backends.engines import engine_class
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.matrix import RatMat
from symattn.truth.decide import Decider

log = logging.getLogger("symattn")

MAX_ESCALATION = 1 << 16  # one entry just off a rounding tie is recomputed (its row alone) up to this precision


class CertifiedMatrix:
    """One step's certified values, read from a Truth.

    >>> from symattn import evaluate
    >>> m = evaluate("notebook", digits=20)["M"]
    >>> m
    <CertifiedMatrix M 2×2>
    >>> m.values[0][0], m[0, 0], m.certified_digits[0]
    ('6.9433358564932463888', Decimal('6.9433358564932463888'), (20, 20))

    ``values`` are decimal strings, every digit proven (made on first use): certified digits; "0" for an
    exact zero; "-inf" for a masked score (excluded, not a number); "nan" for an empty row under
    ``empty_row "nan"``; "<1e-N" (|x| < 10**-N, 0 certified digits) for an entry whose enclosure still
    contains zero when the precision budget is spent and the exact form cannot decide it.
    ``certified_digits`` gives each entry's proven digits (fewer than asked only where ``Truth.notes`` says
    so) and ``exact`` whether it was decided from the exact form.  Indexing ``m[i, j]`` gives a Decimal where
    the decimal module can hold the exponent, else the string; ``tolist`` all of them; ``to_numpy`` floats.
    """

    def __init__(self, truth: Truth, name: str, shape: tuple):
        self._truth = truth
        self.name = name
        self.shape = shape
        self._values = None

    def _settle(self):
        if self._values is None:
            self._values, self._digits, self._exact = self._truth._strings(self.name)

    @property
    def values(self) -> tuple:
        self._settle()
        return self._values

    @property
    def certified_digits(self) -> tuple:
        self._settle()
        return self._digits

    @property
    def exact(self) -> tuple:
        """Rows of bools: the value was decided from the exact form (or is an exact rational input)."""
        self._settle()
        return self._exact

    def __getitem__(self, index):
        i, j = index
        return certify.to_decimal(self.values[i][j])

    def tolist(self) -> list:
        return [[certify.to_decimal(v) for v in row] for row in self.values]

    def to_numpy(self, dtype="float64"):
        """The values as floats ("-inf" and "nan" as themselves, bounds "<1e-N" as 0).  On the large path,
        the enclosures' float64 midpoints (within their radii, far below a float64 ulp of the value) where
        they certify, without making strings."""
        known = self._truth.known.get(self.name)
        if known is not None and known.mid is not None and self._values is None:
            out = known.mid.copy()
            for (i, j), text in known.decided.items():
                out[i, j] = _float(text)
            if known.excluded is not None:
                out[known.excluded] = -np.inf
        else:
            out = np.array([[_float(v) for v in row] for row in self.values])
        if known is not None:
            for (i, j), (_, mid) in known.fewer.items():  # their enclosures' midpoints: far more than their digits
                out[i, j] = mid
        return out.astype(dtype)

    def text(self, i: int, j: int) -> str:
        """One entry's certified string (on the large path without making the others)."""
        known = self._truth.known.get(self.name)
        if known is not None and known.mid is not None and self._values is None:
            if (i, j) in known.decided:
                return known.decided[i, j]
            if known.excluded is not None and known.excluded[i, j]:
                return "-inf"
            if known.mid[i, j] == 0 and known.rad[i, j] == 0:
                return "0"
            if known.ok[i, j]:
                from symattn.backends.intervals import strings

                return strings(known.mid[i : i + 1, j : j + 1], self._truth.digits)[0]
        return self.values[i][j]

    def texts(self, places) -> list:
        """The certified strings of entries (i, j), the plain ones made in one batch on the large path."""
        known = self._truth.known.get(self.name)
        if known is None or known.mid is None or self._values is not None:
            return [self.values[i][j] for i, j in places]
        from symattn.backends.intervals import strings

        out, plain = [], []
        for n, (i, j) in enumerate(places):
            special = (i, j) in known.decided or (known.excluded is not None and known.excluded[i, j])
            if not special and known.ok[i, j] and not (known.mid[i, j] == 0 and known.rad[i, j] == 0):
                plain.append(n)
                out.append(None)
            else:
                out.append(self.text(i, j))
        if plain:
            mids = np.array([known.mid[places[n]] for n in plain])
            for n, text in zip(plain, strings(mids, self._truth.digits), strict=True):
                out[n] = text
        return out

    def __str__(self) -> str:
        width = max(len(v) for row in self.values for v in row)
        return "\n".join("  ".join(v.rjust(width) for v in row) for row in self.values)

    def __repr__(self) -> str:
        return f"<CertifiedMatrix {self.name} {self.shape[0]}×{self.shape[1]}>"


def _float(text: str) -> float:
    if text.startswith("<"):
        return 0.0
    return float(text)


class Known:
    """What is known of one step's entries: exact rationals or balls (whole arrays), masked entries, and the
    entries settled otherwise (exact decisions, "nan", bounds) by (i, j).  ``Truth.known[name]``."""

    __slots__ = ("exact", "balls", "excluded", "decided", "bounds", "fewer", "mid", "rad", "ok", "texts")

    def __init__(self, exact=None, balls=None, excluded=None, mid=None, rad=None, ok=None):
        self.exact = exact  # RatMat or None
        self.balls = balls  # object array of balls or None
        self.excluded = excluded  # bool array or None
        self.mid, self.rad = mid, rad  # float64 enclosures (the large path), or None
        self.ok = ok  # bools: the enclosures that certify the digits asked (strings from mid)
        self.texts = None  # or (strings, certified digits, exact flags), rows of each: read from a file (store.py)
        self.decided: dict = {}  # (i, j) -> string
        self.bounds: set = set()  # (i, j) of the decided strings that are bounds, not values
        self.fewer: dict = {}  # (i, j) -> (digits certified, the enclosure's float midpoint) for decided strings
        # with fewer digits than asked


class Truth:
    """Certified values of the steps of a spec's trace: what ``evaluate`` returns.

    >>> from symattn import evaluate
    >>> truth = evaluate("notebook", digits=20)
    >>> truth.names[:4], truth["M"]
    (['Q1', 'K1', 'V1', 'scores1'], <CertifiedMatrix M 2×2>)
    >>> truth.fixed("M", 0, 0, 5)  # M[0, 0] to 5 decimals, as an integer (half to even)
    694334

    ``truth[name]`` is a step's CertifiedMatrix; ``names`` the steps evaluated, in order, and ``steps`` them
    by name; iterating gives the CertifiedMatrix of each.  ``digits`` is the significant digits asked,
    ``engine`` the engine's name, ``bits`` the highest working precision used, ``method`` "balls" (Arb or
    mpmath throughout) or "intervals" (the large path: float64 enclosures, Arb for what they leave), and
    ``escalated`` how many entries the large path computed again in Arb.  ``notes`` says what a reader of the
    values should know beyond them.  ``known[name]`` (a Known) holds what a step's strings are made from.
    """

    def __init__(self, spec, digits, engine, graph, names, bits):
        self.spec = spec
        self.digits = digits
        self.engine = engine  # the engine's name
        self.graph = graph
        self.bits = bits  # the highest working precision used
        self._names = names
        self.known: dict = {}  # name -> Known
        self._matrices: dict = {}
        self._decider = None
        self._seen: dict = {}  # id(ball) -> (string, exact): equal balls (shared scores) are converted once
        self._shapes = {s.name: s.shape for s in graph.steps + graph.backward_steps}
        self.method = "balls"  # or "intervals": float64 enclosures, Arb for the rest (the large path)
        self.escalated = 0  # on the large path, the entries computed again in Arb
        self.enclosed: set = set()  # (name, i, j) given the digits their float64 enclosure proves (large path)
        self.unsettled: set = set()  # (name, i, j) that no precision certified a digit of: printed as bounds

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def save(self, path) -> None:
        """Write the truth to a ``.npz`` file (atomically; plain arrays, no pickle), from which
        ``symattn.verify(..., truth=path)`` and ``symattn verify --truth`` read it back for the same spec.

        >>> import tempfile, pathlib, symattn
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "truth.npz"
        >>> symattn.evaluate("notebook", digits=20, steps=["M"]).save(path)
        >>> symattn.truth.load(path, "notebook")["M"].values[0][0]
        '6.9433358564932463888'
        """
        from symattn.truth import store

        store.save(self, path)

    @property
    def steps(self) -> dict:
        return {name: self[name] for name in self._names}

    def __getitem__(self, name: str) -> CertifiedMatrix:
        if name not in self._names:
            raise SymattnError(f"step: expected one of {', '.join(self._names)}, received {name!r}")
        if name not in self._matrices:
            self._matrices[name] = CertifiedMatrix(self, name, self._shapes[name])
        return self._matrices[name]

    def __iter__(self):
        return (self[name] for name in self._names)

    # Decimal strings, on demand.
    def _strings(self, name: str):
        known = self.known[name]
        if known.texts is not None:
            return known.texts
        rows, cols = self._shapes[name]
        digits = self.digits
        if known.mid is not None:
            from symattn.backends.intervals import strings

            zero = (known.mid == 0) & (known.rad == 0)
            texts = strings(np.where(known.ok, known.mid, 0.0), digits)
            exact = zero.reshape(-1).tolist()
            for k in np.flatnonzero(zero).tolist():
                texts[k] = "0"
        elif known.exact is not None:
            den = known.exact.den
            texts = [certify.exact_string((n, den), digits) for n in known.exact.num.reshape(-1).tolist()]
            exact = [True] * len(texts)
        else:
            engine = engine_class(self.engine)(self.bits)
            seen = self._seen
            flat = known.balls.reshape(-1).tolist()
            distinct = {id(b): b for b in flat if id(b) not in seen}  # each distinct ball converted once, in a batch
            for ball, text in zip(distinct.values(), engine.strings(list(distinct.values()), digits), strict=True):
                seen[id(ball)] = (text, False)
            texts, exact = [None] * len(flat), [False] * len(flat)
            for k, ball in enumerate(flat):
                text, is_exact = seen[id(ball)]
                if text is None and (known.excluded is None or not known.excluded.reshape(-1)[k]):
                    i, j = divmod(k, cols)
                    if (i, j) not in known.decided:
                        text = ball_string(engine, ball, digits)
                        exact_ball = engine.is_exact(ball)  # an exact ball (a masked weight's 0) is a decided value
                        text, is_exact = (text, exact_ball) if text is not None else self._escalate(name, i, j)
                        seen[id(ball)] = (text, is_exact)
                texts[k], exact[k] = text, is_exact
        certified = [digits] * len(texts)
        if known.excluded is not None:
            for k in np.flatnonzero(known.excluded.reshape(-1)).tolist():
                texts[k], exact[k], certified[k] = "-inf", True, 0
        for (i, j), text in known.decided.items():
            k = i * cols + j
            texts[k], exact[k] = text, (i, j) not in known.bounds and (i, j) not in known.fewer
            if text == "nan" or text.startswith("<"):
                certified[k] = 0
            elif (i, j) in known.fewer:
                certified[k] = known.fewer[i, j][0]
        for k, text in enumerate(texts):
            if text == "nan":
                certified[k] = 0

        def grid(values):
            return tuple(tuple(values[r * cols : (r + 1) * cols]) for r in range(rows))

        return grid(texts), grid(certified), grid(exact)

    def _escalate(self, name, i, j) -> tuple[str, bool]:
        """An enclosure that straddles a rounding boundary: the exact form, else more precision for this
        entry alone (its row of the forward computation, or the whole backward one)."""
        digits = self.digits
        known = self.known[name]
        engine = engine_class(self.engine)(self.bits)

        def side(sign_of):
            ends = engine.decimal(known.balls[i, j], digits)
            if ends is None:
                return None
            lo, hi, e = ends
            return certify.settle_by_side(lo, hi, e, digits, sign_of)

        return self._settle_entry(
            name, i, j,
            lambda engine, ball: ball_string(engine, ball, digits),
            lambda value: exact_text(value, digits),
            f"{digits} digits",
            side,
            lambda engine, ball: self.fewer(name, i, j, engine, ball),
        )  # fmt: skip

    def fewer(self, name: str, i: int, j: int, engine, ball) -> str:
        """An entry that no precision within the limits certifies to the digits asked (an exact rounding tie
        whose exact form is out of reach at this size): as many digits as its enclosure does certify, or a
        bound, never a digit that is not proven; ``notes`` counts these entries."""
        known = self.known[name]
        text, digits = _fewest(engine, ball, self.digits)
        known.decided[i, j] = text
        if digits:
            known.fewer[i, j] = digits, engine.mid_float(ball)
        else:
            known.bounds.add((i, j))
            self.unsettled.add((name, i, j))
        return text

    @property
    def notes(self) -> list[str]:
        """What a reader of the values should know beyond them: entries certified to fewer digits than asked."""
        every = [(name, i, j, d) for name, known in self.known.items() for (i, j), (d, _) in known.fewer.items()]
        notes = []
        fewer = [cell for cell in every if cell[:3] not in self.enclosed]
        if fewer:
            name, i, j, d = fewer[0]
            notes.append(
                f"{len(fewer)} entries certified to fewer than {self.digits} digits: their enclosures straddle a "
                f"rounding boundary at the highest precision tried and their exact forms did not decide them (e.g. "
                f"{name}[{i}, {j}], {d} digits)"
            )
        enclosed = [cell for cell in every if cell[:3] in self.enclosed]
        if enclosed:
            name, i, j, d = enclosed[0]
            notes.append(
                f"{len(enclosed)} entries of gradients summed over every query row certified to fewer than "
                f"{self.digits} digits: the digits their float64 enclosures prove (they cancel; Arb would compute "
                f"the whole graph again at this size) (e.g. {name}[{i}, {j}], {d} digits)"
            )
        if self.unsettled:
            name, i, j = min(self.unsettled)
            notes.append(
                f"{len(self.unsettled)} entries with no certified digit, given as bounds: no precision tried settled "
                f"them and their exact forms did not decide them (e.g. {name}[{i}, {j}] = "
                f"{self.known[name].decided[i, j]})"
            )
        return notes

    def _settle_entry(self, name, i, j, settle, settle_exact, what: str, side=None, fallback=None):
        """(result, decided exactly): settle(engine, ball) at rising precision, or settle_exact(value) of the
        exact form; ``side(boundary_sign)`` settles an entry that straddles one rounding boundary once the
        exact form tells which side of the boundary it is on; ``fallback(engine, ball)``, when given, settles
        what the highest precision leaves (else that is an error)."""
        value = self.decide(name, i, j)
        if value is not None:
            return settle_exact(value), True
        if side is not None:
            result = side(lambda boundary: self.side_of(name, i, j, boundary))
            if result is not None:
                return result, False
        bits = self.bits
        last = None
        while last is None or bits < MAX_ESCALATION:  # an irrational value may sit extremely close to a tie:
            # keep doubling up to the limit (once past it when the truth's own precision is there already)
            bits = min(2 * bits, MAX_ESCALATION) if bits < MAX_ESCALATION else 2 * bits
            log.debug("raising precision to %d bits for %s[%d, %d], just at a rounding boundary", bits, name, i, j)
            engine = engine_class(self.engine)(bits)
            with engine.active():
                last = (engine, _recompute(self, name, i, j, engine))
                result = settle(*last)
            if result is not None:
                self.bits = max(self.bits, bits)
                return result, False
        if fallback is not None and last is not None:
            with last[0].active():
                return fallback(*last), False
        raise SymattnError(
            f"{name}[{i}, {j}]: could not certify {what} at up to {bits} bits of precision "
            "(1 entries undecided); ask for fewer digits"
        )

    def fixed(self, name: str, i: int, j: int, places: int):
        """The entry rounded to ``places`` decimals (half to even), as the integer q with value ≈ q·10**-places,
        certified; "nan" or "-inf" for those entries."""
        self[name]  # checks the name
        known = self.known[name]
        if known.excluded is not None and known.excluded[i, j]:
            return "-inf"
        if (i, j) in known.decided:
            text = known.decided[i, j]
            if text == "nan":
                return "nan"
            value = self.decide(name, i, j)
            if value is not None:  # decided from its exact form; else (a bound, fewer digits, settled from an
                return value if value == "nan" else certify.round_places(value, places)  # enclosure): below
        if known.exact is not None:
            return certify.round_places((known.exact.num[i, j], known.exact.den), places)
        if known.mid is not None:
            mid, rad = float(known.mid[i, j]), float(known.rad[i, j])
            lo, hi = np.nextafter(mid - rad, -np.inf), np.nextafter(mid + rad, np.inf)
            if math.isfinite(lo) and math.isfinite(hi):
                a = certify.round_places(Fraction(float(lo)), places)
                if a == certify.round_places(Fraction(float(hi)), places):
                    return a

        def settle(engine, ball):
            if engine.is_nan(ball):
                return "nan"
            ends = rounded_ends(engine, ball, self.digits, places)
            if ends is None:
                return None
            a, b = ends
            return a if a == b and a is not None else None

        engine = engine_class(self.engine)(self.bits)
        if known.balls is not None:
            result = settle(engine, known.balls[i, j])
            if result is not None:
                return result

        def side(sign_of):
            if known.balls is None:
                return None
            ends = rounded_ends(engine, known.balls[i, j], self.digits, places)
            if ends is None:
                return None
            a, b = ends
            if a is None or b is None or b != a + 1:
                return None
            sign = sign_of(Fraction(2 * a + 1, 2 * 10**places))  # the boundary between the two neighbours
            return None if not sign else (b if sign > 0 else a)

        result, _ = self._settle_entry(
            name, i, j, settle, lambda v: v if v == "nan" else certify.round_places(v, places), f"{places} decimals",
            side,
        )  # fmt: skip
        return result

    def side_of(self, name: str, i: int, j: int, boundary: Fraction) -> int | None:
        """The sign of (entry - boundary), proven from the entry's exact form, or None."""
        if self._decider is None:
            self._decider = Decider(self.spec, self.graph)
        return self._decider.side(name, i, j, boundary, self.bits)

    def decide(self, name: str, i: int, j: int):
        """The entry's exact value when its exact form is a constant (a Fraction, or "nan"), else None."""
        if self._decider is None:
            self._decider = Decider(self.spec, self.graph)
        return self._decider(name, i, j)


def rounded_ends(engine, ball, digits: int, places: int) -> tuple | None:
    """Both ends of a ball rounded to ``places`` decimals (integers q, value ≈ q·10**-places), or None: from
    the digits those need first (``_digits_for_places``), and from every digit the precision carries when
    that straddles a boundary (raising the precision then settles it)."""
    result = None
    for convert in (_digits_for_places(engine, ball, digits, places), None):
        ends = engine.decimal(ball, digits, convert)
        if ends is None:
            return None
        lo, hi, e = ends
        result = certify.round_scaled(lo, e, places), certify.round_scaled(hi, e, places)
        if result[0] == result[1] and result[0] is not None:
            return result
    return result


def _digits_for_places(engine, ball, digits: int, places: int) -> int | None:
    """How many digits to convert a ball at to round it to ``places`` decimals: those before the point, the
    places and 40 more (at least digits + 5; a value nearer a boundary than that is converted whole, by
    ``fixed``), and never more than the working precision carries.  A ball of
    4 million bits (an exact sum like 1 + 2**-4194304) converted whole has 1.26 million digits, and Python
    turns those into text in quadratic time: a value of magnitude 10**-1262550 rounds to 0 at 63 places from
    its first digits alone."""
    ends = engine.decimal(ball, digits, 5)
    if ends is None:
        return None
    lo, hi, e = ends
    before = max(len(str(abs(lo))), len(str(abs(hi)))) + e  # digits before the point (negative: zeros after it)
    return max(digits + 5, min(before + places + 40, int(engine.bits * 0.30103) + 2))


def exact_text(value, digits: int) -> str:
    """The string of an exact value (a Fraction, or "nan") to ``digits`` significant digits."""
    return "nan" if value == "nan" else certify.exact_string(value, digits)


def _fewest(engine, ball, digits: int) -> tuple[str, int]:
    """(text, digits certified): the most digits below ``digits`` that the ball certifies, or a bound "<1e-N"
    (0 digits) when none does."""
    for fewer in range(digits - 1, 0, -1):
        ends = engine.decimal(ball, fewer)
        text = None if ends is None else certify.certified_decimal(*ends, fewer)
        if text is not None:
            return text, fewer
    ends = engine.decimal(ball, digits)
    return ("nan" if ends is None else certify.bound_string(*ends)), 0


def ball_string(engine, ball, digits: int) -> str | None:
    """The certified string of a ball, or None.  Converted at digits + 5 first (cheap), then at the working
    precision's digits, so that an enclosure narrowed by more precision can settle."""
    ends = engine.decimal(ball, digits, digits + 5)
    if ends is None:
        return "nan" if engine.is_nan(ball) else None
    text = certify.certified_decimal(*ends, digits)
    if text is None:
        ends = engine.decimal(ball, digits)
        text = certify.certified_decimal(*ends, digits)
    return text


def _recompute(truth: Truth, name: str, i: int, j: int, engine):
    """Entry (i, j) of step ``name`` as a ball of ``engine`` (inside its ``active()``)."""
    spec, graph = truth.spec, truth.graph
    xp = BallXP(engine)
    step = graph.step(name)
    if step.row_local:
        g = build_graph(spec, rows=[i] if graph.rows is None else [graph.rows[i]])
        value = g.values(xp, [name])[name]
        row = 0
    else:
        values = graph.forward(xp)
        value = graph.backward(xp, values, graph.douts(xp))[name] if step.backward else values[name]
        row = i
    return ball_at(xp, value, row, j)


def ball_at(xp: BallXP, value, i: int, j: int):
    """Entry (i, j) of a step's value in ``xp`` as a ball (a rational entry as the ball of that rational)."""
    if isinstance(value, RatMat):
        return xp.engine.rational(value.num[i, j], value.den)
    return xp.balls(value).values[i, j]
