"""Each op's VJP on its own, in the exact and the ball backend (autograd's check_grads): for random inputs x,
directions dx and cotangents g, <vjp(g), dx> equals the directional derivative <g, (f(x + h·dx) - f(x - h·dx))/2h>
of an independent mpmath forward (tests/oracle.py), at high precision.  A failure names the op and backend."""

from __future__ import annotations

import random
from fractions import Fraction

import mpmath
import pytest

import symattn
from symattn.backends.balls import BallXP
from symattn.backends.engines import ArbEngine, precision
from symattn.backends.exact import ExactXP

# The op classes, imported in this one place of the tests (they may move to symattn.graph.ops).
from symattn.graph.graph import Concat, Linear, Scores, Softmax, WeightedSum, build
from symattn.matrix import Matrix
from tests import oracle

DPS = 80
STEP = mpmath.mpf(10) ** -25  # central differences: error about STEP² · f''' ≈ 1e-50
TOLERANCE = mpmath.mpf(10) ** -35
BITS = 300

MASK = [[True, True, False], [False, False, False], [True, False, True]]  # row 1 is empty


def spec(empty_row: str) -> dict:
    heads = [
        {"wq": [[1, 0], [0, 1]], "wk": [[0, 1], [1, 0]], "wv": [[1, 0], [0, 1]], "bq": [1, 0], "bk": [0, 1]},
        {"wq": [[0, 1], [1, 1]], "wk": [[1, 0], [0, 1]], "wv": [[1, 1], [0, 1]], "bv": [1, 1]},
    ]
    return {
        "x": [[1, 0], [0, 1], [1, 1]],
        "heads": heads,
        "wo": [[1, 0], [0, 1], [1, 0], [0, 1]],
        "bo": [1, 2],
        "bias": [[0, 1, "1/2"]] * 3,
        "alibi": True,
        "softcap": "3/2",
        "mask": MASK,
        "empty_row": empty_row,
    }


def backends():
    """(name, a fresh xp, how to read an entry of a value back as an mpf) for the exact and the ball backend."""

    def exact():
        xp = ExactXP()

        def read(value, i, j):
            e = xp.entry(value, i, j)
            return None if e is None else _mpf(xp.alg.ball(e, BITS))

        return xp, read

    def balls():
        xp = BallXP(ArbEngine(BITS))

        def read(value, i, j):
            b = xp.balls(value)
            if b.excluded is not None and b.excluded[i, j]:
                return None
            return _mpf(b.values[i, j])

        return xp, read

    return {"exact": exact, "balls": balls}


def _mpf(ball):
    """An Arb ball's midpoint as an mpf; the ball must be tight."""
    assert ball.rad() < 1e-60, ball
    return mpmath.mpf(ball.mid().str(100, radius=False))


def rational(rng: random.Random, shape) -> list:
    return [[Fraction(rng.randint(-12, 12), rng.randint(1, 6)) for _ in range(shape[1])] for _ in range(shape[0])]


def shape_of(graph, name):
    return graph.leaves[name].shape if name in graph.leaves else graph.step(name).shape


def mat(rows):
    return mpmath.matrix([[oracle.entry(e, DPS) for e in row] for row in rows])


def plus(rows, direction, t):
    return [[oracle.entry(a, DPS) + t * oracle.entry(d, DPS) for a, d in zip(r, dr, strict=True)]
            for r, dr in zip(rows, direction, strict=True)]  # fmt: skip


def reference(node, data: dict, head: int, H: int):
    """The node's forward as a function of its inputs (lists of rows), in mpmath, from DESIGN.md's rules."""
    op = node.op
    L, S = len(data["x"]), len(data["x"])
    if isinstance(op, Linear):
        return lambda x, w, b: oracle._plus_row(mat(x) * mat(w), b[0], DPS)
    if isinstance(op, Scores):

        def scores(q, k, bias):
            zeros = mpmath.matrix(S, 1)
            return oracle.attention(mat(q), mat(k), zeros, dict(data, bias=bias), head, H, DPS)[0]

        return scores
    if isinstance(op, Softmax):
        ok = oracle.allowed(data, MASK, L, S)
        return lambda s: oracle.softmax(mat(s), ok, {"zero": 0, "uniform": mpmath.mpf(1) / S}[data["empty_row"]])
    if isinstance(op, WeightedSum):
        return lambda p, v: mat(p) * mat(v)
    if isinstance(op, Concat):
        return lambda *hs: mpmath.matrix([sum((list(mat(h_).tolist()[i]) for h_ in hs), []) for i in range(L)])
    raise AssertionError(f"no reference for {type(op).__name__}")


CASES = [  # (node, the op it must be): every op, and Scores with softcap, bias, ALiBi and a mask
    ("Q1", Linear),
    ("M", Linear),
    ("scores2", Scores),
    ("weights1", Softmax),
    ("head2", WeightedSum),
    ("concat_heads", Concat),
]


@pytest.mark.parametrize("empty_row", ["zero", "uniform"])
@pytest.mark.parametrize("backend", ["exact", "balls"])
@pytest.mark.parametrize(("name", "kind"), CASES, ids=[c[0] for c in CASES])
def test_each_vjp_agrees_with_central_differences(name, kind, backend, empty_row):
    data = spec(empty_row)
    graph = build(symattn.load_spec(data))
    node = graph.node(name)
    assert isinstance(node.op, kind), node
    rng = random.Random(f"{name} {backend} {empty_row}")
    head = int(name[-1]) - 1 if name[-1].isdigit() else 0
    L, S = len(data["x"]), len(data["x"])
    ok = oracle.allowed(data, MASK, L, S)
    inputs = [rational(rng, shape_of(graph, n)) for n in node.inputs]
    directions = [rational(rng, shape_of(graph, n)) for n in node.inputs]
    if kind is Softmax:  # masked scores are -inf: neither moved nor read
        directions = [[[d if ok[i][j] else 0 for j, d in enumerate(row)] for i, row in enumerate(directions[0])]]
    out_shape = graph.step(name).shape
    g = rational(rng, out_shape)
    if kind is Scores:  # the loss reads the finite scores only
        g = [[e if ok[i][j] else 0 for j, e in enumerate(row)] for i, row in enumerate(g)]
    # the package's vjp, read back as mpf
    with precision(BITS):
        xp, read = backends()[backend]()
        args = [xp.leaf(n, Matrix(x)) for n, x in zip(node.inputs, inputs, strict=True)]
        if kind is Softmax:
            args = [xp.mask(args[0], ok_array(ok))]
        out = node.op.forward(xp, *args)
        grads = node.op.vjp(xp, args, out, xp.leaf("g", Matrix(g)))
        with mpmath.workdps(DPS):
            analytic = mpmath.mpf(0)
            for grad, direction in zip(grads, directions, strict=True):
                for i, row in enumerate(direction):
                    for j, d in enumerate(row):
                        if d:
                            value = read(grad, i, j)
                            assert value is not None, (name, i, j)
                            analytic += value * oracle.entry(d, DPS)
            forward = [[read(out, i, j) for j in range(out_shape[1])] for i in range(out_shape[0])]
    f = reference(node, data, head, len(data["heads"]))
    with mpmath.workdps(DPS):
        ref = f(*inputs)
        for i in range(out_shape[0]):  # the op's forward agrees with the reference at the point too
            for j in range(out_shape[1]):
                if forward[i][j] is None or mpmath.isinf(ref[i, j]):
                    assert forward[i][j] is None and mpmath.isinf(ref[i, j]), (name, i, j, forward[i][j], ref[i, j])
                else:
                    assert abs(forward[i][j] - ref[i, j]) < TOLERANCE * (1 + abs(ref[i, j])), (name, i, j)
        up = f(*(plus(x, d, STEP) for x, d in zip(inputs, directions, strict=True)))
        down = f(*(plus(x, d, -STEP) for x, d in zip(inputs, directions, strict=True)))
        numeric = mpmath.fsum(
            oracle.entry(g[i][j], DPS) * (up[i, j] - down[i, j]) / (2 * STEP)
            for i in range(out_shape[0])
            for j in range(out_shape[1])
            if g[i][j] and not mpmath.isinf(ref[i, j])
        )
        assert abs(analytic - numeric) < TOLERANCE * (1 + abs(numeric)), (
            f"VJP check of {type(node.op).__name__} ({name}, {backend} backend) failed:\n"
            f"analytic: {mpmath.nstr(analytic, 40)}\nnumeric:  {mpmath.nstr(numeric, 40)}"
        )
        assert numeric != 0  # the direction moves the output: the check is not vacuous


def ok_array(ok):
    import numpy as np

    return np.array(ok, dtype=bool)


def test_softmax_vjp_is_zero_on_empty_and_masked_entries():
    """An empty row's weights are the fill whatever the scores: their gradient is 0 (so is a masked entry's)."""
    data = spec("uniform")
    node = build(symattn.load_spec(data)).node("weights1")
    rng = random.Random(0)
    for make in backends().values():
        with precision(BITS):
            xp, read = make()
            s = xp.mask(xp.leaf("s", Matrix(rational(rng, (3, 3)))), ok_array(MASK))
            p = node.op.forward(xp, s)
            (ds,) = node.op.vjp(xp, [s], p, xp.leaf("g", Matrix(rational(rng, (3, 3)))))
            for i in range(3):
                for j in range(3):
                    if not MASK[i][j]:
                        assert read(ds, i, j) in (None, 0), (i, j)
