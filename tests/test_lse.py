"""``lse{i}``: the log of each softmax row's denominator (sink included; -inf for a row with no key) through
every layer, against an mpmath reference written here: the scores of ``tests/oracle.py`` (or a dense mask spelled
out by hand for segments and mask_mod), each row's log Σ exp (``conftest.lse_row``), a sink appended to its row;
and the verifier with implementations written here that return ``(out, lse)``."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.cli import main
from symattn.testing import assert_attention_close
from tests import oracle
from tests.conftest import lse_row, parts, rounded_parts

DPS = 40
RNG = np.random.default_rng(19)


def kernel(H=2, H_kv=2, L=4, S=4, E=3, scale=1, **options) -> dict:
    rng = np.random.default_rng(H * 100 + L * 10 + S)
    data = {
        "q": rng.integers(-3, 4, (H, L, E)).tolist(),
        "k": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "v": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
    }
    return {**data, **options}


def lse_names(data) -> list:
    return [f"lse{h}" for h in range(1, len(data["q"]) + 1)]


PATHS = ["small", "large"]
DIGITS = {"small": 30, "large": 12}  # the large path certifies at most 15 digits


def truth_path(path: str, request) -> None:
    """The large path (float64 enclosures, Arb for what they leave) forced on these small specs, or not."""
    if path == "large":
        request.getfixturevalue("large_everywhere")


def check(data, ref=None, path="small") -> int:
    """Every lse entry certified (30 digits; 12 on the large path, which the test forced then) agrees with the
    reference (oracle's scores, by default)."""
    names = lse_names(data)
    truth = symattn.evaluate(data, digits=DIGITS[path], steps=names)
    assert (truth.method == "intervals") == (path == "large")
    ref = ref or oracle.steps(data, DPS)
    return oracle.agree(truth, ref, names, DPS)


CASES = {
    "plain": {},
    "causal top_left": {"causal": True},
    "causal bottom_right, L > S (empty rows)": {"causal": True, "align": "bottom_right", "L": 5, "S": 3},
    "causal bottom_right, L < S": {"causal": True, "align": "bottom_right", "L": 3, "S": 5},
    "window": {"window": [1, 0], "L": 5, "S": 5},
    "alibi": {"alibi": True, "causal": True},
    "softcap": {"softcap": "5/2", "scale": "1/2"},
    "bias": {"bias": [["1/2", 0, -1, 3], [0, 2, "-7/4", 1], [1, 1, 1, 1], [-2, 0, 0, "1/3"]]},
    "gqa": {"H": 4, "H_kv": 2, "causal": True},
    "mask with an empty row": {"mask": [[True, False, True, False], [False] * 4, [True] * 4, [False] * 3 + [True]]},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_lse_entry_against_mpmath(case):
    options = dict(CASES[case])
    shape = {key: options.pop(key) for key in ("H", "H_kv", "L", "S") if key in options}
    data = kernel(**shape, **options)
    assert check(data) == len(data["q"]) * len(data["q"][0])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_large_path_agrees(case, large_everywhere):
    options = dict(CASES[case])
    shape = {key: options.pop(key) for key in ("H", "H_kv", "L", "S") if key in options}
    data = kernel(**shape, **options)
    names = lse_names(data)
    truth = symattn.evaluate(data, digits=12, steps=names)
    assert truth.method == "intervals"
    assert oracle.agree(truth, oracle.steps(data, DPS), names, DPS) == len(data["q"]) * len(data["q"][0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("empty_row", ["zero", "uniform", "nan"])
def test_an_empty_row_is_minus_inf_under_every_empty_row(empty_row, path, request):
    truth_path(path, request)
    data = kernel(L=4, S=2, causal=True, align="bottom_right", empty_row=empty_row)  # rows 0, 1 see no key
    truth = symattn.evaluate(data, digits=10, steps=["lse1"])
    assert truth.method == ("intervals" if path == "large" else truth.method)
    assert [row[0] for row in truth["lse1"].values][:2] == ["-inf", "-inf"]
    assert truth["lse1"].certified_digits[0][0] == 0
    assert np.isneginf(truth["lse1"].to_numpy()[:2]).all()
    assert check(data, path=path) == 8


def test_the_steps_order_definitions_and_no_gradient_term():
    trace = symattn.build(kernel(causal=True, align="bottom_right", L=5, S=3), grad=True)
    assert trace.names[:4] == ["scores1", "weights1", "lse1", "head1"]
    assert trace.definition("lse1") == "lse1 = log Σ exp(scores1) by rows, -inf on rows with no allowed key"
    assert not any("lse" in s for s in trace.names if s.startswith("d"))
    assert not any("lse" in trace.definition(s) for s in trace.names if s.startswith("d"))
    sinks = symattn.build(kernel(sinks=[0, "1/2"]))
    assert sinks.definition("lse2") == "lse2 = log Σ exp(scores2 ∪ sink2) by rows"
    assert trace.shape("lse1") == (5, 1)


def test_closed_form_is_log_of_the_normaliser():
    trace = symattn.build("notebook")
    assert str(trace["lse1"][0, 0]) == "2*sqrt(2) + log(1 + exp(3*sqrt(2)))"


@pytest.mark.parametrize("path", PATHS)
def test_a_single_key_row_is_its_score_exactly(path, request):
    truth_path(path, request)
    # row 0 sees key 0 alone (causal): its lse is its score, q0·k0 = 0 for one head, 1/2 for the other
    data = {"q": [[[0, 1], [1, 1]], [[1, 0], [1, 1]]], "k": [[[1, 0], [2, 0]], [[1, 0], [2, 0]]],
            "v": [[[1], [2]], [[1], [2]]], "causal": True, "scale": "1/2"}  # fmt: skip
    truth = symattn.evaluate(data, digits=20, steps=["lse1", "lse2"])
    assert truth["lse1"].values[0][0] == "0"  # exactly 0: no digits to certify
    assert Decimal(truth["lse2"].values[0][0]) == Decimal("0.5") and truth["lse2"].certified_digits[0][0] == 20
    trace = symattn.build(data)
    assert trace["lse1"][0, 0] == 0 and trace["lse2"][0, 0] == symattn.build(data)["scores2"][0, 0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("magnitude", [10**4, 3 * 10**4, 10**6])
def test_large_magnitude_scores(magnitude, path, request):
    truth_path(path, request)
    data = {"q": [[[magnitude, 1], [-magnitude, 2], [0, 1]]], "k": [[[1, 0], [1, 1], ["1/2", -1]]],
            "v": [[[1], [2], [3]]], "scale": 1}  # fmt: skip
    truth = symattn.evaluate(data, digits=14, steps=["lse1"])
    assert oracle.agree(truth, oracle.steps(data, DPS + 10), ["lse1"], DPS + 10) == 3


def test_a_row_sum_just_above_one_keeps_its_digits():
    # scores [0, -1e6]: lse = log(1 + e**-1e6), about 10**-434295; the log of the sum would lose it
    data = {"q": [[[1000]]], "k": [[[0], [-1000]]], "v": [[[1], [2]]], "scale": 1}
    truth = symattn.evaluate(data, digits=12, steps=["lse1"])
    with mpmath.workdps(40):
        expected = mpmath.exp(-(10**6))  # log1p(x) = x to far more than 12 digits here
        assert parts(truth["lse1"].values[0][0]) == rounded_parts(expected, 12, 40)


@pytest.mark.parametrize("path", PATHS)
def test_sinks(path, request):
    truth_path(path, request)
    data = kernel(L=3, S=3, mask=[[True, False, False], [False] * 3, [True] * 3], sinks=["1/2", -2])
    mask = data["mask"]
    ref = {}
    with mpmath.workdps(DPS):
        scores = oracle.steps({k: v for k, v in data.items() if k != "sinks"}, DPS)
        for h, sink in enumerate((mpmath.mpf(1) / 2, mpmath.mpf(-2)), 1):
            s = scores[f"scores{h}"]
            rows = [[s[i, j] if mask[i][j] else -mpmath.inf for j in range(3)] + [sink] for i in range(3)]
            ref[f"lse{h}"] = mpmath.matrix([[lse_row(r)] for r in rows])
    assert check(data, ref, path) == 6
    truth = symattn.evaluate(data, digits=10, steps=["lse1", "lse2"])
    assert [Decimal(truth[n].values[1][0]) for n in ("lse1", "lse2")] == [Decimal("0.5"), -2]  # the sink alone


def _segment_mask(segments_q, segments_kv, L, S, causal, align) -> list:
    """The dense mask of packed sequences, written out here (positions from each segment's start)."""
    out = [[False] * S for _ in range(L)]
    for a in range(len(segments_q) - 1):
        q0, q1, k0, k1 = segments_q[a], segments_q[a + 1], segments_kv[a], segments_kv[a + 1]
        delta = (k1 - k0) - (q1 - q0) if align == "bottom_right" else 0
        for i in range(q0, q1):
            for j in range(k0, k1):
                out[i][j] = not causal or (j - k0) <= (i - q0) + delta
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_segments_with_an_empty_query_segment(align, path, request):
    truth_path(path, request)
    segments_q, segments_kv = [0, 2, 2, 5], [0, 1, 3, 5]  # segment 1 has no query; rows of segment 0 see 1 key
    data = kernel(L=5, S=5, segments_q=segments_q, segments_kv=segments_kv, causal=True, align=align)
    mask = _segment_mask(segments_q, segments_kv, 5, 5, True, align)
    plain = {k: v for k, v in data.items() if k not in ("segments_q", "segments_kv", "causal", "align")}
    assert check(data, oracle.steps({**plain, "mask": mask}, DPS), path) == 10


def test_segments_with_a_query_segment_without_keys_is_minus_inf():
    data = kernel(L=4, S=3, segments_q=[0, 2, 4], segments_kv=[0, 3, 3])  # segment 1's queries have no key
    truth = symattn.evaluate(data, digits=8, steps=["lse1"])
    assert [row[0] for row in truth["lse1"].values][2:] == ["-inf", "-inf"]


@pytest.mark.parametrize("path", PATHS)
def test_mask_mod(path, request):
    truth_path(path, request)
    data = kernel(L=4, S=4, mask_mod="doc[q_idx] == doc[kv_idx] and q_idx >= kv_idx", constants={"doc": [0, 0, 1, 1]})
    mask = [[j <= i and (i < 2) == (j < 2) for j in range(4)] for i in range(4)]
    plain = {k: v for k, v in data.items() if k not in ("mask_mod", "constants")}
    assert check(data, oracle.steps({**plain, "mask": mask}, DPS), path) == 8


@pytest.mark.parametrize("path", PATHS)
def test_dropout_does_not_touch_lse(path, request):
    truth_path(path, request)
    keep = [[True, False, True, True], [False, False, True, True], [True] * 4, [True, False, False, False]]
    data = kernel(dropout_p="1/4", dropout_mask=keep)
    plain = {k: v for k, v in data.items() if k not in ("dropout_p", "dropout_mask")}
    assert check(data, oracle.steps(plain, DPS), path) == 8


def test_projection_form():
    data = {"x": [[1, 2], [3, "-1/2"], [0, 1]], "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[0, 1], [1, 0]],
            "wv": [[1], [0]]}] * 2, "wo": [[1], [2]], "causal": True}  # fmt: skip
    truth = symattn.evaluate(data, digits=30, steps=["lse1", "lse2"])
    assert oracle.agree(truth, oracle.steps(data, DPS), ["lse1", "lse2"], DPS) == 6


def _module(text: str, path):
    import importlib.util

    path.write_text(text)
    loader = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_generated_intermediates_return_lse(tmp_path):
    for options in ({}, {"causal": True, "align": "bottom_right", "L": 5, "S": 3}, {"sinks": [1, "-1/2"]}):
        options = dict(options)
        shape = {key: options.pop(key) for key in ("L", "S") if key in options}
        data = kernel(**shape, **options)
        spec = symattn.load_spec(data)
        truth = symattn.evaluate(data, digits=20, steps=lse_names(data))
        for strategy, weights in (("vectorized", "folded"), ("vectorized", "inputs"), ("unrolled", "folded")):
            module = _module(symattn.generate(spec, strategy=strategy, weights=weights), tmp_path / "lse_module.py")
            q, k, v = (np.asarray(data[n], dtype=np.float64) for n in ("q", "k", "v"))
            kwargs = {}
            if weights == "inputs":
                kwargs = {key: data[key] for key in ("causal", "align") if key in data}
                if "sinks" in data:
                    kwargs["sinks"] = np.array([1.0, -0.5])
            steps = module.intermediates(q, k, v, **kwargs)
            for name in lse_names(data):
                assert steps[name].shape == (shape.get("L", 4), 1), (strategy, weights)
                np.testing.assert_allclose(steps[name], truth[name].to_numpy(), rtol=1e-14, atol=0)
            batched = module.intermediates(np.stack([q, q]), np.stack([k, k]), np.stack([v, v]), **kwargs)
            assert batched["lse1"].shape == (2, shape.get("L", 4), 1)


def test_show_and_eval_cli(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(kernel(L=3, S=2, causal=True, align="bottom_right")))
    assert main(["show", str(path), "--step", "lse1", "--format", "str"]) == 0
    out = capsys.readouterr().out
    assert "lse1 = log Σ exp(scores1) by rows, -inf on rows with no allowed key" in out
    assert "[[-inf]," in out
    assert main(["eval", str(path), "--digits", "6", "--step", "lse1"]) == 0
    assert "-inf" in capsys.readouterr().out
    assert main(["eval", str(path), "--digits", "6", "--step", "lse1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["steps"]["lse1"]
    assert doc["shape"] == [3, 1] and doc["values"][0] == [None] and doc["certified_digits"][0] == [0]
    assert doc["values"][1][0] is not None and doc["certified_digits"][1][0] == 6


# The verifier.


def _lse(s, allowed, sinks=None):
    """log Σ exp of the allowed scores by rows (float, shifted by the row's maximum), -inf for none."""
    s = np.where(allowed, s, -np.inf)
    if sinks is not None:
        s = np.concatenate([s, np.broadcast_to(sinks, s.shape[:-1] + (1,))], axis=-1)
    top = s.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(divide="ignore"):
        return (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]


def attention(q, k, v, *, scale, causal=False, align="top_left", mask=None, bug=None):
    """A right kernel-form implementation in the inputs' dtype (bfloat16 in float32) returning (out, lse), lse
    (H, L) in float32 for half types as FlashAttention's; ``bug`` plants a known LSE bug."""
    dtype = q.dtype
    work = np.float32 if dtype.itemsize < 4 else dtype.type
    q, k, v = (a.astype(work) for a in (q, k, v))
    H, L, _ = q.shape
    S = k.shape[1]
    rep = H // k.shape[0]
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    s = (q @ np.swapaxes(k, -1, -2)) * work(scale)
    allowed = np.ones((L, S), bool) if mask is None else np.asarray(mask, bool)
    if causal:
        delta = 0 if align == "top_left" else S - L
        allowed = allowed & (np.arange(S)[None, :] <= np.arange(L)[:, None] + delta)
    lse = _lse(s, allowed)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(allowed, np.exp(s - np.where(np.isfinite(lse), lse, 0)[..., None]), 0)
    out = (p @ v).astype(dtype)
    if bug == "base2":
        lse = lse / np.log(2)
    elif bug == "finite empty":  # FlashAttention's old -5e4 sentinel for a row with no key
        lse = np.where(np.isneginf(lse), -5e4, lse)
    elif bug == "gqa first head":  # every query head of a kv group gets its first head's lse
        lse = np.repeat(lse[::rep], rep, 0)
    lse = lse.astype(np.float32 if dtype.itemsize < 4 else dtype)
    return out, lse


def right(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    return attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask)


def right_dict(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    out, lse = attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask)
    return {"out": out, "lse": lse}


def base2(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    return attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask, bug="base2")


def finite_empty(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    return attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask, bug="finite empty")


def gqa_first_head(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    return attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask, bug="gqa first head")


def wrong_shape(q, k, v, *, scale, causal=False, align="top_left", mask=None):
    out, lse = attention(q, k, v, scale=scale, causal=causal, align=align, mask=mask)
    return out, lse[..., None]


def float_spec(H=4, H_kv=2, L=9, S=7, E=8, seed=0, **options) -> dict:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((H, L, E)) * 2, "k": rng.standard_normal((H_kv, S, E)) * 2,
            "v": rng.standard_normal((H_kv, S, E)), **options}  # fmt: skip


DTYPES = ["float64", "float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_right_implementations_pass(dtype):
    spec = float_spec(causal=True, align="bottom_right", L=9, S=7)  # rows 0, 1 see no key
    results = symattn.verify(spec, [right, right_dict], dtype=dtype)
    assert [r.verdict for r in results] == ["PASS", "PASS"], [r.reasons for r in results]
    assert results[0].lse is not None and results[0].lse["base"] == "e"
    assert any(e.step.startswith("lse") for e in results[0].entries)
    assert results[1].lse == results[0].lse


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_lse_bugs_fail(dtype):
    spec = float_spec(causal=True, align="bottom_right")
    for bug in (base2, finite_empty, gqa_first_head):
        (r,) = symattn.verify(spec, [bug], dtype=dtype)
        assert r.verdict == "FAIL", (bug.__name__, dtype)
        assert r.reasons[0].startswith("lse"), r.reasons
        assert r.lse["max_abs_error"] > 0
    (r,) = symattn.verify(spec, [finite_empty], dtype=dtype)
    assert r.entries[0].where in ("lse[0, 0]", "lse[0, 1]") and r.entries[0].exact == "-inf"
    assert r.lse["max_abs_error"] == math.inf


def test_a_mask_with_a_row_of_no_key():
    mask = np.ones((9, 7), bool)
    mask[3] = False
    spec = float_spec(mask=mask)
    results = symattn.verify(spec, [right, finite_empty], dtype="float32")
    assert [r.verdict for r in results] == ["PASS", "FAIL"]
    assert results[1].entries[0].named == "lse[0, 3] (head 0, row 3)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_base_two(dtype):
    spec = float_spec(causal=True)
    assert symattn.verify(spec, [base2], dtype=dtype, lse_base=2)[0].verdict == "PASS"
    (r,) = symattn.verify(spec, [right], dtype=dtype, lse_base=2)  # a natural lse read as base 2
    assert r.verdict == "FAIL" and r.lse["base"] == 2


def test_base_two_truth_is_certified():
    spec = float_spec(H=2, H_kv=2, L=3, S=3, causal=True)
    (r,) = symattn.verify(spec, [base2], lse_base=2)
    truth = symattn.evaluate(spec, digits=40, steps=["lse1", "lse2"])
    for e in r.entries:
        if e.col is not None:
            continue
        with mpmath.workdps(60):
            exact = mpmath.mpf(truth[e.step].values[e.row][0]) / mpmath.log(2)
            printed = mpmath.mpf(e.exact)
            digits = len(e.exact.lstrip("-").replace(".", "").lstrip("0"))
            assert abs(printed - exact) <= abs(exact) * mpmath.mpf(10) ** (1 - digits) / 2, e


@pytest.mark.parametrize("base", [10, "two", 2.5, 0])
def test_a_bad_lse_base(base):
    with pytest.raises(SymattnError, match=r"^lse_base: expected 2 .* received "):
        symattn.verify(float_spec(), [right], lse_base=base)
    with pytest.raises(SymattnError, match=r"^lse_base: "):
        assert_attention_close(right, float_spec(), lse_base=base)


def test_a_wrong_lse_shape_fails():
    (r,) = symattn.verify(float_spec(), [wrong_shape], dtype="float32")
    assert r.verdict == "FAIL"
    assert "expected lse of shape 4×9, received shape (4, 9, 1)" in r.reasons


def test_a_plain_output_verifies_as_before():
    def out_only(q, k, v, *, scale, causal=False, align="top_left", mask=None):
        return right(q, k, v, scale=scale, causal=causal, align=align, mask=mask)[0]

    (r,) = symattn.verify(float_spec(), [out_only])
    assert r.verdict == "PASS" and r.lse is None and not any(e.col is None for e in r.entries)


def test_json_and_text_report(tmp_path, capsys):
    spec = float_spec(H=2, H_kv=1, L=4, S=3, causal=True, align="bottom_right")
    (r,) = symattn.verify(spec, [finite_empty], dtype="float32")
    doc = r.to_json()
    assert doc["lse"]["base"] == "e" and doc["lse"]["max_abs_error"] == "inf"
    json.dumps(doc, allow_nan=False)
    assert any(line.startswith("  lse: max error inf") for line in r.lines())


def test_pytest_helper_batched_and_base_two():
    import ml_dtypes

    q = RNG.standard_normal((2, 4, 5, 8)).astype(ml_dtypes.bfloat16)  # a batch of 2
    k = RNG.standard_normal((2, 2, 6, 8)).astype(ml_dtypes.bfloat16)
    v = RNG.standard_normal((2, 2, 6, 8)).astype(ml_dtypes.bfloat16)

    def batched(fn):
        def run(q, k, v, *, scale, causal=False, align="top_left", mask=None):
            pairs = [fn(q[b], k[b], v[b], scale=scale, causal=causal, align=align, mask=mask) for b in range(len(q))]
            return np.stack([o for o, _ in pairs]), np.stack([lse for _, lse in pairs])

        return run

    assert_attention_close(batched(right), q=q, k=k, v=v, causal=True)
    assert_attention_close(batched(base2), q=q, k=k, v=v, causal=True, lse_base=2)
    with pytest.raises(AssertionError, match=r"lse"):
        assert_attention_close(batched(base2), q=q, k=k, v=v, causal=True)
    with pytest.raises(AssertionError, match=r"lse"):
        assert_attention_close(batched(gqa_first_head), q=q, k=k, v=v, causal=True)


def test_cli_verify_with_lse_base(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "decode.json"
    spec.write_text(
        json.dumps(
            {
                "q": [[[1, 0, "1/2"], [0, 2, 1]], [[1, 1, 1], [-1, 0, 2]]],
                "k": [[[1, 0, 0], [0, 1, 0], [2, 1, 1]]],
                "v": [[[1, 2], [0, 1], [3, -1]]],
                "causal": True,
                "align": "bottom_right",
            }
        )  # fmt: skip
    )
    (tmp_path / "lse_impls.py").write_text(
        "from tests.test_lse import base2, gqa_first_head, right\n"  # the implementations above, by module name
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", str(spec), "--impl", "lse_impls:base2", "--lse-base", "2"]) == 0
    assert "lse (base 2): max error" in capsys.readouterr().out
    assert main(["verify", str(spec), "--impl", "lse_impls:base2"]) == 1
    capsys.readouterr()
    assert main(["verify", str(spec), "--impl", "lse_impls:gqa_first_head", "--json"]) == 1
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["lse"]["max_abs_error"] > 0 and result["entries"][0]["step"] == "lse2"
    assert main(["verify", str(spec), "--impl", "lse_impls:right", "--lse-base", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lse_base: expected 2" in err


def test_backward_is_unaffected():
    spec = float_spec(H=2, H_kv=2, L=3, S=3, causal=True)
    graph = symattn.graph.graph.build(symattn.load_spec(spec))
    assert all("lse" not in s.name for s in graph.backward_steps)
    truth = symattn.evaluate(spec, digits=10, grad=True)
    assert "dlse1" not in truth.names and "lse1" in truth.names


@pytest.mark.parametrize("sinks", [None, [1.5, -0.5]])
def test_the_lse_vjp_by_finite_differences(sinks):
    """∂lse/∂s is the softmax's weights (and the sink's, for dsinks): the vjp the verifier's condition numbers read,
    against central differences of the float64 forward."""
    from symattn.backends.floats import FloatXP

    data = float_spec(H=2, H_kv=1, L=3, S=4, E=2, causal=True, align="bottom_right")
    if sinks is not None:
        data["sinks"] = np.array(sinks)
    graph = symattn.graph.graph.build(symattn.load_spec(data))
    xp = FloatXP("float64")
    values = graph.forward(xp, keep=[n.name for n in graph.nodes])
    g = RNG.standard_normal((3, 1))
    grads = graph.backward(xp, values, {"lse2": g})
    leaves = {name: graph.leaves[name].float64() for name in graph.leaves}
    for name in ["q2", "k1"] + (["sinks"] if sinks is not None else []):
        numeric = np.zeros_like(leaves[name])
        for index in np.ndindex(numeric.shape):
            ends = []
            for step in (1e-6, -1e-6):
                moved = {**leaves, name: leaves[name].copy()}
                moved[name][index] += step
                ends.append(float((graph.forward(FloatXP("float64", moved), ["lse2"])["lse2"] * g).sum()))
            numeric[index] = (ends[0] - ends[1]) / 2e-6
        np.testing.assert_allclose(grads["d" + name], numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_lse_where_the_truth_is_finite_fails(bad):
    def broken(q, k, v, *, scale, causal=False, align="top_left", mask=None):
        out, lse = right(q, k, v, scale=scale, causal=causal, align=align, mask=mask)
        lse = lse.copy()
        lse[1, 4] = bad
        return out, lse

    (r,) = symattn.verify(float_spec(), [broken], dtype="float32")
    assert r.verdict == "FAIL"
    assert r.reasons[0] == f"lse is not finite at lse[1, 4] (head 1, row 4) ({bad}) and 0 more entries"
    assert r.entries[0].where == "lse[1, 4]"


def test_a_context_with_lse_and_an_output_alone():
    from symattn.verifier.measure import run
    from symattn.verifier.reference import Context

    def out_only(q, k, v, *, scale, causal=False, align="top_left", mask=None):
        return right(q, k, v, scale=scale, causal=causal, align=align, mask=mask)[0]

    r = run(out_only, "out_only", Context(symattn.load_spec(float_spec()), "float32", lse=True), "kappa")
    assert r.verdict == "PASS" and r.lse is None and "not returned, so not verified: lse" in r.notes


@pytest.mark.parametrize(
    ("x", "wq", "wk", "expected"),
    [
        ([0, 3000], 1, Fraction(1, 2), "5e+6"),  # lse = 4.5e6 + log(1 + e^-4.5e6): just above the tie, up
        ([1000, Fraction(5000, 3)], -1, Fraction(3, 2), "-2e+6"),  # -2.5e6 + log(1 + e^(-5e6/3)): toward -2e6
    ],
)
def test_an_lse_whose_largest_score_is_a_rounding_tie_is_decided_exactly(x, wq, wk, expected):
    """No ball separates the lse from the tie at its row's largest score (the rest is e^-(10^6)); its exact
    form does (hypothesis found both: a bound '<1e+7' was printed)."""
    data = {"x": [[str(v)] for v in x], "heads": [{"wq": [[wq]], "wk": [[str(wk)]], "wv": [[0]]}], "wo": [[0]]}
    truth = symattn.evaluate(data, digits=1, steps=["lse1"])
    assert truth["lse1"].values[1] == (expected,)
    scores = [x[1] * wq * v * wk for v in x]  # row 1, exactly (scale 1)
    top = max(scores)
    assert (top / 10**6) % 1 == Fraction(1, 2)  # the largest score is a 1-digit tie: k.5e6
    with mpmath.workdps(30):  # the rest of the lse, log1p of the other terms, is positive however tiny
        rest = mpmath.log1p(
            mpmath.fsum(mpmath.exp(mpmath.mpf((s - top).numerator) / (s - top).denominator) for s in scores if s != top)
        )
    assert rest > 0
    assert Fraction(expected) == top + Fraction(1, 2) * 10**6  # so the value rounds up, to the next 1-digit one
