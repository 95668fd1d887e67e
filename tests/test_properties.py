"""Property-based tests (hypothesis), bounded so that CI stays fast: no assertion on time, deadline=None.

- random specs (integers, decimals, fractions; magnitudes from 1e-30 to 1e30; 1-4 heads; non-square heads):
  every certified digit agrees with an independent mpmath reference at more digits;
- random expression strings: the entry parser returns an entry or raises SymattnError, nothing else;
- random notebooks rendered from random specs under random print options: no false alarm, and a randomly
  corrupted digit is named.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import symattn
from symattn import SymattnError
from symattn.entries import parse_entry
from symattn.notebook import check
from tests.conftest import parts, reference, rounded_parts, significant_digits

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@st.composite
def entries(draw, magnitude: int = 0):
    kind = draw(st.sampled_from(["int", "decimal", "fraction"]))
    if kind == "int":
        value = draw(st.integers(-9, 9))
        return value if not magnitude else f"{value}e{magnitude}"
    if kind == "decimal":
        return Decimal(draw(st.integers(-999, 999))).scaleb(magnitude - 2)
    num, den = draw(st.integers(-9, 9)), draw(st.integers(1, 9))
    return f"{num}/{den}" + (f"*1e{magnitude}" if magnitude else "")


@st.composite
def specs(draw):
    n, d_model, h = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d_k, d_v, d_out = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    magnitude = draw(st.sampled_from([0, 0, 0, -30, -12, -3, 3, 12, 30]))

    def matrix(rows, cols, scale=0):
        return [[draw(entries(scale)) for _ in range(cols)] for _ in range(rows)]

    return {
        "x": matrix(n, d_model, magnitude),
        "heads": [
            {"wq": matrix(d_model, d_k), "wk": matrix(d_model, d_k), "wv": matrix(d_model, d_v)} for _ in range(h)
        ],
        "wo": matrix(h * d_v, d_out),
    }


@settings(max_examples=120, **SETTINGS)
@given(data=specs(), digits=st.integers(1, 30))
@example(  # M[2, 0] = 8·14(1 − ~e^-416) − 2·56(1 − ~e^-347) = 7e-149: a reference at 120 digits says 0
    data={"x": [[0], [0], [7]], "wo": [[0, 0], [8, 0], [2, 0]],
          "heads": [{"wq": [[0, 0]], "wk": [[0, 0]], "wv": [[0]]}, {"wq": [[3, 0]], "wk": [[4, 0]], "wv": [[2]]},
                    {"wq": [[5, 0]], "wk": [[2, 0]], "wv": [[-8]]}]},
    digits=1,
)  # fmt: skip
@example(  # M[1, 0] = −8000·e^-707107/(1 + …): below every precision tried, a bound
    data={"x": [["0e3"], ["1e3"]], "wo": [[0, 0], [8, 0], [2, 0]],
          "heads": [{"wq": [[0, 0]], "wk": [[0, 0]], "wv": [[0]]}, {"wq": [[0, 1]], "wk": [[0, 1]], "wv": [[1]]},
                    {"wq": [[0, 0]], "wk": [[0, 0]], "wv": [[-8]]}]},
    digits=1,
)  # fmt: skip
def test_every_certified_digit_agrees_with_mpmath(data, digits):
    truth = symattn.evaluate(data, digits=digits)
    with mpmath.workdps(20):
        top = max(
            abs(mpmath.mpf(str(Fraction(e) if not isinstance(e, str) else _value(e)))) for r in data["x"] for e in r
        )
    dps = 120 + 2 * int(abs(mpmath.log10(top + 1)))  # scores up to |x|²: the exponents need their own digits
    # a reference at dps digits cannot see what cancels below 10**-dps of the terms (8·14(1 − e^-416) − 2·56(1 −
    # e^-347) is 7e-149, not 0): an entry it disagrees with is checked again at 4 times the digits before it fails
    refs = {}

    def ref_at(d):
        if d not in refs:
            refs[d] = reference(data, d)
        return refs[d]

    for step in truth:
        for i, row in enumerate(step.values):
            for j, text in enumerate(row):
                for d in (dps, 4 * dps):
                    problem = _disagreement(step.name, i, j, text, ref_at(d)[step.name][i, j], digits, d)
                    if problem is None:
                        break
                assert problem is None, problem


def _disagreement(name, i, j, text, value, digits, dps):
    """Why the printed ``text`` disagrees with a reference ``value`` good to about ``dps`` digits, or None."""
    if text == "0":
        return None if value == 0 or abs(value) < mpmath.mpf(10) ** (-(dps - 10)) else (name, i, j, value)
    if text.startswith("<"):  # a bound: no digit claimed, |exact| below it (a near-zero no precision settled)
        return None if abs(value) < mpmath.mpf(text[1:]) else (name, i, j, text, value)
    if significant_digits(text) != digits:
        return (name, text)
    # a binary reference cannot decide a decimal tie (1.5e-29 held as 1.4999…e-29): there either neighbour of
    # the tie is the reference's rounding
    with mpmath.workdps(dps + 20):
        wiggle = abs(value) * mpmath.mpf(10) ** (20 - dps)
        candidates = {rounded_parts(value + k * wiggle, digits, dps) for k in (-1, 0, 1)}
    return None if parts(text) in candidates else (name, i, j, text, value)


def _value(text: str):
    return Fraction(parse_entry(text, "e"))


TOKENS = [
    "1", "2", "0", "9", "0.5", ".5", "1e3", "1e-3", "1_0", "0x1", "1j", "+", "-", "*", "/", "**", "(", ")", "sqrt(",
    "exp(", "log(", "pi", "a", "e", " ", ".", ",", "[", "]", "'", "lambda", "%", "//", "1e99999", "9**9999", "nan",
]  # fmt: skip


@settings(max_examples=1000, **SETTINGS)
@given(text=st.one_of(st.lists(st.sampled_from(TOKENS), max_size=12).map("".join), st.text(max_size=30)))
def test_expression_strings_parse_or_raise_symattn_errors(text):
    try:
        entry = parse_entry(text, "x[0][0]")
    except SymattnError as e:
        assert str(e).startswith("x[0][0]: ") and "\n" not in str(e)
    else:
        assert entry is not None


@st.composite
def notebooks(draw):
    n, d, h = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ints = st.integers(-3, 3)

    def matrix(rows, cols):
        return np.array([[draw(ints) for _ in range(cols)] for _ in range(rows)])

    x = matrix(n, d)
    heads = [(matrix(d, d), matrix(d, d), matrix(d, d)) for _ in range(h)]
    wo = matrix(h * d, d)
    options = {
        "precision": draw(st.integers(1, 17)),
        "floatmode": draw(st.sampled_from(["maxprec", "fixed", "unique", "maxprec_equal"])),
        "suppress": draw(st.booleans()),
    }
    as_list = draw(st.booleans())
    return x, heads, wo, options, as_list, draw(st.randoms(use_true_random=False))


def render(x, heads, wo, options, as_list) -> tuple[str, list]:
    """A transcript as the notebook would print it, computed with the notebook's own NumPy algorithm; returns
    the text and the printed numbers (token, offset) that a corruption may change."""

    def literal(name, a):
        return f"{name} = np.array({np.asarray(a).tolist()!r})"

    cells = ["import numpy as np", literal("X", x)]
    results = []
    for i, (wq, wk, wv) in enumerate(heads, 1):
        cells.append("\n".join([literal(f"W_Q{i}", wq), literal(f"W_K{i}", wk), literal(f"W_V{i}", wv)]))
        q, k, v = x @ wq, x @ wk, x @ wv
        s = (q @ k.T) / np.sqrt(q.shape[1])
        e = np.exp(s - s.max(axis=1, keepdims=True))
        results.append((e / e.sum(axis=1, keepdims=True)) @ v)
    cells.append(literal("W_O", wo))
    m = np.hstack(results) @ wo
    with np.printoptions(**options):
        printed = [f"Head {i} Output:\n{r}" for i, r in enumerate(results, 1)]
        printed.append(f"Final Multi-Head Self-Attention Output (M):\n{m.tolist() if as_list else m}")
    text = "".join(f"In [{k}]:\n{cell}\n\n" for k, cell in enumerate(cells, 1))
    text += f"In [{len(cells) + 1}]:\nnp.set_printoptions(...)\nprint(...)\n\n" + "\n\n".join(printed) + "\n"
    return text


@settings(max_examples=80, **SETTINGS)
@given(case=notebooks())
def test_notebooks_raise_no_false_alarm_and_name_a_corrupted_digit(case, tmp_path_factory):
    x, heads, wo, options, as_list, rng = case
    text = render(x, heads, wo, options, as_list)
    folder = tmp_path_factory.mktemp("nb")
    path = folder / "nb.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok, report.lines()
    # corrupt one digit among the first eight significant ones of one printed number
    start = text.index("Head 1 Output:")
    import re

    numbers = [m for m in re.finditer(r"-?\d+\.\d+(e[-+]?\d+)?", text[start:])]
    # a digit that a wrong number can be told by: one of the first three significant ones of an entry that is not
    # tiny next to the largest printed (a float64 result may be off by far more than its own size there)
    largest = max((abs(float(m.group())) for m in numbers), default=0.0)
    numbers = [m for m in numbers if abs(float(m.group())) >= max(1e-6 * largest, 1e-9)]
    if not numbers:
        return
    chosen = rng.choice(numbers)
    token = chosen.group()
    digit_positions = [k for k, c in enumerate(token.split("e")[0]) if c.isdigit()]
    significant = [k for k in digit_positions if token[: k + 1].strip("-0.")][:3]
    if not significant:
        return
    k = rng.choice(significant)
    wrong = token[:k] + str((int(token[k]) + rng.randint(1, 9)) % 10) + token[k + 1 :]
    if Decimal(wrong) == Decimal(token):
        return
    offset = start + chosen.start()
    bad = folder / "bad.txt"
    bad.write_text(text[:offset] + wrong + text[offset + len(token) :])
    named = check(bad).mismatches
    assert [m.printed for m in named] == [wrong], (token, wrong, [str(m) for m in named])


@pytest.mark.parametrize("seed", range(3))
def test_notebook_rendering_is_itself_exercised(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (2, 2))
    text = render(x, [(np.eye(2, dtype=int),) * 3], np.eye(2, dtype=int), {"precision": 8}, False)
    assert "Head 1 Output:" in text and "np.array" in text
