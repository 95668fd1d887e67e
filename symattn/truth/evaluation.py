"""Certified ground truth: every step of the graph in ball arithmetic, every printed digit proven.

``evaluate`` runs the op graph (``graph/``) in the ball backend
(``backends/balls.py``), forward and, with ``grad``, backward.  Precision rises
until every entry's enclosure is accurate enough for the digits asked; an entry
that does not get there is asked of its exact form (``decide.py``), which
settles the rational ones (zero, or a short decimal on a rounding boundary,
which no ball can prove).  What is left after MAX_RISES rises is settled entry
by entry when it is read (``result.py``).  Large specs take the large path
(``large.py``).
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

from symattn import certify
from symattn.backends.balls import BallXP
from symattn.backends.engines import engine_class
from symattn.backends.rational import Lin
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.matrix import RatMat
from symattn.progress import Progress
from symattn.truth import large as large_path
from symattn.truth.result import Known, Truth, ball_at, exact_text

log = logging.getLogger("symattn")

MAX_DIGITS = 100_000
GUARD_BITS = 32
MAX_RISES = 5  # precision doubles at most this often before giving up
MAX_BITS = 1 << 22  # the working precision never exceeds this (about 1.26 million digits)
ACCURACY_MARGIN = 6  # bits of relative accuracy beyond the digits asked, so that most entries certify at once


def check_digits(digits) -> int:
    """``digits`` if it is an integer from 1 to MAX_DIGITS, else a SymattnError that says so."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise SymattnError(f"digits: expected an integer from 1 to {MAX_DIGITS}, received {digits!r}")
    return digits


def initial_bits(spec, digits: int) -> int:
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
        q = max(log2_max(m) + _log2_abs(spec.descale("q_descale", spec.group(i))) for i, m in enumerate(spec.q))
        k = max(log2_max(m) + _log2_abs(spec.descale("k_descale", g)) for g, m in enumerate(spec.k))
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
    cache=None,
) -> Truth:
    """The trace's steps, each entry to ``digits`` certified significant digits.

    >>> truth = evaluate("notebook", digits=20)
    >>> truth["M"].values[0][0]
    '6.9433358564932463888'

    ``spec`` is a built-in name, a spec file path, a dict or an AttentionSpec.  ``engine`` is ``"arb"``
    (python-flint's balls), ``"mpmath"`` (interval arithmetic, slower) or ``"auto"`` (Arb).  ``steps``
    limits the work to those steps (and what they need); ``grad`` adds the backward steps (the gradients
    of the sum of the outputs, or of the spec's ``dout``).  ``progress`` shows progress on stderr for
    evaluations longer than a second: None (default) only when stderr is a terminal.  ``cache`` is a folder
    of certified truths (``truth/cache.py``): a truth filed there for exactly this spec, digits, engine and
    steps is read instead of computed, and one computed is filed.
    """
    from symattn.load import load_spec

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
    is_large = large_path.large(spec, digits, engine, names, graph)
    if cache is not None:
        from symattn.truth import cache as cached

        method = "intervals" if is_large else "balls"
        return cached.truth(
            cache, spec, graph, digits, "arb" if is_large else engine_name, method, names,
            lambda: evaluate(spec, digits, engine, progress, names),
        )  # fmt: skip
    Engine = engine_class(engine_name)
    report = Progress(progress)
    if is_large:
        try:
            return large_path.evaluate_large(spec, digits, graph, names, bits, report)
        finally:
            report.close()
    needed = math.ceil(digits * math.log2(10)) + ACCURACY_MARGIN
    forward_wanted = [n for n in names if n in forward_names]
    backward = bool(backward_names) and any(n in backward_names for n in names)
    truth = Truth(spec, digits, engine_name, graph, names, bits)
    pending = {name: None for name in names}  # name -> list of undecided (i, j), None before the first pass
    asked: set = set()  # entries whose exact form was asked already
    try:
        for rise in range(MAX_RISES + 1):
            report(f"{engine_name} at {bits} bits: computing")
            engine = Engine(bits)
            with engine.active():
                xp = BallXP(engine)
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
                final = rise == MAX_RISES or 2 * bits > MAX_BITS
                for name, i, j in undecided:
                    step = graph.step(name)
                    zero = engine.contains_zero(truth.known[name].balls[i, j])
                    ask = final or (zero and (rise >= 2 or (step.row_local and not step.backward)))
                    if (name, i, j) in asked or not ask:
                        left.append((name, i, j))
                        continue
                    asked.add((name, i, j))
                    value = truth.decide(name, i, j)
                    if value is None:
                        left.append((name, i, j))
                    else:
                        truth.known[name].decided[i, j] = exact_text(value, digits)
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
        report.close()
    truth.bits = bits
    for name, cells in pending.items():
        known = truth.known[name]
        for i, j in cells:
            ends = Engine(bits).decimal(known.balls[i, j], digits)
            if ends is not None and ends[0] <= 0 <= ends[1]:
                # the budget is spent and the exact form cannot decide: a bound, never a digit
                known.decided[i, j] = certify.bound_string(*ends)
                known.bounds.add((i, j))
            # else its string, made when read, goes on rising for that entry alone (``Truth._escalate``), and settles
            # for fewer digits only if that fails too
    return truth


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
        truth.known[name] = Known(exact=value, excluded=excluded)
        pending[name] = []
        return
    balls = xp.balls(value)
    if first:
        truth.known[name] = known = Known(balls=balls.values, excluded=balls.excluded)
        shape = balls.values.shape
        cells = [(i, j) for i in range(shape[0]) for j in range(shape[1])]
    else:
        known = truth.known[name]
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
    xp = BallXP(xp.engine, careful=True)
    graph = truth.graph
    left = {name: [] for name in pending}
    for i, entries in sorted(by_row.items()):
        g = build_graph(truth.spec, rows=[i] if graph.rows is None else [graph.rows[i]])
        values = g.values(xp, sorted({name for name, _ in entries}))
        for name, j in entries:
            known = truth.known[name]
            ball = known.balls[i, j] = ball_at(xp, values[name], 0, j)
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
