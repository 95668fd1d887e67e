"""The large path (issue 13): double-float enclosures of whole matrices, checked against Arb.

- the exp and the tanh and their error bounds, on many random arguments;
- split products, sums and divisions enclose the exact results;
- every certified digit of the large path agrees with an independent mpmath computation (tests/oracle.py)
  at 40 digits on sampled entries (the cancelling and near-zero ones included), variants too;
- steps=[...] computes only those, progress shows on stderr, and the verifier uses the path."""

from __future__ import annotations

import io
from fractions import Fraction

import flint
import numpy as np
import pytest

import symattn
from symattn.backends import doublefloat, elementary, intervals
from symattn.backends.intervals import Iv, certifiable, split_product
from symattn.verifier import reference as verifier_reference
from tests import oracle

RNG = np.random.default_rng(2026)


def arb_of(x: float):
    return flint.arb(float(x))


def contains(hi, lo, rad, exact) -> bool:
    """exact (an arb) within rad of hi + lo, proven in Arb (ball arithmetic at 300 bits)."""
    center = arb_of(hi) + arb_of(lo)
    return bool(abs(exact - center) <= flint.arb(float(rad)))


@pytest.fixture(autouse=True)
def _precision():
    saved = flint.ctx.prec
    flint.ctx.prec = 300
    yield
    flint.ctx.prec = saved


@pytest.mark.parametrize("precise", [False, True])
def test_the_exp_encloses_arbs_exp_on_many_random_arguments(precise):
    """Both paths of the table exp: the plain one (2**-62 or so) and the precise one the gradients use
    (2**-73: table·r as a TwoProduct, only expm1(r) − r in float64), with and without the input's lo and
    radius, below the table (exactly 0 within 24η) too."""
    x = np.concatenate(
        [-RNG.random(20000) * 745, -RNG.random(5000) * 1e-3, -RNG.random(2000) * 1e-12, [0.0, -800.0, -1e4]]
    )
    lo = RNG.standard_normal(x.size) * 1e-17 * np.abs(x)
    e = elementary.exp(Iv(x, lo), precise=precise)
    for k in range(0, x.size, 7):
        exact = (arb_of(x[k]) + arb_of(lo[k])).exp()
        assert contains(e.hi[k], e.lo[k], e.rad[k], exact), (x[k], lo[k])
    for k in (-3, -2, -1):
        assert contains(e.hi[k], e.lo[k], e.rad[k], (arb_of(x[k]) + arb_of(lo[k])).exp())
    # the radius is tight: relative 2**-60 or so (2**-72 precise), not a blanket bound
    assert np.all(e.rad <= (2.0**-72 if precise else 2.0**-58) * e.hi + 1e-300)
    if precise:  # and the input's radius carries through
        wide = elementary.exp(Iv(x[:300], lo[:300], np.full(300, 1e-22)), precise=True)
        for k in range(0, 300, 3):
            for end in (-1, 1):
                exact = (arb_of(x[k]) + arb_of(lo[k]) + end * flint.arb(1e-22)).exp()
                assert contains(wide.hi[k], wide.lo[k], wide.rad[k], exact)


@pytest.mark.parametrize("precise", [False, True])
def test_the_shifted_exp_and_masked_entries(precise):
    x = RNG.standard_normal((30, 40)) * 20
    x[4] *= 30  # arguments below the table: enclosures [0, 20η]
    excluded = np.zeros(x.shape, dtype=bool)
    excluded[3, :5] = True
    x[excluded] = -np.inf  # masked
    lo = RNG.standard_normal(x.shape) * 1e-16 * np.abs(x)
    lo[excluded] = 0.0
    shift = intervals.IntervalXP().shift(Iv(x)).hi  # row maxima rounded up to multiples of 1/STEPS
    assert np.all(shift >= x.max(axis=1, keepdims=True)) and np.all(shift * intervals.STEPS % 1 == 0)
    e = elementary.exp(Iv(x, lo, np.full(x.shape, 1e-25), excluded), shift, precise)
    assert np.all(e.hi[3, :5] == 0) and np.all(e.lo[3, :5] == 0) and np.all(e.rad[3, :5] == 0)
    assert np.all(e.hi < e.below) and np.all(e.hi >= 0)
    for i in range(30):
        for j in range(0, 40, 3):
            if np.isfinite(x[i, j]):
                exact = (arb_of(x[i, j]) + arb_of(lo[i, j]) - arb_of(shift[i, 0])).exp()
                # the input's radius widens the output's: exact at the centre lies within
                assert contains(e.hi[i, j], e.lo[i, j], e.rad[i, j], exact)


def test_the_tanh_encloses_arbs_tanh_on_many_random_arguments():
    y = np.concatenate(
        [
            RNG.standard_normal(8000) * 0.05,  # the series (softcapped scores: scores / cap)
            RNG.uniform(0.03, 0.034, 2000) * RNG.choice([-1, 1], 2000),  # either side of 2**-5
            RNG.standard_normal(6000) * 3,
            RNG.standard_normal(2000) * 1e-7,
            # the table's grid: each side of k/2048 and of the half-way points, its first and last entries
            np.repeat(RNG.integers(0, 40 * 2048, 600) / 2048, 2) + np.tile([-1, 1], 600) * 2.0**-12 * (1 - 2.0**-30),
            RNG.integers(0, 4, 300) / 2048 + RNG.uniform(-(2.0**-12), 2.0**-12, 300),
            [40 - 2.0**-12, 40 - 2.0**-11, 40 + 2.0**-13, 39.9995, -40.0001, 1e-300, -5e-324, 2.0**-1000],
            [0.0, 20.0, -40.0, 400.0, -1e300],
        ]
    )
    lo = RNG.standard_normal(y.size) * 1e-17 * np.abs(y)
    lo[:3000] *= 1e10  # not normalised, as a product's rest
    t = elementary.tanh(Iv(y, lo))
    flint.ctx.prec = 1200  # tanh(400) = 1 − 2e**-800...: Arb must resolve radii near 1e-322
    for k in range(0, y.size, 3):
        exact = (arb_of(y[k]) + arb_of(lo[k])).tanh()
        assert contains(t.hi[k], t.lo[k], t.rad[k], exact), (y[k], lo[k])
    # tight: 2**-58 of |tanh| or better, far below float64's 2**-52
    assert np.all(t.rad <= 2.0**-58 * np.abs(t.hi) + 1e-300)
    # the input's radius carries through: the ends of a wide input lie within too
    pick = np.r_[0:40, 8000:8040, 10000:10040]
    wide = elementary.tanh(Iv(y[pick], lo[pick], np.full(pick.size, 1e-9)))
    for k, p in enumerate(pick):
        for end in (arb_of(y[p]) + arb_of(lo[p]) - flint.arb(1e-9), arb_of(y[p]) + arb_of(lo[p]) + flint.arb(1e-9)):
            assert contains(wide.hi[k], wide.lo[k], wide.rad[k], end.tanh()), (y[p], lo[p])


@pytest.mark.parametrize("times", [30.0, -2.5, 0.001, 1e-300 * 2.0**200, 2.0**-1000, -(2.0**950), 0.0])
def test_the_tanh_times_an_exact_number_encloses_arbs(times):
    """A softcap's c·tanh(y) from tables multiplied by c (``elementary._tanh_times``): enclosed, as tight
    relative to |c·tanh| as tanh alone, the input's radius scaled by |c|, ±c beyond the table."""
    y = np.concatenate([RNG.standard_normal(3000) * 0.05, RNG.standard_normal(1000) * 5, [0.0, -3e-9, 45.0, -1e9]])
    lo = RNG.standard_normal(y.size) * 1e-17 * np.abs(y)
    rad = np.where(np.arange(y.size) % 2, 1e-25, 0.0)
    t = elementary.tanh(Iv(y, lo, rad), times)
    for k in range(0, y.size, 2):
        for end in (-1, 1):
            exact = (arb_of(y[k]) + arb_of(lo[k]) + end * arb_of(rad[k])).tanh() * arb_of(times)
            assert contains(t.hi[k], t.lo[k], t.rad[k], exact), (y[k], lo[k])
    assert np.all(t.rad <= 2.0**-58 * np.abs(t.hi) + abs(times) * 1.01 * rad + 1e-300)
    assert t.hi[-2] == times and t.hi[-1] == -times  # tanh(45) and tanh(−1e9): ±c within 2**-110·|c|
    # past the table's end, arguments either side of it (a radius that underflowed to 0 for c = 2**-1000)
    y = np.array([39.9999, 40.0, 45.0, -41.0, 39.99951171875])
    far = elementary.tanh(Iv(y), times)
    for k in range(y.size):
        assert contains(far.hi[k], far.lo[k], far.rad[k], arb_of(y[k]).tanh() * arb_of(times))


def test_the_interval_softcap_is_the_composition_fused():
    """``IntervalXP.scaled_tanh`` (one op) and ``ArrayXP``'s scale, tanh, scale (three) enclose the same
    values: both contain Arb's c·tanh(s/c), for c exact and for an inexact 1/c."""
    xp = intervals.IntervalXP()
    s = Iv(RNG.standard_normal(500) * 40, RNG.standard_normal(500) * 1e-16)
    inner, outer = intervals.scalar(Fraction(1, 30)), intervals.scalar(Fraction(30))
    fused = xp.scaled_tanh(s, inner, outer)
    three = intervals.ArrayXP.scaled_tanh(xp, s, inner, outer)
    for k in range(0, 500, 5):
        exact = ((arb_of(s.hi[k]) + arb_of(s.lo[k])) / 30).tanh() * 30
        assert contains(fused.hi[k], fused.lo[k], fused.rad[k], exact)
        assert contains(three.hi[k], three.lo[k], three.rad[k], exact)
    assert np.all(fused.rad <= 2.0**-55 * np.abs(fused.hi))


@pytest.mark.parametrize(
    "s", [Fraction(1, 30), Fraction(30), Fraction(-7, 3), Fraction(3, 2**1070), Fraction(3, 2**1000), Fraction(0)]
)
def test_scaling_by_a_scalar_encloses_the_exact_product(s):
    """``doublefloat.scale`` (a·s for a scalar s, in place) against Arb: normalised and not normalised lo, with
    and without radii, tiny entries (underflow) and exact zeros (which stay exactly 0)."""
    n = 2000
    hi = RNG.standard_normal(n) * 10.0 ** RNG.integers(-8, 8, n)
    hi[:20] = 0.0
    hi[20:40] *= 1e-300
    hi[1900:] = RNG.standard_normal(100) * 2.0**990  # a tiny scalar times a huge operand: coefficients that underflow
    lo = RNG.standard_normal(n) * 1e-17 * np.abs(hi)
    lo[40:400] *= 1e10
    rad = np.where(np.arange(n) % 3 == 0, 1e-22 * np.abs(hi), 0.0)
    sc = intervals.scalar(s)
    for a in (Iv(hi, lo, rad), Iv(hi), Iv(hi, lo)):
        out = doublefloat.scale(a, sc)
        for k in range(0, n, 3):
            centre = arb_of(a.hi[k]) + (arb_of(a.lo[k]) if a.lo is not None else 0)
            r = arb_of(a.rad[k]) if a.rad is not None else flint.arb(0)
            for end in (centre - r, centre + r):
                exact = end * flint.arb(s.numerator) / flint.arb(s.denominator)
                assert contains(out.hi[k], out.lo[k], out.rad[k], exact), (a.hi[k], s)
        assert np.all(out.rad[:20] == 0) and np.all(out.hi[:20] == 0)  # 0·s = 0, exactly
        # where lo is normalised, tight: far below float64's rounding (a product's rest, 1e-7 of hi, costs u of it)
        tight = 2.0**-100 * np.abs(out.hi[400:]) + abs(float(s)) * 1.01 * a.radius()[400:] + 64 * 2.0**-1074
        assert np.all(out.rad[400:] <= tight)
        loose = 2.0**-70 * np.abs(out.hi[40:400]) + abs(float(s)) * 1.01 * a.radius()[40:400] + 64 * 2.0**-1074
        assert np.all(out.rad[40:400] <= loose)


@pytest.mark.parametrize("shape", [(7, 64, 33), (40, 1024, 9), (5, 3, 300)])
def test_split_products_enclose_the_exact_product(shape):
    m, n, p = shape
    a = RNG.standard_normal((m, n)).astype(np.float32).astype(np.float64) * 10.0 ** RNG.integers(-3, 4, (m, 1))
    b = RNG.standard_normal((n, p)) * 10.0 ** RNG.integers(-3, 4, (1, p))
    lo = RNG.standard_normal((m, n)) * 1e-17 * np.abs(a)
    hi, low, rad = split_product(a, lo, b, None)
    fa, fb = flint.arb_mat((a.astype(object) + 0).tolist()), flint.arb_mat(b.tolist())
    exact = (fa + flint.arb_mat(lo.tolist())) * fb
    for i in range(0, m, max(1, m // 5)):
        for j in range(0, p, max(1, p // 5)):
            assert contains(hi[i, j], low[i, j], rad[i, j], exact[i, j])
    assert np.all(rad <= 1e-18 * (np.abs(a) @ np.abs(b)) + 1e-300)  # far tighter than float64 (1e-16)


def test_elementwise_products_and_sums_of_unnormalised_double_floats_enclose_and_stay_narrow():
    """A product's lo is up to 2**-20 of its hi (not normalised): a·b keeps a.lo·b.lo in its lo (were it only
    in the radius, that would be 2**-40 of the product) and a + b each rounding: both within 2**-68 of |a·b| and
    |a| + |b| (the roundings of lo, 2**-53 of it)."""
    n = 200
    hi_a, hi_b = RNG.standard_normal(n), RNG.standard_normal(n)
    lo_a, lo_b = hi_a * RNG.uniform(-(2.0**-20), 2.0**-20, n), hi_b * RNG.uniform(-(2.0**-20), 2.0**-20, n)
    a, b = Iv(hi_a, lo_a, np.zeros(n)), Iv(hi_b, lo_b, np.zeros(n))
    product, total = doublefloat.mul(a, b), doublefloat.add(a, b, 1)
    for k in range(n):
        x, y = arb_of(hi_a[k]) + arb_of(lo_a[k]), arb_of(hi_b[k]) + arb_of(lo_b[k])
        for out, exact, size in ((product, x * y, abs(x * y)), (total, x + y, abs(x) + abs(y))):
            assert contains(out.hi[k], out.lo[k], out.rad[k], exact)
            assert out.rad[k] <= 2.0**-68 * float(size.mid()), (k, out.rad[k], exact)


def test_a_sum_of_exact_zeros_stays_exactly_zero():
    zero = Iv(np.zeros(3), np.zeros(3), np.zeros(3))
    out = doublefloat.add(zero, zero, -1)
    assert not out.hi.any() and not out.lo.any() and not out.rad.any()


def test_split_products_of_few_bit_inputs_restrict_the_rest_and_stay_enclosures():
    """bfloat16-like entries (8 bits) are integers once scaled, except a few tiny ones: the rest is computed
    only on those rows and columns, and the product is still enclosed (and exact where nothing is left)."""
    import ml_dtypes

    a = RNG.standard_normal((20, 64)).astype(ml_dtypes.bfloat16).astype(np.float64)
    b = RNG.standard_normal((64, 90)).astype(ml_dtypes.bfloat16).astype(np.float64)
    a[3, 7], b[5, 11], b[9, 40] = 1e-9, 3e-10, -7e-11  # fractional parts in row 3 and columns 11, 40
    hi, low, rad = split_product(a, None, b, None)
    exact = flint.arb_mat(a.tolist()) * flint.arb_mat(b.tolist())
    for i in range(20):
        for j in range(90):
            assert contains(hi[i, j], low[i, j], rad[i, j], exact[i, j])
    assert rad[0, 0] == 0 and rad[3, 0] > 0 and rad[0, 11] > 0  # exact where rows and columns have no fraction


def test_sliced_products_of_float32_entries_are_good_to_2_to_the_minus_100():
    # float32 entries (rows and columns scaled by powers of two: still float32 numbers)
    a = RNG.standard_normal((3, 64)).astype(np.float32).astype(np.float64) * 2.0 ** RNG.integers(-10, 14, (3, 1))
    b = RNG.standard_normal((64, 200)).astype(np.float32).astype(np.float64) * 2.0 ** RNG.integers(-10, 14, (1, 200))
    hi, low, rad = doublefloat.sliced_product(a, b)
    exact = flint.arb_mat(a.tolist()) * flint.arb_mat(b.tolist())
    for i in range(3):
        for j in range(0, 200, 7):
            assert contains(hi[i, j], low[i, j], rad[i, j], exact[i, j])
    assert np.all(rad <= 2.0**-100 * (np.abs(a) @ np.abs(b)) + 1e-300)


def test_certifiable_only_when_both_ends_round_alike():
    mid = np.array([1.23456789012345, 0.5, 9.999999999999e5, 1e-300, 2.5e-7, 0.0])
    rad = np.array([1e-15, 0.0, 1e-10, 1e-310, 1e-40, 0.0])
    assert certifiable(mid, rad, 12).tolist() == [True, True, True, False, True, False]
    tie = np.array([0.1234567890125])  # on a 12-digit tie: a radius across it never certifies
    assert not certifiable(tie, np.array([1e-16]), 12)[0]


def spot_check(truth, data: dict, names, samples: int = 60, seed: int = 0) -> int:
    """Compare sampled entries (and the smallest ones) with the independent mpmath reference (tests/oracle.py)
    at 40 digits, computed for the sampled rows only."""
    rng = np.random.default_rng(seed)
    picks = {}
    for name in names:
        got = truth[name]
        rows, cols = got.shape
        magnitude = np.abs(got.to_numpy())
        smallest = np.argsort(np.where(np.isfinite(magnitude), magnitude, np.inf), axis=None)[:8]
        picks[name] = [divmod(int(k), cols) for k in smallest] + [
            (int(rng.integers(rows)), int(rng.integers(cols))) for _ in range(samples)
        ]
    rows = {i for cells in picks.values() for i, _ in cells}
    return oracle.agree(truth, oracle.steps(data, 40, rows=rows), names, 40, picks)


@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"causal": True, "align": "bottom_right"},
        {"window": [6, 2]},
        {"softcap": 2},
        {"alibi": True, "causal": True},
        {"bias": "random"},
        {"mask": "random", "empty_row": "uniform"},
        {"mask": "random", "empty_row": "nan"},
    ],
)
def test_large_path_digits_agree_with_mpmath_at_40_digits(options, large_everywhere):
    rng = np.random.default_rng(7)
    H, H_kv, L, S, E = 4, 2, 24, 30, 16
    data = {
        "q": rng.standard_normal((H, L, E)).astype(np.float32),
        "k": rng.standard_normal((H_kv, S, E)).astype(np.float32),
        "v": rng.standard_normal((H_kv, S, 8)).astype(np.float32),
    }
    for key, value in options.items():
        if value == "random":
            value = rng.standard_normal((L, S)) if key == "bias" else rng.random((L, S)) > 0.6
        data[key] = value
    names = ["scores2", "weights3", "head1", "head4"]
    truth = symattn.evaluate(data, digits=12, steps=names)
    assert truth.method == "intervals"
    assert spot_check(truth, data, names) > 200


def test_large_path_on_the_projection_form_and_cancelling_outputs(large_everywhere):
    # two identical heads subtracted: M is exactly 0 everywhere (decided from each row's exact form; the
    # enclosures only bound it), Q, K, V exact
    rng = np.random.default_rng(3)
    head = {"wq": rng.standard_normal((6, 4)), "wk": rng.standard_normal((6, 4)), "wv": rng.standard_normal((6, 4))}
    data = {"x": rng.standard_normal((20, 6)), "heads": [head, head], "wo": np.vstack([np.eye(4), -np.eye(4)])}
    truth = symattn.evaluate(data, digits=12)
    assert truth.method == "intervals"
    assert {v for row in truth["M"].values for v in row} == {"0"}
    assert spot_check(truth, data, ["Q1", "K2", "scores1", "weights2", "head2"]) > 100


def test_a_row_with_one_key_is_exact_on_the_large_path(large_everywhere):
    """Causal row 0 attends to one key: weight exactly 1, output exactly that row of v, even where v's
    entries are decimal ties at the digits asked (5/32 = 0.15625 rounds half-even to 0.1562)."""
    rng = np.random.default_rng(4)
    v = rng.standard_normal((1, 6, 3))
    v[0, 0] = [5 / 32, -3 / 64, 0.0]  # 0.15625 and -0.046875: ties at 4 digits
    data = {"q": rng.standard_normal((1, 6, 3)), "k": rng.standard_normal((1, 6, 3)), "v": v, "causal": True}
    truth = symattn.evaluate(data, digits=4, steps=["weights1", "head1"])
    assert truth.method == "intervals" and truth.escalated == 0
    assert truth["head1"].values[0] == ("0.1562", "-0.04688", "0")
    assert oracle.agree(truth, oracle.steps(data, 40), ["weights1", "head1"], 40) == 6 * 6 + 6 * 3
    assert truth["weights1"].values[0][1:] == ("0",) * 5 and float(truth["weights1"].values[0][0]) == 1


def test_at_size_the_large_path_is_taken_and_only_the_steps_asked(monkeypatch):
    rng = np.random.default_rng(5)
    L, E = 256, 32
    data = {"q": rng.standard_normal((1, L, E)), "k": rng.standard_normal((1, L, E)),
            "v": rng.standard_normal((1, L, E)), "causal": True}  # fmt: skip
    stream = io.StringIO()
    stream.isatty = lambda: True  # progress shows on a terminal
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr("symattn.progress.Progress.__init__.__defaults__", (None, None, 0.0))
    truth = symattn.evaluate(data, digits=12, steps=["head1"])
    assert truth.method == "intervals" and truth.names == ["head1"]
    assert set(truth.known) == {"head1"}
    assert "float64 enclosures" in stream.getvalue()
    assert spot_check(truth, data, ["head1"], samples=40) >= 40
    # more than 15 digits, or an explicit engine: the Arb path
    assert symattn.evaluate(data, digits=16, steps=["head1"]).method == "balls"


def test_the_verifier_uses_the_large_path_with_digits_auto():
    from tools import impls

    rng = np.random.default_rng(9)
    L, E = 256, 32
    data = {"q": rng.standard_normal((1, L, E)), "k": rng.standard_normal((1, L, E)),
            "v": rng.standard_normal((1, L, E)), "causal": True}  # fmt: skip
    right, wrong = symattn.verify(data, [impls.kernel_straightforward, impls.kernel_causal_flip], dtype="float32")
    assert right.passed and wrong.verdict == "FAIL", (right.lines(), wrong.lines())
    context = verifier_reference.Context(symattn.load_spec(data), "float32")
    assert context.digits == 12 and context.truth.method == "intervals"
    assert len(right.entries) == 4096 and "4096 worst" in right.notes[0]
    # listed worst first: by the error against the kappa rule's allowance
    ratios = [e.abs_error / e.kappa_bound if e.abs_error else 0.0 for e in right.entries]
    assert ratios == sorted(ratios, reverse=True)
    # 6 digits past the dtype's unit roundoff: 9 for bfloat16, 10 for float16; the float64 default otherwise
    spec = symattn.load_spec(data)
    graph, names = context.graph, ["head1"]
    assert [verifier_reference.auto_digits(spec, d, names, graph) for d in ("bfloat16", "float16", "float64")] == [
        9,
        10,
        verifier_reference.DIGITS,
    ]


SCALARS = {
    "1/sqrt(3)": lambda m: 1 / m.sqrt(3),
    "sqrt(2)/7": lambda m: m.sqrt(2) / 7,
    "3*sqrt(5)": lambda m: 3 * m.sqrt(5),
    "1/sqrt(96)": lambda m: 1 / m.sqrt(96),
    "-2/3": lambda m: m.mpf(-2) / 3,
    "1/10": lambda m: m.mpf(1) / 10,
}


@pytest.mark.parametrize("text", SCALARS)
def test_an_exact_scalar_is_enclosed_with_its_double_float_rounding(text):
    # hi + lo ± rad must contain the value: lo's own rounding (about 2**-106 of it) counts, not only Arb's radius
    import mpmath

    from symattn.entries import parse_entry

    iv = intervals.scalar(parse_entry(text, "scale"))
    with mpmath.workdps(80):
        exact = SCALARS[text](mpmath)
        assert abs(exact - (mpmath.mpf(float(iv.hi)) + mpmath.mpf(float(iv.lo)))) <= mpmath.mpf(float(iv.rad))
