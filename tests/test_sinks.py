"""Attention sinks (``"sinks"``, gpt-oss / TransformerEngine) through every layer, against an independent
mpmath reference written here the way gpt-oss computes them: a column of the sink's logit appended to each
row of scores, a softmax, the column dropped."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
import symattn.graph.graph
import symattn.load
import symattn.truth.large
from symattn import SymattnError
from tests.conftest import generated_module

DPS = 40


def mp(e):
    e = Fraction(e) if not isinstance(e, float) else Fraction(e)
    return mpmath.mpf(e.numerator) / e.denominator


def reference(q, k, v, sinks, scale, allowed):
    """Every step of the kernel form with sinks: q (H, L, E), k, v (H_kv, S, ·), sinks (H,), allowed (H, L, S)
    bools; mpmath values as nested lists, by step name."""
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
                row = [scores[i][j] if allowed[h][i][j] else -mpmath.inf for j in range(S)] + [sinks[h]]
                top = max(row)
                e = [mpmath.exp(x - top) if x != -mpmath.inf else mpmath.mpf(0) for x in row]
                z = mpmath.fsum(e)
                weights.append([x / z for x in e][:-1])  # the sink's column dropped
            head = [[mpmath.fsum(weights[i][j] * v[g][j][c] for j in range(S)) for c in range(len(v[g][0]))]
                    for i in range(L)]  # fmt: skip
            out[f"scores{h + 1}"] = [
                [x if allowed[h][i][j] else None for j, x in enumerate(r)] for i, r in enumerate(scores)
            ]
            out[f"weights{h + 1}"], out[f"head{h + 1}"] = weights, head
        return out


def kernel_inputs(spec):
    """The mpmath inputs of a kernel-form spec dict."""
    q = [[[mp(e) for e in r] for r in m] for m in spec["q"]]
    k = [[[mp(e) for e in r] for r in m] for m in spec["k"]]
    v = [[[mp(e) for e in r] for r in m] for m in spec["v"]]
    return q, k, v, [mp(e) for e in spec["sinks"]]


def allowed_of(s):
    return [s.allowed(h).tolist() for h in range(s.h)]


def loss(q, k, v, sinks, scale, allowed):
    """Σ of every head's output (the cotangent symattn uses when dout is absent)."""
    heads = reference(q, k, v, sinks, scale, allowed)
    return mpmath.fsum(x for name, m in heads.items() if name.startswith("head") for r in m for x in r)


KERNEL = {
    "name": "sinks_test",
    "q": [[[1, 2], [0, 1], ["1/2", -1]], [[0, 1], [2, 1], [1, 1]], [[1, 0], [0, 0], [-1, 2]], [[2, 2], [1, 0], [0, 3]]],
    "k": [[[1, 0], [0, 1], [1, 1], [-1, 2]], [[0, 1], [1, 1], [2, 0], [1, -1]]],
    "v": [[[1, 2], [3, 4], [5, 6], [0, 1]], [[-1, 0], [2, 1], [0, 3], [1, 1]]],
    "sinks": ["1/2", -1, 3, 0],
    "scale": "1/2",
    "causal": True,
    "align": "bottom_right",
    "mask": [[False, False, False, False], [True, True, False, True], [True, True, True, True]],
}


def close(a, b, tol=1e-12):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def check_steps(truth, ref, names):
    for name in names:
        got, want = truth[name].to_numpy(), ref[name]
        for i, row in enumerate(want):
            for j, x in enumerate(row):
                if x is None:
                    continue
                assert close(got[i][j], x), (name, i, j, got[i][j], x)


def test_every_forward_step_of_the_kernel_form_with_causal_a_fully_masked_row_and_gqa():
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=20)
    ref = reference(*kernel_inputs(KERNEL), mp(Fraction(spec.effective_scale)), allowed_of(spec))
    check_steps(truth, ref, [n for n in truth.names if n[0] in "swh"])
    # the fully masked row: weights and output exactly 0, not the empty-row fill
    for h in range(1, 5):
        assert truth[f"weights{h}"].values[0] == ("0", "0", "0", "0")
        assert truth[f"head{h}"].values[0] == ("0", "0")


def central(f, x):
    """d f / d x by a central difference (mpmath at DPS digits: truncation ~h², far below the checks)."""
    h = mpmath.mpf(10) ** -12
    return (f(x + h) - f(x - h)) / (2 * h)


def test_dsinks_and_dq_dk_dv_against_finite_differences_of_the_reference():
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    q, k, v, sinks = kernel_inputs(KERNEL)
    scale, allowed = mp(Fraction(spec.effective_scale)), allowed_of(spec)
    with mpmath.workdps(DPS):
        for h in range(4):

            def f(x, h=h):
                return loss(q, k, v, sinks[:h] + [x] + sinks[h + 1 :], scale, allowed)

            assert close(truth["dsinks"].to_numpy()[0][h], central(f, sinks[h]), 1e-9)
        assert float(truth["dsinks"].to_numpy()[0][0]) != 0
        for name, array, i, r, c in (("dq", q, 1, 1, 0), ("dq", q, 3, 2, 1), ("dk", k, 1, 0, 1), ("dv", v, 2, 3, 0)):

            def g(x, array=array, i=i, r=r, c=c):
                saved = array[i - 1][r][c]
                array[i - 1][r][c] = x
                try:
                    return loss(q, k, v, sinks, scale, allowed)
                finally:
                    array[i - 1][r][c] = saved

            assert close(truth[f"{name}{i}"].to_numpy()[r][c], central(g, array[i - 1][r][c]), 1e-9), (name, i, r, c)


def test_the_large_path_against_the_reference(monkeypatch):
    monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=15)
    ref = reference(*kernel_inputs(KERNEL), mp(Fraction(spec.effective_scale)), allowed_of(spec))
    check_steps(truth, ref, [n for n in truth.names if n[0] in "swh"])
    assert truth["weights1"].values[0] == ("0", "0", "0", "0")
    assert truth["head2"].values[0] == ("0", "0")


@pytest.mark.parametrize("empty_row", ["uniform", "nan"])
def test_empty_row_does_not_apply_to_a_fully_masked_row_with_a_sink(monkeypatch, empty_row):
    spec = symattn.load_spec({**KERNEL, "empty_row": empty_row})
    for large in (False, True):
        if large:
            monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
        truth = symattn.evaluate(spec, digits=15, grad=not large)
        assert truth["weights3"].values[0] == ("0", "0", "0", "0")
        assert truth["head3"].values[0] == ("0", "0")


# Implementations in NumPy, as a kernel author writes them (gpt-oss: the sink appended as a column).


def _attention(q, k, v, scale, mask, causal, align, sinks, drop_sink=False):
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    k, v = np.repeat(k, H // H_kv, axis=0), np.repeat(v, H // H_kv, axis=0)
    s = np.einsum("hle,hse->hls", q, k) * q.dtype.type(scale)
    ok = np.ones((L, S), bool) if mask is None else np.asarray(mask, bool)
    if causal:
        delta = 0 if align == "top_left" else S - L
        ok = ok & (np.arange(S)[None, :] <= np.arange(L)[:, None] + delta)
    s = np.where(ok, s, -np.inf)
    sink = np.broadcast_to(sinks.astype(q.dtype)[:, None, None], (H, L, 1))
    full = np.concatenate([s, sink], axis=-1)
    top = full.max(axis=-1, keepdims=True)
    e = np.exp(full - top)
    z = e[..., :-1].sum(axis=-1, keepdims=True) if drop_sink else e.sum(axis=-1, keepdims=True)
    p = (e / z)[..., :-1]
    return p, p @ v, k, v, ok


def _in_float32(*arrays):
    """bfloat16 as NumPy code computes it (DESIGN.md): in float32, the result rounded back."""
    return [a.astype(np.float32) if a.dtype.itemsize < 4 else a for a in arrays]


def right(q, k, v, *, scale, mask=None, causal=False, align="top_left", sinks=None, **_):
    return _attention(*_in_float32(q, k, v), scale, mask, causal, align, sinks)[1].astype(q.dtype)


def sink_dropped(q, k, v, *, scale, mask=None, causal=False, align="top_left", sinks=None, **_):
    out = _attention(*_in_float32(q, k, v), scale, mask, causal, align, sinks, drop_sink=True)[1]
    return np.nan_to_num(out).astype(q.dtype)  # the masked row: 0/0


def backward(q, k, v, dout, *, scale, mask=None, causal=False, align="top_left", sinks=None, zero_dsinks=False, **_):
    H, H_kv = q.shape[0], k.shape[0]
    p, _, kr, vr, ok = _attention(q, k, v, scale, mask, causal, align, sinks)
    dp = dout @ np.swapaxes(vr, -1, -2)
    rowdot = (dp * p).sum(axis=-1, keepdims=True)
    ds = p * (dp - rowdot)
    dsinks = -((1 - p.sum(axis=-1, keepdims=True)) * rowdot).sum(axis=(-1, -2))
    dq = ds @ kr * q.dtype.type(scale)
    dk = (np.swapaxes(ds, -1, -2) @ q * q.dtype.type(scale)).reshape(H_kv, H // H_kv, *k.shape[1:]).sum(axis=1)
    dv = (np.swapaxes(p, -1, -2) @ dout).reshape(H_kv, H // H_kv, *v.shape[1:]).sum(axis=1)
    return {"dq": dq, "dk": dk, "dv": dv, "dsinks": np.zeros_like(dsinks) if zero_dsinks else dsinks.astype(q.dtype)}


def zero_dsinks(*args, **kwargs):
    return backward(*args, zero_dsinks=True, **kwargs)


def verdicts(impls, dtype, backward=False, spec=KERNEL):
    return [r.verdict for r in symattn.verify(symattn.load_spec(spec), impls, dtype=dtype, backward=backward)]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_passes_a_right_implementation_and_fails_the_sink_dropped_from_the_denominator(dtype):
    assert verdicts([right, sink_dropped], dtype) == ["PASS", "FAIL"]


def test_verify_backward_passes_a_right_implementation_and_fails_a_zero_dsinks():
    assert verdicts([backward, zero_dsinks], "float32", backward=True) == ["PASS", "FAIL"]


def test_an_implementation_without_a_sinks_keyword_is_unsupported_with_the_reason():
    def no_sinks(q, k, v, *, scale, mask=None, causal=False, align="top_left"):
        return right(q, k, v, scale=scale, mask=mask, causal=causal, align=align, sinks=np.zeros(4))

    (result,) = symattn.verify(symattn.load_spec(KERNEL), [no_sinks], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert "sinks" in " ".join(result.reasons)


@pytest.mark.parametrize(
    ("weights", "strategy"), [("folded", "vectorized"), ("folded", "unrolled"), ("inputs", "vectorized")]
)
def test_generated_forward_and_backward_match_the_truth(weights, strategy):
    spec = symattn.load_spec(KERNEL)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    module = generated_module(symattn.generate(spec, weights=weights, strategy=strategy, grad=True))
    q, k, v = (np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]]) for n in "qkv")
    out = module.forward(q, k, v)
    want = np.stack([truth[f"head{h}"].to_numpy() for h in range(1, 5)])
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
    grads = module.backward(q, k, v, np.ones_like(out))
    np.testing.assert_allclose(grads["dsinks"], truth["dsinks"].to_numpy()[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dq"][1], truth["dq2"].to_numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dk"][0], truth["dk1"].to_numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dv"][1], truth["dv2"].to_numpy(), rtol=1e-12, atol=1e-13)
    steps = module.intermediates(q, k, v, dout=np.ones_like(out))  # (without dout: a known bug, not of sinks)
    np.testing.assert_allclose(steps["weights3"], truth["weights3"].to_numpy(), rtol=1e-13, atol=1e-14)
    # batched, in float32: each element as alone
    batch = np.stack([q, q[::-1]]).astype(np.float32)
    out32 = module.forward(batch, np.stack([k, k]).astype(np.float32), np.stack([v, v]).astype(np.float32))
    assert out32.dtype == np.float32 and out32.shape == (2, 4, 3, 2)
    np.testing.assert_allclose(out32[0], want, rtol=1e-5, atol=1e-6)
    same = np.stack([q, q]).astype(np.float32)
    grads32 = module.backward(same, np.stack([k, k]), np.stack([v, v]), np.ones((2, 4, 3, 2), np.float32))
    assert grads32["dsinks"].shape == (4,)  # the sinks are no batch's: their gradient sums over it, as a weight's
    np.testing.assert_allclose(grads32["dsinks"], 2 * truth["dsinks"].to_numpy()[0], rtol=1e-5, atol=1e-5)
    if weights == "inputs":  # other sinks by keyword
        other = np.array([0.0, 0.0, 0.0, -50.0])
        moved = module.forward(q, k, v, sinks=other)
        spec2 = symattn.load_spec({**KERNEL, "sinks": [0, 0, 0, -50]})
        want2 = np.stack([symattn.evaluate(spec2, digits=20)[f"head{h}"].to_numpy() for h in range(1, 5)])
        np.testing.assert_allclose(moved, want2, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        ([1, 2], r"^sinks: expected 4 entries \(one logit per query head\), received 2$"),
        ([[1, 2, 3, 4]], r"^sinks: expected a row vector \(a list of 4 entries\), received "),
        (np.zeros((4, 1)), r"^sinks: expected a row vector of 4 entries, received shape \(4, 1\)$"),
        ([1, 2, "x y", 4], r"^sinks\[0\]\[2\]: "),
    ],
)
def test_bad_sinks_are_one_line_errors_naming_the_key(sinks, message):
    with pytest.raises(SymattnError, match=message) as info:
        symattn.load_spec({**KERNEL, "sinks": sinks})
    assert "\n" not in str(info.value)


def test_sinks_from_npz_json_toml_and_back(tmp_path):
    spec = symattn.load_spec(KERNEL)
    arrays = {n: np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]]) for n in "qkv"}
    np.savez(tmp_path / "s.npz", **arrays, sinks=np.array([0.5, -1, 3, 0]), scale=np.array(0.5), causal=np.array(True),
             align=np.array("bottom_right"), mask=np.array(KERNEL["mask"]))  # fmt: skip
    loaded = symattn.load_spec(tmp_path / "s.npz")
    assert loaded.sinks.rows == spec.sinks.rows
    with pytest.raises(SymattnError, match=r"sinks: expected 4 entries \(one logit per query head\), received 3$"):
        np.savez(tmp_path / "bad.npz", **arrays, sinks=np.array([0.5, -1, 3]))
        symattn.load_spec(tmp_path / "bad.npz")
    assert symattn.load_spec(spec.to_dict()).sinks.rows == spec.sinks.rows
    (tmp_path / "s.toml").write_text(
        'q = [[[1, 0]]]\nk = [[[1, 0], [0, 1]]]\nv = [[[1, 0], [0, 1]]]\nsinks = ["1/4"]\n', encoding="utf-8"
    )
    assert symattn.load_spec(tmp_path / "s.toml").sinks.rows == ((Fraction(1, 4),),)


def test_show_prints_the_sink_in_the_definition_and_the_dsinks_step():
    graph = symattn.graph.graph.build(symattn.load_spec(KERNEL))
    text = graph.step("weights2").definition
    assert text.startswith("weights2 = softmax(scores2 ∪ sink2, mask, causal bottom-right) by rows, sink2 = -1")
    assert graph.step("dsinks").shape == (1, 4)
    assert "dsinks = " in graph.step("dsinks").definition
    assert [(g.name, g.shape, g.position) for g in graph.input_gradients][-1] == ("dsinks", (4,), None)


def test_the_projection_form_with_sinks_and_gqa_against_the_reference():
    """M = concat(heads)·wo: the heads from the kernel reference on Q = x·wq, K = x·wk, V = x·wv."""
    rng = np.random.default_rng(3)
    x, wq, wk, wv, wo = (rng.integers(-2, 3, shape) for shape in ((3, 2), (4, 2, 2), (2, 2, 2), (2, 2, 2), (8, 2)))
    data = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "sinks": ["1/2", -1, 2, 0], "scale": "1/2",
            "mask": [[False, False, False], [True, True, False], [True, True, True]]}  # fmt: skip
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    q, k, v = (np.einsum("ld,hde->hle", x, w).tolist() for w in (wq, wk, wv))
    mpq, mpk, mpv = ([[[mp(e) for e in r] for r in m] for m in a] for a in (q, k, v))
    ref = reference(mpq, mpk, mpv, [mp(Fraction(e)) for e in data["sinks"]], mp(Fraction(1, 2)), allowed_of(spec))
    check_steps(truth, ref, [n for n in truth.names if n[0] in "swh"])
    heads = np.hstack([np.array(ref[f"head{h}"], dtype=float) for h in range(1, 5)])
    np.testing.assert_allclose(truth["M"].to_numpy(), heads @ wo, rtol=1e-13, atol=1e-13)
    assert truth["weights1"].values[0] == ("0", "0", "0")
    with mpmath.workdps(DPS):

        def f(s3):
            sinks = [mp(Fraction(1, 2)), mp(-1), s3, mp(0)]
            out = reference(mpq, mpk, mpv, sinks, mp(Fraction(1, 2)), allowed_of(spec))
            heads = [[x for h in range(1, 5) for x in out[f"head{h}"][i]] for i in range(3)]
            return mpmath.fsum(heads[i][c] * int(wo[c][j]) for i in range(3) for c in range(8) for j in range(2))

        assert close(truth["dsinks"].to_numpy()[0][2], central(f, mp(2)), 1e-9)


def test_the_builtin_example():
    assert "sinks" in symattn.load.builtin_names()
    spec = symattn.load_spec("sinks")
    assert spec.sinks is not None
    truth = symattn.evaluate(spec, digits=15, grad=True)
    assert truth["dsinks"].shape == (1, spec.h)


def test_the_pytest_helper_takes_sinks():
    from symattn.testing import assert_attention_close

    q, k, v = (np.array([[[float(Fraction(e)) for e in r] for r in m] for m in KERNEL[n]], np.float32) for n in "qkv")
    sinks = np.array([0.5, -1, 3, 0], np.float32)
    assert_attention_close(right, q=q, k=k, v=v, sinks=sinks, causal=True, scale=0.5)
    with pytest.raises(AssertionError):
        assert_attention_close(sink_dropped, q=q, k=k, v=v, sinks=sinks, causal=True, scale=0.5)


@pytest.mark.parametrize("large", [False, True])
def test_large_sinks_and_a_constant_column_of_v(monkeypatch, large):
    """Sinks far beyond the scores (no exp overflows: the sink joins the shift), and a constant column of V,
    whose output is that constant times 1 − P_sink (not the constant: the weights do not sum to 1)."""
    if large:
        monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
    data = {**KERNEL, "sinks": ["1e4", "-1e4", 0, 50], "v": [[[7, 2], [7, 4], [7, 6], [7, 1]], KERNEL["v"][1]]}
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=15)
    ref = reference(*kernel_inputs(data), mp(Fraction(1, 2)), allowed_of(spec))
    check_steps(truth, ref, [n for n in truth.names if n[0] in "swh"])
    assert truth["head2"].values[2][0] == "7.00000000000000"  # 7·(1 − e^-10000·…): not exactly 7
    assert symattn.verify(spec, [right], dtype="float32")[0].verdict == "PASS"
