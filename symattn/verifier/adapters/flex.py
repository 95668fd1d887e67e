"""PyTorch's FlexAttention: ``torch_flex`` compiled (how it is used), ``torch_flex:eager`` its unfused eager path
(no compile: seconds fewer per spec on the CPU, the same semantics).

The spec's mask rules (mask, causal, window, alignment, segments, mask_mod) become one BlockMask over the dense
mask of allowed keys; softcap, the bias, ALiBi and the spec's score_mod become one score_mod (the spec's tree, as
``symattn.scoremod`` folds it, run on torch tensors: ``_TorchMod``); grouped-query heads go through
``enable_gqa``; the LSE comes back through ``return_lse`` (the natural log, −inf on a row with no allowed key),
so the verifier checks it too.  FlexAttention has no backward on the CPU: there, ``--backward`` is UNSUPPORTED.
"""

from __future__ import annotations

import warnings

import numpy as np

from symattn.verifier.adapters.common import Unsupported, exact_array, mask_and_ramp, no_dropout, torch_module
from symattn.verifier.adapters.pytorch import Leaves, project, to_numpy, torch_cast

_COMPILED = {}


def _flex_attention(torch, compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["flex"]


class _TorchMod:
    """The ``xp`` a score_mod's tree (``scoremod.Run``) runs through inside FlexAttention's score_mod: torch
    tensors of the scores; a folded array (made once, (H or 1, L, S)) read at the entry's (h, q_idx, kv_idx)."""

    def __init__(self, torch, h, q_idx, kv_idx):
        self.torch, self.at = torch, (h, q_idx, kv_idx)

    def const(self, folded):
        h, q_idx, kv_idx = self.at
        return folded[h if folded.shape[0] > 1 else 0, q_idx, kv_idx]

    def param(self, p):
        return float(p.value)

    def scale(self, a, s):
        return a * s

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def one_minus(self, a):
        return 1 - a

    def tanh(self, a):
        return self.torch.tanh(a)

    def scaled_tanh(self, a, inner, outer):
        return outer * self.torch.tanh(a * inner)

    def exp(self, a):
        return self.torch.exp(a)

    def positive(self, a, strict):
        return a > 0 if strict else a >= 0

    def logical(self, op, *conditions):
        if op == "not":
            return ~conditions[0]
        return conditions[0] & conditions[1] if op == "and" else conditions[0] | conditions[1]

    def select(self, condition, a, b):
        return self.torch.where(condition, a, b)


def _spec_mod(torch, leaf, expr, constants, H, L, S, dtype):
    """The spec's score_mod as a function (s, h, q_idx, kv_idx) -> s' on torch tensors, its folded arrays made
    once on the device (exact values rounded to ``dtype``, as the constants reach any implementation)."""
    from symattn import scoremod
    from symattn.graph.ops import Param

    mod = scoremod.fold(expr, {k: exact_array(v) for k, v in (constants or {}).items()}, H, L, S)
    arrays = [leaf.constant(np.asarray(a, dtype=np.float64), dtype) for a in mod.arrays]
    bools = [leaf.constant(np.asarray(b, dtype=bool)) for b in mod.bools]
    scalars = tuple(Param(f"mod_scalar{k}", q) for k, q in enumerate(mod.scalars))

    def apply(s, h, q_idx, kv_idx):
        return scoremod.Run(_TorchMod(torch, h, q_idx, kv_idx), s, arrays, bools, scalars).value(mod.tree)

    return apply


def _flex(torch, inputs, leaf, *, compiled, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
          alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, segments_q=None,
          segments_kv=None, mask_mod=None, score_mod=None, constants=None, empty_row="zero"):  # fmt: skip
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
    spec_mod = None
    if score_mod is not None:
        working = torch.float64 if q.dtype == torch.float64 else torch.float32  # FlexAttention's scores' dtype
        spec_mod = _spec_mod(torch, leaf, score_mod, constants, H, L, S, working)
    modded = None
    if softcap is not None or additive is not None or spec_mod is not None:
        cap = None if softcap is None else float(softcap)

        def modded(s, b, h, q_idx, kv_idx):
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            if additive is not None:
                s = s + additive[h, q_idx, kv_idx]
            return s if spec_mod is None else spec_mod(s, h, q_idx, kv_idx)

    attention = _flex_attention(torch, compiled)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        kwargs = dict(score_mod=modded, block_mask=block_mask, scale=float(scale), enable_gqa=k.shape[0] != H)
        if compiled and device.type == "cpu":  # "torch.compile on CPU only supports inference and return_lse is
            return finish(attention(q[None], k[None], v[None], **kwargs)[0], bo), None  # not supported yet"
        if _aux_request() is None:  # torch before AuxRequest: return_lse
            out, lse = attention(q[None], k[None], v[None], return_lse=True, **kwargs)
        else:
            out, aux = attention(q[None], k[None], v[None], return_aux=_aux_request()(lse=True), **kwargs)
            lse = aux.lse
    return finish(out[0], bo), lse[0]


def _aux_request():
    from torch.nn.attention import flex_attention

    return getattr(flex_attention, "AuxRequest", None)


def _flex_adapter(compiled: bool):
    name = "torch_flex" if compiled else "torch_flex:eager"

    def torch_flex(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                   alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None,
                   dropout_mask=None, segments_q=None, segments_kv=None, mask_mod=None, score_mod=None,
                   constants=None, empty_row="zero", device=None):  # fmt: skip
        """FlexAttention: the output and the LSE (H, L), natural log (compiled on the CPU: the output only, as
        torch.compile there gives no LSE)."""
        no_dropout("FlexAttention", dropout_p, dropout_mask)
        torch = torch_module(name)
        options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                       alibi_slopes=alibi_slopes, softcap=softcap, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo,
                       segments_q=segments_q, segments_kv=segments_kv, mask_mod=mask_mod, score_mod=score_mod,
                       constants=constants, empty_row=empty_row)  # fmt: skip
        with torch.no_grad():
            out, lse = _flex(torch, inputs, Leaves(torch, False, device), compiled=compiled, **options)
        return to_numpy(out) if lse is None else (to_numpy(out), to_numpy(lse))

    def torch_flex_backward(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                            alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None,
                            dropout_p=None, dropout_mask=None, segments_q=None, segments_kv=None, mask_mod=None,
                            score_mod=None, constants=None, empty_row="zero", device=None):  # fmt: skip
        """The input gradients of torch_flex by torch's autograd (on a CUDA device)."""
        no_dropout("FlexAttention", dropout_p, dropout_mask)
        if not str(device or "cpu").startswith("cuda"):
            raise Unsupported(f"FlexAttention has no backward on the CPU (device {device or 'cpu'})")
        torch = torch_module(name)
        *inputs, dout = inputs
        options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                       alibi_slopes=alibi_slopes, softcap=softcap, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo,
                       segments_q=segments_q, segments_kv=segments_kv, mask_mod=mask_mod, score_mod=score_mod,
                       constants=constants, empty_row=empty_row)  # fmt: skip
        leaf = Leaves(torch, True, device)
        out, _ = _flex(torch, inputs, leaf, compiled=compiled, **options)
        return leaf.gradients(out, dout)

    for fn in (torch_flex, torch_flex_backward):
        fn.cast, fn.adapter = torch_cast, name
    torch_flex.backward = torch_flex_backward
    return torch_flex


torch_flex = _flex_adapter(compiled=True)
torch_flex_eager = _flex_adapter(compiled=False)
