"""The large path at its edges: exact rounding ties, exact values, magnitudes near float64's limits, empty rows.

Every value is compared with an mpmath computation written here, apart from the package: the kernel form's
attention at 400 digits from the exact (dyadic) inputs, rounded half to even to the digits printed.
"""

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import ml_dtypes
import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symattn
import symattn.truth.large
from symattn import certify

DPS = 400  # weights as close to 1 as 1 - 1e-157 (scores 360 apart) must still round right


def reference_heads(q, k, v, causal=False, mask=None, empty_row="zero", softcap=None) -> list:
    """Each head's output (H lists of L × E_v mpf rows), from the float inputs' exact values, at DPS digits."""
    with mpmath.workdps(DPS):
        H, L, E = q.shape
        H_kv, S, _ = k.shape
        scale = 1 / mpmath.sqrt(E)
        out = []
        for h in range(H):
            g = h * H_kv // H
            rows = []
            for i in range(L):
                keys = [j for j in range(S) if (not causal or j <= i) and (mask is None or mask[i][j])]
                if not keys:
                    fill = {"zero": 0, "nan": mpmath.nan}.get(empty_row)
                    if fill is None:  # uniform: the mean of every key's value
                        rows.append([mpmath.fsum(mpmath.mpf(float(v[g, j, c])) for j in range(S)) / S
                                     for c in range(v.shape[2])])  # fmt: skip
                    else:
                        rows.append([mpmath.mpf(fill)] * v.shape[2])
                    continue
                scores = []
                for j in keys:
                    s = mpmath.fsum(
                        mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q[h, i], k[g, j], strict=True)
                    )
                    s *= scale
                    if softcap is not None:
                        s = softcap * mpmath.tanh(s / softcap)
                    scores.append(s)
                top = max(scores)
                e = [mpmath.exp(s - top) for s in scores]
                z = mpmath.fsum(e)
                rows.append(
                    [mpmath.fsum(w * mpmath.mpf(float(v[g, j, c])) for w, j in zip(e, keys, strict=True)) / z
                     for c in range(v.shape[2])]
                )  # fmt: skip
            out.append(rows)
        return out


def rounded(value, digits: int) -> str:
    """The reference rounded half to even to ``digits`` significant digits, as a Decimal string."""
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = digits, ROUND_HALF_EVEN
        return str(+Decimal(mpmath.nstr(value, DPS, strip_zeros=False)))


def assert_matches(truth, heads, digits: int, bounds=False) -> None:
    """Every printed value is the reference rounded to its certified digits: ``digits`` of them unless a note
    says fewer; near-zeros may be bounds ("<1e-N", 1e-15 below the step's largest entry) when ``bounds``."""
    for h, rows in enumerate(heads):
        step = truth[f"head{h + 1}"]
        for i, row in enumerate(rows):
            for c, value in enumerate(row):
                text, got = step.values[i][c], step.certified_digits[i][c]
                where = f"head{h + 1}[{i}, {c}]"
                if mpmath.isnan(value):
                    assert text == "nan", where
                elif text.startswith("<"):
                    assert bounds and abs(value) < mpmath.mpf(text[1:]), f"{where}: {text} for {value}"
                elif value == 0:
                    assert text == "0", f"{where}: {text}"
                else:
                    assert "nan" not in text, f"{where}: {text} for {value}"
                    assert got == digits or (truth.notes and 0 < got < digits), f"{where}: {got} digits"
                    assert Decimal(text) == Decimal(rounded(value, got)), f"{where}: {text} vs {value}"


def bf16(a):
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_rounding_ties_are_decided_exactly(large_everywhere):
    rng = np.random.default_rng(0)
    H, L, E = 2, 24, 8
    q, k, v = (bf16(rng.standard_normal((H, L, E))) for _ in range(3))
    v[0, :2, 5] = -0.09228515625  # row 1 sees keys 0, 1: its output is that value, a tie at 9 digits
    v[1, :, 3] = 1.0078125  # a constant column: every output is 1.0078125, a tie at 7 digits (and at 9: no)
    v[0, 0, 6] = 0.5078125  # row 0 sees one key: a tie at 3 digits, exact at 9
    q[0, 7] = 0  # row 7's scores all 0: uniform weights over 8 keys, the mean of V's column
    v[0, :8, 2] = [0.25, 0.5, 0.75, -0.25, 0.125, 0.375, 0.0, 0.0]  # mean 0.21875: a tie at 4 digits
    spec = {"q": q, "k": k, "v": v, "causal": True}
    heads = reference_heads(q, k, v, causal=True)
    for digits in (9, 7, 4, 3):
        truth = symattn.evaluate(spec, digits=digits, steps=["head1", "head2"])
        assert truth.method == "intervals"
        assert truth.notes == []
        assert_matches(truth, heads, digits)
    truth = symattn.evaluate(spec, digits=9, steps=["head1"])
    assert truth["head1"].values[1][5] == "-0.0922851562"
    assert symattn.evaluate(spec, digits=4, steps=["head1"])["head1"].values[7][2] == "0.2188"
    assert symattn.evaluate(spec, digits=7, steps=["head2"])["head2"].values[5][3] == "1.007812"


def test_a_tie_the_exact_form_cannot_reach_gets_fewer_digits_and_a_note(large_everywhere, monkeypatch):
    monkeypatch.setattr(symattn.truth.large, "EXACT_ROW_TERMS", 0)  # no exact forms: only the balls are left
    rng = np.random.default_rng(1)
    q, k, v = (bf16(rng.standard_normal((1, 12, 4))) for _ in range(3))
    k[0, :6] = k[0, 0]  # rows 0-5 see equal keys: uniform weights (q is not 0: only their exact forms could tell)
    v[0, :6, 1] = [0.5, 0.25, 0.75, 0.5, 0.125, -0.25]  # row 5's mean 0.3125, a tie at 3 (rows 0-4 are not)
    spec = {"q": q, "k": k, "v": v, "causal": True}
    truth = symattn.evaluate(spec, digits=3, steps=["head1"])
    assert truth["head1"].values[5][1] == "0.31" and truth["head1"].certified_digits[5][1] == 2
    assert truth.notes == [
        "1 entries certified to fewer than 3 digits: their enclosures straddle a rounding boundary at the highest "
        "precision tried and their exact forms did not decide them (e.g. head1[5, 1], 2 digits)"
    ]
    assert_matches(truth, reference_heads(q, k, v, causal=True), 3)
    assert abs(truth["head1"].to_numpy()[5, 1] - 0.3125) < 1e-15  # measurements read the midpoint, not 0.31


def test_notes_reach_eval_json_and_verify(large_everywhere, monkeypatch, tmp_path, capsys):
    import json

    from symattn.cli import main
    from tools import impls

    monkeypatch.setattr(symattn.truth.large, "EXACT_ROW_TERMS", 0)
    rng = np.random.default_rng(1)
    q, k, v = (bf16(rng.standard_normal((1, 12, 4))) for _ in range(3))
    k[0, :6] = k[0, 0]
    v[0, :6, 1] = [0.5, 0.25, 0.75, 0.5, 0.125, -0.25]
    path = tmp_path / "tie.npz"
    np.savez(path, q=q, k=k, v=v, causal=np.array(True))
    assert main(["eval", str(path), "--digits", "3", "--step", "head1"]) == 0
    out = capsys.readouterr().out
    assert " 0.31 " in out.splitlines()[8] and out.splitlines()[-1].startswith("note: 1 entries certified to fewer")
    assert main(["eval", str(path), "--digits", "3", "--step", "head1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"]["head1"]["certified_digits"][5][1] == 2 and len(doc["notes"]) == 1
    (result,) = symattn.verify(str(path), [impls.kernel_straightforward], dtype="float64", digits=3)
    assert result.verdict == "PASS" and any(n.startswith("truth: 1 entries certified") for n in result.notes)


@pytest.mark.parametrize(
    "scaling",
    [(1, 1, 1e302), (1e155, 1e155, 1), (1e200, 1e200, 1), (1, 1, 1e-300), (2.0**500, 2.0**-520, 1e307)],
    ids=str,
)
def test_magnitudes_near_float64_limits_are_never_nan(large_everywhere, scaling):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 10, 4)) * s for s in (scaling))
    spec = {"q": q, "k": k, "v": v, "causal": True}
    truth = symattn.evaluate(spec, digits=12, steps=["head1", "head2"])
    assert_matches(truth, reference_heads(q, k, v, causal=True), 12)


@pytest.mark.parametrize("empty_row", ["zero", "uniform", "nan"])
def test_empty_rows_follow_the_spec_exactly(large_everywhere, empty_row):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 6, 3)) for _ in range(3))
    mask = np.ones((6, 6), dtype=bool)
    mask[2] = False
    spec = {"q": q, "k": k, "v": v, "mask": mask, "empty_row": empty_row}
    truth = symattn.evaluate(spec, digits=12, steps=["weights1", "head1"])
    assert_matches(truth, reference_heads(q, k, v, mask=mask, empty_row=empty_row), 12)
    if empty_row == "zero":
        assert truth["head1"].values[2] == ("0",) * 3 and truth["weights1"].values[2] == ("0",) * 6


def test_verify_fails_non_finite_output_where_the_truth_is_finite(large_everywhere):
    from tools import impls

    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 10, 4)) * 1e302
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True})

    def overflows(q, k, v, **options):
        out = impls.kernel_straightforward(q, k, v, **options)
        out[0, 3, 1] = np.nan
        out[1, 4, 2] = np.inf
        return out

    right, wrong = symattn.verify(spec, [impls.kernel_straightforward, overflows], dtype="float64")
    assert right.verdict == "PASS", right.text()
    assert wrong.verdict == "FAIL"


def test_a_right_bfloat16_kernel_passes_on_ties(large_everywhere):
    from tools import impls

    rng = np.random.default_rng(5)
    q, k, v = (bf16(rng.standard_normal((2, 32, 16))) for _ in range(3))
    v[:, :2, 5] = -0.09228515625
    v[1, :, 7] = 1.0078125
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True})
    for result in symattn.verify(spec, [impls.kernel_upcast, impls.kernel_straightforward], dtype="bfloat16"):
        assert result.verdict == "PASS", result.text()


VALUES = st.sampled_from([0.0, 0.25, -0.5, 1.0078125, -0.09228515625, 0.375, 3.0, -1.5])


@st.composite
def tie_specs(draw):
    """Small kernel-form specs whose values come from a few dyadic numbers (equal values, constant columns,
    outputs on rounding ties) and whose magnitudes reach 1e307."""
    H, L, E = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
    shape = (H, L, E)
    q = np.array(draw(st.lists(VALUES, min_size=H * L * E, max_size=H * L * E)), dtype=np.float64).reshape(shape)
    k = np.array(draw(st.lists(VALUES, min_size=H * L * E, max_size=H * L * E)), dtype=np.float64).reshape(shape)
    v = np.array(draw(st.lists(VALUES, min_size=H * L * E, max_size=H * L * E)), dtype=np.float64).reshape(shape)
    if draw(st.booleans()):
        v[..., 0] = draw(VALUES)  # a constant column
    v *= draw(st.sampled_from([1.0, 2.0**-600, 1e300, 1e307]))
    q *= draw(st.sampled_from([1.0, 40.0]))
    return {"q": q, "k": k, "v": v, "causal": draw(st.booleans())}, draw(st.integers(2, 12))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tie_specs())
def test_large_path_agrees_with_mpmath_on_ties_and_magnitudes(large_everywhere, case):
    data, digits = case
    truth = symattn.evaluate(data, digits=digits, steps=[f"head{h + 1}" for h in range(data["q"].shape[0])])
    assert truth.method == "intervals"
    heads = reference_heads(data["q"], data["k"], data["v"], causal=data["causal"])
    assert_matches(truth, heads, digits, bounds=True)


def test_settle_by_side_needs_neighbouring_roundings():
    # [0.1230, 0.1250] at 3 digits rounds to 0.123 and 0.125: not neighbours, so no side decides it
    assert certify.settle_by_side(1230, 1250, -4, 3, lambda boundary: 1) is None
    assert certify.settle_by_side(1234, 1236, -4, 3, lambda boundary: 1) == "0.124"
    assert certify.settle_by_side(9994, 9996, -4, 3, lambda boundary: -1) == "0.999"
    assert certify.settle_by_side(9994, 9996, -4, 3, lambda boundary: 1) == "1.00"
    # 0 has no neighbour: [0, 0.001] at 1 digit must not settle as "0" (nor [-0.001, 0])
    assert certify.settle_by_side(0, 10, -4, 1, lambda boundary: -1) is None
    assert certify.settle_by_side(-10, 0, -4, 1, lambda boundary: 1) is None


def test_a_nan_row_of_one_head_leaves_the_other_heads_columns_of_concat_heads_finite(large_everywhere):
    # head 1 has an empty row under "nan"; head 2's values are near 1e305, so its enclosures overflow and go to Arb:
    # only head 1's columns of concat_heads are nan
    eye = [[1, 0], [0, 1]]
    mask = [[False, False, False], [True, True, True], [True, True, True]]
    data = {
        "x": [[1, 0], [0, 1], [1, 1]],
        "heads": [{"wq": eye, "wk": eye, "wv": eye}, {"wq": eye, "wk": eye, "wv": [[1e305, 0], [0, 1e305]]}],
        "wo": [[1, 0], [0, 1], [0, 0], [0, 0]],
        "mask": [mask, [[True] * 3] * 3],
        "empty_row": "nan",
    }
    large = symattn.evaluate(data, digits=6, steps=["concat_heads"])
    small = symattn.evaluate(data, digits=6, steps=["concat_heads"], engine="arb")
    assert large["concat_heads"].values == small["concat_heads"].values
    assert large["concat_heads"].values[0][:2] == ("nan", "nan") and "nan" not in large["concat_heads"].values[0][2:]


def test_blocks_whose_rows_see_no_key(large_everywhere, monkeypatch):
    # L > S, causal, bottom_right: the first L - S rows are empty; with small blocks some blocks see no key at all
    monkeypatch.setattr(symattn.truth.large, "BLOCK", 8)
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((1, 12, 3)), rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 4, 2))
    truth = symattn.evaluate({"q": q, "k": k, "v": v, "causal": True, "align": "bottom_right"}, digits=9)
    mask = [[j <= i - 8 for j in range(4)] for i in range(12)]
    assert_matches(truth, reference_heads(q, k, v, mask=mask), 9)


def test_a_power_of_two_scale_that_underflows_is_enclosed(large_everywhere):
    # scale 1/8 on subnormal q: the products are not exact, and must not print a wrong digit or a false 0
    q = np.zeros((1, 1, 64))
    q[0, 0, :2] = 9 * 2.0**-1074, 2.0**-1074
    k = np.zeros((1, 2, 64))
    k[0, 0, 0] = k[0, 1, 1] = 1.0
    spec = {"q": q, "k": k, "v": np.array([[[1.0], [2.0]]])}
    large = symattn.evaluate(spec, digits=6, steps=["scores1"])
    assert (
        large["scores1"].values == symattn.evaluate(spec, digits=6, steps=["scores1"], engine="arb")["scores1"].values
    )
    assert large["scores1"].values == (("5.55824e-324", "6.17582e-325"),)


def test_fixed_places_of_an_entry_settled_as_a_bound(large_everywhere):
    # head1[0, 0] ≈ -5e-21 is given as a bound on the large path; rounding it to places still works
    q, k = np.array([[[1.0]]]), np.array([[[0.0], [1e-20]]])
    truth = symattn.evaluate({"q": q, "k": k, "v": np.array([[[1.0, 1.0], [-1.0, 3.0]]]), "scale": 1}, digits=6)
    assert truth["head1"].values[0][0].startswith("<")
    assert truth.fixed("head1", 0, 0, 5) == 0 and truth.fixed("head1", 0, 1, 5) == 200000


def test_rows_of_equal_scores_output_the_mean_of_their_values(large_everywhere):
    # zero query rows: every visible score is 0, the weights 1/n, the output V's mean (a tie at 7 digits here),
    # decided from the inputs, without each row's exact form
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 16, 4))
    q[0, :12] = 0
    k = rng.standard_normal((1, 16, 4))
    v = np.where(np.arange(16)[:, None] % 2 == 0, 1.0, 1.015625) * np.ones((1, 16, 3))
    truth = symattn.evaluate({"q": q, "k": k, "v": v}, digits=7, steps=["head1"])
    assert truth["head1"].values[0] == ("1.007812",) * 3 and truth.notes == []
    assert_matches(truth, reference_heads(q, k, v), 7)
