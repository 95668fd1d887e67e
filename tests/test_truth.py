import subprocess
import sys
from decimal import Decimal
from fractions import Fraction

import pytest

import symattn
import symattn.truth.evaluation
import symattn.truth.result
from symattn import SymattnError
from tests.conftest import assert_certified, random_spec, reference, rounded, significant_digits

ENGINES = ["mpmath", "arb"]


@pytest.mark.parametrize("engine", ENGINES)
def test_notebook_50_digits(engine, notebook_data):
    truth = symattn.evaluate("notebook", digits=50, engine=engine)
    assert truth.engine == engine
    assert assert_certified(truth, notebook_data, 50) == 6 * 4 * 2 + 2 * 2 + 8 + 4  # lse1, lse2: 2 × 1 each


@pytest.mark.parametrize("engine", ENGINES)
def test_notebook_200_digits(engine, notebook_data):
    assert_certified(symattn.evaluate("notebook", digits=200, engine=engine), notebook_data, 200, dps=280)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("seed", "kind"), [(1, "int"), (2, "rational"), (3, "decimal"), (4, "int")])
def test_random_rectangular_specs(engine, seed, kind):
    data = random_spec(seed, n=4, d_model=3, h=3, d_k=2, d_v=3, d_out=2, kind=kind)
    assert_certified(symattn.evaluate(data, digits=30, engine=engine), data, 30)


@pytest.mark.parametrize("engine", ENGINES)
def test_huge_logits(engine):
    big = 1000
    data = {
        "x": [[big, 0], [0, big], [big, big + 1]],
        "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[1, 0], [0, 1]], "wv": [[1, 2], [3, 4]]}],
        "wo": [[1, 0], [0, 1]],
    }
    truth = symattn.evaluate(data, digits=25, engine=engine)
    assert_certified(truth, data, 25, dps=60)
    assert "e-" in truth["weights1"].values[0][1]  # about exp(-700000): far below any float


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_cancellation_prints_zero(engine, notebook_data):
    head = notebook_data["heads"][0]
    data = dict(notebook_data, heads=[head, head], wo=[[1, 1], [0, 2], [-1, -1], [0, -2]])
    truth = symattn.evaluate(data, digits=40, engine=engine)
    assert truth["M"].values == (("0", "0"), ("0", "0"))
    assert truth["M"].exact == ((True, True), (True, True))
    assert_certified(truth, data, 40)


@pytest.mark.parametrize("engine", ENGINES)
def test_rational_values_on_rounding_boundaries(engine):
    # identical tokens: every score in a row is equal, so weights are exactly 1/2 and heads exact decimals
    data = {
        "x": [[1, 2], [1, 2]],
        "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[1, 0], [0, 1]], "wv": [["0.25", 1], [0, "0.225"]]}],
        "wo": [[1, 0], [0, 1]],
    }
    truth = symattn.evaluate(data, digits=2, engine=engine)
    assert truth["weights1"].values[0] == ("0.50", "0.50")
    # 1.45 = 1 + 2·0.225 is not a binary fraction: no ball decides its rounding; the exact form does
    assert truth["head1"].values[0] == ("0.25", "1.4")
    assert truth["head1"].exact[0][1]


def test_partly_cancelling_output(notebook_data):
    # one output column is an exact zero, the other is not
    head = notebook_data["heads"][0]
    data = dict(notebook_data, heads=[head, head], wo=[[1, 1], [0, 0], [-1, 0], [0, 0]])
    truth = symattn.evaluate(data, digits=30)
    assert [row[0] for row in truth["M"].values] == ["0", "0"]
    assert_certified(truth, data, 30)


@pytest.mark.parametrize("engine", ENGINES)
def test_irrational_inputs(engine, notebook_data):
    data = dict(notebook_data, x=[["sqrt(2)/2", "1/3"], ["-0.5", "exp(1)/4"]], scale="pi/5")
    assert_certified(symattn.evaluate(data, digits=30, engine=engine), data, 30)


def test_irrational_inputs_with_rational_weights(notebook_data):
    data = dict(notebook_data, x=[["sqrt(2)", 1], ["sqrt(2)", 1]])
    truth = symattn.evaluate(data, digits=20, engine="arb")
    assert truth["weights1"].values[0] == ("0.50000000000000000000",) * 2
    assert_certified(truth, data, 20)


def test_engines_agree_on_many_specs():
    for seed in range(12):
        kind = ("int", "rational", "decimal")[seed % 3]
        data = random_spec(
            100 + seed,
            n=2 + seed % 3,
            d_model=2 + seed % 2,
            h=1 + seed % 3,
            d_k=2,
            d_v=1 + seed % 2,
            d_out=2,
            kind=kind,
        )
        a = symattn.evaluate(data, digits=25, engine="mpmath")
        b = symattn.evaluate(data, digits=25, engine="arb")
        assert [s.values for s in a] == [s.values for s in b], seed


def test_values_as_decimals():
    m = symattn.evaluate("notebook", digits=20)["M"]
    assert str(m[0, 0]) == "6.9433358564932463888"
    assert m.to_numpy()[1, 1] == pytest.approx(-6.99979920996)


def test_symbols_cannot_be_evaluated(notebook_data):
    data = dict(notebook_data, x=[["a", 2], [3, "b"]])
    with pytest.raises(SymattnError, match=r"^spec notebook: evaluation needs numbers, received the symbols a, b; "):
        symattn.evaluate(data)


@pytest.mark.parametrize("digits", [0, -3, 10**6, 2.5, True])
def test_bad_digits(digits):
    with pytest.raises(SymattnError, match=r"^digits: expected an integer from 1 to 100000, received "):
        symattn.evaluate("notebook", digits=digits)


def test_bad_engine():
    with pytest.raises(SymattnError, match=r"^engine: expected one of mpmath, arb, auto, received 'gpu'$"):
        symattn.evaluate("notebook", engine="gpu")


def test_eval_does_not_import_sympy():
    code = (
        "import sys, symattn.cli\n"
        "assert symattn.cli.main(['eval', 'notebook', '--json']) == 0\n"
        "assert 'sympy' not in sys.modules, 'sympy imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_flint_precision_is_restored():
    import flint

    before = flint.ctx.prec
    symattn.evaluate("notebook", digits=100, engine="arb")
    assert flint.ctx.prec == before


def test_fraction_inputs_from_python():
    spec = symattn.AttentionSpec(
        "py", [[Fraction(1, 3), 1]], [{"wq": [[1], [1]], "wk": [[1], [1]], "wv": [[1], [1]]}], [[3]]
    )
    assert symattn.evaluate(spec, digits=5)["M"].values == (("4.0000",),)


def test_notebook_1000_digits(notebook_data):
    truth = symattn.evaluate("notebook", digits=1000, engine="arb")
    assert_certified(truth, notebook_data, 1000, dps=1100)


def near_cancellation() -> dict:
    # nearly one-hot weights: M = 8·w0 − 8·(w0 + w1) = −8·w1 ≈ −8·exp(−45), computed from terms near 8,
    # so 50 digits of it need about 20 digits more than the first guess of the precision
    return {
        "x": [[8, 0], [0, 8]],
        "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[1, 0], [0, 1]], "wv": [[1, 1], [0, 1]]}],
        "wo": [[1], [-1]],
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_precision_rises_and_says_so(engine, caplog):
    data = near_cancellation()
    with caplog.at_level("DEBUG", logger="symattn"):
        truth = symattn.evaluate(data, digits=50, engine=engine)
    assert any(r.getMessage().startswith("raising precision from ") for r in caplog.records)
    assert truth.bits > symattn.truth.evaluation.initial_bits(truth.spec, 50)
    assert_certified(truth, data, 50)


def test_rises_left_settle_entry_by_entry(monkeypatch):
    # no precision rise for the whole computation: the entries it leaves rise on their own rows when read
    monkeypatch.setattr(symattn.truth.evaluation, "MAX_RISES", 0)
    truth = symattn.evaluate(near_cancellation(), digits=50)
    assert_certified(truth, near_cancellation(), 50)
    assert truth.notes == []


def test_an_entry_no_precision_settles_gets_fewer_digits(monkeypatch):
    # the escalation limit below what M needs: M gets the digits its enclosure proves, and a note says so
    monkeypatch.setattr(symattn.truth.evaluation, "MAX_RISES", 0)
    monkeypatch.setattr(symattn.truth.result, "MAX_ESCALATION", 224)
    data = near_cancellation()
    truth = symattn.evaluate(data, digits=50)
    ref = reference(data, 120)
    fewer = 0
    for i, row in enumerate(truth["M"].values):
        digits = truth["M"].certified_digits[i][0]
        assert 0 < digits <= 50
        assert significant_digits(row[0]) == digits
        assert Decimal(row[0]) == rounded(ref["M"][i, 0], digits, 120)
        fewer += digits < 50
    assert fewer
    assert truth.notes and truth.notes[0].startswith(f"{fewer} entries certified to fewer than 50 digits")


def test_progress_only_on_a_terminal():
    import io

    from symattn.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown, hidden = Terminal(), io.StringIO()
    for stream in (shown, hidden):
        progress = Progress(None, stream, delay=0)
        progress("arb at 200 bits: certifying", 10, 100)
        progress.close()
    assert "symattn: arb at 200 bits: certifying 10/100 entries" in shown.getvalue()
    assert hidden.getvalue() == ""


def test_cli_json_stays_clean_on_a_pipe(cli):
    result = cli("eval", "notebook", "--json", "--digits", "300")
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_just_below_a_rounding_tie(engine):
    # head[0, 0] = 2.635·(1 − ε) with ε ≈ exp(−312): half-even would round 2.635 itself up to 2.64, the true value
    # rounds down; telling them apart takes far more bits than 3 digits would suggest
    data = {
        "x": [[21, 0], [0, 21]],
        "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[1, 0], [0, 1]], "wv": [["527/4200"], [0]]}],
        "wo": [[1]],
    }
    truth = symattn.evaluate(data, digits=3, engine=engine)
    assert truth["head1"].values[0] == ("2.63",)
    assert truth["V1"].values[0] == ("2.64",)  # the exact 2.635 itself, a tie: half to even
    assert_certified(truth, data, 3, dps=400)
