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
                           "jax_dpa:cudnn": "float16 and bfloat16"}),
    "kernel causal bottom-right, window, ALiBi, bias per head, softcap": (
        _kernel(causal=True, window=[2, 0], align="bottom_right", alibi=True, bias=_r(4, 5, 6), softcap=2.0),
        {"torch_flex:eager": None, "torch_varlen": "CUDA", "jax_dpa:xla": "softcap"},
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


def test_compiled_flex_attention_passes_with_its_lse():
    pytest.importorskip("torch")
    spec = symattn.load_spec(_kernel(causal=True, softcap=3.0, bias=_r(5, 6)))
    (r,) = verify(spec, ["torch_flex"], dtype="float32")
    assert r.passed, r.lines()


@pytest.mark.parametrize("builtin", ["notebook", "causal", "gqa", "cross", "softcap", "varlen", "document"])
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
