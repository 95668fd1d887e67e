"""The normwise rule (issue 22): each returned array's ‖out − exact‖₂/‖exact‖₂ at most twice that of the right
reference runs in the same dtype, under every --rule; the held-out low-precision bugs fail by it and right kernels
pass; the lse and gradients under it; its report and JSON."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest

import symattn
from symattn.backends.floats import dtype_of
from symattn.verifier import normwise
from tests import oracle
from tools import impls, kernels

DPS = 40


def _rounded(a, dtype: str) -> np.ndarray:
    return np.asarray(a).astype(dtype_of(dtype)).astype(np.float64)


def _spec(L: int, H: int, E: int, dtype: str, seed: int = 0, std: float = 1.0, **options) -> dict:
    """Random q, k, v already in ``dtype`` (so that the oracle sees exactly what the implementations get)."""
    rng = np.random.default_rng(seed)
    q, k, v = (_rounded(rng.normal(size=(H, L, E)) * s, dtype) for s in (std, std, 1.0))
    return {"q": q, "k": k, "v": v, **options}


def _exact_output(data: dict) -> np.ndarray:
    """The output by the independent mpmath reference (tests/oracle.py), as float64."""
    lists = {**data, **{n: data[n].tolist() for n in ("q", "k", "v")}}
    steps = oracle.steps(lists, DPS)
    H = len(data["q"])
    return np.array([[[float(x) for x in steps[f"head{h + 1}"].tolist()[i]] for i in range(len(data["q"][0]))]
                     for h in range(H)])  # fmt: skip


def _independent_normwise(out: np.ndarray, exact: np.ndarray) -> float:
    with mpmath.workdps(DPS):
        above = mpmath.fsum(
            (mpmath.mpf(float(o)) - mpmath.mpf(float(e))) ** 2 for o, e in zip(out.flat, exact.flat, strict=True)
        )
        below = mpmath.fsum(mpmath.mpf(float(e)) ** 2 for e in exact.flat)
        return float(mpmath.sqrt(above / below))


# The rule's arithmetic.


@pytest.mark.parametrize("factor", [1.9, 2.1])
def test_a_planted_normwise_error_just_under_twice_the_reference_passes_and_just_over_fails(factor):
    dtype = "float32"
    data = _spec(32, 2, 8, dtype, seed=1)  # 512 entries: a planted error can be set within 0.2% of its target
    exact = _exact_output(data)
    (right,) = symattn.verify(data, [impls.kernel_upcast], dtype=dtype)
    reference = right.normwise_reference
    signs = np.random.default_rng(2).standard_normal(exact.shape)  # Gaussian: a finer staircase than ±1

    def planted_by(t):
        return (exact * (1 + t * signs)).astype(np.float32)

    def error(t):
        return _independent_normwise(planted_by(t).astype(np.float64), exact)

    # t such that the planted output's normwise error (float32 rounding included, by the oracle) is factor times
    # the reference: bisection, as the rounding makes the error a fine staircase in t
    low, high = 0.0, 4 * factor * reference / _independent_normwise(exact * (1 + signs), exact)
    for _ in range(60):
        t = (low + high) / 2
        low, high = (t, high) if error(t) < factor * reference else (low, t)
    out = planted_by(min((low, high), key=lambda t: abs(error(t) - factor * reference)))
    measured = _independent_normwise(out.astype(np.float64), exact)
    assert measured == pytest.approx(factor * reference, rel=2e-3)

    def planted(q, k, v, *, scale):
        return out

    (r,) = symattn.verify(data, [planted], dtype=dtype)
    assert r.normwise_error == pytest.approx(measured, rel=1e-6)
    assert r.normwise_reference == pytest.approx(reference, rel=1e-12)
    assert r.normwise_ratio == pytest.approx(factor, rel=3e-3)
    assert r.normwise_passed is (factor < 2)
    assert r.normwise["output"]["passed"] is (factor < 2)
    assert any("normwise error" in reason for reason in r.reasons) is (factor > 2)


def test_the_reference_is_the_largest_run_floored_by_one_rounding_and_raised_for_few_entries():
    exact = np.array([1.0, -2.0, 3.0, 0.5, np.inf])
    # (Σx²)² / Σx⁴ over the finite entries
    n = (1 + 4 + 9 + 0.25) ** 2 / (1 + 16 + 81 + 0.0625)
    assert normwise.entries(exact) == pytest.approx(n)
    allowance = 1 + normwise.SPREAD / math.sqrt(n)
    assert normwise.reference(0.01, exact, np.float32) == pytest.approx(0.01 * allowance)
    # a run more accurate than half a unit roundoff: the floor (here the exact values are representable)
    assert normwise.reference(1e-12, exact, np.float32) == pytest.approx(2.0**-25 * allowance)
    # a truth that is not representable: at least its own rounding to the returned dtype
    third = np.full(10_000, 1 / 3)
    rounded = abs(float(np.float32(1 / 3)) - 1 / 3) * 3
    assert normwise.reference(0.0, third, np.float32) == pytest.approx(rounded * (1 + normwise.SPREAD / 100))
    assert normwise.norm_ratio(np.array([3.0, 4.0]), np.array([0.0, 10.0])) == pytest.approx(0.5)
    assert normwise.norm_ratio(np.array([np.inf, 0.0]), np.array([1.0, 1.0])) == math.inf
    zero = normwise.verdict(1.0, 0.5, np.zeros(3))  # a truth of 0: not judged normwise
    assert zero["passed"] and not zero["judged"] and math.isnan(zero["ratio"])
    few, many = normwise.verdict(1.0, 0.1, np.ones(15)), normwise.verdict(1.0, 0.1, np.ones(16))
    assert few["passed"] and not few["judged"] and not many["passed"] and many["judged"] and many["ratio"] == 10


# The held-out bugs of issue 22 (tools/kernels.py) and right kernels, at 256 tokens.

SIZE = (256, 4, 64)


def _case(dtype, std=1.0, **options):
    L, H, E = SIZE
    return _spec(L, H, E, dtype, seed=22, std=std, causal=True, **options)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_held_out_bugs_fail_and_right_kernels_pass_in_half_dtypes(dtype):
    data = _case(dtype)
    right = kernels.RIGHT + [impls.kernel_online, impls.kernel_upcast, impls.kernel_straightforward]
    results = symattn.verify(data, right + [kernels.scale_65, kernels.accumulated_in_dtype], dtype=dtype)
    for r in results[: len(right)]:
        assert r.passed and r.normwise_ratio < 1.5, r.lines()
    for r in results[len(right) :]:
        assert r.verdict == "FAIL" and not r.normwise_passed, r.lines()
        assert any(reason.startswith("normwise error") for reason in r.reasons)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_softmax_in_the_dtype_fails_on_scores_of_standard_deviation_9(dtype):
    data = _case(dtype, std=3.0)  # q·k/8 of standard deviation 9
    blocked, bug = symattn.verify(data, [kernels.blocked, kernels.softmax_in_dtype], dtype=dtype)
    assert blocked.passed, blocked.lines()
    assert bug.verdict == "FAIL" and bug.kappa_passed and not bug.normwise_passed, bug.lines()


def test_a_forgotten_scale_with_large_scores_and_a_denominator_off_by_1e_6_fail():
    wide = _case("bfloat16", std=math.sqrt(140 / 8))  # q·k around ±140 before the scale
    blocked, bug = symattn.verify(wide, [kernels.blocked, kernels.forgotten_scale], dtype="bfloat16")
    assert blocked.passed and bug.verdict == "FAIL" and not bug.normwise_passed, bug.lines()
    few = _case("float32", window=[3, 0])  # rows of 4 keys: z near 1, so 1e-6 is 5× a right one's error
    blocked, bug = symattn.verify(few, [kernels.blocked, kernels.denominator_eps], dtype="float32")
    assert blocked.passed, blocked.lines()
    assert bug.verdict == "FAIL" and bug.kappa_passed and not bug.normwise_passed, bug.lines()


def test_the_normwise_rule_applies_under_every_rule():
    data = _case("bfloat16")
    for rule in ("kappa", "differential", "both"):
        (r,) = symattn.verify(data, [kernels.scale_65], dtype="bfloat16", rule=rule)
        assert r.verdict == "FAIL" and r.kappa_passed and r.differential_passed, (rule, r.lines())
        assert r.reasons == [f"normwise error {r.normwise_error:.3g} = {r.normwise_ratio:.2g}× the reference runs' "
                             f"{r.normwise_reference:.3g}, beyond 2×"]  # fmt: skip


def test_at_1024_tokens_the_scale_bug_fails_and_the_blocked_kernel_passes_in_bfloat16():
    data = _spec(1024, 4, 64, "bfloat16", seed=22, causal=True)
    blocked, bug = symattn.verify(data, [kernels.blocked, kernels.scale_65], dtype="bfloat16")
    assert blocked.passed and blocked.normwise_ratio < 1, blocked.lines()
    assert bug.verdict == "FAIL" and bug.kappa_passed and bug.differential_passed and bug.normwise_ratio > 3


# The lse and the gradients.


def test_the_lse_is_judged_normwise_at_the_precision_of_the_dtype():
    data = _case("bfloat16")

    def lse_off(q, k, v, *, scale, causal=False):
        out, lse = impls.kernel_with_lse(q, k, v, scale=scale, causal=causal)
        return out, lse * np.float32(1 + 0.02)  # 2% of each lse: 5 or more times bfloat16's rounding

    def lse_in_bfloat16(q, k, v, *, scale, causal=False):
        out, lse = impls.kernel_with_lse(q, k, v, scale=scale, causal=causal)
        return out, lse.astype(dtype_of("bfloat16"))

    right, off, narrow = symattn.verify(data, [impls.kernel_with_lse, lse_off, lse_in_bfloat16], dtype="bfloat16")
    assert right.passed and right.lse["normwise_ratio"] < 1, right.lines()
    assert narrow.passed and narrow.lse["normwise_ratio"] < 2, narrow.lines()  # a right lse, rounded once more
    reference = right.normwise["lse"]["reference"]
    assert 2.0**-10 < reference < 2.0**-7  # about bfloat16's rounding of the lse (u = 2**-8)
    assert off.verdict == "FAIL" and not off.normwise["lse"]["passed"] and off.normwise["output"]["passed"]
    assert off.lse["normwise_error"] == pytest.approx(0.02, rel=0.01)
    assert "normwise error in lse" in off.reasons[-1]
    assert (
        f"normwise {off.lse['normwise_error']:.3g} = {off.lse['normwise_ratio']:.2g}× the reference runs'"
        in (off.lines()[1])
    )


def test_an_array_of_few_entries_is_measured_but_not_judged():
    data = _spec(2, 1, 2, "float32", seed=3)  # 4 output entries

    def off(q, k, v, *, scale):
        return (impls.kernel_upcast(q, k, v, scale=scale).astype(np.float64) * (1 + 3e-7)).astype(np.float32)

    (r,) = symattn.verify(data, [off], dtype="float32")
    figures = r.normwise["output"]
    assert figures["judged"] is False and figures["passed"] and r.normwise_passed
    assert normwise.entries(_exact_output(data).reshape(-1)) < normwise.FEWEST


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_gradient_is_judged_normwise_on_its_own(dtype):
    data = {**_spec(64, 2, 16, dtype, seed=5, causal=True), "dout": _spec(64, 2, 16, dtype, seed=6)["q"]}
    (right,) = symattn.verify(data, [impls.flash_backward], dtype=dtype, backward=True)
    assert right.passed and set(right.normwise) == {"dq", "dk", "dv"}, right.lines()
    reference = right.normwise["dv"]["reference"]
    signs = np.where(np.random.default_rng(7).random((2, 64, 16)) < 0.5, -1, 1)

    def dv_off(q, k, v, dout, *, scale, causal=False):
        grads = impls.flash_backward(q, k, v, dout, scale=scale, causal=causal)
        grads["dv"] = (grads["dv"].astype(np.float64) * (1 + 4 * reference * signs)).astype(q.dtype)
        return grads

    (off,) = symattn.verify(data, [dv_off], dtype=dtype, backward=True)
    assert not off.normwise_passed and off.normwise_on == "dv" and off.normwise["dq"]["passed"], off.lines()
    assert "normwise error in dv" in off.reasons[-1]
    assert "normwise fail (on dv: " in off.lines()[0]


def test_a_gradient_whose_truth_is_zero_is_not_judged_normwise():
    from tests.test_variants import CASES

    (r,) = symattn.verify(CASES["bias and projection biases"][0], [impls.projection_backward], backward=True)
    assert r.passed and math.isnan(r.normwise["dbk"]["ratio"]) and r.normwise["dbk"]["passed"], r.lines()


# The report.


def test_the_report_and_json_give_each_rules_ratio(cli, tmp_path):
    data = _case("bfloat16")
    np.savez(tmp_path / "s.npz", q=data["q"], k=data["k"], v=data["v"], causal=True)
    ran = cli("verify", "s.npz", "--impl", "tools.kernels:scale_65", "--dtype", "bfloat16", cwd=tmp_path)
    assert ran.returncode == 1
    first = ran.stdout.splitlines()[0]
    assert "kappa pass (worst entry " in first and "× its bound)" in first
    assert "differential pass (" in first and "× the bound " in first
    assert "normwise fail (" in first and "× the reference runs' " in first and "limit 2×)" in first
    ran = cli("verify", "s.npz", "--impl", "tools.kernels:scale_65", "--dtype", "bfloat16", "--json", cwd=tmp_path)
    (doc,) = json.loads(ran.stdout)["results"]
    assert doc["normwise_passed"] is False and doc["normwise_limit"] == 2 and doc["normwise_on"] == "output"
    figures = doc["normwise"]["output"]
    assert set(figures) == {"error", "reference", "ratio", "judged", "passed"} and figures["passed"] is False
    assert figures["ratio"] == pytest.approx(figures["error"] / figures["reference"])
    assert doc["normwise_error"] == figures["error"] and doc["normwise_ratio"] == figures["ratio"]
    assert 0 < doc["kappa_ratio"] <= 1 and 0 < doc["differential_ratio"] <= 1
    assert f"normwise fail ({figures['error']:.3g} = {figures['ratio']:.2g}× the reference runs' " in first


def test_rounding_float32_to_bfloat16_by_its_bits_is_ml_dtypes_rounding():
    """``floats.rounded_to``, the reference runs' bfloat16 rounding by bit arithmetic, against ml_dtypes on
    every kind of float32: random bit patterns (subnormals, infinities, nans), ties, values past bfloat16's
    largest."""
    import ml_dtypes

    from symattn.backends.floats import rounded_to

    rng = np.random.default_rng(3)
    patterns = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (rng.integers(0, 2**16, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly half-way
    edges = np.array([np.inf, -np.inf, np.nan, 3.3895314e38, 3.4e38, -3.4e38, 1e-45, -0.0, 0.0], dtype=np.float32)
    for a in (patterns, ties, edges):
        ours = rounded_to(a, np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
        with np.errstate(invalid="ignore"):
            theirs = a.astype(ml_dtypes.bfloat16).astype(np.float32)
        same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
        assert same.all(), a[~same][:5]
