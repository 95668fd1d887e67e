"""The two ball engines (issue 17): mpmath intervals do every operation Arb balls do, gradients included, and
print the same certified digits; the mpmath engine's gradients against finite differences of an independent
forward pass."""

from __future__ import annotations

import copy
import inspect
from fractions import Fraction

import pytest

import symattn
from symattn.backends.engines import ArbEngine, MpmathEngine
from symattn.load import builtin_names
from tests.test_backward import KERNEL, KERNEL_CASES, _assert_agree, _finite_differences, _kernel_fd
from tests.test_variants import CASES

DIGITS = 20


def _methods(cls) -> set:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_the_mpmath_engine_has_every_method_of_the_arb_engine():
    assert _methods(ArbEngine) - _methods(MpmathEngine) == set()


def _assert_same_digits(arb, mp, label: str) -> int:
    """Every entry that both engines print as digits (or nan) is the same string; a bound ("<1e-40") is no digit
    and may differ with the width of an enclosure."""
    compared = 0
    assert [s.name for s in mp] == [s.name for s in arb], label
    for step in arb:
        other = mp[step.name]
        for i, row in enumerate(step.values):
            for j, text in enumerate(row):
                theirs = other.values[i][j]
                if text.startswith("<") or theirs.startswith("<"):
                    continue
                assert theirs == text, (label, step.name, i, j, text, theirs)
                compared += 1
    return compared


@pytest.mark.parametrize("name", builtin_names())
def test_every_built_in_example_with_gradients_prints_the_same_digits_in_both_engines(name):
    arb = symattn.evaluate(name, digits=DIGITS, grad=True, engine="arb")
    mp = symattn.evaluate(name, digits=DIGITS, grad=True, engine="mpmath")
    assert mp.engine == "mpmath"
    assert any(step.name.startswith("d") for step in mp)
    assert _assert_same_digits(arb, mp, name) == sum(len(s.values) * len(s.values[0]) for s in arb)


@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_with_gradients_prints_the_same_digits_in_both_engines(case):
    data = CASES[case][0]
    arb = symattn.evaluate(copy.deepcopy(data), digits=DIGITS, grad=True, engine="arb")
    mp = symattn.evaluate(copy.deepcopy(data), digits=DIGITS, grad=True, engine="mpmath")
    assert _assert_same_digits(arb, mp, case) > 0


def test_a_nan_row_stays_nan_through_the_weighted_sum_and_the_gradients():
    # mpmath's own nan interval times a number is 0: a head row of "0" where it is nan (a wrong digit)
    data = copy.deepcopy(KERNEL)
    data.update(mask=[[True, False, True, False], [False] * 4, [False, True, True, False]], empty_row="nan")
    arb = symattn.evaluate(copy.deepcopy(data), digits=DIGITS, grad=True, engine="arb")
    mp = symattn.evaluate(copy.deepcopy(data), digits=DIGITS, grad=True, engine="mpmath")
    assert _assert_same_digits(arb, mp, "nan") > 0
    assert mp["head1"].values[1] == ("nan", "nan")
    assert mp["dq1"].values[1] == ("nan", "nan")
    assert "nan" in mp["dk1"].values[0]


def test_the_engines_nan_survives_every_operation():
    engine = MpmathEngine(64)
    nan, two, zero = engine.nan(), engine.rational(2), engine.zero()
    for value in (nan * zero, zero * nan, nan * two, nan + two, two - nan, two / nan, engine.exp(nan),
                  engine.tanh(nan), engine.one() - nan * nan):  # fmt: skip
        assert engine.is_nan(value), value
        assert engine.decimal(value, 5) is None
    assert not engine.is_nan(engine.tanh(two)) and not engine.is_nan(engine.exp(two))


@pytest.mark.parametrize("case", ["softcap", "alibi", "empty"])
def test_mpmath_engine_gradients_agree_with_finite_differences_of_an_independent_reference(case):
    data = copy.deepcopy(CASES[case][0])
    rows, cols = len(data["x"]), len(data["wo"][0])
    data["dout"] = [[Fraction((3 * r + c) % 5 - 2, 3) for c in range(cols)] for r in range(rows)]
    fd = _finite_differences(data)
    names = sorted({step for step, _, _ in fd})
    truth = symattn.evaluate(data, digits=25, steps=names, engine="mpmath")
    assert _assert_agree(truth, fd, case) == len(fd)


def test_mpmath_engine_kernel_softcap_gradients_agree_with_finite_differences():
    data = copy.deepcopy(KERNEL)
    data.update(copy.deepcopy(KERNEL_CASES["softcap"]))
    data["bias"] = [[[0] * 4 for _ in range(3)] for _ in range(3)]
    data["dout"] = [[[Fraction(1 + i - h, 2), (-1) ** i * 2] for i in range(3)] for h in range(3)]
    fd = _kernel_fd(data)
    truth = symattn.evaluate(data, digits=25, steps=sorted({step for step, _, _ in fd}), engine="mpmath")
    assert _assert_agree(truth, fd, "kernel softcap") == len(fd)
