"""``"mask_mod"`` with ``"constants"`` (FlexAttention's mask_mod) through every layer, against an independent
mpmath reference written here: the mask computed by a Python loop from a hand-written lambda equivalent to the
expression, then plain attention (an empty row gives weights and output 0)."""

from __future__ import annotations

import json
from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.maskmod import evaluate
from tests import oracle
from tests.conftest import generated_module

DPS = 40
DOC = [0, 0, 1, 1, 1, 2, 2]


def mp(e):
    e = Fraction(e)
    return mpmath.mpf(e.numerator) / e.denominator


def reference(q, k, v, scale, keep):
    """Every step of the kernel form: q (H, L, E), k, v (H_kv, S, ·) mpmath lists; keep(h, i, j) -> bool."""
    with mpmath.workdps(DPS):
        H, H_kv, S = len(q), len(k), len(k[0])
        out = {}
        for h in range(H):
            g = h * H_kv // H
            scores, weights, head = [], [], []
            for i in range(len(q[h])):
                row = [
                    scale * mpmath.fsum(x * y for x, y in zip(q[h][i], k[g][j], strict=True)) if keep(h, i, j) else None
                    for j in range(S)
                ]
                w = oracle.softmax_list(row)
                scores.append(row)
                weights.append(w)
                head.append([mpmath.fsum(w[j] * v[g][j][c] for j in range(S)) for c in range(len(v[g][0]))])
            out[f"scores{h + 1}"], out[f"weights{h + 1}"], out[f"head{h + 1}"] = scores, weights, head
        return out


def _rng_kernel(seed=3, H=4, H_kv=2, L=7, S=7, E=2):
    rng = np.random.default_rng(seed)
    return {
        "name": "mask_mod_test",
        "q": rng.integers(-3, 4, (H, L, E)).tolist(),
        "k": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "v": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "scale": "1/2",
    }


KERNEL = _rng_kernel()
RATIOS = ["1/3", "2/3", "1", "-1/7", "5/2", "1/3", "0"]

# name -> (spec keys, the hand-written lambda equivalent)
VARIANTS = {
    "document causal": (
        {"mask_mod": "doc[q_idx] == doc[kv_idx] and q_idx >= kv_idx", "constants": {"doc": DOC}},
        lambda h, i, j: DOC[i] == DOC[j] and i >= j,
    ),
    "sliding window": ({"mask_mod": "abs(q_idx - kv_idx) <= 2"}, lambda h, i, j: abs(i - j) <= 2),
    "per head": (
        {"mask_mod": "(q_idx - kv_idx) % (h + 1) == 0 or h == 3"},
        lambda h, i, j: (i - j) % (h + 1) == 0 or h == 3,
    ),
    "rationals": (
        {"mask_mod": "r[kv_idx] * 3 >= 1 and r[q_idx] != r[kv_idx] or q_idx == kv_idx", "constants": {"r": RATIOS}},
        lambda h, i, j: Fraction(RATIOS[j]) * 3 >= 1 and Fraction(RATIOS[i]) != Fraction(RATIOS[j]) or i == j,
    ),
    "2-d constant with causal": (
        {"mask_mod": "allow[h][kv_idx // 2] == 1", "causal": True,
         "constants": {"allow": [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]]}},
        lambda h, i, j: [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]][h][j // 2] == 1 and j <= i,
    ),
    "guarded subscript": (  # doc[q_idx - 1] at q_idx = 0 is never reached
        {"mask_mod": "q_idx == 0 or doc[q_idx - 1] == doc[kv_idx] or min(q_idx, kv_idx) == max(kv_idx, q_idx)",
         "constants": {"doc": DOC}},
        lambda h, i, j: i == 0 or DOC[i - 1] == DOC[j] or i == j,
    ),
}  # fmt: skip


def mp_inputs(data):
    return [[[[mp(e) for e in r] for r in m] for m in data[n]] for n in "qkv"]


def data_of(variant):
    return {**KERNEL, **VARIANTS[variant][0]}


def ref_of(variant):
    q, k, v = mp_inputs(KERNEL)
    return reference(q, k, v, mp(Fraction(1, 2)), VARIANTS[variant][1])


def close(a, b, tol=1e-12):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def check_steps(truth, ref):
    for name, want in ref.items():
        got = truth[name].to_numpy()
        for i, row in enumerate(want):
            for j, x in enumerate(row):
                if x is None:
                    if name.startswith("scores"):
                        assert got[i][j] == -np.inf, (name, i, j)
                    continue
                assert close(got[i][j], x), (name, i, j, got[i][j], x)
        if name.startswith("weights"):  # a masked key has weight exactly 0
            for i, row in enumerate(ref[name.replace("weights", "scores")]):
                for j, x in enumerate(row):
                    if x is None:
                        assert truth[name].values[i][j] == "0", (name, i, j)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_forward_step_against_the_reference(variant):
    spec = symattn.load_spec(data_of(variant))
    keep = VARIANTS[variant][1]
    for h in range(4):
        want = [[keep(h, i, j) for j in range(7)] for i in range(7)]
        assert spec.allowed(h).tolist() == want
    check_steps(symattn.evaluate(spec, digits=20), ref_of(variant))


@pytest.mark.parametrize("variant", ["document causal", "per head", "rationals"])
def test_the_large_path_against_the_reference(large_everywhere, variant):
    check_steps(symattn.evaluate(symattn.load_spec(data_of(variant)), digits=15), ref_of(variant))


def test_the_mask_mod_is_anded_with_the_mask_and_window():
    mask = np.random.default_rng(1).random((7, 7)) < 0.7
    data = {**data_of("document causal"), "mask": mask.tolist(), "window": [1, None]}
    spec = symattn.load_spec(data)
    for h in range(4):
        want = [[bool(mask[i][j]) and j >= i - 1 and DOC[i] == DOC[j] and i >= j for j in range(7)] for i in range(7)]
        assert spec.allowed(h).tolist() == want


def loss(q, k, v, keep):
    out = reference(q, k, v, mp(Fraction(1, 2)), keep)
    return mpmath.fsum(x for name, m in out.items() if name.startswith("head") for r in m for x in r)


def central(f, x):
    h = mpmath.mpf(10) ** -12
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize("variant", ["document causal", "per head"])
def test_dq_dk_dv_against_finite_differences_of_the_reference(variant):
    truth = symattn.evaluate(symattn.load_spec(data_of(variant)), digits=20, grad=True)
    q, k, v = mp_inputs(KERNEL)
    keep = VARIANTS[variant][1]
    arrays = {"dq": q, "dk": k, "dv": v}
    with mpmath.workdps(DPS):
        for name, i, r, c in (("dq", 1, 1, 0), ("dq", 2, 4, 1), ("dq", 4, 6, 0), ("dk", 1, 0, 1), ("dk", 2, 5, 0),
                              ("dv", 2, 3, 1), ("dv", 1, 4, 0)):  # fmt: skip
            array = arrays[name]

            def g(x, array=array, i=i, r=r, c=c):
                saved = array[i - 1][r][c]
                array[i - 1][r][c] = x
                try:
                    return loss(q, k, v, keep)
                finally:
                    array[i - 1][r][c] = saved

            assert close(truth[f"{name}{i}"].to_numpy()[r][c], central(g, array[i - 1][r][c]), 1e-9), (name, i, r, c)


def test_the_projection_form_with_gqa_against_the_reference():
    rng = np.random.default_rng(7)
    x, wq, wk, wv, wo = (rng.integers(-2, 3, shape) for shape in ((5, 2), (4, 2, 2), (2, 2, 2), (2, 2, 2), (8, 2)))
    doc = [0, 0, 0, 1, 1]
    rule = "doc[q_idx] == doc[kv_idx] and (q_idx >= kv_idx or h % 2 == 1)"
    data = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "scale": "1/2", "mask_mod": rule, "constants": {"doc": doc}}
    truth = symattn.evaluate(symattn.load_spec(data), digits=20)
    q, k, v = ([[[mp(int(e)) for e in r] for r in m] for m in np.einsum("ld,hde->hle", x, w).tolist()]
               for w in (wq, wk, wv))  # fmt: skip
    ref = reference(q, k, v, mp(Fraction(1, 2)), lambda h, i, j: doc[i] == doc[j] and (i >= j or h % 2 == 1))
    check_steps(truth, ref)
    heads = np.hstack([np.array(ref[f"head{h}"], dtype=float) for h in range(1, 5)])
    np.testing.assert_allclose(truth["M"].to_numpy(), heads @ wo, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("weights", "strategy"), [("folded", "vectorized"), ("folded", "unrolled"), ("inputs", "vectorized")]
)
@pytest.mark.parametrize("variant", ["document causal", "per head", "rationals"])
def test_generated_forward_and_backward_match_the_truth(weights, strategy, variant):
    spec = symattn.load_spec(data_of(variant))
    truth = symattn.evaluate(spec, digits=20, grad=True)
    module = generated_module(symattn.generate(spec, weights=weights, strategy=strategy, grad=True))
    q, k, v = (np.array(KERNEL[n], dtype=float) for n in "qkv")
    out = module.forward(q, k, v)
    want = np.stack([truth[f"head{h}"].to_numpy() for h in range(1, 5)])
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
    grads = module.backward(q, k, v, np.ones_like(out))
    np.testing.assert_allclose(grads["dq"][2], truth["dq3"].to_numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dk"][0], truth["dk1"].to_numpy(), rtol=1e-12, atol=1e-13)


def test_an_inputs_module_refuses_another_mask_mod_or_constants():
    spec = symattn.load_spec(data_of("document causal"))
    module = generated_module(symattn.generate(spec, weights="inputs"))
    q, k, v = (np.array(KERNEL[n], dtype=float) for n in "qkv")
    out = module.forward(q, k, v)
    same = module.forward(q, k, v, mask_mod=spec.mask_mod, constants={"doc": np.array(DOC)})
    np.testing.assert_array_equal(out, same)
    with pytest.raises(ValueError, match="^mask_mod: this module folds"):
        module.forward(q, k, v, mask_mod="q_idx >= kv_idx")
    with pytest.raises(ValueError, match="^constants: this module folds"):
        module.forward(q, k, v, constants={"doc": np.zeros(7, dtype=int)})


# Implementations in NumPy, as a kernel author writes them with a dense mask.


def _attend(q, k, v, scale, ok):
    dtype = q.dtype
    q, k, v = (a.astype(np.float32) if dtype.name == "bfloat16" else a for a in (q, k, v))
    H = q.shape[0]
    k, v = np.repeat(k, H // k.shape[0], axis=0), np.repeat(v, H // v.shape[0], axis=0)
    s = np.where(ok, np.einsum("hle,hse->hls", q, k) * q.dtype.type(scale), -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0))
    z = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(z > 0, e / np.where(z > 0, z, 1), 0)
    return (p @ v).astype(dtype)


def right(q, k, v, *, scale, mask_mod=None, constants=None, **_):
    doc = np.asarray(constants["doc"])
    i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    return _attend(q, k, v, scale, (doc[i] == doc[j]) & (i >= j))


def ignored(q, k, v, *, scale, mask_mod=None, constants=None, **_):
    """The bug: the mask_mod ignored (plain attention over every key)."""
    return _attend(q, k, v, scale, np.ones((q.shape[1], k.shape[1]), dtype=bool))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_passes_the_right_implementation_and_fails_an_ignored_mask_mod(dtype):
    spec = symattn.load_spec(data_of("document causal"))
    assert [r.verdict for r in symattn.verify(spec, [right, ignored], dtype=dtype)] == ["PASS", "FAIL"]


def test_the_keywords_reach_a_kwargs_implementation_only_when_set():
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(kwargs)
        return right(q, k, v, **kwargs)

    spec = symattn.load_spec(data_of("document causal"))
    assert symattn.verify(spec, [spy], dtype="float64")[0].verdict == "PASS"
    assert seen["mask_mod"] == spec.mask_mod and np.asarray(seen["constants"]["doc"]).dtype.kind == "i"
    seen.clear()
    symattn.verify(
        symattn.load_spec(KERNEL), [lambda q, k, v, **kw: seen.update(kw) or _attend(q, k, v, kw["scale"], True)]
    )
    assert "mask_mod" not in seen and "constants" not in seen


def test_an_implementation_without_the_keywords_is_unsupported():
    def no_mod(q, k, v, *, scale):
        return ignored(q, k, v, scale=scale)

    (result,) = symattn.verify(symattn.load_spec(data_of("document causal")), [no_mod], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert "mask_mod" in " ".join(result.reasons)


def test_the_adapters_dense_mask_is_the_specs():
    from symattn.verifier.adapters import mask_and_ramp as _mask_and_ramp

    spec = symattn.load_spec(data_of("per head"))
    ok, _ = _mask_and_ramp(7, 7, 4, None, False, None, "top_left", None, None, None, spec.mask_mod, None)
    assert ok.tolist() == [spec.allowed(h).tolist() for h in range(4)]
    spec = symattn.load_spec(data_of("document causal"))
    consts = {"doc": np.array(DOC, dtype=np.int32)}
    ok, _ = _mask_and_ramp(7, 7, 4, None, False, None, "top_left", None, None, None, spec.mask_mod, consts)
    assert ok[0].tolist() == spec.allowed(0).tolist()
    # the keywords' constants are data of the dtype under test: the adapter evaluates their values exactly
    consts = {"r": np.array([float(Fraction(x)) for x in RATIOS], dtype=np.float32)}
    ok, _ = _mask_and_ramp(7, 7, 1, None, False, None, "top_left", None, None, None, "r[kv_idx] * 3 > 1", consts)
    assert ok[0, 0].tolist() == [True, True, True, False, True, True, False]  # float32(1/3) > 1/3


def test_torch_mha_does_not_take_a_mask_mod():
    import inspect

    from symattn.verifier import adapters

    assert "mask_mod" not in inspect.signature(adapters.torch_mha).parameters


BAD = [
    ("foo[q_idx] == 1", {}, r"unknown name 'foo'"),
    ("q_idx.real == 1", {}, r"expected no attribute access"),
    ("len(doc) == 7", {"doc": DOC}, r"a call of 'len'"),
    ("doc[q_idx + 1] == 0", {"doc": DOC}, r"subscript 7 of doc out of range \(0 to 6\) at h=0, q_idx=6, kv_idx=0"),
    ("doc[q_idx - 1] == 0", {"doc": DOC}, r"subscript -1 of doc out of range"),
    ("q_idx // (kv_idx - 2) == 0", {}, r"division by zero at h=0, q_idx=0, kv_idx=2"),
    ("q_idx % 0 == 0", {}, r"division by zero"),
    ("q_idx + kv_idx", {}, r"expected a boolean result"),
    ("doc[q_idx] == 0", {}, r"unknown name 'doc'"),
    ("__import__('os').system('true')", {}, r"expected"),
    ("__import__('os')", {}, r"a call of '__import__'"),
    ("().__class__.__bases__", {}, r"attribute"),
    ("q_idx >= kv_idx and 1", {}, r"expected booleans for and"),
    ("r[q_idx] == 0", {"r": RATIOS}, r"^mask_mod"),
    ("(" * 80 + "q_idx >= 0" + ")" * 80, {}, r"nested at most"),
    ("q_idx >= kv_idx if True else False", {}, r"IfExp"),
    ("lambda: 1", {}, r"Lambda"),
    ("q_idx >= 0.5", {}, r"expected integer literals"),
]


@pytest.mark.parametrize(("expr", "constants", "message"), BAD)
def test_bad_mask_mods_are_one_line_errors_naming_the_expression(expr, constants, message):
    data = {**KERNEL, "mask_mod": expr}
    if constants:
        data["constants"] = constants
    if expr.startswith("r[q_idx]"):  # a non-integer subscript: fine here (r's entries are values, q_idx the index)
        symattn.load_spec(data)
        data["mask_mod"] = "doc[r[q_idx] * 3] == 0"
        data["constants"] = {"r": RATIOS, "doc": DOC * 3}
        message = r"non-integer subscript of doc"
    with pytest.raises(SymattnError, match=message) as info:
        symattn.load_spec(data)
    assert "\n" not in str(info.value) and str(info.value).startswith("mask_mod ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"constants": {"doc": DOC}}, r"^constants: expected them with mask_mod"),
        ({"mask_mod": "q_idx >= kv_idx", "constants": {"h": DOC}}, r"^constants: the name 'h' is reserved"),
        ({"mask_mod": "q_idx >= kv_idx", "constants": {"doc": [[0, 1], [2]]}}, r"ragged"),
        ({"mask_mod": "q_idx >= kv_idx", "constants": {"doc": ["sqrt(2)"]}}, r"expected an exact rational"),
        ({"mask_mod": "q_idx >= kv_idx", "constants": [1, 2]}, r"^constants: expected a table"),
        ({"mask_mod": 3}, r"^mask_mod: expected a boolean expression string"),
        ({"mask_mod": "doc[q_idx] == 0", "constants": {"doc": [[0, 1], [1, 0]]}}, r"2 dimension\(s\)"),
    ],
)
def test_bad_constants_and_types(change, message):
    with pytest.raises(SymattnError, match=message):
        symattn.load_spec({**KERNEL, **change})


def test_npz_toml_dict_and_back(tmp_path):
    data = data_of("rationals")
    spec = symattn.load_spec(data)
    back = symattn.load_spec(json.loads(json.dumps(spec.to_dict())))
    assert back.to_dict() == spec.to_dict() and back.digest() == spec.digest()
    path = tmp_path / "mm.npz"
    np.savez(path, q=np.array(KERNEL["q"]), k=np.array(KERNEL["k"]), v=np.array(KERNEL["v"]), scale=np.array(0.5),
             mask_mod=np.array(data["mask_mod"]), const_r=np.array([float(Fraction(x)) for x in RATIOS]))  # fmt: skip
    npz = symattn.load_spec(path)
    assert npz.mask_mod == spec.mask_mod
    assert npz.constants["r"][0] == Fraction(1 / 3)  # a float's exact (dyadic) value, compared exactly
    assert npz.allowed(0)[1].tolist() == [False, True, True, False, True, False, False]
    doc = symattn.load_spec(data_of("document causal"))
    path2 = tmp_path / "doc.npz"
    np.savez(path2, q=np.array(KERNEL["q"]), k=np.array(KERNEL["k"]), v=np.array(KERNEL["v"]), scale=np.array(0.5),
             mask_mod=np.array(doc.mask_mod), const_doc=np.array(DOC))  # fmt: skip
    assert symattn.load_spec(path2).to_dict() == {**doc.to_dict(), "name": "doc"}
    toml = tmp_path / "doc.toml"
    toml.write_text(
        f'q = {KERNEL["q"]}\nk = {KERNEL["k"]}\nv = {KERNEL["v"]}\nscale = "1/2"\n'
        f'mask_mod = "{doc.mask_mod}"\n[constants]\ndoc = {DOC}\n'
    )
    assert symattn.load_spec(toml).to_dict() == {**doc.to_dict(), "name": "doc"}
    arrays = {n: np.array(KERNEL[n]) for n in "qkv"}
    from_arrays = symattn.load_spec(
        {**arrays, "scale": "1/2", "mask_mod": doc.mask_mod, "constants": {"doc": np.array(DOC)}}
    )
    assert from_arrays.allowed(2).tolist() == doc.allowed(2).tolist()


def test_show_prints_the_expression_in_the_definition(capsys):
    import symattn.cli

    assert symattn.cli.main(["show", "document", "--step", "weights1"]) == 0
    out = capsys.readouterr().out
    assert "mask_mod doc[q_idx] == doc[kv_idx] and q_idx >= kv_idx" in out


def test_the_builtin_example():
    spec = symattn.load_spec("document")
    assert spec.constants["doc"].tolist() == [0, 0, 1, 1, 1]
    assert spec.allowed(1).tolist() == [[DOC5[i] == DOC5[j] and i >= j for j in range(5)] for i in range(5)]
    q, k, v = mp_inputs({n: [[[int(e) for e in r] for r in m] for m in getattr(spec, n) and
                             [x.float64().astype(int).tolist() for x in getattr(spec, n)]] for n in "qkv"})  # fmt: skip
    ref = reference(q, k, v, 1 / mpmath.sqrt(2), lambda h, i, j: DOC5[i] == DOC5[j] and i >= j)
    check_steps(symattn.evaluate(spec, digits=20), ref)


DOC5 = [0, 0, 1, 1, 1]


def test_the_evaluator_is_exact_and_lazy():
    big = 2**62
    grid = evaluate("q_idx * c[0] * c[0] > c[1]", {"c": [big, big * big]}, 1, 3, 1)
    assert grid[0, :, 0].tolist() == [False, False, True]
    assert evaluate("q_idx == 0 or 7 // q_idx >= 3", {}, 1, 4, 1)[0, :, 0].tolist() == [True, True, True, False]
    assert evaluate("-7 // 2 == -4 and -7 % 2 == 1", {}, 1, 1, 1).all()
    assert evaluate("0 <= q_idx - kv_idx < 2", {}, 1, 3, 3)[0].tolist() == [
        [True, False, False], [True, True, False], [False, True, True]]  # fmt: skip
    third = evaluate("r[0] == r[1] / 1 * 1" if False else "r[0] * 3 == 1", {"r": ["1/3"]}, 1, 1, 1)
    assert third.all() and not evaluate("r[0] * 3 == 1", {"r": [1 / 3]}, 1, 1, 1).any()


def test_the_pytest_helper_takes_a_mask_mod():
    from symattn.testing import assert_attention_close

    q, k, v = (np.array(KERNEL[n], np.float32) for n in "qkv")
    options = {"mask_mod": VARIANTS["document causal"][0]["mask_mod"], "constants": {"doc": np.array(DOC)}}
    assert_attention_close(right, q=q, k=k, v=v, scale=0.5, **options)
    with pytest.raises(AssertionError):
        assert_attention_close(ignored, q=q, k=k, v=v, scale=0.5, **options)


def test_verify_backward_with_a_generatedgenerated_module():
    spec = symattn.load_spec(data_of("per head"))
    module = generated_module(
        symattn.generate(spec, weights="inputs", grad=True)
    )  # takes mask_mod and constants by name
    assert symattn.verify(spec, [module.forward], dtype="float32")[0].verdict == "PASS"
    assert symattn.verify(spec, [module.backward], dtype="float64", backward=True)[0].verdict == "PASS"
    spec = symattn.load_spec(data_of("rationals"))  # rational constants reach it in float32 and compare equal
    module = generated_module(symattn.generate(spec, weights="inputs"))
    assert symattn.verify(spec, [module.forward], dtype="float32")[0].verdict == "PASS"
