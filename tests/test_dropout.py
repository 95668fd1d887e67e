"""Dropout with the kernel's own keep-mask (``"dropout_p"``, ``"dropout_mask"``) through every layer, against an
independent mpmath reference written here as torch and FlashAttention compute it: the softmax, then each weight
times keep/(1 − p)."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
import symattn.graph.graph
import symattn.load
from symattn import SymattnError
from tests.conftest import generated_module

DPS = 40


def mp(e):
    e = Fraction(int(e)) if isinstance(e, np.integer) else Fraction(e)
    return mpmath.mpf(e.numerator) / e.denominator


def reference(q, k, v, scale, allowed, keep, p):
    """Every step of the kernel form with dropout: q (H, L, E), k, v (H_kv, S, ·), allowed and keep (H, L, S)
    bools, p an mpf; mpmath values as nested lists, by step name (an empty row's weights are 0)."""
    with mpmath.workdps(DPS):
        H, H_kv = len(q), len(k)
        out = {}
        for h in range(H):
            g = h * H_kv // H
            L, S = len(q[h]), len(k[g])
            scores = [
                [scale * mpmath.fsum(a * b for a, b in zip(q[h][i], k[g][j], strict=True)) for j in range(S)]
                for i in range(L)
            ]
            weights = []
            for i in range(L):
                row = [scores[i][j] for j in range(S) if allowed[h][i][j]]
                z = mpmath.fsum(mpmath.exp(x) for x in row)
                weights.append([mpmath.exp(scores[i][j]) / z if allowed[h][i][j] else mpmath.mpf(0) for j in range(S)])
            dropped = [[w / (1 - p) if keep[h][i][j] else mpmath.mpf(0) for j, w in enumerate(r)]
                       for i, r in enumerate(weights)]  # fmt: skip
            head = [[mpmath.fsum(dropped[i][j] * v[g][j][c] for j in range(S)) for c in range(len(v[g][0]))]
                    for i in range(L)]  # fmt: skip
            out[f"scores{h + 1}"] = [
                [x if allowed[h][i][j] else None for j, x in enumerate(r)] for i, r in enumerate(scores)
            ]
            out[f"weights{h + 1}"], out[f"dropped{h + 1}"], out[f"head{h + 1}"] = weights, dropped, head
        return out


KEEP = [[True, False, True, True], [False, True, True, False], [False, False, False, False]]  # row 3: all dropped
KERNEL = {
    "name": "dropout_test",
    "q": [[[1, 2], [0, 1], ["1/2", -1]], [[0, 1], [2, 1], [1, 1]], [[1, 0], [0, 0], [-1, 2]], [[2, 2], [1, 0], [0, 3]]],
    "k": [[[1, 0], [0, 1], [1, 1], [-1, 2]], [[0, 1], [1, 1], [2, 0], [1, -1]]],
    "v": [[[1, 2], [3, 4], [5, 6], [0, 1]], [[-1, 0], [2, 1], [0, 3], [1, 1]]],
    "scale": "1/2",
    "causal": True,
    "align": "bottom_right",
    "dropout_p": "1/10",
    "dropout_mask": KEEP,
}


def kernel_inputs(data):
    return tuple([[[mp(e) for e in r] for r in m] for m in data[n]] for n in "qkv")


def args_of(spec):
    allowed = [spec.allowed(h).tolist() for h in range(spec.h)]
    keep = [spec.dropout_keep(h).tolist() for h in range(spec.h)]
    return mp(Fraction(spec.effective_scale)), allowed, keep, mp(spec.dropout_p)


def close(a, b, tol=1e-12):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def check_steps(truth, ref, names):
    assert names
    for name in names:
        got, want = truth[name].to_numpy(), ref[name]
        for i, row in enumerate(want):
            for j, x in enumerate(row):
                if x is None:
                    continue
                assert close(got[i][j], x), (name, i, j, got[i][j], x)


def forward_names(truth):
    return [n for n in truth.names if n.startswith(("scores", "weights", "dropped", "head"))]


@pytest.mark.parametrize("data", [KERNEL, {**KERNEL, "dropout_p": 0}, {**KERNEL, "dropout_p": "3/4"}])
def test_every_forward_step_of_the_kernel_form_with_causal_gqa_and_an_all_dropped_row(data):
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=20)
    check_steps(truth, reference(*kernel_inputs(data), *args_of(spec)), forward_names(truth))
    assert "dropped1" in truth.names
    for h in range(1, 5):  # the all-dropped row: exact zeros, though its weights are not
        assert truth[f"dropped{h}"].values[2] == ("0", "0", "0", "0")
        assert truth[f"head{h}"].values[2] == ("0", "0")
    assert truth["weights1"].values[2] != ("0", "0", "0", "0")


def test_a_mask_per_head_and_p_zero_with_a_mask_still_applies():
    keeps = np.ones((4, 3, 4), dtype=bool)
    keeps[1, 0, 0] = keeps[3, 2, 1] = False
    data = {**KERNEL, "dropout_p": 0, "dropout_mask": keeps}
    spec = symattn.load_spec(data)
    assert not spec.shared_dropout
    truth = symattn.evaluate(spec, digits=20)
    check_steps(truth, reference(*kernel_inputs(data), *args_of(spec)), forward_names(truth))
    assert truth["dropped2"].values[0][0] == "0" and truth["dropped1"].values[0][0] != "0"


def test_the_large_path_against_the_reference(large_everywhere):
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=15)
    assert truth.method == "intervals"
    check_steps(truth, reference(*kernel_inputs(KERNEL), *args_of(spec)), forward_names(truth))
    assert truth["dropped1"].values[2] == ("0", "0", "0", "0")  # exact zeros, not bounds
    assert truth["head3"].values[2] == ("0", "0")


def test_the_large_path_does_not_take_a_constant_column_of_v_for_its_value(large_everywhere):
    """The weights after dropout do not sum to 1: a constant column of V is not the output (the equal-values
    shortcut is off)."""
    data = {**KERNEL, "v": [[[7, 2], [7, 4], [7, 6], [7, 1]], KERNEL["v"][1]], "dropout_p": "1/2"}
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=15)
    check_steps(truth, reference(*kernel_inputs(data), *args_of(spec)), forward_names(truth))
    assert truth["head1"].values[0][0] != "7.00000000000000"


def central(f, x):
    h = mpmath.mpf(10) ** -12
    return (f(x + h) - f(x - h)) / (2 * h)


def test_dq_dk_dv_and_ddropped_against_finite_differences_of_the_reference():
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    q, k, v = kernel_inputs(KERNEL)
    args = args_of(spec)

    def loss():
        heads = reference(q, k, v, *args)
        return mpmath.fsum(x for name, m in heads.items() if name.startswith("head") for r in m for x in r)

    with mpmath.workdps(DPS):
        cases = (("dq", q, 1, 1, 0), ("dq", q, 3, 2, 1), ("dq", q, 2, 0, 1), ("dk", k, 1, 0, 1), ("dk", k, 2, 2, 0),
                 ("dv", v, 2, 3, 0), ("dv", v, 1, 1, 1))  # fmt: skip
        for name, array, i, r, c in cases:

            def f(x, array=array, i=i, r=r, c=c):
                saved = array[i - 1][r][c]
                array[i - 1][r][c] = x
                try:
                    return loss()
                finally:
                    array[i - 1][r][c] = saved

            want = central(f, array[i - 1][r][c])
            assert close(truth[f"{name}{i}"].to_numpy()[r][c], want, 1e-9), (name, i, r, c)
    # ddropped = dhead·vᵀ; dweights = ddropped∘keep/(1 − p): zero where dropped
    dweights = truth["dweights1"].to_numpy().astype(float)
    ddropped = truth["ddropped1"].to_numpy().astype(float)
    keep = np.array(KEEP)
    np.testing.assert_allclose(dweights, np.where(keep, ddropped / 0.9, 0), rtol=1e-15)
    assert truth["dq1"].values[2] == ("0", "0")  # the all-dropped row's query has no gradient


def test_the_projection_form_with_dropout_and_gqa_against_the_reference():
    rng = np.random.default_rng(5)
    x, wq, wk, wv, wo = (rng.integers(-2, 3, shape) for shape in ((3, 2), (4, 2, 2), (2, 2, 2), (2, 2, 2), (8, 2)))
    keep = [[True, True, False], [False, True, True], [True, False, True]]
    data = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "scale": "1/2", "causal": True, "dropout_p": "1/5",
            "dropout_mask": keep}  # fmt: skip
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    q, k, v = (np.einsum("ld,hde->hle", x, w).tolist() for w in (wq, wk, wv))
    mpq, mpk, mpv = ([[[mp(e) for e in r] for r in m] for m in a] for a in (q, k, v))
    ref = reference(mpq, mpk, mpv, *args_of(spec))
    check_steps(truth, ref, forward_names(truth))
    heads = np.hstack([np.array(ref[f"head{h}"], dtype=float) for h in range(1, 5)])
    np.testing.assert_allclose(truth["M"].to_numpy().astype(float), heads @ wo, rtol=1e-13, atol=1e-13)
    with mpmath.workdps(DPS):

        def loss(w):
            ks = np.einsum("ld,hde->hle", x, wk).astype(object)
            ks = [[[mp(e) for e in r] for r in m] for m in ks]
            qs = [[[mpmath.fsum(mp(x[i][d]) * (w if (h, d, e) == (2, 1, 0) else mp(wq[h][d][e])) for d in range(2))
                    for e in range(2)] for i in range(3)] for h in range(4)]  # fmt: skip
            out = reference(qs, ks, mpv, *args_of(spec))
            hs = [[x_ for h in range(1, 5) for x_ in out[f"head{h}"][i]] for i in range(3)]
            return mpmath.fsum(hs[i][c] * int(wo[c][j]) for i in range(3) for c in range(8) for j in range(2))

        want = central(loss, mp(int(wq[2][1][0])))
    assert close(truth["dwq3"].to_numpy()[1][0], want, 1e-9)


# Implementations in NumPy, as a kernel author writes them.


def _attention(q, k, v, scale, causal, align, keep, p, bug=None):
    keep = True if keep is None else keep
    p = 0.0 if p is None else p
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    k, v = np.repeat(k, H // H_kv, axis=0), np.repeat(v, H // H_kv, axis=0)
    s = np.einsum("hle,hse->hls", q, k) * q.dtype.type(scale)
    ok = np.ones((L, S), bool)
    if causal:
        delta = 0 if align == "top_left" else S - L
        ok = ok & (np.arange(S)[None, :] <= np.arange(L)[:, None] + delta)
    s = np.where(ok, s, -np.inf)
    rescale = q.dtype.type(1 / (1 - p))
    if bug == "before":  # the rescale applied to the scores, before the softmax
        s = s * rescale
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    d = w * keep
    if bug is None:
        d = d * rescale
    return w, d, k, v


def _output(q, k, v, scale, causal, align, dropout_mask, dropout_p, bug=None):
    """bfloat16 computed in float32, as a kernel accumulates."""
    dtype = q.dtype
    if dtype not in (np.float32, np.float64):
        q, k, v = (a.astype(np.float32) for a in (q, k, v))
    d = _attention(q, k, v, scale, causal, align, dropout_mask, dropout_p, bug)[1]
    return (d @ np.repeat(v, q.shape[0] // v.shape[0], axis=0)).astype(dtype)


def right(q, k, v, *, scale, causal=False, align="top_left", dropout_p=0.0, dropout_mask=None, **_):
    return _output(q, k, v, scale, causal, align, dropout_mask, dropout_p)


def no_rescale(q, k, v, *, scale, causal=False, align="top_left", dropout_p=0.0, dropout_mask=None, **_):
    return _output(q, k, v, scale, causal, align, dropout_mask, dropout_p, bug="none")


def rescale_before(q, k, v, *, scale, causal=False, align="top_left", dropout_p=0.0, dropout_mask=None, **_):
    return _output(q, k, v, scale, causal, align, dropout_mask, dropout_p, bug="before")


def backward(q, k, v, dout, *, scale, causal=False, align="top_left", dropout_p=0.0, dropout_mask=None, bug=None,
             **_):  # fmt: skip
    H, H_kv = q.shape[0], k.shape[0]
    w, d, kr, vr = _attention(q, k, v, scale, causal, align, dropout_mask, dropout_p)
    rescale = q.dtype.type(1 / (1 - dropout_p))
    dd = dout @ np.swapaxes(vr, -1, -2)
    dw = dd * dropout_mask * (rescale if bug is None else 1)
    ds = w * (dw - (dw * w).sum(axis=-1, keepdims=True))
    dq = ds @ kr * q.dtype.type(scale)
    dk = (np.swapaxes(ds, -1, -2) @ q * q.dtype.type(scale)).reshape(H_kv, H // H_kv, *k.shape[1:]).sum(axis=1)
    dv = (np.swapaxes(d, -1, -2) @ dout).reshape(H_kv, H // H_kv, *v.shape[1:]).sum(axis=1)
    return {"dq": dq.astype(q.dtype), "dk": dk.astype(q.dtype), "dv": dv.astype(q.dtype)}


def backward_no_rescale(*args, **kwargs):
    return backward(*args, bug="none", **kwargs)


def verdicts(impls, dtype, backward=False, spec=KERNEL):
    return [r.verdict for r in symattn.verify(symattn.load_spec(spec), impls, dtype=dtype, backward=backward)]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_passes_a_right_implementation_and_fails_the_classic_bugs(dtype):
    assert verdicts([right, no_rescale, rescale_before], dtype) == ["PASS", "FAIL", "FAIL"]


def test_verify_backward_passes_the_right_gradients_and_fails_a_missing_rescale():
    assert verdicts([backward, backward_no_rescale], "float32", backward=True) == ["PASS", "FAIL"]
    assert verdicts([backward, backward_no_rescale], "float64", backward=True) == ["PASS", "FAIL"]


def test_the_keywords_an_implementation_receives():
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(kwargs)
        return right(q, k, v, **kwargs)

    assert verdicts([spy], "float32") == ["PASS"]
    assert seen["dropout_p"] == 0.1 and isinstance(seen["dropout_p"], float)
    assert seen["dropout_mask"].dtype == bool and seen["dropout_mask"].tolist() == KEEP
    seen.clear()
    plain = {k: v for k, v in KERNEL.items() if not k.startswith("dropout")}
    assert symattn.verify(symattn.load_spec(plain), [spy], dtype="float32")[0].verdict == "PASS"
    assert "dropout_p" not in seen and "dropout_mask" not in seen  # **kwargs get them only where the spec sets them


def test_an_implementation_without_the_dropout_keywords_is_unsupported_with_the_reason():
    def no_dropout(q, k, v, *, scale, causal=False, align="top_left"):
        return right(q, k, v, scale=scale, causal=causal, align=align, dropout_mask=np.ones((3, 4), bool))

    (result,) = symattn.verify(symattn.load_spec(KERNEL), [no_dropout], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert "dropout_p" in " ".join(result.reasons)


def test_torch_sdpa_is_unsupported_with_dropout_before_torch_is_called():
    from symattn.verifier.adapters.pytorch import Unsupported, torch_sdpa, torch_sdpa_backward

    for fn in (torch_sdpa, torch_sdpa_backward):
        with pytest.raises(Unsupported, match="samples its own dropout mask"):
            fn(np.zeros((1, 2, 2)), scale=1.0, dropout_p=0.5, dropout_mask=np.ones((2, 2), bool))


@pytest.mark.parametrize(
    ("weights", "strategy"), [("folded", "vectorized"), ("folded", "unrolled"), ("inputs", "vectorized")]
)
def test_generated_forward_intermediates_and_backward_match_the_truth(weights, strategy):
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    module = generated_module(symattn.generate(spec, weights=weights, strategy=strategy, grad=True))
    q, k, v = (np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]]) for n in "qkv")
    out = module.forward(q, k, v)
    want = np.stack([truth[f"head{h}"].to_numpy().astype(float) for h in range(1, 5)])
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
    grads = module.backward(q, k, v, np.ones_like(out))
    for name, h in (("dq", 2), ("dk", 1), ("dv", 2)):
        np.testing.assert_allclose(grads[name][h - 1], truth[f"{name}{h}"].to_numpy().astype(float), rtol=1e-12,
                                   atol=1e-13)  # fmt: skip
    steps = module.intermediates(q, k, v, dout=np.ones_like(out))
    for name in ("weights3", "dropped3", "ddropped2", "dweights4"):
        np.testing.assert_allclose(steps[name], truth[name].to_numpy().astype(float), rtol=1e-13, atol=1e-14)
    out32 = module.forward(*(a.astype(np.float32) for a in (q, k, v)))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, want, rtol=1e-5, atol=1e-6)
    if weights == "inputs":  # another mask and p by keyword
        other = np.ones((3, 4), bool)
        other[0, 0] = False
        moved = module.forward(q, k, v, dropout_p=0.5, dropout_mask=other)
        spec2 = symattn.load_spec({**KERNEL, "dropout_p": "1/2", "dropout_mask": other})
        want2 = np.stack([symattn.evaluate(spec2, digits=20)[f"head{h}"].to_numpy().astype(float) for h in range(1, 5)])
        np.testing.assert_allclose(moved, want2, rtol=1e-13, atol=1e-14)


def test_the_steps_in_trace_order_and_show():
    graph = symattn.graph.graph.build(symattn.load_spec(KERNEL))
    names = [s.name for s in graph.steps]
    assert names[:5] == ["scores1", "weights1", "lse1", "dropped1", "head1"]
    assert graph.step("dropped2").definition == "dropped2 = weights2 ∘ keep / (1 - p), p = 1/10"
    assert graph.step("head2").definition == "head2 = dropped2·v1"
    backward = [s.name for s in graph.backward_steps]
    assert backward[:4] == ["dhead1", "ddropped1", "dweights1", "dscores1"]
    assert graph.step("dweights1").definition == "dweights1 = ddropped1 ∘ keep / (1 - p)"
    per_head = symattn.graph.graph.build(symattn.load_spec({**KERNEL, "dropout_mask": [KEEP] * 4}))
    assert per_head.step("dropped3").definition.startswith("dropped3 = weights3 ∘ keep3 / (1 - p)")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dropout_p": 1}, r"^dropout_p: expected an exact rational 0 <= p < 1, received 1$"),
        ({"dropout_p": "-1/2"}, r"^dropout_p: expected an exact rational 0 <= p < 1, received -1/2$"),
        ({"dropout_p": "sqrt(2)/2"}, r"^dropout_p: expected an exact rational 0 <= p < 1, received sqrt\(2\)/2$"),
        (
            {"dropout_mask": None},
            r"^dropout_mask: expected the kept entries \(bools, L × S or H × L × S\) with "
            r"dropout_p 1/10 > 0, received none$",
        ),  # fmt: skip
        (
            {"dropout_mask": [[True] * 4] * 2},
            r"^dropout_mask: shape mismatch: expected shape 3×4 \(L × S\), "
            r"received 2×4$",
        ),  # fmt: skip
        (
            {"dropout_mask": np.ones((2, 3, 4), bool)},
            r"^dropout_mask: shape mismatch: expected 4×3×4 \(H × L × S\), "
            r"received 2×3×4$",
        ),  # fmt: skip
        ({"dropout_mask": [[1, 0, 1, 1]] * 3}, r"^dropout_mask: expected booleans \(true = keep\), received 1$"),
        ({"dropout_p": None}, r"^dropout_mask: expected it with dropout_p \(0 <= p < 1\), received no dropout_p$"),
    ],
)
def test_bad_dropout_is_a_one_line_error_naming_the_key(change, message):
    data = {**KERNEL, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(SymattnError, match=message) as info:
        symattn.load_spec(data)
    assert "\n" not in str(info.value)


def test_p_zero_without_a_mask_keeps_every_weight():
    data = {k: v for k, v in KERNEL.items() if k != "dropout_mask"}
    truth = symattn.evaluate(symattn.load_spec({**data, "dropout_p": 0}), digits=20)
    plain = symattn.evaluate(symattn.load_spec({k: v for k, v in data.items() if k != "dropout_p"}), digits=20)
    assert truth["dropped1"].values == plain["weights1"].values
    assert truth["head2"].values == plain["head2"].values


def test_dropout_from_npz_json_toml_and_back(tmp_path):
    spec = symattn.load_spec(KERNEL)
    arrays = {n: np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]]) for n in "qkv"}
    np.savez(tmp_path / "d.npz", **arrays, scale=np.array(0.5), causal=np.array(True), align=np.array("bottom_right"),
             dropout_p=np.array(0.25), dropout_mask=np.array(KEEP))  # fmt: skip
    loaded = symattn.load_spec(tmp_path / "d.npz")
    assert loaded.dropout_p == Fraction(1, 4)
    assert [m.tolist() for m in loaded.dropout_mask] == [KEEP] * 4
    again = symattn.load_spec(spec.to_dict())
    assert again.dropout_p == Fraction(1, 10) and again.dropout_mask[0].tolist() == KEEP
    assert again.digest() == spec.digest()
    (tmp_path / "d.toml").write_text(
        'q = [[[1, 0]]]\nk = [[[1, 0], [0, 1]]]\nv = [[[1, 0], [0, 1]]]\ndropout_p = "1/3"\n'
        "dropout_mask = [[true, false]]\n",
        encoding="utf-8",
    )
    toml = symattn.load_spec(tmp_path / "d.toml")
    assert toml.dropout_p == Fraction(1, 3)
    assert symattn.evaluate(toml, digits=5)["head1"].values[0][1] == "0"


def test_the_builtin_example():
    assert "dropout" in symattn.load.builtin_names()
    spec = symattn.load_spec("dropout")
    assert spec.dropout_p == Fraction(1, 4)
    truth = symattn.evaluate(spec, digits=15, grad=True)
    assert truth["ddropped1"].shape == (3, 3)
    assert truth["dropped1"].values[0] == ("1.33333333333333", "0", "0")


def test_the_large_path_by_blocks_of_rows_and_their_keys(large_everywhere, monkeypatch):
    """One query row per block, each with only the keys it may see: the keep-mask's columns follow them."""
    import symattn.truth.large

    data = {**KERNEL, "align": "top_left", "q": [m + [[0, 0]] for m in KERNEL["q"]], "dropout_mask": KEEP + [[1] * 4]}
    data["dropout_mask"] = [[bool(b) for b in r] for r in data["dropout_mask"]]
    spec = symattn.load_spec(data)
    monkeypatch.setattr(symattn.truth.large, "BLOCK", spec.S)
    assert any(keys is not None for _, keys in symattn.truth.large.blocks(spec, spec.L))
    truth = symattn.evaluate(spec, digits=15)
    assert truth.method == "intervals"
    check_steps(truth, reference(*kernel_inputs(data), *args_of(spec)), forward_names(truth))
    assert truth["head1"].values[3] == ("2.50000000000000", "3.61111111111111")  # q = 0: V's mean, kept, /0.9


def test_the_pytest_helper_takes_dropout():
    from symattn.testing import assert_attention_close

    q, k, v = (np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]], np.float32) for n in "qkv")
    options = dict(causal=True, align="bottom_right", scale=0.5, dropout_p=0.1, dropout_mask=np.array(KEEP))
    assert_attention_close(right, q=q, k=k, v=v, **options)
    with pytest.raises(AssertionError):
        assert_attention_close(no_rescale, q=q, k=k, v=v, **options)
