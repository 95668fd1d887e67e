"""Attention variants through every layer: masks, causal, windows, alignment, bias, ALiBi, softcap, GQA,
cross-attention, projection biases and empty rows (issue 10)."""

from __future__ import annotations

import json

import mpmath
import pytest

import symattn
from symattn import SymattnError
from symattn.cli import main
from tests import oracle
from tests.test_verify import result
from tools import impls


def base(**options) -> dict:
    data = {
        "x": [[1, 0, 2], [0, 1, -1], [2, 1, 0], [1, -1, 1]],
        "heads": [
            {"wq": [[1, 0], [0, 1], [1, 1]], "wk": [[0, 1], [1, 0], [1, -1]], "wv": [[1, 0], [0, -1], [2, 1]]},
            {"wq": [[0, 1], [1, 1], [0, -1]], "wk": [[1, 0], [0, 1], [0, 0]], "wv": [[0, 1], [-1, 0], [1, 1]]},
        ],
        "wo": [[1, 0], [0, 1], [-1, 0], [0, -1]],
    }
    data.update(options)
    return data


def gqa(**options) -> dict:
    heads = [{"wq": [[1, 0], [0, 1], [1, 1]]}, {"wq": [[0, 1], [1, 1], [0, -1]]},
             {"wq": [[1, 1], [0, 1], [1, 0]]}, {"wq": [[2, 0], [0, 1], [-1, 1]]}]  # fmt: skip
    kv = [
        {"wk": [[0, 1], [1, 0], [1, -1]], "wv": [[1, 0], [0, -1], [2, 1]]},
        {"wk": [[1, 0], [0, 1], [0, 0]], "wv": [[0, 1], [-1, 0], [1, 1]]},
    ]
    data = base(heads=heads, kv_heads=kv, wo=[[1, 0], [0, 1]] * 4)
    data.update(options)
    return data


CROSS = base(x=[[1, 0, 2], [0, 1, -1]], x_kv=[[1, 0, 2], [0, 1, -1], [2, 1, 0], [1, -1, 1], [0, 0, 1]])
MASK = [[True, False, True, True], [True, True, False, True], [False, True, True, True], [True, True, True, False]]

# each spec, and the bugs that must fail on it (every right implementation must pass it)
CASES = {
    "causal": (base(causal=True), ["causal_off_by_one"]),
    "bottom_right": (dict(CROSS, causal=True, align="bottom_right"), ["wrong_alignment", "causal_off_by_one"]),
    "mask": (base(mask=MASK), ["inverted_mask"]),
    "window": (base(window=[1, 1]), ["window_off_by_one"]),
    "gqa": (gqa(), ["gqa_tiled"]),
    "softcap": (base(softcap="3/2", scale="1/3"), ["softcap_before_scaling"]),
    "alibi": (base(alibi=True), ["alibi_sign"]),
    "empty": (base(mask=[[True] * 4, [False] * 4, [True] * 4, [True] * 4]), ["nan_on_empty_rows"]),
    "bias and projection biases": (
        base(
            bias=[[0, 1, 0, "-1/2"]] * 4,
            bo=[1, -1],
            heads=[
                {
                    "wq": [[1, 0], [0, 1], [1, 1]],
                    "wk": [[0, 1], [1, 0], [1, -1]],
                    "wv": [[1, 0], [0, -1], [2, 1]],
                    "bq": [1, 0],
                    "bk": [0, "1/2"],
                    "bv": [1, 1],
                },
                {"wq": [[0, 1], [1, 1], [0, -1]], "wk": [[1, 0], [0, 1], [0, 0]], "wv": [[0, 1], [-1, 0], [1, 1]]},
            ],
        ),
        [],
    ),  # fmt: skip
    "uniform and nan": (
        base(causal=True, mask=[[True] * 4, [False] * 4, [True] * 4, [True] * 4], empty_row="uniform"),
        [],
    ),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_right_passes_and_each_classic_bug_fails(case, dtype):
    data, bugs = CASES[case]
    right = result(impls.general, data, dtype)
    assert right.passed, right.lines()
    for bug in impls.VARIANT_BUGS:
        r = result(bug, data, dtype)
        if bug.__name__ in bugs:
            assert r.verdict == "FAIL", (case, bug.__name__, r.lines())


def test_generated_code_passes_every_case():
    from symattn.cli import default_impls

    for case, (data, _) in CASES.items():
        spec = symattn.load_spec(data)
        (generated,) = [r for r in symattn.verify(spec, default_impls(spec)) if r.name == "generated"]
        assert generated.passed, (case, generated.lines())


def test_masked_weights_are_exact_zeros_and_masked_scores_are_not_numbers(capsys):
    truth = symattn.evaluate(base(causal=True), digits=10)
    assert truth["weights1"].values[0][1:] == ("0", "0", "0")
    assert truth["weights1"].exact[0][1]
    assert truth["scores1"].values[0][1:] == ("-inf",) * 3
    assert truth["scores1"].certified_digits[0][1:] == (0, 0, 0)
    assert main(["show", "causal", "--step", "scores1", "--format", "str"]) == 0  # the built-in example
    assert "-inf" in capsys.readouterr().out


def test_json_prints_masked_scores_as_null(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base(causal=True)))
    assert main(["eval", str(path), "--json", "--digits", "5", "--step", "scores1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"]["scores1"]["values"][0][1] is None
    assert doc["steps"]["scores1"]["certified_digits"][0][1] == 0


# the kernel form (q, k, v given) with the same options: GQA, masks per head, empty rows, alignment
Q3 = [[[1, 0], [0, 1], [1, 1]], [[0, 1], ["1/2", 0], [1, -1]], [[2, 0], [0, 0], [-1, 1]], [[0, 0], [1, 1], [0, 2]]]
K4 = [[[1, 0], [0, 1], [1, -1], [0, 0]], [[0, 1], [1, 1], [-1, 0], [2, 1]]]
V4 = [[[1, 2, 0], [0, -1, 1], [3, 0, 1], [1, 1, 1]], [[0, 1, 1], [-1, 0, 2], [1, 1, 0], [0, 0, "1/4"]]]
PER_HEAD_MASK = [[[True, True, False, False]] * 3, [[False] * 4, [True] * 4, [True, False, True, False]],
                 [[True] * 4] * 3, [[False, False, False, True]] * 3]  # fmt: skip
KERNEL_CASES = {
    "kernel gqa causal bottom_right": {"q": Q3, "k": K4, "v": V4, "causal": True, "align": "bottom_right"},
    "kernel window alibi softcap": {"q": Q3, "k": K4, "v": V4, "window": [0, 1], "alibi": True, "softcap": 2},
    "kernel per-head mask and bias, uniform": {"q": Q3, "k": K4, "v": V4, "mask": PER_HEAD_MASK,
                                               "bias": [[[0, 1, "-1/2", 0]] * 3] * 4, "empty_row": "uniform"},
    "kernel alibi slopes, nan rows": {"q": Q3, "k": K4, "v": V4, "alibi": [1, "1/2", 0, 2], "scale": "1/3",
                                      "mask": PER_HEAD_MASK, "empty_row": "nan"},
}  # fmt: skip
EVERY_CASE = {**{case: data for case, (data, _) in CASES.items()}, **KERNEL_CASES}
EVERY_CASE["nan rows, alibi of 3 heads"] = base(
    heads=base()["heads"] + [base()["heads"][0]], wo=[[1, 0], [0, 1]] * 3, alibi=True,
    mask=[[True] * 4, [False] * 4, [True, True, False, False], [True] * 4], empty_row="nan",
)  # fmt: skip


@pytest.mark.parametrize("case", list(EVERY_CASE))
def test_every_step_agrees_with_an_independent_reference(case):
    data = EVERY_CASE[case]
    truth = symattn.evaluate(data, digits=30)
    ref = oracle.steps(data, 80)
    assert sorted(truth.names) == sorted(ref)  # every step named as DESIGN.md says, none missing
    assert oracle.agree(truth, ref, truth.names, 80) == sum(r.rows * r.cols for r in ref.values())


def test_the_reference_knows_the_rules():
    """The reference's own rules, pinned on hand-checked values (so a shared misreading cannot pass)."""
    assert [mpmath.mpf(1) / s for s in oracle.standard_slopes(3)] == [16, 256, 4]  # DESIGN.md: H = 3
    assert [mpmath.mpf(1) / s for s in oracle.standard_slopes(4)] == [4, 16, 64, 256]
    rules = {"causal": True, "align": "bottom_right", "window": [1, 0]}
    assert oracle.allowed(rules, None, 2, 4) == [[False, True, True, False], [False, False, True, True]]
    ref = oracle.steps(EVERY_CASE["empty"])
    assert ref["scores1"][1, 0] == -mpmath.inf and ref["weights1"][1, 3] == 0 and ref["M"][1, 0] == 0
    ref = oracle.steps(EVERY_CASE["uniform and nan"])
    assert ref["weights2"][1, 2] == mpmath.mpf(1) / 4


def test_exact_decisions_with_rational_bias_and_alibi():
    # two identical heads subtracted: with a rational bias and ALiBi, M is decided exactly 0
    data = base(bias=[[0, "1/2", 0, 1]] * 4, alibi=[1, 1], wo=[[1, 0], [0, 1], [-1, 0], [0, -1]])
    data["heads"] = [data["heads"][0], data["heads"][0]]
    truth = symattn.evaluate(data, digits=20, steps=["M"])
    assert truth["M"].values == (("0", "0"),) * 4 and all(all(r) for r in truth["M"].exact)


def test_softcap_digits_are_certified_and_a_possible_zero_is_a_bound_or_decided():
    data = base(softcap=2)
    data["heads"] = [data["heads"][0], data["heads"][0]]
    truth = symattn.evaluate(data, digits=15, steps=["M"])
    # head1 - head2 with equal heads: formally identical under softcap too, so exactly 0 (never a false digit)
    for row in truth["M"].values:
        for v in row:
            assert v == "0" or v.startswith("<")


def test_show_prints_each_definition_with_its_options(capsys):
    data = dict(CROSS, causal=True, align="bottom_right", bias=[[0] * 5] * 2, alibi=True, softcap=5)
    symattn.load_spec(data)
    trace = symattn.build(data)
    assert trace.definition("scores1") == (
        "scores1 = softcap(Q1·K1ᵀ·scale) + bias1 - alibi1, scale = sqrt(2)/2, softcap = 5, alibi1 = 1/16·|i + 3 - j|"
    )
    assert trace.definition("weights1") == "weights1 = softmax(scores1, causal bottom-right) by rows"
    assert trace.definition("K1") == "K1 = x_kv·wk1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask": [[True, False]]}, r"^mask: shape mismatch: expected shape 4×4 \(L × S\), received 1×2$"),
        ({"mask": [[1, 0, 1, 1]] * 4}, r"^mask: expected booleans \(true = attend\), received 1$"),
        ({"window": [-1, 2]}, r"^window: expected the left side to be >= 0 \(null for unbounded\), received -1$"),
        (
            {"window": [1]},
            r"^window: expected \[left, right\] \(integers >= 0, or null for unbounded\), received \[1\]$",
        ),
        ({"softcap": 0}, r"^softcap: expected a number > 0, received 0$"),
        ({"softcap": "-1/2"}, r"^softcap: expected a number > 0, received -1/2$"),
        ({"align": "top"}, r"^align: expected one of top_left, bottom_right, received 'top'$"),
        ({"empty_row": "drop"}, r"^empty_row: expected one of zero, uniform, nan, received 'drop'$"),
        ({"causal": "yes"}, r"^causal: expected true or false, received 'yes'$"),
        ({"alibi": [1]}, r"^alibi: expected true or a list of 2 slopes \(one per query head\), received \[1\]$"),
        ({"bias": [[0, 0]]}, r"^bias: shape mismatch: expected shape 4×4 \(L × S\), received 1×2$"),
        ({"x_kv": [[1, 2], [3, 4]]}, r"^heads\[0\]\.wk: shape mismatch: expected shape 2×2 \(d_model from x_kv"),
        ({"bo": [1, 2, 3]}, r"^bo: expected 2 entries \(d_out\), received 3$"),
    ],
)
def test_bad_variant_options_are_one_line_errors(change, message):
    with pytest.raises(SymattnError, match=message):
        symattn.load_spec(base(**change))


def test_kv_heads_must_divide_the_query_heads():
    data = gqa()
    data["kv_heads"] = data["kv_heads"] + [data["kv_heads"][0]]
    with pytest.raises(
        SymattnError, match=r"^kv_heads: expected a number of kv heads that divides the 4 query heads, received 3$"
    ):
        symattn.load_spec(data)


def test_align_without_causal_window_or_alibi_is_accepted_and_changes_nothing():
    plain = symattn.evaluate(CROSS, digits=12, steps=["M"])
    aligned = symattn.evaluate(dict(CROSS, align="bottom_right"), digits=12, steps=["M"])
    assert plain["M"].values == aligned["M"].values
