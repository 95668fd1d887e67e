import mpmath
import pytest
import sympy

import symattn
from symattn import SymattnError
from tests.conftest import NOTEBOOK_STEPS, random_spec, reference

E3 = sympy.exp(3 * sympy.sqrt(2))


def assert_matches_reference(trace, data, dps=60):
    ref = reference(data, dps + 20)
    for name in trace.names:
        closed = trace[name]
        assert closed.shape == (ref[name].rows, ref[name].cols)
        for i in range(closed.rows):
            for j in range(closed.cols):
                with mpmath.workdps(dps + 20):
                    value = mpmath.mpf(str(sympy.N(closed[i, j], dps + 10)))
                tolerance = mpmath.mpf(10) ** -dps * max(1, abs(ref[name][i, j]))
                assert abs(value - ref[name][i, j]) <= tolerance, f"{name}[{i}, {j}]"


def test_notebook_closed_forms_are_the_short_ones():
    trace = symattn.build("notebook")
    head, m = trace["head1"][0, 0], trace["M"][0, 0]
    assert sympy.simplify(head - (1 + 3 * E3) / (1 + E3)) == 0
    assert sympy.simplify(m - (3 + 7 * E3) / (1 + E3)) == 0
    assert sympy.count_ops(head) <= sympy.count_ops((1 + 3 * E3) / (1 + E3))
    assert sympy.count_ops(m) <= sympy.count_ops((3 + 7 * E3) / (1 + E3))
    assert str(m) == "(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))"


def test_names_and_order():
    trace = symattn.build("notebook")
    assert trace.names == NOTEBOOK_STEPS
    assert list(trace) == trace.names


def test_notebook_every_step_matches_an_independent_computation(notebook_data):
    assert_matches_reference(symattn.build("notebook"), notebook_data)


@pytest.mark.parametrize("kind", ["int", "rational", "decimal"])
def test_random_rational_specs_match(kind):
    data = random_spec(7, n=3, d_model=3, h=2, d_k=2, d_v=2, d_out=3, kind=kind)
    assert_matches_reference(symattn.build(data), data)


def test_scale_negative_and_rational(notebook_data):
    notebook_data["scale"] = "-1/3"
    trace = symattn.build(notebook_data)
    assert trace["scores1"][0, 0] == sympy.Rational(-4, 3)
    assert_matches_reference(trace, notebook_data)


def test_transcendental_scale(notebook_data):
    notebook_data["scale"] = "log(2)/4"
    assert_matches_reference(symattn.build(notebook_data), notebook_data)


def test_structure_shares_row_normalisers():
    trace = symattn.build("notebook")
    z = sympy.Symbol("Z1_0", positive=True)
    assert trace.structure("head2")[0, 0].free_symbols == {z}  # head 2's rows equal head 1's
    assert trace.normalisers[z] == 1 + E3
    for name in trace.names:
        substituted = trace.structure(name).xreplace(trace.normalisers)
        assert sympy.simplify(substituted - trace[name]) == sympy.zeros(*substituted.shape)


def test_symbolic_entries_give_closed_forms_in_the_symbols(notebook_data):
    data = dict(notebook_data, x=[["a", 2], [3, "b"]])
    trace = symattn.build(data)
    a, b = sympy.Symbol("a", real=True), sympy.Symbol("b", real=True)
    assert trace["M"][0, 0].free_symbols == {a, b}
    assert trace["Q1"][0, 0] == a
    numeric = symattn.build("notebook")
    for name in ("weights1", "head2", "M"):
        difference = trace[name].subs({a: 1, b: 4}) - numeric[name]
        assert all(abs(sympy.N(e, 40)) < 1e-35 for e in difference)


def test_irrational_entries(notebook_data):
    data = dict(notebook_data, x=[["sqrt(2)/2", 1], ["-1/3", "exp(1)/4"]])
    assert_matches_reference(symattn.build(data), data)


def test_latex_display():
    trace = symattn.build("notebook")
    latex = trace._repr_latex_()
    assert latex.startswith("$\\begin{aligned}") and "\\mathrm{concat\\_heads}" in latex
    assert "e^{3 \\sqrt{2}}" in trace.step("M")._repr_latex_()


def test_unknown_step():
    with pytest.raises(SymattnError, match=r"^step: expected one of Q1, K1, .*, M, received 'head3'$"):
        symattn.build("notebook")["head3"]


def test_rational_value_decides_through_sympy(notebook_data):
    data = dict(notebook_data, x=[["sqrt(2)", 1], ["sqrt(2)", 1]])  # equal rows: equal scores
    trace = symattn.build(data)
    assert trace.rational_value("weights1", 0, 1) == sympy.Rational(1, 2)
    assert trace.rational_value("head1", 0, 0) is None
