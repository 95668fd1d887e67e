import json
from pathlib import Path

import numpy as np
import pytest

import symattn
import symattn.graph.graph
from symattn import SymattnError
from symattn.cli import default_impls
from symattn.testing import assert_attention_close
from symattn.verifier import convention
from symattn.verifier.measure import run, verify
from symattn.verifier.reference import Context, sensitivity
from tests.conftest import random_spec
from tools import impls

ROOT = Path(__file__).resolve().parent.parent


def cancelling_spec() -> dict:
    """Two nearly equal heads subtracted by the output projection: M is small against its terms."""
    head = {"wq": [[1, 2], [0, 1], [1, 0]], "wk": [[0, 1], [1, 1], [2, 0]], "wv": [[3, 1], [1, 2], [0, 1]]}
    other = {"wq": [[1, 2], [0, 1], [1, 0]], "wk": [[0, 1], [1, 1], [2, 0]], "wv": [[3, 1], [1, 2], ["1/1000", 1]]}
    return {
        "name": "cancelling",
        "x": [[1, 2, 0], [0, 1, 3], [2, 1, 1], [1, 0, 2]],
        "heads": [head, other],
        "wo": [[1, 0], [0, 1], [-1, 0], [0, -1]],
    }


SPECS = [
    "notebook",
    random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3),
    cancelling_spec(),
    random_spec(5, n=3, d_model=4, h=3, d_k=2, d_v=1, d_out=2, kind="decimal"),
]


def result(fn, spec, dtype="float64", rule="kappa"):
    return run(fn, fn.__name__, Context(symattn.load_spec(spec), dtype), rule)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=["notebook", "random", "cancelling", "decimal"])
@pytest.mark.parametrize("fn", [impls.right, impls.right_einsum], ids=["straightforward", "einsum"])
def test_right_implementations_pass(fn, spec, dtype):
    r = result(fn, spec, dtype)
    assert r.passed, r.lines()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_generated_code_passes(dtype):
    for spec in SPECS:
        spec = symattn.load_spec(spec)
        assert all(r.passed for r in verify(spec, default_impls(spec), dtype=dtype)[:1]), spec


def test_cancellation_is_where_reordering_costs_ulps():
    r = result(impls.right_einsum, cancelling_spec())
    assert r.passed and r.max_ulps > 10  # many ulps off, and rightly accepted


BUGS = [
    (impls.scale_one_over_dk, "beyond the kappa bound"),
    (impls.scale_d_model, "beyond the kappa bound"),
    (impls.softmax_wrong_axis, "beyond the kappa bound"),
    (impls.heads_reversed, "beyond the kappa bound"),
    (impls.key_dropped, "beyond the kappa bound"),
    (impls.silently_float32, "beyond the kappa bound"),
    (impls.float32_scale, "beyond the kappa bound"),
]


@pytest.mark.parametrize(("fn", "reason"), BUGS, ids=[b[0].__name__ for b in BUGS])
def test_bugs_fail(fn, reason):
    spec = random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3)
    r = result(fn, spec)
    assert not r.passed and reason in r.reasons[0], r.lines()


def test_float32_bugs_fail_in_float32_too():
    spec = random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3)
    for fn in (impls.scale_one_over_dk, impls.heads_reversed, impls.key_dropped):
        assert not result(fn, spec, "float32").passed, fn.__name__


@pytest.mark.parametrize(("spec", "dtype"), [("overflow64", "float64"), ("overflow32", "float32")])
def test_unshifted_softmax_overflows_on_the_stress_specs(spec, dtype):
    r = result(impls.unshifted, spec, dtype)
    assert not r.passed and r.reasons[0].startswith("output is not finite at M[")
    generated, notebook = verify(spec, default_impls(symattn.load_spec(spec)), dtype=dtype)
    assert generated.passed and not notebook.passed


def test_inputs_are_rounded_and_their_effect_reported():
    spec = {
        "x": [["0.1", "0.2"], ["0.3", "1/3"]],
        "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[1, 0], [0, 1]], "wv": [[1, 0], [0, 1]]}],
        "wo": [[1, 0], [0, 1]],
    }
    r64, r32 = result(impls.right, spec, "float64"), result(impls.right, spec, "float32")
    assert r64.passed and r32.passed
    assert 0 < r64.input_rounding_effect < 1e-15 and 1e-9 < r32.input_rounding_effect < 1e-6
    assert r32.max_ulps < 10  # measured against the truth for the float32 inputs, not the decimals


def test_sensitivity_matches_finite_differences():
    spec = symattn.load_spec(random_spec(8, n=3, d_model=2, h=2, d_k=2, d_v=2, d_out=2, kind="rational"))
    args = convention.arguments(spec, "float64")
    arrays = list(args.positional)
    base = impls.right(*arrays)
    expected = np.zeros_like(base)
    for a, array in enumerate(arrays):
        for index in np.ndindex(array.shape):
            step = 1e-6 * max(1.0, abs(array[index]))
            plus = [arr.copy() for arr in arrays]
            minus = [arr.copy() for arr in arrays]
            plus[a][index] += step
            minus[a][index] -= step
            derivative = (impls.right(*plus) - impls.right(*minus)) / (2 * step)
            expected += np.abs(array[index] * derivative)
    graph = symattn.graph.graph.build(args.rounded)
    assert np.allclose(sensitivity(graph, args.leaves), expected, rtol=1e-5, atol=1e-9)


def test_rules():
    spec = cancelling_spec()
    both = result(impls.right_einsum, spec, rule="both")
    assert both.kappa_passed and both.rule == "both"
    differential = result(impls.heads_reversed, spec, rule="differential")
    assert not differential.passed and "exceeds 2 × the reference runs'" in differential.reasons[0]


def test_wrong_dtype_returned_is_a_failure():
    r = result(impls.silently_float32, "notebook", "float64")
    r2 = run(
        lambda *a: impls.right(*a).astype(np.float32),
        "downcast",
        Context(symattn.load_spec("notebook"), "float64"),
        "kappa",
    )
    assert not r.passed
    assert r2.reasons[0] == "returned dtype float32, not the float64 it was given"


def test_pytest_helper():
    spec = random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3)
    assert_attention_close(impls.right, spec, dtype="float32")
    assert_attention_close(impls.right_einsum, symattn.load_spec(spec))
    with pytest.raises(
        AssertionError,
        match=r"^heads_reversed is not close to the exact attention on random4 in "
        r"float64 \(rule kappa\): M\[\d, \d\] \(row \d, column \d\) = .*Worst entry M\[\d, \d\] \(row \d, column "
        r"\d\): float .*, exact "
        r"-?\d.*, error .* ulps\), bound .*$",
    ):
        assert_attention_close(impls.heads_reversed, spec)
    assert_attention_close(impls.right, "notebook")


def test_cli_verdicts_agree_with_the_helper(tmp_path, cli):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3)))
    ok = cli("verify", str(spec), "--impl", "tools.impls:right", "--dtype", "float32")
    assert ok.returncode == 0 and ok.stdout.startswith("PASS tools.impls:right on random4 in float32"), ok.stderr
    bad = cli("verify", str(spec), "--impl", "tools.impls:key_dropped")
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL tools.impls:key_dropped")
    with pytest.raises(AssertionError):
        assert_attention_close(impls.key_dropped, spec)


def test_cli_json(cli):
    result = cli("verify", "notebook", "--impl", "tools.impls:right", "--impl", "tools.impls:heads_reversed", "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["symattn"] == "0.1.0" and [r["name"] for r in doc["results"]] == [
        "tools.impls:right",
        "tools.impls:heads_reversed",
    ]
    first = doc["results"][0]
    assert first["passed"] and first["dtype"] == "float64" and first["rule"] == "kappa"
    assert set(first["entries"][0]) == {
        "step",
        "row",
        "col",
        "value",
        "exact",
        "abs_error",
        "rel_error",
        "ulps",
        "bits",
        "kappa_bound",
        "kappa",
        "array",
        "index",
        "head",
    }
    assert not doc["results"][1]["passed"]


@pytest.mark.parametrize(
    ("impl", "message"),
    [
        (
            "nosuchmodule:f",
            "--impl nosuchmodule:f: cannot import nosuchmodule: ModuleNotFoundError: No module named 'nosuchmodule'",
        ),
        ("tools.impls:nope", "--impl tools.impls:nope: tools.impls has no function 'nope'"),
        (
            "tools.impls",
            "--impl: expected MODULE:FUNCTION such as mypkg.attn:forward, or one of torch_sdpa, torch_mha, torch_flex, "
            "torch_flex:eager, torch_varlen, jax_dpa, jax_dpa:xla, jax_dpa:cudnn, received 'tools.impls'",
        ),
        (
            "tools.impls:wrong_signature",
            "tools.impls:wrong_signature: expected a function f(x, wq, wk, wv, wo) -> output taking its options "
            "by keyword, received one with signature (x)",
        ),
    ],
)
def test_bad_impls_exit_2_on_one_line(impl, message, cli):
    result = cli("verify", "notebook", "--impl", impl)
    assert result.returncode == 2 and result.stderr == f"symattn: error: {message}\n"


def test_an_implementation_that_raises_is_an_error_verdict_and_the_others_are_still_measured(cli):
    # DESIGN.md: verdicts PASS, FAIL, UNSUPPORTED, ERROR; exit 0 only when all pass (this supersedes exit 2)
    result = cli("verify", "notebook", "--impl", "tools.impls:crashes", "--impl", "tools.impls:right")
    assert result.returncode == 1 and result.stderr == ""
    first, second = result.stdout.split("\n\n")
    assert first == "ERROR tools.impls:crashes on notebook in float64: raised RuntimeError: kernel failed"
    assert second.startswith("PASS tools.impls:right on notebook in float64")


def test_a_wrong_shape_is_a_failure(cli):
    result = cli("verify", "notebook", "--impl", "tools.impls:wrong_shape")
    assert result.returncode == 1
    assert result.stdout == (
        "FAIL tools.impls:wrong_shape on notebook in float64: expected an output of shape 2×2, received shape (2, 1)\n"
    )


def test_bad_options():
    with pytest.raises(
        SymattnError,
        match=r"^dtype: expected one of float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, "
        r"received 'int8'$",
    ):
        verify("notebook", [impls.right], dtype="int8")
    with pytest.raises(SymattnError, match=r"^rule: expected one of kappa, differential, both, received 'x'$"):
        verify("notebook", [impls.right], rule="x")


def quarter_scale_spec() -> dict:
    data = random_spec(4, n=4, d_model=3, h=2, d_k=2, d_v=2, d_out=3)
    data["scale"] = "1/4"  # 1/sqrt(d_k) would be 1/sqrt(2)
    return data


@pytest.mark.parametrize("rule", ["kappa", "differential", "both"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_spec_scale_reaches_the_implementation(rule, dtype):
    spec = quarter_scale_spec()
    for fn in (impls.right_scaled, impls.right_kwargs):
        r = result(fn, spec, dtype, rule)
        assert r.verdict == "PASS", r.lines()
    wrong = result(impls.default_scale_only, spec, dtype, rule)
    assert wrong.verdict == "FAIL", wrong.lines()


def test_an_implementation_without_the_spec_option_is_unsupported(tmp_path, cli):
    spec = tmp_path / "quarter.json"
    spec.write_text(json.dumps(quarter_scale_spec()))
    r = result(impls.right, quarter_scale_spec())
    assert r.verdict == "UNSUPPORTED" and not r.passed
    assert r.reasons == ["the spec sets scale = 0.25, which right does not accept"]
    done = cli("verify", str(spec), "--impl", "tools.impls:right", "--impl", "tools.impls:right_scaled")
    assert done.returncode == 1
    first, second = done.stdout.split("\n\n")
    assert first == (
        "UNSUPPORTED tools.impls:right on random4 in float64: the spec sets scale = 0.25, which tools.impls:right "
        "does not accept"
    )
    assert second.startswith("PASS tools.impls:right_scaled")
    with pytest.raises(SymattnError, match=r"^right on random4: the spec sets scale = 0.25, which right does not"):
        assert_attention_close(impls.right, quarter_scale_spec())


def test_options_are_passed_only_where_accepted():
    seen = {}

    def spy(x, wq, wk, wv, wo, *, scale, causal=False):
        seen.update(scale=scale, causal=causal)
        return impls.right(x, wq, wk, wv, wo)

    assert result(spy, "notebook").passed
    assert seen == {"scale": pytest.approx(2**-0.5), "causal": False}


@pytest.mark.parametrize("empty_row", ["zero", "uniform", "nan"])
def test_no_numpy_warnings_from_the_verifier_and_budgets(empty_row):
    """Empty rows, masked columns and scores beyond float16's range: no RuntimeWarning from the budget
    (rounding.py), the reference runs or the measuring, in any dtype, forward or backward."""
    import warnings

    from symattn.backends.budget import budgets
    from symattn.graph.graph import build

    rng = np.random.default_rng(3)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    mask[:, 0] = False
    q, k = (rng.integers(-90, 91, size=(1, n, 2)).astype(float) for n in (3, 4))  # scores up to about 16000
    spec = symattn.load_spec(
        {
            "q": q,
            "k": k,
            "v": rng.integers(-3, 4, size=(1, 4, 2)).astype(float),
            "mask": mask,
            "empty_row": empty_row,
            "scale": 1,
        }
    )
    graph = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in ("float64", "float32", "float16", "bfloat16"):
            budget = budgets(graph, {}, dtype)
            assert np.isfinite(budget["head1"][[0, 2]]).all()  # row 1 is empty: nan under "nan"
            for backward in (False, True):
                (result,) = verify(spec, default_impls(spec, backward), dtype=dtype, backward=backward)
                assert result.verdict in ("PASS", "FAIL")


def test_budget_beyond_float64_and_inputs_beyond_the_dtype():
    """Scores beyond float64's range: an infinite budget and a failed verdict, no RuntimeWarning; an input
    beyond the dtype's range: one error naming it, not a warning and a confusing 'inf'."""
    import warnings

    from symattn.backends.budget import budgets
    from symattn.graph.graph import build

    spec = symattn.load_spec({"q": [[[1e160, 1], [2, 3]]], "k": [[[1e160, 2], [1, 1]]], "v": [[[1, 2], [3, 4]]]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(budgets(build(spec), {}, "float64")["scores1"][0, 0])
        (result,) = verify(spec, default_impls(spec), dtype="float64")
        assert result.verdict == "FAIL"
        with pytest.raises(
            SymattnError,
            match=r"^q: expected values within float16's range \(\|x\| <= 65504\), "
            r"received 1e\+160, which rounds to inf in float16$",
        ):
            verify(spec, default_impls(spec), dtype="float16")
        big = {"x": [[1, 2]], "heads": [{"wq": [[1], [1]], "wk": [[1], [1]], "wv": [[1], ["1e40"]]}], "wo": [[1]]}
        with pytest.raises(SymattnError, match=r"^wv: expected values within bfloat16's range .* received 1e\+40"):
            verify(big, default_impls(symattn.load_spec(big)), dtype="bfloat16")
