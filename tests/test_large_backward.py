"""Backward steps on the large path (double-float enclosures by blocks of query rows, sums of keys' and values'
gradients over the blocks, Arb for what they leave), forced on small specs by ``large_everywhere`` and blocks
of two query rows.

Each is compared with computations apart from the intervals: the small path's certified digits (Arb balls, at
30 digits), central differences of an mpmath forward pass (``tests/oracle.py``'s, and ``test_combined``'s with
every 2026 feature), and a softmax's centred cotangent in mpmath.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import symattn
import symattn.truth.large
from symattn.backends.doublefloat import Iv
from symattn.backends.intervals import IntervalXP
from symattn.verifier.reference import Context
from tests import oracle, test_combined
from tools import impls

REF_DIGITS = 30


@pytest.fixture
def two_rows(large_everywhere, monkeypatch):
    """The large path in blocks of two query rows (of up to 16 keys): every sum over blocks is exercised."""
    monkeypatch.setattr(symattn.truth.large, "BLOCK", 32)


def floats(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def kernel(seed=0, H=2, H_kv=1, L=7, S=9, E=3, **options) -> dict:
    rng = np.random.default_rng(seed)
    data = {"q": floats(rng, H, L, E), "k": floats(rng, H_kv, S, E), "v": floats(rng, H_kv, S, E)}
    data["dout"] = floats(rng, H, L, E)
    return data | options


def projection(seed=0, **options) -> dict:
    rng = np.random.default_rng(seed)
    H, H_kv, L, d, E = 2, 1, 6, 3, 2
    data = {
        "x": floats(rng, L, d),
        "heads": [{"wq": floats(rng, d, E), "bq": floats(rng, E)} for _ in range(H)],
        "kv_heads": [{"wk": floats(rng, d, E), "wv": floats(rng, d, E), "bv": floats(rng, E)} for _ in range(H_kv)],
        "wo": floats(rng, H * E, 2),
        "bo": floats(rng, 2),
        "dout": floats(rng, L, 2),
    }
    return data | options


EMPTY = np.ones((7, 9), dtype=bool)
EMPTY[3] = False  # a query that sees no key
EMPTY[:, 5] = False  # a key nobody sees
PROJECTION_EMPTY = np.tril(np.ones((6, 6), dtype=bool), -1)  # row 0 sees no key
HEAD_EMPTY = np.ones((4, 7, 9), dtype=bool)
HEAD_EMPTY[2, 4] = False  # head 3 (group 2 of two) has an empty row: only dk2, dv2 are nan throughout

CASES = {
    "causal top-left, GQA": kernel(H=4, H_kv=2, causal=True),
    "causal bottom-right": kernel(1, causal=True, align="bottom_right"),
    "softcap, a bias per head": kernel(2, softcap=2, bias=floats(np.random.default_rng(5), 2, 7, 9)),
    "a bias every head shares, window": kernel(3, bias=floats(np.random.default_rng(6), 7, 9), window=[2, 1]),
    "sinks": kernel(4, causal=True, sinks=[0.5, -1]),
    "segments": kernel(5, segments_q=[0, 3, 7], segments_kv=[0, 4, 9], causal=True),
    "dropout": kernel(6, dropout_p=0.25, dropout_mask=np.random.default_rng(7).random((2, 7, 9)) > 0.25),
    "empty rows zero": kernel(7, mask=EMPTY),
    "empty rows uniform": kernel(8, mask=EMPTY, empty_row="uniform"),
    "empty rows nan": kernel(9, mask=EMPTY, empty_row="nan"),
    "empty rows nan in one group": kernel(11, H=4, H_kv=2, mask=HEAD_EMPTY, empty_row="nan", causal=True),
    "score_mod": kernel(10, causal=True, score_mod="5*tanh(s/5) - 0.5*abs(q_idx - kv_idx)"),
    "projection, biases": projection(causal=True),
    "projection, cross-attention": projection(1, x_kv=floats(np.random.default_rng(8), 5, 3)),
    "projection, empty rows nan": projection(2, mask=PROJECTION_EMPTY[:, :6], empty_row="nan"),
    "projection, cross-attention, empty rows nan": projection(
        3, x_kv=floats(np.random.default_rng(9), 5, 3), mask=PROJECTION_EMPTY[:, :5], empty_row="nan"
    ),
}


def as_reference(truth, names) -> dict:
    """The certified strings of a (small path's) truth as mpmath matrices, None where one is a bound."""
    out = {}
    with mpmath.workdps(REF_DIGITS + 10):
        for name in names:
            values = truth[name].values
            m = mpmath.matrix(len(values), len(values[0]))
            for i, row in enumerate(values):
                for j, text in enumerate(row):
                    assert not text.startswith("<"), (name, i, j, text)  # the small path decides exactly
                    m[i, j] = mpmath.mpf(text)
            out[name] = m
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_backward_step_agrees_with_the_small_path(case, two_rows):
    spec = symattn.load_spec(CASES[case])
    small = symattn.evaluate(spec, digits=REF_DIGITS, grad=True)  # above FLOAT_DIGITS: Arb balls
    large = symattn.evaluate(spec, digits=12, grad=True)
    assert small.method == "balls" and large.method == "intervals"
    names = [s.name for s in large.graph.backward_steps]
    assert oracle.agree(large, as_reference(small, names), names, dps=REF_DIGITS) > 100


@pytest.mark.parametrize(
    "case",
    [
        "empty rows nan",
        "empty rows nan in one group",
        "projection, empty rows nan",
        "projection, cross-attention, empty rows nan",
    ],
)
def test_nan_gradients_of_empty_rows_are_decided_without_arb(case, two_rows):
    """Under empty_row "nan", dscores and dq are nan on the empty rows and every dk, dv entry of their group is
    nan (each sums a nan row): decided from the spec, as the forward's nan rows are, not computed in Arb (at
    kernel sizes, the whole graph again: 22.8 s at 512 tokens before)."""
    spec = symattn.load_spec(CASES[case])
    large = symattn.evaluate(spec, digits=12, grad=True)
    assert large.method == "intervals" and large.escalated == 0 and not large.notes
    if "projection" in case:  # the ball path's nan entries, step by step (test_every_backward_step_... the rest)
        small = symattn.evaluate(spec, digits=REF_DIGITS, grad=True)
        for step in large.graph.backward_steps:
            ours, theirs = large[step.name].values, small[step.name].values
            assert [[t == "nan" for t in row] for row in ours] == [[t == "nan" for t in row] for row in theirs]
        return
    nan_groups = {spec.group(h) + 1 for h in range(spec.h) if not spec.allowed(h).any(axis=1).all()}
    for g in range(1, spec.h_kv + 1):
        for kind in ("dk", "dv"):
            values = large[f"{kind}{g}"].values
            assert all((text == "nan") == (g in nan_groups) for row in values for text in row), (kind, g)
    for h in range(1, spec.h + 1):
        empty = ~spec.allowed(h - 1).any(axis=1)
        for i, row in enumerate(large[f"dq{h}"].values):
            assert all((text == "nan") == bool(empty[i]) for text in row), (h, i)


@pytest.mark.parametrize("case", ["causal top-left, GQA", "causal bottom-right", "sinks", "segments"])
def test_key_and_value_gradients_from_blocks_that_keep_only_their_keys(case, two_rows):
    """Without the weights' gradient asked, a causal block keeps only the keys its rows see: its shares of dk and
    dv go to those keys' rows."""
    spec = symattn.load_spec(CASES[case])
    names = [f"d{kind}{i}" for kind, count in (("q", spec.h), ("k", spec.h_kv), ("v", spec.h_kv))
             for i in range(1, count + 1)]  # fmt: skip
    parts = symattn.truth.large.blocks(spec, spec.L, names)
    assert any(keys is not None for _, keys in parts)
    small = symattn.evaluate(spec, digits=REF_DIGITS, steps=names)
    large = symattn.evaluate(spec, digits=12, steps=names)
    assert large.method == "intervals"
    assert oracle.agree(large, as_reference(small, names), names, dps=REF_DIGITS) > 40


@pytest.mark.parametrize("form", ["kernel", "projection"])
def test_every_2026_feature_together_against_central_differences(form, two_rows, monkeypatch):
    """test_combined's gradients (sinks, segments, mask_mod, dropout, GQA, softcap, a shared bias) on the large
    path: every one it picks, dsinks and dbias against central differences of its mpmath reference."""
    taken = []
    evaluate_large = symattn.truth.large.evaluate_large
    monkeypatch.setattr(symattn.truth.large, "evaluate_large", lambda *a: taken.append(1) or evaluate_large(*a))
    test_combined.test_gradients_against_central_differences_of_the_reference(form)
    assert taken


def test_gradients_against_central_differences_of_the_oracle(two_rows):
    """dq, dk, dv, dbias of a causal GQA spec with a bias and a softcap against central differences of
    oracle.steps, the loss being Σ dout∘head."""
    data = kernel(11, H=2, H_kv=1, L=5, S=6, E=2, causal=True, align="bottom_right", softcap=3,
                  bias=floats(np.random.default_rng(12), 2, 5, 6))  # fmt: skip
    truth = symattn.evaluate(symattn.load_spec(data), digits=12, grad=True, steps=["dq2", "dk1", "dv1", "dbias2"])
    assert truth.method == "intervals"
    dps = 40
    plain = {key: value.astype(np.float64).tolist() if isinstance(value, np.ndarray) else value
             for key, value in data.items()}  # fmt: skip

    def loss(changed):
        out = oracle.steps(changed, dps)
        return mpmath.fsum(
            mpmath.mpf(plain["dout"][h][i][c]) * out[f"head{h + 1}"][i, c]
            for h in range(2)
            for i in range(5)
            for c in range(2)
        )

    picks = [("dq2", "q", (1, 3, 0)), ("dq2", "q", (1, 0, 1)), ("dk1", "k", (0, 4, 1)), ("dk1", "k", (0, 0, 0)),
             ("dv1", "v", (0, 2, 1)), ("dv1", "v", (0, 5, 0)), ("dbias2", "bias", (1, 4, 5))]  # fmt: skip
    with mpmath.workdps(dps):
        step = mpmath.mpf(10) ** -15
        for name, key, (h, i, j) in picks:

            def f(t, key=key, h=h, i=i, j=j):
                changed = {**plain, key: [[list(r) for r in m] for m in plain[key]]}
                changed[key][h][i][j] = t
                return loss(changed)

            x = mpmath.mpf(plain[key][h][i][j])
            want = (f(x + step) - f(x - step)) / (2 * step)
            got = mpmath.mpf(truth[name].values[i][j])
            assert abs(got - want) <= mpmath.mpf(10) ** -11 * max(1, abs(want)), (name, i, j, got, want)


def cancelling(tiny: float) -> dict:
    """dK and dV cancelling: query rows in equal pairs (so are their weights) whose cotangents are opposite,
    but for ``tiny`` times another pattern: dv = Σ p·dout and dk = Σ ds·q·scale are ``tiny``-sized (0 for 0)."""
    rng = np.random.default_rng(21)
    H, L, S, E = 1, 8, 5, 3
    q = np.repeat(floats(rng, H, L // 2, E), 2, axis=1)
    dout = np.repeat(floats(rng, H, L // 2, E), 2, axis=1).astype(np.float64)
    dout[:, 1::2] *= -1
    dout[:, 1::2] += tiny * floats(rng, H, L // 2, E)  # float64: the pattern is not rounded away
    return {"q": q, "k": floats(rng, H, S, E), "v": floats(rng, H, S, E), "dout": dout}


@pytest.mark.parametrize("tiny", [0.0, 2.0**-20])
def test_cancelling_key_and_value_gradients_get_right_digits_or_honest_bounds(tiny, two_rows):
    spec = symattn.load_spec(cancelling(tiny))
    names = ["dq1", "dk1", "dv1"]
    small = symattn.evaluate(spec, digits=REF_DIGITS, steps=names)
    large = symattn.evaluate(spec, digits=12, steps=names)
    assert oracle.agree(large, as_reference(small, names), names, dps=REF_DIGITS) == 8 * 3 + 2 * 5 * 3
    dv = large.known["dv1"]
    if tiny:
        assert not dv.bounds and all(d == 12 for row in large["dv1"].certified_digits for d in row)
    else:  # the enclosures straddle 0 and nothing decides a sum over every query: bounds, never a false 0
        assert dv.bounds and all(text.startswith("<") for text in np.asarray(large["dv1"].values).reshape(-1))


def test_sums_the_enclosures_leave_get_the_digits_they_prove(two_rows, monkeypatch):
    """Beyond ARB_SUMS (0 here), a cancelling dv entry is not computed again in Arb (it would take the whole
    graph): it gets the digits its enclosure proves, and a note says so."""
    monkeypatch.setattr(symattn.truth.large, "ARB_SUMS", 0)
    spec = symattn.load_spec(cancelling(2.0**-36))
    small = symattn.evaluate(spec, digits=REF_DIGITS, steps=["dv1"])
    large = symattn.evaluate(spec, digits=12, steps=["dv1"])
    assert oracle.agree(large, as_reference(small, ["dv1"]), ["dv1"], dps=REF_DIGITS) == 15
    digits = [d for row in large["dv1"].certified_digits for d in row]
    assert min(digits) < 12 and large.notes
    assert "summed over every query row certified to fewer than 12 digits" in large.notes[0]


def test_the_centred_cotangent_does_not_cancel_at_a_weight_near_one():
    """g_j − Σ g∘p where p_j = 1 − 4e-18: its value, about 1e-17, enclosed to 1e-15 relatively (the plain
    difference would leave an absolute 1e-19, relatively 1e-2), against mpmath."""
    xp = IntervalXP()
    s = np.array([[40.0, 0.0, 0.5, -1.0]])
    g = np.array([[0.75, -1.5, 2.0, 0.25]])
    with np.errstate(all="ignore"):
        out = xp.centered(Iv(g), xp.softmax(Iv(s)))
    with mpmath.workdps(60):
        e = [mpmath.exp(mpmath.mpf(x)) for x in s[0]]
        weights = [x / mpmath.fsum(e) for x in e]
        mean = mpmath.fsum(w * mpmath.mpf(x) for w, x in zip(weights, g[0], strict=True))
        for j in range(4):
            exact = mpmath.mpf(g[0, j]) - mean
            center = mpmath.mpf(float(out.hi[0, j])) + mpmath.mpf(float(out.lo[0, j]))
            assert abs(center - exact) <= mpmath.mpf(float(out.rad[0, j])), (j, center, exact)
            assert out.rad[0, j] <= 1e-15 * abs(float(exact)), (j, out.rad[0, j], exact)


def test_a_missing_rowsum_fails_and_a_right_float32_backward_passes_at_1024_tokens():
    """verify --backward on the large path (truth, budgets and reference runs by blocks of query rows)."""
    rng = np.random.default_rng(31)
    data = {name: floats(rng, 1, 1024, 8) for name in ("q", "k", "v", "dout")} | {"causal": True}
    right, missing_rowsum = symattn.verify(
        data, [impls.flash_backward, impls.BACKWARD_BUGS[0]], dtype="float32", backward=True
    )
    assert right.passed, right.lines()
    assert missing_rowsum.verdict == "FAIL" and "beyond the kappa bound" in missing_rowsum.reasons[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_verify_backward_of_the_projection_form_by_blocks(dtype, two_rows, monkeypatch):
    """The verifier's truth, budgets and reference runs by blocks of two query rows on the projection form: dx is
    each block's rows' share plus every block's share through the keys and values, dwq…dwo sums of the
    blocks'; a right backward passes and every classic bug fails."""
    rng = np.random.default_rng(41)
    H, H_kv, L, d, E = 4, 2, 6, 3, 2
    data = {
        "x": floats(rng, L, d),
        "heads": [{"wq": floats(rng, d, E)} for _ in range(H)],
        "kv_heads": [{"wk": floats(rng, d, E), "wv": floats(rng, d, E)} for _ in range(H_kv)],
        "wo": floats(rng, H * E, 2),
        "dout": floats(rng, L, 2),
        "causal": True,
    }
    taken = []
    evaluate_large = symattn.truth.large.evaluate_large
    monkeypatch.setattr(symattn.truth.large, "evaluate_large", lambda *a: taken.append(1) or evaluate_large(*a))
    results = symattn.verify(data, [impls.projection_backward] + impls.PROJECTION_BACKWARD_BUGS, dtype=dtype,
                             backward=True, digits=12)  # fmt: skip
    assert taken
    assert results[0].passed, results[0].lines()
    for r in results[1:]:
        assert r.verdict == "FAIL", (r.name, r.lines())
    context = Context(symattn.load_spec(data), dtype, backward=True, digits=12)  # every block's share in its runs
    for target, error in zip(context.targets, context.target_reference_error, strict=True):
        assert error <= 1e-5, (target.name, error)
