"""Packed sequences (``"segments_q"``, ``"segments_kv"``: FlashAttention's cu_seqlens, torch varlen_attn)
through every layer, against an independent mpmath reference written here the way varlen users check it: each
segment computed on its own as plain attention, the results concatenated."""

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
from tests import oracle
from tests.conftest import generated_module

DPS = 40
SEG_Q = [0, 2, 2, 3, 6, 7]  # lengths 2, 0, 1, 3, 1
SEG_KV = [0, 3, 5, 5, 7, 8]  # lengths 3, 2, 0, 2, 1: segment 2 has a query and no key, segment 1 keys only


def mp(e):
    e = Fraction(e)
    return mpmath.mpf(e.numerator) / e.denominator


def reference(q, k, v, scale, causal=False, align="top_left", window=None, slopes=None, seg_q=SEG_Q, seg_kv=SEG_KV):
    """Every step of the kernel form, segment by segment: q (H, L, E), k, v (H_kv, S, ·) mpmath nested lists.
    Scores outside a query's segment or masked are None; an empty row has weights and output 0."""
    with mpmath.workdps(DPS):
        H, H_kv = len(q), len(k)
        S = len(k[0])
        out = {}
        for h in range(H):
            g = h * H_kv // H
            scores, weights, head = [], [], []
            for a in range(len(seg_q) - 1):
                q0, q1, k0, k1 = seg_q[a], seg_q[a + 1], seg_kv[a], seg_kv[a + 1]
                d = (k1 - k0) - (q1 - q0) if align == "bottom_right" else 0
                for i in range(q1 - q0):
                    row = [None] * S
                    for j in range(k1 - k0):
                        if causal and j > i + d:
                            continue
                        if window is not None and (
                            (window[0] is not None and j < i + d - window[0])
                            or (window[1] is not None and j > i + d + window[1])
                        ):
                            continue
                        s = scale * mpmath.fsum(x * y for x, y in zip(q[h][q0 + i], k[g][k0 + j], strict=True))
                        if slopes is not None:
                            s -= slopes[h] * abs(i + d - j)
                        row[k0 + j] = s
                    w = oracle.softmax_list(row)
                    scores.append(row)
                    weights.append(w)
                    head.append([mpmath.fsum(w[j] * v[g][j][c] for j in range(S)) for c in range(len(v[g][0]))])
            out[f"scores{h + 1}"], out[f"weights{h + 1}"], out[f"head{h + 1}"] = scores, weights, head
        return out


def _rng_kernel(seed=5, H=4, H_kv=2, L=7, S=8, E=2):
    rng = np.random.default_rng(seed)
    return {
        "name": "segments_test",
        "q": rng.integers(-3, 4, (H, L, E)).tolist(),
        "k": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "v": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "scale": "1/2",
        "segments_q": SEG_Q,
        "segments_kv": SEG_KV,
    }


KERNEL = _rng_kernel()
SLOPES = ["1/2", "1/4", "1/8", "1/16"]


def mp_inputs(data):
    return [[[[mp(e) for e in r] for r in m] for m in data[n]] for n in "qkv"]


def ref_of(data):
    q, k, v = mp_inputs(data)
    slopes = None if "alibi" not in data else [mp(s) for s in data["alibi"]]
    return reference(q, k, v, mp(Fraction(data["scale"])), data.get("causal", False), data.get("align", "top_left"),
                     data.get("window"), slopes)  # fmt: skip


def close(a, b, tol=1e-12):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def check_steps(truth, ref):
    for name, want in ref.items():
        got = truth[name].to_numpy()
        for i, row in enumerate(want):
            for j, x in enumerate(row):
                if x is None:
                    continue
                assert close(got[i][j], x), (name, i, j, got[i][j], x)
        if name.startswith("weights"):  # a key outside the query's segment has weight exactly 0
            for i, row in enumerate(ref[name.replace("weights", "scores")]):
                for j, x in enumerate(row):
                    if x is None:
                        assert truth[name].values[i][j] == "0", (name, i, j)


VARIANTS = {
    "plain": {},
    "causal top_left": {"causal": True},
    "causal bottom_right": {"causal": True, "align": "bottom_right"},
    "window bottom_right": {"window": [1, 0], "align": "bottom_right"},
    "alibi causal": {"alibi": SLOPES, "causal": True, "align": "bottom_right"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_forward_step_against_the_per_segment_reference(variant):
    data = {**KERNEL, **VARIANTS[variant]}
    truth = symattn.evaluate(symattn.load_spec(data), digits=20)
    ref = ref_of(data)
    check_steps(truth, ref)
    for h in range(1, 5):  # the query of segment 2 (no keys) is an empty row: 0
        assert truth[f"head{h}"].values[2] == ("0", "0")


@pytest.mark.parametrize("variant", ["causal bottom_right", "alibi causal", "window bottom_right"])
def test_the_large_path_against_the_reference(large_everywhere, variant):
    data = {**KERNEL, **VARIANTS[variant]}
    truth = symattn.evaluate(symattn.load_spec(data), digits=15)
    check_steps(truth, ref_of(data))


def test_empty_row_uniform_averages_over_all_keys():
    spec = symattn.load_spec({**KERNEL, "empty_row": "uniform"})
    truth = symattn.evaluate(spec, digits=15)
    np.testing.assert_array_equal(truth["weights1"].to_numpy()[2].astype(float), np.full(8, 0.125))
    v = np.array(KERNEL["v"][0], dtype=float)
    np.testing.assert_allclose(truth["head1"].to_numpy()[2], v.mean(axis=0), rtol=1e-14)


def loss(data, q, k, v):
    slopes = None if "alibi" not in data else [mp(s) for s in data["alibi"]]
    out = reference(q, k, v, mp(Fraction(data["scale"])), data.get("causal", False), data.get("align", "top_left"),
                    data.get("window"), slopes)  # fmt: skip
    return mpmath.fsum(x for name, m in out.items() if name.startswith("head") for r in m for x in r)


def central(f, x):
    h = mpmath.mpf(10) ** -12
    return (f(x + h) - f(x - h)) / (2 * h)


def test_dq_dk_dv_against_finite_differences_of_the_reference():
    data = {**KERNEL, **VARIANTS["alibi causal"]}
    truth = symattn.evaluate(symattn.load_spec(data), digits=20, grad=True)
    q, k, v = mp_inputs(data)
    arrays = {"dq": q, "dk": k, "dv": v}
    with mpmath.workdps(DPS):
        for name, i, r, c in (("dq", 1, 1, 0), ("dq", 3, 5, 1), ("dq", 4, 6, 0), ("dk", 1, 0, 1), ("dk", 2, 6, 0),
                              ("dv", 2, 7, 1), ("dv", 1, 4, 0), ("dk", 1, 3, 0)):  # fmt: skip
            array = arrays[name]

            def g(x, array=array, i=i, r=r, c=c):
                saved = array[i - 1][r][c]
                array[i - 1][r][c] = x
                try:
                    return loss(data, q, k, v)
                finally:
                    array[i - 1][r][c] = saved

            assert close(truth[f"{name}{i}"].to_numpy()[r][c], central(g, array[i - 1][r][c]), 1e-9), (name, i, r, c)
    # keys of segment 1 (no query) get no gradient, exactly
    assert truth["dk1"].values[3] == ("0", "0") and truth["dv1"].values[4] == ("0", "0")


def test_the_projection_form_with_gqa_against_the_reference():
    rng = np.random.default_rng(7)
    x, wq, wk, wv, wo = (rng.integers(-2, 3, shape) for shape in ((5, 2), (4, 2, 2), (2, 2, 2), (2, 2, 2), (8, 2)))
    data = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "scale": "1/2", "causal": True,
            "segments_q": [0, 3, 3, 4, 5], "segments_kv": [0, 3, 3, 4, 5]}  # fmt: skip
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=20)
    q, k, v = ([[[mp(int(e)) for e in r] for r in m] for m in np.einsum("ld,hde->hle", x, w).tolist()]
               for w in (wq, wk, wv))  # fmt: skip
    ref = reference(q, k, v, mp(Fraction(1, 2)), True, "top_left", None, None, data["segments_q"], data["segments_kv"])
    check_steps(truth, ref)
    heads = np.hstack([np.array(ref[f"head{h}"], dtype=float) for h in range(1, 5)])
    np.testing.assert_allclose(truth["M"].to_numpy(), heads @ wo, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("weights", "strategy"), [("folded", "vectorized"), ("folded", "unrolled"), ("inputs", "vectorized")]
)
def test_generated_forward_and_backward_match_the_truth(weights, strategy):
    data = {**KERNEL, **VARIANTS["alibi causal"]}
    spec = symattn.load_spec(data)
    truth = symattn.evaluate(spec, digits=20, grad=True)
    module = generated_module(symattn.generate(spec, weights=weights, strategy=strategy, grad=True))
    q, k, v = (np.array(data[n], dtype=float) for n in "qkv")
    out = module.forward(q, k, v)
    want = np.stack([truth[f"head{h}"].to_numpy() for h in range(1, 5)])
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
    grads = module.backward(q, k, v, np.ones_like(out))
    np.testing.assert_allclose(grads["dq"][2], truth["dq3"].to_numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dk"][0], truth["dk1"].to_numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["dv"][1], truth["dv2"].to_numpy(), rtol=1e-12, atol=1e-13)
    if weights == "inputs":  # other segments by keyword reach the copied rules
        moved = module.forward(q, k, v, segments_q=[0, 7], segments_kv=[0, 8])
        spec2 = symattn.load_spec({**data, "segments_q": [0, 7], "segments_kv": [0, 8]})
        want2 = np.stack([symattn.evaluate(spec2, digits=20)[f"head{h}"].to_numpy() for h in range(1, 5)])
        np.testing.assert_allclose(moved, want2, rtol=1e-13, atol=1e-14)


# Implementations in NumPy, as a kernel author writes them: each segment on its own.


def _plain(q, k, v, scale, causal, align):
    dtype = q.dtype  # bfloat16 computes in float32 (NumPy has no bfloat16 einsum), as a kernel accumulates
    q, k, v = (a.astype(np.float32) if dtype.name == "bfloat16" else a for a in (q, k, v))
    H, L, _ = q.shape
    S = k.shape[1]
    k, v = np.repeat(k, H // k.shape[0], axis=0), np.repeat(v, H // v.shape[0], axis=0)
    s = np.einsum("hle,hse->hls", q, k) * q.dtype.type(scale)
    if causal:
        d = 0 if align == "top_left" else S - L
        s = np.where(np.arange(S)[None, :] <= np.arange(L)[:, None] + d, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0))
    z = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(z > 0, e / np.where(z > 0, z, 1), 0)
    return (p @ v).astype(dtype)


def right(q, k, v, *, scale, causal=False, align="top_left", segments_q=None, segments_kv=None, **_):
    out = np.zeros((*q.shape[:2], v.shape[-1]), q.dtype)
    for a in range(len(segments_q) - 1):
        q0, q1, k0, k1 = segments_q[a], segments_q[a + 1], segments_kv[a], segments_kv[a + 1]
        if q1 > q0 and k1 > k0:
            out[:, q0:q1] = _plain(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, causal, align)
    return out


def crossed(q, k, v, *, scale, causal=False, align="top_left", segments_q=None, segments_kv=None, **_):
    """The classic bug: attention crossed document boundaries (the offsets ignored)."""
    return _plain(q, k, v, scale, causal, align)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_passes_a_per_segment_implementation_and_fails_crossed_boundaries(dtype):
    spec = symattn.load_spec({**KERNEL, **VARIANTS["causal bottom_right"]})
    assert [r.verdict for r in symattn.verify(spec, [right, crossed], dtype=dtype)] == ["PASS", "FAIL"]


def test_an_implementation_without_segment_keywords_is_unsupported_with_the_reason():
    def no_segments(q, k, v, *, scale, causal=False, align="top_left"):
        return crossed(q, k, v, scale=scale, causal=causal, align=align)

    (result,) = symattn.verify(symattn.load_spec(KERNEL), [no_segments], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert "segments_q" in " ".join(result.reasons)


def test_the_offsets_reach_a_kwargs_implementation_as_ints():
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(kwargs)
        return right(q, k, v, **kwargs)

    assert symattn.verify(symattn.load_spec(KERNEL), [spy], dtype="float64")[0].verdict == "PASS"
    assert list(seen["segments_q"]) == SEG_Q and np.asarray(seen["segments_kv"]).dtype.kind == "i"
    seen.clear()
    symattn.verify(symattn.load_spec({k: v for k, v in KERNEL.items() if not k.startswith("seg")}), [spy])
    assert "segments_q" not in seen  # a later option reaches **kwargs only when the spec sets it


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"segments_q": [1, 2, 7]}, r"^segments_q: expected cumulative offsets \[0, \.\.\., L=7\] .*first offset 1$"),
        ({"segments_q": [0, 3, 2, 3, 7, 7]}, r"^segments_q: expected .*received 3 then 2 at index 2$"),
        ({"segments_kv": [0, 3, 5, 5, 7, 9]}, r"^segments_kv: expected cumulative offsets \[0, \.\.\., S=8\] .*9$"),
        ({"segments_kv": [0, 8]}, r"^segments_kv: expected 5 segments \(as many as segments_q\), received 1$"),
        ({"segments_kv": None}, r"^segments_kv: expected offsets \[0, \.\.\., S\] with segments_q, received none"),
        ({"segments_q": None}, r"^segments_q: expected offsets \[0, \.\.\., L\] with segments_kv, received none"),
        ({"segments_q": [0, 1.5, 7]}, r"^segments_q: expected .*received the entry 1\.5$"),
        ({"segments_q": 3}, r"^segments_q: expected .*received 3$"),
    ],
)
def test_bad_segments_are_one_line_errors_naming_the_key(change, message):
    data = {k: v for k, v in {**KERNEL, **change}.items() if v is not None}
    with pytest.raises(SymattnError, match=message) as info:
        symattn.load_spec(data)
    assert "\n" not in str(info.value)


def test_segments_from_npz_toml_dict_and_back(tmp_path):
    spec = symattn.load_spec(KERNEL)
    arrays = {n: np.array(KERNEL[n], dtype=float) for n in "qkv"}
    np.savez(tmp_path / "s.npz", **arrays, scale=np.array(0.5), segments_q=np.array(SEG_Q, np.int32),
             segments_kv=np.array(SEG_KV))  # fmt: skip
    loaded = symattn.load_spec(tmp_path / "s.npz")
    assert loaded.segments_q == tuple(SEG_Q) and loaded.segments_kv == tuple(SEG_KV)
    np.savez(tmp_path / "bad.npz", **arrays, segments_q=np.array(SEG_Q, float), segments_kv=np.array(SEG_KV))
    with pytest.raises(SymattnError, match=r"segments_q: expected .*received a float64 array of shape \(6,\)$"):
        symattn.load_spec(tmp_path / "bad.npz")
    assert symattn.load_spec(spec.to_dict()) == spec
    (tmp_path / "s.toml").write_text(
        "q = [[[1, 0], [0, 1]]]\nk = [[[1, 0], [0, 1], [1, 1]]]\nv = [[[1, 0], [0, 1], [2, 2]]]\n"
        "segments_q = [0, 1, 2]\nsegments_kv = [0, 2, 3]\n",
        encoding="utf-8",
    )
    toml = symattn.load_spec(tmp_path / "s.toml")
    assert toml.allowed(0).tolist() == [[True, True, False], [False, False, True]]


def test_show_prints_the_segments_in_the_definitions():
    graph = symattn.graph.graph.build(symattn.load_spec({**KERNEL, **VARIANTS["alibi causal"]}))
    assert graph.step("weights1").definition.startswith(
        "weights1 = softmax(scores1, segments q [0, 2, 2, 3, 6, 7] kv [0, 3, 5, 5, 7, 8], causal bottom-right)"
    )
    assert "delta_seg = [1, 2, -1, -1, 0]" in graph.step("scores1").definition


def test_the_builtin_example():
    assert "varlen" in symattn.load.builtin_names()
    spec = symattn.load_spec("varlen")
    assert spec.segments_q == (0, 2, 5)
    truth = symattn.evaluate(spec, digits=15, grad=True)
    assert truth["weights1"].values[0][3:] == ("0", "0", "0")


def test_the_adapters_dense_mask_and_ramp_are_the_specs():
    """torch_sdpa and jax_dpa take segments as part of their boolean mask (the frameworks' runs are in
    test_frameworks.py, skipped without them); the mask and the ALiBi ramp they build are the spec's."""
    from symattn.verifier.adapters import mask_and_ramp as _mask_and_ramp

    spec = symattn.load_spec({**KERNEL, **VARIANTS["alibi causal"]})
    slopes = np.array([float(Fraction(s)) for s in SLOPES])
    ok, ramp = _mask_and_ramp(7, 8, 4, None, True, None, "bottom_right", slopes, SEG_Q, SEG_KV)
    np.testing.assert_array_equal(ok, np.stack([spec.allowed(h) for h in range(4)]))
    ref = ref_of({**KERNEL, **VARIANTS["alibi causal"]})
    q, k = (np.array(KERNEL[n], dtype=float) for n in "qk")
    scores = np.einsum("hle,hse->hls", q, np.repeat(k, 2, axis=0)) / 2 + ramp
    for h in range(4):
        for i in range(7):
            for j in range(8):
                if ref[f"scores{h + 1}"][i][j] is not None:
                    assert close(scores[h, i, j], ref[f"scores{h + 1}"][i][j])


@pytest.mark.parametrize("variant", ["causal bottom_right", "alibi causal"])
def test_the_large_paths_blocks_of_rows_keep_each_segments_keys(large_everywhere, monkeypatch, variant):
    """Blocks of 2 query rows (BLOCK 16 entries over 8 keys): each block's key restriction, from the mask, keeps
    exactly its segments' keys; the empty query segment's block and the keys-only segment stay right."""
    monkeypatch.setattr(symattn.truth.large, "BLOCK", 16)
    data = {**KERNEL, **VARIANTS[variant]}
    spec = symattn.load_spec(data)
    blocks = symattn.truth.large.blocks(spec, spec.L)
    # rows 2 (no keys) and 3 (bottom_right, 3 queries on 2 keys) see nothing: their block keeps every key
    assert blocks == [([0, 1], [0, 1, 2]), ([2, 3], None), ([4, 5], [5, 6]), ([6], [7])]
    truth = symattn.evaluate(spec, digits=15)
    check_steps(truth, ref_of(data))
    uniform = symattn.evaluate(symattn.load_spec({**data, "empty_row": "uniform"}), digits=15)
    np.testing.assert_array_equal(uniform["weights2"].to_numpy()[2].astype(float), np.full(8, 0.125))


def _plain_backward(q, k, v, dout, scale, causal, align):
    H, L, _ = q.shape
    S = k.shape[1]
    r = H // k.shape[0]
    kr, vr = np.repeat(k, r, axis=0), np.repeat(v, r, axis=0)
    s = np.einsum("hle,hse->hls", q, kr) * scale
    if causal:
        d = 0 if align == "top_left" else S - L
        s = np.where(np.arange(S)[None, :] <= np.arange(L)[:, None] + d, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0))
    z = e.sum(axis=-1, keepdims=True)
    p = np.where(z > 0, e / np.where(z > 0, z, 1), 0)
    dp = dout @ np.swapaxes(vr, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = ds @ kr * scale
    dk = (np.swapaxes(ds, -1, -2) @ q * scale).reshape(k.shape[0], r, S, -1).sum(axis=1)
    dv = (np.swapaxes(p, -1, -2) @ dout).reshape(v.shape[0], r, S, -1).sum(axis=1)
    return dq, dk, dv


def right_backward(q, k, v, dout, *, scale, causal=False, align="top_left", segments_q=None, segments_kv=None, **_):
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for a in range(len(segments_q) - 1):
        q0, q1, k0, k1 = segments_q[a], segments_q[a + 1], segments_kv[a], segments_kv[a + 1]
        if q1 > q0 and k1 > k0:
            g = _plain_backward(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], dout[:, q0:q1], scale, causal, align)
            dq[:, q0:q1], dk[:, k0:k1], dv[:, k0:k1] = g
    return {"dq": dq, "dk": dk, "dv": dv}


def crossed_backward(q, k, v, dout, *, scale, causal=False, align="top_left", **_):
    dq, dk, dv = _plain_backward(q, k, v, dout, scale, causal, align)
    return {"dq": dq, "dk": dk, "dv": dv}


def test_verify_backward_passes_per_segment_gradients_and_fails_crossed_boundaries():
    spec = symattn.load_spec({**KERNEL, **VARIANTS["causal bottom_right"]})
    results = symattn.verify(spec, [right_backward, crossed_backward], dtype="float64", backward=True)
    assert [r.verdict for r in results] == ["PASS", "FAIL"]


def test_the_pytest_helper_takes_segments():
    from symattn.testing import assert_attention_close

    q, k, v = (np.array(KERNEL[n], np.float32) for n in "qkv")
    options = {"segments_q": SEG_Q, "segments_kv": SEG_KV, "causal": True, "scale": 0.5}
    assert_attention_close(right, q=q, k=k, v=v, **options)
    with pytest.raises(AssertionError):
        assert_attention_close(crossed, q=q, k=k, v=v, **options)
