"""The backward pass (issue 12): exact gradients against finite differences of an independent mpmath forward
pass, exact zeros, the generated backward, and the verifier on backward kernels (right ones and the classic
bugs), through the CLI and the pytest helper."""

from __future__ import annotations

import copy
import json
import sys
from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.cli import main
from symattn.codegen import generate
from symattn.testing import assert_attention_close
from symattn.verifier import convention
from tests import oracle
from tests.conftest import generated_module, to_mpf
from tests.test_variants import CASES, base
from tools import impls

DPS = 90
H = Fraction(1, 10**30)  # an exact perturbation: central differences are then good to about 1e-58
DIGITS = 25


def _loss(data: dict, dout) -> mpmath.mpf:
    """Σ dout ∘ M by the independent forward reference (all ones without a dout)."""
    m = oracle.steps(data, DPS)["M"]
    with mpmath.workdps(DPS):
        total = mpmath.mpf(0)
        for i in range(m.rows):
            for j in range(m.cols):
                total += m[i, j] * (1 if dout is None else to_mpf(dout[i][j], DPS))
        return total


def _entries(data: dict):
    """(step name, row, col, path into the data) for every input entry of a projection-form spec."""
    heads = data["heads"]
    kv = data.get("kv_heads", heads)
    kv_key = "kv_heads" if "kv_heads" in data else "heads"

    def matrix(step, path, rows):
        for i, row in enumerate(rows):
            for j in range(len(row)):
                yield step, i, j, path + (i, j)

    def vector(step, path, values):
        for j in range(len(values)):
            yield step, 0, j, path + (j,)

    yield from matrix("dx", ("x",), data["x"])
    if "x_kv" in data:
        yield from matrix("dx_kv", ("x_kv",), data["x_kv"])
    for i, head in enumerate(heads, 1):
        yield from matrix(f"dwq{i}", ("heads", i - 1, "wq"), head["wq"])
        if "bq" in head:
            yield from vector(f"dbq{i}", ("heads", i - 1, "bq"), head["bq"])
    for g, head in enumerate(kv, 1):
        for w in ("wk", "wv"):
            yield from matrix(f"d{w}{g}", (kv_key, g - 1, w), head[w])
        for b in ("bk", "bv"):
            if b in head:
                yield from vector(f"d{b}{g}", (kv_key, g - 1, b), head[b])
    yield from matrix("dwo", ("wo",), data["wo"])
    if "bo" in data:
        yield from vector("dbo", ("bo",), data["bo"])
    if "bias" in data:
        yield from matrix("dbias", ("bias",), data["bias"])


def _copied(value):
    """A deep copy with no shared rows ([[1, 0]] * 4 repeats one list; deepcopy would keep that)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copied(v) for v in value]
    return value


def _perturbed(data: dict, path: tuple, delta: Fraction) -> dict:
    out = _copied(data)
    *parents, last = path
    holder = out
    for key in parents:
        holder = holder[key]
    holder[last] = Fraction(_exact(holder[last])) + delta
    return out


def _exact(entry):
    if isinstance(entry, str):
        return Fraction(entry)
    return entry


def _finite_differences(data: dict) -> dict:
    """Every input gradient of Σ dout ∘ M, by central differences of the independent reference."""
    dout = data.get("dout")
    out = {}
    with mpmath.workdps(DPS):
        for step, i, j, path in _entries(data):
            up = _loss(_perturbed(data, path, H), dout)
            down = _loss(_perturbed(data, path, -H), dout)
            out[(step, i, j)] = (up - down) / (2 * to_mpf(H, DPS))
    return out


def _assert_agree(truth, fd: dict, label: str) -> int:
    checked = 0
    with mpmath.workdps(DPS):
        for (step, i, j), value in fd.items():
            text = truth[step].values[i][j]
            if text == "0":
                assert abs(value) < mpmath.mpf(10) ** -50, (label, step, i, j, value)
            else:  # DIGITS correctly rounded digits: within one unit of the last
                error = abs(mpmath.mpf(text) - value)
                assert error <= abs(value) * mpmath.mpf(10) ** (1 - DIGITS), (label, step, i, j, text, value)
            checked += 1
    return checked


FD_CASES = ["causal", "bottom_right", "mask", "gqa", "softcap", "alibi", "empty", "bias and projection biases"]


@pytest.mark.parametrize("case", FD_CASES)
def test_every_input_gradient_agrees_with_finite_differences_of_an_independent_reference(case):
    data = copy.deepcopy(CASES[case][0])
    if case in ("gqa", "softcap", "bias and projection biases"):  # a cotangent that is not all ones
        rows, cols = len(data["x"]), len(data["wo"][0])
        data["dout"] = [[Fraction((3 * r + c) % 5 - 2, 3) for c in range(cols)] for r in range(rows)]
    fd = _finite_differences(data)
    names = sorted({step for step, _, _ in fd})
    truth = symattn.evaluate(data, digits=DIGITS, steps=names)
    assert _assert_agree(truth, fd, case) == len(fd)


# The kernel form: q, k, v given; a zero bias per head makes dbias{i} = dscores{i} a checked input gradient.

KERNEL = {
    "q": [[[1, 0], [0, 1], [1, 1]], [[1, 2], [0, -1], ["1/2", 0]], [[0, 1], [1, 1], [-1, 0]]],
    "k": [[[1, 0], [0, 1], [2, 1], [1, 1]]],
    "v": [[[1, 2], [3, 4], [5, 6], [0, 1]]],
}


def _kernel_loss(data: dict) -> mpmath.mpf:
    """Σ dout ∘ heads, written apart from symattn: GQA, causal bottom-right, mask, softcap, per-head bias."""
    q, k, v = data["q"], data["k"], data["v"]
    H_, H_kv = len(q), len(k)
    L, S = len(q[0]), len(k[0])
    scale = 1 / mpmath.sqrt(len(q[0][0]))
    offset = S - L if data.get("align") == "bottom_right" else 0
    total = mpmath.mpf(0)
    for h in range(H_):
        g = h * H_kv // H_
        for i in range(L):
            row = []
            for j in range(S):
                if data.get("causal") and j > i + offset:
                    continue
                if "mask" in data and not data["mask"][i][j]:
                    continue
                s = scale * mpmath.fsum(to_mpf(q[h][i][c], DPS) * to_mpf(k[g][j][c], DPS) for c in range(len(q[h][i])))
                if "softcap" in data:
                    c = to_mpf(data["softcap"], DPS)
                    s = c * mpmath.tanh(s / c)
                if "bias" in data:
                    s += to_mpf(data["bias"][h][i][j], DPS)
                row.append((j, s))
            if not row:
                continue
            z = mpmath.fsum(mpmath.exp(s) for _, s in row)
            for c in range(len(v[g][0])):
                o = mpmath.fsum(mpmath.exp(s) * to_mpf(v[g][j][c], DPS) for j, s in row) / z
                total += o * to_mpf(data["dout"][h][i][c], DPS) if "dout" in data else o
    return total


def _kernel_fd(data: dict) -> dict:
    out = {}
    with mpmath.workdps(DPS):
        for key, count in (("q", len(data["q"])), ("k", len(data["k"])), ("v", len(data["v"])),
                           ("bias", len(data["q"]))):  # fmt: skip
            for n in range(count):
                for i, row in enumerate(data[key][n]):
                    for j in range(len(row)):
                        values = []
                        for delta in (H, -H):
                            moved = _copied(data)
                            moved[key][n][i][j] = Fraction(_exact(moved[key][n][i][j])) + delta
                            values.append(_kernel_loss(moved))
                        out[(f"d{key}{n + 1}", i, j)] = (values[0] - values[1]) / (2 * to_mpf(H, DPS))
    return out


KERNEL_CASES = {
    "causal bottom-right": dict(causal=True, align="bottom_right"),
    "mask with a key nobody sees": dict(
        mask=[[True, False, True, False], [True, True, False, False], [False, True, True, False]]
    ),  # fmt: skip
    "softcap": dict(softcap=2, causal=True),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_form_gradients_and_dscores_agree_with_finite_differences(case):
    data = copy.deepcopy(KERNEL)
    data.update(copy.deepcopy(KERNEL_CASES[case]))
    data["bias"] = [[[0] * 4 for _ in range(3)] for _ in range(3)]
    data["dout"] = [[[Fraction(1 + i - h, 2), (-1) ** i * 2] for i in range(3)] for h in range(3)]
    fd = _kernel_fd(data)
    names = sorted({step for step, _, _ in fd})
    truth = symattn.evaluate(data, digits=DIGITS, steps=names + [f"dscores{i}" for i in (1, 2, 3)])
    assert _assert_agree(truth, fd, case) == len(fd)
    for i in (1, 2, 3):  # dscores{i} is ∂L/∂scores{i}: the per-head bias's gradient
        assert truth[f"dscores{i}"].values == truth[f"dbias{i}"].values


def test_dweights_is_dhead_times_v_transposed():
    data = dict(copy.deepcopy(KERNEL), causal=True, dout=[[[1, -2]] * 3, [[0, 1]] * 3, [["1/3", 1]] * 3])
    truth = symattn.evaluate(data, digits=30, steps=["dweights1", "dweights3"])
    with mpmath.workdps(60):
        for h in (1, 3):
            v = mpmath.matrix(data["v"][0])
            d = mpmath.matrix([[to_mpf(e, 60) for e in row] for row in data["dout"][h - 1]])
            expected = d * v.T
            for i, row in enumerate(truth[f"dweights{h}"].values):
                for j, text in enumerate(row):
                    assert abs(mpmath.mpf(text) - expected[i, j]) <= abs(expected[i, j]) * mpmath.mpf(10) ** -29


def test_a_key_nobody_attends_to_has_exactly_zero_gradients_and_masked_scores_too():
    data = dict(copy.deepcopy(KERNEL), **KERNEL_CASES["mask with a key nobody sees"])
    truth = symattn.evaluate(data, digits=20, grad=True)
    assert truth["dk1"].values[3] == ("0", "0") and truth["dv1"].values[3] == ("0", "0")
    assert all(truth["dk1"].exact[3]) and all(truth["dv1"].exact[3])  # decided exactly, not a small bound
    for h in (1, 2, 3):
        for i, row in enumerate(data["mask"]):
            for j, ok in enumerate(row):
                if not ok:
                    assert truth[f"dscores{h}"].values[i][j] == "0" and truth[f"dscores{h}"].exact[i][j]
    # a query row with a single allowed key: its weights are constant, so its scores' gradient is exactly 0
    causal = symattn.evaluate(base(causal=True), digits=20, steps=["dscores1", "dQ1"])
    assert causal["dscores1"].values[0] == ("0",) * 4 and causal["dQ1"].values[0] == ("0", "0")


def test_empty_rows_have_zero_or_nan_score_gradients():
    empty = [[True] * 4, [False] * 4, [True] * 4, [True] * 4]
    zero = symattn.evaluate(base(mask=empty), digits=10, steps=["dscores1"])
    assert zero["dscores1"].values[1] == ("0",) * 4
    nan = symattn.evaluate(base(mask=empty, empty_row="nan"), digits=10, steps=["dscores1", "dx"])
    assert nan["dscores1"].values[1] == ("nan",) * 4


def test_show_and_eval_grad_through_the_cli(tmp_path, capsys):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(dict(KERNEL, causal=True)))
    assert main(["show", str(path), "--grad", "--step", "dscores1", "--format", "str"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dscores1 = weights1 ∘ (dweights1 - rowsum(dweights1 ∘ weights1))")
    assert main(["eval", str(path), "--grad", "--json", "--digits", "12"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["steps"])[-3:] == ["dq3", "dk1", "dv1"] and "dscores2" in doc["steps"]
    assert doc["steps"]["dscores1"]["values"][0] == ["0", "0", "0", "0"]
    assert main(["eval", str(path), "--step", "dk1", "--digits", "5"]) == 0  # a backward step without --grad
    assert "dk1" in capsys.readouterr().out
    assert main(["eval", str(path), "--step", "dk7"]) == 2
    assert "received 'dk7'" in capsys.readouterr().err


# The generated backward.


@pytest.mark.parametrize("case", ["causal", "gqa", "softcap", "bias and projection biases", "bottom_right"])
@pytest.mark.parametrize("strategy", ["vectorized", "unrolled"])
def test_generated_backward_matches_the_truth(case, strategy):
    data = CASES[case][0]
    spec = symattn.load_spec(data)
    module = generated_module(generate(spec, strategy=strategy, grad=True))
    args = [np.array(spec.x.float64())] + ([np.array(spec.x_kv.float64())] if spec.x_kv is not None else [])
    grads = module.backward(*args, np.ones((spec.L, spec.d_out)))
    full = convention.arguments(spec, "float64").rounded  # a bias some heads lack is zero for the others
    truth = symattn.evaluate(full, digits=20, grad=True)
    targets = convention.targets(symattn.graph.graph.build(full), backward=True)
    assert set(grads) == {t.name for t in targets}  # every input gradient, the folded weights' included
    for t in targets:
        exact = np.array([[[float(v) for v in row] for row in truth[step].values] for step in t.steps])
        atol = 1e-13 * max(np.abs(exact).max(), 1)  # an exact zero computed in floats is a few ulps of the terms
        np.testing.assert_allclose(grads[t.name], exact.reshape(t.shape), rtol=1e-12, atol=atol)


def test_generated_backward_with_weights_as_inputs_is_verified_and_batched(tmp_path):
    data = CASES["bias and projection biases"][0]
    spec = symattn.load_spec(data)
    (r,) = symattn.verify(spec, symattn.cli.default_impls(spec, backward=True), backward=True)
    assert r.passed and r.backward, r.lines()
    module = generated_module(generate(spec, weights="inputs", grad=True))
    args = convention.arguments(spec, "float32", backward=True)
    takes = convention.accepted(module.backward, args.options)
    options = {k: v for k, v in args.options.items() if k in takes}
    one = module.backward(*args.positional, **options)
    assert all(g.dtype == np.float32 for g in one.values())  # dtype-preserving
    x, *rest, dout = args.positional
    batch = module.backward(np.stack([x, 2 * x]), *rest, np.stack([dout, dout]), **options)
    second = module.backward(2 * x, *rest, dout, **options)
    np.testing.assert_allclose(batch["dx"][0], one["dx"], rtol=1e-6)
    np.testing.assert_allclose(batch["dx"][1], second["dx"], rtol=1e-6)
    np.testing.assert_allclose(batch["dwq"], one["dwq"] + second["dwq"], rtol=1e-5, atol=1e-6)  # summed


def test_generated_intermediates_include_the_backward_steps():
    module = generated_module(generate("causal", grad=True))
    spec = symattn.load_spec("causal")
    steps = module.intermediates(np.array(spec.x.float64()), np.ones((spec.L, spec.d_out)))
    truth = symattn.evaluate("causal", digits=20, grad=True)
    for name in ("dscores1", "dK1", "dwo"):
        exact = np.array([[float(v) for v in row] for row in truth[name].values])
        np.testing.assert_allclose(steps[name], exact, rtol=1e-13, atol=1e-15)


def test_generate_grad_through_the_cli(tmp_path):
    path = tmp_path / "m.py"
    assert main(["generate", "gqa", "--grad", "-o", str(path)]) == 0
    assert "def backward(x, dout):" in path.read_text()
    assert main(["generate", "gqa", "--grad", "-o", str(path), "--check"]) == 0
    assert main(["generate", "gqa", "-o", str(path), "--check"]) == 1  # without --grad it differs


# The verifier on backward kernels.


def _kernel_spec(**options) -> dict:
    data = copy.deepcopy(KERNEL)
    data.update(options)
    return data


BUG_SPECS = {
    "kernel causal": _kernel_spec(causal=True, align="bottom_right"),
    "kernel mask, softcap": _kernel_spec(mask=KERNEL_CASES["mask with a key nobody sees"]["mask"], softcap="3/2"),
    "kernel bias": _kernel_spec(bias=[[0, 1, 0, "-1/2"]] * 3, dout=[[[1, -1]] * 3, [[2, 0]] * 3, [[0, 1]] * 3]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(BUG_SPECS))
def test_right_backward_kernels_pass_and_each_classic_bug_fails(case, dtype):
    rights = [impls.flash_backward, impls.flash_backward_tuple]
    results = symattn.verify(BUG_SPECS[case], rights + impls.BACKWARD_BUGS, dtype=dtype, backward=True)
    for r in results[:2]:
        assert r.passed, r.lines()
    for r in results[2:]:  # the kernels are GQA (3 query heads on one kv head): every bug shows
        assert r.verdict == "FAIL", (case, r.name, r.lines())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["gqa", "causal", "softcap", "bias and projection biases"])
def test_projection_backward_right_passes_and_bugs_fail(case, dtype):
    data = CASES[case][0]
    results = symattn.verify(data, [impls.projection_backward] + impls.PROJECTION_BACKWARD_BUGS, dtype=dtype,
                             backward=True)  # fmt: skip
    assert results[0].passed, results[0].lines()
    for r in results[1:]:
        if r.name.endswith("GQA_gradients_not_summed") and case != "gqa":
            continue  # one query head per kv head: nothing to sum
        assert r.verdict == "FAIL", (case, r.name, r.lines())


def test_right_backward_passes_in_half_types():
    for dtype in ("float16", "bfloat16"):
        (r,) = symattn.verify(BUG_SPECS["kernel causal"], [impls.flash_backward], dtype=dtype, backward=True)
        assert r.passed, r.lines()


def test_the_differential_rule_is_flash_attentions_three_times():
    (r,) = symattn.verify(BUG_SPECS["kernel bias"], [impls.flash_backward], rule="both", backward=True)
    assert r.passed and r.differential_passed
    (wrong,) = symattn.verify(BUG_SPECS["kernel bias"], [impls.BACKWARD_BUGS[0]], rule="differential", backward=True)
    assert not wrong.passed and "exceeds 3 × the reference runs'" in wrong.reasons[0]


def test_what_a_backward_returns_is_checked():
    spec = BUG_SPECS["kernel bias"]

    def missing_dk(q, k, v, dout, **options):
        grads = impls.flash_backward(q, k, v, dout, **options)
        del grads["dk"]
        return grads

    def wrong_shape(q, k, v, dout, **options):
        grads = impls.flash_backward(q, k, v, dout, **options)
        grads["dq"] = grads["dq"][0]
        return grads

    def short_tuple(q, k, v, dout, **options):
        return impls.flash_backward_tuple(q, k, v, dout, **options)[:2]

    def extra(q, k, v, dout, **options):
        return dict(impls.flash_backward(q, k, v, dout, **options), dwq=np.zeros(3))

    a, b, c, d = symattn.verify(spec, [missing_dk, wrong_shape, short_tuple, extra], backward=True)
    assert a.verdict == "FAIL" and a.reasons[0] == "did not return dk"
    assert b.verdict == "FAIL" and "expected dq of shape 3×3×2" in b.reasons[0]
    assert c.verdict == "FAIL" and "a tuple of 2" in c.reasons[0]
    assert d.passed and "ignored gradients of inputs the spec does not have: dwq" in d.notes[0]
    assert "note: ignored" in "\n".join(d.lines())


def test_verify_backward_through_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "kernels.py").write_text(
        "from tools.impls import flash_backward, BACKWARD_BUGS\nmissing_rowsum = BACKWARD_BUGS[0]\n"
    )
    spec = tmp_path / "k.json"
    spec.write_text(json.dumps(BUG_SPECS["kernel causal"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))
    code = main(["verify", str(spec), "--backward", "--impl", "kernels:flash_backward", "--impl",
                 "kernels:missing_rowsum", "--json", "--dtype", "float32"])  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["verdict"] for r in doc["results"]] == ["PASS", "FAIL"]
    assert all(r["backward"] for r in doc["results"])
    assert main(["verify", str(spec), "--backward"]) == 0  # the generated backward
    assert "PASS generated backward on k in float64" in capsys.readouterr().out
    assert main(["verify", str(spec), "--backward", "--impl", "kernels:missing_rowsum"]) == 1


def test_a_forward_function_given_to_backward_is_told_so():
    with pytest.raises(SymattnError, match=r"expected a function f\(q, k, v, dout\) -> gradients"):
        symattn.verify(KERNEL, [_three], backward=True)


def _three(q, k, v):
    return q


def test_the_pytest_helper_verifies_backward_kernels():
    spec = symattn.load_spec(BUG_SPECS["kernel causal"])
    q = np.stack([m.float64() for m in spec.q])
    k = np.stack([m.float64() for m in spec.k])
    v = np.stack([m.float64() for m in spec.v])
    options = dict(causal=True, align="bottom_right")
    assert_attention_close(impls.flash_backward, q=q, k=k, v=v, backward=True, **options)
    dout = np.arange(18.0).reshape(3, 3, 2) / 7
    assert_attention_close(impls.flash_backward, q=q, k=k, v=v, dout=dout, backward=True, **options)
    with pytest.raises(AssertionError, match="not close to the exact attention gradients"):
        assert_attention_close(impls.BACKWARD_BUGS[1], q=q, k=k, v=v, backward=True, **options)
    # a batch: each element verified
    batched = dict(q=np.stack([q, -q]), k=np.stack([k, k]), v=np.stack([v, 2 * v]))

    def batched_backward(q, k, v, dout, **options):
        grads = [impls.flash_backward(q[b], k[b], v[b], dout[b], **options) for b in range(q.shape[0])]
        return {name: np.stack([g[name] for g in grads]) for name in grads[0]}

    assert_attention_close(batched_backward, **batched, backward=True, dtype="float32", **options)
    with pytest.raises(SymattnError, match="dout"):
        assert_attention_close(impls.kernel_straightforward, q=q, k=k, v=v, dout=dout)
    assert_attention_close(impls.projection_backward, CASES["gqa"][0], backward=True)


def test_a_backward_kernel_in_another_module_is_found_by_name(tmp_path, monkeypatch):
    assert "tools.impls" in sys.modules
    results = symattn.verify(BUG_SPECS["kernel causal"], ["tools.impls:flash_backward"], backward=True)
    assert results[0].passed
