"""Shared test helpers: an independent reference computation and random specs.

The reference is deliberately naive and shares no code with symattn: plain
mpmath (not intervals) at many more digits than asked of symattn, the textbook
softmax without any shift, inputs converted by SymPy's evalf.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

import mpmath
import pytest
import sympy

# The notebook's steps in trace order, spelled out once: tests pin this order, they do not derive it.
NOTEBOOK_STEPS = [
    "Q1",
    "K1",
    "V1",
    "scores1",
    "weights1",
    "lse1",
    "head1",
    "Q2",
    "K2",
    "V2",
    "scores2",
    "weights2",
    "lse2",
    "head2",
    "concat_heads",
    "M",
]


def to_mpf(entry, dps: int):
    if isinstance(entry, bool):
        raise TypeError(entry)
    if isinstance(entry, int):
        return mpmath.mpf(entry)
    if isinstance(entry, Fraction):
        return mpmath.mpf(entry.numerator) / entry.denominator
    if isinstance(entry, Decimal):  # exactly: 0.01 in binary would leave 1e-140 where the exact value is 0
        q = Fraction(entry)
        return mpmath.mpf(q.numerator) / q.denominator
    try:  # a rational string ("5e-30", "3/4", "3/7*1e12") exactly: sympify reads "5e-30" as a 15-digit Float
        q = Fraction(1)
        for factor in str(entry).replace(" ", "").split("*"):
            q *= Fraction(factor)
        return mpmath.mpf(q.numerator) / q.denominator
    except (ValueError, ZeroDivisionError):
        pass
    # test-authored strings only: SymPy's own parser is fine here
    return mpmath.mpf(str(sympy.N(sympy.sympify(entry), dps + 20)))


def _fraction(entry):
    """An entry as an exact Fraction, or None when it is irrational."""
    if isinstance(entry, (int, Fraction, Decimal)) and not isinstance(entry, bool):
        return Fraction(entry)
    try:
        q = Fraction(1)
        for factor in str(entry).replace(" ", "").split("*"):
            q *= Fraction(factor)
        return q
    except (ValueError, ZeroDivisionError):
        return None


def _product(x_rows, w_rows, dps):
    """x·w, exactly in Fractions when both are rational (a binary reference cannot see that 1000·0.01 - 10 is
    0), else in mpmath."""
    fx = [[_fraction(e) for e in row] for row in x_rows]
    fw = [[_fraction(e) for e in row] for row in w_rows]
    if all(e is not None for row in fx + fw for e in row):
        out = mpmath.matrix(len(fx), len(fw[0]))
        for i, row in enumerate(fx):
            for j in range(len(fw[0])):
                q = sum((a * fw[k][j] for k, a in enumerate(row)), Fraction(0))
                out[i, j] = mpmath.mpf(q.numerator) / q.denominator
        return out
    mat = lambda rows: mpmath.matrix([[to_mpf(e, dps) for e in row] for row in rows])  # noqa: E731
    return mat(x_rows) * mat(w_rows)


def reference(data: dict, dps: int = 120) -> dict:
    """Every step of the attention described by a spec dict, at ``dps`` digits, naively (the projections
    exactly where the inputs are rational)."""
    out = {}
    with mpmath.workdps(dps + 20):
        mat = lambda rows: mpmath.matrix([[to_mpf(e, dps) for e in row] for row in rows])  # noqa: E731
        x = mat(data["x"])
        heads = []
        for i, head in enumerate(data["heads"], 1):
            q, k, v = (_product(data["x"], head[w], dps) for w in ("wq", "wk", "wv"))
            scale = to_mpf(data["scale"], dps) if "scale" in data else 1 / mpmath.sqrt(q.cols)
            s = q * k.T * scale
            e = s.apply(mpmath.exp)
            w = mpmath.matrix(s.rows, s.cols)
            for r in range(s.rows):
                z = mpmath.fsum(e[r, c] for c in range(s.cols))
                for c in range(s.cols):
                    w[r, c] = e[r, c] / z
            h = w * v
            lse = mpmath.matrix([[lse_row([s[r, c] for c in range(s.cols)])] for r in range(s.rows)])
            out.update({f"Q{i}": q, f"K{i}": k, f"V{i}": v, f"scores{i}": s, f"weights{i}": w, f"head{i}": h})
            out[f"lse{i}"] = lse
            heads.append(h)
        n = x.rows
        concat = mpmath.matrix(n, sum(h.cols for h in heads))
        col = 0
        for h in heads:
            for r in range(n):
                for c in range(h.cols):
                    concat[r, col + c] = h[r, c]
            col += h.cols
        out["concat_heads"] = concat
        out["M"] = concat * mat(data["wo"])
    return out


def lse_row(row: list):
    """log Σ exp of a row's scores (masked ones -inf), as top + log1p(Σ of the others' exp(s − top)): a value near 0
    (one key's tiny score) keeps its digits; -inf for a row with no score."""
    live = sorted((x for x in row if x != -mpmath.inf), reverse=True)
    if not live:
        return -mpmath.inf
    top = live[0]
    return top + mpmath.log1p(mpmath.fsum(mpmath.exp(x - top) for x in live[1:]))


def rounded(value, digits: int, dps: int = 120) -> Decimal:
    """The reference value correctly rounded to ``digits`` significant digits (half even)."""
    text = mpmath.nstr(value, dps, strip_zeros=False, min_fixed=1, max_fixed=0)
    with localcontext() as ctx:
        ctx.prec = digits
        ctx.rounding = ROUND_HALF_EVEN
        ctx.Emax, ctx.Emin = MAX_EMAX, MIN_EMIN  # values far below any float keep their exponent
        return +Decimal(text)


def parts(text: str) -> tuple[int, int]:
    """A decimal string as (integer mantissa, exponent) with no trailing zeros in the mantissa: exponents of any
    size (Decimal cannot hold 1e-(10**23))."""
    mantissa, _, exponent = text.lower().partition("e")
    negative = mantissa.startswith("-")
    mantissa = mantissa.lstrip("+-")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0") or "0"
    e = int(exponent or 0) - len(fraction)
    m = int(digits)
    while m and m % 10 == 0:
        m //= 10
        e += 1
    return (-m if negative else m), (e if m else 0)


def rounded_parts(value, digits: int, dps: int) -> tuple[int, int]:
    """The reference value correctly rounded (half even) to ``digits`` significant digits, as parts()."""
    text = mpmath.nstr(value, dps, strip_zeros=False, min_fixed=1, max_fixed=0)
    m, e = parts(text)
    negative, m = m < 0, abs(m)
    s = str(m)
    if len(s) > digits:
        cut = len(s) - digits
        keep, rest = int(s[:digits]), s[digits:]
        half = "5" + "0" * (cut - 1)
        if rest > half or (rest == half and keep % 2):
            keep += 1
        m, e = keep, e + cut
    return parts(f"{'-' if negative else ''}{m}e{e}")


def significant_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def assert_certified(truth, data: dict, digits: int, dps: int = 120) -> int:
    """Every value of ``truth`` is the reference correctly rounded, with ``digits`` digits.  Returns the count."""
    ref = reference(data, dps)
    count = 0
    for step in truth:
        expected = ref[step.name]
        assert step.shape == (expected.rows, expected.cols), step.name
        for i, row in enumerate(step.values):
            for j, text in enumerate(row):
                value = expected[i, j]
                where = f"{step.name}[{i}, {j}]"
                if text == "0":
                    assert abs(value) < mpmath.mpf(10) ** (-(dps - 10)), f"{where}: printed 0, reference {value}"
                else:
                    assert significant_digits(text) == digits, f"{where}: {text!r} has not {digits} digits"
                    assert Decimal(text) == rounded(value, digits, dps), f"{where}: {text} vs {value}"
                assert step.certified_digits[i][j] >= digits
                count += 1
    return count


def random_matrix(rng: random.Random, rows: int, cols: int, kind: str):
    def entry():
        if kind == "int":
            return rng.randint(-4, 4)
        if kind == "rational":
            return f"{rng.randint(-9, 9)}/{rng.randint(1, 7)}"
        if kind == "decimal":
            return Decimal(rng.randint(-999, 999)) / 100  # as JSON's parse_float would give
        raise ValueError(kind)

    return [[entry() for _ in range(cols)] for _ in range(rows)]


def random_spec(seed: int, n: int, d_model: int, h: int, d_k: int, d_v: int, d_out: int, kind: str = "int") -> dict:
    rng = random.Random(seed)
    m = lambda r, c: random_matrix(rng, r, c, kind)  # noqa: E731
    return {
        "name": f"random{seed}",
        "x": m(n, d_model),
        "heads": [{"wq": m(d_model, d_k), "wk": m(d_model, d_k), "wv": m(d_model, d_v)} for _ in range(h)],
        "wo": m(h * d_v, d_out),
    }


@pytest.fixture
def notebook_data() -> dict:
    return {
        "name": "notebook",
        "x": [[1, 2], [3, 4]],
        "heads": [
            {"wq": [[1, 0], [0, 1]], "wk": [[0, 1], [1, 0]], "wv": [[1, 0], [0, -1]]},
            {"wq": [[0, 1], [1, 0]], "wk": [[1, 0], [0, 1]], "wv": [[0, 1], [-1, 0]]},
        ],
        "wo": [[1, 0], [0, 1], [-1, 0], [0, -1]],
    }


@dataclass
class Ran:
    """What a command printed and returned, as subprocess.run reports it."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """The command line in this process: ``cli("eval", "notebook", cwd=...)`` runs ``symattn.cli.main`` and
    returns its exit code and what it wrote (no interpreter launch; a few tests keep real processes)."""
    from symattn.cli import main

    def run(*args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # --help, --version: argparse exits
            code = e.code
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


@pytest.fixture
def large_everywhere(monkeypatch):
    """The large path (float64 enclosures) for small specs too: its threshold is about size only.  The one
    place that names where the threshold lives."""
    import symattn.truth.large

    monkeypatch.setattr(symattn.truth.large, "LARGE", 0)


def generated_module(source: str):
    """A module generated by ``symattn.generate``, run from its text (the generator's own output)."""
    import types

    module = types.ModuleType("generated")
    exec(compile(source, "<generated>", "exec"), module.__dict__)  # noqa: S102 -- the generator's own output
    return module
