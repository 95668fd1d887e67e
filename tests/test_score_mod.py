"""``"score_mod"`` (FlexAttention's score_mod) through every layer, against an independent mpmath reference:
``tests/oracle.py``'s textbook attention with the mod written by hand as a Python lambda of the same rule,
applied after scale, softcap, bias and ALiBi; gradients against finite differences of that reference."""

from __future__ import annotations

import json
from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
from symattn import SymattnError
from tests import oracle
from tests.conftest import generated_module

DPS = 60
REL = [[0, "1/2", "-1/3", 1, "0.25", -2, "3/7", 0, 1],
       ["-1/2", 0, 2, "1/9", -1, "0.75", 0, "5/3", -1],
       [1, 1, 1, "-0.5", 0, 0, "2/5", "1/3", 0],
       [0, -1, "1/8", 2, "-7/4", 1, 0, 0, "1/6"]]  # fmt: skip


def mp(e):
    e = Fraction(e)
    return mpmath.mpf(e.numerator) / e.denominator


def _kernel(seed=5, H=4, H_kv=2, L=5, S=5, E=2):
    rng = np.random.default_rng(seed)
    return {
        "q": rng.integers(-3, 4, (H, L, E)).tolist(),
        "k": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "v": rng.integers(-3, 4, (H_kv, S, E)).tolist(),
        "scale": "1/2",
    }


KERNEL = _kernel()
tanh, exp = mpmath.tanh, mpmath.exp

# name -> (score_mod, constants or None, the hand-written rule mod(s, h, q_idx, kv_idx))
MODS = {
    "softcap-like": ("30*tanh(s/30)", None, lambda s, h, i, j: 30 * tanh(s / 30)),
    "distance": ("s - 0.5*abs(q_idx - kv_idx)", None, lambda s, h, i, j: s - mp("1/2") * abs(i - j)),
    "relative bias per head": (
        "s + rel[h][q_idx - kv_idx + 4]", {"rel": REL}, lambda s, h, i, j: s + mp(REL[h][i - j + 4]),
    ),
    "where by index": ("where(q_idx >= kv_idx, s, s - 100)", None, lambda s, h, i, j: s if i >= j else s - 100),
    "where by s": ("where(s > 0, s, 2*s)", None, lambda s, h, i, j: s if s > 0 else 2 * s),
    "max": ("max(s, -1)", None, lambda s, h, i, j: max(s, mpmath.mpf(-1))),
    "exp": ("exp(s/8) + s", None, lambda s, h, i, j: exp(s / 8) + s),
    "powers and rationals": ("s**2/10 - s/3 + 1/7", None, lambda s, h, i, j: s**2 / 10 - s / 3 + mp("1/7")),
    "nested": (
        "min(tanh(s), 0.5) * (h + 1) + abs(s) / 4", None,
        lambda s, h, i, j: min(tanh(s), mp("1/2")) * (h + 1) + abs(s) / 4,
    ),
}  # fmt: skip


def spec_data(variant, **extra):
    text, constants, _ = MODS[variant]
    data = {**KERNEL, "score_mod": text, **extra}
    if constants is not None:
        data["constants"] = constants
    return data


def reference(data, variant, dps=DPS):
    return oracle.steps(data, dps, mod=MODS[variant][2])


def forward_names(H=4):
    return [f"{kind}{h}" for h in range(1, H + 1) for kind in ("scores", "weights", "head")]


@pytest.mark.parametrize("variant", list(MODS))
def test_every_forward_step_at_30_digits(variant):
    data = spec_data(variant)
    truth = symattn.evaluate(symattn.load_spec(data), digits=30)
    assert oracle.agree(truth, reference(data, variant), forward_names()) == 4 * (25 + 25 + 10)


@pytest.mark.parametrize(
    ("variant", "extra"),
    [
        ("softcap-like", {"causal": True, "softcap": 5}),
        ("distance", {"bias": np.random.default_rng(2).integers(-2, 3, (5, 5)).tolist(), "causal": True}),
        ("relative bias per head", {"alibi": True, "causal": True, "align": "bottom_right"}),
        ("where by s", {"alibi": ["1/2", "1/4", 1, "1/8"], "window": [2, 1]}),
        ("max", {"softcap": "7/2", "bias": np.random.default_rng(4).integers(-2, 3, (4, 5, 5)).tolist()}),
    ],
)
def test_combined_with_the_other_score_rules(variant, extra):
    data = spec_data(variant, **extra)
    truth = symattn.evaluate(symattn.load_spec(data), digits=30)
    assert oracle.agree(truth, reference(data, variant), forward_names()) == 4 * (25 + 25 + 10)


@pytest.mark.parametrize("variant", ["softcap-like", "relative bias per head", "where by index", "exp"])
def test_the_large_path(large_everywhere, variant):
    data = spec_data(variant, causal=True)
    truth = symattn.evaluate(symattn.load_spec(data), digits=15)
    assert truth.method == "intervals"  # these forms stay on the large path
    oracle.agree(truth, reference(data, variant), forward_names())


@pytest.mark.parametrize("variant", ["where by s", "max", "nested"])
def test_a_mod_that_compares_values_of_s_takes_the_ball_path(large_everywhere, variant, caplog):
    data = spec_data(variant, causal=True)
    with caplog.at_level("INFO", logger="symattn"):
        truth = symattn.evaluate(symattn.load_spec(data), digits=15)
    assert truth.method != "intervals"
    assert "the ball path instead of the large path" in caplog.text
    oracle.agree(truth, reference(data, variant), forward_names())


def test_a_tie_of_a_condition_on_s_is_decided_exactly():
    # q·k = 2 with scale 1/2: s = 1 exactly at [0, 0]; the condition s >= 1 holds there, s > 1 does not
    data = {"q": [[[1, 1], [3, 0]]], "k": [[[1, 1], [0, 1]]], "v": [[[1, 0], [0, 3]]], "scale": "1/2"}
    ge = symattn.evaluate(symattn.load_spec({**data, "score_mod": "where(s >= 1, 3*s, s - 1)"}), digits=40)
    gt = symattn.evaluate(symattn.load_spec({**data, "score_mod": "where(s > 1, 3*s, s - 1)"}), digits=40)
    assert Fraction(ge["scores1"].values[0][0]) == 3 and gt["scores1"].values[0][0] == "0"
    # and the derivative of the branch taken: at the tie of max(s, 1), the first argument's (1, not 0)
    tie = symattn.evaluate(symattn.load_spec({**data, "score_mod": "max(s, 1)"}), digits=30, grad=True)
    other = symattn.evaluate(symattn.load_spec({**data, "score_mod": "max(1, s)"}), digits=30, grad=True)
    # row 0: s = 1 (the tie) and s = 1/2 (max takes 1, derivative 0)
    assert tie["dscores1"].values[0][0] != "0"
    assert tie["dq1"].values[0][0] != "0" and tie["dq1"].values[0][1] != "0"
    assert other["dq1"].values[0] == ("0", "0")


def test_gqa_projection_form_against_the_reference():
    rng = np.random.default_rng(11)
    x, wq, wk, wv, wo = (rng.integers(-2, 3, s).tolist() for s in ((4, 3), (4, 3, 2), (2, 3, 2), (2, 3, 2), (8, 2)))
    data = {"x": x, "heads": [{"wq": wq[h]} for h in range(4)], "kv_heads": [{"wk": wk[g], "wv": wv[g]} for g in
            range(2)], "wo": wo, "scale": "1/2", "causal": True,
            "score_mod": "30*tanh(s/30) + where(h == 1, 1, 0)"}  # fmt: skip
    truth = symattn.evaluate(symattn.load_spec(data), digits=30)
    ref = oracle.steps(data, DPS, mod=lambda s, h, i, j: 30 * tanh(s / 30) + (1 if h == 1 else 0))
    oracle.agree(truth, ref, forward_names() + ["concat_heads", "M"])


def sink_heads(data, sinks, mod, dps=DPS):
    """Each head's output with a sink logit per head (not modded): the reference's scores, then the softmax
    with the sink as one more entry of every row (causal rows)."""
    ref = oracle.steps({k: v for k, v in data.items() if k != "sinks"}, dps, mod=mod)
    out, weights = [], []
    with mpmath.workdps(dps):
        for h in range(4):
            scores, v = ref[f"scores{h + 1}"], oracle.matrix(data["v"][h // 2], dps)
            rows, ws = [], []
            for i in range(5):
                keys = [j for j in range(5) if j <= i]
                z = exp(mp(sinks[h]) if not isinstance(sinks[h], mpmath.mpf) else sinks[h])
                z += mpmath.fsum(exp(scores[i, j]) for j in keys)
                p = [exp(scores[i, j]) / z if j in keys else mpmath.mpf(0) for j in range(5)]
                ws.append(p)
                rows.append([mpmath.fsum(p[j] * v[j, c] for j in range(5)) for c in range(2)])
            out.append(rows)
            weights.append(ws)
    return out, weights


def test_the_sink_is_not_score_modded():
    sinks = ["1/2", -1, 0, 2]
    data = spec_data("softcap-like", sinks=sinks, causal=True)
    data["score_mod"] = "2*s + 1"
    truth = symattn.evaluate(symattn.load_spec(data), digits=30)
    heads, weights = sink_heads(data, sinks, lambda s, h, i, j: 2 * s + 1)
    with mpmath.workdps(DPS):
        for h in range(4):
            for i in range(5):
                for j in range(5):
                    assert abs(mp(truth[f"weights{h + 1}"].values[i][j]) - weights[h][i][j]) < mpmath.mpf(10) ** -28
                for c in range(2):
                    assert abs(mp(truth[f"head{h + 1}"].values[i][c]) - heads[h][i][c]) < mpmath.mpf(10) ** -28


def test_dsinks_against_finite_differences():
    sinks = [0, 1, "-1/2", 2]
    data = spec_data("max", sinks=sinks, causal=True)
    mod = MODS["max"][2]
    truth = symattn.evaluate(symattn.load_spec(data), digits=25, grad=True)
    got = truth["dsinks"].to_numpy()[0]
    with mpmath.workdps(40):
        for h in range(4):

            def f(x, h=h):
                changed = [mp(s) for s in sinks]
                changed[h] = x
                heads, _ = sink_heads(data, changed, mod, 40)
                return mpmath.fsum(x for head in heads for row in head for x in row)

            want = central(f, mp(sinks[h]))
            assert abs(got[h] - float(want)) <= 1e-9 * max(1, abs(float(want))), (h, got[h], want)


def test_segments_see_global_packed_indices():
    data = spec_data("distance", segments_q=[0, 2, 5], segments_kv=[0, 2, 5], causal=True)
    truth = symattn.evaluate(symattn.load_spec(data), digits=30)
    block = [[(i < 2) == (j < 2) and (j - (0 if j < 2 else 2)) <= (i - (0 if i < 2 else 2)) for j in range(5)]
             for i in range(5)]  # fmt: skip
    ref_data = {k: v for k, v in data.items() if not k.startswith("segments") and k != "causal"}
    oracle.agree(truth, oracle.steps({**ref_data, "mask": block}, DPS, mod=MODS["distance"][2]), forward_names())


# Gradients: finite differences of the reference's loss (the sum of the outputs).


def loss(data, variant):
    out = reference(data, variant, 40)
    return mpmath.fsum(out[f"head{h}"][i, c] for h in range(1, 5) for i in range(5) for c in range(2))


def central(f, x):
    d = mpmath.mpf(10) ** -15
    return (f(x + d) - f(x - d)) / (2 * d)


@pytest.mark.parametrize("variant", ["softcap-like", "relative bias per head", "where by s", "max", "nested"])
def test_dq_dk_dv_dbias_against_finite_differences(variant):
    bias = np.random.default_rng(9).integers(-2, 3, (4, 5, 5)).tolist()
    data = spec_data(variant, causal=True, bias=bias)
    truth = symattn.evaluate(symattn.load_spec(data), digits=25, grad=True)
    with mpmath.workdps(40):
        for name, i, r, c in (("q", 1, 2, 0), ("q", 3, 4, 1), ("k", 1, 1, 1), ("k", 2, 0, 0), ("v", 2, 3, 1),
                              ("bias", 2, 3, 1), ("bias", 4, 4, 0)):  # fmt: skip

            def f(x, name=name, i=i, r=r, c=c):
                changed = json.loads(json.dumps(data))
                changed[name][i - 1][r][c] = x
                return loss(changed, variant)

            got = truth[f"dbias{i}" if name == "bias" else f"d{name}{i}"].to_numpy()[r][c]
            want = central(f, mp(data[name][i - 1][r][c]))
            assert abs(got - float(want)) <= 1e-9 * max(1, abs(float(want))), (name, i, r, c, got, want)


def test_dscores_is_the_gradient_after_the_mod_and_dbias_before_it():
    bias = np.random.default_rng(9).integers(-2, 3, (4, 5, 5)).tolist()
    data = spec_data("softcap-like", bias=bias)
    truth = symattn.evaluate(symattn.load_spec(data), digits=30, grad=True)
    scores = oracle.steps(data, DPS)  # the unmodded scores are those of the same spec without the mod
    plain = oracle.steps({k: v for k, v in data.items() if k != "score_mod"}, DPS)["scores2"]
    assert scores  # the reference ran
    with mpmath.workdps(DPS):
        for i in range(5):
            for j in range(5):
                ds, db = mp(truth["dscores2"].values[i][j]), mp(truth["dbias2"].values[i][j])
                assert abs(db - ds * (1 - tanh(plain[i, j] / 30) ** 2)) <= mpmath.mpf(10) ** -28 * max(1, abs(db))


# Generated code.


@pytest.mark.parametrize(
    ("weights", "strategy"), [("folded", "vectorized"), ("folded", "unrolled"), ("inputs", "vectorized")]
)
@pytest.mark.parametrize("variant", ["softcap-like", "relative bias per head", "where by s", "nested"])
def test_generated_code_matches_the_truth(weights, strategy, variant):
    spec = symattn.load_spec(spec_data(variant, causal=True))
    truth = symattn.evaluate(spec, digits=20, grad=True)
    source = symattn.generate(spec, weights=weights, strategy=strategy, grad=True)
    assert source == symattn.generate(spec, weights=weights, strategy=strategy, grad=True)  # deterministic
    module = generated_module(source)
    q, k, v = (np.array(KERNEL[n], dtype=float) for n in "qkv")
    out = module.forward(q, k, v)
    want = np.stack([truth[f"head{h}"].to_numpy() for h in range(1, 5)])
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
    steps = module.intermediates(q, k, v, dout=np.ones_like(out))
    np.testing.assert_allclose(steps["scores3"], truth["scores3"].to_numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(steps["dscores3"], truth["dscores3"].to_numpy(), rtol=1e-12, atol=1e-13)
    grads = module.backward(q, k, v, np.ones_like(out))
    for name, i in (("dq", 3), ("dk", 1), ("dv", 2)):
        np.testing.assert_allclose(grads[name][i - 1], truth[f"{name}{i}"].to_numpy(), rtol=1e-12, atol=1e-13)
    if weights == "inputs":
        same = module.forward(q, k, v, score_mod=spec.score_mod)
        np.testing.assert_array_equal(out, same)
        with pytest.raises(ValueError, match="^score_mod: this module folds"):
            module.forward(q, k, v, score_mod="s")


# Verify: float implementations written here, with the mod written out in NumPy.


def _rel():
    return np.array([[float(Fraction(x)) for x in row] for row in REL])


def _attention(q, k, v, scale, mod, causal_first=False):
    dtype = q.dtype
    q, k, v = (a.astype(np.float32) if dtype.name == "bfloat16" else a for a in (q, k, v))
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    k, v = np.repeat(k, H // k.shape[0], axis=0), np.repeat(v, H // v.shape[0], axis=0)
    s = np.einsum("hle,hse->hls", q, k) * q.dtype.type(scale)
    h, i, j = np.arange(H)[:, None, None], np.arange(L)[None, :, None], np.arange(S)[None, None, :]
    ok = j <= i
    if causal_first:  # the bug: masked to a finite −1e4 first, then modded (5·tanh(−1e4/5) = −5: weight left)
        s = np.where(ok, s, q.dtype.type(-1e4))
        s = mod(s, h, i, j)
    else:
        s = np.where(ok, mod(s, h, i, j), -np.inf)
    s = s.astype(q.dtype)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return (p @ v).astype(dtype)


def softcap30(s, h, i, j):
    return 30 * np.tanh(s / 30)


def softcap5(s, h, i, j):
    return 5 * np.tanh(s / 5)


def right(q, k, v, *, scale, score_mod=None, **_):
    assert score_mod == "5*tanh(s/5)"
    return _attention(q, k, v, scale, softcap5)


def right_rel(q, k, v, *, scale, score_mod=None, constants=None, **_):
    rel = np.asarray(constants["rel"], dtype=q.dtype if q.dtype.name != "bfloat16" else np.float32)
    return _attention(q, k, v, scale, lambda s, h, i, j: s + rel[h, i - j + 4])


def s_tanh_s(q, k, v, *, scale, **_):
    """The bug: the softcap as s·tanh(s) instead of c·tanh(s/c)."""
    return _attention(q, k, v, scale, lambda s, h, i, j: s * np.tanh(s))


def mask_then_mod(q, k, v, *, scale, **_):
    """The bug: the mask applied before the score_mod, as a finite −1e4 that the mod maps to about −5."""
    return _attention(q, k, v, scale, softcap5, causal_first=True)


def big_kernel():
    rng = np.random.default_rng(3)
    return {"q": (rng.standard_normal((2, 16, 8)) * 3).tolist(), "k": (rng.standard_normal((1, 16, 8)) * 3).tolist(),
            "v": rng.standard_normal((1, 16, 8)).tolist(), "causal": True}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_passes_right_implementations_and_fails_the_classic_bugs(dtype):
    spec = symattn.load_spec({**big_kernel(), "score_mod": "5*tanh(s/5)"})
    verdicts = [r.verdict for r in symattn.verify(spec, [right, s_tanh_s, mask_then_mod], dtype=dtype)]
    assert verdicts == ["PASS", "FAIL", "FAIL"]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_verify_a_relative_bias_read_from_the_keywords(dtype):
    rel = np.random.default_rng(8).integers(-4, 5, (2, 31)).tolist()
    spec = symattn.load_spec(
        {**big_kernel(), "score_mod": "s + rel[h][q_idx - kv_idx + 15]", "constants": {"rel": rel}}
    )

    def right_wide(q, k, v, *, scale, score_mod=None, constants=None, **_):
        r = np.asarray(constants["rel"]).astype(np.float32 if q.dtype.name == "bfloat16" else q.dtype)
        return _attention(q, k, v, scale, lambda s, h, i, j: s + r[h, i - j + 15])

    def ignored(q, k, v, *, scale, score_mod=None, constants=None, **_):
        return _attention(q, k, v, scale, lambda s, h, i, j: s)

    assert [r.verdict for r in symattn.verify(spec, [right_wide, ignored], dtype=dtype)] == ["PASS", "FAIL"]


def test_the_keyword_reaches_a_kwargs_implementation_only_when_set():
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(kwargs)
        return right(q, k, v, **kwargs)

    spec = symattn.load_spec({**big_kernel(), "score_mod": "5*tanh(s/5)"})
    assert symattn.verify(spec, [spy], dtype="float64")[0].verdict == "PASS"
    assert seen["score_mod"] == "5*tanh(s/5)"
    seen.clear()
    plain = symattn.load_spec(big_kernel())
    symattn.verify(plain, [lambda q, k, v, **kw: seen.update(kw) or _attention(q, k, v, kw["scale"], softcap30)])
    assert "score_mod" not in seen


def test_an_implementation_without_the_keyword_is_unsupported():
    def plain(q, k, v, *, scale, causal=False):
        return _attention(q, k, v, scale, softcap30)

    spec = symattn.load_spec({**big_kernel(), "score_mod": "30*tanh(s/30)"})
    (result,) = symattn.verify(spec, [plain], dtype="float32")
    assert result.verdict == "UNSUPPORTED"
    assert result.reasons == ["the spec sets score_mod = '30*tanh(s/30)', which plain does not accept"]


def test_the_adapters_do_not_take_a_score_mod():
    """So the convention gives them UNSUPPORTED naming score_mod (tests/test_frameworks.py runs them)."""
    import inspect

    from symattn.verifier import adapters

    for adapter in (adapters.torch_sdpa, adapters.torch_mha, adapters.jax_dpa):
        assert "score_mod" not in inspect.signature(adapter).parameters


def test_the_budget_backend_bounds_a_right_float32_run():
    from symattn.backends.budget import budgets
    from symattn.backends.floats import exact_float
    from symattn.graph.graph import build

    spec = symattn.load_spec({**big_kernel(), "score_mod": "s - 0.5*abs(q_idx - kv_idx)"})
    truth = symattn.evaluate(spec, digits=20)
    q, k, v = (np.array(big_kernel()[n], dtype=np.float32) for n in "qkv")
    out = _attention(q, k, v, exact_float(spec.effective_scale),
                     lambda s, h, i, j: s - np.float32(0.5) * np.abs(i - j).astype(np.float32))  # fmt: skip
    arrays = {"q1": q[0], "q2": q[1], "k1": k[0], "v1": v[0]}
    budget = budgets(build(spec), arrays, "float32", ["head1"])["head1"]
    error = np.abs(out[0].astype(np.float64) - truth["head1"].to_numpy())
    assert error.max() > 0 and (error <= 2 * budget).all()


# Bad input: one-line errors naming score_mod.

BAD = [
    ("s + foo", {}, r"^score_mod 's \+ foo': unknown name 'foo'"),
    ("s.real", {}, r"^score_mod 's.real': expected no attribute access"),
    ("s + len(rel)", {"rel": [1, 2]}, r"^score_mod .*a call of 'len'"),
    ("sin(s)", {}, r"^score_mod .*a call of 'sin'"),
    ("s ** 0.5", {}, r"^score_mod .*expected an integer power"),
    ("s ** q_idx", {}, r"^score_mod .*expected an integer power"),
    ("s ** 100000", {}, r"^score_mod .*expected a power from -64 to 64, received 100000"),
    (
        "s + rel[q_idx + 1]",
        {"rel": [1, 2, 3, 4, 5]},
        r"^score_mod .*subscript 5 of rel out of range \(0 to 4\) at "
        r"h=0, q_idx=4, kv_idx=0",
    ),  # fmt: skip
    ("s + rel[q_idx - 1]", {"rel": [1, 2, 3, 4, 5]}, r"^score_mod .*subscript -1 of rel out of range"),
    ("s / (q_idx - kv_idx)", {}, r"^score_mod .*division by zero at h=0, q_idx=0, kv_idx=0"),
    ("s / (s - 1)", {}, r"^score_mod .*division by an expression in s .* is not supported"),
    ("s ** -1", {}, r"^score_mod .*negative power of an expression in s"),
    ("s > 0", {}, r"^score_mod .*expected a number, received a boolean"),
    ("(" * 70 + "s" + ")" * 70, {}, r"^score_mod .*nested at most 64 deep"),
    ("-" * 80 + "s", {}, r"^score_mod .*nested at most 64 deep"),
    ("where(s, 1, 2)", {}, r"^score_mod .*expected a condition"),
    ("where(s > 0, s)", {}, r"^score_mod .*three arguments"),
    ("__import__('os').system('true')", {}, r"^score_mod .*expected"),
    ("", {}, r"^score_mod: expected a numeric expression in s such as '30\*tanh\(s/30\)', received ''"),
]


@pytest.mark.parametrize(("expr", "constants", "message"), BAD)
def test_bad_score_mods_are_one_line_errors(expr, constants, message):
    data = {**KERNEL, "score_mod": expr}
    if constants:
        data["constants"] = constants
    with pytest.raises(SymattnError, match=message) as info:
        symattn.load_spec(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [3, ["s"], {"s": 1}])
def test_a_score_mod_that_is_not_a_string(value):
    with pytest.raises(SymattnError, match=r"^score_mod: expected a numeric expression in s string, received"):
        symattn.load_spec({**KERNEL, "score_mod": value})


def test_a_guarded_subscript_is_not_an_error_and_constants_need_a_mod():
    data = {**KERNEL, "score_mod": "where(q_idx > 0, s + rel[q_idx - 1], s)", "constants": {"rel": [1, 2, 3, 4]}}
    symattn.load_spec(data)
    with pytest.raises(SymattnError, match=r"^constants: expected them with mask_mod or score_mod"):
        symattn.load_spec({**KERNEL, "constants": {"rel": [1]}})


# Every layer of loading and printing.


def test_npz_toml_and_dict_give_the_same_spec(tmp_path):
    data = spec_data("relative bias per head", causal=True)
    spec = symattn.load_spec(data)
    path = tmp_path / "relbias.npz"
    rel = np.array([[float(Fraction(x)) for x in row] for row in REL])
    arrays = {n: np.array(KERNEL[n], float) for n in "qkv"}
    np.savez(path, **arrays, scale=np.array(0.5), causal=np.array(True), score_mod=np.array(data["score_mod"]),
             const_rel=rel)  # fmt: skip
    from_npz = symattn.load_spec(path)
    assert from_npz.score_mod == spec.score_mod
    truth = symattn.evaluate(from_npz, digits=20)  # a float const_rel is the dyadic values it holds
    floats = symattn.load_spec({**data, "scale": "0.5", "constants": {"rel": rel.tolist()}})
    assert truth["head2"].values == symattn.evaluate(floats, digits=20)["head2"].values
    toml = tmp_path / "s.toml"
    toml.write_text('q = [[[1, 2]]]\nk = [[[1, 2]]]\nv = [[[1, 2]]]\nscore_mod = "30*tanh(s/30)"\n')
    assert symattn.load_spec(toml).score_mod == "30*tanh(s/30)"
    again = symattn.load_spec(spec.to_dict())
    assert again.score_mod == spec.score_mod and again.digest() == spec.digest()


def test_show_prints_the_expression():
    spec = symattn.load_spec(spec_data("relative bias per head", causal=True))
    trace = symattn.build(spec)
    assert trace.definition("scores2") == (
        "scores2 = score_mod(q2·k1ᵀ·scale), scale = 1/2, score_mod = s + rel[h][q_idx - kv_idx + 4]"
    )
    assert "score_mod" in trace.definition("weights2") or "causal" in trace.definition("weights2")


def test_the_example_relbias():
    spec = symattn.load_spec("relbias")
    assert spec.score_mod == "s + rel[h][q_idx - kv_idx + 4]" and spec.causal
    assert "relbias" in symattn.load.builtin_names()
    truth = symattn.evaluate(spec, digits=30)
    rel = spec.constants["rel"]
    ref = oracle.steps(json.loads(json.dumps(spec.to_dict(), default=str)), DPS,
                       mod=lambda s, h, i, j: s + mp(rel[h][i - j + 4]))  # fmt: skip
    oracle.agree(truth, ref, forward_names(2))


def test_the_pytest_helper_with_a_score_mod():
    from symattn.testing import assert_attention_close

    q, k, v = (np.array(big_kernel()[n]) for n in "qkv")
    assert_attention_close(right, q=q, k=k, v=v, causal=True, score_mod="5*tanh(s/5)")
    with pytest.raises(AssertionError):
        assert_attention_close(s_tanh_s, q=q, k=k, v=v, causal=True, score_mod="5*tanh(s/5)")


@pytest.mark.parametrize("backward", [False, True])
def test_verify_a_generated_inputs_module_that_takes_score_mod_and_constants(backward):
    spec = symattn.load_spec("relbias")
    module = generated_module(symattn.generate(spec, weights="inputs", grad=True))
    fn = module.backward if backward else module.forward
    (result,) = symattn.verify(spec, [fn], dtype="float32", backward=backward)
    assert result.verdict == "PASS", result.lines()


def test_show_grad_prints_the_mods_derivative():
    spec = symattn.load_spec({**KERNEL, "score_mod": "30*tanh(s/30)"})
    assert symattn.build(spec, grad=True).definition("dq1") == "dq1 = dscores1∘(-tanh((1/30·s))^2 + 1)·k1·scale"


# The xp primitives of conditions, backend by backend.


def test_floats_positive_logical_select():
    from symattn.backends.floats import FloatXP

    xp = FloatXP("float32")
    a = np.array([[-1.0, 0.0, 2.0]], dtype=np.float32)
    assert xp.positive(a, True).tolist() == [[False, False, True]]
    assert xp.positive(a, False).tolist() == [[False, True, True]]
    both = xp.logical("and", xp.positive(a, False), np.array([[True, True, False]]))
    assert xp.select(both, a, -a).tolist() == [[1.0, 0.0, -2.0]]
    assert xp.select(xp.logical("not", both), a, -a).dtype == np.float32


def test_balls_decide_a_lins_tie_exactly_and_take_the_hull_where_nothing_decides():
    from symattn.backends.balls import Balls, BallXP
    from symattn.backends.engines import ArbEngine
    from symattn.backends.rational import Lin, Scalar
    from symattn.entries import parse_entry
    from symattn.matrix import RatMat

    engine = ArbEngine(64)
    with engine.active():
        xp = BallXP(engine)
        root = Scalar(Fraction(1), ("sqrt", 2), parse_entry("sqrt(2)", "e"))
        # √2·[1, 1, 0] − [r, 2, 0]: √2 − r ≈ 1e-31 > 0 is below the 64-bit balls' reach (decided exactly),
        # √2 − 2 < 0, and the last entry is exactly 0
        r = 14142135623730950488016887242096
        lin = Lin({root.key: RatMat(np.array([[1, 1, 0]], dtype=object), 1)},
                  RatMat(np.array([[-r, -2 * 10**31, 0]], dtype=object), 10**31),
                  {root.key: root.generator})  # fmt: skip
        assert engine.contains_zero(xp.balls(lin).values[0, 0])
        assert xp.positive(lin, True).tolist() == [[2, 0, 0]]
        assert xp.positive(lin, False).tolist() == [[2, 0, 2]]
        wide = Balls(np.array([[engine.arb(0, 1)]], dtype=object))  # [−1, 1]: no ball decides its sign
        assert xp.positive(wide, True).tolist() == [[1]]
        one, two = (
            Balls(np.array([[engine.one()]], dtype=object)),
            Balls(np.array([[engine.rational(2)]], dtype=object)),
        )
        hull = xp.select(xp.positive(wide, True), one, two).values[0, 0]
        assert hull.contains(1) and hull.contains(2)
        assert xp.logical("and", xp.positive(wide, True), np.array([[False]])).tolist() == [[0]]


def test_exact_decides_and_refuses_what_it_cannot():
    from symattn.backends.exact import ExactXP, element_sign

    xp = ExactXP()
    alg = xp.alg
    assert element_sign(alg, alg.const(Fraction(-1, 3))) == -1 and element_sign(alg, {}) == 0
    symbol = xp.leaf("q", symattn.load_spec({"q": [[["a"]]], "k": [[[1]]], "v": [[[1]]]}).q[0])
    with pytest.raises(SymattnError, match="^score_mod: a condition on s that its exact form does not decide"):
        xp.positive(symbol, True)


def test_the_fold_keeps_the_large_paths_forms_cheap():
    """What the large path reads: no array for a softcap-like mod, an integer array scaled for a distance."""
    data = {**KERNEL, "causal": True}
    softcap = symattn.load_spec({**data, "score_mod": "30*tanh(s/30)"}).score_mod_split
    assert softcap.arrays == () and not softcap.decides
    distance = symattn.load_spec({**data, "score_mod": "s - 0.5*abs(q_idx - kv_idx)"}).score_mod_split
    assert [a.dtype for a in distance.arrays] == [np.int64] and distance.scalars[0] == Fraction(1, 2)
    assert symattn.load_spec({**data, "score_mod": "max(s, 0)"}).score_mod_split.decides


def test_an_entry_no_precision_settles_is_a_noted_bound_and_the_verifier_says_it_did_not_verify_it():
    """A condition on tanh(s) tied at s = 1/2: no ball decides it, so the heads are hulls of both branches; the
    truth prints bounds with a note, and the verifier counts an error there only beyond the bound, with a note
    (it once gave those entries an infinite allowance, silently)."""
    data = {"q": [[[1, 0.5], [0.25, 2]]], "k": [[[0.5, 0], [1, 1], [0, 0.25]]], "v": [[[1, 2], [3, 4], [5, 7]]],
            "scale": 1, "score_mod": "where(tanh(s) > tanh(0.5), s + 1, s)"}  # fmt: skip
    truth = symattn.evaluate(data, digits=15)
    bound = truth["head1"].values[0][0]
    assert bound.startswith("<") and any("no certified digit" in n for n in truth.notes)

    def zeros(q, k, v, *, scale, score_mod=None, **_):
        return np.zeros((1, 2, 2))

    def far(q, k, v, *, scale, score_mod=None, **_):
        return np.full((1, 2, 2), 1e3)

    r_zeros, r_far = symattn.verify(data, [zeros, far])
    assert any("not verified" in n for n in r_zeros.notes)
    assert r_far.verdict == "FAIL"  # 1000 is beyond any value below the bound: a proven error


def test_constants_are_data_the_truth_is_for_the_values_the_implementation_receives():
    """As the bias: 0.1 reaches a bfloat16 implementation as bfloat16(0.1), and the truth is certified for that
    value, so an implementation using exactly what it was given has no input-rounding error charged to it."""
    from symattn.backends.floats import dtype_of
    from symattn.verifier.reference import Context

    data = {"q": [[[1, 0.5], [0.25, 2]]], "k": [[[0.5, 0], [1, 1], [0, 0.25]]], "v": [[[1, 2], [3, 4], [5, 7]]],
            "score_mod": "s + rel[kv_idx]", "constants": {"rel": ["0.1", "-0.3", "0.7"]}}  # fmt: skip
    context = Context(symattn.load_spec(data), "bfloat16")
    given = context.args.options["constants"]["rel"]
    certified = context.args.rounded.constants["rel"]
    assert given.dtype == dtype_of("bfloat16")
    assert [Fraction(float(x)) for x in given] == [Fraction(x) for x in certified.reshape(-1).tolist()]
    assert Fraction(certified[0]) != Fraction(1, 10)


def test_a_gathered_constant_is_scaled_by_the_denominator_of_the_entries_gathered():
    """A constant of rationals is gathered as integers over a common denominator (no Python pass over the
    grid): the denominator of the entries read, so that integers read from a table holding 1/3 stay integers
    (exact in every backend), and the values are those of the table either way."""
    from symattn import scoremod

    table = [1, 2, Fraction(1, 3)]
    ints = scoremod.fold("s + c[kv_idx % 2]", {"c": table}, 1, 3, 4)
    assert ints.tree == ("add", ("s",), ("c", 0)) and ints.arrays[0].dtype == np.int64
    assert ints.arrays[0][0].tolist() == [[1, 2, 1, 2]] * 3
    thirds = scoremod.fold("s + c[kv_idx % 3]", {"c": table}, 1, 3, 4)
    assert thirds.tree == ("add", ("s",), ("mul", ("p", 0), ("c", 0))) and thirds.scalars[0] == Fraction(1, 3)
    assert thirds.arrays[0][0, 0].tolist() == [3, 6, 1, 3]
