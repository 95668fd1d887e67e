"""Attention sinks (``"sinks"``, gpt-oss / TransformerEngine) through every layer, against an independent
mpmath reference written here the way gpt-oss computes them: a column of the sink's logit appended to each
row of scores, a softmax, the column dropped."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
from symattn import SymattnError

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
            scores = [[scale * mpmath.fsum(a * b for a, b in zip(q[h][i], k[g][j])) for j in range(S)] for i in range(L)]
            weights = []
            for i in range(L):
                row = [scores[i][j] if allowed[h][i][j] else -mpmath.inf for j in range(S)] + [sinks[h]]
                top = max(row)
                e = [mpmath.exp(x - top) if x != -mpmath.inf else mpmath.mpf(0) for x in row]
                z = mpmath.fsum(e)
                weights.append([x / z for x in e][:-1])  # the sink's column dropped
            head = [[mpmath.fsum(weights[i][j] * v[g][j][c] for j in range(S)) for c in range(len(v[g][0]))]
                    for i in range(L)]  # fmt: skip
            out[f"scores{h + 1}"] = [[x if allowed[h][i][j] else None for j, x in enumerate(r)] for i, r in enumerate(scores)]
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


def central(f, x, h=mpmath.mpf(10) ** -12):
    """d f / d x by a central difference (mpmath at DPS digits: truncation ~h², far below the checks)."""
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


def right(q, k, v, *, scale, mask=None, causal=False, align="top_left", sinks=None, **_):
    return _attention(q, k, v, scale, mask, causal, align, sinks)[1]


def sink_dropped(q, k, v, *, scale, mask=None, causal=False, align="top_left", sinks=None, **_):
    out = _attention(q, k, v, scale, mask, causal, align, sinks, drop_sink=True)[1]
    return np.nan_to_num(out)  # the masked row: 0/0


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


def test_verify_passes_a_right_float32_implementation_and_fails_the_classic_bugs():
    assert verdicts([right, sink_dropped], "float32") == ["PASS", "FAIL"]
    assert verdicts([right, sink_dropped], "float64") == ["PASS", "FAIL"]
    assert verdicts([backward, zero_dsinks], "float32", backward=True) == ["PASS", "FAIL"]


def test_an_implementation_without_a_sinks_keyword_is_unsupported_with_the_reason():
    def no_sinks(q, k, v, *, scale, mask=None, causal=False, align="top_left"):
        return right(q, k, v, scale=scale, mask=mask, causal=causal, align=align, sinks=np.zeros(4))

    (result,) = symattn.verify(symattn.load_spec(KERNEL), [no_sinks], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert "sinks" in " ".join(result.reasons)
