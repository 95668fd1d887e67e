"""fp8 inputs (float8_e4m3fn, float8_e5m2) with FlashAttention-3's descales: the formats' rounding against
their definitions written here, the descales' meaning against an mpmath reference written here, and the
verifier's verdicts on a right FlashAttention-3-style implementation and on the classic fp8 bugs."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import pytest

import symattn
import symattn.cli
import symattn.truth.large
from symattn import SymattnError
from symattn.graph.graph import build as build_graph

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
E5M2 = ml_dtypes.float8_e5m2


# The formats, from their definitions (OCP 8-bit floating point, 2023): sign, exponent bits, mantissa bits.


def e4m3fn_value(bits: int) -> float | None:
    """float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN (None); subnormals 2**-6 · m/8."""
    sign = -1.0 if bits & 0x80 else 1.0
    e, m = (bits >> 3) & 0xF, bits & 0x7
    if e == 0xF and m == 0x7:
        return None
    if e == 0:
        return sign * 2.0**-6 * m / 8
    return sign * 2.0 ** (e - 7) * (1 + m / 8)


def e5m2_value(bits: int) -> float | None:
    """float8_e5m2: IEEE-like, bias 15; exponent 31 is inf (m = 0) or NaN (None); subnormals 2**-14 · m/4."""
    sign = -1.0 if bits & 0x80 else 1.0
    e, m = (bits >> 2) & 0x1F, bits & 0x3
    if e == 0x1F:
        return sign * np.inf if m == 0 else None
    if e == 0:
        return sign * 2.0**-14 * m / 4
    return sign * 2.0 ** (e - 15) * (1 + m / 4)


FORMATS = {"float8_e4m3fn": (E4M3, e4m3fn_value, 448.0, 2.0**-9), "float8_e5m2": (E5M2, e5m2_value, 57344.0, 2.0**-16)}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_bit_pattern_decodes_as_the_format_defines(name):
    dtype, value, largest, tiny = FORMATS[name]
    decoded = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
    for bits in range(256):
        want = value(bits)
        if want is None:
            assert np.isnan(decoded[bits]), bits
        else:
            assert decoded[bits] == want, (bits, decoded[bits], want)
    finite = decoded[np.isfinite(decoded)]
    assert finite.max() == largest and np.abs(finite[finite != 0]).min() == tiny


def _nearest_even(x: float, grid: np.ndarray, bits: np.ndarray) -> float:
    """x rounded to the nearest of the finite values ``grid`` (ascending), a tie to the even mantissa."""
    i = np.searchsorted(grid, x)
    below, above = grid[max(i - 1, 0)], grid[min(i, len(grid) - 1)]
    if x - below != above - x:
        return below if x - below < above - x else above
    return below if bits[max(i - 1, 0)] % 2 == 0 else above


@pytest.mark.parametrize("name", list(FORMATS))
def test_rounding_from_float64_is_to_nearest_even_and_direct(name):
    dtype, value, largest, _ = FORMATS[name]
    pairs = sorted((value(b), b) for b in range(128) if value(b) is not None and np.isfinite(value(b)))
    grid = np.array([v for v, _ in pairs])
    bits = np.array([b for _, b in pairs])
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(0, largest, 2000), 2.0 ** rng.uniform(-18, 0, 2000), (grid[1:] + grid[:-1]) / 2])
    got = xs.astype(dtype).astype(np.float64)
    for x, g in zip(xs.tolist(), got.tolist(), strict=True):
        assert g == _nearest_even(x, grid, bits), (x, g)
        assert float(np.float64(-x).astype(dtype)) == -g  # the sign apart
    # float64 is rounded once: 1 + 2**-4 + 2**-30 is above the tie between 1 and 1 + 2**-3 (e4m3) / 2**-2 (e5m2)
    step = 2.0**-3 if name == "float8_e4m3fn" else 2.0**-2
    assert float(np.float64(1 + step / 2 + 2.0**-30).astype(dtype)) == 1 + step


def test_overflow_is_not_saturating():
    """Round to nearest, not saturating (ml_dtypes, as torch's .to(float8)): beyond the largest finite value's
    half step the result is NaN (e4m3fn, no infinity) or inf (e5m2); below it, the largest."""
    assert float(np.float64(463.99).astype(E4M3)) == 448 and float(np.float64(464).astype(E4M3)) == 448  # a tie
    assert np.isnan(float(np.float64(464.01).astype(E4M3)))
    assert float(np.float64(61439).astype(E5M2)) == 57344 and np.isinf(float(np.float64(61440).astype(E5M2)))


# The descales' meaning: the truth is attention of (q·q_descale, k·k_descale, v·v_descale).

GQA = {
    "name": "descaled",
    "q": [[[1, 2], [0, -1], [3, 1]], [[2, 0], [1, 1], [-1, 2]], [[0, 1], [2, 2], [1, 0]], [[1, -1], [0, 3], [2, 1]]],
    "k": [[[1, 0], [0, 1], [2, -1], [1, 1]], [[-1, 1], [2, 0], [0, 2], [1, 3]]],
    "v": [[[1, 2], [3, -4], [5, 6], [0, 1]], [[-1, 0], [2, 1], [0, 3], [4, 1]]],
    "causal": True,
    "align": "bottom_right",
    "q_descale": ["1/3", "0.75"],
    "k_descale": [2, "0.125"],
    "v_descale": ["3", "1/5"],
}


def mp(e) -> mpmath.mpf:
    f = Fraction(e)
    return mpmath.mpf(f.numerator) / f.denominator


def descaled_reference(data: dict, dps: int = 50, causal: bool = True) -> dict:
    """head{h} of the kernel form with descales, in mpmath: each input times its kv head's descale, then
    attention (causal bottom-right, or not) with scale 1/sqrt(E)."""
    with mpmath.workdps(dps):
        H, H_kv = len(data["q"]), len(data["k"])
        out = {}
        for h in range(H):
            g = h * H_kv // H
            dq, dk, dv = (mp(data[key][g]) if key in data else 1 for key in ("q_descale", "k_descale", "v_descale"))
            q = [[mp(x) * dq for x in row] for row in data["q"][h]]
            k = [[mp(x) * dk for x in row] for row in data["k"][g]]
            v = [[mp(x) * dv for x in row] for row in data["v"][g]]
            L, S, E = len(q), len(k), len(q[0])
            scale = 1 / mpmath.sqrt(E)
            head = []
            for i in range(L):
                keys = [j for j in range(S) if j <= i + S - L or not causal]
                s = [scale * mpmath.fsum(a * b for a, b in zip(q[i], k[j], strict=True)) for j in keys]
                e = [mpmath.exp(x - max(s)) for x in s]
                z = mpmath.fsum(e)
                head.append([mpmath.fsum(e[n] * v[j][c] for n, j in enumerate(keys)) / z for c in range(len(v[0]))])
            out[f"head{h + 1}"] = head
        return out


@mpmath.workdps(60)
def check_heads(truth, ref, digits: int):
    for name, rows in ref.items():
        got = truth[name].tolist()
        for i, row in enumerate(rows):
            for c, want in enumerate(row):
                assert isinstance(got[i][c], Decimal), (name, i, c, got[i][c])
                assert abs(mpmath.mpf(str(got[i][c])) - want) <= mpmath.mpf(10) ** (2 - digits) * max(1, abs(want))


@pytest.mark.parametrize("large", [False, True])
def test_the_truth_is_attention_of_value_times_descale(monkeypatch, large):
    if large:
        monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
    digits = 15 if large else 30
    truth = symattn.evaluate(symattn.load_spec(GQA), digits=digits, steps=[f"head{h}" for h in range(1, 5)])
    check_heads(truth, descaled_reference(GQA), digits)
    # and it is not attention of the values alone
    plain = {k: v for k, v in GQA.items() if not k.endswith("descale")}
    assert descaled_reference(plain)["head1"][2][0] != descaled_reference(GQA)["head1"][2][0]


def test_fp8_values_as_arrays_with_float32_descales():
    rng = np.random.default_rng(3)
    q = rng.normal(0, 4, (2, 3, 4)).astype(E4M3)
    k = rng.normal(0, 4, (1, 5, 4)).astype(E4M3)
    v = rng.normal(0, 4, (1, 5, 2)).astype(E5M2)
    descales = {"q_descale": np.float32([0.1]), "k_descale": np.float32([0.3]), "v_descale": np.float32([7.5])}
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True, "align": "bottom_right", **descales})
    assert spec.q_descale == (Fraction(float(np.float32(0.1))),)
    truth = symattn.evaluate(spec, digits=25, steps=["head1", "head2"])
    data = {key: a.astype(np.float64).tolist() for key, a in (("q", q), ("k", k), ("v", v))}
    data.update({key: [Fraction(float(d[0]))] for key, d in descales.items()})
    check_heads(truth, descaled_reference(data), 25)


def test_float64_values_times_a_descale_they_cannot_hold():
    rng = np.random.default_rng(4)
    q, k, v = rng.normal(size=(2, 3, 2)), rng.normal(size=(1, 4, 2)), rng.normal(size=(1, 4, 2))
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "q_descale": [0.1], "v_descale": ["1/3"]})
    leaves = build_graph(spec).leaves
    assert not leaves["q1"].is_float and leaves["k1"].is_float  # 0.1·q needs more than float64's 53 bits
    truth = symattn.evaluate(spec, digits=30, steps=["head1", "head2"])
    data = {"q": q.tolist(), "k": k.tolist(), "v": v.tolist(), "q_descale": [0.1], "v_descale": [Fraction(1, 3)]}
    check_heads(truth, descaled_reference(data, causal=False), 30)


def test_descales_in_json_toml_npz_and_dicts_load_alike(tmp_path):
    spec = symattn.load_spec(GQA)
    (tmp_path / "d.json").write_text(json.dumps(GQA))
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in GQA.items() if k != "name")
    (tmp_path / "d.toml").write_text(toml)
    np.savez(
        tmp_path / "d.npz",
        q=np.array(GQA["q"], float),
        k=np.array(GQA["k"], float),
        v=np.array(GQA["v"], float),
        causal=True,
        align="bottom_right",
        q_descale=np.array([1 / 3, 0.75]),  # a float: 1/3 rounded to float64, exactly that
        k_descale=np.array([2.0, 0.125]),
        v_descale=np.array([3.0, 0.2]),
    )
    for name in ("d.json", "d.toml"):
        loaded = symattn.load_spec(str(tmp_path / name))
        assert (loaded.q_descale, loaded.k_descale, loaded.v_descale) == (
            spec.q_descale,
            spec.k_descale,
            spec.v_descale,
        )
    npz = symattn.load_spec(str(tmp_path / "d.npz"))
    assert npz.q_descale == (Fraction(1 / 3), Fraction(3, 4)) and npz.k_descale == spec.k_descale
    assert symattn.load_spec(spec.to_dict()) == spec
    assert spec.to_dict()["q_descale"] == ["1/3", "3/4"]
    assert spec.digest() != symattn.load_spec({**GQA, "v_descale": [3, "1/4"]}).digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_descale": [1]}, r"^q_descale: expected a list of 2 numbers > 0 \(one per kv head\), received \[1\]$"),
        ({"k_descale": [1, 0]}, r"^k_descale\[1\]: expected a number > 0, received 0$"),
        ({"v_descale": ["-1/2", 1]}, r"^v_descale\[0\]: expected a number > 0, received -1/2$"),
        ({"v_descale": ["a", 1]}, r"^v_descale\[0\]: expected a number > 0, received the symbolic a$"),
        ({"q_descale": [1, float("inf")]}, r"^q_descale\[1\]: expected a finite number, received inf$"),
        ({"q_descale": 2}, r"^q_descale: expected a list of 2 numbers > 0 \(one per kv head\), received 2$"),
    ],
)
def test_bad_descales_are_one_line_errors_naming_the_key(change, message):
    with pytest.raises(SymattnError, match=message):
        symattn.load_spec({**GQA, **change})


def test_descales_belong_to_the_kernel_form():
    with pytest.raises(SymattnError, match=r"^spec: unknown key 'q_descale'; expected keys: name, x, heads"):
        symattn.load_spec({**symattn.load_spec("notebook").to_dict(), "q_descale": [1, 1]})
    notebook = symattn.load_spec("notebook")
    with pytest.raises(SymattnError, match=r"^v_descale: expected it in the kernel form only \(q, k, v given\)"):
        symattn.AttentionSpec(
            "p", notebook.x, notebook.heads, notebook.wo, kv_heads=notebook.kv_heads, v_descale=[1, 1]
        )


def test_show_prints_the_descales_in_the_definitions(tmp_path, capsys):
    path = tmp_path / "descaled.json"
    path.write_text(json.dumps(GQA))
    assert symattn.cli.main(["show", str(path), "--step", "scores3"]) == 0
    out = capsys.readouterr().out
    assert "scores3 = q3·k2ᵀ·scale, scale = sqrt(2)/2, q3 = q_descale[1]·q3 given, q_descale[1] = 3/4, " in out
    assert "k2 = k_descale[1]·k2 given, k_descale[1] = 1/8" in out
    assert symattn.cli.main(["show", str(path), "--step", "head1"]) == 0
    assert "head1 = weights1·v1, v1 = v_descale[0]·v1 given, v_descale[0] = 3" in capsys.readouterr().out


def test_generated_code_refuses_descales():
    with pytest.raises(SymattnError, match=r"^q_descale: expected a spec without fp8 descales to generate code"):
        symattn.generate(GQA)


# Implementations, as a kernel author writes FlashAttention-3's fp8 forward in NumPy.


def _fa3(q, k, v, scale, causal, dq, dk, dv, bug=None, block=None):
    """By blocks of keys with the running maximum: float32 q·kᵀ, the descales folded into the scale (and the
    output), P = exp(s − m) rounded to e4m3 before P·V, the row sum of the unrounded P; bfloat16 out."""
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    g = np.arange(H) * H_kv // H
    folded = np.float32(scale) * dq[g] * dk[g]
    if bug == "q_descale_twice":
        folded = folded * dq[g]
    s = np.einsum("hle,hse->hls", q.astype(np.float32), k.astype(np.float32)[g]) * folded[:, None, None]
    if causal:
        s = np.where(np.tril(np.ones((L, S), bool)), s, -np.inf)
    block = block or S
    m = np.full((H, L, 1), -np.inf, np.float32)
    z = np.zeros((H, L, 1), np.float32)
    o = np.zeros((H, L, v.shape[2]), np.float32)
    for start in range(0, S, block):
        part = s[..., start : start + block]
        new = np.maximum(m, part.max(axis=-1, keepdims=True))
        if bug == "no_max_shift":  # exp(s) of scores beyond ln 448 saturates P at e4m3's largest value
            new = np.zeros_like(new)
        safe = np.where(np.isfinite(new), new, 0)
        alpha = np.where(np.isfinite(m), np.exp(m - safe), 0).astype(np.float32)
        p = np.exp(part - safe).astype(np.float32)
        if bug == "no_max_shift":
            p8 = np.minimum(p, 448).astype(E4M3)  # a saturating cast (cvt.satfinite): 448, not NaN
        else:
            p8 = p.astype(E4M3)
        z = z * alpha + p.sum(axis=-1, keepdims=True)
        o = o * alpha + np.einsum("hls,hse->hle", p8.astype(np.float32), v.astype(np.float32)[g, start : start + block])
        m = new
    o = o / z
    if bug != "no_v_descale":
        o = o * dv[g][:, None, None]
    return o.astype(BF16)


def fa3_right(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale)


def fa3_blocked(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale, block=3)


def fa3_no_v_descale(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale, bug="no_v_descale")


def fa3_q_descale_twice(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale, bug="q_descale_twice")


def fa3_p_saturates(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale, bug="no_max_shift")


def fa3_float32_out(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return _fa3(q, k, v, scale, causal, q_descale, k_descale, v_descale).astype(np.float32)


def no_descales(q, k, v, *, scale, causal):
    return _fa3(q, k, v, scale, causal, *(np.ones(k.shape[0], np.float32),) * 3)


def float_right(q, k, v, *, scale, causal, q_descale, k_descale, v_descale, forget_v=False):
    """A float32/bfloat16 implementation of a descaled spec: the descales applied to the inputs."""
    H, H_kv = q.shape[0], k.shape[0]
    g = np.arange(H) * H_kv // H
    work = np.float32 if q.dtype != np.float64 else np.float64
    qs = q.astype(work) * q_descale[g][:, None, None]
    ks = k.astype(work)[g] * k_descale[g][:, None, None]
    vs = v.astype(work)[g] * (1 if forget_v else v_descale[g][:, None, None])
    s = np.einsum("hle,hse->hls", qs, ks) * work(scale)
    if causal:
        L, S = s.shape[-2:]
        s = np.where(np.tril(np.ones((L, S), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (np.einsum("hls,hse->hle", p / p.sum(axis=-1, keepdims=True), vs)).astype(q.dtype)


def float_forget_v(q, k, v, *, scale, causal, q_descale, k_descale, v_descale):
    return float_right(q, k, v, scale=scale, causal=causal, q_descale=q_descale, k_descale=k_descale,
                       v_descale=v_descale, forget_v=True)  # fmt: skip


def fp8_spec(dtype: str, seed: int = 0, H: int = 4, H_kv: int = 2, L: int = 12, S: int = 20, E: int = 16) -> dict:
    """fp8 values (normal, standard deviation 8) with float32 descales; the scores reach ±20 and more, beyond
    ln 448 ≈ 6.1, where an exp without its max shift saturates e4m3."""
    rng = np.random.default_rng(seed)
    fp8 = FORMATS[dtype][0]

    def values(*shape):
        return rng.normal(0, 8, shape).astype(fp8).astype(np.float64).tolist()

    return {
        "name": f"fp8_{seed}",
        "q": values(H, L, E),
        "k": values(H_kv, S, E),
        "v": values(H_kv, S, E),
        "causal": True,
        "q_descale": [float(np.float32(d)) for d in rng.uniform(0.1, 0.3, H_kv)],
        "k_descale": [float(np.float32(d)) for d in rng.uniform(0.1, 0.3, H_kv)],
        "v_descale": [float(np.float32(d)) for d in rng.uniform(2, 4, H_kv)],
    }


IMPLS = [fa3_right, fa3_blocked, fa3_no_v_descale, fa3_q_descale_twice, fa3_p_saturates, fa3_float32_out]


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_verdicts(dtype, seed):
    results = symattn.verify(fp8_spec(dtype, seed), IMPLS, dtype=dtype)
    verdicts = {r.name: r.verdict for r in results}
    assert verdicts == {
        "fa3_right": "PASS",
        "fa3_blocked": "PASS",
        "fa3_no_v_descale": "FAIL",
        "fa3_q_descale_twice": "FAIL",
        "fa3_p_saturates": "FAIL",
        "fa3_float32_out": "FAIL",
    }, [r.reasons for r in results]
    by_name = {r.name: r for r in results}
    assert "returned dtype float32, not bfloat16 for " + dtype + " inputs" in by_name["fa3_float32_out"].reasons
    assert by_name["fa3_right"].max_abs_error > 0  # P's e4m3 rounding is visible, and allowed


def test_the_saturating_bug_fails_only_where_scores_pass_ln_448():
    small = fp8_spec("float8_e4m3fn", 2)
    small["q_descale"] = [0.01, 0.01]  # scores below 1: exp(s) < 448, the missing shift changes nothing visible
    results = symattn.verify(small, [fa3_right, fa3_p_saturates], dtype="float8_e4m3fn")
    assert [r.verdict for r in results] == ["PASS", "PASS"]


def test_a_function_without_descales_is_unsupported_unless_they_are_all_1():
    spec = fp8_spec("float8_e4m3fn", 3)
    (result,) = symattn.verify(spec, [no_descales], dtype="float8_e4m3fn")
    assert result.verdict == "UNSUPPORTED"
    assert result.reasons[0].startswith("the spec sets q_descale = an array of shape (2,), k_descale = ")
    ones = {k: v for k, v in spec.items() if not k.endswith("descale")}
    ones["v_descale"] = [1, 1]
    assert [r.verdict for r in symattn.verify(ones, [no_descales, fa3_right], dtype="float8_e4m3fn")] == ["PASS"] * 2


def test_descales_reach_the_function_as_float32_arrays():
    seen = {}

    def spy(q, k, v, **options):
        seen.update(options, dtypes=(q.dtype, k.dtype, v.dtype))
        return fa3_right(q, k, v, **{k: options[k] for k in ("scale", "causal", "q_descale", "k_descale", "v_descale")})

    (result,) = symattn.verify(fp8_spec("float8_e5m2", 4), [spy], dtype="float8_e5m2")
    assert result.verdict == "PASS"
    assert seen["dtypes"] == (np.dtype(E5M2),) * 3
    assert seen["v_descale"].dtype == np.float32 and seen["v_descale"].shape == (2,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_descaled_spec_in_float_dtypes(dtype):
    spec = fp8_spec("float8_e4m3fn", 5)
    results = symattn.verify(spec, [float_right, float_forget_v], dtype=dtype)
    assert [r.verdict for r in results] == ["PASS", "FAIL"], [r.reasons for r in results]


def test_fp8_verdicts_on_the_large_path(monkeypatch):
    monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
    results = symattn.verify(fp8_spec("float8_e4m3fn", 7), IMPLS[:5], dtype="float8_e4m3fn")
    assert [r.verdict for r in results] == ["PASS", "PASS", "FAIL", "FAIL", "FAIL"], [r.reasons for r in results]


def test_fp8_bad_usage():
    with pytest.raises(SymattnError, match=r"^dtype: expected the kernel form \(q, k, v given\) for float8_e4m3fn"):
        symattn.verify("notebook", [fa3_right], dtype="float8_e4m3fn")
    with pytest.raises(SymattnError, match=r"^dtype: expected a forward verification in float8_e5m2, received --backw"):
        symattn.verify(GQA, [fa3_right], dtype="float8_e5m2", backward=True)
    with pytest.raises(
        SymattnError, match=r"^q_descale: expected no descales \(or 1\) with --backward, received 1/3, 3/4$"
    ):
        symattn.verify(GQA, [float_right], dtype="float32", backward=True)
    big = {**GQA, "q": [[[500, 0]] * 3] * 4}
    with pytest.raises(SymattnError, match=r"^q: expected values within float8_e4m3fn's range \(\|x\| <= 448\), rec"):
        symattn.verify(big, [fa3_right], dtype="float8_e4m3fn")


def test_built_in_adapters_are_unsupported_in_fp8():
    fn = symattn.verifier.convention.load_impl("torch_sdpa") if _has("torch") else _adapter_like()
    (result,) = symattn.verify(GQA, [("torch_sdpa", fn)], dtype="float8_e4m3fn")
    assert result.verdict == "UNSUPPORTED"
    assert result.reasons == ["torch_sdpa does not take float8_e4m3fn inputs (FlashAttention-3's fp8 with descales)"]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _adapter_like():
    def adapter(q, k, v, **options):
        raise AssertionError("not called")

    adapter.cast = lambda a, dtype: a  # what marks a built-in adapter
    return adapter


# The CLI on a hand-written spec file.

SPEC_FILE = """{
  "name": "fp8_file",
  "q": [[[1.5, -2, 0.25, 3], [4, 1, -0.5, 2]], [[-1, 2, 3, 0.75], [0, -3, 1, 1]]],
  "k": [[[2, 1, -1, 0.5], [1, -2, 3, 1], [-0.5, 0, 2, -3]]],
  "v": [[[1, 2], [-3, 0.5], [4, -1]]],
  "q_descale": ["4"],
  "k_descale": ["0.5"],
  "v_descale": ["3"]
}
"""


def test_cli_verify_fp8(tmp_path, capsys):
    path = tmp_path / "fp8_file.json"
    path.write_text(SPEC_FILE)
    base = ["verify", str(path), "--dtype", "float8_e4m3fn", "--json"]
    assert symattn.cli.main([*base, "--impl", "tests.test_fp8:fa3_right"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    for bug in ("fa3_no_v_descale", "fa3_q_descale_twice", "fa3_p_saturates"):  # scores up to 10.5 > ln 448
        assert symattn.cli.main([*base, "--impl", f"tests.test_fp8:{bug}"]) == 1
    capsys.readouterr()
    assert symattn.cli.main(["verify", str(path), "--dtype", "float8_e4m3fn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype float8_e4m3fn: expected --impl MODULE:FUNCTION" in err
    path.write_text(SPEC_FILE.replace('"v_descale": ["3"]', '"v_descale": ["0"]'))
    assert symattn.cli.main([*base, "--impl", "tests.test_fp8:fa3_right"]) == 2
    err = capsys.readouterr().err
    assert err == f"symattn: error: in {path}: v_descale[0]: expected a number > 0, received 0\n"
