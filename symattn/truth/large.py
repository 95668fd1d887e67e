"""The large path: float64 enclosures of whole matrices, by blocks of query rows, and Arb for what they leave.

For the steps of specs of at least LARGE score entries, at FLOAT_DIGITS
digits or fewer, with the default engine, every step is enclosed in
double-float intervals (vectorized, ``backends/intervals.py``), by blocks of
query rows: the backward steps too, a block's forward and backward pass at
once; the gradients summed over every query row (dk, dv, dsinks, the
projections' dK, dV, weights and biases, dx's key and value part) are the sums
of the blocks' shares, enclosures added, so that no L × S enclosure of every
head is ever held.  The enclosures that certify the digits asked are kept as
they are (strings made when read); the others are settled from their exact
double-float ends, by equal values (a head's output of a constant column of
V), as bounds (near-zeros far below the step's scale), or computed again in Arb
on their query rows with precision doubling, their rows' exact forms deciding
rounding ties.  A summed
gradient's entry left (a sum that cancels) would need every query row in Arb:
up to ARB_SUMS score entries the whole graph is, beyond it the entry gets the
digits its enclosure proves (``Truth.notes`` counts them).
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

from symattn import certify
from symattn.backends.balls import BallXP
from symattn.backends.doublefloat import Iv, add
from symattn.backends.engines import ArbEngine, precision
from symattn.graph.graph import build as build_graph
from symattn.matrix import RatMat
from symattn.semantics import empty_rows
from symattn.truth.decide import too_big
from symattn.truth.result import Known, Truth, ball_at, ball_string, exact_text

log = logging.getLogger("symattn")

LARGE = 1 << 16  # score entries (H·L·S) from which 15 digits or fewer come from float64 enclosures
FLOAT_DIGITS = 15  # the most digits the float64 enclosures are asked for
NEAR_ZERO = 1e-15  # an entry whose enclosure stays below this × the step's largest |entry| may be a bound
BLOCK = 1 << 17  # score entries per head in one block of query rows on the large path
ESCALATION_BITS = 128  # Arb's first precision for what the enclosures (relative error about 2**-62) left:
# entries near a rounding boundary or cancelling, from double-float products good to about 2**-100
LARGE_ESCALATION = 1 << 12  # the large path's last precision: past it, an entry on a rounding boundary that its
# exact form did not decide gets fewer digits (an irrational value within 10**-1200 of a tie is not to be met)
ARB_SUMS = 1 << 16  # score entries (H·L·S) up to which gradients summed over every query row (dk, dv, dsinks, the
# projections' weights) that the enclosures leave are computed again in Arb (on the whole graph); beyond, they
# get the digits their enclosure certifies (a note)
EXACT_ROW_TERMS = 1 << 20  # a row's exact form is asked for at most this many keys × columns
EXACT_ROWS = 64  # and for at most this many rows of one evaluation (about 0.1 s each at 512 keys × 16 columns);
# the rest rise in Arb and, if still on a boundary, get the digits they prove (with a note)


def large(spec, digits: int, engine: str, names, graph) -> bool:
    """Whether ``evaluate`` takes the large path: float64 enclosures of whole matrices (``intervals.py``),
    Arb for the entries they do not certify.  For the steps, forward and backward, of specs of at least LARGE
    score entries, FLOAT_DIGITS digits or fewer, and the default engine."""
    fits = engine == "auto" and digits <= FLOAT_DIGITS and spec.h * spec.L * spec.S >= LARGE
    if fits and spec.score_mod is not None and spec.score_mod_split.decides:
        # the enclosures would have to decide which branch each entry takes (abs, min, max, where of s): the
        # ball path decides them, exactly where no ball can
        log.info("score_mod %r compares values of s: the ball path instead of the large path", spec.score_mod)
        return False
    return fits


def blocks(spec, L: int, names=()) -> list:
    """(rows, keys) blocks of the large path: query rows in blocks of about BLOCK score entries per head, each
    with only the keys some of its queries may attend to (the kernel form; all of them else, and when the steps
    ``names`` include the gradient of the weights, which every key has)."""
    size = max(1, BLOCK // max(spec.S, 1))
    every_key = any(name.startswith(("dweights", "ddropped")) for name in names)
    out = []
    for start in range(0, L, size):
        rows = list(range(start, min(L, start + size)))
        keys = None
        if spec.form == "kernel" and not every_key:
            allowed = np.zeros(spec.S, dtype=bool)
            empty = False
            for i in range(spec.h):
                a = spec.allowed(i)[start : start + size]
                allowed |= a.any(axis=0)
                empty |= bool(empty_rows(a).any())
            whole = not allowed.any() or (empty and (spec.empty_row != "zero" or spec.sinks is not None))
            if not allowed.all() and not whole:
                keys = np.flatnonzero(allowed).tolist()  # (a block whose rows see no key keeps them all)
        out.append((rows, keys))
    return out


def evaluate_large(spec, digits: int, graph, names, bits: int, report) -> Truth:
    """The large path: every step enclosed in double-float intervals (vectorized, ``intervals.py``), by blocks
    of query rows (and of the keys they may see); the enclosures that certify the digits kept as they are
    (strings made when read), the others settled from their exact double-float ends, near-zeros below
    NEAR_ZERO × the step's scale given as bounds, and every entry left computed again in Arb on its query row
    (a step that is not row-local on the whole graph), with precision doubling until it certifies."""
    from symattn.backends.intervals import enclose

    truth = Truth(spec, digits, "arb", graph, names, bits)
    truth.method = "intervals"
    names = list(dict.fromkeys(names))  # once each
    local = [n for n in names if graph.step(n).row_local]
    summed = [n for n in names if graph.step(n).backward and n not in local]  # sums over every query row
    whole = [n for n in names if n not in local and n not in summed]  # K and V of the projection form
    store = {}
    for name in names:
        step = graph.step(name)
        shape = step.shape
        store[name] = Known(
            excluded=None if step.excluded is None else step.excluded.copy(),  # masked scores, empty rows' lse
            mid=np.full(shape, -np.inf if step.kind == "scores" else 0.0),
            rad=np.zeros(shape),
            ok=np.zeros(shape, dtype=bool),
        )
        truth.known[name] = store[name]
    parts = blocks(spec, spec.L, names)
    sums = {name: _zero(graph.step(name).shape) for name in summed}

    def compute(b: int):
        rows, keys = parts[b]
        g = build_graph(spec, rows=rows, keys=keys) if len(parts) > 1 or keys is not None else graph
        asked, _ = block_summed(graph, g, local + (whole if b == 0 else []) + summed)
        return enclose(g, asked)

    for b, (rows, keys) in enumerate(parts):
        report("float64 enclosures: query rows", rows[0], spec.L)
        values = compute(b)
        for name in summed:
            if name in values:
                _accumulate(sums[name], values.pop(name), summed_target(graph.step(name), keys))
            if name + "_rows" in values:
                _accumulate(sums[name], values.pop(name + "_rows"), np.array(rows))
        for name, iv in values.items():
            step = graph.step(name)
            _settle_block(store[name], iv, block_target(step, rows, keys), digits, rows if step.row_local else None)
    for name in summed:
        _settle_block(store[name], sums.pop(name), (slice(None), slice(None)), digits, None)
    left = []

    for name in names:
        known = store[name]
        mid, rad = known.mid, known.rad
        nan = np.isnan(mid)
        legit = _nan_entries(spec, graph.step(name))
        nan &= False if legit is None else legit  # any other nan (an enclosure that overflowed) goes to Arb
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
    if spec.h * spec.L * spec.S > ARB_SUMS:  # a sum over every query row: Arb would run the whole graph again
        kept = []
        for name, i, j in left:
            if name in summed and np.isfinite(store[name].mid[i, j]) and np.isfinite(store[name].rad[i, j]):
                _fewer_from_enclosure(truth, name, i, j)
            else:
                kept.append((name, i, j))
        left = kept
    if left:
        log.debug("%d entries not certified by the enclosures: computed again in Arb", len(left))
        _settle_in_arb(truth, left, max(bits, ESCALATION_BITS), report)
    return truth


def _zero(shape) -> Iv:
    """An exact zero matrix, to accumulate a step's sum over blocks of query rows in."""
    return Iv(np.zeros(shape), np.zeros(shape), np.zeros(shape))


def _accumulate(total: Iv, part: Iv, target) -> None:
    """total[target] += part, rigorously (the radii add, with the sum's own rounding)."""
    here = Iv(total.hi[target], total.lo[target], total.rad[target])
    new = add(here, part, 1)
    total.hi[target], total.lo[target], total.rad[target] = new.hi, new.low(), new.radius()


def block_summed(graph, block, names) -> tuple:
    """(the names a block's graph is asked for, {summed step: the name of its rows' own share or None}): the
    steps ``names`` of the whole graph, less the summed gradients the block has no share of (dx, when x_kv
    holds the keys: its rows' share alone), plus dx_rows, a block's own rows' share of dx."""
    asked, shares = [], {}
    for name in names:
        step = graph.step(name)
        if not step.backward or step.row_local:
            asked.append(name)
            continue
        if name[1:] in block.leaves or name[1:] in {node.name for node in block.nodes}:
            asked.append(name)
        shares[name] = None
        if name == "dx" and "x_rows" in block.leaves:
            asked.append("dx_rows")
            shares[name] = "dx_rows"
    return asked, shares


def summed_target(step, keys):
    """Where a block's share of a step summed over query rows goes: the rows of the keys it kept (the kernel
    form's dk, dv), or all of it."""
    if keys is not None and step.kind in ("dk", "dv"):
        return np.array(keys)
    return slice(None)


ROW_NAN = ("weights", "head", "dscores", "dq", "dQ")  # nan on their head's empty rows
GROUP_NAN = ("dk", "dv", "dK", "dV", "dwk", "dwv", "dbk", "dbv")  # sums over every query row of their group's
# heads: nan throughout if one of those rows is
HEAD_NAN = ("dwq", "dbq")  # sums over their head's query rows: nan throughout if one is


def _nan_entries(spec, step) -> np.ndarray | None:
    """Bools over a step's entries: those that are nan by the spec (empty rows under ``empty_row "nan"``), or
    None when none is (with sinks no row is empty).  Forward: a head's weights and output on its empty rows,
    those rows of its columns of concat_heads, those rows of M.  Backward, where each sums a nan row (nan·0
    is nan there too, as in the ball path and in torch): a head's dscores and dq (dQ) on its empty rows;
    every entry of the dk, dv (dK, dV and their weights' and biases' gradients) its group's heads share, and
    of its dwq and dbq; the rows of dwo that its columns of concat_heads meet; dx_kv throughout, and dx
    throughout too when x is also the keys' input (else on the rows empty in some head)."""
    if spec.empty_row != "nan" or spec.sinks is not None:
        return None
    empty = [empty_rows(spec.allowed(h))[:, 0] for h in range(spec.h)]
    out = np.zeros(step.shape, dtype=bool)
    kind = step.kind
    if kind in ROW_NAN:
        out[empty[step.head - 1]] = True
    elif kind in GROUP_NAN:
        out[:] = any(empty[h].any() for h in range(spec.h) if spec.group(h) == step.head - 1)
    elif kind in HEAD_NAN:
        out[:] = empty[step.head - 1].any()
    elif kind in ("concat_heads", "dwo"):
        width = spec.d_v
        for h in range(spec.h):
            if kind == "concat_heads":
                out[empty[h], h * width : (h + 1) * width] = True
            elif empty[h].any():
                out[h * width : (h + 1) * width] = True
    elif kind == "M" or (kind == "dx" and getattr(spec, "x_kv", None) is not None):
        for rows in empty:
            out[rows] = True
    elif kind in ("dx", "dx_kv"):
        out[:] = any(rows.any() for rows in empty)
    else:
        return None
    return out if out.any() else None


def block_target(step, rows, keys):
    """Where a block's values of a step go in the whole step: its rows (and, for scores, weights and their
    gradients, the keys it kept); all of a step that is not row-local (the block computed it whole)."""
    if not step.row_local:
        return slice(None), slice(None)
    if keys is not None and step.kind in ("scores", "weights", "dropped", "dscores", "dweights", "ddropped", "dbias"):
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


def _fewer_from_enclosure(truth: Truth, name: str, i: int, j: int) -> None:
    """An entry left to the digits its float64 enclosure certifies (a note), or a bound when none."""
    from symattn.backends.intervals import exact_string

    known = truth.known[name]
    mid, rad = float(known.mid[i, j]), float(known.rad[i, j])
    for fewer in range(truth.digits - 1, 0, -1):
        text = exact_string(mid, 0.0, rad, fewer)
        if text is not None:
            known.decided[i, j] = text
            known.fewer[i, j] = fewer, mid
            truth.enclosed.add((name, i, j))
            return
    known.decided[i, j] = _bound_text(abs(mid) + rad)
    known.bounds.add((i, j))


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
    the first round, the entries left are asked of their rows' exact forms (a rounding tie, which no precision
    settles); what still straddles a rounding boundary at the last precision gets the digits it does certify
    (a note)."""
    digits = truth.digits
    start = bits
    nans: dict = {}

    def nan_entries(name):
        if name not in nans:
            legit = _nan_entries(truth.spec, truth.graph.step(name))
            nans[name] = np.zeros(truth.graph.step(name).shape, dtype=bool) if legit is None else legit
        return nans[name]

    # float products (double-float slices, good to 2**-100) for the first round, unless enclosures overflowed
    products = all(np.isfinite(truth.known[name].mid[i, j]) for name, i, j in cells)
    while cells:
        engine = ArbEngine(bits)
        with precision(bits):
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
                value = g.values(xp, [name])[name]
                for position, i in enumerate(rows):
                    for j in by_row[i]:
                        balls[name, i, j] = ball_at(xp, value, position, j if columns is None else columns.index(j))
            if whole:
                report(f"arb at {bits} bits: the whole graph")
                all_values = truth.graph.values(xp, sorted({name for name, _, _ in whole}))
                for name, i, j in whole:
                    balls[name, i, j] = ball_at(xp, all_values[name], i, j)
            left = []
            for (name, i, j), ball in balls.items():
                known = truth.known[name]
                text = ball_string(engine, ball, digits)
                if text == "nan" and not nan_entries(name)[i, j]:  # the first round's float products overflowed
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


def _equal_values(truth: Truth, cells) -> list:
    """Settle the cells of heads' outputs whose row's visible values in their column are all equal: the
    weights of a row sum to 1, so the output is exactly that value (a constant column of V, a row with one
    key; on a rounding tie no enclosure could settle it).  Returns the cells left: all of them with sinks,
    whose weights sum to less than 1, and with dropout, whose weights sum to anything."""
    spec, graph = truth.spec, truth.graph
    if spec.sinks is not None or spec.dropout_p is not None:
        return list(cells)
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
        if (column == column[0]).all():
            value = Fraction(float(column[0])) if floats is not None else Fraction(column[0], exact.den)
        elif _uniform(spec, step, i):  # every visible score equal: the weights are 1/n, the output V's mean
            if exact is None:  # V's exact integers over one power of two, made once
                exact = RatMat.from_float(floats)
                values[v_name] = floats, exact
            value = Fraction(sum(exact.num[:, j][visible].tolist()), exact.den * int(visible.sum()))
        else:
            left.append((name, i, j))
            continue
        truth.known[name].decided[i, j] = exact_text(value, truth.digits)
    return left


def _uniform(spec, step, i: int) -> bool:
    """Whether every visible score of row i of a kernel-form head is the same number: its query row is 0 and
    nothing is added per key (no bias, no ALiBi; softcap keeps tanh(0) = 0)."""
    if spec.form != "kernel" or spec.bias is not None or spec.alibi is not None or spec.score_mod is not None:
        return False
    q = spec.q[step.head - 1]
    row = q.float64()[i] if q.is_float else q.select_rows([i]).float64()[0]
    return not row.any()


def _exact_values(graph, name: str):
    """A leaf's or node's exact values as (float64 array, None) for float inputs, (None, RatMat) for rational
    ones, or None when they are not rational."""
    leaf = graph.leaves.get(name)
    if leaf is not None:
        if leaf.is_float:
            return leaf.float64(), None
        return (None, leaf.ratmat) if leaf.is_rational else None
    with precision(64):
        value = graph.forward(BallXP(ArbEngine(64)), [name])[name]
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
    for count, ((name, i), columns_asked) in enumerate(sorted(by_row.items())):
        step = graph.step(name)
        keys, columns = _restriction(spec, step, [i], {i: columns_asked})
        size = (spec.S if keys is None else len(keys)) * (step.shape[1] if columns is None else len(columns))
        value = None
        if size <= EXACT_ROW_TERMS and count < EXACT_ROWS:
            report(f"exact form of {name}, query row {i}")
            try:
                g = build_graph(spec, rows=[i], keys=keys, value_columns=columns)
                xp = ExactXP()
                value = g.forward(xp, [name])[name]
            except (RecursionError, MemoryError, too_big()):
                value = None
        for j in columns_asked:
            exact = None
            if value is not None:
                try:
                    exact = xp.alg.value(xp.entry(value, 0, j if columns is None else columns.index(j)))
                except (RecursionError, MemoryError, too_big()):
                    exact = None
            if exact is None:
                left.append((name, i, j))
            else:
                truth.known[name].decided[i, j] = exact_text(exact, truth.digits)
    return left


def _restriction(spec, step, rows, by_row) -> tuple:
    """(keys, value columns) a kernel-form head's rows need: the keys they may attend to, and the columns of V
    asked (None: all)."""
    if spec.form != "kernel" or step.kind != "head":
        return None, None
    columns = sorted({j for i in rows for j in by_row[i]})
    allowed = spec.allowed(step.head - 1)[rows].any(axis=0)
    empty = bool(empty_rows(spec.allowed(step.head - 1)[rows]).any())
    every = allowed.all() or not allowed.any() or (empty and (spec.empty_row != "zero" or spec.sinks is not None))
    return (None if every else np.flatnonzero(allowed).tolist()), columns
