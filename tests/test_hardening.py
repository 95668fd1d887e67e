"""Hostile and oversized input (issue 17): each case is a one-line SymattnError naming the field, what was
expected and what was received, and on the command line exit 2 without a traceback."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import symattn
from symattn import SymattnError, load_spec
from symattn.masks import allowed
from tests.conftest import reference
from tests.test_codegen import NOTEBOOK_WEIGHTS, NOTEBOOK_X, load

HUGE = [2**63 - 1, 2**63, 10**29, 2**200]


def run(*args):
    """The CLI as a user runs it: a fresh process."""
    return subprocess.run([sys.executable, "-m", "symattn", *args], capture_output=True, text=True)


def assert_one_line_error(result, pattern: str):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert len(lines[0]) < 400, lines[0][:400]
    assert re.search(pattern, lines[0]), lines[0]


# 1. Windows of any size.


@pytest.mark.parametrize("bound", HUGE, ids=str)
def test_a_window_beyond_the_sequence_is_unbounded(notebook_data, bound):
    assert load_spec({**notebook_data, "window": [bound, bound]}).window == (None, None)
    assert load_spec({**notebook_data, "window": [bound, 1]}).window == (None, 1)
    assert load_spec({**notebook_data, "window": [3, 4]}).window == (3, None)  # L + S = 4 excludes nothing
    assert load_spec({**notebook_data, "window": [0, 3]}).window == (0, 3)
    huge = load_spec({**notebook_data, "window": [bound, bound]})
    assert huge.allowed(0).all() and huge.to_dict()["window"] == [None, None]


def test_window_bounds_from_arrays_of_any_integer_dtype(notebook_data):
    spec = load_spec({**notebook_data, "window": np.array([2**64 - 1, 1], dtype=np.uint64)})
    assert spec.window == (None, 1)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ([-(2**70), 0], r"^window: expected the left side to be >= 0 \(null for unbounded\), received -1180591"),
        ([0, 1.5], r"^window: expected the right side to be an integer >= 0 or null, received 1\.5$"),
        ([True, 0], r"^window: expected the left side to be an integer >= 0 or null, received True$"),
        ([1, 2, 3], r"^window: expected \[left, right\] \(integers >= 0, or null for unbounded\), received \[1, 2, 3"),
    ],
)
def test_bad_window_bounds(notebook_data, window, message):
    with pytest.raises(SymattnError, match=message):
        load_spec({**notebook_data, "window": window})


def test_the_mask_function_caps_huge_bounds():
    """Generated modules take window by keyword: a bound past int64 must neither wrap nor raise."""
    for bound in HUGE:
        assert allowed(3, 5, None, False, (bound, bound), 2).all()
        assert allowed(3, 5, None, False, (bound, 0), 0).tolist() == allowed(3, 5, None, False, (None, 0), 0).tolist()
    assert not allowed(3, 5, None, False, (0, 0), 0).all()


def test_huge_window_equals_no_window_in_eval_generate_and_verify(notebook_data, tmp_path):
    expected = reference(notebook_data, dps=40)["head1"]  # independent: mpmath, no window at all
    narrow = symattn.evaluate({**notebook_data, "window": [0, 0]}, digits=12)["head1"].values
    for bound in HUGE:
        data = {**notebook_data, "window": [bound, bound]}
        head = symattn.evaluate(data, digits=12)["head1"].values
        assert head != narrow  # the window [0, 0] masks keys: the comparison can fail
        for r in range(2):
            for c in range(2):
                assert abs(float(head[r][c]) - float(expected[r, c])) < 1e-10

        folded = load(symattn.generate(data), tmp_path, f"folded{bound % 1000}")
        inputs = load(symattn.generate(data, weights="inputs"), tmp_path, f"inputs{bound % 1000}")
        want = np.array([[float(expected[r, c]) for c in range(2)] for r in range(2)])
        np.testing.assert_allclose(folded.intermediates(NOTEBOOK_X)["head1"], want, rtol=1e-13)
        got = inputs.intermediates(NOTEBOOK_X, *NOTEBOOK_WEIGHTS, window=(bound, bound))["head1"]
        np.testing.assert_allclose(got, want, rtol=1e-13)

        seen = []

        def impl(x, wq, wk, wv, wo, *, scale, window, seen=seen, module=inputs):
            seen.append(window)
            return module.forward(x, wq, wk, wv, wo, scale=scale, window=window)

        [result] = symattn.verify(data, [("impl", impl)])
        assert result.passed, result.reasons
        assert seen == [(None, None)] * len(seen) and seen


def test_huge_window_on_the_command_line(notebook_data, tmp_path):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({**notebook_data, "window": [2**63 - 1, 2**63 - 1]}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(notebook_data))
    huge = run("eval", str(path), "--digits", "12", "--step", "head1")
    assert huge.returncode == 0, huge.stderr
    unbounded = run("eval", str(plain), "--digits", "12", "--step", "head1")
    assert huge.stdout.splitlines()[2:] == unbounded.stdout.splitlines()[2:]
    assert " 2.97166792825  -3.97166792825" in huge.stdout
    verdict = run("verify", str(path))
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
