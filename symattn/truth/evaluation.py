"""Certified ground truth: every step of the graph in ball arithmetic, every printed digit proven.

``evaluate`` runs the op graph (``graph.py``) in the ball backend
(``balls.py``), forward and, with ``grad``, backward.  Precision rises until
every entry's enclosure is accurate enough for the digits asked; an entry that
does not get there is asked of its exact form (``exact.py``), which settles the
rational ones (zero, or a short decimal on a rounding boundary, which no ball
can prove).  Decimal strings are made when they are read: each is printed with
d digits only when both ends of the enclosure round to the same d digits
(``certify.py``); a rare enclosure that straddles a rounding boundary at that
moment is recomputed at a higher precision, for that entry's row alone.

What is printed: certified digits; "0" for an exact zero; "-inf" for a masked
score (not a number: excluded); "nan" for an empty row under ``empty_row
"nan"``; and "<1e-N" (|x| < 10**-N, 0 certified digits) for an entry whose
enclosure still contains zero when the precision budget is spent and the exact
form cannot decide it.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

from symattn import certify
from symattn.backends.balls import Balls, BallXP
from symattn.backends.engines import ArbEngine as ArbEngine_
from symattn.backends.engines import engine_class
from symattn.backends.rational import Lin
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.matrix import RatMat
from symattn.progress import Progress

log = logging.getLogger("symattn")

MAX_DIGITS = 100_000
GUARD_BITS = 32
MAX_RISES = 5  # precision doubles at most this often before giving up
MAX_BITS = 1 << 22  # the working precision never exceeds this (about 1.26 million digits)
MAX_ESCALATION = 1 << 16  # one entry just off a rounding tie is recomputed (its row alone) up to this precision
EXACT_LIMIT = 200_000  # exact decisions only for graphs with at most this many score entries
WHOLE_EXACT_LIMIT = 4096  # and of K, V and the weights' and keys' gradients (the whole graph's exact form)
ACCURACY_MARGIN = 6  # bits of relative accuracy beyond the digits asked, so that most entries certify at once


def check_digits(digits) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise SymattnError(f"digits: expected an integer from 1 to {MAX_DIGITS}, received {digits!r}")
    return digits


class CertifiedMatrix:
    """One step's certified values.  ``values`` are decimal strings, every digit proven (made on first use);
    indexing gives a Decimal where the decimal module can hold the exponent, else the string."""

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
        known = self._truth._known.get(self.name)
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
        known = self._truth._known.get(self.name)
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
        known = self._truth._known.get(self.name)
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


class _Known:
    """What is known of one step's entries: exact rationals or balls (whole arrays), masked entries, and the
    entries settled otherwise (exact decisions, "nan", bounds) by (i, j)."""

    __slots__ = ("exact", "balls", "excluded", "decided", "bounds", "fewer", "mid", "rad", "ok")

    def __init__(self, exact=None, balls=None, excluded=None, mid=None, rad=None, ok=None):
        self.exact = exact  # RatMat or None
        self.balls = balls  # object array of balls or None
        self.excluded = excluded  # bool array or None
        self.mid, self.rad = mid, rad  # float64 enclosures (the large path), or None
        self.ok = ok  # bools: the enclosures that certify the digits asked (strings from mid)
        self.decided: dict = {}  # (i, j) -> string
        self.bounds: set = set()  # (i, j) of the decided strings that are bounds, not values
        self.fewer: dict = {}  # (i, j) -> (digits certified, the enclosure's float midpoint) for decided strings
        # with fewer digits than asked


class Truth:
    """Certified values of the steps of a spec's trace."""

    def __init__(self, spec, digits, engine, graph, names, bits):
        self.spec = spec
        self.digits = digits
        self.engine = engine  # the engine's name
        self.graph = graph
        self.bits = bits  # the highest working precision used
        self._names = names
        self._known: dict = {}  # name -> _Known
        self._matrices: dict = {}
        self._decider = None
        self._seen: dict = {}  # id(ball) -> (string, exact): equal balls (shared scores) are converted once
        self._asked: set = set()  # entries whose exact form was asked already
        self._shapes = {s.name: s.shape for s in graph.steps + graph.backward_steps}
        self.method = "balls"  # or "intervals": float64 enclosures, Arb for the rest (the large path)
        self.escalated = 0  # on the large path, the entries computed again in Arb

    @property
    def names(self) -> list[str]:
        return list(self._names)

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
        known = self._known[name]
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
                        text = _ball_string(engine, ball, digits)
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
        known = self._known[name]
        engine = engine_class(self.engine)(self.bits)

        def side(sign_of):
            ends = engine.decimal(known.balls[i, j], digits)
            if ends is None:
                return None
            lo, hi, e = ends
            return certify.settle_by_side(lo, hi, e, digits, sign_of)

        return self._settle_entry(
            name, i, j,
            lambda engine, ball: _ball_string(engine, ball, digits),
            lambda value: _exact_text(value, digits),
            f"{digits} digits",
            side,
            lambda engine, ball: self.fewer(name, i, j, engine, ball),
        )  # fmt: skip

    def fewer(self, name: str, i: int, j: int, engine, ball) -> str:
        """An entry that no precision within the limits certifies to the digits asked (an exact rounding tie
        whose exact form is out of reach at this size): as many digits as its enclosure does certify, or a
        bound, never a digit that is not proven; ``notes`` counts these entries."""
        known = self._known[name]
        text, digits = fewest(engine, ball, self.digits)
        known.decided[i, j] = text
        if digits:
            known.fewer[i, j] = digits, engine.mid_float(ball)
        else:
            known.bounds.add((i, j))
        return text

    @property
    def notes(self) -> list[str]:
        """What a reader of the values should know beyond them: entries certified to fewer digits than asked."""
        fewer = [(name, i, j, d) for name, known in self._known.items() for (i, j), (d, _) in known.fewer.items()]
        if not fewer:
            return []
        name, i, j, d = fewer[0]
        return [
            f"{len(fewer)} entries certified to fewer than {self.digits} digits: their enclosures straddle a "
            f"rounding boundary at the highest precision tried and their exact forms did not decide them (e.g. "
            f"{name}[{i}, {j}], {d} digits)"
        ]

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
        saved = _flint_precision()
        last = None
        try:
            while bits < MAX_ESCALATION:  # an irrational value may sit extremely close to a tie: keep doubling
                bits = min(2 * bits, MAX_ESCALATION)
                log.debug("raising precision to %d bits for %s[%d, %d], just at a rounding boundary", bits, name, i, j)
                ball = _recompute(self, name, i, j, bits)
                last = (engine_class(self.engine)(bits), ball)
                result = settle(*last)
                if result is not None:
                    self.bits = max(self.bits, bits)
                    return result, False
            if fallback is not None and last is not None:
                return fallback(*last), False
        finally:
            _restore_precision(saved)
        raise SymattnError(
            f"{name}[{i}, {j}]: could not certify {what} at up to {bits} bits of precision "
            "(1 entries undecided); ask for fewer digits"
        )

    def fixed(self, name: str, i: int, j: int, places: int):
        """The entry rounded to ``places`` decimals (half to even), as the integer q with value ≈ q·10**-places,
        certified; "nan" or "-inf" for those entries."""
        self[name]  # checks the name
        known = self._known[name]
        if known.excluded is not None and known.excluded[i, j]:
            return "-inf"
        if (i, j) in known.decided:
            text = known.decided[i, j]
            if text == "nan":
                return "nan"
            value = self.decide(name, i, j)
            return value if value is not None and value == "nan" else certify.round_places(value, places)
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
            ends = engine.decimal(ball, self.digits)
            if ends is None:
                return None
            lo, hi, e = ends
            a, b = certify.round_scaled(lo, e, places), certify.round_scaled(hi, e, places)
            return a if a == b and a is not None else None

        engine = engine_class(self.engine)(self.bits)
        if known.balls is not None:
            result = settle(engine, known.balls[i, j])
            if result is not None:
                return result

        def side(sign_of):
            if known.balls is None:
                return None
            ends = engine.decimal(known.balls[i, j], self.digits)
            if ends is None:
                return None
            lo, hi, e = ends
            a, b = certify.round_scaled(lo, e, places), certify.round_scaled(hi, e, places)
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
            self._decider = _Decider(self.spec, self.graph)
        return self._decider.side(name, i, j, boundary, self.bits)

    def decide(self, name: str, i: int, j: int):
        """The entry's exact value when its exact form is a constant (a Fraction, or "nan"), else None."""
        if self._decider is None:
            self._decider = _Decider(self.spec, self.graph)
        return self._decider(name, i, j)


def _exact_text(value, digits: int) -> str:
    return "nan" if value == "nan" else certify.exact_string(value, digits)


def fewest(engine, ball, digits: int) -> tuple[str, int]:
    """(text, digits certified): the most digits below ``digits`` that the ball certifies, or a bound "<1e-N"
    (0 digits) when none does."""
    for fewer in range(digits - 1, 0, -1):
        ends = engine.decimal(ball, fewer)
        text = None if ends is None else certify.certified_decimal(*ends, fewer)
        if text is not None:
            return text, fewer
    ends = engine.decimal(ball, digits)
    return ("nan" if ends is None else certify.bound_string(*ends)), 0


def _ball_string(engine, ball, digits: int) -> str | None:
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


def _recompute(truth: Truth, name: str, i: int, j: int, bits: int):
    """Entry (i, j) of step ``name`` as a ball at ``bits``."""
    spec, graph = truth.spec, truth.graph
    engine = engine_class(truth.engine)(bits)
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
    return _ball_at(xp, value, row, j)


def _ball_at(xp: BallXP, value, i: int, j: int):
    if isinstance(value, RatMat):
        return xp._rational(value.num[i, j], value.den)
    return xp.balls(value).values[i, j]


class _Decider:
    """Exact values of entries, from the exact backend on the smallest graph that holds them: the entry's
    query row for forward steps, the whole computation for K, V and backward steps."""

    def __init__(self, spec, graph):
        self.spec = spec
        self.graph = graph
        self.rows: dict = {}
        self.whole = None
        size = spec.h * spec.L * spec.S
        self.enabled = size <= EXACT_LIMIT
        self.whole_enabled = size <= WHOLE_EXACT_LIMIT

    def _row(self, i: int, backward: bool):
        """The exact backend's values on query row i's graph (forward steps, and backward ones if asked)."""
        from symattn.backends.exact import ExactXP

        row = i if self.graph.rows is None else self.graph.rows[i]
        if row not in self.rows:
            g = build_graph(self.spec, rows=[row])
            xp = ExactXP()
            self.rows[row] = (xp, g, g.forward(xp, keep=[n.name for n in g.nodes]), False)
        xp, g, values, has_backward = self.rows[row]
        if backward and not has_backward:
            local = [s.name for s in g.backward_steps if s.row_local]
            values.update(g.backward(xp, values, g.douts(xp), local))
            self.rows[row] = (xp, g, values, True)
        return xp, values

    def __call__(self, name, i, j):
        if not self.enabled:
            return None
        from symattn.backends.exact import ExactXP

        step = self.graph.step(name)
        try:
            if step.row_local:
                xp, values = self._row(i, step.backward)
                return xp.alg.value(xp.entry(values[name], 0, j))
            if not self.whole_enabled:
                return None
            if self.whole is None:
                xp = ExactXP()
                values = self.graph.forward(xp)
                grads = self.graph.backward(xp, values, self.graph.douts(xp)) if step.backward else {}
                self.whole = (xp, {**values, **grads})
            xp, values = self.whole
            if name not in values:  # forward-only whole graph, asked later for a backward step
                grads = self.graph.backward(xp, values, self.graph.douts(xp))
                values.update(grads)
            return xp.alg.value(xp.entry(values[name], i, j))
        except (RecursionError, MemoryError):
            return None

    def side(self, name, i, j, boundary: Fraction, bits: int) -> int | None:
        """The sign of (entry - boundary) from the exact form's value, evaluated monomial by monomial."""
        if not self.enabled or self(name, i, j) is not None:  # computes the exact form (and is no constant)
            return None
        step = self.graph.step(name)
        if step.row_local:
            xp, values = self._row(i, step.backward)
            element = xp.entry(values[name], 0, j)
        elif self.whole is not None:
            xp, values = self.whole
            element = xp.entry(values[name], i, j)
        else:
            return None
        difference = xp.alg.add(element, xp.alg.const(boundary), -1)
        for precision in (bits, 4 * bits, 16 * bits):
            try:
                ball = xp.alg.ball(difference, max(precision, 128))
            except (ValueError, ZeroDivisionError, _too_big()):
                return None
            if ball > 0:
                return 1
            if ball < 0:
                return -1
        return None


# The precision loop.


def initial_bits(spec, digits: int, exact=None) -> int:
    """Enough bits for ``digits`` digits plus the magnitude of the largest score (an exponent's absolute
    error is its relative error times its size)."""
    return math.ceil(digits * math.log2(10)) + GUARD_BITS + max(0, _score_bits(spec))


def _score_bits(spec) -> int:
    """log2 of a bound on |score|: |scale|·d_k·max|q|·max|k| + max|bias| + max|slope|·S (from log bounds)."""

    def log2_max(m) -> float:
        if m.is_float:
            top = float(np.abs(m.float64()).max())
            return math.log2(top) if top > 0 else -math.inf
        best = -math.inf
        for row in m.rows:
            for e in row:
                best = max(best, _log2_abs(e))
        return best

    def log2_product(a, b, n) -> float:
        return a + b + math.log2(n)

    if spec.form == "kernel":
        q = max(log2_max(m) for m in spec.q)
        k = max(log2_max(m) for m in spec.k)
    else:
        x = log2_max(spec.x)
        x_kv = x if spec.x_kv is None else log2_max(spec.x_kv)
        q = max(log2_product(x, log2_max(h.wq), spec.d_model) for h in spec.heads)
        k = max(log2_product(x_kv, log2_max(h.wk), spec.d_model_kv) for h in spec.kv_heads)
        q = max([q] + [log2_max(h.bq) for h in spec.heads if h.bq is not None]) + 1
        k = max([k] + [log2_max(h.bk) for h in spec.kv_heads if h.bk is not None]) + 1
    total = _log2_abs(spec.effective_scale) + log2_product(q, k, spec.d_k)
    if spec.bias is not None:
        total = max(total, max(log2_max(m) for m in spec.bias)) + 1
    if spec.alibi_slopes is not None:
        total = max(total, max(_log2_abs(s) for s in spec.alibi_slopes) + math.log2(spec.S + spec.L)) + 1
    return 0 if not math.isfinite(total) else int(math.ceil(total)) + 2


def _log2_abs(e) -> float:
    if isinstance(e, Fraction):
        if not e:
            return -math.inf
        return e.numerator.bit_length() - e.denominator.bit_length() + 1  # an upper bound
    from symattn.entries import ball

    b = ball(e, 64)
    top = b.abs_upper()
    return float(top.log() / ball(Fraction(2), 64).log()) + 1 if top > 0 else -math.inf


def evaluate(
    spec,
    digits: int = 50,
    engine: str = "auto",
    progress: bool | None = None,
    steps=None,
    grad: bool = False,
) -> Truth:
    """The trace's steps, each entry to ``digits`` certified significant digits.

    >>> truth = evaluate("notebook", digits=20)
    >>> truth["M"].values[0][0]
    '6.9433358564932463888'

    ``spec`` is a built-in name, a spec file path, a dict or an AttentionSpec.  ``engine`` is ``"arb"``
    (python-flint's balls), ``"mpmath"`` (interval arithmetic, slower) or ``"auto"`` (Arb).  ``steps``
    limits the work to those steps (and what they need); ``grad`` adds the backward steps (the gradients
    of the sum of the outputs, or of the spec's ``dout``).  ``progress`` shows progress on stderr for
    evaluations longer than a second: None (default) only when stderr is a terminal.
    """
    from symattn.spec import load_spec

    spec = load_spec(spec)
    digits = check_digits(digits)
    engine_name = engine_class(engine).name
    if spec.symbols:
        raise SymattnError(
            f"spec {spec.display_name}: evaluation needs numbers, received the symbols {', '.join(spec.symbols)}; "
            "use 'symattn show' for closed forms in symbols"
        )
    graph = build_graph(spec)
    forward_names = [s.name for s in graph.steps]
    backward_names = [s.name for s in graph.backward_steps] if grad or _asks_backward(steps, graph) else []
    every = forward_names + backward_names
    if steps is None:
        names = every
    else:
        names = list(steps)
        for name in names:
            if name not in every:
                known = every if grad else forward_names
                raise SymattnError(f"step: expected one of {', '.join(known)}, received {name!r}")
    bits = initial_bits(spec, digits)
    if bits > MAX_BITS:
        raise SymattnError(
            f"digits: {digits} digits of this spec need {bits} bits of working precision (its scores reach about "
            f"2**{_score_bits(spec)}), more than the limit of {MAX_BITS}; ask for fewer digits or smaller inputs"
        )
    Engine = engine_class(engine_name)
    report = Progress(progress)
    if large(spec, digits, engine, names, graph):
        try:
            return _evaluate_large(spec, digits, graph, names, bits, report)
        finally:
            report.close()
    needed = math.ceil(digits * math.log2(10)) + ACCURACY_MARGIN
    forward_wanted = [n for n in names if n in forward_names]
    backward = bool(backward_names) and any(n in backward_names for n in names)
    truth = Truth(spec, digits, engine_name, graph, names, bits)
    pending = {name: None for name in names}  # name -> list of undecided (i, j), None before the first pass
    saved = _flint_precision()
    try:
        for rise in range(MAX_RISES + 1):
            report(f"{engine_name} at {bits} bits: computing")
            xp = BallXP(Engine(bits))
            if rise and all(graph.step(name).row_local for name, cells in pending.items() if cells):
                _recollect_rows(truth, pending, xp, needed)  # only the rows of the entries left: far cheaper
            else:
                values = graph.forward(xp, forward_names if backward else forward_wanted)
                if backward:
                    wanted = [n for n in names if n in backward_names]
                    values.update(graph.backward(xp, values, graph.douts(xp), wanted))
                done, total = 0, sum(len(c) if c is not None else 0 for c in pending.values())
                for name in names:
                    report(f"{engine_name} at {bits} bits: checking", done, total)
                    _collect(truth, name, values[name], xp, pending, needed)
                    done += len(pending[name])
            undecided = [(name, i, j) for name, cells in pending.items() for i, j in cells]
            # still too wide: ask the exact form (a rational never certifies by enclosures), once per entry: a
            # possible zero of a forward step at once (its row's exact form is cheap), any other possible zero
            # once precision has risen twice, and every entry left at the last chance (a rational on a rounding
            # tie); most entries are merely cancelling, and more precision settles them sooner
            left = []
            engine = xp.engine
            final = rise == MAX_RISES or 2 * bits > MAX_BITS
            for name, i, j in undecided:
                step = graph.step(name)
                zero = engine.contains_zero(truth._known[name].balls[i, j])
                ask = final or (zero and (rise >= 2 or (step.row_local and not step.backward)))
                if (name, i, j) in truth._asked or not ask:
                    left.append((name, i, j))
                    continue
                truth._asked.add((name, i, j))
                value = truth.decide(name, i, j)
                if value is None:
                    left.append((name, i, j))
                else:
                    truth._known[name].decided[i, j] = _exact_text(value, digits)
            pending = {name: [] for name in names}
            for name, i, j in left:
                pending[name].append((i, j))
            if not left or rise == MAX_RISES or 2 * bits > MAX_BITS:
                break
            log.debug(
                "raising precision from %d to %d bits: %d entries not yet certified, e.g. %s[%d, %d]",
                bits,
                2 * bits,
                len(left),
                *left[0],
            )
            bits *= 2
            truth.bits = bits
    finally:
        _restore_precision(saved)
        report.close()
    truth.bits = bits
    for name, cells in pending.items():
        known = truth._known[name]
        for i, j in cells:
            ends = Engine(bits).decimal(known.balls[i, j], digits)
            if ends is not None and ends[0] <= 0 <= ends[1]:
                # the budget is spent and the exact form cannot decide: a bound, never a digit
                known.decided[i, j] = certify.bound_string(*ends)
                known.bounds.add((i, j))
            # else its string, made when read, goes on rising for that entry alone (``_escalate``), and settles
            # for fewer digits only if that fails too
    return truth


LARGE = 1 << 16  # score entries (H·L·S) from which 15 digits or fewer come from float64 enclosures
FLOAT_DIGITS = 15  # the most digits the float64 enclosures are asked for
NEAR_ZERO = 1e-15  # an entry whose enclosure stays below this × the step's largest |entry| may be a bound


def large(spec, digits: int, engine: str, names, graph) -> bool:
    """Whether ``evaluate`` takes the large path: float64 enclosures of whole matrices (``intervals.py``),
    Arb for the entries they do not certify.  For the forward steps of specs of at least LARGE score
    entries, FLOAT_DIGITS digits or fewer, and the default engine."""
    backward = {s.name for s in graph.backward_steps}
    return (
        engine == "auto"
        and digits <= FLOAT_DIGITS
        and spec.h * spec.L * spec.S >= LARGE
        and not any(name in backward for name in names)
    )


BLOCK = 1 << 17  # score entries per head in one block of query rows on the large path
ESCALATION_BITS = 128  # Arb's first precision for what the enclosures (relative error about 2**-62) left:
# entries near a rounding boundary or cancelling, from double-float products good to about 2**-100


def _blocks(spec, L: int) -> list:
    """(rows, keys) blocks of the large path: query rows in blocks of about BLOCK score entries per head, each
    with only the keys some of its queries may attend to (the kernel form; all of them else)."""
    size = max(1, BLOCK // max(spec.S, 1))
    out = []
    for start in range(0, L, size):
        rows = list(range(start, min(L, start + size)))
        keys = None
        if spec.form == "kernel":
            allowed = np.zeros(spec.S, dtype=bool)
            empty = False
            for i in range(spec.h):
                a = spec.allowed(i)[start : start + size]
                allowed |= a.any(axis=0)
                empty |= not a.any(axis=1).all()
            if not allowed.all() and not (empty and spec.empty_row != "zero"):
                keys = np.flatnonzero(allowed).tolist()
        out.append((rows, keys))
    return out


def _evaluate_large(spec, digits: int, graph, names, bits: int, report) -> Truth:
    """The large path: every step enclosed in double-float intervals (vectorized, ``intervals.py``), by blocks
    of query rows (and of the keys they may see); the enclosures that certify the digits kept as they are
    (strings made when read), the others settled from their exact double-float ends, near-zeros below
    NEAR_ZERO × the step's scale given as bounds, and every entry left computed again in Arb on its query row
    (a step that is not row-local on the whole graph), with precision doubling until it certifies."""
    from symattn.backends.intervals import enclose

    truth = Truth(spec, digits, "arb", graph, names, bits)
    truth.method = "intervals"
    local = [n for n in names if graph.step(n).row_local]
    whole = [n for n in names if n not in local]  # K and V of the projection form
    store = {}
    for name in names:
        step = graph.step(name)
        shape = step.shape
        store[name] = _Known(
            excluded=None if step.kind != "scores" or step.excluded is None else step.excluded.copy(),
            mid=np.full(shape, -np.inf if step.kind == "scores" else 0.0),
            rad=np.zeros(shape),
            ok=np.zeros(shape, dtype=bool),
        )
        truth._known[name] = store[name]
    blocks = _blocks(spec, spec.L)

    def compute(b: int):
        rows, keys = blocks[b]
        g = build_graph(spec, rows=rows, keys=keys) if len(blocks) > 1 or keys is not None else graph
        return enclose(g, local + (whole if b == 0 else []))

    for b, (rows, keys) in enumerate(blocks):
        report("float64 enclosures: query rows", rows[0], spec.L)
        for name, iv in compute(b).items():
            step = graph.step(name)
            _settle_block(store[name], iv, block_target(step, rows, keys), digits, rows if step.row_local else None)
    left = []

    for name in names:
        known = store[name]
        mid, rad = known.mid, known.rad
        nan = np.isnan(mid)
        rows = _nan_rows(spec, graph.step(name))
        nan &= False if rows is None else rows[:, None]  # any other nan (an enclosure that overflowed) goes to Arb
        for i, j in zip(*np.nonzero(nan), strict=True):
            known.decided[int(i), int(j)] = "nan"
        bad = ~known.ok & ~nan & ~((mid == 0) & (rad == 0))
        if known.excluded is not None:
            bad &= ~known.excluded
        for i, j in known.decided:
            bad[i, j] = False
        if not bad.any():
            continue
        finite = np.abs(mid[np.isfinite(mid)])
        scale = float(finite.max()) if finite.size else 0.0
        with np.errstate(invalid="ignore"):
            tiny = bad & (np.abs(mid) + rad <= NEAR_ZERO * scale)
        tiny_cells = _equal_values(truth, [(name, int(i), int(j)) for i, j in zip(*np.nonzero(tiny), strict=True)])
        for _, i, j in tiny_cells:  # a near-zero that is not exactly 0 by its equal values: a bound
            known.decided[i, j] = _bound_text(float(abs(mid[i, j]) + rad[i, j]))
            known.bounds.add((i, j))
        left += [(name, int(i), int(j)) for i, j in zip(*np.nonzero(bad & ~tiny), strict=True)]
    left = _equal_values(truth, left)
    truth.escalated = len(left)
    if left:
        log.debug("%d entries not certified by the enclosures: computed again in Arb", len(left))
        _settle_in_arb(truth, left, max(bits, ESCALATION_BITS), report)
    return truth


def _nan_rows(spec, step) -> np.ndarray | None:
    """Bools over a step's rows: those that are nan by the spec (empty rows under ``empty_row "nan"``: a head's
    weights and output, and every row of the steps that read all heads), or None when no row is."""
    if spec.empty_row != "nan" or step.backward or step.kind not in ("weights", "head", "concat_heads", "M"):
        return None
    heads = [step.head - 1] if step.kind in ("weights", "head") else range(spec.h)
    rows = np.zeros(spec.L, dtype=bool)
    for h in heads:
        rows |= ~spec.allowed(h).any(axis=1)
    return rows


def block_target(step, rows, keys):
    """Where a block's values of a step go in the whole step: its rows (and, for scores and weights, the keys it
    kept); all of a step that is not row-local (the block computed it whole)."""
    if not step.row_local:
        return slice(None), slice(None)
    if keys is not None and step.kind in ("scores", "weights"):
        return np.ix_(rows, keys)
    return np.array(rows), slice(None)


def _settle_block(known, iv, target, digits, rows) -> None:
    """One block's enclosures of a step into its _Known: midpoints, radii, which certify, and the exact strings
    of those that certify only from the exact double-float ends."""
    from symattn.backends.intervals import certifiable, exact_string

    mid, rad = iv.collapsed()
    ok = certifiable(mid, rad, digits)
    known.mid[target] = mid
    known.rad[target] = rad
    known.ok[target] = ok
    lo, full = iv.low(), iv.radius()
    bad = ~ok & np.isfinite(mid) & np.isfinite(iv.hi) & np.isfinite(lo) & np.isfinite(full)
    bad &= ~((mid == 0) & (rad == 0))
    if iv.excluded is not None:
        bad &= ~iv.excluded
    if not bad.any():
        return
    row_of = (lambda i: i) if rows is None else (lambda i: rows[i])
    columns = target[1].reshape(-1) if isinstance(target[1], np.ndarray) else None
    for i, j in zip(*np.nonzero(bad), strict=True):
        text = exact_string(float(iv.hi[i, j]), float(lo[i, j]), float(full[i, j]), digits)
        if text is not None:
            col = int(columns[j]) if columns is not None else int(j)
            known.decided[row_of(int(i)), col] = text


def _bound_text(top: float) -> str:
    """ "<1e-N" with 10**-N > top (a float upper bound of |x|)."""
    if top == 0:
        return "0"
    power = math.floor(math.log10(top)) + 1
    while 10.0**power <= top * (1 + 1e-15):  # log10 may be off by one near a power of ten
        power += 1
    return f"<1e{power:+d}" if power > 0 else f"<1e{power}"


def _settle_in_arb(truth: Truth, cells, bits: int, report) -> None:
    """Certified strings for the entries the enclosures did not settle: in Arb, row-local steps on their query
    rows' graphs (grouped by row), others on the whole graph, precision doubling up to LARGE_ESCALATION; after
    the first round, the
    entries left are asked of their rows' exact forms (a rounding tie, which no precision settles); what
    still straddles a rounding boundary at the last precision gets the digits it does certify (a note)."""
    digits = truth.digits
    start = bits
    nans: dict = {}

    def nan_rows(name):
        if name not in nans:
            rows = _nan_rows(truth.spec, truth.graph.step(name))
            nans[name] = np.zeros(truth.graph.step(name).shape[0], dtype=bool) if rows is None else rows
        return nans[name]

    # float products (double-float slices, good to 2**-100) for the first round, unless enclosures overflowed
    products = all(np.isfinite(truth._known[name].mid[i, j]) for name, i, j in cells)
    saved = _flint_precision()
    try:
        while cells:
            engine = ArbEngine_(bits)
            xp = BallXP(engine, floats=True, float_products=products and bits == start)
            by_step: dict = {}
            whole = []
            for name, i, j in cells:
                if truth.graph.step(name).row_local:
                    by_step.setdefault(name, {}).setdefault(i, []).append(j)
                else:
                    whole.append((name, i, j))
            balls = {}
            for name, by_row in by_step.items():  # one graph per step, of the rows left in it: one head's work
                report(f"arb at {bits} bits: {len(by_row)} query rows of {name}")
                rows = sorted(by_row)
                keys, columns = _restriction(truth.spec, truth.graph.step(name), rows, by_row)
                g = build_graph(truth.spec, rows=rows, keys=keys, value_columns=columns)
                value = g.forward(xp, [name])[name]
                for position, i in enumerate(rows):
                    for j in by_row[i]:
                        balls[name, i, j] = _ball_at(xp, value, position, j if columns is None else columns.index(j))
            if whole:
                report(f"arb at {bits} bits: the whole graph")
                all_values = truth.graph.forward(xp, sorted({name for name, _, _ in whole}))
                for name, i, j in whole:
                    balls[name, i, j] = _ball_at(xp, all_values[name], i, j)
            left = []
            for (name, i, j), ball in balls.items():
                known = truth._known[name]
                text = _ball_string(engine, ball, digits)
                if text == "nan" and not nan_rows(name)[i]:  # the first round's float products overflowed
                    text = None
                if text is not None:
                    known.decided[i, j] = text
                    continue
                ends = engine.decimal(ball, digits)
                if ends is not None and ends[0] <= 0 <= ends[1] and bits >= 4 * start:
                    known.decided[i, j] = certify.bound_string(*ends)  # still around zero: a bound
                    known.bounds.add((i, j))
                    continue
                left.append((name, i, j))
            if left and bits == start:
                left = _exact_rows(truth, left, report)
            if left and 2 * bits > LARGE_ESCALATION:
                for name, i, j in left:
                    truth.fewer(name, i, j, engine, balls[name, i, j])
                left = []
            cells, bits = left, 2 * bits
            truth.bits = max(truth.bits, bits // 2)
    finally:
        _restore_precision(saved)


LARGE_ESCALATION = 1 << 12  # the large path's last precision: past it, an entry on a rounding boundary that its
# exact form did not decide gets fewer digits (an irrational value within 10**-1200 of a tie is not to be met)
EXACT_ROW_TERMS = 1 << 20  # a row's exact form is asked for at most this many keys × columns


def _equal_values(truth: Truth, cells) -> list:
    """Settle the cells of heads' outputs whose row's visible values in their column are all equal: the
    weights of a row sum to 1, so the output is exactly that value (a constant column of V, a row with one
    key; on a rounding tie no enclosure could settle it).  Returns the cells left."""
    spec, graph = truth.spec, truth.graph
    values: dict = {}  # V's name -> exact values as (float64 array, None) or (None, RatMat), or None
    left = []
    for name, i, j in cells:
        step = graph.step(name)
        if step.kind != "head" or step.backward:
            left.append((name, i, j))
            continue
        v_name = graph.node(name).inputs[1]
        if v_name not in values:
            values[v_name] = _exact_values(graph, v_name)
        if values[v_name] is None:
            left.append((name, i, j))
            continue
        floats, exact = values[v_name]
        visible = spec.allowed(step.head - 1)[i]
        if not visible.any():
            if spec.empty_row != "uniform":
                left.append((name, i, j))
                continue
            visible = np.ones_like(visible)
        column = (floats if floats is not None else exact.num)[:, j][visible]
        if not (column == column[0]).all():
            left.append((name, i, j))
            continue
        value = Fraction(float(column[0])) if floats is not None else Fraction(column[0], exact.den)
        truth._known[name].decided[i, j] = _exact_text(value, truth.digits)
    return left


def _exact_values(graph, name: str):
    """A leaf's or node's exact values as (float64 array, None) for float inputs, (None, RatMat) for rational
    ones, or None when they are not rational."""
    leaf = graph.leaves.get(name)
    if leaf is not None:
        if leaf.is_float:
            return leaf.float64(), None
        return (None, leaf.ratmat) if leaf.is_rational else None
    value = graph.forward(BallXP(ArbEngine_(64)), [name])[name]
    return (None, value) if isinstance(value, RatMat) else None


def _exact_rows(truth: Truth, cells, report) -> list:
    """Settle the cells of row-local forward steps whose exact form, on their query row's graph (its keys and
    columns alone), is a constant: a rational on a rounding tie.  Returns the cells left."""
    from symattn.backends.exact import ExactXP

    spec, graph = truth.spec, truth.graph
    by_row: dict = {}
    left = []
    for name, i, j in cells:
        step = graph.step(name)
        if step.row_local and not step.backward:
            by_row.setdefault((name, i), []).append(j)
        else:
            left.append((name, i, j))
    for (name, i), columns_asked in sorted(by_row.items()):
        step = graph.step(name)
        keys, columns = _restriction(spec, step, [i], {i: columns_asked})
        size = (spec.S if keys is None else len(keys)) * (step.shape[1] if columns is None else len(columns))
        value = None
        if size <= EXACT_ROW_TERMS:
            report(f"exact form of {name}, query row {i}")
            try:
                g = build_graph(spec, rows=[i], keys=keys, value_columns=columns)
                xp = ExactXP()
                value = g.forward(xp, [name])[name]
            except (RecursionError, MemoryError, _too_big()):
                value = None
        for j in columns_asked:
            exact = None
            if value is not None:
                try:
                    exact = xp.alg.value(xp.entry(value, 0, j if columns is None else columns.index(j)))
                except (RecursionError, MemoryError, _too_big()):
                    exact = None
            if exact is None:
                left.append((name, i, j))
            else:
                truth._known[name].decided[i, j] = _exact_text(exact, truth.digits)
    return left


def _restriction(spec, step, rows, by_row) -> tuple:
    """(keys, value columns) a kernel-form head's rows need: the keys they may attend to, and the columns of V
    asked (None: all)."""
    if spec.form != "kernel" or step.kind != "head":
        return None, None
    columns = sorted({j for i in rows for j in by_row[i]})
    allowed = spec.allowed(step.head - 1)[rows].any(axis=0)
    empty = not spec.allowed(step.head - 1)[rows].any(axis=1).all()
    keys = None if allowed.all() or (empty and spec.empty_row != "zero") else np.flatnonzero(allowed).tolist()
    return keys, columns


def _asks_backward(steps, graph) -> bool:
    if steps is None:
        return False
    names = {s.name for s in graph.backward_steps}
    return any(name in names for name in steps)


def _collect(truth: Truth, name: str, value, xp: BallXP, pending: dict, needed: int) -> None:
    """Store the step's values; pending[name] becomes the entries not yet accurate enough."""
    first = pending[name] is None
    engine = xp.engine
    if isinstance(value, Lin) and not value.terms:  # rational scores
        value, excluded = value.const, value.excluded
    else:
        excluded = getattr(value, "excluded", None)
    if isinstance(value, RatMat):
        truth._known[name] = _Known(exact=value, excluded=excluded)
        pending[name] = []
        return
    balls = xp.balls(value)
    if first:
        truth._known[name] = known = _Known(balls=balls.values, excluded=balls.excluded)
        shape = balls.values.shape
        cells = [(i, j) for i in range(shape[0]) for j in range(shape[1])]
    else:
        known = truth._known[name]
        cells = pending[name]
        for i, j in cells:
            known.balls[i, j] = balls.values[i, j]
    left = []
    excluded = known.excluded
    accurate, is_nan = _accuracy(engine, needed), engine.is_nan
    values = known.balls
    for i, j in cells:
        if excluded is not None and excluded[i, j]:
            continue
        ball = values[i, j]
        if accurate(ball):
            continue
        if is_nan(ball):
            known.decided[i, j] = "nan"
        else:
            left.append((i, j))
    pending[name] = left


def _recollect_rows(truth: Truth, pending: dict, xp: BallXP, needed: int) -> None:
    """The entries left (all of row-local steps) recomputed on their query rows' graphs at xp's precision."""
    by_row: dict = {}
    for name, cells in pending.items():
        for i, j in cells:
            by_row.setdefault(i, []).append((name, j))
    accurate, is_nan = _accuracy(xp.engine, needed), xp.engine.is_nan
    xp.careful = True
    graph = truth.graph
    left = {name: [] for name in pending}
    for i, entries in sorted(by_row.items()):
        g = build_graph(truth.spec, rows=[i] if graph.rows is None else [graph.rows[i]])
        values = g.values(xp, sorted({name for name, _ in entries}))
        for name, j in entries:
            known = truth._known[name]
            ball = known.balls[i, j] = _ball_at(xp, values[name], 0, j)
            if is_nan(ball):
                known.decided[i, j] = "nan"
            elif not accurate(ball):
                left[name].append((i, j))
    pending.update(left)


def _accuracy(engine, needed: int):
    """A test of whether a ball is accurate enough that its decimals will almost surely certify."""
    if engine.name == "arb":
        return lambda ball: ball.is_exact() or ball.rel_accuracy_bits() >= needed
    return lambda ball: engine.accuracy(ball) >= needed


def _too_big():
    from symattn.backends.exact import _TooBig

    return _TooBig


def _flint_precision():
    import flint

    return flint.ctx.prec


def _restore_precision(saved):
    import flint

    flint.ctx.prec = saved


__all__ = ["Balls", "CertifiedMatrix", "Truth", "evaluate"]
