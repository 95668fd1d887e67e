"""The attention of 2026 against torch in float64, computed the way each feature's users compute it there:
sinks as gpt-oss does (a logit column appended to the scores and dropped after the softmax), packed sequences by
running each segment through SDPA on its own, and mask_mod through FlexAttention's eager path.  Skipped where torch
is not installed (it is not a test dependency)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import symattn

torch = pytest.importorskip("torch")
F = torch.nn.functional


def qkv(seed, H=4, H_kv=2, L=10, S=10, E=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((H, L, E), (H_kv, S, E), (H_kv, S, E)))


def truth_of(data, steps=None, grad=False) -> dict:
    spec = symattn.load_spec(data)
    names = steps or [f"head{i}" for i in range(1, spec.h + 1)]
    truth = symattn.evaluate(spec, digits=20, grad=grad, steps=names)
    return {name: truth[name].to_numpy() for name in names}


def heads(truth, H) -> np.ndarray:
    return np.stack([truth[f"head{i}"] for i in range(1, H + 1)])


def close(got, expected, rel=1e-13):
    """float64 against the exact values: within rel of the largest magnitude (a right float64 kernel's error)."""
    got = got.detach().numpy() if hasattr(got, "detach") else np.asarray(got)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= rel * max(np.abs(expected).max(), 1e-300)


# Sinks: gpt-oss's sdpa (model.py) concatenates the sink logit as one more column, softmaxes, drops it.


def gpt_oss(q, k, v, sinks, scale, window=None):
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    k, v = k.repeat_interleave(H // H_kv, 0), v.repeat_interleave(H // H_kv, 0)
    s = torch.einsum("hqd,hkd->hqk", q, k) * scale
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    masked = j > i
    if window is not None:
        masked = masked | (j < i - window)
    s = s.masked_fill(masked, -torch.inf)
    s = torch.cat([s, sinks.reshape(H, 1, 1).expand(H, L, 1)], dim=-1)
    w = torch.softmax(s, dim=-1)[..., :-1]
    return torch.einsum("hqk,hkd->hqd", w, v)


@pytest.mark.parametrize("window", [None, 3])
def test_sinks_as_gpt_oss_computes_them(window):
    q, k, v = qkv(1)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    data = {"q": q, "k": k, "v": v, "sinks": sinks.numpy(), "causal": True}
    if window is not None:
        data["window"] = [window, 0]
    expected = heads(truth_of(data), 4)
    close(gpt_oss(q, k, v, sinks, 8**-0.5, window), expected)


def test_dsinks_and_dq_dk_dv_through_torch_autograd():
    q, k, v = (t.requires_grad_(True) for t in qkv(2))
    sinks = torch.tensor([1.0, -2.0, 0.25, 3.0], dtype=torch.float64, requires_grad=True)
    gpt_oss(q, k, v, sinks, 8**-0.5).sum().backward()
    data = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "sinks": sinks.detach().numpy(), "causal": True}
    names = [f"dq{i}" for i in range(1, 5)] + ["dk1", "dk2", "dv1", "dv2", "dsinks"]
    truth = truth_of(data, names, grad=True)
    close(q.grad, np.stack([truth[f"dq{i}"] for i in range(1, 5)]))
    close(k.grad, np.stack([truth["dk1"], truth["dk2"]]))
    close(v.grad, np.stack([truth["dv1"], truth["dv2"]]))
    close(sinks.grad, truth["dsinks"][0])


# Packed sequences: each segment on its own through SDPA, the results concatenated (how varlen users check).


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_segments_against_sdpa_run_segment_by_segment(align):
    seg_q, seg_kv = [0, 3, 4, 8, 10], [0, 4, 6, 9, 12]
    q, k, v = qkv(3, S=12)
    data = {"q": q, "k": k, "v": v, "segments_q": seg_q, "segments_kv": seg_kv, "causal": True, "align": align}
    expected = heads(truth_of(data), 4)
    parts = []
    for a in range(len(seg_q) - 1):
        qa, ka, va = q[:, seg_q[a] : seg_q[a + 1]], k[:, seg_kv[a] : seg_kv[a + 1]], v[:, seg_kv[a] : seg_kv[a + 1]]
        mask = torch.ones(qa.shape[1], ka.shape[1], dtype=torch.bool).tril(
            ka.shape[1] - qa.shape[1] if align == "bottom_right" else 0
        )
        parts.append(F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, enable_gqa=True))
    close(torch.cat(parts, dim=1), expected)


# mask_mod: FlexAttention's own mask_mod, run eagerly (its unfused path) on the CPU.


def flex(q, k, v, mask_mod, score_mod=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L, S = q.shape[1], k.shape[1]
    block_mask = create_block_mask(mask_mod, None, None, L, S, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": the eager path is meant
        out = flex_attention(q[None], k[None], v[None], score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
    return out[0]


def test_document_causal_mask_mod_against_flex_attention():
    doc = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    q, k, v = qkv(4)
    data = {
        "q": q,
        "k": k,
        "v": v,
        "mask_mod": "doc[q_idx] == doc[kv_idx] and q_idx >= kv_idx",
        "constants": {"doc": doc},
    }
    expected = heads(truth_of(data), 4)
    d = torch.tensor(doc)
    close(flex(q, k, v, lambda b, h, qi, ki: (d[qi] == d[ki]) & (qi >= ki)), expected)


def test_a_per_head_sliding_window_mask_mod_against_flex_attention():
    q, k, v = qkv(5, S=13)
    data = {"q": q, "k": k, "v": v, "mask_mod": "q_idx - kv_idx <= 2 + 3*h and kv_idx <= q_idx + 3"}
    expected = heads(truth_of(data), 4)
    close(flex(q, k, v, lambda b, h, qi, ki: (qi - ki <= 2 + 3 * h) & (ki <= qi + 3)), expected)
