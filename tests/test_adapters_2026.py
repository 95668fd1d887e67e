"""The adapters of issue 20: FlexAttention (compiled and eager), torch's varlen_attn, JAX's dot_product_attention
with its implementation chosen, and devices.  The frameworks' tests are skipped where torch or JAX is not installed;
the device checks run everywhere."""

from __future__ import annotations

import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.verifier import verify
from symattn.verifier.adapters import check_device

_rng = np.random.default_rng(7)


def _r(*shape):
    return _rng.standard_normal(shape)


def _kernel(**options) -> dict:
    return {"q": _r(4, 5, 3), "k": _r(2, 6, 3), "v": _r(2, 6, 3), **options}


def _projection(**options) -> dict:
    heads = [{"wq": _r(3, 2), "wk": _r(3, 2), "wv": _r(3, 2)} for _ in range(2)]
    return {"x": _r(5, 3), "heads": heads, "wo": _r(4, 3), **options}


_EMPTY = np.ones((5, 6), bool)
_EMPTY[2] = False

# case -> (spec, {adapter: None for a pass, or a phrase of its UNSUPPORTED reason}) on the CPU
CASES = {
    "kernel": (_kernel(), {"torch_flex:eager": None, "torch_varlen": "CUDA", "jax_dpa:xla": None,
                           "jax_dpa:cudnn": "needs a CUDA device"}),
    "kernel causal bottom-right, window, ALiBi, bias per head, softcap": (
        _kernel(causal=True, window=[2, 0], align="bottom_right", alibi=True, bias=_r(4, 5, 6), softcap=2.0),
        {"torch_flex:eager": None, "torch_varlen": "does not accept", "jax_dpa:xla": "softcap"},
    ),
    "kernel mask per head, scale": (_kernel(mask=_rng.random((4, 5, 6)) > 0.3, scale="1/3"),
                                    {"torch_flex:eager": None, "torch_varlen": "mask"}),
    "kernel segments causal bottom-right": (
        _kernel(segments_q=[0, 2, 5], segments_kv=[0, 3, 6], causal=True, align="bottom_right"),
        {"torch_flex:eager": None, "torch_varlen": "CUDA", "jax_dpa:xla": None},
    ),
    "kernel mask_mod": (
        _kernel(mask_mod="doc[q_idx] == doc[kv_idx] or h == 0", constants={"doc": [0, 0, 1, 1, 1, 1]}),
        {"torch_flex:eager": None, "torch_varlen": "mask_mod"},
    ),
    "kernel score_mods with causal and softcap": (
        _kernel(causal=True, softcap=4.0, constants={"rel": _r(4, 11).round(2).tolist()},
                score_mod="where(s > 0, s, s/2) + rel[h][q_idx - kv_idx + 5] - 0.25*abs(q_idx - kv_idx)"),
        {"torch_flex:eager": None, "torch_varlen": "score_mod", "jax_dpa:xla": "score_mod"},
    ),
    "kernel empty row zero": (_kernel(mask=_EMPTY), {"torch_flex:eager": None}),
    "kernel empty row uniform": (_kernel(mask=_EMPTY, empty_row="uniform"),
                                 {"torch_flex:eager": "empty_row 'zero'", "jax_dpa:xla": None}),
    "kernel sinks": (_kernel(sinks=[1, 0, -1, 2]), {"torch_flex:eager": "sinks", "torch_varlen": "sinks"}),
    "kernel dropout": (_kernel(dropout_p="1/4", dropout_mask=_rng.random((5, 6)) > 0.3),
                       {"torch_flex:eager": "samples its own dropout mask"}),
    "projection GQA, bias": (
        _projection(heads=[{"wq": _r(3, 2)} for _ in range(4)], kv_heads=[{"wk": _r(3, 2), "wv": _r(3, 2)}] * 2,
                    wo=_r(8, 3), bias=_r(5, 5), causal=True),
        {"torch_flex:eager": None, "torch_varlen": "kernel form", "jax_dpa:xla": "kernel form"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_adapter_passes_what_it_expresses_and_says_why_not_otherwise(case, dtype):
    pytest.importorskip("torch")
    data, expected = CASES[case]
    if any(name.startswith("jax") for name in expected):
        pytest.importorskip("jax")
    for r in verify(symattn.load_spec(data), list(expected), dtype=dtype, device="cpu"):
        phrase = expected[r.name]
        if phrase is None:
            assert r.passed, r.lines()
        else:
            assert r.verdict == "UNSUPPORTED", r.lines()
            assert phrase in r.reasons[0], (phrase, r.reasons)


def test_flex_backward_is_unsupported_on_the_cpu():
    pytest.importorskip("torch")
    (r,) = verify(symattn.load_spec(_kernel(causal=True)), ["torch_flex:eager"], dtype="float32", backward=True)
    assert r.verdict == "UNSUPPORTED"
    assert "no backward on the CPU" in r.reasons[0]


def test_compiled_flex_attention_passes():  # with its lse where torch.compile gives one (not on the CPU)
    pytest.importorskip("torch")
    spec = symattn.load_spec(_kernel(causal=True, softcap=3.0, bias=_r(5, 6)))
    (r,) = verify(spec, ["torch_flex"], dtype="float32")
    assert r.passed, r.lines()


@pytest.mark.parametrize("builtin", ["notebook", "causal", "gqa", "cross", "softcap", "varlen", "document", "relbias"])
def test_flex_passes_the_builtin_examples(builtin):
    pytest.importorskip("torch")
    (r,) = verify(builtin, ["torch_flex:eager"], dtype="float32")
    assert r.passed, r.lines()


def test_device_names_are_checked():
    assert check_device(None) is None
    assert check_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", 0):
        with pytest.raises(SymattnError, match=r"^device: expected cpu, cuda or cuda:N, received"):
            check_device(bad)


def test_cuda_where_there_is_none_is_a_one_line_error(cli):
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    except ImportError:
        pass
    with pytest.raises(SymattnError, match=r"^device: expected a CUDA device that exists, received 'cuda:0' \("):
        verify("notebook", ["torch_sdpa"], device="cuda:0")
    r = cli("verify", "notebook", "--impl", "torch_sdpa", "--device", "cuda")
    assert r.returncode == 2
    assert r.stderr.startswith("symattn: error: device: expected a CUDA device that exists, received 'cuda'")
    assert r.stderr.count("\n") == 1
    r = cli("verify", "notebook", "--device", "tpu")
    assert r.returncode == 2 and "device: expected cpu, cuda or cuda:N, received 'tpu'" in r.stderr


def test_the_pytest_helper_makes_every_option_tensor_on_the_inputs_device_and_dtype():
    torch = pytest.importorskip("torch")
    from symattn.testing import assert_attention_close

    seen = {}

    def spy(q, k, v, *, scale, mask=None, bias=None, alibi_slopes=None, causal=False):
        seen.update(mask=mask, bias=bias, slopes=alibi_slopes)
        s = torch.einsum("hle,hse->hls", q, k) * scale + bias - alibi_slopes[:, None, None] * 0
        s = s - alibi_slopes[:, None, None] * (torch.arange(5)[:, None] - torch.arange(6)[None, :]).abs().to(q)
        s = s.masked_fill(~mask, -torch.inf)
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((2, 5, 4), (2, 6, 4), (2, 6, 4)))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 4] = False
    bias = torch.randn(5, 6, generator=g)
    assert_attention_close(spy, q=q, k=k, v=v, mask=mask, bias=bias, alibi_slopes=torch.tensor([0.5, 0.25]))
    for name, t in seen.items():
        assert t.device == q.device, name
    assert seen["mask"].dtype == torch.bool
    assert seen["bias"].dtype == seen["slopes"].dtype == torch.bfloat16


def _fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False, **_):  # fmt: skip
    """torch's varlen_attn as its docstring defines it (FlashAttention's varlen semantics), written here: (T, H, D)
    tensors, sequences by cumulative offsets, windows (left, right) around i + (len_k − len_q) with −1
    unbounded, (−1, 0) causal."""
    torch = pytest.importorskip("torch")
    H, H_kv = query.shape[1], key.shape[1]
    out = torch.zeros(query.shape[0], H, value.shape[2], dtype=query.dtype)
    left, right = window_size
    for a in range(len(cu_seq_q) - 1):
        q0, q1, k0, k1 = int(cu_seq_q[a]), int(cu_seq_q[a + 1]), int(cu_seq_k[a]), int(cu_seq_k[a + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        delta = (k1 - k0) - (q1 - q0)
        i, j = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None, :]
        ok = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if right >= 0:
            ok &= j <= i + delta + right
        if left >= 0:
            ok &= j >= i + delta - left
        for h in range(H):
            g = h * H_kv // H if enable_gqa else h
            s = (query[q0:q1, h] @ key[k0:k1, g].T) * scale
            p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
            out[q0:q1, h] = p @ value[k0:k1, g]
    return out


@pytest.mark.parametrize(
    "options",
    [{"causal": True, "align": "bottom_right"}, {"window": [1, 0], "align": "bottom_right"},
     {"causal": True, "window": [2, None], "align": "bottom_right"}, {}],
    ids=["causal", "window", "causal and window", "none"],
)  # fmt: skip
def test_torch_varlen_feeds_varlen_attn_by_its_contract(options, monkeypatch):
    """The CUDA-only kernel replaced by its documented semantics: the adapter's offsets, window sizes, layout and
    GQA reach it as the contract says, and the result is the spec's truth."""
    torch = pytest.importorskip("torch")
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    from symattn.verifier.adapters.pytorch import Leaves, _varlen

    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen_attn)
    seg_q, seg_kv = [0, 2, 5], [0, 3, 6]
    data = {**_kernel(**options), "segments_q": seg_q, "segments_kv": seg_kv}
    spec = symattn.load_spec(data)
    expected = np.stack([symattn.evaluate(spec, digits=17)[f"head{i}"].to_numpy() for i in range(1, 5)])
    leaf = Leaves(torch, False)  # tensors stay on the CPU; the device only tells the adapter it may run
    q, k, v = (leaf(n, np.asarray(data[n], dtype=np.float64)) for n in ("q", "k", "v"))
    out = _varlen(torch, leaf, q, k, v, scale=3**-0.5, causal=data.get("causal", False),
                  window=data.get("window"), align=data.get("align", "top_left"), segments_q=seg_q,
                  segments_kv=seg_kv, device="cuda")  # fmt: skip
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
