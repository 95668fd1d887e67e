"""Certified ground truth: every step evaluated in ball arithmetic, every printed digit proven.

The attention math is evaluated from the trace's structure (matrix products,
row softmax shifted by the row maximum) in an engine's ball arithmetic; with
rational inputs Q, K, V and Q·Kᵀ are exact and only the softmax and what
follows it are balls.  Precision rises until every entry's enclosure rounds to
one decimal at both ends.  An entry that stays undecided after a rise is asked
of its exact form: if it is rational (zero, or a short decimal sitting on a
rounding boundary, which no ball can prove) it is rounded exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from . import certify
from .engines import engine_class
from .entries import to_ball
from .errors import SymattnError
from .exact import ExactAttention, RatMat, scale_sign
from .progress import Progress

log = logging.getLogger("symattn")

MAX_DIGITS = 100_000
GUARD_BITS = 32
MAX_RISES = 5  # precision doubles at most this often before giving up


def step_names(h: int) -> list[str]:
    """The trace's step names, in order.

    >>> step_names(1)
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'head1', 'concat_heads', 'M']
    """
    names = []
    for i in range(1, h + 1):
        names += [f"Q{i}", f"K{i}", f"V{i}", f"scores{i}", f"weights{i}", f"head{i}"]
    return names + ["concat_heads", "M"]


@dataclass(frozen=True)
class CertifiedMatrix:
    """One step's certified values: decimal strings, every digit proven."""

    name: str
    values: tuple  # rows of decimal strings ("0" for an exact zero)
    certified_digits: tuple  # rows of ints
    exact: tuple  # rows of bools: the value was decided from the exact form

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.values), len(self.values[0])

    def __getitem__(self, index) -> Decimal:
        i, j = index
        return Decimal(self.values[i][j])

    def tolist(self) -> list:
        return [[Decimal(v) for v in row] for row in self.values]

    def to_numpy(self, dtype="float64"):
        import numpy as np

        return np.array([[float(v) for v in row] for row in self.values], dtype=dtype)

    def __str__(self) -> str:
        width = max(len(v) for row in self.values for v in row)
        return "\n".join("  ".join(v.rjust(width) for v in row) for row in self.values)


@dataclass(frozen=True)
class Truth:
    """Certified values of every step of a spec's trace."""

    spec: object
    digits: int
    engine: str
    steps: dict  # name -> CertifiedMatrix, in trace order
    bits: int  # the highest working precision used

    @property
    def names(self) -> list[str]:
        return list(self.steps)

    def __getitem__(self, name: str) -> CertifiedMatrix:
        try:
            return self.steps[name]
        except KeyError:
            raise SymattnError(f"step: expected one of {', '.join(self.steps)}, received {name!r}") from None

    def __iter__(self):
        return iter(self.steps.values())


# The attention math, once, in any engine's arithmetic.


def compute(spec, engine, exact: ExactAttention | None) -> dict:
    """Every step of the trace as engine matrices (or RatMat where the step is exact)."""
    out = {}
    scale = to_ball(spec.effective_scale, engine)
    if exact is not None:
        abs_scale = scale if exact.sign >= 0 else -scale
        gap = abs_scale * engine.rational(exact.G.numerator, exact.G.denominator)
        v_engine = [engine.from_ratmat(v) for v in exact.V]
        exps = {0: engine.one()}  # exp(−gap·d) by d
    else:
        x = _balls(spec.x, engine)
    heads = []
    for i in range(spec.h):
        name = str(i + 1)
        if exact is not None:
            out["Q" + name], out["K" + name], out["V" + name] = exact.Q[i], exact.K[i], exact.V[i]
            r = exact.R[i]
            balls: dict = {}  # equal exact scores share one ball (and so one certification)
            out["scores" + name] = [
                [balls[v] if v in balls else balls.setdefault(v, scale * engine.rational(v, r.den)) for v in row]
                for row in r.num.tolist()
            ]
            weights = [_softmax_exponents(row, gap, engine, exps) for row in exact.exponents[i]]
            v = v_engine[i]
        else:
            head = spec.heads[i]
            q, k, v = (engine.matmul(x, _balls(w, engine)) for w in (head.wq, head.wk, head.wv))
            out["Q" + name], out["K" + name], out["V" + name] = engine.rows(q), engine.rows(k), engine.rows(v)
            kt = engine.from_rows([list(col) for col in zip(*out["K" + name], strict=True)])
            scores = [[scale * s for s in row] for row in engine.rows(engine.matmul(q, kt))]
            out["scores" + name] = scores
            weights = [_softmax_balls(row, engine) for row in scores]
        out["weights" + name] = weights
        out["head" + name] = engine.rows(engine.matmul(engine.from_rows(weights), v))
        heads.append(out["head" + name])
    concat = [sum((h[r] for h in heads), []) for r in range(spec.n)]
    out["concat_heads"] = concat
    wo = engine.from_ratmat(RatMat.from_entries(spec.wo)) if spec.is_rational else _balls(spec.wo, engine)
    out["M"] = engine.rows(engine.matmul(engine.from_rows(concat), wo))
    return out


def _softmax_exponents(row: list, gap, engine, cache: dict) -> list:
    """softmax of gap·row (integers), shifted by the row maximum so that every exponent is <= 0.

    ``cache`` maps d to exp(−gap·d), shared by every row of every head (they share gap)."""
    top = max(row)
    for e in row:
        if top - e not in cache:
            cache[top - e] = engine.exp(-(gap * (top - e)))
    exps = [cache[top - e] for e in row]
    total = sum(exps[1:], exps[0])
    return [e / total for e in exps]


def _softmax_balls(row: list, engine) -> list:
    """softmax of a row of balls, shifted by the entry with the largest midpoint."""
    ends = [engine.enclosure(s) for s in row]
    top = max(range(len(row)), key=lambda k: Fraction(*ends[k][0]) + Fraction(*ends[k][1]))
    exps = [engine.one() if k == top else engine.exp(s - row[top]) for k, s in enumerate(row)]
    total = sum(exps[1:], exps[0])
    return [e / total for e in exps]


def _balls(matrix, engine):
    return engine.from_rows([[to_ball(e, engine) for e in row] for row in matrix])


# Certification.


def initial_bits(spec, digits: int, exact: ExactAttention | None) -> int:
    """Enough bits for ``digits`` digits plus the magnitude of the largest exponent."""
    bits = math.ceil(digits * math.log2(10)) + GUARD_BITS
    if exact is not None:
        top = max((max(map(max, e)) for e in exact.exponents), default=0)
        largest = top * exact.G  # the largest |exponent| is about |scale| times this
        bits += max(0, largest.numerator.bit_length() - largest.denominator.bit_length())
    return bits


def enclose(spec, engine: str, settle, settle_exact, digits: int, progress=None):
    """Run the precision loop over every entry of every step.

    ``settle(step, i, j, lo, hi, e)`` gets integers with the entry in [lo, hi]·10**e and returns a
    result, or None while the enclosure is too wide; ``settle_exact(step, i, j, q)`` gets the exact rational
    (a Fraction, or a (numerator, denominator) pair)
    value of an entry that is rational.  Returns ({step: rows of results}, {step: rows of
    exact-decision flags}, highest bits used).
    """
    if spec.symbols:
        raise SymattnError(
            f"spec {spec.name}: evaluation needs numbers, received the symbols {', '.join(spec.symbols)}; "
            "use 'symattn show' for closed forms in symbols"
        )
    Engine = engine_class(engine)
    report = Progress(progress)
    exact = ExactAttention(spec, scale_sign(spec.effective_scale)) if spec.is_rational else None
    shapes = _shapes(spec)
    results = {name: [[None] * cols for _ in range(rows)] for name, (rows, cols) in shapes.items()}
    flags = {name: [[False] * cols for _ in range(rows)] for name, (rows, cols) in shapes.items()}
    pending = {name: [(i, j) for i in range(rows) for j in range(cols)] for name, (rows, cols) in shapes.items()}
    decider = _Decider(spec, exact)
    asked: set = set()

    def decide(name: str, cells: list) -> list:
        """Settle the cells whose exact form is rational; return the others."""
        left = []
        for i, j in cells:
            asked.add((name, i, j))
            value = decider(name, i, j)
            if value is None:
                left.append((i, j))
            else:
                results[name][i][j] = settle_exact(name, i, j, value)
                flags[name][i][j] = True
        return left

    if exact is not None:  # Q, K, V are exact rationals, and so are the scores where R is 0 or the scale rational
        rational_scale = isinstance(spec.effective_scale, Fraction)
        for name, cells in pending.items():
            if name[0] in "QKV":  # straight from the integer numerators: no Fraction per entry
                matrix = getattr(exact, name[0])[int(name[1:]) - 1]
                numerators = matrix.num.tolist()
                for i, j in cells:
                    results[name][i][j] = settle_exact(name, i, j, (numerators[i][j], matrix.den))
                    flags[name][i][j] = True
                pending[name] = []
            elif name.startswith("scores") and rational_scale:
                pending[name] = decide(name, cells)
            elif name.startswith("scores"):
                zero = exact.R[int(name[6:]) - 1].num
                pending[name] = [c for c in cells if zero[c] != 0] + decide(name, [c for c in cells if zero[c] == 0])
    bits = initial_bits(spec, digits, exact)
    saved = _save_flint_precision()
    try:
        for rise in range(MAX_RISES + 1):
            report(f"{Engine.name} at {bits} bits: computing")
            values = compute(spec, Engine(bits), exact)
            decimal, seen = Engine(bits).decimal, {}  # equal balls (shared objects) are certified once
            done, total = 0, sum(map(len, pending.values()))
            for name, cells in pending.items():
                report(f"{Engine.name} at {bits} bits: certifying", done, total)
                done += len(cells)
                rows, left = values[name], []
                for i, j in cells:
                    ball = rows[i][j]
                    ends = seen.get(id(ball))
                    if ends is None:
                        ends = seen[id(ball)] = decimal(ball, digits), ball  # the ball kept alive keeps its id unique
                    result = None if ends[0] is None else settle(name, i, j, *ends[0])
                    if result is None:
                        left.append((i, j))
                    else:
                        results[name][i][j] = result
                pending[name] = left
            # Still undecided at a precision meant for them: a rational value on a rounding boundary
            # (zero included) never certifies, so ask the exact form, once per entry.
            for name, cells in pending.items():
                pending[name] = [c for c in cells if (name, *c) in asked] + decide(
                    name, [c for c in cells if (name, *c) not in asked]
                )
            undecided = [(name, *c) for name, cells in pending.items() for c in cells]
            if not undecided or rise == MAX_RISES:
                break
            log.debug(
                "raising precision from %d to %d bits: %d entries not yet certified, e.g. %s[%d, %d]",
                bits,
                2 * bits,
                len(undecided),
                *undecided[0],
            )
            bits *= 2
    finally:
        _restore_flint_precision(saved)
        report.close()
    if undecided:
        name, i, j = undecided[0]
        raise SymattnError(
            f"{name}[{i}, {j}]: could not certify {digits} digits at up to {bits} bits of precision "
            f"({len(undecided)} entries undecided); ask for fewer digits"
        )
    return results, flags, bits


class _Decider:
    """Decides exactly whether an entry is rational, and which rational it is."""

    def __init__(self, spec, exact):
        self.spec = spec
        self.exact = exact
        self._trace = None

    def __call__(self, name, i, j) -> Fraction | None:
        if self.exact is not None and (self.exact.sign == 0 or self.spec.scale_is_algebraic or name[0] in "QKV"):
            return self.exact.exact_value(name, i, j)
        # Irrational inputs or a transcendental scale: ask SymPy about the closed form.
        if self._trace is None:
            from .trace import build

            self._trace = build(self.spec)
        return self._trace.rational_value(name, i, j)


def _save_flint_precision():
    try:
        import flint
    except ImportError:
        return None
    return flint.ctx.prec


def _restore_flint_precision(saved):
    if saved is not None:
        import flint

        flint.ctx.prec = saved


def _shapes(spec) -> dict:
    n, h = spec.n, spec.h
    shapes = {}
    for i in range(1, h + 1):
        shapes.update(
            {
                f"Q{i}": (n, spec.d_k),
                f"K{i}": (n, spec.d_k),
                f"V{i}": (n, spec.d_v),
                f"scores{i}": (n, n),
                f"weights{i}": (n, n),
                f"head{i}": (n, spec.d_v),
            }
        )
    shapes["concat_heads"] = (n, h * spec.d_v)
    shapes["M"] = (n, spec.d_out)
    return shapes


def check_digits(digits) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise SymattnError(f"digits: expected an integer from 1 to {MAX_DIGITS}, received {digits!r}")
    return digits


def evaluate(spec, digits: int = 50, engine: str = "auto", progress: bool | None = None) -> Truth:
    """Every step of the trace, each entry to ``digits`` certified significant digits.

    >>> truth = evaluate("notebook", digits=20)
    >>> truth["M"].values[0][0]
    '6.9433358564932463888'

    ``spec`` is a built-in name, a spec file path, a dict or an AttentionSpec.  ``engine`` is
    ``"mpmath"`` (interval arithmetic, always there), ``"arb"`` (python-flint's balls, much faster)
    or ``"auto"`` (Arb when installed).  ``progress`` shows progress on stderr for evaluations
    longer than a second: None (default) only when stderr is a terminal.

    Every printed digit is proven: precision doubles until both ends of each entry's enclosure
    round to the same decimal, and rational entries (exact zeros, ties) are decided exactly.
    """
    from .spec import load_spec

    spec = load_spec(spec)
    digits = check_digits(digits)

    def settle(name, i, j, lo, hi, e):
        return certify.certified_decimal(lo, hi, e, digits)

    def settle_exact(name, i, j, value):
        return certify.exact_string(value, digits)

    results, flags, bits = enclose(spec, engine, settle, settle_exact, digits, progress)
    steps = {}
    for name, rows in results.items():
        steps[name] = CertifiedMatrix(
            name,
            tuple(tuple(rows_i) for rows_i in rows),
            tuple(tuple(digits for _ in row) for row in rows),
            tuple(tuple(f) for f in flags[name]),
        )
    return Truth(spec, digits, engine_class(engine).name, steps, bits)
