"""Hostile and oversized input (issue 17): each case is a one-line SymattnError naming the field, what was
expected and what was received, and on the command line exit 2 without a traceback."""

import json
import re

import numpy as np
import pytest

import symattn
from symattn import SymattnError, load_spec
from symattn.semantics import allowed
from tests.conftest import reference
from tests.test_codegen import NOTEBOOK_WEIGHTS, NOTEBOOK_X, load

HUGE = [2**63 - 1, 2**63, 10**29, 2**200]


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


def test_huge_window_on_the_command_line(notebook_data, tmp_path, cli):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({**notebook_data, "window": [2**63 - 1, 2**63 - 1]}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(notebook_data))
    huge = cli("eval", str(path), "--digits", "12", "--step", "head1")
    assert huge.returncode == 0, huge.stderr
    unbounded = cli("eval", str(plain), "--digits", "12", "--step", "head1")
    assert huge.stdout.splitlines()[2:] == unbounded.stdout.splitlines()[2:]
    assert " 2.97166792825  -3.97166792825" in huge.stdout
    verdict = cli("verify", str(path))
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


# 2, 3. Literals longer than Python converts: the package's limit, the field, the length; never the whole text.

LONG = "9" * 4800


def spec_text(data: dict, **raw) -> str:
    """A spec's JSON with raw JSON text for some keys (integer literals json.dumps cannot write past Python's
    int-string limit)."""
    text = json.dumps({**data, **{k: "@" + k for k in raw}})
    for key, value in raw.items():
        text = text.replace(json.dumps("@" + key), value)
    return text


AT_MOST = "expected an integer of at most 4300 digits, received one of 4800$"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"x": f"[[{LONG}, 2], [3, 4]]"}, r"x\[0\]\[0\]: " + AT_MOST),
        (
            {"x": f'[["{LONG}", 2], [3, 4]]'},
            r"x\[0\]\[0\]: expected numbers of at most 4300 digits, received '9{40}'… \(4800 characters\), "
            "with one of 4800 digits$",
        ),
        (
            {"x": f"[[{LONG}.5, 2], [3, 4]]"},
            r"x\[0\]\[0\]: expected a number of at most 4300 digits, received one of 4801$",
        ),
        ({"scale": LONG}, "scale: " + AT_MOST),
        ({"alibi": f"[1, {LONG}]"}, r"alibi\[1\]: " + AT_MOST),
        ({"causal": LONG}, r"causal: expected true or false, received an integer of 4800 digits$"),
        ({"name": LONG}, r"name: expected a non-empty string, received an integer of 4800 digits$"),
        (
            {"x": '[["2**10000 * 2**6000 - 1", 2], [3, 4]]'},
            r"x\[0\]\[0\]: expected a value whose numerator and denominator have at most 4300 digits, "
            "received one with 4817$",
        ),
    ],
    ids=["int", "string", "decimal", "scale", "alibi", "causal", "name", "folded"],
)
def test_long_literals_in_json(notebook_data, tmp_path, raw, message, cli):
    path = tmp_path / "long.json"
    path.write_text(spec_text(notebook_data, **raw))
    with pytest.raises(SymattnError, match=r"^in .*long\.json: " + message) as error:
        load_spec(path)
    assert len(str(error.value)) < 300 and "set_int_max_str_digits" not in str(error.value)
    for command in ("show", "eval"):
        assert_one_line_error(cli(command, str(path)), message)


def test_a_window_bound_of_any_length_is_unbounded(notebook_data, tmp_path, cli):
    path = tmp_path / "window.json"
    path.write_text(spec_text(notebook_data, window=f"[{LONG}, 0]"))
    assert load_spec(path).window == (None, 0)
    shown = cli("show", str(path), "--step", "weights1")
    assert shown.returncode == 0 and "window [∞, 0]" in shown.stdout, shown.stderr[-500:]


def test_long_integer_in_toml_names_the_line(tmp_path, cli):
    path = tmp_path / "long.toml"
    path.write_text(
        f'name = "t"\nx = [[{LONG}, 2], [3, 4]]\nwo = [[1, 0], [0, 1]]\n'
        "[[heads]]\nwq = [[1, 0], [0, 1]]\nwk = [[1, 0], [0, 1]]\nwv = [[1, 0], [0, 1]]\n"
    )
    message = r"line 2: expected integers of at most 4300 digits, received one of 4800$"
    with pytest.raises(SymattnError, match=r"^in .*long\.toml: " + message) as error:
        load_spec(path)
    assert "set_int_max_str_digits" not in str(error.value)
    assert_one_line_error(cli("eval", str(path)), message)


def test_the_limit_holds_at_its_edge(notebook_data):
    edge = "9" * 4300
    assert load_spec({**notebook_data, "x": [[edge, 2], [3, 4]]}).x.rows[0][0] == 10**4300 - 1
    assert load_spec({**notebook_data, "x": [[10**4300 - 1, 2], [3, 4]]}).to_dict()["x"][0][0] == 10**4300 - 1
    with pytest.raises(
        SymattnError, match=r"^x\[0\]\[0\]: expected an integer of at most 4300 digits, received one of 4301$"
    ):
        load_spec({**notebook_data, "x": [[10**4300, 2], [3, 4]]})


def test_long_command_line_values_are_cut(cli):
    result = cli("verify", "notebook", "--digits", LONG)
    assert_one_line_error(
        result, r"^symattn: error: --digits: expected auto or an integer, received '9{39}… \(4802 characters\)$"
    )


# 4. Files named .npz that are not .npz archives.

NPZ = r"expected a \.npz archive \(a zip of \.npy arrays, as numpy\.savez writes\)"


def _npy(path):
    np.save(path.with_suffix(".npy"), np.ones((2, 2)))
    path.with_suffix(".npy").rename(path)


def _random(path):
    path.write_bytes(bytes(range(256)) * 3)


def _empty(path):
    path.write_bytes(b"")


def _foreign_member(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("q.npy", "not an array")


def _objects(path):
    np.savez(path, q=np.array([None, 1], dtype=object))


def _truncated(path):
    np.savez(path, q=np.ones((1, 2, 2)), k=np.ones((1, 2, 2)), v=np.ones((1, 2, 2)))
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("make", "received"),
    [
        (_npy, r"received a single \.npy array \(numpy\.save\); save it with numpy\.savez$"),
        (_random, r"received a file that is not a zip archive$"),
        (_empty, r"received an empty file$"),
        (_foreign_member, r"received a member 'q' that is not a \.npy array$"),
        (_objects, r" of numbers, received an array of Python objects \(pickled\), which symattn does not load$"),
        (_truncated, r"received a damaged archive \("),
    ],
    ids=["npy", "random", "empty", "foreign-member", "objects", "truncated"],
)
def test_not_an_npz_archive(tmp_path, make, received, cli):
    path = tmp_path / "spec.npz"
    make(path)
    message = NPZ + ",? ?" + received
    with pytest.raises(SymattnError, match=r"^.*spec\.npz: " + message):
        load_spec(path)
    assert_one_line_error(cli("eval", str(path)), r"spec\.npz: " + message)


def test_a_valid_npz_still_loads(tmp_path):
    path = tmp_path / "spec.npz"
    np.savez(path, q=np.ones((1, 2, 2)), k=np.ones((1, 3, 2)), v=np.ones((1, 3, 1)), window=np.array([-1, 2**40]))
    assert load_spec(path).window == (None, None)


# 5. Notebooks: an np.array call inside another is the array it holds.


def test_nested_array_calls_in_a_notebook(tmp_path):
    from importlib import resources

    from symattn.notebook import check

    text = (resources.files("symattn") / "examples" / "multi_head_attention.txt").read_text()
    x = "X = np.array([[1, 2],\n              [3, 4]])"
    wo = "W_O = np.array([[1, 0],\n                [0, 1],\n                [-1, 0],\n                [0, -1]])"
    assert x in text and wo in text
    text = text.replace(x, "X = np.array(np.array([[1, 2], [3, 4]], dtype=np.float64))")
    text = text.replace(wo, "W_O = numpy.asarray(np.array(np.array([[1, 0], [0, 1], [-1, 0], [0, -1]]), dtype=float))")
    path = tmp_path / "nested.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok and report.checked == 20, report.lines()
    assert report.spec.x == load_spec("notebook").x and report.spec.wo == load_spec("notebook").wo

    path.write_text(text.replace("[[1, 2], [3, 4]]", "[[1, 2], [3, 5]]"))
    report = check(path)
    assert report.spec.x.rows[1][1] == 5 and not report.ok


def test_a_notebook_without_arrays_still_says_what_is_missing(tmp_path):
    from symattn.notebook import check

    path = tmp_path / "empty.txt"
    path.write_text("In [1]:\nX = np.array(some_list)\n\nIn [2]:\nW_O = np.array(np.zeros((4, 2)))\n")
    with pytest.raises(
        SymattnError, match=r"^.*empty\.txt: notebook: expected np\.array literals .*; missing X, W_O, W_Q1/W_K1/W_V1$"
    ):
        check(path)


def test_an_exact_input_beyond_float64_is_a_one_line_error_for_verify(notebook_data, tmp_path, cli):
    # eval certifies it (1e3000 is an exact decimal); an implementation cannot be fed it in any float dtype
    data = json.loads(json.dumps(notebook_data))
    data["x"][0][0] = "1e3000"
    path = tmp_path / "beyond.json"
    path.write_text(json.dumps(data))
    assert cli("eval", str(path), "--digits", "5", "--step", "M").returncode == 0
    assert_one_line_error(cli("verify", str(path)), "x: expected values within float64's range")
