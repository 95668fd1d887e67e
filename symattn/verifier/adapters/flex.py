"""PyTorch's FlexAttention: ``torch_flex`` compiled (how it is used), ``torch_flex:eager`` its unfused eager path
(no compile: seconds fewer per spec on the CPU, the same semantics).

The spec's mask rules (mask, causal, window, alignment, segments, mask_mod) become one BlockMask over the dense
mask of allowed keys; softcap, the bias and ALiBi become a score_mod; grouped-query heads go through
``enable_gqa``; the LSE comes back through ``return_lse`` (the natural log, −inf on a row with no allowed key),
so the verifier checks it too.  FlexAttention has no backward on the CPU: there, ``--backward`` is UNSUPPORTED.
"""

from __future__ import annotations

import warnings

from symattn.verifier.adapters.common import Unsupported, mask_and_ramp, no_dropout, torch_module
from symattn.verifier.adapters.pytorch import Leaves, project, to_numpy, torch_cast

_COMPILED = {}


def _flex_attention(torch, compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["flex"]


def _flex(torch, inputs, leaf, *, compiled, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
          alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, segments_q=None,
          segments_kv=None, mask_mod=None, constants=None, empty_row="zero"):  # fmt: skip
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, finish = project(torch, inputs, leaf, x_kv, bq, bk, bv)
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    ok, ramp = mask_and_ramp(L, S, H, mask, causal, window, align, alibi_slopes, segments_q, segments_kv, mask_mod,
                             constants)  # fmt: skip
    if ok is not None and not ok.any(axis=-1).all() and empty_row != "zero":
        raise Unsupported(f"FlexAttention gives a row with no allowed key 0 (empty_row 'zero'); the spec asks for "
                          f"{empty_row!r}")  # fmt: skip
    device = q.device
    block_mask = None
    if ok is not None:
        allowed = leaf.constant(ok)

        def keys(b, h, q_idx, kv_idx):
            return allowed[h, q_idx, kv_idx]

        block_mask = create_block_mask(keys, None, H, L, S, device=device)
    additive = None
    if bias is not None:
        additive = leaf("bias", bias).expand(H, L, S)
    if ramp is not None:
        ramp = leaf.constant(ramp, q.dtype)
        additive = ramp if additive is None else additive + ramp
    score_mod = None
    if softcap is not None or additive is not None:
        cap = None if softcap is None else float(softcap)

        def score_mod(s, b, h, q_idx, kv_idx):
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            if additive is not None:
                s = s + additive[h, q_idx, kv_idx]
            return s

    attention = _flex_attention(torch, compiled)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out, lse = attention(q[None], k[None], v[None], score_mod=score_mod, block_mask=block_mask,
                             scale=float(scale), enable_gqa=k.shape[0] != H, return_lse=True)  # fmt: skip
    return finish(out[0], bo), lse[0]


def _flex_adapter(compiled: bool):
    name = "torch_flex" if compiled else "torch_flex:eager"

    def torch_flex(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                   alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None,
                   dropout_mask=None, segments_q=None, segments_kv=None, mask_mod=None, constants=None,
                   empty_row="zero", device=None):  # fmt: skip
        """FlexAttention: the output and the LSE (H, L), natural log."""
        no_dropout("FlexAttention", dropout_p, dropout_mask)
        torch = torch_module(name)
        options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                       alibi_slopes=alibi_slopes, softcap=softcap, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo,
                       segments_q=segments_q, segments_kv=segments_kv, mask_mod=mask_mod, constants=constants,
                       empty_row=empty_row)  # fmt: skip
        with torch.no_grad():
            out, lse = _flex(torch, inputs, Leaves(torch, False, device), compiled=compiled, **options)
        return to_numpy(out), to_numpy(lse)

    def torch_flex_backward(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                            alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None,
                            dropout_p=None, dropout_mask=None, segments_q=None, segments_kv=None, mask_mod=None,
                            constants=None, empty_row="zero", device=None):  # fmt: skip
        """The input gradients of torch_flex by torch's autograd (on a CUDA device)."""
        no_dropout("FlexAttention", dropout_p, dropout_mask)
        if not str(device or "cpu").startswith("cuda"):
            raise Unsupported(f"FlexAttention has no backward on the CPU (device {device or 'cpu'})")
        torch = torch_module(name)
        *inputs, dout = inputs
        options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                       alibi_slopes=alibi_slopes, softcap=softcap, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo,
                       segments_q=segments_q, segments_kv=segments_kv, mask_mod=mask_mod, constants=constants,
                       empty_row=empty_row)  # fmt: skip
        leaf = Leaves(torch, True, device)
        out, _ = _flex(torch, inputs, leaf, compiled=compiled, **options)
        return leaf.gradients(out, dout)

    for fn in (torch_flex, torch_flex_backward):
        fn.cast, fn.adapter = torch_cast, name
    torch_flex.backward = torch_flex_backward
    return torch_flex


torch_flex = _flex_adapter(compiled=True)
torch_flex_eager = _flex_adapter(compiled=False)
