"""PyTorch and JAX: their semantics against the certified truth, the built-in adapters, the pytest helper on
tensors, and their casts.  Skipped where the frameworks are not installed (they are not test dependencies)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import symattn
from symattn.testing import assert_attention_close
from symattn.verifier import verify
from tools import impls

torch = pytest.importorskip("torch")
F = torch.nn.functional
ROOT = Path(__file__).resolve().parent.parent
DTYPES = ["float64", "float32", "float16", "bfloat16"]


def random_qkv(seed=0, H=4, H_kv=2, L=12, S=12, E=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((H, L, E), (H_kv, S, E), (H_kv, S, E))
    )


def exact(spec) -> np.ndarray:
    truth = symattn.evaluate(spec, digits=20)
    return np.stack([truth[f"head{i}"].to_numpy() for i in range(1, spec.h + 1)])


@pytest.mark.parametrize(
    "case",
    ["plain", "is_causal", "attn_mask", "scale", "gqa", "causal_lower_right", "bias"],
)
def test_torch_float64_agrees_with_the_truth_where_semantics_coincide(case):
    q, k, v = random_qkv(L=6, S=9 if case == "causal_lower_right" else 6)
    L, S = q.shape[1], k.shape[1]
    mask = torch.rand(L, S, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    bias = torch.randn(L, S, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    data = {"q": q, "k": k, "v": v}
    kwargs = {"enable_gqa": True}
    if case == "is_causal":
        data["causal"], kwargs["is_causal"] = True, True
    if case == "attn_mask":
        data["mask"], kwargs["attn_mask"] = mask.numpy(), mask
    if case == "scale":
        data["scale"], kwargs["scale"] = "1/3", 1 / 3
    if case == "causal_lower_right":
        from torch.nn.attention.bias import causal_lower_right

        data["causal"], data["align"] = True, "bottom_right"
        kwargs["attn_mask"] = causal_lower_right(L, S)
    if case == "bias":
        data["bias"], kwargs["attn_mask"] = bias.numpy(), bias
    expected = exact(symattn.load_spec(data))
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0].numpy()
    assert np.allclose(out, expected, rtol=1e-13, atol=1e-14), np.abs(out - expected).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["notebook", "four_tokens", "causal", "gqa", "cross"])
def test_torch_adapters_pass_where_they_can_express_the_spec(spec, dtype):
    for r in verify(spec, ["torch_sdpa", "torch_mha"], dtype=dtype):
        if r.name == "torch_mha" and spec in ("gqa", "cross"):
            assert r.verdict == "UNSUPPORTED", r.lines()
        else:
            assert r.passed, r.lines()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": [3, 1]}, {"alibi": True}], ids=str)
def test_torch_sdpa_on_the_kernel_form(dtype, options):
    q, k, v = random_qkv()
    spec = symattn.load_spec({"q": q, "k": k, "v": v, **options})
    (r,) = verify(spec, ["torch_sdpa"], dtype=dtype)
    assert r.passed, r.lines()


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_kernels_fail_on_torch_tensors(dtype):
    q, k, v = random_qkv(seed=1)
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True})
    results = verify(spec, impls.KERNEL_WRONG, dtype=dtype)
    for r in results:
        if r.name == "kernel_lower_precision" and dtype in ("float16", "bfloat16"):
            continue  # nothing lower to fall to
        assert r.verdict == "FAIL", r.lines()


def test_pytest_helper_on_torch_tensors():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)

    def sdpa(q, k, v, *, scale, causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    for dtype in DTYPES:
        assert_attention_close(sdpa, q=q, k=k, v=v, causal=True, dtype=dtype)
    assert_attention_close(sdpa, q=q.to(torch.bfloat16), k=k.to(torch.bfloat16), v=v.to(torch.bfloat16), causal=True)

    def flipped(q, k, v, *, scale, causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=not causal, scale=scale)

    message = (
        r"^batch element 0: flipped is not close to the exact attention on spec in bfloat16 \(rule kappa\): "
        r".*Worst entry output\[\d+, \d+, \d+\] \(head \d+, row \d+, column \d+\): float .*, exact .*, error .*, "
        r"bound .*"
    )
    with pytest.raises(AssertionError, match=message):
        assert_attention_close(flipped, q=q, k=k, v=v, causal=True, dtype="bfloat16")


def test_torch_rounds_float64_to_bfloat16_through_float32_and_the_truth_follows():
    x = 1 + 2**-8 + 2**-30  # correctly rounded to bfloat16 it is 1.0078125; through float32 it is 1.0
    q = np.full((1, 2, 2), x)
    k = np.ones((1, 2, 2))
    v = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    spec = symattn.load_spec({"q": q, "k": k, "v": v})
    (r,) = verify(spec, ["torch_sdpa"], dtype="bfloat16")
    assert r.passed, r.lines()
    from symattn.verifier.adapters import torch_cast

    assert torch_cast(np.array([x]), "bfloat16").astype(np.float64)[0] == 1.0


def test_cli_with_adapters_and_strict_json(cli):
    done = cli("verify", "gqa", "--impl", "torch_sdpa", "--impl", "torch_mha", "--json", "--dtype", "bfloat16")
    assert done.returncode == 1, done.stderr  # torch_mha is UNSUPPORTED: not a pass
    doc = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
    assert doc["passed"] is False
    assert [(r["name"], r["verdict"]) for r in doc["results"]] == [("torch_sdpa", "PASS"), ("torch_mha", "UNSUPPORTED")]


def test_jax_adapter():
    pytest.importorskip("jax")
    q, k, v = (a.numpy() for a in random_qkv(L=16, S=16))
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True})
    for dtype in ("float32", "float16", "bfloat16"):
        (r,) = verify(spec, ["jax_dpa"], dtype=dtype)
        assert r.passed, r.lines()
    (r,) = verify(spec, ["jax_dpa"], dtype="float64")
    assert r.verdict == "FAIL" and r.max_ulps > 1e6  # its softmax runs in float32 even for float64 inputs


def test_jax_empty_rows_are_the_mean_of_v():
    pytest.importorskip("jax")
    q, k, v = (a.numpy() for a in random_qkv(L=4, S=4))
    mask = np.ones((4, 4), bool)
    mask[1] = False
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "mask": mask})
    (r,) = verify(spec, ["jax_dpa"], dtype="float32")
    assert r.verdict == "UNSUPPORTED" and "mean of V" in r.reasons[0]
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "mask": mask, "empty_row": "uniform"})
    (r,) = verify(spec, ["jax_dpa"], dtype="float32")
    assert r.passed, r.lines()


# Backward (issue 12): torch's autograd and jax.vjp against the exact gradients.


def exact_gradients(spec) -> dict:
    """The exact dq, dk, dv (kernel form) for dout all ones, stacked by head."""
    truth = symattn.evaluate(spec, digits=20, grad=True)
    return {
        name: np.stack([truth[f"{name}{n}"].to_numpy() for n in range(1, count + 1)])
        for name, count in (("dq", spec.h), ("dk", spec.h_kv), ("dv", spec.h_kv))
    }


@pytest.mark.parametrize("case", ["plain", "is_causal", "gqa", "bias"])
def test_torch_autograd_in_float64_agrees_with_the_exact_gradients_to_its_precision(case):
    q, k, v = (t.requires_grad_(True) for t in random_qkv(seed=5, L=8, S=8))
    data = {"q": q.detach(), "k": k.detach(), "v": v.detach()}
    kwargs = {"enable_gqa": True}
    if case == "is_causal":
        data["causal"], kwargs["is_causal"] = True, True
    if case == "bias":
        bias = torch.randn(8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        data["bias"], kwargs["attn_mask"] = bias.numpy(), bias
    F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs).sum().backward()
    expected = exact_gradients(symattn.load_spec(data))
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        scale = np.abs(expected[name]).max()
        assert np.abs(t.grad.numpy() - expected[name]).max() <= 1e-13 * scale, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["notebook", "causal", "gqa", "cross"])
def test_torch_backward_adapters_pass_where_they_can_express_the_spec(spec, dtype):
    for r in verify(spec, ["torch_sdpa", "torch_mha"], dtype=dtype, backward=True):
        if r.name == "torch_mha" and spec in ("gqa", "cross"):
            assert r.verdict == "UNSUPPORTED", r.lines()
        else:
            assert r.passed, r.lines()


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_sdpa_backward_on_the_kernel_form_with_a_bias(dtype):
    q, k, v = (a.numpy() for a in random_qkv(seed=2, L=10, S=10))
    bias = np.random.default_rng(1).standard_normal((4, 10, 10))
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True, "bias": bias})
    (r,) = verify(spec, ["torch_sdpa"], dtype=dtype, backward=True)
    assert r.passed and not r.notes, r.lines()


def test_jax_backward_adapter():
    pytest.importorskip("jax")
    q, k, v = (a.numpy() for a in random_qkv(L=12, S=12))
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True, "bias": np.eye(12)})
    for dtype in ("float32", "bfloat16"):
        (r,) = verify(spec, ["jax_dpa"], dtype=dtype, backward=True)
        assert r.passed and r.backward, r.lines()


def test_the_pytest_helper_on_a_torch_autograd_backward():
    q, k, v = random_qkv(seed=7, L=6, S=6)

    def backward(q, k, v, dout, *, scale, causal=False):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale, is_causal=causal,
                                             enable_gqa=True)[0]  # fmt: skip
        out.backward(dout)
        return {"dq": q.grad, "dk": k.grad, "dv": v.grad}

    assert_attention_close(backward, q=q, k=k, v=v, causal=True, backward=True)
    assert_attention_close(backward, q=q, k=k, v=v, causal=True, backward=True, dtype="bfloat16")
    dout = torch.randn(4, 6, 8, dtype=torch.float64)
    assert_attention_close(backward, q=q, k=k, v=v, dout=dout, backward=True, dtype="float32")

    def forgets_scale_in_dk(q, k, v, dout, *, scale, causal=False):
        grads = backward(q, k, v, dout, scale=scale, causal=causal)
        grads["dk"] = grads["dk"] / scale
        return grads

    with pytest.raises(AssertionError, match="dk"):
        assert_attention_close(forgets_scale_in_dk, q=q, k=k, v=v, causal=True, backward=True, dtype="float32")


# What each library cannot express (issue 17): UNSUPPORTED with the reason, forward and backward, never the
# library's own exception (an ERROR).

_rng = np.random.default_rng(17)
_EMPTY = np.ones((5, 6), bool)
_EMPTY[1] = False


def _r(*shape):
    return _rng.standard_normal(shape)


def _kernel(**options) -> dict:
    return {"q": _r(4, 5, 3), "k": _r(2, 6, 3), "v": _r(2, 6, 3), **options}


def _projection(**options) -> dict:
    heads = [{"wq": _r(3, 2), "wk": _r(3, 2), "wv": _r(3, 2)} for _ in range(2)]
    return {"x": _r(5, 3), "heads": heads, "wo": _r(4, 3), **options}


# case -> (spec, {adapter: None for a pass, or a phrase of its UNSUPPORTED reason})
ADAPTER_CASES = {
    "kernel E_v != E": (_kernel(v=_r(2, 6, 2)), {"torch_sdpa": None, "jax_dpa": "V's head size"}),
    "kernel E_v != E causal": (_kernel(v=_r(2, 6, 5), causal=True), {"torch_sdpa": None, "jax_dpa": "E_v 5"}),
    "kernel window bottom-right, ALiBi, bias per head": (
        _kernel(window=[1, 0], align="bottom_right", alibi=True, bias=_r(4, 5, 6)),
        {"torch_sdpa": None, "jax_dpa": None, "torch_mha": "takes the projection form"},
    ),
    "kernel mask per head": (_kernel(mask=_rng.random((4, 5, 6)) > 0.3), {"torch_sdpa": None, "jax_dpa": None}),
    "kernel softcap": (_kernel(softcap=2.0), {"torch_sdpa": "softcap", "jax_dpa": "softcap"}),
    "kernel sinks": (_kernel(sinks=[1, 0, -1, 2]), {"torch_sdpa": "sinks", "jax_dpa": "sinks"}),
    "projection sinks": (_projection(sinks=[1, 0]), {"torch_sdpa": "sinks", "torch_mha": "sinks"}),
    "kernel dropout": (
        _kernel(dropout_p="1/4", dropout_mask=_rng.random((5, 6)) > 0.3),
        {"torch_sdpa": "samples its own dropout mask", "jax_dpa": "dropout_p"},
    ),
    "projection dropout": (
        _projection(dropout_p=0, dropout_mask=_rng.random((2, 5, 5)) > 0.3),
        {"torch_sdpa": "samples its own dropout mask", "torch_mha": "dropout_p"},
    ),
    "kernel segments causal bottom-right, ALiBi": (
        _kernel(segments_q=[0, 2, 5], segments_kv=[0, 3, 6], causal=True, align="bottom_right", alibi=True),
        {"torch_sdpa": None, "jax_dpa": None},
    ),
    "kernel segments, an empty query segment": (
        _kernel(segments_q=[0, 2, 3, 5], segments_kv=[0, 3, 3, 6]),
        {"torch_sdpa": None, "jax_dpa": "mean of V"},
    ),
    "projection segments": (
        _projection(segments_q=[0, 3, 5], segments_kv=[0, 2, 5]),
        {"torch_sdpa": None, "torch_mha": "segments_q"},
    ),
    "kernel mask_mod, document per head": (
        _kernel(
            mask_mod="doc_q[q_idx] == doc_kv[kv_idx] and (kv_idx <= q_idx + 1 or h == 0)",
            constants={"doc_q": [0, 0, 1, 1, 1], "doc_kv": [0, 0, 0, 1, 1, 1]},
        ),
        {"torch_sdpa": None, "jax_dpa": None},
    ),
    "projection mask_mod": (
        _projection(mask_mod="q_idx >= kv_idx and (q_idx - kv_idx) % 2 == 0"),
        {"torch_sdpa": None, "torch_mha": "mask_mod"},
    ),
    "kernel empty row zero": (_kernel(mask=_EMPTY, bias=_r(5, 6)), {"torch_sdpa": None, "jax_dpa": "mean of V"}),
    "kernel empty row uniform": (
        _kernel(mask=_EMPTY, empty_row="uniform"),
        {"torch_sdpa": "empty_row", "jax_dpa": None},
    ),
    "kernel empty row nan": (_kernel(mask=_EMPTY, empty_row="nan"), {"torch_sdpa": "empty_row", "jax_dpa": "'nan'"}),
    "projection": (_projection(), {"torch_sdpa": None, "torch_mha": None, "jax_dpa": "takes the kernel form"}),
    "projection d_v != d_k": (
        _projection(heads=[{"wq": _r(3, 2), "wk": _r(3, 2), "wv": _r(3, 3)} for _ in range(2)], wo=_r(6, 3)),
        {"torch_sdpa": None, "torch_mha": "d_v = d_k"},
    ),
    "projection GQA": (
        _projection(
            heads=[{"wq": _r(3, 2)} for _ in range(4)],
            kv_heads=[{"wk": _r(3, 2), "wv": _r(3, 2)} for _ in range(2)],
            wo=_r(8, 3),
        ),
        {"torch_sdpa": None, "torch_mha": "grouped-query"},
    ),
    "projection cross, another d_model": (
        _projection(x_kv=_r(6, 5), heads=[{"wq": _r(3, 2), "wk": _r(5, 2), "wv": _r(5, 2)} for _ in range(2)]),
        {"torch_sdpa": None, "torch_mha": None},
    ),
    "projection d_out > H·d_k": (_projection(wo=_r(4, 9)), {"torch_mha": "d_out <= embed_dim"}),
    "projection mask per head": (_projection(mask=_rng.random((2, 5, 5)) > 0.3), {"torch_mha": "one mask"}),
    "projection window, bias, ALiBi, scale": (
        _projection(window=[1, 1], bias=_r(5, 5), alibi=True, scale="1/5"),
        {"torch_sdpa": None, "torch_mha": "does not accept"},
    ),
    "projection causal bottom-right cross": (
        _projection(x_kv=_r(6, 3), causal=True, align="bottom_right"),
        {"torch_sdpa": None, "torch_mha": "align = 'bottom_right'"},
    ),
    "projection empty row nan": (
        _projection(mask=np.tril(np.ones((5, 5), bool)) & (np.arange(5)[:, None] != 1), empty_row="nan"),
        {"torch_sdpa": "empty_row", "torch_mha": "empty_row"},
    ),
    "kernel score_mod": (
        _kernel(score_mod="30*tanh(s/30)", causal=True),
        {"torch_sdpa": "score_mod", "jax_dpa": "score_mod"},
    ),
    "projection score_mod": (
        _projection(score_mod="s + rel[h][kv_idx]", constants={"rel": _r(2, 5).tolist()}),
        {"torch_sdpa": "score_mod", "torch_mha": "score_mod"},
    ),
}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_what_an_adapter_cannot_express_is_unsupported_with_the_reason(case, backward):
    data, expected = ADAPTER_CASES[case]
    if "jax_dpa" in expected:
        pytest.importorskip("jax")
    spec = symattn.load_spec(data)
    results = verify(spec, list(expected), dtype="float32", backward=backward)
    for r in results:
        phrase = expected[r.name]
        if phrase is None:
            assert r.passed, r.lines()
        else:
            assert r.verdict == "UNSUPPORTED", r.lines()
            assert phrase in r.reasons[0], (phrase, r.reasons)


def test_jax_dpa_with_another_v_head_size_is_unsupported_through_the_cli(tmp_path, capsys):
    pytest.importorskip("jax")
    from symattn.cli import main

    data = {k: v.tolist() for k, v in ADAPTER_CASES["kernel E_v != E"][0].items()}
    path = tmp_path / "ev.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert main(["verify", str(path), "--impl", "jax_dpa", "--dtype", "bfloat16", "--json"]) == 1
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert r["verdict"] == "UNSUPPORTED"
    assert r["reasons"] == [
        "jax.nn.dot_product_attention needs V's head size equal to Q's and K's (the spec has E 3, E_v 2)"
    ]


def test_the_environment_records_torch_and_the_device_its_output_was_on(tmp_path, monkeypatch):
    q, k, v = random_qkv(seed=5)
    spec = symattn.load_spec({"q": q, "k": k, "v": v, "causal": True})
    (r,) = verify(spec, ["torch_sdpa"], dtype="bfloat16", cache=tmp_path)
    assert r.passed and r.devices == ["cpu"]
    assert r.environment["torch"] == torch.__version__ and r.environment["devices"] == ["cpu"]
    (again,) = verify(spec, ["torch_sdpa"], dtype="bfloat16", cache=tmp_path)  # torch's rounding: its own entry
    assert again.to_json() == r.to_json() and len(list(tmp_path.iterdir())) == 2

    def planted(q, k, v, *, scale, causal=False):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        out[2, 1, 3, 0] += 1  # batch element 2, head 1, row 3, column 0
        return out

    monkeypatch.setenv("SYMATTN_CACHE", str(tmp_path / "helper"))
    batch = [torch.stack([t] * 3) for t in random_qkv(seed=6, H_kv=4)]
    with pytest.raises(AssertionError, match=r"^batch element 2: planted is not close .* output\[1, 3, 0\] \(head 1, "):
        assert_attention_close(planted, q=batch[0], k=batch[1], v=batch[2], causal=True)
    assert len(list((tmp_path / "helper").iterdir())) == 2  # three equal elements: one truth and its measures


@pytest.mark.parametrize("case", ["causal bottom_right", "mask", "sinks"])
def test_the_truths_lse_is_torch_logsumexp_of_the_masked_scores(case):
    """lse{i} against torch.logsumexp in float64 of the scores with their masked entries -inf (a row of none:
    -inf), the sink's column appended where there is one."""
    q, k, v = random_qkv(seed=3, H=2, H_kv=2, L=5, S=3)
    scale = 0.5
    allowed = torch.ones(5, 3, dtype=torch.bool)
    options: dict = {"scale": scale}
    if case == "causal bottom_right":  # S - L = -2: rows 0 and 1 see no key
        allowed = torch.arange(3)[None, :] <= torch.arange(5)[:, None] - 2
        options.update(causal=True, align="bottom_right")
    elif case == "mask":
        allowed = torch.tensor([[True, False, True], [False] * 3, [True] * 3, [False, True, False], [True] * 3])
        options["mask"] = allowed.numpy()
    sinks = torch.tensor([0.25, -1.5], dtype=torch.float64) if case == "sinks" else None
    if sinks is not None:
        options["sinks"] = sinks.numpy()
    truth = symattn.evaluate({"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), **options}, digits=20)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(2, 5, 1)], dim=-1)
    expected = torch.logsumexp(scores, dim=-1).numpy()
    got = np.stack([truth[f"lse{h}"].to_numpy()[:, 0] for h in (1, 2)])
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-14)
    assert np.isneginf(got).any() == (case != "sinks")


# score_mod: FlexAttention's own eager path (uncompiled, CPU, float64) against the truth, the mods written as
# torch functions of the same rules.
REL = [[0, 0.5, -1, 1, 0.25, -2, 0.375, 0, 1, 2, -0.5], [1, 1, -0.5, 0, 0, 0.25, 0.125, 0, 2, -1, 0.5]]
FLEX_MODS = {
    "30*tanh(s/30)": lambda s, b, h, i, j: 30 * torch.tanh(s / 30),
    "s - 0.5*abs(q_idx - kv_idx)": lambda s, b, h, i, j: s - 0.5 * (i - j).abs(),
    "s + rel[h][q_idx - kv_idx + 5]": lambda s, b, h, i, j: s + torch.tensor(REL, dtype=s.dtype)[h, i - j + 5],
    "where(q_idx >= kv_idx, s, s - 100)": lambda s, b, h, i, j: torch.where(i >= j, s, s - 100),
    "where(s > 0, s, 2*s)": lambda s, b, h, i, j: torch.where(s > 0, s, 2 * s),
    "max(s, -1)": lambda s, b, h, i, j: torch.clamp(s, min=-1),
    "exp(s/8) + s**2/10": lambda s, b, h, i, j: torch.exp(s / 8) + s**2 / 10,
}


@pytest.mark.parametrize("mod", list(FLEX_MODS))
def test_flex_attention_float64_with_a_score_mod_agrees_with_the_truth(mod):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = random_qkv(seed=4, H=2, H_kv=2, L=6, S=6, E=4)
    data = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "score_mod": mod}
    if "rel" in mod:
        data["constants"] = {"rel": REL}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager path warns that it is not compiled
        out = flex.flex_attention(q[None], k[None], v[None], score_mod=FLEX_MODS[mod])[0]
    np.testing.assert_allclose(out.numpy(), exact(symattn.load_spec(data)), rtol=1e-12, atol=1e-13)
